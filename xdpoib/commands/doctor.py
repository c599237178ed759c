"""`xdpoib doctor`: check every prerequisite of an attachment on this host, one line each.

Each check prints `ok|warn|FAIL  WHAT  DETAIL` and, unless it passed, `— what to do`. The checks, in
order: root, bpffs, kernel headers for bcc, bcc, XDP on veth (a throwaway veth pair with a 2-instruction
XDP_PASS program attached natively; it also measures the MTU limit veth puts on XDP), the largest socket
receive buffer an application may ask for (net.core.rmem_max: a datagram xdpoib delivers takes a page
of it, docs/operations.md), the fabric's
management access (a umad device for --device, ibsim for --sim), the SM (our port's SM LID answers an SA
query), the port's state, its P_Key table, and the MTU eth4 would get. A check that cannot run because an
earlier one failed says so as a warning. The exit status is 1 if any check failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from xdpoib.errors import UsageError, XdpoibError

NAME = "doctor"
HELP = "check this host's prerequisites (root, bpffs, headers, XDP, socket buffers, fabric, SM, port, P_Key, MTU)"
EPILOG = """examples:
  xdpoib doctor                       the host only (root, bpffs, headers, bcc, XDP on veth)
  xdpoib doctor --device mlx5_0       and HCA port mlx5_0/1: umad, SM, port state, P_Key table, MTU
  xdpoib doctor --sim lab:h1 --pkey 0x8003
  xdpoib doctor -j                    JSON: [{"status", "what", "detail", "fix"}, ...]
