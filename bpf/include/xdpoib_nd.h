/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_nd.h - ND messages: link-layer options between 8 (Ethernet) and 24 (IPoIB) bytes, with the
 * IPv6 payload length and the ICMPv6 checksum fixed (BPF only; docs/design.md §3.8).
 *
 * Includes: xdpoib_csum.h, xdpoib_frame.h, xdpoib_lookup.h. Offers: is_nd (is this an ND message
 * the datapath translates) and nd_rewrite (offsets as in xdpoib_l3.h). The message is worked on in
 * the per-CPU scratch buffer (struct xo_scratch, xdpoib_maps.h): the L3 packet in [0, 2048), the
 * translated options from ND_SLOTS on; the option walks keep their state there too.
 */
#ifndef XDPOIB_ND_H
#define XDPOIB_ND_H

#include "xdpoib_csum.h"
#include "xdpoib_frame.h"
#include "xdpoib_lookup.h"

#ifndef XDPOIB_RESTORE
#define ND_MAX_OPTS     64      /* options walked per ND message (more: NO_ROOM) */
#else
#define ND_MAX_OPTS     8       /* the restore (benchmark) build: keeps verification well under its limit */
#endif
#define ND_MAX_LLA      8       /* link-layer options translated per message (more: NO_ROOM) */
#define ND_SLOTS        XDPOIB_MAX_FRAME        /* scratch offset of the translated options */
#define ND_MSG          XO_IPV6_HLEN            /* L3 offset of the ICMPv6 message */
#define ND_BODY         (ND_MSG + XO_ICMPV6_HLEN)       /* L3 offset of the message's fixed part */

/**
 * Return the size of an ND message's fixed part after the ICMPv6 header, or 0 if not ND.
 *
 * @v type      ICMPv6 type
 */
static __always_inline u32 nd_fixed(u8 type)
{
	switch (type) {
	case XO_ND_RS: return XO_ND_RS_FIXED;
	case XO_ND_RA: return XO_ND_RA_FIXED;
	case XO_ND_NS: return XO_ND_NS_FIXED;
	case XO_ND_NA: return XO_ND_NA_FIXED;
	case XO_ND_REDIRECT: return XO_ND_REDIRECT_FIXED;
	}
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
	u8 *h = pkt_at(ctx, off, ND_MSG + 1);

	if (keep < ND_MSG + 1 || !h)
		return 0;
	return h[XO_IPV6_OFF_NEXTHDR] == XO_IPPROTO_ICMPV6 && nd_fixed(h[ND_MSG]) != 0;
}

/**
 * Check the ICMPv6 checksum over the pseudo-header and the message (checksum field zeroed, zero pad
 * to 4), leaving in *sum the running sum the translation then adjusts.
 *
 * @v b         scratch: the L3 packet
 * @v l3len     L3 bytes
 * @v len_old   the pseudo-header's upper-layer length (network order)
 * @v sum       running sum out
 * @ret 0 or XDPOIB_DROP_BAD_ND
 */
static __always_inline int nd_csum_check(u8 *b, u32 l3len, u32 len_old, u32 *sum)
{
	u32 ph[2], mlen = l3len - ND_MSG, c;
	u16 stored;

	stored = *(u16 *)(b + ND_MSG + XO_ICMPV6_OFF_CSUM);
	*(u16 *)(b + ND_MSG + XO_ICMPV6_OFF_CSUM) = 0;
	b[xo_mask(l3len, 2047)] = 0;
	b[xo_mask(l3len + 1, 2047)] = 0;
	b[xo_mask(l3len + 2, 2047)] = 0;
	ph[0] = len_old;
	ph[1] = bpf_htonl(XO_IPPROTO_ICMPV6);
	c = (u32)bpf_csum_diff(NULL, 0, (void *)(b + XO_IPV6_OFF_SRC), XO_IPV6_ADDRS_LEN, 0);
	c = (u32)bpf_csum_diff(NULL, 0, (void *)ph, 8, c);
	c = csum_scratch(b, ND_MSG, (mlen + 3) & ~3U, c);
	if ((u16)~csum_fold16(c) != stored)
		return XDPOIB_DROP_BAD_ND;
	*sum = c;
	return 0;
}

