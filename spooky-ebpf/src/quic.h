/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * The parts of a QUIC header that steering reads (RFC 9000 section 17,
 * RFC 9369 for v2), and the QUIC-LB plaintext CID codec mirrored from
 * spooky_common::cid. Nothing here is decrypted: only the invariant header
 * fields (RFC 8999) and the version/type of long headers are looked at.
 */
#ifndef SPOOKY_QUIC_H
#define SPOOKY_QUIC_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "maps.h"

#define QUIC_FORM_LONG 0x80
#define QUIC_FIXED_BIT 0x40
#define QUIC_LONG_TYPE(first) (((first) >> 4) & 0x3)

#define QUIC_VERSION_1 0x00000001
#define QUIC_VERSION_2 0x6b3343cf
/* Long packet type of Initial: 0b00 in v1, 0b01 in v2 (RFC 9369 3.2). */
#define QUIC_V1_INITIAL_TYPE 0x0
#define QUIC_V2_INITIAL_TYPE 0x1

/* First octet, version (4), DCID length (1), SCID length (1). */
#define QUIC_LONG_MIN_LEN 7
#define QUIC_LONG_DCID_OFF 6
/* QUIC-LB first octet: config rotation (3 bits) | length - 1 (5 bits). */
#define QUIC_LB_LEN_MASK 0x1f
#define QUIC_LB_UNROUTABLE 7
/* RFC 9000 14.1: a server discards Initials in smaller UDP payloads. */
#define QUIC_MIN_INITIAL_PAYLOAD 1200

/* FNV-1a 32, as spooky_common::initial_dcid_hash. */
#define FNV32_OFFSET 0x811c9dc5u
#define FNV32_PRIME 0x01000193u

/*
 * A connection ID copied out of the packet: decoding and hashing then index
 * a stack buffer of known size instead of re-checking every packet read
 * against data_end.
 */
struct quic_cid {
	__u8 bytes[SPOOKY_MAX_CID_LEN];
	__u32 len;
};

/*
 * Copies len (<= SPOOKY_MAX_CID_LEN) bytes at src. Returns -1 when they run
 * past data_end. Bytes beyond len are unspecified but initialised.
 */
static __always_inline int quic_load_cid(struct quic_cid *cid, const __u8 *src, __u32 len,
					 void *data_end)
{
	if (len > SPOOKY_MAX_CID_LEN)
		return -1;
	cid->len = len;

	/*
	 * Fast path: almost every datagram extends well past the longest CID,
	 * so one bounds check covers a constant-size copy.
	 */
	if ((void *)(src + SPOOKY_MAX_CID_LEN) <= data_end) {
		__builtin_memcpy(cid->bytes, src, SPOOKY_MAX_CID_LEN);
		return 0;
	}

	/*
	 * Slow path, a datagram ending within 20 bytes of the CID. The loop has
	 * a single exit so that clang can unroll it.
	 */
	if ((void *)(src + len) > data_end)
		return -1;
	__builtin_memset(cid->bytes, 0, SPOOKY_MAX_CID_LEN);
#pragma unroll
	for (__u32 i = 0; i < SPOOKY_MAX_CID_LEN; i++) {
		const __u8 *p = src + i;

		/* Re-checked per byte for the verifier, which cannot carry the
		 * variable-length check above over to p. */
		if (i < len && (void *)(p + 1) <= data_end)
			cid->bytes[i] = *p;
	}
	return 0;
}

/*
 * Mirrors CidLayout::decode: the worker octet of a CID spooky issued under
 * the current config, or -1 when the length, the first octet (config
 * rotation bits + length) or the node ID differ.
 */
static __always_inline int quic_cid_worker(const struct spooky_config *cfg,
					   const struct quic_cid *cid)
{
	__u32 node_id_len = cfg->node_id_len;
	__u8 diff = 0;

	/*
	 * The config rotation bits name the process generation that issued
	 * the CID (during an upgrade two or more run side by side, and the
	 * reuseport program picks between their sockets): any but 0b111
	 * (unroutable) is ours. The length bits must match.
	 */
	if (cid->len != cfg->cid_len || (cid->bytes[0] & QUIC_LB_LEN_MASK) !=
	    (cfg->first_octet & QUIC_LB_LEN_MASK) ||
	    (cid->bytes[0] >> 5) == QUIC_LB_UNROUTABLE)
		return -1;
	/* Userspace never writes more; the check bounds the index below. */
	if (node_id_len > SPOOKY_MAX_NODE_ID_LEN)
		return -1;
	/* Accumulates the difference: a single-exit loop that clang unrolls. */
#pragma unroll
	for (__u32 i = 0; i < SPOOKY_MAX_NODE_ID_LEN; i++) {
		if (i < node_id_len)
			diff |= cid->bytes[1 + i] ^ cfg->node_id[i];
	}
	if (diff)
		return -1;
	return cid->bytes[1 + node_id_len];
}

/* Mirrors spooky_common::initial_dcid_hash. */
static __always_inline __u32 quic_cid_hash(const struct quic_cid *cid)
{
	__u32 h = FNV32_OFFSET, len = cid->len;

	/*
	 * No early exit: with one clang unrolls the loop only partially, into
	 * a shape the verifier cannot bound.
	 */
#pragma unroll
	for (__u32 i = 0; i < SPOOKY_MAX_CID_LEN; i++) {
		if (i < len) {
			h ^= cid->bytes[i];
			h *= FNV32_PRIME;
		}
	}
	return h;
}

/* Whether a long header is an Initial of a version spooky knows. */
static __always_inline int quic_is_initial(__u8 first, __u32 version)
{
	__u8 type = QUIC_LONG_TYPE(first);

	return (version == QUIC_VERSION_1 && type == QUIC_V1_INITIAL_TYPE) ||
	       (version == QUIC_VERSION_2 && type == QUIC_V2_INITIAL_TYPE);
}

#endif /* SPOOKY_QUIC_H */
