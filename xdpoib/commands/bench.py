"""`xdpoib bench datapath`: cost of the BPF programs per packet, as ratios to a no-op program."""

from __future__ import annotations

import json

NAME = "bench"
HELP = "measure the BPF datapath (ns per packet, ratio to a no-op XDP program)"
EPILOG = """examples:
  xdpoib bench datapath                 table of ns/packet and ratios (repeat 1e6, 5 rounds)
  xdpoib bench datapath --json          one JSON object: noop_ns_per_packet, tx, rx, arp
  xdpoib bench datapath --repeat 100000 --rounds 3    quicker, noisier
"""


def configure(p):
    p.add_argument("what", choices=["datapath"], help="what to measure")
    p.add_argument("-j", "--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeat", type=int, default=1_000_000, help="test_run repetitions per sample")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    p.add_argument("--samples", type=int, default=20_000, help="single-shot calls per program")


def run(args) -> int:
    from xdpoib.datapath.bench import run_bench
    from xdpoib.errors import UsageError

    if args.repeat < 1 or args.rounds < 1 or args.samples < 1:
        raise UsageError("--repeat, --rounds and --samples must be positive")
    res = run_bench(repeat=args.repeat, rounds=args.rounds, samples=args.samples)
    if args.json:
        print(json.dumps(res.as_json()))
        return 0
    print(f"no-op XDP program: {res.noop_ns:7.1f} ns/packet   (repeat {res.repeat}, median of {res.rounds})")
    print(f"  restore harness: {res.harness_ns:7.1f} ns/packet   (included in each program below)")
    for k, v in res.ns.items():
        print(f"{k:>17}: {v:7.1f} ns/packet   {v / res.noop_ns:5.2f}x no-op   "
              f"(single shot, no restore: {res.single[k]:.0f} ns, {res.single[k] / res.single['noop']:.2f}x)")
    return 0
