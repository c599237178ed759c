"""Peers: path resolution and sender learning, without ever waiting for the SA on the loop.

A peer's path is resolved on first use: the frame waits in the peer's queue (at most 3, the rest are
dropped and counted as `unresolved_queue_full`), a PathRecord query goes to the SA worker, and when
it answers the AH is made and the queue flushed. A failed query drops the queue (`path_failed`) and
the next try waits for the peer's backoff (1 s doubling to 16 s). Peers already resolved keep
flowing whatever the SA does; port events mark every path stale, to be resolved again on next use.

Senders are learned from what their datagrams carry: the GRH's source GID (multicast, routed), the
(SLID, source QPN) of a peer seen before, the sender hardware address of an ARP it sent (when its
QPN matches the datagram's), or the addresses ND options carry. A unicast datagram without a GRH from
a sender never seen is dropped while the SA is asked (at most once a second per LID) who has that LID.
"""

from __future__ import annotations

import logging
import time

from xdpoib.agent.loop import Backoff
from xdpoib.errors import FrameError
from xdpoib.peers import PeerEntry
from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr, gid_str

log = logging.getLogger("xdpoib.agent")

WHO_IS_INTERVAL_S = 1.0
WHO_IS_CACHE = 4096


class Resolver:
    """Paths to peers, and who sent what (see the module doc)."""

    def __init__(self, agent) -> None:
        self.a = agent
        self.backoff = Backoff()
        self._who_is_asked: dict[int, float] = {}

    # ---- paths

    def queue(self, e: PeerEntry, frames: list[bytes], qp=None) -> None:
        """Frames for a peer whose path is not resolved (from `qp`, a VIF's): keep the last 3 and resolve."""
        over = len(e.pending) + len(frames) - e.pending.maxlen
        if over > 0:
            self.a.drops["unresolved_queue_full"] += over
        e.pending.extend((qp, fr) for fr in frames)
        self.resolve(e, qp)

    def resolve(self, e: PeerEntry, qp=None) -> None:
        """Ask the SA worker for a PathRecord (unless one is in flight or the peer is backing off), in
        the partition of the QP the frames go out from (a VLAN's, or the attachment's)."""
        from xdpoib.fabric.base import Path

        a = self.a
        key = ("path", e.addr.key)
        if a.sa_worker.pending(key) or not self.backoff.ready(key):
            if e.path_state == "failed" and e.pending:
                a.drops["path_failed"] += len(e.pending)
                e.pending.clear()
            return
        e.path_state = "resolving"
        sa, gid, sgid = a.sa, e.addr.gid, a.port_attrs.gid
        pkey = (qp.pkey | 0x8000) if qp is not None else a.pkey

        def done(ok, res):
            now = time.monotonic()
            if ok:
                try:
                    mtu = min(res.mtu_bytes or a.ib_mtu, a.ib_mtu)
                    path = Path(dlid=res.dlid, sl=res.sl, mtu=mtu)
                    ah = a.backend.create_ah(path)
                except Exception as ex:
                    ok, res = False, ex
            if not ok:
                e.path_state, e.resolved_at = "failed", now
                delay = self.backoff.failed(key, now)
                a.drops["path_failed"] += len(e.pending)
                e.pending.clear()
                log.warning("path to %s (retry in %.0f s): %s", gid_str(gid), delay, res)
                return
            self.backoff.succeeded(key)
            e.path_mtu, e.path, e.ah = mtu, path, ah
            e.lid = e.lid or res.dlid
            e.path_state, e.resolved_at = "resolved", now
            a.stats["paths_resolved"] += 1
            if e.pending:
                queued = list(e.pending)
                e.pending.clear()
                for qp, fr in queued:
                    a.forwarder.send_peer(e, [fr], qp=qp)
        a.sa_worker.submit(key, lambda: sa.path(gid, sgid=sgid, pkey=pkey), done)

    # ---- learning

    def from_arp(self, data, src_qpn: int, slid: int) -> PeerEntry | None:
        """A sender's own address, from the ARP it sent (sender hardware address) if it matches."""
        if len(data) >= 4 + f.ARP_IB_LEN and data[8] == 20 and bytes(data[:2]) in (b"\x08\x06", b"\x80\x35"):
            sha = IPoIBAddr.unpack(bytes(data[12:32]))
            if sha.qpn == src_qpn:
                return self.a.peers.learn(sha, lid=slid)
        return None

    def who_is(self, slid: int, qpn: int) -> None:
        """A sender seen only as (SLID, QPN) (unicast without GRH, never announced to us): ask the SA
        which GID is behind that LID (at most once a second per LID); the peer is learned on the answer."""
        a = self.a
        now = time.monotonic()
        if now - self._who_is_asked.get(slid, -1e9) < WHO_IS_INTERVAL_S:
            return
        if len(self._who_is_asked) >= WHO_IS_CACHE:
            self._who_is_asked = {k: t for k, t in self._who_is_asked.items() if now - t < WHO_IS_INTERVAL_S}
        self._who_is_asked[slid] = now
        sa, pkey = a.sa, a.pkey

        def done(ok, res):
            if not ok:
                log.warning("who is LID %d: %s", slid, res)
                return
            a.stats["sources_resolved_by_lid"] += 1
            a.peers.learn(IPoIBAddr(0, qpn, res.dgid), lid=slid)
        a.sa_worker.submit(("whois", slid), lambda: sa.path_to_lid(slid, pkey), done)

    def from_nd(self, data) -> None:
        """Learn the IPoIB addresses that ND link-layer options carry (so their translation succeeds)."""
        if len(data) < 4 + 40 + 4 or data[4 + 6] != f.IPPROTO_ICMPV6 or data[44] not in f.ND_TYPES:
            return
        msg = bytes(data[44:])
        try:
            opts = f.parse_nd_options(msg, msg[0])
        except FrameError:
            return
        own = self.a.vif.addr.key
        for o in opts:
            if o.opt_type in (f.ND_OPT_SLLA, f.ND_OPT_TLLA) and len(o.raw) == 24:
                addr = IPoIBAddr.unpack(o.raw[4:24])
                if addr.key != own:
                    self.a.peers.learn(addr)
