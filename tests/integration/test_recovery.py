"""QP error recovery on the sim fabric: a datagram longer than the receive buffers puts an agent's QP in
the error state (as hardware does, LOC_LEN_ERR), and the agent replaces the QP.

Two hosts attached with the real CLI; the datagram is written straight to h2's QP socket with the sim
transport's own wire format (no test hook in the agent). Checked: traffic resumes within a few seconds,
h2's QPN changed and `qp_recreated` counts it, h1's neighbour entry for h2 moved to the REMAC of the new
address (h2 announced it), and while a QP waits to be replaced the agent sleeps (its CPU time and loop
turns stay low).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from labkit import attached, xdpoib
from prereq import need_cmd

from xdpoib import control, state
from xdpoib.fabric import simud_wire as wire
from xdpoib.fabric.simud import qp_address

SIM_HOSTS = 2
IPS = ("10.79.0.1", "10.79.0.2")
RECOVERY_S = 5.0


def nsexec(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {ns} failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    return r


def status(ns: str) -> dict:
    return control.request(state.socket_path(state.attachment_id("eth4", ns)), "status", timeout=5.0)


def neigh_mac(ns: str, ip: str) -> str | None:
    m = re.search(r"lladdr (\S+)", nsexec(ns, "ip", "neigh", "show", ip, "dev", "eth4").stdout)
    return m.group(1) if m else None


def ping(ns: str, ip: str, count: int = 2) -> bool:
    return nsexec(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", ip, check=False).returncode == 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children: the agent's subprocesses are not the loop)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def break_qp(fabric: str, st: dict) -> int:
    """Send h2's QP one datagram longer than any receive buffer; returns the QPN it hit."""
    qpn, guid = st["qpn"], int(st["port"]["guid"], 16)
    pkt = wire.Packet(slid=1, dlid=st["port"]["lid"], sl=0, pkey=0xFFFF, src_qpn=0x123, dst_qpn=qpn,
                      qkey=int(st["broadcast"]["qkey"], 16), grh=False, sgid=bytes(16), dgid=bytes(16),
                      payload=b"\x08\x00\x00\x00" + bytes(st["port"]["active_mtu"] + 100))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(wire.encode(pkt), qp_address(fabric, guid, qpn))
    return qpn


def wait_new_qpn(ns: str, old: int, timeout: float = RECOVERY_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(ns)
        if st["qpn"] != old:
            return st
        time.sleep(0.05)
    pytest.fail(f"QP {old:#x} of {ns} not replaced within {timeout:.0f} s: {status(ns)['counters']}")


@pytest.fixture(scope="module")
def pair(sim_fabric):
    need_cmd("ip", "ping")
    with attached(sim_fabric, ["h1", "h2"], net=IPS[0].rsplit(".", 1)[0], prefix="xr", lo=True) as names:
        yield sim_fabric, names


def test_a_qp_in_error_is_replaced_and_traffic_resumes(pair):
    fab, (a, b) = pair
    assert ping(a, IPS[1], 3)
    before = status(b)
    old_mac = neigh_mac(a, IPS[1])
    assert old_mac is not None
    old = break_qp(fab.name, before)
    t0 = time.monotonic()
    after = wait_new_qpn(b, old)
    assert after["counters"].get("qp_recreated") == before["counters"].get("qp_recreated", 0) + 1
    assert after["drops"].get("completion_error", 0) >= 1
    # the announcement moves h1's neighbour entry to the new address's REMAC; traffic flows again
    deadline = time.monotonic() + RECOVERY_S
    while neigh_mac(a, IPS[1]) == old_mac and time.monotonic() < deadline:
        time.sleep(0.1)
    assert neigh_mac(a, IPS[1]) != old_mac, "h1's neighbour entry for h2 did not move"
    assert ping(a, IPS[1]) and ping(b, IPS[0])
    assert time.monotonic() - t0 < 3 * RECOVERY_S
    assert after["qpn"] in {p["qpn"] for p in peers(a)}, "h1 did not learn h2's new address"


def peers(ns: str) -> list[dict]:
    return json.loads(xdpoib("peers", "eth4", "--netns", ns, "-j").stdout)


def test_no_busy_loop_while_a_qp_waits_to_be_replaced(pair):
    """A QP that fails again soon after a replacement waits (backoff) before the next one: the agent
    sleeps meanwhile, while pings keep arriving on the failed QP."""
    fab, (a, b) = pair
    assert ping(a, IPS[1])
    st = status(b)
    pid = st["attachment"]["pid"]
    old = break_qp(fab.name, st)
    time.sleep(0.1)
    cpu0, turns0, t0 = cpu_seconds(pid), status(b)["loop"]["turns"], time.monotonic()
    flood = subprocess.Popen(["ip", "netns", "exec", a, "ping", "-q", "-i", "0.05", "-W", "1", IPS[1]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waiting = status(b)
        assert waiting["qpn"] == old, "the second replacement came without a backoff"
        after = wait_new_qpn(b, old, timeout=RECOVERY_S + 16)
        cpu1, turns1, t1 = cpu_seconds(pid), after["loop"]["turns"], time.monotonic()
    finally:
        flood.terminate()
        flood.wait()
    window = t1 - t0
    assert window >= 0.5
    assert cpu1 - cpu0 < 0.3 * window, f"agent used {cpu1 - cpu0:.2f} s CPU in {window:.2f} s with its QP in error"
    assert (turns1 - turns0) / window < 500, f"{turns1 - turns0} loop turns in {window:.2f} s"
    assert ping(a, IPS[1])
