"""The one table of drop reasons (xdpoib/reasons.py): stable numbers, every layer's reasons in it,
one form for `status -j` and the `reason` label, and the README's table in step with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xdpoib import abi
from xdpoib.fabric.base import FabricCounter
from xdpoib.reasons import DropReason, counts, reason

ROOT = Path(__file__).resolve().parents[2]

# Numbers already exported (metric labels, pinned BPF counters of running agents): they never change.
PUBLISHED = {
    "TRUNCATED": 1, "BAD_LENGTH": 2, "UNSUPPORTED_ETHERTYPE": 3, "STACKED_VLAN": 4, "UNKNOWN_VLAN": 5,
    "SPOOFED_SOURCE": 6, "BAD_ARP": 7, "ARP_UNKNOWN_HWADDR": 8, "BAD_ND": 9, "ND_UNKNOWN_LLADDR": 10,
    "MCAST_MISMATCH": 11, "BAD_IP_HEADER": 12, "BAD_DHCP": 13, "NO_ROOM": 14, "UNKNOWN_PEER": 15,
    "UNKNOWN_VIF": 16, "BAD_METADATA": 17, "OVERSIZE": 18, "REDIRECT_FAILED": 19, "LOOPBACK": 20,
    "BAD_IPOIB_HEADER": 21, "NO_PARTITION": 22, "VLAN_MISMATCH": 23, "UNKNOWN_DESTINATION": 24,
    "UNRESOLVED_QUEUE_FULL": 25, "PATH_FAILED": 26, "NO_GROUP": 27, "JOIN_FAILED": 28, "ARP_SPOOFED": 29,
    "ARP_UNVERIFIED": 30, "ND_FOREIGN_LLADDR": 31, "COMPLETION_ERROR": 32, "INJECT_RING_FULL": 33,
    "INJECT_TOO_BIG": 34, "RUNT": 35, "PORT_DOWN": 36, "NO_DESTINATION": 37, "NOT_MEMBER": 38,
    "QKEY_MISMATCH": 39, "PKEY_MISMATCH": 40, "NO_RECV_BUFFER": 41, "RX_OVERRUN": 42, "BAD_DATAGRAM": 43,
    "QP_ERROR": 44, "SEND_QUEUE_FULL": 45,
}


def test_published_numbers_never_change():
    for name, value in PUBLISHED.items():
        assert DropReason[name] == value, f"{name} was renumbered"
    newer = [r for r in DropReason if r.name not in PUBLISHED]
    assert all(r > max(PUBLISHED.values()) for r in newer), "new reasons are appended, never inserted"


def test_numbers_are_unique_and_fit_the_bpf_counters():
    values = [r.value for r in DropReason]
    assert len(values) == len(set(values)) == len(DropReason.__members__)    # no alias hides a reuse
    assert min(values) > 0 and max(values) < abi.DROP_SLOTS


@pytest.mark.parametrize("c", list(FabricCounter))
def test_every_fabric_counter_is_a_reason(c):
    assert reason(c.value).name.lower() == c.value


def test_counts_names_sums_and_orders():
    got = counts({DropReason.RUNT: 2, "pkey_mismatch": 1, 20: 3, "LOOPBACK": 1, DropReason.OVERSIZE: 0})
    assert got == {"loopback": 4, "runt": 2, "pkey_mismatch": 1}
    assert list(got) == ["loopback", "runt", "pkey_mismatch"]          # table order


def test_counts_refuses_a_reason_outside_the_table():
    with pytest.raises(KeyError):
        counts({"made_up": 1})
    with pytest.raises(ValueError):
        counts({63: 1})


def test_the_agent_counts_drops_only_by_reason():
    free_form = re.compile(r"drops\[\s*(f?[\"']|[a-z_.]*name\.lower\(\))")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in sorted((ROOT / "xdpoib").rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if free_form.search(line)]
    assert not hits, "drops counted under a free-form string:\n" + "\n".join(hits)


def test_readme_lists_every_reason_with_its_number():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Drop reasons", 1)[1].split("\n## ", 1)[0]
    rows = dict((name, int(num)) for num, name in re.findall(r"^\| (\d+) \| `([a-z_]+)` \|", section, re.M))
    assert rows == {r.name.lower(): r.value for r in DropReason}
