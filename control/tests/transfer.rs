//! `ferryctl send` and `recv` as processes: a transfer with its JSON reports, and the
//! failures a user meets (a peer killed mid-transfer, a wrong key, a careless key file).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn ferryctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferryctl"));
    c.env("RUST_LOG", "info");
    c
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn keyfile(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let out = ferryctl().args(["keygen", "--out"]).arg(&p).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p
}

/// A file that does not compress and has no zero pages, so it takes a while to move.
fn noise(path: &Path, mib: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
}

/// A child's stderr, read line by line as the test waits for events in its log.
struct Log {
    err: BufReader<std::process::ChildStderr>,
    seen: String,
}

impl Log {
    /// Blocks until a line containing `marker` appears.
    fn wait_for(&mut self, marker: &str) {
        loop {
            let mut line = String::new();
            if self.err.read_line(&mut line).unwrap() == 0 {
                panic!("{marker:?} never appeared; stderr:\n{}", self.seen);
            }
            self.seen += &line;
            if line.contains(marker) {
                return;
            }
        }
    }

    /// Collects the rest in a thread, so the child never blocks on a full pipe.
    fn rest(mut self) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let _ = std::io::Read::read_to_string(&mut self.err, &mut self.seen);
            self.seen
        })
    }
}

fn spawn_logged(cmd: &mut Command) -> (Child, Log) {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    (child, Log { err, seen: String::new() })
}

/// Spawns and blocks until `marker` appears in its log; the rest of the log is collected
/// by the returned thread.
fn spawn_until(cmd: &mut Command, marker: &str) -> (Child, std::thread::JoinHandle<String>) {
    let (child, mut log) = spawn_logged(cmd);
    log.wait_for(marker);
    (child, log.rest())
}

fn finish(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn send_and_recv_with_json_reports() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "k");
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 3 << 20];
    data[(1 << 20)..(2 << 20)].iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
    std::fs::write(&src, &data).unwrap();
    let out = dir.path().join("dst.img");
    let addr = free_addr();
    let (recv, _) =
        spawn_until(ferryctl().args(["recv", "--json", "--listen", &addr, "--key"]).arg(&key).arg("--out").arg(&out), "listening on");
    let send = ferryctl()
        .args(["send", "--json", "--compress", "zstd:3", "--to", &addr, "--key"])
        .arg(&key)
        .arg("--file")
        .arg(&src)
        .output()
        .unwrap();
    assert!(send.status.success(), "{}", String::from_utf8_lossy(&send.stderr));
    let (code, recv_out) = finish(recv);
    assert_eq!(code, Some(0));
    let s: serde_json::Value = serde_json::from_slice(&send.stdout).unwrap();
    let r: serde_json::Value = serde_json::from_str(&recv_out).unwrap();
    assert_eq!(s["bytes"], 3 << 20);
    assert_eq!(s["zero_pages"], 512);
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(s["digest_match"], true);
    assert!(s["compressed_out_bytes"].as_u64().unwrap() < s["compressed_in_bytes"].as_u64().unwrap());
    for field in ["seconds", "gbps", "cpu_seconds_per_gib", "wire_bytes", "transport"] {
        assert!(s.get(field).is_some(), "report lacks {field}");
    }
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

/// A receiver and a sender of a 256 MiB file, returned once the receiver's data lane is
/// up (data flows from there on).
struct MidTransfer {
    _dir: tempfile::TempDir,
    out: PathBuf,
    recv: (Child, Log),
    send: (Child, Log),
}

fn mid_transfer() -> MidTransfer {
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "k");
    let src = dir.path().join("src.img");
    noise(&src, 256);
    let out = dir.path().join("dst.img");
    let addr = free_addr();
    let mut recv = spawn_logged(ferryctl().args(["recv", "--listen", &addr, "--key"]).arg(&key).arg("--out").arg(&out));
    recv.1.wait_for("listening on");
    let send = spawn_logged(ferryctl().args(["send", "--to", &addr, "--key"]).arg(&key).arg("--file").arg(&src));
    recv.1.wait_for("lane 0 connected");
    MidTransfer { _dir: dir, out, recv, send }
}

