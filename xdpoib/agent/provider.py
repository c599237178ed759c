"""Paths and memberships behind one interface: the SA on an InfiniBand port, the GID table on RoCE.

The agent asks its provider (`agent.sa`) for what IPoIB needs from the fabric, and never looks at the
link layer itself:

    port()                          our port now: GID, LID, state, P_Key table (a `sa.LocalPort`)
    ready(port)                     whether that port can carry traffic
    path(dgid, sgid=, pkey=)        a `sa.PathRecord` to a unicast peer (DLID, SL, MTU)
    path_to_lid(dlid, pkey)         who is behind a LID (a datagram without a GRH; RoCE: a local LID)
    join(mgid, state, create=)      a full membership (an `sa.MCMemberRecord`: Q_Key, MLID, MTU, ...)
    join_send_only(mgid, create=)   a send-only membership; send_only_join_state() its JoinState
    leave(mgid, state)              end a membership
    member(mgid)                    our membership as the fabric sees it now, or None
    stats, latency                  queries by (type, result) and their durations (status, metrics)
    close()

`SAProvider` (InfiniBand) is `xdpoib.fabric.sa.SAClient`: PathRecords and MCMemberRecords from the SA,
with the broadcast group's parameters as OpenSM created them (docs/design.md §3.5, §4).

`RoceProvider` (a verbs port whose link layer is Ethernet) has no SM to ask, so it answers from the port
itself: the port identity from the verbs port attributes and GID table (LID 0); a unicast "path" is the
peer's GID, always behind a GRH from the matching source GID, which the record carries as the local LID
the verbs backend gave that GID (`VerbsBackend.roce_route`; the same LID its datagrams complete with),
since the agent knows peers by (LID, QPN) and addresses them by a PathRecord's DLID as on IB; a full
membership is the port's netdev joining the MGID's IPv6 group (rxe delivers multicast only then; the
agent attaches the QP as on IB); every group has the parameters IPoIB's broadcast group has on IB
(Q_Key 0x0B1B, the port's active MTU, SL 0). There is no SA to learn a peer's MTU from: RoCE ports that
talk to each other must have the same MTU (docs/runbook.md).

`open_provider(spec, ...)` picks one: a verbs port is opened first and its link layer decides; the
provider keeps that backend (`provider.backend`) for the agent to use, and closes it if bring-up stops
before. The sim backend is always InfiniBand (`backend` None: the agent opens the sim data plane).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

from xdpoib.errors import XdpoibError
from xdpoib.fabric.base import PortState, mtu_enum
from xdpoib.fabric.sa import (
    JOIN_FULL,
    JOIN_SEND_ONLY_FULL,
    LatencyHistogram,
    LocalPort,
    MCMemberRecord,
    PathRecord,
    RetryPolicy,
    SAClient,
)

#: The Q_Key of IPoIB's broadcast group as OpenSM creates it (docs/design.md §3.5, §9): on RoCE no SA says it.
ROCE_QKEY = 0x0B1B
#: GRH hop limit of RoCE multicast (IPoIB's groups are link-local: scope 2).
ROCE_MCAST_HOP_LIMIT = 1


class ProviderError(XdpoibError):
    """The path-and-membership provider cannot answer (the fabric has no such notion, or the port failed)."""


class NoLidsError(ProviderError):
    """A LID no RoCE peer has (RoCE has no LIDs; the backend's local ones stand for GIDs it met)."""


class SAProvider:
    """The InfiniBand provider: an `SAClient` (every query goes to the SA, see the module doc)."""

    kind = "sa"

    def __init__(self, client: SAClient, backend=None) -> None:
        self.client = client
        self.backend = backend          # the verbs backend opened with it, or None (sim)

    @property
    def stats(self) -> Counter:
        return self.client.stats

    @property
    def latency(self) -> LatencyHistogram:
        return self.client.latency

    def port(self) -> LocalPort:
        return self.client.port()

    def ready(self, port: LocalPort) -> bool:
        """ACTIVE with a LID (the SM has swept the port)."""
        return bool(port.active and port.lid)

    def path(self, dgid, sgid=None, pkey: int = 0xFFFF) -> PathRecord:
        return self.client.path(dgid, sgid=sgid, pkey=pkey)

    def path_to_lid(self, dlid: int, pkey: int = 0xFFFF) -> PathRecord:
        return self.client.path_to_lid(dlid, pkey)

    def join(self, mgid, join_state: int = JOIN_FULL, create: MCMemberRecord | None = None) -> MCMemberRecord:
        return self.client.join(mgid, join_state, create=create)

    def join_send_only(self, mgid, create: MCMemberRecord | None = None) -> MCMemberRecord:
        return self.client.join_send_only(mgid, create=create)

    def send_only_join_state(self) -> int:
        return self.client.send_only_join_state()

    def leave(self, mgid, join_state: int = JOIN_FULL) -> MCMemberRecord:
        return self.client.leave(mgid, join_state)

    def member(self, mgid) -> MCMemberRecord | None:
        return self.client.member(mgid)

    def close(self) -> None:
        """Close the SA client, and the verbs backend if the agent never took it (idempotent)."""
        if self.backend is not None:
            self.backend.close()
        self.client.close()


class RoceProvider:
    """The RoCE provider: answers from the verbs port and the netdev (see the module doc)."""

    kind = "roce"

    def __init__(self, backend, pkey: int) -> None:
        self.backend = backend
        self.pkey = pkey
        self.stats: Counter = Counter()
        self.latency = LatencyHistogram()

    def _count(self, kind: str, t0: float, ok: bool = True) -> None:
        self.stats[(kind, "ok" if ok else "error")] += 1
        self.latency.observe(kind, time.monotonic() - t0)

    def port(self) -> LocalPort:
        """The verbs port as an SA client would report it: LID 0, no SM, the GID table's index 0."""
        p = self.backend.port()
        return LocalPort(ca_name=self.backend.device, portnum=self.backend.port_num, port_guid=p.port_guid,
                         gid_prefix=int.from_bytes(p.gid[:8], "big"), lid=0, lmc=0, sm_lid=0, sm_sl=0,
                         state=int(p.state), phys_state=5 if p.state is PortState.ACTIVE else 3, capability_mask=0,
                         mtu_cap=mtu_enum(p.active_mtu), active_mtu=mtu_enum(p.active_mtu), pkeys=p.pkeys)

    def ready(self, port: LocalPort) -> bool:
        """ACTIVE (there is no SM and no LID to wait for)."""
        return bool(port.active)

    def _record(self, mgid: bytes, join_state: int, create: MCMemberRecord | None) -> MCMemberRecord:
        """The group's parameters: the template's when given (the broadcast group's), else the port's."""
        if create is not None:
            return MCMemberRecord(mgid=mgid, port_gid=self.backend.port().gid, qkey=create.qkey, mlid=0,
                                  mtu_selector=2, mtu=create.mtu, tclass=create.tclass, pkey=create.pkey,
                                  sl=create.sl, flow_label=create.flow_label, hop_limit=create.hop_limit,
                                  scope=mgid[1] & 0xF, join_state=join_state)
        p = self.backend.port()
        return MCMemberRecord(mgid=mgid, port_gid=p.gid, qkey=ROCE_QKEY, mlid=0, mtu_selector=2,
                              mtu=mtu_enum(p.active_mtu), pkey=self.pkey, hop_limit=ROCE_MCAST_HOP_LIMIT,
                              scope=mgid[1] & 0xF, join_state=join_state)

    def path(self, dgid, sgid=None, pkey: int = 0xFFFF) -> PathRecord:
        """The peer's GID behind its local LID; the MTU is our port's (no SA knows the peer's)."""
        t0 = time.monotonic()
        try:
            dgid = bytes(dgid)
            p = self.backend.port()
            rec = PathRecord(dgid=dgid, sgid=bytes(sgid) if sgid is not None else p.gid,
                             dlid=self.backend.roce_route(dgid), pkey=pkey, mtu_selector=2,
                             mtu=mtu_enum(p.active_mtu))
        except XdpoibError:
            self._count("path", t0, ok=False)
            raise
        self._count("path", t0)
        return rec

    def path_to_lid(self, dlid: int, pkey: int = 0xFFFF) -> PathRecord:
        """Who has a local LID (the backend gave it to a GID it met); NoLidsError for any other LID."""
        gid = self.backend.roce_gid(dlid)
        if gid is None:
            raise NoLidsError(f"who is LID {dlid}: no RoCE peer has that local LID (RoCE has no LIDs)")
        return self.path(gid, pkey=pkey)

    def join(self, mgid, join_state: int = JOIN_FULL, create: MCMemberRecord | None = None) -> MCMemberRecord:
        """A full membership: the netdev joins the MGID's IPv6 group (so rxe delivers it)."""
        t0 = time.monotonic()
        mgid = bytes(mgid)
        try:
            if join_state & JOIN_FULL:
                self.backend.roce_join(mgid)
            rec = self._record(mgid, join_state, create)
        except XdpoibError:
            self._count("join", t0, ok=False)
            raise
        self._count("join", t0)
        return rec

    def join_send_only(self, mgid, create: MCMemberRecord | None = None) -> MCMemberRecord:
        """A send-only membership: nothing to join (sending to an IPv6 group needs no membership)."""
        return self.join(mgid, JOIN_SEND_ONLY_FULL, create)

    def send_only_join_state(self) -> int:
        return JOIN_SEND_ONLY_FULL

    def leave(self, mgid, join_state: int = JOIN_FULL) -> MCMemberRecord:
        t0 = time.monotonic()
        mgid = bytes(mgid)
        if join_state & JOIN_FULL:
            self.backend.roce_leave(mgid)
        self._count("leave", t0)
        return self._record(mgid, join_state, None)

    def member(self, mgid) -> MCMemberRecord | None:
        """Our full membership as the netdev holds it (None once it is gone)."""
        t0 = time.monotonic()
        mgid = bytes(mgid)
        rec = self._record(mgid, JOIN_FULL, None) if self.backend.roce_joined(mgid) else None
        self._count("member", t0)
        return rec

    def close(self) -> None:
        """Close the verbs backend (idempotent: the agent closes it first on a normal teardown)."""
        self.backend.close()


def open_provider(spec, pkey: int, policy: RetryPolicy | None = None):
    """The provider for an attachment: the SA on the sim fabric and on an InfiniBand verbs port, the
    port itself on RoCE. A verbs port is opened here (its link layer decides) and kept as `backend`."""
    from xdpoib.fabric.base import LinkLayer

    if spec.backend == "sim":
        return SAProvider(SAClient.open(None, None, sm_key=1, policy=policy or RetryPolicy()))
    from xdpoib.fabric.verbs import VerbsBackend

    backend = VerbsBackend.open(spec.device, spec.port)
    try:
        if backend.link_layer is LinkLayer.ETHERNET:
            return RoceProvider(backend, pkey)
        return SAProvider(SAClient.open(spec.device, spec.port, sm_key=0, policy=policy or RetryPolicy()), backend)
    except BaseException:
        with contextlib.suppress(XdpoibError):
            backend.close()
        raise

