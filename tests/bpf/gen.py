"""Frame generators for the BPF tests: valid-looking Ethernet and IPoIB frames over a fixed set of
tables, and malformed variants. They take a `random.Random` (hypothesis' `st.randoms()` in the
differential tests, a seeded one for the malformed sweep) so one draw makes one frame cheaply."""

from __future__ import annotations

import struct

from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr
from xdpoib.wire.mgid import broadcast_mgid, ipv4_mgid
from xdpoib.wire.oracle import Peer, Tables, Vif

GID_A = bytes.fromhex("fe800000000000000002c90300001111")
VIFS = [
    Vif(1, bytes.fromhex("020000000001"), IPoIBAddr(0, 0x000048, GID_A)),
    Vif(2, bytes.fromhex("020000000002"), IPoIBAddr(0, 0x000049, GID_A)),
]
PEERS = [
    Peer(10 + i, bytes([0x06, 0, 0, 0, 0x10, i]),
         IPoIBAddr(0x80 if i == 3 else 0, 0x100 + i, bytes.fromhex("fe800000000000000002c9030000") + bytes([0x20, i])))
    for i in range(5)
]
VLAN_PKEYS = {0: 0xFFFF, 10: 0x8001, 20: 0x0002, 30: 0x8001}
GROUPS = {broadcast_mgid(0xFFFF): 100, ipv4_mgid(bytes([224, 0, 0, 251]), 0xFFFF): 101}
RX_PKEYS = [0xFFFF, 0x7FFF, 0x8001, 0x0001, 0x0002, 0x8005]
UNKNOWN_MAC = bytes.fromhex("0a0b0c0d0e0f")
BCAST = b"\xff" * 6


def tables() -> Tables:
    """The tables every generated frame is judged against."""
    return Tables(vifs=list(VIFS), peers=list(PEERS), vlan_pkeys=dict(VLAN_PKEYS))


def _ip4(r) -> bytes:
    return r.choice([bytes([10, 0, 0, r.randrange(256)]), bytes([224, 0, 0, 251]),
                     bytes([239, 255, r.randrange(256), r.randrange(256)]), b"\xff" * 4, r.randbytes(4)])


def _ip6(r) -> bytes:
    return r.choice([bytes.fromhex("fe80000000000000") + r.randbytes(8),
                     bytes.fromhex("ff0200000000000000000001ff") + r.randbytes(3),
                     bytes.fromhex("ff02") + bytes(13) + b"\x01", r.randbytes(16)])


def _known_mac(r) -> bytes:
    return r.choice([v.mac for v in VIFS] + [p.mac for p in PEERS])


def _hw(r) -> bytes:
    return r.choice([_known_mac(r), _known_mac(r), b"\x00" * 6, BCAST, UNKNOWN_MAC])


def _ipv4_packet(r, dst_ip: bytes) -> bytes:
    src = bytes([10, 0, 0, 1])
    kind = r.randrange(6)
    if kind == 0:       # DHCP client -> server
        body = f.dhcp(1, r.randrange(1 << 32), _known_mac(r), options=[(53, b"\x01")])
        return f.ipv4(b"\0" * 4, b"\xff" * 4, 17, f.udp(b"\0" * 4, b"\xff" * 4, 68, 67, body))
    if kind == 1:       # IGMP
        return f.ipv4(src, dst_ip, 2, bytes([0x16, 0, 0, 0]) + dst_ip, options=b"\x94\x04\x00\x00")
    if kind == 2:
        return f.ipv4(src, dst_ip, 1, f.icmp_echo(r.randrange(65536), r.randrange(65536), r.randbytes(r.randrange(64))))
    payload = r.randbytes(r.randrange(0, 200))
    return f.ipv4(src, dst_ip, 17, f.udp(src, dst_ip, r.randrange(65536), r.randrange(65536), payload),
                  ttl=r.randrange(1, 256), ident=r.randrange(65536))


