"""The agent's event loop, and the worker threads that keep blocking calls out of it.

`EventLoop` is NAPI-shaped: each turn
1. waits in epoll (not at all while data is still flowing: then it only peeks),
2. runs the handlers of the descriptors that are ready (control socket, port events, worker results),
3. gives every data poller one call with a budget (at most `budget` frames each), and
4. runs the timers that are due.
A poller that used its whole budget reports "more work", and the next turn's wait is a zero-timeout
peek, so timers, port events and the control socket are served between every two batches however
hard the data plane is pushed, and an idle agent sleeps in epoll. A turn whose pollers all stopped
short of their budget took everything there was (NAPI's napi_complete): the next wait is a real one,
which returns at once if frames came meanwhile (every data descriptor is level-triggered), so a ping
costs one turn per hop, not a turn and an empty peek. `ready` holds the descriptors the last wait
reported: a poller whose descriptor is exact (readable while, and only while, it has work) may skip
its source when its descriptor is registered (`watches`) and was not ready.

Busy polling (NAPI's busy poll): after a turn that moved frames, the loop keeps peeking instead of
sleeping for `busy_poll` seconds (XDPOIB_BUSY_POLL_US; default 0, off), so a reply that comes back within
that window is picked up without a wakeup. Off by default: measured on these 2-core hosts (two agents,
two stacks and the generator on 2 CPUs), a 100 us window never caught a reply (a sim round trip through
both agents takes longer) and its spinning took CPU from the other agent; worth trying where an
attachment has a core of its own. The window is adaptive: it only opens
while the previous one caught traffic or traffic just came, and it never opens for an idle agent, which
keeps sleeping in epoll (~0% CPU). A poller held back by the fabric (`pause_until`) waits on the
fabric (`pause_wait`), not for a fixed time.

`Worker` runs blocking calls (SA queries: paths, joins, leaves, membership checks, who-is; reading
eth4's multicast list and addresses) on its own thread. The loop submits `(key, fn, done)`; the
worker runs `fn()` and hands `(done, ok, value)` back through a deque and an eventfd that the loop
polls, so `done` always runs on the loop's thread and the agent's state needs no locks. A key that is
already queued or running is not queued again (a flood of frames to an unresolved peer asks the SA
once). `Backoff` spaces retries of a failing key: 1 s doubling to 16 s, as Linux ipoib does.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("xdpoib.agent")

BUDGET = 240                # frames per direction per turn (a live-frames call's, xdpoib/datapath/inject.py)
BUSY_POLL_S = float(os.environ.get("XDPOIB_BUSY_POLL_US", "0")) / 1e6
MAX_EVENTS = 64             # per wait (the loop watches ~10 descriptors; Python's default sizes 1023 a turn)


class EventLoop:
    """epoll descriptors, budgeted pollers and timers on one thread."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._fds: set[int] = set()     # every descriptor in the epoll set (handlers' and pollers')
        self.ready: frozenset[int] | set[int] = frozenset()     # what the last wait reported readable
        self._pollers: list[Callable[[int], int]] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.stopping = False
        self.pause_until = 0.0      # set by a poller that must wait (see run)
        self.pause_wait: Callable[[float], None] = time.sleep     # how to wait for the fabric (see run)
        self.busy_poll = BUSY_POLL_S
        self.work_times: deque[float] = deque(maxlen=4096)  # seconds from wakeup to the pollers' end, turns
        #                                                     that moved frames (the agent's share of latency)
        self.stats = {"turns": 0, "busy_turns": 0, "budget_exhausted": 0, "paused": 0, "busy_polls": 0,
                      "busy_poll_hits": 0}

    def add_reader(self, fd: int, handler: Callable[[], None]) -> None:
        """Call handler() on the loop whenever fd is readable."""
        self._handlers[fd] = handler
        self._ep.register(fd, select.EPOLLIN)
        self._fds.add(fd)

    def remove_reader(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._fds.discard(fd)
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def readers(self) -> list[int]:
        """The descriptors with a handler."""
        return list(self._handlers)

    def clear_timers(self) -> None:
        """Forget every timer (an agent that handed over keeps only what drains its QPs)."""
        self._timers.clear()

    def add_poller(self, fd: int | None, poll: Callable[[int], int]) -> None:
        """A data source: poll(budget) moves at most budget frames and returns how many it moved.
        fd (if any) wakes the loop when it has work; the poller runs every turn regardless."""
        self._pollers.append(poll)
        if fd is not None:
            self._ep.register(fd, select.EPOLLIN)
            self._fds.add(fd)

    def watches(self, fd: int) -> bool:
        """Whether fd is in the epoll set (so `ready` says whether it was readable at the last wait)."""
        return fd in self._fds

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def every(self, interval: float, fn: Callable[[], None], first: float | None = None) -> None:
        """Run fn every `interval` seconds (first after `first`, default one interval)."""
        def tick():
            try:
                fn()
            finally:
                self.call_later(interval, tick)
        self.call_later(interval if first is None else first, tick)

    def _run_timers(self) -> None:
        now = time.monotonic()
        t = self._timers
        while t and t[0][0] <= now:
            _, _, fn = heapq.heappop(t)
            try:
                fn()
            except Exception:           # a failing timer must not take the data plane down
                log.exception("timer failed")

    def run(self) -> None:
        """Serve until `stopping` is set."""
        busy = False
        spin_until = 0.0            # busy polling: peek instead of sleeping until then
        handlers, pollers, budget, stats = self._handlers, self._pollers, self.budget, self.stats
        window = self.busy_poll
        work = self.work_times
        while not self.stopping:
            spinning = False
            if busy:
                timeout = 0.0
            elif spin_until > time.monotonic():
                timeout, spinning = 0.0, True
                stats["busy_polls"] += 1
            elif self._timers:
                timeout = min(0.5, max(0.0, self._timers[0][0] - time.monotonic()))
            else:
                timeout = 0.5
            try:
                ready = self._ep.poll(timeout, MAX_EVENTS)
            except InterruptedError:
                continue
            woke = time.perf_counter()
            fds = self.ready = {fd for fd, _ev in ready}
            for fd in fds:
                h = handlers.get(fd)
                if h is not None:
                    try:
                        h()
                    except Exception:
                        log.exception("handler of fd %d failed", fd)
            moved = busy = False
            for p in pollers:
                n = p(budget)
                if n:
                    moved = True
                    if n >= budget:
                        busy = True         # more may wait: peek next turn (see the module doc)
                        stats["budget_exhausted"] += 1
            stats["turns"] += 1
            if moved:
                work.append(time.perf_counter() - woke)
                stats["busy_turns"] += 1
                if spinning:
                    stats["busy_poll_hits"] += 1
                if window:
                    spin_until = time.monotonic() + window
            if not moved and self.pause_until:
                # a poller is held back (the fabric cannot take more): its descriptor stays readable,
                # so epoll would return at once; give the CPU away until the hold ends instead
                rest = self.pause_until - time.monotonic()
                self.pause_until = 0.0
                if rest > 0:
                    stats["paused"] += 1
                    self.pause_wait(rest)
            if self._timers and self._timers[0][0] <= time.monotonic():
                self._run_timers()

    def work_us(self) -> dict:
        """p50 / p99 / max microseconds from a wakeup to the end of its pollers, over the last 4096 turns
        that moved frames: what one hop through this agent adds to a frame's latency, wakeups aside."""
        xs = sorted(self.work_times)
        if not xs:
            return {"p50": None, "p99": None, "max": None, "turns": 0}
        def at(q):
            return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6, 1)
        return {"p50": at(0.5), "p99": at(0.99), "max": round(xs[-1] * 1e6, 1), "turns": len(xs)}

    def close(self) -> None:
        self._ep.close()


