// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * spooky_xdp: steers QUIC datagrams to the CPU of the worker that owns their
 * connection, by the Destination Connection ID rather than the 4-tuple, so a
 * client that changes address or port stays on its worker.
 *
 *   short header, our CID            -> owner's CPU
 *   long header, our CID             -> owner's CPU
 *   long header, client-chosen DCID  -> hash(DCID) mod live workers
 *   ... an Initial beyond its source's rate (when limited) -> XDP_DROP
 *   our CID naming an absent worker  -> the same hash (UnknownWorker)
 *   cannot be QUIC                   -> XDP_DROP
 *   anything else                    -> XDP_PASS
 *
 * "Owner's CPU" is XDP_PASS when the packet is already there, otherwise a
 * CPUMAP redirect; on that CPU the kernel's reuseport group picks the socket
 * whose SO_INCOMING_CPU matches, which is the worker pinned to it.
 *
 * Every packet bumps exactly one counter in spooky_counters.
 */
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "maps.h"
#include "parsing.h"
#include "quic.h"

/* Counts the decision and returns its action. */
static __always_inline int verdict(__u32 counter, int action)
{
	__u64 *c = bpf_map_lookup_elem(&spooky_counters, &counter);

	/* Per-CPU slot: no other CPU writes it, so no atomic is needed. */
	if (c)
		*c += 1;
	return action;
}

static __always_inline int slot_owns_cids(const struct spooky_worker_slot *slot)
{
	return slot->state == SPOOKY_WORKER_LIVE || slot->state == SPOOKY_WORKER_DRAINING;
}

/* Sends the packet to cpu: XDP_PASS when already there, else CPUMAP. */
static __always_inline int steer_to_cpu(__u32 cpu, __u32 local_ctr, __u32 redirect_ctr)
{
	long action;

	if (cpu == bpf_get_smp_processor_id())
		return verdict(local_ctr, XDP_PASS);

	/*
	 * The XDP_PASS fallback covers a CPU missing from the CPUMAP (a
	 * control-plane bug, or a race with a worker stopping): the packet
	 * still reaches the stack, on the wrong CPU, instead of vanishing.
	 */
	action = bpf_redirect_map(&spooky_cpumap, cpu, XDP_PASS);
	if (action != XDP_REDIRECT)
		return verdict(SPOOKY_CTR_REDIRECT_FAILED, action);
	return verdict(redirect_ctr, XDP_REDIRECT);
}

/*
 * Spreads client-chosen DCIDs over the live workers. The hash depends on the
 * DCID only, so every retransmission of an Initial (and the 0-RTT packets
 * sent with it) reaches the same worker.
 *
 * A BPF-to-BPF call rather than inlined: it has four call sites, and one copy
 * of its unrolled hash loop instead of four shrinks the JITed program by a
 * third and the verifier's work by more than half, for no measurable cost
 * per packet.
 */
static __noinline int steer_by_hash(const struct spooky_config *cfg,
					 const struct quic_cid *cid, __u32 local_ctr,
					 __u32 redirect_ctr)
{
	const struct spooky_worker_slot *slot;
	__u32 live_count = cfg->live_count;
	__u32 idx, *worker;

	if (live_count == 0)
		return verdict(SPOOKY_CTR_NO_LIVE_WORKER, XDP_PASS);
	idx = quic_cid_hash(cid) % live_count;
	worker = bpf_map_lookup_elem(&spooky_live, &idx);
	if (!worker)
		return verdict(SPOOKY_CTR_NO_LIVE_WORKER, XDP_PASS);
	slot = bpf_map_lookup_elem(&spooky_workers, worker);
	/*
	 * Only a live worker takes new connections. A slot that is not live is
	 * a race with the control plane rebuilding the list; the stack's
	 * 4-tuple hash takes that packet.
	 */
	if (!slot || slot->state != SPOOKY_WORKER_LIVE)
		return verdict(SPOOKY_CTR_NO_LIVE_WORKER, XDP_PASS);
	return steer_to_cpu(slot->cpu, local_ctr, redirect_ctr);
}

/*
 * Whether a new-connection Initial from the source of the IP header at l3
 * (IPv6 when v6) is within the per-source rate
 * (a GCRA: the source's schedule moves interval_ns ahead per Initial and
 * may run at most burst_ns ahead of now). Only Initials that open a
 * connection count: those of a handshake in progress, and those after a
 * Retry, carry a CID of ours and are never limited here.
 *
 * Two CPUs updating one source at once may both pass; the limit is then
 * exceeded by at most one Initial per racing CPU, which is cheaper than a
 * lock per packet.
 */
