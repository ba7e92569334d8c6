//! Stable hashing for key-based selection and cookie parsing. The hash must
//! not depend on the process or the Rust version: several spooky instances
//! (and restarts) must map a key to the same backend, so std's randomly
//! seeded SipHash is unsuitable and nothing here is seeded per process.

/// The murmur3 64-bit finaliser: a bijection with full avalanche.
#[inline]
pub(crate) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// A fast, stable 64-bit hash of `bytes` (8-byte words through the murmur3
/// finaliser; length mixed in). Not meant to resist crafted collisions: a
/// client choosing its own key can only choose its own backend.
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = (bytes.len() as u64).wrapping_mul(K) ^ 0x5350_4f4f_4b59_2d31; // "SPOOKY-1"
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = fmix64(h ^ u64::from_le_bytes(w).wrapping_mul(K));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = fmix64(h ^ u64::from_le_bytes(w).wrapping_mul(K) ^ 0xff);
    }
    fmix64(h)
}

/// The hash of (key, backend) for rendezvous hashing, from the two
/// separately computed hashes.
#[inline]
pub(crate) fn combine(key_hash: u64, backend_hash: u64) -> u64 {
    fmix64(key_hash ^ backend_hash.rotate_left(29).wrapping_mul(K))
}

/// Map a hash to a float uniformly distributed in the open interval (0, 1).
#[inline]
pub(crate) fn unit_open(h: u64) -> f64 {
    // 52 bits, so that the numerator (at most 2^52 − 0.5) is exact in an
    // f64 and the result never rounds up to 1.0.
    ((h >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2 and
/// HTTP/3 may split cookies over several header fields), without
/// surrounding quotes. The first occurrence wins.
pub(crate) fn find_cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
}

/// RFC 6265 / RFC 9110 token: visible ASCII without separators. Valid
/// cookie names are tokens.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const PINNED: u64 = 11_988_940_899_076_972_211;

    #[test]
    fn stable_values() {
        // Pinned: changing the hash would move every consistent-hash key
        // on upgrade.
        assert_eq!(hash_bytes(b""), hash_bytes(b""));
        assert_ne!(hash_bytes(b"a"), hash_bytes(b"a\0"));
        assert_ne!(hash_bytes(b"12345678"), hash_bytes(b"12345678\0"));
        assert_eq!(hash_bytes(b"backend-1"), PINNED);
    }

    #[test]
    fn unit_interval_is_open() {
        assert!(unit_open(0) > 0.0);
        assert!(unit_open(u64::MAX) < 1.0);
    }

    #[test]
    fn cookies() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; sess = \"xyz\" ;b=2"),
        );
        h.append(http::header::COOKIE, HeaderValue::from_static("c=3; a=9"));
        assert_eq!(find_cookie(&h, "a"), Some("1"));
        assert_eq!(find_cookie(&h, "sess"), Some("xyz"));
        assert_eq!(find_cookie(&h, "c"), Some("3"));
        assert_eq!(find_cookie(&h, "d"), None);
        assert!(is_token("spooky_sticky") && !is_token("a b") && !is_token("") && !is_token("a=b"));
    }
}
