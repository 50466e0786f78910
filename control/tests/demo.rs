//! `ferryctl demo` and `ferryctl bench migrate` end to end: two ferryd processes, a
//! simulated guest under a dirtying workload, region-mode rounds, the destination's memory
//! compared byte for byte. Needs the ferryd binary beside ferryctl (`cargo test
//! --workspace` builds it); prints SKIP otherwise.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn ferryctl() -> Option<Command> {
    let bin = Path::new(env!("CARGO_BIN_EXE_ferryctl"));
    if !bin.with_file_name("ferryd").exists() {
        hw::report_skip(&format!("{} not built (cargo test --workspace builds it)", bin.with_file_name("ferryd").display()));
        return None;
    }
    Some(Command::new(bin))
}

fn run_json(args: &[&str]) -> Value {
    let Some(mut c) = ferryctl() else { return Value::Null };
    let out = c.args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn demo_migrates_a_dirtying_guest_and_verifies_it() {
    let r = run_json(&["demo", "--size-mib", "48", "--dirty-rate-mbs", "64", "--json"]);
    if r.is_null() {
        return;
    }
    assert_eq!(r["verified"], true);
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "{r}");
    assert_eq!(rounds[0]["dirty_pages"], 48 * 256, "round 0 carries every page");
    assert_eq!(rounds.last().unwrap()["last"], true);
    assert!(rounds[..rounds.len() - 1].iter().any(|x| x["advise_pause"] == true) || rounds.len() as u64 == 31, "{r}");
    assert!(r["workload"]["page_writes"].as_u64().unwrap() > 0);
    assert!(r["zero_pages"].as_u64().unwrap() > 48 * 256 / 3, "the image's zero pages are skipped: {r}");
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(r["destination"]["digest"], r["source"]["digest"]);
    assert_eq!(r["source"]["verify"], "sent");
}

/// `--runs`: one report per line, each a new guest through the same two ferryd, each
/// verified.
#[test]
fn runs_migrate_new_guests_through_the_same_ferryd() {
    let Some(mut c) = ferryctl() else { return };
    let out = c.args(["demo", "--size-mib", "16", "--runs", "2", "--verify", "full", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let reports: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), 2, "{reports:?}");
    for r in &reports {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["destination"]["digest"], r["source"]["digest"]);
    }
    assert_ne!(reports[0]["source"]["digest"], reports[1]["source"]["digest"], "the second run migrates a new guest");
    let Some(mut c) = ferryctl() else { return };
    let out = c.args(["demo", "--runs", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no runs is a usage error: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bench_migrate_obeys_the_rate_limit_and_compresses() {
    let r = run_json(&[
        "bench",
        "migrate",
        "--size-mib",
        "24",
        "--dirty-rate-mbs",
        "0",
        "--rate-limit-mbit",
        "400",
        "--compression",
        "zstd:1",
        "--pattern",
        "sequential",
        "--verify",
        "full",
        "--json",
    ]);
    if r.is_null() {
        return;
    }
    assert_eq!(r["verified"], true);
    let r0 = &r["rounds"][0];
    // 400 Mbit/s is 50 MB/s of guest memory: 24 MiB take at least half a second.
    assert!(r0["seconds"].as_f64().unwrap() >= 0.45, "{r0}");
    assert!(r0["gbps"].as_f64().unwrap() <= 0.05 * 1.1, "{r0}");
    assert!(r["compression_ratio"].as_f64().unwrap() > 1.5, "{r}");
    assert_eq!(r["source"]["verify"], "full");
}

#[test]
fn demo_postcopy_runs_the_guest_at_the_destination_and_verifies_what_it_read() {
    if let Err(e) = hw::uffd::Userfault::create() {
        hw::report_skip(&format!("post-copy needs userfaultfd with minor faults on shared memory: {e}"));
        return;
    }
    let r = run_json(&["demo", "--size-mib", "48", "--dirty-rate-mbs", "400", "--postcopy", "--switch-after-rounds", "1", "--json"]);
    if r.is_null() {
        return;
    }
    assert_eq!(r["verified"], true);
    let pc = &r["postcopy"];
    assert_eq!(pc["rounds_before_switch"], 1, "{r}");
    let stale = pc["stale_pages"].as_u64().unwrap();
    assert!(stale > 0, "the workload dirtied pages after round 0: {r}");
    assert_eq!(pc["pages_by_fault"].as_u64().unwrap() + pc["pages_by_push"].as_u64().unwrap(), stale, "{pc}");
    assert!(pc["pages_touched"].as_u64().unwrap() > 0 && pc["faults"].as_u64().unwrap() > 0, "{pc}");
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(r["destination"]["digest"], r["source"]["digest"]);
    assert_eq!(r["source"]["postcopy"]["attempts"], 1);
}

#[test]
fn bad_demo_arguments_exit_2() {
    for args in [
        &["demo", "--transport", "rdma"][..],
        &["demo", "--size-mib", "0"],
        &["demo", "--dirty-rate-mbs=-1"],
        &["demo", "--compression", "lz4"],
    ] {
        let Some(mut c) = ferryctl() else { return };
        let out = c.args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.stderr.is_empty());
    }
}
