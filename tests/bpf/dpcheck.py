"""Run frames through the BPF programs and judge them against the oracle; explain mismatches with
hex dumps and a decoded summary."""

from __future__ import annotations

from dataclasses import dataclass

from xdpoib import abi
from xdpoib.abi import XdpAction
from xdpoib.datapath import testrun
from xdpoib.errors import FrameError
from xdpoib.reasons import DropReason, Kind
from xdpoib.wire import oracle

MIN_XDP = 14     # test_run and XDP refuse shorter frames; adjust_head/tail keep at least this much


def hexdump(b: bytes) -> str:
    """Hex of a frame, 16 bytes a line with offsets."""
    return "\n".join(f"  {i:04x}: {b[i:i + 16].hex(' ')}" for i in range(0, len(b), 16)) or "  (empty)"


def summary(b: bytes, ipoib: bool = False) -> str:
    """A one-line decode: addresses, tag, EtherType, IP protocol / ICMPv6 type."""
    try:
        if ipoib:
            et, off, head = int.from_bytes(b[0:2], "big"), 4, "ipoib"
        else:
            et, off = int.from_bytes(b[12:14], "big"), 14
            head = f"{b[6:12].hex(':')} > {b[0:6].hex(':')}"
            if et in (0x8100, 0x88A8):
                head += f" vlan {int.from_bytes(b[14:16], 'big') & 0xFFF}"
                et, off = int.from_bytes(b[16:18], "big"), 18
        extra = ""
        if et == 0x0800:
            extra = f" proto {b[off + 9]} {'.'.join(map(str, b[off + 12:off + 16]))} > " \
                    f"{'.'.join(map(str, b[off + 16:off + 20]))}"
        elif et == 0x86DD:
            extra = f" nh {b[off + 6]}" + (f" icmp6 {b[off + 40]}" if b[off + 6] == 58 else "")
        elif et in (0x0806, 0x8035):
            extra = f" htype {int.from_bytes(b[off:off + 2], 'big')} op {int.from_bytes(b[off + 6:off + 8], 'big')}"
        return f"{head} type {et:#06x}{extra} len {len(b)}"
    except IndexError:
        return f"(short frame, {len(b)} bytes)"


@dataclass
class Outcome:
    """What one side decided: a verdict and either a reason or an output."""

    verdict: int
    reason: int = 0
    frame: bytes = b""
    meta: tuple = ()


def tx_expected(frame: bytes, t: oracle.Tables, groups: dict[bytes, int]) -> Outcome:
    """The oracle's decision for a TX frame, as the BPF program must report it."""
    try:
        r = oracle.eth_to_ipoib(frame, t, rewrite_control=False)
    except FrameError as e:
        return Outcome(XdpAction.DROP, int(e.reason))
    if r.kind != Kind.CONTROL and len(r.frame) < MIN_XDP:
        return Outcome(XdpAction.DROP, int(DropReason.NO_ROOM))
    if r.mgid is not None:
        dest, dest_id = r.mgid, groups.get(r.mgid, 0)
    else:
        dest, dest_id = r.dest_mac + bytes(10), r.peer.peer_id if r.peer else 0
    return Outcome(XdpAction.REDIRECT, 0, r.frame,
                   (abi.META_VERSION, int(r.kind), r.pkey, r.vid, 0,
                    r.vif.vif_id if r.vif else abi.VIF_UNKNOWN, dest_id, dest))


def tx_actual(dp, frame: bytes) -> Outcome:
    """Run the TX program on a frame."""
    res = testrun.run(dp.fd("xdpoib_tx"), frame)
    if res.retval != XdpAction.REDIRECT:
        return Outcome(res.retval, 0, res.frame)
    m = abi.TxMeta.from_bytes(res.meta) if len(res.meta) == 32 else None
    meta = (m.version, m.kind, m.pkey, m.vid, m.reserved, m.vif_id, m.dest_id, bytes(m.dest)) if m else ("no meta",)
    return Outcome(res.retval, 0, res.frame, meta)


def rx_expected(frame: bytes, t: oracle.Tables, src, vif, pkey: int, multicast: bool) -> Outcome:
    """The oracle's decision for an RX frame (control frames are passed on untouched by BPF)."""
    try:
        r = oracle.ipoib_to_eth(frame, t, src=src, vif=vif, pkey=pkey, multicast=multicast)
    except FrameError as e:
        if e.reason == DropReason.BAD_DHCP:
            return Outcome(XdpAction.PASS, 0, frame)
        return Outcome(XdpAction.DROP, int(e.reason))
    if r.control:
        return Outcome(XdpAction.PASS, 0, frame)
    return Outcome(XdpAction.REDIRECT, 0, r.frame)


def rx_actual(dp, frame: bytes, meta: bytes) -> Outcome:
    """Run the RX program on a frame with its metadata."""
    res = testrun.run(dp.fd("xdpoib_rx"), frame, meta)
    return Outcome(res.retval, 0, res.frame if res.retval != XdpAction.DROP else b"")


def compare(what: str, frame: bytes, want: Outcome, got: Outcome, last_drop: int | None,
            ipoib_in: bool = False) -> str | None:
    """Return a readable mismatch report, or None when BPF agrees with the oracle."""
    problems = []
    if want.verdict != got.verdict:
        problems.append(f"verdict: oracle {XdpAction(want.verdict).name}, bpf {XdpAction(got.verdict).name}")
    elif want.verdict == XdpAction.DROP:
        if last_drop != want.reason:
            name = DropReason(last_drop).name if last_drop in DropReason._value2member_map_ else last_drop
            problems.append(f"drop reason: oracle {DropReason(want.reason).name}, bpf {name}")
    else:
        if want.frame != got.frame:
            problems.append("output frame differs")
        if want.meta and want.meta != got.meta:
            problems.append(f"metadata: oracle {want.meta}, bpf {got.meta}")
    if not problems:
        return None
    out_ipoib = not ipoib_in
    lines = [f"{what}: " + "; ".join(problems),
             f"input  {summary(frame, ipoib_in)}", hexdump(frame)]
    if want.frame or got.frame:
        lines += [f"oracle {summary(want.frame, out_ipoib)}", hexdump(want.frame),
                  f"bpf    {summary(got.frame, out_ipoib)}", hexdump(got.frame)]
    return "\n".join(lines)


class DropWatcher:
    """Tells which drop reason the last run counted, from the per-CPU counters."""

    def __init__(self, maps, direction: abi.Direction):
        self.maps, self.direction = maps, direction
        self.prev = list(maps.counters(direction).drops)

    def last(self) -> int | None:
        """Return the reason whose counter moved since the previous call (None if none did)."""
        now = list(self.maps.counters(self.direction).drops)
        moved = [i for i, (a, b) in enumerate(zip(self.prev, now, strict=True)) if a != b]
        self.prev = now
        return moved[0] if len(moved) == 1 else None
