"""BPF_PROG_TEST_RUN for XDP programs, by the raw syscall (bcc 0.26 has no wrapper).

Always passes ctx_in (an `xdp_md`): without it the program sees an empty packet on 6.18. Metadata
goes in front of the frame in data_in with ctx_in.data = its size (a multiple of 4, at most 32).
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass

from xdpoib.datapath import bpfsys

MAX_FRAME = 4096 - 256 - 320   # test_run's linear room: a page minus headroom and skb_shared_info


class XdpMd(ct.Structure):
    """struct xdp_md, the XDP context as BPF_PROG_TEST_RUN takes it."""

    _fields_ = [("data", ct.c_uint32), ("data_end", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("rx_queue_index", ct.c_uint32),
                ("egress_ifindex", ct.c_uint32)]


@dataclass(frozen=True)
class RunResult:
    """One test_run: the verdict, the frame and metadata after the program, time per repeat."""

    retval: int
    frame: bytes
    meta: bytes
    duration_ns: int


def run(prog_fd: int, frame: bytes, meta: bytes = b"", repeat: int = 1) -> RunResult:
    """Run an XDP program once (or `repeat` times) on a copy of frame; return what came out."""
    data = bytes(meta) + bytes(frame)
    din = ct.create_string_buffer(data, len(data))
    dout = ct.create_string_buffer(4096)
    cin = XdpMd(data=len(meta), data_end=len(data))
    cout = XdpMd()
    a = bpfsys.TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_size_out=len(dout),
                           data_in=ct.addressof(din), data_out=ct.addressof(dout), repeat=repeat,
                           ctx_size_in=ct.sizeof(cin), ctx_size_out=ct.sizeof(cout),
                           ctx_in=ct.addressof(cin), ctx_out=ct.addressof(cout))
    bpfsys.bpf(bpfsys.PROG_TEST_RUN, a, "prog test run")
    out = dout.raw[: a.data_size_out]
    metalen = cout.data
    return RunResult(a.retval, out[metalen:], out[:metalen], a.duration)


def run_live(prog_fd: int, frame: bytes, meta: bytes = b"", repeat: int = 1, batch_size: int = 0,
             ifindex: int = 0) -> None:
    """Run with BPF_F_TEST_XDP_LIVE_FRAMES: redirects really happen (injection); no output comes back."""
    data = bytes(meta) + bytes(frame)
    din = ct.create_string_buffer(data, len(data))
    cin = XdpMd(data=len(meta), data_end=len(data), ingress_ifindex=ifindex)
    a = bpfsys.TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_in=ct.addressof(din),
                           repeat=repeat, ctx_size_in=ct.sizeof(cin), ctx_in=ct.addressof(cin),
                           flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
    bpfsys.bpf(bpfsys.PROG_TEST_RUN, a, "prog test run (live frames)")


class LiveRun:
    """A live-frames run prepared once (input buffer and context kept), for the injection hot path."""

    def __init__(self, prog_fd: int, frame: bytes, meta: bytes = b"", ifindex: int = 0):
        data = bytes(meta) + bytes(frame)
        self._din = ct.create_string_buffer(data, len(data))
        self._cin = XdpMd(data=len(meta), data_end=len(data), ingress_ifindex=ifindex)
        self._attr = bpfsys.TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_in=ct.addressof(self._din),
                                        repeat=1, ctx_size_in=ct.sizeof(self._cin), ctx_in=ct.addressof(self._cin),
                                        flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=1)

    def run(self, count: int) -> None:
        """Run `count` frames (repeat = batch_size = count)."""
        a = self._attr
        a.repeat = a.batch_size = count
        bpfsys.bpf(bpfsys.PROG_TEST_RUN, a, "prog test run (live frames)")
