/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_parse.h - reading the packet within bounds the verifier can see (BPF only).
 *
 * Includes: xdpoib_consts.h. Offers: xo_mask/xo_size (bounds the compiler cannot fold away),
 * pkt_at (a checked pointer into the packet, re-read from ctx on every call so no pointer outlives a
 * head or tail change), frame_len.
 */
#ifndef XDPOIB_PARSE_H
#define XDPOIB_PARSE_H

#include "xdpoib_consts.h"

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

#endif /* XDPOIB_PARSE_H */
