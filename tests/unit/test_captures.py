"""The oracle on real IPoIB frames from Linux and Solaris hosts (captures read by tests/captures.py).

Every IPoIB frame of both captures goes through the RX translation with its sender learnt as the agent
would learn it; an Ethernet host behind eth4 must see ARP bodies of 28 bytes naming the REMAC of the
sender's (QPN, GID) whatever its flags byte, ND options of 8 bytes with a right checksum, IP payloads
unchanged and the right group MACs. In the other direction, the answers an Ethernet host gives (ARP
reply, NA, ICMPv6 echo reply) leave our TX path with exactly the bytes of the real answers, except the
flags byte of our own address (0: we are UD-only, so Linux peers talk UD to us), and every frame
translated back is the frame that came, into the group the real sender used.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess

import captures as cap
import pytest
from prereq import need_cmd

from xdpoib.reasons import Kind
from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, IPoIBAddr
from xdpoib.wire.oracle import Peer, Tables, Vif, eth_to_ipoib, ipoib_to_eth

#: The attachment receiving every frame: none of the capture's hosts.
US = Vif(1, bytes.fromhex("f45214ffff01"), IPoIBAddr(0, 0x4242, bytes.fromhex("fe80000000000000f4521403ffffff01")))


@pytest.fixture(scope="module")
def erf():
    return cap.read_erf(cap.need_vectors(cap.ERF_FILE)[0])


@pytest.fixture(scope="module")
def solaris():
    return cap.read_ipoib242(cap.need_vectors(cap.SOLARIS_FILE)[0])


def replay(frames):
    """Each frame with its sender learnt, the tables of that moment and the Ethernet frame eth4 gets."""
    learner = cap.Learner(cap.address_book(frames), US)
    out = []
    for fr in frames:
        src = learner.learn(fr)
        t = learner.tables()
        r = ipoib_to_eth(fr.ipoib, t, src=src, vif=US, pkey=0xFFFF, multicast=fr.multicast)
        out.append((fr, src, t, r.frame, learner.remacs))
    return out


# --- the reader --------------------------------------------------------------------------------------

def derived_listing() -> dict[tuple[str, int], dict]:
    """The hex listing kept beside the captures: per frame its header line and its bytes."""
    path = cap.need_vectors("DERIVED_ipoib_frames.txt")[0]
    out, source, cur = {}, None, None
    for line in path.read_text().splitlines():
        if line.startswith("# Source:"):
            source = "erf" if "infiniband" in line else "ipoib242"
        elif m := re.match(r"frame (\d+)\s+(.*)", line):
            cur = {"head": m.group(2), "bytes": b""}
            out[(source, int(m.group(1)))] = cur
        elif cur is not None and (m := re.match(r"\s+[0-9a-f]{4}: ((?:[0-9a-f]{2} ?)+)$", line)):
            cur["bytes"] += bytes.fromhex(m.group(1))
    return out


def test_reader_finds_the_listed_frames_with_their_bytes_and_ib_fields(erf, solaris):
    listing = derived_listing()
    assert {(fr.source, fr.number) for fr in erf + solaris} == set(listing)
    for fr in erf + solaris:
        want = listing[(fr.source, fr.number)]
        assert fr.ipoib == want["bytes"], fr
        head = want["head"]
        if fr.source == "ipoib242":
            assert f"addr_field(20..39)={fr.pseudo_addr.hex()}" in head
            continue
        assert f"SLID={fr.slid} DLID={fr.dlid}" in head and f"DQPN={fr.dqpn:#08x}" in head, fr
        assert head.startswith(fr.transport if fr.transport == "UD" else "RC(IPoIB-CM)")
        if fr.transport == "UD":
            assert f"SQPN={fr.sqpn:#08x}" in head and f"Q_Key={fr.qkey:#010x}" in head
        assert ("GRH SGID=" in head) == fr.has_grh


def test_reader_agrees_with_tshark_on_senders(erf):
    need_cmd("tshark")
    out = subprocess.run(["tshark", "-r", str(cap.need_vectors(cap.ERF_FILE)[0]), "-T", "fields",
                          "-e", "frame.number", "-e", "infiniband.lrh.slid", "-e", "infiniband.deth.srcqp",
                          "-e", "infiniband.grh.sgid"], capture_output=True, text=True, timeout=120, check=True)
    rows = {int(r[0]): r for r in (ln.split("\t") for ln in out.stdout.splitlines())}
    for fr in erf:
        _, slid, srcqp, sgid = rows[fr.number]
        assert int(slid) == fr.slid
        assert (int(srcqp, 16) if srcqp else None) == fr.sqpn
        assert (sgid or None) == (str(ipaddress.IPv6Address(fr.sgid)) if fr.sgid else None)


def test_what_the_captures_show():
    """The facts the design relies on, as these hosts put them on the wire."""
    erf = cap.read_erf(cap.need_vectors(cap.ERF_FILE)[0])
    solaris = cap.read_ipoib242(cap.need_vectors(cap.SOLARIS_FILE)[0])
    assert {fr.qkey for fr in erf if fr.transport == "UD"} == {0x0B1B}
    assert all(fr.has_grh == fr.multicast for fr in erf if fr.transport == "UD")     # unicast UD: no GRH
    arps = [fr for fr in erf + solaris if fr.ethertype == f.ETH_P_ARP]
    assert {cap.arp_sender(fr)[0].flags for fr in arps} == {0x80}
    assert {a.flags for fr in erf for a in cap.nd_addresses(fr)} == {0x80}
    linux_req = next(fr for fr in erf if fr.number == 5)
    assert linux_req.ipoib[4 + 32:4 + 52] == bytes(20)
    solaris_req = next(fr for fr in solaris if fr.number == 6)
    assert solaris_req.ipoib[4 + 32:4 + 52] == bytes.fromhex("00ffffffff10401b0000000000000000ffffffff")
    ns = next(fr for fr in erf if fr.number == 26)
    assert ns.ipoib[4 + 64:4 + 68] == b"\x01\x03\x00\x00"       # type, length 3, two zero bytes


# --- RX: what an Ethernet host behind eth4 sees ------------------------------------------------------

@pytest.mark.parametrize("which", ["erf", "solaris"])
def test_every_frame_translates(which, erf, solaris):
    frames = erf if which == "erf" else solaris
    done = replay(frames)
    assert len(done) == len(frames) > 10
    for fr, src, _t, eth, remacs in done:
        assert eth[6:12] == src.mac == remacs.assign(src.addr.gid, src.addr.qpn), fr
        assert eth[12:14] == fr.ipoib[:2], fr


def test_arp_bodies_shrink_to_28_bytes_naming_the_senders_remac(erf, solaris):
    seen = 0
    for fr, _src, t, eth, remacs in replay(erf) + replay(solaris):
        if fr.ethertype != f.ETH_P_ARP:
            continue
        seen += 1
        ib, a = fr.ipoib[4:], f.parse_arp(eth[14:])
        sha, tha = IPoIBAddr.unpack(ib[8:28]), IPoIBAddr.unpack(ib[32:52])
        assert len(ib) == 56 and len(eth) == 14 + 28 and (a.htype, len(a.sha)) == (1, 6), fr
        assert a.sha == remacs.assign(sha.gid, sha.qpn) == eth[6:12], fr
        assert a.spa == ib[28:32] and a.tpa == ib[52:56] and a.op == int.from_bytes(ib[6:8], "big")
        if tha.qpn == cap.MCAST_QPN or tha.pack() == bytes(20):
            assert a.tha == bytes(6), fr                    # Linux's zeros and Solaris' template alike
        else:
            assert a.tha == t.mac_by_addr(tha), fr
    assert seen == 6


@pytest.mark.parametrize("flags", [0x00, 0x40, 0x80, 0xFF])
def test_arp_sender_flags_byte_does_not_change_the_ethernet_frame(flags, erf, solaris):
    for fr, src, t, eth, _ in replay(erf) + replay(solaris):
        if fr.ethertype != f.ETH_P_ARP:
            continue
        mutated = bytearray(fr.ipoib)
        mutated[4 + 8] = flags                              # sender hardware address, flags byte
        if mutated[4 + 32 + 1:4 + 32 + 4] != b"\xff\xff\xff" and any(mutated[4 + 32:4 + 52]):
            mutated[4 + 32] = flags                         # and a real target's
        r = ipoib_to_eth(bytes(mutated), t, src=src, vif=US, pkey=0xFFFF, multicast=fr.multicast)
        assert r.frame == eth, fr


def test_nd_options_shrink_to_8_bytes_with_a_right_checksum(erf):
    seen = 0
    for fr, _src, t, eth, _ in replay(erf):
        addrs = cap.nd_addresses(fr)
        if not addrs:
            continue
        seen += 1
        ib_l3, l3 = fr.ipoib[4:], eth[14:]
        assert len(l3) == len(ib_l3) - 16 * len(addrs), fr
        assert int.from_bytes(l3[4:6], "big") == int.from_bytes(ib_l3[4:6], "big") - 16 * len(addrs)
        assert l3[:4] == ib_l3[:4] and l3[6:42] == ib_l3[6:42]             # IPv6 header, ICMPv6 type
        assert l3[44:64] == ib_l3[44:64]                                    # fixed part, target
        assert int.from_bytes(l3[42:44], "big") == cap.icmpv6_checksum(l3), fr
        assert int.from_bytes(ib_l3[42:44], "big") == cap.icmpv6_checksum(ib_l3)  # the checker agrees
        opt = l3[64:72]
        assert opt[0] == ib_l3[64] and opt[1] == 1 and opt[2:] == t.mac_by_addr(addrs[0]), fr
    assert seen == 2                                                        # the NS and the NA


def test_ip_payloads_are_unchanged(erf, solaris):
    seen = 0
    for fr, _src, _t, eth, _ in replay(erf) + replay(solaris):
        if fr.ethertype == f.ETH_P_ARP or cap.nd_addresses(fr):
            continue
        seen += 1
        assert eth[14:] == fr.ipoib[4:], fr
    assert seen == 39


def test_destination_macs(erf, solaris):
    want = {3: BROADCAST_MAC, 4: BROADCAST_MAC, 24: BROADCAST_MAC, 25: BROADCAST_MAC,   # UDP to 10.0.0.255
            5: BROADCAST_MAC,                                                          # ARP request
            26: bytes.fromhex("3333ff001895")}                                         # NS, solicited-node
    for fr, _src, _t, eth, _ in replay(erf) + replay(solaris):
        expected = want.get(fr.number, US.mac) if fr.source == "erf" else US.mac
        assert eth[:6] == expected, fr


# --- TX: our answers have the layout of the real ones -------------------------------------------------

@pytest.fixture(scope="module")
def replies(erf, solaris):
    return cap.reply_cases(erf, solaris)


def test_answers_leave_with_the_real_answers_layout(replies):
    assert [c.name for c in replies] == ["Linux ARP reply", "Linux NA", "Linux ICMPv6 echo reply",
                                         "Solaris ARP reply"]
    for c in replies:
        r = eth_to_ipoib(c.answer, c.tables)
        assert r.kind == Kind.PEER, c.name
        assert r.frame == c.expected, f"{c.name}:\n ours {r.frame.hex()}\n real {c.real.ipoib.hex()}"
        assert len(r.frame) == len(c.real.ipoib)
        if c.real.dqpn is not None and c.real.transport == "UD":    # the real one went to the requester's QP
            assert r.peer.addr.qpn == c.real.dqpn, c.name


def test_answers_differ_from_the_real_ones_only_in_our_flags_byte(replies):
    for c in replies:
        ours, real = eth_to_ipoib(c.answer, c.tables).frame, c.real.ipoib
        diff = [i for i in range(len(real)) if ours[i] != real[i]]
        flag_at = [i for i in diff if real[i] == 0x80 and ours[i] == 0]
        assert len(flag_at) == (0 if "echo" in c.name else 1), c.name
        if real[:2] == b"\x86\xdd":                         # and the ICMPv6 checksum, which covers it
            assert set(diff) - set(flag_at) <= {4 + 42, 4 + 43}, c.name
        else:
            assert diff == flag_at, c.name


def _mirror(t: Tables) -> Tables:
    """The link from the capture hosts' side: they are the VIFs, our attachment their peer."""
    return Tables(vifs=[Vif(p.peer_id + 1, p.mac, p.addr) for p in t.peers],
                  peers=[Peer(v.vif_id, v.mac, v.addr) for v in t.vifs], vlan_pkeys=dict(t.vlan_pkeys))


