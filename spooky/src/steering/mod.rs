//! Packet steering: which worker's socket receives a QUIC datagram. Chooses
//! the mode (XDP, reuseport CBPF, or the kernel's 4-tuple hash), binds the
//! workers' `SO_REUSEPORT` sockets (or joins a group handed over by the
//! previous process), and owns the XDP control plane while it runs.

pub mod group;
mod netlink;
pub mod reuseport;
pub mod xdp;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;

use group::{GroupPlan, Owner, Placement};

use socket2::{Domain, Protocol, Socket, Type};
use spooky_common::CidLayout;

use crate::config::{Steering, SteeringMode};

/// The steering a running spooky actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effective {
    /// The XDP program redirects each packet to its worker's CPU.
    Xdp,
    /// A classic BPF reuseport program picks the worker's socket.
    Reuseport,
    /// The kernel's 4-tuple hash picks the socket.
    Off,
}

impl Effective {
    /// Name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Effective::Xdp => "xdp",
            Effective::Reuseport => "reuseport",
            Effective::Off => "off",
        }
    }
}

/// Errors of steering set-up.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot set {option} on the worker socket: {source}")]
    SocketOption {
        option: &'static str,
        source: io::Error,
    },
    #[error(
        "UDP {addr} is already in use (another spooky, or another program). To replace a \
         running spooky without dropping connections, run `spooky upgrade` instead of a second \
         `spooky run`. Otherwise steering needs spooky's worker sockets alone in their reuseport \
         group (the selection program picks sockets by position): stop the other process first"
    )]
    PortInUse { addr: SocketAddr },
    #[error(transparent)]
    Reuseport(#[from] reuseport::ReuseportError),
    #[error(transparent)]
    Group(#[from] group::GroupError),
    #[error(transparent)]
    Xdp(#[from] xdp::XdpError),
}

/// Linux capability numbers spooky's XDP mode needs.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Whether this process may load and attach XDP programs: CAP_BPF (or,
/// on kernels before it existed, CAP_SYS_ADMIN) plus CAP_NET_ADMIN in the
/// effective set.
pub fn xdp_privileged() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| caps & (1u64 << c) != 0;
    (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN)
}

/// Picks the mode for `cfg` and says why.
pub fn choose(cfg: &Steering, privileged: bool) -> (Effective, String) {
    match cfg.mode {
        SteeringMode::Xdp => (Effective::Xdp, "steering.mode is xdp".into()),
        SteeringMode::Reuseport => (Effective::Reuseport, "steering.mode is reuseport".into()),
        SteeringMode::Off => (
            Effective::Off,
            "steering.mode is off: the kernel's 4-tuple hash picks workers, so clients that migrate lose their connection".into(),
        ),
        SteeringMode::Auto => {
            if cfg.interfaces.is_empty() {
                (
                    Effective::Reuseport,
                    "auto: no steering.interfaces configured for XDP".into(),
                )
            } else if !privileged {
                (
                    Effective::Reuseport,
                    "auto: XDP needs CAP_BPF and CAP_NET_ADMIN (run as root or grant them)".into(),
                )
            } else if !cfg.pin_workers {
                (
                    Effective::Reuseport,
                    "auto: XDP steers to CPUs and steering.pin_workers is false".into(),
                )
            } else {
                (
                    Effective::Xdp,
                    format!("auto: privileged, interfaces {}", cfg.interfaces.join(", ")),
                )
            }
        }
    }
}

/// The CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            return (0..n).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; sched_setaffinity only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The UDP reuseport group as this process holds it: every socket of the
/// group in position order (its own workers' and those of other
/// generations, which must stay open so that no position moves), the plan
/// naming who owns which, and where this process's workers are.
pub struct UdpGroup {
    pub sockets: Vec<OwnedFd>,
    pub plan: GroupPlan,
    pub placement: Placement,
    pub workers: u32,
}

impl UdpGroup {
    /// Worker `i`'s socket (a duplicate descriptor of its position).
    pub fn worker_socket(&self, i: u32) -> io::Result<UdpSocket> {
        let fd = self
            .sockets
            .get((self.placement.base + i) as usize)
            .ok_or_else(|| io::Error::other(format!("no socket for worker {i}")))?;
        Ok(UdpSocket::from(fd.try_clone()?))
    }

    /// The port the group is bound to.
    pub fn port(&self) -> Option<u16> {
        let fd = self.sockets.first()?.try_clone().ok()?;
        UdpSocket::from(fd).local_addr().ok().map(|a| a.port())
    }

    /// Attaches the selection program for the current plan (no-op in mode
    /// `off`, where the kernel's hash picks).
    pub fn select(
        &self,
        mode: Effective,
        layout: &spooky_common::CidLayout,
        cpus: &[Option<usize>],
    ) -> Result<(), SteeringError> {
        if mode == Effective::Off {
            return Ok(());
        }
        let fallback = match cpus.iter().copied().collect::<Option<Vec<usize>>>() {
            Some(c) if mode == Effective::Xdp => {
                reuseport::Fallback::Cpus(c.into_iter().map(|c| c as u32).collect())
            }
            _ => reuseport::Fallback::Hash,
        };
        let first = self.sockets.first().ok_or(SteeringError::Reuseport(
            reuseport::ReuseportError::NoWorkers,
        ))?;
        reuseport::attach_reuseport_cbpf(first, layout, &self.plan, &fallback)?;
        Ok(())
    }
}

/// This process as a block owner: its pid and start time.
pub fn this_process() -> Owner {
    let pid = std::process::id();
    Owner {
        pid,
        start_time: process_start_time(pid).unwrap_or(0),
    }
}

/// Whether the process that owned a block still runs (same pid, same
/// start time).
pub fn is_alive(owner: Owner) -> bool {
    process_start_time(owner.pid).is_some_and(|t| t == owner.start_time || owner.start_time == 0)
}

/// Field 22 of `/proc/PID/stat` (after the parenthesised command name,
/// which may contain spaces).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    // After ")": state is field 3, so start time (22) is the 20th.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Binds this process's worker sockets on `addr`: alone (`inherited` is
/// `None`: one new socket per worker, the whole group), or beside the
/// previous process's generations (`inherited`: their sockets in position
/// order and their plan; the workers reuse a free block of the same size or
/// bind new sockets at the end). `cpus[i]`, when set, becomes worker i's
/// `SO_INCOMING_CPU`. Port 0 binds an ephemeral port shared by all. The
/// selection program is attached here only when binding alone; after an
/// upgrade, the caller attaches it once its workers are ready.
pub fn bind_worker_sockets(
    addr: SocketAddr,
    cpus: &[Option<usize>],
    mode: Effective,
    layout: &CidLayout,
    inherited: Option<(Vec<OwnedFd>, GroupPlan)>,
) -> Result<UdpGroup, SteeringError> {
    let workers = cpus.len() as u32;
    let me = this_process();
    let (mut sockets, mut plan) = match inherited {
        Some(group) => group,
        None => {
            if addr.port() != 0 && mode != Effective::Off {
                ensure_port_free(addr)?;
            }
            (
                Vec::new(),
                GroupPlan::first(layout.config_id(), workers, me),
            )
        }
    };
    let alone = sockets.is_empty();
    let placement = if alone {
        Placement {
            generation: layout.config_id(),
            base: 0,
            reused: false,
        }
    } else {
        plan.place(workers, me)?
    };
    let mut addr = addr;
    if let Some(first) = sockets.first() {
        let bound = UdpSocket::from(
            first
                .try_clone()
                .map_err(|source| SteeringError::Bind { addr, source })?,
        )
        .local_addr()
        .map_err(|source| SteeringError::Bind { addr, source })?;
        addr.set_port(bound.port());
    }
    for (i, cpu) in cpus.iter().enumerate() {
        let position = placement.base as usize + i;
        if placement.reused {
            let s = socket2::SockRef::from(&sockets[position]);
            if mode == Effective::Xdp
                && let Some(cpu) = cpu
            {
                s.set_cpu_affinity(*cpu)
                    .map_err(|source| SteeringError::SocketOption {
                        option: "SO_INCOMING_CPU",
                        source,
                    })?;
            }
            continue;
        }
        let s = bind_one(&mut addr, *cpu, mode)?;
        debug_assert_eq!(sockets.len(), position);
        sockets.push(OwnedFd::from(s));
    }
    let group = UdpGroup {
        sockets,
        plan,
        placement,
        workers,
    };
    if alone {
        group.select(mode, layout, cpus)?;
    }
    Ok(group)
}

/// Binds one worker socket; on port 0 the first one fixes the port.
fn bind_one(
    addr: &mut SocketAddr,
    cpu: Option<usize>,
    mode: Effective,
) -> Result<Socket, SteeringError> {
    let at = *addr;
    let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|source| SteeringError::Bind { addr: at, source })?;
    let opt = |option: &'static str| move |source| SteeringError::SocketOption { option, source };
    if at.is_ipv6() {
        // `::` serves IPv4 clients too, like every other listener.
        s.set_only_v6(false).map_err(opt("IPV6_V6ONLY"))?;
    }
    s.set_reuse_port(true).map_err(opt("SO_REUSEPORT"))?;
    if mode == Effective::Xdp
        && let Some(cpu) = cpu
    {
        s.set_cpu_affinity(cpu).map_err(opt("SO_INCOMING_CPU"))?;
    }
    // Bursts of handshakes and migrations arrive faster than one worker
    // drains them; a larger queue drops fewer (the kernel caps it at
    // net.core.rmem_max unless we are privileged).
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&at.into())
        .map_err(|source| SteeringError::Bind { addr: at, source })?;
    if at.port() == 0 {
        let local = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or(SteeringError::Bind {
                addr: at,
                source: io::Error::other("no local address after bind"),
            })?;
        addr.set_port(local.port());
    }
    s.set_nonblocking(true).map_err(opt("O_NONBLOCK"))?;
    Ok(s)
}

