"""docs/design.md §3.13: what `xdpoib capture` writes. The agent-side `Capture` (xdpoib/capture.py) in
front of a fake agent and a real unix socket: each pseudo-header form (GRH form for what carried a GRH,
destination form for unicast sends, the marked GRH form for receives without one), errors and our own
looped-back datagrams left out, `-c`, directions, a full socket dropping whole records while the stream
stays readable, the reader going away, one capture at a time; the CLI's record splitter; and tshark
decoding such a stream with the addresses in the right fields."""

from __future__ import annotations

import socket
import struct
import subprocess

import pytest
from prereq import need_cmd
from wirekit import A_ADDR, A_IP4, A_IP6, A_MAC, B_ADDR, B_IP4, B_IP6, B_REMAC, tables

from xdpoib import capture as cap
from xdpoib.commands.capture import RecordSplitter
from xdpoib.fabric.base import (
    MCAST_QPN,
    AddressHandle,
    Completion,
    CompletionStatus,
    LoopbackFilter,
    MemoryPool,
    Path,
    PortAttrs,
    PortState,
    gid_str,
)
from xdpoib.peers import PeerTable
from xdpoib.wire import frames as f
from xdpoib.wire.addr import BROADCAST_MAC, ZERO_MAC, IPoIBAddr
from xdpoib.wire.mgid import broadcast_mgid
from xdpoib.wire.oracle import Vif, eth_to_ipoib
from xdpoib.wire.pcap import LINKTYPE_IPOIB

OWN = A_ADDR                        # the agent: QPN 0x48, GID fe80::f452:1403:8d:5211, LID 1
PEER = B_ADDR                       # a peer with flags 0x80: QPN 0x51, LID 7
PEER_LID, OWN_LID = 7, 1
MGID = broadcast_mgid(0xFFFF)
C_ADDR = IPoIBAddr(0, 0x63, bytes.fromhex("fe800000000000000002c9030000cccc"))   # sends with a GRH


# ================================================================ a fake agent around a real socket

class FakeLoop:
    def __init__(self):
        self.readers, self.timers = {}, []

    def add_reader(self, fd, fn):
        self.readers[fd] = fn

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def call_later(self, delay, fn):
        self.timers.append(fn)

    def run_timers(self):
        timers, self.timers = self.timers, []
        for fn in timers:
            fn()


class FakeSpec:
    where = "eth4 in netns t"


class FakeAgent:
    def __init__(self):
        self.capture = None
        self.loop = FakeLoop()
        self.spec = FakeSpec()
        self.qp = type("Qp", (), {"qpn": OWN.qpn})()
        self.port_attrs = PortAttrs(OWN_LID, 1, PortState.ACTIVE, 2048, 0x1, (OWN.gid,), (0xFFFF,))
        self.loopback = LoopbackFilter(self.port_attrs, [OWN.qpn])
        self.peers = PeerTable([Vif(0, A_MAC, OWN)], {0: 0xFFFF})
        self.peer = self.peers.learn(PEER, lid=PEER_LID)
        self.peer.ah = AddressHandle(Path(dlid=PEER_LID))            # unicast: no GRH, no GID
        self.group_ah = AddressHandle(Path(dlid=0xC001, dgid=MGID, grh=True, traffic_class=3, flow_label=5))


@pytest.fixture
def agent():
    return FakeAgent()


