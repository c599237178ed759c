"""The agent's service side: control requests (status, peers, groups, capture, stop) and the state file.

Requests are answered on the loop's thread between two data batches, so `xdpoib status` answers
within one turn (a batch of at most `budget` frames each way) however hard the agent is flooded.
Counters the worker threads update are copied with a retry: they may change while being read.
`capture` starts or stops an `xdpoib capture` stream (xdpoib/capture.py; one at a time): the agent keeps
it in `a.capture` while it runs, None otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from xdpoib import state
from xdpoib.errors import XdpoibError
from xdpoib.reasons import DropReason as R
from xdpoib.reasons import counts
from xdpoib.wire.addr import gid_str, mac_str


def _copy(d) -> dict:
    """A dict another thread may be changing, copied (retried if it changed size mid-copy)."""
    for _ in range(10):
        with contextlib.suppress(RuntimeError):
            return dict(d)
    return {}


def status(a) -> dict:
    """The attachment's state and counters (what `xdpoib status -j` shows and the exporter reads)."""
    p = a.port_attrs
    s = a.spec
    drops = _copy(a.drops)
    drops[R.LOOPBACK] = drops.get(R.LOOPBACK, 0) + a.loopback.counters.snapshot().get("loopback", 0)
    return {
        "attachment": {"ifname": s.ifname, "netns": s.netns, "mode": s.mode, "pkey": f"{a.pkey:#06x}",
                       "backend": s.backend, "fabric": s.fabric, "host": s.host, "device": s.device,
                       "internal": s.internal, "pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)),
                       "state": a.state,
                       "uptime_seconds": round(time.time() - a.started, 1), "code": state.code_id(),
                       "handover_ms": getattr(a, "handover_ms", None)},
        "port": {"gid": gid_str(p.gid), "lid": p.lid, "sm_lid": p.sm_lid, "state": p.state.name.lower(),
                 "active_mtu": p.active_mtu, "guid": f"{p.port_guid:#018x}",
                 "pkeys": [f"{k:#06x}" for k in p.pkeys if k & 0x7FFF]},
        "broadcast": {"mgid": gid_str(a.bcast_mgid), "qkey": f"{a.qkey:#x}", "mtu": a.bcast.mtu_bytes,
                      "mlid": a.bcast.mlid, "waiting_for": getattr(a, "waiting_for", None)},
        "eth": {"ifname": s.ifname, "mac": mac_str(a.mac), "mtu": a.eth_mtu},
        "qpn": a.qp.qpn,
        "peers": len(a.peers.entries),
        "groups": len(a.groups),
        "counters": dict(a.stats),
        "drops": counts(drops),
        "fabric_drops": counts(a.backend.counters()),
        "datapath": {"kind": a.pump.name, **a.pump.counters(), "columnar": a.forwarder.columnar(a.pump),
                     "copies_per_frame": _copies(a.stats)},
        "groups_by_state": a.membership.by_state(),
        "vifs": {"count": a.vifs.count(), "learned": a.vifs.learned_count(), "learn_max": a.vifs.learn_max},
        "partitions": a.partitions.describe(),
        "capture": a.capture.summary() if getattr(a, "capture", None) is not None else None,
        "loop": {**a.loop.stats, "budget": a.loop.budget, "work_us": a.loop.work_us(),
                 "sa_worker": {**a.sa_worker.stats, "queued": a.sa_worker.queued,
                               "busy_seconds": round(time.monotonic() - a.sa_worker.busy_since, 3)
                               if a.sa_worker.busy_since else 0.0}},
        "sa": {"queries": {" ".join(map(str, k)) if isinstance(k, tuple) else k: v
                           for k, v in _copy(a.sa.stats).items()},
               "latency": _latency(a.sa)},
    }


def _copies(stats) -> dict:
    """Copies of a frame's bytes the agent made (or had its backend make) per frame, each way: `tx` from
    eth4 to the fabric (`tx_copies` / `tx_frames`), `rx` from the fabric to eth4 (`rx_copies` /
    `rx_frames`); None before the first frame."""
    def ratio(copies, frames):
        return round(stats.get(copies, 0) / stats[frames], 3) if stats.get(frames) else None
    return {"tx": ratio("tx_copies", "tx_frames"), "rx": ratio("rx_copies", "rx_frames")}


def _latency(sa) -> dict:
    for _ in range(10):
        with contextlib.suppress(RuntimeError):
            return sa.latency.snapshot()
    return {}


def handle_request(a, req: dict) -> dict:
    """Answer one control request."""
    cmd = req.get("cmd")
    if cmd == "status":
        return status(a)
    if cmd == "peers":
        return {"peers": [e.to_dict() for e in a.peers.entries.values()]}
    if cmd == "groups":
        return {"groups": [g.to_dict() for g in a.groups.values()]}
    if cmd == "capture":
        from xdpoib import capture

        return capture.request(a, req)
    if cmd in ("vifs", "vif_add", "vif_del"):
        return a.vifs.handle(req)
    if cmd in ("handover_prepare", "handover", "handover_done"):
        from xdpoib.agent import handover

        return handover.handle(a, req)
    if cmd == "stop":
        a.stopping = True
        return {"stopping": True}
    raise XdpoibError(f"unknown request {cmd!r}")


def restore_state(a) -> None:
    """Peers, REMACs and ids from the state file of a previous agent of this attachment."""
    try:
        data = json.loads(state.persist_path(a.spec.id).read_text())
        a.peers.restore(data.get("peers", {}))
        a._saved_vifs = list(data.get("vifs", []))
    except (OSError, ValueError, KeyError, XdpoibError):
        pass


def save_state(a) -> None:
    """Persist REMACs and ids (so a restarted agent keeps the same REMACs)."""
    with contextlib.suppress(OSError, AttributeError):
        state.ensure_dirs()
        p = state.persist_path(a.spec.id)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"peers": a.peers.to_json(), "vifs": a.vifs.to_json()}))
        os.replace(tmp, p)
        a._saved_peers = len(a.peers.entries)
