//! The control socket, `STATE_DIR/control.sock`: how `spooky upgrade`
//! asks the running process for an upgrade and learns the outcome. One
//! JSON line each way; the socket is handed to the successor with the
//! listeners, so the path always reaches the newest process.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The socket's path in the state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// A request for an upgrade.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The binary to start; default: the one this process was started
    /// from.
    pub binary: Option<PathBuf>,
    /// How long the new process may take to become ready.
    pub timeout_ms: u64,
}

/// The outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpgradeReply {
    pub ok: bool,
    pub message: String,
}

/// Binds the control socket, replacing a stale file (one no process
/// listens on). Refuses when a live process answers on it.
pub fn bind(state_dir: &Path) -> std::io::Result<UnixListener> {
    let p = path(state_dir);
    if p.exists() {
        if UnixStream::connect(&p).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} answers: another spooky runs with this state directory",
                    p.display()
                ),
            ));
        }
        let _ = std::fs::remove_file(&p);
    }
    let l = UnixListener::bind(&p)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Reads one request from an accepted connection.
pub fn read_request(stream: &UnixStream) -> std::io::Result<UpgradeRequest> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, 4096)).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes the reply.
pub fn write_reply(mut stream: &UnixStream, reply: &UpgradeReply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// `spooky upgrade`: sends the request and waits for the outcome.
pub fn request(state_dir: &Path, req: &UpgradeRequest) -> std::io::Result<UpgradeReply> {
    let p = path(state_dir);
    let mut stream = UnixStream::connect(&p).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach {}: is spooky running with this config? ({e})",
                p.display()
            ),
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    // The upgrade itself takes up to the timeout, then the hand-over.
    stream.set_read_timeout(Some(
        Duration::from_millis(req.timeout_ms) + Duration::from_secs(30),
    ))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::other(
            "the running spooky closed the control socket without an answer",
        ));
    }
    serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_round_trip() {
        let dir = std::env::temp_dir().join(format!("spooky-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = bind(&dir).unwrap();
        assert!(bind(&dir).is_err(), "a live socket is not replaced");
        let server = std::thread::spawn(move || {
            listener.set_nonblocking(false).unwrap();
            // The probe of the second bind arrives first and says nothing.
            let (s, req) = loop {
                let (s, _) = listener.accept().unwrap();
                if let Ok(req) = read_request(&s) {
                    break (s, req);
                }
            };
            write_reply(
                &s,
                &UpgradeReply {
                    ok: false,
                    message: format!("got {:?}", req.binary),
                },
            )
            .unwrap();
        });
        let reply = request(
            &dir,
            &UpgradeRequest {
                binary: Some("/bin/false".into()),
                timeout_ms: 100,
            },
        )
        .unwrap();
        server.join().unwrap();
        assert!(!reply.ok);
        assert_eq!(reply.message, "got Some(\"/bin/false\")");
        // Nobody listens any more: the stale file is replaced.
        assert!(bind(&dir).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_process_is_a_clear_error() {
        let dir = std::env::temp_dir().join("spooky-control-nobody");
        let e = request(
            &dir,
            &UpgradeRequest {
                binary: None,
                timeout_ms: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("is spooky running"), "{e}");
    }
}
