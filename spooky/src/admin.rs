//! The admin listener: plain HTTP/1.1 on a separate (usually loopback)
//! address. `/metrics` (Prometheus), `/healthz` (liveness), `/readyz`
//! (ready while listeners and steering are up, 503 while draining),
//! `/backends` (state of every backend, and runtime drain / disable /
//! enable / weight changes) and `POST /reload`. With a token configured,
//! everything but `/healthz` and `/readyz` needs `authorization: Bearer`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::health::BreakerState;
use crate::metrics::{self, Scrape};
use crate::reload::{ReloadError, Reloader};
use crate::steering::xdp::XdpSteering;
use crate::upstream::{Control, SharedBackend, SharedUpstream};

/// Largest admin request body (a weight, a small JSON object).
const MAX_BODY: usize = 1024;

/// What the admin endpoints read and change.
pub struct AdminState {
    pub reloader: Arc<Reloader>,
    pub steering_mode: &'static str,
    pub workers: usize,
    pub xdp: Option<Arc<Mutex<XdpSteering>>>,
    pub started: Instant,
    /// False until every worker listens and again once draining starts.
    pub ready: AtomicBool,
    /// Bearer token required on the privileged endpoints.
    pub token: Option<String>,
}

/// Binds the admin listener and serves it on the current runtime.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, addr, state)
}

/// Serves an admin listener bound elsewhere (handed over by the previous
/// process at an upgrade, or bound by the server).
pub fn serve_on(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    serve_listener(TcpListener::from_std(listener)?, addr, state)
}

fn serve_listener(
    listener: TcpListener,
    addr: SocketAddr,
    state: Arc<AdminState>,
) -> std::io::Result<JoinHandle<()>> {
    info!(
        addr = %listener.local_addr().unwrap_or(addr),
        token = state.token.is_some(),
        "admin listening (/metrics, /healthz, /readyz, /backends, /reload)"
    );
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(req, &state, peer).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(%peer, error = %e, "admin connection failed");
                }
            });
        }
    }))
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    with_type(status, "text/plain; charset=utf-8", body)
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    with_type(status, "application/json", s)
}

/// Compares without an early exit, so response timing says nothing about
/// how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized<B>(req: &Request<B>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

/// The token of a `Bearer` credential. RFC 9110 §11.1: the auth-scheme is
/// case-insensitive and separated from its credentials by one or more
/// spaces, so `bearer x` and `BEARER  x` are the same as `Bearer x`.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

