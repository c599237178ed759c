"""The libvirt hook (contrib/libvirt/xdpoib-hook) run exactly as libvirt runs it (`HOOK DOMAIN OP SUBOP
EXTRA`, the domain XML libvirt 9.0 wrote on a hook's stdin, tests/unit/libvirt_xml/), against a real
agent: an uplink attached in the root namespace (veth mode, VLAN 3 mapped to partition 0x8003) as the
port of a Linux bridge, as libvirt's bridges are. The VIFs are checked with the real CLI
(`xdpoib vif list -j`). The whole path with libvirtd and a booted VM is tests/qemu/test_libvirt.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from labkit import sh
from labkit import xdpoib as x

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "contrib" / "libvirt" / "xdpoib-hook"
SAMPLE = (REPO / "tests" / "unit" / "libvirt_xml" / "ran-prepare-begin.xml").read_text()
A, B = "52:54:00:77:01:0a", "52:54:00:77:01:0b"     # the sample's NICs: A on xlvb0, B on xlvb1


def hook(op: str, subop: str, xml: str, domain: str = "xlv-ran") -> subprocess.CompletedProcess:
    """Run the hook as libvirt does (with this checkout's interpreter: the file's shebang is Debian's)."""
    return subprocess.run([sys.executable, str(HOOK), domain, op, subop, "-"], input=xml, capture_output=True,
                          text=True, timeout=30)


@pytest.fixture(scope="module")
def lab(sim_fabric):
    t = uuid.uuid4().hex[:5]
    names = {"uplink": f"xlu{t}", "bridge": f"xlb{t}", "other": f"xlo{t}"}
    try:
        x("attach", names["uplink"], "--sim", f"{sim_fabric.name}:h1", "--vlan", "3:0x8003")
        for br in (names["bridge"], names["other"]):
            sh("ip", "link", "add", br, "type", "bridge")
            sh("sysctl", "-qw", f"net.ipv6.conf.{br}.disable_ipv6=1")
            sh("ip", "link", "set", br, "up")
        sh("ip", "link", "set", names["uplink"], "master", names["bridge"], "up")
        xml = SAMPLE.replace("'xlvb0'", f"'{names['bridge']}'").replace("'xlvb1'", f"'{names['other']}'")
        yield names, xml
    finally:
        x("detach", names["uplink"], check=False)
        for br in (names["bridge"], names["other"]):
            sh("ip", "link", "del", br, check=False)


def vifs(ifname: str) -> dict[str, dict]:
    return {v["mac"]: v for v in json.loads(x("vif", "list", ifname, "-j").stdout)}


def test_start_registers_ours_skips_the_rest_and_stop_releases(lab):
    names, xml = lab
    up = names["uplink"]
    t0 = time.monotonic()
    r = hook("prepare", "begin", xml)
    took = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    got = vifs(up)
    assert A in got and B not in got, got              # B's bridge has no attachment: not ours
    vif0 = next(v for v in got.values() if v["id"] == 0)
    assert got[A]["vlan"] == 0 and not got[A]["learned"] and got[A]["qpn"] != vif0["qpn"], got
    assert took < 5, f"the hook took {took:.2f}s"
    print(f"hook prepare begin: {took * 1000:.0f} ms")
    # libvirtd restarted: reconnect begin finds the VIF there and leaves it as it is
    qpn = got[A]["qpn"]
    assert hook("reconnect", "begin", xml).returncode == 0
    assert vifs(up)[A]["qpn"] == qpn
    # operations the hook does not act on change nothing and print nothing
    for op, sub in (("start", "begin"), ("started", "begin"), ("migrate", "begin"), ("stopped", "begin")):
        r = hook(op, sub, xml)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (op, sub, r)
    assert A in vifs(up)
    for op, sub in (("stopped", "end"), ("release", "end")):      # libvirt calls both; the second has nothing to do
        r = hook(op, sub, xml)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (op, sub, r)
        assert A not in vifs(up)


def test_vlan_tag_is_the_vifs_vlan(lab):
    names, xml = lab
    tagged = xml.replace("<source bridge=", "<vlan><tag id='3'/></vlan><source bridge=", 1)
    assert hook("prepare", "begin", tagged).returncode == 0
    assert vifs(names["uplink"])[A]["vlan"] == 3
    # the same MAC asked for on another VLAN: refused in one line, the VIF left as it was
    r = hook("prepare", "begin", xml)
    assert r.returncode == 1 and "on VLAN 3, the domain asks for VLAN 0" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert hook("release", "end", tagged).returncode == 0
    assert A not in vifs(names["uplink"])


def test_a_nic_that_cannot_be_served_fails_the_start_and_rolls_back(lab):
    names, xml = lab
    # both NICs on our bridge, the second on VLAN 5 which no partition serves
    both = xml.replace(f"'{names['other']}'", f"'{names['bridge']}'")
    both = both.replace(f"<mac address='{B}'/>", f"<mac address='{B}'/><vlan><tag id='5'/></vlan>")
    r = hook("prepare", "begin", both)
    assert r.returncode == 1 and r.stdout == "", r
    assert len(r.stderr.strip().splitlines()) == 1 and "VLAN 5 is not mapped to a partition" in r.stderr, r
    got = vifs(names["uplink"])
    assert A not in got and B not in got, f"the first NIC's VIF was not rolled back: {got}"
    # a domain XML the hook cannot read: a start fails in one line, a release never fails
    r = hook("prepare", "begin", "<domain")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "not XML" in r.stderr, r
    assert hook("release", "end", "<domain").returncode == 0


def test_not_ours_is_exit_0(lab):
    names, xml = lab
    theirs = xml.replace(f"'{names['bridge']}'", "'virbr-not-here'")
    for op, sub in (("prepare", "begin"), ("release", "end")):
        r = hook(op, sub, theirs)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r
    assert set(vifs(names["uplink"])) & {A, B} == set()


def test_agent_down_fails_a_start_and_never_a_release(lab):
    names, xml = lab
    up = names["uplink"]
    assert hook("prepare", "begin", xml).returncode == 0
    from xdpoib import state

    pid = state.find(up, None).pid
    os.kill(pid, signal.SIGKILL)                # the agent we attached in the fixture
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text():
            break
        time.sleep(0.05)
    r = hook("prepare", "begin", xml)
    assert r.returncode == 1 and "is not running" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    r = hook("release", "end", xml)
    assert (r.returncode, r.stdout) == (0, ""), r
