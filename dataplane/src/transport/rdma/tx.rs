//! The sending side of the RDMA transport: a worker's QPs (its lanes), its CQ and its
//! registered slots, and how a window becomes work requests (see [`super`]).

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hw::rdma::verbs::{Completion, Cq, Grant, LocalRegion, Qp, QpCaps, RegSlot, SendBatch, SendOp, Sge};

use super::{Backoff, Device, POLL_BATCH, RdmaReport, Windows, completion_error, keyed, poll_cq};
use crate::conn::SessionError;
use crate::digest::{Digest, DigestKey};
use crate::engine::PAGE;
use crate::migrate::PageHashes;
use crate::plan::RdmaPlan;
use crate::wire;
use crate::worker::Region;

/// Zero gaps up to this long between two data runs are written from the zero buffer,
/// keeping one WR, rather than skipped at the cost of a second WR.
const ZERO_FILL_MAX: usize = 2 * PAGE;
/// Slots a worker fills in turn: one being filled while the others are on the wire.
pub(crate) const SLOTS: usize = 4;

/// One QP's sending state.
struct Lane {
    qp: Qp,
    credits: u32,
    /// WRs posted, and those known complete (a signaled completion covers every WR
    /// posted before it on the QP).
    posted: u64,
    completed: u64,
    /// WRs posted since the last signaled one.
    since_signal: u32,
    /// Post times of the signaled WRs in flight, oldest first.
    signaled: VecDeque<Instant>,
    /// What the lane carried in the current round.
    end: wire::RdmaLaneEnd,
}

/// Where a WR's SGE gathers from.
#[derive(Debug, Clone, Copy)]
enum From {
    /// The `len` bytes of pages at window offset `at`: from the window's slot, or in place
    /// from the registered guest memory.
    Pages { at: usize, len: usize },
    /// `len` zero bytes.
    Zero { len: usize },
}

/// One WR of a window: a contiguous destination range gathered from `parts`.
#[derive(Debug, Clone, Copy)]
struct Wr {
    offset: u64,
    first: usize,
    parts: usize,
    len: u64,
}

/// A worker's lanes on RDMA.
pub(crate) struct RdmaTx {
    dev: Arc<Device>,
    cq: Cq,
    lanes: Vec<Lane>,
    spare: Vec<RegSlot>,
    /// Slots some WR still gathers from: (lane, the lane's post count that frees it).
    in_flight: VecDeque<(usize, u64, RegSlot)>,
    /// Zeroed at creation and never written: the source of zero pages. (`None` only once
    /// dropped: the staging goes back to the device.)
    zero: Option<RegSlot>,
    /// The staging's chunk and bytes, to give it back.
    staging: (usize, u64),
    /// Per region: where the destination registered it, and its key.
    remote: Vec<(u64, u32)>,
    /// Per region, when the guest memory is registered for the NIC to gather from in
    /// place (zero-copy): WRs gather the pages from it rather than from the slot, and a
    /// window is read only to find zero pages in round 0 or to hash what is sent.
    guest: Option<Arc<[LocalRegion]>>,
    windows: Windows,
    /// The key pages are hashed under as sent; `None` when one-sided writes are checked
    /// at the end ([`crate::wire::ONE_SIDED_AT_END`]) and no page is hashed as sent.
    key: Option<DigestKey>,
    sq_depth: u32,
    signal_every: u32,
    inline_max: u64,
    send_sge: usize,
    turn: usize,
    wcs: [Completion; POLL_BATCH],
    backoff: Backoff,
    /// The CQ is armed and its channel's event not taken yet ([`RdmaTx::ready`]).
    armed: bool,
    batch: Option<SendBatch<'static>>,
    wrs: Vec<Wr>,
    parts: Vec<From>,
    subruns: Vec<(usize, usize, bool)>,
    /// Per signaled WR: posted until complete, µs.
    pub latency: hdrhistogram::Histogram<u64>,
    pub report: RdmaReport,
    /// Set when the session fails elsewhere.
    abort: Arc<AtomicBool>,
}

