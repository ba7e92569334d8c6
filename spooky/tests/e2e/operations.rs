//! Operations end to end, through real processes and sockets: hot reload
//! under HTTP/3 load (SIGHUP, `POST /reload`, `spooky reload`), invalid
//! reloads, the admin API (backend drain / enable / weight, bearer token),
//! `/metrics` against the requests sent, rate limits, per-client
//! connection limits, QUIC Retry, and SIGTERM during long downloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use spooky::client::H3Client;

const TOKEN: &str = "test-token-0123456789abcdef";

/// A config with an admin listener (token-protected) on `admin`.
fn config(upstream: Upstream, admin: u16) -> Config {
    Config::new()
        .drain_timeout_ms(20000)
        .admin_with_token(admin, TOKEN)
        .access_log(false)
        .upstream(upstream)
}

fn scrape(port: u16) -> HashMap<String, f64> {
    scrape_with(port, Some(TOKEN))
}

fn who(resp: &http::Response<()>) -> String {
    resp.headers()["x-backend-id"].to_str().unwrap().to_owned()
}

/// Blocks (the runtime too, as a pause in the load) until `needle` is in
/// `n` lines of spooky's log.
fn wait_for_lines(sp: &Spooky, needle: &str, n: usize) {
    wait_until(
        &format!("{n}× `{needle}` in the log"),
        Duration::from_secs(10),
        || lines_with(&sp.proc.out, &[needle], n),
    );
}

#[tokio::test]
async fn reload_under_load_moves_traffic_without_failures() {
    let certs = certs();
    let (_o1, o1) = backend("old-1", &certs, &[]);
    let (_o2, o2) = backend("old-2", &certs, &[]);
    let (_n1, n1) = backend("new-1", &certs, &[]);
    let admin_port = free_tcp_port();
    let before = config(
        Upstream::h3("app", &certs, &[("old-1", o1), ("old-2", o2)]),
        admin_port,
    );
    let sp = spooky(&before);

    // Load: 4 connections, 4 streams each, for the whole test; a 32 MiB
    // download is in flight across the reload.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, u16, String)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = Arc::new(sp.client().await);
        for _ in 0..4 {
            let (client, stop, log, failures) =
                (client.clone(), stop.clone(), log.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    match client.get("/").await {
                        Ok((resp, _)) => {
                            log.lock()
                                .unwrap()
                                .push((started, resp.status().as_u16(), who(&resp)))
                        }
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            }));
        }
    }
    let big = sp.client().await;
    let download = tokio::spawn(async move { download_checked(&big, 32 << 20).await });
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Same upstream, one new backend instead of the two old ones.
    sp.rewrite_config(&config(
        Upstream::h3("app", &certs, &[("new-1", n1)]),
        admin_port,
    ));
    let sent = Instant::now();
    std::process::Command::new("kill")
        .args(["-HUP", &sp.proc.pid().to_string()])
        .status()
        .unwrap();
    wait_for_lines(&sp, "config reloaded", 1);
    let reloaded = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    download.await.unwrap();

    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let log = log.lock().unwrap();
    let bad: Vec<_> = log.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(bad.is_empty(), "non-200 responses: {bad:?}");
    let before_reload = log.iter().filter(|(t, _, _)| *t < sent).count();
    // Requests that started after the workers picked the generation up
    // (the log line plus a margin for the workers' wake-up) go to the new
    // backend only.
    let settled = reloaded + Duration::from_millis(100);
    let after: Vec<_> = log.iter().filter(|(t, _, _)| *t > settled).collect();
    let on_old = after.iter().filter(|(_, _, w)| w != "new-1").count();
    eprintln!(
        "reload under load: {} requests, {before_reload} before the reload, {} after it settled, {on_old} of those on old backends",
        log.len(),
        after.len()
    );
    assert!(before_reload > 50 && after.len() > 50, "too little load");
    assert_eq!(on_old, 0, "traffic still reached removed backends");
    assert!(log.iter().any(|(_, _, w)| w.starts_with("old")));
    let m = scrape(admin_port);
    assert_eq!(metric(&m, "spooky_config_generation"), 2.0);
    assert_eq!(
        metric(&m, "spooky_config_reloads_total{result=\"ok\"}"),
        1.0
    );
}

