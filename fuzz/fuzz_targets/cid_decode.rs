//! The QUIC-LB CID codec on arbitrary layouts and connection IDs.
//!
//! Input: octet 0 = config id, octet 1 = node ID length, octet 2 = CID
//! length, then the node ID, then one worker octet, then the CID (or
//! nonce) under test. Out-of-range layout values are fed to
//! `CidLayout::new` as they are: its errors are part of what is tested.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky_common::cid::{Decoded, MAX_CID_LEN};
use spooky_common::{CidLayout, initial_dcid_hash};

fuzz_target!(|data: &[u8]| {
    let [config_id, node_id_len, cid_len, rest @ ..] = data else {
        return;
    };
    // Keep the node ID length within reach (0..=15) so that both valid
    // and too-long node IDs come up often.
    let node_id_len = (*node_id_len & 0x0f) as usize;
    if rest.len() < node_id_len {
        return;
    }
    let (node_id, rest) = rest.split_at(node_id_len);
    let _ = initial_dcid_hash(rest);
    let Ok(layout) = CidLayout::new(*config_id, node_id, *cid_len as usize) else {
        return;
    };
    assert_eq!(layout.node_id(), node_id);
    assert!(layout.cid_len() <= MAX_CID_LEN);
    assert!(layout.worker_offset() < layout.cid_len());

    let Some((&worker, cid)) = rest.split_first() else {
        return;
    };
    // The rest as a CID someone sent us.
    let decoded = layout.decode(cid);
    assert_eq!(layout.is_ours(cid), decoded.is_some());
    if let Some(d) = decoded {
        // Accepted: it must be exactly what we would have issued.
        let mut out = [0u8; MAX_CID_LEN];
        let n = layout
            .encode(d.worker, &cid[layout.worker_offset() + 1..], &mut out)
            .expect("an accepted CID re-encodes");
        assert_eq!(&out[..n], cid);
    }

    // The rest as a nonce: whenever encode succeeds, decode round-trips.
    let mut out = [0u8; MAX_CID_LEN];
    if let Some(n) = layout.encode(worker, cid, &mut out) {
        assert_eq!(n, layout.cid_len());
        assert_eq!(layout.decode(&out[..n]), Some(Decoded { worker }));
        assert!(layout.is_ours(&out[..n]));
        assert_eq!((out[0] & 0x1f) as usize + 1, n);
        assert_eq!(out[0] >> 5, layout.config_id());
    }
    // Too small an output buffer is refused, not a panic.
    let mut short = [0u8; MAX_CID_LEN];
    let short_len = layout.cid_len() - 1;
    assert_eq!(layout.encode(worker, cid, &mut short[..short_len]), None);
});
