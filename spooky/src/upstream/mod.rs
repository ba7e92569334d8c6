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

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{HeaderName, HeaderValue, Request, Response};
use tracing::{debug, info, warn};

use crate::balancer::{self, BackendStats, BackendView, Balance, RequestInfo};
use crate::body::{self, Guarded, ProxyBody, ReplayStatus, Replayable};
use crate::config::{self, Config};
use crate::health::{
    self, BodyState, BreakerState, CircuitBreaker, Ejection, FailureKind, HealthState, Outcome,
    OutlierPool, Rejected, RetryBudget, RetryConfig, Selection,
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
    /// Published by the active health checker (a `HealthState` code).
    health: AtomicU8,
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// Requests, responses and failures, for metrics.
    pub counters: crate::metrics::BackendCounters,
    /// Bumped when the workers must drop their connections to this backend
    /// and start afresh (see [`SharedBackend::renew_connections`]).
    epoch: AtomicU64,
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
    }

    /// Tells every worker to replace its pool for this backend before its
    /// next request there: idle connections close, busy ones finish their
    /// requests and close, and the connect backoff starts over.
    ///
    /// Called when the backend is found dead (ejected, unhealthy) and when
    /// it comes back. A SIGKILLed or crashed backend never closes its QUIC
    /// connections, and a restarted one cannot reset them (its stateless
    /// reset key is new): without this, workers would keep sending into
    /// the silent connections until their idle timeout (30 s and more),
    /// long after the backend is back.
    pub fn renew_connections(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
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
    /// In panic mode (for logging the transitions only).
    panicking: AtomicBool,
}

impl SharedUpstream {
    /// The backends a request may go to now: the healthy ones (active
    /// checks, not ejected; all of them in panic mode) whose circuit
    /// breaker admits a request. `Err` is the 503 to answer when there are
    /// none.
    fn candidates(&self, now: Instant) -> Result<Vec<bool>, ForwardError> {
        let mut eligible: Vec<bool> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.health().is_routable()
                    && !self.outliers.as_ref().is_some_and(|o| o.is_ejected(i, now))
            })
            .collect();
        let healthy = eligible.iter().filter(|h| **h).count();
        match health::routable_set(eligible.iter().copied(), &self.cfg.panic) {
            Selection::Normal => self.note_panic(false, healthy),
            Selection::Panic => {
                self.note_panic(true, healthy);
                eligible.fill(true);
            }
            Selection::NoneAvailable { retry_after } => {
                self.note_panic(false, healthy);
                return Err(ForwardError {
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                    detail: format!("no healthy backend in upstream `{}`", self.cfg.name),
                    retry_after: Some(retry_after.as_secs().max(1)),
                    backend: None,
                });
            }
        }
        // Breakers apply in panic mode too.
        let mut refused: Option<(&str, Rejected)> = None;
        for (e, b) in eligible.iter_mut().zip(&self.backends) {
            if let (true, Some(br)) = (*e, &b.breaker)
                && let Err(r) = br.check(now)
            {
                refused.get_or_insert((b.cfg.id.as_str(), r));
                *e = false;
            }
        }
        if eligible.contains(&true) {
            return Ok(eligible);
        }
        Err(match refused {
            Some((id, r)) => breaker_error(id, &r),
            None => ForwardError {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                detail: format!("no available backend in upstream `{}`", self.cfg.name),
                retry_after: Some(self.cfg.panic.all_down.retry_after_s.max(1)),
                backend: None,
            },
        })
    }

    /// Logs entering and leaving panic mode (once per transition, not per
    /// request).
    fn note_panic(&self, on: bool, healthy: usize) {
        if self.panicking.load(Ordering::Relaxed) == on
            || self.panicking.swap(on, Ordering::Relaxed) == on
        {
            return;
        }
        let backends = self.backends.len();
        if on {
            warn!(
                upstream = %self.cfg.name,
                healthy,
                backends,
                threshold_percent = self.cfg.panic.threshold_percent,
                "panic mode: too few healthy backends, balancing across all"
            );
        } else {
            info!(upstream = %self.cfg.name, healthy, backends, "panic mode over");
        }
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

/// The 503 for a request every candidate's circuit breaker refused.
fn breaker_error(id: &str, r: &Rejected) -> ForwardError {
    let retry_after = r
        .retry_after
        .map_or(1, |d| d.as_millis().div_ceil(1000) as u64)
        .max(1);
    ForwardError {
        status: http::StatusCode::SERVICE_UNAVAILABLE,
        detail: format!("backend {id}: {r}"),
        retry_after: Some(retry_after),
        backend: Some(id.to_owned()),
    }
}

/// Every upstream, shared by the workers.
pub struct SharedUpstreams {
    pub upstreams: Vec<Arc<SharedUpstream>>,
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
                    health: AtomicU8::new(0),
                    breaker: u
                        .circuit_breaker
                        .as_ref()
                        .map(|c| Arc::new(CircuitBreaker::new(c))),
                    counters: Default::default(),
                    epoch: AtomicU64::new(0),
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
                panicking: AtomicBool::new(false),
                cfg: u.clone(),
            }));
        }
        Ok(Self { upstreams })
    }
}

