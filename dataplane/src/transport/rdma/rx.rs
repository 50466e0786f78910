//! The receiving side of the RDMA transport: the destination's regions registered for
//! remote writes, a poller per sender worker on the pool's receiving threads (its CQ's
//! channel in the thread's epoll set), and the rounds on the control connection (see
//! [`super`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hw::rdma::verbs::{Completion, Cq, Grant, Qp, QpCaps, SendOp};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use zerocopy::{FromBytes, IntoBytes};

use super::{Check, POLL_BATCH, RdmaReport, Windows, check_mtu, completion_error, keyed};
use crate::conn::{Counted, Ctl, Refusal, SessionError, Violation};
use crate::digest::{Digest, DigestKey};
use crate::engine::{IDLE_TIMEOUT, PAGE, cpu_seconds};
use crate::migrate::dest::{Landed, Received, SinkOptions};
use crate::migrate::{MigrationReport, PageHashes, ROUND_IDLE_TIMEOUT, RoundReport};
use crate::sink::Turn;
use crate::wire::{self, Kind, Layout};

/// How the rounds ended.
enum Ended {
    /// With the last round; checked at the end, with the digest of what landed.
    Last(Option<Digest>),
    /// With SWITCH: the pages still stale.
    Switch(Vec<wire::RdmaRun>),
}

/// What a session's pollers share with its control thread.
pub(crate) struct Shared {
    /// Per lane: WRITE_WITH_IMMs received so far.
    received: Vec<AtomicU64>,
    /// Per poller: the windows its lanes' WRITE_WITH_IMMs named since the last drain.
    named: Vec<Mutex<Vec<u32>>>,
    /// Set by the first poller that fails, or by the control thread when the session ends.
    stop: AtomicBool,
    /// Per poller: counted up when `stop` is set, so a poller waiting on its CQ hears it.
    stopped: Vec<EventFd>,
    /// A byte here wakes the control thread when a poller fails.
    wake: UnixStream,
    windows: Windows,
    progress: Option<Arc<AtomicU64>>,
    device: String,
}

impl Shared {
    /// Ends the session for every poller.
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for f in &self.stopped {
            let _ = f.write(1);
        }
    }
}

/// Empty turns a poller takes (its CQ polled each time) before it arms the CQ and waits
/// for its channel: a busy CQ is never waited on.
const EMPTY_TURNS: u32 = 64;

/// One sender worker's QPs at the destination, on a receiving thread of the pool: polls
/// their CQ, counts WRITE_WITH_IMMs, notes the windows they name, re-posts receives and
/// returns them as credits.
pub(crate) struct Poller {
    index: usize,
    qps: Vec<Qp>,
    cq: Cq,
    first_lane: usize,
    shared: Arc<Shared>,
    credit_batch: u32,
    send_depth: u32,
    /// Test hook (`FERRY_TEST_RDMA_QP_ERROR_AFTER=N`): move the first QP to the error
    /// state after N WRITE_WITH_IMMs, as a failing NIC or a destroyed QP would.
    fail_after: Option<u64>,
    live: crate::live::WorkerCounters,
    /// Per QP: receives completed and not yet re-posted; credit SENDs in flight.
    pending: Vec<u32>,
    sends: Vec<u32>,
    named: Vec<u32>,
    empty: u32,
    /// The CQ is armed and its event not taken yet.
    armed: bool,
    finished: mpsc::SyncSender<(usize, Result<(), SessionError>)>,
    outcome: Option<Result<(), SessionError>>,
}

