"""Subnet Administration client over libibumad: own port, PathRecords, ClassPortInfo, multicast joins.

Layers, each testable on its own:
- pure records (`PathRecord`, `MCMemberRecord`, `ClassPortInfo`, `LocalPort`) with `pack`/`parse`, and
  the SA and SMP MAD headers (`pack_sa_mad`, `parse_sa_mad`, `pack_smp`, `parse_smp`); offsets follow
  IBA vol. 1 chapters 14-15 and DESIGN 4;
- `SAClient`: one umad port; every query goes through one transaction engine that matches replies on
  the low 32 bits of the TID (the kernel and umad2sim own the high half), keeps a per-attempt timeout
  that backs off, retries lost or busy queries, bounds the queries in flight (`max_outstanding`) and
  gives up at a per-request deadline; SA status codes become distinct `SAError` subclasses;
- `PathCache`: PathRecords with an expiry, dropped explicitly by `invalidate`.

Own port state is re-read on demand with directed-route SMPs to ourselves (PortInfo, NodeInfo,
PKeyTable), since umad2sim's `umad_get_port` is a snapshot taken at attach.

Running a client as a simulated host: umad2sim binds a process to one ibsim node when it starts, so
a process can be only one host. Tests and tools therefore run the client in a child process with the
host's environment (`SimFabric.client_env(host)`) and talk to it over pipes:
`python -m xdpoib.fabric.sa serve` reads one JSON request per line on stdin and answers one JSON line
on stdout; `RemoteSAClient` (also `SimFabric.sa_client(host)`) wraps that child with the same methods
as `SAClient`, re-raising the same exception classes. On a real HCA just use `SAClient.open()`.
`python -m xdpoib.fabric.sa port|cpi|path DGID|member MGID` are one-shot queries for people.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, fields, replace

from xdpoib.errors import AddressError, UsageError, XdpoibError
from xdpoib.fabric.base import gid_str

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

    def pkey_index(self, pkey: int) -> int | None:
        """Index of `pkey` in the P_Key table (membership bit ignored), or None."""
        for i, p in enumerate(self.pkeys):
            if p & 0x7FFF == pkey & 0x7FFF and p & 0x7FFF:
                return i
        return None


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


# ---------------------------------------------------------------- path cache

class PathCache:
    """PathRecords by (DGID, SGID, P_Key) with a time to live; `invalidate` drops entries explicitly."""

    def __init__(self, ttl: float = 300.0, clock=time.monotonic):
        self.ttl, self.clock = ttl, clock
        self._entries: dict[tuple[bytes, bytes, int], tuple[PathRecord, float]] = {}
        self.hits = self.misses = 0

    def get(self, dgid, sgid, pkey: int) -> PathRecord | None:
        """The cached record if present and not expired, else None (an expired entry is dropped)."""
        key = (to_gid(dgid), to_gid(sgid), pkey)
        hit = self._entries.get(key)
        if hit and hit[1] > self.clock():
            self.hits += 1
            return hit[0]
        if hit:
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, rec: PathRecord, pkey: int | None = None) -> None:
        """Remember `rec` until now + ttl (under the P_Key it was asked for)."""
        key = (to_gid(rec.dgid), to_gid(rec.sgid), rec.pkey if pkey is None else pkey)
        self._entries[key] = (rec, self.clock() + self.ttl)

    def invalidate(self, dgid=None) -> int:
        """Drop every entry for `dgid` (all entries when None); return how many were dropped."""
        if dgid is None:
            n = len(self._entries)
            self._entries.clear()
            return n
        g = to_gid(dgid)
        keys = [k for k in self._entries if k[0] == g]
        for k in keys:
            del self._entries[k]
        return len(keys)

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------- the client

@dataclass
class _Request:
    """One query in the transaction engine."""

    mgmt_class: int
    mad: bytes                  # with TID 0; the engine patches the low 32 bits per attempt
    what: str
    deadline: float
    dlid: int = 0
    attempts: int = 0
    tid: int = 0
    sent_at: float = 0.0
    timeout: float = 0.0
    result: object = None
    done: bool = False
    busy: bool = False


@dataclass
class RetryPolicy:
    """Per-attempt timeout (doubling from `timeout` up to `max_timeout`), retries and overall deadline."""

    timeout: float = 0.1
    max_timeout: float = 1.0
    retries: int = 8
    deadline: float = 10.0


LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LatencyHistogram:
    """Query durations per query type, in Prometheus' cumulative-bucket form (DESIGN 7)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: Counter = Counter()

    def observe(self, kind: str, seconds: float) -> None:
        """Count one query of `kind` that took `seconds` (answered or not)."""
        row = self.counts.setdefault(kind, [0] * (len(self.buckets) + 1))
        for i, le in enumerate(self.buckets):
            if seconds <= le:
                row[i] += 1
        row[-1] += 1
        self.sums[kind] += seconds

    def snapshot(self) -> dict[str, dict]:
        """{type: {"buckets": {le: cumulative count}, "count": n, "sum": seconds}}."""
        return {k: {"buckets": dict(zip(map(str, self.buckets), row[:-1], strict=True)), "count": row[-1],
                    "sum": self.sums[k]} for k, row in self.counts.items()}


