"""Prerequisites for tests: skip on a developer box, fail in CI (CI=true), where `make setup` must
have provided everything. Import as `from prereq import need_root, need_cmd` (tests/ is on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(what: str) -> None:
    """A prerequisite is absent: skip on a developer box, fail in CI with a clear message."""
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {what} (make setup should provide it)", pytrace=False)
    pytest.skip(f"prerequisite missing: {what}")


def need_root() -> None:
    if os.geteuid() != 0:
        missing("root")


def need_cmd(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            missing(f"command {name!r}")


def need_module(*names: str) -> None:
    for name in names:
        if importlib.util.find_spec(name) is None:
            missing(f"python module {name!r}")


def need_file(path: str) -> None:
    if not os.path.exists(path):
        missing(f"file {path}")
