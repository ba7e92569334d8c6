//! The control plane of the XDP steering program (`spooky-ebpf`): loads the
//! embedded object, owns its maps and attaches it to interfaces.
//!
//! Order matters when maps change under a running program, so every update
//! here is written such that a packet racing it still finds a consistent
//! view: a CPU enters the CPUMAP before a worker slot names it, a slot is
//! filled before the live list names its worker, and the live list is
//! written before the count that makes it valid.

use std::{
    collections::BTreeSet,
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, CpuMap, Map, MapData, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, loaded_programs},
};
use spooky_common::{
    CidLayout,
    maps::{
        CPUMAP_QUEUE_SIZE, InitialLimit, MAX_CPUS, MAX_LISTEN_PORTS, MAX_WORKERS, PortSet,
        SteeringConfig, WorkerSlot, WorkerState, XdpCounter, names,
    },
};
use tracing::{info, warn};

use super::netlink;

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver, before any socket buffer exists.
    Native,
    /// In the stack (SKB mode): works on every interface, costs more.
    Generic,
}

impl AttachMode {
    /// `"native"` or `"generic"`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can go wrong while loading, attaching or updating the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The embedded object could not be parsed or its maps created.
    #[error(
        "cannot load the XDP object: {reason} (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON)"
    )]
    Load {
        /// The loader's error chain.
        reason: String,
    },
    /// The kernel refused the program (the verifier log is in `reason`).
    #[error("the kernel rejected the {program} program: {reason}")]
    Verify {
        /// Program name.
        program: &'static str,
        /// The error chain, with the verifier log.
        reason: String,
    },
    /// The object lacks a map or program the control plane needs: it does not
    /// match this build of spooky.
    #[error(
        "the XDP object has no {kind} named {name} of the expected type; rebuild it with `cargo xtask build-ebpf`"
    )]
    Missing {
        /// `"map"` or `"program"`.
        kind: &'static str,
        /// The name looked up.
        name: &'static str,
    },
    /// A map update or lookup failed.
    #[error("BPF map {map}: {action} failed: {reason}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was attempted.
        action: String,
        /// The error chain.
        reason: String,
    },
    /// Listener ports are invalid.
    #[error("XDP steering: {0}")]
    Ports(String),
    /// A worker's CPU does not exist, or is beyond the CPUMAP.
    #[error("worker {worker}: there is no CPU {cpu} to steer to (CPUs 0..{limit})")]
    CpuOutOfRange {
        /// Worker ID.
        worker: u8,
        /// The CPU asked for.
        cpu: u32,
        /// One past the highest usable CPU: the possible CPUs of this
        /// machine, capped by the CPUMAP's size.
        limit: u32,
    },
    /// No such network interface.
    #[error("network interface {0:?} does not exist")]
    UnknownInterface(String),
    /// Another XDP program (not spooky's) is attached to the interface.
    #[error(
        "interface {interface} already runs XDP program {name:?} (id {id}); spooky will not replace it: detach it first (`ip link set dev {interface} xdp off`)"
    )]
    ForeignProgram {
        /// Interface name.
        interface: String,
        /// Program ID.
        id: u32,
        /// Program name, as the kernel reports it.
        name: String,
    },
    /// A spooky program is attached through a BPF link that this process does
    /// not own: another spooky is running (or a link is pinned).
    #[error(
        "interface {interface} runs spooky_xdp (program id {id}) through a BPF link owned by another process: is another spooky running on this interface? ({reason})"
    )]
    HeldByOther {
        /// Interface name.
        interface: String,
        /// Program ID.
        id: u32,
        /// The netlink error.
        reason: String,
    },
    /// Querying or changing an interface's XDP state over netlink failed.
    #[error("netlink: {action} on {interface} failed: {source}")]
    Netlink {
        /// What was attempted.
        action: &'static str,
        /// Interface name.
        interface: String,
        /// The socket error or the kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Neither native nor generic attach worked.
    #[error(
        "cannot attach spooky_xdp to {interface}: native mode: {native}; generic mode: {generic}"
    )]
    Attach {
        /// Interface name.
        interface: String,
        /// Why native mode failed.
        native: String,
        /// Why generic mode failed.
        generic: String,
    },
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("BPF_PROG_TEST_RUN of spooky_xdp failed: {0}")]
    TestRun(String),
}

