/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_l3.h - L3 checks and rewrites shared by TX and RX (BPF only): validate and trim the L3
 * packet, move it under a new L2 header, translate ARP bodies and ND link-layer options.
 *
 * Offsets: `in_l2` is where L3 starts in the input frame (14/18 on TX, 4 on RX), `out_l2` where it
 * starts in the output (4 on TX, 14/18 on RX). Each rewrite leaves the frame sized and filled from
 * out_l2 on; the caller writes the new L2 header into [0, out_l2). Functions return 0 or a drop
 * reason (positive).
 */
#ifndef XDPOIB_L3_H
#define XDPOIB_L3_H

#include "xdpoib_helpers.h"

#ifndef XDPOIB_RESTORE
#define ND_MAX_OPTS     64      /* options walked per ND message (more: NO_ROOM) */
#else
#define ND_MAX_OPTS     8       /* the restore (benchmark) build: keeps verification well under its limit */
#endif
#define ND_MAX_LLA      8       /* link-layer options translated per message (more: NO_ROOM) */
#define ND_SLOTS        XDPOIB_MAX_FRAME        /* scratch offset of the translated options */
#define L3_MASK         (XDPOIB_MAX_FRAME - 1)

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

	if (off > 18 || data + off > data_end)
		return -XDPOIB_DROP_TRUNCATED;
	p = data + off;
	avail = data_end - (void *)p;
	switch (etype) {
	case XDPOIB_ETH_P_IP:
		if (avail < 20 || (void *)(p + 20) > data_end)
			return -XDPOIB_DROP_TRUNCATED;
		ihl = p[0] & 0x0f;
		if ((p[0] >> 4) != 4 || ihl < 5)
			return -XDPOIB_DROP_BAD_IP_HEADER;
		tot = ((u32)p[2] << 8) | p[3];
		if (tot < ihl * 4 || tot > avail)
			return -XDPOIB_DROP_BAD_LENGTH;
		return tot;
	case XDPOIB_ETH_P_IPV6:
		if (avail < 40 || (void *)(p + 40) > data_end)
			return -XDPOIB_DROP_TRUNCATED;
		if ((p[0] >> 4) != 6)
			return -XDPOIB_DROP_BAD_IP_HEADER;
		tot = 40 + (((u32)p[4] << 8) | p[5]);
		if (tot > avail)
			return -XDPOIB_DROP_BAD_LENGTH;
		return tot;
	case XDPOIB_ETH_P_ARP:
	case XDPOIB_ETH_P_RARP:
		if (avail < 8 || (void *)(p + 8) > data_end)
			return -XDPOIB_DROP_TRUNCATED;
		if (p[2] != 0x08 || p[3] != 0x00 || p[5] != 4)
			return -XDPOIB_DROP_BAD_ARP;
		if (p[0] == 0 && p[1] == XDPOIB_ARPHRD_ETHER && p[4] == 6)
			need = 8 + 2 * 6 + 8;
		else if (p[0] == 0 && p[1] == XDPOIB_ARPHRD_INFINIBAND && p[4] == 20)
			need = 8 + 2 * 20 + 8;
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

/* ================================================================ ARP (docs/design.md §3.7) */

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
		__builtin_memset(out, 0, 20);
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
	for (i = 0; i < 20; i++)
		any |= raw[i];
	if (!any || (raw[1] & raw[2] & raw[3]) == 0xff) {
		__builtin_memset(out, 0, 6);
		return 0;
	}
	m = mac_by_addr(raw);
	if (!m)
		return XDPOIB_DROP_ARP_UNKNOWN_HWADDR;
	__builtin_memcpy(out, m, 6);
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
	out[0] = 0;
	out[1] = to_ib ? XDPOIB_ARPHRD_INFINIBAND : XDPOIB_ARPHRD_ETHER;
	out[2] = 0x08;
	out[3] = 0x00;
	out[4] = to_ib ? 20 : 6;
	out[5] = 4;
	out[6] = in[6];
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

/* ================================================================ ND (docs/design.md §3.8) */

/**
 * Return the size of an ND message's fixed part after the ICMPv6 header, or 0 if not ND.
 *
 * @v type      ICMPv6 type
 */
static __always_inline u32 nd_fixed(u8 type)
{
	switch (type) {
	case 133: return 4;     /* RS */
	case 134: return 12;    /* RA */
	case 135: return 20;    /* NS */
	case 136: return 20;    /* NA */
	case 137: return 36;    /* Redirect */
	}
	return 0;
}

/**
 * Sum len bytes (a multiple of 4, at most 2048) of scratch from off into a checksum.
 *
 * @v b         scratch
 * @v off       offset (at most 2047)
 * @v len       bytes
 * @v sum       running sum
 * @ret new running sum
 */
static __always_inline u32 csum_scratch(u8 *b, u32 off, u32 len, u32 sum)
{
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		u32 n, o = i * 512;
		s64 r;

		if (o >= len)
			break;
		n = len - o;
		if (n > 512)
			n = 512;
		r = bpf_csum_diff(NULL, 0, (void *)(b + xo_mask(off + o, 2047)), xo_mask(n, 1023), sum);
		sum = (u32)r;
	}
	return sum;
}

