"""A VM run by the real libvirtd (`virsh define` + `virsh start`, qemu TCG) on a Linux bridge whose uplink
is an xdpoib attachment, with no `--learn-vifs`: the libvirt hook (contrib/libvirt/xdpoib-hook) gives
the guest's MAC its own VIF when the domain starts and `virsh destroy` releases it.

One fabric (ibsim + OpenSM), two hosts:
  h1  the remote, as in test_vm.py: netns R, eth4 in veth mode, 10.77.0.1/24 and fd77::1/64, dnsmasq
      (DHCPv4, router advertisements) and the SHA-256-checking TCP server.
  h2  this namespace: a bridge whose port is an uplink attached in veth mode (no learning), and the
      domain's `<interface type='bridge'>` on that bridge (libvirt makes the TAP, vnet headers on).
The guest is the qemu tier's image booted by libvirt (`<os><kernel>/<initrd>/<cmdline>`) and runs
tests/qemu/guest/vm_checks.sh on one NIC (way `libvirt`), then holds until the host stops it. The
hook is installed into libvirtd's hooks directory (`qemu.d/`) for the run; a running libvirtd is
reloaded (SIGHUP: libvirt looks for hooks at start and on reload), or libvirtd and virtlogd are
started here and stopped afterwards (CI runs no services; see _libvirtd_argv for /dev/kvm). Checked:
a domain whose NIC on that bridge is a VLAN trunk is refused by `virsh start` with the hook's line;
the VIF is there when `virsh start` returns (registered at `prepare begin`), not learned, with its
own QPN; every guest check passes; the lease is dnsmasq's; the TCP payloads are the same on both
ends; the remote's neighbour for the guest is a peer with the VIF's QPN; after `virsh destroy` the
VIF is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import test_vm as vm
from prereq import need_cmd, need_file, need_root

from xdpoib.wire.oracle import client_id_for_mac

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "qemu"
HOOK = REPO / "contrib" / "libvirt" / "xdpoib-hook"
HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
URI = "qemu:///system"
WAY = "libvirt"
MAC = "52:54:00:77:00:1c"
TRUNK_MAC = "52:54:00:77:00:1d"        # a second domain's NIC, a VLAN trunk: the hook refuses to serve it
BOOT_TIMEOUT = int(os.environ.get("XDPOIB_QEMU_VM_TIMEOUT", "420"))
DAEMONS = {"libvirtd": "/run/libvirtd.pid", "virtqemud": "/run/virtqemud.pid"}

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>3072</memory>
  <vcpu>1</vcpu>
  <cpu mode='maximum' check='none'/>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel>
    <initrd>{dir}/initrd</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='bridge'>
      <mac address='{mac}'/>
      <source bridge='{bridge}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{dir}/serial.log'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return vm.sh("virsh", "-c", URI, *args, check=check, timeout=timeout)


def _listening(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _running_daemon() -> int | None:
    """The PID of a libvirt daemon serving qemu:///system now, or None."""
    if not _listening("/run/libvirt/libvirt-sock") and not _listening("/run/libvirt/virtqemud-sock"):
        return None
    for pidfile in DAEMONS.values():
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(pidfile).read_text().split()[0])
            os.kill(pid, 0)
            return pid
    return None


