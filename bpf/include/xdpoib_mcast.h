/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_mcast.h - multicast addressing both ways (BPF only; docs/design.md §3.3, 3.4).
 *
 * Includes: xdpoib_parse.h. Offers: mgid_prefix (TX: the MGID of a group, from the P_Key and the
 * scope) and rx_group_mac (RX: the Ethernet group MAC of an IP multicast destination).
 */
#ifndef XDPOIB_MCAST_H
#define XDPOIB_MCAST_H

#include "xdpoib_parse.h"

/**
 * Write the common MGID prefix ff1S:SSSS:PPPP and zero the rest.
 *
 * @v mgid      16 bytes out
 * @v sig       IPv4 or IPv6 signature
 * @v pkey      P_Key with the full-member bit
 * @v scope     scope nibble
 */
static __always_inline void mgid_prefix(u8 *mgid, u16 sig, u16 pkey, u8 scope)
{
	__builtin_memset(mgid, 0, 16);
	mgid[0] = XO_MGID_PREFIX;
	mgid[1] = XO_MGID_FLAGS_T | (scope & XO_MGID_SCOPE_MASK);
	mgid[2] = sig >> 8;
	mgid[3] = sig & 0xff;
	mgid[4] = pkey >> 8;
	mgid[5] = pkey & 0xff;
}

/**
 * The Ethernet destination of a multicast frame, from its IP destination (broadcast otherwise).
 *
 * @v ctx       XDP context (an IPoIB frame)
 * @v etype     EtherType (host order)
 * @v dst       6 bytes out
 */
static __always_inline void rx_group_mac(struct xdp_md *ctx, u16 etype, u8 *dst)
{
	u8 *ip;

	__builtin_memset(dst, 0xff, 6);
	if (etype == XDPOIB_ETH_P_IP) {
		ip = pkt_at(ctx, XDPOIB_IPOIB_HLEN + XO_IPV4_OFF_DST, 4);
		if (!ip || (ip[0] & XO_IPV4_MCAST_MASK) != XO_IPV4_MCAST)
			return;
		dst[0] = XO_MAC_IPV4_MCAST0;
		dst[1] = XO_MAC_IPV4_MCAST1;
		dst[2] = XO_MAC_IPV4_MCAST2;
		dst[3] = ip[1] & XO_MAC_IPV4_MCAST_MASK;
		dst[4] = ip[2];
		dst[5] = ip[3];
	} else if (etype == XDPOIB_ETH_P_IPV6) {
		ip = pkt_at(ctx, XDPOIB_IPOIB_HLEN + XO_IPV6_OFF_DST, 16);
		if (!ip || ip[0] != XO_IPV6_MCAST)
			return;
		dst[0] = XO_MAC_IPV6_MCAST0;
		dst[1] = XO_MAC_IPV6_MCAST1;
		__builtin_memcpy(dst + 2, ip + 12, 4);
	}
}

#endif /* XDPOIB_MCAST_H */
