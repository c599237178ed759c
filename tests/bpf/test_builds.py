"""Every build the project ships or measures passes the verifier (the tests run the test build)."""

from __future__ import annotations

import pytest
from prereq import need_module, need_root

from xdpoib.datapath.loader import BENCH_BUILD, PROGRAMS, Build, Datapath


@pytest.mark.parametrize("build", [Build(), BENCH_BUILD], ids=["production", "bench"])
def test_build_loads(build):
    need_root()
    need_module("bcc")
    with Datapath(build) as dp:
        for name in PROGRAMS:
            assert dp.fd(name) > 0


def test_source_inlines_every_local_header():
    from xdpoib.datapath.loader import BPF_DIR, source

    text = source()
    assert '#include "' not in text
    headers = sorted(p.name for p in (BPF_DIR / "include").glob("*.h"))
    assert len(headers) >= 10
    for h in headers:
        assert text.count(f"/* ---- {h} ---- */") == 1, h       # every header used, inlined once