"""

ROOT = False            # anyone may ask; being root is one of the checks
OK, WARN, FAIL = "ok", "warn", "FAIL"
WHAT_WIDTH = 14
XDP_PASS_PROGRAM = bytes.fromhex("b700000002000000" "9500000000000000")    # r0 = XDP_PASS; exit
BPF_PROG_TYPE_XDP = 6
XDP_ATTACHED_DRV = 1
SA_POLICY = {"timeout": 0.2, "max_timeout": 1.0, "retries": 4, "deadline": 3.0}
PORT_STATES = {1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE"}


@dataclass
class Check:
    """The outcome of one check: `status` is ok, warn or FAIL; `fix` says what to do unless it passed."""

    status: str
    what: str
    detail: str
    fix: str = ""


def format_check(c: Check) -> str:
    """One output line: `STATUS  WHAT  DETAIL  — FIX` (no fix on a passed check)."""
    line = f"{c.status:<4}  {c.what:<{WHAT_WIDTH}}  {c.detail}"
    return f"{line}  — {c.fix}" if c.fix and c.status != OK else line


def exit_status(checks: list[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail)."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def configure(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--device", metavar="DEV", help="HCA device to check (e.g. mlx5_0)")
    src.add_argument("--sim", metavar="FABRIC:HOST", help="a host of a simulated fabric (`xdpoib sim up`)")
    p.add_argument("--port", type=int, metavar="N", help="HCA port with --device (default 1)")
    p.add_argument("--pkey", default="0xffff", metavar="PKEY", help="partition to check (default 0xffff)")
    p.add_argument("-j", "--json", action="store_true", help="JSON output")


# ================================================================================ host checks

def check_root(euid: int) -> Check:
    if euid == 0:
        return Check(OK, "root", "running as root")
    return Check(FAIL, "root", f"running as uid {euid}", "run as root: attach needs links, XDP, bpffs and umad")


def check_bpffs(mounts: str, where: str = "/sys/fs/bpf") -> Check:
    """bpffs mounted at `where`, from /proc/mounts text."""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == where and parts[2] == "bpf":
            return Check(OK, "bpffs", f"mounted at {where}")
    return Check(FAIL, "bpffs", f"no bpf filesystem at {where}",
                 f"mount -t bpf bpf {where} (`make setup` does it)")


def check_headers(release: str, modules: Path = Path("/lib/modules")) -> Check:
    """Kernel headers where bcc looks: /lib/modules/RELEASE/{build,source}/include."""
    kdir = modules / release
    for sub in ("build", "source"):
        d = kdir / sub
        if (d / "include").is_dir():
            real = d.resolve()
            note = "" if release in real.name else " (not the running kernel's version)"
            return Check(OK, "kernel headers", f"{d} -> {real}{note}")
    return Check(FAIL, "kernel headers", f"none under {kdir}/build or {kdir}/source",
                 f"install the headers of kernel {release} (linux-headers-{release}), or run `make setup`, "
                 "which links Debian's linux-headers-amd64")


def check_bcc() -> Check:
    import importlib.util

    spec = importlib.util.find_spec("bcc")
    if spec is not None:
        return Check(OK, "bcc", f"importable ({Path(spec.origin).parent})")
    return Check(FAIL, "bcc", f"not importable by {sys.executable}",
                 "apt install python3-bpfcc and use a venv made with --system-site-packages from /usr/bin/python3 "
                 "(`make setup`)")


RMEM_WANTED = 4 << 20    # bytes of receive buffer an application should be able to ask for
DATAGRAM_CHARGE = 4240   # bytes of receive buffer a small datagram through xdpoib takes (measured: 50 in 212992)


def check_socket_buffers(rmem_max: int | None, rmem_default: int | None) -> Check:
    """Whether applications can give their sockets room for bursts of small datagrams: each datagram the
    datapath delivers is charged a page of receive buffer (docs/operations.md), so the default buffer
    holds ~50 of them; an application may ask for up to net.core.rmem_max."""
    what = "socket buffers"
    if rmem_max is None or rmem_default is None:
        return Check(WARN, what, "net.core.rmem_max/rmem_default unreadable", "check /proc/sys/net/core")
    detail = (f"net.core.rmem_max {rmem_max}, rmem_default {rmem_default} (~{rmem_default // DATAGRAM_CHARGE} "
              f"small datagrams by default, ~{2 * rmem_max // DATAGRAM_CHARGE} when a socket asks for the most)")
    if rmem_max >= RMEM_WANTED:
        return Check(OK, what, detail)
    return Check(WARN, what, detail,
                 f"sysctl -w net.core.rmem_max={RMEM_WANTED} (in /etc/sysctl.d to keep it): a datagram xdpoib "
                 "delivers takes a page of the receiving socket's buffer, so applications that receive small UDP "
                 "datagrams fast need to ask for more (SO_RCVBUF; docs/operations.md)")


def _ip_json(ifname: str) -> dict:
    out = subprocess.run(["ip", "-d", "-j", "link", "show", "dev", ifname], capture_output=True, text=True,
                         timeout=10)
    return json.loads(out.stdout)[0] if out.returncode == 0 and out.stdout.strip() else {}


def check_xdp_veth() -> tuple[Check, int | None]:
    """Attach a no-op XDP program natively to one end of a throwaway veth pair, then delete the pair.

    Returns the check and the largest MTU the kernel then allows on the other end (veth without a
    multi-buffer program), or None.
    """
    what = "XDP on veth"
    from xdpoib import link
    from xdpoib.datapath import bpfsys

    fd, _log = bpfsys.prog_load_log(BPF_PROG_TYPE_XDP, XDP_PASS_PROGRAM, "xdpoib_doctor")
    if fd < 0:
        return Check(FAIL, what, f"the kernel refuses to load an XDP program: {os.strerror(-fd)}",
                     "use a kernel with BPF and XDP (CONFIG_BPF_SYSCALL, CONFIG_XDP_SOCKETS)"), None
    tag = f"{os.getpid() & 0xFFFFFF:06x}"
    a, b = f"xddoc{tag}a", f"xddoc{tag}b"
    try:
        link.create_veth(b, a, None)
        link.attach_xdp(a, fd)
        mode = (_ip_json(a).get("xdp") or {}).get("mode")
        limit = _ip_json(b).get("max_mtu")
        if mode != XDP_ATTACHED_DRV:
            return Check(FAIL, what, f"attached in mode {mode}, not native",
                         "use a kernel whose veth driver supports native XDP (>= 4.19)"), None
        return Check(OK, what, f"native XDP attached and removed on a throwaway veth pair ({a}/{b}); "
                               f"XDP limits the peer's MTU to {limit}"), limit
    except XdpoibError as e:
        return Check(FAIL, what, str(e), "check that veth is available (modprobe veth) and XDP is enabled"), None
    finally:
        with contextlib.suppress(XdpoibError):
            link.delete_link(a)
        os.close(fd)


# ================================================================================ fabric checks

class _Fabric:
    """An SA client on the checked port: for --sim a child process that is the host's umad client, for
    --device an SAClient over that HCA's umad port. `port()`, `class_port_info()`, `group(mgid)`."""

    def __init__(self, client, label: str):
        self.client, self.label = client, label

    @classmethod
    def open_sim(cls, fab, host: str) -> _Fabric:
        if fab.running():
            c = fab.sa_client(host)         # counts ibsim's free client slots first
        else:                               # without OpenSM the fabric refuses: be the host's client anyway
            from xdpoib.fabric.sa import RemoteSAClient

            c = RemoteSAClient(fab.client_env(host), cwd=fab.client_cwd(host))
        try:
            c.set_policy(**SA_POLICY)
        except BaseException:
            c.close()
            raise
        return cls(c, f"{fab.name}:{host}")

    @classmethod
    def open_device(cls, device: str, port: int) -> _Fabric:
        from xdpoib.fabric.sa import RetryPolicy, SAClient

        return cls(SAClient.open(device, port, policy=RetryPolicy(**SA_POLICY)), f"{device}/{port}")

    def __getattr__(self, name):
        return getattr(self.client, name)

    def close(self) -> None:
        self.client.close()


