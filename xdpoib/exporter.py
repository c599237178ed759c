"""The per-host Prometheus exporter: every attachment's BPF counters and agent state, on each scrape.

One exporter serves all attachments of the host (docs/design.md §7). `collect()` builds fresh metric families
on every scrape: BPF counters come from the maps pinned under /sys/fs/bpf/xdpoib/<id>/ (so they survive
agent restarts and are read even while an agent is down), agent state from its control socket (an
agent that does not answer gives `xdpoib_up 0` and nothing else of its own; the scrape goes on).
Labels: `netns` ("" for the root namespace) and `ifname`; never a per-peer label.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from xdpoib import __version__, state
from xdpoib.abi import XdpAction
from xdpoib.errors import XdpoibError
from xdpoib.reasons import DropReason, counts

DEFAULT_LISTEN = "127.0.0.1:9645"
STATUS_TIMEOUT = 2.0
JOIN_FULL = 1           # the FullMember bit of an MCMemberRecord's JoinState
log = logging.getLogger("xdpoib.exporter")

# Every metric this exporter can expose (names as they appear in the exposition text; counters with
# _total, histograms with their _bucket/_sum/_count series). The dashboard test checks its queries
# against this list.
METRICS: dict[str, str] = {
    "xdpoib_build_info": "gauge",
    "xdpoib_up": "gauge",
    "xdpoib_attachment_info": "gauge",
    "xdpoib_port_info": "gauge",
    "xdpoib_agent_uptime_seconds": "gauge",
    "xdpoib_agent_cpu_seconds_total": "counter",
    "xdpoib_peers": "gauge",
    "xdpoib_peers_max": "gauge",
    "xdpoib_vifs": "gauge",
    "xdpoib_broadcast_joined": "gauge",
    "xdpoib_mcast_groups": "gauge",
    "xdpoib_packets_total": "counter",
    "xdpoib_bytes_total": "counter",
    "xdpoib_xdp_actions_total": "counter",
    "xdpoib_frame_kinds_total": "counter",
    "xdpoib_drops_total": "counter",
    "xdpoib_agent_events_total": "counter",
    "xdpoib_sa_queries_total": "counter",
    "xdpoib_sa_query_duration_seconds": "histogram",
}


class ExporterError(XdpoibError):
    """The exporter cannot start (bad listen address, port in use)."""


def series_names() -> set[str]:
    """Every series name the exposition can contain (histograms expand to _bucket, _sum, _count)."""
    out = set()
    for name, kind in METRICS.items():
        out |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return out


def read_bpf_counters(pin_dir: Path) -> dict | None:
    """Per-direction BPF counters from an attachment's pinned stats map, or None if nothing is pinned."""
    from xdpoib.datapath import bpfsys
    from xdpoib.datapath.maps import Maps

    path = pin_dir / "xo_stats"
    if not path.exists():
        return None
    try:
        maps = Maps({"xo_stats": bpfsys.obj_get(str(path))}, owned=True)
    except XdpoibError as e:
        log.warning("cannot open %s: %s", path, e)
        return None
    try:
        return maps.report()
    finally:
        maps.close()


def map_capacity(path: Path) -> int | None:
    """The `max_entries` of a pinned map (the kernel reports it in the fd's fdinfo), or None."""
    from xdpoib.datapath import bpfsys

    if not path.exists():
        return None
    try:
        fd = bpfsys.obj_get(str(path))
    except XdpoibError as e:
        log.warning("cannot open %s: %s", path, e)
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key == "max_entries":
                    return int(val)
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)
    return None


def agent_cpu(pid) -> tuple[float, float] | None:
    """(user, system) CPU seconds of process pid, every thread; None when it cannot be read (gone, or in a
    PID namespace this exporter does not see)."""
    t = state.cpu_ticks(pid) if isinstance(pid, int) and pid > 0 else None
    if t is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return t[0] / tick, t[1] / tick


def agent_status(spec: state.AttachSpec) -> dict | None:
    """The agent's status answer, or None if it is not running or does not answer.

    The answer gains `broadcast_joined` (from a second request, `groups`): whether the agent holds a full
    membership of its partition's broadcast group; missing if the agent did not answer that request.
    """
    from xdpoib import control

    if not state.pid_alive(spec.pid):
        return None
    sock = state.socket_path(spec.id)
    try:
        st = control.request(sock, "status", timeout=STATUS_TIMEOUT)
    except control.ControlError as e:
        log.warning("%s: %s", spec.where, e)
        return None
    try:
        groups = control.request(sock, "groups", timeout=STATUS_TIMEOUT).get("groups", [])
        st["broadcast_joined"] = any("broadcast" in g.get("why", ()) and int(g.get("join_state", 0)) & JOIN_FULL
                                     for g in groups)
    except (control.ControlError, AttributeError, TypeError, ValueError) as e:
        log.warning("%s: groups: %s", spec.where, e)
    return st


