//! Transfers through the real engine over loopback, and a hostile sender for every kind
//! of bad input: each is refused with its reason, and the destination never appears.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;

use dataplane::auth::{Auth, client_handshake};
use dataplane::conn::{SessionError, expect_frame, write_frame};
use dataplane::engine::recv::{RecvOptions, recv_file};
use dataplane::engine::send::{SendOptions, send_file};
use dataplane::plan::*;
use dataplane::session::seal::Seal;
use dataplane::wire::{self, CONTROL_LANE, Encoding, HEADER_LEN, Header, Kind, Layout};
use zerocopy::{FromBytes, IntoBytes};

mod common;
use common::plan;

fn key() -> Auth {
    common::key(42)
}

/// Zero pages, text pages and noise pages, interleaved, with a ragged tail.
fn image(pages: usize, tail: usize) -> Vec<u8> {
    let mut x = 0x2545f4914f6cdd1du64;
    let mut out = Vec::new();
    for p in 0..pages {
        match p % 5 {
            0 | 3 => out.extend(std::iter::repeat_n(0u8, 4096)),
            1 => out.extend(b"the quick brown fox jumps over the lazy dog ".iter().cycle().take(4096)),
            _ => out.extend((0..4096).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })),
        }
    }
    out.extend(std::iter::repeat_n(7u8, tail));
    out
}

/// Every way of sending: plain sockets, io_uring, and io_uring with zero-copy sends
/// (each where this kernel allows it).
fn both(p: Plan) -> Vec<Plan> {
    let mut uring = p.clone();
    uring.transport = Transport::Tcp;
    uring.tcp.io_uring = true;
    if io_uring::IoUring::new(8).is_err() {
        hw::report_skip("io_uring unavailable: the transfer tests run on plain sockets only");
        return vec![p];
    }
    let mut zc = uring.clone();
    zc.tcp.send_zc = true;
    if !hw::probe(&hw::ProbeOptions::default()).io_uring.sendmsg_zc {
        hw::report_skip("io_uring SENDMSG_ZC unavailable: the transfer tests run without zero-copy sends");
        return vec![p, uring];
    }
    vec![p, uring, zc]
}

fn round_trip(data: &[u8], p: &Plan) -> (dataplane::engine::Report, dataplane::engine::Report) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let out = dir.path().join("out");
    std::fs::write(&src, data).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (sent, got) = std::thread::scope(|s| {
        let r = s.spawn(|| {
            recv_file(&listener, &out, &RecvOptions { auth: key(), plan: p, progress: None, total: None, timeout: None, pool: None })
        });
        let sent =
            send_file(&src, &SendOptions { to: addr.clone(), auth: key(), plan: p, progress: None, require_rdma: false, pool: None });
        (sent, r.join().unwrap())
    });
    let (sent, got) = (sent.unwrap(), got.unwrap());
    assert_eq!(std::fs::read(&out).unwrap(), data, "destination differs");
    let partials =
        std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "partial"));
    assert_eq!(partials.count(), 0, "no partial file is left");
    assert_eq!(sent.digest, got.digest);
    (sent, got)
}

#[test]
fn one_lane_raw() {
    let data = image(100, 1808);
    for p in both(plan(1, 1, Compression::Off, 64 << 10)) {
        let (s, r) = round_trip(&data, &p);
        assert_eq!(s.zero_pages, 40);
        assert_eq!(r.zero_pages, 40);
        assert_eq!(s.wire_bytes, r.wire_bytes);
        assert_eq!(s.compressed_in_bytes, 0);
        assert_eq!(s.transport, if p.tcp.io_uring { "tcp (io_uring)" } else { "sockets" });
        // The receiver's plan says the same: its lanes receive through io_uring too.
        assert_eq!(r.transport, s.transport);
        // Latency per sending worker and per receiving lane (frame write).
        assert_eq!((s.worker_latency.len(), r.worker_latency.len()), (1, 1));
        assert_eq!(r.worker_latency[0].len(), r.frames);
        assert!(r.write_latency_us.is_some_and(|l| l.max >= l.p50) && s.write_latency_us.is_none());
    }
}

/// A plan that says io_uring, run where a seccomp profile refuses it: the sender's workers
/// fall back to plain sockets and the receiver's lanes to plain reads, the region
/// arrives, and both reports say what carried it.
#[test]
fn io_uring_refused_at_run_time_falls_back_on_both_sides() {
    let mut p = plan(2, 1, Compression::Off, 64 << 10);
    p.transport = Transport::Tcp;
    p.tcp.io_uring = true;
    let data = image(100, 7);
    // Threads inherit the filter: the receiver's lanes and the sender's workers start after it.
    let got = std::thread::spawn(move || {
        hw::uring::block_io_uring_setup_on_this_thread().map_err(|e| e.to_string())?;
        Ok::<_, String>(round_trip(&data, &p))
    })
    .join()
    .unwrap();
    match got {
        Ok((s, r)) => assert_eq!((s.transport.as_str(), r.transport.as_str()), ("sockets", "sockets")),
        Err(e) => hw::report_skip(&format!("cannot install a seccomp filter here: {e}")),
    }
}

