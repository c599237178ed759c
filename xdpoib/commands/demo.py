"""`xdpoib demo`: three Ethernet hosts on a simulated fabric with a real OpenSM, talking IPoIB; then
the eIPoIB scenario: host 1 becomes a bridge host (br0 with eth4 as its uplink, two guests as
namespaces on veth ports of br0), each guest its own VIF with its own QPN, seen as such by host 2 and
by OpenSM; host 1's VLAN 3 is mapped to partition 0x8003 (h1 and h2 are its members)."""

from __future__ import annotations

import subprocess
import sys
import time

from xdpoib.errors import XdpoibError

NAME = "demo"
HELP = "run the three-host demo on a simulated fabric (OpenSM on ibsim)"
ROOT = "network namespaces, XDP and the fabric"
EPILOG = """examples:
  xdpoib demo           run it and tear everything down
  xdpoib demo --keep    leave the fabric and hosts running for exploring
"""
FABRIC = "demo"
HOSTS = 3
GUESTS = 2


def configure(p):
    p.add_argument("--keep", action="store_true", help="leave the demo running (`xdpoib demo --down` ends it)")
    p.add_argument("--down", action="store_true", help="tear down a demo left running with --keep")


def ns_name(i: int) -> str:
    return f"xdpoib-demo{i}"


