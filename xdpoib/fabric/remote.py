"""Objects living in a child process, used from this one: the one mechanism for every child that must
be a simulated host.

umad2sim binds a process to one ibsim node when it starts, so a test, a tool or a demo that wants to be
several hosts starts one child per host with that host's environment (`SimFabric.client_env(host)`) and
talks to it through this module. Two kinds of child use it: a sim backend (`simud_remote.RemoteBackend`)
and an SA client (`sa_remote.RemoteSAClient`).

The child (`serve_child`) opens its root object and answers requests one at a time: read an attribute
of an object it handed out, call a method on it, or hand over its file descriptor. Results and errors
are pickled: objects of the types the child proxies (QPs, pools, the event queue, ...) come back as
`Proxy`s with the same methods, everything else (records, completions, errors) as copies, memoryviews
as bytes. `Proxy.fileno()` hands over a duplicate of the child's descriptor (SCM_RIGHTS), so `select()`
works here. Errors are raised here with their own class.

The parent (`Channel`) starts the child, exchanges messages and ends it: closing the socket lets the
child close its root object and exit normally, which frees its ibsim slot (a killed client keeps it).

Protocol: a unix stream socketpair whose child end the child inherits (never bound to a name, so only
our own children speak it); each message a 4-byte length and a pickle.
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
from xdpoib.fabric.base import FabricError

_LEN = struct.Struct("!I")
_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        if isinstance(obj, self.server.proxied):
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
    """The child's end: a table of the objects handed out (the root is 0), and one request at a time."""

    def __init__(self, sock: socket.socket, proxied: tuple[type, ...]):
        self.sock = sock
        self.proxied = proxied
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
                    self.reply(("callable", None) if callable(target) and not isinstance(target, self.proxied)
                               else ("ok", target))
                elif op == "fd":
                    fd = target()
                    self.reply(("fd", None))
                    socket.send_fds(self.sock, [b"F"], [fd])
                else:
                    self.reply(("ok", target(*args, **kwargs)))
            except Exception as exc:
                self.reply(("err", exc))


def serve_child(fd: int, opener, proxied: tuple[type, ...]) -> int:
    """A child's main: `opener()` makes the root object (an XdpoibError goes back to the parent, exit 1),
    then requests are answered until the parent closes its end; the root's `close()` runs last.
    Results of the `proxied` types go back as proxies (the root's own type should be among them)."""
    sock = socket.socket(fileno=fd)
    server = _Server(sock, proxied)
    try:
        root = opener()
    except XdpoibError as exc:
        server.reply(("err", exc))
        return 1
    server.register(root)
    server.reply(("ok", os.getpid()))
    try:
        server.serve()
    finally:
        root.close()
    return 0


# ---------------------------------------------------------------- parent side

