"""Make-before-break restart: a successor agent is built beside the running one, then takes over.

`xdpoib restart` (and `systemctl reload xdpoib@...`, and `xdpoib up` after an upgrade) starts a second
agent for the same attachment with `--successor`. The two talk over the running agent's control socket:

1. The successor brings up everything that is its own while the running agent keeps forwarding: the
   SA client, its QPs (new QPNs), its joins (the SA keeps one membership per port: joining again is a
   no-op there), the datapath pins (compiled in a child for a new build, rebuilt for another ABI;
   nothing is attached yet) and a control socket at a temporary path.
2. `handover_prepare`: the running agent saves its state file (peers learned since the last save) and
   answers with its AF_XDP socket and the memfd of its UMEM (SCM_RIGHTS). The successor maps the same
   UMEM and rings (`XskSocket.adopt`) without touching them, and reads the state file.
3. `handover`: the running agent finishes its turn, gives every UMEM frame back to the fill ring once
   its send is over (`BpfPump.quiesce`), stops reading the socket and answers. From here frames from
   eth4 wait in the socket's RX ring (2,048 deep), the socket is never closed or rebound.
4. The successor takes over at once (`Successor.take_over`): the receive queues of its QPs emptied of
   what arrived before (group traffic the old agent delivered), then `handover_done` tells the old agent
   to stop delivering the groups (so a group frame may come twice in between, never not at all), the
   maps filled from its tables, the programs attached (an attached one is swapped with
   XDP_FLAGS_REPLACE), its control socket moved over the real path (rename), the state file rewritten
   with its pid; then the ordinary loop, and
   every VIF's new QPN announced (gratuitous ARP, unsolicited NA), again after 1.2 s and 3 s (Linux
   ignores a second update of a neighbour within `locktime`, 1 s).
5. The old agent drains (`drain`): it keeps receiving on its old QPs for peers whose neighbour entries
   still name the old QPN, and injects those frames one at a time through the RX program (the batched
   injection's slots are the successor's now); group traffic only until `handover_done`. It reads nothing
   from eth4, writes no map, saves no state, leaves no group in the SA (the membership is the port's,
   and the successor holds it) and removes nothing the successor uses. It exits after GRACE_S, later
   while unicast still reaches it (1 s of silence, at most MAX_GRACE_S).

A successor that fails before step 3 exits without touching what the running agent uses (its undo of
shared things is skipped while it does not own the attachment): the running agent serves on.
"""

from __future__ import annotations

import logging
import os
import time

from xdpoib import state
from xdpoib.agent import service
from xdpoib.errors import XdpoibError
from xdpoib.pump import NoMaps
from xdpoib.reasons import DropReason as R

log = logging.getLogger("xdpoib.agent")

GRACE_S = float(os.environ.get("XDPOIB_HANDOVER_GRACE", "3.0"))
MAX_GRACE_S = 10.0
QUIET_S = 1.0               # the old agent stays while unicast reached it less than this long ago
ANNOUNCE_AGAIN_S = (1.2, 3.0)


class HandoverError(XdpoibError):
    """The running agent and its successor could not agree on a handover."""


def next_socket_path(aid: str):
    """The successor's control socket until it takes over."""
    p = state.socket_path(aid)
    return p.with_name(p.name + ".next")


# ================================================================= the running agent's side

