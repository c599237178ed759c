"""A small ctypes layer over libibverbs.so.1 for the UD data path that pyverbs 44 cannot give us.

pyverbs 44 has no multicast attach on a QP and exposes no object's C pointer (`ibv_qp *`, `ibv_pd *`,
`ibv_cq *`, `ibv_ah *`), and `ibv_import_device` (the official way to share a context) is not
implemented by every provider (rxe lacks it). A UD QP that must attach to multicast therefore lives
here, with everything that has to name it or share its protection domain: context, PD, memory regions,
CQs, completion channel, address handles, post/poll and attach/detach. `verbs.py` keeps pyverbs for the
port queries and owns the lifetimes.

Only the stable ABI of libibverbs 1.1 is used: exported functions, the public structs of `verbs.h`, and
the legacy `ibv_context.ops` table through which `verbs.h` itself inlines `ibv_post_send`,
`ibv_post_recv`, `ibv_poll_cq` and `ibv_req_notify_cq`.

For the columnar data path, arrays of `Wc`, `SendWr`, `Sge` and `RecvWr` are also read and written as
numpy structured arrays (`WC_DTYPE`, `SEND_WR_DTYPE`, `SGE_DTYPE`, `RECV_WR_DTYPE`: the same bytes, the
fields at the ctypes offsets), and `Cq.poll_into`, `UdQp.post_send_at`, `UdQp.post_recv_at` take raw
addresses into such arrays, so a batch costs one call and a few array operations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import os
from ctypes import (
    POINTER,
    Structure,
    Union,
    c_char_p,
    c_int,
    c_size_t,
    c_uint,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)

import numpy as np

# ---------------------------------------------------------------- constants (verbs.h)

QPT_UD = 4
QPS_RESET, QPS_INIT, QPS_RTR, QPS_RTS, QPS_ERR = 0, 1, 2, 3, 6
QP_STATE, QP_PKEY_INDEX, QP_PORT, QP_QKEY, QP_SQ_PSN = 1 << 0, 1 << 4, 1 << 5, 1 << 6, 1 << 16
WR_SEND = 2
SEND_SIGNALED = 1 << 1
WC_RECV = 1 << 7
WC_GRH = 1 << 0
ACCESS_LOCAL_WRITE = 1

EVENT_CQ_ERR, EVENT_QP_FATAL, EVENT_QP_REQ_ERR, EVENT_QP_ACCESS_ERR = 0, 1, 2, 3
QP_ERROR_EVENTS = frozenset({EVENT_QP_FATAL, EVENT_QP_REQ_ERR, EVENT_QP_ACCESS_ERR})   # element: the ibv_qp *
EVENT_PORT_ACTIVE, EVENT_PORT_ERR, EVENT_LID_CHANGE, EVENT_PKEY_CHANGE = 9, 10, 11, 12
EVENT_SM_CHANGE, EVENT_CLIENT_REREGISTER, EVENT_GID_CHANGE = 13, 17, 18
PORT_EVENTS = frozenset({EVENT_PORT_ACTIVE, EVENT_PORT_ERR, EVENT_LID_CHANGE, EVENT_PKEY_CHANGE,
                         EVENT_SM_CHANGE, EVENT_CLIENT_REREGISTER, EVENT_GID_CHANGE})

# Indices in struct ibv_context_ops (32 function pointers right after ibv_context.device).
_OP_POLL_CQ, _OP_REQ_NOTIFY_CQ, _OP_POST_SEND, _OP_POST_RECV = 11, 12, 25, 26
_OPS_COUNT = 32


# ---------------------------------------------------------------- structs (verbs.h, ABI 1.1)

class Gid(Union):
    """union ibv_gid: 16 raw bytes (8-byte aligned, as its subnet_prefix/interface_id view makes it)."""

    _fields_ = [("raw", c_uint8 * 16), ("_align", c_uint64 * 2)]


class GlobalRoute(Structure):
    """struct ibv_global_route."""

    _fields_ = [("dgid", Gid), ("flow_label", c_uint32), ("sgid_index", c_uint8),
                ("hop_limit", c_uint8), ("traffic_class", c_uint8)]


class AhAttr(Structure):
    """struct ibv_ah_attr."""

    _fields_ = [("grh", GlobalRoute), ("dlid", c_uint16), ("sl", c_uint8), ("src_path_bits", c_uint8),
                ("static_rate", c_uint8), ("is_global", c_uint8), ("port_num", c_uint8)]


class QpCap(Structure):
    """struct ibv_qp_cap."""

    _fields_ = [("max_send_wr", c_uint32), ("max_recv_wr", c_uint32), ("max_send_sge", c_uint32),
                ("max_recv_sge", c_uint32), ("max_inline_data", c_uint32)]


class QpInitAttr(Structure):
    """struct ibv_qp_init_attr."""

    _fields_ = [("qp_context", c_void_p), ("send_cq", c_void_p), ("recv_cq", c_void_p),
                ("srq", c_void_p), ("cap", QpCap), ("qp_type", c_int), ("sq_sig_all", c_int)]


class QpAttr(Structure):
    """struct ibv_qp_attr."""

    _fields_ = [("qp_state", c_int), ("cur_qp_state", c_int), ("path_mtu", c_int),
                ("path_mig_state", c_int), ("qkey", c_uint32), ("rq_psn", c_uint32),
                ("sq_psn", c_uint32), ("dest_qp_num", c_uint32), ("qp_access_flags", c_uint),
                ("cap", QpCap), ("ah_attr", AhAttr), ("alt_ah_attr", AhAttr),
                ("pkey_index", c_uint16), ("alt_pkey_index", c_uint16),
                ("en_sqd_async_notify", c_uint8), ("sq_draining", c_uint8), ("max_rd_atomic", c_uint8),
                ("max_dest_rd_atomic", c_uint8), ("min_rnr_timer", c_uint8), ("port_num", c_uint8),
                ("timeout", c_uint8), ("retry_cnt", c_uint8), ("rnr_retry", c_uint8),
                ("alt_port_num", c_uint8), ("alt_timeout", c_uint8), ("rate_limit", c_uint32)]


class Sge(Structure):
    """struct ibv_sge."""

    _fields_ = [("addr", c_uint64), ("length", c_uint32), ("lkey", c_uint32)]


class _Ud(Structure):
    _fields_ = [("ah", c_void_p), ("remote_qpn", c_uint32), ("remote_qkey", c_uint32)]


class _Atomic(Structure):
    _fields_ = [("remote_addr", c_uint64), ("compare_add", c_uint64), ("swap", c_uint64),
                ("rkey", c_uint32)]


class _WrUnion(Union):
    _fields_ = [("ud", _Ud), ("atomic", _Atomic)]


class _BindInfo(Structure):
    _fields_ = [("mr", c_void_p), ("addr", c_uint64), ("length", c_uint64), ("flags", c_uint)]


class _BindMw(Structure):
    _fields_ = [("mw", c_void_p), ("rkey", c_uint32), ("bind_info", _BindInfo)]


class _TailUnion(Union):
    _fields_ = [("bind_mw", _BindMw)]


class SendWr(Structure):
    """struct ibv_send_wr (the UD member of its union is the one used)."""


SendWr._fields_ = [("wr_id", c_uint64), ("next", POINTER(SendWr)), ("sg_list", POINTER(Sge)),
                   ("num_sge", c_int), ("opcode", c_int), ("send_flags", c_uint), ("imm_data", c_uint32),
                   ("wr", _WrUnion), ("qp_type", c_uint32), ("tail", _TailUnion)]


class RecvWr(Structure):
    """struct ibv_recv_wr."""


RecvWr._fields_ = [("wr_id", c_uint64), ("next", POINTER(RecvWr)), ("sg_list", POINTER(Sge)),
                   ("num_sge", c_int)]


class Wc(Structure):
    """struct ibv_wc."""

    _fields_ = [("wr_id", c_uint64), ("status", c_int), ("opcode", c_int), ("vendor_err", c_uint32),
                ("byte_len", c_uint32), ("imm_data", c_uint32), ("qp_num", c_uint32),
                ("src_qp", c_uint32), ("wc_flags", c_uint), ("pkey_index", c_uint16),
                ("slid", c_uint16), ("sl", c_uint8), ("dlid_path_bits", c_uint8)]


class AsyncEvent(Structure):
    """struct ibv_async_event (element is a pointer or a port number)."""

    _fields_ = [("element", c_uint64), ("event_type", c_int)]


class _ContextHead(Structure):
    """The start of struct ibv_context: device, the legacy ops table, cmd_fd, async_fd."""

    _fields_ = [("device", c_void_p), ("ops", c_void_p * _OPS_COUNT), ("cmd_fd", c_int), ("async_fd", c_int)]


class _QpHead(Structure):
    """The start of struct ibv_qp, up to qp_num."""

    _fields_ = [("context", c_void_p), ("qp_context", c_void_p), ("pd", c_void_p), ("send_cq", c_void_p),
                ("recv_cq", c_void_p), ("srq", c_void_p), ("handle", c_uint32), ("qp_num", c_uint32)]


class _MrHead(Structure):
    """The start of struct ibv_mr."""

    _fields_ = [("context", c_void_p), ("pd", c_void_p), ("addr", c_void_p), ("length", c_size_t),
                ("handle", c_uint32), ("lkey", c_uint32), ("rkey", c_uint32)]


class _CompChannel(Structure):
    """struct ibv_comp_channel."""

    _fields_ = [("context", c_void_p), ("fd", c_int), ("refcnt", c_int)]


# ---------------------------------------------------------------- numpy views of the same structs

def _dtype(cls, fields: dict[str, tuple[int, str]]) -> np.dtype:
    """A numpy dtype of `sizeof(cls)` bytes with `fields` (name -> (offset, numpy type))."""
    return np.dtype({"names": list(fields), "formats": [t for _, t in fields.values()],
                     "offsets": [o for o, _ in fields.values()], "itemsize": ctypes.sizeof(cls)})


WC_DTYPE = _dtype(Wc, {name: (getattr(Wc, name).offset, t) for name, t in (
    ("wr_id", "<u8"), ("status", "<i4"), ("byte_len", "<u4"), ("src_qp", "<u4"), ("wc_flags", "<u4"),
    ("pkey_index", "<u2"), ("slid", "<u2"), ("sl", "u1"))})
SGE_DTYPE = _dtype(Sge, {"addr": (Sge.addr.offset, "<u8"), "length": (Sge.length.offset, "<u4"),
                         "lkey": (Sge.lkey.offset, "<u4")})
SEND_WR_DTYPE = _dtype(SendWr, {
    "wr_id": (SendWr.wr_id.offset, "<u8"), "next": (SendWr.next.offset, "<u8"),
    "sg_list": (SendWr.sg_list.offset, "<u8"), "send_flags": (SendWr.send_flags.offset, "<u4"),
    "ah": (SendWr.wr.offset + _Ud.ah.offset, "<u8"),
    "remote_qpn": (SendWr.wr.offset + _Ud.remote_qpn.offset, "<u4"),
    "remote_qkey": (SendWr.wr.offset + _Ud.remote_qkey.offset, "<u4")})
RECV_WR_DTYPE = _dtype(RecvWr, {"wr_id": (RecvWr.wr_id.offset, "<u8"), "next": (RecvWr.next.offset, "<u8")})


def as_numpy(array, dtype: np.dtype) -> np.ndarray:
    """A ctypes array of structs as a numpy structured array over the same memory (writes go through)."""
    return np.frombuffer(array, dtype)


# ---------------------------------------------------------------- the library

class VerbsCallError(OSError):
    """A libibverbs call failed; errno and the call's name are in the message."""