def _nd_packet(r, dst_ip: bytes) -> bytes:
    src = bytes.fromhex("fe80000000000000") + r.randbytes(8)
    t = r.randrange(5)
    lla = (lambda: _known_mac(r)) if r.random() < 0.85 else (lambda: UNKNOWN_MAC)
    if t == 0:
        return f.nd_ns(src, dst_ip, _ip6(r), slla=lla() if r.random() < 0.8 else None)
    if t == 1:
        return f.nd_na(src, dst_ip, _ip6(r), tlla=lla() if r.random() < 0.8 else None)
    if t == 2:
        return f.nd_rs(src, dst_ip, slla=lla() if r.random() < 0.5 else None)
    if t == 3:
        return f.nd_ra(src, dst_ip, slla=lla() if r.random() < 0.7 else None,
                       prefix=r.randbytes(16) if r.random() < 0.5 else None,
                       mtu=1500 if r.random() < 0.5 else None)
    opts = f.nd_lla_option(f.ND_OPT_TLLA, lla()) if r.random() < 0.7 else b""
    opts += struct.pack("!BB6x", 4, 1) + b"\x00" * 0 if r.random() < 0.3 else b""
    return f.nd_message(src, dst_ip, f.ND_REDIRECT, bytes(4) + r.randbytes(32), opts)


def _ipv6_packet(r, dst_ip: bytes) -> bytes:
    src = bytes.fromhex("fe80000000000000") + r.randbytes(8)
    kind = r.randrange(5)
    if kind <= 1:
        return _nd_packet(r, dst_ip)
    if kind == 2:       # MLD, sometimes behind hop-by-hop
        mld = f.icmpv6(src, dst_ip, r.choice([130, 131, 132, 143]), 0, bytes(4) + _ip6(r))
        if r.random() < 0.5:
            return f.ipv6(src, dst_ip, 0, bytes([58, 0, 5, 2, 0, 0, 1, 0]) + mld, hop_limit=1)
        return f.ipv6(src, dst_ip, 58, mld, hop_limit=1)
    payload = r.randbytes(r.randrange(0, 200))
    return f.ipv6(src, dst_ip, 17, f.udp(src, dst_ip, r.randrange(65536), r.randrange(65536), payload))


def eth_frame(r) -> bytes:
    """One Ethernet frame as a guest might send it (most translate, some are dropped)."""
    etype = r.choice([f.ETH_P_IP] * 4 + [f.ETH_P_IPV6] * 4 + [f.ETH_P_ARP] * 2 +
                     [f.ETH_P_RARP, f.ETH_P_TIPC, 0x88CC, 0x9000])
    src = r.choice([v.mac for v in VIFS] * 8 + [UNKNOWN_MAC, PEERS[0].mac])
    dst_kind = r.randrange(5)
    if etype == f.ETH_P_IP:
        dst_ip = _ip4(r)
        l3 = _ipv4_packet(r, dst_ip)
        dst_ip = l3[16:20]
        if dst_kind <= 1 and dst_ip[0] & 0xF0 == 0xE0:
            dst = b"\x01\x00\x5e" + bytes([dst_ip[1] & 0x7F]) + dst_ip[2:]
        else:
            dst = r.choice([p.mac for p in PEERS] + [BCAST, UNKNOWN_MAC, b"\x01\x00\x5e\x00\x00\x01"])
    elif etype == f.ETH_P_IPV6:
        dst_ip = _ip6(r)
        l3 = _ipv6_packet(r, dst_ip)
        dst_ip = l3[24:40]
        if dst_kind <= 1 and dst_ip[0] == 0xFF:
            dst = b"\x33\x33" + dst_ip[12:]
        else:
            dst = r.choice([p.mac for p in PEERS] + [BCAST, UNKNOWN_MAC, b"\x33\x33\x00\x00\x00\x01"])
    elif etype in (f.ETH_P_ARP, f.ETH_P_RARP):
        op = r.choice([1, 2, 3, 4])
        l3 = f.arp(op, _hw(r), bytes([10, 0, 0, 1]), _hw(r), bytes([10, 0, 0, r.randrange(256)]))
        dst = r.choice([BCAST, BCAST, PEERS[1].mac, UNKNOWN_MAC, b"\x01\x00\x5e\x00\x00\x01"])
    else:
        l3 = r.randbytes(r.randrange(0, 80))
        dst = r.choice([BCAST, PEERS[2].mac, UNKNOWN_MAC])
    vid = r.choice([None] * 6 + [0, 10, 20, 30, 99])
    frame = f.eth(dst, src, etype, l3, vid=vid, pcp=r.randrange(8))
    if len(frame) < 60 and r.random() < 0.7:
        frame += bytes(60 - len(frame))         # Ethernet minimum padding
    elif r.random() < 0.1:
        frame += r.randbytes(r.randrange(1, 20))
    return frame


