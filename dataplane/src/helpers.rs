//! The helper threads: work that fans one step of a session out across the CPUs (the
//! paused guest's digest, hashing what one-sided writes placed, keying post-copy's stale
//! pages) runs on threads started once per process, never per session or per round.
//!
//! They are rayon's: a scope borrows the session's memory for the step, safely, and a
//! helper that fans out again (a digest of several regions, each in pieces) works on its
//! own parts while it waits instead of holding a thread idle.

use std::sync::OnceLock;

static HELPERS: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// The process's helper threads, one per CPU it may use, started at first use.
pub(crate) fn helpers() -> &'static rayon::ThreadPool {
    HELPERS.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .thread_name(|i| format!("ferry-h{i}"))
            .build()
            .expect("starting the helper threads")
    })
}

/// Runs `work` `n` times at once (at least once): on the calling thread and on `n - 1`
/// helpers. Returns each run's result; a run that panics panics here.
pub(crate) fn fan_out<R: Send>(n: usize, work: impl Fn() -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..n.max(1)).map(|_| None).collect();
    helpers().in_place_scope(|s| {
        let (mine, rest) = out.split_first_mut().expect("at least one run");
        let work = &work;
        for slot in rest {
            s.spawn(move |_| *slot = Some(work()));
        }
        *mine = Some(work());
    });
    out.into_iter().map(|r| r.expect("every run of a scope ends before it does")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Every run happens once and its result comes back; a nested fan-out from a helper
    /// does not wait on itself.
    #[test]
    fn every_run_once_and_nested() {
        let next = AtomicUsize::new(0);
        let got = fan_out(4, || {
            let inner: usize = fan_out(3, || 1).into_iter().sum();
            next.fetch_add(1, Ordering::Relaxed) * 10 + inner
        });
        let mut firsts: Vec<usize> = got.iter().map(|v| v / 10).collect();
        firsts.sort();
        assert_eq!(firsts, vec![0, 1, 2, 3]);
        assert!(got.iter().all(|v| v % 10 == 3));
        assert_eq!(fan_out(0, || 7), vec![7]);
    }
}
