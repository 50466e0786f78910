//! The source side of a migration: the control connection and the lanes stay open from
//! round to round; each round runs one pinned thread per worker over the dirty windows,
//! which the control thread finds in the bitmap and hands over through a bounded queue.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use zerocopy::IntoBytes;

use super::{MigrationReport, PageHashes, ROUND_IDLE_TIMEOUT, RoundCounts, RoundReport, Verify};
use crate::auth::{Auth, client_handshake};
use crate::conn::{Ctl, SessionError, write_frame};
use crate::digest::Digest;
use crate::encode::Encoder;
use crate::engine::send::{Batch, connect, connect_data};
use crate::engine::{PAGE, cpu_seconds, pin};
use crate::plan::{Plan, Transport};
use crate::wire::{self, CONTROL_LANE, Kind, Layout, features};

/// Where to migrate and within which limits.
#[derive(Debug, Clone)]
pub struct SourceOptions<'a> {
    pub to: String,
    pub auth: Auth,
    pub plan: &'a Plan,
    pub downtime_budget: Duration,
    pub max_rounds: u32,
    /// Region bytes per second, at most (a token bucket with one chunk of burst).
    pub rate_limit: Option<u64>,
    pub verify: Verify,
}

struct Lane {
    s: TcpStream,
    tx: crate::session::seal::Seal,
    frames: u64,
    bytes: u64,
    pages: u64,
}

/// A worker's own state, kept across rounds: its lanes, its zstd context (and the
/// adaptive policy's measurements) and its arena: one chunk for the snapshot of the
/// pages being sent, one for compressed payloads.
struct Worker {
    cpu: u32,
    live: &'static crate::live::Counters,
    lanes: Vec<Lane>,
    enc: Encoder,
    arena: hw::memmap::Arena,
}

/// Spaces writes so that the round's region bytes never run ahead of `rate` per second.
struct Pacer {
    start: Instant,
    rate: Option<f64>,
    sent: AtomicU64,
}

impl Pacer {
    fn pace(&self, bytes: u64) {
        if let Some(rate) = self.rate.filter(|r| *r > 0.0) {
            let total = self.sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
            // A rate checked positive gives a finite, non-negative delay.
            let Ok(after) = Duration::try_from_secs_f64(total as f64 / rate) else { return };
            let due = self.start + after;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
}

/// The rate limit in bytes per second for `mbit` megabits per second of guest memory: at
/// least 1 Mbit/s, at most 100 Tbit/s.
pub fn rate_limit_bytes(mbit: u64) -> Result<u64, String> {
    const MAX_MBIT: u64 = 100_000_000;
    if mbit == 0 || mbit > MAX_MBIT {
        return Err(format!("rate_limit_mbit {mbit}: give 1 to {MAX_MBIT} Mbit/s, or leave it out for no limit"));
    }
    Ok(mbit * 1_000_000 / 8)
}

/// One region of guest memory (a memory file of the VMM's) and what ferry keeps for it.
struct Region {
    /// The memory, read with `pread`: no page faults, and holes (never-touched pages of a
    /// memfd) read as zeros without being allocated.
    memory: File,
    /// `memory` has a file offset of its own: hole probes may move it.
    probe_holes: bool,
    size: u64,
    /// Where this region's words start in the dirty bitmap, and how many it has.
    word: usize,
    words: usize,
    /// Every page's hash as last sent.
    sent: PageHashes,
}

/// A migration in progress, from the source's side.
pub struct Source<'a> {
    opts: SourceOptions<'a>,
    regions: Vec<Region>,
    /// All regions together.
    size: u64,
    chunk: usize,
    ctl: Ctl,
    workers: Vec<Worker>,
    rounds: Vec<RoundReport>,
    /// When the previous round started: the dirty bitmap of the next one covers the time since.
    last_start: Option<Instant>,
    /// [`Verify::Full`]: seconds to digest a GiB of guest memory on one CPU, measured at
    /// connect.
    digest_seconds_per_gib: f64,
    t0: Instant,
    cpu0: f64,
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("to", &self.opts.to).field("size", &self.size).field("rounds", &self.rounds.len()).finish()
    }
}

