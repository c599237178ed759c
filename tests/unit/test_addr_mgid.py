"""Golden vectors of docs/design.md §2 and 3.2-3.4: LEMAC, REMAC, IPoIB addresses, MGIDs, broadcast address."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdpoib.errors import AddressError
from xdpoib.wire.addr import (
    MAC_FORMS,
    IPoIBAddr,
    RemacCollision,
    RemacTable,
    gid_str,
    is_local_mac,
    is_multicast_mac,
    lemac,
    mac_str,
    mlx_eth_addr,
    parse_gid,
    parse_guid,
    parse_ipoib_addr,
    parse_mac,
    port_mac,
    remac,
)
from xdpoib.wire.mgid import (
    broadcast_addr,
    broadcast_mgid,
    full_pkey,
    ipv4_mgid,
    ipv6_mgid,
    mgid_pkey,
    mgid_scope,
    parse_pkey,
)

GUID = parse_guid("f4:52:14:03:00:8d:52:11")
GID = parse_gid("fe80::f452:1403:8d:5211")


# --- docs/design.md §2: LEMAC -------------------------------------------------------------------------------

def test_lemac_default_mask_takes_bytes_012567():
    assert mac_str(lemac(GUID)) == "f4:52:14:8d:52:11"


def test_lemac_other_mask_selects_other_bytes():
    assert lemac(GUID, mask=0xFC) == bytes.fromhex("f4521403008d")


@pytest.mark.parametrize("mask", [0xFF, 0xE0, 0x100, -1])
def test_lemac_mask_must_select_six_bytes(mask):
    with pytest.raises(AddressError):
        lemac(GUID, mask)


def test_guid_forms_agree():
    assert parse_guid("0xf4521403008d5211") == GUID
    assert parse_guid("f452:1403:008d:5211") == GUID
    assert parse_guid(0xF4521403008D5211) == GUID


def test_mlx_eth_addr_follows_gpxe():
    # byte 0 is 00 when GUID byte 3 is 2, else 02; then bytes 1, 2, 5, 6, 7
    assert mac_str(mlx_eth_addr(parse_guid("00:02:c9:02:00:0a:0b:0c"))) == "00:02:c9:0a:0b:0c"
    assert mac_str(mlx_eth_addr(parse_guid("00:02:c9:03:00:0a:0b:0c"))) == "02:02:c9:0a:0b:0c"


def test_port_mac_forms():
    """`attach --mac-form`: the LEMAC by default, the Mellanox form on request, nothing else."""
    assert port_mac(GUID) == port_mac(GUID, "lemac") == lemac(GUID)
    assert port_mac(GUID, "mellanox") == mlx_eth_addr(GUID)
    assert mac_str(port_mac(GUID, "mellanox")) == "02:52:14:8d:52:11"        # GUID f4:52:14:03:00:8d:52:11
    assert set(MAC_FORMS) == {"lemac", "mellanox"}
    with pytest.raises(AddressError, match="unknown MAC form"):
        port_mac(GUID, "eui48")


# --- docs/design.md §2: REMAC -------------------------------------------------------------------------------

@given(st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFFFF))
def test_remac_is_local_unicast_and_stable(gid, qpn):
    mac = remac(gid, qpn)
    assert is_local_mac(mac) and not is_multicast_mac(mac)
    assert remac(gid, qpn) == mac
    assert remac(gid, qpn, salt=1) != mac


def test_remac_does_not_depend_on_lid_and_differs_per_qpn():
    # the LID is no input at all: the same (GID, QPN) gives the same REMAC whatever the SM assigns
    assert remac(GID, 0x48) != remac(GID, 0x49)
    assert remac(GID, 0x48) != remac(parse_gid("fe80::f452:1403:8d:5212"), 0x48)


def test_remac_table_detects_collision_and_moves_newcomer():
    first = remac(GID, 0x48)
    t = RemacTable(reserved={first})          # pretend a local VIF already holds it
    assert t.collides(GID, 0x48)
    mac = t.assign(GID, 0x48)
    assert mac == remac(GID, 0x48, salt=1) and mac != first
    assert t.assign(GID, 0x48) == mac          # stable once assigned
    assert t.lookup(mac) == (GID, 0x48)
    again = RemacTable.from_json(t.to_json())
    assert again.assign(GID, 0x48) == mac      # persisted assignment survives a restart


def test_remac_table_exhaustion_is_an_error():
    t = RemacTable(reserved={remac(GID, 1, s) for s in range(2)}, max_salt=2)
    with pytest.raises(RemacCollision):
        t.assign(GID, 1)


# --- docs/design.md §3.2: the 20-byte hardware address ------------------------------------------------------

def test_ipoib_addr_layout_and_text_forms():
    a = IPoIBAddr(0x80, 0x000048, parse_gid("fe80::2:c903:a:b0c"))
    raw = a.pack()
    assert len(raw) == 20 and raw[0] == 0x80 and raw[1:4] == b"\x00\x00\x48" and raw[4:] == a.gid
    assert a.ntoa() == "80000048:fe800000:00000000:0002c903:000a0b0c"
    assert a.colon_hex() == "80:00:00:48:fe:80:00:00:00:00:00:00:00:02:c9:03:00:0a:0b:0c"
    assert parse_ipoib_addr(a.ntoa()) == a == parse_ipoib_addr(a.colon_hex())
    assert a.key == (0x48, a.gid)


@given(st.integers(0, 255), st.integers(0, 0xFFFFFF), st.binary(min_size=16, max_size=16))
def test_ipoib_addr_roundtrip(flags, qpn, gid):
    a = IPoIBAddr(flags, qpn, gid)
    assert IPoIBAddr.unpack(a.pack()) == a
    assert parse_ipoib_addr(a.ntoa()) == a
    assert parse_ipoib_addr(str(a)) == a


@pytest.mark.parametrize("text", ["", "80000048", "zz:00", "80000048:fe800000:00000000:0002c903"])
def test_bad_address_text_is_one_clear_error(text):
    with pytest.raises(AddressError):
        parse_ipoib_addr(text)


@pytest.mark.parametrize("fn,text", [(parse_mac, "aa:bb"), (parse_mac, "gg:00:00:00:00:00"),
                                     (parse_gid, "not-a-gid"), (parse_guid, "0xzz")])
def test_bad_text_addresses(fn, text):
    with pytest.raises(AddressError):
        fn(text)


def test_gid_str_is_compressed_as_saquery_and_ip_print_it():
    assert gid_str(GID) == "fe80::f452:1403:8d:5211"
    assert gid_str(bytes(16)) == "::" and gid_str(bytearray(GID)) == gid_str(memoryview(GID))
    assert parse_gid(gid_str(GID)) == GID
    with pytest.raises(AddressError):
        gid_str(GID[:8])


# --- docs/design.md §3.3 and 3.4: broadcast address and MGIDs -----------------------------------------------

def test_broadcast_address_as_ip_link_prints_it():
    assert str(broadcast_addr()) == "00:ff:ff:ff:ff:12:40:1b:ff:ff:00:00:00:00:00:00:ff:ff:ff:ff"


def test_broadcast_mgid_carries_pkey_with_full_member_bit_and_scope():
    assert gid_str(broadcast_mgid(0x8003)) == "ff12:401b:8003::ffff:ffff"
    assert broadcast_mgid(0x0003) == broadcast_mgid(0x8003)        # full-member bit forced
    assert gid_str(broadcast_mgid(0xFFFF, scope=5)) == "ff15:401b:ffff::ffff:ffff"
    assert mgid_pkey(broadcast_mgid(0x7FFF)) == 0xFFFF
    assert mgid_scope(broadcast_mgid(scope=8)) == 8


@pytest.mark.parametrize("group,mgid", [
    ("224.0.0.251", "ff12:401b:ffff::fb"),
    ("239.255.255.250", "ff12:401b:ffff::fff:fffa"),
    ("224.0.0.1", "ff12:401b:ffff::1"),
])
def test_ipv4_mgid_golden(group, mgid):
    assert ipv4_mgid(group) == parse_gid(mgid)


def test_ipv6_mgid_golden():
    assert ipv6_mgid("ff02::1:ff12:3456") == parse_gid("ff12:601b:ffff:0:0:1:ff12:3456")
    assert ipv6_mgid("ff02::1", pkey=0x8003, scope=2) == parse_gid("ff12:601b:8003::1")


def test_mgid_from_unicast_ip_is_refused():
    with pytest.raises(AddressError):
        ipv4_mgid("10.0.0.1")
    with pytest.raises(AddressError):
        ipv6_mgid("fe80::1")


@pytest.mark.parametrize("bad", [0x0000, 0x8000, 0x10000, -1])
def test_invalid_pkeys_refused(bad):
    with pytest.raises(AddressError):
        full_pkey(bad)


def test_parse_pkey_forces_full_member():
    assert parse_pkey("0x0003") == 0x8003 and parse_pkey("ffff") == 0xFFFF
    with pytest.raises(AddressError):
        parse_pkey("0x8000")
    with pytest.raises(AddressError):
        parse_pkey("zzz")
