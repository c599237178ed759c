"""The `sim` backend: UD datagrams between processes on one machine, with InfiniBand's rules.

Each QP is an abstract unix datagram socket named after its fabric, port GUID and QPN; nothing is
written to disk, and the kernel frees every name when its process dies. Two more kinds of names act as
a registry that any process can read from /proc/net/unix:

    @xdpoib-sim/FABRIC/q/GUID/QPN          a QP's data socket
    @xdpoib-sim/FABRIC/l/LID/GUID          this port has that LID (rebound when the LID changes)
    @xdpoib-sim/FABRIC/m/MGID/GUID/QPN     that QP is attached to that multicast group

LIDs, GIDs, P_Key tables and multicast memberships come from the real SM (OpenSM on ibsim) through a
`PortControl`: normally `SAControl` over `xdpoib.fabric.sa.SAClient`. The rules kept (docs/design.md §5):
the sender drops payloads above the path MTU or its port's active MTU (counted, as hardware would lose
them) and sends multicast only when its port is a member; the receiver checks destination QPN, Q_Key and
P_Key, delivers multicast only to QPs attached to the MGID on a port the SA lists as a (full or
non-)member, and completes with source QPN, SLID, P_Key index and the SGID exactly when a GRH came (only
on multicast or when the sender asked for one). A QP attached to a group receives its own multicast:
`base.LoopbackFilter` drops it. A background thread re-reads the port and turns changes into
`PortEvent`s; it also drops the membership cache, since OpenSM forgets the memberships of a port that
went down.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from xdpoib.errors import XdpoibError
from xdpoib.fabric import simud_wire as wire
from xdpoib.fabric.base import (
    MCAST_QPN,
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
    MemoryPool,
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
    gid_str,
    mtu_bytes,
)

PREFIX = "xdpoib-sim"
JOIN_RECEIVES = 0x3            # JoinState bits that receive: FullMember, NonMember
RECV_BUFSIZE = 1 << 18         # largest datagram we read (a bundle plus one 4 KiB packet fits)
SEND_SOCKBUF = 1 << 22
BLOCKED_S = 0.0002            # the hold busy() asks for while a destination's queue is still full
QUICK_DEADLINE_S = 0.25       # a membership asked from the data path: the SA's answer deadline,
QUICK_WAIT_S = 0.05           # and how long to wait for another thread's query to finish first
WATCH_S = 1.0                 # how long a destination found full is watched by busy()
MAX_CONNS = 64                # destinations watched at once per QP (a connected socket each)
CQ_HIGH_WATER = 1024          # completions waiting before the QP stops reading its socket
READ_FAILURES_DOWN = 3         # consecutive failed port reads that mean the port is down
SMALL = 8                      # bundles and postings of at most this many: plain Python, no arrays
_ONE = struct.Struct("!HHH")   # a bundle of one packet: count, stride, its length (wire.encode_bundles)
_LEN1 = struct.Struct("!H")    # the one length of such a bundle
_SUCCESS = CompletionStatus.SUCCESS


class PortControl(Protocol):
    """Where the sim backend learns its port and its memberships (the SA, or a fixed description)."""

    def port(self) -> PortAttrs:
        """The port as it is now (raise an XdpoibError if it cannot be read)."""

    def member(self, mgid: bytes, port_gid: bytes, quick: bool = False) -> int | None:
        """JoinState of port_gid in group mgid (0 if the SA hides it), or None if it is not a member
        (quick: the caller is a data path, answer without waiting for a slow SA)."""

    def close(self) -> None:
        """Release what the control holds."""


class SAControl:
    """`PortControl` over an `SAClient`: SMPs to our port for its attributes, MCMemberRecord Gets."""

    def __init__(self, sa, owned: bool = True) -> None:
        self.sa = sa
        self.owned = owned

    @classmethod
    def open(cls, device: str | None = None, port: int | None = None) -> SAControl:
        """Open our own SA client on the umad port (a trusted requester, to see JoinStates)."""
        from xdpoib.fabric.sa import SAClient

        return cls(SAClient.open(device, port, sm_key=1))

    def port(self) -> PortAttrs:
        """Read the port through SMPs to ourselves."""
        lp = self.sa.port()
        try:
            state = PortState(lp.state)
        except ValueError:
            state = PortState.DOWN
        mtu = mtu_bytes(lp.active_mtu) if 1 <= lp.active_mtu <= 5 else 256
        return PortAttrs(lid=lp.lid, sm_lid=lp.sm_lid, state=state, active_mtu=mtu, port_guid=lp.port_guid,
                         gids=(lp.gid,), pkeys=tuple(lp.pkeys), link_layer=LinkLayer.INFINIBAND)

    def member(self, mgid: bytes, port_gid: bytes, quick: bool = False) -> int | None:
        """One MCMemberRecord Get (MGID + PortGID); quick: a short deadline, and at most a short wait
        behind another thread's query (an XdpoibError instead)."""
        if quick:
            rec = self.sa.member(mgid, port_gid, deadline=QUICK_DEADLINE_S, wait=QUICK_WAIT_S)
        else:
            rec = self.sa.member(mgid, port_gid)
        return None if rec is None else rec.join_state

    def close(self) -> None:
        """Close the SA client if we opened it."""
        if self.owned:
            self.sa.close()


class StaticControl:
    """A fixed port and membership table: the data plane without an SM (unit tests, demos)."""

    def __init__(self, attrs: PortAttrs, memberships: dict[bytes, int] | None = None) -> None:
        self.attrs = attrs
        self.memberships = dict(memberships or {})

    def port(self) -> PortAttrs:
        """The port as last set."""
        return self.attrs

    def member(self, mgid: bytes, port_gid: bytes, quick: bool = False) -> int | None:
        """JoinState from the table (only for our own GID)."""
        return self.memberships.get(bytes(mgid)) if bytes(port_gid) == self.attrs.gid else None

    def close(self) -> None:
        """Nothing to release."""


