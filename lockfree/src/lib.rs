//! The data plane's lock-free hand-offs between threads, apart from everything else so
//! that loom can check every interleaving of them (`RUSTFLAGS="--cfg loom" cargo test -p
//! lockfree --release`, run by `scripts/test.sh`; the models are in `tests/loom.rs`):
//!
//! - [`Claims`]: a destination's pages, claimed by the lanes that write them; of two
//!   overlapping claims exactly one wins, and the loser takes nothing.
//! - [`AtomicBits`]: one bit per item, whoever sets it first knows it (a window sent by the
//!   cursor or by a post-copy hint, never both; a stale page placed once); two threads that
//!   each set a bit and then read the other's agree on an order (post-copy's claim and
//!   waiting bits).
//! - [`Cursor`]: a round's windows, claimed a block at a time by the workers; every window
//!   goes to exactly one worker.
#![forbid(unsafe_code)]

use std::ops::Range;

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

/// A table of `n` words could not be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMemory {
    pub bytes: u64,
}

fn words(n: u64) -> Result<Vec<AtomicU64>, NoMemory> {
    let bytes = n.saturating_mul(8);
    let n = usize::try_from(n).map_err(|_| NoMemory { bytes })?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| NoMemory { bytes })?;
    v.resize_with(n, || AtomicU64::new(0));
    Ok(v)
}

/// The bits of word `i` that fall in items `first..end`.
pub fn word_mask(i: u64, first: u64, end: u64) -> u64 {
    let lo = first.saturating_sub(i * 64).min(64);
    let hi = end.saturating_sub(i * 64).min(64);
    if hi <= lo {
        return 0;
    }
    let upto = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upto & !((1u64 << lo) - 1)
}

/// One bit per page of a destination, claimed by whichever lane writes the page: a page
/// is written once per round, and a frame that overlaps pages written already is refused
/// whole.
#[derive(Debug)]
pub struct Claims {
    words: Vec<AtomicU64>,
    pages: u64,
}

/// Pages that another claim holds already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap;

impl Claims {
    /// `pages` unclaimed pages; a host that cannot hold the table gets an error, not an
    /// abort.
    pub fn new(pages: u64) -> Result<Claims, NoMemory> {
        Ok(Claims { words: words(pages.div_ceil(64))?, pages })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Claims pages `first..end` (within the table): all of them, or none when any is held
    /// already. Of two overlapping claims exactly one wins.
    pub fn claim(&self, first: u64, end: u64) -> Result<(), Overlap> {
        debug_assert!(first <= end && end <= self.pages);
        let mut k = first / 64;
        while k * 64 < end {
            let mask = word_mask(k, first, end);
            // AcqRel: pairs with other lanes' claims of the same word, so of two
            // overlapping claims exactly one sees the other's bits.
            let before = self.words[k as usize].fetch_or(mask, Ordering::AcqRel);
            if before & mask != 0 {
                // Give back what this call took: the new bits of this word, and the
                // words before it, which it had claimed whole.
                self.words[k as usize].fetch_and(!(mask & !before), Ordering::AcqRel);
                for j in first / 64..k {
                    self.words[j as usize].fetch_and(!word_mask(j, first, end), Ordering::AcqRel);
                }
                return Err(Overlap);
            }
            k += 1;
        }
        Ok(())
    }

    /// Pages claimed now.
    pub fn claimed(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// Forgets every claim: the next round may write each page once more. (Called between
    /// rounds, when no lane claims.)
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }
}

/// One bit per item (page, window), set by any thread: whoever sets a bit first knows it.
/// Two threads that each set a bit, pass [`order`], then read the other's bit agree on an
/// order: at least one of them sees the other's (post-copy's claim and waiting bits rely
/// on that).
#[derive(Debug)]
pub struct AtomicBits(Vec<AtomicU64>);

impl AtomicBits {
    /// `n` clear bits.
    pub fn new(n: u64) -> AtomicBits {
        AtomicBits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// The bits of `words`, as they are.
    pub fn from_words(words: Vec<u64>) -> AtomicBits {
        AtomicBits(words.into_iter().map(AtomicU64::new).collect())
    }

    pub fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::SeqCst) >> (i % 64) & 1 == 1
    }

    /// Bits `64 * k..64 * (k + 1)`.
    pub fn word(&self, k: usize) -> u64 {
        self.0[k].load(Ordering::SeqCst)
    }

    /// Sets bit `i`; whether it was clear before.
    pub fn take(&self, i: u64) -> bool {
        let bit = 1u64 << (i % 64);
        self.0[(i / 64) as usize].fetch_or(bit, Ordering::SeqCst) & bit == 0
    }
}

/// A full (SeqCst) fence: between setting one [`AtomicBits`] bit and reading another
/// thread's, so that of two threads doing so crosswise at least one sees the other's bit
/// (the store-buffering pattern, which needs the fence and not only SeqCst accesses to be
/// sound in every model, loom's included).
pub fn order() {
    fence(Ordering::SeqCst);
}

/// Items `0..total`, handed out a block at a time from one atomic cursor: every item to
/// exactly one taker, with no queue to fill and no bookkeeping that grows with the total.
#[derive(Debug)]
pub struct Cursor {
    total: u64,
    block: u64,
    next: AtomicU64,
    /// A taker failed: the others stop taking.
    stop: AtomicBool,
}

impl Cursor {
    pub fn new(total: u64, block: u64) -> Cursor {
        Cursor { total, block: block.max(1), next: AtomicU64::new(0), stop: AtomicBool::new(false) }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The next block, `None` once every item is handed out or the cursor stopped.
    pub fn take(&self) -> Option<Range<u64>> {
        if self.stopped() {
            return None;
        }
        let first = self.next.fetch_add(self.block, Ordering::Relaxed);
        (first < self.total).then(|| first..(first + self.block).min(self.total))
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn claims_are_all_or_nothing() {
        let c = Claims::new(200).unwrap();
        c.claim(10, 130).unwrap();
        assert_eq!(c.claimed(), 120);
        // Overlapping at its end: nothing of it stays claimed.
        assert_eq!(c.claim(0, 11), Err(Overlap));
        assert_eq!(c.claimed(), 120);
        assert_eq!(c.claim(129, 190), Err(Overlap));
        assert_eq!(c.claimed(), 120);
        c.claim(130, 200).unwrap();
        c.claim(0, 10).unwrap();
        assert_eq!(c.claimed(), 200);
        c.clear();
        assert_eq!(c.claimed(), 0);
        // (Miri stops at an allocation that large instead of failing it.)
        if !cfg!(miri) {
            assert!(Claims::new(u64::MAX).is_err(), "a table no host holds is an error");
        }
    }

    #[test]
    fn masks() {
        assert_eq!(word_mask(0, 0, 64), u64::MAX);
        assert_eq!(word_mask(1, 60, 70), 0b11_1111);
        assert_eq!(word_mask(0, 60, 70), 0b1111 << 60);
        assert_eq!(word_mask(2, 60, 70), 0);
    }

    #[test]
    fn a_cursor_hands_out_each_item_once() {
        let c = Cursor::new(10, 4);
        let got: Vec<_> = std::iter::from_fn(|| c.take()).collect();
        assert_eq!(got, vec![0..4, 4..8, 8..10]);
        let c = Cursor::new(10, 4);
        c.stop();
        assert_eq!(c.take(), None);
    }
}
