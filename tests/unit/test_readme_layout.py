"""The README's layout table matches the tree: every path it names exists, and every top-level entry of
the repository and every module or package of `xdpoib/` is named."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rows() -> list[tuple[list[str], list[str]]]:
    """(paths of the first column, expanded; backticked names of the second) per row of the table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("| where | what |", 1)[1].split("\n\n", 1)[0]
    out = []
    for line in table.splitlines()[2:]:
        where, what = line.strip("|").split("|", 1)
        paths: list[str] = []
        for tok in re.findall(r"`([^`]+)`", where):
            if "," in tok:                                  # tests/unit,bpf,... -> tests/unit, tests/bpf, ...
                head, _, rest = tok.partition("/")
                paths += [f"{head}/{t}" for t in rest.split(",")]
            elif "/" not in tok and paths:                  # peers.py after xdpoib/pump.py
                paths.append(str(Path(paths[-1]).parent / tok) if not paths[-1].endswith("/") else tok)
            else:
                paths.append(tok)
        out.append((paths, re.findall(r"`([^`]+)`", what)))
    return out


def test_every_named_path_exists():
    missing = []
    for paths, names in rows():
        missing += [p for p in paths if not (ROOT / p).exists()]
        base = next((p for p in paths if p.endswith("/")), None)
        for n in names:                                     # files named in the description, under its dir
            if base and re.fullmatch(r"[\w/.-]+\.(py|h|c|md|json|sh)", n):
                missing += [base + n] if not (ROOT / base / n).exists() else []
    assert not missing, f"the README's layout names what is not in the tree: {missing}"


def test_every_top_level_entry_and_module_is_named():
    named = {p.rstrip("/") for paths, _ in rows() for p in paths}
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                             check=True).stdout.split()
    top = {f.split("/")[0] for f in tracked if not f.startswith(".")} - {"README.md"}
    tops_named = {p.split("/")[0] for p in named}
    assert not top - tops_named, f"top-level entries the layout does not name: {sorted(top - tops_named)}"
    mods = {f.split("/")[1].removesuffix(".py") for f in tracked if f.startswith("xdpoib/") and f.count("/") >= 1}
    mods -= {"__init__", "__main__"}
    mods_named = {p.split("/")[1].removesuffix(".py") for p in named if p.startswith("xdpoib/") and p.count("/") >= 1}
    assert not mods - mods_named, f"modules of xdpoib/ the layout does not name: {sorted(mods - mods_named)}"
