"""Hostile input to a running agent (docs/design.md §1: bounded work; xdpoib/agent/aging.py).

h1 and h2 are attached with the real CLI over a sim fabric with a real OpenSM; h2 pings h1 every 0.1 s
throughout. Then h1 gets, from the fabric (raw datagrams written onto the sim wire, `tests/simraw.py`):
the wrong Q_Key and P_Key, truncated IPoIB headers, its own multicast looped back, ARPs whose sender
address is not the datagram's source (by QPN, by GRH, from a known LID, from a LID nobody has, from
another real port), ND options naming foreign addresses, a flood of new senders with GRHs and one of
unknown senders without; and from eth4 (raw frames in its namespace): spoofed source MACs, an unknown
VLAN, oversize frames, broken ARP, ND and DHCP, floods to unknown unicast and multicast destinations.

Each is dropped and counted by reason in `status -j` (and so in the exporter), nothing learns what it
must not, the agent neither crashes nor stalls, the SA sees a bounded number of queries (counted in
`status -j` sa.queries), and h2's pings keep being answered.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest
from labkit import attached
from labkit import xdpoib as x
from prereq import need_cmd
from simraw import RawSender, Target, fake_gid, ipv4_to_nowhere

from xdpoib import state
from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr, gid_str, parse_gid

SIM_HOSTS = 3
SA_RATE, SA_BURST = 20, 20
BOUNDS = {"XDPOIB_MAX_PEERS": "300", "XDPOIB_SA_RATE": str(SA_RATE), "XDPOIB_SA_BURST": str(SA_BURST),
          "XDPOIB_GROUP_IDLE_S": "3"}
H1_IP, H2_IP = "10.70.0.1", "10.70.0.2"


SEND = r"""
import errno, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth4", 0))
for line in open(sys.argv[1]):
    frame = bytes.fromhex(line.strip())
    for _ in range(1000):       # ENOBUFS: the veth's ring towards XDP is full for a moment; send it again
        try:
            s.send(frame)
            break
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            time.sleep(0.001)
"""


class Lab:
    def __init__(self, fab, ns1, ns2):
        self.fab, self.ns1, self.ns2 = fab, ns1, ns2
        self.raw = RawSender(fab.name)

    def status(self, ns=None) -> dict:
        return json.loads(x("status", "eth4", "--netns", ns or self.ns1, "-j").stdout)

    def peers(self) -> list[dict]:
        return json.loads(x("peers", "eth4", "--netns", self.ns1, "-j").stdout)

    def eth4_send(self, frames: list[bytes]) -> None:
        """Raw Ethernet frames out of h1's eth4 (as the host behind it would send them)."""
        with tempfile.NamedTemporaryFile("w", suffix=".hex", delete=False) as t:
            t.write("\n".join(fr.hex() for fr in frames) + "\n")
        try:
            r = subprocess.run(["ip", "netns", "exec", self.ns1, sys.executable, "-c", SEND, t.name],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        finally:
            os.unlink(t.name)


@pytest.fixture(scope="module")
def lab(sim_fabric):
    need_cmd("ip", "ping")
    with attached(sim_fabric, ["h1", "h2"], net="10.70.0", prefix="xh", env=dict(os.environ, **BOUNDS)) as names:
        lab = Lab(sim_fabric, *names)
        yield lab
        lab.raw.close()


@pytest.fixture(scope="module")
def legit(lab):
    """h2 pings h1 every 0.1 s while the module runs; yields a function returning (sent, answered)."""
    ok = subprocess.run(["ip", "netns", "exec", lab.ns2, "ping", "-c", "3", "-i", "0.2", "-W", "2", H1_IP],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    p = subprocess.Popen(["ip", "netns", "exec", lab.ns2, "ping", "-i", "0.1", "-W", "1", H1_IP],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid = lab.status()["attachment"]["pid"]
    box = {}

    def result():
        if "r" not in box:
            p.send_signal(2)
            out, _ = p.communicate(timeout=30)
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            box["r"] = (int(m.group(1)), int(m.group(2)))
        return box["r"]
    yield result, pid
    if p.poll() is None:
        p.kill()
        p.wait()


def drops(st: dict) -> dict:
    """Every drop counter of a status answer, by reason: agent, fabric, and the BPF programs' (tx/rx)."""
    out = dict(st["drops"])
    for k, v in st["fabric_drops"].items():
        out[f"fabric:{k}"] = v
    for d in ("tx", "rx"):
        for k, v in st["datapath"].get(d, {}).get("drops", {}).items():
            out[f"{d}:{k}"] = v
    return out


def grew(before: dict, after: dict) -> dict:
    b, a = drops(before), drops(after)
    return {k: a[k] - b.get(k, 0) for k in a if a[k] != b.get(k, 0)}


def sa_queries(st: dict) -> int:
    """SA queries sent (answered or not), every type but the membership checks' Gets."""
    return sum(n for k, n in st["sa"]["queries"].items() if " " in k and not k.startswith("member"))


def until(pred, timeout=10.0, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


# ================================================================ from the fabric

def test_wrong_keys_truncated_headers_and_looped_back_multicast(lab, legit, figures):
    before = lab.status()
    t = Target.of(before)
    src = fake_gid(0x100)
    lab.raw.send(t, [ipv4_to_nowhere(1)] * 40, qkey=0x1234, sgid=src)
    lab.raw.send(t, [ipv4_to_nowhere(2)] * 30, pkey=0x7FF0, sgid=src)
    short = [b"", b"\x08", b"\x08\x00", b"\x08\x00\x00", b"\x08\x00\x00\x00" + bytes(9)]
    lab.raw.send(t, short, sgid=src, src_qpn=0x4100)
    lab.raw.send(t, [b"\x12\x34\x00\x00" + bytes(40)], sgid=src, src_qpn=0x4100)          # unknown EtherType
    lab.raw.send(t, [b"\x08\x00\x00\x00\x45\x00\x00\x54" + bytes(8)], sgid=src, src_qpn=0x4100)   # cut IPv4
    lab.raw.send(t, [ipv4_to_nowhere(3)] * 20, multicast=True, sgid=t.gid, src_qpn=t.qpn, slid=t.lid)
    time.sleep(1.0)
    d = grew(before, lab.status())
    figures(f"\nwrong keys, truncated headers, loopback: {d}")
    assert d.get("fabric:qkey_mismatch") == 40 and d.get("fabric:pkey_mismatch") == 30
    assert d.get("runt", 0) == len(short)
    assert d.get("rx:bad_ipoib_header", 0) >= 1 and d.get("rx:truncated", 0) + d.get("rx:bad_length", 0) >= 1
    assert d.get("loopback", 0) >= 20            # (and whatever the agent itself sent meanwhile)


def arp_frame(sha: IPoIBAddr, spa: str, tpa: str = H1_IP, op: int = 1) -> bytes:
    ip = [bytes(int(b) for b in a.split(".")) for a in (spa, tpa)]
    return f.ipoib(0x0806, f.arp(op, sha.pack(), ip[0], bytes(20), ip[1]))


def test_arp_whose_sender_is_not_the_source_is_dropped_not_learnt(lab, legit, figures):
    fab = lab.fab
    before = lab.status()
    t = Target.of(before)
    h2 = lab.status(lab.ns2)
    h2_gid, h2_qpn, h2_lid = parse_gid(h2["port"]["gid"]), h2["qpn"], h2["port"]["lid"]
    assert any(p["gid"] == h2["port"]["gid"] and p["lid"] == h2_lid for p in lab.peers()), "h1 does not know h2"
    h3_gid, h3_lid = fab.host("h3").gid, fab.lid("h3")
    f1, f2, f4, f5 = fake_gid(0x201), fake_gid(0x202), fake_gid(0x204), fake_gid(0x205)
    claims = {
        "GRH source, another GID": (IPoIBAddr(0, 0x5001, h2_gid), dict(sgid=f1, src_qpn=0x5001)),
        "another QPN": (IPoIBAddr(0, 0x5003, f2), dict(sgid=f2, src_qpn=0x5002)),
        "known LID, another GID": (IPoIBAddr(0, h2_qpn, h3_gid), dict(slid=h2_lid, src_qpn=h2_qpn)),
    }
    for n, (sha, kw) in enumerate(claims.values()):
        lab.raw.send(t, [arp_frame(sha, f"10.70.0.{91 + n}")], **kw)
    # first contacts without GRH: taken at their word, then checked with the SA and forgotten
    late = {"a LID nobody has": (IPoIBAddr(0, 0x5004, f4), dict(slid=0x3A3, src_qpn=0x5004)),
            "another port's LID": (IPoIBAddr(0, 0x5005, f5), dict(slid=h3_lid, src_qpn=0x5005))}
    for n, (sha, kw) in enumerate(late.values()):
        lab.raw.send(t, [arp_frame(sha, f"10.70.0.{95 + n}", op=2)], **kw)
    assert until(lambda: grew(before, lab.status()).get("arp_spoofed", 0) >= 5, 10), grew(before, lab.status())
    d = grew(before, lab.status())
    listed = {(p["qpn"], p["gid"]) for p in lab.peers()}
    figures(f"\nspoofed ARPs: {d}")
    for what, (sha, _) in {**claims, **late}.items():
        assert (sha.qpn, gid_str(sha.gid)) not in listed, f"learnt the address of an ARP with {what}"
    neigh = subprocess.run(["ip", "-n", lab.ns1, "neigh"], capture_output=True, text=True).stdout
    for n in range(len(claims)):
        assert f"10.70.0.{91 + n} " not in neigh, f"eth4 learnt a spoofed ARP: {neigh}"
    assert d.get("rx:arp_unknown_hwaddr", 0) >= len(claims)    # what the datapath saw of them: refused


def nd_frame(tlla: IPoIBAddr) -> bytes:
    src = bytes.fromhex("fe800000000000000000000000000099")
    dst = bytes.fromhex("ff020000000000000000000000000001")
    return f.ipoib(0x86DD, f.nd_na(src, dst, src, tlla.pack(), solicited=False))


def test_nd_options_with_foreign_addresses_teach_nothing(lab, legit, figures):
    before = lab.status()
    t = Target.of(before)
    foreign = IPoIBAddr(0, 0x5007, fake_gid(0x207))
    lab.raw.send(t, [nd_frame(foreign)] * 3, sgid=fake_gid(0x206), src_qpn=0x5006)
    time.sleep(1.0)
    after = lab.status()
    d = grew(before, after)
    figures(f"\nND with a foreign address: {d}, counters {after['counters'].get('nd_lladdr_not_learnt')}")
    assert (foreign.qpn, gid_str(foreign.gid)) not in {(p["qpn"], p["gid"]) for p in lab.peers()}
    assert d.get("rx:nd_unknown_lladdr", 0) == 3


def test_floods_of_new_senders_stay_bounded(lab, legit, figures):
    before = lab.status()
    t = Target.of(before)
    t0 = time.monotonic()
    for n in range(1500):                               # new senders with GRHs: learned, capped
        lab.raw.send(t, [ipv4_to_nowhere(n)], sgid=fake_gid(0x10000 + n), src_qpn=0x6000 + n, slid=0x1000 + n)
        if n % 100 == 99:
            time.sleep(0.02)
    for n in range(600):                                # without GRHs, from LIDs nobody has: who-is each
        lab.raw.send(t, [ipv4_to_nowhere(n)], slid=0x2000 + n, src_qpn=0x7000 + n)
        if n % 100 == 99:
            time.sleep(0.02)
    time.sleep(2.0)
    after = lab.status()
    took = time.monotonic() - t0
    d = grew(before, after)
    queries = sa_queries(after) - sa_queries(before)
    limited = after["counters"].get("sa_rate_limited", 0) - before["counters"].get("sa_rate_limited", 0)
    evicted = after["counters"].get("peers_evicted", 0) - before["counters"].get("peers_evicted", 0)
    figures(f"\nflood of 1500 new senders + 600 unknown ones in {took:.1f} s: {after['peers']} peers (cap 300), "
            f"{evicted} evicted, {queries} SA queries ({limited} held back by the gate), drops {d}")
    assert after["peers"] <= 300 and evicted >= 1200
    assert d.get("unknown_peer", 0) >= 600
    assert queries <= SA_BURST + SA_RATE * took + 5, queries
    assert limited > 0


# ================================================================ from eth4

def test_hostile_frames_from_eth4_are_counted_and_bounded(lab, legit, figures):
    before = lab.status()
    ns1 = lab.ns1
    mac = bytes.fromhex(before["eth"]["mac"].replace(":", ""))
    h2_remac = next(bytes.fromhex(p["remac"].replace(":", "")) for p in lab.peers()
                    if p["gid"] == lab.status(lab.ns2)["port"]["gid"])
    ip = [bytes(int(b) for b in a.split(".")) for a in (H1_IP, H2_IP)]
    udp = f.ipv4(ip[0], ip[1], 17, f.udp(ip[0], ip[1], 9, 9, b"x" * 20))
    frames = []
    frames += [f.eth(h2_remac, bytes.fromhex("026666666666"), 0x0800, udp)] * 30          # spoofed source
    frames += [f.eth(h2_remac, mac, 0x0800, udp, vid=77)] * 20                            # unknown VLAN
    bad_arp = bytearray(f.arp(1, mac, ip[0], bytes(6), ip[1]))
    bad_arp[4] = 7                                                                        # hlen 7
    frames += [f.eth(b"\xff" * 6, mac, 0x0806, bytes(bad_arp))] * 5
    frames += [f.eth(b"\xff" * 6, mac, 0x0806, f.arp(1, mac, ip[0], bytes(6), ip[1])[:20])] * 5    # cut
    ll = bytes.fromhex("fe800000000000000000000000000001")
    ns = bytearray(f.nd_ns(ll, bytes.fromhex("ff0200000000000000000001ff000002"), ll, mac))
    ns[40 + 24 + 1] = 0                                                                   # option length 0
    frames += [f.eth(bytes.fromhex("3333ff000002"), mac, 0x86DD, bytes(ns))] * 5
    bootp = f.udp(bytes(4), b"\xff" * 4, 68, 67, b"\x01\x01\x06\x00" + bytes(20))          # a cut DHCP
    frames += [f.eth(b"\xff" * 6, mac, 0x0800, f.ipv4(bytes(4), b"\xff" * 4, 17, bootp))] * 5
    dh = bytearray(f.dhcp(1, 0x1234, mac, options=[(53, b"\x01")]))
    dh[-3] = 200                                                                          # option runs past the end
    bootp2 = f.udp(bytes(4), b"\xff" * 4, 68, 67, bytes(dh))
    frames += [f.eth(b"\xff" * 6, mac, 0x0800, f.ipv4(bytes(4), b"\xff" * 4, 17, bootp2))] * 5
    frames += [f.eth(b"\x0a\xaa" + os.urandom(4), mac, 0x0800, udp) for _ in range(2000)]     # unknown unicast
    groups = [bytes([239, 77, n >> 8, n & 0xFF]) for n in range(400)]                     # unknown groups
    frames += [f.eth(bytes([1, 0, 0x5E, g[1] & 0x7F, g[2], g[3]]), mac, 0x0800,
                     f.ipv4(ip[0], g, 17, f.udp(ip[0], g, 9, 9, b"m"))) for g in groups]
    rnd = __import__("random").Random(13)                                                # broken IGMP, MLD, DHCP
    igmp_dst, mld_dst = bytes([224, 0, 0, 22]), bytes.fromhex("ff020000000000000000000000000016")
    for _ in range(100):
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 40)))
        frames.append(f.eth(bytes.fromhex("01005e000016"), mac, 0x0800, f.ipv4(ip[0], igmp_dst, 2, body)))
        hbh = bytes([58, 0, 5, 2, 0, 0, 1, 0]) + bytes([rnd.choice((130, 131, 132, 143))]) + body
        frames.append(f.eth(bytes.fromhex("333300000016"), mac, 0x86DD, f.ipv6(ll, mld_dst, 0, hbh, hop_limit=1)))
        junk = f.udp(bytes(4), b"\xff" * 4, 68, 67, f.dhcp(1, 7, mac, options=[(53, b"\x01")])[:rnd.randrange(0, 300)])
        frames.append(f.eth(b"\xff" * 6, mac, 0x0800, f.ipv4(bytes(4), b"\xff" * 4, 17, junk)))
    t0 = time.monotonic()
    lab.eth4_send(frames)
    # oversize: eth4's MTU raised by hand past the fabric's
    subprocess.run(["ip", "-n", ns1, "link", "set", "eth4", "mtu", "3000"], check=True)
    try:
        big = f.ipv4(ip[0], ip[1], 17, f.udp(ip[0], ip[1], 9, 9, b"b" * 2600))
        lab.eth4_send([f.eth(h2_remac, mac, 0x0800, big)] * 3)
    finally:
        subprocess.run(["ip", "-n", ns1, "link", "set", "eth4", "mtu", "2044"], check=True)
    time.sleep(2.5)
    after = lab.status()
    took = time.monotonic() - t0
    d = grew(before, after)
    queries = sa_queries(after) - sa_queries(before)
    figures(f"\nfrom eth4 ({len(frames) + 3} frames in {took:.1f} s): drops {d}; {queries} SA queries; "
            f"groups now {after['groups']} ({after['counters'].get('groups_removed', 0)} removed so far)")
    assert d.get("tx:spoofed_source", 0) == 30
    assert d.get("tx:unknown_vlan", 0) == 20
    assert d.get("tx:bad_arp", 0) + d.get("tx:truncated", 0) >= 10
    assert d.get("tx:bad_nd", 0) == 5
    assert d.get("bad_dhcp", 0) + d.get("tx:bad_dhcp", 0) + d.get("truncated", 0) >= 10
    assert d.get("unknown_destination", 0) >= 2000
    assert d.get("oversize", 0) == 3
    assert queries <= SA_BURST + SA_RATE * took + 5, queries
    assert until(lambda: lab.status()["groups"] < 100, 15), "the send-only groups of the flood stayed"


def test_agent_survived_served_and_legit_traffic_went_on(lab, legit, figures):
    result, pid = legit
    st = lab.status()
    assert st["attachment"]["pid"] == pid and st["attachment"]["state"] == "running"
    sent, got = result()
    log_text = state.log_path(state.attachment_id("eth4", lab.ns1)).read_text()
    figures(f"\nlegitimate pings h2 -> h1 during the attacks: {got}/{sent} answered")
    assert "Traceback" not in log_text, log_text[-3000:]
    assert sent > 0 and got >= sent * 0.9, (sent, got)
    out = x("exporter", "--once").stdout
    mine = [ln for ln in out.splitlines() if ln.startswith("xdpoib_drops_total") and f'netns="{lab.ns1}"' in ln]
    for direction, reason in (("agent", "arp_spoofed"), ("fabric", "qkey_mismatch"), ("fabric", "pkey_mismatch"),
                              ("tx", "spoofed_source"), ("tx", "unknown_vlan"), ("agent", "unknown_destination"),
                              ("agent", "runt"), ("agent", "loopback"), ("rx", "nd_unknown_lladdr")):
        assert any(f'direction="{direction}"' in ln and f'reason="{reason}"' in ln for ln in mine), (direction, reason)
