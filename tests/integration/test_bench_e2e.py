"""`xdpoib bench e2e` through the real CLI with tiny settings (64-byte frames, two offered rates, 1 s per
sample, 40 pings): one JSON object with every system and every key, a number from every system (CPU
split into the translating processes' and the softirq share, round trips with p50 <= p99), the
4096-byte MTU probe's answer, the UDP socket buffer asked for and the drops at the receiving socket, the
targets, a PNG, and nothing of what the bench created left behind.
Speed is reported, never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

from prereq import need_cmd, need_file, need_module

from xdpoib import state
from xdpoib.bench.e2e import AGENT_DATAPATHS, KEYS, RTT_KEYS, SYSTEMS
from xdpoib.fabric import simfabric
from xdpoib.pump import pin_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_e2e_smoke(sim_prereqs, tmp_path, figures):
    need_cmd("iperf3", "ss", "ping")
    need_module("matplotlib")
    need_file("/dev/net/tun")
    plot = tmp_path / "e2e.png"
    r = subprocess.run([sys.executable, "-m", "xdpoib", "bench", "e2e", "--sizes", "64", "--rates", "2000,0",
                        "--seconds", "1", "--tcp-seconds", "1", "--pings", "40", "--json", "--plot", str(plot)],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)                   # exactly one object: anything else on stdout fails here
    figures(f"\nbench e2e (tiny): sizes {json.dumps(res['sizes'])}\ntcp_mbps {res['tcp_mbps']}\n"
            f"rtt_us {res['rtt_us']}\nib_mtu_4096 {res['ib_mtu_4096']}\n"
            f"ratios {res['ratios']}\nerrors {res['errors']}")

    assert set(res["sizes"]) == {"64"}
    assert set(res["sizes"]["64"]) == set(SYSTEMS) and set(res["tcp_mbps"]) == set(SYSTEMS)
    for name, row in res["sizes"]["64"].items():
        assert set(KEYS) <= set(row), (name, row)
        # read from the receiving namespace's /proc/net/snmp: a share, 0 when the socket kept up
        assert row["socket_drop_pct"] is None or 0 <= row["socket_drop_pct"] <= 100, (name, row)
    # every UDP sample asked for 4 MiB of socket buffer; what the server's socket got follows from the cap
    ub = res["udp_buffer"]
    assert ub["requested"] == 4 << 20 and ub["socket_rcvbuf"] == 2 * min(ub["requested"], ub["rmem_max"])
    assert set(res["rtt_us"]) == set(SYSTEMS) and res["pings"]["count"] == 40
    for name, rtt in res["rtt_us"].items():
        assert set(rtt) == set(RTT_KEYS), (name, rtt)
    assert set(res["rtt_cpu_us"]) == set(SYSTEMS)
    for name, cpu in res["rtt_cpu_us"].items():     # the translators' CPU per round trip: theirs only
        if res["pings"]["replies"].get(name):
            assert cpu > 0 if name in ("xdpoib", "ceiling", "naive") else cpu == 0, (name, cpu)
    assert {x["name"] for x in res["ratios"]} >= {
        "xdpoib peak / veth peak", "xdpoib peak / naive peak", "xdpoib CPU / vxlan CPU", "xdpoib agent CPU us/frame",
        "xdpoib overload / xdpoib peak", "xdpoib peak / ceiling peak", "xdpoib TCP / veth TCP",
        "xdpoib RTT p50 / naive RTT p50"}
    for x in res["ratios"]:
        assert x["op"] in (">=", "<=") and x["target"] > 0
        assert x["met"] is None if x["value"] is None else x["met"] == (
            x["value"] >= x["target"] if x["op"] == ">=" else x["value"] <= x["target"])
    # the probe asked the real OpenSM on ibsim for a 4096-byte broadcast group and says what it got;
    # the TCP runs used the MTU that follows from it
    assert isinstance(res["ib_mtu_4096"]["usable"], bool) and res["ib_mtu_4096"]["detail"]
    assert res["tcp_mtu"] == res["mtu"] == (4092 if res["ib_mtu_4096"]["usable"] else 2044)

    assert plot.read_bytes()[:8] == PNG_MAGIC

    assert_nothing_left(res["setup"])

    def numbers(name):
        """The figures that must be positive: every rate, CPU, TCP and round trip; the translating
        processes' CPU only where there are such processes (veth and VXLAN have none: 0)."""
        row, rtt = res["sizes"]["64"][name], res["rtt_us"][name]
        keys = [k for k in KEYS if k not in ("kernel_us_per_frame", "socket_drop_pct", "agent_sys_us_per_frame")
                and (k != "agent_us_per_frame" or translated(name))]
        return [row[k] for k in keys] + [res["tcp_mbps"][name], rtt["p50"], rtt["p99"]]

    def translated(name):
        return name in AGENT_DATAPATHS or name == "naive"

    for name in SYSTEMS:
        row, rtt = res["sizes"]["64"][name], res["rtt_us"][name]
        if row["cpu_us_per_frame"] is not None:
            assert row["kernel_us_per_frame"] >= 0 and row["agent_us_per_frame"] >= 0, (name, row)
            assert abs(row["agent_us_per_frame"] + row["kernel_us_per_frame"] - row["cpu_us_per_frame"]) < 0.02
            assert 0 <= row["agent_sys_us_per_frame"] <= row["agent_us_per_frame"], (name, row)
            if not translated(name):
                assert row["agent_us_per_frame"] == 0, (name, row)
        if rtt["p50"] is not None:
            assert 0 < rtt["p50"] <= rtt["p99"], (name, rtt)
            assert 0 < res["pings"]["replies"][name] <= 40
        if name != "ceiling":
            assert name not in res["errors"], f"{name}: {res['errors'][name]}"
            assert all(v is not None and v > 0 for v in numbers(name)), (name, numbers(name))
    assert "ceiling" not in res["errors"] and all(v is not None and v > 0 for v in numbers("ceiling")), (
        "the plumbing ceiling (XDPOIB_DATAPATH=ceiling) produced no numbers: "
        f"{res['errors'].get('ceiling', numbers('ceiling'))}")


def assert_nothing_left(setup: dict) -> None:
    """No namespace, link, process, attachment, pin or fabric the bench named may remain."""
    prefix = setup["prefix"]
    assert prefix and all(ns.startswith(prefix) for ns in setup["netns"])
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
    assert not [n for n in netns if n.startswith(prefix)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    names = {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if ":" in ln}
    tags = [state.link_tag(state.attachment_id("eth4", ns)) for ns in setup["netns"]]
    agent_links = {p + t for t in tags for p in ("xo", "xa", "xb")}
    assert not [n for n in names if n.startswith(prefix) or n in agent_links]
    procs = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if prefix in cmd:
                procs.append(f"{d.name}: {cmd}")
    assert not procs
    for ns in setup["netns"]:
        aid = state.attachment_id("eth4", ns)
        assert state.read_spec(aid) is None and not state.socket_path(aid).exists()
        assert not state.persist_path(aid).exists() and not pin_dir(aid).exists()
    with open("/proc/net/unix") as f:
        socks = f.read()
    for fab in setup["fabrics"]:
        assert not simfabric.residue(fab), simfabric.residue(fab)
        assert f"xdpoib-sim/{fab}/" not in socks
