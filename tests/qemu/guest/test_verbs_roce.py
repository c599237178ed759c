"""The `verbs` backend on real kernel verbs: two Soft-RoCE ports (rxe0/rxe1 on a veth pair) in the guest.

Independent checks where the kernel offers them (`rdma resource show qp` for the QP state), and an
IPoIB-framed ARP + IPv4 exchange built with the wire library, as two IPoIB hosts would do it.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
import re
import subprocess
import time

import numpy as np
import pytest
from roce_fabric import RoceFabric

from xdpoib.fabric.base import (
    GRH_LEN,
    MCAST_QPN,
    CompletionStatus,
    FabricCounter,
    LoopbackFilter,
    PortError,
    PortEventKind,
    PortState,
    QpError,
    SendRequest,
)
from xdpoib.wire import frames
from xdpoib.wire.addr import IPoIBAddr
from xdpoib.wire.mgid import broadcast_mgid

TIMEOUT = 5.0


class Host:
    """One QP on one backend with every receive buffer posted."""

    def __init__(self, backend, fabric: RoceFabric, bufs: int = 16) -> None:
        self.backend, self.fabric = backend, fabric
        self.port = backend.port()
        self.pool = backend.alloc_pool(bufs, GRH_LEN + self.port.active_mtu)
        self.qp = backend.create_qp(fabric.pkey, fabric.qkey, self.pool)
        self.qp.post_recv(range(bufs))

    @property
    def addr(self) -> IPoIBAddr:
        """This QP's IPoIB hardware address."""
        return IPoIBAddr(0, self.qp.qpn, self.port.gid)

    def send_to(self, gid: bytes, qpn: int, payloads, qkey: int | None = None) -> None:
        """Unicast payloads to (gid, qpn)."""
        ah = self.backend.create_ah(self.backend.roce_path(gid))
        key = self.fabric.qkey if qkey is None else qkey
        assert self.qp.post_send([SendRequest(ah, qpn, key, p) for p in payloads]) == len(payloads)

    def recv(self, n: int = 1):
        """n completions (fail after TIMEOUT), buffers reposted."""
        got, deadline = [], time.monotonic() + TIMEOUT
        while len(got) < n:
            assert time.monotonic() < deadline, f"timed out with {len(got)} of {n}: {got}"
            batch = self.qp.poll(n - len(got))
            if not batch:
                self.qp.wait(0.2)
            got += batch
            self.qp.post_recv([c.index for c in batch])
        return got

    def quiet(self) -> None:
        """Nothing else arrived."""
        assert self.qp.poll(8) == []

    def close(self) -> None:
        """Destroy the QP."""
        self.qp.close()


@pytest.fixture
def fabric():
    return RoceFabric()


@pytest.fixture
def hosts(verbs_backends, fabric):
    pair = [Host(b, fabric) for b in verbs_backends]
    yield pair
    for h in pair:
        h.close()


def kernel_qp(qpn: int) -> str:
    """`rdma resource show qp` for one QP: the kernel's own view of it."""
    return subprocess.run(["rdma", "resource", "show", "qp", "lqpn", str(qpn)],
                          capture_output=True, text=True, check=True).stdout


def test_unknown_device_is_a_one_line_port_error():
    from xdpoib.fabric.verbs import VerbsBackend, list_devices

    assert set(list_devices()) >= {"rxe0", "rxe1"}
    with pytest.raises(PortError, match="no_such_hca") as err:
        VerbsBackend("no_such_hca")
    assert "\n" not in str(err.value)
    with pytest.raises(PortError, match="rxe0"):
        VerbsBackend.open(None)                      # two devices here: it must be named
    with VerbsBackend.open("rxe1", 1) as backend:
        assert backend.port().gid == backend.roce_path(backend.port().gid).dgid


