"""Injection (fabric -> eth4): run the RX program on live frames (BPF_PROG_TEST_RUN with
BPF_F_TEST_XDP_LIVE_FRAMES), which redirects them through the devmap `xo_egress[0]` to the device
facing eth4: the internal veth end (the frame arrives on eth4) or the TAP a VM holds (the VM reads it).

Measured choice (docs/datapath.md): this path works for veth and TAP alike; AF_XDP TX with an in-band
header works for veth only, since a TAP has no XDP hook on its transmit side. Batch with `send_batch`
and keep the batch program attached to an anchor device (`attach_anchor`).
"""

from __future__ import annotations

import struct

from xdpoib import abi
from xdpoib.datapath import testrun

MAX_BATCH = 256     # the kernel's limit for live-frames batch_size
_DUMMY = bytes(64)  # what each live frame holds before xdpoib_rx_batch swaps its frame in


class Injector:
    """Hands IPoIB frames (with their RX metadata) to the RX program for delivery to eth4."""

    def __init__(self, datapath, maps, egress_ifindex: int):
        self._fd = datapath.fd("xdpoib_rx")
        self._batch_fd = datapath.fd("xdpoib_rx_batch")
        self._maps = maps
        maps.egress.set(0, egress_ifindex)

    def send(self, frame: bytes, peer_id: int, vif_id: int, pkey: int, multicast: bool = False) -> None:
        """Inject one IPoIB frame received from the fabric."""
        testrun.run_live(self._fd, frame, abi.rx_meta(peer_id, vif_id, pkey, multicast=multicast))

    def send_ethernet(self, frame: bytes, peer_id: int, vif_id: int, pkey: int) -> None:
        """Inject a frame the agent already built as Ethernet (a rewritten control frame)."""
        testrun.run_live(self._fd, frame, abi.rx_meta(peer_id, vif_id, pkey, ethernet=True))

    def send_repeated(self, frame: bytes, meta: bytes, count: int) -> None:
        """Inject the same frame `count` (<= 256) times in one call (benchmarks). repeat never exceeds
        batch_size: the kernel recycles pages after a batch without resetting them, and the RX
        program rewrites frames in place."""
        if not 1 <= count <= MAX_BATCH:
            raise ValueError(f"count must be 1..{MAX_BATCH}")
        testrun.run_live(self._fd, frame, meta, repeat=count, batch_size=count)

    def send_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        """Inject up to 256 (IPoIB frame, RX metadata) pairs with one live-frames call: the frames go
        into xo_inject with one batched map update and xdpoib_rx_batch swaps each in."""
        n = len(items)
        if not 1 <= n <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} frames")
        slots = b"".join(struct.pack("<II", len(fr), 0) + meta.ljust(16, b"\0")[:16] + fr.ljust(4096, b"\0")
                         for fr, meta in items)
        self._maps.inject.update_batch_raw(struct.pack(f"<{n}I", *range(n)), slots)
        self._maps.inject_idx.set(0, 0)
        testrun.run_live(self._batch_fd, _DUMMY, b"", repeat=n, batch_size=n)


def attach_anchor(datapath, ifname: str) -> None:
    """Attach xdpoib_rx_batch natively to a spare veth end (the anchor). A live-frames call on a program
    that is not attached anywhere pays ~24 ms for the XDP dispatcher update (measured: batches of 64
    reach 2 kpps without an anchor, ~370-520 kpps with one). The anchor carries no traffic."""
    from bcc import BPF

    BPF.attach_xdp(ifname.encode(), datapath._progs["xdpoib_rx_batch"], 0)


def detach_anchor(ifname: str) -> None:
    """Remove the anchor program (deleting the veth pair does it too)."""
    from bcc import BPF

    BPF.remove_xdp(ifname.encode(), 0)
