"""Injection prototype (b): AF_XDP TX on the internal veth end, each frame behind an Ethernet header
addressed to eth4 (EtherType 0x88B5) and its RX metadata; xdpoib_rx_inband on eth4 strips them and
translates. Delivery is asserted; rates are printed for docs/datapath.md, never asserted."""

from __future__ import annotations

import select
import socket
import subprocess
import time
import uuid
from pathlib import Path

import gen
import pytest
from prereq import need_cmd, need_module, need_root

from xdpoib import abi
from xdpoib.abi import Direction, XdpAction
from xdpoib.wire import frames as f


def mac_of(dev: str) -> bytes:
    """The MAC of a local interface."""
    return bytes.fromhex(Path(f"/sys/class/net/{dev}/address").read_text().strip().replace(":", ""))


@pytest.fixture
def veth_pair():
    need_root()
    need_cmd("ip")
    need_module("bcc")
    tag = uuid.uuid4().hex[:6]
    inner, eth4 = f"xbi{tag}", f"xbe{tag}"
    try:
        subprocess.run(["ip", "link", "add", inner, "type", "veth", "peer", "name", eth4], check=True)
        for dev in (inner, eth4):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"], check=True)
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        yield inner, eth4
    finally:
        subprocess.run(["ip", "link", "del", inner], capture_output=True)


def test_af_xdp_tx_with_inband_header_reaches_eth4(datapath, maps, veth_pair):
    from bcc import BPF

    from xdpoib.afxdp import XskSocket

    inner, eth4 = veth_pair
    maps.load(gen.tables())
    peer, vif = gen.PEERS[0], gen.VIFS[0]
    eth4_mac, inner_mac = mac_of(eth4), mac_of(inner)
    BPF.attach_xdp(eth4.encode(), datapath._progs["xdpoib_rx_inband"], 1 << 2)

    def inband(i: int) -> bytes:
        ip = f.ipv4(bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), 17, f.udp(bytes(4), bytes(4), 7, i, b"inband"))
        sent = (eth4_mac + inner_mac + abi.ETH_P_INBAND.to_bytes(2, "big") +
                abi.rx_meta(peer.peer_id, vif.vif_id, 0xFFFF) + f.ipoib(0x0800, ip))
        return sent, f.eth(vif.mac, peer.mac, 0x0800, ip)

    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    cap.bind((eth4, 0))
    xsk = XskSocket(socket.if_nametoindex(inner), 0, frames=512, ring_size=256, meta_len=32)
    try:
        pairs = [inband(i) for i in range(8)]
        xsk.send([p for p, _ in pairs])
        got, end = [], time.monotonic() + 3
        while len(got) < 8 and time.monotonic() < end:
            if select.select([cap], [], [], 0.2)[0]:
                data, addr = cap.recvfrom(65535)
                if addr[2] != socket.PACKET_OUTGOING:
                    got.append(data)
        assert got == [want for _, want in pairs]
        # rates: offered by AF_XDP TX, counted by the RX counters on eth4
        for batch in (1, 64):
            frames = [inband(i)[0] for i in range(batch)]
            maps.reset_counters()
            t0, sent = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.5:
                xsk.send(frames)
                sent += batch
            dt = time.perf_counter() - t0
            passed = maps.counters(Direction.RX).verdicts[XdpAction.PASS]
            print(f"\nAF_XDP TX + in-band, batch {batch}: offered {sent / dt / 1e3:.0f} kpps, "
                  f"translated on eth4 {passed / dt / 1e3:.0f} kpps")
    finally:
        xsk.close()
        cap.close()
        BPF.remove_xdp(eth4.encode(), 1 << 2)
