//! The RDMA transport: RC queue pairs and one-sided RDMA WRITEs straight into the
//! receiver's registered destination.
//!
//! **Sender.** Each worker owns a CQ, `qps_per_worker` QPs and its arena (registered once;
//! its first pages are the zero buffer, the rest staging slots). A chunk is read from the
//! source with `pread` (never mapped: a file that shrinks is an error, not a SIGBUS), its
//! data runs are staged in a slot, and it becomes work requests (WRs): each WR writes one
//! contiguous destination range and gathers its bytes with up to `send_sge` SGEs, from
//! staged runs of source pages and,
//! for short zero gaps between them, from the zero buffer, so a chunk with scattered zero
//! pages is one WR instead of several. Longer zero runs are skipped (the destination
//! starts zeroed). The chunk's last WR is a WRITE_WITH_IMM: it consumes one receive the
//! receiver posted (one credit), and RC ordering places every earlier WRITE of the chunk
//! before it. A chunk's WRs go out with one `ibv_post_send` (one doorbell); one WR in
//! `signal_interval` is signaled. WRs that fit the QP's inline limit are sent inline.
//!
//! **Receiver.** One thread per sender worker polls that worker's CQ, re-posts receives
//! as WRITE_WITH_IMMs consume them and hands them back as credits (a zero-length inline
//! SEND_WITH_IMM carrying the count). The CPU never touches the data: the NIC places it.
//! Once RDMA_END says how many WRITE_WITH_IMMs each lane sent and all have arrived, the
//! destination is deregistered, then digested and compared as on TCP, but with a keyed
//! digest ([`Hashing::Keyed`]): the pages came without authenticated frames, so what
//! landed is checked under a key from the session's handshake.
//!
//! Compression does not apply: a one-sided write cannot be decoded on arrival, and the
//! planner only picks RDMA where the link outruns zstd.

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hw::rdma::verbs::{Completion, Context, Cq, DeviceList, Endpoint, PathSpec, Qp, QpCaps, SendBatch, SendOp, Sge, Staging};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use super::send::WorkerResult;
use super::{IDLE_TIMEOUT, PAGE};
use crate::conn::{Ctl, SessionError};
use crate::digest::{Digest, DigestKey, Hashing};
use crate::encode::{EncodeStats, page_runs};
use crate::plan::{Plan, RdmaPlan};
use crate::wire::{self, Kind};

/// Zero gaps up to this long between two data runs are written from the zero buffer,
/// keeping one WR, rather than skipped at the cost of a second WR.
const ZERO_FILL_MAX: usize = 2 * PAGE;
/// Completions read per `ibv_poll_cq`.
const POLL_BATCH: usize = 32;
/// Chunk slots in a worker's staging arena: one being filled while the others are on the wire.
const STAGING_SLOTS: usize = 4;

/// RDMA figures for the transfer report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RdmaReport {
    pub device: String,
    pub qps: u32,
    pub path_mtu: u32,
    /// Bytes this side registered (sender: the source; receiver: the destination).
    pub registered_bytes: u64,
    pub registration_seconds: f64,
    /// Registration speed, GB/s (10^9): pinning and mapping pages is the slow part of
    /// starting an RDMA transfer of a large region.
    pub registration_gbps: f64,
    /// Sender: WRs posted (WRITEs and WRITE_WITH_IMMs), their SGEs and the most in one.
    pub work_requests: u64,
    pub sges: u64,
    pub max_sges_per_wr: u32,
    /// Zero pages written from the zero buffer to keep a WR whole.
    pub zero_fill_pages: u64,
    /// The NIC gathers straight from the source (false: each chunk is copied into a
    /// registered arena first, because the source could not be registered).
    pub zero_copy: bool,
    pub write_imms: u64,
    pub inline_wrs: u64,
    /// Doorbells (`ibv_post_send` calls).
    pub posts: u64,
    /// Sender: from the first post to the last completion, and the region bytes per second
    /// over that time (GB/s), which is what ib_write_bw's figure compares with.
    pub data_seconds: f64,
    pub data_gbps: f64,
}

fn registration(report: &mut RdmaReport, bytes: u64, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    report.registered_bytes = bytes;
    report.registration_seconds = s;
    report.registration_gbps = if s > 0.0 { bytes as f64 / s / 1e9 } else { 0.0 };
}

/// The plan's device and port, opened, with this side's address on it.
struct Device<'l> {
    ctx: Context<'l>,
    name: String,
    port: u8,
    gid_index: Option<u8>,
    lid: u16,
    gid: [u8; 16],
    /// The smaller of the plan's MTU and the port's active MTU.
    mtu: u32,
}

fn open<'l>(list: &'l DeviceList, rp: &RdmaPlan) -> Result<Device<'l>, SessionError> {
    let ctx = list.open_by_name(&rp.device)?;
    let port = ctx.active_port(rp.port)?;
    let stale = |what: String| SessionError::Rdma(format!("{what}: the plan is stale, run `ferryctl tune` again"));
    let (gid_index, gid) = match rp.gid_index {
        Some(i) => {
            let idx = u8::try_from(i).map_err(|_| stale(format!("GID index {i} is out of range")))?;
            let g = ctx.query_gid(rp.port, i)?.ok_or_else(|| stale(format!("{} port {} has no GID at index {i}", rp.device, rp.port)))?;
            (Some(idx), g.raw)
        }
        None => (None, [0; 16]),
    };
    Ok(Device { ctx, name: rp.device.clone(), port: rp.port, gid_index, lid: port.lid, gid, mtu: rp.mtu.min(port.active_mtu) })
}

