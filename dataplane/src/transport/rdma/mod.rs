//! The RDMA transport: RC queue pairs and one-sided RDMA WRITEs straight into the
//! destination's registered memory, for every session of rounds (a one-shot transfer or a
//! migration).
//!
//! **Sender** ([`tx`]). Each worker owns a CQ, `qps_per_worker` QPs (its lanes) and its
//! arena, registered once per session and cut into slots; the first is the zero buffer. A
//! window's dirty pages are read with `pread` into a slot (the CPU never reads through a
//! mapping: a file that shrinks is an error, not a SIGBUS) and become work requests: each
//! WR writes one contiguous destination range and gathers its bytes with up to `send_sge`
//! SGEs, from runs of the slot (or, zero-copy, from the guest memory registered in place,
//! which only the NIC reads; see below) and, for short zero gaps between them, from the
//! zero buffer. Zero pages
//! are skipped in round 0 (the destination starts zeroed) and written from the zero buffer
//! in later rounds, where a page may have turned zero. A window's last WR is a
//! WRITE_WITH_IMM carrying the window's number: it spends one of the receiver's credits,
//! and RC ordering places every earlier WRITE of the window before it. A window's WRs go
//! out with one doorbell; its last WR is signaled, and its completion gives the slot back.
//!
//! **Receiver** ([`rx`]). Each region's memory is registered for remote writes for the
//! session. One thread per sender worker polls that worker's CQ, counts WRITE_WITH_IMMs,
//! notes the windows they name, re-posts receives and hands them back as credits. The CPU
//! never touches the data while it lands.
//!
//! **Rounds and verification.** At a round's end each worker waits for its WRs to
//! complete and the source sends RDMA_END (per lane: WRITE_WITH_IMMs, bytes, pages) then
//! ROUND on the control connection. The destination waits for every WRITE_WITH_IMM the
//! round announced, then hashes the windows they named: one-sided writes come without
//! frames to check, so each page's share of the digest is keyed ([`Hashing::Keyed`]) and
//! computed from what landed; the source keys its hashes of the pages as sent. Pages no
//! window ever wrote hash as the zero pages they are. The final digests are compared as
//! on TCP: the cost is reading and hashing each round's windows at the destination before
//! ROUND_OK, which in the last round counts in the downtime (the report's last round).
//!
//! With `verify: full` a migration checks the one-sided writes at the end instead
//! ([`Check::AtEnd`]): no page is hashed during the rounds at either end, so the CPU never
//! reads what the NIC moves (beyond round 0's zero-page test); once the last round has
//! landed, the destination digests all of its memory (keyed) while the source digests the
//! paused guest, and the two are compared. The data phase runs at the NIC's pace; the
//! destination's digest is downtime, which the estimate counts and the report gives
//! (`verify_last_round_seconds`). Then, if the guest memory is wholly allocated, the source
//! registers it for local reads and the WRs gather pages in place (`zero_copy`); a window
//! is read into its slot only in round 0, to skip zero pages.
//!
//! Compression does not apply: a one-sided write cannot be decoded on arrival, and the
//! planner only picks RDMA where the link outruns zstd.

pub(crate) mod rx;
pub(crate) mod tx;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hw::rdma::verbs::{Completion, Context, Cq, DeviceList, Endpoint, PathSpec, Pd, Qp, WcFailure};
use serde::{Deserialize, Serialize};

use crate::conn::{Refusal, SessionError, Violation};
use crate::digest::Hashing;
use crate::engine::IDLE_TIMEOUT;
use crate::plan::RdmaPlan;
use crate::wire;

/// Completions read per `ibv_poll_cq`.
pub(crate) const POLL_BATCH: usize = 32;

/// How what the one-sided writes placed is checked (the destination cannot see pages
/// arrive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Each page hashed (keyed) as sent and, before each round is confirmed, as it landed:
    /// the CPU reads every page at both ends, and the last round's hashing is downtime.
    #[default]
    EachRound,
    /// Nothing hashed during the rounds: once the last round has landed, both ends digest
    /// all of the memory (keyed). The data phase runs at the NIC's pace; the destination's
    /// digest of everything is downtime (`verify: full`).
    AtEnd,
}

