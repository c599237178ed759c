"""Upgrades: the pins carry the ABI version and a digest of the build, and an agent adopts them only when
both match (xdpoib/datapath/loader.py, Upgrades).

- The swap itself: two builds of the programs (the default and `test_fill`, whose instructions differ:
  it fills prepended bytes with 0xFF) loaded against the same pinned maps and swapped back and forth
  with XDP_FLAGS_REPLACE on a veth while frames stream through it: every frame meets a program (the
  shared counters see all of them), none slips past during a swap.
- A restarted agent of another build with the same ABI (XDPOIB_BPF_BUILD=test_fill, "the next
  version") replaces the programs and keeps the maps: same map ids, counters carried on, a new program
  attached; pings run throughout and the frames lost over the restart are reported.
- A restarted agent that finds another ABI pinned rebuilds: fresh maps filled from its state file (the
  peers come back with their REMACs), programs replaced, the change logged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from labkit import attached, xdpoib
from prereq import need_cmd, need_module, need_root

from xdpoib import abi, link, state
from xdpoib.datapath import bpfsys, loader

SIM_HOSTS = 2


def x(*args, check=True, env=None):
    return xdpoib(*args, check=check, env=env, timeout=180)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def env_with(build: str | None) -> dict:
    env = dict(os.environ)
    env.pop(loader.BUILD_ENV, None)
    if build:
        env[loader.BUILD_ENV] = build
    return env


# ---------------------------------------------------------------- the swap alone

SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
frame, n, rate = bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic()
for i in range(n):
    s.send(frame)
    if i % 50 == 49:
        late = t0 + (i + 1) / rate - time.monotonic()
        if late > 0:
            time.sleep(late)
"""


