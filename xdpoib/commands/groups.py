"""`xdpoib groups`: the multicast groups an attachment joined, and why."""

from __future__ import annotations

from xdpoib.commands._show import add_target, ask, dump, table

NAME = "groups"
HELP = "list the multicast groups an attachment joined (MGID, join state, why)"
ROOT = "the agents' control sockets are root-only"
EPILOG = """examples:
  xdpoib groups eth4 --netns blue
"""


def configure(p):
    add_target(p)


def run(args) -> int:
    rows = ask(args.ifname, args.netns, "groups")["groups"]
    if args.json:
        dump(rows)
    else:
        for r in rows:
            r["why"] = ",".join(r["why"])
            r["mlid"] = f"{r['mlid']:#x}"
        print(table(rows, ["mgid", "join_state", "mlid", "attached", "why"]))
    return 0
