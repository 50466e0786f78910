//! `ferryd` starts with a plan, reports ready, and exits 0 on SIGTERM; a bad plan is
//! refused with exit 2 and a message naming the problem.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
        tcp: TcpPlan {
            connections_per_worker: 1,
            io_uring: true,
            ring_entries: 64,
            send_zc: false,
            socket_buffer_bytes: Some(1 << 20),
            socket_buffer_needed_bytes: 1 << 20,
        },
        arena: ArenaPlan { bytes_per_worker: 8 << 20, backing: ArenaBacking::Thp, hugepages_2m_needed: 4, mlock: true },
        compression: Compression::Off,
        limits: Limits::default(),
        migration: Default::default(),
        daemon: Default::default(),
        reasons: vec![Reason { decision: "transport".into(), value: "tcp".into(), because: "test".into() }],
    }
}

fn ferryd(plan_path: &std::path::Path) -> std::process::Child {
    let control = plan_path.with_file_name("ferryd.sock");
    Command::new(env!("CARGO_BIN_EXE_ferryd"))
        .arg("--plan")
        .arg(plan_path)
        .arg("--control")
        .arg(control)
        .args(["--metrics", "127.0.0.1:0", "--insecure-no-auth"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
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

/// A ferryd with a key and a metrics port in `dir`: the process, its control socket, its
/// metrics address and the key's `Auth`.
fn keyed_ferryd(dir: &Path) -> (Child, PathBuf, String, dataplane::auth::Auth) {
    use dataplane::auth::{Auth, Key};
    use std::os::unix::fs::PermissionsExt;
    let key_path = dir.join("k");
    std::fs::write(&key_path, "11".repeat(32)).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let auth = Auth::Key(Key::from_bytes(vec![0x11; 32]).unwrap());
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string(&plan()).unwrap()).unwrap();
    let sock = dir.join("ferryd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferryd"))
        .arg("--plan")
        .arg(&plan_path)
        .arg("--control")
        .arg(&sock)
        .args(["--metrics", "127.0.0.1:0", "--key"])
        .arg(&key_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut metrics_addr = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            metrics_addr = rest.trim_end_matches("/metrics").to_string();
        }
        if line.contains("ferryd ready") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (child, sock, metrics_addr, auth)
}

/// `GET /metrics` at `addr`: the whole response.
fn scrape(addr: &str) -> String {
    http(addr, "GET /metrics HTTP/1.0\r\n\r\n").unwrap()
}

/// Every role's series is there at zero before any session (a fleet's increase() sees the
/// first one), and the build's.
fn assert_series_at_zero(body: &str) {
    for role in ["send", "recv", "migrate_in", "migrate_out"] {
        for want in [
            format!("ferry_sessions_total{{role=\"{role}\",result=\"error\"}} 0"),
            format!("ferry_sessions_total{{role=\"{role}\",result=\"ok\"}} 0"),
            format!("ferry_sessions_active{{role=\"{role}\"}} 0"),
            format!("ferry_region_bytes_total{{role=\"{role}\"}} 0"),
        ] {
            assert!(body.contains(&want), "{want} missing:\n{body}");
        }
    }
    let build =
        format!("ferry_build_info{{version=\"{}\",revision=\"{}\",wire_protocol=\"2\"}} 1", env!("CARGO_PKG_VERSION"), dataplane::REVISION);
    assert!(body.contains(&build), "{build} missing:\n{body}");
}

/// After a receive, a send and a failed send of 300000 bytes: each counted, with the
/// workers' and lanes' latencies.
fn assert_sessions_counted(body: &str) {
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    for want in [
        "ferry_sessions_total{role=\"recv\",result=\"ok\"} 1",
        "ferry_sessions_total{role=\"send\",result=\"ok\"} 1",
        "ferry_sessions_total{role=\"send\",result=\"error\"} 1",
        "ferry_region_bytes_total{role=\"send\"} 300000",
        "# TYPE ferry_chunk_send_latency_seconds histogram",
        "ferry_chunk_send_latency_seconds_bucket{role=\"send\",le=\"+Inf\"}",
        "ferry_session_seconds_count{role=\"send\"} 1",
        "ferry_worker_region_bytes_total{role=\"send\",worker=\"0\"} 300000",
        "ferry_worker_region_bytes_total{role=\"recv\",worker=\"0\"} 300000",
        "# TYPE ferry_worker_frames_total counter",
        "# TYPE ferry_worker_latency_seconds histogram",
        "ferry_worker_latency_seconds_sum{role=\"send\",worker=\"0\"}",
        "ferry_worker_latency_seconds_bucket{role=\"recv\",worker=\"0\",le=\"0.001\"}",
    ] {
        assert!(body.contains(want), "metrics lack {want}:\n{body}");
    }
    // The receiving lane timed each data frame it wrote.
    let frames: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("ferry_worker_latency_seconds_count{role=\"recv\",worker=\"0\"} "))
        .expect("a recv lane latency count")
        .parse()
        .unwrap();
    assert!(frames > 0, "{body}");
}

