//! The sending side: control connection, one thread per worker with its lanes, and the
//! final digest exchange.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use zerocopy::IntoBytes;

use super::{PAGE, Report, cpu_seconds, pin, tune_data_socket, tune_socket};
use crate::auth::{Auth, client_handshake};
use crate::conn::{Ctl, SessionError, write_all_vectored, write_frame};
use crate::digest::Digest;
use crate::encode::{EncodeStats, Encoder};
use crate::plan::{Plan, Transport};
use crate::session::seal::{Seal, TAG_LEN};
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

/// A chunk's frames, gathered for one `writev`: raw payloads are referenced in place in
/// the chunk as it was read; compressed payloads are copied into the batch's slot of the
/// worker's arena. Each frame's tag is computed when the batch is sealed for the
/// connection it goes out on.
pub(crate) struct Batch<'s> {
    /// Region offset of byte 0 of the slice raw payloads are read from.
    pub(crate) base: usize,
    headers: Vec<Header>,
    /// Per frame: (in staging?, start, len).
    payloads: Vec<(bool, usize, usize)>,
    tags: Vec<[u8; TAG_LEN]>,
    staging: &'s mut [u8],
    staged: usize,
    pub(crate) wire_bytes: u64,
    /// Region bytes the batch carries.
    pub(crate) region_bytes: u64,
}

impl<'s> Batch<'s> {
    pub(crate) fn new(staging: &'s mut [u8]) -> Batch<'s> {
        Batch { base: 0, headers: Vec::new(), payloads: Vec::new(), tags: Vec::new(), staging, staged: 0, wire_bytes: 0, region_bytes: 0 }
    }

    pub(crate) fn frames(&self) -> usize {
        self.headers.len()
    }

    pub(crate) fn clear(&mut self) {
        self.wire_bytes = 0;
        self.region_bytes = 0;
        self.headers.clear();
        self.payloads.clear();
        self.tags.clear();
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
        self.wire_bytes += (HEADER_LEN + payload.len() + TAG_LEN) as u64;
        self.headers.push(h);
        self.payloads.push(entry);
    }

    fn payload<'b>(&'b self, source: &'b [u8], (staged, start, len): (bool, usize, usize)) -> &'b [u8] {
        if staged { &self.staging[start..start + len] } else { &source[start..start + len] }
    }

    /// Tags every frame for the connection `tx` belongs to, in order: the batch must go
    /// out whole on that connection next.
    pub(crate) fn seal(&mut self, source: &[u8], tx: &mut Seal) {
        let tags: Vec<[u8; TAG_LEN]> =
            self.headers.iter().zip(&self.payloads).map(|(h, &p)| tx.tag(h, [self.payload(source, p)])).collect();
        self.tags = tags;
    }

    /// Calls `f` with the header, payload and tag of each frame, in order (sealed first).
    fn for_each_slice<'b>(&'b self, source: &'b [u8], f: &mut dyn FnMut(&'b [u8])) {
        debug_assert_eq!(self.tags.len(), self.headers.len(), "a batch is sealed before it is written");
        for ((h, &p), tag) in self.headers.iter().zip(&self.payloads).zip(&self.tags) {
            f(h.as_bytes());
            if p.2 > 0 {
                f(self.payload(source, p));
            }
            f(tag);
        }
    }

    /// Seals the frames for `conn` and writes them; raw payloads come from `source`,
    /// which starts at region offset `base`.
    pub(crate) fn write(&mut self, source: &[u8], conn: &mut TcpStream, tx: &mut Seal) -> std::io::Result<()> {
        self.seal(source, tx);
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(self.headers.len() * 3);
        self.for_each_slice(source, &mut |s| bufs.push(s));
        // IOV_MAX is 1024; a 1 MiB chunk has at most 256 page runs (768 slices).
        for part in bufs.chunks(1024) {
            write_all_vectored(conn, part)?;
        }
        Ok(())
    }
}