/// One `BPF_PROG_TEST_RUN` result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The XDP action (`XDP_DROP` = 1, `XDP_PASS` = 2, `XDP_REDIRECT` = 4).
    pub action: u32,
    /// Mean run time of one repetition, as the kernel measured it.
    pub duration: Duration,
}

/// XDP actions as the program returns them (`enum xdp_action`).
pub mod action {
    /// `XDP_ABORTED`.
    pub const ABORTED: u32 = 0;
    /// `XDP_DROP`.
    pub const DROP: u32 = 1;
    /// `XDP_PASS`.
    pub const PASS: u32 = 2;
    /// `XDP_TX`.
    pub const TX: u32 = 3;
    /// `XDP_REDIRECT`.
    pub const REDIRECT: u32 = 4;
}

struct Attachment {
    interface: String,
    mode: AttachMode,
    /// The BPF link: the program stays attached while any process holds
    /// a descriptor of it (a successor takes one at an upgrade and points
    /// the link at its own program).
    link: OwnedFd,
}

/// An XDP link handed over by the previous process at an upgrade.
pub struct InheritedLink {
    pub interface: String,
    pub mode: AttachMode,
    pub link: OwnedFd,
}

/// The loaded XDP program, its maps and its attachments. Dropping it
/// releases its links: the program is detached from every interface unless
/// a successor holds the link too.
pub struct XdpSteering {
    ebpf: Ebpf,
    config: SteeringConfig,
    slots: Vec<WorkerSlot>,
    /// CPUs with a CPUMAP entry, mirrored to avoid re-creating an entry
    /// (each update replaces the CPU's kthread and queue).
    cpus: BTreeSet<u32>,
    attached: Vec<Attachment>,
}

impl XdpSteering {
    /// Loads the embedded object, fills spooky_config (enabled=0 until
    /// [`XdpSteering::enable`]) and spooky_ports.
    pub fn load(layout: &CidLayout, listen_ports: &[u16]) -> Result<Self, XdpError> {
        check_ports(listen_ports)?;
        let mut ebpf = EbpfLoader::new()
            .load(spooky_ebpf::OBJECT)
            .map_err(|e| XdpError::Load { reason: chain(&e) })?;
        let program = xdp_program_mut(&mut ebpf)?;
        program.load().map_err(|e| XdpError::Verify {
            program: names::PROGRAM,
            reason: chain(&e),
        })?;

        let node_id = layout.node_id();
        let mut config = SteeringConfig {
            live_count: 0,
            cid_len: layout.cid_len() as u8,
            first_octet: layout.first_octet(),
            node_id_len: node_id.len() as u8,
            enabled: 0,
            node_id: [0; 8],
        };
        config.node_id[..node_id.len()].copy_from_slice(node_id);

        let mut steering = Self {
            ebpf,
            config,
            slots: vec![WorkerSlot::default(); MAX_WORKERS as usize],
            cpus: BTreeSet::new(),
            attached: Vec::new(),
        };
        steering.write_config()?;
        {
            let mut set = PortSet::new();
            for &port in listen_ports {
                set.insert(port);
            }
            let map = map_mut(&mut steering.ebpf, names::LISTEN_PORTS)?;
            let mut ports: Array<&mut MapData, PortSet> =
                Array::try_from(map).map_err(|e| map_err(names::LISTEN_PORTS, "open", &e))?;
            ports
                .set(0, set, 0)
                .map_err(|e| map_err(names::LISTEN_PORTS, "write", &e))?;
        }
        info!(
            ports = ?listen_ports,
            cid_len = layout.cid_len(),
            config_id = layout.config_id(),
            "loaded the XDP steering program"
        );
        Ok(steering)
    }

