"""Run xdpoib as an unprivileged user (nobody), wherever the checkout lives.

The checkout (and its .venv) may sit where other users cannot read, e.g. a 0700 `mktemp -d` or /root: a
process running as nobody could not import it there. `NobodyTree` copies the xdpoib package, and the pure
Python packages the CLI imports from the venv, into a world-readable temporary directory, and runs the
base interpreter on it as nobody. Import as `from nonroot import NobodyTree` (tests/ is on sys.path).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prereq import need_cmd, need_root

NOBODY = 65534
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prometheus_client", "pyroute2")      # imported by xdpoib, installed in the venv


class NobodyTree:
    """A world-readable copy of xdpoib (and its venv-only dependencies) that nobody can run."""

    def __init__(self):
        need_root()
        need_cmd("setpriv")
        self.dir = Path(tempfile.mkdtemp(prefix="xdpoib-nobody-", dir="/tmp"))
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "xdpoib", self.dir / "xdpoib", ignore=ignore)
        for name in PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                shutil.copytree(Path(spec.origin).parent, self.dir / name, ignore=ignore)
        for dirpath, _dirs, filenames in os.walk(self.dir):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        # the venv's python is a link inside the checkout: run the interpreter it points at
        self.python = os.path.realpath(sys.executable)

    def run(self, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        """`xdpoib ARGS` as nobody (uid and gid 65534, no supplementary groups), from /."""
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(self.dir),
                "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent", **(env or {})}
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                self.python, "-m", "xdpoib", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/", env=full)

    def run_python(self, code: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Python `code` as nobody (for access checks)."""
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", self.python, "-c", code]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"})

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
