//! `ferryctl send --transport rdma` on a real verbs stack: the Soft-RoCE (rdma_rxe) guest
//! from `../shared/tools/rxe-vm`. One guest runs ib_write_bw for the reference figure,
//! then ferry's failure cases (receiver killed, sender killed, a receiver without RDMA),
//! then transfers with several QPs per worker and multi-SGE work requests, checked by
//! digest and byte for byte. A second test joins two guests over a QEMU socket link.
//!
//! Skips (`SKIP: <reason>`) without QEMU or the guest image, except under CI or with
//! `FERRY_REQUIRE_RXE=1`, where that fails.

mod common;

use std::path::Path;

use common::section;

/// A guest-memory-like image: random pages with zero pages scattered singly and in runs,
/// and a short tail page.
fn image(path: &Path, pages: usize, tail: usize) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(pages * 4096 + tail);
    let mut zero_left = 0;
    for _ in 0..pages {
        if zero_left == 0 && next() % 100 < 30 {
            // Mostly single zero pages (gathered around), some long runs (skipped).
            zero_left = if next() % 4 == 0 { 1 + next() % 16 } else { 1 };
        }
        if zero_left > 0 {
            zero_left -= 1;
            out.extend_from_slice(&[0u8; 4096]);
        } else {
            for _ in 0..512 {
                out.extend_from_slice(&next().to_le_bytes());
            }
        }
    }
    out.extend((0..tail).map(|i| i as u8 | 1));
    std::fs::write(path, out).unwrap();
}

const HELPERS: &str = r#"#!/bin/sh
cd /payload
F=./ferryctl
export RUST_LOG=info
# waitfor FILE TEXT: until TEXT shows up in FILE (60 s at most)
waitfor() { i=0; while ! grep -q "$2" "$1" 2>/dev/null; do i=$((i+1)); [ $i -gt 600 ] && return 1; sleep 0.1; done; }
# listening PORT: until a TCP socket listens on PORT (60 s at most)
listening() {
  i=0; p=$(printf '%04X' $1)
  while ! grep -q ":$p [0-9A-F]*:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null; do i=$((i+1)); [ $i -gt 600 ] && return 1; sleep 0.1; done
}
section() { echo "=== $1-BEGIN"; cat "$2"; echo "=== $1-END uptime $(cut -d' ' -f1 /proc/uptime)"; }
# kill_demo_ferryd LOG TEXT: once TEXT shows up in the running demo's LOG (source.log or
# destination.log; 60 s at most), kills that side's ferryd (-9)
kill_demo_ferryd() {
  i=0; while ! grep -q "$2" /tmp/ferry-demo-*/"$1" 2>/dev/null; do i=$((i+1)); [ $i -gt 600 ] && break; sleep 0.1; done
  side=${1%.log}
  for p in /proc/[0-9]*; do grep -q "$side.sock" $p/cmdline 2>/dev/null && kill -9 ${p#/proc/}; done
}
"#;

/// ferryctl and the ferryd beside it, as cargo built them for the tests.
fn binaries() -> (&'static Path, std::path::PathBuf) {
    let ferryctl = Path::new(env!("CARGO_BIN_EXE_ferryctl"));
    let ferryd = ferryctl.with_file_name("ferryd");
    assert!(ferryd.exists(), "{} not built (cargo test --workspace builds it)", ferryd.display());
    (ferryctl, ferryd)
}

/// A demo's JSON report, the guest log's section `name` (and its `name-log` when it is not
/// JSON).
fn demo_report(log: &str, name: &str) -> serde_json::Value {
    let text = section(log, name);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} JSON: {e}\n{}\n{log}", section(log, &format!("{name}-log"))))
}

