/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_tx.h - TX: Ethernet -> IPoIB (BPF only).
 *
 * Includes: xdpoib_l3.h, xdpoib_arp.h, xdpoib_nd.h, xdpoib_control.h, xdpoib_mcast.h,
 * xdpoib_lookup.h. Offers: tx_frame, the TX program's body.
 *
 * Checks run in the oracle's order (xdpoib/wire/oracle.py), the first failing one names the drop:
 * Ethernet + VLAN tag -> VID to P_Key -> source is a VIF -> EtherType -> L3 header and lengths ->
 * destination class -> (CONTROL stops here) -> ARP/ND body. The frame handed on carries a
 * struct xdpoib_tx_meta in front of it and goes to the agent's AF_XDP socket.
 */
#ifndef XDPOIB_TX_H
#define XDPOIB_TX_H

#include "xdpoib_l3.h"
#include "xdpoib_arp.h"
#include "xdpoib_nd.h"
#include "xdpoib_control.h"
#include "xdpoib_mcast.h"
#include "xdpoib_lookup.h"

#define TX_LEARN        (-1)    /* tx_source: an unknown source the agent may learn */

/* What the TX program decided about one frame. */
struct tx_decision {
	u32 vif_id;
	u32 dest_id;
	u16 pkey;
	u16 vid;
	u8 kind;
	u8 dest[16];
};

/**
 * Read the Ethernet header and its VLAN tag, map the VID to its P_Key and find the sending VIF.
 *
 * @v ctx       XDP context
 * @v d         decision to fill (pkey, vid, vif_id; for TX_LEARN also kind and dest)
 * @v hlen      L2 header length out (14 or 18)
 * @v etype     EtherType out (host order, behind the tag)
 * @ret 0, TX_LEARN, or a drop reason
 */
static __always_inline int tx_source(struct xdp_md *ctx, struct tx_decision *d, u32 *hlen, u16 *etype)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct xdpoib_vlan *vl;
	struct xdpoib_vif *vif;
	struct xdpoib_config *cfg;
	u8 *eth = data;
	u32 vid = 0, zero = 0;
	u16 et;

	if ((void *)(eth + XDPOIB_ETH_HLEN) > data_end)
		return XDPOIB_DROP_TRUNCATED;
	et = ((u16)eth[12] << 8) | eth[13];
	if (et == XDPOIB_ETH_P_8021Q || et == XDPOIB_ETH_P_8021AD) {
		if ((void *)(eth + XDPOIB_ETH_HLEN + XDPOIB_VLAN_HLEN) > data_end)
			return XDPOIB_DROP_TRUNCATED;
		vid = (((u32)eth[14] << 8) | eth[15]) & XO_VLAN_VID_MASK;
		et = ((u16)eth[16] << 8) | eth[17];
		*hlen += XDPOIB_VLAN_HLEN;
		if (et == XDPOIB_ETH_P_8021Q || et == XDPOIB_ETH_P_8021AD)
			return XDPOIB_DROP_STACKED_VLAN;
	}
	*etype = et;
	vl = xo_vlan.lookup(&vid);
	if (!vl || !(vl->flags & XDPOIB_F_VALID))
		return XDPOIB_DROP_UNKNOWN_VLAN;
	d->pkey = vl->pkey | XDPOIB_PKEY_FULL_MEMBER;
	d->vid = vid;
	vif = vif_by_mac(eth + 6);
	if (!vif) {
		cfg = xo_config.lookup(&zero);
		if (!cfg || !(cfg->flags & XDPOIB_CFG_LEARN_VIFS) || (eth[6] & XO_MAC_MCAST_BIT))
			return XDPOIB_DROP_SPOOFED_SOURCE;
		/* learning: the agent decides (a new VIF, or a drop it counts) */
		d->kind = XDPOIB_KIND_CONTROL;
		d->vif_id = XDPOIB_VIF_UNKNOWN;
		__builtin_memcpy(d->dest, eth, 6);
		return TX_LEARN;
	}
	d->vif_id = vif->vif_id;
	return 0;
}

/**
 * Classify the destination: broadcast, IPv4/IPv6 group, known peer or unresolved unicast.
 *
 * @v ctx       XDP context
 * @v l3off     L3 offset
 * @v etype     EtherType (host order)
 * @v dst       destination MAC (6 bytes, a copy)
 * @v d         decision to fill (pkey set)
 * @v scope     MGID scope nibble
 * @ret 0 or a drop reason
 */
static __always_inline int tx_classify(struct xdp_md *ctx, u32 l3off, u16 etype, const u8 *dst,
				       struct tx_decision *d, u8 scope)
{
	u8 *ip4 = NULL, *ip6 = NULL;
	int ipmc = 0;
	struct xdpoib_peer *p;

