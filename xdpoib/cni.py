"""`xdpoib-cni`: a chained CNI plugin (spec 1.0.0) that makes a container's interface a VIF of an attachment.

Chained after an interface plugin such as the reference `bridge` (whose bridge has the attached
interface, eth4, as its uplink), it gives the container's MAC its own UD QP on the attachment, so the
container is an IPoIB endpoint of its own on the fabric (its own QPN, as `xdpoib vif add` does), and
returns the previous result unchanged. The runtime runs it as every CNI plugin: `CNI_COMMAND` (ADD,
DEL, CHECK, VERSION), `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH` in the
environment, the plugin's network configuration on stdin, the result (or a CNI error object: cniVersion,
code, msg, details) on stdout, a non-zero exit on error.

Configuration keys (besides the protocol's `cniVersion`, `name`, `type`, `prevResult`):
- `attachment` (object, optional): the xdpoib attachment the bridge's uplink is, `{"ifname": "eth4",
  "netns": null}` by default; `netns` names a network namespace (`ip netns`), null the root namespace.
- `vlan` (integer 0-4094, default 0 = untagged): the VIF's VLAN, which must be mapped to a partition
  on the attachment (`attach --vlan VID:PKEY`).
- `dataDir` (string, default /var/lib/cni/xdpoib): where the plugin records which MAC it registered for
  each (container, interface), so DEL releases exactly that VIF even when the container is gone.
Unknown keys are refused with code 2 (except the spec's well-known `ipMasq`, `ipam`, `dns`,
`runtimeConfig`, `args`, `capabilities` and `cni.dev/*`), so a mistyped key is not silently ignored.

Semantics: ADD takes the MAC of `CNI_IFNAME` in `CNI_NETNS` from `prevResult`, registers it with the
attachment's agent over its control socket (a MAC already a VIF on the same VLAN, e.g. learned, is
taken over) and records it; DEL releases the recorded VIF and forgets it, and succeeds when there is
nothing to release (DEL twice, an unknown container, an attachment that is gone); CHECK fails unless
the MAC is a VIF on the configured VLAN. A recorded attachment whose agent does not answer is code 11
(try again later) for every command, DEL included: the agent restores its VIFs when it comes back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from xdpoib import state
from xdpoib.control import ControlError
from xdpoib.errors import AddressError, UsageError, XdpoibError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_DATA_DIR = "/var/lib/cni/xdpoib"
PROTOCOL_KEYS = {"cniVersion", "name", "type", "prevResult", "runtimeConfig", "args", "capabilities",
                 "ipMasq", "ipam", "dns"}
OWN_KEYS = {"attachment", "vlan", "dataDir"}
CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NETWORK_NAME = CONTAINER_ID

# Error codes of the CNI spec (1.0.0, section "Error"); 100 and up are this plugin's own.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
AGENT_REFUSED = 100       # the attachment's agent refused the VIF (its message in details)
NOT_A_VIF = 101           # CHECK: the container's MAC is not a VIF (or not on the configured VLAN)
INTERNAL_ERROR = 102      # a bug in the plugin (the exception in details)


class CniError(XdpoibError):
    """A CNI error result: `code` one of the spec's codes (or ours, 100+), `msg` short, `details` longer."""

    def __init__(self, code: int, msg: str, details: str = ""):
        self.code, self.msg, self.details = code, msg, details
        super().__init__(f"{msg}: {details}" if details else msg)


@dataclass(frozen=True)
class NetConf:
    """This plugin's part of a network configuration, validated."""

    cni_version: str
    name: str
    ifname: str = "eth4"
    netns: str | None = None
    vlan: int = 0
    data_dir: str = DEFAULT_DATA_DIR

    @property
    def where(self) -> str:
        return f"{self.ifname} in netns {self.netns}" if self.netns else self.ifname


def check_version(version) -> str:
    """The config's cniVersion if this plugin speaks it (CniError 1 otherwise)."""
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version",
                       f"cniVersion {version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}")
    return version


