//! `sticky_cookie`: session affinity by a cookie that spooky sets. The
//! cookie value is an opaque token, HMAC-SHA256(secret, backend id)
//! truncated to 128 bits: clients learn nothing about backend ids and cannot
//! forge a token for a backend they were not sent to. A request whose token
//! names an eligible backend goes there; otherwise (no cookie, unknown
//! token, backend gone, ineligible, or already tried by this request) the
//! fallback algorithm picks, and the response re-issues the cookie.
//!
//! Proxy protocol: `pick` as usual; then, for the response of the backend
//! that actually answered, `set_cookie(backends, served, req)` returns the
//! `Set-Cookie` value to add, or `None` when the client's cookie already
//! names that backend.
//!
//! Secret: `secret` from the config, so that all spooky instances and
//! restarts accept each other's cookies; without one, a random per-process
//! secret (shared by all workers), so cookies are valid until restart.

use std::time::Instant;

use std::fmt::Write as _;
use std::sync::OnceLock;

use rand::RngCore;
use ring::hmac;

use super::hash::find_cookie;
use super::{BackendView, Balance, Candidates, RequestInfo, StickyCookieConfig, build};

/// Domain separation, and a version in case the token format changes.
const TOKEN_CONTEXT: &[u8] = b"spooky-sticky-v1:";

fn process_secret() -> &'static [u8; 32] {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut s = [0u8; 32];
        // ThreadRng is a CSPRNG seeded from the OS.
        rand::rng().fill_bytes(&mut s);
        s
    })
}

pub struct StickyCookie {
    cookie: String,
    /// `; Path=/; Max-Age=…; HttpOnly; Secure; SameSite=Lax`.
    attributes: String,
    key: hmac::Key,
    fallback: Box<dyn Balance>,
    /// Token of each backend index, recomputed when the ids change.
    tokens: Vec<(Box<str>, String)>,
}

impl StickyCookie {
    pub fn new(cfg: &StickyCookieConfig) -> Self {
        Self::with_fallback(cfg, build(&cfg.fallback))
    }

    /// With an explicit fallback instance (tests, or a seeded fallback).
    pub fn with_fallback(cfg: &StickyCookieConfig, fallback: Box<dyn Balance>) -> Self {
        let secret: &[u8] = match &cfg.secret {
            Some(s) => s.as_bytes(),
            None => process_secret(),
        };
        // Secure: spooky serves HTTPS only (HTTP/3, and TLS on TCP).
        // SameSite=Lax: affinity survives top-level navigation from other
        // sites; HttpOnly: scripts have no business with it.
        let mut attributes = String::from("; Path=/");
        if let Some(ttl) = cfg.ttl_s {
            let _ = write!(attributes, "; Max-Age={ttl}");
        }
        attributes.push_str("; HttpOnly; Secure; SameSite=Lax");
        Self {
            cookie: cfg.cookie.clone(),
            attributes,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            fallback,
            tokens: Vec::new(),
        }
    }

