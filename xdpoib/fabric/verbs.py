"""The `verbs` fabric backend: UD datagrams over a real HCA port (or Soft-RoCE), via rdma-core.

This is the only module that imports pyverbs. pyverbs reads the port (attributes, GID table with each
entry's netdev, P_Key table); the UD data path lives in `_ibverbs` (ctypes over libibverbs), because
pyverbs 44 cannot attach a QP to a multicast group nor share its QP, PD, CQ or AH pointers (see the
docstring there). One `VerbsBackend` opens one port and owns, in creation order: the ctypes context, a PD,
the registered pools, the QPs (each with its CQs, completion channel and send buffers), the AH cache, and
a thread that turns async port events into `PortEvent`s. `close()` undoes them in reverse.

RoCE ports (Soft-RoCE in the qemu tier) have no SA and no LIDs: every path carries a GRH whose DGID is the
peer's GID, and `roce_join`/`roce_leave` stand in for an SA join by joining the port's netdev to the IPv6
group of the MGID (rxe only delivers multicast the IP stack accepted). The source GID of a GRH is the
lowest table index of the destination's address family (IPv4-mapped or IPv6; link-local to link-local),
so two ports pick matching GIDs (`sgid_index_for`).

RoCE has no LIDs, but code written for InfiniBand knows a peer by (LID, QPN) and addresses it by a
PathRecord's DLID. So the backend of a RoCE port names every remote GID it meets with a local LID of its
own (1 and up, below the multicast range, stable for the backend's life, never on the wire): completions
from that GID carry it as their SLID, `roce_route(gid)` hands it out for a path, `roce_gid(lid)` maps it
back, and an address handle for a path without a GRH to such a LID is made as the GRH path to its GID.

Sends without copies: `register_send_memory` registers caller memory (the agent's AF_XDP UMEM) as a memory
region of the PD, and `VerbsQp.post_send_batch` (and `post_send_memory`, which goes through it) points each
send's scatter entry straight at the frame in it: the UMEM frame is the send buffer. The send queue is a
ring of prebuilt work requests (`VerbsQp`'s doc): a batch fills the next slots with numpy array
operations, is posted as one chain with one `ibv_post_send`, and only its last WR is signaled; that
completion frees the whole chain. A frame stays the backend's until then (reaped at the next post on that
QP, or when the owner asks `VerbsSendMemory.completed_offsets()`), then its offset is handed back. At most
half the memory's frames are in flight at once (beyond that a frame is copied into its slot's own send
buffer and handed back at once, counted in `copies`), so the owner always keeps frames to receive into.
Closing a QP hands back every frame it still held: flushed first (the QP is moved to ERR and its send
queue drained), and whatever is left once the QP is destroyed (the device no longer reads it).

Receives without objects: `VerbsQp.poll_batch` is one `ibv_poll_cq` of N entries into a preallocated
`ibv_wc` array, read as columns through a numpy view (`RecvBatch`); `poll` is its rows as objects. A
receive pool may lie in caller memory (`alloc_pool(memory=, stride=, offset=)`): the range is registered
as an MR as it is, e.g. the mmapped `BPF_F_MMAPABLE` inject map (the kernel accepts an MR over that
mapping: tests/qemu/guest/test_verbs_roce.py), so a frame is received where it will be injected from.

A QP in the error state stays there: `VerbsQp.error` is set by the first error completion, and by an
async QP error event (QP_FATAL, QP_REQ_ERR, QP_ACCESS_ERR, or CQ_ERR on one of its CQs), which also
moves the QP to ERR explicitly so that its posted buffers complete with WR_FLUSH_ERR: the owner learns
of it from completions either way, and replaces the QP.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np

from xdpoib.fabric import _ibverbs as ib
from xdpoib.fabric.base import (
    GRH_LEN,
    MCAST_LID_MIN,
    AddressHandle,
    Backend,
    BackendClosedError,
    BufferPool,
    Completion,
    CompletionStatus,
    Counters,
    EventQueue,
    FabricCounter,
    LinkLayer,
    Path,
    PortAttrs,
    PortError,
    PortEvent,
    PortEventKind,
    PortState,
    QpError,
    RecvBatch,
    SendMemory,
    SendRequest,
    UdQp,
    mtu_bytes,
    pool_extent,
    pool_in,
)

_LINK_LAYER = {1: LinkLayer.INFINIBAND, 2: LinkLayer.ETHERNET}
_EVENT_KIND = {
    ib.EVENT_PORT_ACTIVE: PortEventKind.PORT_ACTIVE,
    ib.EVENT_PORT_ERR: PortEventKind.PORT_ERR,
    ib.EVENT_LID_CHANGE: PortEventKind.LID_CHANGE,
    ib.EVENT_CLIENT_REREGISTER: PortEventKind.CLIENT_REREGISTER,
    ib.EVENT_PKEY_CHANGE: PortEventKind.PKEY_CHANGE,
}
_STATUS_CODES = np.array(sorted(s.value for s in CompletionStatus), np.int32)
_SEND_SLOT = 4096                # largest UD payload (IB MTU 4096)
_V4_MAPPED = bytes(10) + b"\xff\xff"
_V4_MAPPED_ARR = np.frombuffer(_V4_MAPPED, np.uint8)
ROCE_HOP_LIMIT = 64              # unicast GRHs on RoCE (RoCEv2 may cross IP routers)
CLOSE_DRAIN_S = 1.0              # how long closing waits for flushed sends to hand their frames back


def _pyverbs():
    try:
        import pyverbs.device as dev  # the only pyverbs import in xdpoib
    except ImportError as exc:
        raise PortError(f"pyverbs is not available ({exc}): install python3-pyverbs") from None
    return dev


def list_devices() -> list[str]:
    """Names of the RDMA devices libibverbs sees (e.g. ['mlx5_0'] or ['rxe0', 'rxe1'])."""
    return [d.name.decode() for d in _pyverbs().get_device_list()]


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Region:
    """Page-aligned anonymous memory registered in a PD: the backing of pools and send buffers."""

    def __init__(self, pd: ib.Pd, length: int) -> None:
        self.length = _round_up(max(length, 1), mmap.PAGESIZE)
        self.mem = mmap.mmap(-1, self.length)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        try:
            self.mr = ib.Mr(pd, self.addr, self.length)
        except ib.VerbsCallError as exc:
            self.mem.close()
            raise QpError(f"cannot register {self.length} bytes: {exc}") from None
        self.lkey = self.mr.lkey

    def close(self) -> None:
        """Deregister and unmap; idempotent."""
        if self.mr.ptr:
            self.mr.close()
            with contextlib.suppress(BufferError):  # a caller still holds a view: let GC unmap it
                self.mem.close()


class VerbsPool(BufferPool):
    """`count` registered buffers of `size` bytes, buffer i at i * `stride`: in a region of our own, or in
    caller memory (`memory`, from `offset` on) registered as a memory region of the PD as it is."""

    def __init__(self, backend: VerbsBackend, count: int, size: int, memory=None, stride: int | None = None,
                 offset: int = 0) -> None:
        stride = size if stride is None else stride
        if count <= 0 or size <= GRH_LEN or stride < size or offset < 0:
            raise QpError(f"buffer pool needs count > 0, size > {GRH_LEN} and stride >= size "
                          f"(got {count} x {size}, stride {stride})")
        self.backend, self.count, self.size, self.stride = backend, count, size, stride
        self.region: _Region | None = None
        self.mr: ib.Mr | None = None
        if memory is None:
            length = pool_extent(count, size, stride)
            self.region = _Region(backend._pd, length)
            self.memory = memoryview(self.region.mem)[:length]
            self.addr, self.lkey = self.region.addr, self.region.lkey
            return
        try:
            mv = memoryview(memory).cast("B")
        except (TypeError, ValueError) as exc:
            raise QpError(f"pool memory must be one contiguous writable buffer: {exc}") from None
        self.memory = pool_in(mv, count, size, stride, offset)
        length = self.memory.nbytes
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        try:
            self.mr = ib.Mr(backend._pd, self.addr, length)
        except ib.VerbsCallError as exc:
            self.memory.release()
            raise QpError(f"cannot register {length} bytes of caller memory as a receive pool: {exc}") from None
        self.lkey = self.mr.lkey

    def view(self, index: int) -> memoryview:
        """A writable view of buffer `index`."""
        if not 0 <= index < self.count:
            raise QpError(f"buffer index {index} outside pool of {self.count}")
        start = index * self.stride
        return self.memory[start:start + self.size]

    def close(self) -> None:
        """Release the pool's memory registration (caller memory stays the caller's, mapped); idempotent."""
        self._rows = None
        with contextlib.suppress(BufferError):      # a caller still holds a view: let GC release it
            self.memory.release()
        if self.region is not None:
            self.region.close()
        elif self.mr is not None:
            self.mr.close()


class VerbsSendMemory(SendMemory):
    """Caller memory registered as a memory region: QPs send from it without copying (module doc)."""

    zero_copy = True

    def __init__(self, backend: VerbsBackend, memory, count: int, size: int) -> None:
        super().__init__(memory, count, size)
        self.backend = backend
        self.length = count * size
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        try:
            self.mr = ib.Mr(backend._pd, self.addr, self.length)
        except ib.VerbsCallError as exc:
            super().close()
            raise QpError(f"cannot register {self.length} bytes of send memory: {exc}") from None
        self.lkey = self.mr.lkey
        self.limit = max(1, count // 2)     # frames in flight at most; beyond that they are copied
        self.holders: set[VerbsQp] = set()  # QPs with frames of this memory in flight

    def completed_offsets(self) -> np.ndarray:
        """Reap the send completions of every QP holding frames, then hand back the finished offsets."""
        for qp in list(self.holders):
            qp._reap_sends()
        return super().completed_offsets()

    def close(self) -> None:
        """Wait (bounded) for frames in flight, then deregister; idempotent."""
        if self.closed:
            return
        deadline = time.monotonic() + CLOSE_DRAIN_S
        while self.in_flight and self.holders and time.monotonic() < deadline:
            for qp in list(self.holders):
                qp._reap_sends()
            if self.in_flight:
                time.sleep(0.001)
        self.mr.close()
        if self in self.backend._memories:
            self.backend._memories.remove(self)
        super().close()


class VerbsAh(AddressHandle):
    """An AddressHandle holding the `ibv_ah` made for its path."""

    def __init__(self, path: Path, ah: ib.Ah, backend: VerbsBackend) -> None:
        super().__init__(path)
        self.ah, self.backend = ah, backend


class VerbsQp(UdQp):
    """One UD QP at RTS with its own send CQ, receive CQ (behind a completion channel) and send buffers.

    The send queue is a ring of `send_depth` prebuilt work requests, each with its own scatter entry and
    its own `_SEND_SLOT` bytes of registered send buffer, linked in a circle. A post fills the next k
    slots (vectorized through numpy views of the ctypes arrays), cuts the circle after the last, signals
    only that one and posts the k with one `ibv_post_send`. A send queue completes in order, so a
    completion for slot s means every slot from the ring's tail through s is done: their frames go back
    to their memory then (UD never completes an unsignaled WR on its own, but does report errors and
    flushes for each). Receive buffers are a prebuilt array of receive WRs linked by index per post, and
    `poll_batch` reads one `ibv_poll_cq` of N completions through a numpy view (module doc)."""

    def __init__(self, backend: VerbsBackend, pkey: int, qkey: int, pool: VerbsPool, send_depth: int) -> None:
        port = backend.port()
        self.backend, self.pool, self.pkey, self.qkey = backend, pool, pkey, qkey
        self.pkey_index = port.pkey_index(pkey)
        self._closed = False
        self.error = False          # an error completion moved the QP to the error state: recreate it
        self._attached: set[tuple[bytes, int]] = set()       # (MGID, MLID) it is attached to
        ctx = backend._ctx
        self._stack = contextlib.ExitStack()
        try:
            self._chan = ib.CompChannel(ctx)
            self._stack.callback(self._chan.close)
            self._recv_cq = ib.Cq(ctx, pool.count, self._chan)
            self._stack.callback(self._recv_cq.close)
            self._send_cq = ib.Cq(ctx, send_depth)
            self._stack.callback(self._send_cq.close)
            self._qp = ib.UdQp(ctx, backend._pd, self._send_cq, self._recv_cq, send_depth, pool.count,
                               backend.port_num, self.pkey_index, qkey)
            self._stack.callback(self._qp.close)
            self._send_region = _Region(backend._pd, send_depth * _SEND_SLOT)
            self._stack.callback(self._send_region.close)
        except ib.VerbsCallError as exc:
            self._stack.close()
            raise QpError(f"cannot create a UD QP for P_Key {pkey:#06x}: {exc}") from None
        self.qpn = self._qp.qpn
        self._recv_cq.arm()
        self._send_mem = memoryview(self._send_region.mem)
        # the send ring (class doc): WR i owns scatter entry i and send buffer slot i
        depth = self._depth = send_depth
        self._send_wrs = (ib.SendWr * depth)()
        self._send_sges = (ib.Sge * depth)()
        sge_base = ctypes.addressof(self._send_sges)
        for i in range(depth):
            wr = self._send_wrs[i]
            wr.wr_id, wr.num_sge, wr.opcode = i, 1, ib.WR_SEND
        self._swr = ib.as_numpy(self._send_wrs, ib.SEND_WR_DTYPE)
        self._sge = ib.as_numpy(self._send_sges, ib.SGE_DTYPE)
        ring = np.arange(depth, dtype=np.int64)
        self._ring2 = np.concatenate([ring, ring])            # slots from any start, wrapped, as one slice
        self._wr_addr = (ctypes.addressof(self._send_wrs) + ring * ctypes.sizeof(ib.SendWr)).astype(np.uint64)
        self._own_addr = (self._send_region.addr + ring * _SEND_SLOT).astype(np.uint64)
        self._swr["sg_list"] = sge_base + ring * ctypes.sizeof(ib.Sge)
        self._swr["next"] = np.roll(self._wr_addr, -1)
        self._swr["send_flags"] = 0
        self._sq_tail = 0               # oldest slot in flight
        self._sq_used = 0               # slots in flight
        self._slot_mem = np.zeros(depth, np.int32)      # slot -> 1 + index in _mems of the memory it sends from
        self._slot_off = np.zeros(depth, np.int64)      # slot -> the frame's offset there
        self._mems: list[VerbsSendMemory] = []
        self._zc_count = 0                              # slots sending from caller memory
        self._swc = (ib.Wc * depth)()
        self._swc_np = ib.as_numpy(self._swc, ib.WC_DTYPE)
        self._swc_addr = ctypes.addressof(self._swc)
        # receive WRs, one per pool buffer, linked per post
        self._recv_wrs = (ib.RecvWr * pool.count)()
        self._recv_sges = (ib.Sge * pool.count)()
        for i in range(pool.count):
            self._recv_sges[i].addr = pool.addr + i * pool.stride
            self._recv_sges[i].length, self._recv_sges[i].lkey = pool.size, pool.lkey
            wr = self._recv_wrs[i]
            wr.wr_id, wr.sg_list, wr.num_sge = i, ctypes.pointer(self._recv_sges[i]), 1
        self._rwr = ib.as_numpy(self._recv_wrs, ib.RECV_WR_DTYPE)
        self._rwr_addr = (ctypes.addressof(self._recv_wrs)
                          + np.arange(pool.count, dtype=np.int64) * ctypes.sizeof(ib.RecvWr)).astype(np.uint64)
        self._wc_size = ctypes.sizeof(ib.Wc)
        self._grow_wcs(max(pool.count, 64))

    def _grow_wcs(self, n: int) -> None:
        self._rwc = (ib.Wc * n)()
        self._rwc_np = ib.as_numpy(self._rwc, ib.WC_DTYPE)
        self._rwc_addr = ctypes.addressof(self._rwc)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(f"QP {self.qpn:#x} is closed")

    def owns(self, ptr: int) -> bool:
        """Whether `ptr` (an async event's element) is this QP or one of its CQs."""
        return not self._closed and ptr in (self._qp.ptr, self._recv_cq.ptr, self._send_cq.ptr)

    def to_error(self) -> None:
        """Mark the QP failed and move it to ERR (an async error event): posted buffers flush."""
        self.error = True
        with contextlib.suppress(ib.VerbsCallError):
            if not self._closed:
                self._qp.to_error()

    # ---------------------------------------------------------------- the send ring

    def _reap_sends(self) -> None:
        """Take the send completions: each frees the ring up to its slot (class doc)."""
        depth = self._depth
        while not self._closed and self._sq_used:
            n = self._send_cq.poll_into(self._swc_addr, depth)
            if not n:
                return
            wcs = self._swc_np[:n]
            if (wcs["status"] != 0).any():
                self.error = True
            last = int(wcs["wr_id"][n - 1])
            count = min((last - self._sq_tail) % depth + 1, self._sq_used)
            slots = self._ring2[self._sq_tail:self._sq_tail + count]
            self._sq_tail = (self._sq_tail + count) % depth
            self._sq_used -= count
            self._release(slots)
            if n < depth:
                return

    def _release(self, slots: np.ndarray) -> None:
        """These slots' sends are over: frames they sent from caller memory go back to it."""
        mids = self._slot_mem[slots]
        held = mids != 0
        if not held.any():
            return
        self._slot_mem[slots] = 0
        for mid in np.unique(mids[held]).tolist():
            self._mems[mid - 1].finished(self._slot_off[slots[mids == mid]])
        self._zc_count -= int(np.count_nonzero(held))
        if not self._zc_count:
            for memory in self._mems:
                memory.holders.discard(self)

    def _free(self) -> int:
        return self._depth - self._sq_used

    def _head_slots(self, k: int) -> np.ndarray:
        head = (self._sq_tail + self._sq_used) % self._depth
        return self._ring2[head:head + k]

    def _post_ring(self, k: int) -> tuple[int, int]:
        """Post the k filled slots at the ring's head as one chain, the last one signaled: (how many the
        provider took, its errno or 0). The taken ones are in flight; a refused rest is free again."""
        depth, swr = self._depth, self._swr
        head = (self._sq_tail + self._sq_used) % depth
        last = (head + k - 1) % depth
        swr["next"][last] = 0
        swr["send_flags"][last] = ib.SEND_SIGNALED
        err, bad = self._qp.post_send_at(int(self._wr_addr[head]))
        swr["next"][last] = self._wr_addr[(last + 1) % depth]
        swr["send_flags"][last] = 0
        taken = k
        if err:
            first = int(self._wr_addr[0])
            off = bad - first
            in_ring = 0 <= off < depth * ctypes.sizeof(ib.SendWr)
            taken = (off // ctypes.sizeof(ib.SendWr) - head) % depth if in_ring else 0
            taken = min(taken, k)
        self._sq_used += taken
        return taken, err

    def _ah_ptr(self, ah: AddressHandle) -> int:
        if not isinstance(ah, VerbsAh) or ah.backend is not self.backend or not ah.ah.ptr:
            raise QpError(f"address handle {ah!r} was not made by this backend")
        return ah.ah.ptr

    def post_send(self, batch: Sequence[SendRequest]) -> int:
        """Copy and post a batch; oversize payloads are dropped and counted (they count as accepted), and so
        is everything sent on a QP in the error state (QP_ERROR)."""
        self._check_open()
        self._reap_sends()
        if self.error:
            self.backend._counters.add(FabricCounter.QP_ERROR, len(batch))
            return len(batch)
        active = self.backend._active_mtu
        slots = self._head_slots(self._free())
        swr, sge = self._swr, self._sge
        placed: list[int] = []          # index in batch of each frame given a slot, in slot order
        oversize: list[int] = []
        accepted = len(batch)
        for i, req in enumerate(batch):
            ah_ptr = self._ah_ptr(req.ah)
            size = len(req.payload)
            if size > min(req.ah.path.mtu, active):
                oversize.append(i)
                continue
            if len(placed) == len(slots):
                accepted = i            # the send queue is full: this one and the rest stay the caller's
                break
            slot = int(slots[len(placed)])
            start = slot * _SEND_SLOT
            self._send_mem[start:start + size] = req.payload
            sge[slot] = (self._own_addr[slot], size, self._send_region.lkey)
            swr["ah"][slot], swr["remote_qpn"][slot], swr["remote_qkey"][slot] = ah_ptr, req.remote_qpn, req.remote_qkey
            placed.append(i)
        if placed:
            taken, err = self._post_ring(len(placed))
            if taken < len(placed):
                if not taken:
                    raise QpError(f"post_send on QP {self.qpn:#x}: {os.strerror(err)}")
                accepted = placed[taken]
        n_over = sum(1 for i in oversize if i < accepted)
        if n_over:
            self.backend._counters.add(FabricCounter.OVERSIZE, n_over)
        return accepted

    def post_send_memory(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, memory: SendMemory,
                         frames: Sequence) -> int:
        """Post frames lying in registered `memory` without copying them: `post_send_batch` with the frames
        as arrays."""
        if not isinstance(memory, VerbsSendMemory):
            return super().post_send_memory(ah, remote_qpn, remote_qkey, memory, frames)
        memory.check(frames)
        if not len(frames):
            return 0
        arr = np.array([(f[0], f[1]) for f in frames], np.int64)
        return self.post_send_batch(ah, remote_qpn, remote_qkey, memory, arr[:, 0], arr[:, 1])

    def post_send_batch(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, memory: SendMemory,
                        offsets: np.ndarray, lengths: np.ndarray) -> int:
        """Post frames lying in registered `memory` without copying them, given as arrays of offsets and
        lengths: the scatter entries of the next slots of the send ring point at the frames (filled
        vectorized), and one `ibv_post_send` posts them, the last one signaled (class doc). The contract's
        rules (fabric/base.py): the first accepted frames come back through `memory.completed_offsets()`
        once their sends complete; oversize ones, and all of them on a QP in the error state, are counted
        and come back at once; a full send queue accepts the first ones only; past the memory's in-flight
        limit a frame is copied into the slot's own send buffer (counted in `memory.copies`) and comes
        back at once."""
        if not isinstance(memory, VerbsSendMemory):
            return super().post_send_batch(ah, remote_qpn, remote_qkey, memory, offsets, lengths)
        self._check_open()
        if memory.backend is not self.backend or memory.closed:
            raise QpError("the send memory was not registered with this backend, or is closed")
        ah_ptr = self._ah_ptr(ah)
        offsets = np.asarray(offsets, np.int64)
        lengths = np.asarray(lengths, np.int64)
        if offsets.shape != lengths.shape or offsets.ndim != 1:
            raise QpError("offsets and lengths must be two integer arrays of one length")
        memory.check_arrays(offsets, lengths)
        n = len(offsets)
        if not n:
            return 0
        self._reap_sends()
        if self.error:
            self.backend._counters.add(FabricCounter.QP_ERROR, n)
            memory.in_flight += n
            memory.finished(offsets.copy())
            return n
        fits = lengths <= min(ah.path.mtu, self.backend._active_mtu)
        fit_at = np.flatnonzero(fits)
        free = self._free()
        if len(fit_at) > free:          # the queue is full before the end: accept up to the next one
            n = int(fit_at[free])
            fit_at = fit_at[:free]
        k = len(fit_at)
        zc = copied = 0
        if k:
            slots = self._head_slots(k)
            go_off, go_len = offsets[fit_at], lengths[fit_at]
            zc = max(0, min(k, memory.limit - memory.in_flight))
            sge, swr = self._sge, self._swr
            sge["length"][slots] = go_len
            zs = slots[:zc]
            sge["addr"][zs] = memory.addr + go_off[:zc]
            sge["lkey"][zs] = memory.lkey
            if zc < k:                  # past the in-flight limit: copies into the slots' own buffers
                cs = slots[zc:]
                sge["addr"][cs] = self._own_addr[cs]
                sge["lkey"][cs] = self._send_region.lkey
                src, dst = memory.memory, self._send_mem
                for slot, off, size in zip(cs.tolist(), go_off[zc:].tolist(), go_len[zc:].tolist(), strict=True):
                    dst[slot * _SEND_SLOT:slot * _SEND_SLOT + size] = src[off:off + size]
            swr["ah"][slots] = ah_ptr
            swr["remote_qpn"][slots] = remote_qpn
            swr["remote_qkey"][slots] = remote_qkey
            if zc:
                self._slot_mem[zs] = self._mem_id(memory)
                self._slot_off[zs] = go_off[:zc]
            taken, err = self._post_ring(k)
            if taken < k:
                self._slot_mem[slots[taken:]] = 0
                if not taken:
                    raise QpError(f"post_send on QP {self.qpn:#x}: {os.strerror(err)}")
                n = int(fit_at[taken])
                k = taken
            zc = min(zc, k)
            copied = k - zc
            if zc:
                self._zc_count += zc
                memory.holders.add(self)
        now = [offsets[:n][~fits[:n]]]      # oversize: dropped, counted, back at once
        oversize = len(now[0])
        if oversize:
            self.backend._counters.add(FabricCounter.OVERSIZE, oversize)
        if copied:
            now.append(offsets[fit_at[zc:k]])
        memory.copies += copied
        memory.in_flight += n
        done = np.concatenate(now) if len(now) > 1 else now[0]
        if len(done):
            memory.finished(done)
        return n

    def _mem_id(self, memory: VerbsSendMemory) -> int:
        for i, m in enumerate(self._mems):
            if m is memory:
                return i + 1
        self._mems.append(memory)
        return len(self._mems)

    # ---------------------------------------------------------------- receive

    def post_recv(self, indices) -> int:
        """Post receive buffers by pool index (an iterable or an integer array), linked into one call."""
        self._check_open()
        idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), np.int64).reshape(-1)
        k = len(idx)
        if not k:
            return 0
        if idx.min() < 0 or idx.max() >= self.pool.count:
            bad = int(idx[(idx < 0) | (idx >= self.pool.count)][0])
            raise QpError(f"buffer index {bad} outside pool of {self.pool.count}")
        if k > 1 and len(np.unique(idx)) != k:
            raise QpError("a receive buffer can only be posted once per call")   # it would link a cycle
        nxt = self._rwr["next"]
        nxt[idx[:-1]] = self._rwr_addr[idx[1:]]
        nxt[idx[-1]] = 0
        try:
            self._qp.post_recv_at(int(self._rwr_addr[idx[0]]))
        except ib.VerbsCallError as exc:
            raise QpError(f"post_recv on QP {self.qpn:#x}: {exc}") from None
        return k

    def poll(self, max_entries: int = 64) -> list[Completion]:
        """Receive completions with the GRH area stripped and the source fields filled in (`poll_batch`'s
        rows as objects)."""
        return self.poll_batch(max_entries).completions(self.pool)

    def poll_batch(self, max_entries: int = 256) -> RecvBatch:
        """Up to `max_entries` receive completions as columns: one `ibv_poll_cq` into the preallocated
        `ibv_wc` array (and one more after re-arming the channel if it came back short), read through a
        numpy view. Byte lengths exclude the GRH area; the SGIDs of GRH rows are gathered from their
        buffers' GRH areas at once; on RoCE each distinct SGID gets its local LID as SLID (module doc);
        an error row leaves the QP in the error state (`error`)."""
        self._check_open()
        if max_entries <= 0:
            return RecvBatch.empty(self.pkey_index)
        if max_entries > len(self._rwc):
            self._grow_wcs(max_entries)
        self._chan.drain()
        cq, addr = self._recv_cq, self._rwc_addr
        n = cq.poll_into(addr, max_entries)
        if n < max_entries:
            cq.arm()                    # then look again: a completion may have raced the arming
            n += cq.poll_into(addr + n * self._wc_size, max_entries - n)
        if not n:
            return RecvBatch.empty(self.pkey_index)
        return self._columns(self._rwc_np[:n])

    def _columns(self, wc: np.ndarray) -> RecvBatch:
        n = len(wc)
        b = RecvBatch.of_length(n, self.pkey_index)
        status = wc["status"]
        ok = status == 0
        if not ok.all():
            self.error = True       # verbs: any error completion leaves the QP in the error state
            b.status[:] = np.where(np.isin(status, _STATUS_CODES), status, CompletionStatus.GENERAL_ERR)
        b.index[:] = wc["wr_id"]
        size = self.pool.size
        b.byte_len[:] = np.where(ok, np.clip(np.minimum(wc["byte_len"], size).astype(np.int64) - GRH_LEN,
                                             0, None), 0)
        b.src_qp[:] = wc["src_qp"]
        b.slid[:] = wc["slid"]
        b.sl[:] = wc["sl"]
        grh = ok & ((wc["wc_flags"] & ib.WC_GRH) != 0)
        b.grh[:] = grh
        rows = np.flatnonzero(grh)
        if len(rows):
            area = self.pool.rows()[b.index[rows], :GRH_LEN]
            sgid = area[:, 8:24]
            # RoCEv2 over IPv4: the IPv4 header is in bytes 20..39, the source GID is IPv4-mapped
            v4 = ((area[:, 0] >> 4) != 6) & ((area[:, 20] >> 4) == 4)
            if v4.any():
                sgid[v4] = np.concatenate([np.broadcast_to(_V4_MAPPED_ARR, (int(v4.sum()), 12)),
                                           area[v4, 32:36]], axis=1)
            b.sgid[rows] = sgid
            if self.backend._link_layer is LinkLayer.ETHERNET:
                keys = np.ascontiguousarray(sgid).view(np.dtype((np.void, 16))).reshape(-1)
                uniq, inverse = np.unique(keys, return_inverse=True)
                lids = np.array([self.backend._local_lid(u.tobytes()) for u in uniq], np.uint16)
                b.slid[rows] = lids[inverse.reshape(-1)]
        return b

    def fileno(self) -> int:
        """The completion channel's descriptor (readable after a receive completion)."""
        self._check_open()
        return self._chan.fd

    def _mcast(self, op: str, mgid: bytes, mlid: int) -> None:
        self._check_open()
        if len(mgid) != 16 or mgid[0] != 0xFF:
            raise QpError(f"not a multicast GID: {bytes(mgid).hex()}")
        try:
            getattr(self._qp, f"{op}_mcast")(bytes(mgid), mlid)
        except ib.VerbsCallError as exc:
            raise QpError(f"{op} QP {self.qpn:#x} to {ipaddress.IPv6Address(bytes(mgid))}: {exc}") from None
        if op == "attach":
            self._attached.add((bytes(mgid), mlid))
        else:
            self._attached.discard((bytes(mgid), mlid))

    def attach_mcast(self, mgid: bytes, mlid: int) -> None:
        """Attach the QP to a multicast group (ibv_attach_mcast)."""
        self._mcast("attach", mgid, mlid)

    def detach_mcast(self, mgid: bytes, mlid: int) -> None:
        """Detach the QP from a multicast group (ibv_detach_mcast)."""
        self._mcast("detach", mgid, mlid)

    def close(self) -> None:
        """Detach the QP from its groups (the kernel refuses to destroy an attached QP: EBUSY), hand back
        the caller's frames it still sends from (module doc), then destroy it, its CQs, channel and send
        buffers; idempotent. QpError if the kernel kept any."""
        if self._closed:
            return
        for mgid, mlid in list(self._attached):
            with contextlib.suppress(QpError):
                self.detach_mcast(mgid, mlid)
        if self._zc_count:
            # flush the send queue so that the frames come back as completions, whatever destroy says
            with contextlib.suppress(ib.VerbsCallError):
                self._qp.to_error()
            deadline = time.monotonic() + CLOSE_DRAIN_S
            while self._zc_count and time.monotonic() < deadline:
                self._reap_sends()
                if self._zc_count:
                    time.sleep(0.001)
        self._closed = True
        self._send_mem.release()
        self.backend._qps.discard(self)
        try:
            self._stack.close()
        except ib.VerbsCallError as exc:
            raise QpError(f"destroying QP {self.qpn:#x}: {exc}") from None
        if self._zc_count:          # destroyed: the device reads none of them any more
            self._release(np.flatnonzero(self._slot_mem))


