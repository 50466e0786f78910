//! The destination side of a migration: one session into a new memfd, round after round,
//! handed over only when the digest of what arrived matches the paused source's.
//!
//! Each lane writes its pages into the memfd and records each page's hash in a table, so
//! the destination's digest after the last round is a fold over that table, not a second
//! pass over the memory while the guest is paused.

use std::fs::File;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Instant;

use zerocopy::IntoBytes;

use super::{MigrationReport, PageHashes, ROUND_IDLE_TIMEOUT, RoundCounts, RoundReport};
use crate::auth::{Auth, server_handshake};
use crate::conn::{SessionError, expect_frame, send_error, write_frame};
use crate::digest::Digest;
use crate::encode::Decoder;
use crate::engine::dest::Dest;
use crate::engine::recv::accept_lane;
use crate::engine::{PAGE, cpu_seconds, tune_socket};
use crate::lane::{LaneReader, Payload};
use crate::plan::{Plan, Transport};
use crate::wire::{self, CONTROL_LANE, DataTransport, Encoding, FrameError, HEADER_LEN, Kind, Layout, features};

#[derive(Debug)]
pub struct DestOptions<'a> {
    pub auth: Auth,
    pub plan: &'a Plan,
}

/// A migration that arrived whole: the guest memory (a memfd per region, in the source's
/// order) and the report.
#[derive(Debug)]
pub struct Incoming {
    pub memory: Vec<File>,
    pub report: MigrationReport,
}

/// A lane's message to the control thread: one per round, or its failure.
type LaneMsg = Result<(u16, u32, RoundCounts), SessionError>;

