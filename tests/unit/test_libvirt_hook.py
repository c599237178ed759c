"""The libvirt hook's pure part (xdpoib/libvirt_hook.py): which NICs of a domain are ours, with which
VLAN, and what each libvirt operation does with them.

The XML files in libvirt_xml/ are what libvirt 9.0 (Debian 12) wrote on the qemu hook's stdin, saved
by a hook that copied its stdin (serial log path rewritten): `sample-prepare-begin` (bridge, bridge,
network and user NICs), `ran-*` (a domain that ran: prepare, started and release of one start),
`vlan-prepare-begin` (a tag and a trunk: libvirt runs `prepare` before it refuses a VLAN on a Linux
bridge). Registering and releasing (idempotency, rollback, an agent that is down) run against a
real agent in tests/integration/test_libvirt_hook_agent.py and under libvirtd in
tests/qemu/test_libvirt.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from xdpoib.errors import UsageError
from xdpoib.libvirt_hook import Nic, Step, bridge_nics, bridge_ports, main, plan

pytestmark = pytest.mark.unit
XML = Path(__file__).parent / "libvirt_xml"


def xml(name: str) -> str:
    return (XML / f"{name}.xml").read_text()


def test_bridge_nics_of_a_domain_with_every_kind_of_nic():
    assert bridge_nics(xml("sample-prepare-begin")) == [Nic("52:54:00:77:01:0a", "xlvb0"),
                                                        Nic("52:54:00:77:01:0b", "xlvb1")]


@pytest.mark.parametrize("name", ["ran-prepare-begin", "ran-started-begin", "ran-release-end"])
def test_the_same_nics_at_every_step_of_a_run(name):
    assert bridge_nics(xml(name)) == [Nic("52:54:00:77:01:0a", "xlvb0"), Nic("52:54:00:77:01:0b", "xlvb1")]


def test_vlan_tag_and_trunk():
    text = xml("vlan-prepare-begin")
    with pytest.raises(UsageError, match=r"interface 2 .* xlvb0: a VLAN trunk \(2 tags\)"):
        bridge_nics(text)
    one = text.replace("<vlan trunk='yes'>", "<vlan>").replace("<tag id='4'/>", "")
    assert bridge_nics(one) == [Nic("52:54:00:77:02:0a", "xlvb0", 3), Nic("52:54:00:77:02:0b", "xlvb0", 3)]


@pytest.mark.parametrize("text, message", [
    ("<domain", "not XML"),
    ("<network/>", "expected a <domain>"),
    ("<domain><devices><interface type='bridge'><mac address='52:54:00:00:00:01'/></interface></devices></domain>",
     "no <source bridge"),
    ("<domain><devices><interface type='bridge'><source bridge='b'/></interface></devices></domain>",
     "no <mac address"),
    ("<domain><devices><interface type='bridge'><source bridge='b'/><mac address='52:54:00'/></interface>"
     "</devices></domain>", "bad MAC"),
    ("<domain><devices><interface type='bridge'><source bridge='b'/><mac address='52:54:00:00:00:01'/>"
     "<vlan><tag id='x'/></vlan></interface></devices></domain>", "bad VLAN tag id"),
    ("<domain><devices><interface type='bridge'><source bridge='b'/><mac address='52:54:00:00:00:01'/>"
     "<vlan><tag id='4095'/></vlan></interface></devices></domain>", "outside 0..4094"),
])
def test_bad_xml_is_one_clear_error(text, message):
    with pytest.raises(UsageError, match=message):
        bridge_nics(text)


def test_upper_case_mac_is_normalised():
    text = xml("sample-prepare-begin").replace("52:54:00:77:01:0a", "52:54:00:77:01:0A")
    assert bridge_nics(text)[0].mac == "52:54:00:77:01:0a"


PORTS = {"xlvb0": {"xve1", "vnet1"}, "xlvb1": {"vnet2"}}.get
NICS = [Nic("52:54:00:77:01:0a", "xlvb0"), Nic("52:54:00:77:01:0b", "xlvb1")]


def test_plan_start_adds_ours_and_skips_the_rest():
    steps = plan("prepare", "begin", NICS, ["xve1", "xve9"], lambda b: PORTS(b, set()))
    assert steps == [Step("add", NICS[0], "xve1"),
                     Step("skip", NICS[1], why="no xdpoib attachment is a port of bridge xlvb1")]


@pytest.mark.parametrize("op, subop", [("stopped", "end"), ("release", "end")])
def test_plan_stop_deletes(op, subop):
    assert [s.action for s in plan(op, subop, NICS, ["xve1"], lambda b: PORTS(b, set()))] == ["del", "skip"]


@pytest.mark.parametrize("op, subop", [("start", "begin"), ("started", "begin"), ("migrate", "begin"),
                                       ("restore", "begin"), ("stopped", "begin"), ("prepare", "end")])
def test_plan_other_operations_do_nothing(op, subop):
    assert plan(op, subop, NICS, ["xve1"], lambda b: PORTS(b, set())) == []


def test_plan_two_uplinks_on_one_bridge_is_refused_on_start_and_both_released_on_stop():
    ports = {"xlvb0": {"xve1", "xve2"}}.get
    with pytest.raises(UsageError, match="2 xdpoib attachments"):
        plan("prepare", "begin", NICS[:1], ["xve1", "xve2"], lambda b: ports(b, set()))
    assert [s.ifname for s in plan("release", "end", NICS[:1], ["xve1", "xve2"], lambda b: ports(b, set()))] \
        == ["xve1", "xve2"]


def test_bridge_ports_reads_sysfs(tmp_path):
    (tmp_path / "br0" / "brif" / "eth4").mkdir(parents=True)
    (tmp_path / "br0" / "brif" / "vnet0").mkdir()
    assert bridge_ports("br0", tmp_path) == {"eth4", "vnet0"}
    assert bridge_ports("nobridge", tmp_path) == set()


def test_main_bad_call_and_ignored_operations(capsys):
    assert main(["dom"], io.StringIO("")) == 2
    assert "expected DOMAIN OPERATION SUBOP" in capsys.readouterr().err
    # operations it does not act on are not even parsed (migrate begin reads stdout as new XML)
    assert main(["dom", "migrate", "begin", "-"], io.StringIO("not xml")) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_main_bad_xml_fails_a_start_in_one_line_and_never_a_release(capsys):
    assert main(["dom", "prepare", "begin", "-"], io.StringIO("<domain"), log=[].append) == 1
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and "not XML" in out.err
    assert main(["dom", "release", "end", "-"], io.StringIO("<domain"), log=[].append) == 0
    assert capsys.readouterr().err == ""
