//! The request path, protocol-independent: request id → client rate limit
//! → route → route rate limit and body limit → upstream request headers →
//! forward (balancing, retries: `upstream`) → response headers, and the
//! error responses (404/413/429/502/503/504) spooky generates itself; then
//! the request's metrics and access-log line once the response body ends.
//! Listeners turn their protocol into an `http::Request<ProxyBody>` and
//! send back whatever this returns.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tracing::{debug, info, warn};

use crate::body::{self, BoxError, IdleTimeout, Limited, ProxyBody};
use crate::config::Config;
use crate::limits::{RateLimited, RequestLimits};
use crate::metrics::LIVE;
use crate::reload::Generation;
use crate::routing;
use crate::upstream::{ForwardError, WorkerUpstreams};
use crate::validate::{self, CONNECTION_SPECIFIC, Violation};

/// The parts of a request the access log names.
#[derive(Clone, Copy)]
struct Logged<'a> {
    method: &'a http::Method,
    uri: &'a http::Uri,
}

impl<'a> Logged<'a> {
    fn of(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
        }
    }
}

/// What the proxy knows about the client side of a request.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    /// The client's address.
    pub peer: SocketAddr,
    /// `via` protocol version token of the client's protocol (`3`, `2`,
    /// `1.1`).
    pub via_version: &'static str,
    /// Scheme the client used (`https`, or `http` for a plain listener).
    pub scheme: &'static str,
    /// The request arrived in TLS early data (0-RTT) and may be a replay.
    pub early_data: bool,
}

/// Per-worker request-path state of one config generation: the config,
/// this worker's upstream pools and balancers, and the process-wide rate
/// limits.
pub struct Proxy {
    pub config: Arc<Config>,
    pub upstreams: WorkerUpstreams,
    pub limits: Arc<RequestLimits>,
    /// TLS for the TCP listener, re-read on reload.
    pub tcp_tls: Option<Arc<rustls::ServerConfig>>,
    /// Metric handles per route (indexed like `Config::routes`), and for
    /// requests answered before any route matched.
    route_metrics: Vec<RouteMetrics>,
    unrouted: RouteMetrics,
}

/// A route's metric series, resolved once per generation: a labelled
/// lookup takes a lock and hashes the labels, too much for every request.
struct RouteMetrics {
    duration: prometheus::Histogram,
    /// `spooky_route_requests_total` by status class (1xx..5xx).
    responses: Vec<prometheus::IntCounter>,
}

impl RouteMetrics {
    fn new(route: &str, upstream: &str) -> Self {
        Self {
            duration: LIVE.request_duration.with_label_values(&[route]),
            responses: crate::metrics::CLASSES
                .iter()
                .map(|class| {
                    LIVE.route_requests
                        .with_label_values(&[route, upstream, class])
                })
                .collect(),
        }
    }
}

/// A worker's current [`Proxy`]: a request loads it once and keeps that
/// snapshot to its end, so a reload never changes a request mid-way.
pub type ProxyHandle = Arc<ArcSwap<Proxy>>;

impl Proxy {
    pub fn new(generation: &Generation, upstreams: WorkerUpstreams) -> Self {
        let cfg = &generation.config;
        let route_metrics = cfg
            .routes
            .iter()
            .map(|r| {
                let upstream = cfg
                    .upstreams
                    .get(r.upstream)
                    .map_or("none", |u| u.name.as_str());
                RouteMetrics::new(&r.name, upstream)
            })
            .collect();
        Self {
            route_metrics,
            unrouted: RouteMetrics::new("none", "none"),
            config: generation.config.clone(),
            upstreams,
            limits: generation.limits.clone(),
            tcp_tls: generation.tcp_tls.clone(),
        }
    }
}

/// Headers that describe one hop and never cross a proxy besides the
/// connection-specific ones (RFC 9110 §7.6.1, plus the de-facto ones).
const OTHER_HOP_BY_HOP: [HeaderName; 2] = [header::TE, header::PROXY_AUTHENTICATE];

