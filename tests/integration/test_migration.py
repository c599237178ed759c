"""A guest moved between two bridge hosts while a third host pings it: its traffic comes back fast.

Hosts h1 and h2: eth4 the uplink of br0 (`--learn-vifs`), as hypervisors run guests; host h3: a plain
attachment that pings the guest every 20 ms. The guest is a network namespace (MAC and IPv4 address
unchanged, IPv6 off so it sends nothing unasked) whose veth port is deleted on one host and made on
the other, as a live migration moves a VM. At its new place it announces itself:
- as qemu does by default: 5 RARP frames (EtherType 0x8035, op 3, sender = target = its MAC, no IP),
  50, 150, 250, 350 ms apart, written with a raw socket from the guest's namespace;
- as a guest with virtio-net's announce does: one gratuitous ARP;
- with RARP, its old port deleted only 0.2 s after its first frame at the new host (as qemu removes
  the source's TAP once the guest runs at the destination; the guest's interface there is down
  meanwhile, so the bridge flushes its entry at once but the port stays);
- the same, with `xdpoib vif del` at the old host instead of the port's removal (a management hook).
Measured: the time from the guest's first frame at its new place to the third host's first ping reply
(target 0.5 s; without xdpoib's migration handling it was 5.8 s with RARP), and the whole gap in the
replies. Checked: the old host released the guest's VIF at once (`xdpoib vif list`), looked for the
guest and announced it on its behalf (its counters).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
from labkit import bridge_eth4, mac_of, sh
from labkit import xdpoib as x
from prereq import need_cmd, need_root

SIM_HOSTS = 3
NET = "10.82.0"
GUEST_IP = f"{NET}.50"
LIMIT_S = 2.0           # asserted (the target is 0.5 s: printed; a loaded 2-core machine may be slower)

ANNOUNCE = r"""
import fcntl, socket, struct, sys, time
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
ip = socket.inet_aton(sys.argv[3])
if sys.argv[2] == "rarp":       # qemu's self-announce: RARP request reverse, no IP, 50/150/250/350 ms apart
    et, body, gaps = 0x8035, struct.pack("!HHBBH", 1, 0x800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4), \
        [0, 0.05, 0.15, 0.25, 0.35]
else:                           # a gratuitous ARP (request, sender = target = its address)
    et, body, gaps = 0x806, struct.pack("!HHBBH", 1, 0x800, 6, 4, 1) + mac + ip + bytes(6) + ip, [0]
frame = (b"\xff" * 6 + mac + struct.pack("!H", et) + body).ljust(60, b"\0")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[4], 0))
# the guest runs again (its interface at the new host, plugged in before, comes up): its first frame follows
# at once (SIOCGIFFLAGS / SIOCSIFFLAGS with IFF_UP; nothing can reach it before)
ifr = struct.pack("16sh22x", sys.argv[4].encode(), 0)
flags = struct.unpack_from("16sh", fcntl.ioctl(s, 0x8913, ifr))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", sys.argv[4].encode(), flags | 1))
for i, gap in enumerate(gaps):
    time.sleep(gap)
    s.send(frame)
    if i == 0:
        print(repr(time.time()), flush=True)
