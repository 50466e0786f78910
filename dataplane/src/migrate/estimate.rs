//! The downtime estimate behind the pause advice: how long the stop-and-copy round would
//! take if the VMM paused now, and the advice itself. Pure functions of what the rounds so
//! far measured, so they can be tested on their own.
//!
//! The last round is modelled as its parts, each from a measurement:
//!
//! - **data**: the pages expected dirty (the guest's measured dirty rate over the time a
//!   round takes) at the cost per page the latest dirty round's data phase measured
//!   (scattered dirty pages cost more than round 0's stream, mostly zero pages, which is
//!   the fallback only);
//! - **the full digest** (`verify: full`): the paused source is digested beside the data
//!   phase, so the longer of the two counts; over RDMA the destination then digests what
//!   landed, after the last write (one-sided writes checked at the end), which adds. It
//!   reads the guest's bytes that are not holes (their share sampled during pre-copy) at
//!   the speed this ferryd's last paused digests had ([`digest_seconds_per_byte`]), or
//!   before its first at the speed sampled during pre-copy;
//! - **the end**: the destination's confirmation of the round, then the verdict (the lanes
//!   ended, which the workers did right after the round's data, the digests compared, which costs nothing as both sides keep theirs as pages
//!   are set, the memory handed to the destination VMM and its `taken`, RESULT). A pre-copy
//!   round has no verdict, and its confirmation runs while the guest keeps the CPUs awake;
//!   with the guest paused, every hand-off between threads and processes wakes an idle
//!   CPU, which on a VM costs far more (the data phase's too: a small last round cost up
//!   to twice as much per page as the round before it). So this part is what this
//!   ferryd's last migrations' last rounds took beyond their pages at the estimate's cost
//!   per page and their full digest ([`end_seconds`]), with [`DEFAULT_END`] counted as
//!   one of them until it has run three.

use std::sync::Mutex;
use std::time::Duration;

use super::RoundReport;

/// What one estimate is made of (seconds, and pages).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Inputs {
    /// Pages expected dirty if the VMM paused now.
    pub next_pages: f64,
    /// Data-phase seconds per dirty page.
    pub page_seconds: f64,
    /// `verify: full`: digesting the paused source (0 otherwise).
    pub digest_seconds: f64,
    /// Over RDMA with `verify: full`: the destination digesting all of what landed once
    /// the last write did (0 otherwise).
    pub after_data_seconds: f64,
    /// The last round's end: its confirmation and the verdict.
    pub end_seconds: f64,
}

/// The downtime, seconds, if the VMM paused now.
pub fn downtime_seconds(i: &Inputs) -> f64 {
    (i.next_pages * i.page_seconds).max(i.digest_seconds) + i.after_data_seconds + i.end_seconds
}

/// Rounds after the first with fewer dirty pages than this time too little to tell the
/// cost of a page from the noise.
const MIN_PAGES: u64 = 64;

/// Data-phase seconds per dirty page: the most recent round after the first that moved
/// enough pages; else round 0's, over its pages that were not zero (zero pages cost
/// almost nothing to send).
pub fn page_seconds(rounds: &[RoundReport]) -> Option<f64> {
    if let Some(r) = rounds.iter().rev().filter(|r| r.round > 0).find(|r| r.dirty_pages >= MIN_PAGES) {
        return Some(r.data_seconds / r.dirty_pages as f64);
    }
    let r0 = rounds.first()?;
    let pages = r0.dirty_pages.saturating_sub(r0.zero_pages).max(1);
    Some(r0.data_seconds / pages as f64)
}

/// The last round's end until this ferryd has measured one: 2 ms. On a 2-core VM over
/// loopback the confirmation and the verdict took 0.9-1.8 ms one day and 1.2-3.3 ms
/// another (the `last_round` `confirm_seconds` that `benches/bench_estimate.py` prints),
/// and a small last round's data phase up to about 1 ms more than its pages at the
/// previous round's cost; a host whose idle CPUs wake faster takes less.
pub const DEFAULT_END: Duration = Duration::from_millis(2);

/// Figures kept for a median.
const KEPT: usize = 16;

/// Figures recorded before a default stops counting as one of them.
const PRIOR_UNTIL: usize = 3;

/// What this process measured at the end of its last migrations (a ferryd lives long; its
/// migrations between the same hosts end alike): the median of the last [`KEPT`].
struct Learned(Mutex<Vec<f64>>);

impl Learned {
    const fn new() -> Learned {
        Learned(Mutex::new(Vec::new()))
    }

    fn record(&self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() == KEPT {
            m.remove(0);
        }
        m.push(v);
    }

    /// The median; of an even count, the lower middle one (a stall makes a figure
    /// larger, never smaller, so of two the smaller is the likelier). With `prior`, until
    /// [`PRIOR_UNTIL`] figures are recorded the prior counts as one more: one stalled
    /// migration does not set the next one's figure alone.
    fn median(&self, prior: Option<f64>) -> Option<f64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(p) = prior.filter(|_| m.len() < PRIOR_UNTIL) {
            m.push(p);
        }
        m.sort_by(f64::total_cmp);
        m.get(m.len().saturating_sub(1) / 2).copied()
    }
}

