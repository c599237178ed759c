"""The fabric backend contract: what the agent needs from a UD data plane.

Two backends implement it: `sim` (`xdpoib/fabric/simud.py`, datagrams between processes on one machine,
with IB's rules) and `verbs` (`xdpoib/fabric/verbs.py`, pyverbs on an HCA or Soft-RoCE). One contract
test suite (`tests/contract/contract_suite.py`) runs against both.

The model is a small subset of verbs:

- `Backend` is one opened HCA port: `port()` re-reads its `PortAttrs`, `events` queues its async
  `PortEvent`s behind a selectable file descriptor, `counters()` reports every drop it saw. A port's
  `pkey_index(pkey)` (here and on the SA's `LocalPort`) raises PortError for a P_Key its table lacks,
  never returns None; `has_pkey(pkey)` asks.
- `Backend.create_qp(pkey, qkey, recv_pool)` makes one UD QP bound to one P_Key (docs/design.md §1: one QP per
  (VIF, P_Key)). `Backend.alloc_pool(count, size)` makes the registered receive buffers it fills.
- `Backend.create_ah(path)` turns a `Path` (from a PathRecord, or a multicast group) into an
  `AddressHandle`.
- `UdQp.post_send` takes a batch of `SendRequest`s; `UdQp.post_recv` hands buffers (by index in the
  QP's pool) to the receive queue; `UdQp.poll` returns receive `Completion`s. Send completions are reaped
  by the backend itself: a UD send that the fabric loses still completes successfully on hardware, so
  the caller learns nothing from them.
- Receive buffers follow verbs' UD layout: the first `GRH_LEN` (40) bytes of each buffer are reserved for
  a GRH, the payload follows. `Completion.payload` is already past that area and `byte_len` never counts
  it, on every backend. Size buffers for GRH_LEN + the port's active MTU: a longer datagram completes
  in error (LOC_LEN_ERR; rxe says LOC_QP_OP_ERR) and moves the QP to the error state, as hardware does,
  after which every posted buffer completes with WR_FLUSH_ERR and the QP must be recreated.

Sends without copies (`SendMemory`): `Backend.register_send_memory(memory, count, size)` makes caller memory
(the AF_XDP UMEM: `count` frames of `size` bytes) something QPs can send from, and
`UdQp.post_send_memory(ah, qpn, qkey, memory, frames)` posts frames given as (offset, length) in it. Every
accepted frame belongs to the backend until `SendMemory.completed()` hands its offset back, exactly once,
after its send completed (or was dropped: oversize, QP in error, QP closed); the caller must not reuse
it before. A backend that cannot send from caller memory (sim) copies at post time and hands the frames
back at once; `SendMemory.zero_copy` says which, `SendMemory.copies` counts the frames it had to copy,
and `UdQp.payload_copies` how often `post_send`/`post_send_to` copy each payload (once, on both backends).

Columnar batches (the data plane's hot path; docs/datapath.md): `UdQp.poll_batch(max_entries)` returns a
`RecvBatch`, receive completions as numpy columns (status, byte length, source QPN, SLID, SL, GRH flag,
buffer index, the SGIDs of GRH completions), never one object per completion; `UdQp.post_send_batch(ah,
qpn, qkey, memory, offsets, lengths)` sends frames of a `SendMemory` given as two arrays, with
`post_send_memory`'s rules, and `SendMemory.completed_offsets()` hands accepted frames back as an array.
The defaults here build them from `poll` and `post_send_memory`; both backends override them.
A pool may also lie in caller memory (`Backend.alloc_pool(..., memory=, stride=)`): buffer i at
i * stride, e.g. the agent's inject slots, so a received frame is injected where the fabric put it.

Integers are host-order Python ints; GIDs are 16 `bytes` in network order (helpers `gid_bytes` and
`gid_str` convert). Everything here is plain data or small concrete helpers, so a backend only has to
implement the abstract methods.
"""

from __future__ import annotations

import ipaddress
import os
import select
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum

import numpy as np

from xdpoib.errors import AddressError, XdpoibError

GRH_LEN = 40                  # bytes a UD receive buffer reserves for the GRH
MCAST_QPN = 0xFFFFFF          # destination QPN of every multicast send
MCAST_LID_MIN = 0xC000        # LIDs from here up are multicast LIDs
DEFAULT_PKEY = 0xFFFF         # the default partition, full member
PKEY_FULL = 0x8000            # membership bit of a P_Key: set = full member, clear = limited


