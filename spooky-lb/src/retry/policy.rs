//! Retry policy: the `retries` settings, which failures may be retried (and
//! only when it is safe to replay the request), and backoff with full
//! jitter (randomness is an input).

use std::fmt;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

/// Retry settings of one upstream (or route).
///
/// YAML: `{ attempts: 2, per_try_timeout_ms: 1000, retry_on: [connect_failure,
/// refused_stream, reset, timeout, 502, 503, 504], backoff: { base_ms: 25,
/// max_ms: 250 }, budget_percent: 20, min_retries_per_s: 10,
/// buffer_body_limit: 65536 }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first try (default 2, so at most 3 tries); 0 disables retries.
    pub attempts: u32,
    /// Timeout of each try in ms; a try that times out may be retried
    /// (`timeout` in `retry_on`). Default: none (only the request's overall
    /// timeout applies).
    pub per_try_timeout_ms: Option<u64>,
    /// Failures that may be retried (default `[connect_failure,
    /// refused_stream, reset, timeout, 502, 503, 504]`).
    pub retry_on: Vec<RetryOn>,
    pub backoff: BackoffConfig,
    /// Retries may add at most this percentage to the requests of the last
    /// ~10 s (default 20).
    pub budget_percent: u32,
    /// Retries always allowed regardless of traffic, per second, so that low
    /// traffic still gets retries (default 10).
    pub min_retries_per_s: u32,
    /// Request bodies up to this many bytes are buffered so the request can
    /// be replayed; larger bodies stream and make the request unretryable
    /// once sending started (default 65536).
    pub buffer_body_limit: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Reset,
                RetryOn::Timeout,
                RetryOn::Status(502),
                RetryOn::Status(503),
                RetryOn::Status(504),
            ],
            backoff: BackoffConfig::default(),
            budget_percent: 20,
            min_retries_per_s: 10,
            buffer_body_limit: 64 * 1024,
        }
    }
}

/// Exponential backoff with full jitter (`{ base_ms: 25, max_ms: 250 }`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// Cap of the first retry's delay, in ms (default 25).
    pub base_ms: u64,
    /// Cap of any retry's delay, in ms (default 250).
    pub max_ms: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base_ms: 25,
            max_ms: 250,
        }
    }
}

/// A retry condition in `retry_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// `connect_failure`: no connection could be made.
    ConnectFailure,
    /// `refused_stream`: HTTP/2 REFUSED_STREAM, HTTP/3 H3_REQUEST_REJECTED or
    /// a stream above a GOAWAY's last id: the backend guarantees it did not
    /// process the request.
    RefusedStream,
    /// `reset`: the connection or stream was reset before response headers.
    Reset,
    /// `timeout`: the per-try timeout expired before response headers.
    Timeout,
    /// `5xx`: any 5xx status.
    Any5xx,
    /// `gateway_error`: 502, 503 or 504.
    GatewayError,
    /// A status code, written `503` or `"503"`.
    Status(u16),
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect_failure"),
            Self::RefusedStream => f.write_str("refused_stream"),
            Self::Reset => f.write_str("reset"),
            Self::Timeout => f.write_str("timeout"),
            Self::Any5xx => f.write_str("5xx"),
            Self::GatewayError => f.write_str("gateway_error"),
            Self::Status(c) => write!(f, "{c}"),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u16),
            Text(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Code(c) => Self::Status(c),
            Raw::Text(t) => match t.as_str() {
                "connect_failure" | "connect-failure" => Self::ConnectFailure,
                "refused_stream" | "refused-stream" => Self::RefusedStream,
                "reset" => Self::Reset,
                "timeout" => Self::Timeout,
                "5xx" => Self::Any5xx,
                "gateway_error" | "gateway-error" => Self::GatewayError,
                other => match other.parse::<u16>() {
                    Ok(c) => Self::Status(c),
                    Err(_) => {
                        return Err(serde::de::Error::custom(format!(
                            "unknown retry condition `{other}`; use connect_failure, refused_stream, \
                             reset, timeout, 5xx, gateway_error or a status code such as 503"
                        )));
                    }
                },
            },
        })
    }
}

/// How far the request body has gone, which decides whether the request
/// can be replayed to another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    /// No body byte has been sent to the backend yet (or there is no body):
    /// the body, if any, is still entirely available.
    NotStarted,
    /// The whole body is buffered (it fit `buffer_body_limit`) and can be
    /// sent again.
    FullyBuffered,
    /// Body bytes were streamed to the backend without being kept: the
    /// request cannot be replayed.
    Streaming,
}