#[test]
fn rdma_transfers_and_failures_on_soft_roce() {
    if !common::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.img");
    let small = dir.path().join("small.img");
    image(&big, 8192, 0); // 32 MiB
    image(&small, 0, 100); // below the inline limit: one inline WR
    let script = HELPERS.to_string()
        + r#"
IP=$RXE_IP
$F keygen --out /tmp/k
printf '[rdma]\nqps_per_worker = 2\n' > /tmp/qp2.toml
printf '[dataplane]\ntransport = "tcp"\n' > /tmp/tcp.toml

# The reference: perftest's RDMA WRITE bandwidth on the same device, 128 KiB messages.
ib_write_bw -d rxe0 -i 1 -x $RXE_GID_INDEX -F -s 131072 -D 4 > /tmp/bw.srv 2>&1 &
# (its output is block-buffered into the file: wait for its listening socket, port 18515)
listening 18515
ib_write_bw -d rxe0 -i 1 -x $RXE_GID_INDEX -F -s 131072 -D 4 $IP > /tmp/bw.cli 2>&1
wait
section write_bw /tmp/bw.cli

# killed WHO PORT: a transfer on PORT whose WHO (recv or send) is killed once its QPs are
# connected, that is, in the data phase; /tmp/killed-WHO.log gets how the other side ended
# and what is left of the destination.
killed() {
  $F recv --listen $IP:$2 --out /tmp/killed$2 --key /tmp/k --embedded > /dev/null 2> /tmp/recv$2.log &
  R=$!
  waitfor /tmp/recv$2.log "listening on"
  $F send --to $IP:$2 --file big.img --key /tmp/k --transport rdma --embedded > /dev/null 2> /tmp/send$2.log &
  S=$!
  waitfor /tmp/$1$2.log "QP(s) connected"
  if [ $1 = recv ]; then victim=$R survivor=$S other=send; else victim=$S survivor=$R other=recv; fi
  kill -9 $victim
  wait $survivor; rc=$?
  { cat /tmp/$other$2.log; echo "survivor-rc=$rc"; } > /tmp/killed-$1.log
  [ -e /tmp/killed$2 ] && echo "DEST-COMPLETE" >> /tmp/killed-$1.log
  [ -e /tmp/killed$2.partial ] && echo "PARTIAL-LEFT" >> /tmp/killed-$1.log
  wait
}
# The receiver dies (its QPs are destroyed with it); a killed process cannot remove its
# partial file, but the destination is never complete.
killed recv 7001
section recv-killed /tmp/killed-recv.log
# The sender dies.
killed send 7002
section send-killed /tmp/killed-send.log

# The receiver's QP moves to the error state mid-transfer (the test hook does what a
# failing NIC or a destroyed QP does); the sender retries, then fails on the completion.
FERRY_TEST_RDMA_QP_ERROR_AFTER=20 $F recv --listen $IP:7007 --out /tmp/d7 --key /tmp/k --embedded > /dev/null 2> /tmp/r7.log &
R=$!
waitfor /tmp/r7.log "listening on"
$F send --to $IP:7007 --file big.img --key /tmp/k --transport rdma --embedded > /dev/null 2> /tmp/s7.log
echo "sender-rc=$?" >> /tmp/s7.log
wait $R; echo "receiver-rc=$?" >> /tmp/r7.log
ls /tmp/ | grep '^d7' | sed 's/^/LEFT-BEHIND /' >> /tmp/r7.log
section qp-error-send /tmp/s7.log
section qp-error-recv /tmp/r7.log

# A receiver whose plan has no RDMA: --transport rdma refuses, auto falls back to TCP.
$F recv --listen $IP:7003 --out /tmp/d3 --key /tmp/k --config /tmp/tcp.toml --embedded > /dev/null 2> /tmp/r3.log &
waitfor /tmp/r3.log "listening on"
$F send --to $IP:7003 --file small.img --key /tmp/k --transport rdma --embedded > /dev/null 2> /tmp/s3.log
echo "sender-rc=$?" >> /tmp/s3.log
wait
section no-rdma-forced /tmp/s3.log
$F recv --listen $IP:7004 --out /tmp/d4 --key /tmp/k --config /tmp/tcp.toml --embedded > /dev/null 2> /tmp/r4.log &
waitfor /tmp/r4.log "listening on"
$F send --to $IP:7004 --file small.img --key /tmp/k --json --embedded > /tmp/s4.json 2> /tmp/s4.log
echo "sender-rc=$?" >> /tmp/s4.log
wait
cmp small.img /tmp/d4 && echo CMP-OK >> /tmp/s4.log
section fallback /tmp/s4.json
section fallback-log /tmp/s4.log

# The retry: 2 workers x 2 QPs, multi-SGE gathers, checked byte for byte.
$F recv --listen $IP:7005 --out /tmp/d5 --key /tmp/k --json --embedded > /tmp/r5.json 2> /tmp/r5.log &
waitfor /tmp/r5.log "listening on"
$F send --to $IP:7005 --file big.img --key /tmp/k --transport rdma --config /tmp/qp2.toml --json --embedded > /tmp/s5.json 2> /tmp/s5.log
echo "sender-rc=$?" >> /tmp/s5.log
wait
cmp big.img /tmp/d5 && echo CMP-OK >> /tmp/s5.log
section send /tmp/s5.json
section send-log /tmp/s5.log
section recv /tmp/r5.json

# A region smaller than the inline limit.
$F recv --listen $IP:7006 --out /tmp/d6 --key /tmp/k --embedded > /dev/null 2> /tmp/r6.log &
waitfor /tmp/r6.log "listening on"
$F send --to $IP:7006 --file small.img --key /tmp/k --transport rdma --json --embedded > /tmp/s6.json 2> /tmp/s6.log
echo "sender-rc=$?" >> /tmp/s6.log
wait
cmp small.img /tmp/d6 && echo CMP-OK >> /tmp/s6.log
section small /tmp/s6.json
section small-log /tmp/s6.log

# An empty file: nothing to register; the session runs on TCP lanes.
: > /tmp/empty.img
$F recv --listen $IP:7008 --out /tmp/d8 --key /tmp/k --embedded > /dev/null 2> /tmp/r8.log &
waitfor /tmp/r8.log "listening on"
$F send --to $IP:7008 --file /tmp/empty.img --key /tmp/k --transport rdma --embedded > /dev/null 2> /tmp/s8.log
echo "sender-rc=$?" >> /tmp/s8.log
wait
cmp /tmp/empty.img /tmp/d8 && echo CMP-OK >> /tmp/s8.log
section empty /tmp/s8.log
exit 0
"#;
    let logs = common::boot(dir.path(), &script, &[Path::new(env!("CARGO_BIN_EXE_ferryctl")), &big, &small], false, 480);
    let log = &logs[0];

    let killed = section(log, "recv-killed");
    println!("receiver killed mid-transfer, the sender says:\n{killed}");
    assert!(!killed.contains("survivor-rc=0"), "the sender must fail when the receiver dies:\n{killed}");
    assert!(killed.contains("ferryctl: "), "no error message:\n{killed}");
    assert!(killed.contains("peer closed") || killed.contains("RDMA"), "unclear message:\n{killed}");
    assert!(!killed.contains("DEST-COMPLETE"), "the destination must never be complete:\n{killed}");

    let killed = section(log, "send-killed");
    println!("sender killed mid-transfer, the receiver says:\n{killed}");
    assert!(!killed.contains("survivor-rc=0"), "the receiver must fail when the sender dies:\n{killed}");
    assert!(killed.contains("peer closed"), "unclear message:\n{killed}");
    assert!(
        !killed.contains("DEST-COMPLETE") && !killed.contains("PARTIAL-LEFT"),
        "the destination and its partial file must be gone:\n{killed}"
    );

    let (qs, qr) = (section(log, "qp-error-send"), section(log, "qp-error-recv"));
    println!("receiver QP in the error state mid-transfer:\n-- sender:\n{qs}-- receiver:\n{qr}");
    assert!(!qs.contains("sender-rc=0") && !qr.contains("receiver-rc=0"), "both sides must fail:\n{qs}\n{qr}");
    assert!(qr.contains("completed with status"), "the receiver names the failed completion:\n{qr}");
    assert!(qs.contains("ferryctl: ") && (qs.contains("completed with status") || qs.contains("peer reported")), "{qs}");
    assert!(!qr.contains("LEFT-BEHIND"), "no destination left behind:\n{qr}");

    let forced = section(log, "no-rdma-forced");
    assert!(!forced.contains("sender-rc=0"), "--transport rdma to a receiver without RDMA must fail:\n{forced}");
    assert!(forced.contains("has no RDMA port"), "{forced}");

    let fb: serde_json::Value =
        serde_json::from_str(&section(log, "fallback")).unwrap_or_else(|e| panic!("fallback JSON: {e}\n{}", section(log, "fallback-log")));
    assert_eq!(fb["transport"], "tcp (io_uring)", "{fb}");
    assert!(section(log, "fallback-log").contains("CMP-OK"));

    let send_log = section(log, "send-log");
    let s: serde_json::Value = serde_json::from_str(&section(log, "send")).unwrap_or_else(|e| panic!("send JSON: {e}\n{send_log}\n{log}"));
    let r: serde_json::Value = serde_json::from_str(&section(log, "recv")).unwrap_or_else(|e| panic!("recv JSON: {e}\n{log}"));
    println!("RDMA send report: {s:#}");
    assert!(send_log.contains("sender-rc=0") && send_log.contains("CMP-OK"), "{send_log}");
    assert_eq!(s["transport"], "rdma");
    assert_eq!(r["transport"], "rdma");
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(s["bytes"], 8192 * 4096);
    let x = &s["rdma"];
    assert_eq!(x["qps"], 4, "2 workers x 2 QPs");
    assert!(x["max_sges_per_wr"].as_u64().unwrap() > 1, "scattered pages gathered into one WR: {x}");
    assert!(x["zero_fill_pages"].as_u64().unwrap() > 0, "{x}");
    assert!(s["zero_pages"].as_u64().unwrap() > 0, "long zero runs are skipped: {s}");
    assert!(x["posts"].as_u64().unwrap() < x["work_requests"].as_u64().unwrap(), "several WRs per doorbell: {x}");
    assert_eq!(x["write_imms"], r["frames"], "every WRITE_WITH_IMM arrived");

    let small: serde_json::Value = serde_json::from_str(&section(log, "small")).unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert!(section(log, "small-log").contains("CMP-OK"));
    assert_eq!(small["rdma"]["inline_wrs"], 1, "{small}");
    let empty = section(log, "empty");
    assert!(empty.contains("sender-rc=0") && empty.contains("CMP-OK"), "an empty file goes through:\n{empty}");

    // ferry against ib_write_bw on the same device in the same guest.
    let bw = section(log, "write_bw");
    let line = bw.lines().rfind(|l| l.trim_start().starts_with("131072")).unwrap_or_else(|| panic!("no ib_write_bw result:\n{bw}"));
    let perftest_mbs: f64 = line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let (ferry_mbs, data_mbs) = (s["gbps"].as_f64().unwrap() * 1e3, x["data_gbps"].as_f64().unwrap() * 1e3);
    println!(
        "Soft-RoCE, same guest: ib_write_bw 128 KiB WRITEs {perftest_mbs:.2} MB/s; ferry ({} build) 32 MiB region over 4 QPs: data phase {data_mbs:.2} MB/s (ratio {:.2}), whole transfer with registration and digests {ferry_mbs:.2} MB/s",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        data_mbs / perftest_mbs
    );
}

