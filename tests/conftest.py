"""Shared test plumbing: tier markers by directory, and the `figures` fixture: what a test measured,
printed at once with `-s` and in a "measured figures" section at the end of every run (CI's log
included, where output is captured). Prerequisite checks live in `prereq.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "bpf", "integration", "qemu")
_FIGURES: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def figures(request):
    """`figures(text)`: record a measured figure of this test (lines of text) for the run's summary."""
    def add(text: str) -> None:
        print(text)
        _FIGURES.append((request.node.nodeid, text.strip("\n")))
    return add


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.section("measured figures")
    last = None
    for nodeid, text in _FIGURES:
        if nodeid != last:
            terminalreporter.write_line(f"{nodeid}:")
            last = nodeid
        for line in text.splitlines():
            terminalreporter.write_line(f"    {line}")


# Hypothesis: no per-example deadline (these 2-core machines are shared and noisy); in CI, derandomized
# so a run is reproducible (a failure found there reproduces locally with HYPOTHESIS_PROFILE=ci).
try:
    import os

    from hypothesis import settings

    settings.register_profile("dev", deadline=None)
    settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
    _ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _ci else "dev"))
except ImportError:  # pragma: no cover - hypothesis is a test extra
    pass
