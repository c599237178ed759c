"""The ctypes mirror in xdpoib/abi.py equals bpf/include/xdpoib_abi.h: a probe compiled with gcc prints
every struct's size and field offsets and every constant; no root needed."""

from __future__ import annotations

import ctypes as ct
import subprocess

import pytest
from prereq import need_cmd

from xdpoib import abi
from xdpoib.reasons import DropReason, Kind

SLOT_MACS = [bytes.fromhex(h) for h in ("020000000001", "f452148d5211", "ffffffffffff", "060102030405")]


def _probe_source() -> str:
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "xdpoib_abi.h"', "int main(void) {"]
    for cname, mirror in abi.STRUCTS.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for field, _ in mirror._fields_:
            lines.append(f'printf("off {cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
            lines.append(f'printf("fsize {cname}.{field} %zu\\n", sizeof(((struct {cname} *)0)->{field}));')
    for name in abi.CONSTANTS:
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    for i, mac in enumerate(SLOT_MACS):
        arr = ", ".join(str(b) for b in mac)
        lines.append(f"{{ unsigned char m[6] = {{{arr}}}; "
                     f'printf("slot mac{i} %u\\n", (unsigned)XDPOIB_MAC_SLOT(m, XDPOIB_PEER_SLOTS)); }}')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, int]:
    need_cmd("gcc")
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "probe.c", d / "probe"
    src.write_text(_probe_source())
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(abi.HEADER.parent), "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        what, name, value = line.split()
        result[f"{what} {name}"] = int(value)
    return result


@pytest.mark.parametrize("cname", sorted(abi.STRUCTS))
def test_struct_layout_matches_header(probe, cname):
    mirror = abi.STRUCTS[cname]
    assert ct.sizeof(mirror) == probe[f"size {cname}"], f"sizeof(struct {cname})"
    for field, _ in mirror._fields_:
        desc = getattr(mirror, field)
        assert desc.offset == probe[f"off {cname}.{field}"], f"offsetof({cname}, {field})"
        assert desc.size == probe[f"fsize {cname}.{field}"], f"sizeof({cname}.{field})"


@pytest.mark.parametrize("name", sorted(abi.CONSTANTS))
def test_constant_matches_header(probe, name):
    assert abi.CONSTANTS[name] == probe[f"const {name}"]


def test_every_reason_and_kind_is_mirrored():
    for r in DropReason:
        assert abi.CONSTANTS[f"XDPOIB_DROP_{r.name}"] == r.value
        assert r.value < abi.DROP_SLOTS
    for k in Kind:
        assert abi.CONSTANTS[f"XDPOIB_KIND_{k.name}"] == k.value
        assert k.value < abi.KIND_SLOTS


def test_header_has_no_enumerator_missing_from_the_mirror():
    import re

    text = abi.HEADER.read_text()
    for name in re.findall(r"^\s*(XDPOIB_(?:DROP|KIND)_[A-Z_]+)\s*=", text, re.M):
        assert name in abi.CONSTANTS, f"{name} is in the header but not in xdpoib.reasons"


def test_metadata_records_fit_and_start_with_version():
    for rec in (abi.TxMeta, abi.RxMeta):
        assert ct.sizeof(rec) <= 32 and ct.sizeof(rec) % 4 == 0
        assert rec._fields_[0][0] == "version" and rec.version.offset == 0 and rec.version.size == 1


def test_rx_meta_encoding_round_trips():
    b = abi.rx_meta(7, 3, 0x8001, multicast=True)
    m = abi.RxMeta.from_bytes(b)
    assert (m.version, m.flags, m.pkey, m.peer_id, m.vif_id) == (abi.META_VERSION, 1, 0x8001, 7, 3)


def test_addr_key_ignores_flags():
    addr = bytes([0x80, 0x00, 0x12, 0x34]) + bytes(range(16))
    k1, k2 = abi.addr_key(addr), abi.addr_key(b"\x00" + addr[1:])
    assert bytes(k1) == bytes(k2) == b"\x00\x12\x34\x00" + bytes(range(16))


@pytest.mark.parametrize("i", range(len(SLOT_MACS)))
def test_mac_slot_function_matches_header(probe, i):
    assert abi.mac_slot(SLOT_MACS[i], abi.PEER_SLOTS) == probe[f"slot mac{i}"]
