"""Soak tier plumbing: its own fabric (the integration tier's fixtures are that tier's), removed by PID
even when the run fails."""

from __future__ import annotations

import os

import pytest
from prereq import need_cmd, need_file, need_root


@pytest.fixture(scope="module")
def soak_fabric(request):
    """A fabric of `SOAK_HOSTS` hosts for one soak module."""
    need_root()
    need_cmd("ibsim", "opensm", "saquery")
    from xdpoib.fabric.simfabric import UMAD2SIM_CANDIDATES, SimFabric

    need_file(next((p for p in UMAD2SIM_CANDIDATES if os.path.exists(p)), UMAD2SIM_CANDIDATES[0]))
    fab = SimFabric.up(f"soak{os.getpid()}", hosts=getattr(request.module, "SOAK_HOSTS", 5))
    try:
        yield fab
    finally:
        fab.down()
