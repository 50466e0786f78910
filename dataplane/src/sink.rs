//! The receiving threads of the pool, and the receiving loop of every TCP session
//! (one-shot transfers, migration rounds, post-copy's push) that runs on them.
//!
//! A session's control thread hands each of its receives to a receiving thread through a
//! bounded lock-free queue, as an [`RxTask`]: a TCP lane ([`LaneRun`]), or an RDMA sender
//! worker's QPs ([`crate::transport::rdma::rx::Poller`]). The thread owns the task from
//! then on and never waits on any one of them: each task's descriptors (a lane's socket
//! and io_uring ring, a CQ's completion channel) are in the thread's epoll set, and a task
//! takes a turn when they stir, a few frames or completions at a time, so one thread
//! serves every session it holds. A lane's frame is checked against the session, written
//! into the destination once (the claim bits), and its pages hashed. A task's rounds and
//! failure go to its session's control thread on its channel; its end, once, on the
//! session's `finished` channel.
//!
//! The receive buffers are the thread's: a lane maps one only when the thread has no
//! spare large enough, and gives it back when it ends.

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use hw::memmap::Arena;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::conn::{Bug, Counted, SessionError, Violation};
use crate::digest::Digest;
use crate::encode::Decoder;
use crate::engine::PAGE;
use crate::engine::dest::Dest;
use crate::lane::{LaneReader, Payload};
use crate::migrate::{PageHashes, RoundCounts};
use crate::plan::Plan;
use crate::session::accept::Authed;
use crate::session::seal::{Seal, TAG_LEN};
use crate::wire::{self, Encoding, FrameError, HEADER_LEN, Header, Kind, Layout};

/// Lanes one receiving thread may hold (queued or running) at once. A session whose lane
/// would be one more is refused with a reason rather than queued without end.
pub const LANES_PER_THREAD: usize = 256;

/// Frames a lane takes in one turn before the thread's other lanes get theirs.
const FRAMES_PER_TURN: usize = 16;

/// Receive buffers a thread keeps for its next lanes; more are unmapped.
const SPARE_BUFFERS: usize = 4;

/// How often an idle thread looks for lanes that have been silent too long.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A lane's message to its session's control thread: one per round, or its failure.
pub(crate) type LaneMsg = Result<(u16, u32, RoundCounts), SessionError>;

/// The bounded queue on which a session's lanes report to its control thread: each
/// lane's end of the round the session is in (a source starts a round only once the
/// control thread, holding every lane's end of the last, confirmed it) and each lane's
/// failure, and one more for a failure the control side itself reports (a lane that
/// could not be handed over). A lane that ends rounds faster than its session confirms
/// them fails instead of queueing ([`Violation::LaneAhead`]). (std's bounded channel is
/// crossbeam's lock-free array queue, with a receive that waits, which the control thread
/// needs.)
pub(crate) fn reports(lanes: u16) -> (mpsc::SyncSender<LaneMsg>, mpsc::Receiver<LaneMsg>) {
    mpsc::sync_channel(2 * usize::from(lanes) + 1)
}

/// Where `tasks` tasks handed to the receiving threads report their ends: a bounded
/// queue with room for each task's one end, so a receiving thread never waits on it.
pub(crate) fn ends<T>(tasks: usize) -> (mpsc::SyncSender<T>, mpsc::Receiver<T>) {
    mpsc::sync_channel(tasks.max(1))
}

/// A lane's end: what it counted over the session, or that it stopped.
pub(crate) type LaneFinish = Result<LaneDone, SessionError>;

/// One region of the incoming memory: its writer and its page hashes.
pub(crate) struct Target {
    pub dest: Dest,
    pub hashes: PageHashes,
}

