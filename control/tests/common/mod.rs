//! The Soft-RoCE guest from `../shared/tools/rxe-vm`, for the tests that run ferryctl on a
//! real verbs stack.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn shared_dir() -> PathBuf {
    std::env::var_os("FERRY_SHARED_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// Why the guest cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    let rxe = shared_dir().join("tools/rxe-vm/run-rxe-test.sh");
    if !rxe.exists() {
        return Some(format!("{} not found (set FERRY_SHARED_DIR)", rxe.display()));
    }
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        return Some("qemu-system-x86_64 not installed (scripts/setup.sh --test installs it)".into());
    }
    let build = std::env::var_os("RXE_VM_BUILD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/rxe-vm"));
    if !build.join("rxe-initramfs.cpio.gz").exists() {
        return Some(format!("no rxe initramfs in {} (scripts/setup.sh --test builds it)", build.display()));
    }
    None
}

/// The text between `=== NAME-BEGIN` and `=== NAME-END...` in the guest's console log.
pub fn section(log: &str, name: &str) -> String {
    let begin = format!("=== {name}-BEGIN");
    let end = format!("=== {name}-END");
    let mut inside = false;
    let mut out = String::new();
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if line == begin {
            inside = true;
        } else if line.starts_with(&end) {
            break;
        } else if inside {
            out += line;
            out += "\n";
        }
    }
    out
}

/// Skips (prints `SKIP: <reason>`) when the guest cannot run here, except under CI or
/// with `FERRY_REQUIRE_RXE=1`, where that is a failure. Returns false to skip.
pub fn available() -> bool {
    if let Some(why) = missing() {
        if std::env::var_os("FERRY_REQUIRE_RXE").is_some() || std::env::var_os("CI").is_some() {
            panic!("CI or FERRY_REQUIRE_RXE is set but the Soft-RoCE guest cannot run: {why}");
        }
        hw::report_skip(&why);
        return false;
    }
    true
}

/// Packs `files` (ferryctl and data) with `run_sh` and boots the guest (or two, joined by
/// a QEMU socket link); returns each guest's console log. `FERRY_KEEP_GUEST_LOGS=DIR`
/// keeps copies of the logs there.
pub fn boot(dir: &Path, run_sh: &str, files: &[&Path], two_guests: bool, timeout_s: u32) -> Vec<String> {
    // One guest run at a time: each takes the machine's cores (TCG), and two at once made
    // QEMU fail in CI.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tools = shared_dir().join("tools/rxe-vm");
    let run = dir.join("run.sh");
    std::fs::write(&run, run_sh).unwrap();
    let payload = dir.join("payload.cpio.gz");
    let out = Command::new(tools.join("make-payload-cpio.sh")).arg("-o").arg(&payload).arg("-r").arg(&run).args(files).output().unwrap();
    assert!(out.status.success(), "make-payload-cpio: {}", String::from_utf8_lossy(&out.stderr));
    let logs = dir.join("logs");
    let mut cmd = Command::new(tools.join("run-rxe-test.sh"));
    cmd.args(["--tests", "none", "--timeout", &timeout_s.to_string(), "--payload-cpio"]).arg(&payload).arg("--logdir").arg(&logs);
    if two_guests {
        // Without perftest between the guests (server mode would run its defaults): only
        // the payload, once the client can ping the server.
        cmd.args(["--two-guests", "--append", "rxet.tests="]);
    } else {
        cmd.args(["--netdev", "user"]);
    }
    let out = cmd.output().unwrap();
    let mut names: Vec<_> =
        std::fs::read_dir(&logs).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
    names.sort();
    if let Some(keep) = std::env::var_os("FERRY_KEEP_GUEST_LOGS") {
        for p in &names {
            let _ = std::fs::copy(p, Path::new(&keep).join(p.file_name().unwrap()));
        }
    }
    let texts: Vec<String> = names.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default().replace('\r', "")).collect();
    assert!(out.status.success(), "guest run failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), texts.join("\n-----\n"));
    texts
}
