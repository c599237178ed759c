/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_stats.h - per-invocation state, counters and verdicts (BPF only).
 *
 * Includes: xdpoib_maps.h (xo_stats). Offers: struct xo_state; count_entry (every packet, on
 * entry), record_action (exactly one verdict per packet: every program returns through it),
 * drop_frame/XO_DROP (a drop and its reason, from the one table of xdpoib/reasons.py), count_kind.
 */
#ifndef XDPOIB_STATS_H
#define XDPOIB_STATS_H

#include "xdpoib_maps.h"

#define XO_DROP(st, why) drop_frame((st), XDPOIB_DROP_##why)

/* What one program run has done to the frame, for counters and the restore build. */
struct xo_state {
	struct xdpoib_stats *st;
	int head;                       /* sum of adjust_head offsets */
	int meta;                       /* bytes of metadata added by adjust_meta */
	u32 saved_len;                  /* restore build: input length */
	u32 saved_bytes;                /* restore build: bytes saved */
};

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

#endif /* XDPOIB_STATS_H */