def parse_config(conf) -> NetConf:
    """Validate a plugin configuration object (as a runtime passes it, or one entry of a conflist with
    `cniVersion` and `name` added): CniError 1, 2 or 7 naming the bad key and value."""
    if not isinstance(conf, dict):
        raise CniError(INVALID_CONFIG, "invalid network config", "the configuration is not a JSON object")
    version = check_version(conf.get("cniVersion"))
    for key, value in conf.items():
        if key not in PROTOCOL_KEYS | OWN_KEYS and not key.startswith("cni.dev/"):
            raise CniError(UNSUPPORTED_FIELD, "unsupported field in network config",
                           f"{key}={json.dumps(value)} (known: {', '.join(sorted(OWN_KEYS))})")
    name = conf.get("name")
    if not isinstance(name, str) or not NETWORK_NAME.match(name):
        raise CniError(INVALID_CONFIG, "invalid network config", f"name={json.dumps(name)}: not a network name")
    att = conf.get("attachment", {})
    if not isinstance(att, dict):
        raise CniError(INVALID_CONFIG, "invalid network config",
                       f"attachment={json.dumps(att)}: expected an object like {{\"ifname\": \"eth4\"}}")
    for key, value in att.items():
        if key not in ("ifname", "netns"):
            raise CniError(UNSUPPORTED_FIELD, "unsupported field in network config",
                           f"attachment.{key}={json.dumps(value)} (known: ifname, netns)")
    ifname = att.get("ifname", "eth4")
    if not isinstance(ifname, str) or not 0 < len(ifname) < 16 or "/" in ifname or ifname.strip() != ifname:
        raise CniError(INVALID_CONFIG, "invalid network config",
                       f"attachment.ifname={json.dumps(ifname)}: not an interface name")
    netns = att.get("netns")
    if netns is not None and (not isinstance(netns, str) or not netns or "/" in netns):
        raise CniError(INVALID_CONFIG, "invalid network config",
                       f"attachment.netns={json.dumps(netns)}: a namespace name (ip netns), or null for the root")
    vlan = conf.get("vlan", 0)
    if isinstance(vlan, bool) or not isinstance(vlan, int) or not 0 <= vlan <= 4094:
        raise CniError(INVALID_CONFIG, "invalid network config", f"vlan={json.dumps(vlan)}: an integer 0..4094")
    data_dir = conf.get("dataDir", DEFAULT_DATA_DIR)
    if not isinstance(data_dir, str) or not data_dir.startswith("/"):
        raise CniError(INVALID_CONFIG, "invalid network config", f"dataDir={json.dumps(data_dir)}: an absolute path")
    return NetConf(version, name, ifname, netns, vlan, data_dir)


def container_mac(prev, ifname: str, netns: str) -> str:
    """The MAC of interface IFNAME in sandbox NETNS as the previous plugin reported it (CniError 7)."""
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "invalid network config",
                       "no prevResult: xdpoib-cni is a chained plugin, put it after an interface plugin such as bridge")
    for itf in prev.get("interfaces") or []:
        if isinstance(itf, dict) and itf.get("name") == ifname and itf.get("sandbox") == netns:
            mac = itf.get("mac")
            if not isinstance(mac, str):
                break
            from xdpoib.wire.addr import mac_str, parse_mac

            try:
                return mac_str(parse_mac(mac))
            except AddressError:
                raise CniError(INVALID_CONFIG, "invalid prevResult",
                               f"interface {ifname} has MAC {mac!r}") from None
    raise CniError(INVALID_CONFIG, "invalid prevResult",
                   f"prevResult has no interface {ifname} with a MAC in {netns}: is xdpoib-cni chained after bridge?")


# ---- the attachment's agent, in-process (the machinery of `xdpoib vif`)

def _ask(ifname: str, netns: str | None, cmd: str, **kw) -> dict:
    """A control request to the agent: CniError 11 when the attachment is unknown or its agent is down,
    AGENT_REFUSED when it answers with an error."""
    from xdpoib.commands.vif import ask

    try:
        return ask(ifname, netns, cmd, **kw)
    except UsageError as e:                     # not attached (yet: the agent may be starting)
        raise CniError(TRY_AGAIN_LATER, "the xdpoib attachment is not up", str(e)) from None
    except ControlError as e:
        spec = state.read_spec(state.attachment_id(ifname, netns))
        if spec is None or not state.pid_alive(spec.pid):
            raise CniError(TRY_AGAIN_LATER, "the xdpoib agent is not running", str(e)) from None
        raise CniError(AGENT_REFUSED, "the xdpoib agent refused the request", str(e)) from None


def _vif_of(ifname: str, netns: str | None, mac: str) -> dict | None:
    return next((v for v in _ask(ifname, netns, "vifs")["vifs"] if v["mac"] == mac), None)


def _check_vlan(nc: NetConf) -> None:
    """The VLAN must be mapped to a partition on the attachment (CniError 7), checked before any change."""
    spec = state.read_spec(state.attachment_id(nc.ifname, nc.netns))
    if spec is not None and nc.vlan and nc.vlan not in [v for v, _ in spec.vlans]:
        mapped = ", ".join(str(v) for v, _ in spec.vlans) or "none"
        raise CniError(INVALID_CONFIG, "invalid network config",
                       f"vlan={nc.vlan} is not mapped to a partition on {nc.where} (mapped: {mapped})")


