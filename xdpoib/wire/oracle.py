"""The translation oracle: Ethernet <-> IPoIB, byte for byte, as the BPF datapath must do it.

`eth_to_ipoib` (TX) and `ipoib_to_eth` (RX) are pure functions of a frame and the `Tables` the agent
keeps in the BPF maps. The BPF programs are checked against them in differential tests, and the agent
uses them directly for control frames (DHCP per RFC 4390, IGMP/MLD). The one thing they write is
`Tables.dhcp_clients`: the client MAC behind each DHCP transaction rewritten for the fabric, by xid,
since the server's reply comes back with an empty chaddr and servers need not echo the client
identifier that would name the client otherwise (dnsmasq 2.90 does not; ISC dhcpd only when told to).

TX checks run in this order, and the first failing one names the drop reason (the BPF program keeps
the same order): Ethernet header and VLAN tag (TRUNCATED, STACKED_VLAN) -> VID to P_Key (UNKNOWN_VLAN)
-> source MAC is a VIF (SPOOFED_SOURCE) -> EtherType (UNSUPPORTED_ETHERTYPE) -> L3 header and lengths
(TRUNCATED, BAD_IP_HEADER, BAD_LENGTH, BAD_ARP) -> destination class (MCAST_MISMATCH) -> ARP/ND body
(ARP_UNKNOWN_HWADDR, BAD_ND, ND_UNKNOWN_LLADDR). CONTROL frames stop after the destination class.

Edge rules (docs/design.md §3.14): Ethernet padding after the IPv4 total length, the IPv6 payload or the
28-byte ARP body is dropped on TX (and trailing bytes likewise on RX); RX output is never padded; VID 0
(priority tag) is the untagged partition; a second tag is STACKED_VLAN. An ND message is translated
only if its ICMPv6 checksum is right (else BAD_ND), and leaves with a checksum computed afresh.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from xdpoib.errors import FrameError
from xdpoib.reasons import DropReason, Kind
from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, IPOIB_ALEN, ZERO_MAC, IPoIBAddr, is_multicast_mac
from xdpoib.wire.mgid import SCOPE_LINK, broadcast_mgid, full_pkey, ipv4_mgid, ipv6_mgid

ZERO_IPOIB = b"\x00" * IPOIB_ALEN
DHCP_CLIENTS_MAX = 1024         # DHCP transactions remembered (xid -> client MAC), oldest forgotten first


# ===================================================================================================
# Tables: what the agent keeps in the maps
# ===================================================================================================

@dataclass(frozen=True)
class Vif:
    """A local VIF: its Ethernet MAC and its IPoIB address (flags 0, its QP's QPN, the port GID)."""

    vif_id: int
    mac: bytes
    addr: IPoIBAddr


@dataclass(frozen=True)
class Peer:
    """A remote IPoIB endpoint and the REMAC that stands for it on the Ethernet side."""

    peer_id: int
    mac: bytes
    addr: IPoIBAddr


@dataclass
class Tables:
    """The translation state of one attachment.

    `vlan_pkeys` maps a VID to a P_Key; VID 0 is the untagged (and priority-tagged) partition.
    `scope` is the scope nibble of the broadcast group, used for every MGID. `dhcp_clients` is not in
    the maps: the agent's memory of the DHCP transactions it rewrote, which `eth_to_ipoib` fills.
    """

    vifs: list[Vif] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)
    vlan_pkeys: dict[int, int] = field(default_factory=lambda: {0: 0xFFFF})
    scope: int = SCOPE_LINK
    learn_vifs: bool = False    # frames from unknown unicast source MACs become CONTROL (VIF learning)
    dhcp_clients: OrderedDict[int, bytes] = field(default_factory=OrderedDict)   # xid -> MAC, newest last

    def remember_dhcp_client(self, xid: int, mac: bytes) -> None:
        """Note the client MAC of a DHCP transaction sent to the fabric (at most DHCP_CLIENTS_MAX)."""
        c = self.dhcp_clients
        c[xid] = bytes(mac)
        c.move_to_end(xid)
        while len(c) > DHCP_CLIENTS_MAX:
            c.popitem(last=False)

    def vif_by_mac(self, mac: bytes) -> Vif | None:
        """Return the VIF with this MAC."""
        return next((v for v in self.vifs if v.mac == mac), None)

    def vif_by_id(self, vif_id: int) -> Vif | None:
        """Return the VIF with this id."""
        return next((v for v in self.vifs if v.vif_id == vif_id), None)

    def peer_by_mac(self, mac: bytes) -> Peer | None:
        """Return the peer whose REMAC this is."""
        return next((p for p in self.peers if p.mac == mac), None)

    def peer_by_id(self, peer_id: int) -> Peer | None:
        """Return the peer with this id."""
        return next((p for p in self.peers if p.peer_id == peer_id), None)

    def addr_by_mac(self, mac: bytes) -> IPoIBAddr | None:
        """Return the IPoIB address behind a MAC: a VIF's own, or a peer's."""
        v = self.vif_by_mac(mac)
        if v is not None:
            return v.addr
        p = self.peer_by_mac(mac)
        return p.addr if p is not None else None

    def mac_by_addr(self, addr: IPoIBAddr) -> bytes | None:
        """Return the MAC standing for an IPoIB address, matched on (QPN, GID); flags are ignored."""
        for x in (*self.vifs, *self.peers):
            if x.addr.key == addr.key:
                return x.mac
        return None

    def vid_for_pkey(self, pkey: int) -> int | None:
        """Return the VID of a partition (full-member bit ignored), or None if it has none."""
        want = pkey | 0x8000
        return next((vid for vid, pk in sorted(self.vlan_pkeys.items()) if pk | 0x8000 == want), None)


