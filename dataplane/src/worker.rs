//! The sending worker and what feeds it: one loop for every job and transport. A round's
//! windows (chunk-sized, chunk-aligned pieces of the regions) are claimed by the workers a
//! block at a time from a shared cursor ([`WindowFeed`]); a worker skips the windows that
//! hold no dirty page (none, in round 0 and in a one-shot transfer), reads the dirty pages
//! of the others into a chunk of its arena with `pread` (the guest keeps running; a file
//! that shrinks is an error, not a SIGBUS), encodes them (zero pages as a flag, zstd by the
//! policy), hashes each page as sent, and posts the chunk on one of its lanes
//! ([`crate::transport::Tx`]). At the end of the round each lane says what it carried
//! (ROUND_END). On RDMA the window goes to the transport whole: it reads the pages into a
//! registered slot and writes them into the destination's memory (no frames, no encoder).
//!
//! A worker's round is a sequence of steps ([`Worker::step`]), one window each, so that a
//! thread of the persistent pool ([`crate::pool`]) can take turns between the rounds of
//! several sessions; a paced session that is ahead of its rate waits without holding the
//! thread.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::chunk::Batch;
use crate::conn::SessionError;
use crate::digest::Digest;
use crate::encode::{Compressor, EncodeStats, Encoder};
use crate::engine::PAGE;
use crate::migrate::{PageHashes, RoundCounts};
use crate::transport::Tx;
use crate::transport::rdma::tx::Ready;
use crate::wire;

/// One region of the source (a memory file of a VMM's, or the file a transfer sends) and
/// what ferry keeps for it.
pub(crate) struct Region {
    /// Read with `pread`: no page faults, and holes (never-touched pages of a memfd) read as
    /// zeros without being allocated.
    pub memory: File,
    /// `memory` has a file offset of its own: hole probes (`lseek`) may move it.
    pub probe_holes: bool,
    pub size: u64,
    /// Where this region's words start in the dirty bitmap, and how many it has.
    pub word: usize,
    pub words: usize,
    /// Every page's hash as last sent.
    pub sent: PageHashes,
}

/// Keeps a round's region bytes from running ahead of `rate` per second: a worker asks
/// before each window ([`Pacer::ahead`]) and counts what it sent.
pub(crate) struct Pacer {
    pub start: Instant,
    pub rate: Option<f64>,
    pub sent: AtomicU64,
}

impl Pacer {
    /// When the round is ahead of its rate, the time at which it no longer is.
    pub(crate) fn ahead(&self) -> Option<Instant> {
        let rate = self.rate.filter(|r| *r > 0.0)?;
        // A rate checked positive gives a finite, non-negative delay.
        let after = Duration::try_from_secs_f64(self.sent.load(Ordering::Relaxed) as f64 / rate).ok()?;
        let due = self.start + after;
        (due > Instant::now()).then_some(due)
    }

    pub(crate) fn sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Windows a worker claims at once: few enough that the round's last claims spread over
/// the workers, many enough that a sparse round costs one atomic add per 64 windows.
const CLAIM: u64 = 64;

/// A round's windows, numbered across the regions, claimed by the workers a block at a
/// time from one atomic cursor ([`lockfree::Cursor`]): no queue to fill and no scanning
/// thread, and a round's bookkeeping does not grow with the guest.
pub(crate) struct WindowFeed {
    /// The number of each region's first window, then the total.
    starts: Vec<u64>,
    /// A worker that failed stops it: the others stop claiming windows.
    cursor: lockfree::Cursor,
}

impl WindowFeed {
    pub(crate) fn new(regions: &[Region], chunk: usize) -> WindowFeed {
        let mut starts = Vec::with_capacity(regions.len() + 1);
        let mut at = 0;
        for r in regions {
            starts.push(at);
            at += r.size.div_ceil(chunk as u64);
        }
        starts.push(at);
        WindowFeed { starts, cursor: lockfree::Cursor::new(at, CLAIM) }
    }

    /// The next block of windows, `None` once every window is claimed or the round has
    /// been stopped.
    pub(crate) fn claim(&self) -> Option<Range<u64>> {
        self.cursor.take()
    }

    /// Window `g` of the numbering as (region, window of that region).
    fn window(&self, g: u64) -> (u32, u64) {
        // The last region starting at or before `g` (empty regions start where the next
        // one does, and hold no window).
        let r = self.starts.partition_point(|&s| s <= g) - 1;
        (r as u32, g - self.starts[r])
    }