# ---------------------------------------------------------------- names and registry

def _name(fabric: str, *parts: str) -> bytes:
    return b"\0" + "/".join((PREFIX, fabric, *parts)).encode()


def qp_address(fabric: str, guid: int, qpn: int) -> bytes:
    """The abstract socket address of one QP."""
    return _name(fabric, "q", f"{guid:016x}", f"{qpn:06x}")


def scan(fabric: str) -> tuple[dict[int, int], dict[bytes, list[tuple[int, int]]]]:
    """Read the registry: {LID: GUID} and {MGID: [(GUID, QPN), ...]} from /proc/net/unix."""
    head = f"@{PREFIX}/{fabric}/"
    lids: dict[int, int] = {}
    groups: dict[bytes, list[tuple[int, int]]] = {}
    with open("/proc/net/unix") as f:
        for line in f:
            cols = line.split()
            if len(cols) < 8 or not cols[7].startswith(head):
                continue
            parts = cols[7][len(head):].split("/")
            try:
                if parts[0] == "l" and len(parts) in (3, 4):       # l/LID/GUID[/PID]
                    lids[int(parts[1], 16)] = int(parts[2], 16)
                elif parts[0] == "m" and len(parts) == 4:
                    member = (int(parts[2], 16), int(parts[3], 16))
                    groups.setdefault(bytes.fromhex(parts[1]), []).append(member)
            except ValueError:
                continue
    return lids, groups


