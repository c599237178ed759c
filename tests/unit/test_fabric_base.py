"""The backend contract's concrete helpers: conversions, P_Key rules, paths, event queue, loopback filter."""

from __future__ import annotations

import select
import threading

import pytest

from xdpoib.errors import XdpoibError
from xdpoib.fabric import base
from xdpoib.fabric.base import (
    Completion,
    CompletionStatus,
    EventQueue,
    FabricCounter,
    LinkLayer,
    LoopbackFilter,
    MemoryPool,
    Path,
    PortAttrs,
    PortEvent,
    PortEventKind,
    PortState,
)

GID_A = bytes.fromhex("fe800000000000000002c90300000001")
GID_B = bytes.fromhex("fe800000000000000002c90300000002")
MGID = bytes.fromhex("ff12401bffff000000000000ffffffff")


def port(lid=5, gids=(GID_A,), pkeys=(0xFFFF, 0x8003, 0), link=LinkLayer.INFINIBAND):
    return PortAttrs(lid=lid, sm_lid=1, state=PortState.ACTIVE, active_mtu=2048, port_guid=1,
                     gids=tuple(gids), pkeys=tuple(pkeys), link_layer=link)


def completion(src_qp, slid=0, sgid=None):
    return Completion(CompletionStatus.SUCCESS, 10, src_qp, slid, sgid, sgid is not None, 0)


def test_gid_round_trip_and_errors():
    assert base.gid_bytes("fe80::2:c903:0:1") == GID_A
    assert base.gid_str(GID_A) == "fe80::2:c903:0:1"
    assert base.gid_bytes(GID_A) == GID_A
    with pytest.raises(base.PortError):
        base.gid_bytes(b"\x01" * 15)
    with pytest.raises(XdpoibError, match="bad GID"):
        base.gid_bytes("not-a-gid")


@pytest.mark.parametrize(("size", "enum"), [(256, 1), (512, 2), (1024, 3), (2048, 4), (4096, 5)])
def test_mtu_enum_both_ways(size, enum):
    assert base.mtu_enum(size) == enum
    assert base.mtu_bytes(enum) == size


def test_mtu_rejects_other_values():
    with pytest.raises(base.PortError):
        base.mtu_enum(1500)
    with pytest.raises(base.PortError):
        base.mtu_bytes(6)


@pytest.mark.parametrize(("a", "b", "match"), [
    (0xFFFF, 0xFFFF, True),
    (0xFFFF, 0x7FFF, True),     # full vs limited
    (0x7FFF, 0x7FFF, False),    # two limited members cannot talk
    (0x8003, 0xFFFF, False),
    (0x8003, 0x0003, True),
    (0x8000, 0x8000, False),    # the invalid P_Key
])
def test_pkey_matches(a, b, match):
    assert base.pkey_matches(a, b) is match


def test_port_pkey_index_prefers_full_member():
    p = port(pkeys=(0x7FFF, 0xFFFF, 0x8003))
    assert p.pkey_index(0xFFFF) == 1
    assert p.pkey_index(0x0003) == 2
    with pytest.raises(base.PortError, match="0x8005"):
        p.pkey_index(0x8005)
    assert p.has_pkey(0x8003) and p.has_pkey(0x7FFF) and not p.has_pkey(0x8005)


def test_pkey_index_is_one_contract_for_backend_and_sa_ports():
    """`PortAttrs` (backends) and `LocalPort` (the SA client) find the same index and refuse alike."""
    from xdpoib.fabric.sa import LocalPort

    table = (0xFFFF, 0x0003, 0x8003, 0, 0x7FFF)
    lp = LocalPort(ca_name="x", portnum=1, port_guid=1, gid_prefix=0, lid=1, lmc=0, sm_lid=1, sm_sl=0, state=4,
                   phys_state=5, capability_mask=0, mtu_cap=4, active_mtu=4, pkeys=table)
    pa = port(pkeys=table)
    for pkey in (0xFFFF, 0x7FFF, 0x8003, 0x0003):
        assert lp.pkey_index(pkey) == pa.pkey_index(pkey) == base.pkey_index(table, pkey)
    assert lp.pkey_index(0x0003) == 2                          # the full-member entry wins
    for p in (lp, pa):
        assert not p.has_pkey(0x8004) and not p.has_pkey(0)    # an empty slot is no P_Key
        with pytest.raises(base.PortError, match=r"0x8004 \(its P_Key table: 0xffff, 0x0003, 0x8003, 0x7fff\)"):
            p.pkey_index(0x8004)


