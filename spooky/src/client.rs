//! `spooky get`: a small HTTP/3 client (Debian's curl has no HTTP/3). One
//! QUIC connection, any number of requests on it, sequential or
//! concurrent; prints status, headers and body. Also the client the
//! end-to-end tests drive (migration included: [`H3Client::rebind`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use tokio::task::JoinHandle;

use crate::body::ProxyBody;
use crate::tls::{self, Verification};
use crate::upstream::h3::{ExchangeError, exchange};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// How to reach and trust the server.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Accept any certificate.
    pub insecure: bool,
    /// Trust this CA (PEM/DER) instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Connect here instead of resolving the URL's host.
    pub connect_to: Option<SocketAddr>,
    /// Local address to bind (default: unspecified, any port).
    pub bind: Option<SocketAddr>,
    /// Response-headers timeout (default 30 s).
    pub timeout: Option<Duration>,
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL `{0}`: expected https://HOST[:PORT]/PATH")]
    Url(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
}

/// One HTTP/3 connection.
pub struct H3Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    sender: SendRequest,
    authority: String,
    timeout: Duration,
    driver: JoinHandle<()>,
}

impl Drop for H3Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Splits an https URL into (host, port, authority).
pub fn parse_url(url: &str) -> Result<(String, u16, Uri), ClientError> {
    let uri: Uri = url.parse().map_err(|_| ClientError::Url(url.to_owned()))?;
    if uri.scheme_str() != Some("https") {
        return Err(ClientError::Url(url.to_owned()));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| ClientError::Url(url.to_owned()))?;
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, auth.port_u16().unwrap_or(443), uri))
}

impl H3Client {
    /// Connects to the server of `url`.
    pub async fn connect(url: &str, opts: &ClientOptions) -> Result<Self, ClientError> {
        let (host, port, uri) = parse_url(url)?;
        let addr = match opts.connect_to {
            Some(a) => a,
            None => (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|_| ClientError::Resolve(host.clone()))?
                .next()
                .ok_or_else(|| ClientError::Resolve(host.clone()))?,
        };
        let verification = if opts.insecure {
            Verification::InsecureSkipVerify
        } else if let Some(ca) = &opts.ca {
            Verification::CaFile(ca.clone())
        } else {
            Verification::SystemRoots
        };
        let crypto = tls::quic_client_config(&verification, &[tls::ALPN_H3], None)?;
        let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        cc.transport_config(Arc::new(transport));
        let bind = opts.bind.unwrap_or(if addr.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        });
        let endpoint = quinn::Endpoint::client(bind)?;
        let conn = endpoint
            .connect_with(cc, addr, &host)
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = driver.wait_idle().await;
        });
        let authority = uri
            .authority()
            .map_or_else(|| host.clone(), |a| a.as_str().to_owned());
        Ok(Self {
            endpoint,
            conn,
            sender,
            authority,
            timeout: opts.timeout.unwrap_or(Duration::from_secs(30)),
            driver,
        })
    }

    /// Sends a request (relative URIs get this connection's authority)
    /// and returns the response with a streaming body.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, ClientError> {
        let (mut parts, body) = req.into_parts();
        if parts.uri.authority().is_none() {
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            parts.uri = Uri::builder()
                .scheme("https")
                .authority(self.authority.as_str())
                .path_and_query(pq)
                .build()
                .map_err(|e| ClientError::Request(e.to_string()))?;
        }
        let mut sender = self.sender.clone();
        let stream = sender
            .send_request(Request::from_parts(parts, ()))
            .await
            .map_err(|e| ClientError::Request(e.to_string()))?;
        exchange(stream, body, None, self.timeout)
            .await
            .map_err(|e| match e {
                ExchangeError::Timeout(t) => {
                    ClientError::Request(format!("no response within {t:?}"))
                }
                ExchangeError::Stream(e) => ClientError::Request(e.to_string()),
                ExchangeError::ClientBody(fault) => ClientError::Request(fault.to_string()),
                ExchangeError::BodyAborted(r) => ClientError::Request(r),
            })
    }

    /// GET `path` and collect the whole body.
    pub async fn get(&self, path: &str) -> Result<(Response<()>, Bytes), ClientError> {
        let req = Request::get(path)
            .body(crate::body::empty())
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let resp = self.send(req).await?;
        let (parts, body) = resp.into_parts();
        use http_body_util::BodyExt;
        let bytes = body
            .collect()
            .await
            .map_err(|e| ClientError::Request(e.to_string()))?
            .to_bytes();
        Ok((Response::from_parts(parts, ()), bytes))
    }

    /// Moves the connection to a new local socket (a new port): what a
    /// phone does when it changes network, or a NAT when it rebinds.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> Result<(), ClientError> {
        self.endpoint.rebind(socket).map_err(ClientError::Io)
    }

    /// The local address the connection currently uses.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        self.endpoint.local_addr().map_err(ClientError::Io)
    }

    /// The underlying QUIC connection (stats, close reason).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection cleanly.
    pub async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0x100), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
