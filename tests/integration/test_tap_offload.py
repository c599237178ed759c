"""TAP mode with a VM's offloads: frames with partial checksums and UDP GSO super-frames, written into a
TAP with vnet headers the way qemu does by default (IFF_VNET_HDR, TUNSETOFFLOAD), reach a host across
the fabric completed and segmented, so its sockets accept them (a partial checksum arriving as it
was is dropped by the receiver's UDP checksum check). The "VM" is this test holding the TAP's fd."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import time
import uuid

import pytest
from labkit import xdpoib as x

from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, ZERO_MAC

SIM_HOSTS = 2
TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
VNET_F_NEEDS_CSUM, GSO_NONE, GSO_UDP_L4 = 1, 0, 5
VNET = struct.Struct("<BBHHHH")          # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
GUEST_MAC = bytes.fromhex("525400aabbcc")
GUEST_IP, PEER_IP = bytes([10, 56, 0, 1]), bytes([10, 56, 0, 2])
PORT = 7000


@pytest.fixture
def vm_tap(sim_prereqs):
    """A TAP with vnet headers and checksum/TSO/USO offloads on, held open like qemu holds it."""
    name = f"xv{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"], check=True)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield name, fd
    finally:
        x("detach", name, check=False)
        os.close(fd)
        subprocess.run(["ip", "link", "del", name], check=False)


def write(fd: int, frame: bytes, vnet: bytes = VNET.pack(0, GSO_NONE, 0, 0, 0, 0)) -> None:
    os.write(fd, vnet + frame)


def read_until(fd: int, pred, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            frame = os.read(fd, 65536)[VNET.size:]
            if pred(frame):
                return frame
    raise AssertionError("the VM received no matching frame")


def pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    """The folded (not inverted) pseudo-header sum a guest leaves in a partial UDP checksum."""
    words = (*struct.unpack("!4H", src + dst), 17, length)
    s = sum(words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_partial(payload: bytes) -> bytes:
    """IPv4/UDP with the checksum left to the host (CHECKSUM_PARTIAL), as a guest with offloads sends it."""
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", 40000, PORT, length, pseudo_sum(GUEST_IP, PEER_IP, length)) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 7, 0, 64, 17, 0, GUEST_IP, PEER_IP)
    s = sum(struct.unpack("!10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:] + udp


RECEIVER = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.56.0.2',7000))\n"
            "s.settimeout(8);print('ready',flush=True)\n"
            "try:\n while True:\n  d,_=s.recvfrom(65536);print(len(d),d[:12].decode(errors='replace'),flush=True)\n"
            "except socket.timeout:\n pass\n")


def test_partial_checksums_and_udp_gso_from_a_vm_arrive_completed(sim_fabric, vm_tap):
    tap, fd = vm_tap
    ns = f"xo{uuid.uuid4().hex[:5]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    rx = None
    try:
        x("attach", "eth4", "--netns", ns, "--sim", f"{sim_fabric.name}:h2")
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.56.0.2/24", "dev", "eth4"], check=True)
        x("attach", tap, "--mode", "tap", "--sim", f"{sim_fabric.name}:h1")
        write(fd, f.eth(BROADCAST_MAC, GUEST_MAC, f.ETH_P_ARP,
                        f.arp(f.ARPOP_REQUEST, GUEST_MAC, GUEST_IP, ZERO_MAC, PEER_IP)))
        reply = read_until(fd, lambda fr: fr[12:14] == b"\x08\x06" and fr[20:22] == b"\x00\x02")
        remac = f.parse_arp(reply[14:]).sha
        rx = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE,
                              text=True)
        assert rx.stdout.readline().strip() == "ready"
        # 1. one datagram with a partial checksum (the host must finish it)
        write(fd, f.eth(remac, GUEST_MAC, f.ETH_P_IP, udp_partial(b"partial-csum")),
              VNET.pack(VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 6))
        time.sleep(0.5)     # the first frame to the peer waits for its path (a queue of 3 meanwhile)
        # 2. a UDP GSO super-frame of 3 x 300 bytes (the host must segment it, each with its checksum)
        body = b"".join(f"segment-{i}".encode().ljust(300, b".") for i in range(3))
        write(fd, f.eth(remac, GUEST_MAC, f.ETH_P_IP, udp_partial(body)),
              VNET.pack(VNET_F_NEEDS_CSUM, GSO_UDP_L4, 42, 300, 34, 6))
        out, _ = rx.communicate(timeout=30)
    finally:
        if rx is not None and rx.poll() is None:
            rx.kill()
            rx.wait()
        x("detach", "eth4", "--netns", ns, check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)
    got = [line.split(" ", 1) for line in out.splitlines()]
    assert ["12", "partial-csum"] in got, f"the partial-checksum datagram did not arrive intact: {got}"
    segments = sorted(text for n, text in got if n == "300")
    assert segments == ["segment-0...", "segment-1...", "segment-2..."], f"the super-frame was not segmented: {got}"
