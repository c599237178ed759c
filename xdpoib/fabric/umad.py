"""ctypes over libibumad.so.3: open a port, register MAD agents, send and receive raw MADs.

The same code drives a real HCA (`/dev/infiniband/umad*`) and ibsim (a process started with
`LD_PRELOAD=libumad2sim.so`, see `xdpoib.fabric.simfabric`). Only byte buffers cross this module's
boundary: MAD layouts live in `xdpoib.fabric.sa_records`.

Facts measured under umad2sim (docs/design.md §4): `umad_send`'s timeout and retries are ignored, so callers keep
their own deadlines; `umad_get_port` is a snapshot taken when the process attached, so fresh port state
comes from a PortInfo SMP to ourselves (`xdpoib.fabric.sa_client.SAClient.port`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

from xdpoib.errors import XdpoibError

MAD_SIZE = 256
CA_NAME_LEN = 20

# Management classes and the versions we register for.
MGMT_CLASS_SA = 0x03
MGMT_CLASS_SMI_DR = 0x81


class UmadError(XdpoibError):
    """libibumad is missing, or opening a port or registering an agent failed."""


class _UmadPort(ctypes.Structure):
    """`umad_port_t` of rdma-core's umad.h (GUIDs and capmask in network order)."""

    _fields_ = [
        ("ca_name", ctypes.c_char * CA_NAME_LEN),
        ("portnum", ctypes.c_int),
        ("base_lid", ctypes.c_uint),
        ("lmc", ctypes.c_uint),
        ("sm_lid", ctypes.c_uint),
        ("sm_sl", ctypes.c_uint),
        ("state", ctypes.c_uint),
        ("phys_state", ctypes.c_uint),
        ("rate", ctypes.c_uint),
        ("capmask", ctypes.c_uint32),
        ("gid_prefix", ctypes.c_uint64),
        ("port_guid", ctypes.c_uint64),
        ("pkeys_size", ctypes.c_uint),
        ("pkeys", ctypes.POINTER(ctypes.c_uint16)),
        ("link_layer", ctypes.c_char * CA_NAME_LEN),
    ]


@dataclass(frozen=True)
class PortSnapshot:
    """What libibumad reports for a port (a snapshot under umad2sim: use it for identity only)."""

    ca_name: str
    portnum: int
    port_guid: int
    gid_prefix: int
    base_lid: int
    sm_lid: int
    state: int
    link_layer: str


def _be64(v: int) -> int:
    return int.from_bytes(v.to_bytes(8, "little"), "big")


_lib = None


