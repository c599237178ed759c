"""Injection through live-frames BPF_PROG_TEST_RUN and the devmap: frames reach eth4 on a veth pair and
the reader of a TAP, translated; measured rates are printed (never asserted)."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import time
import uuid

import gen
import numpy as np
import pytest
from prereq import need_cmd

from xdpoib import abi
from xdpoib.datapath.inject import MAX_BATCH, SLOT_FRAME, SLOT_SIZE, Injector, RxRegion
from xdpoib.fabric.base import GRH_LEN, MemoryPool
from xdpoib.wire import frames as f

IP_A, IP_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
UDP = f.ipv4(IP_B, IP_A, 17, f.udp(IP_B, IP_A, 1000, 2000, b"injected"))
PEER, VIF = gen.PEERS[0], gen.VIFS[0]

CAPTURE = r"""
import socket, sys, select
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: an injected frame takes a page of it
s.bind((sys.argv[1], 0))
print("ready", flush=True)
want, got = int(sys.argv[2]), 0
while got < want:
    r, _, _ = select.select([s], [], [], 5)
    if not r:
        break
    data, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING or data[12:14] != b"\x08\x00":
        continue    # only IPv4: the host also sends IPv6 autoconfiguration through the veth
    got += 1
    print(data.hex(), flush=True)
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture
def veth_netns():
    """A throwaway netns holding eth4; its peer (the internal end) stays here. Removed afterwards."""
    need_cmd("ip", "ethtool")
    tag = uuid.uuid4().hex[:6]
    ns, inner, eth4 = f"xot-{tag}", f"xoi{tag}", f"xoe{tag}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", eth4)
        sh("ip", "link", "set", eth4, "netns", ns)
        sh("sysctl", "-qw", f"net.ipv6.conf.{inner}.disable_ipv6=1")
        sh("ip", "link", "set", inner, "up")
        sh("ip", "-n", ns, "link", "set", eth4, "up")
        # docs/design.md §6: a veth peer drops redirected frames unless it has XDP or GRO on
        sh("ip", "netns", "exec", ns, "ethtool", "-K", eth4, "gro", "on")
        yield ns, inner, eth4
    finally:
        subprocess.run(["ip", "link", "del", inner], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _capture(ns: str, dev: str, n: int) -> subprocess.Popen:
    cap = subprocess.Popen(["ip", "netns", "exec", ns, os.path.realpath("/proc/self/exe"), "-c", CAPTURE,
                            dev, str(n)], stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    return cap


def test_live_frames_reach_eth4_over_veth(datapath, maps, veth_netns):
    ns, inner, eth4 = veth_netns
    maps.load(gen.tables())
    inj = Injector(datapath, maps, socket.if_nametoindex(inner))
    n = 20
    cap = subprocess.Popen(["ip", "netns", "exec", ns, os.path.realpath("/proc/self/exe"), "-c", CAPTURE,
                            eth4, str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert cap.stdout.readline().strip() == "ready"
        for _ in range(n):
            inj.send(f.ipoib(0x0800, UDP), PEER.peer_id, VIF.vif_id, 0xFFFF)
        got = [bytes.fromhex(line) for line in cap.stdout]
    finally:
        cap.kill()
        cap.wait()
    assert got and all(g == f.eth(VIF.mac, PEER.mac, 0x0800, UDP) for g in got), got[:1]
    assert len(got) == n
    t0, k = time.perf_counter(), 2000
    for _ in range(k):
        inj.send(f.ipoib(0x0800, UDP), PEER.peer_id, VIF.vif_id, 0xFFFF)
    rate = k / (time.perf_counter() - t0)
    meta = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)
    t0, calls = time.perf_counter(), 10
    for _ in range(calls):
        inj.send_repeated(f.ipoib(0x0800, UDP), meta, 64)
    batched = calls * 64 / (time.perf_counter() - t0)
    print(f"\nveth injection: {rate / 1e3:.0f} kpps one frame per call, {batched / 1e3:.0f} kpps 64 per call")


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


@pytest.fixture
def tap():
    """A TAP device whose fd this test holds (the VM's side); deleted afterwards."""
    need_cmd("ip")
    name = f"xotap{uuid.uuid4().hex[:6]}"
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
        sh("ip", "link", "set", name, "up")
        yield name, fd
    finally:
        os.close(fd)
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _read_frames(fd: int, want: bytes, timeout: float = 2.0) -> int:
    """Count frames equal to want read from a TAP fd (others, e.g. IPv6 router solicitations, skipped)."""
    n, end = 0, time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if not r:
            if n:
                break
            continue
        if os.read(fd, 65535) == want:
            n += 1
    return n


def test_live_frames_reach_a_tap_reader(datapath, maps, tap):
    name, fd = tap
    maps.load(gen.tables())
    inj = Injector(datapath, maps, socket.if_nametoindex(name))
    want = f.eth(VIF.mac, PEER.mac, 0x0800, UDP)
    for _ in range(10):
        inj.send(f.ipoib(0x0800, UDP), PEER.peer_id, VIF.vif_id, 0xFFFF)
    assert _read_frames(fd, want) == 10
    t0, k = time.perf_counter(), 500
    for _ in range(k):
        inj.send(f.ipoib(0x0800, UDP), PEER.peer_id, VIF.vif_id, 0xFFFF)
    rate = k / (time.perf_counter() - t0)
    assert _read_frames(fd, want) > 0          # drain (the TAP queue holds 500 frames by default)
    meta = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)
    inj.send_batch([(f.ipoib(0x0800, UDP), meta)] * 16)
    assert _read_frames(fd, want) == 16
    print(f"\nTAP injection: {rate / 1e3:.0f} kpps one frame per call")


def _udp_frame(i: int) -> bytes:
    return f.ipv4(IP_B, IP_A, 17, f.udp(IP_B, IP_A, 1000, i, b"batched %d" % i))


def test_batched_injection_delivers_distinct_frames_in_order(datapath, maps, veth_netns):
    ns, inner, eth4 = veth_netns
    maps.load(gen.tables())
    inj = Injector(datapath, maps, socket.if_nametoindex(inner))
    n = 32
    items = [(f.ipoib(0x0800, _udp_frame(i)), abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)) for i in range(n)]
    items[5] = (items[5][0], abi.rx_meta(999, VIF.vif_id, 0xFFFF))         # unknown sender: dropped
    cap = _capture(ns, eth4, n - 1)
    try:
        inj.send_batch(items)
        got = [bytes.fromhex(line) for line in cap.stdout]
    finally:
        cap.kill()
        cap.wait()
    want = [f.eth(VIF.mac, PEER.mac, 0x0800, _udp_frame(i)) for i in range(n) if i != 5]
    assert got == want
    st = maps.counters(abi.Direction.RX)
    assert (st.packets, st.verdicts[abi.XdpAction.REDIRECT], st.drops[15]) == (n, n - 1, 1)


def test_flushes_of_one_frame_and_batches_take_their_own_slots(datapath, maps, veth_netns):
    """Flushes of one frame (a ping's: the slot index reset before each call) between batches: every flush
    delivers its own frames, in order, none a stale slot; a frame from an unknown sender is dropped by
    reason."""
    ns, inner, eth4 = veth_netns
    maps.load(gen.tables())
    inj = Injector(datapath, maps, socket.if_nametoindex(inner))
    meta = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)
    sizes = [3, 1, 2, 1]                    # flushes: a batch, one frame, a batch, one frame
    cap = _capture(ns, eth4, sum(sizes))
    want, k = [], 0
    try:
        for size in sizes:
            for _ in range(size):
                assert inj.add(f.ipoib(0x0800, _udp_frame(k)), meta)
                want.append(f.eth(VIF.mac, PEER.mac, 0x0800, _udp_frame(k)))
                k += 1
            assert inj.flush() == size
        assert inj.add(f.ipoib(0x0800, _udp_frame(99)), abi.rx_meta(999, VIF.vif_id, 0xFFFF))
        assert inj.flush() == 1
        got = [bytes.fromhex(line) for line in cap.stdout]
    finally:
        cap.kill()
        cap.wait()
        inj.close()
    assert got == want
    st = maps.counters(abi.Direction.RX)
    assert (st.packets, st.verdicts[abi.XdpAction.REDIRECT], st.drops[15]) == (k + 1, k, 1)


