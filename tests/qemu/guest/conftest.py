"""Guest side of the qemu tier: report every test as one `XDPOIB-RESULT` line on the serial console.

Line format (parsed by tests/qemu/test_soft_roce.py on the host):
    XDPOIB-RESULT <name> PASS|FAIL|SKIP <one-line detail>
    XDPOIB-MEASURE <name> <value>       (one per `record_property` of a passed test: timings, rates)
    XDPOIB-SUMMARY passed=N failed=N skipped=N total=N
"""

from __future__ import annotations

import sys

import pytest
from roce_fabric import DEVICES, RoceFabric

_counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
_reported: set[str] = set()


def _name(nodeid: str) -> str:
    path, _, rest = nodeid.partition("::")
    stem = path.rsplit("/", 1)[-1].removesuffix(".py").removeprefix("test_")
    return f"{stem}::{rest}".replace(" ", "_")


def _emit(name: str, verdict: str, detail: str) -> None:
    if name in _reported:
        return
    _reported.add(name)
    _counts[verdict] += 1
    detail = " ".join(detail.split())[:300]
    sys.stdout.write(f"\nXDPOIB-RESULT {name} {verdict} {detail}\n")
    sys.stdout.flush()


def pytest_runtest_logreport(report):
    """One line per test: its call outcome, or the setup/teardown failure that stopped it."""
    name = _name(report.nodeid)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _emit(name, "SKIP", reason)
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        msg = crash.message if crash is not None else str(report.longrepr).splitlines()[-1]
        _emit(name, "FAIL", f"{report.when}: {msg}")
    elif report.when == "call":
        _emit(name, "PASS", f"{report.duration:.2f}s")
        for key, value in report.user_properties:
            sys.stdout.write(f"\nXDPOIB-MEASURE {key} {value}\n")
        sys.stdout.flush()


def pytest_sessionfinish(session, exitstatus):
    """The summary line the host checks last (a missing summary means the guest died)."""
    if session.testsfailed and not _counts["FAIL"]:
        _emit("collection", "FAIL", "pytest reported failures outside any test (collection error?)")
    total = sum(_counts.values())
    sys.stdout.write(
        f"\nXDPOIB-SUMMARY passed={_counts['PASS']} failed={_counts['FAIL']} "
        f"skipped={_counts['SKIP']} total={total} exit={int(exitstatus)}\n"
    )
    sys.stdout.flush()


# ---------------------------------------------------------------- fixtures: the two rxe ports

@pytest.fixture(scope="session")
def verbs_backends():
    """Both rxe ports opened once per guest run."""
    from xdpoib.fabric.verbs import VerbsBackend

    backends = [VerbsBackend(name) for name in DEVICES]
    yield tuple(backends)
    for b in backends:
        b.close()


@pytest.fixture
def backend_pair(verbs_backends):
    """The contract suite's two backends."""
    return verbs_backends


@pytest.fixture
def contract_fabric():
    """The contract suite's fabric description."""
    return RoceFabric()
