//! Pooled HTTP/3 to backends: one quinn client endpoint per worker,
//! persistent multiplexed QUIC connections per backend, a stream budget per
//! connection (another connection opens when all are full), reconnection
//! with exponential backoff, and reaping of idle connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::body::{self, ClientBodyFault, H3Body, H3SendHalf, ProxyBody, SendBodyError};
use crate::config::{BackendAddr, file::PoolConfig};

use super::error::UpstreamError;

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// Settings of one backend's pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub pool: PoolConfig,
    pub connect_timeout: Duration,
    pub max_header_bytes: u64,
    /// The backend's open-connection gauge (worker pools only).
    pub open: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Send HTTP/3 GREASE (`upstreams.NAME.http3.grease`). h3 sends it by
    /// default; nginx 1.28 fails requests that carry the reserved frame.
    pub grease: bool,
}

/// First delay after a failed connect; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest delay between connect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One live QUIC + HTTP/3 connection to a backend.
struct PooledConn {
    id: u64,
    quic: quinn::Connection,
    sender: SendRequest,
    in_flight: AtomicU32,
    /// The h3 driver ended: the connection is gone.
    closed: Arc<AtomicBool>,
    /// The backend sent GOAWAY (or refused a stream): no new requests.
    draining: AtomicBool,
    last_used: Mutex<Instant>,
    _open: Option<super::open::OpenConnection>,
}

impl PooledConn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && self.quic.close_reason().is_none()
    }
}

/// Holds a request slot on a connection; released when the last clone
/// (request-body pump and response body share it) drops.
struct StreamSlot {
    conn: Arc<PooledConn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Ok(mut t) = self.conn.last_used.lock() {
            *t = Instant::now();
        }
    }
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

/// The pool of connections to one backend, owned by one worker.
pub struct BackendPool {
    label: String,
    addr: BackendAddr,
    server_name: String,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    settings: PoolSettings,
    conns: Mutex<Vec<Arc<PooledConn>>>,
    connect_lock: tokio::sync::Mutex<()>,
    backoff: Mutex<Backoff>,
    next_id: AtomicU32,
}

impl BackendPool {
    /// A pool for the backend `label` at `addr`, verified as `server_name`.
    pub fn new(
        label: String,
        addr: BackendAddr,
        server_name: String,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        settings: PoolSettings,
    ) -> Self {
        Self {
            label,
            addr,
            server_name,
            endpoint,
            client_config,
            settings,
            conns: Mutex::new(Vec::new()),
            connect_lock: tokio::sync::Mutex::new(()),
            backoff: Mutex::new(Backoff::default()),
            next_id: AtomicU32::new(0),
        }
    }