def test_qp_reaches_rts_with_qkey(hosts):
    """The kernel's own view of our QP: UD, in RTS, on the right device."""
    for h in hosts:
        out = kernel_qp(h.qp.qpn)
        assert f"lqpn {h.qp.qpn}" in out and "type UD" in out and "state RTS" in out, out
        assert h.backend.device in out, out
        assert h.qp.qkey == 0x0B1B and h.qp.pkey_index == h.port.pkey_index(0xFFFF)


def test_unicast_both_ways(hosts):
    a, b = hosts
    for src, dst in ((a, b), (b, a)):
        frame = frames.ipoib(frames.ETH_P_IP, bytes(range(200)))
        src.send_to(dst.port.gid, dst.qp.qpn, [frame])
        (c,) = dst.recv()
        assert c.status is CompletionStatus.SUCCESS
        assert bytes(c.payload) == frame and c.byte_len == len(frame)   # GRH stripped
        assert c.has_grh and c.sgid == src.port.gid and c.src_qp == src.qp.qpn
        dst.quiet()


def test_wrong_qkey_is_dropped(hosts):
    a, b = hosts
    a.send_to(b.port.gid, b.qp.qpn, [b"\x08\x00\x00\x00wrong"], qkey=0x1234)
    a.send_to(b.port.gid, b.qp.qpn, [b"\x08\x00\x00\x00right"])
    (c,) = b.recv()
    assert bytes(c.payload) == b"\x08\x00\x00\x00right"
    b.quiet()


def test_oversize_is_refused_by_the_sender(hosts):
    a, b = hosts
    mtu = a.port.active_mtu
    before = a.backend.counters()[FabricCounter.OVERSIZE]
    too_big, fits = b"\x08\x00\x00\x00" + b"x" * (mtu - 3), b"\x08\x00\x00\x00" + b"y" * (mtu - 4)
    a.send_to(b.port.gid, b.qp.qpn, [too_big, fits])
    (c,) = b.recv()
    assert c.byte_len == mtu and bytes(c.payload)[4:5] == b"y"
    b.quiet()
    assert a.backend.counters()[FabricCounter.OVERSIZE] == before + 1


def test_multicast_attach_detach_with_delivery(hosts, fabric, verbs_backends):
    a, b = hosts
    bystander = Host(verbs_backends[1], fabric, bufs=4)     # same port as b, never attached
    mgid = fabric.new_mgid()
    try:
        path = fabric.join(a.backend, mgid)
        fabric.join(b.backend, mgid)
        b.qp.attach_mcast(mgid, path.dlid)
        ah = a.backend.create_ah(path)
        a.qp.post_send([SendRequest(ah, MCAST_QPN, fabric.qkey, b"\x08\x00\x00\x00group")])
        (c,) = b.recv()
        assert bytes(c.payload) == b"\x08\x00\x00\x00group" and c.sgid == a.port.gid
        b.qp.detach_mcast(mgid, path.dlid)
        a.qp.post_send([SendRequest(ah, MCAST_QPN, fabric.qkey, b"\x08\x00\x00\x00after")])
        a.send_to(b.port.gid, b.qp.qpn, [b"\x08\x00\x00\x00unicast"])
        (c,) = b.recv()
        assert bytes(c.payload) == b"\x08\x00\x00\x00unicast"
        b.quiet()
        bystander.quiet()
        with pytest.raises(QpError):
            b.qp.attach_mcast(b"\x20" + mgid[1:], 0)           # not a multicast GID
    finally:
        bystander.close()
        for backend in (a.backend, b.backend):
            fabric.leave(backend, mgid)