#[test]
fn receiver_killed_mid_transfer() {
    let MidTransfer { _dir, out, recv: (mut recv, _recv_log), send: (send, send_log) } = mid_transfer();
    let send_err = send_log.rest();
    recv.kill().unwrap();
    recv.wait().unwrap();
    let out_s = send.wait_with_output().unwrap();
    assert_eq!(out_s.status.code(), Some(1));
    let err = send_err.join().unwrap();
    assert!(err.contains("peer closed the connection") || err.contains("Connection reset"), "{err}");
    assert!(!out.exists());
}

#[test]
fn sender_killed_mid_transfer() {
    let MidTransfer { _dir, out, recv: (recv, recv_log), send: (mut send, _send_log) } = mid_transfer();
    send.kill().unwrap();
    send.wait().unwrap();
    let recv_err = recv_log.rest();
    let out_r = recv.wait_with_output().unwrap();
    assert_eq!(out_r.status.code(), Some(1));
    let err = recv_err.join().unwrap();
    assert!(err.contains("peer closed the connection"), "{err}");
    assert!(!out.exists(), "a partial destination is never presented as complete");
    assert!(!Path::new(&format!("{}.partial", out.display())).exists(), "and it is removed");
}

#[test]
fn keys_wrong_missing_or_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = keyfile(dir.path(), "k1");
    let k2 = keyfile(dir.path(), "k2");
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![5u8; 10000]).unwrap();
    let out = dir.path().join("dst.img");
    let addr = free_addr();
    // A wrong key is turned away; the receiver keeps waiting for its real sender until its
    // --timeout, and says that is why it gave up.
    let recv = spawn_until(
        ferryctl().args(["recv", "--listen", &addr, "--timeout", "3", "--key"]).arg(&k1).arg("--out").arg(&out),
        "listening on",
    );
    let send = ferryctl().args(["send", "--to", &addr, "--key"]).arg(&k2).arg("--file").arg(&src).output().unwrap();
    assert_eq!(send.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&send.stderr).contains("authentication failed"), "{}", String::from_utf8_lossy(&send.stderr));
    let r = recv.0.wait_with_output().unwrap();
    let log = recv.1.join().unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(log.contains("turned away") && log.contains("timed out after 3 s"), "{log}");
    assert!(!out.exists());

    // No key and no --insecure-no-auth.
    let o = ferryctl().args(["send", "--to", &addr, "--file"]).arg(&src).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("keygen"));
    // A key others can read.
    std::fs::set_permissions(&k1, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = ferryctl().args(["send", "--to", &addr, "--key"]).arg(&k1).arg("--file").arg(&src).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"), "{}", String::from_utf8_lossy(&o.stderr));
    // keygen never overwrites.
    let o = ferryctl().args(["keygen", "--out"]).arg(&k2).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// RDMA places pages with one-sided writes, so it cannot carry zstd frames: asking for
/// both is refused before anything connects. On this machine (no RDMA) a forced
/// `--transport rdma` fails at planning with the reason.
#[test]
fn rdma_transport_choices_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let k = keyfile(dir.path(), "k");
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![1u8; 4096]).unwrap();
    let o = ferryctl()
        .args(["send", "--to", "127.0.0.1:9", "--transport", "rdma", "--compress", "zstd:3", "--key"])
        .arg(&k)
        .arg("--file")
        .arg(&src)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot apply with --transport rdma"), "{err}");
    let caps = hw::probe(&hw::ProbeOptions::default());
    if caps.rdma_devices.is_empty() {
        let o = ferryctl()
            .args(["send", "--to", "127.0.0.1:9", "--transport", "rdma", "--key"])
            .arg(&k)
            .arg("--file")
            .arg(&src)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("no RDMA port can be used"), "{err}");
    }
}

