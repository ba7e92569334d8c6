//! The forwarding driver: carries one request to a backend of an
//! upstream. The sans-IO retry loop (`spooky_lb::retry::RetryLoop`) decides
//! where each try goes, for how long, and whether to try again; this
//! module does the IO it asks for (sending, timeouts, backoff sleeps) and
//! records every try's result for the counters, outlier detection, circuit
//! breakers and balancers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Request, Response};
use tracing::{debug, info, warn};

use super::error::{ForwardError, UpstreamError, breaker_error, short_detail};
use super::pools::{WorkerUpstream, WorkerUpstreams};
use super::registry::SharedBackend;
use crate::balancer::{BackendView, RequestInfo};
use crate::body::{self, Guarded, ProxyBody, ReplayStatus, Replayable};
use crate::config;
use crate::health::{BreakerState, Ejection, Outcome};
use crate::retry::{BodyState, FailureKind, RetryLoop, Step, TryOutcome};

/// A response from a backend.
pub struct Forwarded {
    pub response: Response<ProxyBody>,
    /// Backend id that answered.
    pub backend: String,
    /// Headers the balancer wants on the response (sticky cookie).
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    /// `via` version token of the backend hop (`3`, `2`, `1.1`).
    pub via_version: &'static str,
    /// Tries made (1 without retries).
    pub tries: u32,
}

impl WorkerUpstreams {
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
                tries: 0,
                status: http::StatusCode::INTERNAL_SERVER_ERROR,
                detail: "route names an unknown upstream".into(),
                retry_after: None,
                backend: None,
            });
        };
        let shared = &up.shared;
        let retry = &shared.retry;
        let (parts, body) = req.into_parts();
        let info = RequestInfo {
            client_ip,
            path: parts.uri.path(),
            headers: &parts.headers,
        };
        let replay = Replayable::new(body, retry.buffer_body_limit);
        // One clock read per step: the loop starts at `now`, and each try
        // reports the instant it ended.
        let mut now = Instant::now();
        let mut tries = RetryLoop::new(
            retry,
            &shared.retry_budget,
            &parts.method,
            shared.cfg.timeouts.request,
            now,
        );
        // The balancer's view of the last choice, for the sticky cookie.
        let mut views: Vec<BackendView<'_>> = Vec::with_capacity(shared.backends.len());
        let end = loop {
            let step = tries.next(now, &mut rand::rng(), |now, tried| {
                choose(up, &info, &mut views, now, tried)
            });
            match step {
                Ok(Step::Wait { until }) => {
                    tokio::time::sleep_until(until.into()).await;
                    // The timer fired: the wait is over even where the
                    // runtime's clock is not the system's (paused in tests).
                    now = Instant::now().max(until);
                }
                Ok(Step::Send {
                    backend,
                    attempt,
                    timeout,
                }) => {
                    let (outcome, at) =
                        try_backend(up, backend, attempt, timeout, now, &parts, &replay).await;
                    let status = match &outcome {
                        TryOutcome::Response { status, .. } => Some(*status),
                        _ => None,
                    };
                    let granted = tries.record(outcome, body_state(&replay), at);
                    if let (Ok(true), Some(status), Some(b)) =
                        (granted, status, shared.backends.get(backend))
                    {
                        debug!(backend = %b.label, status, "retrying on another backend");
                    }
                    now = at;
                }
                Ok(end @ (Step::Respond { .. } | Step::Fail { .. })) => break Ok(end),
                Err(e) => break Err(e),
            }
        };
        let tries = match &end {
            Ok(Step::Respond { tries, .. } | Step::Fail { tries, .. }) => *tries,
            _ => tries.tried().len() as u32,
        };
        if tries > 1 {
            crate::metrics::LIVE
                .retries
                .with_label_values(&[&shared.cfg.name])
                .inc_by(u64::from(tries - 1));
        }
        match end {
            Ok(Step::Respond {
                backend, response, ..
            }) => {
                let mut fwd = deliver(up, &views, response, backend, &info);
                fwd.tries = tries;
                Ok(fwd)
            }
            Ok(Step::Fail { error, .. }) => Err(error.map_or(
                ForwardError {
                    tries,
                    status: http::StatusCode::BAD_GATEWAY,
                    detail: "no backend answered".into(),
                    retry_after: None,
                    backend: None,
                },
                |e| ForwardError { tries, ..e },
            )),
            // The loop above steps the machine in order; reaching this is
            // a bug, reported rather than panicked on.
            Ok(Step::Wait { .. } | Step::Send { .. }) | Err(_) => Err(ForwardError {
                tries,
                status: http::StatusCode::INTERNAL_SERVER_ERROR,
                detail: match end {
                    Err(e) => format!("retry loop: {e}"),
                    Ok(_) => "retry loop stopped mid-request".into(),
                },
                retry_after: None,
                backend: None,
            }),
        }
    }
}

