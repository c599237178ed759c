"""`xdpoib bench datapath|e2e`: the BPF programs' cost per packet as ratios to a no-op program, and
end-to-end throughput of two attached hosts per datapath, measured in the same run."""

from __future__ import annotations

import json

NAME = "bench"
HELP = "measure the BPF datapath (ns/packet vs a no-op) or two hosts end to end (per datapath)"
EPILOG = """examples:
  xdpoib bench datapath                 table of ns/packet and ratios (repeat 1e6, 5 rounds)
  xdpoib bench datapath --json          one JSON object: noop_ns_per_packet, tx, rx, arp
  xdpoib bench datapath --repeat 100000 --rounds 3    quicker, noisier
  xdpoib bench e2e --json               UDP flood between two hosts on a sim fabric: bpf vs plain
  xdpoib bench e2e --seconds 2 --rounds 1               quicker, noisier
"""


def configure(p):
    p.add_argument("what", choices=["datapath", "e2e"], help="what to measure")
    p.add_argument("-j", "--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeat", type=int, default=1_000_000, help="test_run repetitions per sample")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds, the median is reported (datapath: 5, e2e: 3)")
    p.add_argument("--seconds", type=float, default=5.0, help="e2e: seconds of traffic per measurement")
    p.add_argument("--samples", type=int, default=20_000, help="single-shot calls per program")


def run(args) -> int:
    from xdpoib.datapath.bench import run_bench
    from xdpoib.errors import UsageError

    if args.repeat < 1 or (args.rounds is not None and args.rounds < 1) or args.samples < 1 or args.seconds <= 0:
        raise UsageError("--repeat, --rounds, --samples and --seconds must be positive")
    if args.what == "e2e":
        return run_e2e_cli(args)
    res = run_bench(repeat=args.repeat, rounds=args.rounds or 5, samples=args.samples)
    if args.json:
        print(json.dumps(res.as_json()))
        return 0
    print(f"no-op XDP program: {res.noop_ns:7.1f} ns/packet   (repeat {res.repeat}, median of {res.rounds})")
    print(f"  restore harness: {res.harness_ns:7.1f} ns/packet   (included in each program below)")
    for k, v in res.ns.items():
        print(f"{k:>17}: {v:7.1f} ns/packet   {v / res.noop_ns:5.2f}x no-op   "
              f"(single shot, no restore: {res.single[k]:.0f} ns, {res.single[k] / res.single['noop']:.2f}x)")
    return 0


def run_e2e_cli(args) -> int:
    import os

    from xdpoib.bench_e2e import run_e2e
    from xdpoib.errors import PrerequisiteError

    if os.geteuid() != 0:
        raise PrerequisiteError("xdpoib bench e2e must run as root (namespaces, fabric, XDP)")
    res = run_e2e(seconds=args.seconds, rounds=args.rounds or 3).as_json()
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"UDP flood, {res['payload_bytes']}-byte payloads, {res['seconds']} s x {res['rounds']} rounds, "
          "received datagrams per second (median):")
    for k in ("plain", "bpf"):
        print(f"  {k:>6}: {res[k]['pps']:>9,} pps   samples {res[k]['samples']}")
    print(f"  bpf / plain: {res['ratio_bpf_to_plain']}x")
    return 0