/// Removes connection-specific headers, including every header the
/// `connection` header names. `te: trailers` survives on requests: it is
/// the one value HTTP/2 and HTTP/3 allow, and gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Split the octets, not a `&str`: a value with obs-text (octets above
    // 0x7f, which `to_str` refuses) still names its other options, and
    // reading it as a whole would forward them (found by fuzzing).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect();
    let te_trailers = keep_te_trailers
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    for n in named
        .iter()
        .chain(&CONNECTION_SPECIFIC)
        .chain(&OTHER_HOP_BY_HOP)
    {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A fresh request id: 128 random bits, hex.
fn new_request_id() -> HeaderValue {
    let v: u128 = rand::random();
    // 32 hex digits are always a valid header value.
    HeaderValue::from_str(&format!("{v:032x}")).unwrap_or(HeaderValue::from_static("0"))
}

/// Keeps a client-supplied request id when it is short and printable, so
/// that ids propagate through chains of proxies; otherwise makes one.
fn request_id(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    match headers.get(name) {
        Some(v)
            if !v.is_empty()
                && v.len() <= 128
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) =>
        {
            v.clone()
        }
        _ => new_request_id(),
    }
}

/// The response spooky sends when it cannot get one from a backend.
pub fn error_response(
    status: StatusCode,
    detail: &str,
    request_id: &HeaderValue,
    id_header: &HeaderName,
) -> Response<ProxyBody> {
    let id = request_id.to_str().unwrap_or("-");
    let reason = status.canonical_reason().unwrap_or("");
    let text = format!("{} {reason}: {detail}\nrequest-id: {id}\n", status.as_u16());
    let mut resp = Response::new(body::full(text.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    h.insert(id_header.clone(), request_id.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn append_via(headers: &mut HeaderMap, version: &str) {
    let prev = headers.get(header::VIA).and_then(|v| v.to_str().ok());
    // Most messages arrive without `via`: their value is a constant, not
    // built per request.
    let own = match version {
        "3" => Some("3 spooky"),
        "2" => Some("2 spooky"),
        "1.1" => Some("1.1 spooky"),
        "1.0" => Some("1.0 spooky"),
        _ => None,
    };
    let value = match (prev, own) {
        (None, Some(own)) => HeaderValue::from_static(own),
        (prev, _) => {
            let joined = match prev {
                Some(p) => format!("{p}, {version} spooky"),
                None => format!("{version} spooky"),
            };
            let Ok(v) = HeaderValue::from_str(&joined) else {
                return;
            };
            v
        }
    };
    headers.insert(header::VIA, value);
}

/// Appends the client to `x-forwarded-for` and to the standard
/// `forwarded` header (RFC 7239). `peer` is the client's address when this
/// request arrived: after a connection migration, the new one.
fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr, proto: &str) {
    let ip = peer.ip().to_canonical();
    let node = match ip {
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        v4 => v4.to_string(),
    };
    let element = format!("for={node};proto={proto}");
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {element}"),
        None => element,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    let ip = ip.to_string();
    let value = match headers
        .get(HeaderName::from_static("x-forwarded-for"))
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
}

impl Proxy {
    /// The answer to a request that failed validation: 400 with the reason
    /// and a request id, counted in [`validate::MALFORMED_REQUESTS`] and
    /// access-logged like any local answer. Nothing reaches a backend.
    pub fn reject_malformed(
        &self,
        parts: &http::request::Parts,
        down: Downstream,
        violation: &Violation,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        validate::MALFORMED_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(peer = %down.peer, protocol = down.via_version, %violation, "malformed request rejected");
        let id_header = &self.config.request_id_header;
        let rid = request_id(&parts.headers, id_header);
        let resp = error_response(
            StatusCode::BAD_REQUEST,
            &format!("malformed request: {violation}"),
            &rid,
            id_header,
        );
        self.finish(
            resp,
            Logged::of(parts),
            &down,
            &rid,
            Served::local(None, None),
            started,
        )
    }

    /// The checks before routing: header count, early data (RFC 8470) and
    /// the client's rate limit. `Some` is the response that refuses the
    /// request.
    fn refusal(
        &self,
        parts: &mut http::request::Parts,
        down: &Downstream,
        rid: &HeaderValue,
        now: Instant,
    ) -> Option<Response<ProxyBody>> {
        let id_header = &self.config.request_id_header;
        let max_headers = self.config.limits.max_request_headers;
        if parts.headers.len() > max_headers {
            let detail = format!(
                "{} header fields; at most {max_headers} are allowed",
                parts.headers.len()
            );
            let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            return Some(error_response(status, &detail, rid, id_header));
        }
        if down.early_data {
            // Early data can be replayed by an attacker, so only methods
            // that are safe to repeat go through; the client retries the
            // others after the handshake.
            if !matches!(
                parts.method,
                http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
            ) {
                let detail =
                    "this method is not accepted in 0-RTT early data; retry after the handshake";
                return Some(error_response(
                    StatusCode::TOO_EARLY,
                    detail,
                    rid,
                    id_header,
                ));
            }
            parts.headers.insert(
                HeaderName::from_static("early-data"),
                HeaderValue::from_static("1"),
            );
        }
        let client_ip = down.peer.ip().to_canonical();
        self.limits
            .check_client(client_ip, now)
            .err()
            .map(|limited| too_many_requests(&limited, rid, id_header))
    }

    /// Serves one request end to end. Never fails: every error becomes a
    /// response (the body may still fail later, which resets the stream).
    pub async fn handle(&self, req: Request<ProxyBody>, down: Downstream) -> Response<ProxyBody> {
        let started = Instant::now();
        let cfg = &self.config;
        let id_header = &cfg.request_id_header;
        let (mut parts, body) = req.into_parts();
        let rid = request_id(&parts.headers, id_header);
        if let Some(refused) = self.refusal(&mut parts, &down, &rid, started) {
            return self.finish(
                refused,
                Logged::of(&parts),
                &down,
                &rid,
                Served::local(None, None),
                started,
            );
        }

        // Route.
        let host = routing::request_host(&parts.uri, &parts.headers);
        let path = parts.uri.path().to_owned();
        let Some((route_idx, route)) = routing::find(
            &cfg.routes,
            |r| &r.matcher,
            host.as_deref(),
            &path,
            &parts.headers,
        ) else {
            return self.finish(
                error_response(
                    StatusCode::NOT_FOUND,
                    "no route matches this request",
                    &rid,
                    id_header,
                ),
                Logged::of(&parts),
                &down,
                &rid,
                Served::local(None, None),
                started,
            );
        };
        let upstream = &cfg.upstreams[route.upstream];
        if let Err(limited) = self.limits.check_route(route_idx, started) {
            return self.finish(
                too_many_requests(&limited, &rid, id_header),
                Logged::of(&parts),
                &down,
                &rid,
                Served::local(Some((route_idx, &route.name)), Some(&upstream.name)),
                started,
            );
        }

        // Limits.
        let mut body = body;
        if let Some(limit) = cfg.limits.max_body_bytes {
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return self.finish(
                    error_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("request body exceeds {limit} bytes"),
                        &rid,
                        id_header,
                    ),
                    Logged::of(&parts),
                    &down,
                    &rid,
                    Served::local(Some((route_idx, &route.name)), Some(&upstream.name)),
                    started,
                );
            }
            body = body::boxed(Limited::new(body, limit));
        }

        // Upstream request headers.
        let h = &mut parts.headers;
        strip_hop_by_hop(h, true);
        append_forwarded_for(h, down.peer, down.scheme);
        h.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(down.scheme),
        );
        append_via(h, down.via_version);
        h.insert(id_header.clone(), rid.clone());
        // HTTP/3 and HTTP/2 carry the host in `:authority`; make sure the
        // URI has one, from `host` when the client sent HTTP/1.1.
        if parts.uri.authority().is_none()
            && let Some(host) = parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
        {
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            if let Ok(uri) = http::Uri::builder()
                .scheme("https")
                .authority(host)
                .path_and_query(pq)
                .build()
            {
                parts.uri = uri;
            }
        }
        // From here the authority lives in the URI; each upstream protocol
        // writes it its own way (`host` for HTTP/1.1, `:authority` else).
        if parts.uri.authority().is_some() {
            parts.headers.remove(header::HOST);
        }

        // What the access log needs; the request itself moves on.
        let logged = (parts.method.clone(), parts.uri.clone());
        let req = Request::from_parts(parts, body);
        let client_ip = down.peer.ip().to_canonical();
        let result = self.upstreams.forward(route.upstream, req, client_ip).await;
        let parts = Logged {
            method: &logged.0,
            uri: &logged.1,
        };
        match result {
            Ok(fwd) => {
                let (mut rparts, rbody) = fwd.response.into_parts();
                // The version is the backend hop's; each listener writes
                // its own (hyper's HTTP/1.1 server rejects any other).
                rparts.version = http::Version::HTTP_11;
                strip_hop_by_hop(&mut rparts.headers, false);
                append_via(&mut rparts.headers, fwd.via_version);
                rparts
                    .headers
                    .entry(id_header.clone())
                    .or_insert_with(|| rid.clone());
                for (name, value) in fwd.extra_headers {
                    rparts.headers.append(name, value);
                }
                let rbody = body::boxed(IdleTimeout::new(rbody, upstream.timeouts.idle));
                self.finish(
                    Response::from_parts(rparts, rbody),
                    parts,
                    &down,
                    &rid,
                    Served {
                        route: Some((route_idx, &route.name)),
                        upstream: Some(&upstream.name),
                        backend: Some(&fwd.backend),
                        tries: fwd.tries,
                        local: false,
                    },
                    started,
                )
            }
            Err(ForwardError {
                status,
                detail,
                retry_after,
                backend,
                tries,
            }) => {
                let mut resp = error_response(status, &detail, &rid, id_header);
                if let Some(secs) = retry_after {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                self.finish(
                    resp,
                    parts,
                    &down,
                    &rid,
                    Served {
                        route: Some((route_idx, &route.name)),
                        upstream: Some(&upstream.name),
                        backend: backend.as_deref(),
                        tries,
                        local: true,
                    },
                    started,
                )
            }
        }
    }

    /// Counts the response and arranges for the request's duration, bytes
    /// and access-log line to be recorded when its body ends.
    fn finish(
        &self,
        resp: Response<ProxyBody>,
        req: Logged<'_>,
        down: &Downstream,
        rid: &HeaderValue,
        served: Served<'_>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        crate::metrics::GLOBAL.record(
            crate::metrics::ClientProtocol::from_via(down.via_version),
            status,
            served.local,
        );
        let metrics = served
            .route
            .and_then(|(i, _)| self.route_metrics.get(i))
            .unwrap_or(&self.unrouted);
        if let Some(c) = metrics.responses.get(crate::metrics::class_index(status)) {
            c.inc();
        }
        let route = served.route.map_or("none", |(_, name)| name);
        // Built only when the line will be written: `log.access` on and
        // the subscriber takes `spooky::access` at this level.
        let logged = self.config.log.access
            && if status >= 500 {
                tracing::enabled!(target: "spooky::access", tracing::Level::WARN)
            } else {
                tracing::enabled!(target: "spooky::access", tracing::Level::INFO)
            };
        let access = logged.then(|| AccessLine {
            client: down.peer,
            method: req.method.to_string(),
            authority: req.uri.authority().map_or("-", |a| a.as_str()).to_owned(),
            path: req.uri.path().to_owned(),
            request_id: rid.to_str().unwrap_or("-").to_owned(),
            route: route.to_owned(),
            upstream: served.upstream.unwrap_or("-").to_owned(),
            backend: served.backend.unwrap_or("-").to_owned(),
            status,
            tries: served.tries,
        });
        let (parts, body) = resp.into_parts();
        let body = body::boxed(Completion {
            inner: body,
            bytes: 0,
            started,
            duration: metrics.duration.clone(),
            access,
        });
        Response::from_parts(parts, body)
    }
}

