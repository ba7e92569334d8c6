//! The `admin` section: the admin listener's address and its token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::Checker;
use crate::config::{Admin, file};

/// Reads the admin section; a token is mandatory off loopback, since the
/// admin API can drain backends and reload the config.
pub(super) fn resolve(
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
