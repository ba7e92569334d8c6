use std::path::Path;

use super::*;

fn ok(yaml: &str) -> Config {
    match parse(yaml, "test.yaml", Path::new("/nonexistent")) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn errors(yaml: &str) -> Vec<ConfigError> {
    match parse(yaml, "test.yaml", Path::new("/nonexistent")) {
        Ok(_) => panic!("config unexpectedly valid"),
        Err(e) => e.errors,
    }
}

fn has(errs: &[ConfigError], path: &str, needle: &str) {
    assert!(
        errs.iter()
            .any(|e| e.path == path && e.message.contains(needle)),
        "no error at `{path}` containing `{needle}` in {errs:#?}"
    );
}

const ORIGINAL: &str = r#"
listen:
  protocol: http3
  address: "0.0.0.0"
  port: 9889
backends:
  - id: backend1
    address: "127.0.0.1:8081"
    weight: 100
    health_check:
      path: /health
      interval: 5000
  - id: backend2
    address: "127.0.0.1:8082"
    weight: 50
load_balancing:
  type: random
log:
  level: info
"#;

#[test]
fn the_original_format_loads_unchanged() {
    let c = ok(ORIGINAL);
    assert_eq!(c.listen.addr, "0.0.0.0:9889".parse().unwrap());
    assert_eq!(c.upstreams.len(), 1);
    let u = &c.upstreams[0];
    assert_eq!(u.name, LEGACY_UPSTREAM);
    assert_eq!(u.backends.len(), 2);
    assert_eq!(u.backends[0].weight, 100);
    assert_eq!(
        u.backends[0].addr,
        BackendAddr {
            host: "127.0.0.1".into(),
            port: 8081
        }
    );
    let hc = u.backends[0].health_check.as_ref().unwrap();
    assert_eq!(hc.interval(), Duration::from_millis(5000));
    assert_eq!(c.routes.len(), 1, "an implicit catch-all route");
    assert_eq!(c.log.level, "info");
    assert!(c.log.access);
    assert!(matches!(u.verification, Verification::SystemRoots));
}

#[test]
fn original_tls_paths_resolve_against_the_config_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/cert.pem"), "x").unwrap();
    std::fs::write(dir.path().join("certs/key.pem"), "x").unwrap();
    let yaml = ORIGINAL.replace(
        "  port: 9889\n",
        "  port: 9889\n  tls: { cert: certs/cert.pem, key: certs/key.pem }\n",
    );
    let c = parse(&yaml, "t", dir.path()).unwrap();
    assert_eq!(
        c.listen.tls.unwrap().cert,
        dir.path().join("certs/cert.pem")
    );
}

const EXTENDED: &str = r#"
listen: { address: "::", port: 443, workers: 2 }
upstreams:
  api:
    protocol: http3
    tls: { sni: api.internal, insecure_skip_verify: true }
    backends:
      - { id: a, address: "10.0.0.1:8443", weight: 3 }
      - { id: b, address: "api-b.internal:8443" }
    balancing: { type: round_robin }
    pool: { max_streams_per_connection: 50 }
    timeouts: { request_ms: 2000 }
  web:
    backends: [{ id: w, address: "[::1]:9000" }]
routes:
  - match: { host: "api.example.com", path_prefix: /v1/, headers: { x-env: canary } }
    upstream: api
  - upstream: web
timeouts: { connect_ms: 1000 }
limits: { max_body_bytes: 1048576 }
request_id: { header: x-trace-id }
steering: { mode: reuseport, cid_length: 16, node_id: "0a0b0c", config_id: 2 }
"#;

#[test]
fn the_extended_format() {
    let c = ok(EXTENDED);
    assert_eq!(c.listen.workers, 2);
    let api = c.upstream("api").unwrap();
    assert_eq!(api.backends[1].addr.host, "api-b.internal");
    assert_eq!(api.backends[1].weight, 1);
    assert_eq!(api.pool.max_streams_per_connection, 50);
    assert_eq!(api.timeouts.request, Duration::from_millis(2000));
    assert_eq!(
        api.timeouts.connect,
        Duration::from_millis(1000),
        "inherited"
    );
    assert_eq!(api.sni.as_deref(), Some("api.internal"));
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.upstreams[c.routes[1].upstream].name, "web");
    assert_eq!(c.limits.max_body_bytes, Some(1 << 20));
    assert_eq!(c.request_id_header, "x-trace-id");
    assert_eq!(c.steering.layout.cid_len(), 16);
    assert_eq!(c.steering.layout.node_id(), &[0x0a, 0x0b, 0x0c]);
    assert_eq!(c.steering.mode, SteeringMode::Reuseport);
}

