"""Differential tests: the BPF programs against the pure oracle, byte for byte, over >= 10,000
generated frames per direction (hypothesis draws the seeds of 250 frames per example) and 100,000
malformed frames; the per-CPU counters must add up to exactly one verdict per packet."""

from __future__ import annotations

import random
from collections import Counter

import gen
import pytest
from dpcheck import MIN_XDP, DropWatcher, compare, rx_actual, rx_expected, tx_actual, tx_expected
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdpoib import abi
from xdpoib.abi import Direction, XdpAction

FRAMES_PER_EXAMPLE = 250
EXAMPLES = 41           # 41 * 250 = 10,250 frames per direction
MALFORMED = 100_000
BULK = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
# One drawn seed per frame: hypothesis' buffer is too small to drive every byte of 250 frames.
SEEDS = st.lists(st.integers(0, 2**32 - 1), min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE)


@pytest.fixture
def loaded(maps):
    """Maps holding the generator's tables and groups."""
    maps.load(gen.tables())
    for mgid, gid in gen.GROUPS.items():
        maps.set_group(mgid, gid)
    return maps


def check_counters(maps, direction: Direction, runs: int, verdicts: Counter, drops: Counter) -> None:
    """Every packet counted once on entry, one verdict each, drops by reason, kinds add up."""
    s = maps.counters(direction)
    assert s.packets == runs
    assert sum(s.verdicts) == runs
    for v in XdpAction:
        assert s.verdicts[v] == verdicts.get(v, 0), f"verdict {v.name}"
    assert sum(s.drops) == s.verdicts[XdpAction.DROP]
    for reason, n in drops.items():
        assert s.drops[reason] == n, f"drops of reason {reason}"
    handed = s.verdicts[XdpAction.REDIRECT] + (s.verdicts[XdpAction.PASS] if direction == Direction.RX else 0)
    assert sum(s.kinds) == handed


def run_tx(datapath, maps, frames) -> tuple[list[str], Counter, Counter, int]:
    t, groups = gen.tables(), gen.GROUPS
    watch = DropWatcher(maps, Direction.TX)
    errors, verdicts, drops, runs = [], Counter(), Counter(), 0
    for fr in frames:
        if len(fr) < MIN_XDP:
            continue
        want, got = tx_expected(fr, t, groups), tx_actual(datapath, fr)
        runs += 1
        verdicts[got.verdict] += 1
        last = watch.last() if got.verdict == XdpAction.DROP else None
        if got.verdict == XdpAction.DROP:
            drops[last] += 1
        err = compare("TX", fr, want, got, last)
        if err:
            errors.append(err)
    return errors, verdicts, drops, runs


def run_rx(datapath, maps, cases) -> tuple[list[str], Counter, Counter, int]:
    t = gen.tables()
    watch = DropWatcher(maps, Direction.RX)
    errors, verdicts, drops, runs = [], Counter(), Counter(), 0
    for fr, src, vif, pkey, mc in cases:
        if len(fr) < MIN_XDP:
            continue
        want = rx_expected(fr, t, src, vif, pkey, mc)
        got = rx_actual(datapath, fr, abi.rx_meta(src.peer_id, vif.vif_id, pkey, multicast=mc))
        runs += 1
        verdicts[got.verdict] += 1
        last = watch.last() if got.verdict == XdpAction.DROP else None
        if got.verdict == XdpAction.DROP:
            drops[last] += 1
        err = compare(f"RX (peer {src.peer_id} vif {vif.vif_id} pkey {pkey:#06x} mcast {mc})", fr, want, got,
                      last, ipoib_in=True)
        if err:
            errors.append(err)
    return errors, verdicts, drops, runs


def _report(errors: list[str], runs: int) -> str:
    return f"{len(errors)} of {runs} frames differ; first ones:\n\n" + "\n\n".join(errors[:3])


def test_tx_matches_oracle_on_generated_frames(datapath, loaded):
    seen = Counter()

    @BULK
    @given(SEEDS)
    def check(seeds):
        rs = [random.Random(s) for s in seeds]
        loaded.reset_counters()
        frames = [gen.eth_frame(r) for r in rs]
        errors, verdicts, drops, runs = run_tx(datapath, loaded, frames)
        seen.update(verdicts)
        seen["runs"] += runs
        assert not errors, _report(errors, runs)
        check_counters(loaded, Direction.TX, runs, verdicts, drops)

    check()
    assert seen["runs"] >= 10_000
    assert seen[XdpAction.REDIRECT] > seen["runs"] // 3, "the generator should mostly make translatable frames"


def test_rx_matches_oracle_on_generated_frames(datapath, loaded):
    seen = Counter()

    @BULK
    @given(SEEDS)
    def check(seeds):
        rs = [random.Random(s) for s in seeds]
        loaded.reset_counters()
        cases = [gen.rx_case(r, gen.ipoib_frame(r)) for r in rs]
        errors, verdicts, drops, runs = run_rx(datapath, loaded, cases)
        seen.update(verdicts)
        seen["runs"] += runs
        assert not errors, _report(errors, runs)
        check_counters(loaded, Direction.RX, runs, verdicts, drops)

    check()
    assert seen["runs"] >= 10_000
    assert seen[XdpAction.REDIRECT] > seen["runs"] // 3


def test_malformed_frames_drop_with_the_oracles_reason_or_match(datapath, loaded):
    rng = random.Random(20261122)
    tx_frames, rx_cases = [], []
    while len(tx_frames) + len(rx_cases) < MALFORMED:
        tx_frames += gen.mangle(rng, gen.eth_frame(rng))
        # mangle() works on Ethernet offsets: mangle a 10-byte prefix + the IPoIB frame, cut it off again
        rx_cases += [gen.rx_case(rng, m[10:]) for m in gen.mangle(rng, b"\x00" * 10 + gen.ipoib_frame(rng))
                     if len(m) >= 10 + MIN_XDP]
    loaded.reset_counters()
    errors, verdicts, drops, runs = run_tx(datapath, loaded, tx_frames)
    assert not errors, _report(errors, runs)
    check_counters(loaded, Direction.TX, runs, verdicts, drops)
    errors, rverdicts, rdrops, rruns = run_rx(datapath, loaded, rx_cases)
    assert not errors, _report(errors, rruns)
    check_counters(loaded, Direction.RX, rruns, rverdicts, rdrops)
    assert runs + rruns >= MALFORMED
    assert verdicts[XdpAction.DROP] > runs // 4 and rverdicts[XdpAction.DROP] > rruns // 4
