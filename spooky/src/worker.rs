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
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use spooky_common::CidLayout;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::cid::RoutableCidGenerator;
use crate::limits::ConnectionsPerClient;
use crate::listener::{self, Activity};
use crate::metrics::LIVE;
use crate::proxy::{Proxy, ProxyHandle};
use crate::reload::Generation;
use crate::upstream::WorkerUpstreams;

/// Process-wide material every worker builds its endpoint from; what a
/// reload may change comes with each [`Generation`] instead.
pub struct WorkerShared {
    /// The CID layout (restart-only: the XDP program reads it too).
    pub layout: CidLayout,
    /// Stateless-reset key: the same in every worker and across restarts,
    /// so a worker can reset connections its predecessor in an earlier
    /// process owned (its CID validation still ignores other workers'
    /// CIDs: a packet steered to the wrong worker is dropped, not answered
    /// with a reset that would kill a healthy connection).
    pub reset_key: Arc<ring::hmac::Key>,
    /// Address-validation token key, shared so that a token issued by one
    /// worker validates on another.
    pub token_key: Arc<ring::hkdf::Prk>,
    /// `alt-svc` advertised on TCP responses.
    pub alt_svc: http::HeaderValue,
    /// Open connections per client, across workers and generations.
    pub connections: Arc<ConnectionsPerClient>,
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

/// How the main thread talks to a worker.
pub struct WorkerChannels {
    /// New config generations.
    pub generations: watch::Receiver<Arc<Generation>>,
    /// Becomes true when the worker must drain.
    pub drain: watch::Receiver<bool>,
    /// Ready / failed / stopped.
    pub events: mpsc::Sender<WorkerEvent>,
}

/// Starts worker `id` on `socket`, pinned to `cpu` when given.
pub fn spawn(
    id: u8,
    cpu: Option<usize>,
    socket: UdpSocket,
    tcp: Vec<std::net::TcpListener>,
    shared: Arc<WorkerShared>,
    channels: WorkerChannels,
) -> std::io::Result<WorkerHandle> {
    let WorkerChannels {
        generations,
        drain,
        events,
    } = channels;
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
            if let Err(error) = rt.block_on(run(
                id,
                socket,
                tcp,
                shared,
                generations,
                drain,
                events.clone(),
            )) {
                error!(worker = id, %error, "worker failed");
                let _ = events.send(WorkerEvent::Failed { id, error });
                return;
            }
            let _ = events.send(WorkerEvent::Stopped { id });
        })?;
    Ok(WorkerHandle { id, cpu, thread })
}

fn server_config(shared: &WorkerShared, generation: &Generation) -> quinn::ServerConfig {
    let cfg = &generation.config;
    let mut sc = quinn::ServerConfig::new(generation.quic_tls.clone(), shared.token_key.clone());
    sc.transport_config(Arc::new(listener::server_transport(
        cfg.limits.max_concurrent_streams,
        cfg.timeouts.idle,
    )));
    sc.migration(true);
    sc
}

/// Whether a new QUIC connection may proceed: the half-open cap, Retry
/// for unvalidated addresses above the threshold (RFC 9000 §8.1.2: the
/// client must prove it owns its address before we spend a handshake on
/// it), the new-connection rate and the per-client connection limit.
fn admit(
    incoming: quinn::Incoming,
    proxy: &Proxy,
    shared: &WorkerShared,
    activity: &Activity,
) -> Option<(quinn::Incoming, crate::limits::ConnectionSlot)> {
    let limits = &proxy.config.limits;
    let in_progress = activity.handshakes.load(Ordering::Acquire);
    let outcome = |o: &str| LIVE.handshakes.with_label_values(&[o]).inc();
    if in_progress >= limits.max_handshakes_in_progress as usize {
        outcome("refused_half_open");
        incoming.ignore();
        return None;
    }
    if !incoming.remote_address_validated()
        && in_progress >= limits.retry_threshold as usize
        && incoming.may_retry()
    {
        outcome("retry");
        if let Err(e) = incoming.retry() {
            // Only when a Retry is not allowed, which we checked.
            e.into_incoming().ignore();
        }
        return None;
    }
    if !proxy.limits.check_handshake(Instant::now()) {
        outcome("refused_rate");
        incoming.refuse();
        return None;
    }
    let Some(slot) = shared.connections.try_open(incoming.remote_address().ip()) else {
        outcome("refused_per_client");
        incoming.refuse();
        return None;
    };
    Some((incoming, slot))
}

