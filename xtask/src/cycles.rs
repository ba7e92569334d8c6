//! `check_module_cycles`: no two modules of the spooky library import each
//! other (issue 16, item 3).
//!
//! Every file under `spooky/src` is a module (`a.rs` and `a/mod.rs` are
//! `a`, `a/b.rs` is `a::b`). The check reads each file's paths into the
//! crate: `use` trees (groups expanded, `self` and `super` resolved, module
//! aliases remembered) and every `crate::…`, `super::…`, `self::…` or
//! `alias::…` path in the code, test modules included; comments and string
//! literals are ignored. A path names the longest known module it starts
//! with. An edge from module `x::a…` to `x::b…` is an edge between the
//! siblings `x::a` and `x::b`, at every depth: so `listener::tcp` using
//! `worker` and `worker` using `listener::tcp` is the pair
//! `listener` ↔ `worker`. A module and its own submodules are one unit here
//! (a `mod.rs` declaring and re-exporting its children, the children using
//! their parent's shared items): containment is not a pair of siblings.
//! Paths into other crates (`spooky_lb`, re-exported as `crate::balancer`
//! and `crate::health`) are not modules of `spooky/src`.
//!
//! `main.rs` is the binary's crate root (its `crate::` is not the library);
//! it is checked to declare no modules, so that nothing is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Cycles tolerated while they are being removed, as `(a, b)` with
/// `a < b`, each with a comment naming the issue that removes it. Empty:
/// spooky/src has none since issue 16 item 3. The check fails on a stale
/// entry, so the list can only shrink.
const KNOWN_CYCLES: &[(&str, &str)] = &[];

/// One module path, `[]` for the crate root.
type Module = Vec<String>;

/// A sibling edge `from → to` and where it was seen (`file: path`).
type Edges = BTreeMap<(String, String), Vec<String>>;

/// Fails if two modules of `spooky/src` import each other, other than the
/// [`KNOWN_CYCLES`] (which it lists, and fails on when one is gone).
pub fn check(root: &Path) -> Result<()> {
    let src = root.join("spooky/src");
    let mut files = Vec::new();
    collect_rs(&src, &mut files)?;
    files.sort();
    let mut sources = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&src)
            .context("source file outside spooky/src")?;
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let shown = format!("spooky/src/{}", rel.display());
        if rel == Path::new("main.rs") {
            if declares_modules(&tokens(&text)) {
                bail!("{shown} declares modules: teach check_module_cycles about the binary crate");
            }
            continue;
        }
        sources.push((shown, module_of(rel)?, text));
    }
    let found = cycles(&sources);
    let mut failed = false;
    for (pair, evidence) in &found {
        let known = KNOWN_CYCLES.contains(&(pair.0.as_str(), pair.1.as_str()));
        eprintln!(
            "xtask: {} cycle {} <-> {}:",
            if known { "known" } else { "NEW" },
            pair.0,
            pair.1
        );
        for e in evidence {
            eprintln!("    {e}");
        }
        failed |= !known;
    }
    for (a, b) in KNOWN_CYCLES {
        if !found.iter().any(|(p, _)| p.0 == *a && p.1 == *b) {
            eprintln!(
                "xtask: known cycle {a} <-> {b} is gone: remove it from KNOWN_CYCLES in xtask/src/cycles.rs"
            );
            failed = true;
        }
    }
    if failed {
        bail!("modules of spooky/src import each other (see above)");
    }
    Ok(())
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `lib.rs` → `[]`, `a.rs` and `a/mod.rs` → `[a]`, `a/b.rs` → `[a, b]`.
fn module_of(rel: &Path) -> Result<Module> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().context("empty path")?;
    let stem = last.strip_suffix(".rs").context("not a .rs file")?;
    if stem != "mod" && !(parts.is_empty() && stem == "lib") {
        parts.push(stem.to_owned());
    }
    Ok(parts)
}

