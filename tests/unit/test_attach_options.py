"""`xdpoib attach` options that need no fabric: `--ebpf` prints the BPF C the agent compiles and exits
(no IFNAME, no root, nothing attached, as bcc's tools do), `--mac-form` is parsed into the spec."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xdpoib.cli import build_parser
from xdpoib.datapath import loader
from xdpoib.state import AttachSpec


def test_ebpf_prints_the_inlined_source_and_exits_without_anything_else():
    r = subprocess.run([sys.executable, "-m", "xdpoib", "attach", "--ebpf"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    head, _, body = r.stdout.partition(" */\n")
    assert head.startswith("/* xdpoib datapath: xdpoib.c") and " ".join(loader.Build().cflags()) in head
    assert body == loader.source()                      # the very text bcc is given
    assert '#include "' not in body                     # local headers inlined
    for prog in loader.PROGRAMS:
        assert f"int {prog}(" in body, prog


def test_ebpf_comes_before_the_other_checks():
    """Even with other options (and a missing IFNAME), --ebpf only prints; run as nobody it needs no root."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["attach", "--ebpf", "--sim", "nofabric:h1"])
    assert e.value.code == 0


def test_mac_form_is_a_choice_kept_in_the_spec():
    p = build_parser()
    assert p.parse_args(["attach", "eth4", "--sim", "lab:h1"]).mac_form == "lemac"
    assert p.parse_args(["attach", "eth4", "--sim", "lab:h1", "--mac-form", "mellanox"]).mac_form == "mellanox"
    with pytest.raises(SystemExit):
        p.parse_args(["attach", "eth4", "--sim", "lab:h1", "--mac-form", "eui64"])
    spec = AttachSpec("eth4", mac_form="mellanox")
    assert AttachSpec.from_json(spec.to_json()).mac_form == "mellanox"
    assert AttachSpec.from_json('{"ifname": "eth4"}').mac_form == "lemac"     # a spec written before the option
    guid = bytes.fromhex("f4521403008d5211")
    assert spec.port_mac(guid).hex() == "0252148d5211" and AttachSpec("eth4").port_mac(guid).hex() == "f452148d5211"
