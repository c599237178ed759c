"""Multicast GIDs for IPoIB (RFC 4391 section 4) and the broadcast hardware address.

MGIDs come from the IP destination, never from a multicast MAC (which has lost bits). The scope nibble
and the P_Key come from the broadcast group of the partition; the P_Key's full-member bit is forced,
as Linux ipoib does.
"""

from __future__ import annotations

import ipaddress

from xdpoib.errors import AddressError
from xdpoib.wire.addr import MCAST_QPN, IPoIBAddr

#: The IPoIB signatures in MGID bytes 2-3.
IPV4_SIGNATURE = 0x401B
IPV6_SIGNATURE = 0x601B
#: Link-local scope, what Linux ipoib's broadcast group uses unless configured otherwise.
SCOPE_LINK = 0x2
DEFAULT_PKEY = 0xFFFF


def full_pkey(pkey: int) -> int:
    """Return the P_Key with the full-member bit (0x8000) forced; refuse the invalid ones.

    @v pkey  16-bit partition key
    @ret     pkey | 0x8000; AddressError for 0x0000/0x8000 (the invalid P_Key) or out of range
    """
    if not 0 <= pkey <= 0xFFFF:
        raise AddressError(f"P_Key out of range: {pkey:#x}")
    if pkey & 0x7FFF == 0:
        raise AddressError(f"P_Key {pkey:#06x} is the invalid partition")
    return pkey | 0x8000


def parse_pkey(text: str | int) -> int:
    """Parse a P_Key (`0x8003`, `8003` hex, or an int) and force the full-member bit."""
    if isinstance(text, int):
        return full_pkey(text)
    try:
        value = int(text, 16)
    except ValueError:
        raise AddressError(f"not a P_Key: {text!r} (expected hex such as 0xffff or 0x8003)") from None
    return full_pkey(value)


def _prefix(signature: int, pkey: int, scope: int) -> bytes:
    if not 0 <= scope <= 0xF:
        raise AddressError(f"multicast scope is a nibble, got {scope}")
    return bytes([0xFF, 0x10 | scope]) + signature.to_bytes(2, "big") + full_pkey(pkey).to_bytes(2, "big")


def broadcast_mgid(pkey: int = DEFAULT_PKEY, scope: int = SCOPE_LINK) -> bytes:
    """Return the IPv4 broadcast group's MGID: `ff1S:401b:PPPP::ffff:ffff`.

    @v pkey   partition (full-member bit forced)
    @v scope  scope nibble (2 = link-local)
    @ret      16 bytes
    """
    return _prefix(IPV4_SIGNATURE, pkey, scope) + b"\x00" * 6 + b"\xff" * 4


def broadcast_addr(pkey: int = DEFAULT_PKEY, scope: int = SCOPE_LINK) -> IPoIBAddr:
    """Return the IPoIB broadcast hardware address `00:ff:ff:ff` + broadcast MGID."""
    return IPoIBAddr(0x00, MCAST_QPN, broadcast_mgid(pkey, scope))


def ipv4_mgid(group: bytes | str, pkey: int = DEFAULT_PKEY, scope: int = SCOPE_LINK) -> bytes:
    """Return the MGID of an IPv4 multicast group: `ff1S:401b:PPPP::` + the low 28 bits.

    @v group  4-byte or dotted IPv4 multicast address (224.0.0.0/4)
    @ret      16 bytes; AddressError if the address is not multicast
    """
    addr = _ip(group, 4)
    if addr[0] & 0xF0 != 0xE0:
        raise AddressError(f"{ipaddress.IPv4Address(addr)} is not an IPv4 multicast address")
    return _prefix(IPV4_SIGNATURE, pkey, scope) + b"\x00" * 6 + bytes([addr[0] & 0x0F]) + addr[1:]


def ipv6_mgid(group: bytes | str, pkey: int = DEFAULT_PKEY, scope: int = SCOPE_LINK) -> bytes:
    """Return the MGID of an IPv6 multicast group: `ff1S:601b:PPPP` + the low 80 bits.

    @v group  16-byte or textual IPv6 multicast address (ff00::/8)
    @ret      16 bytes; AddressError if the address is not multicast
    """
    addr = _ip(group, 16)
    if addr[0] != 0xFF:
        raise AddressError(f"{ipaddress.IPv6Address(addr)} is not an IPv6 multicast address")
    return _prefix(IPV6_SIGNATURE, pkey, scope) + addr[6:]


def mgid_pkey(mgid: bytes) -> int:
    """Return the P_Key carried in an IPoIB MGID (bytes 4-5)."""
    return int.from_bytes(mgid[4:6], "big")


def mgid_scope(mgid: bytes) -> int:
    """Return the scope nibble of an MGID."""
    return mgid[1] & 0x0F


def _ip(value: bytes | str, size: int) -> bytes:
    if isinstance(value, str):
        try:
            value = ipaddress.ip_address(value).packed
        except ValueError:
            raise AddressError(f"not an IP address: {value!r}") from None
    if len(value) != size:
        raise AddressError(f"expected a {size}-byte IP address, got {len(value)} bytes")
    return bytes(value)
