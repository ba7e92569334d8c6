//! spooky against a peer proxy (Caddy) on the same backend and the same
//! client, measured side by side in one run (ARCHITECTURE.md, "How to
//! measure": the machine is shared, so only interleaved A/B figures mean
//! anything).
//!
//! * `h3`: HTTP/3 proxying. nginx (`return 200 "hello\n"`, HTTP/1.1
//!   keep-alive) behind spooky (`protocol: http1`) and behind Caddy
//!   (`reverse_proxy`); the load generator below (built on
//!   [`spooky::client::H3Client`]) opens `conns` connections with `streams`
//!   concurrent request loops each for `seconds`. Reported: requests/s,
//!   p50/p99 latency and proxy CPU (utime+stime of the whole process from
//!   `/proc/PID/stat`) per request. Baseline, same client, no proxy: the
//!   HTTP/3 demo backend (`spooky demo-backend --protocol http3`: the
//!   quinn/h3 stack spooky terminates with), i.e. what the client and an h3
//!   server alone reach on this machine.
//! * `h2`: HTTP/2 over TLS on TCP with `h2load` against both proxies (same
//!   nginx), plus nginx direct over HTTP/1.1 (`h2load --h1`) as the
//!   backend's ceiling.
//! * `memory`: peak RSS (VmHWM, reset through `/proc/PID/clear_refs`) of a
//!   fresh proxy while one HTTP/3 client downloads `body_mib` MiB from
//!   `/bytes/N` and uploads as much to `/sink` (spooky's demo backend over
//!   HTTP/1.1 behind both proxies), and RSS per idle HTTP/3 connection
//!   (`idle_conns` connections, each after one request; VmRSS delta).
//!
//! More scenarios in the same sections: `h3` also runs `many_conns`
//! connections with one stream each, new connections per second
//! (`handshake_loops` loops of connect, one GET, close) and, when `oha` is
//! installed (built with `--features http3`), oha's HTTP/3 load; `memory`
//! also runs 1 MiB downloads under load and RSS per idle connection at each
//! of `idle_conns` (1000 and 10000 by default; the connections are held by
//! a child process, this binary with `--idle-client`). Every load scenario
//! reports requests/s (successes over the configured duration), p50, p99
//! and p99.9 latency, proxy CPU seconds per 1k requests and peak RSS.
//!
//! Every comparison runs `rounds` rounds, the order of the targets rotating
//! each round; the table reports medians and the ratio spooky/caddy, then
//! each target as PASS/FAIL against Caddy, and the run writes
//! `bench/results/<UTC timestamp>.{md,json}`, `latest.{md,json}` and
//! `latest.png` (module `report`).
//!
//! Run with `cargo xtask bench [--quick]` or
//! `cargo bench -p spooky --bench proxy -- [--quick] [--only h3,h2,memory|proxy]
//! [--seconds 5] [--rounds 3] [--conns 4] [--streams 16] [--client-threads 2]
//! [--many-conns 256] [--handshake-loops 8] [--h2-conns 8] [--h2-streams 16]
//! [--body-mib 100] [--idle-conns 1000,10000] [--out DIR] [--default-pools]`.
//! `--quick` (explicit options override it) is 1 round of 2 s
//! without the large transfers and without 10k idle connections. By
//! default both proxies may keep 256 idle
//! connections to the backend (spooky `pool.max_connections_per_backend`,
//! Caddy `keepalive_idle_conns_per_host`), so neither churns backend
//! connections; `--default-pools` measures their stock settings instead.
//! Without `--bench` (that is, under `cargo test --all-targets`) it only
//! prints how to run it.

// A benchmark: a failed setup step aborts the run, which is what unwrap
// does; the workspace denies it only for runtime code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "proxy/report.rs"]
mod report;
// The end-to-end tests' harness: config builder, ports, /proc readers,
// polling. The bench uses a few of its items (and none of its re-exports).
#[allow(unused_imports)]
#[path = "../tests/e2e/support/mod.rs"]
mod support;

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use spooky::body::{BoxError, ProxyBody};
use spooky::client::{ClientOptions, H3Client};

use report::Table;
use support::{Config, Upstream};

// ---------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    seconds: u64,
    rounds: usize,
    sections: Vec<String>,
    conns: usize,
    streams: usize,
    client_threads: usize,
    h2_conns: usize,
    h2_streams: usize,
    body_mib: u64,
    /// Idle-connection counts to measure RSS per idle connection at.
    idle_conns: Vec<usize>,
    /// Leave both proxies' upstream keep-alive pools at their defaults
    /// (both then close and reopen backend connections under load).
    default_pools: bool,
    /// The short set: fewer rounds, shorter runs, no large bodies, no 10k
    /// idle connections.
    quick: bool,
    /// Connections of the many-connections scenario (one stream each).
    many_conns: usize,
    /// Concurrent connect-request-close loops of the handshake scenario.
    handshake_loops: usize,
    /// Where the `.md`, `.json` and `.png` reports go.
    out_dir: PathBuf,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Opts {
            seconds: 5,
            rounds: 3,
            sections: vec!["h3".into(), "h2".into(), "memory".into()],
            conns: 4,
            streams: 16,
            client_threads: 2,
            h2_conns: 8,
            h2_streams: 16,
            body_mib: 100,
            idle_conns: vec![1000, 10_000],
            default_pools: false,
            quick: false,
            many_conns: 256,
            handshake_loops: 8,
            out_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results"),
        };
        // `--quick` applies before the other options: explicit ones win
        // wherever they stand.
        if args.iter().any(|a| a == "--quick") {
            o.quick = true;
            o.seconds = 2;
            o.rounds = 1;
            o.idle_conns = vec![1000];
        }
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (key, inline) = match a.split_once('=') {
                Some((k, v)) => (k, Some(v.to_owned())),
                None => (a.as_str(), None),
            };
            let mut value = || -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .with_context(|| format!("{key} needs a value"))
            };
            let num = |v: String| -> Result<u64> {
                v.parse::<u64>()
                    .with_context(|| format!("{key}: `{v}` is not a number"))
            };
            match key {
                "--bench" => {}
                "--default-pools" => o.default_pools = true,
                "--quick" => {}
                "--out" => o.out_dir = PathBuf::from(value()?),
                "--many-conns" => o.many_conns = num(value()?)?.max(1) as usize,
                "--handshake-loops" => o.handshake_loops = num(value()?)?.max(1) as usize,
                "--seconds" => o.seconds = num(value()?)?.max(1),
                "--rounds" => o.rounds = num(value()?)?.max(1) as usize,
                "--conns" => o.conns = num(value()?)?.max(1) as usize,
                "--streams" => o.streams = num(value()?)?.max(1) as usize,
                "--client-threads" => o.client_threads = num(value()?)?.max(1) as usize,
                "--h2-conns" => o.h2_conns = num(value()?)?.max(1) as usize,
                "--h2-streams" => o.h2_streams = num(value()?)?.max(1) as usize,
                "--body-mib" => o.body_mib = num(value()?)?.max(1),
                "--idle-conns" => {
                    o.idle_conns = value()?
                        .split(',')
                        .map(|v| num(v.trim().to_owned()).map(|n| n.max(1) as usize))
                        .collect::<Result<_>>()?
                }
                "--only" => {
                    let mut s = Vec::new();
                    for part in value()?.split(',') {
                        match part.trim() {
                            "proxy" => s.extend(["h3".to_owned(), "h2".to_owned()]),
                            p @ ("h3" | "h2" | "memory") => s.push(p.to_owned()),
                            "all" => s.extend(["h3", "h2", "memory"].map(String::from)),
                            other => bail!(
                                "--only: unknown section `{other}` (valid: proxy, h3, h2, memory, all)"
                            ),
                        }
                    }
                    o.sections = s;
                }
                other => bail!("unknown argument `{other}`"),
            }
        }
        Ok(o)
    }

    fn wants(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A child process, SIGKILLed on drop (and, through PR_SET_PDEATHSIG, when
/// the bench itself dies), so nothing outlives the run.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        support::die_with_parent(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}):\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// CPU time (user + system, all threads) in seconds.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    fn rss_kib(&self) -> u64 {
        support::proc_status_kib(self.pid(), "VmRSS:")
    }

    fn peak_rss_kib(&self) -> u64 {
        support::proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Resets VmHWM to the current RSS (Linux ≥ 4.0, own processes).
    fn reset_peak(&self) -> Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), b"5")
            .context("cannot reset VmHWM through /proc/PID/clear_refs")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at
    // field 3 (state); utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// Waits until `p` accepts TCP connections on `port` (or exits).