/// The backend for the next try: the balancer's pick among the backends
/// eligible at `now` (filling `views`, which the sticky cookie needs
/// later), avoiding those `tried`. `Err` is the 503 when none is eligible.
fn choose<'a>(
    up: &'a WorkerUpstream,
    info: &RequestInfo<'_>,
    views: &mut Vec<BackendView<'a>>,
    now: Instant,
    tried: &[usize],
) -> Result<Option<usize>, ForwardError> {
    let shared = &up.shared;
    let eligible = shared.candidates(now)?;
    views.clear();
    views.extend(
        shared
            .backends
            .iter()
            .zip(&eligible)
            .map(|(b, &eligible)| BackendView {
                id: &b.cfg.id,
                weight: b.weight(),
                stats: &b.stats,
                eligible,
            }),
    );
    Ok(match up.balancer.lock() {
        Ok(mut bal) => bal.pick(views, info, tried, now),
        Err(_) => None,
    })
}

/// How far the request body has gone, for the retry policy.
fn body_state(replay: &Replayable) -> BodyState {
    match replay.status() {
        ReplayStatus::Replayable => BodyState::FullyBuffered,
        ReplayStatus::Overflowed => BodyState::Streaming,
    }
}

/// One try on backend `bi`, picked at `now`: takes a circuit-breaker
/// permit, sends within `timeout`, and records the result for the
/// counters, outlier detection, the breaker and the balancers. Returns
/// the outcome for the retry loop and the instant to record it at (the
/// response's arrival; a fresh one after an error, so that the budget is
/// charged after the bookkeeping, as it always was).
async fn try_backend(
    up: &WorkerUpstream,
    bi: usize,
    attempt: u32,
    try_timeout: Duration,
    now: Instant,
    parts: &http::request::Parts,
    replay: &Replayable,
) -> (TryOutcome<Response<ProxyBody>, ForwardError>, Instant) {
    let shared = &up.shared;
    let (Some(backend), Some(client)) = (
        shared.backends.get(bi),
        up.pools.get(bi).and_then(|p| p.client(shared, bi)),
    ) else {
        return (TryOutcome::NoClient, now);
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
                let error = breaker_error(&backend.cfg.id, &rejected);
                return (TryOutcome::Rejected(error), now);
            }
        },
    };

    let in_flight = backend.stats.start_request_owned();
    backend.counters.requests.fetch_add(1, Ordering::Relaxed);
    if attempt > 0 {
        backend.counters.retries.fetch_add(1, Ordering::Relaxed);
    }
    let head = Request::from_parts(parts.clone(), replay.reader());
    // The per-try timeout covers the whole try, waiting for a
    // connection included (the pool bounds only the exchange).
    let result = match tokio::time::timeout(try_timeout, client.send(head, try_timeout)).await {
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
            backend.counters.latency.observe((done - now).as_secs_f64());
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
            let response = Response::from_parts(rparts, body::boxed(Guarded::new(rbody, guard)));
            return (TryOutcome::Response { status, response }, done);
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
        UpstreamError::ClientAborted(_) | UpstreamError::ClientBody(_)
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
    let forward_error = ForwardError {
        tries: 0,
        status: error.status(),
        detail: short_detail(&error),
        retry_after: None,
        backend: Some(backend.cfg.id.clone()),
    };
    let outcome = if local {
        // The client's request itself failed: no retry, and an
        // earlier backend response is moot.
        TryOutcome::Local(forward_error)
    } else {
        TryOutcome::Failed {
            failure,
            error: forward_error,
        }
    };
    (outcome, Instant::now())
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
        tries: 1,
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
