"""libvirt's qemu hook: a domain's bridged NICs become VIFs of the xdpoib attachment on their bridge.

libvirt runs every executable in `/etc/libvirt/hooks/qemu.d/` as `HOOK DOMAIN OPERATION SUBOP EXTRA`
with the domain XML on stdin (contrib/libvirt/xdpoib-hook is the entry point; docs/libvirt.md). For
each `<interface type='bridge'>` whose bridge has an xdpoib attachment in veth mode among its ports
(the host's eth4 as the bridge's uplink, in the root network namespace where libvirt's bridges are),
the guest's MAC is given its own QP on that attachment, exactly as `xdpoib vif add IFNAME MAC --vlan
VID` does (VID from the interface's `<vlan><tag id=.../></vlan>`, else untagged), and released as
`xdpoib vif del` does:

- `prepare begin` registers: the first hook of a start, also on the destination of an incoming
  migration and on restore, before the guest's CPUs run, so the guest's very first frame (its DHCP
  discover) already leaves under its own QPN. The MAC and the bridge are in the XML at this point;
  the TAP does not exist yet and is not needed (a VIF is a MAC on the attachment). `reconnect begin`
  (libvirtd restarted while the domain ran) registers again what is missing.
- `stopped end` and `release end` release: after the domain stopped, was destroyed, or migrated away
  (the source's QEMU stops once the destination runs). Both come; the second finds nothing to do.

Rules a hook lives by: it is quick (two control-socket requests per NIC, no CLI subprocess, no call
back into libvirt, which waits for the hook and would deadlock); it writes nothing on stdout (for
some operations libvirt takes stdout as a replacement domain XML); an interface that is not ours
(another bridge, another type) is skipped and the hook exits 0, and a release never fails. When a NIC
that is ours cannot be registered (its agent is down, its VLAN has no partition) the hook rolls back
what it registered for the domain, prints one line on stderr and exits 1: libvirt then refuses to
start the domain and shows that line, instead of a guest without its fabric.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from xdpoib.errors import AddressError, UsageError, XdpoibError
from xdpoib.wire.addr import mac_str, parse_mac

REGISTER = {("prepare", "begin"), ("reconnect", "begin")}
RELEASE = {("stopped", "end"), ("release", "end")}
SYSFS_NET = Path("/sys/class/net")
IDENT = "xdpoib-libvirt-hook"


@dataclass(frozen=True)
class Nic:
    """One `<interface type='bridge'>` of a domain."""

    mac: str            # lower-case colon form
    bridge: str
    vlan: int = 0


@dataclass(frozen=True)
class Step:
    """What the hook does for one NIC: `add`/`del` it on the attachment IFNAME, or `skip` it (why)."""

    action: str         # add | del | skip
    nic: Nic
    ifname: str = ""
    why: str = ""


def bridge_nics(xml: str) -> list[Nic]:
    """The domain's NICs of type `bridge` with their MAC, bridge and VLAN (other types are not ours).

    @v xml  the domain XML as libvirt gives it on stdin
    @ret    one Nic per bridge interface, in document order; UsageError for XML we cannot read or a
            bridge interface we cannot serve (no MAC, no bridge, a VLAN trunk)
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise UsageError(f"the domain XML on stdin is not XML: {e}") from None
    if root.tag != "domain":
        raise UsageError(f"expected a <domain> on stdin, got <{root.tag}>")
    nics = []
    for i, iface in enumerate(root.findall("./devices/interface")):
        if iface.get("type") != "bridge":
            continue
        source = iface.find("source")
        bridge = source.get("bridge") if source is not None else None
        mac_el = iface.find("mac")
        where = f"interface {i + 1} (type bridge)"
        if not bridge:
            raise UsageError(f"{where} has no <source bridge=...>")
        if mac_el is None or not mac_el.get("address"):
            raise UsageError(f"{where} on {bridge} has no <mac address=...>")
        try:
            mac = mac_str(parse_mac(mac_el.get("address")))
        except AddressError:
            raise UsageError(f"{where} on {bridge}: bad MAC {mac_el.get('address')!r}") from None
        nics.append(Nic(mac, bridge, _vlan(iface, f"{where} on {bridge}")))
    return nics


def _vlan(iface: ET.Element, where: str) -> int:
    """The VLAN of an interface: its one `<tag id>`, or 0 (untagged); a trunk cannot be one VIF."""
    vlan = iface.find("vlan")
    if vlan is None:
        return 0
    tags = vlan.findall("tag")
    if vlan.get("trunk") == "yes" or len(tags) != 1:
        raise UsageError(f"{where}: a VLAN trunk ({len(tags)} tags) cannot be one VIF; give one <tag id=...>")
    try:
        vid = int(tags[0].get("id", ""))
    except ValueError:
        raise UsageError(f"{where}: bad VLAN tag id {tags[0].get('id')!r}") from None
    if not 0 <= vid <= 4094:
        raise UsageError(f"{where}: VLAN tag id {vid} is outside 0..4094")
    return vid


def bridge_ports(bridge: str, sysfs: Path = SYSFS_NET) -> set[str]:
    """The ports of a Linux bridge in this network namespace (empty if it is not a bridge here)."""
    try:
        return {p.name for p in (sysfs / bridge / "brif").iterdir()}
    except OSError:
        return set()


