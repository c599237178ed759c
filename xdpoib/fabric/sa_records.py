"""SA and SMP records and their codecs: pure data, no I/O (the client is `sa_client.py`).

- records with `pack`/`parse`: `PathRecord` (IBA 15.2.5.16), `MCMemberRecord` (15.2.5.17), the SA's
  `ClassPortInfo` (13.4.8.1), the SMP `PortInfo` (14.2.5.6) and our own `LocalPort`; offsets follow
  IBA vol. 1 chapters 13-15 and docs/design.md §4;
- the SA and directed-route SMP MAD headers (`pack_sa_mad`, `parse_sa_mad`, `pack_smp`, `parse_smp`);
- the SA's status codes as one `SAError` subclass each (`status_error`);
- `as_dict`: a record as JSON-friendly values for people (GIDs in their text form).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, fields

from xdpoib.errors import AddressError, XdpoibError
from xdpoib.fabric.base import gid_str, has_pkey, pkey_index

# ---------------------------------------------------------------- constants

SA_QP, SA_QKEY = 1, 0x80010000
MAD_LEN, SA_HDR_LEN, SA_DATA_LEN = 256, 56, 200

METHOD_GET, METHOD_SET, METHOD_GET_TABLE, METHOD_DELETE = 0x01, 0x02, 0x12, 0x15
METHOD_RESP = 0x80

ATTR_CLASS_PORT_INFO, ATTR_NODE_RECORD, ATTR_PATH_RECORD, ATTR_MCMEMBER_RECORD = 0x01, 0x11, 0x35, 0x38
SMP_ATTR_NODE_INFO, SMP_ATTR_PORT_INFO, SMP_ATTR_PKEY_TABLE = 0x11, 0x15, 0x16

# PathRecord component mask bits
PR_DGID, PR_SGID, PR_DLID, PR_PKEY = 1 << 2, 1 << 3, 1 << 4, 1 << 13
# MCMemberRecord component mask bits
MC_MGID, MC_PORT_GID, MC_QKEY, MC_MTU_SEL, MC_MTU, MC_TCLASS, MC_PKEY = 1, 2, 4, 0x10, 0x20, 0x40, 0x80
MC_RATE_SEL, MC_RATE, MC_SL, MC_FLOW, MC_HOP, MC_JOIN_STATE = 0x100, 0x200, 0x1000, 0x2000, 0x4000, 0x10000
MC_JOIN_MASK = MC_MGID | MC_PORT_GID | MC_JOIN_STATE                        # 0x10003
MC_CREATE_MASK = (MC_JOIN_MASK | MC_QKEY | MC_MTU_SEL | MC_MTU | MC_TCLASS | MC_PKEY | MC_RATE_SEL
                  | MC_RATE | MC_SL | MC_FLOW | MC_HOP)                      # 0x173F7
SELECTOR_EXACTLY = 2

JOIN_FULL, JOIN_NON, JOIN_SEND_ONLY_NON, JOIN_SEND_ONLY_FULL = 1, 2, 4, 8
CAP2_SEND_ONLY_FULL = 1 << 12          # ClassPortInfo.CapabilityMask2: SendOnlyFullMember supported

UMAD_STATUS_TIMEOUT = 110              # ETIMEDOUT: the fabric lost the MAD (ibsim bounces drops so)
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
PORT_STATES = {1: "down", 2: "init", 3: "armed", 4: "active"}


# ---------------------------------------------------------------- errors

class SAError(XdpoibError):
    """The SA refused or did not answer a query; `status` is the MAD status (None: no answer)."""

    status: int | None = None
    what = "SA error"

    def __init__(self, message: str = "", status: int | None = None):
        if status is not None:
            self.status = status
        super().__init__(message or f"{self.what} (status {self.status:#06x})")


class SATimeoutError(SAError):
    """No answer before the request's deadline, after every retry."""

    what = "no answer from the SA"


class SABusyError(SAError):
    """The SA stayed busy through every retry."""

    status, what = 0x0001, "SA busy"


