//! Upstreams: everything between a routed request and a backend. The
//! [`registry`] of upstreams and backends shared by the workers, each
//! worker's balancers and connection [`pools`], the [`forward`]ing driver
//! with its retries, and the [`error`] types. One client module per backend
//! protocol ([`h3`], [`tcp`], behind [`backend`]); each exposes a
//! `send(request) -> response` with streaming bodies. [`probe`] runs the
//! active health checks over those same clients.

pub mod backend;
pub mod error;
pub mod forward;
pub mod h3;
pub mod open;
pub mod pools;
pub mod probe;
pub mod registry;
pub mod tcp;

pub use error::{ForwardError, SetupError, UpstreamError};
pub use forward::Forwarded;
pub use pools::WorkerUpstreams;
pub use registry::{BackendState, Control, SharedBackend, SharedUpstream, SharedUpstreams};
