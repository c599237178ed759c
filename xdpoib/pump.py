"""The two datapaths between eth4 and the agent, behind one interface.

- `BpfPump` (the default): the translating XDP programs of `bpf/`. TX frames arrive on the AF_XDP
  socket already in IPoIB form with a `TxMeta` record in front (kind, peer or group, P_Key); only
  CONTROL frames (DHCP, IGMP/MLD) come as Ethernet and are rewritten here with the oracle. RX frames
  are handed to the RX program with an `RxMeta` record, in batches, by live-frames BPF_PROG_TEST_RUN
  (docs/datapath.md), which redirects them to the device facing eth4.
- `PlainPump`: a redirect-everything XDP program and the oracle in Python for every frame. Slower,
  correct by construction; the fallback for a TAP until the guest's MAC is known, and the baseline that
  benchmarks compare with (`XDPOIB_DATAPATH=plain`).

Both yield `Outgoing` decisions for the agent to send and take `Incoming` frames to deliver.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xdpoib import link, state
from xdpoib.errors import FrameError
from xdpoib.reasons import DropReason, Kind
from xdpoib.wire import frames as f
from xdpoib.wire.oracle import eth_to_ipoib, ipoib_to_eth

BATCH = 256
META_LEN = 32           # struct xdpoib_tx_meta
_TX_META = struct.Struct("<BBHHHII16s")


@dataclass(slots=True)
class Outgoing:
    """One frame from eth4 for the fabric: an IPoIB frame and where it goes."""

    kind: Kind
    frame: bytes                # IPoIB frame (4-byte header + payload)
    peer_id: int = 0            # PEER
    mgid: bytes | None = None   # GROUP
    eth: bytes = b""            # the Ethernet frame, when known (for ICMP errors); else rebuilt on demand
    vid: int = 0
    control: bool = False       # a control frame (DHCP, IGMP/MLD): the agent looks inside


@dataclass(slots=True)
class Incoming:
    """One IPoIB frame from the fabric for eth4."""

    frame: bytes
    peer: object                # PeerEntry
    multicast: bool


def _is_dhcp_reply(data: bytes) -> bool:
    """IPv4/UDP 67 -> 68 in an IPoIB frame (a few byte compares)."""
    if len(data) < 4 + 28 or data[:2] != b"\x08\x00" or data[4 + 9] != f.IPPROTO_UDP:
        return False
    o = 4 + (data[4] & 0x0F) * 4
    return len(data) >= o + 4 and data[o:o + 4] == b"\x00\x43\x00\x44"


class _Base:
    def __init__(self, agent, ifname: str, ifindex: int):
        from xdpoib.afxdp import XskSocket

        self.agent = agent
        self.ifname, self.ifindex = ifname, ifindex
        self.xsk = XskSocket(ifindex, 0, frames=4096, ring_size=2048, meta_len=self.meta_len)

    def fileno(self) -> int:
        return self.xsk.fileno()

    def control(self, frame: bytes) -> Outgoing | None:
        """An Ethernet frame the agent handles itself, translated by the oracle (DHCP per RFC 4390)."""
        a = self.agent
        try:
            r = eth_to_ipoib(frame, a.peers)
        except FrameError as e:
            a.drops[e.reason.name.lower()] += 1
            return None
        kind = r.kind
        if kind == Kind.CONTROL:
            kind = Kind.GROUP if r.mgid else Kind.PEER if r.peer else Kind.UNRESOLVED
        return Outgoing(kind, r.frame, r.peer.peer_id if r.peer else 0, r.mgid, frame, r.vid,
                        r.kind == Kind.CONTROL)

    def pending_tx(self) -> bool:
        return bool(self.xsk.pending_tx())

    def kick(self) -> None:
        self.xsk.kick()


class PlainPump(_Base):
    """Redirect everything to AF_XDP; translate both ways with the oracle in Python."""

    meta_len = 0
    name = "plain"

    def __init__(self, agent, ifname: str, ifindex: int):
        from xdpoib.datapath.redirect import RedirectDatapath

        self.datapath = RedirectDatapath(ifname)
        try:
            super().__init__(agent, ifname, ifindex)
            self.datapath.add_socket(0, self.xsk.fileno())
        except BaseException:
            self.datapath.close()
            raise

    def receive(self) -> list[Outgoing]:
        out = []
        a = self.agent
        for _, frame in self.xsk.recv(BATCH):
            if not a.vif_learned:
                a.learn_vif(frame)
            o = self.control(frame)
            if o is not None:
                out.append(o)
        return out

    def deliver(self, items: list[Incoming], ethernet: list[bytes]) -> None:
        a = self.agent
        frames = list(ethernet)
        for it in items:
            try:
                r = ipoib_to_eth(it.frame, a.peers, src=it.peer.as_peer(), vif=a.vif, pkey=a.pkey,
                                 multicast=it.multicast)
            except FrameError as e:
                a.drops[e.reason.name.lower()] += 1
                continue
            frames.append(r.frame)
        if frames:
            sent = self.xsk.send(frames)
            a.stats["eth_tx_frames"] += sent
            if sent < len(frames):
                a.drops["inject_ring_full"] += len(frames) - sent

    def add_peers(self, entries) -> None:
        pass

    def set_group(self, mgid: bytes, group_id: int) -> None:
        pass

    def counters(self) -> dict:
        return self.datapath.counters()

    def close(self) -> None:
        self.xsk.close()
        self.datapath.close()


class BpfPump(_Base):
    """The translating XDP programs: TX on the device facing eth4, RX by batched live-frames injection."""

    meta_len = META_LEN
    name = "bpf"

    def __init__(self, agent, ifname: str, ifindex: int, aid: str):
        from xdpoib.datapath.inject import Injector
        from xdpoib.datapath.loader import PinnedDatapath, compile_and_pin, pinned
        from xdpoib.datapath.maps import Maps

        # a previous agent of this attachment that died left its programs and maps pinned: adopt them
        # (no compile, counters and peers kept); else a child process compiles and pins them, and we
        # adopt those: the agent itself never imports bcc (DESIGN 6, 8: memory)
        self.pin_dir = pin_dir(aid)
        self.adopted = pinned(self.pin_dir)
        if not self.adopted:
            compile_and_pin(self.pin_dir)
        self.dp = PinnedDatapath(self.pin_dir)
        self._links: list[str] = []
        try:
            self.maps = Maps.of(self.dp)
            self.maps.load(agent.peers)
            self.add_peers(agent.peers.entries.values())
            super().__init__(agent, ifname, ifindex)
            self.maps.xsks.set(0, self.xsk.fileno())
            self.dp.attach("xdpoib_tx", ifname)
            # the anchor: a spare veth end holding the RX batch program, so each batched live-frames
            # call costs microseconds instead of ~24 ms (docs/datapath.md)
            h = state.link_tag(aid)
            self.anchor, peer = "xa" + h, "xb" + h
            if link.link_exists(self.anchor):
                link.delete_link(self.anchor)
            link.create_veth(peer, self.anchor, None)
            self._links.append(self.anchor)
            self.dp.attach("xdpoib_rx_batch", self.anchor)
            self.injector = Injector(self.dp, self.maps, ifindex)
        except BaseException:
            self.close()
            raise

    def receive(self) -> list[Outgoing]:
        from xdpoib import abi

        out = []
        a = self.agent
        unpack = _TX_META.unpack_from           # struct xdpoib_tx_meta, cheaper than a ctypes copy
        for meta, frame in self.xsk.recv(BATCH):
            if len(meta) < META_LEN:
                a.drops["bad_metadata"] += 1
                continue
            version, kind, _pkey, vid, _, _vif, dest_id, dest = unpack(meta)
            if version != abi.META_VERSION:
                a.drops["bad_metadata"] += 1
                continue
            if kind == Kind.PEER:
                o = Outgoing(Kind.PEER, frame, dest_id, vid=vid)
            elif kind == Kind.GROUP:
                o = Outgoing(Kind.GROUP, frame, mgid=dest, vid=vid)
            elif kind == Kind.CONTROL:
                o = self.control(frame)
            else:
                o = Outgoing(Kind.UNRESOLVED, frame, vid=vid)
            if o is not None:
                out.append(o)
        return out

    def deliver(self, items: list[Incoming], ethernet: list[bytes]) -> None:
        from xdpoib import abi

        a = self.agent
        batch = [(fr, abi.rx_meta(0, a.vif.vif_id, a.pkey, ethernet=True)) for fr in ethernet]
        for it in items:
            data = it.frame
            if len(data) < 14:              # XDP cannot carry it (docs/datapath.md, known limits)
                a.drops["runt"] += 1
            elif _is_dhcp_reply(data):      # RX control: the agent rewrites DHCP (RFC 4390)
                try:
                    r = ipoib_to_eth(data, a.peers, src=it.peer.as_peer(), vif=a.vif, pkey=a.pkey,
                                     multicast=it.multicast)
                    batch.append((r.frame, abi.rx_meta(it.peer.peer_id, a.vif.vif_id, a.pkey, ethernet=True)))
                except FrameError as e:
                    a.drops[e.reason.name.lower()] += 1
            else:
                batch.append((data, abi.rx_meta(it.peer.peer_id, a.vif.vif_id, a.pkey, multicast=it.multicast)))
        for i in range(0, len(batch), BATCH):
            chunk = batch[i:i + BATCH]
            self.injector.send_batch(chunk)
            a.stats["injected_frames"] += len(chunk)

    def add_peers(self, entries) -> None:
        items = [(e.peer_id, e.remac, e.addr.pack()) for e in entries]
        if items:
            self.maps.add_peers(items)

    def set_group(self, mgid: bytes, group_id: int) -> None:
        self.maps.set_group(mgid, group_id)

    def counters(self) -> dict:
        from xdpoib import abi

        out = {}
        for d in abi.Direction:
            c = self.maps.counters(d)
            drops = {DropReason(i).name.lower(): int(n) for i, n in enumerate(c.drops)
                     if n and i in DropReason._value2member_map_}
            out[d.name.lower()] = {"packets": int(c.packets), "bytes": int(c.bytes),
                                   "pass": int(c.verdicts[2]), "drop": int(c.verdicts[1]),
                                   "redirect": int(c.verdicts[4]), "drops": drops}
        return out

    def close(self) -> None:
        """A clean stop: detach, delete the anchor, close, unpin (only a crash leaves pins behind)."""
        from xdpoib.datapath.loader import unpin

        link.detach_xdp(self.ifname)
        xsk = getattr(self, "xsk", None)
        if xsk is not None:
            xsk.close()
        for name in self._links:
            link.delete_link(name)
        self.dp.close()
        unpin(self.pin_dir)


def pin_dir(aid: str):
    """Where an attachment's programs and maps are pinned (bpffs)."""
    from xdpoib.datapath.maps import PIN_ROOT

    return PIN_ROOT / aid.replace("/", "_")
