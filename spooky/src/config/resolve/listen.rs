//! The `listen` section: address and port, workers, TLS files, TCP and the
//! plain-HTTP redirect.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::Checker;
use crate::config::{Listen, file};

/// Resolves `listen`; also returns this machine's CPU count, which the
/// steering checks compare `workers` with.
pub(super) fn resolve(
    c: &mut Checker,
    listen: &file::ListenConfig,
    rel: &dyn Fn(&Path) -> PathBuf,
) -> (Listen, usize) {
    if let Some(p) = &listen.protocol
        && p != "http3"
    {
        c.err(
            "listen.protocol",
            format!("unsupported protocol `{p}`: the listener speaks `http3`"),
        );
    }
    if let Some(rp) = listen.http_redirect_port
        && (rp == 0 || (listen.tcp && rp == listen.port))
    {
        c.err(
            "listen.http_redirect_port",
            format!(
                "{rp} cannot be the redirect port: use a port other than 0 and than the TLS port {} (e.g. 80)",
                listen.port
            ),
        );
    }
    let ip = match listen.address.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            c.err(
                "listen.address",
                format!(
                    "`{}` is not an IP address: use e.g. `0.0.0.0`, `::` or `127.0.0.1`",
                    listen.address
                ),
            );
            IpAddr::from([0, 0, 0, 0])
        }
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match listen.workers {
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
    let tls = listen.tls.as_ref().map(|t| file::TlsFilesConfig {
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
    let resolved = Listen {
        addr: SocketAddr::new(ip, listen.port),
        workers,
        tls,
        tcp: listen.tcp,
        alt_svc_max_age_s: listen.alt_svc_max_age_s,
        http_redirect_port: listen.http_redirect_port,
        early_data: listen.early_data,
    };
    (resolved, cpus)
}
