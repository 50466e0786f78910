//! What the fault-injection suite (`faults_*.rs`, run by `scripts/faults.sh`) shares: the
//! real binaries as processes, a plan, keys, and a hostile client that speaks the
//! protocol with a valid key.
// Each test binary uses part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::auth::{Auth, Key, client_handshake};
use dataplane::conn::{Ctl, SessionError};
use dataplane::plan::*;
use dataplane::wire::{self, CONTROL_LANE, Kind, Layout};

pub const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The binaries under test: this build's, or those in `$FERRY_BIN_DIR` (to show that a
/// case fails on an older build).
pub fn bin(name: &str) -> PathBuf {
    match std::env::var_os("FERRY_BIN_DIR") {
        Some(d) => Path::new(&d).join(name),
        None => Path::new(env!("CARGO_BIN_EXE_ferryctl")).with_file_name(name),
    }
}

pub fn ferryctl() -> Command {
    let mut c = Command::new(bin("ferryctl"));
    c.env("RUST_LOG", "info");
    c
}

pub fn ferryd_bin() -> PathBuf {
    bin("ferryd")
}

/// The key the binaries load, as the library takes it.
pub fn key() -> Auth {
    Auth::Key(Key::from_bytes((0..32).map(|i| u8::from_str_radix(&KEY_HEX[2 * i..2 * i + 2], 16).unwrap()).collect()).unwrap())
}