/// RDMA figures for a session's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RdmaReport {
    pub device: String,
    pub check: Check,
    pub qps: u32,
    pub path_mtu: u32,
    /// Bytes this side registered (sender: its arenas; receiver: the destination).
    pub registered_bytes: u64,
    pub registration_seconds: f64,
    /// Registration speed, GB/s (10^9): pinning and mapping pages is the slow part of
    /// starting an RDMA session over a large region.
    pub registration_gbps: f64,
    /// Sender: WRs posted (WRITEs and WRITE_WITH_IMMs), their SGEs and the most in one.
    pub work_requests: u64,
    pub sges: u64,
    pub max_sges_per_wr: u32,
    /// Zero pages written from the zero buffer (to keep a WR whole, or because a page
    /// turned zero after round 0).
    pub zero_fill_pages: u64,
    /// Sender: the NIC gathers pages in place from the guest memory, registered for local
    /// reads (one-sided writes checked at the end, and no holes in the memory); false: each
    /// window is read with `pread` into a registered staging buffer, for the reason below.
    pub zero_copy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_reason: Option<String>,
    pub write_imms: u64,
    pub inline_wrs: u64,
    /// Doorbells (`ibv_post_send` calls).
    pub posts: u64,
    /// Sender: the rounds' sending time (until the last WRITE of each round completed, not
    /// counting the wait for the destination's confirmation), and the region bytes per
    /// second over that time (GB/s), which is what ib_write_bw's figure compares with.
    pub data_seconds: f64,
    pub data_gbps: f64,
    /// Receiver: seconds spent hashing what landed (keyed): each round's pages, or
    /// ([`Check::AtEnd`]) all of the memory after the last round; in all, and in the last
    /// round (downtime).
    pub verify_seconds: f64,
    pub verify_last_round_seconds: f64,
    /// Sender: staging bytes an earlier session on this device registered and gave back,
    /// reused without mapping or registering anything (see [`Device::staging`]).
    #[serde(default)]
    pub reused_staging_bytes: u64,
}

impl RdmaReport {
    /// Counts `bytes` registered since `t`.
    pub(crate) fn registration(&mut self, bytes: u64, t: Instant) {
        self.registered(bytes, t.elapsed().as_secs_f64());
    }

    /// Counts `bytes` registered in `s` seconds.
    pub(crate) fn registered(&mut self, bytes: u64, s: f64) {
        self.registered_bytes += bytes;
        self.registration_seconds += s;
        self.registration_gbps =
            if self.registration_seconds > 0.0 { self.registered_bytes as f64 / self.registration_seconds / 1e9 } else { 0.0 };
    }

    /// Adds a worker's counts.
    pub(crate) fn add(&mut self, o: &RdmaReport) {
        self.work_requests += o.work_requests;
        self.sges += o.sges;
        self.max_sges_per_wr = self.max_sges_per_wr.max(o.max_sges_per_wr);
        self.zero_fill_pages += o.zero_fill_pages;
        self.write_imms += o.write_imms;
        self.inline_wrs += o.inline_wrs;
        self.posts += o.posts;
    }
}

/// The plan's device and port, opened once per process, with this side's address on it.
/// Its protection domain holds what no peer can reach (staging, guest memory registered
/// for local reads, landing slots) and is shared by every session; memory a peer may
/// write or read (a destination, a post-copy source) is registered in a PD of its session's
/// own with the QPs that grant it, so no peer reaches another session's memory whatever
/// rkey it tries.
#[derive(Debug)]
pub(crate) struct Device {
    pub ctx: Context,
    pub pd: Pd,
    pub name: String,
    pub port: u8,
    pub gid_index: Option<u8>,
    pub lid: u16,
    pub gid: [u8; 16],
    /// The smaller of the plan's MTU and the port's active MTU.
    pub mtu: u32,
    /// RDMA READs a QP keeps in flight each way: the device's limits, at most
    /// [`MAX_RD_ATOMIC`].
    pub rd_atomic: u8,
    /// Staging sets sessions gave back, for the next to take.
    spare: Mutex<Vec<Staging>>,
}

/// Staging sets a device keeps for the next sessions, at most: one per worker of a few
/// concurrent sessions (each a worker's arena, locked and registered).
const SPARE_STAGING: usize = 16;

/// One sender worker's staging on a device: its arena, registered for the NIC and cut into
/// slots of a chunk, and the zero buffer (a slot never written). Taken for a session and
/// given back when its worker's QPs are gone ([`Device::give_back`]), so a long-lived ferryd
/// maps, locks and registers staging once per worker of the sessions it runs at once, not
/// once per session.
#[derive(Debug)]
pub(crate) struct Staging {
    pub slots: Vec<hw::rdma::verbs::RegSlot>,
    pub zero: hw::rdma::verbs::RegSlot,
    pub chunk: usize,
    /// Bytes registered in all.
    pub bytes: u64,
}

/// RDMA READs in flight per QP, at most (the post-copy fault path's, one page each).
pub(crate) const MAX_RD_ATOMIC: u8 = 16;

