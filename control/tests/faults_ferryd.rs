//! Fault injection against `ferryd` as a process: a destination VMM that goes away, guest
//! memory that shrinks or claims an impossible size, hostile sessions, a file that shrinks
//! while it is sent, and a control socket and metrics endpoint under abuse. Each case
//! failed on the code before it was fixed (issue 11); `scripts/faults.sh` runs this suite.

mod hostile;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use dataplane::metrics::Failure;
use dataplane::migrate::vmm::{ClientError, MigrateIn, MigrateOut, OutOptions};
use dataplane::wire::{Layout, features};
use hostile::*;
use hw::fdpass::LineConn;
use serde_json::json;

const PAGE: u64 = 4096;

/// Guest memory of `pages` pages, every page non-zero, and its bitmap memfd.
fn guest(pages: u64) -> (File, File) {
    let mem = hw::memmap::memfd("faults-guest", pages * PAGE, false).unwrap();
    let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 + 1).collect();
    for p in 0..pages {
        mem.write_all_at(&page, p * PAGE).unwrap();
    }
    let bitmap = hw::memmap::memfd("faults-dirty", dataplane::migrate::bitmap_bytes(pages * PAGE), false).unwrap();
    (mem, bitmap)
}

/// `migrate_in` on the raw socket: the connection and the address to migrate to.
fn migrate_in(d: &Ferryd) -> (LineConn, String) {
    let mut c = LineConn::new(UnixStream::connect(&d.socket).unwrap());
    c.send(&json!({"cmd": "migrate_in", "listen": "127.0.0.1:0"}).to_string(), &[]).unwrap();
    let (line, _) = c.recv().unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    (c, v["addr"].as_str().unwrap().to_string())
}

fn active(d: &Ferryd, role: &str) -> u64 {
    let s = d.status();
    s["status"]["active"].as_array().unwrap().iter().find(|a| a["role"] == role).map_or(0, |a| a["count"].as_u64().unwrap())
}

/// Case 1: the destination VMM closes its connection mid-migration. The source VMM must
/// be told (it was told `ok` while the destination dropped the memory), and may retry.
#[test]
fn a_destination_vmm_that_leaves_cancels_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let (mem, bitmap) = guest(512);
    let (vmm, addr) = migrate_in(&dst);
    let mut out = MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &OutOptions::default()).unwrap();
    out.round().unwrap();
    drop(vmm);
    let err = out.finish().unwrap_err();
    // The source's ferryd heard it from the destination's.
    assert!(matches!(err, ClientError::Ferryd { kind: Failure::Peer, .. }), "{err:?}");
    assert!(err.to_string().contains("destination VMM closed its control connection"), "{err}");
    wait_until(5, "the destination's session to end", || active(&dst, "migrate_in") == 0);
    // The VMM that takes the memory event but leaves instead of saying `taken`.
    let (mut vmm, addr) = migrate_in(&dst);
    let out = MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &OutOptions::default()).unwrap();
    let t = std::thread::spawn(move || {
        let (line, fds) = vmm.recv().unwrap().unwrap();
        assert!(line.contains("\"memory\""), "{line}");
        assert_eq!(fds.len(), 1);
        drop(vmm);
    });
    let err = out.finish().unwrap_err();
    t.join().unwrap();
    assert!(matches!(err, ClientError::Ferryd { kind: Failure::Peer, .. }), "{err:?}");
    assert!(err.to_string().contains("did not take its memory"), "{err}");
    // A retry with a VMM that does its part succeeds.
    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
    let addr = incoming.addr.clone();
    let waiter = std::thread::spawn(move || incoming.wait());
    MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &OutOptions::default()).unwrap().finish().unwrap();
    let (memory, _) = waiter.join().unwrap().unwrap();
    let mut a = vec![0u8; (512 * PAGE) as usize];
    let mut b = a.clone();
    mem.read_exact_at(&mut a, 0).unwrap();
    memory[0].read_exact_at(&mut b, 0).unwrap();
    assert!(a == b);
}

