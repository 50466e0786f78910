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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use zerocopy::IntoBytes;

use super::{MigrationReport, PageHashes, ROUND_IDLE_TIMEOUT, RoundCounts, RoundReport, VmmError};
use crate::auth::Auth;
use crate::conn::{Cancel, Counted, Ctl, Refusal, SessionError, Violation};
use crate::digest::Digest;
use crate::encode::Decoder;
use crate::engine::dest::Dest;
use crate::engine::recv::peer_ended;
use crate::engine::{PAGE, cpu_seconds, tune_socket};
use crate::lane::{LaneReader, Payload};
use crate::plan::{Plan, Transport};
use crate::session::accept::{Acceptor, Authed, Next, Turned, Wait};
use crate::session::limits::{Backing, check_lanes, check_region};
use crate::session::seal::TAG_LEN;
use crate::wire::{self, CONTROL_LANE, DataTransport, Encoding, FrameError, HEADER_LEN, Kind, Layout, features};

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
}

/// A migration that arrived whole: the guest memory (a memfd per region, in the source's
/// order) and the report.
#[derive(Debug)]
pub struct Incoming {
    pub memory: Vec<File>,
    pub report: MigrationReport,
}

/// A lane's message to the control thread: one per round, or its failure.
pub(super) type LaneMsg = Result<(u16, u32, RoundCounts), SessionError>;

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
        // A VMM that left while the last round ran (its watcher may not have stopped the
        // session in time) is the reason, not the hand-over that would fail on it.
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

