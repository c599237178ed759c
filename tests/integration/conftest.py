"""Integration fixtures: a real OpenSM on ibsim, started by the tests and torn down by PID.

`sim_fabric` is module-scoped: one fabric per test module (ibsim serves at most 10 clients, OpenSM
included). A module sets `SIM_HOSTS = N` to change the host count (default 3: h1 and h2 are in
partition 0x8003, h3 is not). Use `sim_fabric.sa_client("h1")` for an SA client running as a host,
`sim_fabric.spawn("h1", argv)` for any other client process, `sim_fabric.saquery("h2", ...)` for
independent checks. Helpers that are not fixtures (the CLI runner `xdpoib`, `nsexec`, and `namespaces` /
`attached`: throwaway namespaces, with eth4 attached to hosts of a fabric) are in `labkit.py`.
"""

from __future__ import annotations

import itertools
import os

import pytest
from prereq import need_cmd, need_file, need_root

_serial = itertools.count(1)


def fabric_name(tag: str = "t") -> str:
    """A fabric name unique to this test process (fabrics can run side by side)."""
    return f"{tag}{os.getpid()}-{next(_serial)}"


def need_sim() -> None:
    """Skip (developer box) or fail (CI) unless ibsim, OpenSM, saquery and umad2sim are here."""
    need_root()
    need_cmd("ibsim", "opensm", "saquery")
    from xdpoib.fabric.simfabric import UMAD2SIM_CANDIDATES

    need_file(next((p for p in UMAD2SIM_CANDIDATES if os.path.exists(p)), UMAD2SIM_CANDIDATES[0]))


@pytest.fixture(scope="session", autouse=True)
def no_fabric_left_behind():
    """After the whole run: no fabric this test process named may remain (processes, sockets, dirs)."""
    yield
    from xdpoib.fabric import simfabric

    root = simfabric.state_root()
    names = sorted(d.name for d in root.glob(f"*{os.getpid()}-*")) if root.exists() else []
    left = {n: simfabric.residue(n) for n in names}
    with open("/proc/net/unix") as f:
        names_now = [ln.split()[-1] for ln in f.read().splitlines()[1:] if len(ln.split()) >= 8]
    socks = [n for n in names_now if n.startswith("@xdpoib-") and f"{os.getpid()}-" in n]
    if socks:
        left["sockets"] = socks                   # ibsim of a fabric whose state is gone
    for n in names:                                   # clean up, then report
        try:
            simfabric.SimFabric.attach(n).down()
        except Exception:
            pass
    assert not left, f"fabrics left behind by tests: {left}"


@pytest.fixture
def sim_prereqs():
    """Check the fabric's prerequisites (skip or fail, see prereq.py); returns `fabric_name`."""
    need_sim()
    return fabric_name


@pytest.fixture(scope="module")
def sim_fabric(request):
    """A running fabric (`xdpoib.fabric.simfabric.SimFabric`) shared by one test module."""
    need_sim()
    from xdpoib.fabric.simfabric import SimFabric

    fab = SimFabric.up(fabric_name("m"), hosts=getattr(request.module, "SIM_HOSTS", 3))
    try:
        yield fab
    finally:
        fab.down()
