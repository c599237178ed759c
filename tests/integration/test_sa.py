"""The SA client against a real OpenSM on ibsim; every claim is checked independently with saquery."""

from __future__ import annotations

import re
import time

import pytest

from xdpoib.errors import AddressError, UsageError
from xdpoib.fabric import sa
from xdpoib.fabric.sa import gid_str

SIM_HOSTS = 3
BCAST = "ff12:401b:ffff::ffff:ffff"          # IPv4 broadcast group of the default partition
BCAST_8003 = "ff12:401b:8003::ffff:ffff"
FAST = {"timeout": 0.05, "max_timeout": 0.2, "retries": 20, "deadline": 15.0}


def saquery_fields(text: str) -> list[dict[str, str]]:
    """Parse saquery's dumps ("Name......value" lines) into one dict per record."""
    recs, cur = [], None
    for line in text.splitlines():
        if line.rstrip().endswith("dump:") or line.startswith("SA ClassPortInfo"):
            cur = {}
            recs.append(cur)
            continue
        m = re.match(r"^\s+(\S.*?)\.{2,}\s*(.*)$", line)
        if m and cur is not None:
            cur[m.group(1).strip()] = m.group(2).strip()
    return recs


def members(fab, mgid: str, via: str = "sm") -> dict[str, int]:
    """PortGID -> JoinState of every member of `mgid`, as OpenSM reports it (trusted saquery run on
    `via`, which must share the group's partition: the SM's port is not in 0x8003)."""
    r = fab.saquery(via, "--smkey", "1", "MCMR", "--mgid", mgid)
    assert r.returncode == 0, r.stderr
    return {rec["PortGid"]: int(rec["JoinState"], 16) for rec in saquery_fields(r.stdout) if "PortGid" in rec}


@pytest.fixture(scope="module")
def clients(sim_fabric):
    """One SA client process per host, closed at the end of the module."""
    cs = {h.name: sim_fabric.sa_client(h.name) for h in sim_fabric.hosts}
    yield cs
    for c in cs.values():
        c.close()


