"""Pure pack/parse tests of SA MADs and records: offsets from IBA 15.2.5 and docs/design.md §4."""

from __future__ import annotations

import pickle
import struct

import pytest

from xdpoib.errors import AddressError, XdpoibError
from xdpoib.fabric import sa
from xdpoib.fabric.base import PortError
from xdpoib.fabric.sa import (
    ClassPortInfo,
    LocalPort,
    MCMemberRecord,
    PathCache,
    PathRecord,
    PortInfo,
    to_gid,
)

DGID = to_gid("fe80::f452:1403:0:201")
SGID = to_gid("fe80::f452:1403:0:101")
MGID = to_gid("ff12:401b:ffff::ffff:ffff")


def test_masks_are_the_measured_ones():
    assert sa.PR_DGID | sa.PR_SGID | sa.PR_PKEY == 0x200C
    assert sa.MC_JOIN_MASK == 0x10003
    assert sa.MC_CREATE_MASK == 0x173F7


def test_path_record_offsets_and_round_trip():
    rec = PathRecord(dgid=DGID, sgid=SGID, dlid=0x1234, slid=0x0042, flow_label=0xABCDE, hop_limit=7,
                     tclass=0x21, reversible=True, numb_path=1, pkey=0x8003, sl=5, mtu_selector=2, mtu=4,
                     rate_selector=2, rate=3, packet_life_selector=2, packet_life=18, preference=1)
    b = rec.pack()
    assert len(b) == 64
    assert b[8:24] == DGID and b[24:40] == SGID
    assert struct.unpack_from(">HH", b, 40) == (0x1234, 0x0042)
    assert struct.unpack_from(">I", b, 44)[0] == 0xABCDE << 8 | 7
    assert b[48] == 0x21 and b[49] == 0x81
    assert struct.unpack_from(">H", b, 50)[0] == 0x8003
    assert struct.unpack_from(">H", b, 52)[0] & 0xF == 5
    assert b[54] == 0x84 and b[55] == 0x83 and b[56] == 0x92 and b[57] == 1
    assert PathRecord.parse(b) == rec
    assert rec.mtu_bytes == 2048


def test_path_record_sl_is_the_low_nibble_only():
    b = bytearray(PathRecord(dgid=DGID, sgid=SGID).pack())
    struct.pack_into(">H", b, 52, 0xFFF3)          # QoSClass bits set, SL 3
    assert PathRecord.parse(bytes(b)).sl == 3


def test_mcmember_record_offsets_and_round_trip():
    rec = MCMemberRecord(mgid=MGID, port_gid=SGID, qkey=0x0B1B, mlid=0xC001, mtu_selector=2, mtu=4,
                         tclass=0x10, pkey=0xFFFF, rate_selector=2, rate=3, packet_life_selector=2,
                         packet_life=18, sl=4, flow_label=0x12345, hop_limit=9, scope=2, join_state=8,
                         proxy_join=True)
    b = rec.pack()
    assert len(b) == 52
    assert b[0:16] == MGID and b[16:32] == SGID
    assert struct.unpack_from(">IH", b, 32) == (0x0B1B, 0xC001)
    assert b[38] == 0x84 and b[39] == 0x10
    assert struct.unpack_from(">H", b, 40)[0] == 0xFFFF
    assert b[42] == 0x83 and b[43] == 0x92
    assert struct.unpack_from(">I", b, 44)[0] == (4 << 28) | (0x12345 << 8) | 9
    assert b[48] == 0x28 and b[49] == 0x80
    assert MCMemberRecord.parse(b) == rec


