"""`xdpoib run`: run one listed attachment's agent in the foreground (what `xdpoib@.service` runs)."""

from __future__ import annotations

import os
import sys

from xdpoib import state
from xdpoib.errors import UsageError

NAME = "run"
HELP = "run the agent of one attachment from the attachments file in the foreground (for systemd)"
ROOT = "the agent creates links, loads XDP programs and opens the fabric's umad port"
EPILOG = """NAME is IFNAME, or NETNS:IFNAME for an interface in a namespace. The unit template
contrib/systemd/xdpoib@.service runs `xdpoib run %i`:

  systemctl enable --now xdpoib@eth4
  systemctl enable --now xdpoib@blue:eth5
"""


def configure(p):
    p.add_argument("name", metavar="NAME", help="IFNAME or NETNS:IFNAME of a line of the attachments file")


def run(args) -> int:
    from xdpoib.commands import attach
    from xdpoib.commands.up import config_specs

    netns, _, ifname = args.name.rpartition(":")
    for a in config_specs():
        if a.ifname == ifname and (a.netns or "") == netns:
            break
    else:
        raise UsageError(f"{args.name} is not listed in {state.config_path()}")
    spec = attach.build_spec(a)
    attach.check_not_attached(spec, force=a.force)
    argv = [sys.executable, "-m", "xdpoib.agent", spec.to_json()]
    env = dict(os.environ)
    if spec.backend == "sim":        # become the host's umad client (the preload works from exec on)
        from xdpoib.fabric.simfabric import SimFabric

        fab = SimFabric.attach(spec.fabric)
        env.update(fab.client_env(spec.host))
        os.chdir(fab.client_cwd(spec.host))
    sys.stdout.flush()
    os.umask(attach.AGENT_UMASK)
    os.execve(sys.executable, argv, env)
    return 1    # not reached
