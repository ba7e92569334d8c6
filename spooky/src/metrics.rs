//! Metrics, exposed by the admin listener in the Prometheus text format
//! (the `prometheus` crate encodes them). Hot-path counters are plain
//! atomics and `prometheus` histograms and gauges (lock-free); backend
//! state (in flight, health, ejection, breaker, operator control) is read
//! from the shared upstream state at scrape time rather than copied on
//! every request: the upstream registry hands it over as
//! [`BackendSample`]s, so this module need not know the upstream types. Labels are bounded: routes, upstreams and backends come
//! from the config, never from requests.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use spooky_common::maps::XdpCounter;

use crate::health::{BreakerState, HealthState};

/// Latency buckets (seconds): 0.5 ms to 30 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// Long-lived metrics updated on the request and connection paths.
pub struct Live {
    /// Client request duration, until the response body ended, by route.
    pub request_duration: HistogramVec,
    /// Client requests by route, upstream and response status class.
    pub route_requests: IntCounterVec,
    /// Time to response headers from each backend.
    pub upstream_duration: HistogramVec,
    /// Bytes of response bodies sent to clients.
    pub response_bytes: IntCounter,
    pub quic_connections: IntGauge,
    pub quic_streams: IntGauge,
    pub tcp_connections: IntGauge,
    pub handshake_duration: Histogram,
    /// New QUIC connections by outcome: accepted, retry, refused, failed.
    pub handshakes: IntCounterVec,
    /// TCP connections refused by the abuse limits, by reason.
    pub tcp_refused: IntCounterVec,
    /// Request streams reset: by the client, or by spooky (response body
    /// failed mid-way).
    pub stream_resets: IntCounterVec,
    /// 429s by limit scope (client, route).
    pub rate_limited: IntCounterVec,
    /// Config reloads by result.
    pub reloads: IntCounterVec,
    pub config_generation: IntGauge,
    /// This process's generation (the config rotation bits of its CIDs).
    pub process_generation: IntGauge,
    /// Upgrades this process started, by outcome (ok, failed).
    pub upgrades: IntCounterVec,
    /// Requests retried (a second or later try), by upstream.
    pub retries: IntCounterVec,
    /// Downstream HTTP/3 connections spooky closed for a protocol error,
    /// by HTTP/3 or QPACK error code (a fixed set: only spooky's own).
    pub h3_connection_errors: IntCounterVec,
}

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    HistogramVec::new(opts, labels).unwrap_or_else(|e| unreachable_metric(name, e))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable_metric(name, e))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e))
}

/// Metric definitions are constants checked by the unit tests; a bad one
/// is a programming error caught before release.
#[allow(clippy::panic)]
// ok: the definitions are constants, all forced by the unit test
// `live_metrics_are_well_formed_and_render`; no input reaches this.
fn unreachable_metric(name: &str, e: prometheus::Error) -> ! {
    panic!("metric {name} is malformed: {e}")
}

