"""The agent's event loop under stress: the data plane never waits for the SM, and the control plane is
never starved by data.

Three hosts attached with the real CLI over a sim fabric with a real OpenSM:
- OpenSM stopped (SIGSTOP): pings between hosts whose paths are resolved keep flowing, `status` keeps
  answering, and a host never talked to is reached all the same: first contact needs no SA answer
  (each side answers the other over the reverse of the path its datagrams came by, counted as
  `paths_reversed`); after SIGCONT both keep reaching each other;
- a UDP flood (iperf3, 64-byte frames, as fast as it goes) from h1 to h2: both agents answer `status`
  throughout; afterwards the frames lost are counted by reason where they were shed, and traffic and
  control work at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from labkit import attached, nsexec, xdpoib
from prereq import need_cmd

from xdpoib import control, state

SIM_HOSTS = 3
STATUS_TIMEOUT_S = 2.0      # a liveness bound for the control socket, not a performance measurement


def status(ns: str) -> dict:
    """One status request straight to the agent's socket, bounded by STATUS_TIMEOUT_S."""
    return control.request(state.socket_path(state.attachment_id("eth4", ns)), "status", timeout=STATUS_TIMEOUT_S)


@pytest.fixture(scope="module")
def lab(sim_fabric):
    need_cmd("ip", "ping", "iperf3")
    with attached(sim_fabric, ["h1", "h2", "h3"], net="10.78.0", prefix="xl", lo=True) as names:
        yield sim_fabric, names


def _ping(ns: str, dst: str, count: int, interval: float = 0.1, wait: float = 2) -> tuple[int, int]:
    r = nsexec(ns, "ping", "-c", str(count), "-i", str(interval), "-W", str(wait), dst, check=False,
               timeout=count * interval + 30)
    import re

    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    assert m, r.stdout + r.stderr
    return int(m.group(1)), int(m.group(2))


def test_opensm_stopped_resolved_peers_keep_flowing(lab):
    fab, ns = lab
    assert _ping(ns[0], "10.78.0.2", 3, 0.2)[1] == 3            # h1 <-> h2 resolved (ARP + path)
    pid = fab.state["pids"]["opensm"][0]
    os.kill(pid, signal.SIGSTOP)
    try:
        # a host never talked to: its ARP reply and our echo go over reverse paths, no SA needed
        before = [status(n)["counters"].get("paths_reversed", 0) for n in (ns[0], ns[2])]
        fresh = {}
        t = threading.Thread(target=lambda: fresh.update(r=_ping(ns[0], "10.78.0.3", 4, 0.5, 1)))
        t.start()
        sent, got = _ping(ns[0], "10.78.0.2", 40, 0.05)
        answers = [status(n) for n in ns]
        t.join(timeout=60)
        assert got >= sent - 1, f"resolved peer lost {sent - got}/{sent} with OpenSM stopped"
        assert all(a["state"] == "running" for a in (x["attachment"] for x in answers))
        assert fresh["r"][1] >= fresh["r"][0] - 1, f"first contact with OpenSM stopped: {fresh['r']} (sent, got)"
        after = [status(n)["counters"].get("paths_reversed", 0) for n in (ns[0], ns[2])]
        assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)
        h3_gid = answers[2]["port"]["gid"]
        assert [p["path_source"] for p in _peers(ns[0]) if p["gid"] == h3_gid] == ["reverse"]
    finally:
        os.kill(pid, signal.SIGCONT)
    # the SM is back: h3 stays reachable, and the PathRecord asked for in the background (again after
    # its backoff if it timed out meanwhile) replaces the reverse path
    deadline = time.monotonic() + 40
    while True:
        assert _ping(ns[0], "10.78.0.3", 3, 0.2, 2)[1] == 3
        mine = [p for p in _peers(ns[0]) if p["gid"] == h3_gid]
        if mine and mine[0]["path_source"] == "sa":
            break
        assert time.monotonic() < deadline, f"h3's path still not the SA's 40 s after OpenSM came back: {mine}"
        time.sleep(1)


def _peers(ns: str) -> list[dict]:
    return json.loads(xdpoib("peers", "eth4", "--netns", ns, "-j").stdout)


