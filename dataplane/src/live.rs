//! Live per-worker counters: each worker (or receiving lane) of a session adds to its own
//! cache line once per chunk or frame with relaxed atomics (no lock, no allocation), and
//! ferryd's `/metrics` and `ferryctl status` read them while sessions run. Every session
//! has counters of its own ([`session`]), so concurrent sessions never count into one
//! slot; when a session ends, its counts fold into the process's per-worker totals. The
//! per-session figures (histograms, session totals) are folded in when a session ends, in
//! [`crate::daemon`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Slots per role; workers and lanes beyond share slots modulo this (their sums stay right).
pub const SLOTS: usize = 64;

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Send,
    Recv,
    MigrateOut,
    MigrateIn,
    /// Stream mode under ferryd, source: QEMU's stream carried to the destination.
    StreamOut,
    /// Stream mode under ferryd, destination: the channels forwarded to QEMU.
    StreamIn,
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Send, Role::Recv, Role::MigrateOut, Role::MigrateIn, Role::StreamOut, Role::StreamIn];

    pub fn name(self) -> &'static str {
        match self {
            Role::Send => "send",
            Role::Recv => "recv",
            Role::MigrateOut => "migrate_out",
            Role::MigrateIn => "migrate_in",
            Role::StreamOut => "stream_out",
            Role::StreamIn => "stream_in",
        }
    }
}

/// One worker's counters, alone on a cache line so workers never share one.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct Counters {
    pub region_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub frames: AtomicU64,
    pub zero_pages: AtomicU64,
}

/// A snapshot of one worker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub region_bytes: u64,
    pub wire_bytes: u64,
    pub frames: u64,
    pub zero_pages: u64,
}

impl Counters {
    pub fn add(&self, region_bytes: u64, wire_bytes: u64, frames: u64, zero_pages: u64) {
        self.region_bytes.fetch_add(region_bytes, Ordering::Relaxed);
        self.wire_bytes.fetch_add(wire_bytes, Ordering::Relaxed);
        self.frames.fetch_add(frames, Ordering::Relaxed);
        if zero_pages > 0 {
            self.zero_pages.fetch_add(zero_pages, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            region_bytes: self.region_bytes.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
        }
    }
}

/// Every role's worker slots in this process.
#[derive(Debug)]
pub struct Live {
    slots: [[Counters; SLOTS]; Role::ALL.len()],
}

static LIVE: Live = Live { slots: [const { [const { Counters::new() }; SLOTS] }; Role::ALL.len()] };

impl Counters {
    const fn new() -> Counters {
        Counters {
            region_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
        }
    }
}

impl Snapshot {
    fn add(&mut self, o: Snapshot) {
        self.region_bytes += o.region_bytes;
        self.wire_bytes += o.wire_bytes;
        self.frames += o.frames;
        self.zero_pages += o.zero_pages;
    }
}

/// The counters of one running session, one per worker (sender) or lane (receiver), and
/// where it stands: its size, its round and what that round is to move.
#[derive(Debug)]
pub struct SessionCounters {
    pub role: Role,
    pub id: u64,
    counters: Box<[Counters]>,
    started: std::time::Instant,
    /// Region or guest memory bytes; 0 until known.
    size: AtomicU64,
    /// The round running now; `u32::MAX` before the first or where rounds are not known.
    round: AtomicU32,
    /// Region bytes the round is to move; 0 when not known.
    round_total: AtomicU64,
    /// The session's region bytes when the round began.
    round_base: AtomicU64,
}

/// Where a running session stands, for `ferryctl status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub role: String,
    pub session: String,
    pub seconds: f64,
    /// Region or guest memory bytes (0 until known).
    pub size_bytes: u64,
    pub round: Option<u32>,
    /// Region bytes handled over the whole session.
    pub bytes: u64,
    /// Of them, this round's, and what the round is to move (when known).
    pub round_bytes: u64,
    pub round_total_bytes: Option<u64>,
    /// Region bytes per second over the whole session.
    pub bytes_per_second: f64,
    /// This round's remaining bytes at that rate, when the round's total is known.
    pub eta_seconds: Option<f64>,
}

impl SessionCounters {
    fn bytes(&self) -> u64 {
        self.counters.iter().map(|c| c.region_bytes.load(Ordering::Relaxed)).sum()
    }

