//! Hot reload: a config *generation* (validated config, shared upstream
//! state, request limits, TLS configs) is what the workers serve from;
//! `SIGHUP`, `POST /reload` on the admin listener and `spooky reload`
//! build the next one from the file and publish it. Validation happens in
//! full before anything changes: an invalid file leaves the running
//! generation untouched. Requests in flight keep the generation they
//! started with; backends that stay keep their health, control state and
//! connections (see `SharedUpstreams::reload`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{self, Config};
use crate::limits::{ConnectionsPerClient, RequestLimits};
use crate::metrics::LIVE;
use crate::tls;
use crate::upstream::SharedUpstreams;

/// What a reload failed on.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("upstreams: {0}")]
    Upstream(#[from] crate::upstream::SetupError),
    #[error("a reload is already in progress")]
    Busy,
}

/// One config generation, shared by every worker.
pub struct Generation {
    /// 1 at start, +1 per successful reload.
    pub number: u64,
    pub config: Arc<Config>,
    pub upstreams: Arc<SharedUpstreams>,
    pub limits: Arc<RequestLimits>,
    pub quic_tls: Arc<quinn::crypto::rustls::QuicServerConfig>,
    /// TLS for the TCP listener (HTTP/2, HTTP/1.1), when enabled.
    pub tcp_tls: Option<Arc<rustls::ServerConfig>>,
}

/// The certificate and key a config serves (the self-signed pair when
/// `listen.tls` is absent).
pub fn cert_paths(config: &Config) -> Result<(PathBuf, PathBuf), tls::TlsError> {
    match &config.listen.tls {
        Some(t) => Ok((t.cert.clone(), t.key.clone())),
        None => {
            let (c, k, fresh) = tls::ensure_self_signed(&config.state_dir)?;
            warn!(
                cert = %c.display(),
                fresh,
                "NO `listen.tls` CONFIGURED: serving a SELF-SIGNED certificate for localhost. Clients must trust {} explicitly; configure listen.tls for production.",
                c.display()
            );
            Ok((c, k))
        }
    }
}

impl Generation {
    /// The first generation.
    pub fn first(config: Arc<Config>) -> Result<Self, ReloadError> {
        Self::build(1, config, None)
    }

    fn build(
        number: u64,
        config: Arc<Config>,
        previous: Option<&Generation>,
    ) -> Result<Self, ReloadError> {
        let (cert, key) = cert_paths(&config)?;
        let quic_tls = Arc::new(tls::quic_listener_config(
            &cert,
            &key,
            config.listen.early_data,
        )?);
        let tcp_tls = if config.listen.tcp {
            Some(Arc::new(tls::tcp_server_config(&cert, &key)?))
        } else {
            None
        };
        let upstreams = Arc::new(match previous {
            None => SharedUpstreams::new(&config)?,
            Some(p) => SharedUpstreams::reload(&config, &p.upstreams)?,
        });
        Ok(Self {
            number,
            limits: Arc::new(RequestLimits::new(&config, Instant::now())),
            config,
            upstreams,
            quic_tls,
            tcp_tls,
        })
    }
}

/// Settings a running process cannot change: they name sockets, threads,
/// the XDP program or the log subscriber. A reload keeps the running
/// values and says which ones were ignored.
fn keep_restart_only(new: &mut Config, old: &Config) -> Vec<&'static str> {
    let mut ignored = Vec::new();
    let l = (&new.listen, &old.listen);
    if l.0.addr != l.1.addr {
        ignored.push("listen.address/port");
    }
    if l.0.workers != l.1.workers {
        ignored.push("listen.workers");
    }
    if l.0.tcp != l.1.tcp {
        ignored.push("listen.tcp");
    }
    if l.0.http_redirect_port != l.1.http_redirect_port {
        ignored.push("listen.http_redirect_port");
    }
    if l.0.alt_svc_max_age_s != l.1.alt_svc_max_age_s {
        ignored.push("listen.alt_svc_max_age_s");
    }
    let s = (&new.steering, &old.steering);
    if s.0.mode != s.1.mode
        || s.0.interfaces != s.1.interfaces
        || s.0.layout != s.1.layout
        || s.0.pin_workers != s.1.pin_workers
    {
        ignored.push("steering");
    }
    if new.state_dir != old.state_dir {
        ignored.push("state_dir");
    }
    if new.admin != old.admin {
        ignored.push("admin");
    }
    if new.log.level != old.log.level || new.log.format != old.log.format {
        ignored.push("log.level/format");
    }
    let (tls, early_data) = (new.listen.tls.clone(), new.listen.early_data);
    new.listen = old.listen.clone();
    new.listen.tls = tls;
    new.listen.early_data = early_data;
    new.steering = old.steering.clone();
    new.state_dir = old.state_dir.clone();
    new.admin = old.admin.clone();
    new.log.level = old.log.level.clone();
    new.log.format = old.log.format;
    ignored
}

