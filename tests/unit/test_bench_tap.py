"""`xdpoib bench tap`'s pure parts: the frames the writer writes are what their vnet headers say (a
complete frame verifies, a partial one does not until the host completes it, a TSO super-frame is 44
segments' worth), the check behind the hop tells them apart, and bad settings are refused."""

from __future__ import annotations

import struct

import pytest

from xdpoib.bench import tap as bt
from xdpoib.errors import UsageError


def frame(kind: str) -> tuple[tuple, bytes]:
    buf = bt.write_buffer(kind)
    return bt.VNET.unpack_from(buf), buf[bt.VNET.size:]


def test_complete_frames_verify():
    hdr, f = frame("complete")
    assert hdr == (0, bt.GSO_NONE, 0, 0, 0, 0)
    assert len(f) == bt.FRAME and bt.frame_problem(f) is None


def test_partial_frames_need_the_host():
    hdr, f = frame("partial")
    assert hdr[0] == bt.VIRTIO_NET_HDR_F_NEEDS_CSUM and (hdr[4], hdr[5]) == (34, 16)
    assert len(f) == bt.FRAME and bt.frame_problem(f) == "bad TCP checksum"


def test_tso_super_frames_are_oversize_and_segment_into_mtu_frames():
    hdr, f = frame("tso")
    assert hdr[1] == bt.GSO_TCPV4 and hdr[3] == bt.MSS and hdr[2] == 54
    assert len(f) == 54 + bt.MSS * bt.TSO_SEGMENTS and struct.unpack_from("!H", f, 16)[0] <= 65535
    assert bt.frame_problem(f).startswith(f"{len(f)} bytes")


def test_a_corrupted_ip_header_is_caught():
    _, f = frame("complete")
    bad = f[:22] + bytes([f[22] ^ 1]) + f[23:]        # the TTL
    assert bt.frame_problem(bad) == "bad IPv4 header checksum"


@pytest.mark.parametrize("seconds,rounds,msg", [(0, 3, "--seconds"), (0.05, 3, "--seconds"),
                                                (float("nan"), 3, "--seconds"), (3, 0, "--rounds")])
def test_bad_settings_are_refused(seconds, rounds, msg):
    with pytest.raises(UsageError, match=msg):
        bt.check_settings(seconds, rounds)


def test_the_table_has_every_path_and_ratio():
    paths = {key: {"label": label, "unit": "segments" if kind == "tso" else "frames", "per_s": 1e5 * (i + 1),
                   "cpu_us": 1.0 + i, "rate_vs_tap": i + 1.0, "cpu_vs_tap": 1.0 + i, "writes": 1, "counted": 1,
                   "oversize": 0}
             for i, (key, label, kind, _where) in enumerate(bt.PATHS)}
    res = {"seconds": 3.0, "rounds": 3, "frame_bytes": 1514, "tso_segments": 44, "paths": paths,
           "checks": {"hop_complete": [], "hop_partial": [], "hop_tso": ["2 of 132 frames arrived"]}}
    text = bt.format_table(res)
    assert text.count("\n| ") == 1 + len(bt.PATHS) and "baseline" in text and "4.00x, 4.00x" in text
    assert "2 of 132 frames arrived" in text
