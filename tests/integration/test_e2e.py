"""End to end: Ethernet hosts in network namespaces, attached with the real CLI over a sim fabric with
a real OpenSM; ARP + IPv4 ping, IPv6 ping (ND translated), a TCP transfer, SA memberships checked with
saquery, and detach leaving nothing behind."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from labkit import attached, namespaces, nsexec, xdpoib
from nonroot import NobodyTree
from prereq import need_cmd

from xdpoib.agent import internal_name
from xdpoib.state import AttachSpec, pid_alive
from xdpoib.wire.addr import gid_str, lemac, mac_str, mlx_eth_addr
from xdpoib.wire.mgid import ipv6_mgid

SIM_HOSTS = 3          # GetTable answers are cut at 3 MCMemberRecords under umad2sim
BCAST = "ff12:401b:ffff::ffff:ffff"


@pytest.fixture(scope="module")
def lab(sim_fabric):
    """Three namespaces ns1..ns3, eth4 attached in each to hosts h1..h3, IPv4 10.77.0.N/24."""
    need_cmd("ip", "ping", "iperf3", "saquery")
    with attached(sim_fabric, ["h1", "h2", "h3"], net="10.77.0", prefix="xo", lo=True) as names:
        yield sim_fabric, names


def ll6(ns: str) -> str:
    out = nsexec(ns, "ip", "-6", "-o", "addr", "show", "dev", "eth4", "scope", "link").stdout
    return re.search(r"inet6 (\S+)/64", out).group(1)


def test_arp_and_ipv4_ping_between_all_hosts(lab):
    _, ns = lab
    for src in (0, 1, 2):
        for dst in (0, 1, 2):
            if src != dst:
                r = nsexec(ns[src], "ping", "-c", "2", "-i", "0.2", "-W", "3", f"10.77.0.{dst + 1}", check=False)
                assert r.returncode == 0, r.stdout
    # ARP resolved to the peer's REMAC, which the agent lists as a resolved peer
    neigh = nsexec(ns[0], "ip", "neigh", "show", "10.77.0.2", "dev", "eth4").stdout
    mac = re.search(r"lladdr (\S+)", neigh).group(1)
    peers = xdpoib("peers", "eth4", "--netns", ns[0], "-j").stdout
    assert mac in peers and '"path": "resolved"' in peers
    assert int(mac.split(":")[0], 16) & 0x03 == 0x02          # locally administered unicast REMAC


def test_frames_cross_the_translating_bpf_datapath(lab):
    """The default datapath is the XDP programs: every frame eth4 sent was redirected to the agent
    (none dropped), and every frame the fabric delivered was injected through the RX program."""
    _, ns = lab
    assert nsexec(ns[0], "ping", "-c", "3", "-i", "0.2", "-W", "3", "10.77.0.3", check=False).returncode == 0
    dp = json.loads(xdpoib("status", "eth4", "--netns", ns[0], "-j").stdout)["datapath"]
    assert dp["kind"] == "bpf"
    assert dp["tx"]["redirect"] >= 3 and dp["tx"]["drop"] == 0 and dp["tx"]["packets"] == dp["tx"]["redirect"]
    assert dp["rx"]["redirect"] >= 3 and dp["rx"]["drop"] == 0


def test_ipv6_ping_with_nd_translated(lab):
    _, ns = lab
    target = ll6(ns[1])
    r = nsexec(ns[0], "ping", "-6", "-c", "2", "-i", "0.2", "-W", "3", f"{target}%eth4", check=False)
    assert r.returncode == 0, r.stdout
    groups = xdpoib("groups", "eth4", "--netns", ns[1], "-j").stdout
    # the solicited-node group of ns2's address was joined because it is on eth4's own list
    addr = ipaddress.IPv6Address(target).packed
    snm = ipv6_mgid(bytes.fromhex("ff0200000000000000000001ff") + addr[13:])
    assert gid_str(snm) in groups


def test_tcp_transfer_with_iperf3_and_payload_integrity(lab, tmp_path):
    _, ns = lab
    server = subprocess.Popen(["ip", "netns", "exec", ns[1], "iperf3", "-s", "-1", "-B", "10.77.0.2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(50):
            if nsexec(ns[1], "ss", "-ltn", check=False).stdout.count(":5201"):
                break
            subprocess.run(["sleep", "0.1"])
        r = nsexec(ns[0], "iperf3", "-c", "10.77.0.2", "-n", "4M", "-J", timeout=120, check=False)
        assert r.returncode == 0, r.stdout[-1000:]
        assert '"bytes":\t4194304' in r.stdout or re.search(r'"bytes":\s*4194304', r.stdout)
    finally:
        server.kill()
        server.wait()
    # payload integrity: 3 MiB of random bytes through a TCP socket, hashed on both ends
    blob = os.urandom(3 << 20)
    src = tmp_path / "blob"
    src.write_bytes(blob)
    code = ("import socket,hashlib,sys;s=socket.create_server(('10.77.0.3',5300));c,_=s.accept();"
            "h=hashlib.sha256();n=0\nwhile True:\n d=c.recv(65536)\n if not d: break\n h.update(d);n+=len(d)\n"
            "print(n,h.hexdigest())")
    rx = subprocess.Popen(["ip", "netns", "exec", ns[2], sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True)
    send = ("import socket,sys,time\nfor _ in range(100):\n try:\n"
            "  s=socket.create_connection(('10.77.0.3',5300));break\n"
            " except OSError: time.sleep(0.1)\ns.sendall(open(sys.argv[1],'rb').read());s.close()")
    nsexec(ns[0], sys.executable, "-c", send, str(src), timeout=120)
    out, _ = rx.communicate(timeout=120)
    n, digest = out.split()
    assert int(n) == len(blob) and digest == hashlib.sha256(blob).hexdigest()


def test_oversize_frame_is_answered_with_frag_needed(lab):
    """eth4's MTU raised above the fabric's by hand: the agent answers ICMP frag-needed, and the
    sender's stack learns the path MTU (docs/design.md §3.6)."""
    _, ns = lab
    nsexec(ns[0], "ip", "link", "set", "eth4", "mtu", "3000")
    try:
        r = nsexec(ns[0], "ping", "-M", "do", "-s", "2500", "-c", "2", "-W", "2", "10.77.0.2", check=False)
        assert "mtu = 2044" in r.stdout + r.stderr, r.stdout + r.stderr
        assert "mtu 2044" in nsexec(ns[0], "ip", "route", "get", "10.77.0.2").stdout
        st = xdpoib("status", "eth4", "--netns", ns[0], "-j").stdout
        assert '"icmp_too_big"' in st and '"oversize"' in st
    finally:
        nsexec(ns[0], "ip", "link", "set", "eth4", "mtu", "2044")
        nsexec(ns[0], "ip", "route", "flush", "cache", check=False)