#[tokio::test]
async fn invalid_reload_keeps_serving_the_old_config() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let (_b, b) = backend("b", &certs, &[]);
    let admin_port = free_tcp_port();
    let good = config(Upstream::h3("app", &certs, &[("a", a)]), admin_port);
    let sp = spooky(&good);
    let client = sp.client().await;
    assert_eq!(who(&client.get("/").await.unwrap().0), "a");

    // A bad address and a route to a missing upstream: both reported,
    // nothing changes.
    let bad = config(
        Upstream::new("app")
            .tls_ca(&certs)
            .backend("b", "not-an-address"),
        admin_port,
    )
    .route("nope");
    sp.rewrite_config(&bad);
    let (status, body) = admin(admin_port, "POST", "/reload", "", Some(TOKEN));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("upstreams.app.backends[0].address"),
        "the error names the field: {body}"
    );
    assert!(body.contains("routes[0].upstream"), "{body}");
    // `spooky reload` refuses the invalid file before sending anything.
    let out = std::process::Command::new(spooky_bin())
        .args(["reload", "-c"])
        .arg(sp.dir.path().join("spooky.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backends[0].address"));
    // SIGHUP with the same file: logged, still serving.
    std::process::Command::new("kill")
        .args(["-HUP", &sp.proc.pid().to_string()])
        .status()
        .unwrap();
    wait_for_lines(&sp, "reload rejected; still serving", 2);
    for _ in 0..10 {
        let (resp, _) = client.get("/").await.unwrap();
        assert_eq!((resp.status().as_u16(), who(&resp)), (200, "a".into()));
    }
    let m = scrape(admin_port);
    assert_eq!(
        metric(&m, "spooky_config_reloads_total{result=\"error\"}"),
        2.0
    );
    assert_eq!(metric(&m, "spooky_config_generation"), 1.0);

    // Fixed: `spooky reload` applies it.
    sp.rewrite_config(&config(
        Upstream::h3("app", &certs, &[("b", b)]),
        admin_port,
    ));
    let out = std::process::Command::new(spooky_bin())
        .args(["reload", "-c"])
        .arg(sp.dir.path().join("spooky.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"generation\": 2"));
    // The open connection now reaches the new backend.
    assert_eq!(who(&client.get("/").await.unwrap().0), "b");
}

