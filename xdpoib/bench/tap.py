"""`xdpoib bench tap`: what tap mode's hop costs the host, measured in one run on throwaway links.

In `--mode tap` XDP does not run on the VM's TAP, because a guest with vnet headers hands the host
frames with partial checksums and TSO super-frames that XDP would see raw. The TAP is a port of a
bridge whose other port is a veth end with tx checksum, TSO and UDP segmentation off (gro on), and
XDP runs on that veth's peer: the bridge's transmit on the offload-free end completes the checksums
and segments the super-frames (`xdpoib/agent/links.py`). This bench builds the same hop with the same
`xdpoib.link` helpers (not the agent) and measures it against XDP on the TAP itself.

Method:
- **The writer** stands for qemu: this process opens a TAP the way qemu does (IFF_TAP | IFF_NO_PI |
  IFF_VNET_HDR, a 10-byte `struct virtio_net_hdr` before each frame, TUNSETOFFLOAD with TUN_F_CSUM |
  TUN_F_TSO4 so the kernel takes GSO frames) and writes one prepared frame over and over, as fast as it
  can, for `seconds`. Three kinds: **complete** 1514-byte IPv4/TCP frames (flags 0, every checksum
  filled in); **partial** ones (VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start/csum_offset at the TCP
  checksum, which holds only the pseudo-header sum, as a guest leaves it); **TSO** super-frames
  (VIRTIO_NET_HDR_GSO_TCPV4, gso_size 1460: 44 segments of 1514 bytes from one 64 KB write).
- **The counter**: a tiny XDP program (`xdpoib.datapath.counter`) counts frames by length (at most
  1514 bytes, or above) and drops them. It runs (a) on the TAP itself, the baseline: complete frames
  only, since that is all XDP on a TAP can take from a guest; (b) on the far veth end behind the
  bridge and the offload-free veth, for the three kinds.
- **The figures**: frames (for TSO, segments) counted at XDP per second of the writer's wall time, and
  the writer's CPU time (user + system of this process, `time.process_time`) per frame counted. The
  kernel does the hop's work in the writer's `write()` and in the softirq it raises on the same CPU,
  so that CPU time is the host's cost of a guest's frame; on a shared machine it is the steadier
  figure of the two. Each hop row is also given as a ratio to the baseline of the same run. Samples
  of the four paths are interleaved, `rounds` times; each figure is the median.
- **Correctness**, checked after the samples: with the counter passing frames on, a packet socket on
  the far veth end reads a few frames of each hop kind, and each must be at most 1514 bytes with valid
  IPv4 and TCP checksums (so partial checksums were completed and super-frames segmented on the way).
  Over the whole run the counter also says how many frames above 1514 bytes reached XDP behind the
  hop (`oversize`: 0 when the hop does its job). `checks` has the problems found per hop kind (none: []).
  The checksums are the telling part: a veth whose peer runs XDP drops GSO from its own features, so
  super-frames are segmented on the way even with the hop's offloads left on, but their checksums,
  like those of partial frames, then reach XDP unfinished (tests/integration/test_bench_tap.py has
  that negative control).

Everything is named `xbt<tag>...` (the TAP `t`, the bridge `r`, the veth ends `s` and `o`) and removed
on the way out, even on an error, Ctrl-C or SIGTERM; the TAP is not persistent, so it also goes with
this process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import statistics
import struct
import time
import uuid

from xdpoib.errors import PrerequisiteError, UsageError, XdpoibError
from xdpoib.teardown import Teardown

DEFAULT_SECONDS, DEFAULT_ROUNDS = 3.0, 3
FRAME = 1514                                  # Ethernet frame without FCS at MTU 1500
MSS = FRAME - 14 - 20 - 20                    # TCP payload of one segment, no options
TSO_SEGMENTS = 44                             # 44 * 1460 + 40 fits an IPv4 total length (65535)
CHECK_FRAMES = 3                              # frames (writes) of each hop kind checked at the end

TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454CA, 0x400454D0, 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4 = 0x01, 0x02
VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4 = 1, 0, 1
VNET = struct.Struct("<BBHHHH")               # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
ETH_P_ALL = 0x0003

SRC_MAC, DST_MAC = bytes.fromhex("525400b7a001"), bytes.fromhex("525400b7a002")
SRC_IP, DST_IP = bytes([10, 57, 0, 1]), bytes([10, 57, 0, 2])
CSUM_START, CSUM_OFFSET = 14 + 20, 16         # the TCP checksum field, from the frame's start

#: (key, label, how frames are written, where XDP counts)
PATHS = (
    ("tap", "XDP on the TAP itself (complete frames only: what vnet headers break)", "complete", "tap"),
    ("hop_complete", "through the hop, complete frames", "complete", "hop"),
    ("hop_partial", "through the hop, partial checksums (completed on the way)", "partial", "hop"),
    ("hop_tso", f"through the hop, 64 KB TSO super-frames ({TSO_SEGMENTS} segments each)", "tso", "hop"),
)
KEYS = ("seconds", "rounds", "frame_bytes", "tso_segments", "paths", "checks")
PATH_KEYS = ("label", "unit", "per_s", "cpu_us", "rate_vs_tap", "cpu_vs_tap", "writes", "counted", "oversize")


class BenchError(XdpoibError):
    """The TAP bench could not set up or measure something."""


def check_settings(seconds: float, rounds: int) -> None:
    """Refuse bad settings before anything is created."""
    if not 0.1 <= seconds <= 600:
        raise UsageError("--seconds must be between 0.1 and 600")
    if not 1 <= rounds <= 100:
        raise UsageError("--rounds must be between 1 and 100")


# ================================================================ frames

def _tcp(payload_len: int, seq: int, csum: str) -> bytes:
    """An IPv4/TCP frame with payload_len bytes of payload; csum 'full' (every checksum filled in) or
    'pseudo' (the TCP checksum holds the folded pseudo-header sum, as a sender with offloads leaves it)."""
    from xdpoib.wire import frames as f

    payload = bytes(range(256)) * (payload_len // 256 + 1)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, 0x18, 65535, 0, 0) + payload[:payload_len]
    if csum == "full":
        check = f.l4_checksum(SRC_IP, DST_IP, f.IPPROTO_TCP, tcp)
    else:
        check = ~f.checksum(SRC_IP + DST_IP + struct.pack("!BBH", 0, f.IPPROTO_TCP, len(tcp))) & 0xFFFF
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    return f.eth(DST_MAC, SRC_MAC, f.ETH_P_IP, f.ipv4(SRC_IP, DST_IP, f.IPPROTO_TCP, tcp, ident=seq & 0xFFFF))


def write_buffer(kind: str) -> bytes:
    """The vnet header and frame the writer writes for kind: complete, partial or tso."""
    if kind == "complete":
        return VNET.pack(0, GSO_NONE, 0, 0, 0, 0) + _tcp(MSS, 1, "full")
    if kind == "partial":
        return VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, CSUM_START, CSUM_OFFSET) + _tcp(MSS, 1, "pseudo")
    if kind == "tso":
        return (VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_TCPV4, CSUM_START + 20, MSS, CSUM_START, CSUM_OFFSET)
                + _tcp(MSS * TSO_SEGMENTS, 1, "pseudo"))
    raise ValueError(kind)


def frame_problem(frame: bytes) -> str | None:
    """Why a frame that reached XDP behind the hop is not what a receiver accepts (None: it is):
    above 1514 bytes, or an IPv4 or TCP checksum that does not verify."""
    from xdpoib.wire import frames as f

    if len(frame) > FRAME:
        return f"{len(frame)} bytes, above {FRAME}"
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != f.IPPROTO_TCP:
        return "not an IPv4/TCP frame"
    ihl = (frame[14] & 0x0F) * 4
    tot = struct.unpack_from("!H", frame, 16)[0]
    if f.checksum(frame[14:14 + ihl]) != 0:
        return "bad IPv4 header checksum"
    seg = frame[14 + ihl:14 + tot]
    if f.checksum(SRC_IP + DST_IP + struct.pack("!BBH", 0, f.IPPROTO_TCP, len(seg)) + seg) != 0:
        return "bad TCP checksum"
    return None


# ================================================================ links

class Bench:
    """The throwaway links and the counter; `close()` removes everything (a context manager)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tap, self.bridge, self.side, self.far = (f"xbt{tag}{c}" for c in "trso")
        self._undo = Teardown("xdpoib bench tap")
        self._later = self._undo.later
        self.fd = -1
        self.prog = None
        self.on: str | None = None            # where the counter is attached: tap or hop

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove everything, with Ctrl-C and SIGTERM held off until it is done."""
        self._undo.close()

    def setup(self) -> None:
        """The TAP (held by this process, as qemu holds it), the hop built as the agent builds it, and
        the counter loaded."""
        from xdpoib import link
        from xdpoib.agent.links import VETH_XDP_MAX_MTU, quiet
        from xdpoib.datapath.counter import CountingProgram

        self.fd = os.open("/dev/net/tun", os.O_RDWR)
        self._later(os.close, self.fd)
        fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", self.tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        self._later(link.delete_link, self.tap)           # gone with the fd anyway; here if it was not
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET.size))
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
        quiet(self.tap)
        link.set_link(self.tap, None, mtu=1500, up=True)
        # the hop, as xdpoib/agent/links.py builds it for --mode tap
        link.create_veth(self.side, self.far, None)
        self._later(link.delete_link, self.far)
        quiet(self.side, self.far)
        link.set_link(self.side, None, mtu=1500, up=True)
        link.set_link(self.far, None, mtu=VETH_XDP_MAX_MTU, up=False)
        link.set_offloads(self.side, None, tx=False, tso=False, uso=False, gro=True)
        link.create_bridge(self.bridge, [self.tap, self.side], before_up=lambda: quiet(self.bridge))
        self._later(link.delete_link, self.bridge)
        self.prog = CountingProgram()
        self._later(self.prog.close)
        link.attach_xdp(self.far, self.prog.fd)
        self._later(link.detach_xdp, self.far)
        link.set_link(self.far, None, up=True)
        self._later(link.detach_xdp, self.tap)

    def count_on(self, where: str) -> None:
        """Put the counter on the TAP (tap) or leave the TAP without XDP, so frames take the hop (hop)."""
        from xdpoib import link

        if where == self.on:
            return
        if where == "tap":
            link.attach_xdp(self.tap, self.prog.fd)
        else:
            link.detach_xdp(self.tap)
        self.on = where
        time.sleep(0.05)

    def sample(self, kind: str, where: str, seconds: float) -> dict:
        """Write kind for seconds with the counter at where: writes, frames counted, CPU and wall time."""
        self.count_on(where)
        buf, fd, w = write_buffer(kind), self.fd, os.write
        before = self.prog.counts()
        writes, batch = 0, 256 if kind != "tso" else 16
        clock, cpu = time.monotonic, time.process_time
        t0, c0 = clock(), cpu()
        end = t0 + seconds
        while True:
            for _ in range(batch):
                w(fd, buf)
            writes += batch
            if clock() >= end:
                break
        wall, used = clock() - t0, cpu() - c0
        time.sleep(0.05)                                     # what is still on its way to XDP
        after = self.prog.counts()
        counted, _small, big = (a - b for a, b in zip(after, before, strict=True))
        return {"writes": writes, "counted": counted, "oversize": big, "wall": wall, "cpu": used}

    def check(self, kind: str) -> list[str]:
        """Problems of the frames of CHECK_FRAMES writes of kind, read behind the hop (empty: none)."""
        from xdpoib import link

        self.count_on("hop")
        link.set_offloads(self.far, None, gro=False)          # what XDP saw, not what GRO made of it
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)    # SO_RCVBUFFORCE: a super-frame's segments at once
            s.bind((self.far, 0))
            self.prog.set_passing(True)
            per_write = TSO_SEGMENTS if kind == "tso" else 1
            problems, seen = [], 0
            for i in range(CHECK_FRAMES):
                os.write(self.fd, write_buffer(kind))
                deadline = time.monotonic() + 1.0
                while seen < (i + 1) * per_write and time.monotonic() < deadline:
                    r, _, _ = select.select([s], [], [], 0.1)
                    if not r:
                        continue
                    frame = s.recv(70000)
                    if frame[12:14] != b"\x08\x00" or frame[26:34] != SRC_IP + DST_IP:
                        continue                              # not ours
                    seen += 1
                    p = frame_problem(frame)
                    if p and p not in problems:
                        problems.append(p)
            if seen != CHECK_FRAMES * per_write:
                problems.append(f"{seen} of {CHECK_FRAMES * per_write} frames arrived")
            return problems
        finally:
            self.prog.set_passing(False)
            s.close()


# ================================================================ the run and its report

def run_tap(seconds: float = DEFAULT_SECONDS, rounds: int = DEFAULT_ROUNDS, log=lambda m: None) -> dict:
    """Set up, measure, check, tear down; the result object (see the module doc and `KEYS`)."""
    check_settings(seconds, rounds)
    if os.geteuid() != 0:
        raise PrerequisiteError("xdpoib bench tap must be run as root (TAP, bridge, veth, XDP)")
    if not os.path.exists("/dev/net/tun"):
        raise PrerequisiteError("/dev/net/tun is missing (the writer needs a TAP)")
    old_term = None
    with contextlib.suppress(ValueError):
        old_term = signal.signal(signal.SIGTERM, _interrupted)
    try:
        with Bench() as b:
            log(f"links {b.tap}, {b.bridge}, {b.side}/{b.far}; {rounds} rounds of {seconds:g} s per path")
            try:
                b.setup()
            except OSError as e:
                raise BenchError(f"cannot set up the TAP {b.tap}: {e}") from None
            samples: dict[str, list[dict]] = {k: [] for k, *_ in PATHS}
            for r in range(rounds):
                for key, _label, kind, where in PATHS:
                    s = b.sample(kind, where, seconds)
                    samples[key].append(s)
                    log(f"round {r + 1} {key}: {s['counted'] / s['wall']:,.0f}/s, "
                        f"{s['cpu'] * 1e6 / max(s['counted'], 1):.2f} us CPU each")
            checks = {key: b.check(kind) for key, _label, kind, where in PATHS if where == "hop"}
            return summarize(samples, checks, seconds, rounds)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def summarize(samples: dict[str, list[dict]], checks: dict[str, list[str]], seconds: float, rounds: int) -> dict:
    """Medians per path and ratios to the baseline (`tap`)."""
    paths = {}
    for key, label, kind, _where in PATHS:
        ss = samples[key]
        per_s = statistics.median(s["counted"] / s["wall"] for s in ss)
        cpu_us = statistics.median(s["cpu"] * 1e6 / max(s["counted"], 1) for s in ss)
        paths[key] = {"label": label, "unit": "segments" if kind == "tso" else "frames", "per_s": per_s,
                      "cpu_us": cpu_us, "writes": sum(s["writes"] for s in ss),
                      "counted": sum(s["counted"] for s in ss), "oversize": sum(s["oversize"] for s in ss)}
    base = paths["tap"]
    for p in paths.values():
        p["rate_vs_tap"] = p["per_s"] / base["per_s"] if base["per_s"] else 0.0
        p["cpu_vs_tap"] = p["cpu_us"] / base["cpu_us"] if base["cpu_us"] else 0.0
    paths = {k: {f: v[f] for f in PATH_KEYS} for k, v in paths.items()}
    return {"seconds": seconds, "rounds": rounds, "frame_bytes": FRAME, "tso_segments": TSO_SEGMENTS,
            "paths": paths, "checks": checks}


def format_table(res: dict) -> str:
    """A Markdown table of the paths, then the checks."""
    rows = [("path", "frames/s", "writer CPU per frame", "vs XDP on the TAP (rate, CPU)")]
    for key, p in res["paths"].items():
        seg = p["unit"] == "segments"
        rate = f"{p['per_s'] / 1000:,.0f} k" + (" segments" if seg else "")
        cpu = f"{p['cpu_us']:.2f} us" + (" per segment" if seg else "")
        ratio = "baseline" if key == "tap" else f"{p['rate_vs_tap']:.2f}x, {p['cpu_vs_tap']:.2f}x"
        rows.append((p["label"], rate, cpu, ratio))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "| --- | --- | --- | --- |")
    lines.append("")
    lines.append(f"medians of {res['rounds']} rounds of {res['seconds']:g} s; one writer, "
                 f"{res['frame_bytes']}-byte frames")
    for key, c in res["checks"].items():
        over = res["paths"][key]["oversize"]
        what = "; ".join(c) if c else "ok (at most 1514 bytes, IPv4 and TCP checksums valid)"
        lines.append(f"check {key}: frames behind the hop {what}; "
                     f"frames above {res['frame_bytes']} bytes at XDP: {over}")
    return "\n".join(lines)