#[test]
fn four_lanes_zstd() {
    let data = image(257, 0);
    for p in both(plan(2, 2, Compression::Zstd { level: 1 }, 16 << 10)) {
        let (s, r) = round_trip(&data, &p);
        assert_eq!(s.lanes, 4);
        assert_eq!((s.worker_latency.len(), r.worker_latency.len()), (2, 4), "per worker, per lane");
        assert!(s.compressed_in_bytes > 0 && s.compressed_out_bytes < s.compressed_in_bytes);
        assert_eq!(r.compressed_in_bytes, s.compressed_in_bytes);
        assert!(s.wire_bytes < data.len() as u64 / 2);
    }
}

#[test]
fn three_connections_per_worker_large() {
    // Larger than the socket buffers, so io_uring writes go short and resume.
    let data = image(3000, 5);
    for p in both(plan(1, 3, Compression::Off, 256 << 10)) {
        let (s, _) = round_trip(&data, &p);
        assert_eq!(s.lanes, 3);
    }
}

#[test]
fn adaptive_and_empty_and_tiny() {
    for p in both(plan(1, 1, Compression::Adaptive { level: 1 }, 64 << 10)) {
        round_trip(&image(64, 0), &p);
    }
    for p in both(plan(2, 1, Compression::Off, 64 << 10)) {
        round_trip(&[], &p);
        round_trip(&[1, 2, 3], &p);
    }
}

/// A sender with the wrong key is refused, moves nothing, and does not end the receiver:
/// it keeps listening for its real sender, who then succeeds.
#[test]
fn wrong_key_moves_nothing_and_the_receiver_keeps_listening() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let out = dir.path().join("out");
    let data = image(4, 0);
    std::fs::write(&src, &data).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let p = plan(1, 1, Compression::Off, 64 << 10);
    let timeout = Some(std::time::Duration::from_secs(20));
    let (wrong, right, got) = std::thread::scope(|s| {
        let r = s
            .spawn(|| recv_file(&listener, &out, &RecvOptions { auth: key(), plan: &p, progress: None, total: None, timeout, pool: None }));
        let send =
            |auth| send_file(&src, &SendOptions { to: addr.clone(), auth, plan: &p, progress: None, require_rdma: false, pool: None });
        let wrong = send(common::key(1));
        assert!(!out.exists());
        (wrong, send(key()), r.join().unwrap())
    });
    assert!(matches!(wrong, Err(SessionError::Auth(_))), "{wrong:?}");
    right.unwrap();
    got.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

/// Strangers that keep connecting while a four-lane session opens (probes, garbage, a
/// wrong key) take no lane slot and fail nothing: every lane is the sender's.
#[test]
fn strangers_during_lane_setup_take_no_lane() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let out = dir.path().join("out");
    let data = image(300, 100);
    std::fs::write(&src, &data).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let p = plan(2, 2, Compression::Off, 64 << 10);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, got) = std::thread::scope(|s| {
        let r = s.spawn(|| {
            recv_file(&listener, &out, &RecvOptions { auth: key(), plan: &p, progress: None, total: None, timeout: None, pool: None })
        });
        s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut c) = TcpStream::connect(&addr) {
                    // Once the receiver is done nobody answers: do not wait for it.
                    c.set_read_timeout(Some(std::time::Duration::from_millis(500))).unwrap();
                    match n % 3 {
                        0 => drop(c),
                        1 => {
                            let _ = c.write_all(&[0x42; 64]);
                        }
                        _ => {
                            let _ = client_handshake(&mut c, &common::key(9), 0, 0, 0);
                        }
                    }
                }
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let sent =
            send_file(&src, &SendOptions { to: addr.clone(), auth: key(), plan: &p, progress: None, require_rdma: false, pool: None });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (sent, r.join().unwrap())
    });
    sent.unwrap();
    got.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

