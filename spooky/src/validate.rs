//! Request validation for HTTP/3 and HTTP/2 clients (RFC 9114 §4.1.2–4.3,
//! RFC 9113 §8.2–8.3), and the `host` rules of RFC 9112 §3.2 for
//! HTTP/1.1 clients (hyper's parser does the rest of HTTP/1.1): decides whether a decoded request head is
//! malformed, so that nothing malformed is forwarded to a backend. A proxy
//! that turns a request carrying, say, `transfer-encoding` or two
//! disagreeing `content-length`s into HTTP/1.1 hands the backend a
//! request-smuggling vector.
//!
//! What the decoders already reject, and so is not checked again here:
//!
//! - h3 0.0.8 (`proto/headers.rs`, `Field::parse` and
//!   `Header::into_request_parts`) resets the stream with
//!   `H3_MESSAGE_ERROR` for unknown pseudo-header fields, uppercase field
//!   names, CR/LF/NUL (any control character but HTAB) in values, a missing
//!   `:method`, no `:authority` and no `host`, `:authority` ≠ the first
//!   `host` (exact comparison; later `host`s are not looked at), an empty
//!   `:authority` or `:path`, and `:scheme` without `:path` or `:path`
//!   without `:scheme` (when `:authority` is present). It silently
//!   normalises a duplicated pseudo-header (the last one wins) and a
//!   pseudo-header after a regular field, and the `http` crate drops a
//!   `#fragment` from `:path`: those are gone by the time a request
//!   reaches us (see `Header::try_from`) and only a patched h3 could
//!   reject them.
//! - h2 0.4 (`frame/headers.rs` `load_hpack`, `server.rs` `convert_poll_message`,
//!   `proto/streams/recv.rs`) rejects connection-specific fields, `te`
//!   other than `trailers`, repeated or misplaced pseudo-headers, missing
//!   `:scheme`/`:path`, CONNECT with them, unparsable or disagreeing
//!   `content-length`, and DATA that disagrees with `content-length`. It
//!   does not compare `host` with `:authority`, does not check whitespace
//!   around values, and reads an empty `content-length` as 0.
//!
//! A violation is answered with **400** (`proxy::error_response`, request id
//! included) followed, on HTTP/3, by STOP_SENDING `H3_MESSAGE_ERROR` on the
//! request body. RFC 9114 §4.1.2 allows a server to send a response
//! indicating the error before closing the stream, and a 400 with a
//! request id tells the client (and whoever debugs it) what went wrong,
//! where a bare reset tells nothing. A body whose DATA disagrees with
//! `content-length` is found only while it streams, after the request went
//! upstream: that case resets the stream with `H3_MESSAGE_ERROR` instead
//! (see `body::H3Body::enforcing`).

use std::sync::atomic::AtomicU64;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Uri};

/// Requests rejected as malformed since start, over all workers and client
/// protocols (for the metrics exporter).
pub static MALFORMED_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Which decoder produced the request: decides which checks are already
/// done (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientVersion {
    Http3,
    Http2,
    /// HTTP/1.1 (and 1.0): hyper's parser enforces the framing rules; only
    /// the `host` rules of RFC 9112 §3.2 are checked here.
    Http1,
}

