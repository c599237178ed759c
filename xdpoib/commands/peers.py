"""`xdpoib peers`: the remote endpoints an attachment knows (REMAC, GID, QPN, LID, path, age)."""

from __future__ import annotations

from xdpoib.commands._show import add_target, ask, dump, table

NAME = "peers"
HELP = "list the peers an attachment has learned"
ROOT = "the agents' control sockets are root-only"
EPILOG = """examples:
  xdpoib peers eth4 --netns blue
  xdpoib peers eth4 -j
"""


def configure(p):
    add_target(p)


def run(args) -> int:
    rows = ask(args.ifname, args.netns, "peers")["peers"]
    if args.json:
        dump(rows)
    else:
        for r in rows:
            r["qpn"] = f"{r['qpn']:#x}"
        print(table(rows, ["remac", "gid", "qpn", "lid", "path", "path_mtu", "age_seconds", "idle_seconds"]))
    return 0
