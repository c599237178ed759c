"""The pump's fast paths agree with the ABI and the wire library."""

import ctypes
import struct

from xdpoib import abi
from xdpoib.pump import _TX_META, META_LEN, _is_dhcp_reply
from xdpoib.wire import frames as f


def test_tx_meta_struct_matches_the_abi_record():
    assert _TX_META.size == META_LEN == ctypes.sizeof(abi.TxMeta)
    m = abi.TxMeta(version=abi.META_VERSION, kind=2, pkey=0x8003, vid=5, vif_id=7, dest_id=9)
    ctypes.memmove(m.dest, bytes(range(16)), 16)
    assert _TX_META.unpack(bytes(m)) == (abi.META_VERSION, 2, 0x8003, 5, 0, 7, 9, bytes(range(16)))


def test_dhcp_reply_detection():
    a, b = bytes([10, 0, 0, 1]), b"\xff" * 4
    reply = f.ipoib(f.ETH_P_IP, f.ipv4(a, b, 17, f.udp(a, b, 67, 68, bytes(240))))
    request = f.ipoib(f.ETH_P_IP, f.ipv4(a, b, 17, f.udp(a, b, 68, 67, bytes(240))))
    opts = f.ipoib(f.ETH_P_IP, f.ipv4(a, b, 17, f.udp(a, b, 67, 68, bytes(240)), options=bytes(4)))
    assert _is_dhcp_reply(reply) and _is_dhcp_reply(opts)
    assert not _is_dhcp_reply(request) and not _is_dhcp_reply(reply[:20]) and not _is_dhcp_reply(b"")
    assert not _is_dhcp_reply(struct.pack("!HH", f.ETH_P_IPV6, 0) + reply[4:])