def _counter(ifname: str, what: str, netns: str | None = None) -> int:
    cmd = link.in_netns(netns, ["cat", f"/sys/class/net/{ifname}/statistics/{what}"])
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def test_program_swap_under_traffic_loses_no_frame(figures):
    need_root()
    need_module("bcc")
    need_cmd("ip")
    from xdpoib.afxdp import XskSocket
    from xdpoib.datapath.maps import Maps
    from xdpoib.wire import frames as f
    from xdpoib.wire.addr import IPoIBAddr
    from xdpoib.wire.oracle import Peer, Tables, Vif

    tag = uuid.uuid4().hex[:6]
    ns, inner, eth4 = f"xou-{tag}", f"xui{tag}", f"xue{tag}"
    pins = Path(f"/sys/fs/bpf/xdpoib-test-upgrade-{tag}")
    old_env = os.environ.pop(loader.BUILD_ENV, None)
    opened, xsk, stop = [], None, threading.Event()
    try:
        # two builds against one set of maps: default -> test_fill -> default, keeping a fd of each
        assert loader.prepare(pins).action == "fresh"
        dp_a = loader.PinnedDatapath(pins)
        opened.append(dp_a)
        os.environ[loader.BUILD_ENV] = "test_fill"
        assert loader.prepare(pins).action == "replace"
        dp_b = loader.PinnedDatapath(pins)
        opened.append(dp_b)
        tags = {bytes(bpfsys.prog_info(dp.fd("xdpoib_tx"))[0].tag).hex() for dp in (dp_a, dp_b)}
        maps_ids = [sorted(bpfsys.prog_info(dp.fd("xdpoib_tx"))[1]) for dp in (dp_a, dp_b)]
        assert len(tags) == 2, "the two builds have the same instructions"
        assert maps_ids[0] == maps_ids[1], "the second build does not use the same maps"

        vif = Vif(1, bytes.fromhex("f45214000001"), IPoIBAddr(0, 0x100, bytes(range(16))))
        peer = Peer(7, bytes.fromhex("0a0000000007"), IPoIBAddr(0, 0x200, bytes(range(16, 32))))
        m = Maps.of(dp_a)
        m.load(Tables(vifs=[vif], peers=[peer], vlan_pkeys={0: 0xFFFF}))
        m.reset_counters()
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", eth4)
        sh("ip", "link", "set", eth4, "netns", ns)
        sh("sysctl", "-qw", f"net.ipv6.conf.{inner}.disable_ipv6=1")
        sh("ip", "link", "set", inner, "up")
        sh("ip", "-n", ns, "link", "set", eth4, "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{eth4}.disable_ipv6=1")
        dp_a.attach("xdpoib_tx", inner)
        xsk = XskSocket(socket.if_nametoindex(inner), 0, frames=4096, ring_size=2048, meta_len=32)
        m.xsks.set(0, xsk.fileno())
        got = [0]

        def drain():
            while not stop.is_set():
                got[0] += len(xsk.recv(2048, timeout=0.05))
        t = threading.Thread(target=drain, daemon=True)
        t.start()
        ip = f.ipv4(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 17, f.udp(bytes(4), bytes(4), 9, 9, b"swap"))
        frame = f.eth(peer.mac, vif.mac, 0x0800, ip)
        n, rate = 40000, 10000.0
        drops0 = _counter(inner, "rx_dropped") + _counter(eth4, "tx_dropped", ns)
        sender = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SENDER, eth4, frame.hex(),
                                   str(n), str(rate)])
        progs = [dp_b.fd("xdpoib_tx"), dp_a.fd("xdpoib_tx")]
        swaps, expected = 0, dp_a.fd("xdpoib_tx")
        time.sleep(0.3)
        while sender.poll() is None:
            new = progs[swaps % 2]
            link.replace_xdp(inner, new, expected)
            expected, swaps = new, swaps + 1
            time.sleep(0.01)
        assert sender.wait() == 0
        time.sleep(0.5)
        stop.set()
        t.join(timeout=5)
        seen = int(m.counters(abi.Direction.TX).packets)
        veth_drops = _counter(inner, "rx_dropped") + _counter(eth4, "tx_dropped", ns) - drops0
        ring = xsk.kernel_stats()
        lost = n - veth_drops - seen
        figures(f"\nswap under traffic: {swaps} swaps (XDP_FLAGS_REPLACE), {n} frames sent at {rate:.0f}/s, "
                f"{seen} met a program, {got[0]} reached the AF_XDP socket, {veth_drops} dropped by veth "
                f"before XDP, {ring['rx_dropped']} shed at a full ring; frames lost to the swaps: {lost}")
        assert swaps >= 50
        assert lost == 0, f"{lost} frames passed the device while no program was attached"
        # a replace naming the wrong program is refused: nobody else's program is swapped by mistake
        with pytest.raises(link.LinkError):
            link.replace_xdp(inner, progs[0], dp_b.fd("xdpoib_noop"))
    finally:
        stop.set()
        if xsk is not None:
            xsk.close()
        subprocess.run(["ip", "link", "del", inner], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for dp in opened:
            dp.close()
        loader.unpin(pins)
        os.environ.pop(loader.BUILD_ENV, None)
        if old_env is not None:
            os.environ[loader.BUILD_ENV] = old_env


# ---------------------------------------------------------------- restarted agents

@pytest.fixture(scope="module")
def pair(sim_fabric):
    need_cmd("ip", "ping")
    with attached(sim_fabric, ["h1", "h2"], net="10.67.0", prefix="xu", env=env_with(None)) as names:
        yield sim_fabric, names


def ping(ns: str, dst: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "2", dst],
                          capture_output=True).returncode == 0


def status(ns):
    return json.loads(x("status", "eth4", "--netns", ns, "-j").stdout)


def map_ids(pins: Path) -> dict[str, int]:
    from xdpoib.datapath.maps import LAYOUT

    out = {}
    for name in LAYOUT:
        fd = bpfsys.obj_get(str(pins / name))
        try:
            out[name] = bpfsys.map_info(fd).id
        finally:
            os.close(fd)
    return out


def pinned_tx_tag(pins: Path) -> str:
    fd = bpfsys.obj_get(str(pins / "xdpoib_tx"))
    try:
        return bytes(bpfsys.prog_info(fd)[0].tag).hex()
    finally:
        os.close(fd)


def attached_tag(ifname: str) -> str:
    fd = bpfsys.prog_fd_by_id(link.xdp_prog_id(ifname))
    try:
        return bytes(bpfsys.prog_info(fd)[0].tag).hex()
    finally:
        os.close(fd)


def kill_agent(ns: str) -> dict:
    st = status(ns)
    pid = st["attachment"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while state.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return st


class Pinger:
    """`ping -i 0.02` from ns to dst in the background; `result()` -> (sent, received)."""

    def __init__(self, ns: str, dst: str, seconds: float):
        n = int(seconds / 0.02)
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-i", "0.02", "-c", str(n), "-W", "1", dst],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> tuple[int, int]:
        out, _ = self.p.communicate(timeout=120)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)), int(m.group(2))


