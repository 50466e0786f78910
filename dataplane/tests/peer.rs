//! Stream mode opened from the source host (`stream_open`): the source ferryd asks the
//! destination ferryd over its peer port to forward to the destination VMM, then listens
//! for the source VMM. Two ferryd processes on loopback, each with its own stream
//! directory, stand for two hosts; UNIX sockets stand for the two QEMUs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Ferryd, ferryd_plan};
use serde_json::{Value, json};

/// A "host": a directory with a stream directory in it, and its ferryd (serving peers
/// when `peer`), with `idle_s` for its endpoints and group-readable stream sockets.
fn host(dir: &Path, name: &str, peer: bool, idle_s: u64) -> (Ferryd, PathBuf) {
    let streams = dir.join("streams");
    std::fs::create_dir_all(&streams).unwrap();
    let mut plan = ferryd_plan();
    plan.daemon.stream_dirs = vec![streams.clone()];
    plan.daemon.stream_mode = "0660".into();
    plan.daemon.stream_idle_s = idle_s;
    if peer {
        plan.daemon.peer = Some("127.0.0.1:0".into());
    }
    std::fs::write(dir.join("plan.json"), serde_json::to_string(&plan).unwrap()).unwrap();
    let d = Ferryd::start(dir, name);
    assert_eq!(d.peer.is_some(), peer, "ferryd {name} says where it serves peers");
    (d, streams)
}

/// Sends `req` to the ferryd at `socket`: the connection (ferryd watches it) and its
/// replies.
fn request(socket: &Path, req: Value) -> (UnixStream, BufReader<UnixStream>) {
    let c = UnixStream::connect(socket).unwrap();
    writeln!(&c, "{req}").unwrap();
    let r = BufReader::new(c.try_clone().unwrap());
    (c, r)
}

/// Replies up to the first that is not an `opened` event.
fn next_reply(r: &mut BufReader<UnixStream>) -> Value {
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "ferryd closed the connection without a reply");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["event"] != "opened" {
            return v;
        }
    }
}

fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `stream_open` to the source ferryd: the destination ferryd forwards to the
/// destination VMM's socket in its stream directory, the source listens at the default
/// path (its stream directory, the migration's name) with the configured mode; a stream
/// one way and an answer the other arrive whole; the reply holds both sides' reports.
#[test]
fn a_stream_opened_from_the_source_reaches_the_destination_vmm() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, src_streams) = host(a.path(), "src", false, 300);
    let (dst, dst_streams) = host(b.path(), "dst", true, 300);
    let vmm_in = UnixListener::bind(dst_streams.join("vm1.sock")).unwrap();
    // The request's id and the migration's name are two things.
    let req = json!({"cmd": "stream_open", "to": dst.peer, "name": "vm1-test", "id": "req-1",
                     "forward": format!("unix:{}", dst_streams.join("vm1.sock").display())});
    let (_c, mut r) = request(&src.socket, req);
    let listening = next_reply(&mut r);
    let endpoint = src_streams.join("vm1-test.sock");
    assert_eq!((listening["event"].as_str(), listening["id"].as_str()), (Some("listening"), Some("req-1")), "{listening}");
    assert_eq!(listening["endpoints"][0], format!("unix:{}", endpoint.display()));
    assert_eq!(std::fs::metadata(&endpoint).unwrap().permissions().mode() & 0o777, 0o660, "[daemon] stream_mode");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut out = UnixStream::connect(&endpoint).unwrap();
    let writer = {
        let (mut w, data) = (out.try_clone().unwrap(), data.clone());
        std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let (mut inn, _) = vmm_in.accept().unwrap();
    let mut got = Vec::new();
    inn.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == data, "the stream arrives whole ({} of {} bytes)", got.len(), data.len());
    inn.write_all(b"loaded").unwrap();
    drop(inn);
    let mut back = Vec::new();
    out.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"loaded");
    let done = next_reply(&mut r);
    assert_eq!(done["ok"], true, "{done}\n{}\n{}", log_of(a.path(), "src"), log_of(b.path(), "dst"));
    assert_eq!((done["name"].as_str(), done["id"].as_str()), (Some("vm1-test"), Some("req-1")), "{done}");
    assert_eq!(done["report"]["sent_bytes"], data.len() as u64);
    assert_eq!(done["destination"]["role"], "destination");
    assert_eq!(done["destination"]["received_bytes"], data.len() as u64);
    assert_eq!(done["destination"]["sent_bytes"], 6);
    assert!(!endpoint.exists(), "the endpoint is gone with its stream");
    assert!(log_of(b.path(), "dst").contains("stream vm1-test: opened by 127.0.0.1"), "{}", log_of(b.path(), "dst"));
}