/// The ends (confirmation and verdict) of the last rounds, seconds.
static ENDS: Learned = Learned::new();

/// `verify: full`: the paused digests' seconds per byte they read (the guest's bytes that
/// are not holes).
static DIGEST_SPEEDS: Learned = Learned::new();

/// Records the end (confirmation and verdict) of a migration's last round, seconds.
pub fn record_end(seconds: f64) {
    ENDS.record(seconds);
}

/// The last round's end to expect: the median of the ones recorded ([`record_end`]), with
/// [`DEFAULT_END`] as one of them until there are three.
pub fn end_seconds() -> f64 {
    let default = DEFAULT_END.as_secs_f64();
    ENDS.median(Some(default)).unwrap_or(default)
}

/// Records how long a paused full digest took to read `bytes` (the guest's bytes that are
/// not holes).
pub fn record_digest(took: f64, bytes: f64) {
    if bytes > 0.0 {
        DIGEST_SPEEDS.record(took / bytes);
    }
}

/// The paused full digest's seconds per byte it reads: the median of what this ferryd
/// recorded ([`record_digest`]), `None` before its first. The paused digest reads on every
/// CPU, beside the last round's lanes, with the guest's CPUs idle: a host's figure,
/// steadier than samples taken while the guest runs.
pub fn digest_seconds_per_byte() -> Option<f64> {
    DIGEST_SPEEDS.median(None)
}

/// What the advice after a round is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdviceInputs {
    /// The round was the stop-and-copy one: nothing is left to advise.
    pub last: bool,
    /// The downtime estimate, ms (`None` until a dirty rate has been measured).
    pub estimate_ms: Option<f64>,
    pub budget_ms: f64,
    pub round: u32,
    pub max_rounds: u32,
    /// Pages this round sent, and the round before it.
    pub pages: u64,
    pub previous_pages: Option<u64>,
}

/// The advice after a round: pause, switch to post-copy, or continue, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advice {
    pub pause: bool,
    pub postcopy: bool,
    pub text: String,
}

