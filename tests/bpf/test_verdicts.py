"""Exactly one verdict per packet, on every program of every build: each run is counted once on entry
and its returned action once in the verdict counters (a drop also once by reason), whatever path it
takes. Inputs mix generated frames, malformed ones and bad metadata, so most exits of each program run."""

from __future__ import annotations

import random
from collections import Counter

import gen
import pytest
from dpcheck import MIN_XDP
from prereq import need_module, need_root

from xdpoib import abi
from xdpoib.abi import Direction, XdpAction

SEED = 20240611
ETH_FRAMES = 150


def eth_inputs(r) -> list[tuple[bytes, bytes]]:
    """Ethernet frames (valid and malformed), no metadata."""
    out = []
    for _ in range(ETH_FRAMES):
        fr = gen.eth_frame(r)
        out.append(fr)
        out += r.sample(gen.mangle(r, fr), 2)
    out.append(bytes(MIN_XDP))
    return [(fr, b"") for fr in out if len(fr) >= MIN_XDP]


def rx_inputs(r) -> list[tuple[bytes, bytes]]:
    """IPoIB frames with receive metadata: good, of another version, of unknown peers and VIFs, missing."""
    out = []
    for _ in range(ETH_FRAMES):
        fr, src, vif, pkey, mc = gen.rx_case(r, gen.ipoib_frame(r))
        fr = fr.ljust(MIN_XDP, b"\0")
        meta = abi.rx_meta(src.peer_id, vif.vif_id, pkey, multicast=mc)
        out.append((fr, meta))
        bad, eth = bytearray(meta), bytearray(meta)
        bad[0] ^= 0xFF                                          # another metadata version
        eth[1] = abi.RX_F_ETHERNET                              # an agent-built Ethernet frame
        out += [(fr, bytes(bad)), (fr, b""),
                (fr, abi.rx_meta(0xDEAD, vif.vif_id, pkey)), (fr, abi.rx_meta(src.peer_id, 0xBEEF, pkey)),
                (gen.eth_frame(r), bytes(eth))]
    return out


def slot_inputs(r) -> list[tuple[bytes, bytes]]:
    """Frames for the injection slots: what rx_inputs has, plus lengths a slot must refuse."""
    out = [(fr, meta.ljust(16, b"\0")) for fr, meta in rx_inputs(r)]
    return [*out, (b"", bytes(16)), (bytes(8), bytes(16)), (bytes(abi.INJECT_MAX + 1), bytes(16))]


def prepare(dp):
    """The datapath's maps holding the generator's tables, counters zeroed."""
    from xdpoib.datapath.maps import Maps

    m = Maps.of(dp)
    m.clear()
    m.load(gen.tables())
    for mgid, gid in gen.GROUPS.items():
        m.set_group(mgid, gid)
    m.xsks.set(0, 1)
    m.egress.set(0, 1)
    m.set_config()
    m.reset_counters()
    return m


def run_plain(dp, name: str, inputs) -> Counter:
    from xdpoib.datapath import testrun

    fd = dp.fd(name)
    return Counter(XdpAction(testrun.run(fd, fr, meta).retval) for fr, meta in inputs)


def run_batch(dp, maps, inputs) -> Counter:
    """xdpoib_rx_batch as the injector drives it: slot i filled, run i of the call takes it."""
    from xdpoib.datapath import testrun

    fd = dp.fd("xdpoib_rx_batch")
    got: Counter = Counter()
    for start in range(0, len(inputs), abi.INJECT_SLOTS):
        chunk = inputs[start:start + abi.INJECT_SLOTS]
        for i, (fr, meta) in enumerate(chunk):
            slot = abi.InjectSlot(len=len(fr), next=i + 1)
            slot.meta = abi.RxMeta.from_bytes(meta)
            slot.frame[:len(fr)] = fr
            maps.inject.set(i, slot)
        maps.inject_idx.set(0, 0)
        for _ in chunk:
            got[XdpAction(testrun.run(fd, bytes(64)).retval)] += 1
    return got


def check_one_verdict_each(maps, returned: Counter) -> None:
    runs = sum(returned.values())
    packets = verdicts = 0
    counted: Counter = Counter()
    for d in Direction:
        s = maps.counters(d)
        assert sum(s.verdicts) == s.packets, f"{d.name}: {s.packets} packets, {sum(s.verdicts)} verdicts"
        assert sum(s.drops) == s.verdicts[XdpAction.DROP], f"{d.name}: a drop without its reason"
        packets += s.packets
        verdicts += sum(s.verdicts)
        for a in XdpAction:
            counted[a] += s.verdicts[a]
    assert packets == runs, f"{runs} runs, {packets} counted on entry"
    assert verdicts == runs
    assert {a: n for a, n in counted.items() if n} == dict(returned), "recorded verdicts differ from returned ones"


INPUTS = {
    "xdpoib_tx": eth_inputs, "xdpoib_rx": rx_inputs, "xdpoib_rx_batch": slot_inputs,
    "xdpoib_noop": eth_inputs, "xdpoib_tx_raw": eth_inputs, "xdpoib_harness": eth_inputs,
}


@pytest.fixture(scope="module")
def bench_datapath():
    """The benchmark build (restore, devmap): it has xdpoib_harness besides every program."""
    need_root()
    need_module("bcc")
    from xdpoib.datapath.loader import BENCH_BUILD, Datapath

    dp = Datapath(BENCH_BUILD)
    yield dp
    dp.close()


def test_every_program_has_inputs():
    from xdpoib.datapath.loader import PROGRAMS

    assert set(PROGRAMS) | {"xdpoib_harness"} == set(INPUTS)


CASES = [(b, n) for b in ("test", "bench") for n in sorted(INPUTS) if b == "bench" or n != "xdpoib_harness"]


@pytest.mark.parametrize(("build", "name"), CASES, ids=[f"{b}-{n}" for b, n in CASES])
def test_one_verdict_per_packet(request, build, name):
    dp = request.getfixturevalue("datapath" if build == "test" else "bench_datapath")
    maps = prepare(dp)
    inputs = INPUTS[name](random.Random(f"{SEED}-{name}"))
    returned = run_batch(dp, maps, inputs) if name == "xdpoib_rx_batch" else run_plain(dp, name, inputs)
    if name in ("xdpoib_tx", "xdpoib_rx", "xdpoib_rx_batch"):
        assert returned[XdpAction.DROP] and len(returned) >= 2, returned     # more than one exit was taken
    check_one_verdict_each(maps, returned)
