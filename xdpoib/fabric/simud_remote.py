"""Run a sim backend in a child process that is one simulated host, and drive it from here.

umad2sim binds a process to one ibsim node when it starts, so a test (or a demo) that wants several
hosts starts one child per host with that host's environment (`SimFabric.client_env(host)`) and talks
to it through `RemoteBackend`, which has the `Backend` methods. Objects the child returns (QPs, pools,
address handles, the event queue, the SA control) come back as proxies with the same methods; data
(ports, paths, completions, records, errors) comes back as copies, memoryviews as bytes. `fileno()`
hands over a duplicate of the child's descriptor (SCM_RIGHTS), so `select()` works here.

Protocol: a unix stream socketpair, each message a 4-byte length and a pickle. Only our own children
speak it (the socket is inherited, never bound to a name).
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import select
import socket
import struct
import subprocess
import sys

from xdpoib.errors import XdpoibError
from xdpoib.fabric.base import AddressHandle, Backend, BufferPool, EventQueue, FabricError, UdQp

_LEN = struct.Struct("!I")


def _remote_types():
    from xdpoib.fabric.simud import SAControl, StaticControl

    return (Backend, UdQp, AddressHandle, EventQueue, BufferPool, SAControl, StaticControl)


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("peer closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return _recv_exact(sock, n)


# ---------------------------------------------------------------- child side

class _ChildPickler(pickle.Pickler):
    def __init__(self, file, server):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.server = server

    def persistent_id(self, obj):
        if isinstance(obj, self.server.types):
            return ("obj", self.server.register(obj))
        return None

    def reducer_override(self, obj):
        if isinstance(obj, memoryview):
            return bytes, (obj.tobytes(),)
        return NotImplemented


class _ChildUnpickler(pickle.Unpickler):
    def __init__(self, file, server):
        super().__init__(file)
        self.server = server

    def persistent_load(self, pid):
        return self.server.objects[pid[1]]


class _Server:
    """The child's end: a table of objects, and one request at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.types = _remote_types()
        self.objects: dict[int, object] = {}
        self.ids: dict[int, int] = {}

    def register(self, obj) -> int:
        oid = self.ids.get(id(obj))
        if oid is None:
            oid = len(self.objects)
            self.objects[oid] = obj
            self.ids[id(obj)] = oid
        return oid

    def reply(self, msg) -> None:
        buf = io.BytesIO()
        try:
            _ChildPickler(buf, self).dump(msg)
        except Exception as exc:            # an unpicklable result or error: say what it was
            buf = io.BytesIO()
            _ChildPickler(buf, self).dump(("err", FabricError(f"{type(exc).__name__}: {exc}")))
        _send(self.sock, buf.getvalue())

    def serve(self) -> None:
        while True:
            try:
                raw = _recv(self.sock)
            except EOFError:
                return
            op, oid, name, args, kwargs = _ChildUnpickler(io.BytesIO(raw), self).load()
            try:
                target = functools.reduce(getattr, name.split("."), self.objects[oid]) if name else \
                    self.objects[oid]
                if op == "get":
                    self.reply(("callable", None) if callable(target) and not isinstance(target, self.types)
                               else ("ok", target))
                elif op == "fd":
                    fd = target()
                    self.reply(("fd", None))
                    socket.send_fds(self.sock, [b"F"], [fd])
                else:
                    self.reply(("ok", target(*args, **kwargs)))
            except Exception as exc:
                self.reply(("err", exc))


def serve_child(fd: int, fabric: str, poll_interval: float) -> int:
    """Child main: open the sim backend of `fabric` for this process's port, then answer requests."""
    from xdpoib.fabric.simud import SimUdBackend

    sock = socket.socket(fileno=fd)
    server = _Server(sock)
    try:
        backend = SimUdBackend.open(fabric, poll_interval=poll_interval)
    except XdpoibError as exc:
        server.reply(("err", exc))
        return 1
    server.register(backend)
    server.reply(("ok", os.getpid()))
    try:
        server.serve()
    finally:
        backend.close()
    return 0


# ---------------------------------------------------------------- parent side

