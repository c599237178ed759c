"""Where attachments live on disk, and the spec that describes one.

An attachment is identified by (netns, ifname). Its files (root only: the directories are 0700, the
files 0600, the agent runs with umask 077):
- `/run/xdpoib/<id>.json`  the spec and the agent's PID (present while attached),
- `/run/xdpoib/<id>.sock`  the agent's root-only control socket,
- `/run/xdpoib/<id>.log`   the agent's log,
- `/var/lib/xdpoib/<id>.json`  persisted identities (REMACs, peer and group ids) across restarts,
- `/etc/xdpoib/attachments.conf`  attachments `xdpoib up` brings up: one `xdpoib attach` argument
  list per line, `#` comments.
`XDPOIB_RUN_DIR`, `XDPOIB_STATE_DIR` and `XDPOIB_CONFIG` override the locations (tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xdpoib.errors import UsageError

_CODE_ID: str | None = None


def code_id() -> str:
    """What this process runs: a digest of xdpoib's version, its Python files, the BPF sources and the
    build asked for (XDPOIB_BPF_BUILD), fixed at the first call (an agent calls it as it starts, so an
    upgrade on disk does not change the answer of a running agent). `xdpoib up` restarts an attachment
    whose agent runs other code."""
    global _CODE_ID
    if _CODE_ID is None:
        import xdpoib
        from xdpoib.datapath.loader import BPF_DIR, BUILD_ENV

        h = hashlib.sha256(xdpoib.__version__.encode())
        h.update(os.environ.get(BUILD_ENV, "").encode())
        pkg = Path(xdpoib.__file__).parent
        for root in (pkg, BPF_DIR):
            for p in sorted(root.rglob("*")):
                if p.suffix in (".py", ".c", ".h") and "__pycache__" not in p.parts and p.is_file():
                    h.update(str(p.relative_to(root)).encode())
                    h.update(p.read_bytes())
        _CODE_ID = h.hexdigest()[:16]
    return _CODE_ID


def run_dir() -> Path:
    """The runtime directory (created 0700 on demand)."""
    return Path(os.environ.get("XDPOIB_RUN_DIR", "/run/xdpoib"))


def state_dir() -> Path:
    """The persistent state directory."""
    return Path(os.environ.get("XDPOIB_STATE_DIR", "/var/lib/xdpoib"))


def config_path() -> Path:
    """The attachments file that `xdpoib up`/`down` read."""
    return Path(os.environ.get("XDPOIB_CONFIG", "/etc/xdpoib/attachments.conf"))


def attachment_id(ifname: str, netns: str | None) -> str:
    """A file-name-safe id for (netns, ifname): `NS@IFNAME`, or `@IFNAME` in the root namespace."""
    return f"{netns or ''}@{ifname}"


def link_tag(aid: str) -> str:
    """8 hex digits naming an attachment's own links (xo… internal end, xa…/xb… anchor), so they fit
    IFNAMSIZ and never collide between attachments."""
    return hashlib.sha1(aid.encode()).hexdigest()[:8]


@dataclass
class AttachSpec:
    """Everything an agent needs to bring one attachment up; also what `status` shows of it."""

    ifname: str
    netns: str | None = None
    mode: str = "veth"                  # veth | tap
    pkey: int = 0xFFFF
    backend: str = "sim"                # sim | verbs
    fabric: str | None = None           # sim: fabric name
    host: str | None = None             # sim: host name in the fabric
    device: str | None = None           # verbs: HCA device (e.g. mlx5_0)
    port: int = 1
    internal: str | None = None         # the internal veth end (veth mode)
    pid: int | None = None
    vlans: list = field(default_factory=list)   # [[VID, P_Key], ...]: 802.1Q VLANs mapped to partitions
    learn_vifs: int = 0                 # learn up to this many guest MACs behind eth4 as VIFs
    vif_idle: float = 300.0             # release a learned VIF idle this long (seconds; 0: never)
    mac_form: str = "lemac"             # eth4's MAC from the port GUID: lemac | mellanox (wire.addr.MAC_FORMS)
    wait: float = 60.0                  # bring-up waits this long for the partition and its broadcast group
    draining: list = field(default_factory=list)    # pids of agents this one took over from, still draining

    @property
    def id(self) -> str:
        return attachment_id(self.ifname, self.netns)

    @property
    def where(self) -> str:
        """`eth4` or `eth4 in netns NS`, for messages."""
        return f"{self.ifname} in netns {self.netns}" if self.netns else self.ifname

    def port_mac(self, guid: bytes) -> bytes:
        """eth4's MAC for a port GUID, in this attachment's `mac_form`."""
        from xdpoib.wire.addr import port_mac

        return port_mac(guid, self.mac_form)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AttachSpec:
        return cls(**json.loads(text))


def spec_path(aid: str) -> Path:
    return run_dir() / f"{aid}.json"


def socket_path(aid: str) -> Path:
    return run_dir() / f"{aid}.sock"


def log_path(aid: str) -> Path:
    return run_dir() / f"{aid}.log"


def persist_path(aid: str) -> Path:
    return state_dir() / f"{aid}.json"


def ensure_dirs() -> None:
    """Create the runtime and state directories, root-only."""
    for d in (run_dir(), state_dir()):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)


def open_private(path: Path, truncate: bool = True):
    """Open `path` for appending (truncated first unless told otherwise), readable and writable by root
    only (mode 0600). Append mode: two agents of one attachment (a restart) share its log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0), 0o600)
    os.fchmod(fd, 0o600)                # a file that existed keeps its mode otherwise
    return os.fdopen(fd, "wb")


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, mode 0600."""
    tmp = path.with_suffix(".tmp")
    with open_private(tmp) as f:
        f.write(text.encode())
    os.replace(tmp, path)


def write_spec(spec: AttachSpec) -> None:
    """Record a running attachment (atomically, root only)."""
    ensure_dirs()
    write_private(spec_path(spec.id), spec.to_json())


def read_spec(aid: str) -> AttachSpec | None:
    """Return the recorded spec of an attachment, or None."""
    try:
        return AttachSpec.from_json(spec_path(aid).read_text())
    except (OSError, ValueError, TypeError):
        return None


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(utime, stime) of process pid, every thread, in clock ticks (os.sysconf("SC_CLK_TCK") a second),
    from /proc/PID/stat; None when it cannot be read (gone, or not in this PID namespace)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()       # fields 14 and 15, after the command name
        return int(rest[11]), int(rest[12])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int | None) -> bool:
    """Return whether a process exists."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                    # a zombie (killed, not reaped yet) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def attachments() -> list[AttachSpec]:
    """Every recorded attachment (alive or not)."""
    out = []
    d = run_dir()
    if d.is_dir():
        for p in sorted(d.glob("*@*.json")):
            s = read_spec(p.stem)
            if s is not None:
                out.append(s)
    return out


def find(ifname: str, netns: str | None) -> AttachSpec:
    """Return the spec of an attachment or raise a UsageError naming what is attached."""
    s = read_spec(attachment_id(ifname, netns))
    if s is None:
        where = f"{ifname} in netns {netns}" if netns else ifname
        known = ", ".join(a.where for a in attachments()) or "none"
        raise UsageError(f"{where} is not attached (attached: {known})")
    return s


def remove_files(aid: str, keep_state: bool = False, keep_log: bool = True) -> None:
    """Remove an attachment's runtime files (its persisted state unless keep_state, its log unless keep_log)."""
    paths = [spec_path(aid), socket_path(aid)] + ([] if keep_state else [persist_path(aid)])
    paths += [] if keep_log else [log_path(aid)]
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for a process to exit (reaping it if it is our child); True if gone."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return not pid_alive(pid)


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM a process and wait for it to exit (SIGKILL after timeout); True if it was running."""
    if not pid_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)
    return True


def read_config() -> list[list[str]]:
    """Return the argument lists of the attachments file (missing file: none)."""
    import shlex

    p = config_path()
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                out.append(shlex.split(line))
            except ValueError as e:
                raise UsageError(f"{p}:{n}: {e}") from None
    return out
