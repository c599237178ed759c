"""The bpf(2) system call by ctypes: map operations (single and batched), pinning, BPF_PROG_TEST_RUN,
map creation, program loading and object info (what an upgrade needs: docs/datapath.md, Upgrades).

bcc 0.26 has no test_run wrapper and its batch helpers want its own table objects; these work on
plain fds, so they serve bcc-loaded objects and pinned ones (opened with `obj_get`) alike.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

from xdpoib.errors import XdpoibError

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long
NR_BPF = 321  # x86_64

MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_TEST_RUN = 10
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH = 24
MAP_UPDATE_BATCH = 26
MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_XDP = 6
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


class BpfSyscallError(XdpoibError, OSError):
    """A bpf(2) command failed; `errno` says why."""

    def __init__(self, what: str, err: int):
        OSError.__init__(self, err, f"bpf {what}: {os.strerror(err)}")
        self.what = what


class _Attr(ct.Union):
    _fields_ = [("raw", ct.c_uint8 * 128)]


def bpf(cmd: int, attr: ct.Structure, what: str) -> int:
    """Issue one bpf(2) command; return its result or raise BpfSyscallError."""
    r = _libc.syscall(NR_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if r < 0:
        raise BpfSyscallError(what, ct.get_errno())
    return r


class MapElemAttr(ct.Structure):
    """bpf_attr for the MAP_*_ELEM commands."""

    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class MapBatchAttr(ct.Structure):
    """bpf_attr.batch."""

    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class ObjAttr(ct.Structure):
    """bpf_attr for OBJ_PIN / OBJ_GET."""

    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32),
                ("path_fd", ct.c_int32), ("pad", ct.c_uint32)]


class TestRunAttr(ct.Structure):
    """bpf_attr.test."""

    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32), ("data_size_in", ct.c_uint32),
                ("data_size_out", ct.c_uint32), ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32), ("ctx_size_in", ct.c_uint32),
                ("ctx_size_out", ct.c_uint32), ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
                ("pad", ct.c_uint32)]


class ProgLoadAttr(ct.Structure):
    """The first fields of bpf_attr for PROG_LOAD (enough to load a relocated program)."""

    _fields_ = [("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32), ("insns", ct.c_uint64),
                ("license", ct.c_uint64), ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
                ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32), ("prog_flags", ct.c_uint32),
                ("prog_name", ct.c_char * 16), ("prog_ifindex", ct.c_uint32),
                ("expected_attach_type", ct.c_uint32), ("pad", ct.c_uint8 * 64)]


class MapCreateAttr(ct.Structure):
    """The first fields of bpf_attr for MAP_CREATE."""

    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16), ("pad", ct.c_uint8 * 64)]


class GetIdAttr(ct.Structure):
    """bpf_attr for PROG_GET_FD_BY_ID / MAP_GET_FD_BY_ID."""

    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32), ("pad", ct.c_uint32)]


class InfoAttr(ct.Structure):
    """bpf_attr.info for OBJ_GET_INFO_BY_FD."""

    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class ProgInfo(ct.Structure):
    """The first fields of struct bpf_prog_info."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
                ("map_ids", ct.c_uint64), ("name", ct.c_char * 16)]


