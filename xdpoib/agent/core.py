"""The agent: one process per attachment, composing the parts that each own one job.

    Agent            bring-up in order (each undo pushed on an ExitStack), the event loop, teardown
    loop.EventLoop   epoll + budgeted data pollers + timers, on the main thread
    loop.Worker      "sa": every SA query after bring-up; "host": reading eth4's multicast lists and addresses
    forward.Forwarder  the data plane, both directions, in batches of at most `budget` frames
    resolver.Resolver  paths to peers (asynchronous, with backoff) and sender learning
    groups.Membership  multicast joins/leaves/checks (asynchronous, with backoff), snooping
    links            eth4 and its internal end; reading eth4; announcements
    migration.Migration  guests leaving the bridge: released, probed for, announced on their behalf
    service          the control socket's answers (status, peers, groups, stop) and the state file
    pump             the datapath behind eth4 (BPF, plain, or the bench's ceiling)

Bring-up (before the loop runs; `xdpoib attach` waits for it): open the SA client, wait for the port
to be ACTIVE with a LID, open the backend, join the broadcast group (its parameters are the template
of every other group), create the UD QP and post its receive buffers, set up the links, restore the
persisted peers, start the datapath, open the control socket, raise the carrier, announce.
From then on the loop's thread never calls the SA: it submits to the SA worker and handles answers as
events, so the data plane never waits for the SM, and the budgets keep the control plane served
however hard the data plane is pushed.

Run as `python -m xdpoib.agent SPEC_JSON` (what `xdpoib attach` starts); the process must be the port's
umad client (on the sim fabric: started with `SimFabric.client_env(host)`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import Counter
from contextlib import ExitStack

from xdpoib import link, state
from xdpoib.agent import links, service
from xdpoib.agent.forward import Forwarder
from xdpoib.agent.groups import JOIN_FULL, MEMBERSHIP_CHECK_S, Membership
from xdpoib.agent.loop import EventLoop, Worker
from xdpoib.agent.migration import Migration
from xdpoib.agent.partitions import Partitions, join_with_retry, wait_for_pkey
from xdpoib.agent.resolver import Resolver
from xdpoib.agent.vifs import IDLE_CHECK_S, Vifs
from xdpoib.errors import XdpoibError
from xdpoib.fabric.base import GRH_LEN
from xdpoib.peers import PeerTable
from xdpoib.wire.addr import IPoIBAddr, mac_str
from xdpoib.wire.mgid import broadcast_mgid, full_pkey
from xdpoib.wire.oracle import Vif

log = logging.getLogger("xdpoib.agent")

RECV_BUFFERS = 4096        # a burst the pump has not drained yet must find buffers
MCAST_SYNC_S = 1.0
SAVE_S = 2.0               # persist newly learned peers at most this often (a SIGKILL loses less)
DATAPATHS = ("bpf", "plain", "ceiling")


class AgentError(XdpoibError):
    """The agent could not bring the attachment up."""


class Agent:
    """One attachment's agent."""

    def __init__(self, spec: state.AttachSpec, successor: bool = False):
        self.spec = spec
        # whether what the attachment shares (links, pins, XDP programs, state files, the port's group
        # memberships) is this agent's to change and remove: not for a successor until it takes over,
        # nor for an agent once it handed over (handover.py)
        self.owns = not successor
        self.successor = None
        if successor:
            from xdpoib.agent.handover import Successor

            self.successor = Successor(self)
        self.pkey = full_pkey(spec.pkey)
        self.stack = ExitStack()
        self.vif_learned = True         # veth: eth4's MAC is ours; tap: learned from the guest
        self.state = "starting"
        self.drops: Counter = Counter()          # by DropReason (xdpoib/reasons.py)
        self.stats: Counter = Counter()
        self.started = time.time()
        self.datapath = os.environ.get("XDPOIB_DATAPATH", "bpf")
        if self.datapath not in DATAPATHS:
            raise AgentError(f"XDPOIB_DATAPATH must be one of {', '.join(DATAPATHS)}, not {self.datapath!r}")
        self.want_bpf = self.datapath == "bpf"
        self.loop = EventLoop()
        self.membership = Membership(self)
        self.resolver = Resolver(self)
        self.forwarder = Forwarder(self)
        self.announcer = links.Announcer(self)
        self.vifs = Vifs(self, getattr(spec, "learn_vifs", 0), getattr(spec, "vif_idle", 300.0))
        self.migration = Migration(self)
        self._saved_vifs: list = []
        self.partitions = Partitions(self)
        self._saved_peers = 0
        self.capture = None             # an xdpoib capture in progress (xdpoib/capture.py), else None
        self.waiting_for: str | None = None     # what the attachment waits for (a partition, a broadcast group)

    @property
    def stopping(self) -> bool:
        return self.loop.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.loop.stopping = value

    @property
    def groups(self):
        return self.membership.groups

    def shared(self, fn, *args, **kw) -> None:
        """Push the undo of something the attachment shares: it runs only while this agent owns it."""
        self.stack.callback(lambda: self.owns and fn(*args, **kw))

    def qp_list(self) -> list:
        """Every QP of this agent: the untagged one, one per extra partition, one per guest VIF."""
        qps = [self.qp, *self.partitions.extra_qps()]
        return qps + [v.qp for v in self.vifs.by_id.values() if v.vif_id and v.qp not in qps]

    def qp_fds(self) -> set[int]:
        return {qp.fileno() for qp in self.qp_list()}

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
        self.stack.callback(self.loop.close)
        self.sa = self._open_sa()
        self.stack.callback(self.sa.close)
        self.port = self._wait_active(30.0)
        # the partition and its broadcast group are waited for up to --wait (partitions.py)
        wait = float(getattr(s, "wait", 60.0))
        until = time.monotonic() + wait
        self.port = wait_for_pkey(self.sa, self.port, self.pkey, until, wait, self._say)
        Partitions.check(self.port, self.pkey, getattr(s, "vlans", []))
        self.backend = self._open_backend()
        self.stack.callback(self.backend.close)
        self.port_attrs = self.backend.port()
        # SA calls from now on run on the SA worker (closed before the SA client: pushed after it)
        self.sa_worker = Worker("sa", self.loop)
        self.stack.callback(self.sa_worker.close)
        self.host_worker = Worker("host", self.loop)
        self.stack.callback(self.host_worker.close)

        # the broadcast group: its parameters are the template of every other group (docs/design.md §3.5)
        self.bcast_mgid = broadcast_mgid(self.pkey)
        self.bcast = join_with_retry(self.sa, self.bcast_mgid, until, wait, self._say)
        self.qkey = self.bcast.qkey
        self.ib_mtu = min(self.bcast.mtu_bytes or 2048, self.port_attrs.active_mtu)
        self._create_qp()
        self.stack.callback(lambda: self.qp.close())
        self.partitions.untagged(self.qp)
        g = self.membership.group(self.bcast_mgid, "broadcast")
        self.membership.record_join(g, self.bcast, JOIN_FULL)
        self.stack.callback(self.membership.leave_all)
        self.partitions.bring_up(getattr(s, "vlans", []),
                                 lambda mgid: join_with_retry(self.sa, mgid, until, wait, self._say))
        self.waiting_for = None

        # links
        self.mac = s.port_mac(self.port_attrs.port_guid.to_bytes(8, "big"))
        if self.successor is not None:
            # the running agent's AF_XDP socket (it saves its state file first; read at the handover);
            # in TAP mode also the guest's MAC it learned
            self.successor.prepare()
            self.mac = self.successor.mac or self.mac
        self.eth_mtu = self.ib_mtu - 4
        self.attach_to = links.set_up(self)
        self.ifindex = link.link_info(self.attach_to).index

        self.vif = Vif(0, self.mac, IPoIBAddr(0, self.qp.qpn, self.port_attrs.gid))
        self.peers = PeerTable([self.vif], self.partitions.vlan_pkeys())
        self.peers.learn_vifs = self.vifs.learn_max > 0     # unknown source MACs reach us (vifs.py)
        v0 = self.vifs.primary(self.qp, self.mac)
        if self.successor is not None:
            v0.addrs = set(self.successor.addresses)
        self.stack.callback(self.vifs.close)
        if self.successor is None:
            service.restore_state(self)
        else:
            self.stats["paths_warmed"] = self.successor.warm_paths()

        # datapath: frames from eth4 reach us on an AF_XDP socket; the translating programs unless
        # asked otherwise; a TAP starts with the plain path (the guest's MAC is not known yet)
        from xdpoib.pump import PlainPump

        if self.datapath == "ceiling" and s.mode == "veth":
            link.set_offloads(s.ifname, s.netns, gro=True)
            self._start_bpf(ceiling=True)
        elif self.want_bpf and s.mode == "veth":
            link.set_offloads(s.ifname, s.netns, gro=True)      # redirected frames need GRO or XDP on eth4
            self._start_bpf(adopt=self.successor.adopt if self.successor else None)
        elif self.successor is not None:                        # TAP mode, the guest's MAC known
            self._start_bpf(adopt=self.successor.adopt)
        else:
            self.pump = PlainPump(self, self.attach_to, self.ifindex)
        self.stack.callback(lambda: self.pump.close())
        self.peers.on_new = lambda e: self.pump.add_peers([e])

        # control socket, then carrier: only now does eth4 pass traffic
        state.ensure_dirs()
        from xdpoib.control import ControlServer

        if self.successor is not None:
            from xdpoib.agent.handover import next_socket_path

            sock = next_socket_path(s.id)
        else:
            sock = state.socket_path(s.id)
        self.control = ControlServer(sock, lambda req: service.handle_request(self, req))
        self.stack.callback(self.control.close)
        self.shared(state.remove_files, s.id, True)
        addresses = None
        if self.successor is not None:
            addresses = self._eth4_addresses()         # read before: announced as soon as the loop runs
            self._take_over()
            self.successor.announce_again()
        link.set_link(s.internal, None, up=True)        # veth and tap mode alike (links.py)
        s.pid = os.getpid()
        # agents still draining their old QPs after handing over to us (detach stops them too)
        s.draining = [p for p in (*s.draining, getattr(self.successor, "old_pid", None))
                      if p and state.pid_alive(p)]
        state.write_spec(s)
        self._wire_loop()
        self.vifs.restore(self._saved_vifs)
        self.state = "running"
        # announce right away: the addresses eth4 already has (an adopted eth4 keeps them). A successor
        # does it last, as its loop is about to run: before its first data frame leaves (a peer drops
        # datagrams from a QPN it has not heard of while it asks the SA who that is), and not before
        # its QPs are read (the sim's receive queues hold 10 datagrams)
        self.announcer.due = True
        self.announcer.addresses(addresses if addresses is not None else (self._eth4_addresses() or []))
        if self.successor is not None and s.mode == "tap":
            self.vifs.announce(v0, v0.addrs, ipv6=True)    # the guest, VIF 0 here, has a new QPN
        log.info("attached %s: MAC %s MTU %d QPN %#x LID %d", s.where, mac_str(self.mac), self.eth_mtu,
                 self.qp.qpn, self.port.lid)

    def _eth4_addresses(self) -> list[bytes] | None:
        try:
            return links.read_eth4(self.spec)[1]
        except Exception as e:          # a namespace gone, a command that failed: nothing to announce
            log.warning("reading eth4's addresses: %s", e)
            return None

    def _take_over(self) -> None:
        """A successor, everything built: the running agent stops, we start (handover.py)."""
        t0 = time.perf_counter()
        answer = self.successor.handover()
        if self.successor.rebind:
            self.pump.bind_socket()         # first: eth4's frames find no socket until then
        if os.environ.get("XDPOIB_TEST_FAIL_AFTER_HANDOVER") == "1":      # the restart's fallback, tested
            raise AgentError("failing after the handover, as asked (XDPOIB_TEST_FAIL_AFTER_HANDOVER=1)")
        service.restore_state(self)         # what the old agent saved as it stopped
        self.successor.resolve_known()
        ms = self.successor.take_over(t0)
        self.stats["took_over"] += 1
        self.handover_ms = round(ms, 2)
        log.info("took over from pid %d: %.1f ms from our request to the datapath being ours (its "
                 "quiesce %.1f ms)", self.successor.old_pid, ms, answer.get("quiesce_ms", 0.0))

    def _open_sa(self):
        """The path-and-membership provider (`provider.py`): the SA on InfiniBand, the port itself on RoCE.
        A verbs port is opened with it (its link layer decides which); `_open_backend` hands it on."""
        from xdpoib.agent.provider import open_provider
        from xdpoib.fabric.sa import RetryPolicy

        # shorter than the client's default: a query the SM does not answer gives up after ~2.5 s and
        # the agent's own backoff (1 s doubling to 16 s) spaces the next tries
        policy = RetryPolicy(timeout=0.1, max_timeout=1.0, retries=4, deadline=4.0)
        return open_provider(self.spec, self.pkey, policy)

    def _open_backend(self):
        if self.sa.backend is not None:         # a verbs port, opened with the provider
            return self.sa.backend
        from xdpoib.fabric.simud import SimUdBackend

        return SimUdBackend.open(self.spec.fabric, sa=self.sa.client)

    def _wait_active(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            p = self.sa.port()
            if self.sa.ready(p):
                return p
            if time.monotonic() > deadline:
                raise AgentError(f"port is {p.state_name} (LID {p.lid}) after {timeout:.0f} s")
            time.sleep(0.2)

    def _say(self, text: str) -> None:
        """What bring-up (or a lost broadcast group) waits for: logged (`attach` echoes it), and in `status`."""
        self.waiting_for = text
        log.warning("%s", text)
        internal = links.internal_name(self.spec)
        if self.state == "starting" and self.owns and link.link_exists(internal):  # left by an agent that died
            try:                                                        # (adopted later): no carrier meanwhile
                link.set_link(internal, None, up=False)
            except (XdpoibError, OSError) as e:
                log.warning("carrier off on %s: %s", internal, e)

    def _create_qp(self) -> None:
        from xdpoib.fabric.base import LoopbackFilter

        # buffers for the largest datagram the port can receive (not the group MTU): a longer one would
        # complete in error and leave the QP in the error state (fabric/base.py)
        size = GRH_LEN + max(self.ib_mtu, self.port_attrs.active_mtu)
        self.adoption = self._prepare_datapath() if self.want_bpf else None
        pool = self._pool_in_inject_slots(size) or self.backend.alloc_pool(RECV_BUFFERS, size)
        self.qp = self.backend.create_qp(self.pkey, self.qkey, pool)
        self.qp.post_recv(range(pool.count))
        if not hasattr(self, "loopback"):
            self.loopback = LoopbackFilter(self.port_attrs, [self.qp.qpn])
        self.loopback.qpns = {self.qp.qpn}

    def _prepare_datapath(self):
        """The translating programs and maps pinned, nothing attached (compiled in a child, or adopted):
        before the untagged QP, whose receive buffers lie in the inject map, and in TAP mode so that the
        switch to them once the guest's MAC is known takes milliseconds instead of stopping the loop.
        Returns what `prepare` did, for the pump that takes the pins over."""
        from xdpoib.datapath.loader import prepare, unpin
        from xdpoib.pump import pin_dir

        pins = pin_dir(self.spec.id)
        adoption = prepare(pins)
        self.shared(unpin, pins)
        return adoption

    def _pool_in_inject_slots(self, size: int):
        """The untagged QP's receive buffers inside a region of the datapath's inject map (claimed for this
        process), so a received frame is injected where it landed (docs/datapath.md, "Received in place");
        None (a pool of its own, frames copied once) for the plain and ceiling datapaths, with
        XDPOIB_RX_IN_PLACE=0, or when the datapath cannot give one. `rx_region` and `rx_pool` say what
        was made."""
        from xdpoib.datapath import bpfsys
        from xdpoib.datapath.inject import RxRegion
        from xdpoib.pump import pin_dir

        self.rx_region = self.rx_pool = None
        if not self.want_bpf or os.environ.get("XDPOIB_RX_IN_PLACE") == "0":
            return None
        region = None
        try:
            fd = bpfsys.obj_get(str(pin_dir(self.spec.id) / "xo_inject"))
            try:
                region = RxRegion(fd, self.spec.id)
            finally:
                os.close(fd)
            self.stack.callback(region.close)               # after the QP closes (pushed before it)
            pool = self.backend.alloc_pool(region.count, size, **region.pool_args())
        except (XdpoibError, OSError) as e:
            log.warning("received frames are copied into the inject map: %s", e)
            if region is not None:
                region.close()                  # for a successor to claim
            return None
        if not region.holds(pool):              # a backend in another process receives into a copy
            region.close()
            return None
        self.rx_region, self.rx_pool = region, pool
        return pool

    def _start_bpf(self, ceiling: bool = False, adopt=None) -> None:
        from xdpoib.pump import BpfPump, CeilingPump

        cls = CeilingPump if ceiling else BpfPump
        self.pump = cls(self, self.attach_to, self.ifindex, self.spec.id, adopt=adopt, adoption=self.adoption)
        self.adoption = None        # prepared once, for the first pump (in TAP mode: once the guest is known)
        if self.pump.adopted:
            self.stats["adopted_datapath"] += 1
            log.info("adopted the datapath pinned under %s", self.pump.pin_dir)
        for g in self.groups.values():
            self.pump.set_group(g.mgid, g.group_id)

    def upgrade_pump(self) -> None:
        """TAP mode, guest MAC learned: move from the plain path to the translating programs (the few
        frames in flight meanwhile are lost, as on a link flap)."""
        old = self.pump
        self.loop.remove_reader(old.fileno())
        t0 = time.perf_counter()
        old.close()
        try:
            self._start_bpf()       # its AF_XDP socket waits for the kernel to release the old one's queue
            self.stats["datapath_upgrades"] += 1
            log.info("switched to the translating datapath in %.1f ms", (time.perf_counter() - t0) * 1e3)
        except XdpoibError as e:
            from xdpoib.pump import PlainPump

            log.warning("staying on the plain datapath: %s", e)
            self.stats["datapath_upgrade_failures"] += 1
            self.want_bpf = False
            self.pump = PlainPump(self, self.attach_to, self.ifindex)
        self.loop.add_reader(self.pump.fileno(), lambda: None)

    def learn_vif(self, frame: bytes) -> None:
        """TAP mode: the guest's MAC (the source of its first unicast-sourced frame) becomes the VIF."""
        src = bytes(frame[6:12])
        if len(frame) >= 14 and not src[0] & 1 and any(src):
            self.mac = src
            self.vifs.set_primary_mac(src)
            self.vif_learned = True
            log.info("guest MAC %s learned on %s", mac_str(src), self.spec.ifname)

    # ================================================================================ the loop

    def _wire_loop(self) -> None:
        lp = self.loop
        lp.add_reader(self.pump.fileno(), lambda: None)        # wakes the loop; the poller does the work
        lp.add_poller(self.qp.fileno(), self.forwarder.from_fabric)
        for qp in self.partitions.extra_qps():
            self.wire_qp(qp)
        lp.add_poller(None, self.forwarder.from_eth)
        lp.add_poller(None, self._kick)
        lp.pause_wait = lambda t: self.qp.wait_writable(t)     # held back by the fabric: wait on it
        lp.add_reader(self.backend.events.fileno(), self.on_port_events)
        lp.add_reader(self.control.fileno(), self.control.handle)
        lp.every(MCAST_SYNC_S, self._sync_eth4)
        lp.every(MEMBERSHIP_CHECK_S, self.membership.check)
        lp.every(SAVE_S, self._maybe_save)
        from xdpoib.agent import aging
        aging.install(self)             # bounded state: peer and path aging, caches, the SA query gate
        lp.every(IDLE_CHECK_S, self.vifs.expire)
        self.migration.start()          # guests leaving the bridge behind eth4

    def wire_qp(self, qp) -> None:
        """A VIF's QP joins the loop (its completions are polled with the others by the forwarder)."""
        self.loop.add_reader(qp.fileno(), lambda: None)

    def unwire_qp(self, qp) -> None:
        self.loop.remove_reader(qp.fileno())

    def _kick(self, budget: int) -> int:
        if self.pump.pending_tx():
            self.pump.kick()
        return 0

    def _sync_eth4(self) -> None:
        """Every second: read eth4's multicast list and addresses on the host worker; act on the answer."""
        spec = self.spec

        def done(ok, res):
            if not ok:
                log.warning("reading eth4's multicast list and addresses: %s", res)
                return
            groups, addresses = res
            self.membership.sync(groups)
            self.announcer.addresses(addresses)
        self.host_worker.submit(("eth4",), lambda: links.read_eth4(spec), done)

    def _maybe_save(self) -> None:
        if len(self.peers.entries) != self._saved_peers:
            service.save_state(self)

    def on_port_events(self) -> None:
        """Port events: drop paths, check memberships (and rejoin) right away, then announce again."""
        from xdpoib.fabric.base import PortEventKind

        for ev in self.backend.events.get():
            self.stats[f"port_event_{ev.kind.value}"] += 1
            log.info("port event %s", ev.kind.value)
            if ev.attrs is not None:
                self.port_attrs = ev.attrs
                self.loopback.port = ev.attrs
            from xdpoib.agent import aging
            aging.on_port_event(self, ev)         # the SA client's path cache too
            if ev.kind is PortEventKind.PORT_ERR:
                continue
            self.peers.forget_paths()
            self.membership.check()
            self.announcer.due = True

    def on_completion_errors(self, n: int) -> bool:
        """Error completions: True when the QP is in the error state (the caller must not repost); the
        QP is then replaced (`recovery.py`)."""
        return self._recovery().on_errors(n)

    def recreate_qp(self) -> None:
        """Replace a QP in the error state now (`recovery.QpRecovery.recreate`)."""
        self._recovery().recreate()

    def _recovery(self):
        if not hasattr(self, "recovery"):       # made on the first error: bring-up never needs it
            from xdpoib.agent.recovery import QpRecovery

            self.recovery = QpRecovery(self)
        return self.recovery

    def run(self) -> None:
        """Serve until stopped (SIGTERM, SIGINT, or a `stop` request)."""
        self.loop.run()
        if self.state != "handed over":
            self.state = "stopping"

    # ================================================================================ teardown

    def close(self) -> None:
        """Release everything in reverse order (idempotent)."""
        if hasattr(self, "peers") and self.owns:
            service.save_state(self)
        self.stack.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m xdpoib.agent SPEC_JSON`: run one attachment's agent in the foreground."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    spec = state.AttachSpec.from_json(argv[0])
    state.code_id()                 # what this agent runs, fixed now (`xdpoib up` compares it after an upgrade)
    try:
        agent = Agent(spec, successor="--successor" in argv[1:])
    except XdpoibError as e:
        print(f"xdpoib agent: error: {e}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.start()
    except XdpoibError as e:
        print(f"xdpoib agent: error: {e}", file=sys.stderr)
        return 1
    from xdpoib.agent.handover import notify_systemd

    notify_systemd(os.getpid())     # under systemd (a reload's new agent): the unit's main process now
    try:
        agent.run()
    finally:
        agent.close()
        if agent.state == "handed over":
            log.info("exited: %s is served by the agent that took over", spec.where)
        else:
            log.info("detached %s", spec.where)
    return 0
