//! Link, NUMA node, CPUs, compression, chunk size, TCP and arena decisions.
//!
//! The rates below are the assumptions the sizing rests on; where one was measured, the
//! comment says where (`../shared/tools/peers` has the scripts).

use dataplane::plan::{ArenaBacking, ArenaPlan, Compression, LinkPlan, RdmaPlan, TcpPlan, Transport};
use hw::caps::{Capabilities, LinkLayer, Nic};

use super::rdma::PortChoice;
use super::{PlanError, Reasons};
use crate::config::{CompressionChoice, Config, HugepagePolicy, Switch};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const HUGEPAGE: u64 = 2 * MIB;

/// Link speed assumed when the NIC reports none (virtio-net, loopback).
const ASSUMED_GBPS: f64 = 10.0;
/// zstd -1 compresses the guest-memory corpus at 306 MB/s per core with ratio 3.16
/// (`bench_compress.py`, 2026-11-22 on our 2-core machines).
const ZSTD1_BYTES_PER_SEC: f64 = 306e6;
const ZSTD1_RATIO: f64 = 3.16;
/// One TCP stream carried 21 Gb/s (2.64 GB/s) through iperf3 on loopback here; a worker
/// drives about that much TCP.
const TCP_GBPS_PER_CORE: f64 = 20.0;
/// A TCP worker does more than drive its stream: it copies, scans for zero pages,
/// checksums and hashes every page. One worker moved the 1 GiB corpus in 0.65-1.25 s here
/// (round 0 of `ferryctl bench migrate --compress off --config workers=1`, receiver on the
/// same 2 cores), so about 8 Gb/s.
const TCP_WORKER_GBPS: f64 = 8.0;
/// Posting one-sided writes costs the CPU little per byte, but zero-page detection reads
/// every page once: single-thread memcpy ran at 10.1 GB/s here (`bench_raw.py`), so a
/// worker scans about 80 Gb/s.
const RDMA_GBPS_PER_CORE: f64 = 80.0;
/// Cores from which one is kept for the control thread (and the OS).
const RESERVE_CONTROL_FROM: usize = 4;
/// Per-chunk cost (posting, completion, header) in microseconds, and the share of the
/// transfer time it may take. The costs are estimates, not measurements: they only pick
/// the power of two the chunk size is rounded to.
const RDMA_CHUNK_OVERHEAD_US: f64 = 0.5;
const TCP_CHUNK_OVERHEAD_US: f64 = 2.0;
const CHUNK_OVERHEAD_SHARE: f64 = 0.05;
/// Linux's default `tcp_wmem` maximum, assumed for autotuning when it was not probed.
const MIN_SOCKET_BUFFER: u64 = 4 * MIB;

fn pow2(v: u64) -> u64 {
    v.max(1).next_power_of_two()
}

/// The largest power of two not above `v` (`v` > 0).
fn floor_pow2(v: u64) -> u64 {
    1 << (63 - v.max(1).leading_zeros())
}

fn setting_err(field: &'static str, value: impl ToString, why: impl Into<String>) -> PlanError {
    PlanError::Setting { field, value: value.to_string(), why: why.into() }
}