/// What every lane of a session shares, on whichever receiving thread runs it.
pub(crate) struct Sink {
    pub layout: Layout,
    /// Pre-copy and one-shot lanes write here; empty for post-copy's.
    pub targets: Vec<Target>,
    /// For the receive buffers' backing and whether io_uring receives.
    pub plan: Plan,
    pub live: Arc<crate::live::Session>,
    /// Region bytes received so far, for a progress bar.
    pub progress: Option<Arc<AtomicU64>>,
    /// Post-copy lanes place their pages through the claim bits instead of `targets`.
    pub postcopy: Option<Arc<crate::migrate::postcopy::Placement>>,
    /// The session's control thread: each round's counts, and a lane's failure (with a
    /// byte on `wake`, so it never waits on a source that will not speak again).
    pub tx: mpsc::SyncSender<LaneMsg>,
    pub wake: UnixStream,
    /// A lane silent this long fails.
    pub idle: Duration,
}

/// What a lane counted over the whole session.
pub(crate) struct LaneDone {
    pub lane: u16,
    pub counts: RoundCounts,
    /// io_uring received its bytes.
    pub uring: bool,
    /// Per data frame: arrival until written, µs.
    pub latency: hdrhistogram::Histogram<u64>,
}

/// A lane's place in its session, between frames.
struct LaneState {
    /// The lane's counters in its session's.
    live: crate::live::WorkerCounters,
    dec: Decoder,
    round: u32,
    this: RoundCounts,
    total: RoundCounts,
    latency: hdrhistogram::Histogram<u64>,
    one_page: Vec<u8>,
    scratch: Vec<u8>,
}

/// One lane of a session, handed to a receiving thread.
pub(crate) struct LaneRun {
    sink: Arc<Sink>,
    finished: mpsc::SyncSender<(u16, LaneFinish)>,
    s: TcpStream,
    n: u16,
    /// The lane's receiving keys, until its reader is made (on the thread that reads).
    rx: Option<Seal>,
    state: LaneState,
    /// When the lane last had a frame.
    last: Instant,
    /// How the lane ended, once it has.
    outcome: Option<LaneFinish>,
}

/// What a turn of a receiving thread's task did.
pub(crate) enum Turn {
    /// Nothing more is there: wait for the task's descriptors.
    Idle,
    /// It took its turn: more may be there.
    More,
    /// It is over (its outcome is kept for its `finish`).
    Over,
}

/// What a session hands a receiving thread: the closed set of what a receiver reads.
pub(crate) enum RxTask {
    /// A TCP lane's frames.
    Lane(Box<LaneRun>),
    /// An RDMA sender worker's QPs: the NIC writes the pages; the CQ says which.
    Rdma(Box<crate::transport::rdma::rx::Poller>),
}

/// A task as its thread runs it.
enum Active {
    Lane(Box<(LaneRun, LaneReader)>),
    Rdma(Box<crate::transport::rdma::rx::Poller>),
}

impl Active {
    /// What the thread waits on for the task to have more.
    fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        match self {
            Active::Lane(l) => std::iter::once(l.0.s.as_fd()).chain(l.1.ring_fd()).collect(),
            Active::Rdma(p) => p.fds(),
        }
    }

    fn turn(&mut self) -> Turn {
        match self {
            Active::Lane(l) => {
                let (run, reader) = &mut **l;
                run.turn(reader)
            }
            Active::Rdma(p) => p.turn(),
        }
    }

    /// Ends the task with `failure`, or with what its turns came to.
    fn finish(self, failure: Option<SessionError>, spare: &mut Vec<Arena>) {
        match self {
            Active::Lane(l) => {
                let (mut run, reader) = *l;
                let r = match failure {
                    Some(e) => Err(e),
                    None => run.outcome.take().unwrap_or(Err(SessionError::Stopped)),
                };
                run.finish(Some(reader), r, spare)
            }
            Active::Rdma(p) => p.finish(failure),
        }
    }

    /// A lane silent for longer than its session allows: its failure. (An RDMA session's
    /// silence is its control thread's to time.)
    fn expired(&self, now: Instant) -> Option<SessionError> {
        let Active::Lane(l) = self else { return None };
        let run = &l.0;
        let idle = run.sink.idle;
        (now.duration_since(run.last) > idle)
            .then(|| SessionError::TimedOut { op: format!("receiving data on lane {}", run.n), secs: idle.as_secs() })
    }
}