def test_ipoib_arp_and_ipv4_exchange(hosts, fabric):
    """A resolves B's IPoIB address by broadcast ARP, then they exchange an ICMP echo over IPv4."""
    a, b = hosts
    ip_a, ip_b = ipaddress.IPv4Address("10.0.0.1").packed, ipaddress.IPv4Address("10.0.0.2").packed
    bcast = broadcast_mgid(fabric.pkey)
    paths = [fabric.join(h.backend, bcast) for h in hosts]
    try:
        for h, p in zip(hosts, paths, strict=True):
            h.qp.attach_mcast(bcast, p.dlid)
        # A: who has 10.0.0.2? (to the broadcast group, 20-byte hardware addresses)
        request = frames.ipoib(frames.ETH_P_ARP, frames.arp(frames.ARPOP_REQUEST, a.addr.pack(), ip_a,
                                                            bytes(20), ip_b))
        a.qp.post_send([SendRequest(a.backend.create_ah(paths[0]), MCAST_QPN, fabric.qkey, request)])
        (c,) = b.recv()
        assert frames.parse_ipoib(bytes(c.payload)) == frames.ETH_P_ARP
        arp = frames.parse_arp(bytes(c.payload)[4:])
        assert arp.htype == frames.ARPHRD_INFINIBAND and arp.op == frames.ARPOP_REQUEST and arp.tpa == ip_b
        sender = IPoIBAddr.unpack(arp.sha)
        assert sender.gid == c.sgid and sender.qpn == c.src_qp       # the frame tells the truth
        # B: 10.0.0.2 is at <B's address>, unicast back to the requester.
        reply = frames.ipoib(frames.ETH_P_ARP, frames.arp(frames.ARPOP_REPLY, b.addr.pack(), ip_b,
                                                          arp.sha, arp.spa))
        b.send_to(sender.gid, sender.qpn, [reply])
        # A is attached too, so its own broadcast may come back first: the loopback filter drops it.
        loop = LoopbackFilter(a.backend.port(), qpns={a.qp.qpn})
        got: list = []
        while not got:
            got = loop.filter(a.recv(1))
        answer = frames.parse_arp(bytes(got[0].payload)[4:])
        assert answer.op == frames.ARPOP_REPLY and answer.spa == ip_b
        peer = IPoIBAddr.unpack(answer.sha)
        assert peer == b.addr
        # IPv4 over the learned address: echo request, echo reply.
        ping = frames.ipoib(frames.ETH_P_IP, frames.ipv4(ip_a, ip_b, frames.IPPROTO_ICMP,
                                                         frames.icmp_echo(7, 1, b"xdpoib")))
        a.send_to(peer.gid, peer.qpn, [ping])
        (c,) = b.recv()
        ip = frames.parse_ipv4(bytes(c.payload)[4:])
        assert (ip.src, ip.dst, ip.proto) == (ip_a, ip_b, frames.IPPROTO_ICMP)
        icmp = bytes(c.payload)[4 + ip.hlen:ip.total_length + 4]
        assert icmp[0] == frames.ICMP_ECHO and frames.checksum(icmp) == 0
        pong = frames.ipoib(frames.ETH_P_IP, frames.ipv4(ip_b, ip_a, frames.IPPROTO_ICMP,
                                                         frames.icmp_echo(7, 1, b"xdpoib", reply=True)))
        b.send_to(c.sgid, c.src_qp, [pong])
        (c,) = a.recv()
        ip = frames.parse_ipv4(bytes(c.payload)[4:])
        assert (ip.src, ip.dst) == (ip_b, ip_a) and bytes(c.payload)[4 + ip.hlen] == frames.ICMP_ECHO_REPLY
        a.quiet()
        b.quiet()
    finally:
        for h in hosts:
            fabric.leave(h.backend, bcast)


