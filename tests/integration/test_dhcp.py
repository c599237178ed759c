"""DHCP across the fabric with real daemons: Debian's dnsmasq behind eth4 on one xdpoib host, unmodified
clients (ISC dhclient, busybox udhcpc) on two guests behind a Linux bridge on eth4 of another.

h1: netns S, eth4 with SERVER/24 and dnsmasq on it (leases of 2 minutes, T1 of 4 s, so that dhclient
renews by itself). h2: netns C with br0 (eth4 its uplink, br0 given eth4's MAC: the host is VIF 0),
attached with `--learn-vifs 2`; guest G1 runs dhclient, guest G2 udhcpc, each in its own namespace
on a veth port of br0 with its script, lease and pid files in the test's directory. One session
captures the fabric side on S (`xdpoib capture`) and the Ethernet side on br0 (tshark) while both
guests get a lease, dhclient renews at T1 and udhcpc on SIGUSR1. Checked: each client is bound and
renewed with the same address; the guests are learned VIFs with distinct QPNs and keep distinct
leases under distinct client identifiers (the one xdpoib adds for dhclient, udhcpc's own); what
crossed the fabric has RFC 4390's form (docs/design.md §3.9: htype 32, hlen 0, chaddr zero, a client
identifier, BROADCAST while the client has no address; renewals and their answers unicast between the
two QPs); every reply reaches br0 with the MAC of the guest that asked in chaddr, although the
broadcast ones arrive on VIF 0's QP and dnsmasq echoes no client identifier (the agent knows the
client by the xid); the leased addresses carry traffic both ways; dhclient started again asks for its
lease back (INIT-REBOOT) and gets it. ibsim clients at once: OpenSM and two agents: at most 5.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest
from labkit import XDPOIB, bridge_eth4, bridge_port, mac_of, sh
from labkit import xdpoib as x
from prereq import need_cmd

from xdpoib.wire import frames as f
from xdpoib.wire.oracle import client_id_for_mac

SIM_HOSTS = 2
NET = "10.84.0"
SERVER = f"{NET}.1"
POOL = (100, 150)
T1 = 4                              # seconds: dhclient renews within [0.75, 1] x T1
BCAST_MGID = "ff12:401b:ffff::ffff:ffff"
DISCOVER, OFFER, REQUEST, ACK = 1, 2, 3, 5
FIELDS = ["frame.number", "eth.src", "eth.dst", "ipoib.grh.sqpn", "ipoib.daddr.qpn", "ipoib.dgid",
          "dhcp.option.dhcp", "dhcp.hw.type", "dhcp.hw.len", "udp.payload", "_ws.malformed"]

# The clients' scripts: log the event, apply the address with ip(8), nothing else (no resolv.conf, no routes)
DHCLIENT_SCRIPT = """#!/bin/sh
echo "$reason $new_ip_address" >> {log}
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) {ip} addr replace "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
esac
exit 0
"""
UDHCPC_SCRIPT = """#!/bin/sh
echo "$1 $ip" >> {log}
case "$1" in
  deconfig) {ip} -4 addr flush dev "$interface" ;;
  bound|renew) {ip} addr replace "$ip/$mask" dev "$interface" ;;
esac
exit 0
"""


def spawn(ns: str, argv: list[str], log) -> subprocess.Popen:
    """A daemon in ns, its output appended to the file log; `ip netns exec` execs it, so the Popen's
    PID is the daemon's own."""
    with open(log, "a") as out:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def stop(p: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


def events(path) -> list[tuple[str, str]]:
    """(event, address) lines a client's script wrote."""
    if not path.exists():
        return []
    return [tuple([*line.split(), ""][:2]) for line in path.read_text().splitlines() if line.strip()]


def wait_for(pred, timeout: float, what: str, why=lambda: ""):
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what} within {timeout:.0f} s: {why()}")
        time.sleep(0.1)


def ping(ns: str, dst: str, count: int = 2) -> bool:
    return sh("ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst,
              check=False).returncode == 0


def rows(path) -> list[dict]:
    """Every DHCP message of a pcap, decoded by tshark (first occurrence of each field), with the
    message itself parsed again by our own parser under "msg"."""
    r = sh("tshark", "-r", str(path), "-Y", "dhcp", "-T", "fields", "-E", "occurrence=f",
           *[a for fld in FIELDS for a in ("-e", fld)], timeout=60)
    out = []
    for line in r.stdout.splitlines():
        row = dict(zip(FIELDS, line.split("\t"), strict=True))
        row["msg"] = f.parse_dhcp(bytes.fromhex(row["udp.payload"].replace(":", "")))
        out.append(row)
    return out


def qpn_field(qpn: int) -> str:
    return f"0x{qpn:06x}"               # how tshark prints a 24-bit QPN