    /// Attaches to an interface: native (driver) mode first, falling back to
    /// generic (SKB) mode with an info log line naming the interface and the
    /// reason. A `spooky_xdp` left attached by a crashed earlier run is
    /// detached first; any other XDP program is refused. The attachment is
    /// a BPF link, which dies with the last descriptor of it: a crash
    /// leaves nothing attached.
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, XdpError> {
        if let Some(a) = self.attached.iter().find(|a| a.interface == interface) {
            return Ok(a.mode);
        }
        let ifindex = if_index(interface)?;
        remove_stale(interface, ifindex)?;

        let program = xdp_program_mut(&mut self.ebpf)?;
        let prog = program.fd().map_err(|e| XdpError::Attach {
            interface: interface.to_owned(),
            native: chain(&e),
            generic: String::new(),
        })?;
        let (link, mode) = match xdp_link_create(prog.as_fd(), ifindex, XDP_FLAGS_DRV_MODE) {
            Ok(link) => (link, AttachMode::Native),
            Err(native) => {
                let native = format!("bpf_link_create (driver mode): {native}");
                info!(
                    interface = %interface,
                    reason = %native,
                    "native XDP unavailable, attaching in generic (SKB) mode"
                );
                match xdp_link_create(prog.as_fd(), ifindex, XDP_FLAGS_SKB_MODE) {
                    Ok(link) => (link, AttachMode::Generic),
                    Err(generic) => {
                        if generic.raw_os_error() == Some(libc::EBUSY) {
                            return Err(XdpError::HeldByOther {
                                interface: interface.to_owned(),
                                id: 0,
                                reason: generic.to_string(),
                            });
                        }
                        return Err(XdpError::Attach {
                            interface: interface.to_owned(),
                            native,
                            generic: format!("bpf_link_create (SKB mode): {generic}"),
                        });
                    }
                }
            }
        };
        info!(interface = %interface, mode = %mode, "attached spooky_xdp");
        self.attached.push(Attachment {
            interface: interface.to_owned(),
            mode,
            link,
        });
        Ok(mode)
    }

    /// Takes over a link the previous process attached: points it at this
    /// process's program, atomically (no packet sees no program).
    pub fn adopt(&mut self, inherited: InheritedLink) -> Result<(), XdpError> {
        let program = xdp_program_mut(&mut self.ebpf)?;
        let failed = |reason: String| XdpError::Netlink {
            action: "take over the XDP link",
            interface: inherited.interface.clone(),
            source: io::Error::other(reason),
        };
        let prog = program.fd().map_err(|e| failed(chain(&e)))?;
        bpf_link_update(inherited.link.as_fd(), prog.as_fd())
            .map_err(|e| failed(format!("bpf_link_update: {e}")))?;
        info!(interface = %inherited.interface, mode = %inherited.mode, "took over the XDP link");
        self.attached.retain(|a| a.interface != inherited.interface);
        self.attached.push(Attachment {
            interface: inherited.interface,
            mode: inherited.mode,
            link: inherited.link,
        });
        Ok(())
    }

