//! Streaming bodies: the one body type the proxy passes between downstream
//! and upstream ([`ProxyBody`], its error and constructors), and its
//! adapters by role: HTTP/3 streams into and out of it ([`h3`]), HTTP/1.1
//! request-body framing from TCP clients ([`http1`]), bounds in time and
//! size ([`limits`]), request replay for retries ([`replay`]) and
//! per-request accounting tied to a body's end ([`guarded`]).
//!
//! Every adapter pulls one frame at a time, so a body costs at most one
//! chunk plus the transport's flow-control window, whatever its length.

mod guarded;
mod h3;
mod http1;
mod limits;
mod replay;

use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

pub use guarded::Guarded;
pub use h3::{H3Body, H3Recv, H3SendHalf, MalformedBody, SendBodyError, send_h3};
pub use http1::Http1Framing;
pub use limits::{IdleTimeout, Limited};
pub use replay::{ReplayStatus, Replayable};

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
    H3(#[from] ::h3::error::StreamError),
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

/// What was wrong with a client's request body, when that, and not the
/// backend, is why forwarding the request failed: the client gets a 4xx
/// for it, the backend is not blamed, and the request is not retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyFault {
    /// Longer than `limits.max_body_bytes` (413).
    #[error("request body exceeds the {limit}-byte limit")]
    TooLarge { limit: u64 },
    /// Invalid HTTP/1.1 chunked framing (400).
    #[error("malformed request body: {0}")]
    Malformed(String),
    /// Trailers began and did not complete within the request header
    /// timeout (408, as nginx answers a body that stalls).
    #[error("trailers not received within {0:?}")]
    TrailersTimeout(Duration),
    /// A trailers section above the advertised field section size (431).
    #[error("trailers exceed the {max}-byte field section limit")]
    TrailersTooLarge { max: u64 },
}

impl ClientBodyFault {
    /// The fault, when an error (anywhere in its source chain) is ours
    /// saying the client's body was at fault.
    pub fn find(err: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(body) = e.downcast_ref::<BodyError>() {
                return match body {
                    BodyError::TooLarge { limit } => Some(Self::TooLarge { limit: *limit }),
                    BodyError::Malformed(reason) => Some(Self::Malformed(reason.clone())),
                    BodyError::TrailersTimeout(after) => Some(Self::TrailersTimeout(*after)),
                    // h3 refuses a trailers frame above the limit before
                    // reading it (vendor/h3/PATCHED.md); on a request body
                    // only trailers can be too big, the head was decoded.
                    BodyError::H3(::h3::error::StreamError::HeaderTooBig { max_size, .. }) => {
                        Some(Self::TrailersTooLarge { max: *max_size })
                    }
                    BodyError::H3(_) | BodyError::Idle(_) | BodyError::LengthMismatch { .. } => {
                        None
                    }
                };
            }
            cur = e.source();
        }
        None
    }
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

#[cfg(test)]
mod test_support {
    use bytes::Bytes;
    use http_body::Body;
    use http_body_util::BodyExt;

    /// The length of the next frame, which must be DATA.
    pub(super) async fn next_data_len<B>(body: &mut B) -> usize
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BodyError, ClientBodyFault};

    /// An error that wraps another, as hyper and h3 wrap a body's error.
    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapper(#[source] BodyError);

    #[test]
    fn client_faults_are_found_through_the_source_chain() {
        let cases = [
            (
                BodyError::TooLarge { limit: 9 },
                Some(ClientBodyFault::TooLarge { limit: 9 }),
            ),
            (
                BodyError::Malformed("bad chunk size".into()),
                Some(ClientBodyFault::Malformed("bad chunk size".into())),
            ),
            (
                BodyError::TrailersTimeout(Duration::from_secs(10)),
                Some(ClientBodyFault::TrailersTimeout(Duration::from_secs(10))),
            ),
            // Not the client's fault in a way a 4xx can say: the stream or
            // the connection failed, or the body stalled.
            (BodyError::Idle(Duration::from_secs(1)), None),
            (
                BodyError::LengthMismatch {
                    declared: 1,
                    received: 2,
                },
                None,
            ),
        ];
        for (err, want) in cases {
            let wrapped = Wrapper(err);
            assert_eq!(ClientBodyFault::find(&wrapped), want, "{wrapped:?}");
        }
        let io = std::io::Error::other("reset");
        assert_eq!(ClientBodyFault::find(&io), None);
    }
}