/// The interface, speed and round-trip time the sizing uses.
pub(super) fn link(
    caps: &Capabilities,
    cfg: &Config,
    port: Option<&PortChoice>,
    transport: Transport,
    r: &mut Reasons,
) -> Result<LinkPlan, PlanError> {
    let iface: Option<&Nic> = match (cfg.link.interface.get(), port) {
        (Some(name), _) => Some(
            caps.nics
                .iter()
                .find(|n| n.name == name)
                .ok_or_else(|| setting_err("link.interface", format!("\"{name}\""), "no such network interface"))?,
        ),
        (None, Some(p)) => {
            let by_gid = p.gid.as_ref().and_then(|g| g.netdev.as_ref());
            caps.nics.iter().find(|n| Some(&n.name) == by_gid || n.rdma_device.as_deref() == Some(&p.device.name))
        }
        (None, None) => caps
            .nics
            .iter()
            .filter(|n| !n.is_virtual && n.state == "up")
            .max_by_key(|n| (n.speed_mbps.unwrap_or(0), std::cmp::Reverse(n.name.clone()))),
    };
    let iface_name = iface.map(|n| n.name.clone()).unwrap_or_else(|| "lo".into());
    r.add(
        "interface",
        &iface_name,
        match (cfg.link.interface.get(), port, iface) {
            (Some(_), _, _) => "pinned by config".to_string(),
            (None, Some(p), _) => format!("the netdev of {}", p.device.name),
            (None, None, Some(n)) => format!(
                "the fastest physical interface that is up ({})",
                n.speed_mbps.map_or("speed not reported".into(), |s| format!("{s} Mb/s"))
            ),
            (None, None, None) => "no physical interface is up: loopback only".into(),
        },
    );

    let (speed, assumed, why) = if let Some(g) = cfg.link.speed_gbps.value() {
        (g as f64, false, "pinned by config".to_string())
    } else if let Some(p) = port.filter(|p| p.port.rate_gbps > 0.0) {
        (p.port.rate_gbps, false, format!("{} port {} rate", p.device.name, p.port.port))
    } else if let Some(mbps) = iface.and_then(|n| n.speed_mbps) {
        (mbps as f64 / 1000.0, false, format!("{iface_name} reports {mbps} Mb/s"))
    } else {
        (
            ASSUMED_GBPS,
            true,
            format!(
                "{iface_name} reports no speed (virtio and loopback do not): assumed {ASSUMED_GBPS} Gb/s; pin [link] speed_gbps for a real figure"
            ),
        )
    };
    r.add("link speed", format!("{speed} Gb/s"), why);

    let (rtt, why) = match cfg.link.rtt_us.value() {
        Some(v) => (v as f64, "pinned by config".to_string()),
        None => match (transport, port.map(|p| p.port.link_layer)) {
            (Transport::Rdma, Some(LinkLayer::InfiniBand)) => (2.0, "assumed for InfiniBand: one switch hop and both HCAs".into()),
            (Transport::Rdma, _) => (5.0, "assumed for RoCE: one switch hop, both NICs and PFC headroom".into()),
            _ if iface.is_none() => (10.0, "loopback: sockperf measured a TCP ping-pong p50 of 8.1 us here".into()),
            _ => (25.0, "assumed for TCP across one datacenter switch through two kernel stacks".into()),
        },
    };
    r.add("rtt", format!("{rtt} us"), why);
    Ok(LinkPlan { interface: Some(iface_name), speed_gbps: speed, rtt_us: rtt, speed_assumed: assumed })
}

/// The NUMA node the workers and arenas live on: the NIC's.
pub(super) fn numa_node(
    caps: &Capabilities,
    cfg: &Config,
    port: Option<&PortChoice>,
    link: &LinkPlan,
    r: &mut Reasons,
) -> Result<u32, PlanError> {
    if let Some(n) = cfg.dataplane.numa_node.value() {
        let n = n as u32;
        if !caps.numa_nodes.iter().any(|x| x.id == n) {
            return Err(setting_err("dataplane.numa_node", n, "no such NUMA node"));
        }
        r.add("numa_node", n, "pinned by config");
        return Ok(n);
    }
    let nic_node = caps.nics.iter().find(|n| Some(&n.name) == link.interface.as_ref()).and_then(|n| n.numa_node);
    let (node, why) = match (port.and_then(|p| p.device.numa_node), nic_node) {
        (Some(n), _) => (
            n,
            format!(
                "{} sits on node {n}: workers and arenas next to it avoid crossing the socket interconnect",
                port.map_or("", |p| &p.device.name)
            ),
        ),
        (None, Some(n)) => (
            n,
            format!(
                "{} sits on node {n}: workers and arenas next to it avoid crossing the socket interconnect",
                link.interface.as_deref().unwrap_or("the NIC")
            ),
        ),
        (None, None) => {
            let best = caps.numa_nodes.iter().max_by_key(|n| (n.cores.len(), std::cmp::Reverse(n.id))).map_or(0, |n| n.id);
            (best, format!("the NIC reports no NUMA node (virtual device or one-node machine): node {best}, the one with the most cores"))
        }
    };
    r.add("numa_node", node, why);
    Ok(node)
}

