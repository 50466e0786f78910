//! Post-copy through real `ferryd` processes, driven as the two VMMs drive it: the
//! destination VMM maps the memory it is handed, registers a userfaultfd over the mapping
//! and passes it to ferryd, and the guest reads pages that are still at the source. The
//! link between the hosts runs through a relay the tests cut: restored (the migration
//! completes), never restored, or with the source ferryd killed. And the VMM's mistakes: a
//! userfaultfd that does not cover the memory, a descriptor that is not one, a fault
//! outside every region.

use std::fs::File;
use std::os::unix::fs::FileExt;

use dataplane::metrics::Failure;
use dataplane::migrate::MigrationReport;
use dataplane::migrate::postcopy::Mapping;
use dataplane::migrate::vmm::{Arrival, ClientError, MigrateIn, MigrateOut, OutOptions, PostcopyIn};
use hw::uffd::{GuestMapping, Userfault};

mod common;
use common::{Ferryd, Proxy};

const PAGE: u64 = 4096;
const PAGES: u64 = 512;

fn page_bytes(p: u64, generation: u8) -> Vec<u8> {
    (0..PAGE).map(|i| (i as u8).wrapping_add(p as u8).wrapping_mul(7) ^ generation).collect()
}

/// 2 MiB of guest memory (every fourth page left zero) and its bitmap memfd.
fn guest() -> (File, File) {
    let mem = hw::memmap::memfd("guest", PAGES * PAGE, false).unwrap();
    for p in (0..PAGES).filter(|p| p % 4 != 0) {
        mem.write_all_at(&page_bytes(p, 1), p * PAGE).unwrap();
    }
    let bitmap = hw::memmap::memfd("dirty", dataplane::migrate::bitmap_bytes(PAGES * PAGE), false).unwrap();
    (mem, bitmap)
}

/// The guest writes `pages` (generation `g`; zero pages for odd `p` when `g` is 9) and
/// the VMM's bitmap says so.
fn dirty(mem: &File, bitmap: &File, pages: impl Iterator<Item = u64>, g: u8) {
    let mut words = vec![0u64; PAGES.div_ceil(64) as usize];
    for p in pages {
        let bytes = if g == 9 && p % 2 == 1 { vec![0; PAGE as usize] } else { page_bytes(p, g) };
        mem.write_all_at(&bytes, p * PAGE).unwrap();
        words[(p / 64) as usize] |= 1 << (p % 64);
    }
    let raw: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bitmap.write_all_at(&raw, 0).unwrap();
}

fn page_of(f: &File, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE as usize];
    f.read_exact_at(&mut v, p * PAGE).unwrap();
    v
}

/// Whether this kernel lets this process serve minor faults on shared memory.
fn userfaultfd_or_skip() -> bool {
    match Userfault::create() {
        Ok(_) => true,
        Err(e) => {
            println!("SKIP: post-copy needs userfaultfd with minor faults on shared memory: {e}");
            false
        }
    }
}

/// A destination VMM that registers its mapping and hands ferryd the userfaultfd: what it
/// holds once ferryd serves the faults.
struct Running {
    pc: PostcopyIn,
    map: GuestMapping,
    uffd: Userfault,
}

fn take_postcopy(incoming: MigrateIn) -> Result<Running, Box<dyn std::error::Error + Send + Sync>> {
    let Arrival::Postcopy(mut pc) = incoming.next()? else { return Err("the memory came as pre-copy".into()) };
    let uffd = Userfault::create()?;
    let map = uffd.map_registered(&pc.memory[0])?;
    pc.serve(&uffd, &[Mapping { addr: map.addr(), len: map.len() }])?;
    Ok(Running { pc, map, uffd })
}

/// Pre-copy round 0 and the guest dirtying `stale`, then the switch-over: the source's
/// post-copy and the destination VMM, running.
fn switch_over(
    src: &Ferryd,
    to: &str,
    incoming: MigrateIn,
    mem: &File,
    bitmap: &File,
    o: &OutOptions,
    stale: impl Iterator<Item = u64>,
) -> (dataplane::migrate::vmm::PostcopyOut, Running) {
    let vmm = std::thread::spawn(move || take_postcopy(incoming));
    let mut out = MigrateOut::start(&src.socket, to, mem, bitmap, o).unwrap();
    assert_eq!(out.round().unwrap().dirty_pages, PAGES);
    dirty(mem, bitmap, stale, 9);
    let switched = out.postcopy().unwrap();
    (switched, vmm.join().unwrap().unwrap())
}

/// Page `p` as the guest sees it through `map` (a read of a stale page is a fault).
fn guest_page(map: &GuestMapping, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE as usize];
    map.read(p * PAGE, &mut v);
    v
}

