"""What another user can and cannot do: as nobody, every command that needs root says so in one line
and changes nothing (no empty `(none)` answers); an attachment's runtime and state files are root-only
(directories 0700, files and socket 0600) and nobody can read them or connect to the agent; the exporter
listens on loopback unless told otherwise. Runs as nobody from a world-readable copy (tests/nonroot.py),
so it passes from a checkout other users cannot read."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from labkit import XDPOIB, attached, nsexec
from labkit import xdpoib as x
from nonroot import NobodyTree
from prereq import need_cmd

from xdpoib import state

SIM_HOSTS = 2


@pytest.fixture(scope="module")
def nobody():
    tree = NobodyTree()
    yield tree
    tree.close()


@pytest.fixture(scope="module")
def pair(sim_fabric):
    """eth4 attached in two namespaces (h1, h2), 10.81.0.1 and .2, after one ping (so peers are persisted)."""
    need_cmd("ip", "ping")
    with attached(sim_fabric, ["h1", "h2"], net="10.81.0", prefix="xq") as names:
        r = nsexec(names[0], "ping", "-c", "2", "-i", "0.2", "-W", "3", "10.81.0.2", check=False)
        assert r.returncode == 0, r.stdout
        yield sim_fabric, names


def root_commands(fab: str, ns: str) -> list[list[str]]:
    """Every command that needs root, with arguments that would work for root."""
    return [["status"], ["status", "eth4", "--netns", ns], ["peers", "eth4", "--netns", ns],
            ["groups", "eth4", "--netns", ns], ["attach", "eth9", "--sim", f"{fab}:h1"],
            ["detach", "eth4", "--netns", ns], ["up"], ["down"], ["run", f"{ns}:eth4"], ["exporter"],
            ["exporter", "--once"], ["demo"], ["sim", "show", fab], ["sim", "down", fab],
            ["sim", "up", "nobodysfabric"], ["bench", "datapath"],
            ["capture", "eth4", "--netns", ns, "-w", "/tmp/nobody.pcap", "-c", "1"],
            ["vif", "list", "eth4", "--netns", ns], ["restart", "eth4", "--netns", ns], ["restart", "--upgraded"]]


def test_every_root_command_refuses_nobody_in_one_line_and_changes_nothing(pair, nobody):
    fab, (ns1, _) = pair
    before = json.loads(x("status", "eth4", "--netns", ns1, "-j").stdout)["attachment"]
    cmds = root_commands(fab.name, ns1)
    # every command of the CLI is here, or runs for anyone (doctor reports root as one of its checks)
    from xdpoib.cli import build_parser

    assert {c[0] for c in cmds} | {"doctor"} == set(build_parser()._subparsers._group_actions[0].choices)
    for argv in cmds:
        r = nobody.run(*argv)
        assert r.returncode == 1 and not r.stdout, (argv, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"xdpoib: error: xdpoib {argv[0]} must run as root ("), \
            (argv, r.stderr)
    # nothing changed: the attachment and the fabric are as they were
    after = json.loads(x("status", "eth4", "--netns", ns1, "-j").stdout)["attachment"]
    assert (after["pid"], after["state"]) == (before["pid"], "running")
    assert fab.running()


def test_files_and_socket_are_root_only(pair, nobody):
    _, (ns1, _) = pair
    aid = state.attachment_id("eth4", ns1)
    persisted = state.persist_path(aid)
    deadline = time.monotonic() + 15          # the agent persists learned peers within a few seconds
    while not persisted.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    paths = {"run dir": state.run_dir(), "state dir": state.state_dir(), "spec": state.spec_path(aid),
             "socket": state.socket_path(aid), "log": state.log_path(aid), "state": persisted}
    modes = {k: (stat.S_IMODE(os.stat(p).st_mode), os.stat(p).st_uid) for k, p in paths.items()}
    assert modes == {"run dir": (0o700, 0), "state dir": (0o700, 0), "spec": (0o600, 0), "socket": (0o600, 0),
                     "log": (0o600, 0), "state": (0o600, 0)}, modes
    assert stat.S_ISSOCK(os.stat(paths["socket"]).st_mode)
    # as nobody: no file can be read, the socket cannot be reached
    probe = f"""
import json, socket
out = {{}}
for name, path in {json.dumps({k: str(p) for k, p in paths.items() if k not in ("run dir", "state dir")})}.items():
    try:
        if name == "socket":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
        else:
            open(path).read()
        out[name] = "allowed"
    except PermissionError:
        out[name] = "denied"
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""
    r = nobody.run_python(probe)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"spec": "denied", "socket": "denied", "log": "denied", "state": "denied"}


def listening(pid: int) -> set[str]:
    """The TCP listening addresses (`ADDR:PORT`, IPv4 and IPv6 in /proc hex form) in `pid`'s namespace."""
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        out |= {f"{table}:{ln.split()[1]}" for ln in lines if ln.split()[3] == "0A"}
    return out


@pytest.mark.parametrize("listen, expect", [
    (None, {"tcp:0100007F:25AD"}),                          # 127.0.0.1:9645
    ("0.0.0.0:9646", {"tcp:00000000:25AE"}),
])
def test_the_exporter_listens_on_loopback_unless_told(listen, expect):
    """In a network namespace of its own (port 9645 may be taken in ours): only 127.0.0.1:9645 by default."""
    need_cmd("unshare", "ip")
    cmd = " ".join([*XDPOIB, "exporter", *(["--listen", listen] if listen else [])])
    p = subprocess.Popen(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {cmd}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ours = os.readlink("/proc/self/ns/net")

        def ready() -> bool:        # in its own namespace (unshare done) and listening there
            try:
                return os.readlink(f"/proc/{p.pid}/ns/net") != ours and bool(listening(p.pid))
            except OSError:
                return False

        deadline = time.monotonic() + 15
        while not ready() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.poll() is None, p.stderr.read()
        assert listening(p.pid) == expect
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_the_exporter_unit_keeps_loopback_as_its_default():
    unit = (Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "xdpoib-exporter.service").read_text()
    assert "Environment=XDPOIB_EXPORTER_LISTEN=127.0.0.1:9645\n" in unit
    assert "--listen ${XDPOIB_EXPORTER_LISTEN}" in unit