# ---------------------------------------------------------------- errors

class FabricError(XdpoibError):
    """A fabric backend operation failed (the message says which one and why)."""


class BackendClosedError(FabricError):
    """The backend, QP or queue was used after `close()`."""


class PortError(FabricError):
    """The port cannot be opened or read, or does not have what the request needs (a P_Key, a GID)."""


class QpError(FabricError):
    """A QP could not be created, or a request on it is malformed (bad AH, buffer index, MGID)."""


# ---------------------------------------------------------------- small conversions

def gid_bytes(gid: str | bytes | ipaddress.IPv6Address) -> bytes:
    """A GID as 16 bytes, from text (`fe80::1`), an IPv6Address or 16 bytes."""
    if isinstance(gid, bytes | bytearray | memoryview):
        raw = bytes(gid)
        if len(raw) != 16:
            raise PortError(f"GID must be 16 bytes, got {len(raw)}")
        return raw
    try:
        return ipaddress.IPv6Address(gid).packed
    except ValueError as exc:
        raise PortError(f"bad GID {gid!r}: {exc}") from None


def gid_str(gid: bytes) -> str:
    """A 16-byte GID as people read it: compressed IPv6 text, as saquery and `ip` print it
    (`fe80::f452:1403:8d:5211`). The one GID text form of xdpoib's output (status, logs, errors,
    JSON values); `xdpoib.wire.addr` re-exports it. Read back with `gid_bytes` or `parse_gid`."""
    raw = bytes(gid)
    if len(raw) != 16:
        raise AddressError(f"a GID is 16 bytes, got {len(raw)}")
    return str(ipaddress.IPv6Address(raw))


def pkey_index(pkeys: Sequence[int], pkey: int) -> int:
    """Index of `pkey` in a P_Key table; the one contract of every port's `pkey_index`.

    Entries match on the low 15 bits (the membership bit ignored; an empty 0 slot never matches) and
    a full-member entry wins over a limited one. A P_Key the table lacks raises PortError, naming the
    table (never None: the default P_Key's index is 0, falsy). Ask `has_pkey` whether it is there.
    """
    found = [i for i, p in enumerate(pkeys) if (p & 0x7FFF) == (pkey & 0x7FFF) and p & 0x7FFF]
    if not found:
        table = ", ".join(f"{p:#06x}" for p in pkeys if p & 0x7FFF) or "empty"
        raise PortError(f"the port is not a member of partition {pkey:#06x} (its P_Key table: {table})")
    full = [i for i in found if pkeys[i] & PKEY_FULL]
    return (full or found)[0]


def has_pkey(pkeys: Sequence[int], pkey: int) -> bool:
    """Whether a P_Key table holds `pkey` (membership bit ignored), as `pkey_index` would find it."""
    return any((p & 0x7FFF) == (pkey & 0x7FFF) and p & 0x7FFF for p in pkeys)


_NO_OFFSETS = np.zeros(0, np.int64)
_MTU_ENUM = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}


def mtu_bytes(enum: int) -> int:
    """IB MTU enum (1..5, as in PortInfo and PathRecord) to bytes (256..4096)."""
    for size, value in _MTU_ENUM.items():
        if value == enum:
            return size
    raise PortError(f"bad IB MTU enum {enum}")


def mtu_enum(size: int) -> int:
    """IB MTU in bytes (256..4096) to its enum (1..5)."""
    try:
        return _MTU_ENUM[size]
    except KeyError:
        raise PortError(f"bad IB MTU {size} (one of 256, 512, 1024, 2048, 4096)") from None


def pkey_matches(a: int, b: int) -> bool:
    """IB P_Key match: same low 15 bits and at least one of the two is a full member."""
    return (a & 0x7FFF) == (b & 0x7FFF) and bool((a | b) & PKEY_FULL) and (a & 0x7FFF) != 0


# ---------------------------------------------------------------- port

class LinkLayer(Enum):
    """What the port runs on: InfiniBand (LIDs, SA) or Ethernet (RoCE: GRH always, no LIDs)."""

    INFINIBAND = "ib"
    ETHERNET = "eth"


