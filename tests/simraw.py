"""Raw datagrams onto the sim fabric, as any sender: what a broken or hostile host could put on the wire.

The sim transport (xdpoib/fabric/simud_wire.py) carries each UD packet as a header and a payload in a
unix datagram sent to the receiving QP's abstract socket (xdpoib/fabric/simud.py `qp_address`); the
receiver applies IB's rules (QPN, Q_Key, P_Key, multicast membership). Nothing checks the sender's
fields, so a test can claim any SLID, source QPN or GID, and any P_Key or Q_Key.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from xdpoib.fabric import simud, simud_wire
from xdpoib.fabric.base import MCAST_QPN
from xdpoib.wire.addr import parse_gid


@dataclass(frozen=True)
class Target:
    """An agent's QP as its `status -j` shows it."""

    guid: int
    qpn: int
    lid: int
    gid: bytes
    qkey: int
    pkey: int
    bcast: bytes

    @classmethod
    def of(cls, st: dict) -> Target:
        return cls(int(st["port"]["guid"], 16), st["qpn"], st["port"]["lid"], parse_gid(st["port"]["gid"]),
                   int(st["broadcast"]["qkey"], 16), int(st["attachment"]["pkey"], 16),
                   parse_gid(st["broadcast"]["mgid"]))


class RawSender:
    """Writes simulated UD packets to one fabric's QPs (see the module doc)."""

    def __init__(self, fabric: str):
        self.fabric = fabric
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)

    def send(self, t: Target, payloads: list[bytes], *, slid: int = 0x300, src_qpn: int = 0x4242,
             sgid: bytes | None = None, qkey: int | None = None, pkey: int | None = None,
             multicast: bool = False, dgid: bytes | None = None) -> int:
        """Send payloads to t's QP in one bundle; a GRH when sgid is given (always for multicast)."""
        grh = sgid is not None or multicast
        p = simud_wire.Packet(slid=slid, dlid=t.lid, sl=0, pkey=t.pkey if pkey is None else pkey,
                              src_qpn=src_qpn, dst_qpn=MCAST_QPN if multicast else t.qpn,
                              qkey=t.qkey if qkey is None else qkey, grh=grh,
                              sgid=sgid or bytes(16), dgid=dgid or (t.bcast if multicast else t.gid), payload=b"")
        head = simud_wire.prefix(p)
        data = b"".join(head + len(x).to_bytes(2, "big") + x for x in payloads)
        return self.sock.sendto(data, simud.qp_address(self.fabric, t.guid, t.qpn))

    def close(self) -> None:
        self.sock.close()


def fake_gid(n: int) -> bytes:
    """A GID no port of the fabric has (a made-up port GUID under fe80::)."""
    return bytes.fromhex("fe80000000000000") + (0x0A00000000000000 | n).to_bytes(8, "big")


def ipv4_to_nowhere(n: int = 0) -> bytes:
    """An IPoIB IPv4/UDP frame addressed to 10.254.x.y (nobody: the host drops it without answering)."""
    from xdpoib.wire import frames as f

    ip = f.ipv4(bytes([10, 253, 0, 1]), bytes([10, 254, (n >> 8) & 0xFF, n & 0xFF]), 17,
                f.udp(bytes(4), bytes(4), 9, 9, b"raw"))
    return f.ipoib(0x0800, ip)