def rx_case(r, ipoib_frame: bytes) -> tuple[bytes, Peer, Vif, int, bool]:
    """Choose receive metadata for an IPoIB frame: (frame, sender, VIF, P_Key, multicast)."""
    return ipoib_frame, r.choice(PEERS), r.choice(VIFS), r.choice(RX_PKEYS), r.random() < 0.4


def ipoib_frame(r) -> bytes:
    """One IPoIB frame as a peer might send it: the translation of a generated Ethernet frame, else a
    raw one (unknown EtherType, reserved bits set)."""
    from xdpoib.errors import FrameError
    from xdpoib.wire.oracle import eth_to_ipoib

    if r.random() < 0.85:
        for _ in range(20):
            try:
                res = eth_to_ipoib(eth_frame(r), tables())
            except FrameError:
                continue
            out = bytearray(res.frame)
            if r.random() < 0.1:
                out[2:4] = r.randbytes(2)       # reserved bytes: ignored
            return bytes(out)
    k = r.randrange(5)
    ip_a, ip_b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    if k == 0:      # Ethernet-form ARP on the fabric
        return f.ipoib(f.ETH_P_ARP, f.arp(2, _hw(r), ip_a, _hw(r), ip_b))
    if k == 1:      # IB ARP naming addresses nobody has
        return f.ipoib(f.ETH_P_ARP, f.arp(1, r.choice([r.randbytes(20), PEERS[0].addr.pack()]), ip_a,
                                          r.choice([bytes(20), r.randbytes(20)]), ip_b))
    if k == 2:      # ND with Ethernet-form options
        return f.ipoib(f.ETH_P_IPV6, _nd_packet(r, _ip6(r)))
    etype = r.choice([0x88CC, 0x9000, f.ETH_P_TIPC, f.ETH_P_IP])
    return struct.pack("!HH", etype, 0) + r.randbytes(r.randrange(10, 80))


# ------------------------------------------------------------------------------------- malformed

def mangle(r, frame: bytes) -> list[bytes]:
    """Malformed variants of a frame: truncations at many offsets, length fields, tags, body bytes."""
    out = [frame[:n] for n in range(14, len(frame))]
    b = bytearray(frame)
    for _ in range(4):
        m = bytearray(b)
        op = r.randrange(6)
        if op == 0 and len(m) > 21:              # IPv4 total length / IPv6 payload length / ARP lens
            i = r.choice([16, 17, 18, 19, 20, 21])
            m[i] = r.randrange(256)
        elif op == 1:                            # a second tag
            m[12:12] = struct.pack("!HH", r.choice([0x8100, 0x88A8]), r.randrange(4096))
            m[12:12] = struct.pack("!HH", 0x8100, 0)
        elif op == 2 and len(m) > 14:            # any body byte
            m[r.randrange(14, len(m))] = r.randrange(256)
        elif op == 3:                            # version/IHL byte
            i = 18 if m[12:14] == b"\x81\x00" else 14
            if i < len(m):
                m[i] = r.randrange(256)
        elif op == 4 and len(m) > 20:            # truncate the tail at a random place
            m = m[: r.randrange(14, len(m))]
        else:                                    # junk appended
            m += r.randbytes(r.randrange(1, 40))
        out.append(bytes(m))
    return out
