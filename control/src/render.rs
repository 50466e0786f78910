//! Human-readable renderings of the capabilities report, the plan and the doctor report.

use std::fmt::Write;

use dataplane::plan::Plan;
use hw::caps::{Capabilities, GidType};

use crate::doctor::{Report, Status};

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn yn(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub fn probe(c: &Capabilities) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "host {}, kernel {}", c.hostname, c.kernel.release);
    let _ =
        writeln!(s, "CPUs: {} logical, {} cores, {} package(s) (from {})", c.cpus.logical, c.cpus.cores, c.cpus.packages, c.cpus.source);
    for n in &c.numa_nodes {
        let cores: Vec<String> = n.cores.iter().map(|pus| format!("{pus:?}")).collect();
        let _ = writeln!(s, "NUMA node {}: {}, {} core(s): {}", n.id, gib(n.memory_bytes), n.cores.len(), cores.join(" "));
    }
    let _ = writeln!(s, "\nNICs");
    let _ = writeln!(s, "  {:<16} {:<12} {:<13} {:>4} {:>12} {:>6} {:<8} RDMA", "NAME", "DRIVER", "PCI", "NODE", "SPEED", "MTU", "STATE");
    for n in &c.nics {
        let _ = writeln!(
            s,
            "  {:<16} {:<12} {:<13} {:>4} {:>12} {:>6} {:<8} {}",
            n.name,
            opt(n.driver.as_ref()),
            opt(n.pci_address.as_ref()),
            opt(n.numa_node),
            n.speed_mbps.map_or("-".into(), |m| format!("{m} Mb/s")),
            opt(n.mtu),
            n.state,
            opt(n.rdma_device.as_ref())
        );
    }
    rdma_devices(&mut s, c);
    memory_and_kernel(&mut s, c);
    s
}

/// `probe`'s RDMA devices: limits, notes, ports and GIDs.
fn rdma_devices(s: &mut String, c: &Capabilities) {
    let _ = writeln!(s, "\nRDMA devices");
    if c.rdma_devices.is_empty() {
        let _ = writeln!(s, "  none: {}", c.rdma_unavailable_reason.as_deref().unwrap_or("-"));
    }
    for d in &c.rdma_devices {
        let a = &d.attrs;
        let _ = writeln!(
            s,
            "  {} (driver {}, fw {}, vendor {:#x} part {}, node {}, guid {})",
            d.name,
            opt(d.driver.as_ref()),
            d.fw_ver,
            d.vendor_id,
            d.vendor_part_id,
            opt(d.numa_node),
            d.node_guid
        );
        let _ = writeln!(
            s,
            "    max_qp {}  max_qp_wr {}  max_sge {}  max_sge_rd {}  max_cq {}  max_cqe {}\n    max_mr {}  max_mr_size {:#x}  max_pd {}  max_qp_rd_atom {}  max_qp_init_rd_atom {}  max_inline_data {}",
            a.max_qp,
            a.max_qp_wr,
            a.max_sge,
            a.max_sge_rd,
            a.max_cq,
            a.max_cqe,
            a.max_mr,
            a.max_mr_size,
            a.max_pd,
            a.max_qp_rd_atom,
            a.max_qp_init_rd_atom,
            d.max_inline_data.map_or("not probed".into(), |v| format!("{v} B"))
        );
        for note in &d.notes {
            let _ = writeln!(s, "    note: {note}");
        }
        for p in &d.ports {
            let _ = writeln!(
                s,
                "    port {}: {:?}, {:?}, {}x {} = {} Gb/s, MTU {} (max {}), LID {}",
                p.port, p.state, p.link_layer, p.active_width, p.active_speed, p.rate_gbps, p.active_mtu, p.max_mtu, p.lid
            );
            for g in &p.gids {
                let t = match g.gid_type {
                    GidType::Ib => "IB",
                    GidType::RoceV1 => "RoCE v1",
                    GidType::RoceV2 => "RoCE v2",
                };
                let _ = writeln!(s, "      GID {:<3} {}  {:<8} {}", g.index, g.gid, t, opt(g.netdev.as_ref()));
            }
        }
    }
}

