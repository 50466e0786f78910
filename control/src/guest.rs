//! The simulated guest of `ferryctl demo` and `ferryctl bench migrate`: guest memory with
//! a realistic image, and a workload that dirties it while tracking its own dirty bitmap,
//! as a VMM's dirty log would.
//!
//! The image follows the corpus recipe of `../shared/tools/peers/gen_corpus.py`: 4 KiB
//! pages in a seeded random order, about 45% zero pages, 25% pages of ELF binaries and
//! libraries (/usr/bin, /usr/sbin, /usr/lib), 15% pages of text files (/usr/share) and
//! 15% random bytes; each file gives at most its first 512 pages. To start in seconds on
//! any machine (1 GiB took 1.7-3.7 s here: the `guest:` line of `ferryctl demo`) it looks
//! at the first 4000 candidate files of each kind (in sorted order), draws every page
//! first and then reads them file by file; with no such files it says so and uses random
//! pages instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

pub const PAGE: usize = 4096;
const MAX_PAGES_PER_FILE: u64 = 512;
const MAX_FILES_PER_KIND: usize = 4000;
const COMPRESSED_EXT: &[&str] = &[
    ".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".jar", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".woff", ".woff2", ".ttf", ".otf",
    ".pyc", ".mo", ".gmo", ".db", ".cache", ".deb", ".whl", ".egg", ".so", ".a", ".o", ".pf2", ".bin", ".dat", ".tgz", ".7z",
];

/// splitmix64: small, fast and seedable; the image only needs to be reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Files of one kind, with the cumulative page counts to draw pages uniformly.
struct Pool {
    files: Vec<(PathBuf, u64)>,
    cum: Vec<u64>,
}

impl Pool {
    fn new(files: Vec<(PathBuf, u64)>) -> Pool {
        let mut t = 0;
        let cum = files
            .iter()
            .map(|(_, size)| {
                t += size.div_ceil(PAGE as u64).min(MAX_PAGES_PER_FILE);
                t
            })
            .collect();
        Pool { files, cum }
    }

    fn total(&self) -> u64 {
        self.cum.last().copied().unwrap_or(0)
    }

    /// A page drawn uniformly from the pool: (file, offset); none if the pool is empty.
    fn draw(&self, rng: &mut Rng) -> Option<(usize, u64)> {
        if self.total() == 0 {
            return None;
        }
        let i = rng.below(self.total());
        let k = self.cum.partition_point(|&c| c <= i);
        let first = if k == 0 { 0 } else { self.cum[k - 1] };
        Some((k, (i - first) * PAGE as u64))
    }
}

/// Reads the drawn pages: `picks` holds (file, offset, guest page); each file is opened
/// once. A page that cannot be read (a file changed since the walk) gets random bytes.
/// Returns how many pages were read from files.
fn read_picks(pool: &Pool, mut picks: Vec<(usize, u64, usize)>, mem: &mut [u8], rng: &mut Rng) -> u64 {
    picks.sort_unstable();
    let mut read = 0;
    let mut open: Option<(usize, Option<File>)> = None;
    for (k, off, p) in picks {
        if open.as_ref().is_none_or(|(o, _)| *o != k) {
            open = Some((k, File::open(&pool.files[k].0).ok()));
        }
        let end = ((p + 1) * PAGE).min(mem.len());
        let out = &mut mem[p * PAGE..end];
        let mut n = 0;
        if let Some((_, Some(f))) = &open {
            while n < out.len() {
                match f.read_at(&mut out[n..], off + n as u64) {
                    Ok(0) | Err(_) => break,
                    Ok(m) => n += m,
                }
            }
        }
        if n > 0 {
            out[n..].fill(0);
            read += 1;
        } else {
            rng.fill(out);
        }
    }
    read
}

/// Regular files under `roots` in sorted order (no symlinks followed), while `keep`
/// accepts them, up to `max`.
fn walk(roots: &[&str], max: usize, keep: &dyn Fn(&Path) -> bool) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = roots.iter().rev().map(PathBuf::from).collect();
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        let mut subdirs = Vec::new();
        for p in entries {
            let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
            if md.is_dir() {
                subdirs.push(p);
            } else if md.is_file() && md.len() > 0 && keep(&p) {
                out.push((p, md.len()));
                if out.len() >= max {
                    return out;
                }
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    out
}

fn head(p: &Path, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    let got = File::open(p).and_then(|f| f.read_at(&mut b, 0)).unwrap_or(0);
    b.truncate(got);
    b
}

fn is_text(b: &[u8]) -> bool {
    !b.is_empty() && !b.contains(&0) && b.iter().filter(|&&c| c < 9 || (13 < c && c < 32) || c == 127).count() <= b.len() / 200
}

/// What the image holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageStats {
    pub bytes: u64,
    pub pages: u64,
    pub seed: u64,
    /// Pages by kind as drawn: zero, elf, text, random.
    pub zero_pages: u64,
    pub elf_pages: u64,
    pub text_pages: u64,
    pub random_pages: u64,
    /// Candidate files found for the ELF and text pools.
    pub elf_files: usize,
    pub text_files: usize,
    pub seconds: f64,
}

