//! Post-copy's fault path over RDMA: after RDMA rounds, the destination reads each page
//! its guest faults on straight from the source's memory with an RDMA READ, and no CPU
//! of the source is on the path.
//!
//! Each attempt starts as over TCP (the fault lane answers FETCHes at once), and the READ
//! path is set up beside it, on the fault lane:
//!
//! ```text
//!  source                                              destination
//!    │ registers its guest memory for remote reads
//!    │ (once per migration, from the switch-over on,
//!    │ in a protection domain of its own)
//!    │── FAULT_RDMA (QP, each region's addr and rkey) ──►│ a QP, landing slots
//!    │◄── FAULT_RDMA_OK (its QP) ───────────────────────│ (registered for local writes)
//!    │ connects its QP, granting remote reads           │
//!    │── FAULT_RDMA_ON ─────────────────────────────────►│ faults from now on: READs
//!    │◄── FAULT_READ (the page) ────────────────────────│ each READ posted
//!    │ the push leaves it out, sends what is near first │
//! ```
//!
//! A READ lands in a slot; a completion thread places the page from it like any other
//! (the claim bit decides whether it is the first to arrive) and reuses the slot for the
//! next fault waiting. FAULT_READ is advice, answered with nothing: the fault's page does
//! not wait for the source's CPU. Where the source cannot register its memory (FAULT_RDMA with no
//! regions) or the destination cannot read (FAULT_RDMA_OK not ready), faults stay on the
//! fault lane, and both sides say why. A READ that fails (the link broke, the QP went to
//! the error state) fails the attempt like a broken fault lane: the faults it carried are
//! still waiting, and the next attempt asks for them again.
//!
//! The pages read arrive without frames to authenticate them: post-copy after RDMA rounds
//! hashes every page it places with the session's digest key, and the source keys its own
//! hashes of the stale pages alike (see `dest::Landed`), so a page that came wrong fails
//! the final digest.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hw::rdma::verbs::{Completion, Cq, Grant, LocalRegion, Pd, Qp, QpCaps, RegSlot, SendBatch, SendOp};
use zerocopy::IntoBytes;

use super::placement::Placement;
use crate::conn::{SessionError, Violation, write_frame};
use crate::engine::PAGE;
use crate::plan::RdmaPlan;
use crate::session::seal::Seal;
use crate::transport::rdma::{Backoff, POLL_BATCH, check_mtu, completion_error, poll_cq, psn, remote};
use crate::wire::{self, Kind};

/// READs a destination keeps in flight (each lands in a slot of one page).
const SLOTS: usize = 64;

/// A fault lane's sending half: at the source, shared by its answers and its READ offer;
/// at the destination, the placement's link.
pub(crate) struct LaneWriter {
    pub s: std::net::TcpStream,
    pub tx: Seal,
}

impl LaneWriter {
    /// One frame on the lane.
    pub(crate) fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), SessionError> {
        write_frame(&mut self.s, &mut self.tx, kind, payload)
    }

    /// One frame on a lane shared between threads.
    pub(crate) fn send(w: &Mutex<LaneWriter>, kind: Kind, payload: &[u8]) -> Result<(), SessionError> {
        w.lock().unwrap_or_else(|p| p.into_inner()).frame(kind, payload)
    }
}

/// The source's guest memory registered for remote reads, kept across attempts, in a
/// protection domain of its own: only the fault QPs made in it (connected to this
/// migration's destination) can read it, whatever rkey another peer tries.
pub(crate) struct Registered {
    pd: Pd,
    regions: Vec<LocalRegion>,
}

/// The source's guest memory being registered for remote reads, on a thread of its own
/// from the switch-over on: attempts find it done, or wait for it beside their fault lane
/// (which answers meanwhile), never longer than they last. Registering pins every page,
/// allocating any the guest never touched; the source's guest is paused for good, and its
/// memory goes when the migration is done. The thread keeps what it registers alive until
/// it is done even if the migration is over first.
#[derive(Clone)]
pub(crate) struct Registration {
    done: Arc<(Mutex<Option<Registering>>, Condvar)>,
}

/// A registration's outcome: the memory registered, or why not.
type Registering = Result<Arc<Registered>, String>;

