"""`xdpoib bench e2e` through the real CLI with tiny settings (64-byte frames, two offered rates, 1 s per
sample): one JSON object with every system and every key, a number from every system, a PNG, and
nothing of what the bench created left behind. Speed is reported, never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

from prereq import need_cmd, need_file, need_module

from xdpoib import state
from xdpoib.bench.e2e import KEYS, SYSTEMS
from xdpoib.fabric import simfabric
from xdpoib.pump import pin_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_e2e_smoke(sim_prereqs, tmp_path, figures):
    need_cmd("iperf3", "ss", "ping")
    need_module("matplotlib")
    need_file("/dev/net/tun")
    plot = tmp_path / "e2e.png"
    r = subprocess.run([sys.executable, "-m", "xdpoib", "bench", "e2e", "--sizes", "64", "--rates", "2000,0",
                        "--seconds", "1", "--tcp-seconds", "1", "--json", "--plot", str(plot)],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)                   # exactly one object: anything else on stdout fails here
    figures(f"\nbench e2e (tiny): sizes {json.dumps(res['sizes'])}\ntcp_mbps {res['tcp_mbps']}\n"
            f"ratios {res['ratios']}\nerrors {res['errors']}")

    assert set(res["sizes"]) == {"64"}
    assert set(res["sizes"]["64"]) == set(SYSTEMS) and set(res["tcp_mbps"]) == set(SYSTEMS)
    for name, row in res["sizes"]["64"].items():
        assert set(KEYS) <= set(row), (name, row)
    assert {x["name"] for x in res["ratios"]} >= {"xdpoib peak / naive peak", "xdpoib peak / ceiling peak"}

    assert plot.read_bytes()[:8] == PNG_MAGIC

    assert_nothing_left(res["setup"])

    def numbers(name):
        row = res["sizes"]["64"][name]
        return [row[k] for k in KEYS] + [res["tcp_mbps"][name]]

    for name in SYSTEMS:
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
