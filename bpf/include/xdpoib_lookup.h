/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_lookup.h - finding VIFs and peers in the maps (BPF only).
 *
 * Includes: xdpoib_maps.h. Offers: vif_by_mac, peer_by_mac, vif_by_id (each its direct-mapped
 * cache slot first, then the hash), peer_by_id (an array index), addr_by_mac (MAC -> IPoIB address) and
 * mac_by_addr ((QPN, GID) -> MAC), for the ARP and ND translations.
 */
#ifndef XDPOIB_LOOKUP_H
#define XDPOIB_LOOKUP_H

#include "xdpoib_maps.h"

/**
 * Compare two MACs.
 *
 * @v a, b      6 bytes each
 * @ret nonzero when equal
 */
static __always_inline int mac_eq(const u8 *a, const u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) |
		(a[5] ^ b[5])) == 0;
}

/**
 * Find a local VIF by MAC: its cache slot, else the hash.
 *
 * @v mac       6 bytes
 * @ret the VIF, or NULL
 */
static __always_inline struct xdpoib_vif *vif_by_mac(const u8 *mac)
{
	u32 slot = XDPOIB_MAC_SLOT(mac, XDPOIB_VIF_SLOTS);
	struct xdpoib_vif *v = xo_vifmac_slot.lookup(&slot);
	struct xdpoib_mac_key k = {};

	if (v && (v->flags & XDPOIB_F_VALID) && mac_eq(v->mac, mac))
		return v;
	__builtin_memcpy(k.mac, mac, 6);
	return xo_vif_mac.lookup(&k);
}

/**
 * Find a peer by REMAC: its cache slot, else the hash.
 *
 * @v mac       6 bytes
 * @ret the peer, or NULL
 */
static __always_inline struct xdpoib_peer *peer_by_mac(const u8 *mac)
{
	u32 slot = XDPOIB_MAC_SLOT(mac, XDPOIB_PEER_SLOTS);
	struct xdpoib_peer *p = xo_peermac_slot.lookup(&slot);
	struct xdpoib_mac_key k = {};

	if (p && (p->flags & XDPOIB_F_VALID) && mac_eq(p->mac, mac))
		return p;
	__builtin_memcpy(k.mac, mac, 6);
	return xo_peer_mac.lookup(&k);
}

/**
 * Find a local VIF by id: its cache slot, else the hash.
 *
 * @v id        VIF id
 * @ret the VIF, or NULL
 */
static __always_inline struct xdpoib_vif *vif_by_id(u32 id)
{
	u32 slot = XDPOIB_ID_SLOT(id, XDPOIB_VIF_SLOTS);
	struct xdpoib_vif *v = xo_vifid_slot.lookup(&slot);
	struct xdpoib_u32_key k = { .id = id };

	if (v && (v->flags & XDPOIB_F_VALID) && v->vif_id == id)
		return v;
	return xo_vif_id.lookup(&k);
}

/**
 * Find a peer by id: the id is its index in xo_peer_id (no cache in front: an array lookup is
 * already inline). Id 0 is never a peer; an index nobody holds is zeroed, so not valid.
 *
 * @v id        peer id
 * @ret the peer, or NULL
 */
static __always_inline struct xdpoib_peer *peer_by_id(u32 id)
{
	struct xdpoib_peer *p = xo_peer_id.lookup(&id);

	if (p && (p->flags & XDPOIB_F_VALID) && p->peer_id == id)
		return p;
	return NULL;
}

/**
 * Copy the IPoIB address behind a MAC: a VIF's own, else a peer's.
 *
 * @v mac       6 bytes
 * @v out       20 bytes out
 * @ret 0, or -1 if no VIF or peer has this MAC
 */
static __always_inline int addr_by_mac(const u8 *mac, u8 *out)
{
	struct xdpoib_vif *v = vif_by_mac(mac);
	struct xdpoib_peer *p;

	if (v) {
		__builtin_memcpy(out, v->addr, 20);
		return 0;
	}
	p = peer_by_mac(mac);
	if (!p)
		return -1;
	__builtin_memcpy(out, p->addr, 20);
	return 0;
}

/**
 * Return the MAC behind an IPoIB address, matched on (QPN, GID).
 *
 * @v addr      20 bytes
 * @ret pointer to 6 bytes, or NULL
 */
static __always_inline u8 *mac_by_addr(const u8 *addr)
{
	struct xdpoib_addr_key k = {};
	struct xdpoib_mac_value *m;

	__builtin_memcpy(k.qpn, addr + 1, 3);
	__builtin_memcpy(k.gid, addr + 4, 16);
	m = xo_by_addr.lookup(&k);
	return m ? m->mac : NULL;
}

#endif /* XDPOIB_LOOKUP_H */