def restart(fab, ns: str, host: str, build: str | None) -> float:
    """SIGKILL the agent of ns and attach again with `build`; returns the seconds eth4 had no agent."""
    t0 = time.monotonic()
    kill_agent(ns)
    x("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:{host}", env=env_with(build))
    return time.monotonic() - t0


def test_restart_with_new_programs_replaces_them_and_keeps_the_maps(pair, figures):
    fab, (ns1, ns2) = pair
    aid = state.attachment_id("eth4", ns1)
    from xdpoib.pump import pin_dir

    pins = pin_dir(aid)
    assert ping(ns2, "10.67.0.1")
    before = status(ns1)
    internal = before["attachment"]["internal"]
    ids, tag = map_ids(pins), attached_tag(internal)
    assert tag == pinned_tx_tag(pins)
    pinger = Pinger(ns2, "10.67.0.1", 12)
    time.sleep(1.5)
    gap = restart(fab, ns1, "h1", "test_fill")
    sent, received = pinger.result()
    after = status(ns1)
    log_text = state.log_path(aid).read_text()
    figures(f"\nupgrade, same ABI, new programs: agent down {gap:.2f} s (kill -> attach returned, the compile "
            f"included); pings every 20 ms: {sent} sent, {received} answered, {sent - received} lost")
    assert after["counters"].get("datapath_replace") == 1, after["counters"]
    assert after["counters"].get("adopted_datapath") == 1
    assert "upgrading the datapath" in log_text
    assert map_ids(pins) == ids, "the maps were not kept"
    assert loader.read_build_id(pins) == loader.build_id(loader.Build(test_fill=True))
    assert attached_tag(internal) == pinned_tx_tag(pins) != tag, "the new program is not the one attached"
    assert after["datapath"]["tx"]["packets"] >= before["datapath"]["tx"]["packets"], "counters did not carry on"
    assert received > 0 and received >= sent - int(gap / 0.02) - 100, (sent, received, gap)
    assert ping(ns2, "10.67.0.1")


def test_restart_with_another_abi_rebuilds_the_maps_from_the_state_file(pair, figures):
    fab, (ns1, ns2) = pair
    aid = state.attachment_id("eth4", ns1)
    from xdpoib.pump import pin_dir

    pins = pin_dir(aid)
    assert ping(ns1, "10.67.0.2")
    time.sleep(2.5)                                     # the agent saves its peers every 2 s
    peers_before = {p["gid"]: p["remac"] for p in json.loads(x("peers", "eth4", "--netns", ns1, "-j").stdout)}
    assert peers_before
    ids = map_ids(pins)
    pinger = Pinger(ns2, "10.67.0.1", 12)
    time.sleep(1.5)
    t0 = time.monotonic()
    old = kill_agent(ns1)
    have = loader.read_build_id(pins)
    loader.write_build_id(pins, loader.BuildId(abi.ABI_VERSION + 1, have.digest))    # another ABI pinned
    x("attach", "eth4", "--netns", ns1, "--sim", f"{fab.name}:h1", env=env_with(None))
    gap = time.monotonic() - t0
    sent, received = pinger.result()
    after = status(ns1)
    log_text = state.log_path(aid).read_text()
    figures(f"\nupgrade, another ABI: agent down {gap:.2f} s; pings every 20 ms: {sent} sent, {received} "
            f"answered, {sent - received} lost; old tx packets {old['datapath']['tx']['packets']}, "
            f"after {after['datapath']['tx']['packets']}")
    assert after["counters"].get("datapath_rebuild") == 1, after["counters"]
    assert "adopted_datapath" not in after["counters"]
    assert "rebuilding the datapath" in log_text and f"ABI {abi.ABI_VERSION + 1} pinned" in log_text
    assert set(map_ids(pins).values()).isdisjoint(ids.values()), "the maps were not rebuilt"
    assert loader.read_build_id(pins) == loader.build_id(loader.Build())
    peers_after = {p["gid"]: p["remac"] for p in json.loads(x("peers", "eth4", "--netns", ns1, "-j").stdout)}
    assert all(peers_after.get(g) == m for g, m in peers_before.items()), (peers_before, peers_after)
    assert received > 0
    assert ping(ns2, "10.67.0.1")
