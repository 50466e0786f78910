//! The receiving side: accepts one session, writes its region into a file, digests the
//! result and answers the sender. The destination is written to a partial file of this
//! session's own (`OUT.<random>.partial`, created exclusively) and renamed to `OUT` once
//! the digests match; only then is the sender told the transfer succeeded. Any failure
//! removes the partial file.
//!
//! Connections that do not authenticate (a port probe, a wrong key, garbage) are turned
//! away and the receiver keeps listening for its real sender ([`crate::session::accept`]).

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use zerocopy::IntoBytes;

use super::dest::Dest;
use super::{PAGE, Report, cpu_seconds, tune_socket};
use crate::auth::Auth;
use crate::conn::{Ctl, SessionError};
use crate::digest::Digest;
use crate::encode::Decoder;
use crate::lane::LaneReader;
use crate::plan::{Plan, Transport};
use crate::session::accept::{Acceptor, Authed, Next, Wait};
use crate::session::limits::{Backing, check_lanes, check_region};
use crate::session::seal::TAG_LEN;
use crate::wire::{self, CONTROL_LANE, DataTransport, Encoding, FrameError, HEADER_LEN, Kind, Layout};

#[derive(Debug)]
pub struct RecvOptions<'a> {
    pub auth: Auth,
    pub plan: &'a Plan,
    /// Region bytes received so far, for a progress bar.
    pub progress: Option<&'a AtomicU64>,
    /// The region's size once the sender has described it, for a progress bar.
    pub total: Option<&'a AtomicU64>,
    /// How long to wait for a sender that authenticates; `None`: as long as it takes.
    pub timeout: Option<std::time::Duration>,
}

/// This session's partial file, removed on drop unless it was put in place.
struct Partial {
    path: PathBuf,
    done: bool,
}

impl Partial {
    /// Creates `OUT.<random>.partial` next to `out`, exclusively: two receivers given the
    /// same `--out` never write into one file.
    fn create(out: &Path) -> Result<(Partial, std::fs::File), SessionError> {
        let mut id = [0u8; 6];
        getrandom::fill(&mut id).map_err(|e| SessionError::Protocol(format!("no randomness for a file name: {e}")))?;
        let suffix: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let path = PathBuf::from(format!("{}.{suffix}.partial", out.display()));
        // Read-write: RDMA maps it shared to register it, and digests it afterwards.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| SessionError::Region { path: path.display().to_string(), source })?;
        Ok((Partial { path, done: false }, file))
    }
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

/// Receives one session on `listener` into the file `out`. Connections that do not
/// authenticate are turned away; the first that does is the session.
pub fn recv_file(listener: &TcpListener, out: &Path, opts: &RecvOptions<'_>) -> Result<Report, SessionError> {
    if out.is_dir() {
        return Err(SessionError::Region {
            path: out.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::IsADirectory, "it is a directory: give --out a file name"),
        });
    }
    // RDMA is offered when this side's plan has a device for it.
    let offer = if opts.plan.rdma.is_some() { wire::features::RDMA } else { 0 };
    let acc = Acceptor::new(listener, &opts.auth, offer, &opts.plan.limits).map_err(|e| SessionError::io("listening", e))?;
    let wait = Wait { what: "a sender", deadline: opts.timeout.map(|t| Instant::now() + t), watch: &[] };
    let Next::Conn(Authed { s, peer, hello, keys }) = acc.next(wait, |a| {
        if a.hello.lane.get() == CONTROL_LANE { Ok(()) } else { Err(format!("lane {} before any session", a.hello.lane.get())) }
    })?
    else {
        unreachable!("nothing is watched")
    };
    tune_socket(&s)?;
    let mut ctl = Ctl::new(s, keys);
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let r = session(&acc, &mut ctl, hello.features.get(), out, opts, t0, cpu0);
    match &r {
        Err(SessionError::Peer(_) | SessionError::PeerClosed { .. }) => {}
        Err(e) => ctl.close_with_error(&e.to_string()),
        Ok(_) => {}
    }
    log::info!("session from {peer} ended: {}", r.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into()));
    r
}

