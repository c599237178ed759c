"""The data plane: frames between the pump (eth4) and the UD QP (the fabric), in budgeted batches.

Two pollers on the event loop, each moving at most `budget` frames per call:
- `from_eth`: the pump hands over one batch already grouped by destination (peer id or MGID, from
  the BPF metadata); each group is one send: `pump.post_umem` when the frames are still in the UMEM
  (the backend sends them from there; docs/datapath.md), else `post_send_to`. Copies of a frame's
  bytes on the way are counted in `tx_copies` (the pump's copy out of the UMEM, the backend's into its
  send buffers), next to `tx_frames`. Peers without a path and groups not yet
  joined queue at most 3 frames while the SA worker resolves them; oversize frames are answered with
  ICMP frag-needed / Packet Too Big; control frames (DHCP, IGMP/MLD) are looked into.
- `from_fabric`: one `poll` of receive completions; loopback dropped, the sender looked up (cheap
  dictionary hits for known senders), learning from ARP/ND only for those EtherTypes, each payload
  queued on the pump (copied straight into the inject map), one flush, then every buffer reposted
  at once.
Overload is shed where it is cheapest and counted there: the kernel drops frames from eth4 when our
AF_XDP ring is full (`xsk_rx_ring_full`), the sim receiver leaves datagrams in its socket when its
buffers run out so that the sender's send fails (`rx_overrun` at the sender).
"""

from __future__ import annotations

import logging
import os
import time
import weakref

import numpy as np

from xdpoib.fabric.base import GRH_LEN, MCAST_QPN, FabricCounter, LinkLayer, Path
from xdpoib.reasons import DropReason as R
from xdpoib.reasons import Kind
from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr, remac
from xdpoib.wire.oracle import too_big_reply

log = logging.getLogger("xdpoib.agent")
_KIND_GROUP = int(Kind.GROUP)
#: batches of at most this many frames take the object path: below it, a numpy call costs more than
#: the Python it replaces (latency: a ping is a batch of one at every hop)
SMALL_BATCH = int(os.environ.get("XDPOIB_SMALL_BATCH", "8"))


