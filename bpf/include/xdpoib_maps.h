/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_maps.h - the maps of the datapath (bcc syntax; BPF only).
 *
 * Names are at most 15 characters (the kernel's object name limit), all prefixed xo_; the Python
 * facades in xdpoib/datapath/maps.py know them by these names. Keys and values come from
 * xdpoib_abi.h.
 *
 * Includes: xdpoib_abi.h. Offers: every xo_* map, and struct xo_scratch (the per-CPU scratch of the
 * ARP/ND rewrites). Build switch XDPOIB_TX_DEVMAP: TX redirects through a devmap, not the XSKMAP.
 */
#ifndef XDPOIB_MAPS_H
#define XDPOIB_MAPS_H

#include "xdpoib_abi.h"

/* Per-CPU counters, one slot per direction. */
BPF_PERCPU_ARRAY(xo_stats, struct xdpoib_stats, XDPOIB_DIR_SLOTS);

/* Local VIFs by MAC (TX: anti-spoof, ARP/ND translation) and by id (RX). */
BPF_HASH(xo_vif_mac, struct xdpoib_mac_key, struct xdpoib_vif, XDPOIB_MAX_VIFS);
BPF_HASH(xo_vif_id, struct xdpoib_u32_key, struct xdpoib_vif, XDPOIB_MAX_VIFS);

/* Remote peers by REMAC (TX), and by id (RX): an array indexed by peer id (the agent keeps ids dense
 * in [1, XDPOIB_MAX_PEERS); an unused index holds a zeroed value, without XDPOIB_F_VALID). */
BPF_HASH(xo_peer_mac, struct xdpoib_mac_key, struct xdpoib_peer, XDPOIB_MAX_PEERS);
BPF_ARRAY(xo_peer_id, struct xdpoib_peer, XDPOIB_MAX_PEERS);

/* Direct-mapped caches in front of the three hashes above (see XDPOIB_MAC_SLOT). */
BPF_ARRAY(xo_vifmac_slot, struct xdpoib_vif, XDPOIB_VIF_SLOTS);
BPF_ARRAY(xo_vifid_slot, struct xdpoib_vif, XDPOIB_VIF_SLOTS);
BPF_ARRAY(xo_peermac_slot, struct xdpoib_peer, XDPOIB_PEER_SLOTS);

/* (QPN, GID) -> MAC of a VIF or peer (RX: ARP/ND translation). */
BPF_HASH(xo_by_addr, struct xdpoib_addr_key, struct xdpoib_mac_value, XDPOIB_MAX_ADDRS);

/* Joined (or joining) multicast groups by MGID. */
BPF_HASH(xo_group, struct xdpoib_mgid_key, struct xdpoib_group, XDPOIB_MAX_GROUPS);

/* VID -> P_Key and P_Key -> VID, arrays with a valid flag. */
BPF_ARRAY(xo_vlan, struct xdpoib_vlan, XDPOIB_MAX_VLANS);
BPF_ARRAY(xo_pkey, struct xdpoib_pkey, XDPOIB_MAX_PKEYS);

BPF_ARRAY(xo_config, struct xdpoib_config, 1);

/* Where TX frames go: the agent's AF_XDP sockets by queue (a devmap in test builds, which lets
 * BPF_PROG_TEST_RUN see XDP_REDIRECT without a socket). */
#ifdef XDPOIB_TX_DEVMAP
BPF_DEVMAP(xo_xsks, XDPOIB_MAX_XSKS);
#else
BPF_XSKMAP(xo_xsks, XDPOIB_MAX_XSKS);
#endif

/* Where RX frames go: slot 0 is the device facing eth4 (internal veth end or the VM's TAP). */
BPF_DEVMAP(xo_egress, 1);

/* Batched injection: frames and metadata for one live-frames call, and the per-CPU run index.
 * Mmapable, so the agent writes frames straight into the slots (no map update syscall). */
#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE (1U << 10)
#endif
BPF_F_TABLE("array", int, struct xdpoib_inject_slot, xo_inject, XDPOIB_INJECT_SLOTS, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(xo_inject_idx, u32, 1);

/* Destinations not in the maps: reported on xo_events, once per destination per interval. */
BPF_TABLE("lru_hash", struct xdpoib_dest_key, u64, xo_reported, XDPOIB_MAX_REPORTS);
BPF_RINGBUF_OUTPUT(xo_events, XDPOIB_EVENTS_PAGES);

/* Per-CPU scratch for the ARP/ND rewrites: the L3 packet in [0, 2048), built options above. */
struct xo_scratch {
	u8 buf[2 * XDPOIB_MAX_FRAME];
	/* loop state of the option walks, kept in memory so the verifier sees one state per iteration */
	volatile u32 o, w, nlla, j;
	volatile u16 lla_off[8];
};
BPF_PERCPU_ARRAY(xo_scratch, struct xo_scratch, 1);


#endif /* XDPOIB_MAPS_H */
