"""Bring-up and stop options that need no fabric: `attach --wait` in the spec and its bounds, the line a
partition without a broadcast group ends with, and the links `detach` removes for an agent that did not
stop (named from the attachment id, as attach names them)."""

from __future__ import annotations

import pytest

from xdpoib.agent.partitions import no_group_line
from xdpoib.cli import build_parser
from xdpoib.commands.attach import build_spec
from xdpoib.commands.detach import own_links
from xdpoib.errors import UsageError
from xdpoib.fabric.sa import SATimeoutError, status_error
from xdpoib.state import AttachSpec, link_tag
from xdpoib.wire.mgid import broadcast_mgid


def test_wait_is_kept_in_the_spec_with_60_s_by_default():
    p = build_parser()
    assert p.parse_args(["attach", "eth4", "--sim", "lab:h1"]).wait == 60.0
    assert p.parse_args(["attach", "eth4", "--sim", "lab:h1", "--wait", "2.5"]).wait == 2.5
    assert AttachSpec.from_json(AttachSpec("eth4", wait=7.0).to_json()).wait == 7.0
    assert AttachSpec.from_json('{"ifname": "eth4"}').wait == 60.0          # a spec written before the option


@pytest.mark.parametrize("value", ["-1", "3601"])
def test_a_wait_out_of_bounds_is_refused_before_anything_else(value):
    args = build_parser().parse_args(["attach", "eth4", "--sim", "nofabric:h1", "--wait", value])
    with pytest.raises(UsageError, match=r"bad --wait"):
        build_spec(args)


@pytest.mark.parametrize("status", [0x0200, 0x0600])
def test_no_broadcast_group_names_the_ipoib_flag(status):
    mgid = broadcast_mgid(0x8006)
    line = no_group_line(0x8006, mgid, 4, status_error(status, "join"))
    assert "\n" not in line and "ff12:401b:8006::ffff:ffff" in line and f"status {status:#06x}" in line
    assert "`ipoib` flag" in line and "partitions.conf" in line and "P8006=0x8006, ipoib" in line


def test_an_sa_that_never_answers_is_said_as_it_is():
    line = no_group_line(0xFFFF, broadcast_mgid(0xFFFF), 60, SATimeoutError("join: no answer"))
    assert "ipoib" not in line and "no answer" in line and "after 60 s" in line


def test_detach_removes_the_links_attach_names_from_the_attachment_id():
    veth = AttachSpec("eth4", "blue")
    tag = link_tag(veth.id)
    assert own_links(veth) == [f"xo{tag}", f"xa{tag}", f"xb{tag}"]
    tap = AttachSpec("tap0", None, mode="tap")
    t = link_tag(tap.id)
    assert own_links(tap) == [f"xo{t}", f"xa{t}", f"xb{t}", f"xr{t}", f"xs{t}"]