impl Drop for RdmaTx {
    /// The staging goes back to the device for the next session, once the QPs are gone
    /// (destroyed first: the NIC reads none of the slots after that, in flight or not).
    fn drop(&mut self) {
        self.lanes.clear();
        let Some(zero) = self.zero.take() else { return };
        let mut slots = std::mem::take(&mut self.spare);
        slots.extend(self.in_flight.drain(..).map(|(_, _, s)| s));
        let (chunk, bytes) = self.staging;
        self.dev.give_back(super::Staging { slots, zero, chunk, bytes });
    }
}

impl std::fmt::Debug for RdmaTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTx").field("device", &self.dev.name).field("lanes", &self.lanes.len()).finish_non_exhaustive()
    }
}

/// What one window cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WindowSent {
    /// Pages of the window the round sent, zero pages included.
    pub pages: u64,
    /// Zero pages skipped (round 0).
    pub zero_pages: u64,
    /// Bytes written into the destination.
    pub bytes: u64,
    /// WRITE_WITH_IMMs: 1, or 0 when nothing needed writing.
    pub imms: u64,
}

/// A worker's QPs before they are connected: what RDMA_CONNECT tells the receiver.
pub(crate) struct Unconnected {
    pub cq: Cq,
    pub qps: Vec<(Qp, u32)>,
    pub inline_max: u64,
}

/// Creates a worker's CQ and `qpw` QPs.
pub(crate) fn create(dev: &Device, rp: &RdmaPlan, qpw: usize) -> Result<Unconnected, SessionError> {
    let cq = dev.ctx.create_waitable_cq(rp.cq_depth as i32)?;
    let caps = QpCaps {
        max_send_wr: rp.sq_depth,
        max_recv_wr: rp.rq_depth,
        max_send_sge: rp.send_sge,
        max_recv_sge: 1,
        max_inline_data: rp.inline_threshold_bytes,
    };
    let mut qps = Vec::with_capacity(qpw);
    let mut inline_max = u64::from(rp.inline_threshold_bytes);
    for _ in 0..qpw {
        let (qp, granted) = dev.pd.create_rc_qp(&cq, caps)?;
        inline_max = inline_max.min(u64::from(granted.max_inline_data));
        qps.push((qp, super::psn()?));
    }
    Ok(Unconnected { cq, qps, inline_max })
}

/// Whether an RDMA worker can send a window ([`RdmaTx::ready`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    Now,
    /// Not yet: look again soon.
    Later,
    /// Not until the CQ's channel says so.
    Armed,
}

/// What a connected worker needs to send.
pub(crate) struct Setup<'a> {
    pub dev: Arc<Device>,
    pub rp: &'a RdmaPlan,
    pub mtu: u32,
    pub credits: u32,
    pub peers: &'a [wire::RdmaEndpoint],
    pub remote: Vec<(u64, u32)>,
    pub windows: Windows,
    /// `None`: no page is hashed as sent (checked at the end).
    pub key: Option<DigestKey>,
    /// The guest memory registered for local reads (zero-copy), one per region.
    pub guest: Option<Arc<[LocalRegion]>>,
    /// The worker's staging: a zero buffer and at least [`SLOTS`] slots of a chunk each.
    pub staging: super::Staging,
    /// Set when the session fails elsewhere: waits on the CQ stop.
    pub abort: Arc<AtomicBool>,
}

impl RdmaTx {
    /// Connects the worker's QPs to `peers` (in order), posts their credit receives and
    /// takes its staging.
    pub(crate) fn connect(u: Unconnected, s: Setup<'_>) -> Result<RdmaTx, SessionError> {
        let super::Staging { slots, zero, chunk, bytes } = s.staging;
        let mut lanes = Vec::with_capacity(u.qps.len());
        for (i, ((mut qp, psn), peer)) in u.qps.into_iter().zip(s.peers).enumerate() {
            qp.connect(&s.dev.path(s.mtu), psn, &super::remote(peer), Grant::Nothing)?;
            qp.post_recvs(i as u64, s.rp.rq_depth as usize)?;
            lanes.push(Lane {
                qp,
                credits: s.credits,
                posted: 0,
                completed: 0,
                since_signal: 0,
                signaled: VecDeque::with_capacity(s.rp.sq_depth as usize),
                end: wire::RdmaLaneEnd::default(),
            });
        }
        // With one WR in `signal_every` signaled and at most half the queue unsignaled at
        // its tail, a full send queue always holds a signaled WR whose completion frees room.
        let signal_every = s.rp.signal_interval.clamp(1, (s.rp.sq_depth / 2).max(1));
        Ok(RdmaTx {
            dev: s.dev,
            cq: u.cq,
            lanes,
            spare: slots,
            in_flight: VecDeque::new(),
            zero: Some(zero),
            staging: (chunk, bytes),
            remote: s.remote,
            guest: s.guest,
            windows: s.windows,
            key: s.key,
            sq_depth: s.rp.sq_depth,
            signal_every,
            inline_max: u.inline_max,
            send_sge: s.rp.send_sge.max(2) as usize,
            turn: 0,
            wcs: [Completion::default(); POLL_BATCH],
            backoff: Backoff::default(),
            armed: false,
            batch: Some(SendBatch::default()),
            wrs: Vec::new(),
            parts: Vec::new(),
            subruns: Vec::new(),
            latency: crate::engine::latency_histogram(),
            report: RdmaReport::default(),
            abort: s.abort,
        })
    }

