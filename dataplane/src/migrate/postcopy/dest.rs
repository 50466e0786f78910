//! The destination's post-copy: the switch-over, then attempts (a control connection that
//! RESUMEs the session, the push lanes and the fault lane) until one completes.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use super::placement::Placement;
use super::{DEFAULT_RECOVER, PostcopyReport, is_link_failure, send_runs};
use crate::conn::{Cancel, Counted, Ctl, FrameReader, SessionError, Violation};
use crate::digest::Digest;
use crate::encode::Decoder;
use crate::lane::Payload;
use crate::migrate::dest::LaneMsg;
use crate::plan::{Plan, RdmaPlan};
use crate::session::accept::{Acceptor, Authed, Next, Turned, Wait};
use crate::session::seal::Keys;
use crate::sink::Sink;
use crate::wire::{self, CONTROL_LANE, Kind, Layout, RdmaRun, features};
use hw::rdma::verbs::Cq;

/// What post-copy takes over from the pre-copy session at the destination.
pub(crate) struct Precopy {
    /// The session's id: post-copy attempts RESUME it.
    pub session: u64,
    /// Every region's page hashes, which post-copy goes on updating, and their key.
    pub landed: crate::migrate::dest::Landed,
    /// The pages SWITCH named stale.
    pub stale: Vec<RdmaRun>,
}

/// What the destination's post-copy produced.
pub(crate) struct Finished {
    pub rounds: Vec<crate::migrate::RoundReport>,
    pub report: PostcopyReport,
    pub digest: Digest,
}

/// The destination's switch-over, after SWITCH arrived on the pre-copy session `ctl`: the
/// memory goes to the VMM, its userfaultfd is checked, the source hears SWITCHED and the
/// VMM runs the guest; then post-copy is served until every page is placed and the
/// digest matched (RESULT sent), whatever the link does meanwhile.
pub(crate) fn switch_over(
    acc: &Acceptor<'_>,
    ctl: &mut Ctl,
    incoming: &crate::migrate::dest::Incoming,
    pre: Precopy,
    opts: &crate::migrate::dest::DestOptions<'_>,
    vmm: &mut impl crate::migrate::dest::DestVmm,
) -> Result<Finished, SessionError> {
    let Precopy { session, landed, stale } = pre;
    let t = Instant::now();
    let (uffd, maps) = vmm.switch_over(incoming).map_err(Cancel::PostcopyRefused)?;
    let handed = t.elapsed();
    let pc = Arc::new(Placement::new(&incoming.memory, landed, &stale, &maps, uffd)?);
    let placed = t.elapsed();
    // The point of no return: once the source reads SWITCHED it never resumes the guest.
    ctl.send(Kind::Switched, &[])?;
    log::debug!("post-copy switch-over: VMM registered after {handed:?}, placement ready after {placed:?}");
    if let Err(e) = vmm.run() {
        // The source already heard SWITCHED: its first reconnect hears why instead.
        let e = SessionError::from(Cancel::NotRun(e));
        tell_source(acc, &e);
        return Err(e);
    }
    log::info!(
        "post-copy: the guest runs here {:.1} ms after SWITCH; {} page(s) are still at the source",
        t.elapsed().as_secs_f64() * 1e3,
        pc.remaining()
    );
    let recover = opts.recover.unwrap_or(DEFAULT_RECOVER);
    let (rounds, digest, attempts) = serve(acc, &pc, session, opts, recover, vmm)?;
    Ok(Finished { rounds, report: pc.report(attempts), digest })
}