impl Device<'_> {
    fn path(&self, mtu: u32) -> PathSpec {
        PathSpec { port: self.port, gid_index: self.gid_index, mtu }
    }

    fn endpoint(&self, qp: &Qp<'_>, psn: u32) -> wire::RdmaEndpoint {
        wire::RdmaEndpoint { qpn: qp.qpn().into(), psn: psn.into(), lid: self.lid.into(), _pad: [0; 6], gid: self.gid }
    }
}

fn remote(e: &wire::RdmaEndpoint) -> Endpoint {
    Endpoint { qpn: e.qpn.get(), psn: e.psn.get(), lid: e.lid.get(), gid: e.gid }
}

/// A random 24-bit initial packet sequence number.
fn psn() -> Result<u32, SessionError> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| SessionError::Protocol(format!("no randomness for a PSN: {e}")))?;
    Ok(u32::from_le_bytes(b) & 0x00ff_ffff)
}

fn check_mtu(mtu: u32) -> Result<u32, SessionError> {
    if mtu.is_power_of_two() && (256..=4096).contains(&mtu) {
        Ok(mtu)
    } else {
        Err(SessionError::Protocol(format!("path MTU {mtu} is not one of 256, 512, 1024, 2048, 4096")))
    }
}

/// A completion with an error status, as a sentence naming the verb and the status.
fn completion_error(wc: &Completion, device: &str, what: &str) -> SessionError {
    let hint = match wc.status {
        // IBV_WC_RETRY_EXC_ERR: the peer stopped acknowledging.
        12 => ": the peer stopped acknowledging (it exited, or its queue pair was destroyed or moved to the error state)",
        // IBV_WC_REM_ACCESS_ERR: the peer's region refused the write.
        10 => ": the peer's memory region refused the write (deregistered, or the wrong key)",
        // IBV_WC_WR_FLUSH_ERR: this QP had already failed.
        5 => ": the queue pair had already failed",
        _ => "",
    };
    SessionError::Rdma(format!(
        "{what} on {device} QP {} completed with status {} \"{}\" (vendor error {:#x}){hint}",
        wc.qpn,
        wc.status,
        wc.status_str(),
        wc.vendor_err
    ))
}

/// Backs off while a CQ stays empty: spin briefly, then yield, then nap, so a waiting
/// thread leaves the CPU to the provider (Soft-RoCE does its work in kernel threads) and
/// to the other workers.
#[derive(Default)]
struct Backoff {
    empty: u32,
    since: Option<Instant>,
}

impl Backoff {
    fn progress(&mut self) {
        self.empty = 0;
        self.since = None;
    }

    /// Waits a little, longer the longer the CQ has stayed empty.
    fn pause(&mut self) {
        self.empty = self.empty.saturating_add(1);
        self.since.get_or_insert_with(Instant::now);
        match self.empty {
            0..64 => std::hint::spin_loop(),
            64..1024 => std::thread::yield_now(),
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }

    /// [`Backoff::pause`], failing once nothing has happened for the idle timeout.
    fn wait(&mut self, what: &str) -> Result<(), SessionError> {
        if self.since.is_some_and(|t| t.elapsed() > IDLE_TIMEOUT) {
            return Err(SessionError::Rdma(format!(
                "no RDMA completion for {} s while {what}: the peer stopped answering",
                IDLE_TIMEOUT.as_secs()
            )));
        }
        self.pause();
        Ok(())
    }
}

/// Why a worker stopped when another part of the session failed first.
const ABORTED: &str = "stopped: the session failed elsewhere";

/// Whether the control connection has something to read (a frame, or EOF) within 100 ms.
fn readable(ctl: &TcpStream) -> Result<bool, SessionError> {
    let mut fds = [PollFd::new(ctl.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(100u16)).map(|n| n > 0).map_err(|e| SessionError::io("watching the control connection", e.into()))
}

/// Waits until every worker is done, watching the control connection meanwhile: an ERROR
/// frame or EOF from the peer stops the workers (`abort`) and is the session's error.
fn watch_control(ctl: &mut Ctl, done: &AtomicUsize, workers: usize, abort: &AtomicBool) -> Option<SessionError> {
    while done.load(Ordering::Acquire) < workers {
        match readable(&ctl.s) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                abort.store(true, Ordering::Relaxed);
                return Some(e);
            }
        }
        abort.store(true, Ordering::Relaxed);
        // Nothing but the peer's ERROR (or EOF) may arrive while the workers run.
        let mut buf = Vec::new();
        return Some(match ctl.expect(Kind::Error, &mut buf) {
            Ok(_) => SessionError::Peer(String::from_utf8_lossy(&buf).into_owned()),
            Err(e) => e,
        });
    }
    None
}

fn is_aborted(e: &SessionError) -> bool {
    matches!(e, SessionError::Rdma(m) if m == ABORTED)
}

/// The first real error among the threads' results (not a mere "stopped").
fn first_error<T>(results: Vec<Result<T, SessionError>>) -> Result<Vec<T>, SessionError> {
    let mut oks = Vec::new();
    let mut aborted = None;
    for r in results {
        match r {
            Ok(v) => oks.push(v),
            Err(e) if is_aborted(&e) => aborted = Some(e),
            Err(e) => return Err(e),
        }
    }
    match aborted {
        Some(e) => Err(e),
        None => Ok(oks),
    }
}

// ---------------------------------------------------------------------------------------
// Sender

/// What every sending worker shares.
struct Job<'a> {
    source: &'a super::send::SourceFile<'a>,
    /// One-sided writes arrive without frames: the pages' digest is keyed.
    digest_key: &'a DigestKey,
    chunk: usize,
    n_chunks: u64,
    next: &'a AtomicU64,
    abort: &'a AtomicBool,
    progress: Option<&'a AtomicU64>,
    remote_addr: u64,
    rkey: u32,
    rp: &'a RdmaPlan,
    device: &'a str,
}