    pub(crate) fn stop(&self) {
        self.cursor.stop();
    }
}

pub(crate) use lockfree::{AtomicBits, word_mask};

/// Calls `f(first, end)` for each run of consecutive dirty pages in `first..end`, a word of
/// the bitmap at a time (clean words cost one comparison).
pub(crate) fn dirty_runs(dirty: &[u64], first: u64, end: u64, f: &mut impl FnMut(u64, u64)) {
    dirty_runs_of(|k| dirty[k as usize], first, end, f)
}

/// [`dirty_runs`] over a bitmap whose word `k` is `word(k)`.
fn dirty_runs_of(word: impl Fn(u64) -> u64, first: u64, end: u64, f: &mut impl FnMut(u64, u64)) {
    // The dirty bits of the word holding `p`, from `p` on and below `end`.
    let bits_from = |p: u64| (word(p / 64) & word_mask(p / 64, p, end)) >> (p % 64);
    let mut p = first;
    while p < end {
        // Skip to the next dirty page.
        let w = bits_from(p);
        if w == 0 {
            p = (p / 64 + 1) * 64;
            continue;
        }
        p += u64::from(w.trailing_zeros());
        let s = p;
        // Extend over the dirty pages that follow, across words.
        loop {
            let ones = u64::from((!bits_from(p)).trailing_zeros());
            p = (p + ones).min(end);
            // Short of a word's end, or the next word starts clean: the run is over.
            if ones == 0 || p >= end || p % 64 != 0 {
                break;
            }
        }
        f(s, p);
    }
}

/// What every worker shares during one round; owned (the regions and the bitmap behind
/// `Arc`s), so the round can be handed to the pool's threads.
pub(crate) struct Round {
    pub round: u32,
    pub regions: Arc<[Region]>,
    pub chunk: usize,
    pub feed: WindowFeed,
    /// The dirty bitmap (ignored when `all`).
    pub dirty: Arc<[u64]>,
    pub all: bool,
    pub pacer: Pacer,
    /// Region bytes sent so far this round, for a progress bar.
    pub progress: AtomicU64,
    /// The session's last round: each worker ends its lanes (LANE_END) with it, so the
    /// receiving lanes are done by the time the verdict is asked for.
    pub last: bool,
    /// Post-copy: windows near the guest's recent faults, sent ahead of the cursor.
    pub hints: Option<Hints>,
}

/// Windows to send first (post-copy: where the guest faulted lately), each window still
/// sent once: whichever of the hint and the cursor takes it first.
#[derive(Debug)]
pub(crate) struct Hints {
    /// Window numbers (of [`WindowFeed`]'s numbering), pushed by whoever learns of faults.
    pub queue: Arc<crossbeam_queue::ArrayQueue<u64>>,
    /// Windows sent already (of the round's `windows`).
    taken: AtomicBits,
    /// Pages a fault's answer sent already, by their bit in the round's dirty bitmap (their
    /// hashes as sent recorded first): the round leaves them out.
    fetched: Arc<AtomicBits>,
}

impl Hints {
    /// Hints from `queue` for a round of `windows` windows, and the pages `fetched`.
    pub(crate) fn new(queue: Arc<crossbeam_queue::ArrayQueue<u64>>, windows: u64, fetched: Arc<AtomicBits>) -> Hints {
        Hints { queue, taken: AtomicBits::new(windows), fetched }
    }
}

impl Round {
    pub(crate) fn new(round: u32, regions: Arc<[Region]>, chunk: usize, dirty: Arc<[u64]>, all: bool, rate: Option<f64>) -> Round {
        let feed = WindowFeed::new(&regions, chunk);
        let pacer = Pacer { start: Instant::now(), rate, sent: AtomicU64::new(0) };
        Round { round, regions, chunk, feed, dirty, all, pacer, progress: AtomicU64::new(0), last: false, hints: None }
    }

    /// The round's windows, all regions together.
    pub(crate) fn windows(&self) -> u64 {
        *self.feed.starts.last().expect("the total")
    }

    /// The window of [`WindowFeed`]'s numbering that holds page `page` of region `region`.
    pub(crate) fn window_of(regions: &[Region], chunk: usize, region: usize, page: u64) -> u64 {
        let before: u64 = regions[..region].iter().map(|r| r.size.div_ceil(chunk as u64)).sum();
        before + page * PAGE as u64 / chunk as u64
    }

    /// Whether window `w` of region `i` holds a page this round sends.
    fn window_dirty(&self, i: u32, w: u64) -> bool {
        if self.all {
            return true;
        }
        let reg = &self.regions[i as usize];
        let ppw = (self.chunk / PAGE) as u64;
        let (first, end) = (w * ppw, ((w + 1) * ppw).min(reg.size.div_ceil(PAGE as u64)));
        (first / 64..end.div_ceil(64)).any(|k| self.dirty_word(reg, k as usize) & word_mask(k, first, end) != 0)
    }

    /// Word `k` of `reg`'s dirty bits, less the pages a fault's answer sent (post-copy).
    fn dirty_word(&self, reg: &Region, k: usize) -> u64 {
        let w = self.dirty[reg.word + k];
        self.hints.as_ref().map_or(w, |h| w & !h.fetched.word(reg.word + k))
    }

