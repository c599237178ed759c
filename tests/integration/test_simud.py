"""The sim UD data plane against real OpenSM on ibsim: the IB rules beyond the common contract.

Three hosts: h1 and h2 are members of partition 0x8003, h3 is not (SimFabric's default partitions).
Each host's backend runs in its own child process (`RemoteBackend`). Every test makes fresh QPs and
groups, and reads counters as differences, so the order of tests does not matter.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

import pytest

from xdpoib.fabric.base import (
    GRH_LEN,
    MCAST_QPN,
    CompletionStatus,
    FabricCounter,
    FabricError,
    LoopbackFilter,
    Path,
    PortEventKind,
    PortState,
    SendRequest,
)

QKEY = 0x0B1B
P8003 = 0x8003
_mgids = itertools.count(1)


@pytest.fixture(scope="module")
def fab(sim_fabric):
    """conftest's fabric: three hosts, h1 and h2 in partition 0x8003, h3 not."""
    return sim_fabric


@pytest.fixture(scope="module")
def hosts(fab):
    """One backend per host: {"h1": ..., "h2": ..., "h3": ...}."""
    from xdpoib.fabric.simud_remote import RemoteBackend

    out = {}
    try:
        for h in fab.hosts:
            out[h.name] = RemoteBackend.on_host(fab, h, poll_interval=0.05)
        yield out
    finally:
        for b in out.values():
            b.close()


class Qp:
    """A QP with its buffers posted, and helpers to send to another Qp and collect completions."""

    def __init__(self, backend, pkey=0xFFFF, qkey=QKEY, bufs=16, size=GRH_LEN + 4096):
        self.backend = backend
        self.pool = backend.alloc_pool(bufs, size)
        self.qp = backend.create_qp(pkey, qkey, self.pool)
        self.qpn = self.qp.qpn
        self.qp.post_recv(list(range(bufs)))

    def path_to(self, other, **kw):
        """A LID-routed path to other's port."""
        dgid = other.backend.port().gid
        rec = self.backend.call("control.sa.path", dgid, None, kw.pop("pkey", 0xFFFF))
        return Path(dlid=rec.dlid, sl=rec.sl, mtu=rec.mtu_bytes, **kw)

    def send(self, path, qpn, payloads, qkey=QKEY):
        ah = self.backend.create_ah(path)
        assert self.qp.post_send([SendRequest(ah, qpn, qkey, p) for p in payloads]) == len(payloads)

    def recv_until(self, marker, timeout=5.0):
        """Completions up to and including the one whose payload is `marker`."""
        got = []
        deadline = time.monotonic() + timeout
        while not got or bytes(got[-1].payload) != marker:
            assert time.monotonic() < deadline, f"marker never arrived; got {got}"
            batch = self.qp.poll(1)
            if batch:
                got += batch
                self.qp.post_recv([c.index for c in batch])
            else:
                self.qp.wait(0.1)
        return got


def counter(backend, name):
    return backend.counters()[name]


def marker(n):
    return b"\x08\x00\x00\x00marker-%d" % n


def new_mgid():
    return bytes.fromhex("ff12401bffff0000000000") + (os.getpid() & 0xFF).to_bytes(1, "big") + \
        (0x10000 + next(_mgids)).to_bytes(4, "big")


def join(backend, mgid, state=1):
    from xdpoib.fabric.sa import MCMemberRecord

    params = MCMemberRecord(mgid=mgid, qkey=QKEY, mtu=4, pkey=0xFFFF, rate=3)
    rec = backend.call("control.sa.join", mgid, state, params)
    backend.forget_memberships()
    return Path(dlid=rec.mlid, sl=rec.sl, mtu=rec.mtu_bytes, dgid=mgid, grh=True)


def leave(backend, mgid, state=1):
    backend.call("control.sa.leave", mgid, state)
    backend.forget_memberships()


# ---------------------------------------------------------------- unicast fields and GRH