/// One QP's sending state.
struct Lane<'q> {
    qp: Qp<'q>,
    credits: u32,
    /// WRs posted, and those known complete (a signaled completion covers every WR
    /// posted before it on the QP).
    posted: u64,
    completed: u64,
    /// WRs posted since the last signaled one.
    since_signal: u32,
    /// Post times of the signaled WRs in flight, oldest first.
    signaled: std::collections::VecDeque<Instant>,
    /// What RDMA_END reports for the lane, counted as the lane goes.
    end: wire::RdmaLaneEnd,
}

/// One WR of a chunk: a contiguous destination range gathered from `sges`.
#[derive(Clone, Copy)]
struct Wr {
    offset: u64,
    first_sge: usize,
    sges: usize,
    len: u64,
}

struct SendWorker<'a> {
    job: &'a Job<'a>,
    lanes: Vec<Lane<'a>>,
    cq: &'a Cq<'a>,
    /// The worker's registered arena: the zero buffer, then the staging slots.
    stage: &'a Staging<'a>,
    /// Per staging slot: the lane and WR count that must complete before it is reused.
    slots: [(usize, u64); STAGING_SLOTS],
    chunks: usize,
    sq_depth: u32,
    signal_every: u32,
    inline_max: u64,
    send_sge: usize,
    turn: usize,
    runs: Vec<(usize, usize, bool)>,
    wrs: Vec<Wr>,
    sges: Vec<Sge<'a>>,
    batch: SendBatch<'a>,
    wcs: [Completion; POLL_BATCH],
    backoff: Backoff,
    digest: Digest,
    stats: EncodeStats,
    latency: hdrhistogram::Histogram<u64>,
    report: RdmaReport,
    /// The chunk being sent, as read from the source.
    chunk_buf: Vec<u8>,
    /// This worker's live counters.
    live: &'static crate::live::Counters,
}

impl<'a> SendWorker<'a> {
    /// Turns the chunk at `start` into WRs (`self.wrs`, `self.sges`) and folds its pages
    /// into the digest.
    fn build(&mut self, start: usize, bytes: &[u8]) {
        self.runs.clear();
        self.wrs.clear();
        self.sges.clear();
        let runs = &mut self.runs;
        page_runs(bytes, PAGE, &mut |s, e, zero| runs.push((s, e, zero)));
        let slot = ZERO_FILL_MAX + (self.chunks % STAGING_SLOTS) * self.job.chunk;
        let mut open: Option<Wr> = None;
        for (i, &(s, e, zero)) in self.runs.iter().enumerate() {
            let (off, len) = (start + s, e - s);
            if zero {
                self.digest.add_zero_with(Hashing::Keyed(self.job.digest_key), 0, (off / PAGE) as u64, PAGE, len as u64);
                let fill = open.is_some() && len <= ZERO_FILL_MAX && i + 1 < self.runs.len();
                let room = open.is_some_and(|w| w.sges + 2 <= self.send_sge);
                if fill && room {
                    let w = open.as_mut().expect("checked");
                    self.sges.push(self.stage.sge(0, len));
                    w.sges += 1;
                    w.len += len as u64;
                    self.report.zero_fill_pages += len.div_ceil(PAGE) as u64;
                } else {
                    self.stats.zero_pages += len.div_ceil(PAGE) as u64;
                    if let Some(w) = open.take() {
                        self.wrs.push(w);
                    }
                }
                continue;
            }
            self.digest.add_with(Hashing::Keyed(self.job.digest_key), 0, (off / PAGE) as u64, PAGE, &bytes[s..e]);
            self.stats.raw_bytes += len as u64;
            if open.is_some_and(|w| w.sges >= self.send_sge) {
                self.wrs.push(open.take().expect("checked"));
            }
            let w = open.get_or_insert(Wr { offset: off as u64, first_sge: self.sges.len(), sges: 0, len: 0 });
            self.stage.write(slot + s, &bytes[s..e]);
            self.sges.push(self.stage.sge(slot + s, len));
            w.sges += 1;
            w.len += len as u64;
        }
        if let Some(w) = open {
            self.wrs.push(w);
        }
    }

    /// Reads completions: credits come back, signaled WRs retire what they cover. Waits a
    /// little when there are none.
    fn poll(&mut self, waiting_for: &str) -> Result<(), SessionError> {
        if self.job.abort.load(Ordering::Relaxed) {
            return Err(SessionError::Rdma(ABORTED.into()));
        }
        let n = self.cq.poll(&mut self.wcs)?;
        if n == 0 {
            return self.backoff.wait(waiting_for);
        }
        self.backoff.progress();
        for wc in &self.wcs[..n] {
            if wc.is_recv() {
                if !wc.ok() {
                    return Err(completion_error(wc, self.job.device, "a credit receive"));
                }
                let lane = &mut self.lanes[wc.wr_id as usize];
                lane.credits += wc.imm.unwrap_or(0);
                lane.qp.post_recvs(wc.wr_id, 1)?;
            } else {
                if !wc.ok() {
                    return Err(completion_error(wc, self.job.device, "an RDMA WRITE"));
                }
                let lane = &mut self.lanes[(wc.wr_id >> 32) as usize];
                lane.completed += u64::from(wc.wr_id as u32);
                if let Some(t) = lane.signaled.pop_front() {
                    self.latency.saturating_record(t.elapsed().as_micros() as u64);
                }
            }
        }
        Ok(())
    }

