//! Sending on several TCP connections from one thread with io_uring: each connection has
//! at most one send in flight (so its bytes stay in order), the caller's buffers move into
//! the ring with the submission and come back with the completion, and short writes are
//! resubmitted from where they stopped.
//!
//! With zero copy (`IORING_OP_SENDMSG_ZC`, Linux 6.1+), the NIC reads the buffers in place;
//! each send then completes twice, once with its byte count and once more with a
//! notification that the kernel has let go of the pages. A buffer comes back only after
//! every notification of every send that used it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use io_uring::{IoUring, cqueue, opcode, types};

/// A send buffer: a list of byte ranges the kernel reads while the ring owns the buffer.
///
/// # Safety
///
/// The ranges `for_each_slice` yields must stay valid for reads, at the same addresses and
/// with the same lengths, from the call until the ring hands the buffer back, even though
/// the value itself is moved into and out of the ring: they must live in memory the value
/// owns through a pointer (a heap allocation, a mapping) or borrows for at least as long,
/// never inline in the value. Nothing may write them meanwhile. Implementing the trait
/// promises this; the ring hands the ranges to the kernel on that promise.
pub unsafe trait SendBuf {
    /// Calls `f` with each range, in order.
    fn for_each_slice(&self, f: &mut dyn FnMut(&[u8]));
}

struct InFlight<B> {
    conn: usize,
    buf: B,
    /// Built from `buf`'s slices; points into memory `buf` owns or borrows.
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully written.
    at: usize,
    /// Zero copy: the message header the SQE points to, at a fixed address.
    msg: Option<Box<libc::msghdr>>,
    /// A send of this buffer is in the ring.
    op: bool,
    /// Zero-copy notifications still to come.
    notifs: u32,
    /// The send failed; the buffer retires once the kernel is done with it.
    failed: Option<io::Error>,
}

impl<B> InFlight<B> {
    fn written(&self) -> bool {
        self.at >= self.iov.len()
    }

    /// Nothing of this buffer is in the kernel's hands any more.
    fn settled(&self) -> bool {
        !self.op && self.notifs == 0
    }
}

/// Counters of the zero-copy path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZcStats {
    /// Notifications received.
    pub notifications: u64,
    /// Of those, how many said the kernel copied after all (`IORING_NOTIF_USAGE_ZC_COPIED`:
    /// loopback, or a NIC without scatter-gather).
    pub copied: u64,
}

/// One ring driving `N` connections, whose descriptors it owns: they stay open until the
/// kernel has let go of every buffer.
pub struct SendRing<B> {
    ring: IoUring,
    fds: Vec<OwnedFd>,
    /// Buffers the ring holds, by slot (the SQEs' user data): being written, or written
    /// and waiting for their zero-copy notifications.
    slots: Vec<Option<InFlight<B>>>,
    /// Per connection, the slot being written now.
    writing: Vec<Option<usize>>,
    /// Iovec lists kept between submissions so none allocates.
    iov_spare: Vec<Vec<libc::iovec>>,
    zero_copy: bool,
    zc: ZcStats,
    /// Buffers whose send failed, released by the kernel: [`SendRing::release_all`] gives
    /// them back to their owner.
    failed: Vec<B>,
}

impl<B> std::fmt::Debug for SendRing<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendRing").field("connections", &self.fds.len()).field("zero_copy", &self.zero_copy).finish_non_exhaustive()
    }
}

// SAFETY: the iovecs' and message headers' raw pointers refer to memory owned or borrowed
// by the held entries, which move with the ring; sending the ring to another thread is as
// safe as sending the `B`s.
unsafe impl<B: Send> Send for SendRing<B> {}

/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's result when the data was copied.
const ZC_COPIED: i32 = 1 << 31;

impl<B: SendBuf> SendRing<B> {
    /// A ring of `entries` for `conns` (descriptors it now owns: duplicates of the
    /// caller's sockets, say), sending with WRITEV.
    pub fn new(entries: u32, conns: Vec<OwnedFd>) -> io::Result<Self> {
        SendRing::with_zero_copy(entries, conns, false)
    }

