"""`xdpoib bench datapath`: ns per packet of each BPF program as ratios to a no-op XDP program measured
in the same run. This is the bench's front (the JSON object, the table, the ratios); the measuring core
compiles and runs the programs, so it lives with the rest of the bcc-touching code in
`xdpoib.datapath.bench`."""

from __future__ import annotations

from xdpoib.datapath.bench import BenchResult


def measure(repeat: int = 1_000_000, rounds: int = 5, samples: int = 20_000) -> BenchResult:
    """Compile the restore build and time every program (see `xdpoib.datapath.bench`)."""
    from xdpoib.datapath.bench import run_bench

    return run_bench(repeat=repeat, rounds=rounds, samples=samples)


def as_json(res: BenchResult) -> dict:
    """The JSON object `xdpoib bench datapath --json` prints."""
    out: dict = {"noop_ns_per_packet": round(res.noop_ns, 2),
                 "restore_harness_ns_per_packet": round(res.harness_ns, 2)}
    for k, v in res.ns.items():
        out[k] = {"ns_per_packet": round(v, 2), "ratio_to_noop": round(v / res.noop_ns, 2),
                  "single_shot_ns": round(res.single[k], 2),
                  "single_shot_ratio": round(res.single[k] / res.single["noop"], 2)}
    out["noop_single_shot_ns"] = round(res.single["noop"], 2)
    out["repeat"], out["rounds"] = res.repeat, res.rounds
    return out


def format_table(res: BenchResult) -> str:
    """The table `xdpoib bench datapath` prints: ns per packet, ratio to the no-op, single-shot figures."""
    lines = [f"no-op XDP program: {res.noop_ns:7.1f} ns/packet   (repeat {res.repeat}, median of {res.rounds})",
             f"  restore harness: {res.harness_ns:7.1f} ns/packet   (included in each program below)"]
    for k, v in res.ns.items():
        lines.append(f"{k:>17}: {v:7.1f} ns/packet   {v / res.noop_ns:5.2f}x no-op   "
                     f"(single shot, no restore: {res.single[k]:.0f} ns, "
                     f"{res.single[k] / res.single['noop']:.2f}x)")
    return "\n".join(lines)