class SAMadError(SAError):
    """A generic MAD status: bad version, unsupported method or attribute, invalid value."""

    what = "MAD status error"


class SANoResourcesError(SAError):
    """ERR_NO_RESOURCES (0x0100): the SA is out of resources for the request."""

    status, what = 0x0100, "SA has no resources"


class SARequestInvalidError(SAError):
    """ERR_REQ_INVALID (0x0200): e.g. a join to a partition the port is not a member of."""

    status, what = 0x0200, "SA request invalid"


class SANoRecordsError(SAError):
    """ERR_NO_RECORDS (0x0300): nothing matches (no path, not a member)."""

    status, what = 0x0300, "no such record"


class SATooManyRecordsError(SAError):
    """ERR_TOO_MANY_RECORDS (0x0400): a Get matched more than one record."""

    status, what = 0x0400, "too many records"


class SAInvalidGIDError(SAError):
    """ERR_REQ_INVALID_GID (0x0500): a GID in the request is unknown or not allowed."""

    status, what = 0x0500, "invalid GID"


class SAInsufficientComponentsError(SAError):
    """ERR_REQ_INSUFFICIENT_COMPONENTS (0x0600): e.g. a group create without enough parameters."""

    status, what = 0x0600, "insufficient components"


class SADeniedError(SAError):
    """ERR_REQ_DENIED (0x0700): the SA denied the request."""

    status, what = 0x0700, "request denied"


_SA_STATUS_ERRORS = {c.status: c for c in (SANoResourcesError, SARequestInvalidError, SANoRecordsError,
                                           SATooManyRecordsError, SAInvalidGIDError,
                                           SAInsufficientComponentsError, SADeniedError)}
ERROR_CLASSES = {c.__name__: c for c in (SAError, SATimeoutError, SABusyError, SAMadError,
                                         *_SA_STATUS_ERRORS.values())}


def status_error(status: int, context: str = "") -> SAError:
    """Map a non-zero MAD status to its exception (class-specific code in bits 8-15 first)."""
    cls = _SA_STATUS_ERRORS.get(status & 0xFF00)
    if cls is None:
        cls = SABusyError if status & 0x1F == 0x0001 else SAMadError
    msg = f"{cls.what} (status {status:#06x})"
    return cls(f"{context}: {msg}" if context else msg, status)


# ---------------------------------------------------------------- GIDs

def to_gid(gid) -> bytes:
    """A GID as 16 bytes from text (`fe80::1`), an IPv6Address or 16 bytes."""
    if isinstance(gid, bytes | bytearray | memoryview):
        if len(gid) != 16:
            raise AddressError(f"a GID is 16 bytes, got {len(gid)}")
        return bytes(gid)
    try:
        return ipaddress.IPv6Address(gid).packed
    except ValueError as e:
        raise AddressError(f"bad GID {gid!r}: {e}") from None


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class PathRecord:
    """A PathRecord (IBA 15.2.5.16): what an address handle to one destination needs."""

    dgid: bytes
    sgid: bytes
    dlid: int = 0
    slid: int = 0
    flow_label: int = 0
    hop_limit: int = 0
    tclass: int = 0
    reversible: bool = False
    numb_path: int = 0
    pkey: int = 0xFFFF
    sl: int = 0
    mtu_selector: int = 0
    mtu: int = 0
    rate_selector: int = 0
    rate: int = 0
    packet_life_selector: int = 0
    packet_life: int = 0
    preference: int = 0

    SIZE = 64

    @property
    def mtu_bytes(self) -> int:
        """The path MTU in bytes (0 if the enum is unknown)."""
        return MTU_BYTES.get(self.mtu, 0)

    def pack(self) -> bytes:
        """Encode as the 64-byte SA attribute."""
        b = bytearray(self.SIZE)
        b[8:24], b[24:40] = to_gid(self.dgid), to_gid(self.sgid)
        struct.pack_into(">HHI", b, 40, self.dlid, self.slid,
                         ((self.flow_label & 0xFFFFF) << 8) | (self.hop_limit & 0xFF))
        b[48] = self.tclass
        b[49] = (0x80 if self.reversible else 0) | (self.numb_path & 0x7F)
        struct.pack_into(">HH", b, 50, self.pkey, self.sl & 0xF)
        b[54] = (self.mtu_selector << 6) | (self.mtu & 0x3F)
        b[55] = (self.rate_selector << 6) | (self.rate & 0x3F)
        b[56] = (self.packet_life_selector << 6) | (self.packet_life & 0x3F)
        b[57] = self.preference
        return bytes(b)

    @classmethod
    def parse(cls, data: bytes) -> PathRecord:
        """Decode the 64-byte SA attribute."""
        if len(data) < cls.SIZE:
            raise SAMadError(f"PathRecord needs {cls.SIZE} bytes, got {len(data)}")
        dlid, slid, fl_hop = struct.unpack_from(">HHI", data, 40)
        pkey, qos_sl = struct.unpack_from(">HH", data, 50)
        return cls(dgid=bytes(data[8:24]), sgid=bytes(data[24:40]), dlid=dlid, slid=slid,
                   flow_label=(fl_hop >> 8) & 0xFFFFF, hop_limit=fl_hop & 0xFF, tclass=data[48],
                   reversible=bool(data[49] & 0x80), numb_path=data[49] & 0x7F, pkey=pkey, sl=qos_sl & 0xF,
                   mtu_selector=data[54] >> 6, mtu=data[54] & 0x3F, rate_selector=data[55] >> 6,
                   rate=data[55] & 0x3F, packet_life_selector=data[56] >> 6, packet_life=data[56] & 0x3F,
                   preference=data[57])


