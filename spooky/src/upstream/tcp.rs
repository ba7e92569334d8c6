//! HTTP/1.1 and HTTP/2 to backends over TCP (TLS optional), on hyper: a
//! keep-alive pool for HTTP/1.1, one multiplexed connection for HTTP/2
//! (prior knowledge on plain TCP, ALPN `h2` on TLS). The connector always
//! dials the configured backend address; the request keeps the client's
//! authority (`host` for HTTP/1.1, `:authority` for HTTP/2).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::error::UpstreamError;
use crate::body::{self, ProxyBody};
use crate::config::BackendAddr;

/// Which HTTP the pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpProtocol {
    Http1,
    Http2,
}

/// Settings of one backend's TCP pool.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    pub protocol: TcpProtocol,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_connections: usize,
    pub max_header_bytes: u64,
    /// The backend's open-connection gauge (worker pools only).
    pub open: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// A connection the pool hands to hyper.
pub struct TcpConn {
    io: TcpIo,
    _open: Option<super::open::OpenConnection>,
}

enum TcpIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for TcpConn {
    fn connected(&self) -> Connected {
        match &self.io {
            TcpIo::Plain(_) => Connected::new(),
            TcpIo::Tls(tls) => {
                let (_, session) = tls.inner().get_ref();
                if session.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

macro_rules! delegate {
    ($self:ident, $inner:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            TcpIo::Plain($inner) => {
                let $inner = Pin::new($inner);
                $e
            }
            TcpIo::Tls($inner) => {
                let $inner = Pin::new($inner.as_mut());
                $e
            }
        }
    };
}

impl hyper::rt::Read for TcpConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl hyper::rt::Write for TcpConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            TcpIo::Plain(io) => io.is_write_vectored(),
            TcpIo::Tls(io) => io.is_write_vectored(),
        }
    }
}

/// Why a connection attempt failed (kept distinct so timeouts map to 504).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("TCP connect: {0}")]
    Tcp(io::Error),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("backend did not negotiate h2 by ALPN")]
    NoH2,
}

/// Dials one backend, with TLS when configured.
#[derive(Clone)]
pub struct Connector {
    addr: BackendAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
    require_h2: bool,
    open: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Connector {
    async fn dial(self) -> Result<TcpConn, ConnectError> {
        let target = match self.addr.socket_addr() {
            Some(sa) => sa,
            None => tokio::net::lookup_host((self.addr.host.as_str(), self.addr.port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ConnectError::Resolve(self.addr.host.clone()))?,
        };
        let tcp = TcpStream::connect(target)
            .await
            .map_err(ConnectError::Tcp)?;
        // Requests are small writes that must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let io = match self.tls {
            None => TcpIo::Plain(TokioIo::new(tcp)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(ConnectError::Tls)?;
                if self.require_h2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(ConnectError::NoH2);
                }
                TcpIo::Tls(Box::new(TokioIo::new(tls)))
            }
        };
        Ok(TcpConn {
            io,
            _open: self.open.as_ref().map(super::open::OpenConnection::new),
        })
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TcpConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TcpConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, this.dial()).await {
                Ok(r) => r,
                Err(_) => Err(ConnectError::Timeout(timeout)),
            }
        })
    }
}

/// The pool of one backend, owned by one worker.
pub struct TcpPool {
    label: String,
    client: Client<Connector, ProxyBody>,
    scheme: &'static str,
    backend_authority: String,
    version: Version,
}

