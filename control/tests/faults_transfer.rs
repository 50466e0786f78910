//! Fault injection against `ferryctl recv`, `send` and `proxy` as processes: what a
//! stranger, a hostile key holder, an on-path relay or an unlucky operator does to them.
//! Each case failed on the code before it was fixed (issue 11); `scripts/faults.sh` runs
//! this suite and its ferryd twin.

mod hostile;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dataplane::wire::{HEADER_LEN, Header, Kind, Layout};
use hostile::*;
use zerocopy::{FromBytes, IntoBytes};

/// Case 1 (one-shot): the file is in place before the sender hears of success. `--out`
/// turns into a directory while the transfer runs: the rename fails, and the sender must
/// not exit 0 (it did, while the receiver deleted the data).
#[test]
fn the_sender_hears_ok_only_once_the_file_is_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path());
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    noise(&src, 4, 1);
    let addr = free_addr();
    let r = receiver(&addr, &out, &key, &[]);
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"mine").unwrap();
    let (code, err) = send(&addr, &src, &key);
    let (rcode, rlog) = r.finish();
    assert_ne!(code, Some(0), "the sender must not report success: {err}");
    assert_ne!(rcode, Some(0), "{rlog}");
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"mine", "the directory is untouched");
    let partials =
        std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".partial"));
    assert_eq!(partials.count(), 0);
    // And `--out` that names a directory from the start is refused before anything moves.
    let (code, _) = ferryctl()
        .args(["recv", "--embedded", "--listen", &free_addr(), "--key"])
        .arg(&key)
        .arg("--out")
        .arg(dir.path())
        .output()
        .map(|o| (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert_ne!(code, Some(0));
}

/// Case 3: two receivers given the same `--out` each write a file of their own and put it
/// in place whole: the result is one sender's bytes, never a mix.
#[test]
fn two_receivers_with_one_out_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path());
    let (a, b, out) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("out"));
    noise(&a, 48, 1);
    noise(&b, 48, 2);
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let (ra, rb) = (receiver(&addr_a, &out, &key, &[]), receiver(&addr_b, &out, &key, &[]));
    let (sa, sb) = std::thread::scope(|s| {
        let sa = s.spawn(|| send(&addr_a, &a, &key));
        let sb = s.spawn(|| send(&addr_b, &b, &key));
        (sa.join().unwrap(), sb.join().unwrap())
    });
    assert_eq!(sa.0, Some(0), "{}", sa.1);
    assert_eq!(sb.0, Some(0), "{}", sb.1);
    assert_eq!(ra.finish().0, Some(0));
    assert_eq!(rb.finish().0, Some(0));
    let got = std::fs::read(&out).unwrap();
    assert!(got == std::fs::read(&a).unwrap() || got == std::fs::read(&b).unwrap(), "the file mixes both senders' bytes");
}

/// Case 4: a port probe, garbage, a wrong key and a connection that sends a byte now and
/// then do not end the receiver or delay its real sender, who succeeds.
#[test]
fn strangers_do_not_stop_a_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path());
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    noise(&src, 8, 3);
    let addr = free_addr();
    let r = receiver(&addr, &out, &key, &[]);
    drop(TcpStream::connect(&addr).unwrap());
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(&[0x5a; 200]).unwrap();
    // A HELLO header that claims a 64 MiB payload.
    let mut big = TcpStream::connect(&addr).unwrap();
    big.write_all(Header::new(Kind::Hello, 64 << 20).as_bytes()).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut t = TcpStream::connect(&addr).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if t.write_all(b"F").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let (code, err) = send(&addr, &src, &wrong_keyfile(dir.path()));
        assert_ne!(code, Some(0));
        assert!(err.contains("authentication failed"), "{err}");
        let (code, err) = send(&addr, &src, &key);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(code, Some(0), "{err}");
    });
    let (code, log) = r.finish();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("turned away"), "the strangers are logged: {log}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

