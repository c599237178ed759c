"""`xdpoib doctor` against a real sim fabric (ibsim + OpenSM): every check passes for a host in the
partition, the P_Key check fails (with what to do) for a host outside it, a fabric or host that does not
exist fails the fabric check and skips the rest, an SM that died fails the SM check, and as nobody the
root check fails. Nothing is left behind: no throwaway veth, no ibsim client."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import time

import pytest
from labkit import xdpoib
from nonroot import NobodyTree
from prereq import need_cmd

SIM_HOSTS = 3              # h1, h2 in partition 0x8003; h3 not
ORDER = ["root", "bpffs", "kernel headers", "bcc", "XDP on veth", "socket buffers", "fabric", "SM", "port", "P_Key",
         "MTU"]
LINE = re.compile(r"^(ok  |warn|FAIL)  (.{14})  (.+?)(?:  — (.+))?$")


def doctor(*args: str) -> subprocess.CompletedProcess:
    return xdpoib("doctor", *args, check=False)


def lines(out: str) -> dict[str, tuple[str, str, str | None]]:
    """{what: (status, detail, fix)}, in output order; every line must have the doctor's shape."""
    got = {}
    for line in out.splitlines():
        m = LINE.match(line)
        assert m, f"not a doctor line: {line!r}"
        got[m.group(2).strip()] = (m.group(1).strip(), m.group(3), m.group(4))
    return got


def throwaway_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return re.findall(r"\d+: (xddoc\w+)", out)


@pytest.fixture(autouse=True)
def nothing_left_behind(sim_fabric):
    need_cmd("ip")
    clients = len(sim_fabric.clients())
    yield
    assert not throwaway_links()
    assert len(sim_fabric.clients()) == clients, "doctor left an ibsim client behind"


def test_a_host_in_the_partition_passes_every_check(sim_fabric):
    r = doctor("--sim", f"{sim_fabric.name}:h1", "--pkey", "0x8003")
    assert r.returncode == 0, r.stdout + r.stderr
    got = lines(r.stdout)
    assert list(got) == ORDER
    # the socket buffers are the host's sysctl: a warning where applications cannot ask for 4 MiB
    buffers = got.pop("socket buffers")
    with open("/proc/sys/net/core/rmem_max") as f:
        assert buffers[0] == ("ok" if int(f.read()) >= 4 << 20 else "warn"), buffers
    assert {s for s, _, _ in got.values()} == {"ok"}, r.stdout
    # the numbers are the fabric's: the LID the SM assigned, the partition's table, its group's MTU
    assert f"ACTIVE, LID {sim_fabric.lid('h1')}" in got["port"][1]
    assert "0x8003 at index" in got["P_Key"][1] and "(0xffff 0x8003)" in got["P_Key"][1]
    assert got["MTU"][1].startswith("eth MTU 2044 (broadcast group ff12:401b:8003::ffff:ffff: IB MTU 2048;")
    assert re.search(r"XDP limits the peer's MTU to \d{4}", got["XDP on veth"][1])


def test_json_has_the_same_checks(sim_fabric):
    r = doctor("--sim", f"{sim_fabric.name}:h2", "-j")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [c["what"] for c in got] == ORDER
    assert all(set(c) == {"status", "what", "detail", "fix"} for c in got)
    assert all(c["status"] == "ok" for c in got if c["what"] != "socket buffers")     # that one: the host's


def test_a_host_outside_the_partition_fails_the_p_key_check_and_says_what_to_do(sim_fabric):
    r = doctor("--sim", f"{sim_fabric.name}:h3", "--pkey", "0x8003")
    assert r.returncode == 1
    got = lines(r.stdout)
    status, detail, fix = got["P_Key"]
    assert status == "FAIL" and detail == "0x8003 is not in the port's P_Key table (0xffff)"
    assert "partitions.conf" in fix
    assert got["MTU"] == ("warn", "not checked: the port is not in partition 0x8003", None)
    assert all(got[w][0] == "ok" for w in ORDER[:9] if w != "socket buffers")
    # the independent view agrees: the SM does not list h3 in the partition's broadcast group
    gid = str(ipaddress.IPv6Address(sim_fabric.host("h3").gid))
    mcmr = sim_fabric.saquery("h1", "--smkey", "1", "MCMR", "--mgid", "ff12:401b:8003::ffff:ffff").stdout
    assert gid not in mcmr


@pytest.mark.parametrize("target, detail", [
    ("nosuchfabric:h1", "no fabric named 'nosuchfabric' (xdpoib sim up nosuchfabric)"),
    ("{fab}:h9", "fabric '{fab}' has no host 'h9' (hosts: h1, h2, h3)"),
])
def test_a_missing_fabric_or_host_fails_and_the_rest_is_not_checked(sim_fabric, target, detail):
    r = doctor("--sim", target.format(fab=sim_fabric.name))
    assert r.returncode == 1 and not r.stderr
    got = lines(r.stdout)
    assert list(got) == ORDER
    assert got["fabric"][0] == "FAIL" and got["fabric"][1] == detail.format(fab=sim_fabric.name)
    assert got["fabric"][2]
    assert all(got[w] == ("warn", "not checked: no fabric", None) for w in ORDER[7:])


@pytest.mark.parametrize("args, message", [
    (["--sim", "lab"], "bad --sim 'lab': expected FABRIC:HOST, e.g. lab:h1"),
    (["--sim", "lab:h1", "--port", "2"], "--port applies to --device; a sim host has one port"),
    (["--pkey", "0x1ffff"], "bad --pkey"),
])
def test_bad_input_is_one_line_and_checks_nothing(args, message):
    r = doctor(*args)
    assert r.returncode == 1 and not r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_an_unknown_device_fails_the_umad_check():
    r = doctor("--device", "nosuchhca0")
    assert r.returncode == 1
    got = lines(r.stdout)
    assert got["umad device"][0] == "FAIL" and "no RDMA device 'nosuchhca0'" in got["umad device"][1]
    assert all(got[w][0] == "warn" for w in ("SM", "port", "P_Key", "MTU"))


def test_a_dead_sm_fails_the_sm_check(sim_prereqs):
    """A fabric of its own whose OpenSM is killed: the port still names the SM's LID, which no longer answers."""
    from xdpoib.fabric.simfabric import SimFabric

    fab = SimFabric.up(sim_prereqs("doc"), hosts=1)
    try:
        os.kill(fab.state["pids"]["opensm"][0], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while fab.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        r = doctor("--sim", f"{fab.name}:h1")
        took = time.monotonic() - t0
        assert r.returncode == 1
        got = lines(r.stdout)
        assert got["fabric"][0] == "warn" and "its OpenSM does not" in got["fabric"][1]
        status, detail, fix = got["SM"]
        assert status == "FAIL" and detail.startswith("the SA at LID 1 does not answer"), detail
        assert "saquery" in fix
        assert got["MTU"] == ("warn", "not checked: no SA", None)
        assert took < 20, f"doctor took {took:.1f} s with the SM gone"
        print(f"doctor with a dead SM: {took:.1f} s")
    finally:
        fab.down()


def test_as_nobody_the_root_check_fails():
    tree = NobodyTree()
    try:
        r = tree.run("doctor")
    finally:
        tree.close()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    got = lines(r.stdout)
    assert got["root"] == ("FAIL", "running as uid 65534",
                           "run as root: attach needs links, XDP, bpffs and umad")
    assert got["XDP on veth"] == ("warn", "not checked: needs root", None)
    assert got["bpffs"][0] == "ok"              # what can be checked without root still is
