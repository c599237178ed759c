"""eth4 and its internal end: creating or adopting the links, reading eth4's state, announcing it.

veth mode: eth4 (in the user's namespace) and the internal end `xo<id>` (root namespace, where XDP
runs) are a veth pair made here, or adopted from an agent of the same attachment that died. eth4's tx
checksum, TSO and UDP segmentation are off, so what the local stack sends reaches XDP complete and
segmented.
tap mode: a VM with vnet headers (qemu's default, libvirt, OpenStack) hands the host frames with
partial checksums and GSO super-frames, and XDP on the TAP would see them raw. So the TAP is not
where XDP runs: it becomes a port of a bridge `xr<id>` whose other port `xs<id>` is a veth end with
tx checksum, TSO and UDP segmentation off, and XDP runs on its peer `xo<id>` as in veth mode. The
bridge's transmit on `xs<id>` completes the checksums and segments the super-frames in the
kernel (validate_xmit_skb); frames for the VM are injected towards `xs<id>` and bridged to the TAP. The
TAP's MTU is set and restored at the end, and it leaves the bridge when the agent goes.

eth4's multicast list and addresses are read inside its namespace (/proc files and a netlink dump, no
subprocess) by the host worker thread (never on the loop), every second: the lists feed the SA joins,
new addresses are announced with gratuitous ARP / unsolicited NA.
"""

from __future__ import annotations

import logging
import subprocess

from xdpoib import link, state
from xdpoib.errors import FrameError, XdpoibError
from xdpoib.wire import frames as f
from xdpoib.wire.oracle import eth_to_ipoib

log = logging.getLogger("xdpoib.agent")

#: veth refuses XDP when the peer MTU is above ~3.5 KB unless the program is frags-aware (docs/design.md §6).
VETH_XDP_MAX_MTU = 3498
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")


def internal_name(spec: state.AttachSpec) -> str:
    """The internal veth end's name: `xo` + 8 hex digits of the attachment id (fits IFNAMSIZ)."""
    return "xo" + state.link_tag(spec.id)


def set_up(agent) -> str:
    """Create or adopt the links; returns the device XDP attaches to. Undo is pushed on agent.stack."""
    s = agent.spec
    if s.mode == "veth":
        agent.eth_mtu = min(agent.eth_mtu, VETH_XDP_MAX_MTU)
        s.internal = internal_name(s)
        if link.link_exists(s.internal) and link.link_exists(s.ifname, s.netns):
            log.info("adopting the existing %s / %s of a previous agent", s.internal, s.where)
            agent.stats["adopted_links"] += 1
        elif not agent.owns:
            raise XdpoibError(f"{s.internal} or {s.where} is gone: nothing to take over")
        else:
            link.create_veth(s.ifname, s.internal, s.netns)
        agent.shared(link.delete_link, s.internal)
        quiet(s.internal)
        if not agent.owns:          # a successor: the running agent's links carry traffic, as they are
            return s.internal
        link.set_link(s.ifname, s.netns, mac=_mac_str(agent.mac), mtu=agent.eth_mtu, up=True)
        # the internal end takes the largest frame XDP allows, so a frame above eth4's path MTU
        # (eth4's MTU raised by hand) reaches us and is answered with ICMP instead of vanishing
        link.set_link(s.internal, None, mtu=VETH_XDP_MAX_MTU, up=False)
        for key in (f"net.ipv4.conf.{s.ifname}.arp_notify=1", f"net.ipv6.conf.{s.ifname}.ndisc_notify=1"):
            subprocess.run(link.in_netns(s.netns, ["sysctl", "-qw", key]), capture_output=True, check=False)
        # frames the local stack sends carry unfinished checksums that XDP would pass on as they are
        link.set_offloads(s.ifname, s.netns, tx=False, tso=False, uso=False)
        return s.internal
    # a VM's TAP, behind a bridge and a veth hop that finish its offloads (module doc). The VIF MAC
    # is the guest's, learned from its first frame.
    tag = state.link_tag(s.id)
    s.internal, side, bridge = "xo" + tag, "xs" + tag, "xr" + tag
    if not agent.owns:              # a successor: the running agent's bridge and veth hop, as they are
        missing = [n for n in (bridge, side, s.internal) if not link.link_exists(n)]
        if missing:
            raise XdpoibError(f"{', '.join(missing)} gone: nothing to take over")
        mtu = agent.successor.tap_mtu if agent.successor is not None else None
        if mtu:
            agent.tap_mtu_before = mtu
            agent.shared(link.set_link, s.ifname, None, mtu=mtu)
        agent.shared(link.delete_link, s.internal)
        agent.shared(link.delete_link, bridge)
        agent.shared(link.release_port, s.ifname)
        agent.stats["adopted_links"] += 1
        return s.internal
    before = link.link_info(s.ifname)
    agent.tap_mtu_before = before.mtu           # restored at the end (a successor is told it)
    agent.shared(link.set_link, s.ifname, None, mtu=before.mtu)
    for stale in (bridge, s.internal):          # a previous agent of this attachment that died
        link.delete_link(stale)
    link.create_veth(side, s.internal, None)
    agent.shared(link.delete_link, s.internal)
    quiet(side, s.internal)
    link.set_link(s.ifname, None, mtu=agent.eth_mtu, up=True)
    link.set_link(side, None, mtu=agent.eth_mtu, up=True)
    link.set_link(s.internal, None, mtu=VETH_XDP_MAX_MTU, up=False)
    link.set_offloads(side, None, tx=False, tso=False, uso=False, gro=True)
    link.create_bridge(bridge, [s.ifname, side], before_up=lambda: quiet(bridge))
    agent.shared(link.delete_link, bridge)
    agent.shared(link.release_port, s.ifname)
    agent.vif_learned = False
    return s.internal