    /// Points every link back at this process's program: the rollback of
    /// an upgrade whose successor had taken them.
    pub fn reclaim(&mut self) -> Result<(), XdpError> {
        let program = xdp_program_mut(&mut self.ebpf)?;
        let prog = program.fd().map_err(|e| XdpError::Netlink {
            action: "reclaim the XDP links",
            interface: String::new(),
            source: io::Error::other(chain(&e)),
        })?;
        for a in &self.attached {
            bpf_link_update(a.link.as_fd(), prog.as_fd()).map_err(|source| XdpError::Netlink {
                action: "reclaim the XDP link",
                interface: a.interface.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Duplicates of the links, to hand to a successor.
    pub fn links(&self) -> io::Result<Vec<InheritedLink>> {
        self.attached
            .iter()
            .map(|a| {
                Ok(InheritedLink {
                    interface: a.interface.clone(),
                    mode: a.mode,
                    link: a.link.try_clone()?,
                })
            })
            .collect()
    }

    /// The interfaces the program is attached to, with their modes.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, AttachMode)> {
        self.attached.iter().map(|a| (a.interface.as_str(), a.mode))
    }

    /// Releases every link (also done on drop): the program is detached
    /// from an interface unless a successor holds its link.
    pub fn detach_all(&mut self) -> Result<(), XdpError> {
        for a in std::mem::take(&mut self.attached) {
            info!(interface = %a.interface, mode = %a.mode, "released the spooky_xdp link");
            drop(a.link);
        }
        Ok(())
    }

    /// Sets a worker's CPU and state. A live or draining worker's CPU gets a
    /// CPUMAP entry (queue of `CPUMAP_QUEUE_SIZE`); the live list is rebuilt
    /// from the live workers in worker order, written before its count. A
    /// CPU no worker uses any more leaves the CPUMAP.
    pub fn set_worker(&mut self, worker: u8, cpu: u32, state: WorkerState) -> Result<(), XdpError> {
        // The kernel only accepts possible CPUs in a CPUMAP; say so plainly
        // rather than relay its ENODEV.
        let limit = aya::util::nr_cpus().map_or(MAX_CPUS, |n| (n as u32).min(MAX_CPUS));
        if cpu >= limit {
            return Err(XdpError::CpuOutOfRange { worker, cpu, limit });
        }
        let routable = state != WorkerState::Absent;
        if routable {
            self.add_cpu(cpu)?;
        }

        let slot = WorkerSlot {
            cpu,
            state: state as u32,
        };
        {
            let map = map_mut(&mut self.ebpf, names::WORKERS)?;
            let mut workers: Array<&mut MapData, WorkerSlot> =
                Array::try_from(map).map_err(|e| map_err(names::WORKERS, "open", &e))?;
            workers
                .set(u32::from(worker), slot, 0)
                .map_err(|e| map_err(names::WORKERS, format!("set worker {worker}"), &e))?;
        }
        self.slots[usize::from(worker)] = slot;
        self.write_live()?;

        // Last, so that no slot names a CPU while its entry goes away.
        let in_use: BTreeSet<u32> = self
            .slots
            .iter()
            .filter(|s| s.state != WorkerState::Absent as u32)
            .map(|s| s.cpu)
            .collect();
        let unused: Vec<u32> = self.cpus.difference(&in_use).copied().collect();
        for cpu in unused {
            self.remove_cpu(cpu)?;
        }
        Ok(())
    }

    /// Starts steering (`enabled = 1`). Until then the program passes every
    /// packet, so it can be attached before the workers exist.
    pub fn enable(&mut self) -> Result<(), XdpError> {
        self.config.enabled = 1;
        self.write_config()?;
        info!(
            live_workers = self.config.live_count,
            "XDP steering enabled"
        );
        Ok(())
    }

    /// Sets the per-source limit on new-connection Initials (see
    /// [`InitialLimit`]); `None` lifts it. Sources already tracked keep
    /// their schedule.
    pub fn set_initial_limit(&mut self, limit: Option<InitialLimit>) -> Result<(), XdpError> {
        let map = map_mut(&mut self.ebpf, names::INITIAL_LIMIT)?;
        let mut array: Array<&mut MapData, InitialLimit> =
            Array::try_from(map).map_err(|e| map_err(names::INITIAL_LIMIT, "open", &e))?;
        array
            .set(0, limit.unwrap_or_default(), 0)
            .map_err(|e| map_err(names::INITIAL_LIMIT, "write", &e))
    }

    /// Stops steering (`enabled = 0`) without detaching: every packet is
    /// passed to the stack's reuseport hash.
    pub fn disable(&mut self) -> Result<(), XdpError> {
        self.config.enabled = 0;
        self.write_config()
    }

    /// Counter totals summed over CPUs, indexed by [`XdpCounter`].
    pub fn counters(&self) -> Result<[u64; XdpCounter::COUNT as usize], XdpError> {
        let map = self.ebpf.map(names::COUNTERS).ok_or(XdpError::Missing {
            kind: "map",
            name: names::COUNTERS,
        })?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|e| map_err(names::COUNTERS, "open", &e))?;
        let mut totals = [0u64; XdpCounter::COUNT as usize];
        for counter in XdpCounter::ALL {
            let values = counters
                .get(&(counter as u32), 0)
                .map_err(|e| map_err(names::COUNTERS, format!("read {}", counter.name()), &e))?;
            totals[counter as usize] = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
        }
        Ok(totals)
    }

    /// Runs the loaded program on one frame (`BPF_PROG_TEST_RUN`, `repeat`
    /// times) on the calling thread's CPU: a self-test, and what the
    /// fixture tests and the benchmark use.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRunOutcome, XdpError> {
        let program: &Xdp = self
            .ebpf
            .program(names::PROGRAM)
            .ok_or(XdpError::Missing {
                kind: "program",
                name: names::PROGRAM,
            })?
            .try_into()
            .map_err(|_| XdpError::Missing {
                kind: "program",
                name: names::PROGRAM,
            })?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| XdpError::TestRun(chain(&e)))?;
        Ok(TestRunOutcome {
            action: result.return_value,
            duration: result.duration,
        })
    }

