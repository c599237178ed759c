"""Addresses on both sides: MACs, GIDs, the 20-byte IPoIB hardware address, LEMAC and REMAC.

All values are `bytes` (MAC 6, GUID 8, GID 16) or small immutable records; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import NamedTuple

from xdpoib.errors import AddressError
from xdpoib.fabric.base import gid_str

MAC_LEN = 6
GUID_LEN = 8
GID_LEN = 16
IPOIB_ALEN = 20

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6

#: Flags byte of an IPoIB hardware address: the peer can do connected mode (we never set it).
IPOIB_FLAG_CM = 0x80
#: The QPN of every multicast IPoIB hardware address.
MCAST_QPN = 0xFFFFFF


# ---------------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------------

def mac_str(mac: bytes) -> str:
    """Format a MAC as `aa:bb:cc:dd:ee:ff`.

    @v mac  6 bytes
    @ret    the lower-case colon form
    """
    if len(mac) != MAC_LEN:
        raise AddressError(f"a MAC is 6 bytes, got {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """Parse `aa:bb:cc:dd:ee:ff` (or with dashes) into 6 bytes.

    @v text  the textual MAC
    @ret     6 bytes; AddressError if it is not a MAC
    """
    return _parse_hex_groups(text, MAC_LEN, "MAC")


def is_multicast_mac(mac: bytes) -> bool:
    """Return whether the I/G bit is set (multicast or broadcast)."""
    return bool(mac[0] & 0x01)


def is_local_mac(mac: bytes) -> bool:
    """Return whether the U/L bit is set (locally administered)."""
    return bool(mac[0] & 0x02)


def _parse_hex_groups(text: str, size: int, what: str) -> bytes:
    parts = text.strip().replace("-", ":").split(":")
    try:
        if len(parts) != size or any(len(p) not in (1, 2) for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise AddressError(f"not a {what}: {text!r} (expected {size} colon-separated hex bytes)") from None


# ---------------------------------------------------------------------------------------------------
# GUIDs and GIDs
# ---------------------------------------------------------------------------------------------------

def parse_guid(text: str | int) -> bytes:
    """Parse a port GUID: an int or `0xf45214030008d5211`-style hex, `f452:1403:008d:5211` or colon bytes.

    @v text  an int, `0x...` hex, four 16-bit groups, or eight colon-separated bytes
    @ret     8 bytes
    """
    if isinstance(text, int):
        if not 0 <= text < 1 << 64:
            raise AddressError(f"GUID out of range: {text:#x}")
        return text.to_bytes(8, "big")
    s = text.strip().lower()
    if s.startswith("0x"):
        try:
            return parse_guid(int(s, 16))
        except ValueError:
            raise AddressError(f"not a GUID: {text!r}") from None
    groups = s.split(":")
    if len(groups) == 4 and all(1 <= len(g) <= 4 for g in groups):
        try:
            return b"".join(int(g, 16).to_bytes(2, "big") for g in groups)
        except ValueError:
            pass
    return _parse_hex_groups(s, GUID_LEN, "GUID")


def guid_str(guid: bytes) -> str:
    """Format a GUID the way ibstat prints it: `0xf4521403008d5211`."""
    if len(guid) != GUID_LEN:
        raise AddressError(f"a GUID is 8 bytes, got {len(guid)}")
    return "0x" + guid.hex()


def parse_gid(text: str) -> bytes:
    """Parse a GID in IPv6 notation (`fe80::f452:1403:8d:5211`) into 16 bytes."""
    try:
        return ipaddress.IPv6Address(text.strip()).packed
    except ValueError:
        raise AddressError(f"not a GID: {text!r}") from None


# `gid_str(gid)`, a GID as people read it (compressed IPv6 text, as saquery and `ip` print it), is the
# fabric layer's: it lives in `xdpoib.fabric.base` (standard library only), because the fabric must not
# import this package (the native peer stands on the fabric and shares no code with the translator).


def make_gid(prefix: bytes | int, guid: bytes) -> bytes:
    """Build a port GID from a subnet prefix (8 bytes or int) and a port GUID."""
    if isinstance(prefix, int):
        prefix = prefix.to_bytes(8, "big")
    if len(prefix) != 8 or len(guid) != GUID_LEN:
        raise AddressError("a GID is an 8-byte prefix and an 8-byte GUID")
    return bytes(prefix) + bytes(guid)


# ---------------------------------------------------------------------------------------------------
# The 20-byte IPoIB hardware address (RFC 4391 section 9.1.1)
# ---------------------------------------------------------------------------------------------------

class IPoIBAddr(NamedTuple):
    """An IPoIB hardware address: flags (1 byte), QPN (24 bits), GID (16 bytes)."""

    flags: int
    qpn: int
    gid: bytes

    def pack(self) -> bytes:
        """Return the 20-byte wire form."""
        if not 0 <= self.flags <= 0xFF or not 0 <= self.qpn <= 0xFFFFFF or len(self.gid) != GID_LEN:
            raise AddressError(f"bad IPoIB address fields: flags={self.flags} qpn={self.qpn}")
        return bytes([self.flags]) + self.qpn.to_bytes(3, "big") + bytes(self.gid)

    @classmethod
    def unpack(cls, raw: bytes) -> IPoIBAddr:
        """Parse the 20-byte wire form."""
        if len(raw) != IPOIB_ALEN:
            raise AddressError(f"an IPoIB address is 20 bytes, got {len(raw)}")
        return cls(raw[0], int.from_bytes(raw[1:4], "big"), bytes(raw[4:20]))

    @property
    def key(self) -> tuple[int, bytes]:
        """(QPN, GID): what identifies a peer; the flags byte is only a capability hint."""
        return (self.qpn, self.gid)

    def ntoa(self) -> str:
        """Return the textual form of gPXE's `ipoib_ntoa`: five 32-bit words in hex, colon-separated."""
        raw = self.pack()
        return ":".join(raw[i:i + 4].hex() for i in range(0, 20, 4))

    def colon_hex(self) -> str:
        """Return the form `ip link` prints for an ipoib device: 20 colon-separated bytes."""
        return ":".join(f"{b:02x}" for b in self.pack())

    def __str__(self) -> str:
        return self.colon_hex()


