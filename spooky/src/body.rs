//! Streaming bodies: the one body type the proxy passes between downstream
//! and upstream, adapters from HTTP/3 streams into it and out of it, and the
//! wrappers that bound a body in time (idle timeout) and size.
//!
//! Every adapter pulls one frame at a time, so a body costs at most one
//! chunk plus the transport's flow-control window, whatever its length.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::time::{Instant, Sleep};

/// Error type carried by bodies: any transport error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type every proxy phase works with.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why a body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("no body data for {0:?}")]
    Idle(Duration),
    #[error("body exceeds the {limit}-byte limit")]
    TooLarge { limit: u64 },
    /// Trailers began to arrive and did not complete in time.
    #[error("trailers not received within {0:?}")]
    TrailersTimeout(Duration),
    #[error("HTTP/3 stream error: {0}")]
    H3(#[from] h3::error::StreamError),
    /// The DATA received disagrees with the declared `content-length`
    /// (RFC 9114 §4.1.2: the message is malformed). `received` counts up
    /// to and including the chunk that overshot.
    #[error("body of {received} bytes where content-length declared {declared}")]
    LengthMismatch { declared: u64, received: u64 },
    /// The client's HTTP/1.1 body framing is invalid (a bad chunk size
    /// line, a missing CRLF after a chunk, ...): the client's error, so
    /// it gets 400 rather than the 502 of a backend failure.
    #[error("malformed request body: {0}")]
    Malformed(String),
}

/// An empty body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of one chunk.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body into a [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

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

/// Fails a body that yields no frame for `idle`: a stalled peer cannot pin
/// a stream (and its buffers) forever.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`; the timer starts now.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(BodyError::Idle(this.idle).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Tells an invalid HTTP/1.1 request body framing (hyper reports it as a
/// body error whose source is an `InvalidData`/`InvalidInput` I/O error
/// from its chunked decoder) from a transport failure, turning the former
/// into [`BodyError::Malformed`]. A TLS failure is an `InvalidData` I/O
/// error too, but wraps a `rustls::Error`, and stays what it is.
pub struct Http1Framing<B> {
    inner: B,
}

impl<B> Http1Framing<B> {
    pub fn new(inner: B) -> Self {
        Self { inner }
    }
}

impl<B> Body for Http1Framing<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|r| {
            r.map_err(|e| match framing_error(&e) {
                Some(reason) => BodyError::Malformed(reason).into(),
                None => e.into(),
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The decoder's message, when `e` is a body framing error.
fn framing_error(e: &hyper::Error) -> Option<String> {
    use std::error::Error as _;
    let io = e.source()?.downcast_ref::<std::io::Error>()?;
    let framing = matches!(
        io.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
    ) && io
        .get_ref()
        .is_none_or(|inner| inner.downcast_ref::<rustls::Error>().is_none());
    framing.then(|| io.to_string())
}

/// The reason, when an error (anywhere in its source chain) is ours saying
/// the client's request body was malformed.
pub fn malformed_body(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(BodyError::Malformed(reason)) = e.downcast_ref::<BodyError>() {
            return Some(reason.clone());
        }
        cur = e.source();
    }
    None
}

/// Fails a body once it has carried more than `limit` bytes of data.
pub struct Limited<B> {
    inner: B,
    remaining: u64,
    limit: u64,
}

impl<B> Limited<B> {
    /// Wraps `inner` with a byte limit.
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            let n = data.len() as u64;
            if n > this.remaining {
                this.remaining = 0;
                return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit }.into())));
            }
            this.remaining -= n;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The limit, when an error (anywhere in its source chain) is ours saying
/// the body was too large.
pub fn too_large_limit(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(BodyError::TooLarge { limit }) = e.downcast_ref::<BodyError>() {
            return Some(*limit);
        }
        cur = e.source();
    }
    None
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

/// Keeps what a request body has sent so far (up to a limit) so that a
/// failed try can be replayed on another backend, while the body streams
/// to the current try as it arrives (no waiting for the whole body, which
/// would deadlock bidirectional streams such as gRPC).
///
/// Each try gets a [`ReplayReader`]; it first replays the recorded frames,
/// then pulls new ones from the source, recording them. Starting a new
/// reader retires the previous one (it fails with "superseded"), so only
/// one task pulls from the source at a time.
pub struct Replayable {
    shared: std::sync::Arc<std::sync::Mutex<ReplayState>>,
}

struct ReplayState {
    source: ProxyBody,
    recorded: Vec<Frame<Bytes>>,
    recorded_bytes: u64,
    limit: u64,
    /// Recording stopped: frames were sent that are no longer kept.
    overflowed: bool,
    /// The source ended (`None` seen).
    ended: bool,
    generation: u64,
}

/// How much of the body a replay could reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStatus {
    /// Nothing was sent yet, or everything sent is recorded.
    Replayable,
    /// More was sent than the limit allowed keeping.
    Overflowed,
}

