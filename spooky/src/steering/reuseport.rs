//! Steering without CAP_BPF: a classic BPF program attached to the UDP
//! reuseport group with `SO_ATTACH_REUSEPORT_CBPF` (the technique Envoy uses
//! for QUIC). It reads the worker octet out of the DCID and returns it as the
//! index of the socket that receives the datagram.
//!
//! The kernel runs the program with the UDP header already pulled, so
//! absolute offset 0 is the first byte of the UDP payload. A return value at
//! or above the group's size makes the kernel fall back to its 4-tuple hash,
//! which is what happens to client-chosen DCIDs: a client's handshake
//! retransmissions share a 4-tuple, so they still reach one worker.
//!
//! The socket index is the socket's position in the group, which is the
//! order the workers bound in. It stays so as long as no socket leaves the
//! group (the kernel fills a hole with the last socket), which holds for
//! spooky's fixed set of workers.

use std::{io, os::fd::AsFd, os::fd::AsRawFd};

use libc::sock_filter;
use spooky_common::CidLayout;

/// Returned for "not ours": any value at or above the number of sockets
/// selects the kernel's hash.
const FALLBACK: u32 = u32::MAX;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_LEN: u16 = 0x80;
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;
const BPF_A: u16 = 0x10;

/// Offset of the DCID length octet in a long header.
const LONG_DCID_LEN_OFF: u32 = 5;
/// Offset of the DCID in a long header.
const LONG_DCID_OFF: u32 = 6;
/// Offset of the DCID in a short header.
const SHORT_DCID_OFF: u32 = 1;

/// Why the program could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum ReuseportError {
    /// The group needs at least one socket.
    #[error("reuseport steering needs at least one worker")]
    NoWorkers,
    /// `setsockopt(SO_ATTACH_REUSEPORT_CBPF)` failed.
    #[error("setsockopt(SO_ATTACH_REUSEPORT_CBPF) failed: {0}")]
    Attach(#[source] io::Error),
}

/// Attaches the worker-byte program to the reuseport group `socket` is in.
/// `workers` is the number of sockets in the group; worker octets at or
/// above it fall back to the kernel's hash.
pub fn attach_reuseport_cbpf(
    socket: &impl AsFd,
    layout: &CidLayout,
    workers: u32,
) -> Result<(), ReuseportError> {
    if workers == 0 {
        return Err(ReuseportError::NoWorkers);
    }
    let program = reuseport_program(layout, workers);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call; the
    // kernel copies the instructions before returning.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(ReuseportError::Attach(io::Error::last_os_error()));
    }
    Ok(())
}

/// Builds the program. In pseudo code:
///
/// ```text
/// if len < 1: hash
/// if payload[0] & 0x80 (long header):
///     if len < 6 + cid_len or payload[5] != cid_len: hash
///     dcid = 6
/// else:
///     if len < 1 + cid_len: hash
///     dcid = 1
/// if payload[dcid] != first_octet or node ID differs: hash
/// worker = payload[dcid + worker_offset]
/// return worker if worker < workers else hash
/// ```
///
/// Every load is preceded by a length check: an out-of-bounds load makes a
/// classic BPF program return 0, which would pick socket 0 rather than fall
/// back to the hash.
pub fn reuseport_program(layout: &CidLayout, workers: u32) -> Vec<sock_filter> {
    let cid_len = layout.cid_len() as u32;
    let mut asm = Asm::default();

    // Even the first load is guarded: an empty datagram would otherwise
    // abort the program with 0 and always land on socket 0.
    asm.stmt(BPF_LD | BPF_W | BPF_LEN, 0);
    asm.jump_to_fallback_unless(BPF_JGE, 1);
    asm.stmt(BPF_LD | BPF_B | BPF_ABS, 0);
    let to_long = asm.jump(BPF_JSET, 0x80);

    // Short header: the DCID has our fixed length.
    asm.stmt(BPF_LD | BPF_W | BPF_LEN, 0);
    asm.jump_to_fallback_unless(BPF_JGE, SHORT_DCID_OFF + cid_len);
    decode_tail(&mut asm, layout, SHORT_DCID_OFF, workers);

    // Long header: ours only if the DCID length octet says our length.
    asm.bind_true(to_long);
    asm.stmt(BPF_LD | BPF_W | BPF_LEN, 0);
    asm.jump_to_fallback_unless(BPF_JGE, LONG_DCID_OFF + cid_len);
    asm.stmt(BPF_LD | BPF_B | BPF_ABS, LONG_DCID_LEN_OFF);
    asm.jump_to_fallback_unless(BPF_JEQ, cid_len);
    decode_tail(&mut asm, layout, LONG_DCID_OFF, workers);

    asm.finish()
}

