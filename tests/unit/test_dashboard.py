"""The Grafana dashboard: valid JSON with a stable uid, variables chained datasource -> job -> instance
-> netns -> ifname, a unit and a description on every panel, and only metrics the exporter defines.
Also the exporter without root: metric name conventions, scrapes with dead and hung agents, bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from xdpoib.exporter import METRICS, series_names

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "xdpoib.json"
CHAIN = ["datasource", "job", "instance", "netns", "ifname"]
METRIC_RE = re.compile(r"\b(xdpoib_[a-z0-9_]+)")


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_uid_and_title_are_stable(dash):
    assert dash["uid"] == "xdpoib-overview"
    assert dash["title"] == "xdpoib overview"


def test_every_panel_has_unit_description_and_targets(dash):
    assert len(dash["panels"]) >= 6
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} has no unit"
        assert len(p.get("description", "").strip()) > 20, f"panel {p['title']!r} has no description"
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"
        assert all(k in p["gridPos"] for k in ("x", "y", "w", "h"))


def test_variables_chain_datasource_job_instance_netns_ifname(dash):
    vs = dash["templating"]["list"]
    assert [v["name"] for v in vs] == CHAIN
    assert vs[0]["type"] == "datasource" and vs[0]["query"] == "prometheus"
    for i, v in enumerate(vs[1:], 1):
        assert v["datasource"]["uid"] == "${datasource}"
        earlier = re.findall(r"\$(\w+)", v["query"])
        # each variable's query filters by every variable before it (but the datasource) and none after
        assert set(earlier) == set(CHAIN[1:i]), (v["name"], earlier)
        assert METRIC_RE.search(v["query"]).group(1) in METRICS


def test_every_panel_filters_by_every_variable(dash):
    for title, expr in panel_exprs(dash):
        for name in CHAIN[1:]:
            assert f'{name}=~"${name}"' in expr, f"{title!r} ignores ${name}: {expr}"


def test_every_metric_a_panel_uses_is_one_the_exporter_defines(dash):
    known = series_names()
    used = set()
    for title, expr in panel_exprs(dash):
        names = METRIC_RE.findall(expr)
        assert names, f"{title!r} queries no xdpoib metric: {expr}"
        for n in names:
            assert n in known, f"{title!r} uses {n}, which the exporter does not define"
        used |= set(names)
    # the dashboard covers the core metrics the brief lists
    for core in ("xdpoib_packets_total", "xdpoib_drops_total", "xdpoib_peers", "xdpoib_mcast_groups",
                 "xdpoib_up", "xdpoib_port_info"):
        assert core in used, f"no panel shows {core}"


def test_metric_names_follow_the_conventions():
    for name, kind in METRICS.items():
        assert name.startswith("xdpoib_")
        assert name.endswith("_total") == (kind == "counter"), name
        assert kind in ("gauge", "counter", "histogram")


def test_exporter_scrape_with_a_dead_agent_reports_it_down(tmp_path, monkeypatch):
    """No root needed: an attachment whose agent is gone is `xdpoib_up 0`, and the scrape still works."""
    from prometheus_client.parser import text_string_to_metric_families

    from xdpoib import __version__, exporter, state

    monkeypatch.setenv("XDPOIB_RUN_DIR", str(tmp_path))
    state.write_spec(state.AttachSpec(ifname="eth9", netns=None, fabric="f", host="h1", pid=None))
    state.write_spec(state.AttachSpec(ifname="eth4", netns="blue", fabric="f", host="h2", pid=2 ** 22 + 1))
    fams = {f.name: f for f in text_string_to_metric_families(exporter.exposition())}
    assert [s.labels for s in fams["xdpoib_build_info"].samples] == [{"version": __version__}]
    ups = {(s.labels["netns"], s.labels["ifname"]): s.value for s in fams["xdpoib_up"].samples}
    assert ups == {("", "eth9"): 0.0, ("blue", "eth4"): 0.0}
    assert not fams["xdpoib_packets"].samples and not fams["xdpoib_peers"].samples
    for f in fams.values():
        for s in f.samples:
            assert s.name in series_names(), s.name


@pytest.mark.parametrize("listen", ["foo", "127.0.0.1", "127.0.0.1:99999", ":9645", "[::1]"])
def test_exporter_bad_listen_address_is_one_clear_line(listen):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "xdpoib", "exporter", "--listen", listen], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"xdpoib: error: --listen wants ADDR:PORT (e.g. 127.0.0.1:9645), "
                                             f"not {listen!r}"]


def test_exporter_listen_addresses_parse():
    from xdpoib.exporter import parse_listen

    assert parse_listen("127.0.0.1:9645") == ("127.0.0.1", 9645)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    assert parse_listen("0.0.0.0:1") == ("0.0.0.0", 1)


def test_exporter_scrape_survives_an_agent_that_never_answers(tmp_path, monkeypatch):
    """A live process whose control socket accepts but never answers: that attachment is down, the
    scrape still completes with every other attachment in it."""
    import socket

    from prometheus_client.parser import text_string_to_metric_families

    from xdpoib import exporter, state

    monkeypatch.setenv("XDPOIB_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(exporter, "STATUS_TIMEOUT", 0.5)
    hung = state.AttachSpec(ifname="eth4", netns="hung", fabric="f", host="h1", pid=os.getpid())
    state.write_spec(hung)
    state.write_spec(state.AttachSpec(ifname="eth5", netns=None, fabric="f", host="h2", pid=None))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(state.socket_path(hung.id)))
        srv.listen(4)
        fams = {f.name: f for f in text_string_to_metric_families(exporter.exposition())}
    ups = {(s.labels["netns"], s.labels["ifname"]): s.value for s in fams["xdpoib_up"].samples}
    assert ups == {("hung", "eth4"): 0.0, ("", "eth5"): 0.0}