# ---- records: which MAC this plugin registered for a (container, interface)

def _record_path(data_dir: str, network: str, cid: str, ifname: str) -> Path:
    return Path(data_dir) / network / f"{cid}-{ifname}.json"


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CniError(IO_FAILURE, "cannot read the plugin's record", f"{path}: {e}") from None
    return rec if isinstance(rec, dict) else None


def _write_record(path: Path, rec: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        state.write_private(path, json.dumps(rec, sort_keys=True) + "\n")
    except OSError as e:
        raise CniError(IO_FAILURE, "cannot write the plugin's record", f"{path}: {e}") from None


# ---- the commands

def cmd_add(conf: dict, env: dict) -> dict:
    nc = parse_config(conf)
    cid, netns, ifname = env["CNI_CONTAINERID"], env["CNI_NETNS"], env["CNI_IFNAME"]
    mac = container_mac(conf.get("prevResult"), ifname, netns)
    _check_vlan(nc)
    have = _vif_of(nc.ifname, nc.netns, mac)
    if have is not None and have["vlan"] != nc.vlan:
        raise CniError(AGENT_REFUSED, "the MAC is a VIF already",
                       f"{mac} is a VIF of {nc.where} on VLAN {have['vlan']}, not {nc.vlan}")
    vif = have or _ask(nc.ifname, nc.netns, "vif_add", mac=mac, vlan=nc.vlan)["vif"]
    rec = {"container": cid, "ifname": ifname, "netns": netns, "mac": mac, "vlan": nc.vlan,
           "qpn": vif["qpn"], "attachment": {"ifname": nc.ifname, "netns": nc.netns}}
    try:
        _write_record(_record_path(nc.data_dir, nc.name, cid, ifname), rec)
    except CniError:
        if have is None:
            with contextlib.suppress(CniError):
                _ask(nc.ifname, nc.netns, "vif_del", mac=mac)
        raise
    return conf["prevResult"]


def cmd_del(conf: dict, env: dict) -> None:
    """Release the recorded VIF; success when there is nothing (left) to release."""
    name, data_dir = conf.get("name"), conf.get("dataDir", DEFAULT_DATA_DIR)
    if not isinstance(name, str) or not NETWORK_NAME.match(name) or not isinstance(data_dir, str):
        parse_config(conf)                      # names the bad key; a record cannot be found without them
    path = _record_path(data_dir, name, env["CNI_CONTAINERID"], env["CNI_IFNAME"])
    rec = _read_record(path)
    if rec is None:
        return                                   # never added, or released already
    att = rec.get("attachment") or {}
    try:
        if _vif_of(att.get("ifname", ""), att.get("netns"), rec.get("mac")) is not None:
            _ask(att.get("ifname", ""), att.get("netns"), "vif_del", mac=rec["mac"])
    except CniError as e:
        if e.code != TRY_AGAIN_LATER or state.read_spec(state.attachment_id(att.get("ifname", ""),
                                                                             att.get("netns"))) is not None:
            raise
        # the attachment is gone (detached): its VIFs went with it
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def cmd_check(conf: dict, env: dict) -> None:
    nc = parse_config(conf)
    if nc.cni_version in ("0.3.0", "0.3.1"):
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version",
                       f"CHECK needs cniVersion 0.4.0 or later, the config says {nc.cni_version}")
    mac = container_mac(conf.get("prevResult"), env["CNI_IFNAME"], env["CNI_NETNS"])
    vif = _vif_of(nc.ifname, nc.netns, mac)
    if vif is None:
        raise CniError(NOT_A_VIF, "the container's MAC is not a VIF", f"{mac} is not a VIF of {nc.where}")
    if vif["vlan"] != nc.vlan:
        raise CniError(NOT_A_VIF, "the container's VIF is on another VLAN",
                       f"{mac} is a VIF of {nc.where} on VLAN {vif['vlan']}, the config says {nc.vlan}")


REQUIRED_ENV = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
                "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
                "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
                "VERSION": ()}


def _check_env(command: str, env: dict) -> None:
    missing = [k for k in REQUIRED_ENV[command] if not env.get(k)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT, "missing environment variables", f"{command} needs {', '.join(missing)}")
    cid = env.get("CNI_CONTAINERID")
    if command != "VERSION" and not CONTAINER_ID.match(cid):
        raise CniError(INVALID_ENVIRONMENT, "invalid environment variable", f"CNI_CONTAINERID={cid!r}")
    ifname = env.get("CNI_IFNAME", "")
    if command != "VERSION" and ("/" in ifname or len(ifname) > 15 or ifname in (".", "..")):
        raise CniError(INVALID_ENVIRONMENT, "invalid environment variable", f"CNI_IFNAME={ifname!r}")


