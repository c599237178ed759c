"""contrib/kubernetes/ checked offline: the built-in kinds (ConfigMap, DaemonSet, Pod) against the
Kubernetes OpenAPI schemas of the oldest and newest versions PyPI's kubernetes-validate carries, strictly
(an unknown field is an error); the NetworkAttachmentDefinition, a CRD those schemas do not know,
against the structure of Multus's CRD (spec.config: a string) with its embedded CNI configuration
list parsed by xdpoib-cni's own config parser; and the pieces agree with each other (the bridge the
DaemonSet makes is the one the network names, the attachment the plugin uses is the one it runs).
Each check is shown to fail on a broken copy."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from prereq import need_module

from xdpoib import cni

K8S = Path(__file__).resolve().parents[2] / "contrib" / "kubernetes"
VERSIONS = ("1.25.0", "1.37.0")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def documents() -> list[dict]:
    need_module("yaml")
    import yaml

    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def of_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d.get("kind") == kind]


def validate_builtin(doc: dict, version: str) -> None:
    """kubernetes-validate, strict: ValidationError (its message only) when DOC does not fit the schema."""
    need_module("kubernetes_validate")
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']} {doc['metadata'].get('name')} ({version}): {e.message} "
                             f"at {'/'.join(map(str, e.absolute_path))}") from None


def validate_nad(doc: dict) -> list[cni.NetConf]:
    """A NetworkAttachmentDefinition as Multus's CRD defines it (apiVersion k8s.cni.cncf.io/v1, metadata
    with a DNS-subdomain name, spec with one string `config`), whose config is a CNI configuration list
    with xdpoib-cni after the bridge: AssertionError or CniError when not; the parsed xdpoib-cni entries."""
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, f"unknown top-level keys {set(doc)}"
    assert doc["apiVersion"] == "k8s.cni.cncf.io/v1" and doc["kind"] == "NetworkAttachmentDefinition"
    meta = doc["metadata"]
    assert isinstance(meta.get("name"), str) and len(meta["name"]) <= 253 and DNS_SUBDOMAIN.match(meta["name"])
    assert "namespace" not in meta or DNS_LABEL.match(meta["namespace"])
    spec = doc["spec"]
    assert isinstance(spec, dict) and set(spec) == {"config"} and isinstance(spec["config"], str), spec
    conf = json.loads(spec["config"])
    assert isinstance(conf, dict) and isinstance(conf.get("plugins"), list) and conf["plugins"], conf
    assert isinstance(conf.get("name"), str) and cni.NETWORK_NAME.match(conf["name"])
    cni.check_version(conf.get("cniVersion"))
    types = [p.get("type") for p in conf["plugins"]]
    assert all(isinstance(t, str) and t and "/" not in t for t in types), types
    assert "xdpoib-cni" in types and "bridge" in types[:types.index("xdpoib-cni")], \
        f"xdpoib-cni must be chained after bridge: {types}"
    return [cni.parse_config({"cniVersion": conf["cniVersion"], "name": conf["name"], **p})
            for p in conf["plugins"] if p["type"] == "xdpoib-cni"]


def test_builtin_kinds_fit_the_kubernetes_schemas():
    docs = [d for d in documents() if d["apiVersion"] in ("v1", "apps/v1")]
    assert {d["kind"] for d in docs} == {"ConfigMap", "DaemonSet", "Pod"}
    for version in VERSIONS:
        for d in docs:
            validate_builtin(d, version)


def test_a_broken_daemonset_does_not_pass():
    (ds,) = of_kind("DaemonSet")
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = "yes"
    with pytest.raises(AssertionError, match="privileged"):
        validate_builtin(bad, VERSIONS[-1])
    bad = copy.deepcopy(ds)
    bad["spec"]["template"]["spec"]["hostNetworking"] = True           # a typo of hostNetwork
    with pytest.raises(AssertionError, match="hostNetworking"):
        validate_builtin(bad, VERSIONS[-1])


def test_the_network_attachment_definition_and_its_cni_config():
    (nad,) = of_kind("NetworkAttachmentDefinition")
    (own,) = validate_nad(nad)
    assert own.vlan == 0 and own.netns is None


def test_a_broken_network_attachment_definition_does_not_pass():
    (nad,) = of_kind("NetworkAttachmentDefinition")

    def with_entry(**change) -> dict:
        bad = copy.deepcopy(nad)
        conf = json.loads(bad["spec"]["config"])
        next(p for p in conf["plugins"] if p["type"] == "xdpoib-cni").update(change)
        bad["spec"]["config"] = json.dumps(conf)
        return bad

    with pytest.raises(cni.CniError) as e:
        validate_nad(with_entry(vlan=5000))
    assert e.value.code == cni.INVALID_CONFIG
    with pytest.raises(cni.CniError) as e:
        validate_nad(with_entry(vlna=3))
    assert e.value.code == cni.UNSUPPORTED_FIELD and "vlna=3" in e.value.details
    bad = copy.deepcopy(nad)
    bad["spec"]["config"] = json.loads(bad["spec"]["config"])         # an object, not a JSON string
    with pytest.raises(AssertionError):
        validate_nad(bad)
    bad = copy.deepcopy(nad)
    conf = json.loads(bad["spec"]["config"])
    conf["plugins"].reverse()                                          # xdpoib-cni before bridge
    bad["spec"]["config"] = json.dumps(conf)
    with pytest.raises(AssertionError, match="after bridge"):
        validate_nad(bad)


def test_the_pieces_agree():
    (ds,) = of_kind("DaemonSet")
    (cm,) = of_kind("ConfigMap")
    (nad,) = of_kind("NetworkAttachmentDefinition")
    (pod,) = of_kind("Pod")
    (own,) = validate_nad(nad)
    bridge = next(p for p in json.loads(nad["spec"]["config"])["plugins"] if p["type"] == "bridge")
    pod_spec = ds["spec"]["template"]["spec"]
    agent = next(c for c in pod_spec["containers"] if c["name"] == "agent")
    assert agent["command"] == ["xdpoib", "run", own.ifname]                       # runs the plugin's attachment
    listed = [ln.split()[0] for ln in cm["data"]["attachments.conf"].splitlines() if ln.strip()[:1] not in ("#", "")]
    assert listed == [own.ifname]                                                  # ... which the ConfigMap lists
    hook = agent["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert f"ip link set {own.ifname} master {bridge['bridge']}" in hook          # uplink of the NAD's bridge
    assert pod_spec["hostNetwork"] is True and agent["securityContext"]["privileged"] is True
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/run/xdpoib", "/sys/fs/bpf", "/etc/xdpoib", "/var/lib/xdpoib"} <= mounts
    init = pod_spec["initContainers"][0]
    assert init["command"][:2] == ["xdpoib-cni", "--install"]
    cni_bin = next(v for v in pod_spec["volumes"] if v["name"] == "cni-bin")["hostPath"]["path"]
    assert init["volumeMounts"][0]["mountPath"].endswith(cni_bin)
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == nad["metadata"]["name"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