/// Why a try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection could be made: the backend never saw the request.
    ConnectFailure,
    /// The backend refused the stream without processing it (REFUSED_STREAM,
    /// H3_REQUEST_REJECTED, beyond GOAWAY): it never saw the request either.
    Refused,
    /// The connection or stream was reset before the response headers.
    ResetBeforeHeaders,
    /// Response headers with this status arrived.
    Status(u16),
    /// The per-try timeout expired before response headers.
    Timeout,
}

impl RetryConfig {
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.per_try_timeout_ms.map(Duration::from_millis)
    }

    /// Is `failure` listed in `retry_on`?
    pub fn retries_on(&self, failure: FailureKind) -> bool {
        self.retry_on.iter().any(|r| match (r, failure) {
            (RetryOn::ConnectFailure, FailureKind::ConnectFailure) => true,
            (RetryOn::RefusedStream, FailureKind::Refused) => true,
            (RetryOn::Reset, FailureKind::ResetBeforeHeaders) => true,
            (RetryOn::Timeout, FailureKind::Timeout) => true,
            (RetryOn::Any5xx, FailureKind::Status(s)) => (500..=599).contains(&s),
            (RetryOn::GatewayError, FailureKind::Status(s)) => matches!(s, 502..=504),
            (RetryOn::Status(c), FailureKind::Status(s)) => *c == s,
            _ => false,
        })
    }

    /// Delay before retry number `attempt` (1 for the first retry): full
    /// jitter, uniform in `[0, min(max_ms, base_ms × 2^(attempt−1))]`
    /// (AWS's "full jitter", which spreads synchronized retries best).
    pub fn backoff<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let BackoffConfig { base_ms, max_ms } = self.backoff;
        let factor = 1u64
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u64::MAX);
        let cap = base_ms.saturating_mul(factor).min(max_ms.max(base_ms));
        Duration::from_millis(rng.random_range(0..=cap))
    }

    /// Every problem as (field path, what would be valid).
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let mut err = |field: String, msg: String| errs.push((format!("{path}.{field}"), msg));
        if self.attempts > 10 {
            err(
                "attempts".into(),
                format!("{} retries is too many; use 0 to 10", self.attempts),
            );
        }
        if self.per_try_timeout_ms == Some(0) {
            err(
                "per_try_timeout_ms".into(),
                "must be at least 1 ms, or omitted for no per-try timeout".into(),
            );
        }
        for (i, r) in self.retry_on.iter().enumerate() {
            if let RetryOn::Status(c) = r
                && !(100..=599).contains(c)
            {
                err(
                    format!("retry_on[{i}]"),
                    format!("{c} is not an HTTP status; use 100 to 599, e.g. 503"),
                );
            }
        }
        if self.backoff.max_ms < self.backoff.base_ms {
            err(
                "backoff.max_ms".into(),
                format!(
                    "must be at least backoff.base_ms ({} ms)",
                    self.backoff.base_ms
                ),
            );
        }
        if self.budget_percent > 100 {
            err(
                "budget_percent".into(),
                format!("{} is not a percentage; use 0 to 100", self.budget_percent),
            );
        }
        if self.buffer_body_limit > 64 * 1024 * 1024 {
            err(
                "buffer_body_limit".into(),
                "must be at most 67108864 bytes (64 MiB)".into(),
            );
        }
        errs
    }
}

