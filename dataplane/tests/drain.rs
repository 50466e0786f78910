//! ferryd's lifecycle under signals: SIGHUP leaves it running; SIGTERM drains it (no new
//! session starts, the one in flight finishes, exit 0); a drain past its grace abandons
//! the session, removes its partial file and exits 1. The tests wait on what ferryd says
//! in its log, not on the clock.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use dataplane::auth::Auth;
use dataplane::engine::send::{SendOptions, send_file};
use dataplane::plan::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

mod common;

/// One worker, one blocking-socket lane, 64 KiB chunks.
fn plan() -> Plan {
    common::plan(1, 1, Compression::Off, 64 << 10)
}

/// A running ferryd and its log, a line at a time as it writes them.
struct Ferryd {
    child: Child,
    sock: PathBuf,
    log: Receiver<String>,
    /// What was read of the log so far, for failure messages.
    seen: String,
}

impl Ferryd {
    /// A ferryd on `dir`'s plan with control socket `name.sock`, serving metrics on
    /// `metrics`, once it says it is ready; returns the metrics address too.
    fn start(dir: &Path, name: &str, extra: &[&str], metrics: &str) -> (Ferryd, String) {
        let plan_path = dir.join("plan.json");
        std::fs::write(&plan_path, serde_json::to_string(&plan()).unwrap()).unwrap();
        let sock = dir.join(format!("{name}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferryd"))
            .arg("--plan")
            .arg(&plan_path)
            .arg("--control")
            .arg(&sock)
            .args(["--metrics", metrics, "--insecure-no-auth"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        let mut d = Ferryd { child, sock, log, seen: String::new() };
        let ready = d.wait_for("ferryd ready");
        let addr = d.seen.split("metrics on http://").nth(1).map_or(String::new(), |r| r.split("/metrics").next().unwrap().to_string());
        assert!(ready.contains("ferryd ready"));
        (d, addr)
    }

    /// The next log line that contains `what` (60 s at most: a bound, not a measure).
    fn wait_for(&mut self, what: &str) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            match self.log.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.seen += &line;
                    self.seen += "\n";
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(e) => panic!("ferryd never said {what:?} ({e:?}):\n{}", self.seen),
            }
        }
    }

    /// The exit status, once ferryd's log has ended (it exited) and the rest of its log.
    fn exit(mut self) -> (std::process::ExitStatus, String) {
        loop {
            match self.log.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    self.seen += &line;
                    self.seen += "\n";
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("ferryd did not exit:\n{}", self.seen),
            }
        }
        (self.child.wait().unwrap(), self.seen)
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// The status line of `GET path` on ferryd's metrics server.
fn http_status(addr: &str, path: &str) -> String {
    http_body(addr, path).lines().next().unwrap_or("").to_string()
}

/// A control conversation: the request, then each reply line as it comes.
fn ask(sock: &Path, req: serde_json::Value) -> impl Iterator<Item = serde_json::Value> + use<> {
    let mut c = UnixStream::connect(sock).unwrap();
    writeln!(c, "{req}").unwrap();
    BufReader::new(c).lines().map_while(Result::ok).map(|l| serde_json::from_str(&l).unwrap())
}

#[test]
fn sighup_is_ignored_and_sigterm_lets_the_session_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, metrics) = Ferryd::start(dir.path(), "ferryd", &[], "127.0.0.1:0");
    assert_eq!(http_status(&metrics, "/readyz"), "HTTP/1.0 200 OK");
    d.signal(Signal::SIGHUP);
    d.wait_for("SIGHUP ignored");
    assert!(d.running(), "SIGHUP left ferryd running");
    assert_eq!(ask(&d.sock, serde_json::json!({"cmd": "status"})).next().unwrap()["draining"], false);

    // A receive in flight: ferryd listens, waiting for its sender.
    let out = dir.path().join("out.img");
    let mut recv = ask(&d.sock, serde_json::json!({"cmd": "recv", "listen": "127.0.0.1:0", "out": out}));
    let addr = recv.next().unwrap()["addr"].as_str().unwrap().to_string();
    let verdict = std::thread::spawn(move || recv.next().unwrap());

    d.signal(Signal::SIGTERM);
    let draining = d.wait_for("draining:");
    assert!(draining.contains("1 session(s) in flight"), "{draining}");
    assert_eq!(ask(&d.sock, serde_json::json!({"cmd": "status"})).next().unwrap()["draining"], true);
    // Not ready, still healthy, and no new session starts...
    assert_eq!(http_status(&metrics, "/readyz"), "HTTP/1.0 503 Service Unavailable");
    assert_eq!(http_status(&metrics, "/healthz"), "HTTP/1.0 200 OK");
    let refused = ask(&d.sock, serde_json::json!({"cmd": "send", "to": addr, "file": "/etc/hostname"})).next().unwrap();
    assert_eq!(refused["ok"], false);
    assert!(refused["error"].as_str().unwrap().contains("shutting down"), "{refused}");
    assert!(d.running(), "ferryd waits for its session");
    // ...and the one in flight finishes: the file arrives whole, then ferryd exits 0.
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let p = plan();
    send_file(&src, &SendOptions { to: addr, auth: Auth::Insecure, plan: &p, progress: None, require_rdma: false, pool: None }).unwrap();
    let v = verdict.join().unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let (status, log) = d.exit();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("drained"), "{log}");
}