static __always_inline int initial_within_rate(const void *l3, int v6, void *data_end)
{
	const struct spooky_initial_limit *limit;
	struct spooky_source_prefix src;
	__u64 now, next, *sched;
	__u32 zero = 0;
	int err;

	limit = bpf_map_lookup_elem(&spooky_initial_limit, &zero);
	if (!limit || limit->interval_ns == 0)
		return 1;
	/* The address is read only here: no other packet pays for it. */
	err = v6 ? source_prefix_v6(&src, l3, data_end) : source_prefix_v4(&src, l3, data_end);
	if (err < 0)
		return 1; /* cannot happen: the header was parsed already */
	now = bpf_ktime_get_ns();
	sched = bpf_map_lookup_elem(&spooky_initial_sources, &src);
	if (!sched) {
		next = now + limit->interval_ns;
		/* A full map evicts its least recently used source. */
		bpf_map_update_elem(&spooky_initial_sources, &src, &next, BPF_ANY);
		return 1;
	}
	next = *sched > now ? *sched : now;
	if (next - now > limit->burst_ns)
		return 0;
	*sched = next + limit->interval_ns;
	return 1;
}

/*
 * Routes a DCID: to its owner when it is ours and the owner exists, else by
 * hash. A CID of ours whose worker is gone (restart, scale-down) counts as
 * UnknownWorker whatever the hash then picks.
 */
static __always_inline int steer_cid(const struct spooky_config *cfg, const struct quic_cid *cid,
				     __u32 local_ctr, __u32 redirect_ctr, __u32 hash_local_ctr,
				     __u32 hash_redirect_ctr)
{
	const struct spooky_worker_slot *slot;
	int worker = quic_cid_worker(cfg, cid);
	__u32 key;

	if (worker < 0)
		return steer_by_hash(cfg, cid, hash_local_ctr, hash_redirect_ctr);

	key = worker;
	slot = bpf_map_lookup_elem(&spooky_workers, &key);
	if (slot && slot_owns_cids(slot))
		return steer_to_cpu(slot->cpu, local_ctr, redirect_ctr);
	return steer_by_hash(cfg, cid, SPOOKY_CTR_UNKNOWN_WORKER, SPOOKY_CTR_UNKNOWN_WORKER);
}

static __always_inline int steer_short(const struct spooky_config *cfg, const __u8 *q,
				       __u32 len, void *data_end)
{
	struct quic_cid cid;
	__u8 first;

	/* Short headers carry no DCID length: it is the length we issue. */
	if (len < 1 + (__u32)cfg->cid_len || (void *)(q + 1) > data_end)
		return verdict(SPOOKY_CTR_DROP_TOO_SHORT, XDP_DROP);
	first = q[0];
	/*
	 * RFC 9000 17.3.1: the fixed bit is 1 unless the server advertised
	 * grease_quic_bit (RFC 9287), which spooky's endpoints must not do
	 * (quinn's EndpointConfig::grease_quic_bit defaults to on): clients
	 * would then clear the bit on purpose and lose those packets here.
	 */
	if (!(first & QUIC_FIXED_BIT))
		return verdict(SPOOKY_CTR_DROP_FIXED_BIT, XDP_DROP);
	if (quic_load_cid(&cid, q + 1, cfg->cid_len, data_end) < 0)
		return verdict(SPOOKY_CTR_DROP_TOO_SHORT, XDP_DROP);

	/*
	 * A short-header DCID that is not ours (another node's, or garbage)
	 * has no owner here either: hash it like an unknown worker's, so the
	 * stack of one consistent worker answers it (e.g. a stateless reset).
	 */
	return steer_cid(cfg, &cid, SPOOKY_CTR_SHORT_LOCAL, SPOOKY_CTR_SHORT_REDIRECT,
			 SPOOKY_CTR_UNKNOWN_WORKER, SPOOKY_CTR_UNKNOWN_WORKER);
}

