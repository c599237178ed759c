"""Bash completion (contrib/bash-completion/xdpoib): the committed script is what `xdpoib.completion`
generates from the argparse tree, and real bash, with it sourced, completes every command, every nested
action, every option of every command, and the values of options with choices."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from prereq import need_cmd

from xdpoib.cli import build_parser
from xdpoib.completion import script, tree

SCRIPT = Path(__file__).resolve().parents[2] / "contrib" / "bash-completion" / "xdpoib"


def complete(*words: str) -> list[str]:
    """What bash offers for `xdpoib WORDS...` (the last word is the one being completed)."""
    need_cmd("bash")
    line = " ".join(shlex.quote(w) for w in ("xdpoib", *words))
    code = (f"source {shlex.quote(str(SCRIPT))}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _xdpoib; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_the_committed_script_is_generated_from_the_parser():
    assert SCRIPT.read_text() == script(), ("contrib/bash-completion/xdpoib is stale: "
                                            "python -m xdpoib.completion > contrib/bash-completion/xdpoib")


def test_bash_parses_it():
    need_cmd("bash")
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_subcommand_is_completed():
    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"attach", "status", "doctor", "exporter", "sim"} <= names
    assert set(complete("")) == names
    assert complete("do") == ["doctor", "down"]
    assert complete("-v", "st") == ["status"]                  # after a global option


def test_every_option_of_every_command_and_action_is_completed():
    for path, node in tree().items():
        if not path:
            continue
        got = set(complete(*path.split(), "-"))
        assert got == set(node["opts"]), path
        if node["subs"]:
            assert set(complete(*path.split(), "")) >= set(node["subs"]), path


@pytest.mark.parametrize("words, want", [
    (("attach", "eth4", "--mode", ""), ["veth", "tap"]),
    (("attach", "eth4", "--netns", "blue", "--mo"), ["--mode"]),     # a value is not taken for a command
    (("sim", "fault", "lab", "re"), ["relink"]),
    (("sim", "up", "lab", "--h"), ["--help", "--hosts"]),
])
def test_values_and_positions(words, want):
    assert complete(*words) == want
