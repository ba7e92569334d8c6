//! `state_dir`: where spooky keeps its generated certificate and keys.

use std::path::{Path, PathBuf};

/// `state_dir` relative to the config file, else [`default_state_dir`].
pub(super) fn resolve(state_dir: Option<&Path>, rel: &dyn Fn(&Path) -> PathBuf) -> PathBuf {
    state_dir.map(rel).unwrap_or_else(default_state_dir)
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
