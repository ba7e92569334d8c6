//! Zero-drop upgrades end to end: long HTTP/3 downloads and a steady
//! stream of new connections across three `spooky upgrade`s and one
//! rollback (a new binary that never becomes ready), with some clients
//! changing their local port in the middle; and the baseline, a plain
//! stop and start, in which the long downloads break.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use crate::support::privilege::require_root;
use crate::support::*;
use spooky::client::H3Client;

/// Concurrent long downloads, and their size.
const DOWNLOADS: usize = 32;
const DOWNLOAD_BYTES: u64 = 20 << 20;
/// Each download is read at this rate, so that it spans the upgrades.
const PACE_BYTES_PER_S: f64 = 2.0 * 1024.0 * 1024.0;

fn config(upstream: Upstream, mode: &str) -> Config {
    Config::new()
        .workers(2)
        .steering_mode(mode)
        .drain_timeout_ms(120_000)
        .access_log(false)
        .upstream(upstream)
}

/// Downloads `/bytes/N` at the pace, checking every byte; rebinds the
/// client to a new local port after `rebind_at` bytes when set.
async fn paced_download(
    sp_opts: spooky::client::ClientOptions,
    url: String,
    rebind_at: Option<(u64, std::net::IpAddr)>,
) -> Result<u64, String> {
    let client = H3Client::connect(&url, &sp_opts)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = http::Request::get(format!("/bytes/{DOWNLOAD_BYTES}"))
        .body(spooky::body::empty())
        .map_err(|e| e.to_string())?;
    let resp = client
        .send(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut got = 0u64;
    let mut rebound = false;
    while let Some(frame) = body.frame().await {
        let data = frame
            .map_err(|e| format!("body after {got} bytes: {e}"))?
            .into_data()
            .map_err(|_| "trailers".to_owned())?;
        assert_pattern_at(got, &data);
        got += data.len() as u64;
        if let Some((at, local)) = rebind_at
            && !rebound
            && got >= at
        {
            let socket = std::net::UdpSocket::bind((local, 0)).map_err(|e| e.to_string())?;
            client.rebind(socket).map_err(|e| format!("rebind: {e}"))?;
            rebound = true;
        }
        let due = Duration::from_secs_f64(got as f64 / PACE_BYTES_PER_S);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    if got != DOWNLOAD_BYTES {
        return Err(format!("{got} of {DOWNLOAD_BYTES} bytes"));
    }
    client.close().await;
    Ok(got)
}

/// New connections doing one small GET each, back to back, until `stop`.
async fn new_connections(
    opts: spooky::client::ClientOptions,
    url: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
) {
    while !stop.load(Ordering::Acquire) {
        let outcome = async {
            let c = H3Client::connect(&url, &opts)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (resp, _) = c.get("/").await.map_err(|e| format!("get: {e}"))?;
            c.close().await;
            if resp.status() == 200 {
                Ok(())
            } else {
                Err(format!("status {}", resp.status()))
            }
        }
        .await;
        match outcome {
            Ok(()) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => failed.lock().unwrap().push(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `spooky upgrade -c CONFIG EXTRA...` off the runtime; returns
/// whether it succeeded and its output.
async fn run_upgrade(config: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let config = config.to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(spooky_bin())
            .arg("upgrade")
            .args(&extra)
            .arg("-c")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

/// The pid in `spooky upgrade`'s "upgraded: pid N ..." line.
fn new_pid(text: &str) -> u32 {
    text.split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"))
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

/// Signals `pid` if it is still a spooky (pids are reused quickly on a
/// busy machine: never signal one that has become something else).
fn signal_spooky(pid: u32, signal: i32) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    if exe.is_some_and(|e| e.to_string_lossy().contains("spooky")) {
        // SAFETY: kill(2) on a live spooky process this test started.
        unsafe { libc::kill(pid as i32, signal) };
    }
}

/// Kills the processes an upgrade started (children of spooky, not of
/// the test) when the test ends, also on failure.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            signal_spooky(*pid, libc::SIGKILL);
        }
    }
}

/// Where the clients connect, and the running spooky to upgrade.
struct Target {
    mode: &'static str,
    opts: spooky::client::ClientOptions,
    url: String,
    /// The clients' address (for the rebinds).
    local: std::net::IpAddr,
    config: std::path::PathBuf,
    first_pid: u32,
    /// Change the worker count with the second upgrade (2 → 3 → 2).
    change_workers: bool,
    /// The admin listener: an override set before the upgrades must hold
    /// after them.
    admin: Option<u16>,
}

/// The scenario: 32 paced downloads (a quarter of them change their local
/// port after a quarter of the body) and new connections back to back,
/// across 3 upgrades and 3 rollbacks. Returns the pids of the processes
/// the upgrades started.
async fn upgrades_keep_every_connection(t: Target) -> Vec<u32> {
    let Target {
        mode,
        opts,
        url,
        local,
        config,
        first_pid,
        change_workers,
        admin: admin_port,
    } = t;
    if let Some(port) = admin_port {
        let (st, body) = admin(port, "POST", "/backends/app/b1/weight", "5", None);
        assert_eq!(st, 200, "{body}");
    }
    let mut reap = Reap(Vec::new());
    let downloads: Vec<_> = (0..DOWNLOADS)
        .map(|i| {
            // A quarter of the clients change their local port mid-way.
            let rebind = (i % 4 == 0).then_some((DOWNLOAD_BYTES / 4, local));
            tokio::spawn(paced_download(opts.clone(), url.clone(), rebind))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let steady = tokio::spawn(new_connections(
        opts.clone(),
        url.clone(),
        stop.clone(),
        ok.clone(),
        failed.clone(),
    ));
    // Every download has its response before the first upgrade.
    wait_until_async("new connections served", Duration::from_secs(60), || {
        let n = ok.load(Ordering::Relaxed);
        if n > 5 {
            Ok(())
        } else {
            Err(format!(
                "{n} served, failures: {:?}",
                failed.lock().unwrap()
            ))
        }
    })
    .await;

    let mut pids = vec![first_pid];
    // How long each `spooky upgrade` took: until the new process served.
    let mut took = Vec::new();
    for round in 0..3 {
        let before = ok.load(Ordering::Relaxed);
        // A restart-only change rides on an upgrade: the worker count.
        let workers = if change_workers && round == 1 { 3 } else { 2 };
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace("workers: 2", &format!("workers: {workers}"))
                .replace("workers: 3", &format!("workers: {workers}")),
        )
        .unwrap();
        let started = Instant::now();
        let (success, text) = run_upgrade(&config, &[]).await;
        took.push(started.elapsed());
        assert!(success, "upgrade {round}: {text}");
        assert!(text.contains(&format!("{workers} workers")), "{text}");
        let pid = new_pid(&text);
        reap.0.push(pid);
        pids.push(pid);
        // The new process serves new connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < before + 5 {
            assert!(
                Instant::now() < deadline,
                "no new requests served after upgrade {round}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The admin override came along (the admin listener is the newest
    // process's now).
    if let Some(port) = admin_port {
        let (_, list) = admin(port, "GET", "/backends", "", None);
        assert!(list.contains("\"weight\": 5"), "{list}");
    }
    // Rollbacks: a "binary" that never becomes ready, one that exits at
    // once, and a config the new process would refuse.
    let fake = config.with_file_name("never-ready");
    std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fake = fake.to_string_lossy().into_owned();
    let (success, text) = run_upgrade(&config, &["--timeout", "2s", "--binary", &fake]).await;
    assert!(!success, "the rollback must fail: {text}");
    assert!(text.contains("not ready within 2s"), "{text}");
    let (success, text) = run_upgrade(&config, &["--binary", "/bin/false"]).await;
    assert!(!success, "{text}");
    assert!(text.contains("exited before it was ready"), "{text}");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("listen:", "listen_typo:")).unwrap();
    let (success, text) = run_upgrade(&config, &[]).await;
    assert!(!success, "{text}");
    assert!(text.contains("not upgrading"), "{text}");
    std::fs::write(&config, good).unwrap();
    let newest = *pids.last().unwrap();
    assert!(alive(newest), "the serving process survives the rollback");

    let mut results = Vec::new();
    for d in downloads {
        results.push(d.await.unwrap());
    }
    stop.store(true, Ordering::Release);
    steady.await.unwrap();
    let broken: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        broken.is_empty(),
        "{} of {DOWNLOADS} downloads broke: {broken:?}",
        broken.len()
    );
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} new requests failed ({} ok): {failed:?}",
        failed.len(),
        ok.load(Ordering::Relaxed)
    );
    eprintln!(
        "{mode}: {DOWNLOADS}/{DOWNLOADS} downloads of {DOWNLOAD_BYTES} B intact across 3 upgrades and 3 rollbacks; {} new connections, 0 failed; the new process served after {took:?}",
        ok.load(Ordering::Relaxed)
    );
    // The old generations exit once drained (their downloads are done).
    let old = pids[..pids.len() - 1].to_vec();
    wait_until_async("the old generations exit", Duration::from_secs(20), || {
        let left: Vec<_> = old.iter().filter(|p| alive(**p)).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?} still run"))
        }
    })
    .await;
    signal_spooky(newest, libc::SIGTERM);
    wait_until_async(
        "the newest exits on SIGTERM",
        Duration::from_secs(20),
        || {
            if alive(newest) {
                Err("running".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    drop(reap);
    pids[1..].to_vec()
}

/// The clients' runtime; the tests run one at a time with the other
/// CPU-heavy ones (`heavy`).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reuseport (CBPF) selection, no privilege needed: on loopback.
#[test]
fn reuseport_upgrades_keep_every_connection() {
    let _heavy = heavy();
    let certs = certs();
    let (_b, b) = backend("b1", &certs, &[]);
    // systemd's side of Type=notify: spooky says READY=1, and each new
    // process also MAINPID= (NotifyAccess=all accepts it from the child).
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let admin_port = free_tcp_port();
    let sp = spooky_with(
        &config(Upstream::h3("app", &certs, &[("b1", b)]), "reuseport").admin(admin_port),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let upgraded = runtime().block_on(upgrades_keep_every_connection(Target {
        mode: "reuseport",
        opts: sp.client_options(),
        url: sp.url("/"),
        local: "127.0.0.1".parse().unwrap(),
        config: sp.dir.path().join("spooky.yaml"),
        first_pid: sp.proc.pid(),
        change_workers: true,
        admin: Some(admin_port),
    }));
    notify.set_nonblocking(true).unwrap();
    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let mut expected = vec!["READY=1\n".to_owned()];
    expected.extend(upgraded.iter().map(|p| format!("MAINPID={p}\nREADY=1\n")));
    assert_eq!(messages, expected);
}

/// XDP steering on a veth between two namespaces: the XDP links pass to
/// each new process, and the reuseport program tells the generations'
/// sockets on one CPU apart.
#[test]
fn xdp_upgrades_keep_every_connection() {
    if !require_root("upgrades (xdp)") {
        return;
    }
    let _heavy = heavy();
    let net = netns::VethPair::new("upg-xdp");
    let certs = certs();
    let backend_addr: std::net::SocketAddr = "127.0.0.1:4433".parse().unwrap();
    let _backend = backend_in_netns(&net.server_ns, "b1", &certs, backend_addr, &[]);
    let cfg = config(Upstream::h3("app", &certs, &[("b1", backend_addr)]), "xdp")
        .address(net.server_ip)
        .steering("interfaces", format!("[{}]", net.server_if));
    let port = 4443;
    let sp = spooky_in_netns(&net.server_ns, &cfg, port, &[]);
    assert!(
        sp.proc.out.contains("XDP program attached"),
        "not in XDP mode"
    );
    let local = std::net::IpAddr::V4(net.client_ip);
    let target = Target {
        mode: "xdp",
        opts: spooky::client::ClientOptions {
            ca: Some(sp.cert()),
            connect_to: Some(std::net::SocketAddr::new(
                std::net::IpAddr::V4(net.server_ip),
                port,
            )),
            bind: Some(std::net::SocketAddr::new(local, 0)),
            ..Default::default()
        },
        url: format!("https://localhost:{port}/"),
        local,
        config: sp.dir.path().join("spooky.yaml"),
        first_pid: sp.proc.pid(),
        change_workers: false,
        admin: None,
    };
    netns::block_on_in(&net.client_ns, "upgrade-clients", move || {
        upgrades_keep_every_connection(target)
    });
    assert!(
        net.server_xdp_program().is_none(),
        "the XDP program is detached once the last generation exits"
    );
}

/// The baseline: stop (SIGTERM, the drain closes what is left at its
/// timeout) and start again. The long downloads break.
#[test]
fn a_plain_restart_breaks_long_downloads() {
    let _heavy = heavy();
    runtime().block_on(plain_restart());
}

async fn plain_restart() {
    let certs = certs();
    let (_b, b) = backend("b1", &certs, &[]);
    let cfg = config(Upstream::h3("app", &certs, &[("b1", b)]), "reuseport").drain_timeout_ms(500);
    let mut sp = spooky(&cfg);
    let url = sp.url("/");
    let downloads: Vec<_> = (0..8)
        .map(|_| tokio::spawn(paced_download(sp.client_options(), url.clone(), None)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sp.proc.terminate(Duration::from_secs(20)));
    let mut broken = 0;
    for d in downloads {
        if d.await.unwrap().is_err() {
            broken += 1;
        }
    }
    eprintln!("plain restart: {broken} of 8 long downloads broke");
    assert_eq!(broken, 8, "a stop cuts every download still running");
}