/**
 * Walk the options for their structure first (as the oracle parses them all before translating),
 * noting where the link-layer ones are (sc->lla_off, sc->nlla).
 *
 * @v sc        scratch (b = sc->buf holds the L3 packet)
 * @v l3len     L3 bytes
 * @v fixed     the message's fixed part
 * @ret 0 or a drop reason
 */
static __always_inline int nd_walk_options(struct xo_scratch *sc, u32 l3len, u32 fixed)
{
	u8 *b = sc->buf, t;
	u32 o, olen, i, j;

	sc->o = ND_BODY + fixed;
	sc->nlla = 0;
	for (i = 0; i < ND_MAX_OPTS; i++) {
		o = sc->o;
		if (o >= l3len)
			break;
		if (l3len - o < 2)
			return XDPOIB_DROP_BAD_ND;
		olen = (u32)b[xo_mask(o + 1, 2047)] * XO_ND_OPT_UNIT;
		if (olen == 0 || o + olen > l3len)
			return XDPOIB_DROP_BAD_ND;
		t = b[xo_mask(o, 2047)];
		if (t == XO_ND_OPT_SRC_LLADDR || t == XO_ND_OPT_TGT_LLADDR) {
			j = sc->nlla;
			if (j < ND_MAX_LLA)
				sc->lla_off[xo_mask(j, 7)] = o;
			sc->nlla = j + 1;
		}
		sc->o = o + olen;
	}
	if (sc->o < l3len)
		return XDPOIB_DROP_NO_ROOM;
	return 0;
}

/**
 * Translate each link-layer option into its slot, in order, adjusting the running checksum.
 *
 * @v sc        scratch (after nd_walk_options)
 * @v to_ib     1 for TX, 0 for RX
 * @v sum       running sum, updated
 * @v n         link-layer options translated, out
 * @ret 0 or a drop reason
 */
static __always_inline int nd_translate_options(struct xo_scratch *sc, int to_ib, u32 *sum, u32 *n)
{
	u8 *b = sc->buf;
	u32 j, nlla = sc->nlla, c = *sum;

#pragma unroll
	for (j = 0; j < ND_MAX_LLA; j++) {
		u8 *opt, *slot = b + ND_SLOTS + j * XDPOIB_ND_OPT_IB, *x;

		if (j >= nlla)
			break;
		opt = b + xo_mask(sc->lla_off[j], 2047);
		if (opt[1] != (to_ib ? XO_ND_OPT_LEN_ETH : XO_ND_OPT_LEN_IB))
			return XDPOIB_DROP_BAD_ND;
		slot[0] = opt[0];
		if (to_ib) {
			if (addr_by_mac(opt + 2, slot + XO_ND_OPT_IB_ADDR))
				return XDPOIB_DROP_ND_UNKNOWN_LLADDR;
			slot[1] = XO_ND_OPT_LEN_IB;
			slot[2] = 0;
			slot[3] = 0;
			c = (u32)bpf_csum_diff((void *)opt, XDPOIB_ND_OPT_ETH, (void *)slot, XDPOIB_ND_OPT_IB, c);
		} else {
			x = mac_by_addr(opt + XO_ND_OPT_IB_ADDR);
			if (!x)
				return XDPOIB_DROP_ND_UNKNOWN_LLADDR;
			slot[1] = XO_ND_OPT_LEN_ETH;
			__builtin_memcpy(slot + 2, x, XDPOIB_ETH_ALEN);
			c = (u32)bpf_csum_diff((void *)opt, XDPOIB_ND_OPT_IB, (void *)slot, XDPOIB_ND_OPT_ETH, c);
		}
	}
	if (nlla > ND_MAX_LLA)
		return XDPOIB_DROP_NO_ROOM;
	*sum = c;
	*n = nlla;
	return 0;
}

/**
 * Write the message: the fixed part, then the options (translated ones from their slots), then the
 * new payload length and checksum. The padding is cut at the tail (always fits), the size change
 * made at the head (tailroom may be nil, see arp_rewrite): the frame is then out_l2 + newl3 bytes.
 *
 * @v ctx       XDP context
 * @v s         state
 * @v sc        scratch (after nd_translate_options)
 * @v in_l2     L3 offset now
 * @v l3len     L3 bytes now
 * @v out_l2    L3 offset wanted
 * @v newl3     L3 bytes wanted
 * @v fixed     the message's fixed part
 * @v csum      the new checksum (memory order)
 * @v to_ib     1 for TX, 0 for RX
 * @ret 0 or XDPOIB_DROP_NO_ROOM
 */