/// The cycles among `(file shown, module, source)`: each pair `(a, b)` with
/// `a < b`, and the paths that make both edges.
fn cycles(sources: &[(String, Module, String)]) -> BTreeMap<(String, String), Vec<String>> {
    let modules: BTreeSet<Module> = sources.iter().map(|(_, m, _)| m.clone()).collect();
    let mut edges = Edges::new();
    for (shown, module, text) in sources {
        for target in references(module, &tokens(text), &modules) {
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            // Containment (one is the other's ancestor) or the file itself.
            if common == module.len() || common == target.len() {
                continue;
            }
            let from = module[..=common].join("::");
            let to = target[..=common].join("::");
            let seen = edges.entry((from, to)).or_default();
            let what = format!("{shown} uses crate::{}", target.join("::"));
            if !seen.contains(&what) {
                seen.push(what);
            }
        }
    }
    let mut found = BTreeMap::new();
    for ((a, b), there) in &edges {
        if a < b
            && let Some(back) = edges.get(&(b.clone(), a.clone()))
        {
            found.insert(
                (a.clone(), b.clone()),
                there.iter().chain(back).cloned().collect(),
            );
        }
    }
    found
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

/// Identifiers, `::` and punctuation of Rust source, without comments,
/// string, char and number literals, or lifetimes.
fn tokens(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(&c, i + 1);
        } else if let Some((hashes, body)) = raw_string_start(&c, i) {
            i = skip_raw_string(&c, body, hashes);
        } else if ch == 'b' && next == Some('"') {
            i = skip_string(&c, i + 2);
        } else if ch == 'b' && next == Some('\'') {
            i = skip_char(&c, i + 2);
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') || c.get(i + 2) == Some(&'\'') {
                i = skip_char(&c, i + 1);
            } else {
                i += 1;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
        } else if ch == ':' && next == Some(':') {
            out.push(Tok::Path);
            i += 2;
        } else {
            out.push(Tok::Punct(ch));
            i += 1;
        }
    }
    out
}