def parse_ipoib_addr(text: str) -> IPoIBAddr:
    """Parse either textual form (`ipoib_ntoa`'s five words or `ip link`'s 20 bytes)."""
    parts = text.strip().split(":")
    try:
        if len(parts) == 5 and all(len(p) == 8 for p in parts):
            return IPoIBAddr.unpack(bytes.fromhex("".join(parts)))
        if len(parts) == IPOIB_ALEN and all(1 <= len(p) <= 2 for p in parts):
            return IPoIBAddr.unpack(bytes(int(p, 16) for p in parts))
    except ValueError:
        pass
    raise AddressError(f"not an IPoIB hardware address: {text!r}")


# ---------------------------------------------------------------------------------------------------
# Ethernet addresses for InfiniBand ports and peers
# ---------------------------------------------------------------------------------------------------

def lemac(guid: bytes, mask: int = 0xE7) -> bytes:
    """Derive the local Ethernet MAC (LEMAC) of a port from its GUID, as eIPoIB does.

    The mask selects six of the GUID's eight bytes, bit 7 standing for byte 0: the default 0xe7 takes
    bytes 0, 1, 2, 5, 6, 7 (the OUI and the low 24 bits), dropping the 0x03:0x00 EUI-64 filler.

    @v guid  8-byte port GUID
    @v mask  byte-selection mask with exactly six bits set
    @ret     6-byte MAC
    """
    if len(guid) != GUID_LEN:
        raise AddressError(f"a GUID is 8 bytes, got {len(guid)}")
    if not 0 <= mask <= 0xFF or bin(mask).count("1") != 6:
        raise AddressError(f"LEMAC mask must select exactly six GUID bytes, got {mask:#x}")
    return bytes(guid[i] for i in range(8) if mask & (0x80 >> i))


def mlx_eth_addr(guid: bytes) -> bytes:
    """Derive the Mellanox-compatible compressed Ethernet address of gPXE's `ipoib_mlx_eth_addr`.

    Byte 0 is 0x00 when GUID byte 3 is 2 and 0x02 (locally administered) otherwise; then GUID bytes
    1, 2, 5, 6, 7. gPXE applies it to GUIDs whose bytes 1-2 are Mellanox's 02:c9; here it applies to any.

    @v guid  8-byte port GUID
    @ret     6-byte MAC
    """
    if len(guid) != GUID_LEN:
        raise AddressError(f"a GUID is 8 bytes, got {len(guid)}")
    return bytes([0x00 if guid[3] == 2 else 0x02, guid[1], guid[2], guid[5], guid[6], guid[7]])


#: The forms of a port's own Ethernet MAC (`xdpoib attach --mac-form`): eIPoIB's LEMAC (the default)
#: and the Mellanox form of gPXE/iPXE.
MAC_FORMS = {"lemac": lemac, "mellanox": mlx_eth_addr}


