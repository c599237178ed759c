"""Bounded state: what an agent keeps about the fabric stays bounded however long it runs and whatever
the fabric or eth4 sends it (docs/design.md §1: the agent is an event loop with bounded work).

    peers        idle longer than `peer_idle_s` (no datagram from them, nothing sent to them) are
                 removed from the tables and the maps (hashes and slot caches); their REMAC and id stay
                 reserved in the state file, so a peer that comes back gets both unchanged. The table
                 has a hard cap, `max_peers`: a newcomer beyond it evicts the least recently active
                 (`peers_evicted`). Reservations are capped too (`max_reserved`, oldest dropped first).
                 eth4's neighbour cache still holds the REMAC of a removed peer: a frame to it is
                 reported by the TX program as unresolved (ring buffer `xo_events`), and a REMAC that
                 is reserved brings its peer back into the tables at once (`peers_revived`), so the
                 next frame goes out (the reported one is dropped as `unknown_destination`).
    paths        expire after `path_ttl_s`, like ipoib's path records: one still in use is asked again
                 in the background (the old AH keeps sending until the answer; a new DLID replaces it),
                 an unused one is dropped, to be resolved on next use. Port events drop every path and
                 the SA client's path cache; a peer whose LID changed loses its path (`PeerTable.learn`)
                 and so does every path in use when the fabric reports sends to a LID nobody has.
    groups       groups that failed or were refused, and send-only groups nothing was sent to for
                 `group_idle_s`, are left and removed (and taken out of the group map); a refused
                 send-only join is not retried per frame: its backoff outlives the group entry.
    caches       who-is (one entry per LID asked in the last second), the resolver's and the groups'
                 backoff tables, frames held for groups being joined: trimmed on every sweep.
    SA queries   path, who-is and join queries pass one token bucket (`sa_rate` per second, bursts of
                 `sa_burst`, `SAGate`): a flood of new senders, of frames to unknown destinations or of
                 group reports cannot make the SA see more. A query refused is not sent and not
                 answered (`sa_rate_limited`); its caller asks again on its next frame.

Every number comes from the environment of the agent (XDPOIB_PEER_IDLE_S, XDPOIB_MAX_PEERS,
XDPOIB_MAX_RESERVED, XDPOIB_PATH_TTL_S, XDPOIB_GROUP_IDLE_S, XDPOIB_SA_RATE, XDPOIB_SA_BURST), with
the defaults of `AgingConfig`. `install(agent)` wires it all in: the peer table's callbacks, the gate in
front of the SA worker and the sweep timers; `on_port_event(agent, event)` invalidates paths.
Counters go to `status -j` (`counters`: peers_idle_removed, peers_evicted, reservations_dropped,
paths_expired, paths_refreshed, path_lid_changes, groups_removed, sa_rate_limited, ...) and from there
to the exporter's `xdpoib_agent_events_total`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, fields

from xdpoib.errors import XdpoibError

log = logging.getLogger("xdpoib.agent")

SWEEP_S = 1.0                   # caches, groups, SA gate refill
PEER_SWEEP_S = 2.0              # peers and paths (a walk over every peer)
LIMITED_QUERIES = ("path", "whois", "join", "arpcheck")
MAX_GROUPS = 4096               # groups beyond this: the oldest unwanted ones go first
WHO_IS_KEEP_S = 1.0


class AgingError(XdpoibError):
    """A bounded-state setting in the environment is not a positive number."""


@dataclass(frozen=True)
class AgingConfig:
    """The bounds (see the module doc); `from_env()` reads XDPOIB_<NAME> overrides."""

    peer_idle_s: float = 300.0
    max_peers: int = 100_000
    max_reserved: int = 200_000
    path_ttl_s: float = 60.0
    group_idle_s: float = 60.0
    sa_rate: float = 100.0
    sa_burst: int = 200

    @classmethod
    def from_env(cls, env=None) -> AgingConfig:
        env = os.environ if env is None else env
        kw = {}
        for f in fields(cls):
            name = "XDPOIB_" + f.name.upper()
            text = env.get(name)
            if text is None or not text.strip():
                continue
            conv = int if f.type in (int, "int") else float
            try:
                value = conv(text)
            except ValueError:
                raise AgingError(f"{name} must be a number, not {text!r}") from None
            if value <= 0:
                raise AgingError(f"{name} must be positive, not {text!r}")
            kw[f.name] = value
        return cls(**kw)

    def __post_init__(self):
        from xdpoib.abi import MAX_PEERS

        if self.max_peers + self.max_reserved >= MAX_PEERS:
            raise AgingError(f"XDPOIB_MAX_PEERS + XDPOIB_MAX_RESERVED must stay below {MAX_PEERS} (the peer ids "
                             f"of the datapath), not {self.max_peers} + {self.max_reserved}")


# ================================================================ the SA gate

class SAGate:
    """The SA worker behind a token bucket for the queries a flood can cause (see the module doc).

    Everything else (`pending`, `stats`, `call`, ...) is the worker's. A query already queued is
    coalesced by the worker and costs no token."""

    def __init__(self, worker, rate: float, burst: int, stats) -> None:
        self._worker = worker
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._stats = stats

    def __getattr__(self, name):
        return getattr(self._worker, name)

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def submit(self, key, fn, done) -> bool:
        kind = key[0] if isinstance(key, tuple) and key else key
        if kind in LIMITED_QUERIES and not self._worker.pending(key) and not self._take():
            self._stats["sa_rate_limited"] += 1
            return False
        return self._worker.submit(key, fn, done)


# ================================================================ wiring

class Aging:
    """The sweeps and callbacks of one agent (see the module doc)."""

    def __init__(self, agent, cfg: AgingConfig) -> None:
        self.a = agent
        self.cfg = cfg
        self._no_dest = 0
        self._ring = None                           # (fd, RingReader) of the pump's xo_events
        self._ring_pump = None

    # ---- removed peers coming back

    def watch_reports(self) -> None:
        """Read the TX program's unresolved reports (the translating datapath's pins only), on the loop."""
        from xdpoib.datapath import bpfsys
        from xdpoib.datapath.events import RingReader

        a = self.a
        pump = getattr(a, "pump", None)
        pin = getattr(pump, "pin_dir", None)
        if pump is self._ring_pump or pin is None or not hasattr(pump, "maps"):
            return
        self.close_reports()
        try:
            fd = bpfsys.obj_get(str(pin / "xo_events"))
        except bpfsys.BpfSyscallError as e:
            log.warning("unresolved reports unavailable (%s): removed peers come back by ARP only", e)
            self._ring_pump = pump
            return
        try:
            reader = RingReader(fd)
        except OSError as e:
            os.close(fd)
            log.warning("unresolved reports unavailable (%s): removed peers come back by ARP only", e)
            self._ring_pump = pump
            return
        self._ring, self._ring_pump = (fd, reader), pump
        a.loop.add_reader(fd, self.on_reports)
        reader.read()                               # reports from before we started are stale

    def close_reports(self) -> None:
        if self._ring is not None:
            fd, reader = self._ring
            self.a.loop.remove_reader(fd)
            reader.close()
            os.close(fd)
            self._ring = None

    def on_reports(self) -> None:
        """Unresolved destinations: a reserved REMAC brings its peer back (see the module doc)."""
        from xdpoib.reasons import Kind
        from xdpoib.wire.addr import IPoIBAddr

        if self._ring is None:
            return
        a = self.a
        peers = a.peers
        try:
            events = self._ring[1].unresolved()
        except (OSError, ValueError) as e:
            log.warning("reading unresolved reports: %s", e)
            return
        for ev in events:
            if ev.kind != Kind.UNRESOLVED:
                continue
            who = peers.remacs.lookup(bytes(ev.dest[:6]))
            if who is None:
                continue
            gid, qpn = who
            if (qpn, gid) not in peers.entries:
                peers.learn(IPoIBAddr(0, qpn, gid))
                a.stats["peers_revived"] += 1

    # ---- peers leaving the table

    def on_removed(self, entries, why: str) -> None:
        """Peers left the table: out of the maps (hashes and slot caches) and the SA's path cache."""
        a = self.a
        a.stats["peers_idle_removed" if why == "idle" else f"peers_{why}"] += len(entries)
        maps = getattr(a.pump, "maps", None) if hasattr(a, "pump") else None
        if maps is not None:
            try:
                maps.remove_peers([(e.peer_id, e.remac, e.addr.pack()) for e in entries])
            except XdpoibError as ex:
                log.warning("removing %d peers from the maps: %s", len(entries), ex)
        cache = path_cache(a)
        if cache is not None and len(entries) < 1024:
            for e in entries:
                cache.invalidate(e.addr.gid)

    def on_lid_change(self, e, old: int) -> None:
        a = self.a
        a.stats["path_lid_changes"] += 1
        cache = path_cache(a)
        if cache is not None:
            cache.invalidate(e.addr.gid)
        log.info("peer %s moved from LID %d to %d: resolving its path again", e.addr, old, e.lid)

    # ---- sweeps

    def sweep_peers(self) -> None:
        """Idle peers out, paths past their time refreshed or dropped, reservations trimmed."""
        a, cfg = self.a, self.cfg
        now = time.monotonic()
        peers = a.peers
        pending = a.sa_worker.pending
        idle, refresh = [], []
        for e in peers.entries.values():
            if e.sends != e.seen_sends:
                e.seen_sends, e.used_at = e.sends, now
            active = e.active_at
            if now - active > cfg.peer_idle_s and not pending(("path", e.addr.key)):
                idle.append(e)
            elif e.path_state == "resolved" and now - e.resolved_at > cfg.path_ttl_s:
                if now - active < cfg.path_ttl_s:
                    refresh.append(e)
                else:                               # unused: resolved again on next use
                    e.path_state, e.path, e.ah = "unresolved", None, None
                    a.stats["paths_expired"] += 1
        if idle:
            from xdpoib.agent import service

            peers.remove(idle, "idle")
            log.info("removed %d peers idle for more than %.0f s (REMACs kept reserved)", len(idle), cfg.peer_idle_s)
            service.save_state(a)                   # the reservations are on disk before anything else
        for e in refresh:
            self.refresh_path(e)
        dropped = peers.trim_reservations()
        if dropped:
            a.stats["reservations_dropped"] += dropped
        self._watch_sends()

    def _watch_sends(self) -> None:
        """Sends to a LID nobody has (the sim counts them; a LID reassigned by the SM): every path in use
        is asked again, in the background."""
        a = self.a
        try:
            n = int(a.backend.counters().get("no_destination", 0))
        except (XdpoibError, AttributeError, TypeError, ValueError):
            return
        grew, self._no_dest = n > self._no_dest, n
        if not grew:
            return
        now = time.monotonic()
        used = [e for e in a.peers.entries.values()
                if e.path_state == "resolved" and now - e.resolved_at > 1.0 and now - e.active_at < PEER_SWEEP_S * 2]
        if used:
            a.stats["paths_rechecked"] += len(used)
        for e in used:
            self.refresh_path(e)

    def refresh_path(self, e) -> None:
        """Ask the SA again for a resolved peer's path (fresh, not from the client's cache); the old AH
        keeps sending until the answer, which replaces path and AH (and the LID if it moved)."""
        a = self.a
        key = ("path", e.addr.key)
        if a.sa_worker.pending(key):
            return
        sa, gid, sgid, pkey = a.sa, e.addr.gid, a.port_attrs.gid, a.pkey
        cache = path_cache(a)

        def call():
            if cache is not None:
                cache.invalidate(gid)
            return sa.path(gid, sgid=sgid, pkey=pkey)

        def done(ok, res):
            if a.peers.entries.get(e.addr.key) is not e:
                return
            if not ok:
                a.stats["path_refresh_failed"] += 1
                e.resolved_at = time.monotonic() - self.cfg.path_ttl_s + 5.0     # again in ~5 s
                return
            try:
                path, ah = a.resolver.path_of(res)
            except XdpoibError as ex:
                log.warning("refreshing the path to %s: %s", e.addr, ex)
                return
            if e.path is not None and e.path.dlid != res.dlid:
                log.info("path to %s now leads to LID %d (was %d)", e.addr, res.dlid, e.path.dlid)
                if e.lid == res.dlid:                   # the table knew already (learn counted it)
                    a.stats["path_lid_changes"] += 1
            if res.dlid and e.lid != res.dlid:
                a.peers.learn(e.addr, lid=res.dlid)     # moves its LID index; counts the change
            a.resolver.use_path(e, path, ah, "paths_refreshed")
        a.sa_worker.submit(key, call, done)

    def sweep(self) -> None:
        """Every second: who-is, backoff tables, held group frames, groups."""
        a = self.a
        now = time.monotonic()
        r = a.resolver
        asked = getattr(r, "_who_is_asked", None)
        if asked:
            r._who_is_asked = {k: t for k, t in asked.items() if now - t < WHO_IS_KEEP_S}
        for b in (getattr(r, "backoff", None), getattr(a.membership, "backoff", None)):
            table = getattr(b, "_next", None)
            if table:
                for k in [k for k, (t, d) in table.items() if now > t + b.cap]:
                    del table[k]
        self.sweep_groups(now)
        self.watch_reports()                        # the pump may have changed (TAP: plain -> bpf)

    def sweep_groups(self, now: float) -> None:
        """Failed and refused groups, and send-only groups unused for `group_idle_s`, are removed."""
        from xdpoib.agent.groups import JOIN_FULL

        a, m = self.a, self.a.membership
        pending = a.sa_worker.pending
        held = getattr(m, "_pending", {})
        gone = []
        for g in m.groups.values():
            if g.mgid == a.bcast_mgid or g.why - {"send"} or pending(("join", g.mgid, False)):
                continue
            if g.sends != g.seen_sends:
                g.seen_sends, g.used_at = g.sends, now
            last = max(g.used_at, g.joined_at, g.created_at)
            if (not g.join_state and now - g.created_at > 1.0) or \
                    (not g.join_state & JOIN_FULL and now - last > self.cfg.group_idle_s):
                gone.append(g)
        extra = len(m.groups) - len(gone) - MAX_GROUPS
        if extra > 0:                               # a flood of groups: the oldest unwanted go first
            rest = sorted((g for g in m.groups.values() if g not in gone and not g.why - {"send"}
                           and g.mgid != a.bcast_mgid), key=lambda g: max(g.used_at, g.created_at))
            gone += rest[:extra]
        maps = getattr(a.pump, "maps", None)
        for g in gone:
            m.leave(g)
            held.pop(g.mgid, None)
            if maps is not None:
                with contextlib.suppress(XdpoibError, AttributeError):
                    maps.remove_group(g.mgid)
        if gone:
            a.stats["groups_removed"] += len(gone)
        for mgid in [k for k in held if k not in m.groups]:
            del held[mgid]


