//! The receiving side: accepts one session, writes its region into a file, digests the
//! result and answers the sender. The destination is written to `OUT.partial` and renamed
//! to `OUT` only once the digests match; any failure removes it.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use zerocopy::IntoBytes;

use super::dest::Dest;
use super::{IDLE_TIMEOUT, PAGE, Report, cpu_seconds, tune_socket};
use crate::auth::{Auth, server_handshake};
use crate::conn::{SessionError, expect_frame, send_error, write_frame};
use crate::digest::Digest;
use crate::encode::Decoder;
use crate::lane::LaneReader;
use crate::plan::{Plan, Transport};
use crate::wire::{self, CONTROL_LANE, DataTransport, Encoding, FrameError, HEADER_LEN, Kind, Layout};

#[derive(Debug)]
pub struct RecvOptions<'a> {
    pub auth: Auth,
    pub plan: &'a Plan,
    /// Region bytes received so far, for a progress bar.
    pub progress: Option<&'a AtomicU64>,
}

/// `OUT.partial`, removed on drop unless the transfer was confirmed.
struct Partial {
    path: PathBuf,
    done: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Debug, Default)]
struct LaneStats {
    /// Digest of the bytes this lane wrote (and of the zero pages it left in place).
    digest: Digest,
    frames: u64,
    wire_bytes: u64,
    zero_pages: u64,
    compressed_in: u64,
    compressed_out: u64,
    /// io_uring received this lane's bytes.
    uring: bool,
    /// The lane's number.
    lane: u16,
    /// Per data frame: arrival until written into the destination, µs.
    write_latency: Option<hdrhistogram::Histogram<u64>>,
}

/// Receives one session on `listener` into the file `out`.
pub fn recv_file(listener: &TcpListener, out: &Path, opts: &RecvOptions<'_>) -> Result<Report, SessionError> {
    let (mut ctl, peer) = listener.accept().map_err(|e| SessionError::io("accepting the control connection", e))?;
    tune_socket(&ctl)?;
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let r = session(listener, &mut ctl, out, opts, t0, cpu0);
    match &r {
        Err(SessionError::Peer(_) | SessionError::PeerClosed { .. }) => {}
        Err(e) => send_error(&mut ctl, &e.to_string()),
        Ok(_) => {}
    }
    log::info!("session from {peer} ended: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into()));
    r
}

fn session(
    listener: &TcpListener,
    ctl: &mut TcpStream,
    out: &Path,
    opts: &RecvOptions<'_>,
    t0: Instant,
    cpu0: f64,
) -> Result<Report, SessionError> {
    // RDMA is offered when this side's plan has a device for it.
    let hello = server_handshake(ctl, &opts.auth, if opts.plan.rdma.is_some() { wire::features::RDMA } else { 0 })?;
    if hello.lane.get() != CONTROL_LANE {
        return Err(SessionError::Protocol(format!("the first connection must be the control connection, got lane {}", hello.lane.get())));
    }
    let mut buf = Vec::new();
    expect_frame(ctl, Kind::Session, &mut buf)?;
    let (layout, lanes, transport) = wire::parse_session(&buf)?;
    if transport == DataTransport::Rdma && hello.features.get() & wire::features::RDMA == 0 {
        return Err(SessionError::Protocol("the sender asked for RDMA, which the handshake did not agree on".into()));
    }
    if layout.regions.len() != 1 {
        return Err(SessionError::Protocol(format!(
            "this receiver writes one region into {}; the sender described {}",
            out.display(),
            layout.regions.len()
        )));
    }
    let size = layout.regions[0];
    let mut partial = Partial { path: PathBuf::from(format!("{}.partial", out.display())), done: false };
    // Read-write: RDMA maps it shared to register it, and digests it afterwards.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial.path)
        .map_err(|source| SessionError::Region { path: partial.path.display().to_string(), source })?;
    file.set_len(size).map_err(|source| SessionError::Region { path: partial.path.display().to_string(), source })?;
    let dest = Dest::new(&file, size, PAGE as u64);
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| SessionError::Protocol(format!("no randomness for a session id: {e}")))?;
    let session = u64::from_le_bytes(id);
    write_frame(ctl, Kind::SessionOk, wire::SessionOk { session: session.into() }.as_bytes())?;
    log::info!("session {session:#x}: {size} bytes into {} over {lanes} lane(s)", out.display());

    let ((total, write_latency), rdma) = match transport {
        DataTransport::Tcp => (tcp_lanes(listener, ctl, &layout, session, lanes, &dest, opts)?, None),
        DataTransport::Rdma => {
            let r = super::rdma::recv(ctl, &file, size, lanes, layout.max_chunk, opts.plan, opts.progress)?;
            let st = LaneStats { digest: r.digest, frames: r.imms, wire_bytes: r.bytes, zero_pages: r.zero_pages, ..LaneStats::default() };
            ((st, Vec::new()), Some(r.report))
        }
    };
    expect_frame(ctl, Kind::Done, &mut buf)?;
    let done: wire::Digest = wire::parse(Kind::Done, &buf)?;
    // TCP lanes digested every byte as they wrote it; RDMA digested the destination once
    // it was deregistered.
    let digest = total.digest;
    let sender = Digest::from_bytes(done.digest);
    let ok = digest == sender && done.bytes.get() == size;
    let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: u32::from(ok).into(), _pad: 0.into() };
    write_frame(ctl, Kind::Result, result.as_bytes())?;
    if !ok {
        return Err(SessionError::DigestMismatch { source_digest: sender.hex(), dest_digest: digest.hex() });
    }
    std::fs::rename(&partial.path, out).map_err(|source| SessionError::Region { path: out.display().to_string(), source })?;
    partial.done = true;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Report {
        role: "recv".into(),
        bytes: size,
        wire_bytes: total.wire_bytes,
        seconds,
        gbps: size as f64 / seconds / 1e9,
        zero_pages: total.zero_pages,
        compressed_in_bytes: total.compressed_in,
        compressed_out_bytes: total.compressed_out,
        frames: total.frames,
        lanes: u32::from(lanes),
        workers: u32::from(lanes),
        cpu_seconds_per_gib: (cpu_seconds() - cpu0) / (size.max(1) as f64 / (1u64 << 30) as f64),
        transport: match (&rdma, total.uring) {
            (Some(_), _) => Transport::Rdma,
            (None, true) => Transport::Tcp,
            (None, false) => Transport::Sockets,
        }
        .to_string(),
        compression: if rdma.is_some() { "off (RDMA)".into() } else { "as the sender chose".into() },
        digest: digest.hex(),
        digest_match: true,
        chunk_latency_us: None,
        chunk_latency: None,
        write_latency_us: (!write_latency.is_empty()).then(|| {
            let mut all = super::latency_histogram();
            for h in &write_latency {
                let _ = all.add(h);
            }
            super::Percentiles::of(&all)
        }),
        worker_latency: write_latency,
        rdma,
    })
}