/// Whether the VMM's connection stirred (readable: it closed, or spoke out of turn), as
/// [`watch_vmm`] takes it, without waiting.
fn stirred(vmm: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(vmm, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Watches the VMM's connection while the session runs: when it stirs, the control thread
/// is told (a message, and a byte on `wake`), and stops the migration. Returns when `stop`
/// stirs (the session is over).
fn watch_vmm(vmm: BorrowedFd<'_>, stop: &UnixStream, tx: &mpsc::Sender<LaneMsg>, wake: &UnixStream, gone: &AtomicBool) {
    loop {
        let mut fds = [PollFd::new(vmm, PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if fds[1].revents().is_some_and(|r| !r.is_empty()) => return,
            Ok(_) => {
                gone.store(true, Ordering::Release);
                let _ = tx.send(Err(vmm_gone()));
                let _ = (&*wake).write(&[1]);
                return;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
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
    let sink = SinkOptions { plan: opts.plan, vmm: opts.vmm, role: crate::live::Role::MigrateIn, progress: None, session };
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
    pub progress: Option<&'a std::sync::atomic::AtomicU64>,
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

/// The receiving loop of every session, one-shot or migration: accepts the session's lanes
/// and runs each on its own thread, writing its pages into `memory` (one file per region,
/// of the regions' sizes, reading as zero) once each per round, while this thread checks
/// each ROUND against what the lanes counted and confirms it; after the last round,
/// DONE's digest against the pages as they landed. RESULT is the caller's to send, once
/// the data is where its user will read it.
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
    let targets = memory
        .iter()
        .zip(&layout.regions)
        .map(|(m, &bytes)| Ok(Target { dest: Dest::new(m, bytes, PAGE as u64)?, hashes: PageHashes::new(super::pages(bytes))? }))
        .collect::<Result<Vec<Target<'_>>, crate::session::limits::LimitError>>()?;
    let (tx, rx) = mpsc::channel::<LaneMsg>();
    // A lane that fails, or the VMM leaving, sends its error and wakes the control thread
    // with a byte here, so it never waits on a source that will not speak again.
    let (wake, woken) = UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e))?;
    // Clones of the lanes, shut down when the session fails so no lane waits on a peer.
    let mut socks = Vec::new();
    // This session's own counters, one per lane.
    let live = crate::live::receiver(o.role, session, usize::from(lanes), size);
    let ctx = Ctx { layout, targets: &targets, plan: o.plan, live: &live, progress: o.progress, postcopy: None };
    let gone = AtomicBool::new(false);
    // Closed when the session is over: the VMM's watcher returns at once.
    let (stop_tx, stop_rx) = UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e))?;
    let outcome = std::thread::scope(|s| {
        if let Some(vmm) = o.vmm {
            let (tx, wake, gone, stop) = (tx.clone(), &wake, &gone, &stop_rx);
            s.spawn(move || watch_vmm(vmm, stop, &tx, wake, gone));
        }
        let mut handles = Vec::new();
        let mut watch = vec![ctl.s.as_fd()];
        watch.extend(o.vmm);
        let opened = acc.lanes(session, lanes, &watch, |a| {
            socks.extend(a.s.try_clone());
            let (tx, ctx, wake) = (tx.clone(), &ctx, &wake);
            // A lane's failure goes to the control thread; its result says only that it
            // stopped.
            handles.push(s.spawn(move || {
                lane(a, ctx, &tx).map_err(|e| {
                    let _ = tx.send(Err(e));
                    let _ = (&*wake).write(&[1]);
                    SessionError::Stopped
                })
            }));
        });
        let r = match opened {
            Ok(None) => rounds(ctl, &woken, &rx, lanes, &targets),
            Ok(Some(0)) => Err(peer_ended(ctl, "waiting for the source's data connections")),
            Ok(Some(_)) => Err(vmm_gone()),
            Err(e) => Err(e),
        };
        let _ = stop_tx.shutdown(Shutdown::Both);
        if r.is_err() {
            for c in &socks {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        let lane_results: Vec<_> = handles.into_iter().map(|h| h.join().expect("lane thread panicked")).collect();
        (r, lane_results)
    });
    let (rounds, lane_results) = outcome;
    // The VMM leaving is the reason, whatever it broke on its way.
    if gone.load(Ordering::Acquire) {
        return Err(vmm_gone());
    }
    // A lane's own failure (a frame it refused) beats the control connection closing after
    // it, which is only what the source did next. Each lane sent its failure before it
    // ended, so every one not yet read is on `rx` now.
    // Of the lanes' failures, the first that is not a closed connection (that one only if
    // it is all there is).
    let lane_failure = || {
        let closed = |l: &SessionError| matches!(l, SessionError::PeerClosed { .. });
        let mut failures = std::iter::from_fn(|| rx.try_recv().ok()).filter_map(Result::err).collect::<Vec<_>>();
        let i = failures.iter().position(|l| !closed(l)).unwrap_or(0);
        (i < failures.len()).then(|| failures.swap_remove(i))
    };
    let (rounds, ended) = match rounds {
        Ok(r) => r,
        Err(e @ (SessionError::PeerClosed { .. } | SessionError::Io { .. })) => {
            return Err(lane_failure().filter(|l| !matches!(l, SessionError::PeerClosed { .. })).unwrap_or(e));
        }
        Err(e) => return Err(e),
    };
    // The rounds ended well but a lane failed after: its own failure.
    if lane_results.iter().any(Result::is_err) {
        return Err(lane_failure().unwrap_or(SessionError::Stopped));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds_per_gib = (cpu_seconds() - cpu0) / (size.max(1) as f64 / (1u64 << 30) as f64);
    received(rounds, ended, lane_results, targets, (size, lanes), (seconds, cpu_seconds_per_gib))
}

/// What a session that ended well received: the lanes' counts and latencies folded, the
/// destination's report, and the digest or (switched to post-copy) the stale pages.
fn received(
    rounds: Vec<RoundReport>,
    ended: Ended,
    lane_results: Vec<Result<LaneDone, SessionError>>,
    targets: Vec<Target<'_>>,
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
    woken: &UnixStream,
    rx: &mpsc::Receiver<LaneMsg>,
    lanes: u16,
    targets: &[Target<'_>],
) -> Result<(Vec<RoundReport>, Ended), SessionError> {
    let all_pages: u64 = targets.iter().map(|t| t.dest.pages()).sum();
    let size: u64 = targets.iter().map(|t| t.dest.len()).sum();
    let mut buf = Vec::new();
    let mut reports = Vec::new();
    let mut started = Instant::now();
    loop {
        let round = reports.len() as u32;
        // The next ROUND, unless a lane or the VMM says the session is over first.
        await_control(ctl, woken, &[], rx, Some(ROUND_IDLE_TIMEOUT), &format!("waiting for round {round}"))?;
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

/// One region of the incoming memory: its writer and its page hashes.
pub(super) struct Target<'f> {
    dest: Dest<'f>,
    hashes: PageHashes,
}

/// What every lane thread shares.
pub(super) struct Ctx<'a> {
    pub layout: &'a Layout,
    pub targets: &'a [Target<'a>],
    pub plan: &'a Plan,
    pub live: &'a crate::live::Session,
    pub progress: Option<&'a std::sync::atomic::AtomicU64>,
    /// Post-copy lanes place their pages through the claim bits instead of `targets`.
    pub postcopy: Option<&'a super::postcopy::Placement>,
}

/// What a lane counted over the whole session.
pub(super) struct LaneDone {
    lane: u16,
    pub counts: RoundCounts,
    /// io_uring received its bytes.
    uring: bool,
    /// Per data frame: arrival until written, µs.
    latency: hdrhistogram::Histogram<u64>,
}

/// One lane for the whole session: DATA frames into the memfd, a ROUND_END per round
/// (its counts checked, then reported), LANE_END after the last.
/// Returns the lane's counts, whether io_uring received them, and its write latency.
pub(super) fn lane(a: Authed, ctx: &Ctx<'_>, tx: &mpsc::Sender<LaneMsg>) -> Result<LaneDone, SessionError> {
    let Authed { mut s, hello, keys, .. } = a;
    crate::engine::tune_data_socket(&s, ctx.plan)?;
    let n = hello.lane.get();
    s.set_read_timeout(Some(ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    let max_payload = wire::max_payload_for(ctx.layout.max_chunk);
    crate::engine::pin_lane(ctx.plan, n);
    let mut reader = LaneReader::new(ctx.plan, &s, max_payload, keys.rx, ctx.live)?;
    log::info!("lane {n} connected ({})", if reader.uring() { "io_uring multishot receive" } else { "plain reads" });
    let mut latency = crate::engine::latency_histogram();
    let mut dec = Decoder::default();
    let (mut round, mut this, mut total) = (0u32, RoundCounts::default(), RoundCounts::default());
    let live = ctx.live.worker(usize::from(n));
    let page = PAGE as u64;
    let (mut one_page, mut scratch) = (vec![0u8; PAGE], Vec::new());
    loop {
        let (h, kind, payload) = reader.next(&mut s, "receiving data")?;
        let arrived = Instant::now();
        match kind {
            Kind::Data if ctx.postcopy.is_some() => {
                let pc = ctx.postcopy.expect("checked");
                let pages = pc.place_frame(ctx.layout, &h, &payload, &mut dec, &mut scratch, false)?;
                let wire = (HEADER_LEN + payload.len() + TAG_LEN) as u64;
                this.frames += 1;
                this.pages += pages;
                this.wire_bytes += wire;
                live.add(u64::from(h.raw_len.get()), wire, 1, 0);
            }
            Kind::Data => {
                let (encoding, region, offset, raw_len) = ctx.layout.check_data(&h)?;
                // check_data bounded `region` by the session's regions.
                let Target { dest, hashes } = &ctx.targets[region as usize];
                let first = offset / page;
                let record = |i: u64, p: &[u8]| hashes.set(first + i, Digest::of_page(region, first + i, p));
                match encoding {
                    Encoding::Raw => {
                        dest.write_payload(offset, &payload)?;
                        payload.pages(PAGE, &mut one_page, record);
                    }
                    Encoding::Zero => {
                        let len = u64::from(raw_len);
                        // Round 0 writes into a new memfd, which reads as zero already.
                        if round == 0 { dest.claim_zero(offset, len) } else { dest.write_zero(offset, len) }?;
                        for i in 0..len.div_ceil(page) {
                            let this_len = (len - i * page).min(page) as usize;
                            hashes.set(first + i, Digest::of_zero_page(region, first + i, this_len));
                        }
                        this.zero_pages += len.div_ceil(page);
                    }
                    Encoding::Zstd => {
                        let bytes = dec.zstd(payload.contiguous(&mut scratch), raw_len)?;
                        dest.write(offset, bytes)?;
                        Payload::One(bytes).pages(PAGE, &mut one_page, record);
                        this.compressed_in += u64::from(raw_len);
                        this.compressed_out += payload.len() as u64;
                    }
                }
                this.frames += 1;
                this.pages += u64::from(raw_len).div_ceil(page);
                this.wire_bytes += (HEADER_LEN + payload.len() + TAG_LEN) as u64;
                let zero = if encoding == Encoding::Zero { u64::from(raw_len).div_ceil(page) } else { 0 };
                live.add(u64::from(raw_len), (HEADER_LEN + payload.len() + TAG_LEN) as u64, 1, zero);
                latency.saturating_record(arrived.elapsed().as_micros() as u64);
                if let Some(p) = ctx.progress {
                    p.fetch_add(u64::from(raw_len), Ordering::Relaxed);
                }
            }
            Kind::RoundEnd => {
                let end: wire::RoundEnd = wire::parse(Kind::RoundEnd, payload.contiguous(&mut scratch))?;
                // A post-copy push is one round, numbered after the source's pre-copy rounds.
                if ctx.postcopy.is_some() && this.frames == end.frames.get() {
                    round = end.round.get();
                }
                check_round_end(n, round, &this, &end)?;
                total += this;
                if tx.send(Ok((n, round, this))).is_err() {
                    // The control thread has gone: the session ended without this lane.
                    return Err(SessionError::Stopped);
                }
                this = RoundCounts::default();
                round += 1;
            }
            Kind::LaneEnd => {
                if this.frames != 0 {
                    return Err(
                        Violation::Miscount { what: Counted::FramesOutsideRound { lane: n }, announced: 0, found: this.frames }.into()
                    );
                }
                return Ok(LaneDone { lane: n, counts: total, uring: reader.uring(), latency });
            }
            Kind::Error => return Err(SessionError::Peer(String::from_utf8_lossy(payload.contiguous(&mut scratch)).into_owned())),
            other => return Err(FrameError::Unexpected { expected: Kind::Data, got: other }.into()),
        }
    }
}

/// A lane's ROUND_END against what the lane received in round `round`.
fn check_round_end(n: u16, round: u32, this: &RoundCounts, end: &wire::RoundEnd) -> Result<(), SessionError> {
    if end.round.get() != round {
        return Err(Violation::LaneRound { lane: n, got: end.round.get(), round }.into());
    }
    for (what, announced, found) in
        [("frames", end.frames.get(), this.frames), ("bytes", end.bytes.get(), this.wire_bytes), ("pages", end.pages.get(), this.pages)]
    {
        if announced != found {
            return Err(Violation::Miscount { what: Counted::LaneEnd { lane: n, round, what }, announced, found }.into());
        }
    }
    Ok(())
}
