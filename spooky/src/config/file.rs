//! The YAML schema as written by users: serde types only, no validation
//! beyond types. Both the original spooky format (`listen`, `backends`,
//! `load_balancing`, `log`) and the extended one (`upstreams`, `routes`, ...)
//! deserialize into [`FileConfig`]. Unknown fields are errors everywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::balancer::BalancingConfig;
use crate::health::{ActiveHealthConfig, CircuitBreakerConfig, OutlierConfig, PanicConfig};
use crate::retry::RetryConfig;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where clients connect.
    pub listen: ListenConfig,
    /// Original format: the backends of the single, implicit upstream.
    #[serde(default)]
    pub backends: Option<Vec<BackendConfig>>,
    /// Original format: the balancing of the single, implicit upstream.
    #[serde(default)]
    pub load_balancing: Option<BalancingConfig>,
    /// Named pools of backends.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Request → upstream rules; first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Defaults for every upstream.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Per-connection and per-request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The request-id header.
    #[serde(default)]
    pub request_id: RequestIdConfig,
    /// Packet steering (XDP / reuseport CBPF / off).
    #[serde(default)]
    pub steering: SteeringConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Where spooky keeps state across restarts (self-signed certificate,
    /// stateless-reset key).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The admin listener (metrics, health).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
}

/// `listen`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Original format: always `http3`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// IP address to bind (`0.0.0.0`, `::`, `127.0.0.1`, ...).
    pub address: String,
    /// UDP port.
    pub port: u16,
    /// Worker threads (one quinn endpoint each). Default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Server certificate; omitted → a self-signed one for localhost.
    #[serde(default)]
    pub tls: Option<TlsFilesConfig>,
    /// On SIGTERM, how long in-flight requests may take to finish (ms).
    #[serde(default = "default_drain_ms")]
    pub drain_timeout_ms: u64,
    /// Also serve HTTP/2 and HTTP/1.1 over TLS on the same port number
    /// over TCP, advertising HTTP/3 with `alt-svc` (browsers start there).
    #[serde(default = "default_true")]
    pub tcp: bool,
    /// `ma` (seconds) of the `alt-svc` header on TCP responses.
    #[serde(default = "default_alt_svc_max_age")]
    pub alt_svc_max_age_s: u64,
    /// A plain-HTTP port that redirects every request to https (308).
    #[serde(default)]
    pub http_redirect_port: Option<u16>,
    /// Accept 0-RTT (TLS early data) from resuming HTTP/3 clients: only
    /// GET, HEAD and OPTIONS are served early (others get 425), and
    /// backends see `early-data: 1` (RFC 8470).
    #[serde(default)]
    pub early_data: bool,
}

fn default_true() -> bool {
    true
}

fn default_alt_svc_max_age() -> u64 {
    86_400
}

fn default_drain_ms() -> u64 {
    10_000
}

/// A certificate chain and its key, PEM or DER.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFilesConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Name used in logs, metrics and sticky cookies.
    pub id: String,
    /// `IP:PORT` or `HOST:PORT`.
    pub address: String,
    /// Relative share of traffic (≥ 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Original format: per-backend active health check.
    #[serde(default)]
    pub health_check: Option<ActiveHealthConfig>,
}

fn default_weight() -> u32 {
    1
}

/// The protocol spooky speaks to an upstream's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/3 over QUIC (TLS always).
    #[default]
    Http3,
    /// HTTP/2 over TCP: TLS with ALPN `h2` when `tls` is set, else
    /// cleartext with prior knowledge (h2c).
    Http2,
    /// HTTP/1.1 over TCP with keep-alive: TLS when `tls` is set.
    Http1,
}

