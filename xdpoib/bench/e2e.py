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
seconds is the received rate; the client's count is the offered one. CPU per received frame is the
translating processes' utime + stime (/proc/PID/stat: both agents, or both naive translators; none for
veth and VXLAN) plus the machine's softirq time (/proc/stat), over the sample, divided by the frames
received; /proc counts in clock ticks (10 ms), so it is coarse for short, slow samples. Then TCP: one
iperf3 stream of `tcp_seconds` per system, the server's received Mbit/s. Before measuring, each system
must pass a ping (ARP, and for the agents the first path query); a system that cannot be set up, or
whose translating process dies, keeps an `error` and nulls instead of numbers, and the run goes on.

Per system and size: `peak_pps` (the highest received rate over the offered rates), `overload_pps`
(received at the highest offered rate, the last), `mbps` (Ethernet frame bits per second at the peak)
and `cpu_us_per_frame` (of the peak's sample). The ratios the targets name are computed from these.

Everything the bench creates is named `xe2e<tag>...` (namespaces, TAPs, fabrics; `setup` in the result
names them) and is removed on the way out, in reverse order of creation, even on an error, Ctrl-C or
SIGTERM: agents through `xdpoib detach` (their PID stopped if that fails; the fabric's `down()` then
stops any agent it recorded and a sweep removes what such an agent left), every other process by its
PID, whatever still runs in a namespace by `ip netns pids`, the namespaces last.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from xdpoib.errors import PrerequisiteError, UsageError, XdpoibError
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
KEYS = ("peak_pps", "overload_pps", "mbps", "cpu_us_per_frame")


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


def cpu_ticks(pids: list[int]) -> int:
    """The machine's softirq time plus the utime + stime of `pids`, in clock ticks."""
    with open("/proc/stat") as f:
        total = int(f.readline().split()[7])            # cpu user nice system idle iowait irq softirq
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            total += int(rest[11]) + int(rest[12])
    return total


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
    """One measurement: offered and received packets per second, CPU per received frame."""

    offered_pps: float
    received_pps: float
    cpu_us_per_frame: float | None

    def as_json(self) -> dict:
        cpu = None if self.cpu_us_per_frame is None else round(self.cpu_us_per_frame, 2)
        return {"offered_pps": round(self.offered_pps), "received_pps": round(self.received_pps),
                "cpu_us_per_frame": cpu}


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

    def setup(self) -> None:
        """Create every system; the agents' attaches run side by side."""
        agents = [n for n in self.names if n in AGENT_DATAPATHS]
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

    def _start_agents(self, s: System) -> list[subprocess.Popen]:
        from xdpoib.fabric.simfabric import SimFabric

        self._later(self._sweep, s.ns)               # after the fabric is down: whatever an agent left
        fab = SimFabric.up(f"{self.tag}{CODES[s.name]}", hosts=2)
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
        from xdpoib import state

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
        from xdpoib import state

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
        from xdpoib import state
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
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix=f"{self.tag}-")
            self._later(shutil.rmtree, self._tmp, True)
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

    def udp(self, s: System, frame: int, rate: int, seconds: int) -> Sample:
        """Offer `rate` pps (0: as fast as iperf3 goes) of `frame`-byte frames for `seconds`."""
        payload = frame - ETH_HLEN - IP_UDP_HLEN
        bits = str(rate * payload * 8) if rate else "0"
        t0 = cpu_ticks(s.pids)
        c, srv = self._iperf(s, ["-u", "-b", bits, "-l", str(payload), "-t", str(seconds)], seconds)
        used = cpu_ticks(s.pids) - t0
        try:
            got, sent = srv["end"]["sum"], c["end"]["sum"]
            received = got["packets"] - got["lost_packets"]
            rx_pps = received / got["seconds"] if got["seconds"] else 0.0
            tx_pps = sent["packets"] / sent["seconds"] if sent["seconds"] else 0.0
        except (KeyError, TypeError):
            raise BenchError("iperf3 gave no UDP totals") from None
        cpu = used / os.sysconf("SC_CLK_TCK") * 1e6 / received if received > 0 else None
        return Sample(tx_pps, rx_pps, cpu)

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
            tcp_seconds: int = DEFAULT_TCP_SECONDS, systems=SYSTEMS, log=None) -> dict:
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
            return _measure(tb, list(sizes), list(rates), seconds, tcp_seconds, log)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _measure(tb: Testbed, sizes: list[str], rates: list[int], seconds: int, tcp_seconds: int, log) -> dict:
    frames = {sz: frame_bytes(sz, tb.mtu) for sz in sizes}
    for sz, fb in frames.items():
        if fb > tb.mtu + ETH_HLEN:
            raise BenchError(f"size {sz} is larger than the largest frame here ({tb.mtu + ETH_HLEN} bytes, "
                             f"MTU {tb.mtu})")
    names = list(tb.systems)
    samples: dict[str, dict[str, list[Sample | None]]] = {sz: {n: [] for n in names} for sz in sizes}
    failures: dict[str, list[str]] = {n: [] for n in names}
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
                        x = tb.udp(s, fb, rate, seconds)
                        log(f"{fb:>5} B  offered {rate_label(rate):>9}  {n:>7}: "
                            f"{x.offered_pps / 1000:8.1f} kpps sent, {x.received_pps / 1000:8.1f} kpps received")
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
    return _result(tb, sizes, rates, frames, samples, tcp, failures, seconds, tcp_seconds)


