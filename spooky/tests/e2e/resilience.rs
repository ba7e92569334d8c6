//! Resilience end to end, through real processes and sockets: backends
//! killed and restarted under an HTTP/3 load, slow backends, session
//! affinity, circuit breakers, panic mode. Every figure the issue asks for
//! (ejection and recovery times, traffic shares, breaker timings) is
//! printed with `eprintln!` (`cargo test -- --nocapture` shows them).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use spooky::body;
use spooky::client::H3Client;

/// spooky at log level `info`: no access-log line per request, so the
/// log stays small enough to poll cheaply.
fn start(config: &Config) -> Spooky {
    spooky_with(config, &[("RUST_LOG", "info,spooky::access=off")])
}

/// A response: status, headers, body.
struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn backend(&self) -> Option<&str> {
        self.headers
            .get("x-backend-id")
            .and_then(|v| v.to_str().ok())
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn get(c: &H3Client, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body::empty()).map_err(|e| e.to_string())?;
    let resp = c.send(req).await.map_err(|e| e.to_string())?;
    let (parts, b) = resp.into_parts();
    let body = b.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

async fn must_get(c: &H3Client, path: &str, headers: &[(&str, &str)]) -> Reply {
    get(c, path, headers).await.unwrap()
}

// ---------------------------------------------------------------- load

/// What a load run saw.
#[derive(Default)]
struct Tally {
    /// Successes per backend id.
    by_backend: BTreeMap<String, usize>,
    /// (completion time, backend) of every success.
    timeline: Vec<(Instant, String)>,
    /// Every non-200 or failed request.
    failures: Vec<String>,
    max_latency: Duration,
}

/// Concurrent GETs over a few connections until stopped or until
/// `remaining` requests were sent.
struct Load {
    remaining: Arc<AtomicUsize>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        clients: &[Arc<H3Client>],
        per_client: usize,
        path: &'static str,
        requests: usize,
    ) -> Self {
        let remaining = Arc::new(AtomicUsize::new(requests));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut tasks = Vec::new();
        for c in clients {
            for _ in 0..per_client {
                let (c, remaining, tally) = (c.clone(), remaining.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    while remaining
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let t0 = Instant::now();
                        let r = get(&c, path, &[]).await;
                        let done = Instant::now();
                        let give_up = {
                            let mut t = tally.lock().unwrap();
                            t.max_latency = t.max_latency.max(done - t0);
                            match r {
                                Ok(r) if r.status == 200 => {
                                    let id = r.backend().unwrap_or("?").to_owned();
                                    *t.by_backend.entry(id.clone()).or_default() += 1;
                                    t.timeline.push((done, id));
                                }
                                Ok(r) => t.failures.push(format!("{}: {}", r.status, r.text())),
                                Err(e) => t.failures.push(e),
                            }
                            // A broken connection fails at once: give up
                            // rather than spin (and starve the runtime).
                            t.failures.len() > 100
                        };
                        if give_up {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                }));
            }
        }
        Self {
            remaining,
            tally,
            tasks,
        }
    }

    /// Until stopped.
    fn endless(clients: &[Arc<H3Client>], per_client: usize, path: &'static str) -> Self {
        Self::start(clients, per_client, path, usize::MAX)
    }

    /// Successes of `id` completed after `t`.
    fn served_since(&self, id: &str, t: Instant) -> usize {
        let tally = self.tally.lock().unwrap();
        tally
            .timeline
            .iter()
            .rev()
            .take_while(|(at, _)| *at > t)
            .filter(|(_, b)| b == id)
            .count()
    }

    fn failures(&self) -> Vec<String> {
        self.tally.lock().unwrap().failures.clone()
    }

    async fn finish(self) -> Tally {
        self.remaining.store(0, Ordering::Release);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.tally)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

async fn clients(sp: &Spooky, n: usize) -> Vec<Arc<H3Client>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Arc::new(sp.client().await));
    }
    v
}

// ---------------------------------------------------------------- logs

/// Waits (yielding to the load tasks) for a line of `out` after line
/// `from` that contains every needle; returns when it was seen and its
/// index.
async fn wait_log(
    out: &Output,
    from: usize,
    needles: &[&str],
    timeout: Duration,
) -> Option<(Instant, usize)> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = out.lines();
        if let Some(i) = lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
            .map(|(i, _)| i)
        {
            return Some((Instant::now(), i));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Seconds since midnight UTC of a spooky log line (its RFC 3339
/// timestamp): when spooky decided, not when the test noticed.
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(11..26)?; // HH:MM:SS.ffffff
    let h: f64 = t.get(0..2)?.parse().ok()?;
    let m: f64 = t.get(3..5)?.parse().ok()?;
    let s: f64 = t.get(6..)?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Now, in seconds since midnight UTC (to compare with [`log_time`]).
fn wall_now() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_micros()) / 1e6
}

