//! The `balancing` block of an upstream: serde model (with the original
//! spooky names as aliases), validation with field paths, and the factory
//! that builds a per-worker [`Balance`] instance from it.

use std::time::Duration;

use serde::Deserialize;

use super::hash::is_token;
use super::{
    Balance, ConsistentHash, DEFAULT_EWMA_DECAY, LeastConnections, P2cEwma, Random, RoundRobin,
    StickyCookie, WeightedRoundRobin,
};

/// Load-balancing algorithm of an upstream. YAML, internally tagged by
/// `type`:
///
/// ```yaml
/// balancing: { type: random }                 # weight-proportional random
/// balancing: { type: round_robin }            # alias: round-robin
/// balancing: { type: weighted_round_robin }   # smooth (nginx); alias: weight-based
/// balancing: { type: least_connections }      # alias: least-connection
/// balancing: { type: p2c_ewma, decay_ms: 10000 }
/// balancing: { type: consistent_hash, key: { source: header, name: x-user-id } }
/// balancing: { type: ip-hash }                # = consistent_hash on client_ip
/// balancing: { type: sticky_cookie, cookie: spooky_sticky, ttl_s: 86400,
///              fallback: { type: least_connections }, secret: "…" }
/// ```
///
/// Unknown fields are rejected. Default: `round_robin` (as Envoy and nginx).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(from = "RawBalancing")]
pub enum BalancingConfig {
    Random,
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    /// `decay_ms`: time constant of the latency EWMA (default 10000).
    P2cEwma {
        decay_ms: u64,
    },
    ConsistentHash {
        key: HashKey,
    },
    StickyCookie(StickyCookieConfig),
}

/// Where `consistent_hash` takes its key from:
/// `{ source: client_ip }`, `{ source: header, name: x-user-id }`,
/// `{ source: cookie, name: session }`, `{ source: path }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawHashKey")]
pub enum HashKey {
    ClientIp,
    Header { name: String },
    Cookie { name: String },
    Path,
}

/// `sticky_cookie` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyCookieConfig {
    /// Cookie name (default `spooky_sticky`).
    pub cookie: String,
    /// Cookie lifetime (`Max-Age`) in seconds; absent = session cookie.
    pub ttl_s: Option<u64>,
    /// Algorithm for requests without a usable cookie (default
    /// `least_connections`: new sessions go where the load is lowest, which
    /// offsets the imbalance that pinned sessions build up).
    pub fallback: Box<BalancingConfig>,
    /// HMAC secret (≥ 16 bytes) shared by all spooky instances so that they
    /// honour each other's cookies; absent = random per process.
    pub secret: Option<String>,
}

impl Default for StickyCookieConfig {
    fn default() -> Self {
        Self {
            cookie: "spooky_sticky".to_owned(),
            ttl_s: None,
            fallback: Box::new(BalancingConfig::LeastConnections),
            secret: None,
        }
    }
}

const DEFAULT_DECAY_MS: u64 = 10_000;

fn default_decay_ms() -> u64 {
    DEFAULT_DECAY_MS
}

fn default_cookie() -> String {
    StickyCookieConfig::default().cookie
}

/// The wire format. Every variant is a struct variant, even the empty ones,
/// so that `deny_unknown_fields` applies to all of them.
#[derive(Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum RawBalancing {
    #[serde(rename = "random")]
    Random {},
    #[serde(rename = "round_robin", alias = "round-robin")]
    RoundRobin {},
    #[serde(rename = "weighted_round_robin", alias = "weight-based")]
    WeightedRoundRobin {},
    #[serde(rename = "least_connections", alias = "least-connection")]
    LeastConnections {},
    #[serde(rename = "p2c_ewma")]
    P2cEwma {
        #[serde(default = "default_decay_ms")]
        decay_ms: u64,
    },
    #[serde(rename = "consistent_hash")]
    ConsistentHash { key: HashKey },
    /// The original spooky name.
    #[serde(rename = "ip-hash")]
    IpHash {},
    #[serde(rename = "sticky_cookie")]
    StickyCookie {
        #[serde(default = "default_cookie")]
        cookie: String,
        #[serde(default)]
        ttl_s: Option<u64>,
        #[serde(default)]
        fallback: Option<Box<BalancingConfig>>,
        #[serde(default)]
        secret: Option<String>,
    },
}