def _load():
    name = ctypes.util.find_library("ibverbs") or "libibverbs.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    sigs = {
        "ibv_get_device_list": (c_void_p, [POINTER(c_int)]),
        "ibv_free_device_list": (None, [c_void_p]),
        "ibv_get_device_name": (c_char_p, [c_void_p]),
        "ibv_open_device": (c_void_p, [c_void_p]),
        "ibv_close_device": (c_int, [c_void_p]),
        "ibv_alloc_pd": (c_void_p, [c_void_p]),
        "ibv_dealloc_pd": (c_int, [c_void_p]),
        "ibv_reg_mr": (c_void_p, [c_void_p, c_void_p, c_size_t, c_int]),
        "ibv_dereg_mr": (c_int, [c_void_p]),
        "ibv_create_comp_channel": (c_void_p, [c_void_p]),
        "ibv_destroy_comp_channel": (c_int, [c_void_p]),
        "ibv_create_cq": (c_void_p, [c_void_p, c_int, c_void_p, c_void_p, c_int]),
        "ibv_destroy_cq": (c_int, [c_void_p]),
        "ibv_get_cq_event": (c_int, [c_void_p, POINTER(c_void_p), POINTER(c_void_p)]),
        "ibv_ack_cq_events": (None, [c_void_p, c_uint]),
        "ibv_create_qp": (c_void_p, [c_void_p, POINTER(QpInitAttr)]),
        "ibv_modify_qp": (c_int, [c_void_p, POINTER(QpAttr), c_int]),
        "ibv_destroy_qp": (c_int, [c_void_p]),
        "ibv_create_ah": (c_void_p, [c_void_p, POINTER(AhAttr)]),
        "ibv_destroy_ah": (c_int, [c_void_p]),
        "ibv_attach_mcast": (c_int, [c_void_p, POINTER(Gid), c_uint16]),
        "ibv_detach_mcast": (c_int, [c_void_p, POINTER(Gid), c_uint16]),
        "ibv_get_async_event": (c_int, [c_void_p, POINTER(AsyncEvent)]),
        "ibv_ack_async_event": (None, [POINTER(AsyncEvent)]),
    }
    for fname, (restype, argtypes) in sigs.items():
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


