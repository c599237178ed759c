"""The qemu tier's guest as a real VM: virtio-net on host TAPs with qemu's default TAP settings (vnet
headers on, the guest's checksum and TSO offloads on), attached to a sim fabric in both ways a VM is
attached, and reaching a remote xdpoib host across it.

One fabric (ibsim + OpenSM) with three hosts:
  h1  the remote: netns R, eth4 attached in veth mode, 10.77.0.1/24 and fd77::1/64, Debian's dnsmasq
      on eth4 (DHCPv4 leases, router advertisements for fd77::/64) and a TCP server (SERVER below).
  h2  way `tap`: the VM's first TAP attached with `xdpoib attach TAP --mode tap`.
  h3  way `bridge`: the VM's second TAP a port of a Linux bridge in this namespace whose uplink is an
      eth4 attached in veth mode with `--learn-vifs 1` (the guest gets its own VIF and QP).
One boot (TCG is slow): tests/qemu/guest/vm_checks.sh runs in the guest (kernel command line
xdpoib.mode=vm), takes the NICs in turn and reports each check as an `XDPOIB-RESULT vm::WAY::CHECK`
line on the serial console: offloads on, a DHCP lease, ping by IPv4 and IPv6, a few MB over TCP each
way. Here each line is a test (a missing one fails), and the host checks what the guest cannot: the
lease is dnsmasq's, under the client identifier xdpoib gives the guest's MAC; the SHA-256 of each TCP
payload is the same on both ends; at the moment of each upload the remote's neighbour entry for the
guest points at a peer whose QPN and GID are those of the guest's own VIF (`xdpoib peers -j` on the
remote, `status -j` / `vif list -j` on the guest's side), not at the bridge uplink's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prereq import IN_CI, need_cmd, need_file, need_root

from xdpoib.wire.oracle import client_id_for_mac

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "qemu"
CACHE = Path(os.environ.get("XDPOIB_QEMU_CACHE", REPO / ".cache" / "qemu"))
BUILD_TIMEOUT = 1200
BOOT_TIMEOUT = int(os.environ.get("XDPOIB_QEMU_VM_TIMEOUT", "600"))
XDPOIB = [sys.executable, "-m", "xdpoib"]

NET4, NET6 = "10.77.0", "fd77::"
REMOTE4, REMOTE6 = f"{NET4}.1", f"{NET6}1"
UP_PORT, DOWN_PORT = 5101, 5102
BYTES = (2 if IN_CI else 4) * 1024 * 1024
WAYS = {"tap": "52:54:00:77:00:0a", "bridge": "52:54:00:77:00:0b"}    # way -> the guest NIC's MAC
CHECKS = ["guest_offloads_on", "dhcp_lease", "ping_ipv4", "ping_ipv6", "tcp_up", "tcp_down"]

RESULT = re.compile(r"^XDPOIB-RESULT (\S+) (PASS|FAIL|SKIP) ?(.*)$")
MEASURE = re.compile(r"^XDPOIB-MEASURE (\S+) (.*)$")
SUMMARY = re.compile(r"^XDPOIB-SUMMARY passed=(\d+) failed=(\d+) skipped=(\d+) total=(\d+) exit=(-?\d+)")

# The remote's TCP server (runs in R): port UP receives until EOF and answers the SHA-256 of what came,
# port DOWN sends BYTES random bytes and closes. One JSON line per connection on stdout, with the
# neighbour entry R holds for the client at that moment (the REMAC its frames to the guest go to).
SERVER = r"""
import hashlib, json, os, socket, subprocess, sys, threading
bind, up, down, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lock = threading.Lock()

def say(**kw):
    with lock:
        print(json.dumps(kw), flush=True)

def lladdr(ip):
    w = subprocess.run(["ip", "neigh", "show", ip, "dev", "eth4"], capture_output=True, text=True).stdout.split()
    return w[w.index("lladdr") + 1] if "lladdr" in w else None