    /// The loaded object, for diagnostics and tests that need the raw maps.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The loaded object, mutable: tests use it to set maps up directly.
    /// Changing maps behind the control plane's back desynchronises it.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn write_config(&mut self) -> Result<(), XdpError> {
        let map = map_mut(&mut self.ebpf, names::CONFIG)?;
        let mut config: Array<&mut MapData, SteeringConfig> =
            Array::try_from(map).map_err(|e| map_err(names::CONFIG, "open", &e))?;
        config
            .set(0, self.config, 0)
            .map_err(|e| map_err(names::CONFIG, "write", &e))
    }

    fn write_live(&mut self) -> Result<(), XdpError> {
        let live: Vec<u32> = (0..MAX_WORKERS)
            .filter(|&w| self.slots[w as usize].state == WorkerState::Live as u32)
            .collect();
        {
            let map = map_mut(&mut self.ebpf, names::LIVE)?;
            let mut list: Array<&mut MapData, u32> =
                Array::try_from(map).map_err(|e| map_err(names::LIVE, "open", &e))?;
            for (i, &worker) in live.iter().enumerate() {
                list.set(i as u32, worker, 0)
                    .map_err(|e| map_err(names::LIVE, format!("set entry {i}"), &e))?;
            }
        }
        self.config.live_count = live.len() as u32;
        self.write_config()
    }

    fn add_cpu(&mut self, cpu: u32) -> Result<(), XdpError> {
        if self.cpus.contains(&cpu) {
            return Ok(());
        }
        let map = map_mut(&mut self.ebpf, names::CPUMAP)?;
        let mut cpumap: CpuMap<&mut MapData> =
            CpuMap::try_from(map).map_err(|e| map_err(names::CPUMAP, "open", &e))?;
        cpumap
            .set(cpu, CPUMAP_QUEUE_SIZE, None, 0)
            .map_err(|e| map_err(names::CPUMAP, format!("add CPU {cpu}"), &e))?;
        self.cpus.insert(cpu);
        Ok(())
    }

    fn remove_cpu(&mut self, cpu: u32) -> Result<(), XdpError> {
        let map = map_mut(&mut self.ebpf, names::CPUMAP)?;
        let Map::CpuMap(data) = map else {
            return Err(XdpError::Missing {
                kind: "map",
                name: names::CPUMAP,
            });
        };
        // aya's CpuMap has no delete; the syscall is simple enough.
        match bpf_map_delete_elem(data.fd().as_fd(), cpu) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(map_err(names::CPUMAP, format!("remove CPU {cpu}"), &e)),
        }
        self.cpus.remove(&cpu);
        Ok(())
    }
}

impl Drop for XdpSteering {
    fn drop(&mut self) {
        if let Err(e) = self.detach_all() {
            warn!(error = %e, "detaching XDP on shutdown failed");
        }
    }
}

fn check_ports(ports: &[u16]) -> Result<(), XdpError> {
    if ports.is_empty() {
        return Err(XdpError::Ports(
            "no listener ports: steering needs the UDP port(s) QUIC listens on".into(),
        ));
    }
    if ports.contains(&0) {
        return Err(XdpError::Ports(
            "port 0 cannot be steered: bind to a fixed port".into(),
        ));
    }
    if ports.len() > MAX_LISTEN_PORTS as usize {
        return Err(XdpError::Ports(format!(
            "{} listener ports, at most {MAX_LISTEN_PORTS} are supported",
            ports.len()
        )));
    }
    Ok(())
}

