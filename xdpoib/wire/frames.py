"""Frame builders and parsers: Ethernet (+802.1Q), the IPoIB header, ARP (both forms), IPv4, UDP,
ICMP, IPv6 + ICMPv6 neighbour discovery, DHCPv4.

Builders return `bytes` with lengths and checksums filled in. Parsers raise `FrameError` with a
`DropReason` for anything they cannot read: that is the one exception type of malformed input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from xdpoib.errors import FrameError
from xdpoib.reasons import DropReason
from xdpoib.wire.addr import IPOIB_ALEN, MAC_LEN

# --- EtherTypes (docs/design.md §3.1) -------------------------------------------------------------------------
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_IPV6 = 0x86DD
ETH_P_TIPC = 0x88CA
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
#: What IPoIB carries; everything else is refused with UNSUPPORTED_ETHERTYPE.
IPOIB_ETHERTYPES = frozenset({ETH_P_IP, ETH_P_ARP, ETH_P_RARP, ETH_P_IPV6, ETH_P_TIPC})
VLAN_TPIDS = frozenset({ETH_P_8021Q, ETH_P_8021AD})

ETH_HLEN = 14
VLAN_HLEN = 4
IPOIB_HLEN = 4
IPV4_MIN_HLEN = 20
IPV6_HLEN = 40
ARP_ETH_LEN = 28
ARP_IB_LEN = 56

# --- ARP (RFC 826; RFC 4391 section 6 for IB) --------------------------------------------------------
ARPHRD_ETHER = 1
ARPHRD_INFINIBAND = 32
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ARPOP_RREQUEST = 3
ARPOP_RREPLY = 4

# --- IP protocols, ICMPv6 types -------------------------------------------------------------------
IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_IGMP = 2
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO = 8
ICMPV6_PKT_TOO_BIG = 2
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
MLD_TYPES = frozenset({130, 131, 132, 143})
ND_RS, ND_RA, ND_NS, ND_NA, ND_REDIRECT = 133, 134, 135, 136, 137
ND_TYPES = frozenset({ND_RS, ND_RA, ND_NS, ND_NA, ND_REDIRECT})
#: Fixed part of each ND message after the 4-byte ICMPv6 header (RFC 4861).
ND_FIXED = {ND_RS: 4, ND_RA: 12, ND_NS: 20, ND_NA: 20, ND_REDIRECT: 36}
ND_OPT_SLLA = 1
ND_OPT_TLLA = 2

# --- DHCPv4 (RFC 2131/2132, RFC 4390) --------------------------------------------------------------
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCP_FIXED = 236
DHCP_BROADCAST = 0x8000
DHCP_OPT_PAD = 0
DHCP_OPT_MSGTYPE = 53
DHCP_OPT_CLIENT_ID = 61
DHCP_OPT_END = 255


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise FrameError(DropReason.TRUNCATED, f"{what}: need {size} bytes, have {len(data)}")


def checksum(data: bytes) -> int:
    """Return the Internet checksum (RFC 1071) of data, as an int ready to store."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# ===================================================================================================
# Ethernet and IPoIB headers
# ===================================================================================================

@dataclass(frozen=True)
class EthHeader:
    """A parsed Ethernet header: addresses, the VLAN id if one 802.1Q tag is present, the EtherType."""

    dst: bytes
    src: bytes
    vid: int | None
    pcp: int
    ethertype: int
    hlen: int        # 14, or 18 with a tag


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes,
        vid: int | None = None, pcp: int = 0) -> bytes:
    """Build an Ethernet frame, with one 802.1Q tag when vid is given (0 = priority tag)."""
    tag = b"" if vid is None else struct.pack("!HH", ETH_P_8021Q, (pcp << 13) | vid)
    return bytes(dst) + bytes(src) + tag + struct.pack("!H", ethertype) + bytes(payload)


def parse_eth(frame: bytes) -> EthHeader:
    """Parse an Ethernet header with at most one VLAN tag (a second tag is STACKED_VLAN)."""
    _need(frame, ETH_HLEN, "ethernet header")
    etype = struct.unpack_from("!H", frame, 12)[0]
    vid, pcp, hlen = None, 0, ETH_HLEN
    if etype in VLAN_TPIDS:
        _need(frame, ETH_HLEN + VLAN_HLEN, "802.1Q tag")
        tci, etype = struct.unpack_from("!HH", frame, 14)
        vid, pcp, hlen = tci & 0x0FFF, tci >> 13, ETH_HLEN + VLAN_HLEN
        if etype in VLAN_TPIDS:
            raise FrameError(DropReason.STACKED_VLAN, "more than one VLAN tag")
    return EthHeader(bytes(frame[0:6]), bytes(frame[6:12]), vid, pcp, etype, hlen)


