//! The `log` section: level (or filter), format, access log.

use super::Checker;
use crate::config::{Log, file};

pub(super) fn resolve(c: &mut Checker, log: &file::LogConfig) -> Log {
    let level = log.level.trim();
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        c.err(
            "log.level",
            format!(
                "`{level}` is not a log level: use error, warn, info, debug or trace (or a filter like `spooky=debug,info`)"
            ),
        );
    }
    Log {
        level: level.to_owned(),
        format: log.format,
        access: log.access,
    }
}
