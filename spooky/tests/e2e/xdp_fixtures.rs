//! The XDP program's fixture table: hand-built frames run through
//! `BPF_PROG_TEST_RUN` on the object spooky embeds, loaded by spooky's own
//! control plane (`XdpSteering::load`), asserting the action, the single
//! counter bumped and the CPU the packet was steered to.
//!
//! How the target CPU is observed without debug maps: the test thread is
//! pinned to CPU 0, workers sit on distinct CPUs, and the CPUMAP holds an
//! entry only for the CPU the row expects. Steering to CPU 0 is `XDP_PASS`
//! (already there); to the expected other CPU, `XDP_REDIRECT`; to any other
//! CPU, the redirect finds no entry and the program returns `XDP_PASS` and
//! counts `RedirectFailed`, which fails the row.

use crate::support::privilege;

use std::collections::BTreeSet;

use crate::support::packets::*;
use aya::maps::{Array, CpuMap, MapData};
use spooky::steering::xdp::{XdpSteering, action};
use spooky_common::{
    CidLayout, initial_dcid_hash,
    maps::{
        CPUMAP_QUEUE_SIZE, InitialLimit, SteeringConfig, WorkerSlot, WorkerState, XdpCounter, names,
    },
};

const PORT: u16 = 4433;
const OTHER_PORT: u16 = 8080;
/// Times each frame runs: every run must agree (the same Initial always
/// reaches the same CPU) and bump the expected counter once.
const RUNS: u64 = 3;

fn layout() -> CidLayout {
    CidLayout::new(1, &[0xab, 0xcd], 12).unwrap()
}

fn our_cid(worker: u8, nonce_seed: u64) -> Vec<u8> {
    let l = layout();
    let mut out = [0u8; 20];
    let nonce = pseudo_random_bytes(nonce_seed, 20);
    let n = l.encode(worker, &nonce, &mut out).unwrap();
    out[..n].to_vec()
}

fn client_dcid(seed: u64, len: usize) -> Vec<u8> {
    let mut d = pseudo_random_bytes(seed, len);
    // Make sure a client DCID never happens to look like ours.
    d[0] = 0x00;
    d
}

#[derive(Clone, Debug)]
struct Setup {
    /// (worker, cpu, state)
    workers: Vec<(u8, u32, WorkerState)>,
    enabled: bool,
}

impl Setup {
    fn two_live() -> Self {
        Self {
            workers: vec![(0, 0, WorkerState::Live), (1, 1, WorkerState::Live)],
            enabled: true,
        }
    }

    fn with(workers: &[(u8, u32, WorkerState)]) -> Self {
        Self {
            workers: workers.to_vec(),
            enabled: true,
        }
    }

    fn disabled(mut self) -> Self {
        self.enabled = false;
        self
    }

    fn live(&self) -> Vec<u8> {
        let mut live: Vec<u8> = self
            .workers
            .iter()
            .filter(|w| w.2 == WorkerState::Live)
            .map(|w| w.0)
            .collect();
        live.sort_unstable();
        live
    }

    fn cpu_of(&self, worker: u8) -> u32 {
        self.workers
            .iter()
            .find(|w| w.0 == worker)
            .map(|w| w.1)
            .unwrap()
    }

    fn highest_cpu(&self) -> u32 {
        self.workers.iter().map(|w| w.1).max().unwrap_or(0)
    }

