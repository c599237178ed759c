/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_helpers.h - small helpers shared by the TX and RX programs (BPF only).
 *
 * Build switches (cflags):
 *   XDPOIB_TEST_FILL   fill bytes prepended by adjust_head/adjust_meta with 0xFF before writing them,
 *                      so an unwritten byte shows in tests (BPF_PROG_TEST_RUN zero-fills them)
 *   XDPOIB_TX_DEVMAP   TX redirects through a devmap instead of the XSKMAP (tests, benchmarks)
 *   XDPOIB_RESTORE     put the input frame back before returning (benchmarks with repeat > 1)
 */
#ifndef XDPOIB_HELPERS_H
#define XDPOIB_HELPERS_H

#include "xdpoib_abi.h"
#include "xdpoib_maps.h"

#define BE16(x) ((__be16)__constant_htons(x))
#define XO_DROP(st, why) drop_frame((st), XDPOIB_DROP_##why)

/* ================================================================ verifier-visible bounds */

/**
 * Mask a value in a way the compiler cannot optimise away, so the verifier sees the bound.
 *
 * @v v         value
 * @v mask      2^n - 1
 * @ret v & mask
 */
#define xo_mask(v, mask) ({ u64 __v = (v); asm volatile("%0 &= " #mask : "+r"(__v)); (u32)__v; })

/* A size in [1, mask + 1] for helpers that refuse zero sizes (v must be >= 1 for the value to hold). */
#define xo_size(v, mask) (xo_mask((v) - 1, mask) + 1)

/**
 * Return a pointer to len bytes of the packet at off, or NULL if the frame is shorter (direct
 * access: much cheaper than bpf_xdp_load_bytes on the hot path).
 *
 * @v ctx       XDP context
 * @v off       offset (below 4096)
 * @v len       bytes wanted (a constant at every call site)
 */
static __always_inline u8 *pkt_at(struct xdp_md *ctx, u32 off, u32 len)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	u8 *p = (u8 *)data + xo_mask(off, 4095);

	if ((void *)(p + len) > data_end)
		return NULL;
	return p;
}

/* ================================================================ per-invocation state */

/* What one program run has done to the frame, for counters and the restore build. */
struct xo_state {
	struct xdpoib_stats *st;
	int head;                       /* sum of adjust_head offsets */
	int meta;                       /* bytes of metadata added by adjust_meta */
	u32 saved_len;                  /* restore build: input length */
	u32 saved_bytes;                /* restore build: bytes saved */
};

/* ================================================================ counters and verdicts */

/**
 * Count a packet on entry.
 *
 * @v ctx       XDP context
 * @v s         state to fill
 * @v dir       XDPOIB_DIR_TX or XDPOIB_DIR_RX
 */
static __always_inline void count_entry(struct xdp_md *ctx, struct xo_state *s, u32 dir)
{
	struct xdpoib_stats *st = xo_stats.lookup(&dir);

	s->st = st;
	if (st) {
		st->packets++;
		st->bytes += ctx->data_end - ctx->data;
	}
}

/**
 * Record a verdict (exactly one per packet).
 *
 * @v st        counters of this direction
 * @v action    XDP action
 * @ret action
 */
static __always_inline int record_action(struct xdpoib_stats *st, int action)
{
	if (st && action >= 0 && action < 5)
		st->verdicts[action]++;
	return action;
}

/**
 * Drop a frame, counting its reason.
 *
 * @v st        counters of this direction
 * @v reason    enum xdpoib_drop_reason
 * @ret XDP_DROP
 */
static __always_inline int drop_frame(struct xdpoib_stats *st, u32 reason)
{
	if (st)
		st->drops[reason & (XDPOIB_DROP_SLOTS - 1)]++;
	return record_action(st, XDP_DROP);
}

/**
 * Count the kind of a frame handed on.
 *
 * @v st        counters
 * @v kind      enum xdpoib_kind
 */
static __always_inline void count_kind(struct xdpoib_stats *st, u32 kind)
{
	if (st)
		st->kinds[kind & (XDPOIB_KIND_SLOTS - 1)]++;
}

/* ================================================================ frame size changes */

/**
 * Move the frame start (bpf_xdp_adjust_head), remembering it for the restore build.
 *
 * @v ctx       XDP context
 * @v s         state
 * @v delta     bytes to remove at the head (negative: bytes to add)
 * @ret 0 or a negative error
 */
static __always_inline int adjust_head(struct xdp_md *ctx, struct xo_state *s, int delta)
{
	if (bpf_xdp_adjust_head(ctx, delta))
		return -1;
	s->head += delta;
#ifdef XDPOIB_TEST_FILL
	if (delta < 0) {
		u8 ff[32];
		u32 n = (u32)(-delta);

		__builtin_memset(ff, 0xff, sizeof(ff));
		if (n > sizeof(ff))
			n = sizeof(ff);
		asm volatile("" : "+r"(n));     /* keep the mask: the verifier needs to see the bound */
		n &= 0x3f;
		if (n >= 1 && n <= sizeof(ff))
			bpf_xdp_store_bytes(ctx, 0, ff, n);
	}
#endif
	return 0;
}