/// A batch with the chunk it points into (the worker's copy of the source's bytes), as
/// the io_uring ring owns them while in flight.
struct RingBatch<'a> {
    batch: Batch<'a>,
    data: &'a mut [u8],
}

impl hw::uring_send::SendBuf for RingBatch<'_> {
    fn for_each_slice(&self, f: &mut dyn FnMut(&[u8])) {
        self.batch.for_each_slice(self.data, f);
    }
}

/// One data connection of a sending worker: its keys, and what it carried.
pub(crate) struct DataConn {
    pub s: TcpStream,
    pub tx: Seal,
    pub frames: u64,
    pub bytes: u64,
}

impl DataConn {
    /// Connects lane `lane` of `session` and authenticates it.
    pub(crate) fn open(to: &str, plan: &Plan, auth: &Auth, lane: u16, session: u64) -> Result<DataConn, SessionError> {
        let mut s = connect_data(to, plan)?;
        let (_, keys) = client_handshake(&mut s, auth, lane, session, 0)?;
        Ok(DataConn { s, tx: keys.tx, frames: 0, bytes: 0 })
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

/// The file a transfer reads: read with `pread` into the workers' arenas, never mapped,
/// so a file that shrinks under the transfer is an error, not a SIGBUS.
#[derive(Debug)]
pub(crate) struct SourceFile<'f> {
    pub file: &'f std::fs::File,
    pub size: u64,
    /// The caller owns the file's offset: hole probes (`lseek`) may move it.
    pub probe_holes: bool,
}

impl SourceFile<'_> {
    /// Reads `buf.len()` bytes at `offset` into `buf`; holes are zeroed without reading.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), SessionError> {
        use std::os::unix::fs::FileExt;
        // A hole probe past the end of a file that shrank also finds no data: the size is
        // checked before zeros are taken for a hole.
        if self.probe_holes && crate::digest::is_hole(self.file, offset, buf.len() as u64) {
            self.check_size()?;
            buf.fill(0);
            return Ok(());
        }
        self.file.read_exact_at(buf, offset).map_err(|e| match self.check_size() {
            Err(shrank) => shrank,
            Ok(()) => SessionError::io(format!("reading the source at offset {offset}"), e),
        })
    }

    /// The file still has the size it had when the transfer began.
    pub(crate) fn check_size(&self) -> Result<(), SessionError> {
        let now = self.file.metadata().map(|m| m.len()).map_err(|e| SessionError::io("examining the source", e))?;
        if now != self.size {
            return Err(SessionError::Protocol(format!(
                "the source changed size from {} to {now} bytes while it was being sent: nothing is handed over",
                self.size
            )));
        }
        Ok(())
    }
}