/// Case 6 (one-shot): a SESSION that claims more than the host can back (1 PiB, 512 GiB
/// on a tmpfs) or more receive buffers than a session may take (8 lanes of 64 MiB chunks)
/// is refused before anything is allocated; no sparse file is left behind.
#[test]
fn oversized_sessions_are_refused_before_allocating() {
    let dir = tempfile::Builder::new().prefix("ferry-faults-").tempdir_in("/dev/shm").unwrap();
    let key = keyfile(dir.path());
    let out = dir.path().join("out");
    for (regions, chunk, lanes, want) in [
        (vec![1u64 << 50], 1 << 20, 1u16, "exceeds this host's limit"),
        (vec![512u64 << 30], 1 << 20, 1, "exceeds this host's limit"),
        (vec![1u64 << 30], 64 << 20, 8, "receive buffers"),
    ] {
        let addr = free_addr();
        let r = receiver(&addr, &out, &key, &[]);
        let pid = r.child.id();
        let layout = Layout { page_size: 4096, max_chunk: chunk, regions };
        let err = hostile_session(&addr, &layout, lanes, 0).expect_err("the session is refused").to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(rss(pid) < 256 << 20, "the receiver took {} MiB", rss(pid) >> 20);
        let (code, log) = r.finish();
        assert_eq!(code, Some(1), "a clear error, not a crash: {log}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n != "key").collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// Case 10: a relay on the path that changes a byte of a data frame and recomputes its
/// CRC (and could recompute any unkeyed digest) is caught: both sides fail, nothing is
/// written.
#[test]
fn an_on_path_relay_cannot_rewrite_memory() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path());
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    noise(&src, 2, 4);
    let addr = free_addr();
    let r = receiver(&addr, &out, &key, &[]);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let to = addr.clone();
    std::thread::spawn(move || {
        // Every connection is relayed; data connections (lane 0..) get one payload byte of
        // their first DATA frame flipped and its CRC recomputed.
        for c in relay.incoming() {
            let Ok(client) = c else { return };
            let server = TcpStream::connect(&to).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            std::thread::spawn(move || tamper(client, server));
        }
    });
    let (code, err) = send(&relay_addr, &src, &key);
    let (rcode, rlog) = r.finish();
    assert_ne!(code, Some(0), "{err}");
    assert_ne!(rcode, Some(0));
    assert!(rlog.contains("failed authentication"), "{rlog}");
    assert!(!out.exists());
}

/// Copies `from` to `to`, flipping a byte in the first DATA frame's payload and resealing
/// its CRC. Frames after the handshake carry a 16-byte tag, which it cannot recompute.
fn tamper(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut done = false;
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if done {
            if to.write_all(&chunk[..n]).is_err() {
                return;
            }
            continue;
        }
        buf.extend_from_slice(&chunk[..n]);
        // Walk the frames seen so far (handshake frames have no tag, later ones do).
        let mut at = 0;
        while buf.len() >= at + HEADER_LEN {
            let h = Header::read_from_bytes(&buf[at..at + HEADER_LEN]).unwrap();
            let len = h.length.get() as usize;
            let kind = h.kind;
            let plain = [Kind::Hello as u8, Kind::Challenge as u8, Kind::Response as u8].contains(&kind);
            let total = HEADER_LEN + len + if plain { 0 } else { 16 };
            if buf.len() < at + total {
                break;
            }
            if kind == Kind::Data as u8 && len > 0 {
                buf[at + HEADER_LEN] ^= 0xff;
                let h = h.seal(&buf[at + HEADER_LEN..at + HEADER_LEN + len]);
                buf[at..at + HEADER_LEN].copy_from_slice(h.as_bytes());
                done = true;
                at += total;
                break;
            }
            at += total;
        }
        if done || at > 0 {
            if to.write_all(&buf[..at]).is_err() {
                return;
            }
            buf.drain(..at);
        }
        if done {
            if to.write_all(&buf).is_err() {
                return;
            }
            buf.clear();
        }
    }
}

