"""Helpers the integration tests share (fixtures are in conftest.py; import these by name, as prereq):
the real CLI, a command inside a network namespace, and labs of namespaces with eth4 attached.

    xdpoib("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h1")     # AssertionError on failure
    nsexec(ns, "ping", "-c", "1", "10.0.0.2", check=False).returncode

    @pytest.fixture(scope="module")
    def pair(sim_fabric):
        with attached(sim_fabric, ["h1", "h2"], net="10.66.0", prefix="xf") as names:
            yield sim_fabric, names          # eth4 in names[i] is host h{i+1} with 10.66.0.{i+1}/24
"""

from __future__ import annotations

import contextlib
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
