"""`xdpoib attach`: give a host an Ethernet interface whose traffic crosses the fabric as IPoIB."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from xdpoib import state
from xdpoib.errors import UsageError, XdpoibError

NAME = "attach"
HELP = "attach an Ethernet interface to the InfiniBand fabric (starts its agent)"
EPILOG = """examples:
  xdpoib attach eth4 --sim lab:h1                 eth4 in this namespace, host h1 of sim fabric 'lab'
  xdpoib attach eth4 --netns blue --sim lab:h2    eth4 created inside netns 'blue'
  xdpoib attach eth4 --device mlx5_0 --port 1 --pkey 0x8003
  xdpoib attach tap0 --mode tap --device mlx5_0   a VM's existing TAP
  xdpoib attach eth4 --sim lab:h1 --learn-vifs 8  up to 8 guests behind a bridge on eth4, each its own QPN
  xdpoib attach eth4 --sim lab:h1 --vlan 3:0x8003 eth4.3 (VLAN 3) is partition 0x8003
  xdpoib attach eth4 --device mlx5_0 --mac-form mellanox   eth4's MAC in the Mellanox form (iPXE's)
  xdpoib attach --ebpf                            print the BPF C the agent compiles, and exit
"""
ROOT = "it creates links, loads XDP programs and opens the fabric's umad port"
READY_TIMEOUT = 60.0
AGENT_UMASK = 0o077         # what the agent writes (state file, log) is root-only


def ebpf_text() -> str:
    """The BPF C an agent compiles (bpf/xdpoib.c with bpf/include/ inlined, as bcc is given it), headed
    by the compiler flags of the production build."""
    from xdpoib.datapath import loader

    flags = " ".join(loader.production_build().cflags())
    return (f"/* xdpoib datapath: {loader.MAIN.name} with its local headers inlined, as bcc compiles it\n"
            f" * cflags: {flags}\n */\n{loader.source()}")


class _PrintEbpf(argparse.Action):
    """`--ebpf`: print the generated BPF C and exit, before anything else is checked (as bcc's tools do)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(ebpf_text())
        sys.stdout.flush()
        parser.exit(0)


def configure(p):
    p.add_argument("ifname", metavar="IFNAME", help="the Ethernet interface to create (veth) or use (tap)")
    p.add_argument("--netns", metavar="NS", help="network namespace of IFNAME (default: this one)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--device", metavar="DEV", help="HCA device (e.g. mlx5_0), verbs backend")
    src.add_argument("--sim", metavar="FABRIC:HOST", help="a host of a simulated fabric (`xdpoib sim up`)")
    p.add_argument("--port", type=int, metavar="N", help="HCA port, with --device (default 1)")
    p.add_argument("--pkey", default="0xffff", metavar="PKEY", help="partition (default 0xffff)")
    p.add_argument("--mode", choices=("veth", "tap"), default="veth",
                   help="veth: create IFNAME as a veth end (default); tap: use an existing TAP")
    p.add_argument("--vlan", action="append", default=[], metavar="VID:PKEY",
                   help="map 802.1Q VLAN VID on IFNAME to partition PKEY (repeatable; untagged is --pkey)")
    p.add_argument("--learn-vifs", type=int, default=0, metavar="N",
                   help="learn up to N guest MACs behind IFNAME from their first frames, each its own QP "
                        "(default 0: only IFNAME's MAC and `xdpoib vif add`; other sources are dropped)")
    p.add_argument("--vif-idle", type=float, default=300.0, metavar="SECONDS",
                   help="release a learned VIF idle this long (default 300; 0: never)")
    p.add_argument("--mac-form", choices=("lemac", "mellanox"), default="lemac",
                   help="IFNAME's MAC from the port GUID: lemac, GUID bytes 0,1,2,5,6,7 as eIPoIB (default); "
                        "mellanox, the Mellanox form of iPXE (00 or 02, then GUID bytes 1,2,5,6,7)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="wait this long for the partition and its broadcast group, which the SM may not have "
                        "created yet (retried after 1 s, doubling to 16 s, as Linux ipoib; default 60, 0: no wait)")
    p.add_argument("--ebpf", action=_PrintEbpf, help="print the BPF C the agent compiles and exit (attaches nothing)")
    p.add_argument("--force", action="store_true", help="replace an existing attachment of IFNAME")
    p.add_argument("-j", "--json", action="store_true", help="print the result as JSON")


def build_spec(args) -> state.AttachSpec:
    """Validate everything that can be checked before changing anything, and return the spec."""
    from xdpoib import link
    from xdpoib.wire.mgid import parse_pkey

    if args.sim and args.port is not None:
        raise UsageError("--port applies to --device: a sim host has one port (drop --port)")
    link.check_ifname(args.ifname)
    if args.mode == "tap" and args.netns:
        raise UsageError("tap mode uses a TAP in the agent's (root) namespace, where the VM's TAP lives; "
                         "drop --netns")
    try:
        pkey = parse_pkey(args.pkey)
    except XdpoibError as e:
        raise UsageError(f"bad --pkey: {e}") from None
    link.check_netns(args.netns)
    if not 0 <= args.learn_vifs <= 1023:
        raise UsageError(f"bad --learn-vifs {args.learn_vifs}: 0..1023 (the datapath holds 1024 VIFs)")
    if args.vif_idle < 0:
        raise UsageError(f"bad --vif-idle {args.vif_idle:g}: seconds, 0 for never")
    if not 0 <= args.wait <= 3600:
        raise UsageError(f"bad --wait {args.wait:g}: seconds, 0..3600")
    vlans = parse_vlans(args.vlan, pkey)
    spec = state.AttachSpec(args.ifname, args.netns, args.mode, pkey, port=args.port or 1, vlans=vlans,
                            learn_vifs=args.learn_vifs, vif_idle=args.vif_idle, mac_form=args.mac_form,
                            wait=args.wait)
    if args.sim:
        fabric, sep, host = args.sim.partition(":")
        if not sep or not fabric or not host:
            raise UsageError(f"bad --sim {args.sim!r}: expected FABRIC:HOST, e.g. lab:h1")
        from xdpoib.fabric.simfabric import SimFabric

        fab = SimFabric.attach(fabric)          # raises if it is not running
        fab.host(host)                          # raises if there is no such host
        spec.backend, spec.fabric, spec.host = "sim", fabric, host
    else:
        if not os.path.exists(f"/sys/class/infiniband/{args.device}"):
            raise UsageError(f"no RDMA device {args.device!r} (see `ibv_devices`)")
        spec.backend, spec.device = "verbs", args.device
    if args.mode == "tap" and not (link.link_exists(args.ifname, args.netns)
                                   and link.is_tap(args.ifname, args.netns)):
        raise UsageError(f"{spec.where} is not an existing TAP device (tap mode uses a TAP a VM holds)")
    return spec


def parse_vlans(items: list[str], pkey: int) -> list[list[int]]:
    """`--vlan VID:PKEY` options as [[VID, P_Key], ...], refused (one line) when malformed or ambiguous."""
    from xdpoib.wire.mgid import parse_pkey

    out: list[list[int]] = []
    for item in items:
        vid_s, sep, pkey_s = item.partition(":")
        try:
            vid = int(vid_s)
            p = parse_pkey(pkey_s)
        except (ValueError, XdpoibError):
            raise UsageError(f"bad --vlan {item!r}: expected VID:PKEY, e.g. 3:0x8003") from None
        if not sep or not 1 <= vid <= 4094:
            raise UsageError(f"bad --vlan {item!r}: VID 1..4094, then a P_Key, e.g. 3:0x8003")
        if any(v == vid for v, _ in out):
            raise UsageError(f"--vlan {vid} is given twice")
        if p & 0x7FFF == pkey & 0x7FFF or any(q & 0x7FFF == p & 0x7FFF for _, q in out):
            raise UsageError(f"--vlan {item}: partition {p:#06x} is already mapped (untagged is --pkey {pkey:#06x})")
        out.append([vid, p])
    return out


def check_not_attached(spec: state.AttachSpec, force: bool) -> None:
    """Refuse to attach twice (unless --force, which detaches the old attachment first)."""
    from xdpoib import link

    old = state.read_spec(spec.id)
    if old is not None and state.pid_alive(old.pid):
        if not force:
            raise UsageError(f"{spec.where} is already attached (agent pid {old.pid}); use --force to replace it")
        from xdpoib.commands.detach import detach

        detach(old)
    elif old is not None:        # a dead agent: its links stay, for the new agent to adopt
        state.remove_files(spec.id, keep_state=True)
    if spec.mode == "veth" and link.link_exists(spec.ifname, spec.netns):
        from xdpoib.agent import internal_name

        if not link.link_exists(internal_name(spec)):
            raise UsageError(f"{spec.where} already exists; pick another name or delete it")


def start_agent(spec: state.AttachSpec, keep_log: bool = False) -> int:
    """Start the agent process (root namespace, as the port's umad client); return its pid once ready."""
    from xdpoib import control

    proc = spawn_agent(spec, truncate=not keep_log)
    ready_timeout = READY_TIMEOUT + spec.wait          # bring-up may wait for the SM (--wait)
    deadline = time.monotonic() + ready_timeout
    sock = state.socket_path(spec.id)
    said = set()
    while time.monotonic() < deadline:
        for line in waiting_lines(spec.id):             # what the agent waits for, said once
            if line not in said:
                said.add(line)
                print(f"xdpoib: {spec.where}: {line}", file=sys.stderr, flush=True)
        if proc.poll() is not None:
            why = last_error(spec.id)
            state.remove_files(spec.id, keep_state=True, keep_log=False)   # a refused attach leaves nothing
            raise XdpoibError(f"the agent for {spec.where} failed: {why}")
        if sock.exists():
            try:
                st = control.request(sock, "status", timeout=2.0)
                if st["attachment"]["state"] == "running":
                    return proc.pid
            except control.ControlError:
                pass
        time.sleep(0.1)
    state.stop_pid(proc.pid)
    raise XdpoibError(f"the agent for {spec.where} was not ready after {ready_timeout:.0f} s: "
                      f"{last_error(spec.id)}")


def spawn_agent(spec: state.AttachSpec, successor: bool = False, env: dict | None = None,
                truncate: bool | None = None) -> subprocess.Popen:
    """Start an agent process for spec, its output in the attachment's log (started afresh unless told
    otherwise, and never for a successor: both agents then append to it)."""
    state.ensure_dirs()
    logf = state.open_private(state.log_path(spec.id), truncate=not successor if truncate is None else truncate)
    argv = [sys.executable, "-m", "xdpoib.agent", spec.to_json(), *(["--successor"] if successor else [])]
    try:
        if spec.backend == "sim":
            from xdpoib.fabric.simfabric import SimFabric

            return SimFabric.attach(spec.fabric).spawn(spec.host, argv, stdout=logf, stderr=logf,
                                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                                       umask=AGENT_UMASK, env=env)
        return subprocess.Popen(argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                start_new_session=True, umask=AGENT_UMASK, env=env)
    finally:
        logf.close()


def waiting_lines(aid: str) -> list[str]:
    """The agent log's "waiting for ..." lines (bring-up waits for the partition or its broadcast group)."""
    try:
        text = state.log_path(aid).read_text(errors="replace")
    except OSError:
        return []
    return [ln.split("WARNING ", 1)[-1].split(": ", 1)[0] for ln in text.splitlines() if " waiting for " in ln]


def last_error(aid: str) -> str:
    """The agent log's last error line (or its last line)."""
    try:
        lines = state.log_path(aid).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines[-50:]):
        if "error" in line.lower():
            return line.split("error: ", 1)[-1].strip()
    return lines[-1].strip() if lines else "no log"


def run(args) -> int:
    spec = build_spec(args)
    check_not_attached(spec, args.force)
    start_agent(spec)
    from xdpoib import control

    st = control.request(state.socket_path(spec.id), "status")
    if args.json:
        import json

        print(json.dumps(st, indent=2))
    else:
        e, p = st["eth"], st["port"]
        print(f"{spec.where}: attached, MAC {e['mac']} MTU {e['mtu']} QPN {st['qpn']:#x}, "
              f"port LID {p['lid']} GID {p['gid']}, broadcast {st['broadcast']['mgid']}")
    return 0