#[test]
fn rdma_between_two_guests() {
    if !common::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    image(&img, 2048, 512); // 8 MiB and a half page
    let key = dir.path().join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    let script = HELPERS.to_string()
        + r#"
cp key /tmp/k; chmod 600 /tmp/k
if [ -z "$RXE_PEER" ]; then
  $F recv --listen $RXE_IP:7000 --out /tmp/d --key /tmp/k --json --embedded > /tmp/r.json 2> /tmp/r.log
  echo "receiver-rc=$?" >> /tmp/r.log
  cmp img /tmp/d && echo CMP-OK >> /tmp/r.log
  section recv /tmp/r.json
  section recv-log /tmp/r.log
else
  # The server guest may still be booting: retry the connection for a minute.
  n=0
  while :; do
    $F send --to $RXE_PEER:7000 --file img --key /tmp/k --transport rdma --json --embedded > /tmp/s.json 2> /tmp/s.log && break
    grep -q "connecting to" /tmp/s.log && [ $n -lt 60 ] || break
    n=$((n+1)); sleep 1
  done
  section send /tmp/s.json
  section send-log /tmp/s.log
fi
exit 0
"#;
    let logs = common::boot(dir.path(), &script, &[Path::new(env!("CARGO_BIN_EXE_ferryctl")), &img, &key], true, 480);
    let all = logs.join("\n-----\n");
    let recv = logs.iter().map(|l| section(l, "recv")).find(|s| !s.is_empty()).unwrap_or_else(|| panic!("no receiver report:\n{all}"));
    let send = logs.iter().map(|l| section(l, "send")).find(|s| !s.is_empty()).unwrap_or_else(|| panic!("no sender report:\n{all}"));
    let r: serde_json::Value = serde_json::from_str(&recv).unwrap_or_else(|e| panic!("recv JSON: {e}\n{all}"));
    let s: serde_json::Value = serde_json::from_str(&send).unwrap_or_else(|e| panic!("send JSON: {e}\n{all}"));
    assert!(all.contains("CMP-OK"), "the destination guest's copy differs:\n{all}");
    assert_eq!(s["transport"], "rdma");
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(r["bytes"], 2048 * 4096 + 512);
    println!(
        "two guests over a QEMU socket link: {:.2} MB/s, {} WRs, registration {:.3} GB/s",
        s["gbps"].as_f64().unwrap() * 1e3,
        s["rdma"]["work_requests"],
        s["rdma"]["registration_gbps"].as_f64().unwrap()
    );
}