    /// Adds one WR to the batch for lane `l`, signaled every `signal_every` WRs or when
    /// `signal` asks.
    fn push(&mut self, l: usize, op: SendOp, sges: std::ops::Range<usize>, len: u64, signal: bool) {
        let lane = &mut self.lanes[l];
        lane.since_signal += 1;
        lane.posted += 1;
        let signaled = signal || lane.since_signal >= self.signal_every;
        let wr_id = ((l as u64) << 32) | u64::from(lane.since_signal);
        if signaled {
            lane.since_signal = 0;
            lane.signaled.push_back(Instant::now());
        }
        let inline = len > 0 && len <= self.inline_max;
        self.report.inline_wrs += u64::from(inline);
        self.batch.push(wr_id, op, &self.sges[sges], signaled, inline);
    }

    /// Posts the built chunk on a lane with a credit, in as few doorbells as the send
    /// queue allows (one, unless the chunk has more WRs than the queue has room).
    fn post_chunk(&mut self, index: u64) -> Result<(), SessionError> {
        if self.wrs.is_empty() {
            return Ok(()); // an all-zero chunk: nothing to write
        }
        let n = self.lanes.len();
        let l = loop {
            if let Some(l) = (0..n).map(|k| (self.turn + k) % n).find(|&l| self.lanes[l].credits > 0) {
                break l;
            }
            self.poll("waiting for the receiver's credits")?;
        };
        self.turn = l + 1;
        self.lanes[l].credits -= 1;
        let (addr, rkey) = (self.job.remote_addr, self.job.rkey);
        let mut i = 0;
        while i < self.wrs.len() {
            let lane = &self.lanes[l];
            let room = (u64::from(self.sq_depth) - (lane.posted - lane.completed)) as usize;
            if room == 0 {
                self.poll("waiting for send-queue room")?;
                continue;
            }
            let take = room.min(self.wrs.len() - i);
            for k in i..i + take {
                let w = self.wrs[k];
                let remote_addr = addr + w.offset;
                let last = k + 1 == self.wrs.len();
                let op = if last { SendOp::WriteImm { remote_addr, rkey, imm: index as u32 } } else { SendOp::Write { remote_addr, rkey } };
                // A chunk's last WR is signaled: its completion frees its staging slot.
                self.push(l, op, w.first_sge..w.first_sge + w.sges, w.len, last);
                self.report.work_requests += 1;
                self.report.sges += w.sges as u64;
                self.report.max_sges_per_wr = self.report.max_sges_per_wr.max(w.sges as u32);
                self.lanes[l].end.bytes += w.len;
            }
            self.lanes[l].qp.post_send(&mut self.batch)?;
            self.report.posts += 1;
            i += take;
        }
        let lane = &mut self.lanes[l];
        lane.end.imms += 1;
        self.slots[self.chunks % STAGING_SLOTS] = (l, lane.posted);
        self.report.write_imms += 1;
        Ok(())
    }

