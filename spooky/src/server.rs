//! Process lifecycle: from a validated config to running workers and back.
//! Sets up keys, chooses and installs steering (or takes it over from the
//! previous process at an upgrade), starts the workers and the control
//! tasks (health checks, admin, redirect, control socket), serves SIGHUP
//! reloads and upgrade requests until SIGTERM/SIGINT or a successor takes
//! over, then drains and tears everything down (the XDP links are released
//! on the way out).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rand::RngCore;
use spooky_common::maps::WorkerState;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::reload::{Generation, ReloadError, Reloader};
use crate::steering::xdp::{AttachMode, InheritedLink, XdpSteering};
use crate::steering::{self, Effective, UdpGroup};
use crate::tls;
use crate::upgrade::control::{UpgradeReply, UpgradeRequest};
use crate::upgrade::{self, FdRole, Handover, Inherited, Predecessor, Successor, UpgradeError};
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
    #[error("upgrade: {0}")]
    Upgrade(#[from] UpgradeError),
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

/// Runs spooky until SIGINT or SIGTERM, then drains; or, after handing
/// everything to a successor (`spooky upgrade`, SIGUSR2), drains its own
/// connections and exits. `path` is the config file, re-read on SIGHUP
/// and `POST /reload`. Started by an upgrade, it takes its sockets from
/// the predecessor and reports to it; a failure is reported there too, so
/// the predecessor keeps serving.
pub fn run(config: Config, path: &Path) -> Result<(), ServerError> {
    let (predecessor, inherited) = match Predecessor::inherit() {
        None => (None, None),
        Some(Ok((p, i))) => (Some(p), Some(i)),
        Some(Err(e)) => return Err(ServerError::Upgrade(e)),
    };
    let result = serve(config, path, predecessor, inherited);
    if let Err(e) = &result {
        error!(error = %e, "spooky could not start");
    }
    result
}

/// The listening sockets this process holds for a successor: duplicates of
/// what its workers and control tasks serve.
struct Listening {
    worker_tcp: Vec<(std::net::SocketAddr, OwnedFd)>,
    admin: Option<(std::net::SocketAddr, OwnedFd)>,
    redirect: Vec<(std::net::SocketAddr, OwnedFd)>,
    control: Option<OwnedFd>,
}

/// What an upgrade needs from the running process.
struct Upgrader {
    mode: Effective,
    layout: spooky_common::CidLayout,
    cpus: Vec<Option<usize>>,
    group: Arc<Mutex<UdpGroup>>,
    listening: Listening,
    xdp: Option<Arc<Mutex<XdpSteering>>>,
    /// The config generations: whose backends' overrides and health an
    /// upgrade carries over.
    reloader: Arc<Reloader>,
    /// XDP links of an earlier generation that this one does not steer
    /// with (it runs without XDP): passed on, so that a later XDP
    /// generation can take them over while that generation still drains.
    carried_links: Vec<InheritedLink>,
    /// Whether this process is the newest: it alone rewrites the
    /// selection program.
    managing: AtomicBool,
    in_progress: AtomicBool,
}

impl Upgrader {
    fn handover(&self) -> Result<Handover, UpgradeError> {
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(UpgradeError::Channel);
        let mut fds = Vec::new();
        let plan = {
            let mut g = self.group.lock().map_err(|_| poisoned())?;
            if g.plan.release_dead(steering::is_alive) {
                let _ = g.select(self.mode, &self.layout, &self.cpus);
            }
            for s in &g.sockets {
                fds.push((FdRole::Udp, dup(s)?));
            }
            g.plan.clone()
        };
        for (a, fd) in &self.listening.worker_tcp {
            fds.push((FdRole::WorkerTcp(*a), dup(fd)?));
        }
        if let Some((a, fd)) = &self.listening.admin {
            fds.push((FdRole::Admin(*a), dup(fd)?));
        }
        for (a, fd) in &self.listening.redirect {
            fds.push((FdRole::Redirect(*a), dup(fd)?));
        }
        if let Some(fd) = &self.listening.control {
            fds.push((FdRole::Control, dup(fd)?));
        }
        let mut links = Vec::new();
        for l in &self.carried_links {
            links.push(InheritedLink {
                interface: l.interface.clone(),
                mode: l.mode,
                link: dup(&l.link)?,
            });
        }
        if let Some(x) = &self.xdp {
            links.extend(x.lock().map_err(|_| poisoned())?.links()?);
        }
        {
            for l in links {
                fds.push((
                    FdRole::XdpLink {
                        interface: l.interface,
                        native: l.mode == AttachMode::Native,
                    },
                    l.link,
                ));
            }
        }
        let backends = upgrade::carry::snapshot(&self.reloader.current().upstreams);
        Ok(Handover {
            plan,
            fds,
            backends,
        })
    }

    /// Starts a successor and hands everything over; on failure takes it
    /// all back. Blocking: run it off the runtime.
    fn upgrade(&self, req: &UpgradeRequest) -> Result<Upgraded, UpgradeError> {
        if self.mode == Effective::Off {
            return Err(UpgradeError::ModeOff);
        }
        if self.in_progress.swap(true, Ordering::AcqRel) {
            return Err(UpgradeError::InProgress);
        }
        let result = self.upgrade_once(req);
        self.in_progress.store(false, Ordering::Release);
        result
    }

    fn upgrade_once(&self, req: &UpgradeRequest) -> Result<Upgraded, UpgradeError> {
        let binary = match &req.binary {
            Some(b) => b.clone(),
            None => upgrade::default_binary()?,
        };
        let timeout = Duration::from_millis(req.timeout_ms.max(1));
        let handover = self.handover()?;
        info!(binary = %binary.display(), descriptors = handover.fds.len(), "upgrade: starting the new process");
        let mut successor = Successor::spawn(&binary, &handover)?;
        drop(handover);
        let pid = successor.pid;
        let (generation, workers) = match successor.wait_ready(timeout) {
            Ok(g) => g,
            Err(e) => {
                successor.abort();
                return Err(e);
            }
        };
        self.managing.store(false, Ordering::Release);
        if let Err(e) = successor.go(Duration::from_secs(10)) {
            successor.abort();
            self.take_back();
            return Err(e);
        }
        successor.release();
        Ok(Upgraded {
            pid,
            generation,
            workers,
        })
    }

    /// After a successor failed past the go-ahead: this process's own
    /// selection program and XDP program again.
    fn take_back(&self) {
        self.managing.store(true, Ordering::Release);
        if let Ok(g) = self.group.lock()
            && let Err(e) = g.select(self.mode, &self.layout, &self.cpus)
        {
            error!(error = %e, "upgrade rollback: cannot re-attach the selection program");
        }
        if let Some(x) = &self.xdp
            && let Ok(mut x) = x.lock()
            && let Err(e) = x.reclaim()
        {
            error!(error = %e, "upgrade rollback: cannot take the XDP links back");
        }
    }

    /// Frees the blocks of generations that have exited, so that their
    /// CIDs fall back to the newest generation.
    fn manage(&self) {
        if !self.managing.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut g) = self.group.lock()
            && g.plan.release_dead(steering::is_alive)
        {
            info!("an earlier generation has exited; its sockets wait for reuse");
            if let Err(e) = g.select(self.mode, &self.layout, &self.cpus) {
                error!(error = %e, "cannot update the selection program");
            }
        }
    }
}

