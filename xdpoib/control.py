"""The agent's control socket: one JSON request per connection, one JSON answer.

A unix stream socket under /run/xdpoib/, mode 0600 (root only). Requests are `{"cmd": NAME, ...}`;
answers are `{"ok": true, ...}` or `{"ok": false, "error": "one line"}`. The server side is
non-blocking and driven from the agent's event loop; the client side is used by the CLI and the exporter.
An answer may carry descriptors (SCM_RIGHTS, `request_fds`): a restart hands the AF_XDP socket and its
UMEM to the agent that takes over (xdpoib/agent/handover.py). A socket file is removed on close only
while it is still this server's (a successor may have moved its own over the path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from xdpoib.errors import XdpoibError

MAX_REQUEST = 64 * 1024
log = logging.getLogger("xdpoib.control")


class ControlError(XdpoibError):
    """The agent could not be reached, or it answered with an error."""


class ControlServer:
    """Accepts connections and answers them with `handler(request) -> dict` (from the event loop)."""

    def __init__(self, path: Path, handler: Callable[[dict], dict]):
        self.path = Path(path)
        self.handler = handler
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle(self) -> None:
        """Answer every pending connection (called when the socket is readable)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    req = json.loads(_read_line(conn))
                    if not isinstance(req, dict):
                        raise ValueError("request is not an object")
                    fds: list[int] = []
                    try:
                        answer = {"ok": True, **self.handler(req)}
                        fds = answer.pop("_fds", [])
                    except XdpoibError as e:
                        answer = {"ok": False, "error": str(e)}
                    except Exception as e:  # a bug answering must not take the agent down
                        log.exception("control request %r failed", req)
                        answer = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
                    data = json.dumps(answer, default=str).encode() + b"\n"
                    if fds:
                        sent = socket.send_fds(conn, [data], fds)
                        data = data[sent:]
                    conn.sendall(data)
                except (OSError, ValueError) as e:
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps({"ok": False, "error": f"bad request: {e}"}).encode() + b"\n")

    def move_to(self, path: Path) -> None:
        """Take over `path` atomically (rename): clients that connect from now on reach this server."""
        os.replace(self.path, path)
        self.path = Path(path)

    def owns_path(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours (idempotent)."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self.owns_path():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return buf


def request(path: Path, cmd: str, timeout: float = 5.0, **args) -> dict:
    """Send one request to an agent and return its answer (ControlError if unreachable or refused)."""
    answer, fds = request_fds(path, cmd, timeout, **args)
    for fd in fds:
        os.close(fd)
    return answer


def request_fds(path: Path, cmd: str, timeout: float = 5.0, **args) -> tuple[dict, list[int]]:
    """`request`, also returning the descriptors the answer carried (the caller closes them)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    fds: list[int] = []
    try:
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        first, fds, _flags, _addr = socket.recv_fds(s, 4096, 8)
        raw = first if first.endswith(b"\n") or not first else first + _read_line(s)
    except (OSError, ValueError) as e:
        for fd in fds:
            os.close(fd)
        raise ControlError(f"agent at {path} does not answer: {e}") from None
    finally:
        s.close()
    try:
        return _parse(path, raw), fds
    except ControlError:
        for fd in fds:
            os.close(fd)
        raise


def _parse(path: Path, raw: bytes) -> dict:
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ControlError(f"agent at {path} sent a malformed answer") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "agent refused the request"))
    return answer