	if (etype == XDPOIB_ETH_P_IP) {
		ip4 = pkt_at(ctx, l3off + XO_IPV4_OFF_DST, 4);
		if (!ip4)
			return XDPOIB_DROP_TRUNCATED;
		ipmc = (ip4[0] & XO_IPV4_MCAST_MASK) == XO_IPV4_MCAST;
	} else if (etype == XDPOIB_ETH_P_IPV6) {
		ip6 = pkt_at(ctx, l3off + XO_IPV6_OFF_DST, 16);
		if (!ip6)
			return XDPOIB_DROP_TRUNCATED;
		ipmc = ip6[0] == XO_IPV6_MCAST;
	}
	if ((dst[0] & dst[1] & dst[2] & dst[3] & dst[4] & dst[5]) == 0xff) {
		mgid_prefix(d->dest, XDPOIB_IPOIB_MGID_IPV4_SIG, d->pkey, scope);
		__builtin_memset(d->dest + XO_MGID_IPV4_GROUP, 0xff, 4);
		d->kind = XDPOIB_KIND_GROUP;
		return 0;
	}
	if (dst[0] & XO_MAC_MCAST_BIT) {
		if (ip4 && ipmc && dst[0] == XO_MAC_IPV4_MCAST0 && dst[1] == XO_MAC_IPV4_MCAST1 &&
		    dst[2] == XO_MAC_IPV4_MCAST2) {
			mgid_prefix(d->dest, XDPOIB_IPOIB_MGID_IPV4_SIG, d->pkey, scope);
			d->dest[XO_MGID_IPV4_GROUP] = ip4[0] & 0x0f;
			d->dest[XO_MGID_IPV4_GROUP + 1] = ip4[1];
			d->dest[XO_MGID_IPV4_GROUP + 2] = ip4[2];
			d->dest[XO_MGID_IPV4_GROUP + 3] = ip4[3];
		} else if (ip6 && ipmc && dst[0] == XO_MAC_IPV6_MCAST0 && dst[1] == XO_MAC_IPV6_MCAST1) {
			mgid_prefix(d->dest, XDPOIB_IPOIB_MGID_IPV6_SIG, d->pkey, scope);
			__builtin_memcpy(d->dest + XO_MGID_IPV6_GROUP, ip6 + 6, 10);
		} else {
			return XDPOIB_DROP_MCAST_MISMATCH;
		}
		d->kind = XDPOIB_KIND_GROUP;
		return 0;
	}
	if (ipmc)
		return XDPOIB_DROP_MCAST_MISMATCH;
	__builtin_memcpy(d->dest, dst, 6);
	p = peer_by_mac(dst);
	if (p) {
		d->kind = XDPOIB_KIND_PEER;
		d->dest_id = p->peer_id;
	} else {
		d->kind = XDPOIB_KIND_UNRESOLVED;
	}
	return 0;
}

/**
 * Report a destination the maps do not know, at most once per interval.
 *
 * @v kind      XDPOIB_KIND_UNRESOLVED (dest = MAC) or XDPOIB_KIND_GROUP (dest = MGID)
 * @v dest      16 bytes
 * @v pkey      partition
 * @v vif_id    sending VIF
 */
static __always_inline void report_unresolved(u8 kind, const u8 *dest, u16 pkey, u32 vif_id)
{
	struct xdpoib_dest_key k = {};
	struct xdpoib_unresolved_event ev = {};
	struct xdpoib_config *cfg;
	u32 zero = 0;
	u64 now = bpf_ktime_get_ns(), interval = 1000000000ULL, *last;

	cfg = xo_config.lookup(&zero);
	if (cfg && cfg->report_interval_ns)
		interval = cfg->report_interval_ns;
	__builtin_memcpy(k.dest, dest, 16);
	k.pkey = pkey;
	last = xo_reported.lookup(&k);
	if (last && now - *last < interval)
		return;
	xo_reported.update(&k, &now);
	ev.version = XDPOIB_META_VERSION;
	ev.kind = kind;
	ev.pkey = pkey;
	ev.vif_id = vif_id;
	__builtin_memcpy(ev.dest, dest, 16);
	xo_events.ringbuf_output(&ev, sizeof(ev), 0);
}

/**
 * Rewrite the frame's body (ARP, ND, or none) under a 4-byte IPoIB header, and write that header.
 *
 * @v ctx       XDP context
 * @v s         state
 * @v hlen      L2 header length (L3 offset)
 * @v etype     EtherType (host order)
 * @v keep      L3 bytes (padding excluded)
 * @ret 0 or a drop reason
 */
static __always_inline int tx_translate(struct xdp_md *ctx, struct xo_state *s, u32 hlen, u16 etype, u32 keep)
{
	void *data, *data_end;
	int err;

	if (etype == XDPOIB_ETH_P_ARP || etype == XDPOIB_ETH_P_RARP)
		err = arp_rewrite(ctx, s, hlen, XDPOIB_IPOIB_HLEN, 1);
	else if (etype == XDPOIB_ETH_P_IPV6 && is_nd(ctx, hlen, keep))
		err = nd_rewrite(ctx, s, hlen, keep, XDPOIB_IPOIB_HLEN, 1);
	else if (keep < XDPOIB_ETH_HLEN - XDPOIB_IPOIB_HLEN)
		err = XDPOIB_DROP_NO_ROOM;      /* XDP frames stay >= 14 bytes */
	else
		err = l3_move(ctx, s, hlen, keep, XDPOIB_IPOIB_HLEN);
	if (err)
		return err;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + XDPOIB_IPOIB_HLEN > data_end)
		return XDPOIB_DROP_NO_ROOM;
	((u8 *)data)[0] = etype >> 8;
	((u8 *)data)[1] = etype & 0xff;
	((u8 *)data)[2] = 0;
	((u8 *)data)[3] = 0;
	return 0;
}

