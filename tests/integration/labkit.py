"""Helpers the integration tests share (fixtures are in conftest.py; import these by name, as prereq):
the real CLI, a command, a command inside a network namespace, labs of namespaces with eth4 attached,
and the eIPoIB scenario's bridge (eth4 the uplink of br0, guests on veth ports).

    xdpoib("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h1")     # AssertionError on failure
    nsexec(ns, "ping", "-c", "1", "10.0.0.2", check=False).returncode

    @pytest.fixture(scope="module")
    def pair(sim_fabric):
        with attached(sim_fabric, ["h1", "h2"], net="10.66.0", prefix="xf") as names:
            yield sim_fabric, names          # eth4 in names[i] is host h{i+1} with 10.66.0.{i+1}/24
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid

XDPOIB = [sys.executable, "-m", "xdpoib"]


def xdpoib(*args: str, check: bool = True, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `xdpoib ARGS` (this checkout's, as `python -m xdpoib`); with `check`, a non-zero exit is an
    AssertionError naming the command and its stderr."""
    r = subprocess.run([*XDPOIB, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"xdpoib {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def nsexec(ns: str, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run CMD in network namespace NS (`ip netns exec`); with `check`, a non-zero exit is an
    AssertionError with the end of its output."""
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {ns} failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    return r


@contextlib.contextmanager
def namespaces(prefix: str, count: int, lo: bool = False):
    """`count` fresh network namespaces named PREFIX + 5 random hex digits + 1..count (`lo` up in each if
    asked); at the end, even on failure, eth4 detached from each (if attached) and each deleted."""
    tag = uuid.uuid4().hex[:5]
    names = [f"{prefix}{tag}{i}" for i in range(1, count + 1)]
    made: list[str] = []
    try:
        for ns in names:
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made.append(ns)
            if lo:
                subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        yield names
    finally:
        for ns in made:
            xdpoib("detach", "eth4", "--netns", ns, check=False)
            subprocess.run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def attached(fab, hosts: list[str], net: str, prefix: str, lo: bool = False, env: dict[str, str] | None = None):
    """One namespace per host of sim fabric `fab` (see `namespaces`), eth4 attached in each through the
    CLI to its host (the agent started with `env` if given), with NET.N/24 where N is the host's number
    (h3: NET.3); yields the names."""
    with namespaces(prefix, len(hosts), lo=lo) as names:
        for ns, host in zip(names, hosts, strict=True):
            xdpoib("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:{host}", env=env)
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{net}.{int(host.lstrip('h'))}/24", "dev", "eth4"],
                           check=True)
        yield names


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run CMD; with `check`, a non-zero exit is an AssertionError with the end of its output."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {r.stdout[-300:]} {r.stderr[-300:]}")
    return r


def mac_of(ns: str, dev: str) -> str:
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev).stdout)[0]["address"]


def bridge_eth4(ns: str, addr: str | None = None) -> None:
    """br0 in NS with the attached eth4 as its uplink, carrying eth4's MAC (the host itself is VIF 0),
    up, with ADDR (CIDR) if given."""
    sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", ns, "link", "set", "br0", "address", mac_of(ns, "eth4"))
    sh("ip", "-n", ns, "link", "set", "eth4", "master", "br0")
    sh("ip", "-n", ns, "link", "set", "br0", "up")
    if addr:
        sh("ip", "-n", ns, "addr", "add", addr, "dev", "br0")


def bridge_port(host_ns: str, guest_ns: str, index: int, addr: str | None = None) -> None:
    """A guest behind host_ns's br0: veth port v<index> on the bridge, its peer eth0 in guest_ns (an
    existing namespace), up, with ADDR (CIDR) if given."""
    sh("ip", "-n", host_ns, "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0", "netns", guest_ns)
    sh("ip", "-n", host_ns, "link", "set", f"v{index}", "master", "br0", "up")
    if addr:
        sh("ip", "-n", guest_ns, "addr", "add", addr, "dev", "eth0")
    sh("ip", "-n", guest_ns, "link", "set", "eth0", "up")