@pytest.fixture(scope="module")
def lab(sim_fabric, tmp_path_factory):
    need_cmd("ip", "ping", "tshark", "dnsmasq", "dhclient", "busybox")
    t = uuid.uuid4().hex[:4]
    server, host, g1, g2 = f"xds{t}", f"xdc{t}", f"xdg{t}1", f"xdg{t}2"
    made = []
    try:
        for ns in (server, host, g1, g2):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        x("attach", "eth4", "--netns", server, "--sim", f"{sim_fabric.name}:h1")
        sh("ip", "-n", server, "addr", "add", f"{SERVER}/24", "dev", "eth4")
        x("attach", "eth4", "--netns", host, "--sim", f"{sim_fabric.name}:h2", "--learn-vifs", "2")
        bridge_eth4(host)                                               # the host is VIF 0
        for i, g in enumerate((g1, g2), 1):
            bridge_port(host, g, i)
        yield {"fab": sim_fabric, "server": server, "host": host, "g1": g1, "g2": g2,
               "dir": tmp_path_factory.mktemp("dhcp")}
    finally:
        for ns in (server, host):
            x("detach", "eth4", "--netns", ns, check=False)
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def dhclient(lab) -> subprocess.Popen:
    """dhclient in G1, in the foreground, with our script and files. It runs from a copy in the test's
    directory: Debian's AppArmor profile for /sbin/dhclient (where AppArmor is on) allows neither a
    script nor lease files of ours, and confines only that path."""
    d = lab["dir"]
    binary = d / "dhclient"
    if not binary.exists():
        shutil.copy2(shutil.which("dhclient"), binary)
    (d / "dhclient.conf").touch()
    return spawn(lab["g1"], [str(binary), "-d", "-4", "-sf", str(d / "dhclient.sh"), "-cf", str(d / "dhclient.conf"),
                             "-lf", str(d / "dhclient.leases"), "-pf", str(d / "dhclient.pid"), "eth0"],
                 d / "dhclient.out")


