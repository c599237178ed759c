"""End to end against a peer we did not write the translator for: an xdpoib host (eth4 in a netns,
attached through the real CLI on h3) and the native IPoIB host of `xdpoib.native` (`xdpoib sim native`,
which speaks IPoIB as Linux `ib0` does, from its own encoder and decoder).

Each exchange runs both ways, and each way starts with empty neighbour caches, so ARP and ND resolve
on both sides through the translation: what xdpoib puts on the fabric is judged by the native peer's
decoder (it reports every frame it received), and what the native peer sends is judged by the Linux
stack behind eth4. Also: the native peer's flags-0x80 address is one peer; dnsmasq behind eth4 gives
the native peer a lease (RFC 4390); a native peer in partition 0x8003, which h3 is not in, is
unreachable. ibsim clients at once: OpenSM, the agent, one or two native peers, a saquery: at most 5.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time

import pytest
from labkit import attached, nsexec, xdpoib
from prereq import need_cmd

from xdpoib.fabric.base import gid_str

SIM_HOSTS = 3                   # h1, h2 in 0x8003; h3 (the xdpoib host) is not
NET = "10.88.0"
XDP_IP, NATIVE_IP = f"{NET}.3", f"{NET}.1"
UDP_PORT = 7007

ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

UDP_CLIENT = """
import socket, sys
host, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(3)
for _ in range(3):                  # the first datagram may wait for ARP/ND
    s.sendto(text.encode(), socket.getaddrinfo(host, port, fam)[0][4])
    try:
        print(s.recvfrom(2048)[0].decode())
        break
    except TimeoutError:
        continue
"""


@pytest.fixture(scope="module")
def lab(sim_fabric):
    """eth4 attached in a fresh netns on h3 (default partition) with NET.3/24, and its status."""
    need_cmd("ip", "ping")
    with attached(sim_fabric, ["h3"], net=NET, prefix="xn", lo=True) as (ns,):       # XDP_IP is NET.3
        end = time.monotonic() + 10                 # the link-local address leaves DAD
        while "tentative" in nsexec(ns, "ip", "-6", "addr", "show", "dev", "eth4").stdout:
            assert time.monotonic() < end, "eth4's link-local address stays tentative"
            time.sleep(0.1)
        st = json.loads(xdpoib("status", "eth4", "--netns", ns, "-j").stdout)
        ll = re.search(r"inet6 (fe80::\S+)/64", nsexec(ns, "ip", "-6", "addr", "show", "dev", "eth4").stdout)
        yield {"fab": sim_fabric, "ns": ns, "status": st, "ll": ll.group(1),
               "addr": (st["qpn"], st["port"]["gid"])}


@pytest.fixture(scope="module")
def native(lab):
    """The native peer on h1 with NATIVE_IP/24 (and its link-local address)."""
    from xdpoib.native.client import NativeHost

    peer = NativeHost(lab["fab"].name, "h1", ip=f"{NATIVE_IP}/24")
    try:
        yield peer
    finally:
        peer.close()


def native_ll(peer) -> str:
    return next(a.split("/")[0] for a in peer.ready["ipv6"] if a.startswith("fe80"))


def solicited_node(addr: str) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX of an IPv6 address."""
    return ipaddress.IPv6Address(b"\xff\x02" + bytes(9) + b"\x01\xff" + ipaddress.IPv6Address(addr).packed[13:])


def flush(lab) -> None:
    nsexec(lab["ns"], "ip", "neigh", "flush", "dev", "eth4")
    nsexec(lab["ns"], "ip", "-6", "neigh", "flush", "dev", "eth4")


def since(peer, n: int, kind: str | None = None) -> list[dict]:
    return [e for e in peer.received(kind) if e["n"] > n]


# --- IPv4: ARP and ping, both ways -------------------------------------------------------------------

def test_native_pings_the_xdpoib_host_and_resolves_it_by_arp(lab, native):
    flush(lab)
    mark = native.status()["received"]
    r = native.ping(XDP_IP, count=3)
    assert r["received"] == 3, r
    replies = [e for e in since(native, mark, "arp") if e["op"] == "reply"]
    assert replies, "no ARP reply reached the native peer"
    qpn, gid = lab["addr"]
    sha = bytes.fromhex(replies[0]["sha"].replace(":", ""))
    # xdpoib's address in IB form: flags 0 (UD only), its QP, its port GID; unicast, so no GRH
    assert sha[0] == 0 and int.from_bytes(sha[1:4], "big") == qpn and gid_str(sha[4:]) == gid
    assert replies[0]["grh"] is False
    arp = {n["ip"]: n for n in native.neighbors()["arp"]}
    assert arp[XDP_IP]["qpn"] == qpn and arp[XDP_IP]["gid"] == gid and arp[XDP_IP]["flags"] == 0
    # and the Linux stack behind eth4 learnt the native peer from its request, under its REMAC
    assert "lladdr" in nsexec(lab["ns"], "ip", "neigh", "show", NATIVE_IP, "dev", "eth4").stdout