/**
 * Put the TX metadata record in front of the frame.
 *
 * @v ctx       XDP context
 * @v s         state
 * @v d         decision
 * @ret 0 or a drop reason
 */
static __always_inline int tx_write_meta(struct xdp_md *ctx, struct xo_state *s, struct tx_decision *d)
{
	void *data, *meta;
	struct xdpoib_tx_meta *m;

	if (reserve_meta(ctx, s, sizeof(*m)))
		return XDPOIB_DROP_NO_ROOM;
	data = (void *)(long)ctx->data;
	meta = (void *)(long)ctx->data_meta;
	m = meta;
	if ((void *)(m + 1) > data)
		return XDPOIB_DROP_NO_ROOM;
#ifdef XDPOIB_TEST_FILL
	__builtin_memset(m, 0xff, sizeof(*m));
#endif
	m->version = XDPOIB_META_VERSION;
	m->kind = d->kind;
	m->pkey = d->pkey;
	m->vid = d->vid;
	m->reserved = 0;
	m->vif_id = d->vif_id;
	m->dest_id = d->dest_id;
	__builtin_memcpy(m->dest, d->dest, 16);
	return 0;
}

/**
 * Hand the frame to the agent: metadata in front, redirect to the AF_XDP socket of its queue.
 *
 * @v ctx       XDP context
 * @v s         state
 * @v d         decision
 * @ret XDP action (recorded)
 */
static __always_inline int tx_hand_on(struct xdp_md *ctx, struct xo_state *s, struct tx_decision *d)
{
	int err = tx_write_meta(ctx, s, d);

	if (err)
		return drop_frame(s->st, err);
	if (xo_xsks.redirect_map(ctx->rx_queue_index, 0) != XDP_REDIRECT)
		return XO_DROP(s->st, REDIRECT_FAILED);
	count_kind(s->st, d->kind);
	return record_action(s->st, XDP_REDIRECT);
}

/**
 * The TX program body: decide, rewrite, hand on.
 *
 * @v ctx       XDP context
 * @v s         state (counted on entry)
 * @ret XDP action (recorded)
 */
static __always_inline int tx_frame(struct xdp_md *ctx, struct xo_state *s)
{
	struct tx_decision d = {};
	struct xdpoib_config *cfg;
	u8 dst[6], scope = XO_MGID_SCOPE_LINK;
	u32 hlen = XDPOIB_ETH_HLEN, zero = 0;
	u16 etype = 0;
	int keep, err;
	u8 *eth;

	/* who sends, on which partition */
	err = tx_source(ctx, &d, &hlen, &etype);
	if (err == TX_LEARN)
		return tx_hand_on(ctx, s, &d);
	if (err)
		return drop_frame(s->st, err);
	if (!ipoib_carries(etype))
		return XO_DROP(s->st, UNSUPPORTED_ETHERTYPE);
	eth = pkt_at(ctx, 0, 6);
	if (!eth)
		return XO_DROP(s->st, TRUNCATED);
	__builtin_memcpy(dst, eth, 6);

	/* L3 header, then where it goes */
	keep = l3_keep(ctx, hlen, etype);
	if (keep < 0)
		return drop_frame(s->st, -keep);
	cfg = xo_config.lookup(&zero);
	if (cfg && cfg->scope)
		scope = cfg->scope;
	err = tx_classify(ctx, hlen, etype, dst, &d, scope);
	if (err)
		return drop_frame(s->st, err);
	if (d.kind == XDPOIB_KIND_GROUP) {
		struct xdpoib_group *g = xo_group.lookup((struct xdpoib_mgid_key *)d.dest);

		if (g)
			d.dest_id = g->group_id;
		else
			report_unresolved(XDPOIB_KIND_GROUP, d.dest, d.pkey, d.vif_id);
	} else if (d.kind == XDPOIB_KIND_UNRESOLVED) {
		report_unresolved(XDPOIB_KIND_UNRESOLVED, d.dest, d.pkey, d.vif_id);
	}

	/* control frames go to the agent untouched; the rest is translated */
	if (tx_is_control(ctx, hlen, etype, keep)) {
		d.kind = XDPOIB_KIND_CONTROL;
	} else {
		err = tx_translate(ctx, s, hlen, etype, keep);
		if (err)
			return drop_frame(s->st, err);
	}
	return tx_hand_on(ctx, s, &d);
}

#endif /* XDPOIB_TX_H */
