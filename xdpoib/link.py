"""Links: the only module that imports pyroute2.

An attachment's user-facing interface (eth4) is either the end of a veth pair that xdpoib creates
(the other, internal end stays in the root namespace, where the agent and the BPF programs live), or an
existing TAP that a VM holds. Offloads that XDP cannot finish (tx checksum, TSO) are switched off with
ethtool and restored on detach (docs/design.md §6).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

from xdpoib.errors import XdpoibError

IFNAMSIZ = 16
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
NETNS_DIR = "/run/netns"


class LinkError(XdpoibError):
    """A link operation failed or named something that does not exist."""


@dataclass(frozen=True)
class LinkInfo:
    """What xdpoib needs to know of a link."""

    ifname: str
    index: int
    mac: str
    mtu: int
    kind: str          # veth, tun, ... ('' for a physical device)
    up: bool
    netns: str | None


def read_sysctl(name: str) -> int | None:
    """An integer sysctl of this namespace (`net.core.rmem_max`), None when it cannot be read."""
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None

def check_ifname(name: str) -> str:
    """Return name if it is a valid Linux interface name, else raise LinkError."""
    if not _IFNAME_RE.match(name or "") or name in (".", ".."):
        raise LinkError(f"invalid interface name {name!r} (1-15 characters, no '/' or spaces)")
    return name


def netns_exists(name: str) -> bool:
    """Return whether a named network namespace (`ip netns add NAME`) exists."""
    return bool(name) and "/" not in name and os.path.exists(os.path.join(NETNS_DIR, name))


def check_netns(name: str | None) -> str | None:
    """Return name if it is None (root namespace) or an existing named namespace, else raise."""
    if name is not None and not netns_exists(name):
        raise LinkError(f"network namespace {name!r} does not exist (see `ip netns list`)")
    return name


@contextmanager
def _ipr(netns: str | None = None):
    from pyroute2 import IPRoute

    if not netns:
        ipr = IPRoute()
    else:
        try:
            ipr = IPRoute(netns=netns)
        except TypeError:               # pyroute2 < 0.8 (Debian 12's 0.7.2): a namespace has its own class
            from pyroute2 import NetNS

            ipr = NetNS(netns)
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr, ifname: str, netns: str | None) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        where = f" in netns {netns}" if netns else ""
        raise LinkError(f"no interface {ifname!r}{where}")
    return idx[0]


def link_info(ifname: str, netns: str | None = None) -> LinkInfo:
    """Return the LinkInfo of ifname (in netns, or the root namespace)."""
    with _ipr(netns) as ipr:
        msg = ipr.get_links(_index(ipr, ifname, netns))[0]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
        return LinkInfo(ifname, msg["index"], msg.get_attr("IFLA_ADDRESS") or "", msg.get_attr("IFLA_MTU"),
                        kind, bool(msg["flags"] & 1), netns)


def link_exists(ifname: str, netns: str | None = None) -> bool:
    """Return whether ifname exists (in netns)."""
    with _ipr(netns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def is_tap(ifname: str, netns: str | None = None) -> bool:
    """Return whether ifname is a TAP device (tun driver in tap mode)."""
    info = link_info(ifname, netns)
    if info.kind != "tun":
        return False
    flags = _read(f"/sys/class/net/{ifname}/tun_flags") if netns is None else None
    return flags is None or int(flags, 16) & 0x0002 == 0x0002


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def create_veth(ifname: str, peer: str, netns: str | None) -> None:
    """Create a veth pair: `peer` in the root namespace (internal end), `ifname` in netns (user end)."""
    check_ifname(ifname)
    check_ifname(peer)
    with _ipr() as ipr:
        spec = {"ifname": ifname}
        if netns:
            spec["net_ns_fd"] = netns
        try:
            ipr.link("add", ifname=peer, kind="veth", peer=spec)
        except Exception as e:  # pyroute2 raises NetlinkError with errno
            raise LinkError(f"cannot create veth {peer}/{ifname}: {e}") from None


def create_bridge(name: str, ports: list[str], before_up=None) -> None:
    """A bridge in the root namespace (multicast snooping off: it forwards every group) with `ports`;
    `before_up()` runs once it exists, before it is brought up."""
    check_ifname(name)
    with _ipr() as ipr:
        try:
            ipr.link("add", ifname=name, kind="bridge", br_mcast_snooping=0)
            br = _index(ipr, name, None)
            if before_up is not None:
                before_up()
            for port in ports:
                ipr.link("set", index=_index(ipr, port, None), master=br)
            ipr.link("set", index=br, state="up")
        except LinkError:
            raise
        except Exception as e:
            raise LinkError(f"cannot create bridge {name} with {', '.join(ports)}: {e}") from None


def release_port(ifname: str) -> None:
    """Take a link out of its bridge (if it still exists)."""
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            ipr.link("set", index=idx[0], master=0)


def delete_link(ifname: str, netns: str | None = None) -> bool:
    """Delete ifname if it exists; return whether it did (deleting a veth end removes both)."""
    with _ipr(netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        ipr.link("del", index=idx[0])
        return True


def set_link(ifname: str, netns: str | None = None, *, mac: str | None = None, mtu: int | None = None,
             up: bool | None = None) -> None:
    """Set a link's MAC, MTU and/or admin state."""
    kw: dict = {}
    if mac is not None:
        kw["address"] = mac
    if mtu is not None:
        kw["mtu"] = mtu
    if up is not None:
        kw["state"] = "up" if up else "down"
    with _ipr(netns) as ipr:
        try:
            ipr.link("set", index=_index(ipr, ifname, netns), **kw)
        except LinkError:
            raise
        except Exception as e:
            raise LinkError(f"cannot set {kw} on {ifname}: {e}") from None


