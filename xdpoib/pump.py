"""The datapaths between eth4 and the agent, behind one interface (`Pump`).

The `Pump` interface (what `xdpoib.agent.forward.Forwarder` calls, and all it calls):

    name                            "bpf" | "plain" | "ceiling"
    fileno()                        the AF_XDP socket: readable when frames from eth4 wait
    receive(budget, batch) -> int   take up to `budget` frames from eth4 into a `TxBatch`; the count taken
    control(frame) -> Outgoing      an Ethernet frame translated by the oracle (control, learning)
    rx_frame(payload, peer, mcast, vif, pkey)  queue one IPoIB frame from the fabric for eth4, received
                                    by a QP of `vif` (an oracle Vif) on partition `pkey`; payload is
                                    copied before the call returns, so its buffer can be reposted
    rx_ethernet(frame)              queue a frame already in Ethernet form (ICMP errors, DHCP replies)
    rx_flush() -> int               deliver what was queued (one live-frames call for the BPF pump)
    add_peers(entries), set_group(mgid, id), add_vifs(vifs), remove_vifs(vifs)
                                    keep the maps in step with the agent's tables
    counters() -> dict              the datapath's own counters (status / exporter)
    pending_tx(), kick(), close()

Implementations:
- `BpfPump` (the default): the translating XDP programs of `bpf/`. TX frames arrive on the AF_XDP
  socket already in IPoIB form with a `TxMeta` record in front (kind, peer or group, P_Key) and are
  grouped by destination without being parsed; only CONTROL frames (DHCP, IGMP/MLD) come as Ethernet
  and are rewritten with the oracle. RX frames are written straight into the mmapped inject map with
  their `RxMeta` and handed to the RX program with one live-frames call per batch (docs/datapath.md).
  Frames to peers and groups are not copied out of the UMEM: the receive half of the UMEM is the
  backend's send memory (`Backend.register_send_memory`; on verbs a memory region, so the UMEM frame is
  the send buffer), the batch carries views of them with their descriptors, and each frame goes back to
  the fill ring only once its send is over (`post_umem`, `tx_done`, the start of the next `receive`).
  `XDPOIB_TX_COPY=1` copies them out instead, as before (to measure one against the other).
- `PlainPump`: a redirect-everything XDP program and the oracle in Python for every frame. Slower,
  correct by construction; the fallback for a TAP until the guest's MAC is known
  (`XDPOIB_DATAPATH=plain`).
- `CeilingPump`: the plumbing ceiling for `xdpoib bench e2e` (`XDPOIB_DATAPATH=ceiling`): the same
  AF_XDP socket, sim transport and batched injection, with translation and map lookups bypassed
  (raw Ethernet frames cross the fabric). Not IPoIB: for measurement only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from xdpoib import link, state
from xdpoib.abi import INJECT_MAX
from xdpoib.errors import FrameError
from xdpoib.reasons import DropReason, Kind
from xdpoib.wire import frames as f
from xdpoib.wire.oracle import eth_to_ipoib, ipoib_to_eth

BATCH = 256
META_LEN = 32           # struct xdpoib_tx_meta
_TX_META = struct.Struct("<BBHHHII16s")
_KIND_PEER, _KIND_GROUP, _KIND_CONTROL = int(Kind.PEER), int(Kind.GROUP), int(Kind.CONTROL)
_VIF_UNKNOWN = b"\xff\xff\xff\xff"
_HELD, _POSTED = 1, 2   # a receive frame of the UMEM: taken this turn / accepted by a send (else: the kernel's)


@dataclass(slots=True)
class Outgoing:
    """One frame from eth4 that needs the agent's attention (control, unresolved, or plain path)."""

    kind: Kind
    frame: bytes                # IPoIB frame (4-byte header + payload)
    peer_id: int = 0            # PEER
    mgid: bytes | None = None   # GROUP
    eth: bytes = b""            # the Ethernet frame, when known (for ICMP errors); else rebuilt on demand
    vid: int = 0
    control: bool = False       # a control frame (DHCP, IGMP/MLD): the agent looks inside
    vif_id: int = 0             # the sending VIF (abi.VIF_UNKNOWN: a source MAC to learn)


@dataclass(slots=True)
class TxBatch:
    """One turn's frames from eth4, grouped by destination (no per-frame objects on the fast path)."""

    peers: dict[int, list[bytes]] = field(default_factory=dict)     # VID | VIF << 32 | peer << 64 -> frames
    groups: dict[bytes, list[bytes]] = field(default_factory=dict)  # VID, 0, VIF, group id, MGID -> frames
    other: list[Outgoing] = field(default_factory=list)             # control, unresolved
    raw: list[bytes] = field(default_factory=list)                  # ceiling: Ethernet frames as they came
    descs: dict = field(default_factory=dict)   # a peers/groups key -> the UMEM descriptors of its frames,
    #                                             when the frames are views of the UMEM (BpfPump.post_umem)

    def clear(self) -> None:
        self.peers.clear()
        self.groups.clear()
        self.descs.clear()
        self.other.clear()
        self.raw.clear()


