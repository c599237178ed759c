"""`xdpoib bench e2e`: xdpoib end to end against the baselines a user would pick, measured in one run.

Five systems, each between its own pair of network namespaces with its own subnet (10.99.N.0/24), all
set up at once before anything is measured:

- `xdpoib`   eth4 attached in both namespaces (`xdpoib attach eth4 --netns NS --sim FABRIC:hN`), the
             default translating XDP datapath, on a throwaway sim fabric (ibsim + a real OpenSM);
- `ceiling`  the same agents with `XDPOIB_DATAPATH=ceiling` (translation and map lookups bypassed: raw
             Ethernet frames over the same pump and sim transport), on a second fabric so that neither
             pair sees the other's broadcasts. An agent that does not run that datapath (its status names
             another) is an error for this system, reported instead of its numbers;
- `naive`    `xdpoib.bench.naive`: a TAP per side, the oracle in Python per frame, unix datagrams between;
- `veth`     a kernel veth pair between the namespaces (what the traffic generator reaches here);
- `vxlan`    VXLAN (VNI 42, port 4789) over a veth underlay, the overlay subnet on vx0.

Every system uses eth4's MTU (the broadcast group's IB MTU minus 4), so the frames are the same size
everywhere; VXLAN's underlay is 50 bytes larger to carry it. The one exception is the ceiling: its raw
Ethernet frames are 10 bytes longer than their IPoIB form, so its eth4 gets the largest MTU whose frames
fit the same IB MTU (the group's minus 14), and its `MTU`-sized frames are 10 bytes smaller.

Sizes are Ethernet frame sizes without the FCS: the 14-byte header plus the IP packet, so a UDP
payload of size - 42 bytes; `MTU` is the largest frame, whose IP packet is eth4's MTU (payload MTU - 28).
For each size, for each offered rate (iperf3 -u -b computed from a target pps; 0 is unlimited, -b 0),
for each system, one sample: an iperf3 server (`-s -1 -J`) in the receiving namespace, polled with `ss`
until it listens, and a client in the sending one for `seconds`. The loop order size -> rate -> system
means the machine's noise hits every system alike. The server's count (packets - lost) over its own
seconds is the received rate; the client's count is the offered one. Over each sample, divided by the
frames received: `agent_us_per_frame`, the translating processes' utime + stime (/proc/PID/stat, all
their threads: both agents, or both naive translators; 0 for veth and VXLAN, which have none), and
`kernel_us_per_frame`, the machine's softirq time (/proc/stat, every CPU); `cpu_us_per_frame` is their
sum. `agent_sys_us_per_frame` is the part of the agents' time spent in the kernel on their behalf (stime:
their syscalls, among them the live-frames injection, which runs the receiving host's stack up to the
application's socket inside the call, and the sim fabric's sends and receives); the rest is their own
code (utime). /proc counts in clock ticks (10 ms), so these are coarse for short, slow samples. Then TCP: one
iperf3 stream of `tcp_seconds` per system, the server's received Mbit/s.

UDP socket buffers: every UDP sample asks iperf3 for `udp_buffer` bytes of socket buffer (`-w`, on both
ends; default 4 MiB, 0 = the system's default), the same for every system. The kernel caps it at
net.core.rmem_max (4 MiB on Linux 6.12 and later, 208 KiB before: raise it there, the bench changes no
sysctl) and doubles it; `udp_buffer` in the result says what was asked, the cap and what the server's
socket got. Why: a datagram that xdpoib or the naive translator delivers is charged a page or more of
the receiving socket's buffer (xdpoib's frames come from the kernel's live-frames pages, 4 KiB each;
a veth or a NIC with copybreak charges ~0.8 KiB for a small one), so the system default (208 KiB) holds
50 small datagrams where veth's hold 256, and a batch of up to 240 frames delivered at once overflows
it while the receiving application still has CPU to spare. `socket_drop_pct` (per sample and for the
peak) is the share of the datagrams that reached the receiving namespace's UDP layer and were dropped
there for a full buffer (UdpRcvbufErrors of its /proc/net/snmp), so a figure limited by the receiving
application rather than the system under test says so.

Round trips: before the UDP samples, `pings` pings per system (ping -i 0.002 -W 1, 56-byte payload,
from the first namespace to the second), in PING_ROUNDS rounds that go through the systems in turn;
each reply's `time=` is taken (duplicates left out), and `rtt_us` is its p50 and p99 (nearest rank).
ping's `time=` is stamped by the kernel on receipt (SO_TIMESTAMP), so ping's own wake-up is not in it;
no CPU figure of the UDP samples is taken while the pings run, so none includes ping's CPU. What the
pings cost the translating processes is `rtt_cpu_us`: their CPU time (every thread's, from
/proc/PID/task/*/schedstat, in ns) over the pings, per answered ping: both agents' (or naive
translators') share of one round trip, 4 hops; 0 for veth and VXLAN, which have none. A round trip
that costs as much CPU as it lasts is bound by that CPU, not by waiting.

MTU: before the agents' fabrics, a probe asks OpenSM on ibsim for a 4096-byte broadcast group (a
one-host fabric, `mtu=5` in partitions.conf) and joins it from that host. If the join is granted at
4096, the agents' fabrics use that partitions.conf, so eth4's MTU, every system's MTU and the TCP runs
are the largest the sim fabric gives; if not (ibsim's ports have an MTU capability of 2048, and OpenSM
refuses a member below the group's MTU), they keep the default 2048, and `ib_mtu_4096` says why.

Before measuring, each system must pass a ping (ARP, and for the agents the first path query); a system
that cannot be set up, or whose translating process dies, keeps an `error` and nulls instead of
numbers, and the run goes on.

Per system and size: `peak_pps` (the highest received rate over the offered rates), `overload_pps`
(received at the highest offered rate, the last), `mbps` (Ethernet frame bits per second at the peak),
and `cpu_us_per_frame`, `agent_us_per_frame`, `agent_sys_us_per_frame`, `kernel_us_per_frame` and
`socket_drop_pct` (of the peak's sample). Per system:
`tcp_mbps`, `rtt_us` {"p50", "p99"} and `rtt_cpu_us`. `ratios` holds the targets, each with its value from this run,
which side of the target it should be on (`op`) and whether it is (`met`); they are printed, never
asserted.

Everything the bench creates is named `xe2e<tag>...` (namespaces, TAPs, fabrics; `setup` in the result
names them) and is removed on the way out, in reverse order of creation, even on an error, Ctrl-C or
SIGTERM: agents through `xdpoib detach` (their PID stopped if that fails; the fabric's `down()` then
stops any agent it recorded and a sweep removes what such an agent left), every other process by its
PID, whatever still runs in a namespace by `ip netns pids`, the namespaces last.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from xdpoib import state
from xdpoib.errors import PrerequisiteError, UsageError, XdpoibError
from xdpoib.link import read_sysctl
from xdpoib.teardown import Teardown

SYSTEMS = ("xdpoib", "ceiling", "naive", "veth", "vxlan")
AGENT_DATAPATHS = {"xdpoib": None, "ceiling": "ceiling"}     # XDPOIB_DATAPATH for the attach command
SUBNETS = {"xdpoib": 1, "ceiling": 2, "naive": 3, "veth": 4, "vxlan": 5}
CODES = {"xdpoib": "x", "ceiling": "c", "naive": "n", "veth": "v", "vxlan": "l"}
DEFAULT_SIZES = ("64", "512", "MTU")
DEFAULT_RATES = (10_000, 20_000, 40_000, 80_000, 0)
DEFAULT_SECONDS = 3
DEFAULT_TCP_SECONDS = 5
ETH_HLEN, IP_UDP_HLEN, VXLAN_OVERHEAD = 14, 28, 50
MIN_FRAME = 60                      # 64 bytes on the wire with the FCS
FALLBACK_MTU = 1500                 # when no agent attached to tell eth4's MTU
PORT = 5201
READY_PING_SECONDS = 20.0
DEFAULT_PINGS = 1000
PING_INTERVAL = 0.002               # seconds between pings (below 0.2 s needs root)
PING_ROUNDS = 4                     # the pings of each system come in this many interleaved rounds
KEYS = ("peak_pps", "overload_pps", "mbps", "cpu_us_per_frame", "agent_us_per_frame", "agent_sys_us_per_frame",
        "kernel_us_per_frame", "socket_drop_pct")
DEFAULT_UDP_BUFFER = 4 << 20        # bytes of UDP socket buffer iperf3 asks for (-w); 0 = the system's
RTT_KEYS = ("p50", "p99")
LARGE_IB_MTU = 4096                 # what the probe asks the sim fabric for (partitions.conf mtu=5)


class BenchError(XdpoibError):
    """The benchmark could not set up or measure something."""


# ===================================================================================================
# Options
# ===================================================================================================

def parse_sizes(text: str) -> list[str]:
    """`64,512,MTU` -> ['64', '512', 'MTU'] (frame sizes in bytes, or MTU)."""
    out = []
    for tok in (t.strip() for t in text.split(",")):
        if tok.upper() == "MTU":
            tok = "MTU"
        elif not tok.isdigit() or not MIN_FRAME <= int(tok) <= 9000:
            raise UsageError(f"bad size {tok!r}: an Ethernet frame size of {MIN_FRAME}..9000 bytes, or MTU")
        if tok not in out:
            out.append(tok)
    if not out:
        raise UsageError("--sizes is empty")
    return out


def parse_rates(text: str) -> list[int]:
    """`10k,20k,0` -> [10000, 20000, 0]: packets per second, 0 (or max) for unlimited, sorted low to high
    with unlimited last."""
    out = set()
    for tok in (t.strip().lower() for t in text.split(",")):
        mult = {"k": 1_000, "m": 1_000_000}.get(tok[-1:], 1)
        num = tok[:-1] if mult > 1 else tok
        if tok in ("max", "unlimited"):
            out.add(0)
            continue
        try:
            v = float(num) * mult
        except ValueError:
            raise UsageError(f"bad rate {tok!r}: packets per second (10k, 2.5M, 0 for unlimited)") from None
        if v < 0 or v != int(v):
            raise UsageError(f"bad rate {tok!r}: a whole number of packets per second")
        out.add(int(v))
    if not out:
        raise UsageError("--rates is empty")
    return sorted(out - {0}) + ([0] if 0 in out else [])


def parse_bytes(text: str) -> int:
    """`4M` -> 4194304, `256k` -> 262144, `0` -> 0: a byte count with an optional K/M/G suffix (powers of 2)."""
    tok = text.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(tok[-1:], 1)
    num = tok[:-1] if mult > 1 else tok
    if not num.isdigit() or int(num) * mult > 1 << 31:
        raise UsageError(f"bad byte count {text!r}: a whole number with an optional K, M or G suffix, at most 2G")
    return int(num) * mult


def parse_systems(text: str) -> list[str]:
    """`xdpoib,veth` -> those systems, in the bench's own order."""
    want = {t.strip() for t in text.split(",") if t.strip()}
    bad = want - set(SYSTEMS)
    if bad or not want:
        raise UsageError(f"bad --systems {text!r}: choose from {','.join(SYSTEMS)}")
    return [s for s in SYSTEMS if s in want]


