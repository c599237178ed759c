"""`Teardown`: the undo steps of a bench (or any throwaway setup), run last first on `close()`, each
whatever happens to the others, with Ctrl-C and SIGTERM held off until all have run."""

from __future__ import annotations

import contextlib
import signal
import sys


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
