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
    #[error("{0}")]
    Arena(#[from] hw::memmap::ArenaError),
    #[error("RDMA: {0}")]
    Verbs(#[from] hw::rdma::RdmaError),
    /// A work completion with an error status, or a transfer the RDMA side gave up on.
    #[error("RDMA: {0}")]
    Rdma(String),
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

/// Reads frames from a stream through one large buffer: a `read` syscall fetches as many
/// frames as the socket holds, and each payload is handed out in place (no copy) until
/// the next call.
#[derive(Debug)]
pub struct FrameReader<B = Vec<u8>> {
    buf: B,
    start: usize,
    end: usize,
    max_payload: u32,
}

impl FrameReader<Vec<u8>> {
    /// A reader with at least `capacity` bytes of heap buffer.
    pub fn new(capacity: usize, max_payload: u32) -> FrameReader<Vec<u8>> {
        FrameReader::with_buffer(vec![0; capacity.max(HEADER_LEN + max_payload as usize)], max_payload)
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> FrameReader<B> {
    /// A reader over `buf` (an arena, say) that refuses payloads above `max_payload`
    /// before reading them; `buf` must hold a header and the largest payload.
    pub fn with_buffer(buf: B, max_payload: u32) -> FrameReader<B> {
        assert!(buf.as_ref().len() >= HEADER_LEN + max_payload as usize, "frame buffer smaller than one frame");
        FrameReader { buf, start: 0, end: 0, max_payload }
    }

    /// Makes `need` bytes from `start` available, reading more as needed.
    fn fill(&mut self, r: &mut impl Read, need: usize, op: &str) -> Result<(), SessionError> {
        let buf = self.buf.as_mut();
        if self.start + need > buf.len() {
            buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < need {
            match r.read(&mut buf[self.end..]) {
                Ok(0) => return Err(SessionError::io(op, io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SessionError::io(op, e)),
            }
        }
        Ok(())
    }

    /// The next frame: its header, kind and CRC-verified payload.
    pub fn next(&mut self, r: &mut impl Read, op: &str) -> Result<(Header, Kind, &[u8]), SessionError> {
        self.fill(r, HEADER_LEN, op)?;
        let h = Header::read_from_bytes(&self.buf.as_ref()[self.start..self.start + HEADER_LEN]).expect("HEADER_LEN bytes make a header");
        let kind = h.check()?;
        if h.length.get() > self.max_payload {
            return Err(FrameError::Oversized { len: h.length.get(), max: self.max_payload }.into());
        }
        let need = HEADER_LEN + h.length.get() as usize;
        self.fill(r, need, op)?;
        let payload = &self.buf.as_ref()[self.start + HEADER_LEN..self.start + need];
        self.start += need;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        h.verify(payload)?;
        Ok((h, kind, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_reader_splits_and_joins_reads() {
        let mut wire = Vec::new();
        for i in 0..50u32 {
            let payload = vec![i as u8; (i * 97) as usize % 3000];
            let h = Header::new(Kind::Error, payload.len() as u32).seal(&payload);
            wire.extend_from_slice(h.as_bytes());
            wire.extend_from_slice(&payload);
        }
        // A reader that returns at most 7 bytes per call, and a buffer smaller than a frame.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(7).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut src = Trickle(&wire);
        let mut fr = FrameReader::new(100, 3000);
        for i in 0..50u32 {
            let (_, kind, p) = fr.next(&mut src, "test").unwrap();
            assert_eq!(kind, Kind::Error);
            assert_eq!(p.len(), (i * 97) as usize % 3000);
            assert!(p.iter().all(|&b| b == i as u8));
        }
        assert!(matches!(fr.next(&mut src, "test"), Err(SessionError::PeerClosed { .. })));
        // A truncated stream fails cleanly.
        let mut short = Trickle(&wire[..wire.len() / 2]);
        let mut fr = FrameReader::new(4096, 4096);
        let mut n = 0;
        while fr.next(&mut short, "test").is_ok() {
            n += 1;
        }
        assert!(n < 50);
    }
}