/// The successor that took over.
struct Upgraded {
    pid: u32,
    generation: u8,
    workers: u32,
}

fn poisoned() -> UpgradeError {
    UpgradeError::Protocol("a lock was poisoned".into())
}

fn serve(
    config: Config,
    path: &Path,
    predecessor: Option<Predecessor>,
    mut inherited: Option<Inherited>,
) -> Result<(), ServerError> {
    let fail = |predecessor: &Option<Predecessor>, e: ServerError| {
        if let Some(p) = predecessor {
            p.failed(&e.to_string());
        }
        e
    };
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.state_dir).map_err(|source| {
        fail(
            &predecessor,
            ServerError::StateDir {
                path: config.state_dir.clone(),
                source,
            },
        )
    })?;
    match start(config, path, &predecessor, inherited.as_mut()) {
        Ok(running) => running.serve_until_stopped(predecessor),
        Err(e) => Err(fail(&predecessor, e)),
    }
}

/// A started spooky: workers up, steering installed.
struct Running {
    rt: tokio::runtime::Runtime,
    config: Arc<Config>,
    reloader: Arc<Reloader>,
    upgrader: Arc<Upgrader>,
    handles: Vec<worker::WorkerHandle>,
    drain_tx: watch::Sender<bool>,
    xdp: Option<Arc<Mutex<XdpSteering>>>,
    pending_links: Vec<InheritedLink>,
    generation: u8,
    local: std::net::SocketAddr,
    port: u16,
    n: usize,
    control_listener: Option<std::os::unix::net::UnixListener>,
    inherited_admin: Option<OwnedFd>,
    inherited_redirect: Option<OwnedFd>,
}