@dataclass(frozen=True)
class TxResult:
    """The oracle's decision for one Ethernet frame.

    `frame` is the IPoIB frame (4-byte header + payload). For CONTROL it is the frame the agent sends
    (DHCP rewritten per RFC 4390) unless `rewrite_control=False` was asked, in which case it is the
    untouched Ethernet frame, exactly what the BPF program hands to the agent.
    """

    kind: Kind
    frame: bytes
    vif: Vif
    pkey: int
    vid: int
    peer: Peer | None
    mgid: bytes | None
    dest_mac: bytes


@dataclass(frozen=True)
class RxResult:
    """The Ethernet frame for one IPoIB frame; `control` marks DHCP server messages (agent-handled)."""

    frame: bytes
    control: bool


# ===================================================================================================
# TX: Ethernet -> IPoIB
# ===================================================================================================

def eth_to_ipoib(frame: bytes, t: Tables, *, rewrite_control: bool = True) -> TxResult:
    """Translate one Ethernet frame from a VIF into an IPoIB frame and its destination.

    @v frame            the Ethernet frame as it left eth4 (may carry one 802.1Q tag and padding)
    @v t                the attachment's tables
    @v rewrite_control  rewrite DHCP for the fabric (the agent) or leave CONTROL frames as they came (BPF)
    @ret                a TxResult; FrameError(reason) when the frame is dropped
    """
    h = f.parse_eth(frame)
    vid = h.vid or 0
    if vid not in t.vlan_pkeys:
        raise FrameError(DropReason.UNKNOWN_VLAN, f"VID {vid}")
    pkey = full_pkey(t.vlan_pkeys[vid])
    vif = t.vif_by_mac(h.src)
    if vif is None:
        if t.learn_vifs and not h.src[0] & 1:
            # VIF learning: the agent sees the frame as it came and decides (docs/datapath.md)
            return TxResult(Kind.CONTROL, bytes(frame), None, pkey, vid, None, None, h.dst)
        raise FrameError(DropReason.SPOOFED_SOURCE, f"source {h.src.hex(':')} is not a local VIF")
    if h.ethertype not in f.IPOIB_ETHERTYPES:
        raise FrameError(DropReason.UNSUPPORTED_ETHERTYPE, f"EtherType {h.ethertype:#06x}")
    l3 = _trim_l3(h.ethertype, frame[h.hlen:])

    peer, mgid = None, None
    if h.dst == BROADCAST_MAC:
        mgid = broadcast_mgid(pkey, t.scope)
    elif is_multicast_mac(h.dst):
        mgid = _tx_group(h.ethertype, h.dst, l3, pkey, t.scope)
    else:
        if _ip_dst_is_multicast(h.ethertype, l3):
            raise FrameError(DropReason.MCAST_MISMATCH, "unicast MAC with a multicast IP destination")
        peer = t.peer_by_mac(h.dst)
    kind = Kind.GROUP if mgid is not None else Kind.PEER if peer is not None else Kind.UNRESOLVED

    ctl = _tx_control(h.ethertype, l3)
    if ctl is not None:
        if not rewrite_control:
            return TxResult(Kind.CONTROL, bytes(frame), vif, pkey, vid, peer, mgid, h.dst)
        if ctl == "dhcp":
            l3 = dhcp_client_to_ib(l3, t)
        return TxResult(Kind.CONTROL, f.ipoib(h.ethertype, l3), vif, pkey, vid, peer, mgid, h.dst)

    if h.ethertype in (f.ETH_P_ARP, f.ETH_P_RARP):
        l3 = _arp_to_ib(l3, t)
    elif h.ethertype == f.ETH_P_IPV6:
        l3 = _nd_translate(l3, lambda mac: _tx_lla(mac, t), to_ib=True)
    return TxResult(kind, f.ipoib(h.ethertype, l3), vif, pkey, vid, peer, mgid, h.dst)


