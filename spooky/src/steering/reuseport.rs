//! Socket selection in the UDP reuseport group: a classic BPF program
//! attached with `SO_ATTACH_REUSEPORT_CBPF` (the technique Envoy uses for
//! QUIC; it needs no capability). It reads the generation (the config
//! rotation bits) and the worker octet out of the DCID and returns the
//! group position of that generation's worker socket, from the
//! [`GroupPlan`]. It runs in every steering mode but `off`: under XDP the
//! CPU is already right, and the program tells apart the sockets of two
//! processes on that CPU during an upgrade.
//!
//! The kernel runs the program with the UDP header already pulled, so
//! absolute offset 0 is the first byte of the UDP payload. Everything that
//! is not a live generation's CID (client-chosen Initial DCIDs, CIDs of a
//! generation that has exited, junk) goes to the newest generation: to the
//! worker on the current CPU under XDP (the XDP program chose that CPU by
//! hashing the DCID), else by a hash of four DCID octets, so that every
//! retransmission of a handshake reaches one worker. The program never
//! leaves the choice to the kernel's hash, which could pick an unread
//! socket of an exited generation.

use std::{io, os::fd::AsFd, os::fd::AsRawFd};

use libc::sock_filter;
use spooky_common::CidLayout;

use super::group::GroupPlan;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_LEN: u16 = 0x80;
const BPF_ADD: u16 = 0x00;
const BPF_RSH: u16 = 0x70;
const BPF_AND: u16 = 0x50;
const BPF_MOD: u16 = 0x90;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;
const BPF_A: u16 = 0x10;
/// Ancillary load of the current CPU (`SKF_AD_OFF + SKF_AD_CPU`).
const SKF_AD_CPU: u32 = 0xffff_f000u32.wrapping_add(36);

/// Offset of the DCID length octet in a long header.
const LONG_DCID_LEN_OFF: u32 = 5;
/// Offset of the DCID in a long header.
const LONG_DCID_OFF: u32 = 6;
/// Offset of the DCID in a short header.
const SHORT_DCID_OFF: u32 = 1;
/// The four octets hashed for datagrams that name no live generation: a
/// long header's DCID starts here and is at least 8 octets in an Initial
/// (RFC 9000 7.2), and a short header's CID covers it.
const HASH_OFF: u32 = LONG_DCID_OFF;

/// Why the program could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum ReuseportError {
    /// The newest generation has no block (a bug in the plan's owner).
    #[error("reuseport steering needs at least one worker in the newest generation")]
    NoWorkers,
    /// `setsockopt(SO_ATTACH_REUSEPORT_CBPF)` failed.
    #[error("setsockopt(SO_ATTACH_REUSEPORT_CBPF) failed: {0}")]
    Attach(#[source] io::Error),
}

/// How datagrams that name no live generation pick a worker of the newest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// `cpus[w]` is worker w's CPU: the worker on the current CPU (XDP
    /// mode, where the XDP program picked the CPU), then the hash.
    Cpus(Vec<u32>),
    /// A hash of four DCID octets.
    Hash,
}

