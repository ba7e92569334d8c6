//! QUIC-LB plaintext connection IDs: the one codec that userspace, the CBPF
//! fallback and (mirrored in C) the XDP program agree on.
//!
//! Layout (draft-ietf-quic-load-balancers, plaintext algorithm, with length
//! self-description):
//!
//! ```text
//! octet 0            : CR(3 bits, config rotation) | LEN(5 bits) = cid_len - 1
//! octets 1..1+N      : node ID (N = node_id_len, 0..=MAX_NODE_ID_LEN)
//! octet 1+N          : worker ID (the last octet of the server ID)
//! octets 2+N..cid_len: nonce (random, at least MIN_NONCE_LEN octets)
//! ```
//!
//! The server ID is `node ID ‖ worker`. Config rotation codepoint 0b111 is
//! reserved by the draft for unroutable CIDs and never configured here.

/// Shortest CID spooky issues (quinn's default length).
pub const MIN_CID_LEN: usize = 8;
/// Longest CID QUIC v1 allows.
pub const MAX_CID_LEN: usize = 20;
/// Longest node ID; bounds the map value the XDP program reads.
pub const MAX_NODE_ID_LEN: usize = 8;
/// The draft asks for at least four octets of nonce so CIDs stay unlinkable.
pub const MIN_NONCE_LEN: usize = 4;
/// The codepoint the draft reserves for "not routable"; not a valid config.
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;

/// Why a [`CidLayout`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// `cid_len` outside `MIN_CID_LEN..=MAX_CID_LEN`.
    CidLen,
    /// config ID above 6 (7 is reserved for unroutable CIDs).
    ConfigId,
    /// node ID longer than `MAX_NODE_ID_LEN`.
    NodeIdLen,
    /// the server ID leaves fewer than `MIN_NONCE_LEN` octets of nonce.
    NonceTooShort,
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::CidLen => write!(
                f,
                "connection ID length must be between {MIN_CID_LEN} and {MAX_CID_LEN}"
            ),
            LayoutError::ConfigId => write!(
                f,
                "config rotation ID must be between 0 and 6 (7 marks unroutable CIDs)"
            ),
            LayoutError::NodeIdLen => {
                write!(f, "node ID must be at most {MAX_NODE_ID_LEN} bytes")
            }
            LayoutError::NonceTooShort => write!(
                f,
                "connection ID too short for the node ID: 1 + node ID + 1 (worker) + {MIN_NONCE_LEN} (nonce) bytes are needed"
            ),
        }
    }
}

/// The fixed shape of every CID one spooky node issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidLayout {
    config_id: u8,
    cid_len: u8,
    node_id_len: u8,
    node_id: [u8; MAX_NODE_ID_LEN],
}

/// What a routable CID says about its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The worker that issued the CID.
    pub worker: u8,
}

impl CidLayout {
    /// Builds a layout, checking every constraint the draft and the XDP
    /// program rely on.
    pub fn new(config_id: u8, node_id: &[u8], cid_len: usize) -> Result<Self, LayoutError> {
        if !(MIN_CID_LEN..=MAX_CID_LEN).contains(&cid_len) {
            return Err(LayoutError::CidLen);
        }
        if config_id >= UNROUTABLE_CONFIG_ID {
            return Err(LayoutError::ConfigId);
        }
        if node_id.len() > MAX_NODE_ID_LEN {
            return Err(LayoutError::NodeIdLen);
        }
        if cid_len < 2 + node_id.len() + MIN_NONCE_LEN {
            return Err(LayoutError::NonceTooShort);
        }
        let mut id = [0u8; MAX_NODE_ID_LEN];
        id[..node_id.len()].copy_from_slice(node_id);
        Ok(Self {
            config_id,
            cid_len: cid_len as u8,
            node_id_len: node_id.len() as u8,
            node_id: id,
        })
    }

    /// Total CID length in octets.
    pub fn cid_len(&self) -> usize {
        self.cid_len as usize
    }

    /// The config rotation codepoint (0..=6).
    pub fn config_id(&self) -> u8 {
        self.config_id
    }

    /// The node ID octets.
    pub fn node_id(&self) -> &[u8] {
        &self.node_id[..self.node_id_len as usize]
    }

    /// Offset of the worker octet inside the CID.
    pub fn worker_offset(&self) -> usize {
        1 + self.node_id_len as usize
    }

    /// Number of random octets at the end of every CID.
    pub fn nonce_len(&self) -> usize {
        self.cid_len() - self.worker_offset() - 1
    }

    /// The first octet every CID of this layout starts with.
    pub fn first_octet(&self) -> u8 {
        (self.config_id << 5) | (self.cid_len - 1)
    }

    /// Writes a CID for `worker` into `out[..cid_len]`, taking the nonce from
    /// `nonce[..nonce_len]`. Returns the CID length, or `None` when `out` or
    /// `nonce` is too short.
    pub fn encode(&self, worker: u8, nonce: &[u8], out: &mut [u8]) -> Option<usize> {
        let len = self.cid_len();
        let nonce_len = self.nonce_len();
        let (out, nonce) = (out.get_mut(..len)?, nonce.get(..nonce_len)?);
        let w = self.worker_offset();
        out[0] = self.first_octet();
        out[1..w].copy_from_slice(self.node_id());
        out[w] = worker;
        out[w + 1..].copy_from_slice(nonce);
        Some(len)
    }

