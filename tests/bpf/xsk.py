"""A minimal AF_XDP socket in pure Python (ctypes + mmap), enough to prove the TX program's XSKMAP
redirect and metadata end to end, and to measure AF_XDP TX injection. Copy mode, one queue; UMEM frames
0..RING-1 feed the RX ring, RING..2*RING-1 carry transmits."""

from __future__ import annotations

import ctypes as ct
import mmap
import os
import socket
import struct

AF_XDP = 44
SOL_XDP = 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_TX_RING, XDP_UMEM_REG = 1, 2, 3, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING = 5, 6
XDP_PGOFF_RX_RING, XDP_PGOFF_TX_RING = 0, 0x80000000
XDP_UMEM_PGOFF_FILL_RING, XDP_UMEM_PGOFF_COMPLETION_RING = 0x100000000, 0x180000000
XDP_COPY = 1 << 1
FRAME, RING = 4096, 64
NFRAMES = 2 * RING

_libc = ct.CDLL(None, use_errno=True)


class _RingOff(ct.Structure):
    _fields_ = [("producer", ct.c_uint64), ("consumer", ct.c_uint64), ("desc", ct.c_uint64),
                ("flags", ct.c_uint64)]


class _MmapOffsets(ct.Structure):
    _fields_ = [("rx", _RingOff), ("tx", _RingOff), ("fr", _RingOff), ("cr", _RingOff)]


class XskSocket:
    """An AF_XDP socket bound to (ifname, queue 0) with a small UMEM; `recv()` returns (data, meta)."""

    def __init__(self, ifname: str, metalen: int = 32):
        self.metalen = metalen
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        fd = self.sock.fileno()
        self.umem = mmap.mmap(-1, FRAME * NFRAMES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ct.addressof(ct.c_char.from_buffer(self.umem))
        reg = struct.pack("QQIIII", base, FRAME * NFRAMES, FRAME, 0, 0, 0)
        self.sock.setsockopt(SOL_XDP, XDP_UMEM_REG, reg)
        for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING, XDP_TX_RING):
            self.sock.setsockopt(SOL_XDP, opt, RING)
        off = _MmapOffsets.from_buffer_copy(self.sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, ct.sizeof(_MmapOffsets)))
        self.rx = mmap.mmap(fd, off.rx.desc + RING * 16, offset=XDP_PGOFF_RX_RING)
        self.fr = mmap.mmap(fd, off.fr.desc + RING * 8, offset=XDP_UMEM_PGOFF_FILL_RING)
        self.tx = mmap.mmap(fd, off.tx.desc + RING * 16, offset=XDP_PGOFF_TX_RING)
        self.cr = mmap.mmap(fd, off.cr.desc + RING * 8, offset=XDP_UMEM_PGOFF_COMPLETION_RING)
        self._tx_free = [(RING + i) * FRAME for i in range(RING)]
        self._tx_prod = self._cr_cons = 0
        self.off = off
        for i in range(RING):                       # hand every frame to the kernel
            struct.pack_into("Q", self.fr, off.fr.desc + i * 8, i * FRAME)
        struct.pack_into("I", self.fr, off.fr.producer, RING)
        sxdp = struct.pack("HHIII", AF_XDP, XDP_COPY, socket.if_nametoindex(ifname), 0, 0)
        buf = ct.create_string_buffer(sxdp, len(sxdp))
        if _libc.bind(fd, buf, len(sxdp)) != 0:
            err = ct.get_errno()
            self.close()
            raise OSError(err, f"bind AF_XDP to {ifname}: {os.strerror(err)}")
        self._cons = 0

    def fileno(self) -> int:
        """The socket fd (the value an XSKMAP slot takes)."""
        return self.sock.fileno()

    def recv(self) -> tuple[bytes, bytes] | None:
        """Return one received (frame, metadata before it), or None if the RX ring is empty."""
        prod = struct.unpack_from("I", self.rx, self.off.rx.producer)[0]
        if prod == self._cons:
            return None
        i = self._cons % RING
        addr, length, _opts = struct.unpack_from("QII", self.rx, self.off.rx.desc + i * 16)
        data = bytes(self.umem[addr:addr + length])
        meta = bytes(self.umem[addr - self.metalen:addr]) if addr >= self.metalen else b""
        self._cons += 1
        struct.pack_into("I", self.rx, self.off.rx.consumer, self._cons)
        fprod = struct.unpack_from("I", self.fr, self.off.fr.producer)[0]   # give the frame back
        struct.pack_into("Q", self.fr, self.off.fr.desc + (fprod % RING) * 8, addr - addr % FRAME)
        struct.pack_into("I", self.fr, self.off.fr.producer, fprod + 1)
        return data, meta

    def _reap(self) -> None:
        """Take completed transmit frames back from the completion ring."""
        prod = struct.unpack_from("I", self.cr, self.off.cr.producer)[0]
        while self._cr_cons != prod:
            self._tx_free.append(struct.unpack_from("Q", self.cr, self.off.cr.desc + (self._cr_cons % RING) * 8)[0])
            self._cr_cons += 1
        struct.pack_into("I", self.cr, self.off.cr.consumer, self._cr_cons)

    def send(self, frames: list[bytes]) -> None:
        """Transmit frames (at most RING in flight), kicking and reaping until all are queued."""
        i = 0
        while i < len(frames):
            self._reap()
            n = 0
            while i < len(frames) and self._tx_free:
                addr = self._tx_free.pop()
                fr = frames[i]
                self.umem[addr:addr + len(fr)] = fr
                struct.pack_into("QII", self.tx, self.off.tx.desc + (self._tx_prod % RING) * 16, addr, len(fr), 0)
                self._tx_prod += 1
                i += 1
                n += 1
            if n:
                struct.pack_into("I", self.tx, self.off.tx.producer, self._tx_prod)
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass
        for _ in range(1000):           # let the kernel finish this batch
            self._reap()
            if len(self._tx_free) == RING:
                break
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass

    def close(self) -> None:
        """Release the socket and its mappings (idempotent)."""
        for m in ("rx", "fr", "tx", "cr"):
            if getattr(self, m, None) is not None:
                getattr(self, m).close()
                setattr(self, m, None)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
