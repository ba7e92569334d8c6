//! `spooky demo-backend`: a small HTTP/3 server that answers with its own
//! id, for `cargo xtask run`, the README and the end-to-end tests. It also
//! serves what tests need: sized downloads, upload sinks, echo, trailers,
//! chosen statuses and delays.
//!
//! Routes: `/` (hello), `/health`, `/bytes/N`, `/sink` (counts the body),
//! `/echo` (streams the body back, with its trailers), `/trailers`,
//! `/status/CODE`, `/delay/MS`, `/headers` (request headers as text),
//! `/barrier/N` (answers only once N requests wait at the barrier at the
//! same time: proof of concurrency that needs no clock).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tracing::{debug, info};

use crate::tls;

/// Options of a demo backend.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub id: String,
    pub listen: SocketAddr,
    /// Certificate and key; `None` generates a self-signed one in memory.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Added before every response (simulates a slow backend).
    pub delay: Duration,
}

/// Errors starting a demo backend.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

type Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Starts the backend on the current tokio runtime; returns the bound
/// address and runs until the endpoint closes.
pub async fn serve(opts: DemoOptions) -> Result<(), DemoError> {
    let endpoint = bind(&opts)?;
    let addr = endpoint.local_addr().map_err(|source| DemoError::Bind {
        addr: opts.listen,
        source,
    })?;
    info!(id = %opts.id, %addr, "demo backend listening (HTTP/3)");
    // Machine-readable for scripts and tests.
    println!("demo-backend {} listening on {addr}", opts.id);
    let opts = Arc::new(opts);
    while let Some(incoming) = endpoint.accept().await {
        let opts = opts.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok(mut h3) =
                h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await
            else {
                return;
            };
            while let Ok(Some(resolver)) = h3.accept().await {
                let opts = opts.clone();
                tokio::spawn(async move {
                    if let Ok((req, stream)) = resolver.resolve_request().await
                        && let Err(e) = handle(req, stream, &opts).await
                    {
                        debug!(error = %e, "demo request failed");
                    }
                });
            }
        });
    }
    Ok(())
}

fn bind(opts: &DemoOptions) -> Result<quinn::Endpoint, DemoError> {
    let (cert, key) = match &opts.tls {
        Some((c, k)) => (c.clone(), k.clone()),
        None => {
            let dir = std::env::temp_dir().join(format!("spooky-demo-{}", std::process::id()));
            let (c, k, _) = tls::ensure_self_signed(&dir)?;
            (c, k)
        }
    };
    let crypto = tls::quic_server_config(&cert, &key)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1000u32.into());
    sc.transport_config(Arc::new(t));
    quinn::Endpoint::server(sc, opts.listen).map_err(|source| DemoError::Bind {
        addr: opts.listen,
        source,
    })
}

fn response(status: StatusCode, id: &str) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-backend-id", v);
    }
    r
}

async fn send_text(
    mut stream: Stream,
    status: StatusCode,
    id: &str,
    text: String,
) -> Result<(), h3::error::StreamError> {
    let mut r = response(status, id);
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    stream.send_response(r).await?;
    stream.send_data(Bytes::from(text)).await?;
    stream.finish().await
}

/// The process-wide barrier for `/barrier/N`.
fn barrier(n: usize) -> Arc<tokio::sync::Barrier> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static BARRIERS: OnceLock<Mutex<HashMap<usize, Arc<tokio::sync::Barrier>>>> = OnceLock::new();
    let map = BARRIERS.get_or_init(Default::default);
    let mut map = match map.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    map.entry(n)
        .or_insert_with(|| Arc::new(tokio::sync::Barrier::new(n)))
        .clone()
}