impl TcpPool {
    /// A pool for backend `label` at `addr`; `tls` carries the client
    /// config and the name to verify.
    pub fn new(
        label: String,
        addr: BackendAddr,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
        settings: TcpSettings,
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let connector = Connector {
            addr: addr.clone(),
            tls: tls.map(|(cfg, name)| (TlsConnector::from(cfg), name)),
            timeout: settings.connect_timeout,
            require_h2: settings.protocol == TcpProtocol::Http2,
            open: settings.open.clone(),
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_idle_connections)
            // The request may name a virtual host; hyper must not touch it.
            .set_host(false);
        let version = match settings.protocol {
            TcpProtocol::Http1 => {
                b.http1_max_buf_size((settings.max_header_bytes as usize).max(8192) * 4);
                Version::HTTP_11
            }
            TcpProtocol::Http2 => {
                b.http2_only(true)
                    .http2_max_header_list_size(settings.max_header_bytes as u32)
                    .http2_keep_alive_interval(Duration::from_secs(20))
                    .http2_keep_alive_timeout(Duration::from_secs(10))
                    .http2_keep_alive_while_idle(false)
                    // 1 MiB stream / 4 MiB connection windows: like the
                    // QUIC side, enough for fast links, bounded per peer.
                    .http2_initial_stream_window_size(1 << 20)
                    .http2_initial_connection_window_size(4 << 20);
                Version::HTTP_2
            }
        };
        Self {
            label,
            client: b.build(connector),
            scheme,
            backend_authority: addr.to_string(),
            version,
        }
    }

    /// Sends `req`; the response body streams. `timeout` bounds the wait
    /// for response headers.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        // The client's authority, from the URI (HTTP/2, HTTP/3) or `host`.
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| self.backend_authority.clone());
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = Uri::builder()
            .scheme(self.scheme)
            .authority(authority.as_str())
            .path_and_query(pq)
            .build()
            .map_err(|e| UpstreamError::Reset {
                backend: self.label.clone(),
                reason: format!("cannot build the backend request URI: {e}"),
            })?;
        parts.version = self.version;
        match self.version {
            Version::HTTP_11 => {
                if let Ok(v) = http::HeaderValue::from_str(&authority) {
                    parts.headers.insert(http::header::HOST, v);
                }
            }
            // HTTP/2 carries it in :authority; a `host` too would be
            // redundant at best and conflicting at worst.
            _ => {
                parts.headers.remove(http::header::HOST);
            }
        }
        let fut = self.client.request(Request::from_parts(parts, body));
        let resp = match tokio::time::timeout(timeout, fut).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    backend: self.label.clone(),
                    after: timeout,
                });
            }
            Ok(Err(e)) => return Err(self.classify(e)),
            Ok(Ok(resp)) => resp,
        };
        let (parts, incoming) = resp.into_parts();
        // hyper accepts an HTTP/1.1 response framed by both `content-length`
        // and `transfer-encoding` (it decodes the chunks and keeps the
        // `content-length` header). RFC 9112 §6.3 calls such a message a
        // likely smuggling or response-splitting attempt that "ought to be
        // handled as an error"; forwarding it would hand the client a
        // `content-length` that need not match the body. Reject it: the
        // client gets a 502, and dropping `incoming` unread closes the
        // connection instead of returning it to the pool.
        if self.version == Version::HTTP_11
            && parts.headers.contains_key(http::header::TRANSFER_ENCODING)
            && parts.headers.contains_key(http::header::CONTENT_LENGTH)
        {
            return Err(UpstreamError::InvalidResponse {
                backend: self.label.clone(),
                reason: "both content-length and transfer-encoding".into(),
            });
        }
        Ok(Response::from_parts(parts, body::boxed(incoming)))
    }

    fn classify(&self, e: hyper_util::client::legacy::Error) -> UpstreamError {
        let backend = self.label.clone();
        let chain = error_chain(&e);
        if let Some(fault) = body::ClientBodyFault::find(&e) {
            return UpstreamError::ClientBody(fault);
        }
        if e.is_connect() {
            let timed_out = find::<ConnectError>(&e).and_then(|c| match c {
                ConnectError::Timeout(d) => Some(*d),
                _ => None,
            });
            return match timed_out {
                Some(after) => UpstreamError::ConnectTimeout { backend, after },
                None => UpstreamError::Connect {
                    backend,
                    reason: chain,
                },
            };
        }
        if let Some(h2e) = find::<h2::Error>(&e)
            && h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return UpstreamError::Refused {
                backend,
                reason: chain,
            };
        }
        if let Some(he) = find::<hyper::Error>(&e)
            && he.is_user()
        {
            return UpstreamError::ClientAborted(chain);
        }
        UpstreamError::Reset {
            backend,
            reason: chain,
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn find<'e, T: std::error::Error + 'static>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}
