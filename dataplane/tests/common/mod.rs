//! What the engine-level tests share: a plan for loopback, and a key.
// Each test binary uses part of this.
#![allow(dead_code)]

use dataplane::auth::{Auth, Key};
use dataplane::plan::*;

/// Blocking sockets on loopback, `workers` x `conns` lanes, plain pages for the arenas.
pub fn plan(workers: usize, conns: u32, compression: Compression, chunk: u64) -> Plan {
    Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        host: "test".into(),
        transport: Transport::Sockets,
        numa_node: 0,
        worker_cpus: vec![0; workers],
        control_cpu: None,
        link: LinkPlan { interface: Some("lo".into()), speed_gbps: 10.0, rtt_us: 10.0, speed_assumed: true },
        chunk_size_bytes: chunk,
        rdma: None,
        tcp: TcpPlan {
            connections_per_worker: conns,
            io_uring: false,
            ring_entries: 64,
            send_zc: false,
            socket_buffer_bytes: Some(1 << 20),
            socket_buffer_needed_bytes: 1 << 20,
        },
        arena: ArenaPlan { bytes_per_worker: 8 << 20, backing: ArenaBacking::Normal, hugepages_2m_needed: 0, mlock: false },
        compression,
        limits: Limits::default(),
        migration: Default::default(),
        daemon: Default::default(),
        reasons: vec![],
    }
}

/// A 32-byte key of `b`s.
pub fn key(b: u8) -> Auth {
    Auth::Key(Key::from_bytes(vec![b; 32]).unwrap())
}

/// A ferryd with its own control socket (and the plan of [`ferryd_plan`]), killed when
/// dropped.
pub struct Ferryd {
    pub child: std::process::Child,
    pub socket: std::path::PathBuf,
    /// Where it serves peers, when its plan has it do so (`daemon.peer`).
    pub peer: Option<String>,
}

/// The plan the test ferryd processes run: 2 workers of one lane each, 256 KiB chunks.
pub fn ferryd_plan() -> Plan {
    plan(2, 1, Compression::Off, 256 << 10)
}

impl Ferryd {
    pub fn start(dir: &std::path::Path, name: &str) -> Ferryd {
        use std::io::BufRead;
        let plan_path = dir.join("plan.json");
        // A test may have written a plan of its own.
        if !plan_path.exists() {
            std::fs::write(&plan_path, serde_json::to_string(&ferryd_plan()).unwrap()).unwrap();
        }
        if !dir.join("key").exists() {
            std::fs::write(dir.join("key"), "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferryd"))
            .arg("--plan")
            .arg(&plan_path)
            .arg("--key")
            .arg(dir.join("key"))
            .arg("--control")
            .arg(&socket)
            .args(["--metrics", "off"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Blocks on ferryd's own output until it says ready; the rest is drained.
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut peer = None;
        let ready = lines.by_ref().map_while(Result::ok).any(|l| {
            if let Some(addr) = l.split("peers open streams on ").nth(1) {
                peer = Some(addr.trim().to_string());
            }
            l.contains("ferryd ready")
        });
        assert!(ready, "ferryd {name} exited before it was ready");
        // Kept in DIR/NAME.log for a failing test's reader.
        let log = dir.join(format!("{name}.log"));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut out = std::fs::File::create(log).ok();
            for l in lines.map_while(Result::ok) {
                if let Some(f) = out.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
            }
        });
        Ferryd { child, socket, peer }
    }
}

impl Drop for Ferryd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on loopback standing for the network between two hosts: it can be cut
/// (every connection through it closed, new ones closed as they come) and restored.
pub struct Proxy {
    pub addr: String,
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    target: String,
    /// (forwarding, connections accepted, connections refused while cut or swallowed
    /// while silent)
    counts: std::sync::Mutex<(bool, usize, usize)>,
    changed: std::sync::Condvar,
    open: std::sync::Mutex<Vec<std::net::TcpStream>>,
    /// Silent: the connections open stay open but every byte is dropped, both ways (a
    /// partition TCP does not notice); new ones are held open and never answered.
    silent: std::sync::atomic::AtomicBool,
}

/// Relays `from` to `to` until either ends; while the relay is silent the bytes are
/// read and dropped, and a close goes no further.
fn pump(st: &ProxyState, mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            // A close is not carried across a silence either: the other end hears nothing
            // (`restore` closes it).
            Ok(0) | Err(_) if st.silent.load(std::sync::atomic::Ordering::Relaxed) => return,
            Ok(0) | Err(_) => break,
            Ok(_) if st.silent.load(std::sync::atomic::Ordering::Relaxed) => {}
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = std::sync::Arc::new(ProxyState {
            target: target.to_string(),
            counts: std::sync::Mutex::new((true, 0, 0)),
            changed: std::sync::Condvar::new(),
            open: std::sync::Mutex::new(Vec::new()),
            silent: std::sync::atomic::AtomicBool::new(false),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(c) = c else { return };
                let silent = st.silent.load(std::sync::atomic::Ordering::Relaxed);
                let forwarding = {
                    let mut n = st.counts.lock().unwrap();
                    if n.0 && !silent {
                        n.1 += 1
                    } else {
                        n.2 += 1
                    }
                    n.0
                };
                if silent {
                    // Held, and never answered: a handshake into a silent link hears
                    // nothing (`restore` closes it).
                    st.open.lock().unwrap().push(c);
                } else if forwarding && let Ok(up) = std::net::TcpStream::connect(&st.target) {
                    let mut open = st.open.lock().unwrap();
                    open.extend([c.try_clone().unwrap(), up.try_clone().unwrap()]);
                    for (from, to) in [(c.try_clone().unwrap(), up.try_clone().unwrap()), (up, c)] {
                        let st = st.clone();
                        std::thread::spawn(move || pump(&st, from, to));
                    }
                }
                st.changed.notify_all();
            }
        });
        Proxy { addr, state }
    }

    /// Closes every connection through the relay; new ones are closed as they come.
    pub fn cut(&self) {
        self.state.counts.lock().unwrap().0 = false;
        for c in self.state.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Drops every byte from now on, both ways, on the connections open: the link goes
    /// silent while TCP holds them. New connections are held open and never answered
    /// (counted as refused).
    pub fn silence(&self) {
        self.state.silent.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Relays new connections again. After a silence, the connections it held silent are
    /// closed (their ends gave up on them, or will).
    pub fn restore(&self) {
        self.state.counts.lock().unwrap().0 = true;
        if self.state.silent.swap(false, std::sync::atomic::Ordering::Relaxed) {
            for c in self.state.open.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Connections accepted and relayed, and refused (cut) or swallowed (silent), so far.
    pub fn counts(&self) -> (usize, usize) {
        let n = self.state.counts.lock().unwrap();
        (n.1, n.2)
    }

    /// Waits (at most a minute) until `done(accepted, refused)` holds.
    pub fn wait_for(&self, done: impl Fn(usize, usize) -> bool) {
        if !self.wait_within(std::time::Duration::from_secs(60), done) {
            let (accepted, refused) = self.counts();
            panic!("the relay saw {accepted} connection(s) and refused {refused}");
        }
    }

    /// Waits until `done(accepted, refused)` holds, `limit` at most: whether it did.
    pub fn wait_within(&self, limit: std::time::Duration, done: impl Fn(usize, usize) -> bool) -> bool {
        let n = self.state.counts.lock().unwrap();
        !self.state.changed.wait_timeout_while(n, limit, |n| !done(n.1, n.2)).unwrap().1.timed_out()
    }
}