def test_frames_received_into_slots_go_out_where_they_lie_after_the_copied_ones(datapath, maps, veth_netns):
    """Receive slots (`RxRegion`): a pool laid over the region's slots, datagrams written where a QP puts
    them (a GRH, then the frame), queued out of order and with gaps (`add_received`, no copy) behind two
    copied frames: one call delivers the copied ones, then the received ones in the queued order, each
    from its own slot; a second flush of received slots alone starts at its first slot. The region is
    claimed by this process: a second claim gets the next region, and a closed one is free again."""
    ns, inner, eth4 = veth_netns
    maps.load(gen.tables())
    inj = Injector(datapath, maps, socket.if_nametoindex(inner))
    aid = f"test-{uuid.uuid4().hex[:6]}"
    region = RxRegion(maps._fds["xo_inject"], aid)
    other = RxRegion(maps._fds["xo_inject"], aid)
    try:
        assert (region.region, other.region) == (0, 1)
        assert region.base == abi.INJECT_COPY_SLOTS and other.base == region.base + abi.INJECT_RX_SLOTS
        pool = MemoryPool(region.count, GRH_LEN + 2048, **region.pool_args())
        assert region.holds(pool) and not other.holds(pool)
        assert not region.holds(MemoryPool(region.count, GRH_LEN + 2048))
        rows = pool.rows()
        meta = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)
        received = [9, 3, 511, 0, 7]        # buffer indices, in completion order
        for k, i in enumerate(received):    # what a QP writes: a GRH (garbage here), then the datagram
            fr = f.ipoib(0x0800, _udp_frame(100 + k))
            rows[i, :GRH_LEN] = 0xEE
            rows[i, GRH_LEN:GRH_LEN + len(fr)] = np.frombuffer(fr, np.uint8)
        raw = bytes(region.mmap[region.base * SLOT_SIZE + SLOT_FRAME + 9 * SLOT_SIZE + GRH_LEN:][:4])
        assert raw == f.ipoib(0x0800, b"")[:4]      # buffer 9 is slot base + 9's frame area, past the GRH
        lengths = np.array([len(f.ipoib(0x0800, _udp_frame(100 + k))) for k in range(len(received))])
        cap = _capture(ns, eth4, 2 + len(received) + 2)
        try:
            for k in range(2):
                assert inj.add(f.ipoib(0x0800, _udp_frame(k)), meta)
            inj.add_received(region.base + np.array(received), lengths, np.full(len(received), PEER.peer_id),
                             np.zeros(len(received), np.uint8), VIF.vif_id, 0xFFFF)
            assert inj.flush() == 2 + len(received)
            inj.add_received(region.base + np.array([3, 0]), lengths[[1, 3]], np.full(2, PEER.peer_id),
                             np.zeros(2, np.uint8), VIF.vif_id, 0xFFFF)
            assert inj.flush() == 2
            got = [bytes.fromhex(line) for line in cap.stdout]
        finally:
            cap.kill()
            cap.wait()
        want = ([f.eth(VIF.mac, PEER.mac, 0x0800, _udp_frame(k)) for k in range(2)]
                + [f.eth(VIF.mac, PEER.mac, 0x0800, _udp_frame(100 + k)) for k in range(len(received))]
                + [f.eth(VIF.mac, PEER.mac, 0x0800, _udp_frame(100 + k)) for k in (1, 3)])
        assert got == want
        st = maps.counters(abi.Direction.RX)
        assert (st.packets, st.verdicts[abi.XdpAction.REDIRECT]) == (len(want), len(want))
        del rows, pool
        region.close()
        again = RxRegion(maps._fds["xo_inject"], aid)
        assert again.region == 0
        again.close()
    finally:
        inj.close()
        region.close()
        other.close()