fn session(
    acc: &Acceptor<'_>,
    ctl: &mut Ctl,
    features: u64,
    out: &Path,
    opts: &RecvOptions<'_>,
    t0: Instant,
    cpu0: f64,
) -> Result<Report, SessionError> {
    let mut buf = Vec::new();
    ctl.expect(Kind::Session, &mut buf)?;
    let (layout, lanes, transport) = wire::parse_session(&buf)?;
    if transport == DataTransport::Rdma && features & wire::features::RDMA == 0 {
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
    // What the session would cost is checked before any of it is spent.
    let limits = &opts.plan.limits;
    check_region(size, limits, Backing::File(out))?;
    match transport {
        DataTransport::Tcp => {
            let max_payload = wire::max_payload_for(layout.max_chunk);
            check_lanes(u64::from(lanes), crate::lane::buffer_bytes(max_payload), u64::from(layout.max_chunk), limits)?;
        }
        // The destination is registered (pinned) whole for the NIC to write into.
        DataTransport::Rdma => {
            check_lanes(u64::from(lanes), 0, u64::from(layout.max_chunk), limits)?;
            check_region(size, limits, Backing::Memory)?;
        }
    }
    let (mut partial, file) = Partial::create(out)?;
    file.set_len(size).map_err(|source| SessionError::Region { path: partial.path.display().to_string(), source })?;
    let dest = Dest::new(&file, size, PAGE as u64)?;
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| SessionError::Protocol(format!("no randomness for a session id: {e}")))?;
    let session = u64::from_le_bytes(id);
    ctl.send(Kind::SessionOk, wire::SessionOk { session: session.into() }.as_bytes())?;
    if let Some(t) = opts.total {
        t.store(size, Ordering::Relaxed);
    }
    log::info!("session {session:#x}: {size} bytes into {} over {lanes} lane(s)", out.display());

    let ((total, write_latency), rdma) = match transport {
        DataTransport::Tcp => (tcp_lanes(acc, ctl, &layout, session, lanes, &dest, opts)?, None),
        DataTransport::Rdma => {
            let r = super::rdma::recv(ctl, &file, size, lanes, layout.max_chunk, opts.plan, opts.progress)?;
            let st = LaneStats { digest: r.digest, frames: r.imms, wire_bytes: r.bytes, zero_pages: r.zero_pages, ..LaneStats::default() };
            ((st, Vec::new()), Some(r.report))
        }
    };
    ctl.expect(Kind::Done, &mut buf)?;
    let done: wire::Digest = wire::parse(Kind::Done, &buf)?;
    // TCP lanes digested every byte as they wrote it; RDMA digested the destination once
    // it was deregistered.
    let digest = total.digest;
    let sender = Digest::from_bytes(done.digest);
    if digest != sender || done.bytes.get() != size {
        let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: 0.into(), _pad: 0.into() };
        ctl.send(Kind::Result, result.as_bytes())?;
        return Err(SessionError::DigestMismatch { source_digest: sender.hex(), dest_digest: digest.hex() });
    }
    // The file goes in place before the sender hears of success: a rename that fails
    // (OUT became a directory, say) is reported to the sender as the failure it is.
    std::fs::rename(&partial.path, out).map_err(|source| SessionError::Region { path: out.display().to_string(), source })?;
    partial.done = true;
    let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: 1.into(), _pad: 0.into() };
    if let Err(e) = ctl.send(Kind::Result, result.as_bytes()) {
        log::warn!("{} is in place, but the sender could not be told: {e}", out.display());
    }
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

/// The sender's reason when its control connection stirs while the receiver waits on
/// something else: an ERROR frame, or the connection closing.
pub(crate) fn peer_ended(ctl: &mut Ctl, op: &str) -> SessionError {
    let mut buf = Vec::new();
    match ctl.expect(Kind::Error, &mut buf) {
        Ok(_) => SessionError::Peer(String::from_utf8_lossy(&buf).into_owned()),
        Err(SessionError::PeerClosed { .. }) => SessionError::PeerClosed { op: op.into() },
        Err(e) => e,
    }
}

/// The TCP data path: accepts one connection per lane and runs each on its own thread;
/// every page of the region must have been delivered at the end.
fn tcp_lanes(
    acc: &Acceptor<'_>,
    ctl: &mut Ctl,
    layout: &Layout,
    session: u64,
    lanes: u16,
    dest: &Dest<'_>,
    opts: &RecvOptions<'_>,
) -> Result<(LaneStats, Vec<hdrhistogram::Histogram<u64>>), SessionError> {
    // Clones of the lanes, shut down when one lane fails so the others stop at once and the
    // sender hears this side's reason without delay; the first lane to fail gives it.
    let socks: Mutex<Vec<std::net::TcpStream>> = Mutex::new(Vec::new());
    let first_failed = Mutex::new(None);
    let stop_all = || {
        for c in socks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    };
    let (results, opened) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        let opened = acc.lanes(session, lanes, &[ctl.s.as_fd()], |a| {
            socks.lock().unwrap_or_else(|p| p.into_inner()).extend(a.s.try_clone());
            let i = handles.len();
            let (first_failed, stop_all) = (&first_failed, &stop_all);
            handles.push(s.spawn(move || {
                let r = lane(a, layout, dest, opts);
                if r.is_err() {
                    first_failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(i);
                    stop_all();
                }
                r
            }));
        });
        // Lanes that will never all be there: the ones running are stopped now.
        if !matches!(opened, Ok(None)) {
            stop_all();
        }
        (handles.into_iter().map(|h| h.join().expect("lane thread panicked")).collect::<Vec<_>>(), opened)
    });
    if opened?.is_some() {
        return Err(peer_ended(ctl, "waiting for the sender's data connections"));
    }
    let mut results = results;
    if let Some(i) = first_failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(results.swap_remove(i).expect_err("the lane failed"));
    }
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

fn lane(a: Authed, layout: &Layout, dest: &Dest<'_>, opts: &RecvOptions<'_>) -> Result<LaneStats, SessionError> {
    let Authed { mut s, hello, keys, .. } = a;
    let n = hello.lane.get();
    super::tune_data_socket(&s, opts.plan)?;
    // The lane's arena holds several frames: a read syscall, or an io_uring receive,
    // fetches as many as have arrived.
    let max_payload = wire::max_payload_for(layout.max_chunk);
    super::pin_lane(opts.plan, n);
    let mut reader = LaneReader::new(opts.plan, &s, max_payload, keys.rx)?;
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
                st.wire_bytes += (HEADER_LEN + payload.len() + TAG_LEN) as u64;
                let zero = if encoding == Encoding::Zero { u64::from(raw_len).div_ceil(PAGE as u64) } else { 0 };
                live.add(u64::from(raw_len), (HEADER_LEN + payload.len() + TAG_LEN) as u64, 1, zero);
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
