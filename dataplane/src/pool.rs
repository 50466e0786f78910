//! The persistent sending workers: one thread per planned CPU, pinned, for the life of
//! ferryd (or of an embedded `ferryctl` run). Each owns its arena (mapped once, placed on
//! the plan's node and locked), cut into chunks that it lends to the sessions it serves.
//! A session hands each round to the workers through bounded lock-free queues
//! (crossbeam's `ArrayQueue`) and gets their results back the same way; no thread is
//! started per session or per round. A worker thread takes turns between the rounds it
//! holds a window at a time ([`Worker::step`]), so concurrent sessions share every CPU and
//! neither a rate-limited session nor a destination that drains slowly holds one up: no
//! step waits on a peer, and a thread with nothing to do waits on all its rounds' lanes.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::chunk::Batch;
use crate::conn::{Bug, Refusal, SessionError};
use crate::encode::Compressor;
use crate::migrate::RoundCounts;
use crate::plan::Plan;
use crate::worker::{Round, RoundRun, Step, Worker};

/// Rounds one worker thread may hold (queued or running) at once: as many concurrent
/// sessions. A session beyond it is refused with a reason rather than queued without end.
pub const ROUNDS_PER_WORKER: usize = 64;

/// A round of one session for one worker thread: the session's part on that worker (its
/// lanes, encoder, counters), the round, and where to report.
pub(crate) struct Task {
    pub worker: Worker,
    pub round: Arc<Round>,
    pub done: Arc<Done>,
}

/// Where a round's workers report: each its part of the session and its result on a
/// bounded queue, and a byte on a socket that the session's control thread polls beside
/// its control connection.
pub(crate) struct Done {
    results: ArrayQueue<(Worker, Result<RoundCounts, SessionError>)>,
    wake: UnixStream,
    /// Set on a worker's failure: the session's RDMA workers waiting on their completion
    /// queues stop.
    abort: Arc<AtomicBool>,
}

impl Done {
    /// A report point for `n` workers, and the socket that wakes the session's control
    /// thread (a byte per worker done).
    pub(crate) fn new(n: usize, abort: Arc<AtomicBool>) -> Result<(Arc<Done>, UnixStream), SessionError> {
        let (wake, woken) = UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e))?;
        Ok((Arc::new(Done { results: ArrayQueue::new(n.max(1)), wake, abort }), woken))
    }

    fn complete(&self, worker: Worker, r: Result<RoundCounts, SessionError>) {
        if r.is_err() {
            self.abort.store(true, Ordering::Relaxed);
        }
        if self.results.push((worker, r)).is_err() {
            // Sized for the session's workers, each of which reports once a round.
            log::error!("a round's results queue overflowed: a worker reported twice");
        }
        let _ = (&self.wake).write(&[1]);
    }

    /// The workers' parts and results, in the pool's worker order.
    pub(crate) fn take(&self) -> Vec<(Worker, Result<RoundCounts, SessionError>)> {
        let mut v: Vec<_> = std::iter::from_fn(|| self.results.pop()).collect();
        v.sort_by_key(|(w, _)| w.index);
        v
    }
}

/// Reads the wake-up bytes of `n` more workers from `woken`, waiting as long as it takes.
pub(crate) fn wait_for(woken: &UnixStream, mut n: usize) -> Result<(), SessionError> {
    let mut buf = [0u8; 64];
    while n > 0 {
        match (&*woken).read(&mut buf[..n.min(64)]) {
            Ok(0) => return Err(Bug::WakeClosed.into()),
            Ok(k) => n -= k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SessionError::io("waiting for the workers", e)),
        }
    }
    Ok(())
}

/// A pool thread's mailbox: its tasks in (a bounded queue), and a counter that wakes it
/// wherever it waits.
pub(crate) struct Inbox<T> {
    pub tasks: ArrayQueue<T>,
    /// The tasks the thread holds (for `status`).
    pub held: AtomicUsize,
    pub wake: EventFd,
    pub stop: AtomicBool,
}

impl<T> Inbox<T> {
    pub(crate) fn new(capacity: usize) -> Result<Inbox<T>, SessionError> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| SessionError::io("making a pool thread's wake-up counter", e.into()))?;
        Ok(Inbox { tasks: ArrayQueue::new(capacity), held: AtomicUsize::new(0), wake, stop: AtomicBool::new(false) })
    }

    /// Wakes the thread: a task is queued, or it is to stop.
    pub(crate) fn ring(&self) {
        let _ = self.wake.write(1);
    }
}

