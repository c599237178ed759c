"""The fabric layer: backends (base contract, sim, verbs), the SA client over libibumad, the test fabric.

- `umad`: ctypes over libibumad.so.3 (real `/dev/infiniband/umad*`, or ibsim through libumad2sim.so);
- `sa`: Subnet Administration client (own port, PathRecords, joins) and its child-process protocol;
- `simfabric`: ibsim + OpenSM lifecycle, generated topology, faults (`xdpoib sim`).
"""