/// Attaches the selection program for `plan` to the reuseport group
/// `socket` is in (replacing the one attached before, atomically).
pub fn attach_reuseport_cbpf(
    socket: &impl AsFd,
    layout: &CidLayout,
    plan: &GroupPlan,
    fallback: &Fallback,
) -> Result<(), ReuseportError> {
    let program = reuseport_program(layout, plan, fallback)?;
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
/// if len < 1: fallback
/// if payload[0] & 0x80 (long header):
///     if len < 6 + cid_len or payload[5] != cid_len: fallback
///     dcid = 6
/// else:
///     if len < 1 + cid_len: fallback
///     dcid = 1
/// if payload[dcid] & 0x1f != cid_len - 1 or node ID differs: fallback
/// for each live block: if payload[dcid] >> 5 == block.generation:
///     worker = payload[dcid + worker_offset]
///     return block.base + worker if worker < block.workers else fallback
/// fallback:
///     (XDP) for each newest worker w: if cpu == cpus[w]: return base + w
///     if len < 10: return base
///     return base + be32(payload[6..10]) % workers
/// ```
///
/// Every load is preceded by a length check: an out-of-bounds load makes a
/// classic BPF program return 0, which would pick position 0 whoever owns
/// it.
pub fn reuseport_program(
    layout: &CidLayout,
    plan: &GroupPlan,
    fallback: &Fallback,
) -> Result<Vec<sock_filter>, ReuseportError> {
    let newest = plan
        .newest_block()
        .filter(|b| b.workers > 0)
        .ok_or(ReuseportError::NoWorkers)?;
    let cid_len = layout.cid_len() as u32;
    let mut asm = Asm::default();

    // Even the first load is guarded: an empty datagram would otherwise
    // abort the program with 0 and always land on position 0.
    asm.stmt(BPF_LD | BPF_W | BPF_LEN, 0);
    asm.jump_to_fallback_unless(BPF_JGE, 1);
    asm.stmt(BPF_LD | BPF_B | BPF_ABS, 0);
    let to_long = asm.jump(BPF_JSET, 0x80);

    // Short header: the DCID has our fixed length.
    asm.stmt(BPF_LD | BPF_W | BPF_LEN, 0);
    asm.jump_to_fallback_unless(BPF_JGE, SHORT_DCID_OFF + cid_len);
    decode_tail(&mut asm, layout, plan, SHORT_DCID_OFF);

    // Long header: ours only if the DCID length octet says our length.
    asm.bind_true(to_long);
    asm.stmt(BPF_LD | BPF_W | BPF_LEN, 0);
    asm.jump_to_fallback_unless(BPF_JGE, LONG_DCID_OFF + cid_len);
    asm.stmt(BPF_LD | BPF_B | BPF_ABS, LONG_DCID_LEN_OFF);
    asm.jump_to_fallback_unless(BPF_JEQ, cid_len);
    decode_tail(&mut asm, layout, plan, LONG_DCID_OFF);

    // The fallback: the newest generation.
    asm.bind_fallback();
    if let Fallback::Cpus(cpus) = fallback {
        asm.stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_CPU);
        for (w, &cpu) in cpus.iter().enumerate().take(newest.workers as usize) {
            asm.insns.push(sock_filter {
                code: BPF_JMP | BPF_JEQ | BPF_K,
                jt: 0,
                jf: 1,
                k: cpu,
            });
            asm.stmt(BPF_RET | BPF_K, newest.base + w as u32);
        }
    }
    asm.stmt(BPF_LD | BPF_W | BPF_LEN, 0);
    asm.insns.push(sock_filter {
        code: BPF_JMP | BPF_JGE | BPF_K,
        jt: 1,
        jf: 0,
        k: HASH_OFF + 4,
    });
    asm.stmt(BPF_RET | BPF_K, newest.base);
    asm.stmt(BPF_LD | BPF_W | BPF_ABS, HASH_OFF);
    asm.stmt(BPF_ALU | BPF_MOD | BPF_K, newest.workers);
    asm.stmt(BPF_ALU | BPF_ADD | BPF_K, newest.base);
    asm.stmt(BPF_RET | BPF_A, 0);
    Ok(asm.insns)
}

