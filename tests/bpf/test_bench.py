"""`xdpoib bench datapath --json` through the real CLI: one JSON object of the documented shape (values
are printed, never asserted as timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prereq import need_module, need_root

XDPOIB = Path(sys.executable).with_name("xdpoib")


def test_bench_datapath_json_shape():
    need_root()
    need_module("bcc")
    out = subprocess.run([str(XDPOIB), "bench", "datapath", "--json", "--repeat", "20000", "--rounds", "1",
                          "--samples", "200"], check=True, capture_output=True, text=True).stdout
    res = json.loads(out)
    assert res["noop_ns_per_packet"] > 0
    for k in ("tx", "rx", "arp"):
        assert set(res[k]) >= {"ns_per_packet", "ratio_to_noop"}
        assert res[k]["ns_per_packet"] > 0
        assert abs(res[k]["ratio_to_noop"] - res[k]["ns_per_packet"] / res["noop_ns_per_packet"]) < 0.01
    print("\n" + out)


def test_bench_refuses_bad_arguments():
    r = subprocess.run([str(XDPOIB), "bench", "datapath", "--repeat", "0"], capture_output=True, text=True)
    assert r.returncode != 0 and "positive" in r.stderr and "Traceback" not in r.stderr