class _Families:
    """The metric families of one scrape, filled attachment by attachment."""

    def __init__(self):
        lab = ["netns", "ifname"]
        g, c = GaugeMetricFamily, CounterMetricFamily
        self.up = g("xdpoib_up", "1 if the attachment's agent answers on its control socket", labels=lab)
        self.attachment = InfoMetricFamily("xdpoib_attachment", "How the attachment is configured",
                                           labels=lab)
        self.port = InfoMetricFamily("xdpoib_port", "The fabric port's identity and state", labels=lab)
        self.uptime = g("xdpoib_agent_uptime_seconds", "Seconds since the agent started", labels=lab)
        self.cpu = c("xdpoib_agent_cpu_seconds", "CPU time of the attachment's serving agent, by mode (its data "
                     "plane is one thread: near one second per second it is saturated)", labels=[*lab, "mode"])
        self.peers = g("xdpoib_peers", "Remote hosts the attachment knows (resolved or not)", labels=lab)
        self.peers_max = g("xdpoib_peers_max", "Peers the datapath's peer table can hold (its pinned map's size)",
                           labels=lab)
        self.vifs = g("xdpoib_vifs", "VIFs behind the attachment (eth4's own MAC and guests), by origin",
                      labels=[*lab, "origin"])
        self.bcast = g("xdpoib_broadcast_joined",
                       "1 if the agent is a full member of its partition's broadcast group", labels=lab)
        self.groups = g("xdpoib_mcast_groups", "Multicast groups of the attachment, by join state",
                        labels=[*lab, "state"])
        self.packets = c("xdpoib_packets", "Frames seen by the XDP programs (tx: from eth4, rx: injected)",
                         labels=[*lab, "direction"])
        self.bytes = c("xdpoib_bytes", "Bytes seen by the XDP programs", labels=[*lab, "direction"])
        self.actions = c("xdpoib_xdp_actions", "XDP verdicts of the datapath programs",
                         labels=[*lab, "direction", "action"])
        self.kinds = c("xdpoib_frame_kinds", "Frames the TX program handed the agent, by metadata kind",
                       labels=[*lab, "direction", "kind"])
        self.drops = c("xdpoib_drops", "Frames dropped, by where (tx, rx: BPF; agent; fabric) and reason",
                       labels=[*lab, "direction", "reason"])
        self.events = c("xdpoib_agent_events", "Agent events (joins, rejoins, paths resolved, frames moved)",
                        labels=[*lab, "event"])
        self.sa = c("xdpoib_sa_queries", "SA queries, by type and result", labels=[*lab, "type", "result"])
        self.sa_time = HistogramMetricFamily("xdpoib_sa_query_duration_seconds",
                                             "SA query durations (answered or not)", labels=[*lab, "type"])

    def all(self) -> list:
        """Every family, in exposition order."""
        return [self.up, self.attachment, self.port, self.uptime, self.cpu, self.peers, self.peers_max, self.vifs,
                self.bcast, self.groups, self.packets, self.bytes, self.actions, self.kinds, self.drops, self.events,
                self.sa, self.sa_time]

    def add_bpf(self, lab: list[str], bpf: dict) -> None:
        """BPF counters of one attachment (from its pinned maps)."""
        for d, c in bpf.items():
            self.packets.add_metric([*lab, d], c["packets"])
            self.bytes.add_metric([*lab, d], c["bytes"])
            for a in XdpAction:
                self.actions.add_metric([*lab, d, a.name.lower()], c[a.name.lower()])
            if d == "tx":
                for k, n in c["kinds"].items():
                    self.kinds.add_metric([*lab, d, k], n)
            for r, n in c["drops"].items():
                self.drops.add_metric([*lab, d, r], n)

    def add_plain(self, lab: list[str], dp: dict) -> None:
        """The plain datapath's counters (no pinned maps): frames from eth4 and failed redirects."""
        if "packets" in dp:
            self.packets.add_metric([*lab, "tx"], dp["packets"])
        for r, n in counts({DropReason.REDIRECT_FAILED: dp.get("redirect_failed", 0)}).items():
            self.drops.add_metric([*lab, "tx", r], n)

    def add_agent(self, lab: list[str], st: dict) -> None:
        """Agent state of one attachment (its status answer)."""
        a, p = st.get("attachment", {}), st.get("port", {})
        self.attachment.add_metric(lab, {
            "mode": str(a.get("mode", "")), "pkey": str(a.get("pkey", "")), "backend": str(a.get("backend", "")),
            "datapath": str(st.get("datapath", {}).get("kind", "")), "mac": str(st.get("eth", {}).get("mac", "")),
        })
        device = a.get("device") or (f"{a.get('fabric')}:{a.get('host')}" if a.get("backend") == "sim" else "")
        self.port.add_metric(lab, {"device": str(device), "gid": str(p.get("gid", "")), "lid": str(p.get("lid", "")),
                                   "state": str(p.get("state", ""))})
        self.uptime.add_metric(lab, float(a.get("uptime_seconds", 0)))
        self.peers.add_metric(lab, st.get("peers", 0))
        v = st.get("vifs")
        if isinstance(v, dict):
            self.vifs.add_metric([*lab, "learned"], v.get("learned", 0))
            self.vifs.add_metric([*lab, "configured"], v.get("count", 0) - v.get("learned", 0))
        if "broadcast_joined" in st:
            self.bcast.add_metric(lab, 1 if st["broadcast_joined"] else 0)
        by_state = st.get("groups_by_state") or {"unknown": st.get("groups", 0)}
        for s, n in by_state.items():
            self.groups.add_metric([*lab, s], n)
        for k, n in st.get("counters", {}).items():
            self.events.add_metric([*lab, k], n)
        for where in ("agent", "fabric"):
            for r, n in st.get("drops" if where == "agent" else "fabric_drops", {}).items():
                self.drops.add_metric([*lab, where, r], n)
        sa = st.get("sa", {})
        for k, n in sa.get("queries", {}).items():
            typ, _, result = k.partition(" ")
            if result:
                self.sa.add_metric([*lab, typ, result], n)
            else:                       # lost, busy, timeouts, sm_moved: events of the SA client
                self.events.add_metric([*lab, f"sa_{typ}"], n)
        for typ, h in sa.get("latency", {}).items():
            buckets = [(le, n) for le, n in h["buckets"].items()] + [("+Inf", h["count"])]
            self.sa_time.add_metric([*lab, typ], buckets, h["sum"])