/// Case 2: guest memory that shrinks during a round is not migrated as zeros: the round
/// fails, and the destination hands nothing over.
#[test]
fn guest_memory_that_shrinks_mid_round_fails_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let (mem, bitmap) = guest(8192);
    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
    let addr = incoming.addr.clone();
    let waiter = std::thread::spawn(move || incoming.wait());
    // 32 MiB at 80 Mbit/s: round 0 takes over 3 s.
    let o = OutOptions { rate_limit_mbit: Some(80), ..OutOptions::default() };
    let mut out = MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &o).unwrap();
    let shrink = mem.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        shrink.set_len(2048 * PAGE).unwrap();
    });
    let err = out.round().unwrap_err();
    t.join().unwrap();
    assert!(matches!(err, ClientError::Ferryd { kind: Failure::Refused, .. }), "{err:?}");
    assert!(err.to_string().contains("changed size"), "{err}");
    assert!(waiter.join().unwrap().is_err(), "the destination hands nothing over");
}

/// Case 6 (migrate_in): a SESSION claiming 1 PiB or 512 GiB, or more receive buffers than
/// a session may take, is refused before anything is allocated, and ferryd lives on.
#[test]
fn oversized_migrations_are_refused_and_ferryd_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut dst = Ferryd::start(dir.path(), "dst");
    for (regions, chunk, lanes, want) in [
        (vec![1u64 << 50], 1 << 20, 1u16, "exceeds this host's limit"),
        (vec![512u64 << 30], 1 << 20, 1, "exceeds this host's limit"),
        (vec![1u64 << 30], 64 << 20, 8, "receive buffers"),
    ] {
        let (vmm, addr) = migrate_in(&dst);
        let layout = Layout { page_size: 4096, max_chunk: chunk, regions };
        let err = hostile_session(&addr, &layout, lanes, features::MIGRATE).expect_err("refused").to_string();
        assert!(err.contains(want), "{want}: {err}");
        let mut vmm = vmm;
        let (line, fds) = vmm.recv().unwrap().unwrap();
        assert!(line.contains("\"ok\":false") && fds.is_empty(), "{line}");
        assert!(dst.alive(), "ferryd died:\n{}", dst.log());
        assert!(rss(dst.pid()) < 256 << 20, "ferryd took {} MiB", rss(dst.pid()) >> 20);
    }
    assert_eq!(active(&dst, "migrate_in"), 0);
}

/// Case 7: a sparse memfd claiming 256 TiB of guest memory, rate limits of 0 or one that
/// overflows, and transports the plan cannot give are refused with a reason; ferryd lives
/// on and counts nothing active.
#[test]
fn impossible_guests_and_rates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = Ferryd::start(dir.path(), "src");
    let huge = hw::memmap::memfd("faults-huge", 256 << 40, false).unwrap();
    let huge_bitmap = hw::memmap::memfd("faults-huge-dirty", dataplane::migrate::bitmap_bytes(256 << 40), false).unwrap();
    let err = MigrateOut::start(&src.socket, "127.0.0.1:1", &huge, &huge_bitmap, &OutOptions::default()).unwrap_err();
    assert!(matches!(err, ClientError::Ferryd { kind: Failure::Refused, .. }), "{err:?}");
    assert!(err.to_string().contains("exceeds this host's limit"), "{err}");
    let (mem, bitmap) = guest(64);
    for rate in [0, 1 << 58] {
        let o = OutOptions { rate_limit_mbit: Some(rate), ..OutOptions::default() };
        let err = MigrateOut::start(&src.socket, "127.0.0.1:1", &mem, &bitmap, &o).unwrap_err();
        assert!(matches!(err, ClientError::Ferryd { kind: Failure::BadRequest, .. }), "{err:?}");
        assert!(err.to_string().contains("rate_limit_mbit"), "{err}");
    }
    // A transport the plan cannot give, or none known.
    for (t, why, kind) in
        [("rdma", "has no RDMA port", Failure::Refused), ("carrier-pigeon", "use rdma, tcp, sockets or auto", Failure::BadRequest)]
    {
        let o = OutOptions { transport: Some(t.into()), ..OutOptions::default() };
        let err = MigrateOut::start(&src.socket, "127.0.0.1:1", &mem, &bitmap, &o).unwrap_err();
        assert!(matches!(&err, ClientError::Ferryd { kind: k, .. } if *k == kind), "{t}: {err:?}");
        assert!(err.to_string().contains(why), "{t}: {err}");
    }
    assert!(src.alive(), "{}", src.log());
    assert_eq!(active(&src, "migrate_out"), 0);
    assert!(src.scrape().contains("ferry_sessions_active{role=\"migrate_out\"} 0"));
}

