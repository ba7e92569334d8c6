//! The admin listener: plain HTTP/1.1 on a separate (usually loopback)
//! address, serving `/metrics` (Prometheus text format), `/healthz`
//! (liveness) and `/readyz` (ready once every worker listens, 503 while
//! draining).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::body::{self, ProxyBody};
use crate::metrics::{self, Scrape};
use crate::steering::xdp::XdpSteering;
use crate::upstream::SharedUpstreams;

/// What the admin endpoints read.
pub struct AdminState {
    pub upstreams: Arc<SharedUpstreams>,
    pub steering_mode: &'static str,
    pub workers: usize,
    pub xdp: Option<Arc<Mutex<XdpSteering>>>,
    pub started: Instant,
    /// False until every worker listens and again once draining starts.
    pub ready: AtomicBool,
}

/// Binds the admin listener and serves it on the current runtime.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr().unwrap_or(addr), "admin listening (/metrics, /healthz, /readyz)");
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
                    async move { Ok::<_, Infallible>(route(&req, &state)) }
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

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<ProxyBody> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let xdp = state
                .xdp
                .as_ref()
                .and_then(|x| x.lock().ok().and_then(|x| x.counters().ok()));
            let body = metrics::render(&Scrape {
                upstreams: &state.upstreams,
                steering_mode: state.steering_mode,
                workers: state.workers,
                xdp,
                started: state.started,
            });
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