impl LaneRun {
    /// Lane `a` of the session whose lanes share `sink`; its end goes to `finished`.
    pub(crate) fn new(sink: Arc<Sink>, finished: mpsc::SyncSender<(u16, LaneFinish)>, a: Authed) -> LaneRun {
        let Authed { s, hello, keys, .. } = a;
        LaneRun::with(sink, finished, s, hello.lane.get(), keys.rx)
    }

    /// Lane `n` on `s`, whose frames `rx` checks.
    fn with(sink: Arc<Sink>, finished: mpsc::SyncSender<(u16, LaneFinish)>, s: TcpStream, n: u16, rx: Seal) -> LaneRun {
        let state = LaneState {
            live: sink.live.worker(usize::from(n)),
            dec: Decoder::default(),
            round: 0,
            this: RoundCounts::default(),
            total: RoundCounts::default(),
            latency: crate::engine::latency_histogram(),
            one_page: vec![0u8; PAGE],
            scratch: Vec::new(),
        };
        LaneRun { sink, finished, s, n, rx: Some(rx), state, last: Instant::now(), outcome: None }
    }

    /// Makes the lane's reader on the thread that reads it (an io_uring ring is its
    /// creator's, and is not sent between threads), through a spare buffer when one is
    /// large enough.
    fn start(&mut self, spare: &mut Vec<Arena>) -> Result<LaneReader, SessionError> {
        let max_payload = wire::max_payload_for(self.sink.layout.max_chunk);
        let need = crate::lane::buffer_bytes(max_payload) as usize;
        let arena = match spare.iter().position(|a| a.len() >= need) {
            Some(i) => spare.swap_remove(i),
            None => crate::engine::arena(&self.sink.plan, need, &self.sink.live)?,
        };
        let rx = self.rx.take().expect("a lane starts once");
        let reader = LaneReader::over(arena, self.sink.plan.tcp.io_uring, &self.s, max_payload, rx);
        if !reader.uring() {
            self.s.set_nonblocking(true).map_err(|e| SessionError::io("making a lane nonblocking", e))?;
        }
        log::info!("lane {} connected ({})", self.n, if reader.uring() { "io_uring multishot receive" } else { "plain reads" });
        self.last = Instant::now();
        Ok(reader)
    }

    /// Up to [`FRAMES_PER_TURN`] frames, as far as they have arrived.
    fn turn(&mut self, reader: &mut LaneReader) -> Turn {
        let LaneRun { sink, s, n, state, last, outcome, .. } = self;
        for _ in 0..FRAMES_PER_TURN {
            let (h, kind, payload) = match reader.try_next(s, "receiving data") {
                Ok(Some(f)) => f,
                Ok(None) => return Turn::Idle,
                Err(e) => {
                    *outcome = Some(Err(e));
                    return Turn::Over;
                }
            };
            *last = Instant::now();
            match state.frame(sink, (*n, *last), h, kind, &payload) {
                Ok(false) => {}
                Ok(true) => {
                    let uring = reader.uring();
                    let latency = std::mem::replace(&mut state.latency, crate::engine::latency_histogram());
                    *outcome = Some(Ok(LaneDone { lane: *n, counts: state.total, uring, latency }));
                    return Turn::Over;
                }
                Err(e) => {
                    *outcome = Some(Err(e));
                    return Turn::Over;
                }
            }
        }
        Turn::More
    }

