"""Undoing things: `Teardown`, the undo steps of a bench (or any throwaway setup), run last first on
`close()`, each whatever happens to the others, with Ctrl-C and SIGTERM held off until all have run;
and `detach`, undoing one attachment (what `xdpoib detach`, `down`, a failed attach and the benches
call). The agent undoes what it made itself, in reverse (its groups are left best effort, bounded: a
slow or stopped SM does not hold it up). An agent that does not stop within STOP_TIMEOUT_S is killed,
and detach removes what attach created in its place: the internal veth end (eth4 goes with it), the
anchor pair `xa<tag>`/`xb<tag>` that holds the RX batch program, the TAP mode bridge and veth hop, and
the pinned datapath. The agent's log is then kept (it says why the agent did not stop)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xdpoib.state import AttachSpec

STOP_TIMEOUT_S = 20.0       # how long the agent may take to undo everything itself


class Teardown:
    """Undo steps registered with `later`, run in reverse by `close`; a step that fails is reported on
    stderr under `who` and the rest still run."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._stack = contextlib.ExitStack()

    def later(self, fn, *args) -> None:
        """Undo a step on close, whatever happens to the others."""
        def quietly():
            try:
                fn(*args)
            except Exception as e:          # cleanup goes on and says what it could not do
                print(f"{self.who}: cleanup: {e}", file=sys.stderr)
        self._stack.callback(quietly)

    def close(self) -> None:
        """Run every step, with Ctrl-C and SIGTERM held off until it is done."""
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with contextlib.suppress(ValueError):               # not the main thread: nothing to hold off
            for s in old:
                signal.signal(s, signal.SIG_IGN)
        try:
            self._stack.close()
        finally:
            with contextlib.suppress(ValueError):
                for s, h in old.items():
                    signal.signal(s, h)


def own_links(spec: AttachSpec) -> list[str]:
    """The root-namespace links attach creates for `spec` (named by `state.link_tag`): the internal veth
    end `xo` (in TAP mode also the bridge `xr` and the hop `xs`) and the anchor `xa`/`xb`."""
    from xdpoib import state

    tag = state.link_tag(spec.id)
    names = ["xo" + tag, "xa" + tag, "xb" + tag]
    if spec.mode == "tap":
        names += ["xr" + tag, "xs" + tag]
    if spec.internal and spec.internal not in names:
        names.insert(0, spec.internal)
    return names


def stop_draining(spec: AttachSpec) -> None:
    """Agents a restart replaced that still drain their old QPs (`spec.draining`): stopped at once (they
    own nothing the attachment shares, so a SIGTERM is all they need)."""
    from xdpoib import state

    for pid in spec.draining or []:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ours = [b"xdpoib.agent", f'"ifname": {json.dumps(spec.ifname)}'.encode(),
                f'"netns": {json.dumps(spec.netns)}'.encode()]      # not a pid reused by something else
        if all(m in cmdline for m in ours):
            state.stop_pid(pid, timeout=5.0)


def detach(spec: AttachSpec, keep_state: bool = False) -> str | None:
    """Ask the agent to stop (it undoes everything in reverse), wait, and clean up after one that died or
    did not stop in time. Returns None after a clean stop, else one line saying what happened (the log
    is then kept)."""
    from xdpoib import control, link, state

    note = None
    stop_draining(spec)
    if state.pid_alive(spec.pid):
        try:
            control.request(state.socket_path(spec.id), "stop", timeout=5.0)
        except control.ControlError:
            pass
        try:
            os.kill(spec.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not state.wait_gone(spec.pid, STOP_TIMEOUT_S):
            try:
                os.kill(spec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            state.wait_gone(spec.pid, 5.0)
            note = f"the agent (pid {spec.pid}) did not stop within {STOP_TIMEOUT_S:g} s and was killed"
    elif spec.pid:
        note = f"the agent (pid {spec.pid}) had died"
    # an agent that died or was killed leaves its links behind: remove them here. Only a veth attachment's
    # links are ours to remove after a clean stop too (an adopted eth4 of a dead agent).
    removed = []
    for name in own_links(spec) if (note or spec.mode == "veth") else []:
        if link.link_exists(name):
            link.delete_link(name)
            removed.append(name)
    if not keep_state:                       # a dead agent's pinned datapath goes too
        from xdpoib.datapath.loader import unpin
        from xdpoib.pump import pin_dir

        unpin(pin_dir(spec.id))
    state.remove_files(spec.id, keep_state=keep_state, keep_log=note is not None)
    if note is None:
        return None
    return (f"{note}; removed what it left ({', '.join(removed) or 'no links'}, pins); "
            f"its log is kept: {state.log_path(spec.id)}")