    /// The runs of pages of window `w` of `region` the round sends (its dirty pages, or
    /// all of them), into `runs`; returns their region bytes.
    fn window_runs(&self, runs: &mut Vec<(u64, u64)>, region: u32, w: u64) -> u64 {
        let reg = &self.regions[region as usize];
        let page = PAGE as u64;
        let base = w * self.chunk as u64;
        let (first, end) = (base / page, ((base + self.chunk as u64).min(reg.size)).div_ceil(page));
        runs.clear();
        if self.all {
            runs.push((first, end));
        } else {
            dirty_runs_of(|k| self.dirty_word(reg, k as usize), first, end, &mut |s, e| runs.push((s, e)));
        }
        runs.iter().map(|&(s, e)| (e * page).min(reg.size) - s * page).sum()
    }
}

/// Each page's hash as sent, from the bytes the frame `h` carries of `bytes` (read from
/// offset `from` of `region`).
pub(crate) fn record_sent(sent: &PageHashes, region: u32, from: u64, bytes: &[u8], h: &wire::Header) {
    record_sent_with(crate::digest::Hashing::Fast, sent, region, (from, bytes), h);
}

/// [`record_sent`] with the given hashing (post-copy after RDMA rounds keys its pages).
pub(crate) fn record_sent_with(
    hashing: crate::digest::Hashing<'_>,
    sent: &PageHashes,
    region: u32,
    (from, bytes): (u64, &[u8]),
    h: &wire::Header,
) {
    let page = PAGE as u64;
    let (off, flen) = (h.offset.get(), u64::from(h.raw_len.get()));
    let fp = off / page;
    if h.encoding == wire::Encoding::Zero as u8 {
        for i in 0..flen.div_ceil(page) {
            sent.set(fp + i, Digest::of_zero_page_with(hashing, region, fp + i, (flen - i * page).min(page) as usize));
        }
    } else {
        let rel = (off - from) as usize;
        for (i, pg) in bytes[rel..rel + flen as usize].chunks(PAGE).enumerate() {
            sent.set(fp + i as u64, Digest::of_page_with(hashing, region, fp + i as u64, pg));
        }
    }
}

/// A worker's place in a round: the windows it has claimed and not yet taken, and what it
/// sent so far.
#[derive(Debug, Default)]
pub(crate) struct RoundRun {
    block: Range<u64>,
    counts: RoundCounts,
    enc0: EncodeStats,
    live_zero: u64,
    /// The round's end is queued on the lanes.
    ending: bool,
    /// A window taken from the round that waits for the RDMA lanes' credits. (RDMA asks
    /// for a credit only once it has a window to send: a receiver returns credits in
    /// batches, so a worker that waited for one at its round's end, with nothing left to
    /// write, could wait for good.)
    held: Option<(u32, u64)>,
}

/// Clean windows a step looks at, at most, before it lets the thread's other sessions go.
const SCAN_PER_STEP: usize = 4096;

/// What [`Worker::next_window`] found.
enum Next {
    /// A window holding a page the round sends.
    Window(u32, u64),
    /// Only clean windows so far: look again next step.
    Clean,
}

/// What one step of a round did.
#[derive(Debug)]
pub(crate) enum Step {
    /// Sent a window, or took chunks back: call again.
    Sent,
    /// Could not go on now: ahead of the round's rate (until the time given), or every
    /// spare chunk is in another session's flight.
    Wait(Option<Instant>),
    /// Every lane is busy writing, chunks are in flight and none is spare, or no RDMA
    /// lane has a credit: wait on the lanes' descriptors ([`Tx::wait_fds`]).
    Blocked,
    /// The round is over for this worker: its lanes have ended it.
    Done(Result<RoundCounts, SessionError>),
}

/// A sending worker's part of one session: its lanes, encoder and counters, kept from
/// round to round. Its chunks come from the pool thread that runs it.
pub(crate) struct Worker {
    /// Which of the pool's workers runs it.
    pub index: usize,
    live: crate::live::WorkerCounters,
    pub enc: Encoder,
    pub tx: Tx,
    /// The current window's dirty runs (kept to reuse its allocation).
    runs: Vec<(u64, u64)>,
    /// Per chunk: posted until written, µs.
    pub latency: hdrhistogram::Histogram<u64>,
    /// RDMA: what each lane carried in the last round, for RDMA_END.
    pub rdma_ends: Vec<wire::RdmaLaneEnd>,
}

impl Worker {
    /// Pool worker `index`'s part of a session, sending on `tx`.
    pub(crate) fn new(index: usize, live: crate::live::WorkerCounters, enc: Encoder, tx: Tx) -> Worker {
        Worker { index, live, enc, tx, runs: Vec::new(), latency: crate::engine::latency_histogram(), rdma_ends: Vec::new() }
    }

    /// Where a round starts.
    pub(crate) fn start(&self) -> RoundRun {
        let (enc0, live_zero) = (self.enc.stats, self.enc.stats.zero_pages);
        RoundRun { block: 0..0, counts: RoundCounts::default(), enc0, live_zero, ending: false, held: None }
    }

    /// One step of round `r`: a window read, encoded and posted on the next free lane
    /// (or, on RDMA, written into the destination), chunks taken back, or, once the
    /// round has no more windows for this worker, the round's end on every lane. Chunks
    /// come from and go back to `spare`. A failure stops the round for every worker.
    pub(crate) fn step(&mut self, run: &mut RoundRun, r: &Round, spare: &mut Vec<Batch>, z: &mut Compressor) -> Step {
        match self.try_step(run, r, spare, z) {
            Ok(s) => s,
            Err(e) => {
                r.feed.stop();
                Step::Done(Err(e))
            }
        }
    }

    /// A whole round on the calling thread, waiting where a step must.
    #[cfg(test)]
    pub(crate) fn run_round(&mut self, r: &Round, spare: &mut Vec<Batch>) -> Result<RoundCounts, SessionError> {
        let mut run = self.start();
        let mut z = Compressor::new(r.chunk);
        loop {
            match self.step(&mut run, r, spare, &mut z) {
                Step::Sent => {}
                Step::Wait(_) => std::thread::yield_now(),
                Step::Blocked => {
                    let mut fds = Vec::new();
                    self.tx.wait_fds(&mut fds);
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
                }
                Step::Done(c) => return c,
            }
        }
    }

    /// The next window of the round that holds a page it sends, claiming blocks as needed;
    /// `Clean` after looking at [`SCAN_PER_STEP`] clean windows (so a sparse round of a
    /// large guest does not hold the thread from its other sessions); `None` at the end.
    fn next_window(run: &mut RoundRun, r: &Round) -> Option<Next> {
        if let Some(h) = &r.hints {
            while let Some(g) = h.queue.pop() {
                if g < r.windows() && h.taken.take(g) {
                    let (region, w) = r.feed.window(g);
                    if r.window_dirty(region, w) {
                        return Some(Next::Window(region, w));
                    }
                }
            }
        }
        for _ in 0..SCAN_PER_STEP {
            if let Some(g) = run.block.next() {
                if r.hints.as_ref().is_some_and(|h| !h.taken.take(g)) {
                    continue;
                }
                let (region, w) = r.feed.window(g);
                if r.window_dirty(region, w) {
                    return Some(Next::Window(region, w));
                }
                continue;
            }
            run.block = r.feed.claim()?;
        }
        Some(Next::Clean)
    }

