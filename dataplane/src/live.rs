//! Live per-worker counters: each worker (or receiving lane) adds to its own cache line
//! once per chunk or frame with relaxed atomics (no lock, no allocation), and ferryd's
//! `/metrics` and `ferryctl status` read them while sessions run. The per-session figures
//! (histograms, session totals) are folded in when a session ends, in [`crate::daemon`].

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Worker `w`'s counters for `role`.
pub fn worker(role: Role, w: usize) -> &'static Counters {
    &LIVE.slots[role as usize][w % SLOTS]
}

/// The workers that have counted anything: (role, worker, counters).
pub fn snapshot() -> Vec<(Role, usize, Snapshot)> {
    let mut out = Vec::new();
    for role in Role::ALL {
        for (w, c) in LIVE.slots[role as usize].iter().enumerate() {
            let s = c.snapshot();
            if s.frames > 0 {
                out.push((role, w, s));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_per_worker_and_live() {
        assert_eq!(std::mem::align_of::<Counters>(), 64);
        let before = worker(Role::MigrateIn, SLOTS - 1).snapshot();
        worker(Role::MigrateIn, SLOTS - 1).add(4096, 4128, 1, 0);
        worker(Role::MigrateIn, 2 * SLOTS - 1).add(0, 32, 1, 1);
        let after = worker(Role::MigrateIn, SLOTS - 1).snapshot();
        assert_eq!(after.region_bytes - before.region_bytes, 4096);
        assert_eq!(after.frames - before.frames, 2, "workers past the slots share them");
        assert!(snapshot().iter().any(|(r, w, _)| *r == Role::MigrateIn && *w == SLOTS - 1));
    }
}
