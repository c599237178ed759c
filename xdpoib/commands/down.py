"""`xdpoib down`: detach everything listed in the attachments file."""

from __future__ import annotations

from xdpoib import state

NAME = "down"
HELP = "detach every interface listed in the attachments file"
ROOT = "it stops agents and removes links, XDP programs and pins"
EPILOG = """examples:
  xdpoib down
"""


def configure(p):
    pass


def run(args) -> int:
    from xdpoib.commands.detach import detach
    from xdpoib.commands.up import config_specs

    for a in config_specs():
        s = state.read_spec(state.attachment_id(a.ifname, a.netns))
        where = f"{a.ifname} in netns {a.netns}" if a.netns else a.ifname
        if s is None:
            print(f"{where}: not attached")
            continue
        detach(s)
        print(f"{where}: detached")
    return 0
