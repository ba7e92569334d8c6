//! spooky: an HTTP/3 load balancer whose XDP data plane steers QUIC packets
//! to the worker that owns their connection ID.
//!
//! Request path, one module each: [`listener`] (HTTP/3 termination) →
//! [`validate`] (malformed request heads) → [`proxy`] (phases: request
//! id, [`routing`], limits, headers) → [`upstream`] ([`balancer`],
//! [`health`], [`retry`], pooled connections) → back. Around it:
//! [`config`], [`tls`], [`cid`] (routable connection IDs), [`steering`]
//! (XDP / reuseport CBPF), [`worker`] and [`server`] (lifecycle).
//! [`balancer`], [`health`] and [`retry`] are modules of the sans-IO
//! `spooky_lb` crate, re-exported here.

pub mod admin;
pub use spooky_lb::balancer;
pub mod body;
pub mod cid;
pub mod client;
pub mod config;
pub mod demo;
pub use spooky_lb::health;
pub use spooky_lb::retry;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod steering;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod validate;
pub mod worker;
