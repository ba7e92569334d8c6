//! Attaching the XDP program, as root, inside a private network namespace:
//! native mode on a veth, generic mode on `lo`, detach on drop, clean-up of
//! a stale `spooky_xdp` a crashed run left attached, and refusal to replace
//! somebody else's program.
//!
//! The namespace belongs to one thread (`unshare(CLONE_NEWNET)`), so the
//! interfaces in it, and every attachment, vanish when the thread ends,
//! whether the test passed or panicked. `ip` runs as a child of that thread
//! and sees the same namespace; it checks the kernel's view independently
//! of the code under test.

use crate::support::privilege;

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    process::Command,
};

use spooky::steering::xdp::{AttachMode, XdpError, XdpSteering};
use spooky_common::{
    CidLayout,
    maps::{WorkerState, XdpCounter, names},
};

fn layout() -> CidLayout {
    CidLayout::new(0, &[1], 8).unwrap()
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (mode keyword, program ID, program name) of the XDP program `ip` reports
/// on `dev`, if any.
fn xdp_on(dev: &str) -> Option<(String, u32, String)> {
    let text = ip(&["-d", "link", "show", "dev", dev]);
    let mode = ["xdpgeneric", "xdpdrv", "xdpoffload", "xdpmulti", "xdp"]
        .into_iter()
        .find(|m| text.split_whitespace().any(|w| w == *m))?;
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "prog/xdp")?;
    let id = words.get(at + 2)?.parse().ok()?;
    let name = words
        .iter()
        .position(|w| *w == "name")
        .and_then(|i| words.get(i + 1))
        .map_or(String::new(), |s| s.to_string());
    Some((mode.to_string(), id, name))
}

fn program_id(s: &XdpSteering) -> u32 {
    let program: &aya::programs::Xdp = s
        .ebpf()
        .program(names::PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    program.info().unwrap().id()
}

fn program_fd(s: &XdpSteering) -> BorrowedFd<'_> {
    let program: &aya::programs::Xdp = s
        .ebpf()
        .program(names::PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    program.fd().unwrap().as_fd()
}

/// Loads `return XDP_PASS` under a name that is not spooky's.
fn load_foreign_program() -> OwnedFd {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    // r0 = XDP_PASS; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"foreign_xdp");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
    };
    // SAFETY: attr and what it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>() as libc::c_uint,
        )
    };
    assert!(fd >= 0, "BPF_PROG_LOAD: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Attaches `prog` to `dev` in generic mode the legacy way (netlink), as an
/// older spooky or another tool would: the attachment outlives `prog`'s
/// file descriptor and its process.
fn netlink_attach_generic(dev: &str, prog: BorrowedFd<'_>) {
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_FD: u16 = 1;
    const IFLA_XDP_FLAGS: u16 = 3;
    const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {dev}");

    let attr = |kind: u16, value: &[u8]| {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    };
    let mut nested = attr(IFLA_XDP_FD, &prog.as_raw_fd().to_ne_bytes());
    nested.extend(attr(IFLA_XDP_FLAGS, &XDP_FLAGS_SKB_MODE.to_ne_bytes()));
    let attrs = attr(IFLA_XDP | (1 << 15), &nested);
    let len = 16 + 16 + attrs.len();
    let mut msg = Vec::new();
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&[0, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&[0; 8]);
    msg.extend_from_slice(&attrs);

    // SAFETY: plain socket calls on buffers that outlive them.
    unsafe {
        let sock = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
        assert!(sock >= 0);
        let sock = OwnedFd::from_raw_fd(sock);
        assert_eq!(
            libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0),
            msg.len() as isize
        );
        let mut buf = [0u8; 4096];
        let n = libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
        assert!(n >= 20, "netlink ack");
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        assert_eq!(
            errno,
            0,
            "netlink attach: {}",
            io::Error::from_raw_os_error(-errno)
        );
    }
}

