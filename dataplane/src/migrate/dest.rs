//! The destination side of a migration: one session into a new memfd, round after round,
//! handed over only when the digest of what arrived matches the paused source's.
//!
//! Each lane writes its pages into the memfd and records each page's hash in a table, so
//! the destination's digest after the last round is a fold over that table, not a second
//! pass over the memory while the guest is paused.
//!
//! The source hears of success only once the destination VMM holds the memory: after the
//! digests match, the memory is handed over (`deliver`), and RESULT goes out only when
//! that succeeded. A destination VMM that goes away before then cancels the migration: the
//! source is told, so its VMM resumes the guest.

use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use zerocopy::IntoBytes;

use super::{MigrationReport, PageHashes, ROUND_IDLE_TIMEOUT, RoundCounts, RoundReport, VmmError};
use crate::auth::Auth;
use crate::conn::{Bug, Cancel, Counted, Ctl, Refusal, SessionError, Violation};
use crate::digest::Digest;
use crate::engine::dest::Dest;
use crate::engine::recv::peer_ended;
use crate::engine::{PAGE, cpu_seconds, tune_socket};
use crate::plan::{Plan, Transport};
use crate::session::accept::{Acceptor, Authed, Next, Turned, Wait};
use crate::session::limits::{Backing, check_lanes, check_region};
use crate::sink::{LaneFinish, LaneRun, RxTask, Sink, Target};
use crate::wire::{self, CONTROL_LANE, DataTransport, Kind, Layout, features};

#[derive(Debug)]
pub struct DestOptions<'a> {
    pub auth: Auth,
    pub plan: &'a Plan,
    /// The destination VMM's control connection, if it has one: when it stirs (the VMM
    /// closed it) before the memory is handed over, the migration is cancelled.
    pub vmm: Option<BorrowedFd<'a>>,
    /// Post-copy: how long to wait for the source after the link broke
    /// ([`super::postcopy::DEFAULT_RECOVER`] when none).
    pub recover: Option<std::time::Duration>,
    /// ferryd's receiving threads (none: the session starts its own).
    pub pool: Option<&'a crate::pool::Pool>,
}

/// A migration that arrived whole: the guest memory (a memfd per region, in the source's
/// order) and the report.
#[derive(Debug)]
pub struct Incoming {
    pub memory: Vec<File>,
    pub report: MigrationReport,
}

pub(crate) use crate::sink::LaneMsg;

