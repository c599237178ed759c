"""The qemu tier: the product and the `verbs` backend on real kernel verbs (Soft-RoCE) inside a qemu guest.

The module fixture builds (or reuses) the guest image with tools/qemu/build-image.sh, boots it once with
tools/qemu/boot.sh (the current project appended, with the pure-Python dependencies this interpreter
imports), and parses the serial console. Each check the guest runs is one test here: a missing
`XDPOIB-RESULT` line fails, and so does an infrastructure failure (no mirror, qemu error, timeout), each
with its own message. The guest's measurements (`XDPOIB-MEASURE`: attach times, TCP and UDP rates on
rxe) are printed with the tier's timings.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from contract import contract_suite
from prereq import need_cmd, need_root

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "qemu"
CACHE = Path(os.environ.get("XDPOIB_QEMU_CACHE", REPO / ".cache" / "qemu"))
BUILD_TIMEOUT = 1200
BOOT_TIMEOUT = int(os.environ.get("XDPOIB_QEMU_TIMEOUT", "1500"))   # a loaded 2-core host: >900 s seen

# The product end to end on rxe (tests/qemu/guest/test_agent_roce.py).
AGENT_CHECKS = [
    "agent_roce::test_attach_runs_the_agent_on_verbs_with_the_roce_provider",
    "agent_roce::test_arp_and_ipv4_ping_both_ways",
    "agent_roce::test_ipv6_ping_with_nd_translated",
    "agent_roce::test_iperf3_tcp_transfer_arrives_intact",
    "agent_roce::test_udp_frames_per_second_each_way",
    "agent_roce::test_multicast_reaches_a_joined_socket",
    "agent_roce::test_qp_error_is_recovered_on_rxe",
    "agent_roce::test_killed_agent_is_succeeded_by_one_that_adopts_the_datapath",
    "agent_roce::test_restart_hands_over_on_verbs_without_losing_pings",
    "agent_roce::test_detach_leaves_no_verbs_resources_behind",
]
# The guest's own checks of the backend (tests/qemu/guest/test_verbs_roce.py), besides the contract suite.
VERBS_CHECKS = [
    "verbs_roce::test_unknown_device_is_a_one_line_port_error",
    "verbs_roce::test_qp_reaches_rts_with_qkey",
    "verbs_roce::test_unicast_both_ways",
    "verbs_roce::test_wrong_qkey_is_dropped",
    "verbs_roce::test_oversize_is_refused_by_the_sender",
    "verbs_roce::test_multicast_attach_detach_with_delivery",
    "verbs_roce::test_ipoib_arp_and_ipv4_exchange",
    "verbs_roce::test_length_error_leaves_the_qp_in_error_and_sends_are_counted",
    "verbs_roce::test_async_qp_error_flushes_buffers_and_an_attached_qp_is_destroyed",
    "verbs_roce::test_send_memory_is_a_memory_region_sent_from_in_place",
    "verbs_roce::test_frames_in_flight_come_back_after_an_async_qp_error",
    "verbs_roce::test_send_ring_accepts_what_it_holds_and_frees_with_each_signaled_tail",
    "verbs_roce::test_receive_pool_in_a_mmapped_bpf_array_map",
    "verbs_roce::test_port_events_follow_the_netdev",
]
CONTRACT_CHECKS = [f"contract_verbs::{name}" for name, fn in inspect.getmembers(contract_suite)
                   if name.startswith("test_") and inspect.isfunction(fn)]

RESULT = re.compile(r"^XDPOIB-RESULT (\S+) (PASS|FAIL|SKIP) ?(.*)$")
MEASURE = re.compile(r"^XDPOIB-MEASURE (\S+) (.*)$")
GUEST_SITE = ("pyroute2", "prometheus_client")     # not in bookworm at the version the project needs
SUMMARY = re.compile(r"^XDPOIB-SUMMARY passed=(\d+) failed=(\d+) skipped=(\d+) total=(\d+) exit=(-?\d+)")


@dataclass
class GuestRun:
    """What one boot of the guest reported."""

    results: dict[str, tuple[str, str]]     # name -> (verdict, detail)
    summary: tuple[int, ...] | None         # passed, failed, skipped, total, exit
    console: str
    measures: dict[str, str]

    def tail(self, n: int = 25) -> str:
        """The last n console lines, for failure messages."""
        return "\n".join(self.console.splitlines()[-n:])


def _say(request, line: str) -> None:
    """Print a line on the terminal even while output is captured (the tier's timings)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module")
def guest(request) -> GuestRun:
    """Build (cached) and boot the guest once; parse its console."""
    need_root()
    need_cmd("qemu-system-x86_64", "debootstrap", "cpio")
    t0 = time.monotonic()
    build = subprocess.run(["bash", str(TOOLS / "build-image.sh"), str(CACHE)], capture_output=True,
                           text=True, timeout=BUILD_TIMEOUT)
    if build.returncode == 3:
        pytest.fail(f"qemu tier INFRASTRUCTURE failure: {build.stderr.strip().splitlines()[-1]}", pytrace=False)
    if build.returncode != 0 or not build.stdout.strip():
        pytest.fail(f"qemu tier: guest image build failed (exit {build.returncode}):\n{build.stderr[-3000:]}",
                    pytrace=False)
    image = build.stdout.strip().splitlines()[-1]
    t1 = time.monotonic()
    env = {**os.environ, "XDPOIB_GUEST_SITE": " ".join(_package_dir(name) for name in GUEST_SITE)}
    with tempfile.TemporaryDirectory(prefix="xdpoib-qemu-") as tmp:
        log = Path(tmp) / "serial.log"
        boot = subprocess.run(["bash", str(TOOLS / "boot.sh"), image, str(log), str(BOOT_TIMEOUT)],
                              capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, env=env)
        console = log.read_text(errors="replace") if log.exists() else ""
    t2 = time.monotonic()
    _say(request, f"qemu tier: image {t1 - t0:.1f}s ({'cached' if 'cached image' in build.stderr else 'built'}),"
                  f" boot + guest tests {t2 - t1:.1f}s")
    run = GuestRun({}, None, console.replace("\r", ""), {})
    for line in run.console.splitlines():
        if m := RESULT.match(line.strip()):
            run.results[m[1]] = (m[2], m[3])
        elif m := MEASURE.match(line.strip()):
            run.measures[m[1]] = m[2]
        elif m := SUMMARY.match(line.strip()):
            run.summary = tuple(int(x) for x in m.groups())
    if run.measures:
        _say(request, "qemu tier: measured in the guest: " + ", ".join(f"{k} {v}" for k, v in run.measures.items()))
    if boot.returncode == 124:
        pytest.fail(f"qemu tier: guest TIMEOUT after {BOOT_TIMEOUT}s, killed; console tail:\n{run.tail()}",
                    pytrace=False)
    if boot.returncode != 0:
        pytest.fail(f"qemu tier INFRASTRUCTURE failure: qemu exited {boot.returncode}: {boot.stderr[-2000:]}",
                    pytrace=False)
    if "guest-setup" in run.results and run.results["guest-setup"][0] == "FAIL":
        pytest.fail(f"qemu tier: guest setup failed: {run.results['guest-setup'][1]}\n{run.tail()}",
                    pytrace=False)
    return run


def _package_dir(name: str) -> str:
    """Where this interpreter imports a pure-Python package from (copied into the guest)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"qemu tier: {name} is not importable here: run `make setup`", pytrace=False)
    return next(iter(spec.submodule_search_locations))


def test_guest_reported_a_clean_summary(guest):
    assert guest.summary is not None, f"no XDPOIB-SUMMARY line: the guest died early; console tail:\n{guest.tail()}"
    passed, failed, skipped, total, _exit = guest.summary
    failures = {k: v[1] for k, v in guest.results.items() if v[0] == "FAIL"}
    assert failed == 0 and not failures, f"guest failures: {failures}"
    assert total == len(guest.results) and passed + skipped == total
    skips = {k: v[1] for k, v in guest.results.items() if v[0] == "SKIP"}
    assert not skips, f"nothing may skip in the guest: {skips}"


@pytest.mark.parametrize("name", AGENT_CHECKS + CONTRACT_CHECKS + VERBS_CHECKS)
def test_guest_check(guest, name):
    found = {k: v for k, v in guest.results.items() if k == name or k.startswith(name + "[")}
    assert found, f"missing result line for {name}; console tail:\n{guest.tail()}"
    for key, (verdict, detail) in found.items():
        assert verdict == "PASS", f"{key}: {verdict} {detail}"
