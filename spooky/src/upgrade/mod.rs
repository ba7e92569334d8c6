//! Zero-drop upgrades: the running process (the predecessor) starts a new
//! binary beside itself, hands it every listening socket, the whole UDP
//! reuseport group with its plan and the XDP links over a Unix socket
//! pair, and steps back once the successor serves; a successor that fails
//! or is not ready in time is killed and the predecessor takes everything
//! back. The handshake, in order:
//!
//! ```text
//! predecessor                          successor
//!   Offer + descriptors  ───────────►  binds its workers beside the others
//!                        ◄───────────  Ready (workers up)
//!   stops managing the group
//!   Go                   ───────────►  attaches the selection program for
//!                                      the new plan, takes the XDP links
//!                        ◄───────────  Serving
//!   drains and exits
//! ```

pub mod carry;
pub mod control;
pub mod fdpass;

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::steering::group::GroupPlan;
use crate::steering::xdp::{AttachMode, InheritedLink};
use fdpass::Channel;

/// The environment variable that carries the channel's descriptor number
/// to the successor.
pub const CHANNEL_ENV: &str = "SPOOKY_UPGRADE_FD";

/// What went wrong during an upgrade.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("upgrade channel: {0}")]
    Channel(#[from] std::io::Error),
    #[error("the new process exited before it was ready ({0})")]
    Exited(String),
    #[error("the new process was not ready within {0:?}")]
    NotReady(Duration),
    #[error("the new process failed: {0}")]
    Failed(String),
    #[error("unexpected message on the upgrade channel: {0}")]
    Protocol(String),
    #[error("an upgrade is already in progress")]
    InProgress,
    #[error(
        "steering.mode is off: the kernel's hash would send new connections to the old process and QUIC packets to the wrong one; upgrades need steering xdp or reuseport"
    )]
    ModeOff,
}

/// What each handed-over descriptor is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdRole {
    /// The next position of the UDP reuseport group.
    Udp,
    /// A worker's TCP listener (HTTP/1.1, HTTP/2).
    WorkerTcp(SocketAddr),
    /// The admin listener.
    Admin(SocketAddr),
    /// The plain-HTTP redirect listener.
    Redirect(SocketAddr),
    /// The control socket (`spooky upgrade`).
    Control,
    /// An XDP link on an interface.
    XdpLink { interface: String, native: bool },
}

#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Offer {
        from_pid: u32,
        plan: GroupPlan,
        roles: Vec<FdRole>,
        backends: Vec<carry::BackendCarry>,
    },
    Fds,
    Ready {
        pid: u32,
        generation: u8,
        workers: u32,
    },
    Go,
    Serving,
    Failed {
        reason: String,
    },
}

fn send(channel: &Channel, m: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), UpgradeError> {
    let bytes = serde_json::to_vec(m).map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    channel.send(&bytes, fds)?;
    Ok(())
}

fn recv(
    channel: &Channel,
    timeout: Duration,
) -> Result<Option<(Message, Vec<OwnedFd>)>, UpgradeError> {
    let Some((bytes, fds)) = channel.recv(timeout)? else {
        return Ok(None);
    };
    let m = serde_json::from_slice(&bytes).map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    Ok(Some((m, fds)))
}

/// Everything a predecessor hands over.
pub struct Handover {
    pub plan: GroupPlan,
    pub fds: Vec<(FdRole, OwnedFd)>,
    pub backends: Vec<carry::BackendCarry>,
}

/// What the successor received, sorted by use.
pub struct Inherited {
    pub from_pid: u32,
    pub plan: GroupPlan,
    pub udp: Vec<OwnedFd>,
    pub worker_tcp: Vec<(SocketAddr, OwnedFd)>,
    pub admin: Option<(SocketAddr, OwnedFd)>,
    pub redirect: Vec<(SocketAddr, OwnedFd)>,
    pub control: Option<OwnedFd>,
    pub links: Vec<InheritedLink>,
    pub backends: Vec<carry::BackendCarry>,
}

