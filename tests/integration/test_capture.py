"""`xdpoib capture` on a live attachment, judged by tshark: eth4 in a netns on h3 (attached through the
real CLI), the native IPoIB peer of `xdpoib sim native` on h1 (and a second one on h2 as a DHCP client of
dnsmasq behind eth4). A capture during ARP, ping, ping6 (ND) and a DHCP exchange decodes with the
addresses where Wireshark's IPoIB dissector shows them: the QPN and GID `status -j` reports as the
source of what we send to a group and in the sender address of our ARP (htype 32, hlen 20), the native
peer's as the destination of our unicast and the source of what it sent; ND options 24 bytes with a
correct ICMPv6 checksum; DHCP per RFC 4390. `-w -` streams into `tshark -r -` and `-c N` stops after N;
SIGINT stops cleanly (a file, a stream); a second capture is refused; a client that dies frees the slot, and with no
capture running the agent's capture slot is empty (`status -j`: "capture": null). ibsim clients at
once: OpenSM, the agent, two native peers: 4.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time

import pytest
from labkit import XDPOIB, attached, nsexec, xdpoib
from prereq import need_cmd

from xdpoib import state
from xdpoib.fabric.base import gid_str

SIM_HOSTS = 3
NET = "10.87.0"
XDP_IP, NATIVE_IP = f"{NET}.3", f"{NET}.1"
BCAST_MGID = "ff12:401b:ffff::ffff:ffff"

FIELDS = ["frame.number", "ipoib.daddr.qpn", "ipoib.dgid", "ipoib.grh.sqpn", "ipoib.grh.sgid", "arp.opcode",
          "arp.hw.type", "arp.hw.size", "arp.src.hw", "arp.src.proto_ipv4", "icmp.type", "icmpv6.type",
          "icmpv6.nd.ns.target_address", "icmpv6.opt.type", "icmpv6.opt.length", "icmpv6.checksum.status",
          "dhcp.option.dhcp", "dhcp.hw.type", "dhcp.hw.len", "dhcp.flags.bc", "_ws.malformed"]


def qpn_field(qpn: int) -> str:
    return f"0x{qpn:06x}"               # how tshark prints a 24-bit QPN


def capture_slot(lab) -> dict | None:
    return json.loads(xdpoib("status", "eth4", "--netns", lab["ns"], "-j").stdout)["capture"]


def start_capture(lab, *args: str, stdout=None) -> subprocess.Popen:
    """`xdpoib capture eth4 ...`, returned once it says it is capturing (its first stderr line)."""
    p = subprocess.Popen([*XDPOIB, "capture", "eth4", "--netns", lab["ns"], *args], stdout=stdout,
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert line.startswith("xdpoib capture: eth4 in netns"), line + p.stderr.read()
    assert "link-type IPOIB (242)" in line
    return p


def finish(p: subprocess.Popen, sig: int | None = signal.SIGINT, timeout: float = 20) -> str:
    """Signal (or let it end), wait, and return its stderr after the first line."""
    if sig is not None:
        p.send_signal(sig)
    err = p.stderr.read()
    assert p.wait(timeout) == 0, err
    return err


def tshark_rows(path, display_filter: str | None = None) -> list[dict]:
    argv = ["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,"]
    if display_filter:
        argv += ["-Y", display_filter]
    r = subprocess.run([*argv, *[a for f in FIELDS for a in ("-e", f)]], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in r.stdout.splitlines()]


def solicited_node_mgid(addr: str) -> str:
    """The MGID of an IPv6 address's solicited-node group (docs/design.md §3.4)."""
    low = b"\x01\xff" + ipaddress.IPv6Address(addr).packed[13:]
    return str(ipaddress.IPv6Address(b"\xff\x12\x60\x1b\xff\xff" + bytes(5) + low))


