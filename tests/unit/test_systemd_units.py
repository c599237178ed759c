"""The systemd units in contrib/systemd pass `systemd-analyze verify` without a single warning (the
template also as the instance xdpoib@eth4), and the check is real: a unit with a bad
setting does not pass. systemd-analyze comes with Debian's `systemd` package (deps/apt.txt)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prereq import need_cmd

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


def verify(unit_dir: Path, name: str) -> subprocess.CompletedProcess:
    need_cmd("systemd-analyze")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_dir / name)], capture_output=True,
                          text=True, timeout=60, cwd=unit_dir)


@pytest.fixture
def unit_dir(tmp_path) -> Path:
    for u in UNITS.glob("*.service"):
        shutil.copy(u, tmp_path / u.name)
    # a template is verified as an instance: the instance file is the template's text
    # (systemd-analyze cannot verify a path with ':' in it, as in xdpoib@blue:eth5.service: its alias
    # processing fails on such a file name, although the name is a valid instance for systemctl)
    shutil.copy(UNITS / "xdpoib@.service", tmp_path / "xdpoib@eth4.service")
    return tmp_path


@pytest.mark.parametrize("name", ["xdpoib-exporter.service", "xdpoib@.service", "xdpoib@eth4.service"])
def test_unit_verifies_cleanly(unit_dir, name):
    r = verify(unit_dir, name)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_every_unit_is_covered():
    assert {u.name for u in UNITS.glob("*.service")} == {"xdpoib-exporter.service", "xdpoib@.service"}


@pytest.mark.parametrize("old, new", [
    ("Restart=on-failure", "Restart=sometimes"),                 # a value systemd cannot parse: a warning
    ("ExecStart=/usr/bin/env", "ExecStart=/usr/bin/no-such-env"),  # a command that does not exist: an error
])
def test_a_broken_unit_does_not_verify(unit_dir, old, new):
    u = unit_dir / "xdpoib-exporter.service"
    assert old in u.read_text()
    u.write_text(u.read_text().replace(old, new))
    r = verify(unit_dir, u.name)
    assert r.returncode != 0 or r.stderr.strip()
