"""Stable numbers shared by the oracle, the BPF datapath and the metrics.

`DropReason` values are the `reason` label of `xdpoib_drops_total` and the index into the BPF drop
counters; `bpf/include/xdpoib_abi.h` mirrors them and a test proves the mirror. Never renumber, never
reuse a number: retire a reason by leaving its number unused.
"""

from __future__ import annotations

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
    UNKNOWN_PEER = 15           # RX: source peer id not in the peer map
    UNKNOWN_VIF = 16            # RX: receiving VIF id not in the VIF map
    BAD_METADATA = 17           # RX: metadata record missing or of another version
    OVERSIZE = 18               # larger than the path or group MTU
    REDIRECT_FAILED = 19        # XSK / devmap redirect refused
    LOOPBACK = 20               # our own multicast, looped back by the fabric
    BAD_IPOIB_HEADER = 21       # RX: shorter than 4 bytes, or an EtherType we do not accept
    NO_PARTITION = 22           # RX: P_Key with no VLAN mapping on this attachment


class Kind(IntEnum):
    """Metadata kind: what the agent must do with a frame the TX program hands it."""

    PEER = 1        # unicast to a known peer: send to its (path, QPN)
    GROUP = 2       # to a multicast group: send to its MLID
    UNRESOLVED = 3  # destination not in the maps: agent resolves, queues at most 3 per peer
    CONTROL = 4     # DHCP, IGMP/MLD: the agent parses and rewrites with the oracle