/**
 * The frame's length now, as a plain scalar (the barrier keeps the compiler from folding it into
 * pointer arithmetic on data_end, which the verifier refuses).
 *
 * @v ctx       XDP context
 * @ret length in bytes
 */
static __always_inline int frame_len(struct xdp_md *ctx)
{
	int len = (int)(ctx->data_end - ctx->data);

	asm volatile("" : "+r"(len));
	return len;
}

/**
 * Set the frame length (bpf_xdp_adjust_tail).
 *
 * @v ctx       XDP context
 * @v len       new length
 * @ret 0 or a negative error
 */
static __always_inline int set_len(struct xdp_md *ctx, u32 len)
{
	int delta = (int)len - (int)(ctx->data_end - ctx->data);

	if (delta == 0)
		return 0;
	return bpf_xdp_adjust_tail(ctx, delta);
}

/**
 * Reserve metadata in front of the frame; the caller writes every byte.
 *
 * @v ctx       XDP context
 * @v s         state
 * @v size      bytes (a multiple of 4, at most 32)
 * @ret 0 or a negative error
 */
static __always_inline int reserve_meta(struct xdp_md *ctx, struct xo_state *s, int size)
{
	if (bpf_xdp_adjust_meta(ctx, -size))
		return -1;
	s->meta += size;
	return 0;
}

/* ================================================================ restore build */

#ifdef XDPOIB_RESTORE
/**
 * Save the head of the input frame on the stack (restore build).
 *
 * @v ctx       XDP context
 * @v s         state
 * @v saved     XDPOIB_RESTORE_BYTES bytes of stack
 */
static __always_inline void save_frame(struct xdp_md *ctx, struct xo_state *s, u8 *saved)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;

	s->saved_len = data_end - data;
	if (data + XDPOIB_RESTORE_BYTES > data_end)
		return;
	__builtin_memcpy(saved, data, XDPOIB_RESTORE_BYTES);
	s->saved_bytes = XDPOIB_RESTORE_BYTES;
}

/**
 * Put the input frame back (restore build), so that repeat > 1 replays the same input. Bytes past
 * XDPOIB_RESTORE_BYTES are resized back but not rewritten: benchmark frames only change before that
 * (or in padding the program cuts anyway).
 *
 * @v ctx       XDP context
 * @v s         state
 * @v saved     the saved bytes
 * @v has_meta  the program may have added metadata (TX)
 */
static __always_inline void restore_frame(struct xdp_md *ctx, struct xo_state *s, u8 *saved, int has_meta)
{
	void *data, *data_end;

	/* unconditional on s->*: branching on them would make the verifier track them precisely
	 * (has_meta is a constant per program) */
	if (has_meta)
		bpf_xdp_adjust_meta(ctx, s->meta);
	bpf_xdp_adjust_head(ctx, -s->head);
	set_len(ctx, s->saved_len);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (s->saved_bytes && data + XDPOIB_RESTORE_BYTES <= data_end)
		__builtin_memcpy(data, saved, XDPOIB_RESTORE_BYTES);
}
#endif

/* ================================================================ MGIDs (docs/design.md §3.3, 3.4) */

/**
 * Write the common MGID prefix ff1S:SSSS:PPPP and zero the rest.
 *
 * @v mgid      16 bytes out
 * @v sig       IPv4 or IPv6 signature
 * @v pkey      P_Key with the full-member bit
 * @v scope     scope nibble
 */
static __always_inline void mgid_prefix(u8 *mgid, u16 sig, u16 pkey, u8 scope)
{
	__builtin_memset(mgid, 0, 16);
	mgid[0] = 0xff;
	mgid[1] = 0x10 | (scope & 0x0f);
	mgid[2] = sig >> 8;
	mgid[3] = sig & 0xff;
	mgid[4] = pkey >> 8;
	mgid[5] = pkey & 0xff;
}

/* ================================================================ checksums */

/**
 * Fold a 32-bit ones-complement partial sum to 16 bits.
 *
 * @v sum       partial sum (from bpf_csum_diff)
 * @ret folded sum, in memory byte order
 */
static __always_inline u16 csum_fold16(u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (u16)sum;
}

/* ================================================================ lookups */

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
 * Find a peer by id: its cache slot, else the hash.
 *
 * @v id        peer id
 * @ret the peer, or NULL
 */
static __always_inline struct xdpoib_peer *peer_by_id(u32 id)
{
	u32 slot = XDPOIB_ID_SLOT(id, XDPOIB_PEER_SLOTS);
	struct xdpoib_peer *p = xo_peerid_slot.lookup(&slot);
	struct xdpoib_u32_key k = { .id = id };

	if (p && (p->flags & XDPOIB_F_VALID) && p->peer_id == id)
		return p;
	return xo_peer_id.lookup(&k);
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

#endif /* XDPOIB_HELPERS_H */
