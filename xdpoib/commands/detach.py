"""`xdpoib detach`: undo an attachment (groups left, XDP removed, links deleted, agent stopped)."""

from __future__ import annotations

from xdpoib import state

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


def detach(spec: state.AttachSpec, keep_state: bool = False) -> None:
    """Ask the agent to stop (it undoes everything in reverse), wait, and clean up after a dead one."""
    from xdpoib import control, link

    if state.pid_alive(spec.pid):
        try:
            control.request(state.socket_path(spec.id), "stop", timeout=5.0)
        except control.ControlError:
            pass
        state.stop_pid(spec.pid, timeout=20.0)
    # an agent that died without cleaning up leaves its links behind: remove them here
    if spec.mode == "veth" and spec.internal and link.link_exists(spec.internal):
        link.delete_link(spec.internal)
    if not keep_state:                       # a dead agent's pinned datapath goes too
        from xdpoib.datapath.loader import unpin
        from xdpoib.pump import pin_dir

        unpin(pin_dir(spec.id))
    state.remove_files(spec.id, keep_state=keep_state, keep_log=False)


def run(args) -> int:
    spec = state.find(args.ifname, args.netns)
    detach(spec)
    print(f"{spec.where}: detached")
    return 0
