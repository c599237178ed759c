"""Bounded state, the pure parts (xdpoib/peers.py, xdpoib/agent/aging.py): removal keeps REMACs
reserved, the cap evicts idle newcomers before peers in use, reservations are capped, a LID change
drops the path, the SA gate's token bucket, the settings from the environment."""

from __future__ import annotations

import time

import pytest

from xdpoib.agent.aging import AgingConfig, AgingError, SAGate
from xdpoib.peers import PeerTable
from xdpoib.wire.addr import IPoIBAddr
from xdpoib.wire.oracle import Vif


def gid(n: int) -> bytes:
    return bytes.fromhex("fe80000000000000") + n.to_bytes(8, "big")


def table() -> PeerTable:
    return PeerTable([Vif(0, bytes.fromhex("f45214000001"), IPoIBAddr(0, 0x11, gid(0)))], {0: 0xFFFF})


def test_removed_peer_comes_back_with_its_remac_and_id():
    t = table()
    removed = []
    t.on_removed = lambda es, why: removed.append((len(es), why))
    e = t.learn(IPoIBAddr(0, 0x100, gid(1)), lid=5)
    remac, pid = e.remac, e.peer_id
    assert t.remove([e]) == [e] and removed == [(1, "idle")]
    assert t.by_lid(5, 0x100) is None and t.by_id(pid) is None and t.reserved == 1
    assert any(r[3].replace(":", "") == remac.hex() for r in t.to_json()["reserved"])
    back = t.learn(IPoIBAddr(0, 0x100, gid(1)))
    assert (back.remac, back.peer_id) == (remac, pid) and t.reserved == 0


def test_cap_evicts_unused_newcomers_before_peers_in_use():
    t = table()
    t.max_peers = 16
    evicted = []
    t.on_removed = lambda es, why: evicted.extend(es)
    used = t.learn(IPoIBAddr(0, 0x100, gid(1)))
    used.ah = object()
    _ = used.ah                                     # one send
    for n in range(2, 60):
        t.learn(IPoIBAddr(0, 0x100 + n, gid(n)))
    assert len(t.entries) <= 16 and len(evicted) >= 60 - 1 - 16
    assert used.addr.key in t.entries, "the peer in use was evicted"


def test_reservations_are_capped_oldest_first():
    t = table()
    t.max_reserved = 3
    es = [t.learn(IPoIBAddr(0, 0x100 + n, gid(n))) for n in range(1, 7)]
    t.remove(es)
    assert t.reserved == 3 and len(t.remacs) == 3
    kept = {r[1] for r in t.to_json()["reserved"]}
    assert kept == {0x104, 0x105, 0x106}


def test_lid_change_drops_the_path_and_tells():
    t = table()
    seen = []
    t.on_lid_change = lambda e, old: seen.append((old, e.lid))
    e = t.learn(IPoIBAddr(0, 0x100, gid(1)), lid=5)
    e.path_state, e.ah = "resolved", object()
    t.learn(e.addr, lid=9)
    assert (e.path_state, e.ah, seen) == ("unresolved", None, [(5, 9)])
    assert t.by_lid(9, 0x100) is e and t.by_lid(5, 0x100) is None


def test_lid_set_from_a_path_is_indexed_on_the_next_learn():
    t = table()
    e = t.learn(IPoIBAddr(0, 0x100, gid(1)))
    e.lid = 7                                       # what a PathRecord answer sets
    t.learn(e.addr, lid=7)
    assert t.by_lid(7, 0x100) is e


class FakeWorker:
    def __init__(self):
        self.keys = set()
        self.stats = {"submitted": 0}

    def pending(self, key):
        return key in self.keys

    def submit(self, key, fn, done):
        self.keys.add(key)
        self.stats["submitted"] += 1
        return True


def test_sa_gate_bounds_the_query_rate():
    stats = {"sa_rate_limited": 0}
    w = FakeWorker()
    g = SAGate(w, rate=10.0, burst=5, stats=stats)
    t0 = time.monotonic()
    for n in range(50):
        g.submit(("path", n), None, None)
    for n in range(20):
        g.submit(("check", n), None, None)          # not limited
    g.submit(("path", 0), None, None)               # queued already: no token
    elapsed = time.monotonic() - t0
    assert w.stats["submitted"] <= 5 + int(elapsed * 10) + 1 + 20 + 1
    assert stats["sa_rate_limited"] >= 40
    assert g.stats is w.stats                       # the rest is the worker's


