"""The wire formats of a native IPoIB host, written from the RFCs and kept apart from `xdpoib.wire`.

The native peer is the independent judge of xdpoib's translation, so it shares none of its code: these
encoders and decoders follow the RFC text directly.

- RFC 4391 (IP over InfiniBand): the 4-octet encapsulation header (section 6: EtherType, then 2 reserved
  octets sent as zero and ignored on receipt); the 20-octet link-layer address (section 9.1.1: one
  octet of flags, whose top bit says "connected mode capable", the 24-bit QPN, the 16-octet GID); the
  multicast GIDs (section 4: `FF1S:401B:PPPP::` + the low 28 bits of an IPv4 group, `FF1S:601B:PPPP` +
  the low 80 bits of an IPv6 group, the broadcast group `FF1S:401B:PPPP::FFFF:FFFF`, P_Key with its
  full-member bit); the IPv6 interface identifier (section 8: the port GUID with the universal/local
  bit inverted); ARP with hardware type 32 and 20-octet addresses (section 9.2); the ND link-layer
  address option of length 3: type, length, two reserved octets, the 20-octet address (section 9.3.1).
- RFC 826 (ARP): the body layout and its merge rule, parameterized by the address lengths.
- RFC 791 / 792 / 768 (IPv4, ICMP echo, UDP), RFC 1071 (the Internet checksum).
- RFC 8200 / 4443 / 4861 (IPv6, ICMPv6 with its pseudo-header checksum, NS/NA and their options).
- RFC 2131 / 2132 (DHCPv4) with RFC 4390 (over IPoIB: htype 32, hlen 0, chaddr zero, the
  client-identifier option mandatory, the BROADCAST flag set by a client without an address) and
  RFC 4361 (a client identifier of type 255: IAID + DUID).

Everything is pure: `bytes` in, `bytes` or small records out. Decoders raise `WireError` for what a
host would discard.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from xdpoib.errors import XdpoibError

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
ENCAP_LEN = 4
ADDR_LEN = 20
FLAG_CONNECTED = 0x80           # "I can do connected mode": what Linux ib0 puts in its address
MULTICAST_QPN = 0xFFFFFF
DEFAULT_PKEY = 0xFFFF
LINK_SCOPE = 0x2

ARP_HTYPE_INFINIBAND = 32
ARP_REQUEST, ARP_REPLY = 1, 2

PROTO_ICMP, PROTO_UDP, PROTO_ICMPV6 = 1, 17, 58
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT = 135, 136
ND_OPT_SOURCE_LLADDR, ND_OPT_TARGET_LLADDR = 1, 2
NA_FLAG_ROUTER, NA_FLAG_SOLICITED, NA_FLAG_OVERRIDE = 0x80000000, 0x40000000, 0x20000000

DHCP_SERVER_PORT, DHCP_CLIENT_PORT = 67, 68
DHCP_BOOTREQUEST, DHCP_BOOTREPLY = 1, 2
DHCP_MAGIC = bytes([99, 130, 83, 99])
DHCP_FLAG_BROADCAST = 0x8000
DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, DHCPDECLINE, DHCPACK, DHCPNAK, DHCPRELEASE = 1, 2, 3, 4, 5, 6, 7
OPT_SUBNET_MASK, OPT_ROUTER, OPT_REQUESTED_IP, OPT_LEASE_TIME = 1, 3, 50, 51
OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_PARAMETER_LIST, OPT_CLIENT_ID = 53, 54, 55, 61
OPT_PAD, OPT_END = 0, 255

IPV4_BROADCAST = b"\xff" * 4
IPV4_ANY = b"\x00" * 4
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed


class WireError(XdpoibError):
    """A frame a host discards (too short, a wrong checksum, a field out of range)."""


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) < n:
        raise WireError(f"{what}: {len(data)} bytes, {n} needed")


# ===================================================================================================
# RFC 1071: the Internet checksum
# ===================================================================================================

def inet_checksum(data: bytes) -> int:
    """The one's complement of the one's complement sum of the 16-bit words of data (odd length:
    padded with a zero octet); 0 over data that carries its own right checksum."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total > 0xFFFF:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF


