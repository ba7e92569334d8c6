//! The vendored crates (`vendor/h3`, `vendor/quinn-proto`): checks that the
//! lock files really use them, and writes or checks each one's
//! `spooky.patch` against the crate as published.
//!
//! A `[patch.crates-io]` entry that stops applying (a version bump, a
//! `cargo update` after an upstream release) is silent: cargo warns once and
//! resolves the crate from the registry, and the fix it carries is gone. In a
//! lock file a path dependency has no `source =` line, so that is what
//! [`check_locks`] looks for.
//!
//! `spooky.patch` is `git diff --no-index` between the published crate
//! (unpacked by cargo into `$CARGO_HOME/registry/src`) and the vendored tree,
//! with git's configuration ignored and fixed options, so the same trees
//! always give the same bytes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The vendored crates, by crate name and directory under `vendor/`.
const VENDORED: [&str; 2] = ["h3", "quinn-proto"];

/// Lock files whose resolution must use `vendor/` (relative to the root).
const LOCK_FILES: [&str; 2] = ["Cargo.lock", "fuzz/Cargo.lock"];

/// Files left out of the patch: cargo's unpacking markers and generated
/// files, spooky's own notes, and the lock file (vendor/quinn-proto's is the
/// one its own tests run `--locked` with, not part of the source change).
const NOT_PATCHED: [&str; 6] = [
    ".cargo-ok",
    ".cargo_vcs_info.json",
    "Cargo.toml.orig",
    "Cargo.lock",
    "PATCHED.md",
    "spooky.patch",
];

/// The patch's name inside `vendor/<crate>/`.
const PATCH_FILE: &str = "spooky.patch";

/// `cargo xtask vendor-patches`: rewrites every `vendor/<crate>/spooky.patch`.
pub fn write_patches() -> Result<()> {
    let root = crate::root()?;
    for name in VENDORED {
        let patch = make_patch(&root, name)?;
        let path = root.join("vendor").join(name).join(PATCH_FILE);
        fs::write(&path, &patch).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} ({} bytes)", path.display(), patch.len());
    }
    Ok(())
}

/// `cargo xtask check-vendor`: the lock files resolve the vendored crates
/// from `vendor/`, and every committed `spooky.patch` is current.
pub fn check() -> Result<()> {
    let root = crate::root()?;
    check_locks(&root)?;
    for name in VENDORED {
        let path = root.join("vendor").join(name).join(PATCH_FILE);
        let committed = fs::read(&path).with_context(|| {
            format!(
                "cannot read {}: run `cargo xtask vendor-patches`",
                path.display()
            )
        })?;
        let current = make_patch(&root, name)?;
        if committed != current {
            bail!(
                "{} does not match vendor/{name} against the published crate: \
                 run `cargo xtask vendor-patches` and commit the result",
                path.display()
            );
        }
        println!("{} is current", path.display());
    }
    Ok(())
}

fn check_locks(root: &Path) -> Result<()> {
    for lock in LOCK_FILES {
        let path = root.join(lock);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        for name in VENDORED {
            lock_uses_path(&text, name).with_context(|| {
                format!(
                    "{lock}: the [patch.crates-io] entry for {name} no longer applies \
                     (its version must match vendor/{name}/Cargo.toml)"
                )
            })?;
        }
        println!("{lock} resolves {} from vendor/", VENDORED.join(" and "));
    }
    Ok(())
}

/// Errors unless every `[[package]]` named `name` in a lock file is a path
/// dependency (no `source`), and there is at least one.
fn lock_uses_path(lock: &str, name: &str) -> Result<()> {
    let mut found = 0usize;
    for package in lock.split("[[package]]").skip(1) {
        let mut pkg_name = None;
        let mut version = None;
        let mut source = None;
        for line in package.lines() {
            // A package's fields end at the next table (`[metadata]`, ...).
            if line.starts_with('[') {
                break;
            }
            if let Some((key, value)) = line.split_once(" = ") {
                let value = value.trim().trim_matches('"');
                match key.trim() {
                    "name" => pkg_name = Some(value),
                    "version" => version = Some(value),
                    "source" => source = Some(value),
                    _ => {}
                }
            }
        }
        if pkg_name != Some(name) {
            continue;
        }
        found += 1;
        if let Some(source) = source {
            bail!(
                "{name} {} is resolved from {source}, not from vendor/{name}",
                version.unwrap_or("(no version)")
            );
        }
    }
    if found == 0 {
        bail!("{name} is not in the lock file");
    }
    Ok(())
}