    /// Sends `req` and returns the response with a streaming body. The
    /// request body is streamed by a task of its own. When the request
    /// never left spooky (no connection, stream refused), it comes back
    /// with the error so that it can be retried elsewhere.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, (UpstreamError, Option<Request<ProxyBody>>)> {
        let (parts, body) = req.into_parts();
        // A GOAWAY can race with picking a connection; the request did not
        // leave us yet, so try another connection (a few times at most).
        let mut attempts = 0;
        let (slot, stream) = loop {
            attempts += 1;
            let slot = match self.acquire().await {
                Ok(s) => s,
                Err(e) => return Err((e, Some(Request::from_parts(parts, body)))),
            };
            let mut sender = slot.conn.sender.clone();
            let head = Request::from_parts(parts.clone(), ());
            match sender.send_request(head).await {
                Ok(stream) => break (slot, stream),
                Err(e) => {
                    slot.conn.draining.store(true, Ordering::Release);
                    let reason = e.to_string();
                    if attempts >= 3 {
                        let err = UpstreamError::Refused {
                            backend: self.label.clone(),
                            reason,
                        };
                        return Err((err, Some(Request::from_parts(parts, body))));
                    }
                    debug!(backend = %self.label, %reason, "connection refused a new stream; trying another");
                }
            }
        };
        let conn = slot.conn.clone();
        let slot: Arc<dyn Send + Sync> = Arc::new(slot);
        let result = exchange(stream, body, Some(slot), timeout).await;
        result.map_err(|e| {
            let err = match e {
                ExchangeError::Timeout(after) => UpstreamError::Timeout {
                    backend: self.label.clone(),
                    after,
                },
                ExchangeError::Stream(e) => self.classify_stream_error(&conn, e),
                ExchangeError::ClientBody(fault) => UpstreamError::ClientBody(fault),
                ExchangeError::BodyAborted(reason) => UpstreamError::ClientAborted(reason),
            };
            (err, None)
        })
    }

    fn classify_stream_error(&self, conn: &PooledConn, e: h3::error::StreamError) -> UpstreamError {
        use h3::error::{Code, StreamError};
        let reason = e.to_string();
        let backend = self.label.clone();
        match e {
            StreamError::RemoteTerminate { code, .. } if code == Code::H3_REQUEST_REJECTED => {
                UpstreamError::Refused { backend, reason }
            }
            StreamError::RemoteClosing { .. } => {
                conn.draining.store(true, Ordering::Release);
                UpstreamError::Refused { backend, reason }
            }
            _ => UpstreamError::Reset { backend, reason },
        }
    }

    /// A connection with a free stream slot: the least loaded live one, a
    /// new one when all are full and the pool may grow, else the least
    /// loaded (QUIC stream credit then queues the request).
    async fn acquire(&self) -> Result<StreamSlot, UpstreamError> {
        if let Some(slot) = self.pick(false) {
            return Ok(slot);
        }
        let _guard = self.connect_lock.lock().await;
        // Someone else may have connected while we waited.
        if let Some(slot) = self.pick(false) {
            return Ok(slot);
        }
        match self.connect().await {
            Ok(conn) => Ok(self.take_slot(conn)),
            Err(e) => {
                // At the connection cap or failing: fall back to an existing
                // connection rather than failing the request.
                self.pick(true).ok_or(e)
            }
        }
    }

    fn pick(&self, over_budget: bool) -> Option<StreamSlot> {
        let mut conns = self.conns.lock().ok()?;
        conns.retain(|c| {
            let keep = c.usable() || c.in_flight.load(Ordering::Acquire) > 0;
            if !keep {
                debug!(backend = %self.label, conn = c.id, "dropping closed connection");
            }
            keep
        });
        let max = self.settings.pool.max_streams_per_connection;
        let best = conns
            .iter()
            .filter(|c| c.usable())
            .min_by_key(|c| c.in_flight.load(Ordering::Acquire))?
            .clone();
        let load = best.in_flight.load(Ordering::Acquire);
        let can_grow = conns.iter().filter(|c| c.usable()).count()
            < self.settings.pool.max_connections_per_backend as usize;
        if load < max || (over_budget || !can_grow) {
            drop(conns);
            return Some(self.take_slot(best));
        }
        None
    }

    fn take_slot(&self, conn: Arc<PooledConn>) -> StreamSlot {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        StreamSlot { conn }
    }

    async fn connect(&self) -> Result<Arc<PooledConn>, UpstreamError> {
        if let Ok(b) = self.backoff.lock()
            && let Some(at) = b.retry_at
        {
            let now = Instant::now();
            if at > now {
                return Err(UpstreamError::Backoff {
                    backend: self.label.clone(),
                    remaining: at - now,
                });
            }
        }
        let result = self.establish().await;
        if let Ok(mut b) = self.backoff.lock() {
            match &result {
                Ok(_) => *b = Backoff::default(),
                Err(e) => {
                    b.failures = b.failures.saturating_add(1);
                    let exp = BACKOFF_BASE.saturating_mul(1u32 << (b.failures - 1).min(16));
                    let delay = exp.min(BACKOFF_MAX);
                    // Jitter (50-100 %) so that workers do not reconnect in step.
                    let delay = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                    b.retry_at = Some(Instant::now() + delay);
                    warn!(backend = %self.label, error = %e, retry_in = ?delay, "backend connect failed");
                }
            }
        }
        result
    }

    async fn establish(&self) -> Result<Arc<PooledConn>, UpstreamError> {
        let addr = self.resolve().await?;
        let timeout = self.settings.connect_timeout;
        let fut = async {
            let connecting = self
                .endpoint
                .connect_with(self.client_config.clone(), addr, &self.server_name)
                .map_err(|e| self.connect_error(e.to_string()))?;
            let quic = connecting
                .await
                .map_err(|e| self.connect_error(e.to_string()))?;
            let (driver, sender) = h3::client::builder()
                .max_field_section_size(self.settings.max_header_bytes)
                .send_grease(self.settings.grease)
                .build::<_, _, Bytes>(h3_quinn::Connection::new(quic.clone()))
                .await
                .map_err(|e| self.connect_error(format!("HTTP/3 setup: {e}")))?;
            Ok::<_, UpstreamError>((quic, driver, sender))
        };
        let (quic, mut driver, sender) = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    backend: self.label.clone(),
                    after: timeout,
                });
            }
        };
        let closed = Arc::new(AtomicBool::new(false));
        let id = u64::from(self.next_id.fetch_add(1, Ordering::Relaxed));
        let conn = Arc::new(PooledConn {
            id,
            quic,
            sender,
            in_flight: AtomicU32::new(0),
            closed: closed.clone(),
            draining: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
            _open: self
                .settings
                .open
                .as_ref()
                .map(super::open::OpenConnection::new),
        });
        let label = self.label.clone();
        tokio::spawn(async move {
            let err = driver.wait_idle().await;
            closed.store(true, Ordering::Release);
            if err.is_h3_no_error() {
                debug!(backend = %label, conn = id, "backend connection closed");
            } else {
                info!(backend = %label, conn = id, error = %err, "backend connection lost");
            }
        });
        debug!(backend = %self.label, conn = id, %addr, "backend connection established");
        if let Ok(mut conns) = self.conns.lock() {
            conns.push(conn.clone());
        }
        Ok(conn)
    }

    fn connect_error(&self, reason: String) -> UpstreamError {
        UpstreamError::Connect {
            backend: self.label.clone(),
            reason,
        }
    }

    async fn resolve(&self) -> Result<SocketAddr, UpstreamError> {
        if let Some(sa) = self.addr.socket_addr() {
            return Ok(sa);
        }
        let host = self.addr.host.as_str();
        let mut addrs = tokio::net::lookup_host((host, self.addr.port))
            .await
            .map_err(|e| UpstreamError::Resolve {
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
        addrs.next().ok_or_else(|| UpstreamError::Resolve {
            host: host.to_owned(),
            reason: "no addresses".into(),
        })
    }

    /// Closes connections idle for longer than the pool's idle timeout and
    /// forgets dead ones. Called periodically by the worker.
    pub fn reap(&self, now: Instant) {
        let idle = Duration::from_millis(self.settings.pool.idle_timeout_ms);
        let Ok(mut conns) = self.conns.lock() else {
            return;
        };
        conns.retain(|c| {
            let busy = c.in_flight.load(Ordering::Acquire) > 0;
            if busy {
                return true;
            }
            if !c.usable() {
                return false;
            }
            let last = c.last_used.lock().map(|t| *t).unwrap_or(now);
            if now.saturating_duration_since(last) >= idle {
                debug!(backend = %self.label, conn = c.id, "closing idle backend connection");
                c.quic.close(quinn::VarInt::from_u32(0x100), b"idle");
                return false;
            }
            true
        });
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self) {
        if let Ok(mut conns) = self.conns.lock() {
            for c in conns.drain(..) {
                c.quic.close(quinn::VarInt::from_u32(0x100), b"shutdown");
            }
        }
    }
}

/// How one request/response exchange on an open stream failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// No response headers within the timeout.
    Timeout(Duration),
    /// The stream (or its connection) failed before response headers.
    Stream(h3::error::StreamError),
    /// The client's request body was at fault (the stream was reset).
    ClientBody(ClientBodyFault),
    /// The request body's source failed otherwise (the stream was reset).
    BodyAborted(String),
}

