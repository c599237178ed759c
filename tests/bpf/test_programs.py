"""Table-driven cases for the TX and RX programs: description, map state, input, expected verdict,
output and metadata. Expected frames are built with the frame builders (not the oracle), so these
cases check the oracle's rules independently; on a mismatch both frames are printed as hex."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import gen
import pytest
from dpcheck import hexdump, summary

from xdpoib import abi
from xdpoib.abi import Direction, XdpAction
from xdpoib.datapath import testrun
from xdpoib.reasons import DropReason, Kind
from xdpoib.wire import frames as f
from xdpoib.wire import oracle
from xdpoib.wire.mgid import broadcast_mgid, ipv4_mgid, ipv6_mgid

VIF, VIF2 = gen.VIFS
PEER, PEER1 = gen.PEERS[0], gen.PEERS[1]
IP_A, IP_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
LL_A = bytes.fromhex("fe800000000000000000000000000001")
LL_B = bytes.fromhex("fe800000000000000000000000000002")
SOL_B = bytes.fromhex("ff0200000000000000000001ff000002")
UDP_AB = f.ipv4(IP_A, IP_B, 17, f.udp(IP_A, IP_B, 1000, 2000, b"hello"))
DHCP_DISCOVER = f.ipv4(b"\0" * 4, b"\xff" * 4, 17,
                       f.udp(b"\0" * 4, b"\xff" * 4, 68, 67, f.dhcp(1, 7, VIF.mac, options=[(53, b"\x01")])))
DHCP_OFFER = f.ipv4(IP_B, b"\xff" * 4, 17, f.udp(IP_B, b"\xff" * 4, 67, 68, f.dhcp(2, 7, b"", htype=32)))


def ipoib(etype: int, payload: bytes) -> bytes:
    return struct.pack("!HH", etype, 0) + payload


def mac_dest(mac: bytes) -> bytes:
    return mac + bytes(10)


@dataclass
class TxCase:
    """One TX case: a frame in, a verdict, and for handed-on frames the output and metadata."""

    desc: str
    frame: bytes
    verdict: XdpAction
    reason: DropReason | None = None
    out: bytes = b""
    kind: Kind | None = None
    pkey: int = 0xFFFF
    vid: int = 0
    dest: bytes = b""
    dest_id: int = 0
    vlans: dict[int, int] = field(default_factory=lambda: dict(gen.VLAN_PKEYS))
    learn: bool = False             # VIF learning on (xdpoib_config.flags)
    vif_id: int = VIF.vif_id


def tx_cases() -> list[TxCase]:
    bcast = broadcast_mgid(0xFFFF)
    arp_req = f.arp(1, VIF.mac, IP_A, b"\0" * 6, IP_B)
    ns = f.nd_ns(LL_A, SOL_B, LL_B, slla=VIF.mac)
    ns_ib = f.nd_ns(LL_A, SOL_B, LL_B, slla=VIF.addr.pack())
    bad_ns = bytearray(ns)
    bad_ns[42] ^= 0x01
    na_peer = f.nd_na(LL_A, LL_B, LL_A, tlla=PEER.mac)
    mcast4 = f.ipv4(IP_A, bytes([224, 0, 0, 251]), 17, f.udp(IP_A, bytes([224, 0, 0, 251]), 5353, 5353, b"q"))
    g6 = bytes.fromhex("ff020000000000000000000112345678")
    mcast6 = f.ipv6(LL_A, g6, 17, f.udp(LL_A, g6, 1, 2, b"x"))
    mld = f.icmpv6(LL_A, g6, 143, 0, bytes(4))
    hbh_mld = f.ipv6(LL_A, g6, 0, bytes([58, 0, 5, 2, 0, 0, 1, 0]) + mld, hop_limit=1)
    igmp = f.ipv4(IP_A, bytes([224, 0, 0, 22]), 2, bytes(8))
    return [
        TxCase("IPv4 unicast to a known peer", f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB), XdpAction.REDIRECT,
               out=ipoib(0x0800, UDP_AB), kind=Kind.PEER, dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("Ethernet padding after the IPv4 total length is cut",
               f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB + bytes(20)), XdpAction.REDIRECT,
               out=ipoib(0x0800, UDP_AB), kind=Kind.PEER, dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("unknown unicast MAC: unresolved, still translated",
               f.eth(gen.UNKNOWN_MAC, VIF.mac, 0x0800, UDP_AB), XdpAction.REDIRECT,
               out=ipoib(0x0800, UDP_AB), kind=Kind.UNRESOLVED, dest=mac_dest(gen.UNKNOWN_MAC)),
        TxCase("broadcast ARP request: 28 -> 56 byte body, broadcast group",
               f.eth(gen.BCAST, VIF.mac, 0x0806, arp_req), XdpAction.REDIRECT,
               out=ipoib(0x0806, f.arp(1, VIF.addr.pack(), IP_A, bytes(20), IP_B)), kind=Kind.GROUP,
               dest=bcast, dest_id=100),
        TxCase("RARP is translated like ARP", f.eth(gen.BCAST, VIF.mac, 0x8035, f.arp(3, VIF.mac, IP_A, VIF.mac, IP_A)),
               XdpAction.REDIRECT, out=ipoib(0x8035, f.arp(3, VIF.addr.pack(), IP_A, VIF.addr.pack(), IP_A)),
               kind=Kind.GROUP, dest=bcast, dest_id=100),
        TxCase("ARP naming a peer's REMAC carries the peer's address",
               f.eth(PEER.mac, VIF.mac, 0x0806, f.arp(2, VIF.mac, IP_A, PEER.mac, IP_B)), XdpAction.REDIRECT,
               out=ipoib(0x0806, f.arp(2, VIF.addr.pack(), IP_A, PEER.addr.pack(), IP_B)), kind=Kind.PEER,
               dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("ARP with an unknown sender MAC", f.eth(gen.BCAST, VIF.mac, 0x0806,
               f.arp(1, VIF.mac, IP_A, gen.UNKNOWN_MAC, IP_B)), XdpAction.DROP, DropReason.ARP_UNKNOWN_HWADDR),
        TxCase("IPv4 multicast: MGID from the IP destination", f.eth(b"\x01\x00\x5e\x00\x00\xfb", VIF.mac, 0x0800,
               mcast4), XdpAction.REDIRECT, out=ipoib(0x0800, mcast4), kind=Kind.GROUP,
               dest=ipv4_mgid(bytes([224, 0, 0, 251])), dest_id=101),
        TxCase("IPv6 multicast, group not in the map: dest_id 0", f.eth(b"\x33\x33\x12\x34\x56\x78", VIF.mac,
               0x86DD, mcast6), XdpAction.REDIRECT, out=ipoib(0x86DD, mcast6), kind=Kind.GROUP,
               dest=ipv6_mgid(g6)),
        TxCase("multicast MAC with a unicast IP", f.eth(b"\x01\x00\x5e\x00\x00\x02", VIF.mac, 0x0800, UDP_AB),
               XdpAction.DROP, DropReason.MCAST_MISMATCH),
        TxCase("unicast MAC with a multicast IP", f.eth(PEER.mac, VIF.mac, 0x0800, mcast4),
               XdpAction.DROP, DropReason.MCAST_MISMATCH),
        TxCase("802.1Q VID 10 -> P_Key 0x8001", f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB, vid=10),
               XdpAction.REDIRECT, out=ipoib(0x0800, UDP_AB), kind=Kind.PEER, pkey=0x8001, vid=10,
               dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("VID 20 -> P_Key 0x0002 with the full-member bit forced",
               f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB, vid=20), XdpAction.REDIRECT, out=ipoib(0x0800, UDP_AB),
               kind=Kind.PEER, pkey=0x8002, vid=20, dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("priority tag (VID 0) is the untagged partition",
               f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB, vid=0, pcp=5), XdpAction.REDIRECT,
               out=ipoib(0x0800, UDP_AB), kind=Kind.PEER, dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("unknown VID", f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB, vid=99), XdpAction.DROP,
               DropReason.UNKNOWN_VLAN),
        TxCase("untagged frame when VID 0 has no partition", f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB),
               XdpAction.DROP, DropReason.UNKNOWN_VLAN, vlans={10: 0x8001}),
        TxCase("stacked VLAN tags", f.eth(PEER.mac, VIF.mac, 0x8100, struct.pack("!H", 10) + b"\x08\x00" + UDP_AB,
               vid=10), XdpAction.DROP, DropReason.STACKED_VLAN),
        TxCase("source MAC is not a VIF", f.eth(PEER.mac, gen.UNKNOWN_MAC, 0x0800, UDP_AB), XdpAction.DROP,
               DropReason.SPOOFED_SOURCE),
        TxCase("learning: an unknown source MAC goes to the agent untouched, VIF unknown",
               f.eth(PEER.mac, gen.UNKNOWN_MAC, 0x0800, UDP_AB), XdpAction.REDIRECT,
               out=f.eth(PEER.mac, gen.UNKNOWN_MAC, 0x0800, UDP_AB), kind=Kind.CONTROL, dest=mac_dest(PEER.mac),
               learn=True, vif_id=abi.VIF_UNKNOWN),
        TxCase("learning: a multicast source MAC is still spoofed",
               f.eth(PEER.mac, b"\x03" + gen.UNKNOWN_MAC[1:], 0x0800, UDP_AB), XdpAction.DROP,
               DropReason.SPOOFED_SOURCE, learn=True),
        TxCase("LLDP", f.eth(b"\x01\x80\xc2\x00\x00\x0e", VIF.mac, 0x88CC, bytes(40)), XdpAction.DROP,
               DropReason.UNSUPPORTED_ETHERTYPE),
        TxCase("TIPC passes untranslated", f.eth(PEER.mac, VIF.mac, 0x88CA, bytes(range(40))), XdpAction.REDIRECT,
               out=ipoib(0x88CA, bytes(range(40))), kind=Kind.PEER, dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("IPv4 shorter than its header", f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB[:19]), XdpAction.DROP,
               DropReason.TRUNCATED),
        TxCase("IPv4 total length beyond the frame", f.eth(PEER.mac, VIF.mac, 0x0800, UDP_AB[:-1]), XdpAction.DROP,
               DropReason.BAD_LENGTH),
        TxCase("IPv4 version 5", f.eth(PEER.mac, VIF.mac, 0x0800, b"\x55" + UDP_AB[1:]), XdpAction.DROP,
               DropReason.BAD_IP_HEADER),
        TxCase("DHCP discover: control, untouched", f.eth(gen.BCAST, VIF.mac, 0x0800, DHCP_DISCOVER),
               XdpAction.REDIRECT, out=f.eth(gen.BCAST, VIF.mac, 0x0800, DHCP_DISCOVER), kind=Kind.CONTROL,
               dest=bcast, dest_id=100),
        TxCase("IGMP: control", f.eth(b"\x01\x00\x5e\x00\x00\x16", VIF.mac, 0x0800, igmp), XdpAction.REDIRECT,
               out=f.eth(b"\x01\x00\x5e\x00\x00\x16", VIF.mac, 0x0800, igmp), kind=Kind.CONTROL,
               dest=ipv4_mgid(bytes([224, 0, 0, 22]))),
        TxCase("MLD behind hop-by-hop: control", f.eth(b"\x33\x33\x12\x34\x56\x78", VIF.mac, 0x86DD, hbh_mld),
               XdpAction.REDIRECT, out=f.eth(b"\x33\x33\x12\x34\x56\x78", VIF.mac, 0x86DD, hbh_mld),
               kind=Kind.CONTROL, dest=ipv6_mgid(g6)),
        TxCase("NS with a source link-layer option: 8 -> 24 bytes, length and checksum fixed",
               f.eth(b"\x33\x33\xff\x00\x00\x02", VIF.mac, 0x86DD, ns), XdpAction.REDIRECT, out=ipoib(0x86DD, ns_ib),
               kind=Kind.GROUP, dest=ipv6_mgid(SOL_B)),
        TxCase("NA naming a peer's REMAC", f.eth(PEER.mac, VIF.mac, 0x86DD, na_peer), XdpAction.REDIRECT,
               out=ipoib(0x86DD, f.nd_na(LL_A, LL_B, LL_A, tlla=PEER.addr.pack())), kind=Kind.PEER,
               dest=mac_dest(PEER.mac), dest_id=PEER.peer_id),
        TxCase("NS with a wrong ICMPv6 checksum", f.eth(b"\x33\x33\xff\x00\x00\x02", VIF.mac, 0x86DD, bytes(bad_ns)),
               XdpAction.DROP, DropReason.BAD_ND),
        TxCase("NS naming an unknown MAC", f.eth(b"\x33\x33\xff\x00\x00\x02", VIF.mac, 0x86DD,
               f.nd_ns(LL_A, SOL_B, LL_B, slla=gen.UNKNOWN_MAC)), XdpAction.DROP, DropReason.ND_UNKNOWN_LLADDR),
    ]


@dataclass
class RxCase:
    """One RX case: metadata and an IPoIB frame in, a verdict, the Ethernet frame out."""

    desc: str
    frame: bytes
    meta: bytes
    verdict: XdpAction
    reason: DropReason | None = None
    out: bytes = b""


def rx_cases() -> list[RxCase]:
    uni = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)
    mc = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF, multicast=True)
    mcast4 = f.ipv4(IP_B, bytes([224, 0, 0, 251]), 17, f.udp(IP_B, bytes([224, 0, 0, 251]), 5353, 5353, b"q"))
    g6 = bytes.fromhex("ff020000000000000000000112345678")
    mcast6 = f.ipv6(LL_B, g6, 17, f.udp(LL_B, g6, 1, 2, b"x"))
    arp_ib = f.arp(2, PEER.addr.pack(), IP_B, VIF.addr.pack(), IP_A)
    arp_flags = f.arp(2, b"\x80" + PEER.addr.pack()[1:], IP_B, bytes(20), IP_A)
    na_ib = f.nd_na(LL_B, LL_A, LL_B, tlla=PEER.addr.pack())
    eth_frame = f.eth(VIF.mac, PEER.mac, 0x0800, UDP_AB)
    return [
        RxCase("IPv4 unicast: REMAC source, VIF destination", ipoib(0x0800, UDP_AB), uni, XdpAction.REDIRECT,
               out=f.eth(VIF.mac, PEER.mac, 0x0800, UDP_AB)),
        RxCase("trailing bytes after the IPv4 total length are cut", ipoib(0x0800, UDP_AB + bytes(7)), uni,
               XdpAction.REDIRECT, out=f.eth(VIF.mac, PEER.mac, 0x0800, UDP_AB)),
        RxCase("reserved IPoIB bytes are ignored", b"\x08\x00\xab\xcd" + UDP_AB, uni, XdpAction.REDIRECT,
               out=f.eth(VIF.mac, PEER.mac, 0x0800, UDP_AB)),
        RxCase("P_Key 0x8001 pushes VLAN 10 (the smallest VID of that partition)", ipoib(0x0800, UDP_AB),
               abi.rx_meta(PEER.peer_id, VIF2.vif_id, 0x0001), XdpAction.REDIRECT,
               out=f.eth(VIF2.mac, PEER.mac, 0x0800, UDP_AB, vid=10)),
        RxCase("P_Key without a VLAN", ipoib(0x0800, UDP_AB), abi.rx_meta(PEER.peer_id, VIF.vif_id, 0x8005),
               XdpAction.DROP, DropReason.NO_PARTITION),
        RxCase("IPv4 multicast: 01:00:5e MAC from the IP destination", ipoib(0x0800, mcast4), mc,
               XdpAction.REDIRECT, out=f.eth(b"\x01\x00\x5e\x00\x00\xfb", PEER.mac, 0x0800, mcast4)),
        RxCase("IPv6 multicast: 33:33 MAC", ipoib(0x86DD, mcast6), mc, XdpAction.REDIRECT,
               out=f.eth(b"\x33\x33\x12\x34\x56\x78", PEER.mac, 0x86DD, mcast6)),
        RxCase("multicast with a unicast IP destination: broadcast MAC", ipoib(0x0800, UDP_AB), mc,
               XdpAction.REDIRECT, out=f.eth(gen.BCAST, PEER.mac, 0x0800, UDP_AB)),
        RxCase("ARP reply: 56 -> 28 byte body", ipoib(0x0806, arp_ib), uni, XdpAction.REDIRECT,
               out=f.eth(VIF.mac, PEER.mac, 0x0806, f.arp(2, PEER.mac, IP_B, VIF.mac, IP_A))),
        RxCase("ARP: flags ignored, all-zero address -> zero MAC", ipoib(0x0806, arp_flags), uni, XdpAction.REDIRECT,
               out=f.eth(VIF.mac, PEER.mac, 0x0806, f.arp(2, PEER.mac, IP_B, bytes(6), IP_A))),
        RxCase("ARP from an unknown address", ipoib(0x0806, f.arp(2, b"\0\0\0\x01" + bytes(range(16)), IP_B,
               bytes(20), IP_A)), uni, XdpAction.DROP, DropReason.ARP_UNKNOWN_HWADDR),
        RxCase("Ethernet-form ARP on the fabric", ipoib(0x0806, f.arp(2, PEER.mac, IP_B, VIF.mac, IP_A)), uni,
               XdpAction.DROP, DropReason.BAD_ARP),
        RxCase("NA: 24 -> 8 byte option, checksum fixed", ipoib(0x86DD, na_ib), uni, XdpAction.REDIRECT,
               out=f.eth(VIF.mac, PEER.mac, 0x86DD, f.nd_na(LL_B, LL_A, LL_B, tlla=PEER.mac))),
        RxCase("DHCP offer: control, passed untouched", ipoib(0x0800, DHCP_OFFER), mc, XdpAction.PASS,
               out=ipoib(0x0800, DHCP_OFFER)),
        RxCase("agent-built Ethernet frame passes through", eth_frame,
               abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF, ethernet=True), XdpAction.REDIRECT, out=eth_frame),
        RxCase("EtherType IPoIB does not carry", ipoib(0x88CC, bytes(20)), uni, XdpAction.DROP,
               DropReason.BAD_IPOIB_HEADER),
        RxCase("unknown sender", ipoib(0x0800, UDP_AB), abi.rx_meta(999, VIF.vif_id, 0xFFFF), XdpAction.DROP,
               DropReason.UNKNOWN_PEER),
        RxCase("unknown VIF", ipoib(0x0800, UDP_AB), abi.rx_meta(PEER.peer_id, 77, 0xFFFF), XdpAction.DROP,
               DropReason.UNKNOWN_VIF),
        RxCase("metadata of another version", ipoib(0x0800, UDP_AB), b"\x02" + uni[1:], XdpAction.DROP,
               DropReason.BAD_METADATA),
        RxCase("no metadata", ipoib(0x0800, UDP_AB), b"", XdpAction.DROP, DropReason.BAD_METADATA),
    ]


def _explain(desc: str, frame: bytes, want: bytes, got: bytes, ipoib_in: bool) -> str:
    return (f"{desc}\ninput  {summary(frame, ipoib_in)}\n{hexdump(frame)}\n"
            f"want   {summary(want, not ipoib_in)}\n{hexdump(want)}\n"
            f"got    {summary(got, not ipoib_in)}\n{hexdump(got)}")


@pytest.mark.parametrize("case", tx_cases(), ids=lambda c: c.desc)
def test_tx(datapath, maps, case: TxCase):
    maps.load(gen.tables())
    maps.clear_partitions()
    maps.set_partitions(case.vlans)
    maps.set_config(flags=abi.CFG_LEARN_VIFS if case.learn else 0)
    for mgid, gid in gen.GROUPS.items():
        maps.set_group(mgid, gid)
    res = testrun.run(datapath.fd("xdpoib_tx"), case.frame)
    st = maps.counters(Direction.TX)
    assert (st.packets, sum(st.verdicts)) == (1, 1)
    assert XdpAction(res.retval) == case.verdict, _explain(case.desc, case.frame, case.out, res.frame, False)
    if case.verdict == XdpAction.DROP:
        assert st.drops[case.reason] == 1 and sum(st.drops) == 1, [i for i, n in enumerate(st.drops) if n]
        return
    assert res.frame == case.out, _explain(case.desc, case.frame, case.out, res.frame, False)
    assert len(res.meta) == 32
    m = abi.TxMeta.from_bytes(res.meta)
    got = (m.version, Kind(m.kind), m.pkey, m.vid, m.reserved, m.vif_id, m.dest_id, bytes(m.dest))
    assert got == (abi.META_VERSION, case.kind, case.pkey, case.vid, 0, case.vif_id, case.dest_id, case.dest)
    if case.learn:                  # and the oracle agrees
        t = gen.tables()
        t.learn_vifs = True
        r = oracle.eth_to_ipoib(case.frame, t, rewrite_control=False)
        assert (r.kind, r.vif, r.frame) == (case.kind, None, case.out)
    assert st.kinds[case.kind] == 1


@pytest.mark.parametrize("case", rx_cases(), ids=lambda c: c.desc)
def test_rx(datapath, maps, case: RxCase):
    maps.load(gen.tables())
    res = testrun.run(datapath.fd("xdpoib_rx"), case.frame, case.meta)
    st = maps.counters(Direction.RX)
    assert (st.packets, sum(st.verdicts)) == (1, 1)
    assert XdpAction(res.retval) == case.verdict, _explain(case.desc, case.frame, case.out, res.frame, True)
    if case.verdict == XdpAction.DROP:
        assert st.drops[case.reason] == 1 and sum(st.drops) == 1, [i for i, n in enumerate(st.drops) if n]
        return
    assert res.frame == case.out, _explain(case.desc, case.frame, case.out, res.frame, True)
    assert res.meta == case.meta, "RX leaves the agent's metadata as it was"


def test_nd_checksums_of_translated_frames_verify(datapath, maps):
    """Independent of expected bytes: the ICMPv6 checksum BPF writes verifies over the new message."""
    maps.load(gen.tables())
    ra = f.nd_ra(LL_A, bytes.fromhex("ff020000000000000000000000000001"), slla=VIF2.mac, prefix=bytes(16), mtu=1500)
    res = testrun.run(datapath.fd("xdpoib_tx"), f.eth(b"\x33\x33\x00\x00\x00\x01", VIF2.mac, 0x86DD, ra))
    assert res.retval == XdpAction.REDIRECT
    ip = res.frame[4:]
    msg = ip[40:]
    assert len(msg) == struct.unpack_from("!H", ip, 4)[0] == len(ra) - 40 + 16
    assert f.l4_checksum(ip[8:24], ip[24:40], 58, msg[:2] + b"\0\0" + msg[4:]) == struct.unpack_from("!H", msg, 2)[0]
