//! The sending worker and what feeds it: one loop for every job and transport. A round's
//! control thread finds the chunk-sized windows that hold a dirty page (every window, in
//! round 0 and in a one-shot transfer) and hands them over a bounded lock-free queue
//! ([`WindowFeed`]); each worker takes windows in turn, reads their dirty pages into a
//! chunk of its arena with `pread` (the guest keeps running; a file that shrinks is an
//! error, not a SIGBUS), encodes them (zero pages as a flag, zstd by the policy), hashes
//! each page as sent, and posts the chunk on one of its lanes ([`crate::transport::Tx`]).
//! At the end of the round each lane says what it carried (ROUND_END). On RDMA the window
//! goes to the transport whole: it reads the pages into a registered slot and writes them
//! into the destination's memory (no frames, no encoder).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::chunk::Batch;
use crate::conn::SessionError;
use crate::digest::Digest;
use crate::encode::Encoder;
use crate::engine::PAGE;
use crate::migrate::{PageHashes, RoundCounts};
use crate::transport::Tx;
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

/// Spaces writes so that the round's region bytes never run ahead of `rate` per second.
pub(crate) struct Pacer {
    pub start: Instant,
    pub rate: Option<f64>,
    pub sent: AtomicU64,
}

impl Pacer {
    pub(crate) fn pace(&self, bytes: u64) {
        if let Some(rate) = self.rate.filter(|r| *r > 0.0) {
            let total = self.sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
            // A rate checked positive gives a finite, non-negative delay.
            let Ok(after) = Duration::try_from_secs_f64(total as f64 / rate) else { return };
            let due = self.start + after;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
}

/// Windows the feed holds at most: a full queue makes the scanning thread wait for the
/// workers, so a round's work list never grows with the guest.
pub(crate) const WINDOW_QUEUE: usize = 4096;

/// A round's dirty windows, from the control thread that scans the bitmap to the workers
/// that send them: a bounded lock-free queue, so sending starts with the first dirty
/// window found rather than after the whole bitmap has been scanned.
pub(crate) struct WindowFeed {
    queue: ArrayQueue<(u32, u64)>,
    /// The scan is over: once the queue is empty, so is the round.
    pub scanned: AtomicBool,
    /// A worker failed: the others stop taking windows and the scan stops.
    pub stop: AtomicBool,
}

impl WindowFeed {
    pub(crate) fn new(capacity: usize) -> WindowFeed {
        WindowFeed { queue: ArrayQueue::new(capacity), scanned: AtomicBool::new(false), stop: AtomicBool::new(false) }
    }

    /// Queues a window, waiting while the queue is full; false once the round is stopped.
    pub(crate) fn push(&self, mut w: (u32, u64)) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            match self.queue.push(w) {
                Ok(()) => return true,
                Err(back) => {
                    w = back;
                    std::thread::yield_now();
                }
            }
        }
    }

    /// The next window, waiting while the scan may still find one; `None` when the round
    /// has no more, or was stopped.
    pub(crate) fn pop(&self) -> Option<(u32, u64)> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(w) = self.queue.pop() {
                return Some(w);
            }
            // Acquire pairs with the scan's release store: every window it queued before
            // is visible to the pop below.
            if self.scanned.load(Ordering::Acquire) {
                return self.queue.pop();
            }
            std::thread::yield_now();
        }
    }
}

/// The bits of bitmap word `i` that fall in pages `first..end`.
pub(crate) fn word_mask(i: u64, first: u64, end: u64) -> u64 {
    let lo = first.saturating_sub(i * 64).min(64);
    let hi = end.saturating_sub(i * 64).min(64);
    if hi <= lo {
        return 0;
    }
    let upto = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upto & !((1u64 << lo) - 1)
}