def members(fab, mgid: str) -> dict[str, int]:
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


def test_opensm_lists_each_attached_port_in_the_broadcast_group(lab):
    fab, _ = lab
    listed = members(fab, BCAST)
    for h in fab.hosts:
        assert listed.get(gid_str(h.gid), 0) & 1, (h.name, listed)


def test_attach_twice_fails_and_changes_nothing(lab):
    fab, ns = lab
    before = xdpoib("status", "eth4", "--netns", ns[0], "-j").stdout
    r = xdpoib("attach", "eth4", "--netns", ns[0], "--sim", f"{fab.name}:h1", check=False)
    assert r.returncode != 0 and "already attached" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    after = xdpoib("status", "eth4", "--netns", ns[0], "-j").stdout
    assert re.sub(r'"uptime_seconds": [\d.]+', "", before).split('"counters"')[0] == \
        re.sub(r'"uptime_seconds": [\d.]+', "", after).split('"counters"')[0]


@pytest.mark.parametrize("args,message", [
    (["attach", "tap9", "--mode", "tap", "--sim", "{fab}:h1"], "not an existing TAP"),
    (["detach", "eth9"], "not attached"),
    (["attach", "eth9", "--sim", "{fab}:h1", "--pkey", "0x8000"], "invalid partition"),
    (["attach", "eth9", "--sim", "{fab}:h1", "--pkey", "zz"], "bad --pkey"),
    (["attach", "eth9", "--netns", "no-such-ns", "--sim", "{fab}:h1"], "does not exist"),
    (["attach", "eth9", "--sim", "{fab}:h9"], "no host"),
    (["attach", "eth9", "--sim", "nofabric:h1"], "nofabric"),
    (["attach", "eth9", "--sim", "justaname"], "FABRIC:HOST"),
    (["attach", "eth9", "--sim", "{fab}:h3", "--pkey", "0x8003", "--wait", "0"], "not a member of partition 0x8003"),
    (["attach", "eth9", "--sim", "{fab}:h1", "--port", "2"], "--port applies to --device"),
])
def test_bad_cli_input_is_one_clear_line_and_changes_nothing(lab, args, message):
    fab, _ = lab
    r = xdpoib(*[a.format(fab=fab.name) for a in args], check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr
    # nothing was created: no link of that name (nor its internal end), no runtime files, no agent
    ifname = args[1]
    spec = AttachSpec(ifname, None)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f": {ifname}" not in links and internal_name(spec) not in links
    assert not list(Path("/run/xdpoib").glob(f"*@{ifname}.*"))
    assert subprocess.run(["pgrep", "-f", f'"ifname": "{ifname}"'], capture_output=True).returncode != 0


def test_mac_form_mellanox_gives_eth4_the_mellanox_mac(lab):
    """`--mac-form mellanox`: eth4 (a second attachment of h1, in its own namespace) has iPXE's Mellanox
    form of the port GUID, in status and on the link; the default attachment of h1 has the LEMAC."""
    fab, names = lab
    guid = fab.host("h1").guid.to_bytes(8, "big")
    assert json.loads(xdpoib("status", "eth4", "--netns", names[0], "-j").stdout)["eth"]["mac"] == mac_str(lemac(guid))
    with namespaces("xm", 1) as (ns,):
        st = json.loads(xdpoib("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h1", "--mac-form", "mellanox",
                               "-j").stdout)
        want = mac_str(mlx_eth_addr(guid))
        assert st["eth"]["mac"] == want != mac_str(lemac(guid))
        assert f"link/ether {want} " in nsexec(ns, "ip", "link", "show", "eth4").stdout


def test_not_root_is_refused(lab):
    """As nobody, from a copy nobody can read (the checkout itself may be private, e.g. in a 0700 dir)."""
    fab, _ = lab
    tree = NobodyTree()
    try:
        r = tree.run("attach", "eth9", "--sim", f"{fab.name}:h1")
    finally:
        tree.close()
    assert r.returncode != 0 and "must run as root" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_detach_leaves_nothing_behind(lab):
    """Last in the module: detaching ns3's eth4 leaves no link, program, file, process or membership."""
    fab, names = lab
    ns = names[2]
    gid = gid_str(fab.host("h3").gid)
    assert members(fab, BCAST).get(gid)
    st = xdpoib("status", "eth4", "--netns", ns, "-j").stdout
    pid = int(re.search(r'"pid": (\d+)', st).group(1))
    internal = re.search(r'"internal": "(\w+)"', st).group(1)
    xdpoib("detach", "eth4", "--netns", ns)
    assert not pid_alive(pid)                                # gone (at most an unreaped zombie)
    assert subprocess.run(["ip", "link", "show", internal], capture_output=True).returncode != 0
    assert "eth4" not in subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout
    progs = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    assert f"({pid})" not in progs                           # no program held by the agent
    run = Path("/run/xdpoib")
    assert not [p for p in run.glob(f"{ns}@eth4.*")]         # spec, socket, log
    assert not Path(f"/var/lib/xdpoib/{ns}@eth4.json").exists()
    assert gid not in members(fab, BCAST)                    # the SA forgot the membership
    assert not Path(f"/sys/fs/bpf/xdpoib/{ns}@eth4").exists()  # no pinned programs or maps
    assert not [p for p in Path("/sys/fs/bpf/xdpoib").glob("*")
                if p.name.startswith(ns)]
    r = xdpoib("detach", "eth4", "--netns", ns, check=False)
    assert r.returncode != 0 and "not attached" in r.stderr
