"""`xdpoib bench datapath|e2e|control|tap`: the BPF programs' cost per packet as ratios to a no-op program
(`xdpoib.bench.datapath`), xdpoib end to end against its plumbing ceiling, a naive Python translator,
veth and VXLAN, measured in the same run (`xdpoib.bench.e2e`), the control plane at scale
(`xdpoib.bench.control`), and what tap mode's bridge + veth hop costs a guest's frames against XDP on
the TAP (`xdpoib.bench.tap`)."""

from __future__ import annotations

import json

NAME = "bench"
HELP = ("measure the BPF datapath (ns/packet vs a no-op), xdpoib end to end against its baselines, the control "
        "plane, or tap mode's hop")
EPILOG = """examples:
  xdpoib bench datapath                 table of ns/packet and ratios (repeat 1e6, 5 rounds)
  xdpoib bench datapath --json          one JSON object: noop_ns_per_packet, tx, rx, arp
  xdpoib bench datapath --repeat 100000 --rounds 3    quicker, noisier
  xdpoib bench e2e                      xdpoib, ceiling, naive, veth, vxlan: table, RTTs, targets (~6 min)
  xdpoib bench e2e --json --plot e2e.png    one JSON object; offered vs received pps and RTTs as a PNG
  xdpoib bench e2e --sizes 64 --rates 20k,0 --seconds 1 --tcp-seconds 1 --pings 100    quick, noisy
  xdpoib bench e2e --systems xdpoib,veth --sizes MTU
  xdpoib bench control                  SA path/join rates, first packet, 1e5/1e6-peer maps, agent RSS (~1 min)
  xdpoib bench control --json --queries 300 --joins 50 --new-peers 1    quick, noisy
  xdpoib bench tap                      tap mode's hop vs XDP on the TAP: frames/s, CPU per frame (~40 s)
  xdpoib bench tap --json --seconds 0.5 --rounds 1    quick, noisy
"""


def configure(p):
    from xdpoib.bench import e2e
    from xdpoib.bench import tap as bench_tap
    from xdpoib.bench.control import DEFAULT_JOINS, DEFAULT_QUERIES, DEFAULT_ROUNDS

    p.add_argument("what", choices=["datapath", "e2e", "control", "tap"], help="what to measure")
    p.add_argument("-j", "--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeat", type=int, default=1_000_000, help="datapath: test_run repetitions per sample")
    p.add_argument("--rounds", type=int, default=None,
                   help="datapath, tap: interleaved rounds, the median is reported "
                        f"(default 5; tap {bench_tap.DEFAULT_ROUNDS})")
    p.add_argument("--samples", type=int, default=20_000, help="datapath: single-shot calls per program")
    p.add_argument("--sizes", default=",".join(e2e.DEFAULT_SIZES), metavar="LIST",
                   help="e2e: Ethernet frame sizes in bytes without FCS, MTU = eth4's MTU + 14 (default %(default)s)")
    p.add_argument("--rates", default=",".join(f"{r // 1000}k" if r else "0" for r in e2e.DEFAULT_RATES),
                   metavar="LIST", help="e2e: offered packets per second, 0 = unlimited (default %(default)s)")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"e2e: seconds per UDP sample, a whole number (default {e2e.DEFAULT_SECONDS}); "
                        f"tap: seconds per sample (default {bench_tap.DEFAULT_SECONDS:g})")
    p.add_argument("--tcp-seconds", type=int, default=e2e.DEFAULT_TCP_SECONDS,
                   help="e2e: seconds of the TCP run (default %(default)s)")
    p.add_argument("--systems", default=",".join(e2e.SYSTEMS), metavar="LIST",
                   help="e2e: which systems to measure (default %(default)s)")
    p.add_argument("--pings", type=int, default=e2e.DEFAULT_PINGS, metavar="N",
                   help="e2e: pings per system for the round-trip p50/p99, 2 ms apart, 0 = none (default %(default)s)")
    p.add_argument("--udp-buffer", default=f"{e2e.DEFAULT_UDP_BUFFER >> 20}M", metavar="BYTES",
                   help="e2e: UDP socket buffer iperf3 asks for on both ends (-w), 0 = the system's default "
                        "(default %(default)s; capped by net.core.rmem_max)")
    p.add_argument("--plot", metavar="FILE", help="e2e: write offered vs received pps and the round trips as a PNG")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES,
                   help="control: SA PathRecords timed (default %(default)s)")
    p.add_argument("--joins", type=int, default=DEFAULT_JOINS,
                   help="control: groups created, joined and left (default %(default)s)")
    p.add_argument("--new-peers", type=int, default=DEFAULT_ROUNDS,
                   help="control: hosts pinged for a first packet, 1-5 (default %(default)s)")


