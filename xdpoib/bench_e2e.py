"""`xdpoib bench e2e`: end-to-end throughput of two attached hosts over the sim fabric, for each
datapath, measured in the same run (DESIGN 8).

Two namespaces, eth4 attached in each to a host of a throwaway sim fabric (real OpenSM), then a UDP
flood of small datagrams (iperf3, 64-byte payloads) from host 1 to host 2; the receiver's count of
datagrams over the measured seconds is the rate. Rounds alternate the datapaths, so a noisy machine
affects both alike; the medians and the ratio of the translating XDP datapath to the plain one (the
oracle in Python for every frame: the naive translator) are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

from xdpoib.errors import XdpoibError

DATAPATHS = ("plain", "bpf")


class BenchError(XdpoibError):
    """The benchmark could not run."""


@dataclass
class E2EResult:
    """Received datagrams per second, per datapath and round."""

    seconds: float
    payload: int
    pps: dict[str, list[float]] = field(default_factory=dict)

    def as_json(self) -> dict:
        med = {k: statistics.median(v) for k, v in self.pps.items()}
        return {"payload_bytes": self.payload, "seconds": self.seconds, "rounds": len(self.pps["bpf"]),
                **{k: {"pps": round(v), "samples": [round(x) for x in self.pps[k]]} for k, v in med.items()},
                "ratio_bpf_to_plain": round(med["bpf"] / med["plain"], 2) if med["plain"] else None}


def _x(env, *args):
    r = subprocess.run([sys.executable, "-m", "xdpoib", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    if r.returncode != 0:
        raise BenchError(f"xdpoib {' '.join(args)}: {r.stderr.strip()}")


def _flood(ns: list[str], seconds: float, payload: int) -> float:
    """Datagrams per second that the receiver (ns[1]) got from a UDP flood from ns[0]."""
    server = subprocess.Popen(["ip", "netns", "exec", ns[1], "iperf3", "-s", "-1", "-B", "10.99.0.2", "-J"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(50):
            ss = subprocess.run(["ip", "netns", "exec", ns[1], "ss", "-lun"], capture_output=True, text=True)
            if ":5201" in ss.stdout:
                break
            subprocess.run(["sleep", "0.1"])
        client = subprocess.run(["ip", "netns", "exec", ns[0], "iperf3", "-c", "10.99.0.2", "-u", "-b", "0",
                                 "-l", str(payload), "-t", str(seconds), "-J"], capture_output=True, text=True,
                                timeout=seconds + 60)
        out, _ = server.communicate(timeout=seconds + 60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    try:
        end = json.loads(out)["end"]["sum"]
    except (ValueError, KeyError):
        raise BenchError(f"iperf3 gave no result: {client.stdout[-300:]} {client.stderr[-300:]}") from None
    return (end["packets"] - end["lost_packets"]) / end["seconds"]


def run_e2e(seconds: float = 5.0, rounds: int = 3, payload: int = 64) -> E2EResult:
    """Set up a fabric and two namespaces, measure each datapath `rounds` times, tear down."""
    from xdpoib.fabric.simfabric import SimFabric

    tag = uuid.uuid4().hex[:5]
    ns = [f"xb{tag}{i}" for i in (1, 2)]
    res = E2EResult(seconds, payload, {d: [] for d in DATAPATHS})
    fab = SimFabric.up(f"bench{tag}", hosts=2)
    try:
        for n in ns:
            subprocess.run(["ip", "netns", "add", n], check=True)
        for _ in range(rounds):
            for dp in DATAPATHS:
                env = {**os.environ, "XDPOIB_DATAPATH": dp}
                try:
                    for i, n in enumerate(ns, 1):
                        _x(env, "attach", "eth4", "--netns", n, "--sim", f"{fab.name}:h{i}")
                        subprocess.run(["ip", "-n", n, "addr", "add", f"10.99.0.{i}/24", "dev", "eth4"], check=True)
                    subprocess.run(["ip", "netns", "exec", ns[0], "ping", "-c", "2", "-W", "2", "10.99.0.2"],
                                   capture_output=True)
                    res.pps[dp].append(_flood(ns, seconds, payload))
                finally:
                    for n in ns:
                        subprocess.run([sys.executable, "-m", "xdpoib", "detach", "eth4", "--netns", n],
                                       capture_output=True, env=env)
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        fab.down()
    return res
