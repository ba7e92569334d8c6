//! `cargo xtask`: the project's developer commands (run, test, bench and the
//! eBPF object build), so that nothing needs a Makefile or a shell script.

mod bench;
mod cycles;
mod ebpf;
mod vendor;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "spooky developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build spooky, start three demo backends and spooky with config/spooky.yaml.
    Run {
        /// Config file to run with.
        #[arg(short, long, default_value = "config/spooky.yaml")]
        config: PathBuf,
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// The whole test suite: fmt, clippy, the eBPF object check (when clang-19 is
    /// installed) and every test. This is what CI runs.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        args: Vec<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Benchmarks: XDP ns/packet, and spooky against a peer proxy on the same
    /// backend and client.
    Bench {
        /// Seconds per load run (default 5, 2 with `--quick`).
        #[arg(long)]
        seconds: Option<u64>,
        /// Interleaved rounds per comparison, medians reported (default 3,
        /// 2 with `--quick`).
        #[arg(long)]
        rounds: Option<usize>,
        /// Only this benchmark: `xdp`, `proxy` (`h3`, `h2`), `memory` or
        /// `upgrade`.
        #[arg(long)]
        only: Option<String>,
        /// The short set (about 2 minutes): fewer rounds, shorter runs, no
        /// 100 MiB transfers, no 10k idle connections.
        #[arg(long)]
        quick: bool,
        /// Do not install missing tools (caddy, nginx, h2load with
        /// apt-get; oha with cargo install).
        #[arg(long)]
        no_install: bool,
    },
    /// Rebuild spooky-ebpf/spooky.bpf.o from its C source (needs clang-19 and libbpf-dev).
    BuildEbpf,
    /// Fail when the committed spooky.bpf.o does not match its C source.
    CheckEbpf,
    /// Rewrite vendor/h3/spooky.patch and vendor/quinn-proto/spooky.patch: the
    /// vendored trees against the crates as published (fetched when missing).
    VendorPatches,
    /// Fail when two modules of spooky/src import each other.
    CheckModuleCycles {
        /// Workspace root to check (default: this one).
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Fail when Cargo.lock resolves h3 or quinn-proto from the registry
    /// instead of vendor/, or when a committed spooky.patch is stale.
    CheckVendor,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run { config, release } => run(&config, release),
        Cmd::Test { args, no_lint } => test(&args, no_lint),
        Cmd::Bench {
            seconds,
            rounds,
            only,
            quick,
            no_install,
        } => bench::run(seconds, rounds, only.as_deref(), quick, !no_install),
        Cmd::BuildEbpf => ebpf::build(),
        Cmd::CheckEbpf => ebpf::check(),
        Cmd::VendorPatches => vendor::write_patches(),
        Cmd::CheckModuleCycles { root: dir } => match dir {
            Some(dir) => cycles::check(&dir),
            None => cycles::check(&root()?),
        },
        Cmd::CheckVendor => vendor::check(),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))
}

fn must(cmd: &mut Command) -> Result<()> {
    let what = format!("{:?}", cmd);
    let st = status(cmd)?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// Builds the spooky binary and returns its path.
pub fn build_spooky(release: bool) -> Result<PathBuf> {
    let root = root()?;
    let mut c = cargo();
    c.current_dir(&root)
        .args(["build", "-p", "spooky", "--bin", "spooky"]);
    if release {
        c.arg("--release");
    }
    must(&mut c)?;
    Ok(target_dir()?
        .join(if release { "release" } else { "debug" })
        .join("spooky"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace
/// root) or `target/`.
pub fn target_dir() -> Result<PathBuf> {
    let root = root()?;
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    })
}

/// Kills the children when dropped, so Ctrl-C or an error leaves nothing behind.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (name, c) in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                // SIGTERM first so spooky drains and detaches XDP cleanly.
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(12);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                if let Ok(None) = c.try_wait() {
                    eprintln!("xtask: killing {name}");
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
        }
    }
}