struct Member {
    cpu: u32,
    inbox: Arc<Inbox<Task>>,
    thread: Option<JoinHandle<()>>,
}

/// One receiving thread's mailbox and handle.
struct Receiver {
    inbox: Arc<crate::sink::LaneInbox>,
    thread: Option<JoinHandle<()>>,
}

/// The worker threads. Dropping the pool lets each finish the rounds it holds and joins
/// it; the receiving threads end the lanes they hold as stopped.
pub struct Pool {
    members: Vec<Member>,
    receivers: Vec<Receiver>,
    chunk: usize,
    chunks_per_worker: usize,
    /// What mapping the arenas said (a hugepage fallback: `true`), told to every session.
    notes: Vec<(bool, String)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("cpus", &self.cpus()).field("chunk", &self.chunk).finish_non_exhaustive()
    }
}

impl Pool {
    /// A sending thread per CPU of the plan, each with an arena as the plan describes it
    /// (at least the chunks its lanes can hold in flight), and a receiving thread per CPU
    /// beside it. Fails if an arena cannot be had (memlock too low, say): nothing is left
    /// running.
    pub fn new(plan: &Plan) -> Result<Pool, SessionError> {
        let mut pool = Pool::for_receiving(plan)?;
        pool.start_senders(plan)?;
        Ok(pool)
    }

    /// Only the receiving threads, one per CPU of the plan: for a receiver run without
    /// ferryd (an embedded `ferryctl recv`), which sends nothing.
    ///
    /// Receiving has threads of its own rather than turns on the sending ones: a
    /// receiving thread waits in one epoll set on every lane it holds and reads frames as
    /// they arrive, which a sending thread busy encoding windows would leave waiting (and
    /// a ferryd migrating to itself would slow its own destination).
    pub fn for_receiving(plan: &Plan) -> Result<Pool, SessionError> {
        if plan.worker_cpus.is_empty() {
            return Err(Refusal::NoWorkers.into());
        }
        let mut pool = Pool {
            members: Vec::new(),
            receivers: Vec::new(),
            chunk: plan.chunk_size_bytes as usize,
            chunks_per_worker: 0,
            notes: Vec::new(),
        };
        for (i, &cpu) in plan.worker_cpus.iter().enumerate() {
            let inbox = Arc::new(Inbox::new(crate::sink::LANES_PER_THREAD)?);
            let epoll = crate::sink::watch_inbox(&inbox).map_err(|e| SessionError::io("making a receiving thread's epoll set", e))?;
            let inbox2 = inbox.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ferry-r{i}"))
                .spawn(move || {
                    crate::engine::pin(cpu);
                    crate::sink::serve(&inbox2, epoll);
                })
                .map_err(|e| SessionError::io("starting a receiving thread", e))?;
            pool.receivers.push(Receiver { inbox, thread: Some(thread) });
        }
        Ok(pool)
    }

    /// `shared` (ferryd's), or else receiving threads of the caller's own, kept in `own`
    /// for as long as the caller runs (an embedded run has no ferryd).
    pub(crate) fn receivers<'p>(shared: Option<&'p Pool>, plan: &Plan, own: &'p mut Option<Pool>) -> Result<&'p Pool, SessionError> {
        match shared {
            Some(p) => Ok(p),
            None => Ok(own.insert(Pool::for_receiving(plan)?)),
        }
    }