#[test]
fn a_drain_past_its_grace_abandons_the_session_and_removes_its_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut receiver, _) = Ferryd::start(dir.path(), "receiver", &["--drain-seconds", "1"], "off");
    let (sender, _) = Ferryd::start(dir.path(), "sender", &[], "off");
    let out = dir.path().join("out.img");
    let mut recv = ask(&receiver.sock, serde_json::json!({"cmd": "recv", "listen": "127.0.0.1:0", "out": out}));
    let addr = recv.next().unwrap()["addr"].as_str().unwrap().to_string();
    let verdict = std::thread::spawn(move || recv.next());
    // Large enough that the sender is still sending when it is stopped.
    let src = dir.path().join("src.img");
    let page: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8 + 1).collect();
    let mut f = std::fs::File::create(&src).unwrap();
    for _ in 0..(256 << 20) / 4096 {
        f.write_all(&page).unwrap();
    }
    drop(f);
    let ssock = sender.sock.clone();
    let send = std::thread::spawn(move || ask(&ssock, serde_json::json!({"cmd": "send", "to": addr, "file": src})).next());
    // The sender stops mid-transfer, once the receiver has its partial file (it says so
    // when the session starts).
    receiver.wait_for("bytes into");
    sender.signal(Signal::SIGSTOP);
    let partials = || -> Vec<PathBuf> {
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(".partial")).collect()
    };
    assert_eq!(partials().len(), 1, "the receive has its partial file");
    receiver.signal(Signal::SIGTERM);
    let (status, log) = receiver.exit();
    assert_eq!(status.code(), Some(1), "work was abandoned: {log}");
    assert!(log.contains("abandoned") && log.contains(".partial"), "{log}");
    assert!(partials().is_empty(), "the partial file is removed: {:?}", partials());
    assert!(!out.exists());
    // The receiver's client saw the conversation end without a success.
    assert!(verdict.join().unwrap().is_none_or(|v| v["ok"] != true));
    sender.signal(Signal::SIGCONT);
    sender.signal(Signal::SIGKILL);
    let _ = sender.exit();
    let _ = send.join();
}

/// SIGTERM to the source's ferryd between two rounds of a migration: the migration goes
/// on as the VMM drives it (more rounds, the stop-and-copy round, the destination's
/// verdict) and completes verified; meanwhile a new migration is refused, `/readyz` says
/// 503 and `ferry_draining` 1; once it ends, ferryd exits 0.
#[test]
fn sigterm_during_a_migration_lets_it_finish() {
    use dataplane::migrate::vmm::{MigrateIn, MigrateOut, OutOptions};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut src, metrics) = Ferryd::start(dir.path(), "src", &[], "127.0.0.1:0");
    let (dst, _) = Ferryd::start(dir.path(), "dst", &[], "off");
    let pages = 2048u64;
    let mem = hw::memmap::memfd("guest", pages * 4096, false).unwrap();
    for p in (0..pages).step_by(3) {
        mem.write_all_at(&[p as u8 | 1; 4096], p * 4096).unwrap();
    }
    let bitmap = hw::memmap::memfd("dirty", dataplane::migrate::bitmap_bytes(pages * 4096), false).unwrap();
    let incoming = MigrateIn::start(&dst.sock, "127.0.0.1:0").unwrap();
    let addr = incoming.addr.clone();
    let waiter = std::thread::spawn(move || incoming.wait());
    let mut out = MigrateOut::start(&src.sock, &addr, &mem, &bitmap, &OutOptions::default()).unwrap();
    out.round().unwrap();
    src.signal(Signal::SIGTERM);
    src.wait_for("draining: 1 session(s) in flight");
    // A second migration is refused while the first goes on.
    let (other, other_bitmap) = (hw::memmap::memfd("g2", 4096, false).unwrap(), hw::memmap::memfd("b2", 8, false).unwrap());
    let refused = MigrateOut::start(&src.sock, &addr, &other, &other_bitmap, &OutOptions::default()).unwrap_err();
    assert!(
        matches!(&refused, dataplane::migrate::vmm::ClientError::Ferryd { kind: dataplane::metrics::Failure::Draining, message } if message.contains("shutting down")),
        "{refused:?}"
    );
    assert_eq!(http_status(&metrics, "/readyz"), "HTTP/1.0 503 Service Unavailable");
    assert!(http_body(&metrics, "/metrics").contains("ferry_draining 1"));
    // The guest writes on; the VMM runs another round and then the last.
    mem.write_all_at(&[0xee; 4096], 7 * 4096).unwrap();
    bitmap.write_all_at(&(1u64 << 7).to_le_bytes(), 0).unwrap();
    assert_eq!(out.round().unwrap().dirty_pages, 1);
    mem.write_all_at(&[0xdd; 4096], 9 * 4096).unwrap();
    bitmap.write_all_at(&(1u64 << 9).to_le_bytes(), 0).unwrap();
    let rep = out.finish().unwrap();
    assert!(rep.digest_match && rep.rounds.len() == 3, "{rep:?}");
    let (got, _) = waiter.join().unwrap().unwrap();
    let mut a = vec![0u8; (pages * 4096) as usize];
    let mut b = a.clone();
    mem.read_exact_at(&mut a, 0).unwrap();
    got[0].read_exact_at(&mut b, 0).unwrap();
    assert!(a == b, "the destination holds the guest's memory");
    let (status, log) = src.exit();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("drained: every session finished"), "{log}");
}

/// The whole answer to `GET path` on ferryd's metrics server.
fn http_body(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body
}
