//! Request validation and hop-by-hop stripping on arbitrary request heads.
//!
//! Input, split on `\n`: the method, the URI, then one field per line as
//! `name:value` (split at the first `:` after the first octet, value kept
//! as is, whitespace included). Parts the `http` crate refuses are dropped
//! (a method or URI it refuses ends the input): h3 and h2 build requests
//! with its checked constructors, so nothing else can reach spooky. A line
//! `:protocol` marks an extended CONNECT, as h3 does in the extensions.
//!
//! Checked, besides "never panics":
//! - a request `validate` accepts has at most one `content-length` after
//!   `normalize_content_length`, and it is the declared length;
//! - an HTTP/3 request it accepts has no connection-specific field and
//!   `te` only as `trailers`;
//! - after `strip_hop_by_hop` no hop-by-hop field, and no field the
//!   `connection` header named, remains; `te` only as `trailers`, and only
//!   when asked to keep it.
#![no_main]

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use spooky::validate::{self, ClientVersion};

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "proxy-authenticate",
];

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else {
        return;
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(uri)) else {
        return;
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = http::Version::HTTP_3;
    for line in lines {
        if line == b":protocol" {
            parts.extensions.insert(h3::ext::Protocol::WEB_TRANSPORT);
            continue;
        }
        let Some(colon) = line.iter().skip(1).position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon + 1], &line[colon + 2..]);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            parts.headers.append(name, value);
        }
    }

    for version in [ClientVersion::Http3, ClientVersion::Http2] {
        let Ok(valid) = validate::validate(&parts, version) else {
            continue;
        };
        if version == ClientVersion::Http3 {
            for name in [
                "connection",
                "keep-alive",
                "proxy-connection",
                "transfer-encoding",
                "upgrade",
            ] {
                assert!(!parts.headers.contains_key(name), "accepted {name}");
            }
            assert!(
                parts
                    .headers
                    .get_all(header::TE)
                    .iter()
                    .all(|v| v == "trailers")
            );
        }
        let mut headers = parts.headers.clone();
        validate::normalize_content_length(&mut headers, valid);
        let lengths: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
        assert!(
            lengths.len() <= 1,
            "{} content-length fields",
            lengths.len()
        );
        assert_eq!(
            lengths
                .first()
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap()),
            valid.content_length
        );
        // What the proxy does next with an accepted request.
        for keep_te in [true, false] {
            check_strip(headers.clone(), keep_te);
        }
    }
    // And on anything at all (responses are stripped unvalidated).
    for keep_te in [true, false] {
        check_strip(parts.headers.clone(), keep_te);
    }
});

fn check_strip(mut headers: HeaderMap, keep_te: bool) {
    // Every comma-separated token of every `connection` value, read as
    // octets: a value with obs-text elsewhere names its tokens all the same.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect();
    spooky::proxy::strip_hop_by_hop(&mut headers, keep_te);
    for name in HOP_BY_HOP.iter().filter(|&&n| n != "te") {
        assert!(!headers.contains_key(*name), "{name} survived");
    }
    for name in &named {
        if name != header::TE {
            assert!(
                !headers.contains_key(name),
                "{name} (named by connection) survived"
            );
        }
    }
    let te: Vec<_> = headers.get_all(header::TE).iter().collect();
    if keep_te {
        assert!(
            te.is_empty() || te == [&HeaderValue::from_static("trailers")],
            "te: {te:?}"
        );
    } else {
        assert!(te.is_empty(), "te survived: {te:?}");
    }
}