/// The unified diff from the published crate to `vendor/<name>`.
fn make_patch(root: &Path, name: &str) -> Result<Vec<u8>> {
    let vendored = root.join("vendor").join(name);
    let version = package_version(&vendored.join("Cargo.toml"))?;
    let pristine = pristine_source(name, &version)?;
    // Both trees are copied side by side as `a/` and `b/` so that the
    // patch names files `a/src/..` and `b/src/..` (`patch -p1`), whatever
    // the paths of the checkout and the registry.
    let work = crate::target_dir()?.join("xtask-vendor").join(name);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    copy_tree(&pristine, &work.join("a"))?;
    copy_tree(&vendored, &work.join("b"))?;
    let out = Command::new("git")
        .current_dir(&work)
        // No user or system configuration (diff.noprefix, color, algorithm).
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_EXTERNAL_DIFF")
        .args([
            "diff",
            "--no-index",
            "--no-color",
            "--no-ext-diff",
            "--no-renames",
            "--diff-algorithm=myers",
            "--unified=3",
            "--src-prefix=",
            "--dst-prefix=",
            "a",
            "b",
        ])
        .output()
        .context("cannot run git (needed to diff the vendored crates)")?;
    // `git diff --no-index` exits 1 when the trees differ, 0 when they do not.
    if out.status.code().is_none_or(|c| c > 1) {
        bail!(
            "git diff of {} against vendor/{name} failed: {}",
            pristine.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = fs::remove_dir_all(&work);
    let mut patch = format!(
        "spooky's changes to {name} {version} as published on crates.io (see PATCHED.md).\n\
         Written by `cargo xtask vendor-patches`; apply with `patch -p1` in the\n\
         unpacked crate. Not included: {}.\n\n",
        NOT_PATCHED.join(", ")
    )
    .into_bytes();
    patch.extend_from_slice(&out.stdout);
    Ok(patch)
}

/// `version = "..."` in the `[package]` table of a (normalised) manifest.
fn package_version(manifest: &Path) -> Result<String> {
    let text = fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package && let Some(value) = line.strip_prefix("version = ") {
            return Ok(value.trim_matches('"').to_owned());
        }
    }
    bail!("{} has no [package] version", manifest.display())
}

/// The published crate unpacked by cargo, fetched (through a scratch
/// package under the target directory) when it is not there yet.
fn pristine_source(name: &str, version: &str) -> Result<PathBuf> {
    if let Some(dir) = find_unpacked(name, version)? {
        return Ok(dir);
    }
    let scratch = crate::target_dir()?.join("xtask-pristine").join(name);
    fs::create_dir_all(scratch.join("src"))
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    // `[workspace]`: the scratch package is inside this checkout's tree but
    // not a member of its workspace.
    let manifest = format!(
        "[package]\nname = \"pristine\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
         [dependencies]\n{name} = {{ version = \"={version}\", default-features = false }}\n\n\
         [workspace]\n"
    );
    fs::write(scratch.join("Cargo.toml"), manifest)?;
    fs::write(scratch.join("src/lib.rs"), "")?;
    eprintln!("xtask: fetching {name} {version} from crates.io");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&scratch)
        .env_remove("CARGO_TARGET_DIR")
        .arg("fetch")
        .status()
        .context("cannot run cargo fetch")?;
    if !st.success() {
        bail!("cargo fetch of {name} {version} failed ({st}); is crates.io reachable?");
    }
    find_unpacked(name, version)?.with_context(|| {
        format!("cargo fetch did not unpack {name}-{version} under $CARGO_HOME/registry/src")
    })
}

fn find_unpacked(name: &str, version: &str) -> Result<Option<PathBuf>> {
    let home = match std::env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => PathBuf::from(std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?)
            .join(".cargo"),
    };
    let src = home.join("registry").join("src");
    let Ok(entries) = fs::read_dir(&src) else {
        return Ok(None);
    };
    // One directory per registry; sorted so the choice never varies.
    let mut registries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    registries.sort();
    Ok(registries
        .into_iter()
        .map(|r| r.join(format!("{name}-{version}")))
        // `.cargo-ok` is written last: a half-unpacked crate does not count.
        .find(|d| d.join(".cargo-ok").exists()))
}

/// Copies the regular files of a tree, minus [`NOT_PATCHED`] at its top.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    copy_dir(from, to, true)
}

fn copy_dir(from: &Path, to: &Path, top: bool) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let file_name = entry.file_name();
        if top && NOT_PATCHED.iter().any(|n| file_name == *n) {
            continue;
        }
        let kind = entry.file_type()?;
        let dest = to.join(&file_name);
        if kind.is_dir() {
            copy_dir(&entry.path(), &dest, false)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &dest)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::lock_uses_path;

    const PATCHED: &str = r#"
version = 4

[[package]]
name = "h2"
version = "0.4.12"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "aaaa"

[[package]]
name = "h3"
version = "0.0.8"
dependencies = [
 "bytes",
]

[[package]]
name = "h3-quinn"
version = "0.0.10"
source = "registry+https://github.com/rust-lang/crates.io-index"
"#;

    #[test]
    fn a_path_dependency_passes() {
        lock_uses_path(PATCHED, "h3").unwrap();
    }

    #[test]
    fn a_registry_source_fails() {
        let dropped = PATCHED.replace(
            "version = \"0.0.8\"\n",
            "version = \"0.0.8\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n",
        );
        let err = lock_uses_path(&dropped, "h3").unwrap_err().to_string();
        assert!(err.contains("resolved from registry+"), "{err}");
    }

    #[test]
    fn a_second_registry_copy_fails() {
        let both = format!(
            "{PATCHED}\n[[package]]\nname = \"h3\"\nversion = \"0.0.9\"\n\
             source = \"registry+https://github.com/rust-lang/crates.io-index\"\n"
        );
        assert!(lock_uses_path(&both, "h3").is_err());
    }

    #[test]
    fn a_missing_crate_fails() {
        assert!(lock_uses_path(PATCHED, "quinn-proto").is_err());
    }

    #[test]
    fn similar_names_do_not_count() {
        // h3-quinn has a source, and must not be taken for h3.
        lock_uses_path(PATCHED, "h3").unwrap();
        assert!(lock_uses_path(PATCHED, "h3-quin").is_err());
    }
}