    /// Waits until the staging slot the next chunk fills is no longer read by a WR.
    fn wait_for_slot(&mut self) -> Result<(), SessionError> {
        let (l, seq) = self.slots[self.chunks % STAGING_SLOTS];
        while self.lanes[l].completed < seq {
            self.poll("waiting for a staging slot")?;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), SessionError> {
        let job = self.job;
        loop {
            let i = job.next.fetch_add(1, Ordering::Relaxed);
            if i >= job.n_chunks {
                break;
            }
            if job.abort.load(Ordering::Relaxed) {
                return Err(SessionError::Rdma(ABORTED.into()));
            }
            let start = i as usize * job.chunk;
            let len = (job.source.size - start as u64).min(job.chunk as u64) as usize;
            // The chunk is read with pread (never through a mapping of the file, which a
            // shrinking file would turn into SIGBUS), then its data runs are staged.
            let mut chunk = std::mem::take(&mut self.chunk_buf);
            chunk.resize(job.chunk, 0);
            job.source.read(&mut chunk[..len], start as u64)?;
            self.wait_for_slot()?;
            let zero_before = self.stats.zero_pages;
            let wire_before: u64 = self.lanes.iter().map(|l| l.end.bytes.get()).sum();
            self.build(start, &chunk[..len]);
            self.chunk_buf = chunk;
            self.post_chunk(i)?;
            let wire: u64 = self.lanes.iter().map(|l| l.end.bytes.get()).sum::<u64>() - wire_before;
            self.live.add(len as u64, wire, self.wrs.len() as u64, self.stats.zero_pages - zero_before);
            self.chunks += 1;
            // Zero pages of a chunk count on the lane that carried its neighbours; an
            // all-zero chunk counts on lane 0.
            let l = if self.wrs.is_empty() { 0 } else { (self.turn + self.lanes.len() - 1) % self.lanes.len() };
            self.lanes[l].end.zero_pages += self.stats.zero_pages - zero_before;
            self.stats.frames += self.wrs.len() as u64;
            if let Some(p) = job.progress {
                p.fetch_add(len as u64, Ordering::Relaxed);
            }
        }
        // Signal the tail of each lane with a zero-length WRITE, then wait for everything.
        for l in 0..self.lanes.len() {
            if self.lanes[l].since_signal == 0 {
                continue;
            }
            while self.lanes[l].posted - self.lanes[l].completed >= u64::from(self.sq_depth) {
                self.poll("waiting for send-queue room")?;
            }
            self.push(l, SendOp::Write { remote_addr: job.remote_addr, rkey: job.rkey }, 0..0, 0, true);
            self.lanes[l].qp.post_send(&mut self.batch)?;
            self.report.posts += 1;
        }
        while self.lanes.iter().any(|l| l.completed < l.posted) {
            self.poll("waiting for the last RDMA WRITEs to complete")?;
        }
        Ok(())
    }
}

/// Sends `source` over RDMA once the session is agreed (after SESSION_OK): registers the
/// source and the arenas, exchanges QPs on `ctl`, runs the workers, sends RDMA_END, and
/// runs `confirm` (DONE/RESULT) while the QPs still exist, so the receiver's last credit
/// messages find them.
pub(crate) fn send(
    ctl: &mut Ctl,
    source: &super::send::SourceFile<'_>,
    plan: &Plan,
    progress: Option<&AtomicU64>,
    confirm: impl FnOnce(&mut Ctl, Digest) -> Result<(), SessionError>,
) -> Result<(Vec<WorkerResult>, RdmaReport), SessionError> {
    let rp = plan.rdma.as_ref().ok_or_else(|| SessionError::Protocol("the plan has no rdma section".into()))?;
    let workers = plan.worker_cpus.len();
    let qpw = rp.qps_per_worker as usize;
    let lanes = workers * qpw;
    let list = DeviceList::get()?;
    let dev = open(&list, rp)?;
    let pd = dev.ctx.alloc_pd()?;
    let mut report = RdmaReport { device: dev.name.clone(), qps: lanes as u32, ..RdmaReport::default() };

    // The source is read with pread into each worker's registered arena, never mapped: a
    // file that shrinks under the transfer is an error, not a SIGBUS that ends ferryd.
    // (Registering a mapping of it for the NIC to read in place would need the CPU to stay
    // off that mapping, and the zero-page scan reads every byte anyway.)
    report.zero_copy = false;
    // Each worker's arena, registered once: the zero buffer (fresh anonymous memory reads
    // as zero and is never written there), then the staging slots.
    let arena_bytes = ZERO_FILL_MAX + STAGING_SLOTS * plan.chunk_size_bytes as usize;
    let t = Instant::now();
    let stages =
        (0..workers).map(|_| Ok(pd.register_staging(super::arena(plan, arena_bytes)?)?)).collect::<Result<Vec<_>, SessionError>>()?;
    registration(&mut report, stages.iter().map(|s| s.len() as u64).sum(), t);
    let cqs = (0..workers).map(|_| dev.ctx.create_cq(rp.cq_depth as i32)).collect::<Result<Vec<_>, _>>()?;
    let caps = QpCaps {
        max_send_wr: rp.sq_depth,
        max_recv_wr: rp.rq_depth,
        max_send_sge: rp.send_sge,
        max_recv_sge: 1,
        max_inline_data: rp.inline_threshold_bytes,
    };
    let mut qps: Vec<Vec<Qp<'_>>> = Vec::with_capacity(workers);
    let mut psns = Vec::with_capacity(lanes);
    let mut eps = Vec::with_capacity(lanes);
    let mut inline_max = u64::from(rp.inline_threshold_bytes);
    for cq in &cqs {
        let mut mine = Vec::with_capacity(qpw);
        for _ in 0..qpw {
            let (qp, granted) = pd.create_rc_qp(cq, caps)?;
            inline_max = inline_max.min(u64::from(granted.max_inline_data));
            let p = psn()?;
            eps.push(dev.endpoint(&qp, p));
            psns.push(p);
            mine.push(qp);
        }
        qps.push(mine);
    }
    let hello = wire::RdmaConnect {
        workers: (workers as u16).into(),
        qps_per_worker: (qpw as u16).into(),
        mtu: dev.mtu.into(),
        infiniband: u8::from(dev.gid_index.is_none()),
        _pad: [0; 7],
    };
    ctl.send(Kind::RdmaConnect, &wire::list_payload(&hello, &eps))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::RdmaAccept, &mut buf)?;
    let (acc, peer) = wire::parse_list::<wire::RdmaAccept, wire::RdmaEndpoint>(Kind::RdmaAccept, &buf, lanes)?;
    let mtu = check_mtu(acc.mtu.get())?;
    if mtu > dev.mtu {
        return Err(SessionError::Protocol(format!("the receiver chose path MTU {mtu}, above this side's {}", dev.mtu)));
    }
    let credits = acc.credits.get();
    if credits == 0 {
        return Err(SessionError::Protocol("the receiver granted no credits".into()));
    }
    report.path_mtu = mtu;
    for (i, qp) in qps.iter_mut().flatten().enumerate() {
        qp.connect(&dev.path(mtu), psns[i], &remote(&peer[i]), false)?;
        qp.post_recvs((i % qpw) as u64, rp.rq_depth as usize)?;
    }
    log::info!("{lanes} RDMA QP(s) connected on {} (MTU {mtu}, {credits} credits per QP)", dev.name);