@dataclass(frozen=True)
class MCMemberRecord:
    """An MCMemberRecord (IBA 15.2.5.17): one port's membership of a multicast group, and the group."""

    mgid: bytes
    port_gid: bytes = bytes(16)
    qkey: int = 0
    mlid: int = 0
    mtu_selector: int = 0
    mtu: int = 0
    tclass: int = 0
    pkey: int = 0
    rate_selector: int = 0
    rate: int = 0
    packet_life_selector: int = 0
    packet_life: int = 0
    sl: int = 0
    flow_label: int = 0
    hop_limit: int = 0
    scope: int = 0
    join_state: int = 0
    proxy_join: bool = False

    SIZE = 52

    @property
    def mtu_bytes(self) -> int:
        """The group MTU in bytes (0 if the enum is unknown)."""
        return MTU_BYTES.get(self.mtu, 0)

    def pack(self) -> bytes:
        """Encode as the 52-byte SA attribute."""
        b = bytearray(self.SIZE)
        b[0:16], b[16:32] = to_gid(self.mgid), to_gid(self.port_gid)
        struct.pack_into(">IH", b, 32, self.qkey, self.mlid)
        b[38] = (self.mtu_selector << 6) | (self.mtu & 0x3F)
        b[39] = self.tclass
        struct.pack_into(">H", b, 40, self.pkey)
        b[42] = (self.rate_selector << 6) | (self.rate & 0x3F)
        b[43] = (self.packet_life_selector << 6) | (self.packet_life & 0x3F)
        struct.pack_into(">I", b, 44, ((self.sl & 0xF) << 28) | ((self.flow_label & 0xFFFFF) << 8)
                         | (self.hop_limit & 0xFF))
        b[48] = ((self.scope & 0xF) << 4) | (self.join_state & 0xF)
        b[49] = 0x80 if self.proxy_join else 0
        return bytes(b)

    @classmethod
    def parse(cls, data: bytes) -> MCMemberRecord:
        """Decode the 52-byte SA attribute."""
        if len(data) < cls.SIZE:
            raise SAMadError(f"MCMemberRecord needs {cls.SIZE} bytes, got {len(data)}")
        qkey, mlid = struct.unpack_from(">IH", data, 32)
        (pkey,) = struct.unpack_from(">H", data, 40)
        (sfh,) = struct.unpack_from(">I", data, 44)
        return cls(mgid=bytes(data[0:16]), port_gid=bytes(data[16:32]), qkey=qkey, mlid=mlid,
                   mtu_selector=data[38] >> 6, mtu=data[38] & 0x3F, tclass=data[39], pkey=pkey,
                   rate_selector=data[42] >> 6, rate=data[42] & 0x3F, packet_life_selector=data[43] >> 6,
                   packet_life=data[43] & 0x3F, sl=sfh >> 28, flow_label=(sfh >> 8) & 0xFFFFF,
                   hop_limit=sfh & 0xFF, scope=data[48] >> 4, join_state=data[48] & 0xF,
                   proxy_join=bool(data[49] & 0x80))


