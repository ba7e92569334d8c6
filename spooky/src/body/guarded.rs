//! [`Guarded`]: a body that holds a guard (in-flight counts and the like)
//! until it ends or is dropped.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::BoxError;

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
