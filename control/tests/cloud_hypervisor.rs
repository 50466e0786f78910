//! Cloud Hypervisor, a second real VMM, migrating through ferryd's stream service: two
//! Cloud Hypervisor processes (v54, built by `../shared/tools/cloud-hypervisor/build.sh`)
//! with its minimal PVH guest (1 GiB of RAM), and two ferryd standing for two hosts; one
//! `ferryctl stream open` on the source side opens both ends. Once over one UNIX
//! connection, once over `connections=4` TCP; each beside Cloud Hypervisor's own migration
//! of the same guest in the same run, for the figures. The destination must report the
//! guest Running, the source VMM must have handed it over (it exits), and ferry's two
//! sides must agree on the bytes.
//!
//! Needs KVM and the Cloud Hypervisor build (`scripts/setup.sh --test` makes it); prints
//! SKIP without them.

mod hostile;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const GUEST_MIB: u64 = 1024;

/// Where build.sh put the binaries, if it did.
fn ch_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("CH_BUILD").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"))
            .join("cloud-hypervisor")
    });
    let bin = cache.join("bin");
    ["cloud-hypervisor", "ch-remote", "pvh-guest.elf"].iter().all(|f| bin.join(f).exists()).then_some(bin)
}

fn missing() -> Option<String> {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Some("Cloud Hypervisor needs /dev/kvm".into());
    }
    if ch_dir().is_none() {
        return Some("no Cloud Hypervisor build (scripts/setup.sh --test runs ../shared/tools/cloud-hypervisor/build.sh)".into());
    }
    None
}

/// A child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One Cloud Hypervisor process and its API socket; with the guest booted, or empty (a
/// migration's destination).
struct Vmm {
    p: Proc,
    api: PathBuf,
    bin: PathBuf,
}

impl Vmm {
    fn start(d: &Path, name: &str, guest: bool) -> Vmm {
        let bin = ch_dir().unwrap();
        let api = d.join(format!("{name}.api"));
        let mut c = Command::new(bin.join("cloud-hypervisor"));
        // Its seccomp filter refuses getcwd and newfstatat in the migration worker on this
        // host (../shared/tools/cloud-hypervisor/README.md).
        c.args(["--seccomp", "false", "--api-socket"]).arg(&api);
        if guest {
            c.arg("--kernel").arg(bin.join("pvh-guest.elf"));
            c.args(["--memory", &format!("size={GUEST_MIB}M"), "--cpus", "boot=1", "--serial", "off", "--console", "off"]);
        }
        let log = std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
        let p = Proc(c.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap());
        let v = Vmm { p, api, bin };
        wait_for(&format!("{name}'s API"), Duration::from_secs(20), || v.remote(&["ping"]).status.success());
        if guest {
            wait_for("the guest to run", Duration::from_secs(20), || v.state() == "Running");
        }
        v
    }

