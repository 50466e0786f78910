//! Migrations through the real engine over loopback: pre-copy rounds with pages dirtied
//! between them (including pages that turn zero), and the failures a migration must
//! survive without handing over memory that is not the source's.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use dataplane::auth::Auth;
use dataplane::conn::SessionError;
use dataplane::migrate::Verify;
use dataplane::migrate::dest::{DestOptions, Incoming, accept};
use dataplane::migrate::source::{Source, SourceOptions};
use dataplane::plan::*;

mod common;

fn plan(workers: usize, conns: u32, compression: Compression) -> Plan {
    common::plan(workers, conns, compression, 256 << 10)
}

fn key() -> Auth {
    common::key(7)
}

const PAGE: u64 = 4096;

/// Guest memory: a memfd of `pages` pages (plus a ragged tail), every third page zero.
fn guest(pages: u64, tail: u64) -> File {
    let f = hw::memmap::memfd("test-guest", pages * PAGE + tail, false).unwrap();
    for p in 0..pages {
        if p % 3 != 0 {
            f.write_all_at(&fill(p, 1), p * PAGE).unwrap();
        }
    }
    if tail > 0 {
        f.write_all_at(&vec![0xabu8; tail as usize], pages * PAGE).unwrap();
    }
    f
}

fn fill(page: u64, generation: u8) -> Vec<u8> {
    (0..PAGE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(page as u8) ^ generation).collect()
}

fn contents(f: &File) -> Vec<u8> {
    let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

fn dirty(bitmap: &mut [u64], page: u64) {
    bitmap[(page / 64) as usize] |= 1 << (page % 64);
}

fn opts<'a>(to: String, plan: &'a Plan) -> SourceOptions<'a> {
    SourceOptions { downtime_budget: Duration::from_millis(300), ..SourceOptions::migrate(to, key(), plan) }
}

/// A destination on a free port, on its own thread.
fn destination(plan: Plan) -> (String, std::thread::JoinHandle<Result<Incoming, SessionError>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (
        addr,
        std::thread::spawn(move || {
            accept(&l, &DestOptions { auth: key(), plan: &plan, vmm: None, recover: None, pool: None }, |_: &_| Ok(()))
        }),
    )
}

#[test]
fn rounds_carry_dirty_pages_and_the_memory_arrives_whole() {
    // The last case receives through io_uring (where the kernel allows it).
    for (workers, conns, compression, verify, uring) in [
        (1, 1, Compression::Off, Verify::Sent, false),
        (2, 2, Compression::Zstd { level: 1 }, Verify::Full, false),
        (2, 2, Compression::Off, Verify::Sent, true),
    ] {
        let pages = 700;
        let mem = guest(pages, 100);
        let words = (pages + 1).div_ceil(64) as usize;
        let mut plan = plan(workers, conns, compression);
        plan.tcp.io_uring = uring;
        let (addr, dest) = destination(plan.clone());
        let mut src = Source::connect(&mem, SourceOptions { verify, ..opts(addr, &plan) }).unwrap();
        let r0 = src.round(&vec![0; words]).unwrap();
        assert_eq!(r0.dirty_pages, pages + 1, "round 0 carries every page");
        assert!(r0.zero_pages >= pages / 3, "zero pages are flagged, not sent: {r0:?}");
        assert!(!r0.advise_pause && r0.estimated_downtime_ms.is_none(), "no dirty rate is known after round 0");

        // The guest writes: a zero page becomes data, a data page becomes zero, a page
        // changes, and the ragged tail changes.
        let mut bm = vec![0u64; words];
        for (p, data) in [(0u64, Some(5u8)), (1, None), (2, Some(9)), (650, Some(3))] {
            match data {
                Some(g) => mem.write_all_at(&fill(p, g), p * PAGE).unwrap(),
                None => mem.write_all_at(&[0u8; PAGE as usize], p * PAGE).unwrap(),
            }
            dirty(&mut bm, p);
        }
        mem.write_all_at(&[0x11u8; 100], pages * PAGE).unwrap();
        dirty(&mut bm, pages);
        let r1 = src.round(&bm).unwrap();
        assert_eq!(r1.dirty_pages, 5);
        assert!(r1.estimated_downtime_ms.is_some() && r1.dirty_rate_gbps.is_some(), "{r1:?}");

        // The VMM pauses; the last bitmap holds one more page.
        let mut last = vec![0u64; words];
        mem.write_all_at(&fill(333, 77), 333 * PAGE).unwrap();
        dirty(&mut last, 333);
        let rep = src.finish(&last).unwrap();
        assert_eq!(rep.rounds.len(), 3);
        assert!(rep.rounds[2].last);
        assert_eq!(rep.rounds[2].dirty_pages, 1);
        assert!(rep.digest_match);
        assert_eq!(rep.verify, verify);
        let inc = dest.join().unwrap().unwrap();
        assert_eq!(inc.report.digest, rep.digest);
        assert_eq!(inc.report.rounds.len(), 3);
        if uring && inc.report.transport != "tcp (io_uring)" {
            hw::report_skip(&format!("the migration destination received with {}: no io_uring receive here", inc.report.transport));
        }
        if !uring {
            assert_eq!(inc.report.transport, "sockets");
        }
        assert!(contents(&inc.memory[0]) == contents(&mem), "byte for byte, with {workers} worker(s) x {conns} lane(s), {compression}");
        assert!(hw::memmap::is_memory_file(&inc.memory[0]).unwrap());
    }
}

