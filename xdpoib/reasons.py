"""Stable numbers shared by the oracle, the BPF datapath, the agent, the fabric layer and the metrics.

`DropReason` is the one table of reasons for every refused frame, wherever it is refused: the BPF
programs count drops at these indexes, the agent counts its own by `DropReason`, and a backend's
`FabricCounter` names (xdpoib/fabric/base.py) are the lower-case names of reasons here (a unit test
proves it). The lower-case name is the `reason` label of `xdpoib_drops_total` and the key in `status -j`
(`counts()`). `bpf/include/xdpoib_abi.h` mirrors the numbers and a test proves the mirror. New reasons
are appended; never renumber, never reuse a number: retire a reason by leaving its number unused.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum


class DropReason(IntEnum):
    """Why a frame was dropped (by the oracle's `FrameError`, the BPF programs or the agent)."""

    TRUNCATED = 1               # shorter than a header it claims to carry
    BAD_LENGTH = 2              # IPv4 total length / IPv6 payload length disagrees with the frame
    UNSUPPORTED_ETHERTYPE = 3   # not IPv4, ARP, RARP, IPv6 or TIPC (STP, LLDP, ...)
    STACKED_VLAN = 4            # a second 802.1Q/802.1ad tag
    UNKNOWN_VLAN = 5            # VLAN with no P_Key mapping
    SPOOFED_SOURCE = 6          # source MAC is not a local VIF (anti-spoof)
    BAD_ARP = 7                 # ARP with unexpected htype/ptype/hlen/plen
    ARP_UNKNOWN_HWADDR = 8      # an ARP hardware address with no known peer or VIF behind it
    BAD_ND = 9                  # malformed ICMPv6 ND message or option
    ND_UNKNOWN_LLADDR = 10      # an ND link-layer address with no known peer or VIF behind it
    MCAST_MISMATCH = 11         # multicast/broadcast MAC with a unicast IP destination, or the reverse
    BAD_IP_HEADER = 12          # IPv4 version/IHL or IPv6 version wrong
    BAD_DHCP = 13               # malformed DHCP message (control path)
    NO_ROOM = 14                # the datapath could not grow the frame (head/tailroom)
    UNKNOWN_PEER = 15           # RX: source peer id not in the peer map; agent: a (LID, QPN) of no known peer
    UNKNOWN_VIF = 16            # RX: receiving VIF id not in the VIF map
    BAD_METADATA = 17           # RX: metadata record missing or of another version
    OVERSIZE = 18               # larger than the path or group MTU
    REDIRECT_FAILED = 19        # XSK / devmap redirect refused
    LOOPBACK = 20               # our own multicast, looped back by the fabric
    BAD_IPOIB_HEADER = 21       # RX: shorter than 4 bytes, or an EtherType we do not accept
    NO_PARTITION = 22           # RX: P_Key with no VLAN mapping on this attachment
    # refused by the agent
    VLAN_MISMATCH = 23          # TX: the frame's VLAN is no longer its VIF's (the VIF changed meanwhile)
    UNKNOWN_DESTINATION = 24    # TX: the destination peer went before the frame could be sent
    UNRESOLVED_QUEUE_FULL = 25  # TX: over 3 frames waiting for one unresolved peer or group
    PATH_FAILED = 26            # TX: the SA gave no PathRecord; the frames waiting for it are dropped
    NO_GROUP = 27               # TX: frames for a multicast group that could not be joined
    JOIN_FAILED = 28            # TX: a multicast join the SA refused (the frame that asked for it)
    ARP_SPOOFED = 29            # RX: ARP claiming a hardware address its sender does not own
    ARP_UNVERIFIED = 30         # RX: ARP whose sender's path could not be checked
    ND_FOREIGN_LLADDR = 31      # RX: ND whose link-layer address is not its sender's
    COMPLETION_ERROR = 32       # RX: a receive completion with an error status
    INJECT_RING_FULL = 33       # RX: the ring towards eth4 (AF_XDP TX) was full
    INJECT_TOO_BIG = 34         # RX: larger than an injection slot
    RUNT = 35                   # RX: IPoIB payload under 14 bytes (XDP cannot carry it)
    # refused by the fabric layer (xdpoib/fabric/base.py FabricCounter; OVERSIZE and LOOPBACK above)
    PORT_DOWN = 36              # TX/RX while the port is not ACTIVE
    NO_DESTINATION = 37         # TX: no port has that DLID, or no QP that QPN (sim only)
    NOT_MEMBER = 38             # TX or RX on a multicast group the port is not a member of
    QKEY_MISMATCH = 39          # RX: datagram Q_Key differs from the QP's
    PKEY_MISMATCH = 40          # RX: datagram P_Key does not match the QP's / port's table
    NO_RECV_BUFFER = 41         # RX: no receive buffer posted
    RX_OVERRUN = 42             # TX (sim only): the receiver's socket queue was full
    BAD_DATAGRAM = 43           # RX: malformed transport header (sim only)
    QP_ERROR = 44               # TX/RX on a QP in the error state (after a length error)
    # refused by the agent (appended)
    SEND_QUEUE_FULL = 45        # TX: the UD QP's send queue could not take the frame
    HANDED_OVER = 46            # RX: reached an agent that handed over (restart): multicast the successor delivers


class Kind(IntEnum):
    """Metadata kind: what the agent must do with a frame the TX program hands it."""

    PEER = 1        # unicast to a known peer: send to its (path, QPN)
    GROUP = 2       # to a multicast group: send to its MLID
    UNRESOLVED = 3  # destination not in the maps: agent resolves, queues at most 3 per peer
    CONTROL = 4     # DHCP, IGMP/MLD: the agent parses and rewrites with the oracle


def reason(key: DropReason | str | int) -> DropReason:
    """The `DropReason` of a number, a reason or its name (any case); KeyError/ValueError if none."""
    if isinstance(key, str):
        return DropReason[key.upper()]
    return DropReason(key)


def counts(by_reason: Mapping) -> dict[str, int]:
    """Drop counts keyed by reason (a `DropReason`, its number or its name) -> {lower-case name: count},
    in table order, zeros left out: the form of `status -j` and of the `reason` label."""
    out: dict[DropReason, int] = {}
    for k, n in by_reason.items():
        if n:
            r = reason(k)
            out[r] = out.get(r, 0) + int(n)
    return {r.name.lower(): out[r] for r in sorted(out)}