def ibsim_listening(sockname: str, unix: Path = Path("/proc/net/unix")) -> bool:
    """Whether an ibsim listens on the abstract control socket of IBSIM_SOCKNAME `sockname`."""
    try:
        names = [ln.split()[-1] for ln in unix.read_text().splitlines()[1:] if len(ln.split()) >= 8]
    except OSError:
        return False
    return any(n.startswith(f"@{sockname}:ctl") for n in names)


def check_sim(spec: str) -> tuple[Check, object | None, str | None]:
    """The simulated fabric FABRIC:HOST: ibsim and OpenSM running, the host known, umad2sim installed."""
    what = "fabric"
    fabric, _, host = spec.partition(":")
    from xdpoib.fabric.simfabric import SimFabric, umad2sim_path

    try:
        umad2sim_path()
        fab = SimFabric.attach(fabric)
        fab.host(host)
    except XdpoibError as e:
        fix = f"start it: xdpoib sim up {fabric}" if "no fabric named" in str(e) else (
            "apt install libumad2sim0" if "umad2sim" in str(e) else "name one of the hosts listed")
        return Check(FAIL, what, str(e), fix), None, None
    restart = f"restart it: xdpoib sim down {fabric}; xdpoib sim up {fabric}"
    if not ibsim_listening(fab.sockname):
        return Check(FAIL, what, f"the ibsim of fabric {fabric!r} is not listening", restart), None, None
    if not fab.running():           # ibsim is there: the SM check below says whether an SM answers
        return Check(WARN, what, f"fabric {fabric!r}: ibsim runs, its OpenSM does not", restart), fab, host
    return Check(OK, what, f"sim fabric {fabric!r} running (ibsim, OpenSM), host {host} "
                           f"(node {fab.host(host).nodeid!r})"), fab, host


def check_device(device: str, port: int, sysfs: Path = Path("/sys/class")) -> Check:
    """The HCA exists, has the port, and a umad device serves it (ib_umad)."""
    what = "umad device"
    if not (sysfs / "infiniband" / device).exists():
        found = sorted(p.name for p in (sysfs / "infiniband").glob("*")) if (sysfs / "infiniband").is_dir() else []
        return Check(FAIL, what, f"no RDMA device {device!r} (devices: {', '.join(found) or 'none'})",
                     "check the HCA driver (ibv_devices, modprobe mlx5_ib), or use --sim FABRIC:HOST")
    if not (sysfs / "infiniband" / device / "ports" / str(port)).exists():
        return Check(FAIL, what, f"{device} has no port {port}", f"ls /sys/class/infiniband/{device}/ports")
    for mad in sorted((sysfs / "infiniband_mad").glob("umad*")):
        try:
            ibdev, num = (mad / "ibdev").read_text().strip(), int((mad / "port").read_text())
        except (OSError, ValueError):
            continue
        if ibdev == device and num == port:
            dev = Path("/dev/infiniband") / mad.name
            if not dev.exists():
                return Check(FAIL, what, f"{dev} is missing", "check udev rules for /dev/infiniband (rdma-core)")
            return Check(OK, what, f"{dev} serves {device}/{port}")
    return Check(FAIL, what, f"no umad device for {device}/{port}", "modprobe ib_umad (rdma-core loads it)")