def path_cache(a):
    """The SA client's path cache (None when the provider has none)."""
    sa = getattr(a, "sa", None)
    for obj in (sa, getattr(sa, "client", None)):
        cache = getattr(obj, "path_cache", None)
        if cache is not None:
            return cache
    return None


def install(a, cfg: AgingConfig | None = None) -> Aging:
    """Wire bounded state into a started agent (called once, from `Agent._wire_loop`)."""
    cfg = cfg or AgingConfig.from_env()
    aging = Aging(a, cfg)
    a.aging = aging
    peers = a.peers
    peers.max_peers, peers.max_reserved = cfg.max_peers, cfg.max_reserved
    peers.on_removed, peers.on_lid_change = aging.on_removed, aging.on_lid_change
    if len(peers.entries) > cfg.max_peers:          # a state file from a bigger table
        peers.evict(len(peers.entries) - cfg.max_peers)
    cache = path_cache(a)
    if cache is not None:
        cache.ttl = min(cache.ttl, cfg.path_ttl_s)
    if not isinstance(a.sa_worker, SAGate):
        a.sa_worker = SAGate(a.sa_worker, cfg.sa_rate, cfg.sa_burst, a.stats)
    a.loop.every(SWEEP_S, aging.sweep)
    a.loop.every(PEER_SWEEP_S, aging.sweep_peers)
    aging.watch_reports()
    a.stack.callback(aging.close_reports)
    return aging


def on_port_event(a, ev) -> None:
    """A port event: every path is stale (dropped by the agent), and so is the SA client's path cache;
    paths that failed meanwhile may be asked again at once."""
    from xdpoib.fabric.base import PortEventKind

    if ev.kind is PortEventKind.PORT_ERR:
        return
    cache = path_cache(a)
    if cache is not None:
        cache.invalidate()
    table = getattr(getattr(a.resolver, "backoff", None), "_next", None)
    if table:
        for k in [k for k in table if isinstance(k, tuple) and k and k[0] == "path"]:
            del table[k]
    a.stats["paths_invalidated"] += len(a.peers.entries)