impl From<RawBalancing> for BalancingConfig {
    fn from(raw: RawBalancing) -> Self {
        match raw {
            RawBalancing::Random {} => Self::Random,
            RawBalancing::RoundRobin {} => Self::RoundRobin,
            RawBalancing::WeightedRoundRobin {} => Self::WeightedRoundRobin,
            RawBalancing::LeastConnections {} => Self::LeastConnections,
            RawBalancing::P2cEwma { decay_ms } => Self::P2cEwma { decay_ms },
            RawBalancing::ConsistentHash { key } => Self::ConsistentHash { key },
            RawBalancing::IpHash {} => Self::ConsistentHash {
                key: HashKey::ClientIp,
            },
            RawBalancing::StickyCookie {
                cookie,
                ttl_s,
                fallback,
                secret,
            } => Self::StickyCookie(StickyCookieConfig {
                cookie,
                ttl_s,
                fallback: fallback.unwrap_or_else(|| StickyCookieConfig::default().fallback),
                secret,
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
enum RawHashKey {
    ClientIp {},
    Header { name: String },
    Cookie { name: String },
    Path {},
}

impl From<RawHashKey> for HashKey {
    fn from(raw: RawHashKey) -> Self {
        match raw {
            RawHashKey::ClientIp {} => Self::ClientIp,
            RawHashKey::Header { name } => Self::Header { name },
            RawHashKey::Cookie { name } => Self::Cookie { name },
            RawHashKey::Path {} => Self::Path,
        }
    }
}

impl BalancingConfig {
    /// The config name of the algorithm.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted_round_robin",
            Self::LeastConnections => "least_connections",
            Self::P2cEwma { .. } => "p2c_ewma",
            Self::ConsistentHash { .. } => "consistent_hash",
            Self::StickyCookie(_) => "sticky_cookie",
        }
    }

    /// EWMA time constant for the pool's `BackendStats::with_decay`: the
    /// configured `decay_ms` for `p2c_ewma` (also as a sticky fallback),
    /// 10 s otherwise.
    pub fn ewma_decay(&self) -> Duration {
        match self {
            Self::P2cEwma { decay_ms } => Duration::from_millis(*decay_ms),
            Self::StickyCookie(s) => s.fallback.ewma_decay(),
            _ => DEFAULT_EWMA_DECAY,
        }
    }
}

/// Build one worker's balancer instance.
pub fn build(cfg: &BalancingConfig) -> Box<dyn Balance> {
    match cfg {
        BalancingConfig::Random => Box::new(Random::new()),
        BalancingConfig::RoundRobin => Box::new(RoundRobin::new()),
        BalancingConfig::WeightedRoundRobin => Box::new(WeightedRoundRobin::new()),
        BalancingConfig::LeastConnections => Box::new(LeastConnections::new()),
        BalancingConfig::P2cEwma { .. } => Box::new(P2cEwma::new()),
        BalancingConfig::ConsistentHash { key } => Box::new(ConsistentHash::new(key)),
        BalancingConfig::StickyCookie(s) => Box::new(StickyCookie::new(s)),
    }
}

/// Every problem in `cfg` as (field path, what would be valid), `path`
/// being the path of the balancing block, e.g. `upstreams.api.balancing`.
pub fn validate(cfg: &BalancingConfig, path: &str) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    match cfg {
        BalancingConfig::P2cEwma { decay_ms } => {
            if !(1..=3_600_000).contains(decay_ms) {
                errs.push((
                    format!("{path}.decay_ms"),
                    format!("{decay_ms} is out of range; use 1 to 3600000 ms (default 10000)"),
                ));
            }
        }
        BalancingConfig::ConsistentHash { key } => match key {
            HashKey::Header { name } => {
                if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    errs.push((
                        format!("{path}.key.name"),
                        format!("`{name}` is not a valid header name; use e.g. `x-user-id`"),
                    ));
                }
            }
            HashKey::Cookie { name } => {
                if !is_token(name) {
                    errs.push((
                        format!("{path}.key.name"),
                        format!("`{name}` is not a valid cookie name; use letters, digits and `-_.` e.g. `session`"),
                    ));
                }
            }
            HashKey::ClientIp | HashKey::Path => {}
        },
        BalancingConfig::StickyCookie(s) => {
            if !is_token(&s.cookie) {
                errs.push((
                    format!("{path}.cookie"),
                    format!("`{}` is not a valid cookie name; use letters, digits and `-_.` e.g. `spooky_sticky`", s.cookie),
                ));
            }
            if s.ttl_s == Some(0) {
                errs.push((
                    format!("{path}.ttl_s"),
                    "must be at least 1 s, or omitted for a session cookie".to_owned(),
                ));
            }
            if let Some(secret) = &s.secret
                && secret.len() < 16
            {
                errs.push((
                    format!("{path}.secret"),
                    format!("is {} bytes; use at least 16 random bytes", secret.len()),
                ));
            }
            if matches!(*s.fallback, BalancingConfig::StickyCookie(_)) {
                errs.push((
                    format!("{path}.fallback.type"),
                    "sticky_cookie cannot be its own fallback; use random, round_robin, weighted_round_robin, \
                     least_connections, p2c_ewma or consistent_hash"
                        .to_owned(),
                ));
            } else {
                errs.extend(validate(&s.fallback, &format!("{path}.fallback")));
            }
        }
        BalancingConfig::Random
        | BalancingConfig::RoundRobin
        | BalancingConfig::WeightedRoundRobin
        | BalancingConfig::LeastConnections => {}
    }
    errs
}

/// A backend's weight must be at least 1 (`path` is the weight's field
/// path, e.g. `upstreams.api.backends[2].weight`). Weights are relative;
/// there is no upper bound beyond `u32`.
pub fn validate_weight(weight: u32, path: &str) -> Vec<(String, String)> {
    if weight == 0 {
        vec![(
            path.to_owned(),
            "must be at least 1 (weights are relative; to stop traffic to a backend, remove it)"
                .to_owned(),
        )]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::testutil::*;

    fn parse(y: &str) -> Result<BalancingConfig, serde_yaml::Error> {
        serde_yaml::from_str(y)
    }

    #[test]
    fn names_and_aliases() {
        let cases = [
            ("{ type: random }", BalancingConfig::Random),
            ("{ type: round_robin }", BalancingConfig::RoundRobin),
            ("{ type: round-robin }", BalancingConfig::RoundRobin),
            (
                "{ type: weighted_round_robin }",
                BalancingConfig::WeightedRoundRobin,
            ),
            (
                "{ type: weight-based }",
                BalancingConfig::WeightedRoundRobin,
            ),
            (
                "{ type: least_connections }",
                BalancingConfig::LeastConnections,
            ),
            (
                "{ type: least-connection }",
                BalancingConfig::LeastConnections,
            ),
            (
                "{ type: p2c_ewma }",
                BalancingConfig::P2cEwma { decay_ms: 10_000 },
            ),
            (
                "{ type: p2c_ewma, decay_ms: 5000 }",
                BalancingConfig::P2cEwma { decay_ms: 5000 },
            ),
            (
                "{ type: ip-hash }",
                BalancingConfig::ConsistentHash {
                    key: HashKey::ClientIp,
                },
            ),
            (
                "{ type: consistent_hash, key: { source: client_ip } }",
                BalancingConfig::ConsistentHash {
                    key: HashKey::ClientIp,
                },
            ),
            (
                "{ type: consistent_hash, key: { source: header, name: x-user } }",
                BalancingConfig::ConsistentHash {
                    key: HashKey::Header {
                        name: "x-user".into(),
                    },
                },
            ),
            (
                "{ type: consistent_hash, key: { source: cookie, name: sid } }",
                BalancingConfig::ConsistentHash {
                    key: HashKey::Cookie { name: "sid".into() },
                },
            ),
            (
                "{ type: consistent_hash, key: { source: path } }",
                BalancingConfig::ConsistentHash { key: HashKey::Path },
            ),
            (
                "{ type: sticky_cookie }",
                BalancingConfig::StickyCookie(StickyCookieConfig::default()),
            ),
            (
                "{ type: sticky_cookie, cookie: lb, ttl_s: 60, fallback: { type: p2c_ewma, decay_ms: 2000 }, secret: 0123456789abcdef }",
                BalancingConfig::StickyCookie(StickyCookieConfig {
                    cookie: "lb".into(),
                    ttl_s: Some(60),
                    fallback: Box::new(BalancingConfig::P2cEwma { decay_ms: 2000 }),
                    secret: Some("0123456789abcdef".into()),
                }),
            ),
        ];
        for (yaml, want) in cases {
            let got = parse(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(got, want, "{yaml}");
            assert!(
                validate(&got, "upstreams.api.balancing").is_empty(),
                "{yaml}"
            );
            let b = build(&got);
            assert_eq!(b.name(), got.name());
        }
        assert_eq!(
            parse("{ type: sticky_cookie, fallback: { type: p2c_ewma, decay_ms: 2000 } }")
                .unwrap()
                .ewma_decay(),
            Duration::from_millis(2000)
        );
        // The original spooky file's block.
        #[derive(Deserialize)]
        struct Original {
            load_balancing: BalancingConfig,
        }
        let o: Original = serde_yaml::from_str("load_balancing: { type: random }\n").unwrap();
        assert_eq!(o.load_balancing, BalancingConfig::Random);
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        for bad in [
            "{ type: random, decay_ms: 5 }",
            "{ type: round-robin, weight: 1 }",
            "{ type: ip-hash, key: { source: path } }",
            "{ type: p2c_ewma, decay: 10s }",
            "{ type: consistent_hash }",
            "{ type: consistent_hash, key: { source: client_ip, name: x } }",
            "{ type: consistent_hash, key: { source: header } }",
            "{ type: consistent_hash, key: { source: query, name: x } }",
            "{ type: sticky_cookie, cookie_name: x }",
            "{ type: fastest }",
            "{ }",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
        let e = parse("{ type: fastest }").unwrap_err().to_string();
        assert!(e.contains("round_robin") && e.contains("p2c_ewma"), "{e}");
    }

    #[test]
    fn validation_paths() {
        let p = "upstreams.api.balancing";
        let cases: [(&str, &[&str]); 6] = [
            (
                "{ type: p2c_ewma, decay_ms: 0 }",
                &["upstreams.api.balancing.decay_ms"],
            ),
            (
                "{ type: consistent_hash, key: { source: header, name: \"bad header\" } }",
                &["upstreams.api.balancing.key.name"],
            ),
            (
                "{ type: consistent_hash, key: { source: cookie, name: \"a;b\" } }",
                &["upstreams.api.balancing.key.name"],
            ),
            (
                "{ type: sticky_cookie, cookie: \"a b\", ttl_s: 0, secret: short }",
                &[
                    "upstreams.api.balancing.cookie",
                    "upstreams.api.balancing.ttl_s",
                    "upstreams.api.balancing.secret",
                ],
            ),
            (
                "{ type: sticky_cookie, fallback: { type: sticky_cookie } }",
                &["upstreams.api.balancing.fallback.type"],
            ),
            (
                "{ type: sticky_cookie, fallback: { type: p2c_ewma, decay_ms: 0 } }",
                &["upstreams.api.balancing.fallback.decay_ms"],
            ),
        ];
        for (yaml, want) in cases {
            let errs = validate(&parse(yaml).unwrap(), p);
            let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
            assert_eq!(fields, want, "{yaml}: {errs:?}");
            assert!(errs.iter().all(|(_, m)| !m.is_empty()));
        }
    }

    #[test]
    fn zero_weight_rejected() {
        assert_eq!(
            validate_weight(0, "upstreams.api.backends[1].weight")[0].0,
            "upstreams.api.backends[1].weight"
        );
        assert!(validate_weight(1, "w").is_empty());
        // At run time a 0 that slipped through behaves as 1.
        let s = stats(2);
        let v = views(&s, &[0, 1]);
        let h = http::HeaderMap::new();
        let mut b = WeightedRoundRobin::unshifted();
        let picks: Vec<usize> = (0..4)
            .map(|_| b.pick(&v, &req(&h), &[], Instant::now()).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 2);
    }
}