fn wait_tcp(p: &mut Proc, port: u16) -> Result<()> {
    wait_ready(p, &format!("listening on TCP {port}"), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// Waits (20 s at most) until `ready` holds or `p` exits.
fn wait_ready(p: &mut Proc, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let mut exited = None;
    let polled = support::wait::poll_until(Duration::from_secs(20), || {
        if let Err(e) = p.alive() {
            exited = Some(e);
            return Ok(());
        }
        if ready() { Ok(()) } else { Err(String::new()) }
    });
    if let Some(e) = exited {
        return Err(e);
    }
    if polled.is_err() {
        bail!("{} not {what} within 20 s:\n{}", p.name, p.log_tail());
    }
    Ok(())
}

/// The spooky binary: `SPOOKY_BIN`, or the one cargo built for this
/// bench (`target/release/spooky` under `cargo bench`).
fn spooky_bin() -> PathBuf {
    std::env::var_os("SPOOKY_BIN")
        .map_or_else(|| PathBuf::from(support::spooky_bin()), PathBuf::from)
}

/// Everything one run shares: a temp directory, the binary, one TLS
/// certificate for `localhost` that both proxies serve.
struct Env {
    dir: tempfile::TempDir,
    spooky: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    default_pools: bool,
}

/// Idle keep-alive connections each proxy may keep to the backend when
/// pools are tuned: above any concurrency the bench drives, so neither
/// proxy closes and reopens backend connections (spooky's default is 8
/// per worker, Caddy's 32 per host; both churn at 64 requests in flight).
const POOL_IDLE: u32 = 256;

impl Env {
    fn new(default_pools: bool) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("spooky-bench-").tempdir()?;
        let (cert, key, _) = spooky::tls::ensure_self_signed(&dir.path().join("tls"))?;
        Ok(Env {
            spooky: spooky_bin(),
            dir,
            cert,
            key,
            default_pools,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client_options(&self, port: u16) -> ClientOptions {
        ClientOptions {
            ca: Some(self.cert.clone()),
            connect_to: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        }
    }

    /// nginx as the backend: one process (`master_process off`), so
    /// SIGKILL leaves no worker behind.
    fn nginx(&self) -> Result<(Proc, u16)> {
        let port = support::free_udp_port();
        let dir = self.path("nginx");
        std::fs::create_dir_all(&dir)?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 200 \"hello\\n\"; }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut p = Proc::spawn(
            "nginx",
            Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf_path),
            self.path("nginx.log"),
        )?;
        wait_tcp(&mut p, port)?;
        Ok((p, port))
    }

    /// spooky's demo backend (`/bytes/N`, `/sink`, ...).
    fn demo_backend(&self, protocol: &str) -> Result<(Proc, u16)> {
        let port = support::free_udp_port();
        let mut p = Proc::spawn(
            &format!("demo-backend {protocol}"),
            Command::new(&self.spooky)
                .args(["demo-backend", "--id", "bench", "--protocol", protocol])
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--cert")
                .arg(&self.cert)
                .arg("--key")
                .arg(&self.key)
                .env("RUST_LOG", "warn"),
            self.path(&format!("demo-{protocol}-{port}.log")),
        )?;
        if protocol == "http3" {
            let log = p.log.clone();
            wait_ready(&mut p, "ready", || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("listening on")
            })?;
        } else {
            wait_tcp(&mut p, port)?;
        }
        Ok((p, port))
    }

    /// spooky in front of `backend` (HTTP/1.1, cleartext).
    fn spooky(&self, backend: u16) -> Result<(Proc, u16)> {
        let port = support::free_udp_port();
        let dir = self.path(&format!("spooky-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut up = Upstream::new("backend")
            .protocol("http1")
            .backend("b1", format!("127.0.0.1:{backend}"))
            .field("balancing", "{ type: round_robin }");
        if !self.default_pools {
            up = up.field(
                "pool",
                format!("{{ max_connections_per_backend: {POOL_IDLE} }}"),
            );
        }
        let config = Config::new()
            .port(port)
            .listen("tcp", true)
            .listen_tls(&self.cert, &self.key)
            .upstream(up)
            .route("backend")
            .log("level", "warn");
        let conf = format!(
            "state_dir: {}\n{}",
            dir.join("state").display(),
            config.render()
        );
        let conf_path = dir.join("spooky.yaml");
        std::fs::write(&conf_path, conf)?;
        let mut p = Proc::spawn(
            "spooky",
            Command::new(&self.spooky)
                .args(["run", "-c"])
                .arg(&conf_path)
                .env_remove("RUST_LOG"),
            dir.join("spooky.log"),
        )?;
        self.wait_h3(&mut p, port)?;
        Ok((p, port))
    }

    /// Caddy 2 in front of `backend`: `reverse_proxy`, HTTP/1.1, HTTP/2 and
    /// HTTP/3 with the same certificate, admin API off, no redirects.
    fn caddy(&self, backend: u16) -> Result<(Proc, u16)> {
        let port = support::free_udp_port();
        let dir = self.path(&format!("caddy-{port}"));
        std::fs::create_dir_all(&dir)?;
        let conf = format!(
            "{{\n  admin off\n  auto_https disable_redirects\n  skip_install_trust\n\
             \x20 default_sni localhost\n  storage file_system {{\n    root {data}\n  }}\n\
             \x20 log {{\n    level ERROR\n  }}\n  servers {{\n    protocols h1 h2 h3\n  }}\n}}\n\
             https://:{port} {{\n  bind 127.0.0.1\n  tls {cert} {key}\n\
             \x20 reverse_proxy 127.0.0.1:{backend}{pool}\n}}\n",
            data = dir.join("data").display(),
            pool = if self.default_pools {
                String::new()
            } else {
                format!(
                    " {{\n    transport http {{\n      keepalive_idle_conns_per_host {POOL_IDLE}\n      keepalive_idle_conns {POOL_IDLE}\n    }}\n  }}"
                )
            },
            cert = self.cert.display(),
            key = self.key.display(),
        );
        let conf_path = dir.join("Caddyfile");
        std::fs::write(&conf_path, conf)?;
        let mut p = Proc::spawn(
            "caddy",
            Command::new("caddy")
                .args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&conf_path)
                .env("HOME", &dir)
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config")),
            dir.join("caddy.log"),
        )?;
        self.wait_h3(&mut p, port)?;
        Ok((p, port))
    }

    /// Waits until an HTTP/3 GET through `p` answers 200.
    fn wait_h3(&self, p: &mut Proc, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let rt = current_thread()?;
        let url = url(port, "/");
        let mut opts = self.client_options(port);
        opts.timeout = Some(Duration::from_secs(2));
        let mut last = String::new();
        while Instant::now() < deadline {
            p.alive()?;
            let r = rt.block_on(async {
                let c =
                    tokio::time::timeout(Duration::from_secs(2), H3Client::connect(&url, &opts))
                        .await
                        .map_err(|_| "connect timed out".to_owned())?
                        .map_err(|e| e.to_string())?;
                let (resp, _) = c.get("/").await.map_err(|e| e.to_string())?;
                c.close().await;
                Ok::<_, String>(resp.status())
            });
            match r {
                Ok(s) if s.is_success() => return Ok(()),
                Ok(s) => last = format!("status {s}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{} does not answer HTTP/3 on {port} ({last}):\n{}",
            p.name,
            p.log_tail()
        )
    }
}

fn url(port: u16, path: &str) -> String {
    format!("https://localhost:{port}{path}")
}

fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------
// HTTP/3 load generator

/// One load run's outcome.
#[derive(Debug, Clone)]
struct Run {
    requests: u64,
    errors: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    mean_us: f64,
    /// Proxy CPU per request, microseconds.
    cpu_us_per_req: f64,
    /// Backend CPU per request (reference), microseconds.
    backend_cpu_us_per_req: f64,
}

/// A latency sample: microseconds since `t0`, saturating.
fn micros_since(t0: Instant) -> u32 {
    t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

/// What one load client returns: latencies (µs) and the error count.
type ClientResult = (Vec<u32>, u64);

/// The client threads' results, merged.
fn join_clients(
    handles: Vec<std::thread::JoinHandle<Result<ClientResult>>>,
) -> Result<ClientResult> {
    let mut lat = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        lat.extend(l);
        errors += e;
    }
    Ok((lat, errors))
}

/// The load tasks' latencies (µs) and error counts, merged; a task that
/// panicked contributes nothing.
async fn merge_tasks(tasks: Vec<tokio::task::JoinHandle<ClientResult>>) -> ClientResult {
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    (all, errors)
}

/// `conns` HTTP/3 connections spread over `threads` client threads (each a
/// current-thread runtime), `streams` request loops per connection, GET
/// `path` for `duration`. CPU of `proxy_pid` and `backend_pid` is read
/// right before the first and right after the last request.
#[allow(clippy::too_many_arguments)]
fn h3_load(
    port: u16,
    opts: &ClientOptions,
    path: &str,
    conns: usize,
    streams: usize,
    threads: usize,
    duration: Duration,
    proxy_pid: u32,
    backend_pid: Option<u32>,
) -> Result<Run> {
    let threads = threads.min(conns).max(1);
    let start = Arc::new(Barrier::new(threads + 1));
    let done = Arc::new(Barrier::new(threads + 1));
    let measured = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let my_conns = conns / threads + usize::from(t < conns % threads);
        let (start, done, measured) = (start.clone(), done.clone(), measured.clone());
        let opts = opts.clone();
        let path = path.to_owned();
        let url = url(port, "/");
        handles.push(std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
            let rt = current_thread()?;
            // Connect and warm up (a round of requests on every
            // connection, so pools behind the proxy are warm) before the
            // measured window.
            // Connections open 32 at a time (the many-connections
            // scenario would otherwise spend seconds on set-up).
            let clients = rt.block_on(async {
                let mut clients = Vec::new();
                while clients.len() < my_conns {
                    let mut pending = Vec::new();
                    for _ in 0..32.min(my_conns - clients.len()) {
                        let (url, opts, path) = (url.clone(), opts.clone(), path.clone());
                        pending.push(tokio::spawn(async move {
                            let c = Arc::new(H3Client::connect(&url, &opts).await?);
                            let mut warm = Vec::new();
                            for _ in 0..streams {
                                let c = c.clone();
                                let p = path.clone();
                                warm.push(tokio::spawn(async move { c.get(&p).await.map(|_| ()) }));
                            }
                            for w in warm {
                                w.await??;
                            }
                            Ok::<_, anyhow::Error>(c)
                        }));
                    }
                    for p in pending {
                        clients.push(p.await??);
                    }
                }
                Ok::<_, anyhow::Error>(clients)
            });
            let clients = match clients {
                Ok(c) => c,
                Err(e) => {
                    // Release the others before failing.
                    start.wait();
                    done.wait();
                    measured.wait();
                    return Err(e);
                }
            };
            start.wait();
            let deadline = tokio::time::Instant::now() + duration;
            let result = rt.block_on(async {
                let mut tasks = Vec::new();
                for c in &clients {
                    for _ in 0..streams {
                        let c = c.clone();
                        let p = path.clone();
                        tasks.push(tokio::spawn(async move {
                            let mut lat = Vec::with_capacity(16 * 1024);
                            let mut errors = 0u64;
                            while tokio::time::Instant::now() < deadline {
                                let t0 = Instant::now();
                                match c.get(&p).await {
                                    Ok((r, _)) if r.status().is_success() => {
                                        lat.push(micros_since(t0))
                                    }
                                    _ => errors += 1,
                                }
                            }
                            (lat, errors)
                        }));
                    }
                }
                merge_tasks(tasks).await
            });
            done.wait();
            measured.wait();
            // Close all at once: each close waits for its endpoint to
            // drain, which one by one takes seconds for 256 connections.
            rt.block_on(futures_util::future::join_all(
                clients
                    .into_iter()
                    .filter_map(|c| Arc::try_unwrap(c).ok())
                    .map(H3Client::close),
            ));
            Ok(result)
        }));
    }
    start.wait();
    let (cpu0, bcpu0) = (cpu_seconds(proxy_pid), backend_pid.map_or(0.0, cpu_seconds));
    done.wait();
    let (cpu1, bcpu1) = (cpu_seconds(proxy_pid), backend_pid.map_or(0.0, cpu_seconds));
    measured.wait();
    let (lat, errors) = join_clients(handles)?;
    Run::from_latencies(lat, errors, duration, cpu1 - cpu0, bcpu1 - bcpu0)
}

impl Run {
    /// Requests/s from the success count and the configured `duration`
    /// (not the measured wall time, which includes the requests still in
    /// flight at the deadline).
    fn from_latencies(
        mut lat: Vec<u32>,
        errors: u64,
        duration: Duration,
        proxy_cpu_s: f64,
        backend_cpu_s: f64,
    ) -> Result<Run> {
        if lat.is_empty() {
            bail!("no request succeeded ({errors} errors)");
        }
        lat.sort_unstable();
        let n = lat.len() as u64;
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64;
        Ok(Run {
            requests: n,
            errors,
            rps: n as f64 / duration.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            mean_us: lat.iter().map(|&v| v as f64).sum::<f64>() / n as f64,
            cpu_us_per_req: proxy_cpu_s * 1e6 / n as f64,
            backend_cpu_us_per_req: backend_cpu_s * 1e6 / n as f64,
        })
    }
}

/// New-connection handshakes: `loops` concurrent loops spread over
/// `threads` client threads, each connecting, sending one GET `/`, closing
/// (without waiting for the close to drain) and starting over, for
/// `duration`. Latency is connect + request; "requests" are connections.
fn h3_handshakes(
    port: u16,
    opts: &ClientOptions,
    loops: usize,
    threads: usize,
    duration: Duration,
    proxy_pid: u32,
    backend_pid: Option<u32>,
) -> Result<Run> {
    let threads = threads.min(loops).max(1);
    let start = Arc::new(Barrier::new(threads + 1));
    let done = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let mine = loops / threads + usize::from(t < loops % threads);
        let (start, done) = (start.clone(), done.clone());
        let opts = opts.clone();
        let url = url(port, "/");
        handles.push(std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
            let rt = current_thread();
            start.wait();
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    done.wait();
                    return Err(e);
                }
            };
            let deadline = tokio::time::Instant::now() + duration;
            let result = rt.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..mine {
                    let (url, opts) = (url.clone(), opts.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut lat = Vec::with_capacity(4096);
                        let mut errors = 0u64;
                        while tokio::time::Instant::now() < deadline {
                            let t0 = Instant::now();
                            match H3Client::connect(&url, &opts).await {
                                Ok(c) => {
                                    match c.get("/").await {
                                        Ok((r, _)) if r.status().is_success() => {
                                            lat.push(micros_since(t0))
                                        }
                                        _ => errors += 1,
                                    }
                                    // Close and drop: quinn's endpoint driver
                                    // sends the CONNECTION_CLOSE and drains
                                    // in the background.
                                    c.connection()
                                        .close(quinn::VarInt::from_u32(0x100), b"done");
                                }
                                Err(_) => errors += 1,
                            }
                        }
                        (lat, errors)
                    }));
                }
                merge_tasks(tasks).await
            });
            done.wait();
            // Let the last closes go out before the runtime stops.
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
            Ok(result)
        }));
    }
    start.wait();
    let (cpu0, bcpu0) = (cpu_seconds(proxy_pid), backend_pid.map_or(0.0, cpu_seconds));
    done.wait();
    let (cpu1, bcpu1) = (cpu_seconds(proxy_pid), backend_pid.map_or(0.0, cpu_seconds));
    let (lat, errors) = join_clients(handles)?;
    Run::from_latencies(lat, errors, duration, cpu1 - cpu0, bcpu1 - bcpu0)
}

