"""VIFs: the Ethernet endpoints behind eth4 (guests behind a bridge), each its own IPoIB endpoint.

As with eIPoIB, every VIF is one MAC behind eth4 with its own UD QP, so remote hosts see a distinct
(QPN, GID) per guest and its REMAC stands for that guest alone. VIF 0 is eth4's own MAC (veth mode)
or the guest's (tap mode) and its QP is the attachment's: the only one attached to multicast groups,
so received multicast and broadcast reach the bridge once and the bridge floods it to the guests.

VIFs come from `xdpoib vif add IFNAME MAC` (kept until `vif del`) or, with `attach --learn-vifs N`,
from the first frame a new source MAC sends (the TX program hands such frames to the agent instead
of dropping them; at most N are learned, then they are dropped and counted as `spoofed_source`).
A learned VIF idle longer than `--vif-idle` seconds is released: its QP destroyed, its map entries
removed. Each VIF's IPv4/IPv6 source addresses are noted from its ARP (and its first frame) and
announced on the fabric (gratuitous ARP from the VIF's own QP) when the VIF appears and when its
QPN changed (after an agent restart: VIFs come back from the state file with new QPs). A learned
guest that leaves the bridge (migrated) is released at once and looked for on the fabric
(`migration.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from xdpoib.errors import FrameError, UsageError, XdpoibError
from xdpoib.fabric.base import GRH_LEN
from xdpoib.reasons import DropReason as R
from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr, mac_str, parse_mac
from xdpoib.wire.oracle import Vif, eth_to_ipoib

log = logging.getLogger("xdpoib.agent")

VIF_BUFFERS = 512           # receive buffers of a guest's QP (unicast only: multicast goes to VIF 0)
MAX_VIFS = 1024             # the datapath's VIF table (abi.MAX_VIFS)
IDLE_CHECK_S = 1.0


@dataclass
class VifState:
    """One VIF as the agent keeps it."""

    vif_id: int
    mac: bytes
    qp: object
    learned: bool = False
    vid: int = 0
    gid: bytes = b""
    ovif: Vif | None = None                        # its oracle form (kept by Vifs._publish)
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    addrs: set = field(default_factory=set)        # IPv4/IPv6 addresses seen from it (announced)

    @property
    def oracle(self) -> Vif:
        return Vif(self.vif_id, self.mac, IPoIBAddr(0, self.qp.qpn, self.gid))

    def to_dict(self) -> dict:
        now = time.monotonic()
        return {"id": self.vif_id, "mac": mac_str(self.mac), "qpn": self.qp.qpn, "vlan": self.vid,
                "learned": self.learned, "idle_seconds": round(now - self.last_seen, 1),
                "addresses": sorted(_addr_str(a) for a in self.addrs)}


def _addr_str(a: bytes) -> str:
    from ipaddress import ip_address

    return str(ip_address(a))


class Vifs:
    """The attachment's VIFs (see the module doc). VIF 0 is set up by the agent's bring-up."""

    def __init__(self, agent, learn_max: int = 0, idle_s: float = 300.0) -> None:
        self.a = agent
        self.learn_max, self.idle_s = learn_max, idle_s
        self.by_id: dict[int, VifState] = {}
        self.by_mac: dict[bytes, VifState] = {}
        self._next_id = 1

    # ---- table

    def primary(self, qp, mac: bytes) -> VifState:
        """VIF 0: eth4's own MAC and the attachment's QP."""
        v = VifState(0, mac, qp, gid=self.a.port_attrs.gid)
        self._put(v)
        v.ovif = v.oracle
        return v

    def set_primary_mac(self, mac: bytes) -> None:
        """TAP mode: VIF 0 becomes the guest's MAC once it is seen."""
        v = self.by_id[0]
        self.by_mac.pop(v.mac, None)
        v.mac = mac
        self.by_mac[mac] = v
        self._publish()

    def _put(self, v: VifState) -> None:
        self.by_id[v.vif_id] = v
        self.by_mac[v.mac] = v

    def by_key(self, key: tuple) -> VifState | None:
        """The VIF whose IPoIB address is key (QPN, GID), if one is."""
        for v in self.by_id.values():
            if v.qp.qpn == key[0] and v.gid == key[1]:
                return v
        return None

    def qp(self, vif_id: int):
        v = self.by_id.get(vif_id)
        return None if v is None else v.qp

    def count(self) -> int:
        return len(self.by_id)

    def learned_count(self) -> int:
        return sum(1 for v in self.by_id.values() if v.learned)

    def _publish(self) -> None:
        """The agent's tables (oracle, loopback filter) follow the VIF set."""
        a = self.a
        for v in self.by_id.values():
            v.ovif = v.oracle
        vifs = [v.ovif for v in sorted(self.by_id.values(), key=lambda v: v.vif_id)]
        a.vif = vifs[0]
        a.peers.set_vifs(vifs)
        a.loopback.qpns = {v.qp.qpn for v in self.by_id.values()} | {q.qpn for q in a.partitions.extra_qps()}

    # ---- add and remove

    def add(self, mac: bytes, vid: int = 0, learned: bool = False, vif_id: int | None = None) -> VifState:
        """A new VIF with its own QP, installed in the maps; refused (UsageError) before any change
        when the MAC is taken, multicast or zero, the VLAN has no partition, or the table is full."""
        a = self.a
        if mac in self.by_mac:
            raise UsageError(f"{mac_str(mac)} is already a VIF of {a.spec.where}")
        if mac[0] & 1 or not any(mac):
            raise UsageError(f"{mac_str(mac)} is not a unicast MAC")
        if vid not in a.peers.vlan_pkeys:
            raise UsageError(f"VLAN {vid} is not mapped to a partition on {a.spec.where}")
        if len(self.by_id) >= MAX_VIFS:
            raise UsageError(f"{a.spec.where} has {MAX_VIFS} VIFs already")
        if a.peers.remacs.lookup(mac) is not None:
            raise UsageError(f"{mac_str(mac)} is the REMAC of a remote peer")
        part = a.partitions.of_vid(vid)
        pool = a.backend.alloc_pool(VIF_BUFFERS, GRH_LEN + max(a.ib_mtu, a.port_attrs.active_mtu))
        qp = a.backend.create_qp(part.pkey, part.qkey, pool)
        try:
            qp.post_recv(range(VIF_BUFFERS))
            if vif_id is None or vif_id in self.by_id:
                while self._next_id in self.by_id:
                    self._next_id += 1
                vif_id = self._next_id
            self._next_id = max(self._next_id, vif_id + 1)
            v = VifState(vif_id, mac, qp, learned=learned, vid=vid, gid=a.port_attrs.gid)
            self._put(v)
            self._publish()
            a.pump.add_vifs([v.ovif])
            a.wire_qp(qp)
        except BaseException:
            if self.by_mac.get(mac) is not None:
                del self.by_id[self.by_mac.pop(mac).vif_id]
            qp.close()
            raise
        a.stats["vifs_added"] += 1
        self._save()
        log.info("VIF %d: %s, QPN %#x%s", vif_id, mac_str(mac), qp.qpn, " (learned)" if learned else "")
        a.migration.added(v)            # a guest that left and came back: announced at once
        return v

    def remove(self, mac: bytes, why: str = "deleted") -> VifState:
        """Remove a VIF (not VIF 0): map entries, its QP, its place in the tables."""
        a = self.a
        v = self.by_mac.get(mac)
        if v is None:
            raise UsageError(f"{mac_str(mac)} is not a VIF of {a.spec.where}")
        if v.vif_id == 0:
            raise UsageError(f"{mac_str(mac)} is {a.spec.ifname}'s own MAC (VIF 0): detach instead")
        a.pump.remove_vifs([v.ovif])
        del self.by_id[v.vif_id]
        del self.by_mac[v.mac]
        a.unwire_qp(v.qp)
        self._publish()
        v.qp.close()
        a.stats[f"vifs_{why}"] += 1
        self._save()
        log.info("VIF %d: %s %s", v.vif_id, mac_str(mac), why)
        a.migration.removed(v, why)     # a guest gone elsewhere: looked for (migration.py)
        return v

    def _save(self) -> None:
        from xdpoib.agent import service

        if self.a.state == "running":
            service.save_state(self.a)

    def replace_qp(self, v: VifState) -> VifState:
        """A guest's QP went into the error state: the VIF gets a new QP (new QPN) and is announced."""
        addrs = set(v.addrs)
        self.remove(v.mac, why="qp_replaced")
        n = self.add(v.mac, v.vid, v.learned, vif_id=v.vif_id)
        n.addrs = addrs
        self.announce(n, addrs)
        return n

    def close(self) -> None:
        """Teardown: close every guest's QP (VIF 0's belongs to the agent)."""
        for v in list(self.by_id.values()):
            if v.vif_id:
                v.qp.close()

    # ---- learning, addresses, idle

    def learn(self, frame: bytes) -> VifState | None:
        """A frame from an unknown source MAC (the TX program's learning mode): a new VIF if allowed."""
        a = self.a
        src = bytes(frame[6:12])
        if self.learn_max <= 0 or self.learned_count() >= self.learn_max or src[0] & 1 or not any(src):
            a.drops[R.SPOOFED_SOURCE] += 1
            return None
        vid = 0
        try:
            vid = f.parse_eth(frame).vid or 0
        except FrameError:
            pass
        try:
            v = self.add(src, vid, learned=True)
        except XdpoibError as e:
            a.drops[R.SPOOFED_SOURCE] += 1
            log.warning("not learning %s: %s", mac_str(src), e)
            return None
        self.note(v, frame, ethernet=True)
        return v

    def note(self, v: VifState, frame: bytes, ethernet: bool = False) -> None:
        """The source address of a VIF's frame (ARP sender, IPv4/IPv6 source): announced when new."""
        o = 14 if ethernet else 4
        et = bytes(frame[o - 2:o]) if ethernet else bytes(frame[0:2])
        addr = None
        if et in (b"\x08\x06", b"\x80\x35"):
            hlen = frame[o + 4] if len(frame) > o + 5 else 0
            if len(frame) >= o + 8 + hlen + 4:
                addr = bytes(frame[o + 8 + hlen:o + 12 + hlen])
        elif et == b"\x08\x00" and len(frame) >= o + 20:
            addr = bytes(frame[o + 12:o + 16])
        elif et == b"\x86\xdd" and len(frame) >= o + 40:
            addr = bytes(frame[o + 8:o + 24])
        if not addr or not any(addr) or addr in v.addrs or len(v.addrs) >= 16:
            return
        v.addrs.add(addr)
        if v.vif_id:
            self.announce(v, [addr])

    def announce(self, v: VifState, addrs, ipv6: bool = False) -> None:
        """Gratuitous ARP (IPv4) for a guest's addresses, from its own QP, so peers learn its QPN; with
        ipv6, also unsolicited NAs (else the guest's own ND, DAD or its NA, carries those)."""
        a = self.a
        from xdpoib.agent.links import ALL_NODES

        for addr in addrs:
            if len(addr) == 16 and ipv6:
                frame = f.eth(b"\x33\x33\x00\x00\x00\x01", v.mac, f.ETH_P_IPV6,
                              f.nd_na(addr, ALL_NODES, addr, tlla=v.mac, solicited=False))
            elif len(addr) != 4:
                continue
            else:
                frame = f.eth(b"\xff" * 6, v.mac, f.ETH_P_ARP, f.arp(f.ARPOP_REQUEST, v.mac, addr, b"\0" * 6, addr))
            try:
                r = eth_to_ipoib(frame, a.peers)
            except FrameError:
                continue
            a.forwarder.send_group(r.mgid, [r.frame], qp=v.qp)
            a.stats["announcements"] += 1

    def seen(self, vif_id: int, now: float) -> VifState | None:
        v = self.by_id.get(vif_id)
        if v is not None:
            v.last_seen = now
        return v

    def expire(self) -> None:
        """Release learned VIFs idle longer than idle_s."""
        if self.idle_s <= 0:
            return
        now = time.monotonic()
        for v in [v for v in self.by_id.values() if v.learned and now - v.last_seen > self.idle_s]:
            self.remove(v.mac, why="expired")

    # ---- control requests and persistence

    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "vifs":
            return {"vifs": [v.to_dict() for v in sorted(self.by_id.values(), key=lambda v: v.vif_id)],
                    "learn": self.learn_max, "idle_seconds": self.idle_s}
        try:
            mac = parse_mac(str(req.get("mac", "")))
        except (XdpoibError, ValueError) as e:
            raise UsageError(f"bad MAC {req.get('mac')!r}: {e}") from None
        if cmd == "vif_add":
            vid = int(req.get("vlan") or 0)
            v = self.add(mac, vid)
            return {"vif": v.to_dict()}
        if cmd == "vif_del":
            v = self.remove(mac)
            return {"vif": v.to_dict()}
        raise UsageError(f"unknown request {cmd!r}")

    def announce_all(self) -> None:
        """Every guest's known addresses, both families (a restart: every VIF has a new QPN; in TAP mode
        VIF 0 is a guest too)."""
        tap = self.a.spec.mode == "tap"         # VIF 0 is the guest then (veth: eth4, the Announcer's)
        for v in list(self.by_id.values()):
            if (v.vif_id or tap) and v.addrs:
                self.announce(v, v.addrs, ipv6=True)

    def to_json(self) -> list[dict]:
        return [{"id": v.vif_id, "mac": mac_str(v.mac), "vlan": v.vid, "learned": v.learned,
                 "addresses": sorted(_addr_str(x) for x in v.addrs)}
                for v in self.by_id.values() if v.vif_id]

    def restore(self, items: list[dict]) -> None:
        """VIFs of a previous agent: back with new QPs (so announced again, IPv6 included)."""
        from ipaddress import ip_address

        for it in items:
            try:
                v = self.add(parse_mac(it["mac"]), int(it.get("vlan", 0)), bool(it.get("learned")),
                             vif_id=int(it["id"]))
            except (XdpoibError, KeyError, ValueError) as e:
                log.warning("VIF %s not restored: %s", it.get("mac"), e)
                continue
            v.addrs = {ip_address(x).packed for x in it.get("addresses", [])}
            self.announce(v, v.addrs, ipv6=True)        # the guest does not know its QPN changed
