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

use super::backend::BackendClient;
use super::registry::{SharedUpstream, SharedUpstreams};
use crate::body;
use crate::health::{ActiveHealthConfig, HealthMachine, HealthState};

/// Starts a probe task for every backend with a health check (its own
/// `health_check`, as in the original format, or its upstream's). Must be
/// called inside a tokio runtime.
pub fn start(upstreams: &Arc<SharedUpstreams>) -> Vec<JoinHandle<()>> {
    let endpoint = match super::h3::client_endpoint() {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot open a socket for health checks; active checks disabled");
            return Vec::new();
        }
    };
    let mut tasks = Vec::new();
    for up in &upstreams.upstreams {
        for (bi, backend) in up.backends.iter().enumerate() {
            let Some(cfg) = backend
                .cfg
                .health_check
                .clone()
                .or_else(|| up.cfg.health_check.clone())
            else {
                continue;
            };
            let up = up.clone();
            tasks.push(tokio::spawn(run(up, bi, cfg, endpoint.clone())));
        }
    }
    tasks
}

/// Response headers a probe accepts.
const PROBE_HEADER_BYTES: u64 = 16 * 1024;

async fn run(
    up: Arc<SharedUpstream>,
    bi: usize,
    cfg: ActiveHealthConfig,
    endpoint: quinn::Endpoint,
) {
    let backend = &up.backends[bi];
    let label = format!("{} (health)", backend.label);
    let connect = || up.backend_client(bi, label.clone(), &endpoint, PROBE_HEADER_BYTES, false);
    let Some(mut pool) = connect() else { return };
    let mut machine = HealthMachine::new(&cfg);
    let authority = format!(
        "{}:{}",
        up.cfg.server_name(&backend.cfg),
        backend.cfg.addr.port
    );
    let uri = format!("https://{authority}{}", cfg.path);
    let first = machine.first_probe_delay(&mut rand::rng());
    tokio::time::sleep(first).await;
    loop {
        let (ok, answered, detail) = probe(&pool, &uri, &cfg).await;
        if !answered {
            // No answer: the probe's connection may be one a dead or
            // restarted backend will never answer on (QUIC has no RST), and
            // the pool may be in connect backoff, which would delay the
            // detection of a comeback beyond the probe schedule. The next
            // probe starts from a fresh pool.
            if let Some(fresh) = connect() {
                pool = fresh;
            }
        }
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
            // Leaving or regaining service: the workers' connections to
            // it are stale either way (see `renew_connections`).
            if matches!(t.to, HealthState::Unhealthy)
                || (t.to == HealthState::Healthy && t.from == HealthState::Recovering)
            {
                backend.renew_connections();
            }
        }
        let delay = machine.next_probe_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
    }
}

/// One probe: `(passed, the backend answered, what happened)`.
async fn probe(pool: &BackendClient, uri: &str, cfg: &ActiveHealthConfig) -> (bool, bool, String) {
    let req = match Request::get(uri)
        .header("user-agent", "spooky-health-check")
        .body(body::empty())
    {
        Ok(r) => r,
        Err(e) => return (false, true, format!("bad probe request: {e}")),
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
            false,
            format!("no answer within {} ms", timeout.as_millis()),
        ),
        Ok(Err(e)) => (false, false, e),
        Ok(Ok(status)) if cfg.is_success(status) => (true, true, format!("status {status}")),
        Ok(Ok(status)) => (
            false,
            true,
            format!("status {status} outside the expected range"),
        ),
    }
}
