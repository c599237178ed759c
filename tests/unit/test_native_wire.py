"""The native peer's own encoder and decoder (xdpoib/native/wire.py) against real hosts: every IPoIB frame
of the Linux and Solaris captures decodes with right checksums, and what the encoder builds from the
same fields is byte for byte what Linux put on the wire (ARP, NS, NA, ICMPv6 echo, the MGIDs it sent
to, its link-local address); plus the RFC rules it is written from, on hand-made input."""

from __future__ import annotations

import ipaddress

import captures as cap
import pytest

from xdpoib.native import wire as w


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


LINUX_A = w.IbAddr(0x80, 0x405, ip6("fe80::2:c902:24:f636"))      # LID 4 in the ERF capture
LINUX_B = w.IbAddr(0x80, 0x404, ip6("fe80::2:c902:20:b4dd"))      # LID 1
LINUX_C = w.IbAddr(0x80, 0x048, ip6("fe80::2:c903:0:1895"))       # LID 2


@pytest.fixture(scope="module")
def erf():
    return {fr.number: fr for fr in cap.read_erf(cap.need_vectors(cap.ERF_FILE)[0])}


@pytest.fixture(scope="module")
def solaris():
    return {fr.number: fr for fr in cap.read_ipoib242(cap.need_vectors(cap.SOLARIS_FILE)[0])}


def test_every_real_frame_decodes(erf, solaris):
    kinds = set()
    for fr in [*erf.values(), *solaris.values()]:
        ethertype, body = w.decap(fr.ipoib)
        if ethertype == w.ETHERTYPE_ARP:
            a = w.Arp.unpack(body)
            kinds.add("arp")
            assert w.IbAddr.unpack(a.sha).flags == w.FLAG_CONNECTED
        elif ethertype == w.ETHERTYPE_IPV4:
            ip = w.ipv4_unpack(body)                   # header checksum checked
            if ip.proto == w.PROTO_ICMP:
                w.icmp_unpack(ip.payload)
            elif ip.proto == w.PROTO_UDP:
                w.udp_unpack(ip.src, ip.dst, ip.payload)
            kinds.add(ip.proto)
        else:
            ip = w.ipv6_unpack(body)
            kind, _, rest = w.icmpv6_unpack(ip.src, ip.dst, ip.payload)
            if kind in (w.ND_NEIGHBOR_SOLICIT, w.ND_NEIGHBOR_ADVERT):
                nd = w.nd_unpack(kind, rest)
                assert nd.other_lengths == () and len(nd.lladdr) == 1
            kinds.add(kind)
    assert kinds >= {"arp", w.PROTO_ICMP, w.PROTO_UDP, 6, 135, 136, 128, 129}


def test_arp_request_and_reply_are_linuxs_bytes(erf):
    req = w.Arp(w.ARP_REQUEST, LINUX_A.pack(), ip4("10.0.1.34"), bytes(20), ip4("10.0.0.58"))
    assert w.encap(w.ETHERTYPE_ARP, req.pack()) == erf[5].ipoib
    rep = w.Arp(w.ARP_REPLY, LINUX_B.pack(), ip4("10.0.0.58"), LINUX_A.pack(), ip4("10.0.1.34"))
    assert w.encap(w.ETHERTYPE_ARP, rep.pack()) == erf[6].ipoib


def test_ns_na_and_echo_are_linuxs_bytes(erf):
    a_ll, c_ll = w.link_local(0x0002C9020024F636), w.link_local(0x0002C90300001895)
    assert a_ll == ip6("fe80::202:c902:24:f636") and c_ll == ip6("fe80::202:c903:0:1895")
    group = w.solicited_node(c_ll)
    assert w.encap(w.ETHERTYPE_IPV6, w.nd_pack_ns(a_ll, group, c_ll, LINUX_A)) == erf[26].ipoib
    assert w.mgid_ipv6(group) == erf[26].dgid
    assert w.encap(w.ETHERTYPE_IPV6, w.nd_pack_na(c_ll, a_ll, c_ll, LINUX_C, solicited=True)) == erf[30].ipoib
    req = w.ipv6_unpack(w.decap(erf[36].ipoib)[1])
    _, _, body = w.icmpv6_unpack(req.src, req.dst, req.payload)
    echo = w.ipv6_pack(c_ll, a_ll, w.PROTO_ICMPV6, w.icmpv6_pack(c_ll, a_ll, w.ICMPV6_ECHO_REPLY, 0, body))
    assert w.encap(w.ETHERTYPE_IPV6, echo) == erf[39].ipoib


