//! A typed spooky config for tests and benches: a builder that renders
//! YAML, so a test states the fields it means ("one worker", "an admin
//! listener with a token") instead of patching a YAML string.
//!
//! It covers what the tests use, not every config field: `listen`,
//! `steering`, `admin`, `log`, `limits`, `timeouts`, `upstreams` (with
//! their backends) and `routes`, plus [`Config::raw`] / [`Upstream::raw`]
//! for anything else. Tests of config parsing itself (bad configs, exact
//! error messages) keep writing raw YAML: every function that starts
//! spooky takes either (see [`Yaml`]).
//!
//! Values are YAML fragments, written as given: `"{ type: round_robin }"`
//! is a flow mapping, `2` a number.

use std::fmt::Display;
use std::path::Path;

use super::Certs;

/// Text a spooky config file is made of: a [`Config`], or raw YAML (`&str`,
/// `String`) for tests that write the file themselves.
pub trait Yaml {
    fn yaml(&self) -> String;
}

impl Yaml for str {
    fn yaml(&self) -> String {
        self.to_owned()
    }
}

impl Yaml for String {
    fn yaml(&self) -> String {
        self.clone()
    }
}

impl Yaml for Config {
    fn yaml(&self) -> String {
        self.render()
    }
}

/// Ordered `key: value` pairs of one flow mapping; setting a key again
/// replaces its value in place.
#[derive(Clone, Debug, Default)]
struct Fields(Vec<(String, String)>);