/// The process-wide live metrics.
pub static LIVE: LazyLock<Live> = LazyLock::new(|| Live {
    request_duration: histogram_vec(
        "spooky_request_duration_seconds",
        "Client request duration, from the request head to the end of the response body, by route.",
        &["route"],
    ),
    route_requests: counter_vec(
        "spooky_route_requests_total",
        "Client requests by route, upstream and response status class.",
        &["route", "upstream", "class"],
    ),
    upstream_duration: histogram_vec(
        "spooky_upstream_response_seconds",
        "Time from sending a request to a backend to its response headers.",
        &["upstream", "backend"],
    ),
    response_bytes: IntCounter::new(
        "spooky_response_body_bytes_total",
        "Response body bytes sent to clients.",
    )
    .unwrap_or_else(|e| unreachable_metric("spooky_response_body_bytes_total", e)),
    quic_connections: gauge(
        "spooky_quic_connections",
        "Open downstream QUIC connections.",
    ),
    quic_streams: gauge(
        "spooky_quic_streams",
        "Downstream HTTP/3 request streams in progress.",
    ),
    tcp_connections: gauge(
        "spooky_tcp_connections",
        "Open downstream TCP (HTTP/2, HTTP/1.1) connections.",
    ),
    handshake_duration: Histogram::with_opts(
        HistogramOpts::new(
            "spooky_quic_handshake_duration_seconds",
            "Downstream QUIC handshake duration.",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
    )
    .unwrap_or_else(|e| unreachable_metric("spooky_quic_handshake_duration_seconds", e)),
    handshakes: counter_vec(
        "spooky_quic_handshakes_total",
        "New downstream QUIC connections by outcome (accepted, retry, refused_*, failed).",
        &["outcome"],
    ),
    tcp_refused: counter_vec(
        "spooky_tcp_connections_refused_total",
        "Downstream TCP connections refused by the abuse limits, by reason.",
        &["reason"],
    ),
    h3_connection_errors: counter_vec(
        "spooky_http3_connection_errors_total",
        "Downstream HTTP/3 connections closed by spooky for a protocol error, by error code (h3_excessive_load: a flood or an oversized frame).",
        &["code"],
    ),
    stream_resets: counter_vec(
        "spooky_stream_resets_total",
        "Downstream request streams reset, by who reset them (client, spooky).",
        &["by"],
    ),
    rate_limited: counter_vec(
        "spooky_rate_limited_total",
        "Requests answered 429 by a rate limit, by scope (client, route).",
        &["scope"],
    ),
    reloads: counter_vec(
        "spooky_config_reloads_total",
        "Config reloads by result (ok, error).",
        &["result"],
    ),
    config_generation: gauge(
        "spooky_config_generation",
        "Config generation in use (1 at start, +1 per successful reload).",
    ),
    process_generation: gauge(
        "spooky_process_generation",
        "This process's generation: the QUIC-LB config rotation bits of its CIDs (0-6; each upgrade moves to the next free one).",
    ),
    upgrades: counter_vec(
        "spooky_upgrades_total",
        "Upgrades this process started (spooky upgrade, SIGUSR2), by outcome (ok, failed).",
        &["outcome"],
    ),
    retries: counter_vec(
        "spooky_retries_total",
        "Tries after the first, by upstream.",
        &["upstream"],
    ),
});

/// Status class label of `status`.
pub fn class_label(status: u16) -> &'static str {
    CLASSES[class_index(status)]
}

/// Index of `status`'s class in [`CLASSES`] (out-of-range statuses count
/// as the nearest class).
pub fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, CLASSES.len()) - 1
}

/// Client protocols, for per-protocol counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientProtocol {
    H3,
    H2,
    H1,
}

impl ClientProtocol {
    const ALL: [ClientProtocol; 3] = [ClientProtocol::H3, ClientProtocol::H2, ClientProtocol::H1];

    fn label(self) -> &'static str {
        match self {
            ClientProtocol::H3 => "h3",
            ClientProtocol::H2 => "h2",
            ClientProtocol::H1 => "http/1.1",
        }
    }

    /// From a `via` version token.
    pub fn from_via(v: &str) -> Self {
        match v {
            "3" => ClientProtocol::H3,
            "2" => ClientProtocol::H2,
            _ => ClientProtocol::H1,
        }
    }
}

/// Process-wide request counters.
pub struct Global {
    /// Requests by client protocol.
    requests: [AtomicU64; 3],
    /// Responses to clients by status class (1xx..5xx).
    responses: [AtomicU64; 5],
    /// Responses spooky generated itself, by status.
    local: [AtomicU64; LOCAL_STATUSES.len()],
}

const LOCAL_STATUSES: [u16; 10] = [400, 404, 413, 425, 429, 431, 500, 502, 503, 504];

/// The process-wide counters.
pub static GLOBAL: Global = Global {
    requests: [const { AtomicU64::new(0) }; 3],
    responses: [const { AtomicU64::new(0) }; 5],
    local: [const { AtomicU64::new(0) }; LOCAL_STATUSES.len()],
};