fn xdp_program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let missing = XdpError::Missing {
        kind: "program",
        name: names::PROGRAM,
    };
    match ebpf.program_mut(names::PROGRAM) {
        Some(program) => program.try_into().map_err(|_: ProgramError| missing),
        None => Err(missing),
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, XdpError> {
    ebpf.map_mut(name)
        .ok_or(XdpError::Missing { kind: "map", name })
}

fn map_err(map: &'static str, action: impl Into<String>, e: &dyn std::error::Error) -> XdpError {
    XdpError::Map {
        map,
        action: action.into(),
        reason: chain(e),
    }
}

/// An error and its sources, `: `-separated: aya's top-level messages
/// ("`bpf_link_create` failed") leave the errno to the source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn if_index(interface: &str) -> Result<u32, XdpError> {
    let unknown = || XdpError::UnknownInterface(interface.to_owned());
    let name = CString::new(interface).map_err(|_| unknown())?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(unknown())
    } else {
        Ok(index)
    }
}

/// Detaches a `spooky_xdp` that a crashed run left on the interface. Only a
/// netlink attachment outlives its process (a BPF link dies with its file
/// descriptor), so this is what an earlier run on an old kernel, or another
/// tool, leaves behind. Anything that is not spooky's is refused.
fn remove_stale(interface: &str, ifindex: u32) -> Result<(), XdpError> {
    let attached = netlink::xdp_programs(ifindex).map_err(|source| XdpError::Netlink {
        action: "query XDP programs",
        interface: interface.to_owned(),
        source,
    })?;
    for (id, mode_flags) in attached {
        let program = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id);
        let name = program
            .as_ref()
            .and_then(|p| p.name_as_str().map(str::to_owned))
            .unwrap_or_default();
        if name != names::PROGRAM {
            return Err(XdpError::ForeignProgram {
                interface: interface.to_owned(),
                id,
                name,
            });
        }
        let fd = program
            .as_ref()
            .map(|p| p.fd())
            .transpose()
            .ok()
            .flatten()
            .ok_or_else(|| XdpError::Netlink {
                action: "open the stale spooky_xdp",
                interface: interface.to_owned(),
                source: io::Error::other(format!("program {id} vanished or cannot be opened")),
            })?;
        match netlink::xdp_detach(ifindex, mode_flags, fd.as_fd()) {
            Ok(()) => info!(
                interface = %interface,
                program_id = id,
                "detached a stale spooky_xdp left attached by an earlier run"
            ),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(XdpError::HeldByOther {
                    interface: interface.to_owned(),
                    id,
                    reason: e.to_string(),
                });
            }
            Err(source) => {
                return Err(XdpError::Netlink {
                    action: "detach the stale spooky_xdp",
                    interface: interface.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `BPF_LINK_CREATE` for an XDP program on an interface.
fn xdp_link_create(prog: BorrowedFd<'_>, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u32 = 37;
    // The link_create member of `union bpf_attr`; the kernel wants the
    // rest of the union zero, hence the padding.
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 6],
    }
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
        _rest: [0; 6],
    };
    // SAFETY: `attr` outlives the call and its size is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_LINK_CREATE returned a new descriptor that nobody else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// `BPF_LINK_UPDATE`: points `link` at `prog`.
fn bpf_link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: as above.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `BPF_MAP_DELETE_ELEM` with a `u32` key.
fn bpf_map_delete_elem(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    // The map_elem member of `union bpf_attr`: map_fd, pad, key, value, flags.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: `attr` and the key it points to outlive the call; the size
    // passed is the size of `attr`, which the kernel zero-extends.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked() {
        assert!(matches!(check_ports(&[]), Err(XdpError::Ports(_))));
        assert!(matches!(check_ports(&[443, 0]), Err(XdpError::Ports(_))));
        let many: Vec<u16> = (1..=MAX_LISTEN_PORTS as u16 + 1).collect();
        assert!(matches!(check_ports(&many), Err(XdpError::Ports(_))));
        assert!(check_ports(&[443, 8443]).is_ok());
    }

    #[test]
    fn error_chains_keep_the_errno() {
        let e = aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        };
        let text = chain(&e);
        assert!(text.contains("bpf_link_create"), "{text}");
        assert!(text.contains("not supported"), "{text}");
    }

    #[test]
    fn unknown_interfaces_are_named() {
        let e = if_index("spooky-no-such0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "network interface \"spooky-no-such0\" does not exist"
        );
    }
}