/// Case 5: the stream proxy's destination side under a flood: connections whose HELLO
/// claims 64 MiB, idle connections past its descriptor limit, and a trickler. It neither
/// grows nor exits, carries the real migration, and ends when the migration has.
#[test]
fn the_stream_proxy_bounds_what_strangers_cost() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path());
    let qemu_src = dir.path().join("qemu-src.sock");
    let qemu_dst = dir.path().join("qemu-dst.sock");
    let dest_qemu = UnixListener::bind(&qemu_dst).unwrap();
    let serve = free_addr();
    // The destination proxy with 128 descriptors in all.
    let mut dst = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" \"$@\"")
        .arg(ferryctl().get_program())
        .args(["proxy", "--serve", &serve, "--forward"])
        .arg(format!("unix:{}", qemu_dst.display()))
        .arg("--key")
        .arg(&key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(10, "the destination proxy listening", || TcpStream::connect(&serve).is_ok());
    let pid = dst.id();
    let hello = Header::new(Kind::Hello, 64 << 20);
    let mut flood: Vec<TcpStream> = Vec::new();
    for _ in 0..24 {
        let mut s = TcpStream::connect(&serve).unwrap();
        let _ = s.write_all(hello.as_bytes());
        flood.push(s);
    }
    // More idle connections than it has descriptors: past its handshake slots they wait in
    // the kernel's backlog, and once that is full new ones are not answered (so connect
    // with a timeout).
    let sa: std::net::SocketAddr = serve.parse().unwrap();
    for _ in 0..200 {
        match TcpStream::connect_timeout(&sa, Duration::from_millis(200)) {
            Ok(s) => flood.push(s),
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(dst.try_wait().unwrap().is_none(), "the proxy exited under the flood");
    assert!(rss(pid) < 128 << 20, "the proxy took {} MiB", rss(pid) >> 20);
    drop(flood);
    let mut trickle = TcpStream::connect(&serve).unwrap();
    trickle.write_all(b"F").unwrap();
    // The real migration: a fake QEMU writes 8 MiB into the source proxy's socket.
    let mut src = hostile::ferryctl()
        .args(["proxy", "--listen"])
        .arg(format!("unix:{}", qemu_src.display()))
        .args(["--to", &serve, "--key"])
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(10, "the source proxy listening", || qemu_src.exists());
    let stream: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let reader = std::thread::spawn(move || {
        let (mut q, _) = dest_qemu.accept().unwrap();
        let mut got = Vec::new();
        q.read_to_end(&mut got).unwrap();
        got
    });
    let mut q = std::os::unix::net::UnixStream::connect(&qemu_src).unwrap();
    q.write_all(&stream).unwrap();
    q.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    let _ = q.read_to_end(&mut back);
    drop(q);
    assert!(reader.join().unwrap() == stream, "the stream arrived whole");
    assert!(src.wait().unwrap().success());
    // The trickler does not keep the destination alive after the migration ended.
    let t = Instant::now();
    while dst.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "the destination proxy outlived its migration");
        let _ = trickle.write_all(b"F");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(dst.wait().unwrap().success());
}

/// A receiver that runs out of space mid-transfer says why, and the sender reports that
/// reason, not a peer that "exited or was killed". Needs a small tmpfs (mount, as root).
#[test]
fn a_receiver_out_of_space_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "ferry-faults"]).arg(&small).status();
    if !mounted.is_ok_and(|s| s.success()) {
        hw::report_skip("cannot mount a small tmpfs here (needs root): the out-of-space case is not run");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let key = keyfile(dir.path());
    let src = dir.path().join("src");
    noise(&src, 16, 5);
    // A configured limit replaces the free-space check, so the transfer starts and the
    // file system fills up under it.
    let cfg = dir.path().join("ferry.toml");
    std::fs::write(&cfg, "[limits]\nmax_region_gib = 1\n").unwrap();
    let addr = free_addr();
    let r = receiver(&addr, &small.join("out"), &key, &["--config", cfg.to_str().unwrap()]);
    let (code, err) = send(&addr, &src, &key);
    let (rcode, rlog) = r.finish();
    assert_ne!(code, Some(0));
    assert_ne!(rcode, Some(0), "{rlog}");
    assert!(err.contains("No space left on device"), "the sender names the receiver's reason: {err}");
    assert!(!err.contains("killed"), "{err}");
    // Without the pinned limit, the receiver refuses the session up front, saying why.
    let r = receiver(&addr, &small.join("out"), &key, &[]);
    let (code, err) = send(&addr, &src, &key);
    let _ = r.finish();
    assert_ne!(code, Some(0));
    assert!(err.contains("free space"), "{err}");
}
