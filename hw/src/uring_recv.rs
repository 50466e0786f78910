//! Receiving on one TCP connection with io_uring: one multishot receive stays armed on the
//! socket and the kernel copies what arrives straight into buffers the caller lent it (a
//! provided-buffer ring carved from the caller's arena), so there is no `read` syscall per
//! batch and no buffer is named per receive.
//!
//! The ring is registered with incremental consumption (`IOU_PBUF_RING_INC`, Linux 6.12):
//! the kernel fills a buffer piece by piece, each completion continuing where the last one
//! stopped, and moves to the next buffer only when this one is full. The stream therefore
//! lies contiguously in each buffer, and a frame is split only where a buffer ends. Without
//! incremental consumption every completion would take a whole buffer for however few bytes
//! arrived, so a large frame could need more buffers than exist; [`RecvRing::new`] refuses
//! then, and the caller reads with plain `read` calls instead.
//!
//! ```text
//!   caller                         RecvRing                        kernel
//!     |  new(socket, arena)  ------>  register buffer ring (INC)  -->|
//!     |  next()              ------>  arm RECV (multishot)       --->|
//!     |                               wait for a completion    <-----| bytes into buffer b
//!     |  <--- Piece {b, offset, len, buf_done}                       |  at its fill offset
//!     |  ... parse frames in place ...                               |
//!     |  give_back(b)        ------>  append b at the ring's tail -->| b may be filled again
//! ```

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, types};
use memmap2::MmapMut;

use crate::memmap::Arena;

/// The buffer group of the ring (one group per `RecvRing`, each with its own io_uring).
const BGID: u16 = 1;
const RECV: u64 = 1;
const CANCEL: u64 = 2;
/// `IOU_PBUF_RING_INC`.
const PBUF_RING_INC: u16 = 2;

/// Bytes the kernel delivered: `len` bytes at `offset` in buffer `buf`, of the buffer's
/// `lending`-th lending. Only the ring makes pieces, so each names bytes the kernel completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    buf: u16,
    offset: u32,
    len: u32,
    buf_done: bool,
    lending: u32,
}

impl Piece {
    /// The buffer to give back once every piece of it has been used.
    pub fn buf(&self) -> u16 {
        self.buf
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The kernel puts nothing more into this piece's buffer until it is given back.
    pub fn buf_done(&self) -> bool {
        self.buf_done
    }

    /// `len` bytes of this piece from `start`.
    pub fn sub(&self, start: u32, len: u32) -> Piece {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len), "{start}+{len} is outside {self:?}");
        Piece { offset: self.offset + start, len, ..*self }
    }
}

/// Why a receive ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("the kernel has no incremental provided-buffer rings (IOU_PBUF_RING_INC, Linux 6.12): {0}")]
    NoIncremental(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub struct RecvRing {
    ring: IoUring,
    /// A duplicate of the socket's descriptor, so the receive can be re-armed on it
    /// whatever the caller does with its own.
    fd: OwnedFd,
    /// The memory the buffers are cut from, kept until the receive is over.
    mem: Option<Arena>,
    /// The provided-buffer ring's entries, shared with the kernel.
    entries: MmapMut,
    tail: u16,
    base: *mut u8,
    buf_len: u32,
    nbufs: u16,
    /// Bytes of each buffer the kernel has filled since it was last handed over.
    filled: Vec<u32>,
    /// How often each buffer has been given back: a piece of an earlier lending is stale.
    gens: Vec<u32>,
    /// Buffers the kernel holds (in the ring, or being filled).
    in_kernel: u16,
    armed: bool,
    cancelled: bool,
    ready: VecDeque<Piece>,
    /// The peer closed its side: nothing follows the pieces in `ready`.
    eof: bool,
    failed: Option<io::Error>,
}

impl std::fmt::Debug for RecvRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvRing")
            .field("fd", &self.fd.as_raw_fd())
            .field("buffers", &self.nbufs)
            .field("buf_len", &self.buf_len)
            .finish_non_exhaustive()
    }
}