/// RFC 9110 §9.2.2 idempotent methods: GET, HEAD, OPTIONS, PUT, DELETE, TRACE.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// May this failed try be retried on another backend? True when all hold:
///
/// * `failure` is listed in `retry_on`;
/// * the request can be replayed: its body was not started or is fully
///   buffered (never when body bytes were streamed and dropped);
/// * replaying is safe: the method is idempotent, **or** the backend
///   provably never processed the request (connect failure, refused
///   stream). A non-idempotent request (POST, PATCH) that reached the
///   backend is never retried, whatever the body state: a reset or a 503
///   after the backend read the request does not prove it did not act.
///
/// The caller also checks the attempt count and the
/// [`RetryBudget`](super::RetryBudget).
pub fn retry_allowed(
    method: &http::Method,
    body_state: BodyState,
    failure: FailureKind,
    cfg: &RetryConfig,
) -> bool {
    if cfg.attempts == 0 || !cfg.retries_on(failure) || body_state == BodyState::Streaming {
        return false;
    }
    is_idempotent(method) || matches!(failure, FailureKind::ConnectFailure | FailureKind::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn yaml_defaults_and_validation() {
        let c: RetryConfig =
            serde_yaml::from_str("{ attempts: 3, retry_on: [connect_failure, reset, \"503\", 504, 5xx], per_try_timeout_ms: 500 }").unwrap();
        assert_eq!(c.attempts, 3);
        assert_eq!(
            c.retry_on,
            [
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::Status(503),
                RetryOn::Status(504),
                RetryOn::Any5xx
            ]
        );
        assert_eq!(c.per_try_timeout(), Some(Duration::from_millis(500)));
        assert_eq!(
            c.backoff,
            BackoffConfig {
                base_ms: 25,
                max_ms: 250
            }
        );
        assert_eq!(
            (c.budget_percent, c.min_retries_per_s, c.buffer_body_limit),
            (20, 10, 65536)
        );
        assert!(c.validate("r").is_empty());
        let e = serde_yaml::from_str::<RetryConfig>("{ retry_on: [conect_failure] }").unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown retry condition `conect_failure`"),
            "{e}"
        );
        assert!(serde_yaml::from_str::<RetryConfig>("{ retries: 3 }").is_err());

        let bad = RetryConfig {
            attempts: 11,
            per_try_timeout_ms: Some(0),
            retry_on: vec![RetryOn::Reset, RetryOn::Status(700)],
            backoff: BackoffConfig {
                base_ms: 100,
                max_ms: 10,
            },
            budget_percent: 200,
            ..RetryConfig::default()
        };
        let fields: Vec<String> = bad
            .validate("upstreams.api.retries")
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            fields,
            [
                "upstreams.api.retries.attempts",
                "upstreams.api.retries.per_try_timeout_ms",
                "upstreams.api.retries.retry_on[1]",
                "upstreams.api.retries.backoff.max_ms",
                "upstreams.api.retries.budget_percent",
            ]
        );
    }

    #[test]
    fn safety_rules() {
        let c = RetryConfig::default();
        use BodyState::*;
        use FailureKind::*;
        // Idempotent: retried on every listed failure while replayable.
        for f in [
            ConnectFailure,
            Refused,
            ResetBeforeHeaders,
            Timeout,
            Status(502),
            Status(503),
            Status(504),
        ] {
            assert!(retry_allowed(&Method::GET, NotStarted, f, &c), "{f:?}");
            assert!(retry_allowed(&Method::PUT, FullyBuffered, f, &c), "{f:?}");
            assert!(!retry_allowed(&Method::PUT, Streaming, f, &c), "{f:?}");
        }
        // Not listed.
        assert!(!retry_allowed(&Method::GET, NotStarted, Status(500), &c));
        // Non-idempotent: only when the backend never saw the request.
        assert!(retry_allowed(&Method::POST, NotStarted, ConnectFailure, &c));
        assert!(retry_allowed(&Method::POST, FullyBuffered, Refused, &c));
        assert!(!retry_allowed(
            &Method::POST,
            FullyBuffered,
            ResetBeforeHeaders,
            &c
        ));
        assert!(!retry_allowed(&Method::POST, NotStarted, Status(503), &c));
        assert!(!retry_allowed(&Method::PATCH, NotStarted, Timeout, &c));
        assert!(!retry_allowed(&Method::POST, Streaming, ConnectFailure, &c));
        // Disabled.
        let off = RetryConfig {
            attempts: 0,
            ..RetryConfig::default()
        };
        assert!(!retry_allowed(
            &Method::GET,
            NotStarted,
            ConnectFailure,
            &off
        ));
        // Classes.
        let classes = RetryConfig {
            retry_on: vec![RetryOn::Any5xx],
            ..RetryConfig::default()
        };
        assert!(classes.retries_on(Status(500)) && !classes.retries_on(Status(429)));
        let gw = RetryConfig {
            retry_on: vec![RetryOn::GatewayError],
            ..RetryConfig::default()
        };
        assert!(gw.retries_on(Status(503)) && !gw.retries_on(Status(500)));
    }

    proptest! {
        #[test]
        fn backoff_is_full_jitter_within_cap(attempt in 1u32..40, seed in any::<u64>()) {
            let c = RetryConfig::default();
            let mut rng = SmallRng::seed_from_u64(seed);
            let cap = (25u64 << (attempt - 1).min(20)).min(250);
            for _ in 0..50 {
                let d = c.backoff(attempt, &mut rng).as_millis() as u64;
                prop_assert!(d <= cap);
            }
        }
    }
}