    /// [`SendRing::new`], sending with SENDMSG_ZC when `zero_copy`. A connection takes its
    /// next buffer as soon as the previous one is written; the written buffer comes back
    /// once its notifications are in.
    pub fn with_zero_copy(entries: u32, conns: Vec<OwnedFd>, zero_copy: bool) -> io::Result<Self> {
        Ok(SendRing {
            // Room for a send and a cancel per connection.
            ring: IoUring::new(entries.max(2 * conns.len() as u32).next_power_of_two())?,
            writing: conns.iter().map(|_| None).collect(),
            fds: conns,
            slots: Vec::new(),
            iov_spare: Vec::new(),
            zero_copy,
            zc: ZcStats::default(),
            failed: Vec::new(),
        })
    }

    /// Whether connection `conn` is writing a buffer (and so cannot take another).
    pub fn busy(&self, conn: usize) -> bool {
        self.writing[conn].is_some()
    }

    /// Whether the ring holds any buffer: being written, or waiting for notifications.
    pub fn any_busy(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    pub fn zero_copy_stats(&self) -> ZcStats {
        self.zc
    }

    /// Connections the ring drives.
    pub fn connections(&self) -> usize {
        self.fds.len()
    }

    /// Queues `buf` on connection `conn`, which must not be busy. A buffer that cannot be
    /// queued comes back with the error.
    pub fn submit(&mut self, conn: usize, buf: B) -> Result<(), (io::Error, B)> {
        assert!(!self.busy(conn), "one send in flight per connection keeps its bytes in order");
        let mut iov = self.iov_spare.pop().unwrap_or_default();
        iov.clear();
        buf.for_each_slice(&mut |s| {
            if !s.is_empty() {
                iov.push(libc::iovec { iov_base: s.as_ptr().cast_mut().cast(), iov_len: s.len() });
            }
        });
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let msg = self.zero_copy.then(|| Box::new(unsafe { std::mem::zeroed::<libc::msghdr>() }));
        let entry = InFlight { conn, buf, iov, at: 0, msg, op: false, notifs: 0, failed: None };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        };
        if let Err(e) = self.push(slot) {
            let f = self.slots[slot].take().expect("just placed");
            self.iov_spare.push(f.iov);
            return Err((e, f.buf));
        }
        self.writing[conn] = Some(slot);
        // The entry is queued: a failed submit leaves it queued for the next one (in
        // `wait`), where a lasting error shows.
        let _ = self.ring.submit();
        Ok(())
    }

    fn push(&mut self, slot: usize) -> io::Result<()> {
        let f = self.slots[slot].as_mut().expect("held");
        let fd = types::Fd(self.fds[f.conn].as_raw_fd());
        let iov = &f.iov[f.at..];
        // IOV_MAX is 1024 per call; a short write resubmits the rest.
        let n = iov.len().min(1024);
        let sqe = match &mut f.msg {
            Some(msg) => {
                msg.msg_iov = iov.as_ptr().cast_mut();
                msg.msg_iovlen = n;
                // IORING_SEND_ZC_REPORT_USAGE: notifications say whether the kernel copied.
                opcode::SendMsgZc::new(fd, &**msg).ioprio(1 << 3).build().user_data(slot as u64)
            }
            None => opcode::Writev::new(fd, iov.as_ptr(), n as u32).build().user_data(slot as u64),
        };
        // SAFETY: the message header, the iovec array and every range it points to belong
        // to the entry in `self.slots[slot]`, which is not freed or rewritten until this
        // send's completion (and, with zero copy, every notification) is reaped in `wait`;
        // `Drop` waits for those before anything is freed.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        f.op = true;
        Ok(())
    }

    /// Accounts for one completion of `slot`: advances past what was written and
    /// resubmits the rest; frees the connection once its buffer is written (or failed).
    fn complete(&mut self, slot: usize, res: i32, flags: u32) {
        let f = self.slots[slot].as_mut().expect("a completion for a slot the ring does not hold");
        if cqueue::notif(flags) {
            f.notifs -= 1;
            self.zc.notifications += 1;
            if res & ZC_COPIED != 0 {
                self.zc.copied += 1;
            }
            return;
        }
        f.op = false;
        if cqueue::more(flags) {
            f.notifs += 1;
        }
        if res <= 0 {
            f.failed.get_or_insert(if res < 0 { io::Error::from_raw_os_error(-res) } else { io::ErrorKind::WriteZero.into() });
        } else {
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
        }
        let (conn, more) = (f.conn, !f.written() && f.failed.is_none());
        if more {
            if let Err(e) = self.push(slot) {
                self.slots[slot].as_mut().expect("held").failed.get_or_insert(e);
            } else {
                return;
            }
        }
        // Written (or failed): the connection may take its next buffer.
        self.writing[conn] = None;
    }

