//! HTTP/1.1 and HTTP/2 on both sides: h1/h2 backends (cleartext and TLS),
//! the TCP listener with `alt-svc` (curl, h2load), the plain-HTTP
//! redirect, gRPC over HTTP/3 and HTTP/2 to a grpcio backend, and a
//! browser (headless Chromium) upgrading to HTTP/3 from `alt-svc`.

use std::process::Command;

use crate::support::*;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::BodyExt;
use spooky::body;

/// Requests every kind of exchange through spooky to one backend.
async fn exercise(sp: &Spooky, expect_version: &str, expect_host_header: bool) {
    let client = sp.client().await;
    let (resp, body) = client.get("/").await.unwrap();
    assert_eq!(resp.status(), 200, "{body:?}");
    let id = resp.headers()["x-backend-id"].to_str().unwrap().to_owned();
    assert_eq!(body, format!("hello from {id}\n"));

    // Header translation: the backend sees its own protocol, the client's
    // authority, and no connection-specific headers.
    let (_, text) = client.get("/headers").await.unwrap();
    let text = String::from_utf8(text.to_vec()).unwrap();
    let first = text.lines().next().unwrap();
    assert!(first.ends_with(expect_version), "{text}");
    // HTTP/1.1 carries the authority in `host` (origin-form target),
    // HTTP/2 in `:authority` (absolute URI here).
    assert_eq!(
        text.contains(&format!("\nhost: localhost:{}\n", sp.port)),
        expect_host_header,
        "{text}"
    );
    assert_eq!(
        first.contains(&format!("://localhost:{}/headers", sp.port)),
        !expect_host_header,
        "{text}"
    );
    assert!(!text.contains("transfer-encoding"), "{text}");
    assert!(text.contains("via: 3 spooky"), "{text}");

    // 16 MiB down and up, streamed (chunked towards HTTP/1.1: no length).
    download_checked(&client, 16 << 20).await;
    let chunk = Bytes::from(vec![3u8; 64 * 1024]);
    let frames =
        (0..256).map(move |_| Ok::<_, body::BoxError>(http_body::Frame::data(chunk.clone())));
    let req = Request::post("/sink")
        .body(body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .unwrap();
    let (_, text) = {
        let resp = client.send(req).await.unwrap();
        let (p, b) = resp.into_parts();
        (p, b.collect().await.unwrap().to_bytes())
    };
    let mut h = spooky::demo::FNV64_INIT;
    for _ in 0..256 {
        h = spooky::demo::fnv64(h, &[3u8; 64 * 1024]);
    }
    assert_eq!(
        text,
        format!("received {} bytes fnv64 {h:016x}\n", 16u64 << 20)
    );

    // Echo streams the body back through both hops.
    let resp = client
        .send(
            Request::post("/echo")
                .body(body::full("ping pong"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "ping pong"
    );
}

#[tokio::test]
async fn http1_and_http2_backends_cleartext_and_tls() {
    let certs = certs();
    for (protocol, tls, version, host_header) in [
        ("http1", false, "HTTP/1.1", true),
        ("http1", true, "HTTP/1.1", true),
        ("http2", false, "HTTP/2.0", false),
        ("http2", true, "HTTP/2.0", false),
    ] {
        let mut args = vec!["--protocol", protocol];
        if tls {
            args.push("--tls");
        }
        let (_b, addr) = backend(&format!("{protocol}-{tls}"), &certs, &args);
        let up = Upstream::with_protocol("demo", protocol, tls.then_some(&certs), &[("b", addr)]);
        let sp = spooky(&Config::new().upstream(up));
        eprintln!("backend {protocol} tls={tls}");
        exercise(&sp, version, host_header).await;
    }
}

#[tokio::test]
async fn mutual_tls_to_backends() {
    let certs = certs();
    // A client identity for spooky (self-signed: its own CA).
    let client = tempfile::tempdir().unwrap();
    let (ccert, ckey, _) = spooky::tls::ensure_self_signed(client.path()).unwrap();
    let ca = ccert.to_str().unwrap();
    for protocol in ["http3", "http2", "http1"] {
        let mut args = vec!["--protocol", protocol, "--client-ca", ca];
        if protocol != "http3" {
            args.push("--tls");
        }
        let (_b, addr) = backend(&format!("mtls-{protocol}"), &certs, &args);
        let auth = format!(
            "{{ ca: {}, sni: localhost, client_cert: {}, client_key: {} }}",
            certs.cert.display(),
            ccert.display(),
            ckey.display()
        );
        let with =
            Upstream::with_protocol("with", protocol, None, &[("b", addr)]).field("tls", auth);
        let without = Upstream::with_protocol("without", protocol, Some(&certs), &[("b", addr)])
            .field("retries", "{ attempts: 0 }");
        let sp = spooky(
            &Config::new()
                .upstreams([with, without])
                .route_with("without", &[("match", "{ path_prefix: /anon/ }")])
                .route("with"),
        );
        let c = sp.client().await;
        let (ok, body) = c.get("/").await.unwrap();
        assert_eq!(ok.status(), 200, "{protocol}: {body:?}");
        let (refused, body) = c.get("/anon/").await.unwrap();
        assert_eq!(
            refused.status(),
            502,
            "{protocol} without a client certificate: {body:?}"
        );
    }
}

#[tokio::test]
async fn trailers_through_an_http2_backend() {
    let certs = certs();
    let (_b, addr) = backend("h2t", &certs, &["--protocol", "http2"]);
    let up = Upstream::with_protocol("demo", "http2", None, &[("b", addr)]);
    let sp = spooky(&Config::new().upstream(up));
    let client = sp.client().await;
    let resp = client
        .send(Request::get("/trailers").body(body::empty()).unwrap())
        .await
        .unwrap();
    let c = resp.into_body().collect().await.unwrap();
    assert_eq!(c.trailers().expect("trailers")["grpc-status"], "0");
    let mut t = HeaderMap::new();
    t.insert("x-sum", HeaderValue::from_static("42"));
    let frames = vec![
        Ok::<_, body::BoxError>(http_body::Frame::data(Bytes::from_static(b"abc"))),
        Ok(http_body::Frame::trailers(t)),
    ];
    let req = Request::post("/echo")
        .header("te", "trailers")
        .body(body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .unwrap();
    let c = client
        .send(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(c.trailers().expect("echoed trailers")["x-sum"], "42");
}

#[tokio::test]
async fn an_http2_backend_that_is_down_gives_502() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let up = Upstream::with_protocol("demo", "http2", None, &[("dead", dead)])
        .field("retries", "{ attempts: 0 }");
    let sp = spooky(&Config::new().upstream(up));
    let (resp, body) = sp.client().await.get("/").await.unwrap();
    assert_eq!(resp.status(), 502, "{body:?}");
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl").args(args).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn tcp_listener_serves_http2_and_http1_with_alt_svc() {
    if !have_tool("curl") || !have_tool("h2load") {
        return;
    }
    let certs = certs();
    let (_b, addr) = backend("tcp", &certs, &[]);
    let up = Upstream::with_protocol("demo", "http3", Some(&certs), &[("b", addr)]);
    let redirect = free_udp_port();
    let sp = spooky(
        &Config::new()
            .listen("alt_svc_max_age_s", 3600)
            .listen("http_redirect_port", redirect)
            .upstream(up),
    );
    let url = sp.url("/headers");
    let ca = sp.cert();
    let ca = ca.to_str().unwrap();
    let resolve = format!("localhost:{}:127.0.0.1", sp.port);
    for (flag, version, via) in [
        ("--http2", "HTTP/2 200", "via: 2 spooky"),
        ("--http1.1", "HTTP/1.1 200", "via: 1.1 spooky"),
    ] {
        let (out, err) = curl(&[
            "-sS",
            "-i",
            flag,
            "--cacert",
            ca,
            "--resolve",
            &resolve,
            &url,
        ]);
        assert!(out.starts_with(version), "{out}{err}");
        assert!(
            out.contains(&format!("alt-svc: h3=\":{}\"; ma=3600", sp.port)),
            "{out}"
        );
        assert!(out.contains(via), "backend sees the client's hop: {out}");
        assert!(out.contains("x-forwarded-proto: https"), "{out}");
    }
    // Uploads over TCP stream through to the HTTP/3 backend.
    let big = sp.dir.path().join("big.bin");
    std::fs::write(&big, vec![9u8; 3 << 20]).unwrap();
    let (out, err) = curl(&[
        "-sS",
        "--http2",
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "--data-binary",
        &format!("@{}", big.display()),
        &sp.url("/sink"),
    ]);
    assert!(
        out.starts_with(&format!("received {} bytes", 3 << 20)),
        "{out}{err}"
    );

    // Load with an independent HTTP/2 client.
    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "10", "-m", "10", &sp.url("/")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Plain HTTP redirects to https.
    let (out, _) = curl(&["-sS", "-i", &format!("http://localhost:{redirect}/a?b=1")]);
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    assert!(
        out.contains(&format!("location: https://localhost:{}/a?b=1", sp.port)),
        "{out}"
    );
}

/// A gRPC message frame: flag byte, big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

fn grpc_messages(mut body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        out.push(String::from_utf8_lossy(&body[5..5 + len]).into_owned());
        body = &body[5 + len..];
    }
    out
}

#[tokio::test]
async fn grpc_over_http3_and_http2_to_a_grpcio_backend() {
    let certs = certs();
    let grpc_port = free_udp_port();
    let Some(_server) = python_proc(
        "grpc server",
        "grpc_server.py",
        &["--port", &grpc_port.to_string(), "--id", "py-grpc"],
        "listening",
    ) else {
        return;
    };
    let grpc_addr: std::net::SocketAddr = format!("127.0.0.1:{grpc_port}").parse().unwrap();
    let (_b, addr) = backend("web", &certs, &[]);
    let sp = spooky(
        &Config::new()
            .upstream(Upstream::with_protocol(
                "grpc",
                "http2",
                None,
                &[("g", grpc_addr)],
            ))
            .upstream(Upstream::with_protocol(
                "web",
                "http3",
                Some(&certs),
                &[("w", addr)],
            ))
            .route_with("grpc", &[("match", "{ path_prefix: /spooky.test.Demo/ }")])
            .route("web"),
    );

    // HTTP/3 client, gRPC framing by hand.
    let client = sp.client().await;
    let call = |method: &str, payload: &[u8]| {
        Request::post(format!("/spooky.test.Demo/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body::full(grpc_frame(payload)))
            .unwrap()
    };
    let resp = client.send(call("Say", b"h3")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let c = resp.into_body().collect().await.unwrap();
    let trailers = c.trailers().cloned().expect("grpc trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-served-by"], "py-grpc");
    assert_eq!(grpc_messages(&c.to_bytes()), vec!["hello h3"]);

    let resp = client.send(call("Count", b"4")).await.unwrap();
    let c = resp.into_body().collect().await.unwrap();
    assert_eq!(c.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(
        grpc_messages(&c.to_bytes()),
        vec!["item 0", "item 1", "item 2", "item 3"]
    );

    let resp = client.send(call("Fail", b"")).await.unwrap();
    let head_status = resp.headers().get("grpc-status").cloned();
    let c = resp.into_body().collect().await.unwrap();
    // gRPC's Trailers-Only form puts the status in the headers frame.
    let status = c
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(head_status)
        .unwrap_or_else(|| HeaderValue::from_static("?"));
    assert_eq!(status, "5", "NOT_FOUND");

    // grpcio's own client over HTTP/2 + TLS through the TCP listener.
    let Some(python) = python() else { return };
    let out = Command::new(python)
        .arg(script("grpc_client.py"))
        .args([
            "--port",
            &sp.port.to_string(),
            "--ca",
            sp.cert().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("unary hello grpc code=OK served-by=py-grpc"),
        "{text}"
    );
    assert!(
        text.contains("stream item 0,item 1,item 2,item 3,item 4"),
        "{text}"
    );
    assert!(
        text.contains("fail code=NOT_FOUND details=no such thing"),
        "{text}"
    );
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo, base64: what
/// Chromium's `--ignore-certificate-errors-spki-list` takes.
fn spki_sha256_base64(key_pem: &std::path::Path) -> String {
    let pem = std::fs::read_to_string(key_pem).unwrap();
    let key = rcgen::KeyPair::from_pem(&pem).unwrap();
    use rcgen::PublicKeyData;
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
    base64(digest.as_ref())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn base64_matches_rfc4648() {
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64(b"fooba"), "Zm9vYmE=");
    assert_eq!(base64(b"foob"), "Zm9vYg==");
}

#[tokio::test]
async fn chromium_switches_to_http3_after_alt_svc() {
    if !have_tool("chromium") {
        return;
    }
    let certs = certs();
    let (_b, addr) = backend("page", &certs, &[]);
    let up = Upstream::with_protocol("demo", "http3", Some(&certs), &[("b", addr)]);
    let sp = spooky(&Config::new().upstream(up));
    let spki = spki_sha256_base64(&sp.dir.path().join("state/self-signed-key.pem"));
    let profile = sp.dir.path().join("chromium-profile");
    let run = || {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-quic",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            // Trust the test certificate by its key...
            .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
            // ...and let QUIC accept a certificate from an unknown root for
            // this host. Chromium takes that allowance from the forced-QUIC
            // origins; forcing an unused port of the same host leaves the
            // origin under test to discover HTTP/3 through alt-svc.
            .arg("--origin-to-force-quic-on=localhost:1")
            .arg("--host-resolver-rules=MAP localhost 127.0.0.1")
            .args(["--virtual-time-budget=15000", "--dump-dom"])
            .arg(sp.url("/page"))
            .output()
            .unwrap();
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        let log = dom
            .split("<pre id=\"log\">")
            .nth(1)
            .and_then(|s| s.split("</pre>").next())
            .unwrap_or_default()
            .to_owned();
        assert!(
            !log.is_empty(),
            "page did not finish:\n{dom}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        log
    };
    // First visit: the page arrives over TCP (HTTP/2) with alt-svc; the
    // page's later fetches move to HTTP/3.
    let first = run();
    eprintln!("first visit: {first:?}");
    assert!(first.starts_with("navigation:h2\n"), "{first}");
    let fetches: Vec<&str> = first
        .split("fetches:")
        .nth(1)
        .unwrap_or("")
        .split(',')
        .collect();
    assert!(fetches.contains(&"h3"), "{first}");
    assert_eq!(fetches.last(), Some(&"h3"), "{first}");
    // Second visit (alt-svc remembered in the profile): HTTP/3 from the
    // first request.
    let second = run();
    eprintln!("second visit: {second:?}");
    assert!(second.starts_with("navigation:h3\n"), "{second}");
    // spooky saw the HTTP/3 requests.
    assert!(sp.proc.out.contains("spooky::access"), "access log");
}
