//! One backend's client, whatever its protocol: HTTP/3 over QUIC
//! ([`super::h3`]) or HTTP/1.1 / HTTP/2 over TCP ([`super::tcp`]). The
//! request path and the health prober talk to backends only through this.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http::{Request, Response};

use super::error::UpstreamError;
use super::h3::{BackendPool, PoolSettings};
use super::tcp::{TcpPool, TcpProtocol, TcpSettings};
use crate::body::ProxyBody;
use crate::config::{self, UpstreamProtocol};

/// How an upstream's backends are reached: the transport-level TLS
/// configuration built once per upstream.
#[derive(Clone)]
pub enum Transport {
    /// HTTP/3: QUIC with TLS 1.3.
    Quic(quinn::ClientConfig),
    /// HTTP/1.1 or HTTP/2 over TCP, TLS when configured.
    Tcp {
        protocol: TcpProtocol,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl Transport {
    /// Builds the transport for `u` (TLS configs, ALPN, client auth).
    pub fn for_upstream(u: &config::Upstream) -> Result<Self, crate::tls::TlsError> {
        let client_auth = u
            .client_auth
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        Ok(match u.protocol {
            UpstreamProtocol::Http3 => {
                let crypto = crate::tls::quic_client_config(
                    &u.verification,
                    &[crate::tls::ALPN_H3],
                    client_auth,
                )?;
                let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
                cc.transport_config(Arc::new(super::h3::client_transport(
                    Duration::from_millis(u.pool.idle_timeout_ms),
                )));
                Transport::Quic(cc)
            }
            UpstreamProtocol::Http1 | UpstreamProtocol::Http2 => {
                let (protocol, alpn): (_, &[&[u8]]) = if u.protocol == UpstreamProtocol::Http2 {
                    (TcpProtocol::Http2, &[b"h2"])
                } else {
                    (TcpProtocol::Http1, &[b"http/1.1"])
                };
                let tls = if u.tls_enabled {
                    Some(Arc::new(crate::tls::client_config(
                        &u.verification,
                        rustls::DEFAULT_VERSIONS,
                        alpn,
                        client_auth,
                    )?))
                } else {
                    None
                };
                Transport::Tcp { protocol, tls }
            }
        })
    }
}

/// A backend's connection pool, per worker (or for the health prober).
pub enum BackendClient {
    H3(BackendPool),
    Tcp(TcpPool),
}

impl BackendClient {
    /// The client for `backend` of upstream `u`; its connections are
    /// counted in `open` when given.
    pub fn new(
        label: String,
        u: &config::Upstream,
        backend: &config::Backend,
        transport: &Transport,
        quic_endpoint: &quinn::Endpoint,
        max_header_bytes: u64,
        open: Option<Arc<AtomicU64>>,
    ) -> Self {
        let server_name = u.server_name(backend);
        match transport {
            Transport::Quic(cc) => BackendClient::H3(BackendPool::new(
                label,
                backend.addr.clone(),
                server_name,
                quic_endpoint.clone(),
                cc.clone(),
                PoolSettings {
                    pool: u.pool.clone(),
                    connect_timeout: u.timeouts.connect,
                    max_header_bytes,
                    open,
                    grease: u.grease,
                },
            )),
            Transport::Tcp { protocol, tls } => {
                // The name was validated with the config; an invalid one
                // can only come from a DNS name that parses but is not a
                // valid SNI, where plain TCP is the only honest fallback
                // and verification would fail loudly anyway.
                let tls = tls.as_ref().and_then(|cfg| {
                    crate::tls::server_name(&server_name).map(|n| (cfg.clone(), n))
                });
                BackendClient::Tcp(TcpPool::new(
                    label,
                    backend.addr.clone(),
                    tls,
                    TcpSettings {
                        protocol: *protocol,
                        connect_timeout: u.timeouts.connect,
                        idle_timeout: Duration::from_millis(u.pool.idle_timeout_ms),
                        // An HTTP/1.1 connection carries one request at a
                        // time, so keep as many idle as the concurrency an
                        // HTTP/2 or HTTP/3 pool of the same settings carries
                        // (8 × 100 by default); with only 8, busy workers
                        // reconnect for most requests (2× CPU per request
                        // measured). Idle ones are reaped after
                        // `pool.idle_timeout_ms`.
                        max_idle_connections: match protocol {
                            TcpProtocol::Http1 => {
                                u.pool.max_connections_per_backend as usize
                                    * u.pool.max_streams_per_connection as usize
                            }
                            TcpProtocol::Http2 => u.pool.max_connections_per_backend as usize,
                        },
                        max_header_bytes,
                        open,
                    },
                ))
            }
        }
    }

    /// Sends `req`, waiting at most `timeout` for response headers. When
    /// the request certainly never left spooky it comes back with the
    /// error.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, (UpstreamError, Option<Request<ProxyBody>>)> {
        match self {
            BackendClient::H3(p) => p.send(req, timeout).await,
            BackendClient::Tcp(p) => p.send(req, timeout).await.map_err(|e| (e, None)),
        }
    }

    /// Closes idle connections past their time (HTTP/3; hyper reaps its
    /// own pool).
    pub fn reap(&self, now: tokio::time::Instant) {
        if let BackendClient::H3(p) = self {
            p.reap(now);
        }
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self) {
        if let BackendClient::H3(p) = self {
            p.close_all();
        }
    }
}
