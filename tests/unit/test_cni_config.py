"""xdpoib-cni without root: its configuration parser, the container's MAC from prevResult, the CNI
protocol's refusals (each a CNI error object with the spec's code), and `--install`: the plugin as one
self-contained file that Debian's python3 runs with nothing of this checkout on its path."""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest

from xdpoib import cni

BASE = {"cniVersion": "1.0.0", "name": "fabric", "type": "xdpoib-cni"}
PREV = {"cniVersion": "1.0.0", "interfaces": [
    {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
    {"name": "veth1", "mac": "aa:bb:cc:00:00:02"},
    {"name": "eth0", "mac": "0A:58:0A:00:00:05", "sandbox": "/run/netns/c1"}]}


def test_defaults_and_every_key():
    assert cni.parse_config(BASE) == cni.NetConf("1.0.0", "fabric")
    nc = cni.parse_config({**BASE, "attachment": {"ifname": "ib-eth", "netns": "blue"}, "vlan": 3,
                           "dataDir": "/srv/cni", "ipam": {}, "dns": {}, "runtimeConfig": {}, "args": {},
                           "cni.dev/extra": 1, "prevResult": PREV})
    assert (nc.ifname, nc.netns, nc.vlan, nc.data_dir, nc.where) == ("ib-eth", "blue", 3, "/srv/cni",
                                                                     "ib-eth in netns blue")


@pytest.mark.parametrize(("change", "code", "words"), [
    ({"cniVersion": "2.0.0"}, 1, "2.0.0"),
    ({"vlan_id": 3}, 2, "vlan_id=3"),
    ({"attachment": {"ifname": "eth4", "namespace": "x"}}, 2, 'attachment.namespace="x"'),
    ({"attachment": "eth4"}, 7, "attachment"),
    ({"attachment": {"ifname": "a/b"}}, 7, "attachment.ifname"),
    ({"attachment": {"ifname": "x" * 16}}, 7, "attachment.ifname"),
    ({"attachment": {"netns": ""}}, 7, "attachment.netns"),
    ({"vlan": 4095}, 7, "vlan=4095"),
    ({"vlan": True}, 7, "vlan=true"),
    ({"vlan": "3"}, 7, 'vlan="3"'),
    ({"dataDir": "relative"}, 7, "dataDir"),
    ({"name": "-bad"}, 7, "name"),
])
def test_bad_configs_name_the_key(change, code, words):
    with pytest.raises(cni.CniError) as e:
        cni.parse_config({**BASE, **change})
    assert e.value.code == code and words in e.value.details, e.value.details


def test_container_mac_from_prev_result():
    assert cni.container_mac(PREV, "eth0", "/run/netns/c1") == "0a:58:0a:00:00:05"
    for prev, ifname, netns in ((PREV, "eth1", "/run/netns/c1"), (PREV, "eth0", "/run/netns/other"),
                                (None, "eth0", "/run/netns/c1"), ({"interfaces": "x"}, "eth0", "/x")):
        with pytest.raises(cni.CniError) as e:
            cni.container_mac(prev, ifname, netns)
        assert e.value.code == cni.INVALID_CONFIG


def run(env: dict, stdin: str):
    try:
        return 0, cni.run(env, io.StringIO(stdin))
    except cni.CniError as e:
        return e.code, e.details


def test_protocol_refusals_before_any_agent_is_asked():
    add = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/c1", "CNI_IFNAME": "eth0"}
    assert run({"CNI_COMMAND": "VERSION"}, "") == (0, {"cniVersion": "1.0.0",
                                                       "supportedVersions": list(cni.SUPPORTED_VERSIONS)})
    assert run({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "0.4.0"}')[1]["cniVersion"] == "0.4.0"
    assert run({}, "{}")[0] == 4
    assert run({**add, "CNI_NETNS": ""}, "{}") == (4, "ADD needs CNI_NETNS")
    assert run({**add, "CNI_IFNAME": "../x"}, "{}")[0] == 4
    assert run(add, "[1]")[0] == 6
    assert run(add, '{"cniVersion": "0.2.0"}')[0] == 1
    assert run(add, json.dumps(BASE))[0] == 7                         # not chained: no prevResult
    # DEL: no CNI_NETNS needed, nothing recorded means nothing to release
    rec_dir = "/nonexistent/xdpoib-cni-test"
    assert run({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"},
               json.dumps({**BASE, "dataDir": rec_dir})) == (0, None)
    chk = {**add, "CNI_COMMAND": "CHECK"}
    assert run(chk, json.dumps({**BASE, "cniVersion": "0.3.1", "prevResult": PREV}))[0] == 1


def test_install_writes_one_file_that_runs_alone(tmp_path):
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3")
    assert cni.main(["--install", str(tmp_path)]) == 0
    plugin = tmp_path / "xdpoib-cni"
    assert [p.name for p in tmp_path.iterdir()] == ["xdpoib-cni"] and os.access(plugin, os.X_OK)

    def call(env: dict, stdin: str) -> tuple[int, dict]:
        r = subprocess.run([python, "-I", str(plugin)], input=stdin, env={"PATH": "/usr/bin:/bin", **env},
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert "Traceback" not in r.stderr, r.stderr
        return r.returncode, json.loads(r.stdout)

    assert call({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')[1]["supportedVersions"][-1] == "1.0.0"
    rc, out = call({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/c1",
                    "CNI_IFNAME": "eth0"}, json.dumps({**BASE, "vlan": -1}))
    assert rc == 1 and out == {"cniVersion": "1.0.0", "code": 7, "msg": "invalid network config",
                               "details": "vlan=-1: an integer 0..4094"}
    r = subprocess.run([python, "-I", str(plugin)], env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION"},
                       input="", capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0
    assert cni.main(["--install", str(tmp_path / "missing" / "dir")]) == 1
