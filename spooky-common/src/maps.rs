//! BPF map layouts shared by the XDP program (`spooky-ebpf/src/maps.h`
//! mirrors every type here with `_Static_assert`s) and the userspace control
//! plane that fills the maps.

use core::mem::{offset_of, size_of};

/// Entries in the worker table: the worker octet of a CID indexes it.
pub const MAX_WORKERS: u32 = 256;
/// Entries in the CPUMAP (highest CPU number + 1 that spooky can steer to).
pub const MAX_CPUS: u32 = 256;
/// UDP ports the control plane accepts as QUIC listeners (a sanity limit:
/// the port map itself is a bitmap of all 65536 ports).
pub const MAX_LISTEN_PORTS: u32 = 64;
/// 64-bit words in a [`PortSet`]: one bit per UDP port.
pub const PORT_SET_WORDS: usize = 65536 / 64;
/// Bytes the CPUMAP queues per CPU before it drops.
pub const CPUMAP_QUEUE_SIZE: u32 = 2048;
/// Client sources whose Initial rate the XDP program tracks at once (an
/// LRU map: under a spoofed flood the oldest sources are forgotten, and a
/// forgotten source starts again with a full burst).
pub const MAX_INITIAL_SOURCES: u32 = 65536;

/// Map names in the object file; the loader looks them up by these.
pub mod names {
    /// `BPF_MAP_TYPE_ARRAY[1]`: [`super::PortSet`], the UDP listener ports.
    /// A bitmap rather than a hash map keyed by port: the JIT inlines the
    /// array lookup, while the hash lookup cost ~20 ns, about half of the
    /// program's run time per packet.
    pub const LISTEN_PORTS: &str = "spooky_ports";
    /// `BPF_MAP_TYPE_ARRAY[1]`: [`super::SteeringConfig`].
    pub const CONFIG: &str = "spooky_config";
    /// `BPF_MAP_TYPE_ARRAY[MAX_WORKERS]`: worker ID → [`super::WorkerSlot`].
    pub const WORKERS: &str = "spooky_workers";
    /// `BPF_MAP_TYPE_ARRAY[MAX_WORKERS]`: i → worker ID (`u32`) of the i-th
    /// live worker; `SteeringConfig::live_count` entries are valid.
    pub const LIVE: &str = "spooky_live";
    /// `BPF_MAP_TYPE_CPUMAP[MAX_CPUS]`.
    pub const CPUMAP: &str = "spooky_cpumap";
    /// `BPF_MAP_TYPE_PERCPU_ARRAY[XdpCounter::COUNT]` of `u64`.
    pub const COUNTERS: &str = "spooky_counters";
    /// `BPF_MAP_TYPE_ARRAY[1]`: [`super::InitialLimit`].
    pub const INITIAL_LIMIT: &str = "spooky_initial_limit";
    /// `BPF_MAP_TYPE_LRU_HASH[MAX_INITIAL_SOURCES]`: [`super::SourcePrefix`]
    /// → the time (`bpf_ktime_get_ns`) from which the source's next Initial
    /// is on schedule.
    pub const INITIAL_SOURCES: &str = "spooky_initial_sources";
    /// The XDP entry point.
    pub const PROGRAM: &str = "spooky_xdp";
}

/// Global steering parameters (single entry at index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringConfig {
    /// Valid entries in the live-worker list.
    pub live_count: u32,
    /// Length of every CID spooky issues.
    pub cid_len: u8,
    /// `CidLayout::first_octet` (config rotation bits + length).
    pub first_octet: u8,
    /// Length of `node_id`.
    pub node_id_len: u8,
    /// 0 until the control plane has filled the maps: the program passes
    /// everything while it is 0.
    pub enabled: u8,
    /// Node ID octets (first `node_id_len` are valid).
    pub node_id: [u8; 8],
}

/// The set of UDP listener ports (host byte order) as a bitmap: port `p` is
/// bit `p % 64` of `bits[p / 64]` (single entry at index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSet {
    /// One bit per port.
    pub bits: [u64; PORT_SET_WORDS],
}

