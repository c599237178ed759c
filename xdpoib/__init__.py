"""xdpoib: Ethernet workloads on an InfiniBand fabric, spoken as standard IPoIB (RFC 4391/4392)."""

__version__ = "0.1.0"