def port_mac(guid: bytes, form: str = "lemac") -> bytes:
    """The Ethernet MAC of a port (eth4's) from its GUID, in one of `MAC_FORMS`.

    @v guid  8-byte port GUID
    @v form  "lemac" (bytes 0, 1, 2, 5, 6, 7) or "mellanox" (`mlx_eth_addr`)
    @ret     6-byte MAC
    """
    derive = MAC_FORMS.get(form)
    if derive is None:
        raise AddressError(f"unknown MAC form {form!r} (known: {', '.join(MAC_FORMS)})")
    return derive(guid)


def remac(gid: bytes, qpn: int, salt: int = 0) -> bytes:
    """Derive the REMAC: the Ethernet address standing for one remote (GID, QPN).

    Locally administered unicast (byte 0 = xxxxxx10), the other 46 bits from BLAKE2b over the GID, QPN
    and salt, so it is stable across LID changes and restarts. Two peers may collide: `RemacTable`
    detects it and moves the newcomer to the next salt.

    @v gid   16-byte port GID of the peer
    @v qpn   its QPN
    @v salt  0 normally; bumped by RemacTable on a collision
    @ret     6-byte MAC
    """
    if len(gid) != GID_LEN or not 0 <= qpn <= 0xFFFFFF:
        raise AddressError("REMAC needs a 16-byte GID and a 24-bit QPN")
    h = hashlib.blake2b(bytes(gid) + qpn.to_bytes(3, "big") + salt.to_bytes(4, "big"),
                        digest_size=6, person=b"xdpoib-remac").digest()
    return bytes([(h[0] & 0xFC) | 0x02]) + h[1:]


class RemacCollision(AddressError):
    """Two different (GID, QPN) pairs derived the same REMAC."""


class RemacTable:
    """REMAC assignments for the peers of one attachment, collision-checked and persistable."""

    def __init__(self, reserved: set[bytes] | None = None, max_salt: int = 16):
        self._by_key: dict[tuple[bytes, int], bytes] = {}
        self._by_mac: dict[bytes, tuple[bytes, int]] = {}
        self._reserved = set(reserved or ())
        self._max_salt = max_salt

    def assign(self, gid: bytes, qpn: int) -> bytes:
        """Return the REMAC of (GID, QPN), assigning one on first sight.

        A derived REMAC already held by another peer (or reserved, e.g. a local VIF MAC) is a
        collision: the next salt is tried, so the newcomer gets a different, still stable address.
        """
        key = (bytes(gid), qpn)
        if key in self._by_key:
            return self._by_key[key]
        for salt in range(self._max_salt):
            mac = remac(gid, qpn, salt)
            if mac not in self._by_mac and mac not in self._reserved:
                self._by_key[key] = mac
                self._by_mac[mac] = key
                return mac
        raise RemacCollision(f"no free REMAC for {gid_str(gid)} qpn {qpn:#x} after {self._max_salt} salts")

    def collides(self, gid: bytes, qpn: int, salt: int = 0) -> bool:
        """Return whether the salt-th REMAC of (GID, QPN) is held by someone else."""
        mac = remac(gid, qpn, salt)
        holder = self._by_mac.get(mac)
        return mac in self._reserved or (holder is not None and holder != (bytes(gid), qpn))

    def lookup(self, mac: bytes) -> tuple[bytes, int] | None:
        """Return the (GID, QPN) behind a REMAC, or None."""
        return self._by_mac.get(bytes(mac))

    def forget(self, gid: bytes, qpn: int) -> None:
        """Release a peer's REMAC."""
        mac = self._by_key.pop((bytes(gid), qpn), None)
        if mac is not None:
            del self._by_mac[mac]

    def __len__(self) -> int:
        return len(self._by_key)

    def to_json(self) -> list[dict]:
        """Return a JSON-able list, for the state file."""
        return [{"gid": gid_str(g), "qpn": q, "remac": mac_str(m)} for (g, q), m in self._by_key.items()]

    @classmethod
    def from_json(cls, items: list[dict], reserved: set[bytes] | None = None) -> RemacTable:
        """Rebuild a table from `to_json` output, keeping every stored assignment as it was."""
        t = cls(reserved)
        for it in items:
            key = (parse_gid(it["gid"]), int(it["qpn"]))
            mac = parse_mac(it["remac"])
            if mac in t._by_mac:
                raise RemacCollision(f"state file assigns {it['remac']} twice")
            t._by_key[key] = mac
            t._by_mac[mac] = key
        return t