impl Inherited {
    fn sort(
        from_pid: u32,
        plan: GroupPlan,
        fds: Vec<(FdRole, OwnedFd)>,
        backends: Vec<carry::BackendCarry>,
    ) -> Self {
        let mut me = Inherited {
            from_pid,
            plan,
            backends,
            udp: Vec::new(),
            worker_tcp: Vec::new(),
            admin: None,
            redirect: Vec::new(),
            control: None,
            links: Vec::new(),
        };
        for (role, fd) in fds {
            match role {
                FdRole::Udp => me.udp.push(fd),
                FdRole::WorkerTcp(a) => me.worker_tcp.push((a, fd)),
                FdRole::Admin(a) => me.admin = Some((a, fd)),
                FdRole::Redirect(a) => me.redirect.push((a, fd)),
                FdRole::Control => me.control = Some(fd),
                FdRole::XdpLink { interface, native } => me.links.push(InheritedLink {
                    interface,
                    mode: if native {
                        AttachMode::Native
                    } else {
                        AttachMode::Generic
                    },
                    link: fd,
                }),
            }
        }
        me
    }

    /// Takes the inherited TCP listeners bound to `addr`.
    pub fn take_worker_tcp(&mut self, addr: SocketAddr) -> Vec<OwnedFd> {
        let (mine, rest) = std::mem::take(&mut self.worker_tcp)
            .into_iter()
            .partition(|(a, _)| *a == addr);
        self.worker_tcp = rest;
        mine.into_iter().map(|(_, fd)| fd).collect()
    }

    /// Takes the inherited admin listener when it is bound to `addr`.
    pub fn take_admin(&mut self, addr: SocketAddr) -> Option<OwnedFd> {
        match self.admin.take() {
            Some((a, fd)) if a == addr => Some(fd),
            other => {
                self.admin = other;
                None
            }
        }
    }

    /// Takes the inherited redirect listener bound to `addr`.
    pub fn take_redirect(&mut self, addr: SocketAddr) -> Option<OwnedFd> {
        let at = self.redirect.iter().position(|(a, _)| *a == addr)?;
        Some(self.redirect.swap_remove(at).1)
    }

    /// Takes the inherited XDP link of `interface`.
    pub fn take_link(&mut self, interface: &str) -> Option<InheritedLink> {
        let at = self.links.iter().position(|l| l.interface == interface)?;
        Some(self.links.swap_remove(at))
    }
}

/// The binary a plain `spooky upgrade` starts: the file at the path this
/// process was started from (replaced on disk by a package upgrade, the
/// kernel shows the old one as "(deleted)").
pub fn default_binary() -> std::io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// The predecessor's view of a successor being started.
pub struct Successor {
    child: Child,
    channel: Channel,
    pub pid: u32,
}

