"""The service side: `xdpoib up`/`down` from an attachments file, and `xdpoib run` in the foreground
(what the systemd unit runs) cleaning up on SIGTERM; a restarted attachment keeps its REMACs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labkit import namespaces, xdpoib

SIM_HOSTS = 2


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "XDPOIB_CONFIG": str(tmp_path / "attachments.conf")}


@pytest.fixture
def two_ns():
    with namespaces("xs", 2) as names:
        yield names


def x(env, *args, check=True):
    return xdpoib(*args, check=check, env=env)


def status(env, ns):
    return json.loads(x(env, "status", "eth4", "--netns", ns, "-j").stdout)


def test_up_and_down_from_the_attachments_file(sim_fabric, env, two_ns):
    Path(env["XDPOIB_CONFIG"]).write_text(
        "# test attachments\n" + "".join(f"eth4 --netns {ns} --sim {sim_fabric.name}:h{i}   # host {i}\n"
                                         for i, ns in enumerate(two_ns, 1)))
    out = x(env, "up").stdout
    assert out.count("attached") == 2
    assert "already attached" in x(env, "up").stdout            # idempotent
    for i, ns in enumerate(two_ns, 1):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"10.88.0.{i}/24", "dev", "eth4"], check=True)
    r = subprocess.run(["ip", "netns", "exec", two_ns[0], "ping", "-c", "2", "-W", "3", "10.88.0.2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert x(env, "down").stdout.count("detached") == 2
    assert "not attached" in x(env, "down").stdout
    for ns in two_ns:
        assert "eth4" not in subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout


def test_bad_attachments_file_line_is_named(sim_fabric, env):
    Path(env["XDPOIB_CONFIG"]).write_text("eth4 --sim\n")
    r = x(env, "up", check=False)
    assert r.returncode != 0 and "attachments.conf:1" in r.stderr and "Traceback" not in r.stderr


def test_run_in_foreground_stops_cleanly_and_keeps_remacs_across_restarts(sim_fabric, env, two_ns):
    ns1, ns2 = two_ns
    Path(env["XDPOIB_CONFIG"]).write_text(f"eth4 --netns {ns1} --sim {sim_fabric.name}:h1\n")
    x(env, "attach", "eth4", "--netns", ns2, "--sim", f"{sim_fabric.name}:h2")
    subprocess.run(["ip", "-n", ns2, "addr", "add", "10.89.0.2/24", "dev", "eth4"], check=True)

    def start():
        p = subprocess.Popen([sys.executable, "-m", "xdpoib", "run", f"{ns1}:eth4"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(300):
            try:
                if status(env, ns1)["attachment"]["state"] == "running":
                    return p
            except AssertionError:
                pass
            assert p.poll() is None, p.stdout.read()
            time.sleep(0.1)
        raise AssertionError("agent not running")

    def ping_and_remac():
        subprocess.run(["ip", "-n", ns1, "addr", "replace", "10.89.0.1/24", "dev", "eth4"], check=True)
        r = subprocess.run(["ip", "netns", "exec", ns1, "ping", "-c", "1", "-W", "3", "10.89.0.2"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
        neigh = subprocess.run(["ip", "-n", ns1, "neigh", "show", "10.89.0.2"], capture_output=True, text=True)
        return neigh.stdout.split("lladdr ")[1].split()[0]

    p = start()
    assert p.pid == status(env, ns1)["attachment"]["pid"]       # exec'd: the agent is this process
    first = ping_and_remac()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0
    assert "eth4" not in subprocess.run(["ip", "-n", ns1, "link"], capture_output=True, text=True).stdout
    assert x(env, "status", "eth4", "--netns", ns1, check=False).returncode != 0

    p = start()                                                  # a restart learns the peer again...
    try:
        assert ping_and_remac() == first                         # ...under the same REMAC
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)


def test_up_honours_force_on_a_line_of_the_attachments_file(sim_fabric, env, two_ns):
    from xdpoib.state import pid_alive

    ns = two_ns[0]
    Path(env["XDPOIB_CONFIG"]).write_text(f"eth4 --netns {ns} --sim {sim_fabric.name}:h1 --force\n")
    assert x(env, "up").stdout.strip() == f"eth4 in netns {ns}: attached"
    first = status(env, ns)["attachment"]["pid"]
    out = x(env, "up").stdout.strip()                           # running, and the line says --force
    st = status(env, ns)["attachment"]
    assert st["pid"] != first and st["state"] == "running"
    assert out == f"eth4 in netns {ns}: replaced (agent pid {first} -> {st['pid']})"
    assert not pid_alive(first)
    assert x(env, "down").stdout.count("detached") == 1