/// One worker's client for one backend, replaced when the backend's
/// connection epoch moves (see [`SharedBackend::renew_connections`]).
struct WorkerPool {
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
    fn client(&self, up: &SharedUpstream, bi: usize) -> Option<Arc<backend::BackendClient>> {
        let epoch = up.backends.get(bi)?.epoch();
        let mut cur = self.current.lock().ok()?;
        if cur.0 != epoch {
            let fresh = up.backend_client(
                bi,
                self.label.clone(),
                &self.endpoint,
                self.max_header_bytes,
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
struct WorkerUpstream {
    shared: Arc<SharedUpstream>,
    balancer: Mutex<Box<dyn Balance>>,
    pools: Vec<WorkerPool>,
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
    /// `via` version token of the backend hop (`3`, `2`, `1.1`).
    pub via_version: &'static str,
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

/// A backend response kept while a retry is attempted: the client gets
/// it if no retry produces a response.
struct Held {
    response: Response<ProxyBody>,
    backend: usize,
}

impl WorkerUpstreams {
    /// Builds this worker's balancers and pools over the shared state.
    pub fn new(shared: &SharedUpstreams, client: quinn::Endpoint, config: &Config) -> Self {
        let max_header_bytes = config.limits.max_request_header_bytes;
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
                        let c = u.backend_client(i, b.label.clone(), &client, max_header_bytes)?;
                        Some(WorkerPool {
                            label: b.label.clone(),
                            endpoint: client.clone(),
                            max_header_bytes,
                            current: Mutex::new((b.epoch(), Arc::new(c))),
                        })
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
            for p in u.pools.iter().filter_map(WorkerPool::get) {
                p.reap(now);
            }
        }
    }

    /// Closes every backend connection.
    pub fn close_all(&self) {
        for u in &self.ups {
            for p in u.pools.iter().filter_map(WorkerPool::get) {
                p.close_all();
            }
        }
    }

    /// Sends `req` to a backend of upstream `idx`: picks one with the
    /// balancer among eligible backends, retries on another backend when
    /// the retry policy and budget allow, and records every outcome for
    /// outlier detection, circuit breaking and the balancers.
    ///
    /// When retries run out, the client gets the last backend response if
    /// any try produced one (a 503 from a backend says more than spooky's
    /// own 502), else the last error.
    pub async fn forward(
        &self,
        idx: usize,
        req: Request<ProxyBody>,
        client_ip: std::net::IpAddr,
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
        let method = &parts.method;
        let info = RequestInfo {
            client_ip,
            path: parts.uri.path(),
            headers: &parts.headers,
        };
        let replay = Replayable::new(body, retry.buffer_body_limit);
        let started = Instant::now();
        let deadline = started + shared.cfg.timeouts.request;
        shared.retry_budget.deposit(started);

        let mut tried: Vec<usize> = Vec::new();
        let mut views: Vec<BackendView<'_>> = Vec::with_capacity(shared.backends.len());
        let mut last: Option<ForwardError> = None;
        let mut held: Option<Held> = None;
        let max_tries = 1 + retry.attempts as usize;
        for attempt in 0..max_tries {
            if attempt > 0 {
                let delay = retry.backoff(attempt as u32, &mut rand::rng());
                if Instant::now() + delay >= deadline {
                    break;
                }
                tokio::time::sleep(delay).await;
            }
            let now = Instant::now();
            let eligible = match shared.candidates(now) {
                Ok(e) => e,
                Err(e) => {
                    last = Some(e);
                    break;
                }
            };
            views.clear();
            views.extend(
                shared
                    .backends
                    .iter()
                    .zip(&eligible)
                    .map(|(b, &eligible)| BackendView {
                        id: &b.cfg.id,
                        weight: b.cfg.weight,
                        stats: &b.stats,
                        eligible,
                    }),
            );
            let pick = match up.balancer.lock() {
                Ok(mut bal) => bal.pick(&views, &info, &tried),
                Err(_) => None,
            };
            let Some(bi) = pick else {
                break;
            };
            tried.push(bi);
            let backend = &shared.backends[bi];
            let Some(client) = up.pools.get(bi).and_then(|p| p.client(shared, bi)) else {
                break;
            };
            let permit = match &backend.breaker {
                None => None,
                Some(br) => match br.try_acquire(now) {
                    Ok(p) => {
                        if p.is_trial() {
                            info!(backend = %backend.label, "circuit breaker half-open: sending a trial request");
                        }
                        Some((p, br))
                    }
                    Err(rejected) => {
                        // Lost a race with another request for the last
                        // slot; another backend may take it.
                        debug!(backend = %backend.label, reason = %rejected, "circuit breaker rejected the request");
                        last = Some(breaker_error(&backend.cfg.id, &rejected));
                        continue;
                    }
                },
            };

            let in_flight = backend.stats.start_request_owned();
            backend.counters.requests.fetch_add(1, Ordering::Relaxed);
            if attempt > 0 {
                backend.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            let try_timeout = retry
                .per_try_timeout()
                .map_or(deadline, |t| (now + t).min(deadline))
                .saturating_duration_since(now);
            let head = Request::from_parts(parts.clone(), replay.reader());
            // The per-try timeout covers the whole try, waiting for a
            // connection included (the pool bounds only the exchange).
            let result =
                match tokio::time::timeout(try_timeout, client.send(head, try_timeout)).await {
                    Ok(r) => r.map_err(|(e, _unsent)| e),
                    Err(_) => Err(UpstreamError::Timeout {
                        backend: backend.label.clone(),
                        after: try_timeout,
                    }),
                };
            drop(client);
            let done = Instant::now();
            let error = match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    backend.counters.response(status);
                    backend.stats.record_latency(done - now, done);
                    let ok = status < 500;
                    if let Some(o) = &shared.outliers {
                        let outcome = if ok {
                            Outcome::Success
                        } else {
                            Outcome::Status5xx
                        };
                        if let Some(ej) = o.record(bi, outcome, done) {
                            ejected(backend, &ej);
                        }
                    }
                    // The result counts now; the concurrency slot lasts as
                    // long as the response body.
                    let slot = permit.map(|(p, br)| {
                        let trial = p.is_trial();
                        let (state, slot) = p.record_and_hold(ok, done, br);
                        breaker_changed(backend, state, trial, status.to_string());
                        slot
                    });
                    let (rparts, rbody) = resp.into_parts();
                    let guard: Box<dyn Send> = Box::new((in_flight, slot));
                    let response =
                        Response::from_parts(rparts, body::boxed(Guarded::new(rbody, guard)));
                    let can_retry = attempt + 1 < max_tries
                        && retry_allowed(retry, method, &replay, FailureKind::Status(status))
                        && shared.retry_budget.try_withdraw(done);
                    held = Some(Held {
                        response,
                        backend: bi,
                    });
                    if can_retry {
                        debug!(backend = %backend.label, status, "retrying on another backend");
                        continue;
                    }
                    break;
                }
                Err(err) => err,
            };
            drop(in_flight);
            // A try failed before any response.
            let failure = match &error {
                e if e.is_connect_failure() => FailureKind::ConnectFailure,
                UpstreamError::Refused { .. } => FailureKind::Refused,
                UpstreamError::Timeout { .. } => FailureKind::Timeout,
                _ => FailureKind::ResetBeforeHeaders,
            };
            let local = matches!(
                error,
                UpstreamError::ClientAborted(_) | UpstreamError::BodyTooLarge { .. }
            );
            if !local {
                let c = &backend.counters;
                match failure {
                    FailureKind::ConnectFailure | FailureKind::Refused => &c.connect_failures,
                    FailureKind::Timeout => &c.timeouts,
                    _ => &c.resets,
                }
                .fetch_add(1, Ordering::Relaxed);
                let outcome = match failure {
                    FailureKind::ConnectFailure | FailureKind::Refused => Outcome::ConnectFailure,
                    FailureKind::Timeout => Outcome::Timeout,
                    _ => Outcome::Reset,
                };
                if let Some(o) = &shared.outliers
                    && let Some(ej) = o.record(bi, outcome, done)
                {
                    ejected(backend, &ej);
                }
                if let Some((p, _)) = permit {
                    let trial = p.is_trial();
                    let state = p.record(false, done);
                    breaker_changed(backend, state, trial, short_detail(&error));
                }
            }
            debug!(backend = %backend.label, error = %error, attempt, "try failed");
            last = Some(ForwardError {
                status: error.status(),
                detail: short_detail(&error),
                retry_after: None,
                backend: Some(backend.cfg.id.clone()),
            });
            if local {
                // The client's request itself failed: no retry, and an
                // earlier backend response is moot.
                held = None;
                break;
            }
            let can_retry = attempt + 1 < max_tries
                && retry_allowed(retry, method, &replay, failure)
                && shared.retry_budget.try_withdraw(Instant::now());
            if !can_retry {
                break;
            }
        }
        if let Some(Held { response, backend }) = held {
            return Ok(deliver(up, &views, response, backend, &info));
        }
        Err(last.unwrap_or(ForwardError {
            status: http::StatusCode::BAD_GATEWAY,
            detail: "no backend answered".into(),
            retry_after: None,
            backend: None,
        }))
    }
}

/// The response of backend `bi`, with the balancer's cookie (sticky
/// sessions need only the served backend's id from `views`).
fn deliver(
    up: &WorkerUpstream,
    views: &[BackendView<'_>],
    response: Response<ProxyBody>,
    bi: usize,
    info: &RequestInfo<'_>,
) -> Forwarded {
    let shared = &up.shared;
    let cookie = match up.balancer.lock() {
        Ok(bal) => bal.set_cookie(views, bi, info),
        Err(_) => None,
    };
    Forwarded {
        response,
        via_version: match shared.cfg.protocol {
            config::UpstreamProtocol::Http3 => "3",
            config::UpstreamProtocol::Http2 => "2",
            config::UpstreamProtocol::Http1 => "1.1",
        },
        backend: shared
            .backends
            .get(bi)
            .map(|b| b.cfg.id.clone())
            .unwrap_or_default(),
        extra_headers: cookie
            .map(|c| (http::header::SET_COOKIE, c))
            .into_iter()
            .collect(),
    }
}

/// Logs an outlier ejection and renews the workers' connections to the
/// backend (a silent connection to a dead backend must not outlive it).
fn ejected(backend: &SharedBackend, ej: &Ejection) {
    warn!(
        backend = %backend.label,
        reason = ?ej.reason,
        ejection_ms = ej.duration.as_millis() as u64,
        times_ejected = ej.times_ejected,
        "backend ejected (outlier detection)"
    );
    backend.renew_connections();
}

/// Logs a circuit-breaker transition caused by a request's result.
fn breaker_changed(
    backend: &SharedBackend,
    state: Option<BreakerState>,
    trial: bool,
    result: String,
) {
    match state {
        Some(BreakerState::Open) if trial => {
            warn!(backend = %backend.label, %result, "circuit breaker re-opened: the trial request failed")
        }
        Some(BreakerState::Open) => {
            warn!(backend = %backend.label, %result, "circuit breaker opened: requests are refused until a trial succeeds")
        }
        Some(BreakerState::Closed) => {
            info!(backend = %backend.label, "circuit breaker closed: the trial request succeeded")
        }
        _ => {}
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
