"""The Debian package (docs/install.md), built and installed as an operator would: `make deb`'s script
builds xdpoib_<version>_all.deb from this tree, lintian reports no error on it, and apt installs it into a
fresh Debian 12 root (debootstrap bookworm, cached as a tarball by tools/debian-root.sh) with every
dependency from the Debian mirror. There, in a chroot with /proc, /sys, /dev and bpffs mounted:
`xdpoib --version`, `man xdpoib` (every subcommand of the parser, nested ones too),
`man 5 xdpoib-attachments.conf`, `xdpoib doctor` (in a throwaway network namespace: its veth check),
the link layer against Debian's own pyroute2 (0.7.2), `systemd-analyze verify` of the installed units;
then `apt-get remove` leaves only the conffiles (an edited one as edited) and `apt-get purge` leaves
nothing of the package. Mounts and the root are removed even when a step fails. Timings are printed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from prereq import IN_CI, need_cmd, need_root

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
ROOT_CACHE = REPO / ".cache" / "debian-root"
APT_CACHE = REPO / ".cache" / "debian-root-archives"     # downloaded .debs, kept between runs
BUDGET_S = 360
DOCTOR_ORDER = ["root", "bpffs", "kernel headers", "bcc", "XDP on veth", "socket buffers", "fabric"]
UNITS = ("xdpoib@.service", "xdpoib-exporter.service")

# The link layer against the root's pyroute2: a veth pair into a namespace, MAC/MTU/state there, XDP
# attached, swapped with XDP_FLAGS_REPLACE (the agent's adoption path), removed; all in the netns this
# runs in (the test starts it with `unshare -n`).
LINK_CHECK = r"""
import json, os, subprocess, sys
import pyroute2
from xdpoib import link
from xdpoib.datapath import bpfsys
subprocess.run(["ip", "netns", "add", "pkgns"], check=True)
try:
    prog = bytes.fromhex("b700000002000000" "9500000000000000")
    link.create_veth("pkga", "pkgb", "pkgns")
    link.set_link("pkga", "pkgns", mac="02:00:00:00:00:01", mtu=1400, up=True)
    info = link.link_info("pkga", "pkgns")
    fd1, _ = bpfsys.prog_load_log(6, prog, "pkg1")
    fd2, _ = bpfsys.prog_load_log(6, prog, "pkg2")
    link.attach_xdp("pkgb", fd1)
    first = link.xdp_prog_id("pkgb")
    link.replace_xdp("pkgb", fd2, fd1)
    second = link.xdp_prog_id("pkgb")
    link.detach_xdp("pkgb")
    gone = link.delete_link("pkga", "pkgns") and not link.link_exists("pkgb")
    print(json.dumps({"pyroute2": pyroute2.__file__, "mac": info.mac, "mtu": info.mtu, "up": info.up,
                      "first": first, "second": second, "after": link.xdp_prog_id("pkgb") if not gone else 0,
                      "gone": gone}))
finally:
    subprocess.run(["ip", "netns", "del", "pkgns"])
"""


class Timings:
    def __init__(self):
        self.steps: list[tuple[str, float]] = []
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str):
        t = time.monotonic()
        try:
            yield
        finally:
            self.steps.append((name, time.monotonic() - t))

    def lines(self) -> list[str]:
        total = time.monotonic() - self.t0
        return [f"package: {name} {s:.1f} s" for name, s in self.steps] + [
            f"package: total so far {total:.1f} s (CI budget {BUDGET_S} s)"]


@pytest.fixture(scope="module")
def timings():
    """The module's step timings; the last test (remove and purge) reports them as measured figures."""
    return Timings()


