"""The benches behind `xdpoib bench`: `e2e` (xdpoib end to end against its baselines), `naive` (the
naive translator e2e measures against, run as `python -m xdpoib.bench.naive`), `control` (the control
plane at scale), `tap` (tap mode's hop) and `datapath` (the BPF programs per packet; the measuring
core, which needs bcc, stays in `xdpoib.datapath.bench`)."""