def _bound(name: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.bind(name)
    except BaseException:
        s.close()
        raise
    return s


# ---------------------------------------------------------------- QP

@dataclass(frozen=True)
class _Flow:
    limit: int                       # largest payload: min(path MTU, port active MTU)
    prefix: bytes                    # the flow's version 2 header (count and stride excluded)
    dests: Sequence[bytes]           # socket addresses to copy each packet to
    drop: FabricCounter | None = None


class _Entry:
    """Completions of one flow in the CQ: one status, the packet header (None for flushed buffers), the
    buffer indices and the payload lengths (arrays); made into columns or objects when polled."""

    __slots__ = ("idx", "lengths", "p", "status")

    def __init__(self, status: int, p: wire.Packet | None, idx: np.ndarray, lengths: np.ndarray) -> None:
        self.status, self.p, self.idx, self.lengths = int(status), p, idx, lengths

    def part(self, start: int, end: int | None) -> _Entry:
        return _Entry(self.status, self.p, self.idx[start:end], self.lengths[start:end])

    def columns(self, pkey_index: int) -> RecvBatch:
        k, p = len(self.idx), self.p
        b = RecvBatch(np.full(k, self.status, np.uint8), np.asarray(self.lengths, np.uint32),
                      np.zeros(k, np.uint32), np.zeros(k, np.uint16), np.zeros(k, np.uint8), np.zeros(k, bool),
                      np.asarray(self.idx, np.int32), np.zeros((k, 16), np.uint8), pkey_index)
        if p is not None:
            b.src_qp[:], b.slid[:], b.sl[:] = p.src_qpn, p.slid, p.sl
            if p.grh:
                b.grh[:] = True
                b.sgid[:] = np.frombuffer(p.sgid, np.uint8)
        if self.status:
            b.byte_len[:] = 0
        return b


@dataclass
class _Attachment:
    mlid: int
    marker: socket.socket


class SimQp(UdQp):
    """A UD QP of the sim backend (see the module doc for the rules it keeps)."""

    #: `fileno()` is readable while, and only while, datagrams or completions wait (an epoll set over the
    #: socket and the CQ's eventfd): a caller's event loop may skip polling it when it was not readable
    exact_fd = True

    def __init__(self, backend: SimUdBackend, pkey: int, pkey_index: int, qkey: int, pool: BufferPool):
        if not isinstance(pool, MemoryPool):
            raise QpError("the sim backend receives into pools from its own alloc_pool()")
        self.backend = backend
        self.pkey, self.pkey_index, self.qkey, self.pool = pkey, pkey_index, qkey, pool
        self.qpn = 0
        for _ in range(64):
            qpn = random.randint(0x100, MCAST_QPN - 1)
            try:
                self.sock = _bound(qp_address(backend.fabric, backend.guid, qpn))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise QpError(f"cannot create a sim QP: {exc}") from None
            self.qpn = qpn
            break
        else:
            raise QpError("cannot find a free QPN")
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, SEND_SOCKBUF)
        self._ring = np.zeros(pool.count, np.int32)      # posted receive buffers, oldest at _head
        self._head = self._nposted = 0
        self._cq: deque[_Entry] = deque()                # completions, a bundle's worth per entry
        self._cq_len = 0
        self._attached: dict[bytes, _Attachment] = {}
        self._rbuf = bytearray(RECV_BUFSIZE)
        self._rows = pool.rows()
        self._lock = threading.Lock()
        # readable while the socket has data or completions wait in the CQ
        self._ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._signalled = False
        self.error = False              # the QP is in the error state (after a length error)
        self._blocked: dict[bytes, tuple[socket.socket, float]] = {}   # found full: (socket, when)
        self._flows: dict[tuple, tuple] = {}    # unicast flows worked out: (AH id, QPN, Q_Key) -> (checks, flow)
        self._verdicts: dict[bytes, tuple] = {}  # unicast flow headers judged, while the port's attributes
        self._verdicts_of = None                # are this object (re-read ten times a second)
        self._epoll = select.epoll()
        self._epoll.register(self.sock.fileno(), select.EPOLLIN)
        self._epoll.register(self._ready, select.EPOLLIN)
        self.closed = False

    def __repr__(self) -> str:
        return f"SimQp(qpn={self.qpn:#x}, pkey={self.pkey:#06x}, qkey={self.qkey:#x})"

    def _check_open(self) -> None:
        if self.closed:
            raise BackendClosedError(f"QP {self.qpn:#x} is closed")

    # ---- send

    def _send_ready(self, n: int) -> bool:
        """Count n sends as lost if the QP or the port cannot send; True if they may go."""
        count = self.backend._counters.add
        if self.error:
            count(FabricCounter.QP_ERROR, n)
            return False
        if self.backend.attrs.state is not PortState.ACTIVE:
            count(FabricCounter.PORT_DOWN, n)
            return False
        return True

    def post_send(self, batch: Sequence[SendRequest]) -> int:
        """Send a batch: the requests of each flow (AH, QPN, Q_Key) go as version 2 bundles."""
        self._check_open()
        if not self._send_ready(len(batch)):
            return len(batch)
        flows: dict[tuple, tuple[_Flow, list]] = {}
        port, groups = self.backend.attrs, None
        for req in batch:
            key = (id(req.ah), req.remote_qpn, req.remote_qkey)
            hit = flows.get(key)
            if hit is None:
                if req.ah.path.multicast and groups is None:
                    groups = self.backend.registry(fresh=True)[1]
                hit = flows[key] = (self._flow(req, port, groups), [])
            hit[1].append(req.payload)
        for flow, payloads in flows.values():
            self._send_flow(flow, payloads)
        return len(batch)

    def post_send_to(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, payloads: Sequence) -> int:
        """Send many payloads to one destination: the flow is worked out once."""
        self._check_open()
        n = len(payloads)
        if not self._send_ready(n):
            return n
        self._send_flow(self._flow_to(ah, remote_qpn, remote_qkey), payloads)
        return n

    def _flow_to(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int) -> _Flow:
        """The flow of one destination. Unicast flows are kept while the AH's path, the port's attributes
        and the LID registry they were worked out from stay the same (a ping's every send would otherwise
        build its header and look its LID up again); multicast ones are worked out each time (their
        members and our membership change under them)."""
        b = self.backend
        path = ah.path
        if path.multicast:
            return self._flow(SendRequest(ah, remote_qpn, remote_qkey, b""), b.attrs, b.registry(fresh=True)[1])
        b.guid_for_lid(path.dlid)               # keeps the registry fresh (a re-read changes its stamp)
        key = (id(ah), remote_qpn, remote_qkey)
        hit = self._flows.get(key)
        attrs = b.attrs
        if hit is not None:
            c = hit[0]
            if c[0] is ah and c[1] is path and c[3] == b._lids_at and (c[2] is attrs or c[2] == attrs):
                return hit[1]
        flow = self._flow(SendRequest(ah, remote_qpn, remote_qkey, b""), attrs, None)
        if len(self._flows) >= 4096:
            self._flows.clear()
        self._flows[key] = ((ah, path, attrs, b._lids_at), flow)
        return flow

    def _send_flow(self, flow: _Flow, payloads: Sequence) -> None:
        count = self.backend._counters.add
        if flow.drop is not None:
            count(flow.drop, len(payloads))
            return
        kept = [p for p in payloads if len(p) <= flow.limit]
        if len(kept) < len(payloads):
            count(FabricCounter.OVERSIZE, len(payloads) - len(kept))
        if len(kept) == 1 and len(kept[0]):        # one frame (a ping's): its bundle without the general loop
            n = len(kept[0])
            self._send_datagrams(flow.dests, [([flow.prefix + _ONE.pack(1, n, n), kept[0]], 1)])
        elif kept:
            self._send_datagrams(flow.dests, [([d], k) for d, k in wire.encode_bundles(flow.prefix, kept)])

    def post_send_batch(self, ah: AddressHandle, remote_qpn: int, remote_qkey: int, memory: SendMemory,
                        offsets: np.ndarray, lengths: np.ndarray) -> int:
        """Frames of `memory` to one destination as version 2 bundles: gathered into the bundle's payload
        block with one array copy (the sim's only copy: `memory.copies`), header and lengths in front,
        one `sendmsg` per bundle; every frame is handed back at once."""
        self._check_open()
        if memory.closed:
            raise BackendClosedError("the send memory is closed")
        memory.check_arrays(offsets, lengths)
        n = len(offsets)
        if not n:
            return 0
        memory.in_flight += n
        every = offsets
        try:
            if not self._send_ready(n):
                return n
            b = self.backend
            flow = self._flow_to(ah, remote_qpn, remote_qkey)
            if flow.drop is not None:
                b._counters.add(flow.drop, n)
                return n
            fits = lengths <= flow.limit
            if not fits.all():
                b._counters.add(FabricCounter.OVERSIZE, int(n - fits.sum()))
                offsets, lengths = offsets[fits], lengths[fits]
            m = len(offsets)
            if not m:
                return n
            stride = int(lengths.max()) or 1
            size = memory.size
            col = offsets % size
            c0 = int(col[0])
            if (col == c0).all() and c0 + stride <= size:
                block = memory.rows()[offsets // size, c0:c0 + stride]
            else:                       # frames at different places in their UMEM frames: one by one
                mv = memory.memory
                block = np.frombuffer(b"".join(bytes(mv[o:o + ln]).ljust(stride, b"\0") for o, ln in
                                               zip(offsets.tolist(), lengths.tolist(), strict=True)),
                                      np.uint8).reshape(m, stride)
            memory.copies += m
            per = wire.bundle_limit(stride)
            self._send_datagrams(flow.dests, [(wire.bundle_parts(flow.prefix, lengths[i:i + per], block[i:i + per]),
                                               min(per, m - i)) for i in range(0, m, per)])
            return n
        finally:
            memory.finished(every)      # copied (or dropped) at post time: the caller's again at once

    def _send_datagrams(self, dests: Sequence[bytes], datagrams: list[tuple[list, int]]) -> None:
        """Each datagram (its buffers, and how many packets it holds) to every destination; a full
        destination is counted (RX_OVERRUN) and watched (`busy`), a gone one counted (NO_DESTINATION)."""
        count = self.backend._counters.add
        for dest in dests:
            watched = self._blocked.get(dest)
            conn = watched[0] if watched is not None else None
            for parts, k in datagrams:
                try:
                    if conn is None:
                        self.sock.sendmsg(parts, (), 0, dest)
                    else:
                        conn.sendmsg(parts)
                except (ConnectionRefusedError, FileNotFoundError):
                    count(FabricCounter.NO_DESTINATION, k)
                    self._unwatch(dest)
                    conn = None
                except BlockingIOError:
                    count(FabricCounter.RX_OVERRUN, k)
                    if conn is None:
                        conn = self._connect(dest)
                    if conn is not None:
                        self._blocked[dest] = (conn, time.monotonic())

    def busy(self) -> float:
        """While a destination that was found full is still congested, a short hold: the caller should
        leave frames where they are (the AF_XDP ring, whose overflow the kernel sheds before any copy)
        rather than build datagrams the receiver cannot take. A destination found full is watched for
        a second after its last refusal through a socket connected to it, which the kernel reports
        writable only while that receiver's queue has room, so a sender faster than its receiver
        settles at the receiver's pace instead of losing every other batch. Only destinations being
        watched hold a socket (closed when the watch ends)."""
        if not self._blocked:
            return 0.0
        now = time.monotonic()
        for dest, (_c, t) in list(self._blocked.items()):
            if now - t > WATCH_S:
                self._unwatch(dest)
        socks = [c for c, _t in self._blocked.values()]
        if not socks:
            return 0.0
        try:
            _, writable, _ = select.select([], socks, [], 0)
        except (OSError, ValueError):
            for dest in list(self._blocked):
                self._unwatch(dest)
            return 0.0
        return 0.0 if len(writable) == len(socks) else BLOCKED_S

    def wait_writable(self, timeout: float) -> None:
        """Wait until every congested destination takes datagrams again (its connected socket writable),
        at most `timeout` seconds."""
        socks = [c for c, _t in self._blocked.values()]
        if not socks:
            return
        with contextlib.suppress(OSError, ValueError):
            select.select([], socks, [], timeout)

    def _unwatch(self, dest: bytes) -> None:
        hit = self._blocked.pop(dest, None)
        if hit is not None:
            hit[0].close()

    def _connect(self, dest: bytes) -> socket.socket | None:
        """A socket connected to one destination QP (None if it cannot connect)."""
        if len(self._blocked) >= MAX_CONNS:
            self._unwatch(next(iter(self._blocked)))
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_SOCKBUF)
            conn.setblocking(False)
            conn.connect(dest)
        except OSError:
            conn.close()
            return None
        return conn

    def _flow(self, req: SendRequest, port: PortAttrs, groups) -> _Flow:
        """Where the packets of one (AH, QPN, Q_Key) go, and their shared header."""
        b = self.backend
        path = req.ah.path
        limit = min(path.mtu, port.active_mtu)
        sgid = port.gids[path.sgid_index] if path.grh else bytes(16)
        dgid = path.dgid if path.grh else bytes(16)
        head = wire.flow_header(wire.Packet(
            slid=port.lid, dlid=path.dlid, sl=path.sl, pkey=self.pkey, src_qpn=self.qpn, dst_qpn=req.remote_qpn,
            qkey=wire.effective_qkey(req.remote_qkey, self.qkey), grh=path.grh, sgid=sgid, dgid=dgid,
            payload=b""))
        if path.multicast:
            if not b.is_member(dgid, sending=True):
                return _Flow(limit, head, (), FabricCounter.NOT_MEMBER)
            return _Flow(limit, head, [qp_address(b.fabric, g, q) for g, q in groups.get(dgid, ())])
        guid = b.guid_for_lid(path.dlid)
        if guid is None:
            return _Flow(limit, head, (), FabricCounter.NO_DESTINATION)
        return _Flow(limit, head, [qp_address(b.fabric, guid, req.remote_qpn)])

    # ---- receive

    def _drain(self, signal: bool = True) -> None:
        """Take every datagram that arrived and match it against the buffers posted now (as an HCA does);
        then keep the eventfd in step with the CQ (`_signal`), unless the caller does it itself."""
        count = self.backend._counters.add
        view = memoryview(self._rbuf)
        verdicts: dict[bytes, tuple[FabricCounter | None, wire.Packet]] = {}
        # Read only while buffers are posted and the CQ is not backed up: what we do not read stays in
        # the socket queue, and a full queue makes the sender's sendto fail (counted there as
        # RX_OVERRUN), so overload is shed before any work is spent on it (no receive livelock).
        while (self._nposted or self.error) and self._cq_len < CQ_HIGH_WATER:
            try:
                n = self.sock.recv_into(self._rbuf)
            except (BlockingIOError, InterruptedError):
                break
            if view[:2] == wire.BUNDLE_MAGIC:
                hdr = wire.bundle_header(view[:n])
                if hdr is not None and hdr[0] <= SMALL:       # a few packets: plain Python
                    head = bytes(view[:wire.FLOW_LEN])
                    seen = verdicts.get(head)
                    if seen is None:
                        seen = verdicts[head] = self._verdict(head)
                    k, stride = hdr
                    if seen[0] is not None:
                        count(seen[0], k)
                        continue
                    lens = _LEN1.unpack_from(view, wire.BUNDLE.size) if k == 1 else \
                        struct.unpack_from(f"!{k}H", view, wire.BUNDLE.size)
                    if max(lens) > stride:
                        count(FabricCounter.BAD_DATAGRAM)
                        continue
                    self._deliver_small(seen[1], lens, view, wire.BUNDLE.size + 2 * k, stride)
                    continue
                got = wire.decode_bundle(view[:n])
                if got is None:
                    count(FabricCounter.BAD_DATAGRAM)
                    continue
                head, lengths, block = got
                seen = verdicts.get(head)
                if seen is None:
                    seen = verdicts[head] = self._verdict(head)
                if seen[0] is not None:
                    count(seen[0], len(lengths))
                    continue
                self._deliver(seen[1], lengths, block)
                continue
            parts, junk = wire.split(view[:n])       # version 1: one header per packet
            if junk:
                count(FabricCounter.BAD_DATAGRAM)
            for head, body in parts:
                seen = verdicts.get(head)
                if seen is None:
                    seen = verdicts[head] = self._judge(wire.parse_prefix(head))
                if seen[0] is not None:
                    count(seen[0])
                    continue
                size = len(body)
                block = np.frombuffer(bytes(body) or b"\0", np.uint8).reshape(1, max(size, 1))
                self._deliver(seen[1], np.array([size], np.int64), block)
        if signal:
            self._signal()

    def _deliver(self, p: wire.Packet, lengths: np.ndarray, block: np.ndarray) -> None:
        """Packets of one flow (lengths, count x stride payloads) into posted buffers, as one CQ entry."""
        count = self.backend._counters.add
        n = len(lengths)
        if self.error:
            count(FabricCounter.QP_ERROR, n)
            return
        k = min(n, self._nposted)
        if k < n:
            count(FabricCounter.NO_RECV_BUFFER, n - k)
        if not k:
            return
        lengths = lengths[:k]
        room = self.pool.size - wire.GRH_LEN
        big = lengths > room
        if big.any():
            j = int(big.argmax())
            if j:
                self._deliver(p, lengths[:j], block[:j])
            self._cq_put(_Entry(CompletionStatus.LOC_LEN_ERR, p, self._take_posted(1), np.zeros(1, np.int64)))
            self._to_error()
            if k - j - 1:
                count(FabricCounter.QP_ERROR, k - j - 1)
            return
        idx = self._take_posted(k)
        rows = self._rows
        width = min(block.shape[1], room)
        rows[idx, wire.GRH_LEN:wire.GRH_LEN + width] = block[:k, :width]
        if p.grh:
            rows[idx, :wire.GRH_LEN] = np.frombuffer(wire.grh(p, length=0), np.uint8)
            rows[idx, 4] = lengths >> 8
            rows[idx, 5] = lengths & 0xFF
        self._cq_put(_Entry(CompletionStatus.SUCCESS, p, idx, lengths))

    def _deliver_small(self, p: wire.Packet, lens, view, start: int, stride: int) -> None:
        """`_deliver` for a few packets, without arrays."""
        count = self.backend._counters.add
        if self.error:
            count(FabricCounter.QP_ERROR, len(lens))
            return
        room = self.pool.size - wire.GRH_LEN
        mem, pstride = self.pool.memory, self.pool.stride
        ring, c = self._ring, len(self._ring)
        idx, got = [], []
        for j, size in enumerate(lens):
            if not self._nposted:
                count(FabricCounter.NO_RECV_BUFFER, len(lens) - j)
                break
            i = int(ring[self._head])
            self._head = (self._head + 1) % c
            self._nposted -= 1
            if size > room:
                if idx:
                    self._cq_put(_Entry(CompletionStatus.SUCCESS, p, idx, got))
                self._cq_put(_Entry(CompletionStatus.LOC_LEN_ERR, p, [i], [0]))
                self._to_error()
                if len(lens) - j - 1:
                    count(FabricCounter.QP_ERROR, len(lens) - j - 1)
                return
            base = i * pstride
            if p.grh:
                mem[base:base + wire.GRH_LEN] = wire.grh(p, length=size)
            src = start + j * stride
            mem[base + wire.GRH_LEN:base + wire.GRH_LEN + size] = view[src:src + size]
            idx.append(i)
            got.append(size)
        if idx:
            self._cq_put(_Entry(CompletionStatus.SUCCESS, p, idx, got))

    def _cq_put(self, e: _Entry) -> None:
        self._cq.append(e)
        self._cq_len += len(e.idx)

    def _take_posted(self, k: int) -> np.ndarray:
        """The k oldest posted buffers, no longer posted."""
        ring, h = self._ring, self._head
        c = len(ring)
        idx = ring[h:h + k].copy() if h + k <= c else np.concatenate((ring[h:], ring[:h + k - c]))
        self._head = (h + k) % c
        self._nposted -= k
        return idx

    def _signal(self) -> None:
        """Keep the eventfd readable exactly while completions wait."""
        if self._cq_len and not self._signalled:
            os.eventfd_write(self._ready, 1)
            self._signalled = True
        elif not self._cq_len and self._signalled:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._ready)
            self._signalled = False

    def _to_error(self) -> None:
        """Move to the error state: every posted buffer completes with WR_FLUSH_ERR."""
        self.error = True
        self._flush(self._take_posted(self._nposted))

    def _flush(self, indices: np.ndarray) -> None:
        if len(indices):
            self._cq_put(_Entry(CompletionStatus.WR_FLUSH_ERR, None, np.asarray(indices, np.int32),
                                np.zeros(len(indices), np.int64)))

    def _verdict(self, head: bytes) -> tuple[FabricCounter | None, wire.Packet]:
        """`_judge` of a version 2 flow header; unicast verdicts are kept while the port's attributes stay
        the same object (they depend on nothing else: multicast ones also on memberships, judged each time)."""
        attrs = self.backend.attrs
        if self._verdicts_of is attrs:
            hit = self._verdicts.get(head)
            if hit is not None:
                return hit
        else:
            self._verdicts, self._verdicts_of = {}, attrs
        seen = self._judge(wire.parse_flow(head))
        if seen[1].dst_qpn != MCAST_QPN and len(self._verdicts) < 1024:
            self._verdicts[head] = seen
        return seen

    def _judge(self, p: wire.Packet) -> tuple[FabricCounter | None, wire.Packet]:
        """Why this QP drops packets with p's header (None: accept them)."""
        b = self.backend
        port = b.attrs
        if port.state is not PortState.ACTIVE:
            return FabricCounter.PORT_DOWN, p
        verdict = wire.receive_verdict(p, self.qpn, self.qkey, self.pkey, port.pkeys, self._attached.keys())
        if verdict is None and p.dst_qpn == MCAST_QPN and not b.is_member(p.dgid, sending=False):
            verdict = FabricCounter.NOT_MEMBER
        return verdict, p

    def post_recv(self, indices) -> int:
        """Post receive buffers; a list or an integer array of pool indices. Datagrams already waiting in
        the socket are matched at the next poll, against the oldest posted buffers first, as if matched
        now (no drain here: a ping's every hop would pay a failing recv for it); only a QP in the error
        state drains first, so that what arrived before the post is counted against the error."""
        self._check_open()
        if not isinstance(indices, np.ndarray):
            indices = list(indices)
            if len(indices) <= SMALL:
                return self._post_recv_small(indices)
        idx = np.asarray(indices, np.int32)
        k = len(idx)
        if k and (idx.min() < 0 or idx.max() >= self.pool.count):
            bad = int(idx[(idx < 0) | (idx >= self.pool.count)][0])
            raise QpError(f"buffer index {bad} outside the pool of {self.pool.count}")
        with self._lock:
            if self.error:
                self._drain()
                self._flush(idx)
                self._signal()
                return k
            ring = self._ring
            c = len(ring)
            if self._nposted + k > c:
                raise QpError(f"posting {k} buffers would post more than the pool's {c}")
            t = (self._head + self._nposted) % c
            first = min(k, c - t)
            ring[t:t + first] = idx[:first]
            ring[:k - first] = idx[first:]
            self._nposted += k
        return k

    def _take_entries(self, max_entries: int) -> list[_Entry]:
        """Up to max_entries completions off the CQ, as entries (the last one split if needed)."""
        self._check_open()
        with self._lock:
            self._drain(signal=False)           # `_signal` below, once: no eventfd write and read per poll
            parts, want, cq = [], max_entries, self._cq
            while cq and want > 0:
                e = cq.popleft()
                if len(e.idx) > want:
                    cq.appendleft(e.part(want, None))
                    e = e.part(0, want)
                parts.append(e)
                want -= len(e.idx)
            self._cq_len -= max_entries - want
            self._signal()
        return parts

    def _post_recv_small(self, indices: list[int]) -> int:
        for i in indices:
            if not 0 <= i < self.pool.count:
                raise QpError(f"buffer index {i} outside the pool of {self.pool.count}")
        with self._lock:
            if self.error:
                self._drain()
                self._flush(np.asarray(indices, np.int32))
                self._signal()
                return len(indices)
            ring = self._ring
            c = len(ring)
            if self._nposted + len(indices) > c:
                raise QpError(f"posting {len(indices)} buffers would post more than the pool's {c}")
            t = self._head + self._nposted
            for i in indices:
                ring[t % c] = i
                t += 1
            self._nposted += len(indices)
        return len(indices)

    def poll_batch(self, max_entries: int = 256) -> RecvBatch:
        """Up to max_entries completions as columns, oldest first."""
        parts = self._take_entries(max_entries)
        if not parts:
            return RecvBatch.empty(self.pkey_index)
        # consecutive entries of one flow (a sender's bundles) become one entry: one set of columns
        runs: list[list[_Entry]] = [[parts[0]]]
        for e in parts[1:]:
            last = runs[-1][0]
            if e.status == last.status and e.p == last.p:
                runs[-1].append(e)
            else:
                runs.append([e])
        return RecvBatch.concat([(r[0] if len(r) == 1 else
                                  _Entry(r[0].status, r[0].p, np.concatenate([e.idx for e in r]),
                                         np.concatenate([e.lengths for e in r]))).columns(self.pkey_index)
                                 for r in runs])

    def poll(self, max_entries: int = 64) -> list[Completion]:
        """Up to max_entries completions, oldest first (made from the entries without columns)."""
        out: list[Completion] = []
        mem, stride, grh_len = self.pool.memory, self.pool.stride, wire.GRH_LEN
        for e in self._take_entries(max_entries):
            p = e.p
            status = _SUCCESS if not e.status else CompletionStatus(e.status)
            idx, lengths = e.idx, e.lengths
            if isinstance(idx, np.ndarray):
                idx, lengths = idx.tolist(), lengths.tolist()
            for i, n in zip(idx, lengths, strict=True):
                if p is None:
                    out.append(Completion(status, 0, 0, 0, None, False, self.pkey_index, i, b""))
                    continue
                start = i * stride + grh_len
                out.append(Completion(status, n if not status else 0, p.src_qpn, p.slid, p.sgid if p.grh else None,
                                      p.grh, self.pkey_index, i, mem[start:start + n] if not status else b"", p.sl))
        return out

    def fileno(self) -> int:
        """An epoll descriptor: readable while datagrams or completions wait."""
        self._check_open()
        return self._epoll.fileno()

    # ---- multicast

    def attach_mcast(self, mgid: bytes, mlid: int) -> None:
        """Attach to a group: publish this QP in the group's registry."""
        self._check_open()
        mgid = bytes(mgid)
        if len(mgid) != 16 or mgid[0] != 0xFF:
            raise QpError(f"not a multicast GID: {gid_str(mgid) if len(mgid) == 16 else mgid.hex()}")
        with self._lock:
            if mgid in self._attached:
                return
            marker = _bound(_name(self.backend.fabric, "m", mgid.hex(), f"{self.backend.guid:016x}",
                                  f"{self.qpn:06x}"))
            self._attached[mgid] = _Attachment(mlid, marker)
        self.backend.forget_memberships(mgid)      # the caller has just joined, most likely

    def detach_mcast(self, mgid: bytes, mlid: int) -> None:
        """Detach from a group (QpError if not attached)."""
        self._check_open()
        with self._lock:
            att = self._attached.pop(bytes(mgid), None)
        if att is None:
            raise QpError(f"QP {self.qpn:#x} is not attached to "
                          f"{gid_str(mgid) if len(mgid) == 16 else bytes(mgid).hex()}")
        att.marker.close()
        self.backend.forget_memberships(bytes(mgid))

    def close(self) -> None:
        """Destroy the QP: its names disappear, posted buffers are dropped. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            for att in self._attached.values():
                att.marker.close()
            self._attached.clear()
            self._epoll.close()
            os.close(self._ready)
            self.sock.close()
            for dest in list(self._blocked):
                self._unwatch(dest)
            self._nposted = 0
            self._cq.clear()
            self._cq_len = 0
        self.backend._forget(self)


# ---------------------------------------------------------------- backend

class SimUdBackend(Backend):
    """The sim data plane for one port of one fabric (see the module doc)."""

    def __init__(self, fabric: str, control: PortControl, poll_interval: float = 0.1,
                 member_ttl: float = 1.0) -> None:
        if not fabric or "/" in fabric or len(fabric) > 40:
            raise PortError(f"bad sim fabric name {fabric!r} (1-40 characters, no '/')")
        self.fabric = fabric
        self.control = control
        self.poll_interval = poll_interval
        self.member_ttl = member_ttl
        self.events = EventQueue()
        self._counters = Counters()
        self._qps: dict[int, SimQp] = {}
        self._lock = threading.RLock()
        self._members: dict[bytes, tuple[int | None, float]] = {}
        self._stale: set[bytes] = set()
        self._wake = threading.Event()
        self._lids: dict[int, int] = {}
        self._lids_at = 0.0
        self._lids_stale = False        # the data path found the registry a second old (`guid_for_lid`)
        self._closed = False
        self._lid_marker: socket.socket | None = None
        self._read_failures = 0
        try:
            self.attrs = control.port()
        except BaseException:
            self.events.close()
            raise
        self.guid = self.attrs.port_guid
        self._publish_lid(self.attrs.lid)
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name=f"simud-{fabric}", daemon=True)
        self._monitor.start()

    @classmethod
    def open(cls, fabric: str, sa=None, **kw) -> SimUdBackend:
        """Open the sim data plane of `fabric` for this process's port (an SAClient, or our own)."""
        control = SAControl(sa, owned=False) if sa is not None else SAControl.open()
        try:
            return cls(fabric, control, **kw)
        except BaseException:
            control.close()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosedError(f"sim backend {self.fabric} is closed")

    # ---- registry

    def _publish_lid(self, lid: int) -> None:
        if self._lid_marker is not None:
            self._lid_marker.close()
            self._lid_marker = None
        if lid:
            # one name per process: two agents of one port (a restart's successor beside the running
            # agent) each publish it, so the port's LID stays known when either exits
            try:
                self._lid_marker = _bound(_name(self.fabric, "l", f"{lid:04x}", f"{self.guid:016x}",
                                                f"{os.getpid()}"))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise

    def registry(self, fresh: bool = False) -> tuple[dict[int, int], dict[bytes, list[tuple[int, int]]]]:
        """The fabric's {LID: GUID} and {MGID: [(GUID, QPN)]}, read now."""
        lids, groups = scan(self.fabric)
        with self._lock:
            self._lids, self._lids_at = lids, time.monotonic()
        return lids, groups

    def guid_for_lid(self, lid: int) -> int | None:
        """The port GUID that has `lid`: from the registry as read at most a second ago; an older read is
        still answered from but re-read at once by the monitor thread (reading /proc/net/unix takes
        100-300 us, a whole round trip, on the sending agent's loop); a miss re-reads it here."""
        now = time.monotonic()
        guid = self._lids.get(lid)
        if guid is None:
            if now - self._lids_at > 0.005:
                guid = self.registry()[0].get(lid)
        elif now - self._lids_at >= 1.0 and not self._lids_stale:
            self._lids_stale = True
            self._wake.set()
        return guid

    # ---- memberships

    def is_member(self, mgid: bytes, sending: bool) -> bool:
        """Whether the SA lists our port in `mgid` (any JoinState to send; Full/NonMember to receive).

        Called on the data path, so it never waits for the SA once a group is known: an expired entry
        is answered from the cache and re-read by the monitor thread. Only a group never seen (or just
        joined: the cache is dropped then) is asked at once, with a short deadline."""
        now = time.monotonic()
        with self._lock:
            hit = self._members.get(mgid)
            if hit is not None and hit[1] < now:
                self._stale.add(mgid)
                self._wake.set()
        if hit is None:
            hit = self._ask_member(mgid, quick=True)
        state = hit[0]
        if state is None:
            return False
        return sending or state == 0 or bool(state & JOIN_RECEIVES)

    def _ask_member(self, mgid: bytes, quick: bool = False) -> tuple[int | None, float]:
        now = time.monotonic()
        try:
            hit = (self.control.member(mgid, self.attrs.gid, quick), now + self.member_ttl)
        except XdpoibError:             # the SA did not answer: not a member for now, ask again soon
            hit = (None, now + min(self.member_ttl, 0.1))
        if hit[0] is None:              # a join may be under way: ask again sooner
            hit = (None, min(hit[1], now + self.member_ttl / 4))
        with self._lock:
            self._members[mgid] = hit
        return hit

    def _revalidate(self) -> None:
        """Monitor thread: re-read the registry and the memberships the data path found expired."""
        if self._lids_stale:
            try:
                self.registry()
            except OSError:
                pass
            self._lids_stale = False
        with self._lock:
            stale, self._stale = self._stale, set()
        for mgid in stale:
            if self._stop.is_set():
                return
            self._ask_member(mgid)

    def forget_memberships(self, mgid: bytes | None = None) -> None:
        """Drop the membership cache of one group, or all (port events, attach/detach and multicast AHs
        do it; call it after a join or leave that none of those follow)."""
        with self._lock:
            if mgid is None:
                self._members.clear()
            else:
                self._members.pop(bytes(mgid), None)

    # ---- port monitor

    def _read_port(self) -> PortAttrs:
        try:
            attrs = self.control.port()
        except XdpoibError:                 # a lost MAD now and then is not a down port; a few in a row are
            self._read_failures += 1
            if self._read_failures < READ_FAILURES_DOWN:
                return self.attrs
            return replace(self.attrs, state=PortState.DOWN)
        self._read_failures = 0
        return attrs

    def _watch(self) -> None:
        next_read = 0.0
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_read - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            self._revalidate()
            if time.monotonic() >= next_read:
                self.refresh()
                next_read = time.monotonic() + self.poll_interval

    def refresh(self) -> list[PortEvent]:
        """Re-read the port now and queue the events its changes mean (the monitor does this periodically)."""
        new = self._read_port()
        with self._lock:
            if self._closed:
                return []
            old, self.attrs = self.attrs, new
            kinds = []
            was_up, is_up = old.state is PortState.ACTIVE, new.state is PortState.ACTIVE
            if was_up and not is_up:
                kinds.append(PortEventKind.PORT_ERR)
            if new.lid != old.lid and new.state is not PortState.DOWN:
                kinds.append(PortEventKind.LID_CHANGE)
                self._publish_lid(new.lid)
            if new.pkeys != old.pkeys and new.state is not PortState.DOWN:
                kinds.append(PortEventKind.PKEY_CHANGE)
            if new.sm_lid != old.sm_lid and old.sm_lid and is_up:
                kinds.append(PortEventKind.CLIENT_REREGISTER)
            if is_up and not was_up:
                kinds.append(PortEventKind.PORT_ACTIVE)
            if kinds:
                self._members.clear()
        events = [PortEvent(k, new) for k in kinds]
        for e in events:
            self.events.put(e)
        return events

    # ---- contract

    def port(self) -> PortAttrs:
        """Read the port now (through the control), updating the cached attributes and events."""
        self._check_open()
        self.refresh()
        return self.attrs

    def alloc_pool(self, count: int, size: int, memory=None, stride: int | None = None,
                   offset: int = 0) -> BufferPool:
        """Plain memory, ours or the caller's (the sim copies into it)."""
        self._check_open()
        return MemoryPool(count, size, memory, stride, offset)

    def create_qp(self, pkey: int, qkey: int, pool: BufferPool, send_depth: int = 256) -> UdQp:
        """A UD QP for a P_Key of our table."""
        self._check_open()
        index = self.attrs.pkey_index(pkey)
        if not 0 <= qkey <= 0xFFFFFFFF:
            raise QpError(f"bad Q_Key {qkey:#x}")
        qp = SimQp(self, self.attrs.pkeys[index], index, qkey, pool)
        with self._lock:
            self._qps[qp.qpn] = qp
        return qp

    def create_ah(self, path: Path) -> AddressHandle:
        """An address handle (checks the path and its SGID index)."""
        self._check_open()
        path.check()
        if path.grh and not 0 <= path.sgid_index < len(self.attrs.gids):
            raise QpError(f"SGID index {path.sgid_index} outside the GID table")
        if path.multicast:
            self.forget_memberships(path.dgid)     # made right after a (send-only) join
        return AddressHandle(path)

    def counters(self) -> dict[str, int]:
        """Drop counters by name."""
        return self._counters.snapshot()

    def qps(self) -> list[SimQp]:
        """The open QPs."""
        with self._lock:
            return list(self._qps.values())

    def _forget(self, qp: SimQp) -> None:
        with self._lock:
            self._qps.pop(qp.qpn, None)

    def close(self) -> None:
        """Stop the monitor, close the QPs, the registry names, the events and the control. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5)
        for qp in self.qps():
            qp.close()
        if self._lid_marker is not None:
            self._lid_marker.close()
        self.events.close()
        self.control.close()
