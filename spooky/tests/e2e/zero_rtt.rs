//! 0-RTT (TLS early data, RFC 8470) end to end: off by default; when
//! `listen.early_data` is on, a resuming client's GET is served from its
//! first flight with `early-data: 1` to the backend, a POST in early data
//! gets 425, and a backend's own 425 passes through.

use std::sync::Arc;

use crate::support::*;
use bytes::{Buf, Bytes};
use http::Request;

/// A QUIC client config that keeps session tickets and sends early data.
fn client_config(sp: &Spooky) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in spooky::tls::load_certs(&sp.cert()).unwrap() {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(spooky::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.enable_early_data = true;
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(qc))
}

type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// One request on `sender`: (status, body).
async fn request(
    sender: &mut Sender,
    method: &str,
    path: &str,
    body: &[u8],
    port: u16,
) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(format!("https://localhost:{port}{path}"))
        .body(())
        .unwrap();
    let mut stream = sender.send_request(req).await.unwrap();
    if !body.is_empty() {
        stream
            .send_data(Bytes::copy_from_slice(body))
            .await
            .unwrap();
    }
    stream.finish().await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    let mut text = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        while chunk.has_remaining() {
            let c = chunk.chunk();
            text.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&text).into_owned(),
    )
}

/// Opens a connection with 0-RTT when a ticket allows it; returns the
/// sender, whether the connection started in 0-RTT, and the future that
/// says whether the server accepted it.
async fn connect(
    endpoint: &quinn::Endpoint,
    cc: &quinn::ClientConfig,
    sp: &Spooky,
) -> (
    Sender,
    bool,
    Option<quinn::ZeroRttAccepted>,
    tokio::task::JoinHandle<()>,
) {
    let connecting = endpoint
        .connect_with(cc.clone(), sp.addr(), "localhost")
        .unwrap();
    let (conn, early, accepted) = match connecting.into_0rtt() {
        Ok((conn, accepted)) => (conn, true, Some(accepted)),
        Err(connecting) => (connecting.await.unwrap(), false, None),
    };
    let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = driver.wait_idle().await;
    });
    (sender, early, accepted, driver)
}

async fn first_then_resumed(sp: &Spooky) -> (bool, Sender, Option<quinn::ZeroRttAccepted>) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cc = client_config(sp);
    // A full handshake that leaves a session ticket behind.
    let (mut sender, early, _, driver) = connect(&endpoint, &cc, sp).await;
    assert!(!early, "no ticket yet");
    assert_eq!(request(&mut sender, "GET", "/", b"", sp.port).await.0, 200);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(sender);
    driver.abort();
    let (sender, early, accepted, _driver) = connect(&endpoint, &cc, sp).await;
    // Keep the endpoint alive with the connection.
    std::mem::forget(endpoint);
    (early, sender, accepted)
}

/// One worker in front of `up`.
fn config(up: Upstream) -> Config {
    Config::new().workers(1).upstream(up)
}

#[tokio::test]
async fn early_data_serves_safe_methods_and_refuses_the_rest() {
    let certs = certs();
    let (_b, addr) = backend("a", &certs, &[]);
    let up = Upstream::h3("app", &certs, &[("a", addr)]);
    let sp = spooky(&config(up).listen("early_data", true));
    let (early, mut sender, accepted) = first_then_resumed(&sp).await;
    assert!(early, "the client had a ticket and started in 0-RTT");
    // All three leave in the first flight, before the handshake
    // completes: early data.
    let (mut s2, mut s3) = (sender.clone(), sender.clone());
    let (get, post, passthrough) = tokio::join!(
        request(&mut sender, "GET", "/headers", b"", sp.port),
        request(&mut s2, "POST", "/sink", b"hello", sp.port),
        request(&mut s3, "GET", "/status/425", b"", sp.port),
    );
    let accepted = accepted.unwrap().await;
    eprintln!("0-RTT accepted: {accepted}; GET {} POST {}", get.0, post.0);
    assert!(accepted, "spooky accepted 0-RTT");
    assert_eq!(get.0, 200, "{get:?}");
    assert!(get.1.contains("early-data: 1"), "{}", get.1);
    assert_eq!(post.0, 425, "{post:?}");
    assert_eq!(passthrough.0, 425, "a backend's 425 passes through");
    // After the handshake the same connection serves everything, without
    // the early-data mark.
    let after = request(&mut sender, "GET", "/headers", b"", sp.port).await;
    assert_eq!(after.0, 200);
    assert!(!after.1.contains("early-data"), "{}", after.1);
    assert_eq!(
        request(&mut sender, "POST", "/sink", b"hello", sp.port)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn early_data_is_off_by_default() {
    let certs = certs();
    let (_b, addr) = backend("a", &certs, &[]);
    let up = Upstream::h3("app", &certs, &[("a", addr)]);
    let sp = spooky(&config(up));
    let (early, mut sender, accepted) = first_then_resumed(&sp).await;
    // Without early data on the server, its tickets do not allow 0-RTT.
    if early {
        assert!(!accepted.unwrap().await, "0-RTT must be rejected");
    }
    let get = request(&mut sender, "GET", "/headers", b"", sp.port).await;
    assert_eq!(get.0, 200);
    assert!(!get.1.contains("early-data"), "{}", get.1);
}