class MapInfo(ct.Structure):
    """The first fields of struct bpf_map_info."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]

    def layout(self) -> tuple[int, int, int, int, int]:
        """What must be equal for a program built for one map to use another: type, sizes, flags."""
        return (self.type, self.key_size, self.value_size, self.max_entries, self.map_flags)


def _addr(buf) -> int:
    return ct.addressof(buf) if buf is not None else 0


def map_lookup(fd: int, key, value) -> bool:
    """Look key up into value (ctypes objects); return False if absent."""
    a = MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value))
    try:
        bpf(MAP_LOOKUP_ELEM, a, "map lookup")
    except BpfSyscallError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    """Insert or replace one element."""
    bpf(MAP_UPDATE_ELEM, MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags),
        "map update")


def map_delete(fd: int, key) -> bool:
    """Delete one element; return False if it was absent."""
    try:
        bpf(MAP_DELETE_ELEM, MapElemAttr(map_fd=fd, key=_addr(key)), "map delete")
    except BpfSyscallError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_next_key(fd: int, key, next_key) -> bool:
    """Fill next_key with the key after key (None: the first); False at the end."""
    a = MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(next_key))
    try:
        bpf(MAP_GET_NEXT_KEY, a, "map next key")
    except BpfSyscallError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update_batch(fd: int, keys, values, count: int) -> None:
    """Insert or replace count elements from ctypes arrays in one call (BPF_MAP_UPDATE_BATCH)."""
    a = MapBatchAttr(keys=_addr(keys), values=_addr(values), count=count, map_fd=fd)
    bpf(MAP_UPDATE_BATCH, a, "map update batch")
    if a.count != count:
        raise BpfSyscallError("map update batch (partial)", errno.EIO)


def map_lookup_batch(fd: int, key_size: int, value_size: int, max_entries: int) -> tuple[bytes, bytes, int]:
    """Read a whole map with BPF_MAP_LOOKUP_BATCH; return (keys, values, count) as packed bytes."""
    keys = ct.create_string_buffer(key_size * max_entries)
    vals = ct.create_string_buffer(value_size * max_entries)
    cursor_in, cursor_out = ct.c_uint64(), ct.c_uint64()
    total, first = 0, True
    while total < max_entries:
        a = MapBatchAttr(in_batch=0 if first else ct.addressof(cursor_in), out_batch=ct.addressof(cursor_out),
                         keys=ct.addressof(keys) + total * key_size, values=ct.addressof(vals) + total * value_size,
                         count=max_entries - total, map_fd=fd)
        try:
            bpf(MAP_LOOKUP_BATCH, a, "map lookup batch")
        except BpfSyscallError as e:
            if e.errno != errno.ENOENT:
                raise
            total += a.count
            break
        total += a.count
        cursor_in.value, first = cursor_out.value, False
    return keys.raw[: total * key_size], vals.raw[: total * value_size], total


def map_delete_batch(fd: int, keys, count: int) -> int:
    """Delete count keys from a ctypes array in one call; return how many were deleted."""
    a = MapBatchAttr(keys=_addr(keys), count=count, map_fd=fd)
    try:
        bpf(MAP_DELETE_BATCH, a, "map delete batch")
    except BpfSyscallError as e:
        if e.errno != errno.ENOENT:
            raise
    return a.count


def obj_pin(fd: int, path: str) -> None:
    """Pin a map or program fd at a bpffs path."""
    p = ct.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, ObjAttr(pathname=ct.addressof(p), bpf_fd=fd), f"pin {path}")


def obj_get(path: str) -> int:
    """Open a pinned map or program; return a new fd (the caller closes it)."""
    p = ct.create_string_buffer(os.fsencode(path))
    return bpf(OBJ_GET, ObjAttr(pathname=ct.addressof(p)), f"open pinned {path}")


def prog_load_log(prog_type: int, insns: bytes, name: str = "probe") -> tuple[int, str]:
    """Load relocated instructions with a verbose verifier log (diagnostics); return (fd or -errno, log)."""
    buf = ct.create_string_buffer(1 << 24)
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(b"GPL")
    a = ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ct.addressof(code),
                     license=ct.addressof(lic), log_level=1, log_size=len(buf), log_buf=ct.addressof(buf),
                     prog_name=name.encode()[:15])
    r = _libc.syscall(NR_BPF, PROG_LOAD, ct.byref(a), ct.sizeof(a))
    return (r if r >= 0 else -ct.get_errno()), buf.value.decode(errors="replace")


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "",
               flags: int = 0) -> int:
    """Create a map; return its fd (the caller closes it)."""
    a = MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                      map_flags=flags, map_name=name.encode()[:15])
    return bpf(MAP_CREATE, a, f"map create {name}")


def prog_load(prog_type: int, insns: bytes, name: str) -> int:
    """Load relocated instructions (GPL); return the program's fd. A refusal raises BpfSyscallError
    whose message ends with the verifier's last line (the program is loaded again with a log for it)."""
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(b"GPL")
    a = ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ct.addressof(code),
                     license=ct.addressof(lic), prog_name=name.encode()[:15])
    r = _libc.syscall(NR_BPF, PROG_LOAD, ct.byref(a), ct.sizeof(a))
    if r >= 0:
        return r
    err = ct.get_errno()
    _fd, text = prog_load_log(prog_type, insns, name)
    last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "no verifier log")
    raise BpfSyscallError(f"prog load {name} ({last})", err)


def prog_fd_by_id(prog_id: int) -> int:
    """Open a loaded program by its id; return a new fd."""
    return bpf(PROG_GET_FD_BY_ID, GetIdAttr(id=prog_id), f"open program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    """Open a map by its id; return a new fd."""
    return bpf(MAP_GET_FD_BY_ID, GetIdAttr(id=map_id), f"open map id {map_id}")


def prog_info(fd: int) -> tuple[ProgInfo, list[int]]:
    """A program's info (id, kernel tag, name) and the ids of the maps it uses."""
    info = ProgInfo()
    bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)), "prog info")
    n = info.nr_map_ids
    ids = (ct.c_uint32 * max(n, 1))()
    again = ProgInfo(nr_map_ids=n, map_ids=ct.addressof(ids))
    bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ct.sizeof(again), info=ct.addressof(again)), "prog info")
    return info, list(ids[:min(n, again.nr_map_ids)])


def map_info(fd: int) -> MapInfo:
    """A map's info: type, id, key and value sizes, max entries, flags, name."""
    info = MapInfo()
    bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)), "map info")
    return info
