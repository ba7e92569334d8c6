//! End to end through real processes and sockets: HTTP/3 clients → spooky
//! → HTTP/3 demo backends, all on loopback.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::BodyExt;
use spooky::body;

#[tokio::test]
async fn balances_round_robin_across_three_backends() {
    let certs = certs();
    let (_b1, a1) = backend("b1", &certs, &[]);
    let (_b2, a2) = backend("b2", &certs, &[]);
    let (_b3, a3) = backend("b3", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("b1", a1), ("b2", a2), ("b3", a3)])
        .field("balancing", "{ type: round_robin }");
    // One worker: round robin is per worker, and this test checks exact
    // shares.
    let sp = spooky(&Config::new().workers(1).upstream(up));
    let client = sp.client().await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let (resp, body) = client.get("/").await.unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-backend-id"].to_str().unwrap().to_owned();
        assert_eq!(body, format!("hello from {id}\n"));
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 10), "{seen:?}");
}

#[tokio::test]
async fn sixteen_concurrent_streams_on_one_connection() {
    let certs = certs();
    let (_b, a) = backend("only", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("only", a)]);
    let sp = spooky(&Config::new().upstream(up));
    let client = std::sync::Arc::new(sp.client().await);
    // The backend answers /barrier/16 only when 16 requests wait there at
    // once: all 16 must be in flight through spooky together.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = client.clone();
        tasks.push(tokio::spawn(
            async move { c.get("/barrier/16").await.unwrap() },
        ));
    }
    for t in tasks {
        let (resp, body) = t.await.unwrap();
        assert_eq!(resp.status(), 200, "{body:?}");
        assert_eq!(body, "barrier 16 passed\n");
    }
    assert_eq!(client.connection().stats().path.lost_packets, 0);
}

#[tokio::test]
async fn sixty_four_mib_each_way_with_bounded_memory() {
    const SIZE: u64 = 64 << 20;
    let certs = certs();
    let (_b, a) = backend("big", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("big", a)]);
    let sp = spooky(&Config::new().upstream(up));
    let client = sp.client().await;
    // Warm up so the baseline includes connections and buffers.
    client.get("/bytes/1048576").await.unwrap();
    let baseline = sp.proc.peak_rss_kib();

    let t0 = std::time::Instant::now();
    // Download, checked byte for byte as it streams.
    download_checked(&client, SIZE).await;
    eprintln!("download done after {:?}", t0.elapsed());

    // Upload, streamed from a generator (never held in memory here either).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, body::BoxError>>(4);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 256 * 1024]);
        for _ in 0..(SIZE / chunk.len() as u64) {
            if tx
                .send(Ok(http_body::Frame::data(chunk.clone())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let stream = http_body_util::StreamBody::new(tokio_stream(rx));
    let req = Request::post("/sink").body(body::boxed(stream)).unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    let mut h = spooky::demo::FNV64_INIT;
    let chunk = vec![7u8; 256 * 1024];
    for _ in 0..(SIZE / chunk.len() as u64) {
        h = spooky::demo::fnv64(h, &chunk);
    }
    assert_eq!(text, format!("received {SIZE} bytes fnv64 {h:016x}\n"));
    eprintln!("upload done after {:?}", t0.elapsed());

    let peak = sp.proc.peak_rss_kib();
    eprintln!(
        "spooky peak RSS: {baseline} KiB before, {peak} KiB after 64 MiB each way (+{} KiB)",
        peak.saturating_sub(baseline)
    );
    // 128 MiB crossed the proxy; its memory may grow by buffers and
    // windows, never by the body size.
    assert!(
        peak.saturating_sub(baseline) < 24 * 1024,
        "peak RSS grew by {} KiB",
        peak - baseline
    );
}

fn tokio_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Unpin {
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

#[tokio::test]
async fn trailers_cross_the_proxy_both_ways() {
    let certs = certs();
    let (_b, a) = backend("t", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("t", a)]);
    let sp = spooky(&Config::new().upstream(up));
    let client = sp.client().await;

    let resp = client
        .send(Request::get("/trailers").body(body::empty()).unwrap())
        .await
        .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(trailers["grpc-status"], "0");
    let sum = spooky::demo::fnv64(spooky::demo::FNV64_INIT, b"trailers follow\n");
    assert_eq!(trailers["x-checksum"], format!("{sum:016x}").as_str());
    assert_eq!(collected.to_bytes(), "trailers follow\n");

    // Request trailers reach the backend, which echoes them back.
    let mut t = HeaderMap::new();
    t.insert("x-request-sum", HeaderValue::from_static("abc"));
    let frames = vec![
        Ok::<_, body::BoxError>(http_body::Frame::data(Bytes::from_static(b"ping"))),
        Ok(http_body::Frame::trailers(t)),
    ];
    let req_body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let resp = client
        .send(Request::post("/echo").body(body::boxed(req_body)).unwrap())
        .await
        .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-request-sum"], "abc");
    assert_eq!(collected.to_bytes(), "ping");
}

#[tokio::test]
async fn forwarding_headers_and_request_id() {
    let certs = certs();
    let (_b, a) = backend("h", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("h", a)]);
    let sp = spooky(&Config::new().upstream(up));
    let client = sp.client().await;

    let req = Request::get("/headers")
        .header("x-request-id", "trace-42")
        .header("x-forwarded-for", "203.0.113.9")
        .header("te", "trailers")
        .body(body::empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-42");
    assert_eq!(resp.headers()["via"], "3 spooky");
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.starts_with(&format!("GET https://localhost:{}/headers", sp.port)),
        "{text}"
    );
    assert!(text.contains("x-request-id: trace-42\n"), "{text}");
    assert!(
        text.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{text}"
    );
    assert!(text.contains("x-forwarded-proto: https\n"), "{text}");
    assert!(text.contains("via: 3 spooky\n"), "{text}");
    assert!(text.contains("te: trailers\n"), "{text}");

    // Without one, spooky makes an id, sends it to the backend and back.
    let (resp, text) = client.get("/headers").await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert!(String::from_utf8_lossy(&text).contains(&format!("x-request-id: {id}\n")));
    // ... and logs it (when the response body has ended, just after the
    // client read it).
    wait_until_async(
        "the request id in the access log",
        Duration::from_secs(10),
        || lines_with(&sp.proc.out, &["spooky::access", &id], 1),
    )
    .await;
}

#[tokio::test]
async fn unreachable_backend_gives_502_with_request_id() {
    let certs = certs();
    // Nothing listens on this port.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let up = Upstream::h3("demo", &certs, &[("dead", dead)]);
    let sp = spooky(&Config::new().timeout("connect_ms", 500).upstream(up));
    let client = sp.client().await;
    let (resp, body) = client.get("/").await.unwrap();
    assert!(
        resp.status() == 502 || resp.status() == 504,
        "{} {body:?}",
        resp.status()
    );
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains(&format!("request-id: {id}")), "{text}");
    // The connection survives: a second request gets its own answer.
    let (again, _) = client.get("/").await.unwrap();
    assert!(again.status().is_server_error());
}