/// ferryd as a service: commands on the control socket drive real transfers, and the
/// metrics endpoint counts them.
#[test]
fn serves_transfers_status_and_metrics() {
    use dataplane::engine::recv::{RecvOptions, recv_file};
    use dataplane::engine::send::{SendOptions, send_file};
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock, metrics_addr, auth) = keyed_ferryd(dir.path());
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);

    let ask = |req: &str| -> Vec<serde_json::Value> {
        let mut c = UnixStream::connect(&sock).unwrap();
        writeln!(c, "{req}").unwrap();
        BufReader::new(c).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect()
    };
    let st = ask(r#"{"cmd":"status"}"#);
    assert_eq!(st[0]["ok"], true);
    assert_series_at_zero(&scrape(&metrics_addr));
    // Status names the build and the wire protocol it speaks.
    let s = &st[0]["status"];
    assert_eq!((s["revision"].as_str(), s["wire_protocol"].as_u64()), (Some(dataplane::REVISION), Some(2)), "{st:?}");
    // The sending workers run from the start, one per planned CPU.
    assert_eq!(st[0]["pool"]["cpus"], serde_json::json!([0]), "{st:?}");
    let threads = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .collect()
    };
    assert_eq!(threads().iter().filter(|c| c.starts_with("ferry-w")).count(), 1, "{:?}", threads());
    let bad = ask(r#"{"cmd":"launch-missiles"}"#);
    assert_eq!((&bad[0]["ok"], &bad[0]["kind"]), (&serde_json::json!(false), &serde_json::json!("bad_request")), "{bad:?}");
    assert!(bad[0]["error"].as_str().unwrap().contains("bad request"));

    // ferryd receives: it says where it listens, then reports the finished session.
    let data: Vec<u8> = (0..300_000u32).map(|i| if i % 9000 < 4096 { 0 } else { (i % 251) as u8 }).collect();
    let src = dir.path().join("src");
    std::fs::write(&src, &data).unwrap();
    let out = dir.path().join("received");
    let mut c = UnixStream::connect(&sock).unwrap();
    writeln!(c, "{}", serde_json::json!({"cmd": "recv", "listen": "127.0.0.1:0", "out": out})).unwrap();
    let mut replies = BufReader::new(c).lines();
    let first: serde_json::Value = serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "listening");
    let p = plan();
    let to = first["addr"].as_str().unwrap().into();
    send_file(&src, &SendOptions { to, auth: auth.clone(), plan: &p, progress: None, require_rdma: false, pool: None }).unwrap();
    let last: serde_json::Value = serde_json::from_str(&replies.next().unwrap().unwrap()).unwrap();
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // ferryd sends.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let back = dir.path().join("back");
    let got = std::thread::scope(|s| {
        let r = s.spawn(|| {
            recv_file(
                &listener,
                &back,
                &RecvOptions { auth: auth.clone(), plan: &p, progress: None, total: None, timeout: None, pool: None },
            )
        });
        let reply = ask(&serde_json::json!({"cmd": "send", "to": addr, "file": src, "compress": "zstd:1"}).to_string());
        assert_eq!(reply[0]["ok"], true, "{reply:?}");
        assert!(reply[0]["report"]["compressed_in_bytes"].as_u64().unwrap() > 0);
        r.join().unwrap()
    });
    got.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // The send ran on the pool: still its one worker thread, no other sending thread.
    assert_eq!(threads().iter().filter(|c| c.starts_with("ferry-w")).count(), 1, "{:?}", threads());

    // A send that cannot connect is reported and counted.
    let failed = ask(r#"{"cmd":"send","to":"127.0.0.1:1","file":"/nonexistent"}"#);
    assert_eq!(failed[0]["ok"], false);

    assert_sessions_counted(&scrape(&metrics_addr));
    let st = ask(r#"{"cmd":"status"}"#);
    let lat = st[0]["status"]["worker_latency_us"].as_array().unwrap();
    assert!(lat.iter().any(|w| w["role"] == "recv" && w["latency_us"]["max"].as_u64().is_some()), "{lat:?}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the control socket is removed on exit");
}

/// The control socket's mode and group come from `--control-mode` and `--control-group`
/// (a VMM running as another user of that group can connect); a mode that lets other
/// users in, and a group that does not exist, are refused with exit 2.
#[test]
fn control_socket_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    std::fs::write(&path, serde_json::to_string(&plan()).unwrap()).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ferryd"))
            .arg("--plan")
            .arg(&path)
            .arg("--control")
            .arg(dir.path().join("c.sock"))
            .args(["--metrics", "off", "--insecure-no-auth"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for (args, what) in [
        (&["--control-mode", "0666"][..], "only owner and group bits"),
        (&["--control-mode", "rw"][..], "octal mode"),
        (&["--control-mode", "0660", "--control-group", "no-such-group-here"][..], "no such group"),
    ] {
        let out = run(args).wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(what), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    if !nix::unistd::geteuid().is_root() {
        hw::report_skip("not root: cannot give the control socket another group");
        return;
    }
    // nogroup (65534) exists on Debian; by number, so the test does not depend on its name.
    let mut child = run(&["--control-mode", "0660", "--control-group", "65534"]);
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.map_while(Result::ok) {
        if line.contains("ferryd ready") {
            break;
        }
    }
    let meta = std::fs::metadata(dir.path().join("c.sock")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

/// ferryd up, its metrics address from its log, and the log so far.
fn ferryd_with_metrics(plan_path: &std::path::Path) -> (std::process::Child, String) {
    let mut child = ferryd(plan_path);
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = String::new();
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            addr = rest.trim_end_matches("/metrics").to_string();
        }
        if line.contains("ferryd ready") {
            break;
        }
    }
    assert!(!addr.is_empty(), "ferryd did not say where its metrics are");
    (child, addr)
}

/// One HTTP request to `addr`: the whole answer, or the error.
fn http(addr: &str, request: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    c.write_all(request.as_bytes())?;
    let mut got = String::new();
    c.read_to_string(&mut got)?;
    Ok(got)
}

/// A scrape is answered at once while 100 idle clients hold connections open (each of
/// which once held a thread for 5 s); HEAD, /healthz, /readyz and OpenMetrics are served;
/// and the exposition passes `promtool check metrics` where promtool is installed.
#[test]
fn metrics_under_idle_clients_and_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    std::fs::write(&path, serde_json::to_string(&plan()).unwrap()).unwrap();
    let (mut child, addr) = ferryd_with_metrics(&path);
    let idle: Vec<std::net::TcpStream> = (0..100).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let started = std::time::Instant::now();
    let body = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let took = started.elapsed();
    assert!(body.starts_with("HTTP/1.0 200 OK\r\n"), "{body}");
    assert!(body.contains("Content-Type: text/plain; version=0.0.4"), "{body}");
    // Not a timing claim about speed: an idle client used to hold the scrape for its 5 s
    // read deadline; well under that means none did.
    assert!(took < std::time::Duration::from_secs(4), "a scrape behind 100 idle clients took {took:?}");
    let head = http(&addr, "HEAD /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK") && head.ends_with("\r\n\r\n"), "{head}");
    assert!(http(&addr, "GET /healthz HTTP/1.0\r\n\r\n").unwrap().ends_with("ok\n"));
    assert!(http(&addr, "GET /readyz HTTP/1.0\r\n\r\n").unwrap().ends_with("ready\n"));
    let om = http(&addr, "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n").unwrap();
    assert!(om.contains("application/openmetrics-text") && om.ends_with("# EOF\n"), "{om}");
    drop(idle);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    let exposition = body.split_once("\r\n\r\n").unwrap().1;
    let Ok(mut lint) =
        Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
    else {
        hw::report_skip("promtool not installed (Debian: prometheus): the exposition was not linted");
        return;
    };
    std::io::Write::write_all(lint.stdin.as_mut().unwrap(), exposition.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The names an exposition declares (`# TYPE`, a histogram's with its `_bucket`, `_sum`
/// and `_count`) or has samples of.
fn exported_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for l in exposition.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            out.insert(name.to_string());
            if kind == "histogram" {
                out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
        } else if !l.starts_with('#') && !l.is_empty() {
            out.insert(l.split(['{', ' ']).next().unwrap_or("").to_string());
        }
    }
    out
}

/// Every ferry_* and process_* name in `text` (rules, dashboards).
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for prefix in ["ferry_", "process_"] {
        for (i, _) in text.match_indices(prefix) {
            if i > 0 && text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // A prefix alone ("ferry_*" in a comment) names nothing.
            if name.len() > prefix.len() {
                out.insert(name);
            }
        }
    }
    out
}

/// The alert rules and the dashboard in deploy/ name only series ferryd exports; the rules
/// pass `promtool check rules` and their tests `promtool test rules`, and every dashboard
/// query compiles (promtool checks each as a recording rule).
#[test]
fn deploy_rules_and_dashboard_name_real_series() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    std::fs::write(&path, serde_json::to_string(&plan()).unwrap()).unwrap();
    let (mut child, addr) = ferryd_with_metrics(&path);
    let body = http(&addr, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    let exported = exported_names(body.split_once("\r\n\r\n").unwrap().1);
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let rules = std::fs::read_to_string(deploy.join("prometheus/ferry-rules.yaml")).unwrap();
    let dashboard_text = std::fs::read_to_string(deploy.join("grafana/ferry-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    for (what, text) in [("ferry-rules.yaml", &rules), ("ferry-dashboard.json", &dashboard_text)] {
        let names = names_in(text);
        assert!(names.len() > 5, "{what}: {names:?}");
        for name in names {
            assert!(exported.contains(&name), "{what} names {name}, which ferryd does not export:\n{exported:?}");
        }
    }
    // Every query of the dashboard, as a recording rule promtool can check.
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().replace("$__rate_interval", "5m").replace("$instance", ".*"));
        }
    }
    assert!(exprs.len() > 10);
    let mut queries = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        queries += &format!("      - record: dashboard:query{i}\n        expr: {}\n", serde_json::to_string(e).unwrap());
    }
    let queries_path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&queries_path, queries).unwrap();
    let promtool = |args: &[&std::ffi::OsStr]| Command::new("promtool").args(args).current_dir(deploy.join("prometheus")).output();
    let Ok(out) = promtool(&["check".as_ref(), "rules".as_ref(), "ferry-rules.yaml".as_ref(), queries_path.as_os_str()]) else {
        hw::report_skip("promtool not installed (Debian: prometheus): the rules and the dashboard's queries were not checked");
        return;
    };
    assert!(out.status.success(), "promtool check rules: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out = promtool(&["test".as_ref(), "rules".as_ref(), "ferry-rules.test.yaml".as_ref()]).unwrap();
    assert!(out.status.success(), "promtool test rules: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// With nothing but `--plan`, ferryd takes its control socket, metrics address and key
/// from the plan (ferry.toml's `[daemon]`); a flag still wins over the plan.
#[test]
fn the_plan_says_how_ferryd_serves() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut p = plan();
    p.daemon.control = dir.path().join("from-plan.sock");
    p.daemon.metrics = "off".into();
    p.daemon.key = Some(key);
    let path = dir.path().join("plan.json");
    std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
    for (flags, socket) in
        [(vec![], "from-plan.sock"), (vec!["--control".to_string(), dir.path().join("flag.sock").display().to_string()], "flag.sock")]
    {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferryd"))
            .arg("--plan")
            .arg(&path)
            .args(&flags)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log: Vec<String> = lines.map_while(Result::ok).take_while(|l| !l.contains("ferryd ready")).collect();
        assert!(log.iter().any(|l| l.contains(socket)), "{log:?}");
        assert!(!log.iter().any(|l| l.contains("metrics on")), "metrics are off in the plan: {log:?}");
        let mut c = hw::fdpass::LineConn::new(std::os::unix::net::UnixStream::connect(dir.path().join(socket)).unwrap());
        c.send("{\"cmd\":\"status\"}", &[]).unwrap();
        assert!(c.recv().unwrap().unwrap().0.contains("\"ok\":true"));
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        assert!(child.wait().unwrap().success());
    }
}

/// A send and a receive through ferryd that ask for progress get `progress` events while
/// they run, the receiver's total 0 until the sender has described the region, and the
/// last event saying every byte arrived, before the final reply.
#[test]
fn progress_events_follow_a_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    std::fs::write(&path, serde_json::to_string(&plan()).unwrap()).unwrap();
    let (mut child, _) = ferryd_with_metrics(&path);
    let sock = dir.path().join("ferryd.sock");
    let size = 24u64 << 20;
    let src = dir.path().join("src");
    std::fs::write(&src, (0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let ask = |req: serde_json::Value| -> Vec<serde_json::Value> {
        use std::io::Write;
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        writeln!(c, "{req}").unwrap();
        let mut out = Vec::new();
        for l in BufReader::new(c).lines() {
            let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
            let last = v.get("ok").is_some();
            out.push(v);
            if last {
                break;
            }
        }
        out
    };
    // The receive's first reply is where it listens; its events follow on that connection.
    use std::io::Write;
    let mut rc = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let out = dir.path().join("out");
    writeln!(rc, "{}", serde_json::json!({"cmd": "recv", "listen": "127.0.0.1:0", "out": out, "progress": true})).unwrap();
    let mut lines = BufReader::new(rc).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let addr = first["addr"].as_str().unwrap().to_string();
    let receiver =
        std::thread::spawn(move || lines.map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap()).collect::<Vec<_>>());
    let sent = ask(serde_json::json!({"cmd": "send", "to": addr, "file": src, "compression": "off", "progress": true}));
    let received = receiver.join().unwrap();
    for (what, replies) in [("send", &sent), ("recv", &received)] {
        let (last, events) = replies.split_last().unwrap();
        assert_eq!(last["ok"], true, "{what}: {last}");
        assert!(!events.is_empty() && events.iter().all(|e| e["event"] == "progress"), "{what}: {replies:?}");
        let end = events.last().unwrap();
        assert_eq!((end["bytes"].as_u64(), end["total"].as_u64()), (Some(size), Some(size)), "{what}: {events:?}");
        let totals: Vec<u64> = events.iter().map(|e| e["total"].as_u64().unwrap()).collect();
        assert!(totals.iter().all(|&t| t == 0 || t == size), "{what}: {totals:?}");
    }
    assert_eq!(std::fs::read(&out).unwrap().len() as u64, size);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

/// Stream mode in ferryd (`stream_out`, `stream_in`; `ferryctl proxy --ferryd`): a
/// migration stream QEMU writes into the source ferryd's UNIX endpoint reaches the
/// destination QEMU's socket through the destination ferryd, and the answer comes back;
/// both report it, and their metrics count it by role with its channels.
#[test]
fn stream_mode_runs_in_ferryd() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |dir: &std::path::Path| {
        let path = dir.join("plan.json");
        std::fs::write(&path, serde_json::to_string(&plan()).unwrap()).unwrap();
        ferryd_with_metrics(&path)
    };
    let ((mut src, src_metrics), (mut dst, _)) = (start(src_dir.path()), start(dst_dir.path()));
    let qemu_dst = UnixListener::bind(dst_dir.path().join("qemu-in.sock")).unwrap();
    let open = |dir: &std::path::Path, req: serde_json::Value| {
        let mut c = UnixStream::connect(dir.join("ferryd.sock")).unwrap();
        writeln!(c, "{req}").unwrap();
        let mut lines = BufReader::new(c).lines();
        let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(first["event"], "listening", "{first}");
        (first, std::thread::spawn(move || serde_json::from_str::<serde_json::Value>(&lines.last().unwrap().unwrap()).unwrap()))
    };
    let forward = format!("unix:{}", dst_dir.path().join("qemu-in.sock").display());
    let (listening, dst_done) = open(dst_dir.path(), serde_json::json!({"cmd": "stream_in", "listen": "127.0.0.1:0", "forward": forward}));
    let to = listening["addr"].as_str().unwrap().to_string();
    let endpoint = src_dir.path().join("qemu-out.sock");
    let (listening, src_done) =
        open(src_dir.path(), serde_json::json!({"cmd": "stream_out", "listen": [format!("unix:{}", endpoint.display())], "to": to}));
    assert_eq!(listening["endpoints"][0], format!("unix:{}", endpoint.display()));
    // QEMU on both sides: the stream one way, an answer the other.
    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut out = UnixStream::connect(&endpoint).unwrap();
    out.write_all(&data).unwrap();
    out.shutdown(std::net::Shutdown::Write).unwrap();
    let (mut inn, _) = qemu_dst.accept().unwrap();
    let mut got = Vec::new();
    inn.read_to_end(&mut got).unwrap();
    assert!(got == data, "the stream arrives whole");
    inn.write_all(b"loaded").unwrap();
    drop(inn);
    let mut back = Vec::new();
    out.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"loaded");
    let (s, d) = (src_done.join().unwrap(), dst_done.join().unwrap());
    assert_eq!((s["ok"].clone(), d["ok"].clone()), (true.into(), true.into()), "{s}\n{d}");
    assert_eq!(s["report"]["sent_bytes"], data.len() as u64);
    assert_eq!(d["report"]["received_bytes"], data.len() as u64);
    let body = http(&src_metrics, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    for want in ["ferry_sessions_total{role=\"stream_out\",result=\"ok\"} 1", "ferry_stream_channels_total{role=\"stream_out\"} 1"] {
        assert!(body.contains(want), "{want} missing:\n{body}");
    }
    for c in [&mut src, &mut dst] {
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
        assert!(c.wait().unwrap().success());
    }
}

/// `hello` says the control protocol's version, the build and the commands; a request's
/// `id` comes back on every reply and event of its conversation; an id that is neither a
/// string nor a number is refused.
#[test]
fn hello_and_request_ids() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    std::fs::write(&path, serde_json::to_string(&plan()).unwrap()).unwrap();
    let (mut child, _) = ferryd_with_metrics(&path);
    let ask = |req: serde_json::Value| -> Vec<serde_json::Value> {
        let mut c = UnixStream::connect(dir.path().join("ferryd.sock")).unwrap();
        writeln!(c, "{req}").unwrap();
        BufReader::new(c).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect()
    };
    let hello = &ask(serde_json::json!({"cmd": "hello", "id": 7}))[0];
    assert_eq!((hello["ok"].as_bool(), hello["id"].as_u64()), (Some(true), Some(7)), "{hello}");
    assert_eq!(hello["protocol"], dataplane::daemon::CONTROL_PROTOCOL);
    assert_eq!(hello["wire_protocol"], dataplane::wire::VERSION);
    assert_eq!(hello["version"], env!("CARGO_PKG_VERSION"));
    let commands: Vec<&str> = hello["commands"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(commands.contains(&"stream_open") && commands.contains(&"migrate_out"), "{hello}");
    assert_eq!(ask(serde_json::json!({"cmd": "status", "id": "s1"}))[0]["id"], "s1");
    // A receive nobody sends to: its listening event and its last reply carry the id.
    let out = dir.path().join("never");
    let replies = ask(serde_json::json!({"cmd": "recv", "listen": "127.0.0.1:0", "out": out, "timeout_s": 1, "id": "r-1"}));
    assert!(replies.len() >= 2 && replies.iter().all(|r| r["id"] == "r-1"), "{replies:?}");
    assert_eq!(replies.last().unwrap()["ok"], false);
    // Without an id, none comes back.
    assert!(ask(serde_json::json!({"cmd": "status"}))[0].get("id").is_none());
    let bad = &ask(serde_json::json!({"cmd": "status", "id": [1]}))[0];
    assert!(bad["error"].as_str().unwrap().contains("give a string or a number"), "{bad}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}
