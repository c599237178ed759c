"""The plain redirect datapath: every frame on the internal end goes, untouched, to the agent's
AF_XDP socket, and the agent translates with the oracle in Python.

This is the fallback the agent uses where the translating programs (`bpf/xdpoib.c`) are not loaded:
correct by construction (it *is* the oracle), slower (the translation runs in Python).
"""

from __future__ import annotations

import ctypes

from xdpoib.datapath.loader import BpfLoadError
from xdpoib.errors import PrerequisiteError

PROGRAM = rb"""
BPF_XSKMAP(xo_plain_xsks, 64);
BPF_PERCPU_ARRAY(xo_plain_cnt, u64, 2);

int xdpoib_plain(struct xdp_md *ctx) {
    int slot = 0;
    u64 *n = xo_plain_cnt.lookup(&slot);
    if (n)
        *n += 1;
    int rc = xo_plain_xsks.redirect_map(ctx->rx_queue_index, XDP_DROP);
    if (rc != XDP_REDIRECT) {
        slot = 1;
        n = xo_plain_cnt.lookup(&slot);
        if (n)
            *n += 1;
    }
    return rc;
}
"""


class RedirectDatapath:
    """Attach the redirect program to `ifname` and bind AF_XDP sockets to it via `add_socket`."""

    def __init__(self, ifname: str):
        try:
            from bcc import BPF
        except ImportError as e:
            raise PrerequisiteError("bcc is not importable (Debian python3-bpfcc; see make setup)") from e
        self.ifname = ifname
        try:
            self.bpf = BPF(text=PROGRAM)
            fn = self.bpf.load_func(b"xdpoib_plain", BPF.XDP)
            self.bpf.attach_xdp(ifname.encode(), fn, 0)
        except Exception as e:
            raise BpfLoadError(f"cannot attach the redirect program to {ifname}: {str(e).splitlines()[0]}") from e
        self._attached = True

    def add_socket(self, queue: int, fd: int) -> None:
        """Send the frames of one RX queue to an AF_XDP socket."""
        self.bpf[b"xo_plain_xsks"][ctypes.c_int(queue)] = ctypes.c_int(fd)

    def counters(self) -> dict[str, int]:
        """Frames seen and frames the socket did not take (no socket, ring full)."""
        t = self.bpf[b"xo_plain_cnt"]
        vals = [sum(int(v) for v in t.getvalue(ctypes.c_int(i))) for i in range(2)]
        return {"packets": vals[0], "redirect_failed": vals[1]}

    def close(self) -> None:
        """Detach and unload (idempotent)."""
        if self._attached:
            try:
                self.bpf.remove_xdp(self.ifname.encode(), 0)
            except Exception:
                pass    # the link may be gone already (veth deleted)
            self._attached = False
            self.bpf.cleanup()