/// What a successful reload did.
#[derive(Debug, Clone)]
pub struct ReloadSummary {
    pub generation: u64,
    pub upstreams: usize,
    pub backends: usize,
    pub routes: usize,
    /// Restart-only settings that changed in the file and were ignored.
    pub ignored: Vec<&'static str>,
}

/// Owns the current generation and the tasks that belong to it (active
/// health checks), and builds the next one on request.
pub struct Reloader {
    path: PathBuf,
    tx: watch::Sender<Arc<Generation>>,
    health: Mutex<Vec<JoinHandle<()>>>,
    /// One reload at a time.
    busy: Mutex<()>,
    /// Open connections per client: process-wide, across generations.
    pub connections: Arc<ConnectionsPerClient>,
}

impl Reloader {
    /// Starts with `first`; call [`Reloader::start_health_checks`] inside
    /// the control runtime.
    pub fn new(path: &Path, first: Generation) -> Self {
        LIVE.config_generation.set(first.number as i64);
        let connections = ConnectionsPerClient::new(first.config.limits.max_connections_per_ip);
        let (tx, _) = watch::channel(Arc::new(first));
        Self {
            path: path.to_owned(),
            tx,
            health: Mutex::new(Vec::new()),
            busy: Mutex::new(()),
            connections,
        }
    }

    /// The generation in use.
    pub fn current(&self) -> Arc<Generation> {
        self.tx.borrow().clone()
    }

    /// Workers watch this for new generations.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Generation>> {
        self.tx.subscribe()
    }

    /// Starts the active health checks of the current generation (must run
    /// inside a tokio runtime).
    pub fn start_health_checks(&self) {
        let tasks = crate::upstream::probe::start(&self.current().upstreams);
        if let Ok(mut h) = self.health.lock() {
            for old in h.drain(..) {
                old.abort();
            }
            *h = tasks;
        }
    }

    /// Stops the health checks (on shutdown).
    pub fn stop_health_checks(&self) {
        if let Ok(mut h) = self.health.lock() {
            for t in h.drain(..) {
                t.abort();
            }
        }
    }

    /// Re-reads the config file and, when it is valid, publishes the next
    /// generation. Must run inside the control runtime (it restarts the
    /// health checks there).
    pub fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let Ok(_busy) = self.busy.try_lock() else {
            return Err(ReloadError::Busy);
        };
        let result = self.try_reload();
        match &result {
            Ok(s) => {
                LIVE.reloads.with_label_values(&["ok"]).inc();
                LIVE.config_generation.set(s.generation as i64);
                info!(
                    generation = s.generation,
                    upstreams = s.upstreams,
                    backends = s.backends,
                    routes = s.routes,
                    "config reloaded"
                );
                if !s.ignored.is_empty() {
                    warn!(
                        settings = %s.ignored.join(", "),
                        "these settings changed in the file but need a restart; the running values stay"
                    );
                }
            }
            Err(ReloadError::Config(errors)) => {
                LIVE.reloads.with_label_values(&["error"]).inc();
                for e in &errors.errors {
                    error!(field = %e.path, problem = %e.message, "reload rejected: invalid config");
                }
                error!(file = %self.path.display(), errors = errors.errors.len(), "reload rejected; still serving the previous config");
            }
            Err(e) => {
                LIVE.reloads.with_label_values(&["error"]).inc();
                error!(error = %e, "reload failed; still serving the previous config");
            }
        }
        result
    }

    fn try_reload(&self) -> Result<ReloadSummary, ReloadError> {
        let old = self.current();
        let mut config = config::load(&self.path)?;
        let ignored = keep_restart_only(&mut config, &old.config);
        let next = Generation::build(old.number + 1, Arc::new(config), Some(&old))?;
        let summary = ReloadSummary {
            generation: next.number,
            upstreams: next.config.upstreams.len(),
            backends: next.config.upstreams.iter().map(|u| u.backends.len()).sum(),
            routes: next.config.routes.len(),
            ignored,
        };
        self.connections
            .set_max(next.config.limits.max_connections_per_ip);
        forget_removed_backends(&old.upstreams, &next.upstreams);
        self.tx.send_replace(Arc::new(next));
        self.start_health_checks();
        Ok(summary)
    }
}

