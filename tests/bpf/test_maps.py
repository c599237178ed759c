"""Maps: the ctypes mirror equals bcc's derived Key/Leaf types, batched updates and deletes, pinning
under bpffs, and the once-per-interval report of destinations not in the maps."""

from __future__ import annotations

import ctypes as ct
import os
import time
from pathlib import Path

import gen
import pytest

from xdpoib import abi
from xdpoib.abi import XdpAction
from xdpoib.datapath import testrun
from xdpoib.datapath.maps import LAYOUT, Maps
from xdpoib.reasons import Kind
from xdpoib.wire import frames as f


def _layout(t) -> list[tuple[str, int, int]]:
    if not hasattr(t, "_fields_"):
        return [("", 0, ct.sizeof(t))]
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


@pytest.mark.parametrize("name", [n for n in LAYOUT if n not in ("xo_xsks", "xo_egress")])
def test_mirror_matches_bccs_derived_types(datapath, name):
    table = datapath.table(name)
    key_t, value_t, _ = LAYOUT[name]
    assert ct.sizeof(table.Key) == ct.sizeof(key_t)
    leaf = getattr(table, "sLeaf", table.Leaf)      # per-CPU tables: bcc's Leaf is the per-CPU array
    assert ct.sizeof(leaf) == ct.sizeof(value_t)
    if hasattr(key_t, "_fields_"):
        assert _layout(table.Key) == _layout(key_t)
    if hasattr(value_t, "_fields_"):
        assert _layout(leaf) == _layout(value_t)


def _peers(n: int, base: int = 0):
    for i in range(base, base + n):
        mac = bytes([0x06, 0x01]) + i.to_bytes(4, "big")
        addr = b"\x00" + (0x1000 + i).to_bytes(3, "big") + bytes.fromhex("fe80000000000000") + i.to_bytes(8, "big")
        yield 1000 + i, mac, addr


def test_batched_peer_load_and_delete(maps):
    n = 50_000
    peers = list(_peers(n))
    t0 = time.perf_counter()
    maps.add_peers(peers)
    loaded = time.perf_counter() - t0
    assert maps.peer_count() == maps.peer_id.count() == maps.peer_mac.count() == n
    _, mac, addr = peers[12345]
    assert bytes(maps.peer_mac.get(abi.mac_key(mac)).addr) == addr
    assert bytes(maps.by_addr.get(abi.addr_key(addr)).mac) == mac
    t0 = time.perf_counter()
    maps.remove_peers(peers[: n // 2])
    removed = time.perf_counter() - t0
    assert maps.peer_mac.count() == maps.peer_count() == n - n // 2
    assert maps.peer_mac.clear() == n - n // 2
    assert maps.peer_mac.count() == 0
    assert maps.peer_id.clear() == n - n // 2
    assert maps.peer_id.count() == maps.peer_count() == 0
    print(f"\nbatched: {n} peers loaded in {loaded * 1e3:.0f} ms, {n // 2} removed in {removed * 1e3:.0f} ms")


def test_vif_address_wins_over_a_peer_with_the_same_address(maps):
    vif = gen.VIFS[0]
    maps.add_vifs([(vif.vif_id, vif.mac, vif.addr.pack())])
    maps.add_peers([(5, bytes.fromhex("060000000005"), vif.addr.pack())])
    assert bytes(maps.by_addr.get(abi.addr_key(vif.addr.pack())).mac) == vif.mac
    maps.remove_peers([(5, bytes.fromhex("060000000005"), vif.addr.pack())])
    assert bytes(maps.by_addr.get(abi.addr_key(vif.addr.pack())).mac) == vif.mac


def test_pinned_maps_and_programs_outlive_their_loader(datapath, maps, tmp_path):
    pin_dir = Path("/sys/fs/bpf") / f"xdpoib-test-{os.getpid()}"
    from xdpoib.datapath.loader import unpin

    try:
        datapath.pin(pin_dir)
        assert {p.name for p in pin_dir.iterdir()} >= {"xdpoib_tx", "xdpoib_rx", "xo_peer_mac", "xo_stats"}
        pinned = Maps.open_pinned(pin_dir)
        try:
            pinned.set_group(b"\xff" * 16, 42)
            assert maps.group.get(abi.MgidKey(mgid=(ct.c_uint8 * 16)(*(b"\xff" * 16)))).group_id == 42
        finally:
            pinned.close()
    finally:
        unpin(pin_dir)
    assert not pin_dir.exists()


@pytest.fixture
def events(datapath):
    """Unresolved-destination events from the ring buffer (opened once per session)."""
    got: list[abi.UnresolvedEvent] = []
    table = datapath.table("xo_events")
    if not getattr(datapath, "_events_cb", None):
        def cb(_ctx, data, size):
            datapath._events_sink.append(abi.UnresolvedEvent.from_bytes(ct.string_at(data, size)))
            return 0

        datapath._events_cb = cb
        table.open_ring_buffer(cb)
    datapath._events_sink = got
    datapath.bpf.ring_buffer_consume()
    got.clear()
    return got


def test_unresolved_destination_is_reported_once_per_interval(datapath, maps, events):
    maps.load(gen.tables())
    maps.set_config(report_interval_ns=60 * 10**9)
    vif = gen.VIFS[0]
    unknown = bytes.fromhex("0a0000000099")
    ip = f.ipv4(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 9]), 17, f.udp(bytes(4), bytes(4), 1, 2, b"x"))
    frame = f.eth(unknown, vif.mac, 0x0800, ip)
    for _ in range(5):
        assert testrun.run(datapath.fd("xdpoib_tx"), frame).retval == XdpAction.REDIRECT
    datapath.bpf.ring_buffer_consume()
    mine = [e for e in events if bytes(e.dest[:6]) == unknown]
    assert len(mine) == 1
    e = mine[0]
    assert (e.version, e.kind, e.pkey, e.vif_id) == (abi.META_VERSION, Kind.UNRESOLVED, 0xFFFF, vif.vif_id)
    assert maps.counters(abi.Direction.TX).kinds[Kind.UNRESOLVED] == 5
    # with a 1 ns interval every frame is reported
    maps.set_config(report_interval_ns=1)
    for _ in range(3):
        testrun.run(datapath.fd("xdpoib_tx"), frame)
    datapath.bpf.ring_buffer_consume()
    assert len([e for e in events if bytes(e.dest[:6]) == unknown]) == 4