def run(args) -> int:
    from xdpoib.errors import UsageError

    if args.what == "e2e":
        return run_e2e_cli(args)
    if args.what == "control":
        return run_control_cli(args)
    if args.what == "tap":
        return run_tap_cli(args)
    args.rounds = 5 if args.rounds is None else args.rounds
    if args.repeat < 1 or args.rounds < 1 or args.samples < 1:
        raise UsageError("--repeat, --rounds and --samples must be positive")
    from xdpoib.bench import datapath

    res = datapath.measure(repeat=args.repeat, rounds=args.rounds, samples=args.samples)
    print(json.dumps(datapath.as_json(res)) if args.json else datapath.format_table(res))
    return 0


def run_e2e_cli(args) -> int:
    import importlib.util
    import os
    import sys

    from xdpoib.bench import e2e
    from xdpoib.errors import PrerequisiteError, UsageError

    sizes, rates, systems = e2e.parse_sizes(args.sizes), e2e.parse_rates(args.rates), e2e.parse_systems(args.systems)
    seconds = e2e.DEFAULT_SECONDS if args.seconds is None else args.seconds
    if seconds != int(seconds):
        raise UsageError("--seconds must be a whole number of seconds for e2e")
    args.seconds = int(seconds)
    if args.seconds < 1 or args.tcp_seconds < 1:
        raise UsageError("--seconds and --tcp-seconds must be at least 1")
    if not 0 <= args.pings <= 100_000:
        raise UsageError("--pings must be 0..100000")
    udp_buffer = e2e.parse_bytes(args.udp_buffer)
    if os.geteuid() != 0:
        raise PrerequisiteError("xdpoib bench e2e must run as root (namespaces, fabric, XDP)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise PrerequisiteError("--plot needs matplotlib (Debian: python3-matplotlib)")
    res = e2e.run_e2e(sizes, rates, args.seconds, args.tcp_seconds, systems,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True), pings=args.pings,
                      udp_buffer=udp_buffer)
    if args.plot:
        e2e.write_plot(res, args.plot)
    print(json.dumps(res) if args.json else e2e.format_table(res))
    return 0


def run_control_cli(args) -> int:
    import sys

    from xdpoib.bench import control as bc
    from xdpoib.errors import UsageError

    if args.queries < 1 or args.joins < 1 or not 1 <= args.new_peers <= 5:
        raise UsageError("--queries and --joins must be positive, --new-peers 1-5")
    res = bc.run_control(args.queries, args.joins, args.new_peers,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(res) if args.json else bc.format_table(res))
    return 0


def run_tap_cli(args) -> int:
    import os
    import sys

    from xdpoib.bench import tap as bt
    from xdpoib.errors import PrerequisiteError

    seconds = bt.DEFAULT_SECONDS if args.seconds is None else args.seconds
    rounds = bt.DEFAULT_ROUNDS if args.rounds is None else args.rounds
    bt.check_settings(seconds, rounds)
    if os.geteuid() != 0:
        raise PrerequisiteError("xdpoib bench tap must be run as root (TAP, bridge, veth, XDP)")
    res = bt.run_tap(seconds, rounds, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(res) if args.json else bt.format_table(res))
    return 0