/// Calls `f(first, end)` for each run of consecutive dirty pages in `first..end`, a word of
/// the bitmap at a time (clean words cost one comparison).
pub(crate) fn dirty_runs(dirty: &[u64], first: u64, end: u64, f: &mut impl FnMut(u64, u64)) {
    // The dirty bits of the word holding `p`, from `p` on and below `end`.
    let bits_from = |p: u64| (dirty[(p / 64) as usize] & word_mask(p / 64, p, end)) >> (p % 64);
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

/// Scans the regions' dirty bitmaps (every page when `all`) and queues each chunk-sized,
/// chunk-aligned window that holds a dirty page; marks the feed scanned at the end.
pub(crate) fn scan(regions: &[Region], dirty: &[u64], all: bool, chunk: usize, feed: &WindowFeed) {
    let ppw = (chunk / PAGE) as u64;
    'scan: for (i, r) in regions.iter().enumerate() {
        let pages = r.size.div_ceil(PAGE as u64);
        let bits = if all { &[][..] } else { &dirty[r.word..r.word + r.words] };
        for w in 0..pages.div_ceil(ppw) {
            let (first, end) = (w * ppw, ((w + 1) * ppw).min(pages));
            if (all || (first / 64..end.div_ceil(64)).any(|k| bits[k as usize] & word_mask(k, first, end) != 0))
                && !feed.push((i as u32, w))
            {
                break 'scan;
            }
        }
    }
    feed.scanned.store(true, Ordering::Release);
}

/// The runs of pages of window `w` of `region` a round sends (its dirty pages, or all of
/// them), into `runs`; returns their region bytes.
fn window_runs(runs: &mut Vec<(u64, u64)>, r: &Round<'_>, region: u32, w: u64) -> u64 {
    let reg = &r.regions[region as usize];
    let page = PAGE as u64;
    let base = w * r.chunk as u64;
    let (first, end) = (base / page, ((base + r.chunk as u64).min(reg.size)).div_ceil(page));
    runs.clear();
    if r.all {
        runs.push((first, end));
    } else {
        dirty_runs(&r.dirty[reg.word..reg.word + reg.words], first, end, &mut |s, e| runs.push((s, e)));
    }
    runs.iter().map(|&(s, e)| (e * page).min(reg.size) - s * page).sum()
}

/// What every worker shares during one round.
pub(crate) struct Round<'a> {
    pub round: u32,
    pub regions: &'a [Region],
    pub chunk: usize,
    pub feed: &'a WindowFeed,
    /// The dirty bitmap (ignored when `all`).
    pub dirty: &'a [u64],
    pub all: bool,
    pub pacer: &'a Pacer,
    /// Region bytes sent so far, for a progress bar.
    pub progress: Option<&'a AtomicU64>,
}

/// A sending worker of one session: its CPU, lanes, encoder, chunks and counters, kept
/// from round to round.
pub(crate) struct Worker {
    pub cpu: u32,
    live: crate::live::WorkerCounters,
    pub enc: Encoder,
    pub tx: Tx,
    spare: Vec<Batch>,
    /// The current window's dirty runs (kept to reuse its allocation).
    runs: Vec<(u64, u64)>,
    /// Per chunk: posted until written, µs.
    pub latency: hdrhistogram::Histogram<u64>,
    /// RDMA: what each lane carried in the last round, for RDMA_END.
    pub rdma_ends: Vec<wire::RdmaLaneEnd>,
}

impl Worker {
    /// A worker sending on `tx`, with chunks cut from `arena` (two slots of `chunk` bytes
    /// each: the window as read, and its compressed payloads); RDMA lanes bring registered
    /// slots of their own, and no arena.
    pub(crate) fn new(
        cpu: u32,
        live: crate::live::WorkerCounters,
        enc: Encoder,
        tx: Tx,
        arena: Option<hw::memmap::Arena>,
        chunk: usize,
    ) -> Worker {
        let mut spare = Vec::new();
        if let Some(arena) = arena {
            let mut slots = arena.into_slots(chunk);
            while slots.len() >= 2 && spare.len() < tx.chunks_wanted() {
                let (d, s) = (slots.pop().expect("two"), slots.pop().expect("two"));
                spare.push(Batch::new(d, s));
            }
        }
        Worker { cpu, live, enc, tx, spare, runs: Vec::new(), latency: crate::engine::latency_histogram(), rdma_ends: Vec::new() }
    }

