/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_arp.h - ARP and RARP bodies between their Ethernet (28 bytes) and IPoIB (56 bytes) forms
 * (BPF only; docs/design.md §3.7).
 *
 * Includes: xdpoib_frame.h, xdpoib_lookup.h. Offers: arp_rewrite (offsets as in xdpoib_l3.h).
 */
#ifndef XDPOIB_ARP_H
#define XDPOIB_ARP_H

#include "xdpoib_frame.h"
#include "xdpoib_lookup.h"

/**
 * Translate an Ethernet hardware address for an IPoIB ARP body.
 *
 * @v mac       6 bytes
 * @v out       20 bytes out
 * @ret 0 or XDPOIB_DROP_ARP_UNKNOWN_HWADDR
 */
static __always_inline int arp_hw_to_ib(const u8 *mac, u8 *out)
{
	u8 all = mac[0] & mac[1] & mac[2] & mac[3] & mac[4] & mac[5];
	u8 any = mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5];

	if (all == 0xff || any == 0) {
		__builtin_memset(out, 0, XDPOIB_HWADDR_LEN);
		return 0;
	}
	if (addr_by_mac(mac, out))
		return XDPOIB_DROP_ARP_UNKNOWN_HWADDR;
	return 0;
}

/**
 * Translate an IPoIB hardware address for an Ethernet ARP body. No address (20 zero bytes, Linux) and
 * a multicast one (QPN 0xffffff, the broadcast template Solaris puts in a request) become zero.
 *
 * @v raw       20 bytes
 * @v out       6 bytes out
 * @ret 0 or XDPOIB_DROP_ARP_UNKNOWN_HWADDR
 */
static __always_inline int arp_hw_to_eth(const u8 *raw, u8 *out)
{
	u8 *m;
	u32 any = 0;
	int i;

#pragma unroll
	for (i = 0; i < XDPOIB_HWADDR_LEN; i++)
		any |= raw[i];
	if (!any || (raw[1] & raw[2] & raw[3]) == 0xff) {
		__builtin_memset(out, 0, XDPOIB_ETH_ALEN);
		return 0;
	}
	m = mac_by_addr(raw);
	if (!m)
		return XDPOIB_DROP_ARP_UNKNOWN_HWADDR;
	__builtin_memcpy(out, m, XDPOIB_ETH_ALEN);
	return 0;
}

/**
 * Build the translated body of an ARP message in `out`, reading the input in place.
 *
 * @v in        the input body (its form's size, validated)
 * @v out       XDPOIB_ARP_IB_BODY bytes out
 * @v to_ib     1 for TX (Ethernet -> IPoIB), 0 for RX
 * @ret 0 or a drop reason
 */
static __always_inline int arp_translate(const u8 *in, u8 *out, int to_ib)
{
	int err;

	out[0] = 0;
	out[1] = to_ib ? XDPOIB_ARPHRD_INFINIBAND : XDPOIB_ARPHRD_ETHER;
	out[2] = XO_HI(XDPOIB_ETH_P_IP);
	out[3] = XO_LO(XDPOIB_ETH_P_IP);
	out[4] = to_ib ? XO_ARP_HLEN_IB : XO_ARP_HLEN_ETH;
	out[5] = XO_ARP_PLEN_IPV4;
	out[6] = in[6];                 /* op */
	out[7] = in[7];
	if (to_ib) {
		/* sha 8..13 spa 14..17 tha 18..23 tpa 24..27 -> sha 8..27 spa 28..31 tha 32..51 tpa 52..55 */
		err = arp_hw_to_ib(in + 8, out + 8);
		if (err)
			return err;
		__builtin_memcpy(out + 28, in + 14, 4);
		err = arp_hw_to_ib(in + 18, out + 32);
		if (err)
			return err;
		__builtin_memcpy(out + 52, in + 24, 4);
	} else {
		err = arp_hw_to_eth(in + 8, out + 8);
		if (err)
			return err;
		__builtin_memcpy(out + 14, in + 28, 4);
		err = arp_hw_to_eth(in + 32, out + 18);
		if (err)
			return err;
		__builtin_memcpy(out + 24, in + 52, 4);
	}
	return 0;
}

/**
 * Rewrite an ARP/RARP body between its Ethernet (28 bytes) and IPoIB (56 bytes) forms.
 *
 * @v ctx       XDP context
 * @v s         state
 * @v in_l2     L3 offset now (the body is validated and at least its form's size)
 * @v out_l2    L3 offset wanted
 * @v to_ib     1 for TX (Ethernet -> IPoIB), 0 for RX
 * @ret 0 or a drop reason
 */
static __always_inline int arp_rewrite(struct xdp_md *ctx, struct xo_state *s, u32 in_l2, u32 out_l2,
				       int to_ib)
{
	u8 *in, *p = pkt_at(ctx, in_l2, 2), out[XDPOIB_ARP_IB_BODY];
	u32 out_len = to_ib ? XDPOIB_ARP_IB_BODY : XDPOIB_ARP_ETH_BODY;
	int err;

	/* l3_keep accepted either form; the wrong one for this direction is BAD_ARP */
	if (!p)
		return XDPOIB_DROP_TRUNCATED;
	if (p[0] != 0 || p[1] != (to_ib ? XDPOIB_ARPHRD_ETHER : XDPOIB_ARPHRD_INFINIBAND))
		return XDPOIB_DROP_BAD_ARP;
	/* read the body in place: the packet is not touched until out is complete */
	in = pkt_at(ctx, in_l2, to_ib ? XDPOIB_ARP_ETH_BODY : XDPOIB_ARP_IB_BODY);
	if (!in)
		return XDPOIB_DROP_TRUNCATED;
	err = arp_translate(in, out, to_ib);
	if (err)
		return err;
	/* one head move does it all (padding cut, header and body resize): frames that veth or a TAP
	 * hand to XDP may have no tailroom at all, but they always have XDP_PACKET_HEADROOM */
	if (adjust_head(ctx, s, frame_len(ctx) - (int)(out_l2 + out_len)))
		return XDPOIB_DROP_NO_ROOM;
	if (to_ib) {
		p = pkt_at(ctx, out_l2, XDPOIB_ARP_IB_BODY);
		if (!p)
			return XDPOIB_DROP_NO_ROOM;
		__builtin_memcpy(p, out, XDPOIB_ARP_IB_BODY);
	} else {
		p = pkt_at(ctx, out_l2, XDPOIB_ARP_ETH_BODY);
		if (!p)
			return XDPOIB_DROP_NO_ROOM;
		__builtin_memcpy(p, out, XDPOIB_ARP_ETH_BODY);
	}
	return 0;
}

#endif /* XDPOIB_ARP_H */