@dataclass
class SAClient:
    """An SA client on one umad port. Thread-safe: one transaction engine behind a lock."""

    umad: object
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    max_outstanding: int = 16
    path_cache: PathCache = field(default_factory=PathCache)
    sm_key: int = 0             # 0: an ordinary client; OpenSM's default SM_Key (1) makes us trusted

    def __post_init__(self):
        self._lock = threading.RLock()
        self._tid = (os.getpid() & 0xFFFF) << 16
        self._port: LocalPort | None = None
        self._snap = None
        self._cpi: ClassPortInfo | None = None
        self.stats: Counter = Counter()      # (type, ok|error|timeout), and "timeouts", "lost", "busy"
        self.latency = LatencyHistogram()
        self.peak_inflight = 0                  # most queries ever in flight at once (<= max_outstanding)

    @classmethod
    def open(cls, device: str | None = None, port: int | None = None, **kw) -> SAClient:
        """Open the umad port (default: the first one) and read our own port once."""
        from xdpoib.fabric.umad import UmadPort

        client = cls(UmadPort(device, port), **kw)
        try:
            client.port()
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """Close the umad port (idempotent)."""
        if self.umad is not None:
            self.umad.close()
            self.umad = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- transaction engine

    def _next_tid(self) -> int:
        self._tid = (self._tid + 1) & 0xFFFFFFFF or 1
        return self._tid

    def _send(self, r: _Request, now: float) -> None:
        r.tid = self._next_tid()
        r.timeout = min(self.policy.timeout * (2 ** r.attempts), self.policy.max_timeout)
        r.attempts += 1
        r.sent_at = now
        mad = bytearray(r.mad)
        struct.pack_into(">I", mad, 12, r.tid)
        ms = max(1, int(r.timeout * 1000))
        if r.mgmt_class == 0x81:
            self.umad.send(0x81, bytes(mad), 0xFFFF, 0, 0, timeout_ms=ms)
        else:
            sm_sl = self._port.sm_sl if self._port else 0
            self.umad.send(0x03, bytes(mad), r.dlid, SA_QP, SA_QKEY, sl=sm_sl, timeout_ms=ms)

    def _fail_or_retry(self, r: _Request, now: float, pending: deque) -> None:
        if r.attempts > self.policy.retries or now >= r.deadline:
            r.done = True
            err = SABusyError if r.busy else SATimeoutError
            r.result = err(f"{r.what}: {err.what} after {r.attempts} attempts")
        else:
            pending.append(r)

    def _run(self, requests: list[_Request]) -> None:
        """Send every request, at most `max_outstanding` at once; fill in `result` (MAD bytes or error)."""
        if self.umad is None:
            raise SAError("SA client is closed")
        pending, inflight = deque(requests), {}
        while pending or inflight:
            now = time.monotonic()
            backing_off: deque = deque()
            while pending and len(inflight) < self.max_outstanding:
                r = pending.popleft()
                if r.busy and r.sent_at + r.timeout > now:     # busy: back off before resending
                    backing_off.append(r)
                    continue
                self._send(r, now)
                inflight[r.tid] = r
            self.peak_inflight = max(self.peak_inflight, len(inflight))
            pending.extendleft(reversed(backing_off))
            if not inflight:
                time.sleep(max(0.001, min(r.sent_at + r.timeout for r in pending) - now))
                continue
            first = min(r.sent_at + r.timeout for r in inflight.values())
            got = self.umad.recv(int(max(0.0, first - time.monotonic()) * 1000) + 1)
            now = time.monotonic()
            if got is not None:
                cls, ustatus, mad = got
                tid = struct.unpack_from(">I", mad, 12)[0] if len(mad) >= 16 else -1
                r = inflight.get(tid)
                if r is not None and r.mgmt_class == cls:
                    del inflight[tid]
                    mstatus = struct.unpack_from(">H", mad, 4)[0] & 0x7FFF
                    if ustatus:                           # 110: lost (a timeout echo, or ibsim's drop)
                        self.stats["lost"] += 1
                        self._fail_or_retry(r, now, pending)
                    elif mstatus & 0x1F == 0x0001:        # busy: back off, then retry
                        self.stats["busy"] += 1
                        r.busy = True
                        self._fail_or_retry(r, now, pending)
                    else:
                        r.done, r.result = True, mad
            for tid, r in list(inflight.items()):
                if now >= r.sent_at + r.timeout:
                    del inflight[tid]
                    self.stats["timeouts"] += 1
                    self._fail_or_retry(r, now, pending)

    def _request(self, mgmt_class: int, mad: bytes, what: str, deadline: float | None = None) -> _Request:
        dl = time.monotonic() + (self.policy.deadline if deadline is None else deadline)
        dlid = 0
        if mgmt_class == 0x03:
            if self._port is None or not self._port.sm_lid:
                self.port()
            dlid = self._port.sm_lid
            if not dlid:
                raise SATimeoutError(f"{what}: no SM known to our port (SM LID 0)")
        return _Request(mgmt_class=mgmt_class, mad=mad, what=what, deadline=dl, dlid=dlid)

    def _sa(self, method: int, attr: int, mask: int, data: bytes, what: str, kind: str,
            deadline: float | None = None, wait: float | None = None) -> SAMad:
        """One SA query: returns the response, or raises the error its status maps to. With `wait`
        (seconds), the query is not made at all (SABusyError) if another thread's query still holds
        the client after that long: a caller on a data path must not queue behind a slow SA."""
        mad = pack_sa_mad(method, attr, 0, mask, data, sm_key=self.sm_key)
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            self.stats["skipped_busy"] += 1
            raise SABusyError(f"{what}: the SA client is busy with another query")
        try:
            r = self._request(0x03, mad, what, deadline)
            t0 = time.monotonic()
            self._run([r])
            if isinstance(r.result, SATimeoutError):
                # The SM may have moved (failover, our port re-registered): re-read our port and, if
                # it names another SM LID now, ask that one.
                try:
                    moved = self.port().sm_lid not in (0, r.dlid)
                except SAError:
                    moved = False
                if moved:
                    self.stats["sm_moved"] += 1
                    r = self._request(0x03, mad, what, deadline)
                    self._run([r])
            self.latency.observe(kind, time.monotonic() - t0)
        finally:
            self._lock.release()
        return self._answer(r, kind)

    def _answer(self, r: _Request, kind: str) -> SAMad:
        if isinstance(r.result, Exception):
            self.stats[(kind, "timeout")] += 1
            raise r.result
        resp = parse_sa_mad(r.result)
        if resp.status:
            self.stats[(kind, "error")] += 1
            raise status_error(resp.status, r.what)
        self.stats[(kind, "ok")] += 1
        return resp

    def _smp(self, attr: int, mod: int = 0) -> bytes:
        with self._lock:
            r = _Request(0x81, pack_smp(attr, 0, mod), f"SMP {attr:#x} to our port",
                         time.monotonic() + self.policy.deadline)
            self._run([r])
        if isinstance(r.result, Exception):
            raise r.result
        _m, status, _tid, data = parse_smp(r.result)
        if status:
            raise status_error(status, f"SMP {attr:#x} to our port")
        return data

    # ---- own port

    def port(self) -> LocalPort:
        """Re-read our port: LID, SM LID, GID prefix, GUID, state, MTU, P_Key table (fresh SMPs)."""
        if self.umad is None:
            raise SAError("SA client is closed")
        # the snapshot gives only the port's identity (CA name, port number), which never changes: read
        # it once. umad_get_port reads sysfs, which umad2sim emulates in a way that is not thread-safe
        # (seen: ENODEV while another thread opened files), and everything else comes from SMPs below.
        if self._snap is None:
            self._snap = self.umad.snapshot()
        snap = self._snap
        node = self._smp(SMP_ATTR_NODE_INFO)
        port_guid = struct.unpack_from(">Q", node, 20)[0]
        (pcap,) = struct.unpack_from(">H", node, 28)
        pi = PortInfo.parse(self._smp(SMP_ATTR_PORT_INFO, snap.portnum))
        pkeys: list[int] = []
        for block in range(max(1, (pcap + 31) // 32)):
            d = self._smp(SMP_ATTR_PKEY_TABLE, block)
            pkeys.extend(struct.unpack(">32H", d))
        pkeys = pkeys[: max(pcap, 1)]
        lp = LocalPort(ca_name=snap.ca_name, portnum=snap.portnum, port_guid=port_guid,
                       gid_prefix=pi.gid_prefix, lid=pi.lid, lmc=pi.lmc, sm_lid=pi.sm_lid, sm_sl=pi.sm_sl,
                       state=pi.state, phys_state=pi.phys_state, capability_mask=pi.capability_mask,
                       mtu_cap=pi.mtu_cap, active_mtu=pi.active_mtu, pkeys=tuple(pkeys))
        if self._port is not None and (self._port.lid, self._port.gid) != (lp.lid, lp.gid):
            self.path_cache.invalidate()
        self._port = lp
        return lp

    @property
    def gid(self) -> bytes:
        """Our port GID (from the last `port()` read)."""
        if self._port is None:
            self.port()
        return self._port.gid

    # ---- SA queries

    def class_port_info(self, refresh: bool = False) -> ClassPortInfo:
        """The SA's ClassPortInfo (cached after the first Get)."""
        if self._cpi is None or refresh:
            resp = self._sa(METHOD_GET, ATTR_CLASS_PORT_INFO, 0, b"", "ClassPortInfo Get", "cpi")
            self._cpi = ClassPortInfo.parse(resp.data)
        return self._cpi

    def path(self, dgid, sgid=None, pkey: int = 0xFFFF, cached: bool = True) -> PathRecord:
        """PathRecord Get by DGID, SGID and P_Key (mask 0x200C); served from the cache when fresh."""
        dgid = to_gid(dgid)
        sgid = to_gid(sgid) if sgid is not None else self.gid
        if cached:
            hit = self.path_cache.get(dgid, sgid, pkey)
            if hit is not None:
                return hit
        q = PathRecord(dgid=dgid, sgid=sgid, pkey=pkey)
        resp = self._sa(METHOD_GET, ATTR_PATH_RECORD, PR_DGID | PR_SGID | PR_PKEY, q.pack(),
                        f"PathRecord to {gid_str(dgid)} (P_Key {pkey:#06x})", "path")
        rec = PathRecord.parse(resp.data)
        self.path_cache.put(rec, pkey)
        return rec

    def path_to_lid(self, dlid: int, pkey: int = 0xFFFF) -> PathRecord:
        """PathRecord Get by DLID (with our SGID and the P_Key): who is behind a LID. A datagram that
        came without a GRH names its sender only by SLID and source QPN; this gives its GID."""
        q = PathRecord(dgid=bytes(16), sgid=self.gid, dlid=dlid, pkey=pkey)
        resp = self._sa(METHOD_GET, ATTR_PATH_RECORD, PR_SGID | PR_DLID | PR_PKEY, q.pack(),
                        f"PathRecord to LID {dlid} (P_Key {pkey:#06x})", "path")
        rec = PathRecord.parse(resp.data)
        self.path_cache.put(rec, pkey)
        return rec

    def paths(self, dgids, pkey: int = 0xFFFF) -> list[PathRecord | SAError]:
        """Resolve many DGIDs at once (bounded in flight); each entry is a record or its error."""
        sgid = self.gid
        with self._lock:
            reqs = [self._request(0x03, pack_sa_mad(METHOD_GET, ATTR_PATH_RECORD, 0, PR_DGID | PR_SGID
                                                    | PR_PKEY, PathRecord(dgid=to_gid(d), sgid=sgid,
                                                                          pkey=pkey).pack(),
                                                    sm_key=self.sm_key),
                                  f"PathRecord to {gid_str(to_gid(d))}") for d in dgids]
            t0 = time.monotonic()
            self._run(reqs)
            self.latency.observe("paths", time.monotonic() - t0)
        out: list[PathRecord | SAError] = []
        for r in reqs:
            try:
                rec = PathRecord.parse(self._answer(r, "path").data)
                self.path_cache.put(rec, pkey)
                out.append(rec)
            except SAError as e:
                out.append(e)
        return out

    def send_only_join_state(self) -> int:
        """JoinState for a send-only join: SendOnlyFullMember (8) if the SA supports it, else 4."""
        return JOIN_SEND_ONLY_FULL if self.class_port_info().send_only_full_member else JOIN_SEND_ONLY_NON

    def join(self, mgid, join_state: int = JOIN_FULL, create: MCMemberRecord | None = None) -> MCMemberRecord:
        """Join `mgid` (Set, mask 0x10003); with `create`, create it with that group's parameters (0x173F7)."""
        mgid = to_gid(mgid)
        rec = MCMemberRecord(mgid=mgid, port_gid=self.gid, join_state=join_state)
        mask = MC_JOIN_MASK
        if create is not None:
            rec = replace(rec, qkey=create.qkey, mtu_selector=SELECTOR_EXACTLY, mtu=create.mtu,
                          tclass=create.tclass, pkey=create.pkey, rate_selector=SELECTOR_EXACTLY,
                          rate=create.rate, sl=create.sl, flow_label=create.flow_label,
                          hop_limit=create.hop_limit)
            mask = MC_CREATE_MASK
        resp = self._sa(METHOD_SET, ATTR_MCMEMBER_RECORD, mask, rec.pack(),
                        f"join {gid_str(mgid)} (JoinState {join_state})", "join")
        return MCMemberRecord.parse(resp.data)

    def join_send_only(self, mgid, create: MCMemberRecord | None = None) -> MCMemberRecord:
        """Send-only join: JoinState 8 when ClassPortInfo allows it, else 4 (which cannot create)."""
        state = self.send_only_join_state()
        return self.join(mgid, state, create if state == JOIN_SEND_ONLY_FULL else None)

    def leave(self, mgid, join_state: int = JOIN_FULL) -> MCMemberRecord:
        """Leave `mgid` (Delete, mask 0x10003)."""
        mgid = to_gid(mgid)
        rec = MCMemberRecord(mgid=mgid, port_gid=self.gid, join_state=join_state)
        resp = self._sa(METHOD_DELETE, ATTR_MCMEMBER_RECORD, MC_JOIN_MASK, rec.pack(),
                        f"leave {gid_str(mgid)} (JoinState {join_state})", "leave")
        return MCMemberRecord.parse(resp.data)

    def member(self, mgid, port_gid=None, deadline: float | None = None,
               wait: float | None = None) -> MCMemberRecord | None:
        """Get one membership (MGID + PortGID; ours by default); None when the port is not a member.
        `deadline` and `wait` as in `_sa` (a data path asks with a short deadline and a short wait)."""
        mgid = to_gid(mgid)
        pg = to_gid(port_gid) if port_gid is not None else self.gid
        rec = MCMemberRecord(mgid=mgid, port_gid=pg)
        try:
            resp = self._sa(METHOD_GET, ATTR_MCMEMBER_RECORD, MC_MGID | MC_PORT_GID, rec.pack(),
                            f"membership of {gid_str(pg)} in {gid_str(mgid)}", "member", deadline, wait)
        except SANoRecordsError:
            return None
        got = MCMemberRecord.parse(resp.data)
        # An untrusted requester (no SM_Key) gets PortGID and JoinState zeroed: the record's presence
        # is the answer, so report the PortGID we asked about.
        return got if any(got.port_gid) else replace(got, port_gid=pg)

    def group(self, mgid) -> MCMemberRecord | None:
        """The group's parameters (Get by MGID alone); None when the group does not exist."""
        mgid = to_gid(mgid)
        try:
            resp = self._sa(METHOD_GET, ATTR_MCMEMBER_RECORD, MC_MGID, MCMemberRecord(mgid=mgid).pack(),
                            f"group {gid_str(mgid)}", "group")
        except SANoRecordsError:
            return None
        return MCMemberRecord.parse(resp.data)


# ---------------------------------------------------------------- child-process protocol

RECORD_TYPES = {c.__name__: c for c in (PathRecord, MCMemberRecord, ClassPortInfo, LocalPort)}
REMOTE_METHODS = ("port", "class_port_info", "path", "paths", "send_only_join_state", "join",
                  "join_send_only", "leave", "member", "group", "stats", "latency", "set_policy", "set_sm_key",
                  "set_max_outstanding", "peak_inflight", "path_cache_stats", "invalidate")


def encode(obj):
    """Records, bytes and errors as JSON-safe values (see `decode`)."""
    if isinstance(obj, bytes):
        return {"$b": obj.hex()}
    if isinstance(obj, SAError):
        return {"$e": type(obj).__name__, "status": obj.status, "message": str(obj)}
    if type(obj).__name__ in RECORD_TYPES and hasattr(obj, "__dataclass_fields__"):
        return {"$t": type(obj).__name__, "f": {f.name: encode(getattr(obj, f.name)) for f in fields(obj)}}
    if isinstance(obj, list | tuple):
        return [encode(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


def decode(obj):
    """Inverse of `encode`."""
    if isinstance(obj, dict):
        if "$b" in obj:
            return bytes.fromhex(obj["$b"])
        if "$e" in obj:
            return ERROR_CLASSES.get(obj["$e"], SAError)(obj["message"], obj["status"])
        if "$t" in obj:
            cls = RECORD_TYPES[obj["$t"]]
            vals = {k: decode(v) for k, v in obj["f"].items()}
            if cls is LocalPort:
                vals["pkeys"] = tuple(vals["pkeys"])
            return cls(**vals)
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(x) for x in obj]
    return obj


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


def _serve_call(client: SAClient, op: str, args: list, kwargs: dict):
    if op == "stats":
        return {" ".join(map(str, k)) if isinstance(k, tuple) else k: v for k, v in client.stats.items()}
    if op == "latency":
        return client.latency.snapshot()
    if op == "set_policy":
        client.policy = RetryPolicy(**kwargs)
        return None
    if op == "set_sm_key":
        client.sm_key = int(args[0])
        return None
    if op == "set_max_outstanding":
        client.max_outstanding = max(1, int(args[0]))
        client.peak_inflight = 0
        return None
    if op == "peak_inflight":
        return client.peak_inflight
    if op == "path_cache_stats":
        c = client.path_cache
        return {"entries": len(c), "hits": c.hits, "misses": c.misses}
    if op == "invalidate":
        return client.path_cache.invalidate(*args)
    return getattr(client, op)(*args, **kwargs)


def serve(device: str | None, port: int | None, stdin=None, stdout=None) -> int:
    """Answer JSON requests {"op", "args", "kwargs"} one per line until EOF or {"op": "close"}."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def reply(**msg):
        """Write one answer line."""
        stdout.write(json.dumps(msg) + "\n")
        stdout.flush()

    try:
        client = SAClient.open(device, port)
    except XdpoibError as e:
        reply(error=encode(e) if isinstance(e, SAError) else {"$x": type(e).__name__, "message": str(e)})
        return 1
    with client:
        reply(ok=encode(client._port), pid=os.getpid())
        for line in stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            if req.get("op") == "close":
                reply(ok=None)
                break
            try:
                if req["op"] not in REMOTE_METHODS:
                    raise SAError(f"unknown operation {req['op']!r}")
                res = _serve_call(client, req["op"], decode(req.get("args", [])), decode(req.get("kwargs", {})))
                reply(ok=encode(res))
            except SAError as e:
                reply(error=encode(e))
            except XdpoibError as e:
                reply(error={"$x": type(e).__name__, "message": str(e)})
            except (TypeError, ValueError, KeyError) as e:     # a malformed request: say so, stay up
                reply(error={"$x": "UsageError", "message": f"bad request {req.get('op')!r}: {e}"})
    return 0


_OTHER_ERRORS = {"AddressError": AddressError, "UsageError": UsageError}


class RemoteSAClient:
    """An `SAClient` living in a child process started with a host's environment (see module doc)."""

    def __init__(self, env: dict[str, str], cwd: str | None = None, device: str | None = None,
                 port: int | None = None, python: str | None = None, timeout: float = 30.0):
        argv = [python or sys.executable, "-m", "xdpoib.fabric.sa", "serve"]
        if device:
            argv += ["--device", device]
        if port:
            argv += ["--port", str(port)]
        full = dict(os.environ)
        full.update(env)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        full["PYTHONPATH"] = os.pathsep.join(p for p in (root, full.get("PYTHONPATH")) if p)
        self.timeout = timeout
        self.proc = subprocess.Popen(argv, env=full, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.pid = self.proc.pid
        try:
            self._port = self._read()
        except BaseException:
            self.close()
            raise

    def _read(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise SATimeoutError(f"SA client process {self.proc.pid} did not answer")
        msg = json.loads(line)
        if "error" in msg:
            err = msg["error"]
            if "$x" in err:
                raise _OTHER_ERRORS.get(err["$x"], XdpoibError)(err["message"])
            raise decode(err)
        return decode(msg["ok"])

    def call(self, op: str, *args, **kwargs):
        """Run one `SAClient` method in the child and return its result (or raise its error)."""
        self.proc.stdin.write(json.dumps({"op": op, "args": encode(list(args)), "kwargs": encode(kwargs)})
                              + "\n")
        self.proc.stdin.flush()
        return self._read()

    def __getattr__(self, name):
        if name in REMOTE_METHODS:
            return lambda *a, **k: self.call(name, *a, **k)
        raise AttributeError(name)

    def close(self) -> None:
        """Ask the child to close its port and exit (a normal exit frees its ibsim slot); idempotent."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- one-shot CLI

def main(argv: list[str] | None = None) -> int:
    """`python -m xdpoib.fabric.sa serve|port|cpi|path DGID|member MGID [PORTGID]`."""
    ap = argparse.ArgumentParser(prog="python -m xdpoib.fabric.sa", description=__doc__.splitlines()[0])
    ap.add_argument("--device")
    ap.add_argument("--port", type=int)
    ap.add_argument("op", choices=("serve", "port", "cpi", "path", "member", "group"))
    ap.add_argument("args", nargs="*")
    a = ap.parse_args(argv)
    if a.op == "serve":
        return serve(a.device, a.port)
    try:
        with SAClient.open(a.device, a.port) as c:
            fn = {"port": c.port, "cpi": c.class_port_info, "path": c.path, "member": c.member,
                  "group": c.group}[a.op]
            res = fn(*a.args)
            print(json.dumps(as_dict(res) if res is not None else None, indent=1))
    except XdpoibError as e:
        print(f"xdpoib: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
