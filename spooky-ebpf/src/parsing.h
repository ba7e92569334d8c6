/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * Header parsing up to the UDP payload, in the style of xdp-tools'
 * parsing_helpers.h: a cursor walks the frame, every helper checks its header
 * against data_end before touching it and returns the next protocol, or -1
 * when the frame is not something spooky steers (the caller then passes it
 * to the stack untouched).
 */
#ifndef SPOOKY_PARSING_H
#define SPOOKY_PARSING_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"

/* Not in the uapi headers (netinet/ip.h has them, but is not for BPF). */
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

struct hdr_cursor {
	void *pos;
};

struct vlan_hdr {
	__be16 h_vlan_TCI;
	__be16 h_vlan_encapsulated_proto;
};

static __always_inline int proto_is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/*
 * Ethernet plus at most one 802.1Q/802.1AD tag. Returns the EtherType (in
 * network byte order) of what follows. A second tag (QinQ) is returned as
 * is, so such frames are passed: NICs usually strip the outer tag anyway.
 */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vlh;
	__be16 proto;

	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	proto = eth->h_proto;

	if (proto_is_vlan(proto)) {
		vlh = nh->pos;
		if ((void *)(vlh + 1) > data_end)
			return -1;
		nh->pos = vlh + 1;
		proto = vlh->h_vlan_encapsulated_proto;
	}
	return proto;
}

/* IPv4 with options. Returns the IP protocol. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (iph->version != 4)
		return -1;
	hdrsize = iph->ihl * 4;
	/* ihl below 5 is malformed; the stack drops it, so do not steer it. */
	if (hdrsize < (int)sizeof(*iph))
		return -1;
	if (nh->pos + hdrsize > data_end)
		return -1;
	/*
	 * A fragment either lacks the UDP header (non-first) or carries an
	 * incomplete QUIC datagram (first): the stack reassembles it, and
	 * steering by 4-tuple is the best anyone can do then.
	 */
	if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return -1;
	nh->pos += hdrsize;
	return iph->protocol;
}

/*
 * The fixed IPv6 header only: QUIC does not use extension headers, and a
 * datagram that carries any is passed to the stack rather than half-parsed.
 * Returns the next header.
 */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end)
{
	struct ipv6hdr *ip6h = nh->pos;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	if (ip6h->version != 6)
		return -1;
	nh->pos = ip6h + 1;
	return ip6h->nexthdr;
}

static __always_inline struct udphdr *parse_udphdr(struct hdr_cursor *nh, void *data_end)
{
	struct udphdr *udp = nh->pos;

	if ((void *)(udp + 1) > data_end)
		return NULL;
	nh->pos = udp + 1;
	return udp;
}

/*
 * Length of the UDP payload at nh->pos: the UDP length field (so Ethernet
 * padding of short frames does not count), but never more than the bytes
 * actually present (the stack drops such lying datagrams on its own).
 */
static __always_inline __u32 udp_payload_len(const struct udphdr *udp,
					     const struct hdr_cursor *nh, void *data_end)
{
	__u32 len = bpf_ntohs(udp->len);
	__u32 avail = data_end - nh->pos;

	len = len >= sizeof(*udp) ? len - sizeof(*udp) : 0;
	return len < avail ? len : avail;
}

/*
 * The source prefix of an IPv4 header parse_iphdr accepted: the address as
 * ::ffff:a.b.c.d. The bounds are checked again for the verifier.
 */
static __always_inline int source_prefix_v4(struct spooky_source_prefix *key,
					    const struct iphdr *iph, void *data_end)
{
	if ((void *)(iph + 1) > data_end)
		return -1;
	__builtin_memset(key, 0, sizeof(*key));
	key->octets[10] = 0xff;
	key->octets[11] = 0xff;
	__builtin_memcpy(&key->octets[12], &iph->saddr, 4);
	return 0;
}

/* The source prefix of an IPv6 header: its /64. */
static __always_inline int source_prefix_v6(struct spooky_source_prefix *key,
					    const struct ipv6hdr *ip6h, void *data_end)
{
	if ((void *)(ip6h + 1) > data_end)
		return -1;
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->octets, &ip6h->saddr, 8);
	return 0;
}

#endif /* SPOOKY_PARSING_H */