/// Why a request is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// RFC 9114 §4.2, RFC 9113 §8.2.2: HTTP/3 and HTTP/2 have no
    /// connection-specific fields.
    #[error("connection-specific field `{0}`")]
    ConnectionSpecificField(HeaderName),
    /// RFC 9114 §4.2: `te` may only be `trailers`.
    #[error("`te` other than `trailers`")]
    TeNotTrailers,
    /// RFC 9114 §4.3.1: `:authority` and `host`, when both present, must
    /// contain the same value.
    #[error("`host` disagrees with `:authority`")]
    HostDisagreesWithAuthority,
    /// More than one `host` without `:authority`: which one is the target?
    /// RFC 9112 §3.2 requires a 400 for it over HTTP/1.1 too.
    #[error("several `host` fields")]
    SeveralHosts,
    /// RFC 9112 §3.2: an HTTP/1.1 request must carry `host`.
    #[error("HTTP/1.1 request without `host`")]
    MissingHost,
    /// RFC 9114 §4.3.1: every non-CONNECT request has `:scheme`.
    #[error("missing `:scheme`")]
    MissingScheme,
    /// RFC 9114 §4.3.1: every non-CONNECT request has `:path`.
    #[error("missing `:path`")]
    MissingPath,
    /// RFC 9114 §4.3.1: `:path` of an http(s) request is origin-form, or
    /// `*` for OPTIONS.
    #[error("`:path` is neither origin-form nor `*` for OPTIONS")]
    PathNotOriginForm,
    /// RFC 9114 §4.4: a (non-extended) CONNECT has neither `:scheme` nor
    /// `:path`.
    #[error("CONNECT with `:scheme` or `:path`")]
    ConnectWithSchemeOrPath,
    /// RFC 9110 §8.6: `content-length` is `1*DIGIT`.
    #[error("`content-length` is not a non-negative integer")]
    InvalidContentLength,
    /// RFC 9110 §8.6: several `content-length` fields must agree.
    #[error("`content-length` fields disagree")]
    ConflictingContentLength,
    /// RFC 9114 §10.3, RFC 9110 §5.5: CR, LF and NUL are never valid in a
    /// field value.
    #[error("value of `{0}` contains CR, LF or NUL")]
    ForbiddenCharacter(HeaderName),
    /// RFC 9110 §5.5, RFC 9113 §8.2.1: a field value has no leading or
    /// trailing whitespace.
    #[error("value of `{0}` has leading or trailing whitespace")]
    SurroundingWhitespace(HeaderName),
}

/// What validation learned about a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validated {
    /// The declared body length, when `content-length` is present (all its
    /// fields agree).
    pub content_length: Option<u64>,
}

/// Fields that describe one connection (RFC 9114 §4.2) and are malformed
/// in HTTP/3 and HTTP/2 requests (`te` is handled on its own: `trailers`
/// is allowed). The proxy strips them, among others, from what it
/// forwards either way.
pub const CONNECTION_SPECIFIC: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Checks a decoded request head received over `version`. Pure: the
/// caller answers, logs and counts.
pub fn validate(parts: &Parts, version: ClientVersion) -> Result<Validated, Violation> {
    if version == ClientVersion::Http1 {
        check_http1_host(parts)?;
        // hyper has settled the body framing; the length is not needed.
        return Ok(Validated {
            content_length: None,
        });
    }
    if version == ClientVersion::Http3 {
        check_connection_specific(&parts.headers)?;
        check_target(&parts.method, &parts.uri, has_protocol(parts))?;
    }
    check_path_form(&parts.method, &parts.uri)?;
    check_host(&parts.uri, &parts.headers)?;
    check_values(&parts.headers)?;
    let content_length = content_length(&parts.headers)?;
    Ok(Validated { content_length })
}

/// Extended CONNECT (RFC 9220): h3 put `:protocol` in the extensions.
fn has_protocol(parts: &Parts) -> bool {
    parts.extensions.get::<h3::ext::Protocol>().is_some()
}

fn check_connection_specific(headers: &HeaderMap) -> Result<(), Violation> {
    for name in &CONNECTION_SPECIFIC {
        if headers.contains_key(name) {
            return Err(Violation::ConnectionSpecificField(name.clone()));
        }
    }
    // Exactly `trailers`: RFC 9114 §4.2 allows no other value, not even a
    // list containing it.
    if headers.get_all(header::TE).iter().any(|v| v != "trailers") {
        return Err(Violation::TeNotTrailers);
    }
    Ok(())
}

/// `:scheme` and `:path` presence (h3 does not check it when `:authority`
/// is present without both: that decodes as an authority-form URI).
fn check_target(method: &Method, uri: &Uri, extended_connect: bool) -> Result<(), Violation> {
    let has_scheme = uri.scheme().is_some();
    let has_path = uri.path_and_query().is_some();
    if method == Method::CONNECT && !extended_connect {
        return if has_scheme || has_path {
            Err(Violation::ConnectWithSchemeOrPath)
        } else {
            Ok(())
        };
    }
    if !has_scheme {
        return Err(Violation::MissingScheme);
    }
    if !has_path {
        return Err(Violation::MissingPath);
    }
    Ok(())
}

