//! Configuration: parse the YAML file ([`file`]), check every field, and
//! resolve it into the [`Config`] the proxy runs on. Every error names the
//! field's path (`upstreams.api.backends[1].address`) and what would be
//! valid; all errors of a file are reported at once.

pub mod file;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use spooky_common::CidLayout;

pub use file::{FileConfig, LogFormat, SteeringMode, UpstreamProtocol};

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

/// Reads and validates a config file. Relative paths inside it (certs, CA
/// files, state dir) are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        origin: origin.clone(),
        errors: vec![ConfigError {
            path: ".".into(),
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, &origin, base)
}

/// Parses and validates config text; `base` resolves relative paths.
pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        origin: origin.to_owned(),
        errors,
    };
    let de = serde_yaml::Deserializer::from_str(text);
    let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = explain_serde(&path, &inner.to_string());
        fail(vec![ConfigError { path, message }])
    })?;
    resolve(file, base).map_err(fail)
}

/// serde_yaml prefixes its message with the part of the path it knows,
/// which we already print; and its "missing field" deserves the fix.
fn explain_serde(path: &str, msg: &str) -> String {
    let mut msg = msg;
    let mut prefixes = vec![path.to_owned()];
    if let Some((parent, _)) = path.rsplit_once('.') {
        prefixes.push(parent.to_owned());
    }
    for p in prefixes {
        if let Some(rest) = msg.strip_prefix(&format!("{p}: ")) {
            msg = rest;
            break;
        }
    }
    if msg.starts_with("missing field") {
        format!("{msg} (this field is required)")
    } else {
        msg.to_owned()
    }
}

struct Checker {
    errors: Vec<ConfigError>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn extend(&mut self, issues: Vec<(String, String)>) {
        for (path, message) in issues {
            self.err(path, message);
        }
    }
}