    /// Reports the lane's end: a failure to the control thread first (it is the
    /// session's reason), then the end on `finished`, after the lane let go of the
    /// session's shared part; a failure that did not fit in the reports (the lane's own
    /// filled them) goes with the end. Its buffer goes back to `spare`.
    fn finish(self, reader: Option<LaneReader>, r: LaneFinish, spare: &mut Vec<Arena>) {
        let LaneRun { sink, finished, n, s, .. } = self;
        if let Some(arena) = reader.and_then(LaneReader::into_arena)
            && spare.len() < SPARE_BUFFERS
        {
            spare.push(arena);
        }
        drop(s);
        let r = r.map_err(|e| {
            let kept = match sink.tx.try_send(Err(e)) {
                Err(mpsc::TrySendError::Full(Err(e))) => e,
                _ => SessionError::Stopped,
            };
            let _ = (&sink.wake).write(&[1]);
            kept
        });
        drop(sink);
        // The queue has room for every lane's end.
        let _ = finished.try_send((n, r));
    }
}

impl LaneState {
    /// One frame of lane `n`, whole since `arrived`: DATA into the destination, a
    /// ROUND_END checked and reported, LANE_END (`true`: the lane is over).
    fn frame(
        &mut self,
        sink: &Sink,
        (n, arrived): (u16, Instant),
        h: Header,
        kind: Kind,
        payload: &Payload<'_>,
    ) -> Result<bool, SessionError> {
        match kind {
            Kind::Data if sink.postcopy.is_some() => {
                let pc = sink.postcopy.as_ref().expect("checked");
                let pages = pc.place_frame(&sink.layout, &h, payload, &mut self.dec, &mut self.scratch, false)?;
                let wire = (HEADER_LEN + payload.len() + TAG_LEN) as u64;
                self.this.frames += 1;
                self.this.pages += pages;
                self.this.wire_bytes += wire;
                self.live.add(u64::from(h.raw_len.get()), wire, 1, 0);
            }
            Kind::Data => {
                let zero0 = self.this.zero_pages;
                let raw_len = self.data(sink, &h, payload)?;
                let wire = (HEADER_LEN + payload.len() + TAG_LEN) as u64;
                let zero = self.this.zero_pages - zero0;
                self.live.add(u64::from(raw_len), wire, 1, zero);
                self.latency.saturating_record(arrived.elapsed().as_micros() as u64);
                if let Some(p) = &sink.progress {
                    p.fetch_add(u64::from(raw_len), Ordering::Relaxed);
                }
            }
            Kind::RoundEnd => {
                let end: wire::RoundEnd = wire::parse(Kind::RoundEnd, payload.contiguous(&mut self.scratch))?;
                // A post-copy push is one round, numbered after the source's pre-copy rounds.
                if sink.postcopy.is_some() && self.this.frames == end.frames.get() {
                    self.round = end.round.get();
                }
                check_round_end(n, self.round, &self.this, &end)?;
                self.total += self.this;
                match sink.tx.try_send(Ok((n, self.round, self.this))) {
                    Ok(()) => {}
                    Err(mpsc::TrySendError::Full(_)) => return Err(Violation::LaneAhead { lane: n, round: self.round }.into()),
                    // The control thread has gone: the session ended without this lane.
                    Err(mpsc::TrySendError::Disconnected(_)) => return Err(SessionError::Stopped),
                }
                self.this = RoundCounts::default();
                self.round += 1;
            }
            Kind::LaneEnd => {
                if self.this.frames != 0 {
                    let what = Counted::FramesOutsideRound { lane: n };
                    return Err(Violation::Miscount { what, announced: 0, found: self.this.frames }.into());
                }
                return Ok(true);
            }
            Kind::Error => return Err(SessionError::Peer(String::from_utf8_lossy(payload.contiguous(&mut self.scratch)).into_owned())),
            other => return Err(FrameError::Unexpected { expected: Kind::Data, got: other }.into()),
        }
        Ok(false)
    }

