"""A counting XDP program for benches: every frame is counted by length and dropped (or, while
`passing` is set, passed on, so a packet socket behind it can look at a few of them).

Slots of its per-CPU array: 0 all frames, 1 frames of at most `MAX_FRAME` bytes (an MTU-sized Ethernet
frame without FCS), 2 frames above that (a super-frame that reached XDP unsegmented).
"""

from __future__ import annotations

import ctypes

from xdpoib.datapath.loader import BpfLoadError
from xdpoib.errors import PrerequisiteError

MAX_FRAME = 1514

PROGRAM = rb"""
BPF_PERCPU_ARRAY(xbt_cnt, u64, 3);
BPF_ARRAY(xbt_pass, u32, 1);

int xbt_count(struct xdp_md *ctx) {
    u64 len = ctx->data_end - ctx->data;
    int slot = 0;
    u64 *n = xbt_cnt.lookup(&slot);
    if (n)
        *n += 1;
    slot = len > MAX_FRAME ? 2 : 1;
    n = xbt_cnt.lookup(&slot);
    if (n)
        *n += 1;
    slot = 0;
    u32 *pass = xbt_pass.lookup(&slot);
    return pass && *pass ? XDP_PASS : XDP_DROP;
}
"""


class CountingProgram:
    """The program loaded (not attached): attach its `fd` with `xdpoib.link.attach_xdp`."""

    def __init__(self) -> None:
        try:
            from bcc import BPF
        except ImportError as e:
            raise PrerequisiteError("bcc is not importable (Debian python3-bpfcc; see make setup)") from e
        try:
            self.bpf = BPF(text=PROGRAM, cflags=[f"-DMAX_FRAME={MAX_FRAME}"])
            self.fd = self.bpf.load_func(b"xbt_count", BPF.XDP).fd
        except Exception as e:
            raise BpfLoadError(f"cannot load the counting program: {str(e).splitlines()[0]}") from e

    def counts(self) -> tuple[int, int, int]:
        """(all frames, frames <= MAX_FRAME bytes, frames above), summed over CPUs, since load."""
        t = self.bpf[b"xbt_cnt"]
        return tuple(sum(int(v) for v in t.getvalue(ctypes.c_int(i))) for i in range(3))

    def set_passing(self, on: bool) -> None:
        """Pass frames on (True) or drop them (False, the default)."""
        self.bpf[b"xbt_pass"][ctypes.c_int(0)] = ctypes.c_uint32(1 if on else 0)

    def close(self) -> None:
        """Unload (detach it from its devices first)."""
        self.bpf.cleanup()
