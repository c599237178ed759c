/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_csum.h - ones-complement checksums (BPF only).
 *
 * Includes: xdpoib_parse.h (xo_mask). Offers: csum_fold16 (a bpf_csum_diff sum to 16 bits) and
 * csum_scratch (the sum of a long stretch of the per-CPU scratch buffer, in bpf_csum_diff-sized steps).
 */
#ifndef XDPOIB_CSUM_H
#define XDPOIB_CSUM_H

#include "xdpoib_parse.h"

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

/**
 * Sum len bytes (a multiple of 4, at most 2048) of scratch from off into a checksum.
 *
 * @v b         scratch
 * @v off       offset (at most 2047)
 * @v len       bytes
 * @v sum       running sum
 * @ret new running sum
 */
static __always_inline u32 csum_scratch(u8 *b, u32 off, u32 len, u32 sum)
{
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		u32 n, o = i * 512;
		s64 r;

		if (o >= len)
			break;
		n = len - o;
		if (n > 512)
			n = 512;
		r = bpf_csum_diff(NULL, 0, (void *)(b + xo_mask(off + o, 2047)), xo_mask(n, 1023), sum);
		sum = (u32)r;
	}
	return sum;
}

#endif /* XDPOIB_CSUM_H */