static __always_inline int nd_write(struct xdp_md *ctx, struct xo_state *s, struct xo_scratch *sc, u32 in_l2,
				    u32 l3len, u32 out_l2, u32 newl3, u32 fixed, u16 csum, int to_ib)
{
	u8 *b = sc->buf, t;
	u32 o, w, olen, i, j;
	u16 be;

	if (set_len(ctx, in_l2 + l3len))
		return XDPOIB_DROP_NO_ROOM;
	if (adjust_head(ctx, s, (int)(in_l2 + l3len) - (int)(out_l2 + newl3)))
		return XDPOIB_DROP_NO_ROOM;
	if (bpf_xdp_store_bytes(ctx, out_l2, b, xo_size(ND_BODY + fixed, 127)))
		return XDPOIB_DROP_NO_ROOM;
	sc->o = ND_BODY + fixed;
	sc->w = out_l2 + ND_BODY + fixed;
	sc->j = 0;
	for (i = 0; i < ND_MAX_OPTS; i++) {
		o = sc->o;
		w = sc->w;
		if (o >= l3len)
			break;
		t = b[xo_mask(o, 2047)];
		olen = (u32)b[xo_mask(o + 1, 2047)] * XO_ND_OPT_UNIT;
		if (t == XO_ND_OPT_SRC_LLADDR || t == XO_ND_OPT_TGT_LLADDR) {
			u32 n = to_ib ? XDPOIB_ND_OPT_IB : XDPOIB_ND_OPT_ETH;

			j = sc->j;
			if (bpf_xdp_store_bytes(ctx, w, b + ND_SLOTS + xo_mask(j, 7) * XDPOIB_ND_OPT_IB, n))
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
	be = bpf_htons(newl3 - ND_MSG);
	if (bpf_xdp_store_bytes(ctx, out_l2 + XO_IPV6_OFF_PLEN, &be, 2) ||
	    bpf_xdp_store_bytes(ctx, out_l2 + ND_MSG + XO_ICMPV6_OFF_CSUM, &csum, 2))
		return XDPOIB_DROP_NO_ROOM;
	return 0;
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
	u32 zero = 0, fixed, newl3, sum = 0, nlla = 0, len_old, len_new;
	struct xo_scratch *sc = xo_scratch.lookup(&zero);
	int err;
	u8 *b;

	/* the L3 packet into scratch */
	if (!sc)
		return XDPOIB_DROP_NO_ROOM;
	if (l3len < ND_MSG + 1 || l3len > XDPOIB_MAX_FRAME - 64)
		return XDPOIB_DROP_NO_ROOM;
	b = sc->buf;
	if (bpf_xdp_load_bytes(ctx, in_l2, b, xo_size(l3len, 2047)))
		return XDPOIB_DROP_NO_ROOM;
	fixed = nd_fixed(b[ND_MSG]);
	if (fixed == 0 || l3len - ND_MSG < XO_ICMPV6_HLEN + fixed)
		return XDPOIB_DROP_BAD_ND;

	len_old = bpf_htonl(l3len - ND_MSG);
	err = nd_csum_check(b, l3len, len_old, &sum);
	if (!err)
		err = nd_walk_options(sc, l3len, fixed);
	if (!err)
		err = nd_translate_options(sc, to_ib, &sum, &nlla);
	if (err)
		return err;

	/* the new length into the pseudo-header's sum */
	newl3 = to_ib ? l3len + 16 * nlla : l3len - 16 * nlla;
	len_new = bpf_htonl(newl3 - ND_MSG);
	sum = (u32)bpf_csum_diff((void *)&len_old, 4, (void *)&len_new, 4, sum);
	return nd_write(ctx, s, sc, in_l2, l3len, out_l2, newl3, fixed, ~csum_fold16(sum), to_ib);
}

#endif /* XDPOIB_ND_H */
