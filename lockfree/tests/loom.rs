//! Every interleaving of the hand-offs' atomics, checked by loom. Runs only under
//! `RUSTFLAGS="--cfg loom"` (scripts/test.sh): `cargo test -p lockfree --release --test loom`.
#![cfg(loom)]

use lockfree::{AtomicBits, Claims, Cursor, Overlap};
use loom::sync::Arc;
use loom::thread;

/// Two lanes claim overlapping pages across a word boundary: exactly one wins, and the
/// table then holds exactly the winner's pages (the loser gave back what it took).
#[test]
fn overlapping_claims_one_wins_and_the_loser_takes_nothing() {
    loom::model(|| {
        let c = Arc::new(Claims::new(128).unwrap());
        let (a, b) = (c.clone(), c.clone());
        let ta = thread::spawn(move || a.claim(60, 70));
        let tb = thread::spawn(move || b.claim(62, 128));
        let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
        match (ra, rb) {
            (Ok(()), Err(Overlap)) => assert_eq!(c.claimed(), 10),
            (Err(Overlap), Ok(())) => assert_eq!(c.claimed(), 66),
            other => panic!("exactly one claim wins: {other:?}"),
        }
    });
}

/// Disjoint claims in the same word both win.
#[test]
fn disjoint_claims_in_one_word_both_win() {
    loom::model(|| {
        let c = Arc::new(Claims::new(64).unwrap());
        let (a, b) = (c.clone(), c.clone());
        let ta = thread::spawn(move || a.claim(0, 32));
        let tb = thread::spawn(move || b.claim(32, 64));
        assert_eq!((ta.join().unwrap(), tb.join().unwrap()), (Ok(()), Ok(())));
        assert_eq!(c.claimed(), 64);
    });
}

/// A window taken by a post-copy hint and by the cursor at once is sent once.
#[test]
fn a_bit_is_taken_once() {
    loom::model(|| {
        let bits = Arc::new(AtomicBits::new(3));
        let b = bits.clone();
        let t = thread::spawn(move || b.take(2));
        let here = bits.take(2);
        let there = t.join().unwrap();
        assert!(here ^ there, "exactly one taker");
        assert!(bits.get(2));
    });
}

/// Post-copy's hand-off: the fault thread sets the page's waiting bit, then looks for it
/// claimed; the placer claims it, then looks for a waiter. Whatever the interleaving, at
/// least one of them sees the other, so a waiting guest is always woken.
#[test]
fn a_waiter_and_a_placer_see_each_other() {
    loom::model(|| {
        let (claimed, waiting) = (Arc::new(AtomicBits::new(1)), Arc::new(AtomicBits::new(1)));
        let (c, w) = (claimed.clone(), waiting.clone());
        let placer = thread::spawn(move || {
            c.take(0);
            lockfree::order();
            w.get(0)
        });
        waiting.take(0);
        lockfree::order();
        let fault_saw_claim = claimed.get(0);
        let placer_saw_waiter = placer.join().unwrap();
        assert!(fault_saw_claim || placer_saw_waiter, "the waiting guest would never be woken");
    });
}

/// Two workers drain a round's cursor: every window goes to exactly one.
#[test]
fn each_window_goes_to_one_worker() {
    loom::model(|| {
        let c = Arc::new(Cursor::new(5, 2));
        let c2 = c.clone();
        let t = thread::spawn(move || std::iter::from_fn(|| c2.take()).flatten().collect::<Vec<_>>());
        let mut mine: Vec<u64> = std::iter::from_fn(|| c.take()).flatten().collect();
        mine.extend(t.join().unwrap());
        mine.sort_unstable();
        assert_eq!(mine, vec![0, 1, 2, 3, 4]);
    });
}