def test_unicast_source_fields_and_grh_only_on_request(hosts):
    a, b = Qp(hosts["h1"]), Qp(hosts["h2"])
    pa = hosts["h1"].port()
    a.send(a.path_to(b), b.qpn, [b"\x08\x00\x00\x00plain"])
    a.send(a.path_to(b, grh=True, dgid=hosts["h2"].port().gid), b.qpn, [b"\x08\x00\x00\x00with-grh"])
    plain, grh = b.recv_until(b"\x08\x00\x00\x00with-grh")
    assert (plain.has_grh, plain.sgid, plain.slid, plain.src_qp) == (False, None, pa.lid, a.qpn)
    assert (grh.has_grh, bytes(grh.sgid), grh.slid, grh.src_qp) == (True, pa.gid, pa.lid, a.qpn)
    assert plain.pkey_index == grh.pkey_index == hosts["h2"].port().pkey_index(0xFFFF)
    # the GRH area of the receive buffer holds an IBA GRH, as verbs would deliver it
    area = bytes(b.pool.view(grh.index))[:GRH_LEN]
    assert area[0] >> 4 == 6 and area[6] == 0x1B
    assert area[8:24] == pa.gid and area[24:40] == hosts["h2"].port().gid
    assert int.from_bytes(area[4:6], "big") == grh.byte_len


def test_qkey_with_high_bit_uses_the_qps_own(hosts):
    a, b = Qp(hosts["h1"]), Qp(hosts["h2"])
    a.send(a.path_to(b), b.qpn, [marker(1)], qkey=0x80000000)
    (c,) = b.recv_until(marker(1))
    assert c.status is CompletionStatus.SUCCESS


def test_unknown_qpn_and_lid_are_counted_at_the_sender(hosts):
    a, b = Qp(hosts["h1"]), Qp(hosts["h2"])
    before = counter(hosts["h1"], FabricCounter.NO_DESTINATION)
    a.send(a.path_to(b), 0x000042, [b"\x08\x00\x00\x00x"])
    a.send(Path(dlid=0xBFFF), b.qpn, [b"\x08\x00\x00\x00x"])
    assert counter(hosts["h1"], FabricCounter.NO_DESTINATION) == before + 2


def test_length_error_puts_the_qp_in_the_error_state(hosts):
    a = Qp(hosts["h1"])
    pool = hosts["h2"].alloc_pool(2, GRH_LEN + 64)
    qp = hosts["h2"].create_qp(0xFFFF, QKEY, pool)
    qp.post_recv([0])
    path = Path(dlid=hosts["h2"].port().lid)
    a.send(path, qp.qpn, [bytes(65)])
    deadline = time.monotonic() + 5
    while not (got := qp.poll(4)):
        assert time.monotonic() < deadline
        qp.wait(0.1)
    assert [c.status for c in got] == [CompletionStatus.LOC_LEN_ERR]
    before = hosts["h2"].counters()
    assert qp.post_recv([1]) == 1
    assert [c.status for c in qp.poll(4)] == [CompletionStatus.WR_FLUSH_ERR]
    a.send(path, qp.qpn, [bytes(8)])
    ah = hosts["h2"].create_ah(Path(dlid=hosts["h1"].port().lid))
    qp.post_send([SendRequest(ah, a.qpn, QKEY, bytes(8))])
    assert qp.poll(4) == []
    after = hosts["h2"].counters()
    assert after[FabricCounter.QP_ERROR] == before[FabricCounter.QP_ERROR] + 2
    qp.close()


# ---------------------------------------------------------------- P_Key and MTU

def test_pkey_membership(hosts):
    h3 = hosts["h3"]
    assert not any((k & 0x7FFF) == (P8003 & 0x7FFF) for k in h3.port().pkeys)
    with pytest.raises(FabricError, match="0x8003"):
        h3.create_qp(P8003, QKEY, h3.alloc_pool(2, GRH_LEN + 256))
    a8003, b8003, b_default = Qp(hosts["h1"], P8003), Qp(hosts["h2"], P8003), Qp(hosts["h2"])
    before = counter(hosts["h2"], FabricCounter.PKEY_MISMATCH)
    a8003.send(a8003.path_to(b_default, pkey=P8003), b_default.qpn, [b"\x08\x00\x00\x00wrong-partition"])
    a8003.send(a8003.path_to(b8003, pkey=P8003), b8003.qpn, [marker(2)])
    (c,) = b8003.recv_until(marker(2))
    assert c.pkey_index == hosts["h2"].port().pkey_index(P8003) != 0
    assert b_default.qp.poll(4) == []
    assert counter(hosts["h2"], FabricCounter.PKEY_MISMATCH) == before + 1


