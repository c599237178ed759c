"""The backend contract suite: every fabric backend (`sim`, `verbs`) must pass it unchanged.

A tier runs it by importing the tests into its own module and providing two fixtures:

    from contract.contract_suite import *  # noqa: F403  (tests/ is on sys.path)

    @pytest.fixture
    def backend_pair():      # two opened `Backend`s (or proxies with the same methods) on one fabric,
        ...                  # both ports ACTIVE and members of `contract_fabric.pkey`

    @pytest.fixture
    def contract_fabric():   # an object following `ContractFabric` below
        ...

Nothing here knows about ibsim, umad or qemu. Backends may live in other processes: completions are
compared through `bytes(c.payload)`, and everything else goes through the contract's methods.
Negative checks never sleep: a wanted datagram is sent after the unwanted ones, and once it arrives the
unwanted ones must not have (both backends keep per-pair order).
"""

from __future__ import annotations

import dataclasses
import mmap
import select
import time
from typing import Protocol

import numpy as np
import pytest

from xdpoib.fabric.base import (
    GRH_LEN,
    MCAST_QPN,
    Backend,
    CompletionStatus,
    FabricCounter,
    FabricError,
    LinkLayer,
    LoopbackFilter,
    Path,
    PortState,
    RecvBatch,
    SendRequest,
)

TIMEOUT = 5.0


class ContractFabric(Protocol):
    """What a tier tells the suite about its fabric."""

    qkey: int                 # the Q_Key both ends use (the broadcast group's)
    pkey: int                 # a P_Key both ports are full members of
    unicast_grh: bool         # unicast always carries a GRH (RoCE) rather than only on request (IB)
    counts_rx_drops: bool     # the backend counts receive-side drops (sim yes; verbs no: hardware is silent)

    def path(self, src: Backend, dst: Backend, grh: bool = False) -> Path:
        """A unicast path from src's port to dst's port."""

    def new_mgid(self) -> bytes:
        """A multicast GID no other test uses."""

    def join(self, backend: Backend, mgid: bytes) -> Path:
        """Make backend's port a full member of group mgid (creating it); return the multicast path."""

    def leave(self, backend: Backend, mgid: bytes) -> None:
        """End backend's port's membership of mgid."""


# ---------------------------------------------------------------- helpers

class End:
    """One QP on one backend with all its buffers posted, plus what it sent and received."""

    def __init__(self, backend, fabric, bufs=32, size=GRH_LEN + 4096, pkey=None, qkey=None, pool=None):
        self.backend = backend
        self.pool = backend.alloc_pool(bufs, size) if pool is None else pool
        self.qp = backend.create_qp(fabric.pkey if pkey is None else pkey,
                                    fabric.qkey if qkey is None else qkey, self.pool)
        self.qpn = self.qp.qpn
        self.port = backend.port()

    def post(self, indices):
        """Post receive buffers."""
        assert self.qp.post_recv(list(indices)) == len(list(indices))

    def send(self, path, dst, payloads, qkey=None, remote_qpn=None):
        """Send payloads to dst (an End) over path, in one batch."""
        ah = self.backend.create_ah(path)
        qpn = dst.qpn if remote_qpn is None else remote_qpn
        key = dst.qp.qkey if qkey is None else qkey
        batch = [SendRequest(ah, qpn, key, p) for p in payloads]
        assert self.qp.post_send(batch) == len(batch)

    def recv(self, n, timeout=TIMEOUT, repost=True):
        """Wait for n completions (fail on timeout); repost their buffers; return them."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out with {len(got)} of {n} completions: {got}"
            batch = self.qp.poll(n - len(got))
            if not batch:
                self.qp.wait(min(left, 0.2))
                continue
            got.extend(batch)
            if repost:
                self.qp.post_recv([c.index for c in batch])
        return got

    def nothing_more(self):
        """Nothing else is waiting right now."""
        extra = self.qp.poll(16)
        assert extra == [], f"unexpected completions: {extra}"

    def recv_batch(self, n, timeout=TIMEOUT, repost=True) -> RecvBatch:
        """Wait for n completions through `poll_batch` (fail on timeout); repost their buffers (as one
        array); return them as one batch."""
        parts, got = [], 0
        deadline = time.monotonic() + timeout
        while got < n:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out with {got} of {n} completions"
            b = self.qp.poll_batch(n - got)
            assert isinstance(b.status, np.ndarray) and len(b) <= n - got
            if not len(b):
                self.qp.wait(min(left, 0.2))
                continue
            parts.append(b)
            got += len(b)
            if repost:
                self.qp.post_recv(b.index.copy())
        return RecvBatch.concat(parts)

    def payloads(self, b: RecvBatch) -> list[bytes]:
        """The payloads of a batch's rows, read from the pool."""
        return [bytes(self.pool.view(int(i)))[GRH_LEN:GRH_LEN + int(n)]
                for i, n in zip(b.index, b.byte_len, strict=True)]