_NO_ROWS = np.zeros(0, np.int64)
SMALL = 8           # at most this many frames: plain Python (a numpy call costs more than it saves)
_ZERO_START = np.zeros(1, np.int64)


class TxColumns:
    """One turn's frames from eth4 to peers and groups as columns, sorted by destination
    (`BpfPump.receive_columns`): `addr` and `length` (UMEM offsets and lengths; group g is rows
    starts[g]:starts[g + 1], their order kept), and `meta`, the 32-byte TX metadata of each group's first
    frame (kind at [1], VID at [4:6], VIF id at [8:12], dest id at [12:16], MGID at [16:32])."""

    __slots__ = ("addr", "length", "meta", "rows", "starts")

    def __init__(self, addr, length, starts, meta, rows) -> None:
        self.addr, self.length, self.starts, self.meta, self.rows = addr, length, starts, meta, rows

    def groups(self):
        """(meta, offsets, lengths) per destination."""
        ends = [*self.starts[1:].tolist(), len(self.addr)]
        for g, (s, e) in enumerate(zip(self.starts.tolist(), ends, strict=True)):
            yield self.meta[g], self.addr[s:e], self.length[s:e]

    def frames(self, offsets: np.ndarray, lengths: np.ndarray) -> list[memoryview]:
        """Views of frames in the UMEM (the slow path: oversize, queueing, capture)."""
        flat = memoryview(self.rows.reshape(-1))
        return [flat[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True)]


def _is_dhcp_reply(data) -> bool:
    """IPv4/UDP 67 -> 68 in an IPoIB frame (a few byte compares)."""
    if len(data) < 4 + 28 or data[0] != 0x08 or data[1] != 0x00 or data[4 + 9] != f.IPPROTO_UDP:
        return False
    o = 4 + (data[4] & 0x0F) * 4
    return len(data) >= o + 4 and bytes(data[o:o + 4]) == b"\x00\x43\x00\x44"


class _Base:
    meta_len = 0

    def __init__(self, agent, ifname: str, ifindex: int, adopt=None):
        from xdpoib.afxdp import XskSocket

        self.agent = agent
        self.ifname, self.ifindex = ifname, ifindex
        if adopt is not None and adopt != "rebind":     # the running agent's socket (`XskSocket.adopt`)
            self.xsk = adopt
        else:       # "rebind": a successor's own socket, bound once the running agent's one is closed
            self.xsk = XskSocket(ifindex, 0, frames=4096, ring_size=2048, meta_len=self.meta_len,
                                 bind=adopt != "rebind")

    def fileno(self) -> int:
        return self.xsk.fileno()

    def control(self, frame: bytes) -> Outgoing | None:
        """An Ethernet frame the agent handles itself, translated by the oracle (DHCP per RFC 4390)."""
        a = self.agent
        try:
            r = eth_to_ipoib(frame, a.peers)
        except FrameError as e:
            a.drops[e.reason] += 1
            return None
        kind = r.kind
        if kind == Kind.CONTROL:
            kind = Kind.GROUP if r.mgid else Kind.PEER if r.peer else Kind.UNRESOLVED
        if r.vif is None:               # learning mode, unknown source MAC: the agent decides
            from xdpoib.abi import VIF_UNKNOWN

            return Outgoing(Kind.CONTROL, bytes(frame), eth=bytes(frame), vid=r.vid, control=True,
                            vif_id=VIF_UNKNOWN)
        return Outgoing(kind, r.frame, r.peer.peer_id if r.peer else 0, r.mgid, frame, r.vid,
                        r.kind == Kind.CONTROL, r.vif.vif_id)

    send_memory = None      # frames are copied out of the UMEM (BpfPump may send from it instead)

    def tx_done(self) -> None:
        """The end of a turn's sends (frames still in the UMEM go back to it: BpfPump)."""

    def pending_tx(self) -> bool:
        return bool(self.xsk.pending_tx())

    def kick(self) -> None:
        self.xsk.kick()

    def ring_counters(self) -> dict:
        """The AF_XDP socket's kernel counters: frames shed because our ring was full."""
        try:
            k = self.xsk.kernel_stats()
        except OSError:
            return {}
        return {"xsk_rx_dropped": k["rx_dropped"], "xsk_rx_ring_full": k["rx_ring_full"],
                "xsk_fill_ring_empty": k["rx_fill_ring_empty_descs"]}