/// An http(s) `:path` is `/…` or, for OPTIONS, `*` (`PathAndQuery` already
/// refuses other relative forms); `*` on another method would reach an
/// HTTP/1.1 backend as a request target it may read differently.
fn check_path_form(method: &Method, uri: &Uri) -> Result<(), Violation> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(());
    };
    // An empty `:path` never gets here: h3 and h2 reset the stream.
    let target = pq.as_str();
    if target.starts_with('/') || (target == "*" && method == Method::OPTIONS) {
        Ok(())
    } else {
        Err(Violation::PathNotOriginForm)
    }
}

/// Every `host` must name the URI's authority (ASCII case-insensitively:
/// hosts are); without an authority there may be one `host` at most.
fn check_host(uri: &Uri, headers: &HeaderMap) -> Result<(), Violation> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match uri.authority() {
        Some(authority) => {
            if hosts.any(|h| {
                !h.as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
            }) {
                return Err(Violation::HostDisagreesWithAuthority);
            }
        }
        None => {
            if hosts.nth(1).is_some() {
                return Err(Violation::SeveralHosts);
            }
        }
    }
    Ok(())
}

/// RFC 9112 §3.2: exactly one `host` on HTTP/1.1 (none required on
/// HTTP/1.0). A request with two would be routed by the first and may be
/// read by the backend by the other.
fn check_http1_host(parts: &Parts) -> Result<(), Violation> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(Violation::SeveralHosts),
        (None, _) if parts.version == http::Version::HTTP_11 => Err(Violation::MissingHost),
        _ => Ok(()),
    }
}

fn check_values(headers: &HeaderMap) -> Result<(), Violation> {
    for (name, value) in headers {
        check_value(name, value.as_bytes())?;
    }
    Ok(())
}

/// One field value. `HeaderValue` already refuses CR, LF and NUL when
/// built with its checked constructors (as h3 and h2 do); checking again
/// costs one pass and keeps the guarantee here rather than in a decoder's
/// choice of constructor.
fn check_value(name: &HeaderName, value: &[u8]) -> Result<(), Violation> {
    if value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(Violation::ForbiddenCharacter(name.clone()));
    }
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t');
    if value.first().is_some_and(is_ws) || value.last().is_some_and(is_ws) {
        return Err(Violation::SurroundingWhitespace(name.clone()));
    }
    Ok(())
}

/// The declared body length: every `content-length` field must be
/// `1*DIGIT` (no sign, no list, no whitespace) and all must agree.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Violation> {
    let mut declared = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let n = parse_length(value).ok_or(Violation::InvalidContentLength)?;
        match declared {
            Some(prev) if prev != n => return Err(Violation::ConflictingContentLength),
            _ => declared = Some(n),
        }
    }
    Ok(declared)
}

