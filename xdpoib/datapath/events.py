"""Reader of the `xo_events` ring buffer by fd (mmap), so an agent that adopted pinned maps can
consume unresolved-destination reports without bcc.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (ours to write); from page 1 the
producer position page, then the data area mapped twice in a row so records never wrap. Each record
has an 8-byte header (length with BUSY/DISCARD bits, page offset) and is padded to 8 bytes.
"""

from __future__ import annotations

import mmap
import struct

from xdpoib import abi

PAGE = mmap.PAGESIZE
BUSY, DISCARD = 1 << 31, 1 << 30
DATA_SIZE = 16 * 4096   # XDPOIB_EVENTS_PAGES pages


class RingReader:
    """Consume records from a BPF ring buffer map fd."""

    def __init__(self, fd: int, data_size: int = DATA_SIZE):
        self.size = data_size
        self._cons = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(fd, PAGE + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)

    def read(self) -> list[bytes]:
        """Return every committed record not consumed yet, and mark them consumed."""
        out = []
        cons = struct.unpack_from("Q", self._cons, 0)[0]
        prod = struct.unpack_from("Q", self._prod, 0)[0]
        mask = self.size - 1
        while cons < prod:
            off = PAGE + (cons & mask)
            hdr_len = struct.unpack_from("I", self._prod, off)[0]
            if hdr_len & BUSY:
                break
            n = hdr_len & ~(BUSY | DISCARD)
            if not hdr_len & DISCARD:
                out.append(bytes(self._prod[off + 8:off + 8 + n]))
            cons += (n + 8 + 7) & ~7
        struct.pack_into("Q", self._cons, 0, cons)
        return out

    def unresolved(self) -> list[abi.UnresolvedEvent]:
        """Return the pending unresolved-destination reports."""
        return [abi.UnresolvedEvent.from_bytes(r) for r in self.read()]

    def close(self) -> None:
        """Unmap (idempotent)."""
        for m in (self._cons, self._prod):
            if not m.closed:
                m.close()
