//! spooky's end-to-end tests: real processes (spooky and demo backends
//! from the built binary), real sockets, real clients. One test binary with
//! a module per area, so `cargo test` links it once; run one area with a
//! module filter, e.g. `cargo test -p spooky --test e2e -- operations::`.
//!
//! Everything here shares one process: a module must not rely on process
//! isolation (no `std::env::set_var`, no process-wide counts of the test
//! process's own resources). Tests that must not overlap take
//! [`support::heavy`].

// A test target: its helpers outside #[test] fns (support/, fixtures) fail
// the test by unwrapping, as the #[test] fns themselves may (clippy.toml).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod handshake_flood;
mod hardening;
mod interop;
mod migration;
mod operations;
mod protocols;
mod proxy_h3;
mod resilience;
mod upgrade;
mod xdp_attach;
mod xdp_fixtures;
mod zero_rtt;