    /// Arena bytes a worker on `tx` needs for chunks of `chunk` bytes.
    pub(crate) fn arena_bytes(tx: &Tx, chunk: usize) -> usize {
        2 * chunk * tx.chunks_wanted()
    }

    /// Sends this worker's share of a round: windows in turn from the feed, each read,
    /// encoded and posted on the next free lane (or, on RDMA, written into the
    /// destination); then the round's end on every lane.
    pub(crate) fn run_round(&mut self, r: &Round<'_>) -> Result<RoundCounts, SessionError> {
        let enc0 = self.enc.stats;
        let mut live_zero = enc0.zero_pages;
        let mut c = RoundCounts::default();
        let rdma = matches!(self.tx, Tx::Rdma(_));
        loop {
            if !rdma && self.spare.is_empty() {
                self.tx.reap(&mut self.spare, &mut self.latency)?;
                continue;
            }
            let Some((region, w)) = r.feed.pop() else { break };
            if let Tx::Rdma(t) = &mut self.tx {
                let reg = &r.regions[region as usize];
                let region_bytes = window_runs(&mut self.runs, r, region, w);
                let sent = t.send_window(r.round, &reg.memory, reg.probe_holes, reg.size, region, w, r.chunk, &self.runs, &reg.sent)?;
                r.pacer.pace(region_bytes);
                self.live.add(region_bytes, sent.bytes, sent.imms, sent.zero_pages);
                if let Some(p) = r.progress {
                    p.fetch_add(region_bytes, Ordering::Relaxed);
                }
                c.pages += sent.pages;
                c.zero_pages += sent.zero_pages;
                c.wire_bytes += sent.bytes;
                c.frames += sent.imms;
                continue;
            }
            let mut b = self.spare.pop().expect("a spare chunk");
            if let Err(e) = self.fill(&mut b, r, region, w) {
                self.spare.push(b);
                return Err(e);
            }
            let f = &b.frames;
            r.pacer.pace(f.region_bytes);
            self.enc.adaptive.chunk_done(f.region_bytes);
            let zero = self.enc.stats.zero_pages;
            self.live.add(f.region_bytes, f.wire_bytes, b.frames() as u64, zero - live_zero);
            live_zero = zero;
            if let Some(p) = r.progress {
                p.fetch_add(f.region_bytes, Ordering::Relaxed);
            }
            c.pages += f.pages;
            c.wire_bytes += f.wire_bytes;
            self.tx.post(b, &mut self.spare, &mut self.latency)?;
        }
        self.rdma_ends = self.tx.end_round(r.round, &mut self.spare, &mut self.latency)?;
        if !rdma {
            let enc = self.enc.stats;
            c.zero_pages = enc.zero_pages - enc0.zero_pages;
            c.compressed_in = enc.compressed_in - enc0.compressed_in;
            c.compressed_out = enc.compressed_out - enc0.compressed_out;
            c.frames = enc.frames - enc0.frames;
        }
        Ok(c)
    }