    /// The zero buffer's length (a chunk).
    fn zero_len(&self) -> usize {
        self.zero.as_ref().map_or(0, |z| z.len())
    }

    pub(crate) fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Arena bytes a worker needs for chunks of `chunk` bytes: the zero buffer and the
    /// slots.
    pub(crate) fn arena_bytes(chunk: usize) -> usize {
        (SLOTS + 1) * chunk
    }

    /// Reads completions: credits come back, signaled WRs retire what they cover and free
    /// the slots they gathered from. Waits a little when there are none.
    fn poll(&mut self, waiting_for: &str) -> Result<(), SessionError> {
        // A nap short enough that a failure elsewhere (`abort`) stops this worker promptly.
        let n = poll_cq(&self.cq, &mut self.wcs, &mut self.backoff, Duration::from_millis(10))?;
        if n == 0 {
            if self.abort.load(Ordering::Relaxed) {
                return Err(SessionError::Stopped);
            }
            return self.backoff.check(waiting_for);
        }
        self.completed(n)
    }

    /// Reads the completions there are now, without waiting; how many.
    fn poll_now(&mut self) -> Result<usize, SessionError> {
        let n = self.cq.poll(&mut self.wcs)?;
        if n > 0 {
            self.backoff.progress();
            self.completed(n)?;
        }
        Ok(n)
    }

    /// Whether a window can go now without waiting on the receiver: a slot free and a
    /// lane with a credit. Credits come back only as the receiving ferryd takes what
    /// landed, so a worker without one does not wait for them: it says to look again
    /// soon (`Later`, while it would spin or yield for a CQ, letting the pool thread's
    /// other sessions go), then arms its CQ, whose channel ([`RdmaTx::wait_fd`]) wakes the
    /// pool thread (`Armed`); it fails once nothing has completed for the idle timeout.
    /// Slots and send-queue room come back with the NIC's own completions, which a send
    /// waits for.
    pub(crate) fn ready(&mut self) -> Result<Ready, SessionError> {
        let can = |t: &Self| !t.spare.is_empty() && t.lanes.iter().any(|l| l.credits > 0);
        if can(self) {
            return Ok(Ready::Now);
        }
        if self.armed {
            // The channel stays readable until its event is taken.
            self.cq.wait(Duration::ZERO)?;
            self.armed = false;
        }
        while self.poll_now()? == POLL_BATCH {}
        if can(self) {
            return Ok(Ready::Now);
        }
        if self.abort.load(Ordering::Relaxed) {
            return Err(SessionError::Stopped);
        }
        let wait = self.backoff.idle();
        self.backoff.check("waiting for the receiver's credits")?;
        if !wait {
            return Ok(Ready::Later);
        }
        // Armed, then polled once more: a completion between the last poll and the arming
        // raises no event, and would wait otherwise.
        self.cq.arm()?;
        self.armed = true;
        self.poll_now()?;
        Ok(if can(self) { Ready::Now } else { Ready::Armed })
    }

