//! Lifetime rules of one downstream TCP connection (HTTP/2 and HTTP/1.1):
//! the idle timeout (no request in flight), the HTTP/1.1 header-read
//! timeout and the optional maximum age. hyper has none of these for
//! HTTP/2 (its PING keep-alive only proves the peer is alive), and its
//! HTTP/1.1 header-read timer also runs while a keep-alive connection
//! waits for the next request, which ties the keep-alive idle time to the
//! header timeout. So spooky keeps the state itself: requests in flight
//! (until their response body is done), when the connection went idle,
//! and when the next HTTP/1.1 request head started to arrive.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// `head_started` when no request head is arriving.
const NONE: u64 = u64::MAX;

/// What ends a connection when its deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request in flight for the idle timeout: GOAWAY (HTTP/2) or close
    /// (HTTP/1.1, between requests).
    Idle,
    /// An HTTP/1.1 request head did not complete in time: close at once
    /// (what hyper's own header timeout does).
    HeaderRead,
}

/// The timeouts one connection runs under.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub header_read: Duration,
}

/// The shared state of one connection: updated by its I/O (bytes read)
/// and its requests, read by the task that enforces the deadlines.
#[derive(Debug)]
pub struct ConnState {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when the last request ended (0 at start).
    idle_since: AtomicU64,
    /// Milliseconds since `epoch` of the first byte read with no request in
    /// flight, i.e. the start of the next HTTP/1.1 request head; `NONE`.
    head_started: AtomicU64,
    /// HTTP/2: no header-read timeout (bytes between streams are PINGs,
    /// SETTINGS and the like, not a request head).
    h2: AtomicBool,
    /// Signalled when a deadline may have moved.
    changed: Notify,
}

impl ConnState {
    /// A connection that starts now. An HTTP/1.1 connection's first
    /// request head is due within the header timeout from the start, as
    /// with hyper's timer; an HTTP/2 one starts idle.
    pub fn new(h2: bool) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(if h2 { NONE } else { 0 }),
            h2: AtomicBool::new(h2),
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// A request arrived; it counts as in flight until the guard (moved
    /// into its response body) is dropped.
    pub fn request_started(self: &Arc<Self>, is_h2: bool) -> RequestGuard {
        if is_h2 {
            // Without ALPN, hyper may still have detected the HTTP/2 preface.
            self.h2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }

    fn request_ended(&self) {
        // Reset the idle clock before the count drops, so that a reader that
        // sees no request in flight also sees the fresh clock.
        self.idle_since.store(self.now_ms(), Ordering::Release);
        self.head_started.store(NONE, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// Bytes arrived from the client.
    fn bytes_read(&self) {
        if self.h2.load(Ordering::Relaxed) || self.in_flight.load(Ordering::Acquire) != 0 {
            return;
        }
        if self
            .head_started
            .compare_exchange(NONE, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // The header deadline may be earlier than the idle one.
            self.changed.notify_one();
        }
    }

    /// The next deadline and what happens at it; `None` while a request is
    /// in flight (its body has its own idle timeout).
    pub fn deadline(&self, t: &Timeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        let at = |ms: u64, d: Duration| self.epoch + Duration::from_millis(ms) + d;
        let head = self.head_started.load(Ordering::Acquire);
        if head != NONE && !self.h2.load(Ordering::Relaxed) {
            return Some((at(head, t.header_read), Expiry::HeaderRead));
        }
        Some((
            at(self.idle_since.load(Ordering::Acquire), t.idle),
            Expiry::Idle,
        ))
    }

    /// Resolves when a deadline may have moved.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// When the connection started.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }
}

/// One request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// The client's byte stream, reporting reads to the [`ConnState`] (the
/// start of an HTTP/1.1 request head is the first byte read while idle).
pub struct Watched<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, state: Arc<ConnState>) -> Self {
        Self { inner, state }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_read();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(75),
        header_read: Duration::from_secs(10),
    };

    #[test]
    fn http1_waits_for_the_first_head_then_idles_between_requests() {
        let s = ConnState::new(false);
        let (at, kind) = s.deadline(&T).unwrap();
        assert_eq!(kind, Expiry::HeaderRead);
        assert_eq!(at, s.epoch() + T.header_read);
        let guard = s.request_started(false);
        assert_eq!(s.deadline(&T), None, "no deadline while a request runs");
        // Bytes of the request body are not the start of a head.
        s.bytes_read();
        drop(guard);
        let (at, kind) = s.deadline(&T).unwrap();
        assert_eq!(kind, Expiry::Idle);
        assert!(at >= s.epoch() + T.idle);
        // The next head starts: its own, shorter deadline.
        s.bytes_read();
        let (at2, kind) = s.deadline(&T).unwrap();
        assert_eq!(kind, Expiry::HeaderRead);
        assert!(at2 < at);
        // Further bytes of the same head do not move it.
        s.bytes_read();
        assert_eq!(s.deadline(&T).unwrap().0, at2);
    }

    #[test]
    fn http2_has_no_header_deadline_and_pings_are_not_activity() {
        let s = ConnState::new(true);
        s.bytes_read();
        let (at, kind) = s.deadline(&T).unwrap();
        assert_eq!((at, kind), (s.epoch() + T.idle, Expiry::Idle));
        let a = s.request_started(true);
        let b = s.request_started(true);
        drop(a);
        assert_eq!(s.deadline(&T), None, "one stream still open");
        drop(b);
        assert_eq!(s.deadline(&T).unwrap().1, Expiry::Idle);
    }

    #[test]
    fn a_detected_h2_connection_drops_the_header_deadline() {
        let s = ConnState::new(false);
        drop(s.request_started(true));
        s.bytes_read();
        assert_eq!(s.deadline(&T).unwrap().1, Expiry::Idle);
    }
}
