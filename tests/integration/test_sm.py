"""The agents and the SM: bring-up while the SM has no group yet, SM failover, a clean stop whatever the
SM did (real OpenSM on ibsim; each test prints how long it took).

- bring-up: `attach --pkey 0x8005` started before partitions.conf has 0x8005 waits (saying so on stderr)
  and succeeds once the file is updated and OpenSM HUPed; a partition without the `ipoib` flag ends
  after `--wait` with one line naming that flag, a non-zero exit and nothing left behind.
- failover (`SimFabric.up(standby=...)`, what `xdpoib sim up --standby-sm` runs): the master SIGKILLed
  under 20 ms pings; the standby takes over, the agents see CLIENT_REREGISTER and rejoin every group;
  the largest gap between replies stays within 1 s; broadcast (ARP), multicast (ping ff02::1) and
  IPv6 ND work afterwards; saquery against the new master lists both hosts in every group.
- clean stop: two hosts pinging, OpenSM SIGSTOPped for 25 s and continued, then `detach` of both:
  no link, XDP program, pin or agent process left.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import fabric_name, need_sim
from labkit import XDPOIB, attached, namespaces, nsexec, sh
from labkit import xdpoib as x

from xdpoib import state
from xdpoib.fabric.simfabric import SM_NODE, SimFabric, default_partitions, make_hosts

BCAST = "ff12:401b:ffff::ffff:ffff"


@pytest.fixture(autouse=True)
def timing(request, figures):
    """Each test's duration among the run's measured figures (these tests have a time budget in CI)."""
    t0 = time.monotonic()
    yield
    figures(f"duration of {request.node.name}: {time.monotonic() - t0:.1f} s")


def until(pred, secs: float, step: float = 0.1):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def members(fab, mgid: str, asker: str = SM_NODE) -> set[str]:
    """Port GIDs the SA (whichever SM is master now) lists in group `mgid` (one GetTable, asked from `asker`'s
    port: OpenSM shows a partition's groups only to its members)."""
    r = fab.saquery(asker, "--smkey", "1", "MCMR", "--mgid", mgid, timeout=5)
    return set(re.findall(r"PortGid\.+(\S+)", r.stdout)) if r.returncode == 0 else set()


def path_answers(status: dict) -> int:
    """How many PathRecord queries the SA answered for an agent (its `status`)."""
    return sum(v for k, v in status["sa"]["queries"].items() if k.startswith("path") and k.endswith(" ok"))


def gid(fab, host: str) -> str:
    from xdpoib.wire.addr import gid_str

    return gid_str(fab.host(host).gid)


def leftovers(spec: state.AttachSpec, pid: int) -> list[str]:
    """What of an attachment remains on the host: its links, XDP programs on them, its pins, its agent."""
    from xdpoib.pump import pin_dir

    tag = state.link_tag(spec.id)
    links = sh("ip", "-o", "link").stdout
    out = [f"link {n}" for n in (f"xo{tag}", f"xa{tag}", f"xb{tag}") if f": {n}" in links or f": {n}@" in links]
    out += [f"xdp on {ln.split(':')[1].strip()}" for ln in links.splitlines() if tag in ln and " xdp" in ln]
    if Path(pin_dir(spec.id)).exists():
        out.append(f"pins {pin_dir(spec.id)}")
    if state.pid_alive(pid):
        out.append(f"agent pid {pid}")
    if spec.netns and subprocess.run(["ip", "-n", spec.netns, "link", "show", spec.ifname],
                                     capture_output=True).returncode == 0:
        out.append(f"{spec.ifname} in {spec.netns}")
    return out


@pytest.fixture(scope="module")
def fabric():
    """A fabric of 3 hosts without a standby SM (0x8003: h1, h2)."""
    need_sim()
    fab = SimFabric.up(fabric_name("sm"), hosts=3)
    try:
        yield fab
    finally:
        fab.down()


# ---------------------------------------------------------------------------------------------- bring-up

def test_attach_waits_for_a_partition_that_appears_later(fabric, figures):
    fab = fabric
    hosts = make_hosts(3)
    with namespaces("xw", 1, lo=True) as (ns,):
        t0 = time.monotonic()
        p = subprocess.Popen([*XDPOIB, "attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h1",
                              "--pkey", "0x8005", "--wait", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            time.sleep(2.5)
            assert p.poll() is None, f"attach gave up at once: {p.communicate()}"
            assert subprocess.run(["ip", "-n", ns, "link", "show", "eth4"], capture_output=True).returncode != 0
            # now the partition (with ipoib) appears; OpenSM re-reads the file on SIGHUP and sweeps
            fab.reload_partitions(default_partitions(hosts) + f"P8005=0x8005, ipoib, mtu=4 : {hosts[0].guid:#018x}"
                                  f"=full, {hosts[1].guid:#018x}=full;\n")
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
        took = time.monotonic() - t0
        assert p.returncode == 0, err
        assert "waiting for partition 0x8005" in err, err
        assert "attached" in out
        figures(f"attach completed {took:.1f} s after its start (partition added at 2.5 s)")
        assert gid(fab, "h1") in until(lambda: members(fab, "ff12:401b:8005::ffff:ffff", "h2"), 10)
        st = json.loads(x("status", "eth4", "--netns", ns, "-j").stdout)
        assert st["attachment"]["pkey"] == "0x8005" and st["broadcast"]["waiting_for"] is None
        assert "state UP" in nsexec(ns, "ip", "link", "show", "eth4").stdout      # carrier on


def test_a_partition_without_ipoib_ends_with_one_line_and_nothing_left(fabric):
    fab = fabric
    hosts = make_hosts(3)
    fab.reload_partitions(default_partitions(hosts) + f"P8006=0x8006, mtu=4 : {hosts[0].guid:#018x}=full;\n")
    with namespaces("xn", 1) as (ns,):
        spec = state.AttachSpec("eth4", ns)
        # the partition itself is there (P_Key table), but OpenSM never creates its broadcast group
        assert until(lambda: "0x8006" in pkeys(fab, "h1"), 10), pkeys(fab, "h1")
        t0 = time.monotonic()
        r = x("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h1", "--pkey", "0x8006", "--wait", "4",
              check=False)
        took = time.monotonic() - t0
        assert r.returncode != 0 and "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert "ipoib" in last and "partitions.conf" in last and "0x8006" in last, r.stderr
        assert "waiting for the broadcast group ff12:401b:8006::ffff:ffff" in r.stderr
        assert 4 <= took < 20, took
        assert leftovers(spec, 0) == []
        assert not list(state.run_dir().glob(f"{ns}@eth4.*")), "runtime files left"
        assert subprocess.run(["pgrep", "-f", f'"netns": "{ns}"'], capture_output=True).returncode != 0


def pkeys(fab, host: str) -> str:
    """`host`'s P_Key table as `smpquery pkeys` prints it (run on the SM's node)."""
    env = dict(os.environ, **fab.client_env(SM_NODE))
    r = subprocess.run(["smpquery", "-G", "pkeys", f"{fab.host(host).guid:#x}", "1"], env=env,
                       cwd=fab.client_cwd(SM_NODE), capture_output=True, text=True, timeout=5)
    return r.stdout


# ---------------------------------------------------------------------------------------------- clean stop

def test_detach_after_the_sm_stopped_under_pings_leaves_nothing(fabric, figures):
    fab = fabric
    with attached(fab, ["h1", "h2"], net="10.73.0", prefix="xs") as ns:
        specs = [state.find("eth4", n) for n in ns]
        pids = [s.pid for s in specs]
        pings = [subprocess.Popen(["ip", "netns", "exec", a, "ping", "-q", "-i", "0.05", f"10.73.0.{2 - i}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i, a in enumerate(ns)]
        osm = fab.state["pids"]["opensm"][0]
        try:
            time.sleep(1)
            os.kill(osm, signal.SIGSTOP)
            time.sleep(25)
        finally:
            os.kill(osm, signal.SIGCONT)
            for p in pings:
                p.terminate()
                p.wait()
        for n, spec, pid in zip(ns, specs, pids, strict=True):
            t0 = time.monotonic()
            r = x("detach", "eth4", "--netns", n)
            figures(f"detach of {n}: {time.monotonic() - t0:.1f} s; {r.stderr.strip()}")
            assert "detached" in r.stdout
            assert until(lambda s=spec, p=pid: not leftovers(s, p), 2), leftovers(spec, pid)
            if r.stderr.strip():            # the agent had to be killed: its log is kept, and said so
                assert str(state.log_path(spec.id)) in r.stderr and state.log_path(spec.id).exists()
        fab.free_dead_clients()


def test_detach_while_the_sm_is_stopped_is_bounded_and_leaves_nothing(fabric, figures):
    """With OpenSM stopped (and the agents' membership checks timing out), an agent asked to stop leaves its
    groups best effort, bounded, and removes everything itself (no kill, its log goes with it)."""
    fab = fabric
    osm = fab.state["pids"]["opensm"][0]
    with attached(fab, ["h1", "h2"], net="10.76.0", prefix="xt") as ns:
        specs = [state.find("eth4", n) for n in ns]
        nsexec(ns[0], "ping", "-c", "2", "-W", "2", "10.76.0.2")
        os.kill(osm, signal.SIGSTOP)
        try:
            time.sleep(6)                   # a membership check (every 5 s) is waiting on the SA now
            for n, spec in zip(ns, specs, strict=True):
                t0 = time.monotonic()
                r = x("detach", "eth4", "--netns", n)
                took = time.monotonic() - t0
                figures(f"detach with the SM stopped: {took:.1f} s")
                assert r.stderr.strip() == "", r.stderr             # it stopped by itself
                assert took < 15, took
                assert leftovers(spec, spec.pid) == [] and not state.log_path(spec.id).exists()
        finally:
            os.kill(osm, signal.SIGCONT)


def test_detach_of_an_agent_that_does_not_stop_removes_everything_and_keeps_its_log(fabric, figures):
    """An agent that cannot stop by itself (SIGSTOPped here) is killed by detach, which then removes what
    attach created (eth4, the internal end, the anchor pair with the RX batch program, the pins) and keeps
    the agent's log, saying so."""
    fab = fabric
    with attached(fab, ["h1"], net="10.75.0", prefix="xk") as (ns,):
        spec = state.find("eth4", ns)
        tag = state.link_tag(spec.id)
        assert f": xa{tag}@" in sh("ip", "-o", "link").stdout          # the anchor is there to be left behind
        os.kill(spec.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = x("detach", "eth4", "--netns", ns)
        took = time.monotonic() - t0
        log = state.log_path(spec.id)
        try:
            figures(f"detach of a stopped agent: {took:.1f} s; {r.stderr.strip()}")
            assert "detached" in r.stdout
            assert "did not stop" in r.stderr and str(log) in r.stderr and f"xa{tag}" in r.stderr, r.stderr
            assert log.exists() and "attached" in log.read_text()
            assert leftovers(spec, spec.pid) == []
            assert not state.spec_path(spec.id).exists() and not state.socket_path(spec.id).exists()
        finally:
            log.unlink(missing_ok=True)
    fab.free_dead_clients()


# ---------------------------------------------------------------------------------------------- failover

def test_sim_up_standby_sm_from_the_cli(sim_prereqs):
    """`xdpoib sim up --standby-sm HOST`: two SMs, the standby's in STANDBY; a host that is not there is
    one line."""
    name = sim_prereqs("cs")
    r = x("sim", "up", name, "--hosts", "2", "--standby-sm", "h9", check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "--standby-sm" in r.stderr, r.stderr
    out = json.loads(x("sim", "up", name, "--hosts", "2", "--standby-sm", "h2", "-j").stdout)
    try:
        assert out["standby_sm"] == "h2" and {"opensm", "opensm-standby"} <= set(out["pids"])
        fab = SimFabric.attach(name)
        assert fab.sm_state("h2") == "standby"
        assert sum(c["sm"] for c in fab.clients()) >= 1          # ibsim marks the master's client
        assert "standby opensm pid" in x("sim", "show", name).stdout
    finally:
        x("sim", "down", name)


@pytest.fixture(scope="module")
def standby_fabric():
    """A fabric of 3 hosts with a standby OpenSM on h3 (`xdpoib sim up --standby-sm h3`)."""
    need_sim()
    fab = SimFabric.up(fabric_name("fo"), hosts=3, standby="h3")
    try:
        yield fab
    finally:
        fab.down()


def test_sm_failover_under_pings(standby_fabric, figures):
    fab = standby_fabric
    assert fab.sm_state("h3") == "standby"
    with attached(fab, ["h1", "h2"], net="10.74.0", prefix="xf", lo=True) as (ns1, ns2):
        nsexec(ns1, "ping", "-c", "2", "-W", "2", "10.74.0.2")
        before = [json.loads(x("status", "eth4", "--netns", n, "-j").stdout) for n in (ns1, ns2)]
        ping = subprocess.Popen(["ip", "netns", "exec", ns1, "ping", "-D", "-i", "0.02", "-W", "1", "10.74.0.2"],
                                stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1)
            t0 = time.monotonic()
            os.kill(fab.state["pids"]["opensm"][0], signal.SIGKILL)
            assert until(lambda: fab.sm_state("h3") == "master", 10, 0.05), "the standby did not take over"
            takeover = time.monotonic() - t0
            # the agents notice (a new SM LID: CLIENT_REREGISTER) and rejoin every group
            for n, b in zip((ns1, ns2), before, strict=True):
                def rejoined(n=n, b=b):
                    st = json.loads(x("status", "eth4", "--netns", n, "-j").stdout)
                    return (st["port"]["sm_lid"] != b["port"]["sm_lid"]
                            and st["counters"].get("port_event_client_reregister", 0) >= 1
                            and st["counters"].get("rejoins", 0) >= 1)
                assert until(rejoined, 15, 0.3), x("status", "eth4", "--netns", n).stdout
            time.sleep(1)
        finally:
            ping.send_signal(signal.SIGINT)
            out = ping.communicate(timeout=10)[0]
        times = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]
        assert len(times) > 100, out[-500:]
        gap = max(b - a for a, b in itertools.pairwise(times))
        figures(f"standby took over {takeover:.2f} s after the master's death; largest gap between "
              f"ping replies (20 ms apart) {gap * 1000:.0f} ms; {len(times)} replies")
        assert gap <= 1.0, f"pings stopped for {gap:.2f} s"
        # every full group of both agents is listed by the new master, with both ports where both joined
        for n, host in ((ns1, "h1"), (ns2, "h2")):
            groups = json.loads(x("groups", "eth4", "--netns", n, "-j").stdout)
            full = [g["mgid"] for g in groups if g["join_state"] & 1]
            assert BCAST in full
            for mgid in full:
                assert until(lambda m=mgid, h=host: gid(fab, h) in members(fab, m), 10), (host, mgid)
        assert {gid(fab, "h1"), gid(fab, "h2")} <= members(fab, BCAST)
        # paths were dropped at the reregister and asked again of the new master
        for n, b, other in ((ns1, before[0], "h2"), (ns2, before[1], "h1")):
            st = json.loads(x("status", "eth4", "--netns", n, "-j").stdout)
            assert path_answers(st) > path_answers(b), (b["sa"]["queries"], st["sa"]["queries"])
            peers = json.loads(x("peers", "eth4", "--netns", n, "-j").stdout)
            assert [p["path"] for p in peers if p["gid"] == gid(fab, other)] == ["resolved"], peers
        # broadcast (ARP), multicast and IPv6 ND after the failover
        nsexec(ns1, "ip", "neigh", "flush", "dev", "eth4")
        nsexec(ns1, "ping", "-c", "2", "-W", "2", "10.74.0.2")
        r = nsexec(ns1, "ping", "-6", "-c", "3", "-i", "0.3", "-W", "2", "ff02::1%eth4", check=False)
        addrs = nsexec(ns2, "ip", "-6", "-o", "addr", "show", "dev", "eth4").stdout.splitlines()
        lladdr2 = next(ln.split()[3].split("/")[0] for ln in addrs if " fe80:" in ln)
        assert f"from {lladdr2}%eth4" in r.stdout, r.stdout
        nsexec(ns1, "ip", "-6", "neigh", "flush", "dev", "eth4")
        nsexec(ns1, "ping", "-6", "-c", "2", "-W", "2", f"{lladdr2}%eth4")


def test_a_running_agent_that_loses_its_broadcast_group_waits_with_carrier_off(sim_prereqs, figures):
    """A failover to an SM whose partitions file lacks `ipoib` for 0x8003 (only the standby re-read it):
    the new master has no broadcast group for the partition, so the agent's rejoin is refused; eth4's
    carrier goes off and `status` says what it waits for, until the flag is back (file re-read): then
    the group is created, joined again, and the carrier comes back."""
    hosts = make_hosts(3)
    fab = SimFabric.up(sim_prereqs("lg"), hosts=3, standby="h3")
    try:
        with namespaces("xl", 1, lo=True) as (ns,):
            x("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h1", "--pkey", "0x8003")
            path = fab.workdir / "partitions.conf"
            path.write_text(default_partitions(hosts).replace("0x8003, ipoib,", "0x8003,"))
            os.kill(fab.state["pids"]["opensm-standby"][0], signal.SIGHUP)       # the standby re-reads it
            time.sleep(1)
            os.kill(fab.state["pids"]["opensm"][0], signal.SIGKILL)
            assert until(lambda: fab.sm_state("h3") == "master", 10, 0.05)

            def status():
                return json.loads(x("status", "eth4", "--netns", ns, "-j").stdout)

            def carrier() -> bool:
                return "LOWER_UP" in nsexec(ns, "ip", "link", "show", "eth4").stdout.split(">")[0]

            st = until(lambda: (s := status())["broadcast"]["waiting_for"] and s, 20, 0.3)
            assert st, status()
            assert "ff12:401b:8003::ffff:ffff" in st["broadcast"]["waiting_for"]
            assert st["counters"].get("broadcast_lost") == 1
            assert "waiting" in x("status", "eth4", "--netns", ns).stdout
            assert until(lambda: not carrier(), 3), "carrier still on without a broadcast group"
            t0 = time.monotonic()
            fab.reload_partitions(default_partitions(hosts))                      # the flag is back
            assert until(lambda: status()["broadcast"]["waiting_for"] is None, 40, 0.3), status()
            assert until(carrier, 3), "carrier still off with the broadcast group back"
            figures(f"broadcast group back and joined {time.monotonic() - t0:.1f} s after the SM re-read "
                  "its partitions")
            assert gid(fab, "h1") in until(lambda: members(fab, "ff12:401b:8003::ffff:ffff", "h2"), 10)
        fab.free_dead_clients()
    finally:
        fab.down()
