//! HTTP/1.1 request bodies from TCP clients: invalid chunked framing is
//! the client's error ([`BodyError::Malformed`], answered with 400), not a
//! transport failure.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{BodyError, BoxError};

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
