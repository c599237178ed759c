"""`xdpoib up`: attach everything listed in the attachments file (/etc/xdpoib/attachments.conf)."""

from __future__ import annotations

import argparse

from xdpoib import state
from xdpoib.errors import UsageError, XdpoibError

NAME = "up"
HELP = "attach every interface listed in the attachments file"
ROOT = "attach creates links, loads XDP programs and opens the fabric's umad port"
EPILOG = """The attachments file (/etc/xdpoib/attachments.conf, or $XDPOIB_CONFIG) holds one attachment
per line, written as the arguments of `xdpoib attach`; '#' starts a comment:

  eth4 --device mlx5_0 --port 1
  eth5 --netns blue --device mlx5_0 --pkey 0x8003

A line with --force replaces its attachment when it is already running (as `xdpoib attach --force`
does); without it, a running attachment is left alone, unless its agent runs other code than the one
installed (an upgrade): then it is restarted make-before-break, as `xdpoib restart` does.

examples:
  xdpoib up          attach what is listed and not attached yet
  xdpoib down        detach what is listed
"""


def configure(p):
    pass


def config_specs() -> list[argparse.Namespace]:
    """Parse every line of the attachments file with attach's own parser (errors name the line)."""
    from xdpoib.commands import attach

    out = []
    for n, argv in enumerate(state.read_config(), 1):
        p = argparse.ArgumentParser(prog=f"{state.config_path()}:{n}", add_help=False, exit_on_error=False)
        attach.configure(p)
        try:
            args = p.parse_args(argv)
        except (argparse.ArgumentError, SystemExit) as e:
            raise UsageError(f"{state.config_path()}:{n}: {e}") from None
        out.append(args)
    return out


def run(args) -> int:
    from xdpoib.commands import attach

    entries = config_specs()
    if not entries:
        print(f"no attachments listed in {state.config_path()}")
        return 0
    failed = 0
    for a in entries:
        where = f"{a.ifname} in netns {a.netns}" if a.netns else a.ifname
        try:
            spec = attach.build_spec(a)
            old = state.read_spec(spec.id)
            running = old is not None and state.pid_alive(old.pid)
            if running and not a.force:
                print(upgrade(spec, old))
                continue
            attach.check_not_attached(spec, force=a.force)      # --force on the line: replace it
            pid = attach.start_agent(spec)
            print(f"{spec.where}: replaced (agent pid {old.pid} -> {pid})" if running else f"{spec.where}: attached")
        except XdpoibError as e:
            failed += 1
            print(f"{where}: error: {e}")
    return 1 if failed else 0


def upgrade(spec, running) -> str:
    """A running attachment listed without --force: restarted (make-before-break) when its agent runs
    other code than this installation's; the line to print."""
    from xdpoib.commands import restart

    if not restart.runs_other_code(running):
        return f"{spec.where}: already attached"
    r = restart.restart(running)
    return (f"{spec.where}: restarted after an upgrade (agent pid {r['old_pid']} -> {r['pid']}, handover "
            f"{r['handover_ms']} ms)")
