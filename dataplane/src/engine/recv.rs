//! The receiving side: accepts one session, writes its region into a file, digests the
//! result and answers the sender. The destination is written to a partial file of this
//! session's own (`OUT.<random>.partial`, created exclusively) and renamed to `OUT` once
//! the digests match; only then is the sender told the transfer succeeded. Any failure
//! removes the partial file.
//!
//! Connections that do not authenticate (a port probe, a wrong key, garbage) are turned
//! away and the receiver keeps listening for its real sender ([`crate::session::accept`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use zerocopy::IntoBytes;

use super::{Report, cpu_seconds, tune_socket};
use crate::auth::Auth;
use crate::conn::{Cancel, Ctl, Refusal, SessionError};
use crate::migrate::dest::{Received, SinkOptions};
use crate::plan::Plan;
use crate::session::accept::{Acceptor, Authed, Next, Turned, Wait};
use crate::session::limits::{Backing, check_region};
use crate::wire::{self, CONTROL_LANE, DataTransport, Kind};

#[derive(Debug)]
pub struct RecvOptions<'a> {
    pub auth: Auth,
    pub plan: &'a Plan,
    /// Region bytes received so far, for a progress bar.
    pub progress: Option<std::sync::Arc<AtomicU64>>,
    /// The region's size once the sender has described it, for a progress bar.
    pub total: Option<&'a AtomicU64>,
    /// How long to wait for a sender that authenticates; `None`: as long as it takes.
    pub timeout: Option<std::time::Duration>,
    /// ferryd's receiving threads (none: the session starts its own).
    pub pool: Option<&'a crate::pool::Pool>,
}

/// This session's partial file, removed on drop unless it was put in place.
struct Partial {
    path: PathBuf,
    done: bool,
}

/// Every partial file this process is writing now: a process that must exit before its
/// sessions end (a drain that timed out) removes them ([`remove_partials`]), as each
/// session would have on failure. Closed (`true`) once they are removed: no receive
/// creates one after.
static PARTIALS: std::sync::Mutex<(bool, std::collections::BTreeSet<PathBuf>)> =
    std::sync::Mutex::new((false, std::collections::BTreeSet::new()));

/// Removes the partial files of every receive in flight in this process, and returns
/// their paths; for a process about to exit with sessions still running. No partial file
/// is created afterwards.
pub fn remove_partials() -> Vec<PathBuf> {
    let mut live = PARTIALS.lock().unwrap_or_else(|p| p.into_inner());
    live.0 = true;
    live.1.iter().filter(|p| std::fs::remove_file(p).is_ok()).cloned().collect()
}

impl Partial {
    /// Creates `OUT.<random>.partial` next to `out`, exclusively: two receivers given the
    /// same `--out` never write into one file.
    fn create(out: &Path) -> Result<(Partial, std::fs::File), SessionError> {
        let mut id = [0u8; 6];
        SessionError::random("a file name", &mut id)?;
        let suffix: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let path = PathBuf::from(format!("{}.{suffix}.partial", out.display()));
        // Registered before it exists, under the lock: a drain removing every partial file
        // either sees it or has closed the registry first.
        let mut live = PARTIALS.lock().unwrap_or_else(|p| p.into_inner());
        if live.0 {
            return Err(Cancel::ShuttingDown.into());
        }
        // Read-write: RDMA maps it shared to register it, and digests it afterwards.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| SessionError::Region { path: path.display().to_string(), source })?;
        live.1.insert(path.clone());
        Ok((Partial { path, done: false }, file))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        PARTIALS.lock().unwrap_or_else(|p| p.into_inner()).1.remove(&self.path);
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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
    let Next::Conn(Authed { s, peer, hello, keys }) =
        acc.next(wait, |a| if a.hello.lane.get() == CONTROL_LANE { Ok(()) } else { Err(Turned::LaneBeforeSession(a.hello.lane.get())) })?
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
    if layout.regions.len() != 1 {
        return Err(Refusal::OneRegion { out: out.display().to_string(), regions: layout.regions.len() }.into());
    }
    let size = layout.regions[0];
    // What the session would cost is checked before any of it is spent.
    let limits = &opts.plan.limits;
    check_region(size, limits, Backing::File(out))?;
    crate::migrate::dest::check_session(&layout, lanes, transport, features, opts.plan)?;
    if transport == DataTransport::Rdma {
        // The destination is registered (pinned) whole for the NIC to write into.
        check_region(size, limits, Backing::Memory)?;
    }
    let (mut partial, file) = Partial::create(out)?;
    file.set_len(size).map_err(|source| SessionError::Region { path: partial.path.display().to_string(), source })?;
    let session = crate::migrate::dest::session_ok(ctl)?;
    if let Some(t) = opts.total {
        t.store(size, Ordering::Relaxed);
    }
    log::info!("session {session:#x}: {size} bytes into {} over {lanes} lane(s)", out.display());
    let sink = SinkOptions {
        plan: opts.plan,
        vmm: None,
        role: crate::live::Role::Recv,
        progress: opts.progress.clone(),
        pool: opts.pool,
        session,
    };
    let memory = std::slice::from_ref(&file);
    let got = match transport {
        DataTransport::Tcp => crate::migrate::dest::receive(acc, ctl, &layout, lanes, session, memory, &sink)?,
        DataTransport::Rdma => crate::transport::rdma::rx::receive(ctl, &layout, lanes, memory, &sink)?,
    };
    let digest = got.digest;
    let mut report = from_session(got);
    // The file goes in place before the sender hears of success: a rename that fails
    // (OUT became a directory, say) is reported to the sender as the failure it is.
    std::fs::rename(&partial.path, out).map_err(|source| SessionError::Region { path: out.display().to_string(), source })?;
    partial.done = true;
    let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: 1.into(), _pad: 0.into() };
    if let Err(e) = ctl.send(Kind::Result, result.as_bytes()) {
        log::warn!("{} is in place, but the sender could not be told: {e}", out.display());
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report.gbps = size as f64 / report.seconds / 1e9;
    report.cpu_seconds_per_gib = (cpu_seconds() - cpu0) / (size.max(1) as f64 / (1u64 << 30) as f64);
    Ok(report)
}

/// A transfer's report from what its session's receiving loop counted.
fn from_session(got: Received) -> Report {
    let m = got.report;
    let mut all = super::latency_histogram();
    for h in &got.write_latency {
        let _ = all.add(h);
    }
    Report {
        role: "recv".into(),
        bytes: m.bytes,
        wire_bytes: m.wire_bytes,
        zero_pages: m.zero_pages,
        compressed_in_bytes: m.compressed_in_bytes,
        compressed_out_bytes: m.compressed_out_bytes,
        frames: m.rounds.iter().map(|r| r.frames).sum(),
        lanes: m.lanes,
        workers: m.lanes,
        transport: m.transport,
        compression: m.compression,
        digest: m.digest,
        digest_match: true,
        write_latency_us: (!all.is_empty()).then(|| super::Percentiles::of(&all)),
        worker_latency: got.write_latency,
        rdma: m.rdma,
        ..Report::default()
    }
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
