//! The sending side: control connection, one thread per worker with its lanes, and the
//! final digest exchange.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use zerocopy::IntoBytes;

use super::{PAGE, Report, cpu_seconds, pin, tune_data_socket, tune_socket};
use crate::auth::{Auth, client_handshake};
use crate::conn::{SessionError, expect_frame, send_error, write_all_vectored, write_frame};
use crate::digest::Digest;
use crate::encode::{EncodeStats, Encoder};
use crate::plan::{Plan, Transport};
use crate::wire::{self, CONTROL_LANE, HEADER_LEN, Header, Kind, Layout, features};

/// What to send, where, and how.
#[derive(Debug)]
pub struct SendOptions<'a> {
    pub to: String,
    pub auth: Auth,
    pub plan: &'a Plan,
    /// Region bytes encoded so far, for a progress bar.
    pub progress: Option<&'a AtomicU64>,
    /// The plan's RDMA is required (`--transport rdma`): fail rather than fall back to TCP
    /// when the receiver has no RDMA port.
    pub require_rdma: bool,
}

/// A chunk's frames, gathered for one `writev`: payloads that live in the source map are
/// referenced in place; compressed payloads are copied into the batch's slot of the
/// worker's arena.
pub(crate) struct Batch<'s> {
    /// Region offset of byte 0 of the slice raw payloads are read from.
    pub(crate) base: usize,
    headers: Vec<Header>,
    /// Per frame: (in staging?, start, len).
    payloads: Vec<(bool, usize, usize)>,
    staging: &'s mut [u8],
    staged: usize,
    pub(crate) wire_bytes: u64,
    /// Region bytes the batch carries.
    pub(crate) region_bytes: u64,
}

impl<'s> Batch<'s> {
    pub(crate) fn new(staging: &'s mut [u8]) -> Batch<'s> {
        Batch { base: 0, headers: Vec::new(), payloads: Vec::new(), staging, staged: 0, wire_bytes: 0, region_bytes: 0 }
    }

    pub(crate) fn frames(&self) -> usize {
        self.headers.len()
    }

    pub(crate) fn clear(&mut self) {
        self.wire_bytes = 0;
        self.region_bytes = 0;
        self.headers.clear();
        self.payloads.clear();
        self.staged = 0;
    }

    /// Adds a frame. Where its payload lives follows from its encoding: a raw payload is
    /// the source's bytes at the frame's offset, a zstd payload (in the encoder's scratch)
    /// is copied into the staging slot, a zero frame has none.
    pub(crate) fn push(&mut self, h: Header, payload: &[u8]) {
        let entry = match h.encoding {
            e if e == wire::Encoding::Raw as u8 => (false, h.offset.get() as usize - self.base, payload.len()),
            e if e == wire::Encoding::Zstd as u8 => {
                // A run is sent compressed only when it shrank below 90%: a chunk's
                // staged bytes never exceed the chunk, the slot's size.
                let at = self.staged;
                self.staging[at..at + payload.len()].copy_from_slice(payload);
                self.staged += payload.len();
                (true, at, payload.len())
            }
            _ => (false, 0, 0),
        };
        self.wire_bytes += (HEADER_LEN + payload.len()) as u64;
        self.headers.push(h);
        self.payloads.push(entry);
    }

    /// Calls `f` with the header and payload of each frame, in order.
    fn for_each_slice<'b>(&'b self, source: &'b [u8], f: &mut dyn FnMut(&'b [u8])) {
        for (h, &(staged, start, len)) in self.headers.iter().zip(&self.payloads) {
            f(h.as_bytes());
            if len > 0 {
                f(if staged { &self.staging[start..start + len] } else { &source[start..start + len] });
            }
        }
    }

    /// Writes the frames; raw payloads come from `source`, which starts at region offset
    /// `base`.
    pub(crate) fn write(&self, source: &[u8], conn: &mut TcpStream) -> std::io::Result<()> {
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(self.headers.len() * 2);
        self.for_each_slice(source, &mut |s| bufs.push(s));
        // IOV_MAX is 1024; a 1 MiB chunk has at most 256 page runs (512 slices).
        for part in bufs.chunks(1024) {
            write_all_vectored(conn, part)?;
        }
        Ok(())
    }
}