impl<'a> Source<'a> {
    /// Opens the session to a destination `ferryd` (`migrate_in`) for the guest memory in
    /// `memory`, which must be a memfd, tmpfs or hugetlbfs file. The memory is only read.
    pub fn connect(memory: &File, opts: SourceOptions<'a>) -> Result<Source<'a>, SessionError> {
        Source::connect_regions(&[memory], opts)
    }

    /// [`Source::connect`] for guest memory in several memory files (a VMM's memory slots
    /// or NUMA nodes), each a region of its own.
    pub fn connect_regions(memory: &[&File], opts: SourceOptions<'a>) -> Result<Source<'a>, SessionError> {
        if memory.is_empty() || memory.len() > wire::MAX_REGIONS {
            return Err(SessionError::Protocol(format!("{} memory regions (1..={} allowed)", memory.len(), wire::MAX_REGIONS)));
        }
        // What the regions claim is checked before ferry allocates a page table for them: a
        // sparse memfd may claim any size.
        let mut claimed = 0u64;
        for (i, m) in memory.iter().enumerate() {
            let len = m.metadata().map_err(|source| SessionError::Region { path: format!("guest memory region {i}"), source })?.len();
            claimed = claimed.saturating_add(len);
        }
        crate::session::limits::check_region(claimed, &opts.plan.limits, crate::session::limits::Backing::Source)?;
        let mut regions = Vec::with_capacity(memory.len());
        let mut word = 0;
        for (i, m) in memory.iter().enumerate() {
            let r = open_region(i, m, word)?;
            word += r.words;
            regions.push(r);
        }
        let size: u64 = regions.iter().map(|r| r.size).sum();
        let plan = opts.plan;
        if plan.transport == Transport::Rdma {
            log::info!("migration lanes run over TCP: RDMA migration is not built yet");
        }
        let chunk = plan.chunk_size_bytes as usize;
        let t0 = Instant::now();
        let cpu0 = cpu_seconds();
        let mut s = connect(&opts.to)?;
        let (agreed, keys) = client_handshake(&mut s, &opts.auth, CONTROL_LANE, 0, features::MIGRATE)?;
        let mut ctl = Ctl::new(s, keys);
        if agreed & features::MIGRATE == 0 {
            ctl.error("this is a migration; the receiver takes one-shot transfers");
            return Err(SessionError::Protocol(format!(
                "{} is a one-shot receiver (`ferryctl recv`), not a migration destination: start one with ferryd's migrate_in",
                opts.to
            )));
        }
        ctl.s.set_read_timeout(Some(ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
        let per_worker = plan.tcp.connections_per_worker as usize;
        let n_workers = plan.worker_cpus.len();
        let layout = Layout { page_size: PAGE as u32, max_chunk: chunk as u32, regions: regions.iter().map(|r| r.size).collect() };
        let lanes = n_workers * per_worker;
        ctl.send(Kind::Session, &wire::session_payload(&layout, lanes as u16, wire::DataTransport::Tcp))?;
        let mut buf = Vec::new();
        ctl.expect(Kind::SessionOk, &mut buf)?;
        let session = wire::parse::<wire::SessionOk>(Kind::SessionOk, &buf)?.session.get();
        let mut workers = Vec::with_capacity(n_workers);
        for (w, &cpu) in plan.worker_cpus.iter().enumerate() {
            let mut lanes = Vec::with_capacity(per_worker);
            for c in 0..per_worker {
                let mut s = connect_data(&opts.to, plan)?;
                let (_, keys) = client_handshake(&mut s, &opts.auth, (w * per_worker + c) as u16, session, 0)?;
                lanes.push(Lane { s, tx: keys.tx, frames: 0, bytes: 0, pages: 0 });
            }
            let arena = crate::engine::arena(plan, 2 * chunk)?;
            let live = crate::live::worker(crate::live::Role::MigrateOut, w);
            workers.push(Worker { cpu, live, lanes, enc: Encoder::new(plan.compression, chunk), arena });
        }
        // The paused source is digested during the last round; that bounds the downtime
        // from below, so the estimate needs its speed.
        let mut digest_seconds_per_gib = 0.0;
        if opts.verify == Verify::Full {
            let r = &regions[0];
            let sample = r.size.min(16 << 20);
            let t = Instant::now();
            let d = Digest::of_file(0, PAGE, &r.memory, sample, 1, r.probe_holes)
                .map_err(|source| SessionError::Region { path: "guest memory region 0".into(), source })?;
            std::hint::black_box(d);
            digest_seconds_per_gib = t.elapsed().as_secs_f64() / (sample as f64 / (1u64 << 30) as f64);
        }
        log::info!(
            "migration session {session:#x}: {size} bytes in {} region(s) to {} over {lanes} lane(s) from {n_workers} worker(s)",
            regions.len(),
            opts.to
        );
        Ok(Source { opts, regions, size, chunk, ctl, workers, rounds: Vec::new(), last_start: None, digest_seconds_per_gib, t0, cpu0 })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn lanes(&self) -> usize {
        self.workers.iter().map(|w| w.lanes.len()).sum()
    }

    /// Runs a pre-copy round. Round 0 sends every page whatever `dirty` says; later rounds
    /// the pages `dirty` marks (see [`super::parse_bitmap`]).
    pub fn round(&mut self, dirty: &[u64]) -> Result<RoundReport, SessionError> {
        self.run_round(dirty, false).map(|(r, _)| r)
    }

    /// The stop-and-copy round, once the VMM has paused: the pages `dirty` marks, then the
    /// source's digest ([`Verify`]) against the destination's.
    pub fn finish(mut self, dirty: &[u64]) -> Result<MigrationReport, SessionError> {
        let (last, digest) = self.run_round(dirty, true)?;
        let digest = digest.expect("the last round digests the source");
        let mut rep = MigrationReport {
            role: "source".into(),
            bytes: self.size,
            seconds: self.t0.elapsed().as_secs_f64(),
            downtime_ms: last.seconds * 1e3,
            downtime_budget_ms: self.opts.downtime_budget.as_secs_f64() * 1e3,
            cpu_seconds_per_gib: (cpu_seconds() - self.cpu0) / (self.size as f64 / (1u64 << 30) as f64),
            transport: if self.opts.plan.tcp.io_uring { "tcp (blocking sockets for migration lanes)".into() } else { "sockets".into() },
            compression: self.opts.plan.compression.to_string(),
            lanes: self.lanes() as u32,
            workers: self.workers.len() as u32,
            rate_limit_bytes_per_second: self.opts.rate_limit,
            verify: self.opts.verify,
            digest: digest.hex(),
            digest_match: true,
            ..MigrationReport::default()
        };
        for r in &self.rounds {
            rep.sent_bytes += r.dirty_bytes;
            rep.wire_bytes += r.wire_bytes;
            rep.zero_pages += r.zero_pages;
            rep.compressed_in_bytes += r.compressed_in_bytes;
            rep.compressed_out_bytes += r.compressed_out_bytes;
        }
        rep.rounds = std::mem::take(&mut self.rounds);
        Ok(rep)
    }

    fn run_round(&mut self, dirty: &[u64], last: bool) -> Result<(RoundReport, Option<Digest>), SessionError> {
        let round = self.rounds.len() as u32;
        let start = Instant::now();
        let ppw = (self.chunk / PAGE) as u64;
        let all = round == 0;
        let words: usize = self.regions.iter().map(|r| r.words).sum();
        if !all && dirty.len() != words {
            return Err(SessionError::Protocol(format!(
                "a dirty bitmap of {} words for {} pages in {} region(s) ({words} words)",
                dirty.len(),
                super::pages(self.size),
                self.regions.len()
            )));
        }
        self.check_sizes(round, "start")?;
        let feed = WindowFeed::new(WINDOW_QUEUE);
        let pacer = Pacer { start, rate: self.opts.rate_limit.map(|r| r as f64), sent: AtomicU64::new(0) };
        let regions = &self.regions;
        let (chunk, to) = (self.chunk, self.opts.to.as_str());
        // The VMM is paused during the last round: a full digest may use every CPU.
        let digest_threads = std::thread::available_parallelism().map_or(self.workers.len(), |n| n.get()).max(1);
        let full = last && self.opts.verify == Verify::Full;
        let (results, digest) = std::thread::scope(|s| {
            // The VMM has paused: digest the source beside the last round's lanes.
            let digest = full.then(|| {
                s.spawn(move || {
                    let mut d = Digest::default();
                    for (i, r) in regions.iter().enumerate() {
                        d.combine(Digest::of_file(i as u32, PAGE, &r.memory, r.size, digest_threads, r.probe_holes)?);
                    }
                    Ok::<Digest, std::io::Error>(d)
                })
            });
            let feed = &feed;
            let handles: Vec<_> = self
                .workers
                .iter_mut()
                .map(|w| {
                    let pacer = &pacer;
                    s.spawn(move || {
                        pin(w.cpu);
                        let r = w.run(round, regions, chunk, feed, dirty, all, pacer, to);
                        if r.is_err() {
                            feed.stop.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                })
                .collect();
            // This thread scans the bitmap while the workers send: the windows (chunk-sized,
            // chunk-aligned within their region) that hold a dirty page.
            'scan: for (i, r) in regions.iter().enumerate() {
                let pages = super::pages(r.size);
                let bits = if all { &[][..] } else { &dirty[r.word..r.word + r.words] };
                for w in 0..pages.div_ceil(ppw) {
                    let (first, end) = (w * ppw, ((w + 1) * ppw).min(pages));
                    if (all || (first / 64..end.div_ceil(64)).any(|k| bits[k as usize] & word_mask(k, first, end) != 0))
                        && !feed.push((i as u32, w))
                    {
                        break 'scan;
                    }
                }
            }
            feed.scanned.store(true, Ordering::Release);
            let results: Vec<Result<RoundCounts, SessionError>> =
                handles.into_iter().map(|h| h.join().expect("worker thread panicked")).collect();
            (
                results,
                digest.map(|d| {
                    d.join().expect("digest thread panicked").map_err(|e| SessionError::io("digesting the paused guest memory", e))
                }),
            )
        });
        let mut c = RoundCounts::default();
        for r in results {
            c += r.map_err(|e| self.ctl.reason_for(e))?;
        }
        // A region that shrank while the round read it sent zeros for the pages past its
        // new end (they read as holes): fail before the destination confirms the round.
        self.check_sizes(round, "end")?;
        let end = wire::Round { round: round.into(), last: u32::from(last).into(), pages: c.pages.into() };
        self.ctl.send(Kind::Round, end.as_bytes())?;
        let mut buf = Vec::new();
        self.ctl.expect(Kind::RoundOk, &mut buf)?;
        let ok: wire::RoundOk = wire::parse(Kind::RoundOk, &buf)?;
        if ok.round.get() != round || ok.pages.get() != c.pages {
            return Err(SessionError::Protocol(format!(
                "the destination confirmed round {} with {} pages; round {round} sent {}",
                ok.round.get(),
                ok.pages.get(),
                c.pages
            )));
        }
        let digest = match digest.transpose()? {
            Some(d) => Some(d),
            None if last => Some(self.regions.iter().map(|r| r.sent.fold()).sum()),
            None => None,
        };
        let digest = match digest {
            Some(d) => {
                for w in &mut self.workers {
                    for l in &mut w.lanes {
                        let end = wire::LaneEnd { frames: 0.into(), bytes: 0.into() };
                        write_frame(&mut l.s, &mut l.tx, Kind::LaneEnd, end.as_bytes())?;
                    }
                }
                crate::engine::send::confirm(&mut self.ctl, d, self.size)?;
                Some(d)
            }
            None => None,
        };
        let seconds = start.elapsed().as_secs_f64();
        let dirty_bytes = (c.pages * PAGE as u64).min(self.size);
        let gbps = dirty_bytes as f64 / seconds / 1e9;
        let dirty_rate = self.last_start.filter(|_| round > 0).map(|prev| dirty_bytes as f64 / start.duration_since(prev).as_secs_f64());
        self.last_start = Some(start);
        // The bandwidth for the estimate: this round's, unless it moved too little to
        // measure; then the most recent round that did (round 0 always does).
        let enough = (8 << 20).min(self.size / 2);
        let bw = std::iter::once((dirty_bytes, gbps))
            .chain(self.rounds.iter().rev().map(|r| (r.dirty_bytes, r.gbps)))
            .find(|&(b, _)| b >= enough)
            .map(|(_, g)| g * 1e9);
        let estimate = match (dirty_rate, bw) {
            (Some(rate), Some(bw)) => {
                let next_dirty = (rate * seconds).min(self.size as f64);
                // With a full digest the paused memory is read beside the last round.
                let digest = self.digest_seconds_per_gib * self.size as f64 / (1u64 << 30) as f64 / digest_threads as f64;
                Some((next_dirty / bw).max(digest) * 1e3)
            }
            _ => None,
        };
        let budget = self.opts.downtime_budget.as_secs_f64() * 1e3;
        let report = RoundReport {
            round,
            last,
            dirty_pages: c.pages,
            dirty_bytes,
            zero_pages: c.zero_pages,
            wire_bytes: c.wire_bytes,
            compressed_in_bytes: c.compressed_in,
            compressed_out_bytes: c.compressed_out,
            frames: c.frames,
            seconds,
            gbps,
            dirty_rate_gbps: dirty_rate.map(|r| r / 1e9),
            estimated_downtime_ms: estimate,
            advise_pause: !last && (estimate.is_some_and(|e| e <= budget) || round + 1 >= self.opts.max_rounds),
        };
        log::info!(
            "round {round}{}: {} dirty pages ({:.1} MiB) in {:.3} s = {:.2} GB/s, estimated downtime {}{}",
            if last { " (stop-and-copy)" } else { "" },
            c.pages,
            dirty_bytes as f64 / (1 << 20) as f64,
            seconds,
            gbps,
            estimate.map_or_else(|| "unknown".into(), |e| format!("{e:.0} ms")),
            if report.advise_pause { ": pause now" } else { "" }
        );
        self.rounds.push(report.clone());
        Ok((report, digest))
    }
}

impl Source<'_> {
    /// Every region still has the size it had when the migration began: guest memory that
    /// is resized under a migration cannot be migrated faithfully.
    fn check_sizes(&self, round: u32, when: &str) -> Result<(), SessionError> {
        for (i, r) in self.regions.iter().enumerate() {
            let now =
                r.memory.metadata().map_err(|source| SessionError::Region { path: format!("guest memory region {i}"), source })?.len();
            if now != r.size {
                return Err(SessionError::Protocol(format!(
                    "guest memory region {i} changed size from {} to {now} bytes (seen at the {when} of round {round}): the VMM must not resize guest memory while it migrates; the migration is abandoned and the source guest should resume",
                    r.size
                )));
            }
        }
        Ok(())
    }
}

/// Checks and opens region `i` of the guest memory; its bitmap words start at `word`.
fn open_region(i: usize, memory: &File, word: usize) -> Result<Region, SessionError> {
    let what = if i == 0 { "the guest memory descriptor".to_string() } else { format!("guest memory region {i}") };
    let err = |source| SessionError::Region { path: what.clone(), source };
    if !hw::memmap::is_memory_file(memory).map_err(err)? {
        return Err(SessionError::Protocol(format!(
            "{what} is {}, not a memory file: give a memfd, or a tmpfs or hugetlbfs file",
            hw::memmap::describe(memory)
        )));
    }
    // A description of our own, read-only: the descriptor the VMM passed shares its file
    // offset with the VMM, which the hole probes (lseek SEEK_DATA) would move.
    let (memory, probe_holes) = match File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(memory))) {
        Ok(f) => (f, true),
        Err(e) => {
            log::warn!("cannot reopen {what} through /proc ({e}): every page is read, holes included");
            (memory.try_clone().map_err(err)?, false)
        }
    };
    let size = memory.metadata().map_err(err)?.len();
    if size == 0 {
        return Err(SessionError::Protocol(format!("{what} is empty")));
    }
    let pages = super::pages(size);
    Ok(Region { memory, probe_holes, size, word, words: pages.div_ceil(64) as usize, sent: PageHashes::new(pages)? })
}

/// Windows the feed holds at most: a full queue makes the scanning thread wait for the
/// workers, so a round's work list never grows with the guest.
const WINDOW_QUEUE: usize = 4096;

/// A round's dirty windows, from the control thread that scans the bitmap to the workers
/// that send them: a bounded lock-free queue, so sending starts with the first dirty
/// window found rather than after the whole bitmap has been scanned.
struct WindowFeed {
    queue: ArrayQueue<(u32, u64)>,
    /// The scan is over: once the queue is empty, so is the round.
    scanned: AtomicBool,
    /// A worker failed: the others stop taking windows and the scan stops.
    stop: AtomicBool,
}

impl WindowFeed {
    fn new(capacity: usize) -> WindowFeed {
        WindowFeed { queue: ArrayQueue::new(capacity), scanned: AtomicBool::new(false), stop: AtomicBool::new(false) }
    }

    /// Queues a window, waiting while the queue is full; false once the round is stopped.
    fn push(&self, mut w: (u32, u64)) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            match self.queue.push(w) {
                Ok(()) => return true,
                Err(back) => {
                    w = back;
                    std::thread::yield_now();
                }
            }
        }
    }

    /// The next window, waiting while the scan may still find one; `None` when the round
    /// has no more, or was stopped.
    fn pop(&self) -> Option<(u32, u64)> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(w) = self.queue.pop() {
                return Some(w);
            }
            // Acquire pairs with the scan's release store: every window it queued before
            // is visible to the pop below.
            if self.scanned.load(Ordering::Acquire) {
                return self.queue.pop();
            }
            std::thread::yield_now();
        }
    }
}