    let next = AtomicU64::new(0);
    let abort = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let digest_key = ctl.digest_key().clone();
    let job = Job {
        source,
        digest_key: &digest_key,
        chunk: plan.chunk_size_bytes as usize,
        n_chunks: source.size.div_ceil(plan.chunk_size_bytes),
        next: &next,
        abort: &abort,
        progress,
        remote_addr: acc.addr.get(),
        rkey: acc.rkey.get(),
        rp,
        device: &dev.name,
    };
    let t_data = Instant::now();
    let (results, ctl_err) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (w, (cq, mine)) in cqs.iter().zip(qps).enumerate() {
            let (job, stage, cpu) = (&job, &stages[w], plan.worker_cpus[w]);
            let done = &done;
            handles.push(s.spawn(move || {
                super::pin(cpu);
                let r = run_send_worker(w, job, mine, cq, stage, credits, inline_max);
                if r.is_err() {
                    job.abort.store(true, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Release);
                r
            }));
        }
        let ctl_err = watch_control(ctl, &done, workers, &abort);
        (handles.into_iter().map(|h| h.join().expect("RDMA worker panicked")).collect::<Vec<_>>(), ctl_err)
    });
    if let Some(e) = ctl_err {
        return Err(e);
    }
    let results = first_error(results)?;
    report.data_seconds = t_data.elapsed().as_secs_f64();
    report.data_gbps = if report.data_seconds > 0.0 { source.size as f64 / report.data_seconds / 1e9 } else { 0.0 };
    let mut ends = Vec::with_capacity(lanes);
    let mut out = Vec::with_capacity(workers);
    let mut digest = Digest::default();
    // The QPs stay until DONE/RESULT: the receiver's last credit messages land on them.
    let mut keep = Vec::with_capacity(workers);
    for (r, lane_ends, rep, qps) in results {
        keep.push(qps);
        digest.combine(r.digest);
        ends.extend(lane_ends);
        report.work_requests += rep.work_requests;
        report.sges += rep.sges;
        report.max_sges_per_wr = report.max_sges_per_wr.max(rep.max_sges_per_wr);
        report.zero_fill_pages += rep.zero_fill_pages;
        report.write_imms += rep.write_imms;
        report.inline_wrs += rep.inline_wrs;
        report.posts += rep.posts;
        out.push(r);
    }
    ctl.send(Kind::RdmaEnd, ends.as_bytes())?;
    confirm(ctl, digest)?;
    drop(keep);
    Ok((out, report))
}

/// A sending worker's result: its counters, its lanes' RDMA_END entries, its RDMA figures,
/// and its QPs, handed back to live until the session ends.
type SendOutcome<'a> = (WorkerResult, Vec<wire::RdmaLaneEnd>, RdmaReport, Vec<Qp<'a>>);

fn run_send_worker<'a>(
    w: usize,
    job: &'a Job<'a>,
    qps: Vec<Qp<'a>>,
    cq: &'a Cq<'a>,
    stage: &'a Staging<'a>,
    credits: u32,
    inline_max: u64,
) -> Result<SendOutcome<'a>, SessionError> {
    let rp = job.rp;
    let lanes = qps
        .into_iter()
        .map(|qp| Lane {
            qp,
            credits,
            posted: 0,
            completed: 0,
            since_signal: 0,
            signaled: std::collections::VecDeque::with_capacity(rp.sq_depth as usize),
            end: wire::RdmaLaneEnd { imms: 0.into(), bytes: 0.into(), zero_pages: 0.into() },
        })
        .collect();
    // With one WR in `signal_every` signaled and at most half the queue unsignaled at its
    // tail, a full send queue always holds a signaled WR whose completion frees room.
    let signal_every = rp.signal_interval.clamp(1, (rp.sq_depth / 2).max(1));
    let index = w;
    let mut w = SendWorker {
        job,
        lanes,
        cq,
        stage,
        slots: [(0, 0); STAGING_SLOTS],
        chunks: 0,
        sq_depth: rp.sq_depth,
        signal_every,
        inline_max,
        send_sge: rp.send_sge.max(2) as usize,
        turn: 0,
        runs: Vec::new(),
        wrs: Vec::new(),
        sges: Vec::new(),
        batch: SendBatch::default(),
        wcs: [Completion::default(); POLL_BATCH],
        backoff: Backoff::default(),
        digest: Digest::default(),
        stats: EncodeStats::default(),
        latency: super::latency_histogram(),
        report: RdmaReport::default(),
        chunk_buf: Vec::new(),
        live: crate::live::worker(crate::live::Role::Send, index),
    };
    w.run()?;
    let ends: Vec<wire::RdmaLaneEnd> = w.lanes.iter().map(|l| l.end).collect();
    let wire_bytes = ends.iter().map(|e| e.bytes.get()).sum();
    let qps = w.lanes.into_iter().map(|l| l.qp).collect();
    Ok((WorkerResult { stats: w.stats, digest: w.digest, wire_bytes, latency: w.latency }, ends, w.report, qps))
}

// ---------------------------------------------------------------------------------------
// Receiver

/// What the receiving side learned.
#[derive(Debug)]
pub(crate) struct Received {
    pub digest: Digest,
    pub imms: u64,
    pub bytes: u64,
    pub zero_pages: u64,
    pub report: RdmaReport,
}

/// One receiving thread: polls one sender worker's CQ, counts WRITE_WITH_IMMs, re-posts
/// receives and returns them as credits.
struct Poller<'a> {
    qps: Vec<Qp<'a>>,
    cq: &'a Cq<'a>,
    first_lane: usize,
    expected: &'a [AtomicU64],
    received: &'a [AtomicU64],
    abort: &'a AtomicBool,
    credit_batch: u32,
    send_depth: u32,
    device: &'a str,
    /// Test hook (`FERRY_TEST_RDMA_QP_ERROR_AFTER=N`): move the first QP to the error
    /// state after N WRITE_WITH_IMMs, as a failing NIC or a destroyed QP would.
    fail_after: Option<u64>,
    /// Live counters of the sender worker these QPs serve: a WRITE_WITH_IMM names its
    /// chunk, whose size follows from the chunk size and the region's.
    live: &'static crate::live::Counters,
    chunk: u64,
    size: u64,
}