fn start(
    config: Arc<Config>,
    path: &Path,
    predecessor: &Option<Predecessor>,
    mut inherited: Option<&mut Inherited>,
) -> Result<Running, ServerError> {
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
    if predecessor.is_some() && mode == Effective::Off {
        return Err(ServerError::Upgrade(UpgradeError::ModeOff));
    }
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
    let group_in = inherited
        .as_deref_mut()
        .map(|i| (std::mem::take(&mut i.udp), i.plan.clone()));
    let group = steering::bind_worker_sockets(
        config.listen.addr,
        &cpus,
        mode,
        &config.steering.layout,
        group_in,
    )?;
    let generation = group.placement.generation;
    let layout = spooky_common::CidLayout::new(
        generation,
        config.steering.layout.node_id(),
        config.steering.layout.cid_len(),
    )
    .map_err(|e| ServerError::Upstream(format!("CID layout: {e}")))?;
    let port = group.port().unwrap_or(config.listen.addr.port());
    // XDP after binding (the program must know the real port); when it
    // cannot be installed in auto mode, the bound group keeps the CBPF
    // program alone.
    let mut xdp: Option<XdpSteering> = None;
    let mut pending_links = Vec::new();
    if mode == Effective::Xdp {
        match install_xdp(&config, port, inherited.as_deref_mut(), &mut pending_links) {
            Ok(x) => xdp = Some(x),
            Err(e) if config.steering.mode == crate::config::SteeringMode::Auto => {
                warn!(error = %e, "XDP steering unavailable; falling back to reuseport");
                mode = Effective::Reuseport;
                if predecessor.is_none() {
                    group.select(mode, &layout, &cpus)?;
                }
            }
            Err(e) => return Err(steering::SteeringError::from(e).into()),
        }
    }
    info!(mode = mode.name(), reason = %why, workers = n, generation, "packet steering");
    if mode != Effective::Xdp && config.steering.initials_per_source.is_some() {
        warn!(
            mode = mode.name(),
            "steering.initials_per_source is not enforced: only the XDP program enforces it"
        );
    }
    // HTTP/2 + HTTP/1.1 over TLS on the same port number (TCP): the
    // predecessor's listeners (the same sockets: no SYN is refused while
    // the processes change), and more when there are more workers now.
    let mut worker_tcp: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
    let mut held_tcp = Vec::new();
    if config.listen.tcp {
        let addr = std::net::SocketAddr::new(config.listen.addr.ip(), port);
        let mut listeners: Vec<std::net::TcpListener> = inherited
            .as_deref_mut()
            .map(|i| i.take_worker_tcp(addr))
            .unwrap_or_default()
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect();
        if listeners.len() < n {
            listeners.extend(
                crate::listener::tcp::bind_reuseport(addr, n - listeners.len())
                    .map_err(|source| ServerError::TcpBind { addr, source })?,
            );
        }
        for (i, l) in listeners.into_iter().enumerate() {
            let fd = OwnedFd::from(
                l.try_clone()
                    .map_err(|source| ServerError::TcpBind { addr, source })?,
            );
            held_tcp.push((addr, fd));
            worker_tcp[i % n].push(l);
        }
    }
    let local = std::net::SocketAddr::new(config.listen.addr.ip(), port);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let first = {
        let _enter = rt.enter();
        Generation::first(config.clone()).map_err(|e| match e {
            ReloadError::Tls(t) => ServerError::Tls(t),
            other => ServerError::Upstream(other.to_string()),
        })?
    };
    if let Some(i) = inherited.as_deref() {
        let matched = upgrade::carry::apply(&first.upstreams, &i.backends);
        info!(
            carried = i.backends.len(),
            matched, "upgrade: backend overrides and health carried over"
        );
    }
    let reloader = Arc::new(Reloader::new(path, first));
    let shared = Arc::new(WorkerShared {
        layout,
        reset_key,
        token_key,
        alt_svc: crate::listener::tcp::alt_svc(port, config.listen.alt_svc_max_age_s),
        connections: reloader.connections.clone(),
    });

    let (drain_tx, drain_rx) = watch::channel(false);
    let (ev_tx, ev_rx) = mpsc::channel();
    let mut handles = Vec::new();
    for (i, tcp) in worker_tcp.into_iter().enumerate() {
        let id = i as u8;
        let socket = group
            .worker_socket(i as u32)
            .map_err(|e| ServerError::Worker {
                id,
                reason: e.to_string(),
            })?;
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
        let failed = |id: u8, reason: String| {
            let _ = drain_tx.send(true);
            ServerError::Worker { id, reason }
        };
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
            Ok(WorkerEvent::Failed { id, error }) => return Err(failed(id, error)),
            Ok(WorkerEvent::Stopped { id }) => {
                return Err(failed(id, "stopped during start-up".into()));
            }
            Err(_) => return Err(failed(ready as u8, "did not start within 30 s".into())),
        }
    }
    if let Some(x) = xdp.as_mut() {
        x.enable().map_err(steering::SteeringError::from)?;
    }
    let xdp = xdp.map(|x| Arc::new(Mutex::new(x)));

    // The control socket, the admin and redirect listeners: inherited, or
    // bound now.
    let control_listener = match inherited.as_deref_mut().and_then(|i| i.control.take()) {
        Some(fd) => std::os::unix::net::UnixListener::from(fd),
        None => {
            upgrade::control::bind(&config.state_dir).map_err(|source| ServerError::StateDir {
                path: upgrade::control::path(&config.state_dir),
                source,
            })?
        }
    };
    let inherited_admin = config
        .admin
        .as_ref()
        .and_then(|a| inherited.as_deref_mut()?.take_admin(a.addr));
    let inherited_redirect = config.listen.http_redirect_port.and_then(|rp| {
        let addr = std::net::SocketAddr::new(config.listen.addr.ip(), rp);
        inherited.as_mut()?.take_redirect(addr)
    });
    let group = Arc::new(Mutex::new(group));
    let upgrader = Arc::new(Upgrader {
        mode,
        layout,
        cpus,
        group,
        listening: Listening {
            worker_tcp: held_tcp,
            admin: None,
            redirect: Vec::new(),
            control: control_listener.try_clone().ok().map(OwnedFd::from),
        },
        xdp: xdp.clone(),
        reloader: reloader.clone(),
        carried_links: if mode == Effective::Xdp {
            Vec::new()
        } else {
            inherited
                .map(|i| std::mem::take(&mut i.links))
                .unwrap_or_default()
        },
        managing: AtomicBool::new(predecessor.is_none()),
        in_progress: AtomicBool::new(false),
    });
    Ok(Running {
        rt,
        config,
        reloader,
        upgrader,
        handles,
        drain_tx,
        xdp,
        pending_links,
        generation,
        local,
        port,
        n,
        control_listener: Some(control_listener),
        inherited_admin,
        inherited_redirect,
    })
}