    fn progress(&self) -> Progress {
        let seconds = self.started.elapsed().as_secs_f64();
        let bytes = self.bytes();
        let round = Some(self.round.load(Ordering::Relaxed)).filter(|&r| r != u32::MAX);
        let round_bytes = bytes.saturating_sub(self.round_base.load(Ordering::Relaxed));
        let total = Some(self.round_total.load(Ordering::Relaxed)).filter(|&t| t > 0);
        let rate = if seconds > 0.0 { bytes as f64 / seconds } else { 0.0 };
        Progress {
            role: self.role.name().into(),
            session: format!("{:016x}", self.id),
            seconds,
            size_bytes: self.size.load(Ordering::Relaxed),
            round,
            bytes,
            round_bytes,
            round_total_bytes: total,
            bytes_per_second: rate,
            eta_seconds: total.filter(|_| rate > 0.0).map(|t| t.saturating_sub(round_bytes) as f64 / rate),
        }
    }
}

/// The sessions running now. A session leaves it, and its counts join the process's
/// totals, under this lock: a reader never sees them in both places, or in neither.
static SESSIONS: Mutex<Vec<Arc<SessionCounters>>> = Mutex::new(Vec::new());

fn sessions_lock() -> std::sync::MutexGuard<'static, Vec<Arc<SessionCounters>>> {
    SESSIONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A session's counters, listed while it lives; dropped, its counts fold into the totals.
/// Also what the session has said once ([`Session::note`]).
#[derive(Debug)]
pub struct Session {
    c: Arc<SessionCounters>,
    noted: Mutex<Vec<String>>,
}

/// Counters for session `id` in `role` with `n` workers or lanes.
pub fn session(role: Role, id: u64, n: usize) -> Session {
    let c = Arc::new(SessionCounters {
        role,
        id,
        counters: (0..n.max(1)).map(|_| Counters::new()).collect(),
        started: std::time::Instant::now(),
        size: AtomicU64::new(0),
        round: AtomicU32::new(u32::MAX),
        round_total: AtomicU64::new(0),
        round_base: AtomicU64::new(0),
    });
    sessions_lock().push(c.clone());
    Session { c, noted: Mutex::new(Vec::new()) }
}

/// A receiving session of `size` region bytes over `n` lanes or pollers: a one-shot
/// receive is one round of the whole region; a migration's rounds are the source's to
/// know.
pub fn receiver(role: Role, id: u64, n: usize, size: u64) -> Session {
    let s = session(role, id, n);
    s.set_size(size);
    if role == Role::Recv {
        s.begin_round(0, Some(size));
    }
    s
}

impl Session {
    /// Logs `msg` (a warning, or info when `warn` is false) once per session: facts every
    /// worker meets, such as a hugepage fallback, are said once, and again by the next
    /// session.
    pub fn note(&self, warn: bool, msg: &str) {
        let mut noted = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        if noted.iter().any(|n| n == msg) {
            return;
        }
        noted.push(msg.to_string());
        let level = if warn { log::Level::Warn } else { log::Level::Info };
        log::log!(level, "session {:#x}: {msg}", self.c.id);
    }

    /// The region's (or guest memory's) size, once known.
    pub fn set_size(&self, bytes: u64) {
        self.c.size.store(bytes, Ordering::Relaxed);
    }

    /// Round `round` begins, to move `bytes` of region (when known).
    pub fn begin_round(&self, round: u32, bytes: Option<u64>) {
        self.c.round_base.store(self.c.bytes(), Ordering::Relaxed);
        self.c.round_total.store(bytes.unwrap_or(0), Ordering::Relaxed);
        self.c.round.store(round, Ordering::Relaxed);
    }

    /// Worker (or lane) `w`'s counters.
    pub fn worker(&self, w: usize) -> WorkerCounters {
        WorkerCounters { c: self.c.clone(), w: w % self.c.counters.len() }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut all = sessions_lock();
        all.retain(|s| !Arc::ptr_eq(s, &self.c));
        for (w, c) in self.c.counters.iter().enumerate() {
            let s = c.snapshot();
            LIVE.slots[self.c.role as usize][w % SLOTS].add(s.region_bytes, s.wire_bytes, s.frames, s.zero_pages);
        }
    }
}

/// One worker's counters in its session.
#[derive(Debug, Clone)]
pub struct WorkerCounters {
    c: Arc<SessionCounters>,
    w: usize,
}

