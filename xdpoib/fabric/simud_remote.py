"""Run a sim backend in a child process that is one simulated host, and drive it from here.

umad2sim binds a process to one ibsim node when it starts, so a test (or a demo) that wants several
hosts starts one child per host with that host's environment (`SimFabric.client_env(host)`) and talks
to it through `RemoteBackend`, which has the `Backend` methods. Objects the child returns (QPs, pools,
address handles, the event queue, the SA control) come back as proxies with the same methods; data
(ports, paths, completions, records, errors) comes back as copies, memoryviews as bytes; `fileno()`
works for `select()`. The child-process mechanism is `remote.py`'s, shared with `sa_remote.py`.
"""

from __future__ import annotations

import subprocess
import sys

from xdpoib.fabric.base import AddressHandle, Backend, BufferPool, EventQueue, FabricError, UdQp
from xdpoib.fabric.remote import Channel, Proxy, serve_child


def _proxied() -> tuple[type, ...]:
    """What the child hands out by reference: the backend and everything it makes."""
    from xdpoib.fabric.simud import SAControl, StaticControl

    return (Backend, UdQp, AddressHandle, EventQueue, BufferPool, SAControl, StaticControl)


def _child_main(fd: int, fabric: str, poll_interval: float) -> int:
    """Child main: open the sim backend of `fabric` for this process's port, then answer requests."""
    from xdpoib.fabric.simud import SimUdBackend

    return serve_child(fd, lambda: SimUdBackend.open(fabric, poll_interval=poll_interval), _proxied())


class RemoteBackend(Proxy):
    """A `SimUdBackend` in a child process started with one simulated host's environment."""

    def __init__(self, fabric: str, env: dict[str, str] | None = None, cwd: str | None = None,
                 poll_interval: float = 0.1, timeout: float = 30.0, spawn=subprocess.Popen):
        """Start the child with `env` added to ours, in `cwd`; `spawn` is Popen or a wrapper with its
        signature (e.g. `SimFabric.spawn` bound to a host, which records the child for `down()`)."""
        channel = Channel("xdpoib.fabric.simud_remote", [fabric, str(poll_interval)], env=env, cwd=cwd,
                          timeout=timeout, spawn=spawn, lost=FabricError, what="sim backend child")
        Proxy.__init__(self, channel, 0)
        channel.set_root(self)
        d = self.__dict__
        d["proc"], d["pid"], d["timeout"] = channel.proc, channel.pid, timeout

    @classmethod
    def on_host(cls, fab, host, **kw) -> RemoteBackend:
        """A backend running as `host` of a `SimFabric`, recorded by the fabric so `down()` ends it."""
        return cls(fab.name, fab.client_env(host), fab.client_cwd(host),
                   spawn=lambda argv, **popen: fab.spawn(host, argv, **popen), **kw)

    def close(self) -> None:
        """Close the backend in the child and let the child exit (freeing its ibsim slot); idempotent."""
        self._channel.close()


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