/// CPUs the workers may use, in order, and the control thread's CPU.
#[derive(Debug)]
pub(super) struct Available {
    pub workers: Vec<u32>,
    pub control: Option<u32>,
    pinned: bool,
}

pub(super) fn candidate_cpus(caps: &Capabilities, cfg: &Config, node: u32, r: &mut Reasons) -> Result<Available, PlanError> {
    if let Some(cpus) = cfg.dataplane.cpus.get() {
        if cpus.is_empty() {
            return Err(setting_err("dataplane.cpus", "[]", "an empty list: give at least one CPU or \"auto\""));
        }
        let node_of = |c: u32| caps.numa_nodes.iter().find(|n| n.cpus().contains(&c)).map(|n| n.id);
        for &c in &cpus {
            match node_of(c) {
                None => return Err(setting_err("dataplane.cpus", format!("{cpus:?}"), format!("CPU {c} does not exist on this machine"))),
                Some(n) if n != node => r.add(
                    "cpu",
                    c,
                    format!("pinned by config, but on node {n} while the NIC is on node {node}: every access to the arena crosses sockets"),
                ),
                Some(_) => {}
            }
        }
        let mut uniq = cpus.clone();
        uniq.sort_unstable();
        uniq.dedup();
        if uniq.len() != cpus.len() {
            return Err(setting_err("dataplane.cpus", format!("{cpus:?}"), "lists a CPU twice: one worker per CPU"));
        }
        return Ok(Available { workers: cpus, control: None, pinned: true });
    }
    let mut cores: Vec<Vec<u32>> = caps.numa_nodes.iter().find(|n| n.id == node).map(|n| n.cores.clone()).unwrap_or_default();
    if cores.is_empty() {
        cores = caps.numa_nodes.iter().flat_map(|n| n.cores.clone()).collect();
        r.add("cpus", "all nodes", format!("node {node} has no CPUs (a memory-only node): workers may run anywhere"));
    }
    // One worker per physical core: SMT siblings share the core's load/store units and
    // caches, and memory copying saturates those.
    let firsts: Vec<u32> = cores.iter().filter_map(|c| c.first().copied()).collect();
    if firsts.len() >= RESERVE_CONTROL_FROM {
        Ok(Available { control: Some(firsts[0]), workers: firsts[1..].to_vec(), pinned: false })
    } else {
        Ok(Available { workers: firsts, control: None, pinned: false })
    }
}