    /// Waits until at least one buffer is written completely (and, with zero copy,
    /// released by the kernel), and returns every buffer that is (with its connection),
    /// so none is held back while its connection takes new work.
    pub fn wait(&mut self) -> io::Result<Vec<(usize, B)>> {
        loop {
            if !self.any_busy() {
                return Err(io::Error::other("nothing in flight"));
            }
            self.ring.submit_and_wait(1)?;
            let done = self.reap()?;
            if !done.is_empty() {
                return Ok(done);
            }
        }
    }

    /// Every buffer written completely (and released) by now, without waiting: none if
    /// nothing has completed. The ring's descriptor ([`AsFd`]) polls readable once
    /// something has, to wait on beside other descriptors.
    pub fn reap_ready(&mut self) -> io::Result<Vec<(usize, B)>> {
        // Entries a failed submit left queued go now (nothing else would submit them).
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        if self.ring.completion().is_empty() {
            return Ok(Vec::new());
        }
        self.reap()
    }

    /// Accounts for the completions the ring holds: the buffers they finish, or the first
    /// failure. Resubmits the rest of short writes.
    fn reap(&mut self) -> io::Result<Vec<(usize, B)>> {
        let cqes: Vec<(usize, i32, u32)> = self.ring.completion().map(|c| (c.user_data() as usize, c.result(), c.flags())).collect();
        let mut done = Vec::new();
        // Every completion of the batch is accounted for before an error is returned:
        // a slot left held after its last completion was reaped would make `Drop` wait
        // forever.
        let mut error = None;
        for (slot, res, flags) in cqes {
            self.complete(slot, res, flags);
            let f = self.slots[slot].as_ref().expect("held");
            if f.settled() && (f.written() || f.failed.is_some()) {
                let f = self.slots[slot].take().expect("held");
                match f.failed {
                    Some(e) => {
                        error.get_or_insert(e);
                        self.failed.push(f.buf);
                    }
                    None => {
                        self.iov_spare.push(f.iov);
                        done.push((f.conn, f.buf));
                    }
                }
            }
        }
        if let Some(e) = error {
            // Written or not, these buffers are the owner's again: kept with the failed
            // ones for `release_all`.
            self.failed.extend(done.into_iter().map(|(_, b)| b));
            let _ = self.ring.submit();
            return Err(e);
        }
        self.ring.submit()?;
        Ok(done)
    }
}

/// The ring's descriptor: readable when completions wait to be reaped
/// ([`SendRing::reap_ready`]).
impl<B> AsFd for SendRing<B> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl<B> SendRing<B> {
    /// Cancels what is still being written, waits until the kernel has let go of every
    /// buffer (every send completed, every zero-copy notification in) and returns them all,
    /// written, cancelled or failed: a sender whose connection failed gets its buffers
    /// back. If the ring itself fails, the buffers it still holds are leaked rather than
    /// handed back while the kernel might still read them.
    pub fn release_all(&mut self) -> Vec<B> {
        const CANCEL: u64 = 1 << 63;
        let mut back = std::mem::take(&mut self.failed);
        for (slot, f) in self.slots.iter().enumerate() {
            if f.as_ref().is_some_and(|f| f.op) {
                let sqe = opcode::AsyncCancel::new(slot as u64).build().user_data(CANCEL | slot as u64);
                // SAFETY: a cancel carries no buffer.
                let _ = unsafe { self.ring.submission().push(&sqe) };
            }
        }
        for f in &mut self.slots {
            if f.as_ref().is_some_and(InFlight::settled) {
                back.extend(f.take().map(|f| f.buf));
            }
        }
        for w in &mut self.writing {
            *w = None;
        }
        while self.slots.iter().any(Option::is_some) {
            if self.ring.submit_and_wait(1).is_err() {
                for f in &mut self.slots {
                    if let Some(f) = f.take() {
                        std::mem::forget(f);
                    }
                }
                return back;
            }
            let cqes: Vec<(u64, u32)> = self.ring.completion().map(|c| (c.user_data(), c.flags())).collect();
            for (ud, flags) in cqes {
                let slot = ud as usize;
                if ud & CANCEL != 0 {
                    continue;
                }
                if let Some(f) = self.slots.get_mut(slot).and_then(Option::as_mut) {
                    if cqueue::notif(flags) {
                        f.notifs -= 1;
                    } else {
                        f.op = false;
                        if cqueue::more(flags) {
                            f.notifs += 1;
                        }
                    }
                    if f.settled() {
                        back.extend(self.slots[slot].take().map(|f| f.buf));
                    }
                }
            }
        }
        back
    }
}

