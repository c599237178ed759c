"""A native IPoIB host on the sim fabric: what a Linux `ib0` does, as far as xdpoib's peers see it.

`NativePeer` owns one port of a sim fabric (this process must be that host's umad client) and behaves
like Linux ipoib in datagram mode with connected mode advertised:

- bring-up: read the port, join the partition's broadcast group (its Q_Key, MTU and SL are the link's),
  create one UD QP, then join the all-nodes group and the solicited-node group of every IPv6 address
  (created with the broadcast group's parameters if they do not exist, as ipoib does); its hardware
  address is flags 0x80 + QPN + port GID; its IPv6 link-local address comes from the port GUID.
- IPv4: ARP with 20-octet addresses (requests to the broadcast group with a 20-zero-octet target
  address, replies unicast to the sender's address), RFC 826's merge rule for the cache, at most 3
  packets held per unresolved neighbour, 3 requests a second apart; ICMP echo responder and client;
  UDP echo (RFC 862) on `echo_port`; an RFC 4390 DHCP client.
- IPv6: NS to the target's solicited-node group (a send-only join first, as ipoib does for a group it
  only sends to) with a 24-octet source option, NA answers with the target option; ICMPv6 echo
  responder and client; UDP echo.
- unicast needs a PathRecord to the destination GID first (cached per GID); unicast goes without a GRH,
  multicast with one; a datagram bigger than the path MTU is not sent.

Every frame received is decoded by `xdpoib.native.wire` (never by xdpoib's translator) and reported
through `emit` as an event, with what the completion said about its transport (source QPN, SLID,
GRH); requests (`ping`, `udp`, `status`, ...) come in as dicts and are answered through `emit` too,
the long ones once they finish. Nothing here blocks except the SA queries, which ibsim answers in
well under a millisecond.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from xdpoib.errors import XdpoibError
from xdpoib.native import wire as w

log = logging.getLogger("xdpoib.native")

RECV_BUFFERS = 256
MAX_HELD = 3                  # packets kept per neighbour being resolved
RESOLVE_TRIES, RESOLVE_EVERY = 3, 1.0
DHCP_TRIES = 6
EVENTS_KEPT = 2000
JOIN_FULL = 1


class NativeError(XdpoibError):
    """The native peer could not come up or was asked something it cannot do."""


@dataclass
class Neighbour:
    addr: w.IbAddr
    updated: float


@dataclass
class Resolving:
    """A neighbour whose address we asked for, with what waits for the answer."""

    held: deque = field(default_factory=lambda: deque(maxlen=MAX_HELD))   # (ethertype, packet)
    tries: int = 0
    next_at: float = 0.0


@dataclass
class Group:
    mgid: bytes
    join_state: int
    ah: object
    qkey: int
    attached: bool = False


@dataclass
class Ping:
    req_id: object
    dst: bytes
    ident: int
    count: int
    interval: float
    deadline: float
    data: bytes
    sent: dict[int, float] = field(default_factory=dict)
    rtts: dict[int, float] = field(default_factory=dict)
    next_seq: int = 1
    next_at: float = 0.0


@dataclass
class UdpWait:
    req_id: object
    dst: bytes
    port: int
    deadline: float


@dataclass
class DhcpClient:
    """RFC 2131's client states, as far as INIT -> SELECTING -> REQUESTING -> BOUND."""

    state: str = "init"
    xid: int = 0
    tries: int = 0
    next_at: float = 0.0
    offer: w.Dhcp | None = None
    lease: dict | None = None
    req_ids: list = field(default_factory=list)


def _ip_text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