    /// A DATA frame of a pre-copy round or a one-shot transfer, written and its pages
    /// hashed; returns its region bytes.
    fn data(&mut self, sink: &Sink, h: &Header, payload: &Payload<'_>) -> Result<u32, SessionError> {
        let page = PAGE as u64;
        let (encoding, region, offset, raw_len) = sink.layout.check_data(h)?;
        // check_data bounded `region` by the session's regions.
        let Target { dest, hashes } = &sink.targets[region as usize];
        let first = offset / page;
        let record = |i: u64, p: &[u8]| hashes.set(first + i, Digest::of_page(region, first + i, p));
        let this = &mut self.this;
        match encoding {
            Encoding::Raw => {
                dest.write_payload(offset, payload)?;
                payload.pages(PAGE, &mut self.one_page, record);
            }
            Encoding::Zero => {
                let len = u64::from(raw_len);
                // Round 0 writes into a new memfd, which reads as zero already.
                if self.round == 0 { dest.claim_zero(offset, len) } else { dest.write_zero(offset, len) }?;
                for i in 0..len.div_ceil(page) {
                    let this_len = (len - i * page).min(page) as usize;
                    hashes.set(first + i, Digest::of_zero_page(region, first + i, this_len));
                }
                this.zero_pages += len.div_ceil(page);
            }
            Encoding::Zstd => {
                let bytes = self.dec.zstd(payload.contiguous(&mut self.scratch), raw_len)?;
                dest.write(offset, bytes)?;
                Payload::One(bytes).pages(PAGE, &mut self.one_page, record);
                this.compressed_in += u64::from(raw_len);
                this.compressed_out += payload.len() as u64;
            }
        }
        this.frames += 1;
        this.pages += u64::from(raw_len).div_ceil(page);
        this.wire_bytes += (HEADER_LEN + payload.len() + TAG_LEN) as u64;
        Ok(raw_len)
    }
}

/// A lane's ROUND_END against what the lane received in round `round`.
fn check_round_end(n: u16, round: u32, this: &RoundCounts, end: &wire::RoundEnd) -> Result<(), SessionError> {
    if end.round.get() != round {
        return Err(Violation::LaneRound { lane: n, got: end.round.get(), round }.into());
    }
    for (what, announced, found) in
        [("frames", end.frames.get(), this.frames), ("bytes", end.bytes.get(), this.wire_bytes), ("pages", end.pages.get(), this.pages)]
    {
        if announced != found {
            return Err(Violation::Miscount { what: Counted::LaneEnd { lane: n, round, what }, announced, found }.into());
        }
    }
    Ok(())
}

/// A receiving thread's mailbox: lanes and RDMA pollers in.
pub(crate) type LaneInbox = crate::pool::Inbox<RxTask>;

/// The token of the inbox's counter in the epoll set (lanes are their slot numbers).
const WAKE: u64 = u64::MAX;

/// The tasks a receiving thread holds, by slot.
struct Lanes {
    epoll: Epoll,
    slots: Vec<Option<Active>>,
    /// Slots to step next, each once ([`Lanes::queued`]).
    ready: Vec<usize>,
    /// The slots being stepped (kept, with `ready`, so stepping allocates nothing).
    batch: Vec<usize>,
    queued: Vec<bool>,
    spare: Vec<Arena>,
    /// The tasks in `slots`.
    held: usize,
}

impl Lanes {
    fn want(&mut self, slot: usize) {
        if self.slots.get(slot).is_some_and(Option::is_some) && !self.queued[slot] {
            self.queued[slot] = true;
            self.ready.push(slot);
        }
    }