/// How many workers, on which CPUs.
pub(super) fn workers(
    cfg: &Config,
    avail: &Available,
    transport: Transport,
    link: &LinkPlan,
    compression: Compression,
    max_qp: Option<u32>,
    r: &mut Reasons,
) -> Result<(Vec<u32>, Option<u32>), PlanError> {
    let n_avail = avail.workers.len();
    let n = if let Some(w) = cfg.dataplane.workers.value() {
        if w as usize > n_avail {
            return Err(setting_err(
                "dataplane.workers",
                w,
                format!("only {n_avail} CPU(s) are available to workers ({:?})", avail.workers),
            ));
        }
        r.add("workers", w, "pinned by config");
        w as usize
    } else if avail.pinned {
        r.add("workers", n_avail, "one per CPU pinned in dataplane.cpus");
        n_avail
    } else {
        let per_core = if transport == Transport::Rdma { RDMA_GBPS_PER_CORE } else { TCP_WORKER_GBPS };
        let for_link = (link.speed_gbps / per_core).ceil().max(1.0) as usize;
        let mut why = format!(
            "{} Gb/s at about {per_core} Gb/s per worker ({}) needs {for_link}",
            link.speed_gbps,
            if transport == Transport::Rdma {
                "zero-page scanning reads every page at memory speed"
            } else {
                "copying, zero-page scanning, checksums and page hashes, measured"
            }
        );
        let mut want = for_link;
        if compression != Compression::Off {
            // Keep the link full of compressed data.
            let bytes = link.speed_gbps * 1e9 / 8.0;
            let for_zstd = (bytes * ZSTD1_RATIO / ZSTD1_BYTES_PER_SEC).ceil() as usize;
            why += &format!(
                "; filling it with zstd -1 output ({ZSTD1_RATIO}x at {} MB/s per core) needs {for_zstd}",
                ZSTD1_BYTES_PER_SEC / 1e6
            );
            want = want.max(for_zstd);
        }
        let mut n = want.min(n_avail).max(1);
        if let Some(q) = max_qp.filter(|&q| (q as usize) < n) {
            n = (q as usize).max(1);
            why += &format!("; max_qp {q} allows only {n}");
        }
        why += &format!("; {n_avail} physical core(s) available on the node");
        r.add("workers", n, why);
        n
    };
    let cpus = avail.workers[..n].to_vec();
    r.add("worker_cpus", format!("{cpus:?}"), if avail.pinned { "pinned by config".to_string() } else { "the first hardware thread of each physical core on the NIC's node: SMT siblings share load/store units and caches, which copying saturates".into() });
    match avail.control {
        Some(c) => r.add(
            "control_cpu",
            c,
            format!("the node has at least {RESERVE_CONTROL_FROM} cores: the first is kept for the control thread and the OS's interrupts"),
        ),
        None => {
            r.add("control_cpu", "floating", "too few cores to keep one aside: the control thread is idle most of the time and shares them")
        }
    }
    Ok((cpus, avail.control))
}

/// The compression policy, from link speed against what the cores can compress.
pub(super) fn compression(cfg: &Config, link: &LinkPlan, max_workers: u32, r: &mut Reasons) -> Compression {
    match cfg.migration.compression {
        CompressionChoice::Off => {
            r.add("compression", "off", "forced by config");
            Compression::Off
        }
        CompressionChoice::Zstd(level) => {
            r.add("compression", format!("zstd:{level}"), "forced by config: every chunk, sent raw when it does not shrink");
            Compression::Zstd { level }
        }
        CompressionChoice::Auto => {
            let link_bytes = link.speed_gbps * 1e9 / 8.0;
            let zstd_bytes = f64::from(max_workers.max(1)) * ZSTD1_BYTES_PER_SEC;
            if link.speed_assumed {
                r.add(
                    "compression",
                    "adaptive zstd:1",
                    "the link speed is unknown (only assumed): each worker measures its link and its compression at run time and compresses only while that finishes sooner",
                );
                Compression::Adaptive { level: 1 }
            } else if zstd_bytes > link_bytes {
                r.add(
                    "compression",
                    "adaptive zstd:1",
                    format!(
                        "{max_workers} core(s) compress {:.2} GB/s with zstd -1, more than the link's {:.2} GB/s: compression can finish sooner; at run time it measures both and sends chunks that do not shrink raw",
                        zstd_bytes / 1e9,
                        link_bytes / 1e9
                    ),
                );
                Compression::Adaptive { level: 1 }
            } else {
                r.add(
                    "compression",
                    "off",
                    format!("the link's {:.2} GB/s is faster than {max_workers} core(s) compress with zstd -1 ({:.2} GB/s): compressing would slow the transfer", link_bytes / 1e9, zstd_bytes / 1e9),
                );
                Compression::Off
            }
        }
    }
}