#[tokio::test]
async fn slow_backend_gives_504() {
    let certs = certs();
    let (_b, a) = backend("slow", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("slow", a)]).field("timeouts", "{ request_ms: 300 }");
    let sp = spooky(&Config::new().upstream(up));
    let client = sp.client().await;
    let (resp, body) = client.get("/delay/5000").await.unwrap();
    assert_eq!(resp.status(), 504, "{body:?}");
    assert!(String::from_utf8_lossy(&body).starts_with("504 Gateway Timeout"));
    let (ok, _) = client.get("/delay/10").await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_client_reset_ends_only_its_stream() {
    let certs = certs();
    let (_b, a) = backend("r", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("r", a)]);
    let sp = spooky(&Config::new().upstream(up));
    let client = sp.client().await;
    // Start a large download and abandon it after the first chunk.
    let resp = client
        .send(
            Request::get("/bytes/104857600")
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut b = resp.into_body();
    b.frame().await.unwrap().unwrap();
    drop(b);
    // Same connection, next request: fine.
    for _ in 0..3 {
        let (resp, body) = client.get("/").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body, "hello from r\n");
    }
    assert!(client.connection().close_reason().is_none());
}

#[tokio::test]
async fn body_limit_gives_413() {
    let certs = certs();
    let (_b, a) = backend("l", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("l", a)]);
    let sp = spooky(&Config::new().limit("max_body_bytes", 1000).upstream(up));
    let client = sp.client().await;
    let req = Request::post("/sink")
        .header("content-length", "5000")
        .body(body::full(vec![0u8; 5000]))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    // Without a content-length the limit trips mid-stream.
    let frames = (0..10)
        .map(|_| Ok::<_, body::BoxError>(http_body::Frame::data(Bytes::from(vec![1u8; 500]))));
    let req = Request::post("/sink")
        .body(body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let small = Request::post("/sink")
        .body(body::full(vec![0u8; 1000]))
        .unwrap();
    assert_eq!(client.send(small).await.unwrap().status(), 200);
}

