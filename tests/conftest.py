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
