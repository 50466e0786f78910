//! The source side of a session: a migration's pre-copy rounds, or a one-shot transfer
//! (one round of every page). The control connection and the lanes stay open from round
//! to round; each round the control thread hands the round to the session's workers on
//! the persistent pool ([`crate::pool`]), which send its dirty windows on their lanes
//! ([`crate::worker`]): RDMA queue pairs, io_uring or sockets.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use zerocopy::IntoBytes;

use super::{MigrationReport, PageHashes, ROUND_IDLE_TIMEOUT, RoundCounts, RoundReport, Verify};
use crate::auth::{Auth, client_handshake};
use crate::conn::{Bug, Cancel, Counted, Ctl, Refusal, SessionError, Violation};
use crate::digest::{Digest, DigestKey, Hashing};
use crate::encode::Encoder;
use crate::engine::send::{connect, connect_data, connect_within};
use crate::engine::{PAGE, cpu_seconds};
use crate::plan::{Plan, Transport};
use crate::pool::{Done, Pool, Task};
use crate::transport::rdma::{Check, RdmaReport};
use crate::transport::{Lane, Tx};
use crate::wire::{self, CONTROL_LANE, Kind, Layout, features};
use crate::worker::{Region, Round, Worker};
use hw::rdma::verbs::LocalRegion;

/// What a session moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// A VMM's guest memory, in pre-copy rounds, to a `migrate_in` destination; the
    /// regions must be memory (memfd, tmpfs, hugetlbfs).
    Migrate,
    /// A file, in one round, to `ferryctl recv` (or ferryd's `recv`).
    Transfer,
}

/// Where to send, and within which limits.
#[derive(Debug, Clone)]
pub struct SourceOptions<'a> {
    pub to: String,
    pub auth: Auth,
    pub plan: &'a Plan,
    pub job: Job,
    pub downtime_budget: Duration,
    pub max_rounds: u32,
    /// Region bytes per second, at most (a token bucket with one chunk of burst).
    pub rate_limit: Option<u64>,
    pub verify: Verify,
    /// Region bytes sent so far, for a progress bar.
    pub progress: Option<&'a AtomicU64>,
    /// The plan's RDMA is required (`--transport rdma`): fail rather than fall back to TCP
    /// lanes when the destination offers no RDMA.
    pub require_rdma: bool,
    /// The worker threads to run on (ferryd's); without one, the session starts a pool of
    /// its own from the plan, for its lifetime.
    pub pool: Option<&'a Pool>,
}

impl<'a> SourceOptions<'a> {
    /// A migration's options with QEMU's defaults: 300 ms of downtime, 30 rounds, no rate
    /// limit, `verify: sent`.
    pub fn migrate(to: String, auth: Auth, plan: &'a Plan) -> SourceOptions<'a> {
        SourceOptions {
            to,
            auth,
            plan,
            job: Job::Migrate,
            downtime_budget: super::DEFAULT_DOWNTIME,
            max_rounds: super::DEFAULT_MAX_ROUNDS,
            rate_limit: None,
            verify: Verify::Sent,
            progress: None,
            require_rdma: false,
            pool: None,
        }
    }
}

/// The highest rate limit, 100 Tbit/s.
pub const MAX_RATE_MBIT: u64 = 100_000_000;

/// A rate limit outside 1 Mbit/s to [`MAX_RATE_MBIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate_limit_mbit {0}: give 1 to 100000000 Mbit/s, or leave it out for no limit")]
pub struct RateOutOfRange(pub u64);

/// The rate limit in bytes per second for `mbit` megabits per second of guest memory: at
/// least 1 Mbit/s, at most 100 Tbit/s.
pub fn rate_limit_bytes(mbit: u64) -> Result<u64, RateOutOfRange> {
    if mbit == 0 || mbit > MAX_RATE_MBIT {
        return Err(RateOutOfRange(mbit));
    }
    Ok(mbit * 1_000_000 / 8)
}

/// A session whose lanes are open: its control connection, its workers' parts, and what
/// the transport set up.
struct Opened {
    ctl: Ctl,
    workers: Vec<Worker>,
    /// RDMA sessions: the figures so far.
    rdma: Option<RdmaReport>,
    /// RDMA sessions: the key page hashes are keyed with.
    digest_key: Option<DigestKey>,
    abort: Arc<AtomicBool>,
    live: crate::live::Session,
    /// The destination's id for the session (SESSION_OK).
    session: u64,
}

/// The worker threads a session runs on: shared (ferryd's), or its own.
enum Workers<'a> {
    Shared(&'a Pool),
    Own(Pool),
}

impl std::ops::Deref for Workers<'_> {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        match self {
            Workers::Shared(p) => p,
            Workers::Own(p) => p,
        }
    }
}

