//! Process lifecycle: from a validated config to running workers and back.
//! Sets up keys, chooses and installs steering, starts the workers and the
//! control tasks (health checks, admin, redirect), serves SIGHUP reloads
//! until SIGTERM/SIGINT, then drains and tears everything down (the XDP
//! program is detached on the way out).

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use rand::RngCore;
use spooky_common::maps::WorkerState;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::reload::{Generation, ReloadError, Reloader};
use crate::steering::{self, Effective, xdp::XdpSteering};
use crate::tls;
use crate::worker::{self, WorkerEvent, WorkerShared};

/// Why spooky could not start (or stopped abnormally).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Steering(#[from] steering::SteeringError),
    #[error("upstream set-up: {0}")]
    Upstream(String),
    #[error("cannot start worker {id}: {reason}")]
    Worker { id: u8, reason: String },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on TCP {addr}: {source}")]
    TcpBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Reads (or creates) a 32-byte secret in the state directory.
fn state_secret(dir: &Path, name: &str) -> Result<[u8; 32], ServerError> {
    let path = dir.join(name);
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        return Ok(key);
    }
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    tls::write_private(&path, &key)?;
    Ok(key)
}

/// Runs spooky until SIGINT or SIGTERM, then drains. `path` is the config
/// file, re-read on SIGHUP and `POST /reload`.
pub fn run(config: Config, path: &Path) -> Result<(), ServerError> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.state_dir).map_err(|source| ServerError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;

    let reset_secret = state_secret(&config.state_dir, "stateless-reset.key")?;
    let reset_key = Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_secret));
    let mut token_secret = [0u8; 64];
    rand::rng().fill_bytes(&mut token_secret);
    let token_key =
        Arc::new(ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&token_secret));

    // Workers and their CPUs.
    let allowed = steering::allowed_cpus();
    let n = config.listen.workers;
    let (mut mode, why) = steering::choose(&config.steering, steering::xdp_privileged());
    let cpus_for = |mode: Effective| -> Vec<Option<usize>> {
        (0..n)
            .map(|i| {
                (config.steering.pin_workers || mode == Effective::Xdp)
                    .then(|| allowed[i % allowed.len()])
            })
            .collect()
    };
    if mode == Effective::Xdp && n > allowed.len() {
        warn!(
            workers = n,
            cpus = allowed.len(),
            "more workers than CPUs: XDP steering needs one CPU per worker; using reuseport"
        );
        mode = Effective::Reuseport;
    }

    let cpus = cpus_for(mode);
    let sockets =
        steering::bind_worker_sockets(config.listen.addr, &cpus, mode, &config.steering.layout)?;
    let port = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .map_or(config.listen.addr.port(), |a| a.port());
    // XDP after binding (the program must know the real port); when it
    // cannot be installed in auto mode, the bound group falls back to the
    // CBPF program.
    let mut xdp: Option<XdpSteering> = None;
    if mode == Effective::Xdp {
        match install_xdp(&config, port) {
            Ok(x) => xdp = Some(x),
            Err(e) if config.steering.mode == crate::config::SteeringMode::Auto => {
                warn!(error = %e, "XDP steering unavailable; falling back to reuseport");
                mode = Effective::Reuseport;
                if let Some(first) = sockets.first() {
                    steering::reuseport::attach_reuseport_cbpf(
                        first,
                        &config.steering.layout,
                        sockets.len() as u32,
                    )
                    .map_err(steering::SteeringError::from)?;
                }
            }
            Err(e) => return Err(steering::SteeringError::from(e).into()),
        }
    }
    info!(mode = mode.name(), reason = %why, workers = n, "packet steering");
    if mode != Effective::Xdp && config.steering.initials_per_source.is_some() {
        warn!(
            mode = mode.name(),
            "steering.initials_per_source is not enforced: only the XDP program enforces it"
        );
    }
    // HTTP/2 + HTTP/1.1 over TLS on the same port number (TCP).
    let tcp_listeners = if config.listen.tcp {
        let addr = std::net::SocketAddr::new(config.listen.addr.ip(), port);
        let listeners = crate::listener::tcp::bind_reuseport(addr, n)
            .map_err(|source| ServerError::TcpBind { addr, source })?;
        listeners.into_iter().map(Some).collect::<Vec<_>>()
    } else {
        (0..n).map(|_| None).collect()
    };
    let local = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .unwrap_or(config.listen.addr);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let _enter = rt.enter();

    let first = Generation::first(config.clone()).map_err(|e| match e {
        ReloadError::Tls(t) => ServerError::Tls(t),
        other => ServerError::Upstream(other.to_string()),
    })?;
    let reloader = Arc::new(Reloader::new(path, first));
    let shared = Arc::new(WorkerShared {
        layout: config.steering.layout,
        reset_key,
        token_key,
        alt_svc: crate::listener::tcp::alt_svc(port, config.listen.alt_svc_max_age_s),
        connections: reloader.connections.clone(),
    });

    let (drain_tx, drain_rx) = watch::channel(false);
    let (ev_tx, ev_rx) = mpsc::channel();
    let mut handles = Vec::new();
    for (i, (socket, tcp)) in sockets.into_iter().zip(tcp_listeners).enumerate() {
        let id = i as u8;
        let h = worker::spawn(
            id,
            cpus[i],
            socket,
            tcp,
            shared.clone(),
            worker::WorkerChannels {
                generations: reloader.subscribe(),
                drain: drain_rx.clone(),
                events: ev_tx.clone(),
            },
        )
        .map_err(|e| ServerError::Worker {
            id,
            reason: e.to_string(),
        })?;
        handles.push(h);
    }
    drop(ev_tx);
    let mut ready = 0;
    while ready < handles.len() {
        match ev_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(WorkerEvent::Ready { id }) => {
                ready += 1;
                if let Some(x) = xdp.as_mut()
                    && let Some(cpu) = cpus[id as usize]
                {
                    x.set_worker(id, cpu as u32, WorkerState::Live)
                        .map_err(steering::SteeringError::from)?;
                }
            }
            Ok(WorkerEvent::Failed { id, error }) => {
                let _ = drain_tx.send(true);
                return Err(ServerError::Worker { id, reason: error });
            }
            Ok(WorkerEvent::Stopped { id }) => {
                let _ = drain_tx.send(true);
                return Err(ServerError::Worker {
                    id,
                    reason: "stopped during start-up".into(),
                });
            }
            Err(_) => {
                let _ = drain_tx.send(true);
                return Err(ServerError::Worker {
                    id: ready as u8,
                    reason: "did not start within 30 s".into(),
                });
            }
        }
    }
    if let Some(x) = xdp.as_mut() {
        x.enable().map_err(steering::SteeringError::from)?;
    }
    let xdp = xdp.map(|x| Arc::new(std::sync::Mutex::new(x)));

    // Control tasks on this thread: health checks, the plain-HTTP
    // redirect, the admin listener, signals.
    reloader.start_health_checks();
    let mut control = Vec::new();
    if let Some(rp) = config.listen.http_redirect_port {
        let addr = std::net::SocketAddr::new(config.listen.addr.ip(), rp);
        let l = crate::listener::tcp::bind_reuseport(addr, 1)
            .map_err(|source| ServerError::TcpBind { addr, source })?;
        for l in l {
            control.push(rt.spawn(crate::listener::tcp::serve_redirect(l, port)));
        }
    }
    let admin_state = Arc::new(crate::admin::AdminState {
        reloader: reloader.clone(),
        steering_mode: mode.name(),
        workers: n,
        xdp: xdp.clone(),
        started: std::time::Instant::now(),
        ready: std::sync::atomic::AtomicBool::new(true),
        token: config.admin.as_ref().and_then(|a| a.token.clone()),
    });
    if let Some(admin) = &config.admin {
        let addr = admin.addr;
        let task = rt
            .block_on(crate::admin::serve(addr, admin_state.clone()))
            .map_err(|source| ServerError::TcpBind { addr, source })?;
        control.push(task);
    }
    info!(%local, workers = n, mode = mode.name(), "spooky ready");

    let signal = rt.block_on(serve_signals(&reloader));
    info!(signal, "draining");
    admin_state
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    if let Some(x) = &xdp
        && let Ok(mut x) = x.lock()
    {
        for h in &handles {
            if let Some(cpu) = h.cpu {
                let _ = x.set_worker(h.id, cpu as u32, WorkerState::Draining);
            }
        }
    }
    let _ = drain_tx.send(true);
    // A second signal skips the drain.
    let joined = rt.block_on(async {
        let join = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.thread.join();
            }
        });
        tokio::select! {
            _ = join => true,
            s = wait_for_stop() => { warn!(signal = s, "second signal: exiting without drain"); false }
        }
    });
    reloader.stop_health_checks();
    for t in control {
        t.abort();
    }
    // Detach now rather than when the last reference (the admin state)
    // goes: the program must not outlive the sockets it steers to.
    if let Some(x) = &xdp
        && let Ok(mut x) = x.lock()
        && let Err(e) = x.detach_all()
    {
        error!(error = %e, "detaching the XDP program failed");
    }
    drop(admin_state);
    drop(xdp);
    if joined {
        info!("stopped");
    } else {
        error!("stopped without a complete drain");
    }
    Ok(())
}

fn install_xdp(config: &Config, port: u16) -> Result<XdpSteering, steering::xdp::XdpError> {
    let mut x = XdpSteering::load(&config.steering.layout, &[port])?;
    x.set_initial_limit(config.steering.initials_per_source)?;
    if let Some(l) = config.steering.initials_per_source {
        info!(
            interval_ns = l.interval_ns,
            burst_ns = l.burst_ns,
            "XDP limits new-connection Initials per source"
        );
    }
    for iface in &config.steering.interfaces {
        let how = x.attach(iface)?;
        info!(interface = %iface, mode = ?how, "XDP program attached");
    }
    Ok(x)
}

/// Serves SIGHUP (reload) until SIGTERM or SIGINT, which it returns.
async fn serve_signals(reloader: &Reloader) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install a SIGHUP handler; reload through the admin API");
        return wait_for_stop().await;
    };
    let stop = wait_for_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            s = &mut stop => return s,
            _ = hup.recv() => {
                info!(signal = "SIGHUP", "reloading the config");
                // Errors are logged by the reloader.
                let _ = reloader.reload();
            }
        }
    }
}

async fn wait_for_stop() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only wait forever.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