def library():
    """Load libibumad.so.3 once (under umad2sim the preload intercepts its device access)."""
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("ibumad") or "libibumad.so.3"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise UmadError(f"cannot load libibumad ({name}): {e}; install libibumad3") from None
    vp, ip, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    sigs = {
        "umad_init": (ip, []),
        "umad_open_port": (ip, [cp, ip]),
        "umad_close_port": (ip, [ip]),
        "umad_get_port": (ip, [cp, ip, ctypes.POINTER(_UmadPort)]),
        "umad_release_port": (ip, [ctypes.POINTER(_UmadPort)]),
        "umad_register": (ip, [ip, ip, ip, ctypes.c_uint8, vp]),
        "umad_unregister": (ip, [ip, ip]),
        "umad_size": (ctypes.c_size_t, []),
        "umad_get_mad": (vp, [vp]),
        "umad_set_addr": (ip, [vp, ip, ip, ip, ip]),
        "umad_set_pkey": (ip, [vp, ip]),
        "umad_send": (ip, [ip, ip, vp, ip, ip, ip]),
        "umad_recv": (ip, [ip, vp, ctypes.POINTER(ctypes.c_int), ip]),
        "umad_status": (ip, [vp]),
        "umad_get_fd": (ip, [ip]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    if lib.umad_init() < 0:
        raise UmadError("umad_init failed")
    _lib = lib
    return lib


class UmadPort:
    """One open umad port with an SA agent and a directed-route SMI agent; `close()` is idempotent."""

    def __init__(self, device: str | None = None, port: int | None = None):
        self.lib = library()
        self._ca = device.encode() if device else None
        self._portnum = int(port or 0)
        fd = self.lib.umad_open_port(self._ca, self._portnum)
        if fd < 0:
            where = f"{device or 'default device'} port {port or 'default'}"
            raise UmadError(f"cannot open umad port ({where}): {os.strerror(-fd)}")
        self.portid = fd
        self.hdr = int(self.lib.umad_size())
        self.agents: dict[int, int] = {}
        try:
            self.agents[MGMT_CLASS_SA] = self._register(MGMT_CLASS_SA, 2)
            self.agents[MGMT_CLASS_SMI_DR] = self._register(MGMT_CLASS_SMI_DR, 1)
        except UmadError:
            self.close()
            raise
        self._sendbuf = ctypes.create_string_buffer(self.hdr + MAD_SIZE)
        self._recvbuf = ctypes.create_string_buffer(self.hdr + MAD_SIZE)

    def _register(self, mgmt_class: int, version: int) -> int:
        agent = self.lib.umad_register(self.portid, mgmt_class, version, 0, None)
        if agent < 0:
            raise UmadError(f"cannot register a MAD agent for class {mgmt_class:#x}: {os.strerror(-agent)}")
        return agent

    def snapshot(self) -> PortSnapshot:
        """Return libibumad's view of the port (identity: CA name, port number, port GUID)."""
        p = _UmadPort()
        rc = self.lib.umad_get_port(self._ca, self._portnum, ctypes.byref(p))
        if rc < 0:
            raise UmadError(f"umad_get_port failed: {os.strerror(-rc)}")
        try:
            return PortSnapshot(
                ca_name=p.ca_name.decode(errors="replace"),
                portnum=p.portnum,
                port_guid=_be64(p.port_guid),
                gid_prefix=_be64(p.gid_prefix),
                base_lid=p.base_lid,
                sm_lid=p.sm_lid,
                state=p.state,
                link_layer=p.link_layer.decode(errors="replace"),
            )
        finally:
            self.lib.umad_release_port(ctypes.byref(p))

    def send(self, mgmt_class: int, mad: bytes, dlid: int, dqp: int, qkey: int, sl: int = 0,
             pkey_index: int = 0, timeout_ms: int = 1000) -> None:
        """Send one MAD (at most 256 bytes) through the agent registered for `mgmt_class`.

        `timeout_ms` must be non-zero for a request: the kernel's MAD layer delivers a response only
        when it matches a send that waits for one (it then echoes a lost request back with status 110).
        umad2sim ignores it. Retries are the caller's: the kernel's are disabled.
        """
        if len(mad) > MAD_SIZE:
            raise UmadError(f"MAD of {len(mad)} bytes is larger than {MAD_SIZE}")
        buf = self._sendbuf
        ctypes.memset(buf, 0, self.hdr + MAD_SIZE)
        ctypes.memmove(ctypes.addressof(buf) + self.hdr, mad, len(mad))
        self.lib.umad_set_addr(buf, dlid, dqp, sl, qkey)
        self.lib.umad_set_pkey(buf, pkey_index)
        rc = self.lib.umad_send(self.portid, self.agents[mgmt_class], buf, MAD_SIZE, max(0, int(timeout_ms)), 0)
        if rc < 0:
            raise UmadError(f"umad_send failed: {os.strerror(-rc)}")

    def recv(self, timeout_ms: int) -> tuple[int, int, bytes] | None:
        """Wait up to `timeout_ms` for one MAD: (management class, umad status, MAD bytes), or None."""
        length = ctypes.c_int(MAD_SIZE)
        buf = self._recvbuf
        agent = self.lib.umad_recv(self.portid, buf, ctypes.byref(length), max(0, int(timeout_ms)))
        if agent < 0:
            if -agent in (errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR):
                return None
            raise UmadError(f"umad_recv failed: {os.strerror(-agent)}")
        status = self.lib.umad_status(buf)
        n = max(0, min(length.value, MAD_SIZE))
        mad = ctypes.string_at(ctypes.addressof(buf) + self.hdr, n)
        cls = next((c for c, a in self.agents.items() if a == agent), -1)
        return cls, status, mad

    def close(self) -> None:
        """Unregister agents and close the port (idempotent)."""
        if getattr(self, "portid", -1) < 0:
            return
        for agent in self.agents.values():
            self.lib.umad_unregister(self.portid, agent)
        self.agents = {}
        self.lib.umad_close_port(self.portid)
        self.portid = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
