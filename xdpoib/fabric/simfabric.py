"""The test fabric: ibsim with a generated topology and a real OpenSM on it (docs/design.md §5).

`SimFabric.up(name, hosts=N)` writes a topology (one switch, an HCA `sm` for OpenSM and N hosts `h1..hN`
with fixed GUIDs), starts `ibsim` and `opensm` under their own IBSIM_SOCKNAME, waits until the SA
answers and every host port has a LID, and records the PIDs under `/run/xdpoib/sim/NAME/`, so another
process finds it with `SimFabric.attach(name)` and `down()` tears it down by PID from anywhere.

A process becomes a host by running with `client_env(host)` in `client_cwd(host)` (umad2sim writes
`./sys-<pid>/` there). `spawn(host, argv)` and `sa_client(host)` start such processes and record them,
so `down()` also ends any that were left running. ibsim serves at most 10 clients (OpenSM is one; a
client killed with SIGKILL holds its slot until `free_dead_clients()`), so `up` keeps room for helper
tools: at most 8 hosts. `clients()` lists the attached clients (ibsim console `Attached`).

`up(name, standby="h3")` also runs a standby OpenSM on that host's port, at a lower priority than the
master (`-p`), polling the master every STANDBY_POLL_MS x STANDBY_POLL_RETRIES (opensm.conf; OpenSM's
defaults, 10 s x 4, would make a takeover take 40 s): kill the master and the standby takes over,
sweeps, creates the IPoIB broadcast groups again and becomes every port's SM (a new SM LID: the ports'
clients see CLIENT_REREGISTER). It takes one more ibsim client slot.

Faults go through ibsim's console, a FIFO that ibsim holds open for writing itself (so it never sees
EOF): `unlink(host)`, `relink(host)`, `drop(host, percent)` (MADs to the host's port are lost).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from xdpoib.errors import PrerequisiteError, UsageError, XdpoibError
from xdpoib.fabric.base import gid_str

UMAD2SIM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/umad2sim/libumad2sim.so",
    "/usr/lib/aarch64-linux-gnu/umad2sim/libumad2sim.so",
    "/usr/lib/umad2sim/libumad2sim.so",
    "/usr/local/lib/umad2sim/libumad2sim.so",
)
IBSIM_MAX_CLIENTS = 10
MAX_HOSTS = IBSIM_MAX_CLIENTS - 2          # OpenSM and one helper tool (saquery) at a time
GUID_BASE = 0xF452140300000000             # Mellanox OUI f4:52:14, as in docs/design.md §2's example
SM_NODE_GUID = GUID_BASE | 0x00F00000
SWITCH_GUID = GUID_BASE | 0x00E00000
PARTITION_8003 = 0x8003
SM_NODE = "sm"                             # the SM's own HCA: never faulted, so tools run there
MASTER_PRIORITY, STANDBY_PRIORITY = 8, 1     # OpenSM `-p` when a standby runs (higher wins)
STANDBY_POLL_MS, STANDBY_POLL_RETRIES = 250, 2  # the standby declares the master dead after ~0.5-0.75 s
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


class SimFabricError(XdpoibError):
    """The simulated fabric could not be started, found, changed or stopped."""


@dataclass(frozen=True)
class SimHost:
    """One simulated host: its port GUID, node description and ibsim node id (SIM_HOST)."""

    name: str
    guid: int
    node_desc: str
    nodeid: str

    @property
    def node_guid(self) -> int:
        """The HCA's node GUID (ibsim numbers port 1 as node GUID + 1)."""
        return self.guid - 1

    @property
    def gid(self) -> bytes:
        """The port's GID with the default subnet prefix fe80::/64."""
        return (0xFE80 << 112 | self.guid).to_bytes(16, "big")


def host_port_guid(index: int) -> int:
    """The fixed port GUID of host `h<index>` (1-based): f4:52:14:03:00:00:<index>:01."""
    return GUID_BASE | (index << 8) | 1


