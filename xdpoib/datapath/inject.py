"""Injection (fabric -> eth4): run the RX program on live frames (BPF_PROG_TEST_RUN with
BPF_F_TEST_XDP_LIVE_FRAMES), which redirects them through the devmap `xo_egress[0]` to the device
facing eth4: the internal veth end (the frame arrives on eth4) or the TAP a VM holds (the VM reads it).

Measured choice (docs/datapath.md): this path works for veth and TAP alike; AF_XDP TX with an in-band
header works for veth only, since a TAP has no XDP hook on its transmit side. Batch with `send_batch`
and keep the batch program attached to an anchor device (the pump's spare veth pair).
"""

from __future__ import annotations

import ctypes as ct
import mmap
import struct

import numpy as np

from xdpoib import abi
from xdpoib.datapath import bpfsys, testrun
from xdpoib.datapath.maps import possible_cpus

MAX_BATCH = 256     # the kernel's limit for live-frames batch_size
_DUMMY = bytes(64)  # what each live frame holds before xdpoib_rx_batch swaps its frame in


SLOT_SIZE = 24 + 4096   # struct xdpoib_inject_slot: len, reserved, 16-byte RX metadata, frame
_SLOT_HEAD = struct.Struct("<II16s")
#: struct xdpoib_inject_slot as numpy sees it: the columnar path writes lengths and RX metadata of a whole
#: batch with one assignment per field
SLOT_DTYPE = np.dtype([("len", "<u4"), ("reserved", "<u4"), ("version", "u1"), ("flags", "u1"), ("pkey", "<u2"),
                       ("peer_id", "<u4"), ("vif_id", "<u4"), ("meta_reserved", "<u4"), ("frame", "u1", (4096,))])
assert SLOT_DTYPE.itemsize == SLOT_SIZE


class Injector:
    """Hands IPoIB frames (with their RX metadata) to the RX program for delivery to eth4.

    The batched path writes frames straight into the mmap of `xo_inject` (a BPF_F_MMAPABLE array),
    then makes one live-frames call: no map-update syscall, no per-frame buffer building. A datapath
    pinned by an older build without the mmapable flag falls back to one batched map update.
    """

    def __init__(self, datapath, maps, egress_ifindex: int):
        self._fd = datapath.fd("xdpoib_rx")
        self._batch_fd = datapath.fd("xdpoib_rx_batch")
        self._maps = maps
        maps.egress.set(0, egress_ifindex)
        self._mmap = None
        self._mv = None
        try:
            self._mmap = mmap.mmap(maps._fds["xo_inject"], MAX_BATCH * SLOT_SIZE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
            self._mv = memoryview(self._mmap)
            self._slots = np.frombuffer(self._mmap, SLOT_DTYPE, MAX_BATCH)
        except (OSError, ValueError, KeyError):
            self._mmap = None
        self._live = testrun.LiveRun(self._batch_fd, _DUMMY)
        self._pending = 0       # slots filled for the next flush
        # xo_inject_idx (per-CPU u32: the slot the next run takes) is zeroed before each call with one
        # prepared bpf(2) update: per-CPU values are 8 bytes apart (the kernel rounds each up to 8)
        self._idx_key = ct.c_uint32(0)
        self._idx_zero = (ct.c_uint64 * possible_cpus())()
        self._idx_reset = bpfsys.MapElemAttr(map_fd=maps.inject_idx.fd, key=ct.addressof(self._idx_key),
                                             value=ct.addressof(self._idx_zero), flags=bpfsys.BPF_ANY)

    @property
    def mmapped(self) -> bool:
        """Whether frames are written into the map's memory directly."""
        return self._mv is not None

    def send(self, frame: bytes, peer_id: int, vif_id: int, pkey: int, multicast: bool = False) -> None:
        """Inject one IPoIB frame received from the fabric."""
        testrun.run_live(self._fd, frame, abi.rx_meta(peer_id, vif_id, pkey, multicast=multicast))

    def send_repeated(self, frame: bytes, meta: bytes, count: int) -> None:
        """Inject the same frame `count` (<= 256) times in one call (benchmarks). repeat never exceeds
        batch_size: the kernel recycles pages after a batch without resetting them, and the RX
        program rewrites frames in place."""
        if not 1 <= count <= MAX_BATCH:
            raise ValueError(f"count must be 1..{MAX_BATCH}")
        testrun.run_live(self._fd, frame, meta, repeat=count, batch_size=count)

    # ---- the batched path: add() frames (up to 256), then flush()

    def add(self, frame, meta: bytes) -> bool:
        """Queue one frame (bytes or a memoryview; copied now) with its 16-byte RX metadata; False when
        the batch is full (flush first) or the frame cannot be injected."""
        n = self._pending
        size = len(frame)
        if n >= MAX_BATCH or size > abi.INJECT_MAX:
            return False
        mv = self._mv
        if mv is not None:
            off = n * SLOT_SIZE
            _SLOT_HEAD.pack_into(mv, off, size, 0, meta)
            mv[off + 24:off + 24 + size] = frame
        else:
            if n == 0:
                self._fallback = []
            self._fallback.append((bytes(frame), meta))
        self._pending = n + 1
        return True

    def add_columns(self, rows: np.ndarray, idx: np.ndarray, lengths: np.ndarray, peer_ids: np.ndarray,
                    flags: np.ndarray, vif_id: int, pkey: int, offset: int) -> None:
        """Queue frames that lie in `rows` (a (count, stride) uint8 array: frame i is row idx[i] from
        column `offset`, lengths[i] bytes) with their RX metadata, as columns: a few array assignments
        per batch whatever its size (flushing when the slots fill). Needs the mmapped slots; every
        length must be <= INJECT_MAX."""
        n, i = len(idx), 0
        while i < n:
            if self._pending >= MAX_BATCH:
                self.flush()
            start = self._pending
            k = min(n - i, MAX_BATCH - start)
            sl = self._slots[start:start + k]
            part = slice(i, i + k)
            ln = lengths[part]
            sl["len"] = ln
            sl["reserved"] = 0
            sl["version"] = abi.META_VERSION
            sl["flags"] = flags[part]
            sl["pkey"] = pkey
            sl["peer_id"] = peer_ids[part]
            sl["vif_id"] = vif_id
            sl["meta_reserved"] = 0
            w = int(ln.max())
            sl["frame"][:, :w] = rows[idx[part], offset:offset + w]
            self._pending = start + k
            i += k

    def flush(self) -> int:
        """Inject every queued frame with one live-frames call; returns how many went."""
        n = self._pending
        if not n:
            return 0
        self._pending = 0
        if self._mv is None:
            slots = b"".join(struct.pack("<II", len(fr), 0) + meta.ljust(16, b"\0")[:16] + fr.ljust(4096, b"\0")
                             for fr, meta in self._fallback)
            self._maps.inject.update_batch_raw(struct.pack(f"<{n}I", *range(n)), slots)
            self._fallback = []
        bpfsys.bpf(bpfsys.MAP_UPDATE_ELEM, self._idx_reset, "map update (xo_inject_idx)")
        self._live.run(n)
        return n

    def send_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        """Inject up to 256 (IPoIB frame, RX metadata) pairs with one live-frames call."""
        if not 1 <= len(items) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} frames")
        for fr, meta in items:
            if not self.add(fr, meta):
                raise ValueError(f"frame of {len(fr)} bytes cannot be injected")
        self.flush()

    def close(self) -> None:
        """Unmap the slots (idempotent)."""
        self._slots = None
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