def test_length_error_leaves_the_qp_in_error_and_sends_are_counted(verbs_backends, fabric):
    a = Host(verbs_backends[0], fabric)
    backend = verbs_backends[1]
    qp = backend.create_qp(fabric.pkey, fabric.qkey, backend.alloc_pool(2, GRH_LEN + 64))
    try:
        qp.post_recv([0, 1])
        a.send_to(backend.port().gid, qp.qpn, [b"\x08\x00\x00\x00" + bytes(96)])
        got, deadline = [], time.monotonic() + TIMEOUT
        while len(got) < 2 and time.monotonic() < deadline:
            got += qp.poll(2 - len(got)) or ([], qp.wait(0.2))[0]
        assert [c.status is CompletionStatus.SUCCESS for c in got] == [False, False], got
        assert qp.error and "state ERR" in kernel_qp(qp.qpn)
        before = backend.counters()[FabricCounter.QP_ERROR]
        ah = backend.create_ah(backend.roce_path(a.port.gid))
        assert qp.post_send([SendRequest(ah, a.qp.qpn, fabric.qkey, b"\x08\x00\x00\x00late")]) == 1
        assert backend.counters()[FabricCounter.QP_ERROR] == before + 1
        a.quiet()
    finally:
        qp.close()
        a.close()


def test_async_qp_error_flushes_buffers_and_an_attached_qp_is_destroyed(verbs_backends, fabric):
    """What an async QP error does (`VerbsQp.to_error`, called by the event thread on QP_FATAL): the QP
    goes to ERR and every posted buffer completes with WR_FLUSH_ERR, so its owner learns of it from
    completions; and closing a QP still attached to a group destroys it (the kernel refuses an attached
    QP, so close detaches first)."""
    backend = verbs_backends[0]
    qp = backend.create_qp(fabric.pkey, fabric.qkey, backend.alloc_pool(4, GRH_LEN + 256))
    mgid = fabric.new_mgid()
    path = fabric.join(backend, mgid)
    try:
        qp.post_recv(range(4))
        qp.attach_mcast(mgid, path.dlid)
        qp.to_error()
        got, deadline = [], time.monotonic() + TIMEOUT
        while len(got) < 4 and time.monotonic() < deadline:
            got += qp.poll(4 - len(got)) or ([], qp.wait(0.2))[0]
        assert sorted(c.index for c in got) == [0, 1, 2, 3], got
        assert all(c.status is CompletionStatus.WR_FLUSH_ERR for c in got)
        assert qp.error and "state ERR" in kernel_qp(qp.qpn)
        qpn = qp.qpn
        qp.close()
        assert f"lqpn {qpn} " not in subprocess.run(["rdma", "resource", "show", "qp"], capture_output=True,
                                                    text=True, check=True).stdout
    finally:
        qp.close()
        fabric.leave(backend, mgid)


def kernel_mrs() -> list[int]:
    """The lengths of the memory regions this process holds (`rdma resource show mr`)."""
    out = subprocess.run(["rdma", "resource", "show", "mr"], capture_output=True, text=True, check=True).stdout
    return [int(m[1]) for ln in out.splitlines() if re.search(rf"\bpid {os.getpid()}\b", ln)
            for m in [re.search(r"mrlen (\d+)", ln)] if m]


def _back(memory, want: int) -> list[int]:
    got, deadline = [], time.monotonic() + TIMEOUT
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {len(got)} of {want} frames came back"
        got += memory.completed() or ([], time.sleep(0.005))[0]
    return got


def test_send_memory_is_a_memory_region_sent_from_in_place(hosts):
    """Registered memory (the agent registers its UMEM so) is one more MR, gone when it is closed; frames
    go out of it without a copy up to the in-flight limit (half its frames), beyond it they are copied
    into the QP's own buffers; every frame comes back once."""
    a, b = hosts
    frames = 16
    umem = mmap.mmap(-1, frames * 4096)
    before = kernel_mrs()
    memory = a.backend.register_send_memory(umem, frames, 4096)
    try:
        assert memory.zero_copy and sorted(kernel_mrs()) == sorted([*before, frames * 4096])
        ah = a.backend.create_ah(a.backend.roce_path(b.port.gid))
        sent = [(i * 4096 + 256, 64 + i) for i in range(12)]          # more than the 8 allowed in flight
        for off, n in sent:
            umem[off:off + n] = frames_of(off, n)
        assert a.qp.post_send_memory(ah, b.qp.qpn, a.fabric.qkey, memory, sent) == len(sent)
        assert memory.copies == len(sent) - frames // 2
        got = b.recv(len(sent))
        assert [bytes(c.payload) for c in got] == [frames_of(off, n) for off, n in sent]
        assert sorted(_back(memory, len(sent))) == [off for off, _ in sent] and memory.in_flight == 0
    finally:
        memory.close()
    assert sorted(kernel_mrs()) == sorted(before)
    umem.close()            # nothing holds the memory any more


