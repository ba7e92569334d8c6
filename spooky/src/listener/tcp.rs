//! HTTP/2 and HTTP/1.1 downstream over TLS on TCP, on the same port
//! number as HTTP/3: browsers start here, and the `alt-svc` header on every
//! response tells them HTTP/3 is available. Also the optional plain-HTTP
//! listener that redirects to https.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::lifetime::{self, ConnState, Expiry, Watched};
use super::{Activity, Counted, GaugeGuard};
use crate::body::{self, Http1Framing, IdleTimeout};
use crate::limits::{ConnectionSlot, ConnectionsPerClient};
use crate::metrics::LIVE;
use crate::proxy::{Downstream, ProxyHandle};
use crate::validate::{self, ClientVersion};

/// A TLS handshake that takes longer than this is abandoned: slow-loris
/// protection for the one phase before HTTP's own timeouts apply.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a client of the plain-HTTP redirect to send a complete
/// request head (the TLS listener uses `limits.request_header_timeout_ms`).
const REDIRECT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds `n` TCP listeners on `addr` with `SO_REUSEPORT`, one per worker,
/// so the kernel spreads connections over the workers.
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<StdTcpListener>> {
    (0..n)
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                s.set_only_v6(false)?;
            }
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_tcp_nodelay(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            Ok(StdTcpListener::from(s))
        })
        .collect()
}

/// The `alt-svc` value advertising HTTP/3 on `port`.
pub fn alt_svc(port: u16, max_age_s: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("h3=\":{port}\"; ma={max_age_s}"))
        .unwrap_or(HeaderValue::from_static("clear"))
}

