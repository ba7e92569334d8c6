//! Metrics: lock-free counters bumped on the request path, and their
//! rendering in the Prometheus text format for the admin listener. Backend
//! state (in flight, health, ejection, breaker) is read from the shared
//! upstream state at scrape time rather than copied on every request.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use spooky_common::maps::XdpCounter;

use crate::health::{BreakerState, HealthState};
use crate::upstream::{SharedBackend, SharedUpstream, SharedUpstreams};

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

const LOCAL_STATUSES: [u16; 6] = [404, 413, 500, 502, 503, 504];

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
#[derive(Debug, Default)]
pub struct BackendCounters {
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
}

impl BackendCounters {
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

/// What the scrape needs besides the upstreams.
pub struct Scrape<'a> {
    pub upstreams: &'a SharedUpstreams,
    pub steering_mode: &'static str,
    pub workers: usize,
    pub xdp: Option<[u64; XdpCounter::COUNT as usize]>,
    pub started: Instant,
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Renders every metric in the Prometheus text exposition format.
pub fn render(s: &Scrape<'_>) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let g = &GLOBAL;
    header(&mut out, "spooky_up", "gauge", "1 while spooky runs.");
    let _ = writeln!(out, "spooky_up 1");
    header(
        &mut out,
        "spooky_uptime_seconds",
        "gauge",
        "Seconds since start.",
    );
    let _ = writeln!(
        out,
        "spooky_uptime_seconds {:.0}",
        s.started.elapsed().as_secs_f64()
    );
    header(&mut out, "spooky_workers", "gauge", "Worker threads.");
    let _ = writeln!(out, "spooky_workers {}", s.workers);
    header(
        &mut out,
        "spooky_steering_mode",
        "gauge",
        "Packet steering in use (1 for the active mode).",
    );
    let _ = writeln!(
        out,
        "spooky_steering_mode{{mode=\"{}\"}} 1",
        s.steering_mode
    );

    header(
        &mut out,
        "spooky_requests_total",
        "counter",
        "Client requests by client protocol.",
    );
    for (i, p) in ClientProtocol::ALL.iter().enumerate() {
        let _ = writeln!(
            out,
            "spooky_requests_total{{protocol=\"{}\"}} {}",
            p.label(),
            g.requests[i].load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "spooky_responses_total",
        "counter",
        "Responses to clients by status class.",
    );
    for (i, c) in CLASSES.iter().enumerate() {
        let _ = writeln!(
            out,
            "spooky_responses_total{{class=\"{c}\"}} {}",
            g.responses[i].load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "spooky_local_responses_total",
        "counter",
        "Error responses spooky generated itself (no backend answer), by status.",
    );
    for (i, st) in LOCAL_STATUSES.iter().enumerate() {
        let _ = writeln!(
            out,
            "spooky_local_responses_total{{status=\"{st}\"}} {}",
            g.local[i].load(Ordering::Relaxed)
        );
    }

    let now = Instant::now();
    // (labels, upstream, backend index, backend) for every backend.
    let backends: Vec<_> = s
        .upstreams
        .upstreams
        .iter()
        .flat_map(|up| {
            up.backends.iter().enumerate().map(move |(bi, b)| {
                let l = format!(
                    "upstream=\"{}\",backend=\"{}\"",
                    esc(&up.cfg.name),
                    esc(&b.cfg.id)
                );
                (l, up, bi, b)
            })
        })
        .collect();
    // One family at a time, one line (or a few) per backend.
    let mut family =
        |name: &str,
         kind: &str,
         help: &str,
         line: &dyn Fn(&mut String, &str, &SharedUpstream, usize, &SharedBackend)| {
            header(&mut out, name, kind, help);
            for (l, up, bi, b) in &backends {
                line(&mut out, l, up, *bi, b);
            }
        };
    family(
        "spooky_backend_requests_total",
        "counter",
        "Tries sent to the backend (retries included).",
        &|o, l, _, _, b| {
            let _ = writeln!(
                o,
                "spooky_backend_requests_total{{{l}}} {}",
                b.counters.requests.load(Ordering::Relaxed)
            );
        },
    );
    family(
        "spooky_backend_responses_total",
        "counter",
        "Backend responses by status class.",
        &|o, l, _, _, b| {
            for (i, cl) in CLASSES.iter().enumerate() {
                let v = b.counters.responses[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "spooky_backend_responses_total{{{l},class=\"{cl}\"}} {v}"
                );
            }
        },
    );
    family(
        "spooky_backend_failures_total",
        "counter",
        "Tries that failed before a response, by kind.",
        &|o, l, _, _, b| {
            let c = &b.counters;
            for (kind, v) in [
                ("connect", &c.connect_failures),
                ("reset", &c.resets),
                ("timeout", &c.timeouts),
            ] {
                let _ = writeln!(
                    o,
                    "spooky_backend_failures_total{{{l},kind=\"{kind}\"}} {}",
                    v.load(Ordering::Relaxed)
                );
            }
        },
    );
    family(
        "spooky_backend_retries_total",
        "counter",
        "Tries that retried an earlier failure.",
        &|o, l, _, _, b| {
            let _ = writeln!(
                o,
                "spooky_backend_retries_total{{{l}}} {}",
                b.counters.retries.load(Ordering::Relaxed)
            );
        },
    );
    family(
        "spooky_backend_in_flight",
        "gauge",
        "Requests in flight.",
        &|o, l, _, _, b| {
            let _ = writeln!(o, "spooky_backend_in_flight{{{l}}} {}", b.stats.in_flight());
        },
    );
    family(
        "spooky_backend_healthy",
        "gauge",
        "1 when active health checks route traffic to the backend.",
        &|o, l, _, _, b| {
            let _ = writeln!(
                o,
                "spooky_backend_healthy{{{l}}} {}",
                u8::from(b.health().is_routable())
            );
        },
    );
    family(
        "spooky_backend_health_state",
        "gauge",
        "Active-check state (1 for the current one).",
        &|o, l, _, _, b| {
            let state = b.health();
            for (st, name) in [
                (HealthState::Healthy, "healthy"),
                (HealthState::Degraded, "degraded"),
                (HealthState::Unhealthy, "unhealthy"),
                (HealthState::Recovering, "recovering"),
            ] {
                let _ = writeln!(
                    o,
                    "spooky_backend_health_state{{{l},state=\"{name}\"}} {}",
                    u8::from(state == st)
                );
            }
        },
    );
    family(
        "spooky_backend_ejected",
        "gauge",
        "1 while outlier detection ejects the backend.",
        &|o, l, up, bi, _| {
            let ejected = up.outliers.as_ref().is_some_and(|p| p.is_ejected(bi, now));
            let _ = writeln!(o, "spooky_backend_ejected{{{l}}} {}", u8::from(ejected));
        },
    );
    family(
        "spooky_backend_ejections_total",
        "counter",
        "Outlier ejections so far.",
        &|o, l, up, bi, _| {
            let times = up
                .outliers
                .as_ref()
                .and_then(|p| p.host(bi))
                .map_or(0, |h| h.times_ejected());
            let _ = writeln!(o, "spooky_backend_ejections_total{{{l}}} {times}");
        },
    );
    family(
        "spooky_backend_circuit_state",
        "gauge",
        "Circuit breaker state (1 for the current one).",
        &|o, l, _, _, b| {
            // No breaker configured reads as always closed.
            let current = b
                .breaker
                .as_ref()
                .map_or(BreakerState::Closed, |br| br.state(now));
            for (st, name) in [
                (BreakerState::Closed, "closed"),
                (BreakerState::Open, "open"),
                (BreakerState::HalfOpen, "half_open"),
            ] {
                let _ = writeln!(
                    o,
                    "spooky_backend_circuit_state{{{l},state=\"{name}\"}} {}",
                    u8::from(current == st)
                );
            }
        },
    );

    if let Some(x) = &s.xdp {
        header(
            &mut out,
            "spooky_xdp_packets_total",
            "counter",
            "Packets seen by the XDP program, by decision (summed over CPUs).",
        );
        for c in XdpCounter::ALL {
            let _ = writeln!(
                out,
                "spooky_xdp_packets_total{{decision=\"{}\"}} {}",
                c.name(),
                x[c as usize]
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
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
        assert_eq!(g.local[3].load(Ordering::Relaxed), 1);
    }
}
