"""`xdpoib vif`: the Ethernet endpoints behind an attachment (guests behind a bridge), each its own QP.

What eIPoIB's `/sys/class/net/eth4/eth/vifs` showed and `ip link set dev eth4 vif ...` changed:
`add` gives a MAC its own UD QP (remote hosts see a distinct QPN per guest), `del` releases it (QP
destroyed, map entries removed), `list` shows them with their QPNs. eth4's own MAC is VIF 0.
"""

from __future__ import annotations

from xdpoib import control, state
from xdpoib.commands._show import dump, table
from xdpoib.errors import UsageError

NAME = "vif"
HELP = "add, delete or list the VIFs (guest MACs with their own QPN) behind an attachment"
ROOT = "the agents' control sockets are root-only"
EPILOG = """examples:
  xdpoib vif add eth4 52:54:00:67:e9:bd            a guest behind the bridge on eth4 gets its own QPN
  xdpoib vif add eth4 52:54:00:67:e9:be --vlan 3   a guest on VLAN 3 (the partition mapped to it)
  xdpoib vif list eth4 -j
  xdpoib vif del eth4 52:54:00:67:e9:bd
"""


def configure(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_ in (("add", "give a MAC its own QP"), ("del", "release a VIF")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("ifname", metavar="IFNAME")
        q.add_argument("mac", metavar="MAC")
        q.add_argument("--netns", metavar="NS", help="network namespace of IFNAME")
        if name == "add":
            q.add_argument("--vlan", type=int, default=0, metavar="VID", help="the VIF's VLAN (default untagged)")
        q.add_argument("-j", "--json", action="store_true", help="JSON output")
    q = sub.add_parser("list", help="the VIFs with their QPNs")
    q.add_argument("ifname", metavar="IFNAME")
    q.add_argument("--netns", metavar="NS", help="network namespace of IFNAME")
    q.add_argument("-j", "--json", action="store_true", help="JSON output")


def ask(ifname: str, netns: str | None, cmd: str, **kw) -> dict:
    """One control request (`vifs`, `vif_add`, `vif_del`) to the agent of an attachment, its answer
    without `ok`: UsageError if IFNAME is not attached, ControlError if its agent is down or refuses."""
    spec = state.find(ifname, netns)
    if not state.pid_alive(spec.pid):
        raise control.ControlError(f"the agent of {spec.where} (pid {spec.pid}) is not running")
    answer = control.request(state.socket_path(spec.id), cmd, **kw)
    answer.pop("ok", None)
    return answer


def _ask(args, cmd: str, **kw) -> dict:
    return ask(args.ifname, args.netns, cmd, **kw)


def run(args) -> int:
    if args.action == "list":
        got = _ask(args, "vifs")
        if args.json:
            dump(got["vifs"])
        else:
            rows = [{**v, "qpn": f"{v['qpn']:#x}", "addresses": " ".join(v["addresses"]) or "-"} for v in got["vifs"]]
            print(table(rows, ["id", "mac", "qpn", "vlan", "learned", "idle_seconds", "addresses"]))
        return 0
    from xdpoib.errors import AddressError
    from xdpoib.wire.addr import parse_mac

    try:
        mac = parse_mac(args.mac)
    except AddressError:
        raise UsageError(f"bad MAC {args.mac!r}: expected six hex bytes, e.g. 52:54:00:67:e9:bd") from None
    from xdpoib.wire.addr import mac_str

    if args.action == "add":
        if not 0 <= args.vlan <= 4094:
            raise UsageError(f"bad --vlan {args.vlan}: 0..4094")
        got = _ask(args, "vif_add", mac=mac_str(mac), vlan=args.vlan)
    else:
        got = _ask(args, "vif_del", mac=mac_str(mac))
    v = got["vif"]
    if args.json:
        dump(v)
    else:
        verb = "added" if args.action == "add" else "deleted"
        print(f"VIF {v['id']} {v['mac']} {verb} (QPN {v['qpn']:#x})")
    return 0
