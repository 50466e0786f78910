//! RDMA decisions: which device, port and GID; queue depths, SGEs, inline, QPs per worker.

use dataplane::plan::{LinkPlan, RdmaPlan};
use hw::caps::{Capabilities, Gid, GidType, LinkLayer, PortState, RdmaDevice, RdmaPort};

use super::{PlanError, Reasons};
use crate::config::Config;

/// Dirty pages are scattered 4 KiB pages; in the worst case each is its own write.
const PAGE: u64 = 4096;
/// One signaled work request in this many: one CQE per 16 posts keeps completion work
/// small while a 128-deep send queue still has 8 signaled requests to reap in flight.
const SIGNAL_INTERVAL: u32 = 16;
/// perftest's default TX depth (128), taken as the floor. Not measured here: there is no
/// RDMA NIC on our machines.
const MIN_QUEUE_DEPTH: u64 = 128;
/// perftest's default inline size for RDMA WRITE on mlx5 (220 B), taken as the cap: past
/// some size, copying the payload into the WQE costs more than the NIC's DMA read. Where
/// that size lies on a given NIC is not measured here.
const INLINE_CAP: u32 = 220;
/// Assumed rate one RC QP sustains with 4 KiB writes; a worker's share of the link above
/// it is spread over more QPs (more NIC processing units, more outstanding reads).
const GBPS_PER_QP: f64 = 50.0;
const MAX_QPS_PER_WORKER: u32 = 4;

/// The device, port and GID the data plane will use.
#[derive(Debug, Clone)]
pub struct PortChoice {
    pub device: RdmaDevice,
    pub port: RdmaPort,
    pub gid: Option<Gid>,
}

/// Why no port is usable, for the transport ladder's reason.
pub(super) fn why_no_port(caps: &Capabilities) -> String {
    if caps.rdma_devices.is_empty() {
        return caps.rdma_unavailable_reason.clone().unwrap_or_else(|| "no RDMA devices".into());
    }
    let ports: Vec<String> = caps
        .rdma_devices
        .iter()
        .flat_map(|d| d.ports.iter().map(move |p| format!("{} port {} is {:?}", d.name, p.port, p.state)))
        .collect();
    ports.join(", ")
}

/// Limits below which an RC QP with one send and one receive slot cannot be built.
fn too_small(d: &RdmaDevice) -> Option<String> {
    let a = &d.attrs;
    (a.max_qp < 1 || a.max_qp_wr < 1 || a.max_sge < 1 || a.max_cqe < 2 || a.max_cq < 1).then(|| {
        format!(
            "{} limits too small for an RC QP (max_qp {}, max_qp_wr {}, max_sge {}, max_cqe {})",
            d.name, a.max_qp, a.max_qp_wr, a.max_sge, a.max_cqe
        )
    })
}

