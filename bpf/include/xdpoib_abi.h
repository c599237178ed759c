/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_abi.h - the kernel/user contract of the xdpoib datapath.
 *
 * Every map key and value, the counters, the drop reasons, the metadata records exchanged with the
 * agent, and the wire constants live here. xdpoib/abi.py mirrors this file in ctypes and the tests
 * prove the mirror (a compiled probe without root, bcc's derived Key/Leaf types with root).
 *
 * Rules: never renumber a drop reason or a kind (the Python IntEnums in xdpoib/reasons.py carry the
 * same numbers); bump XDPOIB_ABI_VERSION when a struct changes; keep every struct free of implicit
 * padding (explicit reserved fields, checked by _Static_assert).
 *
 * This header is included both by BPF C (through bcc) and by plain C (the probe test), so it uses
 * only fixed-width types.
 */
#ifndef XDPOIB_ABI_H
#define XDPOIB_ABI_H

#if !defined(__BPF__) && !defined(XDPOIB_BPF)
#include <stdint.h>
typedef uint8_t  xo_u8;
typedef uint16_t xo_u16;
typedef uint32_t xo_u32;
typedef uint64_t xo_u64;
#else
typedef __u8  xo_u8;
typedef __u16 xo_u16;
typedef __u32 xo_u32;
typedef __u64 xo_u64;
#endif

/* ================================================================ versions and sizes */

#define XDPOIB_ABI_VERSION      3       /* bump on any layout change below */
#define XDPOIB_META_VERSION     1       /* first byte of every metadata record */

#define XDPOIB_ETH_ALEN         6
#define XDPOIB_GID_LEN          16
#define XDPOIB_HWADDR_LEN       20      /* IPoIB hardware address: flags, QPN[3], GID[16] */
#define XDPOIB_ETH_HLEN         14
#define XDPOIB_VLAN_HLEN        4
#define XDPOIB_IPOIB_HLEN       4       /* EtherType (BE16) + 2 reserved zero bytes */
#define XDPOIB_ARP_ETH_BODY     28      /* Ethernet ARP body */
#define XDPOIB_ARP_IB_BODY      56      /* IPoIB ARP body (hlen 20) */
#define XDPOIB_ND_OPT_ETH       8       /* ND link-layer option on Ethernet: len 1 */
#define XDPOIB_ND_OPT_IB        24      /* ND link-layer option on IPoIB: len 3 */
#define XDPOIB_MAX_VID          4095
#define XDPOIB_MCAST_QPN        0xffffff
#define XDPOIB_MAX_FRAME        2048    /* largest frame the ARP/ND rewrite paths accept */

/* ================================================================ wire constants (host order) */

#define XDPOIB_ETH_P_IP         0x0800
#define XDPOIB_ETH_P_ARP        0x0806
#define XDPOIB_ETH_P_RARP       0x8035
#define XDPOIB_ETH_P_IPV6       0x86DD
#define XDPOIB_ETH_P_TIPC       0x88CA
#define XDPOIB_ETH_P_8021Q      0x8100
#define XDPOIB_ETH_P_8021AD     0x88A8
#define XDPOIB_ARPHRD_ETHER     1
#define XDPOIB_ARPHRD_INFINIBAND 32
#define XDPOIB_IPOIB_MGID_IPV4_SIG 0x401b  /* MGID bytes 2-3 for IPv4 and the broadcast group */
#define XDPOIB_IPOIB_MGID_IPV6_SIG 0x601b  /* MGID bytes 2-3 for IPv6 groups */
#define XDPOIB_PKEY_FULL_MEMBER 0x8000

/* ================================================================ drop reasons and kinds */

/* Same numbers as xdpoib.reasons.DropReason, the one table of reasons for every refused frame
 * (BPF, agent, fabric layer): never renumber, never reuse. */
enum xdpoib_drop_reason {
	XDPOIB_DROP_TRUNCATED             = 1,
	XDPOIB_DROP_BAD_LENGTH            = 2,
	XDPOIB_DROP_UNSUPPORTED_ETHERTYPE = 3,
	XDPOIB_DROP_STACKED_VLAN          = 4,
	XDPOIB_DROP_UNKNOWN_VLAN          = 5,
	XDPOIB_DROP_SPOOFED_SOURCE        = 6,
	XDPOIB_DROP_BAD_ARP               = 7,
	XDPOIB_DROP_ARP_UNKNOWN_HWADDR    = 8,
	XDPOIB_DROP_BAD_ND                = 9,
	XDPOIB_DROP_ND_UNKNOWN_LLADDR     = 10,
	XDPOIB_DROP_MCAST_MISMATCH        = 11,
	XDPOIB_DROP_BAD_IP_HEADER         = 12,
	XDPOIB_DROP_BAD_DHCP              = 13,
	XDPOIB_DROP_NO_ROOM               = 14,
	XDPOIB_DROP_UNKNOWN_PEER          = 15,
	XDPOIB_DROP_UNKNOWN_VIF           = 16,
	XDPOIB_DROP_BAD_METADATA          = 17,
	XDPOIB_DROP_OVERSIZE              = 18,
	XDPOIB_DROP_REDIRECT_FAILED       = 19,
	XDPOIB_DROP_LOOPBACK              = 20,
	XDPOIB_DROP_BAD_IPOIB_HEADER      = 21,
	XDPOIB_DROP_NO_PARTITION          = 22,
	/* refused by the agent (counted in user space; the numbers are shared) */
	XDPOIB_DROP_VLAN_MISMATCH         = 23,
	XDPOIB_DROP_UNKNOWN_DESTINATION   = 24,
	XDPOIB_DROP_UNRESOLVED_QUEUE_FULL = 25,
	XDPOIB_DROP_PATH_FAILED           = 26,
	XDPOIB_DROP_NO_GROUP              = 27,
	XDPOIB_DROP_JOIN_FAILED           = 28,
	XDPOIB_DROP_ARP_SPOOFED           = 29,
	XDPOIB_DROP_ARP_UNVERIFIED        = 30,
	XDPOIB_DROP_ND_FOREIGN_LLADDR     = 31,
	XDPOIB_DROP_COMPLETION_ERROR      = 32,
	XDPOIB_DROP_INJECT_RING_FULL      = 33,
	XDPOIB_DROP_INJECT_TOO_BIG        = 34,
	XDPOIB_DROP_RUNT                  = 35,
	/* refused by the fabric layer (its OVERSIZE and LOOPBACK are the ones above) */
	XDPOIB_DROP_PORT_DOWN             = 36,
	XDPOIB_DROP_NO_DESTINATION        = 37,
	XDPOIB_DROP_NOT_MEMBER            = 38,
	XDPOIB_DROP_QKEY_MISMATCH         = 39,
	XDPOIB_DROP_PKEY_MISMATCH         = 40,
	XDPOIB_DROP_NO_RECV_BUFFER        = 41,
	XDPOIB_DROP_RX_OVERRUN            = 42,
	XDPOIB_DROP_BAD_DATAGRAM          = 43,
	XDPOIB_DROP_QP_ERROR              = 44,
	XDPOIB_DROP_SEND_QUEUE_FULL       = 45,     /* agent */
	XDPOIB_DROP_HANDED_OVER           = 46,     /* agent, restart */
};
#define XDPOIB_DROP_SLOTS       64      /* size of the per-reason counter array */

/* Same numbers as xdpoib.reasons.Kind. */
enum xdpoib_kind {
	XDPOIB_KIND_PEER       = 1,     /* unicast to a known peer: dest_id = peer id */
	XDPOIB_KIND_GROUP      = 2,     /* multicast: dest = MGID, dest_id = group id (0: not in the map) */
	XDPOIB_KIND_UNRESOLVED = 3,     /* unicast MAC not in the peer map: dest = the MAC */
	XDPOIB_KIND_CONTROL    = 4,     /* DHCP, IGMP/MLD: the original Ethernet frame, for the agent */
};
#define XDPOIB_KIND_SLOTS       8

/* Direction index into the stats map. */
enum xdpoib_dir {
	XDPOIB_DIR_TX = 0,              /* Ethernet -> IPoIB */
	XDPOIB_DIR_RX = 1,              /* IPoIB -> Ethernet */
	XDPOIB_DIR_SLOTS = 2,
};

/* ================================================================ metadata records */

/*
 * TX metadata, placed with bpf_xdp_adjust_meta right before the frame the TX program hands the agent.
 * For PEER/GROUP/UNRESOLVED the frame is the IPoIB frame (4-byte header + payload); for CONTROL it is
 * the original, untouched Ethernet frame. dest holds the MGID (GROUP) or the destination MAC in its
 * first 6 bytes (PEER, UNRESOLVED; the rest zero).
 */
struct xdpoib_tx_meta {
	xo_u8  version;                 /* XDPOIB_META_VERSION */
	xo_u8  kind;                    /* enum xdpoib_kind */
	xo_u16 pkey;                    /* P_Key of the partition (host order, full-member bit as mapped) */
	xo_u16 vid;                     /* VLAN id the frame came on (0 = untagged / priority-tagged) */
	xo_u16 reserved;                /* zero */
	xo_u32 vif_id;                  /* the sending VIF */
	xo_u32 dest_id;                 /* peer id (PEER) or group id (GROUP); 0 = not in the maps */
	xo_u8  dest[16];                /* MGID (GROUP) or destination MAC (PEER, UNRESOLVED, CONTROL) */
};

/* RX metadata flags */
#define XDPOIB_RX_F_MULTICAST   0x01    /* received on a multicast group: dest MAC from the IP dest */
#define XDPOIB_RX_F_ETHERNET    0x02    /* frame is already Ethernet (agent-rewritten control): pass on */

/*
 * RX metadata, supplied by the agent in front of each frame it injects (ctx_in.data = its size).
 */
struct xdpoib_rx_meta {
	xo_u8  version;                 /* XDPOIB_META_VERSION */
	xo_u8  flags;                   /* XDPOIB_RX_F_* */
	xo_u16 pkey;                    /* P_Key the datagram arrived on (host order) */
	xo_u32 peer_id;                 /* the sender's peer entry (created before its first frame) */
	xo_u32 vif_id;                  /* the receiving VIF (unicast) or the partition's VIF (multicast) */
	xo_u32 reserved;                /* zero */
};

/* ================================================================ map keys and values */

#define XDPOIB_F_VALID          0x01    /* an array slot in use */

/* Key of the *_by_mac maps: a MAC padded to 8 bytes (pad zero). */
struct xdpoib_mac_key {
	xo_u8  mac[XDPOIB_ETH_ALEN];
	xo_u8  pad[2];
};

/* Key of xdpoib_by_addr: an IPoIB hardware address without its flags byte. */
struct xdpoib_addr_key {
	xo_u8  qpn[3];                  /* big-endian QPN */
	xo_u8  pad;                     /* zero */
	xo_u8  gid[XDPOIB_GID_LEN];
};

/* Value of xdpoib_by_addr: the MAC standing for that (QPN, GID): a VIF's MAC or a peer's REMAC. */
struct xdpoib_mac_value {
	xo_u8  mac[XDPOIB_ETH_ALEN];
	xo_u8  pad[2];
};

/* A local VIF (value of xdpoib_vif_mac and xdpoib_vif_id). */
struct xdpoib_vif {
	xo_u32 vif_id;
	xo_u8  mac[XDPOIB_ETH_ALEN];
	xo_u8  flags;                   /* XDPOIB_F_VALID (needed in the slot caches) */
	xo_u8  reserved;
	xo_u8  addr[XDPOIB_HWADDR_LEN]; /* our IPoIB address: flags, QPN, port GID */
};

/* A remote peer (value of xdpoib_peer_mac and xdpoib_peer_id); mac is its REMAC. */
struct xdpoib_peer {
	xo_u32 peer_id;
	xo_u8  mac[XDPOIB_ETH_ALEN];
	xo_u8  flags;                   /* XDPOIB_F_VALID (needed in the slot caches) */
	xo_u8  reserved;
	xo_u8  addr[XDPOIB_HWADDR_LEN]; /* its IPoIB address */
};

/* Key of xdpoib_group: an MGID. */
struct xdpoib_mgid_key {
	xo_u8  mgid[XDPOIB_GID_LEN];
};

/* Value of xdpoib_group. */
struct xdpoib_group {
	xo_u32 group_id;
	xo_u32 flags;                   /* reserved for the agent, zero */
};

/* Key of the id maps and of the array maps: a u32. */
struct xdpoib_u32_key {
	xo_u32 id;
};

/* Value of xdpoib_vlan, an array indexed by VID: the P_Key of that VLAN. */
struct xdpoib_vlan {
	xo_u16 pkey;                    /* as configured; the datapath forces the full-member bit */
	xo_u8  flags;                   /* XDPOIB_F_VALID */
	xo_u8  reserved;
};

/* Value of xdpoib_pkey, an array indexed by P_Key & 0x7fff: the VID of that partition. */
struct xdpoib_pkey {
	xo_u16 vid;                     /* 0 = untagged */
	xo_u8  flags;                   /* XDPOIB_F_VALID */
	xo_u8  reserved;
};

/* Value of xdpoib_config[0]. */
/* xdpoib_config.flags: hand frames from unknown (unicast) source MACs to the agent as CONTROL with
 * vif_id XDPOIB_VIF_UNKNOWN, so it can learn the guest behind eth4 (else: SPOOFED_SOURCE). */
#define XDPOIB_CFG_LEARN_VIFS   0x1
#define XDPOIB_VIF_UNKNOWN      0xffffffffu

struct xdpoib_config {
	xo_u64 report_interval_ns;      /* unresolved reports: at most one per destination per interval */
	xo_u32 flags;                   /* XDPOIB_CFG_* */
	xo_u8  scope;                   /* MGID scope nibble of the broadcast group (0 = link-local, 2) */
	xo_u8  reserved[3];
};

/* Per-CPU counters, one slot per direction (xdpoib_stats[XDPOIB_DIR_*]). Every packet is counted on
 * entry (packets, bytes) and gets exactly one verdict (indexed by XDP action); each drop also counts
 * its reason, each handed-over frame its kind. */
struct xdpoib_stats {
	xo_u64 packets;
	xo_u64 bytes;
	xo_u64 verdicts[5];             /* XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT */
	xo_u64 reserved;
	xo_u64 kinds[XDPOIB_KIND_SLOTS];
	xo_u64 drops[XDPOIB_DROP_SLOTS];
};

/* Ring buffer event: a destination not in the maps (at most once per destination per interval). */
struct xdpoib_unresolved_event {
	xo_u8  version;                 /* XDPOIB_META_VERSION */
	xo_u8  kind;                    /* UNRESOLVED (dest = MAC) or GROUP (dest = MGID not in the map) */
	xo_u16 pkey;
	xo_u32 vif_id;
	xo_u8  dest[16];
};

/* Key of the rate limiter behind the events. */
struct xdpoib_dest_key {
	xo_u8  dest[16];
	xo_u32 pkey;
};

/*
 * A frame queued for batched injection. One live-frames call runs the RX batch program once per frame; its
 * first run takes slot xo_inject_idx, and each run the slot its predecessor's `next` names. Slots
 * [0, XDPOIB_INJECT_COPY_SLOTS) hold frames the agent copies in; the rest are XDPOIB_INJECT_RX_REGIONS
 * regions of XDPOIB_INJECT_RX_SLOTS receive buffers each, one region per agent process that claimed it:
 * a QP receives into them (a GRH, then the datagram: `offset` XDPOIB_INJECT_GRH), and the frame is
 * injected where it landed, without a copy.
 */
#define XDPOIB_INJECT_COPY_SLOTS 256    /* the kernel's largest live-frames batch */
#define XDPOIB_INJECT_RX_SLOTS  512     /* receive buffers per region */
#define XDPOIB_INJECT_RX_REGIONS 3      /* an agent, and up to two predecessors still draining */
#define XDPOIB_INJECT_SLOTS     (XDPOIB_INJECT_COPY_SLOTS + XDPOIB_INJECT_RX_REGIONS * XDPOIB_INJECT_RX_SLOTS)
#define XDPOIB_INJECT_MAX       3504    /* largest injected frame (a page minus head/tailroom) */
#define XDPOIB_INJECT_GRH       40      /* a GRH's room in front of a received frame */
#define XDPOIB_INJECT_FRAME     4160    /* a GRH and the largest IB datagram (4096) */
struct xdpoib_inject_slot {
	xo_u32 len;                     /* frame bytes */
	xo_u16 next;                    /* the slot the next run of the same call takes */
	xo_u16 offset;                  /* where the frame starts in frame[]: 0 or XDPOIB_INJECT_GRH */
	struct xdpoib_rx_meta meta;
	xo_u8  frame[XDPOIB_INJECT_FRAME];      /* only offset .. offset + len (<= XDPOIB_INJECT_MAX) used */
};

/* ================================================================ map names and sizes */

#define XDPOIB_MAX_VIFS         1024
#define XDPOIB_MAX_PEERS        (1 << 20)     /* peer ids are in [1, XDPOIB_MAX_PEERS) */
#define XDPOIB_MAX_ADDRS        ((1 << 20) + 1024)
#define XDPOIB_MAX_GROUPS       65536
#define XDPOIB_VIF_SLOTS        1024    /* direct-mapped caches in front of the VIF hashes */
#define XDPOIB_PEER_SLOTS       65536   /* direct-mapped cache in front of the REMAC hash */
#define XDPOIB_MAX_VLANS        4096    /* array indexed by VID */
#define XDPOIB_MAX_PKEYS        32768   /* array indexed by P_Key & 0x7fff */
#define XDPOIB_MAX_XSKS         64
#define XDPOIB_MAX_REPORTS      4096
#define XDPOIB_EVENTS_PAGES     16

/*
 * Slot of a MAC or an id in the direct-mapped caches (array maps, looked up inline by the verifier,
 * ~1/10 the cost of a hash lookup here). A slot holds at most one entry; the programs check its MAC or
 * id and fall back to the hash maps, so the caches only ever speed things up. xdpoib/abi.py has the
 * same functions.
 */
#define XDPOIB_MAC_FOLD(mac) \
	((((xo_u32)(mac)[2] << 24) | ((xo_u32)(mac)[3] << 16) | ((xo_u32)(mac)[4] << 8) | (mac)[5]) ^ \
	 (((xo_u32)(mac)[0] << 8) | (mac)[1]))
#define XDPOIB_MAC_SLOT(mac, nslots) \
	((XDPOIB_MAC_FOLD(mac) ^ (XDPOIB_MAC_FOLD(mac) >> 16)) & ((nslots) - 1))
#define XDPOIB_ID_SLOT(id, nslots)      ((id) & ((nslots) - 1))

/* ================================================================ layout checks */

_Static_assert(sizeof(struct xdpoib_tx_meta) == 32, "tx meta size");
_Static_assert(sizeof(struct xdpoib_rx_meta) == 16, "rx meta size");
_Static_assert(sizeof(struct xdpoib_mac_key) == 8, "mac key size");
_Static_assert(sizeof(struct xdpoib_addr_key) == 20, "addr key size");
_Static_assert(sizeof(struct xdpoib_mac_value) == 8, "mac value size");
_Static_assert(sizeof(struct xdpoib_vif) == 32, "vif size");
_Static_assert(sizeof(struct xdpoib_peer) == 32, "peer size");
_Static_assert(sizeof(struct xdpoib_mgid_key) == 16, "mgid key size");
_Static_assert(sizeof(struct xdpoib_group) == 8, "group size");
_Static_assert(sizeof(struct xdpoib_u32_key) == 4, "u32 key size");
_Static_assert(sizeof(struct xdpoib_vlan) == 4, "vlan size");
_Static_assert(sizeof(struct xdpoib_pkey) == 4, "pkey size");
_Static_assert(sizeof(struct xdpoib_config) == 16, "config size");
_Static_assert(sizeof(struct xdpoib_stats) == 8 * (2 + 5 + 1 + XDPOIB_KIND_SLOTS + XDPOIB_DROP_SLOTS),
	       "stats size");
_Static_assert(sizeof(struct xdpoib_unresolved_event) == 24, "event size");
_Static_assert(sizeof(struct xdpoib_dest_key) == 20, "dest key size");
_Static_assert(sizeof(struct xdpoib_inject_slot) == 24 + XDPOIB_INJECT_FRAME, "inject slot size");

#endif /* XDPOIB_ABI_H */
