//! Root-only tests follow ARCHITECTURE.md ("Test topology rules"): without
//! root they skip with a printed reason, unless `SPOOKY_PRIVILEGED_TESTS=1` (set by CI), where a missing
//! privilege fails the test instead.

/// Returns `true` when the test may run. Prints why it skips otherwise, and
/// panics when privileged tests are required.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let required = std::env::var("SPOOKY_PRIVILEGED_TESTS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: needs root (SPOOKY_PRIVILEGED_TESTS=1 makes this a failure)"
    );
    eprintln!("SKIP {test}: needs root (run as root or with CAP_BPF + CAP_NET_ADMIN)");
    false
}