class VerbsBackend(Backend):
    """One port of an RDMA device, e.g. `VerbsBackend("mlx5_0", 1)` or `VerbsBackend("rxe0")`."""

    def __init__(self, device: str, port: int = 1) -> None:
        self.device, self.port_num = device, port
        self._closed = False
        self._counters = Counters()
        self._qps: set[VerbsQp] = set()
        self._ahs: dict[Path, VerbsAh] = {}
        self._pools: list[VerbsPool] = []
        self._memories: list[VerbsSendMemory] = []
        self._groups: dict[bytes, socket.socket] = {}
        self._routes: dict[int, bytes] = {}        # RoCE local LID -> GID (module doc)
        self._route_of: dict[bytes, int] = {}
        self._routes_lock = threading.Lock()
        dev = _pyverbs()
        try:
            self._query = dev.Context(name=device)
        except Exception as exc:
            raise PortError(f"cannot open RDMA device {device!r}: {exc}") from None
        self._stack = contextlib.ExitStack()
        self._stack.callback(self._query.close)
        try:
            self._ctx = ib.Context(device)
            self._stack.callback(self._ctx.close)
            self._pd = ib.Pd(self._ctx)
            self._stack.callback(self._pd.close)
        except ib.VerbsCallError as exc:
            self._stack.close()
            raise PortError(f"cannot open {device} for verbs: {exc}") from None
        try:
            attrs = self.port()
        except PortError:
            self._stack.close()
            raise
        self._active_mtu = attrs.active_mtu
        self._link_layer = attrs.link_layer
        self.events = EventQueue()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._ctx.async_fd, False)
        self._events_thread = threading.Thread(target=self._event_loop, name=f"verbs-events-{device}",
                                               daemon=True)
        self._events_thread.start()

    @classmethod
    def open(cls, device: str | None = None, port: int | None = 1) -> VerbsBackend:
        """Open `device` (default: the only RDMA device there is) at `port` (default 1)."""
        if device is None:
            devices = list_devices()
            if len(devices) != 1:
                raise PortError(f"name the RDMA device to use (--device): found {devices or 'none'}")
            device = devices[0]
        return cls(device, 1 if port is None else port)

    # ---------------------------------------------------------------- port

    def port(self) -> PortAttrs:
        """Query the port now: state, LIDs, active MTU, link layer, GID and P_Key tables."""
        self._check_open()
        try:
            pa = self._query.query_port(self.port_num)
            gids = self._gid_table(pa.gid_tbl_len)
            pkeys = tuple(self._query.query_pkey(self.port_num, i) for i in range(pa.pkey_tbl_len))
        except PortError:
            raise
        except Exception as exc:
            raise PortError(f"cannot query {self.device} port {self.port_num}: {exc}") from None
        state = PortState(min(pa.state, PortState.ACTIVE))
        self._gids = gids
        return PortAttrs(lid=pa.lid, sm_lid=pa.sm_lid, state=state, active_mtu=mtu_bytes(pa.active_mtu),
                         port_guid=int.from_bytes(gids[0][8:], "big"), gids=gids, pkeys=pkeys,
                         link_layer=_LINK_LAYER.get(pa.link_layer, LinkLayer.INFINIBAND))

    def _gid_entries(self, length: int):
        entries = self._query.query_gid_table(max(length, 1))
        return sorted((e for e in entries if e.port_num == self.port_num), key=lambda e: e.gid_index)

    def _gid_table(self, length: int) -> tuple[bytes, ...]:
        entries = self._gid_entries(length)
        if not entries or entries[0].gid_index != 0:
            raise PortError(f"{self.device} port {self.port_num} has no GID at index 0")
        table = [bytes(16)] * (entries[-1].gid_index + 1)
        for e in entries:
            table[e.gid_index] = struct.pack("=QQ", e.gid_subnet_prefix, e.gid_interface_id)  # raw, as stored
        return tuple(table)

    # ---------------------------------------------------------------- objects

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(f"verbs backend {self.device} is closed")

    def alloc_pool(self, count: int, size: int, memory=None, stride: int | None = None,
                   offset: int = 0) -> VerbsPool:
        """Allocate and register `count` receive buffers of `size` bytes; with `memory`, register the caller's
        instead (buffer i at `offset` + i * `stride`; QpError with the kernel's reason if it refuses)."""
        self._check_open()
        pool = VerbsPool(self, count, size, memory, stride, offset)
        self._pools.append(pool)
        return pool

    def register_send_memory(self, memory, count: int, size: int) -> VerbsSendMemory:
        """Register `memory` (e.g. the AF_XDP UMEM) as a memory region QPs send from without copying."""
        self._check_open()
        m = VerbsSendMemory(self, memory, count, size)
        self._memories.append(m)
        return m

    def create_qp(self, pkey: int, qkey: int, pool: BufferPool, send_depth: int = 256) -> VerbsQp:
        """A UD QP at RTS for `pkey` (PortError if not in the P_Key table) with Q_Key `qkey`."""
        self._check_open()
        if not isinstance(pool, VerbsPool) or pool.backend is not self:
            raise QpError("the receive pool must come from this backend's alloc_pool")
        qp = VerbsQp(self, pkey, qkey, pool, send_depth)
        self._qps.add(qp)
        return qp

    def create_ah(self, path: Path) -> VerbsAh:
        """An address handle for `path`, cached by path."""
        self._check_open()
        path.check()
        ah = self._ahs.get(path)
        if ah is not None:
            return ah
        route = path
        if self._link_layer is LinkLayer.ETHERNET and not path.grh:
            dgid = self._routes.get(path.dlid)
            if dgid is None:
                raise QpError("a RoCE port routes by GID: the path needs a GRH and a DGID (or a local LID)")
            route = Path(dlid=0, sl=path.sl, mtu=path.mtu, dgid=dgid, grh=True, sgid_index=self.sgid_index_for(dgid),
                         hop_limit=ROCE_HOP_LIMIT)
        attr = ib.AhAttr(dlid=route.dlid, sl=route.sl, port_num=self.port_num, is_global=int(route.grh))
        if route.grh:
            attr.grh.dgid.raw[:] = route.dgid
            attr.grh.sgid_index, attr.grh.hop_limit = route.sgid_index, route.hop_limit
            attr.grh.traffic_class, attr.grh.flow_label = route.traffic_class, route.flow_label
        try:
            ah = VerbsAh(path, ib.Ah(self._pd, attr), self)
        except ib.VerbsCallError as exc:
            raise QpError(f"cannot create an address handle for {path}: {exc}") from None
        self._ahs[path] = ah
        return ah

    def counters(self) -> dict[str, int]:
        """Drop counters: the sender's OVERSIZE and QP_ERROR (hardware drops on receive silently)."""
        return self._counters.snapshot()

    # ---------------------------------------------------------------- RoCE paths and groups (no SA)

    @property
    def link_layer(self) -> LinkLayer:
        """InfiniBand (LIDs, an SA) or Ethernet (RoCE: GIDs only)."""
        return self._link_layer

    def _need_roce(self) -> None:
        self._check_open()
        if self._link_layer is not LinkLayer.ETHERNET:
            raise PortError(f"{self.device} is an InfiniBand port: ask the SA for paths and joins")

    def sgid_index_for(self, dgid: bytes) -> int:
        """The source GID index for a GRH to `dgid`: the lowest index of the same address family
        (IPv4-mapped, IPv6 link-local, other IPv6; a multicast GID counts as IPv6 link-local), 0 if none."""
        def family(gid: bytes) -> int:
            if gid[:12] == _V4_MAPPED:
                return 4
            return 0 if gid[0] == 0xFF or gid[:2] == b"\xfe\x80" else 6
        want = family(bytes(dgid))
        for i, gid in enumerate(self._gids):
            if any(gid) and family(gid) == want:
                return i
        return 0

    def roce_path(self, dgid: bytes, mtu: int | None = None) -> Path:
        """On a RoCE port, the unicast path to `dgid`: GID-routed (GRH, DLID 0) from the matching source GID,
        capped by the port's active MTU (and `mtu`, e.g. the peer's)."""
        self._need_roce()
        limit = self._active_mtu if mtu is None else min(mtu, self._active_mtu)
        return Path(dlid=0, mtu=limit, dgid=bytes(dgid), grh=True, sgid_index=self.sgid_index_for(dgid),
                    hop_limit=ROCE_HOP_LIMIT)

    def roce_route(self, dgid: bytes) -> int:
        """On a RoCE port, the local LID of `dgid` (see the module doc): a path without a GRH to that
        DLID reaches `dgid`, and datagrams from `dgid` complete with it as their SLID."""
        self._need_roce()
        lid = self._local_lid(bytes(dgid))
        if not lid:
            raise PortError(f"{self.device}: more than {MCAST_LID_MIN - 1} RoCE peers")
        return lid

    def roce_gid(self, lid: int) -> bytes | None:
        """The GID a RoCE local LID stands for (None: no GID has it)."""
        return self._routes.get(lid)

    def _local_lid(self, gid: bytes) -> int:
        lid = self._route_of.get(gid)
        if lid is not None:
            return lid
        with self._routes_lock:
            lid = self._route_of.get(gid)
            if lid is None:
                lid = len(self._routes) + 1
                if lid >= MCAST_LID_MIN:
                    return 0                # out of local LIDs: known by GID alone
                self._routes[lid], self._route_of[gid] = gid, lid
            return lid

    def roce_join(self, mgid: bytes) -> Path:
        """On a RoCE port, stand in for an SA join: join the port's netdev to the MGID's IPv6 group and
        return the multicast path (GRH, DGID = MGID, port's active MTU)."""
        self._need_roce()
        mgid = bytes(mgid)
        if mgid not in self._groups:
            ifindex = self._gid_entries(1)[0].ndev_ifindex
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mgid + struct.pack("@I", ifindex))
            except OSError as exc:
                sock.close()
                raise PortError(f"cannot join {ipaddress.IPv6Address(mgid)} on ifindex {ifindex}: {exc}") from None
            self._groups[mgid] = sock
        return Path(dlid=0, mtu=self._active_mtu, dgid=mgid, grh=True)

    def roce_leave(self, mgid: bytes) -> None:
        """Undo `roce_join` (nothing if not joined)."""
        sock = self._groups.pop(bytes(mgid), None)
        if sock is not None:
            sock.close()

    def roce_joined(self, mgid: bytes) -> bool:
        """Whether the port's netdev is in the MGID's IPv6 group (through `roce_join`)."""
        return bytes(mgid) in self._groups

    # ---------------------------------------------------------------- events

    def _event_loop(self) -> None:
        fd = self._ctx.async_fd
        while True:
            ready, _, _ = select.select([fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            while (ev := self._ctx.get_async_event()) is not None:
                kind, element = ev
                if kind in ib.QP_ERROR_EVENTS or kind == ib.EVENT_CQ_ERR:
                    for qp in list(self._qps):
                        if qp.owns(element):
                            qp.to_error()
                elif kind in _EVENT_KIND and (element & 0xFFFFFFFF) == self.port_num:
                    try:
                        attrs = self.port()
                        self._active_mtu = attrs.active_mtu
                    except Exception:
                        attrs = None
                    self.events.put(PortEvent(_EVENT_KIND[kind], attrs))

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stop the event thread, close groups, QPs, AHs, pools, PD and the device; idempotent."""
        if self._closed:
            return
        os.write(self._stop_w, b"x")
        self._events_thread.join(timeout=5)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._closed = True
        for mgid in list(self._groups):
            self.roce_leave(mgid)
        for qp in list(self._qps):
            with contextlib.suppress(QpError):      # the device's close below frees what is left
                qp.close()
        for memory in list(self._memories):
            memory.close()
        for ah in self._ahs.values():
            ah.ah.close()
        self._ahs.clear()
        for pool in reversed(self._pools):
            pool.close()
        self._pools.clear()
        self.events.close()
        self._stack.close()
