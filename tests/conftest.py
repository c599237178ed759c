"""Shared test plumbing: tier markers by directory. Prerequisite checks live in `prereq.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "bpf", "integration", "qemu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


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
