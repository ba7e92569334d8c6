//! Bounds on a body: [`IdleTimeout`] (no frame for too long) and
//! [`Limited`] (more data than allowed).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{BodyError, BoxError};

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

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::body::test_support::next_data_len;
    use crate::body::{boxed, full};

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
        assert_eq!(
            crate::body::ClientBodyFault::find(err.as_ref()),
            Some(crate::body::ClientBodyFault::TooLarge { limit: 9 })
        );
        let mut ok = Limited::new(full(vec![0u8; 10]), 10);
        assert_eq!(next_data_len(&mut ok).await, 10);
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