/// Drops the latency series of backends that left the config (the other
/// per-backend series are rendered from the live state).
fn forget_removed_backends(old: &SharedUpstreams, new: &SharedUpstreams) {
    for u in &old.upstreams {
        for b in &u.backends {
            if new.backend(&u.cfg.name, &b.cfg.id).is_none() {
                let _ = LIVE
                    .upstream_duration
                    .remove_label_values(&[&u.cfg.name, &b.cfg.id]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, dir: &Path) -> Config {
        config::parse(text, "test", dir).unwrap()
    }

    const BASE: &str = "state_dir: state
listen: { address: 127.0.0.1, port: 9443, workers: 2 }
steering: { mode: reuseport }
upstreams:
  api:
    tls: { insecure_skip_verify: true }
    backends:
      - { id: a, address: \"127.0.0.1:9001\" }
      - { id: b, address: \"127.0.0.1:9002\", weight: 3 }
";

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let dir = tempfile::tempdir().unwrap();
        let old = parse(BASE, dir.path());
        let changed = BASE
            .replace("port: 9443, workers: 2", "port: 9444, workers: 1")
            .replace("mode: reuseport", "mode: off");
        let mut new = parse(&changed, dir.path());
        let ignored = keep_restart_only(&mut new, &old);
        assert_eq!(
            ignored,
            vec!["listen.address/port", "listen.workers", "steering"]
        );
        assert_eq!(new.listen.addr.port(), 9443);
        assert_eq!(new.listen.workers, 2);
        assert_eq!(new.steering.mode, old.steering.mode);
        let mut same = parse(BASE, dir.path());
        assert!(keep_restart_only(&mut same, &old).is_empty());
    }

    #[test]
    fn staying_backends_keep_state_and_new_ones_start_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let first = Arc::new(parse(BASE, dir.path()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let old = SharedUpstreams::new(&first).unwrap();
        let a = old.backend("api", "a").unwrap();
        a.set_health(crate::health::HealthState::Unhealthy);
        a.set_control(crate::upstream::Control::Draining);
        old.backend("api", "b").unwrap().set_weight(7);
        a.counters
            .requests
            .store(5, std::sync::atomic::Ordering::Relaxed);

        // a stays; b moves to another port (a different backend); c is new;
        // a's weight changes in the file.
        let text = BASE
            .replace("\"127.0.0.1:9002\", weight: 3", "\"127.0.0.1:9012\", weight: 3")
            .replace(
                "address: \"127.0.0.1:9001\" }",
                "address: \"127.0.0.1:9001\", weight: 2 }\n      - { id: c, address: \"127.0.0.1:9003\" }",
            );
        let next = Arc::new(parse(&text, dir.path()));
        let new = SharedUpstreams::reload(&next, &old).unwrap();
        let a2 = new.backend("api", "a").unwrap();
        assert_eq!(a2.health(), crate::health::HealthState::Unhealthy);
        assert_eq!(a2.control(), crate::upstream::Control::Draining);
        assert_eq!(a2.weight(), 2, "a weight changed in the file wins");
        assert_eq!(
            a2.counters
                .requests
                .load(std::sync::atomic::Ordering::Relaxed),
            5
        );
        let b2 = new.backend("api", "b").unwrap();
        assert_eq!(b2.weight(), 3, "moved backend starts from the file");
        assert_eq!(b2.checked_health(), None);
        assert_eq!(
            new.backend("api", "c").unwrap().control(),
            crate::upstream::Control::Enabled
        );
    }
}