#[tokio::test]
async fn admin_api_drains_enables_and_reweights_backends() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let (_b, b) = backend("b", &certs, &[]);
    let admin_port = free_tcp_port();
    let sp = spooky(&config(
        Upstream::h3("app", &certs, &[("a", a), ("b", b)])
            .field("balancing", "{ type: weighted_round_robin }"),
        admin_port,
    ));
    // The token is required (health endpoints excepted).
    assert_eq!(admin(admin_port, "GET", "/backends", "", None).0, 401);
    assert_eq!(
        admin(
            admin_port,
            "GET",
            "/backends",
            "",
            Some("wrong-token-0123456789")
        )
        .0,
        401
    );
    assert_eq!(admin(admin_port, "GET", "/healthz", "", None).0, 200);
    assert_eq!(admin(admin_port, "GET", "/readyz", "", None).0, 200);

    let client = sp.client().await;
    let tally = |n: usize| {
        let client = &client;
        async move {
            let mut t: HashMap<String, usize> = HashMap::new();
            for _ in 0..n {
                *t.entry(who(&client.get("/").await.unwrap().0)).or_default() += 1;
            }
            t
        }
    };
    let even = tally(20).await;
    assert_eq!((even["a"], even["b"]), (10, 10));

    let (st, body) = admin(admin_port, "POST", "/backends/app/b/drain", "", Some(TOKEN));
    assert_eq!(st, 200, "{body}");
    let (_, list) = admin(admin_port, "GET", "/backends", "", Some(TOKEN));
    assert!(list.contains("\"state\": \"draining\""), "{list}");
    let drained = tally(10).await;
    assert_eq!(drained.get("b"), None, "{drained:?}");
    assert!(
        sp.proc
            .out
            .contains("backend state changed through the admin API")
    );

    assert_eq!(
        admin(
            admin_port,
            "POST",
            "/backends/app/b/enable",
            "",
            Some(TOKEN)
        )
        .0,
        200
    );
    let (st, body) = admin(
        admin_port,
        "POST",
        "/backends/app/a/weight",
        "3",
        Some(TOKEN),
    );
    assert_eq!(st, 200, "{body}");
    // One connection is served by one worker, whose smooth WRR gives
    // exactly 3:1.
    let weighted = tally(40).await;
    assert_eq!((weighted["a"], weighted["b"]), (30, 10), "{weighted:?}");
    let m = scrape(admin_port);
    assert_eq!(
        metric(&m, "spooky_backend_weight{backend=\"a\",upstream=\"app\"}"),
        3.0
    );

    // Bad input: clear errors, nothing changes.
    assert_eq!(
        admin(
            admin_port,
            "POST",
            "/backends/app/a/weight",
            "0",
            Some(TOKEN)
        )
        .0,
        400
    );
    assert_eq!(
        admin(
            admin_port,
            "POST",
            "/backends/app/zz/drain",
            "",
            Some(TOKEN)
        )
        .0,
        404
    );
    assert_eq!(
        admin(
            admin_port,
            "POST",
            "/backends/app/a/explode",
            "",
            Some(TOKEN)
        )
        .0,
        404
    );
    // Disabling both: a clean 503, not a hang.
    for id in ["a", "b"] {
        admin(
            admin_port,
            "POST",
            &format!("/backends/app/{id}/disable"),
            "",
            Some(TOKEN),
        );
    }
    let (resp, _) = client.get("/").await.unwrap();
    assert_eq!(resp.status(), 503);
}

