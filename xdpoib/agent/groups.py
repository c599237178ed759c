"""Multicast membership: the groups an attachment sends to and receives from, kept in the SA.

Every SA call runs on the SA worker (`loop.Worker`); results come back as events on the loop, so a
join, a leave or a membership check never holds up frames. A group is

    not joined -> joining (an SA Set in flight) -> joined (AH made; full members also attached)
               \\-> failed: retried with backoff (1 s doubling to 16 s); frames for it meanwhile are
                   dropped and counted as `no_group` (at most 3 wait while the first join is in flight)

Full joins come from the broadcast group (at bring-up), eth4's own multicast list (mirrored every
second by `sync`) and IGMP/MLD reports snooped from behind eth4; send-only joins from the first frame
sent to a group. Every 5 s one worker call asks the SA whether each full membership still exists
(OpenSM forgets a port's memberships when its link bounces) and the missing ones are rejoined.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque

from xdpoib.agent.loop import Backoff
from xdpoib.errors import XdpoibError
from xdpoib.peers import MAX_PENDING, GroupEntry
from xdpoib.reasons import DropReason as R
from xdpoib.wire.addr import gid_str
from xdpoib.wire.mgid import ipv4_mgid, ipv6_mgid

log = logging.getLogger("xdpoib.agent")

JOIN_FULL = 1
MEMBERSHIP_CHECK_S = 5.0
LEAVE_BUDGET_S = 2.0        # teardown: how long leaving every group may take in all
STOP_QUERY_S = 0.5          # teardown: how long one SA query may take


class Membership:
    """The attachment's groups (see the module doc)."""

    def __init__(self, agent) -> None:
        self.a = agent
        self.groups: dict[bytes, GroupEntry] = {}
        self._next_group_id = 1
        self.backoff = Backoff()
        self._pending: dict[bytes, deque] = {}
        self._lost: set[bytes] = set()          # broadcast groups lost and not joined again yet

    # ---- table

    def group(self, mgid: bytes, why: str) -> GroupEntry:
        g = self.groups.get(mgid)
        if g is None:
            g = self.groups[mgid] = GroupEntry(mgid, self._next_group_id)
            self._next_group_id += 1
        g.why.add(why)
        return g

    def record_join(self, g: GroupEntry, rec, join_state: int) -> None:
        """A join succeeded: keep its parameters, make the AH, attach (full members), tell the maps."""
        from xdpoib.fabric.base import Path

        a = self.a
        g.join_state, g.mlid, g.qkey, g.mtu = g.join_state | join_state, rec.mlid, rec.qkey, rec.mtu_bytes
        pump = getattr(a, "pump", None)
        if pump is not None:
            pump.set_group(g.mgid, g.group_id)
        g.joined_at = time.monotonic()
        g.ah = a.backend.create_ah(Path(dlid=rec.mlid, sl=rec.sl, mtu=rec.mtu_bytes or a.ib_mtu,
                                        dgid=g.mgid, grh=True, hop_limit=rec.hop_limit or 1,
                                        traffic_class=rec.tclass, flow_label=rec.flow_label))
        if join_state & JOIN_FULL:
            qp = a.partitions.of_mgid(g.mgid).qp       # the partition's QP (VIF 0's) receives it
            if g.attached:          # a rejoin: attach again, so the backend sees the fresh membership
                with contextlib.suppress(XdpoibError):
                    qp.detach_mcast(g.mgid, g.mlid)
            qp.attach_mcast(g.mgid, rec.mlid)
            g.attached = True

    def by_state(self) -> dict:
        return dict(Counter("full" if g.join_state & JOIN_FULL else "send_only" if g.join_state
                            else "not_joined" for g in self.groups.values()))

    # ---- joins and leaves (asynchronous)

    def join(self, mgid: bytes, why: str, full: bool = True) -> GroupEntry:
        """Ask for a join unless one is in place or in flight (or backing off after a failure)."""
        a = self.a
        g = self.group(mgid, why)
        if g.join_state & JOIN_FULL or (g.join_state and not full):
            return g
        key = ("join", mgid, full)
        if not self.backoff.ready(key) or a.sa_worker.pending(key):
            return g
        sa = a.sa
        create = None if a.partitions.is_broadcast(mgid) else a.partitions.of_mgid(mgid).bcast
        if full:
            def call():
                return sa.join(mgid, JOIN_FULL, create=create), JOIN_FULL
        else:
            def call():
                return sa.join_send_only(mgid, create=create), sa.send_only_join_state()

        def done(ok, res):
            if not ok:
                a.drops[R.JOIN_FAILED] += 1
                delay = self.backoff.failed(key)
                log.warning("join %s failed (retry in %.0f s): %s", gid_str(mgid), delay, res)
                q = self._pending.pop(mgid, None)
                if q:
                    a.drops[R.NO_GROUP] += len(q)
                if full and mgid in self.groups and self._wanted(self.groups[mgid]):
                    a.loop.call_later(delay, lambda: self._retry(mgid, why))
                    if a.partitions.is_broadcast(mgid):
                        self._broadcast_lost(mgid, res)
                return
            self.backoff.succeeded(key)
            g2 = self.groups.get(mgid)
            if g2 is None:
                return
            rec, state = res
            try:
                self.record_join(g2, rec, state)
            except XdpoibError as e:
                log.warning("attaching to %s: %s", gid_str(mgid), e)
                return
            if full and a.partitions.is_broadcast(mgid):
                self._broadcast_back(mgid, rec)
            a.stats["joins"] += 1
            q = self._pending.pop(mgid, None)
            for qp, fr in q or ():
                a.forwarder.send_group(mgid, [fr], qp=qp)
        a.sa_worker.submit(key, call, done)
        return g

    # ---- the broadcast group lost and found again (a running agent; bring-up waits in partitions.py)

    def _broadcast_lost(self, mgid: bytes, err) -> None:
        """A broadcast group could not be rejoined (the SM has not created it again yet, as after a
        failover, or its partition lost the `ipoib` flag): carrier off on eth4 while it is retried with
        backoff (1 s doubling to 16 s), as Linux ipoib does; said once in the log and in `status`."""
        a = self.a
        if mgid in self._lost:
            return
        self._lost.add(mgid)
        a.stats["broadcast_lost"] += 1
        pkey = int.from_bytes(mgid[4:6], "big")
        a._say(f"waiting for the broadcast group {gid_str(mgid)} of partition {pkey:#06x} (lost; rejoining "
               f"with backoff, carrier off): {err}")
        self._carrier(False)

    def _broadcast_back(self, mgid: bytes, rec) -> None:
        """A broadcast group joined again: its parameters become the partition's template; carrier on."""
        a = self.a
        part = a.partitions.of_mgid(mgid)
        part.bcast = rec
        if mgid == a.bcast_mgid:
            a.bcast = rec
        if mgid not in self._lost:
            return
        self._lost.discard(mgid)
        if not self._lost:
            a.waiting_for = None
            self._carrier(True)
        log.warning("broadcast group %s is back (MLID %#x): carrier on", gid_str(mgid), rec.mlid)

    def _carrier(self, up: bool) -> None:
        from xdpoib import link

        internal = self.a.spec.internal       # eth4's carrier follows its internal end (links.py)
        try:
            link.set_link(internal, None, up=up)
        except (XdpoibError, OSError) as e:
            log.warning("carrier %s on %s: %s", "on" if up else "off", internal, e)

    def _wanted(self, g: GroupEntry) -> bool:
        return bool(g.why - {"send"})

    def _retry(self, mgid: bytes, why: str) -> None:
        g = self.groups.get(mgid)
        if g is not None and self._wanted(g) and not g.join_state & JOIN_FULL:
            self.join(mgid, why)

    def hold(self, mgid: bytes, frames: list[bytes], qp=None) -> None:
        """Frames for a group whose send-only join is in flight (from `qp`, a VIF's): keep the last 3,
        drop the rest."""
        q = self._pending.get(mgid)
        if q is None:
            if len(self._pending) > 1024:
                self.a.drops[R.NO_GROUP] += len(frames)
                return
            q = self._pending[mgid] = deque(maxlen=MAX_PENDING)
        over = len(q) + len(frames) - MAX_PENDING
        if over > 0:
            self.a.drops[R.UNRESOLVED_QUEUE_FULL] += over
        q.extend((qp, fr) for fr in frames)

    def leave(self, g: GroupEntry, wait: bool = False) -> None:
        """Detach at once; the SA Delete goes to the worker (errors logged: the SA forgets us anyway)."""
        a = self.a
        if g.attached:
            with contextlib.suppress(XdpoibError):
                a.partitions.of_mgid(g.mgid).qp.detach_mcast(g.mgid, g.mlid)
            g.attached = False
        state, g.join_state = g.join_state, 0
        self.groups.pop(g.mgid, None)
        self._pending.pop(g.mgid, None)
        if not state:
            return
        mgid, sa = g.mgid, a.sa

        def done(ok, res):
            if not ok:
                log.warning("leave %s: %s", gid_str(mgid), res)
        if wait:
            with contextlib.suppress(XdpoibError, TimeoutError):
                a.sa_worker.call(lambda: sa.leave(mgid, state), timeout=10)
        else:
            a.sa_worker.submit(("leave", mgid), lambda: sa.leave(mgid, state), done)

    def detach_local(self) -> None:
        """Detach our QPs from every group, leaving nothing in the SA (a restart: the port's memberships
        are the successor's now)."""
        a = self.a
        for g in self.groups.values():
            if g.attached:
                with contextlib.suppress(XdpoibError):
                    a.partitions.of_mgid(g.mgid).qp.detach_mcast(g.mgid, g.mlid)
                g.attached = False

    def leave_all(self) -> None:
        """Teardown: detach from every group at once, then leave them in the SA, best effort and bounded
        (LEAVE_BUDGET_S in all, each SA query while stopping at most STOP_QUERY_S): an SA that is slow,
        stopped or behind on retries is not waited for, since OpenSM drops a gone port's memberships
        itself, and everything else the agent made must still be removed before `detach` gives up on it."""
        a = self.a
        if not getattr(a, "owns", True):     # handed over, or a successor that never took over
            self.detach_local()
            self.groups.clear()
            self._pending.clear()
            return
        client = getattr(a.sa, "client", None)
        if client is not None and hasattr(client, "policy"):       # queries still queued end quickly too
            from xdpoib.fabric.sa_client import RetryPolicy

            client.policy = RetryPolicy(timeout=0.1, max_timeout=0.2, retries=2, deadline=STOP_QUERY_S)
        gone = []
        for g in list(self.groups.values()):
            if g.attached:
                with contextlib.suppress(XdpoibError):
                    a.partitions.of_mgid(g.mgid).qp.detach_mcast(g.mgid, g.mlid)
                g.attached = False
            if g.join_state:
                gone.append((g.mgid, g.join_state))
            g.join_state = 0
        self.groups.clear()
        self._pending.clear()
        if not gone:
            return
        sa, until = a.sa, time.monotonic() + LEAVE_BUDGET_S

        def call():
            left = 0
            for mgid, st in gone:
                if time.monotonic() >= until:
                    break
                with contextlib.suppress(XdpoibError):
                    sa.leave(mgid, st)
                    left += 1
            return left
        try:
            left = a.sa_worker.call(call, timeout=LEAVE_BUDGET_S + 1.0)
        except (TimeoutError, XdpoibError, OSError):
            left = 0
        if left < len(gone):
            log.warning("left %d of %d groups in the SA (not waited for longer: the SM drops a gone port's "
                        "memberships itself)", left, len(gone))

    # ---- eth4's list, snooping, checks

    def parse_proc(self, out: str) -> set[bytes]:
        """MGIDs of the IPv4/IPv6 groups on eth4's own multicast list (/proc/net/igmp6 and igmp text)."""
        ifname, pkey = self.a.spec.ifname, self.a.pkey
        mgids, dev = set(), None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and len(parts[2]) == 32 and parts[1] == ifname:
                mgids.add(ipv6_mgid(bytes.fromhex(parts[2]), pkey))
            elif len(parts) >= 2 and parts[0].rstrip(":").isdigit() and ":" in line.split()[1:3]:
                dev = parts[1]
            elif len(parts) >= 2 and line.startswith("\t") and dev == ifname and len(parts[0]) == 8:
                grp = bytes.fromhex(parts[0])[::-1]
                if grp[0] & 0xF0 == 0xE0:
                    mgids.add(ipv4_mgid(grp, pkey))
        return mgids

    def sync(self, proc_text: str) -> None:
        """Mirror eth4's multicast list into full joins (IPv6 ND, mDNS); leave what went."""
        try:
            want = self.parse_proc(proc_text)
        except (ValueError, XdpoibError) as e:
            log.warning("reading eth4's multicast list: %s", e)
            return
        for mgid in want:
            g = self.groups.get(mgid)
            if g is None or not g.join_state & JOIN_FULL:
                self.join(mgid, "eth4")
        for g in list(self.groups.values()):
            if "eth4" in g.why and g.mgid not in want:
                g.why.discard("eth4")
                if not g.why:
                    self.leave(g)

    def snoop(self, eth: bytes) -> None:
        """IGMP/MLD reports from behind eth4 (a VM, a bridge) join and leave their groups in the SA."""
        from xdpoib.errors import FrameError
        from xdpoib.wire import frames as f

        a = self.a
        try:
            h = f.parse_eth(eth)
        except FrameError:
            return
        joins, leaves = f.group_report(h.ethertype, eth[h.hlen:])
        mgid_of = ipv4_mgid if h.ethertype == f.ETH_P_IP else ipv6_mgid
        pkey = a.peers.vlan_pkeys.get(h.vid or 0)          # the report's VLAN: its partition's groups
        if pkey is None:
            return
        for grp in joins:
            with contextlib.suppress(XdpoibError):
                self.join(mgid_of(grp, pkey), "snooped")
                a.stats["snooped_joins"] += 1
        for grp in leaves:
            with contextlib.suppress(XdpoibError):
                g = self.groups.get(mgid_of(grp, pkey))
                if g is not None and "snooped" in g.why:
                    g.why.discard("snooped")
                    if not g.why:
                        self.leave(g)

    def check(self) -> None:
        """Ask the SA (one worker call) whether our full memberships still exist; rejoin the missing."""
        a = self.a
        full = [g.mgid for g in self.groups.values() if g.join_state & JOIN_FULL]
        if not full:
            return
        sa = a.sa

        def call():
            missing, errors = [], 0
            for mgid in full:
                try:
                    if sa.member(mgid) is None:
                        missing.append(mgid)
                except XdpoibError:
                    errors += 1
            return missing, errors

        def done(ok, res):
            if not ok:
                log.warning("membership check: %s", res)
                return
            missing, errors = res
            if errors:
                a.stats["membership_check_errors"] += errors
            for mgid in missing:
                g = self.groups.get(mgid)
                if g is None or not g.join_state & JOIN_FULL:
                    continue
                log.warning("membership of %s is gone: rejoining", gid_str(mgid))
                a.stats["rejoins"] += 1
                g.join_state &= ~JOIN_FULL
                self.join(mgid, next(iter(g.why), "eth4"))
        a.sa_worker.submit(("check",), call, done)
