//! What a listener may spend on clients it does not know yet: a bounded number of slots for
//! clients served at once, a deadline for a whole request (not per read), a pause when the
//! process runs out of descriptors instead of a spinning accept loop, and warnings that a
//! remote peer cannot turn into a flood of log lines.

use std::io::{self, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A fixed number of slots; a client holds one while it is served.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: usize,
}

/// One taken slot, given back when dropped.
#[derive(Debug)]
pub struct Slot<'a>(&'a Slots);

impl Slots {
    pub fn new(max: usize) -> Slots {
        Slots { used: AtomicUsize::new(0), max: max.max(1) }
    }

    /// A slot, or `None` when all are taken.
    pub fn take(&self) -> Option<Slot<'_>> {
        // AcqRel pairs with the release in `Slot::drop`: a slot given back is seen here.
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1)).ok().map(|_| Slot(self))
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::Release);
    }
}

/// A warning logged at most once per interval, with the count of those held back, for
/// anything a remote peer can trigger over and over.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl RateLimited {
    pub const fn new(every: Duration) -> RateLimited {
        RateLimited { every, last: Mutex::new(None), held: AtomicU64::new(0) }
    }

    pub fn warn(&self, msg: std::fmt::Arguments<'_>) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.every) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        match self.held.swap(0, Ordering::Relaxed) {
            0 => log::warn!("{msg}"),
            n => log::warn!("{msg} ({n} more like it in the last {} s)", self.every.as_secs()),
        }
    }
}

/// What an accept loop does when `accept` fails: out of descriptors (EMFILE, ENFILE) or
/// memory, it waits a little so that the loop does not spin, and says so, rate-limited.
pub fn accept_failed(e: &io::Error, what: &str, log: &RateLimited) {
    let starved = matches!(e.raw_os_error(), Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM));
    if starved {
        log.warn(format_args!("{what}: cannot accept a connection ({e}); waiting for descriptors to be freed"));
        std::thread::sleep(Duration::from_millis(100));
    } else {
        log.warn(format_args!("{what}: accept failed: {e}"));
    }
}

/// The errno values `accept_failed` tells apart.
mod libc_errno {
    pub const EMFILE: i32 = nix::libc::EMFILE;
    pub const ENFILE: i32 = nix::libc::ENFILE;
    pub const ENOBUFS: i32 = nix::libc::ENOBUFS;
    pub const ENOMEM: i32 = nix::libc::ENOMEM;
}

/// A stream with a deadline for everything read through it, and a cap on how much may be
/// read: each read waits at most until the deadline, so a peer that sends a byte now and
/// then cannot hold it longer than that in total.
#[derive(Debug)]
pub struct Deadline<'s> {
    s: &'s std::net::TcpStream,
    until: Instant,
    left: u64,
    limit: u64,
}

impl<'s> Deadline<'s> {
    pub fn new(s: &'s std::net::TcpStream, timeout: Duration, max_bytes: u64) -> Deadline<'s> {
        Deadline { s, until: Instant::now() + timeout, left: max_bytes, limit: max_bytes }
    }

    fn remaining(&self) -> io::Result<Duration> {
        let d = self.until.saturating_duration_since(Instant::now());
        if d.is_zero() { Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed")) } else { Ok(d) }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {} bytes before authenticating", self.limit)));
        }
        self.s.set_read_timeout(Some(self.remaining()?))?;
        let n = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let got = (&*self.s).read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

impl io::Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.set_write_timeout(Some(self.remaining()?))?;
        (&*self.s).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let s = Slots::new(2);
        let a = s.take().unwrap();
        let b = s.take().unwrap();
        assert!(s.take().is_none());
        drop(a);
        assert_eq!(s.in_use(), 1);
        let _c = s.take().unwrap();
        drop(b);
        assert_eq!(s.in_use(), 1);
    }

    /// A peer that sends a byte now and then is cut off at the deadline, not at each read.
    #[test]
    fn deadline_covers_the_whole_read() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let t = std::thread::spawn(move || {
            for _ in 0..20 {
                if io::Write::write_all(&mut c, b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start = Instant::now();
        let mut d = Deadline::new(&s, Duration::from_millis(450), 1 << 20);
        let mut buf = [0u8; 64];
        let e = d.read_exact(&mut buf).unwrap_err();
        assert!(matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{e}");
        assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
        drop(s);
        t.join().unwrap();
        // And a byte budget.
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        io::Write::write_all(&mut c, &[0u8; 100]).unwrap();
        let mut d = Deadline::new(&s, Duration::from_secs(5), 10);
        let mut buf = [0u8; 20];
        assert!(d.read_exact(&mut buf).is_err());
    }
}