#[tokio::test]
async fn metrics_count_the_requests_sent() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let (_b, b) = backend("b", &certs, &[]);
    let admin_port = free_tcp_port();
    let sp = spooky(
        &config(
            Upstream::h3("app", &certs, &[("a", a), ("b", b)]),
            admin_port,
        )
        .route_with(
            "app",
            &[("name", "api"), ("match", "{ path_prefix: /api/ }")],
        ),
    );
    let client = sp.client().await;
    for i in 0..20 {
        assert_eq!(
            client.get(&format!("/api/{i}")).await.unwrap().0.status(),
            200
        );
    }
    for _ in 0..5 {
        assert_eq!(client.get("/elsewhere").await.unwrap().0.status(), 404);
    }
    // The duration histogram is recorded when a body ends, just after the
    // client has read it: poll briefly.
    let m = wait_until_async("20 durations recorded", Duration::from_secs(5), || {
        metric_holds(
            admin_port,
            Some(TOKEN),
            "spooky_request_duration_seconds_count{route=\"api\"}",
            |v| v >= 20.0,
        )
    })
    .await;
    assert_eq!(metric(&m, "spooky_requests_total{protocol=\"h3\"}"), 25.0);
    assert_eq!(
        metric(
            &m,
            "spooky_route_requests_total{class=\"2xx\",route=\"api\",upstream=\"app\"}"
        ),
        20.0
    );
    assert_eq!(
        metric(
            &m,
            "spooky_route_requests_total{class=\"4xx\",route=\"none\",upstream=\"none\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(&m, "spooky_local_responses_total{status=\"404\"}"),
        5.0
    );
    let per_backend: f64 = ["a", "b"]
        .iter()
        .map(|b| {
            metric(
                &m,
                &format!("spooky_backend_requests_total{{backend=\"{b}\",upstream=\"app\"}}"),
            )
        })
        .sum();
    assert_eq!(per_backend, 20.0);
    assert_eq!(
        metric(&m, "spooky_request_duration_seconds_count{route=\"api\"}"),
        20.0
    );
    let upstream_count: f64 = ["a", "b"]
        .iter()
        .map(|b| {
            metric(
                &m,
                &format!(
                    "spooky_upstream_response_seconds_count{{backend=\"{b}\",upstream=\"app\"}}"
                ),
            )
        })
        .sum();
    assert_eq!(upstream_count, 20.0);
    assert_eq!(metric(&m, "spooky_quic_connections"), 1.0);
    // One client connection is served by one worker, which opened one
    // connection to each backend.
    for b in ["a", "b"] {
        assert_eq!(
            metric(
                &m,
                &format!("spooky_backend_pool_connections{{backend=\"{b}\",upstream=\"app\"}}")
            ),
            1.0
        );
    }
    assert!(metric(&m, "spooky_quic_handshakes_total{outcome=\"accepted\"}") >= 1.0);
    assert_eq!(
        metric(&m, "spooky_quic_handshake_duration_seconds_count"),
        metric(&m, "spooky_quic_handshakes_total{outcome=\"accepted\"}")
    );
    assert_eq!(
        metric(
            &m,
            "spooky_backend_health_state{backend=\"a\",state=\"healthy\",upstream=\"app\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn rate_limits_answer_429_at_the_configured_rate() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let sp = spooky(
        &config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
            .route_with(
                "app",
                &[
                    ("name", "limited"),
                    ("match", "{ path_prefix: /limited/ }"),
                    ("rate_limit", "{ per_second: 10, burst: 5 }"),
                ],
            )
            .route("app"),
    );
    let client = sp.client().await;
    // Offer far more than 10/s for 2 s on the limited route.
    let started = Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    while started.elapsed() < Duration::from_secs(2) {
        let (resp, _) = client.get("/limited/x").await.unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                let after: u64 = resp.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(after, 1);
            }
            s => panic!("unexpected status {s}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let expected = 5.0 + 10.0 * secs;
    eprintln!(
        "route limit 10/s burst 5: {ok} passed, {limited} got 429 in {secs:.2} s (expected ≈ {expected:.0})"
    );
    assert!(
        (f64::from(ok) - expected).abs() <= 3.0,
        "{ok} passed, expected ≈ {expected:.1}"
    );
    assert!(limited > ok, "the offered load must exceed the limit");
    // Other routes are not limited.
    for _ in 0..20 {
        assert_eq!(client.get("/free").await.unwrap().0.status(), 200);
    }
    let m = scrape(admin_port);
    assert_eq!(
        metric(&m, "spooky_rate_limited_total{scope=\"route\"}"),
        f64::from(limited)
    );
}

#[tokio::test]
async fn per_client_limits_and_retry() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    // Every handshake gets a Retry first; at most 2 connections and
    // 20 requests/s (burst 20) per client.
    let sp = spooky(
        &config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
            .limit("retry_threshold", 0)
            .limit("max_connections_per_ip", 2)
            .limit("requests_per_ip", "{ per_second: 20, burst: 20 }"),
    );
    let c1 = sp.client().await;
    let c2 = sp.client().await;
    assert_eq!(c1.get("/").await.unwrap().0.status(), 200);
    assert_eq!(c2.get("/").await.unwrap().0.status(), 200);
    let third = H3Client::connect(&sp.url("/"), &sp.client_options()).await;
    let refused = match third {
        Err(_) => true,
        Ok(c) => c.get("/").await.is_err(),
    };
    assert!(
        refused,
        "a third connection from the same client must be refused"
    );
    drop(c2);
    // The slot frees when the connection closes.
    let mut c3 = None;
    for _ in 0..50 {
        if let Ok(c) = H3Client::connect(&sp.url("/"), &sp.client_options()).await
            && c.get("/").await.is_ok()
        {
            c3 = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c3.is_some(),
        "the closed connection's slot was not released"
    );

    // Per-client request rate: a burst of 40 gets about 20 through.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut statuses = HashMap::new();
    let futs: Vec<_> = (0..40).map(|_| c1.get("/")).collect();
    for r in futures_util::future::join_all(futs).await {
        *statuses.entry(r.unwrap().0.status().as_u16()).or_insert(0) += 1;
    }
    let ok = statuses.get(&200).copied().unwrap_or(0);
    assert!((20..=22).contains(&ok), "{statuses:?}");
    assert_eq!(ok + statuses.get(&429).copied().unwrap_or(0), 40);

    let m = scrape(admin_port);
    assert!(metric(&m, "spooky_quic_handshakes_total{outcome=\"retry\"}") >= 3.0);
    assert!(
        metric(
            &m,
            "spooky_quic_handshakes_total{outcome=\"refused_per_client\"}"
        ) >= 1.0
    );

    // An independent client (aioquic) completes the Retry exchange too
    // (one of the two connection slots is freed for it).
    let Some(py) = python() else { return };
    drop(c3);
    wait_until_async(
        "c3's connection closed (c1's left)",
        Duration::from_secs(10),
        || {
            metric_holds(admin_port, Some(TOKEN), "spooky_quic_connections", |v| {
                v <= 1.0
            })
        },
    )
    .await;
    let out = std::process::Command::new(py)
        .arg(script("h3_get.py"))
        .args(["--ca", &sp.cert().display().to_string()])
        .args(["--host", "127.0.0.1", "--port", &sp.port.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello from a"),
        "aioquic through Retry: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sigterm_lets_long_downloads_finish_and_refuses_new_connections() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let mut sp = spooky(&config(
        Upstream::h3("app", &certs, &[("a", a)]),
        admin_port,
    ));
    let size: u64 = 48 << 20;
    let mut downloads = Vec::new();
    for _ in 0..3 {
        let client = sp.client().await;
        downloads.push(tokio::spawn(async move {
            download_checked(&client, size).await;
            (size, Instant::now())
        }));
    }
    wait_until_async(
        "the three downloads in progress",
        Duration::from_secs(10),
        || metric_holds(admin_port, Some(TOKEN), "spooky_quic_streams", |v| v >= 3.0),
    )
    .await;
    let pid = sp.proc.pid();
    let sent = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_for_lines(&sp, "draining", 1);
    assert_eq!(admin(admin_port, "GET", "/readyz", "", None).0, 503);
    // New connections are refused while the old ones drain.
    let fresh = tokio::time::timeout(
        Duration::from_secs(5),
        H3Client::connect(&sp.url("/"), &sp.client_options()),
    )
    .await;
    let refused = match fresh {
        Err(_) | Ok(Err(_)) => true,
        Ok(Ok(c)) => c.get("/").await.is_err(),
    };
    assert!(refused, "a new connection was accepted while draining");
    let mut last = sent;
    for d in downloads {
        let (got, done) = d.await.unwrap();
        assert_eq!(got, size, "a download was cut short by the drain");
        last = last.max(done);
    }
    eprintln!(
        "drain: downloads finished {:.2} s after SIGTERM",
        (last - sent).as_secs_f64()
    );
    assert!(
        last > sent + Duration::from_millis(100),
        "downloads were not in flight"
    );
    assert!(
        sp.proc.terminate(Duration::from_secs(25)),
        "spooky did not exit after the drain"
    );
    assert!(sp.proc.out.contains("stopped"));
}

#[tokio::test]
async fn certificates_rotate_on_reload_and_logs_can_be_json() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let (old, new) = (crate::support::certs(), crate::support::certs());
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let cfg = config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
        .listen_unset("drain_timeout_ms")
        .listen_tls(&cert, &key)
        .log("format", "json")
        .access_log(true);
    let sp = spooky(&cfg);
    let trusting = |c: &Certs| spooky::client::ClientOptions {
        ca: Some(c.cert.clone()),
        connect_to: Some(sp.addr()),
        ..Default::default()
    };
    let before = H3Client::connect(&sp.url("/"), &trusting(&old))
        .await
        .unwrap();
    assert_eq!(before.get("/").await.unwrap().0.status(), 200);
    assert!(
        H3Client::connect(&sp.url("/"), &trusting(&new))
            .await
            .is_err()
    );

    // Rotate the files in place, reload: new connections get the new
    // certificate; the open one keeps working.
    std::fs::copy(&new.cert, &cert).unwrap();
    std::fs::copy(&new.key, &key).unwrap();
    let (st, body) = admin(admin_port, "POST", "/reload", "", Some(TOKEN));
    assert_eq!(st, 200, "{body}");
    let after = H3Client::connect(&sp.url("/"), &trusting(&new))
        .await
        .unwrap();
    assert_eq!(after.get("/").await.unwrap().0.status(), 200);
    assert!(
        H3Client::connect(&sp.url("/"), &trusting(&old))
            .await
            .is_err()
    );
    assert_eq!(before.get("/").await.unwrap().0.status(), 200);

    // Every log line is a JSON object; access lines carry the fields.
    wait_for_lines(&sp, "\"request_id\"", 3);
    let lines = sp.proc.out.lines();
    let mut access = 0;
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        if v["target"] == "spooky::access" {
            access += 1;
            assert_eq!(v["status"], 200, "{l}");
            assert_eq!(v["backend"], "a", "{l}");
            assert_eq!(v["route"], "default", "{l}");
            assert!(v["bytes"].as_u64().is_some_and(|b| b > 0), "{l}");
        }
    }
    assert_eq!(access, 3, "{lines:?}");
}