def payload(tag: int, size: int) -> bytes:
    """An IPoIB-looking frame of `size` bytes whose contents identify it."""
    body = bytes((tag + i) & 0xFF for i in range(max(0, size - 4)))
    return (b"\x08\x00\x00\x00" + body)[:size]


@pytest.fixture
def ends(backend_pair, contract_fabric):
    """One QP with 32 posted buffers on each backend of the pair."""
    a, b = (End(x, contract_fabric) for x in backend_pair)
    for e in (a, b):
        e.post(range(32))
    yield a, b
    for e in (a, b):
        e.qp.close()


# ---------------------------------------------------------------- port

def test_port_attributes(backend_pair, contract_fabric):
    a, b = (x.port() for x in backend_pair)
    for p in (a, b):
        assert p.state is PortState.ACTIVE
        assert p.active_mtu in (256, 512, 1024, 2048, 4096)
        assert len(p.gid) == 16 and p.gid != bytes(16)
        assert any((k & 0x7FFF) == (contract_fabric.pkey & 0x7FFF) for k in p.pkeys)
        if p.link_layer is LinkLayer.INFINIBAND:
            assert 0 < p.lid < 0xC000 and 0 < p.sm_lid < 0xC000
            assert p.gid[8:] == p.port_guid.to_bytes(8, "big")
    assert a.gid != b.gid
    if a.link_layer is LinkLayer.INFINIBAND:
        assert a.lid != b.lid


def test_counters_and_events_are_exposed(backend_pair):
    for backend in backend_pair:
        assert set(backend.counters()) >= {c.value for c in FabricCounter}
        fd = backend.events.fileno()
        assert isinstance(fd, int) and fd >= 0
        assert select.select([fd], [], [], 0)[0] == []
        assert backend.events.get() == []


# ---------------------------------------------------------------- QPs

def test_qp_numbers_and_pkey_index(backend_pair, contract_fabric):
    backend = backend_pair[0]
    first, second = End(backend, contract_fabric), End(backend, contract_fabric)
    try:
        assert 1 < first.qpn < MCAST_QPN and 1 < second.qpn < MCAST_QPN
        assert first.qpn != second.qpn
        assert first.qp.pkey_index == backend.port().pkey_index(contract_fabric.pkey)
        assert first.qp.qkey == contract_fabric.qkey
    finally:
        first.qp.close()
        second.qp.close()
    second.qp.close()  # idempotent


def test_qp_for_a_pkey_not_in_the_table_is_refused(backend_pair, contract_fabric):
    backend = backend_pair[0]
    missing = next(k for k in range(0x8100, 0x8200) if k not in backend.port().pkeys)
    pool = backend.alloc_pool(2, GRH_LEN + 256)
    with pytest.raises(FabricError):
        backend.create_qp(missing, contract_fabric.qkey, pool)


def test_closed_qp_refuses_work(backend_pair, contract_fabric):
    end = End(backend_pair[0], contract_fabric)
    end.qp.close()
    with pytest.raises(FabricError):
        end.qp.post_recv([0])


# ---------------------------------------------------------------- unicast

