"""`xdpoib bench e2e`'s pure parts: ping's replies parsed into round trips (iputils' own output, with
duplicates, errors and the summary left out), nearest-rank percentiles, the group MTU of `saquery -g`,
the targets computed from a result (which side of the target, met or not, missing figures), and the UDP
socket buffer: the byte counts of --udp-buffer, what the kernel gives a socket, the drops read from
/proc/net/snmp."""

from __future__ import annotations

import subprocess

import pytest
from prereq import need_cmd

from xdpoib.bench import e2e

# iputils 20221126 (Debian 12), `ping -n -c 5 -i 0.002 -W 1 ADDR`, a reply duplicated and one lost
PING = """PING 10.99.1.2 (10.99.1.2) 56(84) bytes of data.
64 bytes from 10.99.1.2: icmp_seq=1 ttl=64 time=0.291 ms
64 bytes from 10.99.1.2: icmp_seq=2 ttl=64 time=0.105 ms
64 bytes from 10.99.1.2: icmp_seq=2 ttl=64 time=0.350 ms (DUP!)
From 10.99.1.1 icmp_seq=3 Destination Host Unreachable
64 bytes from 10.99.1.2: icmp_seq=5 ttl=64 time=12.5 ms
64 bytes from 10.99.1.2: icmp_seq=4 ttl=64 time=120 ms

--- 10.99.1.2 ping statistics ---
5 packets transmitted, 4 received, +1 duplicates, +1 errors, 20% packet loss, time 9ms
rtt min/avg/max/mdev = 0.105/33.224/120.000/50.505 ms
"""


def test_ping_replies_become_round_trips_in_microseconds():
    assert e2e.parse_ping(PING) == pytest.approx([291.0, 105.0, 12500.0, 120000.0])


def test_ping_without_replies_gives_nothing():
    assert e2e.parse_ping("PING 10.99.1.2 (10.99.1.2) 56(84) bytes of data.\n\n--- 10.99.1.2 ping statistics ---\n"
                          "3 packets transmitted, 0 received, 100% packet loss, time 2003ms\n") == []
    assert e2e.parse_ping("") == []


def test_parses_what_the_real_ping_prints():
    """The format is iputils' own: ping the loopback (ping's own wait, no -i below 0.2 s: no root)."""
    need_cmd("ping")
    r = subprocess.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "127.0.0.1"], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0 and "permission" in (r.stderr + r.stdout).lower():
        pytest.skip("ping is not permitted here (no CAP_NET_RAW, ping_group_range)")
    assert r.returncode == 0, r.stderr
    rtts = e2e.parse_ping(r.stdout)
    assert len(rtts) == 3 and all(0 < x < 1_000_000 for x in rtts), r.stdout


def test_percentiles_are_nearest_rank():
    xs = [float(x) for x in range(1, 101)]          # 1..100
    assert e2e.percentile(xs, 50) == 50.0 and e2e.percentile(xs, 99) == 99.0 and e2e.percentile(xs, 100) == 100.0
    assert e2e.percentile([7.0], 99) == 7.0
    assert e2e.rtt_summary([3.0, 1.0, 2.0]) == {"p50": 2.0, "p99": 3.0}
    assert e2e.rtt_summary([]) == {"p50": None, "p99": None}


def test_group_mtu_from_saquery():
    dump = ("MCMemberRecord group dump:\n\t\tMGID....................ff12:401b:ffff::ffff:ffff\n"
            "\t\tMlid....................0xC000\n\t\tMtu.....................0x85\n\t\tpkey....................0xFFFF\n")
    assert e2e.group_mtu(dump) == 4096
    assert e2e.group_mtu(dump.replace("0x85", "0x84")) == 2048
    assert e2e.group_mtu("") is None


def result(**over) -> dict:
    """A result as `_measure` builds it, with the figures the targets read."""
    row = {"peak_pps": 100_000, "overload_pps": 95_000, "mbps": 51.2, "cpu_us_per_frame": 6.0,
           "agent_us_per_frame": 1.5, "kernel_us_per_frame": 4.5}
    sizes = {"64": {n: dict(row) for n in e2e.SYSTEMS}, "MTU": {n: dict(row) for n in e2e.SYSTEMS}}
    sizes["64"]["veth"]["peak_pps"] = 110_000
    sizes["64"]["naive"]["peak_pps"] = 20_000
    sizes["64"]["vxlan"]["cpu_us_per_frame"] = 3.0
    sizes["MTU"]["veth"]["mbps"] = 200.0
    res = {"sizes": sizes, "frames": {"64": {"frame_bytes": 64}, "MTU": {"frame_bytes": 2058}},
           "tcp_mbps": {n: 1000.0 for n in e2e.SYSTEMS} | {"veth": 4000.0},
           "rtt_us": {n: {"p50": 100.0, "p99": 200.0} for n in e2e.SYSTEMS} | {"naive": {"p50": 150.0, "p99": 300.0}}}
    res.update(over)
    return res