def handle(way, c, peer):
    neigh = lladdr(peer)
    h, n = hashlib.sha256(), 0
    try:
        c.settimeout(120)
        if way == "up":
            while chunk := c.recv(65536):
                h.update(chunk)
                n += len(chunk)
            c.sendall(h.hexdigest().encode())
        else:
            data = os.urandom(size)
            c.sendall(data)
            h.update(data)
            n = len(data)
        error = None
    except OSError as e:
        error = str(e)
    finally:
        c.close()
    say(way=way, peer=peer, bytes=n, sha256=h.hexdigest(), lladdr=neigh, error=error)

def serve(way, s):
    while True:
        c, (peer, _port) = s.accept()
        threading.Thread(target=handle, args=(way, c, peer), daemon=True).start()

socks = {"up": socket.create_server((bind, up)), "down": socket.create_server((bind, down))}
for way, s in socks.items():
    threading.Thread(target=serve, args=(way, s), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class VmRun:
    """What one boot of the VM reported, and what the host saw meanwhile."""

    results: dict[str, tuple[str, str]] = field(default_factory=dict)   # name -> (verdict, detail)
    summary: tuple[int, ...] | None = None
    console: str = ""
    measures: dict[str, str] = field(default_factory=dict)
    served: list[dict] = field(default_factory=list)       # the server's lines, each with a snapshot
    leases: str = ""
    dnsmasq_log: str = ""
    final: dict = field(default_factory=dict)       # the snapshot after the boot, for failure messages
    names: dict[str, str] = field(default_factory=dict)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.console.splitlines()[-n:])

    def why(self) -> str:
        """What the agents knew after the boot: the guest side's VIFs and drops, the remote's peers."""
        f = self.final
        if "error" in f or not f:
            return str(f)
        drops = {k: f[k].get("drops") for k in ("tap", "uplink")}
        return f"vifs of the uplink {f['vifs']}; drops {drops}; remote peers {f['peers']}"

    def detail(self, way: str, check: str) -> dict[str, str]:
        """The key=value words of a check's detail."""
        _verdict, text = self.results.get(f"vm::{way}::{check}", ("", ""))
        return dict(w.split("=", 1) for w in text.split() if "=" in w)


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout[-400:]} {r.stderr[-400:]}")
    return r


