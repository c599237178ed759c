"""AF_XDP from pure Python (xdpoib.afxdp) on a real veth pair: an XDP program redirects frames into
the socket with an 8-byte metadata record in front, and frames the socket transmits reach the peer."""

import ctypes
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from prereq import need_module, need_root

XDP_PROG = r"""
BPF_XSKMAP(xsks, 4);
BPF_ARRAY(seen, u64, 1);

int to_xsk(struct xdp_md *ctx) {
    int zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    if (bpf_xdp_adjust_meta(ctx, -8))
        return XDP_PASS;
    void *data = (void *)(long)ctx->data;
    u64 *meta = (void *)(long)ctx->data_meta;
    if ((void *)(meta + 1) > data)
        return XDP_PASS;
    *meta = 0x58504f4900000000ULL | (n ? *n : 0);   /* magic in the high half, packet count low */
    return xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
}
"""


@pytest.fixture
def veth():
    need_root()
    tag = uuid.uuid4().hex[:6]
    a, b = f"xska{tag}", f"xskb{tag}"
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    try:
        for dev in (a, b):   # no IPv6 autoconf chatter on the test link
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"], check=True)
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        yield a, b
    finally:
        subprocess.run(["ip", "link", "del", a], check=False)


def _raw_frame(i: int, dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + i.to_bytes(4, "big") + bytes(50)


def test_rx_with_metadata_and_tx(veth):
    need_module("bcc")
    from bcc import BPF

    from xdpoib.afxdp import XskSocket

    a, b = veth
    ifindex = socket.if_nametoindex(a)
    bpf = BPF(text=XDP_PROG.encode())
    fn = bpf.load_func(b"to_xsk", BPF.XDP)
    bpf.attach_xdp(a.encode(), fn, 0)
    xsk = XskSocket(ifindex, 0, frames=512, ring_size=256, meta_len=8)
    try:
        bpf[b"xsks"][ctypes.c_int(0)] = ctypes.c_int(xsk.fileno())
        src_mac = bytes.fromhex("020000000001")
        dst_mac = bytes.fromhex(Path(f"/sys/class/net/{a}/address").read_text().strip().replace(":", ""))
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        tx.bind((b, 0))
        sent = [_raw_frame(i, dst_mac, src_mac) for i in range(100)]
        for fr in sent:
            tx.send(fr)
        got, deadline = [], time.monotonic() + 5
        while len(got) < len(sent) and time.monotonic() < deadline:
            got += xsk.recv(64, timeout=0.2)
        ours = [(m, fr) for m, fr in got if fr[12:14] == b"\x88\xb5"]
        assert [fr for _, fr in ours] == sent
        metas = [int.from_bytes(m, "little") for m, _ in ours]
        assert all(m >> 32 == 0x58504F49 for m in metas)        # the record the program wrote
        counts = [m & 0xFFFFFFFF for m in metas]
        assert counts == sorted(counts) and len(set(counts)) == 100   # one per frame, in order

        # TX: frames from the socket arrive on the peer
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        rx.bind((b, 0))
        rx.settimeout(2)
        out = [_raw_frame(1000 + i, src_mac, dst_mac) for i in range(32)]
        assert xsk.send(out) == 32
        seen = []
        deadline = time.monotonic() + 5
        while len(seen) < 32 and time.monotonic() < deadline:
            try:
                seen.append(rx.recv(2048))
            except TimeoutError:
                xsk.kick()
        assert seen == out
        assert xsk.kernel_stats()["rx_invalid_descs"] == 0
    finally:
        xsk.close()
        bpf.remove_xdp(a.encode(), 0)
        bpf.cleanup()
    assert os.path.exists(f"/sys/class/net/{a}")


def test_a_socket_bound_right_after_the_queues_last_one_closed_waits_for_the_queue(veth):
    """The kernel lets go of a closed socket's queue in deferred work, so a bind right after the close is
    refused (EBUSY) for a while: a new socket (what a TAP's switch to the translating datapath makes the
    moment the plain one closes) waits for the queue instead of failing; one that finds the queue held
    by a live socket still fails, in one line and after the wait."""
    from xdpoib.afxdp import XskError, XskSocket

    ifindex = socket.if_nametoindex(veth[0])
    xsk = XskSocket(ifindex, 0, frames=64, ring_size=64)
    waited = []
    try:
        for _ in range(20):
            xsk.close()
            t0 = time.monotonic()
            xsk = XskSocket(ifindex, 0, frames=64, ring_size=64)
            waited.append(time.monotonic() - t0)
        assert xsk.bound
        # without the wait the kernel refuses a bind made at once after the close
        xsk.close()
        with pytest.raises(XskError, match="busy"):
            XskSocket(ifindex, 0, frames=64, ring_size=64, bind_wait=0.0)
        xsk = XskSocket(ifindex, 0, frames=64, ring_size=64)
        # a queue held by a live socket: refused after the wait, saying so
        t0 = time.monotonic()
        with pytest.raises(XskError, match=r"busy for 0.3 s \(another AF_XDP socket holds the queue\)"):
            XskSocket(ifindex, 0, frames=64, ring_size=64, bind_wait=0.3)
        assert time.monotonic() - t0 >= 0.3
    finally:
        xsk.close()
    print(f"rebinds waited {min(waited) * 1e3:.1f}-{max(waited) * 1e3:.1f} ms for the queue")