def frames_of(off: int, n: int) -> bytes:
    """An IPoIB-looking frame of n bytes naming its offset."""
    return (b"\x08\x00\x00\x00" + off.to_bytes(4, "big") * n)[:n]


def test_frames_in_flight_come_back_after_an_async_qp_error(verbs_backends, fabric):
    """Frames a QP sends from caller memory are the caller's again after an async error (sent or flushed),
    and a QP in the error state hands frames back at once, counted as QP_ERROR."""
    a, b = (Host(x, fabric) for x in verbs_backends)
    memory = a.backend.register_send_memory(bytearray(8 * 4096), 8, 4096)
    try:
        ah = a.backend.create_ah(a.backend.roce_path(b.port.gid))
        sent = [(i * 4096, 200) for i in range(6)]
        assert a.qp.post_send_memory(ah, b.qp.qpn, fabric.qkey, memory, sent) == 6
        a.qp.to_error()
        assert sorted(_back(memory, 6)) == [off for off, _ in sent]
        before = a.backend.counters()[FabricCounter.QP_ERROR]
        assert a.qp.post_send_memory(ah, b.qp.qpn, fabric.qkey, memory, sent[:2]) == 2
        assert sorted(memory.completed()) == [0, 4096] and memory.in_flight == 0
        assert a.backend.counters()[FabricCounter.QP_ERROR] == before + 2
    finally:
        memory.close()
        a.close()
        b.close()


def test_send_ring_accepts_what_it_holds_and_frees_with_each_signaled_tail(hosts):
    """A QP's send queue of 8: `post_send_batch` accepts exactly the 8 free slots (one chain, only its last
    WR signaled); once that completion is reaped the whole chain is free again, also across the ring's
    wrap; frames go out without copies and come back once, in order; `post_send` (copying) shares the
    ring."""
    a, b = hosts
    memory = a.backend.register_send_memory(bytearray(64 * 4096), 64, 4096)
    qp = a.backend.create_qp(a.fabric.pkey, a.fabric.qkey, a.pool, send_depth=8)
    try:
        ah = a.backend.create_ah(a.backend.roce_path(b.port.gid))
        start = 0
        for want, offered in ((5, 5), (8, 20), (8, 8), (3, 3)):
            offs = np.arange(start, start + offered, dtype=np.int64) * 4096 + 128
            lens = 60 + offs // 4096
            for off, n in zip(offs.tolist(), lens.tolist(), strict=True):
                memory.write(off, frames_of(off, n))
            assert qp.post_send_batch(ah, b.qp.qpn, a.fabric.qkey, memory, offs, lens) == want
            assert sorted(_back(memory, want)) == offs[:want].tolist() and memory.in_flight == 0
            got = b.recv(want)
            assert [bytes(c.payload) for c in got] == [frames_of(off, n) for off, n in
                                                       zip(offs[:want].tolist(), lens[:want].tolist(), strict=True)]
            start += want
        assert memory.copies == 0
        assert qp.post_send([SendRequest(ah, b.qp.qpn, a.fabric.qkey, frames_of(i, 70)) for i in range(12)]) == 8
        assert [bytes(c.payload) for c in b.recv(8)] == [frames_of(i, 70) for i in range(8)]
        b.quiet()
    finally:
        qp.close()
        memory.close()


