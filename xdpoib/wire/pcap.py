"""pcap writer for LINKTYPE_IPOIB (242), the capture format Wireshark's IPoIB dissector reads.

Each record is a 40-byte pseudo-header, then the 4-byte IPoIB header and payload. The pseudo-header
has two forms (Wireshark `packet-ipoib.c`):
- GRH form (what a receiver saw): bytes 0-3 version 6, traffic class, flow label; bytes 5-7 the source
  QPN; bytes 8-23 the source GID; bytes 24-39 the destination GID.
- destination form (what a sender sent), recognised by bytes 0-1 being zero: bytes 20-39 hold the
  20-byte destination IPoIB hardware address (flags, QPN, GID).
"""

from __future__ import annotations

import struct
import time
from typing import BinaryIO

from xdpoib.wire.addr import GID_LEN, IPoIBAddr

LINKTYPE_IPOIB = 242
PSEUDO_HLEN = 40
_MAGIC = 0xA1B2C3D4


def grh_pseudo_header(sgid: bytes, dgid: bytes, src_qpn: int, tclass: int = 0, flow: int = 0) -> bytes:
    """Return the 40-byte GRH-form pseudo-header for a received datagram."""
    if len(sgid) != GID_LEN or len(dgid) != GID_LEN:
        raise ValueError("GIDs are 16 bytes")
    word0 = (6 << 28) | ((tclass & 0xFF) << 20) | (flow & 0xFFFFF)
    return struct.pack("!IB", word0, 0) + (src_qpn & 0xFFFFFF).to_bytes(3, "big") + sgid + dgid


def dest_pseudo_header(dest: IPoIBAddr) -> bytes:
    """Return the 40-byte destination-form pseudo-header for a sent datagram."""
    return b"\x00" * 20 + dest.pack()


class PcapWriter:
    """Write IPoIB frames to a classic pcap stream (microsecond timestamps, LINKTYPE_IPOIB)."""

    def __init__(self, out: BinaryIO, snaplen: int = 65535):
        self._out = out
        self._snaplen = snaplen
        out.write(struct.pack("<IHHiIII", _MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_IPOIB))

    def write(self, pseudo: bytes, frame: bytes, ts: float | None = None) -> None:
        """Append one record: a 40-byte pseudo-header and the IPoIB frame (4-byte header + payload)."""
        if len(pseudo) != PSEUDO_HLEN:
            raise ValueError("the pseudo-header is 40 bytes")
        data = pseudo + bytes(frame)
        ts = time.time() if ts is None else ts
        sec, usec = int(ts), int((ts - int(ts)) * 1_000_000)
        cap = data[:self._snaplen]
        self._out.write(struct.pack("<IIII", sec, usec, len(cap), len(data)) + cap)

    def write_sent(self, dest: IPoIBAddr, frame: bytes, ts: float | None = None) -> None:
        """Append a frame we sent to dest."""
        self.write(dest_pseudo_header(dest), frame, ts)

    def write_received(self, sgid: bytes, dgid: bytes, src_qpn: int, frame: bytes,
                       ts: float | None = None) -> None:
        """Append a frame we received, with its GRH (or the one we reconstruct)."""
        self.write(grh_pseudo_header(sgid, dgid, src_qpn), frame, ts)
