"""The sim UD transport's wire format and receive rules: pure functions, no I/O.

One unix datagram carries a bundle of simulated UD packets (a whole `post_send` batch for one
destination QP, so the receiver's small socket queue holds many packets). Each packet is a fixed
56-byte header, then the payload:

    magic "XU" (2) | flags (1) | sl (1) | slid (2) | dlid (2) | pkey (2) | src_qpn (4) | dst_qpn (4) |
    qkey (4) | sgid (16) | dgid (16) | length (2)

Everything but the length is the same for every packet of one (sender QP, address handle, QPN, Q_Key),
so both ends handle that prefix once per batch (`prefix`, `split`).

`flags` bit 0: a GRH is present (then sgid/dgid are meaningful). All integers big-endian.

Version 2 (what senders write; receivers take both): one datagram is one *bundle* of `count` packets of
one flow, its header written once, then the packets' lengths, then their payloads at a fixed `stride`
(the longest payload; shorter ones padded), so both ends move a bundle with a few array operations and
no work per packet (docs/datapath.md):

    magic "XB" (2) | version 2 (1) | flags (1) | sl (1) | 0 (1) | slid (2) | dlid (2) | pkey (2) |
    src_qpn (4) | dst_qpn (4) | qkey (4) | sgid (16) | dgid (16) | count (2) | stride (2) |
    lengths (2 x count) | payloads (stride x count)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from xdpoib.fabric.base import GRH_LEN, MCAST_QPN, FabricCounter, pkey_matches

HEADER = struct.Struct("!2sBBHHHIII16s16sH")
PREFIX_LEN = HEADER.size - 2
MAGIC = b"XU"
FLAG_GRH = 0x01
BUNDLE_MAX = 160 * 1024        # bytes per unix datagram (below the default socket send buffer)
GRH_NEXT_HEADER = 0x1B         # IBA: the next header after a GRH is the BTH

BUNDLE = struct.Struct("!2sBBBxHHHIII16s16sHH")      # version 2 header (count and stride last)
BUNDLE_MAGIC = b"XB"
VERSION = 2
FLOW_LEN = BUNDLE.size - 4                           # the header without count and stride: one flow


@dataclass(frozen=True)
class Packet:
    """One simulated UD packet as the receiver sees it."""

    slid: int
    dlid: int
    sl: int
    pkey: int
    src_qpn: int
    dst_qpn: int
    qkey: int
    grh: bool
    sgid: bytes
    dgid: bytes
    payload: bytes


def prefix(p: Packet) -> bytes:
    """The header of `p` without its length: shared by every packet of one flow."""
    return HEADER.pack(MAGIC, FLAG_GRH if p.grh else 0, p.sl, p.slid, p.dlid, p.pkey, p.src_qpn, p.dst_qpn,
                       p.qkey, p.sgid, p.dgid, 0)[:PREFIX_LEN]


def encode(p: Packet) -> bytes:
    """One packet: header + payload."""
    return prefix(p) + len(p.payload).to_bytes(2, "big") + bytes(p.payload)


def parse_prefix(head: bytes, payload: bytes = b"") -> Packet:
    """The packet fields of a header prefix (with `payload` attached)."""
    _m, flags, sl, slid, dlid, pkey, src, dst, qkey, sgid, dgid, _l = HEADER.unpack(head + b"\0\0")
    return Packet(slid, dlid, sl, pkey, src, dst, qkey, bool(flags & FLAG_GRH), sgid, dgid, payload)


def bundles(encoded: list[bytes]) -> Iterator[tuple[bytes, int]]:
    """Join encoded packets into datagrams of at most BUNDLE_MAX bytes: (datagram, packets in it)."""
    chunk: list[bytes] = []
    size = 0
    for e in encoded:
        if chunk and size + len(e) > BUNDLE_MAX:
            yield b"".join(chunk), len(chunk)
            chunk, size = [], 0
        chunk.append(e)
        size += len(e)
    if chunk:
        yield b"".join(chunk), len(chunk)


def split(datagram: memoryview) -> tuple[list[tuple[bytes, memoryview]], int]:
    """A datagram's packets as (header prefix, payload view), and how many malformed bytes ended it."""
    out = []
    off, n = 0, len(datagram)
    while off < n:
        body = off + HEADER.size
        if body > n:
            return out, n - off
        end = body + int.from_bytes(datagram[body - 2:body], "big")
        head = bytes(datagram[off:off + PREFIX_LEN])
        if end > n or head[:2] != MAGIC:
            return out, n - off
        out.append((head, datagram[body:end]))
        off = end
    return out, 0


def decode(datagram: bytes) -> tuple[list[Packet], int]:
    """The packets of one datagram, and how many malformed bytes ended it (0 when all were good)."""
    parts, junk = split(memoryview(datagram))
    return [parse_prefix(head, bytes(body)) for head, body in parts], junk


def grh(p: Packet, traffic_class: int = 0, flow_label: int = 0, hop_limit: int = 1,
        length: int | None = None) -> bytes:
    """The 40-byte GRH a verbs UD receive would put in front of the payload (IPv6 layout)."""
    vtf = (6 << 28) | (traffic_class << 20) | flow_label
    size = len(p.payload) if length is None else length
    return struct.pack("!IHBB16s16s", vtf, size, GRH_NEXT_HEADER, hop_limit, p.sgid, p.dgid)


