"""Bounded state in running agents (xdpoib/agent/aging.py), on a sim fabric with a real OpenSM.

Two hosts attached with short bounds (peers idle 4 s, paths live 3 s, at most 40 peers):
- an idle peer leaves the tables and the maps, its REMAC stays reserved in the state file, and it comes
  back with the same REMAC as soon as eth4 sends to it again;
- a flood of new senders stops at the cap: the least recently used are evicted (counted), the peer in
  use is kept, the maps hold no more than the cap;
- paths in use are refreshed after their time without a lost ping;
- OpenSM restarted with another LID for h2: h1 notices (its sends to the old LID fail, h2's datagrams
  come from a new SLID) and resolves h2 again; pings come back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from labkit import attached
from labkit import xdpoib as x
from prereq import need_cmd
from simraw import RawSender, Target, fake_gid, ipv4_to_nowhere

from xdpoib import state

SIM_HOSTS = 2
BOUNDS = {"XDPOIB_PEER_IDLE_S": "4", "XDPOIB_PATH_TTL_S": "3", "XDPOIB_MAX_PEERS": "40",
          "XDPOIB_MAX_RESERVED": "1000"}


@pytest.fixture(scope="module")
def pair(sim_fabric):
    need_cmd("ip", "ping")
    with attached(sim_fabric, ["h1", "h2"], net="10.68.0", prefix="xg", env=dict(os.environ, **BOUNDS)) as names:
        yield sim_fabric, names


def status(ns):
    return json.loads(x("status", "eth4", "--netns", ns, "-j").stdout)


def peers(ns) -> list[dict]:
    return json.loads(x("peers", "eth4", "--netns", ns, "-j").stdout)


def ping(ns, dst, count=2, interval=0.2, wait=2) -> tuple[int, int]:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", str(interval), "-W", str(wait), dst],
                       capture_output=True, text=True, timeout=count * interval + wait + 30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    assert m, r.stdout + r.stderr
    return int(m.group(1)), int(m.group(2))


def until(pred, timeout, step=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def map_peers(ns) -> int:
    """Peers in the pinned BPF peer-by-id array of ns's attachment (its valid entries)."""
    from xdpoib.datapath.maps import Maps
    from xdpoib.pump import pin_dir

    m = Maps.open_pinned(pin_dir(state.attachment_id("eth4", ns)))
    try:
        return m.peer_count()
    finally:
        m.close()


def test_idle_peer_is_removed_and_comes_back_with_its_remac(pair, figures):
    _, (ns1, ns2) = pair
    # first contact (paths from the SA: slow on a loaded host; what is tested is what follows)
    assert until(lambda: ping(ns1, "10.68.0.2", count=1)[1] == 1, 20.0)
    assert ping(ns1, "10.68.0.2")[1] == 2
    h2_gid = status(ns2)["port"]["gid"]
    remac = next(p["remac"] for p in peers(ns1) if p["gid"] == h2_gid)
    assert until(lambda: not any(p["gid"] == h2_gid for p in peers(ns1)), 20), "the idle peer was not removed"
    st = status(ns1)
    assert st["counters"].get("peers_idle_removed", 0) >= 1
    assert map_peers(ns1) == 0, "the removed peer is still in the BPF maps"
    saved = state.persist_path(state.attachment_id("eth4", ns1))

    def reserved_only():
        data = json.loads(saved.read_text())["peers"]
        return any(r[0] == h2_gid and r[3] == remac for r in data["reserved"]) and \
            not any(r[0] == h2_gid for r in data["peers"])
    assert until(reserved_only, 10), "the REMAC is not kept reserved in the state file"
    # eth4 still holds the REMAC in its neighbour cache: sending to it brings the peer back at once
    t0 = time.monotonic()
    sent, got = ping(ns1, "10.68.0.2", count=8, interval=0.5)
    back = [p for p in peers(ns1) if p["gid"] == h2_gid]
    st = status(ns1)
    figures(f"\nidle removal: peer back after {time.monotonic() - t0:.1f} s of pings, {got}/{sent} answered, "
            f"revived from its reserved REMAC {st['counters'].get('peers_revived', 0)} time(s)")
    assert got >= 4, (sent, got)
    assert back and back[0]["remac"] == remac, (remac, back)


