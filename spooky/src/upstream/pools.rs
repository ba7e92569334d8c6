//! Each worker's side of the upstreams: its own balancers and its
//! connection pools to every backend, carried over across reloads while the
//! connection settings stay, and replaced when a backend's connection epoch
//! moves.

use std::sync::{Arc, Mutex};

use tracing::debug;

use super::backend;
use super::registry::{SharedUpstream, SharedUpstreams};
use crate::balancer::{self, Balance};
use crate::config::{self, Config};

/// Whether connections to `old`'s backends can carry `new`'s requests:
/// protocol, TLS and pool settings are the same.
fn same_connections(old: &config::Upstream, new: &config::Upstream) -> bool {
    old.protocol == new.protocol
        && old.tls_enabled == new.tls_enabled
        && old.sni == new.sni
        && old.client_auth == new.client_auth
        && format!("{:?}", old.verification) == format!("{:?}", new.verification)
        && format!("{:?}", old.pool) == format!("{:?}", new.pool)
        && old.timeouts.connect == new.timeouts.connect
        && old.timeouts.idle == new.timeouts.idle
}

/// One worker's client for one backend, replaced when the backend's
/// connection epoch moves (see [`SharedBackend::renew_connections`](super::registry::SharedBackend::renew_connections)).
pub(super) struct WorkerPool {
    label: String,
    endpoint: quinn::Endpoint,
    max_header_bytes: u64,
    /// (epoch it was built at, client).
    current: Mutex<(u64, Arc<backend::BackendClient>)>,
}

impl WorkerPool {
    /// The client to use for a request to backend `bi` of `up`; a fresh one
    /// when the epoch moved. The old one is dropped: its idle connections
    /// close now, busy ones once their requests end.
    pub(super) fn client(
        &self,
        up: &SharedUpstream,
        bi: usize,
    ) -> Option<Arc<backend::BackendClient>> {
        let epoch = up.backends.get(bi)?.epoch();
        let mut cur = self.current.lock().ok()?;
        if cur.0 != epoch {
            let fresh = up.backend_client(
                bi,
                self.label.clone(),
                &self.endpoint,
                self.max_header_bytes,
                true,
            )?;
            debug!(backend = %self.label, "replacing the backend's connections");
            *cur = (epoch, Arc::new(fresh));
        }
        Some(cur.1.clone())
    }

    fn get(&self) -> Option<Arc<backend::BackendClient>> {
        self.current.lock().ok().map(|c| c.1.clone())
    }
}

/// One worker's view of an upstream: its own balancer and pools.
pub(super) struct WorkerUpstream {
    pub(super) shared: Arc<SharedUpstream>,
    pub(super) balancer: Mutex<Box<dyn Balance>>,
    /// Shared with the previous generation's view across a reload, so
    /// that in-flight requests and new ones use the same connections.
    pub(super) pools: Vec<Arc<WorkerPool>>,
}

/// One worker's upstreams, indexed like `Config::upstreams`.
pub struct WorkerUpstreams {
    pub(super) ups: Vec<WorkerUpstream>,
}

impl WorkerUpstreams {
    /// Builds this worker's balancers and pools over the shared state.
    pub fn new(shared: &SharedUpstreams, client: quinn::Endpoint, config: &Config) -> Self {
        Self::build(shared, client, config, None)
    }

    /// This worker's view of a reloaded config: pools of backends that
    /// stay, with unchanged connection settings, are carried over with
    /// their open connections.
    pub fn reload(
        &self,
        shared: &SharedUpstreams,
        client: quinn::Endpoint,
        config: &Config,
    ) -> Self {
        Self::build(shared, client, config, Some(self))
    }

    fn build(
        shared: &SharedUpstreams,
        client: quinn::Endpoint,
        config: &Config,
        previous: Option<&WorkerUpstreams>,
    ) -> Self {
        let max_header_bytes = config.limits.max_request_header_bytes;
        let ups = shared
            .upstreams
            .iter()
            .map(|u| {
                let old = previous
                    .and_then(|p| p.ups.iter().find(|o| o.shared.cfg.name == u.cfg.name))
                    .filter(|o| same_connections(&o.shared.cfg, &u.cfg));
                WorkerUpstream {
                    balancer: Mutex::new(balancer::build(&u.cfg.balancing)),
                    pools: u
                        .backends
                        .iter()
                        .enumerate()
                        .filter_map(|(i, b)| {
                            let kept = old.and_then(|o| {
                                o.shared
                                    .backends
                                    .iter()
                                    .position(|ob| b.same_as(ob))
                                    .and_then(|oi| o.pools.get(oi))
                            });
                            if let Some(pool) = kept {
                                return Some(pool.clone());
                            }
                            let c = u.backend_client(
                                i,
                                b.label.clone(),
                                &client,
                                max_header_bytes,
                                true,
                            )?;
                            Some(Arc::new(WorkerPool {
                                label: b.label.clone(),
                                endpoint: client.clone(),
                                max_header_bytes,
                                current: Mutex::new((b.epoch(), Arc::new(c))),
                            }))
                        })
                        .collect(),
                    shared: u.clone(),
                }
            })
            .collect();
        Self { ups }
    }

    /// Closes idle backend connections.
    pub fn reap(&self, now: tokio::time::Instant) {
        for u in &self.ups {
            for p in u.pools.iter().filter_map(|p| p.get()) {
                p.reap(now);
            }
        }
    }

    /// Closes every backend connection.
    pub fn close_all(&self) {
        for u in &self.ups {
            for p in u.pools.iter().filter_map(|p| p.get()) {
                p.close_all();
            }
        }
    }
}