def effective_qkey(remote_qkey: int, own_qkey: int) -> int:
    """The Q_Key a UD send carries: the QP's own when the request's high bit is set (IBA 10.2.4)."""
    return own_qkey if remote_qkey & 0x80000000 else remote_qkey


def receive_verdict(p: Packet, qpn: int, qkey: int, qp_pkey: int, port_pkeys: tuple[int, ...],
                    attached: frozenset[bytes] | set[bytes]) -> FabricCounter | None:
    """Why a QP must drop packet `p` (None: accept). Membership in the SA is checked by the caller.

    Rules: addressed to this QP, or multicast (QPN 0xFFFFFF, GRH, MGID this QP is attached to); Q_Key
    equal to the QP's; P_Key matching the QP's (same partition, not both limited members) while the QP's
    P_Key is still in the port's table.
    """
    if p.dst_qpn == MCAST_QPN:
        if not p.grh or p.dgid not in attached:
            return FabricCounter.NOT_MEMBER
    elif p.dst_qpn != qpn:
        return FabricCounter.NO_DESTINATION
    if p.qkey != qkey:
        return FabricCounter.QKEY_MISMATCH
    in_table = any(k & 0x7FFF and (k & 0x7FFF) == (qp_pkey & 0x7FFF) for k in port_pkeys)
    if not in_table or not pkey_matches(p.pkey, qp_pkey):
        return FabricCounter.PKEY_MISMATCH
    return None


def fits(payload_len: int, buffer_size: int) -> bool:
    """True if a payload fits a receive buffer after its GRH area."""
    return payload_len <= buffer_size - GRH_LEN


# ---------------------------------------------------------------- version 2: bundles

def flow_header(p: Packet) -> bytes:
    """The version 2 header of `p`'s flow, without count and stride (`FLOW_LEN` bytes)."""
    return BUNDLE.pack(BUNDLE_MAGIC, VERSION, FLAG_GRH if p.grh else 0, p.sl, p.slid, p.dlid, p.pkey, p.src_qpn,
                       p.dst_qpn, p.qkey, p.sgid, p.dgid, 0, 0)[:FLOW_LEN]


def parse_flow(head) -> Packet:
    """The packet fields of a version 2 flow header (no payload)."""
    _m, _v, flags, sl, slid, dlid, pkey, src, dst, qkey, sgid, dgid, _c, _s = BUNDLE.unpack(
        bytes(head[:FLOW_LEN]) + bytes(4))
    return Packet(slid, dlid, sl, pkey, src, dst, qkey, bool(flags & FLAG_GRH), sgid, dgid, b"")


def bundle_limit(stride: int) -> int:
    """Packets of `stride` bytes one bundle holds (at least 1)."""
    return max(1, (BUNDLE_MAX - BUNDLE.size) // (stride + 2))


def bundle_parts(flow: bytes, lengths: np.ndarray, block) -> list:
    """The buffers of one bundle: header, lengths, then `block` (count x stride payload bytes, any buffer)."""
    n = len(lengths)
    stride = (len(memoryview(block).cast("B")) // n) if n else 0
    return [flow + struct.pack("!HH", n, stride), lengths.astype(">u2").tobytes(), block]


def encode_bundles(flow: bytes, payloads: Sequence) -> Iterator[tuple[bytes, int]]:
    """Version 2 datagrams carrying `payloads` (the object path): (datagram, packets in it)."""
    i, n = 0, len(payloads)
    while i < n:
        stride, k = 1, 0
        while i + k < n:
            wider = max(stride, len(payloads[i + k]))
            if k and BUNDLE.size + (k + 1) * (wider + 2) > BUNDLE_MAX:
                break
            stride, k = wider, k + 1
        chunk = payloads[i:i + k]
        lengths = [len(p) for p in chunk]
        body = b"".join(bytes(p).ljust(stride, b"\0") for p in chunk)
        yield b"".join((flow, struct.pack(f"!HH{k}H", k, stride, *lengths), body)), k
        i += k


def bundle_header(datagram) -> tuple[int, int] | None:
    """(count, stride) of a version 2 datagram whose size adds up, else None (malformed)."""
    mv = memoryview(datagram)
    if len(mv) < BUNDLE.size or bytes(mv[:2]) != BUNDLE_MAGIC or mv[2] != VERSION:
        return None
    n, stride = struct.unpack_from("!HH", mv, FLOW_LEN)
    if n == 0 or stride == 0 or len(mv) != BUNDLE.size + 2 * n + n * stride:
        return None
    return n, stride


def decode_bundle(datagram) -> tuple[bytes, np.ndarray, np.ndarray] | None:
    """A version 2 datagram as (flow header, lengths, count x stride uint8 payload block), or None if it is
    malformed (short, wrong magic or version, lengths past the stride, a size that does not add up)."""
    mv = memoryview(datagram)
    if len(mv) < BUNDLE.size or bytes(mv[:2]) != BUNDLE_MAGIC or mv[2] != VERSION:
        return None
    n, stride = struct.unpack_from("!HH", mv, FLOW_LEN)
    body = BUNDLE.size + 2 * n
    if n == 0 or stride == 0 or len(mv) != body + n * stride:
        return None
    lengths = np.frombuffer(mv, ">u2", n, BUNDLE.size).astype(np.int64)
    if lengths.max() > stride:
        return None
    block = np.frombuffer(mv, np.uint8, n * stride, body).reshape(n, stride)
    return bytes(mv[:FLOW_LEN]), lengths, block
