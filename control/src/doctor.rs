//! Preflight checks: can this host run the plan? Each failing check says the exact command
//! or config line that fixes it. A `fail` blocks the plan; a `warn` degrades it.

use dataplane::plan::{ArenaBacking, Plan, Transport};
use hw::caps::{Capabilities, LinkLayer, PortState};
use serde::Serialize;

use crate::config::{Config, HugepagePolicy};
use crate::planner::PlanError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// The command or config line that fixes it.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when a check failed: the plan cannot run as is.
    pub blocking: bool,
    pub checks: Vec<Check>,
}

const MIB: u64 = 1 << 20;

fn check(name: &'static str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check { name, status, detail: detail.into(), fix }
}

/// Runs every check that applies. Without a plan (the config cannot be planned), the
/// plan's error is the first, failing, check and the host-wide checks still run.
pub fn doctor(caps: &Capabilities, cfg: &Config, plan: Result<&Plan, &PlanError>) -> Report {
    let mut checks = Vec::new();
    match plan {
        Ok(p) => {
            checks.push(check(
                "plan",
                Status::Ok,
                format!("transport {}, {} worker(s) on node {}", p.transport, p.worker_cpus.len(), p.numa_node),
                None,
            ));
            checks.push(hugepages(caps, cfg, p));
            checks.push(memlock(caps, p));
            checks.push(numa(caps, p));
            checks.push(link(p));
            checks.push(socket_buffers(caps, p));
        }
        Err(e) => checks.push(check("plan", Status::Fail, e.to_string(), Some(plan_fix(e)))),
    }
    checks.push(io_uring(caps, plan.ok()));
    checks.push(rdma(caps, plan.ok()));
    checks.push(userfaultfd(caps));
    Report { blocking: checks.iter().any(|c| c.status == Status::Fail), checks }
}

fn plan_fix(e: &PlanError) -> String {
    match e {
        PlanError::RdmaUnavailable { .. } => {
            "set `transport = \"auto\"` under [dataplane] to fall back to TCP, or bring an RDMA port up (see the rdma check)".into()
        }
        PlanError::IoUringUnavailable { .. } => {
            "set `transport = \"sockets\"` (or \"auto\") under [dataplane], or lift the io_uring block (see the io_uring check)".into()
        }
        PlanError::RdmaSetting { field, .. } => {
            format!("set `{field} = \"auto\"` under [rdma] or a value within the device's limits (`ferryctl probe` lists them)")
        }
        PlanError::Setting { field, .. } => {
            let (section, key) = field.split_once('.').unwrap_or(("dataplane", field));
            format!("set `{key} = \"auto\"` under [{section}] or a value this machine has (`ferryctl probe`)")
        }
    }
}

fn hugepages(caps: &Capabilities, cfg: &Config, p: &Plan) -> Check {
    let node = p.numa_node;
    let need = p.arena.hugepages_2m_needed;
    let pool = caps.hugepages.pool(2048);
    let free = pool.map_or(0, |pl| pl.free_on(node));
    let total_on_node = pool.map_or(0, |pl| pl.per_node.iter().find(|n| n.node == node).map_or(pl.total, |n| n.total));
    let fix = Some(format!(
        "echo {n} > /sys/devices/system/node/node{node}/hugepages/hugepages-2048kB/nr_hugepages   (at every boot: deploy/hugepages.sh {node} {n})",
        n = total_on_node + need.saturating_sub(free),
    ));
    let detail = format!("arenas need {need} x 2 MiB pages on node {node}; {free} free there");
    match (p.arena.backing, free >= need) {
        (ArenaBacking::Hugetlb2m, true) => check("hugepages", Status::Ok, detail, None),
        (ArenaBacking::Hugetlb2m, false) => check("hugepages", Status::Fail, format!("{detail} (dataplane.hugepages = \"require\")"), fix),
        (_, false) if cfg.dataplane.hugepages == HugepagePolicy::Auto => check(
            "hugepages",
            Status::Warn,
            format!(
                "{detail}: arenas fall back to {}",
                if p.arena.backing == ArenaBacking::Thp { "transparent hugepages" } else { "4 KiB pages" }
            ),
            fix,
        ),
        _ => check("hugepages", Status::Ok, format!("arenas use {:?} pages by config", p.arena.backing), None),
    }
}