/// A batch with the source it points into, as the io_uring ring owns it while in flight.
struct RingBatch<'a> {
    batch: Batch<'a>,
    source: &'a [u8],
}

impl hw::uring_send::SendBuf for RingBatch<'_> {
    fn for_each_slice(&self, f: &mut dyn FnMut(&[u8])) {
        self.batch.for_each_slice(self.source, f);
    }
}

/// What a sending worker counted, whatever its transport.
pub(crate) struct WorkerResult {
    pub stats: EncodeStats,
    pub digest: Digest,
    pub wire_bytes: u64,
    pub latency: hdrhistogram::Histogram<u64>,
    /// io_uring carried this worker's sends.
    pub uring: bool,
}

pub(crate) fn connect(to: &str) -> Result<TcpStream, SessionError> {
    let addrs: Vec<_> = to.to_socket_addrs().map_err(|e| SessionError::io(format!("resolving {to}"), e))?.collect();
    let s = TcpStream::connect(&addrs[..])
        .map_err(|e| SessionError::io(format!("connecting to {to} (is `ferryctl recv` listening there?)"), e))?;
    tune_socket(&s)?;
    Ok(s)
}

/// A data connection: the socket buffers the plan sets (before data flows).
pub(crate) fn connect_data(to: &str, plan: &Plan) -> Result<TcpStream, SessionError> {
    let s = connect(to)?;
    tune_data_socket(&s, plan)?;
    Ok(s)
}