@pytest.fixture(scope="module")
def lab(sim_fabric):
    """eth4 attached in a fresh netns on h3 with NET.3/24, its status, and its (QPN, GID)."""
    need_cmd("ip", "ping", "tshark")
    with attached(sim_fabric, ["h3"], net=NET, prefix="xc", lo=True) as (ns,):       # XDP_IP is NET.3
        end = time.monotonic() + 10
        while "tentative" in nsexec(ns, "ip", "-6", "addr", "show", "dev", "eth4").stdout:
            assert time.monotonic() < end, "eth4's link-local address stays tentative"
            time.sleep(0.1)
        st = json.loads(xdpoib("status", "eth4", "--netns", ns, "-j").stdout)
        yield {"fab": sim_fabric, "ns": ns, "status": st, "qpn": st["qpn"], "gid": st["port"]["gid"]}


@pytest.fixture(scope="module")
def native(lab):
    from xdpoib.native.client import NativeHost

    peer = NativeHost(lab["fab"].name, "h1", ip=f"{NATIVE_IP}/24")
    try:
        yield peer
    finally:
        peer.close()


def native_ll(peer) -> str:
    return next(a.split("/")[0] for a in peer.ready["ipv6"] if a.startswith("fe80"))


def flush(lab) -> None:
    nsexec(lab["ns"], "ip", "neigh", "flush", "dev", "eth4")
    nsexec(lab["ns"], "ip", "-6", "neigh", "flush", "dev", "eth4")


# ================================================================ the capture of a session

