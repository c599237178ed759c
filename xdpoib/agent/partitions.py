"""Partitions: 802.1Q VLANs on eth4 mapped to P_Keys (`attach --vlan VID:PKEY`, repeatable).

Untagged frames belong to the attachment's `--pkey`; each VLAN maps to a partition of its own, with
its own broadcast group (`ff12:401b:<pkey>::ffff:ffff`, joined at bring-up: its parameters are the
template of that partition's IP groups) and its own QP, owned by VIF 0 and the one attached to that
partition's groups, so the partition's multicast and broadcast reach eth4 once, tagged with its VID
(the RX program pushes the tag of the P_Key the receiving QP is on). The TX program strips the tag
and puts the P_Key in the metadata; frames go out from the sending VIF's QP, which must be on that
partition: a VIF belongs to one VLAN (`vif add ... --vlan VID`, or learned from a tagged frame), and
VIF 0 (eth4's own MAC) to the untagged partition, since a VIF has one IPoIB address (one QPN) for
its ARP and ND. A frame from a VIF on another VLAN than its own is dropped (`vlan_mismatch`).
eth4's MTU follows the smallest broadcast-group MTU of its partitions.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from xdpoib.errors import XdpoibError
from xdpoib.fabric.base import GRH_LEN
from xdpoib.wire.addr import gid_str
from xdpoib.wire.mgid import broadcast_mgid, full_pkey

PARTITION_BUFFERS = 1024


@dataclass
class Partition:
    pkey: int               # full-member bit forced, as in the MGIDs
    vid: int
    bcast_mgid: bytes
    bcast: object           # its broadcast group's MCMemberRecord (the template of its groups)
    qp: object              # VIF 0's QP on it, attached to its groups

    @property
    def qkey(self) -> int:
        return self.bcast.qkey

    @property
    def mtu(self) -> int:
        return self.bcast.mtu_bytes or 2048


class Partitions:
    """The attachment's partitions, untagged one first (see the module doc)."""

    def __init__(self, agent) -> None:
        self.a = agent
        self.by_pkey: dict[int, Partition] = {}
        self.by_vid: dict[int, Partition] = {}

    @staticmethod
    def check(port, pkey: int, vlans) -> None:
        """Refuse, before anything changes, a P_Key the port does not have (with its P_Key table)."""
        from xdpoib.agent.core import AgentError

        table = ", ".join(f"{k:#06x}" for k in port.pkeys if k & 0x7FFF) or "empty"
        for vid, p in vlans:
            if not port.has_pkey(full_pkey(p)):
                raise AgentError(f"VLAN {vid}: the port is not a member of partition {full_pkey(p):#06x} "
                                 f"(its P_Key table: {table})")
        seen = {pkey & 0x7FFF}
        for vid, p in vlans:
            if p & 0x7FFF in seen:
                raise AgentError(f"VLAN {vid}: partition {full_pkey(p):#06x} is mapped twice")
            seen.add(p & 0x7FFF)

    def untagged(self, qp) -> Partition:
        a = self.a
        part = Partition(a.pkey, 0, a.bcast_mgid, a.bcast, qp)
        self.by_pkey[a.pkey] = part
        self.by_vid[0] = part
        return part

    def bring_up(self, vlans, join) -> None:
        """Join each VLAN partition's broadcast group (blocking, at bring-up) and make its QP."""
        a = self.a
        for vid, p in vlans:
            pkey = full_pkey(p)
            mgid = broadcast_mgid(pkey)
            rec = join(mgid)
            pool = a.backend.alloc_pool(PARTITION_BUFFERS, GRH_LEN + max(a.ib_mtu, a.port_attrs.active_mtu))
            qp = a.backend.create_qp(pkey, rec.qkey, pool)
            a.stack.callback(qp.close)
            qp.post_recv(range(PARTITION_BUFFERS))
            part = Partition(pkey, vid, mgid, rec, qp)
            self.by_pkey[pkey] = part
            self.by_vid[vid] = part
            a.ib_mtu = min(a.ib_mtu, part.mtu, a.port_attrs.active_mtu)
            g = a.membership.group(mgid, "broadcast")
            a.membership.record_join(g, rec, 1)

    def vlan_pkeys(self) -> dict[int, int]:
        return {vid: part.pkey for vid, part in self.by_vid.items()}

    def extra_qps(self) -> list:
        """The VLAN partitions' QPs (VIF 0's, polled with the VIFs' by the forwarder)."""
        return [p.qp for p in self.by_pkey.values() if p.vid]

    def of_mgid(self, mgid: bytes) -> Partition:
        """The partition a group belongs to (the P_Key in MGID bytes 4-5), default the untagged one."""
        part = self.by_pkey.get(int.from_bytes(mgid[4:6], "big") | 0x8000)
        return part if part is not None else self.by_vid[0]

    def of_vid(self, vid: int) -> Partition | None:
        return self.by_vid.get(vid)

    def is_broadcast(self, mgid: bytes) -> bool:
        return any(p.bcast_mgid == mgid for p in self.by_pkey.values())

    def describe(self) -> list[dict]:
        return [{"vlan": p.vid, "pkey": f"{p.pkey:#06x}", "broadcast": gid_str(p.bcast_mgid),
                 "qkey": f"{p.qkey:#x}", "mtu": p.mtu, "qpn": p.qp.qpn}
                for p in sorted(self.by_pkey.values(), key=lambda p: p.vid)]