impl Running {
    fn serve_until_stopped(mut self, predecessor: Option<Predecessor>) -> Result<(), ServerError> {
        let config = self.config.clone();
        let upgraded = predecessor.is_some();
        // Started by an upgrade: take new connections only once the
        // predecessor has stepped back.
        if let Some(p) = predecessor {
            match p.ready(self.generation, self.n as u32, Duration::from_secs(30)) {
                Ok(upgrade::Go::Go) => {}
                Ok(upgrade::Go::PredecessorGone) => {
                    warn!(pid = p.pid, "the previous process is gone; taking over")
                }
                Err(e) => {
                    let _ = self.drain_tx.send(true);
                    return Err(ServerError::Upgrade(e));
                }
            }
            self.take_over().inspect_err(|_| {
                let _ = self.drain_tx.send(true);
            })?;
            p.serving();
        }
        let Running {
            rt,
            reloader,
            upgrader,
            handles,
            drain_tx,
            xdp,
            generation,
            local,
            port,
            n,
            control_listener,
            inherited_admin,
            inherited_redirect,
            ..
        } = self;
        let _enter = rt.enter();
        let mode = upgrader.mode;

        // Control tasks on this thread: health checks, the plain-HTTP
        // redirect, the admin listener, signals.
        reloader.start_health_checks();
        let mut control = Vec::new();
        let mut listening_admin = None;
        let mut listening_redirect = Vec::new();
        if let Some(rp) = config.listen.http_redirect_port {
            let addr = std::net::SocketAddr::new(config.listen.addr.ip(), rp);
            let l = match inherited_redirect {
                Some(fd) => std::net::TcpListener::from(fd),
                None => crate::listener::tcp::bind_reuseport(addr, 1)
                    .map_err(|source| ServerError::TcpBind { addr, source })?
                    .into_iter()
                    .next()
                    .ok_or_else(|| ServerError::TcpBind {
                        addr,
                        source: std::io::Error::other("no listener"),
                    })?,
            };
            if let Ok(fd) = l.try_clone() {
                listening_redirect.push((addr, OwnedFd::from(fd)));
            }
            control.push(rt.spawn(crate::listener::tcp::serve_redirect(l, port)));
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
            let listener = match inherited_admin {
                Some(fd) => std::net::TcpListener::from(fd),
                None => std::net::TcpListener::bind(addr)
                    .map_err(|source| ServerError::TcpBind { addr, source })?,
            };
            if let Ok(fd) = listener.try_clone() {
                listening_admin = Some((addr, OwnedFd::from(fd)));
            }
            let task = crate::admin::serve_on(listener, admin_state.clone())
                .map_err(|source| ServerError::TcpBind { addr, source })?;
            control.push(task);
        }
        // The upgrader hands these over too.
        let upgrader = match Arc::try_unwrap(upgrader) {
            Ok(mut u) => {
                u.listening.admin = listening_admin;
                u.listening.redirect = listening_redirect;
                u.managing.store(true, Ordering::Release);
                Arc::new(u)
            }
            Err(shared) => shared,
        };
        crate::metrics::LIVE
            .process_generation
            .set(i64::from(generation));
        info!(%local, workers = n, mode = mode.name(), generation, "spooky ready");
        notify_systemd(upgraded);

        let outcome = rt.block_on(serve_signals(&reloader, upgrader.clone(), control_listener));
        match &outcome {
            Outcome::Stop(signal) => info!(signal, "draining"),
            Outcome::HandedOver { pid, generation } => {
                info!(
                    pid,
                    generation, "upgrade: the new process serves; draining this one"
                )
            }
        }
        // After a hand-over the successor accepts on the same listeners:
        // stop accepting here at once.
        if matches!(outcome, Outcome::HandedOver { .. }) {
            for t in control.drain(..) {
                t.abort();
            }
        }
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
        // Release the links now rather than when the last reference (the
        // admin state) goes: the program must not outlive the sockets it
        // steers to (unless a successor holds the links: then it stays).
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

    /// The successor's switch: the selection program for the plan with
    /// this generation as the newest, then the XDP links.
    fn take_over(&mut self) -> Result<(), ServerError> {
        {
            let mut g = self
                .upgrader
                .group
                .lock()
                .map_err(|_| ServerError::Upgrade(poisoned()))?;
            g.plan.promote(self.generation);
            g.select(
                self.upgrader.mode,
                &self.upgrader.layout,
                &self.upgrader.cpus,
            )?;
        }
        if let Some(x) = &self.xdp {
            let mut x = x.lock().map_err(|_| ServerError::Upgrade(poisoned()))?;
            for link in std::mem::take(&mut self.pending_links) {
                x.adopt(link).map_err(steering::SteeringError::from)?;
            }
        }
        Ok(())
    }
}

/// Tells systemd (`Type=notify`) that spooky is ready; after an upgrade,
/// also that this process is the service's main process now.
fn notify_systemd(upgraded: bool) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = if upgraded {
        format!("MAINPID={}\nREADY=1\n", std::process::id())
    } else {
        "READY=1\n".to_owned()
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = socket.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(message.as_bytes(), &a))
    } else {
        sock.send_to(message.as_bytes(), std::path::Path::new(&socket))
    };
    if let Err(e) = sent {
        warn!(error = %e, "cannot notify systemd");
    }
}

