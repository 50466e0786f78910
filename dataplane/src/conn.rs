//! Frame I/O on a byte stream, and the error type of a session.
//!
//! Before the handshake completes, frames are plain and small ([`PREAUTH_MAX_PAYLOAD`]);
//! after it, every frame carries a tag ([`crate::session::seal`]) and is read and written
//! through the connection's keys.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use zerocopy::{FromBytes, IntoBytes};

pub use crate::session::errors::{AuthError, Bug, Cancel, Counted, Refusal, Violation};
use crate::session::seal::{Keys, Seal, TAG_LEN};
use crate::wire::{FrameError, HEADER_LEN, Header, Kind};

/// The largest payload a frame may carry before the peer has authenticated: the
/// handshake's frames are under 100 bytes, an ERROR's reason a few hundred.
pub const PREAUTH_MAX_PAYLOAD: u32 = 1024;

/// Why a session failed. The sentence says what failed and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{op}: {source}")]
    Io { op: String, source: io::Error },
    #[error("{op}: timed out after {secs} s without a word from the peer")]
    TimedOut { op: String, secs: u64 },
    #[error("peer closed the connection during {op}: it exited or was killed mid-transfer")]
    PeerClosed { op: String },
    #[error("bad frame from the peer: {0}")]
    Frame(#[from] FrameError),
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    #[error("the peer reported an error: {0}")]
    Peer(String),
    /// The local side called the session off: a VMM that went away, a VMM that did not
    /// take its memory.
    #[error("the migration was cancelled: {0}")]
    Cancelled(#[from] Cancel),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] Violation),
    /// This side will not run the session as asked (its plan, options or memory).
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// A bug in ferry.
    #[error("internal error (a bug in ferry): {0}")]
    Bug(#[from] Bug),
    /// A data frame the destination would not or could not write (overlapping pages
    /// already written, past the end, or a failed write).
    #[error("data frame refused: {0}")]
    Dest(#[from] crate::engine::dest::DestError),
    /// A stream-mode migration failed: each failure, with its channel (none: the set-up).
    #[error("the migration stream broke: {}", .0.iter().map(|(n, e)| match n { Some(n) => format!("channel {n}: {e}"), None => e.to_string() }).collect::<Vec<_>>().join("; "))]
    StreamBroke(Vec<(Option<u16>, SessionError)>),
    /// The kernel gave no randomness (for a nonce, a session id, a file name).
    #[error("no randomness for {what}: {source}")]
    Random { what: &'static str, source: getrandom::Error },
    /// The destination VMM's userfaultfd failed while post-copy placed or woke a page.
    #[error("{0}")]
    Userfault(#[from] hw::uffd::UffdError),
    /// The destination VMM did something post-copy cannot work with.
    #[error("the destination VMM: {0}")]
    Vmm(#[from] crate::migrate::VmmError),
    #[error("digest mismatch: the destination does not hold the bytes the source sent (source {source_digest}, destination {dest_digest})")]
    DigestMismatch { source_digest: String, dest_digest: String },
    #[error("cannot use {path}: {source}")]
    Region { path: String, source: io::Error },
    #[error("{0}")]
    Arena(#[from] hw::memmap::ArenaError),
    #[error("RDMA: {0}")]
    Verbs(#[from] hw::rdma::RdmaError),
    /// A work completion with an error status.
    #[error("RDMA: {what} on {device} {failure}")]
    Completion { what: &'static str, device: String, failure: hw::rdma::verbs::WcFailure },
    /// The plan names an RDMA port or GID this host does not have (any more).
    #[error("RDMA: {0}: the plan is stale, run `ferryctl tune` again")]
    StalePlan(String),
    /// A thread stopped because another part of the session failed first (that failure
    /// is the one to report).
    #[error("stopped: the session failed elsewhere")]
    Stopped,
    /// The session asked for more than this host's limits allow.
    #[error(transparent)]
    Limit(#[from] crate::session::limits::LimitError),
}

impl SessionError {
    /// Fills `buf` with randomness for `what`.
    pub fn random(what: &'static str, buf: &mut [u8]) -> Result<(), SessionError> {
        getrandom::fill(buf).map_err(|source| SessionError::Random { what, source })
    }

    /// An I/O error during `op`: a closed connection, a timeout (with the socket's read
    /// timeout `timeout`, when it has one) or another failure, each said as such.
    pub fn io(op: impl Into<String>, source: io::Error) -> SessionError {
        SessionError::io_within(op, source, None)
    }

    pub fn io_within(op: impl Into<String>, source: io::Error, timeout: Option<std::time::Duration>) -> SessionError {
        let op = op.into();
        match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => SessionError::PeerClosed { op },
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                SessionError::TimedOut { op, secs: timeout.unwrap_or(crate::engine::IDLE_TIMEOUT).as_secs() }
            }
            _ => SessionError::Io { op, source },
        }
    }
}

/// Writes one sealed frame (header with its CRC, the payload, the tag) with one `writev`.
pub fn write_frame(w: &mut impl Write, tx: &mut Seal, kind: Kind, payload: &[u8]) -> Result<(), SessionError> {
    let h = Header::new(kind, payload.len() as u32).seal(payload);
    write_sealed(w, tx, &h, payload).map_err(|e| SessionError::io(format!("sending {kind:?}"), e))
}

/// Writes a frame whose header is built and sealed already (an encoder's DATA frame), its
/// payload and its tag, with one `writev`.
pub fn write_sealed(w: &mut impl Write, tx: &mut Seal, h: &Header, payload: &[u8]) -> io::Result<()> {
    let tag = tx.tag(h, [payload]);
    write_all_vectored(w, &[h.as_bytes(), payload, &tag])
}

/// Writes one frame of the handshake (no tag: no keys exist yet).
pub fn write_plain_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), SessionError> {
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

/// Reads one frame header and checks it (magic, kind, size against `max_payload`).
fn read_header(r: &mut impl Read, op: &str, max_payload: u32) -> Result<(Header, Kind), SessionError> {
    let mut buf = [0u8; HEADER_LEN];
    r.read_exact(&mut buf).map_err(|e| SessionError::io(op, e))?;
    let h = Header::read_from_bytes(&buf).expect("HEADER_LEN bytes make a header");
    let kind = h.check()?;
    if h.length.get() > max_payload {
        return Err(FrameError::Oversized { len: h.length.get(), max: max_payload }.into());
    }
    Ok((h, kind))
}

/// Reads a whole frame of the expected kind into `buf`, checking its CRC and, with `rx`,
/// its tag; an ERROR frame becomes [`SessionError::Peer`].
fn expect(r: &mut impl Read, rx: Option<&mut Seal>, want: Kind, buf: &mut Vec<u8>, max: u32) -> Result<Header, SessionError> {
    expect_any(r, rx, &[want], buf, max)
}

/// [`expect`] of any of the kinds in `want` (the first is the one named in errors).
fn expect_any(r: &mut impl Read, rx: Option<&mut Seal>, want: &[Kind], buf: &mut Vec<u8>, max: u32) -> Result<Header, SessionError> {
    let op = format!("waiting for {:?}", want[0]);
    let (h, kind) = read_header(r, &op, max)?;
    buf.resize(h.length.get() as usize, 0);
    r.read_exact(buf).map_err(|e| SessionError::io(&op, e))?;
    h.verify(buf)?;
    if let Some(rx) = rx {
        let mut tag = [0u8; TAG_LEN];
        r.read_exact(&mut tag).map_err(|e| SessionError::io(&op, e))?;
        rx.verify(&h, [&buf[..]], &tag)?;
    }
    if kind == Kind::Error && !want.contains(&Kind::Error) {
        return Err(SessionError::Peer(String::from_utf8_lossy(buf).into_owned()));
    }
    if !want.contains(&kind) {
        return Err(FrameError::Unexpected { expected: want[0], got: kind }.into());
    }
    Ok(h)
}

/// Reads a whole sealed frame of the expected kind (payloads up to the wire maximum).
pub fn expect_frame(r: &mut impl Read, rx: &mut Seal, want: Kind, buf: &mut Vec<u8>) -> Result<Header, SessionError> {
    expect(r, Some(rx), want, buf, crate::wire::MAX_PAYLOAD)
}

/// Reads a handshake frame: no tag, and at most [`PREAUTH_MAX_PAYLOAD`] bytes of payload,
/// checked before anything is allocated for it.
pub fn expect_plain_frame(r: &mut impl Read, want: Kind, buf: &mut Vec<u8>) -> Result<Header, SessionError> {
    expect(r, None, want, buf, PREAUTH_MAX_PAYLOAD)
}

/// Tells the peer why the session ends (best effort: the connection may be gone).
pub fn send_error(w: &mut impl Write, tx: &mut Seal, msg: &str) {
    let _ = write_frame(w, tx, Kind::Error, msg.as_bytes());
}

/// [`send_error`] during the handshake.
pub fn send_plain_error(w: &mut impl Write, msg: &str) {
    let _ = write_plain_frame(w, Kind::Error, msg.as_bytes());
}

/// A session's control connection after the handshake: its stream and its keys.
#[derive(Debug)]
pub struct Ctl {
    pub s: TcpStream,
    keys: Keys,
}

impl Ctl {
    pub fn new(s: TcpStream, keys: Keys) -> Ctl {
        Ctl { s, keys }
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), SessionError> {
        write_frame(&mut self.s, &mut self.keys.tx, kind, payload)
    }

    /// The session's key for digests of memory that arrived without frames.
    pub fn digest_key(&self) -> &crate::digest::DigestKey {
        &self.keys.digest
    }

    /// The next frame, which must be `want` (an ERROR is the peer's reason).
    pub fn expect(&mut self, want: Kind, buf: &mut Vec<u8>) -> Result<Header, SessionError> {
        let timeout = self.s.read_timeout().ok().flatten();
        expect_frame(&mut self.s, &mut self.keys.rx, want, buf).map_err(|e| match e {
            SessionError::TimedOut { op, .. } => SessionError::TimedOut { op, secs: timeout.map_or(0, |t| t.as_secs()) },
            e => e,
        })
    }

    /// [`Ctl::expect`] of a frame of at most `max` payload bytes (checked before anything
    /// is allocated for it): a peer's request that is small by nature.
    pub fn expect_at_most(&mut self, want: Kind, buf: &mut Vec<u8>, max: u32) -> Result<Header, SessionError> {
        expect(&mut self.s, Some(&mut self.keys.rx), want, buf, max)
    }

    /// The next frame, which must be one of `want`; its kind is the header's.
    pub fn expect_any(&mut self, want: &[Kind], buf: &mut Vec<u8>) -> Result<Header, SessionError> {
        expect_any(&mut self.s, Some(&mut self.keys.rx), want, buf, crate::wire::MAX_PAYLOAD)
    }

    /// Tells the peer why the session ends (best effort).
    pub fn error(&mut self, msg: &str) {
        send_error(&mut self.s, &mut self.keys.tx, msg);
    }

    /// Ends the session with `msg` so that the peer reads it: the ERROR frame, then this
    /// side's end of the stream, then whatever the peer still sends is read and dropped
    /// (for up to 2 s) until it closes too. Closing with unread bytes would reset the
    /// connection, and a reset can destroy the ERROR before the peer reads it.
    pub fn close_with_error(mut self, msg: &str) {
        self.error(msg);
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut sink = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || self.s.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match self.s.read(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// The peer's own reason for a failure seen on a data connection: a receiver that
    /// ran out of space or memory says why on the control connection before its lanes
    /// close, and that reason beats "the peer closed the connection". Waits at most 2 s
    /// for it; `e` itself when none comes.
    pub fn reason_for(&mut self, e: SessionError) -> SessionError {
        let broken = match &e {
            SessionError::PeerClosed { .. } => true,
            SessionError::Io { source, .. } => {
                matches!(source.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted)
            }
            _ => false,
        };
        if !broken {
            return e;
        }
        let before = self.s.read_timeout().ok().flatten();
        if self.s.set_read_timeout(Some(std::time::Duration::from_secs(2))).is_err() {
            return e;
        }
        let mut buf = Vec::new();
        let r = match self.expect(Kind::Error, &mut buf) {
            Ok(_) => SessionError::Peer(String::from_utf8_lossy(&buf).into_owned()),
            Err(peer @ SessionError::Peer(_)) => peer,
            Err(_) => e,
        };
        let _ = self.s.set_read_timeout(before);
        r
    }
}

/// A frame as read: its header, kind and verified payload.
pub type Frame<'a> = (Header, Kind, &'a [u8]);

/// Reads frames from a stream through one large buffer: a `read` syscall fetches as many
/// frames as the socket holds, and each payload is handed out in place (no copy) until
/// the next call. Every frame's CRC and tag are checked before it is handed out.
#[derive(Debug)]
pub struct FrameReader<B = Vec<u8>> {
    buf: B,
    start: usize,
    end: usize,
    max_payload: u32,
    rx: Seal,
}

impl FrameReader<Vec<u8>> {
    /// A reader with at least `capacity` bytes of heap buffer.
    pub fn new(capacity: usize, max_payload: u32, rx: Seal) -> FrameReader<Vec<u8>> {
        FrameReader::with_buffer(vec![0; capacity.max(HEADER_LEN + max_payload as usize + TAG_LEN)], max_payload, rx)
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> FrameReader<B> {
    /// A reader over `buf` (an arena, say) that refuses payloads above `max_payload`
    /// before reading them; `buf` must hold a header, the largest payload and a tag.
    pub fn with_buffer(buf: B, max_payload: u32, rx: Seal) -> FrameReader<B> {
        assert!(buf.as_ref().len() >= HEADER_LEN + max_payload as usize + TAG_LEN, "frame buffer smaller than one frame");
        FrameReader { buf, start: 0, end: 0, max_payload, rx }
    }

    /// Makes `need` bytes from `start` available, reading more as needed. `false` when
    /// `nonblocking` and the reader has no more now (what it read is kept).
    fn fill(&mut self, r: &mut impl Read, need: usize, op: &str, nonblocking: bool) -> Result<bool, SessionError> {
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
                Err(e) if nonblocking && e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(SessionError::io(op, e)),
            }
        }
        Ok(true)
    }

    /// The next frame: its header, kind and verified payload.
    pub fn next(&mut self, r: &mut impl Read, op: &str) -> Result<(Header, Kind, &[u8]), SessionError> {
        Ok(self.read_frame(r, op, false)?.expect("a blocking read waits for the whole frame"))
    }

    /// The next frame if the whole of it is there now: `r` is a nonblocking reader, and a
    /// frame that has not all arrived is kept for the next call.
    pub fn try_next(&mut self, r: &mut impl Read, op: &str) -> Result<Option<Frame<'_>>, SessionError> {
        self.read_frame(r, op, true)
    }

    fn read_frame(&mut self, r: &mut impl Read, op: &str, nonblocking: bool) -> Result<Option<Frame<'_>>, SessionError> {
        if !self.fill(r, HEADER_LEN, op, nonblocking)? {
            return Ok(None);
        }
        let h = Header::read_from_bytes(&self.buf.as_ref()[self.start..self.start + HEADER_LEN]).expect("HEADER_LEN bytes make a header");
        let kind = h.check()?;
        if h.length.get() > self.max_payload {
            return Err(FrameError::Oversized { len: h.length.get(), max: self.max_payload }.into());
        }
        let len = h.length.get() as usize;
        let need = HEADER_LEN + len + TAG_LEN;
        if !self.fill(r, need, op, nonblocking)? {
            return Ok(None);
        }
        let at = self.start;
        self.start += need;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let frame = &self.buf.as_ref()[at..at + need];
        let (payload, tag) = frame[HEADER_LEN..].split_at(len);
        h.verify(payload)?;
        self.rx.verify(&h, [payload], tag)?;
        Ok(Some((h, kind, payload)))
    }

    /// The buffer, for another reader.
    pub fn into_buffer(self) -> B {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::seal::Side;

    fn keys() -> (Keys, Keys) {
        (Keys::derive(None, Side::Client, &[3; 32], &[4; 32]), Keys::derive(None, Side::Server, &[3; 32], &[4; 32]))
    }

    #[test]
    fn frame_reader_splits_and_joins_reads() {
        let (mut c, s) = keys();
        let mut wire = Vec::new();
        for i in 0..50u32 {
            let payload = vec![i as u8; (i * 97) as usize % 3000];
            write_frame(&mut wire, &mut c.tx, Kind::Error, &payload).unwrap();
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
        let mut fr = FrameReader::new(100, 3000, s.rx.clone());
        for i in 0..50u32 {
            let (_, kind, p) = fr.next(&mut src, "test").unwrap();
            assert_eq!(kind, Kind::Error);
            assert_eq!(p.len(), (i * 97) as usize % 3000);
            assert!(p.iter().all(|&b| b == i as u8));
        }
        assert!(matches!(fr.next(&mut src, "test"), Err(SessionError::PeerClosed { .. })));
        // A truncated stream fails cleanly.
        let mut short = Trickle(&wire[..wire.len() / 2]);
        let mut fr = FrameReader::new(4096, 4096, s.rx.clone());
        let mut n = 0;
        while fr.next(&mut short, "test").is_ok() {
            n += 1;
        }
        assert!(n < 50);
        // A frame whose CRC was recomputed after a change fails its tag; so does a frame
        // left out (the next one's sequence number is wrong).
        let mut tampered = wire.clone();
        tampered[HEADER_LEN + 5] ^= 1;
        let h = Header::read_from_bytes(&tampered[..HEADER_LEN]).unwrap();
        let len = h.length.get() as usize;
        let resealed = h.seal(&tampered[HEADER_LEN..HEADER_LEN + len]);
        tampered[..HEADER_LEN].copy_from_slice(resealed.as_bytes());
        let mut fr = FrameReader::new(4096, 4096, s.rx.clone());
        assert!(matches!(fr.next(&mut &tampered[..], "test"), Err(SessionError::Frame(FrameError::Tag { seq: 0, .. }))));
        let first = HEADER_LEN + len + TAG_LEN;
        let mut fr = FrameReader::new(4096, 4096, s.rx.clone());
        assert!(matches!(fr.next(&mut &wire[first..], "test"), Err(SessionError::Frame(FrameError::Tag { .. }))));
    }

    #[test]
    fn handshake_frames_are_small() {
        let mut wire = Vec::new();
        write_plain_frame(&mut wire, Kind::Hello, &vec![0u8; PREAUTH_MAX_PAYLOAD as usize + 1]).unwrap();
        let mut buf = Vec::new();
        let e = expect_plain_frame(&mut &wire[..], Kind::Hello, &mut buf).unwrap_err();
        assert!(matches!(e, SessionError::Frame(FrameError::Oversized { .. })), "{e}");
        assert!(buf.capacity() < 4096, "nothing was allocated for it");
    }
}
