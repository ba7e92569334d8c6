/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * Constants shared with userspace. Every value here mirrors one in
 * spooky-common (src/maps.rs and src/cid.rs); spooky's test suite
 * (spooky/tests/e2e/xdp_fixtures.rs) parses this file and fails when the two
 * drift apart, so change both sides together. The SPOOKY_CTR_* list is
 * the xdp_counters! list of spooky-common/src/maps.rs, and its test
 * c_counters_match fails on any name or value that is not there, or
 * missing here.
 */
#ifndef SPOOKY_CONSTS_H
#define SPOOKY_CONSTS_H

/* spooky_common::maps */
#define SPOOKY_MAX_WORKERS 256
#define SPOOKY_MAX_CPUS 256
#define SPOOKY_PORT_SET_WORDS 1024
#define SPOOKY_MAX_INITIAL_SOURCES 65536

/* spooky_common::cid */
#define SPOOKY_MAX_CID_LEN 20
#define SPOOKY_MAX_NODE_ID_LEN 8

/* spooky_common::maps::WorkerState */
#define SPOOKY_WORKER_ABSENT 0
#define SPOOKY_WORKER_LIVE 1
#define SPOOKY_WORKER_DRAINING 2

/*
 * spooky_common::maps::XdpCounter: index into spooky_counters. Exactly one
 * is bumped per packet, so the counters add up to the packets seen.
 */
#define SPOOKY_CTR_PASS_OTHER 0
#define SPOOKY_CTR_SHORT_LOCAL 1
#define SPOOKY_CTR_SHORT_REDIRECT 2
#define SPOOKY_CTR_LONG_OURS_LOCAL 3
#define SPOOKY_CTR_LONG_OURS_REDIRECT 4
#define SPOOKY_CTR_LONG_HASH_LOCAL 5
#define SPOOKY_CTR_LONG_HASH_REDIRECT 6
#define SPOOKY_CTR_UNKNOWN_WORKER 7
#define SPOOKY_CTR_NO_LIVE_WORKER 8
#define SPOOKY_CTR_DROP_TOO_SHORT 9
#define SPOOKY_CTR_DROP_FIXED_BIT 10
#define SPOOKY_CTR_DROP_SMALL_INITIAL 11
#define SPOOKY_CTR_DROP_BAD_LONG_HEADER 12
#define SPOOKY_CTR_REDIRECT_FAILED 13
#define SPOOKY_CTR_DROP_INITIAL_RATE 14
#define SPOOKY_CTR_COUNT 15

#endif /* SPOOKY_CONSTS_H */
