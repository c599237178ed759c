"""VLANs mapped to P_Key partitions, end to end with a real OpenSM partitions file (h1 and h2 are
members of 0x8003, h3 is not).

h1: `attach eth4 --vlan 3:0x8003` and a VLAN 3 endpoint with its own MAC added as a VIF on VLAN 3;
h2: attached untagged in 0x8003, h3 in the default partition, both with the real kernel stack. This
kernel has no 802.1Q module (no `type vlan` links, no bridge VLAN filtering), so the VLAN 3 endpoint
is a raw AF_PACKET socket on eth4 that sends tagged frames and reads the tag of what comes back
(PACKET_AUXDATA): its tagged ARP request is answered by h2 with a frame tagged VLAN 3, its tagged
ICMP echo is answered likewise, h3 answers nothing; the SA lists h1 in 0x8003's broadcast group;
`status -j` shows both partitions; h2 talks to the VIF's own QP; a P_Key the port does not have is
refused before anything changes, naming the port's P_Key table.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from labkit import namespaces
from labkit import xdpoib as x
from prereq import need_cmd

SIM_HOSTS = 3
VLAN_MAC = "52:54:00:83:00:01"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {r.stdout[-300:]} {r.stderr[-300:]}")
    return r


def ping(ns: str, dst: str, count: int = 3) -> bool:
    return sh("ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst,
              check=False).returncode == 0


@pytest.fixture(scope="module")
def lab(sim_fabric):
    need_cmd("ip", "ping", "saquery")
    with namespaces("xp", 3, lo=True) as ns:
        x("attach", "eth4", "--netns", ns[0], "--sim", f"{sim_fabric.name}:h1", "--vlan", "3:0x8003")
        x("attach", "eth4", "--netns", ns[1], "--sim", f"{sim_fabric.name}:h2", "--pkey", "0x8003")
        x("attach", "eth4", "--netns", ns[2], "--sim", f"{sim_fabric.name}:h3")
        x("vif", "add", "eth4", VLAN_MAC, "--vlan", "3", "--netns", ns[0])
        sh("ip", "-n", ns[1], "addr", "add", "10.83.0.2/24", "dev", "eth4")
        sh("ip", "-n", ns[2], "addr", "add", "10.83.0.3/24", "dev", "eth4")
        yield sim_fabric, ns


ENDPOINT = r"""
import socket, struct, sys, time
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
ip, dst_ip = socket.inet_aton(sys.argv[2]), socket.inet_aton(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(263, 8, 1)                                   # SOL_PACKET, PACKET_AUXDATA
s.bind(("eth4", 0))
def tagged(dst, etype, body):
    return dst + mac + struct.pack("!HHH", 0x8100, 3, etype) + body
def csum(b):
    b += b"\0" * (len(b) & 1); t = sum(struct.unpack(f"!{len(b)//2}H", b)); t = (t >> 16) + (t & 0xffff)
    return ~(t + (t >> 16)) & 0xffff
def wait(pred, secs=3.0):
    end = time.time() + secs
    while time.time() < end:
        s.settimeout(max(0.01, end - time.time()))
        try:
            data, anc, _, _ = s.recvmsg(4096, 64)
        except socket.timeout:
            break
        vid = None
        for lvl, typ, d in anc:
            if lvl == 263 and typ == 8 and len(d) >= 20:
                st, _, _, _, _, tci = struct.unpack_from("IIIHHH", d)
                if st & 0x10:
                    vid = tci & 0xfff
        if data[12:14] == b"\x81\x00":                    # the tag left in the frame
            vid, data = struct.unpack_from("!H", data, 14)[0] & 0xfff, data[:12] + data[16:]
        if data[:6] == mac and vid == 3 and pred(data):
            return data
    return None
s.send(tagged(b"\xff" * 6, 0x0806, struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + bytes(6) + dst_ip))
r = wait(lambda d: d[12:14] == b"\x08\x06" and d[20:22] == b"\x00\x02" and d[28:32] == dst_ip)
if r is None:
    print("no-arp-reply"); sys.exit(0)
peer = r[6:12]
print("arp-reply", peer.hex(":"))
icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + b"vlan3-payload"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, ip, dst_ip)
iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
s.send(tagged(peer, 0x0800, iph + icmp))
r = wait(lambda d: d[12:14] == b"\x08\x00" and d[23] == 1 and d[34] == 0 and d.endswith(b"vlan3-payload"))
print("echo-reply" if r is not None else "no-echo-reply")
"""


def endpoint(ns: str, dst: str) -> list[str]:
    """The VLAN 3 endpoint (10.83.0.1, VLAN_MAC) asks for dst: what came back, tagged VLAN 3."""
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", ENDPOINT, VLAN_MAC, "10.83.0.1", dst).stdout.split()


def test_the_vlan_reaches_its_partition_only(lab):
    fab, ns = lab
    got = endpoint(ns[0], "10.83.0.2")
    assert got[0] == "arp-reply" and got[-1] == "echo-reply", f"VLAN 3 -> the 0x8003 host: {got}"
    assert endpoint(ns[0], "10.83.0.3") == ["no-arp-reply"], "a host outside 0x8003 answered on VLAN 3"
    neigh = sh("ip", "-n", ns[1], "neigh", "show", "10.83.0.1").stdout
    assert "lladdr" in neigh, "h2 never resolved the VLAN 3 endpoint"
    st = json.loads(x("status", "eth4", "--netns", ns[0], "-j").stdout)
    st = st[0] if isinstance(st, list) else st
    parts = {p["vlan"]: p for p in st["partitions"]}
    assert parts[0]["pkey"] == "0xffff" and parts[3]["pkey"] == "0x8003"
    vif = next(v for v in json.loads(x("vif", "list", "eth4", "--netns", ns[0], "-j").stdout)
               if v["mac"] == VLAN_MAC)
    peers = json.loads(x("peers", "eth4", "--netns", ns[1], "-j").stdout)
    assert vif["qpn"] in {p["qpn"] for p in peers}          # h2 talks to the VLAN VIF's own QP
    import ipaddress

    out = fab.saquery("h2", "--smkey", "1", "MCMR", "--mgid", "ff12:401b:8003::ffff:ffff").stdout
    listed = {str(ipaddress.ip_address(w.split(".")[-1])) for w in out.split() if w.count(":") >= 2}
    assert str(ipaddress.ip_address(st["port"]["gid"])) in listed, out


def test_a_partition_the_port_lacks_is_refused_before_anything_changes(lab):
    fab, ns = lab
    r = x("attach", "eth5", "--netns", ns[2], "--sim", f"{fab.name}:h3", "--vlan", "3:0x8003", check=False)
    assert r.returncode != 0 and "P_Key table" in r.stderr and "0x8003" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sh("ip", "-n", ns[2], "link", "show", "eth5", check=False).returncode != 0
    for bad in (["--vlan", "3"], ["--vlan", "0:0x8003"], ["--vlan", "3:0x8003", "--vlan", "3:0x8004"],
                ["--vlan", "5:0xffff"]):
        r = x("attach", "eth6", "--netns", ns[2], "--sim", f"{fab.name}:h3", *bad, check=False)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
