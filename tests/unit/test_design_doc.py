"""docs/design.md is the design every code comment cites: its numbered sections exist in the stable order,
every citation in the code resolves to one of them, and the paths it names are files of the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
SECTIONS = {1: "Architecture", 2: "Addressing", 3: "Wire facts", 4: "SA", 5: "Test fabric", 6: "Environment",
            7: "Metrics", 8: "Performance", 9: "Real captures"}
WIRE_FACTS = 14
CITING = ("xdpoib", "bpf", "tests", "tools")
CITATION = re.compile(r"(?:DESIGN|docs/design\.md\s+§)\s*(\d+(?:\.\d+)?)")


def text() -> str:
    return DESIGN.read_text()


def headings() -> dict[int, str]:
    return {int(n): title for n, title in re.findall(r"^## (\d+)\. (.+)$", text(), re.M)}


def wire_facts() -> list[int]:
    body = text().split("\n## 3. ", 1)[1].split("\n## 4. ", 1)[0]
    return [int(n) for n in re.findall(r"^(\d+)\. ", body, re.M)]


def known() -> set[str]:
    return {str(n) for n in headings()} | {f"3.{n}" for n in wire_facts()}


def test_sections_are_numbered_in_the_stable_order():
    got = headings()
    assert list(got) == list(SECTIONS), got
    for n, title in SECTIONS.items():
        assert got[n].startswith(title), (n, got[n])


def test_wire_facts_are_one_numbered_list():
    assert wire_facts() == list(range(1, WIRE_FACTS + 1))


def test_every_citation_in_the_code_resolves():
    unresolved = []
    for top in CITING:
        for p in sorted((ROOT / top).rglob("*")):
            if p.suffix not in (".py", ".c", ".h", ".sh") or ".venv" in p.parts:
                continue
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                for m in CITATION.finditer(line):
                    if m.group(1) not in known():
                        unresolved.append(f"{p.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert not unresolved, unresolved


def test_it_stands_alone_in_the_repository():
    t = text()
    assert "../shared" not in t and "/work/" not in t
    paths = set(re.findall(r"`((?:xdpoib|bpf|docs|tests|tools|contrib|dashboards|deps)/[\w./@-]*)`", t))
    assert paths, "no repository path found"
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert not missing, missing