def x(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*XDPOIB, *args], capture_output=True, text=True, timeout=180)
    if check and r.returncode != 0:
        raise AssertionError(f"xdpoib {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def xj(*args: str):
    return json.loads(x(*args, "-j").stdout)


def stop(p: subprocess.Popen | None) -> None:
    """Stop a process we started, by its PID."""
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


def quiet(*ifnames: str) -> None:
    """Links of ours in this namespace carry no IPv6 (no ND, MLD or router solicitations of this host)."""
    for ifname in ifnames:
        sh("sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1")


def _say(request, line: str) -> None:
    """Print a line on the terminal even while output is captured (the run's timings)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def _build_image() -> tuple[str, bool]:
    build = subprocess.run(["bash", str(TOOLS / "build-image.sh"), str(CACHE)], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
    if build.returncode == 3:
        pytest.fail(f"qemu tier INFRASTRUCTURE failure: {build.stderr.strip().splitlines()[-1]}", pytrace=False)
    if build.returncode != 0 or not build.stdout.strip():
        pytest.fail(f"qemu tier: guest image build failed (exit {build.returncode}):\n{build.stderr[-3000:]}",
                    pytrace=False)
    return build.stdout.strip().splitlines()[-1], "cached image" in build.stderr


def _snapshot(names: dict[str, str]) -> dict:
    """What both sides know right now: the remote's peers, the tap attachment's status, the bridge
    uplink's status and VIFs."""
    return {"peers": xj("peers", "eth4", "--netns", names["remote"]),
            "tap": xj("status", names["tap"]),
            "uplink": xj("status", names["uplink"]),
            "vifs": xj("vif", "list", names["uplink"])}


@pytest.fixture(scope="module")
def vm(request) -> VmRun:
    """Fabric, remote host, both attachments, one boot of the VM; everything removed afterwards."""
    need_root()
    need_cmd("qemu-system-x86_64", "debootstrap", "cpio", "dnsmasq", "ibsim", "opensm", "saquery", "ip")
    from xdpoib.fabric.simfabric import UMAD2SIM_CANDIDATES, SimFabric

    need_file(next((p for p in UMAD2SIM_CANDIDATES if os.path.exists(p)), UMAD2SIM_CANDIDATES[0]))
    t0 = time.monotonic()
    image, cached = _build_image()
    t1 = time.monotonic()
    tag = uuid.uuid4().hex[:5]
    names = {"remote": f"xvr{tag}", "tap": f"xva{tag}", "uplink": f"xve{tag}", "bridge": f"xvb{tag}",
             "tap_b": f"xvt{tag}"}
    run = VmRun(names=names)
    with tempfile.TemporaryDirectory(prefix="xdpoib-vm-") as tmp, contextlib.ExitStack() as stack:
        d = Path(tmp)
        fab = SimFabric.up(f"vm{os.getpid()}", hosts=3)
        stack.callback(fab.down)
        remote = names["remote"]
        sh("ip", "netns", "add", remote)
        stack.callback(sh, "ip", "netns", "del", remote, check=False)
        sh("ip", "-n", remote, "link", "set", "lo", "up")
        x("attach", "eth4", "--netns", remote, "--sim", f"{fab.name}:h1")
        stack.callback(x, "detach", "eth4", "--netns", remote, check=False)
        sh("ip", "-n", remote, "addr", "add", f"{REMOTE4}/24", "dev", "eth4")
        sh("ip", "-n", remote, "addr", "add", f"{REMOTE6}/64", "dev", "eth4", "nodad")
        # way tap: the TAP qemu opens, attached as it is
        for tap in (names["tap"], names["tap_b"]):
            sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            stack.callback(sh, "ip", "link", "del", tap, check=False)
            quiet(tap)
        x("attach", names["tap"], "--mode", "tap", "--sim", f"{fab.name}:h2")
        stack.callback(x, "detach", names["tap"], check=False)
        # way bridge: the TAP a port of a bridge whose uplink is eth4 in veth mode
        x("attach", names["uplink"], "--sim", f"{fab.name}:h3", "--learn-vifs", "1")
        stack.callback(x, "detach", names["uplink"], check=False)
        sh("ip", "link", "add", names["bridge"], "type", "bridge")
        stack.callback(sh, "ip", "link", "del", names["bridge"], check=False)
        quiet(names["bridge"], names["uplink"])
        # the bridge speaks with the uplink's MAC (VIF 0): its own frames (an IGMP report for the
        # all-snoopers group when it comes up) would take the one VIF the guest may learn
        sh("ip", "link", "set", names["bridge"], "address", xj("status", names["uplink"])["eth"]["mac"])
        for port in (names["uplink"], names["tap_b"]):
            sh("ip", "link", "set", port, "master", names["bridge"], "up")
        sh("ip", "link", "set", names["bridge"], "up")
        # the remote's services
        dnsmasq_out = stack.enter_context(open(d / "dnsmasq.log", "w"))
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", remote, "dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null",
             "--interface=eth4", "--bind-interfaces", "--no-ping", "--log-dhcp",
             f"--dhcp-range={NET4}.100,{NET4}.150,255.255.255.0,10m", f"--dhcp-leasefile={d / 'leases'}",
             f"--pid-file={d / 'dnsmasq.pid'}", "--enable-ra", f"--dhcp-range={NET6},ra-only,64",
             "--ra-param=eth4,5"], stdout=dnsmasq_out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        stack.callback(stop, dnsmasq)
        server = subprocess.Popen(["ip", "netns", "exec", remote, sys.executable, "-c", SERVER, REMOTE4,
                                   str(UP_PORT), str(DOWN_PORT), str(BYTES)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stack.callback(stop, server)
        assert server.stdout.readline().strip() == "ready", "the remote's TCP server did not start"

        def read_server() -> None:
            for line in server.stdout:
                event = json.loads(line)
                try:
                    event["snapshot"] = _snapshot(names)
                except (AssertionError, ValueError) as e:
                    event["snapshot"] = {"error": str(e)}
                run.served.append(event)

        reader = threading.Thread(target=read_server, daemon=True)
        reader.start()
        t2 = time.monotonic()
        # one boot, both NICs
        nics = " ".join(f"{names['tap' if way == 'tap' else 'tap_b']}={mac}" for way, mac in WAYS.items())
        args = [f"remote4={REMOTE4}", f"remote6={REMOTE6}", f"bytes={BYTES}", f"up={UP_PORT}",
                f"down={DOWN_PORT}", *(f"nic={way}@{mac}" for way, mac in WAYS.items())]
        env = {**os.environ, "XDPOIB_GUEST_MODE": "vm", "XDPOIB_QEMU_NICS": nics}
        log = d / "serial.log"
        boot = subprocess.run(["bash", str(TOOLS / "boot.sh"), image, str(log), str(BOOT_TIMEOUT), *args],
                              capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, env=env)
        t3 = time.monotonic()
        try:
            run.final = _snapshot(names)
        except (AssertionError, ValueError) as e:
            run.final = {"error": str(e)}
        run.console = (log.read_text(errors="replace") if log.exists() else "").replace("\r", "")
        run.leases = (d / "leases").read_text() if (d / "leases").exists() else ""
        server.stdin.close()                    # the server ends; the reader sees the end of its output
        reader.join(60)
        dnsmasq_log = (d / "dnsmasq.log").read_text(errors="replace")
    t4 = time.monotonic()
    for line in run.console.splitlines():
        if m := RESULT.match(line.strip()):
            run.results[m[1]] = (m[2], m[3])
        elif m := MEASURE.match(line.strip()):
            run.measures[m[1]] = m[2]
        elif m := SUMMARY.match(line.strip()):
            run.summary = tuple(int(v) for v in m.groups())
    _say(request, f"qemu tier (vm): image {t1 - t0:.1f}s ({'cached' if cached else 'built'}), fabric and"
                  f" attachments {t2 - t1:.1f}s, boot + guest checks {t3 - t2:.1f}s, teardown {t4 - t3:.1f}s")
    if run.measures:
        _say(request, "qemu tier (vm): measured in the guest: "
                      + ", ".join(f"{k} {v}" for k, v in run.measures.items()))
    if boot.returncode == 124:
        pytest.fail(f"qemu tier (vm): guest TIMEOUT after {BOOT_TIMEOUT}s, killed; console tail:\n{run.tail()}",
                    pytrace=False)
    if boot.returncode != 0:
        pytest.fail(f"qemu tier INFRASTRUCTURE failure: qemu exited {boot.returncode}: {boot.stderr[-2000:]}",
                    pytrace=False)
    if run.results.get("vm::setup", ("",))[0] == "FAIL":
        pytest.fail(f"qemu tier (vm): guest setup failed: {run.results['vm::setup'][1]}\n{run.tail()}",
                    pytrace=False)
    run.dnsmasq_log = dnsmasq_log
    return run


def test_guest_reported_a_clean_summary(vm):
    assert vm.summary is not None, f"no XDPOIB-SUMMARY line: the guest died early; console tail:\n{vm.tail()}"
    _passed, failed, skipped, total, _exit = vm.summary
    failures = {k: v[1] for k, v in vm.results.items() if v[0] != "PASS"}
    assert failed == 0 and skipped == 0 and not failures, f"guest failures: {failures}"
    assert total == len(vm.results) == len(WAYS) * len(CHECKS), sorted(vm.results)


@pytest.mark.parametrize("name", [f"{way}::{check}" for way in WAYS for check in CHECKS])
def test_guest_check(vm, name):
    got = vm.results.get(f"vm::{name}")
    assert got, f"missing result line for vm::{name}; console tail:\n{vm.tail()}"
    verdict, detail = got
    assert verdict == "PASS", f"vm::{name}: {verdict} {detail}\nafter the boot: {vm.why()}"


@pytest.mark.parametrize("way", WAYS)
def test_the_lease_is_dnsmasqs_under_the_guests_client_id(vm, way):
    address = vm.detail(way, "dhcp_lease").get("address")
    assert address, f"the guest reported no lease on its {way} NIC"
    leases = {ln.split()[2]: ln.split() for ln in vm.leases.splitlines() if len(ln.split()) >= 5}
    assert address in leases, f"{address} is not among dnsmasq's leases: {vm.leases!r}\n{vm.dnsmasq_log[-1500:]}"
    cid = client_id_for_mac(bytes.fromhex(WAYS[way].replace(":", ""))).hex(":")
    # htype 32 with no hardware address ("20-"): dnsmasq knew the guest by the client id alone
    assert leases[address][1] == "20-" and leases[address][4] == cid, leases[address]


def _served(vm, way: str, direction: str) -> dict:
    address = vm.detail(way, "dhcp_lease").get("address")
    got = [e for e in vm.served if e["peer"] == address and e["way"] == direction]
    seen = [{k: e.get(k) for k in ("way", "peer", "bytes", "error")} for e in vm.served]
    assert len(got) == 1, f"the remote served {len(got)} {direction} connections from {address}: {seen}"
    return got[0]


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("way", WAYS)
def test_tcp_payload_is_the_same_on_both_ends(vm, way, direction):
    guest = vm.detail(way, f"tcp_{direction}")
    assert guest, f"the guest reported no tcp_{direction} on its {way} NIC"
    served = _served(vm, way, direction)
    assert served["error"] is None, served
    assert int(guest["bytes"]) == served["bytes"] == BYTES, (guest, served)
    assert guest["sha256"] == served["sha256"], f"payload differs: guest {guest['sha256']}, remote {served['sha256']}"


@pytest.mark.parametrize("way", WAYS)
def test_the_remote_sees_the_guests_own_qpn(vm, way):
    served = _served(vm, way, "up")
    snap = served["snapshot"]
    assert "error" not in snap, snap
    remac = served["lladdr"]
    assert remac, f"the remote had no neighbour entry for {served['peer']}"
    peer = [p for p in snap["peers"] if p["remac"] == remac]
    assert len(peer) == 1, f"no peer with REMAC {remac} at the remote: {snap['peers']}"
    mac = WAYS[way]
    if way == "tap":
        status = snap["tap"]
        assert status["eth"]["mac"] == mac, f"the tap attachment did not learn the guest's MAC: {status['eth']}"
        qpn, gid = status["qpn"], status["port"]["gid"]
    else:
        vifs = {v["mac"]: v for v in snap["vifs"]}
        assert mac in vifs and vifs[mac]["learned"], f"the guest is not a learned VIF of the uplink: {snap['vifs']}"
        qpn, gid = vifs[mac]["qpn"], snap["uplink"]["port"]["gid"]
        assert qpn != snap["uplink"]["qpn"], "the guest's VIF has the uplink's QPN"
    assert peer[0]["qpn"] == qpn, f"the remote's peer for {served['peer']} has QPN {peer[0]['qpn']:#x}, " \
                                  f"the guest's VIF {qpn:#x}"
    assert ipaddress.IPv6Address(peer[0]["gid"]) == ipaddress.IPv6Address(gid), (peer[0], gid)
