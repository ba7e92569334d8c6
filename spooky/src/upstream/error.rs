//! The upstream error types: why a try failed ([`UpstreamError`], from the
//! protocol clients), why a request got no backend response
//! ([`ForwardError`]: what the client is told), and why upstream state
//! could not be built ([`SetupError`]).

use std::time::Duration;

use http::StatusCode;

use crate::body::ClientBodyFault;
use crate::health::Rejected;
use crate::tls;

/// Why a request could not be carried to (or answered by) a backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The backend's address did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    /// Connection establishment failed (refused, TLS, handshake).
    #[error("connect to {backend} failed: {reason}")]
    Connect { backend: String, reason: String },
    /// Connection establishment did not finish in time.
    #[error("connect to {backend} timed out after {after:?}")]
    ConnectTimeout { backend: String, after: Duration },
    /// Recent connection attempts failed; this one was not tried.
    #[error("{backend} is in connect backoff for another {remaining:?}")]
    Backoff {
        backend: String,
        remaining: Duration,
    },
    /// The backend refused the request before processing it (GOAWAY,
    /// H3_REQUEST_REJECTED): safe to retry anywhere.
    #[error("{backend} refused the request before processing it: {reason}")]
    Refused { backend: String, reason: String },
    /// The stream or connection failed before response headers.
    #[error("{backend} reset the request before responding: {reason}")]
    Reset { backend: String, reason: String },
    /// The backend's response is not valid HTTP in a way the HTTP library
    /// accepts but a proxy must not forward (e.g. an HTTP/1.1 response
    /// framed by both `content-length` and `transfer-encoding`).
    #[error("{backend} sent an invalid response: {reason}")]
    InvalidResponse { backend: String, reason: String },
    /// No response headers within the request timeout.
    #[error("{backend} sent no response headers within {after:?}")]
    Timeout { backend: String, after: Duration },
    /// The client's request body was at fault (too large, malformed,
    /// trailers too slow or too large): the client's error, not the
    /// backend's.
    #[error("{0}")]
    ClientBody(ClientBodyFault),
    /// The downstream client went away while the request was in flight.
    #[error("client aborted the request: {0}")]
    ClientAborted(String),
}

impl UpstreamError {
    /// The status the client gets for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamError::ClientBody(fault) => match fault {
                ClientBodyFault::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                ClientBodyFault::Malformed(_) => StatusCode::BAD_REQUEST,
                ClientBodyFault::TrailersTimeout(_) => StatusCode::REQUEST_TIMEOUT,
                ClientBodyFault::TrailersTooLarge { .. } => {
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                }
            },
            UpstreamError::Resolve { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Backoff { .. }
            | UpstreamError::Refused { .. }
            | UpstreamError::Reset { .. }
            | UpstreamError::InvalidResponse { .. }
            | UpstreamError::ClientAborted(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the request certainly did not reach the backend's
    /// application (a retry cannot duplicate it).
    pub fn not_processed(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Backoff { .. }
                | UpstreamError::Refused { .. }
        )
    }

    /// Whether establishing the connection failed (outlier detection
    /// counts these as gateway failures).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Backoff { .. }
        )
    }
}

/// Why no backend response could be returned.
#[derive(Debug)]
pub struct ForwardError {
    pub status: http::StatusCode,
    pub detail: String,
    /// Seconds for `retry-after` (503 when nothing is available).
    pub retry_after: Option<u64>,
    /// The backend of the last try, if any.
    pub backend: Option<String>,
    /// Tries made (0 when none could be).
    pub tries: u32,
}

/// The 503 for a request every candidate's circuit breaker refused.
pub(super) fn breaker_error(id: &str, r: &Rejected) -> ForwardError {
    let retry_after = r
        .retry_after
        .map_or(1, |d| d.as_millis().div_ceil(1000) as u64)
        .max(1);
    ForwardError {
        tries: 0,
        status: http::StatusCode::SERVICE_UNAVAILABLE,
        detail: format!("backend {id}: {r}"),
        retry_after: Some(retry_after),
        backend: Some(id.to_owned()),
    }
}

/// Errors building upstream state.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstreams.{upstream}.tls: {source}")]
    Tls {
        upstream: String,
        source: tls::TlsError,
    },
}

/// What the client is told: the kind of failure, not internal addresses.
pub(super) fn short_detail(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Resolve { .. } => "backend address does not resolve".into(),
        UpstreamError::Connect { .. } => "cannot connect to the backend".into(),
        UpstreamError::ConnectTimeout { .. } => "backend connect timed out".into(),
        UpstreamError::Backoff { .. } => "backend unreachable (reconnecting)".into(),
        UpstreamError::Refused { .. } => "backend refused the request".into(),
        UpstreamError::Reset { .. } => "backend reset the request".into(),
        UpstreamError::InvalidResponse { .. } => "backend sent an invalid response".into(),
        UpstreamError::Timeout { after, .. } => {
            format!("backend sent no response within {} ms", after.as_millis())
        }
        UpstreamError::ClientBody(fault) => match fault {
            ClientBodyFault::TooLarge { limit } => format!("request body exceeds {limit} bytes"),
            ClientBodyFault::Malformed(_) => "malformed request body".into(),
            ClientBodyFault::TrailersTimeout(after) => {
                format!("trailers not received within {} ms", after.as_millis())
            }
            ClientBodyFault::TrailersTooLarge { max } => {
                format!("trailers exceed {max} bytes")
            }
        },
        UpstreamError::ClientAborted(_) => "client aborted the request".into(),
    }
}
