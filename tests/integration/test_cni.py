"""xdpoib-cni with the real runtime side: the CNI plugin chain executed as a runtime executes it, then podman.

Host h1 is the root network namespace, as for a container runtime: its attachment is a uniquely named
interface (`xcu<tag>`, eth4's role) that is the uplink of a bridge (`xcb<tag>`, carrying the uplink's MAC
so the host itself is VIF 0), attached without `--learn-vifs`: a container's frames pass only once
its MAC is a VIF, which is what the plugin does. Host h2 is a remote xdpoib host in its own namespace.

(a) The chain `bridge` (Debian's containernetworking-plugins, delegating to `host-local`) then
`xdpoib-cni`, run exactly as a runtime runs it (libcni's order and prevResult rules, CNI_* variables,
the plugin configuration on stdin, CNI_PATH to find the plugins): each container's MAC becomes a VIF
with its own QPN, the container pings the remote, the remote sees that QPN; CHECK passes; DEL
releases (the QP leaves the fabric) and is idempotent; a bad configuration is refused with the
spec's error codes and changes nothing.
(b) Rootful podman on a CNI network of the same two plugins (its own storage and configuration under
a temporary directory; an image imported from a busybox root filesystem; the plugin installed with
`xdpoib-cni --install`, as a self-contained file): two containers reach the remote, each under its
own QPN, and `podman rm` releases both VIFs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from labkit import sh
from labkit import xdpoib as x
from prereq import missing, need_cmd, need_file

SIM_HOSTS = 2
NET = "10.87.0"
REMOTE = f"{NET}.2"
CNI_DIR = "/usr/lib/cni"


# ---- a runtime, as libcni runs a network configuration list

class Chain:
    """A network configuration list run as libcni runs it: ADD and CHECK in order, DEL in reverse; each
    plugin found on CNI_PATH and given its configuration with cniVersion, name and prevResult (ADD: the
    previous plugin's result; CHECK and DEL: the final ADD result) on stdin, CNI_* in its environment."""

    def __init__(self, conflist: dict, cni_path: str):
        self.conflist, self.cni_path = conflist, cni_path

    def plugin_conf(self, plugin: dict, prev: dict | None) -> dict:
        conf = {"cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"], **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def exec(self, plugin: dict, command: str, cid: str, netns: str | None, ifname: str,
             prev: dict | None) -> tuple[int, dict | None, str]:
        """One plugin execution: (exit code, parsed stdout or None, stderr)."""
        exe = next((Path(d) / plugin["type"] for d in self.cni_path.split(":")
                    if (Path(d) / plugin["type"]).is_file()), None)
        assert exe is not None, f"{plugin['type']} is not on CNI_PATH {self.cni_path}"
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_IFNAME": ifname, "CNI_PATH": self.cni_path}
        if netns is not None:
            env["CNI_NETNS"] = netns
        r = subprocess.run([str(exe)], input=json.dumps(self.plugin_conf(plugin, prev)), env=env,
                           capture_output=True, text=True, timeout=30)
        out = json.loads(r.stdout) if r.stdout.strip() else None
        return r.returncode, out, r.stderr

    def add(self, cid: str, netns: str, ifname: str = "eth0") -> tuple[dict, list[dict]]:
        """ADD the whole list: the final result and every plugin's result (AssertionError on an error)."""
        prev, results = None, []
        for plugin in self.conflist["plugins"]:
            rc, out, err = self.exec(plugin, "ADD", cid, netns, ifname, prev)
            assert rc == 0, f"{plugin['type']} ADD failed ({rc}): {out} {err}"
            prev = out
            results.append(out)
        return prev, results

    def run(self, command: str, cid: str, netns: str | None, prev: dict | None,
            ifname: str = "eth0") -> list[tuple[str, int, dict | None]]:
        """CHECK (in order) or DEL (in reverse) the whole list, stopping at the first error:
        [(plugin type, exit code, output)] of the plugins run."""
        plugins = self.conflist["plugins"]
        done = []
        for plugin in plugins if command == "CHECK" else reversed(plugins):
            rc, out, _ = self.exec(plugin, command, cid, netns, ifname, prev)
            done.append((plugin["type"], rc, out))
            if rc:
                break
        return done


# ---- the lab

def vifs(uplink: str) -> dict[str, dict]:
    return {v["mac"]: v for v in json.loads(x("vif", "list", uplink, "-j").stdout)}


def vif_keys(uplink: str) -> set[tuple[str, int, int]]:
    """(MAC, QPN, VLAN) of every VIF: what a refused request must leave as it was."""
    return {(m, v["qpn"], v["vlan"]) for m, v in vifs(uplink).items()}


def spoofed(uplink: str) -> int:
    """Frames the TX program dropped because their source MAC is not a VIF (anti-spoof)."""
    st = json.loads(x("status", uplink, "-j").stdout)
    return (st[0] if isinstance(st, list) else st)["datapath"]["tx"]["drops"].get("spoofed_source", 0)


def remote_qpns(remote: str) -> set[int]:
    return {p["qpn"] for p in json.loads(x("peers", "eth4", "--netns", remote, "-j").stdout)}


def qp_sockets(fabric: str) -> set[int]:
    """QPNs with a live sim QP socket on this fabric (@xdpoib-sim/FABRIC/q/GUID/QPN)."""
    with open("/proc/net/unix") as f:
        names = [ln.split()[-1] for ln in f.read().splitlines()[1:] if len(ln.split()) >= 8]
    return {int(n.rsplit("/", 1)[1], 16) for n in names if n.startswith(f"@xdpoib-sim/{fabric}/q/")}


def ping(ns: str, count: int = 3, size: int = 56) -> bool:
    return sh("ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-s", str(size),
              "-M", "do", REMOTE, check=False).returncode == 0


def link_mac(ns: str, dev: str) -> str:
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev).stdout)[0]["address"]


