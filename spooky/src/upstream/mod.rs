//! Upstreams: the per-worker connection pools that carry requests to
//! backends, and the errors they report. One module per backend protocol;
//! each exposes a `send(request) -> response` with streaming bodies.

pub mod backend;
pub mod h3;
pub mod tcp;

use std::time::Duration;

use http::StatusCode;

/// Why a request could not be carried to (or answered by) a backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The backend's address did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    /// Connection establishment failed (refused, TLS, handshake).
    #[error("connect to {backend} failed: {reason}")]
    Connect { backend: String, reason: String },
    /// Connection establishment did not finish in time.
    #[error("connect to {backend} timed out after {after:?}")]
    ConnectTimeout { backend: String, after: Duration },
    /// Recent connection attempts failed; this one was not tried.
    #[error("{backend} is in connect backoff for another {remaining:?}")]
    Backoff {
        backend: String,
        remaining: Duration,
    },
    /// The backend refused the request before processing it (GOAWAY,
    /// H3_REQUEST_REJECTED): safe to retry anywhere.
    #[error("{backend} refused the request before processing it: {reason}")]
    Refused { backend: String, reason: String },
    /// The stream or connection failed before response headers.
    #[error("{backend} reset the request before responding: {reason}")]
    Reset { backend: String, reason: String },
    /// No response headers within the request timeout.
    #[error("{backend} sent no response headers within {after:?}")]
    Timeout { backend: String, after: Duration },
    /// The request body exceeded `limits.max_body_bytes`.
    #[error("request body exceeds the {limit}-byte limit")]
    BodyTooLarge { limit: u64 },
    /// The downstream client went away while the request was in flight.
    #[error("client aborted the request: {0}")]
    ClientAborted(String),
}

impl UpstreamError {
    /// The status the client gets for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UpstreamError::Resolve { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Backoff { .. }
            | UpstreamError::Refused { .. }
            | UpstreamError::Reset { .. }
            | UpstreamError::ClientAborted(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the request certainly did not reach the backend's
    /// application (a retry cannot duplicate it).
    pub fn not_processed(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Backoff { .. }
                | UpstreamError::Refused { .. }
        )
    }

    /// Whether establishing the connection failed (outlier detection
    /// counts these as gateway failures).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Backoff { .. }
        )
    }
}

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{HeaderName, HeaderValue, Request, Response};
use tracing::{debug, info, warn};

use crate::balancer::{self, BackendStats, BackendView, Balance, RequestInfo};
use crate::body::{self, Guarded, ProxyBody, ReplayStatus, Replayable};
use crate::config::{self, Config};
use crate::health::{
    self, BodyState, CircuitBreaker, FailureKind, HealthState, Outcome, OutlierPool, RetryBudget,
    RetryConfig, Selection,
};
use crate::tls;

/// Process-wide state of one backend, shared by every worker (atomics
/// only on the request path).
pub struct SharedBackend {
    pub cfg: config::Backend,
    /// `upstream/backend`, for logs.
    pub label: String,
    /// In-flight requests and latency EWMA, for the balancers.
    pub stats: Arc<BackendStats>,
    /// Published by the active health checker.
    routable: AtomicBool,
    health: AtomicU8,
    pub breaker: Option<CircuitBreaker>,
}

impl SharedBackend {
    /// The last state the active checker published.
    pub fn health(&self) -> HealthState {
        match self.health.load(Ordering::Acquire) {
            1 => HealthState::Degraded,
            2 => HealthState::Unhealthy,
            3 => HealthState::Recovering,
            _ => HealthState::Healthy,
        }
    }

    /// Publishes an active-check state.
    pub fn set_health(&self, state: HealthState) {
        let v = match state {
            HealthState::Healthy => 0,
            HealthState::Degraded => 1,
            HealthState::Unhealthy => 2,
            HealthState::Recovering => 3,
        };
        self.health.store(v, Ordering::Release);
        self.routable.store(state.is_routable(), Ordering::Release);
    }
}

/// Process-wide state of one upstream.
pub struct SharedUpstream {
    pub cfg: config::Upstream,
    pub backends: Vec<SharedBackend>,
    pub outliers: Option<OutlierPool>,
    pub retry: RetryConfig,
    pub retry_budget: RetryBudget,
    transport: backend::Transport,
}

