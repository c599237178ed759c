"""Peers: path resolution and sender learning, without ever waiting for the SA on the loop.

A peer's path is resolved on first use: the frame waits in the peer's queue (at most 3, the rest are
dropped and counted as `unresolved_queue_full`), a PathRecord query goes to the SA worker, and when
it answers the AH is made and the queue flushed. A failed query drops the queue (`path_failed`) and
the next try waits for the peer's backoff (1 s doubling to 16 s). Peers already resolved keep
flowing whatever the SA does; port events mark every path stale, to be resolved again on next use.

A peer we hear from needs no query before we answer it (`reverse`): on InfiniBand a datagram's own
SLID and SL are a path back to its sender, which is how UD responders answer (an AH made from the work
completion). The receive loop notes them on a peer that has no path (`reverse_via`, a tuple: senders
we never answer cost nothing more); the first send to it makes that path, with the link's MTU (the
broadcast group's, which every member's path supports), and sends what waited. The PathRecord query
still runs, in the background from that first send (or as `from_arp`'s check), and its answer
replaces it (the SA's SL and MTU); a failed query leaves the reverse path in place. This takes
both SA round trips out of a first exchange (the replier's and the asker's: docs/design.md §8).

Senders are learned from what their datagrams carry: the GRH's source GID (multicast, routed), the
(SLID, source QPN) of a peer seen before, or the sender hardware address of an ARP it sent when that
is the datagram's own source (`from_arp`: spoofed ARPs are dropped, first contacts checked with the
SA). ND options teach nothing (`from_nd`). A unicast datagram without a GRH from a sender never seen
is dropped while the SA is asked (at most once a second per LID) who has that LID. ARPs and NAs also
tell `migration.py` where a guest that left this host answers now.
"""

from __future__ import annotations

import logging
import time

from xdpoib.agent.loop import Backoff
from xdpoib.errors import FrameError
from xdpoib.peers import PeerEntry
from xdpoib.reasons import DropReason as R
from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr, gid_str

log = logging.getLogger("xdpoib.agent")

