//! Two network namespaces joined by a veth pair, for end-to-end tests that
//! need real packet paths (XDP on a veth, clients that change address).
//!
//! Follows the rules for such tests (ARCHITECTURE.md, "Test topology
//! rules"): addresses only from the RFC 2544 range 198.18.0.0/15, no
//! default route, names unique per test run
//! (they carry the test process's pid), and everything removed by `Drop`,
//! on success, on failure and while a panic unwinds. Namespaces a killed
//! run left behind (their pid is gone) are removed by the next run.
//!
//! The veth ends are created directly inside the namespaces, so their names
//! (`client_if`, `server_if`) never meet the host's interfaces or those of
//! a parallel test.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

/// Namespace names start with this, then `<pid>-<tag>-{c,s}`.
const PREFIX: &str = "spooky-t";

/// A client namespace and a server namespace with one veth between them.
pub struct VethPair {
    /// Namespace names (under /var/run/netns).
    pub client_ns: String,
    pub server_ns: String,
    /// Interface names inside their namespaces.
    pub client_if: String,
    pub server_if: String,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ip -n NS ARGS...`
pub fn ip_in(ns: &str, args: &[&str]) -> String {
    let out = run(Command::new("ip").arg("-n").arg(ns).args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command that runs `program` inside namespace `ns`. `nsenter --net`
/// (not `ip netns exec`, which remounts /sys) keeps the host's bpffs and
/// sysfs visible; it execs `program`, so the child's pid is the program's.
pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    c
}

/// Moves the calling thread into namespace `ns`. Sockets belong to the
/// namespace of the thread that creates them, so a thread that calls this
/// first and then creates its sockets (and its tokio runtime) talks from
/// inside `ns`, while the rest of the process stays where it was.
pub fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: a valid namespace descriptor; setns only affects this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

/// Runs the future `make` returns on a current-thread runtime, in a thread
/// named `name` that has entered namespace `ns` (so every socket the future
/// opens is in `ns`), and returns its output; a panic in it is re-raised
/// here.
pub fn block_on_in<F, Fut, T>(ns: &str, name: &str, make: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(make())
        })
        .unwrap()
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces of earlier runs that died without cleaning up.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

impl VethPair {
    /// Creates `spooky-t-<pid>-<tag>-c` and `...-s`, a veth between them
    /// (`vc` ↔ `vs`), 198.18.0.1/24 on the client side and 198.18.0.2/24
    /// on the server side, `lo` up in both, and TX checksum offload off on
    /// the client end (ARCHITECTURE.md, "Test topology rules": a veth with
    /// TX checksum offload sends UDP with a partial checksum, which the
    /// receiving stack drops after an XDP redirect).
    ///
    /// The server end keeps its offloads: what it sends reaches the client
    /// through no XDP program, so a partial checksum there is fine. Neither
    /// does GRO on the server end need turning off: XDP runs before GRO,
    /// and UDP GRO only merges datagrams of one 4-tuple for a socket that
    /// asked for it, i.e. datagrams that go to one socket anyway.
    pub fn new(tag: &str) -> Self {
        remove_stale();
        let pid = std::process::id();
        let pair = Self {
            client_ns: format!("{PREFIX}-{pid}-{tag}-c"),
            server_ns: format!("{PREFIX}-{pid}-{tag}-s"),
            client_if: "vc".into(),
            server_if: "vs".into(),
            client_ip: Ipv4Addr::new(198, 18, 0, 1),
            server_ip: Ipv4Addr::new(198, 18, 0, 2),
        };
        // From here on, Drop removes whatever part already exists.
        for ns in [&pair.client_ns, &pair.server_ns] {
            run(Command::new("ip").args(["netns", "add", ns]));
            ip_in(ns, &["link", "set", "lo", "up"]);
        }
        ip_in(
            &pair.client_ns,
            &[
                "link",
                "add",
                &pair.client_if,
                "type",
                "veth",
                "peer",
                "name",
                &pair.server_if,
                "netns",
                &pair.server_ns,
            ],
        );
        for (ns, dev, ip) in [
            (&pair.client_ns, &pair.client_if, pair.client_ip),
            (&pair.server_ns, &pair.server_if, pair.server_ip),
        ] {
            ip_in(ns, &["addr", "add", &format!("{ip}/24"), "dev", dev]);
            ip_in(ns, &["link", "set", dev, "up"]);
        }
        run(command_in(&pair.client_ns, "ethtool").args(["-K", &pair.client_if, "tx", "off"]));
        pair
    }

    /// The ID of the XDP program attached to the server end, if any.
    pub fn server_xdp_program(&self) -> Option<u32> {
        let text = ip_in(
            &self.server_ns,
            &["-d", "link", "show", "dev", &self.server_if],
        );
        let words: Vec<&str> = text.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "prog/xdp")?;
        // `prog/xdp id N ...`
        words.get(at + 2)?.parse().ok()
    }

    /// The XDP program's counters (summed over CPUs) by name, read from
    /// the map of the program attached to the server end.
    pub fn server_xdp_counters(&self) -> Vec<(&'static str, u64)> {
        use aya::maps::{Map, MapData, MapInfo, PerCpuArray};
        use spooky_common::maps::{XdpCounter, names};

        let prog_id = self
            .server_xdp_program()
            .expect("XDP program attached to the server veth");
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id)
            .unwrap_or_else(|| panic!("program {prog_id} not loaded"));
        let map_id = info
            .map_ids()
            .unwrap()
            .unwrap_or_default()
            .into_iter()
            .find(|&id| {
                MapInfo::from_id(id)
                    .ok()
                    .and_then(|m| m.name_as_str().map(|n| n == names::COUNTERS))
                    .unwrap_or(false)
            })
            .unwrap_or_else(|| panic!("program {prog_id} has no {} map", names::COUNTERS));
        let map = Map::from_map_data(MapData::from_id(map_id).unwrap()).unwrap();
        let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map).unwrap();
        XdpCounter::ALL
            .iter()
            .map(|&c| {
                let total = counters
                    .get(&(c as u32), 0)
                    .unwrap()
                    .iter()
                    .fold(0u64, |a, v| a.wrapping_add(*v));
                (c.name(), total)
            })
            .collect()
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting the client end deletes its peer; deleting a namespace
        // removes its name (the namespace itself, with whatever is left in
        // it, goes when its last process or thread leaves).
        let _ = Command::new("ip")
            .args(["-n", &self.client_ns, "link", "del", &self.client_if])
            .output();
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
