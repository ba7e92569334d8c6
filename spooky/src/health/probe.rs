//! Active health checking, the I/O half: one task per checked backend
//! sends `GET <path>` over the backend's own protocol on a connection of
//! its own, feeds the result to the [`HealthMachine`] and publishes the
//! state to the workers.

use std::sync::Arc;
use std::time::Instant;

use http::Request;
use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{ActiveHealthConfig, HealthMachine, HealthState};
use crate::body;
use crate::upstream::backend::BackendClient;
use crate::upstream::{SharedUpstream, SharedUpstreams};

/// Starts a probe task for every backend with a health check (its own
/// `health_check`, as in the original format, or its upstream's). Must be
/// called inside a tokio runtime.
pub fn start(upstreams: &Arc<SharedUpstreams>) -> Vec<JoinHandle<()>> {
    let endpoint = match crate::upstream::h3::client_endpoint() {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot open a socket for health checks; active checks disabled");
            return Vec::new();
        }
    };
    let mut tasks = Vec::new();
    for (ui, up) in upstreams.upstreams.iter().enumerate() {
        for (bi, backend) in up.backends.iter().enumerate() {
            let Some(cfg) = backend
                .cfg
                .health_check
                .clone()
                .or_else(|| up.cfg.health_check.clone())
            else {
                continue;
            };
            let Some(pool) =
                up.backend_client(bi, format!("{} (health)", backend.label), &endpoint, 16 * 1024)
            else {
                continue;
            };
            let up = up.clone();
            tasks.push(tokio::spawn(run(up, bi, cfg, pool, ui)));
        }
    }
    tasks
}

async fn run(
    up: Arc<SharedUpstream>,
    bi: usize,
    cfg: ActiveHealthConfig,
    pool: BackendClient,
    _ui: usize,
) {
    let backend = &up.backends[bi];
    let mut machine = HealthMachine::new(&cfg);
    let authority = format!("{}:{}", up.server_name(&backend.cfg), backend.cfg.addr.port);
    let uri = format!("https://{authority}{}", cfg.path);
    let first = machine.first_probe_delay(&mut rand::rng());
    tokio::time::sleep(first).await;
    loop {
        let (ok, detail) = probe(&pool, &uri, &cfg).await;
        let now = Instant::now();
        if let Some(t) = machine.on_probe(ok, now) {
            backend.set_health(t.to);
            match t.to {
                HealthState::Unhealthy => {
                    warn!(backend = %backend.label, from = ?t.from, %detail, "backend UNHEALTHY: no traffic until it recovers")
                }
                HealthState::Healthy => {
                    info!(backend = %backend.label, from = ?t.from, "backend healthy")
                }
                to => {
                    info!(backend = %backend.label, from = ?t.from, ?to, %detail, "backend health changed")
                }
            }
        }
        let delay = machine.next_probe_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
    }
}

/// One probe: `(passed, what happened)`.
async fn probe(pool: &BackendClient, uri: &str, cfg: &ActiveHealthConfig) -> (bool, String) {
    let req = match Request::get(uri)
        .header("user-agent", "spooky-health-check")
        .body(body::empty())
    {
        Ok(r) => r,
        Err(e) => return (false, format!("bad probe request: {e}")),
    };
    let timeout = cfg.timeout();
    let attempt = async {
        let resp = pool
            .send(req, timeout)
            .await
            .map_err(|(e, _)| e.to_string())?;
        let status = resp.status().as_u16();
        // Read the body so the stream completes cleanly.
        let _ = resp.into_body().collect().await;
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => (
            false,
            format!("no answer within {} ms", timeout.as_millis()),
        ),
        Ok(Err(e)) => (false, e),
        Ok(Ok(status)) if cfg.is_success(status) => (true, format!("status {status}")),
        Ok(Ok(status)) => (false, format!("status {status} outside the expected range")),
    }
}
