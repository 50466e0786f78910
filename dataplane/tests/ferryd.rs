//! `ferryd` starts with a plan, reports ready, and exits 0 on SIGTERM; a bad plan is
//! refused with exit 2 and a message naming the problem.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use dataplane::plan::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn plan() -> Plan {
    Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        host: "test".into(),
        transport: Transport::Tcp,
        numa_node: 0,
        worker_cpus: vec![0],
        control_cpu: None,
        link: LinkPlan { interface: Some("lo".into()), speed_gbps: 10.0, rtt_us: 10.0, speed_assumed: true },
        chunk_size_bytes: 64 << 10,
        rdma: None,
        tcp: TcpPlan { connections_per_worker: 1, io_uring: true, ring_entries: 64, send_zc: false, socket_buffer_bytes: 4 << 20 },
        arena: ArenaPlan { bytes_per_worker: 8 << 20, backing: ArenaBacking::Thp, hugepages_2m_needed: 4, mlock: true },
        compression: Compression::Off,
        reasons: vec![Reason { decision: "transport".into(), value: "tcp".into(), because: "test".into() }],
    }
}

fn ferryd(plan_path: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_ferryd"))
        .arg("--plan")
        .arg(plan_path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferryd")
}

#[test]
fn starts_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    std::fs::write(&path, serde_json::to_string(&plan()).unwrap()).unwrap();
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut child = ferryd(&path);
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        // Blocks on ferryd's own output until it says ready (or exits).
        for line in lines.by_ref() {
            let line = line.unwrap();
            log += &line;
            log += "\n";
            if line.contains("ferryd ready") {
                break;
            }
        }
        assert!(log.contains("transport tcp (io_uring)"), "{log}");
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = child.wait().unwrap();
        let rest: String = lines.map_while(Result::ok).collect::<Vec<_>>().join("\n");
        assert!(status.success(), "{sig:?}: {status:?}\n{log}{rest}");
        assert!(rest.contains("shutting down"), "{rest}");
    }
}

#[test]
fn bad_plans_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad_cq = plan();
    bad_cq.transport = Transport::Rdma;
    bad_cq.rdma = Some(RdmaPlan {
        device: "mlx5_0".into(),
        port: 1,
        link_layer: "Ethernet".into(),
        gid_index: Some(3),
        mtu: 4096,
        qps_per_worker: 2,
        sq_depth: 128,
        rq_depth: 128,
        cq_depth: 256,
        send_sge: 16,
        recv_sge: 1,
        inline_threshold_bytes: 220,
        signal_interval: 16,
    });
    let mut old = serde_json::to_value(plan()).unwrap();
    old["schema_version"] = 7.into();
    let mut extra = serde_json::to_value(plan()).unwrap();
    extra["surprise"] = 1.into();
    let cases = [
        ("truncated.json", serde_json::to_string(&plan()).unwrap()[..40].to_string(), "EOF while parsing"),
        ("cq.json", serde_json::to_string(&bad_cq).unwrap(), "the CQ could overrun"),
        ("old.json", old.to_string(), "schema version 7"),
        ("extra.json", extra.to_string(), "unknown field `surprise`"),
    ];
    for (name, body, what) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ferryd")).arg("--plan").arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what) && err.contains(name), "{name}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ferryd")).args(["--plan", "/nonexistent/plan.json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read plan /nonexistent/plan.json"));
}
