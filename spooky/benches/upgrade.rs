//! The cost of an upgrade (`spooky upgrade`), against a plain stop and
//! start measured in the same run on the same load:
//!
//! * time until the new process serves: `spooky upgrade`'s duration, and
//!   for the restart, from SIGTERM until the new process's `spooky ready`;
//! * memory while both processes run: the old and new processes' RSS
//!   together at their peak, against one process's RSS before;
//! * requests lost: long downloads that break and small GETs on new
//!   connections that fail during the change.
//!
//! Load during each change: `downloads` HTTP/3 clients each reading a
//! 20 MiB body at 2 MiB/s, and `steady` loops of connect, one GET, close.
//! Rounds alternate upgrade and restart; the table reports medians.
//!
//! `cargo xtask bench --only upgrade` or `cargo bench -p spooky --bench
//! upgrade -- [--rounds 3] [--downloads 16] [--steady 2]`. Without
//! `--bench` (under `cargo test --all-targets`) it only prints how to run.

// A benchmark: a failed setup step aborts the run, which is what unwrap
// does; the workspace denies it only for runtime code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_imports)]
#[path = "../tests/e2e/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use spooky::client::{ClientOptions, H3Client};
use support::{Config, Upstream};

const BODY: u64 = 20 << 20;
const PACE: f64 = 2.0 * 1024.0 * 1024.0;

struct Opts {
    rounds: usize,
    downloads: usize,
    steady: usize,
}

fn parse() -> Opts {
    let mut o = Opts {
        rounds: 3,
        downloads: 16,
        steady: 2,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = || args.get(i + 1).and_then(|v| v.parse().ok());
        match args[i].as_str() {
            "--rounds" => o.rounds = value().unwrap_or(o.rounds).max(1),
            "--downloads" => o.downloads = value().unwrap_or(o.downloads),
            "--steady" => o.steady = value().unwrap_or(o.steady),
            "--quick" => {
                o.rounds = 1;
                o.downloads = 8;
            }
            _ => {}
        }
        i += 1;
    }
    o
}

/// One change measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    serving_after: Duration,
    rss_before_kib: u64,
    rss_peak_both_kib: u64,
    downloads_broken: usize,
    new_requests_ok: u64,
    new_requests_failed: u64,
}

async fn paced(opts: ClientOptions, url: String) -> bool {
    let Ok(c) = H3Client::connect(&url, &opts).await else {
        return false;
    };
    let req = http::Request::get(format!("/bytes/{BODY}"))
        .body(spooky::body::empty())
        .unwrap();
    let Ok(resp) = c.send(req).await else {
        return false;
    };
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Ok(d) = frame.into_data() {
            got += d.len() as u64;
        }
        let due = Duration::from_secs_f64(got as f64 / PACE);
        if let Some(w) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(w).await;
        }
    }
    got == BODY
}

async fn steady(
    opts: ClientOptions,
    url: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Acquire) {
        let r = async {
            let c = H3Client::connect(&url, &opts).await.ok()?;
            let (resp, _) = c.get("/").await.ok()?;
            c.close().await;
            (resp.status() == 200).then_some(())
        }
        .await;
        match r {
            Some(()) => ok.fetch_add(1, Ordering::Relaxed),
            None => failed.fetch_add(1, Ordering::Relaxed),
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spooky_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("spooky") && cmd.contains("run\0-c") {
            pids.push(pid);
        }
    }
    pids
}

