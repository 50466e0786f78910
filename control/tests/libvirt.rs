//! libvirt through ferry, for real: two session-mode libvirtd on this machine (each with
//! its own runtime directory and host UUID), run as user nobody with the kvm group as a
//! distribution's qemu user would be; a firmware-only guest whose RAM holds a 64 MiB
//! image; and `ferryctl migrate`, run as that user too, through two ferryd that run as
//! root (the VMM's user reaches ferryd's control socket and stream endpoints through
//! their group, `--control-group`, `[daemon] stream_group`).
//!
//! The destination "host" (its ferryd and its libvirtd, so its QEMU) lives in a mount
//! namespace of its own in which the stream directory is another directory: the same
//! UNIX path names a different socket on each "host", which is what libvirt's
//! `--migrateuri unix://PATH` needs (both QEMUs are given the one path).
//!
//! Checked: over TCP with `--parallel` (QEMU's main channel and 4 multifd ones), over the
//! default UNIX path; the guest running at the destination with its image in RAM (QMP
//! `pmemsave` through `virsh qemu-monitor-command`, against the image the source loaded,
//! where the destination's own loader put other bytes); and a migration cut in the
//! middle (the destination ferryd killed) fails while the source guest keeps running. A
//! direct `virsh migrate` in the same run gives libvirt's own figures beside ferry's.
//!
//! Needs root, libvirtd, virsh and qemu-system-x86_64 (`scripts/setup.sh --test`); prints
//! SKIP without them (fails under CI, which has them). KVM when /dev/kvm exists, TCG
//! otherwise.

mod hostile;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The guest's RAM and the image in it: 64 MiB from 16 MiB on.
const RAM_MIB: u64 = 256;
const IMAGE_AT: u64 = 16 << 20;
const IMAGE_BYTES: usize = 64 << 20;
/// The user the VMMs (and ferryctl) run as, and its group.
const NOBODY: u32 = 65534;

fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (a second user for the VMMs, a mount namespace for the destination)".into());
    }
    for tool in ["libvirtd", "virsh", "qemu-system-x86_64", "unshare", "nsenter", "setpriv"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).chain(["/usr/sbin".into(), "/sbin".into()]).any(|d| d.join(tool).exists()));
        if !found {
            return Some(format!("{tool} is not installed (scripts/setup.sh --test installs libvirt and QEMU)"));
        }
    }
    None
}

fn kvm() -> bool {
    std::fs::metadata("/dev/kvm").is_ok()
}

/// nobody, with the kvm group when there is one (QEMU opens /dev/kvm).
fn groups() -> String {
    match nix::unistd::Group::from_name("kvm") {
        Ok(Some(g)) => format!("{NOBODY},{}", g.gid),
        _ => NOBODY.to_string(),
    }
}

/// `program` as nobody, with a home and caches in `dir`.
fn as_nobody(dir: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), format!("--groups={}", groups()), "--".into()]).arg(program);
    c.env("HOME", dir.join("home")).env("XDG_CACHE_HOME", dir.join("home/.cache")).env("XDG_CONFIG_HOME", dir.join("home/.config"));
    c
}

fn chown_nobody(p: &Path) {
    nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(NOBODY)), Some(nix::unistd::Gid::from_raw(NOBODY))).unwrap();
}

/// A child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a ferryd's stderr until it is ready (the rest goes to `log`); where it serves
/// peers, if it does.
fn ferryd_ready(child: &mut Child, log: PathBuf) -> Option<String> {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut out = std::fs::File::create(&log).unwrap();
    let mut peer = None;
    for line in lines.by_ref().map_while(Result::ok) {
        writeln!(out, "{line}").unwrap();
        if let Some(a) = line.split("peers open streams on ").nth(1) {
            peer = Some(a.trim().to_string());
        }
        if line.contains("ferryd ready") {
            std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| drop(writeln!(out, "{l}"))));
            return peer;
        }
    }
    panic!("ferryd exited before it was ready:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
}

/// The two "hosts": their libvirtd, their ferryd, the guest's name and image.
struct Hosts {
    dir: tempfile::TempDir,
    streams: PathBuf,
    src_uri: String,
    dst_uri: String,
    src_ferryd: Proc,
    dst_ferryd: Option<Proc>,
    peer: String,
    _libvirtd: Vec<Proc>,
    domain: String,
    image: Vec<u8>,
    ferryctl: PathBuf,
}