/// Milliseconds from `since` (a [`wall_now`]) to the log line `i`.
fn log_ms_after(out: &Output, i: usize, since: f64) -> Option<u128> {
    let t = log_time(out.lines().get(i)?)?;
    let d = (t - since).rem_euclid(86_400.0);
    Some((d * 1000.0).round() as u128)
}

fn log_len(out: &Output) -> usize {
    out.lines().len()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---------------------------------------------------------------- tests

/// The headline test: one of three backends is SIGKILLed under an
/// HTTP/3 load of GETs. No client request may fail (per-try timeout +
/// retries on another backend), the backend must be ejected within the
/// configured thresholds (outlier detection on timeouts, active health
/// checks) and must get traffic again once it restarts on the same port.
#[tokio::test]
async fn killed_backend_is_ejected_and_recovers_without_failed_requests() {
    let certs = Arc::new(certs());
    let (_b1, a1) = backend("b1", &certs, &[]);
    let (mut b2, a2) = backend("b2", &certs, &[]);
    let (_b3, a3) = backend("b3", &certs, &[]);
    // Thresholds the test holds spooky to.
    const PER_TRY_MS: u64 = 250;
    const INTERVAL_MS: u64 = 200;
    const PROBE_TIMEOUT_MS: u64 = 150;
    const FALL: u64 = 2;
    const RISE: u64 = 2;
    const BACKOFF_CAP_MS: u64 = 400;
    let up = Upstream::h3("demo", &certs, &[("b1", a1), ("b2", a2), ("b3", a3)])
        .field("balancing", "{ type: round_robin }")
        .field(
            "health_check",
            format!(
                "{{ path: /health, interval_ms: {INTERVAL_MS}, timeout_ms: {PROBE_TIMEOUT_MS}, unhealthy_threshold: {FALL}, healthy_threshold: {RISE}, max_backoff_ms: {BACKOFF_CAP_MS} }}"
            ),
        )
        .field(
            "outlier_detection",
            "{ consecutive_gateway_failures: 3, base_ejection_ms: 1000, max_ejection_ms: 4000 }",
        )
        .field(
            "retries",
            format!("{{ attempts: 2, per_try_timeout_ms: {PER_TRY_MS} }}"),
        )
        .field("timeouts", "{ connect_ms: 250 }");
    let sp = start(&Config::new().upstream(up));
    let out = sp.proc.out.clone();
    let load = Load::endless(&clients(&sp, 3).await, 8, "/");

    // Warm: b2 has its share of the load.
    wait_until_async(
        "more than 20 responses from b2",
        Duration::from_secs(10),
        || {
            let warm = load.tally.lock().unwrap().by_backend.clone();
            if warm.get("b2").copied().unwrap_or(0) > 20 {
                Ok(())
            } else {
                Err(format!("{warm:?}"))
            }
        },
    )
    .await;

    // Kill b2 (SIGKILL: no CONNECTION_CLOSE, its QUIC connections just
    // go silent).
    let mark = log_len(&out);
    let killed = wall_now();
    b2.kill();
    let (ejected, unhealthy) = tokio::join!(
        wait_log(
            &out,
            mark,
            &["backend ejected", "demo/b2"],
            Duration::from_secs(10),
        ),
        wait_log(
            &out,
            mark,
            &["backend UNHEALTHY", "demo/b2"],
            Duration::from_secs(10),
        ),
    );
    let eject_ms = ejected.and_then(|(_, i)| log_ms_after(&out, i, killed));
    let unhealthy_ms = unhealthy.and_then(|(_, i)| log_ms_after(&out, i, killed));
    eprintln!(
        "FIGURE kill: outlier ejection after {eject_ms:?} ms, active-health UNHEALTHY after {unhealthy_ms:?} ms (per-try timeout {PER_TRY_MS} ms, probes every {INTERVAL_MS} ms, timeout {PROBE_TIMEOUT_MS} ms, fall {FALL})"
    );
    let first = [eject_ms, unhealthy_ms].into_iter().flatten().min();
    let Some(first) = first else {
        panic!("b2 was neither ejected nor marked unhealthy within 10 s");
    };
    // Outlier detection: three timed-out tries (run in parallel under
    // load) eject it after about one per-try timeout.
    if let Some(e) = eject_ms {
        assert!(e <= u128::from(PER_TRY_MS) + 1500, "ejection took {e} ms");
    }
    // Active checks: `fall` failed probes, each at most one interval (plus
    // jitter) apart and one probe timeout long.
    let health_bound = FALL * (INTERVAL_MS * 11 / 10 + PROBE_TIMEOUT_MS) + 1500;
    let Some(u) = unhealthy_ms else {
        panic!("b2 not marked unhealthy within 10 s");
    };
    assert!(u <= u128::from(health_bound), "UNHEALTHY after {u} ms");
    assert!(first <= u128::from(health_bound));

    // Down for a while: nothing reaches it, nothing fails.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(load.failures().is_empty(), "{:?}", load.failures());

    // Restart b2 on the same port (off the runtime: the harness blocks
    // while it waits for the backend to listen).
    let mark = log_len(&out);
    let port = a2.port();
    let c2 = certs.clone();
    let (b2_again, _) = tokio::task::spawn_blocking(move || backend_on("b2", &c2, port, &[]))
        .await
        .unwrap();
    let restarted = Instant::now();
    let restarted_wall = wall_now();
    let healthy = wait_log(
        &out,
        mark,
        &["backend healthy", "demo/b2"],
        Duration::from_secs(15),
    )
    .await;
    let healthy_ms = healthy.and_then(|(_, i)| log_ms_after(&out, i, restarted_wall));
    let deadline = Instant::now() + Duration::from_secs(15);
    let traffic_ms = loop {
        let first = load
            .tally
            .lock()
            .unwrap()
            .timeline
            .iter()
            .find(|(at, b)| *at > restarted && b == "b2")
            .map(|(at, _)| ms(*at - restarted));
        if first.is_some() {
            break first;
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!(
        "FIGURE recovery: active-health healthy {healthy_ms:?} ms after the restart, first client response from b2 after {traffic_ms:?} ms (rise {RISE}, probe backoff cap {BACKOFF_CAP_MS} ms)"
    );
    assert!(healthy_ms.is_some(), "b2 never became healthy again");
    assert!(traffic_ms.is_some(), "b2 never got traffic again");
    // Then it takes its share again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let share = load.served_since("b2", after);
    let tally = load.finish().await;
    let total: usize = tally.by_backend.values().sum();
    eprintln!(
        "FIGURE kill run: {total} requests, {} failed, max latency {} ms, per backend {:?}, b2 served {share} in the last second",
        tally.failures.len(),
        ms(tally.max_latency),
        tally.by_backend
    );
    assert!(
        tally.failures.is_empty(),
        "failed requests: {:?}",
        tally.failures
    );
    assert!(share > 20, "b2 served only {share} in the last second");
    drop(b2_again);
    for l in out.lines().iter().filter(|l| l.contains("demo/b2")) {
        eprintln!("  spooky: {l}");
    }
}

/// The same kill without active health checks: outlier detection alone
/// (connect failures, connect backoff and timeouts count) ejects the dead
/// backend, re-admits it on schedule for one probing try at a time (each
/// re-admission starts from fresh connections and no connect backoff) and
/// takes it back once it answers. No client request fails.
#[tokio::test]
async fn outlier_detection_alone_ejects_and_readmits_a_killed_backend() {
    let certs = Arc::new(certs());
    let (_b1, a1) = backend("o1", &certs, &[]);
    let (mut b2, a2) = backend("o2", &certs, &[]);
    let (_b3, a3) = backend("o3", &certs, &[]);
    const BASE_MS: u64 = 500;
    const MAX_MS: u64 = 2000;
    let up = Upstream::h3("demo", &certs, &[("o1", a1), ("o2", a2), ("o3", a3)])
        .field("balancing", "{ type: least_connections }")
        .field(
            "outlier_detection",
            format!(
                "{{ consecutive_gateway_failures: 3, base_ejection_ms: {BASE_MS}, max_ejection_ms: {MAX_MS} }}"
            ),
        )
        .field("retries", "{ attempts: 2, per_try_timeout_ms: 250 }")
        .field("timeouts", "{ connect_ms: 150 }");
    let sp = start(&Config::new().upstream(up));
    let out = sp.proc.out.clone();
    let load = Load::endless(&clients(&sp, 2).await, 8, "/");
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let mark = log_len(&out);
    let killed = wall_now();
    b2.kill();
    let ejected = wait_log(
        &out,
        mark,
        &["backend ejected", "demo/o2"],
        Duration::from_secs(10),
    )
    .await;
    let eject_ms = ejected.and_then(|(_, i)| log_ms_after(&out, i, killed));
    // Down through a few re-admissions.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ejections_while_down = out.lines()[mark..]
        .iter()
        .filter(|l| l.contains("backend ejected") && l.contains("demo/o2"))
        .count();
    let port = a2.port();
    let c2 = certs.clone();
    let (b2_again, _) = tokio::task::spawn_blocking(move || backend_on("o2", &c2, port, &[]))
        .await
        .unwrap();
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(MAX_MS / 1000 + 10);
    let back_ms = loop {
        if load.served_since("o2", restarted) > 0 {
            break Some(ms(restarted.elapsed()));
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let tally = load.finish().await;
    eprintln!(
        "FIGURE outlier only: ejected {eject_ms:?} ms after the kill, {ejections_while_down} ejections in 2.5 s down (base {BASE_MS} ms, cap {MAX_MS} ms); first response after the restart {back_ms:?} ms; {} requests, {} failed, max latency {} ms",
        tally.by_backend.values().sum::<usize>(),
        tally.failures.len(),
        ms(tally.max_latency)
    );
    for l in out.lines().iter().filter(|l| l.contains("demo/o2")) {
        eprintln!("  spooky: {l}");
    }
    assert!(eject_ms.is_some_and(|e| e < 1500), "ejection: {eject_ms:?}");
    assert!(
        ejections_while_down >= 2,
        "re-admitted and re-ejected while down"
    );
    assert!(back_ms.is_some(), "o2 never served again");
    assert!(
        tally.failures.is_empty(),
        "failed requests: {:?}",
        tally.failures
    );
    drop(b2_again);
}

/// A backend slowed down by `--delay-ms` gets a third of the requests
/// under round robin, and clearly less under least_connections and
/// p2c_ewma, which see its in-flight count and latency.
#[tokio::test]
async fn slow_backend_gets_less_traffic_under_p2c_ewma_and_least_connections() {
    let certs = certs();
    let (_f1, a1) = backend("fast1", &certs, &[]);
    let (_f2, a2) = backend("fast2", &certs, &[]);
    let (_s, a3) = backend("slow", &certs, &["--delay-ms", "40"]);
    let pool = [("fast1", a1), ("fast2", a2), ("slow", a3)];
    let algos = [
        ("rr", "round_robin"),
        ("lc", "least_connections"),
        ("p2c", "p2c_ewma"),
    ];
    let mut config = Config::new();
    for (name, algo) in algos {
        config = config
            .upstream(
                Upstream::h3(name, &certs, &pool).field("balancing", format!("{{ type: {algo} }}")),
            )
            .route_with(
                name,
                &[("match", &format!("{{ headers: {{ x-algo: {name} }} }}"))],
            );
    }
    let sp = start(&config);
    let mut shares = HashMap::new();
    for (name, algo) in algos {
        let cs = clients(&sp, 2).await;
        let tally = run_with_header(&cs, 8, 600, ("x-algo", name)).await;
        assert!(tally.failures.is_empty(), "{algo}: {:?}", tally.failures);
        let total: usize = tally.by_backend.values().sum();
        let slow = tally.by_backend.get("slow").copied().unwrap_or(0);
        let share = slow as f64 / total as f64;
        eprintln!(
            "FIGURE slow backend (40 ms) share under {algo}: {:.1} % ({slow}/{total}; {:?})",
            share * 100.0,
            tally.by_backend
        );
        shares.insert(name, share);
    }
    let (rr, lc, p2c) = (shares["rr"], shares["lc"], shares["p2c"]);
    assert!((rr - 1.0 / 3.0).abs() < 0.05, "round robin share {rr}");
    assert!(lc < rr / 2.0, "least_connections {lc} vs round robin {rr}");
    assert!(p2c < rr / 2.0, "p2c_ewma {p2c} vs round robin {rr}");
}

/// `requests` GETs of `/` carrying `header`, `per_client` at a time on each
/// connection.
async fn run_with_header(
    clients: &[Arc<H3Client>],
    per_client: usize,
    requests: usize,
    header: (&'static str, &'static str),
) -> Tally {
    let remaining = Arc::new(AtomicUsize::new(requests));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for c in clients {
        for _ in 0..per_client {
            let (c, remaining, tally) = (c.clone(), remaining.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                while remaining
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let r = get(&c, "/", &[header]).await;
                    let mut t = tally.lock().unwrap();
                    match r {
                        Ok(r) if r.status == 200 => {
                            let id = r.backend().unwrap_or("?").to_owned();
                            *t.by_backend.entry(id).or_default() += 1;
                        }
                        Ok(r) => t.failures.push(format!("{}: {}", r.status, r.text())),
                        Err(e) => t.failures.push(e),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap()
}

/// The `name=value` part of a Set-Cookie header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

/// Sticky sessions: the first response sets a cookie naming (opaquely)
/// the backend; requests carrying it stay there, on this connection and on
/// a new one. When that backend dies, requests with the old cookie still
/// succeed elsewhere and get a new cookie, which sticks in turn.
#[tokio::test]
async fn sticky_cookie_pins_a_client_across_connections_and_falls_back() {
    let certs = certs();
    let mut procs = HashMap::new();
    let mut pool = Vec::new();
    for id in ["s1", "s2", "s3"] {
        let (p, a) = backend(id, &certs, &[]);
        procs.insert(id.to_owned(), p);
        pool.push((id, a));
    }
    let up = Upstream::h3("sticky", &certs, &pool)
        .field(
            "balancing",
            "{ type: sticky_cookie, cookie: lb, ttl_s: 600 }",
        )
        .field(
            "health_check",
            "{ interval_ms: 200, timeout_ms: 150, unhealthy_threshold: 2, max_backoff_ms: 400 }",
        )
        .field("retries", "{ per_try_timeout_ms: 250 }")
        .field("timeouts", "{ connect_ms: 250 }");
    let sp = start(&Config::new().upstream(up));
    let c1 = sp.client().await;
    let first = must_get(&c1, "/", &[]).await;
    assert_eq!(first.status, 200);
    let pinned = first.backend().unwrap().to_owned();
    let set = first
        .header("set-cookie")
        .expect("first response sets the cookie");
    assert!(set.starts_with("lb="), "{set}");
    assert!(
        set.contains("Max-Age=600") && set.contains("HttpOnly"),
        "{set}"
    );
    assert!(!set.contains(&pinned), "cookie must be opaque: {set}");
    let cookie = cookie_pair(set);
    let with = [("cookie", cookie.as_str())];
    for _ in 0..20 {
        let r = must_get(&c1, "/", &with).await;
        assert_eq!(r.backend(), Some(pinned.as_str()));
        assert_eq!(r.header("set-cookie"), None, "cookie re-sent needlessly");
    }
    // Without the cookie the fallback spreads requests.
    let mut spread = BTreeMap::new();
    for _ in 0..30 {
        let r = must_get(&c1, "/", &[]).await;
        *spread.entry(r.backend().unwrap().to_owned()).or_insert(0) += 1;
    }
    assert!(spread.len() >= 2, "{spread:?}");
    // A new connection (a reconnecting client) keeps the backend.
    drop(c1);
    let c2 = sp.client().await;
    for _ in 0..20 {
        assert_eq!(
            must_get(&c2, "/", &with).await.backend(),
            Some(pinned.as_str())
        );
    }

    // The pinned backend dies.
    let killed = Instant::now();
    procs.get_mut(&pinned).unwrap().kill();
    let moved = must_get(&c2, "/", &with).await;
    let fallback_ms = ms(killed.elapsed());
    assert_eq!(moved.status, 200, "{}", moved.text());
    let new_backend = moved.backend().unwrap().to_owned();
    assert_ne!(new_backend, pinned);
    let reissued = moved
        .header("set-cookie")
        .expect("a new cookie when the backend is gone");
    let new_cookie = cookie_pair(reissued);
    assert_ne!(new_cookie, cookie);
    eprintln!(
        "FIGURE sticky fallback: first request after the kill answered by {new_backend} in {fallback_ms} ms (per-try timeout 250 ms)"
    );
    let with_new = [("cookie", new_cookie.as_str())];
    for _ in 0..20 {
        let r = must_get(&c2, "/", &with_new).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), Some(new_backend.as_str()));
    }
    // Clients still holding the old cookie keep being served, each
    // response offering a cookie for a live backend.
    for _ in 0..10 {
        let r = must_get(&c2, "/", &with).await;
        assert_eq!(r.status, 200);
        assert_ne!(r.backend(), Some(pinned.as_str()));
        assert!(r.header("set-cookie").is_some());
    }
    // On a new connection too.
    let c3 = sp.client().await;
    assert_eq!(
        must_get(&c3, "/", &with_new).await.backend(),
        Some(new_backend.as_str())
    );
}

/// Consistent hashing on a header: every user keeps its backend across
/// requests and connections; when a backend dies only its users move (to
/// one consistent new backend each), and every request still succeeds.
#[tokio::test]
async fn consistent_hash_keeps_keys_on_one_backend_and_moves_only_the_dead_ones() {
    let certs = certs();
    let mut procs = HashMap::new();
    let mut pool = Vec::new();
    for id in ["h1", "h2", "h3"] {
        let (p, a) = backend(id, &certs, &[]);
        procs.insert(id.to_owned(), p);
        pool.push((id, a));
    }
    let up = Upstream::h3("hash", &certs, &pool)
        .field(
            "balancing",
            "{ type: consistent_hash, key: { source: header, name: x-user } }",
        )
        .field(
            "health_check",
            "{ interval_ms: 200, timeout_ms: 150, unhealthy_threshold: 2, max_backoff_ms: 400 }",
        )
        .field("retries", "{ per_try_timeout_ms: 250 }")
        .field("timeouts", "{ connect_ms: 250 }");
    let sp = start(&Config::new().upstream(up));
    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let c1 = sp.client().await;
    let mut owner = BTreeMap::new();
    for u in &users {
        let r = must_get(&c1, "/", &[("x-user", u)]).await;
        owner.insert(u.clone(), r.backend().unwrap().to_owned());
    }
    let per_backend = owner.values().fold(BTreeMap::new(), |mut m, b| {
        *m.entry(b.clone()).or_insert(0) += 1;
        m
    });
    eprintln!("FIGURE consistent hash: 30 users over backends {per_backend:?}");
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    for _ in 0..3 {
        for u in &users {
            let r = must_get(&c1, "/", &[("x-user", u)]).await;
            assert_eq!(r.backend(), Some(owner[u].as_str()), "{u}");
        }
    }
    drop(c1);
    let c2 = sp.client().await;
    for u in &users {
        let r = must_get(&c2, "/", &[("x-user", u)]).await;
        assert_eq!(
            r.backend(),
            Some(owner[u].as_str()),
            "{u} after reconnecting"
        );
    }

    // h2 dies: its users move, nobody else does.
    let mark = log_len(&sp.proc.out);
    procs.get_mut("h2").unwrap().kill();
    let mut moved = BTreeMap::new();
    for u in &users {
        let r = must_get(&c2, "/", &[("x-user", u)]).await;
        assert_eq!(r.status, 200, "{u}: {}", r.text());
        let b = r.backend().unwrap().to_owned();
        if owner[u] == "h2" {
            assert_ne!(b, "h2");
            moved.insert(u.clone(), b);
        } else {
            assert_eq!(b, owner[u], "{u} moved although its backend lives");
        }
    }
    // Once h2 is known to be down (no more retries), the moved users
    // stay on their new backend.
    wait_log(
        &sp.proc.out,
        mark,
        &["backend UNHEALTHY", "hash/h2"],
        Duration::from_secs(10),
    )
    .await
    .expect("h2 marked unhealthy");
    for _ in 0..2 {
        for u in &users {
            let r = must_get(&c2, "/", &[("x-user", u)]).await;
            let expect = moved.get(u).unwrap_or(&owner[u]);
            assert_eq!(r.backend(), Some(expect.as_str()), "{u}");
        }
    }
}

/// The circuit breaker opens after `failure_threshold` consecutive
/// failures (5xx count), answers fast 503s while open, lets one trial
/// through after `open_ms` (re-opening when it fails, closing when it
/// succeeds, and rejecting a second concurrent trial), and
/// `max_concurrent_requests` answers a quick 503 instead of queueing.
#[tokio::test]
async fn circuit_breaker_opens_half_opens_and_limits_concurrency() {
    const OPEN_MS: u64 = 800;
    let certs = certs();
    let (_b, a) = backend("cb", &certs, &[]);
    // The admin listener's metrics show when requests are in flight.
    let admin_port = free_tcp_port();
    let sp = start(
        &Config::new()
            .admin(admin_port)
            .upstream(
                Upstream::h3("flaky", &certs, &[("cb", a)])
                    .field(
                        "circuit_breaker",
                        format!(
                            "{{ failure_threshold: 3, open_ms: {OPEN_MS}, half_open_max_requests: 1 }}"
                        ),
                    )
                    .field("retries", "{ attempts: 0 }"),
            )
            .upstream(
                Upstream::h3("limited", &certs, &[("cb", a)])
                    .field("circuit_breaker", "{ max_concurrent_requests: 2 }")
                    .field("retries", "{ attempts: 0 }"),
            )
            .route_with("limited", &[("match", "{ headers: { x-up: limited } }")])
            .route("flaky"),
    );
    let c = Arc::new(sp.client().await);

    // Three 5xx answers from the backend open the circuit.
    for i in 0..3 {
        let r = must_get(&c, "/status/500", &[]).await;
        assert_eq!(r.status, 500, "try {i}");
        assert_eq!(r.backend(), Some("cb"), "try {i} must reach the backend");
    }
    let opened = Instant::now();
    let t = Instant::now();
    let r = must_get(&c, "/", &[]).await;
    let reject_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.backend(),
        None,
        "an open circuit must not reach the backend"
    );
    assert!(r.text().contains("circuit open"), "{}", r.text());
    let retry_after: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!(
        (1..=1 + OPEN_MS / 1000).contains(&retry_after),
        "{retry_after}"
    );
    // Still open a little later.
    tokio::time::sleep(Duration::from_millis(OPEN_MS / 4)).await;
    assert_eq!(must_get(&c, "/", &[]).await.status, 503);

    // After open_ms a trial reaches the backend; it fails: open again.
    let until_trial = wait_until_reaches(&c, "/status/500", Duration::from_secs(5)).await;
    let half_open_ms = ms(opened.elapsed());
    assert_eq!(until_trial.status, 500);
    let reopened = Instant::now();
    let r = must_get(&c, "/", &[]).await;
    assert_eq!(r.status, 503, "a failed trial re-opens: {}", r.text());

    // Next round: one trial at a time; it succeeds and closes the circuit.
    tokio::time::sleep(Duration::from_millis(OPEN_MS + 50)).await;
    let c2 = c.clone();
    let trial = tokio::spawn(async move { must_get(&c2, "/delay/400", &[]).await });
    wait_until_async("the trial at the backend", Duration::from_secs(5), || {
        metric_holds(
            admin_port,
            None,
            "spooky_backend_in_flight{backend=\"cb\",upstream=\"flaky\"}",
            |v| v >= 1.0,
        )
    })
    .await;
    let second = must_get(&c, "/", &[]).await;
    assert_eq!(second.status, 503, "{}", second.text());
    assert!(
        second.text().contains("trial"),
        "second concurrent trial: {}",
        second.text()
    );
    let trial = trial.await.unwrap();
    assert_eq!(trial.status, 200);
    assert_eq!(trial.backend(), Some("cb"));
    let closed_ms = ms(reopened.elapsed());
    for _ in 0..5 {
        let r = must_get(&c, "/", &[]).await;
        assert_eq!((r.status, r.backend()), (200, Some("cb")));
    }
    eprintln!(
        "FIGURE breaker: open-circuit 503 in {reject_ms:.1} ms; first trial reached the backend {half_open_ms} ms after opening (open_ms {OPEN_MS}); closed {closed_ms} ms after re-opening"
    );
    let log = sp.proc.out.lines().join("\n");
    assert!(log.contains("circuit breaker opened"), "{log}");
    assert!(
        log.contains("flaky/cb"),
        "breaker transitions name the backend:\n{log}"
    );

    // Concurrency limit: two slow requests in flight, the third is
    // refused at once.
    let lim = [("x-up", "limited")];
    let mut slow = Vec::new();
    for _ in 0..2 {
        let c = c.clone();
        slow.push(tokio::spawn(async move {
            must_get(&c, "/delay/1000", &[("x-up", "limited")]).await
        }));
    }
    wait_until_async(
        "two slow requests at the backend",
        Duration::from_secs(5),
        || {
            metric_holds(
                admin_port,
                None,
                "spooky_backend_in_flight{backend=\"cb\",upstream=\"limited\"}",
                |v| v >= 2.0,
            )
        },
    )
    .await;
    let t = Instant::now();
    let r = must_get(&c, "/", &lim).await;
    let limit_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("too many concurrent"), "{}", r.text());
    assert!(
        limit_ms < 300.0,
        "the limit must answer at once, took {limit_ms} ms"
    );
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
    assert_eq!(must_get(&c, "/", &lim).await.status, 200);
    eprintln!("FIGURE breaker: max_concurrent_requests 503 in {limit_ms:.1} ms");

    // A request holds its slot until its response body ends, not just
    // until the headers: two unread 32 MiB downloads fill the limit.
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let req = Request::get("/bytes/33554432")
            .header("x-up", "limited")
            .body(body::empty())
            .unwrap();
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    let r = must_get(&c, "/", &lim).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("too many concurrent"), "{}", r.text());
    drop(bodies);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = must_get(&c, "/", &lim).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots not released: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GETs `path` until a response comes from a backend (not spooky's 503).
async fn wait_until_reaches(c: &H3Client, path: &str, timeout: Duration) -> Reply {
    let deadline = Instant::now() + timeout;
    loop {
        let r = must_get(c, path, &[]).await;
        if r.backend().is_some() {
            return r;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "never half-opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When a retry of a retryable response (here a 503) fails outright, the
/// client gets the backend's response, not spooky's own error for the
/// retry.
#[tokio::test]
async fn a_failed_retry_returns_the_earlier_backend_response() {
    let certs = certs();
    let (_a, aa) = backend("alive", &certs, &[]);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let up = Upstream::h3("demo", &certs, &[("alive", aa), ("dead", dead)])
        .field("balancing", "{ type: round_robin }")
        .field(
            "retries",
            "{ attempts: 1, retry_on: [503, connect_failure] }",
        )
        .field("timeouts", "{ connect_ms: 200 }");
    let sp = start(&Config::new().workers(1).upstream(up));
    let c = sp.client().await;
    // Round robin alternates the first try between both backends: either
    // 503 from `alive` then a failed connect to `dead`, or the reverse.
    for i in 0..4 {
        let r = must_get(&c, "/status/503", &[]).await;
        assert_eq!(r.status, 503, "request {i}: {}", r.text());
        assert_eq!(r.backend(), Some("alive"), "request {i}: {}", r.text());
        assert!(
            r.text().starts_with("status 503 from alive"),
            "{}",
            r.text()
        );
    }
}

/// Panic mode and the all-down answer. With the default threshold (50 %),
/// a pool with one healthy backend of three balances across all three; a
/// pool with two of three stays on the healthy two; with panic mode off
/// (threshold 0) a pool with nothing healthy answers 503 + `retry-after`.
#[tokio::test]
async fn panic_mode_and_all_down() {
    let certs = certs();
    let (_p1, a1) = backend("p1", &certs, &[]);
    let (_p2, a2) = backend("p2", &certs, &[]);
    let (_p3, a3) = backend("p3", &certs, &[]);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let ok = "health_check: { path: /health, interval_ms: 100, timeout_ms: 80 }";
    let bad = "health_check: { path: /status/503, interval_ms: 100, timeout_ms: 80 }";
    let sp = start(
        &Config::new()
            .upstream(
                Upstream::new("panicky")
                    .tls_ca(&certs)
                    .backend_with("p1", a1, ok)
                    .backend_with("p2", a2, bad)
                    .backend_with("p3", a3, bad),
            )
            .upstream(
                Upstream::new("normal")
                    .tls_ca(&certs)
                    .backend_with("p1", a1, ok)
                    .backend_with("p2", a2, ok)
                    .backend_with("p3", a3, bad),
            )
            .upstream(
                Upstream::new("down")
                    .tls_ca(&certs)
                    .backend_with("p1", a1, bad)
                    .backend_with("gone", dead, ok)
                    .field(
                        "panic",
                        "{ threshold_percent: 0, all_down: { retry_after_s: 7 } }",
                    )
                    .field("timeouts", "{ connect_ms: 80 }"),
            )
            .route_with("normal", &[("match", "{ headers: { x-up: normal } }")])
            .route_with("down", &[("match", "{ headers: { x-up: down } }")])
            .route("panicky"),
    );
    // Every failing probe is the first of its backend: Unhealthy at once.
    for b in [
        "panicky/p2",
        "panicky/p3",
        "normal/p3",
        "down/p1",
        "down/gone",
    ] {
        wait_log(
            &sp.proc.out,
            0,
            &["backend UNHEALTHY", b],
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|| panic!("{b} not unhealthy:\n{}", sp.proc.out.lines().join("\n")));
    }
    let c = sp.client().await;
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let r = must_get(&c, "/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *seen.entry(r.backend().unwrap().to_owned()).or_insert(0) += 1;
    }
    eprintln!("FIGURE panic (1 of 3 healthy, threshold 50 %): {seen:?}");
    assert_eq!(seen.len(), 3, "panic mode balances across all: {seen:?}");
    assert!(sp.proc.out.contains("panic mode"));

    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let r = must_get(&c, "/", &[("x-up", "normal")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *seen.entry(r.backend().unwrap().to_owned()).or_insert(0) += 1;
    }
    eprintln!("FIGURE no panic (2 of 3 healthy): {seen:?}");
    assert!(!seen.contains_key("p3"), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");

    let t = Instant::now();
    let r = must_get(&c, "/", &[("x-up", "down")]).await;
    let all_down_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.backend(), None);
    assert!(r.text().contains("no healthy backend"), "{}", r.text());
    eprintln!("FIGURE all down: 503 with retry-after 7 in {all_down_ms:.1} ms");
}