#[tokio::test]
async fn routes_by_host_path_and_header() {
    let certs = certs();
    let (_a, aa) = backend("api", &certs, &[]);
    let (_w, wa) = backend("web", &certs, &[]);
    let (_c, ca) = backend("canary", &certs, &[]);
    let sp = spooky(
        &Config::new()
            .upstream(Upstream::h3("api", &certs, &[("api", aa)]))
            .upstream(Upstream::h3("web", &certs, &[("web", wa)]))
            .upstream(Upstream::h3("canary", &certs, &[("canary", ca)]))
            .route_with(
                "canary",
                &[(
                    "match",
                    "{ path_prefix: /api/, headers: { x-canary: \"1\" } }",
                )],
            )
            .route_with("api", &[("match", "{ path_prefix: /api/ }")])
            .route_with("api", &[("match", "{ host: \"*.example\" }")])
            .route("web"),
    );
    let client = sp.client().await;
    let who =
        |resp: &http::Response<()>| resp.headers()["x-backend-id"].to_str().unwrap().to_owned();
    assert_eq!(who(&client.get("/api/x").await.unwrap().0), "api");
    assert_eq!(who(&client.get("/other").await.unwrap().0), "web");
    let canary = Request::get("/api/x")
        .header("x-canary", "1")
        .body(body::empty())
        .unwrap();
    assert_eq!(
        client.send(canary).await.unwrap().headers()["x-backend-id"],
        "canary"
    );
    let by_host = Request::get("https://www.example/")
        .body(body::empty())
        .unwrap();
    assert_eq!(
        client.send(by_host).await.unwrap().headers()["x-backend-id"],
        "api"
    );
}

