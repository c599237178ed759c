"""contrib/prometheus/: promtool accepts the example config and the alert rules, every alert uses only
metrics the exporter exports, and each alert fires on the series it watches and stays quiet below its
threshold (`promtool test rules` over synthetic series). The exporter test runs the same rules on a real
Prometheus scraping real attachments."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from prereq import need_cmd, need_module

from xdpoib.exporter import series_names

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"
RULES = CONTRIB / "xdpoib.rules.yml"
CONFIG = CONTRIB / "prometheus.yml"
METRIC_RE = re.compile(r"\b(xdpoib_[a-z0-9_]+|up)\b(?!\s*\()")
ALERTS = {"XdpoibExporterDown", "XdpoibAgentDown", "XdpoibBroadcastGroupNotJoined", "XdpoibPortNotActive",
          "XdpoibSAFailureRatio", "XdpoibDrops", "XdpoibPeersNearCap", "XdpoibAgentSaturated"}


def promtool(*args: str, cwd: Path = CONTRIB) -> subprocess.CompletedProcess:
    need_cmd("promtool")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture(scope="module")
def rules() -> dict[str, dict]:
    need_module("yaml")
    import yaml

    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_promtool_accepts_the_rules():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout


def test_promtool_accepts_the_example_config_and_finds_its_rules():
    r = promtool("check", "config", str(CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout


def test_promtool_refuses_a_broken_rule(tmp_path):
    """The check is real: a rule with a bad expression fails it."""
    bad = tmp_path / "bad.yml"
    bad.write_text(RULES.read_text().replace("expr: xdpoib_up == 0", "expr: xdpoib_up == == 0"))
    r = promtool("check", "rules", str(bad))
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def test_every_alert_is_there_with_severity_for_and_annotations(rules):
    assert set(rules) == ALERTS
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("critical", "warning"), name
        assert re.fullmatch(r"\d+m", r["for"]), name
        assert r["annotations"]["summary"] and len(r["annotations"]["description"]) > 60, name


def test_every_metric_an_alert_uses_is_one_the_exporter_exports(rules):
    known = series_names() | {"up"}
    for name, r in rules.items():
        used = set(METRIC_RE.findall(r["expr"]))
        assert used, name
        assert used <= known, (name, used - known)


def _labels(**kw) -> str:
    return ",".join(f'{k}="{v}"' for k, v in kw.items())


def _series(metric: str, values: str, **labels) -> dict:
    return {"series": f"{metric}{{{_labels(**labels)}}}", "values": values}


def _expect(rules: dict, alert: str, summary: str, **labels) -> dict:
    """One firing alert: its labels and annotations (the description with its label templates filled)."""
    desc = re.sub(r"{{ \$labels\.(\w+) }}", lambda m: labels.get(m.group(1), ""),
                  " ".join(rules[alert]["annotations"]["description"].split()))
    return {"exp_labels": {**labels, "severity": rules[alert]["labels"]["severity"]},
            "exp_annotations": {"summary": summary, "description": desc}}


def test_each_alert_fires_on_what_it_watches_and_not_below_its_threshold(rules, tmp_path):
    """Two attachments per case: `bad` crosses the alert's threshold, `good` stays just below it."""
    bad = {"instance": "h1:9645", "job": "xdpoib", "netns": "bad", "ifname": "eth4"}
    good = {**bad, "netns": "good"}
    host = {"instance": "h1:9645", "job": "xdpoib"}
    cases = [
        ("XdpoibExporterDown", "4m",
         [_series("up", "1 0 0 0 0", **host), _series("up", "1 1 1 1 1", instance="h2:9645", job="xdpoib")],
         [_expect(rules, "XdpoibExporterDown", "xdpoib exporter on h1:9645 does not answer", **host)]),
        ("XdpoibAgentDown", "4m",
         [_series("xdpoib_up", "1 1 0 0 0", **bad), _series("xdpoib_up", "1 1 1 1 1", **good)],
         [_expect(rules, "XdpoibAgentDown", "xdpoib agent of eth4 (netns 'bad') on h1:9645 is down", **bad)]),
        ("XdpoibBroadcastGroupNotJoined", "4m",
         [_series("xdpoib_broadcast_joined", "1 1 0 0 0", **bad),
          _series("xdpoib_broadcast_joined", "1 1 1 1 1", **good)],
         [_expect(rules, "XdpoibBroadcastGroupNotJoined",
                  "eth4 (netns 'bad') on h1:9645 is not in its broadcast group", **bad)]),
        ("XdpoibPortNotActive", "4m",
         [_series("xdpoib_up", "1 1 1 1 1", **bad), _series("xdpoib_up", "1 1 1 1 1", **good),
          _series("xdpoib_port_info", "1 1 stale", state="active", **bad),
          _series("xdpoib_port_info", "_ _ 1 1 1", state="down", **bad),
          _series("xdpoib_port_info", "1 1 1 1 1", state="active", **good),
          # an agent that is down is XdpoibAgentDown's business, not this alert's
          _series("xdpoib_up", "0 0 0 0 0", **{**bad, "netns": "dead"})],
         [_expect(rules, "XdpoibPortNotActive",
                  "fabric port of eth4 (netns 'bad') on h1:9645 is not active", **bad)]),
        ("XdpoibSAFailureRatio", "25m",
         [_series("xdpoib_sa_queries_total", "0+60x30", type="path", result="ok", **bad),
          _series("xdpoib_sa_queries_total", "0+30x30", type="path", result="timeout", **bad),
          _series("xdpoib_sa_queries_total", "0+10x30", type="join", result="error", **bad),
          _series("xdpoib_sa_queries_total", "0+80x30", type="path", result="ok", **good),
          _series("xdpoib_sa_queries_total", "0+20x30", type="path", result="timeout", **good)],
         [_expect(rules, "XdpoibSAFailureRatio", "40% of SA queries of eth4 on h1:9645 fail", **bad)]),
        ("XdpoibDrops", "25m",
         [_series("xdpoib_drops_total", "0+120x30", direction="tx", reason="unknown_vlan", **bad),
          _series("xdpoib_drops_total", "0+30x30", direction="tx", reason="oversize", **bad),
          _series("xdpoib_drops_total", "0+50x30", direction="agent", reason="path_failed", **good),
          _series("xdpoib_drops_total", "0+20x30", direction="fabric", reason="path_failed", **good)],
         [_expect(rules, "XdpoibDrops", "eth4 on h1:9645 drops 2 frames/s (tx: unknown_vlan)",
                  direction="tx", reason="unknown_vlan", **{k: bad[k] for k in ("instance", "netns", "ifname")})]),
        ("XdpoibPeersNearCap", "25m",
         [_series("xdpoib_peers", "950000+0x30", **bad), _series("xdpoib_peers_max", "1000000+0x30", **bad),
          _series("xdpoib_peers", "890000+0x30", **good), _series("xdpoib_peers_max", "1000000+0x30", **good)],
         [_expect(rules, "XdpoibPeersNearCap", "eth4 on h1:9645 holds 95% of its peer table", **bad)]),
        # CPU seconds per 1 min step: 45 user + 12 system = 0.95 of a CPU against 39 + 12 = 0.85
        ("XdpoibAgentSaturated", "25m",
         [_series("xdpoib_agent_cpu_seconds_total", "0+45x30", mode="user", **bad),
          _series("xdpoib_agent_cpu_seconds_total", "0+12x30", mode="system", **bad),
          _series("xdpoib_agent_cpu_seconds_total", "0+39x30", mode="user", **good),
          _series("xdpoib_agent_cpu_seconds_total", "0+12x30", mode="system", **good)],
         [_expect(rules, "XdpoibAgentSaturated", "the agent of eth4 on h1:9645 uses 95% of a CPU",
                  **{k: bad[k] for k in ("instance", "netns", "ifname")})]),
    ]
    for c in cases:
        for e in c[3]:                    # the alert keeps only what its expression keeps
            if c[0] in ("XdpoibSAFailureRatio", "XdpoibPeersNearCap"):
                e["exp_labels"].pop("job")
    tests = [{"interval": "1m", "input_series": series,
              "alert_rule_test": [{"eval_time": "1m", "alertname": name, "exp_alerts": []},
                                  {"eval_time": at, "alertname": name, "exp_alerts": expected}]}
             for name, at, series, expected in cases]
    assert {c[0] for c in cases} == ALERTS
    spec = tmp_path / "xdpoib.rules.test.json"          # JSON is YAML, which promtool reads
    spec.write_text(json.dumps({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}, indent=1))
    r = promtool("test", "rules", str(spec), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "SUCCESS" in r.stdout