impl Poller {
    /// What the receiving thread waits on for this poller: its CQ's channel and its stop.
    pub(crate) fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.cq.channel_fd().into_iter().chain([self.shared.stopped[self.index].as_fd()]).collect()
    }

    /// A turn: the completions there are, handled; `Over` once the session ended or on
    /// a failure (kept for [`Poller::finish`]).
    pub(crate) fn turn(&mut self) -> Turn {
        if self.shared.stop.load(Ordering::Relaxed) {
            self.outcome = Some(Ok(()));
            return Turn::Over;
        }
        match self.try_turn() {
            Ok(t) => t,
            Err(e) => {
                self.outcome = Some(Err(e));
                Turn::Over
            }
        }
    }

    fn try_turn(&mut self) -> Result<Turn, SessionError> {
        // The channel's event is taken once it came: the channel stays readable until then.
        if self.armed && self.cq.wait(Duration::ZERO)? {
            self.armed = false;
        }
        let mut wcs = [Completion::default(); POLL_BATCH];
        let mut got = 0;
        for _ in 0..4 {
            let n = self.cq.poll(&mut wcs)?;
            self.completed(&wcs[..n])?;
            got += n;
            if n < POLL_BATCH {
                break;
            }
        }
        if got == 0 {
            self.empty += 1;
            if self.empty < EMPTY_TURNS {
                return Ok(Turn::More);
            }
            // Armed, then polled once more: a completion between the last poll and the
            // arming has no event, and would wait otherwise.
            self.cq.arm()?;
            self.armed = true;
            let n = self.cq.poll(&mut wcs)?;
            self.completed(&wcs[..n])?;
            if n == 0 {
                return Ok(Turn::Idle);
            }
        }
        self.empty = 0;
        Ok(Turn::More)
    }

    fn completed(&mut self, wcs: &[Completion]) -> Result<(), SessionError> {
        let sh = &*self.shared;
        for wc in wcs {
            let l = wc.wr_id as usize;
            if let Some(failure) = wc.failure() {
                let what = if wc.is_recv() { "a receive for RDMA WRITE_WITH_IMM" } else { "a credit SEND" };
                return Err(completion_error(failure, &sh.device, what));
            }
            if wc.is_recv() {
                self.pending[l] += 1;
                if let Some(id) = wc.imm {
                    self.named.push(id);
                    let bytes = sh.windows.range(id).map_or(0, |(_, a, b)| b - a);
                    self.live.add(bytes, 0, 1, 0);
                    if let Some(p) = &sh.progress {
                        p.fetch_add(bytes, Ordering::Relaxed);
                    }
                }
                // Counted after the window is noted (below, before this turn ends): see
                // the release store there.
            } else {
                self.sends[l] -= 1;
            }
        }
        if !wcs.is_empty() {
            if !self.named.is_empty() {
                sh.named[self.index].lock().unwrap_or_else(|p| p.into_inner()).append(&mut self.named);
            }
            for wc in wcs.iter().filter(|wc| wc.is_recv()) {
                // Release pairs with the control thread's acquire: the window ids noted
                // above are in `named` before the write is counted.
                sh.received[self.first_lane + wc.wr_id as usize].fetch_add(1, Ordering::Release);
            }
        }
        if let Some(after) = self.fail_after
            && sh.received[self.first_lane].load(Ordering::Relaxed) >= after
        {
            log::warn!("FERRY_TEST_RDMA_QP_ERROR_AFTER: moving QP {} to the error state", self.qps[0].qpn());
            self.qps[0].set_error()?;
            self.fail_after = None;
        }
        for l in 0..self.qps.len() {
            if self.pending[l] >= self.credit_batch && self.sends[l] < self.send_depth {
                self.qps[l].post_recvs(l as u64, self.pending[l] as usize)?;
                self.qps[l].post_empty(l as u64, SendOp::SendImm { imm: self.pending[l] }, true)?;
                self.sends[l] += 1;
                self.pending[l] = 0;
            }
        }
        Ok(())
    }

    /// Ends the poller with `failure`, or what its turns came to: its QPs and CQ are
    /// destroyed first (nothing writes the destination through them after), a failure
    /// stops the session's other pollers and wakes its control thread, and the end goes
    /// to the session.
    pub(crate) fn finish(mut self, failure: Option<SessionError>) {
        let r = match failure {
            Some(e) => Err(e),
            None => self.outcome.take().unwrap_or(Err(SessionError::Stopped)),
        };
        let Poller { index, qps, cq, shared, finished, .. } = self;
        drop(qps);
        drop(cq);
        if r.is_err() && !shared.stop.load(Ordering::Relaxed) {
            shared.stop();
            let _ = (&shared.wake).write(&[1]);
        }
        drop(shared);
        // The queue has room for every poller's end.
        let _ = finished.try_send((index, r));
    }
}

/// RDMA_CONNECT's workers and QPs per worker, which must make the session's lanes.
fn workers_and_qps(hello: &wire::RdmaConnect, lanes: usize) -> Result<(usize, usize), SessionError> {
    let (workers, qpw) = (usize::from(hello.workers.get()), usize::from(hello.qps_per_worker.get()));
    if workers == 0 || qpw == 0 || workers * qpw != lanes {
        let allowed = "workers x QPs per worker = the session's lanes";
        return Err(Violation::Field { frame: Kind::RdmaConnect, field: "workers x QPs", value: (workers * qpw) as u64, allowed }.into());
    }
    Ok((workers, qpw))
}

