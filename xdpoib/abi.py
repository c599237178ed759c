"""ctypes mirror of `bpf/include/xdpoib_abi.h`: the only Python that knows the byte layout of maps.

Every struct here has the same name (without the `xdpoib_` prefix, in CamelCase), the same fields in
the same order and the same size as its C twin; `tests/unit/test_abi.py` compiles a probe against the
header and compares, and `tests/bpf/test_abi_bcc.py` compares with bcc's derived map types.
"""

from __future__ import annotations

import ctypes as ct
from enum import IntEnum
from pathlib import Path

from xdpoib.reasons import DropReason, Kind

ABI_VERSION = 3
META_VERSION = 1

ETH_ALEN = 6
GID_LEN = 16
HWADDR_LEN = 20
ETH_HLEN = 14
VLAN_HLEN = 4
IPOIB_HLEN = 4
ARP_ETH_BODY = 28
ARP_IB_BODY = 56
ND_OPT_ETH = 8
ND_OPT_IB = 24
MAX_VID = 4095
MCAST_QPN = 0xFFFFFF
MAX_FRAME = 2048

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_IPV6 = 0x86DD
ETH_P_TIPC = 0x88CA
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

DROP_SLOTS = 64
KIND_SLOTS = 8

RX_F_MULTICAST = 0x01
RX_F_ETHERNET = 0x02

MAX_VIFS = 1024
CFG_LEARN_VIFS = 0x1            # xdpoib_config.flags: unknown source MACs go to the agent (VIF learning)
VIF_UNKNOWN = 0xFFFFFFFF        # tx metadata vif_id of such a frame
MAX_PEERS = 1 << 20             # peer ids are in [1, MAX_PEERS): the index of xo_peer_id
MAX_ADDRS = (1 << 20) + 1024
MAX_GROUPS = 65536
MAX_VLANS = 4096
VIF_SLOTS = 1024
PEER_SLOTS = 65536
MAX_PKEYS = 32768
F_VALID = 0x01
MAX_XSKS = 64

#: Where the BPF sources are: `bpf/` of the checkout this package runs from, else where the Debian
#: package installs them (docs/install.md).
BPF_DIRS = (Path(__file__).resolve().parent.parent / "bpf", Path("/usr/share/xdpoib/bpf"))
BPF_DIR = next((d for d in BPF_DIRS if (d / "xdpoib.c").is_file()), BPF_DIRS[0])
HEADER = BPF_DIR / "include" / "xdpoib_abi.h"


class Direction(IntEnum):
    """Index into the per-CPU stats map."""

    TX = 0
    RX = 1


class XdpAction(IntEnum):
    """XDP verdicts, the index of `Stats.verdicts`."""

    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64


class _Struct(ct.Structure):
    """Base: byte conversion helpers shared by every mirrored struct."""

    def to_bytes(self) -> bytes:
        """Return the struct's bytes exactly as the kernel sees them."""
        return bytes(self)

    @classmethod
    def from_bytes(cls, b: bytes):
        """Build the struct from its bytes (at least `sizeof` of them)."""
        return cls.from_buffer_copy(b[: ct.sizeof(cls)])


class TxMeta(_Struct):
    """TX metadata record the agent reads in front of each frame."""

    _fields_ = [
        ("version", u8), ("kind", u8), ("pkey", u16), ("vid", u16), ("reserved", u16),
        ("vif_id", u32), ("dest_id", u32), ("dest", u8 * 16),
    ]


class RxMeta(_Struct):
    """RX metadata record the agent writes in front of each frame it injects."""

    _fields_ = [
        ("version", u8), ("flags", u8), ("pkey", u16), ("peer_id", u32), ("vif_id", u32),
        ("reserved", u32),
    ]


class MacKey(_Struct):
    """Key of the *_mac maps: a MAC padded to 8 bytes."""

    _fields_ = [("mac", u8 * ETH_ALEN), ("pad", u8 * 2)]


class AddrKey(_Struct):
    """Key of the by_addr map: QPN (big-endian) and GID of an IPoIB address, flags excluded."""

    _fields_ = [("qpn", u8 * 3), ("pad", u8), ("gid", u8 * GID_LEN)]


class MacValue(_Struct):
    """Value of the by_addr map: the MAC standing for a (QPN, GID)."""

    _fields_ = [("mac", u8 * ETH_ALEN), ("pad", u8 * 2)]


class Vif(_Struct):
    """A local VIF: id, MAC and our IPoIB address."""

    _fields_ = [("vif_id", u32), ("mac", u8 * ETH_ALEN), ("flags", u8), ("reserved", u8),
                ("addr", u8 * HWADDR_LEN)]