/// Runs `f` on a thread that has its own network namespace with a veth pair
/// (spk0, spk1) and `lo`, all up. Everything dies with the thread.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    // The control plane's log lines (mode fallback, stale detach) show up
    // in the test output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare affects only the calling thread here.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        ip(&[
            "link", "add", "spk0", "type", "veth", "peer", "name", "spk1",
        ]);
        for dev in ["spk0", "spk1", "lo"] {
            ip(&["link", "set", dev, "up"]);
        }
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn attach_modes_and_detach_on_drop() {
    if !privilege::require_root("attach_modes_and_detach_on_drop") {
        return;
    }
    in_private_netns(|| {
        let mut s = XdpSteering::load(&layout(), &[4433]).unwrap();
        let id = program_id(&s);
        assert_eq!(s.attach("spk0").unwrap(), AttachMode::Native);
        assert_eq!(s.attach("lo").unwrap(), AttachMode::Generic);
        assert_eq!(s.attach("spk0").unwrap(), AttachMode::Native, "idempotent");
        assert_eq!(
            xdp_on("spk0"),
            Some(("xdp".into(), id, "spooky_xdp".into()))
        );
        assert_eq!(
            xdp_on("lo"),
            Some(("xdpgeneric".into(), id, "spooky_xdp".into()))
        );
        assert_eq!(s.attachments().count(), 2);
        assert!(matches!(
            s.attach("spk-none0"),
            Err(XdpError::UnknownInterface(_))
        ));
        drop(s);
        assert_eq!(xdp_on("spk0"), None, "detached on drop");
        assert_eq!(xdp_on("lo"), None, "detached on drop");
    });
}

#[test]
fn stale_spooky_is_replaced_and_foreign_programs_are_refused() {
    if !privilege::require_root("stale_spooky_is_replaced_and_foreign_programs_are_refused") {
        return;
    }
    in_private_netns(|| {
        // A crashed run: its program stays attached through netlink after
        // its process (here: its loader) is gone.
        let crashed = XdpSteering::load(&layout(), &[4433]).unwrap();
        let stale_id = program_id(&crashed);
        netlink_attach_generic("spk0", program_fd(&crashed));
        drop(crashed);
        assert_eq!(
            xdp_on("spk0"),
            Some(("xdpgeneric".into(), stale_id, "spooky_xdp".into()))
        );

        let mut s = XdpSteering::load(&layout(), &[4433]).unwrap();
        let id = program_id(&s);
        assert_eq!(s.attach("spk0").unwrap(), AttachMode::Native);
        assert_eq!(
            xdp_on("spk0"),
            Some(("xdp".into(), id, "spooky_xdp".into()))
        );

        // Somebody else's program: left alone, and attach says why.
        let foreign = load_foreign_program();
        netlink_attach_generic("spk1", foreign.as_fd());
        let err = s.attach("spk1").unwrap_err();
        match &err {
            XdpError::ForeignProgram {
                interface, name, ..
            } => {
                assert_eq!(interface, "spk1");
                assert_eq!(name, "foreign_xdp");
            }
            other => panic!("expected ForeignProgram, got {other}"),
        }
        assert!(err.to_string().contains("xdp off"), "{err}");
        assert_eq!(xdp_on("spk1").map(|x| x.2), Some("foreign_xdp".into()));

        // A live spooky's BPF link cannot be taken over.
        let mut other = XdpSteering::load(&layout(), &[4433]).unwrap();
        let err = other.attach("spk0").unwrap_err();
        assert!(matches!(err, XdpError::HeldByOther { .. }), "{err}");
        assert_eq!(xdp_on("spk0").map(|x| x.1), Some(id), "untouched");
    });
}

