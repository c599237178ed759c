"""The agent's peers and groups: identities, REMACs, path state, the few frames queued while resolving.

Pure bookkeeping (no I/O): the agent resolves paths and joins groups, and records the outcome here.
A peer is a remote (QPN, GID); its REMAC comes from `RemacTable` (stable across LID changes and
restarts), its id from a counter; both are persisted in the attachment's state file.

The table is bounded (`xdpoib/agent/aging.py` drives it): `remove` takes peers out (idle ones, or,
beyond `max_peers`, those `learn` evicts: least recently active first, peers we send to last) but
keeps their REMAC and id reserved, so a peer that comes back gets both unchanged; at most
`max_reserved` such reservations are kept, the oldest dropped first. Activity is `last_seen` (a
datagram from the peer) or a send: reading `ah` to send counts in `sends`, which the aging sweep turns
into `used_at`. A peer whose LID changes loses its path, so it is resolved again (a stale AH would
send into the void).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from xdpoib.abi import MAX_PEERS
from xdpoib.wire.addr import IPoIBAddr, RemacTable, gid_str, mac_str, parse_gid
from xdpoib.wire.oracle import Peer, Tables, Vif

#: Frames kept per peer while its path resolves (docs/design.md §1).
MAX_PENDING = 3


def _ah_get(self):
    self.sends += 1
    return self._ah


def _ah_set(self, ah) -> None:
    self._ah = ah


#: The address handle to send with; reading it to send counts the send (`sends`), which is how the aging
#: sweep sees a peer or group that we only send to (see the module doc).
_AH = property(_ah_get, _ah_set)


def _pending_get(self) -> deque:
    q = self._pending
    if q is None:
        q = self._pending = deque(maxlen=MAX_PENDING)
    return q


@dataclass(slots=True)
class PeerEntry:
    """One remote endpoint as the agent knows it (slots, and the queue of frames waiting for its path
    made on first use: an agent holds up to `max_peers` of these, docs/design.md §8: memory)."""

    peer_id: int
    remac: bytes
    addr: IPoIBAddr
    lid: int | None = None
    path_state: str = "unresolved"      # unresolved | resolving | resolved | failed
    path: object = None                 # fabric.base.Path
    _ah: object = None                  # fabric.base.AddressHandle (`ah`)
    path_mtu: int = 0
    path_from_wc: int = 0               # 1: `path` is the reverse of a datagram's (not asked yet), 2: asked
    reverse_via: tuple | None = None    # (SLID, SL) of a datagram from it while it had no path
    first_seen: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    resolved_at: float = 0.0
    _pending: deque | None = None       # `pending`: at most MAX_PENDING frames waiting for the path
    sends: int = 0                      # reads of `ah` (one per batch sent)
    used_at: float = 0.0                # when the sweep last saw `sends` move
    seen_sends: int = 0                 # `sends` at that sweep

    ah = _AH
    pending = property(_pending_get)

    @property
    def active_at(self) -> float:
        """When the peer was last heard from or sent to (as of the last sweep)."""
        return max(self.last_seen, self.used_at)

    def as_peer(self) -> Peer:
        return Peer(self.peer_id, self.remac, self.addr)

    def to_dict(self) -> dict:
        now = time.monotonic()
        return {"remac": mac_str(self.remac), "gid": gid_str(self.addr.gid), "qpn": self.addr.qpn,
                "lid": self.lid, "path": self.path_state, "path_mtu": self.path_mtu,
                "path_source": "reverse" if self.path_from_wc else "sa" if self.path is not None else None,
                "age_seconds": round(now - self.first_seen, 1), "idle_seconds": round(now - self.last_seen, 1),
                "pending": len(self._pending or ())}


@dataclass
class GroupEntry:
    """One multicast group the attachment sends to or receives from."""

    mgid: bytes
    group_id: int
    join_state: int = 0                 # 1 full member, 8/4 send-only, 0 not joined
    mlid: int = 0
    qkey: int = 0
    mtu: int = 0
    _ah: object = None                  # `ah`: the AH to send with (reading it to send counts in `sends`)
    attached: bool = False              # our QP receives from it
    why: set[str] = field(default_factory=set)   # broadcast, eth4, snooped, send
    joined_at: float = 0.0
    sends: int = 0
    created_at: float = field(default_factory=time.monotonic)
    used_at: float = 0.0                # when the sweep last saw `sends` move
    seen_sends: int = 0

    ah = _AH

    def to_dict(self) -> dict:
        return {"mgid": gid_str(self.mgid), "join_state": self.join_state, "mlid": self.mlid,
                "qkey": self.qkey, "mtu": self.mtu, "attached": self.attached, "why": sorted(self.why)}


class PeerTable(Tables):
    """Peers and VIFs with dictionary indexes; also the oracle's `Tables` for the Python datapath."""

    def __init__(self, vifs: list[Vif], vlan_pkeys: dict[int, int], scope: int = 2,
                 remacs: RemacTable | None = None, next_id: int = 1):
        super().__init__(vifs=list(vifs), peers=[], vlan_pkeys=dict(vlan_pkeys), scope=scope)
        self.remacs = remacs or RemacTable(reserved={v.mac for v in vifs})
        self.entries: dict[tuple[int, bytes], PeerEntry] = {}
        self._by_mac: dict[bytes, PeerEntry] = {}
        self._by_id: dict[int, PeerEntry] = {}
        self._by_lid: dict[tuple[int, int], PeerEntry] = {}
        # the port GID behind each LID we learned a peer at (a LID is one port's): a new QPN at a known
        # LID, a peer's agent restarted, is known at once (`Resolver.who_is`); forgotten on port events
        self.gid_of_lid: dict[int, tuple[bytes, float]] = {}
        self._vif_by_mac = {v.mac: v for v in vifs}
        self._vif_by_key = {v.addr.key: v for v in vifs}
        self._next_id = next_id
        self._ids: dict[tuple[int, bytes], int] = {}
        self._gone: OrderedDict[tuple[int, bytes], None] = OrderedDict()   # reserved, oldest first
        self._free: list[int] = []  # ids below _next_id held by nobody (dropped reservations): used first
        self.on_new = None          # called with each new PeerEntry (the datapath installs it)
        self.on_removed = None      # called with (entries, why) when peers leave the table
        self.on_lid_change = None   # called with (entry, old_lid) when a known peer's LID changed
        self.max_peers: int | None = None
        self.max_reserved: int | None = None

    def set_vifs(self, vifs: list[Vif]) -> None:
        """Replace the local VIFs (TAP mode learns the guest's MAC after start)."""
        self.vifs = list(vifs)
        self._vif_by_mac = {v.mac: v for v in vifs}
        self._vif_by_key = {v.addr.key: v for v in vifs}

    # --- learning -------------------------------------------------------------------------------

    def learn(self, addr: IPoIBAddr, lid: int | None = None) -> PeerEntry:
        """Return the peer at addr, creating it (REMAC, id) on first sight; record its LID if given."""
        key = addr.key
        e = self.entries.get(key)
        if e is None:
            pid = self._ids.get(key)
            if pid is None:
                pid = self._ids[key] = self._new_id()
            e = PeerEntry(pid, self.remacs.assign(addr.gid, addr.qpn), addr)
            self._gone.pop(key, None)
            if self.max_peers is not None and len(self.entries) >= self.max_peers:
                # a batch at a time (1/64 of the cap, at least 8): each removal costs map syscalls
                cap = self.max_peers
                self.evict(len(self.entries) - cap + max(1, min(max(8, cap // 64), cap // 4)))
            self.entries[key] = e
            self._by_mac[e.remac] = e
            self._by_id[pid] = e
            if self.on_new is not None:
                self.on_new(e)
        elif addr.flags != e.addr.flags:
            e.addr = addr
        if lid and lid != e.lid:
            old = e.lid
            if old is not None:
                self._by_lid.pop((old, addr.qpn), None)
            e.lid = lid
            self._by_lid[(lid, addr.qpn)] = e
            if old and e.path_state == "resolved":      # the path leads to the old LID: resolve again
                e.path_state, e.path, e.ah = "unresolved", None, None
                if self.on_lid_change is not None:
                    self.on_lid_change(e, old)
        elif lid and self._by_lid.get((lid, addr.qpn)) is not e:
            self._by_lid[(lid, addr.qpn)] = e           # e.lid was set from a PathRecord, not indexed
        e.last_seen = now = time.monotonic()
        if lid:
            self.gid_of_lid[lid] = (addr.gid, now)
        return e

    def _new_id(self) -> int:
        """An id for a new peer, in [1, MAX_PEERS) (the index of the BPF id array): a recycled one
        first; with none left, the oldest reservation is dropped, or else a peer evicted, for its id."""
        if self._free:
            return self._free.pop()
        if self._next_id < MAX_PEERS:
            self._next_id += 1
            return self._next_id - 1
        if not self._gone:
            self.evict(1)                     # its reservation may be trimmed at once: then its id is free
        if not self._free:
            self._drop_oldest()
        return self._free.pop()

    def _drop_oldest(self) -> None:
        qpn, gid = self._gone.popitem(last=False)[0]
        pid = self._ids.pop((qpn, gid), None)
        if pid is not None:
            self._free.append(pid)
        self.remacs.forget(gid, qpn)

    def remove(self, entries, why: str = "idle") -> list[PeerEntry]:
        """Take peers out of the table (their REMAC and id stay reserved); returns those removed."""
        out = []
        for e in entries:
            key = e.addr.key
            if self.entries.get(key) is not e:
                continue
            del self.entries[key]
            self._by_mac.pop(e.remac, None)
            self._by_id.pop(e.peer_id, None)
            if e.lid is not None and self._by_lid.get((e.lid, e.addr.qpn)) is e:
                del self._by_lid[(e.lid, e.addr.qpn)]
            if e._pending:
                e._pending.clear()
            self._gone[key] = None
            out.append(e)
        if out and self.on_removed is not None:
            self.on_removed(out, why)
        self.trim_reservations()
        return out

    def evict(self, n: int) -> list[PeerEntry]:
        """Remove n peers, least recently active first (the hard cap's LRU eviction), but peers nothing
        was ever sent to before any we talk to: a flood of new senders churns among its own entries
        instead of pushing out the peers in use."""
        if n <= 0:
            return []
        def rank(e):
            return (e.sends > 0 or e.path_state == "resolved", e.active_at)
        return self.remove(heapq.nsmallest(n, self.entries.values(), key=rank), "evicted")

    def trim_reservations(self) -> int:
        """Drop the oldest reservations (REMAC and id of removed peers) beyond `max_reserved`."""
        limit = self.max_reserved
        dropped = 0
        while limit is not None and len(self._gone) > limit:
            self._drop_oldest()
            dropped += 1
        return dropped

    @property
    def reserved(self) -> int:
        """Reservations kept for peers not in the table."""
        return len(self._gone)

    def by_lid(self, lid: int, qpn: int) -> PeerEntry | None:
        """The peer sending from (SLID, source QPN): how a datagram without GRH is identified."""
        return self._by_lid.get((lid, qpn))

    def by_id(self, pid: int) -> PeerEntry | None:
        return self._by_id.get(pid)

    def forget_paths(self) -> None:
        """Mark every path stale (port event, LID change): they are resolved again on next use."""
        for e in self.entries.values():
            e.path_state, e.path, e.ah, e.reverse_via = "unresolved", None, None, None
        self.gid_of_lid.clear()                 # LIDs may have moved (an SM's new assignment)

    # --- the oracle's Tables interface, with dictionaries -----------------------------------------

    def vif_by_mac(self, mac):
        return self._vif_by_mac.get(bytes(mac))

    def peer_by_mac(self, mac):
        e = self._by_mac.get(bytes(mac))
        return e.as_peer() if e is not None else None

    def peer_by_id(self, peer_id):
        e = self._by_id.get(peer_id)
        return e.as_peer() if e is not None else None

    def mac_by_addr(self, addr):
        v = self._vif_by_key.get(addr.key)
        if v is not None:
            return v.mac
        e = self.entries.get(addr.key)
        return e.remac if e is not None else None

    # --- persistence ----------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The state file's form (format 2): every peer as [GID, QPN, flags, LID, id, REMAC] and every
        reservation as [GID, QPN, id, REMAC], short lists rather than objects (an agent may persist 1e5
        peers, and reading them back must not cost more than the table itself)."""
        peers = [[gid_str(e.addr.gid), e.addr.qpn, e.addr.flags, e.lid, e.peer_id, mac_str(e.remac)]
                 for e in self.entries.values()]
        reserved = [[gid_str(g), q, i, mac_str(self.remacs.assign(g, q))]
                    for (q, g), i in self._ids.items() if (q, g) not in self.entries]
        return {"format": 2, "next_id": self._next_id, "peers": peers, "reserved": reserved}

    def restore(self, data: dict) -> None:
        """Take peers, REMACs, ids and reservations from a state file written by `to_json` (format 2,
        or the earlier one of objects), before any peer is learned."""
        vifs = set(self._vif_by_mac)
        if data.get("format") != 2:
            self._restore_v1(data, vifs)
            return
        rows, kept = data.get("peers", []), data.get("reserved", [])
        gids = {}

        def gid(text):
            g = gids.get(text)
            if g is None:
                g = gids[text] = parse_gid(text)
            return g
        self.remacs = RemacTable.from_json(itertools.chain(
            ({"gid": r[0], "qpn": r[1], "remac": r[5]} for r in rows),
            ({"gid": r[0], "qpn": r[1], "remac": r[3]} for r in kept)), reserved=vifs)
        for r in rows:
            self._ids[(int(r[1]), gid(r[0]))] = int(r[4])
        for r in kept:
            self._ids[(int(r[1]), gid(r[0]))] = int(r[2])
        self._renumber(int(data.get("next_id", 1)))
        for r in rows:                        # known peers come back at once (paths resolve on use)
            self.learn(IPoIBAddr(int(r[2]), int(r[1]), gid(r[0])), lid=r[3])
        gids.clear()
        for r in kept:
            self._gone[(int(r[1]), parse_gid(r[0]))] = None

    def _renumber(self, saved_next: int) -> None:
        """After restoring `_ids`: ids outside [1, MAX_PEERS) (a state file of an older version, whose
        ids only grew) or held twice get new ones (ids are internal: REMACs stay); the free list is
        every id below next_id nobody holds."""
        used: set[int] = set()
        bad = []
        for key, pid in self._ids.items():
            if 0 < pid < MAX_PEERS and pid not in used:
                used.add(pid)
            else:
                bad.append(key)
        self._next_id = min(MAX_PEERS, max(self._next_id, saved_next, max(used, default=0) + 1))
        self._free = sorted(set(range(1, self._next_id)) - used, reverse=True)
        for key in bad:
            if not self._free and self._next_id >= MAX_PEERS:
                del self._ids[key]            # no id left: this one is forgotten (its REMAC too, below)
                continue
            self._ids[key] = self._new_id()

    @staticmethod
    def saved_gids(data: dict) -> list[bytes]:
        """The distinct GIDs of the peers in a state file written by `to_json` (either format), in order."""
        if data.get("format") == 2:
            texts = (r[0] for r in data.get("peers", []))
        else:
            texts = (it["gid"] for it in data.get("peers", []))
        return list(dict.fromkeys(parse_gid(t) for t in texts))

    def _restore_v1(self, data: dict, vifs: set) -> None:
        self.remacs = RemacTable.from_json(data.get("remacs", []), reserved=vifs)
        for it in data.get("ids", []):
            self._ids[(int(it["qpn"]), parse_gid(it["gid"]))] = int(it["id"])
        self._renumber(int(data.get("next_id", 1)))
        for it in data.get("peers", []):
            self.learn(IPoIBAddr(int(it.get("flags", 0)), int(it["qpn"]), parse_gid(it["gid"])), lid=it.get("lid"))
        for key in self._ids:                 # the rest are reservations of peers removed earlier
            if key not in self.entries:
                self._gone[key] = None
