//! The sending side of a one-shot transfer: a session of one round over every page of a
//! file, on the same workers and lanes as a migration ([`crate::migrate::source`]); over
//! RDMA when both sides' plans have a port for it ([`crate::transport::rdma`]).

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use zerocopy::IntoBytes;

use super::{Report, cpu_seconds, tune_data_socket, tune_socket};
use crate::auth::Auth;
use crate::conn::{Ctl, SessionError};
use crate::digest::Digest;
use crate::migrate::MigrationReport;
use crate::migrate::source::{Job, Source, SourceOptions};
use crate::plan::Plan;
use crate::wire::{self, Kind};

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
    /// ferryd's worker threads; without them the transfer starts its own.
    pub pool: Option<&'a crate::pool::Pool>,
}

pub(crate) fn connect(to: &str) -> Result<TcpStream, SessionError> {
    let addrs: Vec<_> = to.to_socket_addrs().map_err(|e| SessionError::io(format!("resolving {to}"), e))?.collect();
    let s = TcpStream::connect(&addrs[..])
        .map_err(|e| SessionError::io(format!("connecting to {to} (is `ferryctl recv` listening there?)"), e))?;
    tune_socket(&s)?;
    Ok(s)
}

/// [`connect`] that gives up after `timeout` (each address the name resolves to tried in
/// turn), with `timeout` as the connection's read and write timeout: for a peer that
/// should answer at once, or not at all (a link that is still down).
pub(crate) fn connect_within(to: &str, timeout: std::time::Duration) -> Result<TcpStream, SessionError> {
    let addrs: Vec<_> = to.to_socket_addrs().map_err(|e| SessionError::io(format!("resolving {to}"), e))?.collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                tune_socket(&s)?;
                s.set_read_timeout(Some(timeout)).map_err(|e| SessionError::io("setting a read timeout", e))?;
                s.set_write_timeout(Some(timeout)).map_err(|e| SessionError::io("setting a write timeout", e))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address"));
    Err(SessionError::io_within(format!("connecting to {to}"), e, Some(timeout)))
}

/// A data connection: the socket buffers the plan sets (before data flows).
pub(crate) fn connect_data(to: &str, plan: &Plan) -> Result<TcpStream, SessionError> {
    let s = connect(to)?;
    tune_data_socket(&s, plan)?;
    Ok(s)
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
        require_rdma: opts.require_rdma,
        pool: opts.pool,
        ..SourceOptions::migrate(opts.to.clone(), opts.auth.clone(), opts.plan)
    };
    let rep = Source::connect(&file, source_opts)?.finish(&[])?;
    Ok(report(rep, opts.plan, t0, cpu0))
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
        compression: if m.rdma.is_some() { m.compression } else { plan.compression.to_string() },
        transport: m.transport,
        digest: m.digest,
        digest_match: true,
        chunk_latency_us: (!latency.is_empty()).then(|| super::Percentiles::of(&latency)),
        chunk_latency: Some(latency),
        write_latency_us: None,
        worker_latency: m.worker_latency,
        rdma: m.rdma,
    }
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
