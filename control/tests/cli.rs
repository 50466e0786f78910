//! Drives the real `ferryctl` binary: golden plans for every fixture, the probe on this
//! machine, doctor's exit codes, and bad input (exit 2 with a message naming the field).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferryctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferryctl")).args(args).env("RUST_LOG", "warn").output().expect("run ferryctl")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// `tune --json` and the text rendering for each fixture match the checked-in golden
/// plans. `UPDATE_GOLDEN=1 cargo test -p control --test cli` rewrites them.
#[test]
fn golden_plans() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("caps"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    let mut stale = Vec::new();
    for name in &names {
        let caps = fixtures().join(format!("caps/{name}.json"));
        for (ext, extra) in [("json", &["--json"][..]), ("txt", &[][..])] {
            let mut args = vec!["tune", "--caps", caps.to_str().unwrap()];
            args.extend_from_slice(extra);
            let out = ferryctl(&args);
            assert!(out.status.success(), "{name}: {}", text(&out.stderr));
            let golden = fixtures().join(format!("plans/{name}.{ext}"));
            if update {
                std::fs::write(&golden, &out.stdout).unwrap();
            } else if std::fs::read(&golden).ok().as_deref() != Some(&out.stdout[..]) {
                stale.push(golden.display().to_string());
            }
        }
    }
    assert!(stale.is_empty(), "plans differ from the golden files (rerun with UPDATE_GOLDEN=1 and review the diff): {stale:?}");
}

#[test]
fn version_names_the_revision_and_the_wire_protocol() {
    let out = ferryctl(&["--version"]);
    assert!(out.status.success());
    let v = text(&out.stdout);
    assert!(v.contains(&format!("revision {}", dataplane::REVISION)) && v.contains("wire protocol 2"), "{v}");
}