def plan(op: str, subop: str, nics: list[Nic], attached: list[str], ports_of) -> list[Step]:
    """Decide, without side effects, what to do for each NIC.

    @v op, subop  libvirt's operation and sub-operation
    @v nics       the domain's bridge NICs (bridge_nics)
    @v attached   the interfaces of the root namespace that xdpoib attached in veth mode
    @v ports_of   bridge name -> its ports (bridge_ports)
    @ret          one Step per NIC; [] for an operation the hook does not act on
    """
    if (op, subop) in REGISTER:
        action = "add"
    elif (op, subop) in RELEASE:
        action = "del"
    else:
        return []
    steps = []
    for nic in nics:
        mine = sorted(set(attached) & ports_of(nic.bridge))
        if not mine:
            steps.append(Step("skip", nic, why=f"no xdpoib attachment is a port of bridge {nic.bridge}"))
        elif len(mine) > 1:
            if action == "add":
                raise UsageError(f"bridge {nic.bridge} has {len(mine)} xdpoib attachments as ports "
                                 f"({', '.join(mine)}): one uplink per bridge")
            steps.extend(Step("del", nic, ifname) for ifname in mine)
        else:
            steps.append(Step(action, nic, mine[0]))
    return steps


class Agents:
    """The running attachments of the root namespace and their control sockets (xdpoib.state)."""

    def attached(self) -> list[str]:
        from xdpoib import state

        return [s.ifname for s in state.attachments() if s.netns is None and s.mode == "veth"]

    def ask(self, ifname: str, cmd: str, **kw) -> dict:
        from xdpoib import control, state

        spec = state.find(ifname, None)
        if not state.pid_alive(spec.pid):
            raise control.ControlError(f"the agent of {spec.where} (pid {spec.pid}) is not running")
        return control.request(state.socket_path(spec.id), cmd, **kw)

    def vifs(self, ifname: str) -> dict[str, dict]:
        return {v["mac"]: v for v in self.ask(ifname, "vifs")["vifs"]}


def register(domain: str, steps: list[Step], agents: Agents, log) -> None:
    """Add each NIC of ours as a VIF (a MAC already a VIF on its VLAN is left as it is); on the first
    failure remove what this call added and raise."""
    added: list[Step] = []
    try:
        for s in steps:
            if s.action == "skip":
                log(f"{domain}: {s.nic.mac} on {s.nic.bridge} skipped: {s.why}")
                continue
            have = agents.vifs(s.ifname).get(s.nic.mac)
            if have is not None:
                if have["vlan"] != s.nic.vlan:
                    raise UsageError(f"{s.nic.mac} is already a VIF of {s.ifname} on VLAN {have['vlan']}, "
                                     f"the domain asks for VLAN {s.nic.vlan}")
                log(f"{domain}: {s.nic.mac} already a VIF of {s.ifname} (QPN {have['qpn']:#x})")
                continue
            v = agents.ask(s.ifname, "vif_add", mac=s.nic.mac, vlan=s.nic.vlan)["vif"]
            added.append(s)
            log(f"{domain}: {s.nic.mac} VIF {v['id']} of {s.ifname} on VLAN {s.nic.vlan} (QPN {v['qpn']:#x})")
    except Exception as e:
        for s in reversed(added):
            try:
                agents.ask(s.ifname, "vif_del", mac=s.nic.mac)
            except XdpoibError as undo:
                log(f"{domain}: rollback of {s.nic.mac} on {s.ifname} failed: {undo}")
        why = str(e) if isinstance(e, XdpoibError) else f"{type(e).__name__}: {e}"
        raise UsageError(f"domain {domain}: {why}") from None


def release(domain: str, steps: list[Step], agents: Agents, log) -> None:
    """Delete each NIC of ours that is a VIF; nothing here fails (a release must never fail)."""
    for s in steps:
        if s.action == "skip":
            continue
        try:
            if s.nic.mac not in agents.vifs(s.ifname):
                continue
            v = agents.ask(s.ifname, "vif_del", mac=s.nic.mac)["vif"]
            log(f"{domain}: {s.nic.mac} released from {s.ifname} (was VIF {v['id']}, QPN {v['qpn']:#x})")
        except XdpoibError as e:
            log(f"{domain}: {s.nic.mac} on {s.ifname} not released: {e}")


def _syslog(line: str) -> None:
    import syslog

    syslog.openlog(IDENT, 0, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_INFO, line)


def main(argv: list[str] | None = None, stdin=None, agents: Agents | None = None, log=_syslog) -> int:
    """The hook: `DOMAIN OPERATION SUBOP EXTRA`, the domain XML on stdin.

    @ret  0, or 1 when a NIC of ours could not be registered (one line on stderr), 2 for a bad call
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        print(f"{IDENT}: expected DOMAIN OPERATION SUBOP [EXTRA] (libvirt's qemu hook arguments), "
              f"got {len(argv)} arguments", file=sys.stderr)
        return 2
    domain, op, subop = argv[:3]
    if (op, subop) not in REGISTER | RELEASE:
        return 0
    agents = agents or Agents()
    try:
        nics = bridge_nics((stdin or sys.stdin).read())
        steps = plan(op, subop, nics, agents.attached(), bridge_ports)
        if (op, subop) in REGISTER:
            register(domain, steps, agents, log)
        else:
            release(domain, steps, agents, log)
    except Exception as e:          # a hook answers libvirt with one line, never a traceback
        why = str(e) if isinstance(e, XdpoibError) else f"{type(e).__name__}: {e}"
        if (op, subop) in RELEASE:
            log(f"{domain}: {op} {subop}: nothing released: {why}")
            return 0
        line = f"{IDENT}: {op} {subop}: {why}".replace("\n", " ")
        print(line, file=sys.stderr)
        log(line)
        return 1
    return 0


if __name__ == "__main__":           # python3 -m xdpoib.libvirt_hook (the installed hook imports main)
    os.umask(0o077)
    sys.exit(main())
