//! The `limits` section: header sizes and counts, streams, body size,
//! per-client rates and connections, handshakes, connection lifetimes.

use std::time::Duration;

use super::{Checker, check_rate};
use crate::config::{Limits, file};

pub(super) fn resolve(c: &mut Checker, limits: &file::LimitsConfig) -> Limits {
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
        .and_then(|r| check_rate(c, r, "limits.requests_per_ip"));
    let handshakes = limits
        .handshakes
        .as_ref()
        .and_then(|r| check_rate(c, r, "limits.handshakes"));
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
    Limits {
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
    }
}