/// A session-mode libvirtd as user nobody with its own runtime directory under `d/NAME`
/// and host UUID (in the mount namespace of process `in_ns`, if given); its URI.
fn libvirtd(d: &Path, name: &str, uuid: &str, in_ns: Option<u32>) -> (Proc, String) {
    let h = d.join(name);
    for sub in ["run", "config/libvirt", "cache", "home"] {
        std::fs::create_dir_all(h.join(sub)).unwrap();
    }
    std::fs::write(h.join("config/libvirt/libvirtd.conf"), format!("host_uuid = \"{uuid}\"\n")).unwrap();
    Command::new("chown").args(["-R", &format!("{NOBODY}:{NOBODY}")]).arg(&h).status().unwrap();
    std::fs::set_permissions(h.join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut c = match in_ns {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["--target", &pid.to_string(), "--mount", "--"]);
            c.arg("setpriv").args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                format!("--groups={}", groups()),
                "--".into(),
            ]);
            c.arg("libvirtd");
            c
        }
        None => as_nobody(d, "libvirtd"),
    };
    c.env("HOME", h.join("home")).env("XDG_RUNTIME_DIR", h.join("run")).env("XDG_CONFIG_HOME", h.join("config"));
    c.env("XDG_CACHE_HOME", h.join("cache"));
    let log = std::fs::File::create(d.join(format!("{name}-libvirtd.log"))).unwrap();
    let p = Proc(c.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap());
    let uri = format!("qemu+unix:///session?socket={}", h.join("run/libvirt/libvirt-sock").display());
    (p, uri)
}

