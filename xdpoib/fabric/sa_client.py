"""The SA client over libibumad: our own port, PathRecords, ClassPortInfo, multicast joins.

- `SAClient`: one umad port; every query goes through one transaction engine that matches replies on
  the low 32 bits of the TID (the kernel and umad2sim own the high half), keeps a per-attempt timeout
  that backs off (`RetryPolicy`), retries lost or busy queries, bounds the queries in flight
  (`max_outstanding`, used by `paths`) and gives up at a per-request deadline; SA status codes become
  distinct `SAError` subclasses (`sa_records.py`); durations go into a `LatencyHistogram`;
- `PathCache`: PathRecords with an expiry, dropped explicitly by `invalidate`.

Our own port is re-read on demand with directed-route SMPs to ourselves (PortInfo, NodeInfo,
PKeyTable), since umad2sim's `umad_get_port` is a snapshot taken at attach (docs/design.md §4).
Running one as a simulated host, in a child process: `sa_remote.py`.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from xdpoib.fabric.base import gid_str
from xdpoib.fabric.sa_records import (
    ATTR_CLASS_PORT_INFO,
    ATTR_MCMEMBER_RECORD,
    ATTR_PATH_RECORD,
    JOIN_FULL,
    JOIN_SEND_ONLY_FULL,
    JOIN_SEND_ONLY_NON,
    MC_CREATE_MASK,
    MC_JOIN_MASK,
    MC_MGID,
    MC_PORT_GID,
    METHOD_DELETE,
    METHOD_GET,
    METHOD_SET,
    PR_DGID,
    PR_DLID,
    PR_PKEY,
    PR_SGID,
    SA_QKEY,
    SA_QP,
    SELECTOR_EXACTLY,
    SMP_ATTR_NODE_INFO,
    SMP_ATTR_PKEY_TABLE,
    SMP_ATTR_PORT_INFO,
    ClassPortInfo,
    LocalPort,
    MCMemberRecord,
    PathRecord,
    PortInfo,
    SABusyError,
    SAError,
    SAMad,
    SANoRecordsError,
    SATimeoutError,
    pack_sa_mad,
    pack_smp,
    parse_sa_mad,
    parse_smp,
    status_error,
    to_gid,
)

# ---------------------------------------------------------------- path cache

class PathCache:
    """PathRecords by (DGID, SGID, P_Key) with a time to live; `invalidate` drops entries explicitly."""

    def __init__(self, ttl: float = 300.0, clock=time.monotonic):
        self.ttl, self.clock = ttl, clock
        self._entries: dict[tuple[bytes, bytes, int], tuple[PathRecord, float]] = {}
        self.hits = self.misses = 0

    def get(self, dgid, sgid, pkey: int) -> PathRecord | None:
        """The cached record if present and not expired, else None (an expired entry is dropped)."""
        key = (to_gid(dgid), to_gid(sgid), pkey)
        hit = self._entries.get(key)
        if hit and hit[1] > self.clock():
            self.hits += 1
            return hit[0]
        if hit:
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, rec: PathRecord, pkey: int | None = None) -> None:
        """Remember `rec` until now + ttl (under the P_Key it was asked for)."""
        key = (to_gid(rec.dgid), to_gid(rec.sgid), rec.pkey if pkey is None else pkey)
        self._entries[key] = (rec, self.clock() + self.ttl)

    def invalidate(self, dgid=None) -> int:
        """Drop every entry for `dgid` (all entries when None); return how many were dropped."""
        if dgid is None:
            n = len(self._entries)
            self._entries.clear()
            return n
        g = to_gid(dgid)
        keys = [k for k in self._entries if k[0] == g]
        for k in keys:
            del self._entries[k]
        return len(keys)

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------- the client

@dataclass
class _Request:
    """One query in the transaction engine."""

    mgmt_class: int
    mad: bytes                  # with TID 0; the engine patches the low 32 bits per attempt
    what: str
    deadline: float
    dlid: int = 0
    attempts: int = 0
    tid: int = 0
    sent_at: float = 0.0
    timeout: float = 0.0
    result: object = None
    done: bool = False
    busy: bool = False


@dataclass
class RetryPolicy:
    """Per-attempt timeout (doubling from `timeout` up to `max_timeout`), retries and overall deadline."""

    timeout: float = 0.1
    max_timeout: float = 1.0
    retries: int = 8
    deadline: float = 10.0


LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LatencyHistogram:
    """Query durations per query type, in Prometheus' cumulative-bucket form (docs/design.md §7)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: Counter = Counter()

    def observe(self, kind: str, seconds: float) -> None:
        """Count one query of `kind` that took `seconds` (answered or not)."""
        row = self.counts.setdefault(kind, [0] * (len(self.buckets) + 1))
        for i, le in enumerate(self.buckets):
            if seconds <= le:
                row[i] += 1
        row[-1] += 1
        self.sums[kind] += seconds

    def snapshot(self) -> dict[str, dict]:
        """{type: {"buckets": {le: cumulative count}, "count": n, "sum": seconds}}."""
        return {k: {"buckets": dict(zip(map(str, self.buckets), row[:-1], strict=True)), "count": row[-1],
                    "sum": self.sums[k]} for k, row in self.counts.items()}