def test_sa_mad_header_layout():
    data = MCMemberRecord(mgid=MGID, port_gid=SGID, join_state=1).pack()
    mad = sa.pack_sa_mad(sa.METHOD_SET, sa.ATTR_MCMEMBER_RECORD, 0x1122334455667788, sa.MC_JOIN_MASK, data,
                         sm_key=1)
    assert len(mad) == 256
    assert mad[0:4] == bytes([1, 0x03, 2, 0x02])
    assert struct.unpack_from(">Q", mad, 8)[0] == 0x1122334455667788
    assert struct.unpack_from(">H", mad, 16)[0] == 0x38
    assert struct.unpack_from(">Q", mad, 36)[0] == 1              # SM_Key
    assert struct.unpack_from(">Q", mad, 48)[0] == 0x10003        # ComponentMask
    assert mad[56:56 + 52] == data                                 # record at 56
    got = sa.parse_sa_mad(mad)
    assert (got.method, got.attr_id, got.comp_mask, got.sm_key) == (0x02, 0x38, 0x10003, 1)
    assert got.data[:52] == data


def test_sa_mad_rejects_oversized_data():
    with pytest.raises(sa.SAMadError):
        sa.pack_sa_mad(sa.METHOD_GET, sa.ATTR_PATH_RECORD, 1, 0, bytes(201))


def test_smp_to_self_is_directed_route_hop_zero():
    mad = sa.pack_smp(sa.SMP_ATTR_PORT_INFO, 7, attr_mod=1)
    assert mad[0:4] == bytes([1, 0x81, 1, 0x01])
    assert mad[6:8] == b"\x00\x00"                                 # hop pointer, hop count
    assert struct.unpack_from(">QHHI", mad, 8) == (7, 0x15, 0, 1)
    assert struct.unpack_from(">HH", mad, 32) == (0xFFFF, 0xFFFF)
    resp = bytearray(mad)
    struct.pack_into(">H", resp, 4, 0x8000)                        # D bit alone: status 0
    assert sa.parse_smp(bytes(resp))[1] == 0


def test_port_info_parse():
    d = bytearray(64)
    struct.pack_into(">QHHI", d, 8, 0xFE80000000000000, 3, 1, 0x0250C048)
    d[28], d[32], d[33], d[34], d[36], d[41] = 1, 0x24, 0x50, 0x00, 0x40, 0x04
    pi = PortInfo.parse(bytes(d))
    assert (pi.gid_prefix, pi.lid, pi.sm_lid, pi.state, pi.phys_state, pi.active_mtu, pi.mtu_cap) == \
        (0xFE80000000000000, 3, 1, 4, 5, 4, 4)


def test_class_port_info_capability_mask2():
    raw = bytearray(72)
    raw[0], raw[1] = 1, 2
    struct.pack_into(">HI", raw, 2, 0x2602, (0xB5E8 << 5) | 0x10)
    cpi = ClassPortInfo.parse(bytes(raw))
    assert (cpi.capability_mask, cpi.capability_mask2, cpi.resp_time_value) == (0x2602, 0xB5E8, 0x10)
    assert cpi.send_only_full_member
    assert ClassPortInfo.parse(cpi.pack()) == cpi
    assert not ClassPortInfo(capability_mask2=0xA5E8).send_only_full_member


@pytest.mark.parametrize("status,cls", [
    (0x0100, sa.SANoResourcesError), (0x0200, sa.SARequestInvalidError), (0x0300, sa.SANoRecordsError),
    (0x0400, sa.SATooManyRecordsError), (0x0500, sa.SAInvalidGIDError),
    (0x0600, sa.SAInsufficientComponentsError), (0x0700, sa.SADeniedError), (0x0001, sa.SABusyError),
    (0x000C, sa.SAMadError), (0x001C, sa.SAMadError),
])
def test_status_codes_map_to_distinct_errors(status, cls):
    err = sa.status_error(status, "join x")
    assert type(err) is cls and err.status == status
    assert isinstance(err, sa.SAError) and isinstance(err, XdpoibError)
    assert str(err).startswith("join x: ") and "\n" not in str(err)