impl Replayable {
    /// Wraps `source`, keeping at most `limit` bytes of data for replays.
    pub fn new(source: ProxyBody, limit: u64) -> Self {
        Self {
            shared: std::sync::Arc::new(std::sync::Mutex::new(ReplayState {
                source,
                recorded: Vec::new(),
                recorded_bytes: 0,
                limit,
                overflowed: false,
                ended: false,
                generation: 0,
            })),
        }
    }

    /// A body for the next try, replaying from the start.
    pub fn reader(&self) -> ProxyBody {
        let generation = match self.shared.lock() {
            Ok(mut s) => {
                s.generation += 1;
                s.generation
            }
            Err(_) => u64::MAX,
        };
        let reader = ReplayReader {
            shared: self.shared.clone(),
            generation,
            pos: 0,
        };
        UnsyncBoxBody::new(reader)
    }

    /// Whether a new try could get the whole body.
    pub fn status(&self) -> ReplayStatus {
        match self.shared.lock() {
            Ok(s) if !s.overflowed => ReplayStatus::Replayable,
            _ => ReplayStatus::Overflowed,
        }
    }
}

struct ReplayReader {
    shared: std::sync::Arc<std::sync::Mutex<ReplayState>>,
    generation: u64,
    pos: usize,
}

fn clone_frame(f: &Frame<Bytes>) -> Frame<Bytes> {
    if let Some(d) = f.data_ref() {
        Frame::data(d.clone())
    } else if let Some(t) = f.trailers_ref() {
        Frame::trailers(t.clone())
    } else {
        Frame::data(Bytes::new())
    }
}

impl Body for ReplayReader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Ok(mut s) = this.shared.lock() else {
            return Poll::Ready(Some(Err("request body state poisoned".into())));
        };
        if s.generation != this.generation {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if this.pos < s.recorded.len() {
            let f = clone_frame(&s.recorded[this.pos]);
            this.pos += 1;
            return Poll::Ready(Some(Ok(f)));
        }
        // Only the reader that overflowed the recording (pos == MAX) may go
        // on; any later one would miss the unrecorded frames.
        if s.overflowed && this.pos != usize::MAX {
            return Poll::Ready(Some(Err("request body cannot be replayed".into())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut s.source).poll_frame(cx));
        match frame {
            None => {
                s.ended = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            Some(Ok(f)) => {
                let len = f.data_ref().map_or(0, |d| d.len() as u64);
                if !s.overflowed && s.recorded_bytes + len <= s.limit {
                    s.recorded_bytes += len;
                    s.recorded.push(clone_frame(&f));
                    this.pos = s.recorded.len();
                } else if !s.overflowed {
                    // From here on frames stream through unrecorded.
                    s.overflowed = true;
                    s.recorded.clear();
                    this.pos = usize::MAX;
                }
                Poll::Ready(Some(Ok(f)))
            }
        }
    }
}

/// Drops `guard` when the body ends (or is dropped): ties per-request
/// accounting (in-flight counts) to the end of a streamed response.
pub struct Guarded<B> {
    inner: B,
    guard: Option<Box<dyn Send>>,
}

impl<B> Guarded<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, guard: Box<dyn Send>) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            this.guard = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The length of the next frame, which must be DATA.
    async fn next_data_len<B>(body: &mut B) -> usize
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        body.frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len()
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

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_on_a_stalled_body() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stalled = http_body_util::StreamBody::new(tokio_stream_from(rx));
        let mut body = IdleTimeout::new(boxed(stalled), Duration::from_secs(5));
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("no body data"), "{err}");
    }

    #[tokio::test]
    async fn limited_fails_past_the_limit() {
        let mut body = Limited::new(full(vec![0u8; 10]), 9);
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(too_large_limit(err.as_ref()), Some(9));
        let mut ok = Limited::new(full(vec![0u8; 10]), 10);
        assert_eq!(next_data_len(&mut ok).await, 10);
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    fn chunks(n: usize, size: usize) -> ProxyBody {
        let frames =
            (0..n).map(move |i| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![i as u8; size]))));
        boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn a_second_try_replays_what_the_first_consumed() {
        let r = Replayable::new(chunks(4, 10), 100);
        let mut first = r.reader();
        let a = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(a, vec![0u8; 10]);
        // First try fails; the second reads everything from the start.
        let second = r.reader();
        let err = first.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("superseded"));
        let all = second.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 40);
        assert_eq!(&all[..10], &[0u8; 10]);
        assert_eq!(&all[30..], &[3u8; 10]);
        assert_eq!(r.status(), ReplayStatus::Replayable);
    }

    #[tokio::test]
    async fn past_the_limit_it_streams_and_cannot_replay() {
        let r = Replayable::new(chunks(4, 10), 25);
        let all = r.reader().collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 40, "the first try still gets every byte");
        assert_eq!(r.status(), ReplayStatus::Overflowed);
        let mut again = r.reader();
        assert!(again.frame().await.unwrap().is_err());
    }
}