def _trim_l3(ethertype: int, l3: bytes) -> bytes:
    """Validate the L3 header and cut Ethernet padding (docs/design.md §3.14). TIPC passes as it is."""
    if ethertype == f.ETH_P_IP:
        return bytes(l3[:f.parse_ipv4(l3).total_length])
    if ethertype == f.ETH_P_IPV6:
        return bytes(l3[:f.IPV6_HLEN + f.parse_ipv6(l3).payload_length])
    if ethertype in (f.ETH_P_ARP, f.ETH_P_RARP):
        a = f.parse_arp(l3)
        return bytes(l3[:a.length])
    return bytes(l3)


def _ip_dst_is_multicast(ethertype: int, l3: bytes) -> bool:
    if ethertype == f.ETH_P_IP:
        return l3[16] & 0xF0 == 0xE0
    if ethertype == f.ETH_P_IPV6:
        return l3[24] == 0xFF
    return False


def _tx_group(ethertype: int, dst: bytes, l3: bytes, pkey: int, scope: int) -> bytes:
    """The MGID of a multicast frame, computed from the IP destination (never the MAC)."""
    if ethertype == f.ETH_P_IP and dst[:3] == b"\x01\x00\x5e" and l3[16] & 0xF0 == 0xE0:
        return ipv4_mgid(l3[16:20], pkey, scope)
    if ethertype == f.ETH_P_IPV6 and dst[:2] == b"\x33\x33" and l3[24] == 0xFF:
        return ipv6_mgid(l3[24:40], pkey, scope)
    raise FrameError(DropReason.MCAST_MISMATCH,
                     f"multicast MAC {dst.hex(':')} for EtherType {ethertype:#06x}")


def _tx_control(ethertype: int, l3: bytes) -> str | None:
    """Return 'dhcp' or 'igmp'/'mld' for frames the agent must handle, else None."""
    if ethertype == f.ETH_P_IP:
        return _ipv4_control(l3, f.DHCP_CLIENT_PORT, f.DHCP_SERVER_PORT, igmp=True)
    if ethertype == f.ETH_P_IPV6 and _is_mld(l3):
        return "mld"
    return None


def _ipv4_control(l3: bytes, sport: int, dport: int, igmp: bool) -> str | None:
    ip = f.parse_ipv4(l3)
    if igmp and ip.proto == f.IPPROTO_IGMP:
        return "igmp"
    if (ip.proto == f.IPPROTO_UDP and ip.frag & 0x1FFF == 0 and ip.total_length >= ip.hlen + 8
            and struct.unpack_from("!HH", l3, ip.hlen) == (sport, dport)):
        return "dhcp"
    return None


def _is_mld(l3: bytes) -> bool:
    """MLD (ICMPv6 130/131/132/143), directly or behind one hop-by-hop options header."""
    nh, o, end = l3[6], f.IPV6_HLEN, len(l3)
    if nh == f.IPPROTO_HOPOPTS and end >= o + 8:
        nh, o = l3[o], o + (l3[o + 1] + 1) * 8
    return nh == f.IPPROTO_ICMPV6 and end > o and l3[o] in f.MLD_TYPES


def _tx_lla(mac: bytes, t: Tables) -> bytes:
    a = t.addr_by_mac(mac)
    if a is None:
        raise FrameError(DropReason.ND_UNKNOWN_LLADDR, f"no VIF or peer behind {mac.hex(':')}")
    return a.pack()


def _arp_hw_to_ib(mac: bytes, t: Tables) -> bytes:
    if mac in (ZERO_MAC, BROADCAST_MAC):
        return ZERO_IPOIB
    a = t.addr_by_mac(mac)
    if a is None:
        raise FrameError(DropReason.ARP_UNKNOWN_HWADDR, f"no VIF or peer behind {mac.hex(':')}")
    return a.pack()


