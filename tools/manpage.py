"""Write xdpoib(8) from the argparse parser itself (`xdpoib.cli.build_parser`), so the page cannot drift
from the command: every subcommand and every nested action (`sim up`, `vif add`, ...) with its usage,
options and examples epilog. Run at package build time (debian/rules) from the source tree:

    python3 tools/manpage.py OUT.8

The date is SOURCE_DATE_EPOCH's (dpkg sets it from debian/changelog) so builds are reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xdpoib import __version__
from xdpoib.cli import build_parser

FILES = [
    ("/etc/xdpoib/attachments.conf", "what `xdpoib up` attaches and `xdpoib down` detaches, one attachment a "
                                     "line (see xdpoib-attachments.conf(5))"),
    ("/run/xdpoib/NETNS@IFNAME.sock", "an agent's control socket (root only); NETNS@IFNAME.log its log"),
    ("/var/lib/xdpoib/NETNS@IFNAME.json", "an attachment's persisted identities (REMACs, VIFs, peers)"),
    ("/sys/fs/bpf/xdpoib/", "pinned programs and maps; they outlive an agent, its successor adopts them"),
    ("/usr/share/xdpoib/bpf/", "the BPF sources the agent compiles with bcc"),
    ("/usr/share/xdpoib/prometheus/, /usr/share/xdpoib/grafana/", "Prometheus scrape config and alerting "
                                                                   "rules, the Grafana dashboard"),
]
SEE_ALSO = "xdpoib-attachments.conf(5), systemctl(1), ip(8), ibstat(8), opensm(8)"


def esc(text: str) -> str:
    """Text safe for roff: backslashes escaped, dashes as minus signs, no line starting with a control
    character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln[:1] in (".", "'") else ln for ln in text.split("\n"))


def literal(text: str) -> list[str]:
    """A preformatted block (usage, examples)."""
    return [".nf", esc(text.rstrip("\n")), ".fi"]


def subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand of `parser`, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return out


def options(parser: argparse.ArgumentParser) -> list[str]:
    """One .TP entry per argument (positional or optional), help expanded as argparse prints it."""
    fmt = parser._get_formatter()
    lines = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            arg = "" if action.nargs == 0 else " " + fmt._format_args(action, fmt._get_default_metavar_for_optional(
                action))
            head = ", ".join(f"\\fB{esc(o)}\\fR{esc(arg)}" for o in action.option_strings)
        else:
            head = f"\\fI{esc(fmt._format_args(action, fmt._get_default_metavar_for_positional(action)))}\\fR"
        lines += [".TP", head, esc(fmt._expand_help(action)) if action.help else ""]
    return lines


def command(path: str, helptext: str, parser: argparse.ArgumentParser) -> list[str]:
    """The section of one subcommand (and, below it, of its actions)."""
    usage = parser.format_usage().removeprefix("usage: ").replace("\n" + " " * len("usage: "), "\n")
    lines = [f".SS {esc(path)}", esc(helptext), ".PP", *literal(usage)]
    opts = options(parser)
    if opts:
        lines += [".PP", "Arguments:", ".RS", *opts, ".RE"]
    if parser.epilog:
        lines += [".PP", *literal(parser.epilog)]
    for name, sub_help, sub in subparsers(parser):
        lines += command(f"{path} {name}", sub_help, sub)
    return lines


def render(parser: argparse.ArgumentParser, date: str) -> str:
    lines = [
        f'.TH XDPOIB 8 "{date}" "xdpoib {__version__}" "System Administration"',
        ".SH NAME",
        "xdpoib \\- Ethernet interfaces whose traffic crosses an InfiniBand fabric as IPoIB",
        ".SH SYNOPSIS",
        "\\fBxdpoib\\fR [\\fB\\-V\\fR] [\\fB\\-v\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR...]",
        ".SH DESCRIPTION",
        esc(parser.description or ""),
        ".PP",
        "\\fBxdpoib attach\\fR gives the host an Ethernet interface whose traffic crosses the InfiniBand fabric "
        "as standard IPoIB (RFC 4391/4392): BPF (XDP) rewrites each frame, one agent process per attachment "
        "owns the fabric side (UD queue pairs, SA path and multicast queries). Errors are one line on "
        "standard error and a non\\-zero exit status; \\fB\\-v\\fR adds the traceback.",
        ".SH OPTIONS",
        ".RS", *options(parser), ".RE",
        ".SH COMMANDS",
    ]
    for name, helptext, sub in subparsers(parser):
        lines += command(f"xdpoib {name}", helptext, sub)
    lines += [".SH EXAMPLES", *literal(parser.epilog or "")]
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    lines += [
        ".SH SYSTEMD",
        "\\fBxdpoib@NETNS:IFNAME.service\\fR (or \\fBxdpoib@IFNAME.service\\fR) runs \\fBxdpoib run\\fR for "
        "one attachment; \\fBxdpoib\\-exporter.service\\fR serves the Prometheus metrics of every attachment "
        "(127.0.0.1:9645 unless XDPOIB_EXPORTER_LISTEN says otherwise).",
        ".SH EXIT STATUS",
        "0 on success; 1 on an error (one line on standard error); 2 on bad usage. \\fBxdpoib doctor\\fR exits 1 "
        "if any check failed.",
        ".SH SEE ALSO",
        esc(SEE_ALSO),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: manpage.py OUT.8", file=sys.stderr)
        return 2
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    Path(argv[0]).write_text(render(build_parser(), date))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