class Worker:
    """One thread that runs blocking calls for the loop and hands the results back (see module doc)."""

    def __init__(self, name: str, loop: EventLoop) -> None:
        self.name = name
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._done: deque = deque()
        self._keys: set = set()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stats = {"submitted": 0, "completed": 0, "failed": 0, "coalesced": 0}
        self.busy_since: float | None = None
        self._thread = threading.Thread(target=self._serve, name=f"xdpoib-{name}", daemon=True)
        self._thread.start()
        loop.add_reader(self._efd, self.deliver)

    def submit(self, key, fn: Callable[[], object], done: Callable[[bool, object], None]) -> bool:
        """Queue fn (unless `key` is already queued or running); done(ok, result_or_exception) runs
        later on the loop. Returns False when coalesced with a pending call of the same key."""
        if key is not None:
            if key in self._keys:
                self.stats["coalesced"] += 1
                return False
            self._keys.add(key)
        self.stats["submitted"] += 1
        self._q.put((key, fn, done))
        return True

    def pending(self, key) -> bool:
        return key in self._keys

    @property
    def queued(self) -> int:
        return len(self._keys)

    def _serve(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            key, fn, done = item
            self.busy_since = time.monotonic()
            try:
                res, ok = fn(), True
            except BaseException as e:      # handed back: the loop decides
                res, ok = e, False
            self.busy_since = None
            self._done.append((key, done, ok, res))
            try:
                os.eventfd_write(self._efd, 1)
            except OSError:
                return                      # closed under us at shutdown

    def deliver(self) -> None:
        """Loop side: run the callbacks of finished calls."""
        try:
            os.eventfd_read(self._efd)
        except (BlockingIOError, OSError):
            pass
        while self._done:
            key, done, ok, res = self._done.popleft()
            self._keys.discard(key)
            self.stats["completed" if ok else "failed"] += 1
            try:
                done(ok, res)
            except Exception:
                log.exception("%s: completion handler failed", self.name)

    def drain(self, timeout: float) -> None:
        """Wait (up to timeout) for queued calls to finish and run their callbacks (shutdown)."""
        deadline = time.monotonic() + timeout
        while self._keys and time.monotonic() < deadline:
            r, _, _ = select.select([self._efd], [], [], max(0.0, deadline - time.monotonic()))
            if r:
                self.deliver()

    def call(self, fn: Callable[[], object], timeout: float = 30.0):
        """Run fn on the worker and wait for it (bring-up and teardown only, never from the loop)."""
        box: list = []
        ev = threading.Event()

        def run():
            try:
                box.append((True, fn()))
            except BaseException as e:
                box.append((False, e))
            ev.set()
        self._q.put((None, run, lambda ok, res: None))
        if not ev.wait(timeout):
            raise TimeoutError(f"{self.name}: call did not finish in {timeout:.0f} s")
        self.deliver()
        ok, res = box[0]
        if not ok:
            raise res
        return res

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)
        os.close(self._efd)


class Backoff:
    """When a failing key may be tried again: 1 s, doubling to 16 s; reset on success."""

    def __init__(self, first: float = 1.0, cap: float = 16.0, limit: int = 4096) -> None:
        self.first, self.cap, self.limit = first, cap, limit
        self._next: dict = {}

    def ready(self, key, now: float | None = None) -> bool:
        hit = self._next.get(key)
        return hit is None or (now or time.monotonic()) >= hit[0]

    def failed(self, key, now: float | None = None) -> float:
        """Record a failure; returns the delay before the next try."""
        now = now or time.monotonic()
        hit = self._next.get(key)
        delay = self.first if hit is None else min(self.cap, hit[1] * 2)
        if len(self._next) >= self.limit and key not in self._next:
            self._next.pop(next(iter(self._next)))
        self._next[key] = (now + delay, delay)
        return delay

    def succeeded(self, key) -> None:
        self._next.pop(key, None)

    def delay(self, key) -> float | None:
        hit = self._next.get(key)
        return None if hit is None else hit[1]
