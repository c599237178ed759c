"""The backend contract suite on `sim`: two hosts of a real OpenSM-on-ibsim fabric, one backend each.

Each backend lives in a child process bound to its host (umad2sim binds a process to one node), driven
through `xdpoib.fabric.simud_remote.RemoteBackend`. Paths come from the SA (PathRecord) and multicast
groups are created and joined through the SA, as the agent does.
"""

from __future__ import annotations

import itertools
import os

import pytest
from contract.contract_suite import *  # noqa: F403  (the suite's tests run here)

from xdpoib.fabric.base import Path

SIM_HOSTS = 2          # conftest's sim_fabric: h1 and h2
QKEY = 0x0B1B
PKEY = 0xFFFF


def _group_params(mgid: bytes):
    from xdpoib.fabric.sa import MCMemberRecord

    # the IPv4 broadcast group's parameters as OpenSM creates them for a partition with mtu=4
    return MCMemberRecord(mgid=mgid, qkey=QKEY, mtu=4, pkey=PKEY, rate=3, sl=0, flow_label=0, hop_limit=0,
                          tclass=0)


class SimContractFabric:
    """`ContractFabric` for the sim tier: SA PathRecords and MCMemberRecord joins, run in each child."""

    qkey = QKEY
    pkey = PKEY
    unicast_grh = False
    counts_rx_drops = True

    def __init__(self):
        self._ids = itertools.count(1)
        self._tag = os.getpid() & 0xFFFF

    def path(self, src, dst, grh=False):
        """PathRecord from src's SA client to dst's GID."""
        dgid = dst.port().gid
        rec = src.call("control.sa.path", dgid, None, PKEY)
        return Path(dlid=rec.dlid, sl=rec.sl, mtu=rec.mtu_bytes, dgid=dgid if grh else None, grh=grh,
                    hop_limit=rec.hop_limit, traffic_class=rec.tclass, flow_label=rec.flow_label)

    def new_mgid(self):
        """An IPv4-style MGID (ff12:401b:ffff::/80 + test counter) unique to this run."""
        return bytes.fromhex("ff12401bffff00000000") + self._tag.to_bytes(2, "big") + \
            next(self._ids).to_bytes(4, "big")

    def join(self, backend, mgid):
        """Full-member join (creating the group with broadcast-like parameters); the multicast path."""
        rec = backend.call("control.sa.join", mgid, 1, _group_params(mgid))
        backend.forget_memberships()
        return Path(dlid=rec.mlid, sl=rec.sl, mtu=rec.mtu_bytes, dgid=mgid, grh=True)

    def leave(self, backend, mgid):
        """Leave the group."""
        backend.call("control.sa.leave", mgid)
        backend.forget_memberships()


@pytest.fixture(scope="module")
def _backends(sim_fabric):
    from xdpoib.fabric.simud_remote import RemoteBackend

    fab = sim_fabric
    backends = []
    try:
        for h in fab.hosts:
            backends.append(RemoteBackend.on_host(fab, h))
        yield tuple(backends)
    finally:
        for b in backends:
            b.close()


@pytest.fixture
def backend_pair(_backends):
    """The suite's pair: backends on h1 and h2."""
    return _backends


@pytest.fixture
def contract_fabric():
    """The suite's view of this fabric."""
    return SimContractFabric()
