//! HTTP/3 downstream: accepts QUIC connections on the worker's endpoint,
//! runs HTTP/3 on them, and turns each request stream into an
//! `http::Request<ProxyBody>` for the proxy and the proxy's response back
//! into HEADERS, DATA and trailers. A malformed request or a client reset
//! ends only its own stream. A request head is validated
//! ([`crate::validate`]) before it goes upstream, and its body is held to
//! its `content-length`: a mismatch aborts the upstream request and resets
//! the stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Activity, Counted, GaugeGuard};
use crate::body::{self, H3Body, H3SendHalf, IdleTimeout, MalformedBody, SendBodyError};
use crate::limits::ConnectionSlot;
use crate::metrics::LIVE;
use crate::proxy::{Downstream, Proxy, ProxyHandle};
use crate::validate::{self, ClientVersion};

type ServerConn = h3::server::Connection<h3_quinn::Connection, Bytes>;

/// Serves one incoming QUIC connection until it closes or the worker
/// drains (then GOAWAY, finish in-flight requests, close).
pub async fn serve_connection(
    incoming: quinn::Incoming,
    _slot: ConnectionSlot,
    proxy: ProxyHandle,
    activity: Arc<Activity>,
    mut draining: watch::Receiver<bool>,
) {
    let _conn_guard = Counted::new(&activity.connections);
    let peer = incoming.remote_address();
    let started = std::time::Instant::now();
    let failed = |e: &dyn std::fmt::Display| {
        LIVE.handshakes.with_label_values(&["failed"]).inc();
        debug!(%peer, error = %e, "handshake failed");
    };
    let handshake = Counted::new(&activity.handshakes);
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    // With early data on, the connection is served from the client's
    // first flight (0-RTT); requests that arrive before the handshake
    // completes are early data. `handshake_done` says when that ended.
    let early_data = proxy.load().config.listen.early_data;
    let zero_rtt = if early_data {
        connecting.into_0rtt()
    } else {
        Err(connecting)
    };
    let (quic, handshake_done) = match zero_rtt {
        Ok((quic, accepted)) => {
            drop(handshake);
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (flag, activity) = (done.clone(), activity.clone());
            tokio::spawn(async move {
                let _in_progress = Counted::new(&activity.handshakes);
                let zero_rtt = accepted.await;
                flag.store(true, std::sync::atomic::Ordering::Release);
                LIVE.handshakes.with_label_values(&["accepted"]).inc();
                LIVE.handshake_duration
                    .observe(started.elapsed().as_secs_f64());
                debug!(%peer, zero_rtt, "handshake complete");
            });
            (quic, Some(done))
        }
        Err(connecting) => match connecting.await {
            Ok(quic) => {
                drop(handshake);
                LIVE.handshakes.with_label_values(&["accepted"]).inc();
                LIVE.handshake_duration
                    .observe(started.elapsed().as_secs_f64());
                (quic, None)
            }
            Err(e) => return failed(&e),
        },
    };
    let _open = GaugeGuard::new(&LIVE.quic_connections);
    let max_header = proxy.load().config.limits.max_request_header_bytes;
    let mut h3: ServerConn = match h3::server::builder()
        .max_field_section_size(max_header)
        // Grease frames after a response's DATA hide the end of the stream
        // from some clients (aioquic 1.2 never reports the response
        // complete); greasing buys nothing on a proxy's server side.
        .send_grease(false)
        .build(h3_quinn::Connection::new(quic.clone()))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            debug!(%peer, error = %e, "HTTP/3 setup failed");
            return;
        }
    };
    debug!(%peer, "connection open");
    // Requests of this connection still running: the h3 connection must
    // outlive them (dropping it closes the QUIC connection).
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut goaway_sent = *draining.borrow();
    // While draining, the connection counts as work in flight until it has
    // delivered everything (see `settle`), so the worker's drain waits.
    let mut drain_guard = None;
    if goaway_sent {
        drain_guard = Some(Counted::new(&activity.requests));
        let _ = h3.shutdown(0).await;
    }
    let mut drained_check = tokio::time::interval(Duration::from_millis(20));
    let mut accepted_any = false;
    let mut goaway_at: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    accepted_any = true;
                    // quinn tracks the client's current address: it changes
                    // when the client migrates.
                    let peer_now = quic.remote_address();
                    // Accepted before the handshake completed: 0-RTT.
                    let early_data = handshake_done
                        .as_ref()
                        .is_some_and(|d| !d.load(std::sync::atomic::Ordering::Acquire));
                    // The generation current now serves the whole request.
                    let proxy = proxy.load_full();
                    let activity = activity.clone();
                    let in_flight = in_flight.clone();
                    tokio::spawn(async move {
                        let _req_guard = Counted::new(&activity.requests);
                        let _conn_req = Counted::new(&in_flight);
                        let _stream = GaugeGuard::new(&LIVE.quic_streams);
                        let down = Downstream {
                            peer: peer_now,
                            via_version: "3",
                            scheme: "https",
                            early_data,
                        };
                        // Boxed: the request future is large, and a small
                        // task cell keeps spawning cheap.
                        Box::pin(serve_request(resolver, proxy, down)).await;
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    match e.local_code() {
                        // spooky closed it for a protocol error it found:
                        // counted, and a flood or oversized frame is logged
                        // as the attack it is.
                        Some(code) if code != h3::error::Code::H3_NO_ERROR => {
                            let name = code.to_string().to_ascii_lowercase();
                            LIVE.h3_connection_errors.with_label_values(&[&name]).inc();
                            if code == h3::error::Code::H3_EXCESSIVE_LOAD {
                                warn!(peer = %quic.remote_address(), error = %e, "HTTP/3 connection closed: excessive load");
                            } else {
                                info!(peer = %quic.remote_address(), error = %e, "HTTP/3 connection closed: protocol error");
                            }
                        }
                        _ if !e.is_h3_no_error() => debug!(%peer, error = %e, "connection ended"),
                        _ => {}
                    }
                    break;
                }
            },
            changed = draining.changed(), if !goaway_sent => {
                if changed.is_err() || *draining.borrow() {
                    goaway_sent = true;
                    drain_guard = Some(Counted::new(&activity.requests));
                    // GOAWAY: no new requests; in-flight ones finish. Its
                    // stream id is the next one not yet accepted, so every
                    // request the client may still send is refused by the
                    // client itself (and safe to retry elsewhere).
                    // A connection that has not sent its first request yet
                    // (it was accepted in the instant before the drain, e.g.
                    // by the old process of an upgrade) gets that one
                    // request: the client sent it before it could see the
                    // GOAWAY, and h3 clients do not retry it elsewhere.
                    let grace = usize::from(!accepted_any);
                    goaway_at = Some(std::time::Instant::now());
                    if let Err(e) = h3.shutdown(grace).await {
                        debug!(%peer, error = %e, "GOAWAY failed");
                    }
                }
            }
            // h3 keeps `accept` pending after GOAWAY until the client
            // closes: leave once the accepted requests are done.
            _ = drained_check.tick(), if goaway_sent => {
                // (A connection given its first request waits a moment for
                // it to arrive.)
                let waited = goaway_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(1));
                if in_flight.load(std::sync::atomic::Ordering::Acquire) == 0 && (accepted_any || waited) {
                    break;
                }
            }
        }
    }
    // Responses may still be streaming when `accept` ends.
    while in_flight.load(std::sync::atomic::Ordering::Acquire) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if goaway_sent {
        settle(&quic).await;
    }
    drop(drain_guard);
    debug!(%peer, "connection closed");
}

