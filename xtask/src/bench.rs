//! `cargo xtask bench`: the benchmarks that check spooky's speed and memory
//! targets, each reported as a ratio against a peer measured in the same
//! run (DESIGN.md: this machine is shared, so only side-by-side figures
//! mean anything).
//!
//! * `xdp`: XDP program cost per packet class (`benches/xdp_steering.rs`).
//! * `proxy`: HTTP/3 (own load generator) and HTTP/2 (`h2load`) through
//!   spooky and Caddy on the same nginx backend (`benches/proxy.rs`).
//! * `memory`: peak RSS while streaming large bodies and RSS per idle
//!   HTTP/3 connection, spooky vs Caddy (`benches/proxy.rs`).
//!
//! Without `--only`, all three run; proxy and memory share one bench run so
//! their figures end in one table.

use anyhow::{Result, bail};

use crate::{build_spooky, cargo, must, root};

/// Runs the selected benchmarks.
pub fn run(seconds: u64, rounds: usize, only: Option<&str>) -> Result<()> {
    match only {
        None => {
            xdp()?;
            proxy(seconds, rounds, "proxy,memory")
        }
        Some("xdp") => xdp(),
        Some(s @ ("proxy" | "memory" | "h3" | "h2")) => proxy(seconds, rounds, s),
        Some(other) => bail!("unknown benchmark `{other}`: use xdp, proxy (h3, h2) or memory"),
    }
}

/// XDP program cost per packet class (BPF_PROG_TEST_RUN with repeat).
fn xdp() -> Result<()> {
    must(
        cargo()
            .current_dir(root()?)
            .args(["bench", "-p", "spooky", "--bench", "xdp_steering"]),
    )
}

/// spooky vs Caddy: the bench starts `target/release/spooky`, so build it
/// first (the bench target itself only builds the library).
fn proxy(seconds: u64, rounds: usize, sections: &str) -> Result<()> {
    let bin = build_spooky(true)?;
    must(
        cargo()
            .current_dir(root()?)
            .env("SPOOKY_BIN", &bin)
            .args(["bench", "-p", "spooky", "--bench", "proxy", "--"])
            .args(["--only", sections])
            .args(["--seconds", &seconds.to_string()])
            .args(["--rounds", &rounds.to_string()]),
    )
}