class XdpoibCollector(Collector):
    """Collects every attachment's metrics afresh on each scrape."""

    def collect(self) -> Iterator:
        """Yield this scrape's metric families."""
        from xdpoib.pump import pin_dir

        build = InfoMetricFamily("xdpoib_build", "xdpoib version")
        build.add_metric([], {"version": __version__})
        yield build
        fam = _Families()
        specs = state.attachments()
        # ask every agent at once: a hung one costs STATUS_TIMEOUT once per scrape, not once per agent
        with ThreadPoolExecutor(max_workers=min(8, len(specs) or 1)) as pool:
            answers = list(pool.map(agent_status, specs))
        for spec, st in zip(specs, answers, strict=True):
            lab = [spec.netns or "", spec.ifname]
            fam.up.add_metric(lab, 1 if st is not None else 0)
            bpf = read_bpf_counters(pin_dir(spec.id))
            if bpf is not None:
                fam.add_bpf(lab, bpf)
                cap = map_capacity(pin_dir(spec.id) / "xo_peer_mac")
                if cap is not None:
                    fam.peers_max.add_metric(lab, cap)
            elif st is not None:
                fam.add_plain(lab, st.get("datapath", {}))
            if st is not None:
                cpu = agent_cpu(st.get("attachment", {}).get("pid"))
                if cpu is not None:
                    fam.cpu.add_metric([*lab, "user"], cpu[0])
                    fam.cpu.add_metric([*lab, "system"], cpu[1])
                try:
                    fam.add_agent(lab, st)
                except (KeyError, TypeError, ValueError, AttributeError) as e:   # an agent of another version
                    log.warning("%s: unexpected status answer: %s", spec.where, e)
        yield from fam.all()


def registry() -> CollectorRegistry:
    """A registry holding only the xdpoib collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(XdpoibCollector())
    return reg


def exposition() -> str:
    """One scrape, as Prometheus text exposition."""
    from prometheus_client import generate_latest

    return generate_latest(registry()).decode()


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT` (`[V6ADDR]:PORT` for IPv6) -> (addr, port); ExporterError if malformed."""
    addr, sep, port = text.rpartition(":")
    addr = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr
    if not sep or not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ExporterError(f"--listen wants ADDR:PORT (e.g. {DEFAULT_LISTEN}), not {text!r}")
    return addr, int(port)


def serve(listen: str) -> tuple:
    """Start serving /metrics on `listen` in a background thread; return (server, thread)."""
    from prometheus_client import start_http_server

    addr, port = parse_listen(listen)
    try:
        return start_http_server(port, addr=addr, registry=registry())
    except OSError as e:
        raise ExporterError(f"cannot listen on {listen}: {e.strerror or e}") from None