def test_more_received_frames_than_one_call_takes_go_in_several_calls_in_order(datapath, maps, veth_netns):
    """A copied frame and 300 received in place (more than a call takes: MAX_BATCH, 240): one flush makes
    three calls (the copied frame, then 240 and 60 received), every frame delivered once, in order, none
    lost to the veth's receive ring (256 deep; a call of 256 behind the copied frame lost one)."""
    ns, inner, eth4 = veth_netns
    maps.load(gen.tables())
    inj = Injector(datapath, maps, socket.if_nametoindex(inner))
    region = RxRegion(maps._fds["xo_inject"], f"test-{uuid.uuid4().hex[:6]}")
    try:
        pool = MemoryPool(region.count, GRH_LEN + 2048, **region.pool_args())
        rows, k = pool.rows(), 300
        order = np.random.default_rng(7).permutation(region.count)[:k]
        for j, i in enumerate(order):
            fr = f.ipoib(0x0800, _udp_frame(j))
            rows[i, GRH_LEN:GRH_LEN + len(fr)] = np.frombuffer(fr, np.uint8)
        lengths = np.array([len(f.ipoib(0x0800, _udp_frame(j))) for j in range(k)])
        meta = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)
        cap = _capture(ns, eth4, k + 1)
        try:
            assert inj.add(f.ipoib(0x0800, _udp_frame(999)), meta)
            inj.add_received(region.base + order, lengths, np.full(k, PEER.peer_id), np.zeros(k, np.uint8),
                             VIF.vif_id, 0xFFFF)
            assert inj.flush() == k + 1
            got = [bytes.fromhex(line) for line in cap.stdout]
        finally:
            cap.kill()
            cap.wait()
        want = [f.eth(VIF.mac, PEER.mac, 0x0800, _udp_frame(j)) for j in (999, *range(k))]
        assert [j for j, w in enumerate(want) if w not in got] == []
        assert got == want
        del rows, pool
    finally:
        inj.close()
        region.close()