#[tokio::test]
async fn the_self_signed_certificate_survives_restarts() {
    let certs = certs();
    let (_b, a) = backend("s", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("s", a)]);
    let mut sp = spooky(&Config::new().upstream(up));
    let first = std::fs::read(sp.cert()).unwrap();
    assert!(
        sp.proc.out.contains("SELF-SIGNED"),
        "the log must say so loudly"
    );
    assert!(
        sp.proc.terminate(Duration::from_secs(15)),
        "spooky did not stop on SIGTERM"
    );
    // Same state dir, new process.
    let state = sp.dir.path().join("state");
    let config_path = sp.dir.path().join("spooky.yaml");
    let mut child = std::process::Command::new(spooky_bin())
        .args(["run", "-c"])
        .arg(&config_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = async {
        for _ in 0..100 {
            if let Ok(c) =
                spooky::client::H3Client::connect(&sp.url("/"), &sp.client_options()).await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("restarted spooky did not come up");
    }
    .await;
    // The client trusts the first run's certificate: the handshake above
    // proves the restart kept it.
    assert_eq!(client.get("/").await.unwrap().0.status(), 200);
    assert_eq!(
        std::fs::read(state.join("self-signed-cert.pem")).unwrap(),
        first
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn check_reports_the_exact_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listen: { address: 0.0.0.0, port: 9889 }\nupstreams:\n  api:\n    backends:\n      - { id: a, address: \"10.0.0.1:443\" }\n      - { id: b, address: \"10.0.0.2\" }\n",
    )
    .unwrap();
    let out = std::process::Command::new(spooky_bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!(
            "{}: 1 error\n  upstreams.api.backends[1].address: `10.0.0.2` has no port; expected IP:PORT, [IPv6]:PORT or HOST:PORT, e.g. `10.0.0.5:8443`\n",
            path.display()
        )
    );
    std::fs::write(
        &path,
        "listen: { address: 0.0.0.0, port: 9889, wokers: 2 }\nbackends: []\n",
    )
    .unwrap();
    let out = std::process::Command::new(spooky_bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("listen.wokers: unknown field `wokers`, expected one of `protocol`, `address`, `port`, `workers`, `tls`, `drain_timeout_ms`"),
        "{stderr}"
    );
    let good = std::process::Command::new(spooky_bin())
        .args(["check", "-c"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/spooky.yaml"))
        .output()
        .unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
}

/// Runs the aioquic client (tests/clients/h3_get.py) against `sp`.
fn aioquic(sp: &Spooky, args: &[&str]) -> std::process::Output {
    let port = sp.port.to_string();
    std::process::Command::new(python().expect("checked by the caller"))
        .arg(script("h3_get.py"))
        .args(["--ca", sp.cert().to_str().unwrap()])
        .args(["--host", "127.0.0.1", "--port", &port, "--sni", "localhost"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn aioquic_client_through_spooky() {
    if python().is_none() {
        return;
    }
    let certs = certs();
    let (_b1, a1) = backend("aq1", &certs, &[]);
    let (_b2, a2) = backend("aq2", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("aq1", a1), ("aq2", a2)])
        .field("balancing", "{ type: round_robin }");
    let sp = spooky(&Config::new().workers(1).upstream(up));
    let out = aioquic(&sp, &["--path", "/", "--count", "8", "--concurrent"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with("200 ")), "{stdout}");
    let aq1 = lines
        .iter()
        .filter(|l| l.contains("hello from aq1"))
        .count();
    let aq2 = lines
        .iter()
        .filter(|l| l.contains("hello from aq2"))
        .count();
    assert_eq!((aq1, aq2), (4, 4), "{stdout}");
    // Trailers and a sized body through aioquic too.
    let out = aioquic(&sp, &["--path", "/bytes/1000000", "--count", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("200 1000000 bytes"), "{stdout}");
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test]
async fn admin_serves_metrics_health_and_readiness() {
    let certs = certs();
    let (_b, a) = backend("m", &certs, &[]);
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let admin_port = free_udp_port();
    let sp = spooky(
        &Config::new()
            .upstream(Upstream::h3("live", &certs, &[("m", a)]))
            .upstream(
                Upstream::h3("dead", &certs, &[("gone", dead)])
                    .field("retries", "{ attempts: 0 }")
                    .field("timeouts", "{ connect_ms: 300 }"),
            )
            .route_with("dead", &[("match", "{ path_prefix: /dead }")])
            .route("live")
            .admin(admin_port),
    );
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let client = sp.client().await;
    for _ in 0..3 {
        assert_eq!(client.get("/").await.unwrap().0.status(), 200);
    }
    // Nothing answers QUIC there: the connect times out.
    assert_eq!(client.get("/dead").await.unwrap().0.status(), 504);
    let m = http_get(admin, "/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    for line in [
        "spooky_requests_total{protocol=\"h3\"} 4",
        "spooky_responses_total{class=\"2xx\"} 3",
        "spooky_local_responses_total{status=\"504\"} 1",
        "spooky_backend_requests_total{backend=\"m\",upstream=\"live\"} 3",
        "spooky_backend_responses_total{backend=\"m\",class=\"2xx\",upstream=\"live\"} 3",
        "spooky_backend_failures_total{backend=\"gone\",kind=\"connect\",upstream=\"dead\"} 1",
        "spooky_backend_healthy{backend=\"m\",upstream=\"live\"} 1",
        "spooky_steering_mode{mode=\"reuseport\"} 1",
        "spooky_workers 2",
    ] {
        assert!(m.contains(line), "missing `{line}` in\n{m}");
    }
    assert!(http_get(admin, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(admin, "/readyz").starts_with("HTTP/1.1 200"));
    assert!(http_get(admin, "/nope").starts_with("HTTP/1.1 404"));
}

#[test]
fn a_malformed_request_ends_only_its_stream() {
    if python().is_none() {
        return;
    }
    let certs = certs();
    let (_b, a) = backend("mf", &certs, &[]);
    let up = Upstream::h3("demo", &certs, &[("mf", a)]);
    let sp = spooky(&Config::new().upstream(up));
    let out = aioquic(&sp, &["--malformed-first", "--path", "/", "--count", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "malformed stream 0 sent", "{stdout}");
    // The same connection still serves requests.
    assert_eq!(
        &lines[1..],
        &["200 14 bytes hello from mf", "200 14 bytes hello from mf"],
        "{stdout}"
    );
    // ...and the malformed one never became a request: once the two
    // served requests are logged, a third line (there must be none) gets
    // the grace period a line written late needs.
    wait_until(
        "access-log lines for the two served requests",
        Duration::from_secs(10),
        || lines_with(&sp.proc.out, &["spooky::access"], 2),
    );
    std::thread::sleep(Duration::from_millis(100));
    let served = sp
        .proc
        .out
        .lines()
        .iter()
        .filter(|l| l.contains("spooky::access"))
        .count();
    assert_eq!(served, 2, "{:#?}", sp.proc.out.lines());
}