// ---------------------------------------------------------------------------
// oha (HTTP/3)

/// `oha` (built with `--features http3`) against `url` over HTTP/3 for
/// `seconds` with `conns` connections; CPU of `proxy_pid` (and
/// `backend_pid`) around it. oha's own requests/s for HTTP/3 is known to be
/// wrong, so requests/s is its 2xx count over the configured duration.
fn oha_load(
    url: &str,
    conns: usize,
    seconds: u64,
    proxy_pid: u32,
    backend_pid: Option<u32>,
) -> Result<Run> {
    let cpu0 = cpu_seconds(proxy_pid);
    let bcpu0 = backend_pid.map_or(0.0, cpu_seconds);
    let out = Command::new("oha")
        // -w: requests in flight at the deadline finish (and count)
        // instead of being reported as errors.
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--http-version",
            "3",
            "--insecure",
            "-w",
        ])
        .args(["-c", &conns.to_string(), "-z", &format!("{seconds}s"), url])
        .output()
        .context("cannot run oha")?;
    let cpu1 = cpu_seconds(proxy_pid);
    let bcpu1 = backend_pid.map_or(0.0, cpu_seconds);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "oha failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("cannot parse oha's JSON output:\n{text}"))?;
    let ok: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(code, _)| code.starts_with('2'))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    let errors: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|n| n.as_u64()).sum())
        .unwrap_or(0);
    if ok == 0 {
        bail!("oha: no request succeeded:\n{text}");
    }
    // Percentiles are in seconds.
    let pct = |k: &str| {
        v["latencyPercentiles"][k]
            .as_f64()
            .map_or(f64::NAN, |s| s * 1e6)
    };
    Ok(Run {
        requests: ok,
        errors,
        rps: ok as f64 / seconds as f64,
        p50_us: pct("p50"),
        p99_us: pct("p99"),
        p999_us: pct("p99.9"),
        mean_us: v["summary"]["average"]
            .as_f64()
            .map_or(f64::NAN, |s| s * 1e6),
        cpu_us_per_req: (cpu1 - cpu0) * 1e6 / ok as f64,
        backend_cpu_us_per_req: (bcpu1 - bcpu0) * 1e6 / ok as f64,
    })
}

