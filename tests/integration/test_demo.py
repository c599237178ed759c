"""`xdpoib demo` (what `make demo` runs) works and leaves nothing behind."""

import subprocess
import sys

from prereq import need_cmd, need_root


def test_demo_runs_and_cleans_up():
    need_root()
    need_cmd("ibsim", "opensm", "saquery", "ping")
    r = subprocess.run([sys.executable, "-m", "xdpoib", "demo"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = r.stdout
    assert out.count(" 0% packet loss") == 3                   # IPv4 twice, IPv6 once
    assert out.count("JoinState...............0x1") == 3       # OpenSM lists all three ports
    assert "lladdr" in out and "REMAC" in out and "demo done" in out
    assert "xdpoib-demo" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["pgrep", "-f", "xdpoib-demo"], capture_output=True).returncode != 0   # no agent
    from xdpoib.fabric.simfabric import state_root

    assert not (state_root() / "demo").exists()
