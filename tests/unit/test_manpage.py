"""xdpoib(8) as tools/manpage.py generates it for the Debian package: a section for every subcommand of
the parser (nested ones too) with each of its options, the examples epilogs, and a page that man-db
renders without a single warning. (The installed page is checked in tests/integration/test_package.py.)"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from prereq import need_cmd

from xdpoib.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def generate(tmp_path: Path) -> str:
    out = tmp_path / "xdpoib.8"
    subprocess.run([sys.executable, str(REPO / "tools" / "manpage.py"), str(out)], check=True, timeout=60,
                   env={"SOURCE_DATE_EPOCH": "1796000000", "PATH": "/usr/bin:/bin"})
    return out.read_text()


def commands(parser, prefix="xdpoib"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from commands(sub, f"{prefix} {name}")


def test_every_subcommand_and_option_is_in_the_page(tmp_path):
    page = generate(tmp_path)
    assert page.startswith('.TH XDPOIB 8 "2026-11-30"')
    found = list(commands(build_parser()))
    assert len(found) >= 20
    for path, sub in found:
        section = page.split(f".SS {path.replace('-', chr(92) + '-')}\n", 1)
        assert len(section) == 2, f"no section for {path}"
        body = section[1].split("\n.SS ", 1)[0]
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"\\fB{opt.replace('-', chr(92) + '-')}\\fR" in body, f"{path}: {opt} missing"
        if sub.epilog:
            assert sub.epilog.splitlines()[0].replace("\\", "\\e").replace("-", "\\-").strip() in body


def test_man_renders_it_without_warnings(tmp_path):
    need_cmd("man")
    page = tmp_path / "xdpoib.8"
    page.write_text(generate(tmp_path))
    r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "MANWIDTH": "120", "MAN_DISABLE_SECCOMP": "1", "LANG": "C.UTF-8"})
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    assert r.stdout.startswith("XDPOIB(8)") and "xdpoib vif add" in r.stdout


def test_the_attachments_page_renders_without_warnings():
    need_cmd("man")
    r = subprocess.run(["man", "--warnings", "-l", str(REPO / "contrib/man/xdpoib-attachments.conf.5")],
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "MANWIDTH": "120", "MAN_DISABLE_SECCOMP": "1", "LANG": "C.UTF-8"})
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    assert "XDPOIB_CONFIG" in r.stdout