impl Global {
    /// Counts one request and the status sent back; `local` when spooky
    /// produced the response itself.
    pub fn record(&self, protocol: ClientProtocol, status: u16, local: bool) {
        let p = ClientProtocol::ALL
            .iter()
            .position(|&x| x == protocol)
            .unwrap_or(0);
        self.requests[p].fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self
            .responses
            .get((status / 100).saturating_sub(1) as usize)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if local && let Some(i) = LOCAL_STATUSES.iter().position(|&s| s == status) {
            self.local[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Per-backend counters, owned by the backend's shared state.
#[derive(Debug)]
pub struct BackendCounters {
    /// Time to response headers (`spooky_upstream_response_seconds`).
    pub latency: Histogram,
    /// Tries sent to this backend (retries included).
    pub requests: AtomicU64,
    /// Responses by status class (1xx..5xx).
    pub responses: [AtomicU64; 5],
    /// Tries that failed before a response: connect, reset, timeout.
    pub connect_failures: AtomicU64,
    pub resets: AtomicU64,
    pub timeouts: AtomicU64,
    /// Tries that were retries of an earlier one.
    pub retries: AtomicU64,
    /// Open connections of the workers' pools.
    pub pool_connections: std::sync::Arc<AtomicU64>,
}

impl BackendCounters {
    pub fn new(upstream: &str, backend: &str) -> Self {
        Self {
            latency: LIVE
                .upstream_duration
                .with_label_values(&[upstream, backend]),
            requests: AtomicU64::new(0),
            responses: Default::default(),
            connect_failures: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            pool_connections: Default::default(),
        }
    }

    /// Counts a response with `status`.
    pub fn response(&self, status: u16) {
        if let Some(c) = self
            .responses
            .get((status / 100).saturating_sub(1) as usize)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One backend's state at scrape time.
pub struct BackendSample<'a> {
    pub upstream: &'a str,
    pub backend: &'a str,
    pub counters: &'a BackendCounters,
    pub in_flight: u32,
    pub health: HealthState,
    pub ejected: bool,
    pub times_ejected: u32,
    /// `Closed` when no breaker is configured.
    pub breaker: BreakerState,
    /// Every operator control state's name, and whether it is the current one.
    pub control: [(&'static str, bool); 3],
    pub weight: u32,
}

/// What the scrape needs.
pub struct Scrape<'a> {
    pub backends: Vec<BackendSample<'a>>,
    pub steering_mode: &'static str,
    pub workers: usize,
    pub xdp: Option<[u64; XdpCounter::COUNT as usize]>,
    pub started: Instant,
}

/// Status class labels.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Builds scrape-time families in a throw-away registry.
struct Families {
    registry: Registry,
}

impl Families {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: &C) {
        // Names are unique by construction; a duplicate would only drop
        // that family from the scrape.
        let _ = self.registry.register(Box::new(c.clone()));
    }

    fn gauge(&self, name: &str, help: &str, value: i64) {
        let g = gauge(name, help);
        g.set(value);
        self.add(&g);
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| unreachable_metric(name, e));
        self.add(&g);
        g
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = counter_vec(name, help, labels);
        self.add(&c);
        c
    }
}

/// Renders every metric in the Prometheus text exposition format.
pub fn render(s: &Scrape<'_>) -> String {
    let f = Families {
        registry: Registry::new(),
    };
    let g = &GLOBAL;
    let live = &*LIVE;
    for c in [
        &live.route_requests,
        &live.handshakes,
        &live.tcp_refused,
        &live.stream_resets,
        &live.h3_connection_errors,
        &live.rate_limited,
        &live.reloads,
        &live.retries,
        &live.upgrades,
    ] {
        f.add(c);
    }
    f.add(&live.request_duration);
    f.add(&live.upstream_duration);
    f.add(&live.handshake_duration);
    f.add(&live.response_bytes);
    for gv in [
        &live.quic_connections,
        &live.quic_streams,
        &live.tcp_connections,
        &live.config_generation,
        &live.process_generation,
    ] {
        f.add(gv);
    }

    f.gauge("spooky_up", "1 while spooky runs.", 1);
    f.gauge(
        "spooky_uptime_seconds",
        "Seconds since start.",
        s.started.elapsed().as_secs() as i64,
    );
    f.gauge("spooky_workers", "Worker threads.", s.workers as i64);
    f.gauge_vec(
        "spooky_steering_mode",
        "Packet steering in use (1 for the active mode).",
        &["mode"],
    )
    .with_label_values(&[s.steering_mode])
    .set(1);

    let requests = f.counter_vec(
        "spooky_requests_total",
        "Client requests by client protocol.",
        &["protocol"],
    );
    for (i, p) in ClientProtocol::ALL.iter().enumerate() {
        requests
            .with_label_values(&[p.label()])
            .inc_by(g.requests[i].load(Ordering::Relaxed));
    }
    let responses = f.counter_vec(
        "spooky_responses_total",
        "Responses to clients by status class.",
        &["class"],
    );
    for (i, c) in CLASSES.iter().enumerate() {
        responses
            .with_label_values(&[c])
            .inc_by(g.responses[i].load(Ordering::Relaxed));
    }
    let local = f.counter_vec(
        "spooky_local_responses_total",
        "Error responses spooky generated itself (no backend answer), by status.",
        &["status"],
    );
    for (i, st) in LOCAL_STATUSES.iter().enumerate() {
        local
            .with_label_values(&[&st.to_string()])
            .inc_by(g.local[i].load(Ordering::Relaxed));
    }

    let malformed = f.counter_vec(
        "spooky_malformed_requests_total",
        "Requests rejected as malformed (RFC 9114 §4.1.2: 400 or H3_MESSAGE_ERROR).",
        &[],
    );
    malformed
        .with_label_values(&[] as &[&str])
        .inc_by(crate::validate::MALFORMED_REQUESTS.load(Ordering::Relaxed));

    let ub = ["upstream", "backend"];
    let b_requests = f.counter_vec(
        "spooky_backend_requests_total",
        "Tries sent to the backend (retries included).",
        &ub,
    );
    let b_responses = f.counter_vec(
        "spooky_backend_responses_total",
        "Backend responses by status class.",
        &["upstream", "backend", "class"],
    );
    let b_failures = f.counter_vec(
        "spooky_backend_failures_total",
        "Tries that failed before a response, by kind.",
        &["upstream", "backend", "kind"],
    );
    let b_retries = f.counter_vec(
        "spooky_backend_retries_total",
        "Tries that retried an earlier failure.",
        &ub,
    );
    let b_in_flight = f.gauge_vec("spooky_backend_in_flight", "Requests in flight.", &ub);
    let b_healthy = f.gauge_vec(
        "spooky_backend_healthy",
        "1 when active health checks route traffic to the backend.",
        &ub,
    );
    let b_health = f.gauge_vec(
        "spooky_backend_health_state",
        "Active-check state (1 for the current one).",
        &["upstream", "backend", "state"],
    );
    let b_ejected = f.gauge_vec(
        "spooky_backend_ejected",
        "1 while outlier detection ejects the backend.",
        &ub,
    );
    let b_ejections = f.counter_vec(
        "spooky_backend_ejections_total",
        "Outlier ejections so far.",
        &ub,
    );
    let b_circuit = f.gauge_vec(
        "spooky_backend_circuit_state",
        "Circuit breaker state (1 for the current one).",
        &["upstream", "backend", "state"],
    );
    let b_control = f.gauge_vec(
        "spooky_backend_admin_state",
        "Operator control from the admin API (1 for the current one).",
        &["upstream", "backend", "state"],
    );
    let b_weight = f.gauge_vec("spooky_backend_weight", "Balancing weight in use.", &ub);
    let b_pool = f.gauge_vec(
        "spooky_backend_pool_connections",
        "Open connections to the backend in the workers' pools.",
        &ub,
    );
    for b in &s.backends {
        let l = [b.upstream, b.backend];
        let c = b.counters;
        b_requests
            .with_label_values(&l)
            .inc_by(c.requests.load(Ordering::Relaxed));
        for (i, cl) in CLASSES.iter().enumerate() {
            b_responses
                .with_label_values(&[l[0], l[1], cl])
                .inc_by(c.responses[i].load(Ordering::Relaxed));
        }
        for (kind, v) in [
            ("connect", &c.connect_failures),
            ("reset", &c.resets),
            ("timeout", &c.timeouts),
        ] {
            b_failures
                .with_label_values(&[l[0], l[1], kind])
                .inc_by(v.load(Ordering::Relaxed));
        }
        b_retries
            .with_label_values(&l)
            .inc_by(c.retries.load(Ordering::Relaxed));
        b_in_flight
            .with_label_values(&l)
            .set(i64::from(b.in_flight));
        b_healthy
            .with_label_values(&l)
            .set(i64::from(b.health.is_routable()));
        for (st, name) in [
            (HealthState::Healthy, "healthy"),
            (HealthState::Degraded, "degraded"),
            (HealthState::Unhealthy, "unhealthy"),
            (HealthState::Recovering, "recovering"),
        ] {
            b_health
                .with_label_values(&[l[0], l[1], name])
                .set(i64::from(b.health == st));
        }
        b_ejected.with_label_values(&l).set(i64::from(b.ejected));
        b_ejections
            .with_label_values(&l)
            .inc_by(u64::from(b.times_ejected));
        for (st, name) in [
            (BreakerState::Closed, "closed"),
            (BreakerState::Open, "open"),
            (BreakerState::HalfOpen, "half_open"),
        ] {
            b_circuit
                .with_label_values(&[l[0], l[1], name])
                .set(i64::from(b.breaker == st));
        }
        for (name, current) in b.control {
            b_control
                .with_label_values(&[l[0], l[1], name])
                .set(i64::from(current));
        }
        b_weight.with_label_values(&l).set(i64::from(b.weight));
        b_pool
            .with_label_values(&l)
            .set(c.pool_connections.load(Ordering::Relaxed) as i64);
    }

    if let Some(x) = &s.xdp {
        let packets = f.counter_vec(
            "spooky_xdp_packets_total",
            "Packets seen by the XDP program, by decision (summed over CPUs).",
            &["decision"],
        );
        for c in XdpCounter::ALL {
            packets.with_label_values(&[c.name()]).inc_by(x[c as usize]);
        }
    }
    let mut out = Vec::with_capacity(16 * 1024);
    if let Err(e) = TextEncoder::new().encode(&f.registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_metrics_are_well_formed_and_render() {
        // Forces every definition (a malformed one would panic here).
        LIVE.route_requests
            .with_label_values(&["r\"1", "u", "2xx"])
            .inc();
        LIVE.request_duration
            .with_label_values(&["r"])
            .observe(0.01);
        let text = render(&Scrape {
            backends: vec![],
            steering_mode: "off",
            workers: 2,
            xdp: Some([1; XdpCounter::COUNT as usize]),
            started: Instant::now(),
        });
        assert!(
            text.contains(
                "spooky_route_requests_total{class=\"2xx\",route=\"r\\\"1\",upstream=\"u\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("spooky_request_duration_seconds_bucket{route=\"r\",le=\"0.025\"} 1")
        );
        assert!(text.contains("spooky_workers 2"));
        assert!(text.contains("# TYPE spooky_xdp_packets_total counter"));
        assert_eq!(class_label(503), "5xx");
        assert_eq!(class_label(99), "1xx");
    }

    #[test]
    fn global_counts_by_protocol_class_and_local_status() {
        let g = Global {
            requests: [const { AtomicU64::new(0) }; 3],
            responses: [const { AtomicU64::new(0) }; 5],
            local: [const { AtomicU64::new(0) }; LOCAL_STATUSES.len()],
        };
        g.record(ClientProtocol::H2, 502, true);
        g.record(ClientProtocol::H3, 200, false);
        assert_eq!(g.requests[1].load(Ordering::Relaxed), 1);
        assert_eq!(g.responses[4].load(Ordering::Relaxed), 1);
        assert_eq!(g.responses[1].load(Ordering::Relaxed), 1);
        let i502 = LOCAL_STATUSES.iter().position(|&s| s == 502).unwrap();
        assert_eq!(g.local[i502].load(Ordering::Relaxed), 1);
    }
}