class NativePeer:
    """One native host on the sim fabric; see the module doc."""

    def __init__(self, fabric: str, *, pkey: int = w.DEFAULT_PKEY, ip4: str | None = None,
                 ip6: tuple[str, ...] = (), dhcp: bool = False, echo_port: int = 7,
                 emit: Callable[[dict], None] = lambda ev: None):
        self.fabric = fabric
        self.pkey = pkey | 0x8000
        self.emit = emit
        self.echo_port = echo_port
        self.ip4: ipaddress.IPv4Interface | None = ipaddress.IPv4Interface(ip4) if ip4 else None
        self.ip6_extra = [ipaddress.IPv6Interface(a) for a in ip6]
        self.want_dhcp = dhcp
        self.arp: dict[bytes, Neighbour] = {}
        self.nd: dict[bytes, Neighbour] = {}
        self.resolving: dict[bytes, Resolving] = {}
        self.paths: dict[bytes, tuple[object, int]] = {}
        self.groups: dict[bytes, Group] = {}
        self.pings: dict[int, Ping] = {}
        self.udp_waits: dict[int, UdpWait] = {}
        self.dhcp = DhcpClient()
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.seq = 0
        self.counts: dict[str, int] = {}
        self.sa = self.backend = self.qp = None
        self.stopping = False

    # ================================================================================ bring-up

    def open(self) -> None:
        """Come up on the fabric; raise NativeError (with everything opened closed again) on failure."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        from xdpoib.fabric.base import GRH_LEN, LoopbackFilter
        from xdpoib.fabric.sa import SAClient, SAError
        from xdpoib.fabric.simud import SimUdBackend

        self.sa = SAClient.open(sm_key=1)
        deadline = time.monotonic() + 30
        port = self.sa.port()
        while not (port.active and port.lid):
            if time.monotonic() > deadline:
                raise NativeError(f"port is {port.state_name} (LID {port.lid}) after 30 s")
            time.sleep(0.2)
            port = self.sa.port()
        if not any(p & 0x7FFF == self.pkey & 0x7FFF for p in port.pkeys):
            raise NativeError(f"this port is not in partition {self.pkey:#06x}")
        self.backend = SimUdBackend.open(self.fabric, sa=self.sa)
        self.attrs = self.backend.port()
        self.guid = self.attrs.port_guid
        self.gid = self.attrs.gid
        bcast = w.mgid_ipv4(w.IPV4_BROADCAST, self.pkey)
        try:
            self.bcast = self.sa.join(bcast, JOIN_FULL)
        except SAError as e:
            raise NativeError(f"cannot join the broadcast group of partition {self.pkey:#06x}: {e}") from None
        self.qkey = self.bcast.qkey
        self.mtu = min(self.bcast.mtu_bytes or 2048, self.attrs.active_mtu)
        pool = self.backend.alloc_pool(RECV_BUFFERS, GRH_LEN + self.attrs.active_mtu)
        self.qp = self.backend.create_qp(self.pkey, self.qkey, pool)
        self.qp.post_recv(range(RECV_BUFFERS))
        self.loopback = LoopbackFilter(self.attrs, [self.qp.qpn])
        self.addr = w.IbAddr(w.FLAG_CONNECTED, self.qp.qpn, self.gid)
        self._add_group(bcast, self.bcast, JOIN_FULL)
        self.ip6 = [ipaddress.IPv6Interface((w.link_local(self.guid), 64)), *self.ip6_extra]
        self._join(w.mgid_ipv6(w.ALL_NODES, self.pkey))
        for a in self.ip6:
            self._join(w.mgid_ipv6(w.solicited_node(a.ip.packed), self.pkey))
        if self.want_dhcp:
            self.dhcp_start(None)

    def close(self) -> None:
        """Leave the groups, destroy the QP, close the port and the SA client (idempotent)."""
        for g in list(self.groups.values()):
            try:
                if self.qp is not None and g.attached:
                    self.qp.detach_mcast(g.mgid, g.ah.path.dlid)
                self.sa.leave(g.mgid, g.join_state)
            except XdpoibError as e:
                log.debug("leaving %s: %s", _ip_text(g.mgid), e)
        self.groups.clear()
        for thing in ("qp", "backend", "sa"):
            obj = getattr(self, thing, None)
            if obj is not None:
                try:
                    obj.close()
                except XdpoibError as e:
                    log.debug("closing the %s: %s", thing, e)
                setattr(self, thing, None)

    # ================================================================================ the fabric

    def _add_group(self, mgid: bytes, rec, join_state: int) -> Group:
        from xdpoib.fabric.base import Path

        path = Path(dlid=rec.mlid, sl=rec.sl, mtu=rec.mtu_bytes or 2048, dgid=mgid, grh=True,
                    hop_limit=rec.hop_limit or 1, traffic_class=rec.tclass, flow_label=rec.flow_label)
        g = Group(mgid, join_state, self.backend.create_ah(path), rec.qkey or self.qkey)
        if join_state == JOIN_FULL:
            self.qp.attach_mcast(mgid, rec.mlid)
            g.attached = True
        self.groups[mgid] = g
        return g

    def _join(self, mgid: bytes) -> Group:
        """Join a group as a full member (created with the broadcast group's parameters if need be)."""
        g = self.groups.get(mgid)
        if g is not None and g.join_state == JOIN_FULL:
            return g
        rec = self.sa.join(mgid, JOIN_FULL, create=self.bcast)
        if g is not None:               # was send-only: now a full member too
            self.groups.pop(mgid)
        return self._add_group(mgid, rec, JOIN_FULL)

    def _group_for_send(self, mgid: bytes) -> Group | None:
        """A group we are in, or a send-only join of it; None if the SA refuses."""
        from xdpoib.fabric.sa import SAError

        g = self.groups.get(mgid)
        if g is not None:
            return g
        try:
            rec = self.sa.join_send_only(mgid, create=self.bcast)
        except SAError as e:
            self._count("send_only_join_failed")
            log.info("send-only join of %s refused: %s", _ip_text(mgid), e)
            return None
        return self._add_group(mgid, rec, rec.join_state or self.sa.send_only_join_state())

    def _path_to(self, gid: bytes):
        """(address handle, path MTU) to a unicast GID, from a PathRecord (cached)."""
        from xdpoib.fabric.base import Path
        from xdpoib.fabric.sa import SAError

        hit = self.paths.get(gid)
        if hit is not None:
            return hit
        try:
            rec = self.sa.path(gid, pkey=self.pkey)
        except SAError as e:
            self._count("path_failed")
            log.info("no path to %s: %s", _ip_text(gid), e)
            return None
        mtu = rec.mtu_bytes or 2048
        hit = (self.backend.create_ah(Path(dlid=rec.dlid, sl=rec.sl, mtu=mtu, grh=False)), mtu)
        self.paths[gid] = hit
        self._count("paths_resolved")
        return hit

    def _send_unicast(self, ethertype: int, packet: bytes, to: w.IbAddr) -> bool:
        from xdpoib.fabric.base import SendRequest

        hit = self._path_to(to.gid)
        if hit is None:
            return False
        ah, mtu = hit
        frame = w.encap(ethertype, packet)
        if len(frame) > min(mtu, self.mtu):
            self._count("too_big")
            return False
        self.qp.post_send([SendRequest(ah, to.qpn, self.qkey, frame)])
        self._count("sent_unicast")
        return True

    def _send_group(self, ethertype: int, packet: bytes, mgid: bytes) -> bool:
        from xdpoib.fabric.base import SendRequest

        g = self._group_for_send(mgid)
        if g is None:
            return False
        frame = w.encap(ethertype, packet)
        if len(frame) > min(g.ah.path.mtu, self.mtu):
            self._count("too_big")
            return False
        self.qp.post_send([SendRequest(g.ah, w.MULTICAST_QPN, g.qkey, frame)])
        self._count("sent_multicast")
        return True

    def fileno(self) -> int:
        return self.qp.fileno()

    def receive(self) -> int:
        """Handle every completion waiting; return how many there were."""
        done = 0
        while True:
            comps = self.qp.poll(64)
            if not comps:
                return done
            done += len(comps)
            for c in self.loopback.filter(comps):
                if c.status == 0:
                    self._frame(bytes(c.payload[:c.byte_len]), c)
                else:
                    self._count("completion_error")
            self.qp.post_recv([c.index for c in comps])

    # ================================================================================ receive

    def _frame(self, frame: bytes, c) -> None:
        via = {"src_qpn": c.src_qp, "slid": c.slid, "grh": bool(c.has_grh)}
        if c.has_grh:
            via["sgid"] = _ip_text(c.sgid)
        try:
            ethertype, body = w.decap(frame)
            if ethertype == w.ETHERTYPE_ARP:
                self._arp_in(w.Arp.unpack(body), via)
            elif ethertype == w.ETHERTYPE_IPV4:
                self._ipv4_in(w.ipv4_unpack(body), via)
            elif ethertype == w.ETHERTYPE_IPV6:
                self._ipv6_in(w.ipv6_unpack(body), via)
            else:
                self._rx("other", f"EtherType {ethertype:#06x}", via)
        except w.WireError as e:
            self._count("discarded")
            self._rx("discarded", str(e), via, error=str(e))

    def _rx(self, kind: str, summary: str, via: dict, **fields) -> None:
        self.seq += 1
        ev = {"event": "rx", "n": self.seq, "kind": kind, "summary": summary, **via, **fields}
        self.events.append(ev)
        self.emit(ev)

    # ---- ARP (RFC 826's merge, RFC 4391 section 9.2)

    def _arp_in(self, a: w.Arp, via: dict) -> None:
        sha = w.IbAddr.unpack(a.sha)
        tha = w.IbAddr.unpack(a.tha)
        what = {w.ARP_REQUEST: "request", w.ARP_REPLY: "reply"}.get(a.op, f"op {a.op}")
        self._rx("arp", f"arp {what} {_ip_text(a.spa)} is {sha} -> {_ip_text(a.tpa)} ({tha})", via,
                 op=what, spa=_ip_text(a.spa), tpa=_ip_text(a.tpa), sha=str(sha), tha=str(tha),
                 sha_flags=sha.flags)
        if sha.who == self.addr.who or a.spa == w.IPV4_ANY:
            return
        merged = a.spa in self.arp
        if merged:
            self.arp[a.spa] = Neighbour(sha, time.monotonic())
        mine = self.ip4 is not None and a.tpa == self.ip4.ip.packed
        if not mine:
            return
        if not merged:
            self.arp[a.spa] = Neighbour(sha, time.monotonic())
        self._resolved(a.spa)
        if a.op == w.ARP_REQUEST:
            reply = w.Arp(w.ARP_REPLY, self.addr.pack(), a.tpa, a.sha, a.spa)
            self._send_unicast(w.ETHERTYPE_ARP, reply.pack(), sha)

    def _arp_request(self, ip: bytes) -> None:
        spa = self.ip4.ip.packed if self.ip4 else w.IPV4_ANY
        req = w.Arp(w.ARP_REQUEST, self.addr.pack(), spa, bytes(w.ADDR_LEN), ip)
        self._send_group(w.ETHERTYPE_ARP, req.pack(), w.mgid_ipv4(w.IPV4_BROADCAST, self.pkey))

    # ---- IPv4

    def _mine4(self, dst: bytes) -> bool:
        if dst == w.IPV4_BROADCAST:
            return True
        if self.ip4 is None:
            return False
        return dst in (self.ip4.ip.packed, self.ip4.network.broadcast_address.packed)

    def _ipv4_in(self, ip: w.Ipv4, via: dict) -> None:
        src, dst = _ip_text(ip.src), _ip_text(ip.dst)
        if ip.proto == w.PROTO_UDP and not ip.fragment:
            sport, dport, data = w.udp_unpack(ip.src, ip.dst, ip.payload)
            self._rx("udp", f"udp {src}:{sport} > {dst}:{dport} {len(data)} bytes", via, src=src, dst=dst,
                     sport=sport, dport=dport, data=data.hex())
            if dport == w.DHCP_CLIENT_PORT:
                self._dhcp_in(w.Dhcp.unpack(data))
            elif self._mine4(ip.dst) and dport == self.echo_port:
                self.send_ip(ip.src, w.PROTO_UDP, w.udp_pack(ip.dst, ip.src, dport, sport, data))
            elif dport in self.udp_waits and ip.dst == (self.ip4.ip.packed if self.ip4 else None):
                self._udp_answer(dport, ip.src, sport, data)
            return
        if not self._mine4(ip.dst):
            self._rx("ipv4", f"ipv4 {src} > {dst} proto {ip.proto} (not ours)", via, src=src, dst=dst)
            return
        if ip.proto == w.PROTO_ICMP:
            kind, _code, rest = w.icmp_unpack(ip.payload)
            ident, seq = int.from_bytes(rest[:2], "big"), int.from_bytes(rest[2:4], "big")
            self._rx("icmp", f"icmp type {kind} {src} > {dst} id {ident} seq {seq}", via, src=src, dst=dst,
                     type=kind, id=ident, seq=seq)
            if kind == w.ICMP_ECHO_REQUEST and self.ip4 is not None and ip.dst == self.ip4.ip.packed:
                self.send_ip(ip.src, w.PROTO_ICMP, w.icmp_echo_pack(w.ICMP_ECHO_REPLY, ident, seq, rest[4:]))
            elif kind == w.ICMP_ECHO_REPLY:
                self._echo_answer(ident, seq, ip.src)
        else:
            self._rx("ipv4", f"ipv4 {src} > {dst} proto {ip.proto}", via, src=src, dst=dst)

    def send_ip(self, dst: bytes, proto: int, payload: bytes) -> None:
        """Send an IPv4 packet (from our address, or 0.0.0.0 without one) or an IPv6 one (16-octet dst)."""
        if len(dst) == 16:
            src = self._source6(dst)
            self._out6(dst, w.ipv6_pack(src, dst, proto, payload))
            return
        src = self.ip4.ip.packed if self.ip4 else w.IPV4_ANY
        pkt = w.ipv4_pack(src, dst, proto, payload, ident=random.randrange(65536))
        if dst == w.IPV4_BROADCAST or (self.ip4 and dst == self.ip4.network.broadcast_address.packed):
            self._send_group(w.ETHERTYPE_IPV4, pkt, w.mgid_ipv4(w.IPV4_BROADCAST, self.pkey))
        elif dst[0] & 0xF0 == 0xE0:
            self._send_group(w.ETHERTYPE_IPV4, pkt, w.mgid_ipv4(dst, self.pkey))
        else:
            self._to_neighbour(dst, w.ETHERTYPE_IPV4, pkt)

    # ---- IPv6

    def _source6(self, dst: bytes) -> bytes:
        want = ipaddress.IPv6Address(dst)
        for a in self.ip6:
            if want in a.network:
                return a.ip.packed
        return self.ip6[0].ip.packed

    def _mine6(self, dst: bytes) -> bool:
        if dst == w.ALL_NODES:
            return True
        return any(dst in (a.ip.packed, w.solicited_node(a.ip.packed)) for a in self.ip6)

    def _ipv6_in(self, ip: w.Ipv6, via: dict) -> None:
        src, dst = _ip_text(ip.src), _ip_text(ip.dst)
        if not self._mine6(ip.dst):
            self._rx("ipv6", f"ipv6 {src} > {dst} (not ours)", via, src=src, dst=dst)
            return
        if ip.next_header == w.PROTO_UDP:
            sport, dport, data = w.udp_unpack(ip.src, ip.dst, ip.payload)
            self._rx("udp6", f"udp {src}.{sport} > {dst}.{dport} {len(data)} bytes", via, src=src, dst=dst,
                     sport=sport, dport=dport, data=data.hex())
            if dport == self.echo_port and ip.dst[0] != 0xFF:
                self.send_ip(ip.src, w.PROTO_UDP, w.udp_pack(ip.dst, ip.src, dport, sport, data))
            elif dport in self.udp_waits:
                self._udp_answer(dport, ip.src, sport, data)
            return
        if ip.next_header != w.PROTO_ICMPV6:
            self._rx("ipv6", f"ipv6 {src} > {dst} next header {ip.next_header}", via, src=src, dst=dst)
            return
        kind, code, body = w.icmpv6_unpack(ip.src, ip.dst, ip.payload)
        if kind in (w.ND_NEIGHBOR_SOLICIT, w.ND_NEIGHBOR_ADVERT) and ip.hop_limit == 255 and code == 0:
            self._nd_in(ip, w.nd_unpack(kind, body), via)
        elif kind in (w.ICMPV6_ECHO_REQUEST, w.ICMPV6_ECHO_REPLY):
            ident, seq = int.from_bytes(body[:2], "big"), int.from_bytes(body[2:4], "big")
            self._rx("icmp6", f"icmp6 type {kind} {src} > {dst} id {ident} seq {seq}", via, src=src, dst=dst,
                     type=kind, id=ident, seq=seq)
            if kind == w.ICMPV6_ECHO_REQUEST and ip.dst[0] != 0xFF:
                reply = w.icmpv6_pack(ip.dst, ip.src, w.ICMPV6_ECHO_REPLY, 0, body)
                self._out6(ip.src, w.ipv6_pack(ip.dst, ip.src, w.PROTO_ICMPV6, reply))
            elif kind == w.ICMPV6_ECHO_REPLY:
                self._echo_answer(ident, seq, ip.src)
        else:
            self._rx("icmp6", f"icmp6 type {kind} {src} > {dst}", via, src=src, dst=dst, type=kind)

    def _nd_in(self, ip: w.Ipv6, nd: w.Nd, via: dict) -> None:
        name = "ns" if nd.kind == w.ND_NEIGHBOR_SOLICIT else "na"
        opt = nd.lladdr.get(w.ND_OPT_SOURCE_LLADDR if name == "ns" else w.ND_OPT_TARGET_LLADDR)
        self._rx(name, f"{name} {_ip_text(ip.src)} > {_ip_text(ip.dst)} target {_ip_text(nd.target)} "
                 f"lladdr {opt}", via, src=_ip_text(ip.src), dst=_ip_text(ip.dst), target=_ip_text(nd.target),
                 lladdr=str(opt) if opt else None, lladdr_flags=opt.flags if opt else None,
                 other_option_lengths=list(nd.other_lengths))
        if name == "ns":
            if not any(nd.target == a.ip.packed for a in self.ip6):
                return
            if ip.src != bytes(16) and opt is not None:
                self.nd[ip.src] = Neighbour(opt, time.monotonic())
                self._resolved(ip.src)
            to = ip.src if ip.src != bytes(16) else w.ALL_NODES
            self._out6(to, w.nd_pack_na(nd.target, to, nd.target, self.addr, solicited=to != w.ALL_NODES))
        elif opt is not None and (nd.target in self.nd or nd.target in self.resolving):
            self.nd[nd.target] = Neighbour(opt, time.monotonic())
            self._resolved(nd.target)

    def _out6(self, dst: bytes, pkt: bytes) -> None:
        if dst[0] == 0xFF:
            self._send_group(w.ETHERTYPE_IPV6, pkt, w.mgid_ipv6(dst, self.pkey))
        else:
            self._to_neighbour(dst, w.ETHERTYPE_IPV6, pkt)

    def _solicit(self, target: bytes) -> None:
        group = w.solicited_node(target)
        self._send_group(w.ETHERTYPE_IPV6, w.nd_pack_ns(self._source6(target), group, target, self.addr),
                         w.mgid_ipv6(group, self.pkey))

    # ---- neighbours

    def _to_neighbour(self, dst: bytes, ethertype: int, pkt: bytes) -> None:
        cache = self.nd if len(dst) == 16 else self.arp
        n = cache.get(dst)
        if n is not None:
            self._send_unicast(ethertype, pkt, n.addr)
            return
        r = self.resolving.get(dst)
        if r is None:
            r = self.resolving[dst] = Resolving()
        r.held.append((ethertype, pkt))
        if r.tries == 0:
            self._ask(dst, r)

    def _ask(self, dst: bytes, r: Resolving) -> None:
        r.tries += 1
        r.next_at = time.monotonic() + RESOLVE_EVERY
        if len(dst) == 16:
            self._solicit(dst)
        else:
            self._arp_request(dst)

    def _resolved(self, ip: bytes) -> None:
        r = self.resolving.pop(ip, None)
        if r is None:
            return
        n = (self.nd if len(ip) == 16 else self.arp)[ip]
        for ethertype, pkt in r.held:
            self._send_unicast(ethertype, pkt, n.addr)

    # ================================================================================ timers

    def tick(self, now: float) -> float:
        """Run what is due; return when to be called next."""
        nxt = now + 1.0
        for ip, r in list(self.resolving.items()):
            if r.next_at <= now:
                if r.tries >= RESOLVE_TRIES:
                    del self.resolving[ip]
                    self._count("unresolved")
                    continue
                self._ask(ip, r)
            nxt = min(nxt, r.next_at)
        for ident, p in list(self.pings.items()):
            if p.next_seq <= p.count and p.next_at <= now:
                self._echo_send(p, now)
            if now >= p.deadline or len(p.rtts) == p.count:
                del self.pings[ident]
                self._reply(p.req_id, {"dst": _ip_text(p.dst), "sent": len(p.sent), "received": len(p.rtts),
                                       "rtt_ms": [round(v * 1000, 3) for _, v in sorted(p.rtts.items())]})
                continue
            nxt = min(nxt, p.deadline, p.next_at if p.next_seq <= p.count else nxt)
        for port, u in list(self.udp_waits.items()):
            if now >= u.deadline:
                del self.udp_waits[port]
                self._reply(u.req_id, {"dst": _ip_text(u.dst), "port": u.port, "reply": None})
            else:
                nxt = min(nxt, u.deadline)
        d = self.dhcp
        if d.state in ("selecting", "requesting") and d.next_at <= now:
            if d.tries >= DHCP_TRIES:
                d.state = "failed"
                self._dhcp_done({"state": "failed", "error": f"no answer after {d.tries} tries"})
            else:
                self._dhcp_send(now)
        if d.state in ("selecting", "requesting"):
            nxt = min(nxt, d.next_at)
        return nxt

    # ================================================================================ requests

    def _reply(self, req_id, result: dict, ok: bool = True) -> None:
        self.emit({"id": req_id, "ok": ok, **({"result": result} if ok else result)})

    def request(self, req: dict) -> None:
        """Carry out one request; every request is answered (at once, or when it completes)."""
        op, req_id = req.get("op"), req.get("id")
        try:
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise NativeError(f"unknown request {op!r} (one of {', '.join(self.ops())})")
            result = handler(req_id, req)
        except (NativeError, ValueError, KeyError, TypeError) as e:
            self._reply(req_id, {"error": str(e).strip("'\"") or type(e).__name__}, ok=False)
            return
        if result is not None:
            self._reply(req_id, result)

    @classmethod
    def ops(cls) -> list[str]:
        return sorted(n[3:] for n in dir(cls) if n.startswith("op_"))

    def op_status(self, _id, _req) -> dict:
        """Addresses, port, groups, counters."""
        return {"fabric": self.fabric, "lid": self.attrs.lid, "gid": _ip_text(self.gid), "qpn": self.addr.qpn,
                "hwaddr": str(self.addr), "guid": f"{self.guid:#018x}", "pkey": f"{self.pkey:#06x}",
                "qkey": f"{self.qkey:#x}", "mtu": self.mtu - w.ENCAP_LEN,
                "ipv4": str(self.ip4) if self.ip4 else None, "ipv6": [str(a) for a in self.ip6],
                "groups": {_ip_text(g.mgid): g.join_state for g in self.groups.values()},
                "dhcp": {"state": self.dhcp.state, "lease": self.dhcp.lease}, "counts": dict(self.counts),
                "received": self.seq}

    def op_neighbors(self, _id, _req) -> dict:
        """The ARP and ND caches."""
        def rows(cache):
            return [{"ip": _ip_text(ip), "hwaddr": str(n.addr), "qpn": n.addr.qpn, "gid": _ip_text(n.addr.gid),
                     "flags": n.addr.flags} for ip, n in cache.items()]
        return {"arp": rows(self.arp), "nd": rows(self.nd)}

    def op_received(self, _id, req) -> dict:
        """The frames received after number `since` (default all kept), optionally of one `kind`."""
        since, kind = int(req.get("since", 0)), req.get("kind")
        return {"events": [e for e in self.events if e["n"] > since and (kind is None or e["kind"] == kind)]}

    def op_ping(self, req_id, req) -> None:
        """Echo requests to `dst` (IPv4 or IPv6): `count` (1) of `size` (56) octets, `interval` s (0.2)
        apart; replies awaited up to `timeout` s (3) after the last request."""
        dst = ipaddress.ip_address(req["dst"]).packed
        if len(dst) == 4 and self.ip4 is None:
            raise NativeError("no IPv4 address yet")
        count, size = int(req.get("count", 1)), int(req.get("size", 56))
        now = time.monotonic()
        ident = random.randrange(1, 65536)
        while ident in self.pings:
            ident = random.randrange(1, 65536)
        interval = float(req.get("interval", 0.2))
        p = Ping(req_id, dst, ident, count, interval, now + (count - 1) * interval + float(req.get("timeout", 3.0)),
                 os.urandom(size))
        self.pings[ident] = p
        self._echo_send(p, now)

    def _echo_send(self, p: Ping, now: float) -> None:
        seq = p.next_seq
        p.next_seq += 1
        p.next_at = now + p.interval
        p.sent[seq] = now
        if len(p.dst) == 16:
            self.send_ip(p.dst, w.PROTO_ICMPV6, w.icmpv6_pack(self._source6(p.dst), p.dst, w.ICMPV6_ECHO_REQUEST,
                                                              0, p.ident.to_bytes(2, "big") + seq.to_bytes(2, "big")
                                                              + p.data))
        else:
            self.send_ip(p.dst, w.PROTO_ICMP, w.icmp_echo_pack(w.ICMP_ECHO_REQUEST, p.ident, seq, p.data))

    def _echo_answer(self, ident: int, seq: int, src: bytes) -> None:
        p = self.pings.get(ident)
        if p is not None and src == p.dst and seq in p.sent and seq not in p.rtts:
            p.rtts[seq] = time.monotonic() - p.sent[seq]

    def op_udp(self, req_id, req) -> None:
        """Send text `data` to `dst`:`port` from a fresh port; answered with the reply (or None at `timeout`)."""
        dst = ipaddress.ip_address(req["dst"]).packed
        port = int(req["port"])
        if len(dst) == 4 and self.ip4 is None:
            raise NativeError("no IPv4 address yet")
        sport = random.randrange(32768, 61000)
        while sport in self.udp_waits:
            sport = random.randrange(32768, 61000)
        self.udp_waits[sport] = UdpWait(req_id, dst, port, time.monotonic() + float(req.get("timeout", 3.0)))
        src = self._source6(dst) if len(dst) == 16 else self.ip4.ip.packed
        self.send_ip(dst, w.PROTO_UDP, w.udp_pack(src, dst, sport, port, str(req.get("data", "")).encode()))

    def _udp_answer(self, sport: int, src: bytes, port: int, data: bytes) -> None:
        u = self.udp_waits.get(sport)
        if u is not None and src == u.dst and port == u.port:
            del self.udp_waits[sport]
            self._reply(u.req_id, {"dst": _ip_text(src), "port": port, "reply": data.decode(errors="replace")})

    def op_dhcp(self, req_id, _req) -> None:
        """Get an IPv4 address by DHCP (RFC 4390); answered once bound or failed."""
        self.dhcp_start(req_id)

    def op_quit(self, _id, _req) -> dict:
        """Leave the fabric and exit."""
        self.stopping = True
        return {}

    # ================================================================================ DHCP (RFC 2131 + 4390)

    def dhcp_start(self, req_id) -> None:
        d = self.dhcp
        if req_id is not None:
            d.req_ids.append(req_id)
        if d.state in ("selecting", "requesting"):
            return
        d.state, d.xid, d.tries, d.offer = "selecting", random.randrange(1, 1 << 32), 0, None
        self._dhcp_send(time.monotonic())

    def _dhcp_message(self, kind: int, extra: list[tuple[int, bytes]]) -> w.Dhcp:
        opts = [(w.OPT_MESSAGE_TYPE, bytes([kind])), (w.OPT_CLIENT_ID, w.client_id(self.guid)), *extra,
                (w.OPT_PARAMETER_LIST, bytes([w.OPT_SUBNET_MASK, w.OPT_ROUTER, w.OPT_LEASE_TIME]))]
        # RFC 4390 section 2.1: htype 32, hlen 0, chaddr zero; section 2.2: BROADCAST, having no address
        return w.Dhcp(w.DHCP_BOOTREQUEST, self.dhcp.xid, flags=w.DHCP_FLAG_BROADCAST,
                      secs=min(self.dhcp.tries, 0xFFFF), options=opts)

    def _dhcp_send(self, now: float) -> None:
        d = self.dhcp
        d.tries += 1
        d.next_at = now + min(4.0, 0.5 * 2 ** (d.tries - 1))
        if d.state == "selecting":
            msg = self._dhcp_message(w.DHCPDISCOVER, [])
        else:
            msg = self._dhcp_message(w.DHCPREQUEST, [(w.OPT_REQUESTED_IP, d.offer.yiaddr),
                                                    (w.OPT_SERVER_ID, d.offer.option(w.OPT_SERVER_ID) or b"")])
        seg = w.udp_pack(w.IPV4_ANY, w.IPV4_BROADCAST, w.DHCP_CLIENT_PORT, w.DHCP_SERVER_PORT, msg.pack())
        pkt = w.ipv4_pack(w.IPV4_ANY, w.IPV4_BROADCAST, w.PROTO_UDP, seg, ident=random.randrange(65536))
        self._send_group(w.ETHERTYPE_IPV4, pkt, w.mgid_ipv4(w.IPV4_BROADCAST, self.pkey))

    def _dhcp_in(self, msg: w.Dhcp) -> None:
        d = self.dhcp
        seen = {"event": "dhcp", "type": msg.message_type, "xid": msg.xid, "htype": msg.htype,
                "hlen": msg.hlen, "flags": msg.flags, "yiaddr": _ip_text(msg.yiaddr),
                "client_id": (msg.option(w.OPT_CLIENT_ID) or b"").hex()}
        self.emit(seen)
        if msg.op != w.DHCP_BOOTREPLY or msg.xid != d.xid:
            return
        if d.state == "selecting" and msg.message_type == w.DHCPOFFER:
            d.state, d.offer, d.tries = "requesting", msg, 0
            self._dhcp_send(time.monotonic())
        elif d.state == "requesting" and msg.message_type == w.DHCPACK:
            mask = msg.option(w.OPT_SUBNET_MASK) or bytes([255, 255, 255, 0])
            plen = bin(int.from_bytes(mask, "big")).count("1")
            self.ip4 = ipaddress.IPv4Interface((ipaddress.IPv4Address(msg.yiaddr), plen))
            lease = msg.option(w.OPT_LEASE_TIME)
            d.state = "bound"
            d.lease = {"ip": str(self.ip4), "server": _ip_text(msg.option(w.OPT_SERVER_ID) or msg.siaddr),
                       "lease_seconds": int.from_bytes(lease, "big") if lease else None,
                       "router": _ip_text(msg.option(w.OPT_ROUTER)[:4]) if msg.option(w.OPT_ROUTER) else None}
            self._dhcp_done({"state": "bound", **d.lease})
        elif d.state == "requesting" and msg.message_type == w.DHCPNAK:
            d.state = "init"
            self.dhcp_start(None)

    def _dhcp_done(self, result: dict) -> None:
        self.emit({"event": "dhcp", **result})
        for req_id in self.dhcp.req_ids:
            self._reply(req_id, result, ok=result["state"] == "bound")
        self.dhcp.req_ids.clear()

    def busy(self) -> bool:
        """Whether requests are still running (pings, UDP exchanges, a DHCP client someone waits for)."""
        return bool(self.pings or self.udp_waits or self.dhcp.req_ids)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