/// Writes the image into `mem` (the guest memory, freshly zeroed).
pub fn fill_image(mem: &mut [u8], seed: u64) -> ImageStats {
    let t = Instant::now();
    let elf = Pool::new(walk(&["/usr/bin", "/usr/sbin", "/usr/lib"], MAX_FILES_PER_KIND, &|p| head(p, 4) == b"\x7fELF"));
    let text = Pool::new(walk(&["/usr/share"], MAX_FILES_PER_KIND, &|p| {
        let name = p.to_string_lossy().to_lowercase();
        !COMPRESSED_EXT.iter().any(|e| name.ends_with(e)) && is_text(&head(p, PAGE))
    }));
    if elf.total() == 0 || text.total() == 0 {
        log::warn!(
            "guest image: {} ELF and {} text files found under /usr: their pages are random bytes instead",
            elf.files.len(),
            text.files.len()
        );
    }
    let pages = mem.len().div_ceil(PAGE) as u64;
    // Kinds in proportion, then shuffled (Fisher-Yates), as the recipe does.
    let zero = (pages as f64 * 0.45).round() as u64;
    let n_elf = (pages as f64 * 0.25).round() as u64;
    let n_text = (pages as f64 * 0.15).round() as u64;
    let mut kinds: Vec<u8> = Vec::with_capacity(pages as usize);
    kinds.extend(std::iter::repeat_n(0u8, zero as usize));
    kinds.extend(std::iter::repeat_n(1u8, n_elf as usize));
    kinds.extend(std::iter::repeat_n(2u8, n_text as usize));
    kinds.resize(pages as usize, 3);
    let mut rng = Rng::new(seed);
    for i in (1..kinds.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        kinds.swap(i, j);
    }
    let mut st =
        ImageStats { bytes: mem.len() as u64, pages, seed, elf_files: elf.files.len(), text_files: text.files.len(), ..Default::default() };
    // Draw every page first, then read them file by file.
    let (mut elf_picks, mut text_picks) = (Vec::new(), Vec::new());
    for (p, &kind) in kinds.iter().enumerate() {
        match kind {
            0 => st.zero_pages += 1,
            1 if elf.total() > 0 => elf_picks.extend(elf.draw(&mut rng).map(|(k, o)| (k, o, p))),
            2 if text.total() > 0 => text_picks.extend(text.draw(&mut rng).map(|(k, o)| (k, o, p))),
            _ => {
                let end = ((p + 1) * PAGE).min(mem.len());
                rng.fill(&mut mem[p * PAGE..end]);
                st.random_pages += 1;
            }
        }
    }
    let (n_elf, n_text) = (elf_picks.len() as u64, text_picks.len() as u64);
    st.elf_pages = read_picks(&elf, elf_picks, mem, &mut rng);
    st.text_pages = read_picks(&text, text_picks, mem, &mut rng);
    st.random_pages += n_elf - st.elf_pages + n_text - st.text_pages;
    st.seconds = t.elapsed().as_secs_f64();
    st
}

/// Where the workload writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Any page, uniformly.
    Uniform,
    /// 90% of writes in a hot set of 1/16 of memory, the rest anywhere.
    Hot,
    /// A cursor sweeping memory page by page (a streaming writer).
    Sequential,
}

/// The next page a workload writes, by its pattern.
struct Picker {
    pattern: Pattern,
    pages: u64,
    rng: Rng,
    hot_len: u64,
    hot_start: u64,
    cursor: u64,
}

impl Picker {
    /// For memory of `pages` pages (at least one).
    fn new(pattern: Pattern, pages: u64, seed: u64) -> Picker {
        let mut rng = Rng::new(seed);
        let (hot_len, hot_start) = ((pages / 16).max(1), rng.below(pages.max(1)));
        Picker { pattern, pages, rng, hot_len, hot_start, cursor: 0 }
    }

    fn next(&mut self) -> u64 {
        match self.pattern {
            Pattern::Uniform => self.rng.below(self.pages),
            Pattern::Hot if self.rng.below(10) < 9 => (self.hot_start + self.rng.below(self.hot_len)) % self.pages,
            Pattern::Hot => self.rng.below(self.pages),
            Pattern::Sequential => {
                self.cursor = (self.cursor + 1) % self.pages;
                self.cursor
            }
        }
    }
}

