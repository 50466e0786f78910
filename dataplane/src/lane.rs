//! Reading a data lane's frames, with io_uring or with plain `read` calls.
//!
//! With io_uring ([`hw::uring_recv`]) a multishot receive fills the lane's arena, lent to
//! the kernel as a provided-buffer ring, and frames are parsed where they landed. The
//! kernel fills each buffer front to back, so a frame is in one piece unless it crosses
//! the end of a buffer; then its payload comes as two or more parts, which the receiver
//! writes with one `pwritev`, checksums and hashes part by part. Only a compressed frame
//! split that way is copied whole, to decompress it.
//!
//! The plain reader ([`FrameReader`]) reads as many frames as the socket holds into the
//! arena per `read` call. It serves when the plan turns io_uring off, and where the
//! kernel lacks incremental buffer rings (logged once).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use hw::memmap::Arena;
use hw::uring_recv::{Piece, RecvRing};
use zerocopy::FromBytes;

use crate::conn::{FrameReader, SessionError};
use crate::plan::Plan;
use crate::session::seal::{Seal, TAG_LEN};
use crate::wire::{FrameError, HEADER_LEN, Header, Kind};

/// Buffers the arena is cut into for io_uring: a frame (a quarter of the arena at most)
/// spans at most five, so the frame being parsed and the one before it leave the kernel
/// six or more to fill.
const RING_BUFFERS: u16 = 16;

/// A frame's payload: one slice, or the pieces of receive buffers it arrived in.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    One(&'a [u8]),
    Ring { ring: &'a RecvRing, parts: &'a [Piece], len: usize },
}

/// The parts of a [`Payload`], in order.
#[derive(Debug)]
pub struct Parts<'a> {
    one: Option<&'a [u8]>,
    ring: Option<&'a RecvRing>,
    pieces: std::slice::Iter<'a, Piece>,
}

impl<'a> Iterator for Parts<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if let Some(b) = self.one.take() {
            return Some(b);
        }
        let p = self.pieces.next()?;
        self.ring.map(|r| r.bytes(p))
    }
}