/// A receiver whose sender never authenticates gives up at its deadline, saying so.
#[test]
fn a_receiver_gives_up_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = plan(1, 1, Compression::Off, 64 << 10);
    let _probe = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let timeout = Some(std::time::Duration::from_secs(1));
    let e =
        recv_file(&listener, &out, &RecvOptions { auth: key(), plan: &p, progress: None, total: None, timeout, pool: None }).unwrap_err();
    assert!(e.to_string().contains("timed out after 1 s"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing was created");
}

/// A sender that speaks the protocol up to the first data frame, then writes `bad` on the
/// lane. Returns the receiver's verdict.
/// A session whose one lane carries what `bad` writes, to a receiver that reads its lanes
/// through io_uring (`uring`) or with plain reads.
fn hostile(
    size: u64,
    uring: bool,
    bad: impl FnOnce(&mut TcpStream, &mut Seal, &mut TcpStream, &mut Seal),
) -> (Result<dataplane::engine::Report, SessionError>, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut p = plan(1, 1, Compression::Off, 64 << 10);
    p.tcp.io_uring = uring;
    let got = std::thread::scope(|s| {
        let r = s.spawn(|| {
            recv_file(&listener, &out, &RecvOptions { auth: key(), plan: &p, progress: None, total: None, timeout: None, pool: None })
        });
        let mut ctl = TcpStream::connect(addr).unwrap();
        let (_, mut keys) = client_handshake(&mut ctl, &key(), CONTROL_LANE, 0, 0).unwrap();
        let layout = Layout { page_size: 4096, max_chunk: 64 << 10, regions: vec![size] };
        write_frame(&mut ctl, &mut keys.tx, Kind::Session, &wire::session_payload(&layout, 1, wire::DataTransport::Tcp)).unwrap();
        let mut buf = Vec::new();
        expect_frame(&mut ctl, &mut keys.rx, Kind::SessionOk, &mut buf).unwrap();
        let session = wire::parse::<wire::SessionOk>(Kind::SessionOk, &buf).unwrap().session.get();
        let mut lane = TcpStream::connect(addr).unwrap();
        let (_, mut lane_keys) = client_handshake(&mut lane, &key(), 0, session, 0).unwrap();
        bad(&mut lane, &mut lane_keys.tx, &mut ctl, &mut keys.tx);
        drop(lane);
        drop(ctl);
        r.join().unwrap()
    });
    (got, out, dir)
}

/// A frame as the session's keys seal it: header, payload, tag.
fn frame(tx: &mut Seal, h: Header, payload: &[u8]) -> Vec<u8> {
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v.extend_from_slice(&tx.tag(&h, [payload]));
    v
}

/// Each bad input on the lane is refused by both ways of receiving.
fn assert_refused(size: u64, what: &str, bad: impl Fn(&mut TcpStream, &mut Seal)) {
    assert_refused_with_ctl(size, what, |l, tx, _, _| bad(l, tx));
}

/// [`assert_refused`] of what is written on the lane and the control connection.
fn assert_refused_with_ctl(size: u64, what: &str, bad: impl Fn(&mut TcpStream, &mut Seal, &mut TcpStream, &mut Seal)) {
    for uring in [false, true] {
        let (got, out, dir) = hostile(size, uring, &bad);
        let e = got.expect_err(what).to_string();
        assert!(e.contains(what), "io_uring {uring}: expected {what:?}, got: {e}");
        assert!(!out.exists(), "{what}: the destination must not appear");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{what}: the partial file must be removed: {left:?}");
    }
}

#[test]
fn offset_past_the_region() {
    let page = vec![1u8; 4096];
    assert_refused(8192, "runs past the end of region 0", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Raw, 0, 8192, 4096, 4096).seal(&page), &page)).unwrap();
    });
    assert_refused(8192, "runs past the end", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Zero, 0, u64::MAX - 4095, 4096, 0).seal(&[]), &[])).unwrap();
    });
    assert_refused(8192, "region 3", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Raw, 3, 0, 4096, 4096).seal(&page), &page)).unwrap();
    });
}

#[test]
fn bad_checksum() {
    let page = vec![1u8; 4096];
    let mut h = Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page);
    h.crc = (h.crc.get() ^ 1).into();
    assert_refused(8192, "checksum mismatch", |l, tx| l.write_all(&frame(tx, h, &page)).unwrap());
}

/// A relay that changes a frame and recomputes its checksum cannot recompute its tag:
/// the frame fails authentication and nothing it carries is written.
#[test]
fn altered_frame_fails_authentication() {
    let page = vec![1u8; 4096];
    assert_refused(8192, "failed authentication", |l, tx| {
        let mut f = frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page);
        f[HEADER_LEN + 10] ^= 0xff;
        let h = Header::read_from_bytes(&f[..HEADER_LEN]).unwrap().seal(&f[HEADER_LEN..HEADER_LEN + 4096]);
        f[..HEADER_LEN].copy_from_slice(h.as_bytes());
        l.write_all(&f).unwrap();
    });
    // A frame left out: the next one's sequence number no longer matches.
    assert_refused(8192, "failed authentication", |l, tx| {
        let _skipped = frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page);
        l.write_all(&frame(tx, Header::data(Encoding::Raw, 0, 4096, 4096, 4096).seal(&page), &page)).unwrap();
    });
}