fn run(config: &Path, release: bool) -> Result<()> {
    let root = root()?;
    let bin = build_spooky(release)?;
    let config = if config.is_absolute() {
        config.to_path_buf()
    } else {
        root.join(config)
    };
    let check = Command::new(&bin)
        .args(["check", "-c"])
        .arg(&config)
        .status()?;
    if !check.success() {
        bail!("{} is not a valid config", config.display());
    }
    let mut children = Children(Vec::new());
    for (id, port) in [("backend1", 8081), ("backend2", 8082), ("backend3", 8083)] {
        let child = Command::new(&bin)
            .args(["demo-backend", "--id", id, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting demo backend {id}"))?;
        children.0.push((id.to_owned(), child));
    }
    eprintln!("xtask: demo backends backend1..3 on 127.0.0.1:8081-8083 (HTTP/3)");
    let spooky = Command::new(&bin)
        .current_dir(&root)
        .args(["run", "-c"])
        .arg(&config)
        .spawn()
        .context("starting spooky")?;
    children.0.push(("spooky".into(), spooky));
    eprintln!(
        "xtask: spooky is starting; try:\n  {} get --insecure -n 6 https://localhost:9889/\n(Ctrl-C stops everything)",
        bin.display()
    );
    // Ctrl-C reaches the whole process group; wait for spooky to finish its drain.
    loop {
        if let Some((_, spooky)) = children.0.last_mut()
            && let Some(st) = spooky.try_wait()?
        {
            eprintln!("xtask: spooky exited ({st})");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Creates (once) a Python venv with aioquic for the independent-client tests.
fn python_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target").join("venv");
    let python = venv.join("bin").join("python");
    // Bump the marker when the package list changes.
    let ready = venv.join(".ready-aioquic-1.2.0-grpcio-1.85.1");
    if ready.exists() {
        return Ok(python);
    }
    must(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    must(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["aioquic==1.2.0", "grpcio==1.85.1"]),
    )?;
    std::fs::write(&ready, b"")?;
    Ok(python)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Crates that do I/O or bring an async runtime; spooky-lb must not
/// depend on any of them, or its state machines could start doing I/O.
const LB_FORBIDDEN: &[&str] = &["tokio", "quinn", "quinn-proto", "hyper", "h3"];

/// Fails if spooky-lb's normal (non-dev) dependency tree names a crate of
/// [`LB_FORBIDDEN`].
fn check_lb_sans_io(root: &Path) -> Result<()> {
    let out = cargo()
        .current_dir(root)
        .args([
            "tree",
            "-p",
            "spooky-lb",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .context("cannot run cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree -p spooky-lb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let found = forbidden_in_tree(&String::from_utf8_lossy(&out.stdout));
    if !found.is_empty() {
        bail!(
            "spooky-lb must stay sans-IO, but depends on: {}",
            found.join(", ")
        );
    }
    Ok(())
}

/// The forbidden crates named in `cargo tree --prefix none` output (one
/// `name vX.Y.Z [extra]` per line).
fn forbidden_in_tree(tree: &str) -> Vec<String> {
    let mut found: Vec<String> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| LB_FORBIDDEN.contains(name))
        .map(str::to_owned)
        .collect();
    found.sort();
    found.dedup();
    found
}

fn test(args: &[String], no_lint: bool) -> Result<()> {
    let root = root()?;
    let started = Instant::now();
    if !no_lint {
        eprintln!("xtask: cargo fmt --check");
        must(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))?;
        // fuzz/ is a workspace of its own, outside `--all`.
        must(
            cargo()
                .current_dir(root.join("fuzz"))
                .args(["fmt", "--check"]),
        )?;
        eprintln!("xtask: cargo clippy");
        must(cargo().current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // Before any test: a dropped [patch.crates-io] entry would test the
    // published h3 or quinn-proto, without spooky's fixes.
    eprintln!("xtask: checking the vendored crates and their patches");
    vendor::check()?;
    eprintln!("xtask: spooky-lb stays sans-IO (dependency tree)");
    check_lb_sans_io(&root)?;
    eprintln!("xtask: no two modules of spooky/src import each other");
    cycles::check(&root)?;
    if have("clang-19") || have("clang") {
        eprintln!("xtask: checking the committed eBPF object against its source");
        ebpf::check()?;
    } else if std::env::var("SPOOKY_PRIVILEGED_TESTS").is_ok_and(|v| v == "1") {
        bail!(
            "clang-19 is not installed, so the eBPF object cannot be checked (apt-get install clang-19 libbpf-dev)"
        );
    } else {
        eprintln!("xtask: SKIP eBPF object check: clang-19 not installed");
    }
    let python = python_venv(&root)?;
    eprintln!("xtask: cargo test");
    let mut c = cargo();
    c.current_dir(&root)
        .env("SPOOKY_TEST_PYTHON", &python)
        // Every test binary runs even after a failure: one CI run shows
        // all of them.
        .args(["test", "--workspace", "--all-targets", "--no-fail-fast"]);
    if !args.is_empty() {
        c.arg("--").args(args);
    }
    must(&mut c)?;
    // Doc tests are not in --all-targets.
    must(
        cargo()
            .current_dir(&root)
            .args(["test", "--workspace", "--doc"]),
    )?;
    // The patched quinn-proto (vendor/quinn-proto/PATCHED.md) must still
    // pass its own unit tests. It is outside the workspace, with its own
    // lock file; its build goes to target/vendor.
    eprintln!("xtask: quinn-proto's own tests (vendored, patched)");
    must(
        cargo()
            .current_dir(root.join("vendor/quinn-proto"))
            .env("CARGO_TARGET_DIR", root.join("target/vendor"))
            .args([
                "test",
                "--locked",
                "--release",
                "--features",
                "rustls-ring",
                "--lib",
            ]),
    )?;
    // The same for the patched h3 (vendor/h3/PATCHED.md). Its unit tests
    // include vendor/h3-quinn by path, as upstream's repository does; the
    // feature exposes the internals those tests reach.
    eprintln!("xtask: h3's own tests (vendored, patched)");
    must(
        cargo()
            .current_dir(root.join("vendor/h3"))
            .env("CARGO_TARGET_DIR", root.join("target/vendor-h3"))
            .args([
                "test",
                "--locked",
                "--lib",
                "--features",
                "i-implement-a-third-party-backend-and-opt-into-breaking-changes",
            ]),
    )?;
    eprintln!(
        "xtask: all tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::forbidden_in_tree;

    #[test]
    fn finds_forbidden_crates_by_exact_name() {
        let tree = "spooky-lb v0.1.0 (/w/spooky-lb)\nhttp v1.3.1\ntokio v1.48.0\ntokio-util v0.7.0\nh3 v0.0.8 (/w/vendor/h3)\nh3-quinn v0.0.10\n";
        assert_eq!(forbidden_in_tree(tree), ["h3", "tokio"]);
        assert!(forbidden_in_tree("spooky-lb v0.1.0\nrand v0.9.5\n").is_empty());
    }
}