def test_config_from_the_environment():
    assert AgingConfig.from_env({}) == AgingConfig()
    c = AgingConfig.from_env({"XDPOIB_PEER_IDLE_S": "4.5", "XDPOIB_MAX_PEERS": "40"})
    assert (c.peer_idle_s, c.max_peers) == (4.5, 40)
    with pytest.raises(AgingError, match="XDPOIB_MAX_PEERS must be a number"):
        AgingConfig.from_env({"XDPOIB_MAX_PEERS": "many"})
    with pytest.raises(AgingError, match="must be positive"):
        AgingConfig.from_env({"XDPOIB_SA_RATE": "0"})


def test_state_round_trip_keeps_peers_remacs_ids_and_reservations():
    t = table()
    es = [t.learn(IPoIBAddr(0x80 * (n % 2), 0x100 + n, gid(n)), lid=n + 1) for n in range(1, 6)]
    t.remove(es[:2])
    data = t.to_json()
    u = table()
    u.restore(data)
    assert {k: (e.peer_id, e.remac, e.lid, e.addr.flags) for k, e in u.entries.items()} == \
        {k: (e.peer_id, e.remac, e.lid, e.addr.flags) for k, e in t.entries.items()}
    assert u.reserved == 2
    back = u.learn(es[0].addr)
    assert (back.peer_id, back.remac) == (es[0].peer_id, es[0].remac)
    assert u.learn(IPoIBAddr(0, 0x999, gid(99))).peer_id == max(e.peer_id for e in es) + 1


def test_state_of_the_earlier_format_is_read():
    from xdpoib.wire.addr import gid_str, mac_str

    t = table()
    e = t.learn(IPoIBAddr(0, 0x100, gid(1)), lid=4)
    old = {"next_id": 2, "remacs": [{"gid": gid_str(gid(1)), "qpn": 0x100, "remac": mac_str(e.remac)}],
           "ids": [{"gid": gid_str(gid(1)), "qpn": 0x100, "id": 1}],
           "peers": [{"gid": gid_str(gid(1)), "qpn": 0x100, "flags": 0, "lid": 4}]}
    u = table()
    u.restore(old)
    (f,) = u.entries.values()
    assert (f.peer_id, f.remac, f.lid) == (1, e.remac, 4)


def test_ids_of_dropped_reservations_are_recycled():
    t = PeerTable([], {0: 0xFFFF})
    t.max_reserved = 0
    es = [t.learn(IPoIBAddr(0, 0x100 + i, gid(i))) for i in range(1, 6)]
    assert [e.peer_id for e in es] == [1, 2, 3, 4, 5]
    t.remove(es[1:3])
    assert t.reserved == 0
    back = [t.learn(IPoIBAddr(0, 0x200 + i, gid(100 + i))).peer_id for i in range(3)]
    assert sorted(back[:2]) == [2, 3] and back[2] == 6          # freed ids first, then new ones


def test_bound_on_peers_plus_reservations():
    from xdpoib import abi

    with pytest.raises(AgingError, match="must stay below"):
        AgingConfig.from_env({"XDPOIB_MAX_PEERS": str(abi.MAX_PEERS // 2),
                              "XDPOIB_MAX_RESERVED": str(abi.MAX_PEERS // 2)})


def test_restore_rebuilds_the_free_list_and_renumbers_big_ids():
    from xdpoib import abi
    t = PeerTable([], {0: 0xFFFF})
    es = [t.learn(IPoIBAddr(0, 0x100 + i, gid(i))) for i in range(1, 5)]
    data = t.to_json()
    data["peers"] = [r for r in data["peers"] if r[4] != 2]           # id 2 held by nobody
    data["peers"][-1][4] = abi.MAX_PEERS + 7                           # an older version's id
    u = PeerTable([], {0: 0xFFFF})
    u.restore(data)
    ids = {e.remac: e.peer_id for e in u.entries.values()}
    assert all(0 < i < abi.MAX_PEERS for i in ids.values()) and len(set(ids.values())) == 3
    assert set(ids) == {e.remac for e in es if e.peer_id != 2}         # REMACs unchanged
    assert u.learn(IPoIBAddr(0, 0x999, gid(99))).peer_id not in ids.values()
