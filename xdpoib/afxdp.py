"""AF_XDP sockets in pure Python: UMEM, fill/completion/RX/TX rings, metadata read from UMEM.

The agent's pump receives the frames the TX program redirects into its XSKMAP (IPoIB frames with the
BPF metadata record just before them) and can transmit frames on the same interface. Everything is
batched: one pass over a ring per wakeup, bulk fill-ring refills, one kick per TX batch.

Layout (linux/if_xdp.h): rings are mmapped from the socket at fixed page offsets; each ring has
u32 producer/consumer indices, a flags word and a power-of-two array of descriptors (u64 addresses for
the fill and completion rings, {u64 addr, u32 len, u32 options} for RX/TX). The kernel writes the
metadata (bpf_xdp_adjust_meta) right before the frame in UMEM, so it is read at addr - meta_len.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct

import numpy as np

from xdpoib.errors import XdpoibError

AF_XDP = 44
SOL_XDP = 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_TX_RING = 1, 2, 3
XDP_UMEM_REG, XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_STATISTICS = 4, 5, 6, 7
XDP_COPY, XDP_ZEROCOPY, XDP_USE_NEED_WAKEUP = 1 << 1, 1 << 2, 1 << 3
XDP_RING_NEED_WAKEUP = 1
PGOFF_RX, PGOFF_TX = 0, 0x80000000
PGOFF_FILL, PGOFF_COMPLETION = 0x100000000, 0x180000000
_DESC = struct.Struct("=QII")
_ADDR = struct.Struct("=Q")
DESC_DTYPE = np.dtype([("addr", "=u8"), ("len", "=u4"), ("options", "=u4")])   # struct xdp_desc

_libc = ctypes.CDLL(None, use_errno=True)


class XskError(XdpoibError):
    """An AF_XDP socket could not be set up or used."""


class XskBusy(XskError):
    """The kernel will not map a bound socket's rings again (it does only before the bind: Debian 12's
    6.1; 6.18 does after): the socket cannot be adopted, only replaced (`XskSocket(bind=False)`)."""


_NO_DESCS = np.zeros(0, DESC_DTYPE)


class _Ring:
    """One mmapped ring: producer/consumer indices, flags, and descriptors of `esize` bytes."""

    def __init__(self, fd: int, pgoff: int, offsets: tuple[int, int, int, int], size: int, esize: int):
        prod, cons, desc, flags = offsets
        self.map = mmap.mmap(fd, desc + size * esize, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
        self.mv = memoryview(self.map)
        self.u32 = self.mv.cast("I")
        self.prod_i, self.cons_i, self.flags_i = prod // 4, cons // 4, flags // 4
        self.desc, self.size, self.mask, self.esize = desc, size, size - 1, esize
        # the descriptors as an array (RX/TX: struct xdp_desc; fill/completion: u64 addresses)
        self.array = np.frombuffer(self.map, DESC_DTYPE if esize == _DESC.size else np.uint64, size, desc)

    @property
    def producer(self) -> int:
        return self.u32[self.prod_i]

    @producer.setter
    def producer(self, v: int) -> None:
        self.u32[self.prod_i] = v & 0xFFFFFFFF

    @property
    def consumer(self) -> int:
        return self.u32[self.cons_i]

    @consumer.setter
    def consumer(self, v: int) -> None:
        self.u32[self.cons_i] = v & 0xFFFFFFFF

    @property
    def needs_wakeup(self) -> bool:
        return bool(self.u32[self.flags_i] & XDP_RING_NEED_WAKEUP)

    def slot(self, idx: int) -> int:
        return self.desc + (idx & self.mask) * self.esize

    def close(self) -> None:
        self.array = None
        self.u32.release()
        self.mv.release()
        self.map.close()


RELEASE_WAIT = 1.0      # seconds a bind waits for the kernel to release a just-closed socket's queue


class XskSocket:
    """An AF_XDP socket bound to one queue of one interface, with its own UMEM.

    Half of the UMEM frames feed the fill ring (RX), half are kept for TX. `recv` returns
    (metadata, frame) pairs copied out of UMEM and gives their frames straight back to the fill ring.
    """

    def __init__(self, ifindex: int, queue_id: int = 0, *, frames: int = 4096, frame_size: int = 4096,
                 ring_size: int = 2048, meta_len: int = 0, copy_mode: bool = True, bind: bool = True,
                 bind_wait: float = RELEASE_WAIT):
        """bind=False: everything but the bind (`bind()` later), so a successor whose kernel will not let
        it adopt a bound socket is ready the moment the running agent's socket closes. bind_wait: how
        long EBUSY is retried (`bind`): a queue whose socket was just closed is still busy for a while."""
        if frames & (frames - 1) or ring_size & (ring_size - 1):
            raise XskError("frames and ring_size must be powers of two")
        self.frames, self.frame_size, self.meta_len = frames, frame_size, meta_len
        self.ring_size, self.ifindex, self.queue_id = ring_size, ifindex, queue_id
        self._rings: list[_Ring] = []
        self.umem_fd = -1
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        try:
            # the UMEM is a memfd, not private memory: a successor agent maps the same pages and takes
            # the socket over without closing it (`adopt`, docs/operations.md "restart")
            self._map_umem(os.memfd_create("xdpoib-umem", os.MFD_CLOEXEC), create=True)
            base = ctypes.addressof(ctypes.c_char.from_buffer(self.umem))
            self.sock.setsockopt(SOL_XDP, XDP_UMEM_REG, struct.pack("=QQIII4x", base, len(self.umem),
                                                                    frame_size, 0, 0))
            for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING, XDP_TX_RING):
                self.sock.setsockopt(SOL_XDP, opt, struct.pack("=I", ring_size))
            self._map_rings()
            self._copy_mode = copy_mode
            half = frames // 2
            self._tx_free = [i * frame_size for i in range(half, frames)]
            self.bound = False
            if bind:
                self.bind(timeout=bind_wait)
        except OSError as e:
            self.close()
            raise XskError(f"AF_XDP socket setup failed: {e}") from None
        except BaseException:
            self.close()
            raise
        self.stats = {"rx_frames": 0, "tx_frames": 0, "tx_ring_full": 0}

    def bind(self, timeout: float = 0.0) -> None:
        """Bind to the interface's queue and fill the fill ring. With a timeout, EBUSY is retried until
        then: the kernel lets go of a closed socket's queue only in deferred work after the close (the
        socket's buffer pool is released from a workqueue, under the RTNL), so a socket bound at once
        after the queue's previous one closed (a TAP's switch from the plain to the translating
        datapath, a successor's own socket) is refused for a few ms, longer on a busy host."""
        import errno
        import time

        flags = (XDP_COPY if self._copy_mode else 0) | XDP_USE_NEED_WAKEUP
        addr = struct.pack("=HHIII", AF_XDP, flags, self.ifindex, self.queue_id, 0)
        until = time.monotonic() + timeout
        while _libc.bind(self.sock.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
            err = ctypes.get_errno()
            if err != errno.EBUSY or time.monotonic() >= until:
                held = ""
                if err == errno.EBUSY and timeout:
                    held = f" for {timeout:g} s (another AF_XDP socket holds the queue)"
                raise XskError(f"AF_XDP bind to ifindex {self.ifindex} queue {self.queue_id}: "
                               f"{os.strerror(err)}{held}")
            time.sleep(0.0002)
        self.bound = True
        self._fill_frames([i * self.frame_size for i in range(min(self.frames // 2, self.ring_size))])

    def _map_umem(self, fd: int, create: bool = False) -> None:
        self.umem_fd = fd
        size = self.frames * self.frame_size
        if create:
            os.ftruncate(fd, size)
        self.umem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._umem_mv = memoryview(self.umem)

    def _map_rings(self) -> None:
        off = struct.unpack("=16Q", self.sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 128))
        fd, size = self.sock.fileno(), self.ring_size
        self.rx = self._ring(fd, PGOFF_RX, off[0:4], size, _DESC.size)
        self.tx = self._ring(fd, PGOFF_TX, off[4:8], size, _DESC.size)
        self.fill = self._ring(fd, PGOFF_FILL, off[8:12], size, 8)
        self.comp = self._ring(fd, PGOFF_COMPLETION, off[12:16], size, 8)

    # --- handing the socket to another process (a make-before-break restart) ----------------------

    def geometry(self) -> dict:
        """What `adopt` needs besides the two descriptors."""
        return {"frames": self.frames, "frame_size": self.frame_size, "ring_size": self.ring_size,
                "meta_len": self.meta_len, "ifindex": self.ifindex, "queue_id": self.queue_id}

    def handover_fds(self) -> tuple[int, int]:
        """(socket, UMEM memfd): passed with SCM_RIGHTS to the agent that takes over."""
        return self.sock.fileno(), self.umem_fd

    def settle(self, timeout: float = 1.0) -> bool:
        """Before handing the socket over: the kernel consumes what the TX ring holds and every
        completion is reaped, so all of the TX half is free again. False if it did not within timeout."""
        import time

        until = time.monotonic() + timeout
        while True:
            self.kick()
            if not self.pending_tx() and len(self._tx_free) == self.frames - self.frames // 2:
                return True
            if time.monotonic() > until:
                return False
            time.sleep(0.001)

    @classmethod
    def adopt(cls, sock_fd: int, umem_fd: int, geometry: dict) -> XskSocket:
        """Take over a bound socket another agent `settle`d and stopped using (its descriptors received
        over the control socket): the same rings and UMEM, nothing rebound, so frames keep arriving
        throughout. Every receive frame is the kernel's (fill or RX ring) and the TX half is free."""
        self = cls.__new__(cls)
        g = geometry
        self.frames, self.frame_size, self.meta_len = int(g["frames"]), int(g["frame_size"]), int(g["meta_len"])
        self.ring_size, self.ifindex, self.queue_id = int(g["ring_size"]), int(g["ifindex"]), int(g["queue_id"])
        self._rings = []
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0, fileno=sock_fd)
        try:
            if self.sock.family != AF_XDP:
                raise XskError("the descriptor handed over is not an AF_XDP socket")
            self._map_umem(umem_fd)
            self._map_rings()           # EBUSY where the kernel maps a socket's rings only before its bind
            self.bound = True
            half = self.frames // 2
            self._tx_free = [i * self.frame_size for i in range(half, self.frames)]
        except OSError as e:
            self.close()
            import errno

            cls_ = XskBusy if e.errno == errno.EBUSY else XskError
            raise cls_(f"adopting the AF_XDP socket failed: {e}") from None
        except BaseException:
            self.close()
            raise
        self.stats = {"rx_frames": 0, "tx_frames": 0, "tx_ring_full": 0}
        return self

    def _ring(self, fd, pgoff, offsets, size, esize) -> _Ring:
        r = _Ring(fd, pgoff, offsets, size, esize)
        self._rings.append(r)
        return r

    def fileno(self) -> int:
        """The socket's fd: XSKMAP entries take it; poll() it for POLLIN."""
        return self.sock.fileno()

    # --- RX ---------------------------------------------------------------------------------------

    def _fill_frames(self, addrs: list[int]) -> None:
        """Give frames back to the fill ring, packed in at most two contiguous runs."""
        r = self.fill
        prod = r.producer
        n = len(addrs)
        start = prod & r.mask
        first = min(n, r.size - start)
        if first:
            struct.pack_into(f"={first}Q", r.mv, r.desc + start * 8, *addrs[:first])
        if n > first:
            struct.pack_into(f"={n - first}Q", r.mv, r.desc, *addrs[first:])
        r.producer = prod + n
        if r.needs_wakeup:
            self._wake_rx()

    def _wake_rx(self) -> None:
        try:
            self.sock.recvfrom(0, socket.MSG_DONTWAIT)
        except (BlockingIOError, OSError):
            pass

    def rx_descs(self, max_frames: int = 256) -> list[tuple[int, int, int]]:
        """Descriptors (addr, len, options) of up to max_frames received frames, without copying them.
        Read the frames from `umem_view` (metadata at addr - meta_len), then call `rx_release`."""
        r = self.rx
        cons = r.consumer
        n = min((r.producer - cons) & 0xFFFFFFFF, max_frames)
        if not n:
            return []
        start = cons & r.mask
        first = min(n, r.size - start)
        mv, d = r.mv, r.desc
        descs = list(_DESC.iter_unpack(mv[d + start * 16:d + (start + first) * 16]))
        if n > first:
            descs += _DESC.iter_unpack(mv[d:d + (n - first) * 16])
        return descs

    def rx_pending(self) -> int:
        """Frames waiting on the RX ring."""
        return (self.rx.producer - self.rx.consumer) & 0xFFFFFFFF

    def rx_desc_array(self, max_frames: int = 256) -> np.ndarray:
        """`rx_descs` as a structured array (fields addr, len, options; a copy of the ring's entries);
        consume them with `rx_consume_n`."""
        r = self.rx
        cons = r.consumer
        n = min((r.producer - cons) & 0xFFFFFFFF, max_frames)
        if not n:
            return _NO_DESCS
        start = cons & r.mask
        first = min(n, r.size - start)
        if n == first:
            return r.array[start:start + n].copy()
        return np.concatenate((r.array[start:], r.array[:n - first]))

    def rx_consume_n(self, n: int) -> None:
        """Consume n received descriptors (their frames stay ours until `fill_array` gives them back)."""
        if n:
            self.rx.consumer = self.rx.consumer + n
            self.stats["rx_frames"] += n

    def fill_array(self, addrs: np.ndarray) -> None:
        """Give frames back to the fill ring: an integer array of addresses (any address inside each frame)."""
        n = len(addrs)
        if not n:
            return
        r = self.fill
        prod = r.producer
        start = prod & r.mask
        first = min(n, r.size - start)
        fs = self.frame_size
        a = addrs - addrs % fs
        r.array[start:start + first] = a[:first]
        if n > first:
            r.array[:n - first] = a[first:]
        r.producer = prod + n
        if r.needs_wakeup:
            self._wake_rx()

    def rx_release(self, descs: list[tuple[int, int, int]]) -> None:
        """Consume the descriptors `rx_descs` returned and give their frames back to the fill ring."""
        if descs:
            self.rx_consume(descs)
            fs = self.frame_size
            self._fill_frames([a - a % fs for a, _l, _o in descs])

    def rx_consume(self, descs: list[tuple[int, int, int]]) -> None:
        """Consume the descriptors `rx_descs` returned but keep their frames (e.g. while a send reads
        them): each must come back exactly once through `fill_frames`."""
        n = len(descs)
        if n:
            self.rx.consumer = self.rx.consumer + n
            self.stats["rx_frames"] += n

    def fill_frames(self, addrs: list[int]) -> None:
        """Give frames kept by `rx_consume` back to the fill ring (any address inside each frame)."""
        if addrs:
            fs = self.frame_size
            self._fill_frames([a - a % fs for a in addrs])

    @property
    def umem_view(self) -> memoryview:
        """The UMEM (read received frames from it between `rx_descs` and `rx_release`)."""
        return self._umem_mv

    def recv(self, max_frames: int = 256, timeout: float | None = 0.0) -> list[tuple[bytes, bytes]]:
        """Return up to max_frames (metadata, frame) pairs, copied; wait up to timeout seconds for the first."""
        r = self.rx
        if r.consumer == r.producer and timeout != 0.0:
            p = select.poll()
            p.register(self.fileno(), select.POLLIN)
            p.poll(None if timeout is None else int(timeout * 1000))
        descs = self.rx_descs(max_frames)
        um, ml = self._umem_mv, self.meta_len
        out = [(bytes(um[a - ml:a]) if ml else b"", bytes(um[a:a + n])) for a, n, _o in descs]
        self.rx_release(descs)
        return out

    # --- TX ---------------------------------------------------------------------------------------

    def _reap_completions(self) -> None:
        c = self.comp
        cons, prod = c.consumer, c.producer
        n = (prod - cons) & 0xFFFFFFFF
        for i in range(n):
            self._tx_free.append(_ADDR.unpack_from(c.mv, c.slot(cons + i))[0])
        if n:
            c.consumer = cons + n

    def send(self, frames: list[bytes]) -> int:
        """Queue frames on the TX ring and kick the kernel once; return how many were queued."""
        self._reap_completions()
        t = self.tx
        prod = t.producer
        room = t.size - ((prod - t.consumer) & 0xFFFFFFFF)
        n = min(len(frames), room, len(self._tx_free))
        um = self._umem_mv
        for i in range(n):
            data = frames[i]
            if len(data) > self.frame_size:
                raise XskError(f"frame of {len(data)} bytes exceeds the UMEM frame size {self.frame_size}")
            addr = self._tx_free.pop()
            um[addr:addr + len(data)] = data
            _DESC.pack_into(t.mv, t.slot(prod + i), addr, len(data), 0)
        t.producer = prod + n
        self.stats["tx_frames"] += n
        self.stats["tx_ring_full"] += len(frames) - n
        self.kick()
        return n

    def kick(self) -> None:
        """Wake the kernel's TX path (needed in copy mode) and collect completions."""
        try:
            self.sock.send(b"", socket.MSG_DONTWAIT)
        except (BlockingIOError, OSError):
            pass
        self._reap_completions()

    def pending_tx(self) -> int:
        """Frames queued on the TX ring that the kernel has not consumed yet."""
        return (self.tx.producer - self.tx.consumer) & 0xFFFFFFFF

    def kernel_stats(self) -> dict[str, int]:
        """Return the kernel's XDP_STATISTICS for this socket."""
        raw = self.sock.getsockopt(SOL_XDP, XDP_STATISTICS, 48)
        keys = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
                "rx_fill_ring_empty_descs", "tx_ring_empty_descs")
        vals = struct.unpack("=6Q", raw.ljust(48, b"\0"))
        return dict(zip(keys, vals, strict=True))

    def close(self) -> None:
        """Unmap the rings and UMEM and close the socket (idempotent)."""
        for r in self._rings:
            r.close()
        self._rings.clear()
        mv = getattr(self, "_umem_mv", None)
        if mv is not None:
            mv.release()
            self._umem_mv = None
        if getattr(self, "umem", None) is not None:
            self.umem.close()
            self.umem = None
        if getattr(self, "umem_fd", -1) >= 0:
            os.close(self.umem_fd)
            self.umem_fd = -1
        if self.sock.fileno() >= 0:
            self.sock.close()

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