def check_sm(fab: _Fabric) -> tuple[Check, object | None]:
    """Our port knows an SM LID, and the SA there answers a ClassPortInfo Get."""
    what = "SM"
    try:
        port = fab.port()
    except XdpoibError as e:
        return Check(FAIL, what, f"cannot read port {fab.label}: {e}", "check the port with ibstat"), None
    if not port.sm_lid:
        return Check(FAIL, what, f"port {fab.label} knows no SM (SM LID 0)",
                     "start an SM on the fabric (opensm) or check the link (ibstat)"), port
    try:
        fab.class_port_info()
    except XdpoibError as e:
        return Check(FAIL, what, f"the SA at LID {port.sm_lid} does not answer: {e}",
                     "check that the SM runs (systemctl status opensm; saquery -s) and the port's link"), port
    return Check(OK, what, f"the SA at LID {port.sm_lid} answers (ClassPortInfo)"), port


def check_port(port, label: str) -> Check:
    state = PORT_STATES.get(port.state, str(port.state))
    if port.state == 4:
        return Check(OK, "port", f"{label} {state}, LID {port.lid}")
    return Check(FAIL, "port", f"{label} is {state} (LID {port.lid})",
                 "check the cable and the switch port, and that an SM configured it (ibstat)")


def check_pkey(port, pkey: int) -> Check:
    table = " ".join(f"{p:#06x}" for p in port.pkeys if p & 0x7FFF) or "empty"
    if port.has_pkey(pkey):
        return Check(OK, "P_Key", f"{pkey:#06x} at index {port.pkey_index(pkey)} of the port's table ({table})")
    return Check(FAIL, "P_Key", f"{pkey:#06x} is not in the port's P_Key table ({table})",
                 "add the port to the partition in the SM's partitions.conf (e.g. P8003=0x8003, ipoib : "
                 "<port GUID>=full;), or attach with --pkey of a listed partition")


def check_mtu(group, port, mgid: str, veth_limit: int | None) -> Check:
    """The MTU eth4 would get: the broadcast group's IB MTU - 4, bounded by the port and by veth's XDP limit."""
    what = "MTU"
    if group is None:
        return Check(FAIL, what, f"no broadcast group {mgid}",
                     "mark the partition `ipoib` in the SM's partitions.conf (OpenSM then creates the group)")
    port_mtu = 128 << port.active_mtu if port.active_mtu else 0
    if port_mtu and group.mtu_bytes > port_mtu:
        return Check(FAIL, what, f"the broadcast group's IB MTU {group.mtu_bytes} is above the port's active "
                                 f"MTU {port_mtu}", "lower the partition's mtu= in partitions.conf, or fix the link")
    eth = group.mtu_bytes - 4
    detail = f"eth MTU {eth} (broadcast group {mgid}: IB MTU {group.mtu_bytes}; port active MTU {port_mtu})"
    if veth_limit and eth > veth_limit:
        return Check(WARN, what, f"{detail}, but veth with XDP allows at most {veth_limit} here",
                     "veth mode clamps eth4's MTU below that (larger frames are answered with ICMP); "
                     "tap mode is not limited")
    return Check(OK, what, detail)


# ================================================================================ the command

def _not_checked(what: str, why: str) -> Check:
    return Check(WARN, what, f"not checked: {why}")