/// Picks the fastest active port (honouring `rdma.device`, `rdma.port`, `rdma.gid_index`).
pub(super) fn choose_port(caps: &Capabilities, cfg: &Config, r: &mut Reasons) -> Result<Option<PortChoice>, PlanError> {
    let want_dev = cfg.rdma.device.get();
    let want_port = cfg.rdma.port.value();
    if let Some(name) = &want_dev
        && !caps.rdma_devices.iter().any(|d| &d.name == name)
    {
        let found: Vec<&str> = caps.rdma_devices.iter().map(|d| d.name.as_str()).collect();
        return Err(PlanError::RdmaSetting {
            field: "device",
            value: format!("\"{name}\""),
            why: format!("no such RDMA device (found: {})", if found.is_empty() { "none".into() } else { found.join(", ") }),
        });
    }
    let mut best: Option<PortChoice> = None;
    for dev in &caps.rdma_devices {
        if want_dev.as_ref().is_some_and(|w| w != &dev.name) {
            continue;
        }
        if let Some(why) = too_small(dev) {
            r.add("rdma device", &dev.name, format!("skipped: {why}"));
            continue;
        }
        for port in &dev.ports {
            if want_port.is_some_and(|p| p != u64::from(port.port)) {
                continue;
            }
            if !matches!(port.state, PortState::Active | PortState::ActiveDefer) {
                continue;
            }
            let gid = match pick_gid(cfg, dev, port)? {
                Ok(g) => g,
                Err(why) => {
                    r.add("rdma port", format!("{} port {}", dev.name, port.port), format!("skipped: {why}"));
                    continue;
                }
            };
            if best.as_ref().is_none_or(|b| port.rate_gbps > b.port.rate_gbps) {
                best = Some(PortChoice { device: dev.clone(), port: port.clone(), gid });
            }
        }
    }
    if let Some(b) = &best {
        let how = match (&want_dev, want_port) {
            (Some(_), _) | (_, Some(_)) => "pinned by config",
            _ => "the fastest active port",
        };
        r.add(
            "rdma port",
            format!("{} port {}", b.device.name, b.port.port),
            format!(
                "{how}: {:?} link layer, {} Gb/s ({}x {}), active MTU {}",
                b.port.link_layer, b.port.rate_gbps, b.port.active_width, b.port.active_speed, b.port.active_mtu
            ),
        );
        match &b.gid {
            Some(g) => r.add(
                "gid_index",
                g.index,
                format!(
                    "{} GID {}{}: {}",
                    match g.gid_type {
                        GidType::RoceV2 => "RoCE v2",
                        GidType::RoceV1 => "RoCE v1",
                        GidType::Ib => "IB",
                    },
                    g.gid,
                    g.netdev.as_ref().map(|n| format!(" on {n}")).unwrap_or_default(),
                    if cfg.rdma.gid_index.value().is_some() {
                        "pinned by config"
                    } else if g.gid_type == GidType::RoceV2 && g.is_ipv4_mapped() {
                        "RoCE v2 over the port's IPv4 address is routable across L3 fabrics (what rdma_cm picks)"
                    } else {
                        "the best GID the port has (no IPv4-mapped RoCE v2 GID)"
                    }
                ),
            ),
            None => r.add("gid_index", "none", format!("InfiniBand addresses by LID ({}); no GRH needed inside the subnet", b.port.lid)),
        }
    }
    Ok(best)
}

/// The GID for a RoCE port (`Ok(Err(why))` when the port has none usable), `None` on IB.
fn pick_gid(cfg: &Config, dev: &RdmaDevice, port: &RdmaPort) -> Result<Result<Option<Gid>, String>, PlanError> {
    if let Some(want) = cfg.rdma.gid_index.value() {
        return match port.gids.iter().find(|g| u64::from(g.index) == want) {
            Some(g) => Ok(Ok(Some(g.clone()))),
            None => Err(PlanError::RdmaSetting {
                field: "gid_index",
                value: want.to_string(),
                why: format!("{} port {} has no GID at that index", dev.name, port.port),
            }),
        };
    }
    if port.link_layer != LinkLayer::Ethernet {
        return Ok(Ok(None));
    }
    let rank = |g: &Gid| match (g.gid_type, g.is_ipv4_mapped()) {
        (GidType::RoceV2, true) => 0,
        (GidType::RoceV2, false) => 1,
        (GidType::RoceV1, true) => 2,
        _ => 3,
    };
    Ok(port
        .gids
        .iter()
        .min_by_key(|g| (rank(g), g.index))
        .cloned()
        .map(Some)
        .ok_or_else(|| "RoCE port without a GID: give its netdev an IP address".to_string()))
}

/// A pinned value checked against the device's `limit`, or the derived one from `auto`;
/// either way recorded with its reason.
fn resolve(
    r: &mut Reasons,
    dev: &str,
    field: &'static str,
    pinned: Option<u64>,
    limit: u64,
    what: &str,
    auto: &dyn Fn() -> (u64, String),
) -> Result<u64, PlanError> {
    let (v, because) = match pinned {
        Some(v) if v > limit => {
            return Err(PlanError::RdmaSetting { field, value: v.to_string(), why: format!("exceeds {what} {limit} of {dev}") });
        }
        Some(v) => (v, "pinned by config".to_string()),
        None => auto(),
    };
    r.add(field, v, because);
    Ok(v)
}