@pytest.fixture(scope="module")
def session(lab):
    """dnsmasq on S; both clients get a lease and renew it while both sides are captured. The daemons
    stay up for the tests (the module's last test restarts dhclient); the captures are over."""
    d = lab["dir"]
    ip = shutil.which("ip")
    (d / "dhclient.sh").write_text(DHCLIENT_SCRIPT.format(log=d / "dhclient.events", ip=ip))
    (d / "udhcpc.sh").write_text(UDHCPC_SCRIPT.format(log=d / "udhcpc.events", ip=ip))
    for s in ("dhclient.sh", "udhcpc.sh"):
        os.chmod(d / s, 0o755)
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["fabric"] = subprocess.Popen([*XDPOIB, "capture", "eth4", "--netns", lab["server"], "-w",
                                            str(d / "fabric.pcap")], stderr=subprocess.PIPE, text=True)
        assert "link-type IPOIB" in procs["fabric"].stderr.readline()
        procs["br0"] = subprocess.Popen(["ip", "netns", "exec", lab["host"], "tshark", "-i", "br0", "-f",
                                         "udp port 67 or udp port 68", "-w", str(d / "br0.pcap")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: "Capturing on" in procs["br0"].stderr.readline(), 20, "tshark capturing on br0")
        procs["dnsmasq"] = spawn(lab["server"], [
            "dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null", "--interface=eth4", "--bind-interfaces",
            "--no-ping", "--log-dhcp", f"--dhcp-range={NET}.{POOL[0]},{NET}.{POOL[1]},255.255.255.0,2m",
            f"--dhcp-option=option:T1,{T1}", f"--dhcp-leasefile={d / 'dnsmasq.leases'}",
            f"--pid-file={d / 'dnsmasq.pid'}"], d / "dnsmasq.log")
        wait_for(lambda: "DHCP, sockets bound" in (d / "dnsmasq.log").read_text(), 10, "dnsmasq listening",
                 lambda: (d / "dnsmasq.log").read_text())
        procs["dhclient"] = dhclient(lab)
        procs["udhcpc"] = spawn(lab["g2"], ["busybox", "udhcpc", "-f", "-i", "eth0", "-s", str(d / "udhcpc.sh"),
                                            "-p", str(d / "udhcpc.pid"), "-t", "10", "-T", "1", "-A", "1"],
                                d / "udhcpc.out")
        g1_ev, g2_ev = d / "dhclient.events", d / "udhcpc.events"
        wait_for(lambda: any(e == "BOUND" for e, _ in events(g1_ev)), 20, "dhclient bound",
                 lambda: (d / "dhclient.out").read_text())
        wait_for(lambda: any(e == "bound" for e, _ in events(g2_ev)), 20, "udhcpc bound",
                 lambda: (d / "udhcpc.out").read_text())
        wait_for(lambda: any(e == "RENEW" for e, _ in events(g1_ev)), 3 * T1, "dhclient renewed at T1",
                 lambda: (d / "dhclient.out").read_text())
        procs["udhcpc"].send_signal(signal.SIGUSR1)                 # busybox: renew now (unicast)
        wait_for(lambda: any(e == "renew" for e, _ in events(g2_ev)), 10, "udhcpc renewed on SIGUSR1",
                 lambda: (d / "udhcpc.out").read_text())
        time.sleep(0.3)                                             # the last answers into the captures
        procs["fabric"].send_signal(signal.SIGINT)
        assert procs["fabric"].wait(20) == 0, procs["fabric"].stderr.read()
        stop(procs["br0"], signal.SIGINT)
        yield {"procs": procs, "g1": events(g1_ev), "g2": events(g2_ev),
               "mac1": mac_of(lab["g1"], "eth0"), "mac2": mac_of(lab["g2"], "eth0"),
               "fabric": rows(d / "fabric.pcap"), "br0": rows(d / "br0.pcap")}
    finally:
        for name in ("dhclient", "udhcpc", "dnsmasq", "br0"):
            stop(procs.get(name))
        stop(procs.get("fabric"), signal.SIGINT)


def leased(evs: list[tuple[str, str]]) -> str:
    return next(a for e, a in evs if e.lower() == "bound")


def in_pool(addr: str) -> bool:
    a = ipaddress.IPv4Address(addr)
    return a in ipaddress.IPv4Network(f"{NET}.0/24") and POOL[0] <= a.packed[3] <= POOL[1]


def guest_addrs(ns: str) -> list[str]:
    info = json.loads(sh("ip", "-n", ns, "-j", "-4", "addr", "show", "dev", "eth0").stdout)[0]
    return [a["local"] for a in info["addr_info"]]


def vif_qpns(lab, session) -> dict[str, int]:
    got = {v["mac"]: v for v in json.loads(x("vif", "list", "eth4", "--netns", lab["host"], "-j").stdout)}
    return {g: got[session[f"mac{i}"]]["qpn"] for i, g in ((1, "g1"), (2, "g2"))
            if got.get(session[f"mac{i}"], {}).get("learned")}


# ================================================================ each client, bound and renewed

def test_dhclient_gets_a_lease_across_the_fabric_and_renews_it(lab, session):
    evs = session["g1"]
    addr = leased(evs)
    assert in_pool(addr), evs
    renews = [a for e, a in evs if e == "RENEW"]
    assert renews and set(renews) == {addr}, evs                    # renewed at T1, the same address
    assert not [e for e, _ in evs if e in ("EXPIRE", "FAIL", "REBIND")], evs
    assert guest_addrs(lab["g1"]) == [addr]


def test_udhcpc_gets_a_lease_across_the_fabric_and_renews_it(lab, session):
    evs = session["g2"]
    addr = leased(evs)
    assert in_pool(addr), evs
    assert [a for e, a in evs if e == "renew"] == [addr], evs
    assert "leasefail" not in [e for e, _ in evs] and "nak" not in [e for e, _ in evs], evs
    assert guest_addrs(lab["g2"]) == [addr]


# ================================================================ two guests, two leases

def test_two_guests_behind_one_bridge_keep_their_own_leases(lab, session):
    a1, a2 = leased(session["g1"]), leased(session["g2"])
    assert a1 != a2
    qpns = vif_qpns(lab, session)
    assert set(qpns) == {"g1", "g2"} and qpns["g1"] != qpns["g2"], qpns      # learned, a QP each
    # dnsmasq's leases: one per guest, under distinct client identifiers, the hardware address it saw
    # being InfiniBand's and empty ("20-": htype 32, hlen 0)
    leases = {ln.split()[2]: ln.split() for ln in (lab["dir"] / "dnsmasq.leases").read_text().splitlines()}
    assert set(leases) == {a1, a2}, leases
    cid1 = client_id_for_mac(bytes.fromhex(session["mac1"].replace(":", ""))).hex(":")
    cid2 = "01:" + session["mac2"]                                  # udhcpc's own: type 1 and the MAC
    assert leases[a1][4] == cid1 and leases[a2][4] == cid2, leases
    assert leases[a1][1] == leases[a2][1] == "20-", leases
    # the addresses carry traffic, both ways, and the server knows each guest by its own QPN
    for g, addr in (("g1", a1), ("g2", a2)):
        assert ping(lab[g], SERVER), f"{g} cannot reach the server from {addr}"
        assert ping(lab["server"], addr), f"the server cannot reach {g} at {addr}"
    peers = {p["qpn"] for p in json.loads(x("peers", "eth4", "--netns", lab["server"], "-j").stdout)}
    assert set(qpns.values()) <= peers, (qpns, peers)


# ================================================================ what crossed the fabric (captured on S)

def test_what_crosses_the_fabric_has_rfc_4390s_form(lab, session):
    st = json.loads(x("status", "eth4", "--netns", lab["server"], "-j").stdout)
    server_qpn, server_gid = st["qpn"], str(ipaddress.IPv6Address(st["port"]["gid"]))
    qpns = vif_qpns(lab, session)
    cids = {"g1": client_id_for_mac(bytes.fromhex(session["mac1"].replace(":", ""))),
            "g2": b"\x01" + bytes.fromhex(session["mac2"].replace(":", ""))}
    rs = session["fabric"]
    assert rs and not [r for r in rs if r["_ws.malformed"]]
    for r in rs:
        m = r["msg"]
        assert (r["dhcp.hw.type"], r["dhcp.hw.len"]) == ("0x20", "0"), r
        assert (m.htype, m.hlen, m.chaddr) == (32, 0, bytes(16)), r
    for g in ("g1", "g2"):
        qpn = qpn_field(qpns[g])
        asked = [r for r in rs if r["msg"].op == 1 and r["ipoib.grh.sqpn"] == qpn]       # received from the guest
        xids = {r["msg"].xid for r in asked}
        answers = [r for r in rs if r["msg"].op == 2 and r["msg"].xid in xids]           # sent by dnsmasq
        types = {int(r["dhcp.option.dhcp"]) for r in asked}
        assert {DISCOVER, REQUEST} <= types and {OFFER, ACK} <= {int(r["dhcp.option.dhcp"]) for r in answers}, g
        assert all(r["msg"].option(f.DHCP_OPT_CLIENT_ID) == cids[g] for r in asked), g
        new = [r for r in asked if r["msg"].ciaddr == bytes(4)]
        renew = [r for r in asked if r["msg"].ciaddr != bytes(4)]
        # without an address: BROADCAST, to the broadcast group, answered there with BROADCAST
        assert new and all(r["msg"].flags & f.DHCP_BROADCAST and r["ipoib.dgid"] == BCAST_MGID for r in new), g
        first = [r for r in answers if r["msg"].ciaddr == bytes(4)]           # (a renewal keeps its xid)
        assert first and all(r["msg"].flags & f.DHCP_BROADCAST and r["ipoib.dgid"] == BCAST_MGID
                             and not r["ipoib.daddr.qpn"] for r in first), g
        # renewing: from its address, unicast to the server's QP, answered unicast to the guest's QP
        leased_ip = ipaddress.IPv4Address(leased(session[g])).packed
        assert renew and all(r["msg"].ciaddr == leased_ip and not r["msg"].flags & f.DHCP_BROADCAST
                             and r["ipoib.dgid"] == server_gid for r in renew), g
        again = [r for r in answers if r["msg"].ciaddr != bytes(4)]
        assert again and all(r["ipoib.daddr.qpn"] == qpn and r["msg"].yiaddr == leased_ip for r in again), g
    assert {r["ipoib.grh.sqpn"] for r in rs if r["msg"].op == 2} <= {qpn_field(server_qpn), ""}


# ================================================================ what reached the guests (captured on br0)

def test_every_reply_reaches_br0_with_the_askers_mac(lab, session):
    rs = session["br0"]
    macs = {session["mac1"], session["mac2"]}
    asked = {}
    for r in rs:
        m = r["msg"]
        if m.op == 1:
            assert r["eth.src"] in macs and (m.htype, m.hlen, m.chaddr[:6].hex(":")) == (1, 6, r["eth.src"]), r
            asked[m.xid] = r["eth.src"]
    replies = [r for r in rs if r["msg"].op == 2]
    assert len(replies) >= 6, replies                              # offer + ack each, and the renewals
    for r in replies:
        m = r["msg"]
        assert (m.htype, m.hlen, m.chaddr[6:]) == (1, 6, bytes(10)), r
        assert m.chaddr[:6].hex(":") == asked[m.xid], r            # the guest that asked, not VIF 0
        assert r["eth.dst"] in ("ff:ff:ff:ff:ff:ff", asked[m.xid]), r
    assert {asked[r["msg"].xid] for r in replies} == macs


# ================================================================ last: dhclient again (INIT-REBOOT)

def test_dhclient_started_again_gets_its_lease_back(lab, session):
    d = lab["dir"]
    addr = leased(session["g1"])
    stop(session["procs"]["dhclient"])
    before = len(events(d / "dhclient.events"))
    session["procs"]["dhclient"] = dhclient(lab)
    evs = wait_for(lambda: [ev for ev in events(d / "dhclient.events")[before:] if ev[0] in ("REBOOT", "BOUND")],
                   20, "dhclient bound again", lambda: (d / "dhclient.out").read_text())
    assert evs[0] == ("REBOOT", addr), evs                         # asked for its lease, got it
    assert ping(lab["g1"], SERVER)
