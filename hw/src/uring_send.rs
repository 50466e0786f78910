//! Sending on several TCP connections from one thread with io_uring: each connection has
//! at most one WRITEV in flight (so its bytes stay in order), the caller's buffers move
//! into the ring with the submission and come back with the completion, and short writes
//! are resubmitted from where they stopped.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, types};

/// A send buffer: a list of byte ranges whose addresses stay fixed while it is owned by
/// the ring (the implementor keeps them in heap allocations or borrowed memory it does
/// not touch).
pub trait SendBuf {
    /// Calls `f` with each range, in order.
    fn for_each_slice(&self, f: &mut dyn FnMut(&[u8]));
}

struct InFlight<B> {
    buf: B,
    /// Built from `buf`'s slices; points into memory `buf` owns or borrows.
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully written.
    at: usize,
}

/// One ring driving `N` connections.
pub struct SendRing<B> {
    ring: IoUring,
    fds: Vec<RawFd>,
    inflight: Vec<Option<InFlight<B>>>,
    /// Each connection's iovec list, kept between submissions so none allocates.
    iov_spare: Vec<Vec<libc::iovec>>,
}

impl<B> std::fmt::Debug for SendRing<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendRing").field("connections", &self.fds.len()).finish_non_exhaustive()
    }
}

// SAFETY: the iovecs' raw pointers refer to memory owned or borrowed by `B`, which moves
// with the ring; sending the ring to another thread is as safe as sending the `B`s.
unsafe impl<B: Send> Send for SendRing<B> {}

impl<B: SendBuf> SendRing<B> {
    /// A ring of `entries` for `conns`. The connections must outlive the ring (the
    /// caller keeps them and drops the ring first).
    pub fn new(entries: u32, conns: &[&impl AsRawFd]) -> io::Result<Self> {
        Ok(SendRing {
            // Room for a write and a cancel per connection.
            ring: IoUring::new(entries.max(2 * conns.len() as u32).next_power_of_two())?,
            fds: conns.iter().map(|c| c.as_raw_fd()).collect(),
            inflight: conns.iter().map(|_| None).collect(),
            iov_spare: conns.iter().map(|_| Vec::new()).collect(),
        })
    }

    pub fn busy(&self, conn: usize) -> bool {
        self.inflight[conn].is_some()
    }

    pub fn any_busy(&self) -> bool {
        self.inflight.iter().any(Option::is_some)
    }

    /// Queues `buf` on connection `conn`, which must be idle.
    pub fn submit(&mut self, conn: usize, buf: B) -> io::Result<()> {
        assert!(!self.busy(conn), "one write in flight per connection keeps its bytes in order");
        let mut iov = std::mem::take(&mut self.iov_spare[conn]);
        iov.clear();
        buf.for_each_slice(&mut |s| {
            if !s.is_empty() {
                iov.push(libc::iovec { iov_base: s.as_ptr().cast_mut().cast(), iov_len: s.len() });
            }
        });
        self.inflight[conn] = Some(InFlight { buf, iov, at: 0 });
        self.push(conn)?;
        self.ring.submit().map(drop)
    }

    fn push(&mut self, conn: usize) -> io::Result<()> {
        let f = self.inflight[conn].as_ref().expect("in flight");
        let iov = &f.iov[f.at..];
        // IOV_MAX is 1024 per call; a short write resubmits the rest.
        let n = iov.len().min(1024) as u32;
        let sqe = opcode::Writev::new(types::Fd(self.fds[conn]), iov.as_ptr(), n).build().user_data(conn as u64);
        // SAFETY: the iovec array and every range it points to belong to the InFlight
        // entry stored in `self.inflight[conn]`, which is not touched again until this
        // SQE's completion is reaped in `wait`; `Drop` waits for outstanding completions
        // before anything is freed.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Waits until at least one connection's buffer is written completely, and returns
    /// every buffer that is (with its connection), so none is held back while its
    /// connection takes new work.
    pub fn wait(&mut self) -> io::Result<Vec<(usize, B)>> {
        loop {
            if !self.any_busy() {
                return Err(io::Error::other("nothing in flight"));
            }
            self.ring.submit_and_wait(1)?;
            let cqes: Vec<(usize, i32)> = self.ring.completion().map(|c| (c.user_data() as usize, c.result())).collect();
            let mut done = Vec::new();
            // Every completion of the batch is accounted for before an error is returned:
            // a connection left marked in flight after its completion was reaped would
            // make `Drop` wait forever.
            let mut error = None;
            for (conn, res) in cqes {
                if res <= 0 {
                    // This write is over (the kernel is done with its buffer).
                    self.inflight[conn] = None;
                    error.get_or_insert(if res < 0 { io::Error::from_raw_os_error(-res) } else { io::ErrorKind::WriteZero.into() });
                    continue;
                }
                let f = self.inflight[conn].as_mut().expect("a completion for an idle connection");
                let mut written = res as usize;
                while written > 0 && f.at < f.iov.len() {
                    let v = &mut f.iov[f.at];
                    if written >= v.iov_len {
                        written -= v.iov_len;
                        f.at += 1;
                    } else {
                        // SAFETY: advancing within the same range by fewer bytes than it has.
                        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(written).cast() };
                        v.iov_len -= written;
                        written = 0;
                    }
                }
                if f.at < f.iov.len() {
                    if let Err(e) = self.push(conn) {
                        // Not resubmitted: nothing of this connection is in flight any more.
                        self.inflight[conn] = None;
                        error.get_or_insert(e);
                    }
                } else {
                    let f = self.inflight[conn].take().expect("in flight");
                    self.iov_spare[conn] = f.iov;
                    done.push((conn, f.buf));
                }
            }
            self.ring.submit()?;
            if let Some(e) = error {
                return Err(e);
            }
            if !done.is_empty() {
                return Ok(done);
            }
        }
    }
}