impl SharedUpstream {
    /// Eligibility of every backend right now (health, ejection, breaker).
    fn eligible(&self, now: Instant) -> Vec<bool> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.routable.load(Ordering::Acquire)
                    && !self.outliers.as_ref().is_some_and(|o| o.is_ejected(i, now))
                    && b.breaker.as_ref().is_none_or(|br| br.allows(now))
            })
            .collect()
    }

    /// The server name backends are verified against: `tls.sni`, else the
    /// backend's host.
    pub fn server_name(&self, backend: &config::Backend) -> String {
        self.cfg
            .sni
            .clone()
            .unwrap_or_else(|| backend.addr.host.clone())
    }

    /// How this upstream's backends are reached (protocol and TLS).
    pub fn transport(&self) -> &backend::Transport {
        &self.transport
    }

    /// A client for backend `i` (per worker, or for the health prober).
    pub fn backend_client(
        &self,
        i: usize,
        label: String,
        quic_endpoint: &quinn::Endpoint,
        max_header_bytes: u64,
    ) -> Option<backend::BackendClient> {
        let b = self.backends.get(i)?;
        Some(backend::BackendClient::new(
            label,
            &self.cfg,
            &b.cfg,
            &self.transport,
            quic_endpoint,
            max_header_bytes,
        ))
    }
}

/// Every upstream, shared by the workers.
pub struct SharedUpstreams {
    pub upstreams: Vec<Arc<SharedUpstream>>,
    config: Arc<Config>,
}

/// Errors building upstream state.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstreams.{upstream}.tls: {source}")]
    Tls {
        upstream: String,
        source: tls::TlsError,
    },
}

impl SharedUpstreams {
    /// Builds the shared state (TLS client configs included) for `config`.
    pub fn new(config: &Arc<Config>) -> Result<Self, SetupError> {
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            if matches!(u.verification, tls::Verification::InsecureSkipVerify) {
                warn!(upstream = %u.name, "TLS verification of backends is DISABLED (insecure_skip_verify)");
            }
            let transport =
                backend::Transport::for_upstream(u).map_err(|source| SetupError::Tls {
                    upstream: u.name.clone(),
                    source,
                })?;
            let backends = u
                .backends
                .iter()
                .map(|b| SharedBackend {
                    cfg: b.clone(),
                    label: format!("{}/{}", u.name, b.id),
                    stats: Arc::new(BackendStats::with_decay(u.balancing.ewma_decay())),
                    routable: AtomicBool::new(true),
                    health: AtomicU8::new(0),
                    breaker: u.circuit_breaker.as_ref().map(CircuitBreaker::new),
                })
                .collect::<Vec<_>>();
            let retry = u.retries.clone().unwrap_or_default();
            upstreams.push(Arc::new(SharedUpstream {
                outliers: u
                    .outlier
                    .as_ref()
                    .map(|o| OutlierPool::new(o, backends.len())),
                retry_budget: RetryBudget::new(&retry),
                retry,
                backends,
                transport,
                cfg: u.clone(),
            }));
        }
        Ok(Self {
            upstreams,
            config: config.clone(),
        })
    }

    /// The config these were built from.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }
}

/// One worker's view of an upstream: its own balancer and pools.
struct WorkerUpstream {
    shared: Arc<SharedUpstream>,
    balancer: Mutex<Box<dyn Balance>>,
    pools: Vec<backend::BackendClient>,
}

/// One worker's upstreams, indexed like `Config::upstreams`.
pub struct WorkerUpstreams {
    ups: Vec<WorkerUpstream>,
}

/// A response from a backend.
pub struct Forwarded {
    pub response: Response<ProxyBody>,
    /// Backend id that answered.
    pub backend: String,
    /// Headers the balancer wants on the response (sticky cookie).
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
}

/// Why no backend response could be returned.
#[derive(Debug)]
pub struct ForwardError {
    pub status: http::StatusCode,
    pub detail: String,
    /// Seconds for `retry-after` (503 when nothing is available).
    pub retry_after: Option<u64>,
    /// The backend of the last try, if any.
    pub backend: Option<String>,
}

impl WorkerUpstreams {
    /// Builds this worker's balancers and pools over the shared state.
    pub fn new(shared: &SharedUpstreams, client: quinn::Endpoint, config: &Config) -> Self {
        let ups = shared
            .upstreams
            .iter()
            .map(|u| WorkerUpstream {
                balancer: Mutex::new(balancer::build(&u.cfg.balancing)),
                pools: u
                    .backends
                    .iter()
                    .enumerate()
                    .filter_map(|(i, b)| {
                        u.backend_client(
                            i,
                            b.label.clone(),
                            &client,
                            config.limits.max_request_header_bytes,
                        )
                    })
                    .collect(),
                shared: u.clone(),
            })
            .collect();
        Self { ups }
    }

    /// Closes idle backend connections.
    pub fn reap(&self, now: tokio::time::Instant) {
        for u in &self.ups {
            for p in &u.pools {
                p.reap(now);
            }
        }
    }

    /// Closes every backend connection.
    pub fn close_all(&self) {
        for u in &self.ups {
            for p in &u.pools {
                p.close_all();
            }
        }
    }