def run(argv: list[str], timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def bare_root(timings):
    """tools/debian-root.sh started at once in the background (debootstrap waits on the network while
    the package builds and lintian runs); `host` waits for its tarball."""
    need_root()
    need_cmd("debootstrap")
    p = subprocess.Popen(["bash", str(TOOLS / "debian-root.sh"), str(ROOT_CACHE)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    yield p
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def deb(bare_root, tmp_path_factory, timings) -> Path:
    need_cmd("dpkg-buildpackage", "dh", "git")
    out = tmp_path_factory.mktemp("deb")
    with timings.step("build (make deb)"):
        r = run(["bash", str(TOOLS / "build-deb.sh"), str(out)], timeout=300, cwd=REPO)
    path = Path(r.stdout.strip().splitlines()[-1])
    version = re.search(r'__version__ = "(.+?)"', (REPO / "xdpoib" / "__init__.py").read_text())[1]
    assert path.name == f"xdpoib_{version}_all.deb" and path.is_file()
    return path


class Chroot:
    """A Debian root with /proc, /sys, /dev, /dev/pts and bpffs mounted; `run` executes in it.

    The root is bind-mounted on itself and made private first, and every mount below it is private, so
    nothing mounted or unmounted here propagates to the host's /sys, /dev or /sys/fs/bpf."""

    def __init__(self, root: Path):
        self.root = root

    def mount(self, *argv_target: str) -> None:
        *args, target = argv_target
        path = self.root / target.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        run(["mount", *args, str(path)], timeout=30)
        run(["mount", "--make-private", str(path)], timeout=30)

    def mounted(self) -> list[str]:
        """Mount points at or below the root, deepest first."""
        prefix = str(self.root)
        targets = [ln.split()[4].encode().decode("unicode_escape") for ln in
                   Path("/proc/self/mountinfo").read_text().splitlines()]
        return sorted({t for t in targets if t == prefix or t.startswith(prefix + "/")}, key=len, reverse=True)

    def umount_all(self) -> list[str]:
        """Unmount everything at or below the root (whoever mounted it); return what would not go."""
        for _ in range(3):
            for path in self.mounted():
                if subprocess.run(["umount", path], capture_output=True, timeout=30).returncode != 0:
                    subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)
        return self.mounted()

    def run(self, *argv: str, netns: bool = False, check: bool = True, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """argv in the root; with netns=True in a throwaway network and mount namespace (`unshare`)."""
        base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
                "DEBIAN_FRONTEND": "noninteractive", "MANWIDTH": "160", "MAN_DISABLE_SECCOMP": "1"}
        cmd = (["unshare", "--net", "--mount"] if netns else []) + ["chroot", str(self.root), *argv]
        return run(cmd, timeout=timeout, check=check, env={**base, **(env or {})})

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.root / path.lstrip("/"))


def deb_files(deb: Path) -> list[str]:
    """The package's files and symlinks (not its directories, which it may share with others)."""
    out = run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines()
    return [ln.split(None, 5)[5].split(" -> ")[0].removeprefix(".") for ln in out if not ln.startswith("d")]


@pytest.fixture(scope="module")
def host(bare_root, deb, timings, tmp_path_factory):
    """A fresh Debian 12 root with the package installed by apt, as a Chroot."""
    need_cmd("chroot", "unshare", "mount")
    job = bare_root
    with timings.step("waiting for the bare root"):
        out, err = job.communicate(timeout=900)
    built = re.search(r"built \S+ in (\d+) s", err)
    if built:                                       # a fresh debootstrap, not the cached tarball
        timings.steps.append(("debootstrap (beside the build)", float(built[1])))
    if job.returncode == 3:
        (pytest.fail if IN_CI else pytest.skip)(f"the Debian mirror is unreachable: {err.strip()[-300:]}")
    assert job.returncode == 0, err[-3000:]
    tarball = out.strip().splitlines()[-1]
    work = Path(tempfile.mkdtemp(prefix=f"xdpoib-pkg-{os.getpid()}-", dir="/var/tmp"))
    root = work / "root"
    h = Chroot(root)
    try:
        with timings.step("unpack root"):
            root.mkdir()
            run(["tar", "-C", str(root), "--numeric-owner", "-xf", tarball], timeout=300)
        h.mount("--bind", str(root), "/")
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        # services of the dependencies stay down in a chroot (as in any image build)
        policy = root / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        APT_CACHE.mkdir(parents=True, exist_ok=True)
        h.mount("-t", "proc", "proc", "/proc")
        h.mount("-t", "sysfs", "sysfs", "/sys")
        h.mount("-t", "bpf", "bpf", "/sys/fs/bpf")
        h.mount("--bind", "/dev", "/dev")
        h.mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", "/dev/pts")
        h.mount("--bind", str(APT_CACHE), "/var/cache/apt/archives")
        shutil.copy(deb, root / "tmp" / deb.name)
        with timings.step("apt-get update"):
            h.run("apt-get", "-q", "update", timeout=300)
        # without Recommends: the Depends alone must make the product run (and gcc's and libgd's
        # recommends would double the time)
        with timings.step("apt install ./xdpoib_*.deb"):
            h.run("apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb.name}", timeout=600)
        yield h
    finally:
        failed = h.umount_all()
        if not failed:
            shutil.rmtree(work, ignore_errors=True)
        assert not failed, f"could not unmount {failed} (left {work})"
        assert not work.exists(), f"{work} is left behind"


def test_lintian_reports_no_errors(deb, timings, figures):
    need_cmd("lintian")
    with timings.step("lintian"):
        r = run(["lintian", "-I", "-E", "--pedantic", str(deb)], check=False, timeout=300)
    tags = [ln for ln in r.stdout.splitlines() if re.match(r"^[EWIPX]: ", ln)]
    figures("lintian -I -E --pedantic:\n" + "\n".join(tags or ["(no tag)"]))
    assert not [t for t in tags if t.startswith("E: ")], r.stdout
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_command_runs_on_debians_python(host):
    from xdpoib import __version__

    assert host.run("xdpoib", "--version").stdout.strip() == f"xdpoib {__version__}"
    head = (host.root / "usr/bin/xdpoib").read_text().splitlines()[0]
    assert head == "#!/usr/bin/python3", head
    # the BPF sources where the installed agent looks for them
    out = host.run("python3", "-c", "from xdpoib.datapath import loader; print(loader.MAIN); "
                   "print(len(loader.source()))").stdout.split()
    assert out[0] == "/usr/share/xdpoib/bpf/xdpoib.c" and int(out[1]) > 10000, out


def every_command() -> list[str]:
    """'attach', 'sim up', ...: every subcommand of the parser, nested ones too."""
    import argparse

    from xdpoib.cli import build_parser

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix}{name}"
                    yield from walk(sub, f"{prefix}{name} ")

    return list(walk(build_parser(), ""))