#[test]
fn several_regions_migrate_each_into_its_own_memfd() {
    // Two memory slots: 300 pages with a ragged tail, and 70 pages.
    let (a, b) = (guest(300, 10), guest(70, 0));
    let (wa, wb) = (301usize.div_ceil(64), 70usize.div_ceil(64));
    for verify in [Verify::Sent, Verify::Full] {
        let plan = plan(2, 1, Compression::Zstd { level: 1 });
        let (addr, dest) = destination(plan.clone());
        let mut src = Source::connect_regions(&[&a, &b], SourceOptions { verify, ..opts(addr, &plan) }).unwrap();
        assert_eq!(src.round(&vec![0; wa + wb]).unwrap().dirty_pages, 301 + 70);
        // Region 1's page 69 (its last) and region 0's page 300 (the tail).
        let mut bm = vec![0u64; wa + wb];
        b.write_all_at(&fill(69, 4), 69 * PAGE).unwrap();
        dirty(&mut bm[wa..], 69);
        a.write_all_at(&[0x77u8; 10], 300 * PAGE).unwrap();
        dirty(&mut bm[..wa], 300);
        assert_eq!(src.round(&bm).unwrap().dirty_pages, 2);
        assert!(src.round(&vec![0; wa + wb - 1]).unwrap_err().to_string().contains("2 region(s)"));
        drop(src);
        assert!(dest.join().unwrap().is_err());

        let (addr, dest) = destination(plan.clone());
        let mut src = Source::connect_regions(&[&a, &b], SourceOptions { verify, ..opts(addr, &plan) }).unwrap();
        src.round(&vec![0; wa + wb]).unwrap();
        let mut last = vec![0u64; wa + wb];
        b.write_all_at(&fill(3, 9), 3 * PAGE).unwrap();
        dirty(&mut last[wa..], 3);
        let rep = src.finish(&last).unwrap();
        let inc = dest.join().unwrap().unwrap();
        assert_eq!(inc.report.digest, rep.digest);
        assert_eq!(inc.memory.len(), 2);
        assert!(contents(&inc.memory[0]) == contents(&a), "region 0");
        assert!(contents(&inc.memory[1]) == contents(&b), "region 1");
    }
}