/// Sends the file or memfd at `path` to a receiver; returns when the receiver has
/// confirmed the destination's digest matches the source's.
pub fn send_file(path: &Path, opts: &SendOptions<'_>) -> Result<Report, SessionError> {
    let file = std::fs::File::open(path).map_err(|source| SessionError::Region { path: path.display().to_string(), source })?;
    let map = hw::memmap::SourceMap::new(&file).map_err(|source| SessionError::Region { path: path.display().to_string(), source })?;
    let source = map.as_slice();
    let plan = opts.plan;
    let chunk = plan.chunk_size_bytes as usize;
    let workers = plan.worker_cpus.len();
    let per_worker = plan.tcp.connections_per_worker as usize;
    let layout = Layout { page_size: PAGE as u32, max_chunk: chunk as u32, regions: vec![source.len() as u64] };

    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let mut ctl = connect(&opts.to)?;
    let want_rdma = plan.transport == Transport::Rdma;
    let agreed = client_handshake(&mut ctl, &opts.auth, CONTROL_LANE, 0, if want_rdma { features::RDMA } else { 0 })?;
    let rdma = want_rdma && agreed & features::RDMA != 0;
    // What carries the data: the plan's transport, or its TCP rung when RDMA is off.
    let used = match (rdma, plan.tcp.io_uring) {
        (true, _) => Transport::Rdma,
        (false, true) => Transport::Tcp,
        (false, false) => Transport::Sockets,
    };
    if want_rdma && !rdma {
        let why = format!("the receiver at {} has no RDMA port in its plan", opts.to);
        if opts.require_rdma {
            send_error(&mut ctl, "the sender requires RDMA and this receiver offers none");
            return Err(SessionError::Protocol(format!("{why}; --transport rdma was asked for (use auto or tcp to fall back)")));
        }
        log::warn!("{why}: sending over {used} instead");
    }
    let (lanes, transport) = match (rdma, &plan.rdma) {
        (true, Some(r)) => (workers * r.qps_per_worker as usize, wire::DataTransport::Rdma),
        _ => (workers * per_worker, wire::DataTransport::Tcp),
    };
    write_frame(&mut ctl, Kind::Session, &wire::session_payload(&layout, lanes as u16, transport))?;
    let mut buf = Vec::new();
    expect_frame(&mut ctl, Kind::SessionOk, &mut buf)?;
    let session = wire::parse::<wire::SessionOk>(Kind::SessionOk, &buf)?.session.get();
    log::info!(
        "session {session:#x}: {} bytes to {} over {lanes} {} lane(s) from {workers} worker(s)",
        source.len(),
        opts.to,
        if rdma { "RDMA" } else { "TCP" }
    );

    let (results, rdma_report) = if rdma {
        let (r, report) =
            super::rdma::send(&mut ctl, source, plan, opts.progress, |ctl, digest| confirm(ctl, digest, source.len() as u64))?;
        (r, Some(report))
    } else {
        let r = tcp_workers(session, source, opts)?;
        (r, None)
    };
    let mut digest = Digest::default();
    let mut stats = EncodeStats::default();
    let mut wire_bytes = 0;
    let mut latency = super::latency_histogram();
    let mut worker_latency = Vec::with_capacity(results.len());
    // The plan's io_uring, unless every worker found it refused.
    let used = if used == Transport::Tcp && !results.iter().any(|r| r.uring) { Transport::Sockets } else { used };
    for r in results {
        let _ = latency.add(&r.latency);
        worker_latency.push(r.latency);
        digest.combine(r.digest);
        wire_bytes += r.wire_bytes;
        stats.zero_pages += r.stats.zero_pages;
        stats.compressed_in += r.stats.compressed_in;
        stats.compressed_out += r.stats.compressed_out;
        stats.frames += r.stats.frames;
    }
    if !rdma {
        confirm(&mut ctl, digest, source.len() as u64)?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let bytes = source.len() as u64;
    Ok(Report {
        role: "send".into(),
        bytes,
        wire_bytes,
        seconds,
        gbps: bytes as f64 / seconds / 1e9,
        zero_pages: stats.zero_pages,
        compressed_in_bytes: stats.compressed_in,
        compressed_out_bytes: stats.compressed_out,
        frames: stats.frames,
        lanes: lanes as u32,
        workers: workers as u32,
        cpu_seconds_per_gib: (cpu_seconds() - cpu0) / (bytes.max(1) as f64 / (1u64 << 30) as f64),
        transport: used.to_string(),
        compression: if rdma { "off (RDMA writes place pages directly)".into() } else { plan.compression.to_string() },
        digest: digest.hex(),
        digest_match: true,
        chunk_latency_us: (!latency.is_empty()).then(|| super::Percentiles::of(&latency)),
        chunk_latency: Some(latency),
        write_latency_us: None,
        worker_latency,
        rdma: rdma_report,
    })
}

/// DONE with the source's digest, then the receiver's RESULT: fails unless the
/// destination's digest matches.
pub(crate) fn confirm(ctl: &mut TcpStream, digest: Digest, bytes: u64) -> Result<(), SessionError> {
    let done = wire::Digest { digest: digest.to_bytes(), bytes: bytes.into(), ok: 0.into(), _pad: 0.into() };
    write_frame(ctl, Kind::Done, done.as_bytes())?;
    let mut buf = Vec::new();
    expect_frame(ctl, Kind::Result, &mut buf)?;
    let result: wire::Digest = wire::parse(Kind::Result, &buf)?;
    let dest = Digest::from_bytes(result.digest);
    if result.ok.get() != 1 || dest != digest {
        return Err(SessionError::DigestMismatch { source_digest: digest.hex(), dest_digest: dest.hex() });
    }
    Ok(())
}

/// The TCP data path: one thread per worker, each with its connections.
fn tcp_workers(session: u64, source: &[u8], opts: &SendOptions<'_>) -> Result<Vec<WorkerResult>, SessionError> {
    let plan = opts.plan;
    let chunk = plan.chunk_size_bytes as usize;
    let workers = plan.worker_cpus.len();
    let per_worker = plan.tcp.connections_per_worker as usize;
    let next = AtomicU64::new(0);
    let n_chunks = source.len().div_ceil(chunk) as u64;
    let results: Vec<Result<WorkerResult, SessionError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let next = &next;
                s.spawn(move || {
                    pin(plan.worker_cpus[w]);
                    let r = worker(w, per_worker, session, source, chunk, n_chunks, next, opts);
                    if r.is_err() {
                        // The others stop at their next chunk.
                        next.store(n_chunks, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker thread panicked")).collect()
    });
    results.into_iter().collect()
}

/// One worker: opens its lanes, encodes chunks until none are left, ends its lanes.
#[allow(clippy::too_many_arguments)]
fn worker(
    w: usize,
    per_worker: usize,
    session: u64,
    source: &[u8],
    chunk: usize,
    n_chunks: u64,
    next: &AtomicU64,
    opts: &SendOptions<'_>,
) -> Result<WorkerResult, SessionError> {
    let mut conns = Vec::with_capacity(per_worker);
    for c in 0..per_worker {
        let mut s = connect_data(&opts.to, opts.plan)?;
        client_handshake(&mut s, &opts.auth, (w * per_worker + c) as u16, session, 0)?;
        conns.push((s, 0u64, 0u64));
    }
    // Staging slots in the worker's arena: one per batch that can exist at once (one in
    // flight per connection, and the one encoded ahead).
    // With zero copy a written batch stays held until the kernel's notification, while
    // its connection already takes the next: two more per connection keep them busy.
    let slots_needed = match (opts.plan.tcp.io_uring, opts.plan.tcp.send_zc) {
        (true, true) => 3 * per_worker + 1,
        (true, false) => per_worker + 1,
        (false, _) => 1,
    };
    let mut arena = super::arena(opts.plan, slots_needed * chunk)?;
    let slots: Vec<&mut [u8]> = arena.as_mut_slice().chunks_mut(chunk).take(slots_needed).collect();
    let mut w = Worker {
        live: crate::live::worker(crate::live::Role::Send, w),
        live_zero: 0,
        enc: Encoder::new(opts.plan.compression, chunk),
        digest: Digest::default(),
        wire_bytes: 0,
        latency: super::latency_histogram(),
        source,
        chunk,
        n_chunks,
        next,
        progress: opts.progress,
    };
    // Where io_uring is refused at run time (a plan made outside the seccomp profile this
    // runs under, say), the worker sends with blocking sockets, and says so once.
    let ring = if opts.plan.tcp.io_uring {
        let refs: Vec<&TcpStream> = conns.iter().map(|c| &c.0).collect();
        hw::uring_send::SendRing::with_zero_copy(opts.plan.tcp.ring_entries, &refs, opts.plan.tcp.send_zc)
            .inspect_err(|e| {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| log::warn!("sending with blocking sockets instead of io_uring: the send ring cannot be created ({e})"));
            })
            .ok()
    } else {
        None
    };
    let uring = ring.is_some();
    match ring {
        Some(ring) => w.run_uring(ring, &mut conns, slots, opts)?,
        None => w.run_sockets(&mut conns, slots, opts)?,
    }
    let Worker { enc, digest, wire_bytes, latency, .. } = w;
    for (conn, frames, sent) in &mut conns {
        let end = wire::LaneEnd { frames: (*frames).into(), bytes: (*sent).into() };
        write_frame(conn, Kind::LaneEnd, end.as_bytes())?;
    }
    Ok(WorkerResult { stats: enc.stats, digest, wire_bytes, latency, uring })
}

/// A worker's encoding state, shared by its two ways of sending.
struct Worker<'a> {
    /// This worker's live counters, and the zero pages already added to them.
    live: &'static crate::live::Counters,
    live_zero: u64,
    enc: Encoder,
    digest: Digest,
    wire_bytes: u64,
    /// Per-chunk send latency, this worker's own (merged after the session).
    latency: hdrhistogram::Histogram<u64>,
    source: &'a [u8],
    chunk: usize,
    n_chunks: u64,
    next: &'a AtomicU64,
    progress: Option<&'a AtomicU64>,
}

impl<'a> Worker<'a> {
    /// Encodes the next chunk into `batch`; false when none is left.
    fn encode_next(&mut self, batch: &mut Batch<'_>) -> bool {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.n_chunks {
            return false;
        }
        let source = self.source;
        let start = i as usize * self.chunk;
        let bytes = &source[start..(start + self.chunk).min(source.len())];
        batch.clear();
        batch.region_bytes = bytes.len() as u64;
        let digest = &mut self.digest;
        // The digest follows the encoder's runs: zero runs are folded in without reading.
        self.enc
            .encode::<()>(0, start as u64, PAGE, bytes, &mut |h, p| {
                let (off, len) = (h.offset.get(), u64::from(h.raw_len.get()));
                if h.encoding == wire::Encoding::Zero as u8 {
                    digest.add_zero(0, off / PAGE as u64, PAGE, len);
                } else {
                    digest.add(0, off / PAGE as u64, PAGE, &source[off as usize..(off + len) as usize]);
                }
                batch.push(h, p);
                Ok(())
            })
            .expect("the batch sink cannot fail");
        true
    }

    fn sent(&mut self, batch: &Batch<'_>, conn: &mut (TcpStream, u64, u64)) {
        self.enc.adaptive.chunk_done(batch.region_bytes);
        conn.1 += batch.headers.len() as u64;
        conn.2 += batch.wire_bytes;
        self.wire_bytes += batch.wire_bytes;
        let zero = self.enc.stats.zero_pages;
        self.live.add(batch.region_bytes, batch.wire_bytes, batch.headers.len() as u64, zero - self.live_zero);
        self.live_zero = zero;
        if let Some(p) = self.progress {
            p.fetch_add(batch.region_bytes, Ordering::Relaxed);
        }
    }

    /// Blocking sockets: one chunk at a time, connections in turn.
    fn run_sockets(
        &mut self,
        conns: &mut [(TcpStream, u64, u64)],
        mut slots: Vec<&mut [u8]>,
        opts: &SendOptions<'_>,
    ) -> Result<(), SessionError> {
        let mut batch = Batch::new(slots.pop().expect("one staging slot"));
        let mut turn = 0;
        while self.encode_next(&mut batch) {
            let n = conns.len();
            let conn = &mut conns[turn % n];
            turn += 1;
            let t = Instant::now();
            batch.write(self.source, &mut conn.0).map_err(|e| SessionError::io(format!("sending data to {}", opts.to), e))?;
            self.latency.saturating_record(t.elapsed().as_micros() as u64);
            self.sent(&batch, conn);
        }
        Ok(())
    }

    /// io_uring: one ring drives all of the worker's connections, one write in flight on
    /// each, and the next chunk is encoded while they drain.
    fn run_uring(
        &mut self,
        mut ring: hw::uring_send::SendRing<RingBatch<'a>>,
        conns: &mut [(TcpStream, u64, u64)],
        slots: Vec<&'a mut [u8]>,
        opts: &SendOptions<'_>,
    ) -> Result<(), SessionError> {
        let mut spare: Vec<Batch<'a>> = slots.into_iter().map(Batch::new).collect();
        let mut ready: Option<Batch<'a>> = None;
        let mut submitted_at = vec![Instant::now(); conns.len()];
        let mut more = true;
        let io_err = |e| SessionError::io(format!("sending data to {}", opts.to), e);
        loop {
            // With zero copy every slot may be held for its notifications: then wait.
            if ready.is_none()
                && more
                && let Some(mut b) = spare.pop()
            {
                more = self.encode_next(&mut b);
                if more {
                    ready = Some(b);
                } else {
                    spare.push(b);
                }
            }
            if let Some(idle) = (0..conns.len()).find(|&c| !ring.busy(c))
                && let Some(b) = ready.take()
            {
                self.sent(&b, &mut conns[idle]);
                submitted_at[idle] = Instant::now();
                ring.submit(idle, RingBatch { batch: b, source: self.source }).map_err(io_err)?;
                continue;
            }
            if !ring.any_busy() {
                if ready.is_none() && !more {
                    break;
                }
                continue;
            }
            for (c, done) in ring.wait().map_err(io_err)? {
                self.latency.saturating_record(submitted_at[c].elapsed().as_micros() as u64);
                spare.push(done.batch);
            }
        }
        if opts.plan.tcp.send_zc {
            let zc = ring.zero_copy_stats();
            log::debug!("zero-copy sends: {zc:?}");
            if zc.copied > 0 {
                log::info!(
                    "zero-copy sends: the kernel copied {} of {} (loopback, or a NIC without scatter-gather): tcp.send_zc = \"off\" saves the pinning",
                    zc.copied,
                    zc.notifications
                );
            }
        }
        Ok(())
    }
}