def _pseudo_v4(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")


def _pseudo_v6(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


# ===================================================================================================
# RFC 4391: addresses, MGIDs, the encapsulation header
# ===================================================================================================

class IbAddr(NamedTuple):
    """A 20-octet IPoIB link-layer address: flags octet, QPN, GID."""

    flags: int
    qpn: int
    gid: bytes

    def pack(self) -> bytes:
        return bytes([self.flags]) + self.qpn.to_bytes(3, "big") + self.gid

    @classmethod
    def unpack(cls, raw: bytes) -> IbAddr:
        if len(raw) != ADDR_LEN:
            raise WireError(f"an IPoIB address is {ADDR_LEN} octets, not {len(raw)}")
        return cls(raw[0], int.from_bytes(raw[1:4], "big"), bytes(raw[4:]))

    @property
    def who(self) -> tuple[int, bytes]:
        """(QPN, GID): the endpoint; the flags octet is a capability, not an identity."""
        return self.qpn, self.gid

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in self.pack())


def mgid_ipv4(group: bytes, pkey: int = DEFAULT_PKEY, scope: int = LINK_SCOPE) -> bytes:
    """The MGID of an IPv4 multicast group (or of the broadcast address 255.255.255.255)."""
    head = bytes([0xFF, 0x10 | scope, 0x40, 0x1B]) + (pkey | 0x8000).to_bytes(2, "big")
    if group == IPV4_BROADCAST:
        return head + bytes(6) + b"\xff\xff\xff\xff"
    return head + bytes(6) + bytes([group[0] & 0x0F]) + group[1:4]


def mgid_ipv6(group: bytes, pkey: int = DEFAULT_PKEY, scope: int = LINK_SCOPE) -> bytes:
    """The MGID of an IPv6 multicast group: the signature, the P_Key, the group's low 80 bits."""
    return bytes([0xFF, 0x10 | scope, 0x60, 0x1B]) + (pkey | 0x8000).to_bytes(2, "big") + group[6:16]


def interface_id(port_guid: int) -> bytes:
    """The IPv6 interface identifier of a port: its GUID, universal/local bit inverted."""
    iid = bytearray(port_guid.to_bytes(8, "big"))
    iid[0] ^= 0x02
    return bytes(iid)


def link_local(port_guid: int) -> bytes:
    """fe80::/64 with the port's interface identifier."""
    return bytes([0xFE, 0x80]) + bytes(6) + interface_id(port_guid)


def solicited_node(addr: bytes) -> bytes:
    """ff02::1:ffXX:XXXX for an IPv6 unicast address (RFC 4291 section 2.7.1)."""
    return ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13] + addr[13:16]


def encap(ethertype: int, payload: bytes) -> bytes:
    """The IPoIB frame: EtherType, two reserved zero octets, payload."""
    return ethertype.to_bytes(2, "big") + b"\0\0" + payload


def decap(frame: bytes) -> tuple[int, bytes]:
    """(EtherType, payload) of an IPoIB frame; the reserved octets are ignored."""
    _need(frame, ENCAP_LEN, "IPoIB header")
    return int.from_bytes(frame[:2], "big"), bytes(frame[ENCAP_LEN:])


# ===================================================================================================
# RFC 826 with RFC 4391 section 9.2: ARP over InfiniBand
# ===================================================================================================