/// Every page of the mapping equals the source's.
fn assert_guest_sees(map: &GuestMapping, mem: &File) {
    for p in (0..PAGES).rev() {
        assert!(guest_page(map, p) == page_of(mem, p), "page {p}");
    }
}

/// A source and a destination ferryd, and a destination VMM waiting for its memory
/// (`recover_s`: its recovery time).
fn hosts(recover_s: Option<u64>) -> (tempfile::TempDir, Ferryd, Ferryd, MigrateIn) {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let incoming = MigrateIn::start_with(&dst.socket, "127.0.0.1:0", recover_s).unwrap();
    (dir, src, dst, incoming)
}

fn finish(run: Running) -> Result<MigrationReport, ClientError> {
    let Running { pc, map, uffd } = run;
    let r = pc.wait(&uffd);
    drop(map);
    r
}

/// Two ferryd and a guest switched over to post-copy through a relay, pages 100.. stale and
/// pushed at 16 Mbit/s: the push takes most of a second, so what a test does lands in it.
/// `recover_s`: the destination's and the source's recovery times.
struct SlowPush {
    _dir: tempfile::TempDir,
    src: Ferryd,
    _dst: Ferryd,
    mem: File,
    relay: Proxy,
    out: dataplane::migrate::vmm::PostcopyOut,
    run: Running,
}

fn slow_push(recover_s: (Option<u64>, Option<u64>)) -> SlowPush {
    let (dir, src, dst, incoming) = hosts(recover_s.0);
    let (mem, bitmap) = guest();
    let relay = Proxy::start(&incoming.addr);
    let o = OutOptions { rate_limit_mbit: Some(16), recover_s: recover_s.1, ..OutOptions::default() };
    let (out, run) = switch_over(&src, &relay.addr, incoming, &mem, &bitmap, &o, 100..PAGES);
    SlowPush { _dir: dir, src, _dst: dst, mem, relay, out, run }
}

impl SlowPush {
    /// Waits until the post-copy attempt is up: pre-copy took a control connection and two
    /// lanes, the attempt the same and a fault lane.
    fn attempt_up(&self) {
        self.relay.wait_for(|accepted, _| accepted >= 7);
    }