/// The TCP data path: accepts one connection per lane and runs each on its own thread;
/// every page of the region must have been delivered at the end.
fn tcp_lanes(
    listener: &TcpListener,
    ctl: &TcpStream,
    layout: &Layout,
    session: u64,
    lanes: u16,
    dest: &Dest<'_>,
    opts: &RecvOptions<'_>,
) -> Result<(LaneStats, Vec<hdrhistogram::Histogram<u64>>), SessionError> {
    let seen = Mutex::new(vec![false; usize::from(lanes)]);
    let results: Vec<Result<LaneStats, SessionError>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..lanes {
            match accept_lane(listener, ctl) {
                Ok(conn) => {
                    let seen = &seen;
                    handles.push(s.spawn(move || lane(conn, layout, session, lanes, dest, seen, opts)));
                }
                Err(e) => {
                    handles.push(s.spawn(move || Err(e)));
                    break;
                }
            }
        }
        handles.into_iter().map(|h| h.join().expect("lane thread panicked")).collect()
    });
    let (mut total, mut by_lane) = (LaneStats::default(), Vec::new());
    for r in results {
        let mut r = r?;
        if let Some(h) = r.write_latency.take() {
            by_lane.push((r.lane, h));
        }
        total.digest.combine(r.digest);
        total.frames += r.frames;
        total.wire_bytes += r.wire_bytes;
        total.zero_pages += r.zero_pages;
        total.compressed_in += r.compressed_in;
        total.compressed_out += r.compressed_out;
        total.uring |= r.uring;
    }
    if dest.pages_claimed() != dest.pages() {
        return Err(SessionError::Protocol(format!(
            "the lanes ended with {} of the region's {} pages delivered",
            dest.pages_claimed(),
            dest.pages()
        )));
    }
    by_lane.sort_by_key(|(n, _)| *n);
    Ok((total, by_lane.into_iter().map(|(_, h)| h).collect()))
}