impl Registration {
    pub(crate) fn start(rp: &RdmaPlan, regions: Arc<[crate::worker::Region]>, writable: Arc<[Option<File>]>) -> Registration {
        let done: Arc<(Mutex<Option<Registering>>, Condvar)> = Arc::default();
        let (out, rp) = (done.clone(), rp.clone());
        let spawned = std::thread::Builder::new().name("ferry-register".into()).spawn(move || {
            let r = register(&rp, &regions, &writable);
            *out.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            out.1.notify_all();
        });
        if let Err(e) = spawned {
            *done.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(format!("no thread to register the memory on: {e}")));
        }
        Registration { done }
    }

    /// The registration, or why there is none; `None` if `stop` came first.
    fn wait(&self, stop: &AtomicBool) -> Option<Registering> {
        let (lock, cv) = &*self.done;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return Some(r.clone());
            }
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            g = cv.wait_timeout(g, Duration::from_millis(10)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Every region registered for remote reads, or why not.
fn register(rp: &RdmaPlan, regions: &[crate::worker::Region], writable: &[Option<File>]) -> Registering {
    let dev = crate::transport::rdma::device(rp).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let pd = dev.ctx.alloc_pd().map_err(|e| e.to_string())?;
    let list = regions
        .iter()
        .zip(writable)
        .enumerate()
        .map(|(i, (r, rw))| crate::migrate::source::register_region(&pd, i, r, rw.as_ref(), true))
        .collect::<Result<Vec<_>, _>>()?;
    let size: u64 = regions.iter().map(|r| r.size).sum();
    log::info!(
        "post-copy: {} MiB of guest memory registered on {} for RDMA READs in {:.3} s",
        size >> 20,
        dev.name,
        t.elapsed().as_secs_f64()
    );
    Ok(Arc::new(Registered { pd, regions: list }))
}

/// The source's side of the READ path in one attempt.
pub(crate) struct Offer<'a> {
    pub rp: &'a RdmaPlan,
    pub registration: &'a Registration,
    /// The attempt is over: an offer still waiting for the registration gives up.
    pub stop: &'a AtomicBool,
    /// This attempt's QP (and its PSN) once offered; connected once FAULT_RDMA_OK came.
    /// It lives as long as the attempt.
    pub qp: Mutex<Option<(Qp, u32)>>,
}

impl Offer<'_> {
    /// Once the guest memory is registered, makes a QP and sends FAULT_RDMA; where the
    /// memory could not be registered, FAULT_RDMA with no regions.
    pub(crate) fn offer(&self, w: &Mutex<LaneWriter>) -> Result<(), SessionError> {
        let Some(registered) = self.registration.wait(self.stop) else { return Ok(()) };
        let dev = crate::transport::rdma::device(self.rp)?;
        let regs = match registered {
            Ok(r) => r,
            Err(why) => {
                log::warn!("post-copy: faults stay on the fault lane: {why}");
                let head = wire::FaultRdma { mtu: dev.mtu.into(), regions: 0.into(), infiniband: 0, _pad: [0; 7] };
                return LaneWriter::send(w, Kind::FaultRdma, head.as_bytes());
            }
        };
        let cq = dev.ctx.create_cq(2)?;
        let caps = QpCaps { max_send_wr: 1, max_recv_wr: 1, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 };
        let (qp, _) = regs.pd.create_rc_qp(&cq, caps)?;
        let p = psn()?;
        let ep = dev.endpoint(&qp, p);
        *self.qp.lock().unwrap_or_else(|p| p.into_inner()) = Some((qp, p));
        let list: Vec<wire::RdmaRegion> =
            regs.regions.iter().map(|r| wire::RdmaRegion { addr: r.addr().into(), rkey: r.rkey().into(), _pad: 0.into() }).collect();
        let head = wire::FaultRdma {
            mtu: dev.mtu.into(),
            regions: (list.len() as u32).into(),
            infiniband: u8::from(dev.gid_index.is_none()),
            _pad: [0; 7],
        };
        LaneWriter::send(w, Kind::FaultRdma, &wire::lists_payload(&head, &[ep], &list))
    }

    /// FAULT_RDMA_OK: connects this attempt's QP to the destination's, granting remote
    /// reads, and says FAULT_RDMA_ON; or, not ready, leaves faults on the fault lane.
    pub(crate) fn accepted(&self, payload: &[u8], w: &Mutex<LaneWriter>) -> Result<(), SessionError> {
        let head: wire::FaultRdmaOk = wire::parse(Kind::FaultRdmaOk, payload.get(..8).unwrap_or(payload))?;
        let mut slot = self.qp.lock().unwrap_or_else(|p| p.into_inner());
        let Some((qp, p)) = slot.as_mut() else {
            return Err(Violation::Unexpected { frame: Kind::FaultRdmaOk, why: "no QP was offered" }.into());
        };
        if head.ready == 0 {
            log::warn!("post-copy: the destination cannot read with RDMA; faults stay on the fault lane");
            *slot = None;
            return Ok(());
        }
        let (_, ep) = wire::parse_list::<wire::FaultRdmaOk, wire::RdmaEndpoint>(Kind::FaultRdmaOk, payload, 1)?;
        let dev = crate::transport::rdma::device(self.rp)?;
        let mtu = check_mtu(head.mtu.get().min(dev.mtu))?;
        if let Err(e) = qp.connect(&dev.path(mtu), *p, &remote(&ep[0]), Grant::RemoteRead) {
            // The destination hears no FAULT_RDMA_ON and goes on asking on the fault lane.
            log::warn!("post-copy: faults stay on the fault lane: the READ QP did not connect: {e}");
            *slot = None;
            return Ok(());
        }
        drop(slot);
        log::info!("post-copy: the destination reads faulting pages with RDMA READs on {} (MTU {mtu})", dev.name);
        LaneWriter::send(w, Kind::FaultRdmaOn, &[])
    }
}

