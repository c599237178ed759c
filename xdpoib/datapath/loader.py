"""Compile and load the XDP programs with bcc (the only module, with its siblings, that imports bcc).

bcc rewrites map accesses only in the main source file, so `source()` inlines the local headers of
`bpf/include/` into one text before compiling. Compiling takes ~2 s and ~170 MiB: do it once (a
pytest session fixture, or a child process in the agent) and pin what outlives it.

Upgrades. Every pin directory carries a build record (the one-entry array map `xo_build`): the ABI
version (`xdpoib.abi.ABI_VERSION`, mirrored from `bpf/include/xdpoib_abi.h`) and a digest of the
build (SHA-256 of the inlined source and the compiler flags). An agent that finds pins decides with
`plan()`:
- same ABI, same digest: adopt them as they are (no compile, counters and peers kept);
- same ABI, another digest: the programs differ but the maps are the same: a child compiles the new
  build, loads its programs again against the pinned maps (every map reference in the instructions is
  an ld_imm64 of a map fd, rewritten to the pinned map of the same name after checking that type,
  key and value sizes, size and flags are equal) and pins them in place of the old ones; the agent
  then swaps the attached program with XDP_FLAGS_REPLACE (`PinnedDatapath.attach`), so traffic meets
  the old program or the new one, never none, and keeps every map;
- another ABI, no record (pins of an older xdpoib), or a map whose layout changed: everything is
  compiled anew with fresh maps, which the agent fills from its own tables (restored from the state
  file: VIFs, peers and their REMACs, partitions, groups) before swapping the programs the same way.
`XDPOIB_BPF_BUILD` (comma-separated `Build` switches; only `test_fill` makes sense on a live host)
selects another production build: the upgrade tests use it as "the next version".
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import os
import re
import struct
from dataclasses import dataclass, fields
from pathlib import Path

from xdpoib.abi import BPF_DIR  # bpf/ of the checkout, else /usr/share/xdpoib/bpf (the package)
from xdpoib.errors import PrerequisiteError, XdpoibError

MAIN = BPF_DIR / "xdpoib.c"
PROGRAMS = ("xdpoib_tx", "xdpoib_rx", "xdpoib_rx_batch", "xdpoib_noop", "xdpoib_tx_raw")
#: Maps the programs use besides the agent's (`maps.LAYOUT`): pinned too, so new programs can reuse them.
INTERNAL_MAPS = ("xo_reported", "xo_events", "xo_scratch")
BUILD_MAP = "xo_build"
_BUILD_RECORD = struct.Struct("<II32s")         # ABI version, reserved, digest
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


class BpfLoadError(XdpoibError):
    """bcc could not compile or the kernel refused a program."""


class LayoutChanged(BpfLoadError):
    """Pinned maps do not fit a new build's programs (the ABI changed): everything must be rebuilt."""


def relocate(insns: bytes, fds: dict[int, int], what: str = "program") -> bytes:
    """A program's instructions with every map fd (an ld_imm64 with src_reg BPF_PSEUDO_MAP_FD, as bcc
    emits them) replaced by fds[old]; a map fd not in `fds` raises LayoutChanged."""
    out = bytearray(insns)
    i, n = 0, len(out) // 8
    while i < n:
        code, regs = out[i * 8], out[i * 8 + 1]
        if code == _LD_IMM64:
            if regs >> 4 == _PSEUDO_MAP_FD:
                old = int.from_bytes(out[i * 8 + 4:i * 8 + 8], "little", signed=True)
                if old not in fds:
                    raise LayoutChanged(f"{what} uses a map (fd {old}) that is not pinned")
                out[i * 8 + 4:i * 8 + 8] = fds[old].to_bytes(4, "little", signed=True)
            elif regs >> 4:
                raise LayoutChanged(f"{what}: ld_imm64 of kind {regs >> 4} cannot be relocated")
            i += 2                                  # ld_imm64 takes two instruction slots
        else:
            i += 1
    return bytes(out)