#[tokio::test]
async fn header_limits_answer_431_and_slow_headers_are_cut_off() {
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let sp = spooky(
        &config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
            .limit("max_request_headers", 20)
            .limit("request_header_timeout_ms", 500),
    );
    let client = sp.client().await;
    let mut req = http::Request::get("/");
    for i in 0..30 {
        req = req.header(format!("x-h-{i}"), "1");
    }
    let resp = client
        .send(req.body(spooky::body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(client.get("/").await.unwrap().0.status(), 200);

    // A stream that starts a HEADERS frame (type 0x01, length 100) and
    // never finishes it is closed without a response after the header
    // timeout (h3 holds the stream until the headers are in, so dropping
    // it ends it with FIN rather than a reset); the connection and its
    // other requests carry on.
    let quic = client.connection().clone();
    let (mut send, mut recv) = quic.open_bi().await.unwrap();
    send.write_all(&[0x01, 0x40, 0x64, 0, 0, 0]).await.unwrap();
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024)).await;
    let took = started.elapsed();
    match read {
        Ok(Err(_)) => {}
        Ok(Ok(bytes)) => assert!(bytes.is_empty(), "a response came back: {bytes:?}"),
        Err(_) => panic!("the stream was not closed within 5 s"),
    }
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(client.get("/").await.unwrap().0.status(), 200);
    let m = scrape(admin_port);
    assert_eq!(
        metric(&m, "spooky_local_responses_total{status=\"431\"}"),
        1.0
    );
}

