/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * BTF map definitions. Names, key/value layouts and sizes are those of
 * spooky_common::maps; both sides assert every struct's size and every
 * field's offset at compile time. Userspace looks every map up by name, so
 * renaming one here breaks the loader.
 */
#ifndef SPOOKY_MAPS_H
#define SPOOKY_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"

/* spooky_common::maps::SteeringConfig */
struct spooky_config {
	__u32 live_count;
	__u8 cid_len;
	__u8 first_octet;
	__u8 node_id_len;
	__u8 enabled;
	__u8 node_id[SPOOKY_MAX_NODE_ID_LEN];
};
_Static_assert(sizeof(struct spooky_config) == 16, "SteeringConfig is 16 bytes");
_Static_assert(__builtin_offsetof(struct spooky_config, live_count) == 0, "SteeringConfig::live_count");
_Static_assert(__builtin_offsetof(struct spooky_config, cid_len) == 4, "SteeringConfig::cid_len");
_Static_assert(__builtin_offsetof(struct spooky_config, first_octet) == 5, "SteeringConfig::first_octet");
_Static_assert(__builtin_offsetof(struct spooky_config, node_id_len) == 6, "SteeringConfig::node_id_len");
_Static_assert(__builtin_offsetof(struct spooky_config, enabled) == 7, "SteeringConfig::enabled");
_Static_assert(__builtin_offsetof(struct spooky_config, node_id) == 8, "SteeringConfig::node_id");

/* spooky_common::maps::WorkerSlot */
struct spooky_worker_slot {
	__u32 cpu;
	__u32 state;
};
_Static_assert(sizeof(struct spooky_worker_slot) == 8, "WorkerSlot is 8 bytes");
_Static_assert(__builtin_offsetof(struct spooky_worker_slot, cpu) == 0, "WorkerSlot::cpu");
_Static_assert(__builtin_offsetof(struct spooky_worker_slot, state) == 4, "WorkerSlot::state");

/* spooky_common::maps::PortSet: bit p % 64 of bits[p / 64] is port p. */
struct spooky_port_set {
	__u64 bits[SPOOKY_PORT_SET_WORDS];
};
_Static_assert(sizeof(struct spooky_port_set) == 8192, "PortSet is 8192 bytes");
_Static_assert(__builtin_offsetof(struct spooky_port_set, bits) == 0, "PortSet::bits");

/* spooky_common::maps::InitialLimit; interval_ns == 0: no limit. */
struct spooky_initial_limit {
	__u64 interval_ns;
	__u64 burst_ns;
};
_Static_assert(sizeof(struct spooky_initial_limit) == 16, "InitialLimit is 16 bytes");
_Static_assert(__builtin_offsetof(struct spooky_initial_limit, interval_ns) == 0,
	       "InitialLimit::interval_ns");
_Static_assert(__builtin_offsetof(struct spooky_initial_limit, burst_ns) == 8,
	       "InitialLimit::burst_ns");

/* spooky_common::maps::SourcePrefix: IPv4-mapped IPv4, or an IPv6 /64. */
struct spooky_source_prefix {
	__u8 octets[16];
};
_Static_assert(sizeof(struct spooky_source_prefix) == 16, "SourcePrefix is 16 bytes");
_Static_assert(__builtin_offsetof(struct spooky_source_prefix, octets) == 0, "SourcePrefix::octets");

/*
 * Single entry: the UDP listener ports (host byte order). A bitmap in an
 * array because the JIT inlines array lookups; a hash map keyed by port
 * cost about 20 ns per packet, half the program's run time.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct spooky_port_set);
} spooky_ports SEC(".maps");

/* Single entry: the steering configuration. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct spooky_config);
} spooky_config SEC(".maps");

/* Worker ID (the worker octet of a CID) -> CPU and state. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPOOKY_MAX_WORKERS);
	__type(key, __u32);
	__type(value, struct spooky_worker_slot);
} spooky_workers SEC(".maps");

/*
 * i -> worker ID of the i-th live worker; spooky_config.live_count entries
 * are valid. Userspace writes the entries before the count, so a reader
 * racing an update sees either list with a count that fits it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPOOKY_MAX_WORKERS);
	__type(key, __u32);
	__type(value, __u32);
} spooky_live SEC(".maps");

/* CPU -> queue: the redirect target of every steered packet. */
struct {
	__uint(type, BPF_MAP_TYPE_CPUMAP);
	__uint(max_entries, SPOOKY_MAX_CPUS);
	__type(key, __u32);
	__type(value, struct bpf_cpumap_val);
} spooky_cpumap SEC(".maps");

/* Per-CPU packet counters, indexed by SPOOKY_CTR_*. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPOOKY_CTR_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} spooky_counters SEC(".maps");

/* Single entry: the per-source limit on new-connection Initials. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct spooky_initial_limit);
} spooky_initial_limit SEC(".maps");

/*
 * Source prefix -> the time (bpf_ktime_get_ns) from which its next Initial
 * is on schedule. LRU: a spoofed flood of fresh sources evicts the oldest
 * entries instead of failing inserts, and an evicted source merely starts
 * again with a full burst.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SPOOKY_MAX_INITIAL_SOURCES);
	__type(key, struct spooky_source_prefix);
	__type(value, __u64);
} spooky_initial_sources SEC(".maps");

#endif /* SPOOKY_MAPS_H */