    /// The sending threads, each with its arena.
    fn start_senders(&mut self, plan: &Plan) -> Result<(), SessionError> {
        let chunk = plan.chunk_size_bytes as usize;
        // Per worker, at least what its lanes can hold in flight with zero-copy sends; a
        // chunk is two slots (the window as read, its compressed payloads).
        let lanes = plan.tcp.connections_per_worker.max(1) as usize;
        let min_bytes = 2 * chunk * crate::transport::Tx::chunks_for(lanes, true);
        let members = &mut self.members;
        let mut notes = Vec::new();
        let mut chunks_per_worker = usize::MAX;
        for (i, &cpu) in plan.worker_cpus.iter().enumerate() {
            let inbox = Arc::new(Inbox::new(ROUNDS_PER_WORKER)?);
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let (plan, inbox2) = (plan.clone(), inbox.clone());
            let thread = std::thread::Builder::new()
                .name(format!("ferry-w{i}"))
                .spawn(move || {
                    crate::engine::pin(cpu);
                    // Mapped (and first touched) on the pinned CPU: its pages are placed on
                    // the plan's node.
                    let spare = match crate::engine::arena_with_notes(&plan, min_bytes) {
                        Ok((arena, notes)) => {
                            let mut slots = arena.into_slots(chunk);
                            let mut spare = Vec::with_capacity(slots.len() / 2);
                            while let (Some(d), Some(s)) = (slots.pop(), slots.pop()) {
                                spare.push(Batch::new(d, s));
                            }
                            let _ = ready_tx.send(Ok((notes, spare.len())));
                            spare
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    serve(&inbox2, spare, Compressor::new(chunk));
                })
                .map_err(|e| SessionError::io("starting a worker thread", e))?;
            let mut m = Member { cpu, inbox, thread: Some(thread) };
            match ready_rx.recv() {
                Ok(Ok((n, chunks))) => {
                    // Each worker's fallbacks, said once however many workers had them.
                    for note in n {
                        if !notes.contains(&note) {
                            notes.push(note);
                        }
                    }
                    chunks_per_worker = chunks_per_worker.min(chunks);
                    members.push(m);
                }
                Ok(Err(e)) => {
                    stop(&mut m);
                    return Err(e);
                }
                Err(_) => {
                    stop(&mut m);
                    return Err(Bug::WorkerEnded(i).into());
                }
            }
        }
        log::info!(
            "worker pool: {} thread(s) on CPUs {:?}, {} chunk(s) of {} KiB each",
            members.len(),
            plan.worker_cpus,
            chunks_per_worker,
            chunk >> 10
        );
        (self.chunks_per_worker, self.notes) = (chunks_per_worker, notes);
        Ok(())
    }

    /// The CPUs the worker threads are pinned to, in worker order.
    pub fn cpus(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.cpu).collect()
    }

    pub fn workers(&self) -> usize {
        self.members.len()
    }

    /// Per sending thread, the rounds (of as many sessions) it holds now.
    pub fn sending(&self) -> Vec<usize> {
        self.members.iter().map(|m| m.inbox.held.load(Ordering::Relaxed)).collect()
    }

    /// Per receiving thread, the lanes and RDMA pollers it holds now.
    pub fn receiving(&self) -> Vec<usize> {
        self.receivers.iter().map(|r| r.inbox.held.load(Ordering::Relaxed)).collect()
    }

    /// The chunk size the arenas are cut to.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Chunks each worker thread lends out.
    pub fn chunks_per_worker(&self) -> usize {
        self.chunks_per_worker
    }

    /// What the arenas' mapping said, for each session to report.
    pub(crate) fn notes(&self) -> &[(bool, String)] {
        &self.notes
    }

    /// Hands a round to worker `task.worker.index`; gives the task back if that worker
    /// already holds [`ROUNDS_PER_WORKER`] rounds.
    pub(crate) fn submit(&self, task: Task) -> Result<(), Box<(Task, SessionError)>> {
        let Some(m) = self.members.get(task.worker.index) else {
            let e = Bug::NoSuchWorker { index: task.worker.index, size: self.members.len() }.into();
            return Err(Box::new((task, e)));
        };
        m.inbox.tasks.push(task).map_err(|t| {
            let e = Refusal::WorkerBusy { worker: t.worker.index, rounds: ROUNDS_PER_WORKER }.into();
            Box::new((t, e))
        })?;
        m.inbox.ring();
        Ok(())
    }
}

impl Pool {
    /// Hands a receive to a receiving thread (thread `key` modulo their number: a lane's
    /// number, a poller's worker); gives it back if that thread already holds
    /// [`crate::sink::LANES_PER_THREAD`].
    pub(crate) fn submit_rx(&self, task: crate::sink::RxTask, key: usize) -> Result<(), Box<(crate::sink::RxTask, SessionError)>> {
        let i = key % self.receivers.len().max(1);
        let Some(r) = self.receivers.get(i) else {
            return Err(Box::new((task, Refusal::NoWorkers.into())));
        };
        r.inbox.tasks.push(task).map_err(|task| {
            let e = Refusal::ReceiverBusy { thread: i, lanes: crate::sink::LANES_PER_THREAD }.into();
            Box::new((task, e))
        })?;
        r.inbox.ring();
        Ok(())
    }
}

fn stop_receiver(r: &mut Receiver) {
    r.inbox.stop.store(true, Ordering::Release);
    r.inbox.ring();
    if let Some(t) = r.thread.take() {
        let _ = t.join();
    }
}

fn stop(m: &mut Member) {
    m.inbox.stop.store(true, Ordering::Release);
    m.inbox.ring();
    if let Some(t) = m.thread.take() {
        let _ = t.join();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.members.iter_mut().for_each(stop);
        self.receivers.iter_mut().for_each(stop_receiver);
    }
}

/// The longest a sending thread waits on its lanes' descriptors before it looks again: a
/// safety net, not a pace (a ring's completion or a socket's room wakes it at once).
const MAX_WAIT: Duration = Duration::from_millis(100);

/// A worker thread's loop: takes new rounds from its inbox, and steps every round it
/// holds in turn until each is done, lending chunks from `spare` and its zstd context.
/// No step waits on a peer: when no round can go on, the thread waits on every round's
/// lanes (a ring's completions, a socket's room), its inbox and the earliest paced round's
/// time at once, so a destination that drains slowly holds up only its own rounds.
fn serve(inbox: &Inbox<Task>, mut spare: Vec<Batch>, mut z: Compressor) {
    let total = spare.len();
    let mut active: Vec<(Task, RoundRun)> = Vec::new();
    let (mut idle, mut lost) = (0u32, 0usize);
    loop {
        while let Some(t) = inbox.tasks.pop() {
            let run = t.worker.start();
            active.push((t, run));
        }
        inbox.held.store(active.len(), Ordering::Relaxed);
        if active.is_empty() {
            if total - spare.len() > lost {
                lost = total - spare.len();
                log::warn!("a worker's arena lost {lost} of its {total} chunk(s) to a failed session");
            }
            // Acquire pairs with the pool's release store: a task queued before the
            // stop is taken above first.
            if inbox.stop.load(Ordering::Acquire) && inbox.tasks.is_empty() {
                return;
            }
            wait(inbox, &active, None);
            continue;
        }
        let (mut moved, mut blocked, mut until) = (false, false, None::<Instant>);
        let mut i = 0;
        while i < active.len() {
            let (t, run) = &mut active[i];
            // A panic in a step fails that session's round only: the thread serves on.
            let step =
                std::panic::catch_unwind(AssertUnwindSafe(|| t.worker.step(run, &t.round, &mut spare, &mut z))).unwrap_or_else(|_| {
                    t.round.feed.stop();
                    Step::Done(Err(Bug::WorkerPanicked.into()))
                });
            match step {
                Step::Sent => {
                    moved = true;
                    i += 1;
                }
                Step::Wait(due) => {
                    if let Some(d) = due {
                        until = Some(until.map_or(d, |u| u.min(d)));
                    }
                    i += 1;
                }
                Step::Blocked => {
                    blocked = true;
                    i += 1;
                }
                Step::Done(r) => {
                    let (mut t, _) = active.swap_remove(i);
                    if r.is_err() {
                        // The failed session's lanes may still hold chunks: cancel their
                        // sends and take them back.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| t.worker.reclaim(&mut spare)));
                    }
                    t.done.complete(t.worker, r);
                    moved = true;
                }
            }
        }
        if moved {
            idle = 0;
            continue;
        }
        // Every round waits: on its lanes (a blocked round), on its rate (until the
        // earliest may go on), or on chunks another round holds (spin briefly, then
        // yield; that round's lanes give them back).
        idle += 1;
        if blocked || (until.is_some() && idle > 16) {
            wait(inbox, &active, until);
        } else {
            std::thread::yield_now();
        }
    }
}

/// Waits until a round's lanes can get further, a task comes, or `until` (at most
/// [`MAX_WAIT`]).
fn wait(inbox: &Inbox<Task>, active: &[(Task, RoundRun)], until: Option<Instant>) {
    let mut fds = vec![PollFd::new(inbox.wake.as_fd(), PollFlags::POLLIN)];
    for (t, _) in active {
        t.worker.tx.wait_fds(&mut fds);
    }
    let limit = until.map_or(MAX_WAIT, |u| u.saturating_duration_since(Instant::now()).min(MAX_WAIT));
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let woken = match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => n > 0 && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)),
        Err(nix::errno::Errno::EINTR) => false,
        // Not a peer's doing (a bad descriptor or argument): the rounds are stepped every
        // `limit` rather than spun on a wait that cannot say, as a receiving thread does
        // when its epoll fails.
        Err(e) => {
            log::error!("a sending thread's poll failed: {e}; its rounds are stepped every {limit:?} instead");
            std::thread::sleep(limit);
            false
        }
    };
    if woken {
        let _ = inbox.wake.read();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::encode::Encoder;
    use crate::plan::*;
    use crate::session::seal::{Keys, Side};
    use crate::transport::{Lane, Tx};
    use crate::worker::Region;

    const CHUNK: usize = 64 << 10;

    /// A plan of one worker CPU on loopback, sockets, 64 KiB chunks.
    pub(crate) fn plan() -> Plan {
        Plan {
            schema_version: PLAN_SCHEMA_VERSION,
            host: "test".into(),
            transport: Transport::Sockets,
            numa_node: 0,
            worker_cpus: vec![0],
            control_cpu: None,
            link: LinkPlan { interface: Some("lo".into()), speed_gbps: 10.0, rtt_us: 10.0, speed_assumed: true },
            chunk_size_bytes: CHUNK as u64,
            rdma: None,
            tcp: TcpPlan {
                connections_per_worker: 1,
                io_uring: false,
                ring_entries: 64,
                send_zc: false,
                socket_buffer_bytes: None,
                socket_buffer_needed_bytes: 0,
            },
            arena: ArenaPlan { bytes_per_worker: 1 << 20, backing: ArenaBacking::Normal, hugepages_2m_needed: 0, mlock: false },
            compression: Compression::Off,
            limits: Limits::default(),
            migration: Default::default(),
            daemon: Default::default(),
            reasons: vec![],
        }
    }

    /// A session's part on worker 0: one lane of sockets to a thread that reads and drops
    /// everything; and a round of every page of a `size`-byte region, at `rate` bytes per
    /// second at most.
    fn session(size: u64, rate: Option<f64>) -> (Worker, Arc<Round>, std::thread::JoinHandle<u64>) {
        session_with(size, rate, false, None)
    }

    /// [`session`] over io_uring when `uring`, whose reader reads nothing until `gate`
    /// opens (its sender sends or goes).
    fn session_with(
        size: u64,
        rate: Option<f64>,
        uring: bool,
        gate: Option<std::sync::mpsc::Receiver<()>>,
    ) -> (Worker, Arc<Round>, std::thread::JoinHandle<u64>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let drain = std::thread::spawn(move || {
            if let Some(g) = gate {
                let _ = g.recv();
            }
            let (mut buf, mut n) = (vec![0u8; 1 << 20], 0u64);
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            n
        });
        let keys = Keys::derive(Some(b"k"), Side::Client, &[1; 32], &[2; 32]);
        let tx = Tx::open(vec![Lane::new(c, keys.tx)], uring, 64, false, "test", &mut |_| {});
        let live = crate::live::session(crate::live::Role::Send, 0x9001, 1);
        let w = Worker::new(0, live.worker(0), Encoder::new(Compression::Off), tx);
        let mem = hw::memmap::memfd("pool", size, false).unwrap();
        mem.write_all_at(&vec![7u8; size as usize], 0).unwrap();
        let pages = size / 4096;
        let region = Region {
            memory: mem,
            probe_holes: false,
            size,
            word: 0,
            words: pages.div_ceil(64) as usize,
            sent: crate::migrate::PageHashes::new(pages).unwrap(),
        };
        let round = Arc::new(Round::new(0, Arc::new([region]), CHUNK, Arc::from(&[][..]), true, rate));
        (w, round, drain)
    }

    /// One worker thread, two sessions: one paced to 2 MB/s over 32 MiB (16 s), one
    /// unpaced. The thread takes turns a window at a time, so the unpaced round ends while
    /// the paced one is still going; then the paced one is stopped and ends too, and the
    /// thread has every chunk back.
    #[test]
    fn a_paced_session_does_not_hold_up_another_on_the_same_thread() {
        let pool = Pool::new(&plan()).unwrap();
        assert_eq!(pool.workers(), 1);
        let (wa, ra, drain_a) = session(32 << 20, Some(2e6));
        let (wb, rb, drain_b) = session(32 << 20, None);
        let abort = Arc::new(AtomicBool::new(false));
        let (done_a, woken_a) = Done::new(1, abort.clone()).unwrap();
        let (done_b, woken_b) = Done::new(1, abort.clone()).unwrap();
        let t = Instant::now();
        pool.submit(Task { worker: wa, round: ra.clone(), done: done_a.clone() }).map_err(|e| e.1).unwrap();
        pool.submit(Task { worker: wb, round: rb.clone(), done: done_b.clone() }).map_err(|e| e.1).unwrap();
        woken_b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        wait_for(&woken_b, 1).unwrap();
        let took = t.elapsed();
        let (mut wb, rb_result) = done_b.take().pop().unwrap();
        assert_eq!(rb_result.unwrap().pages, 8192, "the unpaced round sent every page");
        assert!(done_a.take().is_empty(), "the paced round is still going after {took:?}");
        let sent_a = ra.progress.load(Ordering::Relaxed);
        assert!(sent_a < 32 << 20, "the paced round has not finished: {sent_a} bytes");
        ra.feed.stop();
        woken_a.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        wait_for(&woken_a, 1).unwrap();
        let (mut wa, ra_result) = done_a.take().pop().unwrap();
        assert!(ra_result.is_ok());
        assert!(!abort.load(Ordering::Relaxed));
        wa.tx.end_lanes().unwrap();
        wb.tx.end_lanes().unwrap();
        drop((wa, wb));
        assert!(drain_b.join().unwrap() > 32 << 20);
        assert!(drain_a.join().unwrap() >= sent_a);
        drop(pool);
    }

    /// One worker thread, two sessions of 32 MiB: one whose destination reads nothing
    /// (its socket fills and stays full), one that drains. The thread never waits on the
    /// first's full socket, so the second ends while the first is stalled; once the first
    /// destination reads, it ends too. On sockets and on io_uring.
    #[test]
    fn a_stalled_destination_does_not_hold_up_another_session_on_the_same_thread() {
        for uring in [false, true] {
            let pool = Pool::new(&plan()).unwrap();
            let (open, gate) = std::sync::mpsc::channel();
            let (wa, ra, drain_a) = session_with(32 << 20, None, uring, Some(gate));
            let (wb, rb, drain_b) = session_with(32 << 20, None, uring, None);
            if uring && wa.tx.transport() != Transport::Tcp {
                hw::report_skip("io_uring is not to be had here: the stalled-destination case runs on sockets only");
                drop(open);
                continue;
            }
            let abort = Arc::new(AtomicBool::new(false));
            let (done_a, woken_a) = Done::new(1, abort.clone()).unwrap();
            let (done_b, woken_b) = Done::new(1, abort.clone()).unwrap();
            pool.submit(Task { worker: wa, round: ra.clone(), done: done_a.clone() }).map_err(|e| e.1).unwrap();
            pool.submit(Task { worker: wb, round: rb.clone(), done: done_b.clone() }).map_err(|e| e.1).unwrap();
            woken_b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            wait_for(&woken_b, 1).unwrap_or_else(|e| panic!("uring {uring}: the draining session ends while the other is stalled: {e}"));
            let (mut wb, rb_result) = done_b.take().pop().unwrap();
            assert_eq!(rb_result.unwrap().pages, 8192, "uring {uring}: the draining session sent every page");
            assert!(done_a.take().is_empty(), "uring {uring}: the stalled session cannot have ended");
            let sent_a = ra.progress.load(Ordering::Relaxed);
            assert!(sent_a < 32 << 20, "uring {uring}: the stalled session is stalled: {sent_a} bytes");
            drop(open);
            woken_a.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            wait_for(&woken_a, 1).unwrap();
            let (mut wa, ra_result) = done_a.take().pop().unwrap();
            assert_eq!(ra_result.unwrap().pages, 8192, "uring {uring}: the stalled session ends once its destination reads");
            assert!(!abort.load(Ordering::Relaxed));
            wa.tx.end_lanes().unwrap();
            wb.tx.end_lanes().unwrap();
            drop((wa, wb));
            assert!(drain_a.join().unwrap() > 32 << 20 && drain_b.join().unwrap() > 32 << 20);
            drop(pool);
        }
    }

    /// A pool whose arena cannot be locked says why and leaves nothing running.
    #[test]
    fn an_arena_that_cannot_be_had_fails_the_pool() {
        let mut p = plan();
        p.arena.bytes_per_worker = 1 << 50;
        let e = Pool::new(&p).unwrap_err();
        assert!(e.to_string().contains("arena"), "{e}");
    }
}
