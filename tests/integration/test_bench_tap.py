"""`xdpoib bench tap` through the real CLI with short samples: one JSON object with the expected keys,
every rate and CPU figure positive, the frames behind the hop MTU-sized with valid checksums (none above
1514 bytes reached XDP, TSO super-frames included), and no `xbt*` link left; and, as a negative
control, the check does flag a hop whose veth end kept its offloads. Figures are printed, never
asserted against a target."""

from __future__ import annotations

import json
import subprocess
import sys

from prereq import need_cmd, need_file, need_module, need_root

from xdpoib.bench.tap import KEYS, PATH_KEYS, PATHS, format_table


def links_left() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [ln.split(":")[1].strip() for ln in out.splitlines() if ln.split(":")[1].strip().startswith("xbt")]


def test_bench_tap_smoke(tmp_path, figures):
    need_root()
    need_cmd("ip", "ethtool")
    need_module("bcc")
    need_file("/dev/net/tun")
    r = subprocess.run([sys.executable, "-m", "xdpoib", "bench", "tap", "--json", "--seconds", "0.5",
                        "--rounds", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)                       # exactly one object: anything else on stdout fails here
    figures("bench tap (0.5 s, 1 round): " + json.dumps(res) + "\n" + format_table(res))
    assert list(res) == list(KEYS)
    assert list(res["paths"]) == [key for key, *_ in PATHS]
    for key, p in res["paths"].items():
        assert list(p) == list(PATH_KEYS), key
        assert p["per_s"] > 0 and p["cpu_us"] > 0 and p["rate_vs_tap"] > 0 and p["cpu_vs_tap"] > 0, (key, p)
        assert p["counted"] > 0 and p["writes"] > 0, (key, p)
    tso = res["paths"]["hop_tso"]
    assert tso["unit"] == "segments" and tso["oversize"] == 0, tso
    assert tso["counted"] > tso["writes"]            # super-frames arrived as segments
    assert all(res["paths"][k]["oversize"] == 0 for k in ("hop_complete", "hop_partial"))
    assert res["checks"] == {"hop_complete": [], "hop_partial": [], "hop_tso": []}, res["checks"]
    assert not links_left(), links_left()


def test_bench_tap_refuses_bad_settings_before_creating_anything():
    for args in (["--seconds", "0"], ["--rounds", "0"]):
        r = subprocess.run([sys.executable, "-m", "xdpoib", "bench", "tap", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert args[0] in r.stderr
    assert not links_left()


def test_the_check_sees_a_hop_with_its_offloads_left_on(monkeypatch):
    """Negative control: with tx checksum, TSO and USO left on at the bridge's veth end (as the agent
    does not leave them), the partial checksums reach XDP unfinished and the bench says so."""
    need_root()
    need_cmd("ip", "ethtool")
    need_module("bcc")
    need_file("/dev/net/tun")
    from xdpoib import link
    from xdpoib.bench import tap as bench_tap

    real = link.set_offloads

    def left_on(ifname, netns=None, **wanted):
        if ifname.startswith("xbt") and ifname.endswith("s"):
            wanted = {"tx": True, "tso": True, "uso": True, "gro": True}
        return real(ifname, netns, **wanted)

    monkeypatch.setattr(link, "set_offloads", left_on)
    res = bench_tap.run_tap(0.2, 1)
    assert res["checks"]["hop_complete"] == []
    assert "bad TCP checksum" in res["checks"]["hop_partial"], res["checks"]
    assert "bad TCP checksum" in res["checks"]["hop_tso"], res["checks"]
    assert not links_left(), links_left()