@dataclass(frozen=True)
class Arp:
    """An ARP body for IPv4 over InfiniBand (hardware type 32, 20-octet addresses)."""

    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    def pack(self) -> bytes:
        return (struct.pack("!HHBBH", ARP_HTYPE_INFINIBAND, ETHERTYPE_IPV4, ADDR_LEN, 4, self.op)
                + self.sha + self.spa + self.tha + self.tpa)

    @classmethod
    def unpack(cls, body: bytes) -> Arp:
        _need(body, 8, "ARP header")
        hrd, pro, hln, pln, op = struct.unpack_from("!HHBBH", body)
        if (hrd, pro, hln, pln) != (ARP_HTYPE_INFINIBAND, ETHERTYPE_IPV4, ADDR_LEN, 4):
            raise WireError(f"ARP hrd {hrd} pro {pro:#06x} hln {hln} pln {pln} is not IPv4 over InfiniBand")
        _need(body, 8 + 2 * (ADDR_LEN + 4), "ARP body")
        o = 8
        sha, spa = body[o:o + 20], body[o + 20:o + 24]
        tha, tpa = body[o + 24:o + 44], body[o + 44:o + 48]
        return cls(op, bytes(sha), bytes(spa), bytes(tha), bytes(tpa))


# ===================================================================================================
# RFC 791 / 792 / 768: IPv4, ICMP echo, UDP
# ===================================================================================================

@dataclass(frozen=True)
class Ipv4:
    src: bytes
    dst: bytes
    proto: int
    ttl: int
    ident: int
    payload: bytes
    fragment: bool = False


def ipv4_pack(src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int = 64, ident: int = 0) -> bytes:
    """An IPv4 datagram, DF set, header checksum filled in."""
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0, src, dst)
    return head[:10] + inet_checksum(head).to_bytes(2, "big") + head[12:] + payload


def ipv4_unpack(pkt: bytes) -> Ipv4:
    """Parse and check an IPv4 datagram (version, lengths, header checksum)."""
    _need(pkt, 20, "IPv4 header")
    ihl = (pkt[0] & 0x0F) * 4
    total = int.from_bytes(pkt[2:4], "big")
    if pkt[0] >> 4 != 4 or ihl < 20 or total < ihl or total > len(pkt):
        raise WireError(f"IPv4 version {pkt[0] >> 4} header {ihl} total {total} of {len(pkt)} octets")
    if inet_checksum(pkt[:ihl]) != 0:
        raise WireError("IPv4 header checksum")
    frag = int.from_bytes(pkt[6:8], "big")
    return Ipv4(bytes(pkt[12:16]), bytes(pkt[16:20]), pkt[9], pkt[8], int.from_bytes(pkt[4:6], "big"),
                bytes(pkt[ihl:total]), fragment=bool(frag & 0x3FFF))


def icmp_echo_pack(kind: int, ident: int, seq: int, data: bytes) -> bytes:
    """An ICMP echo request (8) or reply (0) with its checksum."""
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return msg[:2] + inet_checksum(msg).to_bytes(2, "big") + msg[4:]


def icmp_unpack(msg: bytes) -> tuple[int, int, bytes]:
    """(type, code, rest after the checksum) of a checked ICMP message."""
    _need(msg, 8, "ICMP")
    if inet_checksum(msg) != 0:
        raise WireError("ICMP checksum")
    return msg[0], msg[1], bytes(msg[4:])


def udp_pack(src: bytes, dst: bytes, sport: int, dport: int, data: bytes) -> bytes:
    """A UDP datagram for IPv4 or IPv6 (by the address length) with its checksum (0 sent as 0xffff)."""
    length = 8 + len(data)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + data
    pseudo = (_pseudo_v4 if len(src) == 4 else _pseudo_v6)(src, dst, PROTO_UDP, length)
    csum = inet_checksum(pseudo + seg) or 0xFFFF
    return seg[:6] + csum.to_bytes(2, "big") + seg[8:]


