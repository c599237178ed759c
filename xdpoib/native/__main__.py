"""`python -m xdpoib.native --fabric NAME [...]`: run one native IPoIB host (see `xdpoib.native`).

The process must be the host's umad client (its environment from `SimFabric.client_env(host)`), which
`xdpoib sim native NAME HOST` arranges. Output, one line per event: what was received, DHCP progress,
answers to requests. Input, one request per line: JSON (`{"id": 1, "op": "ping", "dst": "10.0.0.1"}`)
or words (`ping 10.0.0.1 3`, `udp 10.0.0.1 7 hello`, `status`, `neighbors`, `received`, `dhcp`, `quit`).
`quit` or the end of input (unless `--serve`) lets running requests finish (at most `DRAIN_S`);
SIGTERM or SIGINT stop at once; either way the host leaves its groups and the fabric cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import time

from xdpoib.errors import XdpoibError
from xdpoib.native.peer import NativePeer

DRAIN_S = 10.0          # how long quit / end of input waits for pings and UDP requests still running


def parse_words(line: str) -> dict:
    """A request typed as words: `OP [ARG...]`."""
    words = line.split()
    op, args = words[0].lower(), words[1:]
    if op in ("ping", "ping6") and args:
        return {"op": "ping", "dst": args[0], **({"count": int(args[1])} if len(args) > 1 else {})}
    if op == "udp" and len(args) >= 2:
        return {"op": "udp", "dst": args[0], "port": int(args[1]), "data": " ".join(args[2:])}
    if op in ("neigh", "arp"):
        op = "neighbors"
    return {"op": op}


class LineIO:
    """Requests from stdin, events to stdout (JSON lines, or readable text)."""

    def __init__(self, as_json: bool, serve: bool = False):
        self.as_json, self.serve = as_json, serve
        self.buf = b""
        self.eof = False            # input ended (and we are not serving) or output is gone
        self.closed = False         # input ended
        self.typed = 0

    def emit(self, ev: dict) -> None:
        if self.as_json:
            line = json.dumps(ev, separators=(",", ":"))
        elif ev.get("event") == "rx":
            line = f"rx {ev['summary']}" + (" (grh)" if ev.get("grh") else "")
        elif ev.get("event") == "ready":
            line = (f"native host up: LID {ev['lid']} hwaddr {ev['hwaddr']} P_Key {ev['pkey']} "
                    f"IPv4 {ev['ipv4'] or '-'} IPv6 {' '.join(ev['ipv6'])}")
        else:
            line = json.dumps({k: v for k, v in ev.items() if k != "id" or not str(v).startswith("typed-")})
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.eof = True

    def requests(self) -> list[dict]:
        """The complete lines waiting on stdin, as requests."""
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            self.closed = True
            self.eof = not self.serve
            chunk = b"\n"
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    self.emit({"ok": False, "error": f"bad JSON request: {e}"})
                continue
            self.typed += 1
            out.append({"id": f"typed-{self.typed}", **parse_words(line)})
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdpoib.native", description="a native IPoIB host on a sim fabric")
    p.add_argument("--fabric", required=True)
    p.add_argument("--pkey", default="0xffff", help="partition (default 0xffff)")
    p.add_argument("--ip", help="IPv4 ADDR/LEN")
    p.add_argument("--ip6", action="append", default=[], help="IPv6 ADDR/LEN besides the link-local one")
    p.add_argument("--dhcp", action="store_true", help="get the IPv4 address by DHCP (RFC 4390)")
    p.add_argument("--echo-port", type=int, default=7, help="UDP echo port (default 7)")
    p.add_argument("--json", action="store_true", help="JSON lines out")
    p.add_argument("--serve", action="store_true", help="keep running when input ends (until SIGINT/SIGTERM)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="native: %(message)s", stream=sys.stderr)
    io = LineIO(args.json, serve=args.serve)
    os.set_blocking(0, False)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        peer = NativePeer(args.fabric, pkey=int(args.pkey, 16), ip4=args.ip, ip6=tuple(args.ip6), dhcp=args.dhcp,
                          echo_port=args.echo_port, emit=io.emit)
        peer.open()
    except (XdpoibError, ValueError) as e:
        print(f"xdpoib native: error: {e}", file=sys.stderr)
        return 1
    try:
        st = peer.op_status(None, {})
        io.emit({"event": "ready", **st})
        nxt, drain_until = time.monotonic(), None
        while not stop:
            if peer.stopping or io.eof:         # quit or end of input: finish what was asked first
                drain_until = drain_until or time.monotonic() + DRAIN_S
                if not peer.busy() or time.monotonic() > drain_until:
                    break
            wait = max(0.0, min(nxt - time.monotonic(), 0.5))
            try:
                ready, _, _ = select.select([peer.fileno()] + ([] if io.closed else [0]), [], [], wait)
            except InterruptedError:
                continue
            if peer.fileno() in ready:
                peer.receive()
            if 0 in ready and not io.closed:
                for req in io.requests():
                    peer.request(req)
            peer.receive()
            nxt = peer.tick(time.monotonic())
    except XdpoibError as e:
        print(f"xdpoib native: error: {e}", file=sys.stderr)
        return 1
    finally:
        peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
