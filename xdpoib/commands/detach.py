"""`xdpoib detach`: undo an attachment (groups left, XDP removed, links deleted, agent stopped)."""

from __future__ import annotations

from xdpoib import state
from xdpoib.teardown import detach

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
    detach(spec)
    print(f"{spec.where}: detached")
    return 0
