/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * xdpoib_consts.h - protocol numbers, sizes and header offsets the BPF programs test (BPF only).
 *
 * Includes: xdpoib_abi.h (EtherTypes, ARP hardware types and the contract's sizes live there: the
 * Python side mirrors them). Offers: named literals, host order, with the oracle's names
 * (xdpoib/wire/frames.py), so no bare protocol number appears in the programs. XO_HI/XO_LO split a
 * 16-bit constant into its network-order bytes, for byte-wise compares in the packet.
 */
#ifndef XDPOIB_CONSTS_H
#define XDPOIB_CONSTS_H

#include "xdpoib_abi.h"

#define XO_HI(x)                (((x) >> 8) & 0xff)     /* first byte on the wire of a BE16 */
#define XO_LO(x)                ((x) & 0xff)            /* second byte */

/* ================================================================ link layer */

#define XO_MAX_L2_HLEN          18      /* Ethernet + one VLAN tag: the largest L3 offset */
#define XO_VLAN_VID_MASK        0x0fff  /* the VID of an 802.1Q TCI */
#define XO_PKEY_MASK            0x7fff  /* a P_Key without its membership bit */
#define XO_MAC_MCAST_BIT        0x01    /* first MAC byte: group address */
#define XO_MAC_IPV4_MCAST0      0x01    /* 01:00:5e:xx:xx:xx, IPv4 multicast (RFC 1112) */
#define XO_MAC_IPV4_MCAST1      0x00
#define XO_MAC_IPV4_MCAST2      0x5e
#define XO_MAC_IPV4_MCAST_MASK  0x7f    /* the 23 low group bits: fourth byte mask */
#define XO_MAC_IPV6_MCAST0      0x33    /* 33:33:xx:xx:xx:xx, IPv6 multicast (RFC 2464) */
#define XO_MAC_IPV6_MCAST1      0x33

/* ================================================================ MGIDs (docs/design.md §3.3, 3.4) */

#define XO_MGID_PREFIX          0xff    /* byte 0 of every MGID */
#define XO_MGID_FLAGS_T         0x10    /* byte 1 high nibble: transient */
#define XO_MGID_SCOPE_MASK      0x0f    /* byte 1 low nibble: scope */
#define XO_MGID_SCOPE_LINK      2       /* link-local: the default scope of the broadcast group */
#define XO_MGID_IPV4_GROUP      12      /* IPv4 group: bytes 12..15 (the group's top nibble cut) */
#define XO_MGID_IPV6_GROUP      6       /* IPv6 group: bytes 6..15 (the group's low 80 bits) */

/* ================================================================ ARP (RFC 826, RFC 4391 §8) */

#define XO_ARP_HLEN             8       /* htype, ptype, hlen, plen, op */
#define XO_ARP_PLEN_IPV4        4       /* plen of IPv4 */
#define XO_ARP_HLEN_ETH         XDPOIB_ETH_ALEN         /* hlen of Ethernet */
#define XO_ARP_HLEN_IB          XDPOIB_HWADDR_LEN       /* hlen of IPoIB */

/* ================================================================ IPv4 (RFC 791) */

#define XO_IPV4_VERSION         4
#define XO_IPV4_MIN_IHL         5       /* 32-bit words */
#define XO_IPV4_HLEN            20      /* without options */
#define XO_IPV4_OFF_TOT_LEN     2
#define XO_IPV4_OFF_FRAG        6       /* flags and fragment offset */
#define XO_IPV4_FRAG_HI_MASK    0x1f    /* the fragment offset's bits in XO_IPV4_OFF_FRAG's byte */
#define XO_IPV4_OFF_PROTO       9
#define XO_IPV4_OFF_DST         16
#define XO_IPV4_MCAST_MASK      0xf0    /* first byte of a class D (multicast) address */
#define XO_IPV4_MCAST           0xe0

/* ================================================================ IPv6 (RFC 8200) */

#define XO_IPV6_VERSION         6
#define XO_IPV6_HLEN            40
#define XO_IPV6_OFF_PLEN        4       /* payload length */
#define XO_IPV6_OFF_NEXTHDR     6
#define XO_IPV6_OFF_SRC         8       /* source and destination: 32 bytes from here */
#define XO_IPV6_OFF_DST         24
#define XO_IPV6_ADDRS_LEN       32
#define XO_IPV6_MCAST           0xff    /* first byte of a multicast address */
#define XO_IPV6_EXT_UNIT        8       /* extension header length unit (plus one unit) */

/* ================================================================ IP protocols (next headers) */

#define XO_IPPROTO_HOPOPTS      0
#define XO_IPPROTO_IGMP         2
#define XO_IPPROTO_UDP          17
#define XO_IPPROTO_ICMPV6       58

#define XO_UDP_HLEN             8
#define XO_DHCP_SERVER_PORT     67      /* RFC 2131 */
#define XO_DHCP_CLIENT_PORT     68

/* ================================================================ ICMPv6: MLD and ND */

#define XO_ICMPV6_HLEN          4       /* type, code, checksum */
#define XO_ICMPV6_OFF_CSUM      2
#define XO_MLD_QUERY            130     /* RFC 2710 */
#define XO_MLD_REPORT           131
#define XO_MLD_DONE             132
#define XO_MLD2_REPORT          143     /* RFC 3810 */
#define XO_ND_RS                133     /* RFC 4861 */
#define XO_ND_RA                134
#define XO_ND_NS                135
#define XO_ND_NA                136
#define XO_ND_REDIRECT          137
#define XO_ND_RS_FIXED          4       /* each message's fixed part after the ICMPv6 header */
#define XO_ND_RA_FIXED          12
#define XO_ND_NS_FIXED          20
#define XO_ND_NA_FIXED          20
#define XO_ND_REDIRECT_FIXED    36
#define XO_ND_OPT_SRC_LLADDR    1
#define XO_ND_OPT_TGT_LLADDR    2
#define XO_ND_OPT_UNIT          8       /* option length unit */
#define XO_ND_OPT_LEN_ETH       (XDPOIB_ND_OPT_ETH / XO_ND_OPT_UNIT)    /* 1: a 6-byte address */
#define XO_ND_OPT_LEN_IB        (XDPOIB_ND_OPT_IB / XO_ND_OPT_UNIT)     /* 3: a 20-byte address (RFC 4391) */
#define XO_ND_OPT_IB_ADDR       4       /* where the IPoIB address starts in its option (2 pad bytes) */

#endif /* XDPOIB_CONSTS_H */
