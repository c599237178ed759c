"""Shared test fixtures for the wire library: two hosts' tables and a frame generator.

Host A has VIF `A_MAC` (IPoIB address `A_ADDR`) and knows host B as peer `B_REMAC`; `mirror(T)` is
the same link seen from host B's side (B's REMAC becomes the local VIF, A's MAC becomes the peer), so
`rx(tx(E, T), mirror(T))` and `tx(rx(I, T), mirror(T))` are identities.
"""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, ZERO_MAC, IPoIBAddr, parse_gid, parse_mac
from xdpoib.wire.oracle import Peer, Tables, Vif

A_MAC = parse_mac("f4:52:14:8d:52:11")
A_ADDR = IPoIBAddr(0, 0x000048, parse_gid("fe80::f452:1403:8d:5211"))
B_REMAC = parse_mac("0e:12:34:56:78:9a")
B_ADDR = IPoIBAddr(0x80, 0x000051, parse_gid("fe80::2:c903:a:b0c"))
A_IP4, B_IP4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A_IP6 = ipaddress.IPv6Address("fe80::f652:14ff:fe8d:5211").packed
B_IP6 = ipaddress.IPv6Address("fe80::c12:34ff:fe56:789a").packed
VLANS = {0: 0xFFFF, 3: 0x8003}


def tables() -> Tables:
    """Host A's view."""
    return Tables(vifs=[Vif(1, A_MAC, A_ADDR)], peers=[Peer(7, B_REMAC, B_ADDR)], vlan_pkeys=dict(VLANS))


def mirror(t: Tables) -> Tables:
    """The same link from the other end: VIFs and peers swap roles."""
    return Tables(vifs=[Vif(p.peer_id, p.mac, p.addr) for p in t.peers],
                  peers=[Peer(v.vif_id, v.mac, v.addr) for v in t.vifs],
                  vlan_pkeys=dict(t.vlan_pkeys), scope=t.scope)


# --- a generator of valid Ethernet frames from host A -------------------------------------------------

hw = st.sampled_from([A_MAC, B_REMAC])
payload = st.binary(max_size=64)
vid = st.sampled_from([None, 0, 3])


@st.composite
def ipv4_frames(draw):
    kind = draw(st.sampled_from(["unicast", "multicast", "broadcast"]))
    proto = draw(st.sampled_from([f.IPPROTO_ICMP, f.IPPROTO_UDP, f.IPPROTO_TCP, 99]))
    if kind == "unicast":
        dst_ip, dst = B_IP4, B_REMAC
    elif kind == "multicast":
        dst_ip = bytes([draw(st.integers(224, 239)), *draw(st.binary(min_size=3, max_size=3))])
        dst = b"\x01\x00\x5e" + bytes([dst_ip[1] & 0x7F]) + dst_ip[2:]
    else:
        dst_ip, dst = b"\xff" * 4, BROADCAST_MAC
    body = draw(payload)
    if proto == f.IPPROTO_UDP:   # keep clear of DHCP ports: that is a CONTROL frame, tested apart
        body = f.udp(A_IP4, dst_ip, draw(st.integers(1000, 60000)), draw(st.integers(1000, 60000)), body)
    pkt = f.ipv4(A_IP4, dst_ip, proto, body, ttl=draw(st.integers(1, 255)), ident=draw(st.integers(0, 65535)))
    return f.eth(dst, A_MAC, f.ETH_P_IP, pkt, vid=draw(vid))


@st.composite
def arp_frames(draw):
    op = draw(st.sampled_from([f.ARPOP_REQUEST, f.ARPOP_REPLY, f.ARPOP_RREQUEST, f.ARPOP_RREPLY]))
    etype = f.ETH_P_RARP if op > 2 else f.ETH_P_ARP
    if op in (f.ARPOP_REQUEST, f.ARPOP_RREQUEST):
        dst, tha = BROADCAST_MAC, draw(st.sampled_from([ZERO_MAC, B_REMAC]))
    else:
        dst, tha = B_REMAC, B_REMAC
    body = f.arp(op, draw(hw), A_IP4, tha, B_IP4)
    return f.eth(dst, A_MAC, etype, body, vid=draw(vid))


@st.composite
def ipv6_frames(draw):
    kind = draw(st.sampled_from(["ns", "na", "rs", "ra", "echo", "mcast"]))
    lla = draw(st.sampled_from([A_MAC, B_REMAC]))
    if kind == "ns":
        tgt = B_IP6
        dst_ip = bytes.fromhex("ff0200000000000000000001ff") + tgt[13:]
        pkt = f.nd_ns(A_IP6, dst_ip, tgt, slla=draw(st.sampled_from([None, lla])))
    elif kind == "na":
        dst_ip = draw(st.sampled_from([B_IP6, bytes.fromhex("ff02" + "00" * 13 + "01")]))
        pkt = f.nd_na(A_IP6, dst_ip, A_IP6, tlla=draw(st.sampled_from([None, lla])),
                      solicited=dst_ip == B_IP6)
    elif kind == "rs":
        dst_ip = bytes.fromhex("ff02" + "00" * 13 + "02")
        pkt = f.nd_rs(A_IP6, dst_ip, slla=draw(st.sampled_from([None, lla])))
    elif kind == "ra":
        dst_ip = bytes.fromhex("ff02" + "00" * 13 + "01")
        pkt = f.nd_ra(A_IP6, dst_ip, slla=draw(st.sampled_from([None, lla])),
                      prefix=draw(st.sampled_from([None, bytes.fromhex("20010db8" + "00" * 12)])),
                      mtu=draw(st.sampled_from([None, 2044])))
    elif kind == "echo":
        dst_ip = B_IP6
        pkt = f.ipv6(A_IP6, dst_ip, f.IPPROTO_ICMPV6,
                     f.icmpv6(A_IP6, dst_ip, f.ICMPV6_ECHO_REQUEST, 0, draw(payload)))
    else:
        dst_ip = bytes.fromhex("ff0e") + draw(st.binary(min_size=14, max_size=14))
        pkt = f.ipv6(A_IP6, dst_ip, f.IPPROTO_UDP, f.udp(A_IP6, dst_ip, 5000, 5001, draw(payload)))
    dst = b"\x33\x33" + dst_ip[12:] if dst_ip[0] == 0xFF else B_REMAC
    return f.eth(dst, A_MAC, f.ETH_P_IPV6, pkt, vid=draw(vid))


@st.composite
def tipc_frames(draw):
    return f.eth(draw(st.sampled_from([B_REMAC, BROADCAST_MAC])), A_MAC, f.ETH_P_TIPC,
                 draw(st.binary(min_size=1, max_size=64)), vid=draw(vid))


#: Any valid, non-control frame host A may send.
eth_frames = st.one_of(ipv4_frames(), arp_frames(), ipv6_frames(), tipc_frames())


def pad(frame: bytes, to: int = 60, fill: bytes = b"\xa5") -> bytes:
    """Ethernet minimum-size padding, as a NIC would add it."""
    return frame + fill * max(0, to - len(frame))
