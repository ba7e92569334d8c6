//! Request routing: match a request's host, path and headers against the
//! configured routes (first match wins) to find its upstream.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};

/// How a route matches the request host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    /// `example.com`
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any subdomain, not the
    /// apex.
    Suffix(String),
}

/// The conditions of one route; all must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl RouteMatch {
    /// Matches every request.
    pub fn any() -> Self {
        Self {
            host: None,
            path_prefix: None,
            headers: Vec::new(),
        }
    }

    /// Builds a matcher; errors name the field (`host`, `path_prefix`,
    /// `headers.NAME`) and say what is valid.
    pub fn new(
        host: Option<&str>,
        path_prefix: Option<&str>,
        headers: &BTreeMap<String, String>,
    ) -> Result<Self, (String, String)> {
        let host = match host {
            None => None,
            Some(h) => {
                let h = h.trim().to_ascii_lowercase();
                let (wild, name) = match h.strip_prefix("*.") {
                    Some(rest) => (true, rest.to_owned()),
                    None => (false, h.clone()),
                };
                let ok = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                    && !name.starts_with('.')
                    && !name.ends_with('.');
                if !ok {
                    return Err((
                        "host".into(),
                        format!("`{h}` is not a host name: use `example.com` or `*.example.com`"),
                    ));
                }
                Some(if wild {
                    HostMatch::Suffix(format!(".{name}"))
                } else {
                    HostMatch::Exact(name)
                })
            }
        };
        if let Some(p) = path_prefix
            && !p.starts_with('/')
        {
            return Err((
                "path_prefix".into(),
                format!("`{p}` must start with `/`, e.g. `/api/`"),
            ));
        }
        let mut hs = Vec::new();
        for (name, value) in headers {
            let n = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                (
                    format!("headers.{name}"),
                    format!("`{name}` is not a valid header name"),
                )
            })?;
            let v = HeaderValue::from_str(value).map_err(|_| {
                (
                    format!("headers.{name}"),
                    "the value must be visible ASCII".to_owned(),
                )
            })?;
            hs.push((n, v));
        }
        Ok(Self {
            host,
            path_prefix: path_prefix.map(str::to_owned),
            headers: hs,
        })
    }

    /// Whether the request matches. `host` is the request's authority
    /// without port, lowercase.
    pub fn matches(&self, host: Option<&str>, path: &str, headers: &HeaderMap) -> bool {
        if let Some(m) = &self.host {
            let Some(h) = host else { return false };
            let ok = match m {
                HostMatch::Exact(e) => h == e,
                HostMatch::Suffix(s) => h.len() > s.len() && h.ends_with(s.as_str()),
            };
            if !ok {
                return false;
            }
        }
        if let Some(p) = &self.path_prefix
            && !path.starts_with(p.as_str())
        {
            return false;
        }
        self.headers
            .iter()
            .all(|(n, v)| headers.get_all(n).iter().any(|got| got == v))
    }
}

/// The request host: the URI authority (HTTP/2 and HTTP/3 `:authority`)
/// or the `host` header, without port, lowercase.
pub fn request_host(uri: &http::Uri, headers: &HeaderMap) -> Option<String> {
    let raw = match uri.authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let h = headers.get(http::header::HOST)?.to_str().ok()?;
            h.parse::<http::uri::Authority>().ok()?.host().to_owned()
        }
    };
    let host = raw.trim_start_matches('[').trim_end_matches(']');
    Some(host.to_ascii_lowercase())
}

/// Picks the first of `routes` (the config's, each with its
/// [`RouteMatch`] given by `matcher`) matching the request.
pub fn find<'r, R>(
    routes: &'r [R],
    matcher: impl Fn(&R) -> &RouteMatch,
    host: Option<&str>,
    path: &str,
    headers: &HeaderMap,
) -> Option<(usize, &'r R)> {
    routes
        .iter()
        .enumerate()
        .find(|(_, r)| matcher(r).matches(host, path, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(host: Option<&str>, prefix: Option<&str>, headers: &[(&str, &str)]) -> RouteMatch {
        let h = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        RouteMatch::new(host, prefix, &h).unwrap()
    }

    #[test]
    fn host_exact_and_wildcard() {
        let e = m(Some("API.example.com"), None, &[]);
        assert!(e.matches(Some("api.example.com"), "/", &HeaderMap::new()));
        assert!(!e.matches(Some("x.api.example.com"), "/", &HeaderMap::new()));
        assert!(!e.matches(None, "/", &HeaderMap::new()));
        let w = m(Some("*.example.com"), None, &[]);
        assert!(w.matches(Some("a.example.com"), "/", &HeaderMap::new()));
        assert!(w.matches(Some("a.b.example.com"), "/", &HeaderMap::new()));
        assert!(!w.matches(Some("example.com"), "/", &HeaderMap::new()));
        assert!(!w.matches(Some("badexample.com"), "/", &HeaderMap::new()));
    }

    #[test]
    fn path_prefix_and_headers() {
        let r = m(None, Some("/api/"), &[("X-Env", "canary")]);
        let mut h = HeaderMap::new();
        assert!(!r.matches(None, "/api/x", &h));
        h.append("x-env", HeaderValue::from_static("prod"));
        h.append("x-env", HeaderValue::from_static("canary"));
        assert!(r.matches(None, "/api/x", &h));
        assert!(!r.matches(None, "/apix", &h));
        assert!(RouteMatch::any().matches(None, "/", &HeaderMap::new()));
    }

    #[test]
    fn first_matching_route_wins() {
        let routes = [
            ("api", m(None, Some("/api/"), &[])),
            ("all", RouteMatch::any()),
            ("never", m(None, Some("/api/x"), &[])),
        ];
        let pick =
            |path| find(&routes, |r| &r.1, None, path, &HeaderMap::new()).map(|(i, r)| (i, r.0));
        assert_eq!(pick("/api/x"), Some((0, "api")));
        assert_eq!(pick("/"), Some((1, "all")));
        assert_eq!(
            find(&routes[2..], |r| &r.1, None, "/", &HeaderMap::new()),
            None
        );
    }

    #[test]
    fn invalid_matchers_name_the_field() {
        let e = RouteMatch::new(None, Some("api"), &BTreeMap::new()).unwrap_err();
        assert_eq!(e.0, "path_prefix");
        let e = RouteMatch::new(Some("a b"), None, &BTreeMap::new()).unwrap_err();
        assert_eq!(e.0, "host");
        let mut bad = BTreeMap::new();
        bad.insert("bad header".to_string(), "x".to_string());
        assert_eq!(
            RouteMatch::new(None, None, &bad).unwrap_err().0,
            "headers.bad header"
        );
    }

    #[test]
    fn host_from_authority_or_header() {
        let uri: http::Uri = "https://Example.COM:443/x".parse().unwrap();
        assert_eq!(
            request_host(&uri, &HeaderMap::new()).as_deref(),
            Some("example.com")
        );
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("[::1]:8443"));
        let rel: http::Uri = "/x".parse().unwrap();
        assert_eq!(request_host(&rel, &h).as_deref(), Some("::1"));
    }
}