/// The receiving loop of an RDMA session (SESSION_OK sent): the QP exchange, then each
/// round's one-sided writes, waited for and hashed (keyed) before ROUND_OK, then DONE's
/// digest against what landed. RESULT is the caller's to send.
pub(crate) fn receive(ctl: &mut Ctl, layout: &Layout, lanes: u16, memory: &[File], o: &SinkOptions<'_>) -> Result<Received, SessionError> {
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let lanes = usize::from(lanes);
    let key = ctl.digest_key().clone();
    let mut buf = Vec::new();
    ctl.expect(Kind::RdmaConnect, &mut buf)?;
    let (hello, peer) = wire::parse_list::<wire::RdmaConnect, wire::RdmaEndpoint>(Kind::RdmaConnect, &buf, lanes)?;
    let (workers, qpw) = workers_and_qps(&hello, lanes)?;
    let Accepted { dev, regions, cqs, qps, mut report, credit_batch, send_depth } = accept(ctl, &hello, peer, memory, layout, o)?;
    let check = report.check;
    let size: u64 = layout.regions.iter().sum();
    let windows = Windows::new(&layout.regions, u64::from(layout.max_chunk))?;
    let hashes = zero_hashes(layout, &key, check)?;
    let written = layout.regions.iter().map(|&b| Written::new(b)).collect::<Result<Vec<_>, _>>()?;
    let fail_after = std::env::var("FERRY_TEST_RDMA_QP_ERROR_AFTER").ok().and_then(|v| v.parse().ok());
    let (wake, woken) = UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e))?;
    let stopped = (0..workers)
        .map(|_| EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SessionError::io("making a poller's stop counter", e.into()))?;
    let shared = Arc::new(Shared {
        received: (0..lanes).map(|_| AtomicU64::new(0)).collect(),
        named: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
        stop: AtomicBool::new(false),
        stopped,
        wake,
        windows,
        progress: o.progress.clone(),
        device: dev.name.clone(),
    });
    // This session's own counters, one per sender worker (its QPs share a poller).
    let live = crate::live::receiver(o.role, o.session, workers, size);
    // Without ferryd's receiving threads, the run's own (an embedded run).
    let mut own = None;
    let pool = crate::pool::Pool::receivers(o.pool, o.plan, &mut own)?;
    let (fin_tx, finished) = crate::sink::ends(workers);
    // Pollers handed to the receiving threads, and why the next one could not be.
    let (mut handed, mut refused) = (0usize, None);
    for (w, (cq, mine)) in cqs.into_iter().zip(qps).enumerate() {
        let p = Poller {
            index: w,
            pending: vec![0; mine.len()],
            sends: vec![0; mine.len()],
            qps: mine,
            cq,
            first_lane: w * qpw,
            shared: shared.clone(),
            credit_batch,
            send_depth,
            fail_after: if w == 0 { fail_after } else { None },
            live: live.worker(w),
            named: Vec::new(),
            empty: 0,
            armed: false,
            finished: fin_tx.clone(),
            outcome: None,
        };
        match pool.submit_rx(crate::sink::RxTask::Rdma(Box::new(p)), w) {
            Ok(()) => handed += 1,
            Err(b) => {
                refused = Some(b.1);
                break;
            }
        }
    }
    drop(fin_tx);
    let ctx = Rounds {
        shared: &shared,
        woken: &woken,
        vmm: o.vmm,
        memory,
        hashes: &hashes,
        key: &key,
        written: Mutex::new(written),
        layout_sizes: &layout.regions,
        check,
    };
    let rounds = match refused {
        None => ctx.run(ctl, lanes, &mut report),
        Some(e) => Err(e),
    };
    shared.stop();
    // Every poller handed over has ended (its QPs with it) before the registrations go.
    // A poller's own failure says what failed; the control thread's is what it saw next.
    let mut results: Vec<_> = finished.iter().take(handed).collect();
    results.sort_by_key(|(w, _)| *w);
    for (_, r) in results {
        r?;
    }
    let (rounds, ended) = rounds?;
    // Nothing may write the destination any more: the QPs went with their pollers; now
    // the registrations go.
    drop(regions);
    let (digest, stale) = match ended {
        Ended::Last(at_end) => {
            let digest: Digest = at_end.unwrap_or_else(|| hashes.iter().map(PageHashes::fold).sum());
            crate::migrate::dest::check_done(ctl, &mut buf, digest, size)?;
            (digest, None)
        }
        // Post-copy places the rest (SWITCHED is the caller's to send).
        Ended::Switch(stale) => (Digest::default(), Some(stale)),
    };
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds_per_gib = (cpu_seconds() - cpu0) / (size.max(1) as f64 / (1u64 << 30) as f64);
    let report = MigrationReport {
        bytes: size,
        seconds,
        cpu_seconds_per_gib,
        lanes: lanes as u32,
        workers: workers as u32,
        digest: digest.hex(),
        ..destination_report(rounds, report)
    };
    let switch = stale.is_some().then_some(Landed { hashes, key: Some(key) });
    Ok(Received { report, digest, write_latency: Vec::new(), stale, switch })
}