impl Fields {
    fn set(&mut self, key: &str, value: impl Display) {
        let value = value.to_string();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    fn unset(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `{ a: 1, b: 2 }`
    fn flow(&self) -> String {
        let body: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{{ {} }}", body.join(", "))
    }
}

/// A whole spooky config. [`Config::new`] is the tests' usual one: two
/// workers on 127.0.0.1, port `PORT` (which `spooky()` replaces with a
/// free port), `reuseport` steering, no admin listener.
#[derive(Clone, Debug)]
pub struct Config {
    listen: Fields,
    steering: Fields,
    admin: Fields,
    log: Fields,
    limits: Fields,
    timeouts: Fields,
    upstreams: Vec<Upstream>,
    routes: Vec<String>,
    raw: String,
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    pub fn new() -> Self {
        let mut c = Config {
            listen: Fields::default(),
            steering: Fields::default(),
            admin: Fields::default(),
            log: Fields::default(),
            limits: Fields::default(),
            timeouts: Fields::default(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            raw: String::new(),
        };
        c.listen.set("address", "127.0.0.1");
        c.listen.set("port", "PORT");
        c.listen.set("workers", 2);
        c.steering.set("mode", "reuseport");
        c
    }

    /// Any `listen` field (`early_data`, `alt_svc_max_age_s`, `tcp`, ...).
    pub fn listen(mut self, key: &str, value: impl Display) -> Self {
        self.listen.set(key, value);
        self
    }

    /// Drops a `listen` field (back to spooky's default).
    pub fn listen_unset(mut self, key: &str) -> Self {
        self.listen.unset(key);
        self
    }

    pub fn address(self, address: impl Display) -> Self {
        self.listen("address", address)
    }

    /// A fixed port instead of the `PORT` placeholder.
    pub fn port(self, port: u16) -> Self {
        self.listen("port", port)
    }

    pub fn workers(self, n: usize) -> Self {
        self.listen("workers", n)
    }

    pub fn drain_timeout_ms(self, ms: u64) -> Self {
        self.listen("drain_timeout_ms", ms)
    }

    /// The listener's certificate and key (instead of a self-signed one).
    pub fn listen_tls(self, cert: &Path, key: &Path) -> Self {
        let tls = format!("{{ cert: {}, key: {} }}", cert.display(), key.display());
        self.listen("tls", tls)
    }

    /// `steering.mode`: `reuseport` (the default here), `xdp` or `off`.
    pub fn steering_mode(self, mode: &str) -> Self {
        self.steering("mode", mode)
    }

    /// Any `steering` field (`interfaces`, `initials_per_source`, ...).
    pub fn steering(mut self, key: &str, value: impl Display) -> Self {
        self.steering.set(key, value);
        self
    }

    /// An admin listener on 127.0.0.1:`port`, without a token.
    pub fn admin(mut self, port: u16) -> Self {
        self.admin.set("address", format!("\"127.0.0.1:{port}\""));
        self
    }

    /// An admin listener on 127.0.0.1:`port` that requires `token`.
    pub fn admin_with_token(mut self, port: u16, token: &str) -> Self {
        self = self.admin(port);
        self.admin.set("token", token);
        self
    }

    /// Any `log` field (`level`, `format`, `access`).
    pub fn log(mut self, key: &str, value: impl Display) -> Self {
        self.log.set(key, value);
        self
    }

    /// `log.access`: one line per request (spooky's default) or none.
    pub fn access_log(self, on: bool) -> Self {
        self.log("access", on)
    }

    /// One `limits` field (`max_body_bytes`, `retry_threshold`, ...).
    pub fn limit(mut self, key: &str, value: impl Display) -> Self {
        self.limits.set(key, value);
        self
    }

    /// One top-level `timeouts` field (`connect_ms`, ...).
    pub fn timeout(mut self, key: &str, value: impl Display) -> Self {
        self.timeouts.set(key, value);
        self
    }

    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstreams.push(upstream);
        self
    }

    pub fn upstreams(mut self, upstreams: impl IntoIterator<Item = Upstream>) -> Self {
        self.upstreams.extend(upstreams);
        self
    }

    /// A route to `upstream` that matches everything (a catch-all).
    pub fn route(self, upstream: &str) -> Self {
        self.route_with(upstream, &[])
    }

    /// A route to `upstream` with more fields, e.g.
    /// `[("name", "api"), ("match", "{ path_prefix: /api/ }")]`.
    pub fn route_with(mut self, upstream: &str, fields: &[(&str, &str)]) -> Self {
        let mut f = Fields::default();
        for (k, v) in fields {
            f.set(k, v);
        }
        f.set("upstream", upstream);
        self.routes.push(f.flow());
        self
    }

    /// Top-level YAML appended as written (fields the builder has no
    /// method for).
    pub fn raw(mut self, yaml: &str) -> Self {
        self.raw.push_str(yaml);
        if !yaml.is_empty() && !yaml.ends_with('\n') {
            self.raw.push('\n');
        }
        self
    }

    /// The config as YAML (with `PORT` still a placeholder unless
    /// [`Config::port`] was set).
    pub fn render(&self) -> String {
        let mut s = format!("listen: {}\n", self.listen.flow());
        if !self.steering.is_empty() {
            s.push_str(&format!("steering: {}\n", self.steering.flow()));
        }
        for (name, fields) in [
            ("admin", &self.admin),
            ("log", &self.log),
            ("limits", &self.limits),
            ("timeouts", &self.timeouts),
        ] {
            if !fields.is_empty() {
                s.push_str(&format!("{name}: {}\n", fields.flow()));
            }
        }
        s.push_str("upstreams:\n");
        for u in &self.upstreams {
            s.push_str(&u.render());
        }
        if !self.routes.is_empty() {
            s.push_str("routes:\n");
            for r in &self.routes {
                s.push_str(&format!("  - {r}\n"));
            }
        }
        s.push_str(&self.raw);
        s
    }
}

impl Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// One upstream with its backends.
#[derive(Clone, Debug)]
pub struct Upstream {
    name: String,
    fields: Fields,
    backends: Vec<String>,
    raw: String,
}

impl Upstream {
    /// An upstream with no backends yet and spooky's default protocol
    /// (HTTP/3).
    pub fn new(name: &str) -> Self {
        Upstream {
            name: name.to_owned(),
            fields: Fields::default(),
            backends: Vec::new(),
            raw: String::new(),
        }
    }

    /// The tests' usual upstream: HTTP/3 backends (`id`, address) whose
    /// certificate is `certs`'.
    pub fn h3(name: &str, certs: &Certs, backends: &[(&str, std::net::SocketAddr)]) -> Self {
        let mut u = Self::new(name).tls_ca(certs);
        for (id, addr) in backends {
            u = u.backend(id, addr);
        }
        u
    }

    /// An upstream for any protocol: `protocol` is `http3`, `http2` or
    /// `http1`; `tls` trusts `certs` (HTTP/3 needs it; HTTP/1.1 and HTTP/2
    /// without it speak cleartext).
    pub fn with_protocol(
        name: &str,
        protocol: &str,
        tls: Option<&Certs>,
        backends: &[(&str, std::net::SocketAddr)],
    ) -> Self {
        let mut u = Self::new(name).protocol(protocol);
        if let Some(certs) = tls {
            u = u.tls_ca(certs);
        }
        for (id, addr) in backends {
            u = u.backend(id, addr);
        }
        u
    }

    /// `protocol`: `http3`, `http2` or `http1`.
    pub fn protocol(self, protocol: &str) -> Self {
        self.field("protocol", protocol)
    }

    /// TLS to the backends, trusting `certs` (SNI `localhost`).
    pub fn tls_ca(self, certs: &Certs) -> Self {
        let tls = format!("{{ ca: {}, sni: localhost }}", certs.cert.display());
        self.field("tls", tls)
    }

    /// A backend `{ id, address }`; the address is quoted as given, so a
    /// config test may pass one that does not parse.
    pub fn backend(self, id: &str, address: impl Display) -> Self {
        self.backend_with(id, address, "")
    }

    /// A backend with more fields in its flow mapping, e.g.
    /// `"weight: 3"` or `"health_check: { path: /h }"`.
    pub fn backend_with(mut self, id: &str, address: impl Display, fields: &str) -> Self {
        let sep = if fields.is_empty() { "" } else { ", " };
        self.backends.push(format!(
            "{{ id: {id}, address: \"{address}\"{sep}{fields} }}"
        ));
        self
    }

    /// Any upstream field (`balancing`, `retries`, `health_check`, ...)
    /// as a one-line YAML value.
    pub fn field(mut self, key: &str, value: impl Display) -> Self {
        self.fields.set(key, value);
        self
    }

    /// Upstream fields as YAML lines (`key: value` per line), indented
    /// under the upstream here; blank lines are dropped.
    pub fn raw(mut self, lines: &str) -> Self {
        for line in lines.lines().filter(|l| !l.trim().is_empty()) {
            self.raw.push_str(&format!("    {line}\n"));
        }
        self
    }

    /// The upstream's entry under `upstreams:`.
    pub fn render(&self) -> String {
        let mut s = format!("  {}:\n", self.name);
        // `protocol` and `tls` first, as the tests always wrote them.
        let mut fields = self.fields.0.clone();
        fields.sort_by_key(|(k, _)| match k.as_str() {
            "protocol" => 0,
            "tls" => 1,
            _ => 2,
        });
        for (k, v) in fields.iter().filter(|(k, _)| k == "protocol" || k == "tls") {
            s.push_str(&format!("    {k}: {v}\n"));
        }
        s.push_str("    backends:\n");
        for b in &self.backends {
            s.push_str(&format!("      - {b}\n"));
        }
        for (k, v) in fields.iter().filter(|(k, _)| k != "protocol" && k != "tls") {
            s.push_str(&format!("    {k}: {v}\n"));
        }
        s.push_str(&self.raw);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the builder writes parses as a valid spooky config.
    #[test]
    fn renders_a_config_spooky_accepts() {
        let certs = crate::support::certs();
        let a: std::net::SocketAddr = "127.0.0.1:7443".parse().unwrap();
        let yaml = Config::new()
            .workers(1)
            .drain_timeout_ms(500)
            .admin(9000)
            .access_log(false)
            .limit("max_body_bytes", 1000)
            .timeout("connect_ms", 300)
            .upstream(
                Upstream::h3("app", &certs, &[("a", a)])
                    .field("balancing", "{ type: round_robin }"),
            )
            .upstream(
                Upstream::with_protocol("plain", "http1", None, &[("p", a)]).backend_with(
                    "q",
                    a,
                    "weight: 2",
                ),
            )
            .route_with("plain", &[("match", "{ path_prefix: /p/ }")])
            .route("app")
            .render()
            .replace("PORT", "4433");
        let cfg = spooky::config::parse(&yaml, "<builder>", certs.dir.path())
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert!(cfg.upstream("app").is_some(), "{yaml}");
        assert!(cfg.upstream("plain").is_some(), "{yaml}");
    }
}
