"""`xdpoib bench e2e` runs (one short round) and prints one JSON object with both datapaths measured in
the same run. Speed is reported, never asserted."""

import json
import subprocess
import sys

from prereq import need_cmd, need_root


def test_bench_e2e_json_shape():
    need_root()
    need_cmd("iperf3", "ibsim", "opensm")
    r = subprocess.run([sys.executable, "-m", "xdpoib", "bench", "e2e", "--seconds", "1", "--rounds", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res) >= {"plain", "bpf", "ratio_bpf_to_plain", "payload_bytes", "seconds", "rounds"}
    assert res["plain"]["pps"] > 0 and res["bpf"]["pps"] > 0 and res["ratio_bpf_to_plain"] > 0
    print(f"\nbench e2e (1 s, 1 round): {r.stdout.strip()}")