def run(env: dict, stdin) -> dict | None:
    """One plugin invocation: the result to print (None for nothing), or CniError."""
    command = env.get("CNI_COMMAND", "")
    if command not in REQUIRED_ENV:
        raise CniError(INVALID_ENVIRONMENT, "invalid environment variable",
                       f"CNI_COMMAND={command!r} is not ADD, DEL, CHECK or VERSION")
    _check_env(command, env)
    try:
        raw = stdin.read()
    except OSError as e:
        raise CniError(IO_FAILURE, "cannot read the network config", str(e)) from None
    except ValueError as e:                      # not UTF-8
        raise CniError(DECODING_FAILURE, "cannot decode the network config", str(e)) from None
    if command == "VERSION" and not raw.strip():
        return {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise CniError(DECODING_FAILURE, "cannot decode the network config", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, "cannot decode the network config", "not a JSON object")
    if command == "VERSION":
        version = conf.get("cniVersion") or SUPPORTED_VERSIONS[-1]
        return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    check_version(conf.get("cniVersion"))
    if command == "ADD":
        return cmd_add(conf, env)
    if command == "DEL":
        cmd_del(conf, env)
    else:
        cmd_check(conf, env)
    return None


def _config_version(raw_conf) -> str:
    v = raw_conf.get("cniVersion") if isinstance(raw_conf, dict) else None
    return v if v in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def install(directory: str, python: str = "/usr/bin/python3") -> Path:
    """Write the plugin into DIRECTORY (a runtime's CNI bin directory, e.g. /opt/cni/bin) as one
    self-contained file: a zipapp of the xdpoib package run by PYTHON, so a node needs python3 but not
    xdpoib installed (what the Kubernetes DaemonSet's init container does). Replaced atomically."""
    import shutil
    import tempfile
    import zipapp

    import xdpoib

    pkg = Path(xdpoib.__file__).resolve().parent
    target = Path(directory) / "xdpoib-cni"
    with tempfile.TemporaryDirectory() as stage:
        for src in pkg.rglob("*.py"):
            dst = Path(stage) / "xdpoib" / src.relative_to(pkg)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        (Path(stage) / "__main__.py").write_text("import sys\n\nfrom xdpoib.cni import main\n\nsys.exit(main())\n")
        tmp = target.with_name(f".xdpoib-cni.{os.getpid()}")
        zipapp.create_archive(stage, tmp, interpreter=python)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


def _admin(args: list[str]) -> int:
    """Arguments are not part of CNI: `xdpoib-cni --install DIR` (or --help) for an operator."""
    import argparse

    p = argparse.ArgumentParser(
        prog="xdpoib-cni",
        description="A chained CNI plugin (spec 1.0.0) registering a container's MAC as a VIF of an xdpoib "
                    "attachment. Runtimes run it without arguments (CNI_COMMAND and the network config on stdin).",
        epilog="example: xdpoib-cni --install /opt/cni/bin   (a self-contained copy for a runtime's CNI bin dir)")
    p.add_argument("--install", metavar="DIR", required=True, help="write the plugin into DIR as one zipapp file")
    p.add_argument("--python", default="/usr/bin/python3", metavar="PATH", help="its interpreter (default %(default)s)")
    a = p.parse_args(args)
    try:
        print(f"installed {install(a.install, a.python)}")
    except OSError as e:
        print(f"xdpoib-cni: error: cannot install into {a.install}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The plugin's entry point: the CNI protocol on the environment, stdin and stdout (arguments: `_admin`)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        return _admin(args)
    env = dict(os.environ)
    data = _Tee(sys.stdin)
    try:
        result = run(env, data)
    except CniError as e:
        out = {"cniVersion": _config_version(data.parsed()), "code": e.code, "msg": e.msg, "details": e.details}
        print(json.dumps(out), flush=True)
        return 1
    except Exception as e:                       # a bug: still an error result the runtime can show
        out = {"cniVersion": _config_version(data.parsed()), "code": INTERNAL_ERROR,
               "msg": "xdpoib-cni internal error", "details": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
        return 1
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


class _Tee:
    """stdin, remembered, so an error result can carry the config's cniVersion."""

    def __init__(self, f) -> None:
        self.f, self.raw = f, None

    def read(self) -> str:
        self.raw = self.f.read()
        return self.raw

    def parsed(self):
        try:
            return json.loads(self.raw) if self.raw else None
        except ValueError:
            return None


if __name__ == "__main__":
    sys.exit(main())