@dataclass(frozen=True)
class ClassPortInfo:
    """The SA's ClassPortInfo (IBA 13.4.8.1), reduced to what a client uses."""

    base_version: int = 1
    class_version: int = 2
    capability_mask: int = 0
    capability_mask2: int = 0
    resp_time_value: int = 0

    SIZE = 72

    @property
    def send_only_full_member(self) -> bool:
        """Whether the SA supports JoinState SendOnlyFullMember (CapabilityMask2 bit 12)."""
        return bool(self.capability_mask2 & CAP2_SEND_ONLY_FULL)

    def pack(self) -> bytes:
        """Encode (the redirect and trap fields stay zero)."""
        b = bytearray(self.SIZE)
        b[0], b[1] = self.base_version, self.class_version
        struct.pack_into(">HI", b, 2, self.capability_mask,
                         ((self.capability_mask2 & 0x7FFFFFF) << 5) | (self.resp_time_value & 0x1F))
        return bytes(b)

    @classmethod
    def parse(cls, data: bytes) -> ClassPortInfo:
        """Decode the first 8 bytes of the attribute."""
        if len(data) < 8:
            raise SAMadError(f"ClassPortInfo needs 8 bytes, got {len(data)}")
        cap, word = struct.unpack_from(">HI", data, 2)
        return cls(base_version=data[0], class_version=data[1], capability_mask=cap,
                   capability_mask2=word >> 5, resp_time_value=word & 0x1F)


@dataclass(frozen=True)
class LocalPort:
    """Our own port, freshly read (SMP PortInfo, NodeInfo and PKeyTable to ourselves)."""

    ca_name: str
    portnum: int
    port_guid: int
    gid_prefix: int
    lid: int
    lmc: int
    sm_lid: int
    sm_sl: int
    state: int
    phys_state: int
    capability_mask: int
    mtu_cap: int
    active_mtu: int
    pkeys: tuple[int, ...] = ()

    @property
    def gid(self) -> bytes:
        """The port's GID 0: GID prefix and port GUID."""
        return struct.pack(">QQ", self.gid_prefix, self.port_guid)

    @property
    def active(self) -> bool:
        """Whether the port is ACTIVE (state 4)."""
        return self.state == 4

    @property
    def state_name(self) -> str:
        """The logical state as a word (down, init, armed, active)."""
        return PORT_STATES.get(self.state, str(self.state))

    def pkey_index(self, pkey: int) -> int:
        """Index of `pkey` in the P_Key table (a full entry wins); PortError if absent, as for every
        port (`xdpoib.fabric.base.pkey_index`)."""
        return pkey_index(self.pkeys, pkey)

    def has_pkey(self, pkey: int) -> bool:
        """Whether the P_Key table holds `pkey` (membership bit ignored)."""
        return has_pkey(self.pkeys, pkey)


@dataclass(frozen=True)
class PortInfo:
    """The fields of an SMP PortInfo attribute (IBA 14.2.5.6) that LocalPort needs."""

    gid_prefix: int
    lid: int
    sm_lid: int
    capability_mask: int
    local_port: int
    state: int
    phys_state: int
    lmc: int
    active_mtu: int
    sm_sl: int
    mtu_cap: int

    @classmethod
    def parse(cls, d: bytes) -> PortInfo:
        """Decode the 64-byte SMP data."""
        prefix, lid, smlid, cap = struct.unpack_from(">QHHI", d, 8)
        return cls(gid_prefix=prefix, lid=lid, sm_lid=smlid, capability_mask=cap, local_port=d[28],
                   state=d[32] & 0xF, phys_state=d[33] >> 4, lmc=d[34] & 0x7, active_mtu=d[36] >> 4,
                   sm_sl=d[36] & 0xF, mtu_cap=d[41] & 0xF)


