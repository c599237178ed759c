"""`xdpoib bench control`: the control plane at scale, measured in one run (docs/design.md §8: control
plane and memory targets), on a throwaway sim fabric (ibsim + a real OpenSM).

- **SA** (`sa_path_p50_s`, `sa_path_p99_s`, `sa_path_per_s`, `join_leave_per_s`): a child process
  running as host h1 asks the SA for `queries` PathRecords to h2, one after the other and never from
  the client's cache; then creates, joins and leaves `joins` groups (a full join that creates the
  group with the broadcast group's parameters, then a Delete). Rates are per second of wall time.
- **First packet** (`first_packet_s`, `arp_plus_sa_rtt_s`): h1 and `rounds` other hosts attached with
  the real CLI, eth4 in namespaces of their own. For each of the others, a first ping from h1 to a
  host it never sent to: ARP resolution, both agents' path queries and the echo, as `ping` times it
  (the median over the rounds). Next to it, measured in the same run: an ARP round trip between the
  same hosts once paths are resolved (a raw ARP request from h1's namespace, median of 10 per host)
  plus the SA's median PathRecord time. Target: first packet <= 2x that.
- **Maps** (`map_load_s`, `map_remove_s`, for 1e5 and 1e6 peers): the production build compiled in
  this process (bcc), peers installed and removed as packed batches (`Maps.add_peers` with a
  `PeerBatch`: the two hashes, the id array and the REMAC slot cache), median of 3. Target: 1e6 in <= 1 s.
- **Memory** (`agent_rss_mib_1e5`): one more attachment whose state file holds 1e5 peers (as an agent
  restarted on a busy fabric finds it); its RSS (VmRSS) once it is running. Target: <= 250 MiB.

Targets are reported, never asserted. Everything the bench creates is named `xbc<tag>...` (namespaces,
the fabric) and removed on the way out, even on an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import uuid

from xdpoib.errors import PrerequisiteError, XdpoibError

KEYS = ("sa_path_p50_s", "sa_path_p99_s", "sa_path_per_s", "join_leave_per_s", "first_packet_s",
        "arp_plus_sa_rtt_s", "map_load_s", "map_remove_s", "agent_rss_mib_1e5")
MAP_SIZES = {"1e5": 100_000, "1e6": 1_000_000}
RSS_PEERS = 100_000
DEFAULT_QUERIES, DEFAULT_JOINS, DEFAULT_ROUNDS = 2000, 200, 3


class BenchError(XdpoibError):
    """The control-plane bench could not set up or measure something."""


def _run(argv, timeout=120.0, check=True, env=None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{' '.join(argv[:6])}` did not finish in {timeout:.0f} s") from None
    if check and r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise BenchError(f"`{' '.join(argv[:6])}` failed: {last[0]}")
    return r


def _xdpoib(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "xdpoib", *args], env=env, check=check, timeout=180)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of xs, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# ================================================================ SA (child process, as host h1)

def sa_child(dgid_text: str, queries: int, joins: int) -> dict:
    """Run as a fabric host: PathRecords to dgid, then create+join+leave cycles; one JSON result."""
    from xdpoib.fabric.sa import JOIN_FULL, SAClient
    from xdpoib.wire.addr import parse_gid
    from xdpoib.wire.mgid import broadcast_mgid

    sa = SAClient.open(sm_key=1)
    try:
        dgid, sgid = parse_gid(dgid_text), sa.gid
        sa.path(dgid, sgid=sgid, cached=False)                  # warm up (ClassPortInfo, SM LID)
        lat = []
        t0 = time.perf_counter()
        for _ in range(queries):
            t = time.perf_counter()
            sa.path(dgid, sgid=sgid, cached=False)
            lat.append(time.perf_counter() - t)
        path_wall = time.perf_counter() - t0
        bcast = broadcast_mgid()
        template = sa.join(bcast, JOIN_FULL)
        sa.leave(bcast, JOIN_FULL)
        base = bytes.fromhex("ff12401bffff0000000000") + (os.getpid() & 0xFF).to_bytes(1, "big")
        t0 = time.perf_counter()
        for n in range(joins):
            mgid = base + (0xBC000000 + n).to_bytes(4, "big")
            sa.join(mgid, JOIN_FULL, create=template)
            sa.leave(mgid, JOIN_FULL)
        join_wall = time.perf_counter() - t0
    finally:
        sa.close()
    return {"latencies": lat, "path_wall": path_wall, "joins": joins, "join_wall": join_wall}


def measure_sa(fab, queries: int, joins: int) -> dict:
    from xdpoib.wire.addr import gid_str

    argv = [sys.executable, "-m", "xdpoib.bench.control", "sa", gid_str(fab.host("h2").gid), str(queries), str(joins)]
    p = fab.spawn("h1", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=60 + queries * 0.05 + joins * 0.2)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise BenchError("the SA measurement did not finish") from None
    if p.returncode != 0:
        raise BenchError(f"the SA measurement failed: {(err.strip().splitlines() or ['no output'])[-1]}")
    r = json.loads(out)
    lat = r["latencies"]
    return {"sa_path_p50_s": statistics.median(lat), "sa_path_p99_s": percentile(lat, 99),
            "sa_path_per_s": len(lat) / r["path_wall"], "join_leave_per_s": r["joins"] / r["join_wall"]}


# ================================================================ first packet and ARP round trip

ARP_PING = r"""
import socket, sys, time, statistics
ifname, mac, sip, dip, n = sys.argv[1], bytes.fromhex(sys.argv[2]), socket.inet_aton(sys.argv[3]), \
    socket.inet_aton(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((ifname, 0))
s.settimeout(2.0)
req = b"\xff" * 6 + mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01" + mac + sip + bytes(6) + dip
rtts = []
for _ in range(n):
    t = time.perf_counter()
    s.send(req)
    while True:
        try:
            r = s.recv(128)
        except socket.timeout:
            break
        if len(r) >= 42 and r[20:22] == b"\x00\x02" and r[28:32] == dip:
            rtts.append(time.perf_counter() - t)
            break
    time.sleep(0.05)
print(statistics.median(rtts) if rtts else -1)
"""


def _ns_mac(ns: str) -> str:
    out = _run(["ip", "-n", ns, "-o", "link", "show", "eth4"]).stdout
    m = re.search(r"link/ether (\S+)", out)
    if not m:
        raise BenchError(f"no MAC on eth4 in {ns}")
    return m.group(1)


def first_ping(ns: str, dst: str) -> float:
    r = _run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "5", dst], check=False, timeout=30)
    m = re.search(r"time=([\d.]+) ms", r.stdout)
    if not m:
        raise BenchError(f"no answer from {dst} to the first ping from {ns}")
    return float(m.group(1)) / 1000


def arp_rtt(ns: str, src: str, dst: str, n: int = 10) -> float:
    mac = _ns_mac(ns).replace(":", "")
    r = _run(["ip", "netns", "exec", ns, sys.executable, "-c", ARP_PING, "eth4", mac, src, dst, str(n)], timeout=60)
    v = float(r.stdout.strip())
    if v < 0:
        raise BenchError(f"no ARP reply from {dst}")
    return v


# ================================================================ maps

def peer_batch(n: int, base: int = 1):
    """n made-up peers, packed (REMAC 0a:00:<id>, GID fe80::<id>, QPN 0x10<id low 16 bits>)."""
    from xdpoib.datapath.maps import PeerBatch

    try:
        import numpy as np
    except ImportError:
        items = [(i, b"\x0a\x00" + i.to_bytes(4, "big"),
                  b"\x00\x10" + (i & 0xFFFF).to_bytes(2, "big") + b"\xfe\x80" + bytes(10) + i.to_bytes(4, "big"))
                 for i in range(base, base + n)]
        return PeerBatch.of(items)
    ids = np.arange(base, base + n, dtype="<u4")
    be = ids.byteswap().view(np.uint8).reshape(n, 4)
    macs = np.zeros((n, 6), np.uint8)
    macs[:, 0], macs[:, 2:6] = 0x0A, be
    addrs = np.zeros((n, 20), np.uint8)
    addrs[:, 1], addrs[:, 2:4], addrs[:, 4], addrs[:, 5], addrs[:, 16:20] = 0x10, be[:, 2:4], 0xFE, 0x80, be
    return PeerBatch(ids.tobytes(), macs.tobytes(), addrs.tobytes())


def measure_maps(rounds: int = 3, log=lambda m: None) -> dict:
    from xdpoib.datapath.loader import Build, Datapath
    from xdpoib.datapath.maps import Maps

    load, remove = {}, {}
    with Datapath(Build()) as dp:
        m = Maps.of(dp)
        for label, n in MAP_SIZES.items():
            batch = peer_batch(n)
            ts_load, ts_remove = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                m.add_peers(batch)
                ts_load.append(time.perf_counter() - t)
                got = m.peer_count() if n <= 100_000 else None
                t = time.perf_counter()
                m.remove_peers(batch)
                ts_remove.append(time.perf_counter() - t)
                if got is not None and got != n:
                    raise BenchError(f"{got} peers in the map after loading {n}")
            load[label], remove[label] = statistics.median(ts_load), statistics.median(ts_remove)
            log(f"maps {label}: load {load[label]:.3f} s, remove {remove[label]:.3f} s (median of {rounds})")
    return {"map_load_s": load, "map_remove_s": remove}


# ================================================================ agent memory

def write_big_state(aid: str, n: int) -> None:
    """A state file holding n peers (made-up GIDs, REMACs derived as the agent does)."""
    from xdpoib import state
    from xdpoib.peers import PeerTable
    from xdpoib.wire.addr import IPoIBAddr

    t = PeerTable([], {0: 0xFFFF})
    for i in range(1, n + 1):
        t.learn(IPoIBAddr(0, 0x100000 | (i & 0xFFFFF), bytes.fromhex("fe80000000000000") + (0x0B00000000000000 | i)
                          .to_bytes(8, "big")))
    state.ensure_dirs()
    state.write_private(state.persist_path(aid), json.dumps({"peers": t.to_json()}))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# ================================================================ the run

def run_control(queries: int = DEFAULT_QUERIES, joins: int = DEFAULT_JOINS, rounds: int = DEFAULT_ROUNDS,
                log=lambda m: None) -> dict:
    """Every figure of the module doc, as one dict with exactly `KEYS`."""
    from xdpoib import state
    from xdpoib.fabric.simfabric import SimFabric

    if os.geteuid() != 0:
        raise PrerequisiteError("xdpoib bench control must run as root (fabric, namespaces, BPF)")
    tag = uuid.uuid4().hex[:5]
    hosts = rounds + 2                      # h1, one fresh peer per round, the 1e5-peer attachment
    names = [f"xbc{tag}n{i}" for i in range(1, hosts + 1)]
    env = dict(os.environ, XDPOIB_MAX_PEERS=str(2 * RSS_PEERS), XDPOIB_MAX_RESERVED=str(2 * RSS_PEERS))
    res: dict = {}
    made: list[str] = []
    fab = SimFabric.up(f"xbc{tag}", hosts=hosts)
    try:
        log(f"fabric xbc{tag}: {hosts} hosts; SA: {queries} PathRecords, {joins} joins+leaves")
        res.update(measure_sa(fab, queries, joins))
        log(f"SA: PathRecord p50 {res['sa_path_p50_s'] * 1e6:.0f} us, p99 {res['sa_path_p99_s'] * 1e6:.0f} us, "
            f"{res['sa_path_per_s']:.0f}/s; join+leave {res['join_leave_per_s']:.0f}/s")
        for i, ns in enumerate(names[:-1], 1):
            _run(["ip", "netns", "add", ns])
            made.append(ns)
            _xdpoib("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h{i}", env=env)
            _run(["ip", "-n", ns, "addr", "add", f"10.98.0.{i}/24", "dev", "eth4"])
        firsts, arps = [], []
        for i in range(2, hosts):
            firsts.append(first_ping(names[0], f"10.98.0.{i}"))
            arps.append(arp_rtt(names[0], "10.98.0.1", f"10.98.0.{i}"))
            log(f"first packet to h{i}: {firsts[-1] * 1e3:.2f} ms; ARP round trip {arps[-1] * 1e3:.2f} ms")
        res["first_packet_s"] = statistics.median(firsts)
        res["arp_plus_sa_rtt_s"] = statistics.median(arps) + res["sa_path_p50_s"]
        # the attachment restarted with 1e5 peers in its state file
        ns = names[-1]
        _run(["ip", "netns", "add", ns])
        made.append(ns)
        aid = state.attachment_id("eth4", ns)
        write_big_state(aid, RSS_PEERS)
        t0 = time.monotonic()
        _xdpoib("attach", "eth4", "--netns", ns, "--sim", f"{fab.name}:h{hosts}", env=env)
        st = json.loads(_xdpoib("status", "eth4", "--netns", ns, "-j").stdout)
        time.sleep(3.0)                     # a few sweeps and saves of the big table
        res["agent_rss_mib_1e5"] = rss_mib(st["attachment"]["pid"])
        log(f"agent with {st['peers']} peers (up in {time.monotonic() - t0:.1f} s): "
            f"RSS {res['agent_rss_mib_1e5']:.0f} MiB")
        if st["peers"] != RSS_PEERS:
            raise BenchError(f"the agent restored {st['peers']} peers of {RSS_PEERS}")
    finally:
        for ns in made:
            _xdpoib("detach", "eth4", "--netns", ns, check=False)
            with contextlib.suppress(BenchError):
                _run(["ip", "netns", "del", ns], check=False)
            state.remove_files(state.attachment_id("eth4", ns))
        fab.down()
    res.update(measure_maps(log=log))
    return {k: res[k] for k in KEYS}


def format_table(res: dict) -> str:
    """The figures with their targets (docs/design.md §8)."""
    first, base = res["first_packet_s"], res["arp_plus_sa_rtt_s"]
    rows = [
        ("SA PathRecord p50 / p99", f"{res['sa_path_p50_s'] * 1e6:.0f} / {res['sa_path_p99_s'] * 1e6:.0f} us", ""),
        ("SA PathRecords per second", f"{res['sa_path_per_s']:.0f}", ""),
        ("joins + leaves per second", f"{res['join_leave_per_s']:.0f}", ""),
        ("first packet to a new peer", f"{first * 1e3:.2f} ms",
         f"{first / base:.2f}x (ARP + SA RTT {base * 1e3:.2f} ms; target <= 2x)"),
    ]
    for label in MAP_SIZES:
        rows.append((f"map load / remove, {label} peers",
                     f"{res['map_load_s'][label]:.3f} / {res['map_remove_s'][label]:.3f} s",
                     "target <= 1 s" if label == "1e6" else ""))
    rows.append(("agent RSS with 1e5 peers", f"{res['agent_rss_mib_1e5']:.0f} MiB", "target <= 250 MiB"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b:>22}  {c}".rstrip() for a, b, c in rows)


def _main(argv: list[str]) -> int:
    """`python -m xdpoib.bench.control sa DGID QUERIES JOINS`: the SA part, as a fabric host."""
    if len(argv) != 4 or argv[0] != "sa":
        print("usage: python -m xdpoib.bench.control sa DGID QUERIES JOINS", file=sys.stderr)
        return 2
    try:
        print(json.dumps(sa_child(argv[1], int(argv[2]), int(argv[3]))))
    except XdpoibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