async fn handle(
    req: Request<Incoming>,
    state: &AdminState,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method.clone(), path.as_str()) {
        (Method::GET | Method::HEAD, "/healthz") => return text(StatusCode::OK, "ok\n".into()),
        (Method::GET | Method::HEAD, "/readyz") => {
            return if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            };
        }
        _ => {}
    }
    if !authorized(&req, state.token.as_deref()) {
        warn!(%peer, %method, %path, "admin request without a valid bearer token");
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "401: send `authorization: Bearer <admin.token>`\n".into(),
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("413: admin request bodies are at most {MAX_BODY} bytes\n"),
            );
        }
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::GET | Method::HEAD, ["metrics"]) => {
            let generation = state.reloader.current();
            let xdp = state
                .xdp
                .as_ref()
                .and_then(|x| x.lock().ok().and_then(|x| x.counters().ok()));
            let body = metrics::render(&Scrape {
                backends: generation.upstreams.samples(Instant::now()),
                steering_mode: state.steering_mode,
                workers: state.workers,
                xdp,
                started: state.started,
            });
            with_type(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        (Method::GET | Method::HEAD, ["backends"]) => {
            let generation = state.reloader.current();
            let now = Instant::now();
            let list: Vec<_> = generation
                .upstreams
                .upstreams
                .iter()
                .flat_map(|u| {
                    u.backends
                        .iter()
                        .enumerate()
                        .map(move |(i, b)| describe(u, i, b, now))
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({ "generation": generation.number, "backends": list }),
            )
        }
        (Method::POST, ["backends", upstream, id, action]) => {
            let generation = state.reloader.current();
            let Some(b) = generation.upstreams.backend(upstream, id) else {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("404: no backend `{id}` in upstream `{upstream}` (GET /backends lists them)\n"),
                );
            };
            change_backend(b, action, &body, peer)
        }
        (Method::POST, ["reload"]) => match state.reloader.reload() {
            Ok(s) => json_response(
                StatusCode::OK,
                &json!({
                    "generation": s.generation,
                    "upstreams": s.upstreams,
                    "backends": s.backends,
                    "routes": s.routes,
                    "ignored_until_restart": s.ignored,
                }),
            ),
            Err(ReloadError::Busy) => text(
                StatusCode::CONFLICT,
                "409: a reload is already in progress\n".into(),
            ),
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                format!("400: reload rejected, still serving the previous config:\n{e}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "404: try GET /metrics, /healthz, /readyz, /backends; POST /backends/UPSTREAM/ID/{drain,disable,enable,weight}, /reload\n".into(),
        ),
    }
}

/// One backend as `GET /backends` shows it.
fn describe(u: &SharedUpstream, i: usize, b: &SharedBackend, now: Instant) -> serde_json::Value {
    let circuit = b
        .breaker
        .as_ref()
        .map_or("closed", |br| match br.state(now) {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        });
    json!({
        "upstream": u.cfg.name,
        "id": b.cfg.id,
        "address": format!("{}:{}", b.cfg.addr.host, b.cfg.addr.port),
        "state": b.control().name(),
        "weight": b.weight(),
        "config_weight": b.cfg.weight,
        "in_flight": b.stats.in_flight(),
        "health": format!("{:?}", b.health()).to_lowercase(),
        "ejected": u.outliers.as_ref().is_some_and(|o| o.is_ejected(i, now)),
        "circuit": circuit,
        "requests": b.counters.requests.load(Ordering::Relaxed),
    })
}

/// Applies `POST /backends/U/ID/{drain,disable,enable,weight}`.
fn change_backend(
    b: &SharedBackend,
    action: &str,
    body: &Bytes,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let control = match action {
        "drain" => Some(Control::Draining),
        "disable" => Some(Control::Disabled),
        "enable" => Some(Control::Enabled),
        "weight" => None,
        other => {
            return text(
                StatusCode::NOT_FOUND,
                format!("404: unknown action `{other}`: use drain, disable, enable or weight\n"),
            );
        }
    };
    if let Some(c) = control {
        let before = b.set_control(c);
        info!(backend = %b.label, from = before.name(), to = c.name(), %peer, "backend state changed through the admin API");
        return json_response(
            StatusCode::OK,
            &json!({ "backend": b.label, "state": c.name(), "previous": before.name(), "in_flight": b.stats.in_flight() }),
        );
    }
    let Some(weight) = parse_weight(body) else {
        return text(
            StatusCode::BAD_REQUEST,
            "400: send the weight as the body, an integer from 1 to 1000000 (e.g. `5` or `{\"weight\": 5}`)\n".into(),
        );
    };
    let before = b.set_weight(weight);
    info!(backend = %b.label, from = before, to = weight, %peer, "backend weight changed through the admin API");
    json_response(
        StatusCode::OK,
        &json!({ "backend": b.label, "weight": weight, "previous": before }),
    )
}

/// `5` or `{"weight": 5}`.
fn parse_weight(body: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(body).ok()?.trim();
    let n = match text.parse::<u32>() {
        Ok(n) => n,
        Err(_) => {
            let v: serde_json::Value = serde_json::from_str(text).ok()?;
            u32::try_from(v.get("weight")?.as_u64()?).ok()?
        }
    };
    (1..=1_000_000).contains(&n).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_from_text_or_json_within_range() {
        assert_eq!(parse_weight(b"5"), Some(5));
        assert_eq!(parse_weight(b" 12\n"), Some(12));
        assert_eq!(parse_weight(br#"{"weight": 3}"#), Some(3));
        assert_eq!(parse_weight(b"0"), None);
        assert_eq!(parse_weight(b"1000001"), None);
        assert_eq!(parse_weight(b"-1"), None);
        assert_eq!(parse_weight(br#"{"w": 3}"#), None);
        assert_eq!(parse_weight(b"\xff"), None);
    }

    #[test]
    fn bearer_token_is_checked() {
        let req = |auth: Option<&str>| {
            let mut b = Request::get("/backends");
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(()).unwrap()
        };
        let token = Some("0123456789abcdef0123");
        assert!(authorized(&req(None), None));
        assert!(!authorized(&req(None), token));
        assert!(!authorized(&req(Some("Bearer wrong")), token));
        assert!(!authorized(&req(Some("Basic 0123456789abcdef0123")), token));
        assert!(authorized(&req(Some("Bearer 0123456789abcdef0123")), token));
        // RFC 9110 §11.1: the scheme is case-insensitive.
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let auth = format!("{scheme} 0123456789abcdef0123");
            assert!(authorized(&req(Some(&auth)), token), "{auth}");
        }
        assert!(authorized(
            &req(Some("Bearer  0123456789abcdef0123")),
            token
        ));
        assert!(!authorized(&req(Some("Bearer")), token));
        assert!(!authorized(&req(Some("Bearer0123456789abcdef0123")), token));
        assert!(!authorized(
            &req(Some("Bearerx 0123456789abcdef0123")),
            token
        ));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