/// The bits of bitmap word `i` that fall in pages `first..end`.
fn word_mask(i: u64, first: u64, end: u64) -> u64 {
    let lo = first.saturating_sub(i * 64).min(64);
    let hi = end.saturating_sub(i * 64).min(64);
    if hi <= lo {
        return 0;
    }
    let upto = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upto & !((1u64 << lo) - 1)
}

/// Calls `f(first, end)` for each run of consecutive dirty pages in `first..end`.
fn dirty_runs(dirty: &[u64], first: u64, end: u64, f: &mut impl FnMut(u64, u64)) {
    let mut p = first;
    while p < end {
        let bit = |p: u64| dirty[(p / 64) as usize] >> (p % 64) & 1 == 1;
        if !bit(p) {
            p += 1;
            continue;
        }
        let s = p;
        while p < end && bit(p) {
            p += 1;
        }
        f(s, p);
    }
}

impl Worker {
    /// Sends this worker's share of a round: windows in turn from the feed;
    /// each window's dirty pages are copied into the arena (the guest keeps running),
    /// encoded, and written to the next lane with one `writev`. Ends with ROUND_END on
    /// every lane.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        round: u32,
        regions: &[Region],
        chunk: usize,
        feed: &WindowFeed,
        dirty: &[u64],
        all: bool,
        pacer: &Pacer,
        to: &str,
    ) -> Result<RoundCounts, SessionError> {
        let (snapshot, staging) = self.arena.as_mut_slice().split_at_mut(chunk);
        let staging = &mut staging[..chunk];
        let mut batch = Batch::new(staging);
        let mut c = RoundCounts::default();
        let enc0 = self.enc.stats;
        let mut live_zero = enc0.zero_pages;
        let mut turn = 0;
        let page = PAGE as u64;
        while let Some((region, w)) = feed.pop() {
            let r = &regions[region as usize];
            let (source, size, sent, probe_holes) = (&r.memory, r.size, &r.sent, r.probe_holes);
            let dirty = if all { &[][..] } else { &dirty[r.word..r.word + r.words] };
            let base = w * chunk as u64;
            let (first, end) = (base / page, ((base + chunk as u64).min(size)).div_ceil(page));
            batch.clear();
            batch.base = base as usize;
            let enc = &mut self.enc;
            let mut pages = 0;
            let mut read_err = None;
            let mut send_run = |s: u64, e: u64| {
                let (from, to) = ((s * page) as usize, ((e * page).min(size)) as usize);
                let at = from - base as usize;
                // Memory the guest never touched is a hole in its memfd: a zero frame,
                // without reading or scanning it (one lseek per run).
                if probe_holes && crate::digest::is_hole(source, from as u64, (to - from) as u64) {
                    let len = (to - from) as u64;
                    for i in 0..len.div_ceil(page) {
                        sent.set(s + i, Digest::of_zero_page(region, s + i, (len - i * page).min(page) as usize));
                    }
                    batch.push(wire::Header::data(wire::Encoding::Zero, region, from as u64, len as u32, 0).seal(&[]), &[]);
                    enc.stats.zero_pages += e - s;
                    enc.stats.frames += 1;
                    pages += e - s;
                    return;
                }
                // The guest may be writing these pages: what is sent is this copy, so its
                // checksum and the bytes on the wire agree.
                if let Err(e) = source.read_exact_at(&mut snapshot[at..at + to - from], from as u64) {
                    read_err.get_or_insert(e);
                    return;
                }
                let bytes = &snapshot[at..at + to - from];
                enc.encode::<()>(region, from as u64, PAGE, bytes, &mut |h, p| {
                    // Each page's hash from the bytes this frame carries.
                    let (off, len) = (h.offset.get(), u64::from(h.raw_len.get()));
                    let first = off / page;
                    if h.encoding == wire::Encoding::Zero as u8 {
                        for i in 0..len.div_ceil(page) {
                            sent.set(first + i, Digest::of_zero_page(region, first + i, (len - i * page).min(page) as usize));
                        }
                    } else {
                        let rel = (off - from as u64) as usize;
                        for (i, pg) in bytes[rel..rel + len as usize].chunks(PAGE).enumerate() {
                            sent.set(first + i as u64, Digest::of_page(region, first + i as u64, pg));
                        }
                    }
                    batch.push(h, p);
                    Ok(())
                })
                .expect("the batch sink cannot fail");
                pages += e - s;
            };
            if all {
                send_run(first, end);
            } else {
                dirty_runs(dirty, first, end, &mut send_run);
            }
            if let Some(e) = read_err {
                return Err(SessionError::io(format!("reading guest memory region {region} in window {w}"), e));
            }
            batch.region_bytes = pages * page;
            pacer.pace(batch.region_bytes);
            let n = self.lanes.len();
            let lane = &mut self.lanes[turn % n];
            turn += 1;
            batch
                .write(&snapshot[..], &mut lane.s, &mut lane.tx)
                .map_err(|e| SessionError::io(format!("sending round {round} to {to}"), e))?;
            self.enc.adaptive.chunk_done(batch.region_bytes);
            lane.frames += batch.frames() as u64;
            lane.bytes += batch.wire_bytes;
            lane.pages += pages;
            let zero = self.enc.stats.zero_pages;
            self.live.add((pages * page).min(size - base), batch.wire_bytes, batch.frames() as u64, zero - live_zero);
            live_zero = zero;
            c.pages += pages;
            c.wire_bytes += batch.wire_bytes;
        }
        for l in &mut self.lanes {
            let end = wire::RoundEnd {
                round: round.into(),
                _pad: 0.into(),
                frames: l.frames.into(),
                bytes: l.bytes.into(),
                pages: l.pages.into(),
            };
            write_frame(&mut l.s, &mut l.tx, Kind::RoundEnd, end.as_bytes())?;
            (l.frames, l.bytes, l.pages) = (0, 0, 0);
        }
        let enc = self.enc.stats;
        c.zero_pages = enc.zero_pages - enc0.zero_pages;
        c.compressed_in = enc.compressed_in - enc0.compressed_in;
        c.compressed_out = enc.compressed_out - enc0.compressed_out;
        c.frames = enc.frames - enc0.frames;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_runs() {
        assert_eq!(word_mask(0, 0, 64), u64::MAX);
        assert_eq!(word_mask(0, 3, 5), 0b11000);
        assert_eq!(word_mask(1, 60, 70), 0b111111);
        assert_eq!(word_mask(2, 60, 70), 0);
        let dirty = [0b1011_0000u64, 1 | 1 << 63];
        let mut runs = Vec::new();
        dirty_runs(&dirty, 0, 128, &mut |s, e| runs.push((s, e)));
        assert_eq!(runs, vec![(4, 6), (7, 8), (64, 65), (127, 128)]);
        runs.clear();
        dirty_runs(&dirty, 5, 64, &mut |s, e| runs.push((s, e)));
        assert_eq!(runs, vec![(5, 6), (7, 8)]);
    }

    /// A queue far smaller than the work: every window reaches exactly one of three
    /// workers, and none is lost at the end of the scan.
    #[test]
    fn window_feed_hands_each_window_to_one_worker() {
        let feed = WindowFeed::new(8);
        let taken: Vec<Vec<(u32, u64)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        while let Some(w) = feed.pop() {
                            got.push(w);
                        }
                        got
                    })
                })
                .collect();
            for w in 0..10_000u64 {
                assert!(feed.push(((w % 3) as u32, w)));
            }
            feed.scanned.store(true, Ordering::Release);
            workers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = taken.iter().flatten().map(|&(_, w)| w).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
    }

    /// A failed worker stops the scan (a full queue no longer blocks it) and the others.
    #[test]
    fn window_feed_stops() {
        let feed = WindowFeed::new(2);
        assert!(feed.push((0, 0)) && feed.push((0, 1)));
        feed.stop.store(true, Ordering::Relaxed);
        assert!(!feed.push((0, 2)), "a full queue returns once stopped");
        assert_eq!(feed.pop(), None);
    }
}