@pytest.fixture(scope="module")
def session(lab, native, tmp_path_factory):
    """One capture to a file while eth4 and the native peers do ARP, ping, ping6 and DHCP; SIGINT ends it."""
    need_cmd("dnsmasq")
    from xdpoib.native.client import NativeHost

    tmp = tmp_path_factory.mktemp("capture")
    path, leases = tmp / "session.pcap", tmp / "leases"
    assert capture_slot(lab) is None                               # nothing runs: the slot is empty
    p = start_capture(lab, "-w", str(path))
    try:
        slot = capture_slot(lab)
        assert slot["running"] and slot["direction"] == "both"
        flush(lab)
        r = nsexec(lab["ns"], "ping", "-c", "2", "-i", "0.2", "-W", "3", NATIVE_IP, check=False)
        assert r.returncode == 0, r.stdout
        assert native.ping(XDP_IP, count=2)["received"] == 2
        r = nsexec(lab["ns"], "ping", "-6", "-c", "2", "-i", "0.2", "-W", "3", f"{native_ll(native)}%eth4", check=False)
        assert r.returncode == 0, r.stdout
        server = subprocess.Popen(["ip", "netns", "exec", lab["ns"], "dnsmasq", "--no-daemon", "--port=0",
                                   "--conf-file=/dev/null", "--interface=eth4", "--bind-interfaces", "--no-ping",
                                   f"--dhcp-range={NET}.100,{NET}.150,255.255.255.0,600",
                                   f"--dhcp-leasefile={leases}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            with NativeHost(lab["fab"].name, "h2", dhcp=True) as client:
                lease = client.dhcp(timeout=30)
                client_addr = (client.ready["qpn"], client.ready["gid"])
        finally:
            server.terminate()
            server.wait(10)
        err = finish(p)
    finally:
        if p.poll() is None:
            p.kill()
    return {"path": path, "stderr": err, "rows": tshark_rows(path), "lease": lease, "client": client_addr,
            "native": (native.ready["qpn"], native.ready["gid"]), "native_ll": native_ll(native)}


def test_sigint_stops_cleanly_and_empties_the_slot(lab, session):
    n = len(session["rows"])
    assert n > 10 and f"{n} packets captured (stopped by SIGINT)" in session["stderr"], session["stderr"]
    assert "Traceback" not in session["stderr"] and "dropped" not in session["stderr"]
    assert capture_slot(lab) is None
    assert not [r for r in session["rows"] if r["_ws.malformed"]]
    assert oct(os.stat(session["path"]).st_mode & 0o777) == "0o600"
    assert not list(state.run_dir().glob("capture-*"))              # its socket directory is gone


def test_our_arp_request_carries_the_qpn_and_gid_status_reports(lab, session):
    rows = [r for r in session["rows"] if r["arp.opcode"] == "1" and r["arp.src.proto_ipv4"] == XDP_IP]
    assert rows, "no ARP request from eth4 in the capture"
    r = rows[0]
    assert (r["arp.hw.type"], r["arp.hw.size"]) == ("32", "20")
    # sent to the broadcast group, so with a GRH: our QPN and GID as the source, the MGID as destination
    assert r["ipoib.grh.sqpn"] == qpn_field(lab["qpn"]) and r["ipoib.grh.sgid"] == lab["gid"]
    assert r["ipoib.dgid"] == BCAST_MGID and not r["ipoib.daddr.qpn"]
    sha = bytes.fromhex(r["arp.src.hw"].replace(":", ""))
    assert sha[0] == 0 and int.from_bytes(sha[1:4], "big") == lab["qpn"]
    assert gid_str(sha[4:]) == lab["gid"]


def test_the_native_peers_arp_reply_is_received_from_its_address(lab, session):
    qpn, g = session["native"]
    rows = [r for r in session["rows"] if r["arp.opcode"] == "2" and r["arp.src.proto_ipv4"] == NATIVE_IP]
    assert rows, "no ARP reply from the native peer in the capture"
    r = rows[0]
    assert (r["arp.hw.type"], r["arp.hw.size"]) == ("32", "20")
    assert r["ipoib.grh.sqpn"] == qpn_field(qpn) and r["ipoib.grh.sgid"] == g     # unicast, no GRH: filled in
    assert r["ipoib.dgid"] == lab["gid"]
    sha = bytes.fromhex(r["arp.src.hw"].replace(":", ""))
    assert sha[0] == 0x80 and int.from_bytes(sha[1:4], "big") == qpn          # Linux ib0's flags byte


def test_pings_both_ways_with_the_addresses_of_each_side(lab, session):
    qpn, g = session["native"]
    echo = [r for r in session["rows"] if r["icmp.type"] in ("0", "8")]
    sent = [r for r in echo if r["ipoib.daddr.qpn"]]
    received = [r for r in echo if r["ipoib.grh.sqpn"]]
    assert len(sent) == 4 and len(received) == 4, echo             # 2 requests + 2 replies each way
    assert all(r["ipoib.daddr.qpn"] == qpn_field(qpn) and r["ipoib.dgid"] == g for r in sent)
    assert all(r["ipoib.grh.sqpn"] == qpn_field(qpn) and r["ipoib.grh.sgid"] == g for r in received)
    assert sorted(r["icmp.type"] for r in sent) == sorted(r["icmp.type"] for r in received) == ["0", "0", "8", "8"]


def test_nd_options_are_24_bytes_with_a_correct_checksum(lab, session):
    qpn, _ = session["native"]
    ns = [r for r in session["rows"] if r["icmpv6.type"] == "135"
          and r["icmpv6.nd.ns.target_address"] == session["native_ll"]]
    na = [r for r in session["rows"] if r["icmpv6.type"] == "136" and r["ipoib.grh.sqpn"] == qpn_field(qpn)]
    assert ns and na, "no NS from eth4 or no NA from the native peer"
    # our NS to the native peer's solicited-node group: a GRH, our address as source
    assert ns[0]["ipoib.dgid"] == solicited_node_mgid(session["native_ll"])
    assert ns[0]["ipoib.grh.sqpn"] == qpn_field(lab["qpn"]) and ns[0]["ipoib.grh.sgid"] == lab["gid"]
    for r in (ns[0], na[0]):
        assert r["icmpv6.opt.type"] in ("1", "2") and r["icmpv6.opt.length"] == "3"     # 3 x 8 = 24 bytes
        assert r["icmpv6.checksum.status"] == "1"                                      # Good


def test_the_dhcp_exchange_has_rfc_4390s_form(lab, session):
    qpn, g = session["client"]
    by_type = {}
    for r in session["rows"]:
        if r["dhcp.option.dhcp"]:
            by_type.setdefault(r["dhcp.option.dhcp"], r)
    assert {"1", "2", "3", "5"} <= set(by_type), sorted(by_type)    # discover, offer, request, ack
    for r in by_type.values():
        assert r["dhcp.hw.type"] == "0x20" and r["dhcp.hw.len"] == "0" and r["dhcp.flags.bc"] == "1"
    discover, offer = by_type["1"], by_type["2"]
    # the client broadcasts (received with a GRH, from its address); dnsmasq's answer goes to the group
    assert discover["ipoib.grh.sqpn"] == qpn_field(qpn) and discover["ipoib.grh.sgid"] == g
    assert discover["ipoib.dgid"] == BCAST_MGID
    assert offer["ipoib.grh.sqpn"] == qpn_field(lab["qpn"]) and offer["ipoib.dgid"] == BCAST_MGID


# ================================================================ -w -, -c, one at a time

def test_count_streams_into_tshark_and_stops_after_n(lab, native):
    qpn = native.ready["qpn"]
    cap = start_capture(lab, "-c", "4", "--direction", "in", "-w", "-", stdout=subprocess.PIPE)
    ts = subprocess.Popen(["tshark", "-r", "-", "-T", "fields", "-e", "ipoib.grh.sqpn", "-e", "ipoib.daddr.qpn"],
                          stdin=cap.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cap.stdout.close()
    try:
        assert native.ping(XDP_IP, count=6)["received"] == 6
        err = finish(cap, sig=None)                                 # it ends by itself
        out, terr = ts.communicate(timeout=60)
    finally:
        for p in (cap, ts):
            if p.poll() is None:
                p.kill()
    assert "4 packets captured" in err and "stopped" not in err, err
    assert ts.returncode == 0, terr
    rows = [line.split("\t") for line in out.splitlines()]
    assert len(rows) == 4 and all(s == qpn_field(qpn) and not d for s, d in rows), rows     # all received
    assert capture_slot(lab) is None


def test_sigint_ends_a_stream_into_tshark_cleanly(lab, native):
    cap = start_capture(lab, "-w", "-", stdout=subprocess.PIPE)
    ts = subprocess.Popen(["tshark", "-r", "-", "-T", "fields", "-e", "icmp.type"], stdin=cap.stdout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cap.stdout.close()
    try:
        assert native.ping(XDP_IP, count=3)["received"] == 3
        err = finish(cap)
        out, terr = ts.communicate(timeout=60)
    finally:
        for p in (cap, ts):
            if p.poll() is None:
                p.kill()
    assert ts.returncode == 0, terr                                 # whole records only: nothing cut
    types = out.split()
    assert types.count("8") == 3 and types.count("0") == 3, out
    assert f"{len(out.splitlines())} packets captured (stopped by SIGINT)" in err, err
    assert capture_slot(lab) is None


def test_a_second_capture_is_refused_and_a_dead_client_frees_the_slot(lab, native, tmp_path):
    first = start_capture(lab, "-w", str(tmp_path / "first.pcap"))
    try:
        r = xdpoib("capture", "eth4", "--netns", lab["ns"], "-w", str(tmp_path / "second.pcap"), check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"xdpoib: error: a capture of eth4 in netns {lab['ns']} is already running")
        first.kill()                                                 # no goodbye: the agent sees EOF
        first.wait(10)
        end = time.monotonic() + 5
        while capture_slot(lab) is not None:
            assert time.monotonic() < end, "the agent kept the capture of a dead client"
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()
    # the slot is free again, and the data plane did not notice any of it
    again = start_capture(lab, "-c", "1", "-w", str(tmp_path / "again.pcap"))
    assert native.ping(XDP_IP, count=2)["received"] == 2
    assert "1 packet captured" in finish(again, sig=None)
    assert len(tshark_rows(tmp_path / "again.pcap")) == 1


def test_bad_input_is_one_line(lab, tmp_path):
    r = xdpoib("capture", "eth9", "--netns", lab["ns"], "-w", str(tmp_path / "x.pcap"), check=False)
    assert r.returncode == 1 and r.stderr.startswith("xdpoib: error: eth9 in netns") and "Traceback" not in r.stderr
    r = xdpoib("capture", "eth4", "--netns", lab["ns"], "-w", "/nonexistent/dir/x.pcap", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "xdpoib: error: cannot write /nonexistent/dir/x.pcap: " \
        "No such file or directory"
    r = xdpoib("capture", "eth4", "--netns", lab["ns"], "-w", "x", "-c", "0", check=False)
    assert r.returncode == 2 and "-c: must be a positive integer" in r.stderr
    assert capture_slot(lab) is None