def rate_label(rate: int) -> str:
    return "unlimited" if rate == 0 else f"{rate / 1000:g}k"


# ===================================================================================================
# Processes and /proc
# ===================================================================================================

def _run(argv: list[str], timeout: float = 30.0, check: bool = True, env=None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{' '.join(argv)}` did not finish in {timeout:.0f} s") from None
    if check and r.returncode != 0:
        why = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise BenchError(f"`{' '.join(argv)}` failed: {why[-1] if why else f'exit {r.returncode}'}")
    return r


def _ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _kill(p: subprocess.Popen, grace: float = 3.0) -> None:
    """Stop a child by its PID: SIGTERM, SIGKILL after `grace`, reaped."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=grace)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def softirq_ticks() -> int:
    """The machine's softirq time (every CPU), in clock ticks."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[7])             # cpu user nice system idle iowait irq softirq


def udp_buffer_info(requested: int, cap: int | None) -> dict:
    """What a UDP socket gets when iperf3 asks for `requested` bytes (SO_RCVBUF): the kernel caps the
    request at net.core.rmem_max and doubles it (its bookkeeping overhead); None when the system's default
    is kept (0) or the cap is unknown."""
    got = None if not requested or cap is None else 2 * min(requested, cap)
    return {"requested": requested, "rmem_max": cap, "socket_rcvbuf": got}


def snmp_value(text: str, proto: str, field: str) -> int | None:
    """A counter of /proc/net/snmp's text (header line, then values line, per protocol)."""
    lines = [ln.split() for ln in text.splitlines() if ln.startswith(proto + ":")]
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if field in head:
            with contextlib.suppress(ValueError, IndexError):
                return int(vals[head.index(field)])
    return None


def process_cpu_ns(pids: list[int]) -> int:
    """CPU time of `pids` (all their threads) in ns, from /proc/PID/task/*/schedstat (exact, unlike ticks)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError), \
                        open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total


def process_times(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of `pids` (all their threads), in clock ticks."""
    user = system = 0
    for pid in pids:
        t = state.cpu_ticks(pid)
        if t is not None:
            user += t[0]
            system += t[1]
    return user, system


_PING_REPLY = re.compile(r"\bicmp_seq=(\d+)\b.*\btime[=<]([0-9.]+) ms")


def parse_ping(text: str) -> list[float]:
    """The round trips of `ping`'s output in microseconds, one per answered sequence number, in order of
    arrival: `64 bytes from A: icmp_seq=N ttl=64 time=0.045 ms` (duplicates, marked `(DUP!)`, and
    every other line, such as errors and the summary, are left out)."""
    seen, out = set(), []
    for line in text.splitlines():
        m = _PING_REPLY.search(line)
        if m is None or "DUP!" in line or m.group(1) in seen:
            continue
        seen.add(m.group(1))
        out.append(float(m.group(2)) * 1000.0)
    return out


def group_mtu(saquery_g: str) -> int | None:
    """The IB MTU in bytes of the first group in `saquery -g` output (`Mtu....0x85`: selector 2 bits,
    then the MTU code, 5 = 4096)."""
    m = re.search(r"^\s*Mtu\.+0x([0-9a-fA-F]+)", saquery_g, re.M)
    code = int(m.group(1), 16) & 0x3F if m else 0
    return 128 << code if 1 <= code <= 5 else None


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of xs, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def rtt_summary(rtts: list[float]) -> dict:
    """`{"p50", "p99"}` in microseconds (nulls without a reply)."""
    if not rtts:
        return dict.fromkeys(RTT_KEYS)
    return {"p50": round(percentile(rtts, 50), 1), "p99": round(percentile(rtts, 99), 1)}


def machine() -> dict:
    """What the numbers were measured on."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release()}


# ===================================================================================================
# The systems
# ===================================================================================================

@dataclass
class System:
    """One system under test: its two namespaces, the addresses on them, the processes that translate."""

    name: str
    ns: tuple[str, str]
    addr: tuple[str, str]
    pids: list[int] = field(default_factory=list)
    mtu: int = 0
    datapath: str | None = None
    error: str | None = None


@dataclass
class Sample:
    """One measurement: offered and received packets per second; CPU per received frame of the
    translating processes (`agent`) and of the machine's softirq (`kernel`)."""

    offered_pps: float
    received_pps: float
    agent_us_per_frame: float | None
    kernel_us_per_frame: float | None
    received: int = 0                   # datagrams the server counted
    agent_sys_us_per_frame: float | None = None     # the part of agent_us_per_frame spent in the kernel
    socket_drops: int | None = None     # datagrams dropped at the receiving namespace's UDP sockets (full buffer)

    @property
    def socket_drop_pct(self) -> float | None:
        if self.socket_drops is None or self.received + self.socket_drops <= 0:
            return None
        return 100.0 * self.socket_drops / (self.received + self.socket_drops)

    @property
    def cpu_us_per_frame(self) -> float | None:
        if self.agent_us_per_frame is None or self.kernel_us_per_frame is None:
            return None
        return self.agent_us_per_frame + self.kernel_us_per_frame

    def as_json(self) -> dict:
        def r(v):
            return None if v is None else round(v, 2)
        return {"offered_pps": round(self.offered_pps), "received_pps": round(self.received_pps),
                "cpu_us_per_frame": r(self.cpu_us_per_frame), "agent_us_per_frame": r(self.agent_us_per_frame),
                "agent_sys_us_per_frame": r(self.agent_sys_us_per_frame),
                "kernel_us_per_frame": r(self.kernel_us_per_frame), "socket_drop_pct": r(self.socket_drop_pct)}


class Testbed:
    """Every fabric, namespace, agent and process the bench creates; `close()` removes them in reverse.

    Setting up a system may fail (an attach refused, no connectivity): that system keeps its error and
    is not measured, the others go on.
    """

    def __init__(self, systems: list[str], log=None):
        self.tag = "xe2e" + uuid.uuid4().hex[:4]
        self.names = systems
        self.systems: dict[str, System] = {}
        self.fabrics: list[str] = []
        self.mtu = FALLBACK_MTU
        self.log = log or (lambda msg: None)
        self._undo = Teardown("xdpoib bench e2e")
        self._later = self._undo.later
        self._tmp: str | None = None
        self.ib_mtu_4096: dict | None = None       # the probe's answer (None: no agent system asked for)
        self._partitions: str | None = None        # the agents' fabrics' partitions.conf (None: the default)

    # ---- lifetime

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove everything, with Ctrl-C and SIGTERM held off until it is done."""
        self._undo.close()

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        """A child in its own session (Ctrl-C reaches only the bench), stopped by PID on close."""
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self._later(_kill, p)
        return p

    # ---- building blocks

    def netns(self, name: str) -> str:
        _run(["ip", "netns", "add", name])
        self._later(self._del_netns, name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    @staticmethod
    def _del_netns(name: str) -> None:
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:                    # anything still running in it was started by the bench
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", name])

    def _pair(self, name: str) -> System:
        n = SUBNETS[name]
        ns = tuple(self.netns(f"{self.tag}{CODES[name]}{i}") for i in (0, 1))
        s = System(name, ns, (f"10.99.{n}.1", f"10.99.{n}.2"))
        self.systems[name] = s
        return s

    def _addr(self, s: System, dev: str) -> None:
        for i in (0, 1):
            _run(["ip", "-n", s.ns[i], "addr", "add", f"{s.addr[i]}/24", "dev", dev])
            _run(["ip", "-n", s.ns[i], "link", "set", dev, "up"])

    # ---- setup

    def tmpdir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix=f"{self.tag}-")
            self._later(shutil.rmtree, self._tmp, True)
        return self._tmp

    def setup(self) -> None:
        """Create every system; the agents' attaches run side by side."""
        agents = [n for n in self.names if n in AGENT_DATAPATHS]
        if agents:
            self.probe_large_mtu()
        for name in self.names:
            self._pair(name)
        pending = {}
        for name in agents:
            try:
                pending[name] = self._start_agents(self.systems[name])
            except XdpoibError as e:
                self.systems[name].error = str(e)
        for name, procs in pending.items():
            try:
                self._finish_agents(self.systems[name], procs)
            except XdpoibError as e:
                self.systems[name].error = str(e)
        attached = [self.systems[n] for n in agents if not self.systems[n].error]
        if attached:
            self.mtu = attached[0].mtu
        for name in self.names:
            s = self.systems[name]
            if name in AGENT_DATAPATHS or s.error:
                continue
            s.mtu = self.mtu
            try:
                {"naive": self._naive, "veth": self._veth, "vxlan": self._vxlan}[name](s)
            except XdpoibError as e:
                s.error = str(e)
        for s in self.systems.values():
            if not s.error:
                try:
                    self._wait_ping(s)
                except XdpoibError as e:
                    s.error = str(e)
            if s.error:
                self.log(f"{s.name}: not measured: {s.error}")

    def probe_large_mtu(self) -> None:
        """Whether the sim fabric gives a 4096-byte broadcast group: a one-host fabric whose default
        partition asks for it (`mtu=5`), and one full-member join of its broadcast group from that host.
        If the join is granted at 4096, the agents' fabrics get that partitions.conf (so eth4, every
        system's MTU and the TCP runs use the larger MTU); if not, they keep the default (2048), and the
        result says why."""
        from xdpoib.fabric.simfabric import SimFabric

        conf = os.path.join(self.tmpdir(), "partitions-mtu5.conf")
        with open(conf, "w") as f:
            f.write("Default=0x7fff, ipoib, mtu=5 : ALL=full;\n")
        self.fabrics.append(f"{self.tag}m")
        try:
            with SimFabric.up(f"{self.tag}m", hosts=1, partitions=conf) as fab:
                p = fab.spawn("h1", [sys.executable, "-m", "xdpoib.bench.e2e", "join"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                try:
                    out, err = p.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    _kill(p)
                    raise BenchError("the join did not finish in 60 s") from None
                group = group_mtu(fab.saquery("h1", "-g").stdout)
            why = (err.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
            answer = json.loads(out) if p.returncode == 0 else {"error": why}
        except (XdpoibError, ValueError) as e:
            answer, group = {"error": str(e)}, None
        mtu = answer.get("mtu")
        usable = mtu == LARGE_IB_MTU
        made = f"OpenSM on ibsim made the broadcast group {group or '?'} bytes for mtu=5"
        if usable:
            detail = f"{made}, a host joined it at {mtu}: the agents' fabrics use mtu=5"
            self._partitions = conf
        elif mtu:
            detail = f"{made}, a host joined it at {mtu}: the default (2048) is kept"
        else:
            detail = f"{made} but refused a host's join ({answer['error']}): the largest usable IB MTU is 2048"
        self.ib_mtu_4096 = {"usable": usable, "detail": detail}
        self.log(f"IB MTU {LARGE_IB_MTU}: {detail}")

    def _start_agents(self, s: System) -> list[subprocess.Popen]:
        from xdpoib.fabric.simfabric import SimFabric

        self._later(self._sweep, s.ns)               # after the fabric is down: whatever an agent left
        fab = SimFabric.up(f"{self.tag}{CODES[s.name]}", hosts=2, partitions=self._partitions)
        self._later(fab.down)                         # stops every agent the fabric recorded
        self.fabrics.append(fab.name)
        env = dict(os.environ)
        env.pop("XDPOIB_DATAPATH", None)
        if AGENT_DATAPATHS[s.name]:
            env["XDPOIB_DATAPATH"] = AGENT_DATAPATHS[s.name]
        procs = []
        for i in (0, 1):
            self._later(self._detach, s.ns[i])
            procs.append(self.spawn([sys.executable, "-m", "xdpoib", "attach", "eth4", "--netns", s.ns[i],
                                     "--sim", f"{fab.name}:h{i + 1}", "--json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        return procs

    def _finish_agents(self, s: System, procs: list[subprocess.Popen]) -> None:
        errors, kinds, mtus = [], set(), []
        for i, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                _kill(p)
                errors.append(f"attach in {s.ns[i]} did not finish in 120 s")
                continue
            if p.returncode != 0:
                why = err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"
                errors.append(f"attach in {s.ns[i]}: {why.removeprefix('xdpoib: error: ')}")
                continue
            st = json.loads(out)
            kinds.add(st.get("datapath", {}).get("kind"))
            mtus.append(int(st["eth"]["mtu"]))
            if s.name == "ceiling" and st.get("broadcast", {}).get("mtu"):
                mtus[-1] = min(mtus[-1], int(st["broadcast"]["mtu"]) - ETH_HLEN)
            spec = state.read_spec(state.attachment_id("eth4", s.ns[i]))
            if spec is not None and spec.pid:
                s.pids.append(spec.pid)
        if errors:
            raise BenchError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        s.datapath = "/".join(sorted(str(k) for k in kinds))
        want = AGENT_DATAPATHS[s.name]
        if want and s.datapath != want:
            raise BenchError(f"the agents run the {s.datapath!r} datapath, not {want!r} "
                             f"(XDPOIB_DATAPATH={want} not supported by this agent)")
        s.mtu = min(mtus)
        for ns in s.ns:
            _run(["ip", "-n", ns, "link", "set", "eth4", "mtu", str(s.mtu)])
        self._addr(s, "eth4")

    def _detach(self, ns: str) -> None:
        spec = state.read_spec(state.attachment_id("eth4", ns))
        if spec is None:
            return
        r = subprocess.run([sys.executable, "-m", "xdpoib", "detach", "eth4", "--netns", ns],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if r.returncode != 0 and spec.pid and _alive(spec.pid):
            state.stop_pid(spec.pid)
            raise BenchError(f"detach eth4 in {ns}: {r.stderr.strip()}; agent pid {spec.pid} stopped")

    @staticmethod
    def _sweep(nss: tuple[str, str]) -> None:
        """Remove what an agent stopped in the middle of its attach left: files, pins, links."""
        from xdpoib.teardown import detach

        for ns in nss:
            aid = state.attachment_id("eth4", ns)
            tag = state.link_tag(aid)
            spec = state.read_spec(aid) or state.AttachSpec("eth4", ns, internal="xo" + tag)
            if spec.pid and _alive(spec.pid):
                state.stop_pid(spec.pid)
            detach(spec)
            _run(["ip", "link", "del", "xa" + tag], check=False)

    def _naive(self, s: System) -> None:
        self.tmpdir()
        procs = []
        for i in (0, 1):
            tap = f"{self.tag}n{i}"
            with open(os.path.join(self._tmp, f"naive{i}.log"), "wb") as errf:
                p = self.spawn([sys.executable, "-m", "xdpoib.bench.naive", str(i), tap, self._tmp],
                               stdout=subprocess.PIPE, stderr=errf)
            procs.append((p, tap))
        for i, (p, tap) in enumerate(procs):
            ready, _, _ = select.select([p.stdout], [], [], 15)
            line = p.stdout.readline().decode(errors="replace").strip() if ready else ""
            if line != "ready":
                _kill(p)
                with open(os.path.join(self._tmp, f"naive{i}.log"), errors="replace") as f:
                    why = f.read().strip().splitlines()
                raise BenchError(f"the naive translator {i} did not start: {why[-1] if why else 'no output'}")
            s.pids.append(p.pid)
            _run(["ip", "link", "set", tap, "netns", s.ns[i]])
            _run(["ip", "-n", s.ns[i], "link", "set", tap, "mtu", str(self.mtu)])
            _run(["ip", "-n", s.ns[i], "addr", "add", f"{s.addr[i]}/24", "dev", tap])
            _run(["ip", "-n", s.ns[i], "link", "set", tap, "up"])

    def _veth(self, s: System) -> None:
        _run(["ip", "-n", s.ns[0], "link", "add", "veth0", "mtu", str(self.mtu), "type", "veth",
              "peer", "name", "veth0", "netns", s.ns[1], "mtu", str(self.mtu)])
        self._addr(s, "veth0")

    def _vxlan(self, s: System) -> None:
        under = (f"10.99.{100 + SUBNETS['vxlan']}.1", f"10.99.{100 + SUBNETS['vxlan']}.2")
        mtu = str(self.mtu + VXLAN_OVERHEAD)
        _run(["ip", "-n", s.ns[0], "link", "add", "under0", "mtu", mtu, "type", "veth",
              "peer", "name", "under0", "netns", s.ns[1], "mtu", mtu])
        for i in (0, 1):
            _run(["ip", "-n", s.ns[i], "addr", "add", f"{under[i]}/24", "dev", "under0"])
            _run(["ip", "-n", s.ns[i], "link", "set", "under0", "up"])
            _run(["ip", "-n", s.ns[i], "link", "add", "vx0", "mtu", str(self.mtu), "type", "vxlan", "id", "42",
                  "dstport", "4789", "local", under[i], "remote", under[1 - i], "dev", "under0"])
        self._addr(s, "vx0")

    def _wait_ping(self, s: System) -> None:
        """Wait until the first namespace reaches the second (ARP, and for the agents a path query)."""
        deadline = time.monotonic() + READY_PING_SECONDS
        while time.monotonic() < deadline:
            if _run(_ns(s.ns[0], "ping", "-c", "1", "-W", "1", s.addr[1]), check=False).returncode == 0:
                return
        raise BenchError(f"no connectivity: ping {s.addr[1]} from {s.ns[0]} failed for {READY_PING_SECONDS:.0f} s")

    # ---- measuring

    def check_alive(self, s: System) -> None:
        """A system whose translating process died is not measured further."""
        dead = [pid for pid in s.pids if not _alive(pid)]
        if dead and not s.error:
            s.error = f"process {dead[0]} of {s.name} exited during the run"

    def _iperf(self, s: System, args: list[str], seconds: float) -> tuple[dict, dict]:
        """One iperf3 run from s.ns[0] to s.ns[1]: the client's and the server's JSON."""
        server = self.spawn(_ns(s.ns[1], "iperf3", "-s", "-1", "-J", "-B", s.addr[1], "-p", str(PORT)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            deadline = time.monotonic() + 10
            while not _run(_ns(s.ns[1], "ss", "-Hltn", f"sport = :{PORT}"), check=False).stdout.strip():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the iperf3 server in {s.ns[1]} did not listen")
                time.sleep(0.02)
            c = _run(_ns(s.ns[0], "iperf3", "-c", s.addr[1], "-p", str(PORT), "-J", "-i", "0",
                         "--connect-timeout", "5000", *args), timeout=seconds + 30, check=False)
            try:
                out, _ = server.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                raise BenchError(f"the iperf3 server in {s.ns[1]} did not finish") from None
        finally:
            _kill(server)
        res = []
        for who, text in (("client", c.stdout), ("server", out)):
            try:
                j = json.loads(text)
            except ValueError:
                raise BenchError(f"iperf3 {who} gave no result: {(c.stderr or text).strip()[-200:]}") from None
            if j.get("error"):
                raise BenchError(f"iperf3 {who}: {j['error']}")
            res.append(j)
        return res[0], res[1]

    def rcvbuf_errors(self, ns: str) -> int | None:
        """UdpRcvbufErrors of namespace NS: datagrams its UDP sockets dropped for a full receive buffer."""
        r = _run(_ns(ns, "cat", "/proc/net/snmp"), check=False)
        return snmp_value(r.stdout, "Udp", "RcvbufErrors") if r.returncode == 0 else None

    def udp(self, s: System, frame: int, rate: int, seconds: int, buffer: int = DEFAULT_UDP_BUFFER) -> Sample:
        """Offer `rate` pps (0: as fast as iperf3 goes) of `frame`-byte frames for `seconds`, with `buffer`
        bytes of socket buffer asked for on both ends (0: the system's default)."""
        payload = frame - ETH_HLEN - IP_UDP_HLEN
        bits = str(rate * payload * 8) if rate else "0"
        window = ["-w", str(buffer)] if buffer else []
        d0 = self.rcvbuf_errors(s.ns[1])
        (u0, s0), k0 = process_times(s.pids), softirq_ticks()
        c, srv = self._iperf(s, ["-u", *window, "-b", bits, "-l", str(payload), "-t", str(seconds)], seconds)
        (u1, s1), kernel = process_times(s.pids), softirq_ticks() - k0
        agent, agent_sys = u1 + s1 - u0 - s0, s1 - s0
        d1 = self.rcvbuf_errors(s.ns[1])
        drops = d1 - d0 if d0 is not None and d1 is not None else None
        try:
            got, sent = srv["end"]["sum"], c["end"]["sum"]
            received = got["packets"] - got["lost_packets"]
            rx_pps = received / got["seconds"] if got["seconds"] else 0.0
            tx_pps = sent["packets"] / sent["seconds"] if sent["seconds"] else 0.0
        except (KeyError, TypeError):
            raise BenchError("iperf3 gave no UDP totals") from None
        if received <= 0:
            return Sample(tx_pps, rx_pps, None, None, received=0, socket_drops=drops)
        us = 1e6 / os.sysconf("SC_CLK_TCK") / received
        return Sample(tx_pps, rx_pps, agent * us, kernel * us, received=received, socket_drops=drops,
                      agent_sys_us_per_frame=agent_sys * us)

    def ping(self, s: System, count: int) -> list[float]:
        """`count` pings from s.ns[0] to s.ns[1], PING_INTERVAL apart: the replies' round trips in us.
        ping's own time= is what the kernel timestamped (SO_TIMESTAMP), not when ping got to run."""
        r = _run(_ns(s.ns[0], "ping", "-n", "-c", str(count), "-i", f"{PING_INTERVAL:g}", "-W", "1", s.addr[1]),
                 timeout=count * PING_INTERVAL * 3 + 30, check=False)
        rtts = parse_ping(r.stdout)
        if not rtts:
            why = (r.stderr.strip() or r.stdout.strip()).splitlines()
            raise BenchError(f"ping {s.addr[1]}: no reply ({why[-1] if why else f'exit {r.returncode}'})")
        return rtts

    def tcp(self, s: System, seconds: int) -> float:
        """Received Mbit/s of one TCP stream over `seconds`."""
        _, srv = self._iperf(s, ["-t", str(seconds)], seconds)
        try:
            return srv["end"]["sum_received"]["bits_per_second"] / 1e6
        except (KeyError, TypeError):
            raise BenchError("iperf3 gave no TCP totals") from None


# ===================================================================================================
# The run and its report
# ===================================================================================================

def frame_bytes(size: str, mtu: int) -> int:
    return mtu + ETH_HLEN if size == "MTU" else int(size)


def run_e2e(sizes=DEFAULT_SIZES, rates=DEFAULT_RATES, seconds: int = DEFAULT_SECONDS,
            tcp_seconds: int = DEFAULT_TCP_SECONDS, systems=SYSTEMS, log=None, pings: int = DEFAULT_PINGS,
            udp_buffer: int = DEFAULT_UDP_BUFFER) -> dict:
    """Set everything up, measure, tear down; return the result object (see the module doc)."""
    for cmd in ("ip", "ss", "iperf3", "ping"):
        if shutil.which(cmd) is None:
            raise PrerequisiteError(f"command {cmd!r} not found (Debian: iproute2, iperf3, iputils-ping)")
    if "naive" in systems and not os.path.exists("/dev/net/tun"):
        raise PrerequisiteError("/dev/net/tun is missing (the naive translator needs a TAP)")
    log = log or (lambda msg: None)
    old_term = None
    with contextlib.suppress(ValueError):
        old_term = signal.signal(signal.SIGTERM, _interrupted)
    try:
        with Testbed(list(systems), log) as tb:
            log(f"setting up {', '.join(systems)} ({tb.tag}*)")
            tb.setup()
            return _measure(tb, list(sizes), list(rates), seconds, tcp_seconds, pings, log, udp_buffer)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _measure(tb: Testbed, sizes: list[str], rates: list[int], seconds: int, tcp_seconds: int, pings: int,
             log, udp_buffer: int = DEFAULT_UDP_BUFFER) -> dict:
    frames = {sz: frame_bytes(sz, tb.mtu) for sz in sizes}
    for sz, fb in frames.items():
        if fb > tb.mtu + ETH_HLEN:
            raise BenchError(f"size {sz} is larger than the largest frame here ({tb.mtu + ETH_HLEN} bytes, "
                             f"MTU {tb.mtu})")
    names = list(tb.systems)
    samples: dict[str, dict[str, list[Sample | None]]] = {sz: {n: [] for n in names} for sz in sizes}
    failures: dict[str, list[str]] = {n: [] for n in names}
    rtts, rtt_cpu = _measure_rtt(tb, names, pings, failures, log)
    for sz in sizes:
        for rate in rates:
            for n in names:
                s = tb.systems[n]
                fb = frame_bytes(sz, s.mtu)
                tb.check_alive(s)
                x = None
                if s.error:
                    pass
                elif fb > s.mtu + ETH_HLEN:
                    failures[n].append(f"{fb}-byte frames do not fit its MTU {s.mtu}")
                else:
                    try:
                        x = tb.udp(s, fb, rate, seconds, udp_buffer)
                        pct = x.socket_drop_pct
                        drop = "" if pct is None else f", {pct:5.1f} % dropped at the socket"
                        log(f"{fb:>5} B  offered {rate_label(rate):>9}  {n:>7}: "
                            f"{x.offered_pps / 1000:8.1f} kpps sent, {x.received_pps / 1000:8.1f} kpps received{drop}")
                    except XdpoibError as e:
                        failures[n].append(f"{fb} B at {rate_label(rate)}: {e}")
                        log(f"{fb:>5} B  offered {rate_label(rate):>9}  {n:>7}: failed: {e}")
                samples[sz][n].append(x)
    tcp: dict[str, float | None] = {}
    for n in names:
        s = tb.systems[n]
        tb.check_alive(s)
        tcp[n] = None
        if not s.error:
            try:
                tcp[n] = tb.tcp(s, tcp_seconds)
                log(f"  TCP {n:>7}: {tcp[n]:8.1f} Mbit/s")
            except XdpoibError as e:
                failures[n].append(f"TCP: {e}")
                log(f"  TCP {n:>7}: failed: {e}")
    res = _result(tb, sizes, rates, frames, samples, tcp, failures, seconds, tcp_seconds)
    res["udp_buffer"] = udp_buffer_info(udp_buffer, read_sysctl("net.core.rmem_max"))
    res["rtt_us"] = {n: rtt_summary(rtts[n]) for n in names}
    res["rtt_cpu_us"] = {n: round(rtt_cpu[n] / 1e3 / len(rtts[n]), 1) if rtts[n] else None for n in names}
    res["pings"] = {"count": pings, "interval_ms": PING_INTERVAL * 1000, "replies": {n: len(rtts[n]) for n in names}}
    res["ratios"] = ratios(res)
    return res


def _measure_rtt(tb: Testbed, names: list[str], pings: int, failures: dict,
                 log) -> tuple[dict[str, list[float]], dict[str, int]]:
    """`pings` round trips per system, in PING_ROUNDS interleaved rounds (the noise hits all alike), on
    quiet systems: no iperf3 runs meanwhile, and no UDP sample's CPU figure is taken over them. Also the
    translating processes' CPU (ns) over each system's pings."""
    rtts: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, int] = dict.fromkeys(names, 0)
    per_round = -(-pings // PING_ROUNDS) if pings > 0 else 0
    done, failed = 0, set()
    while done < pings:
        count = min(per_round, pings - done)
        for n in names:
            s = tb.systems[n]
            tb.check_alive(s)
            if s.error or n in failed:
                continue
            try:
                before = process_cpu_ns(s.pids)
                got = tb.ping(s, count)
                cpu[n] += process_cpu_ns(s.pids) - before
                rtts[n] += got
            except XdpoibError as e:
                failed.add(n)
                failures[n].append(f"ping: {e}")
                log(f"  ping {n:>7}: failed: {e}")
        done += count
    for n in names:
        if rtts[n]:
            x = rtt_summary(rtts[n])
            log(f"  ping {n:>7}: {len(rtts[n])} replies, p50 {x['p50']:.1f} us, p99 {x['p99']:.1f} us, "
                f"{cpu[n] / 1e3 / len(rtts[n]):.1f} us of its processes' CPU per round trip")
    return rtts, cpu


def _summary(xs: list[Sample | None], frame: int, error: str | None) -> dict:
    ok = [x for x in xs if x is not None]
    if not ok:
        return {**dict.fromkeys(KEYS), "error": error or "no sample"}
    peak = max(ok, key=lambda x: x.received_pps)
    last = xs[-1]
    out = {"peak_pps": round(peak.received_pps),
           "overload_pps": round(last.received_pps) if last is not None else None,
           "mbps": round(peak.received_pps * frame * 8 / 1e6, 1)}
    j = peak.as_json()
    out.update((k, j[k]) for k in ("cpu_us_per_frame", "agent_us_per_frame", "agent_sys_us_per_frame",
                                   "kernel_us_per_frame", "socket_drop_pct"))
    if error:
        out["error"] = error
    return out


def _result(tb, sizes, rates, frames, samples, tcp, failures, seconds, tcp_seconds) -> dict:
    errors = {}
    for n, s in tb.systems.items():
        if s.error or failures[n]:
            errors[n] = "; ".join(([s.error] if s.error else []) + failures[n])
    systems = tb.systems
    res = {
        "sizes": {sz: {n: _summary(samples[sz][n], frame_bytes(sz, s.mtu), errors.get(n)) for n, s in systems.items()}
                  for sz in sizes},
        "tcp_mbps": {n: None if v is None else round(v, 1) for n, v in tcp.items()},
        "frames": {sz: {"frame_bytes": fb, "udp_payload": fb - ETH_HLEN - IP_UDP_HLEN} for sz, fb in frames.items()},
        "mtu": tb.mtu,
        "mtus": {n: s.mtu for n, s in systems.items() if s.mtu},
        "tcp_mtu": tb.mtu,
        "ib_mtu_4096": tb.ib_mtu_4096,
        "rates": rates,
        "seconds": seconds,
        "tcp_seconds": tcp_seconds,
        "samples": {sz: {n: [x.as_json() if x else None for x in samples[sz][n]] for n in systems} for sz in sizes},
        "datapaths": {n: s.datapath for n, s in systems.items() if s.datapath},
        "errors": errors,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "setup": {"prefix": tb.tag, "netns": [ns for s in systems.values() for ns in s.ns],
                  "fabrics": list(tb.fabrics)},
    }
    return res


def ratios(res: dict) -> list[dict]:
    """The targets, each with its value from this run: ratios between systems (or, for the agents' CPU,
    a figure) at the smallest frame, at the MTU (or largest) one, on TCP and on the pings' p50. `op` says
    which side of `target` the value should be on, `met` whether it is (None: a figure is missing)."""
    by_frame = sorted(res["sizes"], key=lambda sz: res["frames"][sz]["frame_bytes"])
    small, large = by_frame[0], "MTU" if "MTU" in res["sizes"] else by_frame[-1]

    def get(where, system, key):
        if where == "tcp":
            return res["tcp_mbps"].get(system)
        if where == "rtt":
            return (res.get("rtt_us", {}).get(system) or {}).get(key)
        return res["sizes"][where].get(system, {}).get(key)

    wanted = [("xdpoib peak / veth peak", small, "xdpoib", "peak_pps", "veth", "peak_pps", ">=", 0.8),
              ("xdpoib peak / naive peak", small, "xdpoib", "peak_pps", "naive", "peak_pps", ">=", 4.0),
              ("xdpoib CPU / vxlan CPU", small, "xdpoib", "cpu_us_per_frame", "vxlan", "cpu_us_per_frame", "<=", 3.0),
              ("xdpoib agent CPU us/frame", small, "xdpoib", "agent_us_per_frame", None, None, "<=", 2.0),
              ("xdpoib overload / xdpoib peak", small, "xdpoib", "overload_pps", "xdpoib", "peak_pps", ">=", 0.9),
              ("xdpoib peak / ceiling peak", small, "xdpoib", "peak_pps", "ceiling", "peak_pps", ">=", 0.8)]
    if large != small:
        wanted.append(("xdpoib Mbit/s / veth Mbit/s", large, "xdpoib", "mbps", "veth", "mbps", ">=", 0.5))
    wanted += [("xdpoib TCP / veth TCP", "tcp", "xdpoib", None, "veth", None, ">=", 0.3),
               ("xdpoib RTT p50 / naive RTT p50", "rtt", "xdpoib", "p50", "naive", "p50", "<=", 0.5)]
    out = []
    for name, where, a, ka, b, kb, op, target in wanted:
        if a not in res["tcp_mbps"] or (b and b not in res["tcp_mbps"]):
            continue                                # a system that was not asked for
        x = get(where, a, ka)
        if b is None:
            value = None if x is None else round(x, 2)
        else:
            y = get(where, b, kb)
            value = round(x / y, 2) if x is not None and y else None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"name": name, "size": where if where not in ("tcp", "rtt") else None, "where": where,
                    "value": value, "op": op, "target": target, "met": met})
    return out


def format_table(res: dict) -> str:
    """The result as a readable report: one table per size, TCP, the ratios against their targets."""
    m = res["machine"]
    lines = [f"xdpoib bench e2e, {res['date']}, {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}",
             f"UDP (iperf3), {res['seconds']} s per sample, offered "
             f"{', '.join(rate_label(r) for r in res['rates'])} pps; eth4 MTU {res['mtu']}"
             + "".join(f", {n} {v}" for n, v in res["mtus"].items() if v != res["mtu"])]
    ub = res.get("udp_buffer")
    if ub:
        lines.append("UDP socket buffers: the system's default" if not ub["requested"] else
                     f"UDP socket buffers: {ub['requested']} bytes asked for (-w), net.core.rmem_max "
                     f"{ub['rmem_max']}, so {ub['socket_rcvbuf']} per socket")

    def num(v, fmt):
        return format("-", f">{fmt.split('.')[0]}") if v is None else format(v, fmt)

    for sz, row in res["sizes"].items():
        fr = res["frames"][sz]
        lines += ["", f"{fr['frame_bytes']}-byte frames{' (MTU)' if sz == 'MTU' else ''}, "
                  f"UDP payload {fr['udp_payload']} B",
                  f"  {'system':<8} {'peak kpps':>10} {'overload kpps':>14} {'Mbit/s':>9} "
                  f"{'CPU us/frame':>13} {'agent us':>9} {'(in kernel)':>12} {'kernel us':>10} {'socket drop %':>14}"]
        for n, v in row.items():
            pk = None if v["peak_pps"] is None else v["peak_pps"] / 1000
            ov = None if v["overload_pps"] is None else v["overload_pps"] / 1000
            lines.append(f"  {n:<8} {num(pk, '10.1f')} {num(ov, '14.1f')} {num(v['mbps'], '9.1f')} "
                         f"{num(v['cpu_us_per_frame'], '13.2f')} {num(v.get('agent_us_per_frame'), '9.2f')} "
                         f"{num(v.get('agent_sys_us_per_frame'), '12.2f')} "
                         f"{num(v.get('kernel_us_per_frame'), '10.2f')} {num(v.get('socket_drop_pct'), '14.1f')}")
    lines += ["", f"TCP (iperf3, {res['tcp_seconds']} s, MTU {res.get('tcp_mtu', res['mtu'])}), Mbit/s received"]
    lines += [f"  {n:<8} {num(v, '10.1f')}" for n, v in res["tcp_mbps"].items()]
    big = res.get("ib_mtu_4096")
    if big:
        lines.append(f"  IB MTU 4096: {big['detail']}")
    if res.get("rtt_us"):
        p = res["pings"]
        lines += ["", f"ping round trip (us; {p['count']} pings, {p['interval_ms']:g} ms apart)",
                  f"  {'system':<8} {'p50':>9} {'p99':>9} {'replies':>8} {'CPU us':>8}"]
        cpu = res.get("rtt_cpu_us") or {}
        lines += [f"  {n:<8} {num(v['p50'], '9.1f')} {num(v['p99'], '9.1f')} {p['replies'].get(n, 0):>8} "
                  f"{num(cpu.get(n), '8.1f')}" for n, v in res["rtt_us"].items()]
    lines += ["", "targets" if res["ratios"] else "targets: none (they need xdpoib and its baselines)"]
    for r in res["ratios"]:
        where = {"tcp": "TCP", "rtt": "ping"}.get(r.get("where"), "")
        where = where or f"{res['frames'][r['size']]['frame_bytes']} B"
        met = {True: "met", False: "not met", None: "-"}[r.get("met")]
        lines.append(f"  {where:>7}  {r['name']:<32} {num(r['value'], '6.2f')}   "
                     f"({r.get('op', '>=')} {r['target']:g}: {met})")
    for n, e in res["errors"].items():
        lines.append(f"  note: {n}: {e}")
    return "\n".join(lines)


def write_plot(res: dict, path: str) -> None:
    """Offered vs received pps per system, one panel per size, and the ping round trips (p50 and p99 per
    system) in a last panel, as a PNG (matplotlib, Agg backend)."""
    try:
        import matplotlib
    except ImportError:
        raise PrerequisiteError("--plot needs matplotlib (Debian: python3-matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(res["samples"])
    rtt = res.get("rtt_us") or {}
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5 * (len(sizes) + 1), 4.5), squeeze=False)
    for ax, sz in zip(axes[0], sizes, strict=False):
        top = 1.0
        for n, pts in res["samples"][sz].items():
            xy = [(p["offered_pps"], p["received_pps"]) for p in pts if p and p["offered_pps"] > 0]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=n)
                top = max(top, *(x for x, _ in xy))
        ax.plot([1e3, top], [1e3, top], ls=":", color="grey", label="received = offered")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{res['frames'][sz]['frame_bytes']}-byte frames{' (MTU)' if sz == 'MTU' else ''}")
        ax.set_xlabel("offered pps")
        ax.set_ylabel("received pps")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    ax = axes[0][-1]
    names = list(rtt)
    for i, (key, shade) in enumerate((("p50", 0.9), ("p99", 0.5))):
        vals = [rtt[n][key] or 0 for n in names]
        ax.bar([j + (i - 0.5) * 0.4 for j in range(len(names))], vals, width=0.4, label=key, alpha=shade)
    ax.set_xticks(range(len(names)), names)
    if any(v and v > 0 for x in rtt.values() for v in x.values()):
        ax.set_yscale("log")
    ax.set_ylabel("round trip, us")
    p = res.get("pings") or {}
    ax.set_title(f"ping round trip ({p.get('count', 0)} pings, {p.get('interval_ms', 0):g} ms apart)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    m = res["machine"]
    fig.suptitle(f"xdpoib bench e2e, {res['date'][:10]}, {m['cpu']}, {m['cpus']} CPUs", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def join_child() -> int:
    """`python -m xdpoib.bench.e2e join`, run as a fabric host: join the broadcast group as a full
    member and print `{"mtu": BYTES}` (the group's IB MTU), or the SA's refusal on stderr, exit 1."""
    from xdpoib.fabric.sa import JOIN_FULL, SAClient
    from xdpoib.wire.mgid import broadcast_mgid

    try:
        sa = SAClient.open()
        try:
            rec = sa.join(broadcast_mgid(), JOIN_FULL)
            sa.leave(broadcast_mgid(), JOIN_FULL)
        finally:
            sa.close()
    except XdpoibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"mtu": rec.mtu_bytes}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["join"]:
        sys.exit("usage: python -m xdpoib.bench.e2e join")
    sys.exit(join_child())