fn parse_length(value: &HeaderValue) -> Option<u64> {
    let digits = value.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // All ASCII digits: valid UTF-8; `parse` fails only on overflow.
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Replaces agreeing duplicate `content-length` fields with one, so that
/// no backend sees a repeated field it might read differently.
pub fn normalize_content_length(headers: &mut HeaderMap, validated: Validated) {
    if let Some(n) = validated.content_length
        && headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .nth(1)
            .is_some()
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClientVersion::{Http1, Http2, Http3};

    /// A well-formed HTTP/3 request head as h3 would decode it.
    fn request(uri: &str) -> http::request::Builder {
        http::Request::builder()
            .method(Method::POST)
            .uri(uri)
            .version(http::Version::HTTP_3)
    }

    fn parts(b: http::request::Builder) -> Parts {
        b.body(()).unwrap().into_parts().0
    }

    fn check(b: http::request::Builder) -> Result<Validated, Violation> {
        validate(&parts(b), Http3)
    }

    #[test]
    fn a_plain_request_is_valid() {
        let v = check(request("https://example.com/a?b=c").header("user-agent", "t/1")).unwrap();
        assert_eq!(v.content_length, None);
    }

    #[test]
    fn connection_specific_fields_are_malformed() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            let got = check(request("https://example.com/").header(name, "x"));
            assert_eq!(
                got,
                Err(Violation::ConnectionSpecificField(HeaderName::from_static(
                    name
                ))),
                "{name}"
            );
        }
    }

    #[test]
    fn te_must_be_exactly_trailers() {
        assert!(check(request("https://example.com/").header("te", "trailers")).is_ok());
        for bad in ["gzip", "trailers, gzip", "Trailers", "trailers "] {
            let got = check(request("https://example.com/").header("te", bad));
            assert_eq!(got, Err(Violation::TeNotTrailers), "{bad:?}");
        }
        let two = request("https://example.com/")
            .header("te", "trailers")
            .header("te", "deflate");
        assert_eq!(check(two), Err(Violation::TeNotTrailers));
    }

    #[test]
    fn host_must_agree_with_authority() {
        let same = request("https://example.com:8443/").header("host", "Example.COM:8443");
        assert!(check(same).is_ok());
        let other = request("https://example.com/").header("host", "evil.example");
        assert_eq!(check(other), Err(Violation::HostDisagreesWithAuthority));
        let port = request("https://example.com/").header("host", "example.com:81");
        assert_eq!(check(port), Err(Violation::HostDisagreesWithAuthority));
        // A second, disagreeing host hides behind an agreeing first one.
        let second = request("https://example.com/")
            .header("host", "example.com")
            .header("host", "evil.example");
        assert_eq!(check(second), Err(Violation::HostDisagreesWithAuthority));
    }

    #[test]
    fn without_authority_one_host_at_most() {
        let one = request("/").header("host", "example.com");
        assert!(validate(&parts(one), Http2).is_ok());
        let two = request("/")
            .header("host", "example.com")
            .header("host", "evil.example");
        assert_eq!(validate(&parts(two), Http2), Err(Violation::SeveralHosts));
    }

    #[test]
    fn http1_has_exactly_one_host() {
        let h1 = |b: http::request::Builder| parts(b.version(http::Version::HTTP_11));
        let one = h1(request("/").header("host", "example.com"));
        assert!(validate(&one, Http1).is_ok());
        let two = h1(request("/")
            .header("host", "example.com")
            .header("host", "example.com"));
        assert_eq!(validate(&two, Http1), Err(Violation::SeveralHosts));
        let none = h1(request("/"));
        assert_eq!(validate(&none, Http1), Err(Violation::MissingHost));
        // HTTP/1.0 has no `host` requirement, but still not two.
        let old = parts(request("/").version(http::Version::HTTP_10));
        assert!(validate(&old, Http1).is_ok());
        let old_two = parts(
            request("/")
                .version(http::Version::HTTP_10)
                .header("host", "a")
                .header("host", "b"),
        );
        assert_eq!(validate(&old_two, Http1), Err(Violation::SeveralHosts));
    }

    #[test]
    fn scheme_and_path_are_required_except_for_connect() {
        // What h3 builds from `:method GET, :authority a` without `:scheme`
        // and `:path`: an authority-form URI.
        let bare = request("example.com").method(Method::GET);
        assert_eq!(check(bare), Err(Violation::MissingScheme));
        let mut no_path = parts(request("https://example.com/"));
        no_path.uri = Uri::from_static("example.com:443");
        assert_eq!(validate(&no_path, Http3), Err(Violation::MissingScheme));
        let connect = request("example.com:443").method(Method::CONNECT);
        assert!(check(connect).is_ok());
    }

    #[test]
    fn plain_connect_has_neither_scheme_nor_path() {
        let with_path = request("https://example.com/").method(Method::CONNECT);
        assert_eq!(check(with_path), Err(Violation::ConnectWithSchemeOrPath));
        // Extended CONNECT (`:protocol`) has both.
        let mut extended = parts(request("https://example.com/chat").method(Method::CONNECT));
        extended.extensions.insert(h3::ext::Protocol::WEB_TRANSPORT);
        assert!(validate(&extended, Http3).is_ok());
        let mut extended_bare = parts(request("example.com:443").method(Method::CONNECT));
        extended_bare
            .extensions
            .insert(h3::ext::Protocol::WEB_TRANSPORT);
        assert_eq!(
            validate(&extended_bare, Http3),
            Err(Violation::MissingScheme)
        );
    }

    #[test]
    fn path_is_origin_form_or_asterisk_for_options() {
        let star = request("*").method(Method::OPTIONS);
        // `*` alone parses as a path-only URI; give it the pseudo-headers.
        let mut star = parts(star);
        let mut uri = star.uri.clone().into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTPS);
        uri.authority = Some(http::uri::Authority::from_static("example.com"));
        star.uri = Uri::from_parts(uri).unwrap();
        assert!(validate(&star, Http3).is_ok());
        let mut star_get = star.clone();
        star_get.method = Method::GET;
        assert_eq!(
            validate(&star_get, Http3),
            Err(Violation::PathNotOriginForm)
        );
        // A relative path never gets this far: `PathAndQuery` (so h3 and
        // h2) refuses it.
        assert!("a/b".parse::<http::uri::PathAndQuery>().is_err());
    }

    #[test]
    fn content_length_is_one_non_negative_integer() {
        let ok = request("https://example.com/").header("content-length", "42");
        assert_eq!(check(ok).unwrap().content_length, Some(42));
        let zero = request("https://example.com/").header("content-length", "0");
        assert_eq!(check(zero).unwrap().content_length, Some(0));
        for bad in [
            "",
            "-1",
            "+1",
            "1.0",
            "0x10",
            "1,1",
            "1, 1",
            "99999999999999999999",
        ] {
            let got = check(request("https://example.com/").header("content-length", bad));
            assert_eq!(got, Err(Violation::InvalidContentLength), "{bad:?}");
        }
    }

    #[test]
    fn several_content_lengths_must_agree() {
        let agree = request("https://example.com/")
            .header("content-length", "5")
            .header("content-length", "5");
        let mut p = parts(agree);
        let v = validate(&p, Http3).unwrap();
        assert_eq!(v.content_length, Some(5));
        normalize_content_length(&mut p.headers, v);
        assert_eq!(p.headers.get_all("content-length").iter().count(), 1);
        assert_eq!(p.headers["content-length"], "5");
        let disagree = request("https://example.com/")
            .header("content-length", "5")
            .header("content-length", "6");
        assert_eq!(check(disagree), Err(Violation::ConflictingContentLength));
    }

    #[test]
    fn cr_lf_and_nul_in_values_are_malformed() {
        // `HeaderValue`'s checked constructors refuse them, so no decoder
        // that uses them can hand us one...
        for bad in [&b"a\rb"[..], b"a\nb", b"a\0b"] {
            assert!(HeaderValue::from_bytes(bad).is_err(), "{bad:?}");
        }
        // ...and the byte check catches them whatever the constructor.
        let name = HeaderName::from_static("x-a");
        for bad in [&b"a\rb"[..], b"a\nb", b"a\0b", b"\r\n", b"ok\r\nx-b: 1"] {
            assert_eq!(
                check_value(&name, bad),
                Err(Violation::ForbiddenCharacter(name.clone())),
                "{bad:?}"
            );
        }
        assert_eq!(check_value(&name, b"a\tb c"), Ok(()));
        assert_eq!(check_value(&name, b""), Ok(()));
    }

    #[test]
    fn values_have_no_surrounding_whitespace() {
        for bad in [" a", "a ", "\ta", "a\t", " "] {
            let got = validate(
                &parts(request("https://example.com/").header("x-a", bad)),
                Http2,
            );
            assert_eq!(
                got,
                Err(Violation::SurroundingWhitespace(HeaderName::from_static(
                    "x-a"
                ))),
                "{bad:?}"
            );
        }
        let inner = request("https://example.com/").header("x-a", "a b\tc");
        assert!(check(inner).is_ok());
    }

    #[test]
    fn http2_skips_what_h2_already_rejects() {
        // h2 resets these before hyper builds a request; checking them
        // again would be dead code on that path.
        let te = request("https://example.com/").header("te", "gzip");
        assert!(validate(&parts(te), Http2).is_ok());
        let origin_form = request("/").header("host", "example.com");
        assert!(validate(&parts(origin_form), Http2).is_ok());
        // h2 reads an empty content-length as 0; we do not.
        let empty = request("https://example.com/").header("content-length", "");
        assert_eq!(
            validate(&parts(empty), Http2),
            Err(Violation::InvalidContentLength)
        );
    }
}