/// RFC 9110 §11.1: the authentication scheme is case-insensitive, so
/// `bearer` and `BEARER` carry the token as well as `Bearer` does; a wrong
/// token stays refused whatever the scheme's case.
#[tokio::test]
async fn admin_accepts_the_bearer_scheme_in_any_case() {
    use std::io::{Read, Write};
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let _sp = spooky(&config(
        Upstream::h3("app", &certs, &[("a", a)]),
        admin_port,
    ));
    let status_with = |authorization: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", admin_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /backends HTTP/1.1\r\nhost: admin\r\nconnection: close\r\nauthorization: {authorization}\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split(' ').nth(1).unwrap_or_default().to_owned()
    };
    for scheme in ["Bearer", "bearer", "BEARER"] {
        assert_eq!(status_with(&format!("{scheme} {TOKEN}")), "200", "{scheme}");
        assert_eq!(status_with(&format!("{scheme} wrong")), "401", "{scheme}");
    }
}

/// Reads one HTTP/1.1 response (content-length or chunked) from `s`;
/// bounded by 10 s and 1 MiB.
async fn read_h1_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let done = |out: &[u8]| {
        let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
        let body = &out[end + 4..];
        if let Some(n) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            return body.len() >= n;
        }
        body.ends_with(b"0\r\n\r\n")
    };
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !done(&out) && out.len() < 1 << 20 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no complete response within 10 s: {out:?}");
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits (at most `limit`) for the peer to close `s`; how long it took, or
/// `None` when it stayed open.
async fn time_to_close<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

