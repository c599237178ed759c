"""`xdpoib demo` (what `make demo` runs) works and leaves nothing behind."""

import subprocess

from labkit import xdpoib
from prereq import need_cmd, need_root


def test_demo_runs_and_cleans_up():
    need_root()
    need_cmd("ibsim", "opensm", "saquery", "ping")
    r = xdpoib("demo", check=False, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = r.stdout
    assert out.count(" 0% packet loss") == 5                   # IPv4 twice, IPv6 once, each guest once
    assert out.count("JoinState...............0x1") == 3 + 1   # all three ports; h1 in 0x8003's group
    assert "VLAN 3: P_Key 0x8003" in out and "52:54:00:67:e9:b1" in out
    assert "lladdr" in out and "REMAC" in out and "demo done" in out
    assert "xdpoib-demo" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    # the remote host sees each guest as its own endpoint: three QPNs of host 1 in its peer list
    peers = out.split("== 8.")[1].split("== 9.")[0]
    assert peers.count("fe80::f452:1403:0:101") >= 3
    assert subprocess.run(["pgrep", "-f", "xdpoib-demo"], capture_output=True).returncode != 0   # no agent
    from xdpoib.fabric.simfabric import state_root

    assert not (state_root() / "demo").exists()
