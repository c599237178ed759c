"""The naive translator that `xdpoib bench e2e` measures xdpoib against: what a user could write in an
afternoon with the oracle.

One process per side holds a TAP device. Per frame, one at a time in a select loop: `os.read` the TAP,
translate Ethernet -> IPoIB with `xdpoib.wire.oracle.eth_to_ipoib`, send the IPoIB frame as one unix
datagram to the other side's process, which translates it back with `ipoib_to_eth` and `os.write`s it
into its TAP. The datagram's first byte stands for the UD completion's "arrived through a multicast
group" bit (1 for a group frame, 0 for unicast), the rest is the IPoIB frame.

Both sides derive the same two IPoIB identities from the side number (0 or 1): each side's tables hold
its TAP as the VIF and the other side as the one peer, behind the REMAC of its (GID, QPN), so ARP is
translated as on the fabric. Frames the oracle refuses, control frames (IGMP/MLD, DHCP) and datagrams
that find the send buffer full (the socket never blocks, so two sides sending to each other cannot
deadlock) are dropped and counted.

    python -m xdpoib.bench.naive SIDE TAPNAME SOCKDIR

creates TAPNAME (in the caller's namespace), binds `SOCKDIR/SIDE`, connects to the other side's socket,
prints `ready` and serves until killed; the caller moves the TAP into its namespace and configures it
(the fd keeps working there). SIGTERM exits and prints the counters on stderr.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import struct
import sys
import time

from xdpoib.errors import FrameError
from xdpoib.reasons import Kind
from xdpoib.wire.addr import IPoIBAddr, remac
from xdpoib.wire.oracle import Peer, Tables, Vif, eth_to_ipoib, ipoib_to_eth

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
PKEY = 0xFFFF
GROUP, UNICAST = b"\x01", b"\x00"
MAX_FRAME = 65536


def identity(side: int) -> IPoIBAddr:
    """The IPoIB address of one side: QPN 0x100 + side, a link-local GID."""
    guid = 0x0002C90300000001 + side
    return IPoIBAddr(0, 0x100 + side, bytes.fromhex("fe80000000000000") + guid.to_bytes(8, "big"))


def tables(side: int, mac: bytes) -> tuple[Tables, Vif, Peer]:
    """This side's tables: its TAP's MAC as the VIF, the other side as the one peer."""
    other = identity(1 - side)
    vif = Vif(0, mac, identity(side))
    peer = Peer(0, remac(other.gid, other.qpn), other)
    return Tables(vifs=[vif], peers=[peer]), vif, peer


def open_tap(name: str) -> int:
    """Create a TAP device (no packet-info header) and return its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def connect(sock: socket.socket, path: str, timeout: float = 10.0) -> None:
    """Connect to the other side's socket once it is bound. Two datagram sockets connected to each other
    are limited by their send buffer only, not by the receive queue's max_dgram_qlen (10 datagrams)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def serve(side: int, tapname: str, sockdir: str) -> None:
    tap = open_tap(tapname)
    with open(f"/sys/class/net/{tapname}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    t, vif, peer = tables(side, mac)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(sockdir, str(side)))
    connect(sock, os.path.join(sockdir, str(1 - side)))
    sock.setblocking(False)
    counts = {"to_peer": 0, "to_tap": 0, "dropped": 0}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"naive {side}: {counts}"))
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([tap, sock], [], [])
        if tap in ready:
            frame = os.read(tap, MAX_FRAME)
            try:
                res = eth_to_ipoib(frame, t)
                if res.kind not in (Kind.PEER, Kind.GROUP):
                    raise FrameError(res.kind, "not for the peer")
                sock.send((GROUP if res.kind == Kind.GROUP else UNICAST) + res.frame)
                counts["to_peer"] += 1
            except (FrameError, OSError):
                counts["dropped"] += 1
        if sock in ready:
            data = sock.recv(MAX_FRAME)
            try:
                res = ipoib_to_eth(data[1:], t, src=peer, vif=vif, pkey=PKEY, multicast=data[:1] == GROUP)
                os.write(tap, res.frame)
                counts["to_tap"] += 1
            except (FrameError, OSError):
                counts["dropped"] += 1


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