    fn try_step(&mut self, run: &mut RoundRun, r: &Round, spare: &mut Vec<Batch>, z: &mut Compressor) -> Result<Step, SessionError> {
        let rdma = matches!(self.tx, Tx::Rdma(_));
        if !rdma {
            // Chunks the lanes are done with come back first, without waiting.
            let back = self.tx.reap(spare, &mut self.latency)?;
            if spare.is_empty() || !self.tx.ready() {
                return Ok(match (back, self.tx.in_flight()) {
                    (true, _) => Step::Sent,
                    (false, true) => Step::Blocked,
                    // Every spare chunk is in another session's flight.
                    (false, false) => Step::Wait(None),
                });
            }
        }
        let (region, w) = match run.held.take() {
            Some(held) => held,
            None => {
                if let Some(due) = r.pacer.ahead() {
                    return Ok(Step::Wait(Some(due)));
                }
                match Self::next_window(run, r) {
                    Some(Next::Window(region, w)) => (region, w),
                    Some(Next::Clean) => return Ok(Step::Sent),
                    None => return self.end_round(run, r, spare, rdma),
                }
            }
        };
        let c = &mut run.counts;
        if let Tx::Rdma(t) = &mut self.tx {
            let wait = match t.ready()? {
                Ready::Now => None,
                Ready::Later => Some(Step::Wait(None)),
                Ready::Armed => Some(Step::Blocked),
            };
            if let Some(step) = wait {
                run.held = Some((region, w));
                return Ok(step);
            }
            let reg = &r.regions[region as usize];
            let region_bytes = r.window_runs(&mut self.runs, region, w);
            let sent = t.send_window(r.round, reg, (region, w), r.chunk, &self.runs)?;
            r.pacer.sent(region_bytes);
            r.progress.fetch_add(region_bytes, Ordering::Relaxed);
            self.live.add(region_bytes, sent.bytes, sent.imms, sent.zero_pages);
            c.pages += sent.pages;
            c.zero_pages += sent.zero_pages;
            c.wire_bytes += sent.bytes;
            c.frames += sent.imms;
            return Ok(Step::Sent);
        }
        let mut b = spare.pop().expect("a spare chunk");
        if let Err(e) = self.fill(&mut b, r, region, w, z) {
            spare.push(b);
            return Err(e);
        }
        let f = &b.frames;
        r.pacer.sent(f.region_bytes);
        r.progress.fetch_add(f.region_bytes, Ordering::Relaxed);
        self.enc.adaptive.chunk_done(f.region_bytes);
        let zero = self.enc.stats.zero_pages;
        self.live.add(f.region_bytes, f.wire_bytes, b.frames() as u64, zero - run.live_zero);
        run.live_zero = zero;
        c.pages += f.pages;
        c.wire_bytes += f.wire_bytes;
        self.tx.post(b, spare, &mut self.latency)?;
        Ok(Step::Sent)
    }

    /// The round's end on every lane, once the round has no more windows for this worker.
    /// `Blocked` until the lanes have taken it.
    fn end_round(&mut self, run: &mut RoundRun, r: &Round, spare: &mut Vec<Batch>, rdma: bool) -> Result<Step, SessionError> {
        match self.tx.end_round((r.round, r.last), &mut run.ending, spare, &mut self.latency)? {
            Some(ends) => self.rdma_ends = ends,
            None => return Ok(Step::Blocked),
        }
        let mut c = run.counts;
        if !rdma {
            let (enc, enc0) = (self.enc.stats, run.enc0);
            c.zero_pages = enc.zero_pages - enc0.zero_pages;
            c.compressed_in = enc.compressed_in - enc0.compressed_in;
            c.compressed_out = enc.compressed_out - enc0.compressed_out;
            c.frames = enc.frames - enc0.frames;
        }
        Ok(Step::Done(Ok(c)))
    }

    /// Takes back every chunk the lanes still hold (a failed round's, whose sends are
    /// cancelled), so the pool thread keeps all of its arena.
    pub(crate) fn reclaim(&mut self, spare: &mut Vec<Batch>) {
        self.tx.reclaim(spare);
    }

