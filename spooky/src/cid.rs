//! quinn glue for routable connection IDs: each worker's endpoint issues
//! QUIC-LB CIDs naming that worker (codec in `spooky_common::cid`).

use std::sync::Arc;
use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::RngCore;
use spooky_common::CidLayout;
use spooky_common::cid::MAX_CID_LEN;

/// Issues CIDs that name one worker, so the XDP program (or the reuseport
/// CBPF program) can steer every later packet of the connection to it.
#[derive(Debug, Clone)]
pub struct RoutableCidGenerator {
    layout: CidLayout,
    worker: u8,
    lifetime: Option<Duration>,
}

impl RoutableCidGenerator {
    /// A generator for `worker` under `layout`.
    pub fn new(layout: CidLayout, worker: u8) -> Self {
        Self {
            layout,
            worker,
            lifetime: None,
        }
    }

    /// A factory in the shape quinn's `EndpointConfig::cid_generator` wants.
    pub fn factory(
        layout: CidLayout,
        worker: u8,
    ) -> Arc<dyn Fn() -> Box<dyn ConnectionIdGenerator> + Send + Sync> {
        Arc::new(move || Box::new(RoutableCidGenerator::new(layout, worker)))
    }
}

impl ConnectionIdGenerator for RoutableCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut nonce = [0u8; MAX_CID_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = [0u8; MAX_CID_LEN];
        // The layout was validated at construction and both buffers have the
        // maximum CID length, so encode cannot fail; an empty CID would be a
        // visible (and harmless) bug rather than a crash.
        let len = self
            .layout
            .encode(self.worker, &nonce, &mut out)
            .unwrap_or(0);
        ConnectionId::new(&out[..len])
    }

    /// Only CIDs of this node, this config and this worker are ours. A packet
    /// for another worker's CID that reaches this endpoint (steering off) is
    /// dropped rather than answered with a stateless reset.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match self.layout.decode(cid) {
            Some(d) if d.worker == self.worker => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.layout.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_cids_decode_to_the_worker() {
        let layout = CidLayout::new(2, &[0x51, 0x52], 14).unwrap();
        let mut g = RoutableCidGenerator::new(layout, 3);
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!(a.len(), 14);
        assert_ne!(a, b, "nonces differ");
        assert_eq!(layout.decode(&a).unwrap().worker, 3);
        assert!(g.validate(&a).is_ok());
        let other = RoutableCidGenerator::new(layout, 4).generate_cid();
        assert!(g.validate(&other).is_err(), "another worker's CID");
        assert!(g.validate(&ConnectionId::new(&[0u8; 14])).is_err());
    }
}
