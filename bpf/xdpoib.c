/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib.c - the XDP programs of xdpoib (entry points only; the work is in bpf/include/).
 *
 *   xdpoib_tx    Ethernet -> IPoIB, on the internal side of the attached interface
 *   xdpoib_rx    IPoIB -> Ethernet, on frames the agent injects (BPF_PROG_TEST_RUN, live frames)
 *   xdpoib_rx_batch  xdpoib_rx on the frames of a chain of xo_inject slots, one live-frames call per batch
 *   xdpoib_noop  counts and passes: the baseline of `xdpoib bench datapath`
 *   xdpoib_tx_raw  counts and redirects every frame to the agent untranslated: the plumbing ceiling
 *                of `xdpoib bench e2e` (XDPOIB_DATAPATH=ceiling)
 *
 * Every program counts each packet on entry and records exactly one verdict on every return
 * (tests/bpf/test_verdicts.py).
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
	rc = rx_frame(ctx, &s);
#ifdef XDPOIB_RESTORE
	restore_frame(ctx, &s, saved, 0);
#endif
	return rc;
}

/**
 * Batched injection: each run of a live-frames call takes a slot of xo_inject (frame and metadata) in
 * place of the dummy input, then does what xdpoib_rx does. The agent fills the slots and chains them
 * (each slot's `next`), sets xo_inject_idx to the first and makes one call with repeat = batch_size = the
 * number of frames.
 *
 * @v ctx       XDP context (live frame, contents replaced)
 * @ret XDP action
 */
int xdpoib_rx_batch(struct xdp_md *ctx)
{
	struct xo_state s = {};
	int err;

	err = inject_slot_load(ctx);
	count_entry(ctx, &s, XDPOIB_DIR_RX);
	if (err)
		return drop_frame(s.st, err);
	return rx_frame(ctx, &s);
}

/**
 * The benchmark baseline: count every frame and pass it.
 *
 * @v ctx       XDP context
 * @ret XDP_PASS (recorded)
 */
int xdpoib_noop(struct xdp_md *ctx)
{
	struct xo_state s = {};

	count_entry(ctx, &s, XDPOIB_DIR_TX);
	return record_action(s.st, XDP_PASS);
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
 * @ret XDP_PASS (recorded)
 */
int xdpoib_harness(struct xdp_md *ctx)
{
	struct xo_state s = {};
	u8 saved[XDPOIB_RESTORE_BYTES];

	count_entry(ctx, &s, XDPOIB_DIR_TX);
	save_frame(ctx, &s, saved);
	adjust_head(ctx, &s, XDPOIB_ETH_HLEN - XDPOIB_IPOIB_HLEN);
	restore_frame(ctx, &s, saved, 0);
	return record_action(s.st, XDP_PASS);
}
#endif