impl Hosts {
    fn start() -> Hosts {
        let dir = tempfile::Builder::new().prefix("ferry-libvirt-").tempdir_in("/tmp").unwrap();
        let d = dir.path().to_path_buf();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["home", "home/.cache", "home/.config", "dumps", "dst-streams"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            chown_nobody(&d.join(sub));
        }
        // The source's stream directory is ferryd's (root's); the destination's, where
        // its QEMU listens, the VMM user's.
        let streams = d.join("streams");
        std::fs::create_dir_all(&streams).unwrap();
        // ferryctl where nobody may run it.
        let ferryctl = d.join("ferryctl");
        std::fs::copy(hostile::bin("ferryctl"), &ferryctl).unwrap();
        let key = hostile::keyfile(&d);
        let plan = |name: &str, peer: bool| {
            let mut p = hostile::plan();
            p.daemon.stream_dirs = vec![streams.clone()];
            p.daemon.stream_mode = "0660".into();
            p.daemon.stream_group = Some(NOBODY.to_string());
            p.daemon.peer = peer.then(|| "127.0.0.1:0".into());
            let path = d.join(format!("{name}-plan.json"));
            std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
            path
        };
        let ferryd_args = |name: &str, peer: bool| -> Vec<String> {
            vec![
                hostile::ferryd_bin().display().to_string(),
                "--plan".into(),
                plan(name, peer).display().to_string(),
                "--key".into(),
                key.display().to_string(),
                "--control".into(),
                d.join(format!("{name}.sock")).display().to_string(),
                "--control-mode".into(),
                "0660".into(),
                "--control-group".into(),
                NOBODY.to_string(),
                "--metrics".into(),
                "off".into(),
            ]
        };
        let spawn = |mut c: Command| c.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut src = Command::new(&ferryd_args("src", false)[0]);
        src.args(&ferryd_args("src", false)[1..]);
        let mut src_ferryd = Proc(spawn(src));
        ferryd_ready(&mut src_ferryd.0, d.join("src-ferryd.log"));
        // The destination in a mount namespace where the stream directory is another one.
        let mut dst = Command::new("unshare");
        dst.args(["--mount", "--propagation", "private", "sh", "-c", "mount --bind \"$0\" \"$1\" && shift && exec \"$@\""])
            .arg(d.join("dst-streams"))
            .arg(&streams)
            .args(ferryd_args("dst", true));
        let mut dst_ferryd = Proc(spawn(dst));
        let peer = ferryd_ready(&mut dst_ferryd.0, d.join("dst-ferryd.log")).expect("the destination ferryd serves peers");
        let ns = dst_ferryd.0.id();
        let (src_lv, src_uri) = libvirtd(&d, "src", "00000000-0000-4000-8000-0000000000aa", None);
        let (dst_lv, dst_uri) = libvirtd(&d, "dst", "00000000-0000-4000-8000-0000000000bb", Some(ns));
        let mut image = vec![0u8; IMAGE_BYTES];
        control::guest::fill_image(&mut image, 20261202);
        let h = Hosts {
            domain: format!("ferry-lv-{}", std::process::id()),
            dir,
            streams,
            src_uri,
            dst_uri,
            src_ferryd,
            dst_ferryd: Some(dst_ferryd),
            peer,
            _libvirtd: vec![src_lv, dst_lv],
            image,
            ferryctl,
        };
        for uri in [&h.src_uri, &h.dst_uri] {
            let t = Instant::now();
            while !h.virsh(uri, &["version"]).status.success() {
                assert!(t.elapsed() < Duration::from_secs(30), "libvirtd at {uri} did not start:\n{}", h.logs());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        h
    }

    fn d(&self) -> &Path {
        self.dir.path()
    }

    fn virsh(&self, uri: &str, args: &[&str]) -> std::process::Output {
        as_nobody(self.d(), "virsh").arg("-c").arg(uri).args(args).output().unwrap()
    }

    fn virsh_ok(&self, uri: &str, args: &[&str]) -> String {
        let o = self.virsh(uri, args);
        assert!(o.status.success(), "virsh {args:?}: {}\n{}", String::from_utf8_lossy(&o.stderr), self.logs());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Every log, the last lines of each, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = std::fs::read_dir(self.d())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        names.sort();
        for p in names {
            let s = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            out += &format!("--- {} ---\n{}\n", p.display(), lines[lines.len().saturating_sub(15)..].join("\n"));
        }
        out
    }

    /// Starts the guest at the source with the image in its RAM, then puts other bytes
    /// in the image file: the destination QEMU's loader reads those, so only the
    /// migration can give it the image.
    fn create_guest(&self) {
        let img = self.d().join("image.bin");
        std::fs::write(&img, &self.image).unwrap();
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
        let xml = format!(
            "<domain type='{}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
               <name>{}</name><memory unit='MiB'>{RAM_MIB}</memory><vcpu>1</vcpu>
               <os><type arch='x86_64' machine='pc'>hvm</type></os>
               <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
               <qemu:commandline><qemu:arg value='-device'/><qemu:arg value='loader,file={},addr={IMAGE_AT:#x},force-raw=on'/></qemu:commandline>
             </domain>",
            if kvm() { "kvm" } else { "qemu" },
            self.domain,
            img.display()
        );
        let x = self.d().join("domain.xml");
        std::fs::write(&x, xml).unwrap();
        self.virsh_ok(&self.src_uri, &["create", x.to_str().unwrap()]);
        assert_eq!(self.state(&self.src_uri), "running");
        std::fs::write(&img, vec![0x5au8; IMAGE_BYTES]).unwrap();
    }

    fn state(&self, uri: &str) -> String {
        self.virsh(uri, &["domstate", &self.domain]).stdout.iter().map(|&b| b as char).collect::<String>().trim().to_string()
    }

    /// The guest's image region at the destination equals the image the source loaded.
    fn check_ram_at_destination(&self, tag: &str) {
        let dump = self.d().join("dumps").join(format!("{tag}.bin"));
        let cmd =
            serde_json::json!({"execute": "pmemsave", "arguments": {"val": IMAGE_AT, "size": IMAGE_BYTES, "filename": dump}}).to_string();
        self.virsh_ok(&self.dst_uri, &["qemu-monitor-command", &self.domain, &cmd]);
        let got = std::fs::read(&dump).unwrap();
        let differ = got.chunks(4096).zip(self.image.chunks(4096)).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{tag}: {differ} pages of the guest's image differ at the destination");
        std::fs::remove_file(&dump).unwrap();
    }

    fn destroy_at(&self, uri: &str) {
        let _ = self.virsh(uri, &["destroy", &self.domain]);
    }

    /// `ferryctl migrate` as nobody, its JSON and whether it succeeded.
    fn ferryctl_migrate(&self, extra: &[&str], virsh_options: &[&str]) -> Child {
        let mut c = as_nobody(self.d(), &self.ferryctl);
        c.args(["migrate", &self.domain, &self.dst_uri, "-c", &self.src_uri, "--to", &self.peer, "--json", "--ferryd"])
            .arg(self.d().join("src.sock"))
            .args(extra)
            .arg("--")
            .args(virsh_options)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.d().join("ferryctl-migrate.log")).unwrap());
        c.spawn().unwrap()
    }

