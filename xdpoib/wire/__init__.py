"""The pure wire library: addresses, MGIDs, frames, the translation oracle, IPoIB pcap.

No root, no bcc, no I/O: everything here is a function of its arguments, so the BPF datapath can be
checked against it and the agent can use it for control frames.
"""