#[test]
fn insecure_mode_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![9u8; 70000]).unwrap();
    let out = dir.path().join("dst.img");
    let addr = free_addr();
    let (recv, _) = spawn_until(ferryctl().args(["recv", "--insecure-no-auth", "--listen", &addr, "--out"]).arg(&out), "listening on");
    let send =
        ferryctl().args(["send", "--insecure-no-auth", "--transport", "sockets", "--to", &addr, "--file"]).arg(&src).output().unwrap();
    assert!(send.status.success(), "{}", String::from_utf8_lossy(&send.stderr));
    assert_eq!(finish(recv).0, Some(0));
    assert_eq!(std::fs::read(&out).unwrap(), vec![9u8; 70000]);
}

/// `ferryctl recv` and `status` through a running ferryd (its control socket).
#[test]
fn through_a_running_ferryd() {
    let ferryd = Path::new(env!("CARGO_BIN_EXE_ferryctl")).with_file_name("ferryd");
    if !ferryd.exists() {
        hw::report_skip(&format!("{} not built (cargo test --workspace builds it)", ferryd.display()));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "k");
    let plan = dir.path().join("plan.json");
    let out = ferryctl().args(["tune", "--json"]).output().unwrap();
    std::fs::write(&plan, &out.stdout).unwrap();
    let sock = dir.path().join("ferryd.sock");
    let (mut daemon, _log) = spawn_until(
        Command::new(&ferryd)
            .arg("--plan")
            .arg(&plan)
            .arg("--control")
            .arg(&sock)
            .args(["--metrics", "off", "--key"])
            .arg(&key)
            .env("RUST_LOG", "info"),
        "ferryd ready",
    );
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![3u8; 200_000]).unwrap();
    let dst = dir.path().join("dst.img");
    let addr = free_addr();
    let (recv, _) =
        spawn_until(ferryctl().args(["recv", "--json", "--listen", &addr, "--ferryd"]).arg(&sock).arg("--out").arg(&dst), "via ferryd");
    let send = ferryctl().args(["send", "--embedded", "--to", &addr, "--key"]).arg(&key).arg("--file").arg(&src).output().unwrap();
    assert!(send.status.success(), "{}", String::from_utf8_lossy(&send.stderr));
    let (code, report) = finish(recv);
    assert_eq!(code, Some(0));
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["role"], "recv");
    assert_eq!(std::fs::read(&dst).unwrap(), vec![3u8; 200_000]);
    let st = ferryctl().args(["status", "--socket"]).arg(&sock).output().unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success() && text.contains("sessions recv ok: 1"), "{text}");
    daemon.kill().unwrap();
    let _ = daemon.wait();
    // No ferryd there: a clear error, exit 1.
    let st = ferryctl().args(["status", "--socket"]).arg(dir.path().join("none.sock")).output().unwrap();
    assert_eq!(st.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&st.stderr).contains("cannot reach ferryd"));
}

/// An arena cannot be locked (no CAP_IPC_LOCK, 64 KiB RLIMIT_MEMLOCK): the transfer ends
/// with a message that names the limit and the way to fix it.
#[test]
fn memlock_too_low() {
    let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !have("setpriv") || !have("prlimit") {
        hw::report_skip("setpriv or prlimit (util-linux) missing: cannot run ferryctl under a low memlock limit");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "k");
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![1u8; 1 << 20]).unwrap();
    let out = dir.path().join("dst.img");
    let addr = free_addr();
    let (recv, _) = spawn_until(ferryctl().args(["recv", "--listen", &addr, "--key"]).arg(&key).arg("--out").arg(&out), "listening on");
    let send = Command::new("setpriv")
        .args(["--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "prlimit", "--memlock=65536:65536"])
        .arg(env!("CARGO_BIN_EXE_ferryctl"))
        .args(["send", "--embedded", "--to", &addr, "--key"])
        .arg(&key)
        .arg("--file")
        .arg(&src)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&send.stderr);
    assert_eq!(send.status.code(), Some(1), "{err}");
    assert!(err.contains("RLIMIT_MEMLOCK is too low") && err.contains("ferryctl doctor"), "{err}");
    let (code, _) = finish(recv);
    assert_eq!(code, Some(1));
    assert!(!out.exists());
}