/// The destination's report of an RDMA session from its rounds and RDMA figures (the
/// caller fills in sizes, times and the digest).
fn destination_report(rounds: Vec<RoundReport>, rdma: RdmaReport) -> MigrationReport {
    MigrationReport {
        role: "destination".into(),
        sent_bytes: rounds.iter().map(|r| r.dirty_bytes).sum(),
        wire_bytes: rounds.iter().map(|r| r.wire_bytes).sum(),
        zero_pages: rounds.iter().map(|r| r.zero_pages).sum(),
        downtime_ms: rounds.last().map_or(0.0, |r| r.seconds * 1e3),
        transport: crate::plan::Transport::Rdma.to_string(),
        compression: "off (RDMA writes place pages directly)".into(),
        digest_match: true,
        rounds,
        rdma: Some(rdma),
        ..MigrationReport::default()
    }
}

/// An RDMA session's receiving side, set up: the destination registered for remote
/// writes, a CQ and QPs per sender worker, connected.
struct Accepted {
    dev: std::sync::Arc<super::Device>,
    regions: Vec<hw::rdma::verbs::RemoteRegion>,
    cqs: Vec<Cq>,
    qps: Vec<Vec<Qp>>,
    report: RdmaReport,
    credit_batch: u32,
    send_depth: u32,
}

/// Answers RDMA_CONNECT (`hello`, the sender's `peer` endpoints): registers `memory` for
/// remote writes, connects a QP per lane with its receives posted, and sends RDMA_ACCEPT.
fn accept(
    ctl: &mut Ctl,
    hello: &wire::RdmaConnect,
    peer: &[wire::RdmaEndpoint],
    memory: &[File],
    layout: &Layout,
    o: &SinkOptions<'_>,
) -> Result<Accepted, SessionError> {
    let (workers, qpw) = (usize::from(hello.workers.get()), usize::from(hello.qps_per_worker.get()));
    let lanes = workers * qpw;
    let rp = o.plan.rdma.as_ref().ok_or(Refusal::NoRdmaDevice)?;
    let dev = super::device(rp)?;
    if (hello.infiniband == 1) != dev.gid_index.is_none() {
        return Err(Refusal::LinkLayers.into());
    }
    let mtu = check_mtu(hello.mtu.get().min(dev.mtu))?;
    let check = match hello.check {
        wire::ONE_SIDED_EACH_ROUND => Check::EachRound,
        wire::ONE_SIDED_AT_END => Check::AtEnd,
        c => {
            let allowed = "each round (0) or at the end (1)";
            return Err(Violation::Field { frame: Kind::RdmaConnect, field: "check", value: c.into(), allowed }.into());
        }
    };
    let mut report = RdmaReport { device: dev.name.clone(), qps: lanes as u32, path_mtu: mtu, check, ..RdmaReport::default() };
    // A protection domain of the session's own: its QPs, which grant remote writes, reach
    // only its own memory, whatever rkey the peer tries (another session's destination is
    // registered in another PD).
    let pd = dev.ctx.alloc_pd()?;
    let t = Instant::now();
    let regions =
        memory.iter().zip(&layout.regions).map(|(m, &size)| pd.register_remote_write(m, size as usize)).collect::<Result<Vec<_>, _>>()?;
    let size: u64 = layout.regions.iter().sum();
    report.registration(size, t);
    log::info!(
        "registered {} MiB of destination on {} for remote writes in {:.3} s ({:.2} GB/s)",
        size >> 20,
        dev.name,
        report.registration_seconds,
        report.registration_gbps
    );
    let credits = rp.rq_depth.max(1);
    // Credits go back in batches of a quarter of the receive queue, so at most five
    // credit messages are ever in flight per QP.
    let credit_batch = (credits / 4).max(1);
    let send_depth = credits.div_ceil(credit_batch) + 1;
    let cq_depth = (qpw as u32 * (credits + send_depth)) as i32;
    let cqs = (0..workers).map(|_| dev.ctx.create_waitable_cq(cq_depth)).collect::<Result<Vec<_>, _>>()?;
    let caps = QpCaps { max_send_wr: send_depth, max_recv_wr: credits, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 };
    let mut qps: Vec<Vec<Qp>> = Vec::with_capacity(workers);
    let mut eps = Vec::with_capacity(lanes);
    for cq in &cqs {
        let mut mine = Vec::with_capacity(qpw);
        for l in 0..qpw {
            let (mut qp, _) = pd.create_rc_qp(cq, caps)?;
            let p = super::psn()?;
            qp.connect(&dev.path(mtu), p, &super::remote(&peer[eps.len()]), Grant::RemoteWrite)?;
            // Receives can be posted from INIT on; these are in place before RDMA_ACCEPT
            // lets the sender write.
            qp.post_recvs(l as u64, credits as usize)?;
            eps.push(dev.endpoint(&qp, p));
            mine.push(qp);
        }
        qps.push(mine);
    }
    let regs: Vec<wire::RdmaRegion> =
        regions.iter().map(|r| wire::RdmaRegion { addr: r.addr().into(), rkey: r.rkey().into(), _pad: 0.into() }).collect();
    let acc = wire::RdmaAccept { mtu: mtu.into(), credits: credits.into() };
    ctl.send(Kind::RdmaAccept, &wire::lists_payload(&acc, &eps, &regs))?;
    log::info!("{lanes} RDMA QP(s) connected on {} (MTU {mtu}); the sender writes directly into the destination", dev.name);
    Ok(Accepted { dev, regions, cqs, qps, report, credit_batch, send_depth })
}