/// Mirrors `CidLayout::decode` on a DCID at `dcid` (length already
/// checked), then returns the worker octet or falls back.
fn decode_tail(asm: &mut Asm, layout: &CidLayout, dcid: u32, workers: u32) {
    asm.stmt(BPF_LD | BPF_B | BPF_ABS, dcid);
    asm.jump_to_fallback_unless(BPF_JEQ, u32::from(layout.first_octet()));
    for (i, &octet) in layout.node_id().iter().enumerate() {
        asm.stmt(BPF_LD | BPF_B | BPF_ABS, dcid + 1 + i as u32);
        asm.jump_to_fallback_unless(BPF_JEQ, u32::from(octet));
    }
    asm.stmt(
        BPF_LD | BPF_B | BPF_ABS,
        dcid + layout.worker_offset() as u32,
    );
    // A worker octet naming no socket: let the kernel's hash pick one
    // rather than have the kernel take the modulo of a wrong index.
    asm.jump_to_fallback_if(BPF_JGE, workers);
    asm.stmt(BPF_RET | BPF_A, 0);
}

/// A forward-only assembler: classic BPF jumps are 8-bit forward offsets,
/// patched here once the targets are known. Every "fallback" jump goes to
/// one shared `ret #FALLBACK` at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<sock_filter>,
    /// (instruction, patch the true branch?) jumping to the fallback.
    to_fallback: Vec<(usize, bool)>,
}

/// A jump whose true branch is bound later with [`Asm::bind_true`].
struct Pending(usize);

impl Asm {
    fn stmt(&mut self, code: u16, k: u32) {
        self.insns.push(sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }

    fn jump(&mut self, op: u16, k: u32) -> Pending {
        self.stmt(BPF_JMP | op | BPF_K, k);
        Pending(self.insns.len() - 1)
    }

    /// Falls through when `A op k` holds, else goes to the fallback.
    fn jump_to_fallback_unless(&mut self, op: u16, k: u32) {
        self.stmt(BPF_JMP | op | BPF_K, k);
        self.to_fallback.push((self.insns.len() - 1, false));
    }

    /// Goes to the fallback when `A op k` holds, else falls through.
    fn jump_to_fallback_if(&mut self, op: u16, k: u32) {
        self.stmt(BPF_JMP | op | BPF_K, k);
        self.to_fallback.push((self.insns.len() - 1, true));
    }

    fn bind_true(&mut self, pending: Pending) {
        self.insns[pending.0].jt = offset(pending.0, self.insns.len());
    }

    fn finish(mut self) -> Vec<sock_filter> {
        let fallback = self.insns.len();
        self.stmt(BPF_RET | BPF_K, FALLBACK);
        for (at, on_true) in self.to_fallback {
            let off = offset(at, fallback);
            if on_true {
                self.insns[at].jt = off;
            } else {
                self.insns[at].jf = off;
            }
        }
        self.insns
    }
}

/// The jump offset from the instruction at `from` to the one at `to`. The
/// longest program (8 node ID octets) spans well under 255 instructions.
fn offset(from: usize, to: usize) -> u8 {
    debug_assert!(to > from && to - from - 1 <= usize::from(u8::MAX));
    (to - from - 1) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::SocketAddr, time::Duration};

    use socket2::{Domain, Protocol, Socket, Type};