class Peer(_Struct):
    """A remote peer: id, REMAC and its IPoIB address."""

    _fields_ = [("peer_id", u32), ("mac", u8 * ETH_ALEN), ("flags", u8), ("reserved", u8),
                ("addr", u8 * HWADDR_LEN)]


class MgidKey(_Struct):
    """Key of the group map."""

    _fields_ = [("mgid", u8 * GID_LEN)]


class Group(_Struct):
    """Value of the group map."""

    _fields_ = [("group_id", u32), ("flags", u32)]


class U32Key(_Struct):
    """Key of the vlan and pkey maps."""

    _fields_ = [("id", u32)]


class Vlan(_Struct):
    """Value of the vlan map: the P_Key of a VID."""

    _fields_ = [("pkey", u16), ("flags", u8), ("reserved", u8)]


class Pkey(_Struct):
    """Value of the pkey map: the VID of a P_Key."""

    _fields_ = [("vid", u16), ("flags", u8), ("reserved", u8)]


class Config(_Struct):
    """Value of config[0]."""

    _fields_ = [("report_interval_ns", u64), ("flags", u32), ("scope", u8), ("reserved", u8 * 3)]


class Stats(_Struct):
    """Per-CPU counters of one direction."""

    _fields_ = [
        ("packets", u64), ("bytes", u64), ("verdicts", u64 * 5), ("reserved", u64),
        ("kinds", u64 * KIND_SLOTS), ("drops", u64 * DROP_SLOTS),
    ]


class UnresolvedEvent(_Struct):
    """Ring buffer record: a destination not in the maps."""

    _fields_ = [("version", u8), ("kind", u8), ("pkey", u16), ("vif_id", u32), ("dest", u8 * 16)]


class DestKey(_Struct):
    """Key of the unresolved-report rate limiter."""

    _fields_ = [("dest", u8 * 16), ("pkey", u32)]


INJECT_COPY_SLOTS = 256         # slots the agent copies frames into
INJECT_RX_SLOTS = 512           # receive buffers per region
INJECT_RX_REGIONS = 3           # regions after the copy slots, one per agent process that claimed it
INJECT_SLOTS = INJECT_COPY_SLOTS + INJECT_RX_REGIONS * INJECT_RX_SLOTS
INJECT_MAX = 3504
INJECT_GRH = 40                 # a GRH's room in front of a frame a QP received into its slot
INJECT_FRAME = 4160             # a GRH and the largest IB datagram


class InjectSlot(_Struct):
    """One frame queued for batched injection; `next` chains the slots of one call."""

    _fields_ = [("len", u32), ("next", u16), ("offset", u16), ("meta", RxMeta), ("frame", u8 * INJECT_FRAME)]


# C struct name -> mirror, for the probe tests.
STRUCTS: dict[str, type[_Struct]] = {
    "xdpoib_tx_meta": TxMeta,
    "xdpoib_rx_meta": RxMeta,
    "xdpoib_mac_key": MacKey,
    "xdpoib_addr_key": AddrKey,
    "xdpoib_mac_value": MacValue,
    "xdpoib_vif": Vif,
    "xdpoib_peer": Peer,
    "xdpoib_mgid_key": MgidKey,
    "xdpoib_group": Group,
    "xdpoib_u32_key": U32Key,
    "xdpoib_vlan": Vlan,
    "xdpoib_pkey": Pkey,
    "xdpoib_config": Config,
    "xdpoib_stats": Stats,
    "xdpoib_unresolved_event": UnresolvedEvent,
    "xdpoib_dest_key": DestKey,
    "xdpoib_inject_slot": InjectSlot,
}