def ipoib(ethertype: int, payload: bytes) -> bytes:
    """Build an IPoIB frame: the 4-byte header (EtherType, two reserved zero bytes) and the payload."""
    return struct.pack("!HH", ethertype, 0) + bytes(payload)


def parse_ipoib(frame: bytes) -> int:
    """Return the EtherType of an IPoIB frame (reserved bytes are ignored, as Linux ipoib does)."""
    if len(frame) < IPOIB_HLEN:
        raise FrameError(DropReason.BAD_IPOIB_HEADER, f"IPoIB frame of {len(frame)} bytes")
    return struct.unpack_from("!H", frame, 0)[0]


# ===================================================================================================
# ARP
# ===================================================================================================

@dataclass(frozen=True)
class Arp:
    """A parsed ARP/RARP body (hardware addresses as they appear: 6 or 20 bytes)."""

    htype: int
    ptype: int
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    @property
    def length(self) -> int:
        """Bytes the body occupies on the wire."""
        return 8 + 2 * len(self.sha) + 2 * len(self.spa)


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    """Build an ARP body for IPv4: Ethernet form for 6-byte addresses, InfiniBand form for 20-byte ones."""
    if len(sha) != len(tha) or len(sha) not in (MAC_LEN, IPOIB_ALEN):
        raise ValueError("ARP hardware addresses must both be 6 or both be 20 bytes")
    htype = ARPHRD_ETHER if len(sha) == MAC_LEN else ARPHRD_INFINIBAND
    return struct.pack("!HHBBH", htype, ETH_P_IP, len(sha), 4, op) + sha + spa + tha + tpa


def parse_arp(body: bytes) -> Arp:
    """Parse an IPv4 ARP body in the Ethernet (hlen 6) or InfiniBand (hlen 20) form."""
    _need(body, 8, "ARP header")
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", body)
    if ptype != ETH_P_IP or plen != 4 or (htype, hlen) not in ((ARPHRD_ETHER, 6), (ARPHRD_INFINIBAND, 20)):
        raise FrameError(DropReason.BAD_ARP, f"htype {htype} ptype {ptype:#x} hlen {hlen} plen {plen}")
    _need(body, 8 + 2 * hlen + 8, "ARP body")
    o = 8
    sha, spa = body[o:o + hlen], body[o + hlen:o + hlen + 4]
    o += hlen + 4
    tha, tpa = body[o:o + hlen], body[o + hlen:o + hlen + 4]
    return Arp(htype, ptype, op, bytes(sha), bytes(spa), bytes(tha), bytes(tpa))


# ===================================================================================================
# IPv4, UDP, ICMP
# ===================================================================================================

@dataclass(frozen=True)
class IPv4:
    """A parsed IPv4 header."""

    ihl: int
    tos: int
    total_length: int
    ident: int
    frag: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes

    @property
    def hlen(self) -> int:
        return self.ihl * 4


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64, ident: int = 0,
         tos: int = 0, dont_fragment: bool = True, options: bytes = b"") -> bytes:
    """Build an IPv4 packet with a correct header checksum."""
    if len(options) % 4:
        raise ValueError("IPv4 options must be a multiple of 4 bytes")
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(payload), ident,
                      0x4000 if dont_fragment else 0, ttl, proto, 0, src, dst) + options
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + bytes(payload)


def parse_ipv4(pkt: bytes) -> IPv4:
    """Parse an IPv4 header; the packet may carry trailing Ethernet padding beyond total_length."""
    _need(pkt, IPV4_MIN_HLEN, "IPv4 header")
    vihl, tos, tot, ident, frag, ttl, proto, _csum, src, dst = struct.unpack_from("!BBHHHBBH4s4s", pkt)
    ihl = vihl & 0x0F
    if vihl >> 4 != 4 or ihl < 5:
        raise FrameError(DropReason.BAD_IP_HEADER, f"IPv4 version {vihl >> 4} ihl {ihl}")
    if tot < ihl * 4 or tot > len(pkt):
        raise FrameError(DropReason.BAD_LENGTH, f"IPv4 total length {tot}, {len(pkt)} bytes present")
    return IPv4(ihl, tos, tot, ident, frag, ttl, proto, src, dst)


def udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """Build a UDP datagram (for IPv4 or IPv6 by the address size) with its checksum."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + bytes(payload)
    csum = l4_checksum(src_ip, dst_ip, IPPROTO_UDP, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def l4_checksum(src_ip: bytes, dst_ip: bytes, proto: int, segment: bytes) -> int:
    """Return the TCP/UDP/ICMPv6 checksum of segment (its checksum field must be zero) over the
    IPv4 or IPv6 pseudo-header."""
    if len(src_ip) == 4:
        pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, proto, len(segment))
    else:
        pseudo = src_ip + dst_ip + struct.pack("!IxxxB", len(segment), proto)
    return checksum(pseudo + bytes(segment))


def icmp_echo(ident: int, seq: int, data: bytes = b"", reply: bool = False) -> bytes:
    """Build an ICMPv4 echo request (or reply) message with its checksum."""
    msg = struct.pack("!BBHHH", ICMP_ECHO_REPLY if reply else ICMP_ECHO, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


# ===================================================================================================
# IPv6, ICMPv6, neighbour discovery
# ===================================================================================================

@dataclass(frozen=True)
class IPv6:
    """A parsed IPv6 header."""

    tclass: int
    flow: int
    payload_length: int
    next_header: int
    hop_limit: int
    src: bytes
    dst: bytes


def ipv6(src: bytes, dst: bytes, next_header: int, payload: bytes, *, hop_limit: int = 64,
         tclass: int = 0, flow: int = 0) -> bytes:
    """Build an IPv6 packet."""
    vtf = (6 << 28) | (tclass << 20) | flow
    return struct.pack("!IHBB16s16s", vtf, len(payload), next_header, hop_limit, src, dst) + bytes(payload)


def parse_ipv6(pkt: bytes) -> IPv6:
    """Parse an IPv6 header; the packet may carry trailing Ethernet padding beyond the payload."""
    _need(pkt, IPV6_HLEN, "IPv6 header")
    vtf, plen, nh, hlim, src, dst = struct.unpack_from("!IHBB16s16s", pkt)
    if vtf >> 28 != 6:
        raise FrameError(DropReason.BAD_IP_HEADER, f"IPv6 version {vtf >> 28}")
    if IPV6_HLEN + plen > len(pkt):
        raise FrameError(DropReason.BAD_LENGTH, f"IPv6 payload length {plen}, {len(pkt) - 40} present")
    return IPv6((vtf >> 20) & 0xFF, vtf & 0xFFFFF, plen, nh, hlim, src, dst)


def icmpv6(src: bytes, dst: bytes, icmp_type: int, code: int, body: bytes) -> bytes:
    """Build an ICMPv6 message (type, code, checksum, body) with its checksum over the pseudo-header."""
    msg = struct.pack("!BBH", icmp_type, code, 0) + bytes(body)
    return msg[:2] + struct.pack("!H", l4_checksum(src, dst, IPPROTO_ICMPV6, msg)) + msg[4:]


def nd_lla_option(opt_type: int, address: bytes) -> bytes:
    """Build an ND source/target link-layer address option: Ethernet (len 1, 8 bytes) for a MAC,
    InfiniBand (len 3, 24 bytes: type, len, 2 zero bytes, 20-byte address) for an IPoIB address."""
    if len(address) == MAC_LEN:
        return bytes([opt_type, 1]) + address
    if len(address) == IPOIB_ALEN:
        return bytes([opt_type, 3, 0, 0]) + address
    raise ValueError("an ND link-layer address is 6 or 20 bytes")


def nd_message(src: bytes, dst: bytes, nd_type: int, fixed: bytes, options: bytes = b"",
               hop_limit: int = 255) -> bytes:
    """Build an IPv6 packet carrying one ND message (fixed part after the ICMPv6 header + options)."""
    if len(fixed) != ND_FIXED[nd_type]:
        raise ValueError(f"ND type {nd_type} needs a {ND_FIXED[nd_type]}-byte fixed part")
    return ipv6(src, dst, IPPROTO_ICMPV6, icmpv6(src, dst, nd_type, 0, fixed + options), hop_limit=hop_limit)


def nd_ns(src: bytes, dst: bytes, target: bytes, slla: bytes | None = None) -> bytes:
    """Build a neighbour solicitation for target, with a source link-layer option when slla is given."""
    opts = nd_lla_option(ND_OPT_SLLA, slla) if slla is not None else b""
    return nd_message(src, dst, ND_NS, b"\x00" * 4 + target, opts)


def nd_na(src: bytes, dst: bytes, target: bytes, tlla: bytes | None = None,
          router: bool = False, solicited: bool = True, override: bool = True) -> bytes:
    """Build a neighbour advertisement for target, with a target link-layer option when tlla is given."""
    flags = (router << 31) | (solicited << 30) | (override << 29)
    opts = nd_lla_option(ND_OPT_TLLA, tlla) if tlla is not None else b""
    return nd_message(src, dst, ND_NA, struct.pack("!I", flags) + target, opts)


def nd_rs(src: bytes, dst: bytes, slla: bytes | None = None) -> bytes:
    """Build a router solicitation."""
    opts = nd_lla_option(ND_OPT_SLLA, slla) if slla is not None else b""
    return nd_message(src, dst, ND_RS, b"\x00" * 4, opts)


def nd_ra(src: bytes, dst: bytes, slla: bytes | None = None, prefix: bytes | None = None,
          lifetime: int = 1800, mtu: int | None = None) -> bytes:
    """Build a router advertisement with optional SLLA, MTU (type 5) and /64 prefix (type 3) options."""
    opts = nd_lla_option(ND_OPT_SLLA, slla) if slla is not None else b""
    if mtu is not None:
        opts += struct.pack("!BBHI", 5, 1, 0, mtu)
    if prefix is not None:
        opts += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0, prefix)
    return nd_message(src, dst, ND_RA, struct.pack("!BBHII", 64, 0, lifetime, 0, 0), opts)


@dataclass(frozen=True)
class NdOption:
    """One ND option: type, its bytes on the wire (including type and length), offset in the message."""

    opt_type: int
    raw: bytes
    offset: int


def parse_nd_options(msg: bytes, nd_type: int) -> list[NdOption]:
    """Split the options of an ICMPv6 ND message (starting with its 4-byte ICMPv6 header)."""
    start = 4 + ND_FIXED[nd_type]
    if len(msg) < start:
        raise FrameError(DropReason.BAD_ND, f"ND type {nd_type} shorter than its fixed part")
    opts, o = [], start
    while o < len(msg):
        if len(msg) - o < 2:
            raise FrameError(DropReason.BAD_ND, "truncated ND option")
        olen = msg[o + 1] * 8
        if olen == 0 or o + olen > len(msg):
            raise FrameError(DropReason.BAD_ND, f"ND option length {msg[o + 1]} at offset {o}")
        opts.append(NdOption(msg[o], bytes(msg[o:o + olen]), o))
        o += olen
    return opts


# ===================================================================================================
# DHCPv4
# ===================================================================================================

@dataclass
class Dhcp:
    """A parsed DHCPv4 message. `options` keeps order; values are raw bytes."""

    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes            # the full 16-byte field
    sname: bytes = b"\x00" * 64
    file: bytes = b"\x00" * 128
    options: list[tuple[int, bytes]] = field(default_factory=list)

    def option(self, code: int) -> bytes | None:
        """Return the first option with this code, or None."""
        return next((v for c, v in self.options if c == code), None)

    def pack(self) -> bytes:
        """Return the wire form (fixed part, magic cookie, options, END)."""
        out = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", self.op, self.htype, self.hlen, self.hops,
                          self.xid, self.secs, self.flags, self.ciaddr, self.yiaddr, self.siaddr,
                          self.giaddr, self.chaddr, self.sname, self.file) + DHCP_MAGIC
        for code, value in self.options:
            out += bytes([code, len(value)]) + value
        return out + bytes([DHCP_OPT_END])


def dhcp(op: int, xid: int, chaddr: bytes, *, htype: int = ARPHRD_ETHER, flags: int = 0,
         ciaddr: bytes = b"\0" * 4, yiaddr: bytes = b"\0" * 4, siaddr: bytes = b"\0" * 4,
         options: list[tuple[int, bytes]] | None = None) -> bytes:
    """Build a DHCPv4 message; hlen is len(chaddr) (0 for InfiniBand, RFC 4390)."""
    return Dhcp(op, htype, len(chaddr), 0, xid, 0, flags, ciaddr, yiaddr, siaddr, b"\0" * 4,
                chaddr.ljust(16, b"\0"), options=list(options or [])).pack()


def parse_dhcp(data: bytes) -> Dhcp:
    """Parse a DHCPv4 message (BAD_DHCP for a short message, a bad cookie or broken options)."""
    if len(data) < DHCP_FIXED + 4 or data[DHCP_FIXED:DHCP_FIXED + 4] != DHCP_MAGIC:
        raise FrameError(DropReason.BAD_DHCP, "short message or no magic cookie")
    f = struct.unpack_from("!BBBBIHH4s4s4s4s16s64s128s", data)
    msg = Dhcp(*f)
    o = DHCP_FIXED + 4
    while True:
        if o >= len(data):
            raise FrameError(DropReason.BAD_DHCP, "options not terminated by END")
        code = data[o]
        if code == DHCP_OPT_END:
            break
        if code == DHCP_OPT_PAD:
            o += 1
            continue
        if o + 2 > len(data) or o + 2 + data[o + 1] > len(data):
            raise FrameError(DropReason.BAD_DHCP, f"option {code} runs past the end")
        msg.options.append((code, bytes(data[o + 2:o + 2 + data[o + 1]])))
        o += 2 + data[o + 1]
    if msg.hlen > 16:
        raise FrameError(DropReason.BAD_DHCP, f"hlen {msg.hlen}")
    return msg


# ===================================================================================================
# IGMP / MLD reports (what the agent snoops to join groups for guests behind eth4)
# ===================================================================================================

IGMP_V1_REPORT, IGMP_V2_REPORT, IGMP_V2_LEAVE, IGMP_V3_REPORT = 0x12, 0x16, 0x17, 0x22
MLD_V1_REPORT, MLD_V1_DONE, MLD_V2_REPORT = 131, 132, 143
#: Group record types meaning "I want traffic" (RFC 3376/3810: MODE_IS_EXCLUDE, CHANGE_TO_EXCLUDE,
#: ALLOW_NEW_SOURCES) versus "I leave" (CHANGE_TO_INCLUDE with no sources).
_WANT_RECORDS = {2, 4, 5}
_IS_INCLUDE, _TO_INCLUDE = 1, 3


def group_report(ethertype: int, l3: bytes) -> tuple[list[bytes], list[bytes]]:
    """The multicast groups an IGMP (v1/v2/v3) or MLD (v1/v2) message joins and leaves.

    @v ethertype  ETH_P_IP or ETH_P_IPV6
    @v l3         the IP packet
    @ret          (joined groups, left groups) as 4- or 16-byte addresses; ([], []) for anything else
    """
    joins: list[bytes] = []
    leaves: list[bytes] = []
    try:
        if ethertype == ETH_P_IP:
            ip = parse_ipv4(l3)
            if ip.proto != IPPROTO_IGMP:
                return joins, leaves
            msg = l3[ip.hlen:ip.total_length]
            _need(msg, 8, "IGMP")
            t = msg[0]
            if t in (IGMP_V1_REPORT, IGMP_V2_REPORT):
                joins.append(bytes(msg[4:8]))
            elif t == IGMP_V2_LEAVE:
                leaves.append(bytes(msg[4:8]))
            elif t == IGMP_V3_REPORT:
                _records(msg, 8, 4, struct.unpack_from("!H", msg, 6)[0], joins, leaves)
        elif ethertype == ETH_P_IPV6:
            ip = parse_ipv6(l3)
            nh, o, end = ip.next_header, IPV6_HLEN, IPV6_HLEN + ip.payload_length
            if nh == IPPROTO_HOPOPTS:
                _need(l3, o + 8, "hop-by-hop header")
                nh, o = l3[o], o + (l3[o + 1] + 1) * 8
            if nh != IPPROTO_ICMPV6:
                return joins, leaves
            msg = l3[o:end]
            _need(msg, 4, "MLD")
            t = msg[0]
            if t in (MLD_V1_REPORT, MLD_V1_DONE):
                _need(msg, 24, "MLDv1")
                (joins if t == MLD_V1_REPORT else leaves).append(bytes(msg[8:24]))
            elif t == MLD_V2_REPORT:
                _need(msg, 8, "MLDv2")
                _records(msg, 8, 16, struct.unpack_from("!H", msg, 6)[0], joins, leaves)
    except (FrameError, struct.error):
        return [], []
    return joins, leaves


def _records(msg: bytes, o: int, alen: int, count: int, joins: list, leaves: list) -> None:
    """Walk IGMPv3/MLDv2 group records: type, aux length, source count, group, sources, aux data."""
    for _ in range(count):
        _need(msg, o + 4 + alen, "group record")
        rtype, aux, nsrc = msg[o], msg[o + 1], struct.unpack_from("!H", msg, o + 2)[0]
        group = bytes(msg[o + 4:o + 4 + alen])
        if rtype in _WANT_RECORDS or (rtype == _IS_INCLUDE and nsrc):
            joins.append(group)
        elif rtype == _TO_INCLUDE and nsrc == 0:
            leaves.append(group)
        o += 4 + alen + nsrc * alen + aux * 4