def make_hosts(count: int) -> list[SimHost]:
    """The hosts of a fabric with `count` hosts: h1..hN with fixed GUIDs."""
    return [SimHost(f"h{i}", host_port_guid(i), f"h{i} HCA-1", f"h{i}") for i in range(1, count + 1)]


def topology(hosts: list[SimHost]) -> str:
    """An ibnetdiscover-format net file: one switch, the SM's HCA on port 1, host i on port i+1."""
    ports = len(hosts) + 1
    lines = [f"switchguid={SWITCH_GUID:#018x}", f'Switch {max(8, ports)} "sw1" # "xdpoib switch"',
             '[1] "sm"[1]']
    lines += [f'[{i + 2}] "{h.nodeid}"[1]' for i, h in enumerate(hosts)]
    lines += ["", f"caguid={SM_NODE_GUID:#018x}", 'Hca 1 "sm" # "xdpoib sm HCA-1"', '[1] "sw1"[1]']
    for i, h in enumerate(hosts):
        lines += ["", f"caguid={h.node_guid:#018x}", f'Hca 1 "{h.nodeid}" # "{h.node_desc}"',
                  f'[1] "sw1"[{i + 2}]']
    return "\n".join(lines) + "\n"


def default_partitions(hosts: list[SimHost]) -> str:
    """The default partition (every port full) and 0x8003 with all hosts but the last as members."""
    members = [h.guid for h in hosts[:-1]] or [SM_NODE_GUID + 1]
    body = ", ".join(f"{g:#018x}=full" for g in members)
    return ("Default=0x7fff, ipoib, mtu=4 : ALL=full;\n"
            f"P{PARTITION_8003:04x}={PARTITION_8003:#06x}, ipoib, mtu=4 : {body};\n")


def state_root() -> Path:
    """Where fabrics record themselves: /run/xdpoib/sim (XDPOIB_RUN_DIR overrides /run/xdpoib)."""
    return Path(os.environ.get("XDPOIB_RUN_DIR", "/run/xdpoib")) / "sim"


def umad2sim_path() -> str:
    """The installed libumad2sim.so (Debian libumad2sim0)."""
    for p in UMAD2SIM_CANDIDATES:
        if os.path.exists(p):
            return p
    raise PrerequisiteError("libumad2sim.so not found: install libumad2sim0")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (identifies it against PID reuse), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _alive(entry: list[int] | tuple[int, int]) -> bool:
    pid, start = entry
    return _start_time(pid) == start


def _abstract_sockets(prefix: str) -> list[str]:
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    names = [ln.split()[-1] for ln in lines if len(ln.split()) >= 8]
    return [n for n in names if n.startswith("@" + prefix + ":")]


def residue(name: str, pids=()) -> list[str]:
    """What of fabric `name` is still on this machine: live `pids`, its abstract sockets, its state dir."""
    out = [f"pid {p}" for p in pids if _start_time(p) is not None]
    out += _abstract_sockets(f"xdpoib-{name}")
    d = state_root() / name
    if d.exists():
        out.append(str(d))
    return out