/// The destination's side of the READ path in one attempt: its QP, the landing slots and
/// the faults waiting for one. Dropped with the attempt: the QP goes first (no READ lands
/// after that), then the slots.
pub(crate) struct Reads {
    qp: Qp,
    /// Per slot: home, or taken by the completion thread while it places the page.
    slots: Vec<Option<RegSlot>>,
    free: Vec<usize>,
    /// Per slot: the page its READ brings (region, page, bytes).
    inflight: Vec<(u32, u64, usize)>,
    /// Faults waiting for a slot.
    backlog: VecDeque<(u32, u64, usize)>,
    /// Per region: where the source registered it.
    remote: Vec<wire::RdmaRegion>,
    batch: SendBatch<'static>,
    pub(super) device: String,
    /// Test hook (`FERRY_TEST_RDMA_READ_ERROR_AFTER=N`): after N READs completed, the QP
    /// moves to the error state, as a broken link or a failing NIC would do to it; once
    /// per process, so the next attempt recovers.
    fail_after: Option<u64>,
    completed: u64,
}

/// [`Reads::fail_after`] fired already.
static READ_ERROR_FIRED: AtomicBool = AtomicBool::new(false);

impl Reads {
    /// READs page `page` of region `r` (`len` bytes) into a free slot, or queues it.
    pub(super) fn read(&mut self, r: u32, page: u64, len: usize) -> Result<(), SessionError> {
        match self.free.pop() {
            Some(i) => self.post(i, r, page, len),
            None => {
                self.backlog.push_back((r, page, len));
                Ok(())
            }
        }
    }

    #[allow(unsafe_code)]
    fn post(&mut self, i: usize, r: u32, page: u64, len: usize) -> Result<(), SessionError> {
        let at = &self.remote[r as usize];
        // The source's address as it gave it: one that is not its registration's fails the
        // READ at its NIC (a remote access error), which ends the attempt.
        let op = SendOp::Read { remote_addr: at.addr.get().wrapping_add(page * PAGE as u64), rkey: at.rkey.get() };
        let slot = self.slots[i].as_ref().expect("a free slot is home");
        let mut batch = std::mem::take(&mut self.batch).recycle();
        batch.push(i as u64, op, &[slot.sge(0, len)], true, false);
        // SAFETY: the READ writes slot `i`, registered for local writes, until its
        // completion is polled. Until then the slot stays in `slots` untouched: it is free
        // to no one (popped from `free`), only `read_done` takes it out, and only after
        // polling that completion; were the attempt to end first, `Reads` drops the QP
        // (no READ lands after that) before the slots.
        let posted = unsafe { self.qp.post_send(&mut batch) };
        self.batch = batch.recycle();
        if let Err(e) = posted {
            self.free.push(i);
            return Err(e.into());
        }
        self.inflight[i] = (r, page, len);
        Ok(())
    }

    /// Slot `i`'s READ completed: the slot and the page it brought, taken out until
    /// [`Reads::give_back`].
    pub(super) fn take(&mut self, i: usize) -> Option<(RegSlot, (u32, u64, usize))> {
        let slot = self.slots.get_mut(i)?.take()?;
        self.completed += 1;
        if self.fail_after.is_some_and(|n| self.completed >= n) && !READ_ERROR_FIRED.swap(true, Ordering::Relaxed) {
            log::warn!("FERRY_TEST_RDMA_READ_ERROR_AFTER: moving the READ QP {} to the error state", self.qp.qpn());
            if let Err(e) = self.qp.set_error() {
                log::warn!("{e}");
            }
        }
        Some((slot, self.inflight[i]))
    }

