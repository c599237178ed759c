"""The VM run's TCP client (run by tests/qemu/guest/vm_checks.sh inside the guest): a few MB each way
to the remote host's server (tests/qemu/test_vm.py), the payload's SHA-256 printed for the host to
compare with the server's record of the same connection.

    python3 vm_tcp.py up HOST PORT BYTES     send BYTES random bytes, half-close, read the server's digest
    python3 vm_tcp.py down HOST PORT BYTES   receive until the server closes; BYTES are expected

Prints one line, `sha256=HEX bytes=N seconds=S mbit_per_s=R` (`up`: and `server=HEX`, the digest of
what the server received), exit 0; a one-line reason and exit 1 when the connection fails, the count
is wrong, or (up) the server's digest is not ours.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time

TIMEOUT = 60.0


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("up", "down"):
        print("usage: vm_tcp.py up|down HOST PORT BYTES", file=sys.stderr)
        return 2
    way, host, port, size = argv[0], argv[1], int(argv[2]), int(argv[3])
    digest, n = hashlib.sha256(), 0
    try:
        t0 = time.monotonic()
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            if way == "up":
                data = os.urandom(size)
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                digest.update(data)
                n = len(data)
                server = b""
                while chunk := s.recv(256):
                    server += chunk
            else:
                while chunk := s.recv(65536):
                    digest.update(chunk)
                    n += len(chunk)
        seconds = time.monotonic() - t0
    except OSError as e:
        print(f"{way}: {host}:{port}: {e} after {n} bytes")
        return 1
    line = f"sha256={digest.hexdigest()} bytes={n} seconds={seconds:.2f} mbit_per_s={n * 8 / seconds / 1e6:.1f}"
    if way == "up":
        line += f" server={server.decode(errors='replace').strip()}"
        ok = server.decode(errors="replace").strip() == digest.hexdigest()
    else:
        ok = n == size
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