/// `probe`'s io_uring, hugepages, memlock and userfaultfd.
fn memory_and_kernel(s: &mut String, c: &Capabilities) {
    let u = &c.io_uring;
    let _ = writeln!(
        s,
        "\nio_uring: {}",
        if u.available { "available".to_string() } else { format!("unavailable: {}", u.reason.as_deref().unwrap_or("?")) }
    );
    if u.available {
        let _ = writeln!(
            s,
            "  SEND_ZC {}, SENDMSG_ZC {}, multishot receive {}, provided-buffer rings {}, fixed buffers {}\n  opcodes: {}",
            yn(u.send_zc),
            yn(u.sendmsg_zc),
            yn(u.recv_multishot),
            yn(u.provided_buffer_rings),
            yn(u.fixed_buffers),
            u.opcodes.join(" ")
        );
    }
    let _ = writeln!(s, "  kernel.io_uring_disabled = {}", opt(u.disabled_sysctl));
    let _ = writeln!(s, "\nhugepages: THP {}", opt(c.hugepages.thp_mode.as_ref()));
    for p in &c.hugepages.pools {
        let nodes: Vec<String> = p.per_node.iter().map(|n| format!("node{} {}/{}", n.node, n.free, n.total)).collect();
        let _ = writeln!(
            s,
            "  {} kB pages: {} free of {} ({})",
            p.size_kib,
            p.free,
            p.total,
            if nodes.is_empty() { "-".into() } else { nodes.join(", ") }
        );
    }
    let _ = writeln!(
        s,
        "memlock: {} (CAP_IPC_LOCK {})",
        c.memlock_limit_bytes.map_or("unlimited".into(), |b| format!("{} KiB", b / 1024)),
        yn(c.cap_ipc_lock)
    );
    let f = &c.userfaultfd;
    let _ = writeln!(
        s,
        "userfaultfd: {}{}",
        if f.available {
            format!("available, write-protect {}, shmem/hugetlbfs write-protect {}", yn(f.write_protect), yn(f.write_protect_shmem))
        } else {
            format!("unavailable: {}", f.reason.as_deref().unwrap_or("?"))
        },
        f.unprivileged_sysctl.map_or(String::new(), |v| format!(" (vm.unprivileged_userfaultfd = {v})"))
    );
}

pub fn plan(p: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plan for {}: transport {}, {} worker(s) on NUMA node {}, chunk {} KiB, arena {} MiB per worker, compression {}",
        p.host,
        p.transport,
        p.worker_cpus.len(),
        p.numa_node,
        p.chunk_size_bytes / 1024,
        p.arena.bytes_per_worker >> 20,
        p.compression
    );
    if let Some(r) = &p.rdma {
        let _ = writeln!(
            s,
            "rdma: {} port {}, {} QP(s)/worker, sq {} rq {} cq {}, send_sge {}, inline {} B",
            r.device, r.port, r.qps_per_worker, r.sq_depth, r.rq_depth, r.cq_depth, r.send_sge, r.inline_threshold_bytes
        );
    }
    let _ = writeln!(s, "\ndecisions:");
    for r in &p.reasons {
        let _ = writeln!(s, "  {} = {}\n      {}", r.decision, r.value, r.because);
    }
    s
}

pub fn doctor(r: &Report) -> String {
    let mut s = String::new();
    let fails = r.checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = r.checks.iter().filter(|c| c.status == Status::Warn).count();
    let _ = writeln!(s, "ferry doctor: {} checks, {fails} failed, {warns} warning(s)", r.checks.len());
    for c in &r.checks {
        let tag = match c.status {
            Status::Ok => " ok ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(s, "  [{tag}] {}: {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            let _ = writeln!(s, "         fix: {fix}");
        }
    }
    if r.blocking {
        let _ = writeln!(s, "the plan cannot run until the failed checks are fixed");
    }
    s
}

/// `ferryctl status` from ferryd's status reply.
/// Bytes in MiB below a GiB, else GiB.
fn size(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.2} GiB", bytes as f64 / f64::from(1 << 30))
    }
}

/// One running session: its round, that round's progress against its total, the rate and
/// the round's ETA.
pub fn session_progress(p: &dataplane::live::Progress) -> String {
    let round = p.round.map_or_else(String::new, |r| format!("round {r}, "));
    let moved = match p.round_total_bytes {
        Some(t) => format!("{} of {}", size(p.round_bytes), size(t)),
        None => size(p.round_bytes),
    };
    let eta = p.eta_seconds.map_or_else(String::new, |e| format!(", eta {e:.1} s"));
    let of = if p.size_bytes > 0 { format!(", size {}", size(p.size_bytes)) } else { String::new() };
    format!(
        "running {} {}: {round}{moved}, {:.2} GB/s{eta} ({} moved in {:.1} s{of})",
        p.role,
        p.session,
        p.bytes_per_second / 1e9,
        size(p.bytes),
        p.seconds
    )
}