def _arp_to_ib(l3: bytes, t: Tables) -> bytes:
    a = f.parse_arp(l3)
    if a.htype != f.ARPHRD_ETHER:
        raise FrameError(DropReason.BAD_ARP, "InfiniBand-form ARP on the Ethernet side")
    return f.arp(a.op, _arp_hw_to_ib(a.sha, t), a.spa, _arp_hw_to_ib(a.tha, t), a.tpa)


# ===================================================================================================
# RX: IPoIB -> Ethernet
# ===================================================================================================

def ipoib_to_eth(frame: bytes, t: Tables, *, src: Peer, vif: Vif, pkey: int, multicast: bool) -> RxResult:
    """Translate one IPoIB frame received from the fabric into the Ethernet frame eth4 receives.

    @v frame      the IPoIB frame (4-byte header + payload), GRH already stripped
    @v t          the attachment's tables
    @v src        the sending peer (the agent creates it before the first frame of a new sender)
    @v vif        the receiving VIF
    @v pkey       the partition the frame arrived on
    @v multicast  whether it arrived through a multicast group
    @ret          RxResult; FrameError(reason) when the frame is dropped
    """
    etype = f.parse_ipoib(frame)
    if etype not in f.IPOIB_ETHERTYPES:
        raise FrameError(DropReason.BAD_IPOIB_HEADER, f"EtherType {etype:#06x}")
    vid = t.vid_for_pkey(pkey)
    if vid is None:
        raise FrameError(DropReason.NO_PARTITION, f"P_Key {pkey:#06x} has no VLAN here")
    l3 = _trim_l3(etype, frame[f.IPOIB_HLEN:])
    dst = _rx_dest_mac(etype, l3) if multicast else vif.mac

    control = False
    if etype in (f.ETH_P_ARP, f.ETH_P_RARP):
        l3 = _arp_to_eth(l3, t)
    elif etype == f.ETH_P_IPV6:
        l3 = _nd_translate(l3, lambda a: _rx_lla(a, t), to_ib=False)
    elif etype == f.ETH_P_IP and _ipv4_control(l3, f.DHCP_SERVER_PORT, f.DHCP_CLIENT_PORT, igmp=False):
        l3, control = dhcp_server_to_eth(l3, vif.mac, t), True
    return RxResult(f.eth(dst, src.mac, etype, l3, vid=vid or None), control)


def _rx_dest_mac(etype: int, l3: bytes) -> bytes:
    """The Ethernet destination of a multicast frame, from its IP destination."""
    if etype == f.ETH_P_IP and l3[16] & 0xF0 == 0xE0:
        return b"\x01\x00\x5e" + bytes([l3[17] & 0x7F]) + l3[18:20]
    if etype == f.ETH_P_IPV6 and l3[24] == 0xFF:
        return b"\x33\x33" + l3[36:40]
    return BROADCAST_MAC


def _rx_lla(raw: bytes, t: Tables) -> bytes:
    mac = t.mac_by_addr(IPoIBAddr.unpack(raw))
    if mac is None:
        raise FrameError(DropReason.ND_UNKNOWN_LLADDR, "no peer or VIF behind an ND link-layer address")
    return mac


def _arp_hw_to_eth(raw: bytes, t: Tables) -> bytes:
    """An IB ARP hardware address on Ethernet. No address (Linux's 20 zero bytes) and a multicast one
    (QPN 0xffffff: Solaris puts a broadcast template in the target of its requests) are the zero MAC."""
    if raw == ZERO_IPOIB or raw[1:4] == b"\xff\xff\xff":
        return ZERO_MAC
    mac = t.mac_by_addr(IPoIBAddr.unpack(raw))
    if mac is None:
        raise FrameError(DropReason.ARP_UNKNOWN_HWADDR, f"no peer or VIF behind {raw.hex(':')}")
    return mac


def _arp_to_eth(l3: bytes, t: Tables) -> bytes:
    a = f.parse_arp(l3)
    if a.htype != f.ARPHRD_INFINIBAND:
        raise FrameError(DropReason.BAD_ARP, "Ethernet-form ARP on the fabric")
    return f.arp(a.op, _arp_hw_to_eth(a.sha, t), a.spa, _arp_hw_to_eth(a.tha, t), a.tpa)


# ===================================================================================================
# Neighbour discovery: link-layer options 8 <-> 24 bytes (RFC 4391 section 8)
# ===================================================================================================

