//! BPF map layouts shared by the XDP program (`spooky-ebpf/src/maps.h`
//! mirrors every type here with `_Static_assert`s) and the userspace control
//! plane that fills the maps.

use core::mem::size_of;

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

/// Index of each per-CPU counter. The XDP program bumps exactly one
/// counter per packet it sees.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// Not UDP to a listener port (or steering disabled): `XDP_PASS`.
    PassOther = 0,
    /// Short header, owner worker runs on this CPU: `XDP_PASS`.
    ShortLocal = 1,
    /// Short header redirected to the owner's CPU.
    ShortRedirect = 2,
    /// Long header with a CID of ours, owner on this CPU: `XDP_PASS`.
    LongOursLocal = 3,
    /// Long header with a CID of ours, redirected to the owner's CPU.
    LongOursRedirect = 4,
    /// Long header with a client-chosen DCID hashed to a worker on this CPU.
    LongHashLocal = 5,
    /// Long header with a client-chosen DCID hashed and redirected.
    LongHashRedirect = 6,
    /// A CID of ours naming an absent worker (or an absent CPU), re-hashed.
    UnknownWorker = 7,
    /// No live worker to hash to: `XDP_PASS` (userspace decides).
    NoLiveWorker = 8,
    /// Dropped: UDP payload too short to be QUIC.
    DropTooShort = 9,
    /// Dropped: QUIC fixed bit clear.
    DropFixedBit = 10,
    /// Dropped: Initial in a datagram below 1200 bytes (RFC 9000 §14.1).
    DropSmallInitial = 11,
    /// Dropped: long header with a DCID length above 20 (v1) or truncated.
    DropBadLongHeader = 12,
    /// `bpf_redirect_map` failed: `XDP_PASS`.
    RedirectFailed = 13,
}

impl XdpCounter {
    /// Number of counters (the counter map's size).
    pub const COUNT: u32 = 14;

    /// Every counter in index order.
    pub const ALL: [XdpCounter; Self::COUNT as usize] = [
        XdpCounter::PassOther,
        XdpCounter::ShortLocal,
        XdpCounter::ShortRedirect,
        XdpCounter::LongOursLocal,
        XdpCounter::LongOursRedirect,
        XdpCounter::LongHashLocal,
        XdpCounter::LongHashRedirect,
        XdpCounter::UnknownWorker,
        XdpCounter::NoLiveWorker,
        XdpCounter::DropTooShort,
        XdpCounter::DropFixedBit,
        XdpCounter::DropSmallInitial,
        XdpCounter::DropBadLongHeader,
        XdpCounter::RedirectFailed,
    ];

    /// Stable snake_case name, used as the metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::PassOther => "pass_other",
            XdpCounter::ShortLocal => "short_local",
            XdpCounter::ShortRedirect => "short_redirect",
            XdpCounter::LongOursLocal => "long_ours_local",
            XdpCounter::LongOursRedirect => "long_ours_redirect",
            XdpCounter::LongHashLocal => "long_hash_local",
            XdpCounter::LongHashRedirect => "long_hash_redirect",
            XdpCounter::UnknownWorker => "unknown_worker",
            XdpCounter::NoLiveWorker => "no_live_worker",
            XdpCounter::DropTooShort => "drop_too_short",
            XdpCounter::DropFixedBit => "drop_fixed_bit",
            XdpCounter::DropSmallInitial => "drop_small_initial",
            XdpCounter::DropBadLongHeader => "drop_bad_long_header",
            XdpCounter::RedirectFailed => "redirect_failed",
        }
    }
}

// The C side asserts the same sizes (maps.h).
const _: () = assert!(size_of::<SteeringConfig>() == 16);
const _: () = assert!(size_of::<WorkerSlot>() == 8);
const _: () = assert!(size_of::<PortSet>() == 8192);
const _: () = assert!(XdpCounter::ALL.len() == XdpCounter::COUNT as usize);

#[cfg(feature = "aya")]
mod pod {
    // SAFETY: both are `repr(C)`, contain only integers and have no padding
    // (the size assertions above pin that down), so every bit pattern is valid.
    unsafe impl aya::Pod for super::SteeringConfig {}
    unsafe impl aya::Pod for super::WorkerSlot {}
    unsafe impl aya::Pod for super::PortSet {}
}

#[cfg(test)]
mod tests {
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
    fn counter_indices_follow_all() {
        for (i, c) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }
}