static __always_inline int steer_long(const struct spooky_config *cfg, const __u8 *q,
				      __u32 len, void *data_end,
				      const void *l3, int v6)
{
	struct quic_cid cid;
	__u32 version, dcid_len;
	__u8 first;

	if (len < QUIC_LONG_MIN_LEN || (void *)(q + QUIC_LONG_MIN_LEN) > data_end)
		return verdict(SPOOKY_CTR_DROP_TOO_SHORT, XDP_DROP);
	first = q[0];
	/* See steer_short. */
	if (!(first & QUIC_FIXED_BIT))
		return verdict(SPOOKY_CTR_DROP_FIXED_BIT, XDP_DROP);

	/* Byte by byte: the field is not aligned. */
	version = (__u32)q[1] << 24 | (__u32)q[2] << 16 | (__u32)q[3] << 8 | q[4];
	dcid_len = q[5];
	/* The DCID, then at least the SCID length octet, must fit. */
	if (dcid_len > SPOOKY_MAX_CID_LEN || QUIC_LONG_MIN_LEN + dcid_len > len)
		return verdict(SPOOKY_CTR_DROP_BAD_LONG_HEADER, XDP_DROP);
	if (quic_is_initial(first, version) && len < QUIC_MIN_INITIAL_PAYLOAD)
		return verdict(SPOOKY_CTR_DROP_SMALL_INITIAL, XDP_DROP);
	if (quic_load_cid(&cid, q + QUIC_LONG_DCID_OFF, dcid_len, data_end) < 0)
		return verdict(SPOOKY_CTR_DROP_BAD_LONG_HEADER, XDP_DROP);
	if (quic_is_initial(first, version) && quic_cid_worker(cfg, &cid) < 0 &&
	    !initial_within_rate(l3, v6, data_end))
		return verdict(SPOOKY_CTR_DROP_INITIAL_RATE, XDP_DROP);

	/*
	 * Once the client has the server's first flight, every long header it
	 * sends (Handshake, later Initials and 0-RTT) carries our CID. Its
	 * first Initials and 0-RTT, and packets of versions we do not know
	 * (which deserve a Version Negotiation from one consistent worker),
	 * carry the DCID the client chose, and go by hash.
	 */
	return steer_cid(cfg, &cid, SPOOKY_CTR_LONG_OURS_LOCAL, SPOOKY_CTR_LONG_OURS_REDIRECT,
			 SPOOKY_CTR_LONG_HASH_LOCAL, SPOOKY_CTR_LONG_HASH_REDIRECT);
}

SEC("xdp")
int spooky_xdp(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = (void *)(long)ctx->data };
	const struct spooky_config *cfg;
	const struct spooky_port_set *ports;
	struct udphdr *udp;
	void *l3;
	__u32 zero = 0, len;
	__u16 port;
	int eth_type, ip_proto;
	const __u8 *q;

	cfg = bpf_map_lookup_elem(&spooky_config, &zero);
	/* Until userspace has filled every map, stay out of the way. */
	if (!cfg || !cfg->enabled)
		return verdict(SPOOKY_CTR_PASS_OTHER, XDP_PASS);

	eth_type = parse_ethhdr(&nh, data_end);
	l3 = nh.pos;
	if (eth_type == bpf_htons(ETH_P_IP))
		ip_proto = parse_iphdr(&nh, data_end);
	else if (eth_type == bpf_htons(ETH_P_IPV6))
		ip_proto = parse_ip6hdr(&nh, data_end);
	else
		return verdict(SPOOKY_CTR_PASS_OTHER, XDP_PASS);
	if (ip_proto != IPPROTO_UDP)
		return verdict(SPOOKY_CTR_PASS_OTHER, XDP_PASS);

	udp = parse_udphdr(&nh, data_end);
	if (!udp)
		return verdict(SPOOKY_CTR_PASS_OTHER, XDP_PASS);
	port = bpf_ntohs(udp->dest);
	ports = bpf_map_lookup_elem(&spooky_ports, &zero);
	if (!ports || !(ports->bits[port / 64] & (1ULL << (port % 64))))
		return verdict(SPOOKY_CTR_PASS_OTHER, XDP_PASS);

	/* From here on the datagram is addressed to a QUIC listener. */
	q = nh.pos;
	len = udp_payload_len(udp, &nh, data_end);
	if (len < 1 || (void *)(q + 1) > data_end)
		return verdict(SPOOKY_CTR_DROP_TOO_SHORT, XDP_DROP);
	if (q[0] & QUIC_FORM_LONG)
		return steer_long(cfg, q, len, data_end, l3, eth_type == bpf_htons(ETH_P_IPV6));
	return steer_short(cfg, q, len, data_end);
}

/*
 * GPL-compatible so that every helper stays available; the userspace crates
 * are MIT OR Apache-2.0.
 */
char LICENSE[] SEC("license") = "Dual MIT/GPL";