impl WorkerCounters {
    pub fn add(&self, region_bytes: u64, wire_bytes: u64, frames: u64, zero_pages: u64) {
        self.c.counters[self.w].add(region_bytes, wire_bytes, frames, zero_pages);
    }
}

/// Per worker, what every session (ended or running) counted: (role, worker, counters),
/// for the workers that have counted anything.
pub fn snapshot() -> Vec<(Role, usize, Snapshot)> {
    let running = sessions_lock();
    let mut out = Vec::new();
    for role in Role::ALL {
        for (w, c) in LIVE.slots[role as usize].iter().enumerate() {
            let mut s = c.snapshot();
            for r in running.iter().filter(|r| r.role == role) {
                for rc in r.counters.iter().skip(w).step_by(SLOTS) {
                    s.add(rc.snapshot());
                }
            }
            if s.frames > 0 {
                out.push((role, w, s));
            }
        }
    }
    out
}

/// The running sessions' counters: (role, session id, worker, counters).
pub fn sessions() -> Vec<(Role, u64, usize, Snapshot)> {
    let running = sessions_lock();
    running.iter().flat_map(|r| r.counters.iter().enumerate().map(|(w, c)| (r.role, r.id, w, c.snapshot()))).collect()
}

/// Where each running session stands.
pub fn progress() -> Vec<Progress> {
    sessions_lock().iter().map(|s| s.progress()).collect()
}

/// Runs `f` while another thread calls `tick` about every `every`, and once more after
/// `f` returns: a display's refresh (a progress bar, progress events), never something
/// `f` waits on.
pub fn ticking<T>(every: std::time::Duration, tick: impl Fn() + Sync, f: impl FnOnce() -> T) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let ticker = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                tick();
                std::thread::park_timeout(every);
            }
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        ticker.thread().unpark();
        let _ = ticker.join();
        tick();
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(role: Role, w: usize) -> Snapshot {
        snapshot().into_iter().find(|(r, x, _)| *r == role && *x == w).map_or(Snapshot::default(), |(_, _, s)| s)
    }

    /// Two sessions at once count apart, each listed while it runs; the totals include
    /// both, before and after they end.
    #[test]
    fn sessions_count_apart_and_fold_into_the_totals() {
        assert_eq!(std::mem::align_of::<Counters>(), 64);
        let before = total(Role::MigrateIn, SLOTS - 1);
        let (a, b) = (session(Role::MigrateIn, 0xa, SLOTS), session(Role::MigrateIn, 0xb, SLOTS));
        a.worker(SLOTS - 1).add(4096, 4128, 1, 0);
        b.worker(SLOTS - 1).add(8192, 0, 2, 1);
        let mine: Vec<_> = sessions().into_iter().filter(|(_, id, w, _)| (*id == 0xa || *id == 0xb) && *w == SLOTS - 1).collect();
        assert_eq!(mine.len(), 2);
        assert!(mine.iter().any(|(_, id, _, s)| *id == 0xa && s.region_bytes == 4096 && s.frames == 1));
        assert!(mine.iter().any(|(_, id, _, s)| *id == 0xb && s.region_bytes == 8192 && s.frames == 2));
        let running = total(Role::MigrateIn, SLOTS - 1);
        assert_eq!(running.region_bytes - before.region_bytes, 4096 + 8192);
        let p = progress().into_iter().find(|p| p.session == format!("{:016x}", 0xa)).unwrap();
        assert_eq!((p.bytes, p.round, p.round_total_bytes), (4096, None, None));
        a.set_size(1 << 20);
        a.begin_round(2, Some(8192));
        a.worker(0).add(4096, 0, 1, 0);
        let p = progress().into_iter().find(|p| p.session == format!("{:016x}", 0xa)).unwrap();
        assert_eq!((p.size_bytes, p.round, p.round_bytes, p.round_total_bytes), (1 << 20, Some(2), 4096, Some(8192)));
        assert!(p.eta_seconds.is_some_and(|e| e >= 0.0) && p.bytes_per_second > 0.0, "{p:?}");
        drop(a);
        drop(b);
        assert!(!sessions().iter().any(|(_, id, _, _)| *id == 0xa || *id == 0xb), "ended sessions are not listed");
        let after = total(Role::MigrateIn, SLOTS - 1);
        assert_eq!(after.region_bytes - before.region_bytes, 4096 + 8192, "their counts stay in the totals");
        assert_eq!(after.frames - before.frames, 3);
    }
}
