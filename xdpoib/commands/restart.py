"""`xdpoib restart`: replace an attachment's agent without taking eth4 away (make-before-break).

A successor agent is built beside the running one and takes its AF_XDP socket over; the old agent
drains its old QPs for a grace period and exits (xdpoib/agent/handover.py). `systemctl reload
xdpoib@NAME` runs this; `xdpoib up` runs it for attachments whose agent runs other code (an upgrade).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from xdpoib import state
from xdpoib.errors import UsageError, XdpoibError

NAME = "restart"
HELP = "restart an attachment's agent without taking its interface away (make-before-break)"
ROOT = "the new agent opens the fabric's umad port and takes over the XDP programs"
EPILOG = """The new agent is built while the running one forwards (QPs, joins, programs compiled if the
build changed, maps adopted or rebuilt for another ABI), then takes over the AF_XDP socket in one step
and announces its new QPNs; the old agent keeps delivering what reaches its old QPs for a grace period
(--grace, 3 s by default, longer while such frames still come, at most 10 s) and exits. If the new agent
fails before the handover, the running one serves on and restart says why. The new agent runs on the
CPUs the running one was allowed (pinned with taskset or systemd's CPUAffinity=), whoever restarts it.

examples:
  xdpoib restart eth4
  xdpoib restart eth5 --netns blue
  xdpoib restart blue:eth5          the same (systemctl reload xdpoib@blue:eth5)
  xdpoib restart --upgraded         every attachment whose agent runs older code (after apt upgrade)
"""
READY_TIMEOUT = 120.0           # a new build compiles first (~3-5 s here; more on a loaded host)


def configure(p):
    p.add_argument("ifname", metavar="IFNAME", nargs="?", help="the attached interface (or NETNS:IFNAME)")
    p.add_argument("--upgraded", action="store_true",
                   help="instead of IFNAME: every attachment whose agent runs other code than the one "
                        "installed (what the Debian package runs after an upgrade)")
    p.add_argument("--netns", metavar="NS", help="network namespace of IFNAME")
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="how long the old agent keeps delivering frames sent to its old QPNs (default 3)")


def resolve(args) -> state.AttachSpec:
    ifname, netns = args.ifname, args.netns
    if not ifname:
        raise UsageError("name the attached interface (IFNAME), or give --upgraded")
    check_grace(args)
    if ":" in ifname and netns is None:          # NETNS:IFNAME (':' is not allowed in interface names)
        netns, _, ifname = ifname.rpartition(":")
    spec = state.find(ifname, netns)
    if not state.pid_alive(spec.pid):
        raise XdpoibError(f"the agent of {spec.where} is not running (pid {spec.pid}): "
                          f"use xdpoib attach to start it again")
    return spec


def restart(spec: state.AttachSpec, grace: float | None = None, env: dict | None = None) -> dict:
    """Start a successor for spec's running agent and wait until it serves; returns what happened
    (`old_pid`, `pid`, `seconds`, `handover_ms`). XdpoibError (the running agent serving on) on failure."""
    from xdpoib import control
    from xdpoib.commands.attach import last_error, spawn_agent

    old_pid = spec.pid
    env = dict(os.environ if env is None else env)
    if grace is not None:
        env["XDPOIB_HANDOVER_GRACE"] = f"{grace:g}"
    t0 = time.monotonic()
    with cpus_of(old_pid):
        proc = spawn_agent(spec, successor=True, env=env)
    sock = state.socket_path(spec.id)
    deadline = t0 + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = last_error(spec.id)
            if serving(sock, old_pid):
                raise XdpoibError(f"restart of {spec.where} failed: {why}; the running agent (pid {old_pid}) "
                                  f"serves on")
            pid = fall_back(spec, old_pid)
            raise XdpoibError(f"restart of {spec.where} failed after the handover: {why}; a fresh agent "
                              f"(pid {pid}) serves now, after a stop and start")
        try:
            st = control.request(sock, "status", timeout=2.0)
        except control.ControlError:
            st = None
        if st and st["attachment"]["pid"] == proc.pid and st["attachment"]["state"] == "running":
            return {"old_pid": old_pid, "pid": proc.pid, "seconds": round(time.monotonic() - t0, 2),
                    "handover_ms": st["attachment"].get("handover_ms")}
        time.sleep(0.05)
    state.stop_pid(proc.pid)
    raise XdpoibError(f"the new agent for {spec.where} was not ready after {READY_TIMEOUT:.0f} s: "
                      f"{last_error(spec.id)}; the running agent (pid {old_pid}) serves on")


@contextmanager
def cpus_of(pid: int):
    """Agents started in the block run on the CPUs agent `pid` may run on (its affinity, set by the operator
    with `taskset` or systemd's CPUAffinity=): a successor keeps its predecessor's placement, whoever runs
    the restart. The calling thread takes that affinity for the block (a child inherits it at fork)."""
    try:
        cpus, mine = os.sched_getaffinity(pid), os.sched_getaffinity(0)
    except OSError:                     # gone already: no placement to keep
        yield
        return
    if cpus == mine:
        yield
        return
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def check_grace(args) -> None:
    if args.grace is not None and not 0.0 <= args.grace <= 60.0:
        raise UsageError(f"--grace must be between 0 and 60 seconds, not {args.grace:g}")


def runs_other_code(spec: state.AttachSpec) -> bool:
    """Whether spec's agent answers and runs other code than this installation's (an upgrade since)."""
    from xdpoib import control

    try:
        code = control.request(state.socket_path(spec.id), "status", timeout=5.0)["attachment"].get("code")
    except control.ControlError:
        return False
    return code not in (None, state.code_id())


def upgraded() -> list[state.AttachSpec]:
    """Running attachments whose agent runs other code than this installation's."""
    return [spec for spec in state.attachments() if state.pid_alive(spec.pid) and runs_other_code(spec)]


def serving(sock, pid: int) -> bool:
    """Whether the agent `pid` still answers at `sock` and serves (it did not hand over)."""
    from xdpoib import control

    try:
        st = control.request(sock, "status", timeout=2.0)["attachment"]
    except control.ControlError:
        return False
    return st["pid"] == pid and st["state"] == "running"


def fall_back(spec: state.AttachSpec, old_pid: int) -> int:
    """A new agent that died after the old one handed over: nobody serves. Stop the old one (it only
    drains) and start a fresh agent, which adopts the links and the pins as after a crash."""
    from xdpoib.commands.attach import start_agent

    with cpus_of(old_pid):
        state.stop_pid(old_pid, timeout=5.0)
        return start_agent(spec, keep_log=True)


def run(args) -> int:
    if args.upgraded:
        if args.ifname or args.netns:
            raise UsageError("--upgraded restarts every upgraded attachment: give no IFNAME or --netns")
        check_grace(args)
        failed = 0
        for spec in upgraded():
            try:
                r = restart(spec, args.grace)
                print(f"{spec.where}: restarted (agent pid {r['old_pid']} -> {r['pid']})")
            except XdpoibError as e:
                failed += 1
                print(f"{spec.where}: error: {e}")
        return 1 if failed else 0
    spec = resolve(args)
    r = restart(spec, args.grace)
    print(f"{spec.where}: restarted (agent pid {r['old_pid']} -> {r['pid']}, {r['seconds']:.1f} s; "
          f"handover {r['handover_ms']} ms; the old agent drains its QPs, then exits)")
    sys.stdout.flush()
    return 0
