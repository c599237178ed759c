/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_rx.h - RX: IPoIB -> Ethernet on frames the agent injects (BPF only).
 *
 * The agent puts a struct xdpoib_rx_meta in front of each frame (ctx_in.data = its size). Checks:
 * metadata -> sender and VIF entries -> IPoIB header (BAD_IPOIB_HEADER) -> P_Key to VID
 * (NO_PARTITION) -> L3 header and lengths -> ARP/ND body, as in the oracle. DHCP server->client frames
 * are control: passed untouched (XDP_PASS) for the agent, which rewrites them and injects the Ethernet
 * frame with XDPOIB_RX_F_ETHERNET.
 */
#ifndef XDPOIB_RX_H
#define XDPOIB_RX_H

#include "xdpoib_l3.h"

/**
 * The Ethernet destination of a multicast frame, from its IP destination.
 *
 * @v ctx       XDP context
 * @v etype     EtherType (host order)
 * @v dst       6 bytes out
 */
static __always_inline void rx_group_mac(struct xdp_md *ctx, u16 etype, u8 *dst)
{
	u8 *ip;

	__builtin_memset(dst, 0xff, 6);
	if (etype == XDPOIB_ETH_P_IP) {
		ip = pkt_at(ctx, XDPOIB_IPOIB_HLEN + 16, 4);
		if (!ip || (ip[0] & 0xf0) != 0xe0)
			return;
		dst[0] = 0x01;
		dst[1] = 0x00;
		dst[2] = 0x5e;
		dst[3] = ip[1] & 0x7f;
		dst[4] = ip[2];
		dst[5] = ip[3];
	} else if (etype == XDPOIB_ETH_P_IPV6) {
		ip = pkt_at(ctx, XDPOIB_IPOIB_HLEN + 24, 16);
		if (!ip || ip[0] != 0xff)
			return;
		dst[0] = 0x33;
		dst[1] = 0x33;
		__builtin_memcpy(dst + 2, ip + 12, 4);
	}
}

/**
 * Is this a DHCP server->client message (IPv4/UDP 67->68, first fragment)?
 *
 * @v ctx       XDP context
 * @v keep      L3 bytes
 */
static __always_inline int rx_is_dhcp(struct xdp_md *ctx, u32 keep)
{
	u8 *h, *ports;
	u32 hl;

	h = pkt_at(ctx, XDPOIB_IPOIB_HLEN, 20);
	if (!h)
		return 0;
	hl = (h[0] & 0x0f) * 4;
	if (h[9] != 17 || ((h[6] & 0x1f) | h[7]) != 0 || keep < hl + 8)
		return 0;
	ports = pkt_at(ctx, XDPOIB_IPOIB_HLEN + hl, 4);
	if (!ports)
		return 0;
	return ports[0] == 0 && ports[1] == 67 && ports[2] == 0 && ports[3] == 68;
}

/**
 * Hand a frame to the device facing eth4.
 *
 * @v st        counters
 * @v kind      kind to count
 * @ret XDP action (recorded)
 */
static __always_inline int rx_redirect(struct xdpoib_stats *st, u32 kind)
{
	if (xo_egress.redirect_map(0, 0) != XDP_REDIRECT)
		return XO_DROP(st, REDIRECT_FAILED);
	count_kind(st, kind);
	return record_action(st, XDP_REDIRECT);
}

/**
 * The RX program body.
 *
 * @v ctx       XDP context
 * @v s         state (counted on entry)
 * @ret XDP action (recorded)
 */
