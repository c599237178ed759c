"""The fabric of the qemu tier: two Soft-RoCE ports (rxe0 on veth0, rxe1 on veth1, made by run.sh)."""

from __future__ import annotations

import ipaddress
import itertools

from xdpoib.fabric.base import Path

DEVICES = ("rxe0", "rxe1")


class RoceFabric:
    """The contract suite's view of Soft-RoCE: GID-routed paths and IPv6-group joins, no SA."""

    qkey = 0x0B1B
    pkey = 0xFFFF
    unicast_grh = True
    counts_rx_drops = False
    _mgids = itertools.count(1)

    def path(self, src, dst, grh: bool = False) -> Path:
        """Unicast path src -> dst: DGID = dst's port GID, MTU = the smaller active MTU."""
        return src.roce_path(dst.port().gid, mtu=min(src.port().active_mtu, dst.port().active_mtu))

    def new_mgid(self) -> bytes:
        """A fresh IPoIB-style MGID (ff12:401b:ffff::N)."""
        return ipaddress.IPv6Address(f"ff12:401b:ffff::{next(self._mgids):x}").packed

    def join(self, backend, mgid: bytes) -> Path:
        """Join backend's port to the group (its netdev joins the IPv6 group)."""
        return backend.roce_join(mgid)

    def leave(self, backend, mgid: bytes) -> None:
        """Leave the group."""
        backend.roce_leave(mgid)