    /// A ferryd's log so far (`src`, `dst`).
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self._dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Once the attempt is up and its lanes are in (the fault lane authenticates before
    /// them), the link goes silent: the silence falls on a running attempt, not on its
    /// handshakes. When it did.
    fn silence_the_running_attempt(&self) -> std::time::Instant {
        self.attempt_up();
        let t0 = std::time::Instant::now();
        while self.log("dst").matches("lane 1 connected").count() < 2 && t0.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.relay.silence();
        std::time::Instant::now()
    }
}

#[test]
fn a_guest_runs_at_the_destination_before_its_memory_arrived() {
    if !userfaultfd_or_skip() {
        return;
    }
    let (_dir, src, _dst, incoming) = hosts(None);
    let (mem, bitmap) = guest();
    let to = incoming.addr.clone();
    let (out, run) = switch_over(&src, &to, incoming, &mem, &bitmap, &OutOptions::default(), (0..PAGES).filter(|p| p % 3 == 0));
    // The guest reads every page at once, last first: stale pages fault to the source.
    assert_guest_sees(&run.map, &mem);
    let dest = finish(run).unwrap();
    let source = out.wait().unwrap();
    let pc = dest.postcopy.expect("a post-copy report");
    assert_eq!(pc.stale_pages, PAGES.div_ceil(3));
    assert_eq!(pc.pages_by_fault + pc.pages_by_push, pc.stale_pages, "{pc:?}");
    assert!(pc.faults >= 1 && pc.attempts == 1, "{pc:?}");
    assert_eq!(dest.digest, source.digest);
    assert!(source.switch_ms.is_some_and(|ms| ms > 0.0));
}

/// The push leaves out the pages the guest's faults fetched first: a guest that reads all
/// of its memory at once while the push crawls gets most pages by fault, and the source
/// sends each stale page about once in all.
#[test]
fn the_push_leaves_out_pages_a_fault_fetched() {
    if !userfaultfd_or_skip() {
        return;
    }
    let t = slow_push((None, None));
    t.attempt_up();
    assert_guest_sees(&t.run.map, &t.mem);
    let SlowPush { _dir, src: _src, _dst, out, run, .. } = t;
    let dest = finish(run).unwrap();
    let source = out.wait().unwrap();
    let (pc, spc) = (dest.postcopy.unwrap(), source.postcopy.unwrap());
    let pushed = source.rounds.last().unwrap().dirty_pages;
    assert_eq!(pc.pages_by_fault + pc.pages_by_push, PAGES - 100, "{pc:?}");
    assert!(spc.pages_by_fault > (PAGES - 100) / 2, "most pages came by fault: {spc:?}");
    // A page the push sent just before its fault's answer goes twice; a window of them at
    // most per worker.
    assert!(pushed + spc.pages_by_fault <= PAGES - 100 + 64, "pushed {pushed}, answered {}, stale {}", spc.pages_by_fault, PAGES - 100);
    assert_eq!(dest.digest, source.digest);
}

#[test]
fn a_link_cut_during_post_copy_and_restored_completes_the_migration() {
    if !userfaultfd_or_skip() {
        return;
    }
    let t = slow_push((Some(60), Some(60)));
    t.attempt_up();
    t.relay.cut();
    std::thread::scope(|s| {
        // The guest touches the last page, which the push has not reached: it waits.
        let map = &t.run.map;
        let reader = s.spawn(move || guest_page(map, PAGES - 1));
        // The source tries again, twice, into the cut.
        t.relay.wait_for(|_, refused| refused >= 2);
        assert!(!reader.is_finished(), "a page still at the source was read while the link was cut");
        t.relay.restore();
        assert!(reader.join().unwrap() == page_of(&t.mem, PAGES - 1));
    });
    assert_guest_sees(&t.run.map, &t.mem);
    let SlowPush { _dir, src: _src, _dst, out, run, .. } = t;
    let dest = finish(run).unwrap();
    let source = out.wait().unwrap();
    let pc = dest.postcopy.unwrap();
    assert!(pc.attempts >= 2, "{pc:?}");
    assert_eq!(pc.pages_by_fault + pc.pages_by_push, PAGES - 100);
    assert!(source.postcopy.unwrap().attempts >= 2);
    assert_eq!(dest.digest, source.digest);
}

/// A link that goes silent (every byte dropped while TCP still holds the connections, as
/// in a partition or behind a middlebox) is noticed by both sides through the fault lane's
/// heartbeat, while the guest waits on its fault; the source tries again, and once the
/// link is back the migration completes.
#[test]
fn a_silent_link_during_post_copy_is_noticed_and_recovered() {
    if !userfaultfd_or_skip() {
        return;
    }
    let t = slow_push((Some(60), Some(60)));
    let log = |name: &str| t.log(name);
    let since = t.silence_the_running_attempt();
    // Nothing below panics before the link is back: the guest's reader must be let go.
    let (noticed, early, page) = std::thread::scope(|s| {
        let map = &t.run.map;
        let reader = s.spawn(move || guest_page(map, PAGES - 1));
        let mut noticed = None;
        while since.elapsed() < std::time::Duration::from_secs(60) {
            if log("src").contains("the link went silent") && log("dst").contains("the link went silent") {
                noticed = Some(since.elapsed());
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let early = reader.is_finished();
        t.relay.restore();
        (noticed, early, reader.join().unwrap())
    });
    let noticed = noticed.unwrap_or_else(|| panic!("no side noticed the silence in 60 s:\n{}\n{}", log("src"), log("dst")));
    eprintln!("both sides noticed the silent link {noticed:?} after it went silent");
    assert!(!early, "a page still at the source was read while the link was silent");
    assert!(page == page_of(&t.mem, PAGES - 1));
    assert_guest_sees(&t.run.map, &t.mem);
    let SlowPush { _dir, src: _src, _dst, out, run, .. } = t;
    let dest = finish(run).unwrap();
    let source = out.wait().unwrap();
    assert!(dest.postcopy.unwrap().attempts >= 2);
    assert_eq!(dest.digest, source.digest);
}

/// The source tries again while the link is still silent: each attempt into it gives up
/// after a few silences (not after the idle timeout, or the kernel's connect retries), so
/// attempts keep coming and the first one after the link is back gets through.
#[test]
fn reconnects_into_a_silent_link_give_up_soon() {
    if !userfaultfd_or_skip() {
        return;
    }
    let t = slow_push((Some(120), Some(120)));
    let since = t.silence_the_running_attempt();
    // The source notices the silence (5 s), then tries: a second attempt within 25 s means
    // the first gave up on the silent link well before the 30 s idle timeout.
    let (_, swallowed_before) = t.relay.counts();
    let two = std::thread::scope(|s| {
        let map = &t.run.map;
        let reader = s.spawn(move || guest_page(map, PAGES - 1));
        let two = t
            .relay
            .wait_within(std::time::Duration::from_secs(25).saturating_sub(since.elapsed()), |_, swallowed| {
                swallowed >= swallowed_before + 2
            })
            .then(|| since.elapsed());
        t.relay.restore();
        reader.join().unwrap();
        two
    });
    let two = two.unwrap_or_else(|| panic!("one attempt into the silent link in 25 s:\n{}", t.log("src")));
    eprintln!("a second attempt came {two:?} after the link went silent");
    let SlowPush { _dir, src: _src, _dst, out, run, .. } = t;
    let dest = finish(run).unwrap();
    let source = out.wait().unwrap();
    assert!(dest.postcopy.unwrap().attempts >= 2);
    assert_eq!(dest.digest, source.digest);
}

#[test]
fn a_link_that_never_comes_back_fails_both_sides_clearly() {
    if !userfaultfd_or_skip() {
        return;
    }
    let t = slow_push((Some(2), Some(2)));
    t.attempt_up();
    t.relay.cut();
    let SlowPush { _dir, src: _src, _dst, out, run, .. } = t;
    let err = finish(run).unwrap_err();
    assert!(matches!(err, ClientError::Ferryd { kind: Failure::Cancelled, .. }), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("did not come back within 2 s") && err.contains("cannot complete"), "{err}");
    let err = out.wait().unwrap_err();
    assert!(matches!(err, ClientError::Ferryd { kind: Failure::Cancelled, .. }), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("did not come back within 2 s") && err.contains("keep this memory"), "{err}");
}

#[test]
fn a_source_ferryd_killed_in_post_copy_is_reported_at_the_destination() {
    if !userfaultfd_or_skip() {
        return;
    }
    let mut t = slow_push((Some(2), None));
    t.attempt_up();
    t.src.child.kill().unwrap();
    t.src.child.wait().unwrap();
    let SlowPush { _dir, _dst, out, run, .. } = t;
    let err = finish(run).unwrap_err();
    assert!(matches!(err, ClientError::Ferryd { kind: Failure::Cancelled, .. }), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("source did not come back") && err.contains("cannot complete"), "{err}");
    assert!(out.wait().is_err());
}

#[test]
fn a_userfaultfd_that_does_not_cover_the_memory_is_refused_and_the_source_keeps_the_guest() {
    if !userfaultfd_or_skip() {
        return;
    }
    let (_dir, src, _dst, incoming) = hosts(None);
    let (mem, bitmap) = guest();
    let to = incoming.addr.clone();
    let vmm = std::thread::spawn(move || {
        let Ok(Arrival::Postcopy(mut pc)) = incoming.next() else { panic!("no post-copy") };
        let uffd = Userfault::create().unwrap();
        let map = uffd.map_registered(&pc.memory[0]).unwrap();
        // The VMM names an address its registration does not cover (nothing is mapped there).
        let err = pc.serve(&uffd, &[Mapping { addr: map.addr() + (1 << 40), len: PAGES * PAGE }]).unwrap_err();
        drop(map);
        err
    });
    let mut out = MigrateOut::start(&src.socket, &to, &mem, &bitmap, &OutOptions::default()).unwrap();
    out.round().unwrap();
    dirty(&mem, &bitmap, 0..10, 2);
    let err = out.postcopy().unwrap_err().to_string();
    assert!(err.contains("post-copy refused") && err.contains("the source keeps the guest"), "{err}");
    let vmm_err = vmm.join().unwrap();
    assert!(matches!(vmm_err, ClientError::Ferryd { kind: Failure::Cancelled, .. }), "{vmm_err:?}");
    let vmm_err = vmm_err.to_string();
    assert!(vmm_err.contains("is not registered with the userfaultfd") && err.contains("not registered"), "{vmm_err} / {err}");
}

#[test]
fn a_fault_outside_every_region_fails_the_migration_clearly() {
    if !userfaultfd_or_skip() {
        return;
    }
    let SlowPush { _dir, src: _src, _dst, out, run, .. } = slow_push((None, None));
    // The VMM registered more than the guest memory with the same userfaultfd.
    let extra = hw::memmap::sealed_memfd("extra", PAGE).unwrap();
    let extra_map = run.uffd.map_registered(&extra).unwrap();
    std::thread::scope(|s| {
        let toucher = s.spawn(|| extra_map.words()[0].load(std::sync::atomic::Ordering::Relaxed));
        let Running { pc, map, uffd } = run;
        let err = pc.wait(&uffd).unwrap_err().to_string();
        assert!(err.contains("outside every region"), "{err}");
        // The VMM closes its userfaultfd: the touching thread goes on (the page reads zero).
        drop(uffd);
        assert_eq!(toucher.join().unwrap(), 0);
        drop(map);
    });
    let err = out.wait().unwrap_err().to_string();
    assert!(err.contains("outside every region"), "{err}");
}

#[test]
fn a_destination_vmm_that_goes_away_in_post_copy_fails_both_sides() {
    if !userfaultfd_or_skip() {
        return;
    }
    let SlowPush { _dir, src: _src, _dst, out, run, .. } = slow_push((None, None));
    // The VMM closes its control connection mid-push (it died, say).
    let Running { pc, map, uffd } = run;
    drop(pc);
    let err = out.wait().unwrap_err().to_string();
    assert!(err.contains("destination VMM closed its control connection during post-copy"), "{err}");
    drop((map, uffd));
}
