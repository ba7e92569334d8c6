//! Shared end-to-end test harness: real processes (spooky and demo
//! backends from the built binary), real sockets on loopback, and helpers
//! to read a process's memory; the config builder (`config`) and polling
//! with deadlines (`wait`). The benches include it too (`#[path]`), so
//! nothing here may assume it runs under the test harness.
#![allow(dead_code)]

pub mod config;
pub mod netns;
pub mod packets;
pub mod privilege;
pub mod wait;

pub use config::{Config, Upstream, Yaml};
pub use wait::{lines_with, metric_holds, wait_until, wait_until_async};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The tests that keep both CPUs busy for long (interop's transfers
/// through loss, migration's 16 downloads per mode) run one at a time: on
/// a 2-CPU machine they would otherwise compete for the CPUs and measure
/// the scheduler. (They were once separate test binaries, which cargo runs
/// one after the other; in the one binary this lock keeps them apart.)
pub fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn spooky_bin() -> &'static str {
    env!("CARGO_BIN_EXE_spooky")
}

/// A port free for both UDP and TCP on loopback (spooky serves HTTP/3 and
/// TLS over TCP on the same number); bound and released, so the race with
/// other processes is negligible on a test machine.
pub fn free_udp_port() -> u16 {
    loop {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Lines a child process wrote, kept for assertions and failure reports.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    pub fn contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }
    /// The lines that contain every one of `needles`.
    pub fn matching(&self, needles: &[&str]) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect()
    }
    fn wait_for(&self, needle: &str, timeout: Duration, child: &mut Child, name: &str) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.contains(needle) {
                return;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "{name} exited ({st}) before `{needle}`:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{name}: no `{needle}` within {timeout:?}:\n{}",
            self.lines().join("\n")
        );
    }
}

fn capture(stream: impl std::io::Read + Send + 'static, out: Output, echo: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("{line}");
            }
            out.0.lock().unwrap().push(line);
        }
    });
}

/// A child process killed (SIGKILL) on drop unless stopped before.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub out: Output,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait for exit; returns whether it exited in time.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Current resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} output ----\n{}",
                self.name,
                self.out.lines().join("\n")
            );
        }
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// TLS material shared by the backends of one test: a self-signed
/// certificate for localhost that spooky is told to trust.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = spooky::tls::ensure_self_signed(dir.path()).unwrap();
    Certs { dir, cert, key }
}

/// Starts a demo backend on a free port.
pub fn backend(id: &str, certs: &Certs, extra: &[&str]) -> (Proc, SocketAddr) {
    backend_on(id, certs, free_udp_port(), extra)
}

pub fn backend_on(id: &str, certs: &Certs, port: u16, extra: &[&str]) -> (Proc, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cmd = backend_command(Command::new(spooky_bin()), id, certs, addr, extra);
    (
        spawn_and_wait(cmd, &format!("backend {id}"), "listening on"),
        addr,
    )
}

/// `spooky demo-backend` arguments on `cmd` (a plain command, or one that
/// enters a namespace first).
fn backend_command(
    mut cmd: Command,
    id: &str,
    certs: &Certs,
    addr: SocketAddr,
    extra: &[&str],
) -> Command {
    cmd.args(["demo-backend", "--id", id, "--listen", &addr.to_string()])
        .arg("--cert")
        .arg(&certs.cert)
        .arg("--key")
        .arg(&certs.key)
        .args(extra)
        .env("RUST_LOG", "warn");
    cmd
}

/// A running spooky with its config directory.
pub struct Spooky {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Spooky {
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// The self-signed certificate spooky serves.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("state/self-signed-cert.pem")
    }

    pub fn client_options(&self) -> spooky::client::ClientOptions {
        spooky::client::ClientOptions {
            ca: Some(self.cert()),
            connect_to: Some(self.addr()),
            ..Default::default()
        }
    }

    pub async fn client(&self) -> spooky::client::H3Client {
        spooky::client::H3Client::connect(&self.url("/"), &self.client_options())
            .await
            .unwrap()
    }
}