_lib = None

_NotifyFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_int)
# The data-path ops take raw addresses into arrays of structs (also read and written through numpy).
_PollRawFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, c_void_p)
_PostRawFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, POINTER(c_void_p))


def lib():
    """The loaded libibverbs (loaded on first use, so importing this module needs no rdma-core)."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def _fail(call: str, err: int | None = None) -> VerbsCallError:
    err = ctypes.get_errno() if err is None else err
    return VerbsCallError(err, f"{call} failed: {os.strerror(err) if err else 'unknown error'}")


def _checked(ptr, call: str):
    if not ptr:
        raise _fail(call)
    return ptr


def _rc(rc: int, call: str) -> None:
    # Verbs calls return 0, or an errno value (positive) or -1 with errno set, depending on the call.
    if rc:
        raise _fail(call, rc if rc > 0 else None)


# ---------------------------------------------------------------- objects

class Context:
    """An opened device (`ibv_open_device`) with its inlined data-path ops resolved once."""

    def __init__(self, name: str) -> None:
        lib_ = lib()
        count = c_int(0)
        devs = _checked(lib_.ibv_get_device_list(ctypes.byref(count)), "ibv_get_device_list")
        try:
            arr = ctypes.cast(devs, POINTER(c_void_p))
            found = [arr[i] for i in range(count.value) if lib_.ibv_get_device_name(arr[i]).decode() == name]
            if not found:
                raise VerbsCallError(errno_mod.ENODEV, f"no RDMA device named {name!r}")
            self.ptr = _checked(lib_.ibv_open_device(found[0]), f"ibv_open_device({name})")
        finally:
            lib_.ibv_free_device_list(devs)
        head = _ContextHead.from_address(self.ptr)
        self.async_fd = head.async_fd
        self.req_notify_cq = _NotifyFn(head.ops[_OP_REQ_NOTIFY_CQ])
        self.poll_cq_raw = _PollRawFn(head.ops[_OP_POLL_CQ])
        self.post_send_raw = _PostRawFn(head.ops[_OP_POST_SEND])
        self.post_recv_raw = _PostRawFn(head.ops[_OP_POST_RECV])

    def get_async_event(self) -> tuple[int, int] | None:
        """One async event as (event_type, element) without blocking if async_fd is non-blocking."""
        ev = AsyncEvent()
        if lib().ibv_get_async_event(self.ptr, ctypes.byref(ev)):
            return None
        kind, element = ev.event_type, ev.element
        lib().ibv_ack_async_event(ctypes.byref(ev))
        return kind, element

    def close(self) -> None:
        """Close the device (every object made on it must be destroyed first)."""
        if self.ptr:
            lib().ibv_close_device(self.ptr)
            self.ptr = None


class Pd:
    """A protection domain."""

    def __init__(self, ctx: Context) -> None:
        self.ptr = _checked(lib().ibv_alloc_pd(ctx.ptr), "ibv_alloc_pd")

    def close(self) -> None:
        """Deallocate the PD."""
        if self.ptr:
            lib().ibv_dealloc_pd(self.ptr)
            self.ptr = None


class Mr:
    """A registered memory region over `length` bytes at `addr` (the caller keeps the memory alive)."""

    def __init__(self, pd: Pd, addr: int, length: int) -> None:
        self.ptr = _checked(lib().ibv_reg_mr(pd.ptr, addr, length, ACCESS_LOCAL_WRITE), "ibv_reg_mr")
        self.lkey = _MrHead.from_address(self.ptr).lkey

    def close(self) -> None:
        """Deregister the region."""
        if self.ptr:
            lib().ibv_dereg_mr(self.ptr)
            self.ptr = None


class CompChannel:
    """A completion channel: its fd is readable when an armed CQ has a new completion."""

    def __init__(self, ctx: Context) -> None:
        self.ptr = _checked(lib().ibv_create_comp_channel(ctx.ptr), "ibv_create_comp_channel")
        self.fd = _CompChannel.from_address(self.ptr).fd
        os.set_blocking(self.fd, False)

    def drain(self) -> None:
        """Consume and acknowledge every pending CQ event without blocking."""
        cq, cq_ctx = c_void_p(), c_void_p()
        while lib().ibv_get_cq_event(self.ptr, ctypes.byref(cq), ctypes.byref(cq_ctx)) == 0:
            lib().ibv_ack_cq_events(cq, 1)

    def close(self) -> None:
        """Destroy the channel (its CQs first)."""
        if self.ptr:
            lib().ibv_destroy_comp_channel(self.ptr)
            self.ptr = None


class Cq:
    """A completion queue, optionally bound to a completion channel."""

    def __init__(self, ctx: Context, depth: int, channel: CompChannel | None = None) -> None:
        self.ctx = ctx
        chan = channel.ptr if channel is not None else None
        self.ptr = _checked(lib().ibv_create_cq(ctx.ptr, depth, None, chan, 0), "ibv_create_cq")

    def poll_into(self, addr: int, max_entries: int) -> int:
        """One ibv_poll_cq of up to `max_entries` completions written at `addr` (an array of `Wc`); how
        many came."""
        n = self.ctx.poll_cq_raw(self.ptr, max_entries, addr)
        if n < 0:
            raise _fail("ibv_poll_cq", -n if n < -1 else errno_mod.EIO)
        return n

    def arm(self) -> None:
        """Request an event on the channel for the next completion."""
        _rc(self.ctx.req_notify_cq(self.ptr, 0), "ibv_req_notify_cq")

    def close(self) -> None:
        """Destroy the CQ (its QPs first)."""
        if self.ptr:
            lib().ibv_destroy_cq(self.ptr)
            self.ptr = None


class UdQp:
    """A UD QP taken to RTS: pkey_index, qkey and port set on INIT, SQ PSN 0 on RTS."""

    def __init__(self, ctx: Context, pd: Pd, send_cq: Cq, recv_cq: Cq, send_depth: int, recv_depth: int,
                 port: int, pkey_index: int, qkey: int) -> None:
        self.ctx = ctx
        init = QpInitAttr(send_cq=send_cq.ptr, recv_cq=recv_cq.ptr, qp_type=QPT_UD, sq_sig_all=0,
                          cap=QpCap(max_send_wr=send_depth, max_recv_wr=recv_depth,
                                    max_send_sge=1, max_recv_sge=1))
        self.ptr = _checked(lib().ibv_create_qp(pd.ptr, ctypes.byref(init)), "ibv_create_qp")
        self.qpn = _QpHead.from_address(self.ptr).qp_num
        try:
            self._modify(QpAttr(qp_state=QPS_INIT, pkey_index=pkey_index, port_num=port, qkey=qkey),
                         QP_STATE | QP_PKEY_INDEX | QP_PORT | QP_QKEY, "INIT")
            self._modify(QpAttr(qp_state=QPS_RTR), QP_STATE, "RTR")
            self._modify(QpAttr(qp_state=QPS_RTS, sq_psn=0), QP_STATE | QP_SQ_PSN, "RTS")
        except VerbsCallError:
            self.close()
            raise

    def _modify(self, attr: QpAttr, mask: int, state: str) -> None:
        _rc(lib().ibv_modify_qp(self.ptr, ctypes.byref(attr), mask), f"ibv_modify_qp(UD QP to {state})")

    def to_error(self) -> None:
        """Move the QP to the error state: every posted WR completes with WR_FLUSH_ERR."""
        self._modify(QpAttr(qp_state=QPS_ERR), QP_STATE, "ERR")

    def post_send_at(self, addr: int) -> tuple[int, int]:
        """Post the linked list of send WRs at address `addr`: (0, 0), or (errno, address of the first WR
        not posted; those before it were)."""
        bad = c_void_p()
        rc = self.ctx.post_send_raw(self.ptr, addr, ctypes.byref(bad))
        if rc:
            return (rc if rc > 0 else ctypes.get_errno() or errno_mod.EIO), bad.value or addr
        return 0, 0

    def post_recv_at(self, addr: int) -> None:
        """Post the linked list of receive WRs at address `addr` (VerbsCallError if refused)."""
        bad = c_void_p()
        _rc(self.ctx.post_recv_raw(self.ptr, addr, ctypes.byref(bad)), "ibv_post_recv")

    def attach_mcast(self, mgid: bytes, mlid: int) -> None:
        """ibv_attach_mcast."""
        gid = Gid(raw=(c_uint8 * 16)(*mgid))
        _rc(lib().ibv_attach_mcast(self.ptr, ctypes.byref(gid), mlid), "ibv_attach_mcast")

    def detach_mcast(self, mgid: bytes, mlid: int) -> None:
        """ibv_detach_mcast."""
        gid = Gid(raw=(c_uint8 * 16)(*mgid))
        _rc(lib().ibv_detach_mcast(self.ptr, ctypes.byref(gid), mlid), "ibv_detach_mcast")

    def close(self) -> None:
        """Destroy the QP (posted receive buffers are flushed); VerbsCallError if the kernel refuses
        (EBUSY while it is attached to a multicast group)."""
        if self.ptr:
            _rc(lib().ibv_destroy_qp(self.ptr), "ibv_destroy_qp")
            self.ptr = None


class Ah:
    """An address handle."""

    def __init__(self, pd: Pd, attr: AhAttr) -> None:
        self.ptr = _checked(lib().ibv_create_ah(pd.ptr, ctypes.byref(attr)), "ibv_create_ah")

    def close(self) -> None:
        """Destroy the AH (no send may still use it)."""
        if self.ptr:
            lib().ibv_destroy_ah(self.ptr)
            self.ptr = None