class PortState(IntEnum):
    """Logical port state, numbered as in PortInfo and `ibv_port_state`."""

    NOP = 0
    DOWN = 1
    INIT = 2
    ARMED = 3
    ACTIVE = 4


@dataclass(frozen=True)
class PortAttrs:
    """One port, as read now. `gids[0]` is the port's own GID (subnet prefix + port GUID)."""

    lid: int
    sm_lid: int
    state: PortState
    active_mtu: int              # bytes
    port_guid: int
    gids: tuple[bytes, ...]      # GID table, 16 bytes each; index = sgid_index
    pkeys: tuple[int, ...]       # P_Key table; index = pkey_index (0 entries are empty slots)
    link_layer: LinkLayer = LinkLayer.INFINIBAND

    @property
    def gid(self) -> bytes:
        """The port's own GID (table index 0)."""
        return self.gids[0]

    def pkey_index(self, pkey: int) -> int:
        """Index of `pkey` in the P_Key table (a full entry wins); PortError if absent (`pkey_index`)."""
        return pkey_index(self.pkeys, pkey)

    def has_pkey(self, pkey: int) -> bool:
        """Whether the P_Key table holds `pkey` (membership bit ignored)."""
        return has_pkey(self.pkeys, pkey)


class PortEventKind(Enum):
    """Async port events, as `ibv_get_async_event` reports them."""

    PORT_ACTIVE = "port_active"
    PORT_ERR = "port_err"
    LID_CHANGE = "lid_change"
    CLIENT_REREGISTER = "client_reregister"
    PKEY_CHANGE = "pkey_change"


@dataclass(frozen=True)
class PortEvent:
    """One async event; `attrs` is the port as read right after it (None if it could not be read)."""

    kind: PortEventKind
    attrs: PortAttrs | None = None


class EventQueue:
    """A thread-safe queue of `PortEvent`s with a file descriptor that is readable while it is not empty.

    Backends `put()` events (from any thread); the agent `select()`s on `fileno()` and drains with
    `get()`. Shared by both backends so the semantics are the same.
    """

    def __init__(self) -> None:
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._events: deque[PortEvent] = deque()
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        """The descriptor to select on: readable while events are queued."""
        if self._closed:
            raise BackendClosedError("event queue is closed")
        return self._rfd

    def put(self, event: PortEvent) -> None:
        """Queue one event (ignored after close)."""
        with self._lock:
            if self._closed:
                return
            self._events.append(event)
            os.write(self._wfd, b"\0")

    def get(self, max_events: int | None = None) -> list[PortEvent]:
        """Take up to `max_events` queued events (all if None) without blocking; [] when empty."""
        with self._lock:
            if self._closed:
                raise BackendClosedError("event queue is closed")
            out = []
            while self._events and (max_events is None or len(out) < max_events):
                out.append(self._events.popleft())
            if out:
                try:
                    os.read(self._rfd, len(out))
                except BlockingIOError:
                    pass
            return out

    def wait(self, timeout: float) -> list[PortEvent]:
        """Block up to `timeout` seconds for at least one event, then drain; [] on timeout."""
        select.select([self.fileno()], [], [], timeout)
        return self.get()

    def close(self) -> None:
        """Drop queued events and close the descriptors; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._events.clear()
            os.close(self._rfd)
            os.close(self._wfd)


# ---------------------------------------------------------------- addressing and data

@dataclass(frozen=True)
class Path:
    """Where a send goes: the address vector of an AH plus the path MTU the sender must respect.

    Unicast inside an IB subnet: `dlid`, no GRH (Linux ipoib sends none, docs/design.md §3.11). Multicast: `dlid`
    is the MLID, `dgid` the MGID and `grh` True. RoCE: `grh` always True, `dgid` required, `dlid` 0.
    """

    dlid: int
    sl: int = 0
    mtu: int = 2048                 # path MTU in bytes; larger payloads are dropped and counted
    dgid: bytes | None = None       # 16 bytes; required when grh is True
    grh: bool = False
    sgid_index: int = 0
    hop_limit: int = 1
    traffic_class: int = 0
    flow_label: int = 0

    @property
    def multicast(self) -> bool:
        """True for a multicast destination (multicast LID, or an MGID)."""
        return self.dlid >= MCAST_LID_MIN or (self.dgid is not None and self.dgid[0] == 0xFF)

    def check(self) -> None:
        """Raise QpError if the fields contradict each other (GRH without DGID, bad MTU, bad DGID)."""
        mtu_enum(self.mtu)
        if self.grh and self.dgid is None:
            raise QpError("a path with a GRH needs a DGID")
        if self.dgid is not None and len(self.dgid) != 16:
            raise QpError(f"DGID must be 16 bytes, got {len(self.dgid)}")
        if self.multicast and not (self.grh and self.dgid is not None and self.dgid[0] == 0xFF):
            raise QpError("a multicast path needs a GRH and an MGID as DGID")
        if not 0 <= self.dlid <= 0xFFFF or not 0 <= self.sl <= 15:
            raise QpError(f"bad DLID {self.dlid} or SL {self.sl}")


class AddressHandle:
    """An address handle made by `Backend.create_ah`; backends may subclass it to hold their own AH."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


