/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_frame.h - changing the frame's size, and the restore build (BPF only).
 *
 * Includes: xdpoib_parse.h, xdpoib_stats.h (struct xo_state remembers every change). Offers:
 * adjust_head, set_len, reserve_meta; in the restore build save_frame/restore_frame.
 *
 * Build switches (cflags, xdpoib/datapath/loader.py Build):
 *   XDPOIB_TEST_FILL   fill bytes prepended by adjust_head/adjust_meta with 0xFF before writing them,
 *                      so an unwritten byte shows in tests (BPF_PROG_TEST_RUN zero-fills them)
 *   XDPOIB_RESTORE     put the input frame back before returning (benchmarks with repeat > 1)
 *   XDPOIB_TX_DEVMAP   TX redirects through a devmap instead of the XSKMAP (xdpoib_maps.h)
 *
 * After any of these, re-read data/data_end (pkt_at does) before touching the packet.
 */
#ifndef XDPOIB_FRAME_H
#define XDPOIB_FRAME_H

#include "xdpoib_parse.h"
#include "xdpoib_stats.h"

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

#endif /* XDPOIB_FRAME_H */