// ---------------------------------------------------------------------------
// h2load

#[derive(Debug, Clone)]
struct H2Run {
    rps: f64,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    cpu_us_per_req: f64,
    failed: u64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim().trim_end_matches(',');
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

/// `h2load` for `seconds` against `url`; CPU of `pid` around it. Latency
/// percentiles come from h2load's per-request log (`--log-file`), requests/s
/// from the success count over the configured duration.
fn h2load(extra: &[&str], url: &str, seconds: u64, pid: u32, log: &Path) -> Result<H2Run> {
    let cpu0 = cpu_seconds(pid);
    let out = Command::new("h2load")
        .args(extra)
        .arg(format!("--log-file={}", log.display()))
        .args(["-D", &seconds.to_string(), url])
        .output()
        .context("cannot run h2load")?;
    let cpu1 = cpu_seconds(pid);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut finished_us = None;
    let mut succeeded = None;
    let mut failed = 0;
    let mut mean_us = 0.0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            finished_us = rest.split(',').next().and_then(parse_duration_us);
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                let n = n.parse::<u64>().unwrap_or(0);
                match what {
                    "succeeded" => succeeded = Some(n),
                    "failed" | "errored" | "timeout" => failed += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // min max mean sd +/-sd
            mean_us = rest
                .split_whitespace()
                .nth(2)
                .and_then(parse_duration_us)
                .unwrap_or(0.0);
        }
    }
    let (Some(_), Some(ok)) = (finished_us, succeeded) else {
        bail!("cannot parse h2load output:\n{text}");
    };
    if ok == 0 {
        bail!("h2load: no request succeeded:\n{text}");
    }
    // start (us since epoch) \t status \t us until the end of the response
    let log_text = std::fs::read_to_string(log)
        .with_context(|| format!("cannot read h2load's log {}", log.display()))?;
    let mut lat: Vec<u32> = log_text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_, status, us) = (f.next()?, f.next()?, f.next()?);
            status
                .starts_with('2')
                .then(|| us.trim().parse::<u32>().ok())
                .flatten()
        })
        .collect();
    let _ = std::fs::remove_file(log);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |&v| f64::from(v))
    };
    Ok(H2Run {
        rps: ok as f64 / seconds as f64,
        mean_us,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        cpu_us_per_req: (cpu1 - cpu0) * 1e6 / ok as f64,
        failed,
    })
}