@dataclass(frozen=True)
class SendRequest:
    """One datagram to send: `payload` is the IPoIB frame (4-byte header + data), copied at post time."""

    ah: AddressHandle
    remote_qpn: int
    remote_qkey: int
    payload: bytes | bytearray | memoryview


class CompletionStatus(IntEnum):
    """Work completion status, numbered as `ibv_wc_status` (the ones a UD receive can see)."""

    SUCCESS = 0
    LOC_LEN_ERR = 1          # payload longer than the receive buffer
    LOC_QP_OP_ERR = 2
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5         # QP moved to error/closed with the buffer still posted
    GENERAL_ERR = 21


@dataclass(slots=True)
class Completion:
    """One receive completion (read-only by convention: not frozen, which costs 1 us per packet).

    `payload` views the receive buffer past the GRH area. `sgid` is set exactly when `has_grh` is.
    `index` is the receive buffer's index in the QP's pool: the caller re-posts it with `post_recv`
    once it is done with `payload`.
    """

    status: CompletionStatus
    byte_len: int            # payload bytes, GRH excluded
    src_qp: int
    slid: int
    sgid: bytes | None
    has_grh: bool
    pkey_index: int
    index: int = -1
    payload: memoryview | bytes = field(default=b"", repr=False, compare=False)
    sl: int = 0              # the service level it arrived on (the reverse path's, with `slid`)