/// Sends the file or memfd at `path` to a receiver; returns when the receiver has
/// confirmed the destination's digest matches the source's.
pub fn send_file(path: &Path, opts: &SendOptions<'_>) -> Result<Report, SessionError> {
    let file = std::fs::File::open(path).map_err(|source| SessionError::Region { path: path.display().to_string(), source })?;
    let size = file.metadata().map_err(|source| SessionError::Region { path: path.display().to_string(), source })?.len();
    // Our own open file description: hole probes move only our offset.
    let source = SourceFile { file: &file, size, probe_holes: true };
    let plan = opts.plan;
    let chunk = plan.chunk_size_bytes as usize;
    let workers = plan.worker_cpus.len();
    let per_worker = plan.tcp.connections_per_worker as usize;
    let layout = Layout { page_size: PAGE as u32, max_chunk: chunk as u32, regions: vec![size] };

    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let mut s = connect(&opts.to)?;
    let want_rdma = plan.transport == Transport::Rdma;
    let (agreed, keys) = client_handshake(&mut s, &opts.auth, CONTROL_LANE, 0, if want_rdma { features::RDMA } else { 0 })?;
    let mut ctl = Ctl::new(s, keys);
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
            ctl.error("the sender requires RDMA and this receiver offers none");
            return Err(SessionError::Protocol(format!("{why}; --transport rdma was asked for (use auto or tcp to fall back)")));
        }
        log::warn!("{why}: sending over {used} instead");
    }
    let (lanes, transport) = match (rdma, &plan.rdma) {
        (true, Some(r)) => (workers * r.qps_per_worker as usize, wire::DataTransport::Rdma),
        _ => (workers * per_worker, wire::DataTransport::Tcp),
    };
    ctl.send(Kind::Session, &wire::session_payload(&layout, lanes as u16, transport))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::SessionOk, &mut buf)?;
    let session = wire::parse::<wire::SessionOk>(Kind::SessionOk, &buf)?.session.get();
    log::info!(
        "session {session:#x}: {size} bytes to {} over {lanes} {} lane(s) from {workers} worker(s)",
        opts.to,
        if rdma { "RDMA" } else { "TCP" }
    );

    let (results, rdma_report) = if rdma {
        let done = |ctl: &mut Ctl, digest| {
            if let Err(e) = source.check_size() {
                ctl.error(&e.to_string());
                return Err(e);
            }
            confirm(ctl, digest, size)
        };
        let (r, report) = super::rdma::send(&mut ctl, &source, plan, opts.progress, done)?;
        (r, Some(report))
    } else {
        let r = tcp_workers(session, &source, opts).map_err(|e| ctl.reason_for(e))?;
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
        if let Err(e) = source.check_size() {
            ctl.error(&e.to_string());
            return Err(e);
        }
        confirm(&mut ctl, digest, size)?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let bytes = size;
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
pub(crate) fn confirm(ctl: &mut Ctl, digest: Digest, bytes: u64) -> Result<(), SessionError> {
    let done = wire::Digest { digest: digest.to_bytes(), bytes: bytes.into(), ok: 0.into(), _pad: 0.into() };
    ctl.send(Kind::Done, done.as_bytes())?;
    let mut buf = Vec::new();
    ctl.expect(Kind::Result, &mut buf)?;
    let result: wire::Digest = wire::parse(Kind::Result, &buf)?;
    let dest = Digest::from_bytes(result.digest);
    if result.ok.get() != 1 || dest != digest {
        return Err(SessionError::DigestMismatch { source_digest: digest.hex(), dest_digest: dest.hex() });
    }
    Ok(())
}

/// The TCP data path: one thread per worker, each with its connections.
fn tcp_workers(session: u64, source: &SourceFile<'_>, opts: &SendOptions<'_>) -> Result<Vec<WorkerResult>, SessionError> {
    let plan = opts.plan;
    let chunk = plan.chunk_size_bytes as usize;
    let workers = plan.worker_cpus.len();
    let per_worker = plan.tcp.connections_per_worker as usize;
    let next = AtomicU64::new(0);
    let n_chunks = source.size.div_ceil(chunk as u64);
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
    source: &SourceFile<'_>,
    chunk: usize,
    n_chunks: u64,
    next: &AtomicU64,
    opts: &SendOptions<'_>,
) -> Result<WorkerResult, SessionError> {
    let mut conns = Vec::with_capacity(per_worker);
    for c in 0..per_worker {
        conns.push(DataConn::open(&opts.to, opts.plan, &opts.auth, (w * per_worker + c) as u16, session)?);
    }
    // Slots in the worker's arena: one per batch that can exist at once (one in flight per
    // connection, and the one encoded ahead), each a chunk read from the source and a
    // chunk for its compressed payloads.
    // With zero copy a written batch stays held until the kernel's notification, while
    // its connection already takes the next: two more per connection keep them busy.
    let slots_needed = match (opts.plan.tcp.io_uring, opts.plan.tcp.send_zc) {
        (true, true) => 3 * per_worker + 1,
        (true, false) => per_worker + 1,
        (false, _) => 1,
    };
    let mut arena = super::arena(opts.plan, 2 * slots_needed * chunk)?;
    let slots: Vec<(&mut [u8], &mut [u8])> =
        arena.as_mut_slice().chunks_mut(2 * chunk).take(slots_needed).map(|s| s.split_at_mut(chunk)).collect();
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
        let refs: Vec<&TcpStream> = conns.iter().map(|c| &c.s).collect();
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
    for c in &mut conns {
        let end = wire::LaneEnd { frames: c.frames.into(), bytes: c.bytes.into() };
        write_frame(&mut c.s, &mut c.tx, Kind::LaneEnd, end.as_bytes())?;
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
    source: &'a SourceFile<'a>,
    chunk: usize,
    n_chunks: u64,
    next: &'a AtomicU64,
    progress: Option<&'a AtomicU64>,
}

impl<'a> Worker<'a> {
    /// Reads the next chunk into `data` and encodes it into `batch`; false when none is
    /// left.
    fn encode_next(&mut self, batch: &mut Batch<'_>, data: &mut [u8]) -> Result<bool, SessionError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.n_chunks {
            return Ok(false);
        }
        let start = i * self.chunk as u64;
        let len = (self.source.size - start).min(self.chunk as u64) as usize;
        self.source.read(&mut data[..len], start)?;
        let bytes = &data[..len];
        batch.clear();
        batch.base = start as usize;
        batch.region_bytes = len as u64;
        let digest = &mut self.digest;
        // The digest follows the encoder's runs: zero runs are folded in without reading.
        self.enc
            .encode::<()>(0, start, PAGE, bytes, &mut |h, p| {
                let (off, len) = (h.offset.get(), u64::from(h.raw_len.get()));
                if h.encoding == wire::Encoding::Zero as u8 {
                    digest.add_zero(0, off / PAGE as u64, PAGE, len);
                } else {
                    let at = (off - start) as usize;
                    digest.add(0, off / PAGE as u64, PAGE, &bytes[at..at + len as usize]);
                }
                batch.push(h, p);
                Ok(())
            })
            .expect("the batch sink cannot fail");
        Ok(true)
    }

    fn sent(&mut self, batch: &Batch<'_>, conn: &mut DataConn) {
        self.enc.adaptive.chunk_done(batch.region_bytes);
        conn.frames += batch.headers.len() as u64;
        conn.bytes += batch.wire_bytes;
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
        conns: &mut [DataConn],
        mut slots: Vec<(&mut [u8], &mut [u8])>,
        opts: &SendOptions<'_>,
    ) -> Result<(), SessionError> {
        let (data, staging) = slots.pop().expect("one slot");
        let mut batch = Batch::new(staging);
        let mut turn = 0;
        while self.encode_next(&mut batch, data)? {
            let n = conns.len();
            let conn = &mut conns[turn % n];
            turn += 1;
            let t = Instant::now();
            batch.write(data, &mut conn.s, &mut conn.tx).map_err(|e| SessionError::io(format!("sending data to {}", opts.to), e))?;
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
        conns: &mut [DataConn],
        slots: Vec<(&'a mut [u8], &'a mut [u8])>,
        opts: &SendOptions<'_>,
    ) -> Result<(), SessionError> {
        let mut spare: Vec<RingBatch<'a>> =
            slots.into_iter().map(|(data, staging)| RingBatch { batch: Batch::new(staging), data }).collect();
        let mut ready: Option<RingBatch<'a>> = None;
        let mut submitted_at = vec![Instant::now(); conns.len()];
        let mut more = true;
        let io_err = |e| SessionError::io(format!("sending data to {}", opts.to), e);
        loop {
            // With zero copy every slot may be held for its notifications: then wait.
            if ready.is_none()
                && more
                && let Some(mut b) = spare.pop()
            {
                more = self.encode_next(&mut b.batch, b.data)?;
                if more {
                    ready = Some(b);
                } else {
                    spare.push(b);
                }
            }
            if let Some(idle) = (0..conns.len()).find(|&c| !ring.busy(c))
                && let Some(mut b) = ready.take()
            {
                b.batch.seal(b.data, &mut conns[idle].tx);
                self.sent(&b.batch, &mut conns[idle]);
                submitted_at[idle] = Instant::now();
                ring.submit(idle, b).map_err(io_err)?;
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
                spare.push(done);
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