/// What a peer may ask is bounded: a forward outside the destination's stream
/// directories and a source with another key are refused with the reason, the source's
/// endpoint is gone again, and the destination keeps serving (garbage on its peer port
/// included); a good request afterwards is opened.
#[test]
fn peers_are_held_to_the_stream_dirs_and_the_key() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, src_streams) = host(a.path(), "src", false, 300);
    let (dst, dst_streams) = host(b.path(), "dst", true, 300);
    let outside = b.path().join("elsewhere.sock");
    let _victim = UnixListener::bind(&outside).unwrap();
    let (_c, mut r) = request(
        &src.socket,
        json!({"cmd": "stream_open", "to": dst.peer, "name": "bad", "forward": format!("unix:{}", outside.display())}),
    );
    let v = next_reply(&mut r);
    assert_eq!(v["ok"], false, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("did not open its side") && e.contains("not in a stream directory"), "{e}");
    assert!(!src_streams.join("bad.sock").exists(), "the refused stream's endpoint is removed");
    for bad in ["tcp:10.9.8.7:22", "unix:/var/run/../run/x.sock"] {
        let (_c, mut r) = request(&src.socket, json!({"cmd": "stream_open", "to": dst.peer, "forward": bad}));
        let v = next_reply(&mut r);
        assert_eq!(v["ok"], false, "{bad}: {v}");
    }
    // A stranger's bytes on the peer port.
    let mut probe = std::net::TcpStream::connect(dst.peer.as_deref().unwrap()).unwrap();
    probe.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    drop(probe);
    // Another key.
    std::fs::write(c.path().join("key"), "ff".repeat(32) + "\n").unwrap();
    std::fs::set_permissions(c.path().join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (other, _) = host(c.path(), "other", false, 300);
    let fwd = format!("unix:{}", dst_streams.join("x.sock").display());
    let (_c, mut r) = request(&other.socket, json!({"cmd": "stream_open", "to": dst.peer, "forward": fwd}));
    let v = next_reply(&mut r);
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("authentication"), "{v}");
    // The destination still opens streams for the real source.
    let (_c, mut r) = request(&src.socket, json!({"cmd": "stream_open", "to": dst.peer, "name": "good", "forward": fwd}));
    let v = next_reply(&mut r);
    assert_eq!(v["event"], "listening", "{v}\n{}", log_of(b.path(), "dst"));
}

/// An endpoint nobody uses closes: when its client goes away before the VMM connects
/// (the source's endpoint goes, and the destination's side ends with it), and after the
/// idle time when nothing comes.
#[test]
fn an_endpoint_nobody_uses_closes() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, src_streams) = host(a.path(), "src", false, 2);
    let (dst, dst_streams) = host(b.path(), "dst", true, 300);
    let fwd = format!("unix:{}", dst_streams.join("vm.sock").display());
    // The client goes away.
    let (c, mut r) = request(&src.socket, json!({"cmd": "stream_open", "to": dst.peer, "name": "left", "forward": fwd}));
    assert_eq!(next_reply(&mut r)["event"], "listening");
    assert!(src_streams.join("left.sock").exists());
    drop((c, r));
    wait_until("the endpoint is removed", || !src_streams.join("left.sock").exists());
    wait_until("the destination's side has ended", || log_of(b.path(), "dst").contains("stream left: the migration was cancelled"));
    // Nothing comes within the source's idle time (2 s).
    let t = Instant::now();
    let (_c, mut r) = request(&src.socket, json!({"cmd": "stream_open", "to": dst.peer, "name": "idle", "forward": fwd}));
    assert_eq!(next_reply(&mut r)["event"], "listening");
    let v = next_reply(&mut r);
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("idle time of 2 s"), "{v}");
    assert!(t.elapsed() >= Duration::from_secs(2));
    assert!(!src_streams.join("idle.sock").exists());
}

/// A stream directory that does not exist yet is made when a stream first needs it
/// (a ferryd that never carries a stream makes none): group-writable and setgid for the
/// stream group, so the VMM of that group can listen there.
#[test]
fn stream_directories_are_made_when_first_needed() {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let later = a.path().join("run/ferry/streams");
    let mut plan = ferryd_plan();
    plan.daemon.stream_dirs = vec![later.clone()];
    plan.daemon.stream_mode = "0660".into();
    // A group this user may give its own files, root or not.
    let gid = nix::unistd::getegid().as_raw();
    plan.daemon.stream_group = Some(gid.to_string());
    std::fs::write(a.path().join("plan.json"), serde_json::to_string(&plan).unwrap()).unwrap();
    let src = Ferryd::start(a.path(), "src");
    assert!(!later.exists(), "made only when needed");
    let (dst, dst_streams) = host(b.path(), "dst", true, 300);
    let fwd = format!("unix:{}", dst_streams.join("vm.sock").display());
    let (_c, mut r) = request(&src.socket, json!({"cmd": "stream_open", "to": dst.peer, "name": "mk", "forward": fwd}));
    let v = next_reply(&mut r);
    assert_eq!(v["event"], "listening", "{v}");
    let m = std::fs::metadata(&later).unwrap();
    assert_eq!((m.mode() & 0o7777, m.gid()), (0o2770, gid));
    let sock = std::fs::metadata(later.join("mk.sock")).unwrap();
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, gid));
}