/// The destination VMM, as a migration into this ferryd meets it.
pub trait DestVmm {
    /// Pre-copy: hands over the verified memory; returns once the VMM holds it.
    fn deliver(&mut self, incoming: &Incoming) -> Result<(), VmmError>;
    /// Post-copy: hands over the memory whose stale pages are still to come; returns the
    /// VMM's userfaultfd, registered over its mapping of each region, and the mappings.
    fn switch_over(&mut self, _incoming: &Incoming) -> Result<(hw::uffd::Userfault, Vec<super::postcopy::Mapping>), VmmError> {
        Err(VmmError::NoPostcopy)
    }
    /// Post-copy: ferryd serves the guest's faults now; the VMM may run the guest.
    fn run(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    /// Post-copy: every page is local and verified; returns once the VMM has unregistered
    /// its mapping (ferryd resolves its faults until then).
    fn all_local(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
}

impl<F: FnMut(&Incoming) -> Result<(), VmmError>> DestVmm for F {
    fn deliver(&mut self, incoming: &Incoming) -> Result<(), VmmError> {
        self(incoming)
    }
}

/// How a session's rounds ended.
pub(crate) enum Ended {
    /// The last round arrived and DONE's digest matched (RESULT not sent yet).
    Verified(Digest),
    /// SWITCH arrived: post-copy, with these pages still stale.
    Switch(Vec<wire::RdmaRun>),
}

pub(crate) fn vmm_gone() -> SessionError {
    Cancel::VmmGone.into()
}

/// Accepts one migration on `listener` into new memfds. Connections that do not
/// authenticate are turned away while it waits for its source. Once every round arrived
/// and the final digest matches, `deliver` hands the memory to the destination VMM; only
/// when it succeeds is the source told. Fails, and drops the memory, otherwise.
pub fn accept(listener: &TcpListener, opts: &DestOptions<'_>, mut vmm: impl DestVmm) -> Result<Incoming, SessionError> {
    // RDMA is offered when this side's plan has a device for it.
    let offer = features::MIGRATE | features::POSTCOPY | if opts.plan.rdma.is_some() { features::RDMA } else { 0 };
    let acc = Acceptor::new(listener, &opts.auth, offer, &opts.plan.limits).map_err(|e| SessionError::io("listening", e))?;
    let watch: Vec<BorrowedFd<'_>> = opts.vmm.into_iter().collect();
    let wait = Wait { what: "a migration source", deadline: None, watch: &watch };
    let a = match acc.next(wait, |a| match (a.hello.lane.get(), a.hello.features.get() & features::MIGRATE) {
        (CONTROL_LANE, 0) => Err(Turned::NotAMigration),
        (CONTROL_LANE, _) => Ok(()),
        (n, _) => Err(Turned::LaneBeforeSession(n)),
    })? {
        Next::Conn(a) => a,
        Next::Watched(_) => return Err(vmm_gone()),
    };
    tune_socket(&a.s)?;
    let peer = a.peer;
    let agreed = a.hello.features.get();
    let mut ctl = Ctl::new(a.s, a.keys);
    let r = session(&acc, &mut ctl, agreed, opts).and_then(|(mut incoming, ended, switch)| {
        // A VMM that left while the last round ran (the control thread watches it only
        // while it waits) is the reason, not the hand-over that would fail on it.
        if opts.vmm.is_some_and(stirred) {
            return Err(vmm_gone());
        }
        let digest = match ended {
            Ended::Verified(d) => d,
            Ended::Switch(stale) => {
                let (session, landed) = switch.expect("a switch-over comes with its session's state");
                let pre = super::postcopy::Precopy { session, landed, stale };
                let post = super::postcopy::switch_over(&acc, &mut ctl, &incoming, pre, opts, &mut vmm)?;
                incoming.report.rounds.extend(post.rounds);
                incoming.report.postcopy = Some(post.report);
                incoming.report.digest = post.digest.hex();
                post.digest
            }
        };
        if incoming.report.postcopy.is_some() {
            // Post-copy: the VMM has run the guest on this memory since the switch-over,
            // and the last attempt's RESULT told the source.
            return Ok(incoming);
        }
        // The VMM takes its memory before the source hears of success.
        if let Err(why) = vmm.deliver(&incoming) {
            return Err(Cancel::NotTaken(why).into());
        }
        result_ok(&mut ctl, digest, incoming.report.bytes)?;
        Ok(incoming)
    });
    match &r {
        Err(SessionError::Peer(_) | SessionError::PeerClosed { .. }) => {}
        Err(e) => ctl.close_with_error(&e.to_string()),
        Ok(_) => {}
    }
    log::info!("migration from {peer} ended: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "memory verified and handed over".into()));
    r
}

/// Whether the VMM's connection stirred (readable: it closed, or spoke out of turn),
/// without waiting.
fn stirred(vmm: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(vmm, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// What a post-copy needs of the pre-copy session: its id, and its page hashes.
type SwitchState = Option<(u64, Landed)>;

/// The session after its control connection authenticated: the SESSION checked, new
/// memfds for its regions, its rounds received; the memory verified, and the digest
/// RESULT is to carry (not sent yet), or the switch-over to post-copy.
fn session(acc: &Acceptor<'_>, ctl: &mut Ctl, agreed: u64, opts: &DestOptions<'_>) -> Result<(Incoming, Ended, SwitchState), SessionError> {
    ctl.s.set_read_timeout(Some(ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::Session, &mut buf)?;
    let (layout, lanes, transport) = wire::parse_session(&buf)?;
    let size: u64 = layout.regions.iter().fold(0u64, |a, &r| a.saturating_add(r));
    // What the session would cost is checked before any of it is spent.
    check_region(size, &opts.plan.limits, Backing::Memory)?;
    check_session(&layout, lanes, transport, agreed, opts.plan)?;
    let memory = layout
        .regions
        .iter()
        .map(|&bytes| {
            hw::memmap::sealed_memfd("ferry-migration", bytes)
                .map_err(|source| SessionError::Region { path: format!("a {bytes}-byte memfd for the incoming guest memory"), source })
        })
        .collect::<Result<Vec<File>, _>>()?;
    let session = session_ok(ctl)?;
    log::info!("migration session {session:#x}: {size} bytes in {} region(s) over {lanes} lane(s)", memory.len());
    let sink = SinkOptions { plan: opts.plan, vmm: opts.vmm, role: crate::live::Role::MigrateIn, progress: None, pool: opts.pool, session };
    let got = match transport {
        DataTransport::Tcp => receive(acc, ctl, &layout, lanes, session, &memory, &sink)?,
        DataTransport::Rdma => crate::transport::rdma::rx::receive(ctl, &layout, lanes, &memory, &sink)?,
    };
    let switch = got.switch.map(|landed| (session, landed));
    let ended = match got.stale {
        Some(stale) => Ended::Switch(stale),
        None => Ended::Verified(got.digest),
    };
    Ok((Incoming { memory, report: got.report }, ended, switch))
}

/// The checks every receiver makes of a SESSION before it spends anything on it (the
/// region's size is checked by the caller, against what backs it there): the transport
/// against the handshake (`agreed` features), the page size, and lanes and their buffers
/// against the limits. RDMA lanes have no receive buffers: the NIC writes into the
/// destination, which is registered (pinned) whole.
pub(crate) fn check_session(layout: &Layout, lanes: u16, transport: DataTransport, agreed: u64, plan: &Plan) -> Result<(), SessionError> {
    if transport == DataTransport::Rdma && (agreed & features::RDMA == 0 || plan.rdma.is_none()) {
        return Err(Violation::RdmaNotAgreed.into());
    }
    if layout.page_size != PAGE as u32 {
        return Err(Refusal::PageSize(layout.page_size).into());
    }
    let buffers = match transport {
        DataTransport::Tcp => crate::lane::buffer_bytes(wire::max_payload_for(layout.max_chunk)),
        DataTransport::Rdma => 0,
    };
    check_lanes(u64::from(lanes), buffers, u64::from(layout.max_chunk), &plan.limits)?;
    Ok(())
}

/// A new session id, sent in SESSION_OK.
pub(crate) fn session_ok(ctl: &mut Ctl) -> Result<u64, SessionError> {
    let mut id = [0u8; 8];
    SessionError::random("a session id", &mut id)?;
    let session = u64::from_le_bytes(id);
    ctl.send(Kind::SessionOk, wire::SessionOk { session: session.into() }.as_bytes())?;
    Ok(session)
}

/// How a session is received, whatever it writes into.
#[derive(Debug)]
pub(crate) struct SinkOptions<'a> {
    pub plan: &'a Plan,
    /// Watched while the session runs: when it stirs, the session is cancelled.
    pub vmm: Option<BorrowedFd<'a>>,
    /// The lanes' live counters.
    pub role: crate::live::Role,
    /// Region bytes received so far, for a progress bar.
    pub progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// ferryd's receiving threads (none: the session starts its own).
    pub pool: Option<&'a crate::pool::Pool>,
    /// The session's id (SESSION_OK), for its live counters.
    pub session: u64,
}

/// What a session delivered.
#[derive(Debug)]
pub(crate) struct Received {
    pub report: MigrationReport,
    /// The destination's digest, equal to the source's (RESULT not sent yet).
    pub digest: Digest,
    /// Per lane, in lane order: a data frame's arrival until its bytes were in the
    /// destination, µs.
    pub write_latency: Vec<hdrhistogram::Histogram<u64>>,
    /// A switch-over to post-copy: the pages still stale (`digest` is not a verdict then).
    pub stale: Option<Vec<wire::RdmaRun>>,
    /// With `stale`: every region's page hashes, which post-copy goes on updating.
    pub switch: Option<Landed>,
}

/// What pre-copy leaves post-copy at the destination: every page's hash as it landed and,
/// after RDMA rounds, the key those were keyed with, which post-copy keys its pages with
/// too (pages read by RDMA READ arrive without frames; the source keys its hashes of the
/// stale pages alike).
#[derive(Debug)]
pub(crate) struct Landed {
    pub hashes: Vec<PageHashes>,
    pub key: Option<crate::digest::DigestKey>,
}

/// The receiving side of every TCP session, one-shot or migration: accepts the session's
/// lanes and hands each to a receiving thread of the pool ([`crate::sink`]), which writes
/// its pages into `memory` (one file per region, of the regions' sizes, reading as zero)
/// once each per round, while this thread checks each ROUND against what the lanes
/// counted and confirms it; after the last round, DONE's digest against the pages as they
/// landed. RESULT is the caller's to send, once the data is where its user will read it.
pub(crate) fn receive(
    acc: &Acceptor<'_>,
    ctl: &mut Ctl,
    layout: &Layout,
    lanes: u16,
    session: u64,
    memory: &[File],
    o: &SinkOptions<'_>,
) -> Result<Received, SessionError> {
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let size: u64 = layout.regions.iter().sum();
    let mut targets = Vec::with_capacity(memory.len());
    for (m, &bytes) in memory.iter().zip(&layout.regions) {
        let own = m.try_clone().map_err(|e| SessionError::io("opening the destination memory for the lanes", e))?;
        targets.push(Target { dest: Dest::new(own, bytes, PAGE as u64)?, hashes: PageHashes::new(super::pages(bytes))? });
    }
    // Without ferryd's receiving threads, the run's own (an embedded run).
    let mut own = None;
    let pool = crate::pool::Pool::receivers(o.pool, o.plan, &mut own)?;
    let (tx, rx) = crate::sink::reports(lanes);
    // A lane that fails, or the VMM leaving, sends its error and wakes the control thread
    // with a byte here, so it never waits on a source that will not speak again.
    let (wake, woken) = UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e))?;
    // This session's own counters, one per lane.
    let live = Arc::new(crate::live::receiver(o.role, session, usize::from(lanes), size));
    let sink = Arc::new(Sink {
        layout: layout.clone(),
        targets,
        plan: o.plan.clone(),
        live,
        progress: o.progress.clone(),
        postcopy: None,
        tx,
        wake,
        idle: ROUND_IDLE_TIMEOUT,
    });
    // The control thread watches the VMM's connection (as it waits for lanes, for each
    // round) beside its own: no thread of the session's waits on it.
    let mut watch = vec![ctl.s.as_fd()];
    watch.extend(o.vmm);
    let (lanes_run, opened) = hand_lanes(acc, pool, &sink, (session, lanes), &watch, Some);
    let rounds = match opened {
        Ok(None) => rounds(ctl, (&woken, o.vmm), &rx, lanes, &sink.targets),
        Ok(Some(0)) => Err(peer_ended(ctl, "waiting for the source's data connections")),
        Ok(Some(_)) => Err(vmm_gone()),
        Err(e) => Err(e),
    };
    if rounds.is_err() {
        lanes_run.shut_down();
    }
    let mut lane_results = lanes_run.wait();
    // The VMM leaving is the reason, whatever it broke on its way.
    if o.vmm.is_some_and(stirred) {
        return Err(vmm_gone());
    }
    // A lane's own failure (a frame it refused) beats the control connection closing after
    // it, which is only what the source did next.
    let (rounds, ended) = match rounds {
        Ok(r) => r,
        Err(e @ (SessionError::PeerClosed { .. } | SessionError::Io { .. })) => {
            return Err(lane_failure(&rx, &mut lane_results).filter(|l| !matches!(l, SessionError::PeerClosed { .. })).unwrap_or(e));
        }
        Err(SessionError::Stopped) => return Err(lane_failure(&rx, &mut lane_results).unwrap_or(SessionError::Stopped)),
        Err(e) => return Err(e),
    };
    // The rounds ended well but a lane failed after: its own failure.
    if lane_results.iter().any(Result::is_err) {
        return Err(lane_failure(&rx, &mut lane_results).unwrap_or(SessionError::Stopped));
    }
    // Every lane has ended and let go of the sink.
    let targets = Arc::try_unwrap(sink).map_err(|_| Bug::LaneLeftOver)?.targets;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds_per_gib = (cpu_seconds() - cpu0) / (size.max(1) as f64 / (1u64 << 30) as f64);
    received(rounds, ended, lane_results, targets, (size, lanes), (seconds, cpu_seconds_per_gib))
}

/// Of the lanes' failures, the first that is not a closed connection (that one only if it
/// is all there is). Each lane reported its failure before it ended, so every one not yet
/// read is on `rx` now, or (where the lane's own reports had filled `rx`) in its end.
fn lane_failure(rx: &mpsc::Receiver<LaneMsg>, ends: &mut [LaneFinish]) -> Option<SessionError> {
    let closed = |l: &SessionError| matches!(l, SessionError::PeerClosed { .. });
    let mut failures: Vec<SessionError> = rx.try_iter().filter_map(Result::err).collect();
    for end in ends.iter_mut().filter(|r| r.as_ref().is_err_and(|e| !matches!(e, SessionError::Stopped))) {
        failures.extend(std::mem::replace(end, Err(SessionError::Stopped)).err());
    }
    let i = failures.iter().position(|l| !closed(l)).unwrap_or(0);
    (i < failures.len()).then(|| failures.swap_remove(i))
}

/// The lanes a session handed to the pool's receiving threads.
pub(crate) struct HandedLanes {
    /// Clones of the lanes, shut down when the session fails so no lane waits on a peer.
    socks: Vec<std::net::TcpStream>,
    handed: usize,
    finished: mpsc::Receiver<(u16, LaneFinish)>,
}

impl HandedLanes {
    /// Shuts every lane down: each ends soon after, whatever its peer does.
    pub(crate) fn shut_down(&self) {
        for c in &self.socks {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Each lane's end, once every one has ended (a lane the pool dropped unread, at its
    /// stop, counts as stopped).
    pub(crate) fn wait(self) -> Vec<LaneFinish> {
        let mut ends: Vec<(u16, LaneFinish)> = self.finished.iter().take(self.handed).collect();
        ends.resize_with(self.handed, || (u16::MAX, Err(SessionError::Stopped)));
        ends.sort_by_key(|(n, _)| *n);
        ends.into_iter().map(|(_, r)| r).collect()
    }
}

/// Accepts session `session`'s `lanes` lanes (watching `watch` meanwhile, see
/// [`Acceptor::lanes`]) and hands each to the pool's receiving threads, sharing `sink`,
/// unless `keep` keeps it (returns `None`). A lane that cannot be handed fails the
/// session through the sink's channel.
pub(crate) fn hand_lanes(
    acc: &Acceptor<'_>,
    pool: &crate::pool::Pool,
    sink: &Arc<Sink>,
    (session, lanes): (u64, u16),
    watch: &[BorrowedFd<'_>],
    mut keep: impl FnMut(Authed) -> Option<Authed>,
) -> (HandedLanes, Result<Option<usize>, SessionError>) {
    let (fin_tx, finished) = crate::sink::ends(usize::from(lanes));
    let mut h = HandedLanes { socks: Vec::new(), handed: 0, finished };
    let opened = acc.lanes(session, lanes, watch, |a| {
        let Some(a) = keep(a) else { return };
        let fail = |e: SessionError| {
            let _ = sink.tx.try_send(Err(e));
            let _ = (&sink.wake).write(&[1]);
        };
        if let Err(e) = crate::engine::tune_data_socket(&a.s, &sink.plan) {
            return fail(e);
        }
        h.socks.extend(a.s.try_clone());
        let n = usize::from(a.hello.lane.get());
        match pool.submit_rx(RxTask::Lane(Box::new(LaneRun::new(sink.clone(), fin_tx.clone(), a))), n) {
            Ok(()) => h.handed += 1,
            Err(b) => fail(b.1),
        }
    });
    (h, opened)
}

/// What a session that ended well received: the lanes' counts and latencies folded, the
/// destination's report, and the digest or (switched to post-copy) the stale pages.
fn received(
    rounds: Vec<RoundReport>,
    ended: Ended,
    lane_results: Vec<LaneFinish>,
    targets: Vec<Target>,
    (size, lanes): (u64, u16),
    (seconds, cpu_seconds_per_gib): (f64, f64),
) -> Result<Received, SessionError> {
    let (mut total, mut uring, mut by_lane) = (RoundCounts::default(), false, Vec::new());
    for r in lane_results {
        let l = r?;
        total += l.counts;
        uring |= l.uring;
        by_lane.push((l.lane, l.latency));
    }
    by_lane.sort_by_key(|(n, _)| *n);
    let (digest, stale, switch) = match ended {
        Ended::Verified(d) => (d, None, None),
        Ended::Switch(stale) => {
            let hashes = targets.into_iter().map(|t| t.hashes).collect();
            (Digest::default(), Some(stale), Some(Landed { hashes, key: None }))
        }
    };
    let report = MigrationReport {
        role: "destination".into(),
        bytes: size,
        sent_bytes: rounds.iter().map(|r| r.dirty_bytes).sum(),
        wire_bytes: total.wire_bytes,
        zero_pages: total.zero_pages,
        compressed_in_bytes: total.compressed_in,
        compressed_out_bytes: total.compressed_out,
        seconds,
        downtime_ms: rounds.last().map_or(0.0, |r| r.seconds * 1e3),
        cpu_seconds_per_gib,
        transport: if uring { Transport::Tcp } else { Transport::Sockets }.to_string(),
        compression: "as the source chose".into(),
        lanes: u32::from(lanes),
        workers: u32::from(lanes),
        digest: digest.hex(),
        digest_match: true,
        rounds,
        ..MigrationReport::default()
    };
    Ok(Received { report, digest, write_latency: by_lane.into_iter().map(|(_, h)| h).collect(), stale, switch })
}

/// The control thread's part: each ROUND is checked against what the lanes reported,
/// then confirmed; after the last, DONE's digest against the page table.
fn rounds(
    ctl: &mut Ctl,
    (woken, vmm): (&UnixStream, Option<BorrowedFd<'_>>),
    rx: &mpsc::Receiver<LaneMsg>,
    lanes: u16,
    targets: &[Target],
) -> Result<(Vec<RoundReport>, Ended), SessionError> {
    let all_pages: u64 = targets.iter().map(|t| t.dest.pages()).sum();
    let size: u64 = targets.iter().map(|t| t.dest.len()).sum();
    let mut buf = Vec::new();
    let mut reports = Vec::new();
    let mut started = Instant::now();
    loop {
        let round = reports.len() as u32;
        // The next ROUND, unless a lane or the VMM says the session is over first.
        if let Stirred::Watched(_) =
            await_control(ctl, woken, vmm.as_slice(), rx, Some(ROUND_IDLE_TIMEOUT), &format!("waiting for round {round}"))?
        {
            return Err(vmm_gone());
        }
        let lane_error = |e| lane_error(rx, e);
        let h = ctl.expect_any(&[Kind::Round, Kind::Switch], &mut buf).map_err(lane_error)?;
        if h.kind == Kind::Switch as u8 {
            // The source's lanes ended (LANE_END) before SWITCH: post-copy from here.
            if round == 0 {
                return Err(Violation::Unexpected { frame: Kind::Switch, why: "before round 0: every page must be sent once first" }.into());
            }
            let t = Instant::now();
            let (stale, _) = super::postcopy::recv_runs_after(ctl, Kind::Switch, &mut buf)?;
            log::debug!("post-copy switch-over: {} stale run(s) read in {:?}", stale.len(), t.elapsed());
            return Ok((reports, Ended::Switch(stale)));
        }
        let r: wire::Round = wire::parse(Kind::Round, &buf)?;
        if r.round.get() != round {
            return Err(Violation::OutOfTurn { what: "ROUND", got: r.round.get().into(), next: round.into() }.into());
        }
        let sum = round_ends(rx, lanes, Some(round))?;
        let claimed: u64 = targets.iter().map(|t| t.dest.pages_claimed()).sum();
        if sum.pages != r.pages.get() {
            return Err(Violation::Miscount { what: Counted::RoundPages { round }, announced: r.pages.get(), found: sum.pages }.into());
        }
        if claimed != sum.pages {
            return Err(Violation::Miscount { what: Counted::WrittenPages { round }, announced: sum.pages, found: claimed }.into());
        }
        if round == 0 && claimed != all_pages {
            return Err(Violation::Miscount { what: Counted::FirstRound, announced: all_pages, found: claimed }.into());
        }
        for t in targets {
            t.dest.next_round();
        }
        let ok = wire::RoundOk { round: round.into(), _pad: 0.into(), pages: sum.pages.into() };
        ctl.send(Kind::RoundOk, ok.as_bytes())?;
        let last = r.last.get() == 1;
        reports.push(received_round(round, last, &sum, started.elapsed().as_secs_f64(), size));
        if last {
            break;
        }
        started = Instant::now();
    }
    let digest: Digest = targets.iter().map(|t| t.hashes.fold()).sum();
    check_done(ctl, &mut buf, digest, size)?;
    // RESULT (success) goes out once the destination VMM holds the memory: see accept.
    if let Some(last) = reports.last_mut() {
        last.seconds += started.elapsed().as_secs_f64();
    }
    Ok((reports, Ended::Verified(digest)))
}

/// What [`await_control`] saw stir first.
pub(super) enum Stirred {
    /// The control connection: its next frame can be read.
    Control,
    /// `extra[i]`.
    Watched(usize),
}

/// Waits until the control connection has its next frame, for `timeout` at most (none: no
/// limit), unless first an `extra` descriptor stirs (in their order), or a lane fails (a
/// byte on `woken`: its error is returned).
pub(super) fn await_control(
    ctl: &Ctl,
    woken: &UnixStream,
    extra: &[BorrowedFd<'_>],
    rx: &mpsc::Receiver<LaneMsg>,
    timeout: Option<std::time::Duration>,
    what: &str,
) -> Result<Stirred, SessionError> {
    let stirred = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
    let limit = timeout
        .map_or(PollTimeout::NONE, |t| PollTimeout::try_from(t.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX));
    loop {
        let mut fds: Vec<PollFd<'_>> = extra.iter().map(|w| PollFd::new(*w, PollFlags::POLLIN)).collect();
        fds.push(PollFd::new(woken.as_fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(ctl.s.as_fd(), PollFlags::POLLIN));
        match poll(&mut fds, limit) {
            Ok(0) => return Err(SessionError::TimedOut { op: what.into(), secs: timeout.map_or(0, |t| t.as_secs()) }),
            Ok(_) => {
                if let Some(i) = fds[..extra.len()].iter().position(stirred) {
                    return Ok(Stirred::Watched(i));
                }
                if stirred(&fds[extra.len()]) {
                    return Err(lane_error(rx, SessionError::Stopped));
                }
                return Ok(Stirred::Control);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(SessionError::io(what, e.into())),
        }
    }
}

/// The failure a lane (or the VMM's watcher) reported, if any: it is the one to report,
/// not `e`, which is only what it broke on its way.
pub(super) fn lane_error(rx: &mpsc::Receiver<LaneMsg>, e: SessionError) -> SessionError {
    loop {
        match rx.try_recv() {
            Ok(Err(lane)) => return lane,
            Ok(Ok(_)) => continue,
            Err(_) => return e,
        }
    }
}

/// What `lanes` lanes counted in a round, once each has ended it (`round`: the one each
/// must have ended; none for post-copy's push, numbered by the source).
pub(super) fn round_ends(rx: &mpsc::Receiver<LaneMsg>, lanes: u16, round: Option<u32>) -> Result<RoundCounts, SessionError> {
    let name = round.map_or_else(|| "the push round".to_string(), |r| format!("round {r}"));
    let mut sum = RoundCounts::default();
    for _ in 0..lanes {
        let (n, got, c) = rx.recv_timeout(ROUND_IDLE_TIMEOUT).map_err(|_| SessionError::TimedOut {
            op: format!("waiting for the lanes to end {name}"),
            secs: ROUND_IDLE_TIMEOUT.as_secs(),
        })??;
        if let Some(r) = round.filter(|&r| r != got) {
            return Err(Violation::LaneRound { lane: n, got, round: r }.into());
        }
        sum += c;
    }
    Ok(sum)
}

/// A round as this side received it, for the report.
pub(super) fn received_round(round: u32, last: bool, sum: &RoundCounts, seconds: f64, size: u64) -> RoundReport {
    let dirty_bytes = (sum.pages * PAGE as u64).min(size);
    RoundReport {
        round,
        last,
        dirty_pages: sum.pages,
        dirty_bytes,
        zero_pages: sum.zero_pages,
        wire_bytes: sum.wire_bytes,
        compressed_in_bytes: sum.compressed_in,
        compressed_out_bytes: sum.compressed_out,
        frames: sum.frames,
        seconds,
        gbps: dirty_bytes as f64 / seconds / 1e9,
        ..RoundReport::default()
    }
}

/// DONE's digest against `digest`, this side's of the `size` bytes: on a mismatch,
/// RESULT says so and the mismatch is the error. Success's RESULT is the caller's to send
/// ([`result_ok`]), once the data is where its user reads it.
pub(crate) fn check_done(ctl: &mut Ctl, buf: &mut Vec<u8>, digest: Digest, size: u64) -> Result<(), SessionError> {
    ctl.expect(Kind::Done, buf)?;
    let done: wire::Digest = wire::parse(Kind::Done, buf)?;
    let source = Digest::from_bytes(done.digest);
    if digest != source || done.bytes.get() != size {
        let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: 0.into(), _pad: 0.into() };
        ctl.send(Kind::Result, result.as_bytes())?;
        return Err(SessionError::DigestMismatch { source_digest: source.hex(), dest_digest: digest.hex() });
    }
    Ok(())
}

/// RESULT: the destination holds the `size` bytes of `digest` where its user reads them.
pub(super) fn result_ok(ctl: &mut Ctl, digest: Digest, size: u64) -> Result<(), SessionError> {
    let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: 1.into(), _pad: 0.into() };
    ctl.send(Kind::Result, result.as_bytes())
}
