//! Live per-worker counters: each worker (or receiving lane) of a session adds to its own
//! cache line once per chunk or frame with relaxed atomics (no lock, no allocation), and
//! ferryd's `/metrics` and `ferryctl status` read them while sessions run. Every session
//! has counters of its own ([`session`]), so concurrent sessions never count into one
//! slot; when a session ends, its counts fold into the process's per-worker totals. The
//! per-session figures (histograms, session totals) are folded in when a session ends, in
//! [`crate::daemon`].

use std::sync::atomic::{AtomicU64, Ordering};
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
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Send, Role::Recv, Role::MigrateOut, Role::MigrateIn];

    pub fn name(self) -> &'static str {
        match self {
            Role::Send => "send",
            Role::Recv => "recv",
            Role::MigrateOut => "migrate_out",
            Role::MigrateIn => "migrate_in",
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
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
    slots: [[Counters; SLOTS]; 4],
}

static LIVE: Live = Live { slots: [const { [const { Counters::new() }; SLOTS] }; 4] };

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

/// The counters of one running session, one per worker (sender) or lane (receiver).
#[derive(Debug)]
pub struct SessionCounters {
    pub role: Role,
    pub id: u64,
    counters: Box<[Counters]>,
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
    let c = Arc::new(SessionCounters { role, id, counters: (0..n.max(1)).map(|_| Counters::new()).collect() });
    sessions_lock().push(c.clone());
    Session { c, noted: Mutex::new(Vec::new()) }
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
        drop(a);
        drop(b);
        assert!(!sessions().iter().any(|(_, id, _, _)| *id == 0xa || *id == 0xb), "ended sessions are not listed");
        let after = total(Role::MigrateIn, SLOTS - 1);
        assert_eq!(after.region_bytes - before.region_bytes, 4096 + 8192, "their counts stay in the totals");
        assert_eq!(after.frames - before.frames, 3);
    }
}
