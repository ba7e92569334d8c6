//! Cost of the XDP steering program per packet class, measured by the
//! kernel with `BPF_PROG_TEST_RUN` and `repeat` on the object spooky
//! embeds, loaded and configured by spooky's control plane.
//!
//! Classes run interleaved, several rounds each, and the median of the
//! rounds is reported: the machine is shared, so a burst of noise hits one
//! round of every class rather than all rounds of one. The redirect classes
//! measure the program's decision only: in a test run the kernel does not
//! carry out the redirect.
//!
//! `cargo bench -p spooky --bench xdp_steering` (root). Knobs:
//! `SPOOKY_BENCH_REPEAT` (runs per measurement, default 1000000) and
//! `SPOOKY_BENCH_ROUNDS` (default 7).

// A benchmark: a failed setup step aborts the run, which is what unwrap
// does; the workspace denies it only for runtime code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/e2e/support/packets.rs"]
mod packets;

use packets::*;
use spooky::steering::xdp::{XdpSteering, action};
use spooky_common::{
    CidLayout, initial_dcid_hash,
    maps::{InitialLimit, WorkerState},
};

const PORT: u16 = 4433;

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pin_to_cpu0() -> bool {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

fn main() {
    // `cargo test --all-targets` builds and runs bench targets too; only
    // `cargo bench` (which passes --bench) should spend time measuring.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP xdp_steering: BPF_PROG_TEST_RUN needs root (or CAP_BPF + CAP_NET_ADMIN)");
        return;
    }
    if !pin_to_cpu0() {
        println!("SKIP xdp_steering: cannot pin to CPU 0, so local and redirect classes would mix");
        return;
    }
    let repeat = env_u32("SPOOKY_BENCH_REPEAT", 1_000_000).max(1);
    let rounds = env_u32("SPOOKY_BENCH_ROUNDS", 7).max(1);
    let cpus = aya::util::nr_cpus().unwrap_or(1) as u32;
    if cpus < 2 {
        println!("SKIP xdp_steering: needs 2 CPUs for the redirect class, this machine has {cpus}");
        return;
    }

    let layout = CidLayout::new(1, &[0xab, 0xcd], 12).expect("layout");
    let cid = |worker: u8| {
        let mut out = [0u8; 20];
        let n = layout
            .encode(
                worker,
                &pseudo_random_bytes(u64::from(worker) + 1, 20),
                &mut out,
            )
            .expect("encode");
        out[..n].to_vec()
    };

    let mut steering = match XdpSteering::load(&layout, &[PORT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xdp_steering: {e}");
            std::process::exit(1);
        }
    };
    let setup = steering
        .set_worker(0, 0, WorkerState::Live)
        .and_then(|()| steering.set_worker(1, 1, WorkerState::Live))
        .and_then(|()| steering.enable());
    if let Err(e) = setup {
        eprintln!("xdp_steering: {e}");
        std::process::exit(1);
    }

    // A client DCID that hashes to the remote worker: the full path,
    // hash plus redirect.
    let dcid = (0u64..)
        .map(|seed| pseudo_random_bytes(seed, 8))
        .find(|d| d[0] != cid(0)[0] && initial_dcid_hash(d) % 2 == 1)
        .expect("some DCID hashes to worker 1");

    let v4 = Frame::new(Ip::v4(), PORT);
    let classes: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "short header, local",
            v4.udp(&quic_short(&cid(0), 1200, true)),
            action::PASS,
        ),
        (
            "short header, redirect",
            v4.udp(&quic_short(&cid(1), 1200, true)),
            action::REDIRECT,
        ),
        (
            "Initial, hashed + redirect",
            v4.udp(&quic_long(
                LongType::Initial,
                QUIC_V1,
                &dcid,
                &[3; 8],
                1252,
                true,
            )),
            action::REDIRECT,
        ),
        (
            "Handshake, our CID, redirect",
            v4.udp(&quic_long(
                LongType::Handshake,
                QUIC_V1,
                &cid(1),
                &[3; 8],
                600,
                true,
            )),
            action::REDIRECT,
        ),
        (
            "short header, IPv6 + VLAN, redirect",
            Frame::new(Ip::v6(), PORT)
                .vlan(ETH_P_8021Q, 42)
                .udp(&quic_short(&cid(1), 1200, true)),
            action::REDIRECT,
        ),
        (
            "drop (Initial < 1200 bytes)",
            v4.udp(&quic_long(
                LongType::Initial,
                QUIC_V1,
                &dcid,
                &[3; 8],
                300,
                true,
            )),
            action::DROP,
        ),
        (
            "pass other (UDP to another port)",
            Frame::new(Ip::v4(), 53).udp(&[0u8; 64]),
            action::PASS,
        ),
    ];

    for (name, frame, expected) in &classes {
        match steering.test_run(frame, 1) {
            Ok(out) if out.action == *expected => {}
            Ok(out) => {
                eprintln!(
                    "xdp_steering: {name}: action {} instead of {expected}",
                    out.action
                );
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("xdp_steering: {e}");
                std::process::exit(1);
            }
        }
    }

    // The floor: the same program with steering disabled reads its config,
    // bumps one counter and passes. What the test run itself costs is in
    // here too.
    let disabled = match XdpSteering::load(&layout, &[PORT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xdp_steering: {e}");
            std::process::exit(1);
        }
    };
    let floor = "floor: steering disabled";

    // The per-source Initial limit (steering.initials_per_source): one
    // program whose limit never bites (1e9/s), so every Initial takes the
    // GCRA path and passes, and one at 1/s, where all but the first drop.
    let limited = |per_second: f64, burst: u32| {
        let mut s = XdpSteering::load(&layout, &[PORT])?;
        s.set_worker(0, 0, WorkerState::Live)?;
        s.set_worker(1, 1, WorkerState::Live)?;
        s.enable()?;
        s.set_initial_limit(InitialLimit::new(per_second, burst))?;
        Ok::<_, spooky::steering::xdp::XdpError>(s)
    };
    let (under_limit, over_limit) = match (limited(1e9, u32::MAX), limited(1.0, 1)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("xdp_steering: {e}");
            std::process::exit(1);
        }
    };
    let initial = &classes[2].1[..];
    let runs: Vec<(&str, &XdpSteering, &[u8])> =
        std::iter::once((floor, &disabled, &classes[0].1[..]))
            .chain(
                classes
                    .iter()
                    .map(|(name, frame, _)| (*name, &steering, &frame[..])),
            )
            .chain([
                ("Initial, per-source limit, passes", &under_limit, initial),
                ("Initial, per-source limit, dropped", &over_limit, initial),
            ])
            .collect();

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    for _ in 0..rounds {
        for (i, (name, program, frame)) in runs.iter().enumerate() {
            match program.test_run(frame, repeat) {
                // The kernel reports the mean over the repetitions.
                Ok(out) => samples[i].push(out.duration.as_nanos() as f64),
                Err(e) => {
                    eprintln!("xdp_steering: {name}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }

    println!("XDP steering program, BPF_PROG_TEST_RUN on CPU 0, {repeat} runs x {rounds} rounds");
    println!(
        "{:<38} {:>10} {:>10} {:>10}",
        "packet class", "median ns", "min ns", "max ns"
    );
    for ((name, _, _), s) in runs.iter().zip(samples.iter_mut()) {
        s.sort_by(f64::total_cmp);
        let median = s[s.len() / 2];
        println!(
            "{:<38} {:>10.1} {:>10.1} {:>10.1}",
            name,
            median,
            s[0],
            s[s.len() - 1]
        );
    }
}
