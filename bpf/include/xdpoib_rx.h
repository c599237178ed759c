/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_rx.h - RX: IPoIB -> Ethernet on frames the agent injects (BPF only).
 *
 * Includes: xdpoib_l3.h, xdpoib_arp.h, xdpoib_nd.h, xdpoib_control.h, xdpoib_mcast.h,
 * xdpoib_lookup.h. Offers: rx_frame (the RX program's body) and inject_slot_load (the batch
 * program's frame from its xo_inject slot).
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
#include "xdpoib_arp.h"
#include "xdpoib_nd.h"
#include "xdpoib_control.h"
#include "xdpoib_mcast.h"
#include "xdpoib_lookup.h"

#define RX_ETHERNET     (-1)    /* rx_source: the frame is Ethernet already (agent-built) */

/* What the RX program found out about one frame. */
struct rx_decision {
	u8 dst[6];
	u8 src[6];
	u16 etype;
	u8 flags;
	u32 vid;
};

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
 * Read the metadata, find the sender and the receiving VIF, check the IPoIB header and map the
 * P_Key to its VID.
 *
 * @v ctx       XDP context (metadata in front)
 * @v r         decision to fill
 * @ret 0, RX_ETHERNET, or a drop reason
 */
static __always_inline int rx_source(struct xdp_md *ctx, struct rx_decision *r)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	void *meta = (void *)(long)ctx->data_meta;
	struct xdpoib_rx_meta *m = meta;
	struct xdpoib_peer *peer;
	struct xdpoib_vif *vif;
	struct xdpoib_pkey *pk;
	u32 pidx;
	u16 pkey;
	u8 *p;

	if ((void *)(m + 1) > data || m->version != XDPOIB_META_VERSION)
		return XDPOIB_DROP_BAD_METADATA;
	r->flags = m->flags;
	pkey = m->pkey;
	if (r->flags & XDPOIB_RX_F_ETHERNET)
		return RX_ETHERNET;
	peer = peer_by_id(m->peer_id);
	if (!peer)
		return XDPOIB_DROP_UNKNOWN_PEER;
	__builtin_memcpy(r->src, peer->mac, 6);
	vif = vif_by_id(m->vif_id);
	if (!vif)
		return XDPOIB_DROP_UNKNOWN_VIF;
	__builtin_memcpy(r->dst, vif->mac, 6);

	p = data;
	if ((void *)(p + XDPOIB_IPOIB_HLEN) > data_end)
		return XDPOIB_DROP_BAD_IPOIB_HEADER;
	r->etype = ((u16)p[0] << 8) | p[1];
	if (!ipoib_carries(r->etype))
		return XDPOIB_DROP_BAD_IPOIB_HEADER;
	pidx = pkey & XO_PKEY_MASK;
	pk = xo_pkey.lookup(&pidx);
	if (!pk || !(pk->flags & XDPOIB_F_VALID))
		return XDPOIB_DROP_NO_PARTITION;
	r->vid = pk->vid & XO_VLAN_VID_MASK;
	return 0;
}

/**
 * Write the Ethernet header (with its VLAN tag if the partition has one) in front of the L3 packet.
 *
 * @v ctx       XDP context (L3 at out_l2)
 * @v r         decision
 * @ret 0 or XDPOIB_DROP_NO_ROOM
 */
static __always_inline int rx_write_l2(struct xdp_md *ctx, struct rx_decision *r)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	u8 *p = data;

	if ((void *)(p + XDPOIB_ETH_HLEN) > data_end)
		return XDPOIB_DROP_NO_ROOM;
	__builtin_memcpy(p, r->dst, 6);
	__builtin_memcpy(p + 6, r->src, 6);
	if (r->vid) {
		if ((void *)(p + XDPOIB_ETH_HLEN + XDPOIB_VLAN_HLEN) > data_end)
			return XDPOIB_DROP_NO_ROOM;
		p[12] = XDPOIB_ETH_P_8021Q >> 8;
		p[13] = XDPOIB_ETH_P_8021Q & 0xff;
		p[14] = r->vid >> 8;
		p[15] = r->vid & 0xff;
		p[16] = r->etype >> 8;
		p[17] = r->etype & 0xff;
	} else {
		p[12] = r->etype >> 8;
		p[13] = r->etype & 0xff;
	}
	return 0;
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
	struct rx_decision r = {};
	u32 out_l2 = XDPOIB_ETH_HLEN;
	int keep, err;

	/* from whom, to which VIF, on which partition */
	err = rx_source(ctx, &r);
	if (err == RX_ETHERNET)
		return rx_redirect(s->st, XDPOIB_KIND_CONTROL);
	if (err)
		return drop_frame(s->st, err);
	if (r.vid)
		out_l2 += XDPOIB_VLAN_HLEN;

	/* L3 header; DHCP to the agent; the body translated */
	keep = l3_keep(ctx, XDPOIB_IPOIB_HLEN, r.etype);
	if (keep < 0)
		return drop_frame(s->st, -keep);
	if (r.flags & XDPOIB_RX_F_MULTICAST)
		rx_group_mac(ctx, r.etype, r.dst);
	if (r.etype == XDPOIB_ETH_P_ARP || r.etype == XDPOIB_ETH_P_RARP) {
		err = arp_rewrite(ctx, s, XDPOIB_IPOIB_HLEN, out_l2, 0);
	} else if (r.etype == XDPOIB_ETH_P_IPV6 && is_nd(ctx, XDPOIB_IPOIB_HLEN, keep)) {
		err = nd_rewrite(ctx, s, XDPOIB_IPOIB_HLEN, keep, out_l2, 0);
	} else if (r.etype == XDPOIB_ETH_P_IP && rx_is_dhcp(ctx, keep)) {
		count_kind(s->st, XDPOIB_KIND_CONTROL);
		return record_action(s->st, XDP_PASS);
	} else {
		err = l3_move(ctx, s, XDPOIB_IPOIB_HLEN, keep, out_l2);
	}
	if (err)
		return drop_frame(s->st, err);

	/* the Ethernet header, then to eth4 */
	err = rx_write_l2(ctx, &r);
	if (err)
		return drop_frame(s->st, err);
	return rx_redirect(s->st, 0);
}

/* ================================================================ batched injection */

/**
 * Replace the live frame of a batch's run with its slot of xo_inject: the slot xo_inject_idx names, whose
 * `next` is stored there for the next run. The slot's frame (from `offset`: past a GRH when a QP
 * received it in place) becomes the frame, its RX metadata goes in front of it. Nothing is counted here:
 * the caller counts the frame once it is loaded.
 *
 * @v ctx       XDP context (live frame)
 * @ret 0 or XDPOIB_DROP_BAD_METADATA (no slot, a bad length or offset, or no room for the metadata)
 */
static __always_inline int inject_slot_load(struct xdp_md *ctx)
{
	struct xdpoib_inject_slot *slot;
	struct xdpoib_rx_meta *m;
	void *data, *meta;
	u32 zero = 0, i, len, off, *idx;

	idx = xo_inject_idx.lookup(&zero);
	if (!idx)
		return XDPOIB_DROP_BAD_METADATA;
	i = *idx;
	slot = xo_inject.lookup(&i);
	if (!slot)
		return XDPOIB_DROP_BAD_METADATA;
	*idx = slot->next;
	len = slot->len;
	off = slot->offset;
	if (off > XDPOIB_INJECT_GRH || len < XDPOIB_ETH_HLEN || len > XDPOIB_INJECT_MAX || set_len(ctx, len) ||
	    bpf_xdp_store_bytes(ctx, 0, slot->frame + off, xo_size(len, 4095)) ||
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
