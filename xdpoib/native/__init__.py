"""A native IPoIB host for the sim fabric: the independent peer xdpoib is tested against.

Every other end-to-end test has xdpoib on both ends, so a mistake made the same way on both sides
cancels out. This package is a host that speaks IPoIB the way a Linux `ib0` does, written from the
RFCs with its own encoder and decoder, and sharing nothing with xdpoib's translator (`xdpoib.wire`,
the oracle, the frame builders, the datapath maps): only the fabric itself (`xdpoib.fabric`: the sim
UD backend and the SA client) is common, since that is the network both stand on.

    wire      RFC 4391 / 826 / 791 / 792 / 768 / 8200 / 4443 / 4861 / 2131 / 4390 encoders and decoders
    peer      NativePeer: bring-up, ARP and ND caches, echo responders and clients, UDP echo, DHCP client
    __main__  the process: a line protocol on stdin/stdout (`xdpoib sim native NAME HOST` starts it)
    client    NativeHost: that process driven from Python (tests)
"""