/// Serves post-copy attempts until one completes: the fault thread runs throughout; a link
/// that breaks is waited for up to `recover`.
fn serve(
    acc: &Acceptor<'_>,
    pc: &Arc<Placement>,
    session: u64,
    opts: &crate::migrate::dest::DestOptions<'_>,
    recover: Duration,
    vmm: &mut impl crate::migrate::dest::DestVmm,
) -> Result<(Vec<crate::migrate::RoundReport>, Digest, u32), SessionError> {
    let pair = || UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e));
    let ((stop_tx, stop_rx), (failed_tx, failed_rx)) = (pair()?, pair()?);
    // Without ferryd's receiving threads, the run's own (an embedded run).
    let mut own = None;
    let pool = crate::pool::Pool::receivers(opts.pool, opts.plan, &mut own)?;
    std::thread::scope(|s| {
        let faults = s.spawn(|| pc.serve_faults(&stop_rx, &failed_tx));
        let r = (|| {
            let (mut since, mut attempts) = (Instant::now(), 0u32);
            loop {
                let mut watch = vec![failed_rx.as_fd()];
                watch.extend(opts.vmm);
                let wait = Wait { what: "the source, to go on with post-copy", deadline: Some(since + recover), watch: &watch };
                let next = acc.next(wait, |a| match (a.hello.lane.get(), a.hello.features.get() & features::POSTCOPY) {
                    (CONTROL_LANE, f) if f != 0 => Ok(()),
                    _ => Err(Turned::PostcopyOnly),
                });
                let a = match next {
                    Ok(Next::Conn(a)) => a,
                    Ok(Next::Watched(0)) => return Err(pc.failed()),
                    Ok(Next::Watched(_)) => return Err(vmm_gone_in_postcopy()),
                    Err(SessionError::TimedOut { .. }) => {
                        return Err(Cancel::SourceGone { recover, pages: pc.remaining() }.into());
                    }
                    Err(e) => return Err(e),
                };
                attempts += 1;
                match attempt(acc, a, pc, (session, pool), opts.plan, &watch) {
                    Ok(Some((rounds, digest))) => {
                        // The guest's faults are resolved here until its VMM unregistered.
                        if let Err(e) = vmm.all_local() {
                            log::warn!("post-copy: the destination VMM did not release its memory: {e}");
                        }
                        return Ok((rounds, digest, attempts));
                    }
                    Ok(None) => {}
                    Err(e) if is_link_failure(&e) => {
                        log::warn!("post-copy: the link to the source broke ({e}); waiting up to {} s for it", recover.as_secs());
                        since = Instant::now();
                    }
                    Err(e) => return Err(e),
                }
            }
        })();
        pc.stopping.store(true, Ordering::Release);
        let _ = stop_tx.shutdown(Shutdown::Both);
        let fault_result = faults.join().expect("fault thread panicked");
        // The fault thread's failure is the reason, unless it was taken already.
        let r = match (r, fault_result) {
            (Err(e @ SessionError::Cancelled(Cancel::FaultThread(_))), _) => Err(e),
            (Err(_), Err(())) => Err(pc.failed()),
            (r, _) => r,
        };
        if let Err(e) = &r {
            tell_source(acc, e);
        }
        r
    })
}

fn vmm_gone_in_postcopy() -> SessionError {
    Cancel::VmmGoneInPostcopy.into()
}

/// Post-copy failed here while no attempt was open: the source is reconnecting to resume
/// it. Its next connection (within a few seconds) is told why, so it stops.
fn tell_source(acc: &Acceptor<'_>, e: &SessionError) {
    if matches!(e, SessionError::Peer(_)) {
        return;
    }
    let wait =
        Wait { what: "the source, to tell it post-copy failed", deadline: Some(Instant::now() + Duration::from_secs(5)), watch: &[] };
    if let Ok(Next::Conn(a)) = acc.next(wait, |a| match a.hello.lane.get() {
        CONTROL_LANE => Ok(()),
        _ => Err(Turned::PostcopyFailed),
    }) {
        Ctl::new(a.s, a.keys).close_with_error(&e.to_string());
    }
}