/// Case 8: a file that shrinks while ferryd sends it (it was mapped: SIGBUS ended ferryd
/// and every session in it). The receiver is stopped (SIGSTOP) once data flows, so the
/// file shrinks mid-transfer; then the send fails, and ferryd answers the next request.
#[test]
fn a_file_that_shrinks_while_ferryd_sends_it() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dir = tempfile::Builder::new().prefix("ferry-faults-").tempdir_in("/dev/shm").unwrap();
    let mut d = Ferryd::start(dir.path(), "src");
    let key = keyfile(dir.path());
    let big = dir.path().join("big.img");
    noise(&big, 256, 7);
    let addr = free_addr();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let r = receiver(&addr, &out_dir.join("out"), &key, &[]);
    let rpid = Pid::from_raw(r.child.id() as i32);
    let req = json!({"cmd": "send", "to": addr, "file": big, "compression": "off"});
    let sock = d.socket.clone();
    let t = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&sock).unwrap();
        writeln!(c, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        line
    });
    wait_until(10, "the transfer to start", || std::fs::read_dir(&out_dir).unwrap().next().is_some());
    kill(rpid, Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    File::options().write(true).open(&big).unwrap().set_len(0).unwrap();
    kill(rpid, Signal::SIGCONT).unwrap();
    let reply = t.join().unwrap();
    let _ = r.finish();
    assert!(d.alive(), "ferryd died:\n{}", d.log());
    assert!(reply.contains("\"ok\":false") && reply.contains("changed size"), "{reply}");
    d.status();
}

/// Case 9: the control socket and the metrics endpoint under abuse: a message with more
/// descriptors than allowed leaks none; a ferryd out of descriptors neither spins nor
/// floods its log; an idle metrics client delays no scrape; an endless request line costs
/// nothing; an existing regular file is never replaced by the control socket.
#[test]
fn the_control_socket_and_metrics_bound_their_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Ferryd::start_with(dir.path(), "d", &plan(), Some(64));
    let pid = d.pid();
    let before = open_fds(pid);
    let fd = hw::memmap::memfd("faults-fd", 4096, false).unwrap();
    for n in [65, 200] {
        let mut c = LineConn::new(UnixStream::connect(&d.socket).unwrap());
        let fds: Vec<_> = (0..n).map(|_| fd.as_fd()).collect();
        c.send("{\"cmd\":\"status\"}", &fds).unwrap();
        let (line, _) = c.recv().unwrap().unwrap();
        assert!(line.contains("descriptors came with one message"), "{line}");
    }
    wait_until(5, "ferryd's descriptors back to where they were", || open_fds(pid) <= before);
    // Past its 64 descriptors: it waits for descriptors instead of spinning.
    let mut held = Vec::new();
    for _ in 0..100 {
        match UnixStream::connect(&d.socket) {
            Ok(c) => held.push(c),
            Err(_) => break,
        }
    }
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let busy = (cpu_seconds(pid) - cpu0) / 2.0;
    assert!(busy < 0.3, "ferryd used {:.0}% of a CPU while out of descriptors", busy * 100.0);
    let log_len = d.log().len();
    assert!(log_len < 64 << 10, "{log_len} bytes of log");
    drop(held);
    wait_until(5, "ferryd to answer again", || d.ask(&json!({"cmd": "status"})).first().is_some_and(|v| v["ok"] == true));
    // An idle metrics client does not delay a scrape; HEAD and /healthz answer.
    let metrics = d.metrics.clone().unwrap();
    let _idle = TcpStream::connect(&metrics).unwrap();
    let t = Instant::now();
    assert!(d.scrape().starts_with("HTTP/1.0 200 OK"));
    assert!(t.elapsed() < Duration::from_secs(1), "the scrape waited {:?}", t.elapsed());
    for (req, want) in [("HEAD /metrics HTTP/1.0\r\n\r\n", "200 OK"), ("GET /healthz HTTP/1.0\r\n\r\n", "200 OK")] {
        let mut c = TcpStream::connect(&metrics).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        assert!(body.contains(want), "{req}: {body}");
        if req.starts_with("HEAD") {
            assert!(body.ends_with("\r\n\r\n"), "HEAD has no body");
        }
    }
    // A request line that never ends: cut off after a few KiB, at no cost.
    let rss0 = rss(pid);
    let mut endless = TcpStream::connect(&metrics).unwrap();
    let junk = vec![b'A'; 1 << 20];
    let mut sent = 0usize;
    while sent < 256 << 20 {
        match endless.write(&junk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 256 << 20, "ferryd read a 256 MiB request line");
    assert!(rss(pid) < rss0 + (32 << 20), "the request line cost {} MiB", (rss(pid) - rss0) >> 20);
    assert!(d.alive());
    // --control naming a regular file: refused, the file kept.
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    let out = std::process::Command::new(ferryd_bin())
        .arg("--plan")
        .arg(dir.path().join("d-plan.json"))
        .arg("--insecure-no-auth")
        .arg("--control")
        .arg(&precious)
        .args(["--metrics", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
}

/// Case 4 (migrate_in): probes and strangers at the destination's port do not end the
/// migration it waits for.
#[test]
fn strangers_do_not_stop_a_migration_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let (mem, bitmap) = guest(256);
    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
    let addr = incoming.addr.clone();
    let waiter = std::thread::spawn(move || incoming.wait());
    drop(TcpStream::connect(&addr).unwrap());
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(&[0xa5; 100]).unwrap();
    let _idle = TcpStream::connect(&addr).unwrap();
    MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &OutOptions::default()).unwrap().finish().unwrap();
    waiter.join().unwrap().unwrap();
}

