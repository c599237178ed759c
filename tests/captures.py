"""Real IPoIB captures from systems we did not write, read for replay tests (unit and bpf tiers).

The files are not in the repository: they are looked up in `$XDPOIB_VECTORS/ipoib/`, else in the
`shared/vectors/ipoib/` directory next to the repository's own; `need_vectors()` skips on a developer
box without them and fails in CI. Two formats are read:

- pcap LINKTYPE_ERF (197) with Endace ERF records of type 21 (InfiniBand): each record is a whole IB
  packet as it crossed the wire. The reader strips the LRH (8 bytes), the GRH (40, when LNH says so),
  the BTH (12), the DETH (8, UD only), an immediate (4, when the opcode has one), the pad bytes the
  BTH counts, and the ICRC (4) and VCRC (2) at the end; it keeps SLID, DLID, P_Key, destination and
  source QPN, Q_Key, and the GIDs of the GRH. IPoIB frames are the UD sends to a QP other than 0 or 1
  (QP0/QP1 carry MADs) and the RC sends of IPoIB connected mode.
- pcap LINKTYPE_IPOIB (242) as Solaris writes it: a 40-byte pseudo-header whose bytes 20-39 hold a
  20-byte IPoIB hardware address (bytes 0-19 are not initialised), then the 4-byte IPoIB header and
  payload.

`address_book()` then says who sent each frame, from what the capture itself shows (the GRH's source
GID, the SLID of an ARP sender, the ARP sender of an IPv4 source address): the facts a receiver would
have from its completion or from a PathRecord. `Learner` turns that into the peer table an xdpoib agent
would hold after each frame, learning the way it does: an ARP sender address whose QPN is the source
QPN is taken as it stands (flags included), else the completion's (QPN, GID) with flags 0, and every
ND link-layer option seen.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from xdpoib.wire.addr import IPoIBAddr, RemacTable, lemac
from xdpoib.wire.oracle import Peer, Tables, Vif

LINKTYPE_ERF = 197
LINKTYPE_IPOIB = 242
ERF_TYPE_INFINIBAND = 21
ERF_HLEN = 16
LRH_LEN, GRH_LEN, BTH_LEN, DETH_LEN, ICRC_LEN, VCRC_LEN = 8, 40, 12, 8, 4, 2
LNH_IBA_LOCAL, LNH_IBA_GLOBAL = 2, 3
TRANSPORT_RC, TRANSPORT_UD = 0, 3
OP_SEND_ONLY, OP_SEND_ONLY_IMM = 0x04, 0x05
MCAST_QPN = 0xFFFFFF
MCAST_LID_BASE = 0xC000
PSEUDO_HLEN = 40

ERF_FILE = "wireshark_sample_infiniband_erf.pcap"
SOLARIS_FILE = "tcpdump_ipoib.pcap"


def vectors_dir() -> Path:
    """Where the IPoIB vectors live: `$XDPOIB_VECTORS/ipoib`, else `shared/vectors/ipoib` beside the repository."""
    base = os.environ.get("XDPOIB_VECTORS")
    if base:
        return Path(base) / "ipoib"
    return Path(__file__).resolve().parent.parent.parent / "shared" / "vectors" / "ipoib"


def need_vectors(*names: str) -> list[Path]:
    """The paths of the named capture files; skip (developer box) or fail (CI) when one is missing."""
    from prereq import missing

    paths = [vectors_dir() / n for n in names]
    for p in paths:
        if not p.is_file():
            missing(f"capture {p} (set XDPOIB_VECTORS to the directory holding ipoib/)")
    return paths


# ===================================================================================================
# pcap records
# ===================================================================================================

def pcap_records(path: Path) -> tuple[int, list[bytes]]:
    """Return (link type, captured bytes of each record) of a classic pcap file, either byte order."""
    raw = Path(path).read_bytes()
    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()})")
    linktype = struct.unpack_from(end + "I", raw, 20)[0] & 0x0FFFFFFF
    out, o = [], 24
    while o + 16 <= len(raw):
        incl = struct.unpack_from(end + "I", raw, o + 8)[0]
        out.append(raw[o + 16:o + 16 + incl])
        o += 16 + incl
    return linktype, out


# ===================================================================================================
# Frames
# ===================================================================================================

@dataclass(frozen=True)
class CapturedFrame:
    """One IPoIB frame of a capture: the 4-byte IPoIB header and payload, and what carried it.

    `number` is the record's 1-based position in its file (what Wireshark and tcpdump call it). ERF
    frames have the IB header fields; fields the transport does not have (the source QPN of RC, the
    GIDs without a GRH) are None. 242 frames have only `pseudo_addr`, bytes 20-39 of the pseudo-header.
    """

    source: str                         # "erf" or "ipoib242"
    number: int
    ipoib: bytes
    transport: str = "UD"               # "UD" or "RC"
    slid: int | None = None
    dlid: int | None = None
    pkey: int | None = None
    dqpn: int | None = None
    sqpn: int | None = None
    qkey: int | None = None
    sgid: bytes | None = None
    dgid: bytes | None = None
    pseudo_addr: bytes | None = None

    @property
    def ethertype(self) -> int:
        return int.from_bytes(self.ipoib[:2], "big")

    @property
    def has_grh(self) -> bool:
        return self.sgid is not None

    @property
    def multicast(self) -> bool:
        """Whether it reached its receivers through a multicast group."""
        if self.source == "erf":
            return self.dqpn == MCAST_QPN or (self.dlid or 0) >= MCAST_LID_BASE
        return False                    # see read_ipoib242: every frame of that file is unicast

    def __str__(self) -> str:
        return f"{self.source} frame {self.number} ({self.transport}, EtherType {self.ethertype:#06x})"


def parse_ib_packet(pkt: bytes) -> dict | None:
    """Split one IB packet (LRH through VCRC) into header fields and the payload; None for packets
    that carry no message payload (not LRH+BTH, or an opcode other than a SEND ONLY)."""
    if len(pkt) < LRH_LEN + BTH_LEN + ICRC_LEN:
        return None
    lnh = pkt[1] & 0x03
    dlid, words, slid = struct.unpack_from("!HHH", pkt, 2)
    if lnh not in (LNH_IBA_LOCAL, LNH_IBA_GLOBAL):
        return None
    o = LRH_LEN
    sgid = dgid = None
    if lnh == LNH_IBA_GLOBAL:
        sgid, dgid = pkt[o + 8:o + 24], pkt[o + 24:o + 40]
        o += GRH_LEN
    opcode, b1 = pkt[o], pkt[o + 1]
    pkey = struct.unpack_from("!H", pkt, o + 2)[0]
    dqpn = int.from_bytes(pkt[o + 5:o + 8], "big")
    pad = (b1 >> 4) & 0x03
    o += BTH_LEN
    transport, op = opcode >> 5, opcode & 0x1F
    if op not in (OP_SEND_ONLY, OP_SEND_ONLY_IMM) or transport not in (TRANSPORT_RC, TRANSPORT_UD):
        return None
    qkey = sqpn = None
    if transport == TRANSPORT_UD:
        qkey = struct.unpack_from("!I", pkt, o)[0]
        sqpn = int.from_bytes(pkt[o + 5:o + 8], "big")
        o += DETH_LEN
    if op == OP_SEND_ONLY_IMM:
        o += 4
    end = (words & 0x07FF) * 4 - ICRC_LEN - pad     # PktLen counts LRH .. ICRC in 4-byte words
    if end < o or end + ICRC_LEN > len(pkt):
        return None
    return {"transport": "UD" if transport == TRANSPORT_UD else "RC", "slid": slid, "dlid": dlid,
            "pkey": pkey, "dqpn": dqpn, "sqpn": sqpn, "qkey": qkey,
            "sgid": bytes(sgid) if sgid is not None else None,
            "dgid": bytes(dgid) if dgid is not None else None, "payload": bytes(pkt[o:end])}


def read_erf(path: Path) -> list[CapturedFrame]:
    """The IPoIB frames of a LINKTYPE_ERF capture of InfiniBand packets."""
    linktype, records = pcap_records(path)
    if linktype != LINKTYPE_ERF:
        raise ValueError(f"{path}: link type {linktype}, expected ERF ({LINKTYPE_ERF})")
    out = []
    for n, rec in enumerate(records, 1):
        if len(rec) < ERF_HLEN or rec[8] & 0x7F != ERF_TYPE_INFINIBAND:
            continue
        o, ext = ERF_HLEN, rec[8] & 0x80
        while ext:                                      # extension headers: 8 bytes, "more" bit in byte 0
            ext = rec[o] & 0x80
            o += 8
        wlen = struct.unpack_from("!H", rec, 14)[0]
        p = parse_ib_packet(rec[o:o + wlen])
        if p is None or len(p["payload"]) < 4:
            continue
        if p["transport"] == "UD" and (p["dqpn"] in (0, 1) or p["sqpn"] in (0, 1)):
            continue                                    # SMPs and GMPs
        payload = p.pop("payload")
        out.append(CapturedFrame("erf", n, payload, **p))
    return out


def read_ipoib242(path: Path) -> list[CapturedFrame]:
    """The frames of a LINKTYPE_IPOIB capture with the 40-byte pseudo-header (address in bytes 20-39).

    In the Solaris file every frame is unicast: the address field holds the destination of the frames
    the capturing host sent (its two ARP requests are unicast probes to the cached peer) and the
    broadcast template on the two ARP replies it received, so it does not say how a frame travelled.
    """
    linktype, records = pcap_records(path)
    if linktype != LINKTYPE_IPOIB:
        raise ValueError(f"{path}: link type {linktype}, expected IPoIB ({LINKTYPE_IPOIB})")
    return [CapturedFrame("ipoib242", n, rec[PSEUDO_HLEN:], transport="UD", pseudo_addr=rec[20:40])
            for n, rec in enumerate(records, 1) if len(rec) >= PSEUDO_HLEN + 4]


# ===================================================================================================
# Who sent what: the capture's own facts
# ===================================================================================================

ETH_P_IP, ETH_P_ARP, ETH_P_RARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x8035, 0x86DD


def arp_sender(fr: CapturedFrame) -> tuple[IPoIBAddr, bytes] | None:
    """(sender hardware address, sender IPv4 address) of an IB ARP frame, else None."""
    b = fr.ipoib[4:]
    if fr.ethertype not in (ETH_P_ARP, ETH_P_RARP) or len(b) < 56 or b[4] != 20:
        return None
    return IPoIBAddr.unpack(b[8:28]), bytes(b[28:32])


ND_OWN_OPTION = {133: 1, 134: 1, 135: 1, 136: 2}     # RS, RA, NS: source option; NA: target option


def nd_addresses(fr: CapturedFrame, own: bool = False) -> list[IPoIBAddr]:
    """The IPoIB addresses in the link-layer options (24 bytes) of an ND frame; with own, only the
    option that carries the sender's own address (not a Redirect's target)."""
    b = fr.ipoib[4:]
    if fr.ethertype != ETH_P_IPV6 or len(b) < 44 or b[6] != 58 or b[40] not in (133, 134, 135, 136, 137):
        return []
    fixed = {133: 4, 134: 12, 135: 20, 136: 20, 137: 36}[b[40]]
    out, o = [], 44 + fixed
    while o + 2 <= len(b) and b[o + 1]:
        wanted = (ND_OWN_OPTION.get(b[40]),) if own else (1, 2)
        if b[o] in wanted and b[o + 1] == 3 and o + 24 <= len(b):
            out.append(IPoIBAddr.unpack(b[o + 4:o + 24]))
        o += b[o + 1] * 8
    return out


@dataclass
class AddressBook:
    """LID -> GID and IPv4 -> IPoIB address, as the capture shows them (what the SA and the
    receiver's completions would have told an agent)."""

    gid_of_lid: dict[int, bytes] = field(default_factory=dict)
    ud_of_lid: dict[int, IPoIBAddr] = field(default_factory=dict)
    by_ip4: dict[bytes, IPoIBAddr] = field(default_factory=dict)

    def sender(self, fr: CapturedFrame) -> IPoIBAddr:
        """The (QPN, GID) that sent fr over UD, flags 0 (the RC sends of a host: its UD address)."""
        if fr.source == "ipoib242":
            ip = arp_sender(fr)
            src_ip = ip[1] if ip else fr.ipoib[4 + 12:4 + 16]
            a = self.by_ip4[src_ip]
        elif fr.transport == "RC":
            a = self.ud_of_lid[fr.slid]
        else:
            a = IPoIBAddr(0, fr.sqpn, fr.sgid if fr.has_grh else self.gid_of_lid[fr.slid])
        return IPoIBAddr(0, a.qpn, a.gid)


def address_book(frames: list[CapturedFrame]) -> AddressBook:
    """Collect every LID/GID/QPN/IPv4 association the frames show."""
    book = AddressBook()
    for fr in frames:
        sender = arp_sender(fr)
        if fr.has_grh:
            book.gid_of_lid[fr.slid] = fr.sgid
        if sender is not None:
            book.by_ip4[sender[1]] = sender[0]
            if fr.slid is not None:
                book.gid_of_lid.setdefault(fr.slid, sender[0].gid)
                book.ud_of_lid.setdefault(fr.slid, sender[0])
        if fr.transport == "UD" and fr.sqpn is not None and fr.slid in book.gid_of_lid:
            book.ud_of_lid.setdefault(fr.slid, IPoIBAddr(0, fr.sqpn, book.gid_of_lid[fr.slid]))
        for a in nd_addresses(fr, own=True):        # the sender's own UD address, by its LID
            if fr.slid is not None:
                book.gid_of_lid.setdefault(fr.slid, a.gid)
                book.ud_of_lid.setdefault(fr.slid, a)
    return book


class Learner:
    """The peer table of an xdpoib attachment receiving the frames of a capture, one at a time.

    `vif` is the receiving attachment (not one of the capture's hosts). `learn(fr)` records the sender
    and the ND addresses of one frame, as the agent does before it injects it, and returns the sender.
    """

    def __init__(self, book: AddressBook, vif: Vif, pkey: int = 0xFFFF):
        self.book, self.vif = book, vif
        self.remacs = RemacTable(reserved={vif.mac})
        self.peers: dict[tuple[int, bytes], Peer] = {}
        self.vlan_pkeys = {0: pkey}

    def _learn(self, addr: IPoIBAddr) -> Peer:
        key = addr.key
        old = self.peers.get(key)
        peer = Peer(old.peer_id if old else len(self.peers) + 1, self.remacs.assign(addr.gid, addr.qpn), addr)
        self.peers[key] = peer
        return peer

    def learn(self, fr: CapturedFrame) -> Peer:
        """Learn fr's sender (and the addresses in its ND options); return the sender."""
        ident = self.book.sender(fr)
        arp = arp_sender(fr)
        # the ARP sender's own address (flags and all) when it is the sender's; else the completion's
        peer = self._learn(arp[0] if arp is not None and arp[0].key == ident.key else ident)
        for a in nd_addresses(fr):
            if a.key != self.vif.addr.key:
                self._learn(a)
        return self.peers[peer.addr.key]

    def tables(self) -> Tables:
        """The oracle's tables as they stand now."""
        return Tables(vifs=[self.vif], peers=list(self.peers.values()), vlan_pkeys=dict(self.vlan_pkeys))


# ===================================================================================================
# The reverse direction: what an Ethernet host behind eth4 answers, against the real answers
# ===================================================================================================

def stand_in(addr: IPoIBAddr, vif_id: int = 1) -> Vif:
    """An xdpoib VIF in a capture host's place: its QPN and GID, flags 0 (we are UD-only), its LEMAC."""
    return Vif(vif_id, lemac(addr.gid[8:]), IPoIBAddr(0, addr.qpn, addr.gid))


def icmpv6_checksum(l3: bytes) -> int:
    """The ICMPv6 checksum an IPv6 packet should carry (RFC 4443 section 2.3: pseudo-header, message
    with its checksum field zero), computed here rather than by the code under test."""
    plen = int.from_bytes(l3[4:6], "big")
    msg = bytearray(l3[40:40 + plen])
    msg[2:4] = b"\0\0"
    data = bytes(l3[8:40]) + plen.to_bytes(4, "big") + b"\0\0\0" + bytes([58]) + bytes(msg)
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def without_flags(ipoib: bytes, addr: IPoIBAddr) -> bytes:
    """A real frame as it would be had addr's owner put flags 0 in its own address (the ICMPv6
    checksum follows)."""
    out = bytearray(ipoib)
    needle = addr.pack()[1:]
    i = out.find(needle)
    while i > 0:
        out[i - 1] = 0
        i = out.find(needle, i + 1)
    if out[:2] == b"\x86\xdd" and out[4 + 6] == 58:
        out[4 + 42:4 + 44] = icmpv6_checksum(bytes(out[4:])).to_bytes(2, "big")
    return bytes(out)


@dataclass(frozen=True)
class ReplyCase:
    """A real request, the Ethernet host's answer to its translation, and the real answer it must match.

    `tables` are the stand-in's (its VIF in the real replier's place, the requester learnt from the
    request); `answer` is the Ethernet frame it sends; `expected` is the real reply with flags 0 in the
    replier's own address.
    """

    name: str
    tables: Tables
    request_eth: bytes
    answer: bytes
    real: CapturedFrame
    expected: bytes


def _answer(kind: str, req: bytes, own_mac: bytes) -> bytes:
    """What a Linux host on Ethernet sends back for an ARP request, an NS or an ICMPv6 echo request."""
    from xdpoib.wire import frames as f

    src_mac, l3 = req[6:12], req[14:]
    if kind == "arp":
        a = f.parse_arp(l3)
        return f.eth(src_mac, own_mac, f.ETH_P_ARP, f.arp(f.ARPOP_REPLY, own_mac, a.tpa, a.sha, a.spa))
    ip = f.parse_ipv6(l3)
    if kind == "na":
        target = l3[48:64]
        return f.eth(src_mac, own_mac, f.ETH_P_IPV6, f.nd_na(target, ip.src, target, tlla=own_mac))
    body = l3[44:40 + ip.payload_length]
    reply = f.icmpv6(ip.dst, ip.src, f.ICMPV6_ECHO_REPLY, 0, body)
    return f.eth(src_mac, own_mac, f.ETH_P_IPV6, f.ipv6(ip.dst, ip.src, f.IPPROTO_ICMPV6, reply, hop_limit=64))


def reply_cases(erf: list[CapturedFrame], solaris: list[CapturedFrame]) -> list[ReplyCase]:
    """The request/reply pairs of both captures: Linux ARP, NS/NA and ICMPv6 echo; Solaris ARP."""
    from xdpoib.wire.oracle import ipoib_to_eth

    out = []
    pairs = [("Linux ARP reply", erf, 5, 6, "arp"), ("Linux NA", erf, 26, 30, "na"),
             ("Linux ICMPv6 echo reply", erf, 36, 39, "echo"), ("Solaris ARP reply", solaris, 6, 7, "arp")]
    for name, frames, req_no, rep_no, kind in pairs:
        book = address_book(frames)
        req = next(fr for fr in frames if fr.number == req_no)
        rep = next(fr for fr in frames if fr.number == rep_no)
        replier = book.sender(rep)
        learner = Learner(book, stand_in(replier))
        sender = learner.learn(req)
        t = learner.tables()
        eth = ipoib_to_eth(req.ipoib, t, src=sender, vif=learner.vif, pkey=0xFFFF, multicast=req.multicast).frame
        out.append(ReplyCase(name, t, eth, _answer(kind, eth, learner.vif.mac), rep,
                             without_flags(rep.ipoib, replier)))
    return out