/// One post-copy attempt on a connection that authenticated for post-copy: RESUME, NEEDED,
/// the push session and its fault lane, then ROUND, DONE and RESULT. `Ok(None)`: the
/// connection was for another session and was turned away.
fn attempt(
    acc: &Acceptor<'_>,
    a: Authed,
    pc: &Arc<Placement>,
    (session, pool): (u64, &crate::pool::Pool),
    plan: &Plan,
    watch: &[BorrowedFd<'_>],
) -> Result<Option<(Vec<crate::migrate::RoundReport>, Digest)>, SessionError> {
    crate::engine::tune_socket(&a.s)?;
    let peer = a.peer;
    let mut ctl = Ctl::new(a.s, a.keys);
    ctl.s.set_read_timeout(Some(crate::migrate::ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::Resume, &mut buf)?;
    let resume: wire::Resume = wire::parse(Kind::Resume, &buf)?;
    if resume.session.get() != session {
        log::warn!("post-copy: {peer} asked to resume session {:#x}; this is {session:#x}", resume.session.get());
        ctl.close_with_error(&format!("no migration {:#x} is in post-copy here", resume.session.get()));
        return Ok(None);
    }
    let needed = pc.needed();
    let placed = pc.stale_pages - pc.remaining();
    log::info!("post-copy: the source is back ({peer}); {} page(s) still needed", pc.remaining());
    send_runs(&mut ctl, Kind::Needed, placed, &needed)?;
    ctl.expect(Kind::Session, &mut buf)?;
    let (layout, lanes, transport) = wire::parse_session(&buf)?;
    let sizes: Vec<u64> = pc.regions.iter().map(|r| r.size).collect();
    if layout.regions != sizes || transport != wire::DataTransport::Tcp || lanes < 2 {
        let e = Violation::PostcopySession { want: sizes, got: layout.regions, lanes, transport };
        ctl.error(&e.to_string());
        return Err(e.into());
    }
    crate::migrate::dest::check_session(&layout, lanes, transport, features::MIGRATE, plan)?;
    let id = crate::migrate::dest::session_ok(&mut ctl)?;
    let live = Arc::new(crate::live::receiver(crate::live::Role::MigrateIn, id, usize::from(lanes), layout.regions.iter().sum()));
    let (tx, rx) = crate::sink::reports(lanes);
    let (wake, woken) = UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e))?;
    let fault_wake = wake.try_clone().map_err(|e| SessionError::io("making a wake-up socket", e))?;
    let sink = Arc::new(Sink {
        layout: layout.clone(),
        targets: Vec::new(),
        plan: plan.clone(),
        live,
        progress: None,
        postcopy: Some(pc.clone()),
        tx: tx.clone(),
        wake,
        idle: crate::migrate::ROUND_IDLE_TIMEOUT,
    });
    let fault_lane_no = lanes - 1;
    let t = Instant::now();
    let mut fault_sock = None;
    std::thread::scope(|s| {
        let mut w = vec![ctl.s.as_fd()];
        w.extend_from_slice(watch);
        // The push lanes go to the pool's receiving threads; the fault lane, which answers
        // the guest's faults ahead of everything, has a thread of its own for the attempt.
        let (lanes_run, opened) = crate::migrate::dest::hand_lanes(acc, pool, &sink, (id, lanes), &w, |a| {
            if a.hello.lane.get() != fault_lane_no {
                return Some(a);
            }
            fault_sock = a.s.try_clone().ok();
            let (tx, wake, layout) = (tx.clone(), &fault_wake, &layout);
            s.spawn(move || {
                if let Err(e) = fault_lane(pc, layout, a.s, a.keys, plan.rdma.as_ref()) {
                    let _ = tx.try_send(Err(e));
                    let _ = (&*wake).write(&[1]);
                }
            });
            None
        });
        let r = match opened {
            Ok(None) => push_round(&mut ctl, &woken, watch, &rx, fault_lane_no, pc, t),
            Ok(Some(0)) => Err(crate::engine::recv::peer_ended(&mut ctl, "waiting for the post-copy lanes")),
            Ok(Some(1)) => Err(pc.failed()),
            Ok(Some(_)) => Err(vmm_gone_in_postcopy()),
            Err(e) => Err(e),
        };
        // A failure that is not the link's ends the migration: the source is told why.
        if let Err(e) = &r
            && !is_link_failure(e)
            && !matches!(e, SessionError::Peer(_))
        {
            ctl.error(&e.to_string());
        }
        // Every lane ends now: done, or the attempt failed and the next one starts afresh.
        pc.close_link();
        lanes_run.shut_down();
        if let Some(f) = &fault_sock {
            let _ = f.shutdown(Shutdown::Both);
        }
        lanes_run.wait();
        r.map(Some)
    })
}