/// One HTTP/2 frame: (type, flags, stream, payload).
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_GOAWAY: u8 = 0x7;

/// An HTTP/2 connection that opens no stream but answers every PING (and
/// sends its own) gets GOAWAY after `limits.connection_idle_timeout_ms`
/// and is closed; meanwhile a connection whose one request takes longer
/// than the idle timeout is left alone and its request completes. Before,
/// hyper's PING keep-alive kept idle connections open indefinitely.
#[tokio::test]
async fn idle_http2_connections_get_goaway_but_busy_ones_stay() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let sp = spooky(
        &config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
            .limit("connection_idle_timeout_ms", 800),
    );

    // The busy connection: one request of 2.5 s, more than 3× the idle
    // timeout.
    let busy = {
        let stream = tcp_tls(&sp, &[b"h2"]).await;
        let url = sp.url("/delay/2500");
        tokio::spawn(async move {
            let (client, conn) = h2::client::handshake(stream).await.unwrap();
            tokio::spawn(conn);
            let mut client = client.ready().await.unwrap();
            let req = http::Request::get(url).body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            let resp = resp.await.unwrap();
            let status = resp.status();
            let mut body = resp.into_body();
            let mut n = 0;
            while let Some(chunk) = body.data().await {
                n += chunk.unwrap().len();
            }
            (status, n)
        })
    };

    // The idle one, frame by frame.
    let mut s = tcp_tls(&sp, &[b"h2"]).await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&h2_frame(H2_SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    let started = Instant::now();
    let mut goaway_after = None;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut next_ping = Instant::now();
    let deadline = started + Duration::from_secs(10);
    'read: loop {
        assert!(Instant::now() < deadline, "not closed within 10 s");
        if Instant::now() >= next_ping && goaway_after.is_none() {
            s.write_all(&h2_frame(H2_PING, 0, 0, &[7; 8]))
                .await
                .unwrap();
            next_ping += Duration::from_millis(200);
        }
        let n = match tokio::time::timeout(Duration::from_millis(100), s.read(&mut chunk)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break 'read,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                H2_SETTINGS if flags & 1 == 0 => s
                    .write_all(&h2_frame(H2_SETTINGS, 1, 0, &[]))
                    .await
                    .unwrap(),
                H2_PING if flags & 1 == 0 => s
                    .write_all(&h2_frame(H2_PING, 1, 0, &payload))
                    .await
                    .unwrap(),
                H2_GOAWAY if goaway_after.is_none() => goaway_after = Some(started.elapsed()),
                _ => {}
            }
        }
    }
    let closed_after = started.elapsed();
    let goaway_after = goaway_after.expect("closed without GOAWAY");
    assert!(
        goaway_after >= Duration::from_millis(700) && goaway_after < Duration::from_secs(4),
        "GOAWAY after {goaway_after:?}"
    );
    assert!(closed_after < Duration::from_secs(8), "{closed_after:?}");

    let (status, n) = busy.await.unwrap();
    assert_eq!(status, 200);
    assert!(n > 0);
}

