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
//! their figures end in one table (and in `bench/results/latest.{md,json,png}`).
//! `--quick` is the short set (about 2 minutes).

use std::time::Instant;

use anyhow::{Result, bail};

use crate::{cargo, must, root};

/// Runs the selected benchmarks and prints how long they took.
pub fn run(
    seconds: Option<u64>,
    rounds: Option<usize>,
    only: Option<&str>,
    quick: bool,
) -> Result<()> {
    let started = Instant::now();
    let opts = ProxyOpts {
        seconds,
        rounds,
        quick,
    };
    let r = match only {
        None => xdp().and_then(|()| proxy(&opts, "proxy,memory")),
        Some("xdp") => xdp(),
        Some(s @ ("proxy" | "memory" | "h3" | "h2")) => proxy(&opts, s),
        Some(other) => bail!("unknown benchmark `{other}`: use xdp, proxy (h3, h2) or memory"),
    };
    let secs = started.elapsed().as_secs();
    println!(
        "cargo xtask bench{}: {}m{:02}s (build included)",
        if quick { " --quick" } else { "" },
        secs / 60,
        secs % 60
    );
    r
}

struct ProxyOpts {
    seconds: Option<u64>,
    rounds: Option<usize>,
    quick: bool,
}

/// XDP program cost per packet class (BPF_PROG_TEST_RUN with repeat).
fn xdp() -> Result<()> {
    must(
        cargo()
            .current_dir(root()?)
            .args(["bench", "-p", "spooky", "--bench", "xdp_steering"]),
    )
}

/// spooky vs Caddy: the bench starts `target/release/spooky`, which `cargo
/// bench` builds along with the bench (cargo builds a package's binaries
/// for its benches; a separate `cargo build --release` would build it with
/// other dependency features, and the two builds would keep replacing each
/// other's binary). Reports go to
/// `bench/results/` (`latest.md`, `latest.json`, `latest.png` and a
/// timestamped copy of the first two).
fn proxy(o: &ProxyOpts, sections: &str) -> Result<()> {
    let mut c = cargo();
    c.current_dir(root()?)
        .env_remove("SPOOKY_BIN")
        .args(["bench", "-p", "spooky", "--bench", "proxy", "--"])
        .args(["--only", sections]);
    // Explicit --seconds/--rounds override --quick's.
    if o.quick {
        c.arg("--quick");
    }
    if let Some(s) = o.seconds {
        c.args(["--seconds", &s.to_string()]);
    }
    if let Some(r) = o.rounds {
        c.args(["--rounds", &r.to_string()]);
    }
    must(&mut c)
}