/// The whole data path on real packets: a client namespace sends QUIC
/// short-header datagrams over a veth; native XDP on the server side steers
/// each by its CID to its worker's CPU (CPUMAP), where the reuseport group
/// hands it to the socket whose SO_INCOMING_CPU is that CPU. Many source
/// ports, so the 4-tuple hash alone would scatter them.
#[test]
fn datagrams_reach_the_worker_their_cid_names() {
    if !privilege::require_root("datagrams_reach_the_worker_their_cid_names") {
        return;
    }
    if aya::util::nr_cpus().unwrap_or(1) < 2 {
        println!("SKIP datagrams_reach_the_worker_their_cid_names: needs 2 CPUs");
        return;
    }
    const PORT: u16 = 4433;
    const PER_WORKER: usize = 50;
    let layout = CidLayout::new(2, &[0x5f, 0x01], 12).unwrap();
    in_private_netns(move || {
        // The client end goes to a namespace of its own, owned by a thread
        // that waits for the server side to be ready.
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let client = std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread; gettid has no
            // preconditions.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_NEWNET), 0);
                tid_tx.send(libc::gettid()).unwrap();
            }
            go_rx.recv().unwrap();
            ip(&["addr", "add", "198.18.0.1/30", "dev", "spk1"]);
            ip(&["link", "set", "spk1", "up"]);
            // ARCHITECTURE.md, "Test topology rules": after an XDP redirect the
            // receiver drops UDP whose
            // checksum the sending veth left partial.
            let out = Command::new("ethtool")
                .args(["-K", "spk1", "tx", "off"])
                .output()
                .expect("ethtool (apt-get install ethtool)");
            assert!(out.status.success(), "ethtool -K spk1 tx off failed");
            let mut cid = [0u8; 12];
            for i in 0..PER_WORKER * 2 {
                let worker = (i % 2) as u8;
                layout.encode(worker, &[i as u8; 20], &mut cid).unwrap();
                let mut payload = vec![0x41];
                payload.extend_from_slice(&cid);
                payload.extend_from_slice(&[0xee; 40]);
                // A fresh socket per datagram: a new source port each time.
                let sock = std::net::UdpSocket::bind("198.18.0.1:0").unwrap();
                sock.send_to(&payload, ("198.18.0.2", PORT)).unwrap();
            }
        });

        let tid = tid_rx.recv().unwrap();
        ip(&["link", "set", "spk1", "netns", &tid.to_string()]);
        ip(&["addr", "add", "198.18.0.2/30", "dev", "spk0"]);

        let mut steering = XdpSteering::load(&layout, &[PORT]).unwrap();
        steering.set_worker(0, 0, WorkerState::Live).unwrap();
        steering.set_worker(1, 1, WorkerState::Live).unwrap();
        let sockets: Vec<socket2::Socket> = (0..2)
            .map(|cpu| {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )
                .unwrap();
                s.set_reuse_port(true).unwrap();
                s.set_cpu_affinity(cpu).unwrap();
                let addr: std::net::SocketAddr = ([198, 18, 0, 2], PORT).into();
                s.bind(&addr.into()).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
                    .unwrap();
                s
            })
            .collect();
        assert_eq!(steering.attach("spk0").unwrap(), AttachMode::Native);
        steering.enable().unwrap();
        go_tx.send(()).unwrap();
        if let Err(panic) = client.join() {
            std::panic::resume_unwind(panic);
        }

        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        for (worker, sock) in sockets.iter().enumerate() {
            let mut got = 0;
            // Redirected packets wait for the target CPU's cpumap thread:
            // on a busy machine that can take longer than one read timeout,
            // so keep reading until all arrived or 5 s passed.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let (n, _) = match sock.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(_) if got < PER_WORKER && std::time::Instant::now() < deadline => continue,
                    Err(_) => break,
                };
                // SAFETY: recv_from initialised the first n bytes.
                let cid: Vec<u8> = buf[1..13.min(n)]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let decoded = layout.decode(&cid).expect("our CID");
                assert_eq!(
                    usize::from(decoded.worker),
                    worker,
                    "a datagram for worker {} reached worker {worker}'s socket",
                    decoded.worker
                );
                got += 1;
            }
            assert_eq!(
                got, PER_WORKER,
                "worker {worker} received {got} of {PER_WORKER}"
            );
        }
        let c = steering.counters().unwrap();
        let steered = c[XdpCounter::ShortLocal as usize] + c[XdpCounter::ShortRedirect as usize];
        assert_eq!(steered, (PER_WORKER * 2) as u64, "counters: {c:?}");
        assert_eq!(c[XdpCounter::RedirectFailed as usize], 0);
        println!(
            "{} datagrams: {} already on their CPU, {} redirected",
            steered,
            c[XdpCounter::ShortLocal as usize],
            c[XdpCounter::ShortRedirect as usize]
        );
    });
}
