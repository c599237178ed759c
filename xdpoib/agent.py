"""The agent: one process per attachment, composing SA client, UD QP, links, datapath and pump.

`Agent.start()` brings the pieces up in order, each one's undo pushed on an ExitStack, so `close()`
(also on SIGTERM) releases them in exact reverse order: groups left, QP closed, XDP removed, links
deleted or restored, runtime files removed. `Agent.run()` is a single-threaded select() loop:

- eth4 -> fabric: the datapath (`xdpoib.pump`: the XDP programs, or the plain path) hands over IPoIB
  frames and where they go; they are sent in batches to a peer (path resolved first, at most 3 frames
  queued meanwhile) or a multicast group (send-only join on first use); oversize ones get an ICMP error;
- fabric -> eth4: receive completions are filtered for loopback, their senders learned (from the GRH,
  or SLID + source QPN, or the ARP/ND addresses they carry) and the frames handed to the datapath,
  which translates and injects them on eth4;
- timers: eth4's multicast list is mirrored into SA joins; memberships are re-checked and rejoined;
  port events force a rejoin and fresh paths; the control socket answers status/peers/groups/stop.

Run as `python -m xdpoib.agent SPEC_JSON` (what `xdpoib attach` starts); the process must be the port's
umad client (on the sim fabric: started with `SimFabric.client_env(host)`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack

from xdpoib import link, state
from xdpoib.control import ControlServer
from xdpoib.errors import FrameError, XdpoibError
from xdpoib.fabric.base import GRH_LEN
from xdpoib.peers import GroupEntry, PeerEntry, PeerTable
from xdpoib.reasons import Kind
from xdpoib.wire import frames as f
from xdpoib.wire.addr import IPoIBAddr, gid_str, lemac, mac_str, remac
from xdpoib.wire.mgid import broadcast_mgid, full_pkey, ipv4_mgid, ipv6_mgid
from xdpoib.wire.oracle import Vif, eth_to_ipoib, too_big_reply

log = logging.getLogger("xdpoib.agent")

RECV_BUFFERS = 4096        # a burst the pump has not drained yet must find buffers (sim counts NO_RECV_BUFFER)
BATCH = 256
#: veth refuses XDP when the peer MTU is above ~3.5 KB unless the program is frags-aware (DESIGN 6).
VETH_XDP_MAX_MTU = 3498
MEMBERSHIP_CHECK_S = 5.0
MCAST_SYNC_S = 1.0
SAVE_S = 2.0                # persist newly learned peers at most this often (a SIGKILL loses less)
PATH_RETRY_S = 1.0
JOIN_FULL = 1


class AgentError(XdpoibError):
    """The agent could not bring the attachment up."""


def internal_name(spec: state.AttachSpec) -> str:
    """The internal veth end's name: `xo` + 8 hex digits of the attachment id (fits IFNAMSIZ)."""
    return "xo" + state.link_tag(spec.id)


