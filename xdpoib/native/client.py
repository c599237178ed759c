"""Drive a native IPoIB host from Python: `NativeHost` starts `xdpoib sim native ... --json` and speaks
its line protocol (one JSON request per line in; events and answers, one JSON object per line, out).

    with NativeHost("lab", "h2", ip="10.0.0.2/24") as peer:
        peer.ping("10.0.0.1", count=3)          # {"sent": 3, "received": 3, "rtt_ms": [...]}
        peer.udp("10.0.0.1", 7, "hello")         # {"reply": "hello", ...}
        peer.received(kind="arp")                # the ARP frames it decoded
        peer.neighbors()                         # its ARP and ND caches

A reader thread collects the output, so events are never lost while a request waits.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from xdpoib.native.peer import NativeError


class NativeHost:
    """One native peer process on host `host` of sim fabric `fabric`."""

    def __init__(self, fabric: str, host: str, *, ip: str | None = None, ip6: tuple[str, ...] = (),
                 dhcp: bool = False, pkey: int | None = None, echo_port: int | None = None,
                 ready_timeout: float = 30.0, stderr=None):
        argv = [sys.executable, "-m", "xdpoib", "sim", "native", fabric, host, "--json"]
        if ip:
            argv += ["--ip", ip]
        for a in ip6:
            argv += ["--ip6", a]
        if dhcp:
            argv.append("--dhcp")
        if pkey is not None:
            argv += ["--pkey", f"{pkey:#06x}"]
        if echo_port is not None:
            argv += ["--echo-port", str(echo_port)]
        self.host = host
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr if stderr is not None else subprocess.PIPE, text=True, bufsize=1)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self.ready: dict | None = None
        self._reader = threading.Thread(target=self._read, name=f"native-{host}", daemon=True)
        self._reader.start()
        if not self._wait(lambda: self.ready is not None or self.proc.poll() is not None, ready_timeout) \
                or self.ready is None:
            err = self._stderr_tail()
            self.close()
            raise NativeError(f"native peer on {host} did not come up: {err or 'no output'}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if "id" in msg and "event" not in msg:
                    self._answers[msg["id"]] = msg
                elif msg.get("event") == "ready":
                    self.ready = msg
                else:
                    self.events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def _stderr_tail(self) -> str:
        if self.proc.stderr is None or self.proc.poll() is None:
            return ""
        try:
            return " | ".join(self.proc.stderr.read().strip().splitlines()[-3:])
        except (OSError, ValueError):
            return ""

    # ---- requests

    def request(self, op: str, wait: float = 15.0, **kw) -> dict:
        """Send one request and wait up to `wait` s for its answer; its result, or NativeError."""
        rid = next(self._ids)
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise NativeError(f"native peer on {self.host} has exited: {self._stderr_tail()}") from None
        if not self._wait(lambda: rid in self._answers or self.proc.poll() is not None, wait):
            raise NativeError(f"native peer on {self.host}: no answer to {op} in {wait:.0f} s")
        ans = self._answers.pop(rid, None)
        if ans is None:
            raise NativeError(f"native peer on {self.host} exited during {op}: {self._stderr_tail()}")
        if not ans.get("ok"):
            raise NativeError(f"native peer on {self.host}: {op}: {ans.get('error')}")
        return ans.get("result", {})

    def ping(self, dst: str, count: int = 1, timeout: float = 3.0, **kw) -> dict:
        """Echo requests to dst (IPv4 or IPv6), 0.2 s apart, replies awaited up to timeout s after the
        last: {"sent", "received", "rtt_ms"}."""
        return self.request("ping", wait=timeout + count * 0.2 + 10, dst=dst, count=count, timeout=timeout, **kw)

    def udp(self, dst: str, port: int, data: str, timeout: float = 3.0) -> dict:
        """One UDP datagram and its answer: {"reply": text or None, ...}."""
        return self.request("udp", wait=timeout + 10, dst=dst, port=port, data=data, timeout=timeout)

    def dhcp(self, timeout: float = 30.0) -> dict:
        """Wait for a DHCP lease (starting the client if it is not running)."""
        return self.request("dhcp", wait=timeout)

    def status(self) -> dict:
        return self.request("status")

    def neighbors(self) -> dict:
        return self.request("neighbors")

    def received(self, kind: str | None = None) -> list[dict]:
        """The frames it received so far (as it decoded them), optionally of one kind."""
        with self._cond:
            return [e for e in self.events if e.get("event") == "rx" and (kind is None or e["kind"] == kind)]

    def wait_event(self, pred: Callable[[dict], bool], timeout: float = 10.0) -> dict | None:
        """The first event (received frame, DHCP step) matching pred, waiting up to timeout."""
        found: list[dict] = []

        def check() -> bool:
            found[:] = [e for e in self.events if pred(e)][:1]
            return bool(found)
        self._wait(check, timeout)
        return found[0] if found else None

    # ---- lifetime

    def close(self, timeout: float = 10.0) -> int | None:
        """Ask it to leave the fabric, then wait (killing it if it does not exit)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"id": 0, "op": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> NativeHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