/// Runs one exchange on a freshly opened request stream: the request body
/// streams from a task of its own (so a large upload and an early response
/// proceed together) while this waits for the response headers. The
/// response body streams from the stream's receive half; `guard` lives
/// until both the upload and the response body are done.
pub async fn exchange(
    stream: h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
    body: ProxyBody,
    guard: Option<Arc<dyn Send + Sync>>,
    timeout: Duration,
) -> Result<Response<ProxyBody>, ExchangeError> {
    let (send_half, mut recv_half) = stream.split();
    let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel::<ExchangeError>();
    let pump_guard = guard.clone();
    tokio::spawn(async move {
        let _guard = pump_guard;
        let mut half = H3SendHalf::Client(send_half);
        match body::send_h3(body, &mut half).await {
            Ok(_) => {}
            Err(SendBodyError::Source(e)) => {
                let err = match ClientBodyFault::find(e.as_ref()) {
                    Some(fault) => ExchangeError::ClientBody(fault),
                    None => ExchangeError::BodyAborted(e.to_string()),
                };
                debug!(error = ?err, "request body failed; upstream stream reset");
                let _ = failed_tx.send(err);
            }
            // The peer stopped reading (it may already have answered).
            Err(SendBodyError::Peer(e)) => {
                debug!(error = %e, "peer stopped reading the request body")
            }
        }
    });
    let waited = tokio::select! {
        biased;
        Ok(err) = &mut failed_rx => Err(err),
        r = tokio::time::timeout(timeout, recv_half.recv_response()) => match r {
            Err(_) => Err(ExchangeError::Timeout(timeout)),
            Ok(Err(e)) => Err(ExchangeError::Stream(e)),
            Ok(Ok(head)) => Ok(head),
        },
    };
    let head = match waited {
        Ok(head) => head,
        // A failed request body explains a reset better than the reset.
        Err(err) => return Err(failed_rx.try_recv().unwrap_or(err)),
    };
    let content_length = head
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let guard = guard.map(|g| Box::new(g) as Box<dyn Send>);
    let body = H3Body::new(recv_half, content_length, guard);
    let (parts, ()) = head.into_parts();
    Ok(Response::from_parts(parts, body::boxed(body)))
}

/// The transport settings spooky uses towards backends: keep-alives so the
/// pool, not the backend's idle timer, decides when a connection ends.
pub fn client_transport(idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let idle_timeout = idle + Duration::from_secs(10);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.keep_alive_interval(Some(Duration::from_secs(5).min(idle)));
    t
}

/// The client endpoint of one worker: dual-stack when the host allows it.
pub fn client_endpoint() -> std::io::Result<quinn::Endpoint> {
    match quinn::Endpoint::client((std::net::Ipv6Addr::UNSPECIFIED, 0).into()) {
        Ok(e) => Ok(e),
        Err(_) => quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into()),
    }
}