#[test]
fn oversized_and_zeroed_and_unknown_frames() {
    assert_refused(8192, "exceeds the", |l, _| l.write_all(Header::new(Kind::Data, wire::MAX_PAYLOAD + 1).as_bytes()).unwrap());
    // Within the protocol's maximum but beyond what this session's 64 KiB chunks can need:
    // refused before anything is allocated for it.
    assert_refused(8192, "of 1048576 bytes exceeds the 70144-byte maximum", |l, _| {
        l.write_all(Header::new(Kind::Data, 1 << 20).as_bytes()).unwrap()
    });
    assert_refused(8192, "bad magic 0x00000000", |l, _| l.write_all(&[0u8; HEADER_LEN]).unwrap());
    let mut h = Header::new(Kind::Data, 0);
    h.kind = 200;
    assert_refused(8192, "unknown frame kind 200", |l, _| l.write_all(h.seal(&[]).as_bytes()).unwrap());
    assert_refused(8192, "expected a Data frame, got Session", |l, tx| {
        l.write_all(&frame(tx, Header::new(Kind::Session, 0).seal(&[]), &[])).unwrap()
    });
}

#[test]
fn malformed_data_frames() {
    assert_refused(8192, "carries 5 payload bytes for 4096", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Zero, 0, 0, 4096, 5).seal(b"12345"), b"12345")).unwrap();
    });
    assert_refused(8192, "not aligned", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Zero, 0, 100, 4096, 0).seal(&[]), &[])).unwrap();
    });
    let junk = b"definitely not a zstd frame";
    assert_refused(8192, "zstd payload decodes", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Zstd, 0, 0, 4096, junk.len() as u32).seal(junk), junk)).unwrap();
    });
}

#[test]
fn truncated_stream_and_missing_lane_end() {
    let page = vec![1u8; 4096];
    assert_refused(8192, "peer closed the connection", |l, tx| {
        let f = frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page);
        l.write_all(&f[..HEADER_LEN + 100]).unwrap();
    });
    // Whole frames, but the sender vanishes before the round's end and DONE.
    assert_refused(8192, "peer closed the connection", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page)).unwrap();
    });
    // A round's end that does not match what arrived.
    assert_refused(8192, "lane 0's frames in round 0 (ROUND_END's, those received): 3 announced, 0 found", |l, tx| {
        let end = wire::RoundEnd { round: 0.into(), _pad: 0.into(), frames: 3.into(), bytes: 99.into(), pages: 0.into() };
        l.write_all(&frame(tx, Header::new(Kind::RoundEnd, 32).seal(end.as_bytes()), end.as_bytes())).unwrap();
    });
    // Data after the last round, outside any round.
    assert_refused(8192, "frames outside a round", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page)).unwrap();
        let end = wire::LaneEnd { frames: 0.into(), bytes: 0.into() };
        l.write_all(&frame(tx, Header::new(Kind::LaneEnd, 16).seal(end.as_bytes()), end.as_bytes())).unwrap();
    });
}

#[test]
fn overlapping_and_missing_pages() {
    let page = vec![1u8; 4096];
    // Two frames for the same page, each sealed in its turn (a replay of the same frame
    // fails its tag before the page is looked at).
    assert_refused(8192, "pages already written", |l, tx| {
        l.write_all(&frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page)).unwrap();
        l.write_all(&frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page)).unwrap();
    });
    assert_refused(8192, "failed authentication", |l, tx| {
        let f = frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page);
        l.write_all(&f).unwrap();
        l.write_all(&f).unwrap();
    });
    // Every frame well-formed and the counts honest, but page 1 never sent: the only
    // round cannot end.
    assert_refused_with_ctl(8192, "round 0 covers every page): 2 announced, 1 found", |l, tx, ctl, ctl_tx| {
        let f = frame(tx, Header::data(Encoding::Raw, 0, 0, 4096, 4096).seal(&page), &page);
        l.write_all(&f).unwrap();
        let end = wire::RoundEnd { round: 0.into(), _pad: 0.into(), frames: 1.into(), bytes: (f.len() as u64).into(), pages: 1.into() };
        l.write_all(&frame(tx, Header::new(Kind::RoundEnd, 32).seal(end.as_bytes()), end.as_bytes())).unwrap();
        let round = wire::Round { round: 0.into(), last: 1.into(), pages: 1.into() };
        write_frame(ctl, ctl_tx, Kind::Round, round.as_bytes()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
    });
}