    /// Takes a new task: a lane's reader made, its descriptors watched, its first turn
    /// queued.
    fn add(&mut self, task: RxTask) {
        let active = match task {
            RxTask::Lane(mut run) => match run.start(&mut self.spare) {
                Ok(reader) => Active::Lane(Box::new((*run, reader))),
                Err(e) => return run.finish(None, Err(e), &mut self.spare),
            },
            RxTask::Rdma(p) => Active::Rdma(p),
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.queued.push(false);
                self.slots.len() - 1
            }
        };
        let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, slot as u64);
        let fds = active.fds();
        let watched = fds.iter().try_for_each(|fd| self.epoll.add(fd, ev));
        if let Err(e) = watched {
            for fd in &fds {
                let _ = self.epoll.delete(fd);
            }
            drop(fds);
            return active.finish(Some(SessionError::io("watching a receive", e.into())), &mut self.spare);
        }
        drop(fds);
        self.slots[slot] = Some(active);
        self.held += 1;
        self.want(slot);
    }

    /// Ends the task in `slot`, with `failure` or its own outcome.
    fn end(&mut self, slot: usize, failure: Option<SessionError>) {
        let Some(active) = self.slots[slot].take() else { return };
        self.held -= 1;
        for fd in active.fds() {
            let _ = self.epoll.delete(fd);
        }
        active.finish(failure, &mut self.spare);
    }

    /// A turn for each task that may have more.
    fn step(&mut self) {
        std::mem::swap(&mut self.ready, &mut self.batch);
        for i in 0..self.batch.len() {
            let slot = self.batch[i];
            self.queued[slot] = false;
            let Some(active) = self.slots[slot].as_mut() else { continue };
            // A panic in a turn fails that task only: the thread serves on.
            match std::panic::catch_unwind(AssertUnwindSafe(|| active.turn())) {
                Ok(Turn::Idle) => {}
                Ok(Turn::More) => self.want(slot),
                Ok(Turn::Over) => self.end(slot, None),
                Err(_) => self.end(slot, Some(Bug::LanePanicked.into())),
            }
        }
        self.batch.clear();
    }

    /// Fails every lane silent for longer than its session allows.
    fn expire(&mut self) {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            if let Some(e) = self.slots[slot].as_ref().and_then(|a| a.expired(now)) {
                self.end(slot, Some(e));
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.held == 0
    }
}

/// The epoll set a receiving thread waits in, with its inbox's counter in it.
pub(crate) fn watch_inbox(inbox: &LaneInbox) -> std::io::Result<Epoll> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(inbox.wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
    Ok(epoll)
}

