"""An SA client running as a simulated host, in a child process, driven from here.

umad2sim binds a process to one ibsim node when it starts, so a process can be only one host. Tests and
tools (`SimFabric.sa_client(host)`, `xdpoib doctor --sim`) therefore run the client in a child started
with the host's environment and talk to it with `RemoteSAClient`, which has `SAClient`'s queries
(`REMOTE_METHODS`) and raises the same exception classes. On a real HCA just use `SAClient.open()`.

The child-process mechanism is `remote.py`'s (shared with the sim backend's `simud_remote.py`): the
child serves one `SAService`, the queries of its `SAClient` plus its state (statistics, latencies,
path cache) as plain values; records and errors come back as copies.
"""

from __future__ import annotations

import functools
import subprocess
import sys

from xdpoib.errors import UsageError, XdpoibError
from xdpoib.fabric.remote import Channel, serve_child
from xdpoib.fabric.sa_client import RetryPolicy, SAClient
from xdpoib.fabric.sa_records import SAError, SATimeoutError

#: `SAClient` queries, run as they are in the child.
QUERIES = ("port", "class_port_info", "path", "paths", "send_only_join_state", "join", "join_send_only",
           "leave", "member", "group")
#: Everything a `RemoteSAClient` offers: the queries, then the client's state as values.
REMOTE_METHODS = (*QUERIES, "stats", "latency", "set_policy", "set_sm_key", "set_max_outstanding",
                  "peak_inflight", "path_cache_stats", "invalidate")


def _checked(op: str, fn):
    """`fn`, with a malformed request (wrong types or values) refused as a UsageError."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except XdpoibError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise UsageError(f"bad request {op!r}: {e}") from None

    return run


class SAService:
    """The child's end: one `SAClient`, offering `REMOTE_METHODS` and nothing else."""

    def __init__(self, client: SAClient):
        self._client = client

    def __getattr__(self, name):
        if name in QUERIES:
            return _checked(name, getattr(self._client, name))
        raise AttributeError(name)

    def stats(self) -> dict:
        """The client's counters; a (type, result) key as "type result"."""
        return {" ".join(map(str, k)) if isinstance(k, tuple) else k: v for k, v in self._client.stats.items()}

    def latency(self) -> dict:
        """`LatencyHistogram.snapshot()` of the client's queries."""
        return self._client.latency.snapshot()

    def set_policy(self, **kw) -> None:
        """Replace the retry policy (`RetryPolicy` fields)."""
        self._client.policy = _checked("set_policy", RetryPolicy)(**kw)

    def set_sm_key(self, key: int) -> None:
        """Ask with this SM_Key from now on (OpenSM's default, 1, makes us trusted)."""
        self._client.sm_key = _checked("set_sm_key", int)(key)

    def set_max_outstanding(self, n: int) -> None:
        """Bound the queries in flight at once (at least 1), and reset `peak_inflight`."""
        self._client.max_outstanding = max(1, _checked("set_max_outstanding", int)(n))
        self._client.peak_inflight = 0

    def peak_inflight(self) -> int:
        """The most queries ever in flight at once."""
        return self._client.peak_inflight

    def path_cache_stats(self) -> dict:
        """{"entries", "hits", "misses"} of the path cache."""
        c = self._client.path_cache
        return {"entries": len(c), "hits": c.hits, "misses": c.misses}

    def invalidate(self, dgid=None) -> int:
        """Drop cached paths to `dgid` (all when None); how many were dropped."""
        return _checked("invalidate", self._client.path_cache.invalidate)(dgid)

    def close(self) -> None:
        self._client.close()


def _child_main(fd: int, device: str, port: int) -> int:
    """Child main: open the umad port (the first one unless told) and serve its SA client."""
    return serve_child(fd, lambda: SAService(SAClient.open(device or None, port or None)), (SAService,))


class RemoteSAClient:
    """An `SAClient` living in a child process started with a host's environment (see module doc)."""

    def __init__(self, env: dict[str, str], cwd: str | None = None, device: str | None = None,
                 port: int | None = None, python: str | None = None, timeout: float = 30.0,
                 spawn=subprocess.Popen):
        self.timeout = timeout
        self._channel = Channel("xdpoib.fabric.sa_remote", [device or "", str(port or 0)], env=env, cwd=cwd,
                                timeout=timeout, spawn=spawn, python=python, lost=SATimeoutError,
                                what="SA client process")
        self.proc, self.pid = self._channel.proc, self._channel.pid

    def call(self, op: str, *args, **kwargs):
        """Run one of `REMOTE_METHODS` in the child and return its result (or raise its error)."""
        if op not in REMOTE_METHODS:
            raise SAError(f"unknown operation {op!r}")
        return self._channel.request("call", 0, op, args, kwargs)

    def __getattr__(self, name):
        if name in REMOTE_METHODS:
            return functools.partial(self.call, name)
        raise AttributeError(name)

    def close(self) -> None:
        """Let the child close its port and exit (a normal exit frees its ibsim slot); idempotent."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