def test_local_port_gid_and_pkey_index():
    lp = LocalPort(ca_name="ibsim0", portnum=1, port_guid=0xF452140300000101, gid_prefix=0xFE80 << 48, lid=3,
                   lmc=0, sm_lid=1, sm_sl=0, state=4, phys_state=5, capability_mask=0, mtu_cap=4,
                   active_mtu=4, pkeys=(0xFFFF, 0x0003, 0, 0))
    assert lp.gid == to_gid("fe80::f452:1403:0:101")
    assert lp.pkey_index(0xFFFF) == 0
    assert lp.pkey_index(0x8003) == 1           # limited member entry still gives the index
    assert lp.has_pkey(0x8003) and lp.has_pkey(0xFFFF) and not lp.has_pkey(0x8004)
    with pytest.raises(PortError, match=r"not a member of partition 0x8004 \(its P_Key table: 0xffff, 0x0003\)"):
        lp.pkey_index(0x8004)
    assert lp.active and lp.state_name == "active"


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_path_cache_expiry_and_invalidation():
    clock = FakeClock()
    cache = PathCache(ttl=10, clock=clock)
    rec = PathRecord(dgid=DGID, sgid=SGID, dlid=4, slid=3)
    other = PathRecord(dgid=MGID, sgid=SGID, dlid=9, slid=3)
    cache.put(rec, 0xFFFF)
    cache.put(other, 0xFFFF)
    assert cache.get(DGID, SGID, 0xFFFF) == rec
    assert cache.get(DGID, SGID, 0x8003) is None          # another partition is another entry
    clock.t += 9.9
    assert cache.get(DGID, SGID, 0xFFFF) == rec
    clock.t += 0.2
    assert cache.get(DGID, SGID, 0xFFFF) is None           # expired
    assert len(cache) == 1
    cache.put(rec, 0xFFFF)
    assert cache.invalidate(DGID) == 1 and cache.get(DGID, SGID, 0xFFFF) is None
    assert cache.invalidate() == 1 and len(cache) == 0


def test_gid_input_forms():
    assert to_gid("fe80::1") == to_gid(bytes.fromhex("fe80" + "0" * 27 + "1"))
    with pytest.raises(AddressError):
        to_gid("not-a-gid")
    with pytest.raises(AddressError):
        to_gid(b"short")


def test_child_protocol_round_trips_records_and_errors():
    """What crosses the child-process boundary (`remote.py`: pickles) comes back equal, errors with
    their class and MAD status."""
    rec = MCMemberRecord(mgid=MGID, port_gid=SGID, qkey=0xB1B, join_state=1)
    lp = LocalPort(ca_name="x", portnum=1, port_guid=1, gid_prefix=2, lid=3, lmc=0, sm_lid=1, sm_sl=0,
                   state=4, phys_state=5, capability_mask=0, mtu_cap=4, active_mtu=4, pkeys=(0xFFFF,))
    assert pickle.loads(pickle.dumps([rec, lp, None, 5])) == [rec, lp, None, 5]
    err = pickle.loads(pickle.dumps(sa.status_error(0x0200, "join")))
    assert type(err) is sa.SARequestInvalidError and err.status == 0x0200 and str(err).startswith("join: ")
    mad = pickle.loads(pickle.dumps(sa.status_error(0x001C, "path")))         # a generic status, kept
    assert type(mad) is sa.SAMadError and mad.status == 0x001C
    gone = pickle.loads(pickle.dumps(sa.SATimeoutError("gone")))
    assert type(gone) is sa.SATimeoutError and gone.status is None and str(gone) == "gone"


def test_latency_histogram_is_cumulative():
    h = sa.LatencyHistogram(buckets=(0.001, 0.01, 0.1))
    for t in (0.0005, 0.005, 0.005, 0.5):
        h.observe("path", t)
    snap = h.snapshot()["path"]
    assert snap["buckets"] == {"0.001": 1, "0.01": 3, "0.1": 3}
    assert snap["count"] == 4 and snap["sum"] == pytest.approx(0.5105)


def test_as_dict_shows_gids_as_text():
    d = sa.as_dict(PathRecord(dgid=DGID, sgid=SGID, dlid=4))
    assert d["dgid"] == "fe80::f452:1403:0:201" and d["dlid"] == 4