/// Writes the key file (mode 0600) into `dir`.
pub fn keyfile(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("key");
    std::fs::write(&p, format!("{KEY_HEX}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Another valid key, which the binaries do not hold.
pub fn wrong_keyfile(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("wrong-key");
    std::fs::write(&p, "ff".repeat(32) + "\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Blocking sockets, one worker, one lane, 256 KiB chunks, plain unlocked arenas.
pub fn plan() -> Plan {
    Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        host: "faults".into(),
        transport: Transport::Sockets,
        numa_node: 0,
        worker_cpus: vec![0],
        control_cpu: None,
        link: LinkPlan { interface: Some("lo".into()), speed_gbps: 10.0, rtt_us: 10.0, speed_assumed: true },
        chunk_size_bytes: 256 << 10,
        rdma: None,
        tcp: TcpPlan {
            connections_per_worker: 1,
            io_uring: false,
            ring_entries: 64,
            send_zc: false,
            socket_buffer_bytes: None,
            socket_buffer_needed_bytes: 1 << 20,
        },
        arena: ArenaPlan { bytes_per_worker: 4 << 20, backing: ArenaBacking::Normal, hugepages_2m_needed: 0, mlock: false },
        compression: Compression::Off,
        limits: Limits { handshake_timeout_ms: 2000, ..Limits::default() },
        migration: Default::default(),
        daemon: Default::default(),
        reasons: vec![],
    }
}

/// [`plan`] on one TCP transport: io_uring when `uring`, plain sockets otherwise.
pub fn plan_on(uring: bool) -> Plan {
    let mut p = plan();
    p.transport = if uring { Transport::Tcp } else { Transport::Sockets };
    p.tcp.io_uring = uring;
    p
}

pub fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Waits until `f` holds, for at most `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "{what} did not happen within {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process's resident memory, bytes.
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0) << 10
}

/// A process's user + system CPU time, seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// Descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// A running ferryd, killed when dropped; its log collected as it runs.
pub struct Ferryd {
    pub child: Child,
    pub socket: PathBuf,
    pub metrics: Option<String>,
    /// Where it serves peers, when its plan has it do so.
    pub peer: Option<String>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Ferryd {
    /// Starts ferryd with `plan` in `dir` (its socket `NAME.sock`), metrics on a free
    /// port; `nofile` caps its descriptors.
    pub fn start_with(dir: &Path, name: &str, plan: &Plan, nofile: Option<u32>) -> Ferryd {
        let plan_path = dir.join(format!("{name}-plan.json"));
        let mut v = serde_json::to_value(plan).unwrap();
        if std::env::var_os("FERRY_BIN_DIR").is_some() {
            // A build from before plans had limits refuses the field.
            v.as_object_mut().unwrap().remove("limits");
        }
        std::fs::write(&plan_path, v.to_string()).unwrap();
        let key = keyfile(dir);
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(ferryd_bin());
                c
            }
            None => Command::new(ferryd_bin()),
        };
        cmd.arg("--plan").arg(&plan_path).arg("--key").arg(&key).arg("--control").arg(&socket);
        cmd.args(["--metrics", "127.0.0.1:0"]).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("ferryd is built beside ferryctl (cargo test --workspace)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (mut metrics, mut peer) = (None, None);
        for line in lines.by_ref() {
            let line = line.unwrap();
            log.lock().unwrap().push_str(&(line.clone() + "\n"));
            if let Some(rest) = line.split("metrics on http://").nth(1) {
                metrics = Some(rest.trim_end_matches("/metrics").to_string());
            }
            if let Some(rest) = line.split("peers open streams on ").nth(1) {
                peer = Some(rest.trim().to_string());
            }
            if line.contains("ferryd ready") {
                break;
            }
        }
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                l2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Ferryd { child, socket, metrics, peer, log }
    }

    pub fn start(dir: &Path, name: &str) -> Ferryd {
        Ferryd::start_with(dir, name, &plan(), None)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// One request, its replies up to the last.
    pub fn ask(&self, req: &serde_json::Value) -> Vec<serde_json::Value> {
        use std::io::Write;
        let mut c = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        writeln!(c, "{req}").unwrap();
        BufReader::new(c).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect()
    }

    pub fn status(&self) -> serde_json::Value {
        let r = self.ask(&serde_json::json!({"cmd": "status"}));
        assert_eq!(r[0]["ok"], true, "{r:?}");
        r[0].clone()
    }

    /// The Prometheus text.
    /// Whether a running `role` session here has moved bytes (its live counters in
    /// /metrics): the session is under way.
    pub fn moving(&self, role: &str) -> bool {
        let prefix = format!("ferry_session_region_bytes{{role=\"{role}\",");
        self.scrape().lines().filter(|l| l.starts_with(&prefix)).any(|l| l.rsplit(' ').next().is_some_and(|n| n != "0"))
    }

    pub fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut c = TcpStream::connect(self.metrics.as_ref().unwrap()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        body
    }
}

impl Drop for Ferryd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that holds the key and speaks the protocol, to describe what it likes: the
/// control connection after SESSION, or the error that came instead of SESSION_OK.
pub fn hostile_session(addr: &str, layout: &Layout, lanes: u16, features: u64) -> Result<(Ctl, u64), SessionError> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (_, keys) = client_handshake(&mut s, &key(), CONTROL_LANE, 0, features)?;
    let mut ctl = Ctl::new(s, keys);
    ctl.send(Kind::Session, &wire::session_payload(layout, lanes, wire::DataTransport::Tcp))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::SessionOk, &mut buf)?;
    let id = wire::parse::<wire::SessionOk>(Kind::SessionOk, &buf)?.session.get();
    Ok((ctl, id))
}

/// A file of `mib` MiB that does not compress and has no zero pages.
pub fn noise(path: &Path, mib: usize, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9e3779b97f4a7c15u64 ^ seed;
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

/// A `ferryctl recv` that has said where it listens, its stderr collected.
pub struct Receiver {
    pub child: Child,
    pub log: std::thread::JoinHandle<String>,
}

/// Starts `ferryctl recv --embedded --listen ADDR --out OUT ARGS` and waits until it listens.
pub fn receiver(addr: &str, out: &Path, key: &Path, args: &[&str]) -> Receiver {
    let mut c = ferryctl();
    c.args(["recv", "--embedded", "--json", "--listen", addr, "--out"]).arg(out).arg("--key").arg(key).args(args);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("recv exited before listening:\n{seen}");
        }
        seen += &line;
        if line.contains("listening on") {
            break;
        }
    }
    let log = std::thread::spawn(move || {
        let _ = std::io::Read::read_to_string(&mut err, &mut seen);
        seen
    });
    Receiver { child, log }
}

impl Receiver {
    /// Waits for it to end: its exit code and stderr.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        (status.code(), self.log.join().unwrap())
    }
}

/// `ferryctl send --embedded`: exit code and stderr.
pub fn send(to: &str, file: &Path, key: &Path) -> (Option<i32>, String) {
    let out = ferryctl()
        .args(["send", "--embedded", "--json", "--to", to, "--compression", "off", "--transport", "sockets", "--file"])
        .arg(file)
        .arg("--key")
        .arg(key)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}
