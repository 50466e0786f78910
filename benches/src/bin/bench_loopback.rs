//! ferry against iperf3 on loopback, interleaved in one run (iperf3, ferry, iperf3, ...),
//! printing one JSON line per measurement and a summary line with the medians and the
//! ratios. ferry runs as a user would run it: `ferryctl recv` and `ferryctl send --json`.
//!
//!     cargo build --release && target/release/bench_loopback [--size-mib 1024] [--reps 3]
//!         [--compress off|zstd:1|auto] [--transport auto|tcp|sockets]
//!
//! The source is the realistic guest-memory corpus (../shared/tools/peers/gen_corpus.py),
//! copied to /dev/shm with the destination, so no disk is measured on either side.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

struct Args {
    size_mib: u64,
    reps: usize,
    compress: String,
    transport: String,
}

fn args() -> Args {
    let mut a = Args { size_mib: 1024, reps: 3, compress: "off".into(), transport: "auto".into() };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--size-mib" => a.size_mib = val.parse().expect("--size-mib N"),
            "--reps" => a.reps = val.parse().expect("--reps N"),
            "--compression" => a.compress = val,
            "--transport" => a.transport = val,
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn ferryctl() -> PathBuf {
    let me = std::env::current_exe().expect("own path");
    let p = me.with_file_name("ferryctl");
    assert!(p.exists(), "{} not found: build it first (cargo build --release)", p.display());
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn corpus(size_mib: u64) -> PathBuf {
    let dir = PathBuf::from(std::env::var("BENCH_DATA").unwrap_or_else(|_| "/var/tmp/ferry-bench".into()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("corpus-{size_mib}.img"));
    if !src.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/peers/gen_corpus.py");
        let st = Command::new("python3")
            .arg(&script)
            .arg(&src)
            .args(["--size-mib", &size_mib.to_string()])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "gen_corpus.py failed");
    }
    let shm = PathBuf::from(format!("/dev/shm/ferry-bench-src-{size_mib}.img"));
    if !shm.exists() {
        std::fs::copy(&src, &shm).unwrap();
    }
    shm
}

/// iperf3 moving `bytes` (-n), so both peers run for a similar, short window: after a
/// long burst these shared machines run slower for a while.
fn iperf3(bytes: u64) -> Value {
    let port = free_port().to_string();
    let mut srv = Command::new("iperf3")
        .args(["-s", "-1", "--forceflush", "-B", "127.0.0.1", "-p", &port])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 installed");
    // The client starts once the server says it listens.
    let mut lines = BufReader::new(srv.stdout.take().unwrap()).lines();
    wait_for(&mut lines, "Server listening");
    std::thread::spawn(move || lines.for_each(drop));
    let o = Command::new("iperf3").args(["-c", "127.0.0.1", "-p", &port, "-n", &bytes.to_string(), "-J"]).output().unwrap();
    let _ = srv.wait();
    let j: Value = serde_json::from_slice(&o.stdout).expect("iperf3 -J output");
    assert!(j.get("error").is_none(), "iperf3 failed: {}", j["error"]);
    let bps = j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap();
    json!({"peer": "iperf3 -n single stream", "bytes": bytes, "gbps": bps / 8e9})
}

/// Blocks until a line containing `marker` arrives.
fn wait_for(lines: &mut impl Iterator<Item = std::io::Result<String>>, marker: &str) {
    for line in lines.by_ref() {
        if line.expect("reading a child's output").contains(marker) {
            return;
        }
    }
    panic!("{marker:?} never appeared");
}

fn ferry(src: &Path, compress: &str, transport: &str) -> Value {
    let bin = ferryctl();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let key = dir.path().join("k");
    assert!(Command::new(&bin).args(["keygen", "--out"]).arg(&key).status().unwrap().success());
    let out = dir.path().join("dst.img");
    let addr = format!("127.0.0.1:{}", free_port());
    // --embedded: a ferryd running on this machine must not change what is measured.
    let mut recv = Command::new(&bin)
        .args(["recv", "--embedded", "--json", "--listen", &addr, "--key"])
        .arg(&key)
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(recv.stderr.take().unwrap()).lines();
    wait_for(&mut err, "listening on");
    let err_rest = std::thread::spawn(move || err.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let send = Command::new(&bin)
        .args(["send", "--embedded", "--json", "--compression", compress, "--transport", transport, "--to", &addr, "--key"])
        .arg(&key)
        .arg("--file")
        .arg(src)
        .output()
        .unwrap();
    assert!(send.status.success(), "ferryctl send failed: {}", String::from_utf8_lossy(&send.stderr));
    let r = recv.wait_with_output().unwrap();
    assert!(r.status.success(), "ferryctl recv failed: {}", err_rest.join().unwrap());
    let s: Value = serde_json::from_slice(&send.stdout).unwrap();
    let rv: Value = serde_json::from_slice(&r.stdout).unwrap();
    let secs = s["seconds"].as_f64().unwrap();
    json!({
        "peer": "ferry",
        "gbps": s["gbps"],
        "wire_gbps": s["wire_bytes"].as_f64().unwrap() / secs / 1e9,
        "seconds": secs,
        "zero_pages": s["zero_pages"],
        "compressed_in_bytes": s["compressed_in_bytes"],
        "compressed_out_bytes": s["compressed_out_bytes"],
        "send_cpu_s_per_gib": s["cpu_seconds_per_gib"],
        "recv_cpu_s_per_gib": rv["cpu_seconds_per_gib"],
        "lanes": s["lanes"],
        "transport": s["transport"],
        "digest_match": s["digest_match"],
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(-1.0)
}

fn main() {
    let a = args();
    let src = corpus(a.size_mib);
    let (mut peer, mut ours, mut wire) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..a.reps {
        let p = iperf3(a.size_mib << 20);
        println!("{}", json!({"rep": rep, "load": loadavg(), "result": p}));
        peer.push(p["gbps"].as_f64().unwrap());
        let f = ferry(&src, &a.compress, &a.transport);
        println!("{}", json!({"rep": rep, "load": loadavg(), "compress": a.compress, "result": f}));
        ours.push(f["gbps"].as_f64().unwrap());
        wire.push(f["wire_gbps"].as_f64().unwrap());
    }
    let (p, o, w) = (median(peer), median(ours), median(wire));
    println!(
        "{}",
        json!({
            "summary": "loopback, medians",
            "size_mib": a.size_mib,
            "compress": a.compress,
            "transport": a.transport,
            "iperf3_gbps": p,
            "ferry_region_gbps": o,
            "ferry_wire_gbps": w,
            "ratio_region": o / p,
            "ratio_wire": w / p,
        })
    );
}