/// Live migrations over RDMA: `ferryctl demo --transport rdma` in the Soft-RoCE guest, two
/// ferryd whose lanes are queue pairs on rxe0, a guest dirtying its memory between rounds;
/// the destination compared byte for byte. Then `--verify full` (one-sided writes checked
/// at the end: the paused source and what landed digested with the session's key), staged
/// for the demo's guest with holes and zero-copy for a preallocated one, and the same
/// migration over io_uring TCP on the same guest for the side-by-side figure.
#[test]
fn rdma_migration_on_soft_roce() {
    if !common::available() {
        return;
    }
    let (ferryctl, ferryd) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let script = HELPERS.to_string()
        + r#"
# The reference, as in the transfer test: perftest's RDMA WRITE bandwidth, 128 KiB messages.
ib_write_bw -d rxe0 -i 1 -x $RXE_GID_INDEX -F -s 131072 -D 4 > /tmp/bw.srv 2>&1 &
listening 18515
ib_write_bw -d rxe0 -i 1 -x $RXE_GID_INDEX -F -s 131072 -D 4 $RXE_IP > /tmp/bw.cli 2>&1
wait
section write_bw /tmp/bw.cli
migrate() {
  $F demo --size-mib 64 --dirty-rate-mbs 4 --transport $2 $3 --json > /tmp/$1.json 2> /tmp/$1.log
  echo "rc=$?" >> /tmp/$1.log
  section $1 /tmp/$1.json
  section $1-log /tmp/$1.log
}
migrate rdma rdma ""
migrate rdma-full rdma "--verify full"
migrate rdma-zc rdma "--verify full --prealloc"
migrate tcp tcp ""

# The destination's first QP moves to the error state mid-round (the test hook, which both
# ferryd inherit from the demo; only the receiving side acts on it).
FERRY_TEST_RDMA_QP_ERROR_AFTER=20 $F demo --size-mib 64 --dirty-rate-mbs 4 --transport rdma > /dev/null 2> /tmp/qperr.log
echo "rc=$?" >> /tmp/qperr.log
section qp-error /tmp/qperr.log

# The destination ferryd is killed mid-round, once its QPs are connected.
$F demo --size-mib 64 --dirty-rate-mbs 4 --transport rdma > /dev/null 2> /tmp/dk.log &
D=$!
kill_demo_ferryd destination.log "QP(s) connected"
wait $D
echo "rc=$?" >> /tmp/dk.log
section dest-killed /tmp/dk.log

# A retry after both failures succeeds.
migrate retry rdma ""

# Two migrations through one pair of ferryd: the second takes the staging the first
# registered.
$F demo --size-mib 16 --dirty-rate-mbs 4 --transport rdma --runs 2 --json > /tmp/runs.json 2> /tmp/runs.log
echo "rc=$?" >> /tmp/runs.log
section runs /tmp/runs.json
section runs-log /tmp/runs.log
exit 0
"#;
    let logs = common::boot(dir.path(), &script, &[ferryctl, &ferryd], false, 480);
    let log = &logs[0];
    let report = |name: &str| demo_report(log, name);
    let r = report("rdma");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["source"]["transport"], "rdma", "{r}");
    assert_eq!(r["destination"]["transport"], "rdma", "{r}");
    assert_eq!(r["source"]["digest"], r["destination"]["digest"]);
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "pre-copy rounds, then stop-and-copy: {r}");
    assert_eq!(rounds[0]["dirty_pages"], 64 * 256, "round 0 carries every page");
    assert!(r["zero_pages"].as_u64().unwrap() > 0, "round 0 skips zero pages: {r}");
    let x = &r["source"]["rdma"];
    assert!(x["write_imms"].as_u64().unwrap() > 0 && x["registered_bytes"].as_u64().unwrap() > 0, "{x}");
    let d = &r["destination"]["rdma"];
    assert!(d["verify_seconds"].as_f64().unwrap() > 0.0, "the destination hashed what landed: {d}");

    assert_eq!((x["check"].as_str(), d["check"].as_str()), (Some("each_round"), Some("each_round")), "{r}");
    assert_eq!(x["zero_copy"], false, "pages hashed as sent are staged: {x}");

    // verify full: the one-sided writes are checked at the end, by a digest of all of the
    // memory at both ends. The demo's guest has pages it never touched, so its pages are
    // staged.
    let full = report("rdma-full");
    assert_eq!(full["verified"], true, "{full}");
    assert_eq!(full["source"]["verify"], "full");
    assert_eq!(full["source"]["digest"], full["destination"]["digest"]);
    let (fx, fd) = (&full["source"]["rdma"], &full["destination"]["rdma"]);
    assert_eq!((fx["check"].as_str(), fd["check"].as_str()), (Some("at_end"), Some("at_end")), "{full}");
    assert!(fd["verify_last_round_seconds"].as_f64().unwrap() > 0.0, "the destination digested what landed: {fd}");
    assert_eq!(fx["zero_copy"], false, "{fx}");
    assert!(fx["staging_reason"].as_str().unwrap_or("").contains("never allocated"), "why the pages were staged: {fx}");
    // A preallocated guest is registered, and the NIC gathers in place.
    let zc = report("rdma-zc");
    assert_eq!(zc["verified"], true, "{zc}");
    let zx = &zc["source"]["rdma"];
    assert_eq!(zx["zero_copy"], true, "{zx}");
    assert!(zx["registered_bytes"].as_u64().unwrap() >= 64 << 20, "the guest memory is registered: {zx}");

    let t = report("tcp");
    assert_eq!(t["verified"], true, "{t}");

    let qp = section(log, "qp-error");
    println!("the destination's QP in the error state mid-round, the source VMM hears:\n{qp}");
    assert!(!qp.contains("rc=0") && qp.contains("ferryctl: "), "the migration must fail:\n{qp}");
    assert!(qp.contains("completed with status"), "the failed completion is named:\n{qp}");
    let dk = section(log, "dest-killed");
    println!("the destination ferryd killed mid-round, the source VMM hears:\n{dk}");
    assert!(!dk.contains("rc=0") && dk.contains("ferryctl: "), "the migration must fail:\n{dk}");
    assert!(dk.contains("peer closed") || dk.contains("completed with status"), "unclear message:\n{dk}");
    assert_eq!(report("retry")["verified"], true);
    let runs: Vec<serde_json::Value> = section(log, "runs")
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("runs JSON: {e}\n{l}\n{}", section(log, "runs-log"))))
        .collect();
    assert_eq!(runs.len(), 2, "{}", section(log, "runs-log"));
    let (first, second) = (&runs[0]["source"]["rdma"], &runs[1]["source"]["rdma"]);
    assert!(runs.iter().all(|r| r["verified"] == true), "{runs:?}");
    assert!(first["registered_bytes"].as_u64().unwrap() > 0 && first["reused_staging_bytes"] == 0, "{first}");
    assert_eq!(second["registered_bytes"], 0, "the second migration registers no staging: {second}");
    assert_eq!(second["reused_staging_bytes"], first["registered_bytes"], "{second}");

    let bw = section(log, "write_bw");
    let line = bw.lines().rfind(|l| l.trim_start().starts_with("131072")).unwrap_or_else(|| panic!("no ib_write_bw result:\n{bw}"));
    let perftest_mbs: f64 = line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let data_mbs = x["data_gbps"].as_f64().unwrap() * 1e3;
    // Round 0, the bulk: its bytes on the wire over its data phase.
    let round0 = |r: &serde_json::Value| {
        let r0 = &r["rounds"][0];
        r0["wire_bytes"].as_f64().unwrap() / 1e6 / r0["data_seconds"].as_f64().unwrap()
    };
    println!(
        "Soft-RoCE guest, 64 MiB guest dirtying 4 MB/s, {} build: ib_write_bw {perftest_mbs:.2} MB/s. Round 0 on the wire: verify sent {:.2} MB/s ({:.2}x), full {:.2} MB/s ({:.2}x), full zero-copy {:.2} MB/s ({:.2}x); full zero-copy, all rounds {:.2} MB/s, downtime {:.0} ms (destination digest {:.0} ms)",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        round0(&r),
        round0(&r) / perftest_mbs,
        round0(&full),
        round0(&full) / perftest_mbs,
        round0(&zc),
        round0(&zc) / perftest_mbs,
        zx["data_gbps"].as_f64().unwrap() * 1e3,
        zc["ferry_downtime_ms"].as_f64().unwrap(),
        zc["destination"]["rdma"]["verify_last_round_seconds"].as_f64().unwrap() * 1e3,
    );
    println!(
        "verify sent: RDMA migration data phase {data_mbs:.2} MB/s (ratio {:.2}), whole {:.3} GB/s, {} rounds, ferry downtime {:.1} ms (destination verify {:.1} ms), {:.2} CPU s/GiB; io_uring TCP {:.3} GB/s, {} rounds, ferry downtime {:.1} ms, {:.2} CPU s/GiB (RDMA/TCP {:.2}x)",
        data_mbs / perftest_mbs,
        r["gbps"].as_f64().unwrap(),
        rounds.len(),
        r["ferry_downtime_ms"].as_f64().unwrap(),
        d["verify_last_round_seconds"].as_f64().unwrap() * 1e3,
        r["cpu_seconds_per_gib"].as_f64().unwrap(),
        t["gbps"].as_f64().unwrap(),
        t["rounds"].as_array().unwrap().len(),
        t["ferry_downtime_ms"].as_f64().unwrap(),
        t["cpu_seconds_per_gib"].as_f64().unwrap(),
        r["gbps"].as_f64().unwrap() / t["gbps"].as_f64().unwrap()
    );
}