    /// Reads window `w` of `region` (its dirty pages, or all of them) into `b` and encodes
    /// it, recording each page's hash as sent.
    fn fill(&mut self, b: &mut Batch, r: &Round, region: u32, w: u64, z: &mut Compressor) -> Result<(), SessionError> {
        let reg = &r.regions[region as usize];
        let page = PAGE as u64;
        let base = w * r.chunk as u64;
        b.clear(base);
        r.window_runs(&mut self.runs, region, w);
        for &(s, e) in &self.runs {
            let (from, to) = (s * page, (e * page).min(reg.size));
            let at = (from - base) as usize;
            let len = (to - from) as usize;
            let fr = &mut b.frames;
            // Memory the guest never touched is a hole in its memfd: a zero frame, without
            // reading or scanning it (one lseek per run).
            if reg.probe_holes && crate::digest::is_hole(&reg.memory, from, len as u64) {
                for i in 0..(len as u64).div_ceil(page) {
                    reg.sent.set(s + i, Digest::of_zero_page(region, s + i, (len as u64 - i * page).min(page) as usize));
                }
                fr.push(wire::Header::data(wire::Encoding::Zero, region, from, len as u32, 0).seal(&[]), &[]);
                self.enc.stats.zero_pages += e - s;
                self.enc.stats.frames += 1;
                fr.pages += e - s;
                fr.region_bytes += len as u64;
                continue;
            }
            // The guest may be writing these pages: what is sent is this copy, so its
            // checksum, its tag and the bytes on the wire agree.
            reg.memory
                .read_exact_at(&mut b.data[at..at + len], from)
                .map_err(|e| SessionError::io(format!("reading region {region} at offset {from}"), e))?;
            let (sent, bytes, fr) = (&reg.sent, &b.data[at..at + len], &mut b.frames);
            self.enc
                .encode::<()>(z, region, from, PAGE, bytes, &mut |h, p| {
                    record_sent(sent, region, from, bytes, &h);
                    fr.push(h, p);
                    Ok(())
                })
                .expect("the frame sink cannot fail");
            fr.pages += e - s;
            fr.region_bytes += len as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_runs() {
        assert_eq!(word_mask(0, 0, 64), u64::MAX);
        assert_eq!(word_mask(0, 3, 5), 0b11000);
        assert_eq!(word_mask(1, 60, 70), 0b111111);
        assert_eq!(word_mask(2, 60, 70), 0);
        let dirty = [0b1011_0000u64, 1 | 1 << 63];
        let mut runs = Vec::new();
        dirty_runs(&dirty, 0, 128, &mut |s, e| runs.push((s, e)));
        assert_eq!(runs, vec![(4, 6), (7, 8), (64, 65), (127, 128)]);
        runs.clear();
        dirty_runs(&dirty, 5, 64, &mut |s, e| runs.push((s, e)));
        assert_eq!(runs, vec![(5, 6), (7, 8)]);
        // Runs across words, and a range ending inside a run.
        let dirty = [u64::MAX << 60, u64::MAX, 0b111, 0, 1 << 63];
        runs.clear();
        dirty_runs(&dirty, 0, 320, &mut |s, e| runs.push((s, e)));
        assert_eq!(runs, vec![(60, 131), (319, 320)]);
        runs.clear();
        dirty_runs(&dirty, 62, 100, &mut |s, e| runs.push((s, e)));
        assert_eq!(runs, vec![(62, 100)]);
    }

    /// The word-at-a-time runs agree with a bit-at-a-time reading on random bitmaps.
    #[test]
    fn dirty_runs_match_bits() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200 {
            let words: Vec<u64> = (0..5)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Sparse, dense and mixed words.
                    match x % 3 {
                        0 => x & (x >> 3),
                        1 => x | (x >> 5),
                        _ => x,
                    }
                })
                .collect();
            let (first, end) = (x % 97, 97 + (x >> 8) % 223);
            let mut got = vec![false; 320];
            dirty_runs(&words, first, end, &mut |s, e| {
                assert!(s < e && first <= s && e <= end);
                for p in s..e {
                    got[p as usize] = true;
                }
            });
            for p in 0..320u64 {
                let bit = p >= first && p < end && words[(p / 64) as usize] >> (p % 64) & 1 == 1;
                assert_eq!(got[p as usize], bit, "page {p} of {words:x?} in {first}..{end}");
            }
        }
    }

    /// Regions of `sizes` bytes (memfds, holes), with their bitmap words one after another.
    fn regions(sizes: &[u64]) -> Arc<[Region]> {
        let mut word = 0;
        sizes
            .iter()
            .map(|&size| {
                let pages = size.div_ceil(PAGE as u64);
                let words = pages.div_ceil(64) as usize;
                let r = Region {
                    memory: hw::memmap::memfd("feed", size, false).unwrap(),
                    probe_holes: true,
                    size,
                    word,
                    words,
                    sent: PageHashes::new(pages).unwrap(),
                };
                word += words;
                r
            })
            .collect()
    }