class NoMaps:
    """A datapath with no tables of its own to keep in step (the plain path; an agent that handed over)."""

    def add_peers(self, entries) -> None:
        pass

    def add_vifs(self, vifs) -> None:
        pass

    def remove_vifs(self, vifs) -> None:
        pass

    def remove_peers(self, entries) -> None:
        pass

    def set_group(self, mgid: bytes, group_id: int) -> None:
        pass

    def forget_meta(self) -> None:
        pass


class PlainPump(NoMaps, _Base):
    """Redirect everything to AF_XDP; translate both ways with the oracle in Python."""

    name = "plain"

    def __init__(self, agent, ifname: str, ifindex: int):
        from xdpoib.datapath.redirect import RedirectDatapath

        self.datapath = RedirectDatapath(ifname)
        self._out: list[bytes] = []
        try:
            super().__init__(agent, ifname, ifindex)
            self.datapath.add_socket(0, self.xsk.fileno())
        except BaseException:
            self.datapath.close()
            raise

    def receive(self, budget: int, batch: TxBatch) -> int:
        a = self.agent
        got = self.xsk.recv(budget)
        for _, frame in got:
            if not a.vif_learned:
                a.learn_vif(frame)
            o = self.control(frame)
            if o is None:
                continue
            if o.control or not (o.kind == Kind.PEER or o.mgid is not None):
                batch.other.append(o)
            elif o.mgid is not None:
                key = o.vid.to_bytes(2, "little") + bytes(2) + o.vif_id.to_bytes(4, "little") + bytes(4) + o.mgid
                batch.groups.setdefault(key, []).append(o.frame)
            else:
                batch.peers.setdefault(o.vid | o.vif_id << 32 | o.peer_id << 64, []).append(o.frame)
        return len(got)

    def rx_frame(self, payload, peer, multicast: bool, vif, pkey: int) -> None:
        a = self.agent
        try:
            r = ipoib_to_eth(bytes(payload), a.peers, src=peer.as_peer(), vif=vif, pkey=pkey | 0x8000,
                             multicast=multicast)
        except FrameError as e:
            a.drops[e.reason] += 1
            return
        self._out.append(r.frame)

    def rx_ethernet(self, frame: bytes) -> None:
        self._out.append(bytes(frame))

    def rx_flush(self) -> int:
        frames, self._out = self._out, []
        if not frames:
            return 0
        a = self.agent
        sent = self.xsk.send(frames)
        # copy mode sends at most 32 frames per kick: kick until the ring is empty (bounded), rather than
        # leave frames on it until the loop's next wakeup (it takes no extra turn after one that moved few)
        for _ in range(sent // 32):
            if not self.xsk.pending_tx():
                break
            self.xsk.kick()
        a.stats["eth_tx_frames"] += sent
        if sent < len(frames):
            a.drops[DropReason.INJECT_RING_FULL] += len(frames) - sent
        return sent

    def counters(self) -> dict:
        return {**self.datapath.counters(), **self.ring_counters()}

    def close(self) -> None:
        self.xsk.close()
        self.datapath.close()


class BpfPump(_Base):
    """The translating XDP programs: TX on the device facing eth4, RX by batched live-frames injection."""

    meta_len = META_LEN
    name = "bpf"
    tx_program = "xdpoib_tx"

    def __init__(self, agent, ifname: str, ifindex: int, aid: str, adopt=None, adoption=None):
        """adopt: the running agent's AF_XDP socket, for a successor (restart): nothing attached, no map
        written and the rings untouched until `take_over`. adoption: what `prepare` did, when the agent
        prepared the pins already (its receive buffers lie in the inject map)."""
        import logging

        from xdpoib.datapath.loader import PinnedDatapath, prepare
        from xdpoib.datapath.maps import Maps

        # What a previous agent of this attachment left pinned decides (xdpoib/datapath/loader.py):
        # the same build is adopted as it is (no compile, counters and peers kept); programs of another
        # build with the same ABI are compiled in a child and loaded against the pinned maps; another
        # ABI gets fresh maps, filled below from our tables (restored from the state file). Either way
        # the program attached to the device is swapped atomically by `attach`, and the agent itself
        # never imports bcc (docs/design.md §6, §8: memory).
        self.pin_dir = pin_dir(aid)
        self.adoption = adoption or prepare(self.pin_dir)
        self.adopted = self.adoption.kept_maps
        agent.stats[f"datapath_{self.adoption.action}"] += 1
        log = logging.getLogger("xdpoib.agent")
        if self.adoption.action == "replace":
            log.info("upgrading the datapath: %s: new programs loaded against the pinned maps, "
                     "swapped in with XDP_FLAGS_REPLACE", self.adoption.why)
        elif self.adoption.action == "rebuild":
            log.warning("rebuilding the datapath: %s: fresh maps filled from the state file (%d peers, "
                        "%d groups), programs swapped in with XDP_FLAGS_REPLACE; the BPF counters start "
                        "again from 0", self.adoption.why, len(agent.peers.entries), len(agent.groups))
        self.dp = PinnedDatapath(self.pin_dir)
        self._links: list[str] = []
        self._meta: dict[tuple[int, bool], bytes] = {}
        self.owner = adopt is None      # whether close() may detach, delete the anchor and unpin
        try:
            self.maps = Maps.of(self.dp)
            super().__init__(agent, ifname, ifindex, adopt)
            self._turn: list = []
            self._turn_rows = _NO_ROWS
            self._copies_seen = 0
            self.send_memory = self._send_memory(agent)
            # the anchor: a spare veth end holding the RX batch program, so each batched live-frames
            # call costs microseconds instead of ~24 ms (docs/datapath.md); a successor keeps the one
            # the running agent injects through
            h = state.link_tag(aid)
            self.anchor, peer = "xa" + h, "xb" + h
            if adopt is None or not link.link_exists(self.anchor):
                if link.link_exists(self.anchor):
                    link.delete_link(self.anchor)
                link.create_veth(peer, self.anchor, None)
                self._links.append(self.anchor)
            if adopt is None:
                self.take_over()
        except BaseException:
            self.close()
            raise

    def take_over(self) -> None:
        """Fill the maps from the agent's tables, point the XSKMAP at our socket and attach the programs
        (an attached program is swapped atomically): from now on this agent is the datapath's."""
        from xdpoib.datapath.inject import Injector

        a = self.agent
        self.maps.load(a.peers)
        self.add_peers(a.peers.entries.values())
        self.bind_socket()
        self.maps.xsks.set(0, self.xsk.fileno())
        self.dp.attach(self.tx_program, self.ifname)
        self.dp.attach("xdpoib_rx_batch", self.anchor)
        if self.anchor not in self._links:
            self._links.append(self.anchor)
        self.injector = Injector(self.dp, self.maps, self.ifindex)
        self.owner = True

    def bind_socket(self) -> None:
        """A successor that could not adopt the running agent's socket: bind ours the moment that one is
        closed, and point the XSKMAP at it (the pinned one: with the same maps, frames from eth4 reach
        us from here on, before anything else of the take-over)."""
        if not self.xsk.bound:
            import logging
            import time

            from xdpoib.afxdp import RELEASE_WAIT

            t0 = time.perf_counter()
            self.xsk.bind(timeout=RELEASE_WAIT)     # the kernel frees the queue a little after the close
            self.maps.xsks.set(0, self.xsk.fileno())
            logging.getLogger("xdpoib.agent").info("our own AF_XDP socket bound %.1f ms after the old one "
                                                   "closed", (time.perf_counter() - t0) * 1e3)

    def quiesce(self, timeout: float = 1.0) -> bool:
        """Before handing the datapath over: this turn's frames and every frame whose send is over go
        back to the fill ring, sends in flight are waited for (up to timeout), the AF_XDP TX ring is
        emptied. True when the UMEM holds none of our frames any more."""
        import time

        until = time.monotonic() + timeout
        if self.send_memory is not None:
            self.tx_done()
            while True:
                self._reclaim()
                if not np.count_nonzero(self._state) or time.monotonic() > until:
                    break
                time.sleep(0.0005)
        settled = self.xsk.settle(max(0.0, until - time.monotonic()))
        return settled and (self.send_memory is None or not np.count_nonzero(self._state))

    def _send_memory(self, agent):
        """The receive half of the UMEM as the backend's send memory (None: frames are copied out)."""
        import os

        backend = getattr(agent, "backend", None)
        if backend is None or os.environ.get("XDPOIB_TX_COPY") == "1":
            return None
        xsk = self.xsk
        self._rx_frames = xsk.frames // 2          # XskSocket: the first half feeds the fill ring
        self._state = np.zeros(self._rx_frames, np.uint8)  # per receive frame: 0, _HELD or _POSTED
        self._posted = 0                            # frames in _POSTED: none, and `_reclaim` has nothing to do
        self._umem_rows = np.frombuffer(xsk.umem, np.uint8).reshape(xsk.frames, xsk.frame_size)
        from xdpoib.errors import XdpoibError

        try:
            return backend.register_send_memory(xsk.umem, self._rx_frames, xsk.frame_size)
        except XdpoibError as e:
            import logging

            logging.getLogger("xdpoib.agent").warning("sends are copied: %s", e)
            return None

    def _reclaim(self) -> None:
        """Frames whose sends are over go back to the fill ring (a few: plain Python; many: arrays)."""
        if not self._posted:            # an idle turn's, or a ping's next hop: nothing is out
            return
        done = self.send_memory.completed_offsets()     # verbs reaps its send completions here
        self._give_back(done.tolist() if len(done) <= SMALL else done, _POSTED)

    def _give_back(self, offsets, state: int) -> None:
        """The frames at `offsets` (a list, or an integer array for many) that are still in `state` go back
        to the fill ring (state 0: the kernel's)."""
        if isinstance(offsets, np.ndarray):
            if len(offsets):
                rows = offsets // self.xsk.frame_size
                rows = rows[self._state[rows] == state]
                self._state[rows] = 0
                if state == _POSTED:
                    self._posted -= len(rows)
                self.xsk.fill_array(rows * self.xsk.frame_size)
            return
        st, fs, back = self._state, self.xsk.frame_size, []
        for off in offsets:
            i = off // fs
            if st[i] == state:
                st[i] = 0
                back.append(off)
        if state == _POSTED:
            self._posted -= len(back)
        self.xsk.fill_frames(back)

    def post_umem(self, qp, ah, remote_qpn: int, remote_qkey: int, descs) -> int:
        """Send frames of this turn straight from the UMEM (their descriptors, from `TxBatch.descs`);
        the accepted ones go back to the fill ring once their sends are over, the others at `tx_done`.
        The object path (a few frames a turn); `post_columns` is the columnar one."""
        n = qp.post_send_memory(ah, remote_qpn, remote_qkey, self.send_memory, descs)
        st, fs = self._state, self.xsk.frame_size
        for i in range(n):
            st[descs[i][0] // fs] = _POSTED
        self._posted += n
        return n

    def post_columns(self, qp, ah, remote_qpn: int, remote_qkey: int, offsets: np.ndarray,
                     lengths: np.ndarray) -> int:
        """Send this turn's frames at `offsets` (UMEM) to one destination without copying them out
        (`UdQp.post_send_batch`); the accepted ones return to the fill ring once sent, the others at
        `tx_done`."""
        n = qp.post_send_batch(ah, remote_qpn, remote_qkey, self.send_memory, offsets, lengths)
        if n:
            self._state[offsets[:n] // self.xsk.frame_size] = _POSTED
            self._posted += n
        return n

    def tx_done(self) -> None:
        """The end of a turn's sends: this turn's frames that no send took go back to the fill ring, so do
        those whose sends are already over, and the copies the backend had to make are counted."""
        if self.send_memory is None:        # frames were copied out and went back at once
            return
        turn, self._turn = self._turn, []
        rows, self._turn_rows = self._turn_rows, _NO_ROWS
        if not len(rows) and len(turn) <= SMALL:
            self._give_back([d[0] for d in turn], _HELD)
        else:
            offsets = rows * self.xsk.frame_size
            if turn:
                offsets = np.concatenate((offsets, np.fromiter((d[0] for d in turn), np.int64, len(turn))))
            self._give_back(offsets, _HELD)
        if self._posted:
            self._reclaim()         # sends over already (the sim copies at post): back now, not next hop
        self._count_copies()

    def _count_copies(self) -> None:
        m = self.send_memory
        if m.copies != self._copies_seen:
            self.agent.stats["tx_copies"] += m.copies - self._copies_seen
            self._copies_seen = m.copies

    def receive_columns(self, budget: int, batch: TxBatch) -> TxColumns | None:
        """Frames from eth4 as columns, grouped by destination with one sort (`TxColumns`); frames to peers
        and groups stay in the UMEM (sent from there: `post_columns`), the others (control, unresolved)
        go into `batch.other` as objects, as before. None when no frame to a peer or group came."""
        from xdpoib import abi

        a = self.agent
        xsk = self.xsk
        if self._turn or len(self._turn_rows):      # a turn that did not end (an exception in the forwarder)
            self.tx_done()
        self._reclaim()
        d = xsk.rx_desc_array(budget)
        n = len(d)
        if not n:
            return None
        fs = xsk.frame_size
        addr = d["addr"].astype(np.int64)
        length = d["len"].astype(np.int64)
        rows = addr // fs
        col = addr - rows * fs
        c0 = int(col[0])
        if c0 >= META_LEN and (col == c0).all():
            meta = self._umem_rows[rows, c0 - META_LEN:c0]
        else:
            meta = self._umem_rows.reshape(-1)[(addr - META_LEN)[:, None] + np.arange(META_LEN)]
        self._state[rows] = _HELD
        xsk.rx_consume_n(n)
        self._turn_rows = rows
        a.stats["eth_rx_frames"] += n
        w = meta.view("<u8")        # word 0: version, kind, VLAN; word 1: VIF id, destination id
        if n > 1 and (w[:, :2] == w[0, :2]).all() and meta[0, 0] == abi.META_VERSION \
                and meta[0, 1] in (_KIND_PEER, _KIND_GROUP):
            return TxColumns(addr, length, _ZERO_START, meta[:1], self._umem_rows)     # one destination
        kind = meta[:, 1]
        good = meta[:, 0] == abi.META_VERSION
        fast = good & ((kind == _KIND_PEER) | (kind == _KIND_GROUP))
        if not fast.all():
            bad = int(n - np.count_nonzero(good))
            if bad:
                a.drops[DropReason.BAD_METADATA] += bad
            slow = np.flatnonzero(good & ~fast)
            if len(slow):
                self._slow_descs(addr[slow].tolist(), length[slow].tolist(), batch)
            keep = np.flatnonzero(fast)
            addr, length, meta, kind = addr[keep], length[keep], meta[keep], kind[keep]
            if not len(addr):
                return None
        words = meta.view("<u4")                # (n, 8): [1] vid (low 16 bits), [2] VIF id, [3] dest id
        key = ((kind == _KIND_GROUP).astype(np.uint64) << np.uint64(63)) \
            | ((words[:, 1] & 0xFFFF).astype(np.uint64) << np.uint64(48)) \
            | ((words[:, 2] & 0xFFFF).astype(np.uint64) << np.uint64(32)) | words[:, 3].astype(np.uint64)
        if len(key) > 1 and (key[1:] != key[:-1]).any():
            order = np.argsort(key, kind="stable")
            key, addr, length, meta = key[order], addr[order], length[order], meta[order]
            starts = np.concatenate(([0], np.flatnonzero(key[1:] != key[:-1]) + 1))
        else:
            starts = _ZERO_START
        return TxColumns(addr, length, starts, meta[starts], self._umem_rows)

    def _slow_descs(self, addrs: list[int], lengths: list[int], batch: TxBatch) -> None:
        """Control and unresolved frames (rare): copied out and handed over as `Outgoing` objects."""
        from xdpoib import abi

        a, um = self.agent, self.xsk.umem_view
        a.stats["tx_copies"] += len(addrs)
        for addr, length in zip(addrs, lengths, strict=True):
            m = addr - META_LEN
            frame = bytes(um[addr:addr + length])
            if um[m + 1] == _KIND_CONTROL:
                if um[m + 8:m + 12] == _VIF_UNKNOWN:
                    batch.other.append(Outgoing(Kind.CONTROL, frame, eth=frame, control=True, vif_id=abi.VIF_UNKNOWN))
                else:
                    o = self.control(frame)
                    if o is not None:
                        batch.other.append(o)
            else:
                batch.other.append(Outgoing(Kind.UNRESOLVED, frame, vid=int.from_bytes(um[m + 4:m + 6], "little"),
                                            vif_id=int.from_bytes(um[m + 8:m + 12], "little")))

    def receive(self, budget: int, batch: TxBatch) -> int:
        """Frames from eth4, grouped by their metadata's destination. With a send memory, frames to peers
        and groups stay in the UMEM (views, with their descriptors in `batch.descs`); else, and for
        control and unresolved frames, the frame bytes are copied out (the only copy before the backend's)."""
        from xdpoib import abi

        a = self.agent
        xsk = self.xsk
        zc = self.send_memory is not None
        if zc:
            if self._turn:              # a turn that did not end (an exception in the forwarder)
                self.tx_done()
            self._reclaim()
        descs = xsk.rx_descs(budget)
        if not descs:
            return 0
        um = xsk.umem_view
        peers, groups, held = batch.peers, batch.groups, batch.descs
        if zc:
            st, fs = self._state, xsk.frame_size
        version = abi.META_VERSION
        copies = 0
        for d in descs:
            addr, length = d[0], d[1]
            if zc:
                st[addr // fs] = _HELD
            m = addr - META_LEN
            if m < 0 or um[m] != version:
                a.drops[DropReason.BAD_METADATA] += 1
                continue
            kind = um[m + 1]
            if kind == _KIND_PEER:
                key = int.from_bytes(um[m + 4:m + 16], "little")       # vid | vif_id << 32 | dest_id << 64
                q = peers.get(key)
                if q is None:
                    q = peers[key] = []
                    if zc:
                        held[key] = []
                if zc:
                    q.append(um[addr:addr + length])
                    held[key].append(d)
                else:
                    q.append(bytes(um[addr:addr + length]))
                    copies += 1
            elif kind == _KIND_GROUP:
                key = bytes(um[m + 4:m + 32])                           # vid, 0, vif_id, dest_id, MGID
                q = groups.get(key)
                if q is None:
                    q = groups[key] = []
                    if zc:
                        held[key] = []
                if zc:
                    q.append(um[addr:addr + length])
                    held[key].append(d)
                else:
                    q.append(bytes(um[addr:addr + length]))
                    copies += 1
            elif kind == _KIND_CONTROL:
                copies += 1
                frame = bytes(um[addr:addr + length])
                if um[m + 8:m + 12] == _VIF_UNKNOWN:
                    batch.other.append(Outgoing(Kind.CONTROL, frame, eth=frame, control=True,
                                                vif_id=abi.VIF_UNKNOWN))
                else:
                    o = self.control(frame)
                    if o is not None:
                        batch.other.append(o)
            else:
                copies += 1
                vid = int.from_bytes(um[m + 4:m + 6], "little")
                batch.other.append(Outgoing(Kind.UNRESOLVED, bytes(um[addr:addr + length]), vid=vid,
                                            vif_id=int.from_bytes(um[m + 8:m + 12], "little")))
        if copies:
            a.stats["tx_copies"] += copies
        if zc:
            xsk.rx_consume(descs)       # the frames come back in tx_done or, once sent, in _reclaim
            self._turn = descs
        else:
            xsk.rx_release(descs)
        return len(descs)

    def _meta_for(self, peer_id: int, multicast: bool, vif_id: int, pkey: int) -> bytes:
        """The RX metadata of frames from one peer to one VIF on one partition (the receiving QP's:
        the RX program tags the frame with its VLAN); cached, built once per combination."""
        from xdpoib import abi

        key = (peer_id, multicast, vif_id, pkey)
        m = self._meta.get(key)
        if m is None:
            if len(self._meta) > 65536:
                self._meta.clear()
            m = self._meta[key] = abi.rx_meta(peer_id, vif_id, pkey | 0x8000, multicast=multicast)
        return m

    def forget_meta(self) -> None:
        """Drop cached metadata (a VIF went or changed)."""
        self._meta.clear()

    def _add(self, frame, meta: bytes) -> None:
        inj = self.injector
        if not inj.add(frame, meta):
            self.rx_flush()
            if not inj.add(frame, meta):
                self.agent.drops[DropReason.INJECT_TOO_BIG] += 1

    def rx_frame(self, payload, peer, multicast: bool, vif, pkey: int) -> None:
        a = self.agent
        if len(payload) < 14:               # XDP cannot carry it (docs/datapath.md, known limits)
            a.drops[DropReason.RUNT] += 1
        elif payload[0] == 0x08 and payload[1] == 0x00 and _is_dhcp_reply(payload):
            # RX control: the agent rewrites DHCP (RFC 4390)
            try:
                r = ipoib_to_eth(bytes(payload), a.peers, src=peer.as_peer(), vif=vif, pkey=pkey | 0x8000,
                                 multicast=multicast)
            except FrameError as e:
                a.drops[e.reason] += 1
                return
            self.rx_ethernet(r.frame)
        else:
            self._add(payload, self._meta_for(peer.peer_id, multicast, vif.vif_id, pkey))

    def rx_columns(self, rows: np.ndarray, idx: np.ndarray, lengths: np.ndarray, peer_ids: np.ndarray,
                   multicast: np.ndarray, vif_id: int, pkey: int, in_slots: int | None = None) -> int:
        """Queue ordinary frames received by one QP for eth4, as columns: frame i is `lengths[i]` bytes at
        GRH_LEN in row `idx[i]` of the QP's pool (`rows`). Their RX metadata is written with array
        assignments; the frames are copied into the inject slots (`Injector.add_columns`), or, when the
        pool lies in the inject map's receive slots from slot `in_slots` on, injected where they are
        (`Injector.add_received`). Runts and frames too big to inject are counted and left out. Returns
        how many were queued. The caller checks that the inject map is mmapped (else the object path)."""
        from xdpoib.fabric.base import GRH_LEN

        a = self.agent
        ok = (lengths >= 14) & (lengths <= INJECT_MAX)
        if not ok.all():
            runts = int(np.count_nonzero(lengths < 14))
            if runts:
                a.drops[DropReason.RUNT] += runts
            if len(lengths) - runts - int(np.count_nonzero(ok)):
                a.drops[DropReason.INJECT_TOO_BIG] += len(lengths) - runts - int(np.count_nonzero(ok))
            idx, lengths, peer_ids, multicast = idx[ok], lengths[ok], peer_ids[ok], multicast[ok]
        if len(idx):
            if in_slots is not None:
                self.injector.add_received(idx + in_slots, lengths, peer_ids, multicast.astype(np.uint8), vif_id,
                                           pkey | 0x8000)
            else:
                self.injector.add_columns(rows, idx, lengths, peer_ids, multicast.astype(np.uint8), vif_id,
                                          pkey | 0x8000, GRH_LEN)
        return len(idx)

    def rx_ethernet(self, frame: bytes) -> None:
        from xdpoib import abi

        a = self.agent
        self._add(frame, abi.rx_meta(0, a.vif.vif_id, a.pkey, ethernet=True))

    def rx_flush(self) -> int:
        n = self.injector.flush()
        if n:
            self.agent.stats["injected_frames"] += n
        return n

    def add_peers(self, entries) -> None:
        items = [(e.peer_id, e.remac, e.addr.pack()) for e in entries]
        if items:
            self.maps.add_peers(items)

    def add_vifs(self, vifs) -> None:
        self.maps.add_vifs([(v.vif_id, v.mac, v.addr.pack()) for v in vifs])
        self._meta.clear()

    def remove_vifs(self, vifs) -> None:
        self.maps.remove_vifs([(v.vif_id, v.mac, v.addr.pack()) for v in vifs])
        self._meta.clear()

    def set_group(self, mgid: bytes, group_id: int) -> None:
        self.maps.set_group(mgid, group_id)

    def counters(self) -> dict:
        out = self.maps.report()
        out["inject_mmap"] = getattr(self, "injector", None) is not None and self.injector.mmapped
        # receives: into the inject map's slots (injected where they landed), or into a pool (copied)
        out["rx_into"] = "inject_slots" if self.agent.qp.pool is self.agent.rx_pool else "pool"
        m = getattr(self, "send_memory", None)
        # sends: from the UMEM without a copy, from the UMEM copied by the backend (sim), or copied out
        out["tx_from_umem"] = "copy" if m is None else "zero_copy" if m.zero_copy else "backend_copy"
        if m is not None:       # receive frames not in the kernel's hands (taken this turn, or being sent)
            out["tx_umem_frames_out"] = int(np.count_nonzero(self._state))
            out["tx_in_flight"] = m.in_flight
        out.update(self.ring_counters())
        return out

    def close_socket(self) -> None:
        """Close the send memory, then the AF_XDP socket and its UMEM (idempotent; at the end, or for a
        successor that binds its own socket)."""
        memory, self.send_memory = getattr(self, "send_memory", None), None
        if memory is not None:
            memory.close()          # before the UMEM is unmapped (it waits for sends in flight)
        self._umem_rows = None          # numpy's hold on the UMEM, before it is unmapped
        xsk = getattr(self, "xsk", None)
        if xsk is not None:
            xsk.close()

    def close(self) -> None:
        """A clean stop: detach, delete the anchor, close, unpin (only a crash leaves pins behind). A pump
        that is not the datapath's owner (a successor that never took over) only closes its own."""
        from xdpoib.datapath.loader import unpin

        if self.owner:
            link.detach_xdp(self.ifname)
        inj = getattr(self, "injector", None)
        if inj is not None:
            inj.close()
        self.close_socket()
        if self.owner:
            for name in self._links:
                link.delete_link(name)
        self.dp.close()
        if self.owner:
            unpin(self.pin_dir)


class CeilingPump(BpfPump):
    """The plumbing ceiling: raw Ethernet frames in both directions, no translation, no lookups."""

    meta_len = 0
    name = "ceiling"
    tx_program = "xdpoib_tx_raw"

    def _send_memory(self, agent):
        return None             # raw frames are copied out, as the ceiling always measured them

    def receive(self, budget: int, batch: TxBatch) -> int:
        xsk = self.xsk
        descs = xsk.rx_descs(budget)
        if descs:
            um = xsk.umem_view
            batch.raw.extend([bytes(um[a:a + n]) for a, n, _o in descs])
            xsk.rx_release(descs)
        return len(descs)

    def rx_frame(self, payload, peer, multicast: bool, vif, pkey: int) -> None:
        from xdpoib import abi

        if not hasattr(self, "_eth_meta"):
            self._eth_meta = abi.rx_meta(0, self.agent.vif.vif_id, self.agent.pkey, ethernet=True)
        self._add(payload, self._eth_meta)


def pin_dir(aid: str):
    """Where an attachment's programs and maps are pinned (bpffs)."""
    from xdpoib.datapath.maps import PIN_ROOT

    return PIN_ROOT / aid.replace("/", "_")