/// Every page's hash as the zero page it starts as (each round's windows replace theirs);
/// none when the writes are checked at the end.
fn zero_hashes(layout: &Layout, key: &DigestKey, check: Check) -> Result<Vec<PageHashes>, SessionError> {
    let per_page = if check == Check::EachRound { &layout.regions[..] } else { &[][..] };
    per_page
        .iter()
        .enumerate()
        .map(|(r, &bytes)| {
            let pages = crate::migrate::pages(bytes);
            let h = PageHashes::new(pages)?;
            for p in 0..pages {
                let len = (bytes - p * PAGE as u64).min(PAGE as u64);
                let mut d = Digest::default();
                d.add_zero_with(keyed(key), r as u32, p, PAGE, len);
                h.set(p, d);
            }
            Ok(h)
        })
        .collect::<Result<Vec<PageHashes>, crate::session::limits::LimitError>>()
        .map_err(SessionError::from)
}

/// The control thread's part of an RDMA session.
struct Rounds<'a> {
    shared: &'a Shared,
    woken: &'a UnixStream,
    /// The destination VMM's connection: when it stirs, the migration is cancelled.
    vmm: Option<BorrowedFd<'a>>,
    memory: &'a [File],
    hashes: &'a [PageHashes],
    key: &'a DigestKey,
    /// Per region: the pages the current round wrote (rounds after 0).
    written: Mutex<Vec<Written>>,
    layout_sizes: &'a [u64],
    check: Check,
}

/// A region's pages written in a round, one bit each.
struct Written {
    words: Vec<u64>,
    pages: u64,
}

impl Written {
    fn new(bytes: u64) -> Result<Written, crate::session::limits::LimitError> {
        let pages = crate::migrate::pages(bytes);
        let n = pages.div_ceil(64) as usize;
        let mut words = Vec::new();
        words
            .try_reserve_exact(n)
            .map_err(|_| crate::session::limits::LimitError::Alloc { what: "the written-page bitmap", bytes: n as u64 * 8 })?;
        words.resize(n, 0);
        Ok(Written { words, pages })
    }

    /// Marks pages `first..end` (within the region).
    fn mark(&mut self, first: u64, end: u64) {
        let mut p = first;
        while p < end {
            let w = p / 64;
            let upto = ((w + 1) * 64).min(end);
            self.words[w as usize] |= crate::worker::word_mask(w, p, upto);
            p = upto;
        }
    }
}