/// One round: a spooky under load, then the change (`upgrade` or a plain
/// restart).
fn round(upgrade: bool, o: &Opts, rt: &tokio::runtime::Runtime) -> Sample {
    let certs = support::certs();
    let (_b, b) = support::backend("b1", &certs, &[]);
    let cfg = Config::new()
        .workers(2)
        .drain_timeout_ms(if upgrade { 120_000 } else { 1000 })
        .access_log(false)
        .upstream(Upstream::h3("app", &certs, &[("b1", b)]));
    let mut sp = support::spooky(&cfg);
    let opts = sp.client_options();
    let url = sp.url("/");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let _guard = rt.enter();
    let downloads: Vec<_> = (0..o.downloads)
        .map(|_| rt.spawn(paced(opts.clone(), url.clone())))
        .collect();
    let loops: Vec<_> = (0..o.steady)
        .map(|_| {
            rt.spawn(steady(
                opts.clone(),
                url.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
            ))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let rss_before_kib = sp.proc.rss_kib();
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Acquire) {
                let sum: u64 = spooky_pids()
                    .into_iter()
                    .map(|p| support::proc_status_kib(p, "VmRSS:"))
                    .sum();
                peak.fetch_max(sum, Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let started = Instant::now();
    let mut restarted = None;
    if upgrade {
        let out = std::process::Command::new(support::spooky_bin())
            .args(["upgrade", "-c"])
            .arg(sp.dir.path().join("spooky.yaml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    } else {
        assert!(sp.proc.terminate(Duration::from_secs(30)));
        // Same port, same state directory: what an operator's restart is.
        let mut cmd = std::process::Command::new(support::spooky_bin());
        cmd.args(["run", "-c"])
            .arg(sp.dir.path().join("spooky.yaml"));
        restarted = Some(support::spawn_ready(cmd));
    }
    let serving_after = started.elapsed();
    let broken = downloads
        .into_iter()
        .map(|d| rt.block_on(d).unwrap_or(false))
        .filter(|ok| !ok)
        .count();
    stop.store(true, Ordering::Release);
    for l in loops {
        let _ = rt.block_on(l);
    }
    sampling.store(false, Ordering::Release);
    let _ = sampler.join();
    for p in spooky_pids() {
        // SAFETY: kill(2) on a spooky this round started (read from /proc
        // just now).
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    drop(restarted);
    Sample {
        serving_after,
        rss_before_kib,
        rss_peak_both_kib: peak.load(Ordering::Acquire),
        downloads_broken: broken,
        new_requests_ok: ok.load(Ordering::Relaxed),
        new_requests_failed: failed.load(Ordering::Relaxed),
    }
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("upgrade bench: run with `cargo xtask bench --only upgrade`");
        return;
    }
    let o = parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut upgrades = Vec::new();
    let mut restarts = Vec::new();
    for r in 0..o.rounds {
        // Alternate which goes first.
        for upgrade in if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let s = round(upgrade, &o, &rt);
            println!(
                "{} round {r}: {s:?}",
                if upgrade { "upgrade" } else { "restart" }
            );
            if upgrade {
                upgrades.push(s);
            } else {
                restarts.push(s);
            }
        }
    }
    let row = |name: &str, v: &[Sample]| {
        let serving = median(v.iter().map(|s| s.serving_after.as_secs_f64()).collect());
        let before = median(v.iter().map(|s| s.rss_before_kib as f64).collect());
        let peak = median(v.iter().map(|s| s.rss_peak_both_kib as f64).collect());
        let broken = median(v.iter().map(|s| s.downloads_broken).collect());
        let failed = median(v.iter().map(|s| s.new_requests_failed).collect());
        let okn = median(v.iter().map(|s| s.new_requests_ok).collect());
        println!(
            "| {name} | {serving:.2} s | {:.1} MiB | {:.1} MiB ({:.2}×) | {broken} of {} | {failed} of {} |",
            before / 1024.0,
            peak / 1024.0,
            peak / before.max(1.0),
            o.downloads,
            okn + failed
        );
        (serving, peak / before.max(1.0))
    };
    println!(
        "\n## Upgrade vs restart ({} rounds, {} paced 20 MiB downloads, {} new-connection loops)\n",
        o.rounds, o.downloads, o.steady
    );
    println!(
        "| change | new process serves after | RSS before | RSS of all spooky processes, peak | downloads broken | new requests failed |"
    );
    println!("|---|---|---|---|---|---|");
    let (u_serving, _) = row("`spooky upgrade`", &upgrades);
    let (r_serving, _) = row("stop + start", &restarts);
    println!(
        "\nupgrade / restart, time until the new process serves: {:.2}×",
        u_serving / r_serving.max(1e-9)
    );
}