    /// Slot `i` is home again: the next fault waiting is read into it.
    pub(super) fn give_back(&mut self, i: usize, slot: RegSlot) -> Result<(), SessionError> {
        self.slots[i] = Some(slot);
        match self.backlog.pop_front() {
            Some((r, page, len)) => self.post(i, r, page, len),
            None => {
                self.free.push(i);
                Ok(())
            }
        }
    }
}

/// FAULT_RDMA at the destination of a session of `regions` regions: a QP connected to the
/// source's, and landing slots; the answer (FAULT_RDMA_OK) goes to `reply` (the fault
/// lane). `None` when the source offered no regions, or this side cannot read (it says
/// so: not ready).
pub(crate) fn accept(
    regions: usize,
    rp: Option<&RdmaPlan>,
    payload: &[u8],
    reply: &dyn Fn(Kind, &[u8]),
) -> Result<Option<(Reads, Cq)>, SessionError> {
    let head: wire::FaultRdma = wire::parse(Kind::FaultRdma, payload.get(..16).unwrap_or(payload))?;
    let n = head.regions.get() as usize;
    if n == 0 {
        log::warn!("post-copy: the source could not register its memory for RDMA READs; faults stay on the fault lane");
        return Ok(None);
    }
    if n != regions {
        let allowed = "the session's regions";
        return Err(Violation::Field { frame: Kind::FaultRdma, field: "regions", value: n as u64, allowed }.into());
    }
    let (_, ep, at) = wire::parse_lists::<wire::FaultRdma, wire::RdmaEndpoint, wire::RdmaRegion>(Kind::FaultRdma, payload, 1, n)?;
    match reads(rp, &head, &ep[0], at) {
        Ok((reads, cq, ours, mtu)) => {
            let ok = wire::FaultRdmaOk { mtu: mtu.into(), ready: 1, _pad: [0; 3] };
            reply(Kind::FaultRdmaOk, &wire::list_payload(&ok, &[ours]));
            Ok(Some((reads, cq)))
        }
        Err(e @ SessionError::Protocol(_)) => Err(e),
        Err(e) => {
            log::warn!("post-copy: faults stay on the fault lane: RDMA READs cannot be set up here: {e}");
            reply(Kind::FaultRdmaOk, wire::FaultRdmaOk { mtu: 0.into(), ready: 0, _pad: [0; 3] }.as_bytes());
            Ok(None)
        }
    }
}

/// The destination's QP, connected to `peer`, and its slots.
fn reads(
    rp: Option<&RdmaPlan>,
    head: &wire::FaultRdma,
    peer: &wire::RdmaEndpoint,
    regions: &[wire::RdmaRegion],
) -> Result<(Reads, Cq, wire::RdmaEndpoint, u32), SessionError> {
    let rp = rp.ok_or(crate::conn::Refusal::NoRdmaDevice)?;
    let dev = crate::transport::rdma::device(rp)?;
    if (head.infiniband == 1) != dev.gid_index.is_none() {
        return Err(crate::conn::Refusal::LinkLayers.into());
    }
    let mtu = check_mtu(head.mtu.get().min(dev.mtu))?;
    let (arena, _) = hw::memmap::Arena::new(SLOTS * PAGE, hw::memmap::ArenaKind::Normal, false, None)
        .map_err(|e| SessionError::io("mapping the landing slots", std::io::Error::other(e.to_string())))?;
    let slots = dev.pd.register_slots(arena, PAGE)?;
    let cq = dev.ctx.create_waitable_cq(SLOTS as i32)?;
    let caps = QpCaps { max_send_wr: SLOTS as u32, max_recv_wr: 1, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 };
    let (mut qp, _) = dev.pd.create_rc_qp(&cq, caps)?;
    let p = psn()?;
    qp.connect(&dev.path(mtu), p, &remote(peer), Grant::Nothing)?;
    let ours = dev.endpoint(&qp, p);
    let n = slots.len();
    let reads = Reads {
        qp,
        slots: slots.into_iter().map(Some).collect(),
        free: (0..n).rev().collect(),
        inflight: vec![(0, 0, 0); n],
        backlog: VecDeque::new(),
        remote: regions.to_vec(),
        batch: SendBatch::default(),
        device: dev.name.clone(),
        fail_after: std::env::var("FERRY_TEST_RDMA_READ_ERROR_AFTER").ok().and_then(|v| v.parse().ok()),
        completed: 0,
    };
    Ok((reads, cq, ours, mtu))
}