    fn remote(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("ch-remote")).arg("--api-socket").arg(&self.api).args(args).output().unwrap()
    }

    /// `ch-remote ARGS` running (a migration command returns when the migration has).
    fn remote_child(&self, args: &[&str]) -> Child {
        Command::new(self.bin.join("ch-remote"))
            .arg("--api-socket")
            .arg(&self.api)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn state(&self) -> String {
        let out = self.remote(&["info"]);
        serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v["state"].as_str().map(String::from)).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        self.p.0.try_wait().unwrap().is_some()
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether something listens on TCP `port` (IPv4), from /proc/net/tcp.
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[3] == "0A" && f[1].rsplit_once(':').is_some_and(|(_, p)| u16::from_str_radix(p, 16) == Ok(port))
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Where a migration goes: Cloud Hypervisor's receiver URL, and what its sender is told.
struct Route {
    receiver: String,
    sender: String,
}

/// Migrates a fresh 1 GiB guest along `route`: seconds from `send-migration` until the
/// destination runs the guest and the source VMM has exited.
fn migrate(d: &Path, tag: &str, route: &Route) -> f64 {
    let mut src = Vmm::start(d, &format!("{tag}-src"), true);
    let dst = Vmm::start(d, &format!("{tag}-dst"), false);
    // receive-migration returns once the migration has been received (or failed).
    let receive = dst.remote_child(&["receive-migration", &format!("receiver_url={}", route.receiver)]);
    // The receiver listens from its own thread: wait for its socket.
    if let Some(p) = route.receiver.strip_prefix("unix:") {
        wait_for("the receiver's socket", Duration::from_secs(10), || Path::new(p).exists());
    } else {
        // Not by connecting: the receiver would take that connection for the migration's.
        let port: u16 = route.receiver.rsplit_once(':').unwrap().1.parse().unwrap();
        wait_for("the receiver's port", Duration::from_secs(10), || listening(port));
    }
    let t = Instant::now();
    let send = src.remote_child(&["send-migration", &format!("destination_url={}", route.sender)]);
    for (what, c) in [("send-migration", send), ("receive-migration", receive)] {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{tag}: {what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The destination's API answers again once the migration is in.
    wait_for(&format!("{tag}: the guest running at the destination"), Duration::from_secs(60), || dst.state() == "Running");
    wait_for(&format!("{tag}: the source VMM to hand over and exit"), Duration::from_secs(30), || src.exited());
    t.elapsed().as_secs_f64()
}

/// `ferryctl stream open` through the source ferryd: the child, once it says where the
/// VMM migrates to.
fn open_stream(d: &Path, src: &hostile::Ferryd, peer: &str, id: &str, listen: &str, forward: &str, compression: &str) -> Child {
    let mut c = hostile::ferryctl()
        .args(["stream", "open", "--json", "--to", peer, "--id", id, "--listen", listen, "--forward", forward])
        .args(["--compression", compression, "--ferryd"])
        .arg(&src.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(c.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref().map_while(Result::ok) {
        log += &line;
        log += "\n";
        if line.contains("the VMM migrates to") {
            let name = d.join(format!("{id}-ferryctl.log"));
            std::thread::spawn(move || std::fs::write(name, lines.map_while(Result::ok).collect::<Vec<_>>().join("\n")));
            return c;
        }
    }
    let _ = c.kill();
    let _ = c.wait();
    panic!("ferryctl stream open ended before it listened:\n{log}\n{}", src.log());
}

fn report(c: Child) -> Value {
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "ferryctl stream open failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cloud_hypervisor_migrates_through_ferry() {
    if let Some(why) = missing() {
        hw::report_skip(&why);
        return;
    }
    let dir = tempfile::Builder::new().prefix("ferry-ch-").tempdir_in("/tmp").unwrap();
    let d = dir.path();
    let (a_dir, b_dir) = (d.join("a"), d.join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let node = |name: &str, streams: &Path, peer: bool| {
        let mut p = hostile::plan();
        p.daemon.stream_dirs = vec![streams.to_path_buf()];
        p.daemon.peer = peer.then(|| "127.0.0.1:0".into());
        hostile::Ferryd::start_with(d, name, &p, None)
    };
    let (fa, fb) = (node("ferryd-a", &a_dir, false), node("ferryd-b", &b_dir, true));
    let peer = fb.peer.clone().unwrap();

    // One UNIX connection: Cloud Hypervisor's own, then through ferry.
    let direct = migrate(
        d,
        "direct-unix",
        &Route {
            receiver: format!("unix:{}", d.join("direct.sock").display()),
            sender: format!("unix:{}", d.join("direct.sock").display()),
        },
    );
    let (listen, forward) = (format!("unix:{}", a_dir.join("ch1.sock").display()), format!("unix:{}", b_dir.join("ch1.sock").display()));
    let stream = open_stream(d, &fa, &peer, "ch1", &listen, &forward, "off");
    let ferry = migrate(d, "ferry-unix", &Route { receiver: forward.clone(), sender: listen.clone() });
    let r = report(stream);
    assert_eq!(r["source"]["channels"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["destination"]["received_bytes"], r["source"]["sent_bytes"], "{r}");
    assert!(r["source"]["sent_bytes"].as_u64().unwrap() >= GUEST_MIB << 20, "the whole guest went through: {r}");

    // The same with zstd: the guest's zero pages, which Cloud Hypervisor sends as they
    // are, cost the wire next to nothing.
    let (listen, forward) = (format!("unix:{}", a_dir.join("chz.sock").display()), format!("unix:{}", b_dir.join("chz.sock").display()));
    let stream = open_stream(d, &fa, &peer, "chz", &listen, &forward, "zstd:1");
    let ferry_zstd = migrate(d, "ferry-unix-zstd", &Route { receiver: forward.clone(), sender: listen.clone() });
    let rz = report(stream);
    assert_eq!(rz["destination"]["received_bytes"], rz["source"]["sent_bytes"], "{rz}");
    let (zs, zw) = (rz["source"]["sent_bytes"].as_u64().unwrap(), rz["source"]["wire_bytes"].as_u64().unwrap());
    assert!(zw < zs / 4, "zstd carries the mostly-zero guest in far fewer bytes: {rz}");

    // connections=4 over TCP.
    let port = free_port();
    let receiver = format!("tcp:127.0.0.2:{port}");
    let direct4 = migrate(d, "direct-tcp4", &Route { receiver: receiver.clone(), sender: format!("{receiver},connections=4") });
    let port = free_port();
    let (listen, forward) = (format!("tcp:127.0.0.1:{port}"), format!("tcp:127.0.0.2:{port}"));
    let stream = open_stream(d, &fa, &peer, "ch4", &listen, &forward, "off");
    let ferry4 = migrate(d, "ferry-tcp4", &Route { receiver: forward.clone(), sender: format!("{listen},connections=4") });
    let r4 = report(stream);
    // Cloud Hypervisor's control connection and its four memory connections.
    assert_eq!(r4["source"]["channels"].as_array().unwrap().len(), 5, "{r4}");
    assert_eq!(r4["destination"]["received_bytes"], r4["source"]["sent_bytes"], "{r4}");

    eprintln!(
        "Cloud Hypervisor, {GUEST_MIB} MiB guest: one UNIX connection: direct {direct:.2} s, through ferry {ferry:.2} s ({:.2}x), \
         with zstd:1 {ferry_zstd:.2} s ({:.2}x; {zs} stream bytes in {zw} wire bytes); connections=4 TCP: direct {direct4:.2} s, \
         through ferry {ferry4:.2} s ({:.2}x); stream bytes {} and {}",
        ferry / direct,
        ferry_zstd / direct,
        ferry4 / direct4,
        r["source"]["sent_bytes"],
        r4["source"]["sent_bytes"]
    );
}