def test_slot_cache_collisions_fall_back_to_the_hash(datapath, maps):
    """Two peers in one cache slot: both resolve (one by the slot, one by the hash); removing the
    slot's owner clears the slot, so it is never used stale."""
    maps.load(gen.tables())
    a_mac = bytes.fromhex("020000abcdef")
    b_mac = next(m for m in (bytes([2, 0, 0, 0, x >> 8, x & 0xFF]) for x in range(1 << 16))
                 if m != a_mac and abi.mac_slot(m, abi.PEER_SLOTS) == abi.mac_slot(a_mac, abi.PEER_SLOTS))
    b_id = 500 + abi.PEER_SLOTS                  # an id past the REMAC cache size
    a = (500, a_mac, b"\0\0\1\1" + bytes(15) + b"\x0a")
    b = (b_id, b_mac, b"\0\0\1\2" + bytes(15) + b"\x0b")
    maps.add_peers([a, b])
    ip = f.ipv4(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 9]), 17, f.udp(bytes(4), bytes(4), 1, 2, b"x"))

    def dest(mac):
        r = testrun.run(datapath.fd("xdpoib_tx"), f.eth(mac, gen.VIFS[0].mac, 0x0800, ip))
        m = abi.TxMeta.from_bytes(r.meta)
        return Kind(m.kind), m.dest_id

    assert dest(a_mac) == (Kind.PEER, 500) and dest(b_mac) == (Kind.PEER, b_id)
    rx = f.ipoib(0x0800, ip)
    for pid, mac in ((500, a_mac), (b_id, b_mac)):
        r = testrun.run(datapath.fd("xdpoib_rx"), rx, abi.rx_meta(pid, gen.VIFS[0].vif_id, 0xFFFF))
        assert r.retval == XdpAction.REDIRECT and r.frame[6:12] == mac
    maps.remove_peers([b])
    assert dest(b_mac) == (Kind.UNRESOLVED, 0) and dest(a_mac) == (Kind.PEER, 500)
    r = testrun.run(datapath.fd("xdpoib_rx"), rx, abi.rx_meta(b_id, gen.VIFS[0].vif_id, 0xFFFF))
    assert r.retval == XdpAction.DROP


def test_per_cpu_values_narrower_than_8_bytes_round_trip(maps):
    """The kernel lays a per-CPU value out in 8-byte steps: a u32 per CPU (xo_inject_idx) is written and
    read back on every CPU, not past the buffer."""
    from xdpoib.datapath.maps import possible_cpus

    maps.inject_idx.set(0, 0x5A5A5A5A)
    assert maps.inject_idx.get(0) == [0x5A5A5A5A] * possible_cpus()
    maps.inject_idx.set(0, 7)
    assert maps.inject_idx.get(0) == [7] * possible_cpus()
