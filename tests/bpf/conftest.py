"""BPF tier plumbing: one compile per session (bcc ~2 s), maps reset per test, helpers to run frames."""

from __future__ import annotations

import pytest
from prereq import need_module, need_root


@pytest.fixture(scope="session")
def datapath():
    """The test build (0xFF fill, TX through a devmap), compiled and loaded once per session."""
    need_root()
    need_module("bcc")
    from xdpoib.datapath.loader import TEST_BUILD, Datapath

    dp = Datapath(TEST_BUILD)
    yield dp
    dp.close()


@pytest.fixture
def maps(datapath):
    """The session's maps, emptied and counters zeroed; redirect targets point at lo."""
    from xdpoib.datapath.maps import Maps

    m = Maps.of(datapath)
    m.clear()
    m.reset_counters()
    m.xsks.set(0, 1)
    m.egress.set(0, 1)
    m.set_config()
    return m