static __always_inline int rx_frame(struct xdp_md *ctx, struct xo_state *s)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	void *meta = (void *)(long)ctx->data_meta;
	struct xdpoib_rx_meta *m = meta;
	struct xdpoib_peer *peer;
	struct xdpoib_vif *vif;
	struct xdpoib_pkey *pk;
	u8 flags, dst[6], src[6], *p;
	u32 pidx, out_l2 = XDPOIB_ETH_HLEN, vid;
	u16 etype, pkey;
	int keep, err;

	if ((void *)(m + 1) > data || m->version != XDPOIB_META_VERSION)
		return XO_DROP(s->st, BAD_METADATA);
	flags = m->flags;
	pkey = m->pkey;
	if (flags & XDPOIB_RX_F_ETHERNET)
		return rx_redirect(s->st, XDPOIB_KIND_CONTROL);
	peer = peer_by_id(m->peer_id);
	if (!peer)
		return XO_DROP(s->st, UNKNOWN_PEER);
	__builtin_memcpy(src, peer->mac, 6);
	vif = vif_by_id(m->vif_id);
	if (!vif)
		return XO_DROP(s->st, UNKNOWN_VIF);
	__builtin_memcpy(dst, vif->mac, 6);

	p = data;
	if ((void *)(p + XDPOIB_IPOIB_HLEN) > data_end)
		return XO_DROP(s->st, BAD_IPOIB_HEADER);
	etype = ((u16)p[0] << 8) | p[1];
	if (etype != XDPOIB_ETH_P_IP && etype != XDPOIB_ETH_P_IPV6 && etype != XDPOIB_ETH_P_ARP &&
	    etype != XDPOIB_ETH_P_RARP && etype != XDPOIB_ETH_P_TIPC)
		return XO_DROP(s->st, BAD_IPOIB_HEADER);
	pidx = pkey & 0x7fff;
	pk = xo_pkey.lookup(&pidx);
	if (!pk || !(pk->flags & XDPOIB_F_VALID))
		return XO_DROP(s->st, NO_PARTITION);
	vid = pk->vid & 0x0fff;
	if (vid)
		out_l2 += XDPOIB_VLAN_HLEN;

	keep = l3_keep(ctx, XDPOIB_IPOIB_HLEN, etype);
	if (keep < 0)
		return drop_frame(s->st, -keep);
	if (flags & XDPOIB_RX_F_MULTICAST)
		rx_group_mac(ctx, etype, dst);

	if (etype == XDPOIB_ETH_P_ARP || etype == XDPOIB_ETH_P_RARP) {
		err = arp_rewrite(ctx, s, XDPOIB_IPOIB_HLEN, out_l2, 0);
	} else if (etype == XDPOIB_ETH_P_IPV6 && is_nd(ctx, XDPOIB_IPOIB_HLEN, keep)) {
		err = nd_rewrite(ctx, s, XDPOIB_IPOIB_HLEN, keep, out_l2, 0);
	} else if (etype == XDPOIB_ETH_P_IP && rx_is_dhcp(ctx, keep)) {
		count_kind(s->st, XDPOIB_KIND_CONTROL);
		return record_action(s->st, XDP_PASS);
	} else {
		err = l3_move(ctx, s, XDPOIB_IPOIB_HLEN, keep, out_l2);
	}
	if (err)
		return drop_frame(s->st, err);

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	p = data;
	if ((void *)(p + XDPOIB_ETH_HLEN) > data_end)
		return XO_DROP(s->st, NO_ROOM);
	__builtin_memcpy(p, dst, 6);
	__builtin_memcpy(p + 6, src, 6);
	if (vid) {
		if ((void *)(p + XDPOIB_ETH_HLEN + XDPOIB_VLAN_HLEN) > data_end)
			return XO_DROP(s->st, NO_ROOM);
		p[12] = XDPOIB_ETH_P_8021Q >> 8;
		p[13] = XDPOIB_ETH_P_8021Q & 0xff;
		p[14] = vid >> 8;
		p[15] = vid & 0xff;
		p[16] = etype >> 8;
		p[17] = etype & 0xff;
	} else {
		p[12] = etype >> 8;
		p[13] = etype & 0xff;
	}
	return rx_redirect(s->st, 0);
}

/* ================================================================ batched injection */

/**
 * Replace the live frame of run i of a batch with xo_inject[i]: its frame, and its RX metadata in
 * front of it. Nothing is counted here: the caller counts the frame once it is loaded.
 *
 * @v ctx       XDP context (live frame)
 * @ret 0 or XDPOIB_DROP_BAD_METADATA (no slot, a bad length, or no room for the metadata)
 */
static __always_inline int inject_slot_load(struct xdp_md *ctx)
{
	struct xdpoib_inject_slot *slot;
	struct xdpoib_rx_meta *m;
	void *data, *meta;
	u32 zero = 0, i, len, *idx;

	idx = xo_inject_idx.lookup(&zero);
	if (!idx)
		return XDPOIB_DROP_BAD_METADATA;
	i = *idx;
	*idx = i + 1;
	i &= XDPOIB_INJECT_SLOTS - 1;
	slot = xo_inject.lookup(&i);
	len = slot ? slot->len : 0;
	if (!slot || len < XDPOIB_ETH_HLEN || len > XDPOIB_INJECT_MAX || set_len(ctx, len) ||
	    bpf_xdp_store_bytes(ctx, 0, slot->frame, xo_size(len, 4095)) ||
	    bpf_xdp_adjust_meta(ctx, -(int)sizeof(*m)))
		return XDPOIB_DROP_BAD_METADATA;
	data = (void *)(long)ctx->data;
	meta = (void *)(long)ctx->data_meta;
	m = meta;
	if ((void *)(m + 1) > data)
		return XDPOIB_DROP_BAD_METADATA;
	__builtin_memcpy(m, &slot->meta, sizeof(*m));
	return 0;
}

#endif /* XDPOIB_RX_H */