impl RecvRing {
    /// Lends `mem` to the kernel as `nbufs` equal buffers (a power of two from 2 to
    /// 32768) for receiving on `sock`. The ring owns the memory from now on; if it cannot
    /// be set up, the memory comes back with the reason.
    pub fn new(sock: &impl AsFd, mut mem: Arena, nbufs: u16) -> Result<RecvRing, (RecvError, Arena)> {
        let invalid = |why: String| RecvError::Io(io::Error::new(io::ErrorKind::InvalidInput, why));
        if !nbufs.is_power_of_two() || !(2..=32768).contains(&nbufs) {
            return Err((invalid(format!("{nbufs} receive buffers: need a power of two from 2 to 32768")), mem));
        }
        let len = mem.len();
        let buf_len = u32::try_from(len / usize::from(nbufs)).unwrap_or(u32::MAX) & !4095;
        if buf_len == 0 {
            return Err((invalid(format!("{len} bytes cannot make {nbufs} receive buffers")), mem));
        }
        let set_up = || -> Result<(OwnedFd, IoUring, MmapMut), RecvError> {
            let fd = sock.as_fd().try_clone_to_owned()?;
            // One thread submits and waits (the reader's); the kernel's receive work then
            // runs when that thread waits for completions (DEFER_TASKRUN), not by
            // interrupting its other syscalls. Kernels before 6.1 get a plain ring.
            let cq = u32::from(nbufs).max(64) * 4;
            let ring = match IoUring::builder().setup_cqsize(cq).setup_single_issuer().setup_defer_taskrun().build(8) {
                Ok(r) => r,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder().setup_cqsize(cq).build(8)?,
                Err(e) => return Err(e.into()),
            };
            let entries = MmapMut::map_anon((usize::from(nbufs) * std::mem::size_of::<types::BufRingEntry>()).max(4096))?;
            // SAFETY: `entries` is a zeroed, page-aligned mapping of `nbufs` entries that
            // the struct keeps until after it unregisters the group (Drop); if this
            // function fails, the ring is dropped before the mapping.
            unsafe { ring.submitter().register_buf_ring_with_flags(entries.as_ptr() as u64, nbufs, BGID, PBUF_RING_INC) }
                .map_err(|e| if e.raw_os_error() == Some(libc::EINVAL) { RecvError::NoIncremental(e) } else { RecvError::Io(e) })?;
            Ok((fd, ring, entries))
        };
        let (fd, ring, entries) = match set_up() {
            Ok(r) => r,
            Err(e) => return Err((e, mem)),
        };
        let base = mem.as_mut_slice().as_mut_ptr();
        let mut r = RecvRing {
            ring,
            fd,
            mem: Some(mem),
            entries,
            tail: 0,
            base,
            buf_len,
            nbufs,
            filled: vec![0; usize::from(nbufs)],
            gens: vec![0; usize::from(nbufs)],
            in_kernel: 0,
            armed: false,
            cancelled: false,
            ready: VecDeque::new(),
            eof: false,
            failed: None,
        };
        for b in 0..nbufs {
            r.push_entry(b);
        }
        r.publish();
        Ok(r)
    }

    pub fn buf_len(&self) -> u32 {
        self.buf_len
    }

    /// The bytes of `p`. They stay as they are until `p`'s buffer is given back; a piece
    /// of a buffer given back since, or of another ring, panics.
    pub fn bytes(&self, p: &Piece) -> &[u8] {
        assert!(
            p.buf < self.nbufs && p.offset + p.len <= self.buf_len && self.gens[usize::from(p.buf)] == p.lending,
            "{p:?} is not a current piece of this ring"
        );
        // SAFETY: the range lies inside buffer `p.buf` of the lent memory (owned by `self`),
        // in a part the kernel completed during the buffer's current lending (the
        // generation matches); it writes no byte of that part again until the buffer is
        // given back, which takes `&mut self` and so cannot happen while the returned slice
        // lives.
        unsafe { std::slice::from_raw_parts(self.base.add(p.buf as usize * self.buf_len as usize + p.offset as usize), p.len as usize) }
    }

    fn push_entry(&mut self, b: u16) {
        let mask = self.nbufs - 1;
        let base = self.entries.as_mut_ptr().cast::<types::BufRingEntry>();
        // SAFETY: slot `tail & mask` lies inside the mapping; the kernel does not read
        // slots past the published tail, so writing it races with nothing.
        unsafe {
            let e = &mut *base.add(usize::from(self.tail & mask));
            e.set_addr(self.base.add(usize::from(b) * self.buf_len as usize) as u64);
            e.set_len(self.buf_len);
            e.set_bid(b);
        }
        self.tail = self.tail.wrapping_add(1);
        self.filled[usize::from(b)] = 0;
        self.in_kernel += 1;
    }

    fn publish(&mut self) {
        let base = self.entries.as_mut_ptr().cast::<types::BufRingEntry>();
        // SAFETY: the tail field lives in entry 0 of the mapping; the release store pairs
        // with the kernel's acquire load and publishes the entries written before it.
        unsafe { AtomicU16::from_ptr(types::BufRingEntry::tail(base).cast_mut()).store(self.tail, Ordering::Release) };
    }