impl<'a> Payload<'a> {
    pub fn len(&self) -> usize {
        match self {
            Payload::One(b) => b.len(),
            Payload::Ring { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn parts(&self) -> Parts<'a> {
        match *self {
            Payload::One(b) => Parts { one: Some(b), ring: None, pieces: [].iter() },
            Payload::Ring { ring, parts, .. } => Parts { one: None, ring: Some(ring), pieces: parts.iter() },
        }
    }

    /// The payload in one slice: itself, or copied into `scratch` when it came in parts.
    pub fn contiguous<'s>(&self, scratch: &'s mut Vec<u8>) -> &'s [u8]
    where
        'a: 's,
    {
        match *self {
            Payload::One(b) => b,
            Payload::Ring { ring, parts: [one], .. } => ring.bytes(one),
            _ => {
                scratch.clear();
                for p in self.parts() {
                    scratch.extend_from_slice(p);
                }
                scratch
            }
        }
    }

    /// Calls `f(i, page)` for each page of the payload in order (the last may be short).
    /// A page split between parts is assembled in `scratch` (one page long).
    pub fn pages(&self, page: usize, scratch: &mut [u8], mut f: impl FnMut(u64, &[u8])) {
        let mut i = 0u64;
        // Bytes of the page being assembled in `scratch`.
        let mut have = 0usize;
        let mut left = self.len();
        for part in self.parts() {
            let mut p: &[u8] = part;
            while !p.is_empty() {
                // This page's length: a whole page, or what is left of the payload.
                let want = page.min(left + have);
                if have == 0 && p.len() >= want {
                    f(i, &p[..want]);
                    p = &p[want..];
                    left -= want;
                    i += 1;
                    continue;
                }
                let n = (want - have).min(p.len());
                scratch[have..have + n].copy_from_slice(&p[..n]);
                have += n;
                left -= n;
                p = &p[n..];
                if have == want {
                    f(i, &scratch[..want]);
                    have = 0;
                    i += 1;
                }
            }
        }
    }
}

/// Writes `parts` to `file` at `offset`, in order, with `pwritev` (eight parts a call).
pub(crate) fn pwrite_parts<'p>(file: &impl AsFd, parts: impl Iterator<Item = &'p [u8]>, mut offset: u64) -> io::Result<()> {
    let mut parts = parts.peekable();
    while parts.peek().is_some() {
        let mut iov = [IoSlice::new(&[]); 8];
        let mut n = 0;
        for (slot, p) in iov.iter_mut().zip(parts.by_ref().take(8)) {
            *slot = IoSlice::new(p);
            n += 1;
        }
        let mut rest = &mut iov[..n];
        while !rest.is_empty() {
            let n = match nix::sys::uio::pwritev(file, rest, offset as i64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            offset += n as u64;
            IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

/// The receive buffer a lane takes for frames of up to `max_payload` bytes: four whole
/// frames (header, payload, tag), in whole 2 MiB pages.
pub fn buffer_bytes(max_payload: u32) -> u64 {
    (4 * (HEADER_LEN + max_payload as usize + TAG_LEN)).div_ceil(2 << 20) as u64 * (2 << 20)
}

/// Frames from io_uring's receive buffers.
struct RingFrames {
    /// The ring owns the lane's arena.
    ring: RecvRing,
    rx: Seal,
    max_payload: u32,
    timeout: Duration,
    /// Delivered pieces not yet parsed past, oldest first; `used` bytes of the first are.
    pieces: VecDeque<Piece>,
    used: u32,
    /// Unparsed bytes in `pieces`.
    avail: usize,
    /// Buffers the last payload pointed into, handed back at the next call.
    release: Vec<u16>,
    /// The last payload's parts.
    parts: Vec<Piece>,
}

impl RingFrames {
    /// Makes `need` unparsed bytes available; `false` when `nonblocking` and the kernel
    /// has no more now.
    fn fill(&mut self, need: usize, op: &str, nonblocking: bool) -> Result<bool, SessionError> {
        while self.avail < need {
            let next = if nonblocking { self.ring.next_now() } else { self.ring.next(self.timeout) };
            match next {
                Ok(Some(p)) => {
                    self.avail += p.len() as usize;
                    self.pieces.push_back(p);
                }
                Ok(None) => return Err(SessionError::io(op, io::ErrorKind::UnexpectedEof.into())),
                Err(e) if nonblocking && e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(SessionError::io(op, e)),
            }
        }
        Ok(true)
    }

    /// `N` unparsed bytes starting `at` bytes in, copied out.
    fn peek<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        let mut have = 0;
        let mut skip = self.used as usize + at;
        for p in &self.pieces {
            let b = self.ring.bytes(p);
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let b = &b[skip..];
            skip = 0;
            let n = b.len().min(N - have);
            out[have..have + n].copy_from_slice(&b[..n]);
            have += n;
            if have == N {
                break;
            }
        }
        out
    }

    /// Parses past `HEADER_LEN + len + TAG_LEN` bytes, keeping the `len` payload bytes as
    /// `self.parts`.
    fn take(&mut self, len: usize) {
        self.skip_take(HEADER_LEN as u32, len);
        self.skip_take(TAG_LEN as u32, 0);
        self.avail -= HEADER_LEN + len + TAG_LEN;
    }

    /// Parses past `skip` bytes, then past `take` bytes kept as parts.
    fn skip_take(&mut self, mut skip: u32, mut take: usize) {
        while skip as usize + take > 0 {
            let p = *self.pieces.front().expect("fill made the bytes available");
            let s = skip.min(p.len() - self.used);
            skip -= s;
            self.used += s;
            let t = take.min((p.len() - self.used) as usize) as u32;
            if t > 0 {
                self.parts.push(p.sub(self.used, t));
                self.used += t;
                take -= t as usize;
            }
            if self.used == p.len() {
                self.pieces.pop_front();
                self.used = 0;
                if p.buf_done() {
                    self.release.push(p.buf());
                }
            }
        }
    }

    /// The next frame; `None` when `nonblocking` and it has not all arrived (what did is
    /// kept for the next call).
    fn next(&mut self, op: &str, nonblocking: bool) -> Result<Option<(Header, Kind, Payload<'_>)>, SessionError> {
        self.parts.clear();
        for b in self.release.drain(..) {
            self.ring.give_back(b);
        }
        if !self.fill(HEADER_LEN, op, nonblocking)? {
            return Ok(None);
        }
        let h = Header::read_from_bytes(&self.peek::<HEADER_LEN>(0)).expect("HEADER_LEN bytes make a header");
        let kind = h.check()?;
        if h.length.get() > self.max_payload {
            return Err(FrameError::Oversized { len: h.length.get(), max: self.max_payload }.into());
        }
        let len = h.length.get() as usize;
        if !self.fill(HEADER_LEN + len + TAG_LEN, op, nonblocking)? {
            return Ok(None);
        }
        let tag = self.peek::<TAG_LEN>(HEADER_LEN + len);
        self.take(len);
        let payload = Payload::Ring { ring: &self.ring, parts: &self.parts, len };
        h.verify_parts(payload.parts())?;
        self.rx.verify(&h, payload.parts(), &tag)?;
        Ok(Some((h, kind, payload)))
    }
}

enum Inner {
    Plain(FrameReader<Arena>),
    Ring(Box<RingFrames>),
}

/// The frames of one data lane, through io_uring or plain reads.
pub struct LaneReader {
    inner: Inner,
}

impl std::fmt::Debug for LaneReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneReader").field("io_uring", &self.uring()).finish()
    }
}

impl LaneReader {
    /// A reader for `s` (handshake done, `rx` its receiving keys), refusing payloads above
    /// `max_payload`. It uses io_uring when the plan says so and the kernel has
    /// incremental buffer rings; a silent peer fails after the socket's read timeout.
    pub fn new(plan: &Plan, s: &TcpStream, max_payload: u32, rx: Seal, live: &crate::live::Session) -> Result<LaneReader, SessionError> {
        let arena = crate::engine::arena(plan, buffer_bytes(max_payload) as usize, live)?;
        Ok(LaneReader::over(arena, plan.tcp.io_uring, s, max_payload, rx))
    }

    /// A reader through `arena`, which holds four frames of `max_payload` at least.
    pub(crate) fn over(arena: Arena, uring: bool, s: &TcpStream, max_payload: u32, rx: Seal) -> LaneReader {
        if !uring {
            return LaneReader { inner: Inner::Plain(FrameReader::with_buffer(arena, max_payload, rx)) };
        }
        match RecvRing::new(s, arena, RING_BUFFERS) {
            Ok(ring) => {
                let timeout = s.read_timeout().ok().flatten().unwrap_or(crate::engine::IDLE_TIMEOUT);
                LaneReader {
                    inner: Inner::Ring(Box::new(RingFrames {
                        ring,
                        rx,
                        max_payload,
                        timeout,
                        pieces: VecDeque::new(),
                        used: 0,
                        avail: 0,
                        release: Vec::new(),
                        parts: Vec::new(),
                    })),
                }
            }
            Err((e, arena)) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| log::warn!("receiving with plain reads instead of io_uring: {e}"));
                LaneReader { inner: Inner::Plain(FrameReader::with_buffer(arena, max_payload, rx)) }
            }
        }
    }

    /// Whether io_uring receives this lane's bytes.
    pub fn uring(&self) -> bool {
        matches!(self.inner, Inner::Ring(_))
    }

    /// The next frame: its header, kind and CRC-verified payload. `s` is the stream the
    /// reader was made for.
    pub fn next(&mut self, s: &mut TcpStream, op: &str) -> Result<(Header, Kind, Payload<'_>), SessionError> {
        // A timeout names the socket's own read timeout (a migration's lanes wait longer).
        let timeout = s.read_timeout().ok().flatten();
        let named = |e| match e {
            SessionError::TimedOut { op, .. } => SessionError::TimedOut { op, secs: timeout.map_or(0, |t| t.as_secs()) },
            e => e,
        };
        match &mut self.inner {
            Inner::Plain(r) => r.next(s, op).map(|(h, k, p)| (h, k, Payload::One(p))).map_err(named),
            Inner::Ring(r) => r.next(op, false).map(|f| f.expect("a blocking read waits for the whole frame")).map_err(named),
        }
    }

    /// The next frame if all of it has arrived: the reader never waits. `s` is the stream
    /// the reader was made for, nonblocking unless io_uring receives it (the ring reads a
    /// nonblocking socket's bytes as errors).
    pub fn try_next(&mut self, s: &mut TcpStream, op: &str) -> Result<Option<(Header, Kind, Payload<'_>)>, SessionError> {
        match &mut self.inner {
            Inner::Plain(r) => Ok(r.try_next(s, op)?.map(|(h, k, p)| (h, k, Payload::One(p)))),
            Inner::Ring(r) => r.next(op, true),
        }
    }

    /// What a reader that never waits ([`LaneReader::try_next`]) waits on instead, beside
    /// `s`: the ring, with io_uring.
    pub fn ring_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.inner {
            Inner::Plain(_) => None,
            Inner::Ring(r) => Some(r.ring.as_fd()),
        }
    }

    /// The reader's memory, for the next lane; `None` when io_uring could not confirm the
    /// end of its receive (the memory is leaked then).
    pub fn into_arena(self) -> Option<Arena> {
        match self.inner {
            Inner::Plain(r) => Some(r.into_buffer()),
            Inner::Ring(r) => r.ring.into_memory(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::write_frame;
    use crate::session::seal::{Keys, Side};
    use std::io::Write;
    use std::net::TcpListener;
    use zerocopy::IntoBytes;

    /// The sending and receiving keys of one test connection.
    fn keys() -> (Seal, Seal) {
        let (c, s) = (Keys::derive(None, Side::Client, &[1; 32], &[2; 32]), Keys::derive(None, Side::Server, &[1; 32], &[2; 32]));
        (c.tx, s.rx)
    }

    /// Both ends of a loopback connection: (writer, reader).
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    fn reader(uring: bool, s: &TcpStream, max_payload: u32, rx: Seal) -> LaneReader {
        let (arena, _) = Arena::new(buffer_bytes(max_payload) as usize, hw::memmap::ArenaKind::Normal, false, None).unwrap();
        LaneReader::over(arena, uring, s, max_payload, rx)
    }

    /// Frames of every size, including ones larger than a receive buffer, written in odd
    /// pieces: the io_uring reader returns each whole and CRC-checked, as the plain one.
    #[test]
    fn frames_across_buffers_match_the_plain_reader() {
        let max = 300_000u32;
        let mut wire = Vec::new();
        let mut want = Vec::new();
        let (mut tx, rx) = keys();
        for i in 0..200u32 {
            let len = (i as usize * 7919) % max as usize;
            let payload: Vec<u8> = (0..len).map(|j| (j as u32 ^ i) as u8).collect();
            write_frame(&mut wire, &mut tx, Kind::Error, &payload).unwrap();
            want.push(payload);
        }
        for uring in [true, false] {
            let (mut a, mut b) = tcp_pair();
            b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = reader(uring, &b, max, rx.clone());
            if uring && !r.uring() {
                hw::report_skip("no incremental io_uring buffer rings here: the plain reader only");
                continue;
            }
            let bytes = wire.clone();
            let w = std::thread::spawn(move || {
                for c in bytes.chunks(99_991) {
                    a.write_all(c).unwrap();
                }
            });
            let mut split = 0;
            let mut page = vec![0u8; 4096];
            for p in &want {
                let (_, kind, got) = r.next(&mut b, "test").unwrap();
                assert_eq!(kind, Kind::Error);
                assert_eq!(got.len(), p.len());
                split += usize::from(got.parts().count() > 1);
                let mut s = Vec::new();
                assert!(got.contiguous(&mut s) == &p[..]);
                // Pages come whole, also where a buffer's end cuts one.
                let mut pages = 0;
                got.pages(4096, &mut page, |i, bytes| {
                    assert!(bytes == p.chunks(4096).nth(i as usize).unwrap(), "page {i}");
                    pages += 1;
                });
                assert_eq!(pages, p.len().div_ceil(4096));
            }
            w.join().unwrap();
            assert!(matches!(r.next(&mut b, "test"), Err(SessionError::PeerClosed { .. })));
            if uring {
                assert!(split > 0, "no frame crossed a buffer end");
            }
        }
    }

    /// A corrupted payload fails its checksum through the ring too, a payload changed
    /// with its checksum recomputed fails its tag, and a truncated frame is the peer
    /// closing.
    #[test]
    fn bad_checksum_tag_and_truncation_through_the_ring() {
        let payload = vec![7u8; 100_000];
        let (mut tx, rx) = keys();
        let mut good = Vec::new();
        write_frame(&mut good, &mut tx, Kind::Error, &payload).unwrap();
        let mut bad = good.clone();
        bad[HEADER_LEN + 99_999] ^= 1;
        let mut forged = bad.clone();
        let h = Header::read_from_bytes(&forged[..HEADER_LEN]).unwrap().seal(&forged[HEADER_LEN..HEADER_LEN + 100_000]);
        forged[..HEADER_LEN].copy_from_slice(h.as_bytes());
        for (wire, case) in [(bad, "checksum"), (forged, "tag"), (good.clone(), "truncated")] {
            let (mut a, mut b) = tcp_pair();
            let mut r = reader(true, &b, 1 << 20, rx.clone());
            if !r.uring() {
                hw::report_skip("no incremental io_uring buffer rings here");
                return;
            }
            a.write_all(&wire[..if case == "truncated" { 50_000 } else { wire.len() }]).unwrap();
            drop(a);
            match (r.next(&mut b, "test"), case) {
                (Err(SessionError::Frame(FrameError::Checksum { .. })), "checksum") => {}
                (Err(SessionError::Frame(FrameError::Tag { .. })), "tag") => {}
                (Err(SessionError::PeerClosed { .. }), "truncated") => {}
                (other, _) => panic!("{case}: {:?}", other.map(|f| f.1)),
            }
        }
    }

    /// Where a seccomp profile blocks io_uring, a lane asked to use it reads with plain
    /// reads instead, and the frames arrive all the same.
    #[test]
    fn blocked_io_uring_falls_back_to_plain_reads() {
        let (mut a, b) = tcp_pair();
        let payload = vec![3u8; 70_000];
        let (mut tx, rx) = keys();
        write_frame(&mut a, &mut tx, Kind::Error, &payload).unwrap();
        let got = std::thread::spawn(move || {
            if let Err(e) = hw::uring::block_io_uring_setup_on_this_thread() {
                return Err(e.to_string());
            }
            let mut b = b;
            let mut r = reader(true, &b, 1 << 20, rx);
            assert!(!r.uring(), "io_uring_setup is blocked on this thread");
            let (_, kind, p) = r.next(&mut b, "test").unwrap();
            let mut s = Vec::new();
            Ok((kind, p.contiguous(&mut s).to_vec()))
        })
        .join()
        .unwrap();
        match got {
            Ok((kind, bytes)) => {
                assert_eq!(kind, Kind::Error);
                assert!(bytes == payload);
            }
            Err(e) => hw::report_skip(&format!("cannot install a seccomp filter here: {e}")),
        }
    }
}