/// The control thread of an attempt: the push round's end on every data lane and ROUND,
/// every page placed, ROUND_OK; then DONE's digest against the pages as placed, and RESULT.
fn push_round(
    ctl: &mut Ctl,
    woken: &UnixStream,
    watch: &[BorrowedFd<'_>],
    rx: &mpsc::Receiver<LaneMsg>,
    data_lanes: u16,
    pc: &Placement,
    t: Instant,
) -> Result<(Vec<crate::migrate::RoundReport>, Digest), SessionError> {
    use crate::migrate::dest::{Stirred, await_control, lane_error, round_ends};
    let mut buf = Vec::new();
    // The fault thread's failure, then the destination VMM (if watched), come first.
    if let Stirred::Watched(i) = await_control(ctl, woken, watch, rx, None, "waiting for the push round")? {
        return Err(if i == 0 { pc.failed() } else { vmm_gone_in_postcopy() });
    }
    ctl.expect(Kind::Round, &mut buf).map_err(|e| lane_error(rx, e))?;
    let r: wire::Round = wire::parse(Kind::Round, &buf)?;
    let sum = round_ends(rx, data_lanes, None)?;
    if r.last.get() != 1 {
        return Err(
            Violation::Field { frame: Kind::Round, field: "last", value: r.last.get().into(), allowed: "1 for the push round" }.into()
        );
    }
    if sum.pages != r.pages.get() {
        return Err(Violation::Miscount { what: Counted::PushPages, announced: r.pages.get(), found: sum.pages }.into());
    }
    // Every needed page was pushed, or answered on the fault lane before the push got to
    // it (the push then leaves it out): each is claimed, or its answer arrives in a moment.
    // A fault lane that breaks first fails the attempt as the link's failure (the next
    // attempt's NEEDED names what is missing); the lane gives up on a silent link after
    // SILENCE.
    let until = Instant::now() + 2 * super::SILENCE;
    while pc.remaining() > 0 {
        if let Ok(Err(e)) = rx.try_recv() {
            return Err(e);
        }
        if Instant::now() >= until {
            return Err(Violation::Miscount { what: Counted::PushPlaced, announced: 0, found: pc.remaining() }.into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let ok = wire::RoundOk { round: r.round, _pad: 0.into(), pages: sum.pages.into() };
    ctl.send(Kind::RoundOk, ok.as_bytes())?;
    let digest = pc.digest();
    let size: u64 = pc.regions.iter().map(|r| r.size).sum();
    crate::migrate::dest::check_done(ctl, &mut buf, digest, size)?;
    // Every page is placed in the guest's memory: the source may know.
    crate::migrate::dest::result_ok(ctl, digest, size)?;
    let report = crate::migrate::dest::received_round(r.round.get(), true, &sum, t.elapsed().as_secs_f64(), size);
    Ok((vec![report], digest))
}

/// The destination's fault lane in one attempt: the source's answers to FETCH, placed as
/// they come, until LANE_END. The lane's sending half is the placement's link meanwhile,
/// which also carries a PING every [`super::HEARTBEAT`]; a lane that hears nothing (no
/// answer, no PONG) for [`super::SILENCE`] ends the attempt as a broken link. After RDMA
/// rounds the source also sets up the READ path on it (see [`super::rdma`]), whose
/// completion thread runs beside the lane from FAULT_RDMA_ON on.
pub(crate) fn fault_lane(pc: &Placement, layout: &Layout, s: TcpStream, keys: Keys, rp: Option<&RdmaPlan>) -> Result<(), SessionError> {
    let Keys { tx, rx, .. } = keys;
    let writer = s.try_clone().map_err(|e| SessionError::io("cloning the fault lane", e))?;
    let closer = s.try_clone().map_err(|e| SessionError::io("cloning the fault lane", e))?;
    pc.open_link(writer, tx);
    let (done_tx, done) = mpsc::channel::<()>();
    let (stop, read_failure) = (AtomicBool::new(false), Mutex::new(None));
    let r = std::thread::scope(|sc| {
        sc.spawn(move || {
            // Until the lane ends (the sender dropped) or the link is gone.
            while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(super::HEARTBEAT) {
                if !pc.ping() {
                    return;
                }
            }
        });
        // The READ path's completion thread: its failure ends the lane, and is the reason.
        let start_reads = |cq: Cq, device: String| {
            let (stop, read_failure, closer) = (&stop, &read_failure, &closer);
            sc.spawn(move || {
                if let Err(e) = super::rdma::complete(pc, &cq, &device, stop) {
                    *read_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let _ = closer.shutdown(Shutdown::Both);
                }
            });
        };
        let r = (|| {
            let mut s = s;
            s.set_read_timeout(Some(super::SILENCE)).map_err(|e| SessionError::io("configuring the fault lane", e))?;
            let mut reader = FrameReader::new(256 << 10, wire::max_payload_for(layout.max_chunk), rx);
            let (mut dec, mut scratch) = (Decoder::default(), Vec::new());
            let (mut staged, mut offered) = (None, false);
            loop {
                let (h, kind, payload) = reader.next(&mut s, "reading the fault lane").map_err(super::silent_link)?;
                match kind {
                    Kind::Data => {
                        pc.place_frame(layout, &h, &Payload::One(payload), &mut dec, &mut scratch, true)?;
                    }
                    Kind::Pong => {}
                    Kind::FaultRdma if !offered => {
                        // Pages read arrive without frames: only a keyed digest checks them.
                        if !pc.keyed() {
                            return Err(Violation::Unexpected {
                                frame: Kind::FaultRdma,
                                why: "after rounds over TCP (pages read could not be checked)",
                            }
                            .into());
                        }
                        offered = true;
                        let reply = |kind: Kind, payload: &[u8]| {
                            pc.send_on_link(kind, payload);
                        };
                        staged = super::rdma::accept(pc.regions.len(), rp, payload, &reply)?;
                    }
                    Kind::FaultRdmaOn => {
                        let Some((reads, cq)) = staged.take() else {
                            return Err(Violation::Unexpected { frame: Kind::FaultRdmaOn, why: "no READ path was set up" }.into());
                        };
                        start_reads(cq, reads.device.clone());
                        pc.open_reads(reads);
                    }
                    Kind::LaneEnd => return Ok(()),
                    Kind::Error => return Err(SessionError::Peer(String::from_utf8_lossy(payload).into_owned())),
                    other => return Err(wire::FrameError::Unexpected { expected: Kind::Data, got: other }.into()),
                }
            }
        })();
        drop(done_tx);
        stop.store(true, Ordering::Relaxed);
        r
    });
    // Its completion thread is done: the READ path goes (the QP, then its slots).
    pc.close_reads();
    pc.close_link();
    match read_failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => r,
    }
}
