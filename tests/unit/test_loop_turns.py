"""The event loop's turns (xdpoib/agent/loop.py) on real descriptors: a turn that took everything there was
sleeps until a descriptor is ready (one turn per frame, no empty peek after it); a poller that used its
whole budget is called again at once; `ready` and `watches` tell a poller whether its descriptor woke
the turn."""

from __future__ import annotations

import os

from xdpoib.agent.loop import EventLoop


def _event() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _take(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_a_turn_short_of_its_budget_is_followed_by_a_real_wait():
    loop = EventLoop(budget=8)
    fd = _event()
    seen = []

    def poll(budget):
        n = _take(fd)
        seen.append((n, fd in loop.ready))
        return n

    try:
        loop.add_poller(fd, poll)
        os.eventfd_write(fd, 3)             # three frames wait: fewer than the budget
        loop.call_later(0.2, lambda: setattr(loop, "stopping", True))
        loop.run()
    finally:
        loop.close()
        os.close(fd)
    # the frames' turn, then the timer's: no zero-timeout peek between them
    assert seen == [(3, True), (0, False)]
    assert (loop.stats["turns"], loop.stats["busy_turns"], loop.stats["budget_exhausted"]) == (2, 1, 0)
    assert loop.work_us()["turns"] == 1


def test_a_poller_that_used_its_budget_is_called_again_at_once():
    loop = EventLoop(budget=4)
    fd = _event()
    calls = []

    def poll(budget):
        _take(fd)
        calls.append(fd in loop.ready)
        return budget if len(calls) <= 3 else 0      # three full batches, then nothing

    try:
        loop.add_poller(fd, poll)
        os.eventfd_write(fd, 1)
        loop.call_later(0.2, lambda: setattr(loop, "stopping", True))
        loop.run()
    finally:
        loop.close()
        os.close(fd)
    # woken by the descriptor, two peeks after full batches (the descriptor no longer readable), the
    # peek that found nothing, then the timer's turn
    assert calls == [True, False, False, False, False]
    assert (loop.stats["turns"], loop.stats["budget_exhausted"]) == (5, 3)


def test_watches_follows_the_epoll_set():
    loop = EventLoop()
    a, b = _event(), _event()
    try:
        loop.add_poller(a, lambda budget: 0)
        loop.add_reader(b, lambda: None)
        assert loop.watches(a) and loop.watches(b)
        loop.remove_reader(b)
        assert loop.watches(a) and not loop.watches(b)
        assert not loop.watches(max(a, b) + 100)
    finally:
        loop.close()
        os.close(a)
        os.close(b)