@pytest.mark.parametrize("direction", ["a->b", "b->a"])
def test_unicast_delivers_payload_and_source_fields(ends, contract_fabric, direction):
    a, b = ends if direction == "a->b" else ends[::-1]
    frames = [payload(1, 4), payload(2, 60), payload(3, min(a.port.active_mtu, 2048) - 4)]
    a.send(contract_fabric.path(a.backend, b.backend), b, frames)
    got = b.recv(len(frames))
    assert [bytes(c.payload) for c in got] == frames
    for c, f in zip(got, frames, strict=True):
        assert c.status is CompletionStatus.SUCCESS
        assert c.byte_len == len(f)
        assert c.src_qp == a.qpn
        assert c.pkey_index == b.qp.pkey_index
        assert c.has_grh is contract_fabric.unicast_grh
        assert (c.sgid is not None) is c.has_grh
        if c.has_grh:
            assert bytes(c.sgid) == a.port.gid
        if a.port.link_layer is LinkLayer.INFINIBAND:
            assert c.slid == a.port.lid
    b.nothing_more()


def test_unicast_with_requested_grh_carries_source_gid(ends, contract_fabric):
    a, b = ends
    a.send(contract_fabric.path(a.backend, b.backend, grh=True), b, [payload(7, 100)])
    (c,) = b.recv(1)
    assert c.has_grh and bytes(c.sgid) == a.port.gid
    assert c.src_qp == a.qpn and bytes(c.payload) == payload(7, 100)


def test_batch_arrives_complete_and_in_order(ends, contract_fabric):
    a, b = ends
    frames = [payload(i, 64 + i) for i in range(24)]
    a.send(contract_fabric.path(a.backend, b.backend), b, frames)
    assert [bytes(c.payload) for c in b.recv(len(frames))] == frames


def test_wrong_qkey_is_dropped(ends, contract_fabric):
    a, b = ends
    before = b.backend.counters()[FabricCounter.QKEY_MISMATCH]
    path = contract_fabric.path(a.backend, b.backend)
    a.send(path, b, [payload(1, 80)], qkey=(contract_fabric.qkey + 1) & 0x7FFFFFFF)
    a.send(path, b, [payload(2, 80)])
    (c,) = b.recv(1)
    assert bytes(c.payload) == payload(2, 80)
    b.nothing_more()
    if contract_fabric.counts_rx_drops:
        assert b.backend.counters()[FabricCounter.QKEY_MISMATCH] == before + 1


def test_oversize_is_dropped_and_counted_by_the_sender(ends, contract_fabric):
    a, b = ends
    path = dataclasses.replace(contract_fabric.path(a.backend, b.backend), mtu=256)
    before = a.backend.counters()[FabricCounter.OVERSIZE]
    a.send(path, b, [payload(1, 257), payload(2, 256)])
    (c,) = b.recv(1)
    assert bytes(c.payload) == payload(2, 256)
    b.nothing_more()
    assert a.backend.counters()[FabricCounter.OVERSIZE] == before + 1


def test_without_posted_buffers_datagrams_are_dropped(backend_pair, contract_fabric):
    a, b = End(backend_pair[0], contract_fabric), End(backend_pair[1], contract_fabric, bufs=4)
    try:
        a.post(range(4))
        b.post(range(2))
        before = b.backend.counters()[FabricCounter.NO_RECV_BUFFER]
        path = contract_fabric.path(a.backend, b.backend)
        a.send(path, b, [payload(i, 64) for i in range(5)])
        got = b.recv(2, repost=False)
        assert [bytes(c.payload) for c in got] == [payload(0, 64), payload(1, 64)]
        b.post([2])
        a.send(path, b, [payload(9, 64)])
        (late,) = b.recv(1, repost=False)
        assert bytes(late.payload) == payload(9, 64)
        if contract_fabric.counts_rx_drops:
            assert b.backend.counters()[FabricCounter.NO_RECV_BUFFER] == before + 3
    finally:
        a.qp.close()
        b.qp.close()