    /// The cookie value naming backend `id`: 32 lowercase hex digits.
    pub fn token(&self, id: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(TOKEN_CONTEXT);
        ctx.update(id.as_bytes());
        let tag = ctx.sign();
        let mut out = String::with_capacity(32);
        for b in tag.as_ref().iter().take(16) {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    fn refresh_tokens(&mut self, backends: &[BackendView<'_>]) {
        let fresh = self.tokens.len() == backends.len()
            && self
                .tokens
                .iter()
                .zip(backends)
                .all(|((id, _), b)| &**id == b.id);
        if !fresh {
            self.tokens = backends
                .iter()
                .map(|b| (Box::from(b.id), self.token(b.id)))
                .collect();
        }
    }

    /// The backend named by the request's cookie, if any and known.
    fn cookie_backend(
        &mut self,
        backends: &[BackendView<'_>],
        req: &RequestInfo<'_>,
    ) -> Option<usize> {
        let token = find_cookie(req.headers, &self.cookie)?;
        self.refresh_tokens(backends);
        self.tokens.iter().position(|(_, t)| t == token)
    }
}

impl Balance for StickyCookie {
    fn pick(
        &mut self,
        backends: &[BackendView<'_>],
        req: &RequestInfo<'_>,
        exclude: &[usize],
        now: Instant,
    ) -> Option<usize> {
        let c = Candidates::new(backends, exclude)?;
        if let Some(i) = self.cookie_backend(backends, req)
            && c.allows(i, &backends[i])
        {
            return Some(i);
        }
        self.fallback.pick(backends, req, exclude, now)
    }

    fn set_cookie(
        &self,
        backends: &[BackendView<'_>],
        served: usize,
        req: &RequestInfo<'_>,
    ) -> Option<http::HeaderValue> {
        let id = backends.get(served)?.id;
        let token = match self.tokens.get(served) {
            Some((cached_id, t)) if &**cached_id == id => t.clone(),
            _ => self.token(id),
        };
        if find_cookie(req.headers, &self.cookie) == Some(token.as_str()) {
            return None;
        }
        http::HeaderValue::try_from(format!("{}={}{}", self.cookie, token, self.attributes)).ok()
    }

    fn name(&self) -> &'static str {
        "sticky_cookie"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::testutil::*;
    use crate::balancer::{BalancingConfig, RoundRobin};
    use http::{HeaderMap, HeaderValue};

    fn cfg() -> StickyCookieConfig {
        StickyCookieConfig {
            cookie: "lb".into(),
            ttl_s: Some(3600),
            fallback: Box::new(BalancingConfig::RoundRobin),
            secret: Some("0123456789abcdef-test-secret".into()),
        }
    }

    fn with_cookie(set_cookie: &HeaderValue) -> HeaderMap {
        let pair = set_cookie
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("x=1; {pair}")).unwrap(),
        );
        h
    }

    #[test]
    fn contract() {
        check_contract(|| Box::new(StickyCookie::new(&cfg())));
    }

    #[test]
    fn sticks_then_falls_back_and_reissues() {
        let s = stats(3);
        let mut v = views(&s, &[1, 1, 1]);
        let mut b = StickyCookie::with_fallback(&cfg(), Box::new(RoundRobin::starting_at(1)));
        // First visit: fallback picks, cookie issued.
        let empty = HeaderMap::new();
        let first = b.pick(&v, &req(&empty), &[], Instant::now()).unwrap();
        assert_eq!(first, 1);
        let set = b.set_cookie(&v, first, &req(&empty)).unwrap();
        let s_str = set.to_str().unwrap();
        assert!(s_str.starts_with("lb="), "{s_str}");
        assert!(
            s_str.ends_with("; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Lax"),
            "{s_str}"
        );
        assert!(!s_str.contains("b1"), "token must be opaque: {s_str}");
        // Later visits stick, and no cookie is re-sent.
        let h = with_cookie(&set);
        for _ in 0..10 {
            assert_eq!(b.pick(&v, &req(&h), &[], Instant::now()), Some(1));
            assert_eq!(b.set_cookie(&v, 1, &req(&h)), None);
        }
        // Retry: the sticky backend was tried, go elsewhere and re-pin.
        let retry = b.pick(&v, &req(&h), &[1], Instant::now()).unwrap();
        assert_ne!(retry, 1);
        assert!(b.set_cookie(&v, retry, &req(&h)).is_some());
        // Backend becomes ineligible: fallback and a new cookie.
        v[1].eligible = false;
        let moved = b.pick(&v, &req(&h), &[], Instant::now()).unwrap();
        assert_ne!(moved, 1);
        let reissued = b.set_cookie(&v, moved, &req(&h)).unwrap();
        assert_ne!(reissued, set);
        assert_eq!(
            b.pick(&v, &req(&with_cookie(&reissued)), &[], Instant::now()),
            Some(moved)
        );
        // Backend gone from the pool (ids change): unknown token, fallback.
        let s2 = stats(2);
        let v2 = vec![
            BackendView {
                id: "b0",
                weight: 1,
                stats: &s2[0],
                eligible: true,
            },
            BackendView {
                id: "b2",
                weight: 1,
                stats: &s2[1],
                eligible: true,
            },
        ];
        assert!(b.pick(&v2, &req(&h), &[], Instant::now()).is_some());
        // Garbage cookie: fallback.
        let mut g = HeaderMap::new();
        g.insert(http::header::COOKIE, HeaderValue::from_static("lb=zzzz"));
        assert!(b.pick(&v, &req(&g), &[], Instant::now()).is_some());
    }

    #[test]
    fn tokens_depend_on_secret_and_id() {
        let a = StickyCookie::new(&cfg());
        let b = StickyCookie::new(&StickyCookieConfig {
            secret: Some("another-secret-of-16+".into()),
            ..cfg()
        });
        assert_eq!(a.token("b1"), StickyCookie::new(&cfg()).token("b1"));
        assert_ne!(a.token("b1"), a.token("b2"));
        assert_ne!(a.token("b1"), b.token("b1"));
        assert_eq!(a.token("b1").len(), 32);
        // Without a configured secret: one secret per process, shared by all
        // workers' instances.
        let p = StickyCookieConfig {
            secret: None,
            ..cfg()
        };
        assert_eq!(
            StickyCookie::new(&p).token("b1"),
            StickyCookie::new(&p).token("b1")
        );
        // Session cookie without ttl.
        let s = stats(1);
        let v = views(&s, &[1]);
        let sess = StickyCookie::new(&StickyCookieConfig {
            ttl_s: None,
            ..cfg()
        });
        let h = HeaderMap::new();
        let set = sess.set_cookie(&v, 0, &req(&h)).unwrap();
        assert!(!set.to_str().unwrap().contains("Max-Age"));
    }
}