/// Accepts one migration on `listener` into a new memfd. Fails, and drops the memory,
/// unless every round arrived and the final digest matches.
pub fn accept(listener: &TcpListener, opts: &DestOptions<'_>) -> Result<Incoming, SessionError> {
    let (mut ctl, peer) = listener.accept().map_err(|e| SessionError::io("accepting the control connection", e))?;
    tune_socket(&ctl)?;
    let r = session(listener, &mut ctl, opts);
    match &r {
        Err(SessionError::Peer(_) | SessionError::PeerClosed { .. }) => {}
        Err(e) => send_error(&mut ctl, &e.to_string()),
        Ok(_) => {}
    }
    log::info!("migration from {peer} ended: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "memory verified".into()));
    r
}

fn session(listener: &TcpListener, ctl: &mut TcpStream, opts: &DestOptions<'_>) -> Result<Incoming, SessionError> {
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let hello = server_handshake(ctl, &opts.auth, features::MIGRATE)?;
    if hello.lane.get() != CONTROL_LANE {
        return Err(SessionError::Protocol(format!("the first connection must be the control connection, got lane {}", hello.lane.get())));
    }
    if hello.features.get() & features::MIGRATE == 0 {
        return Err(SessionError::Protocol(
            "this ferryd waits for a migration (migrate_in); a one-shot `ferryctl send` goes to `ferryctl recv`".into(),
        ));
    }
    ctl.set_read_timeout(Some(ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    let mut buf = Vec::new();
    expect_frame(ctl, Kind::Session, &mut buf)?;
    let (layout, lanes, transport) = wire::parse_session(&buf)?;
    if transport != DataTransport::Tcp {
        return Err(SessionError::Protocol(format!("a migration runs over TCP lanes; the source asked for {transport:?}")));
    }
    if layout.page_size != PAGE as u32 {
        return Err(SessionError::Protocol(format!("page size {} (this ferryd tracks {PAGE}-byte pages)", layout.page_size)));
    }
    let size: u64 = layout.regions.iter().sum();
    let memory = layout
        .regions
        .iter()
        .map(|&bytes| {
            hw::memmap::memfd("ferry-migration", bytes, false)
                .map_err(|source| SessionError::Region { path: format!("a {bytes}-byte memfd for the incoming guest memory"), source })
        })
        .collect::<Result<Vec<File>, _>>()?;
    let targets: Vec<Target<'_>> = memory
        .iter()
        .zip(&layout.regions)
        .map(|(m, &bytes)| Target { dest: Dest::new(m, bytes, PAGE as u64), hashes: PageHashes::new(super::pages(bytes)) })
        .collect();
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| SessionError::Protocol(format!("no randomness for a session id: {e}")))?;
    let session = u64::from_le_bytes(id);
    write_frame(ctl, Kind::SessionOk, wire::SessionOk { session: session.into() }.as_bytes())?;
    log::info!("migration session {session:#x}: {size} bytes in {} region(s) over {lanes} lane(s)", targets.len());

    let seen = Mutex::new(vec![false; usize::from(lanes)]);
    let (tx, rx) = mpsc::channel::<LaneMsg>();
    // Clones of every connection, shut down when one side fails so no thread waits on a
    // peer that will not speak again.
    let mut socks = vec![ctl.try_clone().map_err(|e| SessionError::io("cloning the control connection", e))?];
    let ctx = Ctx { layout: &layout, session, lanes, targets: &targets, seen: &seen, plan: opts.plan, auth: &opts.auth };
    let outcome = std::thread::scope(|s| {
        let mut handles = Vec::new();
        let mut opened = Ok(());
        for _ in 0..lanes {
            match accept_lane(listener, ctl).and_then(|c| c.try_clone().map(|k| (c, k)).map_err(|e| SessionError::io("cloning a lane", e)))
            {
                Ok((conn, clone)) => {
                    socks.push(clone);
                    let (tx, ctx, ctl_clone) = (tx.clone(), &ctx, socks[0].try_clone());
                    handles.push(s.spawn(move || {
                        let r = lane(conn, ctx, &tx);
                        if let Err(e) = &r {
                            let _ = tx.send(Err(SessionError::Protocol(e.to_string())));
                            if let Ok(c) = ctl_clone {
                                let _ = c.shutdown(Shutdown::Both);
                            }
                        }
                        r
                    }));
                }
                Err(e) => {
                    opened = Err(e);
                    break;
                }
            }
        }
        let r = opened.and_then(|()| rounds(ctl, &rx, lanes, &targets));
        if r.is_err() {
            for c in &socks {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        let lane_results: Vec<_> = handles.into_iter().map(|h| h.join().expect("lane thread panicked")).collect();
        (r, lane_results)
    });
    let (rounds, lane_results) = outcome;
    let (rounds, digest) = rounds?;
    let (mut total, mut uring) = (RoundCounts::default(), false);
    for r in lane_results {
        let (counts, ring) = r?;
        total += counts;
        uring |= ring;
    }
    let seconds = t0.elapsed().as_secs_f64();
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
        cpu_seconds_per_gib: (cpu_seconds() - cpu0) / (size as f64 / (1u64 << 30) as f64),
        transport: if uring { Transport::Tcp } else { Transport::Sockets }.to_string(),
        compression: "as the source chose".into(),
        lanes: u32::from(lanes),
        workers: u32::from(lanes),
        digest: digest.hex(),
        digest_match: true,
        rounds,
        ..MigrationReport::default()
    };
    Ok(Incoming { memory, report })
}

/// The control thread's part: each ROUND is checked against what the lanes reported,
/// then confirmed; after the last, DONE's digest against the page table.
fn rounds(
    ctl: &mut TcpStream,
    rx: &mpsc::Receiver<LaneMsg>,
    lanes: u16,
    targets: &[Target<'_>],
) -> Result<(Vec<RoundReport>, Digest), SessionError> {
    let all_pages: u64 = targets.iter().map(|t| t.dest.pages()).sum();
    let size: u64 = targets.iter().map(|t| t.dest.len()).sum();
    let mut buf = Vec::new();
    let mut reports = Vec::new();
    let mut started = Instant::now();
    loop {
        let round = reports.len() as u32;
        // A lane that failed shut the control connection down to wake this read; its
        // error is the one to report.
        let lane_error = |e: SessionError| match rx.try_recv() {
            Ok(Err(lane)) => lane,
            _ => e,
        };
        expect_frame(ctl, Kind::Round, &mut buf).map_err(lane_error)?;
        let r: wire::Round = wire::parse(Kind::Round, &buf)?;
        if r.round.get() != round {
            return Err(SessionError::Protocol(format!("ROUND {} arrived; round {round} was next", r.round.get())));
        }
        let mut sum = RoundCounts::default();
        for _ in 0..lanes {
            let (n, got, c) = rx
                .recv_timeout(ROUND_IDLE_TIMEOUT)
                .map_err(|_| SessionError::Protocol(format!("the lanes did not end round {round}")))??;
            if got != round {
                return Err(SessionError::Protocol(format!("lane {n} ended round {got} during round {round}")));
            }
            sum += c;
        }
        let claimed: u64 = targets.iter().map(|t| t.dest.pages_claimed()).sum();
        if sum.pages != r.pages.get() || claimed != sum.pages || (round == 0 && claimed != all_pages) {
            return Err(SessionError::Protocol(format!(
                "round {round}: the source counted {} pages, the lanes {}, {} were written{}",
                r.pages.get(),
                sum.pages,
                claimed,
                if round == 0 { format!(" (round 0 must cover all {all_pages})") } else { String::new() }
            )));
        }
        for t in targets {
            t.dest.next_round();
        }
        let ok = wire::RoundOk { round: round.into(), _pad: 0.into(), pages: sum.pages.into() };
        write_frame(ctl, Kind::RoundOk, ok.as_bytes())?;
        let last = r.last.get() == 1;
        let seconds = started.elapsed().as_secs_f64();
        let dirty_bytes = (sum.pages * PAGE as u64).min(size);
        reports.push(RoundReport {
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
        });
        if last {
            break;
        }
        started = Instant::now();
    }
    expect_frame(ctl, Kind::Done, &mut buf)?;
    let done: wire::Digest = wire::parse(Kind::Done, &buf)?;
    let digest: Digest = targets.iter().map(|t| t.hashes.fold()).sum();
    let source = Digest::from_bytes(done.digest);
    let ok = digest == source && done.bytes.get() == size;
    let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: u32::from(ok).into(), _pad: 0.into() };
    write_frame(ctl, Kind::Result, result.as_bytes())?;
    if !ok {
        return Err(SessionError::DigestMismatch { source_digest: source.hex(), dest_digest: digest.hex() });
    }
    if let Some(last) = reports.last_mut() {
        last.seconds += started.elapsed().as_secs_f64();
    }
    Ok((reports, digest))
}

/// One region of the incoming memory: its writer and its page hashes.
struct Target<'f> {
    dest: Dest<'f>,
    hashes: PageHashes,
}

/// What every lane thread shares.
struct Ctx<'a> {
    layout: &'a Layout,
    session: u64,
    lanes: u16,
    targets: &'a [Target<'a>],
    seen: &'a Mutex<Vec<bool>>,
    plan: &'a Plan,
    auth: &'a Auth,
}

