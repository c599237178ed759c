"""`xdpoib bench control` through the real CLI with small settings: one JSON object with exactly the
issue's keys (map sizes 1e5 and 1e6), every figure a positive number, printed with its target; nothing
the bench created (namespaces, fabric, attachments) left behind. Targets are reported, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from prereq import need_cmd, need_module

from xdpoib.bench.control import KEYS, MAP_SIZES, format_table


def test_bench_control_smoke(sim_prereqs, tmp_path, figures):
    need_cmd("ip", "ping")
    need_module("bcc")
    r = subprocess.run([sys.executable, "-m", "xdpoib", "bench", "control", "--json", "--queries", "300",
                        "--joins", "50", "--new-peers", "1"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)                       # exactly one object: anything else on stdout fails here
    figures("bench control (small): " + json.dumps(res) + "\n" + format_table(res))
    assert list(res) == list(KEYS)
    assert set(res["map_load_s"]) == set(res["map_remove_s"]) == set(MAP_SIZES)
    flat = [v for k, v in res.items() if not isinstance(v, dict)]
    flat += [*res["map_load_s"].values(), *res["map_remove_s"].values()]
    assert all(isinstance(v, (int, float)) and v > 0 for v in flat), res
    assert res["sa_path_p99_s"] >= res["sa_path_p50_s"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "xbc" not in left, left
    from xdpoib.fabric import simfabric

    root = simfabric.state_root()
    assert not root.exists() or not [d for d in root.iterdir() if d.name.startswith("xbc")]


def test_bench_control_refuses_bad_settings():
    r = subprocess.run([sys.executable, "-m", "xdpoib", "bench", "control", "--new-peers", "9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--new-peers 1-5" in r.stderr and "Traceback" not in r.stderr