impl PortSet {
    /// No ports.
    pub const fn new() -> Self {
        Self {
            bits: [0; PORT_SET_WORDS],
        }
    }

    /// Adds `port`.
    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port) / 64] |= 1 << (port % 64);
    }

    /// Removes `port`.
    pub fn remove(&mut self, port: u16) {
        self.bits[usize::from(port) / 64] &= !(1 << (port % 64));
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }
}

impl Default for PortSet {
    fn default() -> Self {
        Self::new()
    }
}

/// One worker's CPU and state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerSlot {
    /// CPU the worker thread is pinned to (its `SO_INCOMING_CPU`).
    pub cpu: u32,
    /// A [`WorkerState`] value.
    pub state: u32,
}

/// The per-source limit on new-connection Initials (single entry at index
/// 0), as a GCRA: each Initial moves the source's schedule `interval_ns`
/// ahead, and one that would put it more than `burst_ns` ahead of now is
/// dropped. `interval_ns == 0` disables the limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitialLimit {
    /// Nanoseconds per Initial at the sustained rate.
    pub interval_ns: u64,
    /// How far ahead of now a source's schedule may run: `(burst - 1) ×
    /// interval_ns` lets `burst` Initials through at once.
    pub burst_ns: u64,
}

impl InitialLimit {
    /// The limit for `per_second` sustained Initials and bursts of `burst`
    /// (at least 1); `None` when the rate is not positive and finite.
    pub fn new(per_second: f64, burst: u32) -> Option<Self> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return None;
        }
        // `as` saturates; + 0.5 rounds (no `f64::round` without std).
        let interval_ns = ((1e9 / per_second + 0.5) as u64).max(1);
        let burst_ns = interval_ns.saturating_mul(u64::from(burst.max(1) - 1));
        Some(Self {
            interval_ns,
            burst_ns,
        })
    }
}

