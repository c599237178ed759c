"""`xdpoib sim`: start, inspect, fault and stop a simulated fabric (ibsim + OpenSM, no HCA needed)."""

from __future__ import annotations

import json
import shlex

NAME = "sim"
HELP = "simulated InfiniBand fabric for tests and demos: ibsim with a real OpenSM"
EPILOG = """examples:
  xdpoib sim up lab --hosts 3                start ibsim + OpenSM; prints each host's port GUID
  xdpoib sim up lab --partitions parts.conf  use your own OpenSM partitions file
  xdpoib sim up lab --hosts 3 --standby-sm h3  a standby OpenSM on h3's port (kill the master: it takes over)
  xdpoib sim show lab --json                 hosts, GUIDs, LIDs and PIDs
  eval "$(xdpoib sim env lab h1)"; saquery   become host h1's umad client in this shell
  xdpoib sim fault lab unlink h2 --wait      take h2's port down, until OpenSM noticed (relink undoes)
  xdpoib sim fault lab drop h1 50            lose 50% of the MADs sent to h1 (0 restores)
  xdpoib sim native lab h2 --ip 10.0.0.2/24  a native IPoIB host (like Linux ib0) on h2; type
                                             "ping 10.0.0.1", "udp 10.0.0.1 7 hi", "neighbors", "quit"
  xdpoib sim native lab h3 --dhcp --json     its address by DHCP (RFC 4390); JSON lines in and out
  xdpoib sim native lab h2 --ip 10.0.0.2/24 --serve </dev/null &
                                             the same, as a responder in the background
  xdpoib sim down lab                        stop everything by PID and remove its files
"""


def configure(p):
    """Add the sim actions: up, down, show, env, fault, native."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start a fabric")
    up.add_argument("name")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts h1..hN (default 2, at most 8)")
    up.add_argument("--partitions", metavar="FILE", help="OpenSM partitions file (default: the default "
                    "partition plus 0x8003 without the last host)")
    up.add_argument("--standby-sm", metavar="HOST", help="also run a standby OpenSM (lower priority) on HOST's "
                    "port; it takes over within about a second when the master dies")
    up.add_argument("-j", "--json", action="store_true", help="print JSON")
    down = sub.add_parser("down", help="stop a fabric and remove its files")
    down.add_argument("name")
    show = sub.add_parser("show", help="describe a running fabric")
    show.add_argument("name")
    show.add_argument("-j", "--json", action="store_true", help="print JSON")
    env = sub.add_parser("env", help="print the shell exports that make a process a host's umad client")
    env.add_argument("name")
    env.add_argument("host")
    fault = sub.add_parser("fault", help="unlink|relink HOST, or drop HOST PERCENT")
    fault.add_argument("name")
    fault.add_argument("kind", choices=("unlink", "relink", "drop"))
    fault.add_argument("host")
    fault.add_argument("percent", nargs="?", type=int, help="for drop: 0..100")
    fault.add_argument("--wait", action="store_true",
                       help="unlink/relink: return once the SM has (un)routed the host")
    native = sub.add_parser("native", help="run a native IPoIB host (like Linux ib0, not xdpoib) on HOST; "
                            "it prints what it receives and takes requests on stdin")
    native.add_argument("name")
    native.add_argument("host")
    native.add_argument("--ip", metavar="ADDR/LEN", help="IPv4 address")
    native.add_argument("--ip6", metavar="ADDR/LEN", action="append", default=[],
                        help="IPv6 address besides the link-local one (repeatable)")
    native.add_argument("--dhcp", action="store_true", help="get the IPv4 address by DHCP (RFC 4390)")
    native.add_argument("--pkey", default="0xffff", help="partition (default 0xffff)")
    native.add_argument("--echo-port", type=int, default=7, help="UDP echo port (default 7)")
    native.add_argument("-j", "--json", action="store_true", help="JSON lines in and out (for programs)")
    native.add_argument("--serve", action="store_true", help="keep running when input ends (until Ctrl-C)")


def _summary(fab, live: bool) -> dict:
    extra = {"clients": fab.clients()} if live else {}
    return {**extra, "name": fab.name, "sockname": fab.sockname, "workdir": str(fab.workdir),
            "pids": {k: v[0] for k, v in fab.state["pids"].items()}, "standby_sm": fab.standby,
            "hosts": [{"name": h.name, "guid": f"{h.guid:#018x}", "nodeid": h.nodeid, "node_desc": h.node_desc,
                       **({"lid": fab.lid(h)} if live else {})} for h in fab.hosts]}


def run(args) -> int:
    """Carry out one sim action."""
    from xdpoib.errors import UsageError
    from xdpoib.fabric.simfabric import SimFabric

    if args.action == "up":
        fab = SimFabric.up(args.name, hosts=args.hosts, partitions=args.partitions, standby=args.standby_sm)
        if args.json:
            print(json.dumps(_summary(fab, False), indent=1))
        else:
            print(fab.describe())
            print(f'  be a host: eval "$(xdpoib sim env {fab.name} h1)"; stop: xdpoib sim down {fab.name}')
        return 0
    fab = SimFabric.attach(args.name)
    if args.action == "native":
        return _native(fab, args)
    if args.action == "down":
        fab.down()
        print(f"fabric {args.name} is down")
    elif args.action == "show":
        if args.json:
            print(json.dumps(_summary(fab, True), indent=1))
        else:
            print(fab.describe())
            for c in fab.clients():
                print(f"  ibsim client {c['slot']}: pid {c['pid']} on {c['nodeid']} (LID {c['lid']})"
                      + (" SM" if c["sm"] else ""))
    elif args.action == "env":
        for k, v in fab.client_env(args.host).items():
            print(f"export {k}={shlex.quote(v)}")
        print(f"cd {shlex.quote(fab.client_cwd(args.host))}")
    elif args.kind == "drop":
        if args.percent is None:
            raise UsageError("drop needs a PERCENT (0..100)")
        fab.drop(args.host, args.percent)
    else:
        if args.percent is not None:
            raise UsageError(f"{args.kind} takes no PERCENT")
        getattr(fab, args.kind)(args.host, wait=args.wait)
    return 0


def _native(fab, args) -> int:
    """Run `python -m xdpoib.native` as the host's umad client, in the foreground (stdin and stdout are
    its own); SIGINT and SIGTERM are passed on, so it leaves the fabric before exiting."""
    import signal
    import sys

    from xdpoib.errors import UsageError

    fab.host(args.host)                                 # a clear error for a host that does not exist
    try:
        int(args.pkey, 16)
    except ValueError:
        raise UsageError(f"bad --pkey {args.pkey!r} (hex, such as 0xffff or 0x8003)") from None
    argv = [sys.executable, "-m", "xdpoib.native", "--fabric", fab.name, "--pkey", args.pkey,
            "--echo-port", str(args.echo_port)]
    argv += ["--ip", args.ip] if args.ip else []
    for a in args.ip6:
        argv += ["--ip6", a]
    argv += ["--dhcp"] if args.dhcp else []
    argv += ["--json"] if args.json else []
    argv += ["--serve"] if args.serve else []
    child = fab.spawn(args.host, argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    return child.wait()