    /// Hands buffer `buf` back to the kernel: every piece of it has been used.
    pub fn give_back(&mut self, buf: u16) {
        assert!(buf < self.nbufs);
        self.gens[usize::from(buf)] = self.gens[usize::from(buf)].wrapping_add(1);
        self.push_entry(buf);
        self.publish();
    }

    /// The next piece of the stream, in order; `None` once the peer has closed and every
    /// piece was returned. Waits at most `timeout` for the kernel.
    pub fn next(&mut self, timeout: Duration) -> io::Result<Option<Piece>> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Ok(Some(p));
            }
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if self.eof {
                return Ok(None);
            }
            if !self.armed {
                if self.in_kernel == 0 {
                    return Err(io::Error::other(format!(
                        "all {} receive buffers are held by the reader: a frame larger than the arena ({} bytes)?",
                        self.nbufs,
                        u64::from(self.nbufs) * u64::from(self.buf_len)
                    )));
                }
                let sqe = opcode::RecvMulti::new(types::Fd(self.fd.as_raw_fd()), BGID).build().user_data(RECV);
                // SAFETY: the receive writes only into buffers of the registered group,
                // which lie in `self.mem`; Drop ends the receive before freeing it, and
                // `self.fd` stays open as long.
                unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
                self.armed = true;
            }
            let ts = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                    if self.ring.completion().is_empty() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no data for {} s", timeout.as_secs())));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.harvest();
        }
    }

    /// The next piece of the stream if the kernel has one now (its pending receive work
    /// runs first); an error of kind `WouldBlock` if not. For a reader that waits on
    /// its descriptor ([`AsFd`]) and its socket with epoll instead of in the ring.
    pub fn next_now(&mut self) -> io::Result<Option<Piece>> {
        match self.next(Duration::ZERO) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::ErrorKind::WouldBlock.into()),
            r => r,
        }
    }

    /// Ends the receive and gives the memory back for another ring; `None` when the
    /// kernel did not confirm the end of the receive (the memory is leaked then, as on
    /// drop: the kernel might still write into it).
    pub fn into_memory(mut self) -> Option<Arena> {
        self.end_receive();
        self.mem.take()
    }

    /// Cancels the receive and waits for its last completion; leaks the memory if that
    /// does not come.
    fn end_receive(&mut self) {
        // The receive must be over before the lent memory may be reused: cancel it and
        // wait for its last completion (one without IORING_CQE_F_MORE).
        if self.armed && !self.cancelled {
            let sqe = opcode::AsyncCancel::new(RECV).build().user_data(CANCEL);
            // SAFETY: a cancel references no memory.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.cancelled = true;
            }
        }
        let mut tries = 0;
        while self.armed && tries < 100 {
            tries += 1;
            let ts = types::Timespec::from(Duration::from_millis(50));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.harvest();
        }
        if self.armed {
            // The kernel might still write into the buffers: leak them rather than free.
            log::warn!("io_uring receive on fd {} did not confirm its cancellation: its buffers are leaked", self.fd.as_raw_fd());
            std::mem::forget(self.mem.take());
        }
    }

    /// Takes every completion off the queue (no allocation: pieces go to `ready`, which
    /// keeps its capacity).
    fn harvest(&mut self) {
        let RecvRing { ring, filled, gens, in_kernel, armed, ready, eof, failed, .. } = self;
        for cqe in ring.completion() {
            if cqe.user_data() != RECV {
                continue;
            }
            let flags = cqe.flags();
            if !cqueue::more(flags) {
                *armed = false;
            }
            let res = cqe.result();
            if res > 0 {
                let buf = cqueue::buffer_select(flags).expect("a receive with data names its buffer");
                let b = usize::from(buf);
                let buf_done = !cqueue::buffer_more(flags);
                ready.push_back(Piece { buf, offset: filled[b], len: res as u32, buf_done, lending: gens[b] });
                filled[b] += res as u32;
                if buf_done {
                    *in_kernel -= 1;
                }
            } else if res == 0 {
                *eof = true;
            } else if -res == libc::ENOBUFS {
                // Every buffer is with the reader: re-armed once one comes back.
            } else if -res != libc::ECANCELED {
                failed.get_or_insert(io::Error::from_raw_os_error(-res));
            }
        }
    }
}

impl Drop for RecvRing {
    fn drop(&mut self) {
        self.end_receive();
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
    }
}