/// Rounds up to a power of two (0 -> 1).
fn pow2(v: u64) -> u64 {
    v.max(1).next_power_of_two()
}

/// Queue depths, SGEs, inline threshold and QPs per worker, within the device's limits.
pub(super) fn queues(
    cfg: &Config,
    p: &PortChoice,
    link: &LinkPlan,
    workers: u32,
    chunk: u64,
    r: &mut Reasons,
) -> Result<RdmaPlan, PlanError> {
    let a = &p.device.attrs;
    let dev = &p.device.name;
    let max_wr = u64::from(a.max_qp_wr);
    // QPs per worker. Every worker's QPs must fit max_qp, and each QP needs two CQ entries.
    let share = link.speed_gbps / f64::from(workers.max(1));
    let max_qps_per_worker = (u64::from(a.max_qp) / u64::from(workers.max(1))).min(u64::from(a.max_cqe) / 2).max(1);
    let qps = resolve(
        r,
        dev,
        "qps_per_worker",
        cfg.rdma.qps_per_worker.value(),
        max_qps_per_worker,
        "min(max_qp / workers, max_cqe / 2)",
        &|| {
            let want = ((share / GBPS_PER_QP).ceil() as u64).clamp(1, u64::from(MAX_QPS_PER_WORKER));
            (
                want.min(max_qps_per_worker),
                format!(
                    "each worker carries {share:.1} Gb/s; one RC QP is assumed to sustain {GBPS_PER_QP} Gb/s of 4 KiB writes (at most {MAX_QPS_PER_WORKER}, and max_qp {} over {workers} workers)",
                    a.max_qp
                ),
            )
        },
    )?;
    // Send queue: enough 4 KiB writes in flight to cover the bandwidth-delay product plus
    // one signal interval, doubled for headroom.
    let bdp = link.bdp_bytes();
    let in_flight = bdp.div_ceil(PAGE) + u64::from(SIGNAL_INTERVAL);
    let sq = resolve(r, dev, "sq_depth", cfg.rdma.sq_depth.value(), max_wr, "max_qp_wr", &|| {
        (
            pow2(2 * in_flight).max(MIN_QUEUE_DEPTH).min(max_wr),
            format!(
                "bandwidth-delay product of {} Gb/s x {} us is {} B: {} scattered 4 KiB writes plus a signal interval of {SIGNAL_INTERVAL} in flight, doubled for headroom, at least {MIN_QUEUE_DEPTH} (perftest's default), capped by max_qp_wr {max_wr}",
                link.speed_gbps,
                link.rtt_us,
                bdp,
                bdp.div_ceil(PAGE)
            ),
        )
    })?;
    // Receive queue: one receive per WRITE_WITH_IMM / control message; credits keep the
    // sender from posting more than this.
    let rq = resolve(r, dev, "rq_depth", cfg.rdma.rq_depth.value(), max_wr, "max_qp_wr", &|| {
        (sq, "one receive per immediate-data completion; as deep as the send queue so receive credits never bind first".into())
    })?;
    let (sq, rq, cq) = cq_depth(cfg, dev, u64::from(a.max_cqe), qps, (sq, rq), r)?;
    let (send_sge, recv_sge, inline) = gathers(cfg, p, chunk, r)?;
    let signal_interval = SIGNAL_INTERVAL.min(u32::try_from(sq).unwrap_or(u32::MAX));
    r.add("signal_interval", signal_interval, format!("one CQE per {SIGNAL_INTERVAL} posts (at most the SQ depth): completion polling stays off the critical path while a full SQ still has signaled requests to reap"));
    let u = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(RdmaPlan {
        device: p.device.name.clone(),
        port: p.port.port,
        link_layer: format!("{:?}", p.port.link_layer),
        gid_index: p.gid.as_ref().map(|g| g.index),
        mtu: p.port.active_mtu,
        qps_per_worker: u(qps),
        sq_depth: u(sq),
        rq_depth: u(rq),
        cq_depth: u(cq),
        send_sge: u(send_sge),
        recv_sge: u(recv_sge),
        inline_threshold_bytes: u(inline),
        signal_interval,
    })
}

