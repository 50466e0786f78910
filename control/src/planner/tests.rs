use dataplane::plan::{ArenaBacking, Compression, Plan, Transport};
use hw::caps::{Capabilities, GidType, LinkLayer, PortState};
use proptest::prelude::*;

use super::*;
use crate::config::{Config, Int, Setting};

fn fixture(name: &str) -> Capabilities {
    let path = format!("{}/tests/fixtures/caps/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn cfg(toml: &str) -> Config {
    Config::parse(toml).unwrap()
}

/// Every limit the plan must respect, for any capabilities.
fn assert_within_limits(caps: &Capabilities, plan: &Plan) {
    plan.check().unwrap();
    let all_cpus: Vec<u32> = caps.numa_nodes.iter().flat_map(|n| n.cpus()).collect();
    assert!(!plan.worker_cpus.is_empty());
    for c in &plan.worker_cpus {
        assert!(all_cpus.contains(c), "worker CPU {c} does not exist");
    }
    assert!(plan.worker_cpus.len() <= caps.cpus.cores.max(1) as usize);
    assert_eq!(plan.chunk_size_bytes % 4096, 0);
    assert!(plan.arena.bytes_per_worker >= plan.chunk_size_bytes);
    if let Some(r) = &plan.rdma {
        let dev = caps.rdma_devices.iter().find(|d| d.name == r.device).unwrap();
        let a = &dev.attrs;
        assert!(r.sq_depth >= 1 && r.sq_depth <= a.max_qp_wr, "sq {} > max_qp_wr {}", r.sq_depth, a.max_qp_wr);
        assert!(r.rq_depth >= 1 && r.rq_depth <= a.max_qp_wr);
        assert!(r.cq_depth <= a.max_cqe, "cq {} > max_cqe {}", r.cq_depth, a.max_cqe);
        assert!(u64::from(r.cq_depth) >= u64::from(r.qps_per_worker) * u64::from(r.sq_depth + r.rq_depth));
        assert!(r.send_sge >= 1 && r.send_sge <= a.max_sge);
        assert!(r.recv_sge >= 1 && r.recv_sge <= a.max_sge);
        assert!(r.inline_threshold_bytes <= dev.max_inline_data.unwrap_or(0));
        assert!(u64::from(r.qps_per_worker) * plan.worker_cpus.len() as u64 <= u64::from(a.max_qp));
        assert!(plan.chunk_size_bytes <= a.max_mr_size);
        assert!(r.signal_interval >= 1 && r.signal_interval <= r.sq_depth);
        let port = dev.ports.iter().find(|p| p.port == r.port).unwrap();
        assert_eq!(port.state, PortState::Active);
        assert_eq!(r.mtu, port.active_mtu);
    }
    // Every decision has a reason.
    assert!(plan.reasons.iter().all(|r| !r.because.is_empty()));
    for d in ["transport", "workers", "chunk_size", "arena per worker", "arena backing", "compression"] {
        assert!(plan.reasons.iter().any(|r| r.decision == d), "no reason for {d}");
    }
}

#[test]
fn every_fixture_plans_within_limits() {
    for f in [
        "connectx5-edr-ib",
        "connectx6dx-roce",
        "connectx7-ndr-ib",
        "e810-irdma-roce",
        "softroce-rxe-virtio",
        "this-vm-2core-no-rdma",
        "two-socket-nic-node1",
    ] {
        let caps = fixture(f);
        let p = plan(&caps, &Config::default()).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_within_limits(&caps, &p);
    }
}

#[test]
fn ladder_rdma_then_uring_then_sockets() {
    let mut caps = fixture("connectx6dx-roce");
    assert_eq!(plan(&caps, &Config::default()).unwrap().transport, Transport::Rdma);
    caps.rdma_devices[0].ports[0].state = PortState::Down;
    let p = plan(&caps, &Config::default()).unwrap();
    assert_eq!(p.transport, Transport::Tcp);
    assert!(p.reasons[0].because.contains("is Down") || p.reasons.iter().any(|r| r.because.contains("port 1 is Down")), "{:?}", p.reasons);
    assert!(p.rdma.is_none());
    caps.io_uring.available = false;
    caps.io_uring.reason = Some("io_uring_setup was refused with EPERM: a seccomp profile blocks it".into());
    let p = plan(&caps, &Config::default()).unwrap();
    assert_eq!(p.transport, Transport::Sockets);
    assert!(!p.tcp.io_uring);
    let why = &p.reasons.iter().find(|r| r.decision == "transport").unwrap().because;
    assert!(why.contains("seccomp"), "{why}");
}

#[test]
fn forced_rungs() {
    let caps = fixture("connectx6dx-roce");
    assert_eq!(plan(&caps, &cfg("[dataplane]\ntransport = \"sockets\"")).unwrap().transport, Transport::Sockets);
    assert_eq!(plan(&caps, &cfg("[dataplane]\ntransport = \"tcp\"")).unwrap().transport, Transport::Tcp);
    let vm = fixture("this-vm-2core-no-rdma");
    let e = plan(&vm, &cfg("[dataplane]\ntransport = \"rdma\"")).unwrap_err();
    assert!(matches!(e, PlanError::RdmaUnavailable { .. }), "{e}");
    assert!(e.to_string().contains("ENOSYS"), "{e}");
    let mut blocked = vm.clone();
    blocked.io_uring.available = false;
    blocked.io_uring.reason = Some("io_uring is disabled system-wide (kernel.io_uring_disabled = 2)".into());
    let e = plan(&blocked, &cfg("[dataplane]\ntransport = \"tcp\"")).unwrap_err();
    assert!(e.to_string().contains("io_uring_disabled = 2"), "{e}");
}

#[test]
fn workers_sit_on_the_nic_node_and_keep_a_control_core() {
    let caps = fixture("two-socket-nic-node1");
    let p = plan(&caps, &Config::default()).unwrap();
    assert_eq!(p.numa_node, 1);
    let node1 = caps.numa_nodes[1].cpus();
    assert!(p.worker_cpus.iter().all(|c| node1.contains(c)), "{:?}", p.worker_cpus);
    assert_eq!(p.control_cpu, Some(16));
    assert!(!p.worker_cpus.contains(&16));
    // SMT siblings (CPU + 32) are never both used.
    assert!(p.worker_cpus.iter().all(|c| *c < 32));
    // The small VM keeps no core aside.
    let vm = plan(&fixture("this-vm-2core-no-rdma"), &Config::default()).unwrap();
    assert_eq!(vm.control_cpu, None);
}

#[test]
fn roce_picks_ipv4_roce_v2_gid_and_ib_uses_lid() {
    let p = plan(&fixture("connectx6dx-roce"), &Config::default()).unwrap();
    assert_eq!(p.rdma.as_ref().unwrap().gid_index, Some(3));
    let p = plan(&fixture("connectx5-edr-ib"), &Config::default()).unwrap();
    assert_eq!(p.rdma.as_ref().unwrap().gid_index, None);
    assert_eq!(p.rdma.as_ref().unwrap().link_layer, "InfiniBand");
}

#[test]
fn limits_of_small_devices_bind() {
    let p = plan(&fixture("e810-irdma-roce"), &Config::default()).unwrap();
    let r = p.rdma.unwrap();
    assert_eq!(r.send_sge, 13);
    assert_eq!(r.inline_threshold_bytes, 101);
    let mut caps = fixture("connectx6dx-roce");
    caps.rdma_devices[0].attrs.max_cqe = 100;
    caps.rdma_devices[0].attrs.max_qp_wr = 64;
    let p = plan(&caps, &Config::default()).unwrap();
    assert_within_limits(&caps, &p);
    assert!(p.reasons.iter().any(|r| r.decision == "cq_depth" && r.because.contains("shrunk")), "{:?}", p.reasons);
}

#[test]
fn pinned_values_beyond_limits_are_errors() {
    let caps = fixture("e810-irdma-roce");
    let e = plan(&caps, &cfg("[rdma]\nsq_depth = 8192")).unwrap_err();
    assert_eq!(e.to_string(), "rdma.sq_depth = 8192: exceeds max_qp_wr 4063 of irdma0");
    let e = plan(&caps, &cfg("[rdma]\nsend_sge = 16")).unwrap_err();
    assert!(e.to_string().contains("max_sge 13"), "{e}");
    let e = plan(&caps, &cfg("[rdma]\ndevice = \"mlx5_9\"")).unwrap_err();
    assert!(e.to_string().contains("found: irdma0"), "{e}");
    let e = plan(&caps, &cfg("[rdma]\ncq_depth = 100\nsq_depth = 128\nrq_depth = 128")).unwrap_err();
    assert!(e.to_string().contains("overrun"), "{e}");
    let e = plan(&caps, &cfg("[dataplane]\ncpus = [0, 999]")).unwrap_err();
    assert!(e.to_string().contains("CPU 999 does not exist"), "{e}");
    let e = plan(&caps, &cfg("[dataplane]\nworkers = 500")).unwrap_err();
    assert!(e.to_string().contains("only"), "{e}");
    let e = plan(&caps, &cfg("[link]\ninterface = \"nope0\"")).unwrap_err();
    assert!(e.to_string().contains("no such network interface"), "{e}");
}

#[test]
fn pinned_values_are_used() {
    let caps = fixture("connectx6dx-roce");
    let p = plan(
        &caps,
        &cfg("[rdma]\nsq_depth = 512\nqps_per_worker = 2\n[dataplane]\ncpus = [4, 5]\nchunk_size_kib = 256\n[link]\nrtt_us = 50"),
    )
    .unwrap();
    let r = p.rdma.as_ref().unwrap();
    assert_eq!((r.sq_depth, r.qps_per_worker), (512, 2));
    assert_eq!(p.worker_cpus, vec![4, 5]);
    assert_eq!(p.chunk_size_bytes, 256 * 1024);
    assert_eq!(p.link.rtt_us, 50.0);
    assert_within_limits(&caps, &p);
}

#[test]
fn hugepage_ladder() {
    let mut caps = fixture("connectx6dx-roce");
    assert_eq!(plan(&caps, &Config::default()).unwrap().arena.backing, ArenaBacking::Hugetlb2m);
    caps.hugepages.pools[0].per_node[0].free = 0;
    assert_eq!(plan(&caps, &Config::default()).unwrap().arena.backing, ArenaBacking::Thp);
    caps.hugepages.thp_mode = Some("never".into());
    assert_eq!(plan(&caps, &Config::default()).unwrap().arena.backing, ArenaBacking::Normal);
    assert_eq!(plan(&caps, &cfg("[dataplane]\nhugepages = \"require\"")).unwrap().arena.backing, ArenaBacking::Hugetlb2m);
    assert_eq!(plan(&caps, &cfg("[dataplane]\nhugepages = \"off\"")).unwrap().arena.backing, ArenaBacking::Normal);
}

#[test]
fn compression_follows_link_speed() {
    let caps = fixture("this-vm-2core-no-rdma");
    let slow = plan(&caps, &cfg("[link]\nspeed_gbps = 1")).unwrap();
    assert_eq!(slow.compression, Compression::Adaptive { level: 1 });
    assert_eq!(slow.worker_cpus.len(), 2, "compression wants both cores on a slow link");
    let fast = plan(&fixture("connectx7-ndr-ib"), &Config::default()).unwrap();
    assert_eq!(fast.compression, Compression::Off);
    let forced = plan(&caps, &cfg("[migration]\ncompression = \"zstd:3\"")).unwrap();
    assert_eq!(forced.compression, Compression::Zstd { level: 3 });
}

fn set<const MIN: u64, const MAX: u64>(v: Option<u64>) -> Setting<Int<MIN, MAX>> {
    v.map_or(Setting::Auto, |v| Setting::Set(Int(v)))
}

fn arb_caps() -> impl Strategy<Value = Capabilities> {
    (
        (1u32..=4, 1usize..=64, any::<bool>()),
        (1u32..=1 << 20, 1u32..=1 << 16, 1u32..=64, 2u32..=1 << 22, 1u32..=1 << 16),
        (prop::option::of(0u32..=2048), prop::sample::select(vec![2.5f64, 10.0, 25.0, 56.0, 100.0, 200.0, 400.0, 800.0])),
        (any::<bool>(), 0u64..=100_000, prop::option::of(1u64..=400_000)),
        (1u64..=u64::MAX, prop::sample::select(vec![256u32, 1024, 4096])),
    )
        .prop_map(
            |(
                (nodes, cores, ib),
                (max_qp_wr, max_qp, max_sge, max_cqe, max_cq),
                (inline, rate),
                (rdma_up, hp_free, nic_speed),
                (max_mr, mtu),
            )| {
                let mut caps = fixture("connectx6dx-roce");
                caps.numa_nodes = (0..nodes)
                    .map(|n| hw::caps::NumaNode {
                        id: n,
                        cores: (0..cores as u32).map(|c| vec![n * cores as u32 + c]).collect(),
                        memory_bytes: 64 << 30,
                    })
                    .collect();
                caps.cpus.cores = nodes * cores as u32;
                caps.cpus.logical = caps.cpus.cores;
                let d = &mut caps.rdma_devices[0];
                d.numa_node = Some(nodes - 1);
                d.attrs.max_qp_wr = max_qp_wr;
                d.attrs.max_qp = max_qp;
                d.attrs.max_sge = max_sge;
                d.attrs.max_cqe = max_cqe;
                d.attrs.max_cq = max_cq;
                d.attrs.max_mr_size = max_mr;
                d.max_inline_data = inline;
                let port = &mut d.ports[0];
                port.rate_gbps = rate;
                port.active_mtu = mtu;
                port.state = if rdma_up { PortState::Active } else { PortState::Down };
                if ib {
                    port.link_layer = LinkLayer::InfiniBand;
                    port.gids.retain(|g| g.gid_type == GidType::Ib);
                }
                caps.hugepages.pools[0].per_node = vec![hw::caps::NodeHugepages { node: nodes - 1, total: hp_free, free: hp_free }];
                caps.nics[0].speed_mbps = nic_speed;
                caps.nics[0].numa_node = Some(nodes - 1);
                caps
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// With every value "auto", any machine gets a plan, and the plan never exceeds a
    /// device limit.
    #[test]
    fn auto_plans_never_exceed_device_limits(caps in arb_caps()) {
        let p = plan(&caps, &Config::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        assert_within_limits(&caps, &p);
    }

    /// Pinned values are either honoured within the limits or refused with an error.
    #[test]
    fn pinned_plans_are_within_limits_or_refused(
        caps in arb_caps(),
        sq in prop::option::of(1u64..=1 << 20),
        qps in prop::option::of(1u64..=64),
        sge in prop::option::of(1u64..=64),
        inline in prop::option::of(0u64..=4096),
        cq in prop::option::of(2u64..=1 << 24),
    ) {
        let mut cfg = Config::default();
        cfg.rdma.sq_depth = set(sq);
        cfg.rdma.qps_per_worker = set(qps);
        cfg.rdma.send_sge = set(sge);
        cfg.rdma.inline_threshold_bytes = set(inline);
        cfg.rdma.cq_depth = set(cq);
        if let Ok(p) = plan(&caps, &cfg) {
            assert_within_limits(&caps, &p);
        }
    }
}

#[test]
fn socket_buffers_follow_the_host_limits() {
    let mut caps = fixture("connectx6dx-roce");
    let cfg = cfg("[dataplane]\ntransport = \"tcp\"\n[link]\nrtt_us = 2000");
    // 100 Gb/s x 2 ms wants 2 x 25 MB: beyond autotuning's 4 MiB.
    caps.socket_limits = hw::caps::SocketLimits {
        wmem_max: Some(212_992),
        rmem_max: Some(212_992),
        tcp_wmem_max: Some(4 << 20),
        tcp_rmem_max: Some(6 << 20),
    };
    let p = plan(&caps, &cfg).unwrap();
    assert_eq!(p.tcp.socket_buffer_bytes, None, "a capped SO_SNDBUF would be worse than autotuning");
    assert_eq!(p.tcp.socket_buffer_needed_bytes, 64 << 20);
    let report = crate::doctor::doctor(&caps, &cfg, Ok(&p));
    let c = report.checks.iter().find(|c| c.name == "tcp buffers").unwrap();
    assert_eq!(c.status, crate::doctor::Status::Warn);
    assert!(c.fix.as_ref().unwrap().contains("net.core.wmem_max=67108864"), "{c:?}");
    // The host allows it: set.
    caps.socket_limits.wmem_max = Some(128 << 20);
    caps.socket_limits.rmem_max = Some(128 << 20);
    assert_eq!(plan(&caps, &cfg).unwrap().tcp.socket_buffer_bytes, Some(64 << 20));
    // A short RTT: autotuning is enough.
    let p = plan(&caps, &Config::default()).unwrap();
    assert_eq!(p.tcp.socket_buffer_bytes, None);
}