def test_man_xdpoib_names_every_subcommand(host):
    page = host.run("man", "-P", "cat", "xdpoib").stdout
    assert page.startswith("XDPOIB(8)"), page[:200]
    commands = every_command()
    assert len(commands) >= 20 and "sim up" in commands and "vif add" in commands
    missing_ = [c for c in commands if not re.search(rf"^\s+xdpoib {re.escape(c)}$", page, re.M)]
    assert not missing_, f"xdpoib(8) has no section for: {missing_}"
    assert "--learn-vifs" in page and "/etc/xdpoib/attachments.conf" in page


def test_man_5_attachments_conf(host):
    page = host.run("man", "-P", "cat", "5", "xdpoib-attachments.conf").stdout
    assert page.startswith("XDPOIB-ATTACHMENTS.CONF(5)"), page[:200]
    assert "eth4 --device mlx5_0 --port 1" in page and "XDPOIB_CONFIG" in page


def test_doctor_reports_this_host(host, figures):
    """Doctor on a host without InfiniBand: root, bpffs, bcc and XDP on veth pass (bcc from Debian's
    python3-bpfcc, `ip` from iproute2: both brought by the package's Depends), the fabric is not checked
    (warn), and the kernel headers pass only if the root has those of the running kernel (apt brings
    Debian's current kernel's). Exit 1 iff a check failed."""
    human = host.run("xdpoib", "doctor", netns=True, check=False)
    figures(f"xdpoib doctor in the installed root (exit {human.returncode}):\n{human.stdout}")
    r = host.run("xdpoib", "doctor", "-j", netns=True, check=False)
    checks = {c["what"]: c for c in json.loads(r.stdout)}
    assert list(checks) == DOCTOR_ORDER, r.stdout
    for what in ("root", "bpffs", "bcc", "XDP on veth"):
        assert checks[what]["status"] == "ok", checks[what]
    assert "importable (/usr/lib/python3/dist-packages/bcc)" in checks["bcc"]["detail"]
    assert checks["fabric"]["status"] == "warn" and "no RDMA device here" in checks["fabric"]["detail"]
    assert checks["socket buffers"]["status"] in ("ok", "warn")     # the host's sysctl, warned about if small
    release = os.uname().release
    have_headers = any((host.root / f"lib/modules/{release}/{d}/include").is_dir() for d in ("build", "source"))
    assert checks["kernel headers"]["status"] == ("ok" if have_headers else "FAIL"), checks["kernel headers"]
    if not have_headers:
        assert f"linux-headers-{release}" in checks["kernel headers"]["fix"]
        installed = list((host.root / "usr/src").glob("linux-headers-*-amd64"))
        assert installed, "the headers dependency brought no linux-headers-*-amd64"
    assert r.returncode == human.returncode == (0 if have_headers else 1), r.stderr