/// Who served a request, for metrics and the access log.
struct Served<'a> {
    /// Index into `Config::routes`, and the route's name.
    route: Option<(usize, &'a str)>,
    upstream: Option<&'a str>,
    backend: Option<&'a str>,
    tries: u32,
    /// spooky generated the response itself.
    local: bool,
}

impl<'a> Served<'a> {
    fn local(route: Option<(usize, &'a str)>, upstream: Option<&'a str>) -> Self {
        Self {
            route,
            upstream,
            backend: None,
            tries: 0,
            local: true,
        }
    }
}

/// The 429 for a rate-limited request.
fn too_many_requests(
    limited: &RateLimited,
    rid: &HeaderValue,
    id_header: &HeaderName,
) -> Response<ProxyBody> {
    LIVE.rate_limited.with_label_values(&[limited.scope]).inc();
    let secs = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("{} rate limit exceeded", limited.scope),
        rid,
        id_header,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// The access-log fields of a request, written when its body ends.
struct AccessLine {
    client: SocketAddr,
    method: String,
    authority: String,
    path: String,
    request_id: String,
    route: String,
    upstream: String,
    backend: String,
    status: u16,
    tries: u32,
}

/// The response body as the client receives it: counts bytes and, when
/// the body ends (or the client goes away), records the request's
/// duration and writes its access-log line.
struct Completion {
    inner: ProxyBody,
    bytes: u64,
    started: Instant,
    duration: prometheus::Histogram,
    access: Option<AccessLine>,
}

impl Body for Completion {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.bytes += d.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.duration.observe(elapsed.as_secs_f64());
        LIVE.response_bytes.inc_by(self.bytes);
        let Some(a) = self.access.take() else { return };
        let ms = elapsed.as_secs_f64() * 1000.0;
        let complete = self.inner.is_end_stream();
        if a.status >= 500 {
            warn!(target: "spooky::access", client = %a.client, method = %a.method, authority = %a.authority, path = %a.path, status = a.status, route = %a.route, upstream = %a.upstream, backend = %a.backend, bytes = self.bytes, complete, tries = a.tries, ms = format_args!("{ms:.1}"), request_id = %a.request_id, "request");
        } else {
            info!(target: "spooky::access", client = %a.client, method = %a.method, authority = %a.authority, path = %a.path, status = a.status, route = %a.route, upstream = %a.upstream, backend = %a.backend, bytes = self.bytes, complete, tries = a.tries, ms = format_args!("{ms:.1}"), request_id = %a.request_id, "request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        let mut req = h.clone();
        strip_hop_by_hop(&mut req, true);
        assert_eq!(req.len(), 2, "{req:?}");
        assert_eq!(req["te"], "trailers");
        assert_eq!(req["x-keep"], "yes");
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn connection_with_obs_text_still_names_its_options() {
        // Found by fuzz/fuzz_targets/request_headers.rs: the non-ASCII
        // octet made the whole value unreadable as a string, and
        // `x-private` reached the backend.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"keep-alive\xe6, x-private").unwrap(),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, true);
        assert!(!h.contains_key("x-private"), "{h:?}");
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = HeaderMap::new();
        let peer: SocketAddr = "[::ffff:198.18.0.2]:5000".parse().unwrap();
        append_forwarded_for(&mut h, peer, "https");
        assert_eq!(h["x-forwarded-for"], "198.18.0.2");
        assert_eq!(h["forwarded"], "for=198.18.0.2;proto=https");
        append_forwarded_for(&mut h, "[2001:db8::7]:1".parse().unwrap(), "https");
        assert_eq!(h["x-forwarded-for"], "198.18.0.2, 2001:db8::7");
        assert_eq!(
            h["forwarded"],
            "for=198.18.0.2;proto=https, for=\"[2001:db8::7]\";proto=https"
        );
        append_via(&mut h, "3");
        append_via(&mut h, "1.1");
        assert_eq!(h["via"], "3 spooky, 1.1 spooky");
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let name = HeaderName::from_static("x-request-id");
        let mut h = HeaderMap::new();
        let made = request_id(&h, &name);
        assert_eq!(made.len(), 32);
        assert_ne!(made, request_id(&h, &name));
        h.insert(name.clone(), HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h, &name), "abc-123");
        h.insert(name.clone(), HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h, &name).len(), 32);
    }

    #[test]
    fn error_responses_carry_status_and_request_id() {
        let rid = HeaderValue::from_static("r1");
        let name = HeaderName::from_static("x-request-id");
        let r = error_response(StatusCode::BAD_GATEWAY, "backend down", &rid, &name);
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["x-request-id"], "r1");
        assert_eq!(r.headers()["content-length"], "45");
    }
}