fn memlock(caps: &Capabilities, p: &Plan) -> Check {
    let locked = p.worker_cpus.len() as u64 * p.arena.bytes_per_worker;
    let registers = p.transport == Transport::Rdma || p.tcp.io_uring;
    let fix = Some(
        "`ulimit -l unlimited` in the shell that starts ferryd, `LimitMEMLOCK=infinity` in its systemd unit (deploy/ferryd.service sets it), or `* - memlock unlimited` in /etc/security/limits.d/ferry.conf"
            .to_string(),
    );
    if !p.arena.mlock && !registers {
        return check("memlock", Status::Ok, "nothing is locked or registered", None);
    }
    if caps.cap_ipc_lock {
        return check("memlock", Status::Ok, format!("CAP_IPC_LOCK lifts RLIMIT_MEMLOCK; the plan locks {} MiB", locked / MIB), None);
    }
    match caps.memlock_limit_bytes {
        None => check("memlock", Status::Ok, format!("RLIMIT_MEMLOCK is unlimited; the plan locks {} MiB", locked / MIB), None),
        Some(limit) if limit < locked => check(
            "memlock",
            Status::Fail,
            format!(
                "RLIMIT_MEMLOCK is {} KiB but the plan locks and registers {} MiB of arenas ({} x {} MiB)",
                limit / 1024,
                locked / MIB,
                p.worker_cpus.len(),
                p.arena.bytes_per_worker / MIB
            ),
            fix,
        ),
        Some(limit) if p.transport == Transport::Rdma => check(
            "memlock",
            Status::Warn,
            format!(
                "RLIMIT_MEMLOCK is {} MiB: enough for the arenas, but RDMA also registers whole guest-memory regions, which this limit refuses beyond its size",
                limit / MIB
            ),
            fix,
        ),
        Some(limit) => {
            check("memlock", Status::Ok, format!("RLIMIT_MEMLOCK {} MiB covers the {} MiB the plan locks", limit / MIB, locked / MIB), None)
        }
    }
}

fn numa(caps: &Capabilities, p: &Plan) -> Check {
    let node_cpus: Vec<u32> = caps.numa_nodes.iter().find(|n| n.id == p.numa_node).map(|n| n.cpus()).unwrap_or_default();
    let firsts: Vec<u32> = caps
        .numa_nodes
        .iter()
        .find(|n| n.id == p.numa_node)
        .map(|n| n.cores.iter().filter_map(|c| c.first().copied()).collect())
        .unwrap_or_default();
    let off: Vec<u32> = p.worker_cpus.iter().copied().filter(|c| !node_cpus.contains(c)).collect();
    let nic_node = p
        .rdma
        .as_ref()
        .and_then(|r| caps.rdma_devices.iter().find(|d| d.name == r.device).and_then(|d| d.numa_node))
        .or_else(|| caps.nics.iter().find(|n| Some(&n.name) == p.link.interface.as_ref()).and_then(|n| n.numa_node));
    if let Some(nn) = nic_node.filter(|&nn| nn != p.numa_node) {
        return check(
            "numa",
            Status::Warn,
            format!(
                "the NIC is on node {nn} but the plan puts workers and arenas on node {}: every byte crosses the socket interconnect",
                p.numa_node
            ),
            Some("set `numa_node = \"auto\"` under [dataplane]".into()),
        );
    }
    if !off.is_empty() {
        return check(
            "numa",
            Status::Warn,
            format!("worker CPUs {off:?} are not on node {} where the NIC and arenas are", p.numa_node),
            Some(format!(
                "set `cpus = {firsts:?}` (one hardware thread per core of node {}, or a subset) under [dataplane], or `cpus = \"auto\"`",
                p.numa_node
            )),
        );
    }
    let nic = match nic_node {
        Some(n) => format!("NIC on node {n}"),
        None => "NIC on no NUMA node".into(),
    };
    check("numa", Status::Ok, format!("{nic}; workers {:?} and arenas on node {}", p.worker_cpus, p.numa_node), None)
}

fn link(p: &Plan) -> Check {
    if p.link.speed_assumed {
        return check(
            "link",
            Status::Warn,
            format!(
                "{} reports no link speed: the plan assumes {} Gb/s",
                p.link.interface.as_deref().unwrap_or("the interface"),
                p.link.speed_gbps
            ),
            Some("set `speed_gbps = <the real rate>` under [link]".into()),
        );
    }
    check("link", Status::Ok, format!("{} Gb/s on {}", p.link.speed_gbps, p.link.interface.as_deref().unwrap_or("?")), None)
}

fn socket_buffers(caps: &Capabilities, p: &Plan) -> Check {
    let need = p.tcp.socket_buffer_needed_bytes;
    let lim = &caps.socket_limits;
    match (p.tcp.socket_buffer_bytes, lim.wmem_max.zip(lim.rmem_max).map(|(w, r)| w.min(r))) {
        (Some(b), _) => check("tcp buffers", Status::Ok, format!("SO_SNDBUF/SO_RCVBUF set to {} KiB", b / 1024), None),
        (None, Some(cap)) if cap < need && lim.tcp_wmem_max.is_some_and(|a| a < need) => check(
            "tcp buffers",
            Status::Warn,
            format!(
                "the bandwidth-delay product wants {} KiB socket buffers; autotuning stops at {} KiB and net.core.wmem_max/rmem_max cap SO_SNDBUF at {} KiB",
                need / 1024,
                lim.tcp_wmem_max.unwrap_or(0) / 1024,
                cap / 1024
            ),
            Some(format!("sysctl -w net.core.wmem_max={need} net.core.rmem_max={need}   (persist in /etc/sysctl.d/90-ferry.conf)")),
        ),
        (None, _) => check("tcp buffers", Status::Ok, "TCP autotuning covers the bandwidth-delay product", None),
    }
}