def test_targets_say_which_side_and_whether_met():
    got = {r["name"]: r for r in e2e.ratios(result())}
    assert got["xdpoib peak / veth peak"] | {} == {"name": "xdpoib peak / veth peak", "size": "64", "where": "64",
                                                   "value": 0.91, "op": ">=", "target": 0.8, "met": True}
    assert got["xdpoib peak / naive peak"]["value"] == 5.0 and got["xdpoib peak / naive peak"]["met"]
    assert got["xdpoib CPU / vxlan CPU"]["value"] == 2.0 and got["xdpoib CPU / vxlan CPU"]["op"] == "<="
    assert got["xdpoib agent CPU us/frame"]["value"] == 1.5 and got["xdpoib agent CPU us/frame"]["met"]
    assert got["xdpoib overload / xdpoib peak"]["value"] == 0.95
    assert got["xdpoib Mbit/s / veth Mbit/s"]["value"] == 0.26 and got["xdpoib Mbit/s / veth Mbit/s"]["met"] is False
    assert got["xdpoib TCP / veth TCP"]["value"] == 0.25 and got["xdpoib TCP / veth TCP"]["size"] is None
    rtt = got["xdpoib RTT p50 / naive RTT p50"]
    assert (rtt["where"], rtt["value"], rtt["op"], rtt["target"], rtt["met"]) == ("rtt", 0.67, "<=", 0.5, False)


def test_a_missing_figure_is_not_met_or_failed_but_unknown():
    res = result()
    res["rtt_us"]["xdpoib"] = {"p50": None, "p99": None}
    res["sizes"]["64"]["xdpoib"]["agent_us_per_frame"] = None
    got = {r["name"]: r for r in e2e.ratios(res)}
    rtt = got["xdpoib RTT p50 / naive RTT p50"]
    assert rtt["value"] is None and rtt["met"] is None
    assert got["xdpoib agent CPU us/frame"]["met"] is None


def test_targets_of_systems_not_asked_for_are_left_out():
    res = result()
    for part in (res["sizes"]["64"], res["sizes"]["MTU"], res["tcp_mbps"], res["rtt_us"]):
        part.pop("naive")
    names = {r["name"] for r in e2e.ratios(res)}
    assert "xdpoib peak / naive peak" not in names and "xdpoib RTT p50 / naive RTT p50" not in names
    assert "xdpoib peak / veth peak" in names


def test_the_table_shows_the_new_columns_rtts_and_targets():
    res = result(machine={"cpu": "test CPU", "cpus": 2, "kernel": "6.18"}, date="2026-12-06T05:00:00Z",
                 seconds=3, rates=[10_000, 0], mtu=2044, mtus={}, tcp_seconds=5, tcp_mtu=2044, errors={},
                 ib_mtu_4096={"usable": False, "detail": "refused"},
                 pings={"count": 1000, "interval_ms": 2.0, "replies": dict.fromkeys(e2e.SYSTEMS, 1000)})
    res["frames"] = {"64": {"frame_bytes": 64, "udp_payload": 22}, "MTU": {"frame_bytes": 2058, "udp_payload": 2016}}
    res["ratios"] = e2e.ratios(res)
    text = e2e.format_table(res)
    assert "agent us" in text and "kernel us" in text and "IB MTU 4096: refused" in text
    assert "ping round trip" in text and "(<= 0.5: not met)" in text and "(>= 0.8: met)" in text
    assert "socket drop %" in text and "(in kernel)" in text and "UDP socket buffers" not in text
    res["udp_buffer"] = e2e.udp_buffer_info(4 << 20, 212992)
    assert "4194304 bytes asked for (-w), net.core.rmem_max 212992, so 425984 per socket" in e2e.format_table(res)


def test_udp_buffer_sizes_parse_and_bad_ones_are_refused():
    assert e2e.parse_bytes("4M") == 4 << 20 and e2e.parse_bytes("256k") == 256 << 10
    assert e2e.parse_bytes("0") == 0 and e2e.parse_bytes(" 212992 ") == 212992
    for bad in ("", "M", "-1", "4.5M", "4T", "3G"):
        with pytest.raises(e2e.UsageError, match="bad byte count"):
            e2e.parse_bytes(bad)


def test_the_kernel_caps_a_socket_buffer_at_rmem_max_and_doubles_it():
    assert e2e.udp_buffer_info(4 << 20, 4 << 20)["socket_rcvbuf"] == 8 << 20
    assert e2e.udp_buffer_info(4 << 20, 212992)["socket_rcvbuf"] == 425984      # Debian 12's 6.1 default cap
    assert e2e.udp_buffer_info(0, 212992)["socket_rcvbuf"] is None              # the system's default kept
    assert e2e.udp_buffer_info(1 << 20, None) == {"requested": 1 << 20, "rmem_max": None, "socket_rcvbuf": None}


def test_process_times_split_user_and_kernel():
    import os
    import time

    t0 = time.process_time()
    while time.process_time() - t0 < 0.05:      # some user time of our own
        sum(range(1000))
    user, system = e2e.process_times([os.getpid()])
    assert user > 0 and system >= 0
    assert e2e.process_times([2 ** 31 - 1]) == (0, 0)       # no such process: nothing counted


def test_socket_drops_come_from_proc_net_snmp_and_become_a_share():
    with open("/proc/net/snmp") as f:
        text = f.read()
    assert isinstance(e2e.snmp_value(text, "Udp", "RcvbufErrors"), int)      # this machine's own counters
    assert isinstance(e2e.snmp_value(text, "Udp", "InDatagrams"), int)
    assert e2e.snmp_value(text, "Udp", "NoSuchField") is None and e2e.snmp_value("", "Udp", "RcvbufErrors") is None
    fake = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 900 0 100 5 100\n"
    assert e2e.snmp_value(fake, "Udp", "RcvbufErrors") == 100
    x = e2e.Sample(1000.0, 900.0, 2.0, 1.0, received=900, socket_drops=100, agent_sys_us_per_frame=0.5)
    assert x.as_json()["agent_sys_us_per_frame"] == 0.5
    assert x.socket_drop_pct == pytest.approx(10.0) and x.as_json()["socket_drop_pct"] == 10.0
    assert e2e.Sample(1.0, 0.0, None, None).socket_drop_pct is None