impl<B> Drop for SendRing<B> {
    /// Cancels what is still being written and waits until the kernel has let go of every
    /// buffer before they are freed ([`SendRing::release_all`]).
    fn drop(&mut self) {
        drop(self.release_all());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[derive(Debug)]
    struct Owned(Vec<Vec<u8>>);
    // SAFETY: the ranges are the inner vectors' heap buffers, which moving `Owned` does not
    // move, and nothing writes them while the ring holds the value.
    unsafe impl SendBuf for Owned {
        fn for_each_slice(&self, f: &mut dyn FnMut(&[u8])) {
            self.0.iter().for_each(|v| f(v));
        }
    }

    #[test]
    fn writes_in_order_across_connections_with_short_writes() {
        let (a1, mut b1) = UnixStream::pair().unwrap();
        let (a2, mut b2) = UnixStream::pair().unwrap();
        let mut ring = match SendRing::<Owned>::new(8, vec![a1.try_clone().unwrap().into(), a2.try_clone().unwrap().into()]) {
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
        let ours: Vec<OwnedFd> = pairs.iter().map(|(a, _)| a.try_clone().unwrap().into()).collect();
        let Ok(mut ring) = SendRing::<Owned>::new(8, ours) else { return };
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
        let Ok(mut ring) = SendRing::<Owned>::new(4, vec![a1.into(), a2.into()]) else { return };
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
    fn zero_copy_sends_arrive_whole_and_wait_for_their_notifications() {
        let (a, mut b) = crate::testutil::tcp_pair();
        let mut ring = match SendRing::<Owned>::with_zero_copy(8, vec![a.try_clone().unwrap().into()], true) {
            Ok(r) => r,
            Err(e) => return crate::report_skip(&format!("io_uring unavailable: {e}")),
        };
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let expect = big.len() * 3;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        for round in 0..3u8 {
            match ring.submit(0, Owned(vec![vec![round; 7], big[7..].to_vec()])) {
                Ok(()) => {}
                Err((e, _)) => return crate::report_skip(&format!("SENDMSG_ZC not accepted: {e}")),
            }
            match ring.wait() {
                Ok(done) => assert_eq!(done.len(), 1),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return crate::report_skip(&format!("SENDMSG_ZC unsupported here: {e}"));
                }
                Err(e) => panic!("{e}"),
            }
        }
        let zc = ring.zero_copy_stats();
        assert!(zc.notifications >= 3, "a notification per send at least: {zc:?}");
        drop(ring);
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expect);
        for round in 0..3 {
            let part = &got[round * big.len()..(round + 1) * big.len()];
            assert_eq!(&part[..7], &[round as u8; 7]);
            assert!(part[7..] == big[7..]);
        }
    }

    #[test]
    fn a_closed_peer_is_an_error_and_drop_is_clean() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let Ok(mut ring) = SendRing::<Owned>::new(4, vec![a.into()]) else { return };
        ring.submit(0, Owned(vec![vec![1; 100]])).unwrap();
        let e = ring.wait().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    /// A failed send's buffer and one stuck behind a peer that does not read both come
    /// back from `release_all`, and the ring is empty afterwards.
    #[test]
    fn release_all_gives_back_failed_and_stuck_buffers() {
        let (a1, b1) = UnixStream::pair().unwrap();
        let (a2, _b2) = UnixStream::pair().unwrap();
        drop(b1);
        let mut ring = match SendRing::<Owned>::new(4, vec![a1.into(), a2.into()]) {
            Ok(r) => r,
            Err(e) => return crate::report_skip(&format!("io_uring unavailable: {e}")),
        };
        ring.submit(0, Owned(vec![vec![1; 100]])).unwrap();
        // Far more than the socket buffer: the peer never reads, so this stays in flight.
        ring.submit(1, Owned(vec![vec![2; 8 << 20]])).unwrap();
        assert_eq!(ring.wait().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert!(ring.any_busy(), "the stuck send is still in flight");
        let back = ring.release_all();
        assert_eq!(back.len(), 2, "both buffers come back");
        assert!(!ring.any_busy());
    }
}