def test_path_check():
    Path(dlid=3).check()
    Path(dlid=0xC001, dgid=MGID, grh=True).check()
    assert Path(dlid=0xC001, dgid=MGID, grh=True).multicast
    assert not Path(dlid=3).multicast
    with pytest.raises(base.QpError, match="GRH"):
        Path(dlid=0xC001).check()
    with pytest.raises(base.QpError, match="DGID"):
        Path(dlid=3, grh=True).check()
    with pytest.raises(base.PortError):
        Path(dlid=3, mtu=1500).check()


def test_memory_pool_views_are_disjoint():
    pool = MemoryPool(4, 64)
    pool.view(1)[:3] = b"abc"
    assert bytes(pool.view(1)[:3]) == b"abc"
    assert bytes(pool.view(0)) == bytes(64) and bytes(pool.view(2)) == bytes(64)
    with pytest.raises(base.QpError):
        pool.view(4)
    with pytest.raises(base.QpError):
        MemoryPool(4, base.GRH_LEN)


def test_memory_pool_in_caller_memory_may_end_with_its_last_buffer():
    """A pool over caller memory spans (count - 1) * stride + size bytes from its offset: its last buffer may
    end where the memory does (the inject map's last receive region does); a byte less is refused."""
    count, size, stride, offset = 4, 100, 160, 24
    memory = bytearray(offset + (count - 1) * stride + size)
    pool = MemoryPool(count, size, memory=memory, stride=stride, offset=offset)
    pool.view(3)[:] = b"\x07" * size
    assert memory[-size:] == b"\x07" * size
    rows = pool.rows()
    assert rows.shape == (count, size) and rows.strides == (stride, 1)
    rows[1, :2] = (1, 2)
    assert memory[offset + stride:offset + stride + 2] == b"\x01\x02"
    with pytest.raises(base.QpError, match=r"hold 4 buffers of 100 bytes, 160 bytes apart from offset 24 "
                                           r"\(604 bytes; it has 603\)"):
        MemoryPool(count, size, memory=memory[:-1], stride=stride, offset=offset)


def test_event_queue_fd_readable_exactly_while_nonempty():
    q = EventQueue()
    try:
        assert select.select([q], [], [], 0)[0] == []
        q.put(PortEvent(PortEventKind.PORT_ERR))
        q.put(PortEvent(PortEventKind.PORT_ACTIVE))
        assert select.select([q], [], [], 0)[0] == [q]
        assert [e.kind for e in q.get(1)] == [PortEventKind.PORT_ERR]
        assert select.select([q], [], [], 0)[0] == [q]
        assert [e.kind for e in q.get()] == [PortEventKind.PORT_ACTIVE]
        assert select.select([q], [], [], 0)[0] == []
        assert q.get() == []
    finally:
        q.close()
    q.close()
    with pytest.raises(base.BackendClosedError):
        q.get()


def test_event_queue_wait_wakes_on_put_from_another_thread():
    q = EventQueue()
    try:
        timer = threading.Timer(0.05, q.put, args=(PortEvent(PortEventKind.LID_CHANGE),))
        timer.start()
        events = q.wait(5)
        timer.join()
        assert [e.kind for e in events] == [PortEventKind.LID_CHANGE]
        assert q.wait(0.01) == []
    finally:
        q.close()


def test_loopback_filter_ib_by_slid_and_qpn():
    f = LoopbackFilter(port(lid=5), qpns={0x48})
    mine = completion(0x48, slid=5)
    sibling_host = completion(0x48, slid=6)          # same QPN on another port
    other_qp = completion(0x49, slid=5)              # our port, not our QP (another agent)
    mine_grh = completion(0x48, slid=5, sgid=GID_A)
    other_grh = completion(0x48, slid=5, sgid=GID_B)  # GRH says another port
    kept = f.filter([mine, sibling_host, other_qp, mine_grh, other_grh])
    assert kept == [sibling_host, other_qp, other_grh]
    assert f.counters.snapshot()[FabricCounter.LOOPBACK] == 2
    f.qpns.add(0x49)
    assert f.filter([other_qp]) == []
    assert f.counters.snapshot()["loopback"] == 3


def test_loopback_filter_roce_needs_grh():
    f = LoopbackFilter(port(lid=0, link=LinkLayer.ETHERNET), qpns={7})
    assert f.filter([completion(7, slid=0)]) == [completion(7, slid=0)]
    assert f.filter([completion(7, sgid=GID_A)]) == []


def test_counters_snapshot_has_every_name():
    c = base.Counters()
    c.add(FabricCounter.QKEY_MISMATCH, 2)
    snap = c.snapshot()
    assert set(snap) == {x.value for x in FabricCounter}
    assert snap["qkey_mismatch"] == 2 and sum(snap.values()) == 2