# --- offloads (ethtool) ----------------------------------------------------------------------------

_OFFLOADS = {"tx": "tx-checksumming", "tso": "tcp-segmentation-offload", "gro": "generic-receive-offload",
             "uso": "tx-udp-segmentation"}


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """The command line that runs argv in a named network namespace (as it is for the root one)."""
    return (["ip", "netns", "exec", netns] if netns else []) + list(argv)


def _ethtool(args: list[str], netns: str | None) -> str:
    cmd = in_netns(netns, ["ethtool", *args])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise LinkError(f"`{' '.join(cmd)}` failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def get_offloads(ifname: str, netns: str | None = None) -> dict[str, bool]:
    """Return the state of the offloads xdpoib changes ({'tx': True, 'tso': False, 'gro': ...})."""
    text = _ethtool(["-k", ifname], netns)
    state = {}
    for key, label in _OFFLOADS.items():
        m = re.search(rf"^{label}: (on|off)", text, re.M)
        if m:
            state[key] = m.group(1) == "on"
    return state


def set_offloads(ifname: str, netns: str | None = None, **wanted: bool) -> dict[str, bool]:
    """Set offloads (tx=False, tso=False, gro=True, ...) and return their previous state, for restore."""
    before = get_offloads(ifname, netns)
    args = []
    for key, on in wanted.items():
        if key not in _OFFLOADS:
            raise LinkError(f"unknown offload {key!r}")
        args += [_OFFLOADS[key] if key == "uso" else key, "on" if on else "off"]   # ethtool's short names
    if args:
        _ethtool(["-K", ifname, *args], netns)
    return {k: before[k] for k in wanted if k in before}


# --- XDP by netlink (for programs opened from bpffs, without bcc) ---------------------------------

def attach_xdp(ifname: str, prog_fd: int, netns: str | None = None) -> None:
    """Attach an XDP program (by fd) to a device, replacing what it had."""
    with _ipr(netns) as ipr:
        try:
            ipr.link("set", index=_index(ipr, ifname, netns), xdp_fd=prog_fd)
        except LinkError:
            raise
        except Exception as e:
            raise LinkError(f"cannot attach XDP to {ifname}: {e}") from None


XDP_FLAGS_REPLACE = 1 << 4       # linux/if_link.h: replace only the program given as expected


def xdp_prog_id(ifname: str, netns: str | None = None) -> int:
    """The id of the XDP program a device has (0: none)."""
    with _ipr(netns) as ipr:
        msg = ipr.get_links(_index(ipr, ifname, netns))[0]
        xdp = msg.get_attr("IFLA_XDP")
        return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp is not None else 0


def replace_xdp(ifname: str, prog_fd: int, expected_fd: int, netns: str | None = None) -> None:
    """Swap a device's XDP program for another in one step (XDP_FLAGS_REPLACE): the kernel refuses
    (EEXIST) unless the program attached now is `expected_fd`'s, so a frame meets either the old
    program or the new one, never none, and nobody else's program is replaced by mistake."""
    attrs = [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_EXPECTED_FD", expected_fd), ("IFLA_XDP_FLAGS", XDP_FLAGS_REPLACE)]
    with _ipr(netns) as ipr:
        index = _index(ipr, ifname, netns)
        try:
            if netns:
                ipr.link("set", index=index, xdp={"attrs": attrs})
            else:
                _setlink_xdp(index, prog_fd, expected_fd, XDP_FLAGS_REPLACE)
        except Exception as e:
            raise LinkError(f"cannot replace the XDP program of {ifname}: {e}") from None


_RTM_SETLINK, _NLM_F_REQUEST_ACK, _NLMSG_ERROR = 19, 0x1 | 0x4, 2
_IFLA_XDP, _NLA_F_NESTED = 43, 0x8000
_IFLA_XDP_FD, _IFLA_XDP_FLAGS, _IFLA_XDP_EXPECTED_FD = 1, 3, 8


def _setlink_xdp(index: int, prog_fd: int, expected_fd: int, flags: int) -> None:
    """RTM_SETLINK with IFLA_XDP {FD, EXPECTED_FD, FLAGS} over a plain netlink socket in this namespace:
    pyroute2 0.7 (Debian 12) encodes IFLA_XDP_FLAGS in 16 bits, which the kernel refuses (ERANGE)."""
    nested = struct.pack("=HHiHHiHHI", 8, _IFLA_XDP_FD, prog_fd, 8, _IFLA_XDP_EXPECTED_FD, expected_fd,
                         8, _IFLA_XDP_FLAGS, flags)
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0) + \
        struct.pack("=HH", 4 + len(nested), _IFLA_XDP | _NLA_F_NESTED) + nested
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(10)
        s.send(struct.pack("=IHHII", 16 + len(body), _RTM_SETLINK, _NLM_F_REQUEST_ACK, 1, 0) + body)
        reply = s.recv(4096)
    kind, err = struct.unpack_from("=H", reply, 4)[0], struct.unpack_from("=i", reply, 16)[0]
    if kind != _NLMSG_ERROR:
        raise OSError(f"unexpected netlink reply type {kind}")
    if err:
        raise OSError(-err, os.strerror(-err))


def detach_xdp(ifname: str, netns: str | None = None) -> None:
    """Remove a device's XDP program (quietly if the device is gone)."""
    with _ipr(netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            with contextlib.suppress(Exception):
                ipr.link("set", index=idx[0], xdp_fd=-1)


# --- bridge events (a guest leaving: its FDB entry, then its port, gone) --------------------------

RTM_NEWLINK, RTM_DELLINK, RTM_NEWNEIGH, RTM_DELNEIGH = 16, 17, 28, 29
_RTMGRP_LINK, _RTMGRP_NEIGH = 0x1, 0x4
_AF_BRIDGE = 7
_NDA_LLADDR = 2
_IFF_UP, _IFF_RUNNING = 0x1, 0x40
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class BridgeEvent:
    """One event `BridgeWatch.read` returns: `fdb_del` / `fdb_new` (a MAC's forwarding entry, on
    port `ifindex`), `port_gone` (link `ifindex` deleted, or down), `port_up` (link `ifindex` is up)."""

    kind: str
    ifindex: int
    mac: bytes = b""


@contextmanager
def entered_netns(netns: str | None):
    """The calling thread in the named network namespace netns for the block, back in its own afterwards
    (the root namespace, None: nothing to do). Only this thread moves: what it opens meanwhile (sockets,
    /proc/thread-self/net) belongs to netns. LinkError when netns cannot be entered."""
    if not netns:
        yield
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
        except OSError as e:
            raise LinkError(f"network namespace {netns!r}: {e.strerror}") from None
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise LinkError(f"cannot enter network namespace {netns!r}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:       # cannot fail as root with the descriptor open
                raise LinkError(f"cannot leave network namespace {netns!r}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(home)


def _netlink_socket_in(netns: str | None):
    """A NETLINK_ROUTE socket subscribed to link and neighbour events, made in namespace netns (a
    socket stays in the namespace it was made in: made on a short-lived thread that enters it)."""
    import threading

    out: dict = {}

    def make() -> None:
        try:
            with entered_netns(netns):
                s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((0, _RTMGRP_LINK | _RTMGRP_NEIGH))
            out["sock"] = s
        except (OSError, LinkError) as e:
            out["error"] = e

    t = threading.Thread(target=make, name="netns-socket")
    t.start()
    t.join()
    if "error" in out:
        where = f" in netns {netns}" if netns else ""
        raise LinkError(f"cannot watch bridge events{where}: {out['error']}")
    return out["sock"]


_RTM_GETADDR, _RTM_NEWADDR, _NLMSG_DONE, _NLMSG_ERROR = 22, 20, 3, 2
_IFA_ADDRESS, _IFA_LOCAL, _IFA_FLAGS = 1, 2, 8
_IFA_F_TENTATIVE = 0x40


def addresses(ifname: str) -> list[bytes]:
    """The IPv4 and IPv6 addresses of link ifname in the calling thread's network namespace (see
    `entered_netns`), tentative ones (duplicate address detection not over) left out: one netlink dump,
    no subprocess. LinkError when the link does not exist."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        raise LinkError(f"no link {ifname!r}") from None
    out: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(5)
        s.bind((0, 0))
        # nlmsghdr + struct ifaddrmsg (family AF_UNSPEC: both families); NLM_F_REQUEST | NLM_F_DUMP
        s.send(struct.pack("=IHHII", 24, _RTM_GETADDR, 0x301, 1, 0) + struct.pack("=BBBBi", 0, 0, 0, 0, 0))
        while True:
            data = s.recv(1 << 16)
            o = 0
            while o + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, o)
                if length < 16:
                    return out
                if mtype == _NLMSG_DONE:
                    return out
                if mtype == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, o + 16)[0]
                    raise LinkError(f"reading the addresses of {ifname}: {os.strerror(err)}")
                body = data[o + 16:o + length]
                if mtype == _RTM_NEWADDR and len(body) >= 8:
                    family, _plen, flags, _scope, idx = struct.unpack_from("=BBBBi", body)
                    if idx == index and family in (socket.AF_INET, socket.AF_INET6):
                        wide = _attr(body, 8, _IFA_FLAGS)
                        if wide is not None and len(wide) == 4:
                            flags = struct.unpack("=I", wide)[0]
                        addr = _attr(body, 8, _IFA_LOCAL if family == socket.AF_INET else _IFA_ADDRESS) \
                            or _attr(body, 8, _IFA_ADDRESS)
                        if addr is not None and len(addr) in (4, 16) and not flags & _IFA_F_TENTATIVE:
                            out.append(bytes(addr))
                o += (length + 3) & ~3


class BridgeWatch:
    """Bridge forwarding-entry and port events in a namespace, over netlink (the agent's loop reads
    them when `fileno()` is readable). A guest that leaves a bridge (its port deleted or down) shows
    up as `fdb_del` of its MAC on that port, then `port_gone` of the port."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = _netlink_socket_in(netns)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[BridgeEvent]:
        """Every event waiting (none if nothing is); an overrun of the socket's buffer is skipped."""
        import struct

        events: list[BridgeEvent] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return events
            except OSError:             # ENOBUFS: events were lost; what follows still counts
                continue
            o = 0
            while o + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, o)
                if length < 16:
                    break
                body = data[o + 16:o + length]
                if mtype in (RTM_NEWNEIGH, RTM_DELNEIGH) and len(body) >= 12 and body[0] == _AF_BRIDGE:
                    ifindex = struct.unpack_from("=i", body, 4)[0]
                    mac = _attr(body, 12, _NDA_LLADDR)
                    if mac is not None and len(mac) == 6:
                        events.append(BridgeEvent("fdb_new" if mtype == RTM_NEWNEIGH else "fdb_del", ifindex, mac))
                elif mtype in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= 16:
                    ifindex, flags = struct.unpack_from("=iI", body, 4)
                    gone = mtype == RTM_DELLINK or not flags & _IFF_UP
                    events.append(BridgeEvent("port_gone" if gone else "port_up", ifindex))
                o += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()


def _attr(body: bytes, o: int, want: int) -> bytes | None:
    """The payload of the first netlink attribute of type `want` in body from offset o."""
    import struct

    while o + 4 <= len(body):
        alen, atype = struct.unpack_from("=HH", body, o)
        if alen < 4:
            return None
        if atype & 0x3FFF == want:
            return body[o + 4:o + alen]
        o += (alen + 3) & ~3
    return None
