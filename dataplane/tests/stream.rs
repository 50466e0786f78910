//! Stream mode without QEMU: two proxies carry several connections' byte streams both
//! ways, in order, compressed or not; a connection without the key is turned away
//! without harming the migration. (A stream cut in the middle is tested with QEMU, in
//! control/tests/qemu.rs.)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use dataplane::plan::{Compression, Limits};
use dataplane::stream::{Endpoint, Listener, ProxyOptions, destination, source};

mod common;
use common::key;

/// Text-like bytes that compress, with a counter so each channel's stream is distinct.
fn stream(channel: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| b"migration stream "[i % 17] ^ (channel.wrapping_mul((i / 4096) as u8 % 3))).collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    src_sock: PathBuf,
    qemu_dst: UnixListener,
    src: std::thread::JoinHandle<Result<dataplane::stream::ProxyReport, dataplane::conn::SessionError>>,
    dst: std::thread::JoinHandle<Result<dataplane::stream::ProxyReport, dataplane::conn::SessionError>>,
    serve: String,
    /// The source proxy's running count.
    progress: std::sync::Arc<dataplane::stream::StreamProgress>,
}

fn setup(compression: Compression) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let dst_sock = dir.path().join("qemu-dst.sock");
    let qemu_dst = UnixListener::bind(&dst_sock).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let serve = l.local_addr().unwrap().to_string();
    let fwd = Endpoint::Unix(dst_sock);
    let dst = std::thread::spawn(move || destination(&l, &fwd, &ProxyOptions::new(key(1), compression, Limits::default())));
    let src_sock = dir.path().join("ferry.sock");
    let listener = Listener::bind(&Endpoint::Unix(src_sock.clone())).unwrap();
    let to = serve.clone();
    let progress = std::sync::Arc::new(dataplane::stream::StreamProgress::default());
    let p = Some(progress.clone());
    let src = std::thread::spawn(move || {
        source(&[listener], &to, &ProxyOptions { progress: p, ..ProxyOptions::new(key(1), compression, Limits::default()) })
    });
    Setup { _dir: dir, src_sock, qemu_dst, src, dst, serve, progress }
}

#[test]
fn channels_are_carried_both_ways_in_order() {
    for compression in [Compression::Off, Compression::Zstd { level: 1 }] {
        let s = setup(compression);
        // A port probe and a peer with the wrong key are turned away first.
        drop(std::net::TcpStream::connect(&s.serve).unwrap());
        let mut bad = std::net::TcpStream::connect(&s.serve).unwrap();
        assert!(dataplane::auth::client_handshake(&mut bad, &key(2), 0, 0, dataplane::wire::features::STREAM).is_err());
        // QEMU's main channel first, then two more, as multifd opens them.
        let mut src_conns = Vec::new();
        let mut dst_conns = Vec::new();
        for c in 0..3u8 {
            src_conns.push(UnixStream::connect(&s.src_sock).unwrap());
            let (d, _) = s.qemu_dst.accept().unwrap();
            d.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            // The destination sees them in the same order: each announces itself.
            src_conns[c as usize].write_all(&[c]).unwrap();
            let mut first = [0u8];
            (&d).read_exact(&mut first).unwrap();
            assert_eq!(first[0], c, "channel order kept");
            dst_conns.push(d);
        }
        std::thread::scope(|sc| {
            for (c, (sconn, dconn)) in src_conns.iter().zip(&dst_conns).enumerate() {
                sc.spawn(move || {
                    let data = stream(c as u8, 3 << 20);
                    let mut w = sconn;
                    w.write_all(&data).unwrap();
                    sconn.shutdown(Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    let mut r = dconn;
                    r.read_to_end(&mut got).unwrap();
                    assert!(got == data, "channel {c} arrives whole");
                    // The return path: the destination answers and closes.
                    let mut w = dconn;
                    w.write_all(b"loaded").unwrap();
                    dconn.shutdown(Shutdown::Write).unwrap();
                    let mut back = Vec::new();
                    let mut r = sconn;
                    r.read_to_end(&mut back).unwrap();
                    assert_eq!(back, b"loaded");
                });
            }
        });
        let (src, dst) = (s.src.join().unwrap().unwrap(), s.dst.join().unwrap().unwrap());
        assert_eq!(src.channels.len(), 3);
        assert_eq!(src.sent_bytes, 3 * ((3 << 20) + 1));
        assert_eq!(dst.received_bytes, src.sent_bytes);
        assert_eq!(src.received_bytes, 3 * 6);
        // What a progress display reads as it goes: every stream byte, both ways, and the channels.
        let p = &s.progress;
        assert_eq!(p.bytes.load(std::sync::atomic::Ordering::Relaxed), src.sent_bytes + src.received_bytes);
        assert_eq!(p.channels.load(std::sync::atomic::Ordering::Relaxed), 3);
        if compression != Compression::Off {
            assert!(src.compression_ratio > 2.0 && src.wire_bytes < src.sent_bytes / 2, "{src:?}");
        }
    }
}