BPF_F_MMAPABLE = 1 << 10
INJECT_SLOT = 24 + 4160         # the agent's inject map value (xdpoib/datapath/inject.py SLOT_SIZE)


def test_receive_pool_in_a_mmapped_bpf_array_map(hosts):
    """Receive buffers inside an mmapped BPF_F_MMAPABLE array map, laid out as the agent's inject map
    (one buffer per value): the kernel registers that mapping as one more MR, a datagram lands in the
    map's value i, which the map itself shows (bpf MAP_LOOKUP_ELEM), and posting and polling work on it
    as on the backend's own memory."""
    import ctypes

    from xdpoib.datapath import bpfsys

    a, b = hosts
    slots = 16
    fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, INJECT_SLOT, slots, "xo_test_rx", flags=BPF_F_MMAPABLE)
    mem = mmap.mmap(fd, slots * INJECT_SLOT, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    before = kernel_mrs()
    pool = b.backend.alloc_pool(slots, GRH_LEN + 2048, memory=mem, stride=INJECT_SLOT)
    # one more MR, from the first buffer to the end of the last (not a stride past it: the map may end there)
    assert sorted(kernel_mrs()) == sorted([*before, (slots - 1) * INJECT_SLOT + GRH_LEN + 2048])
    qp = b.backend.create_qp(b.fabric.pkey, b.fabric.qkey, pool)
    try:
        assert qp.post_recv(np.arange(slots)) == slots
        frames = [frames_of(i, 64 + 100 * i) for i in range(slots)]
        a.send_to(b.port.gid, qp.qpn, frames)
        rows, deadline = [], time.monotonic() + TIMEOUT
        while len(rows) < slots:
            assert time.monotonic() < deadline, f"only {len(rows)} of {slots} datagrams arrived"
            batch = qp.poll_batch(slots - len(rows))
            if not len(batch):
                qp.wait(0.2)
            rows += list(zip(batch.index.tolist(), batch.byte_len.tolist(), batch.status.tolist(), strict=True))
        assert [st for _, _, st in rows] == [0] * slots
        value = (ctypes.c_uint8 * INJECT_SLOT)()
        for (index, n, _), frame in zip(rows, frames, strict=True):
            assert bpfsys.map_lookup(fd, ctypes.c_uint32(index), value)
            assert bytes(value)[GRH_LEN:GRH_LEN + n] == frame
    finally:
        qp.close()
        pool.close()
        os.close(fd)
    assert sorted(kernel_mrs()) == sorted(before)


def _wait_event(backend, kind: PortEventKind):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for ev in backend.events.wait(0.2):
            if ev.kind is kind:
                return ev
    raise AssertionError(f"no {kind.name} event on {backend.device} within {TIMEOUT}s")


def test_port_events_follow_the_netdev(verbs_backends, fabric):
    """Last in this module: takes the veth pair down and up, then proves unicast works again."""
    for b in verbs_backends:
        b.events.get()
    subprocess.run(["ip", "link", "set", "veth1", "down"], check=True)
    try:
        down = _wait_event(verbs_backends[1], PortEventKind.PORT_ERR)
        assert down.attrs is not None and down.attrs.state is not PortState.ACTIVE
    finally:
        subprocess.run(["ip", "link", "set", "veth1", "up"], check=True)
    up = _wait_event(verbs_backends[1], PortEventKind.PORT_ACTIVE)
    assert up.attrs is not None and up.attrs.state is PortState.ACTIVE
    deadline = time.monotonic() + 10
    while "tentative" in subprocess.run(["ip", "-6", "addr"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "IPv6 DAD did not finish after the link came back"
        time.sleep(0.2)
    a, b = (Host(x, fabric) for x in verbs_backends)
    try:
        a.send_to(b.port.gid, b.qp.qpn, [b"\x08\x00\x00\x00back"])
        (c,) = b.recv()
        assert bytes(c.payload) == b"\x08\x00\x00\x00back"
    finally:
        a.close()
        b.close()