impl<B> Drop for SendRing<B> {
    /// Cancels what is still in flight and waits until the kernel has let go of every
    /// buffer before they are freed.
    fn drop(&mut self) {
        const CANCEL: u64 = 1 << 63;
        for (conn, f) in self.inflight.iter().enumerate() {
            if f.is_some() {
                let sqe = opcode::AsyncCancel::new(conn as u64).build().user_data(CANCEL | conn as u64);
                // SAFETY: a cancel carries no buffer.
                let _ = unsafe { self.ring.submission().push(&sqe) };
            }
        }
        while self.inflight.iter().any(Option::is_some) {
            if self.ring.submit_and_wait(1).is_err() {
                // The ring is unusable; leak the buffers rather than free memory the
                // kernel might still write from.
                for f in &mut self.inflight {
                    if let Some(f) = f.take() {
                        std::mem::forget(f);
                    }
                }
                return;
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for ud in done {
                if ud & CANCEL == 0 {
                    self.inflight[ud as usize] = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[derive(Debug)]
    struct Owned(Vec<Vec<u8>>);
    impl SendBuf for Owned {
        fn for_each_slice(&self, f: &mut dyn FnMut(&[u8])) {
            self.0.iter().for_each(|v| f(v));
        }
    }

    #[test]
    fn writes_in_order_across_connections_with_short_writes() {
        let (a1, mut b1) = UnixStream::pair().unwrap();
        let (a2, mut b2) = UnixStream::pair().unwrap();
        let mut ring = match SendRing::<Owned>::new(8, &[&a1, &a2]) {
            Ok(r) => r,
            Err(e) => {
                crate::report_skip(&format!("io_uring unavailable: {e}"));
                return;
            }
        };
        // Larger than a socket buffer, so writes go short and are resubmitted, and the
        // readers must drain concurrently.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let readers = std::thread::spawn(move || {
            let mut x = Vec::new();
            let mut y = Vec::new();
            let t = std::thread::spawn(move || {
                b2.read_to_end(&mut y).unwrap();
                y
            });
            b1.read_to_end(&mut x).unwrap();
            (x, t.join().unwrap())
        });
        for round in 0..3u8 {
            for conn in 0..2 {
                if ring.busy(conn) {
                    continue;
                }
                ring.submit(conn, Owned(vec![vec![round; 10], big.clone(), vec![conn as u8]])).unwrap();
            }
            while ring.any_busy() {
                for (conn, buf) in ring.wait().unwrap() {
                    assert!(conn < 2);
                    drop(buf);
                }
            }
        }
        drop(ring);
        drop((a1, a2));
        let (x, y) = readers.join().unwrap();
        let mut want = Vec::new();
        for round in 0..3u8 {
            want.extend(vec![round; 10]);
            want.extend(&big);
            want.push(0);
        }
        assert_eq!(x.len(), want.len());
        assert!(x == want, "connection 0 bytes out of order");
        assert_eq!(y.len(), want.len());
    }

    #[test]
    fn buffers_completed_together_all_come_back() {
        let pairs: Vec<_> = (0..4).map(|_| UnixStream::pair().unwrap()).collect();
        let ours: Vec<&UnixStream> = pairs.iter().map(|(a, _)| a).collect();
        let Ok(mut ring) = SendRing::<Owned>::new(8, &ours) else { return };
        for round in 0..50 {
            for c in 0..4 {
                if !ring.busy(c) {
                    ring.submit(c, Owned(vec![vec![round as u8; 100]])).unwrap();
                }
            }
            // Small writes complete at once, often several per batch of completions.
            let mut back = 0;
            while ring.any_busy() {
                back += ring.wait().unwrap().len();
            }
            assert_eq!(back, 4, "every buffer comes back");
        }
        for (_, b) in &pairs {
            b.set_nonblocking(true).unwrap();
            let mut buf = vec![0u8; 100 * 50];
            let n = (&*b).read(&mut buf).unwrap();
            assert_eq!(n, 5000);
        }
    }

    #[test]
    fn one_failure_among_completions_leaves_a_clean_ring() {
        let (a1, b1) = UnixStream::pair().unwrap();
        let (a2, _b2) = UnixStream::pair().unwrap();
        drop(b1);
        let Ok(mut ring) = SendRing::<Owned>::new(4, &[&a1, &a2]) else { return };
        ring.submit(0, Owned(vec![vec![1; 100]])).unwrap();
        ring.submit(1, Owned(vec![vec![2; 100]])).unwrap();
        let mut failed = false;
        while ring.any_busy() {
            match ring.wait() {
                Ok(done) => assert!(done.iter().all(|(c, _)| *c == 1)),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
                    failed = true;
                }
            }
        }
        assert!(failed);
        // Nothing is left marked in flight, so this returns.
        drop(ring);
    }

    #[test]
    fn a_closed_peer_is_an_error_and_drop_is_clean() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let Ok(mut ring) = SendRing::<Owned>::new(4, &[&a]) else { return };
        ring.submit(0, Owned(vec![vec![1; 100]])).unwrap();
        let e = ring.wait().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}