@pytest.fixture(scope="module")
def lab(sim_fabric, tmp_path_factory):
    """h1: the root namespace with the uplink attached and the bridge on it; h2: the remote host."""
    need_cmd("ip", "ping")
    for p in ("bridge", "host-local"):
        need_file(f"{CNI_DIR}/{p}")
    plugin = Path(sys.executable).parent / "xdpoib-cni"
    if not plugin.exists():
        missing(f"{plugin} (make setup installs the console script)")
    t = uuid.uuid4().hex[:4]
    uplink, bridge, remote = f"xcu{t}", f"xcb{t}", f"xcr{t}"
    tmp = tmp_path_factory.mktemp("cni")
    (tmp / "bin").mkdir()
    (tmp / "bin" / "xdpoib-cni").symlink_to(plugin)      # as the package installs it next to bridge
    started = time.monotonic()
    sh("ip", "netns", "add", remote)
    try:
        x("attach", uplink, "--sim", f"{sim_fabric.name}:h1")
        x("attach", "eth4", "--netns", remote, "--sim", f"{sim_fabric.name}:h2")
        sh("ip", "-n", remote, "addr", "add", f"{REMOTE}/24", "dev", "eth4")
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "link", "set", bridge, "address", json.loads(sh("ip", "-j", "link", "show", uplink).stdout)[0]
           ["address"])
        sh("ip", "link", "set", uplink, "master", bridge)
        sh("ip", "link", "set", bridge, "up")
        yield {"fabric": sim_fabric.name, "uplink": uplink, "bridge": bridge, "remote": remote, "tmp": tmp,
               "tag": t, "cni_path": f"{tmp / 'bin'}:{CNI_DIR}", "setup_s": time.monotonic() - started}
    finally:
        x("detach", uplink, check=False)
        x("detach", "eth4", "--netns", remote, check=False)
        sh("ip", "link", "del", bridge, check=False)
        sh("ip", "netns", "del", remote, check=False)


def conflist(lab, name: str, first: int, last: int, **xdpoib_conf) -> dict:
    """bridge (host-local addresses FIRST..LAST of NET) then xdpoib-cni on the lab's attachment."""
    own = {"type": "xdpoib-cni", "attachment": {"ifname": lab["uplink"]}, "dataDir": str(lab["tmp"] / "cni")}
    own.update(xdpoib_conf)
    return {"cniVersion": "1.0.0", "name": name, "plugins": [
        {"type": "bridge", "bridge": lab["bridge"], "isGateway": False, "ipMasq": False, "mtu": 2044,
         "ipam": {"type": "host-local", "dataDir": str(lab["tmp"] / "ipam"),
                  "ranges": [[{"subnet": f"{NET}.0/24", "rangeStart": f"{NET}.{first}",
                               "rangeEnd": f"{NET}.{last}"}]]}},
        own]}


