//! Stream mode end to end with real QEMU: two qemu-system-x86_64 processes (no guest OS:
//! the firmware idles in SeaBIOS), guest RAM in a memory-backend-file holding the
//! realistic corpus image, migrated source QEMU -> ferry proxy -> ferry proxy ->
//! destination QEMU through QMP, with and without multifd; the destination must end
//! paused-then-running and its RAM (QMP `pmemsave`) must hash the same as the stopped
//! source's. A stream cut in the middle (the destination proxy killed) must fail the
//! migration on the source, which keeps running.
//!
//! Needs qemu-system-x86_64 (`scripts/setup.sh --test`); prints SKIP without it. KVM is used
//! when /dev/kvm opens, TCG otherwise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod hostile;

const MIB: u64 = 256;

/// One QEMU pair at a time: three pairs and their proxies at once on a 2-core machine
/// would time the tests out, not test anything more.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn have_qemu() -> bool {
    let ok = Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        hw::report_skip("qemu-system-x86_64 is not installed (scripts/setup.sh --test installs it)");
    }
    ok
}

fn accel() -> &'static str {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() { "kvm" } else { "tcg" }
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Events read while waiting for command replies, in order.
    events: std::collections::VecDeque<Value>,
    /// A RESUME event went by: the guest ran.
    resumed: bool,
    /// Commands sent: the id of the last.
    sent: u64,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t.elapsed() < Duration::from_secs(30), "QMP at {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut q = Qmp { r: BufReader::new(s.try_clone().unwrap()), w: s, events: Default::default(), resumed: false, sent: 0 };
        q.read(); // greeting
        q.cmd("qmp_capabilities", json!({}));
        // MIGRATION events on every status change, to wait on instead of polling.
        q.cmd("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}));
        q
    }

    fn read(&mut self) -> Value {
        self.try_read().expect("QMP closed")
    }

    /// The next message; none once QEMU closed the connection (it exited).
    fn try_read(&mut self) -> Option<Value> {
        let mut line = String::new();
        self.r.read_line(&mut line).ok()?;
        (!line.is_empty()).then(|| serde_json::from_str(&line).unwrap())
    }

    /// Waits (up to the read timeout) for a MIGRATION event with one of `statuses`; the
    /// status, or "exited" if QEMU closed the connection first.
    fn wait_migration(&mut self, statuses: &[&str]) -> String {
        loop {
            let Some(v) = self.events.pop_front().or_else(|| self.try_read()) else { return "exited".into() };
            let status = v["data"]["status"].as_str().unwrap_or_default();
            if v["event"] == "MIGRATION" && statuses.contains(&status) {
                return status.to_string();
            }
            if v["event"] == "RESUME" {
                self.resumed = true;
            }
        }
    }

    /// Sends a command with an id of its own and waits for the reply that carries it: a
    /// reply is never taken for another command's (a message that is neither an event nor
    /// this reply is printed and passed over).
    fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, Value> {
        self.sent += 1;
        let id = self.sent;
        writeln!(self.w, "{}", json!({"execute": name, "arguments": args, "id": id})).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if v["id"] != id {
                eprintln!("QMP: passed over a message that is not the reply to {name} (id {id}): {v}");
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
            return Ok(v["return"].clone());
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.try_cmd(name, args.clone()).unwrap_or_else(|e| panic!("{name} {args}: {e}"))
    }

    fn status(&mut self) -> String {
        let v = self.cmd("query-status", json!({}));
        v["status"].as_str().unwrap_or_else(|| panic!("query-status replied {v}")).to_string()
    }
}

/// A child process, and for a proxy the thread copying its stderr into its log.
struct Proc(Child, Option<std::thread::JoinHandle<()>>);