impl Poller<'_> {
    fn run(&mut self) -> Result<(), SessionError> {
        let n = self.qps.len();
        let mut pending = vec![0u32; n];
        let mut sends = vec![0u32; n];
        let mut wcs = [Completion::default(); POLL_BATCH];
        let mut batch = SendBatch::default();
        let mut backoff = Backoff::default();
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return Err(SessionError::Rdma(ABORTED.into()));
            }
            let all_in = (0..n).all(|l| {
                self.received[self.first_lane + l].load(Ordering::Relaxed) == self.expected[self.first_lane + l].load(Ordering::Acquire)
            });
            if all_in && sends.iter().all(|&s| s == 0) {
                return Ok(());
            }
            let got = self.cq.poll(&mut wcs)?;
            for wc in &wcs[..got] {
                let l = wc.wr_id as usize;
                if !wc.ok() {
                    let what = if wc.is_recv() { "a receive for RDMA WRITE_WITH_IMM" } else { "a credit SEND" };
                    return Err(completion_error(wc, self.device, what));
                }
                if wc.is_recv() {
                    self.received[self.first_lane + l].fetch_add(1, Ordering::Relaxed);
                    pending[l] += 1;
                    let at = wc.imm.map_or(self.size, |i| u64::from(i) * self.chunk);
                    self.live.add(self.chunk.min(self.size.saturating_sub(at)), 0, 1, 0);
                } else {
                    sends[l] -= 1;
                }
            }
            if let Some(after) = self.fail_after
                && self.received[self.first_lane].load(Ordering::Relaxed) >= after
            {
                log::warn!("FERRY_TEST_RDMA_QP_ERROR_AFTER: moving QP {} to the error state", self.qps[0].qpn());
                self.qps[0].set_error()?;
                self.fail_after = None;
            }
            for l in 0..n {
                if pending[l] >= self.credit_batch && sends[l] < self.send_depth {
                    self.qps[l].post_recvs(l as u64, pending[l] as usize)?;
                    batch.push(l as u64, SendOp::SendImm { imm: pending[l] }, &[], true, true);
                    self.qps[l].post_send(&mut batch)?;
                    sends[l] += 1;
                    pending[l] = 0;
                }
            }
            if got == 0 {
                // The receiver's idle timeout is kept by the control thread.
                backoff.pause();
            } else {
                backoff.progress();
            }
        }
    }
}

/// Receives a session's data over RDMA into `file` (already `size` bytes long): reads
/// RDMA_CONNECT on `ctl`, registers the destination for remote writes, connects one QP per
/// lane, answers RDMA_ACCEPT, and waits for RDMA_END and for every WRITE_WITH_IMM it
/// announces. Returns the destination's digest, computed after deregistration.
pub(crate) fn recv(
    ctl: &mut Ctl,
    file: &std::fs::File,
    size: u64,
    lanes: u16,
    max_chunk: u32,
    plan: &Plan,
    progress: Option<&AtomicU64>,
) -> Result<Received, SessionError> {
    let lanes = usize::from(lanes);
    let mut buf = Vec::new();
    ctl.expect(Kind::RdmaConnect, &mut buf)?;
    let (hello, peer) = wire::parse_list::<wire::RdmaConnect, wire::RdmaEndpoint>(Kind::RdmaConnect, &buf, lanes)?;
    let (workers, qpw) = (usize::from(hello.workers.get()), usize::from(hello.qps_per_worker.get()));
    if workers == 0 || qpw == 0 || workers * qpw != lanes {
        return Err(SessionError::Protocol(format!("RDMA_CONNECT: {workers} worker(s) x {qpw} QP(s) for {lanes} lane(s)")));
    }
    let rp = plan.rdma.as_ref().ok_or_else(|| SessionError::Protocol("this receiver's plan has no RDMA device".into()))?;
    let list = DeviceList::get()?;
    let dev = open(&list, rp)?;
    if (hello.infiniband == 1) != dev.gid_index.is_none() {
        return Err(SessionError::Protocol("the sender and this receiver are on different link layers (InfiniBand and RoCE)".into()));
    }
    let mtu = check_mtu(hello.mtu.get().min(dev.mtu))?;
    let pd = dev.ctx.alloc_pd()?;
    let mut report = RdmaReport { device: dev.name.clone(), qps: lanes as u32, path_mtu: mtu, ..RdmaReport::default() };
    let t = Instant::now();
    let region = pd.register_remote_write(file, size as usize)?;
    registration(&mut report, size, t);
    log::info!(
        "registered the {} MiB destination on {} for remote writes in {:.3} s ({:.2} GB/s)",
        size >> 20,
        dev.name,
        report.registration_seconds,
        report.registration_gbps
    );

    let credits = rp.rq_depth.max(1);
    // Credits go back in batches of a quarter of the receive queue, so at most five
    // credit messages are ever in flight per QP.
    let credit_batch = (credits / 4).max(1);
    let send_depth = credits.div_ceil(credit_batch) + 1;
    let cq_depth = (qpw as u32 * (credits + send_depth)) as i32;
    let cqs = (0..workers).map(|_| dev.ctx.create_cq(cq_depth)).collect::<Result<Vec<_>, _>>()?;
    let caps = QpCaps { max_send_wr: send_depth, max_recv_wr: credits, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 };
    let mut qps: Vec<Vec<Qp<'_>>> = Vec::with_capacity(workers);
    let mut eps = Vec::with_capacity(lanes);
    for cq in &cqs {
        let mut mine = Vec::with_capacity(qpw);
        for l in 0..qpw {
            let (mut qp, _) = pd.create_rc_qp(cq, caps)?;
            let p = psn()?;
            qp.connect(&dev.path(mtu), p, &remote(&peer[eps.len()]), true)?;
            // Receives can be posted from INIT on; these are in place before RDMA_ACCEPT
            // lets the sender write.
            qp.post_recvs(l as u64, credits as usize)?;
            eps.push(dev.endpoint(&qp, p));
            mine.push(qp);
        }
        qps.push(mine);
    }
    let acc = wire::RdmaAccept {
        addr: region.addr().into(),
        rkey: region.rkey().into(),
        mtu: mtu.into(),
        credits: credits.into(),
        _pad: 0.into(),
    };
    ctl.send(Kind::RdmaAccept, &wire::list_payload(&acc, &eps))?;
    log::info!("{lanes} RDMA QP(s) connected on {} (MTU {mtu}); the sender writes directly into the destination", dev.name);

    let fail_after = std::env::var("FERRY_TEST_RDMA_QP_ERROR_AFTER").ok().and_then(|v| v.parse().ok());
    let expected: Vec<AtomicU64> = (0..lanes).map(|_| AtomicU64::new(u64::MAX)).collect();
    let received: Vec<AtomicU64> = (0..lanes).map(|_| AtomicU64::new(0)).collect();
    let abort = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let control = std::thread::current();
    let (results, ends) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (w, (cq, mine)) in cqs.iter().zip(qps).enumerate() {
            let mut p = Poller {
                qps: mine,
                cq,
                first_lane: w * qpw,
                expected: &expected,
                received: &received,
                abort: &abort,
                credit_batch,
                send_depth,
                device: &dev.name,
                fail_after: if w == 0 { fail_after } else { None },
                live: crate::live::worker(crate::live::Role::Recv, w),
                chunk: u64::from(max_chunk),
                size,
            };
            let (abort, done, control) = (&abort, &done, &control);
            handles.push(s.spawn(move || {
                let r = p.run();
                if r.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Release);
                control.unpark();
                r
            }));
        }
        let ends = control_side(ctl, lanes, &expected, &received, &abort, &done, workers, max_chunk, size, progress);
        (handles.into_iter().map(|h| h.join().expect("RDMA poller panicked")).collect::<Vec<_>>(), ends)
    });
    // A thread's own error says what failed; "stopped" only says it saw another fail.
    let ends = match (first_error(results), ends) {
        (Ok(_), Ok(ends)) => ends,
        (Err(e), Err(c)) => return Err(if is_aborted(&e) { c } else { e }),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => return Err(e),
    };
    // Nothing may write the destination any more: the QPs went with their pollers; now
    // the registration goes.
    drop(region);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let digest = Digest::of_file_with(Hashing::Keyed(ctl.digest_key()), 0, PAGE, file, size, threads, false)
        .map_err(|source| SessionError::Region { path: "the destination".into(), source })?;
    let sum = |f: fn(&wire::RdmaLaneEnd) -> u64| ends.iter().map(f).sum::<u64>();
    Ok(Received { digest, imms: sum(|e| e.imms.get()), bytes: sum(|e| e.bytes.get()), zero_pages: sum(|e| e.zero_pages.get()), report })
}