def test_payload_above_port_mtu_is_dropped_even_if_the_path_allows_it(hosts):
    a, b = Qp(hosts["h1"]), Qp(hosts["h2"])
    mtu = hosts["h1"].port().active_mtu
    path = Path(dlid=a.path_to(b).dlid, mtu=4096)
    before = counter(hosts["h1"], FabricCounter.OVERSIZE)
    a.send(path, b.qpn, [bytes(mtu + 1), bytes(mtu)])
    (c,) = b.recv_until(bytes(mtu))
    assert c.byte_len == mtu
    assert counter(hosts["h1"], FabricCounter.OVERSIZE) == before + 1


# ---------------------------------------------------------------- multicast

def test_multicast_only_to_attached_qps_of_member_ports(hosts):
    a, b, c = Qp(hosts["h1"]), Qp(hosts["h2"]), Qp(hosts["h3"])
    unattached = Qp(hosts["h2"])
    mgid = new_mgid()
    path = join(hosts["h1"], mgid)
    join(hosts["h2"], mgid)
    try:
        for q in (a, b, c):
            q.qp.attach_mcast(mgid, path.dlid)       # h3 attaches but its port never joined
        before = counter(hosts["h3"], FabricCounter.NOT_MEMBER)
        a.send(path, MCAST_QPN, [b"\x08\x00\x00\x00group"])
        for q in (b, c, unattached):
            q.send(q.path_to(q), q.qpn, [marker(3)])
        b.send(b.path_to(a), a.qpn, [marker(3)])        # to a from another port: not a loopback
        (got,) = b.recv_until(marker(3))[:-1]
        assert bytes(got.payload) == b"\x08\x00\x00\x00group" and got.has_grh
        assert [bytes(x.payload) for x in c.recv_until(marker(3))] == [marker(3)]
        assert [bytes(x.payload) for x in unattached.recv_until(marker(3))] == [marker(3)]
        assert counter(hosts["h3"], FabricCounter.NOT_MEMBER) == before + 1
        # the sender's own attached QP gets the fabric's copy: the loopback filter drops it
        own = a.recv_until(marker(3))
        loop = LoopbackFilter(hosts["h1"].port(), qpns={a.qpn})
        assert [bytes(x.payload) for x in loop.filter(own)] == [marker(3)]
        assert loop.counters.snapshot()[FabricCounter.LOOPBACK] == 1
        # h3 joins: now it receives
        join(hosts["h3"], mgid)
        a.send(path, MCAST_QPN, [b"\x08\x00\x00\x00group-2"])
        c.send(c.path_to(c), c.qpn, [marker(4)])
        assert [bytes(x.payload) for x in c.recv_until(marker(4))] == [b"\x08\x00\x00\x00group-2", marker(4)]
    finally:
        for h in ("h1", "h2", "h3"):
            try:
                leave(hosts[h], mgid)
            except Exception:
                pass


def test_sender_must_be_a_member(hosts):
    a, b = Qp(hosts["h1"]), Qp(hosts["h2"])
    mgid = new_mgid()
    path = join(hosts["h2"], mgid)
    try:
        b.qp.attach_mcast(mgid, path.dlid)
        before = counter(hosts["h1"], FabricCounter.NOT_MEMBER)
        a.send(path, MCAST_QPN, [b"\x08\x00\x00\x00not-a-member"])
        assert counter(hosts["h1"], FabricCounter.NOT_MEMBER) == before + 1
        a.send(a.path_to(b), b.qpn, [marker(5)])
        assert [bytes(x.payload) for x in b.recv_until(marker(5))] == [marker(5)]
    finally:
        leave(hosts["h2"], mgid)


def test_send_only_member_sends_but_does_not_receive(hosts):
    a, c = Qp(hosts["h1"]), Qp(hosts["h3"])
    mgid = new_mgid()
    path = join(hosts["h1"], mgid)
    rec = hosts["h3"].call("control.sa.join_send_only", mgid)
    hosts["h3"].forget_memberships()
    assert rec.join_state in (4, 8)
    try:
        a.qp.attach_mcast(mgid, path.dlid)
        c.qp.attach_mcast(mgid, path.dlid)
        before = counter(hosts["h3"], FabricCounter.NOT_MEMBER)
        c.send(path, MCAST_QPN, [b"\x08\x00\x00\x00from-send-only"])
        c.send(c.path_to(a), a.qpn, [marker(8)])
        assert [bytes(x.payload) for x in a.recv_until(marker(8))] == [b"\x08\x00\x00\x00from-send-only",
                                                                         marker(8)]
        a.send(path, MCAST_QPN, [b"\x08\x00\x00\x00to-full-members"])
        a.send(a.path_to(c), c.qpn, [marker(9)])
        # h3's own send came back to its attached QP? no: a send-only port is not in the receive tree
        assert [bytes(x.payload) for x in c.recv_until(marker(9))] == [marker(9)]
        assert counter(hosts["h3"], FabricCounter.NOT_MEMBER) == before + 2
    finally:
        leave(hosts["h1"], mgid)
        leave(hosts["h3"], mgid, rec.join_state)