class Forwarder:
    """Moves frames both ways (see the module doc)."""

    def __init__(self, agent) -> None:
        from xdpoib.pump import TxBatch

        self.a = agent
        self.batch = TxBatch()
        self.ceiling_peer: tuple[int, bytes, int] | None = None     # (qpn, gid, lid) of the last sender
        self._ceiling_ahs: dict = {}
        self._columns_on = os.environ.get("XDPOIB_COLUMNAR") != "0"
        self._rx_busy: weakref.WeakSet = weakref.WeakSet()  # QPs whose last poll found many frames
        self._objects_failed = False    # the last object poll found completion errors (the QP may be going)

    @property
    def reverse_paths(self) -> bool:
        """Peers without a path are answered over their datagrams' reverse paths (`Resolver.reverse`):
        on InfiniBand; on RoCE a path is the port's own lookup, and a completion's LID is not one."""
        return getattr(self.a.sa, "kind", "sa") != "roce"

    # ================================================================ eth4 -> fabric

    def from_eth(self, budget: int) -> int:
        a = self.a
        hold = a.qp.busy()
        if hold:
            # the fabric cannot take more right now: leave the frames in the AF_XDP ring, where the
            # kernel drops what overflows before copying it (counted as xsk_rx_dropped), and let the
            # loop give the CPU away until the hold ends
            a.stats["tx_backpressure_turns"] += 1
            a.loop.pause_until = time.monotonic() + hold
            return 0
        pump = a.pump
        b = self.batch
        if self.columnar(pump) and pump.xsk.rx_pending() > SMALL_BATCH:
            try:
                cols = pump.receive_columns(budget, b)
                n = 0 if cols is None else len(cols.addr)
                if cols is not None:
                    self._forward_columns(cols)
                n += len(b.other)
                for o in b.other:
                    self._other(o)
            finally:
                b.clear()
                pump.tx_done()
            return n
        n = pump.receive(budget, b)
        if not n:
            return 0
        a.stats["eth_rx_frames"] += n
        try:
            self._forward(b)
        finally:
            b.clear()
            pump.tx_done()          # frames no send took go back to the UMEM's fill ring
        if a.vif_learned and a.want_bpf and pump.name == "plain":
            a.upgrade_pump()
        return n

    def columnar(self, pump) -> bool:
        """Whether frames move as columns (docs/datapath.md): the translating pump sending from its UMEM,
        no capture running (a capture looks at every frame), not turned off (XDPOIB_COLUMNAR=0)."""
        return (pump.name == "bpf" and pump.send_memory is not None and self.a.capture is None
                and self._columns_on)

    def _forward_columns(self, cols) -> None:
        """Each destination's frames in one send (`TxColumns.groups`): a few dictionary hits per
        destination, nothing per frame."""
        a = self.a
        vifs = a.vifs.by_id
        now = time.monotonic()
        for meta, offs, lens in cols.groups():
            kind, vid = int(meta[1]), int(meta[4]) | int(meta[5]) << 8
            vif_id = int.from_bytes(meta[8:12].tobytes(), "little")
            v = vifs.get(vif_id)
            if v is None or v.vid != vid:
                a.drops[R.UNKNOWN_VIF if v is None else R.VLAN_MISMATCH] += len(offs)
                continue
            v.last_seen = now
            if v.vif_id and kind != _KIND_GROUP:
                # a guest's source address, from the first frame to each destination in a turn (one per
                # destination, not per frame): a VIF learned again after idling out (maybe by an IPv6
                # frame) announces its IPv4 address from its first unicast
                a.vifs.note(v, bytes(cols.frames(offs[:1], lens[:1])[0][:48]))
            if kind == _KIND_GROUP:
                if v.vif_id:
                    flat = cols.rows.reshape(-1)
                    arp = (flat[offs] == 0x08) & (flat[offs + 1] == 0x06)
                    if arp.any():
                        for fr in cols.frames(offs[arp], lens[arp]):
                            a.vifs.note(v, bytes(fr))       # a guest's ARP: its address, to announce
                self._send_group_columns(meta[16:32].tobytes(), offs, lens, v.qp, cols)
            else:
                e = a.peers.by_id(int.from_bytes(meta[12:16].tobytes(), "little"))
                if e is None:
                    a.drops[R.UNKNOWN_DESTINATION] += len(offs)
                    continue
                self._send_peer_columns(e, offs, lens, v.qp, cols)

    def _send_peer_columns(self, e, offs, lens, qp, cols) -> None:
        """`send_peer` for frames still in the UMEM, given as columns."""
        a = self.a
        if e.path_state != "resolved" and (e.reverse_via is None or not a.resolver.reverse(e)):
            a.resolver.queue(e, self._copied(cols, offs, lens), qp)
            return
        if e.path_from_wc == 1:                 # a reverse path: the SA's is asked for now
            a.resolver.refine(e, qp)
        big = lens > e.path_mtu
        if big.any():
            for fr in cols.frames(offs[big], lens[big]):
                self._too_big(b"", bytes(fr), e.path_mtu, e.remac, e)
            offs, lens = offs[~big], lens[~big]
            if not len(offs):
                return
        self._post_columns(qp, e.ah, e.addr.qpn, qp.qkey, offs, lens)

    def _send_group_columns(self, mgid: bytes, offs, lens, qp, cols) -> None:
        """`send_group` for frames still in the UMEM, given as columns."""
        a = self.a
        g = a.membership.groups.get(mgid)
        if g is None or g.ah is None:
            a.membership.join(mgid, "send", full=False)
            a.membership.hold(mgid, self._copied(cols, offs, lens), qp)
            return
        mtu = g.mtu or a.ib_mtu
        big = lens > mtu
        if big.any():
            for fr in cols.frames(offs[big], lens[big]):
                self._too_big(b"", bytes(fr), mtu, remac(a.port_attrs.gid, MCAST_QPN), None)
            offs, lens = offs[~big], lens[~big]
            if not len(offs):
                return
        self._post_columns(qp, g.ah, MCAST_QPN, g.qkey or a.qkey, offs, lens)

    def _post_columns(self, qp, ah, remote_qpn: int, qkey: int, offs, lens) -> None:
        a = self.a
        n = a.pump.post_columns(qp, ah, remote_qpn, qkey, offs, lens)
        a.stats["tx_frames"] += n
        if n < len(offs):
            a.drops[R.SEND_QUEUE_FULL] += len(offs) - n       # the QP's send queue was full

    def _copied(self, cols, offs, lens) -> list[bytes]:
        """Frames to keep past this turn (queued while a path or a join is pending): copied out of the UMEM."""
        self.a.stats["tx_copies"] += len(offs)
        return [bytes(fr) for fr in cols.frames(offs, lens)]

    def _forward(self, b) -> None:
        a = self.a
        if b.raw:
            self._ceiling_send(b.raw)
        vifs = a.vifs.by_id
        descs = b.descs
        now = time.monotonic()
        for key, frames in b.peers.items():            # key: VID | VIF id << 32 | peer id << 64
            v = vifs.get((key >> 32) & 0xFFFFFFFF)
            e = a.peers.by_id(key >> 64)
            if v is None or e is None or v.vid != key & 0xFFFF:
                a.drops[R.UNKNOWN_VIF if v is None else R.UNKNOWN_DESTINATION if e is None
                        else R.VLAN_MISMATCH] += len(frames)
                continue
            v.last_seen = now
            if v.vif_id:
                a.vifs.note(v, bytes(frames[0][:48]))    # its source address (see `_forward_columns`)
            self.send_peer(e, frames, qp=v.qp, descs=descs.get(key))
        for key, frames in b.groups.items():           # key: VID (2), 0 (2), VIF id (4), group id (4), MGID
            v = vifs.get(int.from_bytes(key[4:8], "little"))
            if v is None or v.vid != int.from_bytes(key[:2], "little"):
                a.drops[R.UNKNOWN_VIF if v is None else R.VLAN_MISMATCH] += len(frames)
                continue
            v.last_seen = now
            if v.vif_id and frames[0][:2] == b"\x08\x06":
                a.vifs.note(v, bytes(frames[0]))        # a guest's ARP: its address, to announce
            self.send_group(key[12:], frames, qp=v.qp, descs=descs.get(key))
        for o in b.other:
            self._other(o)

    def _other(self, o) -> None:
        from xdpoib.abi import VIF_UNKNOWN

        a = self.a
        if o.vif_id == VIF_UNKNOWN:
            # VIF learning: a new source MAC behind eth4 (dropped and counted unless it may be learned)
            if a.vifs.learn(o.eth) is None:
                return
            o = a.pump.control(o.eth)
            if o is None:
                return
        v = a.vifs.by_id.get(o.vif_id)
        if v is None or v.vid != (o.vid or 0):
            a.drops[R.UNKNOWN_VIF if v is None else R.VLAN_MISMATCH] += 1
            return
        if o.control:
            a.membership.snoop(o.eth)
        eth = o.eth or (lambda o=o: self._as_ethernet(o))
        if o.mgid is not None:
            self.send_group(o.mgid, [o.frame], eth, qp=v.qp)
        elif o.kind == Kind.PEER and (e := a.peers.by_id(o.peer_id)) is not None:
            self.send_peer(e, [o.frame], eth, qp=v.qp)
        else:
            a.drops[R.UNKNOWN_DESTINATION] += 1

    def send_peer(self, e, frames: list, eth=b"", qp=None, descs=None) -> None:
        """Frames to one peer from one of our QPs (a VIF's; default VIF 0's): sent if the peer's path
        is resolved, else queued while it resolves. `descs`: the frames are views of the UMEM and these
        their descriptors (`_post`)."""
        a = self.a
        qp = qp or a.qp
        if e.path_state != "resolved" and (e.reverse_via is None or not a.resolver.reverse(e)):
            a.resolver.queue(e, self._own(frames, descs), qp)
            return
        if e.path_from_wc == 1:                 # a reverse path: the SA's is asked for now
            a.resolver.refine(e, qp)
        mtu = e.path_mtu
        if any(len(fr) > mtu for fr in frames):
            frames, descs = self._fitting(frames, descs, mtu, eth, e.remac, e)
            if not frames:
                return
        if a.capture is not None:
            a.capture.sent(e.ah, e.addr.qpn, frames, qp)
        self._post(qp, e.ah, e.addr.qpn, qp.qkey, frames, descs)

    def send_group(self, mgid: bytes, frames: list, eth=b"", qp=None, descs=None) -> None:
        """Frames to one group from one of our QPs: sent once it is joined (send-only join on first use)."""
        a = self.a
        qp = qp or a.qp
        g = a.membership.groups.get(mgid)
        if g is None or g.ah is None:
            a.membership.join(mgid, "send", full=False)
            a.membership.hold(mgid, self._own(frames, descs), qp)
            return
        mtu = g.mtu or a.ib_mtu
        if any(len(fr) > mtu for fr in frames):
            frames, descs = self._fitting(frames, descs, mtu, eth, remac(a.port_attrs.gid, MCAST_QPN), None)
            if not frames:
                return
        if a.capture is not None:
            a.capture.sent(g.ah, MCAST_QPN, frames, qp)
        self._post(qp, g.ah, MCAST_QPN, g.qkey or a.qkey, frames, descs)

    def _post(self, qp, ah, remote_qpn: int, qkey: int, frames: list, descs) -> None:
        """One send of frames to one destination: from the UMEM without a copy when `descs` says where
        they are (the pump hands them back once sent), else copied by the backend (`payload_copies`).
        Frames the send queue could not take are dropped and counted (`send_queue_full`)."""
        a = self.a
        if descs is not None:
            n = a.pump.post_umem(qp, ah, remote_qpn, qkey, descs)
        else:
            n = qp.post_send_to(ah, remote_qpn, qkey, frames)
            a.stats["tx_copies"] += n * qp.payload_copies
        a.stats["tx_frames"] += n
        if n < len(frames):
            a.drops[R.SEND_QUEUE_FULL] += len(frames) - n       # the QP's send queue was full

    def _own(self, frames: list, descs) -> list:
        """Frames to keep past this turn (queued while a path or a join is pending): UMEM views are
        copied, since their frames go back to the fill ring at the end of the turn."""
        if descs is None:
            return frames
        self.a.stats["tx_copies"] += len(frames)
        return [bytes(fr) for fr in frames]

    def _fitting(self, frames: list, descs, mtu: int, eth, from_mac: bytes, peer):
        """The frames within `mtu` (and their descriptors); each larger one is answered with ICMP."""
        keep, kept = [], None if descs is None else []
        for i, fr in enumerate(frames):
            if len(fr) > mtu:
                self._too_big(eth, bytes(fr), mtu, from_mac, peer)
            else:
                keep.append(fr)
                if kept is not None:
                    kept.append(descs[i])
        return keep, kept

    def _too_big(self, eth, ipoib: bytes, ib_mtu: int, from_mac: bytes, peer) -> None:
        """Drop an oversize frame and tell its sender the MTU (ICMP frag-needed / Packet Too Big).
        `eth` is the frame's Ethernet form (or a function making it, or empty: rebuilt from `ipoib`)."""
        a = self.a
        a.drops[R.OVERSIZE] += 1
        if callable(eth):
            eth = eth()
        elif not eth:
            eth = self._ipoib_as_ethernet(ipoib, peer)
        reply = too_big_reply(eth, ib_mtu - 4, from_mac) if eth else None
        if reply is not None:
            a.pump.rx_ethernet(reply)
            a.pump.rx_flush()
            a.stats["icmp_too_big"] += 1

    def _ipoib_as_ethernet(self, frame: bytes, peer) -> bytes:
        a = self.a
        dst = peer.remac if peer is not None else b"\xff" * 6
        return f.eth(dst, a.mac, int.from_bytes(frame[:2], "big"), frame[4:])

    def _as_ethernet(self, o) -> bytes:
        """An IPoIB frame from eth4 in its Ethernet form again (only to quote it in an ICMP error)."""
        a = self.a
        e = a.peers.by_id(o.peer_id)
        dst = e.remac if e is not None else b"\xff" * 6
        return f.eth(dst, a.mac, int.from_bytes(o.frame[:2], "big"), o.frame[4:], vid=o.vid or None)

    # ---- the plumbing ceiling (bench only): raw Ethernet frames to the last sender, else broadcast

    def _ceiling_send(self, frames: list[bytes]) -> None:
        a = self.a
        cp = self.ceiling_peer
        if cp is None:
            self.send_group(a.bcast_mgid, frames)
            return
        ah = self._ceiling_ahs.get(cp)
        if ah is None:
            ah = self._ceiling_ahs[cp] = a.backend.create_ah(
                Path(dlid=cp[2], sl=0, mtu=a.port_attrs.active_mtu, dgid=cp[1], grh=True))
        if a.capture is not None:
            a.capture.sent(ah, cp[0], frames)
        a.qp.post_send_to(ah, cp[0], a.qkey, frames)
        a.stats["tx_frames"] += len(frames)

    # ================================================================ fabric -> eth4

    def from_fabric(self, budget: int) -> int:
        """Every VIF's QP in turn (VIF 0's first: it also receives multicast), within one budget."""
        a = self.a
        vifs = a.vifs.by_id
        extra = a.partitions.extra_qps()
        if len(vifs) == 1 and not extra:
            return self._from_qp(a.qp, vifs[0], budget)
        order = [(v.qp, v) for v in vifs.values()] + [(qp, vifs[0]) for qp in extra]
        k = self._rr = (getattr(self, "_rr", 0) + 1) % len(order)
        n = 0
        for qp, v in order[k:] + order[:k]:
            if n >= budget:
                break
            n += self._from_qp(qp, v, budget - n)
        return n

    def _quiet(self, qp) -> bool:
        """Whether `qp` surely has nothing to poll this turn: its descriptor is exact (`exact_fd`: readable
        while, and only while, datagrams or completions wait, as the sim's), in the loop's epoll set, and
        was not readable at this turn's wait. Saves an empty poll (a recv that fails, a lock) on the turn
        a frame from eth4 woke: half of a ping's hops. Every QP polled here is in the epoll set while it
        is open (`Agent.wire_qp`, the recovery's wake-up descriptor), so a watched descriptor is its own."""
        if not getattr(qp, "exact_fd", False) or qp.closed:
            return False
        loop = self.a.loop
        fd = qp.fileno()
        return fd not in loop.ready and loop.watches(fd)

    def _from_qp(self, qp, vif, budget: int) -> int:
        a = self.a
        if self._quiet(qp):
            return 0
        if not self.columnar(a.pump) or not a.pump.injector.mmapped:
            return self._from_qp_objects(qp, vif, budget)
        if qp not in self._rx_busy:
            # the last poll of this QP found a few frames: poll a few as objects (a numpy call costs more
            # than the Python it replaces for a handful; a ping is a batch of one). When there were more,
            # the QP is busy: the rest of this turn's budget is polled as columns, so a burst after a quiet
            # spell takes at most SMALL_BATCH + 1 frames through the object path, not a whole budget
            n = self._from_qp_objects(qp, vif, min(budget, SMALL_BATCH + 1))
            if n <= SMALL_BATCH:
                return n
            self._rx_busy.add(qp)
            if n >= budget or self._objects_failed:
                return n
            return n + self._from_qp(qp, vif, budget - n)
        b = qp.poll_batch(budget)
        n = len(b)
        if not n:
            return 0
        if n <= SMALL_BATCH:
            self._rx_busy.discard(qp)
            return self._from_qp_objects(qp, vif, budget, b.completions(qp.pool))
        pump = a.pump
        ok = b.status == 0
        errors = n - int(np.count_nonzero(ok))
        lb = a.loopback
        if lb.qpns:
            mine = None
            for q in lb.qpns:                   # a few of our QPNs: one comparison each (np.isin sorts)
                m = b.src_qp == q
                mine = m if mine is None else mine | m
            mine &= ok
            if mine.any():
                own = self._own_rows(b, mine, lb.port)
                if own.any():
                    lb.counters.add(FabricCounter.LOOPBACK, int(np.count_nonzero(own)))
                    ok &= ~own
        sel = np.flatnonzero(ok)
        delivered = unknown = in_place = 0
        if len(sel):
            rows = qp.pool.rows()
            idx = b.index[sel]
            lengths = b.byte_len[sel].astype(np.int64)
            slow = _slow_rows(rows, idx, GRH_LEN, lengths)
            if slow.any():
                part = b.take(sel[slow])
                d, u = self._deliver_objects(part.completions(qp.pool), qp, vif)
                delivered += d
                unknown += u
                fast = ~slow
                sel, idx, lengths = sel[fast], idx[fast], lengths[fast]
            if len(sel):
                peer_ids = self._senders(b, sel)
                known = peer_ids != 0
                if not known.all():
                    unknown += len(sel) - int(np.count_nonzero(known))
                    sel, idx, lengths, peer_ids = sel[known], idx[known], lengths[known], peer_ids[known]
                if len(sel):
                    mcast = b.grh[sel] & (rows[idx, 24] == 0xFF)       # the GRH's DGID is an MGID
                    in_slots = a.rx_region.base if qp.pool is a.rx_pool else None     # received in place
                    k = pump.rx_columns(rows, idx, lengths, peer_ids, mcast, vif.ovif.vif_id, qp.pkey, in_slots)
                    delivered += k
                    if in_slots is not None:
                        in_place = k
        pump.rx_flush()
        if errors:
            a.drops[R.COMPLETION_ERROR] += errors
            if qp is not a.qp and getattr(qp, "error", False):
                a.vifs.replace_qp(vif)          # a guest's QP in the error state: a new one, no repost
                return n
            if qp is a.qp and a.on_completion_errors(errors):
                return n                        # the QP is in the error state: being replaced, no repost
        qp.post_recv(b.index)
        if unknown:
            a.drops[R.UNKNOWN_PEER] += unknown
        a.stats["rx_frames"] += delivered
        # receive buffer -> inject slot, one array copy per batch; none for frames received in place
        a.stats["rx_copies"] += delivered - in_place
        return n

    @staticmethod
    def _own_rows(b, mine, port) -> np.ndarray:
        """Rows (among `mine`: one of our QPNs) sent by our own port: loopback (docs/design.md §3.10)."""
        own = np.zeros(len(b), bool)
        g = mine & b.grh
        if g.any():
            for gid in port.gids:
                own |= g & (b.sgid == np.frombuffer(gid, np.uint8)).all(axis=1)
        if port.link_layer is LinkLayer.INFINIBAND:
            own |= mine & ~b.grh & (b.slid == port.lid)
        return own

    def _senders(self, b, sel) -> np.ndarray:
        """The peer id of each selected row's sender (0: unknown), looked up once per distinct sender
        in the batch: (SLID, source QPN) without a GRH, (source QPN, SGID) with one (learned on first
        sight, as the object path does)."""
        a = self.a
        peers, resolver = a.peers, a.resolver
        reverse = self.reverse_paths
        now = time.monotonic()
        out = np.zeros(len(sel), np.uint32)
        grh = b.grh[sel]
        slid, src, sl = b.slid[sel], b.src_qp[sel], b.sl[sel]
        if not grh.all():
            ng = np.flatnonzero(~grh)
            keys = slid[ng].astype(np.uint64) << np.uint64(24) | src[ng].astype(np.uint64)
            uniq, first, inv = _distinct(keys)
            ids = np.zeros(len(uniq), np.uint32)
            for j, (k, i) in enumerate(zip(uniq.tolist(), first.tolist(), strict=True)):
                lid, qpn = k >> 24, k & 0xFFFFFF
                peer = peers.by_lid(lid, qpn) or resolver.who_is(lid, qpn)
                if peer is None:
                    continue
                ids[j] = peer.peer_id
                self._seen(peer, lid, int(sl[ng[i]]), reverse, now)
            out[ng] = ids[inv]
        if grh.any():
            g = np.flatnonzero(grh)
            comb = np.empty((len(g), 20), np.uint8)
            comb[:, :16] = b.sgid[sel[g]]
            comb[:, 16:] = src[g].astype(">u4").view(np.uint8).reshape(-1, 4)
            uniq, first, inv = _distinct(comb.view("V20").ravel())
            ids = np.zeros(len(uniq), np.uint32)
            entries = peers.entries
            for j, i in enumerate(first.tolist()):
                raw = comb[i].tobytes()
                key = (int.from_bytes(raw[16:], "big"), raw[:16])
                lid = int(slid[g[i]])
                peer = entries.get(key)
                if peer is None:
                    peer = peers.learn(IPoIBAddr(0, key[0], key[1]), lid=lid)
                ids[j] = peer.peer_id
                self._seen(peer, lid, int(sl[g[i]]), reverse, now)
            out[g] = ids[inv]
        return out

    @staticmethod
    def _seen(peer, slid: int, sl: int, reverse: bool, now: float) -> None:
        peer.last_seen = now
        if peer.path_state != "resolved" and reverse and slid:
            peer.reverse_via = (slid, sl)           # answering it needs no query (`send_peer`)

    def _from_qp_objects(self, qp, vif, budget: int, comps=None) -> int:
        """The object path (a capture running, the plain or ceiling pump, or a batch of a few frames):
        one `Completion` per frame."""
        a = self.a
        if comps is None:
            comps = qp.poll(budget)
        if not comps:
            return 0
        if a.capture is not None:
            a.capture.received(comps, qp.pool)
        lb = a.loopback
        own = lb.qpns
        errors = 0
        kept = []
        for c in comps:
            if c.status:
                errors += 1
            elif c.src_qp in own and lb.is_own(c):
                lb.counters.add(FabricCounter.LOOPBACK)
            else:
                kept.append(c)
        delivered, unknown = self._deliver_objects(kept, qp, vif)
        a.pump.rx_flush()
        self._objects_failed = bool(errors)
        if errors:
            a.drops[R.COMPLETION_ERROR] += errors
        if errors and qp is not a.qp and getattr(qp, "error", False):
            a.vifs.replace_qp(vif)          # a guest's QP in the error state: a new one, no repost
            return len(comps)
        if errors and qp is a.qp and a.on_completion_errors(errors):
            return len(comps)               # the QP is in the error state: being replaced, no repost
        qp.post_recv([c.index for c in comps])
        if unknown:
            a.drops[R.UNKNOWN_PEER] += unknown
        a.stats["rx_frames"] += delivered
        a.stats["rx_copies"] += delivered       # each payload copied into the inject map or the TX ring
        return len(comps)

    def _deliver_objects(self, comps, qp, vif) -> tuple[int, int]:
        """Successful completions, loopback already dropped, one at a time: the sender looked up (or
        learned), ARP/RARP and ND learned from, each frame queued on the pump. (delivered, unknown)."""
        a = self.a
        pump = a.pump
        peers = a.peers
        entries, by_lid = peers.entries, peers.by_lid
        view = qp.pool.view
        resolver = a.resolver
        ceiling = pump.name == "ceiling"
        reverse = self.reverse_paths
        ovif = vif.ovif
        pkey = qp.pkey
        now = time.monotonic()
        unknown = delivered = 0
        last_key = last_peer = None
        for c in comps:
            p = c.payload
            grh = c.has_grh
            if grh:
                key = (c.src_qp, bytes(c.sgid))
                if key == last_key:
                    peer = last_peer
                else:
                    peer = entries.get(key)
                    if peer is None:
                        peer = peers.learn(IPoIBAddr(0, c.src_qp, key[1]), lid=c.slid)
                    last_key, last_peer = key, peer
            else:
                peer = by_lid(c.slid, c.src_qp)
            e0 = p[0] if len(p) > 4 else 0
            if (e0 == 0x08 and p[1] == 0x06) or (e0 == 0x80 and p[1] == 0x35):
                learned = resolver.from_arp(p, c.src_qp, c.slid)
                peer = learned or peer
            elif e0 == 0x86 and p[1] == 0xDD:
                resolver.from_nd(p)
            if peer is None:
                peer = resolver.who_is(c.slid, c.src_qp)
            if peer is None:
                unknown += 1
                continue
            peer.last_seen = now
            if peer.path_state != "resolved" and reverse and c.slid:
                peer.reverse_via = (c.slid, c.sl)       # answering it needs no query (`send_peer`)
            if ceiling:
                self.ceiling_peer = (c.src_qp, peer.addr.gid, c.slid)
                pump.rx_frame(p, peer, False, ovif, pkey)
            else:
                pump.rx_frame(p, peer, grh and view(c.index)[24] == 0xFF, ovif, pkey)
            delivered += 1
        return delivered, unknown


