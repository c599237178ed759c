"""`xdpoib demo`: three hosts on a simulated fabric (lands with the agent issue)."""

from __future__ import annotations

import sys

NAME = "demo"
HELP = "run the three-host demo on a simulated fabric (OpenSM on ibsim)"
EPILOG = """examples:
  xdpoib demo           run it and tear everything down
  xdpoib demo --keep    leave the fabric and hosts running for exploring
"""

PLAN = """xdpoib demo will:
  1. start ibsim with one switch and three hosts, and OpenSM on it (a real subnet manager);
  2. create three network namespaces, each with eth4 attached over the fabric (`xdpoib attach`);
  3. show ARP resolution, IPv4 and IPv6 ping across the fabric as standard IPoIB;
  4. print `xdpoib status`, `xdpoib peers` and `xdpoib groups` for one host;
  5. tear everything down (unless --keep).
"""


def configure(p):
    p.add_argument("--keep", action="store_true", help="leave the demo running")


def run(args) -> int:
    sys.stdout.write(PLAN)
    print("xdpoib: error: the demo needs the agent (`xdpoib attach`), not landed yet", file=sys.stderr)
    return 1