/// A receiving thread's loop: takes new lanes from its inbox, steps each lane that has
/// frames, and waits in epoll when none has. On stop, every lane it still holds ends as
/// stopped.
pub(crate) fn serve(inbox: &LaneInbox, epoll: Epoll) {
    let mut lanes =
        Lanes { epoll, slots: Vec::new(), ready: Vec::new(), batch: Vec::new(), queued: Vec::new(), spare: Vec::new(), held: 0 };
    let mut events = [EpollEvent::empty(); 64];
    let mut checked = Instant::now();
    loop {
        while let Some(task) = inbox.tasks.pop() {
            lanes.add(task);
        }
        lanes.step();
        if checked.elapsed() >= IDLE_CHECK {
            lanes.expire();
            checked = Instant::now();
        }
        // Acquire pairs with the pool's release store: a lane queued before the stop is
        // taken above first.
        if inbox.stop.load(Ordering::Acquire) && inbox.tasks.is_empty() {
            for slot in 0..lanes.slots.len() {
                lanes.end(slot, Some(SessionError::Stopped));
            }
            return;
        }
        let timeout =
            if lanes.ready.is_empty() { EpollTimeout::try_from(IDLE_CHECK).expect("one second fits") } else { EpollTimeout::ZERO };
        let n = match lanes.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                // Not a peer's doing (a bad descriptor or argument): step every lane now
                // and then rather than wait on a set that cannot say.
                log::error!("a receiving thread's epoll failed: {e}; its lanes are polled instead");
                std::thread::sleep(Duration::from_millis(10));
                (0..lanes.slots.len()).for_each(|slot| lanes.want(slot));
                0
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                WAKE => {
                    let _ = inbox.wake.read();
                }
                slot => lanes.want(slot as usize),
            }
        }
        if lanes.is_empty() {
            lanes.ready.clear();
        }
        inbox.held.store(lanes.held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    use zerocopy::IntoBytes;

    use super::*;
    use crate::conn::write_frame;
    use crate::pool::Pool;
    use crate::session::seal::{Keys, Side};

    /// A session's ends as its control thread sees them.
    struct Session {
        sink: Arc<Sink>,
        msgs: mpsc::Receiver<LaneMsg>,
        fin_tx: mpsc::SyncSender<(u16, LaneFinish)>,
        finished: mpsc::Receiver<(u16, LaneFinish)>,
    }

    /// A session of one 64 KiB region whose lanes fail after `idle` of silence.
    fn session(plan: &Plan, idle: Duration) -> Session {
        let (tx, msgs) = reports(1);
        let (wake, _woken) = UnixStream::pair().unwrap();
        let mem = hw::memmap::memfd("sink", 64 << 10, false).unwrap();
        let layout = Layout { page_size: PAGE as u32, max_chunk: 64 << 10, regions: vec![64 << 10] };
        let targets = vec![Target { dest: Dest::new(mem, 64 << 10, PAGE as u64).unwrap(), hashes: PageHashes::new(16).unwrap() }];
        let live = Arc::new(crate::live::receiver(crate::live::Role::Recv, 0x51, 1, 64 << 10));
        let sink = Sink { layout, targets, plan: plan.clone(), live, progress: None, postcopy: None, tx, wake, idle };
        let (fin_tx, finished) = ends(1);
        Session { sink: Arc::new(sink), msgs, fin_tx, finished }
    }

    /// Lane 0 of `s`, handed to `pool`: the sender's end and its sealing keys.
    fn lane(pool: &Pool, s: &Session) -> (TcpStream, Seal) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        let (ck, sk) = (Keys::derive(None, Side::Client, &[1; 32], &[2; 32]), Keys::derive(None, Side::Server, &[1; 32], &[2; 32]));
        pool.submit_rx(RxTask::Lane(Box::new(LaneRun::with(s.sink.clone(), s.fin_tx.clone(), r, 0, sk.rx))), 0).map_err(|e| e.1).unwrap();
        (c, ck.tx)
    }

    fn round_end(round: u32) -> wire::RoundEnd {
        wire::RoundEnd { round: round.into(), _pad: 0.into(), frames: 0.into(), bytes: 0.into(), pages: 0.into() }
    }

    fn lane_end() -> wire::LaneEnd {
        wire::LaneEnd { frames: 0.into(), bytes: 0.into() }
    }

    /// A frame, sealed, as bytes: to be written in pieces.
    fn frame(tx: &mut Seal, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, tx, kind, payload).unwrap();
        v
    }

    const WAIT: Duration = Duration::from_secs(20);

    /// One receiving thread, two sessions: one lane's peer stops half-way through a frame
    /// and waits, the other's ends its lane. The thread never waits on the first, so the
    /// second ends while the first is still open; the rest of the first's frame then ends
    /// it too. With plain reads and with io_uring.
    #[test]
    fn one_thread_serves_a_lane_that_waits_and_one_that_ends() {
        for uring in [false, true] {
            let mut plan = crate::pool::tests::plan();
            plan.tcp.io_uring = uring;
            let pool = Pool::for_receiving(&plan).unwrap();
            let (a, b) = (session(&plan, WAIT), session(&plan, WAIT));
            let (mut ca, mut ta) = lane(&pool, &a);
            let (mut cb, mut tb) = lane(&pool, &b);
            write_frame(&mut ca, &mut ta, Kind::RoundEnd, round_end(0).as_bytes()).unwrap();
            let end_a = frame(&mut ta, Kind::LaneEnd, lane_end().as_bytes());
            ca.write_all(&end_a[..10]).unwrap();
            assert!(matches!(a.msgs.recv_timeout(WAIT).unwrap(), Ok((0, 0, _))), "A's round 0 is reported");
            write_frame(&mut cb, &mut tb, Kind::RoundEnd, round_end(0).as_bytes()).unwrap();
            write_frame(&mut cb, &mut tb, Kind::LaneEnd, lane_end().as_bytes()).unwrap();
            let (n, done) = b.finished.recv_timeout(WAIT).expect("B's lane ends while A's waits");
            let done = done.unwrap();
            assert_eq!((n, done.counts.frames), (0, 0));
            assert!(matches!(b.msgs.try_recv(), Ok(Ok((0, 0, _)))));
            assert!(a.finished.try_recv().is_err(), "A's lane is still open");
            ca.write_all(&end_a[10..]).unwrap();
            let (_, done) = a.finished.recv_timeout(WAIT).expect("A's lane ends once its frame is whole");
            let done = done.unwrap();
            println!("uring asked {uring}, used {}", done.uring);
            assert!(!done.uring || uring);
            // Both lanes let go of their sessions.
            assert!(Arc::try_unwrap(a.sink).is_ok() && Arc::try_unwrap(b.sink).is_ok());
        }
    }

    /// A lane that says nothing for its session's idle time fails as timed out; a frame
    /// that does not check fails its lane only; a pool that stops ends the lanes it holds.
    #[test]
    fn silent_hostile_and_stopped_lanes_end_with_their_reasons() {
        let plan = crate::pool::tests::plan();
        let pool = Pool::for_receiving(&plan).unwrap();
        let (silent, hostile, open) = (session(&plan, Duration::from_secs(1)), session(&plan, WAIT), session(&plan, WAIT));
        let _c = lane(&pool, &silent);
        let (mut ch, _) = lane(&pool, &hostile);
        let _o = lane(&pool, &open);
        ch.write_all(&[0x5a; 64]).unwrap();
        let e = hostile.msgs.recv_timeout(WAIT).unwrap().unwrap_err();
        assert!(matches!(e, SessionError::Frame(_)), "{e}");
        assert!(matches!(hostile.finished.recv_timeout(WAIT).unwrap(), (0, Err(SessionError::Stopped))));
        let e = silent.msgs.recv_timeout(WAIT).unwrap().unwrap_err();
        assert!(matches!(e, SessionError::TimedOut { secs: 1, .. }), "{e}");
        assert!(silent.finished.recv_timeout(WAIT).unwrap().1.is_err());
        assert!(open.finished.try_recv().is_err(), "the third lane is still open");
        drop(pool);
        assert!(matches!(open.msgs.recv_timeout(WAIT).unwrap(), Err(SessionError::Stopped)));
        assert!(open.finished.recv_timeout(WAIT).unwrap().1.is_err());
    }

    /// A lane whose peer ends rounds without waiting for its session to confirm them
    /// fails once the session's reports are full, instead of queueing without end; the
    /// rounds it ended before are all there.
    #[test]
    fn a_lane_that_runs_ahead_of_its_session_fails() {
        let plan = crate::pool::tests::plan();
        let pool = Pool::for_receiving(&plan).unwrap();
        let s = session(&plan, WAIT);
        let (mut c, mut t) = lane(&pool, &s);
        for round in 0..8 {
            // The lane may have failed and closed already: later writes can fail.
            if write_frame(&mut c, &mut t, Kind::RoundEnd, round_end(round).as_bytes()).is_err() {
                break;
            }
        }
        // The failure did not fit behind the reports: it comes with the lane's end.
        let (_, end) = s.finished.recv_timeout(WAIT).expect("the lane ends");
        let e = end.err().expect("the lane failed");
        assert!(matches!(e, SessionError::Protocol(Violation::LaneAhead { lane: 0, round: 3 })), "{e}");
        let msgs: Vec<LaneMsg> = s.msgs.try_iter().collect();
        let rounds: Vec<u32> = msgs.iter().filter_map(|m| m.as_ref().ok().map(|(_, r, _)| *r)).collect();
        assert_eq!(rounds, [0, 1, 2], "the reports' room for one lane: {msgs:?}");
        assert!(msgs.iter().all(Result::is_ok));
    }
}