@dataclass
class SAClient:
    """An SA client on one umad port. Thread-safe: one transaction engine behind a lock."""

    umad: object
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    max_outstanding: int = 16
    path_cache: PathCache = field(default_factory=PathCache)
    sm_key: int = 0             # 0: an ordinary client; OpenSM's default SM_Key (1) makes us trusted

    def __post_init__(self):
        self._lock = threading.RLock()
        self._tid = (os.getpid() & 0xFFFF) << 16
        self._port: LocalPort | None = None
        self._snap = None
        self._cpi: ClassPortInfo | None = None
        self.stats: Counter = Counter()      # (type, ok|error|timeout), and "timeouts", "lost", "busy"
        self.latency = LatencyHistogram()
        self.peak_inflight = 0                  # most queries ever in flight at once (<= max_outstanding)

    @classmethod
    def open(cls, device: str | None = None, port: int | None = None, **kw) -> SAClient:
        """Open the umad port (default: the first one) and read our own port once."""
        from xdpoib.fabric.umad import UmadPort

        client = cls(UmadPort(device, port), **kw)
        try:
            client.port()
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """Close the umad port (idempotent)."""
        if self.umad is not None:
            self.umad.close()
            self.umad = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- transaction engine

    def _next_tid(self) -> int:
        self._tid = (self._tid + 1) & 0xFFFFFFFF or 1
        return self._tid

    def _send(self, r: _Request, now: float) -> None:
        r.tid = self._next_tid()
        r.timeout = min(self.policy.timeout * (2 ** r.attempts), self.policy.max_timeout)
        r.attempts += 1
        r.sent_at = now
        mad = bytearray(r.mad)
        struct.pack_into(">I", mad, 12, r.tid)
        ms = max(1, int(r.timeout * 1000))
        if r.mgmt_class == 0x81:
            self.umad.send(0x81, bytes(mad), 0xFFFF, 0, 0, timeout_ms=ms)
        else:
            sm_sl = self._port.sm_sl if self._port else 0
            self.umad.send(0x03, bytes(mad), r.dlid, SA_QP, SA_QKEY, sl=sm_sl, timeout_ms=ms)

    def _fail_or_retry(self, r: _Request, now: float, pending: deque) -> None:
        if r.attempts > self.policy.retries or now >= r.deadline:
            r.done = True
            err = SABusyError if r.busy else SATimeoutError
            r.result = err(f"{r.what}: {err.what} after {r.attempts} attempts")
        else:
            pending.append(r)

    def _run(self, requests: list[_Request]) -> None:
        """Send every request, at most `max_outstanding` at once; fill in `result` (MAD bytes or error)."""
        if self.umad is None:
            raise SAError("SA client is closed")
        pending, inflight = deque(requests), {}
        while pending or inflight:
            now = time.monotonic()
            backing_off: deque = deque()
            while pending and len(inflight) < self.max_outstanding:
                r = pending.popleft()
                if r.busy and r.sent_at + r.timeout > now:     # busy: back off before resending
                    backing_off.append(r)
                    continue
                self._send(r, now)
                inflight[r.tid] = r
            self.peak_inflight = max(self.peak_inflight, len(inflight))
            pending.extendleft(reversed(backing_off))
            if not inflight:
                time.sleep(max(0.001, min(r.sent_at + r.timeout for r in pending) - now))
                continue
            first = min(r.sent_at + r.timeout for r in inflight.values())
            got = self.umad.recv(int(max(0.0, first - time.monotonic()) * 1000) + 1)
            now = time.monotonic()
            if got is not None:
                cls, ustatus, mad = got
                tid = struct.unpack_from(">I", mad, 12)[0] if len(mad) >= 16 else -1
                r = inflight.get(tid)
                if r is not None and r.mgmt_class == cls:
                    del inflight[tid]
                    mstatus = struct.unpack_from(">H", mad, 4)[0] & 0x7FFF
                    if ustatus:                           # 110: lost (a timeout echo, or ibsim's drop)
                        self.stats["lost"] += 1
                        self._fail_or_retry(r, now, pending)
                    elif mstatus & 0x1F == 0x0001:        # busy: back off, then retry
                        self.stats["busy"] += 1
                        r.busy = True
                        self._fail_or_retry(r, now, pending)
                    else:
                        r.done, r.result = True, mad
            for tid, r in list(inflight.items()):
                if now >= r.sent_at + r.timeout:
                    del inflight[tid]
                    self.stats["timeouts"] += 1
                    self._fail_or_retry(r, now, pending)

    def _request(self, mgmt_class: int, mad: bytes, what: str, deadline: float | None = None) -> _Request:
        dl = time.monotonic() + (self.policy.deadline if deadline is None else deadline)
        dlid = 0
        if mgmt_class == 0x03:
            if self._port is None or not self._port.sm_lid:
                self.port()
            dlid = self._port.sm_lid
            if not dlid:
                raise SATimeoutError(f"{what}: no SM known to our port (SM LID 0)")
        return _Request(mgmt_class=mgmt_class, mad=mad, what=what, deadline=dl, dlid=dlid)

    def _sa(self, method: int, attr: int, mask: int, data: bytes, what: str, kind: str,
            deadline: float | None = None, wait: float | None = None) -> SAMad:
        """One SA query: returns the response, or raises the error its status maps to. With `wait`
        (seconds), the query is not made at all (SABusyError) if another thread's query still holds
        the client after that long: a caller on a data path must not queue behind a slow SA."""
        mad = pack_sa_mad(method, attr, 0, mask, data, sm_key=self.sm_key)
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            self.stats["skipped_busy"] += 1
            raise SABusyError(f"{what}: the SA client is busy with another query")
        try:
            r = self._request(0x03, mad, what, deadline)
            t0 = time.monotonic()
            self._run([r])
            if isinstance(r.result, SATimeoutError):
                # The SM may have moved (failover, our port re-registered): re-read our port and, if
                # it names another SM LID now, ask that one.
                try:
                    moved = self.port().sm_lid not in (0, r.dlid)
                except SAError:
                    moved = False
                if moved:
                    self.stats["sm_moved"] += 1
                    r = self._request(0x03, mad, what, deadline)
                    self._run([r])
            self.latency.observe(kind, time.monotonic() - t0)
        finally:
            self._lock.release()
        return self._answer(r, kind)

    def _answer(self, r: _Request, kind: str) -> SAMad:
        if isinstance(r.result, Exception):
            self.stats[(kind, "timeout")] += 1
            raise r.result
        resp = parse_sa_mad(r.result)
        if resp.status:
            self.stats[(kind, "error")] += 1
            raise status_error(resp.status, r.what)
        self.stats[(kind, "ok")] += 1
        return resp

    def _smp(self, attr: int, mod: int = 0) -> bytes:
        with self._lock:
            r = _Request(0x81, pack_smp(attr, 0, mod), f"SMP {attr:#x} to our port",
                         time.monotonic() + self.policy.deadline)
            self._run([r])
        if isinstance(r.result, Exception):
            raise r.result
        _m, status, _tid, data = parse_smp(r.result)
        if status:
            raise status_error(status, f"SMP {attr:#x} to our port")
        return data

    # ---- own port

    def port(self) -> LocalPort:
        """Re-read our port: LID, SM LID, GID prefix, GUID, state, MTU, P_Key table (fresh SMPs)."""
        if self.umad is None:
            raise SAError("SA client is closed")
        # the snapshot gives only the port's identity (CA name, port number), which never changes: read
        # it once. umad_get_port reads sysfs, which umad2sim emulates in a way that is not thread-safe
        # (seen: ENODEV while another thread opened files), and everything else comes from SMPs below.
        if self._snap is None:
            self._snap = self.umad.snapshot()
        snap = self._snap
        node = self._smp(SMP_ATTR_NODE_INFO)
        port_guid = struct.unpack_from(">Q", node, 20)[0]
        (pcap,) = struct.unpack_from(">H", node, 28)
        pi = PortInfo.parse(self._smp(SMP_ATTR_PORT_INFO, snap.portnum))
        pkeys: list[int] = []
        for block in range(max(1, (pcap + 31) // 32)):
            d = self._smp(SMP_ATTR_PKEY_TABLE, block)
            pkeys.extend(struct.unpack(">32H", d))
        pkeys = pkeys[: max(pcap, 1)]
        lp = LocalPort(ca_name=snap.ca_name, portnum=snap.portnum, port_guid=port_guid,
                       gid_prefix=pi.gid_prefix, lid=pi.lid, lmc=pi.lmc, sm_lid=pi.sm_lid, sm_sl=pi.sm_sl,
                       state=pi.state, phys_state=pi.phys_state, capability_mask=pi.capability_mask,
                       mtu_cap=pi.mtu_cap, active_mtu=pi.active_mtu, pkeys=tuple(pkeys))
        if self._port is not None and (self._port.lid, self._port.gid) != (lp.lid, lp.gid):
            self.path_cache.invalidate()
        self._port = lp
        return lp

    @property
    def gid(self) -> bytes:
        """Our port GID (from the last `port()` read)."""
        if self._port is None:
            self.port()
        return self._port.gid

    # ---- SA queries

    def class_port_info(self, refresh: bool = False) -> ClassPortInfo:
        """The SA's ClassPortInfo (cached after the first Get)."""
        if self._cpi is None or refresh:
            resp = self._sa(METHOD_GET, ATTR_CLASS_PORT_INFO, 0, b"", "ClassPortInfo Get", "cpi")
            self._cpi = ClassPortInfo.parse(resp.data)
        return self._cpi

    def path(self, dgid, sgid=None, pkey: int = 0xFFFF, cached: bool = True) -> PathRecord:
        """PathRecord Get by DGID, SGID and P_Key (mask 0x200C); served from the cache when fresh."""
        dgid = to_gid(dgid)
        sgid = to_gid(sgid) if sgid is not None else self.gid
        if cached:
            hit = self.path_cache.get(dgid, sgid, pkey)
            if hit is not None:
                return hit
        q = PathRecord(dgid=dgid, sgid=sgid, pkey=pkey)
        resp = self._sa(METHOD_GET, ATTR_PATH_RECORD, PR_DGID | PR_SGID | PR_PKEY, q.pack(),
                        f"PathRecord to {gid_str(dgid)} (P_Key {pkey:#06x})", "path")
        rec = PathRecord.parse(resp.data)
        self.path_cache.put(rec, pkey)
        return rec

    def path_to_lid(self, dlid: int, pkey: int = 0xFFFF) -> PathRecord:
        """PathRecord Get by DLID (with our SGID and the P_Key): who is behind a LID. A datagram that
        came without a GRH names its sender only by SLID and source QPN; this gives its GID."""
        q = PathRecord(dgid=bytes(16), sgid=self.gid, dlid=dlid, pkey=pkey)
        resp = self._sa(METHOD_GET, ATTR_PATH_RECORD, PR_SGID | PR_DLID | PR_PKEY, q.pack(),
                        f"PathRecord to LID {dlid} (P_Key {pkey:#06x})", "path")
        rec = PathRecord.parse(resp.data)
        self.path_cache.put(rec, pkey)
        return rec

    def paths(self, dgids, pkey: int = 0xFFFF) -> list[PathRecord | SAError]:
        """Resolve many DGIDs at once (bounded in flight); each entry is a record or its error."""
        sgid = self.gid
        with self._lock:
            reqs = [self._request(0x03, pack_sa_mad(METHOD_GET, ATTR_PATH_RECORD, 0, PR_DGID | PR_SGID
                                                    | PR_PKEY, PathRecord(dgid=to_gid(d), sgid=sgid,
                                                                          pkey=pkey).pack(),
                                                    sm_key=self.sm_key),
                                  f"PathRecord to {gid_str(to_gid(d))}") for d in dgids]
            t0 = time.monotonic()
            self._run(reqs)
            self.latency.observe("paths", time.monotonic() - t0)
        out: list[PathRecord | SAError] = []
        for r in reqs:
            try:
                rec = PathRecord.parse(self._answer(r, "path").data)
                self.path_cache.put(rec, pkey)
                out.append(rec)
            except SAError as e:
                out.append(e)
        return out

    def send_only_join_state(self) -> int:
        """JoinState for a send-only join: SendOnlyFullMember (8) if the SA supports it, else 4."""
        return JOIN_SEND_ONLY_FULL if self.class_port_info().send_only_full_member else JOIN_SEND_ONLY_NON

    def join(self, mgid, join_state: int = JOIN_FULL, create: MCMemberRecord | None = None) -> MCMemberRecord:
        """Join `mgid` (Set, mask 0x10003); with `create`, create it with that group's parameters (0x173F7)."""
        mgid = to_gid(mgid)
        rec = MCMemberRecord(mgid=mgid, port_gid=self.gid, join_state=join_state)
        mask = MC_JOIN_MASK
        if create is not None:
            rec = replace(rec, qkey=create.qkey, mtu_selector=SELECTOR_EXACTLY, mtu=create.mtu,
                          tclass=create.tclass, pkey=create.pkey, rate_selector=SELECTOR_EXACTLY,
                          rate=create.rate, sl=create.sl, flow_label=create.flow_label,
                          hop_limit=create.hop_limit)
            mask = MC_CREATE_MASK
        resp = self._sa(METHOD_SET, ATTR_MCMEMBER_RECORD, mask, rec.pack(),
                        f"join {gid_str(mgid)} (JoinState {join_state})", "join")
        return MCMemberRecord.parse(resp.data)

    def join_send_only(self, mgid, create: MCMemberRecord | None = None) -> MCMemberRecord:
        """Send-only join: JoinState 8 when ClassPortInfo allows it, else 4 (which cannot create)."""
        state = self.send_only_join_state()
        return self.join(mgid, state, create if state == JOIN_SEND_ONLY_FULL else None)

    def leave(self, mgid, join_state: int = JOIN_FULL) -> MCMemberRecord:
        """Leave `mgid` (Delete, mask 0x10003)."""
        mgid = to_gid(mgid)
        rec = MCMemberRecord(mgid=mgid, port_gid=self.gid, join_state=join_state)
        resp = self._sa(METHOD_DELETE, ATTR_MCMEMBER_RECORD, MC_JOIN_MASK, rec.pack(),
                        f"leave {gid_str(mgid)} (JoinState {join_state})", "leave")
        return MCMemberRecord.parse(resp.data)

    def member(self, mgid, port_gid=None, deadline: float | None = None,
               wait: float | None = None) -> MCMemberRecord | None:
        """Get one membership (MGID + PortGID; ours by default); None when the port is not a member.
        `deadline` and `wait` as in `_sa` (a data path asks with a short deadline and a short wait)."""
        mgid = to_gid(mgid)
        pg = to_gid(port_gid) if port_gid is not None else self.gid
        rec = MCMemberRecord(mgid=mgid, port_gid=pg)
        try:
            resp = self._sa(METHOD_GET, ATTR_MCMEMBER_RECORD, MC_MGID | MC_PORT_GID, rec.pack(),
                            f"membership of {gid_str(pg)} in {gid_str(mgid)}", "member", deadline, wait)
        except SANoRecordsError:
            return None
        got = MCMemberRecord.parse(resp.data)
        # An untrusted requester (no SM_Key) gets PortGID and JoinState zeroed: the record's presence
        # is the answer, so report the PortGID we asked about.
        return got if any(got.port_gid) else replace(got, port_gid=pg)

    def group(self, mgid) -> MCMemberRecord | None:
        """The group's parameters (Get by MGID alone); None when the group does not exist."""
        mgid = to_gid(mgid)
        try:
            resp = self._sa(METHOD_GET, ATTR_MCMEMBER_RECORD, MC_MGID, MCMemberRecord(mgid=mgid).pack(),
                            f"group {gid_str(mgid)}", "group")
        except SANoRecordsError:
            return None
        return MCMemberRecord.parse(resp.data)