def test_short_receive_buffer_completes_with_length_error(backend_pair, contract_fabric):
    """A datagram longer than the posted buffer completes in error and moves the QP to the error state:
    the next buffer is flushed (rxe reports LOC_QP_OP_ERR where the IBA says LOC_LEN_ERR)."""
    a, b = End(backend_pair[0], contract_fabric), End(backend_pair[1], contract_fabric, bufs=2,
                                                      size=GRH_LEN + 64)
    try:
        b.post(range(2))
        a.send(contract_fabric.path(a.backend, b.backend), b, [payload(1, 100), payload(2, 64)])
        first, second = b.recv(2, repost=False)
        assert first.status in (CompletionStatus.LOC_LEN_ERR, CompletionStatus.LOC_QP_OP_ERR)
        assert first.byte_len == 0 and bytes(first.payload) == b""
        assert second.status is CompletionStatus.WR_FLUSH_ERR
    finally:
        a.qp.close()
        b.qp.close()


# ---------------------------------------------------------------- sends from caller memory

FRAME = 4096        # send memory frames (the AF_XDP UMEM's size); frames start past a headroom, as there
HEADROOM = 256


def _memory(backend, frames=16):
    memory = backend.register_send_memory(bytearray(frames * FRAME), frames, FRAME)
    assert memory.count == frames and memory.size == FRAME and memory.in_flight == 0
    return memory