def _fabric_checks(args, pkey: int, veth_limit: int | None):
    """Yield the fabric's checks (management access, SM, port, P_Key, MTU)."""
    from xdpoib.fabric.base import gid_str
    from xdpoib.wire.mgid import broadcast_mgid

    later = ("SM", "port", "P_Key", "MTU")
    if args.sim:
        c, fab, host = check_sim(args.sim)
        yield c
        if c.status == FAIL:
            yield from (_not_checked(w, "no fabric") for w in later)
            return
        try:
            probe = _Fabric.open_sim(fab, host)
        except XdpoibError as e:
            yield Check(FAIL, "SM", f"cannot start an SA client as {host}: {e}", "free an ibsim slot or restart it")
            yield from (_not_checked(w, "no SA client") for w in later[1:])
            return
    else:
        port_num = args.port or 1
        c = check_device(args.device, port_num)
        yield c
        if c.status == FAIL:
            yield from (_not_checked(w, "no umad device") for w in later)
            return
        try:
            probe = _Fabric.open_device(args.device, port_num)
        except XdpoibError as e:
            yield Check(FAIL, "SM", f"cannot open {args.device}/{port_num}: {e}", "check libibumad3 and ib_umad")
            yield from (_not_checked(w, "no SA client") for w in later[1:])
            return
    try:
        c, port = check_sm(probe)
        yield c
        if port is None:
            yield from (_not_checked(w, "the port cannot be read") for w in later[1:])
            return
        yield check_port(port, probe.label)
        c_pkey = check_pkey(port, pkey)
        yield c_pkey
        mgid = broadcast_mgid(pkey)
        if c.status == FAIL or c_pkey.status == FAIL:
            yield _not_checked("MTU", "no SA" if c.status == FAIL else f"the port is not in partition {pkey:#06x}")
            return
        try:
            group = probe.group(mgid)
        except XdpoibError as e:
            yield Check(FAIL, "MTU", f"cannot read the broadcast group {gid_str(mgid)}: {e}", "see the SM line")
            return
        yield check_mtu(group, port, gid_str(mgid), veth_limit)
    finally:
        probe.close()


def checks(args):
    """Yield every check's outcome, in order (each as soon as it is known)."""
    from xdpoib.wire.mgid import parse_pkey

    try:
        pkey = parse_pkey(args.pkey)
    except XdpoibError as e:
        raise UsageError(f"bad --pkey: {e}") from None
    if args.sim:
        fabric, sep, host = args.sim.partition(":")
        if not sep or not fabric or not host:
            raise UsageError(f"bad --sim {args.sim!r}: expected FABRIC:HOST, e.g. lab:h1")
        if args.port is not None:
            raise UsageError("--port applies to --device; a sim host has one port")
    elif args.port is not None and not args.device:
        raise UsageError("--port applies to --device")
    root = os.geteuid() == 0
    yield check_root(os.geteuid())
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        mounts = ""
    yield check_bpffs(mounts)
    yield check_headers(os.uname().release)
    yield check_bcc()
    veth_limit = None
    if not root:
        yield _not_checked("XDP on veth", "needs root")
    elif shutil.which("ip") is None:
        yield Check(FAIL, "XDP on veth", "no `ip` command", "apt install iproute2")
    else:
        c, veth_limit = check_xdp_veth()
        yield c
    from xdpoib.link import read_sysctl

    yield check_socket_buffers(read_sysctl("net.core.rmem_max"), read_sysctl("net.core.rmem_default"))
    if not (args.sim or args.device):
        found = sorted(p.name for p in Path("/sys/class/infiniband").glob("*"))
        hint = f"RDMA devices here: {', '.join(found)}" if found else "no RDMA device here"
        yield _not_checked("fabric", f"give --device DEV or --sim FABRIC:HOST ({hint})")
        return
    if not root:
        yield from (_not_checked(w, "needs root") for w in ("fabric", "SM", "port", "P_Key", "MTU"))
        return
    yield from _fabric_checks(args, pkey, veth_limit)


def run(args) -> int:
    results = []
    for c in checks(args):
        results.append(c)
        if not args.json:
            print(format_check(c), flush=True)
    if args.json:
        print(json.dumps([asdict(c) for c in results], indent=2))
    return exit_status(results)