def guest_name(i: int) -> str:
    return f"xdpoib-demo-g{i}"


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def show(cmd: list[str], ns: str | None = None) -> subprocess.CompletedProcess:
    """Run a command (in a namespace), echoing it and its output like a terminal session."""
    from xdpoib.link import in_netns

    full = in_netns(ns, cmd)
    where = f"[{ns}] " if ns else ""
    print(f"{where}$ {' '.join(cmd)}", flush=True)
    r = subprocess.run(full, capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    return r


def xdpoib(*args: str) -> subprocess.CompletedProcess:
    return show([sys.executable, "-m", "xdpoib", *args])


def teardown() -> None:
    """Detach every demo host, delete the namespaces, stop the fabric (each step tolerates absence)."""
    from xdpoib import state
    from xdpoib.commands.detach import detach
    from xdpoib.fabric.simfabric import SimFabric

    for i in range(1, HOSTS + 1):
        s = state.read_spec(state.attachment_id("eth4", ns_name(i)))
        if s is not None:
            detach(s)
        subprocess.run(["ip", "netns", "del", ns_name(i)], capture_output=True)
    for i in range(1, GUESTS + 1):
        subprocess.run(["ip", "netns", "del", guest_name(i)], capture_output=True)
    try:
        SimFabric.attach(FABRIC).down()
    except XdpoibError:
        pass


def bridge_scenario(fab) -> None:
    """Steps 7-9: guests behind a bridge on host 1's eth4, each its own IPoIB endpoint (eIPoIB's VIFs)."""
    import json

    h1 = ns_name(1)
    step("7. Host 1 as a bridge host: br0 with eth4 as its uplink, two guests on veth ports")
    r = subprocess.run(["ip", "-n", h1, "-j", "link", "show", "eth4"], capture_output=True, text=True)
    if r.returncode != 0:
        raise XdpoibError(f"host 1's eth4 is gone: {r.stderr.strip()}")
    mac = json.loads(r.stdout)[0]["address"]
    show(["ip", "addr", "flush", "dev", "eth4"], h1)
    show(["ip", "link", "add", "br0", "type", "bridge"], h1)
    show(["ip", "link", "set", "br0", "address", mac], h1)      # the host itself stays VIF 0
    show(["ip", "link", "set", "eth4", "master", "br0"], h1)
    show(["ip", "link", "set", "br0", "up"], h1)
    show(["ip", "addr", "add", "10.0.0.1/24", "dev", "br0"], h1)
    for i in range(1, GUESTS + 1):
        g = guest_name(i)
        gmac = f"52:54:00:67:e9:b{i}"
        subprocess.run(["ip", "netns", "add", g], check=True)
        show(["ip", "link", "add", f"vnet{i}", "type", "veth", "peer", "name", "eth0", "netns", g], h1)
        show(["ip", "link", "set", f"vnet{i}", "master", "br0", "up"], h1)
        show(["ip", "link", "set", "eth0", "address", gmac, "up"], g)
        show(["ip", "addr", "add", f"10.0.0.{10 + i}/24", "dev", "eth0"], g)
        xdpoib("vif", "add", "eth4", gmac, "--netns", h1)       # eIPoIB: ip link set dev eth4 vif ... mac
    xdpoib("vif", "list", "eth4", "--netns", h1)                # eIPoIB: /sys/class/net/eth4/eth/vifs

    step("8. Each guest reaches host 2 across the fabric, from its own QP")
    for i in range(1, GUESTS + 1):
        show(["ping", "-c", "2", "-i", "0.2", "10.0.0.2"], guest_name(i))
    xdpoib("peers", "eth4", "--netns", ns_name(2))              # one peer (QPN) per guest, and host 1

    step("9. Partitions: host 1's VLAN 3 is P_Key 0x8003, with its own broadcast group and QP")
    r = subprocess.run([sys.executable, "-m", "xdpoib", "status", "eth4", "--netns", h1, "-j"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise XdpoibError(f"host 1's agent does not answer: {r.stderr.strip()}")
    st = json.loads(r.stdout)
    st = st[0] if isinstance(st, list) else st
    for p in st.get("partitions", []):
        print(f"  VLAN {p['vlan']}: P_Key {p['pkey']}, broadcast {p['broadcast']}, QPN {p['qpn']:#x}, MTU {p['mtu']}")
    print("$ saquery --smkey 1 MCMR --mgid ff12:401b:8003::ffff:ffff    (as host h1)")
    mcmr = fab.saquery("h1", "--smkey", "1", "MCMR", "--mgid", "ff12:401b:8003::ffff:ffff").stdout
    for line in mcmr.splitlines():
        if "PortGid" in line or "JoinState" in line:
            print("  " + line.strip())


def run(args) -> int:
    if args.down:
        teardown()
        print("demo torn down")
        return 0
    from xdpoib.fabric.simfabric import SimFabric

    teardown()      # a previous --keep run, if any
    ok = False
    try:
        step(f"1. A fabric: ibsim with one switch and {HOSTS} hosts, and a real OpenSM on it")
        fab = SimFabric.up(FABRIC, hosts=HOSTS)
        print(fab.describe())

        step("2. Three hosts (network namespaces), each with eth4 attached to the fabric")
        for i in range(1, HOSTS + 1):
            ns = ns_name(i)
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            extra = ["--vlan", "3:0x8003"] if i == 1 else []        # h1 and h2 are in partition 0x8003
            r = xdpoib("attach", "eth4", "--netns", ns, "--sim", f"{FABRIC}:h{i}", *extra)
            if r.returncode != 0:
                raise XdpoibError(f"attaching host {i} failed")
            show(["ip", "addr", "add", f"10.0.0.{i}/24", "dev", "eth4"], ns)
        show(["ip", "-br", "link", "show", "eth4"], ns_name(1))

        step("3. ARP resolution across the fabric, then IPv4 ping")
        show(["ping", "-c", "3", "-i", "0.2", "10.0.0.2"], ns_name(1))
        show(["ip", "neigh", "show", "dev", "eth4"], ns_name(1))
        show(["ping", "-c", "3", "-i", "0.2", "10.0.0.3"], ns_name(2))

        step("4. IPv6: neighbour discovery translated (link-layer options 8 <-> 24 bytes), then ping")
        time.sleep(1.0)     # DAD on the link-local addresses
        ll = show(["ip", "-6", "-br", "addr", "show", "dev", "eth4"], ns_name(3)).stdout.split()[-1].split("/")[0]
        show(["ping", "-6", "-c", "3", "-i", "0.2", f"{ll}%eth4"], ns_name(1))

        step("5. What the agent of host 1 knows")
        xdpoib("status", "eth4", "--netns", ns_name(1))
        xdpoib("peers", "eth4", "--netns", ns_name(1))
        xdpoib("groups", "eth4", "--netns", ns_name(1))

        step("6. OpenSM's view: every host is a member of the IPv4 broadcast group")
        print("$ saquery --smkey 1 MCMR --mgid ff12:401b:ffff::ffff:ffff    (as host h1)")
        mcmr = fab.saquery("h1", "--smkey", "1", "MCMR", "--mgid", "ff12:401b:ffff::ffff:ffff").stdout
        for line in mcmr.splitlines():      # the two lines that matter of each record
            if "PortGid" in line or "JoinState" in line:
                print("  " + line.strip())

        bridge_scenario(fab)
        ok = True
    finally:
        if args.keep and ok:
            step("The demo keeps running. Explore, e.g.:")
            print(f"  ip netns exec {ns_name(1)} ping 10.0.0.2\n  xdpoib status eth4 --netns {ns_name(1)}\n"
                  f"  eval \"$(xdpoib sim env {FABRIC} h1)\"; saquery -s\n  xdpoib demo --down    # when done")
        else:
            step("Tearing down: detach (groups left, XDP removed, links deleted), namespaces, fabric")
            teardown()
    print("\ndemo " + ("done" if ok else "FAILED"))
    return 0 if ok else 1