    /// Runs a classic BPF program the way the kernel's reuseport hook does:
    /// out-of-bounds loads abort with 0.
    fn run(program: &[sock_filter], payload: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let insn = program.get(pc).expect("program ran off its end");
            pc += 1;
            let class = insn.code & 0x07;
            match class {
                c if c == BPF_LD => {
                    let size = insn.code & 0x18;
                    let mode = insn.code & 0xe0;
                    if mode == BPF_LEN {
                        a = payload.len() as u32;
                    } else {
                        assert_eq!(mode, BPF_ABS, "unsupported load mode");
                        assert_eq!(size, BPF_B, "only byte loads are used");
                        match payload.get(insn.k as usize) {
                            Some(&b) => a = u32::from(b),
                            None => return 0,
                        }
                    }
                }
                c if c == BPF_JMP => {
                    let taken = match insn.code & 0xf0 {
                        op if op == BPF_JEQ => a == insn.k,
                        op if op == BPF_JGE => a >= insn.k,
                        op if op == BPF_JSET => a & insn.k != 0,
                        op => panic!("unsupported jump {op:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                c if c == BPF_RET => {
                    return if insn.code & 0x18 == BPF_A { a } else { insn.k };
                }
                c => panic!("unsupported class {c:#x}"),
            }
        }
    }

    fn layout() -> CidLayout {
        CidLayout::new(2, &[0xde, 0xad], 10).unwrap()
    }

    fn cid(layout: &CidLayout, worker: u8) -> Vec<u8> {
        let mut out = [0u8; 20];
        let n = layout.encode(worker, &[0x5a; 20], &mut out).unwrap();
        out[..n].to_vec()
    }

    fn short(dcid: &[u8], extra: usize) -> Vec<u8> {
        let mut p = vec![0x40 | 0x01];
        p.extend_from_slice(dcid);
        p.extend(std::iter::repeat_n(0xee, extra));
        p
    }

    fn long(dcid: &[u8], extra: usize) -> Vec<u8> {
        let mut p = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        p.extend_from_slice(dcid);
        p.push(0); // SCID length
        p.extend(std::iter::repeat_n(0xee, extra));
        p
    }

    #[test]
    fn routes_our_cids_to_their_worker() {
        let l = layout();
        let prog = reuseport_program(&l, 4);
        for w in 0..4 {
            assert_eq!(
                run(&prog, &short(&cid(&l, w), 30)),
                u32::from(w),
                "short {w}"
            );
            assert_eq!(run(&prog, &long(&cid(&l, w), 30)), u32::from(w), "long {w}");
        }
        // Exactly 1 + cid_len bytes is enough for a short header.
        assert_eq!(run(&prog, &short(&cid(&l, 3), 0)), 3);
    }

    #[test]
    fn falls_back_for_everything_else() {
        let l = layout();
        let prog = reuseport_program(&l, 4);
        let ours = cid(&l, 1);
        // Worker beyond the group.
        assert_eq!(run(&prog, &short(&cid(&l, 4), 30)), FALLBACK);
        assert_eq!(run(&prog, &long(&cid(&l, 200), 30)), FALLBACK);
        // Client-chosen Initial DCID (8 random bytes).
        assert_eq!(run(&prog, &long(&[0x11; 8], 1200)), FALLBACK);
        // Right length, wrong first octet / node ID.
        let mut other = ours.clone();
        other[0] ^= 0x20;
        assert_eq!(run(&prog, &short(&other, 30)), FALLBACK);
        let mut other = ours.clone();
        other[2] ^= 1;
        assert_eq!(run(&prog, &long(&other, 30)), FALLBACK);
        // Truncated: must not return 0 (socket 0) through an aborted load.
        assert_eq!(run(&prog, &short(&ours, 0)[..ours.len()]), FALLBACK);
        assert_eq!(run(&prog, &long(&ours, 0)[..8]), FALLBACK);
        assert_eq!(run(&prog, &[0xc0, 0, 0]), FALLBACK);
        assert_eq!(run(&prog, &[0x40]), FALLBACK);
        assert_eq!(run(&prog, &[]), FALLBACK);
        // Long header whose DCID length octet is not ours.
        let mut p = long(&ours, 30);
        p[5] = ours.len() as u8 + 1;
        assert_eq!(run(&prog, &p), FALLBACK);
    }

    #[test]
    fn works_without_node_id_and_with_the_longest() {
        for l in [
            CidLayout::new(0, &[], 8).unwrap(),
            CidLayout::new(6, &[1, 2, 3, 4, 5, 6, 7, 8], 20).unwrap(),
        ] {
            let prog = reuseport_program(&l, 256);
            for w in [0u8, 7, 255] {
                assert_eq!(run(&prog, &short(&cid(&l, w), 10)), u32::from(w));
                assert_eq!(run(&prog, &long(&cid(&l, w), 10)), u32::from(w));
            }
        }
    }

    #[test]
    fn attach_rejects_zero_workers() {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        assert!(matches!(
            attach_reuseport_cbpf(&sock, &layout(), 0),
            Err(ReuseportError::NoWorkers)
        ));
    }

    /// The real kernel: two sockets in a reuseport group on loopback, the
    /// program attached, datagrams from many source ports (so the 4-tuple
    /// hash would spread them) must land on the socket their CID names.
    #[test]
    fn kernel_steers_by_worker_byte() {
        let l = layout();
        let bind = |addr: SocketAddr| {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        };
        let first = bind("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let second = bind(addr);
        let workers = [first, second];
        attach_reuseport_cbpf(&workers[0], &l, 2).unwrap();

        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        for round in 0..40u8 {
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let worker = round % 2;
            let mut payload = short(&cid(&l, worker), 20);
            payload[20] = round;
            client.send_to(&payload, addr).unwrap();
            let (n, _) = workers[usize::from(worker)]
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("round {round}: worker {worker} got nothing: {e}"));
            // SAFETY: recv_from initialised the first n bytes.
            let got: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            assert_eq!(got, payload, "round {round}");
        }
    }
}
