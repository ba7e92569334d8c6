//! Messages with file descriptors between two spooky processes: a
//! `SOCK_SEQPACKET` Unix socket pair (message boundaries kept), each
//! message a byte payload plus up to [`MAX_FDS`] descriptors sent with
//! `SCM_RIGHTS`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Descriptors per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 200;
/// Largest payload of one message.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// One end of the pair.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair; both ends close on exec (clear it on the end a
    /// child inherits, see [`Channel::inheritable_raw_fd`]).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair succeeded: two new descriptors nobody owns.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Takes over the descriptor a parent passed (its number in the
    /// environment). Fails unless it is a `SOCK_SEQPACKET` socket.
    pub fn from_inherited(raw: RawFd) -> io::Result<Channel> {
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `ty`.
        let ret = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if ret < 0 || ty != libc::SOCK_SEQPACKET {
            return Err(io::Error::other(format!(
                "descriptor {raw} is not the upgrade channel"
            )));
        }
        // SAFETY: the parent handed this descriptor to us alone; it stays
        // open for the process's lifetime and is closed by OwnedFd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Channel { fd })
    }

    /// The raw descriptor, made inheritable across exec.
    pub fn inheritable_raw_fd(&self) -> io::Result<RawFd> {
        let raw = self.fd.as_raw_fd();
        // SAFETY: plain fcntl on a descriptor we own.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(raw)
    }

    /// Sends one message with `fds` (at most [`MAX_FDS`]).
    pub fn send(&self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS || payload.len() > MAX_PAYLOAD || payload.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message too large for the upgrade channel",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let fd_bytes = std::mem::size_of_val(raw.as_slice());
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        let mut control = vec![0u8; if raw.is_empty() { 0 } else { space }];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: msghdr is plain data; every pointer set below outlives
        // the sendmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer has CMSG_SPACE(fd_bytes) bytes, so
            // the first header and its data fit.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    fd_bytes,
                );
            }
        }
        // SAFETY: msg is fully initialised.
        let ret = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one message; `None` when the peer has closed its end.
    /// `timeout` bounds the wait (an `io::ErrorKind::WouldBlock` /
    /// `TimedOut` error when it passes).
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros().max(1) as libc::suseconds_t,
        };
        // SAFETY: setsockopt reads `tv`.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let mut payload = vec![0u8; MAX_PAYLOAD];
        // SAFETY: as in send.
        let space =
            unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: as in send.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: every buffer msg points at lives until after the call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the other process did not answer in time",
                ));
            }
            return Err(e);
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control buffer the kernel filled, with the
        // libc macros that bound every header by msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::other("truncated message on the upgrade channel"));
        }
        if n == 0 {
            return Ok(None);
        }
        payload.truncate(n as usize);
        Ok(Some((payload, fds)))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn messages_carry_descriptors_and_keep_their_boundaries() {
        let (a, b) = Channel::pair().unwrap();
        let mut file = tempfile_with(b"handed over");
        let fd = OwnedFd::from(file.try_clone().unwrap());
        a.send(b"first", &[fd.as_fd()]).unwrap();
        a.send(b"second", &[]).unwrap();
        let (payload, fds) = b.recv(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(payload, b"first");
        assert_eq!(fds.len(), 1);
        let mut received = std::fs::File::from(fds.into_iter().next().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "handed over");
        let (payload, fds) = b.recv(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!((payload.as_slice(), fds.len()), (&b"second"[..], 0));
        file.write_all(b"!").unwrap();
        drop(a);
        assert!(b.recv(Duration::from_secs(1)).unwrap().is_none(), "EOF");
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_a, b) = Channel::pair().unwrap();
        let e = b.recv(Duration::from_millis(50)).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn limits_are_enforced_before_sending() {
        let (a, _b) = Channel::pair().unwrap();
        assert!(a.send(&vec![0; MAX_PAYLOAD + 1], &[]).is_err());
        assert!(a.send(b"", &[]).is_err());
        // A descriptor that is not a seqpacket socket is refused (and not
        // taken over).
        let f = tempfile_with(b"x");
        assert!(Channel::from_inherited(f.as_raw_fd()).is_err());
        drop(f);
    }

    fn tempfile_with(bytes: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("spooky-fdpass-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f.write_all(bytes).unwrap();
        f
    }
}
