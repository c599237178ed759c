"""Which received frames the columnar RX path sends the slow (object) way (xdpoib/agent/forward.py,
`_slow_rows`): checked frame by frame against the rule written out in plain Python, on crafted frames
of every kind and on random ones."""

import numpy as np

from xdpoib.agent.forward import _slow_rows

AT = 40     # the GRH in front, as in a receive buffer


def slow_by_rule(p: bytes, length: int | None = None) -> bool:
    """ARP/RARP, IPv6 ND (ICMPv6 133-137), a DHCP reply (UDP 67 -> 68), IPv4 UDP with IP options, runts
    (`length` bytes; p may go on past them with stale bytes, which the rule reads like any others)."""
    if (len(p) if length is None else length) < 14:
        return True
    et = p[0:2]
    if et in (b"\x08\x06", b"\x80\x35"):
        return True
    if et == b"\x86\xdd":
        return p[10] == 58 and 133 <= p[44] <= 137
    if et == b"\x08\x00" and p[13] == 17:
        return (p[4] & 0x0F) != 5 or p[24:28] == b"\x00\x43\x00\x44"
    return False


def ipv4(proto: int, ihl: int = 5, sport: int = 5001, dport: int = 5201) -> bytes:
    ip = bytes([0x40 | ihl, 0, 0, 48, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return b"\x08\x00\x00\x00" + ip + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(24)


def ipv6(nh: int, icmp_type: int = 128) -> bytes:
    hdr = bytes([0x60, 0, 0, 0, 0, 8, nh, 255]) + bytes(32)
    return b"\x86\xdd\x00\x00" + hdr + bytes([icmp_type]) + bytes(15)


CRAFTED = [
    ipv4(17), ipv4(17, sport=67, dport=68), ipv4(17, sport=68, dport=67), ipv4(17, ihl=6), ipv4(6), ipv4(6, ihl=7),
    ipv4(1), ipv4(17, sport=67, dport=68, ihl=6),
    b"\x08\x06\x00\x00" + bytes(40), b"\x80\x35\x00\x00" + bytes(40), b"\x08\x00\x00\x00" + bytes(9),
    ipv6(58, 133), ipv6(58, 135), ipv6(58, 137), ipv6(58, 138), ipv6(58, 128), ipv6(17, 135), ipv6(6),
    b"\x88\xcc\x00\x00" + bytes(60), b"\x86\xdd\x00\x00" + bytes(10),
]


def check(frames: list[bytes]) -> None:
    rows = np.zeros((len(frames) + 3, AT + 128), np.uint8)
    rows[:] = 0xAA                  # stale bytes past each frame's end
    idx = np.arange(len(frames))[::-1] + 3          # frames out of row order, as completions come
    for i, p in zip(idx, frames, strict=True):
        rows[i, AT:AT + len(p)] = np.frombuffer(p, np.uint8)
    lengths = np.array([len(p) for p in frames], np.int64)
    got = _slow_rows(rows, idx, AT, lengths)
    want = [slow_by_rule(p + bytes([0xAA]) * 64, len(p)) for p in frames]    # the rule sees the stale bytes too
    assert got.tolist() == want, [(p[:16].hex(), g, w) for p, g, w in zip(frames, got, want, strict=True) if g != w]


def test_every_kind_of_frame():
    check(CRAFTED)
    assert sum(slow_by_rule(p) for p in CRAFTED) == 9     # the crafted set has slow and fast frames


def test_an_ipv4_only_batch_and_a_mixed_one():
    check([ipv4(17)] * 200)
    check([ipv4(17)] * 100 + [ipv4(17, sport=67, dport=68)] + [ipv4(6)] * 50)
    check([ipv4(17)] * 20 + [ipv6(58, 135)] + [b"\x08\x06\x00\x00" + bytes(40)])
    check([])


def test_random_frames():
    rng = np.random.default_rng(7)
    types = [b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x80\x35", b"\x12\x34"]
    frames = []
    for _ in range(3000):
        p = bytearray(rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes())
        if len(p) >= 2:
            p[0:2] = types[int(rng.integers(0, len(types)))]
        if len(p) > 13 and rng.random() < 0.5:
            p[13] = 17
        if len(p) > 10 and rng.random() < 0.5:
            p[10] = 58
        if len(p) > 44 and rng.random() < 0.3:
            p[44] = int(rng.integers(130, 140))
        if len(p) > 27 and rng.random() < 0.2:
            p[24:28] = b"\x00\x43\x00\x44"
        frames.append(bytes(p))
    check(frames)
