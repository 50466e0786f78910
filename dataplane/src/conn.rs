//! Frame I/O on a byte stream, and the error type of a session.

use std::io::{self, Read, Write};

use zerocopy::{FromBytes, IntoBytes};

use crate::wire::{FrameError, HEADER_LEN, Header, Kind};

/// Why a session failed. The sentence says what failed and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{op}: {source}")]
    Io { op: String, source: io::Error },
    #[error("peer closed the connection during {op}: it exited or was killed mid-transfer")]
    PeerClosed { op: String },
    #[error("bad frame from the peer: {0}")]
    Frame(#[from] FrameError),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("the peer reported an error: {0}")]
    Peer(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("digest mismatch: the destination does not hold the bytes the source sent (source {source_digest}, destination {dest_digest})")]
    DigestMismatch { source_digest: String, dest_digest: String },
    #[error("cannot use {path}: {source}")]
    Region { path: String, source: io::Error },
}

impl SessionError {
    pub fn io(op: impl Into<String>, source: io::Error) -> SessionError {
        let op = op.into();
        match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => SessionError::PeerClosed { op },
            _ => SessionError::Io { op, source },
        }
    }
}

/// Writes one frame (header sealed with its CRC, then the payload) with one `writev`.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), SessionError> {
    let h = Header::new(kind, payload.len() as u32).seal(payload);
    write_all_vectored(w, &[h.as_bytes(), payload]).map_err(|e| SessionError::io(format!("sending {kind:?}"), e))
}

/// Writes every byte of `bufs`, in order, with as few syscalls as the socket allows.
pub fn write_all_vectored(w: &mut impl Write, bufs: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Reads one frame header and checks it (magic, kind, size).
pub fn read_header(r: &mut impl Read, op: &str) -> Result<(Header, Kind), SessionError> {
    let mut buf = [0u8; HEADER_LEN];
    r.read_exact(&mut buf).map_err(|e| SessionError::io(op, e))?;
    let h = Header::read_from_bytes(&buf).expect("HEADER_LEN bytes make a header");
    let kind = h.check()?;
    Ok((h, kind))
}

/// Reads the payload announced by `h` into `buf` (resized) and verifies the CRC.
pub fn read_payload(r: &mut impl Read, h: &Header, buf: &mut Vec<u8>, op: &str) -> Result<(), SessionError> {
    buf.resize(h.length.get() as usize, 0);
    r.read_exact(buf).map_err(|e| SessionError::io(op, e))?;
    h.verify(buf)?;
    Ok(())
}

/// Reads a whole frame of the expected kind; an ERROR frame becomes [`SessionError::Peer`].
pub fn expect_frame(r: &mut impl Read, want: Kind, buf: &mut Vec<u8>) -> Result<Header, SessionError> {
    let op = format!("waiting for {want:?}");
    let (h, kind) = read_header(r, &op)?;
    read_payload(r, &h, buf, &op)?;
    if kind == Kind::Error && want != Kind::Error {
        return Err(SessionError::Peer(String::from_utf8_lossy(buf).into_owned()));
    }
    if kind != want {
        return Err(FrameError::Unexpected { expected: want, got: kind }.into());
    }
    Ok(h)
}

/// Tells the peer why the session ends (best effort: the connection may be gone).
pub fn send_error(w: &mut impl Write, msg: &str) {
    let _ = write_frame(w, Kind::Error, msg.as_bytes());
}
