//! `ferryctl probe`, `tune` and `doctor` on a real verbs stack: the Soft-RoCE (rdma_rxe)
//! guest from `../shared/tools/rxe-vm`, with rxe0 on a virtio-net NIC.
//!
//! Needs qemu-system-x86_64 and the rxe initramfs (`scripts/setup.sh --test` installs and
//! builds both). Without them the test prints `SKIP: <reason>`; under CI (`CI` set) or with
//! `FERRY_REQUIRE_RXE=1` it fails instead, so CI never skips it silently.

mod common;

use common::section;
use std::process::Command;

#[test]
fn probe_tune_doctor_on_soft_roce() {
    if !common::available() {
        return;
    }
    let tools = common::shared_dir().join("tools/rxe-vm");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run.sh");
    std::fs::write(
        &run,
        r#"#!/bin/sh
cd /payload
for step in "probe:probe --json" "tune:tune --json" "doctor:doctor --json"; do
  name=${step%%:*}; args=${step#*:}
  echo "=== $name-BEGIN"
  ./ferryctl $args
  echo "=== $name-END rc=$?"
done
printf '[dataplane]\ntransport = "rdma"\n[rdma]\nsq_depth = 256\n' > /tmp/rdma.toml
echo "=== forced-BEGIN"
./ferryctl tune --json --config /tmp/rdma.toml
echo "=== forced-END"
exit 0
"#,
    )
    .unwrap();
    let payload = dir.path().join("payload.cpio.gz");
    let out = Command::new(tools.join("make-payload-cpio.sh"))
        .arg("-o")
        .arg(&payload)
        .arg("-r")
        .arg(&run)
        .arg(env!("CARGO_BIN_EXE_ferryctl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "make-payload-cpio: {}", String::from_utf8_lossy(&out.stderr));
    let logs = dir.path().join("logs");
    let out = Command::new(tools.join("run-rxe-test.sh"))
        .args(["--netdev", "user", "--tests", "none", "--timeout", "300", "--payload-cpio"])
        .arg(&payload)
        .arg("--logdir")
        .arg(&logs)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(logs.join("rxe-user.log")).unwrap_or_default();
    assert!(out.status.success(), "guest run failed:\n{}\n{log}", String::from_utf8_lossy(&out.stdout));

    let caps: serde_json::Value = serde_json::from_str(&section(&log, "probe")).unwrap_or_else(|e| panic!("probe JSON: {e}\n{log}"));
    let devs = caps["rdma_devices"].as_array().unwrap();
    let rxe = devs.iter().find(|d| d["name"] == "rxe0").unwrap_or_else(|| panic!("no rxe0 in {devs:?}"));
    println!("rxe0 as probed: attrs {} max_inline_data {} ports {}", rxe["attrs"], rxe["max_inline_data"], rxe["ports"]);
    assert_eq!(rxe["driver"], "rdma_rxe");
    for attr in ["max_qp", "max_qp_wr", "max_sge", "max_sge_rd", "max_cq", "max_cqe", "max_mr_size", "max_qp_rd_atom"] {
        assert!(rxe["attrs"][attr].as_u64().unwrap() > 0, "{attr} = {}", rxe["attrs"][attr]);
    }
    assert!(rxe["max_inline_data"].as_u64().unwrap() > 0, "inline limit not found: {}", rxe["notes"]);
    let port = &rxe["ports"][0];
    assert_eq!(port["state"], "Active");
    assert_eq!(port["link_layer"], "Ethernet");
    assert_eq!(port["active_mtu"], 4096, "the guest sets MTU 9000 on eth0, so rxe runs a 4096 B RoCE MTU");
    assert!(port["rate_gbps"].as_f64().unwrap() > 0.0);
    let gids = port["gids"].as_array().unwrap();
    // 10.0.2.15 (QEMU user networking) as an IPv4-mapped RoCE v2 GID.
    let v4 = gids
        .iter()
        .find(|g| g["gid_type"] == "RoCE v2" && g["gid"] == "0000:0000:0000:0000:0000:ffff:0a00:020f")
        .unwrap_or_else(|| panic!("no RoCE v2 GID for 10.0.2.15: {gids:?}"));
    assert_eq!(v4["netdev"], "eth0");
    let eth0 = caps["nics"].as_array().unwrap().iter().find(|n| n["name"] == "eth0").unwrap();
    assert_eq!(eth0["rdma_device"], "rxe0");
    assert_eq!(eth0["driver"], "virtio_net");

    let plan: serde_json::Value = serde_json::from_str(&section(&log, "tune")).unwrap_or_else(|e| panic!("tune JSON: {e}\n{log}"));
    assert_eq!(plan["transport"], "rdma");
    let r = &plan["rdma"];
    assert_eq!(r["device"], "rxe0");
    assert_eq!(r["gid_index"], v4["index"]);
    assert!(r["sq_depth"].as_u64().unwrap() <= rxe["attrs"]["max_qp_wr"].as_u64().unwrap());
    assert!(r["cq_depth"].as_u64().unwrap() <= rxe["attrs"]["max_cqe"].as_u64().unwrap());
    assert!(r["send_sge"].as_u64().unwrap() <= rxe["attrs"]["max_sge"].as_u64().unwrap());
    assert!(r["inline_threshold_bytes"].as_u64().unwrap() <= rxe["max_inline_data"].as_u64().unwrap());

    let doctor: serde_json::Value = serde_json::from_str(&section(&log, "doctor")).unwrap_or_else(|e| panic!("doctor JSON: {e}\n{log}"));
    let rdma_check = doctor["checks"].as_array().unwrap().iter().find(|c| c["name"] == "rdma").unwrap();
    assert_eq!(rdma_check["status"], "ok", "{rdma_check}");

    let forced: serde_json::Value =
        serde_json::from_str(&section(&log, "forced")).unwrap_or_else(|e| panic!("forced tune JSON: {e}\n{log}"));
    assert_eq!(forced["rdma"]["sq_depth"], 256);
}