/// Calls `write` with the next page of `pick`, `rate` bytes of pages per second (in 1 ms
/// steps, as a guest's vCPUs would spread them), until `stop` is set; returns how many
/// pages it wrote.
fn run_paced(stop: &AtomicBool, rate: u64, pick: &mut Picker, write: &mut dyn FnMut(u64)) -> u64 {
    let t0 = Instant::now();
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) && pick.pages > 0 {
        let due = (t0.elapsed().as_secs_f64() * rate as f64 / PAGE as f64) as u64;
        while done < due && !stop.load(Ordering::Relaxed) {
            write(pick.next());
            done += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done
}

/// The guest's dirty log: one bit per page, set after the page is written.
#[derive(Debug)]
pub struct DirtyLog {
    words: Vec<AtomicU64>,
}

impl DirtyLog {
    pub fn new(pages: u64) -> DirtyLog {
        DirtyLog { words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    fn mark(&self, page: u64) {
        // Release: a harvest that sees the bit sees the write before it.
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Takes the pages dirtied since the last harvest and writes them into `bitmap` (the
    /// memfd shared with ferryd) as little-endian words; returns how many.
    pub fn harvest_into(&self, bitmap: &File) -> std::io::Result<u64> {
        let mut raw = Vec::with_capacity(self.words.len() * 8);
        let mut n = 0;
        for w in &self.words {
            let v = w.swap(0, Ordering::Acquire);
            n += u64::from(v.count_ones());
            raw.extend_from_slice(&v.to_le_bytes());
        }
        bitmap.write_all_at(&raw, 0)?;
        Ok(n)
    }
}

/// The guest's RAM as the demo's VMM holds it.
#[derive(Debug)]
pub enum GuestRam {
    /// Written by this process only; ferryd gets a read-only descriptor.
    Owned(hw::memmap::OwnedMemory),
    /// Preallocated and shared read-write, as a VMM hands ferryd its own memfd; this
    /// process writes it a word at a time.
    Shared(hw::memmap::SharedMemory),
}

impl GuestRam {
    /// `len` zeroed bytes: preallocated and shared read-write, or owned.
    pub fn new(len: u64, prealloc: bool) -> std::io::Result<GuestRam> {
        Ok(if prealloc {
            GuestRam::Shared(hw::memmap::SharedMemory::new("ferry-demo-guest", len)?)
        } else {
            GuestRam::Owned(hw::memmap::OwnedMemory::new("ferry-demo-guest", len)?)
        })
    }

    /// The descriptor a VMM hands ferryd: read-only for owned memory, read-write for
    /// shared.
    pub fn descriptor(&self) -> std::io::Result<File> {
        match self {
            GuestRam::Owned(m) => m.reader(),
            GuestRam::Shared(m) => m.file().try_clone(),
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            GuestRam::Owned(m) => m.as_slice().len() as u64,
            GuestRam::Shared(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the image ([`fill_image`]); shared memory through a buffer of its size.
    pub fn fill_image(&mut self, seed: u64) -> std::io::Result<ImageStats> {
        match self {
            GuestRam::Owned(m) => Ok(fill_image(m.as_mut_slice(), seed)),
            GuestRam::Shared(m) => {
                let mut buf = vec![0u8; m.len() as usize];
                let st = fill_image(&mut buf, seed);
                m.file().write_all_at(&buf, 0)?;
                Ok(st)
            }
        }
    }

    /// Stores `v` at byte `at` (8-byte aligned).
    fn store(&mut self, at: usize, v: u64) {
        match self {
            GuestRam::Owned(m) => m.as_mut_slice()[at..at + 8].copy_from_slice(&v.to_le_bytes()),
            GuestRam::Shared(m) => m.words()[at / 8].store(v.to_le(), Ordering::Relaxed),
        }
    }
}

/// A running workload: it owns the guest memory until paused.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(GuestRam, u64)>,
}

impl Workload {
    /// Dirties `rate` bytes of pages per second (in 1 ms steps) with `pattern`; each write
    /// stores a counter in the page and marks the page in `log`.
    pub fn start(mut ram: GuestRam, log: Arc<DirtyLog>, rate: u64, pattern: Pattern, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut pick = Picker::new(pattern, ram.len() / PAGE as u64, seed ^ 0x5eed);
            let mut counter = 1u64;
            let done = run_paced(&flag, rate, &mut pick, &mut |page| {
                let at = page as usize * PAGE + (counter as usize % (PAGE / 8)) * 8;
                ram.store(at, counter);
                log.mark(page);
                counter += 1;
            });
            (ram, done)
        });
        Workload { stop, handle }
    }

    /// Pauses the guest: the workload stops, and its memory and page-write count come back.
    pub fn pause(self) -> (GuestRam, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("workload thread panicked")
    }
}

/// The guest once it runs on the destination after a post-copy switch-over: the same
/// workload over the destination VMM's mapping of the memory, which faults into ferry
/// for every page it touches first. Each page's content as the guest first saw it is
/// hashed before the guest writes it, so the end can check that every page the guest read
/// was the source's final page, not a stale or missing one.
#[derive(Debug)]
pub struct DestWorkload {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(hw::uffd::GuestMapping, FirstSeen)>,
}

/// What the destination guest saw.
#[derive(Debug)]
pub struct FirstSeen {
    /// Per page: the hash of its content when the guest first touched it; none if never.
    pub pages: Vec<Option<u64>>,
    pub page_writes: u64,
}

/// A page's hash for [`FirstSeen`].
pub fn page_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl DestWorkload {
    /// Runs the workload on `map` (the destination's memory, registered with the
    /// userfaultfd ferryd serves) at `rate` bytes of page writes per second.
    pub fn start(map: hw::uffd::GuestMapping, rate: u64, pattern: Pattern, seed: u64) -> DestWorkload {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let pages = map.len() / PAGE as u64;
            let mut seen = FirstSeen { pages: vec![None; pages as usize], page_writes: 0 };
            let mut pick = Picker::new(pattern, pages, seed ^ 0xde57);
            let mut counter = 1u64 << 40;
            let mut page_bytes = vec![0u8; PAGE];
            let first = &mut seen.pages;
            let writes = run_paced(&flag, rate, &mut pick, &mut |page| {
                let slot = &mut first[page as usize];
                if slot.is_none() {
                    // The first touch reads the page: a fault ferry resolves.
                    map.read(page * PAGE as u64, &mut page_bytes);
                    *slot = Some(page_hash(&page_bytes));
                }
                let word = page as usize * (PAGE / 8) + counter as usize % (PAGE / 8);
                map.words()[word].store(counter, Ordering::Relaxed);
                counter += 1;
            });
            seen.page_writes = writes;
            (map, seen)
        });
        DestWorkload { stop, handle }
    }

    /// Stops the workload: the mapping and what the guest saw come back.
    pub fn stop(self) -> (hw::uffd::GuestMapping, FirstSeen) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("destination workload thread panicked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_has_the_recipe_shares_and_is_reproducible() {
        let mut a = vec![0u8; 2048 * PAGE];
        let st = fill_image(&mut a, 7);
        assert_eq!(st.pages, 2048);
        assert_eq!(st.zero_pages, 922);
        assert_eq!(st.zero_pages + st.elf_pages + st.text_pages + st.random_pages, 2048);
        let zero = a.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count() as u64;
        assert!(zero >= st.zero_pages, "at least the drawn zero pages are zero");
        let mut b = vec![0u8; 2048 * PAGE];
        fill_image(&mut b, 7);
        assert!(a == b, "the same seed gives the same image");
    }

    #[test]
    fn workload_marks_what_it_writes() {
        let m = hw::memmap::OwnedMemory::new("guest-test", 256 * PAGE as u64).unwrap();
        let before = m.as_slice().to_vec();
        let log = Arc::new(DirtyLog::new(256));
        let w = Workload::start(GuestRam::Owned(m), log.clone(), 40 << 20, Pattern::Hot, 1);
        // Until the workload has marked a page.
        while log.words.iter().all(|w| w.load(Ordering::Relaxed) == 0) {
            std::thread::yield_now();
        }
        let (ram, writes) = w.pause();
        let GuestRam::Owned(map) = ram else { unreachable!("started owned") };
        assert!(writes > 0);
        let bitmap = hw::memmap::memfd("bitmap-test", 32, false).unwrap();
        let n = log.harvest_into(&bitmap).unwrap();
        assert!(n > 0);
        let mut raw = [0u8; 32];
        bitmap.read_exact_at(&mut raw, 0).unwrap();
        for (p, (old, new)) in before.chunks(PAGE).zip(map.as_slice().chunks(PAGE)).enumerate() {
            let marked = raw[p / 8] >> (p % 8) & 1 == 1;
            assert!(old == new || marked, "page {p} changed without being marked");
        }
        assert_eq!(log.harvest_into(&bitmap).unwrap(), 0, "a harvest clears the log");
    }
}
