"""The measuring core of `xdpoib bench datapath` (its front, the JSON and the table, is
`xdpoib.bench.datapath`): ns per packet of each program via BPF_PROG_TEST_RUN, and of a no-op XDP
program measured in the same run (interleaved rounds, medians).

`restore_harness_ns_per_packet` is what the restore build alone costs (count, save, restore, no
translation): the share of each program's time that production frames do not pay. `single_shot_*`
measure the build without restore, one run per call (repeat 1): the real path plus a fixed per-call
cost that the no-op pays as well.

Uses the restore build, so with repeat > 1 every repetition takes the real path; the counters are
checked afterwards to prove it (every repetition redirected, none dropped).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from xdpoib import abi
from xdpoib.abi import Direction, XdpAction
from xdpoib.datapath import testrun
from xdpoib.errors import XdpoibError

VIF_MAC = bytes.fromhex("020000000001")
VIF_ADDR = bytes([0, 0, 0, 0x48]) + bytes.fromhex("fe800000000000000002c90300001111")
PEER_MAC = bytes.fromhex("060000001000")
PEER_ADDR = bytes([0, 0, 1, 0x00]) + bytes.fromhex("fe800000000000000002c90300002000")


class BenchError(XdpoibError):
    """The benchmark could not measure what it meant to (a program took another path)."""


def _frames() -> dict[str, tuple[str, bytes, bytes]]:
    """program key -> (program, frame, metadata): 64-byte IPv4/UDP, its IPoIB form, a broadcast ARP."""
    from xdpoib.wire import frames as f

    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    # every frame is at least the restore build's 64 saved bytes, so each repeat gets its input back
    ip = f.ipv4(a, b, 17, f.udp(a, b, 1000, 2000, bytes(32)))          # 14 + 60 = 74 bytes (IPoIB: 64)
    eth = f.eth(PEER_MAC, VIF_MAC, 0x0800, ip)
    arp = f.eth(b"\xff" * 6, VIF_MAC, 0x0806, f.arp(1, VIF_MAC, a, bytes(6), b)) + bytes(22)
    rx_meta = abi.rx_meta(7, 1, 0xFFFF)
    return {
        "noop": ("xdpoib_noop", eth, b""),
        "harness": ("xdpoib_harness", eth, b""),
        "tx": ("xdpoib_tx", eth, b""),
        "rx": ("xdpoib_rx", f.ipoib(0x0800, ip), rx_meta),
        "arp": ("xdpoib_tx", arp, b""),
    }


@dataclass
class BenchResult:
    """Median ns per packet of each program and the no-op baseline."""

    noop_ns: float
    harness_ns: float
    ns: dict[str, float]
    repeat: int
    rounds: int
    single: dict[str, float]


def _setup(dp):
    from xdpoib.datapath.maps import Maps

    m = Maps.of(dp)
    m.add_vifs([(1, VIF_MAC, VIF_ADDR)])
    m.add_peers([(7, PEER_MAC, PEER_ADDR)])
    m.set_partitions({0: 0xFFFF})
    m.set_config()
    m.xsks.set(0, 1)
    m.egress.set(0, 1)
    return m


def single_shot(samples: int = 20_000) -> dict[str, float]:
    """Median kernel-reported ns of one run per call (repeat 1) on the build without restore: the
    production path, plus a fixed per-call cost (cold caches, timer) that the no-op pays too."""
    from xdpoib.datapath.loader import Build, Datapath

    frames = _frames()
    frames.pop("harness")
    with Datapath(Build(tx_devmap=True)) as dp:
        _setup(dp)
        out: dict[str, list[int]] = {k: [] for k in frames}
        chunk = min(1000, samples)
        for _ in range(max(1, samples // chunk)):
            for key, (prog, frame, meta) in frames.items():
                fd = dp.fd(prog)
                out[key] += [testrun.run(fd, frame, meta).duration_ns for _ in range(chunk)]
    return {k: float(statistics.median(v)) for k, v in out.items()}


def run_bench(repeat: int = 1_000_000, rounds: int = 5, samples: int = 20_000) -> BenchResult:
    """Compile the restore build, load one VIF and one peer, and measure every program."""
    from xdpoib.datapath.loader import BENCH_BUILD, Datapath

    frames = _frames()
    with Datapath(BENCH_BUILD) as dp:
        m = _setup(dp)
        for key, (prog, frame, meta) in frames.items():
            r = testrun.run(dp.fd(prog), frame, meta)
            want = XdpAction.PASS if key in ("noop", "harness") else XdpAction.REDIRECT
            if r.retval != want or r.frame != frame or r.meta != meta:
                raise BenchError(f"{key}: the restore build did not take the real path and restore the frame "
                                 f"(verdict {r.retval})")
        m.reset_counters()
        timings: dict[str, list[float]] = {k: [] for k in frames}
        for _ in range(rounds):
            for key, (prog, frame, meta) in frames.items():
                timings[key].append(testrun.run(dp.fd(prog), frame, meta, repeat=repeat).duration_ns)
        tx, rx = m.counters(Direction.TX), m.counters(Direction.RX)
        if tx.verdicts[XdpAction.REDIRECT] != 2 * rounds * repeat or rx.verdicts[XdpAction.REDIRECT] != rounds * repeat:
            raise BenchError("not every repetition was redirected: the measured path is not the real one")
    med = {k: float(statistics.median(v)) for k, v in timings.items()}
    return BenchResult(med.pop("noop"), med.pop("harness"), med, repeat, rounds, single_shot(samples))