# OpenSM's answers to a join of a group it has not created (yet): 0x0200 (request invalid), or 0x0600
# (insufficient components: a plain join cannot create the group)
NOT_YET = (0x0200, 0x0600)
FIRST_RETRY_S, MAX_RETRY_S = 1.0, 16.0


def no_group_line(pkey: int, mgid: bytes, wait: float, last) -> str:
    """The one line a partition that never got its broadcast group ends with."""
    status = getattr(last, "status", 0)
    if status in NOT_YET:
        return (f"partition {pkey:#06x} has no broadcast group {gid_str(mgid)} after {wait:g} s (the SM refuses "
                f"the join: status {status:#06x}): likely the partition lacks the `ipoib` flag in OpenSM's "
                f"partitions.conf (e.g. `P{pkey:04x}={pkey:#06x}, ipoib : ...`; then `kill -HUP` OpenSM)")
    return f"cannot join the broadcast group {gid_str(mgid)} of partition {pkey:#06x} after {wait:g} s: {last}"


def join_with_retry(sa, mgid: bytes, deadline: float, wait: float, say=None):
    """A blocking broadcast join at bring-up, as Linux ipoib does it: a refusal (status 0x0200 or 0x0600:
    the SM has not created the group yet, as at its first sweeps, after a restart or a failover) or no
    answer is "not yet", tried again after 1 s, doubling to 16 s, until `deadline` (monotonic; `wait` is its length, for
    the message). `say(text)` is told once what we wait for. Raises AgentError with one line at the end."""
    from xdpoib.agent.core import AgentError

    delay = FIRST_RETRY_S
    pkey = int.from_bytes(mgid[4:6], "big")
    while True:
        try:
            return sa.join(mgid, 1)
        except XdpoibError as e:
            rest = deadline - time.monotonic()
            if rest <= 0:
                raise AgentError(no_group_line(pkey, mgid, wait, e)) from None
            if say is not None:
                say(f"waiting for the broadcast group {gid_str(mgid)} of partition {pkey:#06x} "
                    f"(up to {wait:g} s, --wait): {e}")
                say = None
            time.sleep(min(delay, rest))
            delay = min(MAX_RETRY_S, delay * 2)


def wait_for_pkey(sa, port, pkey: int, deadline: float, wait: float, say=None):
    """Bring-up: a P_Key not (yet) in the port's table is waited for as ipoib does (the SM may add the
    port to the partition later: partitions.conf edited, OpenSM HUPed); the port is re-read with the same
    backoff as the broadcast join. Returns the port that has it; raises AgentError at the deadline."""
    from xdpoib.agent.core import AgentError

    delay = FIRST_RETRY_S
    while not port.has_pkey(pkey):
        rest = deadline - time.monotonic()
        if rest <= 0:
            table = ", ".join(f"{k:#06x}" for k in port.pkeys if k & 0x7FFF) or "empty"
            raise AgentError(f"the port is not a member of partition {pkey:#06x} (its P_Key table: {table})"
                             + (f" after {wait:g} s" if wait > 0 else ""))
        if say is not None:
            say(f"waiting for partition {pkey:#06x} in the port's P_Key table (up to {wait:g} s, --wait)")
            say = None
        time.sleep(min(delay, rest))
        delay = min(MAX_RETRY_S, delay * 2)
        with contextlib.suppress(XdpoibError):
            port = sa.port()
    return port