// ---------------------------------------------------------------------------
// Streaming bodies

/// `left` zero bytes in 64 KiB chunks (one shared buffer).
struct Zeros {
    left: u64,
    chunk: Bytes,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[derive(Debug, Clone)]
struct Transfer {
    baseline_kib: u64,
    peak_kib: u64,
    mib_per_s: f64,
    cpu_s_per_gib: f64,
}

/// Downloads (`upload == false`) or uploads `bytes` through the proxy on
/// `port`, one HTTP/3 request, reading VmHWM of `proxy` afterwards.
fn transfer(env: &Env, proxy: &Proc, port: u16, bytes: u64, upload: bool) -> Result<Transfer> {
    let rt = current_thread()?;
    let opts = env.client_options(port);
    rt.block_on(async {
        let c = H3Client::connect(&url(port, "/"), &opts).await?;
        // One small exchange first so the upstream connection exists.
        let _ = c.get("/").await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let baseline_kib = proxy.rss_kib();
        proxy.reset_peak()?;
        let cpu0 = proxy.cpu_seconds();
        let t0 = Instant::now();
        let resp = if upload {
            let req = Request::post("/sink")
                .header(http::header::CONTENT_LENGTH, bytes)
                .body(spooky::body::boxed(Zeros {
                    left: bytes,
                    chunk: Bytes::from(vec![0u8; 64 * 1024]),
                }))?;
            c.send(req).await?
        } else {
            let req = Request::get(format!("/bytes/{bytes}")).body(spooky::body::empty())?;
            c.send(req).await?
        };
        let status = resp.status();
        let mut body: ProxyBody = resp.into_body();
        let mut got = 0u64;
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.map_err(|e| anyhow::anyhow!(e))?.into_data() {
                got += d.len() as u64;
                if upload && text.len() < 4096 {
                    text.extend_from_slice(&d);
                }
            }
        }
        let elapsed = t0.elapsed();
        let cpu = proxy.cpu_seconds() - cpu0;
        let peak_kib = proxy.peak_rss_kib();
        if !status.is_success() {
            bail!("transfer answered {status}");
        }
        if upload {
            let text = String::from_utf8_lossy(&text);
            if !text.contains(&format!("received {bytes} bytes")) {
                bail!("upload: backend reports `{}`", text.trim());
            }
        } else if got != bytes {
            bail!("download: got {got} of {bytes} bytes");
        }
        c.close().await;
        let gib = bytes as f64 / (1u64 << 30) as f64;
        Ok(Transfer {
            baseline_kib,
            peak_kib,
            mib_per_s: bytes as f64 / (1u64 << 20) as f64 / elapsed.as_secs_f64(),
            cpu_s_per_gib: cpu / gib,
        })
    })
}