    /// CPU seconds the two ferryd have used so far.
    fn ferryd_cpu(&self) -> f64 {
        [Some(&self.src_ferryd), self.dst_ferryd.as_ref()].into_iter().flatten().map(|p| control::demo::process_cpu_seconds(p.0.id())).sum()
    }

    /// Samples both QEMUs' CPU while `f` runs a migration: the source's use during it,
    /// plus all the destination's (it starts for the migration). The source QEMU exits
    /// at the end, so its last sample (every 20 ms) stands for it.
    fn qemu_cpu_during<T>(&self, f: impl FnOnce() -> T) -> (T, f64) {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (dom, src, dst) = (format!("guest={},", self.domain), self.d().join("src"), self.d().join("dst"));
        std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let (mut first, mut last, mut dst_last) = (None, 0.0, 0.0);
                loop {
                    let done = stop.load(std::sync::atomic::Ordering::Acquire);
                    for (pid, cmd) in qemus(&dom) {
                        if cmd.contains(src.to_str().unwrap()) {
                            last = control::demo::process_cpu_seconds(pid);
                            first.get_or_insert(last);
                        } else if cmd.contains(dst.to_str().unwrap()) {
                            dst_last = control::demo::process_cpu_seconds(pid);
                        }
                    }
                    if done {
                        return last - first.unwrap_or(last) + dst_last;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            // The first sample before the migration starts.
            std::thread::sleep(Duration::from_millis(50));
            let r = f();
            stop.store(true, std::sync::atomic::Ordering::Release);
            (r, sampler.join().unwrap())
        })
    }
}

/// The running processes whose command line holds `needle` (the guest's QEMUs), with it.
fn qemus(needle: &str) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).replace('\0', " ");
            cmd.contains(needle).then_some((pid, cmd))
        })
        .collect()
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for uri in [self.src_uri.clone(), self.dst_uri.clone()] {
            self.destroy_at(&uri);
        }
        // A QEMU a failed test left behind.
        let _ = Command::new("pkill").args(["-f", &format!("guest={},", self.domain)]).status();
    }
}