def _drops_total(st: dict, ns: str) -> dict:
    """What one host counted as shed: the agent, its fabric, its AF_XDP ring, and the kernel around
    them (the veth pair's drop counters, UDP sockets' buffer overflows in the host's namespace)."""
    dp = st["datapath"]
    return {"agent": sum(st["drops"].values()), "fabric": sum(st["fabric_drops"].values()),
            "xsk": dp.get("xsk_rx_dropped", 0) + dp.get("xsk_rx_ring_full", 0),
            # eth4's drops and the internal end's transmit drops; its receive drops are the AF_XDP ring's
            # (a failed redirect), counted above as xsk
            "veth": _link_drops(st["attachment"]["ifname"], ns) + _link_drops(st["attachment"]["internal"],
                                                                              which=("tx_dropped",)),
            "udp_socket": _udp_buffer_errors(ns)}


def _link_drops(ifname: str, ns: str | None = None, which=("rx_dropped", "tx_dropped")) -> int:
    cmd = ["cat", *(f"/sys/class/net/{ifname}/statistics/{w}" for w in which)]
    out = (nsexec(ns, *cmd) if ns else subprocess.run(cmd, capture_output=True, text=True, check=True)).stdout
    return sum(int(v) for v in out.split())


def _udp_buffer_errors(ns: str) -> int:
    lines = [ln.split() for ln in nsexec(ns, "cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Udp:")]
    row = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return row.get("RcvbufErrors", 0) + row.get("SndbufErrors", 0)


def test_status_answers_during_a_flood_and_overload_is_counted(lab, figures):
    _, ns = lab
    assert _ping(ns[0], "10.78.0.2", 2, 0.2)[1] == 2
    before = [_drops_total(status(n), n) for n in ns[:2]]
    server = subprocess.Popen(["ip", "netns", "exec", ns[1], "iperf3", "-s", "-1", "-J", "-B", "10.78.0.2"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(100):
            if ":5201" in nsexec(ns[1], "ss", "-ltn").stdout:
                break
            time.sleep(0.05)
        client = subprocess.Popen(["ip", "netns", "exec", ns[0], "iperf3", "-c", "10.78.0.2", "-u", "-b", "0",
                                   "-l", "22", "-t", "5", "-J"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        time.sleep(1.0)
        answered, slowest = 0, 0.0
        while client.poll() is None:
            for n in ns[:2]:
                t0 = time.monotonic()
                st = status(n)                  # raises ControlError if the agent does not answer
                slowest = max(slowest, time.monotonic() - t0)
                assert st["attachment"]["state"] == "running"
                answered += 1
            time.sleep(0.2)
        out_c, _ = client.communicate(timeout=30)
        out_s, _ = server.communicate(timeout=30)
    finally:
        for p in (server,):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert answered >= 6, "status was not asked during the flood"
    figures(f"status answered {answered} times during the flood, slowest {slowest * 1000:.0f} ms")
    end = json.loads(out_s)["end"]["sum"]
    sent = json.loads(out_c)["end"]["sum"]["packets"]
    received = end["packets"] - end["lost_packets"]
    after = [status(ns[0]), status(ns[1])]
    shed = {}
    for tb, a, n, who in zip(before, after, ns[:2], ("sender", "receiver"), strict=True):
        ta = _drops_total(a, n)
        shed[who] = {k: ta[k] - tb[k] for k in ta}
    counted = sum(sum(v.values()) for v in shed.values())
    figures(f"flood: sent {sent}, received {received}, counted as shed {counted}: {shed}")
    assert received > 0
    lost = sent - received
    # what was lost is counted where it was shed, once: within 10% (frames in flight when iperf3's server
    # stopped are lost and counted nowhere; ARP and ND frames are counted and not iperf3's)
    assert 0.9 * lost - 1000 <= counted <= 1.1 * lost + 1000, f"lost {lost} but counted {counted}: {shed}"
    # healthy right after: traffic and control
    assert _ping(ns[0], "10.78.0.2", 5, 0.1)[1] >= 4
    assert status(ns[1])["attachment"]["state"] == "running"