def test_every_frame_translated_back_is_the_frame_that_came(erf, solaris):
    """TX of what RX produced gives the real frame again (Solaris' template target becomes Linux's
    zeros), and multicast frames go to the group the real sender used."""
    for fr, _src, t, eth, _ in replay(erf) + replay(solaris):
        r = eth_to_ipoib(eth, _mirror(t))
        want = fr.ipoib
        if fr.ethertype == f.ETH_P_ARP and want[4 + 33:4 + 36] == b"\xff\xff\xff":
            want = want[:4 + 32] + bytes(20) + want[4 + 52:]
        assert r.frame == want, fr
        if fr.multicast:
            assert r.kind == Kind.GROUP and r.mgid == fr.dgid, fr
        else:
            assert r.kind == Kind.PEER and r.peer.addr.key == US.addr.key, fr


def test_solaris_broadcast_template_target_is_the_zero_mac():
    """Without the files too: Solaris' request target (00:ff:ff:ff + MGID, scope and P_Key zeroed)."""
    gid = bytes.fromhex("fe800000000000000010e000014ad211")
    asker = Peer(2, bytes.fromhex("0e0000000002"), IPoIBAddr(0x80, 0x4F, gid))
    template = bytes.fromhex("00ffffffff10401b0000000000000000ffffffff")
    t = Tables(vifs=[US], peers=[asker])
    ib = f.ipoib(f.ETH_P_ARP, f.arp(1, asker.addr.pack(), bytes([192, 168, 56, 10]), template,
                                    bytes([192, 168, 56, 24])))
    eth = ipoib_to_eth(ib, t, src=asker, vif=US, pkey=0xFFFF, multicast=False).frame
    assert f.parse_arp(eth[14:]).tha == bytes(6) and f.parse_arp(eth[14:]).sha == asker.mac
