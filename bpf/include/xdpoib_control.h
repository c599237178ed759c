/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_control.h - recognising the frames the agent handles itself: DHCP, IGMP, MLD (BPF only).
 *
 * Includes: xdpoib_parse.h. Offers: tx_is_control (TX: DHCP client->server, IGMP, MLD also behind
 * hop-by-hop options) and rx_is_dhcp (RX: DHCP server->client). The agent rewrites these with the
 * oracle (DHCP per RFC 4390) and snoops group reports.
 */
#ifndef XDPOIB_CONTROL_H
#define XDPOIB_CONTROL_H

#include "xdpoib_parse.h"

/**
 * Is this IPv4 packet a first (or only) fragment of UDP from port `sport` to port `dport`?
 *
 * @v ctx       XDP context
 * @v l3off     L3 offset
 * @v keep      L3 bytes (padding excluded)
 * @v sport     source port
 * @v dport     destination port
 */
static __always_inline int is_udp4_ports(struct xdp_md *ctx, u32 l3off, u32 keep, u16 sport, u16 dport)
{
	u8 *h, *ports;
	u32 hl;

	h = pkt_at(ctx, l3off, XO_IPV4_HLEN);
	if (!h)
		return 0;
	hl = (h[0] & 0x0f) * 4;
	if (h[XO_IPV4_OFF_PROTO] != XO_IPPROTO_UDP ||
	    ((h[XO_IPV4_OFF_FRAG] & XO_IPV4_FRAG_HI_MASK) | h[XO_IPV4_OFF_FRAG + 1]) != 0 ||
	    keep < hl + XO_UDP_HLEN)
		return 0;
	ports = pkt_at(ctx, l3off + hl, 4);
	if (!ports)
		return 0;
	return ports[0] == XO_HI(sport) && ports[1] == XO_LO(sport) &&
	       ports[2] == XO_HI(dport) && ports[3] == XO_LO(dport);
}

/**
 * Is this a DHCP server->client message (IPv4/UDP 67->68, first fragment)?
 *
 * @v ctx       XDP context (an IPoIB frame)
 * @v keep      L3 bytes
 */
static __always_inline int rx_is_dhcp(struct xdp_md *ctx, u32 keep)
{
	return is_udp4_ports(ctx, XDPOIB_IPOIB_HLEN, keep, XO_DHCP_SERVER_PORT, XO_DHCP_CLIENT_PORT);
}

/**
 * Is this a frame for the agent: DHCP client->server, IGMP, or MLD (also behind hop-by-hop)?
 *
 * @v ctx       XDP context
 * @v l3off     L3 offset
 * @v etype     EtherType (host order)
 * @v keep      L3 bytes (padding excluded)
 */
static __always_inline int tx_is_control(struct xdp_md *ctx, u32 l3off, u16 etype, u32 keep)
{
	u8 *h, *t;

	if (etype == XDPOIB_ETH_P_IP) {
		h = pkt_at(ctx, l3off, XO_IPV4_HLEN);
		if (!h)
			return 0;
		if (h[XO_IPV4_OFF_PROTO] == XO_IPPROTO_IGMP)
			return 1;
		return is_udp4_ports(ctx, l3off, keep, XO_DHCP_CLIENT_PORT, XO_DHCP_SERVER_PORT);
	}
	if (etype == XDPOIB_ETH_P_IPV6) {
		u32 o = XO_IPV6_HLEN;
		u8 nh;

		h = pkt_at(ctx, l3off, XO_IPV6_HLEN);
		if (!h)
			return 0;
		nh = h[XO_IPV6_OFF_NEXTHDR];
		if (nh == XO_IPPROTO_HOPOPTS && keep >= XO_IPV6_HLEN + XO_IPV6_EXT_UNIT) {
			h = pkt_at(ctx, l3off + XO_IPV6_HLEN, 2);
			if (!h)
				return 0;
			nh = h[0];
			o = XO_IPV6_HLEN + ((u32)h[1] + 1) * XO_IPV6_EXT_UNIT;
		}
		if (nh != XO_IPPROTO_ICMPV6 || keep <= o)
			return 0;
		t = pkt_at(ctx, l3off + o, 1);
		if (!t)
			return 0;
		return t[0] == XO_MLD_QUERY || t[0] == XO_MLD_REPORT || t[0] == XO_MLD_DONE ||
		       t[0] == XO_MLD2_REPORT;
	}
	return 0;
}

#endif /* XDPOIB_CONTROL_H */
