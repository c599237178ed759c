"""xdpoib.link on real links: veth pairs across namespaces, MAC/MTU, offloads set and restored, errors."""

import subprocess
import uuid

import pytest
from prereq import need_cmd, need_root

from xdpoib import link


@pytest.fixture
def netns():
    need_root()
    need_cmd("ip", "ethtool")
    name = f"xdpoib-t{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_veth_into_namespace_and_back_out(netns):
    inner = f"xi{uuid.uuid4().hex[:6]}"
    link.create_veth("eth4", inner, netns)
    try:
        assert link.link_exists("eth4", netns) and link.link_exists(inner)
        assert not link.link_exists(inner, netns)
        link.set_link("eth4", netns, mac="f4:52:14:8d:52:11", mtu=2044, up=True)
        info = link.link_info("eth4", netns)
        assert (info.mac, info.mtu, info.kind, info.up) == ("f4:52:14:8d:52:11", 2044, "veth", True)
        assert not link.is_tap(inner)
        before = link.set_offloads("eth4", netns, tx=False, tso=False)
        now = link.get_offloads("eth4", netns)
        assert now["tx"] is False and now["tso"] is False
        link.set_offloads("eth4", netns, **before)
        assert {k: link.get_offloads("eth4", netns)[k] for k in before} == before
    finally:
        assert link.delete_link(inner)
    assert not link.link_exists("eth4", netns)
    assert link.delete_link(inner) is False


def test_clear_errors_for_bad_names(netns):
    with pytest.raises(link.LinkError, match="does not exist"):
        link.check_netns("no-such-ns-xdpoib")
    assert link.check_netns(netns) == netns and link.check_netns(None) is None
    with pytest.raises(link.LinkError, match="invalid interface name"):
        link.check_ifname("this-name-is-far-too-long")
    with pytest.raises(link.LinkError, match="no interface"):
        link.link_info("nope0", netns)


def test_tap_is_recognised():
    need_root()
    name = f"xt{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        assert link.is_tap(name) and link.link_info(name).kind == "tun"
    finally:
        link.delete_link(name)