fn io_uring(caps: &Capabilities, plan: Option<&Plan>) -> Check {
    let u = &caps.io_uring;
    if u.available {
        let yn = |b: bool| if b { "yes" } else { "no" };
        return check(
            "io_uring",
            Status::Ok,
            format!(
                "usable: SEND_ZC {}, multishot receive {}, provided-buffer rings {}, fixed buffers {}",
                yn(u.send_zc),
                yn(u.recv_multishot),
                yn(u.provided_buffer_rings),
                yn(u.fixed_buffers)
            ),
            None,
        );
    }
    let reason = u.reason.clone().unwrap_or_default();
    let fix = match u.blocked {
        Some(hw::caps::UringBlock::Sysctl) => "sysctl -w kernel.io_uring_disabled=0   (persist in /etc/sysctl.d/90-ferry.conf)".to_string(),
        Some(hw::caps::UringBlock::Seccomp) => {
            "run under ferry's seccomp profile, which allows io_uring (/usr/share/ferry/seccomp/ferry.json; podman/docker --security-opt seccomp=<it>; Kubernetes: the DaemonSet in deploy/ installs it)".into()
        }
        Some(hw::caps::UringBlock::Memlock) => "raise RLIMIT_MEMLOCK (LimitMEMLOCK=, or CAP_IPC_LOCK)".into(),
        _ => "use a kernel with io_uring (5.19 or later for SEND_ZC)".into(),
    };
    let falls_back = plan.is_some_and(|p| p.transport == Transport::Sockets);
    check("io_uring", Status::Warn, format!("{reason}{}", if falls_back { "; TCP uses plain sockets" } else { "" }), Some(fix))
}

fn rdma(caps: &Capabilities, plan: Option<&Plan>) -> Check {
    if let Some(r) = plan.and_then(|p| p.rdma.as_ref()) {
        return check("rdma", Status::Ok, format!("{} port {} in use", r.device, r.port), None);
    }
    if caps.rdma_devices.is_empty() {
        return check(
            "rdma",
            Status::Ok,
            format!("no RDMA devices ({}): TCP carries the data", caps.rdma_unavailable_reason.as_deref().unwrap_or("none found")),
            None,
        );
    }
    let mut down = Vec::new();
    let mut fixes = Vec::new();
    for d in &caps.rdma_devices {
        for port in d.ports.iter().filter(|p| !matches!(p.state, PortState::Active | PortState::ActiveDefer)) {
            down.push(format!("{} port {} is {:?}", d.name, port.port, port.state));
            let netdev = caps.nics.iter().find(|n| n.rdma_device.as_deref() == Some(&d.name)).map(|n| n.name.clone());
            fixes.push(match (port.link_layer, netdev) {
                (LinkLayer::Ethernet, Some(n)) => format!("ip link set {n} up"),
                (LinkLayer::Ethernet, None) => format!("bring the netdev of {} up (ip link set <netdev> up)", d.name),
                _ => format!("start a subnet manager for {} (systemctl start opensm) and check the cable", d.name),
            });
        }
    }
    if down.is_empty() {
        return check("rdma", Status::Ok, "RDMA ports are active but the config chose TCP", None);
    }
    check("rdma", Status::Warn, format!("{}: TCP carries the data", down.join(", ")), Some(fixes.join("; ")))
}

fn userfaultfd(caps: &Capabilities) -> Check {
    let u = &caps.userfaultfd;
    match (u.available, u.write_protect_shmem) {
        (true, true) => check("userfaultfd", Status::Ok, "available, with write-protect on shmem and hugetlbfs (memfd guest memory)", None),
        (true, false) => check(
            "userfaultfd",
            Status::Warn,
            "available, but without write-protect on shmem: dirty tracking of memfd guest memory must come from the VMM's bitmaps",
            Some("use a kernel of 5.19 or later (UFFD_FEATURE_WP_HUGETLBFS_SHMEM)".into()),
        ),
        (false, _) => check(
            "userfaultfd",
            Status::Warn,
            u.reason.clone().unwrap_or_else(|| "unavailable".into()),
            Some("sysctl -w vm.unprivileged_userfaultfd=1, or run ferryd as root (CAP_SYS_PTRACE)".into()),
        ),
    }
}