/// The CQ's depth, and the send and receive queues it can cover: every send and receive of
/// every QP of a worker may complete before the worker polls, and an overrun moves the QPs
/// to the error state. Queues shrink to fit `max_cqe` unless the config pinned them.
fn cq_depth(cfg: &Config, dev: &str, max_cqe: u64, qps: u64, (sq, rq): (u64, u64), r: &mut Reasons) -> Result<(u64, u64, u64), PlanError> {
    let need = qps * (sq + rq);
    match cfg.rdma.cq_depth.value() {
        Some(v) => {
            if v > max_cqe {
                return Err(PlanError::RdmaSetting {
                    field: "cq_depth",
                    value: v.to_string(),
                    why: format!("exceeds max_cqe {max_cqe} of {dev}"),
                });
            }
            if v < need {
                return Err(PlanError::RdmaSetting {
                    field: "cq_depth",
                    value: v.to_string(),
                    why: format!("below qps_per_worker x (sq_depth + rq_depth) = {need}: the CQ could overrun"),
                });
            }
            r.add("cq_depth", v, "pinned by config");
            Ok((sq, rq, v))
        }
        None if need <= max_cqe => {
            r.add("cq_depth", need, format!("{qps} QP(s) x (sq {sq} + rq {rq}) entries: every queued request can complete before a poll without overrunning the CQ (max_cqe {max_cqe})"));
            Ok((sq, rq, need))
        }
        None => {
            if cfg.rdma.sq_depth.value().is_some() || cfg.rdma.rq_depth.value().is_some() {
                return Err(PlanError::RdmaSetting {
                    field: "sq_depth",
                    value: sq.to_string(),
                    why: format!("{qps} QP(s) x (sq {sq} + rq {rq}) = {need} exceeds max_cqe {max_cqe}"),
                });
            }
            let per_queue = (max_cqe / qps / 2).max(1);
            let shrunk = if per_queue.is_power_of_two() { per_queue } else { per_queue.next_power_of_two() / 2 };
            r.add(
                "cq_depth",
                qps * 2 * shrunk,
                format!("max_cqe {max_cqe} cannot cover {qps} x ({sq} + {rq}): send and receive queues shrunk to {shrunk} each"),
            );
            Ok((shrunk, shrunk, qps * 2 * shrunk))
        }
    }
}

/// SGEs per send and receive, and the inline threshold.
fn gathers(cfg: &Config, p: &PortChoice, chunk: u64, r: &mut Reasons) -> Result<(u64, u64, u64), PlanError> {
    let (a, dev) = (&p.device.attrs, &p.device.name);
    let max_sge = u64::from(a.max_sge);
    let send_sge = resolve(r, dev, "send_sge", cfg.rdma.send_sge.value(), max_sge, "max_sge", &|| {
        let want = (chunk / PAGE).max(1);
        (
            want.min(max_sge),
            format!(
                "a {} KiB chunk spans {want} pages; one work request gathers up to that many (capped by max_sge {max_sge})",
                chunk / 1024
            ),
        )
    })?;
    let recv_sge = resolve(r, dev, "recv_sge", cfg.rdma.recv_sge.value(), max_sge, "max_sge", &|| {
        (1, "receives carry only control messages into one buffer; data arrives by RDMA WRITE".into())
    })?;
    let max_inline = u64::from(p.device.max_inline_data.unwrap_or(0));
    let inline = resolve(
        r,
        dev,
        "inline_threshold_bytes",
        cfg.rdma.inline_threshold_bytes.value(),
        max_inline,
        "the probed max_inline_data",
        &|| {
            let because = match p.device.max_inline_data {
                None => "the inline limit was not probed on this device: nothing is sent inline".into(),
                Some(m) => format!(
                    "control messages and credits go inline; {INLINE_CAP} B is perftest's default for RDMA WRITE on mlx5, capped by the device's probed limit {m} B"
                ),
            };
            (max_inline.min(u64::from(INLINE_CAP)), because)
        },
    )?;
    Ok((send_sge, recv_sge, inline))
}