fn resolve(file: FileConfig, base: &Path) -> Result<Config, Vec<ConfigError>> {
    let mut c = Checker { errors: Vec::new() };
    let rel = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };

    // listen
    if let Some(p) = &file.listen.protocol
        && p != "http3"
    {
        c.err(
            "listen.protocol",
            format!("unsupported protocol `{p}`: the listener speaks `http3`"),
        );
    }
    if let Some(rp) = file.listen.http_redirect_port
        && (rp == 0 || (file.listen.tcp && rp == file.listen.port))
    {
        c.err(
            "listen.http_redirect_port",
            format!(
                "{rp} cannot be the redirect port: use a port other than 0 and than the TLS port {} (e.g. 80)",
                file.listen.port
            ),
        );
    }
    let ip = match file.listen.address.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            c.err(
                "listen.address",
                format!(
                    "`{}` is not an IP address: use e.g. `0.0.0.0`, `::` or `127.0.0.1`",
                    file.listen.address
                ),
            );
            IpAddr::from([0, 0, 0, 0])
        }
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match file.listen.workers {
        None => cpus,
        Some(0) => {
            c.err(
                "listen.workers",
                format!(
                    "must be at least 1 (this machine has {cpus} CPUs; omit it for one per CPU)"
                ),
            );
            1
        }
        Some(n) if n > 256 => {
            c.err(
                "listen.workers",
                "at most 256 workers: the worker ID is one byte of the connection ID",
            );
            256
        }
        Some(n) => n,
    };
    let tls = file.listen.tls.as_ref().map(|t| file::TlsFilesConfig {
        cert: rel(&t.cert),
        key: rel(&t.key),
    });
    if let Some(t) = &tls {
        for (field, p) in [("cert", &t.cert), ("key", &t.key)] {
            if !p.exists() {
                c.err(
                    format!("listen.tls.{field}"),
                    format!(
                        "{} does not exist (omit `listen.tls` to use a generated self-signed certificate)",
                        p.display()
                    ),
                );
            }
        }
    }

    // timeouts and limits
    let timeouts = check_timeouts(&mut c, &file.timeouts, "timeouts");
    let limits = &file.limits;
    if limits.max_request_header_bytes < 1024 {
        c.err(
            "limits.max_request_header_bytes",
            "must be at least 1024 bytes (default 16384)",
        );
    }
    if limits.max_concurrent_streams == 0 {
        c.err(
            "limits.max_concurrent_streams",
            "must be at least 1 (default 100)",
        );
    }
    if limits.max_body_bytes == Some(0) {
        c.err(
            "limits.max_body_bytes",
            "must be at least 1; omit it for no limit",
        );
    }
    let requests_per_ip = limits
        .requests_per_ip
        .as_ref()
        .and_then(|r| check_rate(&mut c, r, "limits.requests_per_ip"));
    let handshakes = limits
        .handshakes
        .as_ref()
        .and_then(|r| check_rate(&mut c, r, "limits.handshakes"));
    if limits.max_connections_per_ip == Some(0) {
        c.err(
            "limits.max_connections_per_ip",
            "must be at least 1; omit it for no limit",
        );
    }
    if limits.max_request_headers < 8 {
        c.err(
            "limits.max_request_headers",
            "must be at least 8 (default 100)",
        );
    }
    if limits.request_header_timeout_ms == 0 {
        c.err(
            "limits.request_header_timeout_ms",
            "must be at least 1 millisecond (default 10000)",
        );
    }
    if limits.connection_idle_timeout_ms == 0 {
        c.err(
            "limits.connection_idle_timeout_ms",
            "must be at least 1 millisecond (default 75000)",
        );
    }
    if limits.max_connection_age_ms == Some(0) {
        c.err(
            "limits.max_connection_age_ms",
            "must be at least 1 millisecond; omit it for no maximum",
        );
    }
    if limits.max_handshakes_in_progress == 0 {
        c.err(
            "limits.max_handshakes_in_progress",
            "must be at least 1 (default 4096)",
        );
    }
    let request_id_header = match HeaderName::from_bytes(file.request_id.header.as_bytes()) {
        Ok(h) => h,
        Err(_) => {
            c.err(
                "request_id.header",
                format!(
                    "`{}` is not a valid header name: use lowercase letters, digits and `-`, e.g. `x-request-id`",
                    file.request_id.header
                ),
            );
            HeaderName::from_static("x-request-id")
        }
    };

    // upstreams (the original format's `backends` become `default`)
    let mut raw_upstreams: Vec<(String, String, file::UpstreamConfig)> = Vec::new();
    if let Some(backends) = &file.backends {
        if file.upstreams.contains_key(LEGACY_UPSTREAM) {
            c.err(
                "backends",
                format!(
                    "top-level `backends` define the upstream `{LEGACY_UPSTREAM}`, which `upstreams` also defines: move these backends into `upstreams.{LEGACY_UPSTREAM}.backends`"
                ),
            );
        } else {
            raw_upstreams.push((
                LEGACY_UPSTREAM.to_owned(),
                String::new(),
                file::UpstreamConfig {
                    protocol: UpstreamProtocol::Http3,
                    backends: backends.clone(),
                    tls: None,
                    balancing: file.load_balancing.clone(),
                    health_check: None,
                    outlier_detection: None,
                    circuit_breaker: None,
                    retries: None,
                    panic: None,
                    pool: Default::default(),
                    timeouts: None,
                    http3: None,
                },
            ));
        }
    } else if file.load_balancing.is_some() {
        c.err(
            "load_balancing",
            "only valid with top-level `backends`; with `upstreams`, set `upstreams.NAME.balancing`",
        );
    }
    for (name, u) in &file.upstreams {
        raw_upstreams.push((name.clone(), format!("upstreams.{name}."), u.clone()));
    }
    if raw_upstreams.is_empty() {
        c.err(
            ".",
            "no backends: add `upstreams` (or the original format's top-level `backends`)",
        );
    }
    let mut upstreams = Vec::new();
    for (name, prefix, u) in raw_upstreams {
        upstreams.push(resolve_upstream(&mut c, &name, &prefix, u, &timeouts, &rel));
    }

    // routes
    let names: BTreeMap<&str, usize> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u): (usize, &Upstream)| (u.name.as_str(), i))
        .collect();
    let mut routes = Vec::new();
    if file.routes.is_empty() {
        if upstreams.len() > 1 {
            c.err(
                "routes",
                format!(
                    "{} upstreams but no routes: add routes, ending with a catch-all such as `- upstream: {}`",
                    upstreams.len(),
                    upstreams[0].name
                ),
            );
        } else if !upstreams.is_empty() {
            routes.push(Route {
                name: "default".into(),
                matcher: RouteMatch::any(),
                upstream: 0,
                rate_limit: None,
            });
        }
    }
    for (i, r) in file.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(&idx) = names.get(r.upstream.as_str()) else {
            c.err(
                format!("{path}.upstream"),
                format!(
                    "no upstream named `{}`; defined: {}",
                    r.upstream,
                    names.keys().copied().collect::<Vec<_>>().join(", ")
                ),
            );
            continue;
        };
        match RouteMatch::new(
            r.matcher.host.as_deref(),
            r.matcher.path_prefix.as_deref(),
            &r.matcher.headers,
        ) {
            Ok(matcher) => {
                let rate_limit = r
                    .rate_limit
                    .as_ref()
                    .and_then(|rl| check_rate(&mut c, rl, &format!("{path}.rate_limit")));
                routes.push(Route {
                    name: r.name.clone().unwrap_or_else(|| path.clone()),
                    matcher,
                    upstream: idx,
                    rate_limit,
                })
            }
            Err((field, message)) => c.err(format!("{path}.match.{field}"), message),
        }
    }

    // steering
    let s = &file.steering;
    let node_id = match parse_hex(&s.node_id) {
        Some(b) => b,
        None => {
            c.err(
                "steering.node_id",
                format!(
                    "`{}` is not hex: use an even number of hex digits, e.g. `0a01`",
                    s.node_id
                ),
            );
            Vec::new()
        }
    };
    let layout = match CidLayout::new(s.config_id, &node_id, s.cid_length) {
        Ok(l) => Some(l),
        Err(e) => {
            let field = match e {
                spooky_common::LayoutError::ConfigId => "config_id",
                spooky_common::LayoutError::NodeIdLen => "node_id",
                _ => "cid_length",
            };
            c.err(format!("steering.{field}"), e.to_string());
            None
        }
    };
    let mut seen = HashSet::new();
    for (i, iface) in s.interfaces.iter().enumerate() {
        if iface.is_empty() || iface.len() > 15 || iface.contains('/') {
            c.err(
                format!("steering.interfaces[{i}]"),
                format!("`{iface}` is not an interface name (1 to 15 characters, e.g. `eth0`)"),
            );
        } else if !seen.insert(iface) {
            c.err(
                format!("steering.interfaces[{i}]"),
                format!("`{iface}` is listed twice"),
            );
        }
    }
    let initials_per_source = s
        .initials_per_source
        .as_ref()
        .and_then(|r| check_rate(&mut c, r, "steering.initials_per_source"))
        .and_then(|r| {
            // check_rate bounds the rate; the burst fits u32 (as_ saturates).
            spooky_common::maps::InitialLimit::new(r.per_second, r.burst as u32)
        });
    if initials_per_source.is_some()
        && matches!(s.mode, SteeringMode::Reuseport | SteeringMode::Off)
    {
        c.err(
            "steering.initials_per_source",
            "only the XDP program enforces it: set `mode: xdp` (or `auto` with interfaces), or remove it; `limits.handshakes` and `limits.retry_threshold` work in every mode",
        );
    }
    if s.mode == SteeringMode::Xdp {
        if s.interfaces.is_empty() {
            c.err(
                "steering.interfaces",
                "mode `xdp` needs at least one interface to attach to, e.g. `[eth0]`",
            );
        }
        if !s.pin_workers {
            c.err(
                "steering.pin_workers",
                "mode `xdp` steers packets to CPUs, so workers must be pinned: set `pin_workers: true`",
            );
        }
        if workers > cpus {
            c.err(
                "listen.workers",
                format!(
                    "mode `xdp` runs at most one worker per CPU: {workers} workers on {cpus} CPUs"
                ),
            );
        }
    }

    // log, admin, state dir
    let level = file.log.level.trim();
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        c.err(
            "log.level",
            format!(
                "`{level}` is not a log level: use error, warn, info, debug or trace (or a filter like `spooky=debug,info`)"
            ),
        );
    }
    let admin = file
        .admin
        .as_ref()
        .and_then(|a| check_admin(&mut c, a, &rel));
    let state_dir = file
        .state_dir
        .as_deref()
        .map(rel)
        .unwrap_or_else(default_state_dir);

    let Some(layout) = layout.filter(|_| c.errors.is_empty()) else {
        return Err(c.errors);
    };
    Ok(Config {
        listen: Listen {
            addr: SocketAddr::new(ip, file.listen.port),
            workers,
            tls,
            tcp: file.listen.tcp,
            alt_svc_max_age_s: file.listen.alt_svc_max_age_s,
            http_redirect_port: file.listen.http_redirect_port,
            early_data: file.listen.early_data,
        },
        upstreams,
        routes,
        limits: Limits {
            max_request_header_bytes: limits.max_request_header_bytes,
            max_concurrent_streams: limits.max_concurrent_streams,
            max_body_bytes: limits.max_body_bytes,
            requests_per_ip,
            max_connections_per_ip: limits.max_connections_per_ip,
            handshakes,
            retry_threshold: limits.retry_threshold,
            max_handshakes_in_progress: limits.max_handshakes_in_progress,
            max_request_headers: limits.max_request_headers as usize,
            request_header_timeout: Duration::from_millis(limits.request_header_timeout_ms),
            connection_idle_timeout: Duration::from_millis(limits.connection_idle_timeout_ms),
            max_connection_age: limits.max_connection_age_ms.map(Duration::from_millis),
        },
        request_id_header,
        steering: Steering {
            mode: s.mode,
            interfaces: s.interfaces.clone(),
            layout,
            pin_workers: s.pin_workers,
            initials_per_source,
        },
        log: Log {
            level: level.to_owned(),
            format: file.log.format,
            access: file.log.access,
        },
        state_dir,
        admin,
        timeouts,
        drain_timeout: Duration::from_millis(file.listen.drain_timeout_ms),
    })
}

