//! Region mode through real `ferryd` processes, driven over the control socket as a VMM
//! drives it: descriptors by SCM_RIGHTS, a bitmap per round; descriptors that are not what
//! they should be. (A ferryd killed mid-round, on each transport, is in
//! `control/tests/faults_ferryd.rs` and, over RDMA, `control/tests/rxe_transfer.rs`.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use dataplane::migrate::vmm::{MigrateIn, MigrateOut, OutOptions};

const PAGE: u64 = 4096;

mod common;

use common::Ferryd;

fn page_bytes(p: u64, generation: u8) -> Vec<u8> {
    (0..PAGE).map(|i| (i as u8).wrapping_add(p as u8).wrapping_mul(7) ^ generation).collect()
}

/// 8 MiB of guest memory (every fourth page left zero) and its bitmap memfd.
fn guest() -> (File, File) {
    let pages = 2048;
    let mem = hw::memmap::memfd("guest", pages * PAGE, false).unwrap();
    for p in (0..pages).filter(|p| p % 4 != 0) {
        mem.write_all_at(&page_bytes(p, 1), p * PAGE).unwrap();
    }
    let bitmap = hw::memmap::memfd("dirty", dataplane::migrate::bitmap_bytes(pages * PAGE), false).unwrap();
    (mem, bitmap)
}

fn contents(f: &File) -> Vec<u8> {
    let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

/// The guest writes `pages` (generation `g`) and the VMM's bitmap says so.
fn dirty(mem: &File, bitmap: &File, pages: &[u64], g: u8) {
    let mut words = vec![0u64; (contents(bitmap).len() / 8).max(1)];
    for &p in pages {
        mem.write_all_at(&page_bytes(p, g), p * PAGE).unwrap();
        words[(p / 64) as usize] |= 1 << (p % 64);
    }
    let raw: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bitmap.write_all_at(&raw, 0).unwrap();
}

/// ferryd's status reply.
fn status(socket: &Path) -> serde_json::Value {
    let mut c = hw::fdpass::LineConn::new(std::os::unix::net::UnixStream::connect(socket).unwrap());
    c.send("{\"cmd\":\"status\"}", &[]).unwrap();
    serde_json::from_str(&c.recv().unwrap().unwrap().0).unwrap()
}

#[test]
fn a_guest_migrates_through_two_ferryd() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let (mut mem, bitmap) = guest();
    // The descriptor ferryd gets shares this file offset with us: ferry must not move it.
    use std::io::Seek;
    mem.seek(std::io::SeekFrom::Start(12345)).unwrap();
    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
    let addr = incoming.addr.clone();
    let waiter = std::thread::spawn(move || incoming.wait());
    let mut out = MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &OutOptions::default()).unwrap();
    assert_eq!(out.connected.bytes, 2048 * PAGE);
    let r0 = out.round().unwrap();
    assert_eq!(r0.dirty_pages, 2048);
    // Mid-migration, both ferryd already count round 0 per worker (live, not at the end).
    for (d, role) in [(&src, "migrate_out"), (&dst, "migrate_in")] {
        let st = status(&d.socket);
        let bytes: u64 = st["status"]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] == role)
            .map(|w| w["counters"]["region_bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(bytes, 2048 * PAGE, "{role}: {st}");
        assert!(st["status"]["active"].to_string().contains(role), "{st}");
        // Where the session stands: the guest's size and what has moved; the source also
        // knows its round and what the round had to move.
        let p = st["status"]["progress"].as_array().unwrap().iter().find(|p| p["role"] == role).cloned().unwrap_or_default();
        assert_eq!((p["size_bytes"].as_u64(), p["bytes"].as_u64()), (Some(2048 * PAGE), Some(2048 * PAGE)), "{role}: {st}");
        if role == "migrate_out" {
            assert_eq!((p["round"].as_u64(), p["round_total_bytes"].as_u64()), (Some(0), Some(2048 * PAGE)), "{st}");
            assert_eq!(p["eta_seconds"].as_f64(), Some(0.0), "{st}");
        }
    }
    dirty(&mem, &bitmap, &[0, 1, 700, 2047], 2);
    let r1 = out.round().unwrap();
    assert_eq!(r1.dirty_pages, 4);
    dirty(&mem, &bitmap, &[5], 3);
    let rep = out.finish().unwrap();
    assert_eq!(rep.rounds.len(), 3);
    let (got, drep) = waiter.join().unwrap().unwrap();
    assert_eq!(drep.digest, rep.digest);
    assert_eq!(got.len(), 1);
    assert!(contents(&got[0]) == contents(&mem), "the destination VMM gets the guest's memory");
    assert_eq!(mem.stream_position().unwrap(), 12345, "the VMM's file offset is where it left it");
}

#[test]
fn guest_memory_in_two_regions_comes_back_as_two_memfds() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let (a, _) = guest();
    let b = hw::memmap::memfd("slot1", 100 * PAGE, false).unwrap();
    b.write_all_at(&page_bytes(1, 5), PAGE).unwrap();
    // Region 0's 2048 pages take 32 words, region 1's 100 pages 2.
    let bitmap = hw::memmap::memfd("dirty2", (32 + 2) * 8, false).unwrap();
    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
    let addr = incoming.addr.clone();
    let waiter = std::thread::spawn(move || incoming.wait());
    let mut out = MigrateOut::start_regions(&src.socket, &addr, &[&a, &b], &bitmap, &OutOptions::default()).unwrap();
    assert_eq!(out.connected.regions, 2);
    assert_eq!(out.round().unwrap().dirty_pages, 2048 + 100);
    // Region 1, page 99: bit 35 of its second word, the bitmap's word 33.
    b.write_all_at(&page_bytes(99, 6), 99 * PAGE).unwrap();
    bitmap.write_all_at(&(1u64 << 35).to_le_bytes(), 33 * 8).unwrap();
    let rep = out.finish().unwrap();
    assert_eq!(rep.rounds.last().unwrap().dirty_pages, 1);
    let (got, _) = waiter.join().unwrap().unwrap();
    assert_eq!(got.len(), 2);
    assert!(contents(&got[0]) == contents(&a) && contents(&got[1]) == contents(&b));
    // A bitmap sized for one region is refused before anything moves.
    let short = hw::memmap::memfd("dirty1", 32 * 8, false).unwrap();
    let err = refused(MigrateOut::start_regions(&src.socket, "127.0.0.1:1", &[&a, &b], &short, &OutOptions::default()).unwrap_err());
    assert!(err.contains("2148 pages in 2 region(s)) need 272"), "{err}");
}

