"""The translation oracle: golden layouts (docs/design.md §3.1, 3.7-3.9, 3.14), round trips, malformed input."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirekit import (
    A_ADDR,
    A_IP4,
    A_IP6,
    A_MAC,
    B_ADDR,
    B_IP4,
    B_IP6,
    B_REMAC,
    eth_frames,
    mirror,
    pad,
    tables,
)

from xdpoib.errors import FrameError
from xdpoib.reasons import DropReason, Kind
from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, ZERO_MAC, IPoIBAddr
from xdpoib.wire.mgid import broadcast_mgid, ipv4_mgid, ipv6_mgid
from xdpoib.wire.oracle import (
    DHCP_CLIENTS_MAX,
    Vif,
    client_id_for_mac,
    eth_to_ipoib,
    ipoib_to_eth,
    mac_from_client_id,
)

T = tables()
M = mirror(T)


def rx(frame, t, multicast=False, pkey=0xFFFF):
    """Deliver an IPoIB frame to the host whose tables are t, from its only peer."""
    return ipoib_to_eth(frame, t, src=t.peers[0], vif=t.vifs[0], pkey=pkey, multicast=multicast)


def drop_reason(fn, *a, **kw):
    with pytest.raises(FrameError) as e:
        fn(*a, **kw)
    return e.value.reason


# --- docs/design.md §3.1: the IPoIB header and the EtherTypes -----------------------------------------------

def test_ipv4_unicast_header_replaced_by_four_bytes():
    pkt = f.ipv4(A_IP4, B_IP4, f.IPPROTO_ICMP, f.icmp_echo(1, 1, b"hello"))
    r = eth_to_ipoib(f.eth(B_REMAC, A_MAC, f.ETH_P_IP, pkt), T)
    assert r.kind == Kind.PEER and r.peer.addr == B_ADDR and r.vif.addr == A_ADDR
    assert r.frame == b"\x08\x00\x00\x00" + pkt
    assert r.pkey == 0xFFFF and r.vid == 0 and r.dest_mac == B_REMAC


def test_tipc_passes_untranslated():
    r = eth_to_ipoib(f.eth(B_REMAC, A_MAC, f.ETH_P_TIPC, b"tipc-payload"), T)
    assert r.frame == b"\x88\xca\x00\x00tipc-payload"
    back = rx(r.frame, M)
    assert back.frame == f.eth(B_REMAC, A_MAC, f.ETH_P_TIPC, b"tipc-payload")


@pytest.mark.parametrize("etype", [0x88CC, 0x88F7, 0x0026, 0x9000, 0x8847])   # LLDP, PTP, 802.3 LLC, ...
def test_other_ethertypes_refused_with_their_own_reason(etype):
    frame = f.eth(B_REMAC, A_MAC, etype, b"\x00" * 46)
    assert drop_reason(eth_to_ipoib, frame, T) == DropReason.UNSUPPORTED_ETHERTYPE


def test_rx_refuses_unknown_ethertype_and_short_header():
    assert drop_reason(rx, b"\x88\xcc\x00\x00abc", T) == DropReason.BAD_IPOIB_HEADER
    assert drop_reason(rx, b"\x08\x00", T) == DropReason.BAD_IPOIB_HEADER


def test_reserved_bytes_are_zero_on_tx_and_ignored_on_rx():
    pkt = f.ipv4(B_IP4, A_IP4, 99, b"x")
    assert rx(b"\x08\x00\xab\xcd" + pkt, T).frame == f.eth(A_MAC, B_REMAC, f.ETH_P_IP, pkt)


# --- docs/design.md §3.3/3.4: destination classes -------------------------------------------------------------

def test_broadcast_goes_to_the_broadcast_group_of_the_vlans_partition():
    arp = f.arp(f.ARPOP_REQUEST, A_MAC, A_IP4, ZERO_MAC, B_IP4)
    r = eth_to_ipoib(f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_ARP, arp, vid=3), T)
    assert r.kind == Kind.GROUP and r.mgid == broadcast_mgid(0x8003) and r.pkey == 0x8003 and r.vid == 3


def test_ipv4_multicast_mgid_comes_from_the_ip_not_the_mac():
    pkt = f.ipv4(A_IP4, bytes([239, 255, 255, 250]), f.IPPROTO_UDP,
                 f.udp(A_IP4, bytes([239, 255, 255, 250]), 1900, 1900, b"M-SEARCH"))
    # 239.127.255.250 shares this MAC (01:00:5e:7f:ff:fa): only the IP tells them apart
    r = eth_to_ipoib(f.eth(bytes.fromhex("01005e7ffffa"), A_MAC, f.ETH_P_IP, pkt), T)
    assert r.kind == Kind.GROUP and r.mgid == ipv4_mgid("239.255.255.250")


def test_ipv6_multicast_mgid():
    dst = bytes.fromhex("ff0200000000000000000001ff123456")
    pkt = f.nd_ns(A_IP6, dst, bytes.fromhex("fe80000000000000000000000012" "3456"), slla=A_MAC)
    r = eth_to_ipoib(f.eth(bytes.fromhex("3333ff123456"), A_MAC, f.ETH_P_IPV6, pkt), T)
    assert r.kind == Kind.GROUP and r.mgid == ipv6_mgid("ff02::1:ff12:3456")


@pytest.mark.parametrize("dst,etype,pkt", [
    (bytes.fromhex("01005e000001"), f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, 99, b"")),     # mcast MAC, unicast IP
    (B_REMAC, f.ETH_P_IP, f.ipv4(A_IP4, bytes([224, 0, 0, 1]), 99, b"")),          # unicast MAC, mcast IP
    (bytes.fromhex("333300000001"), f.ETH_P_IP, f.ipv4(A_IP4, bytes([224, 0, 0, 1]), 99, b"")),
    (bytes.fromhex("0180c2000000"), f.ETH_P_IP, f.ipv4(A_IP4, bytes([224, 0, 0, 1]), 99, b"")),
    (bytes.fromhex("01005e000001"), f.ETH_P_ARP, f.arp(1, A_MAC, A_IP4, ZERO_MAC, B_IP4)),
])
def test_multicast_mac_and_ip_must_agree(dst, etype, pkt):
    assert drop_reason(eth_to_ipoib, f.eth(dst, A_MAC, etype, pkt), T) == DropReason.MCAST_MISMATCH


def test_unknown_unicast_destination_is_unresolved_but_translated():
    pkt = f.ipv4(A_IP4, B_IP4, 99, b"data")
    r = eth_to_ipoib(f.eth(bytes.fromhex("0e0000000001"), A_MAC, f.ETH_P_IP, pkt), T)
    assert r.kind == Kind.UNRESOLVED and r.peer is None and r.frame == f.ipoib(f.ETH_P_IP, pkt)
    assert r.dest_mac == bytes.fromhex("0e0000000001")


def test_source_must_be_a_local_vif():
    frame = f.eth(B_REMAC, B_REMAC, f.ETH_P_IP, f.ipv4(B_IP4, A_IP4, 99, b""))
    assert drop_reason(eth_to_ipoib, frame, T) == DropReason.SPOOFED_SOURCE


# --- docs/design.md §3.7: ARP ---------------------------------------------------------------------------------

def test_arp_request_layout_42_to_60_bytes():
    body = f.arp(f.ARPOP_REQUEST, A_MAC, A_IP4, ZERO_MAC, B_IP4)
    frame = f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_ARP, body)
    assert len(frame) == 42
    r = eth_to_ipoib(frame, T)
    ib = r.frame
    assert len(ib) == 4 + 56 == len(frame) + 18
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", ib, 4)
    assert (htype, ptype, hlen, plen, op) == (32, 0x0800, 20, 4, 1)
    assert ib[12:32] == A_ADDR.pack() and ib[32:36] == A_IP4
    assert ib[36:56] == b"\x00" * 20 and ib[56:60] == B_IP4


def test_arp_reply_from_fabric_shrinks_to_28_bytes_with_remac():
    ib = f.ipoib(f.ETH_P_ARP, f.arp(f.ARPOP_REPLY, B_ADDR.pack(), B_IP4, A_ADDR.pack(), A_IP4))
    out = rx(ib, T).frame
    assert len(out) == 42 and out == f.eth(A_MAC, B_REMAC, f.ETH_P_ARP,
                                           f.arp(f.ARPOP_REPLY, B_REMAC, B_IP4, A_MAC, A_IP4))


def test_rarp_is_translated_like_arp():
    body = f.arp(f.ARPOP_RREQUEST, A_MAC, A_IP4, A_MAC, b"\0" * 4)
    r = eth_to_ipoib(f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_RARP, body), T)
    assert r.frame[:2] == b"\x80\x35" and len(r.frame) == 60 and r.frame[36:56] == A_ADDR.pack()


def test_arp_with_unknown_hardware_address_dropped():
    body = f.arp(f.ARPOP_REPLY, A_MAC, A_IP4, bytes.fromhex("0e0000000001"), B_IP4)
    frame = f.eth(bytes.fromhex("0e0000000001"), A_MAC, f.ETH_P_ARP, body)
    assert drop_reason(eth_to_ipoib, frame, T) == DropReason.ARP_UNKNOWN_HWADDR
    stranger = f.ipoib(f.ETH_P_ARP, f.arp(2, b"\x00\x00\x00\x99" + bytes(16), B_IP4, A_ADDR.pack(), A_IP4))
    assert drop_reason(rx, stranger, T) == DropReason.ARP_UNKNOWN_HWADDR


@pytest.mark.parametrize("mutate", [
    lambda b: b[:0] + b"\x00\x06" + b[2:],        # htype 6
    lambda b: b[:2] + b"\x86\xdd" + b[4:],        # ptype IPv6
    lambda b: b[:4] + b"\x14" + b[5:],            # hlen 20 with an Ethernet-sized body
    lambda b: b[:5] + b"\x10" + b[6:],            # plen 16
])
def test_bogus_arp_dropped(mutate):
    body = mutate(f.arp(f.ARPOP_REQUEST, A_MAC, A_IP4, ZERO_MAC, B_IP4))
    assert drop_reason(eth_to_ipoib, f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_ARP, body), T) in (
        DropReason.BAD_ARP, DropReason.TRUNCATED)


# --- docs/design.md §3.8: ND link-layer options ---------------------------------------------------------------

def _icmpv6_ok(l3: bytes) -> bool:
    ip = f.parse_ipv6(l3)
    msg = l3[40:40 + ip.payload_length]
    return f.l4_checksum(ip.src, ip.dst, 58, msg[:2] + b"\0\0" + msg[4:]) == struct.unpack_from("!H", msg, 2)[0]


def test_ns_slla_option_grows_8_to_24_with_length_and_checksum_fixed():
    dst = bytes.fromhex("ff0200000000000000000001ff56789a")
    eth_frame = f.eth(bytes.fromhex("3333ff56789a"), A_MAC, f.ETH_P_IPV6, f.nd_ns(A_IP6, dst, B_IP6, slla=A_MAC))
    r = eth_to_ipoib(eth_frame, T)
    l3 = r.frame[4:]
    assert f.parse_ipv6(l3).payload_length == 24 + 24 and len(l3) == 40 + 48
    opt = l3[40 + 24:]
    assert opt == bytes([1, 3, 0, 0]) + A_ADDR.pack()
    assert _icmpv6_ok(l3)
    assert len(r.frame) == len(eth_frame) - 14 + 4 + 16


def test_na_tlla_from_fabric_shrinks_to_8_bytes():
    ib = f.ipoib(f.ETH_P_IPV6, f.nd_na(B_IP6, A_IP6, B_IP6, tlla=B_ADDR.pack()))
    out = rx(ib, T).frame
    l3 = out[14:]
    assert l3[40 + 24:] == bytes([2, 1]) + B_REMAC and _icmpv6_ok(l3)
    assert out == f.eth(A_MAC, B_REMAC, f.ETH_P_IPV6, f.nd_na(B_IP6, A_IP6, B_IP6, tlla=B_REMAC))


def test_nd_unknown_lla_and_bad_options_dropped():
    unknown = f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, f.nd_na(A_IP6, B_IP6, A_IP6, tlla=bytes.fromhex("0e0000000001")))
    assert drop_reason(eth_to_ipoib, unknown, T) == DropReason.ND_UNKNOWN_LLADDR
    ib_form_on_eth = f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, f.nd_na(A_IP6, B_IP6, A_IP6, tlla=A_ADDR.pack()))
    assert drop_reason(eth_to_ipoib, ib_form_on_eth, T) == DropReason.BAD_ND
    zero_len = f.nd_message(A_IP6, B_IP6, f.ND_NA, bytes(4) + A_IP6, b"\x02\x00" + bytes(6))
    assert drop_reason(eth_to_ipoib, f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, zero_len), T) == DropReason.BAD_ND


def test_nd_with_bad_checksum_dropped():
    pkt = bytearray(f.nd_ns(A_IP6, B_IP6, B_IP6, slla=A_MAC))
    pkt[42] ^= 0xFF
    assert drop_reason(eth_to_ipoib, f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, bytes(pkt)), T) == DropReason.BAD_ND


def test_mld_is_a_control_frame_even_behind_hop_by_hop():
    dst = bytes.fromhex("ff020000000000000000000000000016")
    mld = f.icmpv6(A_IP6, dst, 143, 0, bytes(4))
    hbh = bytes([f.IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0])          # router alert
    frame = f.eth(bytes.fromhex("333300000016"), A_MAC, f.ETH_P_IPV6,
                  f.ipv6(A_IP6, dst, f.IPPROTO_HOPOPTS, hbh + mld, hop_limit=1))
    r = eth_to_ipoib(frame, T)
    assert r.kind == Kind.CONTROL and r.mgid == ipv6_mgid(dst) and r.frame == f.ipoib(f.ETH_P_IPV6, frame[14:])
    assert eth_to_ipoib(frame, T, rewrite_control=False).frame == frame


def test_igmp_is_a_control_frame():
    grp = bytes([224, 0, 0, 22])
    frame = f.eth(bytes.fromhex("01005e000016"), A_MAC, f.ETH_P_IP,
                  f.ipv4(A_IP4, grp, f.IPPROTO_IGMP, bytes(8), ttl=1))
    r = eth_to_ipoib(frame, T)
    assert r.kind == Kind.CONTROL and r.mgid == ipv4_mgid(grp)


# --- docs/design.md §3.9: DHCP over InfiniBand (RFC 4390) ---------------------------------------------------

def _discover(chaddr=A_MAC, options=None, ciaddr=b"\0" * 4, dst_ip=b"\xff" * 4, dst_mac=BROADCAST_MAC,
              xid=0x12345678):
    opts = options if options is not None else [(f.DHCP_OPT_MSGTYPE, b"\x01"), (55, b"\x01\x03\x06")]
    d = f.dhcp(1, xid, chaddr, ciaddr=ciaddr, options=opts)
    src_ip = ciaddr
    pkt = f.ipv4(src_ip, dst_ip, f.IPPROTO_UDP, f.udp(src_ip, dst_ip, 68, 67, d.ljust(300, b"\0")))
    return f.eth(dst_mac, chaddr, f.ETH_P_IP, pkt)


def _offer(xid=0x12345678, options=((53, b"\x02"), (54, B_IP4))):
    """A broadcast OFFER from the fabric as dnsmasq sends it: hlen 0, empty chaddr, no client id."""
    offer = f.dhcp(2, xid, b"", htype=32, flags=f.DHCP_BROADCAST, yiaddr=A_IP4, siaddr=B_IP4,
                   options=list(options))
    return f.ipoib(f.ETH_P_IP, f.ipv4(B_IP4, b"\xff" * 4, 17, f.udp(B_IP4, b"\xff" * 4, 67, 68, offer)))


def _chaddr(eth: bytes) -> bytes:
    msg = f.parse_dhcp(eth[14 + 28:])
    assert (msg.htype, msg.hlen, msg.chaddr[6:]) == (1, 6, b"\0" * 10)
    return msg.chaddr[:6]


GUEST_MAC = bytes.fromhex("5254006791bd")


def _bridge_tables():
    """Host A with a guest behind its bridge: VIF 2 (its own QP) besides VIF 1, the one in the groups."""
    t = tables()
    t.vifs.append(Vif(2, GUEST_MAC, IPoIBAddr(0, 0x000049, A_ADDR.gid)))
    return t


def _udp_ok(l3: bytes) -> bool:
    ip = f.parse_ipv4(l3)
    seg = l3[ip.hlen:ip.total_length]
    return f.l4_checksum(ip.src, ip.dst, 17, seg[:6] + b"\0\0" + seg[8:]) == struct.unpack_from("!H", seg, 6)[0]


def test_dhcp_discover_rewritten_per_rfc4390():
    r = eth_to_ipoib(_discover(), T)
    assert r.kind == Kind.CONTROL and r.mgid == broadcast_mgid(0xFFFF)
    l3 = r.frame[4:]
    ip = f.parse_ipv4(l3)
    assert f.checksum(l3[:ip.hlen]) == 0 and _udp_ok(l3)
    msg = f.parse_dhcp(l3[ip.hlen + 8:])
    assert (msg.htype, msg.hlen, msg.chaddr) == (32, 0, b"\0" * 16)
    assert msg.flags & f.DHCP_BROADCAST
    assert msg.option(f.DHCP_OPT_CLIENT_ID) == client_id_for_mac(A_MAC)
    assert mac_from_client_id(msg.option(f.DHCP_OPT_CLIENT_ID)) == A_MAC
    assert msg.option(55) == b"\x01\x03\x06" and msg.xid == 0x12345678


def test_dhcp_keeps_a_client_id_the_client_sent_and_no_broadcast_when_renewing():
    cid = b"\x01" + A_MAC
    r = eth_to_ipoib(_discover(options=[(53, b"\x03"), (61, cid)], ciaddr=A_IP4, dst_ip=B_IP4,
                               dst_mac=B_REMAC), T)
    l3 = r.frame[4:]
    msg = f.parse_dhcp(l3[28:])
    assert msg.option(61) == cid and not msg.flags & f.DHCP_BROADCAST and r.peer is not None


def test_dhcp_offer_from_fabric_gets_the_clients_mac_back():
    offer = f.dhcp(2, 0x12345678, b"", htype=32, flags=f.DHCP_BROADCAST, yiaddr=A_IP4, siaddr=B_IP4,
                   options=[(53, b"\x02"), (61, client_id_for_mac(A_MAC)), (54, B_IP4)])
    ib = f.ipoib(f.ETH_P_IP, f.ipv4(B_IP4, b"\xff" * 4, 17, f.udp(B_IP4, b"\xff" * 4, 67, 68, offer)))
    res = rx(ib, T, multicast=True)
    assert res.control
    out = res.frame
    assert out[:12] == BROADCAST_MAC + B_REMAC
    msg = f.parse_dhcp(out[14 + 28:])
    assert (msg.htype, msg.hlen, msg.chaddr[:6]) == (1, 6, A_MAC) and msg.yiaddr == A_IP4
    assert _udp_ok(out[14:])


def test_a_broadcast_reply_without_client_id_reaches_the_guest_whose_xid_it_is():
    # dnsmasq does not echo the client identifier: only the xid names the client. Received on VIF 1's
    # QP (the one in the broadcast group), it must still carry the guest's MAC, which its client checks
    t = _bridge_tables()
    eth_to_ipoib(_discover(chaddr=GUEST_MAC, xid=0xA1), t)
    eth_to_ipoib(_discover(chaddr=A_MAC, xid=0xB2), t)
    assert t.dhcp_clients == {0xA1: GUEST_MAC, 0xB2: A_MAC}
    assert _chaddr(rx(_offer(0xA1), t, multicast=True).frame) == GUEST_MAC
    assert _chaddr(rx(_offer(0xB2), t, multicast=True).frame) == A_MAC
    # an xid nobody here sent: the receiving VIF's MAC, as before
    assert _chaddr(rx(_offer(0xC3), t, multicast=True).frame) == A_MAC


def test_the_xid_wins_over_an_echoed_client_id_and_a_hardware_client_id_is_read():
    t = _bridge_tables()
    eth_to_ipoib(_discover(chaddr=GUEST_MAC, xid=0xA1), t)
    echoed = ((53, b"\x02"), (61, client_id_for_mac(A_MAC)))
    assert _chaddr(rx(_offer(0xA1, echoed), t, multicast=True).frame) == GUEST_MAC
    # busybox udhcpc's own client identifier (type 1, the MAC), echoed for an xid not remembered
    assert mac_from_client_id(b"\x01" + GUEST_MAC) == GUEST_MAC
    assert mac_from_client_id(b"\x01" + GUEST_MAC[:5]) is None and mac_from_client_id(b"\x06" + GUEST_MAC) is None
    hw = ((53, b"\x02"), (61, b"\x01" + GUEST_MAC))
    assert _chaddr(rx(_offer(0xD4, hw), t, multicast=True).frame) == GUEST_MAC


def test_dhcp_transactions_remembered_are_bounded_and_only_when_rewritten():
    t = tables()
    eth_to_ipoib(_discover(xid=1), t, rewrite_control=False)        # BPF's view: nothing rewritten
    assert not t.dhcp_clients
    for xid in range(DHCP_CLIENTS_MAX + 5):
        t.remember_dhcp_client(xid, A_MAC)
    t.remember_dhcp_client(10, GUEST_MAC)                            # seen again: newest
    assert len(t.dhcp_clients) == DHCP_CLIENTS_MAX and 4 not in t.dhcp_clients and 5 in t.dhcp_clients
    assert next(reversed(t.dhcp_clients)) == 10 and t.dhcp_clients[10] == GUEST_MAC


def test_malformed_dhcp_is_bad_dhcp_for_the_agent_but_passes_bpf_as_control():
    d = f.dhcp(1, 1, A_MAC)[:100]
    frame = f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_IP,
                  f.ipv4(b"\0" * 4, b"\xff" * 4, 17, f.udp(b"\0" * 4, b"\xff" * 4, 68, 67, d)))
    assert drop_reason(eth_to_ipoib, frame, T) == DropReason.BAD_DHCP
    assert eth_to_ipoib(frame, T, rewrite_control=False).kind == Kind.CONTROL


# --- docs/design.md §3.14: edge rules -------------------------------------------------------------------------

@pytest.mark.parametrize("etype,body", [
    (f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, f.IPPROTO_ICMP, f.icmp_echo(1, 1))),
    (f.ETH_P_ARP, f.arp(f.ARPOP_REPLY, A_MAC, A_IP4, B_REMAC, B_IP4)),
    (f.ETH_P_IPV6, f.ipv6(A_IP6, B_IP6, 59, b"")),
])
def test_ethernet_padding_dropped_on_tx(etype, body):
    plain = f.eth(B_REMAC, A_MAC, etype, body)
    padded = pad(plain, 60)
    assert len(padded) == 60 > len(plain)
    assert eth_to_ipoib(padded, T).frame == eth_to_ipoib(plain, T).frame
    assert rx(eth_to_ipoib(padded, T).frame, M).frame == plain       # RX output is not padded


def test_priority_tag_is_the_untagged_partition():
    body = f.ipv4(A_IP4, B_IP4, 99, b"x")
    tagged = eth_to_ipoib(f.eth(B_REMAC, A_MAC, f.ETH_P_IP, body, vid=0, pcp=5), T)
    plain = eth_to_ipoib(f.eth(B_REMAC, A_MAC, f.ETH_P_IP, body), T)
    assert tagged.frame == plain.frame and tagged.pkey == plain.pkey == 0xFFFF and tagged.vid == 0


@pytest.mark.parametrize("outer", [f.ETH_P_8021Q, f.ETH_P_8021AD])
def test_stacked_vlan_dropped_and_unknown_vlan_dropped(outer):
    inner = struct.pack("!HHH", f.ETH_P_8021Q, 3, f.ETH_P_IP) + f.ipv4(A_IP4, B_IP4, 99, b"")
    frame = B_REMAC + A_MAC + struct.pack("!HH", outer, 3) + inner
    assert drop_reason(eth_to_ipoib, frame, T) == DropReason.STACKED_VLAN
    frame = f.eth(B_REMAC, A_MAC, f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, 99, b""), vid=42)
    assert drop_reason(eth_to_ipoib, frame, T) == DropReason.UNKNOWN_VLAN


def test_rx_pushes_the_partitions_vlan_tag():
    pkt = f.ipv4(B_IP4, A_IP4, 99, b"x")
    assert rx(f.ipoib(f.ETH_P_IP, pkt), T, pkey=0x8003).frame == f.eth(A_MAC, B_REMAC, f.ETH_P_IP, pkt, vid=3)
    assert drop_reason(rx, f.ipoib(f.ETH_P_IP, pkt), T, pkey=0x8005) == DropReason.NO_PARTITION


@pytest.mark.parametrize("frame,reason", [
    (f.eth(B_REMAC, A_MAC, f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, 99, b"abc"))[:-1], DropReason.BAD_LENGTH),
    (f.eth(B_REMAC, A_MAC, f.ETH_P_IP, b"\x45" + bytes(10)), DropReason.TRUNCATED),
    (f.eth(B_REMAC, A_MAC, f.ETH_P_IP, b"\x65" + bytes(30)), DropReason.BAD_IP_HEADER),
    (f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, f.ipv6(A_IP6, B_IP6, 59, b"abc"))[:-1], DropReason.BAD_LENGTH),
    (f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, b"\x45" + bytes(50)), DropReason.BAD_IP_HEADER),
    (B_REMAC + A_MAC + b"\x08", DropReason.TRUNCATED),
])
def test_bad_lengths_have_their_reasons(frame, reason):
    assert drop_reason(eth_to_ipoib, frame, T) == reason


# --- round trips (hypothesis) ------------------------------------------------------------------------

def _untag_priority(frame: bytes) -> bytes:
    h = f.parse_eth(frame)
    return frame[:12] + frame[16:] if h.vid == 0 else frame


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(eth_frames, st.booleans())
def test_ethernet_to_ipoib_and_back_is_identity(frame, padded):
    padded &= f.parse_eth(frame).ethertype != f.ETH_P_TIPC     # TIPC is opaque: its padding stays
    r = eth_to_ipoib(pad(frame) if padded else frame, T)
    assert r.kind in (Kind.PEER, Kind.GROUP)
    back = ipoib_to_eth(r.frame, M, src=M.peers[0], vif=M.vifs[0], pkey=r.pkey, multicast=r.kind == Kind.GROUP)
    assert not back.control
    assert back.frame == _untag_priority(frame)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(eth_frames)
def test_ipoib_to_ethernet_and_back_is_identity(frame):
    ib = eth_to_ipoib(frame, T)               # a valid IPoIB frame as it crosses the fabric
    e = ipoib_to_eth(ib.frame, M, src=M.peers[0], vif=M.vifs[0], pkey=ib.pkey, multicast=ib.kind == Kind.GROUP)
    again = eth_to_ipoib(e.frame, mirror(M))  # tx(rx(I, M), mirror(M)) == I
    assert again.frame == ib.frame and again.pkey == ib.pkey and again.mgid == ib.mgid


# --- malformed input: one exception type, never anything else ---------------------------------------

@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(eth_frames, st.data())
def test_truncated_frames_raise_frameerror_or_translate(frame, data):
    cut = data.draw(st.integers(0, len(frame)))
    try:
        eth_to_ipoib(frame[:cut], T)
    except FrameError as e:
        assert isinstance(e.reason, DropReason)


@settings(max_examples=500)
@given(st.binary(max_size=120), st.booleans())
def test_random_bytes_never_escape_as_other_exceptions(raw, multicast):
    for fn in (lambda: eth_to_ipoib(B_REMAC + A_MAC + raw, T),
               lambda: eth_to_ipoib(raw, T),
               lambda: rx(raw, T, multicast=multicast),
               lambda: rx(b"\x08\x06\x00\x00" + raw, T),
               lambda: rx(b"\x86\xdd\x00\x00" + raw, T)):
        try:
            fn()
        except FrameError:
            pass


@settings(max_examples=300)
@given(eth_frames, st.data())
def test_bit_flips_raise_frameerror_or_translate(frame, data):
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        r = eth_to_ipoib(bytes(buf), T)
        rx(r.frame, M, multicast=r.kind == Kind.GROUP)
    except FrameError:
        pass


# --- docs/design.md §3.6: oversize frames answered with ICMP ------------------------------------------------

def test_too_big_ipv4_is_frag_needed_with_the_mtu():
    from xdpoib.wire.oracle import too_big_reply

    big = f.eth(B_REMAC, A_MAC, f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, f.IPPROTO_UDP,
                                                    f.udp(A_IP4, B_IP4, 1, 2, bytes(3000))))
    r = too_big_reply(big, 1020, B_REMAC)
    assert r[:12] == A_MAC + B_REMAC
    ip = f.parse_ipv4(r[14:])
    assert (ip.src, ip.dst, ip.proto) == (B_IP4, A_IP4, f.IPPROTO_ICMP) and f.checksum(r[14:34]) == 0
    icmp = r[34:]
    assert icmp[0:2] == b"\x03\x04" and struct.unpack("!H", icmp[6:8])[0] == 1020 and f.checksum(icmp) == 0
    assert icmp[8:28] == big[14:34] and len(r) - 14 <= 576


def test_too_big_ipv6_is_packet_too_big():
    from xdpoib.wire.oracle import too_big_reply

    big = f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, f.ipv6(A_IP6, B_IP6, 59, bytes(3000)), vid=3)
    r = too_big_reply(big, 2044, B_REMAC)
    h = f.parse_eth(r)
    assert h.vid == 3 and h.dst == A_MAC
    l3 = r[h.hlen:]
    ip = f.parse_ipv6(l3)
    assert ip.src == B_IP6 and ip.dst == A_IP6 and l3[40] == 2 and struct.unpack("!I", l3[44:48])[0] == 2044
    assert _icmpv6_ok(l3) and len(l3) <= 1280


def test_no_icmp_error_about_icmp_errors_or_arp():
    from xdpoib.wire.oracle import too_big_reply

    err = f.eth(B_REMAC, A_MAC, f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, f.IPPROTO_ICMP, b"\x03\x04" + bytes(3000)))
    assert too_big_reply(err, 1000, B_REMAC) is None
    arp = f.eth(B_REMAC, A_MAC, f.ETH_P_ARP, f.arp(1, A_MAC, A_IP4, ZERO_MAC, B_IP4))
    assert too_big_reply(arp, 1000, B_REMAC) is None


# --- IGMP / MLD reports the agent snoops --------------------------------------------------------------

def _mldv2(records: bytes, n: int) -> bytes:
    dst = bytes.fromhex("ff020000000000000000000000000016")
    hbh = bytes([f.IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0])
    return f.ipv6(A_IP6, dst, f.IPPROTO_HOPOPTS, hbh + f.icmpv6(A_IP6, dst, 143, 0, struct.pack("!HH", 0, n) + records),
                  hop_limit=1)


def test_group_reports_igmp_and_mld():
    g1, g2 = bytes([239, 1, 2, 3]), bytes([224, 0, 0, 251])
    v2 = f.ipv4(A_IP4, g1, f.IPPROTO_IGMP, bytes([0x16, 0, 0, 0]) + g1, ttl=1)
    assert f.group_report(f.ETH_P_IP, v2) == ([g1], [])
    leave = f.ipv4(A_IP4, bytes([224, 0, 0, 2]), f.IPPROTO_IGMP, bytes([0x17, 0, 0, 0]) + g1, ttl=1)
    assert f.group_report(f.ETH_P_IP, leave) == ([], [g1])
    recs = bytes([4, 0, 0, 0]) + g2 + bytes([3, 0, 0, 0]) + g1 + bytes([1, 0, 0, 1]) + g1 + A_IP4
    v3 = f.ipv4(A_IP4, bytes([224, 0, 0, 22]), f.IPPROTO_IGMP, bytes([0x22, 0, 0, 0, 0, 0, 0, 3]) + recs, ttl=1)
    assert f.group_report(f.ETH_P_IP, v3) == ([g2, g1], [g1])
    snm = bytes.fromhex("ff0200000000000000000001ff123456")
    assert f.group_report(f.ETH_P_IPV6, _mldv2(bytes([4, 0, 0, 0]) + snm, 1)) == ([snm], [])
    assert f.group_report(f.ETH_P_IPV6, _mldv2(bytes([3, 0, 0, 0]) + snm, 1)) == ([], [snm])
    # not a report, or broken: nothing
    assert f.group_report(f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, 17, b"x" * 8)) == ([], [])
    assert f.group_report(f.ETH_P_IPV6, _mldv2(bytes([4, 0, 0, 0]) + snm[:8], 1)) == ([], [])
