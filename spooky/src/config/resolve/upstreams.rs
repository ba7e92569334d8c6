//! The `upstreams` section (and the original format's top-level `backends`
//! and `load_balancing`, which become the upstream `default`): backends and
//! their addresses, TLS to backends, balancing, health and resilience
//! policies, pools, timeouts, HTTP/3 options.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{Checker, check_timeouts};
use crate::config::{
    Backend, BackendAddr, LEGACY_UPSTREAM, Timeouts, Upstream, UpstreamProtocol, file,
};
use crate::tls::Verification;

/// Resolves every upstream, `default` (from `backends`) first.
pub(super) fn resolve(
    c: &mut Checker,
    file: &file::FileConfig,
    timeouts: &Timeouts,
    rel: &dyn Fn(&Path) -> PathBuf,
) -> Vec<Upstream> {
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
        upstreams.push(resolve_upstream(c, &name, &prefix, u, timeouts, rel));
    }
    upstreams
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
