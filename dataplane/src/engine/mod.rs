//! One-shot transfers: `ferryctl send` ([`send`]) and `ferryctl recv` ([`recv`]), each a
//! session of one round on the migration's workers and receiving loop.
//! Also what every session shares: the page size, timeouts, socket tuning, arenas.

pub mod dest;
pub mod recv;
pub mod send;

use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::conn::SessionError;

/// Page size for zero-page detection, alignment and the digest.
pub const PAGE: usize = 4096;
/// A peer silent this long is treated as gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a transfer did, for `--json` and the progress line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub role: String,
    /// Region bytes moved.
    pub bytes: u64,
    /// Bytes on the wire (headers and payloads).
    pub wire_bytes: u64,
    pub seconds: f64,
    /// Region bytes per second, in GB/s (10^9).
    pub gbps: f64,
    pub zero_pages: u64,
    /// Region bytes sent compressed, and what they compressed to.
    pub compressed_in_bytes: u64,
    pub compressed_out_bytes: u64,
    pub frames: u64,
    pub lanes: u32,
    pub workers: u32,
    /// user + system CPU seconds of the process per GiB of region.
    pub cpu_seconds_per_gib: f64,
    pub transport: String,
    pub compression: String,
    pub digest: String,
    pub digest_match: bool,
    /// Sender: time from handing a chunk to the connection until it was written, µs.
    pub chunk_latency_us: Option<Percentiles>,
    /// The histogram behind `chunk_latency_us`, for aggregation across sessions.
    #[serde(skip)]
    pub chunk_latency: Option<hdrhistogram::Histogram<u64>>,
    /// Receiver: time from a data frame's arrival until its bytes were in the destination
    /// (decompression included), µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_latency_us: Option<Percentiles>,
    /// Per worker (sender: chunk send latency) or lane (receiver: frame write latency),
    /// in worker or lane order, µs: what ferryd's per-worker summaries add up.
    #[serde(skip)]
    pub worker_latency: Vec<hdrhistogram::Histogram<u64>>,
    /// RDMA sessions: registration speed and how the work requests were built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<crate::transport::rdma::RdmaReport>,
}

/// Latency percentiles.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        Percentiles { p50: h.value_at_quantile(0.5), p95: h.value_at_quantile(0.95), p99: h.value_at_quantile(0.99), max: h.max() }
    }
}

/// A histogram of microseconds up to an hour, 3 significant digits.
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// CPU seconds (user + system) this process has used.
pub(crate) fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// Socket options every data connection gets: no Nagle delay (frames are written whole,
/// and the last frame of a round must not wait for an ACK), and a timeout that turns a
/// silent peer into an error.
pub(crate) fn tune_socket(s: &TcpStream) -> Result<(), SessionError> {
    s.set_nodelay(true).map_err(|e| SessionError::io("setting TCP_NODELAY", e))?;
    s.set_read_timeout(Some(IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    s.set_write_timeout(Some(IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a write timeout", e))?;
    Ok(())
}

/// A data connection: [`tune_socket`] plus the plan's socket buffer size, if it sets one.
pub(crate) fn tune_data_socket(s: &TcpStream, plan: &crate::plan::Plan) -> Result<(), SessionError> {
    tune_socket(s)?;
    if let Some(b) = plan.tcp.socket_buffer_bytes {
        hw::net::set_buffers(s, b).map_err(|e| SessionError::io("setting SO_SNDBUF/SO_RCVBUF", e.into()))?;
    }
    Ok(())
}

/// Pins the calling thread to `cpu`; a failure is logged, not fatal (containers may
/// restrict the CPU set).
pub(crate) fn pin(cpu: u32) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu as usize }) {
        log::warn!("could not pin a worker to CPU {cpu}: it runs unpinned");
    }
}

/// A worker's arena as the plan describes it (backing, mlock), at least `min_bytes`. Each
/// fallback down the hugepage ladder is said once per session (`live`), not once per
/// worker.
pub(crate) fn arena(plan: &crate::plan::Plan, min_bytes: usize, live: &crate::live::Session) -> Result<hw::memmap::Arena, SessionError> {
    let (a, notes) = arena_with_notes(plan, min_bytes)?;
    for (important, n) in &notes {
        live.note(*important, n);
    }
    Ok(a)
}

/// [`arena`], returning what there is to say about it: each fallback down the hugepage
/// ladder (`true`: a warning) and what it got.
pub(crate) fn arena_with_notes(
    plan: &crate::plan::Plan,
    min_bytes: usize,
) -> Result<(hw::memmap::Arena, Vec<(bool, String)>), SessionError> {
    use crate::plan::ArenaBacking;
    use hw::memmap::{Arena, ArenaKind};
    let want = match plan.arena.backing {
        ArenaBacking::Hugetlb2m => ArenaKind::Hugetlb2m,
        ArenaBacking::Thp => ArenaKind::Thp,
        ArenaBacking::Normal => ArenaKind::Normal,
    };
    let bytes = (plan.arena.bytes_per_worker as usize).max(min_bytes).div_ceil(2 << 20) * (2 << 20);
    let (a, fallbacks) = Arena::new(bytes, want, plan.arena.mlock, Some(plan.numa_node))?;
    let mut notes: Vec<(bool, String)> = fallbacks.iter().map(|n| (true, format!("arena: {n}"))).collect();
    notes.push((
        false,
        format!("arenas: {} MiB per worker, {:?} pages, {}", bytes >> 20, a.kind(), if a.locked() { "locked" } else { "not locked" }),
    ));
    Ok((a, notes))
}