def udp_unpack(src: bytes, dst: bytes, seg: bytes) -> tuple[int, int, bytes]:
    """(source port, destination port, data) of a checked UDP datagram (checksum 0 is "none" on IPv4)."""
    _need(seg, 8, "UDP header")
    sport, dport, length, csum = struct.unpack_from("!HHHH", seg)
    if length < 8 or length > len(seg):
        raise WireError(f"UDP length {length} of {len(seg)} octets")
    seg = seg[:length]
    if csum or len(src) == 16:
        pseudo = (_pseudo_v4 if len(src) == 4 else _pseudo_v6)(src, dst, PROTO_UDP, length)
        if inet_checksum(pseudo + seg) != 0:
            raise WireError("UDP checksum")
    return sport, dport, bytes(seg[8:])


# ===================================================================================================
# RFC 8200 / 4443 / 4861: IPv6, ICMPv6, neighbour discovery
# ===================================================================================================

@dataclass(frozen=True)
class Ipv6:
    src: bytes
    dst: bytes
    next_header: int
    hop_limit: int
    payload: bytes


def ipv6_pack(src: bytes, dst: bytes, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit) + src + dst + payload


def ipv6_unpack(pkt: bytes) -> Ipv6:
    _need(pkt, 40, "IPv6 header")
    plen = int.from_bytes(pkt[4:6], "big")
    if pkt[0] >> 4 != 6 or 40 + plen > len(pkt):
        raise WireError(f"IPv6 version {pkt[0] >> 4} payload {plen} of {len(pkt) - 40} octets")
    return Ipv6(bytes(pkt[8:24]), bytes(pkt[24:40]), pkt[6], pkt[7], bytes(pkt[40:40 + plen]))


def icmpv6_pack(src: bytes, dst: bytes, kind: int, code: int, body: bytes) -> bytes:
    """An ICMPv6 message with its checksum over the IPv6 pseudo-header."""
    msg = bytes([kind, code, 0, 0]) + body
    csum = inet_checksum(_pseudo_v6(src, dst, PROTO_ICMPV6, len(msg)) + msg)
    return msg[:2] + csum.to_bytes(2, "big") + msg[4:]


def icmpv6_unpack(src: bytes, dst: bytes, msg: bytes) -> tuple[int, int, bytes]:
    """(type, code, body after the checksum) of a checked ICMPv6 message."""
    _need(msg, 4, "ICMPv6")
    if inet_checksum(_pseudo_v6(src, dst, PROTO_ICMPV6, len(msg)) + msg) != 0:
        raise WireError("ICMPv6 checksum")
    return msg[0], msg[1], bytes(msg[4:])


def nd_option(kind: int, addr: IbAddr) -> bytes:
    """The link-layer address option for IPoIB: type, length 3 (24 octets), 2 zero octets, address."""
    return bytes([kind, 3, 0, 0]) + addr.pack()


@dataclass(frozen=True)
class Nd:
    """A neighbour solicitation or advertisement: its flags (NA), target, link-layer options."""

    kind: int
    flags: int
    target: bytes
    lladdr: dict[int, IbAddr] = field(default_factory=dict)
    other_lengths: tuple[int, ...] = ()        # options of other lengths or types, kept for reporting


def nd_pack_ns(src: bytes, dst: bytes, target: bytes, source_ll: IbAddr | None) -> bytes:
    """An NS (ICMPv6 135) for target in an IPv6 packet with hop limit 255 (RFC 4861 section 7.1.1)."""
    opts = nd_option(ND_OPT_SOURCE_LLADDR, source_ll) if source_ll is not None else b""
    body = bytes(4) + target + opts
    return ipv6_pack(src, dst, PROTO_ICMPV6, icmpv6_pack(src, dst, ND_NEIGHBOR_SOLICIT, 0, body), 255)


def nd_pack_na(src: bytes, dst: bytes, target: bytes, target_ll: IbAddr, solicited: bool) -> bytes:
    """An NA (ICMPv6 136), override set, with the target link-layer option."""
    flags = NA_FLAG_OVERRIDE | (NA_FLAG_SOLICITED if solicited else 0)
    body = flags.to_bytes(4, "big") + target + nd_option(ND_OPT_TARGET_LLADDR, target_ll)
    return ipv6_pack(src, dst, PROTO_ICMPV6, icmpv6_pack(src, dst, ND_NEIGHBOR_ADVERT, 0, body), 255)