WHO_IS_INTERVAL_S = 1.0
#: An IPoIB address nobody has (QPN 0 is never a UD QP's; not all zero and not the multicast QPN, which
#: the datapath translates to the zero MAC): written over a spoofed sender address so no datapath learns it.
UNLEARNABLE = bytes(4) + b"\xee" * 16
WHO_IS_CACHE = 4096
KNOWN_LID_S = 300.0     # a LID -> GID learned this recently is trusted for a new QPN at that LID


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
            self.a.drops[R.UNRESOLVED_QUEUE_FULL] += over
        e.pending.extend((qp, fr) for fr in frames)
        self.resolve(e, qp)

    def resolve(self, e: PeerEntry, qp=None) -> None:
        """Ask the SA worker for a PathRecord (unless one is in flight or the peer is backing off), in
        the partition of the QP the frames go out from (a VLAN's, or the attachment's)."""
        a = self.a
        key = ("path", e.addr.key)
        if a.sa_worker.pending(key) or not self.backoff.ready(key):
            if e.path_state == "failed" and e.pending:
                a.drops[R.PATH_FAILED] += len(e.pending)
                e.pending.clear()
            return
        e.path_state = "resolving"
        sa, gid, sgid = a.sa, e.addr.gid, a.port_attrs.gid
        pkey = (qp.pkey | 0x8000) if qp is not None else a.pkey

        def done(ok, res):
            now = time.monotonic()
            if ok:
                try:
                    path, ah = self.path_of(res)
                except Exception as ex:
                    ok, res = False, ex
            if not ok and e.path_from_wc and e.path_state == "resolved":
                e.path_from_wc = 1          # the reverse path works: keep it, ask again after the backoff
                delay = self.backoff.failed(key, now)
                log.info("path to %s (retry in %.0f s): %s (the reverse path stays)", gid_str(gid), delay, res)
                return
            if not ok:
                e.path_state, e.resolved_at = "failed", now
                delay = self.backoff.failed(key, now)
                a.drops[R.PATH_FAILED] += len(e.pending)
                e.pending.clear()
                log.warning("path to %s (retry in %.0f s): %s", gid_str(gid), delay, res)
                return
            self.backoff.succeeded(key)
            e.lid = e.lid or res.dlid
            self.use_path(e, path, ah, "paths_resolved")
        a.sa_worker.submit(key, lambda: sa.path(gid, sgid=sgid, pkey=pkey), done)

    def reverse(self, e: PeerEntry) -> bool:
        """Something to send to e, which has no path but sent us a datagram meanwhile (from the
        (SLID, SL) in `e.reverse_via`): send over that datagram's reverse path (the module doc) until
        the PathRecord query answers; frames held for it go first. False: no AH could be made."""
        from xdpoib.fabric.base import Path

        a = self.a
        slid, sl = e.reverse_via
        e.reverse_via = None
        path = Path(dlid=slid, sl=sl, mtu=a.ib_mtu)
        try:
            ah = a.backend.create_ah(path)
        except Exception as ex:                 # resolving as before is still possible
            log.warning("a reverse path to LID %d: %s", slid, ex)
            return False
        self.use_path(e, path, ah, "paths_reversed", from_wc=1)
        return True

    def path_of(self, res):
        """The path and AH a PathRecord answer gives (its MTU capped at the link's); raises what
        making the AH raises."""
        from xdpoib.fabric.base import Path

        a = self.a
        path = Path(dlid=res.dlid, sl=res.sl, mtu=min(res.mtu_bytes or a.ib_mtu, a.ib_mtu))
        return path, a.backend.create_ah(path)

    def use_path(self, e: PeerEntry, path, ah, counter: str, from_wc: int = 0) -> None:
        """e's path is now `path` (its AH `ah`): resolved, counted under `counter`, frames held sent."""
        e.path_mtu, e.path, e.ah, e.path_from_wc = path.mtu, path, ah, from_wc
        e.path_state, e.resolved_at = "resolved", time.monotonic()
        self.a.stats[counter] += 1
        if e.pending:
            queued = list(e.pending)
            e.pending.clear()
            for qp, fr in queued:
                self.a.forwarder.send_peer(e, [fr], qp=qp)

    def refine(self, e: PeerEntry, qp=None) -> None:
        """A send over a reverse path not asked for yet: ask the SA for the real one in the background
        (the reverse path keeps sending until the answer replaces it; `resolve` does the rest). Not
        while a query for it is in flight (`from_arp`'s check is one) or it is backing off."""
        key = ("path", e.addr.key)
        if self.a.sa_worker.pending(key) or not self.backoff.ready(key):
            return
        state = e.path_state
        e.path_from_wc = 2
        self.resolve(e, qp)
        if e.path_state == "resolving":         # it stays resolved while the query runs
            e.path_state = state
        if not self.a.sa_worker.pending(key):   # refused (the SA gate): ask on a later send
            e.path_from_wc = 1

    # ---- learning

    def from_arp(self, data, src_qpn: int, slid: int) -> PeerEntry | bool | None:
        """The sender of an ARP (or RARP), learned from its sender hardware address only when that
        address is the datagram's own source: the QPN must be the source QPN, and the GID the GID of
        the sender as we know it by (SLID, source QPN) (the GRH's SGID for a datagram with one: the
        caller has learned it under that SLID already).

        A sender known by (SLID, QPN) whose ARP names another address is spoofing: the ARP is dropped
        and counted (`arp_spoofed`), nothing is learned. A sender not known yet (no GRH, a LID never
        seen: a unicast ARP reply is usually the first we hear from a peer) is taken at its word at
        once, so first contact costs no round trip, and checked in the background (`_check_sender`:
        the path to the GID it claims must lead to its LID); one that lied (or claims a GID the SA does
        not know) is removed again and counted as spoofed. An address we know at another LID is not taken over
        (`arp_unverified`: the caller asks the SA who has the new LID, which settles a real move).
        Without a token from the SA gate the check cannot run, and the ARP is dropped
        (`arp_unverified`). One ARP naming another address than its sender's is not spoofing: a
        gratuitous one from a known sender on behalf of a peer we heard from ourselves (a migrated
        guest's old host announcing its new place, `migration.py`) goes on as it is (`arp_on_behalf`);
        one naming a VIF of ours gives that VIF the address (`Migration.on_behalf`).

        Returns the peer learned, None (not an ARP to learn from), or False: drop it. A dropped ARP
        also has its sender address overwritten in place with `UNLEARNABLE`, so that a datapath given
        it anyway refuses it (ARP_UNKNOWN_HWADDR) instead of teaching eth4 a spoofed address."""
        if len(data) < 4 + f.ARP_IB_LEN or data[8] != 20 or bytes(data[:2]) not in (b"\x08\x06", b"\x80\x35"):
            return None
        a = self.a
        peers = a.peers
        sha = IPoIBAddr.unpack(bytes(data[12:32]))
        src = peers.by_lid(slid, src_qpn)
        known = peers.entries.get(sha.key)
        spoofed = sha.qpn != src_qpn or (src is not None and src.addr.key != sha.key)
        moved = src is None and known is not None and known.lid and known.lid != slid
        if spoofed and src is not None and bytes(data[32:36]) == bytes(data[56:60]):
            own = a.vifs.by_key(sha.key)
            if own is not None:         # another host found a guest of ours here (migration.py)
                a.migration.on_behalf(own, bytes(data[32:36]))
                return None
            if known is not None and known.lid:
                # a gratuitous ARP on behalf of a peer we heard from ourselves (a migrated guest, announced
                # by its old host: migration.py): it teaches nothing new, the frame goes on as it is
                a.stats["arp_on_behalf"] += 1
                return None
        if spoofed or moved:
            # a known address from another LID may be a peer the SM moved: who-is settles it
            a.drops[R.ARP_SPOOFED if spoofed else R.ARP_UNVERIFIED] += 1
            try:
                data[12:32] = UNLEARNABLE
            except TypeError:                   # a read-only buffer: the caller must drop it
                pass
            return False
        if src is not None or not slid:
            e = peers.learn(sha, lid=slid or None)
        elif not self._check_sender(sha, slid, src_qpn):
            a.drops[R.ARP_UNVERIFIED] += 1
            return False
        else:
            e = peers.learn(sha, lid=slid)
        if a.migration.departed:                             # a departed guest answering or arriving elsewhere?
            if data[0] == 0x80:
                a.migration.arrival()
            else:
                a.migration.heard(bytes(data[32:36]), e)
        return e

    def _check_sender(self, sha: IPoIBAddr, slid: int, src_qpn: int) -> bool:
        """`from_arp`'s background check of a first contact: a PathRecord to the GID it claims, in the
        default partition (every port is a member), must lead to the LID it came from. The answer is
        also the path we send to it with (the attachment in the default partition), so checking costs
        the first packet nothing: it is the query resolving would make. With that query already in
        flight, the SA is asked who has the LID instead. False: the SA gate has no token for it."""

        a = self.a
        peers = a.peers
        key = ("path", sha.key)
        by_path = not a.sa_worker.pending(key)
        if not by_path:
            key = ("arpcheck", slid, src_qpn)
            if a.sa_worker.pending(key):
                return True
        sa, gid, sgid = a.sa, sha.gid, a.port_attrs.gid
        default = a.pkey & 0x7FFF == 0x7FFF

        def call():
            return sa.path(gid, sgid=sgid, pkey=0xFFFF) if by_path else sa.path_to_lid(slid, 0xFFFF)

        def done(ok, res):
            e = peers.entries.get(sha.key)
            if ok and (res.dlid == slid if by_path else bytes(res.dgid) == gid):
                a.stats["arp_senders_verified"] += 1
                if by_path and default and e is not None and (e.path_state != "resolved" or e.path_from_wc):
                    self._path_found(e, res)
                return
            if not ok and getattr(res, "status", None) != 0x0300:
                log.warning("checking the ARP sender at LID %d: %s", slid, res)        # cannot tell
                return
            a.drops[R.ARP_SPOOFED] += 1
            log.warning("ARP from LID %d claimed %s, which is not the port at that LID: forgotten",
                        slid, gid_str(gid))
            if e is not None and e.lid == slid:
                peers.remove([e], "spoofed")
        return a.sa_worker.submit(key, call, done)

    def _path_found(self, e: PeerEntry, res) -> None:
        """A PathRecord answered for e (as `resolve` records one): AH, state, the frames held."""
        try:
            path, ah = self.path_of(res)
        except Exception as ex:
            log.warning("path to %s: %s", gid_str(e.addr.gid), ex)
            return
        self.backoff.succeeded(("path", e.addr.key))
        e.lid = e.lid or res.dlid
        self.use_path(e, path, ah, "paths_resolved")

    def who_is(self, slid: int, qpn: int):
        """A sender seen only as (SLID, QPN) (unicast without GRH, never announced to us). At a LID we
        learned a peer at lately (the same port: its agent restarted with a new QPN), the peer is learned
        at once and returned; else None, and the SA is asked which GID is behind that LID (at most once a
        second per LID): the peer is learned on the answer."""
        a = self.a
        now = time.monotonic()
        known = a.peers.gid_of_lid.get(slid)
        if known is not None and now - known[1] < KNOWN_LID_S:
            a.stats["sources_by_known_lid"] += 1
            return a.peers.learn(IPoIBAddr(0, qpn, known[0]), lid=slid)
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
        return None

    def from_nd(self, data, src_qpn: int | None = None, slid: int | None = None) -> bool:
        """Addresses carried in ND link-layer options, learned only when they are the sender's own.

        An option naming an address nobody is known by teaches nothing (a flood of made-up options
        must not fill the peer table; the sender's own address is known by the time its ND arrives:
        from the GRH of a multicast NS/RA, or by its LID); the datapath then drops the message
        (ND_UNKNOWN_LLADDR). With the datagram's source given (SLID, source QPN), an option naming
        any address but the sender's is foreign: the message is dropped (`nd_foreign_lladdr`; its
        option address overwritten in place, as `from_arp` does) and False returned. Known addresses only
        have their flags refreshed."""
        if len(data) < 4 + 40 + 4 or data[4 + 6] != f.IPPROTO_ICMPV6 or data[44] not in f.ND_TYPES:
            return True
        msg = bytes(data[44:])
        try:
            opts = f.parse_nd_options(msg, msg[0])
        except FrameError:
            return True
        a = self.a
        peers = a.peers
        own = a.vif.addr.key
        src = peers.by_lid(slid, src_qpn) if slid is not None and src_qpn is not None else None
        for o in opts:
            if o.opt_type not in (f.ND_OPT_SLLA, f.ND_OPT_TLLA) or len(o.raw) != 24:
                continue
            addr = IPoIBAddr.unpack(o.raw[4:24])
            if addr.key == own:
                continue
            if src is not None and addr.key != src.addr.key:
                a.drops[R.ND_FOREIGN_LLADDR] += 1
                at = 44 + o.offset
                try:
                    data[at + 4:at + 24] = UNLEARNABLE
                except TypeError:
                    pass
                return False
            if addr.key in peers.entries:
                e = peers.learn(addr)
                if a.migration.departed and o.opt_type == f.ND_OPT_TLLA and data[44] == f.ND_NA:
                    a.migration.heard(bytes(data[52:68]), e)     # NA target: a departed guest answering?
            else:
                a.stats["nd_lladdr_not_learnt"] += 1
        return True