def _completed(memory, want: int, timeout=TIMEOUT) -> list[int]:
    """Offsets `memory.completed()` hands back until `want` of them came (fail on timeout)."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {got} of {want} frames came back"
        more = memory.completed()
        got += more
        if not more:
            time.sleep(0.005)
    return got


def test_frames_sent_from_send_memory_arrive_and_come_back_once(ends, contract_fabric):
    a, b = ends
    memory = _memory(a.backend)
    try:
        ah = a.backend.create_ah(contract_fabric.path(a.backend, b.backend))
        for rnd in range(2):            # the second round rewrites the same frames: sends read them at post
            frames = [payload(16 * rnd + i, 60 + 300 * i) for i in range(6)]
            offs = [i * FRAME + HEADROOM for i in range(len(frames))]
            for off, fr in zip(offs, frames, strict=True):
                memory.write(off, fr)
            copies = memory.copies
            assert a.qp.post_send_memory(ah, b.qpn, b.qp.qkey, memory,
                                         [(o, len(f), 0) for o, f in zip(offs, frames, strict=True)]) == 6
            got = b.recv(len(frames))
            assert [bytes(c.payload) for c in got] == frames
            assert all(c.src_qp == a.qpn and c.status is CompletionStatus.SUCCESS for c in got)
            assert sorted(_completed(memory, len(frames))) == offs
            assert memory.completed() == [] and memory.in_flight == 0
            assert memory.copies - copies == (0 if memory.zero_copy else len(frames))
        b.nothing_more()
    finally:
        memory.close()


def test_send_memory_oversize_frame_is_counted_and_comes_back(ends, contract_fabric):
    a, b = ends
    memory = _memory(a.backend)
    try:
        path = dataclasses.replace(contract_fabric.path(a.backend, b.backend), mtu=256)
        ah = a.backend.create_ah(path)
        memory.write(HEADROOM, payload(1, 257))
        memory.write(FRAME + HEADROOM, payload(2, 256))
        before = a.backend.counters()[FabricCounter.OVERSIZE]
        assert a.qp.post_send_memory(ah, b.qpn, b.qp.qkey, memory,
                                     [(HEADROOM, 257), (FRAME + HEADROOM, 256)]) == 2
        (c,) = b.recv(1)
        assert bytes(c.payload) == payload(2, 256)
        assert sorted(_completed(memory, 2)) == [HEADROOM, FRAME + HEADROOM]
        assert a.backend.counters()[FabricCounter.OVERSIZE] == before + 1
        b.nothing_more()
    finally:
        memory.close()


def test_send_memory_frames_come_back_when_the_qp_closes(backend_pair, contract_fabric):
    a, b = End(backend_pair[0], contract_fabric), End(backend_pair[1], contract_fabric)
    memory = _memory(a.backend)
    try:
        b.post(range(32))
        ah = a.backend.create_ah(contract_fabric.path(a.backend, b.backend))
        frames = [(i * FRAME + HEADROOM, 64) for i in range(8)]
        for off, n in frames:
            memory.write(off, payload(off & 0xFF, n))
        assert a.qp.post_send_memory(ah, b.qpn, b.qp.qkey, memory, frames) == 8
        a.qp.close()                    # sent or flushed: every frame is the caller's again
        assert sorted(_completed(memory, 8)) == [off for off, _ in frames]
        assert memory.in_flight == 0
    finally:
        memory.close()
        b.qp.close()


# ---------------------------------------------------------------- columnar batches

def _write(memory, frames):
    """Frames into send memory frames 0, 1, ... past the headroom: (offsets, lengths) arrays."""
    offs = np.array([i * FRAME + HEADROOM for i in range(len(frames))], np.int64)
    for off, fr in zip(offs.tolist(), frames, strict=True):
        memory.write(off, fr)
    return offs, np.array([len(f) for f in frames], np.int64)


def _offsets_back(memory, want: int, timeout=TIMEOUT) -> list[int]:
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {got} of {want} frames came back"
        more = memory.completed_offsets()
        assert isinstance(more, np.ndarray)
        got += more.tolist()
        if not len(more):
            time.sleep(0.005)
    return got


def test_post_send_batch_and_poll_batch_carry_frames_and_columns(ends, contract_fabric):
    a, b = ends
    memory = _memory(a.backend)
    try:
        ah = a.backend.create_ah(contract_fabric.path(a.backend, b.backend))
        frames = [payload(40 + i, 64 if i % 3 else 60 + 200 * i) for i in range(12)]
        offs, lens = _write(memory, frames)
        assert a.qp.post_send_batch(ah, b.qpn, b.qp.qkey, memory, offs, lens) == len(frames)
        got = b.recv_batch(len(frames))
        assert b.payloads(got) == frames
        assert (got.status == 0).all() and got.byte_len.tolist() == lens.tolist()
        assert (got.src_qp == a.qpn).all() and got.pkey_index == b.qp.pkey_index
        assert (got.grh == contract_fabric.unicast_grh).all()
        if a.port.link_layer is LinkLayer.INFINIBAND:
            assert (got.slid == a.port.lid).all()
        assert sorted(_offsets_back(memory, len(frames))) == offs.tolist()
        assert memory.in_flight == 0
        b.nothing_more()
    finally:
        memory.close()


def test_poll_batch_mixes_grh_and_no_grh_rows(ends, contract_fabric):
    a, b = ends
    plain = contract_fabric.path(a.backend, b.backend)
    with_grh = contract_fabric.path(a.backend, b.backend, grh=True)
    a.send(plain, b, [payload(1, 80)])
    a.send(with_grh, b, [payload(2, 90), payload(3, 100)])
    a.send(plain, b, [payload(4, 110)])
    got = b.recv_batch(4)
    assert b.payloads(got) == [payload(1, 80), payload(2, 90), payload(3, 100), payload(4, 110)]
    grh = got.grh.tolist()
    assert grh[1:3] == [True, True]
    assert grh[0] == grh[3] == contract_fabric.unicast_grh
    for row in range(4):
        want = a.port.gid if grh[row] else bytes(16)
        assert got.sgid[row].tobytes() == want
        c = got.completion(row)
        assert c.has_grh is grh[row] and (c.sgid is not None) is grh[row]


def test_post_send_batch_partial_when_the_send_queue_is_full(backend_pair, contract_fabric):
    """More frames than the send queue holds: the first n are accepted and come back once; the rest
    stay the caller's (a backend whose queue never fills accepts them all)."""
    a = End(backend_pair[0], contract_fabric)
    b = End(backend_pair[1], contract_fabric, bufs=64)
    memory = _memory(a.backend, frames=64)
    try:
        b.post(range(64))
        qp = a.backend.create_qp(contract_fabric.pkey, contract_fabric.qkey, a.pool, send_depth=8)
        ah = a.backend.create_ah(contract_fabric.path(a.backend, b.backend))
        frames = [payload(i, 64) for i in range(40)]
        offs, lens = _write(memory, frames)
        n = qp.post_send_batch(ah, b.qpn, b.qp.qkey, memory, offs, lens)
        assert 1 <= n <= len(frames)
        assert sorted(_offsets_back(memory, n)) == offs[:n].tolist()
        got = b.recv_batch(n)
        assert b.payloads(got) == frames[:n]
        assert memory.in_flight == 0 and memory.completed_offsets().size == 0
        qp.close()
    finally:
        memory.close()
        a.qp.close()
        b.qp.close()


