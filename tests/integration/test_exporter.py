"""The exporter against real software: two attachments on a sim fabric (real OpenSM), the exporter's
/metrics after a ping, a real Prometheus scraping it every second with the example configuration and the
alert rules of contrib/prometheus/ (its HTTP API answers every dashboard query and evaluates every alert:
quiet on healthy attachments, the drop alert after a burst of LLDP frames), then an agent killed with
SIGKILL: the scrape goes on with `xdpoib_up 0`, the agent-down alert goes pending, and after re-attaching
the BPF packet counter carries on from the pinned maps (Prometheus sees no reset)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from labkit import XDPOIB, attached
from labkit import xdpoib as x
from prereq import need_cmd, need_module

from xdpoib.abi import MAX_PEERS
from xdpoib.exporter import series_names

SIM_HOSTS = 2
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "xdpoib.json"
PROMETHEUS = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(pred, timeout: float, step: float = 0.2):
    """Poll pred() until it returns something truthy (returned) or timeout (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def get(url: str, timeout: float = 3.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """The exporter's /metrics, as {series name: [(labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(get(f"http://127.0.0.1:{port}/metrics") or ""):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == w for k, w in labels.items()):
            return v
    return None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def pair(sim_fabric):
    """Two namespaces with eth4 attached to h1 and h2, IPv4 10.79.0.1 and .2."""
    need_cmd("ip", "ping")
    with attached(sim_fabric, ["h1", "h2"], net="10.79.0", prefix="xe") as names:
        yield sim_fabric, names


@pytest.fixture(scope="module")
def exporter_port(pair):
    port = free_port()
    proc = subprocess.Popen([*XDPOIB, "exporter", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert until(lambda: get(f"http://127.0.0.1:{port}/metrics"), 15), "exporter does not serve"
        yield port
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(exporter_port, tmp_path_factory):
    """A real Prometheus scraping the exporter every second, configured from contrib/prometheus/ (the example
    config with this exporter as its target, the alert rules evaluated every second); yields a query
    function whose `api(path)` returns another endpoint's data (rules, alerts)."""
    need_cmd("prometheus")
    need_module("yaml")
    import yaml

    d = tmp_path_factory.mktemp("prom")
    port = free_port()
    conf = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    conf["global"].update(scrape_interval="1s", evaluation_interval="1s")
    conf["rule_files"] = [str(PROMETHEUS / f) for f in conf["rule_files"]]
    (job,) = conf["scrape_configs"]
    job.update(scrape_timeout="1s", static_configs=[{"targets": [f"127.0.0.1:{exporter_port}"]}])
    (d / "prometheus.yml").write_text(yaml.safe_dump(conf))
    with open(d / "prometheus.log", "w") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=d)

    def query(expr: str) -> list[dict]:
        body = get(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body is not None, f"prometheus does not answer: {(d / 'prometheus.log').read_text()[-800:]}"
        answer = json.loads(body)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def api(path: str):
        body = get(f"http://127.0.0.1:{port}/api/v1/{path}")
        assert body is not None, f"prometheus does not answer: {(d / 'prometheus.log').read_text()[-800:]}"
        return json.loads(body)["data"]

    query.api = api
    try:
        assert until(lambda: get(f"http://127.0.0.1:{port}/-/ready"), 30), "prometheus did not get ready"
        yield query
    finally:
        stop(proc)


def ping(ns: str, dst: str, count: int = 3) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", "3", dst],
                          capture_output=True).returncode == 0


def first_contact(ns: str, dst: str, within: float = 20.0) -> bool:
    """Traffic flows once (the first contact waits on the SA for paths, slow on a loaded host: what is
    measured here is what the counters say afterwards, not how soon)."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        if ping(ns, dst, count=1):
            return True
    return False


def test_metrics_show_packets_and_peers_after_a_ping(pair, exporter_port):
    fab, (ns1, ns2) = pair
    assert first_contact(ns1, "10.79.0.2")
    assert ping(ns1, "10.79.0.2")
    m = scrape(exporter_port)
    for ns in (ns1, ns2):
        assert value(m, "xdpoib_up", netns=ns, ifname="eth4") == 1
        assert value(m, "xdpoib_packets_total", netns=ns, direction="tx") >= 3
        assert value(m, "xdpoib_packets_total", netns=ns, direction="rx") >= 3
        assert value(m, "xdpoib_bytes_total", netns=ns, direction="tx") > 3 * 84
        assert value(m, "xdpoib_peers", netns=ns) >= 1
        assert value(m, "xdpoib_peers_max", netns=ns) == MAX_PEERS        # the pinned peer map's size
        assert value(m, "xdpoib_vifs", netns=ns, origin="configured") == 1   # eth4's own MAC (VIF 0)
        assert value(m, "xdpoib_vifs", netns=ns, origin="learned") == 0
        assert value(m, "xdpoib_broadcast_joined", netns=ns) == 1
        assert value(m, "xdpoib_mcast_groups", netns=ns, state="full") >= 1
        host = "h1" if ns == ns1 else "h2"
        assert value(m, "xdpoib_port_info", netns=ns, state="active", device=f"{fab.name}:{host}") == 1
        assert value(m, "xdpoib_agent_uptime_seconds", netns=ns) > 0
        # the serving agent's own CPU time (bring-up alone takes more than a clock tick)
        assert value(m, "xdpoib_agent_cpu_seconds_total", netns=ns, mode="user") > 0
        assert value(m, "xdpoib_agent_cpu_seconds_total", netns=ns, mode="system") > 0
        assert value(m, "xdpoib_sa_queries_total", netns=ns, type="join", result="ok") >= 1
        assert value(m, "xdpoib_sa_query_duration_seconds_count", netns=ns, type="join") >= 1
    # the same numbers the agent reports itself
    st = json.loads(x("status", "eth4", "--netns", ns2, "-j").stdout)
    assert value(m, "xdpoib_peers", netns=ns2) == st["peers"]
    assert value(m, "xdpoib_port_info", netns=ns2, gid=st["port"]["gid"], lid=str(st["port"]["lid"])) == 1
    # every series is one the exporter declares (the list the dashboard test checks against)
    assert set(m) <= series_names(), set(m) - series_names()
    # --once prints the same exposition
    once = x("exporter", "--once").stdout
    for ns in (ns1, ns2):
        assert f'xdpoib_up{{ifname="eth4",netns="{ns}"}} 1.0' in once
        assert re.search(rf'xdpoib_packets_total{{direction="tx",ifname="eth4",netns="{ns}"}} [1-9]', once)


def test_a_second_exporter_on_the_same_port_fails_with_one_line(exporter_port):
    r = x("exporter", "--listen", f"127.0.0.1:{exporter_port}", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"xdpoib: error: cannot listen on 127.0.0.1:{exporter_port}: "
                                             "Address already in use"]


def test_prometheus_scrapes_every_attachment_and_answers_the_dashboard(pair, prometheus):
    _, names = pair
    got = until(lambda: {r["metric"].get("netns") for r in prometheus('xdpoib_packets_total{direction="tx"}')
                         if float(r["value"][1]) > 0} >= set(names), 30)
    assert got, "prometheus has no xdpoib_packets_total sample for each attachment"
    # rates need two samples in their window (other attachments on this host may be scraped too)
    assert until(lambda: {r["metric"].get("netns") for r in prometheus("count_over_time(xdpoib_up[10s]) >= 3")}
                 >= set(names), 15)
    # every dashboard query runs on real Prometheus (variables at "All", a 10 s rate window)
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        for t in p["targets"]:
            expr = re.sub(r'(\w+)=~"\$\w+"', r'\1=~".*"', t["expr"]).replace("$__rate_interval", "10s")
            result = prometheus(expr)
            if "drops" not in expr:                 # drops appear only when something was dropped
                assert result, f"{p['title']!r}: no data for {expr}"
    for v in dash["templating"]["list"][1:]:
        metric = re.search(r"label_values\((.*), (\w+)\)", v["query"])
        selector = re.sub(r'=~"\$\w+"', '=~".*"', metric.group(1))
        assert prometheus(f"count by ({metric.group(2)}) ({selector})"), v["name"]


# What each alert of contrib/prometheus/xdpoib.rules.yml watches: on healthy attachments every one of these
# has a series per attachment (so the alert's metrics and label matching are real) while the alert is quiet.
# XdpoibDrops watches drops, which exist only once something was dropped: the test makes some.
SIGNALS = {
    "XdpoibExporterDown": 'up{job="xdpoib"}',
    "XdpoibAgentDown": "xdpoib_up",
    "XdpoibBroadcastGroupNotJoined": "xdpoib_broadcast_joined",
    "XdpoibPortNotActive": 'xdpoib_port_info{state="active"}',
    "XdpoibSAFailureRatio": "sum by (instance, netns, ifname) (rate(xdpoib_sa_queries_total[10m]))",
    "XdpoibPeersNearCap": "xdpoib_peers / on (instance, netns, ifname) xdpoib_peers_max",
    "XdpoibAgentSaturated": 'xdpoib_agent_cpu_seconds_total{mode="user"}',
}


def alerting_rules(prometheus) -> dict[str, dict]:
    return {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"] if r["type"] == "alerting"}


def alerts(prometheus, name: str, netns: str) -> list[dict]:
    return [a for a in prometheus.api("alerts")["alerts"]
            if a["labels"].get("alertname") == name and a["labels"].get("netns") == netns]


def lldp_burst(ns: str, count: int) -> None:
    """Send `count` LLDP frames from eth4's own MAC in `ns` (the TX program drops them: unsupported EtherType)."""
    code = ("import socket\n"
            "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
            "s.bind(('eth4', 0))\n"
            "frame = bytes.fromhex('0180c200000e') + s.getsockname()[4] + bytes.fromhex('88cc') + bytes(46)\n"
            f"for _ in range({count}):\n"
            "    s.send(frame)\n")
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, timeout=60)


