"""End to end on the production build: a frame sent on eth4 (a veth end in a throwaway netns) meets the
TX program attached natively to the internal end, and arrives translated, with its metadata in front,
on an AF_XDP socket through the XSKMAP."""

from __future__ import annotations

import subprocess
import time
import uuid

import gen
import pytest
from prereq import need_cmd, need_module, need_root

from xdpoib import abi
from xdpoib.reasons import Kind
from xdpoib.wire import frames as f

SEND = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for _ in range(int(sys.argv[3])):
    s.send(bytes.fromhex(sys.argv[2]))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def production():
    """The production build (XSKMAP), loaded for this module's tests only."""
    need_root()
    need_module("bcc")
    from xdpoib.datapath.loader import Build, Datapath

    with Datapath(Build()) as dp:
        yield dp


def test_tx_frames_reach_an_af_xdp_socket_with_metadata(production):
    need_cmd("ip")
    import socket

    from bcc import BPF

    from xdpoib.afxdp import XskSocket
    from xdpoib.datapath.maps import Maps

    tag = uuid.uuid4().hex[:6]
    ns, inner, eth4 = f"xox-{tag}", f"xxi{tag}", f"xxe{tag}"
    xsk = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", eth4)
        sh("ip", "link", "set", eth4, "netns", ns)
        sh("sysctl", "-qw", f"net.ipv6.conf.{inner}.disable_ipv6=1")
        sh("ip", "link", "set", inner, "up")
        sh("ip", "-n", ns, "link", "set", eth4, "up")
        m = Maps.of(production)
        m.clear()
        m.reset_counters()
        m.load(gen.tables())
        BPF.attach_xdp(inner.encode(), production._progs["xdpoib_tx"], 1 << 2)   # XDP_FLAGS_DRV_MODE
        xsk = XskSocket(socket.if_nametoindex(inner), 0, frames=512, ring_size=256, meta_len=32)
        m.xsks.set(0, xsk.fileno())
        vif, peer = gen.VIFS[0], gen.PEERS[0]
        ip = f.ipv4(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 17, f.udp(bytes(4), bytes(4), 9, 9, b"to the fabric"))
        frame = f.eth(peer.mac, vif.mac, 0x0800, ip)
        sh("ip", "netns", "exec", ns, "python3", "-c", SEND, eth4, frame.hex(), "3")
        got, end = [], time.monotonic() + 3
        while len(got) < 3 and time.monotonic() < end:
            got += [(data, meta) for meta, data in xsk.recv(64, timeout=0.1)]
        verdicts = list(m.counters(abi.Direction.TX).verdicts)
        assert len(got) == 3, f"{len(got)} frames on the AF_XDP socket; TX verdicts {verdicts}"
        for data, meta in got:
            assert data == f.ipoib(0x0800, ip)
            md = abi.TxMeta.from_bytes(meta)
            assert (md.version, md.kind, md.pkey, md.vif_id, md.dest_id) == \
                (abi.META_VERSION, Kind.PEER, 0xFFFF, vif.vif_id, peer.peer_id)
    finally:
        if xsk is not None:
            xsk.close()
        subprocess.run(["ip", "link", "del", inner], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_ring_reader_gets_unresolved_reports_without_bcc(production):
    """The mmap ring buffer reader (what an agent with pinned maps uses) sees the TX program's reports."""
    from xdpoib.datapath import testrun
    from xdpoib.datapath.events import RingReader
    from xdpoib.datapath.maps import Maps

    m = Maps.of(production)
    m.clear()
    m.load(gen.tables())
    m.set_config(report_interval_ns=60 * 10**9)
    reader = RingReader(production.map_fd("xo_events"))
    try:
        reader.read()
        ip = f.ipv4(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 3]), 17, f.udp(bytes(4), bytes(4), 1, 2, b"?"))
        for mac in (bytes.fromhex("0a00000000a1"), bytes.fromhex("0a00000000a2"), bytes.fromhex("0a00000000a1")):
            testrun.run(production.fd("xdpoib_tx"), f.eth(mac, gen.VIFS[1].mac, 0x0800, ip, vid=10))
        events = reader.unresolved()
        assert [(bytes(e.dest[:6]).hex(), e.kind, e.pkey, e.vif_id) for e in events] == [
            ("0a00000000a1", Kind.UNRESOLVED, 0x8001, gen.VIFS[1].vif_id),
            ("0a00000000a2", Kind.UNRESOLVED, 0x8001, gen.VIFS[1].vif_id)]
        assert reader.read() == []
    finally:
        reader.close()