def test_xdpoib_host_pings_the_native_peer_and_resolves_it_by_arp(lab, native):
    flush(lab)
    mark = native.status()["received"]
    r = nsexec(lab["ns"], "ping", "-c", "3", "-i", "0.2", "-W", "3", NATIVE_IP, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    requests = [e for e in since(native, mark, "arp") if e["op"] == "request" and e["tpa"] == NATIVE_IP]
    assert requests, "the native peer saw no ARP request from xdpoib"
    req = requests[0]
    assert req["tha"] == ":".join(["00"] * 20)                 # Linux's form: 20 zero octets
    assert req["sha_flags"] == 0 and req["grh"] is True         # to the broadcast group: with a GRH
    echoes = [e for e in since(native, mark, "icmp") if e["type"] == 8]
    assert len(echoes) == 3 and not any(e["grh"] for e in echoes)   # unicast without GRH
    assert {e["src_qpn"] for e in echoes} == {lab["addr"][0]}
    neigh = nsexec(lab["ns"], "ip", "neigh", "show", NATIVE_IP, "dev", "eth4").stdout
    assert re.search(r"lladdr \S+ (REACHABLE|DELAY|STALE)", neigh), neigh


# --- IPv6: ND and ping, both ways --------------------------------------------------------------------

def test_native_pings6_the_xdpoib_host_and_resolves_it_by_nd(lab, native):
    flush(lab)
    mark = native.status()["received"]
    r = native.ping(lab["ll"], count=3)
    assert r["received"] == 3, r
    nas = [e for e in since(native, mark, "na") if e["target"] == lab["ll"]]
    assert nas, "no NA reached the native peer"
    na = nas[0]
    # the target option arrived in IB form (24 octets, else it would not have been decoded)
    assert na["lladdr"] is not None and na["lladdr_flags"] == 0 and na["other_option_lengths"] == []
    nd = {n["ip"]: n for n in native.neighbors()["nd"]}
    assert nd[lab["ll"]]["qpn"] == lab["addr"][0] and nd[lab["ll"]]["gid"] == lab["addr"][1]


def test_xdpoib_host_pings6_the_native_peer_and_resolves_it_by_nd(lab, native):
    flush(lab)
    mark = native.status()["received"]
    target = native_ll(native)
    r = nsexec(lab["ns"], "ping", "-6", "-c", "3", "-i", "0.2", "-W", "3", f"{target}%eth4", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    ns_seen = [e for e in since(native, mark, "ns") if e["target"] == target]
    assert ns_seen, "the native peer saw no NS from xdpoib"
    sol = ns_seen[0]
    assert sol["grh"] is True and sol["lladdr_flags"] == 0 and sol["other_option_lengths"] == []
    assert sol["dst"] == str(solicited_node(target))
    echoes = [e for e in since(native, mark, "icmp6") if e["type"] == 128]
    assert len(echoes) == 3 and not any(e["grh"] for e in echoes)


# --- UDP echo, both ways -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def echo_server(lab):
    """A UDP echo server behind eth4 (IPv4 and IPv6)."""
    p = subprocess.Popen(["ip", "netns", "exec", lab["ns"], sys.executable, "-c", ECHO_SERVER, str(UDP_PORT)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p
    finally:
        p.kill()
        p.wait()


def test_udp_echo_both_ways(lab, native, echo_server):
    assert native.udp(XDP_IP, UDP_PORT, "from-native")["reply"] == "from-native"
    assert native.udp(lab["ll"], UDP_PORT, "from-native-6")["reply"] == "from-native-6"
    out = nsexec(lab["ns"], sys.executable, "-c", UDP_CLIENT, NATIVE_IP, "7", "to-native", check=True)
    assert out.stdout.strip() == "to-native"
    out = nsexec(lab["ns"], sys.executable, "-c", UDP_CLIENT, f"{native_ll(native)}%eth4", "7", "to-native-6",
                 check=True)
    assert out.stdout.strip() == "to-native-6"


# --- identity ----------------------------------------------------------------------------------------

def test_native_peers_flags_0x80_address_is_one_peer(lab, native):
    hw = native.ready["hwaddr"]
    assert hw.startswith("80:")                    # connected-mode capable, as Linux ib0 says
    qpn, gid = native.ready["qpn"], native.ready["gid"]
    peers = json.loads(xdpoib("peers", "eth4", "--netns", lab["ns"], "-j").stdout)
    mine = [p for p in peers if p["gid"] == gid and p["qpn"] == qpn]
    assert len(mine) == 1, peers
    # learnt from ARP (flags 0x80), from ND options (0x80) and from completions (no flags): one REMAC
    v4 = nsexec(lab["ns"], "ip", "neigh", "show", NATIVE_IP, "dev", "eth4").stdout
    v6 = nsexec(lab["ns"], "ip", "-6", "neigh", "show", native_ll(native), "dev", "eth4").stdout
    assert f"lladdr {mine[0]['remac']}" in v4 and f"lladdr {mine[0]['remac']}" in v6


def sa_members(fab, mgid: str) -> dict[str, int]:
    """PortGID -> JoinState of every member of mgid, as OpenSM reports it (trusted saquery)."""
    r = fab.saquery("h1", "--smkey", "1", "MCMR", "--mgid", mgid)
    assert r.returncode == 0, r.stderr
    out, gid = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"^\s+(PortGid|JoinState)\.+\s*(\S+)", line)
        if m and m.group(1) == "PortGid":
            gid = m.group(2)
        elif m and gid is not None:
            out[gid] = int(m.group(2), 16)
    return out


def test_native_peer_did_its_own_sa_joins(lab, native):
    """Broadcast, all-nodes and its solicited-node group, full member, as the SA itself lists them."""
    gid = native.ready["gid"]
    snm = solicited_node(native_ll(native)).packed
    for mgid in ("ff12:401b:ffff::ffff:ffff", "ff12:601b:ffff::1",
                 str(ipaddress.IPv6Address(b"\xff\x12\x60\x1b\xff\xff" + snm[6:]))):
        assert sa_members(lab["fab"], mgid).get(gid, 0) & 1, mgid
        assert native.ready["groups"][mgid] == 1


# --- DHCP: dnsmasq behind eth4, the native peer as the client ----------------------------------------

def test_dnsmasq_behind_eth4_leases_an_address_to_the_native_peer(lab, tmp_path):
    need_cmd("dnsmasq")
    from xdpoib.native.client import NativeHost

    leases, log = tmp_path / "leases", tmp_path / "dnsmasq.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["ip", "netns", "exec", lab["ns"], "dnsmasq", "--no-daemon", "--port=0",
                                   "--conf-file=/dev/null", "--interface=eth4", "--bind-interfaces", "--no-ping",
                                   "--log-dhcp", f"--dhcp-range={NET}.100,{NET}.150,255.255.255.0,600",
                                   f"--dhcp-leasefile={leases}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        assert server.poll() is None, log.read_text()
        with NativeHost(lab["fab"].name, "h2", dhcp=True) as peer:
            lease = peer.dhcp(timeout=30)
            addr = ipaddress.IPv4Interface(lease["ip"])
            assert addr.network == ipaddress.IPv4Network(f"{NET}.0/24")
            assert 100 <= int(addr.ip.packed[3]) <= 150 and lease["server"] == XDP_IP
            # the server's answers kept RFC 4390's form: htype 32, hlen 0, BROADCAST flag
            offers = [e for e in peer.events if e.get("event") == "dhcp" and e.get("type") == 2]
            assert offers and all(o["htype"] == 32 and o["hlen"] == 0 and o["flags"] & 0x8000 for o in offers)
            # dnsmasq knew the client by its client identifier (type 255, IAID, DUID-LL over InfiniBand)
            guid = peer.ready["guid"][2:]
            cid = "ff:00:00:00:01:00:03:00:20:" + ":".join(guid[i:i + 2] for i in range(0, 16, 2))
            text = leases.read_text()
            assert str(addr.ip) in text and cid in text, text
            r = nsexec(lab["ns"], "ping", "-c", "2", "-i", "0.2", "-W", "3", str(addr.ip), check=False)
            assert r.returncode == 0, r.stdout
    finally:
        server.terminate()
        server.wait(10)


# --- partitions --------------------------------------------------------------------------------------

def test_native_peer_in_a_partition_the_xdpoib_host_is_not_in_is_unreachable(lab):
    from xdpoib.native.client import NativeHost

    with NativeHost(lab["fab"].name, "h2", ip=f"{NET}.9/24", pkey=0x8003) as peer:
        assert peer.ready["pkey"] == "0x8003" and "ff12:401b:8003::ffff:ffff" in peer.ready["groups"]
        assert peer.ping(XDP_IP, count=2, timeout=2)["received"] == 0
        r = nsexec(lab["ns"], "ping", "-c", "2", "-i", "0.2", "-W", "1", f"{NET}.9", check=False)
        assert r.returncode != 0
        assert not [e for e in peer.received() if e["src_qpn"] == lab["addr"][0]]
        peers = json.loads(xdpoib("peers", "eth4", "--netns", lab["ns"], "-j").stdout)
        assert peer.ready["qpn"] not in [p["qpn"] for p in peers]
