//! The `steering` section: mode, interfaces, the CID layout, worker
//! pinning, the XDP program's per-source Initial limit.

use std::collections::HashSet;

use spooky_common::CidLayout;

use super::{Checker, check_rate};
use crate::config::{Steering, SteeringMode, file};

/// Resolves `steering`; `None` when the CID layout is invalid (an error
/// says why). `workers` and `cpus` come from `listen`.
pub(super) fn resolve(
    c: &mut Checker,
    s: &file::SteeringConfig,
    workers: usize,
    cpus: usize,
) -> Option<Steering> {
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
        .and_then(|r| check_rate(c, r, "steering.initials_per_source"))
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
    Some(Steering {
        mode: s.mode,
        interfaces: s.interfaces.clone(),
        layout: layout?,
        pin_workers: s.pin_workers,
        initials_per_source,
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