/// RSS per idle HTTP/3 connection: `n` connections through the proxy,
/// each after one request, held open; VmRSS delta / n.
///
/// The connections are opened by a child process (this binary with
/// `--idle-client`): every client connection has its own quinn endpoint
/// with large, lazily touched receive buffers, and 10k of them would leave
/// this process with so much address space that forking the next proxy
/// fails (ENOMEM). The child's memory goes when it exits.
fn idle_connections(env: &Env, proxy: &Proc, port: u16, n: usize) -> Result<(f64, u64)> {
    use std::io::BufRead as _;

    let rt = current_thread()?;
    let opts = env.client_options(port);
    let u = url(port, "/");
    let warm = rt.block_on(async {
        let warm = H3Client::connect(&u, &opts).await?;
        warm.get("/").await?;
        Ok::<_, anyhow::Error>(warm)
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let before = proxy.rss_kib();
    let child = Command::new(std::env::current_exe()?)
        .arg("--idle-client")
        .arg(port.to_string())
        .arg(n.to_string())
        .arg(&env.cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the idle-connection client")?;
    // Killed on drop, so an error here leaves no client behind.
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(child);
    let mut out =
        std::io::BufReader::new(child.0.stdout.take().context("idle client has no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("idle client: {}", line.trim());
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = proxy.rss_kib();
    let mut stdin = child.0.stdin.take().context("idle client has no stdin")?;
    writeln!(stdin, "close")?;
    line.clear();
    out.read_line(&mut line)?;
    let alive: usize = line
        .trim()
        .strip_prefix("alive ")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("idle client: {}", line.trim()))?;
    let _ = child.0.wait();
    if alive < n {
        bail!("only {alive} of {n} idle connections stayed open");
    }
    rt.block_on(warm.close());
    Ok((after.saturating_sub(before) as f64 / n as f64, before))
}

/// The child side of [`idle_connections`] (`--idle-client PORT N CA`):
/// opens N connections to 127.0.0.1:PORT, one GET each, prints `ready`,
/// waits for a line (or EOF) on stdin, prints `alive K` and closes them.
fn idle_client(args: &[String]) -> Result<()> {
    let [port, n, ca] = args else {
        bail!("usage: --idle-client PORT N CA");
    };
    let port: u16 = port.parse().context("--idle-client: bad port")?;
    let n: usize = n.parse().context("--idle-client: bad count")?;
    let opts = ClientOptions {
        ca: Some(PathBuf::from(ca)),
        connect_to: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let u = url(port, "/");
    let rt = current_thread()?;
    rt.block_on(async {
        let mut clients = Vec::with_capacity(n);
        let batch = 50;
        while clients.len() < n {
            let k = batch.min(n - clients.len());
            let mut pending = Vec::new();
            for _ in 0..k {
                let (u, opts) = (u.clone(), opts.clone());
                pending.push(tokio::spawn(async move {
                    let c = H3Client::connect(&u, &opts).await?;
                    c.get("/").await?;
                    Ok::<_, anyhow::Error>(c)
                }));
            }
            for p in pending {
                clients.push(p.await??);
            }
        }
        println!("ready");
        std::io::stdout().flush()?;
        // Blocking read off the runtime thread, so the connections keep
        // being served (ACKs, keep-alives) meanwhile.
        tokio::task::spawn_blocking(|| {
            let mut l = String::new();
            std::io::stdin().read_line(&mut l)
        })
        .await??;
        let alive = clients
            .iter()
            .filter(|c| c.connection().close_reason().is_none())
            .count();
        println!("alive {alive}");
        std::io::stdout().flush()?;
        futures_util::future::join_all(clients.into_iter().map(H3Client::close)).await;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Rounds

/// Rotates `targets` by `round` so every target goes first in turn.
fn rotated<T: Clone>(targets: &[T], round: usize) -> Vec<T> {
    let mut v = targets.to_vec();
    if !v.is_empty() {
        let k = round % v.len();
        v.rotate_left(k);
    }
    v
}

// ---------------------------------------------------------------------------
// Sections

/// Records one load run in `table` and prints it.
fn record_run(
    table: &mut Table,
    scenario: &str,
    round: usize,
    name: &str,
    r: &Run,
    peak_kib: u64,
    backend: bool,
) {
    println!(
        "   round {} {:<8} {:>9.0} req/s  p50 {:>7.0}  p99 {:>7.0}  p99.9 {:>7.0} us  cpu {:>6.1} us/req  peak RSS {:>6} KiB  ({} ok, {} errors)",
        round + 1,
        name,
        r.rps,
        r.p50_us,
        r.p99_us,
        r.p999_us,
        r.cpu_us_per_req,
        peak_kib,
        r.requests,
        r.errors
    );
    let _ = std::io::stdout().flush();
    table.add(scenario, report::RPS, name, r.rps);
    table.add(scenario, report::P50, name, r.p50_us);
    table.add(scenario, report::P99, name, r.p99_us);
    table.add(scenario, report::P999, name, r.p999_us);
    table.add(scenario, report::MEAN, name, r.mean_us);
    // µs per request = ms per 1000 requests; the table shows seconds.
    table.add(scenario, report::CPU_1K, name, r.cpu_us_per_req / 1000.0);
    if backend {
        table.add(
            scenario,
            report::BACKEND_CPU_1K,
            name,
            r.backend_cpu_us_per_req / 1000.0,
        );
    }
    table.add(scenario, report::PEAK_RSS, name, peak_kib as f64 / 1024.0);
    table.add(scenario, report::ERRORS, name, r.errors as f64);
}

/// A load target: name, process, port, backend pid (for its CPU).
type Target<'a> = (&'a str, &'a Proc, u16, Option<u32>);

/// Runs `load` against every target for `o.rounds` rounds (order rotated
/// each round), peak RSS reset before each run.
fn rounds_of(
    o: &Opts,
    table: &mut Table,
    scenario: &str,
    targets: &[Target<'_>],
    mut load: impl FnMut(&str, &Proc, u16, Option<u32>) -> Result<Run>,
) -> Result<()> {
    println!("-- {scenario}");
    for round in 0..o.rounds {
        for (name, proc_, port, backend) in rotated(targets, round) {
            proc_.reset_peak()?;
            let r = load(name, proc_, port, backend)
                .with_context(|| format!("{scenario}: load through {name}"))?;
            record_run(
                table,
                scenario,
                round,
                name,
                &r,
                proc_.peak_rss_kib(),
                backend.is_some(),
            );
        }
    }
    Ok(())
}

/// Starts a fresh spooky and Caddy in front of the backend on
/// `backend_port`, and a fresh HTTP/3 demo backend as the baseline, then
/// runs [`rounds_of`]: fresh processes per scenario, so one scenario's peak
/// RSS does not carry what the one before allocated.
fn fresh_rounds(
    env: &Env,
    o: &Opts,
    table: &mut Table,
    scenario: &str,
    backend_port: u16,
    backend_pid: u32,
    load: impl Fn(&Proc, u16, Option<u32>) -> Result<Run>,
) -> Result<()> {
    let (spooky, sp) = env.spooky(backend_port)?;
    let (caddy, cp) = env.caddy(backend_port)?;
    let (direct, dp) = env.demo_backend("http3")?;
    let targets: [Target; 3] = [
        ("spooky", &spooky, sp, Some(backend_pid)),
        ("caddy", &caddy, cp, Some(backend_pid)),
        ("baseline", &direct, dp, None),
    ];
    rounds_of(o, table, scenario, &targets, |_, p, port, b| {
        load(p, port, b)
    })
}

fn section_h3(env: &Env, o: &Opts, table: &mut Table) -> Result<()> {
    let (nginx, nginx_port) = env.nginx()?;
    let np = nginx.pid();
    println!(
        "\n== h3: {} s per run, {} client threads, GET / -> nginx `hello\\n` (HTTP/1.1 keep-alive); fresh proxies per scenario, peak RSS reset before each run",
        o.seconds, o.client_threads
    );
    println!("   baseline: same client straight to spooky's HTTP/3 demo backend (no proxy)");
    let duration = Duration::from_secs(o.seconds);

    let shapes = [
        (
            format!("h3 small GETs, {} conns x {} streams", o.conns, o.streams),
            o.conns,
            o.streams,
        ),
        (
            format!("h3 {} conns x 1 stream", o.many_conns),
            o.many_conns,
            1,
        ),
    ];
    for (scenario, conns, streams) in &shapes {
        fresh_rounds(
            env,
            o,
            table,
            scenario,
            nginx_port,
            np,
            |p, port, backend| {
                h3_load(
                    port,
                    &env.client_options(port),
                    "/",
                    *conns,
                    *streams,
                    o.client_threads,
                    duration,
                    p.pid(),
                    backend,
                )
            },
        )?;
    }

    let hs = format!("h3 new connections, {} loops", o.handshake_loops);
    fresh_rounds(env, o, table, &hs, nginx_port, np, |p, port, backend| {
        h3_handshakes(
            port,
            &env.client_options(port),
            o.handshake_loops,
            o.client_threads,
            duration,
            p.pid(),
            backend,
        )
    })?;

    if support::tool_installed("oha") {
        let scen = format!("h3 small GETs (oha), {} conns", o.conns * o.streams);
        fresh_rounds(env, o, table, &scen, nginx_port, np, |p, port, backend| {
            oha_load(
                &format!("https://127.0.0.1:{port}/"),
                o.conns * o.streams,
                o.seconds,
                p.pid(),
                backend,
            )
        })?;
        table.notes.push(format!(
            "oha: `oha --http-version 3 -c {} -z {}s`; requests/s = 2xx count / configured duration (oha's own HTTP/3 req/s is known to be wrong)",
            o.conns * o.streams,
            o.seconds
        ));
    } else {
        println!("-- SKIP oha: not installed (cargo install oha --features http3)");
        table.notes.push(
            "oha: not installed, its scenario was skipped (cargo install oha --features http3)"
                .to_owned(),
        );
    }

    table.notes.push(format!(
        "h3: {} s x {} rounds per scenario, GET / (6-byte body) via nginx HTTP/1.1; baseline = same client to spooky's h3 demo backend direct (its CPU column is the server's); new connections = connect, one GET, close; requests/s = successes / configured duration",
        o.seconds, o.rounds
    ));
    Ok(())
}

fn section_h2(env: &Env, o: &Opts, table: &mut Table) -> Result<()> {
    if !support::tool_installed("h2load") {
        println!("\nSKIP h2: h2load is not installed (apt-get install nghttp2-client)");
        return Ok(());
    }
    let (nginx, nginx_port) = env.nginx()?;
    let (spooky, sp) = env.spooky(nginx_port)?;
    let (caddy, cp) = env.caddy(nginx_port)?;
    println!(
        "\n== h2: h2load -c {} -m {} -D {} (TLS, one h2load thread), GET / -> nginx; baseline: h2load --h1 -c {} straight to nginx",
        o.h2_conns, o.h2_streams, o.seconds, o.h2_conns
    );
    let c = o.h2_conns.to_string();
    let m = o.h2_streams.to_string();
    let targets: [(&str, u32, String, bool); 3] = [
        (
            "spooky",
            spooky.pid(),
            format!("https://127.0.0.1:{sp}/"),
            false,
        ),
        (
            "caddy",
            caddy.pid(),
            format!("https://127.0.0.1:{cp}/"),
            false,
        ),
        (
            "baseline",
            nginx.pid(),
            format!("http://127.0.0.1:{nginx_port}/"),
            true,
        ),
    ];
    // One short warm-up each (TLS session set-up, upstream pools).
    for (_, pid, u, h1) in &targets {
        let args: Vec<&str> = if *h1 {
            vec!["--h1", "-c", &c]
        } else {
            vec!["-c", &c, "-m", &m]
        };
        h2load(&args, u, 1, *pid, &env.path("h2load-warmup.log"))?;
    }
    let scen = format!(
        "h2 small GETs (h2load), {} conns x {} streams",
        o.h2_conns, o.h2_streams
    );
    println!("-- {scen}");
    for round in 0..o.rounds {
        for (name, pid, u, h1) in rotated(&targets, round) {
            let args: Vec<&str> = if h1 {
                vec!["--h1", "-c", &c]
            } else {
                vec!["-c", &c, "-m", &m]
            };
            let r = h2load(&args, &u, o.seconds, pid, &env.path("h2load.log"))
                .with_context(|| format!("h2load {name}"))?;
            println!(
                "   round {} {:<8} {:>9.0} req/s  p50 {:>7.0}  p99 {:>7.0}  p99.9 {:>7.0}  mean {:>7.0} us  cpu {:>6.1} us/req  ({} failed)",
                round + 1,
                name,
                r.rps,
                r.p50_us,
                r.p99_us,
                r.p999_us,
                r.mean_us,
                r.cpu_us_per_req,
                r.failed
            );
            let _ = std::io::stdout().flush();
            table.add(&scen, report::RPS, name, r.rps);
            table.add(&scen, report::P50, name, r.p50_us);
            table.add(&scen, report::P99, name, r.p99_us);
            table.add(&scen, report::P999, name, r.p999_us);
            table.add(&scen, report::MEAN, name, r.mean_us);
            table.add(&scen, report::CPU_1K, name, r.cpu_us_per_req / 1000.0);
            table.add(&scen, report::ERRORS, name, r.failed as f64);
        }
    }
    drop((spooky, caddy, nginx));
    table.notes.push(format!(
        "h2: h2load -c {} -m {} over TLS, {} s x {} rounds; baseline = nginx direct over HTTP/1.1 (h2load --h1 -c {}), its CPU column is nginx's",
        o.h2_conns, o.h2_streams, o.seconds, o.rounds, o.h2_conns
    ));
    Ok(())
}

fn section_memory(env: &Env, o: &Opts, table: &mut Table) -> Result<()> {
    let (backend, bp) = env.demo_backend("http1")?;
    println!(
        "\n== bodies and idle connections: backend spooky demo-backend over HTTP/1.1 (/bytes/N, /sink) behind both proxies; baseline: same client to the HTTP/3 demo backend direct"
    );

    // 1 MiB downloads under load.
    let duration = Duration::from_secs(o.seconds);
    let scen = "h3 1 MiB downloads, 4 conns";
    fresh_rounds(env, o, table, scen, bp, backend.pid(), |p, port, b| {
        h3_load(
            port,
            &env.client_options(port),
            "/bytes/1048576",
            4,
            1,
            o.client_threads,
            duration,
            p.pid(),
            b,
        )
    })?;

    type Start<'a> = &'a dyn Fn(u16) -> Result<(Proc, u16)>;
    let start_spooky = |b| env.spooky(b);
    let start_caddy = |b| env.caddy(b);
    let start_direct = |_: u16| env.demo_backend("http3");
    let targets: [(&str, Start); 3] = [
        ("spooky", &start_spooky),
        ("caddy", &start_caddy),
        ("baseline", &start_direct),
    ];

    // Large bodies: a fresh proxy per transfer.
    if o.quick {
        println!("-- SKIP {} MiB transfers (--quick)", o.body_mib);
        table.notes.push(format!(
            "--quick: {} MiB transfers and idle counts above 1000 skipped",
            o.body_mib
        ));
    } else {
        let bytes = o.body_mib << 20;
        let dl = format!("h3 {} MiB download, 1 stream", o.body_mib);
        let ul = format!("h3 {} MiB upload, 1 stream", o.body_mib);
        println!("-- {dl}; {ul} (fresh proxy per transfer, VmHWM reset before it)");
        for round in 0..o.rounds {
            for (name, start) in rotated(&targets, round) {
                for upload in [false, true] {
                    let (p, port) = start(bp)?;
                    let t = transfer(env, &p, port, bytes, upload).with_context(|| {
                        format!(
                            "{} through {name}",
                            if upload { "upload" } else { "download" }
                        )
                    })?;
                    let what = if upload { &ul } else { &dl };
                    let growth = t.peak_kib.saturating_sub(t.baseline_kib) as f64 / 1024.0;
                    println!(
                        "   round {} {:<8} {:<8} peak RSS {:>7} KiB (before {:>6} KiB, growth {:>6.1} MiB)  {:>7.1} MiB/s  {:>5.2} CPU s/GiB",
                        round + 1,
                        name,
                        if upload { "upload" } else { "download" },
                        t.peak_kib,
                        t.baseline_kib,
                        growth,
                        t.mib_per_s,
                        t.cpu_s_per_gib
                    );
                    let _ = std::io::stdout().flush();
                    let growth_metric = if !upload && o.body_mib == 100 {
                        report::GROWTH_100M
                    } else {
                        report::GROWTH
                    };
                    table.add(what, report::RATE, name, t.mib_per_s);
                    table.add(
                        what,
                        report::TRANSFER_PEAK,
                        name,
                        t.peak_kib as f64 / 1024.0,
                    );
                    table.add(what, growth_metric, name, growth);
                    table.add(what, report::CPU_GIB, name, t.cpu_s_per_gib);
                    drop(p);
                }
            }
        }
    }

    // Idle connections: a fresh proxy per count.
    let limit = nofile_limit();
    for &n in &o.idle_conns {
        let scen = format!("h3 {n} idle connections");
        // One UDP socket per client connection in this process.
        if (n as u64).saturating_add(512) > limit {
            println!(
                "-- SKIP {scen}: RLIMIT_NOFILE is {limit} (hard limit), {n} client sockets need more"
            );
            table.notes.push(format!(
                "{scen}: skipped, RLIMIT_NOFILE hard limit {limit} is below {n} + 512 (one UDP socket per client connection)"
            ));
            continue;
        }
        // 10k connections take a while to open: above 5000, one round
        // and no baseline.
        let (rounds, who) = if n > 5000 {
            (1, &targets[..2])
        } else {
            (o.rounds, &targets[..])
        };
        println!("-- {scen} (each after one GET; VmRSS delta / n; {rounds} round(s))");
        for round in 0..rounds {
            for (name, start) in rotated(who, round) {
                let (p, port) = start(bp)?;
                let t0 = Instant::now();
                let (per_conn, before) = idle_connections(env, &p, port, n)
                    .with_context(|| format!("{n} idle connections through {name}"))?;
                println!(
                    "   round {} {:<8} {:>6.1} KiB/conn (RSS before {} KiB; {:.1} s)",
                    round + 1,
                    name,
                    per_conn,
                    before,
                    t0.elapsed().as_secs_f64()
                );
                let _ = std::io::stdout().flush();
                table.add(&scen, report::IDLE_RSS, name, per_conn);
                table.add(&scen, report::START_RSS, name, before as f64 / 1024.0);
            }
        }
        if n > 5000 {
            table.notes.push(format!(
                "{scen}: one round and no baseline (opening them takes most of the time)"
            ));
        }
    }
    drop(backend);
    table.notes.push(format!(
        "bodies: 1 MiB downloads in a loop (requests/s = MiB/s); {} MiB over one HTTP/3 stream, peak = VmHWM reset before the transfer, growth = peak - RSS before; idle: each connection after one GET, RSS delta / n; {} rounds",
        o.body_mib, o.rounds
    ));
    Ok(())
}

/// The soft RLIMIT_NOFILE of this process (after [`raise_nofile`]).
fn nofile_limit() -> u64 {
    // SAFETY: plain getrlimit on this process.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur
        } else {
            0
        }
    }
}

/// Raises RLIMIT_NOFILE for the idle-connection runs (one UDP socket per
/// client connection): to 65536 where allowed (root may raise the hard
/// limit), else to the hard limit. Child processes inherit it.
fn raise_nofile() {
    // SAFETY: plain get/setrlimit on this process.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 || r.rlim_cur >= 65536 {
            return;
        }
        let want = libc::rlimit {
            rlim_cur: 65536,
            rlim_max: r.rlim_max.max(65536),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--idle-client") {
        if let Err(e) = idle_client(&args[1..]) {
            println!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without --bench.
        println!(
            "proxy bench: run it with `cargo xtask bench` or `cargo bench -p spooky --bench proxy`"
        );
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("proxy bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(args)?;
    let mut missing = Vec::new();
    for tool in ["caddy", "nginx"] {
        if !support::tool_installed(tool) {
            missing.push(tool);
        }
    }
    if !missing.is_empty() {
        println!(
            "SKIP proxy bench: {} not installed (apt-get install caddy nginx nghttp2-client)",
            missing.join(", ")
        );
        return Ok(());
    }
    let started = Instant::now();
    let stamp = report::utc_stamp();
    let machine = report::machine();
    raise_nofile();
    let env = Env::new(o.default_pools)?;
    println!(
        "proxy bench: spooky {} vs caddy ({}); {} rounds, targets interleaved and rotated each round",
        env.spooky.display(),
        Command::new("caddy")
            .arg("version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        o.rounds
    );
    let _ = std::io::stdout().flush();
    let mut table = Table::default();
    table.notes.push(if o.default_pools {
        "pools: both proxies' backend keep-alive pools at their defaults (spooky 8 x 100 idle per worker for HTTP/1.1, caddy 32 per host)".to_owned()
    } else {
        format!("pools: both proxies keep up to {POOL_IDLE} idle backend connections (no churn); --default-pools for stock settings")
    });
    if o.wants("h3") {
        section_h3(&env, &o, &mut table)?;
    }
    if o.wants("h2") {
        section_h2(&env, &o, &mut table)?;
    }
    if o.wants("memory") {
        section_memory(&env, &o, &mut table)?;
    }
    println!("\n{}", table.render());
    println!("{}", table.render_checks());
    let elapsed = started.elapsed().as_secs_f64();
    let options = serde_json::json!({
        "quick": o.quick,
        "seconds": o.seconds,
        "rounds": o.rounds,
        "sections": o.sections,
        "conns": o.conns,
        "streams": o.streams,
        "client_threads": o.client_threads,
        "many_conns": o.many_conns,
        "handshake_loops": o.handshake_loops,
        "h2_conns": o.h2_conns,
        "h2_streams": o.h2_streams,
        "body_mib": o.body_mib,
        "idle_conns": o.idle_conns,
        "default_pools": o.default_pools,
        "rlimit_nofile": nofile_limit(),
    });
    let written = report::write_reports(&o.out_dir, &stamp, &table, &machine, &options, elapsed)
        .context("cannot write the reports")?;
    for p in written {
        println!("wrote {}", p.display());
    }
    println!("proxy bench took {elapsed:.0} s");
    Ok(())
}
