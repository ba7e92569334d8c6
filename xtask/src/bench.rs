//! `cargo xtask bench`: the benchmarks that check spooky's speed and memory
//! targets, each reported as a ratio against a peer measured in the same
//! run (DESIGN.md: this machine is shared, so only side-by-side figures
//! mean anything).

use anyhow::{Result, bail};

use crate::{cargo, must, root};

/// Runs the selected benchmarks.
pub fn run(_seconds: u64, _rounds: usize, only: Option<&str>) -> Result<()> {
    match only {
        None | Some("xdp") => xdp(),
        Some(other) => bail!("unknown benchmark `{other}`: use xdp"),
    }
}

/// XDP program cost per packet class (BPF_PROG_TEST_RUN with repeat).
fn xdp() -> Result<()> {
    must(
        cargo()
            .current_dir(root()?)
            .args(["bench", "-p", "spooky", "--bench", "xdp_steering"]),
    )
}