def nd_unpack(kind: int, body: bytes) -> Nd:
    """An NS/NA from the ICMPv6 body after the checksum: reserved/flags, target, options."""
    _need(body, 20, "NS/NA")
    flags = int.from_bytes(body[:4], "big")
    target, o = bytes(body[4:20]), 20
    lladdr, other = {}, []
    while o < len(body):
        _need(body, o + 2, "ND option")
        size = body[o + 1] * 8
        if size == 0 or o + size > len(body):
            raise WireError(f"ND option of length {body[o + 1]} at {o}")
        if body[o] in (ND_OPT_SOURCE_LLADDR, ND_OPT_TARGET_LLADDR) and size == 24:
            lladdr[body[o]] = IbAddr.unpack(body[o + 4:o + 24])
        else:
            other.append(body[o + 1])
        o += size
    return Nd(kind, flags, target, lladdr, tuple(other))


# ===================================================================================================
# RFC 2131 / 2132 with RFC 4390: DHCPv4 over InfiniBand
# ===================================================================================================

@dataclass
class Dhcp:
    """A DHCP message as an IPoIB client sends and reads it (options in order, values raw)."""

    op: int
    xid: int
    flags: int = 0
    ciaddr: bytes = IPV4_ANY
    yiaddr: bytes = IPV4_ANY
    siaddr: bytes = IPV4_ANY
    giaddr: bytes = IPV4_ANY
    htype: int = ARP_HTYPE_INFINIBAND
    hlen: int = 0
    chaddr: bytes = bytes(16)
    secs: int = 0
    options: list[tuple[int, bytes]] = field(default_factory=list)

    def option(self, code: int) -> bytes | None:
        return next((v for c, v in self.options if c == code), None)

    @property
    def message_type(self) -> int | None:
        v = self.option(OPT_MESSAGE_TYPE)
        return v[0] if v else None

    def pack(self) -> bytes:
        fixed = struct.pack("!BBBBIHH4s4s4s4s16s", self.op, self.htype, self.hlen, 0, self.xid, self.secs,
                            self.flags, self.ciaddr, self.yiaddr, self.siaddr, self.giaddr, self.chaddr)
        opts = b"".join(bytes([c, len(v)]) + v for c, v in self.options)
        msg = fixed + bytes(64 + 128) + DHCP_MAGIC + opts + bytes([OPT_END])
        return msg + bytes(max(0, 300 - len(msg)))        # BOOTP's minimum message size

    @classmethod
    def unpack(cls, data: bytes) -> Dhcp:
        _need(data, 240, "DHCP message")
        if data[236:240] != DHCP_MAGIC:
            raise WireError("DHCP magic cookie")
        op, htype, hlen, _hops, xid, secs, flags, ci, yi, si, gi, ch = struct.unpack_from(
            "!BBBBIHH4s4s4s4s16s", data)
        msg = cls(op, xid, flags, ci, yi, si, gi, htype, hlen, ch, secs)
        o = 240
        while o < len(data) and data[o] != OPT_END:
            if data[o] == OPT_PAD:
                o += 1
                continue
            _need(data, o + 2, "DHCP option")
            size = data[o + 1]
            _need(data, o + 2 + size, f"DHCP option {data[o]}")
            msg.options.append((data[o], bytes(data[o + 2:o + 2 + size])))
            o += 2 + size
        return msg


def client_id(port_guid: int, iaid: int = 1) -> bytes:
    """A client identifier of RFC 4361's form: type 255, the IAID, a DUID-LL (DUID type 3) of hardware
    type 32 (InfiniBand) whose link-layer address is the port GUID, which does not change with the QPN."""
    return bytes([255]) + iaid.to_bytes(4, "big") + struct.pack("!HH", 3, ARP_HTYPE_INFINIBAND) \
        + port_guid.to_bytes(8, "big")