# ---------------------------------------------------------------- port events

def _wait_event(backend, kind, timeout=10.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for e in backend.events.wait(0.2):
            seen.append(e.kind)
            if e.kind is kind:
                return e
    raise AssertionError(f"no {kind} within {timeout} s (saw {seen})")


def test_unlink_relink_reports_events_and_memberships_are_gone(fab, hosts):
    a, b = Qp(hosts["h1"]), Qp(hosts["h2"])
    mgid = new_mgid()
    path = join(hosts["h1"], mgid)
    join(hosts["h2"], mgid)
    b.qp.attach_mcast(mgid, path.dlid)
    hosts["h2"].events.get()
    try:
        fab.unlink("h2")
        err = _wait_event(hosts["h2"], PortEventKind.PORT_ERR)
        assert err.attrs is None or err.attrs.state is not PortState.ACTIVE
        down_before = counter(hosts["h2"], FabricCounter.PORT_DOWN)
        b.send(Path(dlid=hosts["h1"].port().lid), a.qpn, [b"\x08\x00\x00\x00x"])
        assert counter(hosts["h2"], FabricCounter.PORT_DOWN) == down_before + 1
    finally:
        fab.relink("h2")
    up = _wait_event(hosts["h2"], PortEventKind.PORT_ACTIVE)
    assert up.attrs.state is PortState.ACTIVE
    # OpenSM dropped h2's membership: the group's traffic no longer reaches it
    deadline = time.monotonic() + 10
    while hosts["h2"].call("control.sa.member", mgid) is not None:
        assert time.monotonic() < deadline, "OpenSM kept the membership of a relinked port"
        time.sleep(0.1)
    hosts["h2"].forget_memberships()
    before = counter(hosts["h2"], FabricCounter.NOT_MEMBER)
    a.send(path, MCAST_QPN, [b"\x08\x00\x00\x00after-relink"])
    a.send(a.path_to(b), b.qpn, [marker(6)])
    assert [bytes(x.payload) for x in b.recv_until(marker(6))] == [marker(6)]
    assert counter(hosts["h2"], FabricCounter.NOT_MEMBER) == before + 1
    # rejoined, it receives again
    join(hosts["h2"], mgid)
    a.send(path, MCAST_QPN, [b"\x08\x00\x00\x00rejoined"])
    a.send(a.path_to(b), b.qpn, [marker(7)])
    assert [bytes(x.payload) for x in b.recv_until(marker(7))] == [b"\x08\x00\x00\x00rejoined", marker(7)]
    leave(hosts["h1"], mgid)
    leave(hosts["h2"], mgid)


def test_partition_change_by_opensm_is_a_pkey_change_event(fab, hosts):
    """h3 joins 0x8003 when OpenSM reloads its partitions (SIGHUP), and leaves it when restored."""
    h3 = hosts["h3"]
    conf = fab.workdir / "partitions.conf"
    original = conf.read_text()
    everyone = ", ".join(f"{h.guid:#018x}=full" for h in fab.hosts)
    opensm = fab.state["pids"]["opensm"][0]
    h3.events.get()
    try:
        conf.write_text(f"Default=0x7fff, ipoib, mtu=4 : ALL=full;\nP8003=0x8003, ipoib, mtu=4 : {everyone};\n")
        os.kill(opensm, signal.SIGHUP)
        ev = _wait_event(h3, PortEventKind.PKEY_CHANGE)
        assert P8003 in ev.attrs.pkeys
        qp = Qp(h3, P8003)                     # now allowed
        assert qp.qp.pkey_index == ev.attrs.pkeys.index(P8003)
        qp.qp.close()
    finally:
        conf.write_text(original)
        os.kill(opensm, signal.SIGHUP)
    ev = _wait_event(h3, PortEventKind.PKEY_CHANGE)
    assert P8003 not in ev.attrs.pkeys


# ---------------------------------------------------------------- names are released

def test_registry_names_disappear_with_their_process(fab):
    from xdpoib.fabric.simud import scan
    from xdpoib.fabric.simud_remote import RemoteBackend

    h = fab.hosts[0]
    backend = RemoteBackend.on_host(fab, h)
    try:
        q = Qp(backend)
        q.qp.attach_mcast(new_mgid(), 0xC001)
        lid = backend.port().lid
        lids, groups = scan(fab.name)
        assert lid in lids and any((h.guid, q.qpn) in m for m in groups.values())
        os.kill(backend.pid, signal.SIGKILL)      # no chance to clean up: the kernel frees the names
        backend.proc.wait(timeout=10)
        _, groups = scan(fab.name)
        assert not any((h.guid, q.qpn) in m for m in groups.values())
    finally:
        backend.close()


# ---------------------------------------------------------------- events from port changes (no SM needed)

def test_port_changes_become_events_and_a_new_lid_is_reachable():
    """Port changes OpenSM on ibsim cannot easily make (LID, SM, P_Key table), on a fixed port description."""
    from dataclasses import replace

    from xdpoib.fabric.base import PortAttrs
    from xdpoib.fabric.simud import SimUdBackend, StaticControl

    def attrs(lid, guid):
        gid = bytes.fromhex("fe80000000000000") + guid.to_bytes(8, "big")
        return PortAttrs(lid=lid, sm_lid=1, state=PortState.ACTIVE, active_mtu=2048, port_guid=guid, gids=(gid,),
                         pkeys=(0xFFFF,))

    fabric = f"ev{os.getpid()}"
    ca, cb = StaticControl(attrs(0x21, 0xA1)), StaticControl(attrs(0x22, 0xB2))
    with SimUdBackend(fabric, ca, poll_interval=3600) as a, SimUdBackend(fabric, cb, poll_interval=3600) as b:
        qa = a.create_qp(0xFFFF, QKEY, a.alloc_pool(4, GRH_LEN + 256))
        qb = b.create_qp(0xFFFF, QKEY, b.alloc_pool(4, GRH_LEN + 256))
        qb.post_recv(range(4))
        cb.attrs = replace(cb.attrs, lid=0x33, sm_lid=2, pkeys=(0xFFFF, 0x8003))
        kinds = [e.kind for e in b.refresh()]
        assert kinds == [PortEventKind.LID_CHANGE, PortEventKind.PKEY_CHANGE, PortEventKind.CLIENT_REREGISTER]
        assert [e.kind for e in b.events.get()] == kinds
        old = a.counters()[FabricCounter.NO_DESTINATION]
        a.registry()                           # senders re-read the LID registry within a second; now
        qa.post_send([SendRequest(a.create_ah(Path(dlid=0x22)), qb.qpn, QKEY, b"old-lid")])
        qa.post_send([SendRequest(a.create_ah(Path(dlid=0x33)), qb.qpn, QKEY, b"new-lid")])
        assert a.counters()[FabricCounter.NO_DESTINATION] == old + 1
        assert qb.wait(5)
        assert [bytes(c.payload) for c in qb.poll(4)] == [b"new-lid"]
        cb.attrs = replace(cb.attrs, state=PortState.DOWN)
        assert [e.kind for e in b.refresh()] == [PortEventKind.PORT_ERR]
        cb.attrs = replace(cb.attrs, state=PortState.ACTIVE)
        assert [e.kind for e in b.refresh()] == [PortEventKind.PORT_ACTIVE]
        assert b.refresh() == []


def test_overrun_and_malformed_datagrams_are_counted():
    """A receiver that does not drain loses datagrams at its socket queue (counted by the sender);
    bytes that are not sim packets are counted by the receiver."""
    import socket

    from xdpoib.fabric.simud import qp_address

    fabric = f"ov{os.getpid()}"
    with _static_backend(fabric, 0x51, 0xD1) as a, _static_backend(fabric, 0x52, 0xD2) as b:
        qa = a.create_qp(0xFFFF, QKEY, a.alloc_pool(2, GRH_LEN + 256))
        qb = b.create_qp(0xFFFF, QKEY, b.alloc_pool(64, GRH_LEN + 256))
        qb.post_recv(range(64))
        ah = a.create_ah(Path(dlid=0x52))
        sent = 40
        for i in range(sent):                   # one datagram each: more than the socket queue holds
            qa.post_send([SendRequest(ah, qb.qpn, QKEY, b"%d" % i)])
        overrun = a.counters()[FabricCounter.RX_OVERRUN]
        got = qb.poll(64)
        assert overrun > 0 and len(got) + overrun == sent
        assert [bytes(c.payload) for c in got] == [b"%d" % i for i in range(len(got))]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"not a sim packet", qp_address(fabric, 0xD2, qb.qpn))
        assert qb.wait(5) and qb.poll(4) == []
        assert b.counters()[FabricCounter.BAD_DATAGRAM] == 1


