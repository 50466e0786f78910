//! ferryd to ferryd: one ferryd asks another to open the destination side of a
//! stream-mode migration, so that one command on the source host sets up both ends.
//!
//! ```text
//!  source ferryd ─────────── TCP, the destination's peer port ───────────► destination ferryd
//!    HELLO (feature PEER) / CHALLENGE / RESPONSE / ACCEPT          the pre-shared key, as every session
//!    STREAM_OPEN {"id":"vm1-3f2a","forward":"unix:/run/ferry/streams/vm1-3f2a.sock"}
//!                                  ◄── STREAM_OPENED {"port":49152}  or ERROR with the reason
//!    ... each of the VMM's connections is a channel to that port (crate::stream) ...
//!                                  ◄── RESULT {the destination's ProxyReport}  or ERROR
//! ```
//!
//! The peer connection lives as long as the stream. A source that closes it before the
//! first channel has come (its VMM never connected, its client went away) closes the
//! destination's side too; a destination that sees no channel within its idle time closes
//! its side and says so.
//!
//! A peer holds the key, but what it may make this host do is still bounded: channels are
//! forwarded only to a UNIX socket in one of the `[daemon] stream_dirs` (where the
//! destination VMM listens) or to a loopback TCP port, never to any socket on the host.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{Auth, client_handshake};
use crate::conn::{Ctl, Refusal, SessionError, Violation};
use crate::stream::{Endpoint, ProxyReport};
use crate::wire::{CONTROL_LANE, Kind, features};

/// The peer port ferry's packaged config and DaemonSet use (`[daemon] peer`).
pub const DEFAULT_PORT: u16 = 7470;

/// The most bytes a STREAM_OPEN may carry (a path and an id are far less).
pub const MAX_OPEN_BYTES: u32 = 4096;

/// How long a peer may take to send its STREAM_OPEN, and the source to hear STREAM_OPENED.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the source waits for the destination's RESULT once its own side has ended.
pub const RESULT_TIMEOUT: Duration = Duration::from_secs(30);

/// STREAM_OPEN's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Open {
    /// The migration's name, for logs.
    pub id: String,
    /// The destination VMM's incoming socket (`unix:PATH` or `tcp:HOST:PORT`).
    pub forward: String,
}

/// STREAM_OPENED's payload: the port the channels go to, on the address the peer
/// connection reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opened {
    pub port: u16,
}

/// Why a destination refuses to forward a peer's channels somewhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardRefused {
    #[error("{0}: a UNIX socket path must be absolute, without `..`")]
    NotPlain(PathBuf),
    #[error("{path}: not in a stream directory of this ferryd ({dirs}); `[daemon] stream_dirs` lists them")]
    OutsideStreamDirs { path: PathBuf, dirs: String },
    #[error("{0}: channels are forwarded to loopback TCP ports only (the VMM runs on this host)")]
    NotLoopback(String),
    #[error("{0}: cannot resolve it ({1})")]
    Unresolved(String, String),
}

/// Checks that a peer may have channels forwarded to `e`: a UNIX socket whose directory
/// is one of `dirs` or below one (symbolic links resolved, so a link in a stream
/// directory cannot point out of it), or a TCP port on a loopback address.
pub fn check_forward(e: &Endpoint, dirs: &[PathBuf]) -> Result<(), ForwardRefused> {
    match e {
        Endpoint::Unix(p) => {
            if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
                return Err(ForwardRefused::NotPlain(p.clone()));
            }
            let outside = || ForwardRefused::OutsideStreamDirs {
                path: p.clone(),
                dirs: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
            };
            // The socket itself may not exist yet (the VMM listens later); its directory
            // must, and is compared with its links resolved.
            let parent = p.parent().and_then(|d| d.canonicalize().ok()).ok_or_else(outside)?;
            if dirs.iter().filter_map(|d| d.canonicalize().ok()).any(|d| parent.starts_with(&d)) { Ok(()) } else { Err(outside()) }
        }
        Endpoint::Tcp(a) => {
            let addrs: Vec<SocketAddr> =
                a.to_socket_addrs().map_err(|err| ForwardRefused::Unresolved(a.clone(), err.to_string()))?.collect();
            if !addrs.is_empty() && addrs.iter().all(|s| s.ip().is_loopback()) {
                Ok(())
            } else {
                Err(ForwardRefused::NotLoopback(a.clone()))
            }
        }
    }
}

/// A migration's name: 1 to 64 of letters, digits, `.`, `_` and `-`, not starting with
/// a dot (it names a socket file).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && !id.starts_with('.') && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A new migration name: `prefix-` and 8 random hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut r = [0u8; 4];
    // Without randomness the time's low bits still tell two migrations apart.
    if getrandom::fill(&mut r).is_err() {
        r = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())).to_le_bytes();
    }
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = prefix.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')).take(40).collect();
    if prefix.is_empty() { format!("stream-{hex}") } else { format!("{prefix}-{hex}") }
}

/// The source's end of a peer connection: the destination has opened its side.
#[derive(Debug)]
pub struct Link {
    ctl: Ctl,
    /// Where the channels go.
    pub channels: SocketAddr,
}