/// Writes `config` (a [`Config`], or raw YAML; `PORT` replaced by a free
/// port) and starts spooky; returns once every worker listens.
pub fn spooky(config: &(impl Yaml + ?Sized)) -> Spooky {
    spooky_with(config, &[])
}

pub fn spooky_with(config: &(impl Yaml + ?Sized), env: &[(&str, &str)]) -> Spooky {
    start_spooky(Command::new(spooky_bin()), config, free_udp_port(), env)
}

/// Writes `config` (with `PORT` replaced by `port`) next to a state dir and
/// runs `spooky run` on it through `cmd`, waiting until every worker
/// listens.
fn start_spooky(
    mut cmd: Command,
    config: &(impl Yaml + ?Sized),
    port: u16,
    env: &[(&str, &str)],
) -> Spooky {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), config, port);
    cmd.args(["run", "-c"])
        .arg(dir.path().join("spooky.yaml"))
        .env("RUST_LOG", "info,spooky::access=debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc = spawn_and_wait(cmd, "spooky", "spooky ready");
    Spooky { proc, dir, port }
}

/// Writes `dir/spooky.yaml` from `config` with `PORT` replaced by `port`
/// and the state directory `dir/state`.
fn write_config(dir: &Path, config: &(impl Yaml + ?Sized), port: u16) {
    let config = config.yaml().replace("PORT", &port.to_string());
    std::fs::write(
        dir.join("spooky.yaml"),
        format!("state_dir: state\n{config}"),
    )
    .unwrap();
}

impl Spooky {
    /// Replaces the running config file (for a reload to pick up).
    pub fn rewrite_config(&self, config: &(impl Yaml + ?Sized)) {
        write_config(self.dir.path(), config, self.port);
    }
}

/// Python with aioquic (set up by `cargo xtask test`), or `None` with the
/// reason printed. CI sets SPOOKY_TEST_PYTHON, so there a missing
/// interpreter fails the test.
pub fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SPOOKY_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python");
    if venv.exists() {
        return Some(venv);
    }
    eprintln!("SKIP: no aioquic venv; run `cargo xtask test` (it creates target/venv)");
    None
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Checks that `data` is the demo backend's `/bytes/N` pattern from byte
/// `offset` on (slice compares: fast even in a debug build).
pub fn assert_pattern_at(offset: u64, data: &[u8]) {
    // The pattern repeats every 251 bytes; a table of whole periods lets
    // each check be one memcmp.
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| (0..251u64 * 300).map(spooky::demo::pattern_byte).collect());
    let mut pos = 0usize;
    while pos < data.len() {
        let start = ((offset + pos as u64) % 251) as usize;
        let n = (data.len() - pos).min(table.len() - start);
        if data[pos..pos + n] != table[start..start + n] {
            let bad = (0..n)
                .find(|&i| data[pos + i] != table[start + i])
                .unwrap_or(0);
            panic!(
                "body differs from the pattern at byte {}",
                offset + (pos + bad) as u64
            );
        }
        pos += n;
    }
}

/// Starts a helper script with the test venv's Python and waits for
/// `ready` on its output.
pub fn python_proc(name: &str, script_name: &str, args: &[&str], ready: &str) -> Option<Proc> {
    let mut cmd = Command::new(python()?);
    cmd.arg(script(script_name)).args(args);
    Some(spawn_and_wait(cmd, name, ready))
}

