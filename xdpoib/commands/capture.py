"""`xdpoib capture`: an attachment's fabric-side frames, both directions, as a LINKTYPE_IPOIB pcap.

The agent records each datagram where it sends or receives it (xdpoib/capture.py describes the
pseudo-header forms and the protocol). Here: a unix stream socket in a private directory under the
runtime directory, the `capture` request to the agent, then a copy of the stream to the file or to
stdout, cut at record boundaries (only whole records are written, so the file is always readable).
SIGINT or SIGTERM ends it cleanly: the agent is told to stop, what it sent is drained and written,
and the counts go to stderr, as tcpdump prints them. So does a reader that goes away (`-w - | head`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time

from xdpoib import control, state
from xdpoib.capture import DIRECTIONS
from xdpoib.errors import UsageError, XdpoibError
from xdpoib.wire.pcap import LINKTYPE_IPOIB

NAME = "capture"
HELP = "record an attachment's fabric-side frames as a pcap file or stream (LINKTYPE_IPOIB)"
ROOT = "the agents' control sockets are root-only"
EPILOG = """examples:
  xdpoib capture eth4 -w eth4.pcap                  until Ctrl-C
  xdpoib capture eth4 --netns blue -w - | tshark -r -
  xdpoib capture eth4 -c 20 --direction in -w in.pcap
  wireshark -k -i <(xdpoib capture eth4 -w -)       live in Wireshark
"""

CONNECT_TIMEOUT = 5.0           # the agent connects while it answers the request: this is generous
DRAIN_TIMEOUT = 5.0             # after asking the agent to stop: what it still sends
_PCAP_MAGIC = 0xA1B2C3D4


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return n


def configure(p):
    p.add_argument("ifname", metavar="IFNAME")
    p.add_argument("--netns", metavar="NS", help="network namespace of IFNAME")
    p.add_argument("-w", dest="write", metavar="FILE", required=True,
                   help="write the pcap to FILE (mode 0600), or to stdout with -")
    p.add_argument("-c", dest="count", metavar="N", type=_count, help="stop after N frames")
    p.add_argument("--direction", choices=DIRECTIONS, default="both",
                   help="in: received from the fabric, out: sent to it, both (default)")


class RecordSplitter:
    """Cuts a pcap byte stream at record boundaries: `feed` returns the bytes of the global header and
    of every whole record received so far; a record the stream ends inside is never returned."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header = False
        self.records = 0

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        o = 0
        if not self._header:
            if len(buf) < 24:
                return b""
            if int.from_bytes(buf[:4], "little") != _PCAP_MAGIC or int.from_bytes(buf[20:24], "little") \
                    != LINKTYPE_IPOIB:
                raise XdpoibError("the agent's capture stream is not a LINKTYPE_IPOIB pcap")
            self._header, o = True, 24
        while len(buf) - o >= 16:
            incl = int.from_bytes(buf[o + 8:o + 12], "little")
            if len(buf) - o - 16 < incl:
                break
            o += 16 + incl
            self.records += 1
        out = bytes(buf[:o])
        del buf[:o]
        return out


def _open_output(name: str) -> int:
    if name == "-":
        if os.isatty(1):
            raise UsageError("refusing to write a pcap to a terminal: redirect stdout, or use -w FILE")
        return 1
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UsageError(f"cannot write {name}: {e.strerror}") from None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run(args) -> int:
    spec = state.find(args.ifname, args.netns)
    if not state.pid_alive(spec.pid):
        raise control.ControlError(f"the agent of {spec.where} (pid {spec.pid}) is not running; "
                                   f"`xdpoib detach {spec.ifname}` cleans up")
    ctl = state.socket_path(spec.id)
    out = _open_output(args.write)
    with contextlib.ExitStack() as stack:
        if out != 1:
            stack.callback(os.close, out)
        conn, stop = _connect(stack, ctl, args)
        print(f"xdpoib capture: {spec.where}, fabric side ({args.direction}), link-type IPOIB "
              f"({LINKTYPE_IPOIB})", file=sys.stderr, flush=True)
        split, why = _copy(stack, conn, out, stop)
        conn.close()
        summary = stop()
    n = split.records
    line = f"{n} packet{'s' if n != 1 else ''} captured"
    if summary and summary.get("dropped"):
        line += f", {summary['dropped']} dropped by the agent (the capture socket was full)"
    if why:
        line += f" ({why})"
    print(line, file=sys.stderr)
    return 0


def _connect(stack: contextlib.ExitStack, ctl, args):
    """Listen in a private directory, ask the agent to capture, take its connection. Returns it and
    `stop()`, which asks the agent to stop (once; later calls return the same summary)."""
    d = tempfile.mkdtemp(prefix="capture-", dir=state.run_dir())
    try:
        path = os.path.join(d, "pcap.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
            lst.bind(path)
            os.chmod(path, 0o600)
            lst.listen(1)
            control.request(ctl, "capture", socket=path, count=args.count, direction=args.direction)
            stop = _stopper(ctl, path)
            stack.callback(stop)                            # whatever happens next, the agent stops
            lst.settimeout(CONNECT_TIMEOUT)
            try:
                conn, _ = lst.accept()
            except TimeoutError:
                raise XdpoibError(f"the agent did not connect to the capture socket in "
                                  f"{CONNECT_TIMEOUT:.0f} s") from None
    finally:
        shutil.rmtree(d, ignore_errors=True)
    conn.settimeout(None)
    stack.callback(conn.close)
    return conn, stop


def _copy(stack: contextlib.ExitStack, conn: socket.socket, out: int, stop):
    """Copy whole records until the agent ends the stream, a signal comes, or the reader goes away."""
    wake_r, wake_w = socket.socketpair()
    stack.callback(wake_r.close)
    stack.callback(wake_w.close)
    wake_w.setblocking(False)
    signalled: list[int] = []

    def on_signal(signum, frame):
        signalled.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def restore():
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
    stack.callback(restore)

    split = RecordSplitter()
    why, deadline = None, None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([conn, wake_r], [], [], timeout)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                wake_r.recv(64)
        if signalled and deadline is None:
            why = f"stopped by {signal.Signals(signalled[0]).name}"
            stop()                          # the agent ends the stream; drain what it sent before
            deadline = time.monotonic() + DRAIN_TIMEOUT
        if conn in ready:
            data = conn.recv(1 << 16)
            if not data:
                break
            try:
                _write_all(out, split.feed(data))
            except BrokenPipeError:
                why = "the reader of stdout went away" if out == 1 else "the output closed"
                break
            except OSError as e:
                raise XdpoibError(f"writing the capture: {e.strerror}") from None
        elif deadline is not None and time.monotonic() >= deadline:
            break
    return split, why


def _stopper(ctl, path: str):
    """stop(): ask the agent to stop the capture to `path` (or, if it ended already, for its summary);
    the agent is asked once, and its answer (None if it is unreachable) is returned every time."""
    answer: list = []

    def stop() -> dict | None:
        if not answer:
            try:
                answer.append(control.request(ctl, "capture", stop=True, socket=path).get("capture"))
            except control.ControlError:
                answer.append(None)
        return answer[0]
    return stop