def test_broadcast_mgid_is_where_linux_sent_its_broadcasts(erf):
    assert w.mgid_ipv4(w.IPV4_BROADCAST) == erf[3].dgid == erf[5].dgid


def test_solaris_echo_request_decodes(solaris):
    ip = w.ipv4_unpack(w.decap(solaris[1].ipoib)[1])
    kind, code, rest = w.icmp_unpack(ip.payload)
    assert (kind, code, ip.src, ip.dst) == (8, 0, ip4("192.168.56.10"), ip4("192.168.56.24"))
    assert w.icmp_echo_pack(8, int.from_bytes(rest[:2], "big"), int.from_bytes(rest[2:4], "big"),
                            rest[4:]) == ip.payload


# --- the RFC rules on hand-made input ---------------------------------------------------------------

def test_mgids_of_rfc_4391_section_4():
    assert w.mgid_ipv4(ip4("224.0.0.251")) == ip6("ff12:401b:ffff::fb")
    assert w.mgid_ipv4(ip4("239.255.255.250")) == ip6("ff12:401b:ffff::fff:fffa")
    assert w.mgid_ipv6(ip6("ff02::1:ff12:3456")) == ip6("ff12:601b:ffff:0:0:1:ff12:3456")
    assert w.mgid_ipv4(w.IPV4_BROADCAST, pkey=0x0003) == ip6("ff12:401b:8003::ffff:ffff")


def test_checksums_and_their_checks():
    src, dst = ip4("10.0.0.1"), ip4("10.0.0.2")
    pkt = w.ipv4_pack(src, dst, w.PROTO_UDP, w.udp_pack(src, dst, 1000, 7, b"hello"))
    ip = w.ipv4_unpack(pkt)
    assert w.udp_unpack(ip.src, ip.dst, ip.payload) == (1000, 7, b"hello")
    bad = bytearray(pkt)
    bad[-1] ^= 1
    with pytest.raises(w.WireError, match="UDP checksum"):
        w.udp_unpack(src, dst, bytes(bad[20:]))
    bad = bytearray(pkt)
    bad[8] ^= 1
    with pytest.raises(w.WireError, match="header checksum"):
        w.ipv4_unpack(bytes(bad))


def test_nd_option_is_type_length_3_two_zeros_and_the_address():
    opt = w.nd_option(w.ND_OPT_SOURCE_LLADDR, LINUX_A)
    assert opt == bytes([1, 3, 0, 0]) + LINUX_A.pack() and len(opt) == 24
    # an Ethernet-form option (length 1) is not an IPoIB address: reported, not learnt
    nd = w.nd_unpack(w.ND_NEIGHBOR_SOLICIT, bytes(4) + bytes(16) + bytes([1, 1]) + bytes(6))
    assert nd.lladdr == {} and nd.other_lengths == (1,)


def test_dhcp_message_follows_rfc_4390():
    cid = w.client_id(0xF452140300000101)
    assert cid == bytes.fromhex("ff" "00000001" "0003" "0020" "f452140300000101")
    msg = w.Dhcp(w.DHCP_BOOTREQUEST, 0x1234, flags=w.DHCP_FLAG_BROADCAST,
                 options=[(w.OPT_MESSAGE_TYPE, bytes([w.DHCPDISCOVER])), (w.OPT_CLIENT_ID, cid)])
    raw = msg.pack()
    assert raw[1] == 32 and raw[2] == 0 and raw[28:44] == bytes(16) and raw[10:12] == b"\x80\x00"
    back = w.Dhcp.unpack(raw)
    assert back.message_type == w.DHCPDISCOVER and back.option(w.OPT_CLIENT_ID) == cid
    assert len(raw) >= 300


def test_the_native_peer_shares_no_code_with_the_translator():
    """Importing every module of the native peer (and the fabric it stands on) loads none of xdpoib's
    translation: not the oracle, not the frame builders, not the datapath and its maps."""
    import subprocess
    import sys

    code = ("import sys, xdpoib.native.peer, xdpoib.native.client, xdpoib.native.__main__, xdpoib.fabric.simud, "
            "xdpoib.fabric.sa; print(' '.join(sorted(m for m in sys.modules if m.startswith('xdpoib.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "xdpoib.native.wire" in loaded
    assert not [m for m in loaded if m.startswith(("xdpoib.wire", "xdpoib.datapath", "xdpoib.abi", "xdpoib.pump",
                                                   "xdpoib.peers", "xdpoib.agent"))], loaded