/// FNV-1a 64 over a stream of chunks: a cheap checksum tests can compare.
pub fn fnv64(state: u64, data: &[u8]) -> u64 {
    data.iter()
        .fold(state, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// FNV-1a 64 initial state.
pub const FNV64_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Byte `i` of every generated download: tests recompute it to check
/// bodies byte for byte.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

async fn handle(
    req: Request<()>,
    mut stream: Stream,
    opts: &DemoOptions,
) -> Result<(), h3::error::StreamError> {
    if !opts.delay.is_zero() {
        tokio::time::sleep(opts.delay).await;
    }
    let id = opts.id.as_str();
    let path = req.uri().path().to_owned();
    let mut segs = path.trim_start_matches('/').splitn(2, '/');
    let (first, rest) = (segs.next().unwrap_or(""), segs.next().unwrap_or(""));
    match first {
        "" => {
            let text = format!("hello from {id}\n");
            send_text(stream, StatusCode::OK, id, text).await
        }
        "health" => send_text(stream, StatusCode::OK, id, "ok\n".into()).await,
        "status" => {
            let code = rest
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            send_text(
                stream,
                code,
                id,
                format!("status {} from {id}\n", code.as_u16()),
            )
            .await
        }
        "delay" => {
            let ms = rest.parse::<u64>().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            send_text(
                stream,
                StatusCode::OK,
                id,
                format!("delayed {ms} ms by {id}\n"),
            )
            .await
        }
        "barrier" => {
            let n = rest.parse::<usize>().unwrap_or(1).clamp(1, 1024);
            let barrier = barrier(n);
            match tokio::time::timeout(Duration::from_secs(20), barrier.wait()).await {
                Ok(_) => {
                    send_text(stream, StatusCode::OK, id, format!("barrier {n} passed\n")).await
                }
                Err(_) => {
                    let text = format!("barrier {n}: fewer than {n} requests arrived together\n");
                    send_text(stream, StatusCode::INTERNAL_SERVER_ERROR, id, text).await
                }
            }
        }
        "headers" => {
            let mut text = format!("{} {}\n", req.method(), req.uri());
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("<binary>")));
            }
            send_text(stream, StatusCode::OK, id, text).await
        }
        "bytes" => {
            let n = rest.parse::<u64>().unwrap_or(0);
            let mut r = response(StatusCode::OK, id);
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
            stream.send_response(r).await?;
            let mut sent = 0u64;
            while sent < n {
                let len = (n - sent).min(64 * 1024);
                let chunk: Vec<u8> = (sent..sent + len).map(pattern_byte).collect();
                stream.send_data(Bytes::from(chunk)).await?;
                sent += len;
            }
            stream.finish().await
        }
        "sink" => {
            let (mut n, mut h) = (0u64, FNV64_INIT);
            while let Some(mut chunk) = stream.recv_data().await? {
                while chunk.has_remaining() {
                    let c = chunk.chunk();
                    h = fnv64(h, c);
                    n += c.len() as u64;
                    let len = c.len();
                    chunk.advance(len);
                }
            }
            let trailers = stream.recv_trailers().await?;
            let mut text = format!("received {n} bytes fnv64 {h:016x}\n");
            if let Some(t) = trailers {
                for (k, v) in &t {
                    text.push_str(&format!("trailer {k}: {}\n", v.to_str().unwrap_or("")));
                }
            }
            send_text(stream, StatusCode::OK, id, text).await
        }
        "echo" => {
            let mut r = response(StatusCode::OK, id);
            if let Some(ct) = req.headers().get(http::header::CONTENT_TYPE) {
                r.headers_mut()
                    .insert(http::header::CONTENT_TYPE, ct.clone());
            }
            stream.send_response(r).await?;
            while let Some(mut chunk) = stream.recv_data().await? {
                let mut buf = BytesMut::with_capacity(chunk.remaining());
                while chunk.has_remaining() {
                    let c = chunk.chunk();
                    buf.extend_from_slice(c);
                    let len = c.len();
                    chunk.advance(len);
                }
                stream.send_data(buf.freeze()).await?;
            }
            if let Some(t) = stream.recv_trailers().await? {
                stream.send_trailers(t).await?;
            }
            stream.finish().await
        }
        "trailers" => {
            let mut r = response(StatusCode::OK, id);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            stream.send_response(r).await?;
            let body = Bytes::from_static(b"trailers follow\n");
            let sum = fnv64(FNV64_INIT, &body);
            stream.send_data(body).await?;
            let mut t = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&format!("{sum:016x}")) {
                t.insert("x-checksum", v);
            }
            t.insert("grpc-status", HeaderValue::from_static("0"));
            stream.send_trailers(t).await?;
            stream.finish().await
        }
        _ => {
            let text = format!("hello from {id} ({path})\n");
            send_text(stream, StatusCode::OK, id, text).await
        }
    }
}
