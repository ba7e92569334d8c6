//! A small builder of Ethernet frames for feeding the XDP program through
//! `BPF_PROG_TEST_RUN`: Ethernet (+ one VLAN tag), IPv4 (with options) or
//! IPv6, UDP or TCP, and QUIC short/long headers. Addresses come from the
//! benchmarking ranges (198.18.0.0/15, 2001:2::/48); these frames never
//! reach a wire.

#![allow(dead_code)]

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const QUIC_V1: u32 = 1;
pub const QUIC_V2: u32 = 0x6b33_43cf;

const DST4: [u8; 4] = [198, 18, 0, 2];
const DST6: [u8; 16] = [0x20, 0x01, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// The network layer of a frame.
#[derive(Clone, Debug)]
pub enum Ip {
    /// IPv4; `options` (a multiple of 4 bytes) grows the header.
    V4 {
        options: Vec<u8>,
        more_fragments: bool,
    },
    /// IPv6; `ext` inserts a hop-by-hop options header before the payload.
    V6 { hop_by_hop: bool },
}

impl Ip {
    pub fn v4() -> Self {
        Ip::V4 {
            options: Vec::new(),
            more_fragments: false,
        }
    }

    pub fn v6() -> Self {
        Ip::V6 { hop_by_hop: false }
    }
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    pub vlan: Option<(u16, u16)>,
    pub ip: Ip,
    pub src_port: u16,
    pub dst_port: u16,
    /// Bytes appended after the IP packet (Ethernet padding).
    pub trailer: usize,
    /// The source: 198.18.`net`.`host`, or 2001:2:0:`net`::`host`.
    pub src_net: u8,
    pub src_host: u8,
}

impl Frame {
    pub fn new(ip: Ip, dst_port: u16) -> Self {
        Self {
            vlan: None,
            ip,
            src_port: 50_000,
            dst_port,
            trailer: 0,
            src_net: 0,
            src_host: 1,
        }
    }

    /// From another source address (see `src_net`, `src_host`).
    pub fn with_source(mut self, net: u8, host: u8) -> Self {
        self.src_net = net;
        self.src_host = host;
        self
    }

    fn src4(&self) -> [u8; 4] {
        [198, 18, self.src_net, self.src_host]
    }

    fn src6(&self) -> [u8; 16] {
        let mut a = [0x20, 0x01, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[7] = self.src_net;
        a[15] = self.src_host;
        a
    }

    pub fn vlan(mut self, tpid: u16, id: u16) -> Self {
        self.vlan = Some((tpid, id));
        self
    }

    pub fn trailer(mut self, bytes: usize) -> Self {
        self.trailer = bytes;
        self
    }

    /// A UDP datagram carrying `payload`.
    pub fn udp(&self, payload: &[u8]) -> Vec<u8> {
        let mut l4 = Vec::with_capacity(8 + payload.len());
        l4.extend_from_slice(&self.src_port.to_be_bytes());
        l4.extend_from_slice(&self.dst_port.to_be_bytes());
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(payload);
        let sum = self.l4_checksum(IPPROTO_UDP, &l4);
        // 0 means "no checksum" in UDP; an all-ones sum is sent as such.
        let sum = if sum == 0 { 0xffff } else { sum };
        l4[6..8].copy_from_slice(&sum.to_be_bytes());
        self.wrap(IPPROTO_UDP, &l4)
    }

    /// A TCP SYN segment.
    pub fn tcp_syn(&self) -> Vec<u8> {
        let mut l4 = Vec::with_capacity(20);
        l4.extend_from_slice(&self.src_port.to_be_bytes());
        l4.extend_from_slice(&self.dst_port.to_be_bytes());
        l4.extend_from_slice(&1u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.extend_from_slice(&[5 << 4, 0x02]); // data offset, SYN
        l4.extend_from_slice(&65_535u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        let sum = self.l4_checksum(IPPROTO_TCP, &l4);
        l4[16..18].copy_from_slice(&sum.to_be_bytes());
        self.wrap(IPPROTO_TCP, &l4)
    }

    fn ethernet(&self, ethertype: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(1600);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        if let Some((tpid, id)) = self.vlan {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn wrap(&self, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f;
        match &self.ip {
            Ip::V4 {
                options,
                more_fragments,
            } => {
                assert!(options.len() % 4 == 0 && options.len() <= 40);
                f = self.ethernet(ETH_P_IP);
                let start = f.len();
                let ihl = 5 + options.len() / 4;
                let total = ihl * 4 + l4.len();
                f.push(0x40 | ihl as u8);
                f.push(0);
                f.extend_from_slice(&(total as u16).to_be_bytes());
                f.extend_from_slice(&0x1234u16.to_be_bytes()); // ID
                let frag: u16 = if *more_fragments { 0x2000 } else { 0x4000 }; // MF / DF
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64);
                f.push(proto);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&self.src4());
                f.extend_from_slice(&DST4);
                f.extend_from_slice(options);
                let sum = checksum(&f[start..], 0);
                f[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
            }
            Ip::V6 { hop_by_hop } => {
                f = self.ethernet(ETH_P_IPV6);
                let ext_len = if *hop_by_hop { 8 } else { 0 };
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
                f.push(if *hop_by_hop { 0 } else { proto });
                f.push(64);
                f.extend_from_slice(&self.src6());
                f.extend_from_slice(&DST6);
                if *hop_by_hop {
                    // Next header, length 0 (8 bytes), PadN of 4.
                    f.extend_from_slice(&[proto, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
        }
        f.extend_from_slice(l4);
        f.extend(std::iter::repeat_n(0, self.trailer));
        f
    }

    fn l4_checksum(&self, proto: u8, l4: &[u8]) -> u16 {
        let mut pseudo = Vec::with_capacity(40);
        match self.ip {
            Ip::V4 { .. } => {
                pseudo.extend_from_slice(&self.src4());
                pseudo.extend_from_slice(&DST4);
                pseudo.extend_from_slice(&[0, proto]);
                pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            }
            Ip::V6 { .. } => {
                pseudo.extend_from_slice(&self.src6());
                pseudo.extend_from_slice(&DST6);
                pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, proto]);
            }
        }
        let partial = sum16(&pseudo, 0);
        checksum(l4, partial)
    }
}

/// An ARP request (not IP at all).
pub fn arp_frame() -> Vec<u8> {
    let frame = Frame::new(Ip::v4(), 0);
    let mut f = frame.ethernet(ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&frame.src4());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&DST4);
    f
}

fn sum16(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    sum
}

/// The Internet checksum (RFC 1071) of `data`, starting from `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = sum16(data, initial);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A QUIC short-header payload: first octet (fixed bit set unless
/// `fixed_bit` is false), the DCID, then filler up to `len` bytes.
pub fn quic_short(dcid: &[u8], len: usize, fixed_bit: bool) -> Vec<u8> {
    let mut p = vec![if fixed_bit { 0x40 } else { 0x00 } | 0x01];
    p.extend_from_slice(dcid);
    pad_to(&mut p, len);
    p
}

/// Long-header packet types by their role (the type bits differ per version).
#[derive(Clone, Copy, Debug)]
pub enum LongType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
    /// The raw two type bits.
    Bits(u8),
}

impl LongType {
    fn bits(self, version: u32) -> u8 {
        let v2 = version == QUIC_V2;
        match self {
            LongType::Initial => u8::from(v2),
            LongType::ZeroRtt => {
                if v2 {
                    2
                } else {
                    1
                }
            }
            LongType::Handshake => {
                if v2 {
                    3
                } else {
                    2
                }
            }
            LongType::Retry => {
                if v2 {
                    0
                } else {
                    3
                }
            }
            LongType::Bits(b) => b & 3,
        }
    }
}

/// A QUIC long-header payload of `len` bytes (at least the header).
pub fn quic_long(
    ty: LongType,
    version: u32,
    dcid: &[u8],
    scid: &[u8],
    len: usize,
    fixed_bit: bool,
) -> Vec<u8> {
    let first = 0x80 | if fixed_bit { 0x40 } else { 0 } | (ty.bits(version) << 4) | 0x03;
    let mut p = vec![first];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(scid.len() as u8);
    p.extend_from_slice(scid);
    pad_to(&mut p, len);
    p
}

/// Fills with a recognisable pattern (a real packet would carry a token,
/// length, packet number and encrypted payload here).
fn pad_to(p: &mut Vec<u8>, len: usize) {
    let mut i = 0u8;
    while p.len() < len {
        p.push(0xa5 ^ i);
        i = i.wrapping_add(1);
    }
}

/// Deterministic pseudo-random bytes (xorshift), for client-chosen DCIDs.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