    /// Decodes a CID of this layout. `None` for anything spooky did not
    /// issue under this config: wrong length, rotation bits or node ID.
    pub fn decode(&self, cid: &[u8]) -> Option<Decoded> {
        if cid.len() != self.cid_len() || cid[0] != self.first_octet() {
            return None;
        }
        let w = self.worker_offset();
        if &cid[1..w] != self.node_id() {
            return None;
        }
        Some(Decoded { worker: cid[w] })
    }

    /// Whether `cid` was issued by this node under this config.
    pub fn is_ours(&self, cid: &[u8]) -> bool {
        self.decode(cid).is_some()
    }
}

/// FNV-1a (32 bit) over a client-chosen DCID: how the XDP program spreads
/// Initial packets over live workers. Mirrored in `spooky-ebpf/src/quic.h`;
/// every retransmission of an Initial carries the same DCID, so it hashes
/// to the same worker.
pub fn initial_dcid_hash(dcid: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in dcid.iter().take(MAX_CID_LEN) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> CidLayout {
        CidLayout::new(1, &[0xab, 0xcd], 12).unwrap()
    }

    #[test]
    fn encodes_the_documented_layout() {
        let mut out = [0u8; 20];
        let n = layout()
            .encode(7, &[1, 2, 3, 4, 5, 6, 7, 8], &mut out)
            .unwrap();
        assert_eq!(n, 12);
        assert_eq!(out[0], 0b001_01011, "CR=1, LEN=11");
        assert_eq!(&out[1..3], &[0xab, 0xcd]);
        assert_eq!(out[3], 7);
        assert_eq!(&out[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(layout().decode(&out[..12]), Some(Decoded { worker: 7 }));
    }

    #[test]
    fn rejects_foreign_cids() {
        let l = layout();
        let mut cid = [0u8; 12];
        l.encode(3, &[9; 8], &mut cid).unwrap();
        assert!(l.is_ours(&cid));
        let mut other_node = cid;
        other_node[2] ^= 1;
        assert!(!l.is_ours(&other_node));
        let mut other_config = cid;
        other_config[0] ^= 0b0010_0000;
        assert!(!l.is_ours(&other_config));
        assert!(!l.is_ours(&cid[..11]));
        assert!(!l.is_ours(&[]));
    }

    #[test]
    fn layout_errors() {
        assert_eq!(CidLayout::new(0, &[], 7), Err(LayoutError::CidLen));
        assert_eq!(CidLayout::new(0, &[], 21), Err(LayoutError::CidLen));
        assert_eq!(CidLayout::new(7, &[], 8), Err(LayoutError::ConfigId));
        assert_eq!(CidLayout::new(0, &[0; 9], 20), Err(LayoutError::NodeIdLen));
        assert_eq!(
            CidLayout::new(0, &[0; 3], 8),
            Err(LayoutError::NonceTooShort)
        );
        assert!(CidLayout::new(6, &[0; 2], 8).is_ok());
        assert!(CidLayout::new(0, &[0; 8], 20).is_ok());
    }

    #[test]
    fn encode_needs_room() {
        let l = layout();
        assert_eq!(l.encode(0, &[0; 8], &mut [0u8; 11]), None);
        assert_eq!(l.encode(0, &[0; 7], &mut [0u8; 12]), None);
    }

    #[test]
    fn fnv_known_values() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(initial_dcid_hash(b""), 0x811c_9dc5);
        assert_eq!(initial_dcid_hash(b"a"), 0xe40c_292c);
        assert_eq!(initial_dcid_hash(b"foobar"), 0xbf9c_f968);
    }

    prop_compose! {
        fn any_layout()(config_id in 0u8..7, node in proptest::collection::vec(any::<u8>(), 0..=8), extra in 0usize..=12)
            -> CidLayout {
            let min = (2 + node.len() + MIN_NONCE_LEN).max(MIN_CID_LEN);
            CidLayout::new(config_id, &node, (min + extra).min(MAX_CID_LEN)).unwrap()
        }
    }

    proptest! {
        #[test]
        fn round_trip(l in any_layout(), worker: u8, nonce in proptest::collection::vec(any::<u8>(), MAX_CID_LEN)) {
            let mut out = [0u8; MAX_CID_LEN];
            let n = l.encode(worker, &nonce, &mut out).unwrap();
            prop_assert_eq!(n, l.cid_len());
            prop_assert_eq!(l.decode(&out[..n]), Some(Decoded { worker }));
            prop_assert_eq!(out[0] >> 5, l.config_id());
            prop_assert_eq!((out[0] & 0x1f) as usize + 1, n);
        }

        #[test]
        fn random_dcids_never_panic(l in any_layout(), dcid in proptest::collection::vec(any::<u8>(), 0..=40)) {
            let d = l.decode(&dcid);
            if let Some(d) = d {
                // Anything accepted must re-encode to the same prefix.
                let mut out = [0u8; MAX_CID_LEN];
                l.encode(d.worker, &dcid[l.worker_offset() + 1..], &mut out).unwrap();
                prop_assert_eq!(&out[..l.cid_len()], &dcid[..]);
            }
            let _ = initial_dcid_hash(&dcid);
        }
    }
}