@dataclass(frozen=True)
class Build:
    """Compile-time switches (see bpf/include/xdpoib_frame.h)."""

    test_fill: bool = False     # fill prepended bytes with 0xFF (tests)
    tx_devmap: bool = False     # TX redirects through a devmap instead of the XSKMAP (tests, bench)
    restore: bool = False       # put the input frame back before returning (bench, repeat > 1)
    restore_bytes: int = 64

    def cflags(self) -> list[str]:
        """Return the compiler flags of this build."""
        flags = ["-DXDPOIB_BPF", "-Wno-unused-function", "-Wno-unused-variable"]
        if self.test_fill:
            flags.append("-DXDPOIB_TEST_FILL")
        if self.tx_devmap:
            flags.append("-DXDPOIB_TX_DEVMAP")
        if self.restore:
            flags += ["-DXDPOIB_RESTORE", f"-DXDPOIB_RESTORE_BYTES={self.restore_bytes}"]
        return flags


def unpin(pin_dir: Path) -> None:
    """Remove everything pinned under pin_dir and the directory itself (missing is fine)."""
    if pin_dir.is_dir():
        for p in pin_dir.iterdir():
            p.unlink()
        pin_dir.rmdir()


TEST_BUILD = Build(test_fill=True, tx_devmap=True)
BENCH_BUILD = Build(tx_devmap=True, restore=True)
BUILD_ENV = "XDPOIB_BPF_BUILD"


def production_build() -> Build:
    """The build an agent runs: the default, or the switches named in XDPOIB_BPF_BUILD."""
    text = os.environ.get(BUILD_ENV, "").strip()
    if not text:
        return Build()
    switches = {f.name for f in fields(Build) if f.type in (bool, "bool")}
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in switches]
    if bad:
        raise BpfLoadError(f"{BUILD_ENV}: unknown switch {bad[0]!r} (known: {', '.join(sorted(switches))})")
    return Build(**{n: True for n in names})


# ---------------------------------------------------------------- build records (upgrades)

@dataclass(frozen=True)
class BuildId:
    """What a pin directory was built from: the ABI version and a digest of source and flags."""

    abi: int
    digest: bytes

    def __str__(self) -> str:
        return f"ABI {self.abi} build {self.digest.hex()[:12]}"


def build_id(build: Build = Build()) -> BuildId:
    """The identity of a build: ABI version and SHA-256 of the inlined source and its flags."""
    from xdpoib import abi

    h = hashlib.sha256(source().encode())
    h.update(b"\0" + " ".join(build.cflags()).encode())
    return BuildId(abi.ABI_VERSION, h.digest())


def write_build_id(pin_dir: Path, bid: BuildId) -> None:
    """Pin (or replace) the build record of pin_dir."""
    from xdpoib.datapath import bpfsys

    fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, _BUILD_RECORD.size, 1, BUILD_MAP)
    try:
        key = ct.c_uint32(0)
        val = (ct.c_uint8 * _BUILD_RECORD.size).from_buffer_copy(_BUILD_RECORD.pack(bid.abi, 0, bid.digest))
        bpfsys.map_update(fd, key, val)
        path = Path(pin_dir) / BUILD_MAP
        tmp = Path(pin_dir) / (BUILD_MAP + "_new")
        if tmp.exists():
            tmp.unlink()
        bpfsys.obj_pin(fd, str(tmp))
        os.replace(tmp, path)
    finally:
        os.close(fd)


def read_build_id(pin_dir: Path) -> BuildId | None:
    """The build record pinned under pin_dir, or None (none pinned, or unreadable)."""
    from xdpoib.datapath import bpfsys

    path = Path(pin_dir) / BUILD_MAP
    if not path.exists():
        return None
    try:
        fd = bpfsys.obj_get(str(path))
    except bpfsys.BpfSyscallError:
        return None
    try:
        if bpfsys.map_info(fd).value_size != _BUILD_RECORD.size:
            return None
        val = (ct.c_uint8 * _BUILD_RECORD.size)()
        if not bpfsys.map_lookup(fd, ct.c_uint32(0), val):
            return None
        version, _r, digest = _BUILD_RECORD.unpack(bytes(val))
        return BuildId(version, digest)
    finally:
        os.close(fd)