def _wait_for_libvirt(timeout: float = 120) -> None:
    """Until the daemon answers with its QEMU driver up (a fresh daemon probes QEMU's capabilities
    first: seconds, more on a busy machine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=60).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"libvirt did not answer on {URI} within {timeout:.0f}s")
        time.sleep(0.2)


def _libvirtd_argv(scratch: Path) -> list[str]:
    """libvirtd, in a mount namespace of its own where /dev/kvm (if any) is an empty root-only file.

    The domain is TCG and needs no KVM. Where /dev/kvm exists but the QEMU user cannot open it (here:
    no udev, so the node is not in group kvm), libvirt 9.0 finds KVM when it probes QEMU and not when
    it checks its cache, so it probes QEMU again on every lookup (~4 s each, 45-50 s per `virsh define`
    measured). Without KVM on both counts the cache stays valid. libvirt cannot carry a file mounted
    on /dev/kvm into a domain's own /dev ("Unable to move ... mount to /dev/kvm"), so this daemon's
    qemu.conf (a copy, seen only in that namespace) adds `namespaces = []`."""
    if not os.path.exists("/dev/kvm"):
        return ["libvirtd"]
    empty, conf = scratch / "no-kvm", scratch / "qemu.conf"
    empty.touch(mode=0o600)
    conf.write_text(Path("/etc/libvirt/qemu.conf").read_text() + "\nnamespaces = []\n")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "{empty}" /dev/kvm && mount --bind "{conf}" /etc/libvirt/qemu.conf && exec libvirtd']


@contextlib.contextmanager
def libvirt_with_hook(logdir: Path):
    """The hook installed in libvirt's hooks directory and a libvirt daemon that has seen it: a running
    daemon is reloaded (SIGHUP), else libvirtd (and virtlogd, which it needs for QEMU's logs) are
    started here and stopped afterwards by PID. Yields how the daemon was obtained."""
    made_dir = not HOOKS_DIR.exists()
    HOOKS_DIR.mkdir(parents=True, exist_ok=True)
    hook = HOOKS_DIR / f"xdpoib-test{os.getpid()}"
    # the packaged hook runs Debian's python3, which has xdpoib installed; here it is this checkout's
    body = HOOK.read_text().split("\n", 1)[1]
    hook.write_text(f"#!{sys.executable}\n{body}")
    hook.chmod(0o755)
    started: list[subprocess.Popen] = []
    try:
        with contextlib.ExitStack() as logs:
            pid = _running_daemon()
            if pid is not None:
                os.kill(pid, signal.SIGHUP)     # libvirt rescans its hooks on reload
                time.sleep(1)
                _wait_for_libvirt()
                how = f"running daemon {pid}, reloaded"
            else:
                if not _listening("/run/libvirt/virtlogd-sock"):
                    out = logs.enter_context(open(logdir / "virtlogd.log", "w"))
                    started.append(subprocess.Popen(["virtlogd"], stdout=out, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL))
                out = logs.enter_context(open(logdir / "libvirtd.log", "w"))
                started.append(subprocess.Popen(_libvirtd_argv(logdir), stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL))
                _wait_for_libvirt()
                how = "libvirtd started by the test"
            yield how
    finally:
        hook.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                HOOKS_DIR.rmdir()
        for p in reversed(started):
            vm.stop(p)


def vifs(uplink: str) -> dict[str, dict]:
    return {v["mac"]: v for v in vm.xj("vif", "list", uplink)}


class Run:
    """What one boot reported and what the host saw."""

    def __init__(self) -> None:
        self.results: dict[str, tuple[str, str]] = {}
        self.measures: dict[str, str] = {}
        self.summary: tuple[int, ...] | None = None
        self.console = ""
        self.served: list[dict] = []
        self.leases = ""
        self.dnsmasq_log = ""
        self.after_start: dict[str, dict] = {}
        self.after_checks: dict[str, dict] = {}
        self.after_destroy: dict[str, dict] = {}
        self.refused: subprocess.CompletedProcess | None = None
        self.after_refused: dict[str, dict] = {}
        self.uplink: dict = {}
        self.daemon = ""
        self.names: dict[str, str] = {}

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.console.splitlines()[-n:])

    def detail(self, check: str) -> dict[str, str]:
        _verdict, text = self.results.get(f"vm::{WAY}::{check}", ("", ""))
        return dict(w.split("=", 1) for w in text.split() if "=" in w)


def _wait_for_summary(log: Path, domain: str, timeout: float) -> str:
    """Poll the serial log until the guest's summary line (or the domain is gone, or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "XDPOIB-SUMMARY" in text:
            return text
        if virsh("domstate", domain, check=False).stdout.strip() not in ("running", "paused"):
            return text
        time.sleep(2)
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture(scope="module")
def lv(request) -> Run:
    need_root()
    need_cmd("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "debootstrap", "cpio", "dnsmasq", "ibsim",
             "opensm", "saquery", "ip")
    from xdpoib.fabric.simfabric import UMAD2SIM_CANDIDATES, SimFabric

    need_file(next((p for p in UMAD2SIM_CANDIDATES if os.path.exists(p)), UMAD2SIM_CANDIDATES[0]))
    t0 = time.monotonic()
    image, cached = vm._build_image()
    t1 = time.monotonic()
    tag = uuid.uuid4().hex[:5]
    names = {"remote": f"xlr{tag}", "uplink": f"xle{tag}", "bridge": f"xlb{tag}", "domain": f"xdpoib-lv{tag}"}
    run = Run()
    run.names = names
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="xdpoib-libvirt-") as tmp, contextlib.ExitStack() as stack:
        d = Path(tmp)
        d.chmod(0o755)                  # QEMU runs as libvirt-qemu: it reads the kernel, writes the serial log
        fab = SimFabric.up(f"lv{os.getpid()}", hosts=2)
        stack.callback(fab.down)
        # the remote (h1), as in test_vm.py
        remote = names["remote"]
        vm.sh("ip", "netns", "add", remote)
        stack.callback(vm.sh, "ip", "netns", "del", remote, check=False)
        vm.sh("ip", "-n", remote, "link", "set", "lo", "up")
        vm.x("attach", "eth4", "--netns", remote, "--sim", f"{fab.name}:h1")
        stack.callback(vm.x, "detach", "eth4", "--netns", remote, check=False)
        vm.sh("ip", "-n", remote, "addr", "add", f"{vm.REMOTE4}/24", "dev", "eth4")
        vm.sh("ip", "-n", remote, "addr", "add", f"{vm.REMOTE6}/64", "dev", "eth4", "nodad")
        # this host (h2): a bridge whose uplink is eth4 in veth mode, no --learn-vifs
        uplink, bridge = names["uplink"], names["bridge"]
        vm.x("attach", uplink, "--sim", f"{fab.name}:h2")
        stack.callback(vm.x, "detach", uplink, check=False)
        vm.sh("ip", "link", "add", bridge, "type", "bridge")
        stack.callback(vm.sh, "ip", "link", "del", bridge, check=False)
        vm.quiet(bridge, uplink)
        run.uplink = vm.xj("status", uplink)
        vm.sh("ip", "link", "set", bridge, "address", run.uplink["eth"]["mac"])    # the bridge speaks as VIF 0
        vm.sh("ip", "link", "set", uplink, "master", bridge, "up")
        vm.sh("ip", "link", "set", bridge, "up")
        dnsmasq_out = stack.enter_context(open(d / "dnsmasq.log", "w"))
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", remote, "dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null",
             "--interface=eth4", "--bind-interfaces", "--no-ping", "--log-dhcp",
             f"--dhcp-range={vm.NET4}.100,{vm.NET4}.150,255.255.255.0,10m", f"--dhcp-leasefile={d / 'leases'}",
             f"--pid-file={d / 'dnsmasq.pid'}", "--enable-ra", f"--dhcp-range={vm.NET6},ra-only,64",
             "--ra-param=eth4,5"], stdout=dnsmasq_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stack.callback(vm.stop, dnsmasq)
        server = subprocess.Popen(["ip", "netns", "exec", remote, sys.executable, "-c", vm.SERVER, vm.REMOTE4,
                                   str(vm.UP_PORT), str(vm.DOWN_PORT), str(vm.BYTES)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stack.callback(vm.stop, server)
        assert server.stdout.readline().strip() == "ready", "the remote's TCP server did not start"

        def read_server() -> None:
            for line in server.stdout:
                event = json.loads(line)
                try:
                    event["snapshot"] = {"peers": vm.xj("peers", "eth4", "--netns", remote), "vifs": vifs(uplink)}
                except (AssertionError, ValueError) as e:
                    event["snapshot"] = {"error": str(e)}
                run.served.append(event)

        reader = threading.Thread(target=read_server, daemon=True)
        reader.start()
        t2 = time.monotonic()
        run.daemon = stack.enter_context(libvirt_with_hook(d))
        t3 = time.monotonic()
        # the guest: the image's kernel, its rootfs with the project appended, the VM checks on one NIC
        shutil.copy(Path(image) / "vmlinuz", d / "vmlinuz")
        vm.sh("bash", str(TOOLS / "initrd.sh"), image, str(d / "initrd"), timeout=300)
        timing["initrd"] = time.monotonic() - t3
        args = [f"remote4={vm.REMOTE4}", f"remote6={vm.REMOTE6}", f"bytes={vm.BYTES}", f"up={vm.UP_PORT}",
                f"down={vm.DOWN_PORT}", f"nic={WAY}@{MAC}", "hold=1"]
        cmdline = f"console=ttyS0 panic=-1 quiet loglevel=4 xdpoib.mode=vm xdpoib.args={','.join(args)}"
        (d / "domain.xml").write_text(DOMAIN.format(name=names["domain"], dir=d, cmdline=cmdline, mac=MAC,
                                                    bridge=bridge))
        # a domain whose NIC is ours but cannot be one VIF: the hook fails its start, libvirt refuses it
        trunk = DOMAIN.format(name=f"{names['domain']}t", dir=d, cmdline=cmdline, mac=TRUNK_MAC, bridge=bridge)
        trunk = trunk.replace("<model type='virtio'/>", "<vlan trunk='yes'><tag id='3'/><tag id='4'/></vlan>"
                                                        "<model type='virtio'/>")
        (d / "trunk.xml").write_text(trunk)
        virsh("define", str(d / "trunk.xml"))
        stack.callback(virsh, "undefine", f"{names['domain']}t", check=False)
        t = time.monotonic()
        run.refused = virsh("start", f"{names['domain']}t", check=False, timeout=120)
        timing["refused start"] = time.monotonic() - t
        run.after_refused = vifs(uplink)
        virsh("define", str(d / "domain.xml"))
        stack.callback(virsh, "undefine", names["domain"], check=False)
        stack.callback(virsh, "destroy", names["domain"], check=False)
        t4 = time.monotonic()
        virsh("start", names["domain"], timeout=120)
        timing["virsh start"] = time.monotonic() - t4
        run.after_start = vifs(uplink)
        t5 = time.monotonic()
        run.console = _wait_for_summary(d / "serial.log", names["domain"], BOOT_TIMEOUT).replace("\r", "")
        t6 = time.monotonic()
        run.after_checks = vifs(uplink)
        virsh("destroy", names["domain"])
        timing["virsh destroy"] = time.monotonic() - t6
        run.after_destroy = vifs(uplink)
        run.leases = (d / "leases").read_text() if (d / "leases").exists() else ""
        server.stdin.close()
        reader.join(60)
        run.dnsmasq_log = (d / "dnsmasq.log").read_text(errors="replace")
    t7 = time.monotonic()
    for line in run.console.splitlines():
        if m := vm.RESULT.match(line.strip()):
            run.results[m[1]] = (m[2], m[3])
        elif m := vm.MEASURE.match(line.strip()):
            run.measures[m[1]] = m[2]
        elif m := vm.SUMMARY.match(line.strip()):
            run.summary = tuple(int(v) for v in m.groups())
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in timing.items())
    vm._say(request, f"qemu tier (libvirt): image {t1 - t0:.1f}s ({'cached' if cached else 'built'}), fabric and"
                     f" attachments {t2 - t1:.1f}s, libvirt with the hook {t3 - t2:.1f}s ({run.daemon}), {steps},"
                     f" boot + guest checks {t6 - t5:.1f}s, teardown {t7 - t6:.1f}s, total {t7 - t0:.1f}s")
    if run.measures:
        vm._say(request, "qemu tier (libvirt): measured in the guest: "
                         + ", ".join(f"{k} {v}" for k, v in run.measures.items()))
    if run.results.get("vm::setup", ("",))[0] == "FAIL":
        pytest.fail(f"qemu tier (libvirt): guest setup failed: {run.results['vm::setup'][1]}\n{run.tail()}",
                    pytrace=False)
    return run


def test_the_hook_registered_the_guests_vif_when_the_domain_started(lv):
    got = lv.after_start
    assert MAC in got, f"no VIF for {MAC} on {lv.names['uplink']} after virsh start: {got}"
    assert not got[MAC]["learned"] and got[MAC]["vlan"] == 0, got[MAC]
    assert got[MAC]["qpn"] != lv.uplink["qpn"], "the guest's VIF has the uplink's QPN"
    assert lv.uplink["vifs"]["learn_max"] == 0, f"the uplink learns VIFs: {lv.uplink['vifs']}"
    assert lv.after_checks.get(MAC, {}).get("qpn") == got[MAC]["qpn"], (got, lv.after_checks)


def test_a_nic_the_hook_cannot_serve_fails_virsh_start_with_the_hooks_line(lv):
    r = lv.refused
    assert r.returncode != 0, f"virsh start of a domain with a VLAN trunk on our bridge succeeded: {r.stdout}"
    assert "xdpoib-libvirt-hook: prepare begin:" in r.stderr and "VLAN trunk (2 tags)" in r.stderr, r.stderr
    assert TRUNK_MAC not in lv.after_refused, lv.after_refused


def test_guest_reported_a_clean_summary(lv):
    assert lv.summary is not None, f"no XDPOIB-SUMMARY line: the guest died early; console tail:\n{lv.tail()}"
    _passed, failed, skipped, total, _exit = lv.summary
    failures = {k: v[1] for k, v in lv.results.items() if v[0] != "PASS"}
    assert failed == 0 and skipped == 0 and not failures, f"guest failures: {failures}"
    assert total == len(lv.results) == len(vm.CHECKS), sorted(lv.results)


@pytest.mark.parametrize("check", vm.CHECKS)
def test_guest_check(lv, check):
    got = lv.results.get(f"vm::{WAY}::{check}")
    assert got, f"missing result line for vm::{WAY}::{check}; console tail:\n{lv.tail()}"
    assert got[0] == "PASS", f"vm::{WAY}::{check}: {got[0]} {got[1]}\nVIFs after the checks: {lv.after_checks}"


def test_the_lease_is_dnsmasqs_under_the_guests_client_id(lv):
    address = lv.detail("dhcp_lease").get("address")
    assert address, "the guest reported no lease"
    leases = {ln.split()[2]: ln.split() for ln in lv.leases.splitlines() if len(ln.split()) >= 5}
    assert address in leases, f"{address} is not among dnsmasq's leases: {lv.leases!r}\n{lv.dnsmasq_log[-1500:]}"
    cid = client_id_for_mac(bytes.fromhex(MAC.replace(":", ""))).hex(":")
    assert leases[address][1] == "20-" and leases[address][4] == cid, leases[address]


def _served(lv, direction: str) -> dict:
    address = lv.detail("dhcp_lease").get("address")
    got = [e for e in lv.served if e["peer"] == address and e["way"] == direction]
    assert len(got) == 1, f"the remote served {len(got)} {direction} connections from {address}: {lv.served}"
    return got[0]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_tcp_payload_is_the_same_on_both_ends(lv, direction):
    guest = lv.detail(f"tcp_{direction}")
    assert guest, f"the guest reported no tcp_{direction}"
    served = _served(lv, direction)
    assert served["error"] is None, served
    assert int(guest["bytes"]) == served["bytes"] == vm.BYTES, (guest, served)
    assert guest["sha256"] == served["sha256"], f"payload differs: guest {guest['sha256']}, remote {served['sha256']}"


def test_the_remote_sees_the_vifs_qpn(lv):
    served = _served(lv, "up")
    snap = served["snapshot"]
    assert "error" not in snap, snap
    peer = [p for p in snap["peers"] if p["remac"] == served["lladdr"]]
    assert len(peer) == 1, f"no peer with REMAC {served['lladdr']} at the remote: {snap['peers']}"
    assert MAC in snap["vifs"], f"the guest was not a VIF during the upload: {snap['vifs']}"
    assert peer[0]["qpn"] == snap["vifs"][MAC]["qpn"], (peer[0], snap["vifs"][MAC])


def test_virsh_destroy_released_the_vif(lv):
    assert MAC in lv.after_checks, f"the VIF was gone before virsh destroy: {lv.after_checks}"
    assert MAC not in lv.after_destroy, f"the VIF is still there after virsh destroy: {lv.after_destroy}"
    assert [v["id"] for v in lv.after_destroy.values()] == [0], lv.after_destroy