/// libvirt's figures for the last migration, at the destination.
fn jobinfo(h: &Hosts) -> std::collections::BTreeMap<String, String> {
    control::streams::parse_jobinfo(&h.virsh_ok(&h.dst_uri, &["domjobinfo", &h.domain, "--completed"]))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A finished `ferryctl migrate`: its JSON report.
fn migrated(h: &Hosts, child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(h.d().join("ferryctl-migrate.log")).unwrap_or_default();
    assert!(out.status.success(), "ferryctl migrate failed:\n{log}\n{}", h.logs());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn libvirt_migrates_through_ferry() {
    if let Some(why) = missing() {
        // CI installs libvirt and runs as root: there, a missing piece is a failure.
        assert!(std::env::var_os("CI").is_none(), "CI is set but the libvirt test cannot run: {why}");
        hw::report_skip(&why);
        return;
    }
    let mut h = Hosts::start();

    // libvirt on its own, for its figures: TCP, 4 multifd channels.
    h.create_guest();
    let port = free_port();
    let direct_args = [
        "migrate",
        "--live",
        &h.domain,
        &h.dst_uri,
        "--migrateuri",
        &format!("tcp://127.0.0.2:{port}"),
        "--listen-address",
        "127.0.0.2",
        "--parallel",
        "--parallel-connections",
        "4",
    ]
    .map(String::from);
    let t = Instant::now();
    let ((), direct_qemu_cpu) =
        h.qemu_cpu_during(|| drop(h.virsh_ok(&h.src_uri, &direct_args.iter().map(String::as_str).collect::<Vec<_>>())));
    let direct_s = t.elapsed().as_secs_f64();
    let direct = jobinfo(&h);
    assert_eq!(h.state(&h.dst_uri), "running");
    h.check_ram_at_destination("direct");
    h.destroy_at(&h.dst_uri);

    // Through ferry over TCP, 4 multifd channels: QEMU's five connections are five
    // channels, and the destination QEMU listens on 127.0.0.2 at the same port.
    h.create_guest();
    let port = free_port();
    let cpu = h.ferryd_cpu();
    let (listen, forward) = (format!("tcp:127.0.0.1:{port}"), format!("tcp:127.0.0.2:{port}"));
    let (m, tcp_qemu_cpu) = h.qemu_cpu_during(|| {
        migrated(&h, h.ferryctl_migrate(&["--listen", &listen, "--forward", &forward], &["--parallel", "--parallel-connections", "4"]))
    });
    let tcp_cpu = h.ferryd_cpu() - cpu;
    assert_eq!(h.state(&h.dst_uri), "running", "{m}");
    assert_eq!(h.state(&h.src_uri), "", "the source domain is gone after a migration");
    h.check_ram_at_destination("tcp");
    let f = &m["ferry"];
    assert_eq!(f["source"]["channels"].as_array().unwrap().len(), 5, "{m}");
    assert_eq!(f["destination"]["received_bytes"], f["source"]["sent_bytes"], "{m}");
    // QEMU sends the image's pages that are not zero, at least.
    let image_pages = h.image.chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).count() as u64;
    assert!(f["source"]["sent_bytes"].as_u64().unwrap() > image_pages * 4096, "{m}");
    assert!(m["libvirt"]["Total downtime"].as_str().is_some(), "{m}");
    h.destroy_at(&h.dst_uri);

    // Through ferry over the default UNIX path: the same path on both "hosts", each its
    // own socket; QEMU runs as nobody and reaches the source's endpoint through its group.
    h.create_guest();
    let cpu = h.ferryd_cpu();
    let (m2, unix_qemu_cpu) = h.qemu_cpu_during(|| migrated(&h, h.ferryctl_migrate(&[], &[])));
    let unix_cpu = h.ferryd_cpu() - cpu;
    assert_eq!(h.state(&h.dst_uri), "running", "{m2}");
    h.check_ram_at_destination("unix");
    assert_eq!(m2["ferry"]["source"]["channels"].as_array().unwrap().len(), 1, "{m2}");
    let id = m2["ferry"]["name"].as_str().unwrap();
    assert!(id.starts_with(&h.domain), "{m2}");
    let log = std::fs::read_to_string(h.d().join("ferryctl-migrate.log")).unwrap();
    assert!(log.contains(&format!("unix:{}", h.streams.join(format!("{id}.sock")).display())), "{log}");
    h.destroy_at(&h.dst_uri);

    let pick = |m: &Value, k: &str| m["libvirt"][k].as_str().unwrap_or("?").to_string();
    eprintln!(
        "libvirt direct (tcp, parallel 4): virsh {direct_s:.2} s, time elapsed {}, downtime {}, data processed {}, QEMU CPU {direct_qemu_cpu:.2} s",
        direct.get("Time elapsed").map_or("?", String::as_str),
        direct.get("Total downtime").map_or("?", String::as_str),
        direct.get("Data processed").map_or("?", String::as_str)
    );
    for (what, m, cpu, qemu_cpu) in [("tcp, parallel 4", &m, tcp_cpu, tcp_qemu_cpu), ("unix", &m2, unix_cpu, unix_qemu_cpu)] {
        eprintln!(
            "libvirt through ferry ({what}): virsh {:.2} s, time elapsed {}, downtime {}, data processed {}, {} stream bytes, QEMU CPU {qemu_cpu:.2} s, ferryd CPU {cpu:.2} s",
            m["virsh_seconds"].as_f64().unwrap_or(0.0),
            pick(m, "Time elapsed"),
            pick(m, "Total downtime"),
            pick(m, "Data processed"),
            m["ferry"]["source"]["sent_bytes"]
        );
    }

    a_cut_migration_fails_and_the_source_keeps_running(&mut h);
}

/// A migration cut in the middle: slowed to 8 MiB/s, the destination ferryd killed once
/// part of the guest has gone. virsh fails, and so does ferryctl; the source guest keeps
/// running.
fn a_cut_migration_fails_and_the_source_keeps_running(h: &mut Hosts) {
    h.create_guest();
    let child = h.ferryctl_migrate(&[], &["--bandwidth", "8"]);
    let t = Instant::now();
    loop {
        let info = control::streams::parse_jobinfo(&String::from_utf8_lossy(&h.virsh(&h.src_uri, &["domjobinfo", &h.domain]).stdout));
        let processed = info.get("Data processed").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0);
        if processed > 0.0 && info.get("Data processed").is_some_and(|v| v.contains("MiB")) && processed > 8.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the migration did not get going:\n{}", h.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(h.dst_ferryd.take());
    let out = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(h.d().join("ferryctl-migrate.log")).unwrap_or_default();
    assert!(!out.status.success(), "a cut migration fails:\n{log}");
    assert!(log.contains("virsh migrate failed"), "{log}");
    assert_eq!(h.state(&h.src_uri), "running", "the source guest keeps running after the cut\n{log}");
}
