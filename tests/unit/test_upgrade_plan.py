"""The pure parts of upgrades (xdpoib/datapath/loader.py): map fds relocated in program instructions,
builds told apart by their digest, the build chosen by XDPOIB_BPF_BUILD."""

from __future__ import annotations

import struct

import pytest

from xdpoib.datapath import loader


def insn(code: int, regs: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, regs, off, imm)


def test_relocate_rewrites_every_map_fd_and_nothing_else():
    prog = (insn(0xB7, 0x01, 0, 5)                       # r1 = 5 (not a map)
            + insn(0x18, 0x11, 0, 7) + insn(0)           # r1 = map fd 7 (ld_imm64, src_reg 1)
            + insn(0x18, 0x02, 0, 7) + insn(0)           # r2 = 7 as a plain 64-bit constant
            + insn(0x18, 0x13, 0, 9) + insn(0)           # r3 = map fd 9
            + insn(0x95))
    out = loader.relocate(prog, {7: 70, 9: 90})
    imms = [struct.unpack_from("<BBhi", out, i * 8)[3] for i in range(len(out) // 8)]
    assert imms == [5, 70, 0, 7, 0, 90, 0, 0]
    with pytest.raises(loader.LayoutChanged, match="fd 9"):
        loader.relocate(prog, {7: 70})
    with pytest.raises(loader.LayoutChanged, match="kind 2"):
        loader.relocate(insn(0x18, 0x21, 0, 1) + insn(0), {1: 2})


def test_builds_differ_by_digest_not_by_abi():
    a, b = loader.build_id(loader.Build()), loader.build_id(loader.Build(test_fill=True))
    assert a.abi == b.abi and a.digest != b.digest and len(a.digest) == 32
    assert a == loader.build_id(loader.Build())
    assert str(a).startswith(f"ABI {a.abi} build ")


def test_production_build_from_the_environment(monkeypatch):
    monkeypatch.delenv(loader.BUILD_ENV, raising=False)
    assert loader.production_build() == loader.Build()
    monkeypatch.setenv(loader.BUILD_ENV, "test_fill")
    assert loader.production_build() == loader.Build(test_fill=True)
    monkeypatch.setenv(loader.BUILD_ENV, "test_fill,warp")
    with pytest.raises(loader.BpfLoadError, match="unknown switch 'warp'"):
        loader.production_build()


def test_plan_without_pins_is_fresh(tmp_path):
    assert loader.plan(tmp_path / "none").action == "fresh"