async fn run(
    id: u8,
    socket: UdpSocket,
    tcp: Vec<std::net::TcpListener>,
    shared: Arc<WorkerShared>,
    mut generations: watch::Receiver<Arc<Generation>>,
    mut drain: watch::Receiver<bool>,
    events: mpsc::Sender<WorkerEvent>,
) -> Result<(), String> {
    let generation = generations.borrow_and_update().clone();
    let mut endpoint_config = quinn::EndpointConfig::new(shared.reset_key.clone());
    // Clients may only clear the QUIC fixed bit ("greasing", RFC 9287) if
    // we allow it; the XDP program drops packets without it as not-QUIC.
    endpoint_config.grease_quic_bit(false);
    let layout = shared.layout;
    endpoint_config.cid_generator(move || {
        Box::new(RoutableCidGenerator::new(layout, id))
            as Box<dyn quinn_proto::ConnectionIdGenerator>
    });
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config(&shared, &generation)),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("endpoint on {local}: {e}"))?;
    let client =
        crate::upstream::h3::client_endpoint().map_err(|e| format!("client endpoint: {e}"))?;
    let upstreams = WorkerUpstreams::new(&generation.upstreams, client.clone(), &generation.config);
    let proxy: ProxyHandle = Arc::new(ArcSwap::from_pointee(Proxy::new(&generation, upstreams)));
    let activity = Arc::new(Activity::default());

    let reaper_proxy = proxy.clone();
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            reaper_proxy
                .load()
                .upstreams
                .reap(tokio::time::Instant::now());
        }
    });

    // Usually one listener; more when a predecessor with more workers
    // handed its listeners over (each must be accepted on, or the SYNs
    // queued on it would wait).
    let tcp_tasks: Vec<_> = tcp
        .into_iter()
        .map(|l| {
            tokio::spawn(listener::tcp::serve(
                l,
                shared.connections.clone(),
                shared.alt_svc.clone(),
                proxy.clone(),
                activity.clone(),
                drain.clone(),
            ))
        })
        .collect();
    listener::log_listening(id as usize, local);
    let _ = events.send(WorkerEvent::Ready { id });

    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Some((incoming, slot)) = admit(incoming, &proxy.load(), &shared, &activity) else {
                    continue;
                };
                tokio::spawn(listener::serve_connection(
                    incoming,
                    slot,
                    proxy.clone(),
                    activity.clone(),
                    drain.clone(),
                ));
            }
            changed = generations.changed() => {
                if changed.is_err() {
                    continue;
                }
                let generation = generations.borrow_and_update().clone();
                let current = proxy.load_full();
                let upstreams = current.upstreams.reload(&generation.upstreams, client.clone(), &generation.config);
                proxy.store(Arc::new(Proxy::new(&generation, upstreams)));
                // New connections get the new certificate and limits; open
                // ones keep theirs.
                endpoint.set_server_config(Some(server_config(&shared, &generation)));
                debug!(worker = id, generation = generation.number, "serving the new config generation");
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
    for t in tcp_tasks {
        // It stops accepting on the same signal; open TCP connections got
        // GOAWAY / connection: close and are counted in `activity`.
        let _ = tokio::time::timeout(Duration::from_millis(100), t).await;
    }
    let deadline = tokio::time::Instant::now() + proxy.load().config.drain_timeout;
    // Progress every 5 s: after an upgrade this is how an operator follows
    // the old generation (its admin listener belongs to the new one).
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
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
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = progress.tick() => info!(
                worker = id,
                requests = reqs,
                connections = conns,
                "draining"
            ),
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0x100), b"shutting down");
    proxy.load().upstreams.close_all();
    reaper.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    client.close(quinn::VarInt::from_u32(0x100), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_millis(500), client.wait_idle()).await;
    info!(worker = id, "worker stopped");
    Ok(())
}
