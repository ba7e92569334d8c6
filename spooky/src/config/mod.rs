//! Configuration: the resolved [`Config`] the proxy runs on and its parts.
//! [`parse`] reads the YAML ([`file`] is its schema) and [`resolve`]
//! checks every field, one section per file. Every error names the field's
//! path (`upstreams.api.backends[1].address`) and what would be valid; all
//! errors of a file are reported at once.

pub mod file;
mod parse;
mod resolve;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use spooky_common::CidLayout;

pub use file::{FileConfig, LogFormat, SteeringMode, UpstreamProtocol};
pub use parse::{load, parse};
pub use resolve::state_dir::default_state_dir;
pub use resolve::upstreams::parse_backend_addr;

use crate::balancer::BalancingConfig;
use crate::health::{ActiveHealthConfig, CircuitBreakerConfig, OutlierConfig, PanicConfig};
use crate::retry::RetryConfig;
use crate::routing::RouteMatch;
use crate::tls::Verification;

/// Name of the upstream the original format's top-level `backends` become.
pub const LEGACY_UPSTREAM: &str = "default";

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field (`.` for the whole file).
    pub path: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The file (or `<string>`).
    pub origin: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{}: {n} error{}",
            self.origin,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The listener.
#[derive(Debug, Clone)]
pub struct Listen {
    pub addr: SocketAddr,
    pub workers: usize,
    pub tls: Option<file::TlsFilesConfig>,
    /// Serve HTTP/2 and HTTP/1.1 over TLS on TCP too.
    pub tcp: bool,
    pub alt_svc_max_age_s: u64,
    pub http_redirect_port: Option<u16>,
    /// Accept 0-RTT requests (safe methods only).
    pub early_data: bool,
}

/// A backend address: host (IP or DNS name) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
}

impl BackendAddr {
    /// The address itself when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A resolved backend.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: String,
    pub addr: BackendAddr,
    pub weight: u32,
    pub health_check: Option<ActiveHealthConfig>,
}

/// Timeouts as durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
    pub idle: Duration,
}

/// A resolved upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub protocol: UpstreamProtocol,
    pub backends: Vec<Backend>,
    pub verification: Verification,
    pub sni: Option<String>,
    /// TLS towards backends (always true for HTTP/3).
    pub tls_enabled: bool,
    /// Client certificate and key for mTLS to backends.
    pub client_auth: Option<(PathBuf, PathBuf)>,
    pub balancing: BalancingConfig,
    pub health_check: Option<ActiveHealthConfig>,
    pub outlier: Option<OutlierConfig>,
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    pub retries: Option<RetryConfig>,
    pub panic: PanicConfig,
    pub pool: file::PoolConfig,
    pub timeouts: Timeouts,
    /// Send HTTP/3 GREASE to the backends (`http3.grease`; HTTP/3 only).
    pub grease: bool,
}

impl Upstream {
    /// The name `backend` is verified against (and sent as SNI): `tls.sni`,
    /// else the backend's host.
    pub fn server_name(&self, backend: &Backend) -> String {
        self.sni
            .clone()
            .unwrap_or_else(|| backend.addr.host.clone())
    }
}

/// A resolved route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Requests per second for the route as a whole.
    pub rate_limit: Option<Rate>,
}

/// A validated token-bucket rate (defined with the buckets, in spooky-lb).
pub use spooky_lb::limits::Rate;

/// Packet steering.
#[derive(Debug, Clone)]
pub struct Steering {
    pub mode: SteeringMode,
    pub interfaces: Vec<String>,
    pub layout: CidLayout,
    pub pin_workers: bool,
    /// The XDP program's per-source limit on new-connection Initials.
    pub initials_per_source: Option<spooky_common::maps::InitialLimit>,
}

/// Limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_header_bytes: u64,
    pub max_concurrent_streams: u32,
    pub max_body_bytes: Option<u64>,
    pub requests_per_ip: Option<Rate>,
    pub max_connections_per_ip: Option<u32>,
    pub handshakes: Option<Rate>,
    pub retry_threshold: u32,
    pub max_handshakes_in_progress: u32,
    pub max_request_headers: usize,
    pub request_header_timeout: Duration,
    /// HTTP/2 and HTTP/1.1: no request in flight for this long → closed.
    pub connection_idle_timeout: Duration,
    /// HTTP/2 and HTTP/1.1: older than this → GOAWAY / `connection: close`.
    pub max_connection_age: Option<Duration>,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub level: String,
    pub format: LogFormat,
    /// Access log on.
    pub access: bool,
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub addr: SocketAddr,
    /// Bearer token required on every request, when set.
    pub token: Option<String>,
}

/// The validated configuration the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub limits: Limits,
    pub request_id_header: HeaderName,
    pub steering: Steering,
    pub log: Log,
    pub state_dir: PathBuf,
    pub admin: Option<Admin>,
    /// Top-level timeouts (downstream idle timeout included).
    pub timeouts: Timeouts,
    /// How long a drain waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Config {
    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

#[cfg(test)]
mod tests;