impl Proc {
    /// Waits for the process to exit, and then for its log to hold everything it wrote.
    fn wait(&mut self) -> std::process::ExitStatus {
        let st = self.0.wait().unwrap();
        if let Some(h) = self.1.take() {
            h.join().unwrap();
        }
        st
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(dir: &Path, name: &'static str, ram: &Path, extra: &[&str]) -> (Proc, Qmp) {
    let qmp = dir.join(format!("{name}.qmp"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", &format!("pc,accel={},memory-backend=mem", accel()), "-smp", "1", "-m", &format!("{MIB}M")])
        .arg("-object")
        .arg(format!("memory-backend-file,id=mem,size={MIB}M,mem-path={},share=on", ram.display()))
        .args(["-nographic", "-nodefaults", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let p = Proc(child, None);
    let q = Qmp::connect(&qmp);
    (p, q)
}

/// A `ferryctl proxy`, returned once it says it listens; the rest of its stderr goes to
/// NAME.log.
fn proxy(dir: &Path, args: &[&str], name: &'static str) -> Proc {
    let bin = Path::new(env!("CARGO_BIN_EXE_ferryctl"));
    let mut log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut child = Command::new(bin)
        .arg("proxy")
        .args(args)
        .args(["--key"])
        .arg(dir.join("key"))
        .arg("--json")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(dir.join(format!("{name}.json"))).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Killed and reaped on every path, the panic below included.
    let mut p = Proc(child, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        writeln!(log, "{line}").unwrap();
        if line.starts_with("ferry proxy:") {
            p.1 = Some(std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| drop(writeln!(log, "{l}")))));
            return p;
        }
    }
    panic!("{name} exited before it listened:\n{}", logs(dir));
}

/// Every log in the work directory, for a failure message.
fn logs(d: &Path) -> String {
    let mut out = String::new();
    let mut names: Vec<_> =
        std::fs::read_dir(d).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect();
    names.sort();
    for p in names {
        let s = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        out += &format!("--- {} ---\n{}\n", p.display(), lines[lines.len().saturating_sub(20)..].join("\n"));
    }
    out
}

/// Pages (offsets) where two dumps differ.
fn differing_pages(a: &Path, b: &Path) -> Vec<String> {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.chunks(4096).zip(y.chunks(4096)).enumerate().filter(|(_, (p, q))| p != q).map(|(i, _)| format!("{:#x}", i * 4096)).collect()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Guest RAM files: the source with the corpus image, the destination empty.
fn ram_files(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("src.ram");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&src).unwrap();
    f.set_len(MIB << 20).unwrap();
    let mut image = vec![0u8; (MIB << 20) as usize];
    control::guest::fill_image(&mut image, 20240601);
    std::os::unix::fs::FileExt::write_all_at(&f, &image, 0).unwrap();
    let dst = dir.join("dst.ram");
    std::fs::File::create(&dst).unwrap().set_len(MIB << 20).unwrap();
    (src, dst)
}

/// The source QEMU, running on the corpus image; the destination QEMU, paused with its
/// incoming migration deferred; and the socket the destination is to listen on.
fn qemu_pair(d: &Path) -> ((Proc, Qmp), (Proc, Qmp), PathBuf) {
    let (src_ram, dst_ram) = ram_files(d);
    let dst = qemu(d, "dst", &dst_ram, &["-S", "-incoming", "defer"]);
    let src = qemu(d, "src", &src_ram, &[]);
    (src, dst, d.join("dst-incoming.sock"))
}

/// A copy of a RAM dump with 0xC0000-0xFFFFF zeroed.
fn mask_bios_shadow(dump: &Path) -> PathBuf {
    let mut b = std::fs::read(dump).unwrap();
    b[0xc0000..0x100000].fill(0);
    let out = dump.with_extension("masked");
    std::fs::write(&out, b).unwrap();
    out
}

fn sha(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// A work directory on tmpfs (the RAM files are guest memory) with a key for the proxies.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("ferry-qemu-").tempdir_in("/dev/shm").unwrap();
    std::fs::write(dir.path().join("key"), "5a".repeat(32) + "\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path().join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

/// Both QEMUs' RAM as each guest sees it (pmemsave) is the same, but for the legacy BIOS
/// shadow window 0xC0000-0xFFFFF: QEMU's destination writes a page there (0xE8000) after
/// loading, with or without ferry (QEMU to QEMU directly shows the same page;
/// ../shared/tools/peers/bench_migration.py documents it).
fn same_ram(d: &Path, sqmp: &mut Qmp, dqmp: &mut Qmp) {
    let (sdump, ddump) = (d.join("src.dump"), d.join("dst.dump"));
    sqmp.cmd("pmemsave", json!({"val": 0, "size": MIB << 20, "filename": sdump.to_str().unwrap()}));
    dqmp.cmd("pmemsave", json!({"val": 0, "size": MIB << 20, "filename": ddump.to_str().unwrap()}));
    let diff = differing_pages(&sdump, &ddump);
    assert!(diff.iter().all(|p| (0xc0000..0x100000).contains(&u64::from_str_radix(&p[2..], 16).unwrap())), "pages differ at {diff:?}");
    let (sh, dh) = (sha(&mask_bios_shadow(&sdump)), sha(&mask_bios_shadow(&ddump)));
    assert_eq!(sh, dh, "the destination's RAM hashes as the source's");
    eprintln!("RAM sha256 (BIOS shadow window zeroed) {sh} on both sides; pages differing in that window: {diff:?}");
}

/// Source QEMU -> proxy -> proxy -> destination QEMU; returns (source status, destination
/// status before and after `cont`, hashes equal, the source proxy's report).
fn migrate(multifd: Option<u32>, compress: &str) {
    let dir = workdir();
    let d = dir.path();
    let ((_sq, mut sqmp), (_dq, mut dqmp), dst_in) = qemu_pair(d);
    if let Some(n) = multifd {
        for q in [&mut sqmp, &mut dqmp] {
            q.cmd("migrate-set-capabilities", json!({"capabilities": [{"capability": "multifd", "state": true}]}));
            q.cmd("migrate-set-parameters", json!({"multifd-channels": n}));
        }
    }
    sqmp.cmd("migrate-set-parameters", json!({"max-bandwidth": 100u64 << 30}));
    dqmp.cmd("migrate-incoming", json!({"uri": format!("unix:{}", dst_in.display())}));
    let port = free_port();
    let serve = format!("127.0.0.1:{port}");
    let _dp = proxy(d, &["--serve", &serve, "--forward", &format!("unix:{}", dst_in.display()), "--compression", compress], "dst-proxy");
    let src_sock = d.join("ferry-src.sock");
    let mut sp = proxy(d, &["--listen", &format!("unix:{}", src_sock.display()), "--to", &serve, "--compression", compress], "src-proxy");
    assert_eq!(sqmp.status(), "running");
    sqmp.cmd("migrate", json!({"uri": format!("unix:{}", src_sock.display())}));
    let ended = sqmp.wait_migration(&["completed", "failed", "cancelled"]);
    let info = sqmp.cmd("query-migrate", json!({}));
    assert_eq!(ended, "completed", "{info}\n{}", logs(d));
    assert_eq!(dqmp.wait_migration(&["completed", "failed"]), "completed", "the destination loads it\n{}", logs(d));
    assert_eq!(sqmp.status(), "postmigrate");
    assert_eq!(dqmp.status(), "paused", "the destination was started with -S");
    same_ram(d, &mut sqmp, &mut dqmp);
    dqmp.cmd("cont", json!({}));
    assert_eq!(dqmp.status(), "running");
    let st = sp.wait();
    assert!(st.success(), "{}", std::fs::read_to_string(d.join("src-proxy.log")).unwrap_or_default());
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(d.join("src-proxy.json")).unwrap()).unwrap();
    let channels = rep["channels"].as_array().unwrap().len();
    assert_eq!(channels, 1 + multifd.unwrap_or(0) as usize, "{rep}");
    eprintln!(
        "QEMU via ferry ({}, compress {compress}): {} ms total, {} ms downtime, {} stream bytes, {} wire bytes, {} channel(s)",
        multifd.map_or("default".into(), |n| format!("multifd-{n}")),
        info["total-time"],
        info["downtime"],
        rep["sent_bytes"],
        rep["wire_bytes"],
        channels
    );
}

#[test]
fn qemu_migrates_through_ferry() {
    if !have_qemu() {
        return;
    }
    let _one = serial();
    migrate(None, "off");
}

#[test]
fn qemu_multifd_migrates_through_ferry_with_compression() {
    if !have_qemu() {
        return;
    }
    let _one = serial();
    migrate(Some(4), "zstd:1");
}

#[test]
fn a_stream_cut_in_the_middle_fails_the_migration() {
    if !have_qemu() {
        return;
    }
    let _one = serial();
    let dir = workdir();
    let d = dir.path();
    let ((_sq, mut sqmp), (_dq, mut dqmp), dst_in) = qemu_pair(d);
    // Slow enough to cut in the middle: 32 MB/s for 256 MiB.
    sqmp.cmd("migrate-set-parameters", json!({"max-bandwidth": 32u64 << 20}));
    dqmp.cmd("migrate-incoming", json!({"uri": format!("unix:{}", dst_in.display())}));
    let serve = format!("127.0.0.1:{}", free_port());
    let mut dp = proxy(d, &["--serve", &serve, "--forward", &format!("unix:{}", dst_in.display())], "dst-proxy");
    let src_sock = d.join("ferry-src.sock");
    let mut sp = proxy(d, &["--listen", &format!("unix:{}", src_sock.display()), "--to", &serve], "src-proxy");
    sqmp.cmd("migrate", json!({"uri": format!("unix:{}", src_sock.display())}));
    // QEMU has no progress event: poll until part of RAM has gone through the proxies.
    wait_for("some RAM to move", || sqmp.cmd("query-migrate", json!({}))["ram"]["transferred"].as_u64().unwrap_or(0) > 32 << 20);
    dp.0.kill().unwrap();
    dp.wait();
    let ended = sqmp.wait_migration(&["completed", "failed", "cancelled"]);
    let info = sqmp.cmd("query-migrate", json!({}));
    assert_eq!(ended, "failed", "{info}");
    assert_eq!(sqmp.status(), "running", "the source guest keeps running after a failed migration");
    let st = sp.wait();
    assert!(!st.success(), "the source proxy reports the broken stream");
    let log = std::fs::read_to_string(d.join("src-proxy.log")).unwrap();
    assert!(log.contains("stream broke"), "{log}");
    // The destination QEMU never became a running guest: its incoming migration fails
    // (it may exit right after saying so).
    let end = dqmp.wait_migration(&["completed", "failed"]);
    assert_ne!(end, "completed");
    assert!(!dqmp.resumed, "the destination never ran the guest");
}

/// KubeVirt's seam (docs/kubevirt.md), at the socket level: ferryd driven the way a
/// changed virt-handler would drive it. The source launcher pod's libvirt migrates to
/// `<its socket dir>/migrationproxy/<vmi uid>-49152-source.sock`, and libvirt has the
/// target pod's QEMU listen at the same path inside that pod; on each node that directory
/// is a different one under the kubelet's pods. The source node's virt-handler sends one
/// `stream_open` to its ferryd's control socket (what `StartSourceListener` and the target's
/// `StartTargetListener` do today, with TCP between them), naming both files and the
/// target node's ferryd peer port; the target ferryd forwards only into its stream
/// directory, the target node's pods. QEMU migrates with 2 multifd channels through it.
#[test]
fn kubevirt_layout_through_ferryd() {
    if !have_qemu() {
        return;
    }
    let _one = serial();
    let dir = workdir();
    let d = dir.path();
    let uid = "6a1f3c9e-0c8b-4d7e-9a51-2b9f5c1e7d10";
    let key = format!("{uid}-49152");
    let pods = |node: &str| d.join(node).join("var/lib/kubelet/pods");
    // What virt-handler reaches as each launcher's /var/run/kubevirt.
    let launcher = |node: &str, pod: &str| pods(node).join(pod).join("volumes/kubernetes.io~empty-dir/sockets");
    let sock = |base: PathBuf| base.join("migrationproxy").join(format!("{key}-source.sock"));
    let (src_file, dst_file) = (sock(launcher("node-a", "virt-launcher-a")), sock(launcher("node-b", "virt-launcher-b")));
    std::fs::create_dir_all(src_file.parent().unwrap()).unwrap();
    std::fs::create_dir_all(dst_file.parent().unwrap()).unwrap();
    // Each QEMU sees its pod's socket directory by a short path, as /var/run/kubevirt in
    // the pod; ferryd, like virt-handler, by the node's long one (past what a socket
    // address holds).
    std::os::unix::fs::symlink(launcher("node-a", "virt-launcher-a"), d.join("a")).unwrap();
    std::os::unix::fs::symlink(launcher("node-b", "virt-launcher-b"), d.join("b")).unwrap();
    let in_pod = |pod: &str| sock(d.join(pod));
    assert!(dst_file.as_os_str().len() > 108, "{}", dst_file.display());
    let node = |name: &str, peer: bool| {
        let mut p = hostile::plan();
        p.daemon.stream_dirs = vec![pods(name)];
        p.daemon.peer = peer.then(|| "127.0.0.1:0".into());
        hostile::Ferryd::start_with(d, name, &p, None)
    };
    let (a, b) = (node("node-a", false), node("node-b", true));
    let ((_sq, mut sqmp), (_dq, mut dqmp), _) = qemu_pair(d);
    for q in [&mut sqmp, &mut dqmp] {
        q.cmd("migrate-set-capabilities", json!({"capabilities": [{"capability": "multifd", "state": true}]}));
        q.cmd("migrate-set-parameters", json!({"multifd-channels": 2}));
    }
    sqmp.cmd("migrate-set-parameters", json!({"max-bandwidth": 100u64 << 30}));
    dqmp.cmd("migrate-incoming", json!({"uri": format!("unix:{}", in_pod("b").display())}));
    // virt-handler on node A: one request on ferryd's control socket.
    let c = UnixStream::connect(&a.socket).unwrap();
    let req = json!({"cmd": "stream_open", "to": b.peer, "name": key,
                     "listen": [format!("unix:{}", src_file.display())], "forward": format!("unix:{}", dst_file.display())});
    writeln!(&c, "{req}").unwrap();
    let mut replies = BufReader::new(c).lines().map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap());
    let listening = replies.by_ref().find(|v| v["event"] == "listening" || v.get("ok").is_some()).unwrap();
    assert_eq!(listening["endpoints"][0], format!("unix:{}", src_file.display()), "{listening}\n{}\n{}", a.log(), b.log());
    // The source launcher's libvirt: migrate to the proxy file.
    sqmp.cmd("migrate", json!({"uri": format!("unix:{}", in_pod("a").display())}));
    let ended = sqmp.wait_migration(&["completed", "failed", "cancelled"]);
    assert_eq!(ended, "completed", "{}\n{}\n{}", sqmp.cmd("query-migrate", json!({})), a.log(), b.log());
    assert_eq!(dqmp.wait_migration(&["completed", "failed"]), "completed");
    same_ram(d, &mut sqmp, &mut dqmp);
    let done = replies.next().unwrap();
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(done["report"]["channels"].as_array().unwrap().len(), 3, "the main channel and 2 multifd ones: {done}");
    assert_eq!(done["destination"]["received_bytes"], done["report"]["sent_bytes"], "{done}");
    assert!(!src_file.exists(), "the source file is gone with the stream (StopSourceListener's job today)");
    assert!(b.log().contains(&format!("stream {key}: opened by 127.0.0.1")), "{}", b.log());
    // A peer may not have the target forward outside its pods: the other node's files.
    let c = UnixStream::connect(&a.socket).unwrap();
    let req = json!({"cmd": "stream_open", "to": b.peer, "name": "x", "listen": [format!("unix:{}", d.join("x.sock").display())],
                     "forward": format!("unix:{}", src_file.display())});
    writeln!(&c, "{req}").unwrap();
    let v: Value = serde_json::from_str(&BufReader::new(c).lines().next().unwrap().unwrap()).unwrap();
    assert!(v["error"].as_str().is_some_and(|e| e.contains("not in a stream directory")), "{v}");
}
