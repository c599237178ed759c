/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib.c - the XDP programs of xdpoib (entry points only; the work is in bpf/include/).
 *
 *   xdpoib_tx    Ethernet -> IPoIB, on the internal side of the attached interface
 *   xdpoib_rx    IPoIB -> Ethernet, on frames the agent injects (BPF_PROG_TEST_RUN, live frames)
 *   xdpoib_noop  counts and passes: the baseline of `xdpoib bench datapath`
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
	restore_frame(ctx, &s, saved);
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
	restore_frame(ctx, &s, saved);
#endif
	return rc;
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
	restore_frame(ctx, &s, saved);
	return XDP_PASS;
}
#endif