def _summary(xs: list[Sample | None], frame: int, error: str | None) -> dict:
    ok = [x for x in xs if x is not None]
    if not ok:
        return {**dict.fromkeys(KEYS), "error": error or "no sample"}
    peak = max(ok, key=lambda x: x.received_pps)
    last = xs[-1]
    out = {"peak_pps": round(peak.received_pps),
           "overload_pps": round(last.received_pps) if last is not None else None,
           "mbps": round(peak.received_pps * frame * 8 / 1e6, 1),
           "cpu_us_per_frame": None if peak.cpu_us_per_frame is None else round(peak.cpu_us_per_frame, 2)}
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
    res["ratios"] = ratios(res)
    return res


def ratios(res: dict) -> list[dict]:
    """The ratios the targets name: at the smallest frame, at the MTU (or largest) one, and on TCP."""
    by_frame = sorted(res["sizes"], key=lambda sz: res["frames"][sz]["frame_bytes"])
    small, large = by_frame[0], "MTU" if "MTU" in res["sizes"] else by_frame[-1]

    def get(sz, system, key):
        return res["sizes"][sz].get(system, {}).get(key) if sz else res["tcp_mbps"].get(system)

    wanted = [("xdpoib peak / naive peak", small, "xdpoib", "peak_pps", "naive", "peak_pps", 5.0),
              ("xdpoib peak / veth peak", small, "xdpoib", "peak_pps", "veth", "peak_pps", 0.5),
              ("xdpoib overload / xdpoib peak", small, "xdpoib", "overload_pps", "xdpoib", "peak_pps", 0.9),
              ("xdpoib peak / ceiling peak", small, "xdpoib", "peak_pps", "ceiling", "peak_pps", 0.8)]
    if large != small:
        wanted.append(("xdpoib Mbit/s / veth Mbit/s", large, "xdpoib", "mbps", "veth", "mbps", 0.5))
    wanted.append(("xdpoib TCP / veth TCP", None, "xdpoib", None, "veth", None, 0.5))
    out = []
    for name, sz, a, ka, b, kb, target in wanted:
        if a not in res["tcp_mbps"] or b not in res["tcp_mbps"]:
            continue                                # a system that was not asked for
        x, y = get(sz, a, ka), get(sz, b, kb)
        out.append({"name": name, "size": sz, "value": round(x / y, 2) if x and y else None, "target": target})
    return out


def format_table(res: dict) -> str:
    """The result as a readable report: one table per size, TCP, the ratios against their targets."""
    m = res["machine"]
    lines = [f"xdpoib bench e2e, {res['date']}, {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}",
             f"UDP (iperf3), {res['seconds']} s per sample, offered "
             f"{', '.join(rate_label(r) for r in res['rates'])} pps; eth4 MTU {res['mtu']}"
             + "".join(f", {n} {v}" for n, v in res["mtus"].items() if v != res["mtu"])]

    def num(v, fmt):
        return format("-", f">{fmt.split('.')[0]}") if v is None else format(v, fmt)

    for sz, row in res["sizes"].items():
        fr = res["frames"][sz]
        lines += ["", f"{fr['frame_bytes']}-byte frames{' (MTU)' if sz == 'MTU' else ''}, "
                  f"UDP payload {fr['udp_payload']} B",
                  f"  {'system':<8} {'peak kpps':>10} {'overload kpps':>14} {'Mbit/s':>9} {'CPU us/frame':>13}"]
        for n, v in row.items():
            pk = None if v["peak_pps"] is None else v["peak_pps"] / 1000
            ov = None if v["overload_pps"] is None else v["overload_pps"] / 1000
            lines.append(f"  {n:<8} {num(pk, '10.1f')} {num(ov, '14.1f')} {num(v['mbps'], '9.1f')} "
                         f"{num(v['cpu_us_per_frame'], '13.2f')}")
    lines += ["", f"TCP (iperf3, {res['tcp_seconds']} s), Mbit/s received"]
    lines += [f"  {n:<8} {num(v, '10.1f')}" for n, v in res["tcp_mbps"].items()]
    lines += ["", "ratios (target)"]
    for r in res["ratios"]:
        where = f"{res['frames'][r['size']]['frame_bytes']} B" if r["size"] else "TCP"
        lines.append(f"  {where:>7}  {r['name']:<32} {num(r['value'], '6.2f')}   (>= {r['target']:g})")
    for n, e in res["errors"].items():
        lines.append(f"  note: {n}: {e}")
    return "\n".join(lines)


def write_plot(res: dict, path: str) -> None:
    """Offered vs received pps per system, one panel per size, as a PNG (matplotlib, Agg backend)."""
    try:
        import matplotlib
    except ImportError:
        raise PrerequisiteError("--plot needs matplotlib (Debian: python3-matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(res["samples"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.5), squeeze=False)
    for ax, sz in zip(axes[0], sizes, strict=True):
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
    m = res["machine"]
    fig.suptitle(f"xdpoib bench e2e, {res['date'][:10]}, {m['cpu']}, {m['cpus']} CPUs", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
