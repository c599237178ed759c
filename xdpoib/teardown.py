"""Undoing things: `Teardown`, the undo steps of a bench (or any throwaway setup), run last first on
`close()`, each whatever happens to the others, with Ctrl-C and SIGTERM held off until all have run;
and `detach`, undoing one attachment (what `xdpoib detach`, `down`, a failed attach and the benches
call)."""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xdpoib.state import AttachSpec


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


def detach(spec: AttachSpec, keep_state: bool = False) -> None:
    """Ask the agent to stop (it undoes everything in reverse), wait, and clean up after a dead one."""
    from xdpoib import control, link, state

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