/// Mirrors `CidLayout::decode` (for any generation) on a DCID at `dcid`
/// (length already checked), then returns the position of the worker's
/// socket in its generation's block, or falls back.
fn decode_tail(asm: &mut Asm, layout: &CidLayout, plan: &GroupPlan, dcid: u32) {
    asm.stmt(BPF_LD | BPF_B | BPF_ABS, dcid);
    asm.stmt(BPF_ALU | BPF_AND | BPF_K, 0x1f);
    asm.jump_to_fallback_unless(BPF_JEQ, layout.cid_len() as u32 - 1);
    for (i, &octet) in layout.node_id().iter().enumerate() {
        asm.stmt(BPF_LD | BPF_B | BPF_ABS, dcid + 1 + i as u32);
        asm.jump_to_fallback_unless(BPF_JEQ, u32::from(octet));
    }
    let worker_at = dcid + layout.worker_offset() as u32;
    for block in plan.live() {
        asm.stmt(BPF_LD | BPF_B | BPF_ABS, dcid);
        asm.stmt(BPF_ALU | BPF_RSH | BPF_K, 5);
        // Not this generation: skip the 5 instructions that serve it.
        asm.insns.push(sock_filter {
            code: BPF_JMP | BPF_JEQ | BPF_K,
            jt: 0,
            jf: 4,
            k: u32::from(block.generation),
        });
        asm.stmt(BPF_LD | BPF_B | BPF_ABS, worker_at);
        // A worker octet naming no socket of its generation.
        asm.jump_to_fallback_if(BPF_JGE, block.workers);
        asm.stmt(BPF_ALU | BPF_ADD | BPF_K, block.base);
        asm.stmt(BPF_RET | BPF_A, 0);
    }
    // No live generation issued it.
    asm.stmt(BPF_JMP | BPF_JA, 0);
    asm.to_fallback_always.push(asm.insns.len() - 1);
}

/// A forward-only assembler: classic BPF conditional jumps are 8-bit
/// forward offsets, patched here once the targets are known. Every
/// "fallback" jump goes to the one fallback section, bound with
/// [`Asm::bind_fallback`].
#[derive(Default)]
struct Asm {
    insns: Vec<sock_filter>,
    /// (instruction, patch the true branch?) jumping to the fallback.
    to_fallback: Vec<(usize, bool)>,
    /// Unconditional jumps (`ja`, 32-bit offset) to the fallback.
    to_fallback_always: Vec<usize>,
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

    /// The fallback section starts at the next instruction.
    fn bind_fallback(&mut self) {
        let here = self.insns.len();
        for (at, on_true) in std::mem::take(&mut self.to_fallback) {
            let off = offset(at, here);
            if on_true {
                self.insns[at].jt = off;
            } else {
                self.insns[at].jf = off;
            }
        }
        for at in std::mem::take(&mut self.to_fallback_always) {
            self.insns[at].k = (here - at - 1) as u32;
        }
    }
}