def test_poll_batch_reports_errors_inside_a_batch(backend_pair, contract_fabric):
    """A datagram longer than its buffer in the middle of a batch: rows before it succeed, its row is a
    length error, the QP is in the error state and the buffers still posted flush."""
    a = End(backend_pair[0], contract_fabric)
    b = End(backend_pair[1], contract_fabric, bufs=4, size=GRH_LEN + 128)
    try:
        b.post(range(4))
        a.send(contract_fabric.path(a.backend, b.backend), b, [payload(1, 64), payload(2, 200), payload(3, 64)])
        got = b.recv_batch(4, repost=False)
        st = got.status.tolist()
        assert st[0] == CompletionStatus.SUCCESS
        assert st[1] in (CompletionStatus.LOC_LEN_ERR, CompletionStatus.LOC_QP_OP_ERR)
        assert st[2:] == [CompletionStatus.WR_FLUSH_ERR] * 2
        assert b.payloads(got.take(slice(0, 1))) == [payload(1, 64)]
        assert sorted(got.index.tolist()) == [0, 1, 2, 3]
    finally:
        a.qp.close()
        b.qp.close()


def test_post_send_batch_on_a_qp_in_the_error_state_hands_frames_back(backend_pair, contract_fabric):
    """A QP gone to the error state mid-traffic: its sends are counted (qp_error on backends that count
    them) and every frame comes back at once."""
    a = End(backend_pair[0], contract_fabric, bufs=2, size=GRH_LEN + 64)
    b = End(backend_pair[1], contract_fabric)
    memory = _memory(b.backend)
    try:
        a.post(range(2))
        b.post(range(4))
        b.send(contract_fabric.path(b.backend, a.backend), a, [payload(1, 100)])
        a.recv_batch(2, repost=False)                   # a length error, then a flush: a's QP is in error
        ah = a.backend.create_ah(contract_fabric.path(a.backend, b.backend))
        ma = _memory(a.backend)
        try:
            offs, lens = _write(ma, [payload(i, 64) for i in range(3)])
            assert a.qp.post_send_batch(ah, b.qpn, b.qp.qkey, ma, offs, lens) == 3
            assert sorted(_offsets_back(ma, 3)) == offs.tolist()
        finally:
            ma.close()
    finally:
        memory.close()
        a.qp.close()
        b.qp.close()


@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
def test_receive_into_a_pool_in_caller_memory(backend_pair, contract_fabric, kind):
    """Receive buffers inside the caller's memory (the agent's inject slots): buffer i at offset + i * stride
    with stride > size; each payload lands at GRH_LEN in its buffer of that memory, GRH rows carry the
    sender's GID, and the bytes before the pool and between buffers stay untouched. The memory ends where
    the last buffer does, not a stride later (as the inject map's last receive region). (A backend living
    in another process receives into its copy of the memory: there the pool's rows are what is checked.)"""
    bufs, size, stride, offset = 8, GRH_LEN + 512, 1000, 136
    total = offset + (bufs - 1) * stride + size
    memory = bytearray(total) if kind == "bytearray" else mmap.mmap(-1, total)
    memory[:] = b"\xa5" * total
    local = isinstance(backend_pair[1], Backend)
    pool = backend_pair[1].alloc_pool(bufs, size, memory=memory if local else bytearray(memory), stride=stride,
                                      offset=offset)
    assert (pool.count, pool.size, pool.stride) == (bufs, size, stride)
    a, b = End(backend_pair[0], contract_fabric), End(backend_pair[1], contract_fabric, pool=pool)
    try:
        a.post(range(4))
        b.post(np.arange(bufs, dtype=np.int64)[::-1].copy())        # an integer array, in reverse
        frames = [payload(60 + i, 64 + 50 * i) for i in range(bufs)]
        a.send(contract_fabric.path(a.backend, b.backend), b, frames)
        got = b.recv_batch(bufs, repost=False)
        assert b.payloads(got) == frames
        assert sorted(got.index.tolist()) == list(range(bufs))
        rows = np.asarray(pool.rows())
        assert rows.shape == (bufs, size)
        raw = bytes(memory) if local else None
        if local:
            assert rows.strides == (stride, 1)      # a view of the memory (from another process: a copy)
        for i, n, f in zip(got.index.tolist(), got.byte_len.tolist(), frames, strict=True):
            assert rows[i, GRH_LEN:GRH_LEN + n].tobytes() == f
            if local:
                start = offset + i * stride
                assert raw[start + GRH_LEN:start + GRH_LEN + n] == f
                if i < bufs - 1:
                    assert raw[start + size:start + stride] == b"\xa5" * (stride - size)
        if local:
            assert raw[:offset] == b"\xa5" * offset
        for row in range(bufs):
            assert got.sgid[row].tobytes() == (a.port.gid if got.grh[row] else bytes(16))
        b.nothing_more()
    finally:
        a.qp.close()
        b.qp.close()