class Proxy:
    """An object living in the child: attribute reads and method calls go there."""

    def __init__(self, remote: RemoteBackend, oid: int):
        object.__setattr__(self, "_remote", remote)
        object.__setattr__(self, "_oid", oid)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._remote._get(self._oid, name)

    def call(self, dotted: str, *args, **kwargs):
        """Call a method reached through attributes in the child (e.g. `control.sa.join`)."""
        return self._remote._request("call", self._oid, dotted, args, kwargs)

    def fileno(self) -> int:
        """A local duplicate of the child object's descriptor (cached)."""
        return self._remote._fd(self._oid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<remote object {self._oid} of child {self._remote.pid}>"


class _ParentPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("ref", obj._oid) if isinstance(obj, Proxy) else None


class _ParentUnpickler(pickle.Unpickler):
    def __init__(self, file, remote):
        super().__init__(file)
        self.remote = remote

    def persistent_load(self, pid):
        return self.remote._proxy(pid[1])


class RemoteBackend(Proxy):
    """A `SimUdBackend` in a child process started with one simulated host's environment."""

    def __init__(self, fabric: str, env: dict[str, str] | None = None, cwd: str | None = None,
                 poll_interval: float = 0.1, timeout: float = 30.0, spawn=subprocess.Popen):
        """Start the child with `env` added to ours, in `cwd`; `spawn` is Popen or a wrapper with its
        signature (e.g. `SimFabric.spawn` bound to a host, which records the child for `down()`)."""
        Proxy.__init__(self, self, 0)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        full = dict(os.environ)
        full.update(env or {})
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        full["PYTHONPATH"] = os.pathsep.join(p for p in (root, full.get("PYTHONPATH")) if p)
        d = self.__dict__
        d["timeout"], d["sock"], d["_proxies"], d["_fds"] = timeout, parent, {}, {}
        d["_closed"], d["pid"] = False, None
        try:
            d["proc"] = spawn(
                [sys.executable, "-m", "xdpoib.fabric.simud_remote", str(child.fileno()), fabric,
                 str(poll_interval)], env=full, cwd=cwd, pass_fds=[child.fileno()])
        finally:
            child.close()
        d["pid"] = self.proc.pid
        try:
            self._read()
        except BaseException:
            self.close()
            raise
        self._proxies[0] = self

    @classmethod
    def on_host(cls, fab, host, **kw) -> RemoteBackend:
        """A backend running as `host` of a `SimFabric`, recorded by the fabric so `down()` ends it."""
        return cls(fab.name, fab.client_env(host), fab.client_cwd(host),
                   spawn=lambda argv, **popen: fab.spawn(host, argv, **popen), **kw)

    def _proxy(self, oid: int) -> Proxy:
        p = self._proxies.get(oid)
        if p is None:
            p = self._proxies[oid] = Proxy(self, oid)
        return p

    def _read(self):
        ready, _, _ = select.select([self.sock], [], [], self.timeout)
        if not ready:
            raise FabricError(f"sim backend child {self.pid} did not answer in {self.timeout:.0f} s")
        try:
            raw = _recv(self.sock)
        except (EOFError, OSError):
            raise FabricError(f"sim backend child {self.pid} exited (status {self.proc.poll()})") from None
        kind, value = _ParentUnpickler(io.BytesIO(raw), self).load()
        if kind == "err":
            raise value
        return kind, value

    def _exchange(self, op: str, oid: int, name: str, args=(), kwargs=None):
        if self._closed:
            raise FabricError("remote sim backend is closed")
        buf = io.BytesIO()
        _ParentPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((op, oid, name, tuple(args), kwargs or {}))
        _send(self.sock, buf.getvalue())
        kind, value = self._read()
        if kind == "fd":
            _msg, fds, _flags, _addr = socket.recv_fds(self.sock, 1, 1)
            return kind, fds[0]
        return kind, value

    def _request(self, op: str, oid: int, name: str, args=(), kwargs=None):
        return self._exchange(op, oid, name, args, kwargs)[1]

    def _get(self, oid: int, name: str):
        kind, value = self._exchange("get", oid, name)
        if kind == "callable":
            return lambda *args, **kwargs: self._request("call", oid, name, args, kwargs)
        return value

    def _fd(self, oid: int) -> int:
        fd = self._fds.get(oid)
        if fd is None:
            fd = self._fds[oid] = self._request("fd", oid, "fileno")
        return fd

    def close(self) -> None:
        """Close the backend in the child and let the child exit (freeing its ibsim slot); idempotent."""
        d = self.__dict__
        if d.get("_done"):
            return
        d["_done"] = d["_closed"] = True
        if "proc" in d:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


if __name__ == "__main__":
    sys.exit(serve_child(int(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