def test_link_layer_with_debians_pyroute2(host):
    r = host.run("python3", "-c", LINK_CHECK, netns=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["pyroute2"].startswith("/usr/lib/python3/dist-packages/pyroute2/"), got
    version = host.run("dpkg-query", "-W", "-f=${Version}", "python3-pyroute2").stdout
    assert version.startswith("0.7."), version          # Debian 12's, not a newer one from PyPI
    assert (got["mac"], got["mtu"], got["up"]) == ("02:00:00:00:00:01", 1400, True), got
    assert got["first"] and got["second"] and got["second"] != got["first"] and got["gone"], got


def test_installed_units_verify(host):
    unit_dir = host.root / "lib/systemd/system"
    for u in UNITS:
        text = (unit_dir / u).read_text()
        assert "ExecStart=/usr/bin/xdpoib " in text and "/usr/bin/env" not in text, text
    # a template is verified as an instance (as tests/unit/test_systemd_units.py does)
    shutil.copy(unit_dir / "xdpoib@.service", host.root / "tmp/xdpoib@eth4.service")
    for path in ("/lib/systemd/system/xdpoib-exporter.service", "/lib/systemd/system/xdpoib@.service",
                 "/tmp/xdpoib@eth4.service"):
        r = host.run("systemd-analyze", "verify", "--man=no", path, check=False)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (path, r.stdout + r.stderr)


def test_conffile_completion_and_shared_files(host):
    conffiles = (host.root / "var/lib/dpkg/info/xdpoib.conffiles").read_text().split()
    assert "/etc/xdpoib/attachments.conf" in conffiles
    assert (host.root / "etc/xdpoib/attachments.conf").read_text() == \
        (REPO / "contrib/attachments.conf.example").read_text()
    for path in ("usr/share/bash-completion/completions/xdpoib", "usr/share/xdpoib/prometheus/xdpoib.rules.yml",
                 "usr/share/xdpoib/grafana/xdpoib.json", "usr/share/xdpoib/bpf/include/xdpoib_abi.h"):
        assert (host.root / path).is_file(), path
    if (REPO / "contrib/libvirt/xdpoib-hook").is_file():
        hook = host.root / "etc/libvirt/hooks/qemu.d/xdpoib"
        assert hook.is_file() and hook.stat().st_mode & 0o777 == 0o755
    if (REPO / "xdpoib/cni.py").is_file():
        assert os.access(host.root / "usr/lib/cni/xdpoib-cni", os.X_OK)


def test_remove_keeps_conffiles_and_purge_leaves_nothing(host, deb, timings, figures):
    files = deb_files(deb)
    listed = host.run("dpkg", "-L", "xdpoib").stdout.split()
    assert set(files) <= set(listed), set(files) - set(listed)
    conffiles = (host.root / "var/lib/dpkg/info/xdpoib.conffiles").read_text().split()
    assert len(files) > 100 and set(conffiles) <= set(files)
    edited = "eth4 --device mlx5_0 --port 1\n"
    (host.root / "etc/xdpoib/attachments.conf").write_text(edited)
    with timings.step("remove + purge"):
        host.run("apt-get", "remove", "-y", "-q", "xdpoib")
        left = [f for f in files if host.exists(f)]
        assert sorted(left) == sorted(conffiles), f"apt-get remove left more than the conffiles: {left}"
        assert (host.root / "etc/xdpoib/attachments.conf").read_text() == edited
        state = host.root / "var/lib/xdpoib"          # what an agent persists (state.py), gone on purge
        state.mkdir()
        (state / "@eth4.json").write_text("{}")
        host.run("apt-get", "purge", "-y", "-q", "xdpoib")
    left = [f for f in files if host.exists(f)]
    assert not left, f"apt-get purge left: {left}"
    for d in ("etc/xdpoib", "var/lib/xdpoib", "usr/share/xdpoib", "usr/lib/python3/dist-packages/xdpoib",
              "usr/share/doc/xdpoib"):
        assert not host.exists(d), f"/{d} is left after purge"
    assert host.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "xdpoib", check=False).stdout.strip() in ("", "un")
    figures("\n".join(timings.lines()))
