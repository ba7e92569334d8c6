//! [`FileConfig`] to [`Config`]: checks every section in file order, one
//! resolver per section, collecting every error with its field path.

mod admin;
mod limits;
mod listen;
mod log;
mod request_id;
mod routes;
pub(super) mod state_dir;
mod steering;
pub(super) mod upstreams;

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Config, ConfigError, FileConfig, Rate, Timeouts, file};

/// Collects the errors of every section.
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

pub(super) fn resolve(file: FileConfig, base: &Path) -> Result<Config, Vec<ConfigError>> {
    let mut c = Checker { errors: Vec::new() };
    let rel = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let (listen, cpus) = listen::resolve(&mut c, &file.listen, &rel);
    let timeouts = check_timeouts(&mut c, &file.timeouts, "timeouts");
    let limits = limits::resolve(&mut c, &file.limits);
    let request_id_header = request_id::resolve(&mut c, &file.request_id);
    let upstreams = upstreams::resolve(&mut c, &file, &timeouts, &rel);
    let routes = routes::resolve(&mut c, &file.routes, &upstreams);
    let steering = steering::resolve(&mut c, &file.steering, listen.workers, cpus);
    let log = log::resolve(&mut c, &file.log);
    let admin = file
        .admin
        .as_ref()
        .and_then(|a| admin::resolve(&mut c, a, &rel));
    let state_dir = state_dir::resolve(file.state_dir.as_deref(), &rel);

    let Some(steering) = steering.filter(|_| c.errors.is_empty()) else {
        return Err(c.errors);
    };
    Ok(Config {
        listen,
        upstreams,
        routes,
        limits,
        request_id_header,
        steering,
        log,
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