#[test]
fn unknown_fields_are_errors_with_their_path() {
    let errs = errors(&EXTENDED.replace("weight: 3", "weight: 3, wieght: 4"));
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "upstreams.api.backends[0].wieght");
    assert!(
        errs[0].message.contains("unknown field `wieght`")
            && errs[0].message.contains("expected one of"),
        "{}",
        errs[0].message
    );
    let top = errors(&format!("{ORIGINAL}\nlisten_port: 3\n"));
    assert!(
        top[0].message.contains("unknown field `listen_port`"),
        "{top:?}"
    );
}

#[test]
fn bad_backend_address_names_the_field() {
    let errs = errors(&EXTENDED.replace("api-b.internal:8443", "api-b internal"));
    has(
        &errs,
        "upstreams.api.backends[1].address",
        "expected IP:PORT",
    );
    let errs = errors(&EXTENDED.replace("10.0.0.1:8443", "10.0.0.1:99999"));
    has(&errs, "upstreams.api.backends[0].address", "is not a port");
}

#[test]
fn semantic_errors_are_all_reported() {
    let yaml = EXTENDED
        .replace("weight: 3", "weight: 0")
        .replace("upstream: web", "upstream: nope")
        .replace("workers: 2", "workers: 0")
        .replace("node_id: \"0a0b0c\"", "node_id: \"xyz\"")
        .replace("path_prefix: /v1/", "path_prefix: v1");
    let errs = errors(&yaml);
    has(&errs, "upstreams.api.backends[0].weight", "at least 1");
    has(&errs, "routes[1].upstream", "no upstream named `nope`");
    has(&errs, "listen.workers", "at least 1");
    has(&errs, "steering.node_id", "not hex");
    has(&errs, "routes[0].match.path_prefix", "must start with `/`");
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

#[test]
fn type_errors_name_the_field() {
    let errs = errors(&EXTENDED.replace("port: 443", "port: https"));
    assert_eq!(errs[0].path, "listen.port");
    let errs = errors(&EXTENDED.replace("mode: reuseport", "mode: ebpf"));
    assert_eq!(errs[0].path, "steering.mode");
    assert!(
        errs[0].message.contains("expected one of"),
        "{}",
        errs[0].message
    );
}

#[test]
fn missing_fields_say_so() {
    let errs = errors("listen: { address: 0.0.0.0 }\nbackends: []\n");
    assert_eq!(errs[0].path, "listen");
    assert!(errs[0].message.contains("missing field `port`"), "{errs:?}");
}

#[test]
fn routes_are_required_with_several_upstreams() {
    let yaml = EXTENDED.replace(
        "routes:\n  - match: { host: \"api.example.com\", path_prefix: /v1/, headers: { x-env: canary } }\n    upstream: api\n  - upstream: web\n",
        "",
    );
    has(&errors(&yaml), "routes", "catch-all");
}

#[test]
fn xdp_needs_interfaces_and_a_cid_layout_that_fits() {
    let errs = errors(&EXTENDED.replace(
        "mode: reuseport, cid_length: 16",
        "mode: xdp, cid_length: 8",
    ));
    has(&errs, "steering.interfaces", "at least one interface");
    has(&errs, "steering.cid_length", "too short");
}

#[test]
fn legacy_and_extended_conflict_is_explained() {
    let yaml = format!(
        "{ORIGINAL}upstreams:\n  default:\n    backends: [{{ id: x, address: \"127.0.0.1:1\" }}]\n"
    );
    has(&errors(&yaml), "backends", "move these backends");
}

#[test]
fn error_display_lists_every_error() {
    let e = parse(
        "listen: { address: nowhere, port: 1 }\nbackends: []\n",
        "f.yaml",
        Path::new("."),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("f.yaml: 2 errors"), "{text}");
    assert!(
        text.contains("listen.address: `nowhere` is not an IP address"),
        "{text}"
    );
    assert!(
        text.contains("upstreams.default.backends")
            || text.contains("backends: needs at least one backend"),
        "{text}"
    );
}

#[test]
fn backend_addr_parsing() {
    assert_eq!(
        parse_backend_addr("[::1]:443").unwrap(),
        BackendAddr {
            host: "::1".into(),
            port: 443
        }
    );
    assert_eq!(
        parse_backend_addr("Backend-1.example:80").unwrap().host,
        "backend-1.example"
    );
    assert!(parse_backend_addr("host").is_err());
    assert!(parse_backend_addr("127.0.0.1:0").is_err());
    assert!(parse_backend_addr("-bad:80").is_err());
    assert_eq!(
        BackendAddr {
            host: "::1".into(),
            port: 443
        }
        .to_string(),
        "[::1]:443"
    );
}

#[test]
fn the_shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Err(e) = load(&path) {
                panic!("{e}");
            }
            n += 1;
        }
    }
    assert!(n >= 1, "no configs in {}", root.display());
}