/// Pause once the estimate fits the budget, or at the round limit; switch to post-copy at
/// the round limit over budget, or when the guest is not converging (a round after the
/// second re-sent at least 90% as many pages as the round before it, so more rounds will
/// not shrink the pause); else continue.
pub fn advise(a: &AdviceInputs) -> Advice {
    let fits = a.estimate_ms.is_some_and(|e| e <= a.budget_ms);
    let limit = a.round + 1 >= a.max_rounds;
    let stalled = a.round >= 2 && a.previous_pages.is_some_and(|prev| a.pages * 10 >= prev * 9);
    let over = a.estimate_ms.map_or_else(|| "unknown".into(), |e| format!("{e:.0} ms"));
    let budget = a.budget_ms;
    let text = match (a.last, fits, limit, stalled) {
        (true, ..) => String::new(),
        (false, true, ..) => format!("pause: the estimated downtime {over} fits the {budget:.0} ms budget"),
        (false, false, true, _) => format!(
            "pause over budget, or switch to post-copy: round {} of {} and the estimate {over} is over the {budget:.0} ms budget",
            a.round + 1,
            a.max_rounds
        ),
        (false, false, false, true) => format!(
            "switch to post-copy: the guest dirtied {} pages in this round after {} in the last, so more rounds will not bring the estimate {over} under the {budget:.0} ms budget",
            a.pages,
            a.previous_pages.unwrap_or(0)
        ),
        (false, false, false, false) => {
            format!("continue: the estimate {over} is over the {budget:.0} ms budget and the dirty set is still shrinking")
        }
    };
    Advice { pause: !a.last && (fits || limit), postcopy: !a.last && !fits && (limit || stalled), text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(round: u32, pages: u64, zero: u64, data_ms: f64, confirm_ms: f64) -> RoundReport {
        RoundReport {
            round,
            dirty_pages: pages,
            zero_pages: zero,
            data_seconds: data_ms / 1e3,
            confirm_seconds: confirm_ms / 1e3,
            ..RoundReport::default()
        }
    }

    #[test]
    fn parts_add_up_and_the_digest_overlaps_the_data() {
        let i = Inputs { next_pages: 1000.0, page_seconds: 10e-6, end_seconds: 1e-3, ..Inputs::default() };
        assert!((downtime_seconds(&i) - 11e-3).abs() < 1e-9, "10 ms of pages, and the end");
        // A digest longer than the round replaces it; a shorter one hides behind it.
        let full = Inputs { digest_seconds: 150e-3, ..i };
        assert!((downtime_seconds(&full) - 151e-3).abs() < 1e-9);
        let short = Inputs { digest_seconds: 1e-3, ..i };
        assert_eq!(downtime_seconds(&short), downtime_seconds(&i));
        // The destination's digest after the last write (RDMA, checked at the end) adds to
        // the source's overlapping one.
        let rdma = Inputs { digest_seconds: 150e-3, after_data_seconds: 140e-3, ..i };
        assert!((downtime_seconds(&rdma) - 291e-3).abs() < 1e-9);
        // Nothing dirty still costs the end.
        assert!((downtime_seconds(&Inputs { next_pages: 0.0, ..i }) - 1e-3).abs() < 1e-9);
    }

    #[test]
    fn the_advice_follows_the_budget_the_limit_and_convergence() {
        let a = AdviceInputs {
            last: false,
            estimate_ms: Some(500.0),
            budget_ms: 300.0,
            round: 3,
            max_rounds: 30,
            pages: 500,
            previous_pages: Some(1000),
        };
        // Over budget and shrinking: continue.
        let c = advise(&a);
        assert!(!c.pause && !c.postcopy && c.text.starts_with("continue"), "{c:?}");
        // Fits: pause, and no post-copy.
        let p = advise(&AdviceInputs { estimate_ms: Some(250.0), ..a });
        assert!(p.pause && !p.postcopy && p.text.starts_with("pause:"), "{p:?}");
        // No estimate yet never fits.
        assert!(!advise(&AdviceInputs { estimate_ms: None, ..a }).pause);
        // Not converging (95% of the last round's pages): post-copy, not pause.
        let s = advise(&AdviceInputs { pages: 950, ..a });
        assert!(!s.pause && s.postcopy && s.text.starts_with("switch to post-copy"), "{s:?}");
        // Rounds 0 and 1 are too early to call it stalled.
        assert!(!advise(&AdviceInputs { round: 1, pages: 950, ..a }).postcopy);
        // The round limit over budget: pause or post-copy; within budget: pause only.
        let l = advise(&AdviceInputs { round: 29, ..a });
        assert!(l.pause && l.postcopy && l.text.contains("round 30 of 30"), "{l:?}");
        let lf = advise(&AdviceInputs { round: 29, estimate_ms: Some(100.0), ..a });
        assert!(lf.pause && !lf.postcopy);
        // The last round advises nothing.
        assert_eq!(advise(&AdviceInputs { last: true, ..a }), Advice { pause: false, postcopy: false, text: String::new() });
    }

    #[test]
    fn the_estimate_grows_with_the_dirty_pages() {
        let mut last = 0.0;
        for pages in [0.0, 1.0, 100.0, 1e4, 1e6] {
            let d = downtime_seconds(&Inputs { next_pages: pages, page_seconds: 5e-6, end_seconds: 1e-4, ..Inputs::default() });
            assert!(d >= last);
            last = d;
        }
    }

    #[test]
    fn the_cost_of_a_page_comes_from_the_latest_dirty_round() {
        // Round 0: 1000 pages, 600 zero, 4 ms of data: 10 µs per non-zero page.
        let r0 = round(0, 1000, 600, 4.0, 2.0);
        assert_eq!(page_seconds(&[]), None);
        assert!((page_seconds(std::slice::from_ref(&r0)).unwrap() - 10e-6).abs() < 1e-12);
        // A dirty round of 500 pages in 10 ms: 20 µs per page, and it wins (its
        // confirmation, 2 ms, is not a page's cost).
        let r1 = round(1, 500, 0, 10.0, 2.0);
        assert!((page_seconds(&[r0.clone(), r1.clone()]).unwrap() - 20e-6).abs() < 1e-12);
        // A later round too small to tell leaves round 1's figure.
        let r2 = round(2, 3, 0, 1.0, 0.3);
        assert!((page_seconds(&[r0, r1, r2]).unwrap() - 20e-6).abs() < 1e-12);
    }

    #[test]
    fn the_end_and_the_digest_speed_are_learned() {
        // (The only test that records: the record is this process's.)
        assert_eq!(end_seconds(), DEFAULT_END.as_secs_f64());
        // One stalled migration: the default (2 ms) still counts, and is the lower middle.
        record_end(10e-3);
        assert_eq!(end_seconds(), DEFAULT_END.as_secs_f64(), "one stall does not set the end alone");
        record_end(1e-3);
        assert_eq!(end_seconds(), 2e-3, "1, 2 (the default) and 10 ms: the median");
        record_end(1.5e-3);
        assert_eq!(end_seconds(), 1.5e-3, "three of its own: the default no longer counts");
        for _ in 0..KEPT {
            record_end(5e-3);
        }
        assert_eq!(end_seconds(), 5e-3, "only the last ones count");
        record_end(f64::NAN);
        record_end(-1.0);
        assert_eq!(end_seconds(), 5e-3, "nonsense is not kept");
        for _ in 0..KEPT / 2 {
            record_end(9e-3);
        }
        assert_eq!(end_seconds(), 5e-3, "of an even count, the lower middle one");

        assert_eq!(digest_seconds_per_byte(), None);
        record_digest(0.12, 1e9);
        record_digest(1.0, 0.0);
        assert_eq!(digest_seconds_per_byte(), Some(0.12 / 1e9), "a digest of nothing tells nothing");
    }
}