/// The key of a client source in the Initial-rate map: an IPv4 address as
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`), an IPv6 address cut to its /64
/// (what one subscriber usually holds), so a client cannot dodge the
/// limit by walking its own prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourcePrefix {
    /// The 16 address octets, network order.
    pub octets: [u8; 16],
}

impl SourcePrefix {
    /// The key the XDP program uses for `ip`.
    pub fn of(ip: core::net::IpAddr) -> Self {
        let mut octets = [0u8; 16];
        match ip {
            core::net::IpAddr::V4(v4) => {
                octets[10] = 0xff;
                octets[11] = 0xff;
                octets[12..].copy_from_slice(&v4.octets());
            }
            core::net::IpAddr::V6(v6) => octets[..8].copy_from_slice(&v6.octets()[..8]),
        }
        Self { octets }
    }
}

/// Lifecycle of a worker as the XDP program sees it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// No worker: packets naming it fall back to the hash.
    Absent = 0,
    /// Accepts new connections and owns its CIDs.
    Live = 1,
    /// Finishes its connections (its CIDs still route to it) but receives
    /// no new handshakes.
    Draining = 2,
}

/// Defines [`XdpCounter`] from one list: the variants with their indices,
/// [`XdpCounter::COUNT`], [`XdpCounter::ALL`] and [`XdpCounter::name`]
/// cannot disagree. The C side (`SPOOKY_CTR_*` in `spooky-ebpf/src/consts.h`)
/// is checked against this list name for name and value for value by the
/// `c_counters_match` test below, and `/metrics` labels come from `name()`.
macro_rules! xdp_counters {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $name:literal,)+) => {
        /// Index of each per-CPU counter. The XDP program bumps exactly one
        /// counter per packet it sees.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum XdpCounter {
            $($(#[$doc])* $variant = $index,)+
        }

        impl XdpCounter {
            /// Every counter in index order.
            pub const ALL: [XdpCounter; Self::COUNT as usize] = [$(XdpCounter::$variant,)+];

            /// Stable snake_case name, used as the metrics label (and, in
            /// upper case after `SPOOKY_CTR_`, as the C name).
            pub const fn name(self) -> &'static str {
                match self {
                    $(XdpCounter::$variant => $name,)+
                }
            }
        }
    };
}

xdp_counters! {
    /// Not UDP to a listener port (or steering disabled): `XDP_PASS`.
    PassOther = 0 => "pass_other",
    /// Short header, owner worker runs on this CPU: `XDP_PASS`.
    ShortLocal = 1 => "short_local",
    /// Short header redirected to the owner's CPU.
    ShortRedirect = 2 => "short_redirect",
    /// Long header with a CID of ours, owner on this CPU: `XDP_PASS`.
    LongOursLocal = 3 => "long_ours_local",
    /// Long header with a CID of ours, redirected to the owner's CPU.
    LongOursRedirect = 4 => "long_ours_redirect",
    /// Long header with a client-chosen DCID hashed to a worker on this CPU.
    LongHashLocal = 5 => "long_hash_local",
    /// Long header with a client-chosen DCID hashed and redirected.
    LongHashRedirect = 6 => "long_hash_redirect",
    /// A CID of ours naming an absent worker (or an absent CPU), re-hashed.
    UnknownWorker = 7 => "unknown_worker",
    /// No live worker to hash to: `XDP_PASS` (userspace decides).
    NoLiveWorker = 8 => "no_live_worker",
    /// Dropped: UDP payload too short to be QUIC.
    DropTooShort = 9 => "drop_too_short",
    /// Dropped: QUIC fixed bit clear.
    DropFixedBit = 10 => "drop_fixed_bit",
    /// Dropped: Initial in a datagram below 1200 bytes (RFC 9000 §14.1).
    DropSmallInitial = 11 => "drop_small_initial",
    /// Dropped: long header with a DCID length above 20 (v1) or truncated.
    DropBadLongHeader = 12 => "drop_bad_long_header",
    /// `bpf_redirect_map` failed: `XDP_PASS`.
    RedirectFailed = 13 => "redirect_failed",
    /// Dropped: a new-connection Initial beyond its source's rate
    /// ([`InitialLimit`]).
    DropInitialRate = 14 => "drop_initial_rate",
}

impl XdpCounter {
    /// Number of counters (the counter map's size).
    pub const COUNT: u32 = 15;
}

// Indices are the map's: dense, in list order, from 0.
const _: () = {
    let mut i = 0;
    while i < XdpCounter::ALL.len() {
        assert!(XdpCounter::ALL[i] as usize == i);
        i += 1;
    }
};

// The layout the kernel side compiles against: maps.h asserts the same
// size and the same offset for every field (`_Static_assert`), so a field
// added, moved or resized on one side only fails to build on that side.
// The sizes also prove there is no padding, which the `Pod` impls rely on.
const _: () = assert!(size_of::<SteeringConfig>() == 16);
const _: () = assert!(offset_of!(SteeringConfig, live_count) == 0);
const _: () = assert!(offset_of!(SteeringConfig, cid_len) == 4);
const _: () = assert!(offset_of!(SteeringConfig, first_octet) == 5);
const _: () = assert!(offset_of!(SteeringConfig, node_id_len) == 6);
const _: () = assert!(offset_of!(SteeringConfig, enabled) == 7);
const _: () = assert!(offset_of!(SteeringConfig, node_id) == 8);
const _: () = assert!(size_of::<WorkerSlot>() == 8);
const _: () = assert!(offset_of!(WorkerSlot, cpu) == 0);
const _: () = assert!(offset_of!(WorkerSlot, state) == 4);
const _: () = assert!(size_of::<WorkerState>() == 4);
const _: () = assert!(size_of::<PortSet>() == 8192);
const _: () = assert!(offset_of!(PortSet, bits) == 0);
const _: () = assert!(size_of::<InitialLimit>() == 16);
const _: () = assert!(offset_of!(InitialLimit, interval_ns) == 0);
const _: () = assert!(offset_of!(InitialLimit, burst_ns) == 8);
const _: () = assert!(size_of::<SourcePrefix>() == 16);
const _: () = assert!(offset_of!(SourcePrefix, octets) == 0);
const _: () = assert!(XdpCounter::ALL.len() == XdpCounter::COUNT as usize);

#[cfg(feature = "aya")]
mod pod {
    // SAFETY: both are `repr(C)`, contain only integers and have no padding
    // (the size assertions above pin that down), so every bit pattern is valid.
    unsafe impl aya::Pod for super::SteeringConfig {}
    unsafe impl aya::Pod for super::WorkerSlot {}
    unsafe impl aya::Pod for super::PortSet {}
    unsafe impl aya::Pod for super::InitialLimit {}
    unsafe impl aya::Pod for super::SourcePrefix {}
}

#[cfg(test)]
mod tests {
    // The crate is no_std; its tests run on the host and may allocate.
    extern crate std;
    use std::{borrow::ToOwned, string::String, vec::Vec};

    use super::*;

    #[test]
    fn port_set_bits() {
        let mut ports = PortSet::new();
        for p in [0u16, 63, 64, 443, 4433, 65535] {
            assert!(!ports.contains(p));
            ports.insert(p);
            assert!(ports.contains(p));
        }
        assert_eq!(ports.bits[443 / 64], 1 << (443 % 64));
        assert_eq!(ports.bits[1023], 1 << 63);
        assert!(!ports.contains(442) && !ports.contains(444));
        ports.remove(443);
        assert!(!ports.contains(443) && ports.contains(4433));
    }

    #[test]
    fn initial_limit_from_rate_and_burst() {
        let l = InitialLimit::new(100.0, 20).unwrap();
        assert_eq!(l.interval_ns, 10_000_000);
        assert_eq!(l.burst_ns, 19 * 10_000_000);
        assert_eq!(InitialLimit::new(3.0, 0).unwrap().burst_ns, 0);
        assert_eq!(InitialLimit::new(1e12, 1).unwrap().interval_ns, 1);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(InitialLimit::new(bad, 1), None, "{bad}");
        }
    }

    #[test]
    fn source_prefixes() {
        let v4 = SourcePrefix::of("198.18.0.7".parse().unwrap());
        assert_eq!(
            v4.octets,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 7]
        );
        let a = SourcePrefix::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = SourcePrefix::of("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = SourcePrefix::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b, "one /64");
        assert_ne!(a, c);
        assert_eq!(a.octets[8..], [0; 8]);
    }

    /// `SPOOKY_CTR_<NAME> <value>` lines of the C header.
    fn c_counters(header: &str) -> Vec<(&str, u64)> {
        header
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                if it.next() != Some("#define") {
                    return None;
                }
                let name = it.next()?.strip_prefix("SPOOKY_CTR_")?;
                Some((name, it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// The C counter list (consts.h) is this one: same names, same values,
    /// nothing more, nothing less.
    #[test]
    fn c_counters_match() {
        let header = include_str!("../../spooky-ebpf/src/consts.h");
        let mut c = c_counters(header);
        let count = c
            .iter()
            .position(|(n, _)| *n == "COUNT")
            .map(|i| c.remove(i));
        assert_eq!(count, Some(("COUNT", u64::from(XdpCounter::COUNT))));
        let rust: Vec<(String, u64)> = XdpCounter::ALL
            .iter()
            .map(|&x| (x.name().to_uppercase(), x as u64))
            .collect();
        let c: Vec<(String, u64)> = c.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        assert_eq!(
            c, rust,
            "spooky-ebpf/src/consts.h SPOOKY_CTR_* vs XdpCounter"
        );
    }

    #[test]
    fn c_counter_parser_sees_drift() {
        let header = "#define SPOOKY_CTR_PASS_OTHER 0\n#define SPOOKY_CTR_NEW 1\n\
                      #define SPOOKY_MAX_CPUS 256\n#define SPOOKY_CTR_COUNT 2\n";
        assert_eq!(
            c_counters(header),
            [("PASS_OTHER", 0), ("NEW", 1), ("COUNT", 2)]
        );
    }

    #[test]
    fn counter_indices_follow_all() {
        for (i, c) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }
}