/// Accepts TLS connections until the worker drains. Each connection
/// uses the TLS config and limits of the generation current when it
/// arrives, counts against `connections` (per client, process-wide) and
/// advertises HTTP/3 with `alt_svc`.
pub async fn serve(
    listener: StdTcpListener,
    connections: Arc<ConnectionsPerClient>,
    alt_svc: HeaderValue,
    proxy: ProxyHandle,
    activity: Arc<Activity>,
    mut draining: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the TCP listener");
            return;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let current = proxy.load();
                    let Some(tls) = current.tcp_tls.clone() else { continue };
                    if !current.limits.check_handshake(std::time::Instant::now()) {
                        LIVE.tcp_refused.with_label_values(&["rate"]).inc();
                        continue;
                    }
                    let Some(slot) = connections.try_open(peer.ip()) else {
                        LIVE.tcp_refused.with_label_values(&["per_client"]).inc();
                        continue;
                    };
                    tokio::spawn(serve_connection(
                        stream,
                        peer,
                        slot,
                        TlsAcceptor::from(tls),
                        alt_svc.clone(),
                        proxy.clone(),
                        activity.clone(),
                        draining.clone(),
                    ));
                }
                // Out of file descriptors and the like: back off briefly
                // instead of spinning.
                Err(e) => {
                    debug!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = draining.changed() => {
                if changed.is_err() || *draining.borrow() {
                    break;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    _slot: ConnectionSlot,
    acceptor: TlsAcceptor,
    alt_svc: HeaderValue,
    proxy: ProxyHandle,
    activity: Arc<Activity>,
    mut draining: watch::Receiver<bool>,
) {
    let _conn_guard = Counted::new(&activity.connections);
    let _open = GaugeGuard::new(&LIVE.tcp_connections);
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let current = proxy.load_full();
    let cfg = &current.config;
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let state = ConnState::new(is_h2);
    let timeouts = lifetime::Timeouts {
        idle: cfg.limits.connection_idle_timeout,
        header_read: cfg.limits.request_header_timeout,
    };
    let max_age = cfg.limits.max_connection_age;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's own timer would also run while a keep-alive connection
        // waits for its next request; `lifetime` times both phases apart.
        .header_read_timeout(None)
        .max_buf_size((cfg.limits.max_request_header_bytes as usize).max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.limits.max_concurrent_streams)
        .max_header_list_size(cfg.limits.max_request_header_bytes as u32)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let idle = cfg.timeouts.idle;
    let activity_for_requests = activity.clone();
    let state_for_requests = state.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        // Each request is served by the generation current when it arrives.
        let proxy = proxy.load_full();
        let alt_svc = alt_svc.clone();
        let activity = activity_for_requests.clone();
        let in_flight = state_for_requests.request_started(req.version() == http::Version::HTTP_2);
        async move {
            let _req_guard = Counted::new(&activity.requests);
            let (version, via_version) = match req.version() {
                http::Version::HTTP_2 => (ClientVersion::Http2, "2"),
                http::Version::HTTP_10 => (ClientVersion::Http1, "1.0"),
                _ => (ClientVersion::Http1, "1.1"),
            };
            let (mut parts, incoming) = req.into_parts();
            let down = Downstream {
                peer,
                via_version,
                scheme: "https",
                early_data: false,
            };
            // h2 already rejects most malformed HTTP/2 requests; this
            // covers what it lets through (see `validate`). HTTP/1.1 has
            // its own framing rules, enforced by hyper's parser; `validate`
            // adds the `host` rules hyper does not enforce.
            // The request stays in flight until its response body ends
            // or is dropped (hyper drops it after the last frame).
            let guarded = |resp: Response<body::ProxyBody>| {
                resp.map(|b| body::boxed(body::Guarded::new(b, Box::new(in_flight))))
            };
            match validate::validate(&parts, version) {
                Ok(v) => validate::normalize_content_length(&mut parts.headers, v),
                Err(violation) => {
                    let mut resp = proxy.reject_malformed(&parts, down, &violation);
                    resp.headers_mut().insert(http::header::ALT_SVC, alt_svc);
                    return Ok(guarded(resp));
                }
            }
            let body = if version == ClientVersion::Http1 {
                body::boxed(IdleTimeout::new(Http1Framing::new(incoming), idle))
            } else {
                body::boxed(IdleTimeout::new(incoming, idle))
            };
            let mut resp = proxy.handle(Request::from_parts(parts, body), down).await;
            resp.headers_mut().insert(http::header::ALT_SVC, alt_svc);
            Ok::<_, Infallible>(guarded(resp))
        }
    });
    let io = TokioIo::new(Watched::new(tls, state.clone()));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut goaway = *draining.borrow();
    if goaway {
        conn.as_mut().graceful_shutdown();
    }
    // Far enough away to stand for "never" in a `sleep_until`.
    let never = state.epoch() + Duration::from_secs(100 * 365 * 24 * 3600);
    let old_at = max_age.map_or(never, |age| state.epoch() + age);
    loop {
        let next = state.deadline(&timeouts);
        // Once GOAWAY is out, only the header deadline still matters.
        let next = next.filter(|(_, kind)| !(goaway && *kind == Expiry::Idle));
        let next_at = next.map_or(never, |(at, _)| at);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "TCP connection ended with an error");
                }
                break;
            }
            changed = draining.changed(), if !goaway => {
                if changed.is_err() || *draining.borrow() {
                    goaway = true;
                    // GOAWAY (HTTP/2) or `connection: close` after the
                    // current request (HTTP/1.1).
                    conn.as_mut().graceful_shutdown();
                }
            }
            // A request started or ended, or a head began: recompute.
            () = state.changed() => {}
            () = tokio::time::sleep_until(next_at.into()), if next.is_some() => {
                // The state may have changed since `next` was computed.
                match state.deadline(&timeouts) {
                    Some((at, Expiry::HeaderRead)) if at <= std::time::Instant::now() => {
                        debug!(%peer, "request head not complete in time; closing");
                        break;
                    }
                    Some((at, Expiry::Idle)) if at <= std::time::Instant::now() && !goaway => {
                        debug!(%peer, "connection idle; closing");
                        goaway = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ => {}
                }
            }
            () = tokio::time::sleep_until(old_at.into()), if max_age.is_some() && !goaway => {
                debug!(%peer, "connection reached its maximum age; closing gracefully");
                goaway = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Serves the plain-HTTP redirect: every request gets a 308 to the same
/// host and path over https on `https_port`.
pub async fn serve_redirect(listener: StdTcpListener, https_port: u16) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the redirect listener");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, https_port, "plain-HTTP redirect listening");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(redirect(&req, https_port))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REDIRECT_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The 308 answer for `req` (400 without a usable host).
pub fn redirect<B>(req: &Request<B>, https_port: u16) -> Response<body::ProxyBody> {
    let host = crate::routing::request_host(req.uri(), req.headers());
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Some(host) = host else {
        let mut r = Response::new(body::full("400 Bad Request: no Host header\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let location = if https_port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{https_port}{pq}")
    };
    let mut r = Response::new(body::empty());
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_keeps_host_and_path() {
        let req = Request::get("/a/b?c=1")
            .header("host", "Example.com:80")
            .body(())
            .unwrap();
        let r = redirect(&req, 8443);
        assert_eq!(r.status(), 308);
        assert_eq!(r.headers()["location"], "https://example.com:8443/a/b?c=1");
        assert_eq!(
            redirect(&req, 443).headers()["location"],
            "https://example.com/a/b?c=1"
        );
        let bare = Request::get("/").body(()).unwrap();
        assert_eq!(redirect(&bare, 443).status(), 400);
    }

    #[test]
    fn alt_svc_names_the_port() {
        assert_eq!(alt_svc(9889, 3600), "h3=\":9889\"; ma=3600");
    }
}