/// The source's view of its guest memory, to show a failed migration left it as it was.
fn fingerprint(mem: &File, pages: u64) -> u64 {
    let mut buf = vec![0u8; (pages * PAGE) as usize];
    mem.read_exact_at(&mut buf, 0).unwrap();
    buf.chunks(8).fold(0xcbf2_9ce4_8422_2325u64, |h, w| (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x100_0000_01b3))
}

/// Case 7, on each TCP transport (plain sockets, io_uring): the destination ferryd is
/// killed mid-round, then the source ferryd. Each time the surviving side's VMM is told,
/// the source's memory is as it was, nothing is handed to a destination VMM, and a retry
/// through a fresh ferryd succeeds.
#[test]
fn a_ferryd_killed_mid_round_fails_the_migration_and_a_retry_succeeds() {
    for uring in [false, true] {
        let what = if uring { "io_uring" } else { "sockets" };
        let dir = tempfile::tempdir().unwrap();
        let p = plan_on(uring);
        let pages = 8192; // 32 MiB: 2.7 s at the rate below
        let (mem, bitmap) = guest(pages);
        let before = fingerprint(&mem, pages);
        let slow = OutOptions { rate_limit_mbit: Some(100), ..OutOptions::default() };

        // The destination dies mid-round.
        let src = Ferryd::start_with(dir.path(), "src", &p, None);
        let mut dst = Ferryd::start_with(dir.path(), "dst", &p, None);
        let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
        let mut out = MigrateOut::start(&src.socket, &incoming.addr, &mem, &bitmap, &slow).unwrap();
        let round = std::thread::spawn(move || out.round());
        wait_until(10, "the round to be under way at the destination", || dst.moving("migrate_in"));
        dst.child.kill().unwrap();
        let err = round.join().unwrap().unwrap_err().to_string();
        println!("{what}, destination killed mid-round, the source VMM hears: {err}");
        assert!(err.contains("peer closed") || err.contains("reset") || err.contains("Broken pipe"), "{what}: {err}");
        assert!(incoming.wait().is_err(), "{what}: nothing is handed to the destination VMM");
        assert_eq!(fingerprint(&mem, pages), before, "{what}: the source's memory is untouched");

        // The source dies mid-round; the destination ferryd lives on.
        let dst = Ferryd::start_with(dir.path(), "dst2", &p, None);
        let mut src2 = Ferryd::start_with(dir.path(), "src2", &p, None);
        let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
        let addr = incoming.addr.clone();
        let waiter = std::thread::spawn(move || incoming.wait());
        let mut out = MigrateOut::start(&src2.socket, &addr, &mem, &bitmap, &slow).unwrap();
        let round = std::thread::spawn(move || out.round());
        wait_until(10, "the round to be under way at the source", || src2.moving("migrate_out"));
        src2.child.kill().unwrap();
        assert!(round.join().unwrap().is_err(), "{what}: the source VMM is told");
        let err = waiter.join().unwrap().unwrap_err().to_string();
        println!("{what}, source killed mid-round, the destination VMM hears: {err}");
        assert!(err.contains("peer closed") || err.contains("reset"), "{what}: {err}");
        wait_until(10, "the destination's session to end", || active(&dst, "migrate_in") == 0);

        // A retry from the first source ferryd into the surviving destination succeeds,
        // on the other transport (the VMM's `transport` overrides the plan's).
        let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0").unwrap();
        let addr = incoming.addr.clone();
        let waiter = std::thread::spawn(move || incoming.wait());
        let other = if uring { "sockets" } else { "tcp" };
        let o = OutOptions { transport: Some(other.into()), ..OutOptions::default() };
        let rep = MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &o).unwrap().finish().unwrap();
        let (memory, _) = waiter.join().unwrap().unwrap();
        let want = if uring { dataplane::plan::Transport::Sockets } else { dataplane::plan::Transport::Tcp };
        assert_eq!(rep.transport, want.to_string(), "{what}: the retry ran on {other}");
        assert_eq!(fingerprint(&memory[0], pages), before, "{what}: the retry delivered the guest");
    }
}