/// Asks the ferryd whose peer port is `to` to open the destination side of `open`.
pub fn open(to: &str, auth: &Auth, open: &Open) -> Result<Link, SessionError> {
    let addrs: Vec<SocketAddr> = to.to_socket_addrs().map_err(|e| SessionError::io(format!("resolving {to}"), e))?.collect();
    let s = TcpStream::connect_timeout(addrs.first().ok_or_else(|| Refusal::NoAddress(to.to_string()))?, OPEN_TIMEOUT)
        .map_err(|e| SessionError::io(format!("connecting to the destination ferryd's peer port {to}"), e))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(OPEN_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    let mut hs = s.try_clone().map_err(|e| SessionError::io("cloning the peer connection", e))?;
    let (f, keys) = client_handshake(&mut hs, auth, CONTROL_LANE, 0, features::PEER)?;
    if f & features::PEER == 0 {
        return Err(Refusal::NotService { addr: to.to_string(), wanted: "a ferryd peer port (`[daemon] peer` there)" }.into());
    }
    let peer = s.peer_addr().map_err(|e| SessionError::io("reading the peer's address", e))?;
    let mut ctl = Ctl::new(s, keys);
    let body = serde_json::to_vec(open).expect("an Open serializes");
    ctl.send(Kind::StreamOpen, &body)?;
    let mut buf = Vec::new();
    ctl.expect(Kind::StreamOpened, &mut buf)?;
    let opened: Opened = serde_json::from_slice(&buf).map_err(|source| Violation::Json { frame: Kind::StreamOpened, source })?;
    // The stream may pause for long (the VMM sets the pace): no read timeout until RESULT.
    ctl.s.set_read_timeout(None).map_err(|e| SessionError::io("clearing the read timeout", e))?;
    Ok(Link { ctl, channels: SocketAddr::new(peer.ip(), opened.port) })
}

impl Link {
    /// The destination's report once its side has ended, or its reason for failing.
    pub fn result(mut self) -> Result<ProxyReport, SessionError> {
        self.ctl.s.set_read_timeout(Some(RESULT_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
        let mut buf = Vec::new();
        self.ctl.expect(Kind::Result, &mut buf)?;
        serde_json::from_slice(&buf).map_err(|source| Violation::Json { frame: Kind::Result, source }.into())
    }
}

/// The destination's end of a peer connection, after the handshake.
#[derive(Debug)]
pub struct Asked {
    pub ctl: Ctl,
}

impl Asked {
    /// Reads the STREAM_OPEN (at most [`MAX_OPEN_BYTES`], within [`OPEN_TIMEOUT`]).
    pub fn open(&mut self) -> Result<Open, SessionError> {
        self.ctl.s.set_read_timeout(Some(OPEN_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
        let mut buf = Vec::new();
        self.ctl.expect_at_most(Kind::StreamOpen, &mut buf, MAX_OPEN_BYTES)?;
        let open: Open = serde_json::from_slice(&buf).map_err(|source| Violation::Json { frame: Kind::StreamOpen, source })?;
        if !valid_id(&open.id) {
            return Err(Violation::Name(open.id).into());
        }
        self.ctl.s.set_read_timeout(None).map_err(|e| SessionError::io("clearing the read timeout", e))?;
        Ok(open)
    }

    pub fn opened(&mut self, port: u16) -> Result<(), SessionError> {
        self.ctl.send(Kind::StreamOpened, &serde_json::to_vec(&Opened { port }).expect("Opened serializes"))
    }

    /// Tells the source how the destination's side ended (best effort: it may be gone).
    pub fn finish(mut self, r: Result<&ProxyReport, &crate::metrics::Failed>) {
        match r {
            Ok(rep) => {
                let _ = self.ctl.send(Kind::Result, &serde_json::to_vec(rep).expect("a report serializes"));
            }
            Err(e) => self.ctl.close_with_error(&e.message),
        }
    }

    /// Refuses the request, with the reason for the source to report.
    pub fn refuse(self, why: &str) {
        self.ctl.close_with_error(why);
    }
}

/// The path a stream opened here listens on by default: `DIR/ID.sock`.
pub fn default_socket(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_stay_in_stream_dirs_and_on_loopback() {
        let root = tempfile::tempdir().unwrap();
        let dirs = [root.path().join("streams")];
        std::fs::create_dir_all(&dirs[0]).unwrap();
        std::fs::create_dir_all(root.path().join("elsewhere")).unwrap();
        let unix = |p: PathBuf| Endpoint::Unix(p);
        assert_eq!(check_forward(&unix(dirs[0].join("vm1.sock")), &dirs), Ok(()));
        // A link inside the stream directory that leads out of it is followed, and refused.
        std::os::unix::fs::symlink(root.path().join("elsewhere"), dirs[0].join("out")).unwrap();
        assert!(matches!(check_forward(&unix(dirs[0].join("out/x.sock")), &dirs), Err(ForwardRefused::OutsideStreamDirs { .. })));
        assert!(matches!(check_forward(&unix(dirs[0].join("../elsewhere/x.sock")), &dirs), Err(ForwardRefused::NotPlain(_))));
        assert!(matches!(check_forward(&unix("run/x.sock".into()), &dirs), Err(ForwardRefused::NotPlain(_))));
        assert!(matches!(check_forward(&unix("/var/run/docker.sock".into()), &dirs), Err(ForwardRefused::OutsideStreamDirs { .. })));
        assert_eq!(check_forward(&Endpoint::Tcp("127.0.0.2:4444".into()), &dirs), Ok(()));
        assert_eq!(check_forward(&Endpoint::Tcp("[::1]:4444".into()), &dirs), Ok(()));
        assert!(matches!(check_forward(&Endpoint::Tcp("10.1.2.3:22".into()), &dirs), Err(ForwardRefused::NotLoopback(_))));
    }

    #[test]
    fn migration_names() {
        assert!(valid_id("vm1-3f2a9c01"));
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        let id = new_id("vm/1 guest");
        assert!(valid_id(&id) && id.starts_with("vm1guest-") && id.len() == "vm1guest-".len() + 8, "{id}");
        assert!(valid_id(&new_id("")));
    }
}
