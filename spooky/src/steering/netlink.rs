//! Just enough rtnetlink to see which XDP programs an interface runs and to
//! detach one (aya attaches and detaches its own, but cannot query). Errors
//! are the kernel's, as `io::Error`, so callers can tell EBUSY apart.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const IFLA_XDP_EXPECTED_FD: u16 = 8;

const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;

const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
const XDP_FLAGS_REPLACE: u32 = 1 << 4;

const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14));
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// The XDP programs attached to `ifindex`: (program ID, mode flag).
pub(super) fn xdp_programs(ifindex: u32) -> io::Result<Vec<(u32, u32)>> {
    let sock = Socket::open()?;
    let reply = sock.request(libc::RTM_GETLINK, 0, ifindex, &[])?;
    let Some(attrs) = reply else {
        return Err(io::Error::other("no RTM_NEWLINK in the kernel's answer"));
    };
    let Some(xdp) = find_attr(&attrs, IFLA_XDP) else {
        return Ok(Vec::new());
    };
    let mut attached = 0u8;
    let mut single = None;
    let mut per_mode = Vec::new();
    for (kind, value) in Attrs(xdp) {
        let id = || {
            value
                .get(..4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        match kind {
            IFLA_XDP_ATTACHED => attached = value.first().copied().unwrap_or(0),
            IFLA_XDP_PROG_ID => single = id(),
            IFLA_XDP_DRV_PROG_ID => per_mode.extend(id().map(|i| (i, XDP_FLAGS_DRV_MODE))),
            IFLA_XDP_SKB_PROG_ID => per_mode.extend(id().map(|i| (i, XDP_FLAGS_SKB_MODE))),
            IFLA_XDP_HW_PROG_ID => per_mode.extend(id().map(|i| (i, XDP_FLAGS_HW_MODE))),
            _ => {}
        }
    }
    // One mode attached: IFLA_XDP_PROG_ID and IFLA_XDP_ATTACHED say it
    // all. Several (XDP_ATTACHED_MULTI): the per-mode IDs do.
    let flags = match attached {
        0 => return Ok(Vec::new()),
        XDP_ATTACHED_DRV => XDP_FLAGS_DRV_MODE,
        XDP_ATTACHED_SKB => XDP_FLAGS_SKB_MODE,
        XDP_ATTACHED_HW => XDP_FLAGS_HW_MODE,
        _ => return Ok(per_mode),
    };
    Ok(single.map(|id| vec![(id, flags)]).unwrap_or(per_mode))
}

/// Detaches the program `expected` from the `mode_flags` slot of
/// `ifindex`, only if it is still the one attached there.
pub(super) fn xdp_detach(
    ifindex: u32,
    mode_flags: u32,
    expected: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut nested = Vec::new();
    push_attr(&mut nested, IFLA_XDP_FD, &(-1i32).to_ne_bytes());
    push_attr(
        &mut nested,
        IFLA_XDP_FLAGS,
        &(mode_flags | XDP_FLAGS_REPLACE).to_ne_bytes(),
    );
    push_attr(
        &mut nested,
        IFLA_XDP_EXPECTED_FD,
        &expected.as_raw_fd().to_ne_bytes(),
    );
    let mut attrs = Vec::new();
    push_attr(&mut attrs, IFLA_XDP | (1 << 15), &nested);
    let sock = Socket::open()?;
    sock.request(libc::RTM_SETLINK, libc::NLM_F_ACK as u16, ifindex, &attrs)
        .map(|_| ())
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        // Replies must not block forever if the kernel has nothing to say.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a valid timeval for the duration of the call.
        let ret = unsafe {
            libc::setsockopt(
                sock.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Sends one request about `ifindex` and returns the attributes of
    /// the RTM_NEWLINK answer, if any. An error answer becomes an
    /// `io::Error` with its errno.
    fn request(
        &self,
        kind: u16,
        extra_flags: u16,
        ifindex: u32,
        attrs: &[u8],
    ) -> io::Result<Option<Vec<u8>>> {
        let len = NLMSG_HDRLEN + IFINFOMSG_LEN + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&((libc::NLM_F_REQUEST as u16) | extra_flags).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port ID: the kernel's
        // struct ifinfomsg: family, pad, type, index, flags, change.
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(attrs);

        // SAFETY: `msg` is a valid buffer of `msg.len()` bytes.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }

        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let msg_len = u32_at(rest, 0) as usize;
                let msg_type = u16::from_ne_bytes([rest[4], rest[5]]);
                if msg_len < NLMSG_HDRLEN || msg_len > rest.len() {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                let body = &rest[NLMSG_HDRLEN..msg_len];
                match msg_type {
                    t if t == libc::NLMSG_ERROR as u16 => {
                        let errno = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        return if errno == 0 {
                            Ok(None)
                        } else {
                            Err(io::Error::from_raw_os_error(-errno))
                        };
                    }
                    t if t == libc::RTM_NEWLINK => {
                        return Ok(body.get(IFINFOMSG_LEN..).map(<[u8]>::to_vec));
                    }
                    t if t == libc::NLMSG_DONE as u16 => return Ok(None),
                    _ => {}
                }
                rest = &rest[align4(msg_len).min(rest.len())..];
            }
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn push_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align4(out.len()), 0);
}

fn find_attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    Attrs(attrs).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// Iterates over (type, payload) of a run of netlink attributes.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.0;
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        self.0 = &b[align4(len).min(b.len())..];
        Some((kind, &b[4..len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut nested = Vec::new();
        push_attr(&mut nested, IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB]);
        push_attr(&mut nested, IFLA_XDP_PROG_ID, &42u32.to_ne_bytes());
        let mut attrs = Vec::new();
        push_attr(&mut attrs, 3, b"lo\0");
        push_attr(&mut attrs, IFLA_XDP | (1 << 15), &nested);
        let xdp = find_attr(&attrs, IFLA_XDP).unwrap();
        let parsed: Vec<_> = Attrs(xdp).collect();
        assert_eq!(parsed[0], (IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB][..]));
        assert_eq!(parsed[1].0, IFLA_XDP_PROG_ID);
        assert_eq!(u32_at(parsed[1].1, 0), 42);
    }

    #[test]
    fn truncated_attributes_stop_iteration() {
        assert_eq!(Attrs(&[8, 0, 1, 0, 0]).count(), 0);
        assert_eq!(Attrs(&[2, 0, 1, 0]).count(), 0);
    }
}