    /// Three workers claiming blocks from one cursor: every window of every region
    /// (empty ones and ragged ends included) reaches exactly one of them, as the right
    /// (region, window).
    #[test]
    fn window_feed_hands_each_window_to_one_worker() {
        let chunk = 64 << 10;
        let sizes = [0, 5 << 20, 0, (3 << 20) + 4096, 100 << 20, 4096];
        let regions = regions(&sizes);
        let feed = WindowFeed::new(&regions, chunk);
        let taken: Vec<Vec<(u32, u64)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        while let Some(block) = feed.claim() {
                            got.extend(block.map(|g| feed.window(g)));
                        }
                        got
                    })
                })
                .collect();
            workers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<(u32, u64)> = taken.into_iter().flatten().collect();
        all.sort_unstable();
        let want: Vec<(u32, u64)> =
            sizes.iter().enumerate().flat_map(|(i, &size)| (0..size.div_ceil(chunk as u64)).map(move |w| (i as u32, w))).collect();
        assert_eq!(all, want);
    }

    /// Two regions (8 MiB and 1 MiB, 64 KiB windows) and a round of them with dirty pages
    /// in region 0's windows 0, 1 and 127 (pages 0, 17, 2047) and region 1's window 15 (page
    /// 255; its words are 32..36).
    fn four_dirty_windows() -> Round {
        let mut dirty = vec![0u64; 36];
        dirty[0] |= 1 | 1 << 17;
        dirty[31] |= 1 << 63;
        dirty[35] |= 1 << 63;
        Round::new(1, regions(&[8 << 20, 1 << 20]), 64 << 10, dirty.into(), false, None)
    }

    /// Every window a round hands out, in order.
    fn windows_of(r: &Round) -> Vec<(u32, u64)> {
        let mut run = RoundRun::default();
        std::iter::from_fn(|| Worker::next_window(&mut run, r))
            .filter_map(|n| match n {
                Next::Window(region, w) => Some((region, w)),
                Next::Clean => None,
            })
            .collect()
    }

    /// Hinted windows (post-copy: near the guest's faults) go first, and the cursor skips
    /// them after: each window once; a hint of a clean window or out of range is dropped.
    #[test]
    fn hinted_windows_go_first_and_once() {
        let mut r = four_dirty_windows();
        let q = Arc::new(crossbeam_queue::ArrayQueue::new(8));
        // Region 1's page 255 (its window 15), a clean window, one past the end.
        for g in [Round::window_of(&r.regions, r.chunk, 1, 255), 5, 10_000] {
            q.push(g).unwrap();
        }
        r.hints = Some(Hints::new(q, r.windows(), Arc::new(AtomicBits::new(36 * 64))));
        assert_eq!(windows_of(&r), vec![(1, 15), (0, 0), (0, 1), (0, 127)]);
    }

    /// Post-copy: pages a fault's answer sent are left out of the push; a window left with
    /// none is skipped.
    #[test]
    fn pages_a_fault_fetched_are_not_pushed() {
        let mut r = four_dirty_windows();
        let fetched = Arc::new(AtomicBits::new(36 * 64));
        // Region 0's page 17 (window 1's only dirty page) and region 1's page 255 (its
        // bit is region 1's word 3, bit 63).
        fetched.take(17);
        fetched.take((32 + 3) * 64 + 63);
        r.hints = Some(Hints::new(Arc::new(crossbeam_queue::ArrayQueue::new(8)), r.windows(), fetched.clone()));
        assert_eq!(windows_of(&r), vec![(0, 0), (0, 127)]);
        let mut runs = Vec::new();
        // Window 0 of region 0 still sends page 0; a page fetched there later is left out.
        assert_eq!(r.window_runs(&mut runs, 0, 0), PAGE as u64);
        assert_eq!(runs, vec![(0, 1)]);
        fetched.take(0);
        assert_eq!(r.window_runs(&mut runs, 0, 0), 0);
        assert!(runs.is_empty());
    }

    /// A round takes the windows holding a dirty page and no other; a stopped round
    /// hands out nothing more.
    #[test]
    fn a_round_takes_the_dirty_windows_and_stops() {
        let chunk = 64 << 10;
        let r = four_dirty_windows();
        assert_eq!(windows_of(&r), vec![(0, 0), (0, 1), (0, 127), (1, 15)]);
        // A sparse round of a large region: a step looks at SCAN_PER_STEP clean windows at
        // most, then lets other sessions go; the dirty window is found on a later step.
        let big = self::regions(&[(SCAN_PER_STEP as u64 + 100) * chunk as u64]);
        let words = big[0].words;
        let mut dirty = vec![0u64; words];
        dirty[words - 1] |= 1 << 63;
        let pages = big[0].size / PAGE as u64;
        let last_window = (pages - 1) / (chunk / PAGE) as u64;
        assert_eq!(pages % 64, 0, "the last bit is the last page");
        let sparse = Round::new(1, big, chunk, dirty.into(), false, None);
        let mut run = RoundRun::default();
        assert!(matches!(Worker::next_window(&mut run, &sparse), Some(Next::Clean)));
        assert!(matches!(Worker::next_window(&mut run, &sparse), Some(Next::Window(0, w)) if w == last_window));
        assert!(Worker::next_window(&mut run, &sparse).is_none());
        let r = Round::new(0, r.regions.clone(), chunk, Arc::from(&[][..]), true, None);
        assert!(r.feed.claim().is_some());
        r.feed.stop();
        assert_eq!(r.feed.claim(), None);
    }

    /// The transport contract, the same suite for the mock ([`crate::transport::mock`])
    /// and every TCP transport (plain sockets, io_uring, io_uring with zero-copy sends):
    /// a worker sending rounds over two lanes to checking receivers. Every page of the region arrives once per round, intact (tags and
    /// CRCs checked, payloads decoded and compared with the source), each lane's
    /// ROUND_END equals what it carried, every chunk comes back to the worker's spares, and
    /// a receiver that goes away mid-round is an error, not a hang. (RDMA keeps the same
    /// contract through whole sessions in the Soft-RoCE guest: `control/tests/rxe_transfer.rs`.)
    mod contract {
        use std::collections::BTreeMap;
        use std::io::Read;
        use std::net::{TcpListener, TcpStream};
        use std::os::unix::fs::FileExt;
        use std::sync::Mutex;
        use std::time::Duration;

        use super::super::*;
        use crate::conn::FrameReader;
        use crate::encode::Decoder;
        use crate::plan::Compression;
        use crate::session::seal::{Keys, Side};
        use crate::transport::{Lane, Tx};
        use crate::wire::{Encoding, Kind};

        const CHUNK: usize = 64 << 10;
        const PAGES: u64 = 1000;

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Kind3 {
            Mock,
            Sockets,
            Uring,
            UringZeroCopy,
        }

        /// Guest-like memory: random, text-like (compressible) and zero pages, and a short
        /// last page.
        fn region() -> (File, Vec<u8>) {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut data = Vec::new();
            for p in 0..PAGES {
                for i in 0..PAGE / 8 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let w = match p % 4 {
                        0 => 0,
                        1 => u64::from_le_bytes(*b"ferry.. ") ^ (i as u64 % 3),
                        _ => x,
                    };
                    data.extend_from_slice(&w.to_le_bytes());
                }
            }
            data.truncate(data.len() - 100);
            let f = hw::memmap::memfd("contract", data.len() as u64, false).unwrap();
            f.write_all_at(&data, 0).unwrap();
            (f, data)
        }

        /// What a lane's ROUND_END said against what the lane carried: (frames said,
        /// frames seen, bytes said, bytes seen, pages said less pages seen).
        type RoundSeen = (u64, u64, u64, u64, u64);

        /// A receiver for one lane: checks every frame, decodes it into `dest`, and at each
        /// ROUND_END reports what arrived and what it said on `ends`, until LANE_END.
        fn receive(
            mut s: Box<dyn Read + Send>,
            rx: crate::session::seal::Seal,
            dest: &Mutex<Vec<u8>>,
            counts: &Mutex<BTreeMap<u64, u32>>,
            stop_after: Option<u64>,
            ends: std::sync::mpsc::Sender<RoundSeen>,
        ) -> Result<(), SessionError> {
            let max = wire::max_payload_for(CHUNK as u32);
            let mut r = FrameReader::new(1 << 20, max, rx);
            let mut dec = Decoder::default();
            let (mut frames, mut bytes, mut pages) = (0u64, 0u64, 0u64);
            loop {
                let (h, kind, payload) = r.next(&mut s, "contract")?;
                match kind {
                    Kind::Data => {
                        frames += 1;
                        if stop_after.is_some_and(|n| frames >= n) {
                            // The receiver goes away mid-round (a socket closed with
                            // unread data is reset).
                            return Ok(());
                        }
                        let (off, raw) = (h.offset.get(), h.raw_len.get() as usize);
                        bytes += (wire::HEADER_LEN + payload.len() + crate::session::seal::TAG_LEN) as u64;
                        pages += raw.div_ceil(PAGE) as u64;
                        let mut d = dest.lock().unwrap();
                        let at = off as usize;
                        match h.encoding().unwrap() {
                            Encoding::Zero => d[at..at + raw].fill(0),
                            Encoding::Raw => d[at..at + raw].copy_from_slice(payload),
                            Encoding::Zstd => d[at..at + raw].copy_from_slice(dec.zstd(payload, raw as u32).unwrap()),
                        }
                        let mut c = counts.lock().unwrap();
                        for p in off / PAGE as u64..(off + raw as u64).div_ceil(PAGE as u64) {
                            *c.entry(p).or_default() += 1;
                        }
                    }
                    Kind::RoundEnd => {
                        let e: wire::RoundEnd = wire::parse(Kind::RoundEnd, payload).unwrap();
                        let _ = ends.send((e.frames.get(), frames, e.bytes.get(), bytes, e.pages.get() - pages));
                        (frames, bytes, pages) = (0, 0, 0);
                    }
                    Kind::LaneEnd => return Ok(()),
                    k => panic!("unexpected {k:?}"),
                }
            }
        }

        type ReadEnd = (Box<dyn Read + Send>, crate::session::seal::Seal);

        /// A worker on `n` lanes of transport `kind`, and the lanes' reading ends; `None`
        /// (said) where io_uring is not to be had.
        fn setup(kind: Kind3, n: usize, compression: Compression) -> Option<(Worker, Vec<ReadEnd>)> {
            let keys = |i: usize| {
                let nonce = [i as u8; 32];
                (Keys::derive(Some(b"k"), Side::Client, &nonce, &nonce), Keys::derive(Some(b"k"), Side::Server, &nonce, &nonce))
            };
            let mut rx: Vec<ReadEnd> = Vec::new();
            let tx = if kind == Kind3::Mock {
                let mut lanes = Vec::new();
                for i in 0..n {
                    let (w, r) = crate::transport::mock::pipe(4);
                    let (kc, ks) = keys(i);
                    lanes.push((w, kc.tx));
                    rx.push((Box::new(r), ks.rx));
                }
                Tx::Mock(Box::new(crate::transport::mock::MockTx::new(lanes)))
            } else {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let mut lanes = Vec::new();
                for i in 0..n {
                    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                    let (s, _) = l.accept().unwrap();
                    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                    // A receiver waiting for a LANE_END that never comes fails, not hangs.
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let (kc, ks) = keys(i);
                    lanes.push(Lane::new(c, kc.tx));
                    rx.push((Box::new(s), ks.rx));
                }
                let uring = kind != Kind3::Sockets;
                let mut why = None;
                let tx = Tx::open(lanes, uring, 64, kind == Kind3::UringZeroCopy, "contract", &mut |w| why = Some(w));
                if uring && tx.transport() != crate::plan::Transport::Tcp {
                    hw::report_skip(&format!("{kind:?}: {}", why.unwrap_or_default()));
                    return None;
                }
                tx
            };
            let live = crate::live::session(crate::live::Role::Send, 0xc0, 1);
            Some((Worker::new(0, live.worker(0), Encoder::new(compression), tx), rx))
        }

        /// What a pool thread lends its workers: chunks enough for `lanes` with zero copy.
        fn chunks(lanes: usize) -> Vec<Batch> {
            let n = Tx::chunks_for(lanes, true);
            let arena = hw::memmap::Arena::new(2 * CHUNK * n, hw::memmap::ArenaKind::Normal, false, None).unwrap().0;
            let mut slots = arena.into_slots(CHUNK);
            std::iter::from_fn(|| Some(Batch::new(slots.pop()?, slots.pop()?))).collect()
        }

        fn run(
            w: &mut Worker,
            spare: &mut Vec<Batch>,
            regions: &Arc<[Region]>,
            round: u32,
            dirty: &[u64],
            (all, last): (bool, bool),
        ) -> Result<RoundCounts, SessionError> {
            let mut r = Round::new(round, regions.clone(), CHUNK, Arc::from(dirty), all, None);
            r.last = last;
            w.run_round(&r, spare)
        }

        #[test]
        fn every_transport_keeps_the_contract() {
            for kind in [Kind3::Mock, Kind3::Sockets, Kind3::Uring, Kind3::UringZeroCopy] {
                let (mem, data) = region();
                let size = data.len() as u64;
                let pages = size.div_ceil(PAGE as u64);
                let regions: Arc<[Region]> = Arc::new([Region {
                    memory: mem.try_clone().unwrap(),
                    probe_holes: false,
                    size,
                    word: 0,
                    words: pages.div_ceil(64) as usize,
                    sent: crate::migrate::PageHashes::new(pages).unwrap(),
                }]);
                let Some((w, rx)) = setup(kind, 2, Compression::Zstd { level: 1 }) else { continue };
                let mut spare = chunks(2);
                let lent = spare.len();
                let dest = Mutex::new(vec![0xeeu8; data.len()]);
                let counts = Mutex::new(BTreeMap::new());
                // Round 0: every page; round 1: pages 3, 500..520 and the last, changed first.
                let changed: Vec<u64> = [3].into_iter().chain(500..520).chain([pages - 1]).collect();
                let mut dirty = vec![0u64; pages.div_ceil(64) as usize];
                for &p in &changed {
                    dirty[(p / 64) as usize] |= 1 << (p % 64);
                }
                let (ends_tx, ends) = std::sync::mpsc::channel();
                // Both lanes' ROUND_END for a round: every frame before it has been taken.
                let round_ends = || {
                    (0..2)
                        .map(|_| ends.recv_timeout(Duration::from_secs(30)).expect("a ROUND_END on each lane"))
                        .collect::<Vec<RoundSeen>>()
                };
                let check = |seen: Vec<RoundSeen>| {
                    for (said_frames, frames, said_bytes, bytes, page_gap) in seen {
                        assert_eq!(
                            (said_frames, said_bytes, page_gap),
                            (frames, bytes, 0),
                            "{kind:?}: ROUND_END equals what the lane carried"
                        );
                    }
                };
                std::thread::scope(|s| {
                    let receivers: Vec<_> = rx
                        .into_iter()
                        .map(|(sock, seal)| {
                            let (dest, counts, ends_tx) = (&dest, &counts, ends_tx.clone());
                            s.spawn(move || receive(sock, seal, dest, counts, None, ends_tx))
                        })
                        .collect();
                    // Owned here: a failed assertion drops the lanes, and the receivers end.
                    let mut w = w;
                    let c0 = run(&mut w, &mut spare, &regions, 0, &[], (true, false)).unwrap();
                    assert_eq!(c0.pages, pages, "{kind:?}: round 0 carries every page");
                    check(round_ends());
                    assert_eq!(counts.lock().unwrap().len() as u64, pages, "{kind:?}: every page");
                    assert!(counts.lock().unwrap().values().all(|&n| n == 1), "{kind:?}: each page once");
                    let new_page = [0x5au8; PAGE];
                    for &p in &changed {
                        let len = (size - p * PAGE as u64).min(PAGE as u64) as usize;
                        mem.write_all_at(&new_page[..len], p * PAGE as u64).unwrap();
                    }
                    counts.lock().unwrap().clear();
                    // The last round: the worker ends its lanes with it.
                    let c1 = run(&mut w, &mut spare, &regions, 1, &dirty, (false, true)).unwrap();
                    assert_eq!(c1.pages, changed.len() as u64, "{kind:?}");
                    check(round_ends());
                    assert_eq!(counts.lock().unwrap().keys().copied().collect::<Vec<_>>(), changed, "{kind:?}: the dirty pages");
                    assert!(counts.lock().unwrap().values().all(|&n| n == 1), "{kind:?}: each dirty page once");
                    assert_eq!(spare.len(), lent, "{kind:?}: every chunk came back");
                    // Each receiver saw LANE_END after the last round (nothing else ends them).
                    for h in receivers {
                        h.join().unwrap().unwrap();
                    }
                });
                let mut now = data.clone();
                for &p in &changed {
                    let len = (size - p * PAGE as u64).min(PAGE as u64) as usize;
                    now[(p * PAGE as u64) as usize..][..len].fill(0x5a);
                }
                assert!(*dest.lock().unwrap() == now, "{kind:?}: the destination holds the source");
            }
        }

        #[test]
        fn a_receiver_that_goes_away_mid_round_is_an_error_on_every_transport() {
            for kind in [Kind3::Mock, Kind3::Sockets, Kind3::Uring, Kind3::UringZeroCopy] {
                // Larger than the socket buffers, so the sender must notice.
                let big = 64u64 << 20;
                let mem = hw::memmap::memfd("contract-big", big, false).unwrap();
                let page: Vec<u8> = (0..PAGE).map(|i| (i * 7 % 251) as u8 + 1).collect();
                for p in 0..big / PAGE as u64 {
                    mem.write_all_at(&page, p * PAGE as u64).unwrap();
                }
                let pages = big / PAGE as u64;
                let regions: Arc<[Region]> = Arc::new([Region {
                    memory: mem,
                    probe_holes: false,
                    size: big,
                    word: 0,
                    words: pages.div_ceil(64) as usize,
                    sent: crate::migrate::PageHashes::new(pages).unwrap(),
                }]);
                let Some((mut w, rx)) = setup(kind, 2, Compression::Off) else { continue };
                let mut spare = chunks(2);
                let lent = spare.len();
                let (dest, counts) = (Mutex::new(vec![0u8; big as usize]), Mutex::new(BTreeMap::new()));
                let r = std::thread::scope(|s| {
                    for (sock, seal) in rx {
                        let (dest, counts) = (&dest, &counts);
                        let ends = std::sync::mpsc::channel().0;
                        s.spawn(move || receive(sock, seal, dest, counts, Some(3), ends));
                    }
                    run(&mut w, &mut spare, &regions, 0, &[], (true, false))
                });
                let err = r.expect_err("the round must fail");
                // The peer's going away is the error, not a write timeout that expired.
                assert!(matches!(err, SessionError::PeerClosed { .. }), "{kind:?}: {err}");
                // What the lanes still held comes back (the pool thread keeps its arena).
                w.reclaim(&mut spare);
                assert_eq!(spare.len(), lent, "{kind:?}: every chunk came back after the failure");
            }
        }
    }
}
