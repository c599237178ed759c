"""The `xdpoib` command line: argparse front end over one small module per subcommand.

Each module in `xdpoib.commands` defines `NAME`, `HELP`, `EPILOG` (examples), `configure(parser)` and
`run(args) -> int`; they are discovered here, so adding a subcommand touches no other file. Modules
keep heavy imports (bcc, pyverbs, pyroute2) inside `run`, so `xdpoib --help` stays fast.

Every command must run as root unless its module says otherwise: `ROOT` is the reason shown to a user
who is not (default `DEFAULT_ROOT_REASON`), or False for a command anyone may run. The check happens here,
once, before the command does anything: files, sockets and pins are root-only, so a command run by
another user would otherwise see nothing and report an empty state.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from xdpoib import __version__
from xdpoib.errors import PrerequisiteError, XdpoibError

DEFAULT_ROOT_REASON = "xdpoib's state, sockets and pinned maps are root-only"

EXAMPLES = """examples:
  xdpoib doctor --device mlx5_0                   is this host ready? one line per prerequisite
  xdpoib attach eth4 --device mlx5_0              eth4 on HCA port mlx5_0/1, default partition
  xdpoib attach eth4 --netns blue --sim lab:h1    eth4 in netns blue, on host h1 of sim fabric lab
  xdpoib status eth4 --netns blue                 port, broadcast group, counters, drops by reason
  xdpoib detach eth4 --netns blue
  xdpoib demo                                     three hosts on a simulated fabric: ARP, ping, status
  xdpoib sim up lab --hosts 3                     start ibsim + OpenSM with three hosts
  xdpoib exporter                                 Prometheus metrics of every attachment
  xdpoib bench datapath --json                    BPF cost per packet, as ratios to a no-op program
"""


def _command_modules():
    import xdpoib.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"xdpoib.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    """Return the full argument parser, one subparser per command module."""
    parser = argparse.ArgumentParser(
        prog="xdpoib",
        description="Ethernet interfaces whose traffic crosses an InfiniBand fabric as standard IPoIB.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"xdpoib {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=mod.HELP,
            epilog=getattr(mod, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.configure(p)
        p.set_defaults(func=mod.run, root=getattr(mod, "ROOT", DEFAULT_ROOT_REASON))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one xdpoib command; errors become one line on stderr and a non-zero exit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.root is not False and os.geteuid() != 0:
            raise PrerequisiteError(f"xdpoib {args.command} must run as root ({args.root})")
        return int(args.func(args) or 0)
    except XdpoibError as e:
        if args.verbose:
            raise
        print(f"xdpoib: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