# ---------------------------------------------------------------- the sim transport's wire and rules

def packet(**kw):
    from xdpoib.fabric.simud_wire import Packet

    fields = dict(slid=2, dlid=3, sl=0, pkey=0xFFFF, src_qpn=0x100, dst_qpn=0x200, qkey=0xB1B, grh=False,
                  sgid=bytes(16), dgid=bytes(16), payload=b"\x08\x00\x00\x00abc")
    fields.update(kw)
    return Packet(**fields)


def test_sim_wire_round_trip_and_bundles():
    from xdpoib.fabric import simud_wire as w

    pkts = [packet(payload=bytes([i]) * (100 + i), grh=bool(i % 2), sgid=GID_A, dgid=MGID) for i in range(5)]
    enc = [w.encode(p) for p in pkts]
    assert all(len(e) == w.HEADER.size + len(p.payload) for e, p in zip(enc, pkts, strict=True))
    (datagram, n), = list(w.bundles(enc))
    assert n == 5
    assert w.decode(datagram) == (pkts, 0)
    big = [w.encode(packet(payload=bytes(4096)))] * 100
    split = list(w.bundles(big))
    assert sum(n for _, n in split) == 100 and len(split) > 1
    assert all(len(d) <= w.BUNDLE_MAX for d, _ in split)


def test_sim_wire_decode_reports_malformed_tail():
    from xdpoib.fabric import simud_wire as w

    good = w.encode(packet())
    assert w.decode(good + b"XX") == ([packet()], 2)
    assert w.decode(good[:-1]) == ([], len(good) - 1)                 # payload shorter than its length
    assert w.decode(b"ZZ" + good[2:]) == ([], len(good))             # bad magic


def test_sim_grh_layout():
    from xdpoib.fabric import simud_wire as w

    g = w.grh(packet(grh=True, sgid=GID_A, dgid=MGID), traffic_class=0x12, flow_label=0x345, hop_limit=7)
    assert len(g) == base.GRH_LEN
    assert int.from_bytes(g[0:4], "big") == (6 << 28) | (0x12 << 20) | 0x345
    assert int.from_bytes(g[4:6], "big") == 7 and g[6] == 0x1B and g[7] == 7
    assert g[8:24] == GID_A and g[24:40] == MGID


def test_effective_qkey():
    from xdpoib.fabric.simud_wire import effective_qkey

    assert effective_qkey(0x1234, 0xB1B) == 0x1234
    assert effective_qkey(0x80000000, 0xB1B) == 0xB1B


@pytest.mark.parametrize(("desc", "pkt", "qp_pkey", "table", "attached", "verdict"), [
    ("unicast to us", {}, 0xFFFF, (0xFFFF,), set(), None),
    ("another QPN", {"dst_qpn": 0x201}, 0xFFFF, (0xFFFF,), set(), FabricCounter.NO_DESTINATION),
    ("wrong Q_Key", {"qkey": 0xB1C}, 0xFFFF, (0xFFFF,), set(), FabricCounter.QKEY_MISMATCH),
    ("other partition", {"pkey": 0x8003}, 0xFFFF, (0xFFFF, 0x8003), set(), FabricCounter.PKEY_MISMATCH),
    ("limited to full", {"pkey": 0x0003}, 0x8003, (0xFFFF, 0x8003), set(), None),
    ("limited to limited", {"pkey": 0x0003}, 0x0003, (0x0003,), set(), FabricCounter.PKEY_MISMATCH),
    ("QP's P_Key left the table", {"pkey": 0x8003}, 0x8003, (0xFFFF,), set(), FabricCounter.PKEY_MISMATCH),
    ("multicast, attached", {"dst_qpn": 0xFFFFFF, "grh": True, "dgid": MGID}, 0xFFFF, (0xFFFF,), {MGID},
     None),
    ("multicast, not attached", {"dst_qpn": 0xFFFFFF, "grh": True, "dgid": MGID}, 0xFFFF, (0xFFFF,),
     set(), FabricCounter.NOT_MEMBER),
    ("multicast without GRH", {"dst_qpn": 0xFFFFFF, "dgid": MGID}, 0xFFFF, (0xFFFF,), {MGID},
     FabricCounter.NOT_MEMBER),
])
def test_sim_receive_verdict(desc, pkt, qp_pkey, table, attached, verdict):
    from xdpoib.fabric.simud_wire import receive_verdict

    assert receive_verdict(packet(**pkt), 0x200, 0xB1B, qp_pkey, table, attached) == verdict, desc
