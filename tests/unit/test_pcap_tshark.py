"""docs/design.md §3.13: our LINKTYPE_IPOIB captures decode in tshark, in both pseudo-header forms, and what the
oracle puts on the wire is what Wireshark's dissectors expect (ARP over IB, ND options, DHCP)."""

import struct
import subprocess

import pytest
from prereq import need_cmd
from wirekit import A_ADDR, A_IP4, A_IP6, A_MAC, B_ADDR, B_IP4, B_IP6, B_REMAC, tables

from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, ZERO_MAC
from xdpoib.wire.mgid import broadcast_addr
from xdpoib.wire.oracle import eth_to_ipoib
from xdpoib.wire.pcap import LINKTYPE_IPOIB, PcapWriter, dest_pseudo_header, grh_pseudo_header


def test_pcap_global_header_and_record_layout(tmp_path):
    p = tmp_path / "x.pcap"
    with open(p, "wb") as out:
        PcapWriter(out).write_sent(broadcast_addr(), b"\x08\x06\x00\x00", ts=1.5)
    raw = p.read_bytes()
    magic, major, minor, _, _, snap, linktype = struct.unpack_from("<IHHiIII", raw)
    assert (magic, major, minor, snap) == (0xA1B2C3D4, 2, 4, 65535)
    assert linktype == LINKTYPE_IPOIB == 242
    sec, usec, incl, orig = struct.unpack_from("<IIII", raw, 24)
    assert (sec, usec, incl, orig) == (1, 500000, 44, 44)
    assert raw[40:60] == bytes(20) and raw[60:80] == broadcast_addr().pack()


def test_pseudo_headers():
    assert dest_pseudo_header(B_ADDR)[:2] == b"\0\0"
    g = grh_pseudo_header(A_ADDR.gid, B_ADDR.gid, 0x48, tclass=3, flow=5)
    assert g[0] >> 4 == 6 and g[5:8] == b"\x00\x00\x48" and g[8:24] == A_ADDR.gid and g[24:40] == B_ADDR.gid


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    need_cmd("tshark")
    t = tables()
    path = tmp_path_factory.mktemp("pcap") / "ipoib.pcap"
    frames = {
        "arp": f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_ARP, f.arp(f.ARPOP_REQUEST, A_MAC, A_IP4, ZERO_MAC, B_IP4)),
        "icmp": f.eth(B_REMAC, A_MAC, f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, f.IPPROTO_ICMP, f.icmp_echo(7, 1, b"ping"))),
        "ns": f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, f.nd_ns(A_IP6, B_IP6, B_IP6, slla=A_MAC)),
        "na": f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, f.nd_na(A_IP6, B_IP6, A_IP6, tlla=A_MAC)),
        "dhcp": f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_IP, f.ipv4(
            b"\0" * 4, b"\xff" * 4, f.IPPROTO_UDP, f.udp(b"\0" * 4, b"\xff" * 4, 68, 67, f.dhcp(
                1, 0xCAFE, A_MAC, options=[(f.DHCP_OPT_MSGTYPE, b"\x01")])))),
    }
    with open(path, "wb") as out:
        w = PcapWriter(out)
        for i, (_name, frame) in enumerate(frames.items()):
            r = eth_to_ipoib(frame, t)
            if i % 2:   # alternate the two pseudo-header forms
                w.write_received(A_ADDR.gid, B_ADDR.gid, A_ADDR.qpn, r.frame)
            else:
                w.write_sent(r.peer.addr if r.peer else broadcast_addr(), r.frame)
    out = subprocess.run(["tshark", "-r", str(path), "-V"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # split the verbose output per frame
    chunks = out.stdout.split("\nFrame ")
    assert len(chunks) == len(frames), out.stdout[:2000]
    return dict(zip(frames, chunks, strict=True))


def test_tshark_arp_over_infiniband(decoded):
    d = decoded["arp"]
    assert "Hardware type: InfiniBand (32)" in d
    assert "Hardware size: 20" in d
    assert f"Sender hardware address: {A_ADDR.pack().hex()}" in d
    assert "Destination QPN: 0xffffff" in d and "ff12:401b:ffff::ffff:ffff" in d


def test_tshark_ipv4_icmp_with_grh_form(decoded):
    d = decoded["icmp"]
    assert "Source QPN: 0x000048" in d and "Source GID: fe80::f452:1403:8d:5211" in d
    assert "Echo (ping) request" in d
    assert "[correct]" in d and "Checksum Status: Good" in d          # ICMP checksum verified


@pytest.mark.parametrize("name,option", [("ns", "Source link-layer address"), ("na", "Target link-layer address")])
def test_tshark_nd_option_and_checksum(decoded, name, option):
    d = decoded[name]
    assert f"ICMPv6 Option ({option})" in d
    assert "Length: 3 (24 bytes)" in d
    assert "Link-layer address: 0000" + A_ADDR.pack().hex() in d
    assert "[correct]" in d and "Checksum Status: Good" in d


def test_tshark_dhcp_over_infiniband(decoded):
    d = decoded["dhcp"]
    assert "Hardware type: Infiniband" in d or "Hardware type: InfiniBand" in d
    assert "Hardware address length: 0" in d
    assert "Bootp flags: 0x8000, Broadcast flag (Broadcast)" in d
    assert "Option: (61) Client identifier" in d
