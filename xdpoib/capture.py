"""`xdpoib capture`: the fabric side of an attachment as a LINKTYPE_IPOIB pcap stream.

Where: the agent records each datagram where it meets the fabric, in the forwarder
(`xdpoib/agent/forward.py`): `Capture.sent` right before each `post_send_to` (one call per batch to
one destination), `Capture.received` right after each receive `poll`. While no capture runs,
`Agent.capture` is None and the whole cost is one None check per batch in each direction.

Records (docs/design.md §3.13): a 40-byte pseudo-header, then the IPoIB frame as it was on the wire.
Wireshark's IPoIB dissector reads two forms of the pseudo-header (it tells them apart by bytes 0-1):
- GRH form, bytes 0-1 non-zero: bytes 0-3 IP version 6, traffic class, flow label; bytes 5-7 the
  source QPN; bytes 8-23 the source GID; bytes 24-39 the destination GID. Written for every datagram
  that carried a GRH: multicast sends (our QPN and GID as the source, the MGID as the destination; the
  same for a GRH-routed unicast path) and receives whose completion says `has_grh` (class, flow and DGID
  from the GRH in the receive buffer).
- destination form, bytes 0-1 zero: bytes 20-39 the 20-byte destination address (flags, QPN, GID).
  Written for sends without a GRH (unicast inside the subnet, docs/design.md §3.11), with the peer's
  address as the agent knows it.
- A receive without a GRH has no form that shows its source (Wireshark has no source form), so it is
  written in the GRH form too, filled in by the agent: the source QPN from the completion; the source
  GID the agent knows for that (SLID, QPN), or the sender address of an ARP frame from a sender it does
  not know yet, else zero; our port GID as the destination; class and flow 0; and byte 4 set to
  `NO_GRH` (a real GRH's payload length, which Wireshark does not read; 0 in every other record).

Transport: `xdpoib capture` listens on a unix stream socket in a private directory under the runtime
directory (0700, root only) and sends the agent `{"cmd": "capture", "socket": PATH, "count": N,
"direction": "in"|"out"|"both"}` over its control socket. The agent connects to that path without
blocking and writes the pcap header, then the records, from its loop: it never blocks. When the
socket is full a record is dropped and counted (the stream stays whole: the unsent rest of a
record cut by a short write is kept and goes first); a capture stops when its reader goes away
(EOF or EPIPE), when `count` records are written, or on `{"cmd": "capture", "stop": true, "socket":
PATH}`, whose answer (like the start's) is the capture's summary. One capture at a time per agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Iterable, Sequence

from xdpoib.errors import XdpoibError
from xdpoib.fabric.base import gid_str
from xdpoib.wire.addr import IPoIBAddr
from xdpoib.wire.pcap import PSEUDO_HLEN, PcapWriter, dest_pseudo_header, grh_pseudo_header

log = logging.getLogger("xdpoib.agent")

DIRECTIONS = ("in", "out", "both")
NO_GRH = 0x01                   # byte 4 of a GRH-form pseudo-header the agent filled in (no GRH came)
SNDBUF = 4 << 20                # the capture socket's send buffer: a few full batches of 4 KiB frames
FLUSH_S = 0.05                  # while the unsent rest of a record waits: how often to try again
SO_SNDBUFFORCE = 32             # Linux; Python's socket module does not name it
_ZERO_GID = bytes(16)


class CaptureError(XdpoibError):
    """A capture cannot start or be found (bad request, a capture already running, unreachable reader)."""


# ================================================================ pseudo-headers (pure)

def sent_pseudo(path, dest: IPoIBAddr, own: IPoIBAddr) -> bytes:
    """The pseudo-header of a datagram we send to `dest` over `path` (a fabric.base.Path): the GRH form
    when the send carries a GRH (multicast, or a GRH-routed path), else the destination form."""
    if path is not None and path.grh:
        return grh_pseudo_header(own.gid, bytes(path.dgid), own.qpn, path.traffic_class, path.flow_label)
    return dest_pseudo_header(dest)


def received_pseudo(src_qpn: int, grh_area: bytes | memoryview | None, sgid: bytes | None,
                    own_gid: bytes) -> bytes:
    """The pseudo-header of a datagram we received from `src_qpn`.

    `grh_area` is the receive buffer's first 40 bytes when a GRH came (None otherwise) and `sgid` the
    source GID (the completion's with a GRH; without one, the GID the agent knows for the sender, or
    None). Without a GRH the GRH form is filled in and marked with `NO_GRH` in byte 4."""
    if grh_area is not None:
        g = bytes(grh_area[:40])
        if g[0] >> 4 == 6:
            word0 = int.from_bytes(g[:4], "big")
            tclass, flow, dgid = (word0 >> 20) & 0xFF, word0 & 0xFFFFF, g[24:40]
        else:                   # RoCEv2 over IPv4: the IPv4 header sits in bytes 20-39 of the area
            tclass, flow, dgid = 0, 0, b"\0" * 10 + b"\xff\xff" + g[36:40]
        return grh_pseudo_header(bytes(sgid) if sgid else _ZERO_GID, dgid, src_qpn, tclass, flow)
    h = bytearray(grh_pseudo_header(bytes(sgid) if sgid else _ZERO_GID, own_gid, src_qpn))
    h[4] = NO_GRH
    return bytes(h)


def arp_sender_gid(frame, src_qpn: int) -> bytes | None:
    """The sender's GID from an IB ARP frame whose sender address has `src_qpn` (how a first frame
    from a sender the agent does not know yet still gets its source), else None."""
    if len(frame) >= 32 and frame[0] == 0x08 and frame[1] in (0x06, 0x35) and frame[8] == 20 \
            and int.from_bytes(frame[13:16], "big") == src_qpn:
        return bytes(frame[16:32])
    return None


def pseudo_fields(pseudo: bytes) -> dict:
    """Decode a pseudo-header as Wireshark does (tests and tools): its form and addresses."""
    if len(pseudo) != PSEUDO_HLEN:
        raise ValueError("the pseudo-header is 40 bytes")
    if pseudo[:2] == b"\0\0":
        d = IPoIBAddr.unpack(pseudo[20:40])
        return {"form": "destination", "flags": d.flags, "dqpn": d.qpn, "dgid": gid_str(d.gid)}
    word0 = int.from_bytes(pseudo[:4], "big")
    return {"form": "grh", "grh": pseudo[4] != NO_GRH, "version": word0 >> 28, "tclass": (word0 >> 20) & 0xFF,
            "flow": word0 & 0xFFFFF, "sqpn": int.from_bytes(pseudo[5:8], "big"),
            "sgid": gid_str(pseudo[8:24]), "dgid": gid_str(pseudo[24:40])}


# ================================================================ the agent-side sink

class Capture:
    """One capture in progress in an agent: the forwarder calls `sent` and `received`; everything
    runs on the loop's thread. Use `Capture.start(agent, request)`; it ends itself (`stop`)."""

    def __init__(self, agent, sock: socket.socket, path: str, count: int | None, direction: str):
        self.a = agent
        self.sock = sock
        self.path = path
        self.count = count
        self.direction = direction
        self.outbound = direction in ("out", "both")
        self.inbound = direction in ("in", "both")
        self.records = 0                # written (whole, or begun and kept in `_rest`)
        self.dropped = 0                # the socket was full
        self.started = time.time()
        self.ended_at: float | None = None
        self.reason: str | None = None  # why it ended (None while running)
        self._rest = b""                # the unsent rest of the last record a short write cut
        self._flush_due = False
        self._parts: list[bytes] = []
        self._dests: dict[int, tuple[object, IPoIBAddr | None]] = {}   # id(ah) -> (ah, peer address)
        self._writer = PcapWriter(self)     # writes the global header into _parts: sent first
        self._send(self._take())
        if self.dropped:
            self.stop("its socket took nothing")
        if self.sock is not None:
            agent.loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def start(cls, agent, req: dict) -> Capture:
        """Validate a capture request, connect to its reader, and return the running capture."""
        path, count, direction = req.get("socket"), req.get("count"), req.get("direction") or "both"
        if not isinstance(path, str) or not os.path.isabs(path):
            raise CaptureError("a capture request needs the absolute path of the reader's socket")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise CaptureError(f"count must be a positive integer, not {count!r}")
        if direction not in DIRECTIONS:
            raise CaptureError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
        if agent.capture is not None:
            raise CaptureError(f"a capture of {agent.spec.where} is already running (to {agent.capture.path}); "
                               "one at a time")
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise CaptureError(f"{path} is not a socket")
        except OSError as e:
            raise CaptureError(f"cannot reach the capture socket {path}: {e.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise CaptureError(f"cannot connect to the capture socket {path}: {e.strerror}") from None
        cap = cls(agent, sock, path, count, direction)
        if cap.reason is not None:
            raise CaptureError(f"the capture socket {path} closed at once: {cap.reason}")
        log.info("capture to %s started (direction %s, count %s)", path, direction, count or "unlimited")
        return cap

    # ---------------------------------------------------------------- the forwarder's hooks

    def sent(self, ah, remote_qpn: int, frames: Sequence, qp=None) -> None:
        """A batch about to be posted to (ah, remote_qpn) from `qp` (default: the attachment's QP)."""
        if not self.outbound or self.sock is None:
            return
        a = self.a
        path = getattr(ah, "path", None)
        dest = None if path is not None and path.grh else self._dest(ah, remote_qpn)
        pseudo = sent_pseudo(path, dest, IPoIBAddr(0, (qp or a.qp).qpn, a.port_attrs.gid))
        self._emit((pseudo, fr) for fr in frames)

    def received(self, comps: Iterable, pool) -> None:
        """A poll's completions (errors and our own looped-back datagrams left out, as the forwarder does)."""
        if not self.inbound or self.sock is None:
            return
        a = self.a
        own_gid = a.port_attrs.gid
        lb = a.loopback
        own_qpns = lb.qpns
        by_lid = a.peers.by_lid
        out = []
        for c in comps:
            if c.status or (c.src_qp in own_qpns and lb.is_own(c)):
                continue
            if c.has_grh:
                pseudo = received_pseudo(c.src_qp, pool.view(c.index)[:40], c.sgid, own_gid)
            else:
                e = by_lid(c.slid, c.src_qp)
                sgid = e.addr.gid if e is not None else arp_sender_gid(c.payload, c.src_qp)
                pseudo = received_pseudo(c.src_qp, None, sgid, own_gid)
            out.append((pseudo, c.payload))
        if out:
            self._emit(out)

    def _dest(self, ah, qpn: int) -> IPoIBAddr:
        """The peer address behind a unicast AH (a path without GRH names no GID): looked up once."""
        hit = self._dests.get(id(ah))
        if hit is None or hit[0] is not ah:
            addr = next((e.addr for e in self.a.peers.entries.values() if e.ah is ah), None)
            hit = self._dests[id(ah)] = (ah, addr)
        addr = hit[1]
        if addr is None or addr.qpn != qpn:
            path = getattr(ah, "path", None)
            gid = bytes(path.dgid) if path is not None and path.dgid else _ZERO_GID
            return IPoIBAddr(0, qpn, gid)
        return addr

    # ---------------------------------------------------------------- the stream

    def write(self, data: bytes) -> None:
        """PcapWriter's sink: one call per record (and one for the global header)."""
        self._parts.append(data)

    def _take(self) -> list[bytes]:
        parts, self._parts = self._parts, []
        return parts

    def _emit(self, pairs: Iterable) -> None:
        if self.reason is not None or (self.count is not None and self.records >= self.count):
            return
        left = None if self.count is None else self.count - self.records
        ts = time.time()
        w = self._writer
        for pseudo, frame in pairs:
            if left is not None and len(self._parts) >= left:
                break
            w.write(pseudo, frame, ts)
        self.records += self._send(self._take())
        if self.count is not None and self.records >= self.count and not self._rest:
            self.stop(f"{self.count} records written")

    def _send(self, records: list[bytes]) -> int:
        """Send whole records without blocking; returns how many were written (the last one possibly
        in part: its rest is kept and goes first next time). The others are dropped and counted."""
        if self._rest and not self._flush():
            self.dropped += len(records)
            return 0
        if not records:
            return 0
        data = records[0] if len(records) == 1 else b"".join(records)
        try:
            n = self.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.stop(f"the reader went away ({e.strerror})")
            return 0
        written, end = 0, 0
        for r in records:
            if end >= n:
                break
            start, end = end, end + len(r)
            written += 1
            if end > n:
                self._rest = r[n - start:]
                self._schedule_flush()
        self.dropped += len(records) - written
        return written

    def _flush(self) -> bool:
        """Try to send the rest of a cut record; True once nothing is left."""
        if not self._rest:
            return True
        try:
            n = self.sock.send(self._rest, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.stop(f"the reader went away ({e.strerror})")
            return False
        self._rest = self._rest[n:]
        if self._rest:
            self._schedule_flush()
            return False
        return True

    def _schedule_flush(self) -> None:
        if not self._flush_due and self.sock is not None:
            self._flush_due = True
            self.a.loop.call_later(FLUSH_S, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_due = False
        if self.sock is None:
            return
        if self._flush() and self.count is not None and self.records >= self.count:
            self.stop(f"{self.count} records written")

    def _on_readable(self) -> None:
        """The reader never writes: readable means it closed its end (or broke the protocol)."""
        try:
            data = self.sock.recv(4096, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.stop(f"the reader went away ({e.strerror})")
            return
        if not data:
            self.stop("the reader went away")

    # ---------------------------------------------------------------- end

    def stop(self, reason: str, flush: bool = False) -> None:
        """End the capture (idempotent): close the stream and free the agent's slot. `flush`: the
        reader is still reading, so the rest of a cut record gets one last try."""
        if self.sock is None:
            return
        sock, self.sock = self.sock, None
        if flush and self._rest:
            with contextlib.suppress(OSError):
                sock.send(self._rest, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        self.reason, self.ended_at = reason, time.time()
        self.a.loop.remove_reader(sock.fileno())
        sock.close()
        if self.a.capture is self:
            self.a.capture = None
        self.a.capture_last = self.summary()
        log.info("capture to %s ended: %s; %d records, %d dropped", self.path, reason, self.records,
                 self.dropped)

    def summary(self) -> dict:
        """What `status -j` and the capture requests report."""
        return {"socket": self.path, "direction": self.direction, "count": self.count, "records": self.records,
                "dropped": self.dropped, "running": self.reason is None, "ended": self.reason,
                "seconds": round((self.ended_at or time.time()) - self.started, 3)}


def request(agent, req: dict) -> dict:
    """The control socket's `capture` request: start one, or stop one (`"stop": true`) by its path."""
    if not req.get("stop"):
        agent.capture = Capture.start(agent, req)
        return {"capture": agent.capture.summary()}
    path = req.get("socket")
    cap = agent.capture
    if cap is not None and cap.path == path:
        cap.stop("stopped by the client", flush=True)
        return {"capture": cap.summary()}
    last = getattr(agent, "capture_last", None)
    if last is not None and last.get("socket") == path:
        return {"capture": last}
    raise CaptureError(f"no capture to {path} on {agent.spec.where}")