def _nd_translate(l3: bytes, convert, to_ib: bool) -> bytes:
    """Rewrite the SLLA/TLLA options of an ND message; other IPv6 packets pass unchanged."""
    ip = f.parse_ipv6(l3)
    if ip.next_header != f.IPPROTO_ICMPV6 or ip.payload_length < 1 or l3[40] not in f.ND_TYPES:
        return l3
    msg = l3[40:]
    nd_type = msg[0]
    if len(msg) < 4 + f.ND_FIXED[nd_type]:
        raise FrameError(DropReason.BAD_ND, f"ND type {nd_type} of {len(msg)} bytes")
    if f.l4_checksum(ip.src, ip.dst, f.IPPROTO_ICMPV6, msg[:2] + b"\0\0" + msg[4:]) != \
            struct.unpack_from("!H", msg, 2)[0]:
        raise FrameError(DropReason.BAD_ND, "ICMPv6 checksum")
    want_len = 1 if to_ib else 3
    body = bytearray(msg[4:4 + f.ND_FIXED[nd_type]])
    for opt in f.parse_nd_options(msg, nd_type):
        if opt.opt_type in (f.ND_OPT_SLLA, f.ND_OPT_TLLA):
            if opt.raw[1] != want_len:
                raise FrameError(DropReason.BAD_ND, f"link-layer option of length {opt.raw[1]}")
            addr = opt.raw[2:8] if to_ib else opt.raw[4:24]
            body += f.nd_lla_option(opt.opt_type, convert(bytes(addr)))
        else:
            body += opt.raw
    new = f.icmpv6(ip.src, ip.dst, nd_type, msg[1], bytes(body))
    return l3[:4] + struct.pack("!H", len(new)) + l3[6:40] + new


# ===================================================================================================
# DHCPv4 over InfiniBand (RFC 4390)
# ===================================================================================================

def client_id_for_mac(mac: bytes) -> bytes:
    """The client identifier (RFC 4361) xdpoib supplies for an Ethernet client that sent none:
    type 255, IAID = the MAC's low 4 bytes, DUID-LL (type 3, hardware type 1, the MAC)."""
    return b"\xff" + mac[2:6] + struct.pack("!HH", 3, f.ARPHRD_ETHER) + mac


def mac_from_client_id(cid: bytes | None) -> bytes | None:
    """Return the MAC inside a client identifier of `client_id_for_mac`'s form (or any type-255
    DUID-LL over Ethernet), or of the hardware form (type 1 and the MAC, RFC 2132 §9.14: what busybox
    udhcpc sends), else None."""
    if cid and len(cid) == 15 and cid[0] == 0xFF and cid[5:9] == struct.pack("!HH", 3, f.ARPHRD_ETHER):
        return bytes(cid[9:15])
    if cid and len(cid) == 7 and cid[0] == f.ARPHRD_ETHER:
        return bytes(cid[1:7])
    return None


def _rebuild_udp4(l3: bytes, payload: bytes) -> bytes:
    """Return the IPv4/UDP packet l3 with a new UDP payload: lengths and both checksums recomputed."""
    ip = f.parse_ipv4(l3)
    sport, dport = struct.unpack_from("!HH", l3, ip.hlen)
    seg = f.udp(ip.src, ip.dst, sport, dport, payload)
    hdr = bytearray(l3[:ip.hlen])
    struct.pack_into("!HH", hdr, 2, ip.hlen + len(seg), ip.ident)
    struct.pack_into("!H", hdr, 10, 0)
    struct.pack_into("!H", hdr, 10, f.checksum(bytes(hdr)))
    return bytes(hdr) + seg


def _dhcp_payload(l3: bytes) -> tuple[f.Dhcp, int]:
    ip = f.parse_ipv4(l3)
    data = l3[ip.hlen + 8:ip.total_length]
    return f.parse_dhcp(data), len(data)