/// The destination's completion thread: each READ that completed is placed from its slot,
/// until `stop`. A READ that failed ends the attempt with its reason.
pub(crate) fn complete(pc: &Placement, cq: &Cq, device: &str, stop: &AtomicBool) -> Result<(), SessionError> {
    let mut wcs = [Completion::default(); POLL_BATCH];
    let mut backoff = Backoff::default();
    while !stop.load(Ordering::Relaxed) {
        let n = poll_cq(cq, &mut wcs, &mut backoff, Duration::from_millis(1))?;
        for wc in &wcs[..n] {
            if let Some(f) = wc.failure() {
                return Err(completion_error(f, device, "an RDMA READ of a faulting page"));
            }
            pc.read_done(wc.wr_id as usize)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn fault_rdma(regions: u32, entries: usize) -> Vec<u8> {
        let head = wire::FaultRdma { mtu: 4096.into(), regions: regions.into(), infiniband: 0, _pad: [0; 7] };
        let ep = wire::RdmaEndpoint { qpn: 17.into(), psn: 5.into(), lid: 0.into(), _pad: [0; 6], gid: [0; 16] };
        let at: Vec<wire::RdmaRegion> =
            (0..entries).map(|i| wire::RdmaRegion { addr: (i as u64 * 4096).into(), rkey: 9.into(), _pad: 0.into() }).collect();
        wire::lists_payload(&head, &[ep], &at)
    }

    /// Frames sent on the fault lane.
    type Sent = Vec<(Kind, Vec<u8>)>;

    /// Whether `accept` set the READ path up, and what it answered on the fault lane.
    fn answered(regions: usize, rp: Option<&RdmaPlan>, payload: &[u8]) -> (Result<bool, SessionError>, Sent) {
        let sent = RefCell::new(Vec::new());
        let r = accept(regions, rp, payload, &|k: Kind, p: &[u8]| sent.borrow_mut().push((k, p.to_vec())));
        (r.map(|x| x.is_some()), sent.into_inner())
    }

    #[test]
    fn a_fault_rdma_frame_that_does_not_fit_the_session_is_refused() {
        let (r, sent) = answered(2, None, &fault_rdma(3, 3));
        assert!(
            matches!(r, Err(SessionError::Protocol(Violation::Field { frame: Kind::FaultRdma, field: "regions", value: 3, .. }))),
            "{r:?}"
        );
        assert!(sent.is_empty());
        // Fewer regions than it says, and a frame cut short: a bad frame, nothing answered.
        let (r, sent) = answered(2, None, &fault_rdma(2, 1));
        assert!(matches!(r, Err(SessionError::Frame(_))), "{r:?}");
        assert!(sent.is_empty());
        let (r, _) = answered(2, None, &fault_rdma(2, 2)[..5]);
        assert!(matches!(r, Err(SessionError::Frame(_))), "{r:?}");
    }

    #[test]
    fn a_source_without_registered_memory_leaves_faults_on_the_lane() {
        let (r, sent) = answered(2, None, &fault_rdma(0, 0));
        assert!(matches!(r, Ok(false)), "{r:?}");
        assert!(sent.is_empty(), "nothing to answer: {sent:?}");
    }

    #[test]
    fn a_destination_that_cannot_read_says_not_ready() {
        // No RDMA port in this side's plan: the source hears FAULT_RDMA_OK, not ready.
        let (r, sent) = answered(2, None, &fault_rdma(2, 2));
        assert!(matches!(r, Ok(false)), "{r:?}");
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].0, Kind::FaultRdmaOk);
        let ok: wire::FaultRdmaOk = wire::parse(Kind::FaultRdmaOk, &sent[0].1).unwrap();
        assert_eq!(ok.ready, 0);
    }

    #[test]
    fn an_answer_to_no_offer_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let keys = crate::session::seal::Keys::derive(None, crate::session::seal::Side::Client, &[3; 32], &[4; 32]);
        let w = Mutex::new(LaneWriter { s, tx: keys.tx });
        let rp = RdmaPlan {
            device: "rxe0".into(),
            port: 1,
            link_layer: "Ethernet".into(),
            gid_index: Some(1),
            mtu: 4096,
            qps_per_worker: 1,
            sq_depth: 64,
            rq_depth: 64,
            cq_depth: 128,
            send_sge: 4,
            recv_sge: 1,
            inline_threshold_bytes: 0,
            signal_interval: 16,
        };
        let registration = Registration { done: Arc::default() };
        let stop = AtomicBool::new(true);
        let offer = Offer { rp: &rp, registration: &registration, stop: &stop, qp: Mutex::new(None) };
        let ok = wire::FaultRdmaOk { mtu: 4096.into(), ready: 1, _pad: [0; 3] };
        let r = offer.accepted(ok.as_bytes(), &w);
        assert!(matches!(r, Err(SessionError::Protocol(Violation::Unexpected { frame: Kind::FaultRdmaOk, .. }))), "{r:?}");
    }
}