def test_alert_rules_are_quiet_on_healthy_attachments_and_the_drop_alert_fires(pair, prometheus):
    _, names = pair
    (ns1, _) = names
    want = (PROMETHEUS / "xdpoib.rules.yml").read_text().count("- alert:")
    rules = until(lambda: (r := alerting_rules(prometheus)) and len(r) == want
                  and all(not x["lastEvaluation"].startswith("0001") for x in r.values()) and r, 15)
    assert rules, f"prometheus did not load and evaluate the {want} alert rules"
    assert set(rules) == {*SIGNALS, "XdpoibDrops"}
    for name, r in rules.items():
        assert r["health"] == "ok", (name, r.get("lastError"))
        fired = {x["metric"].get("netns") for x in prometheus(r["query"])}
        assert not fired & set(names), f"{name} fires on a healthy attachment: {r['query']}"
        assert not alerts(prometheus, name, ns1), name
    for name, watched in SIGNALS.items():
        got = prometheus(watched)
        if name == "XdpoibExporterDown":
            assert [float(x["value"][1]) for x in got] == [1.0]
        else:
            assert {x["metric"].get("netns") for x in got} >= set(names), f"{name}: {watched} -> {got}"
    # drops: the counter must exist in Prometheus before the burst, or its first sample is the whole burst
    lldp_burst(ns1, 5)
    sel = f'xdpoib_drops_total{{netns="{ns1}",direction="tx",reason="unsupported_ethertype"}}'
    assert until(lambda: prometheus(f"count_over_time({sel}[1m]) >= 2"), 15), "the first drops are not scraped"
    lldp_burst(ns1, 2000)
    drops = rules["XdpoibDrops"]["query"]
    fired = until(lambda: [x["metric"] for x in prometheus(drops) if x["metric"].get("netns") == ns1], 15)
    assert fired == [{"instance": fired[0]["instance"], "netns": ns1, "ifname": "eth4", "direction": "tx",
                      "reason": "unsupported_ethertype"}], fired
    pending = until(lambda: alerts(prometheus, "XdpoibDrops", ns1), 10)
    assert pending and pending[0]["state"] == "pending", pending          # `for: 10m` has not passed