class Proxy:
    """An object living in the child: attribute reads and method calls go there."""

    def __init__(self, channel: Channel, oid: int):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_oid", oid)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._channel.get(self._oid, name)

    def call(self, dotted: str, *args, **kwargs):
        """Call a method reached through attributes in the child (e.g. `control.sa.join`)."""
        return self._channel.request("call", self._oid, dotted, args, kwargs)

    def fileno(self) -> int:
        """A local duplicate of the child object's descriptor (cached)."""
        return self._channel.fd(self._oid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<remote object {self._oid} of child {self._channel.pid}>"


class _ParentPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("ref", obj._oid) if isinstance(obj, Proxy) else None


class _ParentUnpickler(pickle.Unpickler):
    def __init__(self, file, channel):
        super().__init__(file)
        self.channel = channel

    def persistent_load(self, pid):
        return self.channel.proxy(pid[1])


class Channel:
    """A child process serving one root object (`serve_child`), and the way to talk to it.

    `python -m MODULE FD *ARGS` is started with `env` added to ours (and this checkout on PYTHONPATH),
    in `cwd`, by `spawn` (Popen or a wrapper with its signature, e.g. `SimFabric.spawn` bound to a host,
    which records the child for `down()`); MODULE's main calls `serve_child(FD, ...)`. A child that does
    not answer within `timeout` seconds, or that exited, raises `lost` (naming it as `what`); after a
    timeout the channel is out of step and refuses further requests.
    """

    def __init__(self, module: str, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 timeout: float = 30.0, spawn=subprocess.Popen, python: str | None = None,
                 lost: type[XdpoibError] = FabricError, what: str = "child"):
        self.timeout, self.lost, self.what = timeout, lost, what
        self.proc, self.pid = None, None
        self._refused: str | None = None        # why requests are refused now: closed, out of step
        self._proxies: dict[int, Proxy] = {}
        self._fds: dict[int, int] = {}
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        full = dict(os.environ)
        full.update(env or {})
        full["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT_DIR, full.get("PYTHONPATH")) if p)
        try:
            self.proc = spawn([python or sys.executable, "-m", module, str(child.fileno()), *args], env=full,
                              cwd=cwd, pass_fds=[child.fileno()])
        except BaseException:
            self.sock.close()
            raise
        finally:
            child.close()
        self.pid = self.proc.pid
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def set_root(self, proxy: Proxy) -> None:
        """Make `proxy` the object that stands for the child's root (id 0) when it comes back here."""
        self._proxies[0] = proxy

    def proxy(self, oid: int) -> Proxy:
        """The local stand-in of the child's object `oid` (one per object)."""
        p = self._proxies.get(oid)
        if p is None:
            p = self._proxies[oid] = Proxy(self, oid)
        return p

    def _read(self):
        ready, _, _ = select.select([self.sock], [], [], self.timeout)
        if not ready:
            self._refused = "out of step (it did not answer a request in time)"
            raise self.lost(f"{self.what} {self.pid} did not answer in {self.timeout:.0f} s")
        try:
            raw = _recv(self.sock)
        except (EOFError, OSError):
            raise self.lost(f"{self.what} {self.pid} exited (status {self.proc.poll()})") from None
        kind, value = _ParentUnpickler(io.BytesIO(raw), self).load()
        if kind == "err":
            raise value
        return kind, value

    def _exchange(self, op: str, oid: int, name: str, args=(), kwargs=None):
        if self._refused:
            raise self.lost(f"{self.what} {self.pid} is {self._refused}")
        buf = io.BytesIO()
        _ParentPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((op, oid, name, tuple(args), kwargs or {}))
        try:
            _send(self.sock, buf.getvalue())
        except OSError:
            raise self.lost(f"{self.what} {self.pid} exited (status {self.proc.poll()})") from None
        kind, value = self._read()
        if kind == "fd":
            _msg, fds, _flags, _addr = socket.recv_fds(self.sock, 1, 1)
            return kind, fds[0]
        return kind, value

    def request(self, op: str, oid: int, name: str, args=(), kwargs=None):
        """One request ("call" or "get" `name` of object `oid`); its result, or its error raised here."""
        return self._exchange(op, oid, name, args, kwargs)[1]

    def get(self, oid: int, name: str):
        """Attribute `name` of object `oid`: a value, a proxy, or a function calling the method there."""
        kind, value = self._exchange("get", oid, name)
        if kind == "callable":
            return lambda *args, **kwargs: self.request("call", oid, name, args, kwargs)
        return value

    def fd(self, oid: int) -> int:
        """A local duplicate of object `oid`'s descriptor (`fileno()` there), cached."""
        fd = self._fds.get(oid)
        if fd is None:
            fd = self._fds[oid] = self.request("fd", oid, "fileno")
        return fd

    def close(self) -> None:
        """Let the child close its root and exit (freeing its ibsim slot); kill it after 10 s. Idempotent."""
        if self._refused == "closed":
            return
        self._refused = "closed"
        if self.proc is not None:
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