/// Chunk size: large enough that per-chunk costs stay under 5% of the time on the wire.
pub(super) fn chunk_size(cfg: &Config, transport: Transport, link: &LinkPlan, port: Option<&PortChoice>, r: &mut Reasons) -> u64 {
    let max_mr = port.map_or(u64::MAX, |p| p.device.attrs.max_mr_size.max(4 * KIB));
    if let Some(kib) = cfg.dataplane.chunk_size_kib.value() {
        // Range-checked at parse; round to whole pages.
        let v = (kib * KIB).div_ceil(4 * KIB) * 4 * KIB;
        r.add("chunk_size", format!("{} KiB", v / KIB), "pinned by config (rounded up to whole 4 KiB pages)");
        return v.min(max_mr / (4 * KIB) * (4 * KIB));
    }
    let overhead_us = if transport == Transport::Rdma { RDMA_CHUNK_OVERHEAD_US } else { TCP_CHUNK_OVERHEAD_US };
    let bytes_per_us = link.speed_gbps * 1e3 / 8.0;
    let raw = (bytes_per_us * overhead_us / CHUNK_OVERHEAD_SHARE) as u64;
    let v = pow2(raw).clamp(64 * KIB, MIB).min(floor_pow2(max_mr));
    r.add(
        "chunk_size",
        format!("{} KiB", v / KIB),
        format!(
            "a chunk costs about {overhead_us} us of {}; at {} Gb/s, {} B keeps that under {}% of the wire time; rounded to a power of two within 64 KiB..1 MiB (larger chunks delay the last round's tail)",
            if transport == Transport::Rdma { "posting and completion" } else { "syscall and framing" },
            link.speed_gbps,
            raw,
            CHUNK_OVERHEAD_SHARE * 100.0
        ),
    );
    v
}

/// TCP: connections per worker, ring size, zero-copy send, socket buffers.
pub(super) fn tcp(
    caps: &Capabilities,
    cfg: &Config,
    transport: Transport,
    link: &LinkPlan,
    workers: u32,
    chunk: u64,
    r: &mut Reasons,
) -> Result<TcpPlan, PlanError> {
    let share = link.speed_gbps / f64::from(workers.max(1));
    let conns = match cfg.tcp.connections_per_worker.value() {
        Some(v) => {
            r.add("tcp.connections_per_worker", v, "pinned by config");
            v
        }
        None => {
            let v = ((share / TCP_GBPS_PER_CORE).ceil() as u64).clamp(1, 4);
            r.add("tcp.connections_per_worker", v, format!("each worker carries {share:.1} Gb/s; one TCP stream carried about {TCP_GBPS_PER_CORE} Gb/s here (iperf3 on loopback), so more streams only above that (at most 4)"));
            v
        }
    };
    let bdp = link.bdp_bytes();
    let needed = pow2(2 * bdp.max(chunk));
    let (sockbuf, autotune) = socket_buffer(caps, cfg, bdp, needed, r);
    let io_uring = transport == Transport::Tcp || (transport == Transport::Rdma && caps.io_uring.available);
    let entries = match cfg.tcp.ring_entries.value() {
        Some(v) => {
            r.add("tcp.ring_entries", v, "pinned by config");
            v
        }
        None => {
            let per_conn = sockbuf.unwrap_or(needed.max(autotune)).div_ceil(chunk) + 2;
            let v = pow2(conns * per_conn).clamp(64, 4096);
            r.add(
                "tcp.ring_entries",
                v,
                format!(
                    "{conns} connection(s) x ({} chunk sends to fill a socket buffer + a receive + a timeout), at least 64",
                    per_conn - 2
                ),
            );
            v
        }
    };
    let send_zc = send_zc(caps, cfg, link, io_uring, chunk, r)?;
    let u = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(TcpPlan {
        connections_per_worker: u(conns),
        io_uring,
        ring_entries: u(entries),
        send_zc,
        socket_buffer_bytes: sockbuf,
        socket_buffer_needed_bytes: needed,
    })
}