class RecvBatch:
    """Receive completions as columns: one numpy array per field, all of one length (`UdQp.poll_batch`).

    status (uint8, `CompletionStatus`), byte_len (uint32, GRH excluded), src_qp (uint32), slid (uint16),
    sl (uint8), grh (bool), index (int32: the receive buffer, payload at `GRH_LEN` in it), sgid (n x 16
    uint8; zero rows where there is no GRH), pkey_index (one int: a batch comes from one QP). Rows are in
    completion order. `completion(i, pool)` is the object form of one row, for the slow path.
    """

    __slots__ = ("byte_len", "grh", "index", "pkey_index", "sgid", "sl", "slid", "src_qp", "status")

    def __init__(self, status, byte_len, src_qp, slid, sl, grh, index, sgid, pkey_index: int = 0) -> None:
        self.status, self.byte_len, self.src_qp = status, byte_len, src_qp
        self.slid, self.sl, self.grh, self.index, self.sgid = slid, sl, grh, index, sgid
        self.pkey_index = pkey_index

    def __len__(self) -> int:
        return len(self.status)

    @classmethod
    def empty(cls, pkey_index: int = 0) -> RecvBatch:
        return cls.of_length(0, pkey_index)

    @classmethod
    def of_length(cls, n: int, pkey_index: int = 0) -> RecvBatch:
        """A zeroed batch of n rows (backends fill it)."""
        return cls(np.zeros(n, np.uint8), np.zeros(n, np.uint32), np.zeros(n, np.uint32), np.zeros(n, np.uint16),
                   np.zeros(n, np.uint8), np.zeros(n, bool), np.zeros(n, np.int32), np.zeros((n, 16), np.uint8),
                   pkey_index)

    @classmethod
    def from_completions(cls, comps: Sequence[Completion], pkey_index: int | None = None) -> RecvBatch:
        """The columns of completion objects (the default `poll_batch`)."""
        n = len(comps)
        b = cls.of_length(n, comps[0].pkey_index if n and pkey_index is None else pkey_index or 0)
        if n:
            b.status[:] = [int(c.status) for c in comps]
            b.byte_len[:] = [c.byte_len for c in comps]
            b.src_qp[:] = [c.src_qp for c in comps]
            b.slid[:] = [c.slid for c in comps]
            b.sl[:] = [c.sl for c in comps]
            b.grh[:] = [c.has_grh for c in comps]
            b.index[:] = [c.index for c in comps]
            for i, c in enumerate(comps):
                if c.has_grh and c.sgid is not None:
                    b.sgid[i] = np.frombuffer(bytes(c.sgid), np.uint8)
        return b

    @classmethod
    def concat(cls, parts: Sequence[RecvBatch]) -> RecvBatch:
        """One batch of several, in order."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("status", "byte_len", "src_qp", "slid", "sl", "grh", "index", "sgid")),
                   parts[0].pkey_index)

    def take(self, rows) -> RecvBatch:
        """The rows selected by a boolean mask or an index array."""
        return RecvBatch(self.status[rows], self.byte_len[rows], self.src_qp[rows], self.slid[rows], self.sl[rows],
                         self.grh[rows], self.index[rows], self.sgid[rows], self.pkey_index)

    def completion(self, i: int, pool: BufferPool | None = None) -> Completion:
        """Row i as a `Completion` (payload viewed in `pool` when given)."""
        grh = bool(self.grh[i])
        n = int(self.byte_len[i])
        index = int(self.index[i])
        payload = b""
        if pool is not None and self.status[i] == 0 and index >= 0:
            payload = pool.view(index)[GRH_LEN:GRH_LEN + n]
        return Completion(CompletionStatus(int(self.status[i])), n, int(self.src_qp[i]), int(self.slid[i]),
                          self.sgid[i].tobytes() if grh else None, grh, self.pkey_index, index, payload,
                          int(self.sl[i]))

    def completions(self, pool: BufferPool | None = None) -> list[Completion]:
        """Every row as a `Completion`."""
        return [self.completion(i, pool) for i in range(len(self))]


def pool_extent(count: int, size: int, stride: int) -> int:
    """Bytes a pool of `count` buffers of `size`, `stride` apart, spans: the last buffer ends the pool,
    not its stride (a pool laid over caller memory may end where that memory does)."""
    return (count - 1) * stride + size


def pool_in(mv: memoryview, count: int, size: int, stride: int, offset: int) -> memoryview:
    """The part of caller memory `mv` (bytes) a pool laid over it spans from `offset` (every backend's
    check of caller memory); QpError when it is read-only or too short."""
    extent = pool_extent(count, size, stride)
    if mv.readonly or mv.nbytes < offset + extent:
        raise QpError(f"pool memory must be writable and hold {count} buffers of {size} bytes, "
                      f"{stride} bytes apart from offset {offset} ({offset + extent} bytes; it has {mv.nbytes})")
    return mv[offset:offset + extent]


class BufferPool(ABC):
    """`count` registered buffers of `size` bytes each, addressed by index; buffer i starts at i * `stride`
    (`stride` >= `size`; equal unless the pool lies in caller memory with its own layout)."""

    count: int
    size: int
    stride: int = 0

    @abstractmethod
    def view(self, index: int) -> memoryview:
        """A writable view of buffer `index` (its full `size` bytes)."""

    def rows(self) -> np.ndarray:
        """The pool as a (count, size) uint8 array whose rows are `stride` bytes apart: buffer i is row i."""
        arr = getattr(self, "_rows", None)
        if arr is None:
            arr = self._rows = np.ndarray((self.count, self.size), np.uint8, self.memory,
                                          strides=(self.stride or self.size, 1))
        return arr


class MemoryPool(BufferPool):
    """A BufferPool over one anonymous bytearray, or over caller memory (`memory`, buffer i at i * `stride`
    + `offset`): enough for backends that copy (sim)."""

    def __init__(self, count: int, size: int, memory=None, stride: int | None = None, offset: int = 0) -> None:
        stride = size if stride is None else stride
        if count <= 0 or size <= GRH_LEN or stride < size or offset < 0:
            raise QpError(f"buffer pool needs count > 0, size > {GRH_LEN} and stride >= size "
                          f"(got {count} x {size}, stride {stride})")
        self.count, self.size, self.stride = count, size, stride
        if memory is None:
            self.memory = memoryview(bytearray(count * stride))   # buffer i at [i * stride, i * stride + size)
        else:
            self.memory = pool_in(memoryview(memory).cast("B"), count, size, stride, offset)

    def view(self, index: int) -> memoryview:
        """A writable view of buffer `index`."""
        if not 0 <= index < self.count:
            raise QpError(f"buffer index {index} outside pool of {self.count}")
        start = index * self.stride
        return self.memory[start:start + self.size]


class SendMemory(BufferPool):
    """Caller memory QPs send from (`Backend.register_send_memory`; the module doc has the rules).

    This base class is the copying implementation: `UdQp.post_send_memory` copies each frame out at post
    time and its offset is completed at once. `view(i)` is frame i (`size` bytes at i * size); frames
    are posted by (offset, length) anywhere in the memory. `write` fills memory from the caller's side
    (for callers whose data is not already there, and for backends living in another process).
    """

    zero_copy = False

    def __init__(self, memory, count: int, size: int) -> None:
        mv = memoryview(memory)
        if mv.readonly or mv.nbytes < count * size or count <= 0 or size <= 0:
            raise QpError(f"send memory must be writable and hold {count} x {size} bytes")
        self.count, self.size = count, size
        self.memory = mv.cast("B")
        self.copies = 0             # frames posted from here that had to be copied
        self.in_flight = 0          # frames accepted whose offsets `completed` has not returned yet
        self._done: list[int] = []
        self._done_arrays: list[np.ndarray] = []
        self.closed = False

    def view(self, index: int) -> memoryview:
        """Frame `index` (`size` bytes)."""
        if not 0 <= index < self.count:
            raise QpError(f"frame index {index} outside send memory of {self.count}")
        return self.memory[index * self.size:(index + 1) * self.size]

    def write(self, offset: int, data) -> None:
        """Copy `data` into the memory at `offset`."""
        if offset < 0 or offset + len(data) > self.count * self.size:
            raise QpError(f"{len(data)} bytes at offset {offset} do not fit the send memory")
        self.memory[offset:offset + len(data)] = data

    def check(self, frames: Sequence) -> None:
        """QpError unless every (offset, length) lies in the memory."""
        end = self.count * self.size
        for f in frames:
            if f[0] < 0 or f[1] < 0 or f[0] + f[1] > end:
                raise QpError(f"frame of {f[1]} bytes at offset {f[0]} lies outside the send memory")

    def finished(self, offsets) -> None:
        """Backends: these accepted frames are done (their sends completed or were dropped); a list of
        offsets or an integer array."""
        if isinstance(offsets, np.ndarray):
            if len(offsets):
                self._done_arrays.append(offsets.astype(np.int64, copy=False))
                self.in_flight -= len(offsets)
            return
        before = len(self._done)
        self._done.extend(offsets)
        self.in_flight -= len(self._done) - before

    def completed(self) -> list[int]:
        """Offsets of accepted frames whose sends are done since the last call: the caller owns them again."""
        return self.completed_offsets().tolist()

    def completed_offsets(self) -> np.ndarray:
        """`completed()` as an int64 array (the columnar pump's form)."""
        parts = self._done_arrays
        if self._done:
            parts.append(np.array(self._done, np.int64))
            self._done = []
        if not parts:
            return _NO_OFFSETS
        self._done_arrays = []
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def check_arrays(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """QpError unless every (offset, length) lies in the memory (vectorized `check`)."""
        if len(offsets) and (offsets.min() < 0 or lengths.min() < 0
                             or (offsets + lengths).max() > self.count * self.size):
            raise QpError("a frame lies outside the send memory")

    def close(self) -> None:
        """Stop using the memory (the caller may unmap it after this); idempotent."""
        if not self.closed:
            self.closed = True
            self._rows = None
            self.memory.release()


# ---------------------------------------------------------------- counters

class FabricCounter(StrEnum):
    """Names of the drop counters a backend keeps; stable (they become metric labels)."""

    OVERSIZE = "oversize"                    # TX: payload above the path MTU or the port's active MTU
    PORT_DOWN = "port_down"                  # TX/RX while the port is not ACTIVE
    NO_DESTINATION = "no_destination"        # TX: no port has that DLID, or no QP that QPN (sim only)
    NOT_MEMBER = "not_member"                # TX or RX on a multicast group the port is not a member of
    QKEY_MISMATCH = "qkey_mismatch"          # RX: datagram Q_Key differs from the QP's
    PKEY_MISMATCH = "pkey_mismatch"          # RX: datagram P_Key does not match the QP's / port's table
    NO_RECV_BUFFER = "no_recv_buffer"        # RX: no receive buffer posted
    RX_OVERRUN = "rx_overrun"                # TX (sim only): the receiver's socket queue was full
    BAD_DATAGRAM = "bad_datagram"            # RX: malformed transport header (sim only)
    LOOPBACK = "loopback"                    # our own datagram came back (counted by LoopbackFilter)
    QP_ERROR = "qp_error"                    # TX/RX on a QP in the error state (after a length error)


class Counters:
    """Thread-safe drop counters keyed by `FabricCounter`; `snapshot()` gives {name: count} for metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(FabricCounter, 0)

    def add(self, counter: FabricCounter, n: int = 1) -> None:
        """Count `n` drops of one kind."""
        with self._lock:
            self._counts[counter] += n

    def snapshot(self) -> dict[str, int]:
        """Every counter by its stable name, zeros included."""
        with self._lock:
            return {c.value: n for c, n in self._counts.items()}


class LoopbackFilter:
    """Drops, and counts, completions that are our own datagrams coming back (docs/design.md §3.10).

    A completion is ours when its source QPN is one of our QPs and its source is our port: the SLID is
    our LID (IB) or the SGID is one of our GIDs (a GRH is present). The agent updates `qpns` as it
    creates QPs and `port` on LID changes.
    """

    def __init__(self, port: PortAttrs, qpns: Iterable[int] = (), counters: Counters | None = None) -> None:
        self.port = port
        self.qpns = set(qpns)
        self.counters = counters if counters is not None else Counters()

    def is_own(self, c: Completion) -> bool:
        """True if `c` came from one of our QPs on our port."""
        if c.src_qp not in self.qpns:
            return False
        if c.has_grh and c.sgid is not None:
            return bytes(c.sgid) in self.port.gids
        return self.port.link_layer is LinkLayer.INFINIBAND and c.slid == self.port.lid

    def filter(self, completions: Iterable[Completion]) -> list[Completion]:
        """The completions that are not ours; the others are counted as LOOPBACK."""
        kept, dropped = [], 0
        for c in completions:
            if self.is_own(c):
                dropped += 1
            else:
                kept.append(c)
        if dropped:
            self.counters.add(FabricCounter.LOOPBACK, dropped)
        return kept


# ---------------------------------------------------------------- the contract

class UdQp(ABC):
    """One UD QP, bound to one P_Key and Q_Key, with its receive buffer pool."""

    qpn: int
    pkey: int
    pkey_index: int
    qkey: int
    pool: BufferPool

    @abstractmethod
    def post_send(self, batch: Sequence[SendRequest]) -> int:
        """Send a batch; returns how many were accepted (the rest did not fit the send queue: retry them).

        Payloads above the path MTU (or the port's active MTU) are dropped and counted as OVERSIZE, as
        the sender must (hardware would lose them silently): they count as accepted.
        """

    def post_send_to(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, payloads: Sequence) -> int:
        """Send many payloads to one destination (the agent's hot path: frames come grouped by peer);
        same rules and return value as `post_send`. Backends override it to work out the route once."""
        return self.post_send([SendRequest(ah, remote_qpn, remote_qkey, p) for p in payloads])

    payload_copies = 1      # user-space copies `post_send` and `post_send_to` make of each payload

    def post_send_memory(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, memory: SendMemory,
                         frames: Sequence) -> int:
        """Send frames that already lie in `memory` (from `register_send_memory`), given as (offset, length)
        pairs (longer tuples allowed: AF_XDP descriptors), to one destination. Returns how many were
        accepted, the first ones: each of those comes back once through `memory.completed()` (oversize
        ones too, counted as OVERSIZE); the rest did not fit the send queue and stay the caller's.
        This default copies (`post_send_to`) and completes the accepted frames at once."""
        if memory.closed:
            raise BackendClosedError("the send memory is closed")
        memory.check(frames)
        mv = memory.memory
        n = self.post_send_to(ah, remote_qpn, remote_qkey, [mv[f[0]:f[0] + f[1]] for f in frames])
        memory.copies += n
        memory.in_flight += n
        memory.finished(f[0] for f in frames[:n])
        return n

    def post_send_batch(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, memory: SendMemory,
                        offsets: np.ndarray, lengths: np.ndarray) -> int:
        """`post_send_memory` with the frames as two integer arrays (UMEM offsets and lengths): the columnar
        pump's send. Same rules and return value (the first n are accepted; each comes back once through
        `memory.completed_offsets()`). This default goes through `post_send_memory`."""
        return self.post_send_memory(ah, remote_qpn, remote_qkey, memory,
                                     list(zip(offsets.tolist(), lengths.tolist(), strict=True)))

    def busy(self) -> float:
        """Seconds for which sends would only be lost for lack of room (a full send queue, a destination
        that cannot take more); 0.0 when sending is worth it. The caller keeps frames where dropping them
        costs least meanwhile. Default 0.0."""
        return 0.0

    def wait_writable(self, timeout: float) -> None:
        """Block up to `timeout` seconds, returning early once sending is worth it again (`busy()` would
        say 0.0). Default: sleep."""
        import time

        time.sleep(timeout)

    @abstractmethod
    def post_recv(self, indices: Iterable[int]) -> int:
        """Hand receive buffers (indices into `pool`) to the receive queue; returns how many were posted."""

    @abstractmethod
    def poll(self, max_entries: int = 64) -> list[Completion]:
        """Up to `max_entries` receive completions, oldest first, without blocking."""

    def poll_batch(self, max_entries: int = 256) -> RecvBatch:
        """Up to `max_entries` receive completions as columns (`RecvBatch`), oldest first, without
        blocking. Payloads are read from `pool` at `GRH_LEN` in buffer `index`. Same completions as `poll`
        (use one or the other). This default builds the columns from `poll`."""
        return RecvBatch.from_completions(self.poll(max_entries), self.pkey_index)

    @abstractmethod
    def fileno(self) -> int:
        """A descriptor that becomes readable when completions may be waiting (spurious wakeups allowed;
        call `poll` until it returns fewer than asked)."""

    @abstractmethod
    def attach_mcast(self, mgid: bytes, mlid: int) -> None:
        """Attach to a multicast group (the port must also be a member in the SA to receive)."""

    @abstractmethod
    def detach_mcast(self, mgid: bytes, mlid: int) -> None:
        """Detach from a multicast group; receiving from it stops."""

    @abstractmethod
    def close(self) -> None:
        """Destroy the QP; posted buffers are flushed. Idempotent."""

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds until `fileno()` is readable; True if it is."""
        ready, _, _ = select.select([self.fileno()], [], [], timeout)
        return bool(ready)


class Backend(ABC):
    """One opened HCA port. Use as a context manager or call `close()` (idempotent)."""

    events: EventQueue

    @abstractmethod
    def port(self) -> PortAttrs:
        """Read the port's attributes now."""

    @abstractmethod
    def alloc_pool(self, count: int, size: int, memory=None, stride: int | None = None,
                   offset: int = 0) -> BufferPool:
        """Allocate and register `count` receive buffers of `size` bytes (GRH_LEN + largest payload); with
        `memory`, register the caller's instead: buffer i at `offset` + i * `stride` (QpError if this
        backend cannot receive into it)."""

    @abstractmethod
    def create_qp(self, pkey: int, qkey: int, pool: BufferPool, send_depth: int = 256) -> UdQp:
        """Create a UD QP for `pkey` (must be in the P_Key table) with Q_Key `qkey`, receiving into `pool`."""

    def register_send_memory(self, memory, count: int, size: int) -> SendMemory:
        """Make `memory` (writable, `count` frames of `size` bytes, e.g. the AF_XDP UMEM) something this
        backend's QPs send from with `post_send_memory`. Close it before unmapping the memory. This
        default copies at post time (`SendMemory`); a backend that can send from it directly overrides it."""
        return SendMemory(memory, count, size)

    @abstractmethod
    def create_ah(self, path: Path) -> AddressHandle:
        """Make an address handle for `path` (QpError if the path is malformed)."""

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """Drop counters by `FabricCounter` name, zeros included."""

    @abstractmethod
    def close(self) -> None:
        """Close every QP, the event queue and the port. Idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