impl Rounds<'_> {
    /// Each round: RDMA_END says what each lane carried, RDMA_PAGES which pages the round
    /// wrote (after round 0), and ROUND (sent right after them) is checked against both;
    /// every WRITE_WITH_IMM RDMA_END announces is waited for, the pages written (round 0:
    /// the windows the WRITE_WITH_IMMs named) are hashed from what landed, and the round
    /// is confirmed. Checked at the end, nothing is hashed until the last round has
    /// landed; then all of the memory is digested, and that digest returned.
    fn run(&self, ctl: &mut Ctl, lanes: usize, report: &mut RdmaReport) -> Result<(Vec<RoundReport>, Ended), SessionError> {
        let mut expected = vec![0u64; lanes];
        let mut buf = Vec::new();
        let mut reports = Vec::new();
        let mut started = Instant::now();
        loop {
            let round = reports.len() as u32;
            self.wait_ctl(ctl, round)?;
            let h = ctl.expect_any(&[Kind::RdmaEnd, Kind::Switch], &mut buf)?;
            if h.kind == Kind::Switch as u8 {
                return self.switch(ctl, round, &mut buf).map(|stale| (reports, Ended::Switch(stale)));
            }
            let (head, ends) = wire::parse_list::<wire::RdmaRoundEnd, wire::RdmaLaneEnd>(Kind::RdmaEnd, &buf, lanes)?;
            if head.round.get() != round {
                return Err(Violation::OutOfTurn { what: "RDMA_END of round", got: head.round.get().into(), next: round.into() }.into());
            }
            let ends = ends.to_vec();
            for (e, l) in expected.iter_mut().zip(&ends) {
                *e = e.checked_add(l.imms.get()).ok_or(Violation::Field {
                    frame: Kind::RdmaEnd,
                    field: "writes",
                    value: l.imms.get(),
                    allowed: "a total below 2^64",
                })?;
            }
            let whole = match head.whole.get() {
                0 => false,
                1 if head.runs.get() == 0 => true,
                w => {
                    return Err(Violation::Field {
                        frame: Kind::RdmaEnd,
                        field: "whole",
                        value: w.into(),
                        allowed: "0, or 1 with no runs",
                    }
                    .into());
                }
            };
            let run_pages = self.read_runs(ctl, head.runs.get(), &mut buf)?;
            ctl.expect(Kind::Round, &mut buf)?;
            let r: wire::Round = wire::parse(Kind::Round, &buf)?;
            let pages = ends.iter().try_fold(0u64, |a, e| a.checked_add(e.pages.get()));
            if r.round.get() != round {
                return Err(Violation::OutOfTurn { what: "ROUND", got: r.round.get().into(), next: round.into() }.into());
            }
            // The lanes' pages where they differ from ROUND's, else the runs' (unless whole).
            let lanes = pages.unwrap_or(u64::MAX);
            let found = if lanes != r.pages.get() || whole { lanes } else { run_pages };
            if found != r.pages.get() {
                return Err(Violation::Miscount { what: Counted::RdmaPages { round }, announced: r.pages.get(), found }.into());
            }
            let pages = r.pages.get();
            let last = r.last.get() == 1;
            self.wait_imms(ctl, &expected, round)?;
            let tv = Instant::now();
            let mut ids = Vec::new();
            for n in &self.shared.named {
                ids.append(&mut n.lock().unwrap_or_else(|p| p.into_inner()));
            }
            let mut at_end = None;
            match self.check {
                Check::EachRound if whole => self.hash_windows(&ids)?,
                Check::EachRound => self.hash_runs()?,
                Check::AtEnd if last => at_end = Some(self.digest_all()?),
                Check::AtEnd => {}
            }
            let verify = tv.elapsed().as_secs_f64();
            report.verify_seconds += verify;
            let ok = wire::RoundOk { round: round.into(), _pad: 0.into(), pages: pages.into() };
            ctl.send(Kind::RoundOk, ok.as_bytes())?;
            let seconds = started.elapsed().as_secs_f64();
            let dirty_bytes = (pages * PAGE as u64).min(self.windows_bytes());
            reports.push(RoundReport {
                round,
                last,
                dirty_pages: pages,
                dirty_bytes,
                zero_pages: ends.iter().map(|e| e.zero_pages.get()).sum(),
                wire_bytes: ends.iter().map(|e| e.bytes.get()).sum(),
                frames: ends.iter().map(|e| e.imms.get()).sum(),
                seconds,
                gbps: dirty_bytes as f64 / seconds / 1e9,
                ..RoundReport::default()
            });
            if last {
                report.verify_last_round_seconds = verify;
                return Ok((reports, Ended::Last(at_end)));
            }
            started = Instant::now();
        }
    }

    /// SWITCH instead of round `round`: post-copy from here. Every earlier round was
    /// confirmed, so every WRITE landed and (checked each round) was hashed: the hashes
    /// are post-copy's start. Checked at the end, nothing was hashed, and post-copy could
    /// never tell what pre-copy placed: the source refuses that switch-over first.
    fn switch(&self, ctl: &mut Ctl, round: u32, buf: &mut Vec<u8>) -> Result<Vec<wire::RdmaRun>, SessionError> {
        if round == 0 {
            return Err(Violation::Unexpected { frame: Kind::Switch, why: "before round 0: every page must be sent once first" }.into());
        }
        if self.check == Check::AtEnd {
            return Err(Violation::Unexpected { frame: Kind::Switch, why: "in a session checked at the end: no page was hashed" }.into());
        }
        let (stale, _) = crate::migrate::postcopy::recv_runs_after(ctl, Kind::Switch, buf)?;
        Ok(stale)
    }

    /// Reads `runs` page runs from RDMA_PAGES frames and (checked each round) marks their
    /// pages in `written`; returns how many pages they cover.
    fn read_runs(&self, ctl: &mut Ctl, runs: u64, buf: &mut Vec<u8>) -> Result<u64, SessionError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let (mut got, mut pages) = (0u64, 0u64);
        while got < runs {
            ctl.expect(Kind::RdmaPages, buf)?;
            let list = <[wire::RdmaRun]>::ref_from_bytes(buf).map_err(|_| Violation::Length {
                frame: Kind::RdmaPages,
                len: buf.len(),
                what: "runs",
            })?;
            if list.is_empty() || list.len() > wire::RDMA_RUNS_PER_FRAME || got + list.len() as u64 > runs {
                let allowed = "1 to RDMA_RUNS_PER_FRAME, within RDMA_END's count";
                return Err(Violation::Field { frame: Kind::RdmaPages, field: "runs", value: list.len() as u64, allowed }.into());
            }
            for run in list {
                let (region, first, n) = (run.region.get() as usize, run.first.get(), u64::from(run.pages.get()));
                let Some(bits) = written.get_mut(region) else {
                    return Err(Violation::NoRegion { frame: Kind::RdmaPages, region: region as u64, regions: self.memory.len() }.into());
                };
                let end = first.checked_add(n).filter(|&e| n > 0 && e <= bits.pages).ok_or(Violation::OutsideRegion {
                    frame: Kind::RdmaPages,
                    region: region as u32,
                    first,
                    pages: n,
                    has: bits.pages,
                })?;
                // Checked at the end, the runs are only counted: nothing hashes them.
                if self.check == Check::EachRound {
                    bits.mark(first, end);
                }
                pages += n;
            }
            got += list.len() as u64;
        }
        Ok(pages)
    }

    /// Hashes (keyed) every page marked in `written`, as it landed, on a few threads; the
    /// marks are cleared.
    fn hash_runs(&self) -> Result<(), SessionError> {
        const WORDS_PER_TASK: usize = 1024;
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let tasks: Vec<(usize, usize)> =
            written.iter().enumerate().flat_map(|(r, b)| (0..b.words.len()).step_by(WORDS_PER_TASK).map(move |w| (r, w))).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(tasks.len()).max(1);
        let next = AtomicU64::new(0);
        let marks: &[Written] = &written;
        crate::helpers::fan_out(threads, || -> Result<(), SessionError> {
            let mut buf = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&(region, w)) = tasks.get(i) else { return Ok(()) };
                let bits = &marks[region];
                let words = &bits.words[..(w + WORDS_PER_TASK).min(bits.words.len())];
                let mut failed = None;
                crate::worker::dirty_runs(words, w as u64 * 64, (words.len() as u64 * 64).min(bits.pages), &mut |a, b| {
                    if failed.is_none() {
                        failed = self.hash_pages(region as u32, a, b, &mut buf).err();
                    }
                });
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        })
        .into_iter()
        .collect::<Result<(), _>>()?;
        for b in written.iter_mut() {
            b.words.fill(0);
        }
        Ok(())
    }

    /// Hashes (keyed) pages `first..end` of `region` as they landed, reading at most 256
    /// pages at a time.
    fn hash_pages(&self, region: u32, first: u64, end: u64, buf: &mut Vec<u8>) -> Result<(), SessionError> {
        let size = self.layout_sizes[region as usize];
        let mut p = first;
        while p < end {
            let n = (end - p).min(256);
            let (from, to) = (p * PAGE as u64, ((p + n) * PAGE as u64).min(size));
            buf.resize((to - from) as usize, 0);
            self.memory[region as usize].read_exact_at(buf, from).map_err(|e| SessionError::io("reading what landed to verify it", e))?;
            for (k, pg) in buf.chunks(PAGE).enumerate() {
                let mut d = Digest::default();
                d.add_with(keyed(self.key), region, p + k as u64, PAGE, pg);
                self.hashes[region as usize].set(p + k as u64, d);
            }
            p += n;
        }
        Ok(())
    }

    fn windows_bytes(&self) -> u64 {
        self.memory.iter().map(|m| m.metadata().map_or(0, |md| md.len())).sum()
    }

    /// Waits until the control connection has a frame, a poller failed, the VMM went away,
    /// or the source has been silent for the round timeout.
    fn wait_ctl(&self, ctl: &Ctl, round: u32) -> Result<(), SessionError> {
        let ms = i32::try_from(ROUND_IDLE_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
        match self.poll(Some(ctl), PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX))? {
            true => Ok(()),
            false => Err(SessionError::TimedOut { op: format!("waiting for round {round}"), secs: ROUND_IDLE_TIMEOUT.as_secs() }),
        }
    }

    /// Polls the control connection (when given), the pollers' wake-up socket and the
    /// VMM's connection: true when the control connection is readable, false on timeout;
    /// an error when a poller failed or the VMM went away.
    fn poll(&self, ctl: Option<&Ctl>, timeout: PollTimeout) -> Result<bool, SessionError> {
        let mut fds = vec![PollFd::new(self.woken.as_fd(), PollFlags::POLLIN)];
        fds.extend(self.vmm.map(|v| PollFd::new(v, PollFlags::POLLIN)));
        fds.extend(ctl.map(|c| PollFd::new(c.s.as_fd(), PollFlags::POLLIN)));
        let stirred = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        loop {
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(false),
                Ok(_) if stirred(&fds[0]) => return Err(SessionError::Stopped),
                Ok(_) if self.vmm.is_some() && stirred(&fds[1]) => return Err(crate::migrate::dest::vmm_gone()),
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(SessionError::io("waiting for the next round", e.into())),
            }
        }
    }

    /// Waits until every lane has received the WRITE_WITH_IMMs announced so far. The
    /// source says nothing more until ROUND_OK: anything on the control connection now is
    /// its ERROR, or its end.
    fn wait_imms(&self, ctl: &mut Ctl, expected: &[u64], round: u32) -> Result<(), SessionError> {
        let mut last = (0u64, Instant::now());
        loop {
            let mut done = true;
            let mut total = 0;
            for (l, (r, &e)) in self.shared.received.iter().zip(expected).enumerate() {
                // Acquire pairs with the pollers' release: the window ids they noted before
                // counting are in `named`.
                let got = r.load(Ordering::Acquire);
                if got > e {
                    return Err(Violation::Miscount { what: Counted::Writes { lane: l }, announced: e, found: got }.into());
                }
                done &= got == e;
                total += got;
            }
            if done {
                return Ok(());
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(SessionError::Stopped);
            }
            if total != last.0 {
                last = (total, Instant::now());
            } else if last.1.elapsed() > IDLE_TIMEOUT {
                return Err(SessionError::TimedOut {
                    op: format!("waiting for round {round}'s RDMA WRITE_WITH_IMMs (the sender stopped)"),
                    secs: IDLE_TIMEOUT.as_secs(),
                });
            }
            // A failed poller, the VMM leaving or the source failing ends the wait at once.
            if self.poll(Some(ctl), PollTimeout::ZERO)? {
                return Err(crate::engine::recv::peer_ended(ctl, &format!("waiting for round {round}'s RDMA writes")));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// The digest (keyed) of all of the memory as it landed, on every CPU: what the source
    /// digests of the paused guest ([`Check::AtEnd`]). Pages never written are holes,
    /// folded in as zeros without reading them.
    fn digest_all(&self) -> Result<Digest, SessionError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut d = Digest::default();
        for (i, (m, &size)) in self.memory.iter().zip(self.layout_sizes).enumerate() {
            // A description of our own for the hole probes (they move its offset), else
            // every page is read.
            let own = hw::memmap::reopen_read_only(m).ok();
            let (file, probe) = own.as_ref().map_or((m, false), |f| (f, true));
            let part = Digest::of_file_with(keyed(self.key), i as u32, PAGE, file, size, threads, probe)
                .map_err(|e| SessionError::io("digesting what landed", e))?;
            d.combine(part);
        }
        Ok(d)
    }

    /// Hashes (keyed) every page of the windows `ids` names, as they landed, on a few
    /// threads.
    fn hash_windows(&self, ids: &[u32]) -> Result<(), SessionError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(ids.len()).max(1);
        let next = AtomicU64::new(0);
        crate::helpers::fan_out(threads, || -> Result<(), SessionError> {
            let mut buf = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&id) = ids.get(i) else { return Ok(()) };
                let (region, start, end) = self.shared.windows.range(id).ok_or_else(|| SessionError::from(Violation::NoWindow(id)))?;
                buf.resize((end - start) as usize, 0);
                self.memory[region as usize]
                    .read_exact_at(&mut buf, start)
                    .map_err(|e| SessionError::io("reading what landed to verify it", e))?;
                let first = start / PAGE as u64;
                for (k, pg) in buf.chunks(PAGE).enumerate() {
                    let mut d = Digest::default();
                    d.add_with(keyed(self.key), region, first + k as u64, PAGE, pg);
                    self.hashes[region as usize].set(first + k as u64, d);
                }
            }
        })
        .into_iter()
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_come_back_as_runs() {
        let mut w = Written::new(300 * 4096 - 10).unwrap();
        assert_eq!(w.pages, 300);
        w.mark(3, 5);
        w.mark(60, 200);
        w.mark(4, 6);
        w.mark(299, 300);
        let mut runs = Vec::new();
        crate::worker::dirty_runs(&w.words, 0, w.pages, &mut |a, b| runs.push((a, b)));
        assert_eq!(runs, vec![(3, 6), (60, 200), (299, 300)]);
    }
}