fn install_xdp(
    config: &Config,
    port: u16,
    mut inherited: Option<&mut Inherited>,
    pending: &mut Vec<InheritedLink>,
) -> Result<XdpSteering, steering::xdp::XdpError> {
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
        // An interface the predecessor steers keeps its program until
        // the go-ahead, then its link points at ours.
        if let Some(link) = inherited.as_deref_mut().and_then(|i| i.take_link(iface)) {
            pending.push(link);
            continue;
        }
        let how = x.attach(iface)?;
        info!(interface = %iface, mode = ?how, "XDP program attached");
    }
    Ok(x)
}

/// How the control loop ended.
enum Outcome {
    Stop(&'static str),
    HandedOver { pid: u32, generation: u8 },
}

/// Serves SIGHUP (reload), SIGUSR2 and the control socket (upgrade) until
/// SIGTERM or SIGINT, or until a successor took over.
async fn serve_signals(
    reloader: &Reloader,
    upgrader: Arc<Upgrader>,
    control: Option<std::os::unix::net::UnixListener>,
) -> Outcome {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut usr2)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined2()),
    ) else {
        warn!("cannot install SIGHUP/SIGUSR2 handlers; reload through the admin API");
        return Outcome::Stop(wait_for_stop().await);
    };
    let control = control.and_then(|l| {
        l.set_nonblocking(true).ok()?;
        tokio::net::UnixListener::from_std(l).ok()
    });
    let stop = wait_for_stop();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let request = tokio::select! {
            s = &mut stop => return Outcome::Stop(s),
            _ = hup.recv() => {
                info!(signal = "SIGHUP", "reloading the config");
                // Errors are logged by the reloader.
                let _ = reloader.reload();
                continue;
            }
            _ = tick.tick() => {
                upgrader.manage();
                continue;
            }
            _ = usr2.recv() => {
                info!(signal = "SIGUSR2", "upgrade requested");
                (UpgradeRequest { binary: None, timeout_ms: DEFAULT_UPGRADE_TIMEOUT_MS }, None)
            }
            accepted = async {
                match &control {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(stream) = stream.into_std() else { continue };
                let _ = stream.set_nonblocking(false);
                match tokio::task::spawn_blocking(move || {
                    upgrade::control::read_request(&stream).map(|r| (r, stream))
                })
                .await
                {
                    Ok(Ok((req, stream))) => {
                        info!(binary = ?req.binary, timeout_ms = req.timeout_ms, "upgrade requested on the control socket");
                        (req, Some(stream))
                    }
                    _ => continue,
                }
            }
        };
        let (req, reply_to) = request;
        let u = upgrader.clone();
        let result = tokio::task::spawn_blocking(move || u.upgrade(&req))
            .await
            .unwrap_or_else(|e| Err(UpgradeError::Protocol(e.to_string())));
        let reply = match &result {
            Ok(u) => {
                crate::metrics::LIVE
                    .upgrades
                    .with_label_values(&["ok"])
                    .inc();
                UpgradeReply {
                    ok: true,
                    message: format!(
                        "upgraded: pid {} (generation {}, {} workers) serves; pid {} drains",
                        u.pid,
                        u.generation,
                        u.workers,
                        std::process::id()
                    ),
                }
            }
            Err(e) => {
                crate::metrics::LIVE
                    .upgrades
                    .with_label_values(&["failed"])
                    .inc();
                error!(error = %e, "upgrade failed; this process keeps serving");
                UpgradeReply {
                    ok: false,
                    message: format!(
                        "upgrade failed, pid {} keeps serving: {e}",
                        std::process::id()
                    ),
                }
            }
        };
        if let Some(stream) = reply_to {
            let _ =
                tokio::task::spawn_blocking(move || upgrade::control::write_reply(&stream, &reply))
                    .await;
        }
        if let Ok(u) = result {
            return Outcome::HandedOver {
                pid: u.pid,
                generation: u.generation,
            };
        }
    }
}

/// How long a successor may take to become ready (SIGUSR2; `spooky
/// upgrade --timeout` sets it per request).
pub const DEFAULT_UPGRADE_TIMEOUT_MS: u64 = 30_000;

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
