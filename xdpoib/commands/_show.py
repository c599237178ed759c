"""Shared plumbing of `status`, `peers` and `groups`: find the agent, ask it, print a table or JSON."""

from __future__ import annotations

import json

from xdpoib import control, state


def add_target(p, required: bool = True) -> None:
    p.add_argument("ifname", metavar="IFNAME", nargs=None if required else "?")
    p.add_argument("--netns", metavar="NS", help="network namespace of IFNAME")
    p.add_argument("-j", "--json", action="store_true", help="JSON output")


def ask(ifname: str, netns: str | None, cmd: str) -> dict:
    """Send one request to the agent of (netns, ifname)."""
    spec = state.find(ifname, netns)
    if not state.pid_alive(spec.pid):
        raise control.ControlError(f"the agent of {spec.where} (pid {spec.pid}) is not running; "
                                   f"`xdpoib detach {spec.ifname}` cleans up")
    answer = control.request(state.socket_path(spec.id), cmd)
    answer.pop("ok", None)
    return answer


def table(rows: list[dict], columns: list[str]) -> str:
    """Render rows as an aligned text table."""
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def dump(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