def handle(a, req: dict) -> dict:
    """The control requests `handover_prepare` and `handover` (from a successor)."""
    cmd = req["cmd"]
    if cmd == "handover_done":          # the successor's QPs deliver the groups from now on
        if not isinstance(a.pump, DrainPump):
            raise HandoverError("no handover in progress")
        a.pump.multicast = False
        a.membership.detach_local()
        return {}
    if a.state != "running":
        raise HandoverError(f"the running agent is {a.state}, not ready to hand over")
    pump = a.pump
    if pump.name != "bpf":
        raise HandoverError(f"the {pump.name} datapath cannot be handed over (only the BPF one); "
                            "use attach --force")
    if cmd == "handover_prepare":
        service.save_state(a)
        a.stats["handover_prepared"] += 1
        log.info("a successor (pid %s) prepares to take over", req.get("pid"))
        v0 = a.vifs.by_id.get(0)
        return {"pid": os.getpid(), "geometry": pump.xsk.geometry(), "mac": a.mac.hex(),
                "addresses": sorted(x.hex() for x in (v0.addrs if v0 is not None else ())),
                "tap_mtu": getattr(a, "tap_mtu_before", None), "_fds": list(pump.xsk.handover_fds())}
    # cmd == "handover": stop using the socket and the shared state, keep the old QPs a while
    t0 = time.perf_counter()
    clean = pump.quiesce()
    a.loop.remove_reader(pump.fileno())
    if req.get("rebind"):               # the successor could not adopt the socket: it binds its own
        release_socket(a, pump)
    service.save_state(a)
    a.pump = DrainPump(a, pump)
    a.owns = False
    a.state = "handed over"
    a.stats["handed_over"] += 1
    try:
        grace = min(60.0, max(0.0, float(req.get("grace", GRACE_S))))
    except (TypeError, ValueError):
        grace = GRACE_S
    _drain(a, grace)
    ms = (time.perf_counter() - t0) * 1e3
    log.info("handed over to pid %s in %.1f ms%s; draining the old QPs", req.get("pid"), ms,
             "" if clean else " (sends still in flight after 1 s)")
    return {"quiesce_ms": round(ms, 2), "clean": clean}


def release_socket(a, pump) -> None:
    """For a successor that binds its own socket: what waits in our RX ring is forwarded, then the socket
    is closed (the kernel frees the queue for the successor's bind). Frames from eth4 meanwhile find no
    socket: the programs count them (redirect_failed) until the successor's bind, a millisecond or so."""
    for _ in range(64):
        if not pump.xsk.rx_pending():
            break
        a.forwarder.from_eth(a.loop.budget)
    pump.quiesce()
    pump.close_socket()


def _drain(a, grace: float) -> None:
    """The old agent from the handover on: only its QPs, until the grace period is over."""
    lp = a.loop
    lp.clear_timers()
    keep = a.qp_fds() | {a.control.fileno()}     # the control socket: for `handover_done`
    for fd in list(lp.readers()):
        if fd not in keep:
            lp.remove_reader(fd)
    started = time.monotonic()

    def check():
        now = time.monotonic()
        quiet = now - a.pump.last_unicast >= QUIET_S
        if now - started >= max(grace, MAX_GRACE_S) or (now - started >= grace and quiet):
            from xdpoib.reasons import counts

            log.info("grace over (%.1f s, %d frames injected for peers on the old QPNs): exiting; drops "
                     "since start %s", now - started, a.pump.injected, counts(a.drops) or "none")
            a.stopping = True
        else:
            lp.call_later(0.25, check)
    lp.call_later(grace, check)