/// The ring's descriptor, readable once completions are queued: with the socket
/// (readable while its bytes wait for the ring's deferred receive work), what a reader
/// that waits in epoll instead of in the ring watches for [`RecvRing::next_now`] to have
/// more.
impl AsFd for RecvRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tcp_pair;
    use std::io::Write;

    fn arena(bytes: usize) -> Arena {
        Arena::new(bytes, crate::memmap::ArenaKind::Normal, false, None).unwrap().0
    }

    /// Several MiB through four 64 KiB buffers: every byte arrives once and in order, each
    /// buffer is filled front to back, and the end of the stream is reported.
    #[test]
    fn stream_arrives_in_order_through_few_buffers() {
        let (a, b) = tcp_pair();
        let mut ring = match RecvRing::new(&b, arena(4 << 16), 4) {
            Ok(r) => r,
            Err((e, _)) => {
                crate::report_skip(&format!("no io_uring receive ring here: {e}"));
                return;
            }
        };
        assert_eq!(ring.buf_len(), 1 << 16);
        let total: usize = 5 << 20;
        let writer = std::thread::spawn(move || {
            let mut a = a;
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            for c in data.chunks(70_001) {
                a.write_all(c).unwrap();
            }
        });
        let mut got = 0usize;
        let mut fill = [0u32; 4];
        let mut continued = 0;
        while let Some(p) = ring.next(Duration::from_secs(10)).unwrap() {
            assert_eq!(p.offset, fill[usize::from(p.buf)], "buffers fill front to back");
            continued += usize::from(p.offset > 0);
            fill[usize::from(p.buf)] += p.len;
            assert_eq!(ring.bytes(&p.sub(1.min(p.len), p.len - 1.min(p.len))), &ring.bytes(&p)[1.min(p.len as usize)..]);
            let bytes = ring.bytes(&p);
            assert!(bytes.iter().enumerate().all(|(i, &x)| x == ((got + i) % 251) as u8), "bytes out of order at {got}");
            got += bytes.len();
            if p.buf_done {
                fill[usize::from(p.buf)] = 0;
                ring.give_back(p.buf);
                let stale = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ring.bytes(&p).len()));
                assert!(stale.is_err(), "a piece of a buffer given back is refused");
            }
        }
        writer.join().unwrap();
        assert_eq!(got, total);
        assert!(continued > 0, "no completion continued a buffer: not incremental");
    }

    /// A silent peer times out; a reset one is an error, not an end of stream.
    #[test]
    fn timeout_and_reset() {
        let (a, b) = tcp_pair();
        let Ok(mut ring) = RecvRing::new(&b, arena(2 << 16), 2) else {
            crate::report_skip("no io_uring receive ring here");
            return;
        };
        let e = ring.next(Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // SO_LINGER 0: close sends a RST.
        let l = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a plain setsockopt on an open socket with a correctly sized value.
        unsafe {
            libc::setsockopt(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&raw const l).cast(), size_of::<libc::linger>() as u32)
        };
        drop(a);
        let e = ring.next(Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    /// A reader that keeps every buffer gets an error once the kernel has none left to
    /// fill, not a hang; giving one back lets the stream go on where it stopped.
    #[test]
    fn buffers_all_held_is_an_error_then_resumes() {
        let (mut a, b) = tcp_pair();
        let Ok(mut ring) = RecvRing::new(&b, arena(2 << 16), 2) else {
            crate::report_skip("no io_uring receive ring here");
            return;
        };
        let data: Vec<u8> = (0..(3usize << 16)).map(|i| (i % 249) as u8).collect();
        a.write_all(&data).unwrap();
        let mut got = Vec::new();
        let mut held = Vec::new();
        let err = loop {
            match ring.next(Duration::from_secs(5)) {
                Ok(Some(p)) => {
                    got.extend_from_slice(ring.bytes(&p));
                    if p.buf_done() {
                        held.push(p.buf());
                    }
                }
                Ok(None) => panic!("the stream has not ended"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("all 2 receive buffers are held"), "{err}");
        assert_eq!(got.len(), 2 << 16, "both buffers filled");
        for b in held {
            ring.give_back(b);
        }
        while got.len() < data.len() {
            let p = ring.next(Duration::from_secs(5)).unwrap().expect("more data");
            got.extend_from_slice(ring.bytes(&p));
            if p.buf_done() {
                ring.give_back(p.buf());
            }
        }
        assert!(got == data, "the stream resumed where it stopped");
    }
}
