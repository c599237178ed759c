"""The exporter against a stand-in agent (a real control socket, no root): `xdpoib_broadcast_joined` follows
the JoinState of the group the agent joined as its broadcast group, and an agent that cannot answer the
groups request still gets its status metrics (and no broadcast series)."""

from __future__ import annotations

import os
import select
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xdpoib import control, exporter, state
from xdpoib.errors import XdpoibError

STATUS = {"attachment": {"mode": "veth", "pkey": "0xffff", "backend": "sim", "fabric": "f", "host": "h1",
                         "uptime_seconds": 3.0},
          "port": {"gid": "fe80::1", "lid": 2, "state": "active"}, "eth": {"mac": "02:00:00:00:00:01"},
          "peers": 1, "groups": 2, "counters": {}, "drops": {}, "fabric_drops": {}, "datapath": {"kind": "plain"}}


class FakeAgent:
    """Answers `status` and `groups` on an attachment's control socket from a thread."""

    def __init__(self, spec: state.AttachSpec, groups, status: dict | None = None):
        self.groups = groups
        self.status = STATUS if status is None else status
        self.server = control.ControlServer(state.socket_path(spec.id), self.answer)
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def answer(self, req: dict) -> dict:
        if req["cmd"] == "status":
            return self.status
        if req["cmd"] == "groups" and self.groups is not None:
            return {"groups": self.groups}
        raise XdpoibError(f"unknown request {req['cmd']!r}")

    def loop(self) -> None:
        while not self.stop:
            if select.select([self.server], [], [], 0.05)[0]:
                self.server.handle()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.server.close()


def group(why: list[str], join_state: int) -> dict:
    return {"mgid": "ff12:401b:ffff::ffff:ffff", "join_state": join_state, "mlid": 0xC000, "attached": True,
            "why": why}


@pytest.fixture
def agents(tmp_path, monkeypatch):
    monkeypatch.setenv("XDPOIB_RUN_DIR", str(tmp_path))
    started = []

    def start(netns: str, groups, status: dict | None = None) -> None:
        spec = state.AttachSpec(ifname="eth4", netns=netns, fabric="f", host="h1", pid=os.getpid())
        state.write_spec(spec)
        started.append(FakeAgent(spec, groups, status))

    yield start
    for a in started:
        a.close()


def scrape() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(exporter.exposition()):
        for s in fam.samples:
            out.setdefault(s.name, {})[s.labels.get("netns", "")] = s.value
    return out


def test_broadcast_joined_follows_the_broadcast_groups_join_state(agents):
    agents("full", [group(["broadcast"], 1), group(["eth4"], 0)])
    agents("sendonly", [group(["broadcast"], 8), group(["eth4"], 1)])     # only a send-only membership
    agents("gone", [group(["eth4"], 1)])                                  # no broadcast group at all
    agents("old", None)                                                   # an agent without `groups`
    m = scrape()
    assert m["xdpoib_up"] == {"full": 1, "sendonly": 1, "gone": 1, "old": 1}
    assert m["xdpoib_broadcast_joined"] == {"full": 1, "sendonly": 0, "gone": 0}
    assert m["xdpoib_peers"] == {"full": 1, "sendonly": 1, "gone": 1, "old": 1}
    assert "xdpoib_peers_max" not in m          # no pinned maps: the capacity is unknown, not invented


def test_agent_cpu_seconds_are_the_serving_agents_by_mode(agents):
    """`xdpoib_agent_cpu_seconds_total` is the CPU time of the process the agent's status names (here this
    test's own, which burns some first); no series for an agent whose process cannot be read or that
    names none."""
    import subprocess
    import sys
    import time

    def with_pid(pid) -> dict:
        return {**STATUS, "attachment": {**STATUS["attachment"], "pid": pid}}

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    agents("me", [], with_pid(os.getpid()))
    agents("gone", [], with_pid(int(gone)))
    agents("old", [])
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    before = os.times()
    cpu = {}
    for fam in text_string_to_metric_families(exporter.exposition()):
        for smp in fam.samples:
            if smp.name == "xdpoib_agent_cpu_seconds_total":
                cpu[smp.labels["netns"], smp.labels["mode"]] = smp.value
    after = os.times()
    assert set(cpu) == {("me", "user"), ("me", "system")}, cpu
    assert before.user - 0.05 <= cpu["me", "user"] <= after.user + 0.05, (before, cpu, after)
    assert before.system - 0.05 <= cpu["me", "system"] <= after.system + 0.05, (before, cpu, after)
    assert cpu["me", "user"] >= 0.3