/// Waits until the connection has delivered what its finished responses
/// left in quinn's send buffers (up to the connection's send window): a
/// close now would discard unacknowledged stream data and cut the tails of
/// downloads that spooky considers complete. Done when the client closes,
/// or when nothing was sent for a second (and four round trips): all data
/// is acknowledged, or the client stopped reading. quinn does not expose
/// the unacknowledged byte count, so silence is the signal; a second
/// outlasts the loss-recovery probes (which back off exponentially) of a
/// client that pauses briefly, e.g. on a busy CPU. The worker's drain
/// deadline bounds it.
async fn settle(quic: &quinn::Connection) {
    let mut sent = quic.stats().udp_tx.bytes;
    loop {
        let quiet = (quic.rtt() * 4).max(Duration::from_secs(1));
        tokio::select! {
            _ = quic.closed() => return,
            _ = tokio::time::sleep(quiet) => {}
        }
        let now = quic.stats().udp_tx.bytes;
        if now == sent {
            return;
        }
        sent = now;
    }
}

async fn serve_request(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    proxy: Arc<Proxy>,
    down: Downstream,
) {
    let header_timeout = proxy.config.limits.request_header_timeout;
    let resolved = match tokio::time::timeout(header_timeout, resolver.resolve_request()).await {
        Ok(r) => r,
        Err(_) => {
            // Dropping the resolver resets the stream; the connection and
            // its other requests carry on.
            debug!(peer = %down.peer, ms = header_timeout.as_millis() as u64, "request headers not received in time");
            return;
        }
    };
    let (req, stream) = match resolved {
        Ok(r) => r,
        Err(e) => {
            // Malformed headers, too large a header section, or a reset
            // before the headers: only this stream is affected.
            debug!(peer = %down.peer, error = %e, "bad request stream");
            return;
        }
    };
    let (mut parts, ()) = req.into_parts();
    let (mut send, mut recv) = stream.split();
    let validated = match validate::validate(&parts, ClientVersion::Http3) {
        Ok(v) => v,
        Err(violation) => {
            // 400 first (RFC 9114 §4.1.2 allows a response before closing),
            // then STOP_SENDING: the body, if any, is of no use.
            let resp = proxy.reject_malformed(&parts, down, &violation);
            recv.stop_sending(h3::error::Code::H3_MESSAGE_ERROR);
            send_response(send, resp, down).await;
            return;
        }
    };
    validate::normalize_content_length(&mut parts.headers, validated);
    let idle = proxy.config.timeouts.idle;
    let malformed_body = MalformedBody::default();
    let body = body::boxed(IdleTimeout::new(
        H3Body::enforcing(recv, validated.content_length, malformed_body.clone())
            .with_trailers_timeout(header_timeout),
        idle,
    ));
    let req = http::Request::from_parts(parts, body);
    let resp = proxy.handle(req, down).await;
    if malformed_body.detected() {
        // The body broke its content-length after the request went
        // upstream (which the failed body aborted): whatever came back
        // answers a request the client did not send. RFC 9114 §4.1.2:
        // a stream error of type H3_MESSAGE_ERROR.
        validate::MALFORMED_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(peer = %down.peer, "request body disagrees with content-length; stream reset");
        send.stop_stream(h3::error::Code::H3_MESSAGE_ERROR);
        return;
    }
    send_response(send, resp, down).await;
}