/// Opens (once) the device and port `rp` names.
pub(crate) fn device(rp: &RdmaPlan) -> Result<Arc<Device>, SessionError> {
    /// Device name, port and GID index.
    type Key = (String, u8, Option<u32>);
    static OPEN: OnceLock<Mutex<HashMap<Key, Arc<Device>>>> = OnceLock::new();
    let key = (rp.device.clone(), rp.port, rp.gid_index);
    let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = open.get(&key) {
        return Ok(d.clone());
    }
    let list = DeviceList::get()?;
    let ctx = list.open_by_name(&rp.device)?;
    drop(list);
    let port = ctx.active_port(rp.port)?;
    let stale = |what: String| SessionError::StalePlan(what);
    let (gid_index, gid) = match rp.gid_index {
        Some(i) => {
            let idx = u8::try_from(i).map_err(|_| stale(format!("GID index {i} is out of range")))?;
            let g = ctx.query_gid(rp.port, i)?.ok_or_else(|| stale(format!("{} port {} has no GID at index {i}", rp.device, rp.port)))?;
            (Some(idx), g.raw)
        }
        None => (None, [0; 16]),
    };
    let attr = ctx.query_device()?;
    let rd_atomic = attr.max_qp_rd_atom.min(attr.max_qp_init_rd_atom).clamp(1, i32::from(MAX_RD_ATOMIC)) as u8;
    let pd = ctx.alloc_pd()?;
    let d = Arc::new(Device {
        rd_atomic,
        spare: Mutex::new(Vec::new()),
        pd,
        ctx,
        name: rp.device.clone(),
        port: rp.port,
        gid_index,
        lid: port.lid,
        gid,
        mtu: rp.mtu.min(port.active_mtu),
    });
    open.insert(key, d.clone());
    Ok(d)
}

impl Device {
    /// A worker's staging for chunks of `chunk` bytes: one a session gave back, or else a
    /// new arena as the plan describes it (its fallbacks said once per session, `live`),
    /// registered. Also says whether it was new, and the seconds its registration took.
    pub(crate) fn staging(
        &self,
        plan: &crate::plan::Plan,
        chunk: usize,
        live: &crate::live::Session,
    ) -> Result<(Staging, Option<f64>), SessionError> {
        let reused = {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            spare.iter().position(|s| s.chunk == chunk).map(|i| spare.swap_remove(i))
        };
        if let Some(s) = reused {
            return Ok((s, None));
        }
        let arena = crate::engine::arena(plan, tx::RdmaTx::arena_bytes(chunk), live)?;
        let (t, bytes) = (Instant::now(), arena.len() as u64);
        let mut slots = self.pd.register_slots(arena, chunk)?;
        let zero = slots.pop().ok_or_else(|| SessionError::from(crate::conn::Bug::NoSlot))?;
        Ok((Staging { slots, zero, chunk, bytes }, Some(t.elapsed().as_secs_f64())))
    }

    /// A worker's staging back from a session whose QPs are destroyed (the NIC reads none
    /// of its slots any more), for the next session; beyond [`SPARE_STAGING`] sets it is
    /// let go (deregistered and unmapped).
    pub(crate) fn give_back(&self, s: Staging) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_STAGING {
            spare.push(s);
        }
    }

    pub(crate) fn path(&self, mtu: u32) -> PathSpec {
        PathSpec { port: self.port, gid_index: self.gid_index, mtu, rd_atomic: self.rd_atomic }
    }

    pub(crate) fn endpoint(&self, qp: &Qp, psn: u32) -> wire::RdmaEndpoint {
        wire::RdmaEndpoint { qpn: qp.qpn().into(), psn: psn.into(), lid: self.lid.into(), _pad: [0; 6], gid: self.gid }
    }
}

pub(crate) fn remote(e: &wire::RdmaEndpoint) -> Endpoint {
    Endpoint { qpn: e.qpn.get(), psn: e.psn.get(), lid: e.lid.get(), gid: e.gid }
}

/// A random 24-bit initial packet sequence number.
pub(crate) fn psn() -> Result<u32, SessionError> {
    let mut b = [0u8; 4];
    SessionError::random("a PSN", &mut b)?;
    Ok(u32::from_le_bytes(b) & 0x00ff_ffff)
}

pub(crate) fn check_mtu(mtu: u32) -> Result<u32, SessionError> {
    if mtu.is_power_of_two() && (256..=4096).contains(&mtu) { Ok(mtu) } else { Err(Violation::BadMtu(mtu).into()) }
}

/// A completion with an error status, naming the verb and the device.
pub(crate) fn completion_error(failure: WcFailure, device: &str, what: &'static str) -> SessionError {
    SessionError::Completion { what, device: device.to_string(), failure }
}