#[test]
fn untouched_memory_goes_as_zero_frames_without_being_read() {
    // 4 MiB, of which only the first 64 KiB and one page at 3 MiB were ever written: the
    // rest is a hole in the memfd.
    let mem = hw::memmap::memfd("holes", 4 << 20, false).unwrap();
    mem.write_all_at(&fill(0, 1).repeat(16), 0).unwrap();
    mem.write_all_at(&fill(768, 2), 3 << 20).unwrap();
    let plan = plan(2, 1, Compression::Off);
    let (addr, dest) = destination(plan.clone());
    let mut src = Source::connect(&mem, opts(addr, &plan)).unwrap();
    let r0 = src.round(&[0; 16]).unwrap();
    assert_eq!(r0.zero_pages, 1024 - 17);
    assert!(r0.wire_bytes < 17 * 4096 + 100 * 64, "{r0:?}");
    let rep = src.finish(&[0; 16]).unwrap();
    let inc = dest.join().unwrap().unwrap();
    assert_eq!(inc.report.digest, rep.digest);
    assert!(contents(&inc.memory[0]) == contents(&mem));
}

#[test]
fn a_page_dirtied_but_not_marked_fails_the_full_digest() {
    let mem = guest(128, 0);
    let plan = plan(1, 1, Compression::Off);
    let (addr, dest) = destination(plan.clone());
    let mut src = Source::connect(&mem, SourceOptions { verify: Verify::Full, ..opts(addr, &plan) }).unwrap();
    src.round(&[0, 0]).unwrap();
    // The VMM's dirty tracking misses this write.
    mem.write_all_at(&fill(40, 99), 40 * PAGE).unwrap();
    let err = src.finish(&[0, 0]).unwrap_err();
    assert!(matches!(err, SessionError::DigestMismatch { .. }), "{err}");
    let err = dest.join().unwrap().unwrap_err();
    assert!(matches!(err, SessionError::DigestMismatch { .. }), "the destination keeps nothing: {err}");
}

#[test]
fn the_source_dying_discards_the_destination() {
    let mem = guest(256, 0);
    let plan = plan(2, 1, Compression::Off);
    let (addr, dest) = destination(plan.clone());
    let mut src = Source::connect(&mem, opts(addr, &plan)).unwrap();
    src.round(&[0; 4]).unwrap();
    drop(src);
    let err = dest.join().unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("closed") || msg.contains("reset"), "{msg}");
}

#[test]
fn a_bitmap_of_the_wrong_size_ends_the_migration_and_the_source_is_untouched() {
    let mem = guest(256, 0);
    let before = contents(&mem);
    let plan = plan(1, 2, Compression::Off);
    let (addr, dest) = destination(plan.clone());
    let mut src = Source::connect(&mem, opts(addr, &plan)).unwrap();
    src.round(&[0; 4]).unwrap();
    let err = src.round(&[0; 3]).unwrap_err();
    assert!(err.to_string().contains("bitmap of 3 words for 256 pages"), "{err}");
    drop(src);
    assert!(dest.join().unwrap().is_err(), "an abandoned migration is never handed over");
    assert!(contents(&mem) == before, "the source memory is only read");
}

#[test]
fn a_disk_file_is_not_guest_memory() {
    let f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    f.as_file().set_len(8192).unwrap();
    let plan = plan(1, 1, Compression::Off);
    let err = Source::connect(f.as_file(), opts("127.0.0.1:1".into(), &plan)).unwrap_err();
    assert!(err.to_string().contains("not a memory file"), "{err}");
}

#[test]
fn a_one_shot_receiver_is_not_a_migration_destination() {
    let dir = tempfile::tempdir().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let plan = plan(1, 1, Compression::Off);
    let p2 = plan.clone();
    let out = dir.path().join("out");
    let recv = std::thread::spawn(move || {
        dataplane::engine::recv::recv_file(
            &l,
            &out,
            &dataplane::engine::recv::RecvOptions { auth: key(), plan: &p2, progress: None, total: None, timeout: None, pool: None },
        )
    });
    let mem = guest(16, 0);
    let err = Source::connect(&mem, opts(addr, &plan)).unwrap_err();
    assert!(err.to_string().contains("not a migration destination"), "{err}");
    assert!(recv.join().unwrap().is_err());
}
