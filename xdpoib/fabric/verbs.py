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
region of the PD, and `VerbsQp.post_send_memory` points each send's scatter entry straight at the frame in
it: the UMEM frame is the send buffer. A frame stays the backend's until its send completion is reaped
(at the next post on that QP, or when the owner asks `VerbsSendMemory.completed()`), then its offset is
handed back. At most half the memory's frames are in flight at once (beyond that a frame is copied into
the QP's own send buffers and handed back at once), so the owner always keeps frames to receive into.
Closing a QP hands back every frame it still held: flushed first (the QP is moved to ERR and its send
queue drained), and whatever is left once the QP is destroyed (the device no longer reads it).

A QP in the error state stays there: `VerbsQp.error` is set by the first error completion, and by an
async QP error event (QP_FATAL, QP_REQ_ERR, QP_ACCESS_ERR, or CQ_ERR on one of its CQs), which also
moves the QP to ERR explicitly so that its posted buffers complete with WR_FLUSH_ERR: the owner learns
of it from completions either way, and replaces the QP.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence

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
    SendMemory,
    SendRequest,
    UdQp,
    mtu_bytes,
)

_LINK_LAYER = {1: LinkLayer.INFINIBAND, 2: LinkLayer.ETHERNET}
_EVENT_KIND = {
    ib.EVENT_PORT_ACTIVE: PortEventKind.PORT_ACTIVE,
    ib.EVENT_PORT_ERR: PortEventKind.PORT_ERR,
    ib.EVENT_LID_CHANGE: PortEventKind.LID_CHANGE,
    ib.EVENT_CLIENT_REREGISTER: PortEventKind.CLIENT_REREGISTER,
    ib.EVENT_PKEY_CHANGE: PortEventKind.PKEY_CHANGE,
}
_STATUSES = {s.value for s in CompletionStatus}
_SEND_SLOT = 4096                # largest UD payload (IB MTU 4096)
_V4_MAPPED = bytes(10) + b"\xff\xff"
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
    """`count` registered buffers of `size` bytes in one region; buffer i starts at i * size."""

    def __init__(self, backend: VerbsBackend, count: int, size: int) -> None:
        if count <= 0 or size <= GRH_LEN:
            raise QpError(f"buffer pool needs count > 0 and size > {GRH_LEN} (got {count} x {size})")
        self.backend, self.count, self.size, self.stride = backend, count, size, size
        self.region = _Region(backend._pd, count * size)
        self._view = memoryview(self.region.mem)
        self.memory = self._view

    def view(self, index: int) -> memoryview:
        """A writable view of buffer `index`."""
        if not 0 <= index < self.count:
            raise QpError(f"buffer index {index} outside pool of {self.count}")
        return self._view[index * self.size:(index + 1) * self.size]

    def close(self) -> None:
        """Release the pool's memory registration."""
        self._view.release()
        self.region.close()


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

    def completed(self) -> list[int]:
        """Reap the send completions of every QP holding frames, then hand back the finished offsets."""
        for qp in list(self.holders):
            qp._reap_sends()
        return super().completed()

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
    """One UD QP at RTS with its own send CQ, receive CQ (behind a completion channel) and send buffers."""

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
        # Work requests and scatter entries are built once; posting only fills and links them.
        self._send_wrs = (ib.SendWr * send_depth)()
        self._send_sges = (ib.Sge * send_depth)()
        self._free_slots = list(range(send_depth - 1, -1, -1))
        self._zc: list[VerbsSendMemory | None] = [None] * send_depth     # slot -> memory it sends from
        self._zc_off = [0] * send_depth                                    # slot -> frame offset there
        self._zc_count = 0                                                 # slots sending from memory
        for i in range(send_depth):
            self._send_sges[i].addr = self._send_region.addr + i * _SEND_SLOT
            self._send_sges[i].lkey = self._send_region.lkey
            wr = self._send_wrs[i]
            wr.wr_id, wr.sg_list, wr.num_sge = i, ctypes.pointer(self._send_sges[i]), 1
            wr.opcode, wr.send_flags = ib.WR_SEND, ib.SEND_SIGNALED
        self._recv_wrs = (ib.RecvWr * pool.count)()
        self._recv_sges = (ib.Sge * pool.count)()
        for i in range(pool.count):
            self._recv_sges[i].addr = pool.region.addr + i * pool.size
            self._recv_sges[i].length, self._recv_sges[i].lkey = pool.size, pool.region.lkey
            wr = self._recv_wrs[i]
            wr.wr_id, wr.sg_list, wr.num_sge = i, ctypes.pointer(self._recv_sges[i]), 1
        self._send_mem = memoryview(self._send_region.mem)
        self._wr_size = ctypes.sizeof(ib.SendWr)
        self._send_base = ctypes.addressof(self._send_wrs)
        self._recv_wr_base = ctypes.addressof(self._recv_wrs)
        self._rwr_size = ctypes.sizeof(ib.RecvWr)

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

    def _reap_sends(self) -> None:
        if self._closed:
            return
        zc, done = self._zc, []
        for wc in self._send_cq.poll(len(self._send_wrs)):
            slot = wc.wr_id
            self._free_slots.append(slot)
            if zc[slot] is not None:
                done.append(slot)
            if wc.status != CompletionStatus.SUCCESS:
                self.error = True
        if done:
            self._hand_back(done)

    def _hand_back(self, slots: Iterable[int]) -> None:
        """These slots' sends from caller memory are over: give the frames back to their memory."""
        zc, offs = self._zc, self._zc_off
        by_memory: dict[VerbsSendMemory, list[int]] = {}
        n = 0
        for slot in slots:
            memory = zc[slot]
            zc[slot] = None
            by_memory.setdefault(memory, []).append(offs[slot])
            n += 1
        self._zc_count -= n
        for memory, done in by_memory.items():
            memory.finished(done)
            if not self._zc_count:
                memory.holders.discard(self)

    def post_send(self, batch: Sequence[SendRequest]) -> int:
        """Copy and post a batch; oversize payloads are dropped and counted (they count as accepted), and so
        is everything sent on a QP in the error state (QP_ERROR)."""
        self._check_open()
        self._reap_sends()
        if self.error:
            self.backend._counters.add(FabricCounter.QP_ERROR, len(batch))
            return len(batch)
        active = self.backend._active_mtu
        slots: list[int] = []
        accepted = 0
        for req in batch:
            ah = req.ah
            if not isinstance(ah, VerbsAh) or ah.backend is not self.backend or not ah.ah.ptr:
                raise QpError(f"address handle {ah!r} was not made by this backend")
            size = len(req.payload)
            if size > min(ah.path.mtu, active):
                self.backend._counters.add(FabricCounter.OVERSIZE)
                accepted += 1
                continue
            if not self._free_slots:
                break
            slot = self._free_slots.pop()
            self._send_mem[slot * _SEND_SLOT:slot * _SEND_SLOT + size] = req.payload
            sge = self._send_sges[slot]
            sge.addr, sge.length, sge.lkey = self._send_region.addr + slot * _SEND_SLOT, size, self._send_region.lkey
            ud = self._send_wrs[slot].wr.ud
            ud.ah, ud.remote_qpn, ud.remote_qkey = ah.ah.ptr, req.remote_qpn, req.remote_qkey
            slots.append(slot)
            accepted += 1
        if slots:
            for this, nxt in itertools.pairwise(slots):
                self._send_wrs[this].next = ctypes.cast(self._send_base + nxt * self._wr_size,
                                                        ctypes.POINTER(ib.SendWr))
            self._send_wrs[slots[-1]].next = None
            try:
                self._qp.post_send(self._send_wrs[slots[0]])
            except ib.VerbsCallError as exc:
                self._free_slots.extend(slots)
                raise QpError(f"post_send on QP {self.qpn:#x}: {exc}") from None
        return accepted

    def post_send_memory(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, memory: SendMemory,
                         frames: Sequence) -> int:
        """Post frames lying in registered `memory` without copying them (module doc): each scatter entry
        points at its frame. The contract's rules (fabric/base.py): the first accepted frames come back
        through `memory.completed()` once their sends complete; oversize ones, and all of them on a QP
        in the error state, are counted and come back at once; past the memory's in-flight limit a frame
        is copied into the QP's own send buffers (counted in `memory.copies`) and comes back at once."""
        if not isinstance(memory, VerbsSendMemory):
            return super().post_send_memory(ah, remote_qpn, remote_qkey, memory, frames)
        self._check_open()
        if memory.backend is not self.backend or memory.closed:
            raise QpError("the send memory was not registered with this backend, or is closed")
        if not isinstance(ah, VerbsAh) or ah.backend is not self.backend or not ah.ah.ptr:
            raise QpError(f"address handle {ah!r} was not made by this backend")
        memory.check(frames)
        self._reap_sends()
        n = len(frames)
        if self.error:
            self.backend._counters.add(FabricCounter.QP_ERROR, n)
            memory.in_flight += n
            memory.finished([f[0] for f in frames])
            return n
        limit = min(ah.path.mtu, self.backend._active_mtu)
        base, lkey, room = memory.addr, memory.lkey, memory.limit - memory.in_flight
        ah_ptr = ah.ah.ptr
        free, sges, wrs, zc, zc_off = self._free_slots, self._send_sges, self._send_wrs, self._zc, self._zc_off
        slots: list[int] = []
        now: list[int] = []             # accepted frames handed back at once (oversize, copied)
        taken = copied = 0
        for f in frames:
            off, size = f[0], f[1]
            if size > limit:
                now.append(off)
                taken += 1
                continue
            if not free:
                break
            slot = free.pop()
            sge = sges[slot]
            if room > 0:
                sge.addr, sge.length, sge.lkey = base + off, size, lkey
                zc[slot], zc_off[slot] = memory, off
                room -= 1
            else:
                start = slot * _SEND_SLOT
                self._send_mem[start:start + size] = memory.memory[off:off + size]
                sge.addr, sge.length, sge.lkey = self._send_region.addr + start, size, self._send_region.lkey
                now.append(off)
                copied += 1
            ud = wrs[slot].wr.ud
            ud.ah, ud.remote_qpn, ud.remote_qkey = ah_ptr, remote_qpn, remote_qkey
            slots.append(slot)
            taken += 1
        oversize = len(now) - copied
        if oversize:
            self.backend._counters.add(FabricCounter.OVERSIZE, oversize)
        if slots:
            for this, nxt in itertools.pairwise(slots):
                wrs[this].next = ctypes.cast(self._send_base + nxt * self._wr_size, ctypes.POINTER(ib.SendWr))
            wrs[slots[-1]].next = None
            try:
                self._qp.post_send(wrs[slots[0]])
            except ib.VerbsCallError as exc:
                for slot in slots:
                    zc[slot] = None
                free.extend(slots)
                raise QpError(f"post_send on QP {self.qpn:#x}: {exc}") from None
        held = len(slots) - copied
        if held:
            self._zc_count += held
            memory.holders.add(self)
        memory.copies += copied
        memory.in_flight += taken
        if now:
            memory.finished(now)
        return taken

    def post_recv(self, indices: Iterable[int]) -> int:
        """Post receive buffers by pool index, linked into one call."""
        self._check_open()
        idx = list(indices)
        for i in idx:
            if not 0 <= i < self.pool.count:
                raise QpError(f"buffer index {i} outside pool of {self.pool.count}")
        if len(set(idx)) != len(idx):
            raise QpError("a receive buffer can only be posted once per call")   # it would link a cycle
        if not idx:
            return 0
        for this, nxt in itertools.pairwise(idx):
            self._recv_wrs[this].next = ctypes.cast(self._recv_wr_base + nxt * self._rwr_size,
                                                    ctypes.POINTER(ib.RecvWr))
        self._recv_wrs[idx[-1]].next = None
        try:
            self._qp.post_recv(self._recv_wrs[idx[0]])
        except ib.VerbsCallError as exc:
            raise QpError(f"post_recv on QP {self.qpn:#x}: {exc}") from None
        return len(idx)

    def poll(self, max_entries: int = 64) -> list[Completion]:
        """Receive completions with the GRH area stripped and the source fields filled in."""
        self._check_open()
        self._chan.drain()
        wcs = self._recv_cq.poll(max_entries)
        if len(wcs) < max_entries:
            self._recv_cq.arm()         # then look again: a completion may have raced the arming
            wcs += self._recv_cq.poll(max_entries - len(wcs))
        return [self._completion(wc) for wc in wcs]

    def _completion(self, wc: ib.Wc) -> Completion:
        index = wc.wr_id
        buf = self.pool.view(index)
        status = CompletionStatus(wc.status) if wc.status in _STATUSES else CompletionStatus.GENERAL_ERR
        ok = status is CompletionStatus.SUCCESS
        if not ok:
            self.error = True       # verbs: any error completion leaves the QP in the error state
        byte_len = max(0, min(wc.byte_len, self.pool.size) - GRH_LEN) if ok else 0
        has_grh = ok and bool(wc.wc_flags & ib.WC_GRH)
        sgid = _grh_sgid(buf) if has_grh else None
        slid = wc.slid
        if sgid is not None and self.backend._link_layer is LinkLayer.ETHERNET:
            slid = self.backend._local_lid(sgid)        # RoCE: the sender's local LID (module doc)
        return Completion(status=status, byte_len=byte_len, src_qp=wc.src_qp, slid=slid, sgid=sgid,
                          has_grh=has_grh, pkey_index=self.pkey_index, index=index,
                          payload=buf[GRH_LEN:GRH_LEN + byte_len], sl=wc.sl)

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
            self._hand_back([i for i, m in enumerate(self._zc) if m is not None])


def _grh_sgid(buf: memoryview) -> bytes:
    """The source GID from a receive buffer's 40-byte GRH area (RoCEv2 over IPv4: an IPv4-mapped GID)."""
    if buf[0] >> 4 != 6 and buf[20] >> 4 == 4:      # RoCEv2/IPv4: the IPv4 header is in bytes 20..39
        return b"\0" * 10 + b"\xff\xff" + bytes(buf[32:36])
    return bytes(buf[8:24])


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
        """Allocate and register `count` receive buffers of `size` bytes (caller memory: not yet)."""
        self._check_open()
        if memory is not None:
            raise QpError("the verbs backend does not receive into caller memory yet")
        pool = VerbsPool(self, count, size)
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
