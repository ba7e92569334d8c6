//! The `request_id` section: the header carrying the request id.

use http::HeaderName;

use super::Checker;
use crate::config::file;

pub(super) fn resolve(c: &mut Checker, request_id: &file::RequestIdConfig) -> HeaderName {
    match HeaderName::from_bytes(request_id.header.as_bytes()) {
        Ok(h) => h,
        Err(_) => {
            c.err(
                "request_id.header",
                format!(
                    "`{}` is not a valid header name: use lowercase letters, digits and `-`, e.g. `x-request-id`",
                    request_id.header
                ),
            );
            HeaderName::from_static("x-request-id")
        }
    }
}
