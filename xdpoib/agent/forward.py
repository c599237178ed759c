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
import time

from xdpoib.fabric.base import MCAST_QPN, FabricCounter, Path
from xdpoib.reasons import DropReason as R
from xdpoib.reasons import Kind
from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr, remac
from xdpoib.wire.oracle import too_big_reply

log = logging.getLogger("xdpoib.agent")


class Forwarder:
    """Moves frames both ways (see the module doc)."""

    def __init__(self, agent) -> None:
        from xdpoib.pump import TxBatch

        self.a = agent
        self.batch = TxBatch()
        self.ceiling_peer: tuple[int, bytes, int] | None = None     # (qpn, gid, lid) of the last sender
        self._ceiling_ahs: dict = {}

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

    def _from_qp(self, qp, vif, budget: int) -> int:
        a = self.a
        comps = qp.poll(budget)
        if not comps:
            return 0
        if a.capture is not None:
            a.capture.received(comps, qp.pool)
        pump = a.pump
        peers = a.peers
        entries, by_lid = peers.entries, peers.by_lid
        own = a.loopback.qpns
        lb = a.loopback
        view = qp.pool.view
        resolver = a.resolver
        ceiling = pump.name == "ceiling"
        reverse = self.reverse_paths
        ovif = vif.ovif
        pkey = qp.pkey
        now = time.monotonic()
        errors = unknown = delivered = 0
        last_key = last_peer = None
        for c in comps:
            if c.status:
                errors += 1
                continue
            if c.src_qp in own and lb.is_own(c):
                lb.counters.add(FabricCounter.LOOPBACK)
                continue
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
                resolver.who_is(c.slid, c.src_qp)
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
        pump.rx_flush()
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
        return len(comps)