@pytest.fixture
def containers(lab):
    """make(n): n fresh container network namespaces (names); all deleted at the end."""
    made = []

    def make(n: int) -> list[str]:
        names = [f"xcc{lab['tag']}{len(made) + i}" for i in range(n)]
        for ns in names:
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return names

    yield make
    for ns in made:
        sh("ip", "netns", "del", ns, check=False)


# ---- (a) the plugin chain as a runtime runs it

def test_chain_add_check_del(lab, containers, figures):
    chain = Chain(conflist(lab, f"xcn{lab['tag']}", 10, 29), lab["cni_path"])
    up = lab["uplink"]
    vif0 = vifs(up)
    assert len(vif0) == 1                                     # the host itself (the bridge's MAC)
    c1, c2 = containers(2)
    t0 = time.monotonic()
    res1, per_plugin = chain.add("xcid1" + lab["tag"], f"/run/netns/{c1}")
    add_s = time.monotonic() - t0
    assert res1 == per_plugin[0], "xdpoib-cni must return the bridge's result unchanged"
    mac1 = link_mac(c1, "eth0")
    assert any(i.get("mac") == mac1 and i.get("sandbox") == f"/run/netns/{c1}" for i in res1["interfaces"])
    res2, _ = chain.add("xcid2" + lab["tag"], f"/run/netns/{c2}")
    mac2 = link_mac(c2, "eth0")
    got = vifs(up)
    assert {mac1, mac2} <= set(got), got
    qpns = {got[mac1]["qpn"], got[mac2]["qpn"], *(v["qpn"] for v in vif0.values())}
    assert len(qpns) == 3, f"each container needs its own QPN: {got}"
    assert not got[mac1]["learned"] and got[mac1]["vlan"] == 0
    t0 = time.monotonic()
    assert ping(c1) and ping(c2), "a container cannot reach the remote host"
    ping_s = time.monotonic() - t0
    assert ping(c1, count=1, size=2044 - 28), "a full-MTU (2044, eth4's) ping from the container does not pass"
    seen = remote_qpns(lab["remote"])
    assert {got[mac1]["qpn"], got[mac2]["qpn"]} <= seen, f"the remote does not see the containers' QPNs: {seen}"
    assert all(rc == 0 for _, rc, _ in chain.run("CHECK", "xcid1" + lab["tag"], f"/run/netns/{c1}", res1))

    # DEL releases c1's VIF (its QP leaves the fabric) and leaves c2's alone
    qpn1 = got[mac1]["qpn"]
    assert qpn1 in qp_sockets(lab["fabric"])
    t0 = time.monotonic()
    assert chain.run("DEL", "xcid1" + lab["tag"], f"/run/netns/{c1}", res1) == [
        ("xdpoib-cni", 0, None), ("bridge", 0, None)]
    del_s = time.monotonic() - t0
    assert set(vifs(up)) == set(vif0) | {mac2}
    assert qpn1 not in qp_sockets(lab["fabric"])
    assert not list((lab["tmp"] / "cni").rglob("xcid1*"))   # its record is gone
    # DEL again, and DEL once the namespace is gone: success, nothing changes
    assert chain.run("DEL", "xcid1" + lab["tag"], f"/run/netns/{c1}", res1) == [
        ("xdpoib-cni", 0, None), ("bridge", 0, None)]
    sh("ip", "netns", "del", c2)
    assert chain.run("DEL", "xcid2" + lab["tag"], f"/run/netns/{c2}", res2) == [
        ("xdpoib-cni", 0, None), ("bridge", 0, None)]
    assert set(vifs(up)) == set(vif0)
    figures(f"cni chain: ADD {add_s:.2f} s (bridge + host-local + xdpoib-cni), first pings {ping_s:.2f} s, "
            f"DEL {del_s:.2f} s; lab setup {lab['setup_s']:.1f} s")


def test_del_of_an_unknown_container_succeeds(lab):
    chain = Chain(conflist(lab, f"xcn{lab['tag']}", 10, 29), lab["cni_path"])
    plugin = chain.conflist["plugins"][1]
    for netns in (None, "/run/netns/xcnone"):
        rc, out, err = chain.exec(plugin, "DEL", "never-added", netns, "eth0", None)
        assert (rc, out) == (0, None), err
    assert chain.run("DEL", "never-added", None, None) == [("xdpoib-cni", 0, None), ("bridge", 0, None)]


