/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_tx.h - TX: Ethernet -> IPoIB (BPF only).
 *
 * Checks run in the oracle's order (xdpoib/wire/oracle.py), the first failing one names the drop:
 * Ethernet + VLAN tag -> VID to P_Key -> source is a VIF -> EtherType -> L3 header and lengths ->
 * destination class -> (CONTROL stops here) -> ARP/ND body. The frame handed on carries a
 * struct xdpoib_tx_meta in front of it and goes to the agent's AF_XDP socket.
 */
#ifndef XDPOIB_TX_H
#define XDPOIB_TX_H

#include "xdpoib_l3.h"

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
		ip4 = pkt_at(ctx, l3off + 16, 4);
		if (!ip4)
			return XDPOIB_DROP_TRUNCATED;
		ipmc = (ip4[0] & 0xf0) == 0xe0;
	} else if (etype == XDPOIB_ETH_P_IPV6) {
		ip6 = pkt_at(ctx, l3off + 24, 16);
		if (!ip6)
			return XDPOIB_DROP_TRUNCATED;
		ipmc = ip6[0] == 0xff;
	}
	if ((dst[0] & dst[1] & dst[2] & dst[3] & dst[4] & dst[5]) == 0xff) {
		mgid_prefix(d->dest, XDPOIB_IPOIB_MGID_IPV4_SIG, d->pkey, scope);
		__builtin_memset(d->dest + 12, 0xff, 4);
		d->kind = XDPOIB_KIND_GROUP;
		return 0;
	}
	if (dst[0] & 1) {
		if (ip4 && ipmc && dst[0] == 0x01 && dst[1] == 0x00 && dst[2] == 0x5e) {
			mgid_prefix(d->dest, XDPOIB_IPOIB_MGID_IPV4_SIG, d->pkey, scope);
			d->dest[12] = ip4[0] & 0x0f;
			d->dest[13] = ip4[1];
			d->dest[14] = ip4[2];
			d->dest[15] = ip4[3];
		} else if (ip6 && ipmc && dst[0] == 0x33 && dst[1] == 0x33) {
			mgid_prefix(d->dest, XDPOIB_IPOIB_MGID_IPV6_SIG, d->pkey, scope);
			__builtin_memcpy(d->dest + 6, ip6 + 6, 10);
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
 * Is this a frame for the agent: DHCP client->server, IGMP, or MLD (also behind hop-by-hop)?
 *
 * @v ctx       XDP context
 * @v l3off     L3 offset
 * @v etype     EtherType (host order)
 * @v keep      L3 bytes (padding excluded)
 */
static __always_inline int tx_is_control(struct xdp_md *ctx, u32 l3off, u16 etype, u32 keep)
{
	u8 *h, *t;

	if (etype == XDPOIB_ETH_P_IP) {
		u32 hl;
		u8 *ports;

		h = pkt_at(ctx, l3off, 20);
		if (!h)
			return 0;
		if (h[9] == 2)
			return 1;
		hl = (h[0] & 0x0f) * 4;
		if (h[9] != 17 || ((h[6] & 0x1f) | h[7]) != 0 || keep < hl + 8)
			return 0;
		ports = pkt_at(ctx, l3off + hl, 4);
		if (!ports)
			return 0;
		return ports[0] == 0 && ports[1] == 68 && ports[2] == 0 && ports[3] == 67;
	}
	if (etype == XDPOIB_ETH_P_IPV6) {
		u32 o = 40;
		u8 nh;

		h = pkt_at(ctx, l3off, 40);
		if (!h)
			return 0;
		nh = h[6];
		if (nh == 0 && keep >= 48) {
			h = pkt_at(ctx, l3off + 40, 2);
			if (!h)
				return 0;
			nh = h[0];
			o = 40 + ((u32)h[1] + 1) * 8;
		}
		if (nh != 58 || keep <= o)
			return 0;
		t = pkt_at(ctx, l3off + o, 1);
		if (!t)
			return 0;
		return t[0] == 130 || t[0] == 131 || t[0] == 132 || t[0] == 143;
	}
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
 * The TX program body: decide, rewrite, hand on.
 *
 * @v ctx       XDP context
 * @v s         state (counted on entry)
 * @ret XDP action (recorded)
 */
static __always_inline int tx_frame(struct xdp_md *ctx, struct xo_state *s)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct tx_decision d = {};
	struct xdpoib_vlan *vl;
	struct xdpoib_vif *vif;
	struct xdpoib_config *cfg;
	u8 *eth = data, dst[6], scope = 2;
	u32 hlen = XDPOIB_ETH_HLEN, vid = 0, zero = 0;
	u16 etype;
	int keep, err, rc;

	if ((void *)(eth + XDPOIB_ETH_HLEN) > data_end)
		return XO_DROP(s->st, TRUNCATED);
	etype = ((u16)eth[12] << 8) | eth[13];
	if (etype == XDPOIB_ETH_P_8021Q || etype == XDPOIB_ETH_P_8021AD) {
		if ((void *)(eth + XDPOIB_ETH_HLEN + XDPOIB_VLAN_HLEN) > data_end)
			return XO_DROP(s->st, TRUNCATED);
		vid = (((u32)eth[14] << 8) | eth[15]) & 0x0fff;
		etype = ((u16)eth[16] << 8) | eth[17];
		hlen += XDPOIB_VLAN_HLEN;
		if (etype == XDPOIB_ETH_P_8021Q || etype == XDPOIB_ETH_P_8021AD)
			return XO_DROP(s->st, STACKED_VLAN);
	}
	vl = xo_vlan.lookup(&vid);
	if (!vl || !(vl->flags & XDPOIB_F_VALID))
		return XO_DROP(s->st, UNKNOWN_VLAN);
	d.pkey = vl->pkey | XDPOIB_PKEY_FULL_MEMBER;
	d.vid = vid;
	vif = vif_by_mac(eth + 6);
	if (!vif) {
		cfg = xo_config.lookup(&zero);
		if (!cfg || !(cfg->flags & XDPOIB_CFG_LEARN_VIFS) || (eth[6] & 1))
			return XO_DROP(s->st, SPOOFED_SOURCE);
		/* learning: the agent decides (a new VIF, or a drop it counts) */
		d.kind = XDPOIB_KIND_CONTROL;
		d.vif_id = XDPOIB_VIF_UNKNOWN;
		__builtin_memcpy(d.dest, eth, 6);
		goto hand_on;
	}
	d.vif_id = vif->vif_id;
	if (etype != XDPOIB_ETH_P_IP && etype != XDPOIB_ETH_P_IPV6 && etype != XDPOIB_ETH_P_ARP &&
	    etype != XDPOIB_ETH_P_RARP && etype != XDPOIB_ETH_P_TIPC)
		return XO_DROP(s->st, UNSUPPORTED_ETHERTYPE);
	__builtin_memcpy(dst, eth, 6);

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

	if (tx_is_control(ctx, hlen, etype, keep)) {
		d.kind = XDPOIB_KIND_CONTROL;
	} else {
		if (etype == XDPOIB_ETH_P_ARP || etype == XDPOIB_ETH_P_RARP)
			err = arp_rewrite(ctx, s, hlen, XDPOIB_IPOIB_HLEN, 1);
		else if (etype == XDPOIB_ETH_P_IPV6 && is_nd(ctx, hlen, keep))
			err = nd_rewrite(ctx, s, hlen, keep, XDPOIB_IPOIB_HLEN, 1);
		else if (keep < XDPOIB_ETH_HLEN - XDPOIB_IPOIB_HLEN)
			err = XDPOIB_DROP_NO_ROOM;      /* XDP frames stay >= 14 bytes */
		else
			err = l3_move(ctx, s, hlen, keep, XDPOIB_IPOIB_HLEN);
		if (err)
			return drop_frame(s->st, err);
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + XDPOIB_IPOIB_HLEN > data_end)
			return XO_DROP(s->st, NO_ROOM);
		((u8 *)data)[0] = etype >> 8;
		((u8 *)data)[1] = etype & 0xff;
		((u8 *)data)[2] = 0;
		((u8 *)data)[3] = 0;
	}
hand_on:
	err = tx_write_meta(ctx, s, &d);
	if (err)
		return drop_frame(s->st, err);
	rc = xo_xsks.redirect_map(ctx->rx_queue_index, 0);
	if (rc != XDP_REDIRECT)
		return XO_DROP(s->st, REDIRECT_FAILED);
	count_kind(s->st, d.kind);
	return record_action(s->st, XDP_REDIRECT);
}

#endif /* XDPOIB_TX_H */