/// The receiver's control thread while the pollers run: reads RDMA_END (or the sender's
/// ERROR, or EOF), publishes the expected counts, and fails the session if nothing
/// arrives for the idle timeout.
#[allow(clippy::too_many_arguments)]
fn control_side(
    ctl: &mut Ctl,
    lanes: usize,
    expected: &[AtomicU64],
    received: &[AtomicU64],
    abort: &AtomicBool,
    done: &AtomicUsize,
    workers: usize,
    max_chunk: u32,
    size: u64,
    progress: Option<&AtomicU64>,
) -> Result<Vec<wire::RdmaLaneEnd>, SessionError> {
    let total = || received.iter().map(|r| r.load(Ordering::Relaxed)).sum::<u64>();
    let mut last = (total(), Instant::now());
    let mut ends = None;
    let fail = |e: SessionError| {
        abort.store(true, Ordering::Relaxed);
        Err(e)
    };
    while done.load(Ordering::Acquire) < workers {
        let now = total();
        if let Some(p) = progress {
            p.store((now * u64::from(max_chunk)).min(size), Ordering::Relaxed);
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > IDLE_TIMEOUT {
            return fail(SessionError::Rdma(format!(
                "no RDMA WRITE_WITH_IMM arrived for {} s: the sender stopped",
                IDLE_TIMEOUT.as_secs()
            )));
        }
        if ends.is_some() {
            // DONE may already wait on the connection: sleep until a poller finishes
            // (it unparks this thread), looking at the idle timeout now and then.
            std::thread::park_timeout(Duration::from_millis(100));
            continue;
        }
        match readable(&ctl.s) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => return fail(e),
        }
        let mut buf = Vec::new();
        if let Err(e) = ctl.expect(Kind::RdmaEnd, &mut buf) {
            return fail(e);
        }
        let list = match <[wire::RdmaLaneEnd]>::ref_from_bytes(&buf) {
            Ok(l) if l.len() == lanes => l.to_vec(),
            _ => {
                return fail(
                    wire::FrameError::Payload { kind: Kind::RdmaEnd, why: format!("{} bytes for {lanes} lanes", buf.len()) }.into(),
                );
            }
        };
        for (e, l) in expected.iter().zip(&list) {
            e.store(l.imms.get(), Ordering::Release);
        }
        for (l, (r, e)) in received.iter().zip(&list).enumerate() {
            if r.load(Ordering::Relaxed) > e.imms.get() {
                return fail(SessionError::Protocol(format!("lane {l} received more WRITE_WITH_IMMs than RDMA_END announces")));
            }
        }
        ends = Some(list);
    }
    ends.ok_or_else(|| SessionError::Rdma(ABORTED.into()))
}
