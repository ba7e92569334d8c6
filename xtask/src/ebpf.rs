//! Builds `spooky-ebpf/spooky.bpf.o` from its C source, and checks that the
//! committed object is what the source compiles to.
//!
//! The build is reproducible: clang runs in the source directory, the
//! absolute path is mapped to `.` in the debug info (`-fdebug-prefix-map`),
//! include-path environment variables are cleared, and clang embeds no
//! timestamps. Two checkouts at different paths therefore produce the same
//! bytes, given the same clang release and headers.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The entry point, relative to the source directory.
const SOURCE: &str = "spooky.bpf.c";
/// Compilers tried in order; the committed object is built by Debian's clang-19.
const COMPILERS: [&str; 2] = ["clang-19", "clang"];
/// The major version that built the committed object.
const EXPECTED_MAJOR: &str = "version 19.";
const INSTALL_HINT: &str = "apt-get install clang-19 libbpf-dev";

/// `cargo xtask build-ebpf`: compiles the program into the committed path.
pub fn build() -> Result<()> {
    let paths = Paths::new()?;
    let clang = Clang::find()?;
    // Compile next to the target and rename, so that a failed build never
    // leaves a truncated object where cargo embeds it.
    let tmp = paths.object.with_extension("o.tmp");
    clang.compile(&paths.src_dir, &tmp)?;
    fs::rename(&tmp, &paths.object)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    let len = fs::metadata(&paths.object).map(|m| m.len()).unwrap_or(0);
    println!(
        "built {} ({len} bytes) with {}",
        paths.object.display(),
        clang.version
    );
    Ok(())
}

/// `cargo xtask check-ebpf`: fails when the committed object is stale.
pub fn check() -> Result<()> {
    let paths = Paths::new()?;
    let clang = Clang::find()?;
    let tmp = std::env::temp_dir().join(format!("spooky-ebpf-check-{}.o", std::process::id()));
    let built = clang
        .compile(&paths.src_dir, &tmp)
        .and_then(|()| fs::read(&tmp).with_context(|| format!("cannot read {}", tmp.display())));
    let _ = fs::remove_file(&tmp);
    let built = built?;
    let committed = fs::read(&paths.object).with_context(|| {
        format!(
            "cannot read the committed object {}; run `cargo xtask build-ebpf`",
            paths.object.display()
        )
    })?;
    if built == committed {
        println!(
            "{} is up to date ({} bytes, {})",
            paths.object.display(),
            committed.len(),
            clang.version
        );
        return Ok(());
    }
    let mut msg = format!(
        "{} does not match its C source in {} ({} bytes committed, {} bytes built): \
         run `cargo xtask build-ebpf` and commit the result",
        paths.object.display(),
        paths.src_dir.display(),
        committed.len(),
        built.len()
    );
    if let Some(producer) = producer(&committed)
        && producer != clang.version
    {
        msg.push_str(&format!(
            "\nnote: the committed object was built by `{producer}`, this machine has `{}`; \
             a different clang release alone changes the bytes",
            clang.version
        ));
    }
    bail!(msg)
}

struct Paths {
    src_dir: PathBuf,
    object: PathBuf,
}

impl Paths {
    fn new() -> Result<Self> {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask is not inside the workspace")?
            .join("spooky-ebpf");
        // Canonical, so that the prefix map matches the directory clang sees
        // even when the checkout is reached through a symlink.
        let src_dir = crate_dir
            .join("src")
            .canonicalize()
            .with_context(|| format!("cannot find {}", crate_dir.join("src").display()))?;
        Ok(Self {
            src_dir,
            object: crate_dir.join("spooky.bpf.o"),
        })
    }
}

struct Clang {
    program: &'static str,
    /// First line of `--version`.
    version: String,
}

impl Clang {
    fn find() -> Result<Self> {
        for program in COMPILERS {
            let Ok(out) = Command::new(program).arg("--version").output() else {
                continue;
            };
            if !out.status.success() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text.lines().next().unwrap_or_default().trim().to_owned();
            if !version.contains(EXPECTED_MAJOR) {
                eprintln!(
                    "warning: using `{program}` ({version}); the committed object is built by \
                     clang 19 (`{INSTALL_HINT}`), so the bytes will differ"
                );
            }
            return Ok(Self { program, version });
        }
        bail!("no clang found (tried {COMPILERS:?}): run `{INSTALL_HINT}`")
    }

    fn compile(&self, src_dir: &Path, out: &Path) -> Result<()> {
        let helpers = Path::new("/usr/include/bpf/bpf_helpers.h");
        if !helpers.exists() {
            bail!(
                "{} is missing (libbpf's BPF headers): run `{INSTALL_HINT}`",
                helpers.display()
            );
        }
        let asm_dir = asm_include_dir()?;
        let out_abs = if out.is_absolute() {
            out.to_path_buf()
        } else {
            std::env::current_dir()?.join(out)
        };
        let output = Command::new(self.program)
            .current_dir(src_dir)
            // clang prefers $PWD over getcwd() for the compilation directory.
            .env("PWD", src_dir)
            .env_remove("CPATH")
            .env_remove("C_INCLUDE_PATH")
            .env_remove("CCC_OVERRIDE_OPTIONS")
            .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3"])
            .args(["-Wall", "-Wextra", "-Werror"])
            .arg(format!("-I{}", asm_dir.display()))
            .arg(format!("-fdebug-prefix-map={}=.", src_dir.display()))
            .args(["-c", SOURCE, "-o"])
            .arg(&out_abs)
            .output()
            .with_context(|| format!("cannot run {}", self.program))?;
        if !output.status.success() {
            bail!(
                "{} failed to compile {}:\n{}",
                self.program,
                src_dir.join(SOURCE).display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

/// Debian's multiarch directory holding `<asm/types.h>`, which the uapi
/// headers include and `-target bpf` does not search.
fn asm_include_dir() -> Result<PathBuf> {
    let triple = match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        other => bail!("no known multiarch include directory for {other}"),
    };
    let dir = Path::new("/usr/include").join(triple);
    if !dir.join("asm/types.h").exists() {
        bail!(
            "{} is missing: run `apt-get install linux-libc-dev` (and `{INSTALL_HINT}`)",
            dir.join("asm/types.h").display()
        );
    }
    Ok(dir)
}

/// The DWARF producer string ("Debian clang version ...") of an object.
fn producer(object: &[u8]) -> Option<String> {
    let needle = b"clang version";
    let at = object.windows(needle.len()).position(|w| w == needle)?;
    let start = object[..at]
        .iter()
        .rposition(|&b| b == 0)
        .map_or(0, |i| i + 1);
    let end = at + object[at..].iter().position(|&b| b == 0)?;
    String::from_utf8(object[start..end].to_vec()).ok()
}