@pytest.fixture
def pair():
    """(agent's end, reader's end) of a unix stream socket."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def start(agent, sock, count=None, direction="both") -> cap.Capture:
    agent.capture = cap.Capture(agent, sock, "/run/xdpoib/capture-x/pcap.sock", count, direction)
    return agent.capture


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(0.2)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return out
        if not chunk:
            return out
        out += chunk


def records(data: bytes) -> list[tuple[bytes, bytes]]:
    """(pseudo-header, frame) of each whole record of a LINKTYPE_IPOIB stream."""
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, linktype) == (0xA1B2C3D4, LINKTYPE_IPOIB)
    out, o = [], 24
    while o + 16 <= len(data):
        incl = struct.unpack_from("<IIII", data, o)[2]
        if o + 16 + incl > len(data):
            break
        out.append((data[o + 16:o + 56], data[o + 56:o + 16 + incl]))
        o += 16 + incl
    return out


def with_grh(pool: MemoryPool, index: int, sgid: bytes, dgid: bytes, payload: bytes, tclass=0, flow=0):
    """A completion whose buffer holds a GRH, as verbs (and the sim backend) lay it out."""
    buf = pool.view(index)
    buf[:40] = struct.pack("!IHBB16s16s", (6 << 28) | (tclass << 20) | flow, len(payload), 0x1B, 1, sgid, dgid)
    buf[40:40 + len(payload)] = payload
    return Completion(CompletionStatus.SUCCESS, len(payload), 0, 0, sgid, True, 0, index,
                      buf[40:40 + len(payload)])


def comp(src_qp, slid, payload, sgid=None, status=CompletionStatus.SUCCESS, index=0):
    return Completion(status, len(payload), src_qp, slid, sgid, sgid is not None, 0, index, payload)


# ---- frames as the translation puts them on the wire

T = tables()
ARP_REQ = eth_to_ipoib(f.eth(BROADCAST_MAC, A_MAC, f.ETH_P_ARP, f.arp(f.ARPOP_REQUEST, A_MAC, A_IP4, ZERO_MAC, B_IP4)),
                       T).frame
PING = eth_to_ipoib(f.eth(B_REMAC, A_MAC, f.ETH_P_IP, f.ipv4(A_IP4, B_IP4, f.IPPROTO_ICMP, f.icmp_echo(7, 1, b"ping"))),
                    T).frame
NS = eth_to_ipoib(f.eth(B_REMAC, A_MAC, f.ETH_P_IPV6, f.nd_ns(A_IP6, B_IP6, B_IP6, slla=A_MAC)), T).frame


# ================================================================ pseudo-header forms

def test_unicast_send_has_the_destination_form_with_the_peers_address(agent, pair):
    c = start(agent, pair[0])
    c.sent(agent.peer.ah, PEER.qpn, [PING])
    [(pseudo, frame)] = records(read_all(pair[1]))
    assert pseudo[:20] == bytes(20) and pseudo[20:40] == PEER.pack() and frame == PING
    assert cap.pseudo_fields(pseudo) == {"form": "destination", "flags": 0x80, "dqpn": PEER.qpn,
                                         "dgid": gid_str(PEER.gid)}


def test_multicast_send_has_the_grh_form_with_our_source_and_the_mgid(agent, pair):
    c = start(agent, pair[0])
    c.sent(agent.group_ah, MCAST_QPN, [ARP_REQ, NS])
    got = records(read_all(pair[1]))
    assert [fr for _, fr in got] == [ARP_REQ, NS]
    d = cap.pseudo_fields(got[0][0])
    assert d == {"form": "grh", "grh": True, "version": 6, "tclass": 3, "flow": 5, "sqpn": OWN.qpn,
                 "sgid": gid_str(OWN.gid), "dgid": gid_str(MGID)}


def test_a_send_from_another_of_our_qps_names_that_qp_as_the_source(agent, pair):
    c = start(agent, pair[0])
    c.sent(agent.group_ah, MCAST_QPN, [ARP_REQ], qp=type("Qp", (), {"qpn": 0x1234})())     # a guest VIF's QP
    [(pseudo, _)] = records(read_all(pair[1]))
    assert cap.pseudo_fields(pseudo)["sqpn"] == 0x1234


def test_receive_with_a_grh_takes_class_flow_and_dgid_from_the_buffer(agent, pair):
    pool = MemoryPool(4, 2048 + 40)
    c = start(agent, pair[0])
    m = with_grh(pool, 2, PEER.gid, MGID, ARP_REQ, tclass=9, flow=0x12345)
    m.src_qp, m.slid = PEER.qpn, PEER_LID
    c.received([m], pool)
    [(pseudo, frame)] = records(read_all(pair[1]))
    assert frame == ARP_REQ
    assert cap.pseudo_fields(pseudo) == {"form": "grh", "grh": True, "version": 6, "tclass": 9, "flow": 0x12345,
                                         "sqpn": PEER.qpn, "sgid": gid_str(PEER.gid), "dgid": gid_str(MGID)}


def test_receive_without_grh_is_filled_in_from_what_the_agent_knows_and_marked(agent, pair):
    c = start(agent, pair[0])
    c.received([comp(PEER.qpn, PEER_LID, PING), comp(0x99, 42, PING)], MemoryPool(1, 100))
    (known, _), (unknown, _) = records(read_all(pair[1]))
    assert known[4] == cap.NO_GRH and known[:2] != b"\0\0"          # Wireshark reads it as the GRH form
    assert cap.pseudo_fields(known) == {"form": "grh", "grh": False, "version": 6, "tclass": 0, "flow": 0,
                                        "sqpn": PEER.qpn, "sgid": gid_str(PEER.gid), "dgid": gid_str(OWN.gid)}
    assert cap.pseudo_fields(unknown)["sgid"] == "::" and cap.pseudo_fields(unknown)["sqpn"] == 0x99


def test_a_first_arp_from_an_unknown_sender_gives_its_gid(agent, pair):
    stranger = IPoIBAddr(0x80, 0x77, bytes.fromhex("fe800000000000000002c9030000dddd"))
    reply = bytearray(ARP_REQ)
    reply[12:32] = stranger.pack()                                  # its sender hardware address
    c = start(agent, pair[0])
    c.received([comp(0x77, 42, bytes(reply)), comp(0x78, 42, bytes(reply))], MemoryPool(1, 100))
    (first, _), (other, _) = records(read_all(pair[1]))
    assert cap.pseudo_fields(first)["sgid"] == gid_str(stranger.gid)
    assert cap.pseudo_fields(other)["sgid"] == "::"                  # not its own address: not believed


def test_rocev2_ipv4_grh_area_gives_an_ipv4_mapped_destination():
    area = bytes(20) + bytes([0x45]) + bytes(15) + bytes([10, 1, 2, 3])
    p = cap.received_pseudo(5, area, b"\0" * 10 + b"\xff\xff" + bytes([10, 9, 9, 9]), OWN.gid)
    assert cap.pseudo_fields(p)["dgid"] == gid_str(bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3]))
    assert cap.pseudo_fields(p)["grh"]


def test_errors_and_our_own_looped_back_datagrams_are_left_out(agent, pair):
    c = start(agent, pair[0])
    c.received([comp(PEER.qpn, PEER_LID, PING, status=CompletionStatus.WR_FLUSH_ERR),
                comp(OWN.qpn, OWN_LID, ARP_REQ),                    # our own multicast, back
                comp(PEER.qpn, PEER_LID, NS)], MemoryPool(1, 100))
    assert [fr for _, fr in records(read_all(pair[1]))] == [NS]
    assert c.records == 1


def test_a_send_over_a_grh_path_has_the_grh_form(agent, pair):
    ah = AddressHandle(Path(dlid=9, dgid=C_ADDR.gid, grh=True))      # the bench's ceiling path
    c = start(agent, pair[0])
    c.sent(ah, C_ADDR.qpn, [PING])
    [(pseudo, _)] = records(read_all(pair[1]))
    assert cap.pseudo_fields(pseudo)["dgid"] == gid_str(C_ADDR.gid)


# ================================================================ count, direction, the stream

def test_count_stops_after_n_records_and_frees_the_slot(agent, pair):
    c = start(agent, pair[0], count=3)
    c.sent(agent.peer.ah, PEER.qpn, [PING, PING])
    c.sent(agent.peer.ah, PEER.qpn, [PING, PING, PING])
    c.sent(agent.peer.ah, PEER.qpn, [PING])
    assert agent.capture is None and c.reason == "3 records written"
    data = read_all(pair[1])
    assert len(records(data)) == 3 and pair[1].recv(10) == b""       # then the stream ends
    assert agent.loop.readers == {} and agent.capture_last["records"] == 3


@pytest.mark.parametrize("direction, want", [("in", [NS]), ("out", [PING]), ("both", [PING, NS])])
def test_direction(agent, pair, direction, want):
    c = start(agent, pair[0], direction=direction)
    c.sent(agent.peer.ah, PEER.qpn, [PING])
    c.received([comp(PEER.qpn, PEER_LID, NS)], MemoryPool(1, 100))
    assert [fr for _, fr in records(read_all(pair[1]))] == want


def test_a_full_socket_drops_whole_records_and_the_stream_stays_readable(agent, pair):
    sock, reader = pair
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c = start(agent, sock)
    frames = [PING[:-4] + i.to_bytes(4, "big") for i in range(2000)]
    for i in range(0, 2000, 50):
        c.sent(agent.peer.ah, PEER.qpn, frames[i:i + 50])           # nobody reads meanwhile: never blocks
    assert c.dropped > 0 and c.records + c.dropped == 2000
    stream, split = b"", RecordSplitter()
    while True:
        chunk = read_all(reader)
        stream += split.feed(chunk)
        agent.loop.run_timers()                                     # the cut record's rest, once there is room
        if not c._rest and not chunk:
            break
    recs = records(stream)
    assert len(recs) == c.records                                   # every record written arrived whole
    seen = [fr for _, fr in recs]
    kept = set(seen)
    assert seen == [fr for fr in frames if fr in kept]              # in order, none mangled


def test_the_reader_closing_ends_the_capture(agent, pair):
    c = start(agent, pair[0])
    pair[1].close()
    agent.loop.readers[pair[0].fileno()]()                          # the loop sees the socket readable
    assert agent.capture is None and c.reason.startswith("the reader went away")


def test_a_send_after_the_reader_left_ends_the_capture(agent, pair):
    c = start(agent, pair[0])
    pair[1].close()
    c.sent(agent.peer.ah, PEER.qpn, [PING])
    assert agent.capture is None and c.reason.startswith("the reader went away")


# ================================================================ the control request

def test_start_stop_and_one_at_a_time(agent, tmp_path):
    path = str(tmp_path / "pcap.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(2)
    try:
        ans = cap.request(agent, {"cmd": "capture", "socket": path, "count": None, "direction": "both"})
        assert ans["capture"]["running"] and agent.capture is not None
        with pytest.raises(cap.CaptureError, match=r"already running .* one at a time"):
            cap.request(agent, {"cmd": "capture", "socket": path})
        conn, _ = lst.accept()
        assert conn.recv(24)[20:24] == LINKTYPE_IPOIB.to_bytes(4, "little")
        done = cap.request(agent, {"cmd": "capture", "stop": True, "socket": path})["capture"]
        assert not done["running"] and done["ended"] == "stopped by the client" and agent.capture is None
        assert cap.request(agent, {"cmd": "capture", "stop": True, "socket": path})["capture"] == done
        with pytest.raises(cap.CaptureError, match="no capture to /elsewhere"):
            cap.request(agent, {"cmd": "capture", "stop": True, "socket": "/elsewhere"})
        conn.close()
    finally:
        lst.close()


@pytest.mark.parametrize("req, msg", [
    ({"socket": "relative.sock"}, "absolute path"),
    ({"socket": "/nonexistent/x.sock"}, "cannot reach the capture socket"),
    ({"socket": "/etc/hostname"}, "is not a socket"),
    ({"socket": "/x", "count": 0}, "count must be a positive integer"),
    ({"socket": "/x", "direction": "sideways"}, "direction must be one of in, out, both"),
])
def test_bad_requests_are_one_line_errors(agent, req, msg):
    with pytest.raises(cap.CaptureError, match=msg) as e:
        cap.request(agent, {"cmd": "capture", **req})
    assert "\n" not in str(e.value) and agent.capture is None


# ================================================================ the CLI's splitter, tshark

def test_splitter_returns_only_whole_records_whatever_the_chunks(agent, pair):
    c = start(agent, pair[0])
    c.sent(agent.peer.ah, PEER.qpn, [PING, NS, ARP_REQ])
    data = read_all(pair[1])
    for size in (1, 7, 16, 57, 1000):
        split, out = RecordSplitter(), b""
        for i in range(0, len(data), size):
            out += split.feed(data[i:i + size])
        assert out == data and split.records == 3
    split, last = RecordSplitter(), 16 + 40 + len(ARP_REQ)
    assert split.feed(data[:-3]) == data[:-last] and split.records == 2          # the cut one is held back


def test_splitter_refuses_a_stream_that_is_not_ipoib_pcap():
    from xdpoib.errors import XdpoibError

    with pytest.raises(XdpoibError, match="not a LINKTYPE_IPOIB pcap"):
        RecordSplitter().feed(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))


def test_tshark_decodes_the_stream(agent, pair, tmp_path):
    need_cmd("tshark")
    pool = MemoryPool(2, 2048 + 40)
    c = start(agent, pair[0])
    c.sent(agent.group_ah, MCAST_QPN, [ARP_REQ])
    c.sent(agent.peer.ah, PEER.qpn, [PING, NS])
    m = with_grh(pool, 0, PEER.gid, MGID, ARP_REQ)
    m.src_qp, m.slid = PEER.qpn, PEER_LID
    c.received([m, comp(PEER.qpn, PEER_LID, PING)], pool)
    path = tmp_path / "c.pcap"
    path.write_bytes(read_all(pair[1]))
    fields = ["ipoib.daddr.qpn", "ipoib.dgid", "ipoib.grh.sqpn", "ipoib.grh.sgid", "arp.hw.type", "arp.hw.size",
              "icmpv6.opt.length", "icmpv6.checksum.status", "_ws.col.Protocol"]
    r = subprocess.run(["tshark", "-r", str(path), "-T", "fields", *[a for x in fields for a in ("-e", x)]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [dict(zip(fields, line.split("\t"), strict=True)) for line in r.stdout.splitlines()]
    assert len(rows) == 5
    bcast, ping, ns, rx_arp, rx_ping = rows
    assert bcast["ipoib.grh.sqpn"] == "0x000048" and bcast["ipoib.grh.sgid"] == gid_str(OWN.gid)
    assert bcast["ipoib.dgid"] == gid_str(MGID) and (bcast["arp.hw.type"], bcast["arp.hw.size"]) == ("32", "20")
    assert ping["ipoib.daddr.qpn"] == "0x000051" and ping["ipoib.dgid"] == gid_str(PEER.gid)
    assert ns["icmpv6.opt.length"] == "3" and ns["icmpv6.checksum.status"] == "1"      # 1: Good
    assert rx_arp["ipoib.grh.sqpn"] == "0x000051" and rx_arp["ipoib.grh.sgid"] == gid_str(PEER.gid)
    assert rx_ping["ipoib.grh.sqpn"] == "0x000051" and rx_ping["ipoib.dgid"] == gid_str(OWN.gid)