def bad_confs(lab) -> list[tuple[str, dict, int]]:
    """(what, the xdpoib-cni entry's changes, the expected CNI error code)."""
    return [
        ("a VLAN out of range", {"vlan": 5000}, 7),
        ("a VLAN with no partition on the attachment", {"vlan": 7}, 7),
        ("a mistyped key", {"vlna": 3}, 2),
        ("an unknown attachment key", {"attachment": {"ifname": lab["uplink"], "ns": "x"}}, 2),
        ("an attachment that is not an object", {"attachment": lab["uplink"]}, 7),
        ("an interface that is not attached", {"attachment": {"ifname": "xcnotthere"}}, 11),
    ]


def test_add_with_a_bad_config_is_refused_and_changes_nothing(lab, containers):
    up = lab["uplink"]
    before = vif_keys(up)
    (c,) = containers(1)
    for what, change, code in bad_confs(lab):
        chain = Chain(conflist(lab, f"xcb{lab['tag']}", 30, 39, **change), lab["cni_path"])
        bridge, own = chain.conflist["plugins"]
        cid = f"xcbad{lab['tag']}"
        rc, res, _ = chain.exec(bridge, "ADD", cid, f"/run/netns/{c}", "eth0", None)
        assert rc == 0
        rc, out, err = chain.exec(own, "ADD", cid, f"/run/netns/{c}", "eth0", res)
        assert rc != 0 and out["code"] == code, f"{what}: {rc} {out} {err}"
        assert set(out) == {"cniVersion", "code", "msg", "details"} and out["cniVersion"] == "1.0.0", out
        assert "Traceback" not in err
        assert vif_keys(up) == before, f"{what}: the VIFs changed"
        if code == 7 and "range" in what:            # on the bridge but not a VIF: dropped in XDP, counted
            drops = spoofed(up)
            assert not ping(c, count=1)
            assert spoofed(up) > drops, x("status", up, "-j").stdout
        # the runtime deletes after a failed ADD: every plugin succeeds, the container's link is gone
        assert chain.run("DEL", cid, f"/run/netns/{c}", None) == [("xdpoib-cni", 0, None), ("bridge", 0, None)]
        assert sh("ip", "-n", c, "link", "show", "eth0", check=False).returncode != 0
    # and without prevResult (not chained), with a cniVersion it does not speak, with bad environment
    chain = Chain(conflist(lab, f"xcb{lab['tag']}", 30, 39), lab["cni_path"])
    own = chain.conflist["plugins"][1]
    rc, out, _ = chain.exec(own, "ADD", "xcnoprev", f"/run/netns/{c}", "eth0", None)
    assert rc != 0 and out["code"] == 7 and "prevResult" in out["details"], out
    chain.conflist["cniVersion"] = "9.9.9"
    rc, out, _ = chain.exec(own, "ADD", "xcnover", f"/run/netns/{c}", "eth0", None)
    assert rc != 0 and out["code"] == 1, out
    rc, out, _ = chain.exec(own, "ADD", "-bad id", f"/run/netns/{c}", "eth0", None)
    assert rc != 0 and out["code"] == 4 and "CNI_CONTAINERID" in out["details"], out
    assert vif_keys(up) == before


