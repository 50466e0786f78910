//! ferryd's lifecycle under signals: SIGHUP leaves it running; SIGTERM drains it (no new
//! session starts, the one in flight finishes, exit 0); a drain past its grace abandons
//! the session, removes its partial file and exits 1.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::auth::Auth;
use dataplane::engine::send::{SendOptions, send_file};
use dataplane::plan::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn plan() -> Plan {
    Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        host: "test".into(),
        transport: Transport::Sockets,
        numa_node: 0,
        worker_cpus: vec![0],
        control_cpu: None,
        link: LinkPlan { interface: Some("lo".into()), speed_gbps: 10.0, rtt_us: 10.0, speed_assumed: true },
        chunk_size_bytes: 64 << 10,
        rdma: None,
        tcp: TcpPlan {
            connections_per_worker: 1,
            io_uring: false,
            ring_entries: 64,
            send_zc: false,
            socket_buffer_bytes: Some(1 << 20),
            socket_buffer_needed_bytes: 1 << 20,
        },
        arena: ArenaPlan { bytes_per_worker: 4 << 20, backing: ArenaBacking::Normal, hugepages_2m_needed: 0, mlock: false },
        compression: Compression::Off,
        limits: Limits::default(),
        reasons: vec![],
    }
}

/// A ferryd on `dir`'s plan with control socket `name.sock`, once it says it is ready;
/// the rest of its log goes to a thread that returns it.
fn ferryd(dir: &Path, name: &str, extra: &[&str]) -> (Child, PathBuf, std::thread::JoinHandle<String>) {
    let (child, sock, log, _) = ferryd_with_metrics(dir, name, extra, "off");
    (child, sock, log)
}

/// [`ferryd`] serving metrics on `metrics`, and the address it serves them on.
fn ferryd_with_metrics(dir: &Path, name: &str, extra: &[&str], metrics: &str) -> (Child, PathBuf, std::thread::JoinHandle<String>, String) {
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
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            addr = rest.trim_end_matches("/metrics").to_string();
        }
        if line.contains("ferryd ready") {
            break;
        }
    }
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    (child, sock, rest, addr)
}

/// The status line of `GET path` on ferryd's metrics server.
fn http_status(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body.lines().next().unwrap_or("").to_string()
}

/// A control conversation: the request, then each reply line as it comes.
fn ask(sock: &Path, req: serde_json::Value) -> impl Iterator<Item = serde_json::Value> + use<> {
    let mut c = UnixStream::connect(sock).unwrap();
    writeln!(c, "{req}").unwrap();
    BufReader::new(c).lines().map_while(Result::ok).map(|l| serde_json::from_str(&l).unwrap())
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Waits for `child` to exit, up to `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sighup_is_ignored_and_sigterm_lets_the_session_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock, log, metrics) = ferryd_with_metrics(dir.path(), "ferryd", &[], "127.0.0.1:0");
    assert_eq!(http_status(&metrics, "/readyz"), "HTTP/1.0 200 OK");
    signal(&child, Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP left ferryd running");
    assert_eq!(ask(&sock, serde_json::json!({"cmd": "status"})).next().unwrap()["draining"], false);

    // A receive in flight: ferryd listens, waiting for its sender.
    let out = dir.path().join("out.img");
    let mut recv = ask(&sock, serde_json::json!({"cmd": "recv", "listen": "127.0.0.1:0", "out": out}));
    let addr = recv.next().unwrap()["addr"].as_str().unwrap().to_string();
    let verdict = std::thread::spawn(move || recv.next().unwrap());

    signal(&child, Signal::SIGTERM);
    let t = Instant::now();
    while ask(&sock, serde_json::json!({"cmd": "status"})).next().unwrap()["draining"] != true {
        assert!(t.elapsed() < Duration::from_secs(5), "ferryd never said it drains");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Not ready, still healthy, and no new session starts...
    assert_eq!(http_status(&metrics, "/readyz"), "HTTP/1.0 503 Service Unavailable");
    assert_eq!(http_status(&metrics, "/healthz"), "HTTP/1.0 200 OK");
    let refused = ask(&sock, serde_json::json!({"cmd": "send", "to": addr, "file": "/etc/hostname"})).next().unwrap();
    assert_eq!(refused["ok"], false);
    assert!(refused["error"].as_str().unwrap().contains("shutting down"), "{refused}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "ferryd waits for its session");
    // ...and the one in flight finishes: the file arrives whole, then ferryd exits 0.
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let p = plan();
    send_file(&src, &SendOptions { to: addr, auth: Auth::Insecure, plan: &p, progress: None, require_rdma: false, pool: None }).unwrap();
    let v = verdict.join().unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let status = exit_within(&mut child, Duration::from_secs(10)).expect("ferryd exits once drained");
    let log = log.join().unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("SIGHUP ignored") && log.contains("drained"), "{log}");
}

#[test]
fn a_drain_past_its_grace_abandons_the_session_and_removes_its_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut receiver, rsock, rlog) = ferryd(dir.path(), "receiver", &["--drain-seconds", "1"]);
    let (mut sender, ssock, _slog) = ferryd(dir.path(), "sender", &[]);
    let out = dir.path().join("out.img");
    let mut recv = ask(&rsock, serde_json::json!({"cmd": "recv", "listen": "127.0.0.1:0", "out": out}));
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
    let ssock2 = ssock.clone();
    let send = std::thread::spawn(move || ask(&ssock2, serde_json::json!({"cmd": "send", "to": addr, "file": src})).next());
    // The sender stops mid-transfer, once the receiver has its partial file.
    let partials = || -> Vec<PathBuf> {
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(".partial")).collect()
    };
    let t = Instant::now();
    while partials().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(20), "no partial file appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(&sender, Signal::SIGSTOP);
    signal(&receiver, Signal::SIGTERM);
    let status = exit_within(&mut receiver, Duration::from_secs(10)).expect("the drain gives up after its grace");
    let log = rlog.join().unwrap();
    assert_eq!(status.code(), Some(1), "work was abandoned: {log}");
    assert!(log.contains("abandoned") && log.contains(".partial"), "{log}");
    assert!(partials().is_empty(), "the partial file is removed: {:?}", partials());
    assert!(!out.exists());
    // The receiver's client saw the conversation end without a success.
    assert!(verdict.join().unwrap().is_none_or(|v| v["ok"] != true));
    signal(&sender, Signal::SIGCONT);
    signal(&sender, Signal::SIGKILL);
    let _ = sender.wait();
    let _ = send.join();
}