const MINIMAL: &str = "listen: { address: 127.0.0.1, port: 9443 }\nbackends: [{ id: a, address: \"127.0.0.1:9001\" }]\n";

#[test]
fn admin_off_loopback_needs_a_token() {
    let open = format!("{MINIMAL}admin: {{ address: \"0.0.0.0:9901\" }}\n");
    has(&errors(&open), "admin.token", "is not loopback");
    let short = format!("{MINIMAL}admin: {{ address: \"0.0.0.0:9901\", token: abc }}\n");
    has(&errors(&short), "admin.token", "at least 16");
    let both = format!(
        "{MINIMAL}admin: {{ address: \"0.0.0.0:9901\", token: 0123456789abcdef, token_file: t }}\n"
    );
    has(&errors(&both), "admin.token_file", "not both");
    let good = ok(&format!(
        "{MINIMAL}admin: {{ address: \"0.0.0.0:9901\", token: 0123456789abcdef }}\n"
    ));
    assert_eq!(
        good.admin.unwrap().token.as_deref(),
        Some("0123456789abcdef")
    );
    let local = ok(&format!(
        "{MINIMAL}admin: {{ address: \"127.0.0.1:9901\" }}\n"
    ));
    assert_eq!(local.admin.unwrap().token, None);
    // A token file is read only as far as a token can reach: /dev/zero
    // gives a clear error instead of a hang.
    let endless =
        format!("{MINIMAL}admin: {{ address: \"127.0.0.1:9901\", token_file: /dev/zero }}\n");
    has(&errors(&endless), "admin.token", "printable");
}

#[test]
fn limits_and_rates_are_validated() {
    let bad = format!(
        "{MINIMAL}limits: {{ requests_per_ip: {{ per_second: 0 }}, handshakes: {{ per_second: 5, burst: 0 }}, max_connections_per_ip: 0, max_request_headers: 2 }}\n"
    );
    let errs = errors(&bad);
    has(&errs, "limits.requests_per_ip.per_second", "positive");
    has(&errs, "limits.handshakes.burst", "at least 1");
    has(&errs, "limits.max_connections_per_ip", "at least 1");
    has(&errs, "limits.max_request_headers", "at least 8");
    let route =
        format!("{MINIMAL}routes: [{{ upstream: default, rate_limit: {{ per_second: 2.5 }} }}]\n");
    let c = ok(&route);
    let rate = c.routes[0].rate_limit.unwrap();
    assert_eq!((rate.per_second, rate.burst), (2.5, 3.0));
    assert!(!c.listen.early_data);
    assert_eq!(c.limits.retry_threshold, 64);
}