class Agent:
    """One attachment's agent."""

    def __init__(self, spec: state.AttachSpec):
        self.spec = spec
        self.pkey = full_pkey(spec.pkey)
        self.stack = ExitStack()
        self.stopping = False
        self.vif_learned = True         # veth: eth4's MAC is ours; tap: learned from the guest
        self.state = "starting"
        self.drops: Counter = Counter()          # by DropReason name or agent reason
        self.stats: Counter = Counter()
        self.groups: dict[bytes, GroupEntry] = {}
        self._next_group_id = 1
        self._sends: list = []
        self._inject: list[bytes] = []
        self._last_mcast_sync = 0.0
        self._last_save = 0.0
        self._announced: set[bytes] = set()
        self._who_is_asked: dict[int, float] = {}
        self._announce_due = False
        self._saved_peers = 0
        self._last_member_check = time.monotonic()
        self.started = time.time()

    # ================================================================================ bring-up

    def start(self) -> None:
        """Bring everything up; on failure, undo what was done and raise."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        s = self.spec
        self.sa = self._open_sa()
        self.stack.callback(self.sa.close)
        self.port = self._wait_active(30.0)
        if self.port.pkey_index(self.pkey) is None:
            table = ", ".join(f"{k:#06x}" for k in self.port.pkeys if k & 0x7FFF) or "empty"
            raise AgentError(f"the port is not a member of partition {self.pkey:#06x} (its P_Key table: {table})")
        self.backend = self._open_backend()
        self.stack.callback(self.backend.close)
        self.port_attrs = self.backend.port()

        # the broadcast group: its parameters are the template of every other group (DESIGN 3.5)
        self.bcast_mgid = broadcast_mgid(self.pkey)
        self.bcast = self._join_with_retry(self.bcast_mgid, 20.0)
        self.qkey = self.bcast.qkey
        self.ib_mtu = min(self.bcast.mtu_bytes or 2048, self.port_attrs.active_mtu)
        # buffers for the largest datagram the port can receive (not the group MTU): a longer one would
        # complete in error and leave the QP in the error state (base.py)
        pool = self.backend.alloc_pool(RECV_BUFFERS, GRH_LEN + max(self.ib_mtu, self.port_attrs.active_mtu))
        self.qp = self.backend.create_qp(self.pkey, self.qkey, pool)
        self.stack.callback(self.qp.close)
        self.qp.post_recv(range(RECV_BUFFERS))
        from xdpoib.fabric.base import LoopbackFilter

        self.loopback = LoopbackFilter(self.port_attrs, [self.qp.qpn])
        g = self._group(self.bcast_mgid, "broadcast")
        self._record_join(g, self.bcast, JOIN_FULL)
        self.stack.callback(self._leave_all)

        # links
        self.mac = lemac(self.port_attrs.port_guid.to_bytes(8, "big"))
        self.eth_mtu = self.ib_mtu - 4
        if s.mode == "veth":
            self.eth_mtu = min(self.eth_mtu, VETH_XDP_MAX_MTU)
            s.internal = internal_name(s)
            if link.link_exists(s.internal) and link.link_exists(s.ifname, s.netns):
                # a previous agent of this attachment died: adopt its links (eth4 keeps its addresses)
                log.info("adopting the existing %s / %s of a previous agent", s.internal, s.where)
                self.stats["adopted_links"] += 1
            else:
                link.create_veth(s.ifname, s.internal, s.netns)
            self.stack.callback(link.delete_link, s.internal)
            link.set_link(s.ifname, s.netns, mac=mac_str(self.mac), mtu=self.eth_mtu, up=True)
            # the internal end takes the largest frame XDP allows, so a frame above eth4's path MTU
            # (eth4's MTU raised by hand) reaches us and is answered with ICMP instead of vanishing
            link.set_link(s.internal, None, mtu=VETH_XDP_MAX_MTU, up=False)
            self._sysctls()
            link.set_offloads(s.ifname, s.netns, tx=False, tso=False)
            attach_to = s.internal
        else:
            # a VM's TAP: frames the VM writes are RX on the TAP (XDP sees them), frames sent on it with
            # AF_XDP reach the VM. The VIF MAC is the guest's, learned from its first frame.
            before = link.link_info(s.ifname)
            self.stack.callback(link.set_link, s.ifname, None, mtu=before.mtu)
            link.set_link(s.ifname, None, mtu=self.eth_mtu, up=True)
            self.vif_learned = False
            attach_to = s.ifname
        self.ifindex = link.link_info(attach_to).index

        our = IPoIBAddr(0, self.qp.qpn, self.port_attrs.gid)
        self.vif = Vif(0, self.mac, our)
        self.peers = PeerTable([self.vif], {0: self.pkey})
        self.loopback.qpns = {self.qp.qpn}
        self._restore_state()

        # datapath: frames from eth4 reach us on an AF_XDP socket (DESIGN 1); the translating programs
        # unless asked otherwise; a TAP starts with the plain path (the guest's MAC is not known yet)
        from xdpoib.pump import PlainPump

        self.attach_to = attach_to
        self.want_bpf = os.environ.get("XDPOIB_DATAPATH", "bpf") == "bpf"
        if self.want_bpf and s.mode == "veth":
            link.set_offloads(s.ifname, s.netns, gro=True)      # redirected frames need GRO or XDP on eth4
            self._start_bpf()
        else:
            self.pump = PlainPump(self, attach_to, self.ifindex)
        self.stack.callback(lambda: self.pump.close())
        self.peers.on_new = lambda e: self.pump.add_peers([e])

        # control socket, then carrier: only now does eth4 pass traffic
        state.ensure_dirs()
        self.control = ControlServer(state.socket_path(s.id), self.handle_request)
        self.stack.callback(self.control.close)
        if s.mode == "veth":
            link.set_link(s.internal, None, up=True)
        s.pid = os.getpid()
        state.write_spec(s)
        self.stack.callback(state.remove_files, s.id, True)
        self.state = "running"
        self.announce()
        log.info("attached %s: MAC %s MTU %d QPN %#x LID %d", s.where, mac_str(self.mac), self.eth_mtu,
                 self.qp.qpn, self.port.lid)

    def _open_sa(self):
        from xdpoib.fabric.sa import SAClient

        return SAClient.open(self.spec.device, self.spec.port if self.spec.device else None,
                             sm_key=1 if self.spec.backend == "sim" else 0)

    def _open_backend(self):
        if self.spec.backend == "sim":
            from xdpoib.fabric.simud import SimUdBackend

            return SimUdBackend.open(self.spec.fabric, sa=self.sa)
        from xdpoib.fabric.verbs import VerbsBackend

        return VerbsBackend.open(self.spec.device, self.spec.port)

    def _wait_active(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            p = self.sa.port()
            if p.active and p.lid:
                return p
            if time.monotonic() > deadline:
                raise AgentError(f"port is {p.state_name} (LID {p.lid}) after {timeout:.0f} s")
            time.sleep(0.2)

    def _join_with_retry(self, mgid: bytes, timeout: float):
        from xdpoib.fabric.sa import SAError

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.sa.join(mgid, JOIN_FULL)
            except SAError as e:
                if time.monotonic() > deadline or getattr(e, "status", 0) == 0x0200:   # refused: final
                    raise AgentError(f"cannot join the broadcast group {gid_str(mgid)}: {e}") from None
                time.sleep(0.5)

    def _sysctls(self) -> None:
        """Let the host stack announce itself through us: gratuitous ARP and unsolicited NA on link
        up and address changes (DESIGN 2)."""
        for key in (f"net.ipv4.conf.{self.spec.ifname}.arp_notify=1",
                    f"net.ipv6.conf.{self.spec.ifname}.ndisc_notify=1"):
            subprocess.run(link.in_netns(self.spec.netns, ["sysctl", "-qw", key]), capture_output=True, check=False)

    def _read_eth4(self) -> tuple[str, str]:
        """eth4's multicast lists (/proc/net/igmp6, /proc/net/igmp) and its addresses (`ip -o addr`),
        read in its namespace with one command (the timer needs both every second)."""
        script = 'cat /proc/net/igmp6 /proc/net/igmp; echo "@@addresses@@"; ip -o addr show dev "$1"'
        out = subprocess.run(link.in_netns(self.spec.netns, ["sh", "-c", script, "sh", self.spec.ifname]),
                             capture_output=True, text=True, timeout=5).stdout
        groups, _, addresses = out.partition("@@addresses@@")
        return groups, addresses

    @staticmethod
    def _parse_addresses(out: str) -> tuple[list[bytes], list[bytes]]:
        """IPv4 and IPv6 addresses from `ip -o addr` output (tentative ones left out)."""
        from ipaddress import ip_address

        v4, v6 = [], []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[2] in ("inet", "inet6") and "tentative" not in line:
                a = ip_address(parts[3].split("/")[0]).packed
                (v4 if len(a) == 4 else v6).append(a)
        return v4, v6

    def announce(self, addresses: str | None = None, only_new: bool = False) -> None:
        """Gratuitous ARP and unsolicited NA for eth4's addresses, sent on the fabric: after attach (our
        QPN, hence our REMAC at the peers, may have changed), when the port comes back, and for each
        address added later, so peers' caches point at our current address (DESIGN 2).

        @v addresses  `ip -o addr` output already read by the caller (None: read it now)
        @v only_new   announce only addresses not announced before
        """
        if self.spec.mode != "veth":
            return                  # a guest announces itself (and we learn its MAC on its first frame)
        if addresses is None:
            try:
                addresses = self._read_eth4()[1]
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("reading eth4's addresses: %s", e)
                return
        v4, v6 = self._parse_addresses(addresses)
        known, self._announced = self._announced, set(v4) | set(v6)
        if only_new:
            v4, v6 = [a for a in v4 if a not in known], [a for a in v6 if a not in known]
        all_nodes = bytes.fromhex("ff020000000000000000000000000001")
        frames = [f.eth(b"\xff" * 6, self.mac, f.ETH_P_ARP, f.arp(f.ARPOP_REQUEST, self.mac, a, b"\0" * 6, a))
                  for a in v4]
        frames += [f.eth(b"\x33\x33\x00\x00\x00\x01", self.mac, f.ETH_P_IPV6,
                         f.nd_na(a, all_nodes, a, tlla=self.mac, solicited=False)) for a in v6]
        for frame in frames:
            try:
                r = eth_to_ipoib(frame, self.peers)
            except FrameError:
                continue
            self._send_to_group(r.mgid, r.frame)
        self._flush_sends()
        self.stats["announcements"] += len(frames)

    # ================================================================================ groups

    def _group(self, mgid: bytes, why: str) -> GroupEntry:
        g = self.groups.get(mgid)
        if g is None:
            g = self.groups[mgid] = GroupEntry(mgid, self._next_group_id)
            self._next_group_id += 1
        g.why.add(why)
        return g

    def _record_join(self, g: GroupEntry, rec, join_state: int) -> None:
        from xdpoib.fabric.base import Path

        g.join_state, g.mlid, g.qkey, g.mtu = g.join_state | join_state, rec.mlid, rec.qkey, rec.mtu_bytes
        pump = getattr(self, "pump", None)
        if pump is not None:
            pump.set_group(g.mgid, g.group_id)
        g.joined_at = time.monotonic()
        g.ah = self.backend.create_ah(Path(dlid=rec.mlid, sl=rec.sl, mtu=rec.mtu_bytes or self.ib_mtu,
                                           dgid=g.mgid, grh=True, hop_limit=rec.hop_limit or 1,
                                           traffic_class=rec.tclass, flow_label=rec.flow_label))
        if join_state & JOIN_FULL:
            if g.attached:          # a rejoin: attach again, so the backend sees the fresh membership
                with contextlib.suppress(XdpoibError):
                    self.qp.detach_mcast(g.mgid, g.mlid)
            self.qp.attach_mcast(g.mgid, rec.mlid)
            g.attached = True

    def join(self, mgid: bytes, why: str, full: bool = True) -> GroupEntry | None:
        """Join (creating it with the broadcast group's parameters if needed) and attach; None on failure."""
        from xdpoib.fabric.sa import SAError

        g = self._group(mgid, why)
        if g.join_state & JOIN_FULL or (g.join_state and not full):
            return g
        try:
            if full:
                rec = self.sa.join(mgid, JOIN_FULL, create=self.bcast)
                self._record_join(g, rec, JOIN_FULL)
            else:
                rec = self.sa.join_send_only(mgid, create=self.bcast)
                self._record_join(g, rec, self.sa.send_only_join_state())
            self.stats["joins"] += 1
            return g
        except (SAError, XdpoibError) as e:
            self.drops["join_failed"] += 1
            log.warning("join %s failed: %s", gid_str(mgid), e)
            return None

    def leave(self, g: GroupEntry) -> None:
        """Detach and leave one group (errors are logged: the SA forgets us anyway on port down)."""
        from xdpoib.fabric.sa import SAError

        if g.attached:
            with contextlib.suppress(XdpoibError):
                self.qp.detach_mcast(g.mgid, g.mlid)
            g.attached = False
        if g.join_state:
            try:
                self.sa.leave(g.mgid, g.join_state)
            except (SAError, XdpoibError) as e:
                log.warning("leave %s: %s", gid_str(g.mgid), e)
            g.join_state = 0
        self.groups.pop(g.mgid, None)

    def _leave_all(self) -> None:
        for g in list(self.groups.values()):
            self.leave(g)

    def _parse_groups(self, out: str) -> set[bytes]:
        """MGIDs of the IPv4/IPv6 groups on eth4's own multicast list (/proc/net/igmp6 and igmp text)."""
        mgids, dev = set(), None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and len(parts[2]) == 32 and parts[1] == self.spec.ifname:
                mgids.add(ipv6_mgid(bytes.fromhex(parts[2]), self.pkey))
            elif len(parts) >= 2 and parts[0].rstrip(":").isdigit() and ":" in line.split()[1:3]:
                dev = parts[1]
            elif len(parts) >= 2 and line.startswith("\t") and dev == self.spec.ifname and len(parts[0]) == 8:
                grp = bytes.fromhex(parts[0])[::-1]
                if grp[0] & 0xF0 == 0xE0:
                    mgids.add(ipv4_mgid(grp, self.pkey))
        return mgids

    def sync_multicast(self, groups: str) -> None:
        """Mirror eth4's multicast list (the /proc text `_read_eth4` read) into full joins, so IPv6 ND
        and mDNS work; leave what went."""
        try:
            want = self._parse_groups(groups)
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
        """IGMP/MLD reports from behind eth4 (a VM, a bridge) join and leave their groups in the SA;
        the host stack's own groups also come from eth4's list (`sync_multicast`)."""
        try:
            h = f.parse_eth(eth)
        except FrameError:
            return
        joins, leaves = f.group_report(h.ethertype, eth[h.hlen:])
        mgid_of = ipv4_mgid if h.ethertype == f.ETH_P_IP else ipv6_mgid
        for grp in joins:
            with contextlib.suppress(XdpoibError):
                if self.join(mgid_of(grp, self.pkey), "snooped") is not None:
                    self.stats["snooped_joins"] += 1
        for grp in leaves:
            with contextlib.suppress(XdpoibError):
                g = self.groups.get(mgid_of(grp, self.pkey))
                if g is not None and "snooped" in g.why:
                    g.why.discard("snooped")
                    if not g.why:
                        self.leave(g)

    def check_memberships(self) -> None:
        """Ask the SA whether our full memberships still exist; rejoin the ones it forgot."""
        from xdpoib.fabric.sa import SAError

        for g in list(self.groups.values()):
            if not g.join_state & JOIN_FULL:
                continue
            try:
                if self.sa.member(g.mgid) is None:
                    log.warning("membership of %s is gone: rejoining", gid_str(g.mgid))
                    self.stats["rejoins"] += 1
                    create = None if g.mgid == self.bcast_mgid else self.bcast
                    rec = self.sa.join(g.mgid, JOIN_FULL, create=create)
                    self._record_join(g, rec, JOIN_FULL)
            except (SAError, XdpoibError) as e:
                log.warning("membership check of %s: %s", gid_str(g.mgid), e)

    def on_port_events(self) -> None:
        """Port events: re-read the port, drop paths, rejoin (OpenSM forgets a port's memberships)."""
        from xdpoib.fabric.base import PortEventKind

        for ev in self.backend.events.get():
            self.stats[f"port_event_{ev.kind.value}"] += 1
            log.info("port event %s", ev.kind.value)
            if ev.attrs is not None:
                self.port_attrs = ev.attrs
                self.loopback.port = ev.attrs
            if ev.kind is PortEventKind.PORT_ERR:
                continue
            self.peers.forget_paths()
            self._last_member_check = 0.0       # check memberships (and rejoin) right away
            self._announce_due = True           # then tell the peers we are back

    # ================================================================================ pump

    def _flush_sends(self) -> None:
        if self._sends:
            batch, self._sends = self._sends, []
            sent = 0
            while sent < len(batch):
                n = self.qp.post_send(batch[sent:])
                if n == 0:
                    self.drops["send_queue_full"] += len(batch) - sent
                    break
                sent += n
            self.stats["tx_frames"] += sent

    def _too_big(self, eth_frame: bytes, ib_mtu: int, from_mac: bytes) -> None:
        """Drop an oversize frame and tell its sender the MTU (ICMP frag-needed / Packet Too Big)."""
        self.drops["oversize"] += 1
        if callable(eth_frame):
            eth_frame = eth_frame()
        reply = too_big_reply(eth_frame, ib_mtu - 4, from_mac) if eth_frame else None
        if reply is not None:
            self._inject.append(reply)
            self.stats["icmp_too_big"] += 1

    def _send_to_group(self, mgid: bytes, frame: bytes, eth_frame: bytes = b"") -> None:
        from xdpoib.fabric.base import MCAST_QPN, SendRequest

        g = self.groups.get(mgid)
        if g is None or g.ah is None or not g.join_state:
            g = self.join(mgid, "send", full=False)
            if g is None:
                self.drops["no_group"] += 1
                return
        if len(frame) > (g.mtu or self.ib_mtu):
            self._too_big(eth_frame, g.mtu or self.ib_mtu, remac(self.port_attrs.gid, MCAST_QPN))
            return
        self._sends.append(SendRequest(g.ah, MCAST_QPN, g.qkey or self.qkey, frame))

    def _send_to_peer(self, e: PeerEntry, frame: bytes, eth_frame: bytes = b"") -> None:
        from xdpoib.fabric.base import SendRequest

        if e.path_state != "resolved":
            if len(e.pending) == e.pending.maxlen:
                self.drops["unresolved_queue_full"] += 1
            e.pending.append((frame, eth_frame))
            self.resolve(e)
            return
        if len(frame) > e.path_mtu:
            self._too_big(eth_frame, e.path_mtu, e.remac)
            return
        self._sends.append(SendRequest(e.ah, e.addr.qpn, self.qkey, frame))

    def resolve(self, e: PeerEntry) -> None:
        """PathRecord for a peer, then its address handle; queued frames go out once it resolves."""
        from xdpoib.fabric.base import Path
        from xdpoib.fabric.sa import SAError

        now = time.monotonic()
        if e.path_state == "failed" and now - e.resolved_at < PATH_RETRY_S:
            return
        try:
            rec = self.sa.path(e.addr.gid, sgid=self.port_attrs.gid, pkey=self.pkey)
            e.path_mtu = min(rec.mtu_bytes or self.ib_mtu, self.ib_mtu)
            e.path = Path(dlid=rec.dlid, sl=rec.sl, mtu=e.path_mtu)
            e.ah = self.backend.create_ah(e.path)
            e.lid = e.lid or rec.dlid
            e.path_state, e.resolved_at = "resolved", now
            self.stats["paths_resolved"] += 1
        except (SAError, XdpoibError) as ex:
            e.path_state, e.resolved_at = "failed", now
            self.drops["path_failed"] += len(e.pending)
            e.pending.clear()
            log.warning("path to %s: %s", gid_str(e.addr.gid), ex)
            return
        while e.pending:
            self._send_to_peer(e, *e.pending.popleft())

    def _start_bpf(self) -> None:
        from xdpoib.pump import BpfPump

        self.pump = BpfPump(self, self.attach_to, self.ifindex, self.spec.id)
        if self.pump.adopted:
            self.stats["adopted_datapath"] += 1
            log.info("adopted the datapath pinned under %s", self.pump.pin_dir)
        for g in self.groups.values():
            self.pump.set_group(g.mgid, g.group_id)

    def _upgrade_pump(self) -> None:
        """TAP mode, guest MAC learned: move from the plain path to the translating programs (the few
        frames in flight meanwhile are lost, as on a link flap)."""
        old = self.pump
        old.close()
        try:
            self._start_bpf()
            self.stats["datapath_upgrades"] += 1
        except XdpoibError as e:
            from xdpoib.pump import PlainPump

            log.warning("staying on the plain datapath: %s", e)
            self.want_bpf = False
            self.pump = PlainPump(self, self.attach_to, self.ifindex)

    def learn_vif(self, frame: bytes) -> None:
        """TAP mode: the guest's MAC (the source of its first unicast-sourced frame) becomes the VIF."""
        src = bytes(frame[6:12])
        if len(frame) >= 14 and not src[0] & 1 and any(src):
            self.mac = src
            self.vif = Vif(0, src, self.vif.addr)
            self.peers.set_vifs([self.vif])
            self.vif_learned = True
            log.info("guest MAC %s learned on %s", mac_str(src), self.spec.ifname)

    def pump_eth(self) -> int:
        """eth4 -> fabric: one batch from the AF_XDP socket, decided by the datapath."""
        got = self.pump.receive()
        for o in got:
            self.stats["eth_rx_frames"] += 1
            if o.control:
                self.snoop(o.eth)
            eth = o.eth or (lambda o=o: self._as_ethernet(o))
            if o.mgid is not None:
                self._send_to_group(o.mgid, o.frame, eth)
            elif o.kind == Kind.PEER and (e := self.peers.by_id(o.peer_id)) is not None:
                self._send_to_peer(e, o.frame, eth)
            else:
                self.drops["unknown_destination"] += 1
        self._flush_sends()
        if self._inject:
            out, self._inject = self._inject, []
            self.pump.deliver([], out)
        if self.vif_learned and self.want_bpf and self.pump.name == "plain":
            self._upgrade_pump()
        return len(got)

    def _as_ethernet(self, o) -> bytes:
        """An IPoIB frame from eth4 in its Ethernet form again (only to quote it in an ICMP error)."""
        e = self.peers.by_id(o.peer_id)
        dst = e.remac if e is not None else b"\xff" * 6
        return f.eth(dst, self.mac, int.from_bytes(o.frame[:2], "big"), o.frame[4:], vid=o.vid or None)

    def _learn_from_payload(self, data: bytes, src_qpn: int, slid: int):
        """A sender's own address, from the ARP it sent (sender hardware address) if it matches."""
        if len(data) >= 4 + f.ARP_IB_LEN and data[:2] in (b"\x08\x06", b"\x80\x35") and data[8] == 20:
            sha = IPoIBAddr.unpack(data[12:32])
            if sha.qpn == src_qpn:
                return self.peers.learn(sha, lid=slid)
        return None

    def _who_is(self, slid: int, qpn: int) -> PeerEntry | None:
        """A sender seen only as (SLID, QPN) (unicast without GRH, never announced to us): ask the SA
        which GID is behind that LID (at most once a second per LID), and learn the peer."""
        from xdpoib.fabric.sa import SAError

        now = time.monotonic()
        if now - self._who_is_asked.get(slid, -1e9) < 1.0:
            return None
        self._who_is_asked[slid] = now
        try:
            rec = self.sa.path_to_lid(slid, self.pkey)
        except (SAError, XdpoibError) as e:
            log.warning("who is LID %d: %s", slid, e)
            return None
        self.stats["sources_resolved_by_lid"] += 1
        return self.peers.learn(IPoIBAddr(0, qpn, rec.dgid), lid=slid)

    def _learn_nd(self, data: bytes, slid: int) -> None:
        """Learn the IPoIB addresses that ND link-layer options carry (so their translation succeeds)."""
        if len(data) < 4 + 40 + 4 or data[:2] != b"\x86\xdd" or data[4 + 6] != f.IPPROTO_ICMPV6:
            return
        msg = data[44:]
        if msg[0] not in f.ND_TYPES:
            return
        try:
            opts = f.parse_nd_options(msg, msg[0])
        except FrameError:
            return
        for o in opts:
            if o.opt_type in (f.ND_OPT_SLLA, f.ND_OPT_TLLA) and len(o.raw) == 24:
                addr = IPoIBAddr.unpack(o.raw[4:24])
                if addr.key != self.vif.addr.key:
                    self.peers.learn(addr)

    def pump_fabric(self) -> int:
        """fabric -> eth4: one batch of receive completions, senders learned, handed to the datapath."""
        from xdpoib.pump import Incoming

        comps = self.qp.poll(BATCH)
        if not comps:
            return 0
        repost = [c.index for c in comps]
        items = []
        pool = self.qp.pool
        for c in self.loopback.filter(comps):
            if c.status != 0:
                self.drops["completion_error"] += 1
                continue
            data = bytes(c.payload[:c.byte_len])
            multicast = c.has_grh and pool.view(c.index)[24] == 0xFF
            peer = self._learn_from_payload(data, c.src_qp, c.slid)
            if peer is None:
                if c.has_grh and c.sgid is not None:
                    peer = self.peers.learn(IPoIBAddr(0, c.src_qp, bytes(c.sgid)), lid=c.slid)
                else:
                    peer = self.peers.by_lid(c.slid, c.src_qp) or self._who_is(c.slid, c.src_qp)
            if peer is None:
                self.drops["unknown_source"] += 1
                continue
            peer.last_seen = time.monotonic()
            self._learn_nd(data, c.slid)
            items.append(Incoming(data, peer, multicast))
        self.qp.post_recv(repost)
        if items:
            self.pump.deliver(items, [])
        return len(comps)

    # ================================================================================ loop

    def run(self) -> None:
        """Serve until stopped (SIGTERM, SIGINT, or a `stop` request)."""
        while not self.stopping:
            rlist = [self.pump.fileno(), self.qp.fileno(), self.backend.events.fileno(), self.control.fileno()]
            now = time.monotonic()
            if len(self.peers.entries) != self._saved_peers and now - self._last_save >= SAVE_S:
                self._last_save = now
                self.save_state()
            if now - self._last_member_check >= MEMBERSHIP_CHECK_S:
                self._last_member_check = now
                self.check_memberships()
            if now - self._last_mcast_sync >= MCAST_SYNC_S:
                self._last_mcast_sync = now
                try:
                    groups, addresses = self._read_eth4()
                except (OSError, subprocess.SubprocessError) as e:
                    log.warning("reading eth4's multicast list and addresses: %s", e)
                else:
                    self.sync_multicast(groups)
                    self.announce(addresses, only_new=not self._announce_due)
                    self._announce_due = False
            try:
                ready, _, _ = select.select(rlist, [], [], 0.2)
            except InterruptedError:
                continue
            busy = True
            while busy and not self.stopping:
                busy = bool(self.pump_eth()) | bool(self.pump_fabric())
            if self.backend.events.fileno() in ready:
                self.on_port_events()
            if self.control.fileno() in ready:
                self.control.handle()
            if self.pump.pending_tx():
                self.pump.kick()
        self.state = "stopping"

    # ================================================================================ control

    def status(self) -> dict:
        """The attachment's state and counters (what `xdpoib status -j` shows and the exporter reads)."""
        p = self.port_attrs
        s = self.spec
        return {
            "attachment": {"ifname": s.ifname, "netns": s.netns, "mode": s.mode, "pkey": f"{self.pkey:#06x}",
                           "backend": s.backend, "fabric": s.fabric, "host": s.host, "device": s.device,
                           "internal": s.internal, "pid": os.getpid(), "state": self.state,
                           "uptime_seconds": round(time.time() - self.started, 1)},
            "port": {"gid": gid_str(p.gid), "lid": p.lid, "sm_lid": p.sm_lid, "state": p.state.name.lower(),
                     "active_mtu": p.active_mtu, "guid": f"{p.port_guid:#018x}"},
            "broadcast": {"mgid": gid_str(self.bcast_mgid), "qkey": f"{self.qkey:#x}", "mtu": self.bcast.mtu_bytes,
                          "mlid": self.bcast.mlid},
            "eth": {"ifname": s.ifname, "mac": mac_str(self.mac), "mtu": self.eth_mtu},
            "qpn": self.qp.qpn,
            "peers": len(self.peers.entries),
            "groups": len(self.groups),
            "counters": dict(self.stats),
            "drops": dict(self.drops),
            "fabric_drops": {k: v for k, v in self.backend.counters().items() if v},
            "datapath": {"kind": self.pump.name, **self.pump.counters()},
            "groups_by_state": dict(Counter("full" if g.join_state & JOIN_FULL else "send_only" if g.join_state
                                            else "not_joined" for g in self.groups.values())),
            "sa": {"queries": {" ".join(map(str, k)) if isinstance(k, tuple) else k: v
                               for k, v in self.sa.stats.items()},
                   "latency": self.sa.latency.snapshot()},
        }

    def handle_request(self, req: dict) -> dict:
        """Answer one control request."""
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "peers":
            return {"peers": [e.to_dict() for e in self.peers.entries.values()]}
        if cmd == "groups":
            return {"groups": [g.to_dict() for g in self.groups.values()]}
        if cmd == "stop":
            self.stopping = True
            return {"stopping": True}
        raise XdpoibError(f"unknown request {cmd!r}")

    # ================================================================================ state, teardown

    def _restore_state(self) -> None:
        try:
            data = json.loads(state.persist_path(self.spec.id).read_text())
            self.peers.restore(data.get("peers", {}))
        except (OSError, ValueError, KeyError, XdpoibError):
            pass

    def save_state(self) -> None:
        """Persist REMACs and ids (so a restarted agent keeps the same REMACs)."""
        with contextlib.suppress(OSError, AttributeError):
            state.ensure_dirs()
            p = state.persist_path(self.spec.id)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps({"peers": self.peers.to_json()}))
            os.replace(tmp, p)
            self._saved_peers = len(self.peers.entries)

    def close(self) -> None:
        """Release everything in reverse order (idempotent)."""
        self.save_state()
        self.stack.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m xdpoib.agent SPEC_JSON`: run one attachment's agent in the foreground."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    spec = state.AttachSpec.from_json(argv[0])
    agent = Agent(spec)

    def stop(signum, frame):
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.start()
    except XdpoibError as e:
        print(f"xdpoib agent: error: {e}", file=sys.stderr)
        return 1
    try:
        agent.run()
    finally:
        agent.close()
        log.info("detached %s", spec.where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
