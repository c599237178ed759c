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


def _ns_of_this_thread() -> str:
    import os

    return os.readlink("/proc/thread-self/ns/net")


def test_eth4_read_inside_its_namespace_matches_the_tools(netns):
    """read_eth4 (the agent's once-a-second read, no subprocess) sees what `cat /proc/net/igmp*` and
    `ip -o addr` see in eth4's namespace, leaves out tentative addresses, and returns the thread home."""
    from ipaddress import ip_address

    from xdpoib.agent import links

    inner = f"xi{uuid.uuid4().hex[:6]}"
    link.create_veth("eth4", inner, netns)
    try:
        ip = ["ip", "-n", netns]
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.neigh.eth4.retrans_time_ms=30000"],
                       check=True)
        link.set_link("eth4", netns, up=True)
        link.set_link(inner, None, up=True)
        for a in ("10.9.0.1/24", "10.9.0.2/24", "192.0.2.7/32"):
            subprocess.run([*ip, "addr", "add", a, "dev", "eth4"], check=True)
        subprocess.run([*ip, "addr", "add", "2001:db8::5/64", "dev", "eth4", "nodad"], check=True)
        subprocess.run([*ip, "addr", "add", "2001:db8::6/64", "dev", "eth4"], check=True)     # DAD: 30 s

        class Spec:
            ifname = "eth4"

        Spec.netns = netns
        home = _ns_of_this_thread()
        groups, addrs = links.read_eth4(Spec)
        assert _ns_of_this_thread() == home

        tools = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/igmp6", "/proc/net/igmp"],
                               capture_output=True, text=True, check=True).stdout
        assert groups == tools and "eth4" in groups and "ff020000000000000000000000000001" in groups
        listed = subprocess.run([*ip, "-o", "addr", "show", "dev", "eth4"], capture_output=True, text=True,
                                check=True).stdout.splitlines()
        want = {ip_address(line.split()[3].split("/")[0]).packed for line in listed if "tentative" not in line}
        assert set(addrs) == want and len(addrs) == len(want)
        assert ip_address("2001:db8::6").packed not in addrs and any("tentative" in x for x in listed)
        assert {ip_address(x) for x in addrs} >= {ip_address("10.9.0.1"), ip_address("10.9.0.2"),
                                                   ip_address("192.0.2.7"), ip_address("2001:db8::5")}

        Spec.netns = "no-such-ns-xdpoib"
        with pytest.raises(link.LinkError, match="no-such-ns-xdpoib"):
            links.read_eth4(Spec)
        Spec.netns, Spec.ifname = netns, "nope0"
        with pytest.raises(link.LinkError, match="no link 'nope0'"):
            links.read_eth4(Spec)
        assert _ns_of_this_thread() == home
    finally:
        link.delete_link(inner)