pub fn status(v: &dataplane::protocol::Status) -> String {
    let st = &v.status;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ferryd up {:.0} s: transport {}, {} worker(s), compression {}",
        st.uptime_seconds, v.plan.transport, v.plan.workers, v.plan.compression
    );
    let pool = &v.pool;
    let _ = writeln!(
        s,
        "  pool: sending threads on CPUs {:?}, {} chunk(s) of {} KiB each, holding {:?} round(s); receiving threads hold {:?} lane(s) or poller(s)",
        pool.cpus,
        pool.chunks_per_worker,
        pool.chunk_bytes >> 10,
        pool.sending,
        pool.receiving
    );
    for p in &st.progress {
        let _ = writeln!(s, "  {}", session_progress(p));
    }
    for a in &st.active {
        let _ = writeln!(s, "  active {}: {}", a.role, a.count);
    }
    for x in &st.sessions {
        let _ = writeln!(s, "  sessions {} {}: {}", x.role, x.result, x.count);
    }
    for (role, bytes) in st.region_bytes.iter().filter(|(_, b)| **b > 0) {
        let _ = writeln!(s, "  {role}: region bytes {bytes}  wire bytes {}", st.wire_bytes.get(role).copied().unwrap_or(0));
    }
    let _ = writeln!(s, "  zero pages {}", st.zero_pages);
    let l = &st.chunk_latency_us;
    let _ = writeln!(s, "  chunk send latency us: p50 {} p95 {} p99 {} max {}", l.p50, l.p95, l.p99, l.max);
    for w in &st.worker_latency_us {
        let l = &w.latency_us;
        let what = if w.role == "send" { "chunk send" } else { "frame write" };
        let _ = writeln!(s, "  {} worker {} {what} latency us: p50 {} p95 {} p99 {} max {}", w.role, w.worker, l.p50, l.p95, l.p99, l.max);
    }
    for w in &st.workers {
        let c = &w.counters;
        let _ = writeln!(
            s,
            "  {} worker {}: region bytes {}  wire bytes {}  frames {}  zero pages {}",
            w.role, w.worker, c.region_bytes, c.wire_bytes, c.frames, c.zero_pages
        );
    }
    if let Some(e) = &st.last_error {
        let _ = writeln!(s, "  last error: {e}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_workers_and_their_latency() {
        let v = serde_json::json!({
            "draining": false,
            "pool": {"cpus": [0, 1], "chunk_bytes": 262144, "chunks_per_worker": 64, "receiving": [2, 0], "sending": [1, 0]},
            "plan": {"transport": "tcp (io_uring)", "workers": 2, "compression": "off"},
            "status": {
                "uptime_seconds": 5.0,
                "active": [], "sessions": [{"role": "recv", "result": "ok", "count": 1}],
                "region_bytes": {"recv": 100}, "wire_bytes": {"recv": 80}, "zero_pages": 3,
                "chunk_latency_us": {"p50": 0, "p95": 0, "p99": 0, "max": 0},
                "worker_latency_us": [{"role": "recv", "worker": 1, "latency_us": {"p50": 12, "p95": 30, "p99": 41, "max": 90}}],
                "workers": [{"role": "recv", "worker": 1, "counters": {"region_bytes": 100, "wire_bytes": 80, "frames": 4, "zero_pages": 3}}],
            }
        });
        let s = status(&serde_json::from_value(v).unwrap());
        assert!(s.contains("  recv: region bytes 100  wire bytes 80\n  zero pages 3\n"), "{s}");
        assert!(
            s.contains(
                "pool: sending threads on CPUs [0, 1], 64 chunk(s) of 256 KiB each, holding [1, 0] round(s); receiving threads hold [2, 0]"
            ),
            "{s}"
        );
        assert!(s.contains("recv worker 1 frame write latency us: p50 12 p95 30 p99 41 max 90"), "{s}");
        assert!(s.contains("recv worker 1: region bytes 100  wire bytes 80  frames 4  zero pages 3"), "{s}");
    }

    /// A running migration's line: its round against the round's total, the rate, the
    /// ETA; a receive whose size is known but not its rounds.
    #[test]
    fn session_progress_lines() {
        let p = serde_json::json!({"role": "migrate_out", "session": "00000000000000ab", "seconds": 12.34, "size_bytes": 8u64 << 30,
            "round": 3, "bytes": 9u64 << 30, "round_bytes": 412u64 << 20, "round_total_bytes": 1u64 << 30,
            "bytes_per_second": 1.2e9, "eta_seconds": 0.5});
        assert_eq!(
            session_progress(&serde_json::from_value(p).unwrap()),
            "running migrate_out 00000000000000ab: round 3, 412.0 MiB of 1.00 GiB, 1.20 GB/s, eta 0.5 s (9.00 GiB moved in 12.3 s, size 8.00 GiB)"
        );
        let p = serde_json::json!({"role": "migrate_in", "session": "01", "seconds": 2.0, "size_bytes": 0, "round": null,
            "bytes": 3u64 << 20, "round_bytes": 3u64 << 20, "round_total_bytes": null, "bytes_per_second": 1.5e6, "eta_seconds": null});
        assert_eq!(
            session_progress(&serde_json::from_value(p).unwrap()),
            "running migrate_in 01: 3.0 MiB, 0.00 GB/s (3.0 MiB moved in 2.0 s)"
        );
    }
}