async fn send_response(
    send: h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    resp: Response<body::ProxyBody>,
    down: Downstream,
) {
    let (parts, body) = resp.into_parts();
    let mut half = H3SendHalf::Server(send);
    if let H3SendHalf::Server(s) = &mut half
        && let Err(e) = s.send_response(Response::from_parts(parts, ())).await
    {
        debug!(peer = %down.peer, error = %e, "client went away before the response");
        return;
    }
    match body::send_h3(body, &mut half).await {
        Ok(_) => {}
        Err(SendBodyError::Source(e)) => {
            // The backend's body failed mid-way: the reset tells the client
            // the response is incomplete.
            LIVE.stream_resets.with_label_values(&["spooky"]).inc();
            warn!(peer = %down.peer, error = %e, "response body failed; stream reset");
        }
        Err(SendBodyError::Peer(e)) => {
            LIVE.stream_resets.with_label_values(&["client"]).inc();
            debug!(peer = %down.peer, error = %e, "client stopped reading the response");
        }
    }
}

/// The downstream QUIC transport: stream limits and flow-control windows
/// sized so that one connection cannot make spooky buffer without bound.
pub fn server_transport(max_streams: u32, idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into());
    // Clients open the control and QPACK streams; servers never need push.
    t.max_concurrent_uni_streams(8u32.into());
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    // A 1 MiB window per stream keeps a 100 Mbit/s flow at 100 ms RTT
    // unthrottled; 16 MiB per connection caps what one client can park in
    // our receive buffers.
    t.stream_receive_window((1u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(16 << 20);
    t
}

/// Log line for a new worker endpoint.
pub fn log_listening(worker: usize, addr: std::net::SocketAddr) {
    info!(worker, %addr, "worker listening");
}