/// A refusal's sentence, once its kind says it is one.
fn refused(err: dataplane::migrate::vmm::ClientError) -> String {
    use dataplane::migrate::vmm::ClientError;
    assert!(matches!(err, ClientError::Ferryd { kind: dataplane::metrics::Failure::Refused, .. }), "{err:?}");
    err.to_string()
}

#[test]
fn descriptors_that_are_not_guest_memory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = Ferryd::start(dir.path(), "src");
    let (mem, bitmap) = guest();
    let o = OutOptions::default();
    // Nobody listens at the destination: each check must fail before connecting.
    let to = "127.0.0.1:1";
    let disk = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    disk.as_file().set_len(2048 * PAGE).unwrap();
    let err = refused(MigrateOut::start(&src.socket, to, disk.as_file(), &bitmap, &o).unwrap_err());
    assert!(err.contains("guest memory descriptor is a regular file on") && err.contains("not a memory file"), "{err}");
    let err = refused(MigrateOut::start(&src.socket, to, &mem, disk.as_file(), &o).unwrap_err());
    assert!(err.contains("dirty bitmap descriptor is a regular file on") && err.contains("not a memory file"), "{err}");
    // A pipe, named as such.
    let (r, _w) = std::io::pipe().unwrap();
    let pipe = File::from(std::os::fd::OwnedFd::from(r));
    let err = refused(MigrateOut::start(&src.socket, to, &mem, &pipe, &o).unwrap_err());
    assert!(err.contains("dirty bitmap descriptor is a pipe, not a memory file"), "{err}");
    let short = hw::memmap::memfd("short", 8, false).unwrap();
    let err = refused(MigrateOut::start(&src.socket, to, &mem, &short, &o).unwrap_err());
    assert!(err.contains("has 8 bytes") && err.contains("need 256"), "{err}");
    // One descriptor instead of two, on the raw socket.
    let conn = hw::fdpass::LineConn::new(std::os::unix::net::UnixStream::connect(&src.socket).unwrap());
    use std::os::fd::AsFd;
    conn.send(&format!("{{\"cmd\":\"migrate_out\",\"to\":\"{to}\"}}"), &[mem.as_fd()]).unwrap();
    let mut conn = conn;
    let (line, _) = conn.recv().unwrap().unwrap();
    assert!(line.contains("then the dirty bitmap's; 1 came"), "{line}");
    // A round outside a migration, and an unknown field.
    for (req, want) in
        [("{\"cmd\":\"round\"}", "belong to a migrate_out"), ("{\"cmd\":\"migrate_in\",\"listen\":\"x\",\"bogus\":1}", "unknown field")]
    {
        let mut c = hw::fdpass::LineConn::new(std::os::unix::net::UnixStream::connect(&src.socket).unwrap());
        c.send(req, &[]).unwrap();
        let (line, _) = c.recv().unwrap().unwrap();
        assert!(line.contains(want), "{req}: {line}");
    }
}

/// What a VMM's request leaves out comes from the plan (ferry.toml's `[migration]`): the
/// downtime budget, the round limit and the verification; an incoming migration asked
/// for port 0 listens on the first free port of `[daemon] incoming_ports`.
#[test]
fn the_plan_gives_what_a_request_leaves_out() {
    let dir = tempfile::tempdir().unwrap();
    // A free port to make the range of, and the one above it taken: the range's first
    // free port is the second.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let first = taken.local_addr().unwrap().port();
    let mut plan = common::ferryd_plan();
    plan.migration = dataplane::plan::MigrationDefaults {
        downtime_ms: 77,
        max_rounds: 2,
        verify: dataplane::migrate::Verify::Full,
        ..Default::default()
    };
    plan.daemon.incoming_ports = Some((first, first.saturating_add(20)));
    std::fs::write(dir.path().join("plan.json"), serde_json::to_string(&plan).unwrap()).unwrap();
    let (src, dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let (mem, bitmap) = guest();
    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
    let port: u16 = incoming.addr.rsplit(':').next().unwrap().parse().unwrap();
    assert!(port > first && port <= first + 20, "listening on {port}, outside {first}-{} past the taken {first}", first + 20);
    let addr = incoming.addr.clone();
    let waiter = std::thread::spawn(move || incoming.wait());
    let mut out = MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &OutOptions::default()).unwrap();
    out.round().unwrap();
    dirty(&mem, &bitmap, &[3], 2);
    // Round 1 is the plan's last pre-copy round: ferry advises pausing whatever it estimates.
    let r1 = out.round().unwrap();
    assert!(r1.advise_pause || r1.advise_postcopy, "{r1:?}");
    let rep = out.finish().unwrap();
    assert_eq!(rep.downtime_budget_ms, 77.0);
    assert_eq!(rep.verify, dataplane::migrate::Verify::Full);
    let (got, _) = waiter.join().unwrap().unwrap();
    assert!(contents(&got[0]) == contents(&mem));
    drop(taken);
}