def source(main: Path = MAIN) -> str:
    """Return the program source with every local `#include "x.h"` inlined once (include guards kept)."""
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        out = []
        for line in path.read_text().splitlines(keepends=True):
            m = _INCLUDE.match(line)
            if m:
                inc = (path.parent / m.group(1)) if (path.parent / m.group(1)).exists() else \
                    BPF_DIR / "include" / m.group(1)
                if not inc.exists():
                    raise BpfLoadError(f"{path.name}: include {m.group(1)!r} not found")
                inc = inc.resolve()
                if inc not in seen:
                    seen.add(inc)
                    out.append(f"/* ---- {inc.name} ---- */\n{expand(inc)}")
                continue
            out.append(line)
        return "".join(out)

    return expand(main)


class Datapath:
    """The compiled programs and their maps: `fd(name)` of a program, `map_fd(name)` of a map.

    Use as a context manager or call `close()` (idempotent).
    """

    def __init__(self, build: Build = Build()):
        try:
            from bcc import BPF
        except ImportError as e:
            raise PrerequisiteError("bcc is not importable (Debian python3-bpfcc; see make setup)") from e
        self.build = build
        self._bpf = None
        try:
            self._bpf = BPF(text=source().encode(), cflags=build.cflags())
            names = PROGRAMS + (("xdpoib_harness",) if build.restore else ())
            self._progs = {name: self._bpf.load_func(name.encode(), BPF.XDP) for name in names}
        except Exception as e:
            if self._bpf is not None:
                self._bpf.cleanup()
            raise BpfLoadError(f"loading the XDP programs failed: {str(e).splitlines()[0]}") from e

    def fd(self, prog: str) -> int:
        """Return the fd of a loaded program."""
        return self._progs[prog].fd

    def map_fd(self, name: str) -> int:
        """Return the fd of a map."""
        return self._bpf[name.encode()].map_fd

    def table(self, name: str):
        """Return bcc's table object (for its derived Key/Leaf types and ring buffer polling)."""
        return self._bpf[name.encode()]

    @property
    def bpf(self):
        """The bcc BPF object."""
        return self._bpf

    def pin(self, pin_dir: Path) -> None:
        """Pin every program and map under pin_dir (bpffs), so they outlive this process."""
        from xdpoib.datapath import bpfsys
        from xdpoib.datapath.maps import Maps

        pin_dir.mkdir(parents=True, exist_ok=True)
        for name, fn in self._progs.items():
            bpfsys.obj_pin(fn.fd, str(pin_dir / name))
        Maps.of(self).pin(pin_dir)
        for name in INTERNAL_MAPS:
            bpfsys.obj_pin(self.map_fd(name), str(pin_dir / name))
        write_build_id(pin_dir, build_id(self.build))

    def repin_programs(self, pin_dir: Path) -> None:
        """Load this build's programs again against the maps pinned under pin_dir and pin them there
        in place of the old programs (the maps, and what they hold, stay). Raises LayoutChanged when a
        pinned map differs from this build's (type, key or value size, size, flags): the ABI changed."""
        from xdpoib.datapath import bpfsys
        from xdpoib.datapath.maps import LAYOUT

        pinned_fds: dict[str, int] = {}
        loaded: dict[str, int] = {}
        try:
            for name in (*LAYOUT, *INTERNAL_MAPS):
                try:
                    pinned_fds[name] = bpfsys.obj_get(str(pin_dir / name))
                except bpfsys.BpfSyscallError:
                    raise LayoutChanged(f"map {name} is not pinned") from None
                old, new = bpfsys.map_info(pinned_fds[name]).layout(), bpfsys.map_info(self.map_fd(name)).layout()
                if old != new:
                    raise LayoutChanged(f"map {name} changed (type, key, value, entries, flags {old} -> {new})")
            to_pinned = {self.map_fd(n): fd for n, fd in pinned_fds.items()}
            for name in self._progs:
                insns = relocate(self._bpf.dump_func(name.encode()), to_pinned, name)
                loaded[name] = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP, insns, name)
            for name, fd in loaded.items():         # a new pin next to the old, then renamed over it
                tmp = pin_dir / (name + "_new")
                if tmp.exists():
                    tmp.unlink()
                bpfsys.obj_pin(fd, str(tmp))
                os.replace(tmp, pin_dir / name)
            write_build_id(pin_dir, build_id(self.build))
        finally:
            for fd in (*pinned_fds.values(), *loaded.values()):
                os.close(fd)

    def attach(self, prog: str, ifname: str) -> None:
        """Attach one of the programs to a device's XDP hook (native where the driver has it)."""
        from bcc import BPF

        try:
            BPF.attach_xdp(ifname.encode(), self._progs[prog], 0)
        except Exception as e:
            raise BpfLoadError(f"cannot attach {prog} to {ifname}: {str(e).splitlines()[0]}") from e

    @staticmethod
    def detach(ifname: str) -> None:
        """Remove whatever XDP program a device has (quietly: the device may be gone already)."""
        from bcc import BPF

        try:
            BPF.remove_xdp(ifname.encode(), 0)
        except Exception:
            pass

    def close(self) -> None:
        """Unload the programs and drop the maps (pinned ones survive)."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _PinnedProg:
    """A program opened from bpffs: just its fd (what attaching and BPF_PROG_TEST_RUN need)."""

    def __init__(self, fd: int):
        self.fd = fd


class PinnedDatapath:
    """The programs and maps a previous agent pinned, opened without compiling anything (no bcc: a
    restarted agent adopts them in milliseconds and without bcc's ~170 MiB). Same interface as the
    parts of `Datapath` the agent uses: `fd`, `map_fd`, `attach`, `detach`, `close`."""

    def __init__(self, pin_dir: Path):
        from xdpoib.datapath import bpfsys
        from xdpoib.datapath.maps import LAYOUT

        self.pin_dir = Path(pin_dir)
        self._progs: dict[str, _PinnedProg] = {}
        self._maps: dict[str, int] = {}
        try:
            for name in PROGRAMS:
                self._progs[name] = _PinnedProg(bpfsys.obj_get(str(self.pin_dir / name)))
            for name in LAYOUT:
                self._maps[name] = bpfsys.obj_get(str(self.pin_dir / name))
        except bpfsys.BpfSyscallError as e:
            self.close()
            raise BpfLoadError(f"cannot adopt the datapath pinned under {self.pin_dir}: {e}") from None

    def fd(self, prog: str) -> int:
        return self._progs[prog].fd

    def map_fd(self, name: str) -> int:
        return self._maps[name]

    def attach(self, prog: str, ifname: str) -> None:
        """Attach a pinned program to a device's XDP hook (through netlink, no bcc). A program already
        there (an earlier agent's, maybe an older build) is swapped with XDP_FLAGS_REPLACE, naming it
        as the one expected, so the device is never without a program while traffic runs."""
        from xdpoib import link
        from xdpoib.datapath import bpfsys

        current = link.xdp_prog_id(ifname)
        if not current:
            link.attach_xdp(ifname, self.fd(prog))
            return
        try:
            old = bpfsys.prog_fd_by_id(current)
        except bpfsys.BpfSyscallError:          # gone in between: nothing left to replace
            link.attach_xdp(ifname, self.fd(prog))
            return
        try:
            link.replace_xdp(ifname, self.fd(prog), old)
        finally:
            os.close(old)

    @staticmethod
    def detach(ifname: str) -> None:
        from xdpoib import link

        link.detach_xdp(ifname)

    def close(self) -> None:
        """Close our fds (the pins stay)."""
        for fd in [p.fd for p in self._progs.values()] + list(self._maps.values()):
            os.close(fd)
        self._progs, self._maps = {}, {}


def pinned(pin_dir: Path) -> bool:
    """Whether a complete datapath is pinned under pin_dir."""
    from xdpoib.datapath.maps import LAYOUT

    return all((Path(pin_dir) / n).exists() for n in (*PROGRAMS, *LAYOUT))


def compile_and_pin(pin_dir: Path, keep_maps: bool = False, timeout: float = 120.0) -> str:
    """Compile the production build in a child process and pin it under pin_dir, so the caller never
    imports bcc (~170 MiB while compiling, ~72 MiB for the import alone) and adopts the pins instead.
    keep_maps: replace only the programs, keeping the pinned maps (see the module doc). Returns what
    the child did: "pinned", "replaced", or "rebuilt: WHY" (keep_maps refused by a changed map)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "xdpoib.datapath.loader", "pin", str(pin_dir)]
    argv += ["--keep-maps"] if keep_maps else []
    try:
        # niced: an agent (the one a restart replaces, or others on the host) forwards meanwhile, and the
        # compile (seconds of a full core) must not starve it
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.nice(10))
    except subprocess.TimeoutExpired:
        raise BpfLoadError(f"compiling the datapath took more than {timeout:.0f} s") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BpfLoadError(f"compiling the datapath failed: {last}")
    return (r.stdout.strip().splitlines() or ["pinned"])[-1]