/// `upstreams.NAME`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    pub backends: Vec<BackendConfig>,
    /// TLS towards the backends. HTTP/3 always uses TLS (these settings or
    /// their defaults); HTTP/1.1 and HTTP/2 use TLS only when this is set.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    #[serde(default)]
    pub balancing: Option<BalancingConfig>,
    #[serde(default)]
    pub health_check: Option<ActiveHealthConfig>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierConfig>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    #[serde(default)]
    pub retries: Option<RetryConfig>,
    #[serde(default)]
    pub panic: Option<PanicConfig>,
    #[serde(default)]
    pub pool: PoolConfig,
    /// Overrides of the top-level `timeouts`.
    #[serde(default)]
    pub timeouts: Option<TimeoutsOverride>,
    /// HTTP/3 details towards the backends (`protocol: http3` only).
    #[serde(default)]
    pub http3: Option<UpstreamHttp3Config>,
}

/// `upstreams.NAME.http3`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamHttp3Config {
    /// Send HTTP/3 GREASE (RFC 9114 §7.2.8, §7.2.4.1, §6.2.3): a reserved
    /// frame type at the end of each request stream, a reserved setting and
    /// a reserved unidirectional stream. Off by default: nginx (1.28) fails
    /// every request whose body it reads when a reserved frame follows the
    /// HEADERS (README, "HTTP/3 GREASE towards backends").
    pub grease: bool,
}

/// TLS towards backends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Server name sent as SNI and checked against the certificate.
    /// Default: the host part of each backend's address.
    #[serde(default)]
    pub sni: Option<String>,
    /// CA bundle (PEM or DER) to verify backends. Default: system roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Skip certificate verification entirely. For tests and demos only.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Client certificate chain (PEM/DER) presented to backends (mTLS).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// Connection pool towards one upstream (per worker).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Concurrent requests per backend connection before another opens.
    pub max_streams_per_connection: u32,
    /// Connections per backend per worker (HTTP/3, HTTP/2). For HTTP/1.1,
    /// which carries one request per connection, up to this times
    /// `max_streams_per_connection` idle keep-alive connections are kept.
    pub max_connections_per_backend: u32,
    /// Idle connections are closed after this long.
    pub idle_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            max_connections_per_backend: 8,
            idle_timeout_ms: 60_000,
        }
    }
}

/// `timeouts` (milliseconds).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Establishing a backend connection (QUIC handshake included).
    pub connect_ms: u64,
    /// From forwarding a request to receiving the response headers.
    pub request_ms: u64,
    /// No body bytes in either direction for this long ends the stream;
    /// also the downstream QUIC idle timeout.
    pub idle_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: 5_000,
            request_ms: 60_000,
            idle_ms: 60_000,
        }
    }
}

/// Per-upstream timeout overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsOverride {
    pub connect_ms: Option<u64>,
    pub request_ms: Option<u64>,
    pub idle_ms: Option<u64>,
}

/// `limits`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request header section (QPACK-decoded, RFC 9114 size).
    pub max_request_header_bytes: u64,
    /// Concurrent request streams a client may open on one connection.
    pub max_concurrent_streams: u32,
    /// Largest request body; unset = unlimited (streamed).
    pub max_body_bytes: Option<u64>,
    /// Requests per client IP (token bucket); unset = unlimited.
    pub requests_per_ip: Option<RateConfig>,
    /// Open connections (QUIC and TCP) per client IP; unset = unlimited.
    pub max_connections_per_ip: Option<u32>,
    /// New connections (QUIC handshakes and TCP accepts) per second across
    /// the process; beyond it they are refused. Unset = unlimited.
    pub handshakes: Option<RateConfig>,
    /// QUIC handshakes in progress per worker above which clients whose
    /// address is not yet validated get a Retry (RFC 9000 §8.1.2) first;
    /// 0 = always send Retry.
    pub retry_threshold: u32,
    /// Hard cap on QUIC handshakes in progress per worker; beyond it new
    /// Initials are refused.
    pub max_handshakes_in_progress: u32,
    /// Header fields per request; 431 beyond it.
    pub max_request_headers: u32,
    /// How long a client may take to send a request's header section
    /// (slow-loris protection): HTTP/3 from opening the stream, HTTP/1.1
    /// from the connection's start or, between keep-alive requests, from
    /// the first byte of the next request.
    pub request_header_timeout_ms: u64,
    /// An HTTP/2 or HTTP/1.1 connection with no request in flight for this
    /// long is closed (HTTP/2: GOAWAY first). PINGs do not count as
    /// activity. nginx's `keepalive_timeout` default.
    pub connection_idle_timeout_ms: u64,
    /// An HTTP/2 or HTTP/1.1 connection older than this gets GOAWAY
    /// (HTTP/1.1: `connection: close` on the next response) and closes once
    /// its requests are done. Unset = no maximum.
    pub max_connection_age_ms: Option<u64>,
}

