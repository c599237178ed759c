/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib.c - the XDP programs of xdpoib (entry points only; the work is in bpf/include/).
 *
 *   xdpoib_tx    Ethernet -> IPoIB, on the internal side of the attached interface
 *   xdpoib_rx    IPoIB -> Ethernet, on frames the agent injects (BPF_PROG_TEST_RUN, live frames)
 *   xdpoib_noop  counts and passes: the baseline of `xdpoib bench datapath`
 *   xdpoib_tx_raw  counts and redirects every frame to the agent untranslated: the plumbing ceiling
 *                of `xdpoib bench e2e` (XDPOIB_DATAPATH=ceiling)
 *
 * Compiled by bcc through xdpoib/datapath/loader.py, which inlines the local headers.
 */
#include "xdpoib_tx.h"
#include "xdpoib_rx.h"

/**
 * Ethernet -> IPoIB.
 *
 * @v ctx       XDP context
 * @ret XDP action
 */
int xdpoib_tx(struct xdp_md *ctx)
{
	struct xo_state s = {};
	int rc;
#ifdef XDPOIB_RESTORE
	u8 saved[XDPOIB_RESTORE_BYTES];
#endif

	count_entry(ctx, &s, XDPOIB_DIR_TX);
#ifdef XDPOIB_RESTORE
	save_frame(ctx, &s, saved);
#endif
	rc = tx_frame(ctx, &s);
#ifdef XDPOIB_RESTORE
	restore_frame(ctx, &s, saved, 1);
#endif
	return rc;
}

/**
 * IPoIB -> Ethernet.
 *
 * @v ctx       XDP context (metadata: struct xdpoib_rx_meta)
 * @ret XDP action
 */
int xdpoib_rx(struct xdp_md *ctx)
{
	struct xo_state s = {};
	int rc;
#ifdef XDPOIB_RESTORE
	u8 saved[XDPOIB_RESTORE_BYTES];
#endif

	count_entry(ctx, &s, XDPOIB_DIR_RX);
#ifdef XDPOIB_RESTORE
	save_frame(ctx, &s, saved);
#endif
	rc = rx_frame(ctx, &s, 0);
#ifdef XDPOIB_RESTORE
	restore_frame(ctx, &s, saved, 0);
#endif
	return rc;
}

/**
 * Batched injection: run i of a live-frames call takes xo_inject[i] (frame and metadata) in place of
 * the dummy input, then does what xdpoib_rx does. The agent fills the slots, zeroes xo_inject_idx and
 * makes one call with repeat = batch_size = the number of frames.
 *
 * @v ctx       XDP context (live frame, contents replaced)
 * @ret XDP action
 */
int xdpoib_rx_batch(struct xdp_md *ctx)
{
	struct xo_state s = {};
	struct xdpoib_inject_slot *slot;
	struct xdpoib_rx_meta *m;
	void *data, *meta;
	u32 zero = 0, i, len, *idx;

	idx = xo_inject_idx.lookup(&zero);
	if (!idx)
		return XDP_ABORTED;
	i = *idx;
	*idx = i + 1;
	i &= XDPOIB_INJECT_SLOTS - 1;
	slot = xo_inject.lookup(&i);
	len = slot ? slot->len : 0;
	if (!slot || len < XDPOIB_ETH_HLEN || len > XDPOIB_INJECT_MAX || set_len(ctx, len) ||
	    bpf_xdp_store_bytes(ctx, 0, slot->frame, xo_size(len, 4095)) ||
	    bpf_xdp_adjust_meta(ctx, -(int)sizeof(*m))) {
		count_entry(ctx, &s, XDPOIB_DIR_RX);
		return XO_DROP(s.st, BAD_METADATA);
	}
	data = (void *)(long)ctx->data;
	meta = (void *)(long)ctx->data_meta;
	m = meta;
	if ((void *)(m + 1) > data)
		return XDP_ABORTED;
	__builtin_memcpy(m, &slot->meta, sizeof(*m));
	count_entry(ctx, &s, XDPOIB_DIR_RX);
	return rx_frame(ctx, &s, 0);
}

/**
 * Injection prototype (b): on eth4 itself, frames the agent sent by AF_XDP TX on the internal end,
 * each behind an Ethernet header addressed to eth4 with EtherType XDPOIB_ETH_P_INBAND and a
 * struct xdpoib_rx_meta. Strips both, translates like xdpoib_rx and passes the result to eth4's stack.
 * Frames without that header pass untouched (uncounted). veth only: a TAP has no such hook.
 *
 * @v ctx       XDP context on eth4
 * @ret XDP action
 */
int xdpoib_rx_inband(struct xdp_md *ctx)
{
	struct xo_state s = {};
	struct xdpoib_rx_meta *m;
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end, *meta;
	u8 *p = data;
	u8 hdr[sizeof(struct xdpoib_rx_meta)];

	if ((void *)(p + XDPOIB_ETH_HLEN + sizeof(hdr)) > data_end ||
	    p[12] != (XDPOIB_ETH_P_INBAND >> 8) || p[13] != (XDPOIB_ETH_P_INBAND & 0xff))
		return XDP_PASS;
	__builtin_memcpy(hdr, p + XDPOIB_ETH_HLEN, sizeof(hdr));
	if (bpf_xdp_adjust_head(ctx, XDPOIB_ETH_HLEN + sizeof(hdr)) ||
	    bpf_xdp_adjust_meta(ctx, -(int)sizeof(hdr)))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	meta = (void *)(long)ctx->data_meta;
	m = meta;
	if ((void *)(m + 1) > data)
		return XDP_DROP;
	__builtin_memcpy(m, hdr, sizeof(hdr));
	count_entry(ctx, &s, XDPOIB_DIR_RX);
	return rx_frame(ctx, &s, 1);
}

/**
 * The benchmark baseline: pass every frame.
 *
 * @v ctx       XDP context
 * @ret XDP_PASS
 */
int xdpoib_noop(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/**
 * The plumbing ceiling: every frame to the agent's AF_XDP socket as it is (no parsing, no lookups).
 *
 * @v ctx       XDP context
 * @ret XDP action
 */
int xdpoib_tx_raw(struct xdp_md *ctx)
{
	struct xo_state s = {};

	count_entry(ctx, &s, XDPOIB_DIR_TX);
	return record_action(s.st, xo_xsks.redirect_map(ctx->rx_queue_index, 0));
}

#ifdef XDPOIB_RESTORE
/**
 * Benchmark harness cost: what the restore build adds around every program (count, save, restore
 * after an IPoIB-sized head change), with no translation work.
 *
 * @v ctx       XDP context
 * @ret XDP_PASS
 */
int xdpoib_harness(struct xdp_md *ctx)
{
	struct xo_state s = {};
	u8 saved[XDPOIB_RESTORE_BYTES];

	count_entry(ctx, &s, XDPOIB_DIR_SLOTS);     /* same lookup, no slot: counts nothing */
	save_frame(ctx, &s, saved);
	adjust_head(ctx, &s, XDPOIB_ETH_HLEN - XDPOIB_IPOIB_HLEN);
	restore_frame(ctx, &s, saved, 0);
	return XDP_PASS;
}
#endif
