"""`xdpoib detach`: undo an attachment (groups left, XDP removed, links deleted, agent stopped).

The agent undoes what it made itself, in reverse (its groups are left best effort, bounded: a slow or
stopped SM does not hold it up). An agent that does not stop within STOP_TIMEOUT_S is killed, and
detach removes what attach created in its place: the internal veth end (eth4 goes with it), the
anchor pair `xa<tag>`/`xb<tag>` that holds the RX batch program, the TAP mode bridge and veth hop,
and the pinned datapath. The agent's log is then kept (it says why the agent did not stop), and
detach says so on stderr.
"""

from __future__ import annotations

import sys

from xdpoib import state
from xdpoib.teardown import STOP_TIMEOUT_S, detach, own_links  # noqa: F401  (the command's own names)

NAME = "detach"
HELP = "detach an interface: stop its agent and remove everything attach created"
ROOT = "it stops the agent and removes links, XDP programs and pins"
EPILOG = """examples:
  xdpoib detach eth4
  xdpoib detach eth4 --netns blue
"""


def configure(p):
    p.add_argument("ifname", metavar="IFNAME")
    p.add_argument("--netns", metavar="NS", help="network namespace of IFNAME")


def run(args) -> int:
    spec = state.find(args.ifname, args.netns)
    note = detach(spec)
    if note:
        print(f"xdpoib: {spec.where}: {note}", file=sys.stderr)
    print(f"{spec.where}: detached")
    return 0