/// A token bucket: `per_second` sustained, up to `burst` at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Sustained rate (requests or connections per second).
    pub per_second: f64,
    /// Bucket size; default: one second's worth (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_header_bytes: 16 * 1024,
            max_concurrent_streams: 100,
            max_body_bytes: None,
            requests_per_ip: None,
            max_connections_per_ip: None,
            handshakes: None,
            retry_threshold: 64,
            max_handshakes_in_progress: 4096,
            max_request_headers: 100,
            request_header_timeout_ms: 10_000,
            connection_idle_timeout_ms: 75_000,
            max_connection_age_ms: None,
        }
    }
}

/// `request_id`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestIdConfig {
    /// Header carrying the id to backends and back to clients.
    pub header: String,
}

impl Default for RequestIdConfig {
    fn default() -> Self {
        Self {
            header: "x-request-id".into(),
        }
    }
}

/// `steering.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SteeringMode {
    /// XDP when privileged and an interface is configured, else reuseport.
    #[default]
    Auto,
    /// The XDP program steers by connection ID.
    Xdp,
    /// A classic BPF reuseport program steers by connection ID.
    Reuseport,
    /// The kernel's 4-tuple hash (migrating clients break).
    Off,
}

/// `steering`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SteeringConfig {
    pub mode: SteeringMode,
    /// Interfaces to attach the XDP program to.
    pub interfaces: Vec<String>,
    /// Length of the connection IDs spooky issues (8..=20).
    pub cid_length: usize,
    /// This node's ID inside every CID, hex (0 to 8 bytes).
    pub node_id: String,
    /// QUIC-LB config rotation codepoint (0..=6).
    pub config_id: u8,
    /// Pin worker threads to CPUs (required by `xdp`).
    pub pin_workers: bool,
    /// New-connection Initials per client source (IPv4 address, IPv6 /64)
    /// that the XDP program lets through; unset = unlimited. XDP mode only.
    pub initials_per_source: Option<RateConfig>,
}

impl Default for SteeringConfig {
    fn default() -> Self {
        Self {
            mode: SteeringMode::Auto,
            interfaces: Vec::new(),
            cid_length: 12,
            node_id: "0000".into(),
            config_id: 0,
            pin_workers: true,
            initials_per_source: None,
        }
    }
}

/// `log`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a full filter
    /// directive. `RUST_LOG` overrides it.
    pub level: String,
    /// `text` (human-readable) or `json` (one object per line).
    pub format: LogFormat,
    /// One `spooky::access` line per request.
    pub access: bool,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            access: true,
        }
    }
}

/// `admin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:PORT` of the plain-HTTP admin listener (metrics, health).
    pub address: String,
    /// Bearer token every admin request must carry
    /// (`authorization: Bearer TOKEN`). Required off loopback.
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the token (first line), instead of `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// `routes[i]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in logs (default: `routes[i]`).
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions; all must hold. Omitted = matches every request.
    #[serde(default, rename = "match")]
    pub matcher: RouteMatchConfig,
    /// The upstream that serves matching requests.
    pub upstream: String,
    /// Requests per second for this route, all clients together (token
    /// bucket; 429 beyond it). Unset = unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateConfig>,
}

/// `routes[i].match`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchConfig {
    /// `example.com` or `*.example.com` (case-insensitive, port ignored).
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix, starting with `/`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Header name → exact value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}