/// A session in progress, from the source's side.
pub struct Source<'a> {
    opts: SourceOptions<'a>,
    /// Shared with the pool's threads during a round.
    regions: Arc<[Region]>,
    pool: Workers<'a>,
    /// All regions together.
    size: u64,
    chunk: usize,
    ctl: Ctl,
    workers: Vec<Worker>,
    rounds: Vec<RoundReport>,
    /// When the previous round started: the dirty bitmap of the next one covers the time since.
    last_start: Option<Instant>,
    /// [`Verify::Full`]: the guest's digest sampled at connect and after each pre-copy
    /// round, the last [`DIGEST_SAMPLES`] (see [`Source::predicted_digest`]).
    digest_samples: VecDeque<DigestSample>,
    /// RDMA sessions: the session's figures so far.
    rdma: Option<RdmaReport>,
    /// Set when the session fails: RDMA workers waiting on their completion queues stop.
    abort: Arc<AtomicBool>,
    /// Seconds the workers spent sending, all rounds together (each round's time less
    /// the wait for the destination's confirmation).
    data_seconds: f64,
    /// RDMA sessions: pages arrive without frames, so every digest of them is keyed
    /// ([`crate::digest::Hashing::Keyed`]) with the session's key.
    digest_key: Option<DigestKey>,
    t0: Instant,
    cpu0: f64,
    /// The destination's id for the session: post-copy attempts RESUME it.
    session: u64,
    /// Post-copy: what the switch-over took, and what the attempts did.
    switch_seconds: Option<f64>,
    /// The pages stale at the switch-over (SWITCH's runs).
    stale: Vec<wire::RdmaRun>,
    /// The VMM's read-write descriptors of the regions, where it gave them: to register
    /// the memory on kernels that pin even a read-only registration for writing.
    writable: Arc<[Option<File>]>,
    /// Post-copy after RDMA rounds: the guest memory being registered for the
    /// destination's RDMA READs, from the switch-over on.
    registration: Option<super::postcopy::rdma::Registration>,
    postcopy: super::postcopy::PostcopyReport,
    /// Post-copy: windows near the destination's recent faults, which the push sends
    /// first, and the pages the faults' answers sent, which it leaves out (this attempt's).
    hints: Option<(Arc<crossbeam_queue::ArrayQueue<u64>>, Arc<crate::worker::AtomicBits>)>,
    /// The session's live counters (last: the workers, which count into them, go first).
    live: crate::live::Session,
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
            return Err(Refusal::Regions { count: memory.len(), max: wire::MAX_REGIONS }.into());
        }
        // What the regions claim is checked before ferry allocates a page table for them: a
        // sparse memfd may claim any size. A transfer's file is bounded by the configured
        // limit only (it may be on a disk far larger than memory); its page table is
        // allocated without aborting.
        let mut claimed = 0u64;
        for (i, m) in memory.iter().enumerate() {
            let len = m.metadata().map_err(|source| SessionError::Region { path: format!("region {i}"), source })?.len();
            claimed = claimed.saturating_add(len);
        }
        let limits = &opts.plan.limits;
        match opts.job {
            Job::Migrate => crate::session::limits::check_region(claimed, limits, crate::session::limits::Backing::Source)?,
            Job::Transfer => {
                if let Some(max) = limits.max_region_bytes.filter(|&m| claimed > m) {
                    return Err(crate::session::limits::LimitError::Region {
                        what: "the file",
                        bytes: claimed,
                        max,
                        why: "[limits] max_region_gib".into(),
                    }
                    .into());
                }
            }
        }
        let mut regions = Vec::with_capacity(memory.len());
        let mut word = 0;
        for (i, m) in memory.iter().enumerate() {
            let r = open_region(i, m, word, opts.job)?;
            word += r.words;
            regions.push(r);
        }
        let t0 = Instant::now();
        let cpu0 = cpu_seconds();
        if let Some(p) = opts.pool.filter(|p| p.chunk() != opts.plan.chunk_size_bytes as usize) {
            return Err(Bug::ChunkMismatch { plan: opts.plan.chunk_size_bytes, pool: p.chunk() }.into());
        }
        let mut s = connect(&opts.to)?;
        let want_rdma = opts.plan.transport == Transport::Rdma && opts.plan.rdma.is_some();
        let offer = if opts.job == Job::Migrate { features::MIGRATE } else { 0 } | if want_rdma { features::RDMA } else { 0 };
        let (agreed, keys) = client_handshake(&mut s, &opts.auth, CONTROL_LANE, 0, offer)?;
        let mut ctl = Ctl::new(s, keys);
        if opts.job == Job::Migrate && agreed & features::MIGRATE == 0 {
            ctl.error("this is a migration; the receiver takes one-shot transfers");
            let wanted = "a migration destination but a one-shot receiver (`ferryctl recv`): start one with ferryd's migrate_in";
            return Err(Refusal::NotService { addr: opts.to.clone(), wanted }.into());
        }
        let rdma = want_rdma && agreed & features::RDMA != 0;
        if want_rdma && !rdma {
            if opts.require_rdma {
                ctl.error("the sender requires RDMA and this side offers none");
                return Err(Refusal::PeerNoRdma { to: opts.to.clone() }.into());
            }
            log::warn!("{} has no RDMA port in its plan: sending over TCP lanes instead", opts.to);
        } else if opts.require_rdma && !rdma {
            return Err(Refusal::NoRdmaPort.into());
        }
        // The VMM's own descriptors where they are read-write: only to register the memory
        // on kernels that pin even a read-only registration for writing (before 6.2).
        let writable = memory.iter().map(|m| read_write(m)).collect();
        Source::start(ctl, (regions, writable), opts, rdma, t0, cpu0)
    }

    /// Describes the session on `ctl` (SESSION), opens its lanes (TCP connections, or RDMA
    /// queue pairs when `rdma`) and sets up its workers.
    fn start(
        mut ctl: Ctl,
        (regions, writable): (Vec<Region>, Vec<Option<File>>),
        opts: SourceOptions<'a>,
        rdma: bool,
        t0: Instant,
        cpu0: f64,
    ) -> Result<Source<'a>, SessionError> {
        let size: u64 = regions.iter().map(|r| r.size).sum();
        let plan = opts.plan;
        let chunk = plan.chunk_size_bytes as usize;
        ctl.s.set_read_timeout(Some(ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
        // An empty region has nothing to register: such a session (an empty file) runs on
        // TCP lanes, which the receiver takes as well.
        let rp = plan.rdma.as_ref().filter(|_| rdma && regions.iter().all(|r| r.size > 0));
        let per_worker = match rp {
            Some(rp) => rp.qps_per_worker as usize,
            None => plan.tcp.connections_per_worker as usize,
        };
        let n_workers = opts.pool.map_or(plan.worker_cpus.len(), |p| p.workers());
        let layout = Layout { page_size: PAGE as u32, max_chunk: chunk as u32, regions: regions.iter().map(|r| r.size).collect() };
        let lanes = n_workers * per_worker;
        let transport = if rp.is_some() { wire::DataTransport::Rdma } else { wire::DataTransport::Tcp };
        let session = describe(&mut ctl, &layout, lanes, transport)?;
        // Without ferryd's workers, the session's own, for its lifetime (an embedded run).
        let pool = match opts.pool {
            Some(p) => Workers::Shared(p),
            None => Workers::Own(Pool::new(plan).inspect_err(|e| ctl.error(&e.to_string()))?),
        };
        let role = if opts.job == Job::Migrate { crate::live::Role::MigrateOut } else { crate::live::Role::Send };
        // This session's own counters: concurrent sessions never count into one slot.
        let live = crate::live::session(role, session, n_workers);
        let abort = Arc::new(AtomicBool::new(false));
        if let Some(rp) = rp {
            // A migration verified in full checks one-sided writes once, at the end: the
            // paused source is digested anyway, so hashing every page each round would
            // only slow the data phase (see `transport::rdma`).
            let at_end = opts.job == Job::Migrate && opts.verify == Verify::Full;
            let want = RdmaLanes { rp, layout: &layout, regions: &regions, writable: &writable, workers: n_workers, at_end };
            let (workers, report) = rdma_workers(&mut ctl, plan, &want, &live, &abort)?;
            let key = Some(ctl.digest_key().clone());
            log::info!(
                "session {session:#x}: {size} bytes in {} region(s) to {} over {lanes} RDMA QP(s) on {} from {n_workers} worker(s)",
                regions.len(),
                opts.to,
                report.device
            );
            let opened = Opened { ctl, workers, rdma: Some(report), digest_key: key, abort, live, session };
            return Source::ready(opts, (regions, writable), pool, opened, t0, cpu0);
        }
        let workers = tcp_workers(&mut ctl, &opts, &pool, &live, session, n_workers, per_worker)?;
        log::info!(
            "session {session:#x}: {size} bytes in {} region(s) to {} over {lanes} lane(s) from {n_workers} worker(s)",
            regions.len(),
            opts.to
        );
        let opened = Opened { ctl, workers, rdma: None, digest_key: None, abort, live, session };
        Source::ready(opts, (regions, writable), pool, opened, t0, cpu0)
    }

    /// The session, its lanes open.
    fn ready(
        opts: SourceOptions<'a>,
        (regions, writable): (Vec<Region>, Vec<Option<File>>),
        pool: Workers<'a>,
        opened: Opened,
        t0: Instant,
        cpu0: f64,
    ) -> Result<Source<'a>, SessionError> {
        let Opened { ctl, workers, rdma, digest_key, abort, live, session } = opened;
        live.set_size(regions.iter().map(|r| r.size).sum());
        let size: u64 = regions.iter().map(|r| r.size).sum();
        let chunk = opts.plan.chunk_size_bytes as usize;
        // The paused source is digested during the last round; that bounds the downtime
        // from below, so the estimate needs its speed.
        let mut digest_samples = VecDeque::with_capacity(DIGEST_SAMPLES);
        if opts.verify == Verify::Full {
            digest_samples.push_back(sample_digest(&regions)?);
        }
        Ok(Source {
            opts,
            regions: regions.into(),
            pool,
            size,
            chunk,
            ctl,
            workers,
            rounds: Vec::new(),
            last_start: None,
            digest_samples,
            rdma,
            abort,
            data_seconds: 0.0,
            digest_key,
            t0,
            cpu0,
            session,
            switch_seconds: None,
            stale: Vec::new(),
            writable: writable.into(),
            registration: None,
            postcopy: super::postcopy::PostcopyReport::default(),
            hints: None,
            live,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn lanes(&self) -> usize {
        self.workers.iter().map(|w| w.tx.lane_count()).sum()
    }

    /// The transport the lanes use: RDMA, or io_uring unless every worker fell back to
    /// sockets.
    pub fn transport(&self) -> Transport {
        // The rounds' transport (post-copy's push after RDMA rounds runs on TCP lanes).
        if self.rdma.is_some() {
            return Transport::Rdma;
        }
        let t: Vec<Transport> = self.workers.iter().map(|w| w.tx.transport()).collect();
        [Transport::Rdma, Transport::Tcp].into_iter().find(|x| t.contains(x)).unwrap_or(Transport::Sockets)
    }

    /// Per worker, its chunks' latency from posting until written (RDMA: until the
    /// window's last WRITE completed), µs.
    pub fn worker_latency(&self) -> Vec<hdrhistogram::Histogram<u64>> {
        self.workers
            .iter()
            .map(|w| match &w.tx {
                Tx::Rdma(t) => t.latency.clone(),
                _ => w.latency.clone(),
            })
            .collect()
    }

    /// Runs a pre-copy round. Round 0 sends every page whatever `dirty` says; later rounds
    /// the pages `dirty` marks (see [`super::parse_bitmap_regions`]).
    pub fn round(&mut self, dirty: &[u64]) -> Result<RoundReport, SessionError> {
        self.run_round(dirty, false).map(|(r, _)| r)
    }

    /// The stop-and-copy round, once the VMM has paused: the pages `dirty` marks, then the
    /// source's digest ([`Verify`]) against the destination's.
    pub fn finish(mut self, dirty: &[u64]) -> Result<MigrationReport, SessionError> {
        let (last, digest) = self.run_round(dirty, true)?;
        let digest = digest.expect("the last round digests the source");
        Ok(self.report(last.seconds * 1e3, digest))
    }

    /// The whole migration's report, once the destination confirmed `digest`.
    fn report(&mut self, downtime_ms: f64, digest: Digest) -> MigrationReport {
        let mut rep = MigrationReport {
            role: "source".into(),
            bytes: self.size,
            seconds: self.t0.elapsed().as_secs_f64(),
            downtime_ms,
            downtime_budget_ms: self.opts.downtime_budget.as_secs_f64() * 1e3,
            cpu_seconds_per_gib: (cpu_seconds() - self.cpu0) / (self.size as f64 / (1u64 << 30) as f64),
            transport: self.transport().to_string(),
            compression: if self.rdma.is_some() {
                "off (RDMA writes place pages directly)".into()
            } else {
                self.opts.plan.compression.to_string()
            },
            lanes: self.lanes() as u32,
            workers: self.workers.len() as u32,
            rate_limit_bytes_per_second: self.opts.rate_limit,
            verify: self.opts.verify,
            digest: digest.hex(),
            digest_match: true,
            worker_latency: self.worker_latency(),
            ..MigrationReport::default()
        };
        for r in &self.rounds {
            rep.sent_bytes += r.dirty_bytes;
            rep.wire_bytes += r.wire_bytes;
            rep.zero_pages += r.zero_pages;
            rep.compressed_in_bytes += r.compressed_in_bytes;
            rep.compressed_out_bytes += r.compressed_out_bytes;
        }
        if let Some(mut r) = self.rdma.take() {
            for w in &self.workers {
                if let Tx::Rdma(t) = &w.tx {
                    r.add(&t.report);
                }
            }
            r.data_seconds = self.data_seconds;
            r.data_gbps = if r.data_seconds > 0.0 { rep.sent_bytes as f64 / r.data_seconds / 1e9 } else { 0.0 };
            rep.rdma = Some(r);
        }
        rep.rounds = std::mem::take(&mut self.rounds);
        let (mut notifications, mut copied) = (0, 0);
        for zc in self.workers.iter().filter_map(|w| w.tx.zero_copy_stats()) {
            notifications += zc.notifications;
            copied += zc.copied;
        }
        if copied > 0 {
            log::info!(
                "zero-copy sends: the kernel copied {copied} of {notifications} (loopback, or a NIC without scatter-gather): tcp.send_zc = \"off\" saves the pinning"
            );
        }
        if let Some(s) = self.switch_seconds {
            rep.switch_ms = Some(s * 1e3);
            rep.postcopy = Some(self.postcopy.clone());
        }
        rep
    }

    /// Post-copy: from the VMM's `postcopy` until the destination said it runs the guest.
    pub fn switch_ms(&self) -> Option<f64> {
        self.switch_seconds.map(|s| s * 1e3)
    }

    /// The switch-over to post-copy, once the VMM has paused and `dirty` is its final
    /// bitmap: the lanes end, SWITCH tells the destination which pages are still stale,
    /// and SWITCHED says its VMM runs the guest. From here the source must never resume
    /// the guest, whatever happens next.
    pub fn switch_over(&mut self, dirty: &[u64]) -> Result<(), SessionError> {
        let t = Instant::now();
        if self.rdma.as_ref().is_some_and(|r| r.check == Check::AtEnd) {
            return Err(Refusal::PostcopyRdmaAtEnd.into());
        }
        let words: usize = self.regions.iter().map(|r| r.words).sum();
        if self.rounds.is_empty() || dirty.len() != words {
            return Err(Refusal::PostcopyBitmap { words: dirty.len(), expected: words }.into());
        }
        self.check_sizes(self.rounds.len() as u32, "switch-over")?;
        for w in &mut self.workers {
            w.tx.end_lanes()?;
        }
        let mut runs = Vec::new();
        rdma_runs(&self.regions, dirty, &mut |frame| {
            runs.extend_from_slice(frame);
            Ok(())
        })?;
        self.postcopy.stale_pages = runs.iter().map(|r| u64::from(r.pages.get())).sum();
        let ready = t.elapsed();
        super::postcopy::send_runs(&mut self.ctl, Kind::Switch, self.rounds.len() as u64, &runs)?;
        log::debug!("post-copy switch-over: lanes ended and {} run(s) listed in {ready:?}, sent in {:?}", runs.len(), t.elapsed());
        self.stale = runs;
        let mut buf = Vec::new();
        self.ctl.expect(Kind::Switched, &mut buf)?;
        self.switch_seconds = Some(t.elapsed().as_secs_f64());
        // After RDMA rounds the destination may read faulting pages from this memory: it
        // is registered for that in the background (see `postcopy::rdma`).
        if let Some(rp) = self.opts.plan.rdma.as_ref().filter(|_| self.rdma.is_some()) {
            self.registration = Some(super::postcopy::rdma::Registration::start(rp, self.regions.clone(), self.writable.clone()));
        }
        log::info!(
            "post-copy: the destination runs the guest {:.1} ms after the switch-over began; {} page(s) to go",
            t.elapsed().as_secs_f64() * 1e3,
            self.postcopy.stale_pages
        );
        Ok(())
    }

    /// After RDMA pre-copy, the destination keys its hash of every page post-copy places
    /// (see `dest::Landed`): each stale page's hash as sent, keyed likewise, from the
    /// paused source (which never changes again), whichever way the page went: pushed,
    /// answered, or read by the destination's RDMA READ, which the source never sees.
    /// After TCP pre-copy, nothing to do: the push and the answers recorded them.
    fn key_stale_pages(&self) -> Result<(), SessionError> {
        const PIECE: u64 = 256;
        let Some(key) = self.digest_key.as_ref() else { return Ok(()) };
        let t = Instant::now();
        let pieces: Vec<(u32, u64, u64)> = self
            .stale
            .iter()
            .flat_map(|r| {
                let (region, first, end) = (r.region.get(), r.first.get(), r.first.get() + u64::from(r.pages.get()));
                (first..end).step_by(PIECE as usize).map(move |p| (region, p, (end - p).min(PIECE)))
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let regions = &*self.regions;
        let work = || -> Result<(), SessionError> {
            let mut buf = vec![0u8; PIECE as usize * PAGE];
            while let Some(&(r, first, n)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                let reg = &regions[r as usize];
                let (off, end) = (first * PAGE as u64, ((first + n) * PAGE as u64).min(reg.size));
                let bytes = &mut buf[..(end - off) as usize];
                reg.memory
                    .read_exact_at(bytes, off)
                    .map_err(|source| SessionError::Region { path: format!("guest memory region {r}"), source })?;
                for (i, pg) in bytes.chunks(PAGE).enumerate() {
                    reg.sent.set(first + i as u64, Digest::of_page_with(Hashing::Keyed(key), r, first + i as u64, pg));
                }
            }
            Ok(())
        };
        crate::helpers::fan_out(digest_threads().min(pieces.len().max(1)), work).into_iter().collect::<Result<(), _>>()?;
        log::debug!("post-copy: {} stale page(s) hashed (keyed) in {:?}", self.postcopy.stale_pages, t.elapsed());
        Ok(())
    }

    /// Post-copy after [`Source::switch_over`]: attempts until the destination holds every
    /// page and the digests matched. A link that breaks is reconnected (with the same key,
    /// resuming this session) for up to `recover`; the destination says what it still
    /// needs each time.
    pub fn postcopy(mut self, recover: Duration) -> Result<MigrationReport, SessionError> {
        let t = Instant::now();
        // Since when the destination has not been reached (it said what it needs).
        let (mut since, mut delay) = (Instant::now(), Duration::from_millis(20));
        let digest = loop {
            self.postcopy.attempts += 1;
            let mut reached = false;
            match self.postcopy_attempt(&mut reached) {
                Ok(d) => break d,
                Err(e) if super::postcopy::is_link_failure(&e) => {
                    if reached {
                        (since, delay) = (Instant::now(), Duration::from_millis(20));
                    }
                    if since.elapsed() >= recover {
                        return Err(Cancel::SourceGaveUp { recover, why: Box::new(e) }.into());
                    }
                    log::warn!("post-copy attempt {} failed ({e}); reconnecting", self.postcopy.attempts);
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        };
        self.postcopy.all_local_seconds = t.elapsed().as_secs_f64();
        let switch = self.switch_seconds.unwrap_or(0.0) * 1e3;
        Ok(self.report(switch, digest))
    }

    /// An attempt's start: a new control connection that RESUMEs this session, and the
    /// pages the destination still needs (NEEDED) as a dirty bitmap; and, after RDMA rounds
    /// when the destination agreed, the plan's RDMA port for the READ path. `reached`: the
    /// destination answered.
    fn resume(&mut self, reached: &mut bool) -> Result<(Ctl, Vec<u64>, Option<&'a crate::plan::RdmaPlan>), SessionError> {
        // A link still down answers nothing: until the destination has said what it needs,
        // each step waits a few silences at most (not the idle timeout, nor the kernel's
        // connect retries), so the next attempt comes soon and `recover_s` holds.
        let mut s = connect_within(&self.opts.to, 2 * super::postcopy::SILENCE)?;
        // After RDMA rounds, faults may be read with RDMA READs (see `postcopy::rdma`).
        let rp = self.opts.plan.rdma.as_ref().filter(|_| self.rdma.is_some());
        let want = features::MIGRATE | features::POSTCOPY | if rp.is_some() { features::RDMA } else { 0 };
        let (agreed, keys) = client_handshake(&mut s, &self.opts.auth, CONTROL_LANE, 0, want)?;
        let rp = rp.filter(|_| agreed & features::RDMA != 0);
        let mut ctl = Ctl::new(s, keys);
        if agreed & features::POSTCOPY == 0 {
            ctl.error("post-copy was not agreed");
            return Err(Refusal::NoPostcopy { to: self.opts.to.clone() }.into());
        }
        ctl.send(Kind::Resume, wire::Resume { session: self.session.into() }.as_bytes())?;
        let mut buf = Vec::new();
        let (needed, placed) = super::postcopy::recv_runs(&mut ctl, Kind::Needed, &mut buf)?;
        *reached = true;
        ctl.s.set_read_timeout(Some(ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
        ctl.s.set_write_timeout(Some(crate::engine::IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a write timeout", e))?;
        let pages: Vec<u64> = self.regions.iter().map(|r| super::pages(r.size)).collect();
        let dirty = super::postcopy::runs_to_bitmap(&needed, &pages, Kind::Needed)?;
        log::info!(
            "post-copy attempt {}: the destination placed {placed} page(s) and needs {}",
            self.postcopy.attempts,
            needed.iter().map(|r| u64::from(r.pages.get())).sum::<u64>()
        );
        Ok((ctl, dirty, rp))
    }

    /// One post-copy attempt: a new control connection that RESUMEs this session, NEEDED
    /// from the destination, new lanes and a fault lane; the pages needed pushed as one
    /// round while the fault lane answers FETCHes; then DONE and RESULT.
    fn postcopy_attempt(&mut self, reached: &mut bool) -> Result<Digest, SessionError> {
        let (mut ctl, dirty, rp) = self.resume(reached)?;
        let plan = self.opts.plan;
        let n_workers = self.pool.workers();
        let per_worker = plan.tcp.connections_per_worker as usize;
        let lanes = n_workers * per_worker + 1;
        let layout =
            Layout { page_size: PAGE as u32, max_chunk: self.chunk as u32, regions: self.regions.iter().map(|r| r.size).collect() };
        let session = describe(&mut ctl, &layout, lanes, wire::DataTransport::Tcp)?;
        let live = crate::live::session(crate::live::Role::MigrateOut, session, n_workers);
        // The fault lane first, answering at once: faults that came since the switch-over
        // wait for it, not for the push's lanes as well.
        let mut fs = connect_data(&self.opts.to, plan).map_err(|e| gone_or(&mut ctl, e, "opening the fault lane"))?;
        let (_, fault_keys) = client_handshake(&mut fs, &self.opts.auth, (lanes - 1) as u16, session, 0)?;
        let stop = AtomicBool::new(false);
        let fault_sock = fs.try_clone().map_err(|e| SessionError::io("cloning the fault lane", e))?;
        let writer = fs.try_clone().map_err(|e| SessionError::io("cloning the fault lane", e))?;
        let writer = std::sync::Mutex::new(super::postcopy::rdma::LaneWriter { s: writer, tx: fault_keys.tx });
        let regions = self.regions.clone();
        let registration = self.registration.clone();
        let offer = rp.zip(registration.as_ref()).map(|(rp, registration)| super::postcopy::rdma::Offer {
            rp,
            registration,
            stop: &stop,
            qp: std::sync::Mutex::new(None),
        });
        let lane = super::postcopy::source::FaultLane { s: fs, rx: fault_keys.rx, w: &writer, offer: offer.as_ref() };
        let hints = Arc::new(crossbeam_queue::ArrayQueue::new(super::postcopy::HINTS));
        // A page answered in this attempt reached the destination if the attempt completes;
        // if not, the next attempt's NEEDED names it again, and its push sends it.
        let fetched = Arc::new(crate::worker::AtomicBits::new(dirty.len() as u64 * 64));
        self.hints = Some((hints.clone(), fetched.clone()));
        let key = self.digest_key.clone();
        let near = super::postcopy::Near { hints: &hints, fetched: &fetched, chunk: self.chunk, key: key.as_ref() };
        // A fault lane that went silent ends the push too: its control connection is
        // shut, which the round's watch sees. (A lane the destination closed is not that:
        // it does so when the attempt is done, and RESULT follows on the control
        // connection.)
        let ctl_sock = ctl.s.try_clone().map_err(|e| SessionError::io("cloning the control connection", e))?;
        let answered = AtomicU64::new(0);
        let (r, lane) = std::thread::scope(|s| {
            // The READ path is set up beside the fault lane, which answers meanwhile.
            if let Some(o) = &offer {
                let w = &writer;
                // Nothing offered yet when it fails: faults stay on the fault lane.
                s.spawn(move || o.offer(w).unwrap_or_else(|e| log::warn!("post-copy: faults stay on the fault lane: {e}")));
            }
            let answers = s.spawn(|| {
                let r = super::postcopy::answer_fetches(lane, &regions, &stop, near, &answered);
                if matches!(r, Err(SessionError::TimedOut { .. })) && !stop.load(Ordering::Relaxed) {
                    let _ = ctl_sock.shutdown(std::net::Shutdown::Both);
                }
                r
            });
            let r = tcp_workers(&mut ctl, &self.opts, &self.pool, &live, session, n_workers, per_worker).and_then(|workers| {
                self.ctl = ctl;
                // Pre-copy's RDMA workers go (their QPs with them); their counts stay.
                for old in std::mem::replace(&mut self.workers, workers) {
                    if let (Tx::Rdma(t), Some(r)) = (&old.tx, self.rdma.as_mut()) {
                        r.add(&t.report);
                    }
                }
                live.set_size(self.size);
                self.live = live;
                self.abort.store(false, Ordering::Relaxed);
                self.run_round(&dirty, true)
            });
            stop.store(true, Ordering::Relaxed);
            let _ = fault_sock.shutdown(std::net::Shutdown::Both);
            (r, answers.join().expect("fault lane thread panicked"))
        });
        // Answers count once their attempt completed (a failed attempt's may have been
        // lost with its link), however the fault lane ended after.
        if r.is_ok() {
            self.postcopy.pages_by_fault += answered.load(Ordering::Relaxed);
        }
        let r = match lane {
            Ok(()) => r,
            Err(e) if r.is_ok() => {
                log::debug!("post-copy fault lane: {e}");
                r
            }
            // The fault lane's own reason (a silent link) beats the closed control
            // connection it caused.
            Err(e @ SessionError::TimedOut { .. }) => Err(e),
            Err(_) => r,
        };
        let (_, digest) = r?;
        Ok(digest.expect("the last round digests the source"))
    }

    /// One round: the workers send it (and, paused with `verify: full`, the source is
    /// digested beside them), the destination confirms it, and after the last the verdict;
    /// then the estimate and the advice for the next.
    fn run_round(&mut self, dirty: &[u64], last: bool) -> Result<(RoundReport, Option<Digest>), SessionError> {
        let round = self.rounds.len() as u32;
        let start = Instant::now();
        let all = round == 0;
        let job = self.round_job(round, dirty, last)?;
        // What `ferryctl status` shows of this session: the round and what it moves (the
        // marked pages, less any bit past a region's end, which the job refuses anyway).
        let marked = if all { self.size } else { dirty.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * PAGE as u64 };
        self.live.begin_round(round, Some(marked.min(self.size)));
        // The VMM is paused during the last round: a full digest may use every CPU.
        let digest_threads = digest_threads();
        let full = last && self.opts.verify == Verify::Full;
        let (c, paused, data_seconds) = self.send_round(&job, full.then_some(digest_threads), start)?;
        // The workers are done: what follows is the destination's confirmation.
        self.data_seconds += data_seconds;
        // A region that shrank while the round read it sent zeros for the pages past its
        // new end (they read as holes): fail before the destination confirms the round.
        self.check_sizes(round, "end")?;
        self.confirm_round(&job, last, c.pages)?;
        if last && self.switch_seconds.is_some() {
            self.key_stale_pages()?;
        }
        let digest = match &paused {
            Some(p) => Some(p.digest),
            None if last => Some(self.regions.iter().map(|r| r.sent.fold()).sum()),
            None => None,
        };
        let verdict_start = Instant::now();
        if let Some(d) = digest {
            self.verdict(round, d)?;
        }
        let verdict_seconds = if last { verdict_start.elapsed().as_secs_f64() } else { 0.0 };
        if last && self.opts.job == Job::Migrate {
            self.learn(start.elapsed().as_secs_f64(), c.pages, data_seconds, paused.as_ref());
        }
        let seconds = start.elapsed().as_secs_f64();
        let dirty_bytes = (c.pages * PAGE as u64).min(self.size);
        let gbps = dirty_bytes as f64 / seconds / 1e9;
        let dirty_rate = self.last_start.filter(|_| !all).map(|prev| dirty_bytes as f64 / start.duration_since(prev).as_secs_f64());
        self.last_start = Some(start);
        let mut report = RoundReport {
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
            data_seconds,
            confirm_seconds: seconds - data_seconds,
            verdict_seconds,
            gbps,
            dirty_rate_gbps: dirty_rate.map(|r| r / 1e9),
            ..RoundReport::default()
        };
        if self.opts.verify == Verify::Full && !last {
            if self.digest_samples.len() == DIGEST_SAMPLES {
                self.digest_samples.pop_front();
            }
            self.digest_samples.push_back(sample_digest(&self.regions)?);
        }
        report.estimated_downtime_ms = self.estimate(&report, dirty_rate);
        let advice = super::estimate::advise(&super::estimate::AdviceInputs {
            last,
            estimate_ms: report.estimated_downtime_ms,
            budget_ms: self.opts.downtime_budget.as_secs_f64() * 1e3,
            round,
            max_rounds: self.opts.max_rounds,
            pages: c.pages,
            previous_pages: self.rounds.last().map(|p| p.dirty_pages),
        });
        (report.advise_pause, report.advise_postcopy, report.advice) = (advice.pause, advice.postcopy, advice.text);
        log::info!(
            "round {round}{}: {} dirty pages ({:.1} MiB) in {:.3} s = {:.2} GB/s, estimated downtime {}{}",
            if last { " (stop-and-copy)" } else { "" },
            c.pages,
            dirty_bytes as f64 / (1 << 20) as f64,
            seconds,
            gbps,
            report.estimated_downtime_ms.map_or_else(|| "unknown".into(), |e| format!("{e:.0} ms")),
            if report.advise_pause { ": pause now" } else { "" }
        );
        log::debug!("round {round}: {}", report.advice);
        self.rounds.push(report.clone());
        Ok((report, digest))
    }

    /// What a migration's last round, which took `seconds` (`data_seconds` of them the
    /// workers' for `pages` pages), teaches the next migrations' estimates (see
    /// [`super::estimate`]): the speed of the paused full digest, and the end, what the
    /// round took beyond its pages at the estimate's cost per page and the full digest
    /// (which the estimate has apart; over RDMA, the destination's digest after the last
    /// write too): waking the paused host's threads, the confirmation, the verdict.
    fn learn(&self, seconds: f64, pages: u64, data_seconds: f64, paused: Option<&PausedDigest>) {
        if let Some(p) = paused {
            log::debug!("paused digest: {:.1} ms, {:.1} ms predicted", p.seconds * 1e3, self.predicted_digest() * 1e3);
            if let Some(s) = self.digest_samples.back() {
                super::estimate::record_digest(p.seconds, self.size as f64 * s.data_fraction);
            }
        }
        let dest_digested = self.rdma.as_ref().is_some_and(|r| r.check == Check::AtEnd);
        if paused.is_some() && dest_digested {
            return;
        }
        let page_cost = super::estimate::page_seconds(&self.rounds).map_or(data_seconds, |s| s * pages as f64);
        let digest = paused.map_or(0.0, |p| p.seconds);
        super::estimate::record_end((seconds - page_cost.max(digest)).max(0.0));
    }

    /// Round `round`'s work for the pool: every page in round 0, else the pages `dirty`
    /// (the VMM's bitmap, checked against the regions) marks.
    fn round_job(&self, round: u32, dirty: &[u64], last: bool) -> Result<Arc<Round>, SessionError> {
        let all = round == 0;
        let words: usize = self.regions.iter().map(|r| r.words).sum();
        if !all && dirty.len() != words {
            let (pages, regions) = (super::pages(self.size), self.regions.len());
            return Err(Refusal::Bitmap { words: dirty.len(), pages, regions, expected: words }.into());
        }
        self.check_sizes(round, "start")?;
        let dirty: Arc<[u64]> = if all { Arc::from(&[][..]) } else { Arc::from(dirty) };
        let mut job = Round::new(round, self.regions.clone(), self.chunk, dirty, all, self.opts.rate_limit.map(|r| r as f64));
        job.last = last;
        if let Some((q, fetched)) = &self.hints {
            job.hints = Some(crate::worker::Hints::new(q.clone(), job.windows(), fetched.clone()));
        }
        Ok(Arc::new(job))
    }

    /// Hands the round to the pool's workers and waits for them, watching the control
    /// connection; with `digest_threads`, digests the paused source beside them. Returns
    /// what the workers counted, that digest with the seconds from `start` until it was
    /// done, and the data phase's seconds (the workers', since `start`).
    fn send_round(
        &mut self,
        job: &Arc<Round>,
        digest_threads: Option<usize>,
        start: Instant,
    ) -> Result<(RoundCounts, Option<PausedDigest>, f64), SessionError> {
        let key = self.digest_key.as_ref();
        let regions = &*self.regions;
        let (done, woken) = Done::new(self.workers.len(), self.abort.clone())?;
        let mut paused = None;
        let (handed, failed, data_seconds) = crate::helpers::helpers().in_place_scope(|s| {
            // The VMM has paused: digest the source beside the last round's lanes, on the
            // helper threads.
            if let Some(threads) = digest_threads {
                let paused = &mut paused;
                s.spawn(move |_| {
                    let digest = || {
                        let mut d = Digest::default();
                        let h = key.map_or(Hashing::Fast, Hashing::Keyed);
                        for (i, r) in regions.iter().enumerate() {
                            d.combine(Digest::of_file_with(h, i as u32, PAGE, &r.memory, r.size, threads, r.probe_holes)?);
                        }
                        Ok::<_, std::io::Error>(PausedDigest { digest: d, seconds: start.elapsed().as_secs_f64() })
                    };
                    *paused = Some(digest());
                });
            }
            // Each worker of the pool takes its part of the session and the round.
            let (mut handed, mut failed) = (0, None);
            for worker in std::mem::take(&mut self.workers) {
                match self.pool.submit(Task { worker, round: job.clone(), done: done.clone() }) {
                    Ok(()) => handed += 1,
                    Err(refused) => {
                        let (t, e) = *refused;
                        job.feed.stop();
                        self.abort.store(true, Ordering::Relaxed);
                        self.workers.push(t.worker);
                        failed.get_or_insert(e);
                    }
                }
            }
            // The destination says nothing during a round: a readable control connection
            // is its ERROR, or its end. The workers are stopped, and the reason kept; they
            // are waited for either way, so the session has its lanes back.
            let (finished, ctl_failed) = watch_round(&mut self.ctl, &woken, handed, &job.progress, self.opts.progress);
            if let Some(e) = ctl_failed {
                job.feed.stop();
                self.abort.store(true, Ordering::Relaxed);
                failed = failed.or(Some(e));
                if let Err(e) = crate::pool::wait_for(&woken, handed - finished) {
                    log::error!("{e}");
                }
            }
            // The data phase is the workers' (a full digest still running is not).
            (handed, failed, start.elapsed().as_secs_f64())
        });
        let digest = paused.map(|d| d.map_err(|e| SessionError::io("digesting the paused guest memory", e)));
        let results = done.take();
        debug_assert_eq!(results.len(), handed);
        let mut c = RoundCounts::default();
        let mut worker_failed = None;
        for (w, r) in results {
            self.workers.push(w);
            match r {
                Ok(r) => c += r,
                Err(e) => {
                    worker_failed.get_or_insert(e);
                }
            }
        }
        self.workers.sort_by_key(|w| w.index);
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(e) = worker_failed {
            return Err(self.ctl.reason_for(e));
        }
        Ok((c, digest.transpose()?, data_seconds))
    }

    /// The round's end on the control connection (over RDMA, what each lane carried and
    /// which pages were written, first), and the destination's confirmation of `pages`.
    fn confirm_round(&mut self, job: &Round, last: bool, pages: u64) -> Result<(), SessionError> {
        let (round, all) = (job.round, job.round == 0);
        // (Post-copy's push after RDMA rounds runs on TCP lanes.)
        if self.workers.iter().any(|w| matches!(w.tx, Tx::Rdma(_))) {
            // RDMA lanes end their round here: what each carried, worker-major.
            let ends: Vec<wire::RdmaLaneEnd> = self.workers.iter_mut().flat_map(|w| std::mem::take(&mut w.rdma_ends)).collect();
            // Rounds after the first wrote the dirty pages only: the destination is told
            // which, counts them against ROUND and (checked each round) hashes exactly
            // those, not the whole windows.
            let runs = if all { 0 } else { rdma_runs(&self.regions, &job.dirty, &mut |_| Ok(()))? };
            let head = wire::RdmaRoundEnd { round: round.into(), whole: u32::from(all).into(), runs: runs.into() };
            self.ctl.send(Kind::RdmaEnd, &wire::list_payload(&head, &ends))?;
            if !all {
                let ctl = &mut self.ctl;
                rdma_runs(&self.regions, &job.dirty, &mut |frame| ctl.send(Kind::RdmaPages, frame.as_bytes()))?;
            }
        }
        let end = wire::Round { round: round.into(), last: u32::from(last).into(), pages: pages.into() };
        self.ctl.send(Kind::Round, end.as_bytes())?;
        let mut buf = Vec::new();
        self.ctl.expect(Kind::RoundOk, &mut buf)?;
        let ok: wire::RoundOk = wire::parse(Kind::RoundOk, &buf)?;
        if ok.round.get() != round {
            return Err(Violation::OutOfTurn { what: "ROUND_OK of round", got: ok.round.get().into(), next: round.into() }.into());
        }
        if ok.pages.get() != pages {
            return Err(Violation::Miscount { what: Counted::RoundPages { round }, announced: pages, found: ok.pages.get() }.into());
        }
        Ok(())
    }

    /// The verdict after the last round (whose workers ended their lanes with it): the
    /// destination compares `digest` with what landed.
    fn verdict(&mut self, round: u32, digest: Digest) -> Result<(), SessionError> {
        if self.opts.job == Job::Transfer {
            // A file that shrank was read as holes past its new end.
            self.check_sizes(round, "end")?;
        }
        crate::engine::send::confirm(&mut self.ctl, digest, self.size)
    }

    /// `verify: full`: the paused digest's seconds (0 without samples). It reads the
    /// pages that are not holes, so it is their bytes (the latest sample's share of the
    /// guest) at the speed this ferryd's last paused digests had; before its first, at the
    /// samples' speed (the median of the last three, so one that something else held up
    /// does not swing it) on every CPU. Samples taken while the guest runs on the same
    /// CPUs are noisy (150-260 ms per GiB in four migrations of one guest whose paused
    /// digest took 124-139 ms on two CPUs), which is why they only stand in.
    fn predicted_digest(&self) -> f64 {
        let Some(latest) = self.digest_samples.back() else {
            return 0.0;
        };
        let data_bytes = self.size as f64 * latest.data_fraction;
        if let Some(per_byte) = super::estimate::digest_seconds_per_byte() {
            return per_byte * data_bytes;
        }
        let mut recent: Vec<f64> = self.digest_samples.iter().map(|s| s.seconds_per_gib).collect();
        recent.sort_by(f64::total_cmp);
        recent[recent.len() / 2] * self.size as f64 / (1u64 << 30) as f64 / digest_threads() as f64
    }

    /// The downtime if the VMM paused after `this` round, ms (see [`super::estimate`]);
    /// `None` until a dirty rate has been measured.
    fn estimate(&self, this: &RoundReport, dirty_rate: Option<f64>) -> Option<f64> {
        let measured: Vec<RoundReport> = self.rounds.iter().cloned().chain(std::iter::once(this.clone())).collect();
        let rate = dirty_rate?;
        let page_seconds = super::estimate::page_seconds(&measured)?;
        let full_digest = self.predicted_digest();
        let inputs = super::estimate::Inputs {
            next_pages: (rate * this.seconds).min(self.size as f64) / PAGE as f64,
            page_seconds,
            end_seconds: super::estimate::end_seconds(),
            // With a full digest the paused memory is read beside the last round; over
            // RDMA the destination then digests what landed (its speed taken to be this
            // side's).
            digest_seconds: full_digest,
            after_data_seconds: if self.rdma.as_ref().is_some_and(|r| r.check == Check::AtEnd) { full_digest } else { 0.0 },
        };
        Some(super::estimate::downtime_seconds(&inputs) * 1e3)
    }
}

impl Source<'_> {
    /// Every region still has the size it had when the migration began: guest memory that
    /// is resized under a migration cannot be migrated faithfully.
    fn check_sizes(&self, round: u32, when: &'static str) -> Result<(), SessionError> {
        for (i, r) in self.regions.iter().enumerate() {
            let now =
                r.memory.metadata().map_err(|source| SessionError::Region { path: format!("guest memory region {i}"), source })?.len();
            if now != r.size {
                return Err(Refusal::Resized { region: i, from: r.size, to: now, when, round }.into());
            }
        }
        Ok(())
    }
}

/// The paused source's full digest, and the seconds from the round's start until it was
/// done.
struct PausedDigest {
    digest: Digest,
    seconds: f64,
}

/// Digest samples the estimate takes the median of.
const DIGEST_SAMPLES: usize = 3;

/// A sample of the guest's digest.
#[derive(Debug, Clone, Copy)]
struct DigestSample {
    /// Seconds to digest a GiB of the guest on one CPU.
    seconds_per_gib: f64,
    /// The share of the guest that is not holes (the digest reads only that).
    data_fraction: f64,
}

/// 32 pieces of 512 KiB spread over the regions (their mix of zero, hole and data pages,
/// not just the first pages), each read and hashed as the full digest does.
fn sample_digest(regions: &[Region]) -> Result<DigestSample, SessionError> {
    const PIECES: u64 = 32;
    const PIECE: u64 = 512 << 10;
    let size: u64 = regions.iter().map(|r| r.size).sum();
    if size == 0 {
        return Ok(DigestSample { seconds_per_gib: 0.0, data_fraction: 0.0 });
    }
    let mut buf = vec![0u8; PIECE as usize];
    let (mut d, mut sampled, mut holes) = (Digest::default(), 0u64, 0u64);
    let t = Instant::now();
    for k in 0..PIECES {
        // The k-th piece of the regions laid end to end.
        let mut at = size / PIECES * k;
        let Some((i, r)) = regions.iter().enumerate().find(|(_, r)| {
            let inside = at < r.size;
            if !inside {
                at -= r.size;
            }
            inside
        }) else {
            continue;
        };
        let off = at / PAGE as u64 * PAGE as u64;
        let len = PIECE.min(r.size - off);
        if r.probe_holes && crate::digest::is_hole(&r.memory, off, len) {
            d.add_zero(i as u32, off / PAGE as u64, PAGE, len);
            holes += len;
        } else {
            r.memory
                .read_exact_at(&mut buf[..len as usize], off)
                .map_err(|source| SessionError::Region { path: format!("guest memory region {i}"), source })?;
            d.add(i as u32, off / PAGE as u64, PAGE, &buf[..len as usize]);
        }
        sampled += len;
    }
    std::hint::black_box(d);
    let sample = DigestSample {
        seconds_per_gib: t.elapsed().as_secs_f64() / (sampled.max(1) as f64 / (1u64 << 30) as f64),
        data_fraction: 1.0 - holes as f64 / sampled.max(1) as f64,
    };
    log::debug!("digest sample: {:.1} ms per GiB on one CPU, {:.0}% not holes", sample.seconds_per_gib * 1e3, sample.data_fraction * 1e2);
    Ok(sample)
}

/// Threads for the full digest in the paused last round: every CPU (the VMM has paused).
fn digest_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The runs of dirty pages of every region, in frames of at most
/// [`wire::RDMA_RUNS_PER_FRAME`] handed to `frame`; returns how many runs there are.
fn rdma_runs(
    regions: &[Region],
    dirty: &[u64],
    frame: &mut dyn FnMut(&[wire::RdmaRun]) -> Result<(), SessionError>,
) -> Result<u64, SessionError> {
    let mut buf: Vec<wire::RdmaRun> = Vec::with_capacity(wire::RDMA_RUNS_PER_FRAME.min(4096));
    let mut n = 0u64;
    let mut failed = None;
    for (i, r) in regions.iter().enumerate() {
        let bits = &dirty[r.word..r.word + r.words];
        crate::worker::dirty_runs(bits, 0, super::pages(r.size), &mut |mut s, e| {
            while s < e && failed.is_none() {
                let len = (e - s).min(u64::from(u32::MAX));
                buf.push(wire::RdmaRun { region: (i as u32).into(), pages: (len as u32).into(), first: s.into() });
                n += 1;
                s += len;
                if buf.len() == wire::RDMA_RUNS_PER_FRAME {
                    failed = frame(&buf).err();
                    buf.clear();
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    if !buf.is_empty() {
        frame(&buf)?;
    }
    Ok(n)
}

/// SESSION: the session's layout, its lanes and their transport; the destination's id
/// for it (SESSION_OK).
fn describe(ctl: &mut Ctl, layout: &Layout, lanes: usize, transport: wire::DataTransport) -> Result<u64, SessionError> {
    ctl.send(Kind::Session, &wire::session_payload(layout, lanes as u16, transport))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::SessionOk, &mut buf)?;
    Ok(wire::parse::<wire::SessionOk>(Kind::SessionOk, &buf)?.session.get())
}

/// The TCP lanes of session `session` for `n_workers` workers of `per_worker` lanes each:
/// connected, authenticated, and set on their transport (io_uring or sockets).
fn tcp_workers(
    ctl: &mut Ctl,
    opts: &SourceOptions<'_>,
    pool: &Pool,
    live: &crate::live::Session,
    session: u64,
    n_workers: usize,
    per_worker: usize,
) -> Result<Vec<Worker>, SessionError> {
    let plan = opts.plan;
    // The pool's arenas were mapped once, when it started: what that said is said for
    // every session.
    for (important, n) in pool.notes() {
        live.note(*important, n);
    }
    let mut workers = Vec::with_capacity(n_workers);
    // A fallback is said once per session, not once per worker.
    let mut note = |why: String| live.note(true, &why);
    for w in 0..n_workers {
        let mut lanes = Vec::with_capacity(per_worker);
        for c in 0..per_worker {
            let mut s = connect_data(&opts.to, plan).map_err(|e| gone_or(ctl, e, "opening the data lanes"))?;
            let (_, keys) = client_handshake(&mut s, &opts.auth, (w * per_worker + c) as u16, session, 0)?;
            lanes.push(Lane::new(s, keys.tx));
        }
        let tx = Tx::open(lanes, plan.tcp.io_uring, plan.tcp.ring_entries, plan.tcp.send_zc, &opts.to, &mut note);
        workers.push(Worker::new(w, live.worker(w), Encoder::new(plan.compression), tx));
    }
    Ok(workers)
}

/// `e`, unless the destination has ended the session meanwhile (its control connection
/// is readable: an ERROR, or its end), which is then the reason: a lane that cannot
/// connect to a receiver that died says so, not "connection refused".
fn gone_or(ctl: &mut Ctl, e: SessionError, op: &str) -> SessionError {
    let mut fds = [PollFd::new(ctl.s.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => crate::engine::recv::peer_ended(ctl, op),
        _ => e,
    }
}

/// Waits until `n` workers have said they are done on `woken`, watching the control
/// connection meanwhile: readable there means the destination sent ERROR (or closed),
/// which is returned with how many workers had finished. The round's `sent` bytes are
/// passed on to `progress` as they grow.
fn watch_round(
    ctl: &mut Ctl,
    woken: &UnixStream,
    n: usize,
    sent: &AtomicU64,
    progress: Option<&AtomicU64>,
) -> (usize, Option<SessionError>) {
    let mut finished = 0;
    let mut bytes = [0u8; 64];
    let mut told = 0;
    let mut tell = || {
        if let Some(p) = progress {
            let now = sent.load(Ordering::Relaxed);
            p.fetch_add(now - told, Ordering::Relaxed);
            told = now;
        }
    };
    // With a progress bar to feed, look at the count ten times a second.
    let timeout = if progress.is_some() { PollTimeout::from(100u8) } else { PollTimeout::NONE };
    while finished < n {
        let mut fds = [PollFd::new(woken.as_fd(), PollFlags::POLLIN), PollFd::new(ctl.s.as_fd(), PollFlags::POLLIN)];
        let r = poll(&mut fds, timeout);
        tell();
        match r {
            Ok(0) => {}
            Ok(_) if fds[0].revents().is_some_and(|r| !r.is_empty()) => match (&*woken).read(&mut bytes[..(n - finished).min(64)]) {
                Ok(k) => finished += k,
                Err(e) => return (finished, Some(SessionError::io("waiting for the workers", e))),
            },
            Ok(_) => return (finished, Some(crate::engine::recv::peer_ended(ctl, "sending a round"))),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return (finished, Some(SessionError::io("waiting for the workers", e.into()))),
        }
    }
    tell();
    (finished, None)
}

/// What an RDMA session's lanes are to be.
struct RdmaLanes<'p> {
    rp: &'p crate::plan::RdmaPlan,
    layout: &'p Layout,
    regions: &'p [Region],
    /// Per region, the VMM's descriptor when it is read-write.
    writable: &'p [Option<File>],
    workers: usize,
    /// One-sided writes are checked at the end, not each round ([`wire::ONE_SIDED_AT_END`]).
    at_end: bool,
}

/// An RDMA session's workers: each with its CQ and QPs, connected to the destination's
/// through RDMA_CONNECT and RDMA_ACCEPT, and its arena registered.
fn rdma_workers(
    ctl: &mut Ctl,
    plan: &Plan,
    want: &RdmaLanes<'_>,
    live: &crate::live::Session,
    abort: &Arc<AtomicBool>,
) -> Result<(Vec<Worker>, RdmaReport), SessionError> {
    use crate::transport::rdma::{self, tx};
    let &RdmaLanes { rp, layout, regions: memory, writable, workers: n_workers, at_end } = want;
    let qpw = rp.qps_per_worker as usize;
    let lanes = n_workers * qpw;
    let chunk = layout.max_chunk as usize;
    let dev = rdma::device(rp)?;
    let unconnected = (0..n_workers).map(|_| tx::create(&dev, rp, qpw)).collect::<Result<Vec<_>, _>>()?;
    let eps: Vec<wire::RdmaEndpoint> = unconnected.iter().flat_map(|u| u.qps.iter().map(|(qp, psn)| dev.endpoint(qp, *psn))).collect();
    let hello = wire::RdmaConnect {
        workers: (n_workers as u16).into(),
        qps_per_worker: (qpw as u16).into(),
        mtu: dev.mtu.into(),
        infiniband: u8::from(dev.gid_index.is_none()),
        check: if at_end { wire::ONE_SIDED_AT_END } else { wire::ONE_SIDED_EACH_ROUND },
        _pad: [0; 6],
    };
    ctl.send(Kind::RdmaConnect, &wire::list_payload(&hello, &eps))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::RdmaAccept, &mut buf)?;
    let (acc, peers, regions) =
        wire::parse_lists::<wire::RdmaAccept, wire::RdmaEndpoint, wire::RdmaRegion>(Kind::RdmaAccept, &buf, lanes, layout.regions.len())?;
    let mtu = rdma::check_mtu(acc.mtu.get())?;
    if mtu > dev.mtu {
        return Err(Violation::Mtu { chose: mtu, ours: dev.mtu }.into());
    }
    let credits = acc.credits.get();
    if credits == 0 {
        return Err(Violation::NoCredits.into());
    }
    let remote: Vec<(u64, u32)> = regions.iter().map(|r| (r.addr.get(), r.rkey.get())).collect();
    let windows = rdma::Windows::new(&layout.regions, chunk as u64)?;
    let key = ctl.digest_key().clone();
    let check = if at_end { rdma::Check::AtEnd } else { rdma::Check::EachRound };
    let mut report = RdmaReport { device: dev.name.clone(), qps: lanes as u32, path_mtu: mtu, check, ..RdmaReport::default() };
    // Pages hashed as sent are read anyway: zero-copy pays only when they are not.
    let guest = if at_end {
        let t = Instant::now();
        match register_guest(&dev, memory, writable) {
            Ok(g) => {
                report.registration(memory.iter().map(|r| r.size).sum(), t);
                report.zero_copy = true;
                log::info!("the guest memory is registered on {}: the NIC gathers its pages in place", dev.name);
                Some(g)
            }
            Err(why) => {
                log::info!("pages are staged through registered buffers: {why}");
                report.staging_reason = Some(why);
                None
            }
        }
    } else {
        report.staging_reason = Some("verify sent hashes every page as sent, so each is read into a staging buffer anyway".into());
        None
    };
    let mut workers = Vec::with_capacity(n_workers);
    for (w, u) in unconnected.into_iter().enumerate() {
        let (staging, registered) = dev.staging(plan, chunk, live)?;
        match registered {
            Some(seconds) => report.registered(staging.bytes, seconds),
            None => report.reused_staging_bytes += staging.bytes,
        }
        let setup = tx::Setup {
            dev: dev.clone(),
            rp,
            mtu,
            credits,
            peers: &peers[w * qpw..(w + 1) * qpw],
            remote: remote.clone(),
            windows: windows.clone(),
            key: (!at_end).then(|| key.clone()),
            guest: guest.clone(),
            staging,
            abort: abort.clone(),
        };
        let t = tx::RdmaTx::connect(u, setup)?;
        // RDMA writes pages as they are: the encoder only counts.
        let enc = Encoder::new(crate::plan::Compression::Off);
        workers.push(Worker::new(w, live.worker(w), enc, Tx::Rdma(Box::new(t))));
    }
    log::info!("{lanes} RDMA QP(s) connected on {} (MTU {mtu}, {credits} credits per QP)", dev.name);
    Ok((workers, report))
}

/// Registers region `i` for the NIC's reads (local reads; and the peer's RDMA READs too
/// with `remote_read`): read-only first; where the kernel refuses that (before 6.2 it pins
/// for writing even to read), through the VMM's read-write descriptor `rw` if it gave one
/// (the NIC still only reads). Or why not.
pub(crate) fn register_region(
    pd: &hw::rdma::verbs::Pd,
    i: usize,
    r: &Region,
    rw: Option<&File>,
    remote_read: bool,
) -> Result<LocalRegion, String> {
    let len = usize::try_from(r.size).map_err(|_| format!("region {i} is too large to map"))?;
    let reg = |f: &File| if remote_read { pd.register_remote_read(f, len) } else { pd.register_local_read(f, len) };
    match (reg(&r.memory), rw) {
        (Ok(g), _) => Ok(g),
        (Err(e), None) => Err(format!("registering region {i} read-only failed ({e}), and the VMM gave no read-write descriptor")),
        (Err(_), Some(rw)) => reg(rw).map_err(|e| format!("registering region {i} failed: {e}")),
    }
}

/// The guest memory registered for the NIC's local reads, every region of it; or why not.
/// Registering pins every page, which would allocate the pages a sparse guest never
/// touched, so memory not wholly allocated is staged instead ([`unallocated`]), as is
/// memory the kernel will not register. A read-only mapping is tried first; where the
/// kernel refuses it (before 6.2 it pins for writing even to read), the VMM's read-write
/// descriptor is mapped read-write instead, if it gave one (the NIC still only reads).
fn register_guest(
    dev: &crate::transport::rdma::Device,
    regions: &[Region],
    writable: &[Option<File>],
) -> Result<Arc<[LocalRegion]>, String> {
    let mut out = Vec::with_capacity(regions.len());
    for ((i, r), rw) in regions.iter().enumerate().zip(writable) {
        let missing = unallocated(&r.memory, r.size).map_err(|e| format!("region {i} cannot be examined: {e}"))?;
        if missing > 0 {
            return Err(format!(
                "{} MiB of region {i} were never allocated (a guest that has not touched all of its memory), which registering would allocate",
                missing >> 20
            ));
        }
        // The device's PD: the sender's QPs grant the peer nothing.
        out.push(register_region(&dev.pd, i, r, rw.as_ref(), false)?);
    }
    Ok(out.into())
}

/// A descriptor of `file`'s open file description if it is read-write.
fn read_write(file: &File) -> Option<File> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL).ok()?);
    (flags & OFlag::O_ACCMODE == OFlag::O_RDWR).then(|| file.try_clone().ok()).flatten()
}

/// Bytes of the first `len` of `file` that have no memory behind them yet (its allocated
/// blocks, which count pages written or preallocated, against its length).
fn unallocated(file: &File, len: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(len.saturating_sub(file.metadata()?.blocks().saturating_mul(512)))
}

/// Checks and opens region `i`; its bitmap words start at `word`. A migration's regions
/// must be memory; a transfer's may be any regular file (or memfd).
fn open_region(i: usize, memory: &File, word: usize, job: Job) -> Result<Region, SessionError> {
    let what = match (job, i) {
        (Job::Transfer, _) => "the file".to_string(),
        (Job::Migrate, 0) => "the guest memory descriptor".to_string(),
        (Job::Migrate, _) => format!("guest memory region {i}"),
    };
    let err = |source| SessionError::Region { path: what.clone(), source };
    match job {
        Job::Migrate if !hw::memmap::is_memory_file(memory).map_err(err)? => {
            return Err(Refusal::NotMemory { what: what.clone(), is: hw::memmap::describe(memory) }.into());
        }
        Job::Transfer if !memory.metadata().map_err(err)?.is_file() => {
            return Err(Refusal::NotRegular { what: what.clone(), is: hw::memmap::describe(memory) }.into());
        }
        _ => {}
    }
    // A description of our own, read-only: the descriptor the VMM passed shares its file
    // offset with the VMM, which the hole probes (lseek SEEK_DATA) would move.
    let (memory, probe_holes) = match hw::memmap::reopen_read_only(memory) {
        Ok(f) => (f, true),
        Err(e) => {
            log::warn!("cannot reopen {what} through /proc ({e}): every page is read, holes included");
            (memory.try_clone().map_err(err)?, false)
        }
    };
    let size = memory.metadata().map_err(err)?.len();
    if size == 0 && job == Job::Migrate {
        return Err(Refusal::Empty { what: what.clone() }.into());
    }
    let pages = super::pages(size);
    Ok(Region { memory, probe_holes, size, word, words: pages.div_ceil(64) as usize, sent: PageHashes::new(pages)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory a guest never touched has nothing behind it; written or preallocated, it
    /// does (what decides zero-copy RDMA).
    #[test]
    fn unallocated_counts_untouched_memory() {
        let len = 64 * PAGE as u64;
        let mut m = hw::memmap::OwnedMemory::new("ferry-test-alloc", len).unwrap();
        m.as_mut_slice()[..PAGE].fill(1);
        let f = m.reader().unwrap();
        assert_eq!(unallocated(&f, len).unwrap(), 63 * PAGE as u64, "the pages after the first are untouched");
        let shared = hw::memmap::SharedMemory::new("ferry-test-prealloc", len).unwrap();
        assert_eq!(unallocated(shared.file(), len).unwrap(), 0, "preallocated");
        assert!(read_write(shared.file()).is_some() && read_write(&f).is_none(), "which descriptors are read-write");
    }
}