/// HTTP/1.1: a keep-alive connection idle after its response closes after
/// `limits.connection_idle_timeout_ms` (hyper's only timer was its 30 s
/// header timeout); the header timeout (`limits.request_header_timeout_ms`)
/// cuts off a request head that stalls, on a fresh connection and on a
/// kept-alive one, without applying to the wait between requests.
#[tokio::test]
async fn http1_idle_and_header_read_timeouts() {
    use tokio::io::AsyncWriteExt;
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let get = b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n";

    // Idle timeout 800 ms, header timeout the default 10 s.
    let sp = spooky(
        &config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
            .limit("connection_idle_timeout_ms", 800),
    );
    let mut s = tcp_tls(&sp, &[b"http/1.1"]).await;
    s.write_all(get).await.unwrap();
    let resp = read_h1_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let took = time_to_close(&mut s, Duration::from_secs(5)).await;
    let took = took.expect("idle keep-alive connection still open after 5 s");
    assert!(took >= Duration::from_millis(600), "{took:?}");
    drop(sp);

    // Header timeout 700 ms, idle timeout 60 s.
    let admin_port = free_tcp_port();
    let sp = spooky(
        &config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
            .limit("request_header_timeout_ms", 700)
            .limit("connection_idle_timeout_ms", 60000),
    );
    // A fresh connection that never finishes its head.
    let mut s = tcp_tls(&sp, &[b"http/1.1"]).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: loc").await.unwrap();
    let took = time_to_close(&mut s, Duration::from_secs(5)).await;
    let took = took.expect("a stalled head was not cut off within 5 s");
    assert!(took >= Duration::from_millis(500), "{took:?}");
    // A kept-alive connection waits longer than the header timeout between
    // requests, then stalls in its second head.
    let mut s = tcp_tls(&sp, &[b"http/1.1"]).await;
    s.write_all(get).await.unwrap();
    assert!(read_h1_response(&mut s).await.starts_with("HTTP/1.1 200"));
    assert_eq!(
        time_to_close(&mut s, Duration::from_millis(1500)).await,
        None,
        "the wait between requests is not a header read"
    );
    s.write_all(get).await.unwrap();
    assert!(read_h1_response(&mut s).await.starts_with("HTTP/1.1 200"));
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let took = time_to_close(&mut s, Duration::from_secs(5)).await;
    let took = took.expect("a stalled second head was not cut off within 5 s");
    assert!(took >= Duration::from_millis(500), "{took:?}");
}

/// `limits.max_connection_age_ms`: a connection older than that gets
/// GOAWAY (HTTP/2) or `connection: close` (HTTP/1.1) while its request is
/// in flight; the request completes and then the connection closes.
#[tokio::test]
async fn max_connection_age_closes_busy_connections_gracefully() {
    use tokio::io::AsyncWriteExt;
    let certs = certs();
    let (_a, a) = backend("a", &certs, &[]);
    let admin_port = free_tcp_port();
    let sp = spooky(
        &config(Upstream::h3("app", &certs, &[("a", a)]), admin_port)
            .limit("max_connection_age_ms", 1000),
    );

    // HTTP/2: a 2.5 s request on a connection that reaches its age at 1 s.
    let stream = tcp_tls(&sp, &[b"h2"]).await;
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(sp.url("/delay/2500")).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&text).contains("delayed 2500 ms"));
    // The server said GOAWAY: the connection ends although this client
    // still holds it open (an h2 client whose handles are all dropped
    // would close it itself).
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "HTTP/2 connection still open 5 s after");
    drop(client);

    // HTTP/1.1: the response to the in-flight request says
    // `connection: close`, then the connection closes.
    let mut s = tcp_tls(&sp, &[b"http/1.1"]).await;
    s.write_all(b"GET /delay/2500 HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let resp = read_h1_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("delayed 2500 ms"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );
    let took = time_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(
        took.is_some(),
        "HTTP/1.1 connection still open after its last response"
    );
}