def dhcp_client_to_ib(l3: bytes, t: Tables | None = None) -> bytes:
    """Rewrite a DHCP client message (IPv4/UDP 68->67) for IPoIB, per RFC 4390.

    htype 32, hlen 0, chaddr zero; a client identifier is required (the one derived from the MAC is
    added when the client sent none); BROADCAST set while the client has no address (ciaddr 0), since
    the server cannot put a 20-byte address in chaddr to unicast its reply. The message keeps at least
    its original length (trailing zero padding). With tables, the client's MAC is remembered by xid
    for the reply (`dhcp_server_to_eth`).
    """
    msg, size = _dhcp_payload(l3)
    if msg.htype != f.ARPHRD_ETHER or msg.hlen != 6:
        raise FrameError(DropReason.BAD_DHCP, f"client message with htype {msg.htype} hlen {msg.hlen}")
    mac = msg.chaddr[:6]
    if t is not None:
        t.remember_dhcp_client(msg.xid, mac)
    if msg.option(f.DHCP_OPT_CLIENT_ID) is None:
        end = next((i for i, (c, _) in enumerate(msg.options) if c == f.DHCP_OPT_MSGTYPE), -1) + 1
        msg.options.insert(end, (f.DHCP_OPT_CLIENT_ID, client_id_for_mac(mac)))
    msg.htype, msg.hlen, msg.chaddr = f.ARPHRD_INFINIBAND, 0, b"\x00" * 16
    if msg.ciaddr == b"\x00" * 4:
        msg.flags |= f.DHCP_BROADCAST
    return _rebuild_udp4(l3, msg.pack().ljust(size, b"\x00"))


def dhcp_server_to_eth(l3: bytes, default_mac: bytes, t: Tables | None = None) -> bytes:
    """Rewrite a DHCP server message (IPv4/UDP 67->68) from IPoIB for an Ethernet client.

    chaddr becomes the MAC of the client whose message with this xid went out (`t.dhcp_clients`), else
    the MAC named by an echoed client identifier (RFC 6842) of a form `mac_from_client_id` reads, else
    default_mac (the receiving VIF's, which is VIF 0 for a broadcast reply: a guest behind a bridge
    would ignore it); htype 1, hlen 6. Flags are left as the server sent them.
    """
    msg, size = _dhcp_payload(l3)
    mac = ((t.dhcp_clients.get(msg.xid) if t is not None else None)
           or mac_from_client_id(msg.option(f.DHCP_OPT_CLIENT_ID)) or default_mac)
    msg.htype, msg.hlen, msg.chaddr = f.ARPHRD_ETHER, 6, mac + b"\x00" * 10
    return _rebuild_udp4(l3, msg.pack().ljust(size, b"\x00"))


# ===================================================================================================
# Oversize frames: ICMP "fragmentation needed" / ICMPv6 "packet too big" (docs/design.md §3.6)
# ===================================================================================================

def too_big_reply(frame: bytes, mtu: int, from_mac: bytes) -> bytes | None:
    """The ICMP error that tells the sender of an oversize Ethernet frame the MTU it must use.

    IPv4 gets type 3 code 4 with the next-hop MTU, IPv6 type 2 (Packet Too Big); both quote as much
    of the original packet as the minimum MTU allows (576 / 1280 bytes in all), come from the original
    destination address (the far end of this link) and from_mac, and go to the sender's MAC. Other
    frames (ARP, non-IP, ICMP errors themselves) get None: they are just dropped.

    @v frame     the Ethernet frame that did not fit (one 802.1Q tag allowed; the reply keeps it)
    @v mtu       the largest IP packet the path carries
    @v from_mac  source MAC of the reply (the destination's REMAC)
    """
    h = f.parse_eth(frame)
    l3 = frame[h.hlen:]
    vid = h.vid
    if h.ethertype == f.ETH_P_IP:
        ip = f.parse_ipv4(l3)
        if ip.proto == f.IPPROTO_ICMP and len(l3) > ip.hlen and l3[ip.hlen] not in (0, 8):
            return None                                 # never answer an ICMP error
        quote = l3[:576 - 28]
        body = struct.pack("!BBHHH", f.ICMP_DEST_UNREACH, 4, 0, 0, mtu) + quote
        body = body[:2] + struct.pack("!H", f.checksum(body)) + body[4:]
        reply = f.ipv4(ip.dst, ip.src, f.IPPROTO_ICMP, body, ttl=64)
    elif h.ethertype == f.ETH_P_IPV6:
        ip = f.parse_ipv6(l3)
        if ip.next_header == f.IPPROTO_ICMPV6 and len(l3) > 40 and l3[40] < 128:
            return None
        quote = l3[:1280 - 48]
        reply = f.ipv6(ip.dst, ip.src, f.IPPROTO_ICMPV6,
                       f.icmpv6(ip.dst, ip.src, f.ICMPV6_PKT_TOO_BIG, 0, struct.pack("!I", mtu) + quote))
    else:
        return None
    return f.eth(h.src, from_mac, h.ethertype, reply, vid=vid)