fn check_rate(c: &mut Checker, r: &file::RateConfig, path: &str) -> Option<Rate> {
    if !(r.per_second.is_finite() && r.per_second > 0.0) {
        c.err(
            format!("{path}.per_second"),
            format!("`{}` must be a positive number, e.g. 100", r.per_second),
        );
        return None;
    }
    if r.burst == Some(0) {
        c.err(
            format!("{path}.burst"),
            "must be at least 1; omit it for one second's worth",
        );
        return None;
    }
    let burst = r.burst.map_or(r.per_second.ceil().max(1.0), f64::from);
    Some(Rate {
        per_second: r.per_second,
        burst,
    })
}

/// Reads the admin section; a token is mandatory off loopback, since the
/// admin API can drain backends and reload the config.
fn check_admin(
    c: &mut Checker,
    a: &file::AdminConfig,
    rel: &dyn Fn(&Path) -> PathBuf,
) -> Option<Admin> {
    let Ok(addr) = a.address.parse::<SocketAddr>() else {
        c.err(
            "admin.address",
            format!("`{}` is not IP:PORT, e.g. `127.0.0.1:9901`", a.address),
        );
        return None;
    };
    let token = match (&a.token, &a.token_file) {
        (Some(_), Some(_)) => {
            c.err("admin.token_file", "set `token` or `token_file`, not both");
            return None;
        }
        (Some(t), None) => Some(t.trim().to_owned()),
        (None, Some(f)) => {
            let path = rel(f);
            // Bounded: a token is one short line, and `/dev/zero` or a
            // huge file must not hang `spooky check`.
            let read = std::fs::File::open(&path).and_then(|f| {
                use std::io::Read;
                let mut text = String::new();
                f.take(4096).read_to_string(&mut text).map(|_| text)
            });
            match read {
                Ok(text) => Some(text.lines().next().unwrap_or("").trim().to_owned()),
                Err(e) => {
                    c.err(
                        "admin.token_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    return None;
                }
            }
        }
        (None, None) => None,
    };
    if let Some(t) = &token
        && (t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        c.err(
            "admin.token",
            "must be at least 16 printable characters without spaces (e.g. `openssl rand -hex 32`)",
        );
        return None;
    }
    if token.is_none() && !addr.ip().is_loopback() {
        c.err(
            "admin.token",
            format!(
                "admin.address {addr} is not loopback: set `token` (or `token_file`) so the admin API is not open to the network, or bind 127.0.0.1"
            ),
        );
        return None;
    }
    Some(Admin { addr, token })
}

fn check_timeouts(c: &mut Checker, t: &file::TimeoutsConfig, path: &str) -> Timeouts {
    for (field, v) in [
        ("connect_ms", t.connect_ms),
        ("request_ms", t.request_ms),
        ("idle_ms", t.idle_ms),
    ] {
        if v == 0 {
            c.err(format!("{path}.{field}"), "must be at least 1 millisecond");
        }
    }
    Timeouts {
        connect: Duration::from_millis(t.connect_ms),
        request: Duration::from_millis(t.request_ms),
        idle: Duration::from_millis(t.idle_ms),
    }
}

fn resolve_upstream(
    c: &mut Checker,
    name: &str,
    prefix: &str,
    u: file::UpstreamConfig,
    defaults: &Timeouts,
    rel: &dyn Fn(&Path) -> PathBuf,
) -> Upstream {
    if name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        c.err(
            format!("upstreams.{name}"),
            "upstream names use letters, digits, `-`, `_` and `.`",
        );
    }
    let backends_path = format!("{prefix}backends");
    if u.backends.is_empty() {
        c.err(&backends_path, "needs at least one backend");
    }
    let mut ids = HashSet::new();
    let mut backends = Vec::new();
    for (i, b) in u.backends.iter().enumerate() {
        let path = format!("{backends_path}[{i}]");
        if b.id.is_empty() {
            c.err(format!("{path}.id"), "must not be empty");
        } else if !ids.insert(b.id.clone()) {
            c.err(
                format!("{path}.id"),
                format!("`{}` is used by another backend of this upstream", b.id),
            );
        }
        if b.weight == 0 {
            c.err(
                format!("{path}.weight"),
                "must be at least 1 (remove the backend to send it nothing)",
            );
        }
        let addr = match parse_backend_addr(&b.address) {
            Ok(a) => a,
            Err(why) => {
                c.err(format!("{path}.address"), why);
                BackendAddr {
                    host: String::new(),
                    port: 0,
                }
            }
        };
        if let Some(h) = &b.health_check {
            c.extend(h.validate(&format!("{path}.health_check")));
        }
        backends.push(Backend {
            id: b.id.clone(),
            addr,
            weight: b.weight,
            health_check: b.health_check.clone(),
        });
    }
    let tls_enabled = u.protocol == UpstreamProtocol::Http3 || u.tls.is_some();
    let tls_cfg = u.tls.clone().unwrap_or_default();
    let verification = match (&tls_cfg.ca, tls_cfg.insecure_skip_verify) {
        (Some(_), true) => {
            c.err(
                format!("{prefix}tls.insecure_skip_verify"),
                "cannot be combined with `tls.ca`: pick one",
            );
            Verification::InsecureSkipVerify
        }
        (Some(ca), false) => {
            let ca = rel(ca);
            if !ca.exists() {
                c.err(
                    format!("{prefix}tls.ca"),
                    format!("{} does not exist", ca.display()),
                );
            }
            Verification::CaFile(ca)
        }
        (None, true) => Verification::InsecureSkipVerify,
        (None, false) => Verification::SystemRoots,
    };
    let client_auth = match (&tls_cfg.client_cert, &tls_cfg.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            for (field, p) in [("client_cert", cert), ("client_key", key)] {
                if !rel(p).exists() {
                    c.err(
                        format!("{prefix}tls.{field}"),
                        format!("{} does not exist", rel(p).display()),
                    );
                }
            }
            Some((rel(cert), rel(key)))
        }
        (Some(_), None) => {
            c.err(
                format!("{prefix}tls.client_key"),
                "`client_cert` needs its `client_key`",
            );
            None
        }
        (None, Some(_)) => {
            c.err(
                format!("{prefix}tls.client_cert"),
                "`client_key` needs its `client_cert`",
            );
            None
        }
    };
    if let Some(sni) = &tls_cfg.sni
        && crate::tls::server_name(sni).is_none()
    {
        c.err(
            format!("{prefix}tls.sni"),
            format!("`{sni}` is not a DNS name or IP address"),
        );
    }
    let balancing = u.balancing.clone().unwrap_or_default();
    let balancing_path = if prefix.is_empty() {
        "load_balancing".to_owned()
    } else {
        format!("{prefix}balancing")
    };
    c.extend(crate::balancer::validate(&balancing, &balancing_path));
    if let Some(h) = &u.health_check {
        c.extend(h.validate(&format!("{prefix}health_check")));
    }
    if let Some(o) = &u.outlier_detection {
        c.extend(o.validate(&format!("{prefix}outlier_detection")));
    }
    if let Some(b) = &u.circuit_breaker {
        c.extend(b.validate(&format!("{prefix}circuit_breaker")));
    }
    if let Some(r) = &u.retries {
        c.extend(r.validate(&format!("{prefix}retries")));
    }
    let panic = u.panic.clone().unwrap_or_default();
    c.extend(panic.validate(&format!("{prefix}panic")));
    let p = &u.pool;
    if p.max_streams_per_connection == 0 {
        c.err(
            format!("{prefix}pool.max_streams_per_connection"),
            "must be at least 1 (default 100)",
        );
    }
    if p.max_connections_per_backend == 0 {
        c.err(
            format!("{prefix}pool.max_connections_per_backend"),
            "must be at least 1 (default 8)",
        );
    }
    if p.idle_timeout_ms == 0 {
        c.err(
            format!("{prefix}pool.idle_timeout_ms"),
            "must be at least 1 millisecond (default 60000)",
        );
    }
    if u.http3.is_some() && u.protocol != UpstreamProtocol::Http3 {
        c.err(
            format!("{prefix}http3"),
            "only valid with `protocol: http3` (this upstream speaks HTTP/1.1 or HTTP/2): remove it or set `protocol: http3`",
        );
    }
    let grease = u.http3.as_ref().is_some_and(|h| h.grease);
    let timeouts = match &u.timeouts {
        None => *defaults,
        Some(o) => {
            let t = file::TimeoutsConfig {
                connect_ms: o.connect_ms.unwrap_or(defaults.connect.as_millis() as u64),
                request_ms: o.request_ms.unwrap_or(defaults.request.as_millis() as u64),
                idle_ms: o.idle_ms.unwrap_or(defaults.idle.as_millis() as u64),
            };
            check_timeouts(c, &t, &format!("{prefix}timeouts"))
        }
    };
    Upstream {
        name: name.to_owned(),
        protocol: u.protocol,
        backends,
        verification,
        sni: tls_cfg.sni.clone(),
        tls_enabled,
        client_auth,
        balancing,
        health_check: u.health_check.clone(),
        outlier: u.outlier_detection.clone(),
        circuit_breaker: u.circuit_breaker.clone(),
        retries: u.retries.clone(),
        panic,
        pool: u.pool.clone(),
        timeouts,
        grease,
    }
}

/// Parses `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
pub fn parse_backend_addr(s: &str) -> Result<BackendAddr, String> {
    let hint = "expected IP:PORT, [IPv6]:PORT or HOST:PORT, e.g. `10.0.0.5:8443`";
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("`{s}`: port 0 is not a backend port; {hint}"));
        }
        return Ok(BackendAddr {
            host: sa.ip().to_string(),
            port: sa.port(),
        });
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("`{s}` has no port; {hint}"));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("`{s}`: `{port}` is not a port (1-65535); {hint}")),
    };
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        });
    if !valid_host {
        return Err(format!("`{s}`: `{host}` is not a host name or IP; {hint}"));
    }
    Ok(BackendAddr {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_start_matches("0x");
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/spooky`, else
/// `~/.local/state/spooky`, else `/var/lib/spooky`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; the first is ours.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        if !first.is_empty() {
            return PathBuf::from(first);
        }
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("spooky");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/state/spooky");
    }
    PathBuf::from("/var/lib/spooky")
}

#[cfg(test)]
mod tests;