def wait_for(pred, timeout=10.0, step=0.02):
    """Poll `pred` until it returns a truthy value; return it (or the last falsy one)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


def test_own_port_is_fresh_and_matches_the_sm(sim_fabric, clients):
    for h in sim_fabric.hosts:
        p = clients[h.name].port()
        assert p.active and p.state_name == "active"
        assert p.port_guid == h.guid
        assert p.gid == h.gid
        assert p.lid == sim_fabric.lid(h) != 0
        assert p.sm_lid not in (0, p.lid)
        assert p.pkey_index(0xFFFF) == 0
    assert clients["h1"].port().has_pkey(0x8003)
    assert not clients["h3"].port().has_pkey(0x8003)              # h3 is outside partition 0x8003


def test_class_port_info_matches_saquery(sim_fabric, clients):
    cpi = clients["h1"].class_port_info()
    ref = saquery_fields(sim_fabric.saquery("h1", "-c").stdout)[0]
    assert cpi.capability_mask == int(ref["Capability mask"], 16)
    assert cpi.capability_mask2 == int(ref["Capability mask 2"], 16)
    assert cpi.resp_time_value == int(ref["Response time value"], 16)
    assert cpi.send_only_full_member == bool(int(ref["Capability mask 2"], 16) & 0x1000)


def test_path_between_hosts_matches_saquery(sim_fabric, clients):
    h1, h2 = sim_fabric.host("h1"), sim_fabric.host("h2")
    rec = clients["h1"].path(h2.gid, cached=False)
    assert (rec.dgid, rec.sgid, rec.pkey) == (h2.gid, h1.gid, 0xFFFF)
    assert rec.dlid == sim_fabric.lid(h2) and rec.slid == sim_fabric.lid(h1)
    ref = saquery_fields(sim_fabric.saquery("h1", "PR", "--sgid-to-dgid",
                                            f"{gid_str(h1.gid)}-{gid_str(h2.gid)}").stdout)[0]
    assert rec.dlid == int(ref["dlid"]) and rec.slid == int(ref["slid"])
    assert (rec.mtu_selector << 6 | rec.mtu) == int(ref["mtu"], 16)
    assert (rec.rate_selector << 6 | rec.rate) == int(ref["rate"], 16)
    assert rec.sl == int(ref["sl"], 16) & 0xF      # (saquery sends no P_Key: OpenSM may pick 0x8003)
    assert (rec.packet_life_selector << 6 | rec.packet_life) == int(ref["pkt_life"], 16)
    assert (rec.reversible << 7 | rec.numb_path) == int(ref["num_path_revers"], 16)
    assert rec.mtu_bytes in (2048, 4096)
    # the P_Key in the request selects the partition
    assert clients["h1"].path(h2.gid, pkey=0x8003, cached=False).pkey == 0x8003
    with pytest.raises(sa.SANoRecordsError) as ei:
        clients["h1"].path(sim_fabric.host("h3").gid, pkey=0x8003, cached=False)
    assert ei.value.status == 0x0300


def test_path_cache_hits_expires_and_invalidates(sim_fabric, clients):
    c, h2, h3 = clients["h1"], sim_fabric.host("h2"), sim_fabric.host("h3")
    c.invalidate()
    before = c.stats().get("path ok", 0)
    first = c.path(h2.gid)
    assert c.path(h2.gid) == first
    assert c.stats().get("path ok", 0) == before + 1          # the second answer came from the cache
    assert c.path_cache_stats()["hits"] >= 1
    c.path(h3.gid)
    assert c.invalidate(h2.gid) == 1
    c.path(h2.gid)
    assert c.stats()["path ok"] == before + 3
    bulk = c.paths([h2.gid, h3.gid, "fe80::dead:beef"])
    assert [type(x).__name__ for x in bulk] == ["PathRecord", "PathRecord", "SANoRecordsError"]
    st, lat = c.stats(), c.latency()
    answered = st["path ok"] + st.get("path error", 0) + st.get("path timeout", 0)
    assert lat["path"]["count"] == answered - len(bulk)          # one duration per single query
    assert lat["paths"]["count"] == 1


def test_bulk_queries_are_bounded_in_flight(sim_fabric):
    h2, h3 = sim_fabric.host("h2"), sim_fabric.host("h3")
    with sim_fabric.sa_client("h1") as c:
        c.set_max_outstanding(4)
        got = c.paths([h2.gid, h3.gid] * 10)
        assert [r.dgid for r in got] == [h2.gid, h3.gid] * 10  # answers in request order
        assert c.peak_inflight() == 4                          # bounded, and the bound was used
        assert c.stats()["path ok"] == 20


def test_join_broadcast_verified_by_saquery_then_leave(sim_fabric, clients):
    c, h1 = clients["h1"], sim_fabric.host("h1")
    rec = c.join(BCAST)
    try:
        got = members(sim_fabric, BCAST)
        assert got.get(gid_str(h1.gid)) == 1                   # PortGID listed, JoinState 1
        ref = saquery_fields(sim_fabric.saquery("h2", "--smkey", "1", "MCMR", "--mgid", BCAST).stdout)[0]
        assert rec.qkey == int(ref["qkey"], 16) and rec.mlid == int(ref["mlid"], 16)
        assert rec.pkey == 0xFFFF and rec.join_state == 1 and rec.mtu_bytes == 2048
        m = c.member(BCAST)
        assert m is not None and m.port_gid == h1.gid and m.mlid == rec.mlid
        assert clients["h2"].member(BCAST) is None
    finally:
        c.leave(BCAST)
    assert gid_str(h1.gid) not in members(sim_fabric, BCAST)
    assert c.member(BCAST) is None


def test_create_ipv4_group_with_broadcast_parameters(sim_fabric, clients):
    c1, c2 = clients["h1"], clients["h2"]
    mgid = "ff12:401b:ffff::fb"                                # 224.0.0.251
    bc = c1.join(BCAST)
    try:
        assert c1.group(mgid) is None
        with pytest.raises(sa.SAInsufficientComponentsError) as ei:
            c1.join(mgid)                                       # a plain join cannot create
        assert ei.value.status == 0x0600
        rec = c1.join(mgid, create=bc)
        assert (rec.qkey, rec.mtu, rec.pkey, rec.rate, rec.sl, rec.tclass) == \
            (bc.qkey, bc.mtu, bc.pkey, bc.rate, bc.sl, bc.tclass)
        assert rec.mlid >= 0xC000 and rec.mlid != bc.mlid
        joined = c2.join(mgid)                                  # now it exists: mask 0x10003 suffices
        assert joined.mlid == rec.mlid
        got = members(sim_fabric, mgid)
        assert got == {gid_str(sim_fabric.host("h1").gid): 1, gid_str(sim_fabric.host("h2").gid): 1}
        c2.leave(mgid)
        c1.leave(mgid)
        assert members(sim_fabric, mgid) == {}
        assert c1.group(mgid) is None                           # the last full member took it away
    finally:
        c1.leave(BCAST)


def test_send_only_join_uses_class_port_info(sim_fabric, clients):
    c1, c3 = clients["h1"], clients["h3"]
    ref = saquery_fields(sim_fabric.saquery("h1", "-c").stdout)[0]
    expected = 8 if int(ref["Capability mask 2"], 16) & 0x1000 else 4
    assert c3.send_only_join_state() == expected
    bc = c1.join(BCAST)
    try:
        # send-only join of an existing group
        rec = c3.join_send_only(BCAST)
        assert rec.join_state == expected
        assert members(sim_fabric, BCAST)[gid_str(sim_fabric.host("h3").gid)] == expected
        c3.leave(BCAST, expected)
        # the fallback state (send-only non-member) joins an existing group but cannot create one
        c3.join(BCAST, sa.JOIN_SEND_ONLY_NON)
        assert members(sim_fabric, BCAST)[gid_str(sim_fabric.host("h3").gid)] == 4
        c3.leave(BCAST, sa.JOIN_SEND_ONLY_NON)
        new = "ff12:401b:ffff::e000:1"
        with pytest.raises(sa.SARequestInvalidError):
            c3.join(new, sa.JOIN_SEND_ONLY_NON, create=bc)
        assert c3.group(new) is None
        if expected == 8:                                      # SendOnlyFullMember creates the group
            created = c3.join_send_only(new, create=bc)
            assert created.join_state == 8 and created.qkey == bc.qkey
            assert members(sim_fabric, new) == {gid_str(sim_fabric.host("h3").gid): 8}
            c3.leave(new, 8)
        assert gid_str(sim_fabric.host("h3").gid) not in members(sim_fabric, BCAST)
    finally:
        c1.leave(BCAST)


def test_partition_refusal_for_port_outside_0x8003(sim_fabric, clients):
    with pytest.raises(sa.SARequestInvalidError) as ei:
        clients["h3"].join(BCAST_8003)
    assert ei.value.status == 0x0200 and isinstance(ei.value, sa.SAError)
    assert gid_str(sim_fabric.host("h3").gid) not in members(sim_fabric, BCAST_8003, via="h2")
    rec = clients["h1"].join(BCAST_8003)                       # a member of 0x8003 may join
    try:
        assert rec.pkey == 0x8003
        assert members(sim_fabric, BCAST_8003, via="h2")[gid_str(sim_fabric.host("h1").gid)] == 1
    finally:
        clients["h1"].leave(BCAST_8003)


def test_unknown_destination_and_leave_of_non_member_are_distinct_errors(sim_fabric, clients):
    with pytest.raises(sa.SANoRecordsError):
        clients["h1"].path("fe80::1:2:3:4", cached=False)
    with pytest.raises(sa.SARequestInvalidError):
        clients["h2"].leave("ff12:401b:ffff::e000:2")


def test_retries_under_half_the_mads_dropped(sim_fabric):
    h2 = sim_fabric.host("h2")
    lid2 = sim_fabric.lid(h2)
    with sim_fabric.sa_client("h1") as c:
        c.set_policy(**FAST)
        sim_fabric.drop("h1", 50)
        try:
            for _ in range(30):
                assert c.path(h2.gid, cached=False).dlid == lid2
            bulk = c.paths([h2.gid] * 20)
            assert all(isinstance(x, sa.PathRecord) for x in bulk)
        finally:
            sim_fabric.drop("h1", 0)
        st = c.stats()
        assert st["path ok"] == 50
        assert st.get("timeouts", 0) + st.get("lost", 0) >= 5   # MADs really were lost, and retried


def test_total_loss_is_a_timeout_error(sim_fabric):
    with sim_fabric.sa_client("h2") as c:
        c.set_policy(timeout=0.02, max_timeout=0.05, retries=3, deadline=2.0)
        sim_fabric.drop("h2", 100)
        try:
            t0 = time.monotonic()
            with pytest.raises(sa.SATimeoutError) as ei:
                c.path(sim_fabric.host("h1").gid, cached=False)
            assert ei.value.status is None
            assert time.monotonic() - t0 < 5
        finally:
            sim_fabric.drop("h2", 0)
        assert c.path(sim_fabric.host("h1").gid, cached=False).dlid != 0


def test_rejoin_after_unlink_relink(sim_fabric):
    h2 = sim_fabric.host("h2")
    with sim_fabric.sa_client("h2") as c:
        c.set_policy(**{**FAST, "retries": 3, "deadline": 1.0})
        c.join(BCAST)
        assert members(sim_fabric, BCAST).get(gid_str(h2.gid)) == 1
        sim_fabric.unlink(h2, wait=True)                        # ... and OpenSM has noticed
        try:
            assert not c.port().active                          # the port event, seen by polling
        finally:
            sim_fabric.relink(h2, wait=True)
        assert wait_for(lambda: c.port().active), "port never came back"
        # OpenSM forgot the membership while the port was down
        assert wait_for(lambda: c.member(BCAST) is None)
        assert gid_str(h2.gid) not in members(sim_fabric, BCAST)
        c.join(BCAST)
        assert members(sim_fabric, BCAST).get(gid_str(h2.gid)) == 1
        c.leave(BCAST)


@pytest.mark.bench
def test_bench_path_resolution(sim_fabric):
    """Ratios only (the machine is shared): bulk and cached resolution against one Get at a time."""
    h2, n = sim_fabric.host("h2"), 300
    with sim_fabric.sa_client("h1") as c:
        c.path(h2.gid, cached=False)
        t0 = time.perf_counter()
        for _ in range(n):
            c.path(h2.gid, cached=False)
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert all(isinstance(x, sa.PathRecord) for x in c.paths([h2.gid] * n))
        bulk = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            c.path(h2.gid)
        cached = time.perf_counter() - t0
        lat = c.latency()["path"]
    print(f"\nPathRecord x{n}: one at a time {single / n * 1e6:.0f} us each (pipe included); "
          f"bulk {single / bulk:.1f}x faster; cached {single / cached:.1f}x faster; "
          f"mean SA round trip inside the client {lat['sum'] / lat['count'] * 1e6:.0f} us")


def test_bad_input_is_a_clean_error_and_the_client_stays_up(sim_fabric, clients):
    c = clients["h1"]
    with pytest.raises(AddressError):
        c.path("not-a-gid")
    with pytest.raises(UsageError):
        c.join(BCAST, join_state="full")
    assert c.port().active                                     # still serving


def test_query_cli_asks_several_paths_at_once(sim_fabric):
    """`python -m xdpoib.fabric.sa path DGID...` run as h1: one record per DGID, in order, each leading
    to the LID saquery's PathRecord gives; a GID nobody has is an error entry and exit status 1."""
    import json
    import subprocess
    import sys

    h2, h3 = sim_fabric.host("h2"), sim_fabric.host("h3")
    gids = [gid_str(h2.gid), gid_str(h3.gid), "fe80::dead:beef"]
    p = sim_fabric.spawn("h1", [sys.executable, "-m", "xdpoib.fabric.sa", "path", *gids],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    got = json.loads(out)
    assert [g.get("dgid") for g in got[:2]] == gids[:2]
    for rec, h in zip(got[:2], (h2, h3), strict=True):
        ref = saquery_fields(sim_fabric.saquery("h1", "PR", "--sgid-to-dgid",
                                                f"{rec['sgid']}-{gid_str(h.gid)}").stdout)
        assert ref and int(ref[0]["dlid"]) == rec["dlid"], (ref, rec)
    assert set(got[2]) == {"error"} and got[2]["error"], got[2]
    bad = sim_fabric.spawn("h1", [sys.executable, "-m", "xdpoib.fabric.sa", "path", gids[0], "not-a-gid"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = bad.communicate(timeout=60)
    assert bad.returncode == 1 and not out and err.count("\n") == 1 and "not-a-gid" in err, (out, err)
