"""`xdpoib doctor`'s lines and verdicts without a fabric: the line format, the exit status, and each
check's decision on given inputs (mounts, header trees, sysfs, a port and its broadcast group)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from xdpoib.commands.doctor import (
    FAIL,
    OK,
    WARN,
    Check,
    check_bpffs,
    check_device,
    check_headers,
    check_mtu,
    check_pkey,
    check_port,
    check_root,
    check_socket_buffers,
    exit_status,
    format_check,
    ibsim_listening,
)
from xdpoib.fabric import base


@dataclass
class Port:
    state: int = 4
    lid: int = 7
    active_mtu: int = 4           # 2048
    pkeys: tuple = (0xFFFF, 0x8003, 0)

    def pkey_index(self, pkey):
        return base.pkey_index(self.pkeys, pkey)

    def has_pkey(self, pkey):
        return base.has_pkey(self.pkeys, pkey)


@dataclass
class Group:
    mtu_bytes: int = 2048


def test_a_line_is_status_what_detail_and_a_fix_unless_it_passed():
    assert format_check(Check(OK, "root", "running as root", "ignored")) == "ok    root            running as root"
    assert format_check(Check(WARN, "MTU", "eth MTU 4092", "clamped")) == \
        "warn  MTU             eth MTU 4092  — clamped"
    assert format_check(Check(FAIL, "kernel headers", "none", "install them")) == \
        "FAIL  kernel headers  none  — install them"


def test_exit_status_is_1_only_when_something_failed():
    assert exit_status([Check(OK, "a", ""), Check(WARN, "b", "")]) == 0
    assert exit_status([Check(OK, "a", ""), Check(FAIL, "b", "")]) == 1
    assert exit_status([]) == 0


def test_root():
    assert check_root(0).status == OK
    c = check_root(1000)
    assert c.status == FAIL and c.detail == "running as uid 1000" and "run as root" in c.fix


def test_bpffs_must_be_a_bpf_mount_at_the_place():
    mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n"
    assert check_bpffs(mounts).status == OK
    assert check_bpffs("tmpfs /sys/fs/bpf tmpfs rw 0 0\n").status == FAIL
    c = check_bpffs("sysfs /sys sysfs rw 0 0\n")
    assert c.status == FAIL and "mount -t bpf bpf /sys/fs/bpf" in c.fix


def test_headers_under_build_or_source(tmp_path):
    rel = "6.18.1-test"
    c = check_headers(rel, tmp_path)
    assert c.status == FAIL and f"linux-headers-{rel}" in c.fix and "make setup" in c.fix
    hdr = tmp_path / "src" / "linux-headers-6.1.0-amd64"
    (hdr / "include").mkdir(parents=True)
    (tmp_path / rel).mkdir()
    (tmp_path / rel / "source").symlink_to(hdr)
    c = check_headers(rel, tmp_path)
    assert c.status == OK and str(hdr) in c.detail and "not the running kernel's version" in c.detail
    own = tmp_path / "src" / f"linux-headers-{rel}"
    (own / "include").mkdir(parents=True)
    (tmp_path / rel / "build").symlink_to(own)
    c = check_headers(rel, tmp_path)
    assert c.status == OK and "not the running" not in c.detail


def test_device_needs_the_hca_its_port_and_a_umad_device(tmp_path):
    assert "no RDMA device 'mlx5_0' (devices: none)" in check_device("mlx5_0", 1, tmp_path).detail
    (tmp_path / "infiniband" / "mlx5_0" / "ports" / "1").mkdir(parents=True)
    assert check_device("mlx5_0", 2, tmp_path).detail == "mlx5_0 has no port 2"
    c = check_device("mlx5_0", 1, tmp_path)
    assert c.status == FAIL and "ib_umad" in c.fix
    mad = tmp_path / "infiniband_mad" / "umad0"
    mad.mkdir(parents=True)
    (mad / "ibdev").write_text("mlx5_0\n")
    (mad / "port").write_text("1\n")
    c = check_device("mlx5_0", 1, tmp_path)       # sysfs says umad0, /dev/infiniband/umad0 decides
    assert c.detail.startswith("/dev/infiniband/umad0")


def test_port_state():
    assert check_port(Port(), "lab:h1") == Check(OK, "port", "lab:h1 ACTIVE, LID 7")
    c = check_port(Port(state=2, lid=0), "mlx5_0/1")
    assert c.status == FAIL and c.detail == "mlx5_0/1 is INIT (LID 0)" and "ibstat" in c.fix


def test_pkey_in_the_table_membership_bit_ignored():
    assert check_pkey(Port(), 0x0003).detail == "0x0003 at index 1 of the port's table (0xffff 0x8003)"
    c = check_pkey(Port(), 0x8005)
    assert c.status == FAIL and c.detail == "0x8005 is not in the port's P_Key table (0xffff 0x8003)"
    assert "partitions.conf" in c.fix


@pytest.mark.parametrize("group, port, limit, status, text", [
    (Group(2048), Port(active_mtu=4), 3506, OK, "eth MTU 2044 (broadcast group G: IB MTU 2048; port active MTU 2048)"),
    (Group(4096), Port(active_mtu=5), 3506, WARN, "veth with XDP allows at most 3506 here"),
    (Group(4096), Port(active_mtu=5), None, OK, "eth MTU 4092"),
    (Group(4096), Port(active_mtu=4), 3506, FAIL, "IB MTU 4096 is above the port's active MTU 2048"),
    (None, Port(), 3506, FAIL, "no broadcast group G"),
])
def test_mtu(group, port, limit, status, text):
    c = check_mtu(group, port, "G", limit)
    assert c.status == status and text in c.detail, c
    assert status == OK or c.fix


def test_ibsim_is_found_by_its_abstract_control_socket(tmp_path):
    unix = tmp_path / "unix"
    head = "Num       RefCount Protocol Flags    Type St Inode Path\n"
    unix.write_text(head + "0000: 00000002 00000000 00010000 0001 01 4242 @xdpoib-lab:ctl@0\n")
    assert ibsim_listening("xdpoib-lab", unix)
    assert not ibsim_listening("xdpoib-other", unix)
    assert not ibsim_listening("xdpoib-lab", tmp_path / "missing")


def test_socket_buffers_warn_where_an_application_cannot_ask_for_4_mib():
    """A datagram through xdpoib takes ~4 KiB of a socket's buffer: Debian 12's 6.1 caps a request at
    212992 bytes (~100 datagrams), 6.12 and later at 4 MiB (~1978)."""
    c = check_socket_buffers(4 << 20, 212992)
    assert (c.status, c.what) == (OK, "socket buffers")
    assert c.detail == ("net.core.rmem_max 4194304, rmem_default 212992 (~50 small datagrams by default, "
                        "~1978 when a socket asks for the most)")
    w = check_socket_buffers(212992, 212992)
    assert w.status == WARN and "sysctl -w net.core.rmem_max=4194304" in w.fix and "docs/operations.md" in w.fix
    assert check_socket_buffers(None, 212992).status == WARN


def test_sysctls_are_read_as_integers_and_a_missing_one_is_none():
    from xdpoib.link import read_sysctl

    with open("/proc/sys/net/core/rmem_max") as f:
        assert read_sysctl("net.core.rmem_max") == int(f.read())
    assert read_sysctl("net.core.no_such_sysctl") is None
