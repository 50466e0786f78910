//! The sending side of a one-shot transfer: a session of one round over every page of a
//! file, on the same workers and lanes as a migration ([`crate::migrate::source`]); over
//! RDMA when both sides' plans have a port for it ([`super::rdma`]).

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use zerocopy::IntoBytes;

use super::{Report, cpu_seconds, tune_data_socket, tune_socket};
use crate::auth::{Auth, client_handshake};
use crate::conn::{Ctl, SessionError};
use crate::digest::Digest;
use crate::encode::EncodeStats;
use crate::migrate::MigrationReport;
use crate::migrate::source::{Job, Source, SourceOptions};
use crate::plan::{Plan, Transport};
use crate::wire::{self, CONTROL_LANE, Kind, Layout, features};

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

/// What an RDMA sending worker counted.
pub(crate) struct WorkerResult {
    pub stats: EncodeStats,
    pub digest: Digest,
    pub wire_bytes: u64,
    pub latency: hdrhistogram::Histogram<u64>,
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
/// confirmed that the file is in place and its digest matches the source's.
pub fn send_file(path: &Path, opts: &SendOptions<'_>) -> Result<Report, SessionError> {
    let file = std::fs::File::open(path).map_err(|source| SessionError::Region { path: path.display().to_string(), source })?;
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let source_opts = SourceOptions {
        job: Job::Transfer,
        progress: opts.progress,
        ..SourceOptions::migrate(opts.to.clone(), opts.auth.clone(), opts.plan)
    };
    if opts.plan.transport != Transport::Rdma {
        let rep = Source::connect(&file, source_opts)?.finish(&[])?;
        return Ok(report(rep, opts.plan, t0, cpu0));
    }
    let mut s = connect(&opts.to)?;
    let (agreed, keys) = client_handshake(&mut s, &opts.auth, CONTROL_LANE, 0, features::RDMA)?;
    let mut ctl = Ctl::new(s, keys);
    if agreed & features::RDMA == 0 {
        let why = format!("the receiver at {} has no RDMA port in its plan", opts.to);
        if opts.require_rdma {
            ctl.error("the sender requires RDMA and this receiver offers none");
            return Err(SessionError::Protocol(format!("{why}; --transport rdma was asked for (use auto or tcp to fall back)")));
        }
        log::warn!("{why}: sending over TCP instead");
        let rep = Source::transfer_over(ctl, &file, source_opts)?.finish(&[])?;
        return Ok(report(rep, opts.plan, t0, cpu0));
    }
    send_rdma(ctl, &file, opts, t0, cpu0)
}

/// A transfer's report from its session's.
fn report(m: MigrationReport, plan: &Plan, t0: Instant, cpu0: f64) -> Report {
    let seconds = t0.elapsed().as_secs_f64();
    let mut latency = super::latency_histogram();
    for h in &m.worker_latency {
        let _ = latency.add(h);
    }
    Report {
        role: "send".into(),
        bytes: m.bytes,
        wire_bytes: m.wire_bytes,
        seconds,
        gbps: m.bytes as f64 / seconds / 1e9,
        zero_pages: m.zero_pages,
        compressed_in_bytes: m.compressed_in_bytes,
        compressed_out_bytes: m.compressed_out_bytes,
        frames: m.rounds.iter().map(|r| r.frames).sum(),
        lanes: m.lanes,
        workers: m.workers,
        cpu_seconds_per_gib: (cpu_seconds() - cpu0) / (m.bytes.max(1) as f64 / (1u64 << 30) as f64),
        transport: m.transport,
        compression: plan.compression.to_string(),
        digest: m.digest,
        digest_match: true,
        chunk_latency_us: (!latency.is_empty()).then(|| super::Percentiles::of(&latency)),
        chunk_latency: Some(latency),
        write_latency_us: None,
        worker_latency: m.worker_latency,
        rdma: None,
    }
}

/// The one-shot RDMA path: one-sided WRITEs of the whole file into the receiver's
/// registered destination.
fn send_rdma(mut ctl: Ctl, file: &std::fs::File, opts: &SendOptions<'_>, t0: Instant, cpu0: f64) -> Result<Report, SessionError> {
    let size = file.metadata().map_err(|source| SessionError::Region { path: "the file".into(), source })?.len();
    // Our own open file description: hole probes move only our offset.
    let source = SourceFile { file, size, probe_holes: true };
    let plan = opts.plan;
    let rp = plan.rdma.as_ref().ok_or_else(|| SessionError::Protocol("the plan has no rdma section".into()))?;
    let workers = plan.worker_cpus.len();
    let lanes = workers * rp.qps_per_worker as usize;
    let layout = Layout { page_size: super::PAGE as u32, max_chunk: plan.chunk_size_bytes as u32, regions: vec![size] };
    ctl.send(Kind::Session, &wire::session_payload(&layout, lanes as u16, wire::DataTransport::Rdma))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::SessionOk, &mut buf)?;
    let session = wire::parse::<wire::SessionOk>(Kind::SessionOk, &buf)?.session.get();
    log::info!("session {session:#x}: {size} bytes to {} over {lanes} RDMA lane(s) from {workers} worker(s)", opts.to);
    let done = |ctl: &mut Ctl, digest| {
        if let Err(e) = source.check_size() {
            ctl.error(&e.to_string());
            return Err(e);
        }
        confirm(ctl, digest, size)
    };
    let (results, rdma) = super::rdma::send(&mut ctl, &source, plan, opts.progress, done)?;
    let (mut digest, mut stats, mut wire_bytes) = (Digest::default(), EncodeStats::default(), 0);
    let mut latency = super::latency_histogram();
    let mut worker_latency = Vec::with_capacity(results.len());
    for r in results {
        let _ = latency.add(&r.latency);
        worker_latency.push(r.latency);
        digest.combine(r.digest);
        wire_bytes += r.wire_bytes;
        stats.zero_pages += r.stats.zero_pages;
        stats.frames += r.stats.frames;
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Report {
        role: "send".into(),
        bytes: size,
        wire_bytes,
        seconds,
        gbps: size as f64 / seconds / 1e9,
        zero_pages: stats.zero_pages,
        compressed_in_bytes: 0,
        compressed_out_bytes: 0,
        frames: stats.frames,
        lanes: lanes as u32,
        workers: workers as u32,
        cpu_seconds_per_gib: (cpu_seconds() - cpu0) / (size.max(1) as f64 / (1u64 << 30) as f64),
        transport: Transport::Rdma.to_string(),
        compression: "off (RDMA writes place pages directly)".into(),
        digest: digest.hex(),
        digest_match: true,
        chunk_latency_us: (!latency.is_empty()).then(|| super::Percentiles::of(&latency)),
        chunk_latency: Some(latency),
        write_latency_us: None,
        worker_latency,
        rdma: Some(rdma),
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