_ONE = np.zeros(1, np.int64)


def _distinct(keys: np.ndarray):
    """np.unique(keys, return_index=True, return_inverse=True), with one comparison when every key is the
    same (a batch from one sender, the usual one) instead of a sort."""
    if (keys == keys[0]).all():
        return keys[:1], _ONE, np.zeros(len(keys), np.int64)
    return np.unique(keys, return_index=True, return_inverse=True)


_HEAD = 48      # payload bytes the columnar path looks at: IPoIB header, IPv4/IPv6 header, ports, ICMPv6 type
# those bytes read as little-endian 16- and 32-bit words: the IPoIB type (word16 0); IPv4's version/IHL
# (word32 1, low byte), protocol (word32 3, second byte) and UDP ports (word32 6); IPv6's next header
# (word16 5, low byte) and the ICMPv6 type (word32 11, low byte)
_IPV4, _IPV6, _ARP, _RARP = 0x0008, 0xDD86, 0x0608, 0x3580
_DHCP_PORTS = 0x44004300        # source 67, destination 68


def _slow_rows(rows: np.ndarray, idx: np.ndarray, at: int, lengths: np.ndarray) -> np.ndarray:
    """Which received frames take the object path: frame i lies at column `at` of row idx[i] of `rows`,
    lengths[i] bytes (bytes past a frame's length are stale; a wrong guess only sends an ordinary frame
    the slow way). Slow: ARP and RARP (the sender's address is learned), IPv6 ND (133-137), DHCP
    replies (rewritten per RFC 4390), IPv4 UDP with IP options (ports not at a fixed place) and runts.
    One gather of each frame's first `_HEAD` bytes, then word comparisons: about ten array operations
    for a batch of IPv4 alone, the usual one."""
    head = rows[idx, at:at + _HEAD]
    h16, h32 = head.view("<u2"), head.view("<u4")
    kind = h16[:, 0]
    ip4 = kind == _IPV4
    udp4 = ip4 & ((h32[:, 3] & 0xFF00) == 0x1100)
    slow = udp4 & (((h32[:, 1] & 0x0F) != 5) | (h32[:, 6] == _DHCP_PORTS))
    slow |= lengths < 14
    if not ip4.all():
        slow |= (kind == _ARP) | (kind == _RARP)
        v6 = kind == _IPV6
        if v6.any():
            icmp6 = h32[:, 11] & 0xFF
            slow |= v6 & ((h16[:, 5] & 0xFF) == 58) & (icmp6 >= 133) & (icmp6 <= 137)
    return slow