/// `ferryctl proxy --ferryd`: both proxies of a stream-mode migration run inside ferryd
/// processes (no key given to ferryctl: ferryd's own); a fake QEMU's stream arrives whole,
/// both commands print their report and exit 0, and the source ferryd counts the session
/// and its channel. A stream cut mid-way (the destination ferryd killed) fails the source
/// command with exit 1, and its ferryd serves on.
#[test]
fn proxy_runs_in_ferryd() {
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    let (src, mut dst) = (Ferryd::start(dir.path(), "src"), Ferryd::start(dir.path(), "dst"));
    let qemu_in = dir.path().join("qemu-in.sock");
    let qemu_out = dir.path().join("qemu-out.sock");
    let dest_qemu = UnixListener::bind(&qemu_in).unwrap();
    let spawn = |args: &[&str]| {
        ferryctl()
            .args(["proxy", "--json"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The destination side says where it listens (in ferryd), which the source needs.
    // The rest of its output is drained, so its writes never meet a closed pipe.
    let serve = |d: &mut std::process::Child| {
        let mut lines = BufReader::new(d.stderr.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.split("listening on ").nth(1).and_then(|r| r.split(' ').next()).map(str::to_string))
            .expect("the destination proxy says where it listens");
        std::thread::spawn(move || lines.for_each(drop));
        addr
    };
    let forward = format!("unix:{}", qemu_in.display());
    let mut d = spawn(&["--ferryd", dst.socket.to_str().unwrap(), "--serve", "127.0.0.1:0", "--forward", &forward]);
    let addr = serve(&mut d);
    let mut s = spawn(&["--ferryd", src.socket.to_str().unwrap(), "--listen", &format!("unix:{}", qemu_out.display()), "--to", &addr]);
    wait_until(10, "the source endpoint", || qemu_out.exists());
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let mut q = UnixStream::connect(&qemu_out).unwrap();
    q.write_all(&data).unwrap();
    q.shutdown(std::net::Shutdown::Write).unwrap();
    let (mut incoming, _) = dest_qemu.accept().unwrap();
    let mut got = Vec::new();
    incoming.read_to_end(&mut got).unwrap();
    assert!(got == data, "the stream arrives whole");
    drop(incoming);
    let mut back = Vec::new();
    q.read_to_end(&mut back).unwrap();
    drop(q);
    for (what, child) in [("source", &mut s), ("destination", &mut d)] {
        let status = child.wait().unwrap();
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(status.success(), "{what}: {status:?}\n{out}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: {e}: {out}"));
        assert_eq!(r["channels"].as_array().map(Vec::len), Some(1), "{what}: {r}");
    }
    let m = src.scrape();
    for want in ["ferry_sessions_total{role=\"stream_out\",result=\"ok\"} 1", "ferry_stream_channels_total{role=\"stream_out\"} 1"] {
        assert!(m.contains(want), "{want} missing:\n{m}");
    }
    // The destination's ferryd dies mid-stream: the source command fails, its ferryd lives.
    let mut d = spawn(&["--ferryd", dst.socket.to_str().unwrap(), "--serve", "127.0.0.1:0", "--forward", &forward]);
    let addr = serve(&mut d);
    let mut s = spawn(&["--ferryd", src.socket.to_str().unwrap(), "--listen", &format!("unix:{}", qemu_out.display()), "--to", &addr]);
    wait_until(10, "the source endpoint", || qemu_out.exists());
    let mut q = UnixStream::connect(&qemu_out).unwrap();
    q.write_all(&data[..1 << 20]).unwrap();
    let (_incoming, _) = dest_qemu.accept().unwrap();
    dst.child.kill().unwrap();
    let _ = dst.child.wait();
    let status = s.wait().unwrap();
    assert_eq!(status.code(), Some(1), "the source command fails when the stream breaks");
    let _ = d.wait();
    drop(q);
    assert!(src.scrape().contains("ferry_sessions_total{role=\"stream_out\",result=\"error\"} 1"));
}
