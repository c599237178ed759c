"""TAP mode: a "VM" (this test, holding the TAP's fd as qemu would) talks ARP and ICMP through an
attached TAP to a veth-mode host across the sim fabric."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import time
import uuid

import pytest
from labkit import attached
from labkit import xdpoib as x

from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, ZERO_MAC, gid_str
from xdpoib.wire.mgid import ipv6_mgid

SIM_HOSTS = 2
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP, PEER_IP = bytes([10, 55, 0, 1]), bytes([10, 55, 0, 2])


@pytest.fixture
def vm_tap():
    """A TAP held open by this process, like a VM's."""
    name = f"xt{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield name, fd
    finally:
        x("detach", name, check=False)
        os.close(fd)
        subprocess.run(["ip", "link", "del", name], check=False)


def agent_says(tap: str) -> str:
    """The TAP agent's warnings and errors (its log is removed at a clean detach): for assertion messages."""
    from xdpoib import state

    try:
        text = state.log_path(state.attachment_id(tap, None)).read_text()
    except OSError as e:
        return f"(no agent log: {e})"
    return "agent log: " + " | ".join(ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln)


def read_until(fd, pred, timeout=10.0):
    """Frames the 'VM' receives until one matches pred."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            frame = os.read(fd, 4096)
            if pred(frame):
                return frame
    raise AssertionError("the VM received no matching frame")


def test_vm_behind_a_tap_pings_a_host_across_the_fabric(sim_fabric, vm_tap):
    tap, fd = vm_tap
    with attached(sim_fabric, ["h2"], net="10.55.0", prefix="xp"):       # the host across the fabric
        x("attach", tap, "--mode", "tap", "--sim", f"{sim_fabric.name}:h1")

        # ARP for the peer; the reply comes from its REMAC, addressed to the guest's MAC
        os.write(fd, f.eth(BROADCAST_MAC, GUEST_MAC, f.ETH_P_ARP,
                           f.arp(f.ARPOP_REQUEST, GUEST_MAC, GUEST_IP, ZERO_MAC, PEER_IP)))
        reply = read_until(fd, lambda fr: fr[12:14] == b"\x08\x06" and fr[20:22] == b"\x00\x02")
        assert reply[:6] == GUEST_MAC
        a = f.parse_arp(reply[14:])
        assert a.spa == PEER_IP and a.tha == GUEST_MAC and a.tpa == GUEST_IP
        remac = a.sha
        assert remac[0] & 0x03 == 0x02

        echo = f.ipv4(GUEST_IP, PEER_IP, f.IPPROTO_ICMP, f.icmp_echo(0x4242, 1, b"from the vm"))
        os.write(fd, f.eth(remac, GUEST_MAC, f.ETH_P_IP, echo))
        pong = read_until(fd, lambda fr: fr[12:14] == b"\x08\x00" and fr[14 + 9] == f.IPPROTO_ICMP
                          and fr[34] == f.ICMP_ECHO_REPLY)
        assert pong[:6] == GUEST_MAC and pong[6:12] == remac and pong.endswith(b"from the vm")

        # anti-spoof: another source MAC from the same TAP is dropped and counted
        os.write(fd, f.eth(remac, bytes.fromhex("525400999999"), f.ETH_P_IP, echo))
        time.sleep(0.5)
        st = json.loads(x("status", tap, "-j").stdout)
        assert st["eth"]["mac"] == "52:54:00:12:34:56"
        # the guest's MAC known, the TAP moved from the plain path to the translating XDP programs,
        # whose anti-spoof check dropped the forged frame
        assert st["datapath"]["kind"] == "bpf" and st["counters"].get("datapath_upgrades") == 1, agent_says(tap)
        assert "datapath_upgrade_failures" not in st["counters"]
        assert st["datapath"]["tx"]["drops"].get("spoofed_source", 0) >= 1

        # the guest's MLD report (its solicited-node group) is snooped: the port joins that group
        snm = bytes.fromhex("ff0200000000000000000001ff123456")
        ll = bytes.fromhex("fe800000000000005054" + "00fffe123456")
        dst = bytes.fromhex("ff020000000000000000000000000016")
        hbh = bytes([f.IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0])
        mld = f.icmpv6(ll, dst, 143, 0, struct.pack("!HH", 0, 1) + bytes([4, 0, 0, 0]) + snm)
        os.write(fd, f.eth(bytes.fromhex("333300000016"), GUEST_MAC, f.ETH_P_IPV6,
                           f.ipv6(ll, dst, f.IPPROTO_HOPOPTS, hbh + mld, hop_limit=1)))
        want = gid_str(ipv6_mgid(snm))

        def joined():
            groups = json.loads(x("groups", tap, "-j").stdout)
            return any(g["mgid"] == want and "snooped" in g["why"] and g["join_state"] & 1 for g in groups)

        deadline = time.monotonic() + 5
        while not joined() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert joined(), x("groups", tap).stdout
        assert "JoinState" in sim_fabric.saquery("h2", "--smkey", "1", "MCMR", "--mgid", want).stdout

        x("detach", tap)                    # the TAP stays (the VM holds it), as it was before
        shown = subprocess.run(["ip", "link", "show", tap], capture_output=True, text=True).stdout
        assert "xdp" not in shown and "mtu 1500" in shown


def test_tap_mode_refuses_a_namespace_and_a_missing_tap(sim_fabric):
    r = x("attach", "nosuchtap0", "--mode", "tap", "--sim", f"{sim_fabric.name}:h1", check=False)
    assert r.returncode != 0 and "not an existing TAP" in r.stderr
    r = x("attach", "tap0", "--mode", "tap", "--netns", "x", "--sim", f"{sim_fabric.name}:h1", check=False)
    assert r.returncode != 0 and "drop --netns" in r.stderr


def test_a_tap_attachment_restarts_without_losing_the_vms_pings(sim_fabric, vm_tap, figures):
    """`xdpoib restart` of a TAP attachment (the VM's MAC learned, the translating programs in use): the
    new agent adopts the bridge and veth hop, takes the AF_XDP socket over and announces the guest's
    addresses with its new QPN; the host across the fabric pings the VM every 20 ms throughout."""
    import re
    import threading

    tap, fd = vm_tap
    stop = threading.Event()

    def vm():
        """The guest: answers ARP for its address and ICMP echo requests, as a VM's stack would."""
        while not stop.is_set():
            r, _, _ = select.select([fd], [], [], 0.1)
            if not r:
                continue
            try:
                fr = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if fr[12:14] == b"\x08\x06" and fr[20:22] == b"\x00\x01" and fr[38:42] == GUEST_IP:
                os.write(fd, f.eth(fr[6:12], GUEST_MAC, f.ETH_P_ARP,
                                   f.arp(f.ARPOP_REPLY, GUEST_MAC, GUEST_IP, fr[22:28], fr[28:32])))
            elif fr[12:14] == b"\x08\x00" and fr[14 + 9] == f.IPPROTO_ICMP and fr[30:34] == GUEST_IP:
                ihl = (fr[14] & 0x0F) * 4
                icmp = fr[14 + ihl:]
                if icmp[0] == 8:
                    ident, seq = struct.unpack("!HH", icmp[4:8])
                    os.write(fd, f.eth(fr[6:12], GUEST_MAC, f.ETH_P_IP,
                                       f.ipv4(GUEST_IP, fr[26:30], f.IPPROTO_ICMP,
                                              f.icmp_echo(ident, seq, icmp[8:], reply=True))))

    with attached(sim_fabric, ["h2"], net="10.55.0", prefix="xp") as (peer,):
        x("attach", tap, "--mode", "tap", "--sim", f"{sim_fabric.name}:h1")
        t = threading.Thread(target=vm, daemon=True)
        t.start()
        try:
            # the guest speaks first (its MAC is learned, the TAP moves to the translating programs)
            os.write(fd, f.eth(BROADCAST_MAC, GUEST_MAC, f.ETH_P_ARP,
                               f.arp(f.ARPOP_REQUEST, GUEST_MAC, GUEST_IP, ZERO_MAC, PEER_IP)))
            ping = ["ip", "netns", "exec", peer, "ping", "-W", "2"]
            assert subprocess.run([*ping, "-c", "3", "10.55.0.1"], capture_output=True).returncode == 0
            st = json.loads(x("status", tap, "-j").stdout)
            assert st["datapath"]["kind"] == "bpf", agent_says(tap)
            pinger = subprocess.Popen([*ping, "-i", "0.02", "-c", "300", "10.55.0.1"], stdout=subprocess.PIPE,
                                      text=True)
            time.sleep(1.0)
            outs = [x("restart", tap).stdout for _ in range(2) if not time.sleep(1.0)]
            out, _ = pinger.communicate(timeout=60)
            after = json.loads(x("status", tap, "-j").stdout)
        finally:
            stop.set()
            t.join(5)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        figures(f"\nrestart x2 of a TAP attachment under pings every 20 ms from across the fabric: "
                f"{m.group(2)} of {m.group(1)} answered; {'; '.join(o.strip() for o in outs)}")
        assert after["attachment"]["pid"] != st["attachment"]["pid"] and after["qpn"] != st["qpn"]
        assert after["eth"]["mac"] == "52:54:00:12:34:56" and after["datapath"]["kind"] == "bpf"
        # the second successor started while both predecessors still drained (each in its receive region
        # of the inject map): it got the last region, and still receives in place
        assert after["datapath"]["rx_into"] == "inject_slots", agent_says(tap)
        peer_st = json.loads(x("status", "eth4", "--netns", peer, "-j").stdout)
        assert m.group(1) == m.group(2), (f"{m.group(1)} sent, {m.group(2)} answered; drops at the peer "
                                          f"{peer_st['drops']}, here {after['drops']} {after['counters']}")
        x("detach", tap)                    # the MTU the TAP had before the first attach comes back
        shown = subprocess.run(["ip", "link", "show", tap], capture_output=True, text=True).stdout
        assert "xdp" not in shown and "mtu 1500" in shown