/// Polls before a thread that finds its CQ empty stops spinning, and polls it yields for.
const SPINS: u32 = 64;
const YIELDS: u32 = 256;

/// How a thread waits on a CQ that stays empty: spin briefly, yield a little, then sleep
/// on the CQ's completion channel until the next completion. Spinning longer would take
/// the CPU from the provider (Soft-RoCE does its work in kernel threads) and from the
/// other workers.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    empty: u32,
    since: Option<Instant>,
}

impl Backoff {
    pub(crate) fn progress(&mut self) {
        self.empty = 0;
        self.since = None;
    }

    /// Nothing completed this time: the idle time runs from the first such. Whether the
    /// caller has looked often enough to stop spinning and wait for the CQ's event.
    pub(crate) fn idle(&mut self) -> bool {
        self.empty = self.empty.saturating_add(1);
        self.since.get_or_insert_with(Instant::now);
        self.empty >= YIELDS
    }

    /// Fails once nothing has completed for the idle timeout.
    pub(crate) fn check(&self, what: &str) -> Result<(), SessionError> {
        if self.since.is_some_and(|t| t.elapsed() > IDLE_TIMEOUT) {
            return Err(SessionError::TimedOut { op: format!("{what} (no RDMA completion)"), secs: IDLE_TIMEOUT.as_secs() });
        }
        Ok(())
    }
}

/// Polls `cq` into `wcs`. When it is empty: spins or yields at first, then arms the CQ,
/// polls once more (a completion between the two polls would raise no event), and sleeps
/// until an event or for `nap`. Returns the completions read; 0 after a wait.
pub(crate) fn poll_cq(cq: &Cq, wcs: &mut [Completion], b: &mut Backoff, nap: Duration) -> Result<usize, SessionError> {
    let n = cq.poll(wcs)?;
    if n > 0 {
        b.progress();
        return Ok(n);
    }
    b.empty = b.empty.saturating_add(1);
    b.since.get_or_insert_with(Instant::now);
    match b.empty {
        0..SPINS => std::hint::spin_loop(),
        SPINS..YIELDS => std::thread::yield_now(),
        _ => {
            cq.arm()?;
            let n = cq.poll(wcs)?;
            if n > 0 {
                b.progress();
                return Ok(n);
            }
            cq.wait(nap)?;
        }
    }
    Ok(0)
}

/// Windows of a session's regions, numbered across regions: the immediate a window's last
/// WRITE carries.
#[derive(Debug, Clone)]
pub(crate) struct Windows {
    /// Per region: the number of its first window.
    first: Vec<u32>,
    chunk: u64,
    sizes: Vec<u64>,
}

impl Windows {
    pub(crate) fn new(sizes: &[u64], chunk: u64) -> Result<Windows, SessionError> {
        let mut first = Vec::with_capacity(sizes.len());
        let mut n = 0u64;
        for &s in sizes {
            first.push(u32::try_from(n).map_err(|_| SessionError::from(Refusal::TooMany("2^32 windows")))?);
            n += s.div_ceil(chunk);
        }
        u32::try_from(n).map_err(|_| SessionError::from(Refusal::TooMany("2^32 windows")))?;
        Ok(Windows { first, chunk, sizes: sizes.to_vec() })
    }

    /// The immediate of window `w` of `region`.
    pub(crate) fn id(&self, region: u32, w: u64) -> u32 {
        self.first[region as usize] + w as u32
    }

    /// The region, and the byte range in it, of window `id`; `None` for a number no window
    /// has.
    pub(crate) fn range(&self, id: u32) -> Option<(u32, u64, u64)> {
        let r = self.first.partition_point(|&f| f <= id).checked_sub(1)?;
        let w = u64::from(id - self.first[r]);
        let start = w * self.chunk;
        let size = self.sizes[r];
        (start < size).then(|| (r as u32, start, (start + self.chunk).min(size)))
    }
}

/// The hashing of one-sided writes under the session's key.
pub(crate) fn keyed(key: &crate::digest::DigestKey) -> Hashing<'_> {
    Hashing::Keyed(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_number_across_regions() {
        let w = Windows::new(&[3 * 4096, 10, 4096], 2 * 4096).unwrap();
        assert_eq!((w.id(0, 0), w.id(0, 1), w.id(1, 0), w.id(2, 0)), (0, 1, 2, 3));
        assert_eq!(w.range(1), Some((0, 8192, 12288)));
        assert_eq!(w.range(2), Some((1, 0, 10)));
        assert_eq!(w.range(3), Some((2, 0, 4096)));
        assert_eq!(w.range(4), None);
    }
}