/// One lane for the whole session: DATA frames into the memfd, a ROUND_END per round
/// (its counts checked, then reported), LANE_END after the last.
/// Returns the lane's counts, and whether io_uring received them.
fn lane(mut s: TcpStream, ctx: &Ctx<'_>, tx: &mpsc::Sender<LaneMsg>) -> Result<(RoundCounts, bool), SessionError> {
    crate::engine::tune_data_socket(&s, ctx.plan)?;
    let hello = server_handshake(&mut s, ctx.auth, 0)?;
    let n = hello.lane.get();
    if hello.session.get() != ctx.session {
        return Err(SessionError::Protocol(format!("data connection for session {:#x}, expected {:#x}", hello.session.get(), ctx.session)));
    }
    {
        let mut seen = ctx.seen.lock().expect("lane table");
        if n >= ctx.lanes || std::mem::replace(&mut seen[usize::from(n)], true) {
            return Err(SessionError::Protocol(format!("data connection for lane {n}: out of range (0..{}) or already open", ctx.lanes)));
        }
    }
    s.set_read_timeout(Some(ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    let max_payload = wire::max_payload_for(ctx.layout.max_chunk);
    crate::engine::pin_lane(ctx.plan, n);
    let mut reader = LaneReader::new(ctx.plan, &s, max_payload)?;
    log::info!("migration lane {n} connected ({})", if reader.uring() { "io_uring multishot receive" } else { "plain reads" });
    let mut dec = Decoder::default();
    let (mut round, mut this, mut total) = (0u32, RoundCounts::default(), RoundCounts::default());
    let live = crate::live::worker(crate::live::Role::MigrateIn, usize::from(n));
    let page = PAGE as u64;
    let refused = |e| SessionError::Protocol(format!("data frame refused: {e}"));
    let (mut one_page, mut scratch) = (vec![0u8; PAGE], Vec::new());
    loop {
        let (h, kind, payload) = reader.next(&mut s, "receiving migration data")?;
        match kind {
            Kind::Data => {
                let (encoding, region, offset, raw_len) = ctx.layout.check_data(&h)?;
                // check_data bounded `region` by the session's regions.
                let Target { dest, hashes } = &ctx.targets[region as usize];
                let first = offset / page;
                let record = |i: u64, p: &[u8]| hashes.set(first + i, Digest::of_page(region, first + i, p));
                match encoding {
                    Encoding::Raw => {
                        dest.write_payload(offset, &payload).map_err(refused)?;
                        payload.pages(PAGE, &mut one_page, record);
                    }
                    Encoding::Zero => {
                        let len = u64::from(raw_len);
                        // Round 0 writes into a new memfd, which reads as zero already.
                        if round == 0 { dest.claim_zero(offset, len) } else { dest.write_zero(offset, len) }.map_err(refused)?;
                        for i in 0..len.div_ceil(page) {
                            let this_len = (len - i * page).min(page) as usize;
                            hashes.set(first + i, Digest::of_zero_page(region, first + i, this_len));
                        }
                        this.zero_pages += len.div_ceil(page);
                    }
                    Encoding::Zstd => {
                        let bytes = dec.zstd(payload.contiguous(&mut scratch), raw_len)?;
                        dest.write(offset, bytes).map_err(refused)?;
                        Payload::One(bytes).pages(PAGE, &mut one_page, record);
                        this.compressed_in += u64::from(raw_len);
                        this.compressed_out += payload.len() as u64;
                    }
                }
                this.frames += 1;
                this.pages += u64::from(raw_len).div_ceil(page);
                this.wire_bytes += (HEADER_LEN + payload.len()) as u64;
                let zero = if encoding == Encoding::Zero { u64::from(raw_len).div_ceil(page) } else { 0 };
                live.add(u64::from(raw_len), (HEADER_LEN + payload.len()) as u64, 1, zero);
            }
            Kind::RoundEnd => {
                let end: wire::RoundEnd = wire::parse(Kind::RoundEnd, payload.contiguous(&mut scratch))?;
                if end.round.get() != round
                    || end.frames.get() != this.frames
                    || end.bytes.get() != this.wire_bytes
                    || end.pages.get() != this.pages
                {
                    return Err(SessionError::Protocol(format!(
                        "lane {n} ended round {} after {} frames / {} bytes / {} pages; it received round {round}: {} / {} / {}",
                        end.round.get(),
                        end.frames.get(),
                        end.bytes.get(),
                        end.pages.get(),
                        this.frames,
                        this.wire_bytes,
                        this.pages
                    )));
                }
                total += this;
                if tx.send(Ok((n, round, this))).is_err() {
                    return Err(SessionError::Protocol("the migration ended".into()));
                }
                this = RoundCounts::default();
                round += 1;
            }
            Kind::LaneEnd => {
                if this.frames != 0 {
                    return Err(SessionError::Protocol(format!("lane {n} ended with {} frames outside a round", this.frames)));
                }
                return Ok((total, reader.uring()));
            }
            Kind::Error => return Err(SessionError::Peer(String::from_utf8_lossy(payload.contiguous(&mut scratch)).into_owned())),
            other => return Err(FrameError::Unexpected { expected: Kind::Data, got: other }.into()),
        }
    }
}
