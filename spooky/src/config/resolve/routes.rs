//! The `routes` section: matchers (host, path prefix, headers), the
//! upstream each route sends to, per-route rate limits.

use std::collections::BTreeMap;

use super::{Checker, check_rate};
use crate::config::{Route, Upstream, file};
use crate::routing::RouteMatch;

/// Resolves the routes against the resolved `upstreams`; with none
/// configured and a single upstream, one catch-all route to it.
pub(super) fn resolve(
    c: &mut Checker,
    file_routes: &[file::RouteConfig],
    upstreams: &[Upstream],
) -> Vec<Route> {
    let names: BTreeMap<&str, usize> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u): (usize, &Upstream)| (u.name.as_str(), i))
        .collect();
    let mut routes = Vec::new();
    if file_routes.is_empty() {
        if upstreams.len() > 1 {
            c.err(
                "routes",
                format!(
                    "{} upstreams but no routes: add routes, ending with a catch-all such as `- upstream: {}`",
                    upstreams.len(),
                    upstreams[0].name
                ),
            );
        } else if !upstreams.is_empty() {
            routes.push(Route {
                name: "default".into(),
                matcher: RouteMatch::any(),
                upstream: 0,
                rate_limit: None,
            });
        }
    }
    for (i, r) in file_routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(&idx) = names.get(r.upstream.as_str()) else {
            c.err(
                format!("{path}.upstream"),
                format!(
                    "no upstream named `{}`; defined: {}",
                    r.upstream,
                    names.keys().copied().collect::<Vec<_>>().join(", ")
                ),
            );
            continue;
        };
        match RouteMatch::new(
            r.matcher.host.as_deref(),
            r.matcher.path_prefix.as_deref(),
            &r.matcher.headers,
        ) {
            Ok(matcher) => {
                let rate_limit = r
                    .rate_limit
                    .as_ref()
                    .and_then(|rl| check_rate(c, rl, &format!("{path}.rate_limit")));
                routes.push(Route {
                    name: r.name.clone().unwrap_or_else(|| path.clone()),
                    matcher,
                    upstream: idx,
                    rate_limit,
                })
            }
            Err((field, message)) => c.err(format!("{path}.match.{field}"), message),
        }
    }
    routes
}