"""


def vif_macs(ns: str) -> set[str]:
    return {v["mac"] for v in json.loads(x("vif", "list", "eth4", "--netns", ns, "-j").stdout)}


def counters(ns: str) -> dict:
    st = json.loads(x("status", "eth4", "--netns", ns, "-j").stdout)
    return (st[0] if isinstance(st, list) else st)["counters"]


def plug(host: str, guest: str, mac: str, ifname: str = "eth0", up: bool = True) -> None:
    """The guest's port on host's br0: veth v1 there, IFNAME (with mac and the guest's address) in guest,
    up unless asked otherwise (a migrated guest that does not run yet)."""
    sh("ip", "-n", host, "link", "add", "v1", "type", "veth", "peer", "name", ifname, "address", mac, "netns", guest)
    sh("ip", "-n", host, "link", "set", "v1", "master", "br0", "up")
    sh("ip", "-n", guest, "addr", "add", f"{GUEST_IP}/24", "dev", ifname)
    if up:
        sh("ip", "-n", guest, "link", "set", ifname, "up")


@pytest.fixture(scope="module")
def lab(sim_fabric):
    need_cmd("ip", "ping")
    t = uuid.uuid4().hex[:4]
    a, b, c, g = (f"xm{r}{t}" for r in "abcg")
    made = []
    try:
        for ns in (a, b, c, g):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for key in ("all", "default"):
            sh("ip", "netns", "exec", g, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        for ns, host in ((a, "h1"), (b, "h2")):
            x("attach", "eth4", "--netns", ns, "--sim", f"{sim_fabric.name}:{host}", "--learn-vifs", "4")
            bridge_eth4(ns)
        x("attach", "eth4", "--netns", c, "--sim", f"{sim_fabric.name}:h3")
        sh("ip", "-n", c, "addr", "add", f"{NET}.3/24", "dev", "eth4")
        sh("ip", "-n", a, "link", "add", "v1", "type", "veth", "peer", "name", "eth0", "netns", g)
        mac = mac_of(g, "eth0")
        sh("ip", "-n", a, "link", "del", "v1")
        plug(a, g, mac)
        deadline = time.monotonic() + 20
        while sh("ip", "netns", "exec", c, "ping", "-c", "1", "-W", "1", GUEST_IP, check=False).returncode:
            assert time.monotonic() < deadline, "the third host cannot reach the guest before any move"
        yield {"old": a, "new": b, "third": c, "guest": g, "mac": mac, "ifname": "eth0", "moves": 0}
    finally:
        for ns in (a, b, c):
            x("detach", "eth4", "--netns", ns, check=False)
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def replies(path: str) -> list[float]:
    """The times (`ping -D`) of the echo replies ping wrote to path so far."""
    with open(path) as fh:
        return [float(ln[1:ln.index("]")]) for ln in fh if ln.startswith("[") and "bytes from" in ln]


def migrate(lab: dict, announce: str, log: str, late: float | None = None, vif_del: bool = False) -> dict:
    """Move the guest from lab['old'] to lab['new'] under pings from the third host; swap old and new.
    The guest's port at the old host is deleted before it runs at the new one, or, with `late`, that
    many seconds after its first frame there (qemu removes the source's TAP once the guest runs at the
    destination; meanwhile the guest is paused at the source: its interface there down); with
    `vif_del`, then, `xdpoib vif del` at the old host instead (its port deleted once measured)."""
    old, new, guest, mac = lab["old"], lab["new"], lab["guest"], lab["mac"]
    was, now = lab["ifname"], f"mv{lab['moves']}"
    lab["moves"] += 1
    assert mac in vif_macs(old)
    before = counters(old)
    with open(log, "w") as out:
        pinger = subprocess.Popen(["ip", "netns", "exec", lab["third"], "stdbuf", "-oL", "ping", "-D", "-n", "-i",
                                   "0.02", GUEST_IP], stdout=out, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)
        plug(new, guest, mac, now, up=False)       # plugged in at the new host, not running yet: no frame
        if late is None:
            t0 = time.time()
            sh("ip", "-n", old, "link", "del", "v1")                # gone from the old host
        else:
            sh("ip", "-n", guest, "link", "set", was, "down")       # paused at the old host, its port still there
        guest_run = subprocess.Popen(["ip", "netns", "exec", guest, sys.executable, "-c", ANNOUNCE, mac, announce,
                                      GUEST_IP, now], stdout=subprocess.PIPE, text=True)
        first = float(guest_run.stdout.readline())
        if late is not None:
            time.sleep(max(0.0, first + late - time.time()))
            t0 = time.time()
            if vif_del:
                x("vif", "del", "eth4", mac, "--netns", old)
            else:
                sh("ip", "-n", old, "link", "del", "v1")
        told = time.time()                 # the old host has released the guest (vif del) or can (port gone)
        released = mac not in vif_macs(old)
        released_check = time.time() - t0
        guest_run.communicate(timeout=10)
        deadline = time.monotonic() + 15
        while not any(r > first for r in replies(log)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        pinger.send_signal(signal.SIGINT)
        pinger.wait(timeout=10)
        if vif_del:
            sh("ip", "-n", old, "link", "del", "v1", check=False)
    got = replies(log)
    after = [r for r in got if r > first]
    before_move = [r for r in got if r < min(t0, first)]
    d = {k: v - before.get(k, 0) for k, v in counters(old).items() if v != before.get(k, 0)}
    at_new = {v["mac"]: v for v in json.loads(x("vif", "list", "eth4", "--netns", new, "-j").stdout)}.get(mac)
    new_counters = counters(new)
    lab["old"], lab["new"], lab["ifname"] = new, old, now
    assert before_move, "no ping reply before the move"
    assert after, f"no ping reply after the move ({announce}); old host's counters moved: {d}"
    return {"outage_s": after[0] - first, "since_told_s": after[0] - told, "gap_s": after[0] - max(before_move),
            "released": released,
            "released_check_s": released_check, "first_frame_after_unplug_s": first - t0, "old_counters": d,
            "vif_at_new": at_new, "from_announcements": new_counters.get("addresses_from_announcements", 0)}


@pytest.mark.parametrize("announce,late,vif_del", [("rarp", None, False), ("garp", None, False), ("rarp", 0.2, False),
                                                   ("rarp", 0.2, True)],
                         ids=["rarp", "garp", "rarp-old-port-late", "rarp-vif-del"])
def test_migrated_guest_is_reached_again_fast(lab, announce, late, vif_del, figures, tmp_path):
    t = time.monotonic()
    r = migrate(lab, announce, str(tmp_path / "ping.log"), late, vif_del)
    when = (f"{r['first_frame_after_unplug_s'] * 1000:.0f} ms after the unplug" if late is None else
            f"{-r['first_frame_after_unplug_s'] * 1000:.0f} ms before the old "
            + ("host's `vif del` started" if vif_del else "port went"))
    figures(f"\nmigration ({announce}): third host's pings back {r['outage_s'] * 1000:.0f} ms after the guest's "
            f"first frame at its new place (target 500 ms), gap {r['gap_s'] * 1000:.0f} ms; first frame {when}; "
            f"{r['since_told_s'] * 1000:.0f} ms after the old host was told; "
            f"old host: {r['old_counters']}; new host: {r['from_announcements']} addresses from announcements "
            f"so far; test {time.monotonic() - t:.1f} s")
    assert r["released"], "the old host still lists the departed guest's VIF"
    assert r["old_counters"].get("vifs_deleted" if vif_del else "vifs_left", 0) == 1
    assert r["old_counters"].get("guests_found", 0) == 1 and r["old_counters"].get("announcements_on_behalf")
    assert r["vif_at_new"] and r["vif_at_new"]["learned"] and GUEST_IP in r["vif_at_new"]["addresses"], r
    # `vif del` waits for the CLI (a Python start): the old host knows of the move only when it returns
    assert (r["since_told_s"] if vif_del else r["outage_s"]) < LIMIT_S, r


def test_bridge_watch_tells_a_guest_leaving_from_one_pausing():
    """What the old host sees of its bridge (link.BridgeWatch, real netlink in a namespace): a guest's
    port deleted is its MAC's forwarding entry removed and the port gone; a guest whose interface goes
    down (its port loses carrier, the bridge flushes its entry) leaves the port there (up); a port
    made is reported up once it is."""
    from xdpoib.link import BridgeWatch

    need_root()
    need_cmd("ip")
    t = uuid.uuid4().hex[:4]
    host, guest = f"xmw{t}", f"xmx{t}"
    mac = "52:54:00:4d:17:01"
    try:
        for ns in (host, guest):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", host, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", host, "link", "set", "br0", "up")
        w = BridgeWatch(host)
        try:
            plug_port(host, guest, mac)
            port = json.loads(sh("ip", "-n", host, "-j", "link", "show", "v1").stdout)[0]["ifindex"]
            want = bytes.fromhex(mac.replace(":", ""))
            seen = events_until(w, lambda evs: ("fdb_new", port, want) in evs)
            assert ("port_up", port, b"") in seen, seen
            sh("ip", "-n", guest, "link", "set", "eth0", "down")
            seen = events_until(w, lambda evs: ("fdb_del", port, want) in evs)
            assert ("port_gone", port, b"") not in seen, f"a port that lost carrier was taken for gone: {seen}"
            sh("ip", "-n", guest, "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", guest, "ping", "-c", "1", "-W", "1", "10.83.0.9", check=False)
            events_until(w, lambda evs: ("fdb_new", port, want) in evs)
            sh("ip", "-n", host, "link", "del", "v1")
            seen = events_until(w, lambda evs: ("port_gone", port, b"") in evs)
            assert ("fdb_del", port, want) in seen, seen
        finally:
            w.close()
    finally:
        for ns in (host, guest):
            sh("ip", "netns", "del", ns, check=False)


def plug_port(host: str, guest: str, mac: str) -> None:
    sh("ip", "-n", host, "link", "add", "v1", "type", "veth", "peer", "name", "eth0", "address", mac, "netns", guest)
    sh("ip", "-n", host, "link", "set", "v1", "master", "br0", "up")
    sh("ip", "-n", guest, "addr", "add", "10.83.0.2/24", "dev", "eth0")
    sh("ip", "-n", guest, "link", "set", "eth0", "up")
    sh("ip", "netns", "exec", guest, "ping", "-c", "1", "-W", "1", "10.83.0.9", check=False)   # a frame from it


def events_until(w, done, timeout: float = 5.0) -> list[tuple]:
    """The watch's events (kind, ifindex, mac) until done(events) holds (AssertionError after timeout)."""
    import select

    got: list[tuple] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"events so far: {got}"
        select.select([w], [], [], left)
        got += [(e.kind, e.ifindex, e.mac) for e in w.read()]
    return got