    /// Reads window `w` of `region` (its dirty pages, or all of them) into `b` and encodes
    /// it, recording each page's hash as sent.
    fn fill(&mut self, b: &mut Batch, r: &Round<'_>, region: u32, w: u64) -> Result<(), SessionError> {
        let reg = &r.regions[region as usize];
        let page = PAGE as u64;
        let base = w * r.chunk as u64;
        b.clear(base);
        window_runs(&mut self.runs, r, region, w);
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
                .encode::<()>(region, from, PAGE, bytes, &mut |h, p| {
                    // Each page's hash from the bytes this frame carries.
                    let (off, flen) = (h.offset.get(), u64::from(h.raw_len.get()));
                    let fp = off / page;
                    if h.encoding == wire::Encoding::Zero as u8 {
                        for i in 0..flen.div_ceil(page) {
                            sent.set(fp + i, Digest::of_zero_page(region, fp + i, (flen - i * page).min(page) as usize));
                        }
                    } else {
                        let rel = (off - from) as usize;
                        for (i, pg) in bytes[rel..rel + flen as usize].chunks(PAGE).enumerate() {
                            sent.set(fp + i as u64, Digest::of_page(region, fp + i as u64, pg));
                        }
                    }
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

    /// A queue far smaller than the work: every window reaches exactly one of three
    /// workers, and none is lost at the end of the scan.
    #[test]
    fn window_feed_hands_each_window_to_one_worker() {
        let feed = WindowFeed::new(8);
        let taken: Vec<Vec<(u32, u64)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        while let Some(w) = feed.pop() {
                            got.push(w);
                        }
                        got
                    })
                })
                .collect();
            for w in 0..10_000u64 {
                assert!(feed.push(((w % 3) as u32, w)));
            }
            feed.scanned.store(true, Ordering::Release);
            workers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = taken.iter().flatten().map(|&(_, w)| w).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
    }

    /// A failed worker stops the scan (a full queue no longer blocks it) and the others.
    #[test]
    fn window_feed_stops() {
        let feed = WindowFeed::new(2);
        assert!(feed.push((0, 0)) && feed.push((0, 1)));
        feed.stop.store(true, Ordering::Relaxed);
        assert!(!feed.push((0, 2)), "a full queue returns once stopped");
        assert_eq!(feed.pop(), None);
    }

    /// The transport contract, the same suite for every TCP transport (blocking sockets,
    /// io_uring, io_uring with zero-copy sends): a worker sending rounds over two lanes to
    /// real receivers. Every page of the region arrives once per round, intact (tags and
    /// CRCs checked, payloads decoded and compared with the source), each lane's
    /// ROUND_END equals what it carried, every chunk comes back to the worker's spares, and
    /// a receiver that goes away mid-round is an error, not a hang. (RDMA keeps the same
    /// contract through whole sessions in the Soft-RoCE guest: `control/tests/rxe_transfer.rs`.)
    mod contract {
        use std::collections::BTreeMap;
        use std::io::Write;
        use std::net::{TcpListener, TcpStream};
        use std::os::unix::fs::FileExt;
        use std::sync::Mutex;
        use std::sync::atomic::AtomicU64;
        use std::time::{Duration, Instant};

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
            s: TcpStream,
            rx: crate::session::seal::Seal,
            dest: &Mutex<Vec<u8>>,
            counts: &Mutex<BTreeMap<u64, u32>>,
            stop_after: Option<u64>,
            ends: std::sync::mpsc::Sender<RoundSeen>,
        ) -> Result<(), SessionError> {
            let max = wire::max_payload_for(CHUNK as u32);
            let mut r = FrameReader::new(1 << 20, max, rx);
            let mut s = s;
            let mut dec = Decoder::default();
            let (mut frames, mut bytes, mut pages) = (0u64, 0u64, 0u64);
            loop {
                let (h, kind, payload) = r.next(&mut s, "contract")?;
                match kind {
                    Kind::Data => {
                        frames += 1;
                        if stop_after.is_some_and(|n| frames >= n) {
                            // The receiver goes away mid-round.
                            let _ = s.shutdown(std::net::Shutdown::Both);
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

        fn lanes(n: usize) -> (Vec<Lane>, Vec<(TcpStream, crate::session::seal::Seal)>) {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut tx, mut rx) = (Vec::new(), Vec::new());
            for i in 0..n {
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (s, _) = l.accept().unwrap();
                c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let nonce = [i as u8; 32];
                let (kc, ks) =
                    (Keys::derive(Some(b"k"), Side::Client, &nonce, &nonce), Keys::derive(Some(b"k"), Side::Server, &nonce, &nonce));
                tx.push(Lane::new(c, kc.tx));
                rx.push((s, ks.rx));
            }
            (tx, rx)
        }

        fn worker(kind: Kind3, lanes: Vec<Lane>, compression: Compression) -> Option<Worker> {
            let uring = kind != Kind3::Sockets;
            let mut why = None;
            let tx = Tx::open(lanes, uring, 64, kind == Kind3::UringZeroCopy, "contract", &mut |w| why = Some(w));
            if uring && tx.transport() != crate::plan::Transport::Tcp {
                hw::report_skip(&format!("{kind:?}: {}", why.unwrap_or_default()));
                return None;
            }
            let live = crate::live::session(crate::live::Role::Send, 0xc0, 1);
            let arena = hw::memmap::Arena::new(Worker::arena_bytes(&tx, CHUNK), hw::memmap::ArenaKind::Normal, false, None).unwrap().0;
            Some(Worker::new(0, live.worker(0), Encoder::new(compression, CHUNK), tx, Some(arena), CHUNK))
        }

        fn run(w: &mut Worker, regions: &[Region], round: u32, dirty: &[u64], all: bool) -> Result<RoundCounts, SessionError> {
            let feed = WindowFeed::new(8);
            let pacer = Pacer { start: Instant::now(), rate: None, sent: AtomicU64::new(0) };
            let r = Round { round, regions, chunk: CHUNK, feed: &feed, dirty, all, pacer: &pacer, progress: None };
            std::thread::scope(|s| {
                s.spawn(|| scan(regions, dirty, all, CHUNK, &feed));
                let got = w.run_round(&r);
                if got.is_err() {
                    feed.stop.store(true, Ordering::Relaxed);
                }
                got
            })
        }

        #[test]
        fn every_transport_keeps_the_contract() {
            for kind in [Kind3::Sockets, Kind3::Uring, Kind3::UringZeroCopy] {
                let (mem, data) = region();
                let size = data.len() as u64;
                let pages = size.div_ceil(PAGE as u64);
                let regions = [Region {
                    memory: mem.try_clone().unwrap(),
                    probe_holes: false,
                    size,
                    word: 0,
                    words: pages.div_ceil(64) as usize,
                    sent: crate::migrate::PageHashes::new(pages).unwrap(),
                }];
                let (tx, rx) = lanes(2);
                let Some(w) = worker(kind, tx, Compression::Zstd { level: 1 }) else { continue };
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
                    let c0 = run(&mut w, &regions, 0, &[], true).unwrap();
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
                    let c1 = run(&mut w, &regions, 1, &dirty, false).unwrap();
                    assert_eq!(c1.pages, changed.len() as u64, "{kind:?}");
                    check(round_ends());
                    assert_eq!(counts.lock().unwrap().keys().copied().collect::<Vec<_>>(), changed, "{kind:?}: the dirty pages");
                    assert!(counts.lock().unwrap().values().all(|&n| n == 1), "{kind:?}: each dirty page once");
                    w.tx.end_lanes().unwrap();
                    assert_eq!(w.spare.len(), w.tx.chunks_wanted(), "{kind:?}: every chunk came back");
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
            for kind in [Kind3::Sockets, Kind3::Uring, Kind3::UringZeroCopy] {
                // Larger than the socket buffers, so the sender must notice.
                let big = 64u64 << 20;
                let mem = hw::memmap::memfd("contract-big", big, false).unwrap();
                let page: Vec<u8> = (0..PAGE).map(|i| (i * 7 % 251) as u8 + 1).collect();
                for p in 0..big / PAGE as u64 {
                    mem.write_all_at(&page, p * PAGE as u64).unwrap();
                }
                let pages = big / PAGE as u64;
                let regions = [Region {
                    memory: mem,
                    probe_holes: false,
                    size: big,
                    word: 0,
                    words: pages.div_ceil(64) as usize,
                    sent: crate::migrate::PageHashes::new(pages).unwrap(),
                }];
                let (tx, rx) = lanes(2);
                let Some(mut w) = worker(kind, tx, Compression::Off) else { continue };
                let (dest, counts) = (Mutex::new(vec![0u8; big as usize]), Mutex::new(BTreeMap::new()));
                let t = Instant::now();
                let r = std::thread::scope(|s| {
                    for (sock, seal) in rx {
                        let (dest, counts) = (&dest, &counts);
                        let ends = std::sync::mpsc::channel().0;
                        s.spawn(move || receive(sock, seal, dest, counts, Some(3), ends));
                    }
                    run(&mut w, &regions, 0, &[], true)
                });
                let err = r.expect_err("the round must fail");
                println!("{kind:?}: {err} after {:?}", t.elapsed());
                assert!(t.elapsed() < Duration::from_secs(20), "{kind:?}: failed promptly, not at a timeout");
                let _ = std::io::stdout().flush();
            }
        }
    }
}