    /// The CPU the program must pick for a client-chosen DCID.
    fn hashed_cpu(&self, dcid: &[u8]) -> u32 {
        let live = self.live();
        let worker = live[(initial_dcid_hash(dcid) % live.len() as u32) as usize];
        self.cpu_of(worker)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expect {
    action: u32,
    counter: XdpCounter,
    /// The CPU the packet is steered to, when it is steered.
    cpu: Option<u32>,
}

/// The outcome of steering to `cpu` from CPU 0 with `local`/`redirect`
/// counters.
fn steered(cpu: u32, local: XdpCounter, redirect: XdpCounter) -> Expect {
    if cpu == 0 {
        Expect {
            action: action::PASS,
            counter: local,
            cpu: Some(0),
        }
    } else {
        Expect {
            action: action::REDIRECT,
            counter: redirect,
            cpu: Some(cpu),
        }
    }
}

fn short_to(cpu: u32) -> Expect {
    steered(cpu, XdpCounter::ShortLocal, XdpCounter::ShortRedirect)
}

fn ours_long_to(cpu: u32) -> Expect {
    steered(cpu, XdpCounter::LongOursLocal, XdpCounter::LongOursRedirect)
}

fn hashed_to(cpu: u32) -> Expect {
    steered(cpu, XdpCounter::LongHashLocal, XdpCounter::LongHashRedirect)
}

fn unknown_to(cpu: u32) -> Expect {
    steered(cpu, XdpCounter::UnknownWorker, XdpCounter::UnknownWorker)
}

fn pass(counter: XdpCounter) -> Expect {
    Expect {
        action: action::PASS,
        counter,
        cpu: None,
    }
}

fn drop(counter: XdpCounter) -> Expect {
    Expect {
        action: action::DROP,
        counter,
        cpu: None,
    }
}

struct Row {
    name: String,
    frame: Vec<u8>,
    setup: Setup,
    expect: Expect,
}

fn row(name: impl Into<String>, frame: Vec<u8>, setup: Setup, expect: Expect) -> Row {
    Row {
        name: name.into(),
        frame,
        setup,
        expect,
    }
}

fn v4() -> Frame {
    Frame::new(Ip::v4(), PORT)
}

fn v6() -> Frame {
    Frame::new(Ip::v6(), PORT)
}

fn initial(dcid: &[u8], len: usize) -> Vec<u8> {
    quic_long(LongType::Initial, QUIC_V1, dcid, &[7; 8], len, true)
}

fn rows() -> Vec<Row> {
    let two = Setup::two_live;
    let mut rows = vec![
        // Short headers carrying our CIDs.
        row(
            "v4 short ours -> other CPU",
            v4().udp(&quic_short(&our_cid(1, 1), 60, true)),
            two(),
            short_to(1),
        ),
        row(
            "v4 short ours -> this CPU",
            v4().udp(&quic_short(&our_cid(0, 2), 60, true)),
            two(),
            short_to(0),
        ),
        row(
            "v6 short ours -> other CPU",
            v6().udp(&quic_short(&our_cid(1, 3), 60, true)),
            two(),
            short_to(1),
        ),
        row(
            "v6 short ours -> this CPU",
            v6().udp(&quic_short(&our_cid(0, 4), 60, true)),
            two(),
            short_to(0),
        ),
        row(
            "802.1Q v4 short ours -> other CPU",
            v4().vlan(ETH_P_8021Q, 42)
                .udp(&quic_short(&our_cid(1, 5), 60, true)),
            two(),
            short_to(1),
        ),
        row(
            "802.1AD v6 short ours -> other CPU",
            v6().vlan(ETH_P_8021AD, 7)
                .udp(&quic_short(&our_cid(1, 6), 60, true)),
            two(),
            short_to(1),
        ),
        row(
            "v4 with 12 bytes of options, short ours -> other CPU",
            Frame::new(
                Ip::V4 {
                    options: vec![1; 12],
                    more_fragments: false,
                },
                PORT,
            )
            .udp(&quic_short(&our_cid(1, 7), 60, true)),
            two(),
            short_to(1),
        ),
        row(
            "v4 with 40 bytes of options (ihl 15), short ours -> this CPU",
            Frame::new(
                Ip::V4 {
                    options: vec![1; 40],
                    more_fragments: false,
                },
                PORT,
            )
            .udp(&quic_short(&our_cid(0, 8), 60, true)),
            two(),
            short_to(0),
        ),
        row(
            "short exactly 1 + cid_len bytes -> other CPU",
            v4().udp(&quic_short(&our_cid(1, 9), 13, true)),
            two(),
            short_to(1),
        ),
        // Draining: keeps its CIDs, gets no new handshakes.
        row(
            "short to a draining worker still reaches it",
            v4().udp(&quic_short(&our_cid(1, 10), 60, true)),
            Setup::with(&[(0, 0, WorkerState::Live), (1, 1, WorkerState::Draining)]),
            short_to(1),
        ),
        row(
            "short to a draining worker with no live worker left",
            v6().udp(&quic_short(&our_cid(1, 11), 60, true)),
            Setup::with(&[(1, 1, WorkerState::Draining)]),
            short_to(1),
        ),
        // Long headers carrying our CIDs (Handshake, 0-RTT after Retry...).
        row(
            "v1 Handshake with our DCID -> other CPU",
            v4().udp(&quic_long(
                LongType::Handshake,
                QUIC_V1,
                &our_cid(1, 12),
                &[9; 8],
                300,
                true,
            )),
            two(),
            ours_long_to(1),
        ),
        row(
            "v1 Handshake with our DCID -> this CPU",
            v6().udp(&quic_long(
                LongType::Handshake,
                QUIC_V1,
                &our_cid(0, 13),
                &[9; 8],
                300,
                true,
            )),
            two(),
            ours_long_to(0),
        ),
        row(
            "v2 Initial >= 1200 with our DCID (after Retry) -> other CPU",
            v4().udp(&quic_long(
                LongType::Initial,
                QUIC_V2,
                &our_cid(1, 14),
                &[9; 8],
                1200,
                true,
            )),
            two(),
            ours_long_to(1),
        ),
        // Drops.
        row(
            "Initial of 1199 bytes",
            v4().udp(&initial(&client_dcid(20, 8), 1199)),
            two(),
            drop(XdpCounter::DropSmallInitial),
        ),
        row(
            "v2 Initial of 300 bytes",
            v6().udp(&quic_long(
                LongType::Initial,
                QUIC_V2,
                &client_dcid(21, 8),
                &[1; 8],
                300,
                true,
            )),
            two(),
            drop(XdpCounter::DropSmallInitial),
        ),
        row(
            "short header with the fixed bit clear",
            v4().udp(&quic_short(&our_cid(1, 22), 60, false)),
            two(),
            drop(XdpCounter::DropFixedBit),
        ),
        row(
            "long header with the fixed bit clear",
            v4().udp(&quic_long(
                LongType::Initial,
                QUIC_V1,
                &client_dcid(23, 8),
                &[1; 8],
                1200,
                false,
            )),
            two(),
            drop(XdpCounter::DropFixedBit),
        ),
        row(
            "short header truncated inside the DCID",
            v4().udp(&quic_short(&our_cid(1, 24), 13, true)[..12]),
            two(),
            drop(XdpCounter::DropTooShort),
        ),
        row(
            "empty UDP payload",
            v4().udp(&[]),
            two(),
            drop(XdpCounter::DropTooShort),
        ),
        row(
            "long header of 6 bytes",
            v4().udp(&[0xc0, 0, 0, 0, 1, 0]),
            two(),
            drop(XdpCounter::DropTooShort),
        ),
        row(
            "3-byte payload padded by Ethernet: the UDP length counts",
            v4().trailer(30).udp(&[0x40, 0x55, 0x55]),
            two(),
            drop(XdpCounter::DropTooShort),
        ),
        row(
            "long header with DCID length 21",
            v4().udp(&quic_long(
                LongType::Initial,
                QUIC_V1,
                &client_dcid(25, 21),
                &[1; 8],
                1250,
                true,
            )),
            two(),
            drop(XdpCounter::DropBadLongHeader),
        ),
        row(
            "long header whose DCID runs past the datagram",
            v4().udp(&[0xc0, 0, 0, 0, 1, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
            two(),
            drop(XdpCounter::DropBadLongHeader),
        ),
        // Not for us.
        row(
            "UDP to another port",
            Frame::new(Ip::v4(), OTHER_PORT).udp(&quic_short(&our_cid(1, 30), 60, true)),
            two(),
            pass(XdpCounter::PassOther),
        ),
        row(
            "UDP to the second listener port (443)",
            Frame::new(Ip::v4(), 443).udp(&quic_short(&our_cid(1, 36), 60, true)),
            two(),
            short_to(1),
        ),
        row(
            "UDP to the ports next to the listener (4432)",
            Frame::new(Ip::v4(), PORT - 1).udp(&quic_short(&our_cid(1, 37), 60, true)),
            two(),
            pass(XdpCounter::PassOther),
        ),
        row(
            "UDP to the ports next to the listener (4434)",
            Frame::new(Ip::v6(), PORT + 1).udp(&quic_short(&our_cid(1, 38), 60, true)),
            two(),
            pass(XdpCounter::PassOther),
        ),
        row(
            "TCP SYN to the QUIC port",
            v4().tcp_syn(),
            two(),
            pass(XdpCounter::PassOther),
        ),
        row(
            "TCP SYN to the QUIC port over v6",
            v6().tcp_syn(),
            two(),
            pass(XdpCounter::PassOther),
        ),
        row("ARP", arp_frame(), two(), pass(XdpCounter::PassOther)),
        row(
            "v4 fragment (MF set)",
            Frame::new(
                Ip::V4 {
                    options: Vec::new(),
                    more_fragments: true,
                },
                PORT,
            )
            .udp(&quic_short(&our_cid(1, 31), 60, true)),
            two(),
            pass(XdpCounter::PassOther),
        ),
        row(
            "v6 with a hop-by-hop header",
            Frame::new(Ip::V6 { hop_by_hop: true }, PORT).udp(&quic_short(
                &our_cid(1, 32),
                60,
                true,
            )),
            two(),
            pass(XdpCounter::PassOther),
        ),
        row(
            "steering disabled (enabled = 0)",
            v4().udp(&quic_short(&our_cid(1, 33), 60, true)),
            two().disabled(),
            pass(XdpCounter::PassOther),
        ),
        row(
            "no live worker for an Initial",
            v4().udp(&initial(&client_dcid(34, 8), 1200)),
            Setup::with(&[(0, 0, WorkerState::Absent), (1, 1, WorkerState::Draining)]),
            pass(XdpCounter::NoLiveWorker),
        ),
        row(
            "short to an absent worker with no live worker",
            v4().udp(&quic_short(&our_cid(1, 35), 60, true)),
            Setup::with(&[(1, 1, WorkerState::Absent)]),
            pass(XdpCounter::NoLiveWorker),
        ),
    ];

    // Hash rows: the expected CPU comes from spooky-common's FNV-1a, so the
    // C mirror must agree byte for byte. Several seeds make both CPUs show
    // up (asserted below), so a wrong hash cannot pass by luck.
    let setups = [
        ("2 live", Setup::two_live()),
        (
            "3 live",
            Setup::with(&[
                (0, 0, WorkerState::Live),
                (1, 1, WorkerState::Live),
                (2, 0, WorkerState::Live),
            ]),
        ),
        (
            "live 0 + draining 1 (no hashed Initials for 1)",
            Setup::with(&[(0, 0, WorkerState::Live), (1, 1, WorkerState::Draining)]),
        ),
        (
            "sparse ids 3, 7, 200",
            Setup::with(&[
                (3, 1, WorkerState::Live),
                (7, 0, WorkerState::Live),
                (200, 1, WorkerState::Live),
                (9, 1, WorkerState::Absent),
            ]),
        ),
    ];
    for (label, setup) in setups {
        for seed in 0..8u64 {
            let len = [8usize, 20, 1, 0, 16, 8, 12, 5][seed as usize];
            let dcid = client_dcid(100 + seed, len.max(1))
                .into_iter()
                .take(len)
                .collect::<Vec<_>>();
            let frame = if seed % 2 == 0 { v4() } else { v6() };
            let cpu = setup.hashed_cpu(&dcid);
            rows.push(row(
                format!("{label}: v1 Initial, {len}-byte client DCID #{seed}"),
                frame.udp(&initial(&dcid, 1200 + seed as usize * 37)),
                setup.clone(),
                hashed_to(cpu),
            ));
        }
    }
    let two_setup = Setup::two_live();
    for seed in 0..4u64 {
        let dcid = client_dcid(200 + seed, 8);
        let cpu = two_setup.hashed_cpu(&dcid);
        rows.push(row(
            format!("v2 Initial, client DCID #{seed}"),
            v6().udp(&quic_long(
                LongType::Initial,
                QUIC_V2,
                &dcid,
                &[1; 8],
                1300,
                true,
            )),
            two(),
            hashed_to(cpu),
        ));
        rows.push(row(
            format!("v1 0-RTT, client DCID #{seed} (any size)"),
            v4().udp(&quic_long(
                LongType::ZeroRtt,
                QUIC_V1,
                &dcid,
                &[1; 8],
                200,
                true,
            )),
            two(),
            hashed_to(cpu),
        ));
        rows.push(row(
            format!("unknown version 0x1a2a3a4a, client DCID #{seed} (any size)"),
            v4().udp(&quic_long(
                LongType::Bits(0),
                0x1a2a_3a4a,
                &dcid,
                &[1; 8],
                100,
                true,
            )),
            two(),
            hashed_to(cpu),
        ));
        rows.push(row(
            format!("v2 type 00 is Retry, not Initial: small is fine, DCID #{seed}"),
            v4().udp(&quic_long(
                LongType::Retry,
                QUIC_V2,
                &dcid,
                &[1; 8],
                100,
                true,
            )),
            two(),
            hashed_to(cpu),
        ));
    }
    // Our format, but the worker is absent (or the CID is another node's):
    // the DCID is re-hashed.
    for seed in 0..4u64 {
        let absent = our_cid(5, 300 + seed);
        rows.push(row(
            format!("short naming absent worker 5 #{seed}"),
            v4().udp(&quic_short(&absent, 60, true)),
            two(),
            unknown_to(two_setup.hashed_cpu(&absent)),
        ));
        rows.push(row(
            format!("Handshake naming absent worker 5 #{seed}"),
            v6().udp(&quic_long(
                LongType::Handshake,
                QUIC_V1,
                &absent,
                &[1; 8],
                400,
                true,
            )),
            two(),
            unknown_to(two_setup.hashed_cpu(&absent)),
        ));
        let mut foreign = our_cid(1, 310 + seed);
        foreign[1] ^= 0xff; // another node ID
        rows.push(row(
            format!("short with another node's CID #{seed}"),
            v4().udp(&quic_short(&foreign, 60, true)),
            two(),
            unknown_to(two_setup.hashed_cpu(&foreign)),
        ));
        // The config rotation bits name the process generation: during an
        // upgrade the previous generation's CIDs still reach their worker's
        // CPU (the reuseport program then picks that generation's socket).
        let mut rotated = our_cid(1, 320 + seed);
        rotated[0] ^= 0x20; // another generation
        rows.push(row(
            format!("Handshake with a CID of another generation #{seed}"),
            v4().udp(&quic_long(
                LongType::Handshake,
                QUIC_V1,
                &rotated,
                &[1; 8],
                400,
                true,
            )),
            two(),
            ours_long_to(1),
        ));
        let mut unroutable = our_cid(1, 330 + seed);
        unroutable[0] |= 0xe0; // config rotation 0b111: unroutable
        rows.push(row(
            format!("Handshake with an unroutable CID #{seed}"),
            v4().udp(&quic_long(
                LongType::Handshake,
                QUIC_V1,
                &unroutable,
                &[1; 8],
                400,
                true,
            )),
            two(),
            hashed_to(two_setup.hashed_cpu(&unroutable)),
        ));
    }
    // Repeated Initial: a retransmission carries the same DCID in a
    // different datagram (new packet number, other size, other source
    // port); it must reach the same CPU.
    let dcid = client_dcid(400, 8);
    let cpu = two_setup.hashed_cpu(&dcid);
    for (i, (len, port)) in [(1200usize, 50_000u16), (1252, 50_000), (1350, 61_000)]
        .into_iter()
        .enumerate()
    {
        let mut f = v4();
        f.src_port = port;
        rows.push(row(
            format!("Initial retransmission {i} of one handshake"),
            f.udp(&initial(&dcid, len)),
            two(),
            hashed_to(cpu),
        ));
    }
    // Needs a third CPU: skipped on smaller machines.
    rows.push(row(
        "short ours -> CPU 2",
        v4().udp(&quic_short(&our_cid(2, 500), 60, true)),
        Setup::with(&[
            (0, 0, WorkerState::Live),
            (1, 1, WorkerState::Live),
            (2, 2, WorkerState::Live),
        ]),
        short_to(2),
    ));
    rows
}

fn pin_to_cpu0() {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "cannot pin the test thread to CPU 0"
        );
    }
}

fn possible_cpus() -> u32 {
    aya::util::nr_cpus().expect("cannot read the possible CPUs") as u32
}

/// Loads the program the production way, then writes the worker maps
/// directly so that the CPUMAP holds only `cpumap_cpus`.
fn load(setup: &Setup, cpumap_cpus: &BTreeSet<u32>) -> XdpSteering {
    let mut s = XdpSteering::load(&layout(), &[PORT, 443]).expect("load the XDP program");
    if setup.enabled {
        s.enable().unwrap();
    }
    let ebpf = s.ebpf_mut();
    {
        let mut workers: Array<&mut MapData, WorkerSlot> =
            Array::try_from(ebpf.map_mut(names::WORKERS).unwrap()).unwrap();
        for &(w, cpu, state) in &setup.workers {
            workers
                .set(
                    u32::from(w),
                    WorkerSlot {
                        cpu,
                        state: state as u32,
                    },
                    0,
                )
                .unwrap();
        }
    }
    let live = setup.live();
    {
        let mut list: Array<&mut MapData, u32> =
            Array::try_from(ebpf.map_mut(names::LIVE).unwrap()).unwrap();
        for (i, &w) in live.iter().enumerate() {
            list.set(i as u32, u32::from(w), 0).unwrap();
        }
    }
    {
        let mut config: Array<&mut MapData, SteeringConfig> =
            Array::try_from(ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        let mut c = config.get(&0, 0).unwrap();
        assert_eq!(
            c.enabled,
            u8::from(setup.enabled),
            "enable() wrote the config"
        );
        c.live_count = live.len() as u32;
        config.set(0, c, 0).unwrap();
    }
    {
        let mut cpumap: CpuMap<&mut MapData> =
            CpuMap::try_from(ebpf.map_mut(names::CPUMAP).unwrap()).unwrap();
        for &cpu in cpumap_cpus {
            cpumap.set(cpu, CPUMAP_QUEUE_SIZE, None, 0).unwrap();
        }
    }
    s
}

/// Runs `frame` `runs` times: the actions, and the counters that moved
/// with how much.
fn run_frame(
    steering: &XdpSteering,
    frame: &[u8],
    runs: u64,
) -> (Vec<u32>, Vec<(XdpCounter, u64)>) {
    let before = steering.counters().unwrap();
    let actions = (0..runs)
        .map(|_| {
            steering
                .test_run(frame, 1)
                .expect("BPF_PROG_TEST_RUN")
                .action
        })
        .collect();
    let after = steering.counters().unwrap();
    let delta = XdpCounter::ALL
        .iter()
        .map(|&c| (c, after[c as usize] - before[c as usize]))
        .filter(|&(_, d)| d != 0)
        .collect();
    (actions, delta)
}

fn action_name(a: u32) -> &'static str {
    match a {
        action::ABORTED => "ABORTED",
        action::DROP => "DROP",
        action::PASS => "PASS",
        action::TX => "TX",
        action::REDIRECT => "REDIRECT",
        _ => "?",
    }
}

#[test]
fn xdp_fixture_table() {
    if !privilege::require_root("xdp_fixture_table") {
        return;
    }
    pin_to_cpu0();
    let cpus = possible_cpus();
    let rows = rows();

    // The table must be able to tell a wrong hash apart: hashed rows have
    // to expect both CPUs.
    let hashed: BTreeSet<Option<u32>> = rows
        .iter()
        .filter(|r| {
            r.expect.counter == XdpCounter::LongHashLocal
                || r.expect.counter == XdpCounter::LongHashRedirect
        })
        .map(|r| r.expect.cpu)
        .collect();
    assert!(
        hashed.contains(&Some(0)) && hashed.contains(&Some(1)),
        "hash rows expect only {hashed:?}"
    );

    let mut failures = Vec::new();
    let mut skipped = 0;
    println!(
        "{:<66} {:<9} {:<20} {:<4} result",
        "fixture", "action", "counter", "cpu"
    );
    for r in &rows {
        if r.setup.highest_cpu() >= cpus {
            println!(
                "{:<66} SKIP: needs CPU {} (this machine has {cpus})",
                r.name,
                r.setup.highest_cpu()
            );
            skipped += 1;
            continue;
        }
        let cpumap: BTreeSet<u32> = match r.expect.cpu {
            // Only the expected target, so that any other choice fails.
            Some(cpu) => [cpu].into(),
            // Not steered: every worker CPU, so that a wrongful steer
            // shows up as XDP_REDIRECT.
            None => r.setup.workers.iter().map(|w| w.1).collect(),
        };
        let steering = load(&r.setup, &cpumap);
        let (actions, delta) = run_frame(&steering, &r.frame, RUNS);
        let want_delta = vec![(r.expect.counter, RUNS)];
        let ok = actions.iter().all(|&a| a == r.expect.action) && delta == want_delta;
        let cpu = r.expect.cpu.map_or("-".to_string(), |c| c.to_string());
        println!(
            "{:<66} {:<9} {:<20} {:<4} {}",
            r.name,
            action_name(r.expect.action),
            r.expect.counter.name(),
            cpu,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!(
                "{}: expected {} + {} x{RUNS} (cpu {cpu}), got actions {:?}, counter deltas {:?}",
                r.name,
                action_name(r.expect.action),
                r.expect.counter.name(),
                actions.iter().map(|&a| action_name(a)).collect::<Vec<_>>(),
                delta
                    .iter()
                    .map(|(c, d)| format!("{}+{d}", c.name()))
                    .collect::<Vec<_>>(),
            ));
        }
    }
    println!(
        "{} rows, {} passed, {} failed, {skipped} skipped",
        rows.len(),
        rows.len() - failures.len() - skipped,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "fixture failures:\n{}",
        failures.join("\n")
    );
}

/// The per-source limit on new-connection Initials: a source gets its
/// burst, then drops (counted) until its schedule allows the next; other
/// sources, one IPv6 /64 as one source, Initials of handshakes in progress
/// (our CID) and every other packet are untouched; lifting the limit lets
/// the source through again.
#[test]
fn initials_beyond_a_sources_rate_are_dropped() {
    if !privilege::require_root("initials_beyond_a_sources_rate_are_dropped") {
        return;
    }
    pin_to_cpu0();
    // One live worker on this CPU: a passed Initial is XDP_PASS locally.
    let setup = Setup::with(&[(0, 0, WorkerState::Live)]);
    let mut steering = load(&setup, &[0].into());
    // 1 per second, bursts of 4: nothing refills during the test's
    // milliseconds of runs.
    steering
        .set_initial_limit(InitialLimit::new(1.0, 4))
        .unwrap();

    let hashed = hashed_to(0);
    let limited = drop(XdpCounter::DropInitialRate);
    let new_conn = initial(&client_dcid(900, 8), 1200);
    let mut failures = Vec::new();
    // Runs each step's frame `runs` times, in order (the steps share the
    // sources' schedules).
    let mut run = |steering: &XdpSteering, steps: Vec<(&str, Vec<u8>, u64, Expect)>| {
        for (name, frame, runs, want) in steps {
            let (actions, delta) = run_frame(steering, &frame, runs);
            let ok =
                actions.iter().all(|&a| a == want.action) && delta == vec![(want.counter, runs)];
            println!("{name:<60} {}", if ok { "ok" } else { "FAIL" });
            if !ok {
                failures.push(format!(
                    "{name}: expected {} + {} x{runs}, got {:?} and {delta:?}",
                    action_name(want.action),
                    want.counter.name(),
                    actions.iter().map(|&a| action_name(a)).collect::<Vec<_>>()
                ));
            }
        }
    };

    let a4 = v4().with_source(0, 10);
    let a6 = v6().with_source(5, 1);
    let handshake = quic_long(
        LongType::Handshake,
        QUIC_V1,
        &client_dcid(903, 8),
        &[7; 8],
        200,
        true,
    );
    run(
        &steering,
        vec![
            (
                "v4 source A: its burst of 4 passes",
                a4.udp(&new_conn),
                4,
                hashed,
            ),
            ("v4 source A: then dropped", a4.udp(&new_conn), 3, limited),
            (
                "v4 source A: a new DCID is no way round",
                a4.udp(&initial(&client_dcid(901, 16), 1300)),
                1,
                limited,
            ),
            (
                "v4 source B: its own burst",
                v4().with_source(0, 11).udp(&new_conn),
                4,
                hashed,
            ),
            (
                "v4 source A: an Initial to our CID (handshake in progress)",
                a4.udp(&initial(&our_cid(0, 902), 1200)),
                2,
                ours_long_to(0),
            ),
            (
                "v4 source A: a Handshake packet",
                a4.udp(&handshake),
                1,
                hashed,
            ),
            (
                "v4 source A: a short header",
                a4.udp(&quic_short(&our_cid(0, 904), 60, true)),
                1,
                short_to(0),
            ),
            (
                "v4 source A: a small Initial is still dropped as small",
                a4.udp(&initial(&client_dcid(905, 8), 900)),
                1,
                drop(XdpCounter::DropSmallInitial),
            ),
            ("v6 2001:2:0:5::1: burst", a6.udp(&new_conn), 4, hashed),
            (
                "v6 2001:2:0:5::1: then dropped",
                a6.udp(&new_conn),
                1,
                limited,
            ),
            (
                "v6 2001:2:0:5::2: the same /64, dropped",
                v6().with_source(5, 2).udp(&new_conn),
                1,
                limited,
            ),
            (
                "v6 2001:2:0:6::1: another /64",
                v6().with_source(6, 1).udp(&new_conn),
                1,
                hashed,
            ),
        ],
    );

    // 10 per second, no burst: the next Initial is due 100 ms later.
    steering
        .set_initial_limit(InitialLimit::new(10.0, 1))
        .unwrap();
    let c4 = v4().with_source(0, 12).udp(&new_conn);
    run(
        &steering,
        vec![
            (
                "v4 source C at 10/s: the first passes",
                c4.clone(),
                1,
                hashed,
            ),
            (
                "v4 source C at 10/s: at once, dropped",
                c4.clone(),
                1,
                limited,
            ),
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(150));
    run(
        &steering,
        vec![("v4 source C at 10/s: 150 ms later, passes", c4, 1, hashed)],
    );

    steering.set_initial_limit(None).unwrap();
    run(
        &steering,
        vec![(
            "limit lifted: source A passes",
            a4.udp(&new_conn),
            5,
            hashed,
        )],
    );

    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// The control plane's own map maintenance: live list in worker order,
/// count after list, CPUMAP entries for live and draining CPUs only.
#[test]
fn set_worker_maintains_the_maps() {
    if !privilege::require_root("set_worker_maintains_the_maps") {
        return;
    }
    pin_to_cpu0();
    if possible_cpus() < 2 {
        println!("SKIP set_worker_maintains_the_maps: needs 2 CPUs");
        return;
    }
    let mut s = XdpSteering::load(&layout(), &[PORT]).unwrap();
    let frame_to = |w: u8| v4().udp(&quic_short(&our_cid(w, 77), 60, true));

    // Disabled until enable(): everything passes.
    s.set_worker(1, 1, WorkerState::Live).unwrap();
    assert_eq!(s.test_run(&frame_to(1), 1).unwrap().action, action::PASS);

    s.set_worker(3, 0, WorkerState::Live).unwrap();
    s.set_worker(0, 0, WorkerState::Live).unwrap();
    s.set_worker(2, 1, WorkerState::Draining).unwrap();
    s.enable().unwrap();

    let read_live = |s: &XdpSteering| -> Vec<u32> {
        let ebpf = s.ebpf();
        let config: Array<&MapData, SteeringConfig> =
            Array::try_from(ebpf.map(names::CONFIG).unwrap()).unwrap();
        let c = config.get(&0, 0).unwrap();
        assert_eq!(c.enabled, 1);
        assert_eq!(c.cid_len, 12);
        assert_eq!(c.first_octet, layout().first_octet());
        assert_eq!(&c.node_id[..c.node_id_len as usize], layout().node_id());
        let list: Array<&MapData, u32> = Array::try_from(ebpf.map(names::LIVE).unwrap()).unwrap();
        (0..c.live_count)
            .map(|i| list.get(&i, 0).unwrap())
            .collect()
    };
    let cpumap_has = |s: &XdpSteering, cpu: u32| -> bool {
        let cpumap: CpuMap<&MapData> =
            CpuMap::try_from(s.ebpf().map(names::CPUMAP).unwrap()).unwrap();
        cpumap.get(cpu, 0).is_ok()
    };

    assert_eq!(read_live(&s), vec![0, 1, 3]);
    assert!(cpumap_has(&s, 0) && cpumap_has(&s, 1));
    assert_eq!(
        s.test_run(&frame_to(1), 1).unwrap().action,
        action::REDIRECT
    );
    assert_eq!(
        s.test_run(&frame_to(2), 1).unwrap().action,
        action::REDIRECT,
        "draining keeps its CIDs"
    );
    assert_eq!(s.test_run(&frame_to(3), 1).unwrap().action, action::PASS);

    // Worker 1 stops: CPU 1 still serves draining worker 2.
    s.set_worker(1, 1, WorkerState::Absent).unwrap();
    assert_eq!(read_live(&s), vec![0, 3]);
    assert!(cpumap_has(&s, 1));
    // Worker 2 finishes draining: nothing runs on CPU 1 any more.
    s.set_worker(2, 1, WorkerState::Absent).unwrap();
    assert!(!cpumap_has(&s, 1), "an unused CPU leaves the CPUMAP");
    assert!(cpumap_has(&s, 0));
    // Its CIDs now hash over the live workers, all on CPU 0.
    assert_eq!(s.test_run(&frame_to(2), 1).unwrap().action, action::PASS);

    let counters = s.counters().unwrap();
    assert_eq!(counters[XdpCounter::PassOther as usize], 1);
    assert_eq!(counters[XdpCounter::ShortRedirect as usize], 2);
    assert_eq!(counters[XdpCounter::ShortLocal as usize], 1);
    assert_eq!(counters[XdpCounter::UnknownWorker as usize], 1);
    assert_eq!(counters.iter().sum::<u64>(), 5);

    assert!(matches!(
        s.set_worker(4, 256, WorkerState::Live),
        Err(spooky::steering::xdp::XdpError::CpuOutOfRange {
            worker: 4,
            cpu: 256,
            ..
        })
    ));
    // A CPU this machine does not have is refused before the kernel is asked.
    let cpus = possible_cpus();
    let err = s.set_worker(4, cpus, WorkerState::Live).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("worker 4: there is no CPU {cpus} to steer to (CPUs 0..{cpus})")
    );
}

/// The C constants (consts.h) mirror spooky-common; no root needed.
#[test]
fn c_constants_mirror_spooky_common() {
    use spooky_common::{cid, maps};
    let header = include_str!("../../../spooky-ebpf/src/consts.h");
    let value = |name: &str| -> u64 {
        header
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some("#define") && it.next() == Some(name))
                    .then(|| it.next().unwrap().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("consts.h has no {name}"))
    };
    assert_eq!(value("SPOOKY_MAX_WORKERS"), u64::from(maps::MAX_WORKERS));
    assert_eq!(value("SPOOKY_MAX_CPUS"), u64::from(maps::MAX_CPUS));
    assert_eq!(value("SPOOKY_PORT_SET_WORDS"), maps::PORT_SET_WORDS as u64);
    assert_eq!(value("SPOOKY_MAX_CID_LEN"), cid::MAX_CID_LEN as u64);
    assert_eq!(value("SPOOKY_MAX_NODE_ID_LEN"), cid::MAX_NODE_ID_LEN as u64);
    assert_eq!(value("SPOOKY_WORKER_ABSENT"), WorkerState::Absent as u64);
    assert_eq!(value("SPOOKY_WORKER_LIVE"), WorkerState::Live as u64);
    assert_eq!(
        value("SPOOKY_WORKER_DRAINING"),
        WorkerState::Draining as u64
    );
    assert_eq!(value("SPOOKY_CTR_COUNT"), u64::from(XdpCounter::COUNT));
    for c in XdpCounter::ALL {
        let name = format!("SPOOKY_CTR_{}", c.name().to_uppercase());
        assert_eq!(value(&name), c as u64, "{name}");
    }
}

#[test]
fn packet_builder_checksums_verify() {
    let f = Frame::new(Ip::v4(), PORT).udp(b"hello");
    assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header checksum");
    let f = Frame::new(Ip::v4(), PORT)
        .vlan(ETH_P_8021Q, 1)
        .udp(b"hello");
    assert_eq!(&f[12..14], &ETH_P_8021Q.to_be_bytes());
    assert_eq!(&f[16..18], &ETH_P_IP.to_be_bytes());
}