class DrainPump(NoMaps):
    """The datapath of an agent that handed over: frames from its old QPs, one live-frames call each
    (the RX program, not the batch program whose slots the successor fills); nothing from eth4, no map
    written (the successor's tables rule them)."""

    name = "drain"
    send_memory = None

    def __init__(self, agent, old) -> None:
        from xdpoib import abi

        self.agent, self.old = agent, old
        self._rx_fd = old.dp.fd("xdpoib_rx")
        self._abi = abi
        self.last_unicast = time.monotonic()
        self.injected = 0
        self.multicast = True       # until the successor says its QPs deliver the groups
        self._out: list[tuple[bytes, bytes]] = []

    def fileno(self) -> int:
        return -1

    def receive(self, budget: int, batch) -> int:
        return 0

    def tx_done(self) -> None:
        pass

    def pending_tx(self) -> bool:
        return False

    def kick(self) -> None:
        pass

    def control(self, frame):
        return None

    def rx_frame(self, payload, peer, multicast: bool, vif, pkey: int) -> None:
        a = self.agent
        if multicast and not self.multicast:
            a.drops[R.HANDED_OVER] += 1         # the successor's QPs receive the group too
            return
        if len(payload) < 14:
            a.drops[R.RUNT] += 1
            return
        if not multicast:
            self.last_unicast = time.monotonic()
        self._out.append((bytes(payload), self._abi.rx_meta(peer.peer_id, vif.vif_id, pkey | 0x8000,
                                                            multicast=multicast)))

    def rx_ethernet(self, frame: bytes) -> None:
        a = self.agent
        self._out.append((bytes(frame), self._abi.rx_meta(0, a.vif.vif_id, a.pkey, ethernet=True)))

    def rx_flush(self) -> int:
        from xdpoib.datapath import testrun

        out, self._out = self._out, []
        for frame, meta in out:
            try:
                testrun.run_live(self._rx_fd, frame, meta)
            except XdpoibError as e:
                self.agent.drops[R.HANDED_OVER] += 1
                log.debug("injecting while draining: %s", e)
                continue
            self.injected += 1
        if out:
            self.agent.stats["drained_frames"] += len(out)
        return len(out)

    def counters(self) -> dict:
        return {"drained_frames": self.injected}

    def close(self) -> None:
        """Close our descriptors only: the links, programs, pins, socket and UMEM live on in the successor."""
        old = self.old
        old.owner = False
        old.close()


# ================================================================= the successor's side