    /// Live connections to backend `b` of upstream `u` (tests, metrics).
    pub fn connections(&self, u: usize, b: usize) -> usize {
        self.ups
            .get(u)
            .and_then(|u| u.pools.get(b))
            .map_or(0, |p| p.connections())
    }

    /// Sends `req` to a backend of upstream `idx`: picks one with the
    /// balancer among eligible backends, retries on another backend when
    /// the retry policy and budget allow, and records every outcome for
    /// outlier detection, circuit breaking and the balancers.
    pub async fn forward(
        &self,
        idx: usize,
        req: Request<ProxyBody>,
        info: &RequestInfo<'_>,
    ) -> Result<Forwarded, ForwardError> {
        let Some(up) = self.ups.get(idx) else {
            return Err(ForwardError {
                status: http::StatusCode::INTERNAL_SERVER_ERROR,
                detail: "route names an unknown upstream".into(),
                retry_after: None,
                backend: None,
            });
        };
        let shared = &up.shared;
        let retry = &shared.retry;
        let (parts, body) = req.into_parts();
        let method = parts.method.clone();
        let replay = Replayable::new(body, retry.buffer_body_limit);
        let started = Instant::now();
        let deadline = started + shared.cfg.timeouts.request;
        let now = Instant::now();
        shared.retry_budget.deposit(now);

        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<ForwardError> = None;
        let max_tries = 1 + retry.attempts as usize;
        for attempt in 0..max_tries {
            let now = Instant::now();
            if attempt > 0 {
                let delay = retry.backoff(attempt as u32, &mut rand::rng());
                if now + delay >= deadline {
                    break;
                }
                tokio::time::sleep(delay).await;
            }
            let now = Instant::now();
            // Candidates: health, outlier ejection and breakers, or all of
            // them in panic mode.
            let mut eligible = shared.eligible(now);
            match health::routable_set(eligible.iter().copied(), &shared.cfg.panic) {
                Selection::Normal => {}
                Selection::Panic => {
                    if attempt == 0 {
                        warn!(upstream = %shared.cfg.name, "panic mode: too few healthy backends, balancing across all");
                    }
                    eligible.iter_mut().for_each(|e| *e = true);
                }
                Selection::NoneAvailable { retry_after } => {
                    return Err(last.unwrap_or(ForwardError {
                        status: http::StatusCode::SERVICE_UNAVAILABLE,
                        detail: format!("no healthy backend in upstream `{}`", shared.cfg.name),
                        retry_after: Some(retry_after.as_secs().max(1)),
                        backend: None,
                    }));
                }
            }
            let views: Vec<BackendView<'_>> = shared
                .backends
                .iter()
                .zip(&eligible)
                .map(|(b, &eligible)| BackendView {
                    id: &b.cfg.id,
                    weight: b.cfg.weight,
                    stats: &b.stats,
                    eligible,
                })
                .collect();
            let pick = match up.balancer.lock() {
                Ok(mut bal) => bal.pick(&views, info, &tried),
                Err(_) => None,
            };
            let Some(bi) = pick else {
                return Err(last.unwrap_or(ForwardError {
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                    detail: format!("no available backend in upstream `{}`", shared.cfg.name),
                    retry_after: Some(shared.cfg.panic.all_down.retry_after_s.max(1)),
                    backend: None,
                }));
            };
            tried.push(bi);
            let backend = &shared.backends[bi];
            let permit = match &backend.breaker {
                None => None,
                Some(br) => match br.try_acquire(now) {
                    Ok(p) => Some(p),
                    Err(rejected) => {
                        debug!(backend = %backend.label, reason = %rejected, "circuit breaker rejected the request");
                        last = Some(ForwardError {
                            status: http::StatusCode::SERVICE_UNAVAILABLE,
                            detail: format!(
                                "backend {} is overloaded or failing ({rejected})",
                                backend.cfg.id
                            ),
                            retry_after: Some(1),
                            backend: Some(backend.cfg.id.clone()),
                        });
                        // Another backend may take it; this one was never
                        // tried, so it does not count against the budget.
                        continue;
                    }
                },
            };

            let in_flight = backend.stats.start_request_owned();
            let try_timeout = retry
                .per_try_timeout()
                .map_or(deadline, |t| (now + t).min(deadline))
                .saturating_duration_since(now);
            let head = Request::from_parts(parts.clone(), replay.reader());
            let result = up.pools[bi].send(head, try_timeout).await;
            let done = Instant::now();
            let (failure, error) = match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    backend.stats.record_latency(done - now, done);
                    let ok = status < 500;
                    if let Some(o) = &shared.outliers {
                        let outcome = if ok {
                            Outcome::Success
                        } else {
                            Outcome::Status5xx
                        };
                        if let Some(ej) = o.record(bi, outcome, done) {
                            info!(backend = %backend.label, ?ej, "backend ejected (outlier detection)");
                        }
                    }
                    if let Some(p) = permit {
                        p.record(ok, done);
                    }
                    let can_retry = attempt + 1 < max_tries
                        && retry_allowed(retry, &method, &replay, FailureKind::Status(status))
                        && shared.retry_budget.try_withdraw(done);
                    if can_retry {
                        debug!(backend = %backend.label, status, "retrying on another backend");
                        last = Some(ForwardError {
                            status: resp.status(),
                            detail: format!("backend answered {status}"),
                            retry_after: None,
                            backend: Some(backend.cfg.id.clone()),
                        });
                        continue;
                    }
                    let (rparts, rbody) = resp.into_parts();
                    let rbody = body::boxed(Guarded::new(rbody, Box::new(in_flight)));
                    let cookie = match up.balancer.lock() {
                        Ok(bal) => bal.set_cookie(&views, bi, info),
                        Err(_) => None,
                    };
                    let extra_headers = cookie
                        .map(|c| (http::header::SET_COOKIE, c))
                        .into_iter()
                        .collect();
                    return Ok(Forwarded {
                        response: Response::from_parts(rparts, rbody),
                        backend: backend.cfg.id.clone(),
                        extra_headers,
                    });
                }
                Err((err, _unsent)) => {
                    drop(in_flight);
                    let failure = match &err {
                        e if e.is_connect_failure() => FailureKind::ConnectFailure,
                        UpstreamError::Refused { .. } => FailureKind::Refused,
                        UpstreamError::Timeout { .. } => FailureKind::Timeout,
                        _ => FailureKind::ResetBeforeHeaders,
                    };
                    (failure, err)
                }
            };
            // A try failed before any response.
            let outcome = match failure {
                FailureKind::ConnectFailure | FailureKind::Refused => Outcome::ConnectFailure,
                FailureKind::Timeout => Outcome::Timeout,
                _ => Outcome::Reset,
            };
            if !matches!(
                error,
                UpstreamError::ClientAborted(_) | UpstreamError::BodyTooLarge { .. }
            ) {
                if let Some(o) = &shared.outliers
                    && let Some(ej) = o.record(bi, outcome, done)
                {
                    info!(backend = %backend.label, ?ej, "backend ejected (outlier detection)");
                }
                if let Some(p) = permit {
                    p.record(false, done);
                }
            }
            let status = error.status();
            let detail = error.to_string();
            debug!(backend = %backend.label, error = %detail, attempt, "try failed");
            last = Some(ForwardError {
                status,
                detail: short_detail(&error),
                retry_after: None,
                backend: Some(backend.cfg.id.clone()),
            });
            if matches!(
                error,
                UpstreamError::ClientAborted(_) | UpstreamError::BodyTooLarge { .. }
            ) {
                break;
            }
            let can_retry = attempt + 1 < max_tries
                && retry_allowed(retry, &method, &replay, failure)
                && shared.retry_budget.try_withdraw(Instant::now());
            if !can_retry {
                break;
            }
        }
        Err(last.unwrap_or(ForwardError {
            status: http::StatusCode::BAD_GATEWAY,
            detail: "no backend answered".into(),
            retry_after: None,
            backend: None,
        }))
    }
}