/// Whether an external tool is installed; with SPOOKY_REQUIRE_TOOLS=1 (set
/// by `.ci/run`, which installs everything) a missing tool fails the test.
pub fn have_tool(tool: &str) -> bool {
    let found = tool_installed(tool);
    if !found {
        let required = std::env::var("SPOOKY_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(!required, "{tool} is not installed (.ci/run installs it)");
        eprintln!("SKIP: {tool} is not installed");
    }
    found
}

/// Whether `tool` is on the PATH (no skip message, no CI rule: for the
/// benches, which report missing tools themselves).
pub fn tool_installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes the child of `cmd` get SIGKILL when the thread that spawns it
/// dies, so a test or bench killed outright leaves no process behind.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec. PDEATHSIG survives the exec (nsenter's, then spooky's).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts a demo backend inside network namespace `netns`, listening on
/// `addr` (in that namespace).
pub fn backend_in_netns(
    netns: &str,
    id: &str,
    certs: &Certs,
    addr: SocketAddr,
    extra: &[&str],
) -> Proc {
    let cmd = backend_command(
        netns::command_in(netns, spooky_bin()),
        id,
        certs,
        addr,
        extra,
    );
    spawn_and_wait(cmd, &format!("backend {id}"), "listening on")
}

/// Writes `config` (with `PORT` replaced by `port`) and starts spooky
/// inside network namespace `netns`; returns once every worker listens.
/// (The returned `Spooky`'s `url`/`addr`/`client_options` name loopback:
/// build the client's options from the namespace's addresses instead.)
pub fn spooky_in_netns(
    netns: &str,
    config: &(impl Yaml + ?Sized),
    port: u16,
    env: &[(&str, &str)],
) -> Spooky {
    start_spooky(netns::command_in(netns, spooky_bin()), config, port, env)
}

/// Spawns a `spooky run` command and waits until it serves.
pub fn spawn_ready(cmd: Command) -> Proc {
    spawn_and_wait(cmd, "spooky", "spooky ready")
}

/// Spawns `cmd` with its output captured and waits for `ready` in it.
/// The child gets SIGKILL when the thread that spawned it dies, so a test
/// process killed outright leaves no proxy running in a namespace (the
/// next run then removes the namespace's name, see `netns`).
fn spawn_and_wait(mut cmd: Command, name: &str, ready: &str) -> Proc {
    die_with_parent(&mut cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let out = Output::default();
    capture(child.stdout.take().unwrap(), out.clone(), false);
    capture(child.stderr.take().unwrap(), out.clone(), false);
    let mut p = Proc {
        name: name.to_owned(),
        child,
        out,
    };
    let out = p.out.clone();
    out.wait_for(ready, Duration::from_secs(30), &mut p.child, name);
    p
}

/// GETs `/bytes/N` on `client` and checks every byte of the streamed body
/// against the demo pattern as it arrives.
pub async fn download_checked(client: &spooky::client::H3Client, n: u64) {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("/bytes/{n}"))
        .body(spooky::body::empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        assert_pattern_at(got, &data);
        got += data.len() as u64;
    }
    assert_eq!(got, n);
}

/// A free TCP port on loopback (for admin listeners).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One admin request over HTTP/1.1: (status, body).
pub fn admin(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n{auth}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad admin response: {out}"));
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1);
    // Chunked bodies (JSON) carry size lines; tests only search them.
    (status, body.to_owned())
}

/// Parses the Prometheus text format into `name{labels}` → value, with
/// labels in the order the encoder wrote them (sorted by name).
pub fn scrape_with(port: u16, token: Option<&str>) -> std::collections::HashMap<String, f64> {
    let (status, text) = admin(port, "GET", "/metrics", "", token);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

pub fn metric(m: &std::collections::HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// GETs `path` on `client`, asserts a 200 and returns the body unread, for
/// a test to stream it.
pub async fn get_ok_body(client: &spooky::client::H3Client, path: &str) -> spooky::body::ProxyBody {
    let req = http::Request::get(path)
        .body(spooky::body::empty())
        .unwrap();
    let resp = client
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.into_body()
}

/// A TLS connection to spooky's TCP listener offering `alpn`, trusting
/// spooky's certificate.
pub async fn tcp_tls(
    sp: &Spooky,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = spooky::tls::client_config(
        &spooky::tls::Verification::CaFile(sp.cert()),
        rustls::DEFAULT_VERSIONS,
        alpn,
        None,
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(sp.addr()).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}