/// Fails when another socket holds `addr`: a socket that joined the
/// reuseport group before ours would shift the positions the CBPF program
/// relies on (the kernel refills a leaving socket's slot with the last
/// one), and would compete with our sockets for their CPUs under XDP.
fn ensure_port_free(addr: SocketAddr) -> Result<(), SteeringError> {
    let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|source| SteeringError::Bind { addr, source })?;
    if addr.is_ipv6() {
        let _ = probe.set_only_v6(false);
    }
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(SteeringError::PortInUse { addr }),
        Err(source) => Err(SteeringError::Bind { addr, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steering(mode: SteeringMode, ifaces: &[&str]) -> Steering {
        Steering {
            mode,
            interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
            layout: CidLayout::new(0, &[0, 0], 12).unwrap(),
            pin_workers: true,
            initials_per_source: None,
        }
    }

    #[test]
    fn auto_prefers_xdp_only_when_it_can() {
        let (m, _) = choose(&steering(SteeringMode::Auto, &["lo"]), true);
        assert_eq!(m, Effective::Xdp);
        let (m, why) = choose(&steering(SteeringMode::Auto, &["lo"]), false);
        assert_eq!(m, Effective::Reuseport);
        assert!(why.contains("CAP_BPF"), "{why}");
        let (m, why) = choose(&steering(SteeringMode::Auto, &[]), true);
        assert_eq!(m, Effective::Reuseport);
        assert!(why.contains("interfaces"), "{why}");
        assert_eq!(
            choose(&steering(SteeringMode::Off, &[]), true).0,
            Effective::Off
        );
    }

    #[test]
    fn sockets_share_one_port() {
        let layout = CidLayout::new(0, &[0, 0], 12).unwrap();
        let group = bind_worker_sockets(
            "127.0.0.1:0".parse().unwrap(),
            &[None, None, None],
            Effective::Off,
            &layout,
            None,
        )
        .unwrap();
        let ports: Vec<u16> = (0..3)
            .map(|i| group.worker_socket(i).unwrap().local_addr().unwrap().port())
            .collect();
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "{ports:?}");
    }

    #[test]
    fn a_taken_port_is_refused_with_an_explanation() {
        let layout = CidLayout::new(0, &[0, 0], 12).unwrap();
        let first = bind_worker_sockets(
            "127.0.0.1:0".parse().unwrap(),
            &[None, None],
            Effective::Reuseport,
            &layout,
            None,
        )
        .unwrap();
        let addr = first.worker_socket(0).unwrap().local_addr().unwrap();
        let err = bind_worker_sockets(addr, &[None, None], Effective::Reuseport, &layout, None)
            .err()
            .unwrap();
        assert!(matches!(err, SteeringError::PortInUse { .. }), "{err}");
        assert!(err.to_string().contains("already in use"), "{err}");
        // Mode off joins the group regardless (its hash has no positions).
        assert!(bind_worker_sockets(addr, &[None], Effective::Off, &layout, None).is_ok());
        // A successor joins with the group handed over: a new block.
        let fds = first
            .sockets
            .iter()
            .map(|s| s.try_clone().unwrap())
            .collect();
        let next = bind_worker_sockets(
            addr,
            &[None, None, None],
            Effective::Reuseport,
            &layout,
            Some((fds, first.plan.clone())),
        )
        .unwrap();
        assert_eq!(next.placement.base, 2);
        assert_eq!(next.placement.generation, 1);
        assert_eq!(next.sockets.len(), 5);
        assert_eq!(next.worker_socket(2).unwrap().local_addr().unwrap(), addr);
    }

    #[test]
    fn allowed_cpus_is_not_empty() {
        assert!(!allowed_cpus().is_empty());
    }
}
