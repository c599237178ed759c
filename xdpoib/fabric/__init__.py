"""The fabric layer: backends (base contract, sim, verbs), the SA client over libibumad, the test fabric.

- `umad`: ctypes over libibumad.so.3 (real `/dev/infiniband/umad*`, or ibsim through libumad2sim.so);
- `sa`: Subnet Administration client (own port, PathRecords, joins): `sa_records` (records, MAD codecs),
  `sa_client` (the client, its retry engine, the path cache), `sa_remote` (a client as a sim host);
- `remote`: objects in a child process that is one simulated host (used by `sa_remote`, `simud_remote`);
- `simfabric`: ibsim + OpenSM lifecycle, generated topology, faults (`xdpoib sim`).
"""
