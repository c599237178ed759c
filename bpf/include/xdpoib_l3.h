/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_l3.h - validating, trimming and moving the L3 packet (BPF only).
 *
 * Includes: xdpoib_frame.h. Offers: ipoib_carries (the EtherTypes IPoIB carries), l3_keep (the oracle's L3 header and length checks: how many L3
 * bytes to keep, padding cut) and l3_move (put the L3 packet under an L2 header of another size).
 *
 * Offsets, here and in xdpoib_arp.h and xdpoib_nd.h: `in_l2` is where L3 starts in the input frame
 * (14/18 on TX, 4 on RX), `out_l2` where it starts in the output (4 on TX, 14/18 on RX). Each rewrite
 * leaves the frame sized and filled from out_l2 on; the caller writes the new L2 header into
 * [0, out_l2). Functions return 0 or a drop reason (positive).
 */
#ifndef XDPOIB_L3_H
#define XDPOIB_L3_H

#include "xdpoib_frame.h"

/**
 * Is this an EtherType IPoIB carries (IPv4, ARP, RARP, IPv6, TIPC)?
 *
 * @v etype     EtherType (host order)
 */
static __always_inline int ipoib_carries(u16 etype)
{
	return etype == XDPOIB_ETH_P_IP || etype == XDPOIB_ETH_P_IPV6 || etype == XDPOIB_ETH_P_ARP ||
	       etype == XDPOIB_ETH_P_RARP || etype == XDPOIB_ETH_P_TIPC;
}

/**
 * Validate the L3 header as the oracle's _trim_l3 does and return how much of it to keep.
 *
 * @v ctx       XDP context
 * @v off       L3 offset (at most 18)
 * @v etype     EtherType (host order), one IPoIB carries
 * @ret L3 bytes to keep (padding cut), or minus a drop reason
 */
static __always_inline int l3_keep(struct xdp_md *ctx, u32 off, u16 etype)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	u8 *p;
	u32 avail, need, tot, ihl;

	if (off > XO_MAX_L2_HLEN || data + off > data_end)
		return -XDPOIB_DROP_TRUNCATED;
	p = data + off;
	avail = data_end - (void *)p;
	switch (etype) {
	case XDPOIB_ETH_P_IP:
		if (avail < XO_IPV4_HLEN || (void *)(p + XO_IPV4_HLEN) > data_end)
			return -XDPOIB_DROP_TRUNCATED;
		ihl = p[0] & 0x0f;
		if ((p[0] >> 4) != XO_IPV4_VERSION || ihl < XO_IPV4_MIN_IHL)
			return -XDPOIB_DROP_BAD_IP_HEADER;
		tot = ((u32)p[XO_IPV4_OFF_TOT_LEN] << 8) | p[XO_IPV4_OFF_TOT_LEN + 1];
		if (tot < ihl * 4 || tot > avail)
			return -XDPOIB_DROP_BAD_LENGTH;
		return tot;
	case XDPOIB_ETH_P_IPV6:
		if (avail < XO_IPV6_HLEN || (void *)(p + XO_IPV6_HLEN) > data_end)
			return -XDPOIB_DROP_TRUNCATED;
		if ((p[0] >> 4) != XO_IPV6_VERSION)
			return -XDPOIB_DROP_BAD_IP_HEADER;
		tot = XO_IPV6_HLEN + (((u32)p[XO_IPV6_OFF_PLEN] << 8) | p[XO_IPV6_OFF_PLEN + 1]);
		if (tot > avail)
			return -XDPOIB_DROP_BAD_LENGTH;
		return tot;
	case XDPOIB_ETH_P_ARP:
	case XDPOIB_ETH_P_RARP:
		if (avail < XO_ARP_HLEN || (void *)(p + XO_ARP_HLEN) > data_end)
			return -XDPOIB_DROP_TRUNCATED;
		/* ptype IPv4 (bytes 2-3), plen 4 (byte 5); htype (0-1) with its hlen (4) picks the form */
		if (p[2] != XO_HI(XDPOIB_ETH_P_IP) || p[3] != XO_LO(XDPOIB_ETH_P_IP) || p[5] != XO_ARP_PLEN_IPV4)
			return -XDPOIB_DROP_BAD_ARP;
		if (p[0] == 0 && p[1] == XDPOIB_ARPHRD_ETHER && p[4] == XO_ARP_HLEN_ETH)
			need = XDPOIB_ARP_ETH_BODY;
		else if (p[0] == 0 && p[1] == XDPOIB_ARPHRD_INFINIBAND && p[4] == XO_ARP_HLEN_IB)
			need = XDPOIB_ARP_IB_BODY;
		else
			return -XDPOIB_DROP_BAD_ARP;
		if (avail < need)
			return -XDPOIB_DROP_TRUNCATED;
		return need;
	default:                        /* TIPC: untranslated */
		return avail;
	}
}

/**
 * Cut padding and move the L3 packet from in_l2 to out_l2 (no change to L3 itself).
 *
 * @v ctx       XDP context
 * @v s         state
 * @v in_l2     L3 offset now
 * @v keep      L3 bytes to keep
 * @v out_l2    L3 offset wanted
 * @ret 0 or a drop reason
 */
static __always_inline int l3_move(struct xdp_md *ctx, struct xo_state *s, u32 in_l2, u32 keep, u32 out_l2)
{
	if (set_len(ctx, in_l2 + keep))
		return XDPOIB_DROP_NO_ROOM;
	if (adjust_head(ctx, s, (int)in_l2 - (int)out_l2))
		return XDPOIB_DROP_NO_ROOM;
	return 0;
}

#endif /* XDPOIB_L3_H */