/// The socket buffer: TCP autotuning's, unless twice the larger of the bandwidth-delay
/// product (`bdp`) and a chunk (`needed`) is more and the kernel lets SO_SNDBUF set it.
/// Returns it (`None`: autotuning) and autotuning's ceiling.
fn socket_buffer(caps: &Capabilities, cfg: &Config, bdp: u64, needed: u64, r: &mut Reasons) -> (Option<u64>, u64) {
    let lim = &caps.socket_limits;
    let cap = lim.wmem_max.zip(lim.rmem_max).map(|(w, r)| w.min(r));
    let autotune = lim.tcp_wmem_max.zip(lim.tcp_rmem_max).map(|(w, r)| w.min(r)).unwrap_or(MIN_SOCKET_BUFFER);
    let sockbuf = match cfg.tcp.socket_buffer_kib.value() {
        Some(v) => {
            let capped = cap
                .filter(|&c| c < v * KIB)
                .map(|c| format!(" (the kernel caps it at net.core.wmem_max {} KiB)", c / KIB))
                .unwrap_or_default();
            r.add("tcp.socket_buffer", format!("{v} KiB"), format!("pinned by config{capped}"));
            Some(v * KIB)
        }
        None if needed <= autotune => {
            r.add("tcp.socket_buffer", "autotuning", format!("twice the larger of the bandwidth-delay product ({bdp} B) and a chunk is {} KiB; TCP autotuning grows buffers to {} KiB: left on (SO_SNDBUF would turn it off)", needed / KIB, autotune / KIB));
            None
        }
        None => match cap {
            Some(c) if needed <= c => {
                r.add("tcp.socket_buffer", format!("{} KiB", needed / KIB), format!("twice the larger of the bandwidth-delay product ({bdp} B) and a chunk, beyond autotuning's {} KiB; net.core.wmem_max {} KiB allows it", autotune / KIB, c / KIB));
                Some(needed)
            }
            Some(c) => {
                r.add("tcp.socket_buffer", "autotuning", format!("{} KiB would cover twice the bandwidth-delay product, but net.core.wmem_max/rmem_max cap SO_SNDBUF at {} KiB, below autotuning's {} KiB: autotuning kept; `ferryctl doctor` shows the sysctl", needed / KIB, c / KIB, autotune / KIB));
                None
            }
            None => {
                r.add(
                    "tcp.socket_buffer",
                    "autotuning",
                    format!(
                        "{} KiB would cover twice the bandwidth-delay product, but the socket limits were not probed: autotuning kept",
                        needed / KIB
                    ),
                );
                None
            }
        },
    };
    (sockbuf, autotune)
}

/// Whether workers send a chunk's frames with one zero-copy SENDMSG_ZC.
fn send_zc(caps: &Capabilities, cfg: &Config, link: &LinkPlan, io_uring: bool, chunk: u64, r: &mut Reasons) -> Result<bool, PlanError> {
    let zc_ok = caps.io_uring.send_zc && caps.io_uring.sendmsg_zc;
    Ok(match cfg.tcp.send_zc {
        Switch::On if !zc_ok => return Err(setting_err("tcp.send_zc", "\"on\"", "this kernel's io_uring has no SEND_ZC/SENDMSG_ZC")),
        Switch::On => {
            r.add("tcp.send_zc", "on", "forced by config");
            true
        }
        Switch::Off => {
            r.add("tcp.send_zc", "off", "forced by config");
            false
        }
        Switch::Auto => {
            let physical = caps
                .nics
                .iter()
                .any(|n| Some(&n.name) == link.interface.as_ref() && !n.is_virtual && n.driver.as_deref() != Some("virtio_net"));
            let on = io_uring && zc_ok && physical && !link.speed_assumed && link.speed_gbps >= 25.0 && chunk >= 64 * KIB;
            let because = if on {
                "SEND_ZC supported, a physical NIC of at least 25 Gb/s and chunks of 64 KiB or more: pinning pages costs less than copying them".to_string()
            } else if !zc_ok || !io_uring {
                "io_uring SEND_ZC/SENDMSG_ZC is not available here".into()
            } else if !physical {
                "not a physical NIC: on loopback the kernel copies zero-copy sends anyway (every notification said ZC_COPIED) and they ran slower; virtio-net reports no speed to justify it".into()
            } else {
                format!("at {} Gb/s a copy keeps up; zero-copy's page pinning and notifications only pay above 25 Gb/s", link.speed_gbps)
            };
            r.add("tcp.send_zc", if on { "on" } else { "off" }, because);
            on
        }
    })
}