# ---------------------------------------------------------------- MAD headers

@dataclass(frozen=True)
class SAMad:
    """A decoded SA MAD: common header fields, SA header fields and the record data."""

    method: int
    status: int
    tid: int
    attr_id: int
    attr_mod: int = 0
    comp_mask: int = 0
    attr_offset: int = 0
    sm_key: int = 0
    data: bytes = b""
    mgmt_class: int = 0x03


def pack_sa_mad(method: int, attr_id: int, tid: int, comp_mask: int = 0, data: bytes = b"",
                attr_mod: int = 0, sm_key: int = 0) -> bytes:
    """Encode a 256-byte SA request: 24-byte common header, RMPP, SM_Key@36, ComponentMask@48, data@56."""
    if len(data) > SA_DATA_LEN:
        raise SAMadError(f"SA data of {len(data)} bytes exceeds {SA_DATA_LEN}")
    b = bytearray(MAD_LEN)
    struct.pack_into(">BBBBHHQHHI", b, 0, 1, 0x03, 2, method, 0, 0, tid, attr_id, 0, attr_mod)
    struct.pack_into(">Q", b, 36, sm_key)
    struct.pack_into(">Q", b, 48, comp_mask)
    b[SA_HDR_LEN:SA_HDR_LEN + len(data)] = data
    return bytes(b)


def parse_sa_mad(mad: bytes) -> SAMad:
    """Decode an SA MAD (request or response)."""
    if len(mad) < SA_HDR_LEN:
        raise SAMadError(f"short SA MAD ({len(mad)} bytes)")
    _bv, cls, _cv, method, status, _cs, tid, attr, _r, mod = struct.unpack_from(">BBBBHHQHHI", mad, 0)
    (sm_key,) = struct.unpack_from(">Q", mad, 36)
    (offset,) = struct.unpack_from(">H", mad, 44)
    (mask,) = struct.unpack_from(">Q", mad, 48)
    return SAMad(method=method, status=status, tid=tid, attr_id=attr, attr_mod=mod, comp_mask=mask,
                 attr_offset=offset, sm_key=sm_key, data=bytes(mad[SA_HDR_LEN:]), mgmt_class=cls)


def pack_smp(attr_id: int, tid: int, attr_mod: int = 0) -> bytes:
    """Encode a directed-route SMP Get with hop count 0: a question to our own port."""
    b = bytearray(MAD_LEN)
    struct.pack_into(">BBBBHBBQHHI", b, 0, 1, 0x81, 1, METHOD_GET, 0, 0, 0, tid, attr_id, 0, attr_mod)
    struct.pack_into(">HH", b, 32, 0xFFFF, 0xFFFF)     # DrSLID, DrDLID: permissive
    return bytes(b)


def parse_smp(mad: bytes) -> tuple[int, int, int, bytes]:
    """Decode a directed-route SMP: (method, status without the D bit, TID, 64-byte data)."""
    if len(mad) < 128:
        raise SAMadError(f"short SMP ({len(mad)} bytes)")
    _bv, _cls, _cv, method, status, _hp, _hc, tid = struct.unpack_from(">BBBBHBBQ", mad, 0)
    return method, status & 0x7FFF, tid, bytes(mad[64:128])


# ---------------------------------------------------------------- for people

def as_dict(rec) -> dict:
    """A record as plain JSON-friendly values for people: GIDs as IPv6 text, the rest as is."""
    out = {}
    for f in fields(rec):
        v = getattr(rec, f.name)
        out[f.name] = gid_str(v) if isinstance(v, bytes) and len(v) == 16 else list(v) if isinstance(
            v, tuple) else v
    if isinstance(rec, LocalPort):
        out["gid"], out["state_name"] = gid_str(rec.gid), rec.state_name
    return out