impl Successor {
    /// Starts `binary` with this process's arguments and hands `handover`
    /// to it.
    pub fn spawn(binary: &Path, handover: &Handover) -> Result<Successor, UpgradeError> {
        let (mine, theirs) = Channel::pair()?;
        let raw = theirs.inheritable_raw_fd()?;
        let child = Command::new(binary)
            .args(std::env::args_os().skip(1))
            .env(CHANNEL_ENV, raw.to_string())
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                binary: binary.to_owned(),
                source,
            })?;
        // Our copy of the child's end must go, or its exit would not show
        // as end-of-file here.
        drop(theirs);
        let pid = child.id();
        let successor = Successor {
            child,
            channel: mine,
            pid,
        };
        match successor.offer(handover) {
            Ok(()) => Ok(successor),
            Err(e) => Err(successor.failed_early(e)),
        }
    }

    fn offer(&self, handover: &Handover) -> Result<(), UpgradeError> {
        let roles = handover.fds.iter().map(|(r, _)| r.clone()).collect();
        send(
            &self.channel,
            &Message::Offer {
                from_pid: std::process::id(),
                plan: handover.plan.clone(),
                roles,
                backends: handover.backends.clone(),
            },
            &[],
        )?;
        for chunk in handover.fds.chunks(fdpass::MAX_FDS) {
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
            send(&self.channel, &Message::Fds, &fds)?;
        }
        Ok(())
    }

    /// The offer could not be sent: usually the new process has exited
    /// already (its end of the channel is closed). Says so when it has,
    /// and makes sure it is gone either way.
    fn failed_early(mut self, e: UpgradeError) -> UpgradeError {
        match e {
            UpgradeError::Channel(ref io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                self.exited()
            }
            other => {
                self.abort();
                other
            }
        }
    }

    /// Waits for the next message until `deadline`, noticing an exit.
    fn wait_for(&mut self, deadline: Instant, total: Duration) -> Result<Message, UpgradeError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(UpgradeError::NotReady(total));
            }
            let slice = (deadline - now).min(Duration::from_millis(200));
            match recv(&self.channel, slice) {
                Ok(Some((Message::Failed { reason }, _))) => {
                    return Err(UpgradeError::Failed(reason));
                }
                Ok(Some((m, _))) => return Ok(m),
                Ok(None) => return Err(self.exited()),
                // A peer that exited with our messages unread resets the
                // channel instead of closing it.
                Err(UpgradeError::Channel(e))
                    if e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    return Err(self.exited());
                }
                Err(UpgradeError::Channel(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(UpgradeError::Exited(status.to_string()));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The child closed its end of the channel: its exit status (killed
    /// if it has not exited within a second).
    fn exited(&mut self) -> UpgradeError {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return UpgradeError::Exited(status.to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        UpgradeError::Exited(format!("closed the upgrade channel; killed: {status}"))
    }

    /// Waits until the successor's workers run; returns its generation
    /// and worker count.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(u8, u32), UpgradeError> {
        match self.wait_for(Instant::now() + timeout, timeout)? {
            Message::Ready {
                generation,
                workers,
                ..
            } => Ok((generation, workers)),
            other => Err(UpgradeError::Protocol(format!("{other:?} before Ready"))),
        }
    }

    /// Lets the successor take new connections and waits until it does.
    pub fn go(&mut self, timeout: Duration) -> Result<(), UpgradeError> {
        send(&self.channel, &Message::Go, &[])?;
        match self.wait_for(Instant::now() + timeout, timeout)? {
            Message::Serving => Ok(()),
            other => Err(UpgradeError::Protocol(format!("{other:?} before Serving"))),
        }
    }

    /// Kills a successor that failed and reaps it.
    pub fn abort(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Leaves the successor running on its own (it outlives us).
    pub fn release(self) {
        drop(self.channel);
        // Not waited for: it is the service now. Dropping a Child neither
        // kills nor waits.
        drop(self.child);
    }
}

/// The successor's view of its predecessor.
pub struct Predecessor {
    channel: Channel,
    pub pid: u32,
}

/// Whether the predecessor let us go ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Go {
    /// It stepped back.
    Go,
    /// It is gone (crashed or killed): nobody else serves, take over.
    PredecessorGone,
}

impl Predecessor {
    /// When this process was started by an upgrade: the channel and what
    /// came over it. `None` for a normal start.
    pub fn inherit() -> Option<Result<(Predecessor, Inherited), UpgradeError>> {
        let raw = std::env::var(CHANNEL_ENV).ok()?;
        // Not passed on to anything this process starts.
        // SAFETY: called from main before any other thread exists.
        unsafe { std::env::remove_var(CHANNEL_ENV) };
        Some(Self::receive(&raw))
    }

    fn receive(raw: &str) -> Result<(Predecessor, Inherited), UpgradeError> {
        let raw: i32 = raw
            .parse()
            .map_err(|_| UpgradeError::Protocol(format!("{CHANNEL_ENV}={raw}")))?;
        let channel = Channel::from_inherited(raw)?;
        let timeout = Duration::from_secs(10);
        let (from_pid, plan, roles, backends) = match recv(&channel, timeout)? {
            Some((
                Message::Offer {
                    from_pid,
                    plan,
                    roles,
                    backends,
                },
                _,
            )) => (from_pid, plan, roles, backends),
            other => {
                return Err(UpgradeError::Protocol(format!(
                    "expected an offer, got {:?}",
                    other.map(|(m, _)| m)
                )));
            }
        };
        let mut fds = Vec::with_capacity(roles.len());
        while fds.len() < roles.len() {
            match recv(&channel, timeout)? {
                Some((Message::Fds, more)) if !more.is_empty() => fds.extend(more),
                other => {
                    return Err(UpgradeError::Protocol(format!(
                        "expected descriptors, got {:?}",
                        other.map(|(m, _)| m)
                    )));
                }
            }
        }
        if fds.len() != roles.len() {
            return Err(UpgradeError::Protocol(format!(
                "{} descriptors for {} roles",
                fds.len(),
                roles.len()
            )));
        }
        let inherited = Inherited::sort(
            from_pid,
            plan,
            roles.into_iter().zip(fds).collect(),
            backends,
        );
        Ok((
            Predecessor {
                channel,
                pid: from_pid,
            },
            inherited,
        ))
    }

    /// Reports the workers ready and waits for the go-ahead.
    pub fn ready(
        &self,
        generation: u8,
        workers: u32,
        timeout: Duration,
    ) -> Result<Go, UpgradeError> {
        let ready = Message::Ready {
            pid: std::process::id(),
            generation,
            workers,
        };
        match send(&self.channel, &ready, &[]) {
            Err(UpgradeError::Channel(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(Go::PredecessorGone);
            }
            other => other?,
        }
        match recv(&self.channel, timeout)? {
            Some((Message::Go, _)) => Ok(Go::Go),
            None => Ok(Go::PredecessorGone),
            Some((m, _)) => Err(UpgradeError::Protocol(format!("{m:?} instead of Go"))),
        }
    }

    /// Reports that this process takes new connections now.
    pub fn serving(self) {
        let _ = send(&self.channel, &Message::Serving, &[]);
    }

    /// Reports a start-up failure (the predecessor keeps serving).
    pub fn failed(&self, reason: &str) {
        let _ = send(
            &self.channel,
            &Message::Failed {
                reason: reason.to_owned(),
            },
            &[],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steering::group::Owner;

    #[test]
    fn the_offer_and_its_descriptors_arrive_sorted_by_role() {
        let (a, b) = Channel::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let plan = GroupPlan::first(
            3,
            1,
            Owner {
                pid: 7,
                start_time: 9,
            },
        );
        let roles = vec![FdRole::Udp, FdRole::WorkerTcp(tcp_addr), FdRole::Control];
        send(
            &a,
            &Message::Offer {
                from_pid: 7,
                plan: plan.clone(),
                roles,
                backends: Vec::new(),
            },
            &[],
        )
        .unwrap();
        let control = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        send(&a, &Message::Fds, &[udp.as_fd(), tcp.as_fd()]).unwrap();
        send(&a, &Message::Fds, &[control.as_fd()]).unwrap();
        let raw = b.inheritable_raw_fd().unwrap();
        std::mem::forget(b); // owned by `receive` from here on
        let (pred, mut got) = Predecessor::receive(&raw.to_string()).unwrap();
        assert_eq!(pred.pid, 7);
        assert_eq!(got.plan, plan);
        assert_eq!(got.udp.len(), 1);
        let listeners = got.take_worker_tcp(tcp_addr);
        assert_eq!(listeners.len(), 1);
        let l = std::net::TcpListener::from(listeners.into_iter().next().unwrap());
        assert_eq!(l.local_addr().unwrap(), tcp_addr, "the same socket");
        assert!(got.control.is_some());
        assert!(got.take_admin(tcp_addr).is_none());

        // Ready, then the predecessor's go-ahead.
        let waiter = std::thread::spawn(move || pred.ready(4, 2, Duration::from_secs(5)));
        let (m, _) = recv(&a, Duration::from_secs(5)).unwrap().unwrap();
        assert!(matches!(m, Message::Ready { generation: 4, .. }), "{m:?}");
        send(&a, &Message::Go, &[]).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), Go::Go);
    }

    #[test]
    fn a_vanished_predecessor_means_take_over() {
        let (a, b) = Channel::pair().unwrap();
        let pred = Predecessor { channel: b, pid: 1 };
        drop(a);
        assert!(matches!(
            pred.ready(0, 1, Duration::from_secs(1)),
            Ok(Go::PredecessorGone)
        ));
    }

    #[test]
    fn the_default_binary_is_this_one() {
        let exe = default_binary().unwrap();
        assert!(exe.exists(), "{}", exe.display());
    }
}
