"""The BPF programs on real IPoIB frames from Linux and Solaris hosts, byte for byte with the oracle.

RX: every frame of both captures (tests/captures.py reads them), with the maps holding the peers the
agent would have learnt by then and the metadata it would give (sender, VIF, P_Key, multicast). TX:
the Ethernet host's answers to the real requests (ARP reply, NA, ICMPv6 echo reply), and every frame
translated back from its Ethernet form, each into the group or peer the oracle names. What the oracle
must produce on these frames is asserted in tests/unit/test_captures.py; here BPF must equal it.
"""

from __future__ import annotations

import captures as cap
import pytest
from dpcheck import DropWatcher, compare, rx_actual, rx_expected, tx_actual, tx_expected

from xdpoib import abi
from xdpoib.abi import Direction, XdpAction
from xdpoib.wire.addr import IPoIBAddr
from xdpoib.wire.oracle import Peer, Tables, Vif, ipoib_to_eth

US = Vif(1, bytes.fromhex("f45214ffff01"), IPoIBAddr(0, 0x4242, bytes.fromhex("fe80000000000000f4521403ffffff01")))


@pytest.fixture(scope="module")
def frames():
    erf_path, solaris_path = cap.need_vectors(cap.ERF_FILE, cap.SOLARIS_FILE)
    return {"erf": cap.read_erf(erf_path), "solaris": cap.read_ipoib242(solaris_path)}


def reload(maps, t: Tables, groups: dict[bytes, int] | None = None) -> None:
    """The maps hold exactly t (and groups), as an agent with these tables would have them."""
    maps.clear()
    maps.load(t)
    for mgid, gid in (groups or {}).items():
        maps.set_group(mgid, gid)


@pytest.mark.parametrize("which", ["erf", "solaris"])
def test_rx_program_matches_the_oracle_on_every_real_frame(which, frames, datapath, maps):
    learner = cap.Learner(cap.address_book(frames[which]), US)
    watch = DropWatcher(maps, Direction.RX)
    errors, redirected = [], 0
    for fr in frames[which]:
        src = learner.learn(fr)
        t = learner.tables()
        maps.load(t)                    # new peers and changed flags, as the agent adds them
        want = rx_expected(fr.ipoib, t, src, US, 0xFFFF, fr.multicast)
        got = rx_actual(datapath, fr.ipoib, abi.rx_meta(src.peer_id, US.vif_id, 0xFFFF, multicast=fr.multicast))
        last = watch.last() if got.verdict == XdpAction.DROP else None
        err = compare(str(fr), fr.ipoib, want, got, last, ipoib_in=True)
        if err:
            errors.append(err)
        redirected += got.verdict == XdpAction.REDIRECT
    assert not errors, "\n\n".join(errors[:3])
    assert redirected == len(frames[which])         # every real frame reaches eth4


def test_tx_program_sends_the_answers_with_the_real_layout(frames, datapath, maps):
    errors = []
    for c in cap.reply_cases(frames["erf"], frames["solaris"]):
        reload(maps, c.tables)
        want, got = tx_expected(c.answer, c.tables, {}), tx_actual(datapath, c.answer)
        assert want.frame == c.expected, c.name
        err = compare(c.name, c.answer, want, got, None)
        if err:
            errors.append(err)
    assert not errors, "\n\n".join(errors)


def test_tx_program_translates_every_real_frame_back(frames, datapath, maps):
    """The Ethernet form of each real frame, sent by a VIF standing in for its sender."""
    errors, runs = [], 0
    for which in ("erf", "solaris"):
        learner = cap.Learner(cap.address_book(frames[which]), US)
        for fr in frames[which]:
            src = learner.learn(fr)
            t = learner.tables()
            eth = ipoib_to_eth(fr.ipoib, t, src=src, vif=US, pkey=0xFFFF, multicast=fr.multicast).frame
            back = Tables(vifs=[Vif(p.peer_id + 1, p.mac, p.addr) for p in t.peers],
                          peers=[Peer(US.vif_id, US.mac, US.addr)], vlan_pkeys=dict(t.vlan_pkeys))
            groups = {fr.dgid: 7} if fr.multicast else {}
            reload(maps, back, groups)
            want, got = tx_expected(eth, back, groups), tx_actual(datapath, eth)
            runs += 1
            err = compare(f"TX of {fr}", eth, want, got, None)
            if err:
                errors.append(err)
    assert not errors, "\n\n".join(errors[:3])
    assert runs == len(frames["erf"]) + len(frames["solaris"])