def test_injection_rates(datapath, maps, veth_netns):
    """Prints kpps of single and batched injection, with and without the anchor (never asserted)."""
    _, inner, _ = veth_netns
    maps.load(gen.tables())
    inj = Injector(datapath, maps, socket.if_nametoindex(inner))
    meta = abi.rx_meta(PEER.peer_id, VIF.vif_id, 0xFFFF)
    batch = [(f.ipoib(0x0800, _udp_frame(i)), meta) for i in range(MAX_BATCH)]

    def rate(fn, per_call: int, seconds: float = 0.5) -> float:
        t0, calls = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            fn()
            calls += 1
        return calls * per_call / (time.perf_counter() - t0) / 1e3

    one = rate(lambda: inj.send(batch[0][0], PEER.peer_id, VIF.vif_id, 0xFFFF), 1)
    plain = rate(lambda: inj.send_batch(batch[:64]), 64)
    anchor_dev = f"xoa{uuid.uuid4().hex[:6]}"
    sh("ip", "link", "add", anchor_dev, "type", "veth", "peer", "name", anchor_dev + "p")
    try:
        datapath.attach("xdpoib_rx_batch", anchor_dev)     # the anchor, as the pump makes one
        b64 = rate(lambda: inj.send_batch(batch[:64]), 64)
        b256 = rate(lambda: inj.send_batch(batch), MAX_BATCH)
    finally:
        subprocess.run(["ip", "link", "del", anchor_dev], capture_output=True)
    print(f"\nveth injection kpps: 1/call {one:.0f}; 64/call {plain:.0f} (no anchor), "
          f"{b64:.0f} (anchor); {MAX_BATCH}/call {b256:.0f} (anchor)")