# C macro or enumerator -> the Python value that must equal it, for the probe tests.
CONSTANTS: dict[str, int] = {
    "XDPOIB_ABI_VERSION": ABI_VERSION,
    "XDPOIB_META_VERSION": META_VERSION,
    "XDPOIB_ETH_ALEN": ETH_ALEN,
    "XDPOIB_GID_LEN": GID_LEN,
    "XDPOIB_HWADDR_LEN": HWADDR_LEN,
    "XDPOIB_ETH_HLEN": ETH_HLEN,
    "XDPOIB_VLAN_HLEN": VLAN_HLEN,
    "XDPOIB_IPOIB_HLEN": IPOIB_HLEN,
    "XDPOIB_ARP_ETH_BODY": ARP_ETH_BODY,
    "XDPOIB_ARP_IB_BODY": ARP_IB_BODY,
    "XDPOIB_ND_OPT_ETH": ND_OPT_ETH,
    "XDPOIB_ND_OPT_IB": ND_OPT_IB,
    "XDPOIB_MAX_VID": MAX_VID,
    "XDPOIB_MCAST_QPN": MCAST_QPN,
    "XDPOIB_MAX_FRAME": MAX_FRAME,
    "XDPOIB_ETH_P_IP": ETH_P_IP,
    "XDPOIB_ETH_P_ARP": ETH_P_ARP,
    "XDPOIB_ETH_P_RARP": ETH_P_RARP,
    "XDPOIB_ETH_P_IPV6": ETH_P_IPV6,
    "XDPOIB_ETH_P_TIPC": ETH_P_TIPC,
    "XDPOIB_ETH_P_8021Q": ETH_P_8021Q,
    "XDPOIB_ETH_P_8021AD": ETH_P_8021AD,
    "XDPOIB_DROP_SLOTS": DROP_SLOTS,
    "XDPOIB_KIND_SLOTS": KIND_SLOTS,
    "XDPOIB_RX_F_MULTICAST": RX_F_MULTICAST,
    "XDPOIB_RX_F_ETHERNET": RX_F_ETHERNET,
    "XDPOIB_CFG_LEARN_VIFS": CFG_LEARN_VIFS,
    "XDPOIB_VIF_UNKNOWN": VIF_UNKNOWN,
    "XDPOIB_MAX_VIFS": MAX_VIFS,
    "XDPOIB_MAX_PEERS": MAX_PEERS,
    "XDPOIB_MAX_ADDRS": MAX_ADDRS,
    "XDPOIB_MAX_GROUPS": MAX_GROUPS,
    "XDPOIB_MAX_VLANS": MAX_VLANS,
    "XDPOIB_VIF_SLOTS": VIF_SLOTS,
    "XDPOIB_INJECT_SLOTS": INJECT_SLOTS,
    "XDPOIB_INJECT_COPY_SLOTS": INJECT_COPY_SLOTS,
    "XDPOIB_INJECT_RX_SLOTS": INJECT_RX_SLOTS,
    "XDPOIB_INJECT_RX_REGIONS": INJECT_RX_REGIONS,
    "XDPOIB_INJECT_MAX": INJECT_MAX,
    "XDPOIB_INJECT_GRH": INJECT_GRH,
    "XDPOIB_INJECT_FRAME": INJECT_FRAME,
    "XDPOIB_PEER_SLOTS": PEER_SLOTS,
    "XDPOIB_MAX_PKEYS": MAX_PKEYS,
    "XDPOIB_F_VALID": F_VALID,
    "XDPOIB_MAX_XSKS": MAX_XSKS,
    "XDPOIB_DIR_TX": Direction.TX,
    "XDPOIB_DIR_RX": Direction.RX,
    **{f"XDPOIB_DROP_{r.name}": r.value for r in DropReason},
    **{f"XDPOIB_KIND_{k.name}": k.value for k in Kind},
}


def mac_key(mac: bytes) -> MacKey:
    """Return the map key for a 6-byte MAC."""
    k = MacKey()
    ct.memmove(k.mac, mac, ETH_ALEN)
    return k


def addr_key(addr20: bytes) -> AddrKey:
    """Return the by_addr key for a 20-byte IPoIB hardware address (its flags byte is ignored)."""
    k = AddrKey()
    ct.memmove(k.qpn, addr20[1:4], 3)
    ct.memmove(k.gid, addr20[4:20], GID_LEN)
    return k


def mac_slot(mac: bytes, nslots: int) -> int:
    """Slot of a MAC in a direct-mapped cache (XDPOIB_MAC_SLOT)."""
    x = (mac[2] << 24 | mac[3] << 16 | mac[4] << 8 | mac[5]) ^ (mac[0] << 8 | mac[1])
    return (x ^ (x >> 16)) & (nslots - 1)


def id_slot(ident: int, nslots: int) -> int:
    """Slot of an id in a direct-mapped cache (XDPOIB_ID_SLOT)."""
    return ident & (nslots - 1)


def tx_meta(data: bytes) -> TxMeta:
    """Decode a TX metadata record (the 32 bytes in front of a frame)."""
    return TxMeta.from_bytes(data)


def rx_meta(peer_id: int, vif_id: int, pkey: int, *, multicast: bool = False,
            ethernet: bool = False) -> bytes:
    """Encode an RX metadata record for a frame the agent injects."""
    flags = (RX_F_MULTICAST if multicast else 0) | (RX_F_ETHERNET if ethernet else 0)
    return RxMeta(version=META_VERSION, flags=flags, pkey=pkey, peer_id=peer_id, vif_id=vif_id).to_bytes()
