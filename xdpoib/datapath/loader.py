"""Compile and load the XDP programs with bcc (the only module, with its siblings, that imports bcc).

bcc rewrites map accesses only in the main source file, so `source()` inlines the local headers of
`bpf/include/` into one text before compiling. Compiling takes ~2 s and ~170 MiB: do it once (a
pytest session fixture, or a child process in the agent) and pin what outlives it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from xdpoib.errors import PrerequisiteError, XdpoibError

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
MAIN = BPF_DIR / "xdpoib.c"
PROGRAMS = ("xdpoib_tx", "xdpoib_rx", "xdpoib_rx_batch", "xdpoib_rx_inband", "xdpoib_noop", "xdpoib_tx_raw")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


class BpfLoadError(XdpoibError):
    """bcc could not compile or the kernel refused a program."""


@dataclass(frozen=True)
class Build:
    """Compile-time switches (see bpf/include/xdpoib_helpers.h)."""

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
        """Attach a pinned program to a device's XDP hook (through netlink, no bcc)."""
        from xdpoib import link

        link.attach_xdp(ifname, self.fd(prog))

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


def compile_and_pin(pin_dir: Path, timeout: float = 120.0) -> None:
    """Compile the production build in a child process and pin it under pin_dir, so the caller never
    imports bcc (~170 MiB while compiling, ~72 MiB for the import alone) and adopts the pins instead."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "xdpoib.datapath.loader", "pin", str(pin_dir)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BpfLoadError(f"compiling the datapath failed: {last}")


def _main(argv: list[str]) -> int:
    """`python -m xdpoib.datapath.loader pin DIR`: compile the production build and pin it."""
    if len(argv) != 2 or argv[0] != "pin":
        import sys

        print("usage: python -m xdpoib.datapath.loader pin DIR", file=sys.stderr)
        return 2
    pin_dir = Path(argv[1])
    try:
        with Datapath(Build()) as dp:
            unpin(pin_dir)
            dp.pin(pin_dir)
    except XdpoibError as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