/**
 * Translate the link-layer options of an ND message (8 <-> 24 bytes), fixing the IPv6 payload
 * length and the ICMPv6 checksum (recomputed; a wrong input checksum is BAD_ND, as in the oracle).
 *
 * @v ctx       XDP context
 * @v s         state
 * @v in_l2     L3 offset now
 * @v l3len     L3 bytes (validated, padding excluded), with an ND type at L3 offset 40
 * @v out_l2    L3 offset wanted
 * @v to_ib     1 for TX, 0 for RX
 * @ret 0 or a drop reason
 */
static __always_inline int nd_rewrite(struct xdp_md *ctx, struct xo_state *s, u32 in_l2, u32 l3len,
				      u32 out_l2, int to_ib)
{
	u32 zero = 0, fixed, mlen, o, w, olen, i, j, nlla = 0, newl3, sum;
	struct xo_scratch *sc = xo_scratch.lookup(&zero);
	u32 ph[2], len_old, len_new;
	u16 stored, csum, be;
	u8 *b, t;

	if (!sc)
		return XDPOIB_DROP_NO_ROOM;
	if (l3len < 41 || l3len > XDPOIB_MAX_FRAME - 64)
		return XDPOIB_DROP_NO_ROOM;
	b = sc->buf;
	if (bpf_xdp_load_bytes(ctx, in_l2, b, xo_size(l3len, 2047)))
		return XDPOIB_DROP_NO_ROOM;
	fixed = nd_fixed(b[40]);
	mlen = l3len - 40;
	if (fixed == 0 || mlen < 4 + fixed)
		return XDPOIB_DROP_BAD_ND;

	/* checksum check over pseudo-header + message (checksum field zeroed, zero pad to 4) */
	stored = *(u16 *)(b + 42);
	*(u16 *)(b + 42) = 0;
	b[xo_mask(l3len, 2047)] = 0;
	b[xo_mask(l3len + 1, 2047)] = 0;
	b[xo_mask(l3len + 2, 2047)] = 0;
	len_old = bpf_htonl(mlen);
	ph[0] = len_old;
	ph[1] = bpf_htonl(58);
	sum = (u32)bpf_csum_diff(NULL, 0, (void *)(b + 8), 32, 0);
	sum = (u32)bpf_csum_diff(NULL, 0, (void *)ph, 8, sum);
	sum = csum_scratch(b, 40, (mlen + 3) & ~3U, sum);
	if ((u16)~csum_fold16(sum) != stored)
		return XDPOIB_DROP_BAD_ND;

	/* walk the options: structure first (as the oracle parses them all before translating) */
	sc->o = 44 + fixed;
	sc->nlla = 0;
	for (i = 0; i < ND_MAX_OPTS; i++) {
		o = sc->o;
		if (o >= l3len)
			break;
		if (l3len - o < 2)
			return XDPOIB_DROP_BAD_ND;
		olen = (u32)b[xo_mask(o + 1, 2047)] * 8;
		if (olen == 0 || o + olen > l3len)
			return XDPOIB_DROP_BAD_ND;
		t = b[xo_mask(o, 2047)];
		if (t == 1 || t == 2) {
			j = sc->nlla;
			if (j < ND_MAX_LLA)
				sc->lla_off[xo_mask(j, 7)] = o;
			sc->nlla = j + 1;
		}
		sc->o = o + olen;
	}
	if (sc->o < l3len)
		return XDPOIB_DROP_NO_ROOM;
	nlla = sc->nlla;

	/* translate each link-layer option into a slot, in order */
#pragma unroll
	for (j = 0; j < ND_MAX_LLA; j++) {
		u8 *opt, *slot = b + ND_SLOTS + j * 24, *x;

		if (j >= nlla)
			break;
		opt = b + xo_mask(sc->lla_off[j], 2047);
		if (opt[1] != (to_ib ? 1 : 3))
			return XDPOIB_DROP_BAD_ND;
		slot[0] = opt[0];
		if (to_ib) {
			if (addr_by_mac(opt + 2, slot + 4))
				return XDPOIB_DROP_ND_UNKNOWN_LLADDR;
			slot[1] = 3;
			slot[2] = 0;
			slot[3] = 0;
			sum = (u32)bpf_csum_diff((void *)opt, 8, (void *)slot, 24, sum);
		} else {
			x = mac_by_addr(opt + 4);
			if (!x)
				return XDPOIB_DROP_ND_UNKNOWN_LLADDR;
			slot[1] = 1;
			__builtin_memcpy(slot + 2, x, 6);
			sum = (u32)bpf_csum_diff((void *)opt, 24, (void *)slot, 8, sum);
		}
	}
	if (nlla > ND_MAX_LLA)
		return XDPOIB_DROP_NO_ROOM;
	newl3 = to_ib ? l3len + 16 * nlla : l3len - 16 * nlla;
	len_new = bpf_htonl(newl3 - 40);
	sum = (u32)bpf_csum_diff((void *)&len_old, 4, (void *)&len_new, 4, sum);
	csum = ~csum_fold16(sum);

	/* write: fixed part, then the options (translated ones from their slots) */
	/* padding cut at the tail (always fits), the size change at the head (tailroom may be nil, see
	 * arp_rewrite): the frame is then exactly out_l2 + newl3 bytes */
	if (set_len(ctx, in_l2 + l3len))
		return XDPOIB_DROP_NO_ROOM;
	if (adjust_head(ctx, s, (int)(in_l2 + l3len) - (int)(out_l2 + newl3)))
		return XDPOIB_DROP_NO_ROOM;
	if (bpf_xdp_store_bytes(ctx, out_l2, b, xo_size(44 + fixed, 127)))
		return XDPOIB_DROP_NO_ROOM;
	sc->o = 44 + fixed;
	sc->w = out_l2 + 44 + fixed;
	sc->j = 0;
	for (i = 0; i < ND_MAX_OPTS; i++) {
		o = sc->o;
		w = sc->w;
		if (o >= l3len)
			break;
		t = b[xo_mask(o, 2047)];
		olen = (u32)b[xo_mask(o + 1, 2047)] * 8;
		if (t == 1 || t == 2) {
			u32 n = to_ib ? 24 : 8;

			j = sc->j;
			if (bpf_xdp_store_bytes(ctx, w, b + ND_SLOTS + xo_mask(j, 7) * 24, n))
				return XDPOIB_DROP_NO_ROOM;
			sc->w = w + n;
			sc->j = j + 1;
		} else {
			if (olen == 0 || bpf_xdp_store_bytes(ctx, w, b + xo_mask(o, 2047), xo_size(olen, 2047)))
				return XDPOIB_DROP_NO_ROOM;
			sc->w = w + olen;
		}
		sc->o = o + olen;
	}
	be = bpf_htons(newl3 - 40);
	if (bpf_xdp_store_bytes(ctx, out_l2 + 4, &be, 2) || bpf_xdp_store_bytes(ctx, out_l2 + 42, &csum, 2))
		return XDPOIB_DROP_NO_ROOM;
	return 0;
}

/**
 * Is this IPv6 packet an ND message the datapath translates (next header ICMPv6, an ND type)?
 *
 * @v ctx       XDP context
 * @v off       L3 offset
 * @v keep      L3 bytes
 */
static __always_inline int is_nd(struct xdp_md *ctx, u32 off, u32 keep)
{
	u8 *h = pkt_at(ctx, off, 41);

	if (keep < 41 || !h)
		return 0;
	return h[6] == 58 && nd_fixed(h[40]) != 0;
}

#endif /* XDPOIB_L3_H */
