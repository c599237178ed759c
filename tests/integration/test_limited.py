"""Limited partition membership as InfiniBand defines it, with a real OpenSM partitions file.

P_Key 0x8005's partition is `0x0005` in OpenSM's file: h1 and h2 are limited members (their P_Key
tables hold 0x0005), h3 is a full member (0x8005). All three attach with `--pkey 0x8005`, as a Linux
`ib0.8005` child would. IBA 10.9.3: a packet is accepted when the P_Keys match in their low 15 bits
and at least one of the two is a full member. So h1 <-> h3 and h2 <-> h3 talk (ARP, ping, TCP with a
payload check), h1 <-> h2 cannot: h2's QP drops h1's broadcast ARP and its unicast alike, counted as
a P_Key mismatch by the receiving port, and neither learns the other. The SA still lists all three in
the partition's broadcast group: limited members may join, as ipoib's do.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile

import pytest
from conftest import fabric_name, need_sim
from labkit import namespaces, nsexec, xdpoib
from prereq import need_cmd

NET = "10.85.0"
SERVER = r"""
import hashlib, socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
s.settimeout(30)
c, _ = s.accept()
c.settimeout(30)
h, n = hashlib.sha256(), 0
while chunk := c.recv(65536):
    h.update(chunk); n += len(chunk)
c.sendall(f"{n} {h.hexdigest()}".encode())
c.close()
"""
CLIENT = r"""
import os, socket, sys
data = bytes.fromhex(sys.argv[3]) * (int(sys.argv[4]) // 32)
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(data); c.shutdown(socket.SHUT_WR)
print(c.recv(200).decode())
"""


@pytest.fixture(scope="module")
def lab():
    need_sim()
    need_cmd("ip", "ping", "saquery")
    from xdpoib.fabric.simfabric import SimFabric, make_hosts

    h1, h2, h3 = make_hosts(3)          # the port GUIDs the fabric gives h1..h3
    with tempfile.NamedTemporaryFile("w", prefix="xdpoib-parts-", suffix=".conf") as parts:
        parts.write("Default=0x7fff, ipoib, mtu=4 : ALL=full;\n"
                    f"P5=0x0005, ipoib, mtu=4 : {h1.guid:#018x}=limited, {h2.guid:#018x}=limited, "
                    f"{h3.guid:#018x}=full;\n")
        parts.flush()
        fab = SimFabric.up(fabric_name("l"), hosts=3, partitions=parts.name)
    try:
        with namespaces("xl", 3, lo=True) as ns:
            for i, n in enumerate(ns, 1):
                xdpoib("attach", "eth4", "--netns", n, "--sim", f"{fab.name}:h{i}", "--pkey", "0x8005")
                subprocess.run(["ip", "-n", n, "addr", "add", f"{NET}.{i}/24", "dev", "eth4"], check=True)
            yield fab, ns
    finally:
        fab.down()


def _status(ns: str) -> dict:
    return json.loads(xdpoib("status", "eth4", "--netns", ns, "-j").stdout)


def _ping(ns: str, dst: str) -> bool:
    return nsexec(ns, "ping", "-c", "2", "-i", "0.3", "-W", "2", dst, check=False).returncode == 0


def _tcp(server_ns: str, server_ip: str, client_ns: str, port: int, size: int = 1 << 20) -> tuple[str, str]:
    """A TCP transfer of `size` bytes; returns (what the server counted, what the client sent)."""
    pattern = hashlib.sha256(f"{server_ns}{port}".encode()).hexdigest()
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "python3", "-c", SERVER, str(port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(50):
            if f":{port:04X}" in nsexec(server_ns, "cat", "/proc/net/tcp").stdout:
                break
            subprocess.run(["sleep", "0.1"])
        out = nsexec(client_ns, "python3", "-c", CLIENT, server_ip, str(port), pattern, str(size), timeout=60)
        data = bytes.fromhex(pattern) * (size // 32)
        return out.stdout.strip(), f"{len(data)} {hashlib.sha256(data).hexdigest()}"
    finally:
        srv.kill()
        srv.wait()


def test_ports_hold_the_membership_the_partitions_file_gives(lab):
    _fab, ns = lab
    for i, n in enumerate(ns, 1):
        st = _status(n)
        table = [int(k, 16) for k in st["port"]["pkeys"]]
        want = 0x8005 if i == 3 else 0x0005
        assert want in table, f"h{i}: P_Key table {[hex(k) for k in table]} lacks {want:#06x}"


def test_a_limited_and_a_full_member_talk(lab):
    _fab, ns = lab
    assert _ping(ns[0], f"{NET}.3"), "limited h1 cannot ping full h3"
    assert _ping(ns[2], f"{NET}.2"), "full h3 cannot ping limited h2"
    got, sent = _tcp(ns[2], f"{NET}.3", ns[0], 5105)
    assert got == sent, f"TCP h1 -> h3: server saw {got!r}, client sent {sent!r}"
    got, sent = _tcp(ns[1], f"{NET}.2", ns[2], 5106)
    assert got == sent, f"TCP h3 -> h2: server saw {got!r}, client sent {sent!r}"


def test_two_limited_members_cannot_talk(lab):
    _fab, ns = lab
    before = _status(ns[1])["fabric_drops"].get("pkey_mismatch", 0)
    assert not _ping(ns[0], f"{NET}.2"), "limited h1 reached limited h2"
    assert not _ping(ns[1], f"{NET}.1"), "limited h2 reached limited h1"
    after = _status(ns[1])["fabric_drops"].get("pkey_mismatch", 0)
    assert after > before, f"h2's port did not count h1's packets as a P_Key mismatch ({before} -> {after})"
    neigh = nsexec(ns[0], "ip", "neigh", "show", f"{NET}.2", "dev", "eth4").stdout
    assert "lladdr" not in neigh or "FAILED" in neigh or "INCOMPLETE" in neigh, f"h1 learnt h2: {neigh}"


def test_the_sa_lists_every_member_in_the_broadcast_group(lab):
    import ipaddress

    fab, ns = lab
    out = fab.saquery("h3", "--smkey", "1", "MCMR", "--mgid", "ff12:401b:8005::ffff:ffff").stdout
    listed = {str(ipaddress.ip_address(w.split(".")[-1])) for w in out.split() if w.count(":") >= 2}
    for i, n in enumerate(ns, 1):
        gid = str(ipaddress.ip_address(_status(n)["port"]["gid"]))
        assert gid in listed, f"h{i} ({gid}) is not in 0x8005's broadcast group:\n{out[-1500:]}"