class SimFabric:
    """A running ibsim + OpenSM fabric; a context manager whose exit calls `down()`."""

    def __init__(self, name: str, statedir: Path, state: dict):
        self.name = name
        self.statedir = statedir
        self.state = state
        self.workdir = Path(state["workdir"])
        self.sockname = state["sockname"]
        self.hosts = [SimHost(**h) for h in state["hosts"]]
        self._children: dict[int, subprocess.Popen] = {}

    # ---- lifecycle

    @classmethod
    def up(cls, name: str, hosts: int = 2, partitions: str | os.PathLike | None = None,
           workdir: str | os.PathLike | None = None, timeout: float = 30.0,
           standby: str | None = None) -> SimFabric:
        """Start ibsim and OpenSM for `hosts` hosts and wait until the SA answers; see the module doc."""
        if not NAME_RE.match(name or ""):
            raise UsageError(f"bad fabric name {name!r}: letters, digits, '-' and '_', at most 32")
        if not 1 <= hosts <= MAX_HOSTS:
            raise UsageError(f"--hosts must be 1..{MAX_HOSTS} (ibsim serves {IBSIM_MAX_CLIENTS} clients)")
        if standby is not None:
            if standby not in {h.name for h in make_hosts(hosts)}:
                raise UsageError(f"--standby-sm {standby!r}: not a host of this fabric (h1..h{hosts}; the master "
                                 f"runs on the SM's own node)")
            if hosts > MAX_HOSTS - 1:
                raise UsageError(f"--standby-sm takes an ibsim client slot: at most {MAX_HOSTS - 1} hosts with it")
        for cmd in ("ibsim", "opensm", "saquery"):
            if shutil.which(cmd) is None:
                raise PrerequisiteError(f"command {cmd!r} not found: install ibsim-utils, opensm, "
                                        "infiniband-diags")
        umad2sim_path()
        part_text = None
        if partitions is not None:
            try:
                part_text = Path(partitions).read_text()
            except OSError as e:
                raise UsageError(f"cannot read partitions file {partitions}: {e.strerror}") from None
        statedir = state_root() / name
        if (statedir / "state.json").exists():
            try:
                old = cls.attach(name)
            except SimFabricError:
                old = None
            if old is not None and old.running():
                raise SimFabricError(f"fabric {name!r} is already up (xdpoib sim down {name})")
            if old is not None:
                old.down()
        shutil.rmtree(statedir, ignore_errors=True)
        owned = workdir is None
        wd = statedir if owned else Path(workdir)
        try:
            statedir.mkdir(parents=True)
            wd.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SimFabricError(f"cannot create {e.filename}: {e.strerror} (run as root, or set "
                                 "XDPOIB_RUN_DIR to a writable directory)") from None
        host_list = make_hosts(hosts)
        state = {"name": name, "workdir": str(wd), "owned_workdir": owned, "sockname": f"xdpoib-{name}",
                 "hosts": [asdict(h) for h in host_list], "pids": {}, "standby": standby}
        fab = cls(name, statedir, state)
        try:
            fab._start(part_text or default_partitions(host_list), timeout)
        except BaseException:
            fab.down()
            raise
        return fab

    def _start(self, partitions: str, timeout: float) -> None:
        wd = self.workdir
        (wd / "net").write_text(topology(self.hosts))
        (wd / "partitions.conf").write_text(partitions)
        for d in ("osm", "clients"):
            (wd / d).mkdir(exist_ok=True)
        fifo = wd / "console"
        os.mkfifo(fifo, 0o600)
        self._save()
        env = dict(os.environ, IBSIM_SOCKNAME=self.sockname)
        env.pop("LD_PRELOAD", None)
        # ibsim holds the console FIFO open for reading and writing: it never sees EOF, and any
        # process can write commands into it.
        con = os.open(fifo, os.O_RDWR)
        try:
            with open(wd / "ibsim.log", "wb") as log:
                p = subprocess.Popen(["ibsim", "-s", str(wd / "net")], stdin=con, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=wd, env=env, start_new_session=True)
        finally:
            os.close(con)
        self._record("ibsim", p)
        deadline = time.monotonic() + timeout
        while f"@{self.sockname}:ctl@" not in _abstract_sockets(self.sockname):
            if p.poll() is not None:
                raise SimFabricError(f"ibsim exited ({p.returncode}): {self._tail('ibsim.log')}")
            if time.monotonic() > deadline:
                raise SimFabricError(f"ibsim did not open its sockets in {timeout:.0f}s")
            time.sleep(0.02)
        osm = wd / "osm"
        env = dict(self.client_env(SM_NODE), OSM_TMP_DIR=str(osm), OSM_CACHE_DIR=str(osm))
        empty_conf = osm / "opensm.conf"
        empty_conf.write_text("# defaults; see xdpoib.fabric.simfabric\n")
        with open(osm / "stdout.log", "wb") as out:
            prio = ["-p", str(MASTER_PRIORITY)] if self.standby else []
            p = subprocess.Popen(["opensm", "-F", str(empty_conf), "-f", str(osm / "opensm.log"),
                                  "-P", str(wd / "partitions.conf"), "-g", f"{SM_NODE_GUID + 1:#018x}", *prio],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=osm,
                                 env=dict(os.environ, **env), start_new_session=True)
        self._record("opensm", p)
        self._wait_ready(deadline)
        if self.standby:
            self._start_standby(self.host(self.standby), deadline)

    def _start_standby(self, h: SimHost, deadline: float) -> None:
        """A second OpenSM on `h`'s port at a lower priority, polling the master often; returns once it
        reports STANDBY (its SMInfo, read with `sminfo` from the SM's node)."""
        d = self.workdir / "osm-standby"
        d.mkdir(exist_ok=True)
        conf = d / "opensm.conf"
        conf.write_text("# a standby that notices a dead master quickly (xdpoib.fabric.simfabric)\n"
                        f"sminfo_polling_timeout {STANDBY_POLL_MS}\npolling_retry_number {STANDBY_POLL_RETRIES}\n")
        env = dict(os.environ, **self.client_env(h), OSM_TMP_DIR=str(d), OSM_CACHE_DIR=str(d))
        with open(d / "stdout.log", "wb") as out:
            p = subprocess.Popen(["opensm", "-F", str(conf), "-f", str(d / "opensm.log"),
                                  "-P", str(self.workdir / "partitions.conf"), "-g", f"{h.guid:#018x}",
                                  "-p", str(STANDBY_PRIORITY)],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=d, env=env,
                                 start_new_session=True)
        self._record("opensm-standby", p)
        while self.sm_state(h) != "standby":
            if not _alive(self.state["pids"]["opensm-standby"]):
                raise SimFabricError(f"the standby opensm exited: {self._tail('osm-standby/stdout.log')}")
            if time.monotonic() > deadline:
                raise SimFabricError(f"the standby opensm on {h.name} did not reach STANDBY")
            time.sleep(0.1)

    @property
    def standby(self) -> str | None:
        """The host whose port runs the standby OpenSM (`up(standby=...)`), or None."""
        return self.state.get("standby")

    def sm_state(self, host: SimHost | str) -> str | None:
        """The state of the SM on `host`'s port ("master", "standby", "discovering", "notactive"), or None
        when nothing answers there: its SMInfo (`sminfo LID`, run on the SM's node)."""
        lid = self.lid(host)
        if not lid:
            return None
        env = dict(os.environ, **self.client_env(SM_NODE))
        try:
            r = subprocess.run(["sminfo", str(lid)], env=env, cwd=self.client_cwd(SM_NODE), capture_output=True,
                               text=True, timeout=3)
        except subprocess.TimeoutExpired:
            return None
        m = re.search(r"SMINFO_(\w+)", r.stdout)
        return m.group(1).lower() if r.returncode == 0 and m else None

    def _wait_ready(self, deadline: float) -> None:
        """Poll `saquery -c` until the SA answers, then until every host port has a LID."""
        h = SM_NODE
        while True:
            if not _alive(self.state["pids"]["opensm"]):
                raise SimFabricError(f"opensm exited: {self._tail('osm/stdout.log')}")
            r = self.saquery(h, "-c", timeout=2)
            if r.returncode == 0 and "Capability mask" in r.stdout:
                break
            if time.monotonic() > deadline:
                raise SimFabricError(f"the SA did not answer: {r.stderr.strip()[-200:]}")
            time.sleep(0.05)
        while True:
            missing = [x.name for x in self.hosts if not self.lid(x)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise SimFabricError(f"hosts without a LID: {', '.join(missing)}")
            time.sleep(0.1)

    def lid(self, host: SimHost | str) -> int:
        """The LID the SM gave `host` (0 if none): `saquery PR --dgid` on the SM's node (GetTables are cut
        under umad2sim, so a Get-like query per host)."""
        h = self.host(host)
        r = self.saquery(SM_NODE, "PR", "--dgid", gid_str(h.gid), timeout=3)
        m = re.search(r"^\s*dlid\.+(\d+)", r.stdout, re.M)
        return int(m.group(1)) if r.returncode == 0 and m else 0

    @classmethod
    def attach(cls, name: str) -> SimFabric:
        """Find a fabric that `up` started (maybe in another process) by its name."""
        if not NAME_RE.match(name or ""):
            raise UsageError(f"bad fabric name {name!r}")
        statedir = state_root() / name
        try:
            state = json.loads((statedir / "state.json").read_text())
        except FileNotFoundError:
            raise SimFabricError(f"no fabric named {name!r} (xdpoib sim up {name})") from None
        except (OSError, ValueError) as e:
            raise SimFabricError(f"fabric {name!r}: unreadable state: {e}") from None
        return cls(name, statedir, state)

    def running(self) -> bool:
        """Whether ibsim and an OpenSM (the master, or the standby after a failover) are running."""
        pids = self.state["pids"]
        return "ibsim" in pids and _alive(pids["ibsim"]) and any(
            k in pids and _alive(pids[k]) for k in ("opensm", "opensm-standby"))

    def down(self) -> None:
        """Stop recorded clients, OpenSM and ibsim by PID, then remove the fabric's directories."""
        with contextlib.suppress(OSError, ValueError):
            on_disk = json.loads((self.statedir / "state.json").read_text())
            self.state["pids"] = {**on_disk.get("pids", {}), **self.state.get("pids", {})}
        pids = self.state.get("pids", {})
        clients = [tuple(v) for k, v in pids.items() if k.startswith("client-")]
        order = [clients, [tuple(pids[k]) for k in ("opensm", "opensm-standby") if k in pids],
                 [tuple(pids["ibsim"])] if "ibsim" in pids else []]
        for group in order:
            self._stop(group)
        for p in self._children.values():
            with contextlib.suppress(Exception):
                p.wait(timeout=0)
        self._children.clear()
        if self.state.get("owned_workdir", True):
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            for sub in ("net", "partitions.conf", "console", "ibsim.log", "state.json"):
                with contextlib.suppress(OSError):
                    (self.workdir / sub).unlink()
            for sub in ("osm", "osm-standby", "clients"):
                shutil.rmtree(self.workdir / sub, ignore_errors=True)
        shutil.rmtree(self.statedir, ignore_errors=True)

    def _stop(self, entries: list[tuple[int, int]], grace: float = 5.0) -> None:
        live = [e for e in entries if _alive(e)]
        for pid, _s in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while live and time.monotonic() < deadline:
            for pid, _s in live:
                p = self._children.get(pid)
                if p is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=0.01)
            live = [e for e in live if _alive(e)]
            time.sleep(0.01)
        for pid, _s in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            p = self._children.get(pid)
            if p is not None:
                p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()

    # ---- state

    def _save(self) -> None:
        tmp = self.statedir / f"state.json.{os.getpid()}"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.statedir / "state.json")

    def _record(self, key: str, p: subprocess.Popen) -> None:
        """Remember a process we started (PID + start time), under the state lock."""
        self._children[p.pid] = p
        start = _start_time(p.pid)
        if start is None:
            return
        with open(self.statedir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                on_disk = json.loads((self.statedir / "state.json").read_text())
                self.state["pids"] = {**on_disk.get("pids", {}), **self.state["pids"]}
            except (OSError, ValueError):
                pass
            self.state["pids"][key] = [p.pid, start]
            self._save()

    def _tail(self, rel: str, n: int = 300) -> str:
        try:
            return (self.workdir / rel).read_text(errors="replace")[-n:].strip().replace("\n", " | ")
        except OSError:
            return "(no log)"

    # ---- hosts and clients

    def host(self, host: SimHost | str) -> SimHost:
        """The host named `host` (or the SimHost itself)."""
        if isinstance(host, SimHost):
            return host
        for h in self.hosts:
            if h.name == host:
                return h
        raise UsageError(f"fabric {self.name!r} has no host {host!r} "
                         f"(hosts: {', '.join(h.name for h in self.hosts)})")

    def client_env(self, host: SimHost | str) -> dict[str, str]:
        """The environment that makes a process `host`'s umad client (add it to os.environ)."""
        nodeid = SM_NODE if host == SM_NODE else self.host(host).nodeid
        return {"LD_PRELOAD": umad2sim_path(), "SIM_HOST": nodeid, "IBSIM_SOCKNAME": self.sockname}

    def client_cwd(self, host: SimHost | str) -> str:
        """A scratch working directory for `host`'s clients (umad2sim writes ./sys-<pid>/ there)."""
        d = self.workdir / "clients" / (SM_NODE if host == SM_NODE else self.host(host).name)
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    def _ensure_slot(self) -> None:
        """Refuse clearly when ibsim has no free client slot (an 11th client dies on attach); slots of
        clients killed without detaching are freed first."""
        if len(self.clients()) < IBSIM_MAX_CLIENTS:
            return
        self.free_dead_clients()
        taken = self.clients()
        if len(taken) >= IBSIM_MAX_CLIENTS:
            raise SimFabricError(f"fabric {self.name!r}: ibsim serves at most {IBSIM_MAX_CLIENTS} clients, "
                                 f"all taken (pids {', '.join(str(c['pid']) for c in taken)})")

    def spawn(self, host: SimHost | str, argv: list[str], **popen) -> subprocess.Popen:
        """Start `argv` as `host`'s client; recorded so that `down()` stops it if it is still running."""
        self._ensure_slot()
        env = dict(popen.pop("env", None) or os.environ)
        env.update(self.client_env(host))
        popen.setdefault("cwd", self.client_cwd(host))
        p = subprocess.Popen(argv, env=env, **popen)
        self._record(f"client-{p.pid}", p)
        return p

    def sa_client(self, host: SimHost | str, **kw):
        """An SA client running as `host` in a child process (`xdpoib.fabric.sa_remote.RemoteSAClient`)."""
        from xdpoib.fabric.sa_remote import RemoteSAClient

        self._ensure_slot()
        c = RemoteSAClient(self.client_env(host), cwd=self.client_cwd(host), **kw)
        self._record(f"client-{c.proc.pid}", c.proc)
        return c

    def saquery(self, host: SimHost | str, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        """Run `saquery ARGS` as `host`, or on the SM's node with "sm" (bounded: a client with no ibsim
        would retry forever)."""
        env = dict(os.environ, **self.client_env(host))
        try:
            return subprocess.run(["saquery", *args], env=env, cwd=self.client_cwd(host), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", "timed out")

    # ---- faults

    def console(self, command: str) -> None:
        """Write one command line to ibsim's console."""
        if not self.running():
            raise SimFabricError(f"fabric {self.name!r} is not running")
        fifo = self.workdir / "console"
        if not stat.S_ISFIFO(os.stat(fifo).st_mode):
            raise SimFabricError(f"{fifo} is not ibsim's console FIFO")
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, (command.strip() + "\n").encode())
        finally:
            os.close(fd)

    def unlink(self, host: SimHost | str, wait: bool = False, timeout: float = 10.0) -> None:
        """Take `host`'s port down (ibsim `Unlink`). With `wait`, return once the SA no longer routes to
        it: OpenSM has swept and dropped the port's multicast memberships (a flap shorter than a sweep
        may leave them in place, as on hardware)."""
        h = self.host(host)
        self.console(f'Unlink "{h.nodeid}"[1]')
        if wait:
            self._wait_lid(h, lambda lid: lid == 0, timeout, "still routed after unlink")

    def relink(self, host: SimHost | str, wait: bool = False, timeout: float = 10.0) -> None:
        """Bring `host`'s port back (ibsim `ReLink`); with `wait`, return once the SA routes to it again."""
        h = self.host(host)
        self.console(f'ReLink "{h.nodeid}"[1]')
        if wait:
            self._wait_lid(h, lambda lid: lid > 0, timeout, "not routed after relink")

    def _wait_lid(self, h: SimHost, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ok(self.lid(h)):
            if time.monotonic() > end:
                raise SimFabricError(f"{h.name} {what} ({timeout:.0f}s)")
            time.sleep(0.02)

    def drop(self, host: SimHost | str, percent: int) -> None:
        """Lose `percent` % of the MADs delivered to `host`'s port (ibsim `Error`); 0 restores."""
        if not 0 <= int(percent) <= 100:
            raise UsageError(f"drop percentage must be 0..100, got {percent}")
        self.console(f'Error "{self.host(host).nodeid}"[1] {int(percent)}')

    def clients(self, timeout: float = 5.0) -> list[dict]:
        """ibsim's attached clients (console `Attached`): slot, pid, nodeid, lid, whether it is the SM."""
        log = self.workdir / "ibsim.log"
        start = log.stat().st_size
        self.console("Attached")
        end = time.monotonic() + timeout
        while True:                        # the listing ends with the next prompt
            text = log.read_bytes()[start:].decode(errors="replace")
            if re.search(r"Client \d+:[^\n]*\n(?:Client[^\n]*\n)*sim> ", text) or time.monotonic() > end:
                break
            time.sleep(0.01)
        out = []
        for m in re.finditer(r'Client (\d+): pid (\d+) connected at "([^"]*)" port (0x[0-9a-f]+), lid (\d+), '
                             r'qp (\d+) ?(SM)?', text):
            out.append({"slot": int(m.group(1)), "pid": int(m.group(2)), "nodeid": m.group(3),
                        "port_guid": int(m.group(4), 16), "lid": int(m.group(5)), "sm": bool(m.group(7))})
        return out

    def free_dead_clients(self) -> list[int]:
        """Free the ibsim slots of clients that died without detaching (SIGKILL); return the slots."""
        freed = []
        for c in self.clients():
            if not os.path.exists(f"/proc/{c['pid']}") or _start_time(c["pid"]) is None:
                self.console(f"X {c['slot']}")
                freed.append(c["slot"])
        return freed

    def reload_partitions(self, text: str) -> None:
        """Replace OpenSM's partitions file and make it re-read it (SIGHUP: a new sweep follows)."""
        if not self.running():
            raise SimFabricError(f"fabric {self.name!r} is not running")
        path = self.workdir / "partitions.conf"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        for k in ("opensm", "opensm-standby"):       # both SMs read it (a standby takes it over)
            if k in self.state["pids"] and _alive(self.state["pids"][k]):
                os.kill(self.state["pids"][k][0], signal.SIGHUP)

    def describe(self) -> str:
        """Human-readable summary: name, socket name, hosts and their GUIDs."""
        lines = [f"fabric {self.name}: ibsim pid {self.state['pids'].get('ibsim', ['?'])[0]}, "
                 f"opensm pid {self.state['pids'].get('opensm', ['?'])[0]}"
                 + (f", standby opensm pid {self.state['pids'].get('opensm-standby', ['?'])[0]} on {self.standby}"
                    if self.standby else "") + f", IBSIM_SOCKNAME={self.sockname}",
                 f"  workdir {self.workdir}"]
        for h in self.hosts:
            lines.append(f"  {h.name:<4} guid {h.guid:#018x}  nodeid {h.nodeid!r}  desc {h.node_desc!r}")
        return "\n".join(lines)