def quiet(*ifnames: str) -> None:
    """Our own links in the root namespace say nothing (no IPv6 link-local address, so no ND or MLD):
    their frames would reach the datapath as if eth4's side had sent them (and, in tap mode, be
    taken for the guest's)."""
    for ifname in ifnames:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], capture_output=True, check=False)


def _mac_str(mac: bytes) -> str:
    from xdpoib.wire.addr import mac_str

    return mac_str(mac)


def read_eth4(spec: state.AttachSpec) -> tuple[str, list[bytes]]:
    """eth4's multicast lists (/proc/net/igmp6 and /proc/net/igmp text, as its namespace shows them) and its
    addresses (IPv4 and IPv6, packed; tentative ones left out), read by the calling thread inside eth4's
    namespace: two files and one netlink dump, no subprocess (a fork and exec of `ip` cost ~7 ms of CPU,
    every second, on every agent)."""
    with link.entered_netns(spec.netns):
        text = []
        for name in ("igmp6", "igmp"):
            try:
                with open(f"/proc/thread-self/net/{name}") as fp:
                    text.append(fp.read())
            except FileNotFoundError:       # IPv6 (or IPv4) compiled out
                pass
        return "".join(text), link.addresses(spec.ifname)


class Announcer:
    """Gratuitous ARP and unsolicited NA for eth4's addresses, sent on the fabric: after attach (our
    QPN, hence our REMAC at the peers, may have changed), when the port comes back, and for each
    address added later, so peers' caches point at our current address."""

    def __init__(self, agent) -> None:
        self.a = agent
        self.announced: set[bytes] = set()
        self.due = True

    def addresses(self, addrs: list[bytes]) -> None:
        """eth4's addresses (packed IPv4 and IPv6, `read_eth4`): announce what is new (or all, when due)."""
        a = self.a
        if a.spec.mode != "veth":
            return                  # a guest announces itself (and we learn its MAC on its first frame)
        v4, v6 = [x for x in addrs if len(x) == 4], [x for x in addrs if len(x) == 16]
        known, self.announced = self.announced, set(v4) | set(v6)
        if not self.due:
            v4, v6 = [x for x in v4 if x not in known], [x for x in v6 if x not in known]
        self.due = False
        frames = [f.eth(b"\xff" * 6, a.mac, f.ETH_P_ARP, f.arp(f.ARPOP_REQUEST, a.mac, x, b"\0" * 6, x))
                  for x in v4]
        frames += [f.eth(b"\x33\x33\x00\x00\x00\x01", a.mac, f.ETH_P_IPV6,
                         f.nd_na(x, ALL_NODES, x, tlla=a.mac, solicited=False)) for x in v6]
        for frame in frames:
            try:
                r = eth_to_ipoib(frame, a.peers)
            except FrameError:
                continue
            a.forwarder.send_group(r.mgid, [r.frame])
        a.stats["announcements"] += len(frames)
