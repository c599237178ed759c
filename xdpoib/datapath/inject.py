"""Injection (fabric -> eth4): run the RX program on live frames (BPF_PROG_TEST_RUN with
BPF_F_TEST_XDP_LIVE_FRAMES), which redirects them through the devmap `xo_egress[0]` to the device
facing eth4: the internal veth end (the frame arrives on eth4) or the TAP a VM holds (the VM reads it).

Measured choice (docs/datapath.md): this path works for veth and TAP alike; AF_XDP TX with an in-band
header works for veth only, since a TAP has no XDP hook on its transmit side. Batch with `send_batch`
and keep the batch program attached to an anchor device (the pump's spare veth pair).

The slots of `xo_inject`: the first INJECT_COPY_SLOTS hold frames copied in (`add`, `add_columns`); the
rest are INJECT_RX_REGIONS regions of receive buffers (`RxRegion`): an agent claims one and its QP
receives straight into it, so `add_received` injects a received frame where the fabric put it. One call
runs the chain of the queued slots (each slot's `next`), starting at `xo_inject_idx`.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import socket
import struct

import numpy as np

from xdpoib import abi
from xdpoib.datapath import bpfsys, testrun
from xdpoib.datapath.maps import possible_cpus

# frames per live-frames call: the kernel takes up to 256, but a veth's receive ring holds 256 and the last
# (count mod 16) frames of a call may still be in it when the next call starts: a call of 256 after one
# of 17 lost one (measured, tests/bpf/test_inject.py), so a call leaves room for a bulk of 16
MAX_BATCH = 240
_DUMMY = bytes(64)  # what each live frame holds before xdpoib_rx_batch swaps its frame in


SLOT_SIZE = 24 + abi.INJECT_FRAME      # struct xdpoib_inject_slot: len, next, offset, 16-byte RX metadata, frame
SLOT_FRAME = 24                         # where the frame area starts in a slot
_SLOT_HEAD = struct.Struct("<IHH16s")
#: struct xdpoib_inject_slot as numpy sees it: the columnar path writes lengths and RX metadata of a whole
#: batch with one assignment per field
SLOT_DTYPE = np.dtype([("len", "<u4"), ("next", "<u2"), ("offset", "<u2"), ("version", "u1"), ("flags", "u1"),
                       ("pkey", "<u2"), ("peer_id", "<u4"), ("vif_id", "<u4"), ("meta_reserved", "<u4"),
                       ("frame", "u1", (abi.INJECT_FRAME,))])
assert SLOT_DTYPE.itemsize == SLOT_SIZE
MAP_BYTES = abi.INJECT_SLOTS * SLOT_SIZE


def _map_slots(map_fd: int) -> mmap.mmap:
    """The mmap of a BPF_F_MMAPABLE `xo_inject` (OSError or ValueError when it is not mmapable)."""
    return mmap.mmap(map_fd, MAP_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


class RxRegion:
    """One region of `xo_inject`'s receive slots, claimed by this process for as long as it lives (or
    until `close`): a QP's receive pool is laid over it (`pool_args`), buffer i in slot `base` + i, its GRH
    at the start of the slot's frame area and the datagram INJECT_GRH bytes in, where the RX batch
    program takes it from (`Injector.add_received`).

    A claim is an abstract unix socket named after the attachment and the region: the kernel frees it
    when the process exits, so a restarted agent and the predecessors still draining (each receiving
    into its own region until it exits) never share one. OSError when every region is taken."""

    def __init__(self, map_fd: int, aid: str) -> None:
        self._claim = None
        for k in range(abi.INJECT_RX_REGIONS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.bind(f"\0xdpoib-rx/{aid}/{k}".encode()[:107])
            except OSError:
                s.close()
                continue
            self._claim, self.region = s, k
            break
        if self._claim is None:
            raise OSError(f"all {abi.INJECT_RX_REGIONS} receive regions of the inject map are in use")
        try:
            self.mmap = _map_slots(map_fd)
        except (OSError, ValueError) as e:
            self._claim.close()
            raise OSError(f"the inject map cannot be mapped: {e}") from None
        self.base = abi.INJECT_COPY_SLOTS + self.region * abi.INJECT_RX_SLOTS
        self.count = abi.INJECT_RX_SLOTS

    def pool_args(self) -> dict:
        """`Backend.alloc_pool` keywords for a pool of `count` buffers in this region's slots."""
        return {"memory": self.mmap, "stride": SLOT_SIZE, "offset": self.base * SLOT_SIZE + SLOT_FRAME}

    def holds(self, pool) -> bool:
        """Whether `pool`'s buffers are this region's slots in this process's memory (a backend in another
        process receives into a copy of it: then frames must be copied)."""
        try:
            rows = pool.rows()
        except (AttributeError, TypeError, ValueError):
            return False
        start = ct.addressof(ct.c_char.from_buffer(self.mmap)) + self.base * SLOT_SIZE + SLOT_FRAME
        return (rows.__array_interface__["data"][0] == start and rows.shape[0] == self.count
                and rows.strides[0] == SLOT_SIZE)

    def close(self) -> None:
        """Give the region up (idempotent). The mapping stays while a pool still exports it; it goes with
        the process."""
        if self._claim is not None:
            self._claim.close()
            self._claim = None
        try:
            self.mmap.close()
        except BufferError:
            pass


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
            self._mmap = _map_slots(maps._fds["xo_inject"])
            self._mv = memoryview(self._mmap)
            self._slots = np.frombuffer(self._mmap, SLOT_DTYPE, abi.INJECT_SLOTS)
        except (OSError, ValueError, KeyError):
            self._mmap = None
        self._live = testrun.LiveRun(self._batch_fd, _DUMMY)
        self._pending = 0       # copy slots filled for the next flush
        self._received: list[np.ndarray] = []   # receive slots queued for the next flush, in order
        self._nreceived = 0
        # xo_inject_idx (per-CPU u32: the slot the first run takes) is set before each call with one
        # prepared bpf(2) update: per-CPU values are 8 bytes apart (the kernel rounds each up to 8)
        self._idx_key = ct.c_uint32(0)
        self._idx_vals = (ct.c_uint64 * possible_cpus())()
        self._idx_view = np.frombuffer(self._idx_vals, np.uint64)
        self._idx_start = 0
        self._idx_reset = bpfsys.MapElemAttr(map_fd=maps.inject_idx.fd, key=ct.addressof(self._idx_key),
                                             value=ct.addressof(self._idx_vals), flags=bpfsys.BPF_ANY)

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

    # ---- the batched path: add() frames (up to MAX_BATCH), add_received() slots, then flush()

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
            _SLOT_HEAD.pack_into(mv, off, size, n + 1, 0, meta)
            mv[off + SLOT_FRAME:off + SLOT_FRAME + size] = frame
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
            sl["next"] = np.arange(start + 1, start + k + 1)
            sl["offset"] = 0
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

    def add_received(self, slots: np.ndarray, lengths: np.ndarray, peer_ids: np.ndarray, flags: np.ndarray,
                     vif_id: int, pkey: int) -> None:
        """Queue frames a QP received into receive slots (`RxRegion`): frame i lies INJECT_GRH bytes into
        the frame area of slot `slots[i]`, `lengths[i]` bytes (each <= INJECT_MAX). Their lengths and RX
        metadata are written with one assignment per field; the frames stay where they are. Injected in
        this order by the next `flush`, after the copied ones."""
        sl = self._slots
        sl["len"][slots] = lengths
        sl["offset"][slots] = abi.INJECT_GRH
        sl["version"][slots] = abi.META_VERSION
        sl["flags"][slots] = flags
        sl["pkey"][slots] = pkey
        sl["peer_id"][slots] = peer_ids
        sl["vif_id"][slots] = vif_id
        sl["meta_reserved"][slots] = 0
        self._received.append(slots)
        self._nreceived += len(slots)

    def _start_at(self, slot: int) -> None:
        """The first run of the next call takes `slot` (one prepared bpf(2) update)."""
        if slot != self._idx_start:
            self._idx_view[:] = slot
            self._idx_start = slot
        bpfsys.bpf(bpfsys.MAP_UPDATE_ELEM, self._idx_reset, "map update (xo_inject_idx)")

    def flush(self) -> int:
        """Inject every queued frame, the copied ones first, with one live-frames call (more when they are
        more than MAX_BATCH together); returns how many went."""
        n, r = self._pending, self._nreceived
        if not n and not r:
            return 0
        self._pending = 0
        if n and self._mv is None:
            slots = b"".join(_SLOT_HEAD.pack(len(fr), i + 1, 0, meta.ljust(16, b"\0")[:16])
                             + fr.ljust(abi.INJECT_FRAME, b"\0") for i, (fr, meta) in enumerate(self._fallback))
            self._maps.inject.update_batch_raw(struct.pack(f"<{n}I", *range(n)), slots)
            self._fallback = []
        calls = []                              # (first slot, runs) per live-frames call
        if r:
            chain = self._received[0] if len(self._received) == 1 else np.concatenate(self._received)
            self._received, self._nreceived = [], 0
            self._slots["next"][chain[:-1]] = chain[1:]
            if n and n + r <= MAX_BATCH:
                self._slots["next"][n - 1] = chain[0]
                calls.append((0, n + r))
            else:
                if n:
                    calls.append((0, n))
                calls += [(int(chain[i]), min(MAX_BATCH, r - i)) for i in range(0, r, MAX_BATCH)]
        else:
            calls.append((0, n))
        for first, runs in calls:
            self._start_at(first)
            self._live.run(runs)
        return n + r

    def send_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        """Inject up to MAX_BATCH (IPoIB frame, RX metadata) pairs with one live-frames call."""
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