/// Waits for the next data connection; fails if the control connection closes (the
/// sender died) or nothing arrives within the idle timeout.
pub(crate) fn accept_lane(listener: &TcpListener, ctl: &TcpStream) -> Result<TcpStream, SessionError> {
    let timeout = PollTimeout::try_from(IDLE_TIMEOUT.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(ctl.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, timeout).map_err(|e| SessionError::io("waiting for data connections", e.into()))?;
    if n == 0 {
        return Err(SessionError::Protocol(format!("the sender opened too few data connections within {} s", IDLE_TIMEOUT.as_secs())));
    }
    if fds[1].revents().is_some_and(|r| !r.is_empty()) {
        return Err(SessionError::PeerClosed { op: "waiting for data connections".into() });
    }
    let (conn, _) = listener.accept().map_err(|e| SessionError::io("accepting a data connection", e))?;
    Ok(conn)
}

fn lane(
    mut s: TcpStream,
    layout: &Layout,
    session: u64,
    lanes: u16,
    dest: &Dest<'_>,
    seen: &Mutex<Vec<bool>>,
    opts: &RecvOptions<'_>,
) -> Result<LaneStats, SessionError> {
    super::tune_data_socket(&s, opts.plan)?;
    let hello = server_handshake(&mut s, &opts.auth, 0)?;
    let n = hello.lane.get();
    if hello.session.get() != session {
        return Err(SessionError::Protocol(format!("data connection for session {:#x}, expected {session:#x}", hello.session.get())));
    }
    {
        let mut seen = seen.lock().expect("lane table");
        if n >= lanes || std::mem::replace(&mut seen[usize::from(n)], true) {
            return Err(SessionError::Protocol(format!("data connection for lane {n}: out of range (0..{lanes}) or already open")));
        }
    }
    // The lane's arena holds several frames: a read syscall, or an io_uring receive,
    // fetches as many as have arrived.
    let max_payload = wire::max_payload_for(layout.max_chunk);
    super::pin_lane(opts.plan, n);
    let mut reader = LaneReader::new(opts.plan, &s, max_payload)?;
    log::info!("lane {n} connected ({})", if reader.uring() { "io_uring multishot receive" } else { "plain reads" });
    let mut dec = Decoder::default();
    let mut st = LaneStats { uring: reader.uring(), lane: n, ..LaneStats::default() };
    let mut latency = super::latency_histogram();
    let live = crate::live::worker(crate::live::Role::Recv, usize::from(n));
    let (mut page, mut scratch) = (vec![0u8; PAGE], Vec::new());
    loop {
        let (h, kind, payload) = reader.next(&mut s, "receiving data")?;
        let arrived = Instant::now();
        match kind {
            Kind::Data => {
                let (encoding, region, offset, raw_len) = layout.check_data(&h)?;
                let first_page = offset / PAGE as u64;
                let refused = |e| SessionError::Protocol(format!("data frame refused: {e}"));
                match encoding {
                    Encoding::Raw => {
                        dest.write_payload(offset, &payload).map_err(refused)?;
                        payload.pages(PAGE, &mut page, |i, p| st.digest.combine(Digest::of_page(region, first_page + i, p)));
                    }
                    // The destination was created empty: its bytes are already zero.
                    Encoding::Zero => {
                        dest.claim_zero(offset, u64::from(raw_len)).map_err(refused)?;
                        st.digest.add_zero(region, first_page, PAGE, u64::from(raw_len));
                        st.zero_pages += u64::from(raw_len).div_ceil(PAGE as u64);
                    }
                    Encoding::Zstd => {
                        let bytes = dec.zstd(payload.contiguous(&mut scratch), raw_len)?;
                        dest.write(offset, bytes).map_err(refused)?;
                        st.digest.add(region, first_page, PAGE, bytes);
                        st.compressed_in += u64::from(raw_len);
                        st.compressed_out += payload.len() as u64;
                    }
                }
                latency.saturating_record(arrived.elapsed().as_micros() as u64);
                st.frames += 1;
                st.wire_bytes += (HEADER_LEN + payload.len()) as u64;
                let zero = if encoding == Encoding::Zero { u64::from(raw_len).div_ceil(PAGE as u64) } else { 0 };
                live.add(u64::from(raw_len), (HEADER_LEN + payload.len()) as u64, 1, zero);
                if let Some(p) = opts.progress {
                    p.fetch_add(u64::from(raw_len), Ordering::Relaxed);
                }
            }
            Kind::LaneEnd => {
                let end: wire::LaneEnd = wire::parse(Kind::LaneEnd, payload.contiguous(&mut scratch))?;
                if end.frames.get() != st.frames || end.bytes.get() != st.wire_bytes {
                    return Err(SessionError::Protocol(format!(
                        "lane {n} ended after {} frames / {} bytes, the sender sent {} / {}",
                        st.frames,
                        st.wire_bytes,
                        end.frames.get(),
                        end.bytes.get()
                    )));
                }
                st.write_latency = Some(latency);
                return Ok(st);
            }
            Kind::Error => return Err(SessionError::Peer(String::from_utf8_lossy(payload.contiguous(&mut scratch)).into_owned())),
            other => return Err(FrameError::Unexpected { expected: Kind::Data, got: other }.into()),
        }
    }
}