def test_agent_killed_then_reattached_counters_carry_on(pair, exporter_port, prometheus):
    fab, (ns1, ns2) = pair
    assert ping(ns2, "10.79.0.1", count=2)
    pid = json.loads(x("status", "eth4", "--netns", ns1, "-j").stdout)["attachment"]["pid"]
    os.kill(pid, signal.SIGKILL)
    # the scrape goes on: the dead agent is down, its BPF counters are still read from the pins
    m = until(lambda: (s := scrape(exporter_port)) and value(s, "xdpoib_up", netns=ns1) == 0 and s, 10)
    assert m, "the exporter still reports the killed agent up"
    before = value(m, "xdpoib_packets_total", netns=ns1, direction="tx")
    assert before and before >= 2
    assert value(m, "xdpoib_up", netns=ns2) == 1
    assert until(lambda: prometheus(f'xdpoib_up{{netns="{ns1}"}} == 0'), 10), "prometheus never saw it down"
    down = until(lambda: alerts(prometheus, "XdpoibAgentDown", ns1), 10)
    assert down and down[0]["state"] == "pending" and down[0]["labels"]["severity"] == "critical", down
    x("attach", "eth4", "--netns", ns1, "--sim", f"{fab.name}:h1")
    assert ping(ns1, "10.79.0.2", count=2)
    m = scrape(exporter_port)
    assert value(m, "xdpoib_up", netns=ns1) == 1
    assert value(m, "xdpoib_agent_events_total", netns=ns1, event="adopted_datapath") == 1
    after = value(m, "xdpoib_packets_total", netns=ns1, direction="tx")
    assert after >= before + 2, (before, after)
    # Prometheus saw the counter carry on through the restart: no reset in the window
    assert until(lambda: prometheus(f'xdpoib_packets_total{{netns="{ns1}",direction="tx"}} >= {after}'), 10)
    resets = prometheus(f'resets(xdpoib_packets_total{{netns="{ns1}",direction="tx"}}[5m])')
    assert resets and float(resets[0]["value"][1]) == 0, resets
    assert until(lambda: not alerts(prometheus, "XdpoibAgentDown", ns1), 10), "the agent-down alert stays"