fn retry_allowed(
    retry: &RetryConfig,
    method: &http::Method,
    replay: &Replayable,
    failure: FailureKind,
) -> bool {
    let body_state = match replay.status() {
        ReplayStatus::Replayable => BodyState::FullyBuffered,
        ReplayStatus::Overflowed => BodyState::Streaming,
    };
    health::retry_allowed(method, body_state, failure, retry)
}

/// What the client is told: the kind of failure, not internal addresses.
fn short_detail(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Resolve { .. } => "backend address does not resolve".into(),
        UpstreamError::Connect { .. } => "cannot connect to the backend".into(),
        UpstreamError::ConnectTimeout { .. } => "backend connect timed out".into(),
        UpstreamError::Backoff { .. } => "backend unreachable (reconnecting)".into(),
        UpstreamError::Refused { .. } => "backend refused the request".into(),
        UpstreamError::Reset { .. } => "backend reset the request".into(),
        UpstreamError::Timeout { after, .. } => {
            format!("backend sent no response within {} ms", after.as_millis())
        }
        UpstreamError::BodyTooLarge { limit } => format!("request body exceeds {limit} bytes"),
        UpstreamError::ClientAborted(_) => "client aborted the request".into(),
    }
}

impl SharedUpstreams {
    /// Starts the active health checks (see `health::probe`).
    pub fn start_health_checks(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        crate::health::probe::start(self)
    }
}
