//! `cargo xtask bench`: the benchmarks that check spooky's speed and memory
//! targets, each reported as a ratio against a peer measured in the same
//! run (ARCHITECTURE.md, "How to measure": this machine is shared, so
//! only side-by-side figures mean anything).
//!
//! * `xdp`: XDP program cost per packet class (`benches/xdp_steering.rs`).
//! * `proxy`: HTTP/3 (own load generator) and HTTP/2 (`h2load`) through
//!   spooky and Caddy on the same nginx backend (`benches/proxy.rs`).
//! * `memory`: peak RSS while streaming large bodies and RSS per idle
//!   HTTP/3 connection, spooky vs Caddy (`benches/proxy.rs`).
//! * `upgrade`: the cost of `spooky upgrade` against a plain stop and start
//!   under the same load: time until the new process serves, RSS while
//!   both run, requests lost (`benches/upgrade.rs`).
//!
//! Without `--only`, all three run; proxy and memory share one bench run so
//! their figures end in one table (and in `bench/results/latest.{md,json,png}`).
//! `--quick` is the short set (about 2 minutes). Missing tools are
//! installed first (`--no-install` skips that): Caddy, nginx and h2load
//! from Debian with apt-get (as root), and oha with `cargo install`.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, must, root};

/// Runs the selected benchmarks and prints how long they took.
pub fn run(
    seconds: Option<u64>,
    rounds: Option<usize>,
    only: Option<&str>,
    quick: bool,
    install: bool,
) -> Result<()> {
    let started = Instant::now();
    if install && only != Some("xdp") {
        install_tools()?;
    }
    let opts = ProxyOpts {
        seconds,
        rounds,
        quick,
    };
    let r = match only {
        None => xdp()
            .and_then(|()| proxy(&opts, "proxy,memory"))
            .and_then(|()| upgrade(&opts)),
        Some("xdp") => xdp(),
        Some("upgrade") => upgrade(&opts),
        Some(s @ ("proxy" | "memory" | "h3" | "h2")) => proxy(&opts, s),
        Some(other) => {
            bail!("unknown benchmark `{other}`: use xdp, proxy (h3, h2), memory or upgrade")
        }
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

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs what the proxy bench runs and is missing: the peer proxy, the
/// backend and the HTTP/2 load generator from Debian, and oha (HTTP/3 load)
/// built with its `http3` feature.
fn install_tools() -> Result<()> {
    let debian: Vec<&str> = [
        ("caddy", "caddy"),
        ("nginx", "nginx"),
        ("h2load", "nghttp2-client"),
    ]
    .into_iter()
    .filter(|(tool, _)| !have(tool))
    .map(|(_, package)| package)
    .collect();
    if !debian.is_empty() {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if !root || !have("apt-get") {
            bail!(
                "missing {}: install them (apt-get install {}) or run as root on Debian",
                debian.join(", "),
                debian.join(" ")
            );
        }
        println!("installing {} with apt-get", debian.join(", "));
        must(Command::new("apt-get").arg("update"))?;
        must(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&debian)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        // Debian starts the packaged services; the bench runs its own.
        for service in ["caddy", "nginx"] {
            let _ = Command::new("systemctl").args(["stop", service]).output();
        }
    }
    if !have("oha") {
        println!(
            "installing oha with HTTP/3 (cargo install --locked oha --features http3); a one-time build of about 20 minutes on 2 cores"
        );
        // --locked: the newest versions of its dependencies need a newer
        // rustc than 1.95.
        must(
            cargo()
                .args(["install", "--locked", "oha", "--features", "http3"])
                .env_remove("CARGO_TARGET_DIR"),
        )
        .context("installing oha")?;
    }
    Ok(())
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

/// `spooky upgrade` vs stop + start (`benches/upgrade.rs`).
fn upgrade(o: &ProxyOpts) -> Result<()> {
    let mut c = cargo();
    c.current_dir(root()?)
        .args(["bench", "-p", "spooky", "--bench", "upgrade", "--"]);
    if o.quick {
        c.arg("--quick");
    }
    if let Some(r) = o.rounds {
        c.args(["--rounds", &r.to_string()]);
    }
    must(&mut c)
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