def test_version_and_undecodable_input(lab):
    plugin = Path(lab["cni_path"].split(":")[0]) / "xdpoib-cni"

    def run(env: dict, stdin: str) -> tuple[int, dict]:
        r = subprocess.run([str(plugin)], input=stdin, env={"PATH": os.environ["PATH"], **env},
                           capture_output=True, text=True, timeout=30)
        return r.returncode, json.loads(r.stdout)

    rc, out = run({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
    assert rc == 0 and out["cniVersion"] == "1.0.0" and "1.0.0" in out["supportedVersions"]
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "xcdec", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}
    rc, out = run(env, "{not json")
    assert rc != 0 and out["code"] == 6, out
    rc, out = run({**env, "CNI_COMMAND": "GC"}, "{}")
    assert rc != 0 and out["code"] == 4 and "CNI_COMMAND" in out["details"], out
    rc, out = run({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "xcdec"}, "{}")
    assert rc != 0 and out["code"] == 4 and "CNI_NETNS" in out["details"] and "CNI_IFNAME" in out["details"], out


def test_check_fails_once_the_vif_is_gone_and_del_still_succeeds(lab, containers):
    chain = Chain(conflist(lab, f"xcc{lab['tag']}", 40, 49), lab["cni_path"])
    (c,) = containers(1)
    cid = f"xcchk{lab['tag']}"
    res, _ = chain.add(cid, f"/run/netns/{c}")
    mac = link_mac(c, "eth0")
    assert chain.run("CHECK", cid, f"/run/netns/{c}", res) == [("bridge", 0, None), ("xdpoib-cni", 0, None)]
    x("vif", "del", lab["uplink"], mac)                       # released behind the plugin's back
    _, (typ, rc, out) = chain.run("CHECK", cid, f"/run/netns/{c}", res)
    assert typ == "xdpoib-cni" and rc != 0 and out["code"] == 101 and mac in out["details"], out
    assert chain.run("DEL", cid, f"/run/netns/{c}", res) == [("xdpoib-cni", 0, None), ("bridge", 0, None)]
    assert mac not in vifs(lab["uplink"])


def test_add_takes_over_a_mac_that_is_a_vif_already(lab, containers):
    """A MAC made a VIF before the plugin runs (by hand here; `--learn-vifs` from the container's first
    frame alike) is taken over, not refused: ADD succeeds with that VIF, DEL releases it."""
    chain = Chain(conflist(lab, f"xct{lab['tag']}", 70, 79), lab["cni_path"])
    bridge, own = chain.conflist["plugins"]
    (c,) = containers(1)
    cid = f"xctake{lab['tag']}"
    rc, res, err = chain.exec(bridge, "ADD", cid, f"/run/netns/{c}", "eth0", None)
    assert rc == 0, err
    mac = link_mac(c, "eth0")
    x("vif", "add", lab["uplink"], mac)
    qpn = vifs(lab["uplink"])[mac]["qpn"]
    rc, out, err = chain.exec(own, "ADD", cid, f"/run/netns/{c}", "eth0", res)
    assert (rc, out) == (0, res), f"{out} {err}"
    assert vifs(lab["uplink"])[mac]["qpn"] == qpn
    assert ping(c, count=1)
    assert chain.run("DEL", cid, f"/run/netns/{c}", res) == [("xdpoib-cni", 0, None), ("bridge", 0, None)]
    assert mac not in vifs(lab["uplink"])


def test_del_while_the_agent_is_down_asks_to_try_again_and_keeps_the_record(lab, containers):
    """A recorded VIF whose agent is down is not forgotten (the agent restores it from its state file):
    DEL answers 11 (try again later); once the agent is back the same DEL releases it."""
    chain = Chain(conflist(lab, f"xcd{lab['tag']}", 60, 69), lab["cni_path"])
    own = chain.conflist["plugins"][1]
    (c,) = containers(1)
    cid = f"xcdown{lab['tag']}"
    res, _ = chain.add(cid, f"/run/netns/{c}")
    mac = link_mac(c, "eth0")
    st = json.loads(x("status", lab["uplink"], "-j").stdout)
    os.kill((st[0] if isinstance(st, list) else st)["attachment"]["pid"], signal.SIGKILL)
    time.sleep(0.5)
    try:
        rc, out, err = chain.exec(own, "DEL", cid, f"/run/netns/{c}", "eth0", res)
        assert rc != 0 and out["code"] == 11, f"{out} {err}"
        assert list((lab["tmp"] / "cni").rglob(f"{cid}-*")), "the record was dropped with the agent down"
    finally:
        x("attach", lab["uplink"], "--sim", f"{lab['fabric']}:h1")       # adopts the links, restores the VIFs
    assert mac in vifs(lab["uplink"])
    assert chain.run("DEL", cid, f"/run/netns/{c}", res) == [("xdpoib-cni", 0, None), ("bridge", 0, None)]
    assert mac not in vifs(lab["uplink"])


# ---- (b) rootful podman on a CNI network

CONTAINERS_CONF = """\
# podman for this test only: its own storage, runtime files and CNI configuration under {tmp}
[containers]
# this machine's root lacks CAP_SYS_RESOURCE: podman's default limits (above the hard limits) are refused
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"           # no systemd as PID 1 here
events_logger = "file"
events_logfile_path = "{tmp}/events.log"
runtime = "runc"                      # crun 1.8 refuses a hybrid cgroup v1/v2 host
tmp_dir = "{tmp}/libpod"

[network]
network_backend = "cni"
network_config_dir = "{tmp}/net.d"
cni_plugin_dirs = ["{tmp}/bin", "/usr/lib/cni"]
"""

STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{tmp}/storage"
runroot = "{tmp}/run"
"""


def busybox_rootfs(root: Path) -> None:
    """A root filesystem with Debian's busybox, the libraries it links and the applets the test uses."""
    busybox = Path("/bin/busybox")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ping", "sleep", "cat", "ip"):
        (root / "bin" / applet).symlink_to("busybox")
    for line in sh("ldd", str(busybox), check=False).stdout.splitlines():     # none if it is static
        path = next((w for w in line.split() if w.startswith("/")), None)
        if path:
            dst = root / path.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dst)
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def podman(lab, tmp_path_factory):
    """run(*args): podman with this test's own configuration (AssertionError on failure); yields
    (run, network name, image)."""
    need_cmd("podman", "runc", "ldd")
    need_file("/bin/busybox")
    tmp = tmp_path_factory.mktemp("podman")
    for d in ("net.d", "libpod", "bin"):
        (tmp / d).mkdir()
    # the plugin as the Kubernetes DaemonSet installs it: one zipapp file run by Debian's python3
    sh(str(Path(lab["cni_path"].split(":")[0]) / "xdpoib-cni"), "--install", str(tmp / "bin"))
    (tmp / "containers.conf").write_text(CONTAINERS_CONF.format(tmp=tmp))
    (tmp / "storage.conf").write_text(STORAGE_CONF.format(tmp=tmp))
    network = f"xcp{lab['tag']}"
    (tmp / "net.d" / f"{network}.conflist").write_text(json.dumps(conflist(lab, network, 50, 59), indent=1))
    env = {**os.environ, "CONTAINERS_CONF": str(tmp / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(tmp / "storage.conf")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, env=env)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}): {r.stderr[-800:]}")
        return r

    busybox_rootfs(tmp / "rootfs")
    sh("tar", "-C", str(tmp / "rootfs"), "-cf", str(tmp / "rootfs.tar"), ".")
    image = f"localhost/xdpoib-busybox:{lab['tag']}"
    t0 = time.monotonic()
    run("import", str(tmp / "rootfs.tar"), image)
    import_s = time.monotonic() - t0
    try:
        yield run, network, image, import_s
    finally:
        run("rm", "--all", "--force", "--time", "0", check=False)
        run("rmi", "--all", "--force", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_podman_containers_are_vifs_and_podman_rm_releases_them(lab, podman, figures):
    run, network, image, import_s = podman
    up = lab["uplink"]
    before = set(vifs(up))
    names = [f"xcpc{lab['tag']}{i}" for i in (1, 2)]
    t0 = time.monotonic()
    for n in names:
        run("run", "--detach", "--name", n, "--network", network, image, "sleep", "600")
    run_s = time.monotonic() - t0
    macs = {n: run("exec", n, "cat", "/sys/class/net/eth0/address").stdout.strip() for n in names}
    got = vifs(up)
    assert set(macs.values()) <= set(got), f"podman's containers are not VIFs: {macs} {got}"
    qpns = {n: got[m]["qpn"] for n, m in macs.items()}
    assert len(set(qpns.values()) | {got[m]["qpn"] for m in before}) == len(before) + 2, got
    for n in names:
        r = run("exec", n, "ping", "-c", "3", "-i", "0.2", "-W", "2", REMOTE, check=False)
        assert r.returncode == 0, f"container {n} cannot reach the remote host: {r.stdout} {r.stderr}"
    seen = remote_qpns(lab["remote"])
    assert set(qpns.values()) <= seen, f"the remote does not see each container's QPN: {qpns} {seen}"
    t0 = time.monotonic()
    run("rm", "--force", "--time", "0", *names)
    rm_s = time.monotonic() - t0
    assert set(vifs(up)) == before, "podman rm did not release the containers' VIFs"
    live = qp_sockets(lab["fabric"])
    assert not set(qpns.values()) & live, "a released VIF's QP is still on the fabric"
    figures(f"podman: import {import_s:.2f} s, two `podman run -d` {run_s:.2f} s, `podman rm` of both {rm_s:.2f} s; "
            f"QPNs {', '.join(f'{q:#x}' for q in qpns.values())}")
