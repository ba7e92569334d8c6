//! Worker threads: one per CPU by default, each pinned to its CPU with its
//! own current-thread tokio runtime, its own quinn server endpoint (on its
//! own `SO_REUSEPORT` socket, issuing CIDs that name the worker), its own
//! quinn client endpoint and upstream pools. Nothing on the request path is
//! shared between workers except atomics.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::cid::RoutableCidGenerator;
use crate::config::Config;
use crate::listener::{self, Activity};
use crate::proxy::Proxy;
use crate::upstream::{SharedUpstreams, WorkerUpstreams};

/// Process-wide material every worker builds its endpoint from.
pub struct WorkerShared {
    pub config: Arc<Config>,
    pub server_crypto: Arc<quinn::crypto::rustls::QuicServerConfig>,
    /// Stateless-reset key: the same in every worker and across restarts,
    /// so a worker can reset connections its predecessor in an earlier
    /// process owned (its CID validation still ignores other workers'
    /// CIDs: a packet steered to the wrong worker is dropped, not answered
    /// with a reset that would kill a healthy connection).
    pub reset_key: Arc<ring::hmac::Key>,
    /// Address-validation token key, shared so that a token issued by one
    /// worker validates on another.
    pub token_key: Arc<ring::hkdf::Prk>,
    pub upstreams: Arc<SharedUpstreams>,
    /// TLS for the TCP listener (HTTP/2, HTTP/1.1), when enabled.
    pub tcp_tls: Option<Arc<rustls::ServerConfig>>,
    /// `alt-svc` advertised on TCP responses.
    pub alt_svc: http::HeaderValue,
}

/// What a worker reports to the main thread.
#[derive(Debug)]
pub enum WorkerEvent {
    Ready { id: u8 },
    Failed { id: u8, error: String },
    Stopped { id: u8 },
}

/// A running worker thread.
pub struct WorkerHandle {
    pub id: u8,
    pub cpu: Option<usize>,
    pub thread: JoinHandle<()>,
}

/// Starts worker `id` on `socket`, pinned to `cpu` when given.
pub fn spawn(
    id: u8,
    cpu: Option<usize>,
    socket: UdpSocket,
    tcp: Option<std::net::TcpListener>,
    shared: Arc<WorkerShared>,
    drain: watch::Receiver<bool>,
    events: mpsc::Sender<WorkerEvent>,
) -> std::io::Result<WorkerHandle> {
    let thread = std::thread::Builder::new()
        .name(format!("spooky-w{id}"))
        .spawn(move || {
            if let Some(cpu) = cpu
                && let Err(e) = crate::steering::pin_current_thread(cpu)
            {
                warn!(worker = id, cpu, error = %e, "cannot pin worker to its CPU");
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = events.send(WorkerEvent::Failed {
                        id,
                        error: format!("runtime: {e}"),
                    });
                    return;
                }
            };
            if let Err(error) = rt.block_on(run(id, socket, tcp, shared, drain, events.clone())) {
                error!(worker = id, %error, "worker failed");
                let _ = events.send(WorkerEvent::Failed { id, error });
                return;
            }
            let _ = events.send(WorkerEvent::Stopped { id });
        })?;
    Ok(WorkerHandle { id, cpu, thread })
}

fn server_config(shared: &WorkerShared) -> quinn::ServerConfig {
    let cfg = &shared.config;
    let mut sc = quinn::ServerConfig::new(shared.server_crypto.clone(), shared.token_key.clone());
    sc.transport_config(Arc::new(listener::server_transport(
        cfg.limits.max_concurrent_streams,
        cfg.timeouts.idle,
    )));
    sc.migration(true);
    sc
}

async fn run(
    id: u8,
    socket: UdpSocket,
    tcp: Option<std::net::TcpListener>,
    shared: Arc<WorkerShared>,
    mut drain: watch::Receiver<bool>,
    events: mpsc::Sender<WorkerEvent>,
) -> Result<(), String> {
    let cfg = shared.config.clone();
    let mut endpoint_config = quinn::EndpointConfig::new(shared.reset_key.clone());
    // Clients may only clear the QUIC fixed bit ("greasing", RFC 9287) if
    // we allow it; the XDP program drops packets without it as not-QUIC.
    endpoint_config.grease_quic_bit(false);
    endpoint_config.cid_generator(move || {
        Box::new(RoutableCidGenerator::new(cfg.steering.layout, id))
            as Box<dyn quinn_proto::ConnectionIdGenerator>
    });
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config(&shared)),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("endpoint on {local}: {e}"))?;
    let client =
        crate::upstream::h3::client_endpoint().map_err(|e| format!("client endpoint: {e}"))?;
    let upstreams = WorkerUpstreams::new(&shared.upstreams, client.clone(), &shared.config);
    let proxy = Arc::new(Proxy {
        config: shared.config.clone(),
        upstreams,
    });
    let activity = Arc::new(Activity::default());

    let reaper_proxy = proxy.clone();
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            reaper_proxy.upstreams.reap(tokio::time::Instant::now());
        }
    });

    let tcp_task = match (tcp, &shared.tcp_tls) {
        (Some(l), Some(tls)) => Some(tokio::spawn(listener::tcp::serve(
            l,
            tls.clone(),
            shared.alt_svc.clone(),
            proxy.clone(),
            activity.clone(),
            drain.clone(),
        ))),
        _ => None,
    };
    listener::log_listening(id as usize, local);
    let _ = events.send(WorkerEvent::Ready { id });

    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                tokio::spawn(listener::serve_connection(
                    incoming,
                    proxy.clone(),
                    activity.clone(),
                    drain.clone(),
                ));
            }
            changed = drain.changed() => {
                if changed.is_err() || *drain.borrow() {
                    break;
                }
            }
        }
    }

    // Drain: refuse new connections, let open ones finish their requests
    // (they got GOAWAY from the same signal), then close.
    endpoint.set_server_config(None);
    if let Some(t) = tcp_task {
        // It stops accepting on the same signal; open TCP connections got
        // GOAWAY / connection: close and are counted in `activity`.
        let _ = tokio::time::timeout(Duration::from_millis(100), t).await;
    }
    let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
    loop {
        let conns = activity.connections.load(Ordering::Acquire);
        let reqs = activity.requests.load(Ordering::Acquire);
        if reqs == 0 || tokio::time::Instant::now() >= deadline {
            if reqs > 0 {
                warn!(
                    worker = id,
                    requests = reqs,
                    "drain timeout: closing with requests in flight"
                );
            }
            debug!(worker = id, connections = conns, "drained");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoint.close(quinn::VarInt::from_u32(0x100), b"shutting down");
    proxy.upstreams.close_all();
    reaper.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    client.close(quinn::VarInt::from_u32(0x100), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_millis(500), client.wait_idle()).await;
    info!(worker = id, "worker stopped");
    Ok(())
}
