//! HTTP/3 streams and bodies, on either side: [`H3Body`] reads a request
//! or response stream as a body (holding it to its `content-length` and
//! the trailers deadline), [`send_h3`] writes a body into one.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Sleep;

use super::{BodyError, BoxError, ProxyBody};

/// The receiving half of an HTTP/3 request stream, on either side.
pub trait H3Recv: Send + Unpin + 'static {
    /// Polls the next DATA chunk.
    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, h3::error::StreamError>>;
    /// Polls the trailers, after the last DATA chunk.
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>>;
    /// Aborts reading (STOP_SENDING) with `code`.
    fn stop(&mut self, code: h3::error::Code);
    /// Whether a trailers HEADERS frame has begun and is incomplete.
    fn receiving_trailers(&self) -> bool;
}

macro_rules! impl_h3_recv {
    ($t:ty) => {
        impl H3Recv for $t {
            fn poll_data(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
                self.poll_recv_data(cx)
                    .map_ok(|chunk| chunk.map(|mut b| b.copy_to_bytes(b.remaining())))
            }
            fn poll_trailers(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>> {
                self.poll_recv_trailers(cx)
            }
            fn stop(&mut self, code: h3::error::Code) {
                self.stop_sending(code);
            }
            fn receiving_trailers(&self) -> bool {
                self.receiving_trailers()
            }
        }
    };
}

impl_h3_recv!(h3::server::RequestStream<h3_quinn::RecvStream, Bytes>);

impl_h3_recv!(h3::client::RequestStream<h3_quinn::RecvStream, Bytes>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvPhase {
    Data,
    Trailers,
    Done,
    /// The body broke its declared length: every later poll repeats the
    /// error, so that nobody (a retry replaying the body, say) can read a
    /// clean end after it.
    Malformed {
        declared: u64,
        received: u64,
    },
}

/// Set when a request body turns out malformed (DATA disagreeing with its
/// `content-length`). The proxy sees only a failed body; the listener
/// checks this to answer the client with `H3_MESSAGE_ERROR` rather than
/// with whatever the failed forward produced.
#[derive(Debug, Clone, Default)]
pub struct MalformedBody(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl MalformedBody {
    /// Whether the body broke its declared length.
    pub fn detected(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn record(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// An HTTP/3 receive stream as an `http_body::Body`. Holds an optional
/// guard (for example a pooled connection's in-flight slot) released when
/// the body ends or is dropped.
pub struct H3Body<R: H3Recv> {
    recv: R,
    phase: RecvPhase,
    size_hint: SizeHint,
    /// Enforced `content-length` (see [`H3Body::enforcing`]) and what
    /// arrived so far.
    declared: Option<u64>,
    received: u64,
    /// The chunk that completed the declared length, held back until the
    /// end of DATA proves nothing follows it. A consumer that stops at the
    /// declared length (hyper's HTTP/1.1 client does) would otherwise
    /// complete the request and never see the extra DATA that makes it
    /// malformed.
    held: Option<Bytes>,
    malformed: Option<MalformedBody>,
    guard: Option<Box<dyn Send>>,
    /// h3-quinn may have lent the QUIC stream to its read future, and a
    /// STOP_SENDING now would panic inside h3-quinn (`stop_sending`
    /// unwraps the lent stream). Not only after Pending: h3 0.0.8
    /// (`FrameStream::poll_data`) returns DATA it had buffered while its
    /// new read is still pending, so only a fresh stream or a clean end of
    /// DATA proves the stream is back. Dropping the read future drops the
    /// quinn stream, which stops the peer by itself (with code 0).
    read_may_be_lent: bool,
    /// The STOP_SENDING code when the body is dropped unread: a response
    /// body we no longer want is cancelled; the rest of a request we have
    /// answered is merely not needed (RFC 9114 §4.1: H3_NO_ERROR).
    unread_code: h3::error::Code,
    /// How long trailers may take once their HEADERS frame has begun (the
    /// request header timeout): its size is bounded by the field-section
    /// limit, its time by this, so a peer cannot trickle it forever.
    trailers_timeout: Option<Duration>,
    trailers_deadline: Option<Pin<Box<Sleep>>>,
}

impl<R: H3Recv> H3Body<R> {
    /// Wraps `recv`; `content_length` (when the peer announced one) feeds
    /// the size hint only: a response to HEAD, or a 304, declares a length
    /// it does not carry.
    pub fn new(recv: R, content_length: Option<u64>, guard: Option<Box<dyn Send>>) -> Self {
        let size_hint = content_length.map_or_else(SizeHint::new, SizeHint::with_exact);
        Self {
            recv,
            phase: RecvPhase::Data,
            size_hint,
            declared: None,
            received: 0,
            held: None,
            malformed: None,
            guard,
            read_may_be_lent: false,
            unread_code: h3::error::Code::H3_REQUEST_CANCELLED,
            trailers_timeout: None,
            trailers_deadline: None,
        }
    }

    /// Fails the body when trailers, once begun, take longer than `limit`.
    pub fn with_trailers_timeout(mut self, limit: Duration) -> Self {
        self.trailers_timeout = Some(limit);
        self
    }

    /// The trailers deadline, armed when their HEADERS frame begins;
    /// `Some` once it has passed.
    fn trailers_overdue(&mut self, cx: &mut Context<'_>) -> Option<BoxError> {
        let limit = self.trailers_timeout?;
        if self.trailers_deadline.is_none() {
            if !self.recv.receiving_trailers() {
                return None;
            }
            self.trailers_deadline = Some(Box::pin(tokio::time::sleep(limit)));
        }
        let deadline = self.trailers_deadline.as_mut()?;
        if deadline.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.finish();
        Some(BodyError::TrailersTimeout(limit).into())
    }

    /// Wraps a request body whose `content-length` (when declared) must
    /// equal the DATA received: a chunk that would overshoot is never
    /// yielded, the chunk that reaches the length is yielded only once the
    /// DATA has ended, and an early end is an error, so whatever forwards
    /// this body aborts instead of completing a request of another length.
    /// A mismatch is recorded in `malformed`, for the listener to reset the
    /// stream with `H3_MESSAGE_ERROR`.
    pub fn enforcing(recv: R, content_length: Option<u64>, malformed: MalformedBody) -> Self {
        let mut body = Self::new(recv, content_length, None);
        body.declared = content_length;
        body.malformed = Some(malformed);
        body.unread_code = h3::error::Code::H3_NO_ERROR;
        body
    }

    /// Fails the body for breaking its declared length. No STOP_SENDING
    /// here: after an overshooting chunk the stream may be lent (see
    /// `read_may_be_lent`), and after a short end the peer has finished.
    fn length_mismatch(&mut self, declared: u64, received: u64) -> BoxError {
        self.phase = RecvPhase::Malformed { declared, received };
        self.held = None;
        self.guard = None;
        if let Some(m) = &self.malformed {
            m.record();
        }
        BodyError::LengthMismatch { declared, received }.into()
    }

    fn finish(&mut self) {
        self.phase = RecvPhase::Done;
        self.guard = None;
    }
}

impl<R: H3Recv> Drop for H3Body<R> {
    fn drop(&mut self) {
        // Nobody will read the rest: tell the peer to stop sending instead of
        // letting flow control stall it.
        if matches!(self.phase, RecvPhase::Data | RecvPhase::Trailers) && !self.read_may_be_lent {
            self.recv.stop(self.unread_code);
        }
    }
}

impl<R: H3Recv> Body for H3Body<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.phase {
                RecvPhase::Data => {
                    let r = this.recv.poll_data(cx);
                    this.read_may_be_lent = !matches!(r, Poll::Ready(Ok(None)));
                    if r.is_pending() {
                        if let Some(e) = this.trailers_overdue(cx) {
                            return Poll::Ready(Some(Err(e)));
                        }
                        return Poll::Pending;
                    }
                    match ready!(r) {
                        Ok(Some(chunk)) if chunk.is_empty() => continue,
                        Ok(Some(chunk)) => {
                            let received = this.received.saturating_add(chunk.len() as u64);
                            this.received = received;
                            let Some(declared) = this.declared else {
                                return Poll::Ready(Some(Ok(Frame::data(chunk))));
                            };
                            // Past a held chunk, any DATA overshoots.
                            if received > declared {
                                let e = this.length_mismatch(declared, received);
                                return Poll::Ready(Some(Err(e)));
                            }
                            if received < declared {
                                this.size_hint = SizeHint::with_exact(declared - received);
                                return Poll::Ready(Some(Ok(Frame::data(chunk))));
                            }
                            // Still to yield: this chunk, once the end is seen.
                            this.size_hint = SizeHint::with_exact(chunk.len() as u64);
                            this.held = Some(chunk);
                        }
                        Ok(None) => {
                            if let Some(declared) = this.declared
                                && this.received != declared
                            {
                                let e = this.length_mismatch(declared, this.received);
                                return Poll::Ready(Some(Err(e)));
                            }
                            this.phase = RecvPhase::Trailers;
                            if let Some(last) = this.held.take() {
                                this.size_hint = SizeHint::with_exact(0);
                                return Poll::Ready(Some(Ok(Frame::data(last))));
                            }
                        }
                        Err(e) => {
                            this.finish();
                            return Poll::Ready(Some(Err(BodyError::H3(e).into())));
                        }
                    }
                }
                RecvPhase::Trailers => {
                    let r = this.recv.poll_trailers(cx);
                    // Ready ends the body either way (no STOP_SENDING after).
                    this.read_may_be_lent = r.is_pending();
                    let r = ready!(r);
                    this.finish();
                    return Poll::Ready(match r {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(BodyError::H3(e).into())),
                    });
                }
                RecvPhase::Done => return Poll::Ready(None),
                RecvPhase::Malformed { declared, received } => {
                    return Poll::Ready(Some(Err(BodyError::LengthMismatch {
                        declared,
                        received,
                    }
                    .into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.phase == RecvPhase::Done
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

/// Streams `body` into an HTTP/3 send stream: DATA frames, then trailers,
/// then FIN. On a body error the stream is reset (never finished), so the
/// peer cannot mistake a truncated body for a complete one.
pub async fn send_h3<S>(
    mut body: ProxyBody,
    stream: &mut H3SendHalf<S>,
) -> Result<u64, SendBodyError>
where
    S: h3::quic::SendStream<Bytes>,
{
    let mut sent = 0u64;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    stream.send_data(data).await.map_err(SendBodyError::Peer)?;
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        stream
                            .send_trailers(trailers)
                            .await
                            .map_err(SendBodyError::Peer)?;
                    }
                    // Trailers end the message.
                    break;
                }
            },
            Some(Err(e)) => {
                stream.reset(h3::error::Code::H3_REQUEST_CANCELLED);
                return Err(SendBodyError::Source(e));
            }
        }
    }
    stream.finish().await.map_err(SendBodyError::Peer)?;
    Ok(sent)
}

/// Why [`send_h3`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum SendBodyError {
    /// The body we were copying failed (its peer reset, idle, too large).
    #[error("source body failed: {0}")]
    Source(BoxError),
    /// The stream we were writing to failed.
    #[error("peer stream failed: {0}")]
    Peer(h3::error::StreamError),
}

/// The sending half of an HTTP/3 request stream, on either side.
pub enum H3SendHalf<S: h3::quic::SendStream<Bytes>> {
    /// Server side: sending a response.
    Server(h3::server::RequestStream<S, Bytes>),
    /// Client side: sending a request.
    Client(h3::client::RequestStream<S, Bytes>),
}

impl<S: h3::quic::SendStream<Bytes>> H3SendHalf<S> {
    async fn send_data(&mut self, data: Bytes) -> Result<(), h3::error::StreamError> {
        match self {
            H3SendHalf::Server(s) => s.send_data(data).await,
            H3SendHalf::Client(s) => s.send_data(data).await,
        }
    }

    async fn send_trailers(&mut self, t: HeaderMap) -> Result<(), h3::error::StreamError> {
        match self {
            H3SendHalf::Server(s) => s.send_trailers(t).await,
            H3SendHalf::Client(s) => s.send_trailers(t).await,
        }
    }

    async fn finish(&mut self) -> Result<(), h3::error::StreamError> {
        match self {
            H3SendHalf::Server(s) => s.finish().await,
            H3SendHalf::Client(s) => s.finish().await,
        }
    }

    /// Resets the stream with `code`.
    pub fn reset(&mut self, code: h3::error::Code) {
        match self {
            H3SendHalf::Server(s) => s.stop_stream(code),
            H3SendHalf::Client(s) => s.stop_stream(code),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::body::test_support::next_data_len;

    /// A receive half that yields scripted DATA chunks, then optional
    /// trailers, and records the code it was stopped with. Like h3 over
    /// h3-quinn, it may have a read outstanding after returning DATA; a
    /// STOP_SENDING then panics, as h3-quinn's does.
    struct ScriptedRecv {
        chunks: std::collections::VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
        stopped: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
        lent: bool,
    }

    impl H3Recv for ScriptedRecv {
        fn poll_data(
            &mut self,
            _cx: &mut Context<'_>,
        ) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
            let chunk = self.chunks.pop_front();
            self.lent = chunk.is_some();
            Poll::Ready(Ok(chunk))
        }
        fn poll_trailers(
            &mut self,
            _cx: &mut Context<'_>,
        ) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>> {
            Poll::Ready(Ok(self.trailers.take()))
        }
        fn stop(&mut self, code: h3::error::Code) {
            assert!(
                !self.lent,
                "STOP_SENDING on a lent stream panics in h3-quinn"
            );
            *self.stopped.lock().unwrap() = Some(code.value());
        }
        fn receiving_trailers(&self) -> bool {
            false
        }
    }

    /// A receive half whose next frame never completes: trailers that have
    /// begun (`trailers_begun`), or a stream that is merely quiet.
    struct StalledRecv {
        trailers_begun: bool,
    }

    impl H3Recv for StalledRecv {
        fn poll_data(
            &mut self,
            _cx: &mut Context<'_>,
        ) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
            Poll::Pending
        }
        fn poll_trailers(
            &mut self,
            _cx: &mut Context<'_>,
        ) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>> {
            Poll::Pending
        }
        fn stop(&mut self, _code: h3::error::Code) {}
        fn receiving_trailers(&self) -> bool {
            self.trailers_begun
        }
    }

    #[tokio::test(start_paused = true)]
    async fn trailers_that_begin_must_complete_within_the_timeout() {
        let limit = Duration::from_secs(10);
        let mut body = H3Body::new(
            StalledRecv {
                trailers_begun: true,
            },
            None,
            None,
        )
        .with_trailers_timeout(limit);
        let started = Instant::now();
        let err = body.frame().await.and_then(Result::err);
        assert!(
            matches!(
                err.as_ref().and_then(|e| e.downcast_ref::<BodyError>()),
                Some(BodyError::TrailersTimeout(l)) if *l == limit
            ),
            "{err:?}"
        );
        assert_eq!(started.elapsed(), limit);
        assert!(body.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_is_not_held_to_the_trailers_timeout() {
        let mut body = H3Body::new(
            StalledRecv {
                trailers_begun: false,
            },
            None,
            None,
        )
        .with_trailers_timeout(Duration::from_secs(1));
        let waited = tokio::time::timeout(Duration::from_secs(60), body.frame()).await;
        assert!(waited.is_err(), "the body ended: {:?}", waited.ok());
    }

    type StopCode = std::sync::Arc<std::sync::Mutex<Option<u64>>>;

    fn scripted(sizes: &[usize], trailers: Option<HeaderMap>) -> (ScriptedRecv, StopCode) {
        let stopped = StopCode::default();
        let recv = ScriptedRecv {
            chunks: sizes.iter().map(|&n| Bytes::from(vec![7u8; n])).collect(),
            trailers,
            stopped: stopped.clone(),
            lent: false,
        };
        (recv, stopped)
    }

    const H3_REQUEST_CANCELLED: u64 = 0x010c;
    const H3_NO_ERROR: u64 = 0x0100;

    fn mismatch(err: &BoxError) -> Option<(u64, u64)> {
        match err.downcast_ref::<BodyError>() {
            Some(BodyError::LengthMismatch { declared, received }) => Some((*declared, *received)),
            _ => None,
        }
    }

    #[tokio::test]
    async fn enforced_length_passes_an_exact_body_and_its_trailers() {
        let mut t = HeaderMap::new();
        t.insert("x-sum", http::HeaderValue::from_static("1"));
        let (recv, stopped) = scripted(&[3, 4], Some(t));
        let malformed = MalformedBody::default();
        let body = H3Body::enforcing(recv, Some(7), malformed.clone());
        assert_eq!(body.size_hint().exact(), Some(7));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-sum"], "1");
        assert_eq!(collected.to_bytes().len(), 7);
        assert!(!malformed.detected());
        assert_eq!(*stopped.lock().unwrap(), None);
    }

    #[tokio::test]
    async fn enforced_length_fails_before_yielding_an_overshooting_chunk() {
        let (recv, stopped) = scripted(&[3, 3], None);
        let malformed = MalformedBody::default();
        let mut body = H3Body::enforcing(recv, Some(5), malformed.clone());
        assert_eq!(next_data_len(&mut body).await, 3);
        assert_eq!(body.size_hint().exact(), Some(2));
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(mismatch(&err), Some((5, 6)), "{err}");
        assert!(malformed.detected());
        // Sticky: a second reader (a retry) cannot see a clean end.
        let again = body.frame().await.unwrap().unwrap_err();
        assert_eq!(mismatch(&again), Some((5, 6)));
        assert!(!body.is_end_stream());
        drop(body);
        assert_eq!(*stopped.lock().unwrap(), None, "the stream may be lent");
    }

    #[tokio::test]
    async fn enforced_length_fails_a_body_that_ends_short() {
        let (recv, stopped) = scripted(&[4], None);
        let malformed = MalformedBody::default();
        let mut body = H3Body::enforcing(recv, Some(10), malformed.clone());
        assert_eq!(next_data_len(&mut body).await, 4);
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(mismatch(&err), Some((10, 4)), "{err}");
        assert!(malformed.detected());
        drop(body);
        assert_eq!(*stopped.lock().unwrap(), None, "the peer has finished");
        // Declared but no DATA at all is short too.
        let (recv, _) = scripted(&[], None);
        let mut empty = H3Body::enforcing(recv, Some(1), MalformedBody::default());
        let err = empty.frame().await.unwrap().unwrap_err();
        assert_eq!(mismatch(&err), Some((1, 0)));
    }

    #[tokio::test]
    async fn dropping_a_body_stops_the_peer_only_when_safe() {
        // Unread: STOP_SENDING tells the peer nobody will read the rest;
        // H3_NO_ERROR for a request body (RFC 9114 §4.1), cancelled for a
        // response body.
        let (recv, stopped) = scripted(&[3], None);
        drop(H3Body::enforcing(recv, Some(3), MalformedBody::default()));
        assert_eq!(*stopped.lock().unwrap(), Some(H3_NO_ERROR));
        let (recv, stopped) = scripted(&[3], None);
        drop(H3Body::new(recv, Some(3), None));
        assert_eq!(*stopped.lock().unwrap(), Some(H3_REQUEST_CANCELLED));
        // A body without a declared length, whose consumer stops after a
        // chunk while h3 may still have a read outstanding: no
        // STOP_SENDING.
        let (recv, stopped) = scripted(&[3, 3], None);
        let mut body = H3Body::enforcing(recv, None, MalformedBody::default());
        assert_eq!(next_data_len(&mut body).await, 3);
        drop(body);
        assert_eq!(*stopped.lock().unwrap(), None);
    }

    #[tokio::test]
    async fn the_chunk_that_completes_the_length_waits_for_the_end_of_data() {
        // Extra DATA after exactly the declared bytes: the consumer never
        // gets the declared length (hyper would stop there and complete
        // the request), only the error.
        let (recv, stopped) = scripted(&[2, 3, 1], None);
        let malformed = MalformedBody::default();
        let mut body = H3Body::enforcing(recv, Some(5), malformed.clone());
        assert_eq!(next_data_len(&mut body).await, 2);
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(mismatch(&err), Some((5, 6)), "{err}");
        assert!(malformed.detected());
        drop(body);
        assert_eq!(*stopped.lock().unwrap(), None, "the stream may be lent");
        // The same length ending there: the held chunk comes with the end,
        // and a consumer that stops at the declared length may tell the
        // peer it has finished reading (the read is no longer lent).
        let (recv, stopped) = scripted(&[2, 3], None);
        let mut body = H3Body::enforcing(recv, Some(5), MalformedBody::default());
        body.frame().await.unwrap().unwrap();
        assert_eq!(next_data_len(&mut body).await, 3);
        assert_eq!(body.size_hint().exact(), Some(0));
        drop(body);
        assert_eq!(*stopped.lock().unwrap(), Some(H3_NO_ERROR));
    }

    #[tokio::test]
    async fn without_a_declared_length_nothing_is_enforced() {
        let (recv, _) = scripted(&[5, 5], None);
        let malformed = MalformedBody::default();
        let body = H3Body::enforcing(recv, None, malformed.clone());
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 10);
        assert!(!malformed.detected());
        // `new` takes the length as a hint only: a HEAD response declares
        // a length it does not carry.
        let (recv, stopped) = scripted(&[], None);
        let head = H3Body::new(recv, Some(100), None);
        assert!(head.collect().await.unwrap().to_bytes().is_empty());
        assert_eq!(*stopped.lock().unwrap(), None);
    }
}
