"""The test fabric itself: topology, lifecycle through the real CLI, faults, and nothing left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest
from labkit import xdpoib

from xdpoib.errors import UsageError
from xdpoib.fabric import simfabric
from xdpoib.fabric.simfabric import SimFabric, SimFabricError


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not (v := pred()) and time.monotonic() < end:
        time.sleep(0.02)
    return v


def test_topology_has_fixed_guids_and_partition_leaves_last_host_out():
    hosts = simfabric.make_hosts(3)
    assert [h.guid for h in hosts] == [0xF452140300000101, 0xF452140300000201, 0xF452140300000301]
    assert [h.nodeid for h in hosts] == ["h1", "h2", "h3"]
    net = simfabric.topology(hosts)
    for h in hosts:
        assert f"caguid={h.node_guid:#018x}" in net and f'Hca 1 "{h.nodeid}" # "{h.node_desc}"' in net
    parts = simfabric.default_partitions(hosts)
    line = next(ln for ln in parts.splitlines() if ln.startswith("P8003"))
    assert f"{hosts[0].guid:#018x}=full" in line and f"{hosts[1].guid:#018x}=full" in line
    assert f"{hosts[2].guid:#018x}" not in line
    assert "ALL=full" in parts.splitlines()[0]


def test_bad_requests_are_refused_before_anything_starts():
    with pytest.raises(UsageError):
        SimFabric.up("toomany", hosts=simfabric.MAX_HOSTS + 1)
    with pytest.raises(UsageError):
        SimFabric.up("bad name!")
    with pytest.raises(SimFabricError):
        SimFabric.attach("no-such-fabric-here")
    assert not (simfabric.state_root() / "toomany").exists()


def test_cli_up_show_fault_down(sim_prereqs):
    fabric_name = sim_prereqs
    name = fabric_name("cli")
    up = json.loads(xdpoib("sim", "up", name, "--hosts", "2", "--json").stdout)
    pids = list(up["pids"].values())
    try:
        assert [h["guid"] for h in up["hosts"]] == ["0xf452140300000101", "0xf452140300000201"]
        shown = json.loads(xdpoib("sim", "show", name, "--json").stdout)
        assert all(h["lid"] > 0 for h in shown["hosts"])
        fab = SimFabric.attach(name)                     # found from another process's state
        assert fab.running() and fab.lid("h2") == shown["hosts"][1]["lid"]
        xdpoib("sim", "fault", name, "unlink", "h2")
        assert wait_for(lambda: fab.lid("h2") == 0), "h2 still routable after unlink"
        xdpoib("sim", "fault", name, "relink", "h2")
        assert wait_for(lambda: fab.lid("h2") > 0), "h2 not back after relink"
        xdpoib("sim", "fault", name, "unlink", "h2", "--wait")
        assert fab.lid("h2") == 0
        xdpoib("sim", "fault", name, "relink", "h2", "--wait")
        assert fab.lid("h2") > 0
        xdpoib("sim", "fault", name, "drop", "h2", "100")
        assert fab.saquery("h2", "-c", timeout=5).returncode != 0
        xdpoib("sim", "fault", name, "drop", "h2", "0")
        assert fab.saquery("h2", "-c").returncode == 0
        env = xdpoib("sim", "env", name, "h1").stdout
        assert "export SIM_HOST=h1" in env and f"export IBSIM_SOCKNAME=xdpoib-{name}" in env
        for bad in (["fault", name, "drop", "h1", "101"], ["fault", name, "unlink", "h9"],
                    ["fault", name, "drop", "h1"], ["up", name]):
            r = xdpoib("sim", *bad, check=False)
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, bad
    finally:
        xdpoib("sim", "down", name)
    assert simfabric.residue(name, pids) == []
    r = xdpoib("sim", "down", name, check=False)
    assert r.returncode == 1 and "no fabric named" in r.stderr


def test_down_leaves_no_process_socket_or_directory(sim_prereqs):
    fabric_name = sim_prereqs
    name = fabric_name("gone")
    fab = SimFabric.up(name, hosts=2)
    pids = [v[0] for v in fab.state["pids"].values()]
    client = fab.sa_client("h1")                          # left open on purpose
    sleeper = fab.spawn("h2", [sys.executable, "-c", "import time; time.sleep(120)"])
    pids += [client.pid, sleeper.pid]
    assert client.port().active
    assert simfabric._abstract_sockets(fab.sockname)
    fab.down()
    assert simfabric.residue(name, pids) == []
    assert not fab.workdir.exists()                      # with the clients' ./sys-<pid>/ directories
    client.close()


def test_two_fabrics_side_by_side_are_separate(sim_prereqs):
    fabric_name = sim_prereqs
    a = SimFabric.up(fabric_name("a"), hosts=2)
    try:
        b = SimFabric.up(fabric_name("b"), hosts=3)
        try:
            assert a.sockname != b.sockname and a.workdir != b.workdir
            h3 = b.host("h3")
            assert b.lid(h3) > 0
            with pytest.raises(UsageError):
                a.host("h3")
            r = a.saquery("h1", "PR", "--dgid", ":".join(re.findall("....", h3.gid.hex())))
            assert "dlid" not in r.stdout                 # fabric a has no third host
        finally:
            b.down()
        assert a.running() and a.lid("h2") > 0            # b's teardown left a alone
    finally:
        a.down()


def test_up_replaces_a_dead_fabric_of_the_same_name(sim_prereqs):
    fabric_name = sim_prereqs
    name = fabric_name("stale")
    fab = SimFabric.up(name, hosts=1)
    old = [v[0] for v in fab.state["pids"].values()]
    for pid in old:                                       # the fabric's own processes, by PID
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not fab.running())
    fab2 = SimFabric.up(name, hosts=1)
    try:
        assert fab2.running() and fab2.lid("h1") > 0
    finally:
        fab2.down()
    assert simfabric.residue(name, old) == []


def test_slot_of_a_killed_client_is_freed(sim_prereqs):
    fabric_name = sim_prereqs
    with SimFabric.up(fabric_name("slot"), hosts=1) as fab:
        c = fab.sa_client("h1")
        listed = fab.clients()
        assert {(x["nodeid"], x["sm"]) for x in listed} == {("sm", True), ("h1", False)}
        assert any(x["pid"] == c.pid for x in listed)
        os.kill(c.pid, signal.SIGKILL)                    # SIGKILL: ibsim keeps the slot
        c.proc.wait()
        assert any(x["pid"] == c.pid for x in fab.clients())
        assert len(fab.free_dead_clients()) == 1
        assert [x["nodeid"] for x in fab.clients()] == ["sm"]
        c.close()
        with fab.sa_client("h1") as again:
            assert again.port().active


def test_custom_partitions_file_and_reload(sim_prereqs, tmp_path):
    fabric_name = sim_prereqs
    hosts = simfabric.make_hosts(3)
    conf = tmp_path / "parts.conf"
    conf.write_text("Default=0x7fff, ipoib : ALL=full;\n"
                    f"P8004=0x8004, ipoib, mtu=4 : {hosts[1].guid:#x}=full;\n")
    with SimFabric.up(fabric_name("part"), hosts=3, partitions=conf) as fab, \
            fab.sa_client("h1") as c1, fab.sa_client("h2") as c2:
        assert c2.port().has_pkey(0x8004)
        assert not c1.port().has_pkey(0x8004)
        assert not c1.port().has_pkey(0x8003)                 # the default 0x8003 is not there
        fab.reload_partitions(conf.read_text().replace(f"{hosts[1].guid:#x}=full",
                                                       f"{hosts[0].guid:#x}=full, {hosts[1].guid:#x}=full"))
        assert wait_for(lambda: c1.port().has_pkey(0x8004)), "h1 never got P_Key 0x8004"
        assert c1.join("ff12:401b:8004::ffff:ffff").pkey == 0x8004
    assert conf.exists()                                         # the caller's file is left alone


def test_client_slots_are_counted_and_freed(sim_prereqs):
    fabric_name = sim_prereqs
    with SimFabric.up(fabric_name("full"), hosts=2) as fab:
        cs = [fab.sa_client("h1" if i % 2 else "h2") for i in range(simfabric.IBSIM_MAX_CLIENTS - 1)]
        try:
            assert len(fab.clients()) == simfabric.IBSIM_MAX_CLIENTS        # with OpenSM
            with pytest.raises(SimFabricError, match="at most 10 clients"):
                fab.sa_client("h1")
            os.kill(cs[0].pid, signal.SIGKILL)                 # its slot stays taken in ibsim ...
            cs[0].proc.wait()
            with fab.sa_client("h1") as c:                     # ... until the next client frees it
                assert c.port().active
        finally:
            for c in cs:
                c.close()