def test_send_memory_refuses_frames_outside_it(ends, contract_fabric):
    a, b = ends
    memory = _memory(a.backend, frames=2)
    try:
        ah = a.backend.create_ah(contract_fabric.path(a.backend, b.backend))
        for bad in ([(2 * FRAME - 10, 64)], [(-1, 64)]):
            with pytest.raises(FabricError):
                a.qp.post_send_memory(ah, b.qpn, b.qp.qkey, memory, bad)
        assert memory.in_flight == 0 and memory.completed() == []
    finally:
        memory.close()
    with pytest.raises(FabricError):
        a.qp.post_send_memory(ah, b.qpn, b.qp.qkey, memory, [(0, 64)])


# ---------------------------------------------------------------- multicast

@pytest.fixture
def group(ends, contract_fabric):
    """A fresh group both ports joined and both QPs attached: (mgid, path)."""
    mgid = contract_fabric.new_mgid()
    paths = [contract_fabric.join(e.backend, mgid) for e in ends]
    for e, p in zip(ends, paths, strict=True):
        e.qp.attach_mcast(mgid, p.dlid)
    yield mgid, paths[0]
    for e in ends:
        contract_fabric.leave(e.backend, mgid)


def test_multicast_reaches_attached_members_with_grh(ends, group, contract_fabric):
    a, b = ends
    mgid, path = group
    assert path.grh and path.dgid == mgid
    a.send(path, b, [payload(5, 300)], remote_qpn=MCAST_QPN, qkey=contract_fabric.qkey)
    (c,) = b.recv(1)
    assert bytes(c.payload) == payload(5, 300) and c.byte_len == 300
    assert c.has_grh and bytes(c.sgid) == a.port.gid
    assert c.src_qp == a.qpn and c.pkey_index == b.qp.pkey_index
    if a.port.link_layer is LinkLayer.INFINIBAND:
        assert c.slid == a.port.lid


def test_own_multicast_is_filtered_as_loopback(ends, group, contract_fabric):
    a, b = ends
    _mgid, path = group
    a.send(path, b, [payload(6, 90)], remote_qpn=MCAST_QPN, qkey=contract_fabric.qkey)
    b.recv(1)
    b.send(contract_fabric.path(b.backend, a.backend), a, [payload(7, 90)])
    got = []
    while not any(bytes(c.payload) == payload(7, 90) for c in got):
        got += a.recv(1)
    loop = LoopbackFilter(a.backend.port(), qpns={a.qpn})
    kept = loop.filter(got)
    assert [bytes(c.payload) for c in kept] == [payload(7, 90)]
    assert loop.counters.snapshot()[FabricCounter.LOOPBACK] == len(got) - 1


def test_detached_qp_receives_no_multicast(ends, group, contract_fabric):
    a, b = ends
    mgid, path = group
    b.qp.detach_mcast(mgid, path.dlid)
    a.send(path, b, [payload(8, 120)], remote_qpn=MCAST_QPN, qkey=contract_fabric.qkey)
    a.send(contract_fabric.path(a.backend, b.backend), b, [payload(9, 120)])
    (c,) = b.recv(1)
    assert bytes(c.payload) == payload(9, 120)
    b.nothing_more()