# ---------------------------------------------------------------- benchmark (prints ratios, asserts none)

def _static_backend(fabric, lid, guid):
    from xdpoib.fabric.base import PortAttrs
    from xdpoib.fabric.simud import SimUdBackend, StaticControl

    gid = bytes.fromhex("fe80000000000000") + guid.to_bytes(8, "big")
    return SimUdBackend(fabric, StaticControl(PortAttrs(
        lid=lid, sm_lid=1, state=PortState.ACTIVE, active_mtu=2048, port_guid=guid, gids=(gid,),
        pkeys=(0xFFFF,))), poll_interval=3600)


def _run_pair(sender, receiver, seconds):
    """Fork a receiver (counts what it gets) and run the sender here; packets received per second."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                # child: receive until the sender's stop mark
        os.close(rfd)
        code = 0
        try:
            n = receiver()
            os.write(wfd, str(n).encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(wfd)
    start = time.perf_counter()
    sender(seconds)
    got = int(os.read(rfd, 64) or b"0")
    elapsed = time.perf_counter() - start
    os.close(rfd)
    os.waitpid(pid, 0)
    return got / elapsed


@pytest.mark.bench
def test_bench_sim_transport_against_raw_unix_datagrams():
    """Sim UD (64-byte payloads, batches of 64, two processes) against raw unix datagram sockets
    carrying the same bundles: the sim's cost of IB rules, headers and completions."""
    import socket

    batch_size, seconds, stop = 64, 2.0, b"\x00STOP"
    fabric = f"bench{os.getpid()}"
    a, b = _static_backend(fabric, 0x41, 0xC1), _static_backend(fabric, 0x42, 0xC2)
    qa = a.create_qp(0xFFFF, QKEY, a.alloc_pool(4, GRH_LEN + 256))
    qb = b.create_qp(0xFFFF, QKEY, b.alloc_pool(1024, GRH_LEN + 256))
    qb.post_recv(range(1024))
    ah = a.create_ah(Path(dlid=0x42))
    frames = [SendRequest(ah, qb.qpn, QKEY, bytes(64)) for _ in range(batch_size)]

    def sim_send(secs):
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            qa.post_send(frames)
            time.sleep(0) if a.counters()[FabricCounter.RX_OVERRUN] else None
        qa.post_send([SendRequest(ah, qb.qpn, QKEY, stop)])

    def sim_recv():
        n, idle = 0, 0
        while idle < 3:                     # the stop mark can be lost to an overrun: 3 s of silence end it too
            idle = 0 if qb.wait(1.0) else idle + 1
            cs = qb.poll(256)
            if any(c.byte_len == len(stop) for c in cs):
                return n
            n += len(cs)
            qb.post_recv([c.index for c in cs])
        return n

    sim = _run_pair(sim_send, sim_recv, seconds)
    overrun = a.counters()[FabricCounter.RX_OVERRUN]
    a.close()
    b.close()

    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s1.setblocking(False)
    bundle = b"".join(bytes(56) + bytes(64) for _ in range(batch_size))
    drops = 0

    def raw_send(secs):
        nonlocal drops
        end = time.perf_counter() + secs
        while time.perf_counter() < end:
            try:
                s1.send(bundle)
            except BlockingIOError:
                drops += 1
        s1.setblocking(True)
        s1.send(stop)

    def raw_recv():
        n, buf = 0, bytearray(1 << 18)
        out = bytearray(256 * 1024)
        while True:
            size = s2.recv_into(buf)
            if buf[:size] == stop:
                return n
            for off in range(0, size, 120):         # copy each payload out, as a completion would
                out[off:off + 64] = buf[off + 56:off + 120]
            n += size // 120

    raw = _run_pair(raw_send, raw_recv, seconds)
    print(f"\nsim UD: {sim / 1e3:.0f} kpps received (sender overruns {overrun}); raw unix datagrams: "
          f"{raw / 1e3:.0f} kpps (send drops {drops}); sim/raw = {sim / raw:.2f}")