/// Arena size per worker and its backing (the hugepage ladder), for `workers` workers on
/// `node` with chunks of `chunk` bytes, over the lanes already planned.
pub(super) fn arena(
    caps: &Capabilities,
    cfg: &Config,
    (node, workers, chunk): (u32, u32, u64),
    (link, rdma, tcp): (&LinkPlan, Option<&RdmaPlan>, &TcpPlan),
    r: &mut Reasons,
) -> Result<ArenaPlan, PlanError> {
    let bytes = match cfg.dataplane.arena_mib_per_worker.value() {
        Some(mib) if mib % 2 != 0 => {
            return Err(setting_err("dataplane.arena_mib_per_worker", mib, "must be a multiple of 2 (2 MiB hugepages)"));
        }
        Some(mib) => {
            r.add("arena per worker", format!("{mib} MiB"), "pinned by config");
            mib * MIB
        }
        None => {
            let (slots, what) = match rdma {
                Some(q) => {
                    let per_qp = (link.bdp_bytes().div_ceil(chunk) + 1).max(2);
                    (
                        u64::from(q.qps_per_worker) * per_qp,
                        format!("{} QP(s) x {per_qp} chunks to cover the bandwidth-delay product", q.qps_per_worker),
                    )
                }
                None => {
                    let per_conn = tcp.socket_buffer_bytes.unwrap_or(tcp.socket_buffer_needed_bytes).div_ceil(chunk) + 1;
                    (
                        u64::from(tcp.connections_per_worker) * per_conn,
                        format!("{} connection(s) x {per_conn} chunks to fill a socket buffer", tcp.connections_per_worker),
                    )
                }
            };
            let raw = 2 * slots * chunk;
            let v = raw.div_ceil(HUGEPAGE).max(1) * HUGEPAGE;
            let v = v.clamp(8 * MIB, 1024 * MIB);
            r.add("arena per worker", format!("{} MiB", v / MIB), format!("staging for {what}, double-buffered (one set on the wire while the next is encoded), in whole 2 MiB pages, within 8 MiB..1 GiB"));
            v
        }
    };
    let need = u64::from(workers) * bytes / HUGEPAGE;
    let pool = caps.hugepages.pool(2048);
    let free = pool.map_or(0, |p| p.free_on(node));
    let thp = matches!(caps.hugepages.thp_mode.as_deref(), Some("always" | "madvise"));
    let (backing, why) = match cfg.dataplane.hugepages {
        HugepagePolicy::Require => {
            (ArenaBacking::Hugetlb2m, format!("required by config: {need} x 2 MiB pages on node {node} ({free} free)"))
        }
        HugepagePolicy::Thp => (ArenaBacking::Thp, "forced by config (dataplane.hugepages = \"thp\")".into()),
        HugepagePolicy::Off => (ArenaBacking::Normal, "forced by config (dataplane.hugepages = \"off\")".into()),
        HugepagePolicy::Auto if free >= need => (
            ArenaBacking::Hugetlb2m,
            format!(
                "{free} free 2 MiB pages on node {node} cover the {need} the arenas need: no TLB misses, and fewer, larger memory-registration entries"
            ),
        ),
        HugepagePolicy::Auto if thp => (
            ArenaBacking::Thp,
            format!(
                "only {free} free 2 MiB pages on node {node}, {need} needed: transparent hugepages ({}) instead; `ferryctl doctor` shows how to reserve them",
                caps.hugepages.thp_mode.as_deref().unwrap_or("?")
            ),
        ),
        HugepagePolicy::Auto => (
            ArenaBacking::Normal,
            format!("only {free} free 2 MiB pages on node {node}, {need} needed, and THP is off: normal 4 KiB pages"),
        ),
    };
    r.add("arena backing", format!("{backing:?}").to_lowercase(), why);
    let mlock = cfg.dataplane.mlock;
    r.add(
        "mlock",
        mlock,
        if mlock {
            "arenas are locked so they are never swapped out or migrated while the NIC or the kernel may access them"
        } else {
            "disabled by config (dataplane.mlock = false)"
        },
    );
    Ok(ArenaPlan { bytes_per_worker: bytes, backing, hugepages_2m_needed: need, mlock })
}