/// The jump offset from the instruction at `from` to the one at `to`. The
/// longest stretch (8 node ID octets, 7 generations) is about 150
/// instructions.
fn offset(from: usize, to: usize) -> u8 {
    debug_assert!(to > from && to - from - 1 <= usize::from(u8::MAX));
    (to - from - 1) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::SocketAddr, time::Duration};

    use socket2::{Domain, Protocol, Socket, Type};

    use crate::steering::group::{Block, Owner};

    /// Runs a classic BPF program the way the kernel's reuseport hook does
    /// on `cpu`: out-of-bounds loads abort with 0.
    fn run_on(program: &[sock_filter], payload: &[u8], cpu: u32) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let insn = program.get(pc).expect("program ran off its end");
            pc += 1;
            match insn.code & 0x07 {
                c if c == BPF_LD => {
                    let size = insn.code & 0x18;
                    let mode = insn.code & 0xe0;
                    if mode == BPF_LEN {
                        a = payload.len() as u32;
                        continue;
                    }
                    assert_eq!(mode, BPF_ABS, "unsupported load mode");
                    if insn.k == SKF_AD_CPU {
                        a = cpu;
                        continue;
                    }
                    let at = insn.k as usize;
                    let bytes = if size == BPF_B { 1 } else { 4 };
                    match payload.get(at..at + bytes) {
                        Some(b) => a = b.iter().fold(0, |acc, &x| acc << 8 | u32::from(x)),
                        None => return 0,
                    }
                }
                c if c == BPF_ALU => match insn.code & 0xf0 {
                    op if op == BPF_AND => a &= insn.k,
                    op if op == BPF_RSH => a >>= insn.k,
                    op if op == BPF_ADD => a = a.wrapping_add(insn.k),
                    op if op == BPF_MOD => a %= insn.k,
                    op => panic!("unsupported alu {op:#x}"),
                },
                c if c == BPF_JMP => {
                    if insn.code & 0xf0 == BPF_JA {
                        pc += insn.k as usize;
                        continue;
                    }
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

    fn run(program: &[sock_filter], payload: &[u8]) -> u32 {
        run_on(program, payload, 99)
    }

    fn layout() -> CidLayout {
        CidLayout::new(2, &[0xde, 0xad], 10).unwrap()
    }

    fn of_generation(layout: &CidLayout, generation: u8) -> CidLayout {
        CidLayout::new(generation, layout.node_id(), layout.cid_len()).unwrap()
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

    const ME: Owner = Owner {
        pid: 1,
        start_time: 1,
    };

    fn single(generation: u8, workers: u32) -> GroupPlan {
        GroupPlan::first(generation, workers, ME)
    }

    /// Generation 2 at positions 0..4 (draining), generation 3 at 4..6
    /// (newest), and an exited generation 5 at 6..8.
    fn upgraded() -> GroupPlan {
        GroupPlan {
            blocks: vec![
                Block {
                    generation: 2,
                    base: 0,
                    workers: 4,
                    owner: Some(ME),
                },
                Block {
                    generation: 3,
                    base: 4,
                    workers: 2,
                    owner: Some(ME),
                },
                Block {
                    generation: 5,
                    base: 6,
                    workers: 2,
                    owner: None,
                },
            ],
            newest: 3,
        }
    }

    #[test]
    fn routes_our_cids_to_their_worker() {
        let l = layout();
        let prog = reuseport_program(&l, &single(2, 4), &Fallback::Hash).unwrap();
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
    fn each_generation_reaches_its_own_block() {
        let l = layout();
        let plan = upgraded();
        let prog = reuseport_program(&l, &plan, &Fallback::Hash).unwrap();
        for w in 0..4u8 {
            let old = cid(&of_generation(&l, 2), w);
            assert_eq!(run(&prog, &short(&old, 30)), u32::from(w));
            assert_eq!(run(&prog, &long(&old, 30)), u32::from(w));
        }
        for w in 0..2u8 {
            let new = cid(&of_generation(&l, 3), w);
            assert_eq!(run(&prog, &short(&new, 30)), 4 + u32::from(w));
        }
        // Generation 3 has no worker 2: its block's neighbours are never hit.
        let beyond = run(&prog, &short(&cid(&of_generation(&l, 3), 2), 30));
        assert!((4..6).contains(&beyond), "{beyond}");
        // The exited generation's CIDs go to the newest, not to its unread
        // sockets.
        let gone = run(&prog, &short(&cid(&of_generation(&l, 5), 1), 30));
        assert!((4..6).contains(&gone), "{gone}");
    }

    #[test]
    fn everything_else_goes_to_the_newest_generation() {
        let l = layout();
        let plan = upgraded();
        let prog = reuseport_program(&l, &plan, &Fallback::Hash).unwrap();
        let newest = 4..6;
        let ours = cid(&of_generation(&l, 2), 1);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..64u8 {
            // Client-chosen Initial DCIDs: 8 random-looking bytes.
            let dcid = [i, i.wrapping_mul(7), 3, i ^ 0x55, 9, 9, 9, 9];
            let p = long(&dcid, 1200);
            let got = run(&prog, &p);
            assert!(newest.contains(&got), "{got}");
            assert_eq!(run(&prog, &p), got, "deterministic per DCID");
            seen.insert(got);
        }
        assert_eq!(seen.len(), 2, "spread over the newest workers");
        let mut other = ours.clone();
        other[2] ^= 1; // node ID
        let mut unroutable = ours.clone();
        unroutable[0] |= 0xe0; // config rotation 7
        let mut p = long(&ours, 30);
        p[5] = ours.len() as u8 + 1;
        for junk in [
            short(&other, 30),
            short(&unroutable, 30),
            p,
            short(&ours, 0)[..ours.len()].to_vec(),
            long(&ours, 0)[..8].to_vec(),
            vec![0xc0, 0, 0],
            vec![0x40],
            vec![],
        ] {
            let got = run(&prog, &junk);
            assert!(newest.contains(&got), "{junk:02x?} -> {got}");
        }
    }

    #[test]
    fn under_xdp_the_current_cpu_names_the_worker() {
        let l = layout();
        let prog = reuseport_program(&l, &upgraded(), &Fallback::Cpus(vec![6, 7])).unwrap();
        let initial = long(&[1, 2, 3, 4, 5, 6, 7, 8], 1200);
        assert_eq!(run_on(&prog, &initial, 6), 4);
        assert_eq!(run_on(&prog, &initial, 7), 5);
        // A CPU with no worker: the hash.
        assert!((4..6).contains(&run_on(&prog, &initial, 0)));
        // Own CIDs do not depend on the CPU.
        assert_eq!(run_on(&prog, &short(&cid(&l, 3), 9), 6), 3);
    }

    #[test]
    fn works_without_node_id_and_with_the_longest() {
        for l in [
            CidLayout::new(0, &[], 8).unwrap(),
            CidLayout::new(6, &[1, 2, 3, 4, 5, 6, 7, 8], 20).unwrap(),
        ] {
            let prog = reuseport_program(&l, &single(l.config_id(), 256), &Fallback::Hash).unwrap();
            for w in [0u8, 7, 255] {
                assert_eq!(run(&prog, &short(&cid(&l, w), 10)), u32::from(w));
                assert_eq!(run(&prog, &long(&cid(&l, w), 10)), u32::from(w));
            }
        }
        // Seven live generations of 256 workers: every jump still fits.
        let l = CidLayout::new(0, &[1, 2, 3, 4, 5, 6, 7, 8], 20).unwrap();
        let plan = GroupPlan {
            blocks: (0..7)
                .map(|g| Block {
                    generation: g,
                    base: u32::from(g) * 256,
                    workers: 256,
                    owner: Some(ME),
                })
                .collect(),
            newest: 6,
        };
        let prog = reuseport_program(&l, &plan, &Fallback::Cpus((0..256).collect())).unwrap();
        assert!(prog.len() < 4096, "{}", prog.len());
        for g in 0..7u8 {
            let c = cid(&of_generation(&l, g), 200);
            assert_eq!(run(&prog, &short(&c, 1)), u32::from(g) * 256 + 200);
        }
    }

    #[test]
    fn a_plan_without_its_newest_block_is_refused() {
        let mut plan = single(0, 2);
        plan.newest = 4;
        assert!(matches!(
            reuseport_program(&layout(), &plan, &Fallback::Hash),
            Err(ReuseportError::NoWorkers)
        ));
    }

    /// The real kernel: two generations' sockets in one reuseport group on
    /// loopback, the program attached, datagrams from many source ports (so
    /// the 4-tuple hash would spread them) must land on the socket their
    /// CID names, and client-chosen DCIDs on the newest generation's.
    #[test]
    fn kernel_steers_by_generation_and_worker() {
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
        let mut sockets = vec![first];
        sockets.extend((1..4).map(|_| bind(addr)));
        let mut plan = single(2, 2);
        let placed = plan.place(2, ME).unwrap();
        plan.promote(placed.generation);
        attach_reuseport_cbpf(&sockets[0], &l, &plan, &Fallback::Hash).unwrap();

        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        let mut receive = |at: usize, payload: &[u8], what: &str| {
            let (n, _) = sockets[at]
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("{what}: socket {at} got nothing: {e}"));
            // SAFETY: recv_from initialised the first n bytes.
            let got: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            assert_eq!(got, payload, "{what}");
        };
        for round in 0..40u8 {
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let worker = round % 2;
            let generation = if round % 4 < 2 { 2 } else { placed.generation };
            let mut payload = short(&cid(&of_generation(&l, generation), worker), 20);
            payload[20] = round;
            client.send_to(&payload, addr).unwrap();
            let at = if generation == 2 { 0 } else { 2 } + usize::from(worker);
            receive(at, &payload, &format!("round {round}"));
        }
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let initial = long(&[7, 7, 7, 7, 0, 0, 0, 3], 1200);
        client.send_to(&initial, addr).unwrap();
        receive(2 + 3 % 2, &initial, "client-chosen DCID");
    }
}
