"""Migration: a guest that leaves this host is let go at once and found again at its new place.

A guest (a learned VIF, `vifs.py`) that moves to another host (VM live migration) keeps its MAC and
IP addresses; only its IPoIB address changes, to the new host's VIF QP. Peers on the fabric keep
sending to the old (QPN, GID) until their neighbour entries change, which on their own they do only
when the entry goes stale and is probed again (measured: 5.8 s of lost traffic when the guest
announces itself only as qemu does, with five RARP frames that carry no IP address). So, as eIPoIB
did:

- The old host notices the guest leaving: its forwarding entry on the bridge behind eth4 is removed
  and its bridge port is deleted or down (`link.BridgeWatch`, netlink events in eth4's namespace), or
  `xdpoib vif del` removes it. The VIF is released at once (its QP closed, so nothing is delivered
  to a guest that is not there).
- The old host then asks the fabric where the guest's addresses are now: ARP probes (sender IP
  0.0.0.0, sent from VIF 0) for its IPv4 addresses, DAD-style neighbour solicitations (source ::,
  to the solicited-node group) for its IPv6 ones. eIPoIB sent 5 probes 0.5 s apart; these start at
  once and back off (`PROBE_AT`), and every RARP heard from the fabric meanwhile (qemu's announce of a
  guest that just arrived somewhere) brings the next probe forward (`arrival`), so a guest running
  elsewhere is found within milliseconds of its first frame there.
- When the guest answers from another (QPN, GID) (any ARP or NA naming one of its addresses), the
  old host broadcasts gratuitous ARPs and unsolicited NAs on its behalf, naming the guest's new
  IPoIB address, so every peer's neighbour entry moves to the new place. The receiving agents take
  such an announcement only for an address they already heard from directly (`Resolver.from_arp`).
- The new host learns the guest as a VIF from its first frame (a RARP self-announce included) and
  announces each address of it as soon as it knows one: from the guest's own ARP, from an
  announcement on its behalf that names the VIF (`on_behalf`), or because the guest comes back to a
  host that still remembers its addresses (`DEPARTED_S`: one it left without being found elsewhere,
  or whose VIF idled out: a guest that speaks again after `--vif-idle` is announced at once, whatever
  its first frame, so peers do not keep sending to its old QPN).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from xdpoib.errors import FrameError, XdpoibError
from xdpoib.wire import frames as f
from xdpoib.wire.addr import mac_str
from xdpoib.wire.oracle import eth_to_ipoib

log = logging.getLogger("xdpoib.agent")

#: When the probes for a departed guest go out, in seconds after it left: at once, then backing off
#: to eIPoIB's 0.5 s spacing; after the last one the guest is given up.
PROBE_AT = (0.0, 0.05, 0.15, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
#: A RARP heard from the fabric (a guest announcing itself somewhere) probes at once, at most this often.
HINT_GAP_S = 0.02
#: Gratuitous ARPs / unsolicited NAs sent on a found guest's behalf (eIPoIB: 3), this far apart.
ANNOUNCE_COUNT, ANNOUNCE_GAP_S = 3, 0.1
#: How long a departed guest's addresses are remembered (it may come back here).
DEPARTED_S = 60.0
#: At most this many departed guests are remembered (the oldest forgotten first).
MAX_DEPARTED = 4096
#: An FDB removal and its port's removal belong together when this close.
PAIR_S = 5.0
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
UNSPECIFIED = bytes(16)
BROADCAST = b"\xff" * 6


@dataclass
class Departed:
    """A guest that left this host: what it was, and the probing for it."""

    mac: bytes
    vid: int
    addrs: set
    old_key: tuple                          # its IPoIB address here (QPN, GID): answers from it do not count
    left: float = field(default_factory=time.monotonic)
    probes: int = 0
    probed_at: float = 0.0
    found: tuple | None = None              # the (QPN, GID) it answered from


class Migration:
    """Departures, probes and announcements on behalf (see the module doc)."""

    def __init__(self, agent) -> None:
        self.a = agent
        self.departed: dict[bytes, Departed] = {}
        self.watch = None
        self._fdb_gone: dict[bytes, tuple[int, float]] = {}     # VIF MAC -> (port, when) of its FDB removal
        self._ports_gone: dict[int, float] = {}

    # ---- the bridge behind eth4

    def start(self) -> None:
        """Watch the bridge in eth4's namespace (veth mode with VIF learning: where guests come and go)."""
        a = self.a
        if a.spec.mode != "veth" or a.vifs.learn_max <= 0:
            return
        from xdpoib import link

        try:
            self.watch = link.BridgeWatch(a.spec.netns)
        except XdpoibError as e:
            log.warning("guests leaving are noticed only when idle: %s", e)
            return
        a.stack.callback(self.watch.close)
        a.loop.add_reader(self.watch.fileno(), self.on_events)

    def on_events(self) -> None:
        now = time.monotonic()
        for ev in self.watch.read():
            if ev.kind == "fdb_new":
                self._fdb_gone.pop(ev.mac, None)
            elif ev.kind == "fdb_del":
                v = self.a.vifs.by_mac.get(ev.mac)
                if v is None or not v.learned:
                    continue
                if now - self._ports_gone.get(ev.ifindex, -1e9) < PAIR_S:
                    self.left(ev.mac, "its bridge port is gone")
                else:
                    self._fdb_gone[ev.mac] = (ev.ifindex, now)
            elif ev.kind == "port_up":
                self._ports_gone.pop(ev.ifindex, None)
            elif ev.kind == "port_gone":
                self._ports_gone[ev.ifindex] = now
                for mac, (port, t) in list(self._fdb_gone.items()):
                    if port == ev.ifindex and now - t < PAIR_S:
                        self.left(mac, "its bridge port is gone")
        self._fdb_gone = {m: pt for m, pt in self._fdb_gone.items() if now - pt[1] < PAIR_S}
        self._ports_gone = {p: t for p, t in self._ports_gone.items() if now - t < PAIR_S}

    def left(self, mac: bytes, why: str) -> None:
        """A learned guest left the bridge: release its VIF now (`removed` probes for it)."""
        self._fdb_gone.pop(mac, None)
        v = self.a.vifs.by_mac.get(mac)
        if v is None or not v.learned:
            return
        log.info("VIF %d: %s left (%s)", v.vif_id, mac_str(mac), why)
        self.a.vifs.remove(mac, why="left")

    # ---- hooks from vifs.py

    def removed(self, v, why: str) -> None:
        """A VIF was released: its guest's addresses are remembered (`added`) and, unless it only idled
        out, the guest is looked for on the fabric."""
        if why not in ("left", "deleted", "expired") or not v.addrs:
            return
        if len(self.departed) >= MAX_DEPARTED:
            del self.departed[min(self.departed, key=lambda m: self.departed[m].left)]
        d = Departed(v.mac, v.vid, set(v.addrs), (v.qp.qpn, v.gid))
        self.departed[v.mac] = d
        self.a.loop.call_later(DEPARTED_S + 1.0, self.expire)
        if why == "expired":
            d.probes = len(PROBE_AT)            # idle, not gone: nothing to look for
            return
        self.a.stats["guests_departed"] += 1
        self._probe(d)

    def added(self, v) -> None:
        """A VIF appeared: a guest that comes back here is announced with the addresses it had."""
        d = self.departed.pop(v.mac, None)
        if d is None or time.monotonic() - d.left > DEPARTED_S:
            return
        new = d.addrs - v.addrs
        v.addrs |= d.addrs
        if new:
            self.a.vifs.announce(v, new)
            self.a.stats["guests_returned"] += 1

    # ---- probing

    def _probe(self, d: Departed) -> None:
        a = self.a
        if self.departed.get(d.mac) is not d or d.found is not None:
            return
        if d.probes >= len(PROBE_AT):
            log.info("%s was not found on the fabric after %d probes", mac_str(d.mac), d.probes)
            a.stats["guests_not_found"] += 1
            return
        self._send_probes(d)
        d.probes += 1
        if d.probes < len(PROBE_AT):
            a.loop.call_later(max(0.0, d.left + PROBE_AT[d.probes] - time.monotonic()), lambda: self._probe(d))
        else:
            a.loop.call_later(0.5, lambda: self._probe(d))      # the last probe's answer has this long

    def _send_probes(self, d: Departed) -> None:
        """One ARP probe (sender IP 0.0.0.0) per IPv4 address of d, one NS from :: (as DAD) per IPv6 one."""
        a = self.a
        frames = []
        for x in d.addrs:
            if len(x) == 4:
                frames.append(f.eth(BROADCAST, a.mac, f.ETH_P_ARP, f.arp(f.ARPOP_REQUEST, a.mac, bytes(4), bytes(6), x),
                                    vid=d.vid or None))
            else:
                snm = bytes.fromhex("ff0200000000000000000001ff") + x[13:]
                frames.append(f.eth(b"\x33\x33" + snm[12:], a.mac, f.ETH_P_IPV6, f.nd_ns(UNSPECIFIED, snm, x),
                                    vid=d.vid or None))
        self._send(frames, d.vid)
        d.probed_at = time.monotonic()
        a.stats["migration_probes"] += len(frames)

    def arrival(self) -> None:
        """A RARP from the fabric: some guest just announced itself somewhere (qemu does so on the new host
        of a migration); a guest that left here may be that one, so it is probed for now, outside its
        schedule (at most every `HINT_GAP_S`)."""
        now = time.monotonic()
        for d in self.departed.values():
            if d.found is None and d.probes < len(PROBE_AT) and now - d.probed_at >= HINT_GAP_S:
                self.a.stats["migration_probes_on_rarp"] += 1
                self._send_probes(d)

    def _send(self, frames: list[bytes], vid: int) -> None:
        """Ethernet frames from VIF 0 (on the partition of `vid`), translated and sent to their groups."""
        a = self.a
        qp = a.partitions.of_vid(vid).qp if vid else a.qp
        for frame in frames:
            try:
                r = eth_to_ipoib(frame, a.peers)
            except FrameError as e:
                log.warning("migration frame not sent: %s", e)
                continue
            a.forwarder.send_group(r.mgid, [r.frame], qp=qp)

    # ---- answers (hooks from resolver.py, on frames from the fabric)

    def heard(self, addr: bytes, peer) -> None:
        """An ARP (sender) or NA (target) from the fabric named IP `addr` at `peer`: a departed guest
        that answers from its new place is announced on its behalf."""
        if peer is None:
            return
        for d in self.departed.values():
            if addr in d.addrs and d.found is None and peer.addr.key != d.old_key:
                self._found(d, peer)
                return

    def _found(self, d: Departed, peer) -> None:
        a = self.a
        d.found = peer.addr.key
        a.stats["guests_found"] += 1
        log.info("%s answers from QPN %#x (%.0f ms after it left): announcing it", mac_str(d.mac), peer.addr.qpn,
                 (time.monotonic() - d.left) * 1000)
        frames = []
        for x in sorted(d.addrs):
            if len(x) == 4:
                frames.append(f.eth(BROADCAST, a.mac, f.ETH_P_ARP,
                                    f.arp(f.ARPOP_REQUEST, peer.remac, x, bytes(6), x), vid=d.vid or None))
            else:
                frames.append(f.eth(b"\x33\x33\x00\x00\x00\x01", a.mac, f.ETH_P_IPV6,
                                    f.nd_na(x, ALL_NODES, x, tlla=peer.remac, solicited=False), vid=d.vid or None))

        def send(n: int) -> None:
            self._send(frames, d.vid)
            a.stats["announcements_on_behalf"] += len(frames)
            if n + 1 < ANNOUNCE_COUNT:
                a.loop.call_later(ANNOUNCE_GAP_S, lambda: send(n + 1))
        send(0)
        self.departed.pop(d.mac, None)          # it has a home again: the new host answers for it now

    def on_behalf(self, v, addr: bytes) -> None:
        """An announcement on behalf of our VIF v (another host found its guest here): v has `addr`,
        which v announces itself, from its own QP (what a peer takes without any doubt)."""
        if not v.vif_id or addr in v.addrs or len(v.addrs) >= 16 or not any(addr):
            return
        v.addrs.add(addr)
        self.a.stats["addresses_from_announcements"] += 1
        self.a.vifs.announce(v, [addr])

    def expire(self) -> None:
        now = time.monotonic()
        for mac in [m for m, d in self.departed.items() if now - d.left > DEPARTED_S]:
            del self.departed[mac]