class Successor:
    """What a successor agent keeps from the running one between `prepare` and `take_over`."""

    def __init__(self, a) -> None:
        self.a = a
        self.path = state.socket_path(a.spec.id)
        self.old_pid: int | None = None
        self.adopt = None                   # the adopted XskSocket, or "rebind"
        self.rebind = False
        self.mac: bytes | None = None       # the running agent's VIF 0 MAC (TAP mode: the guest's)
        self.addresses: set[bytes] = set()
        self.tap_mtu: int | None = None

    def prepare(self) -> None:
        """Ask the running agent for its AF_XDP socket and UMEM (it saves its state file first)."""
        from xdpoib import control

        try:
            ans, fds = control.request_fds(self.path, "handover_prepare", timeout=10.0, pid=os.getpid())
        except control.ControlError as e:
            raise HandoverError(f"the running agent refused to prepare a handover: {e}") from None
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise HandoverError("the running agent did not hand over its AF_XDP socket")
        self.old_pid = int(ans["pid"])
        from xdpoib.afxdp import XskBusy, XskSocket

        try:
            if os.environ.get("XDPOIB_HANDOVER_REBIND") == "1":     # as where the kernel refuses (tests)
                import errno

                os.close(fds[0])
                os.close(fds[1])
                raise XskBusy(f"adopting the AF_XDP socket: {os.strerror(errno.EBUSY)} (XDPOIB_HANDOVER_REBIND=1)")
            self.adopt = XskSocket.adopt(fds[0], fds[1], ans["geometry"])
        except XskBusy as e:
            # this kernel maps a socket's rings only before its bind: our own socket, bound the moment
            # the running agent closes its one (a millisecond or so without a socket)
            log.info("%s: a socket of our own replaces it at the handover", e)
            self.adopt, self.rebind = "rebind", True
        self.mac = bytes.fromhex(ans.get("mac", "")) or None
        self.addresses = {bytes.fromhex(x) for x in ans.get("addresses", [])}     # VIF 0's (TAP: the guest's)
        self.tap_mtu = ans.get("tap_mtu")
        log.info("taking over from pid %d: its AF_XDP socket and UMEM received", self.old_pid)

    def warm_paths(self, budget_s: float = 1.0, most: int = 4096) -> int:
        """Ask the SA for the paths to the peers of the state file the running agent just saved (into
        the SA client's cache) while it still forwards: the first frames after the take-over find
        their paths at once instead of queueing behind queries. Returns how many were answered."""
        import json

        from xdpoib.peers import PeerTable

        a = self.a
        try:
            gids = PeerTable.saved_gids(json.loads(state.persist_path(a.spec.id).read_text())["peers"])[:most]
        except (OSError, ValueError, XdpoibError, TypeError, IndexError, KeyError, AttributeError):
            return 0
        until, got = time.monotonic() + budget_s, 0
        for gid in gids:
            if time.monotonic() > until:
                break
            try:
                a.sa.path(gid, sgid=a.port_attrs.gid, pkey=a.pkey)
                got += 1
            except XdpoibError:
                continue
        return got

    def resolve_known(self, budget_s: float = 0.2) -> int:
        """At the take-over: the restored peers get their paths from the cache `warm_paths` filled."""
        a = self.a
        until, n = time.monotonic() + budget_s, 0
        for e in list(a.peers.entries.values()):
            if e.path_state == "resolved" or time.monotonic() > until:
                continue
            try:
                path, ah = a.resolver.path_of(a.sa.path(e.addr.gid, sgid=a.port_attrs.gid, pkey=a.pkey))
            except Exception:               # resolved on use instead, as for any agent
                continue
            a.resolver.use_path(e, path, ah, "paths_resolved")
            n += 1
        return n

    def handover(self) -> dict:
        """Ask the running agent to stop using the datapath; from its answer on, it is ours."""
        from xdpoib import control

        try:
            return control.request(self.path, "handover", timeout=10.0, pid=os.getpid(), grace=GRACE_S,
                                   rebind=self.rebind)
        except control.ControlError as e:
            raise HandoverError(f"the running agent refused the handover: {e}") from None

    def take_over(self, t0: float) -> float:
        """Everything the running agent stopped doing, at once; returns the milliseconds since t0."""
        a = self.a
        t1 = time.perf_counter()
        # what our QPs received so far: group traffic the running agent delivered (nobody knows our
        # QPNs yet); it delivers the groups until told, after this pass (a frame or two may come twice,
        # none is lost)
        dropped = sum(discard_received(a, qp) for qp in a.qp_list())
        from xdpoib import control

        try:
            control.request(self.path, "handover_done", timeout=5.0)
        except control.ControlError as e:
            log.warning("telling the old agent to leave the groups to us: %s", e)
        t2 = time.perf_counter()
        a.pump.take_over()
        t3 = time.perf_counter()
        a.control.move_to(self.path)
        a.owns = True
        log.info("take-over steps: handover request and state file %.1f ms, %d frames of before dropped "
                 "%.1f ms, maps and programs %.1f ms", (t1 - t0) * 1e3, dropped, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
        return (time.perf_counter() - t0) * 1e3

    def announce_again(self) -> None:
        a = self.a

        def again():
            a.announcer.due = True
            a.vifs.announce_all()
        for delay in ANNOUNCE_AGAIN_S:
            a.loop.call_later(delay, again)


def notify_systemd(pid: int) -> bool:
    """Tell systemd (a `systemctl reload` of xdpoib@.service, NotifyAccess=all) that the unit's main
    process is now `pid`: the old agent's exit then does not end the unit. False without NOTIFY_SOCKET."""
    import socket

    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    addr = "\0" + where[1:] if where.startswith("@") else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(f"MAINPID={pid}\nREADY=1\n".encode(), addr)
    except OSError as e:
        log.warning("telling systemd our pid (%s): %s", where, e)
        return False
    return True


def discard_received(a, qp) -> int:
    """Empty a QP's receive queue of what arrived before the handover (group traffic the running agent
    delivered itself), reposting the buffers; returns how many were dropped."""
    from xdpoib.fabric.base import CompletionStatus

    n = 0
    while True:
        comps = qp.poll(256)
        if not comps:
            break
        n += len(comps)
        qp.post_recv([c.index for c in comps if c.status != CompletionStatus.WR_FLUSH_ERR])
    if n:
        a.drops[R.HANDED_OVER] += n
    return n