    /// What to wait on after [`RdmaTx::ready`] said no: the CQ's channel.
    pub(crate) fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.cq.channel_fd().filter(|_| self.armed)
    }

    /// Accounts for the first `n` completions in `self.wcs`.
    fn completed(&mut self, n: usize) -> Result<(), SessionError> {
        for wc in &self.wcs[..n] {
            if wc.is_recv() {
                if let Some(failure) = wc.failure() {
                    return Err(completion_error(failure, &self.dev.name, "a credit receive"));
                }
                let lane = &mut self.lanes[wc.wr_id as usize];
                lane.credits += wc.imm.unwrap_or(0);
                lane.qp.post_recvs(wc.wr_id, 1)?;
            } else {
                if let Some(failure) = wc.failure() {
                    return Err(completion_error(failure, &self.dev.name, "an RDMA WRITE"));
                }
                let lane = &mut self.lanes[(wc.wr_id >> 32) as usize];
                lane.completed += u64::from(wc.wr_id as u32);
                if let Some(t) = lane.signaled.pop_front() {
                    self.latency.saturating_record(t.elapsed().as_micros() as u64);
                }
            }
        }
        while let Some(&(l, seq, _)) = self.in_flight.front() {
            if self.lanes[l].completed < seq {
                break;
            }
            let (_, _, slot) = self.in_flight.pop_front().expect("front");
            self.spare.push(slot);
        }
        Ok(())
    }

    /// A slot no WR gathers from.
    fn take_slot(&mut self) -> Result<RegSlot, SessionError> {
        loop {
            if let Some(s) = self.spare.pop() {
                return Ok(s);
            }
            self.poll("waiting for a slot the NIC has finished reading")?;
        }
    }

    /// Sends the pages of window `w` of region `region` that `runs` (page ranges, all in
    /// the window) name: read into a slot (unless nothing needs reading), hashed as sent
    /// (keyed, unless checked at the end), written by one-sided WRITEs ending with a
    /// WRITE_WITH_IMM. Zero pages are skipped in round 0.
    pub(crate) fn send_window(
        &mut self,
        round: u32,
        reg: &Region,
        (region, w): (u32, u64),
        chunk: usize,
        runs: &[(u64, u64)],
    ) -> Result<WindowSent, SessionError> {
        let Region { memory, probe_holes, size, sent, .. } = reg;
        let (probe_holes, size) = (*probe_holes, *size);
        let page = PAGE as u64;
        let base = w * chunk as u64;
        let mut slot = self.take_slot()?;
        self.subruns.clear();
        let (mut pages, mut skipped) = (0, 0);
        // Zero-copy after round 0, with nothing to hash: the dirty pages are written as
        // they are (a page that turned zero included), and the CPU reads none of them.
        let unread = self.guest.is_some() && round > 0 && self.key.is_none();
        for &(s, e) in runs {
            let (from, to) = (s * page, (e * page).min(size));
            let (at, len) = ((from - base) as usize, (to - from) as usize);
            pages += e - s;
            if unread {
                self.subruns.push((at, at + len, false));
                continue;
            }
            if probe_holes && crate::digest::is_hole(memory, from, len as u64) {
                self.subruns.push((at, at + len, true));
                continue;
            }
            memory
                .read_exact_at(&mut slot[at..at + len], from)
                .map_err(|e| SessionError::io(format!("reading region {region} at offset {from}"), e))?;
            let subruns = &mut self.subruns;
            crate::encode::page_runs(&slot[at..at + len], PAGE, &mut |a, b, zero| subruns.push((at + a, at + b, zero)));
        }
        self.build(round, base);
        for &(a, b, zero) in &self.subruns {
            if zero && round == 0 {
                skipped += (b - a).div_ceil(PAGE) as u64;
            }
        }
        if self.wrs.is_empty() {
            // Nothing to write (zero pages the destination already has): no WR, no credit.
            self.hash_sent(&slot, base, region, sent);
            self.spare.push(slot);
            self.lanes[0].end.pages += pages;
            self.lanes[0].end.zero_pages += skipped;
            return Ok(WindowSent { pages, zero_pages: skipped, bytes: 0, imms: 0 });
        }
        let l = self.lane_with_credit()?;
        let imm = self.windows.id(region, w);
        let bytes = self.wrs.iter().map(|w| w.len).sum();
        self.post(l, &slot, (region, base), imm)?;
        // Hashed while the NIC gathers the same bytes (both only read the slot, which
        // nothing writes until the WRs complete): the hashing overlaps the transfer.
        self.hash_sent(&slot, base, region, sent);
        let lane = &mut self.lanes[l];
        lane.end.imms += 1;
        lane.end.pages += pages;
        lane.end.zero_pages += skipped;
        self.in_flight.push_back((l, lane.posted, slot));
        self.report.write_imms += 1;
        Ok(WindowSent { pages, zero_pages: skipped, bytes, imms: 1 })
    }

    /// Each page's hash, keyed, as the destination will compute it from what lands (unless
    /// both ends digest everything at the end instead): from `slot`, holding the window at
    /// `base`.
    fn hash_sent(&self, slot: &RegSlot, base: u64, region: u32, sent: &PageHashes) {
        if let Some(key) = &self.key {
            hash_sent(key, &self.subruns, slot, base, region, sent);
        }
    }

    /// Turns the window's subruns into WRs (`self.wrs`, `self.parts`): each WR one
    /// contiguous destination range of at most `send_sge` pieces. In round 0 zero runs are
    /// skipped (the destination starts zeroed), except a short gap between two data runs,
    /// written from the zero buffer to keep one WR; later, zero runs are written (a page
    /// may have turned zero).
    fn build(&mut self, round: u32, base: u64) {
        self.wrs.clear();
        self.parts.clear();
        let mut open: Option<Wr> = None;
        // Window offset where the open WR's range ends.
        let mut open_end = 0usize;
        for i in 0..self.subruns.len() {
            let (a, b, zero) = self.subruns[i];
            if open.is_some() && open_end != a {
                self.wrs.extend(open.take());
            }
            let next_is_data = self.subruns.get(i + 1).is_some_and(|&(na, _, nz)| na == b && !nz);
            let gap_fill = open.is_some() && b - a <= ZERO_FILL_MAX && next_is_data;
            if zero && round == 0 && !gap_fill {
                self.wrs.extend(open.take());
                continue;
            }
            let mut cur = a;
            while cur < b {
                let len = if zero { (b - cur).min(self.zero_len()) } else { b - cur };
                if open.is_some_and(|w| w.parts >= self.send_sge) {
                    self.wrs.extend(open.take());
                }
                let first = self.parts.len();
                let w = open.get_or_insert(Wr { offset: base + cur as u64, first, parts: 0, len: 0 });
                self.parts.push(if zero { From::Zero { len } } else { From::Pages { at: cur, len } });
                w.parts += 1;
                w.len += len as u64;
                if zero {
                    self.report.zero_fill_pages += len.div_ceil(PAGE) as u64;
                }
                cur += len;
            }
            open_end = b;
        }
        self.wrs.extend(open.take());
    }

    /// A lane with a credit, in turn (waiting for the receiver's credits if none has).
    fn lane_with_credit(&mut self) -> Result<usize, SessionError> {
        let n = self.lanes.len();
        loop {
            if let Some(l) = (0..n).map(|k| (self.turn + k) % n).find(|&l| self.lanes[l].credits > 0) {
                self.turn = l + 1;
                self.lanes[l].credits -= 1;
                return Ok(l);
            }
            self.poll("waiting for the receiver's credits")?;
        }
    }

    /// Posts the built WRs of window `(region, base)` on lane `l` in as few doorbells as
    /// the send queue allows; the last is a WRITE_WITH_IMM carrying `imm`, and signaled
    /// (its completion frees `slot`). Pages gather from `slot`, or in place from the guest
    /// memory when it is registered.
    #[allow(unsafe_code)]
    fn post(&mut self, l: usize, slot: &RegSlot, (region, base): (u32, u64), imm: u32) -> Result<(), SessionError> {
        let (addr, rkey) = self.remote[region as usize];
        let mut i = 0;
        while i < self.wrs.len() {
            let lane = &self.lanes[l];
            let room = (u64::from(self.sq_depth) - (lane.posted - lane.completed)) as usize;
            if room == 0 {
                self.poll("waiting for send-queue room")?;
                continue;
            }
            let take = room.min(self.wrs.len() - i);
            let mut batch: SendBatch<'_> = self.batch.take().unwrap_or_default().recycle();
            let mut sges: Vec<Sge<'_>> = Vec::with_capacity(self.send_sge);
            for k in i..i + take {
                let w = self.wrs[k];
                let last = k + 1 == self.wrs.len();
                let remote_addr = addr + w.offset;
                let op = if last { SendOp::WriteImm { remote_addr, rkey, imm } } else { SendOp::Write { remote_addr, rkey } };
                sges.clear();
                for p in &self.parts[w.first..w.first + w.parts] {
                    sges.push(match *p {
                        From::Pages { at, len } => match &self.guest {
                            Some(g) => g[region as usize].sge(base as usize + at, len),
                            None => slot.sge(at, len),
                        },
                        // A zero piece is never longer than the zero buffer.
                        From::Zero { len } => self.zero.as_ref().expect("the zero buffer lives as long as the worker").sge(0, len),
                    });
                }
                let lane = &mut self.lanes[l];
                lane.since_signal += 1;
                lane.posted += 1;
                let signaled = last || lane.since_signal >= self.signal_every;
                let wr_id = ((l as u64) << 32) | u64::from(lane.since_signal);
                if signaled {
                    lane.since_signal = 0;
                    lane.signaled.push_back(Instant::now());
                }
                let inline = w.len > 0 && w.len <= self.inline_max;
                self.report.inline_wrs += u64::from(inline);
                self.report.work_requests += 1;
                self.report.sges += w.parts as u64;
                self.report.max_sges_per_wr = self.report.max_sges_per_wr.max(w.parts as u32);
                lane.end.bytes += w.len;
                batch.push(wr_id, op, &sges, signaled, inline);
            }
            // SAFETY: the SGEs name `slot`, the zero buffer or the guest memory. The zero
            // buffer lives as long as this worker and is never written; `slot` moves into
            // `in_flight` right after this call and comes back to the CPU only once the
            // signaled completion of the window's last WR (which covers every earlier WR on
            // the QP) is polled. The guest memory is a `LocalRegion`, which this worker
            // holds (an `Arc`) until it is dropped after its last completion or with its
            // QPs, and whose bytes Rust never sees.
            let posted = unsafe { self.lanes[l].qp.post_send(&mut batch) };
            drop(sges);
            self.batch = Some(batch.recycle());
            posted?;
            self.report.posts += 1;
            i += take;
        }
        Ok(())
    }

    /// Waits for every WR posted this round, signalling each lane's unsignaled tail with a
    /// zero-length WRITE, and returns what each lane carried in the round (for RDMA_END).
    pub(crate) fn end_round(&mut self) -> Result<Vec<wire::RdmaLaneEnd>, SessionError> {
        for l in 0..self.lanes.len() {
            if self.lanes[l].since_signal == 0 {
                continue;
            }
            while self.lanes[l].posted - self.lanes[l].completed >= u64::from(self.sq_depth) {
                self.poll("waiting for send-queue room")?;
            }
            let (addr, rkey) = self.remote[0];
            let lane = &mut self.lanes[l];
            lane.posted += 1;
            let wr_id = ((l as u64) << 32) | u64::from(lane.since_signal + 1);
            lane.since_signal = 0;
            lane.signaled.push_back(Instant::now());
            lane.qp.post_empty(wr_id, SendOp::Write { remote_addr: addr, rkey }, true)?;
            self.report.posts += 1;
        }
        while self.lanes.iter().any(|l| l.completed < l.posted) {
            self.poll("waiting for the round's last RDMA WRITEs to complete")?;
        }
        Ok(self.lanes.iter_mut().map(|l| std::mem::take(&mut l.end)).collect())
    }
}

/// Records each page of `subruns` (window offsets into `slot`, zero or not) in `sent` as
/// the destination will hash it from what lands: keyed, in its place.
fn hash_sent(key: &DigestKey, subruns: &[(usize, usize, bool)], slot: &[u8], base: u64, region: u32, sent: &PageHashes) {
    let page = PAGE as u64;
    for &(a, b, zero) in subruns {
        let first = (base + a as u64) / page;
        let mut d = Digest::default();
        for (i, pg) in slot[a..b].chunks(PAGE).enumerate() {
            d.0 = 0;
            if zero {
                d.add_zero_with(keyed(key), region, first + i as u64, PAGE, pg.len() as u64);
            } else {
                d.add_with(keyed(key), region, first + i as u64, PAGE, pg);
            }
            sent.set(first + i as u64, d);
        }
    }
}