/// Post-copy after RDMA rounds in the Soft-RoCE guest: `ferryctl demo --transport rdma
/// --postcopy --prealloc`, a guest dirtying all of its memory (it never converges), switched
/// over after two rounds; the destination reads each faulting page from the source's
/// registered memory with an RDMA READ, and every page is checked at the end. Beside it in
/// the same guest: ib_read_lat on the same device (the floor for a fault served by one
/// READ), the same migration with faults on the TCP fault lane (a source descriptor that
/// cannot be registered on this kernel), and the READ QP moved to the error state
/// mid-post-copy, which the next attempt recovers from.
#[test]
fn rdma_postcopy_on_soft_roce() {
    if !common::available() {
        return;
    }
    let (ferryctl, ferryd) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let script = HELPERS.to_string()
        + r#"
# The reference: one 4 KiB RDMA READ's latency on the same device.
ib_read_lat -d rxe0 -i 1 -x $RXE_GID_INDEX -F -s 4096 -n 1000 > /tmp/lat.srv 2>&1 &
listening 18515
ib_read_lat -d rxe0 -i 1 -x $RXE_GID_INDEX -F -s 4096 -n 1000 $RXE_IP > /tmp/lat.cli 2>&1
wait
section read_lat /tmp/lat.cli
postcopy() {
  $F demo --size-mib 32 --dirty-rate-mbs 3000 --pattern uniform --transport rdma --postcopy --switch-after-rounds 2 $2 --json > /tmp/$1.json 2> /tmp/$1.log
  echo "rc=$?" >> /tmp/$1.log
  section $1 /tmp/$1.json
  section $1-log /tmp/$1.log
}
postcopy read "--prealloc"
postcopy lane ""
export FERRY_TEST_RDMA_READ_ERROR_AFTER=40
postcopy read-error "--prealloc"
unset FERRY_TEST_RDMA_READ_ERROR_AFTER

# The source ferryd killed once faults are read with RDMA READs: the destination waits
# recover_s (3 s here) for it to come back, then fails clearly.
printf '[migration]\nrecover_s = 3\n' > /tmp/recover.toml
$F demo --size-mib 32 --dirty-rate-mbs 3000 --pattern uniform --transport rdma --postcopy --switch-after-rounds 2 --prealloc --config /tmp/recover.toml > /dev/null 2> /tmp/sk.log &
D=$!
kill_demo_ferryd source.log "reads faulting pages with RDMA READs"
wait $D
echo "rc=$?" >> /tmp/sk.log
section source-killed /tmp/sk.log
exit 0
"#;
    let logs = common::boot(dir.path(), &script, &[ferryctl, &ferryd], false, 480);
    let log = &logs[0];
    let report = |name: &str| demo_report(log, name);
    let r = report("read");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["source"]["transport"], "rdma", "pre-copy ran over RDMA: {r}");
    let pc = &r["postcopy"];
    assert_eq!(pc["fault_path"], "rdma_read", "{pc}");
    assert!(pc["rdma_read_pages"].as_u64().unwrap() > 0 && pc["remote_faults"].as_u64().unwrap() > 0, "{pc}");
    assert_eq!(pc["pages_by_fault"].as_u64().unwrap() + pc["pages_by_push"].as_u64().unwrap(), pc["stale_pages"].as_u64().unwrap());

    // A read-only descriptor does not register on this kernel (6.1 pins for writing): the
    // fault lane serves, and the source says why.
    let l = report("lane");
    assert_eq!(l["verified"], true, "{l}");
    assert_eq!(l["postcopy"]["fault_path"], "fault_lane", "{l}");

    // The READ QP in the error state mid-post-copy: the attempt fails as a broken link,
    // the source reconnects, and the next attempt reads again and completes.
    let e = report("read-error");
    assert_eq!(e["verified"], true, "{e}\n{}", section(log, "read-error-log"));
    let ep = &e["postcopy"];
    assert!(ep["attempts"].as_u64().unwrap() >= 2, "the failed READ ended an attempt: {ep}");
    assert_eq!(ep["fault_path"], "rdma_read", "{ep}");

    let sk = section(log, "source-killed");
    println!("the source ferryd killed while faults are read with RDMA READs:\n{sk}");
    assert!(!sk.contains("rc=0"), "the migration must fail:\n{sk}");
    assert!(sk.contains("source did not come back") && sk.contains("cannot complete"), "unclear message:\n{sk}");

    let lat = section(log, "read_lat");
    let line = lat.lines().rfind(|l| l.trim_start().starts_with("4096")).unwrap_or_else(|| panic!("no ib_read_lat result:\n{lat}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    let (typical, p99) = (cols.get(4).copied().unwrap_or("?"), cols.get(7).copied().unwrap_or("?"));
    println!(
        "Soft-RoCE guest, 32 MiB guest dirtying 3000 MB/s, switched over after 2 RDMA rounds, {} build: ib_read_lat 4 KiB typical {typical} us, p99 {p99} us; \
         faults by RDMA READ: p50 {} us, p99 {} us ({} remote faults, {} pages read); by the TCP fault lane: p50 {} us, p99 {} us ({} remote faults); \
         switch-over downtime {:.1} ms (READ) / {:.1} ms (lane); all local after {:.2} s / {:.2} s; READ QP failed: {} attempts, verified",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        pc["fault_latency_us_p50"],
        pc["fault_latency_us_p99"],
        pc["remote_faults"],
        pc["rdma_read_pages"],
        l["postcopy"]["fault_latency_us_p50"],
        l["postcopy"]["fault_latency_us_p99"],
        l["postcopy"]["remote_faults"],
        pc["switchover_downtime_ms"].as_f64().unwrap(),
        l["postcopy"]["switchover_downtime_ms"].as_f64().unwrap(),
        pc["all_local_seconds"].as_f64().unwrap(),
        l["postcopy"]["all_local_seconds"].as_f64().unwrap(),
        ep["attempts"],
    );
}
