"""Replacing a UD QP that entered the error state.

A QP in the error state never leaves it (verbs, and the sim backend by the same rules: fabric/base.py):
every posted receive buffer completes with WR_FLUSH_ERR, nothing more arrives and every send is lost.
Both ways of getting there reach the agent as completions: an error completion (a datagram longer than
the receive buffers, LOC_LEN_ERR; rxe says LOC_QP_OP_ERR), or an async QP error event, on which the verbs
backend moves the QP to ERR so that its buffers flush. `on_errors` (the forwarder calls it for a batch
with error completions) answers whether the QP is in error; when it is, the forwarder stops reposting,
so the loop goes back to sleep in epoll while the QP waits to be replaced: no busy loop.

The replacement runs on the loop (a timer): at once for a QP that worked for a while, and with backoff
(1 s doubling to 16 s) when the replacements themselves keep failing, so that a peer that keeps sending
datagrams our buffers cannot hold does not make us churn QPs. `recreate`:

1. creates a new QP (new QPN) on the same P_Key, Q_Key and receive pool, posts every receive buffer,
   and attaches it to every group the old QP was attached to (memberships belong to the port, so no SA
   join is needed), before the old QP is closed, so that a failure leaves the agent as it was;
2. moves the VIFs that carried the old QPN to the new one: in the peer table (the Python datapath and
   the announcements use it) and in the maps (their IPoIB address includes the QPN);
3. swaps the QP in (`agent.qp`, the loopback filter's QPNs, the loop's wake-up descriptor), closes the
   old one, and announces eth4's addresses (gratuitous ARP, unsolicited NA) so that peers move their
   neighbour entries to the new address; counts `qp_recreated`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from xdpoib.errors import XdpoibError
from xdpoib.wire.addr import IPoIBAddr

log = logging.getLogger("xdpoib.agent")

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 16.0
SETTLED_S = 30.0            # a QP that worked this long is replaced at once when it fails


class QpRecovery:
    """Notices a QP in the error state and replaces it (see the module doc)."""

    def __init__(self, agent) -> None:
        self.a = agent
        self._pending = None            # the failed QP a replacement is scheduled for
        self._delay = 0.0
        self._last = -1e9               # when the last replacement was made
        self._wake_fd: int | None = None

    def on_errors(self, n: int) -> bool:
        """`n` error completions were polled: True if the QP is in the error state (do not repost)."""
        a = self.a
        qp = a.qp
        if not getattr(qp, "error", False):
            return False
        if self._pending is qp:
            return True
        self._pending = qp
        now = time.monotonic()
        self._delay = 0.0 if now - self._last >= SETTLED_S else min(MAX_RETRY_S, max(FIRST_RETRY_S, self._delay * 2))
        a.stats["qp_errors"] += 1
        log.error("QP %#x is in the error state: replacing it in %.0f s", qp.qpn, self._delay)
        a.loop.call_later(self._delay, self.recreate)
        return True

    def recreate(self) -> None:
        """Replace the QP in the error state (nothing to do if it is healthy); on failure, retry later."""
        a = self.a
        old = a.qp
        if not getattr(old, "error", False):
            self._pending = None
            return
        try:
            new = self._make(old)
        except XdpoibError as e:
            self._delay = min(MAX_RETRY_S, max(FIRST_RETRY_S, self._delay * 2))
            a.stats["qp_recreate_failed"] += 1
            log.error("cannot replace QP %#x (retry in %.0f s): %s", old.qpn, self._delay, e)
            a.loop.call_later(self._delay, self.recreate)
            return
        self._move_vifs(old.qpn, new.qpn)
        a.qp = new
        v0, part = a.vifs.by_id.get(0), a.partitions.by_vid.get(0)
        if v0 is not None and v0.qp is old:
            v0.qp = new             # VIF 0 sends from it; the untagged partition receives on it
        if part is not None and part.qp is old:
            part.qp = new
        a.vifs._publish()
        a.loopback.qpns.discard(old.qpn)
        a.loopback.qpns.add(new.qpn)
        if self._wake_fd is not None:
            a.loop.remove_reader(self._wake_fd)
        try:
            old.close()                 # its descriptor leaves the loop's epoll set with it
        except (XdpoibError, OSError) as e:
            log.warning("closing the failed QP %#x: %s", old.qpn, e)
        self._wake_fd = new.fileno()
        a.loop.add_reader(self._wake_fd, lambda: None)     # wakes the loop; the forwarder polls a.qp
        self._pending, self._last = None, time.monotonic()
        a.stats["qp_recreated"] += 1
        log.warning("QP %#x replaced by QP %#x", old.qpn, new.qpn)
        a.announcer.due = True
        a._sync_eth4()                  # announce now rather than at the next second's sync

    def _make(self, old):
        """A new QP like `old`, every buffer posted, attached where `old` was."""
        a = self.a
        pool = old.pool
        new = a.backend.create_qp(old.pkey, old.qkey, pool)
        try:
            new.post_recv(range(pool.count))
            for g in a.membership.groups.values():
                if g.attached and a.partitions.of_mgid(g.mgid).qp is old:     # its partition's groups
                    new.attach_mcast(g.mgid, g.mlid)
        except BaseException:
            new.close()
            raise
        return new

    def _move_vifs(self, old_qpn: int, new_qpn: int) -> None:
        """Every VIF whose address carried `old_qpn` carries `new_qpn`: peer table, then maps."""
        a = self.a
        moved = []
        vifs = []
        for v in a.peers.vifs:
            if v.addr.qpn == old_qpn:
                nv = dataclasses.replace(v, addr=IPoIBAddr(v.addr.flags, new_qpn, v.addr.gid))
                moved.append((v, nv))
                v = nv
            vifs.append(v)
        if not moved:
            return
        a.peers.set_vifs(vifs)
        for v, nv in moved:
            if a.vif == v:
                a.vif = nv
        maps = getattr(a.pump, "maps", None)
        if maps is not None:
            maps.remove_vifs([(v.vif_id, v.mac, v.addr.pack()) for v, _ in moved])
            maps.add_vifs([(nv.vif_id, nv.mac, nv.addr.pack()) for _, nv in moved])
