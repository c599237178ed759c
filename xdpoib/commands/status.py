"""`xdpoib status`: port, broadcast group, interface, QPN and counters of one or every attachment."""

from __future__ import annotations

from xdpoib import state
from xdpoib.commands._show import add_target, ask, dump

NAME = "status"
HELP = "show the state of one attachment, or list all of them"
ROOT = "the agents' control sockets are root-only"
EPILOG = """examples:
  xdpoib status                   every attachment, one line each
  xdpoib status eth4 --netns blue
  xdpoib status eth4 -j           JSON (the same keys as the exporter reads)
"""


def configure(p):
    add_target(p, required=False)


def _brief(spec: state.AttachSpec) -> dict:
    alive = state.pid_alive(spec.pid)
    return {"ifname": spec.ifname, "netns": spec.netns, "backend": spec.backend,
            "fabric": f"{spec.fabric}:{spec.host}" if spec.backend == "sim" else spec.device,
            "pkey": f"{spec.pkey:#06x}", "pid": spec.pid, "agent": "running" if alive else "dead"}


def run(args) -> int:
    if args.ifname is None:
        rows = [_brief(s) for s in state.attachments()]
        if args.json:
            dump(rows)
        else:
            from xdpoib.commands._show import table

            print(table(rows, ["ifname", "netns", "backend", "fabric", "pkey", "pid", "agent"]))
        return 0
    st = ask(args.ifname, args.netns, "status")
    if args.json:
        dump(st)
        return 0
    a, p, b, e = st["attachment"], st["port"], st["broadcast"], st["eth"]
    cpus = f" on CPUs {cpu_ranges(a['cpus'])}" if a.get("cpus") else ""
    print(f"{a['ifname']}{' (netns ' + a['netns'] + ')' if a['netns'] else ''}: {a['state']}, "
          f"agent pid {a['pid']}{cpus}, up {a['uptime_seconds']} s")
    print(f"  eth      MAC {e['mac']}  MTU {e['mtu']}  mode {a['mode']}  P_Key {a['pkey']}")
    print(f"  port     GID {p['gid']}  LID {p['lid']}  SM LID {p['sm_lid']}  state {p['state']}")
    print(f"  bcast    MGID {b['mgid']}  Q_Key {b['qkey']}  MTU {b['mtu']}  MLID {b['mlid']:#x}")
    if b.get("waiting_for"):
        print(f"  waiting  {b['waiting_for']}")
    print(f"  qp       QPN {st['qpn']:#x}  peers {st['peers']}  groups {st['groups']}")
    print("  counters " + ", ".join(f"{k} {v}" for k, v in sorted(st["counters"].items())))
    drops = {**st["drops"], **{f"fabric.{k}": v for k, v in st["fabric_drops"].items()}}
    print("  drops    " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"))
    return 0


def cpu_ranges(cpus: list[int]) -> str:
    """CPU numbers as taskset and systemd write them: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
