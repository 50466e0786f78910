//! Four migrations at once through one pair of ferryd, on each TCP transport: every one
//! verified byte for byte, and each session counted apart while it runs (its own series
//! in `/metrics`), the process totals equal to what the four moved once they end. Their
//! lanes run on the destination's receiving threads: it starts no thread for them.

mod hostile;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use dataplane::migrate::vmm::{MigrateIn, MigrateOut, OutOptions};
use hostile::*;

const PAGE: u64 = 4096;
const PAGES: u64 = 2048;

/// Guest memory whose every page differs with `seed`, and its (clean) bitmap.
fn guest(seed: u64) -> (File, File) {
    let mem = hw::memmap::memfd("concurrent-guest", PAGES * PAGE, false).unwrap();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut page = vec![0u8; PAGE as usize];
    for p in 0..PAGES {
        for b in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        mem.write_all_at(&page, p * PAGE).unwrap();
    }
    let bitmap = hw::memmap::memfd("concurrent-dirty", dataplane::migrate::bitmap_bytes(PAGES * PAGE), false).unwrap();
    (mem, bitmap)
}

fn bytes(f: &File) -> Vec<u8> {
    let mut b = vec![0u8; (PAGES * PAGE) as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    b
}

/// The sessions a scrape lists for `role`, and the sum of a totals series for `role`.
fn sessions(text: &str, role: &str) -> BTreeSet<String> {
    let prefix = format!("ferry_session_region_bytes{{role=\"{role}\",session=\"");
    text.lines().filter_map(|l| l.strip_prefix(&prefix)).map(|rest| rest.split('"').next().unwrap().to_string()).collect()
}

/// The threads process `pid` has now.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

fn total(text: &str, series: &str, role: &str) -> u64 {
    let prefix = format!("{series}{{role=\"{role}\",");
    text.lines().filter(|l| l.starts_with(&prefix)).map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap()).sum()
}

#[test]
fn four_migrations_at_once_through_one_pair_of_ferryd() {
    for uring in [false, true] {
        let what = if uring { "io_uring" } else { "sockets" };
        let dir = tempfile::tempdir().unwrap();
        let mut p = plan_on(uring);
        p.tcp.connections_per_worker = 2;
        let (src, dst) = (Ferryd::start_with(dir.path(), "src", &p, None), Ferryd::start_with(dir.path(), "dst", &p, None));
        let guests: Vec<(File, File)> = (0..4).map(guest).collect();
        let idle = threads(dst.pid());
        // 8 MiB each at 64 Mbit/s: a second each, all four under way together.
        let opts = OutOptions { rate_limit_mbit: Some(64), ..OutOptions::default() };
        let (seen_src, seen_dst) = std::thread::scope(|s| {
            let runs: Vec<_> = guests
                .iter()
                .map(|(mem, bitmap)| {
                    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
                    let out = MigrateOut::start(&src.socket, &incoming.addr, mem, bitmap, &opts).unwrap();
                    let waiter = s.spawn(move || incoming.wait());
                    (s.spawn(move || out.finish()), waiter)
                })
                .collect();
            // While they run, each is a session of its own on both sides: the most sessions
            // one scrape lists at once.
            let (mut seen_src, mut seen_dst) = (BTreeSet::new(), BTreeSet::new());
            let t = Instant::now();
            while (seen_src.len() < 4 || seen_dst.len() < 4) && t.elapsed() < Duration::from_secs(20) {
                let (a, b) = (sessions(&src.scrape(), "migrate_out"), sessions(&dst.scrape(), "migrate_in"));
                if a.len() > seen_src.len() {
                    seen_src = a;
                }
                if b.len() > seen_dst.len() {
                    seen_dst = b;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // All four under way: its receiving threads hold the eight lanes (`status` says so) while it runs no
            // more threads than before and one per VMM connection (a handshake's thread,
            // bounded and brief, may still be ending when the lanes are first held).
            let held = || dst.status()["pool"]["receiving"].as_array().map_or(0, |r| r.iter().filter_map(|n| n.as_u64()).sum::<u64>());
            let mut during = usize::MAX;
            wait_until(5, &format!("{what}: the receiving threads holding the 8 lanes, no thread started for them"), || {
                during = threads(dst.pid());
                held() == 8 && during <= idle + 4
            });
            println!("{what}: destination threads {idle} before, {during} during four migrations (8 lanes)");
            for ((out, waiter), (mem, _)) in runs.into_iter().zip(&guests) {
                let rep = out.join().unwrap().unwrap_or_else(|e| panic!("{what}: {e}"));
                let (memory, dest) = waiter.join().unwrap().unwrap();
                assert_eq!(rep.digest, dest.digest, "{what}");
                assert!(bytes(&memory[0]) == bytes(mem), "{what}: each destination holds its own guest");
            }
            (seen_src, seen_dst)
        });
        assert_eq!(seen_src.len(), 4, "{what}: four sessions at once, counted apart at the source: {seen_src:?}");
        assert_eq!(seen_dst.len(), 4, "{what}: four at the destination: {seen_dst:?}");
        wait_until(10, "the sessions to end", || sessions(&src.scrape(), "migrate_out").is_empty());
        // `status` says per sending thread what it holds: nothing, once every session ended.
        wait_until(10, "the source's sending threads to hold no round", || {
            let sending = src.status()["pool"]["sending"].as_array().cloned().unwrap_or_default();
            !sending.is_empty() && sending.iter().all(|n| n.as_u64() == Some(0))
        });
        let (a, b) = (src.scrape(), dst.scrape());
        assert_eq!(total(&a, "ferry_worker_region_bytes_total", "migrate_out"), 4 * PAGES * PAGE, "{what}:\n{a}");
        assert_eq!(total(&b, "ferry_worker_region_bytes_total", "migrate_in"), 4 * PAGES * PAGE, "{what}:\n{b}");
        println!("{what}: four concurrent migrations verified; sessions seen apart: {seen_src:?}");
    }
}