def test_flood_of_new_senders_stops_at_the_cap_and_keeps_the_peer_in_use(pair, figures):
    fab, (ns1, ns2) = pair
    assert until(lambda: ping(ns1, "10.68.0.2", count=1, wait=1)[1] == 1, 10)     # h2 in use again
    pinger = subprocess.Popen(["ip", "netns", "exec", ns1, "ping", "-i", "0.2", "-c", "40", "10.68.0.2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        h2_gid = status(ns2)["port"]["gid"]
        st = status(ns1)
        t = Target.of(st)
        raw = RawSender(fab.name)
        try:
            for n in range(200):
                raw.send(t, [ipv4_to_nowhere(n)], sgid=fake_gid(n + 1), src_qpn=0x1000 + n, slid=0x200 + n)
                if n % 20 == 19:
                    time.sleep(0.05)
        finally:
            raw.close()
        time.sleep(1.0)
        after = status(ns1)
        listed = peers(ns1)
        in_maps = map_peers(ns1)
    finally:
        out, _ = pinger.communicate(timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    sent, got = int(m.group(1)), int(m.group(2))
    evicted = after["counters"].get("peers_evicted", 0) - st["counters"].get("peers_evicted", 0)
    figures(f"\nflood of 200 new senders, cap 40: {len(listed)} peers listed, {in_maps} in the BPF maps, "
            f"{evicted} evicted; pings meanwhile {got}/{sent}")
    assert len(listed) <= 40 and in_maps <= 40
    assert evicted >= 160
    assert any(p["gid"] == h2_gid for p in listed), "the peer in use was evicted"
    assert got >= sent - 2, (sent, got)


def test_paths_in_use_are_refreshed_without_loss(pair, figures):
    _, (ns1, _) = pair
    before = status(ns1)["counters"].get("paths_refreshed", 0)
    sent, got = ping(ns1, "10.68.0.2", count=50, interval=0.2)
    after = status(ns1)["counters"].get("paths_refreshed", 0)
    figures(f"\npath expiry (3 s) under pings: {after - before} refreshes in 10 s, {got}/{sent} answered")
    assert after - before >= 1
    assert got >= sent - 1


def restart_opensm(fab, new_lids: dict[str, int]) -> None:
    """Stop OpenSM and start it again with guid2lid entries changed (it assigns LIDs from that cache)."""
    from xdpoib.fabric.simfabric import SM_NODE, SM_NODE_GUID

    osm = fab.workdir / "osm"
    pid = fab.state["pids"]["opensm"][0]
    os.kill(pid, signal.SIGTERM)
    until(lambda: not state.pid_alive(pid), 10, 0.05)
    text = (osm / "guid2lid").read_text()
    for host, lid in new_lids.items():
        g = f"0x{fab.host(host).guid:016x}"
        text, n = re.subn(rf"^{g} \S+ \S+$", f"{g} {lid:#06x} {lid:#06x}", text, flags=re.M)
        assert n == 1, text
    (osm / "guid2lid").write_text(text)
    env = dict(os.environ, **fab.client_env(SM_NODE), OSM_TMP_DIR=str(osm), OSM_CACHE_DIR=str(osm))
    p = subprocess.Popen(["opensm", "-F", str(osm / "opensm.conf"), "-f", str(osm / "opensm.log"),
                          "-P", str(fab.workdir / "partitions.conf"), "-g", f"{SM_NODE_GUID + 1:#018x}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=osm,
                         env=env, start_new_session=True)
    fab._record("opensm", p)


def test_remote_lid_change_is_followed(pair, figures):
    fab, (ns1, ns2) = pair
    assert ping(ns1, "10.68.0.2")[1] == 2
    h2_gid = status(ns2)["port"]["gid"]
    old_lid = fab.lid("h2")
    new_lid = 0x40 if old_lid != 0x40 else 0x41
    before = status(ns1)["counters"]
    t0 = time.monotonic()
    restart_opensm(fab, {"h2": new_lid})
    # the SA may answer with the new LID before the port has it: wait for the port itself (h2's agent)
    assert until(lambda: status(ns2)["port"]["lid"] == new_lid, 30), f"OpenSM did not give h2 LID {new_lid}"
    t_sm = time.monotonic() - t0

    def followed():
        ok = ping(ns1, "10.68.0.2", count=1, wait=1)[1] == 1
        return ok and any(p["gid"] == h2_gid and p["lid"] == new_lid for p in peers(ns1))
    assert until(followed, 40), f"h1 did not follow h2 to LID {new_lid}: {peers(ns1)}"
    t_back = time.monotonic() - t0
    p = next(p for p in peers(ns1) if p["gid"] == h2_gid)
    after = status(ns1)["counters"]
    changes = after.get("path_lid_changes", 0) - before.get("path_lid_changes", 0)
    figures(f"\nremote LID change {old_lid} -> {new_lid}: OpenSM up again after {t_sm:.1f} s, h2 answering "
            f"after {t_back:.1f} s; h1 saw {changes} path LID change(s), rechecked "
            f"{after.get('paths_rechecked', 0) - before.get('paths_rechecked', 0)} path(s)")
    assert p["lid"] == new_lid, p
    assert changes >= 1