/// The completions and manual pages the package ships come from the CLI definitions:
/// every command is in them, ferryd's page included.
#[test]
fn completions_and_manual_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ferryctl(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for cmd in ["tune", "doctor", "send", "recv", "proxy", "status"] {
            assert!(script.contains(cmd), "{shell} completion lacks {cmd}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = ferryctl(&["manpages", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in ["ferryctl.1", "ferryctl-send.1", "ferryctl-bench-migrate.1", "ferryd.1"] {
        let roff = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(roff.starts_with(".ie") || roff.contains(".TH"), "{page} is not a manual page:\n{roff}");
    }
    let ferryd = std::fs::read_to_string(dir.path().join("ferryd.1")).unwrap();
    assert!(ferryd.contains("drain") && ferryd.contains("control"), "{ferryd}");
    assert_eq!(ferryctl(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn probe_this_machine() {
    let out = ferryctl(&["probe", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["cpus", "numa_nodes", "nics", "rdma_devices", "io_uring", "hugepages", "memlock_limit_bytes", "userfaultfd", "kernel"] {
        assert!(v.get(field).is_some(), "probe --json lacks {field}");
    }
    assert!(v["cpus"]["logical"].as_u64().unwrap() >= 1);
    // The table names every section.
    let out = ferryctl(&["probe"]);
    let t = text(&out.stdout);
    for s in ["CPUs:", "NUMA node", "NICs", "RDMA devices", "io_uring:", "hugepages:", "memlock:", "userfaultfd:"] {
        assert!(t.contains(s), "probe table lacks {s}:\n{t}");
    }
    // What probe writes, tune reads.
    let dir = tempfile::tempdir().unwrap();
    let caps = dir.path().join("caps.json");
    std::fs::write(&caps, ferryctl(&["probe", "--json"]).stdout).unwrap();
    let out = ferryctl(&["tune", "--caps", caps.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!plan["reasons"].as_array().unwrap().is_empty());
}

#[test]
fn probe_reads_a_captured_sysfs_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let w = |rel: &str, body: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    w("devices/system/cpu/online", "0-3\n");
    for cpu in 0..4 {
        w(&format!("devices/system/cpu/cpu{cpu}/topology/core_id"), &format!("{cpu}\n"));
        w(&format!("devices/system/cpu/cpu{cpu}/topology/physical_package_id"), &format!("{}\n", cpu / 2));
    }
    w("devices/system/node/node0/cpulist", "0-1\n");
    w("devices/system/node/node1/cpulist", "2-3\n");
    w("devices/system/node/node1/meminfo", "Node 1 MemTotal: 1048576 kB\n");
    w("class/net/ens9/speed", "25000\n");
    w("class/net/ens9/operstate", "up\n");
    w("class/net/ens9/mtu", "9000\n");
    w("pcidev/numa_node", "1\n");
    std::os::unix::fs::symlink(root.join("pcidev"), root.join("class/net/ens9/device")).unwrap();
    let out = ferryctl(&["probe", "--json", "--sysfs-root", root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["numa_nodes"].as_array().unwrap().len(), 2);
    assert_eq!(v["cpus"]["packages"], 2);
    assert_eq!(v["nics"][0]["numa_node"], 1);
    assert_eq!(v["nics"][0]["speed_mbps"], 25000);
    // The plan follows the NIC to node 1.
    let out = ferryctl(&["tune", "--json", "--sysfs-root", root.to_str().unwrap()]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["numa_node"], 1, "{plan}");
    assert_eq!(plan["link"]["speed_gbps"], 25.0);
}

#[test]
fn doctor_exit_codes_and_fixes() {
    // Blocking: 64 KiB memlock without CAP_IPC_LOCK.
    let caps = fixtures().join("caps/two-socket-nic-node1.json");
    let out = ferryctl(&["doctor", "--caps", caps.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let t = text(&out.stdout);
    assert!(t.contains("[FAIL] memlock") && t.contains("LimitMEMLOCK=infinity"), "{t}");
    assert!(t.contains("/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"), "{t}");
    let out = ferryctl(&["doctor", "--json", "--caps", caps.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blocking"], true);

    // Not blocking.
    let caps = fixtures().join("caps/connectx6dx-roce.json");
    let out = ferryctl(&["doctor", "--caps", caps.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    // Hugepages required but not reserved: blocking, with the command.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "ferry.toml", "[dataplane]\nhugepages = \"require\"\n");
    let caps = fixtures().join("caps/this-vm-2core-no-rdma.json");
    let out = ferryctl(&["doctor", "--caps", caps.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("echo 8 > /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"),
        "{}",
        text(&out.stdout)
    );

    // A config the machine cannot satisfy is a failed plan check, with its fix.
    let cfg = write(dir.path(), "rdma.toml", "[dataplane]\ntransport = \"rdma\"\n");
    let out = ferryctl(&["doctor", "--caps", caps.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("[FAIL] plan"), "{}", text(&out.stdout));

    // NIC on node 1, CPUs pinned on node 0: a warning with the config line.
    let cfg = write(dir.path(), "cpus.toml", "[dataplane]\ncpus = [1, 2]\n");
    let caps = fixtures().join("caps/two-socket-nic-node1.json");
    let out = ferryctl(&["doctor", "--caps", caps.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    let t = text(&out.stdout);
    assert!(t.contains("[warn] numa") && t.contains("cpus = [16, 17"), "{t}");
}

#[test]
fn doctor_on_this_machine_runs() {
    let out = ferryctl(&["doctor", "--json"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["checks"].as_array().unwrap().len() >= 6);
}

#[test]
fn bad_input_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let caps = fixtures().join("caps/this-vm-2core-no-rdma.json");
    let caps = caps.to_str().unwrap();
    let cases = [
        ("[rdma]\nsq_depth = 128\nsq_dept = 64\n", "unknown field `sq_dept`", "line 3"),
        ("[dataplane]\nchunk_size_kib = 0\n", "between 4 and 65536", "line 2"),
        ("[tcp]\nsend_zc = \"maybe\"\n", "maybe", "line 2"),
        ("[nonsense]\n", "unknown field `nonsense`", "line 1"),
        ("[dataplane\n", "TOML parse error", "line 1"),
    ];
    for (i, (body, what, line)) in cases.iter().enumerate() {
        let cfg = write(dir.path(), &format!("c{i}.toml"), body);
        let out = ferryctl(&["tune", "--caps", caps, "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{body}");
        let e = text(&out.stderr);
        assert!(e.contains(what) && e.contains(line) && e.contains("c"), "{body}: {e}");
    }
    // A config this machine cannot satisfy.
    let cfg = write(dir.path(), "pin.toml", "[rdma]\ndevice = \"mlx5_0\"\n");
    let out = ferryctl(&["tune", "--caps", caps, "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("rdma.device = \"mlx5_0\": no such RDMA device"), "{}", text(&out.stderr));
    // With --json, the failure is data on stdout too, with the exit status.
    let out = ferryctl(&["tune", "--caps", caps, "--config", cfg.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    assert_eq!((v["ok"].as_bool(), v["exit_status"].as_u64()), (Some(false), Some(2)), "{v}");
    assert!(v["error"].as_str().unwrap().contains("no such RDMA device"), "{v}");

    // ferryctl migrate and stream open: input that cannot work is refused before anything
    // starts (no ferryd is reached: the socket does not exist).
    for (args, says) in [
        (&["migrate", "vm1", "qemu:///system", "--ferryd", "/nonexistent.sock"][..], "names no host: give --to"),
        (&["migrate", "vm1", "qemu+ssh://dst/system", "--ferryd", "/nonexistent.sock", "--", "--tunnelled"][..], "--tunnelled"),
        (&["migrate", "vm1", "qemu+ssh://dst/system", "--", "--migrateuri", "tcp://x:1"][..], "--migrateuri"),
        (&["stream", "open", "--ferryd", "/nonexistent.sock"][..], "give --to HOST:PORT"),
    ] {
        let out = ferryctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: {}", text(&out.stderr));
    }

    // Malformed capabilities files.
    let good = std::fs::read_to_string(caps).unwrap();
    let bad_field = good.replacen("\"hostname\"", "\"hostnme\"", 1);
    let truncated = &good[..good.len() / 2];
    let wrong_type = good.replacen("\"cap_ipc_lock\": true", "\"cap_ipc_lock\": \"yes\"", 1);
    let old_schema = good.replacen("\"schema_version\": 1", "\"schema_version\": 99", 1);
    for (name, body, what) in [
        ("field.json", bad_field.as_str(), "unknown field `hostnme`"),
        ("trunc.json", truncated, "EOF while parsing"),
        ("type.json", wrong_type.as_str(), "invalid type"),
        ("schema.json", old_schema.as_str(), "schema_version 99"),
    ] {
        let f = write(dir.path(), name, body);
        let out = ferryctl(&["tune", "--caps", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        let e = text(&out.stderr);
        assert!(e.contains(what) && e.contains(name), "{name}: {e}");
        if name != "schema.json" {
            assert!(e.contains("line"), "{name}: {e}");
        }
    }
    let out = ferryctl(&["tune", "--caps", "/nonexistent/caps.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read capabilities file /nonexistent/caps.json"));
}

#[test]
fn documented_example_config_parses_and_plans() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ferry.toml");
    let caps = fixtures().join("caps/connectx6dx-roce.json");
    let out = ferryctl(&["tune", "--caps", caps.to_str().unwrap(), "--config", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