/// Past the closing quote of a string whose body starts at `i`.
fn skip_string(c: &[char], mut i: usize) -> usize {
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Past the closing quote of a char literal whose body starts at `i`.
fn skip_char(c: &[char], mut i: usize) -> usize {
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '\'' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// For `r"`, `r#"`, `br##"` … at `i`: the number of `#` and where the body
/// starts.
fn raw_string_start(c: &[char], i: usize) -> Option<(usize, usize)> {
    // Not the tail of an identifier such as `for` or `nr`.
    if i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_') {
        return None;
    }
    let mut j = i;
    if c.get(j) == Some(&'b') {
        j += 1;
    }
    if c.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while c.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (c.get(j) == Some(&'"')).then_some((hashes, j + 1))
}

fn skip_raw_string(c: &[char], mut i: usize, hashes: usize) -> usize {
    while i < c.len() {
        if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

fn is_ident(t: Option<&Tok>, name: &str) -> bool {
    matches!(t, Some(Tok::Ident(s)) if s == name)
}

/// Whether the tokens declare a module (`mod x;` or `mod x {`).
fn declares_modules(toks: &[Tok]) -> bool {
    toks.windows(3).any(|w| {
        is_ident(w.first(), "mod")
            && matches!(w[1], Tok::Ident(_))
            && matches!(w[2], Tok::Punct(';') | Tok::Punct('{'))
    })
}

/// The modules of `known` that the file of `module` names (each at most
/// once, in order of appearance).
fn references(module: &Module, toks: &[Tok], known: &BTreeSet<Module>) -> Vec<Module> {
    let mut out: Vec<Module> = Vec::new();
    let mut aliases: BTreeMap<String, Module> = BTreeMap::new();
    // Inline modules (`mod tests {`) open at this brace depth.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let here = |inline: &[(String, usize)]| {
            let mut m = module.clone();
            m.extend(inline.iter().map(|(n, _)| n.clone()));
            m
        };
        match &toks[i] {
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(kw)
                if kw == "mod"
                    && matches!(toks.get(i + 1), Some(Tok::Ident(_)))
                    && toks.get(i + 2) == Some(&Tok::Punct('{')) =>
            {
                if let Some(Tok::Ident(name)) = toks.get(i + 1) {
                    inline.push((name.clone(), depth + 1));
                }
                depth += 1;
                i += 3;
            }
            Tok::Ident(kw) if kw == "use" => {
                let end = toks[i..]
                    .iter()
                    .position(|t| *t == Tok::Punct(';'))
                    .map_or(toks.len(), |p| i + p);
                let mut leaves = Vec::new();
                use_tree(&toks[i + 1..end], Vec::new(), &mut leaves);
                let current = here(&inline);
                for (path, alias) in leaves {
                    let Some(abs) = absolute(&current, &path, &aliases, known) else {
                        continue;
                    };
                    if let Some(name) = alias
                        && known.contains(&abs)
                    {
                        aliases.insert(name, abs.clone());
                    }
                    push_module(&mut out, &abs, known);
                }
                i = end + 1;
            }
            Tok::Ident(first)
                if toks.get(i + 1) == Some(&Tok::Path)
                    && (i == 0 || toks[i - 1] != Tok::Path)
                    && (matches!(first.as_str(), "crate" | "super" | "self")
                        || aliases.contains_key(first)) =>
            {
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::Path) {
                    match toks.get(j + 1) {
                        Some(Tok::Ident(s)) => {
                            path.push(s.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                if let Some(abs) = absolute(&here(&inline), &path, &aliases, known) {
                    push_module(&mut out, &abs, known);
                }
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// The longest module of `known` that `abs` starts with, added to `out`.
fn push_module(out: &mut Vec<Module>, abs: &[String], known: &BTreeSet<Module>) {
    if let Some(n) = (1..=abs.len()).rev().find(|n| known.contains(&abs[..*n])) {
        let m = abs[..n].to_vec();
        if !out.contains(&m) {
            out.push(m);
        }
    }
}

/// `path` as written in module `current`, from the crate root; `None` for a
/// path into another crate.
fn absolute(
    current: &Module,
    path: &[String],
    aliases: &BTreeMap<String, Module>,
    known: &BTreeSet<Module>,
) -> Option<Module> {
    let first = path.first()?;
    let (mut base, rest) = match first.as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (current.clone(), &path[1..]),
        "super" => {
            let mut base = current.clone();
            let mut k = 0;
            while path.get(k).is_some_and(|s| s == "super") {
                base.pop();
                k += 1;
            }
            (base, &path[k..])
        }
        name => {
            if let Some(m) = aliases.get(name) {
                (m.clone(), &path[1..])
            } else {
                // A child of the current module (`use h3::x` in a mod.rs).
                let mut child = current.clone();
                child.push(name.to_owned());
                if !known.contains(&child) {
                    return None;
                }
                (child, &path[1..])
            }
        }
    };
    base.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(base)
}

/// The leaves of a `use` tree (after `use`): each path and the name it is
/// bound to (`None` for `*`).
fn use_tree(toks: &[Tok], prefix: Vec<String>, out: &mut Vec<(Vec<String>, Option<String>)>) {
    let mut path = prefix.clone();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(s) if s == "as" => {
                if let Some(Tok::Ident(name)) = toks.get(i + 1) {
                    out.push((std::mem::take(&mut path), Some(name.clone())));
                }
                i += 2;
            }
            Tok::Ident(s) => {
                path.push(s.clone());
                i += 1;
            }
            Tok::Path => i += 1,
            Tok::Punct('*') => {
                out.push((std::mem::take(&mut path), None));
                i += 1;
            }
            Tok::Punct('{') => {
                let close = matching(toks, i);
                // Split the group on its top-level commas.
                let inner = &toks[i + 1..close];
                let mut level = 0;
                let mut start = 0;
                for (k, t) in inner.iter().enumerate() {
                    match t {
                        Tok::Punct('{') => level += 1,
                        Tok::Punct('}') => level -= 1,
                        Tok::Punct(',') if level == 0 => {
                            use_tree(&inner[start..k], path.clone(), out);
                            start = k + 1;
                        }
                        _ => {}
                    }
                }
                use_tree(&inner[start..], path.clone(), out);
                path.clear();
                i = close + 1;
            }
            _ => i += 1,
        }
    }
    if path.len() > prefix.len() {
        let name = match path.last().map(String::as_str) {
            Some("self") => path.iter().rev().nth(1).cloned(),
            other => other.map(str::to_owned),
        };
        out.push((path, name));
    }
}

/// The index of the `}` closing the `{` at `open` (or the end).
fn matching(toks: &[Tok], open: usize) -> usize {
    let mut level = 0;
    for (k, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Punct('{') => level += 1,
            Tok::Punct('}') => {
                level -= 1;
                if level == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(file: &str, module: &[&str], text: &str) -> (String, Module, String) {
        (
            file.to_owned(),
            module.iter().map(|s| s.to_string()).collect(),
            text.to_owned(),
        )
    }

    fn pairs(sources: &[(String, Module, String)]) -> Vec<(String, String)> {
        cycles(sources).into_keys().collect()
    }

    #[test]
    fn finds_a_pair_through_submodules_and_aliases() {
        let sources = [
            src("lib.rs", &[], "pub mod listener; pub mod worker;"),
            src("listener/mod.rs", &["listener"], "pub mod tcp;"),
            src(
                "listener/tcp.rs",
                &["listener", "tcp"],
                "use crate::worker::WorkerShared;",
            ),
            src(
                "worker.rs",
                &["worker"],
                "use crate::listener::{self, Activity};\nfn f() { listener::tcp::serve(); }",
            ),
        ];
        assert_eq!(pairs(&sources), [("listener".into(), "worker".into())]);
        let evidence = &cycles(&sources)[&("listener".to_owned(), "worker".to_owned())];
        assert!(evidence.contains(&"listener/tcp.rs uses crate::worker".to_owned()));
        assert!(evidence.contains(&"worker.rs uses crate::listener::tcp".to_owned()));
    }

    #[test]
    fn finds_siblings_through_super_and_expression_paths() {
        let sources = [
            src("up/mod.rs", &["up"], "mod a; mod b;"),
            src("up/a.rs", &["up", "a"], "use super::b::{Pool, Settings};"),
            src(
                "up/b.rs",
                &["up", "b"],
                "fn f() { let _ = super::a::X::new(); }",
            ),
        ];
        assert_eq!(pairs(&sources), [("up::a".into(), "up::b".into())]);
    }

    #[test]
    fn one_way_edges_containment_and_other_crates_are_not_cycles() {
        let sources = [
            src("config/mod.rs", &["config"], "pub mod file; use file::Raw;"),
            src(
                "config/file.rs",
                &["config", "file"],
                "use super::Config; use crate::balancer::X;",
            ),
            src("routing.rs", &["routing"], "use crate::config::Route;"),
            src(
                "proxy.rs",
                &["proxy"],
                "use crate::{config::Config, routing};\n#[cfg(test)]\nmod tests { use super::*; }",
            ),
        ];
        assert!(pairs(&sources).is_empty());
    }

    #[test]
    fn comments_strings_and_lifetimes_are_not_paths() {
        let sources = [
            src("a.rs", &["a"], "use crate::b::X;"),
            src(
                "b.rs",
                &["b"],
                "//! see [`crate::a`]\n/* crate::a::x */\nfn f<'a>(x: &'a str) -> char { let _ = \"crate::a::y\"; let _ = r#\"crate::a\"#; 'c' }",
            ),
        ];
        assert!(pairs(&sources).is_empty());
    }

    #[test]
    fn test_modules_count_and_resolve_super_to_the_file() {
        let sources = [
            src("a.rs", &["a"], "use crate::b::X;"),
            src(
                "b.rs",
                &["b"],
                "#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::a::Y;\n}",
            ),
        ];
        assert_eq!(pairs(&sources), [("a".into(), "b".into())]);
    }

    #[test]
    fn module_paths_of_files() {
        let m = |p: &str| module_of(Path::new(p)).unwrap_or_default();
        assert!(m("lib.rs").is_empty());
        assert_eq!(m("proxy.rs"), ["proxy"]);
        assert_eq!(m("config/mod.rs"), ["config"]);
        assert_eq!(m("config/resolve/tls.rs"), ["config", "resolve", "tls"]);
    }
}