#[test]
fn initials_per_source_is_an_xdp_limit() {
    let xdp = |rate: &str| {
        format!(
            "{MINIMAL}steering: {{ mode: xdp, interfaces: [lo], initials_per_source: {rate} }}\n"
        )
    };
    let c = ok(&xdp("{ per_second: 50, burst: 10 }"));
    let limit = c.steering.initials_per_source.unwrap();
    assert_eq!(limit.interval_ns, 20_000_000);
    assert_eq!(limit.burst_ns, 9 * 20_000_000);
    // Auto may become XDP at start-up; the default burst is a second's worth.
    let auto = ok(&format!(
        "{MINIMAL}steering: {{ initials_per_source: {{ per_second: 4 }} }}\n"
    ));
    assert_eq!(
        auto.steering.initials_per_source.unwrap().burst_ns,
        3 * 250_000_000
    );
    assert!(ok(MINIMAL).steering.initials_per_source.is_none());

    has(
        &errors(&xdp("{ per_second: 0 }")),
        "steering.initials_per_source.per_second",
        "positive",
    );
    has(
        &errors(&xdp("{ per_second: 5, burst: 0 }")),
        "steering.initials_per_source.burst",
        "at least 1",
    );
    has(
        &errors(&format!(
            "{MINIMAL}steering: {{ mode: reuseport, initials_per_source: {{ per_second: 5 }} }}\n"
        )),
        "steering.initials_per_source",
        "only the XDP program enforces it",
    );
}

#[test]
fn connection_lifetime_limits_are_validated() {
    let c = ok(MINIMAL);
    assert_eq!(c.limits.connection_idle_timeout, Duration::from_secs(75));
    assert_eq!(c.limits.max_connection_age, None);
    assert_eq!(c.limits.request_header_timeout, Duration::from_secs(10));
    let set = format!(
        "{MINIMAL}limits: {{ connection_idle_timeout_ms: 500, max_connection_age_ms: 3600000 }}\n"
    );
    let c = ok(&set);
    assert_eq!(c.limits.connection_idle_timeout, Duration::from_millis(500));
    assert_eq!(c.limits.max_connection_age, Some(Duration::from_secs(3600)));
    let zero = format!(
        "{MINIMAL}limits: {{ connection_idle_timeout_ms: 0, max_connection_age_ms: 0, request_header_timeout_ms: 0 }}\n"
    );
    let errs = errors(&zero);
    has(
        &errs,
        "limits.connection_idle_timeout_ms",
        "at least 1 millisecond (default 75000)",
    );
    has(
        &errs,
        "limits.max_connection_age_ms",
        "omit it for no maximum",
    );
    has(
        &errs,
        "limits.request_header_timeout_ms",
        "at least 1 millisecond",
    );
}

#[test]
fn http3_grease_is_off_unless_asked_for() {
    let c = ok(EXTENDED);
    assert!(!c.upstream("api").unwrap().grease, "default: off");
    let c = ok(&EXTENDED.replace(
        "    pool: { max_streams_per_connection: 50 }",
        "    pool: { max_streams_per_connection: 50 }\n    http3: { grease: true }",
    ));
    assert!(c.upstream("api").unwrap().grease);
    assert!(!c.upstream("web").unwrap().grease);
}

#[test]
fn http3_options_errors_name_the_field() {
    let yaml = EXTENDED.replace(
        "    pool: { max_streams_per_connection: 50 }",
        "    pool: { max_streams_per_connection: 50 }\n    http3: { grease: sometimes }",
    );
    let errs = errors(&yaml);
    assert_eq!(errs[0].path, "upstreams.api.http3.grease", "{errs:#?}");
    assert!(
        errs[0].message.contains("expected a boolean"),
        "{}",
        errs[0].message
    );
    let errs = errors(&EXTENDED.replace(
        "    pool: { max_streams_per_connection: 50 }",
        "    pool: { max_streams_per_connection: 50 }\n    http3: { greese: true }",
    ));
    assert_eq!(errs[0].path, "upstreams.api.http3.greese", "{errs:#?}");
    assert!(errs[0].message.contains("expected `grease`"), "{errs:#?}");
    // HTTP/3 options on an upstream that does not speak HTTP/3.
    let errs = errors(&EXTENDED.replace(
        "    backends: [{ id: w, address: \"[::1]:9000\" }]",
        "    protocol: http2\n    http3: { grease: true }\n    backends: [{ id: w, address: \"[::1]:9000\" }]",
    ));
    has(
        &errs,
        "upstreams.web.http3",
        "only valid with `protocol: http3`",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
}