@dataclass(frozen=True)
class Adoption:
    """What an agent did with the pins it found: adopt, replace (new programs, maps kept), rebuild
    (new programs and maps) or fresh (nothing was pinned); `why` says what decided it."""

    action: str
    why: str
    old: BuildId | None = None
    new: BuildId | None = None

    @property
    def kept_maps(self) -> bool:
        return self.action in ("adopt", "replace")


def plan(pin_dir: Path, build: Build | None = None) -> Adoption:
    """Decide what to do with what is pinned under pin_dir (see the module doc); changes nothing."""
    want = build_id(build or production_build())
    if not pinned(pin_dir):
        return Adoption("fresh", "nothing pinned", None, want)
    have = read_build_id(pin_dir)
    if have is None:
        return Adoption("rebuild", "the pins carry no build record (an older xdpoib)", None, want)
    if have == want:
        return Adoption("adopt", f"{have} pinned, as this build", have, want)
    if have.abi != want.abi:
        return Adoption("rebuild", f"ABI {have.abi} pinned, this build is ABI {want.abi}", have, want)
    return Adoption("replace", f"programs of {have} pinned, this is {want}", have, want)


def prepare(pin_dir: Path) -> Adoption:
    """Make pin_dir hold this build (compiling in a child when needed) and say what was done: the
    caller opens the pins with `PinnedDatapath`, fills fresh maps from its tables unless
    `kept_maps`, and attaches (a program already attached is replaced atomically)."""
    p = plan(pin_dir)
    if p.action == "adopt":
        return p
    done = compile_and_pin(pin_dir, keep_maps=p.action == "replace")
    if done.startswith("rebuilt"):
        return Adoption("rebuild", f"{p.why}; {done.partition(': ')[2] or 'maps changed'}", p.old, p.new)
    return p


def _main(argv: list[str]) -> int:
    """`python -m xdpoib.datapath.loader pin DIR [--keep-maps]`: compile the production build and pin
    it (with --keep-maps: only its programs, against the maps pinned there, unless their layout
    changed); prints "pinned", "replaced" or "rebuilt: WHY"."""
    import sys

    if len(argv) not in (2, 3) or argv[0] != "pin" or argv[2:] not in ([], ["--keep-maps"]):
        print("usage: python -m xdpoib.datapath.loader pin DIR [--keep-maps]", file=sys.stderr)
        return 2
    pin_dir = Path(argv[1])
    try:
        with Datapath(production_build()) as dp:
            if argv[2:]:
                try:
                    dp.repin_programs(pin_dir)
                    print("replaced")
                    return 0
                except LayoutChanged as e:
                    print(f"rebuilt: {e}")
            unpin(pin_dir)
            dp.pin(pin_dir)
            if not argv[2:]:
                print("pinned")
    except XdpoibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
