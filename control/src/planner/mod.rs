//! The planner: capabilities + config -> plan. A pure function; every "auto" is resolved
//! here and every fallback is decided here, once, with its reason.
//!
//! The order of decisions: RDMA port, transport (the ladder), link, NUMA node and CPUs,
//! compression, chunk size, RDMA queues, TCP, arena. Each step records a [`Reason`].

mod rdma;
mod sizing;

use dataplane::plan::{Limits, PLAN_SCHEMA_VERSION, Plan, Reason, Transport};
use hw::caps::Capabilities;

use crate::config::{Config, TransportChoice};

pub use rdma::PortChoice;

/// The config asks for something this machine cannot do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("transport = \"rdma\" was asked for, but no RDMA port can be used: {why}")]
    RdmaUnavailable { why: String },
    #[error("transport = \"tcp\" (io_uring) was asked for, but io_uring cannot be used: {why}")]
    IoUringUnavailable { why: String },
    #[error("rdma.{field} = {value}: {why}")]
    RdmaSetting { field: &'static str, value: String, why: String },
    #[error("{field} = {value}: {why}")]
    Setting { field: &'static str, value: String, why: String },
}

/// Collects the decisions in order.
#[derive(Debug, Default)]
pub(crate) struct Reasons(Vec<Reason>);

impl Reasons {
    pub(crate) fn add(&mut self, decision: &str, value: impl ToString, because: impl Into<String>) {
        self.0.push(Reason { decision: decision.into(), value: value.to_string(), because: because.into() });
    }
}

/// Makes the plan.
pub fn plan(caps: &Capabilities, cfg: &Config) -> Result<Plan, PlanError> {
    let mut r = Reasons::default();
    let port = rdma::choose_port(caps, cfg, &mut r)?;
    let transport = choose_transport(caps, cfg, port.as_ref(), &mut r)?;
    let port = port.filter(|_| transport == Transport::Rdma);
    let link = sizing::link(caps, cfg, port.as_ref(), transport, &mut r)?;
    let numa_node = sizing::numa_node(caps, cfg, port.as_ref(), &link, &mut r)?;
    let available = sizing::candidate_cpus(caps, cfg, numa_node, &mut r)?;
    let compression = sizing::compression(cfg, &link, available.workers.len() as u32, &mut r);
    let max_qp = port.as_ref().map(|p| p.device.attrs.max_qp);
    let (worker_cpus, control_cpu) = sizing::workers(cfg, &available, transport, &link, compression, max_qp, &mut r)?;
    let workers = worker_cpus.len() as u32;
    let chunk = sizing::chunk_size(cfg, transport, &link, port.as_ref(), &mut r);
    let rdma = match &port {
        Some(p) => Some(rdma::queues(cfg, p, &link, workers, chunk, &mut r)?),
        None => None,
    };
    let tcp = sizing::tcp(caps, cfg, transport, &link, workers, chunk, &mut r)?;
    let arena = sizing::arena(caps, cfg, (numa_node, workers, chunk), (&link, rdma.as_ref(), &tcp), &mut r)?;
    let limits = limits(cfg, &mut r);
    let (migration, daemon) = (migration_of(cfg), daemon_of(cfg));
    Ok(Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        host: caps.hostname.clone(),
        transport,
        numa_node,
        worker_cpus,
        control_cpu,
        link,
        chunk_size_bytes: chunk,
        rdma,
        tcp,
        arena,
        compression,
        limits,
        migration,
        daemon,
        reasons: r.0,
    })
}

/// The migration defaults `[migration]` sets.
pub fn migration_of(cfg: &Config) -> dataplane::plan::MigrationDefaults {
    let m = &cfg.migration;
    dataplane::plan::MigrationDefaults {
        downtime_ms: m.downtime_ms.0,
        max_rounds: m.max_rounds.0 as u32,
        rate_limit_mbit: match m.rate_limit_mbit {
            crate::config::OffOr::Off => None,
            crate::config::OffOr::Set(v) => Some(v.0),
        },
        verify: m.verify,
        recover_s: m.recover_s.0,
    }
}

/// ferryd's settings from `[daemon]`.
pub fn daemon_of(cfg: &Config) -> dataplane::plan::DaemonSettings {
    let d = &cfg.daemon;
    let some = |p: &std::path::Path| (!p.as_os_str().is_empty()).then(|| p.to_path_buf());
    dataplane::plan::DaemonSettings {
        control: d.control.clone(),
        control_mode: d.control_mode.clone(),
        control_group: (!d.control_group.is_empty()).then(|| d.control_group.clone()),
        metrics: d.metrics.clone(),
        key: some(&d.key),
        drain_seconds: d.drain_seconds.0,
        incoming_ports: match d.incoming_ports {
            crate::config::PortRange::Any => None,
            crate::config::PortRange::Range(a, b) => Some((a, b)),
        },
        peer: (d.peer != "off").then(|| d.peer.clone()),
        stream_dirs: d.stream_dirs.clone(),
        stream_mode: d.stream_mode.clone(),
        stream_group: (!d.stream_group.is_empty()).then(|| d.stream_group.clone()),
        stream_idle_s: d.stream_idle_s.0,
    }
}

/// The limits `[limits]` sets.
pub fn limits_of(cfg: &Config) -> Limits {
    let c = &cfg.limits;
    Limits {
        preauth_connections: c.preauth_connections.0 as u32,
        preauth_bytes: c.preauth_bytes.0,
        handshake_timeout_ms: c.handshake_timeout_ms.0,
        max_region_bytes: c.max_region_gib.value().map(|g| g << 30),
        max_lanes: c.max_lanes.0 as u32,
        session_buffer_bytes: c.session_buffer_mib.0 << 20,
        control_clients: c.control_clients.0 as u32,
        control_fds_per_message: c.control_fds_per_message.0 as u32,
        metrics_clients: c.metrics_clients.0 as u32,
    }
}

/// The limits from `[limits]`, as one decision.
fn limits(cfg: &Config, r: &mut Reasons) -> Limits {
    let l = limits_of(cfg);
    let region = l.max_region_bytes.map_or_else(|| "what the host can back".to_string(), |b| format!("{} GiB", b >> 30));
    r.add(
        "limits",
        format!(
            "{} unauthenticated connections, {} s handshake, {} lanes and {} MiB of buffers per session, regions up to {region}",
            l.preauth_connections,
            l.handshake_timeout_ms as f64 / 1e3,
            l.max_lanes,
            l.session_buffer_bytes >> 20
        ),
        if cfg.limits == crate::config::LimitsConfig::default() {
            "defaults ([limits] in ferry.toml)"
        } else {
            "from [limits] in ferry.toml"
        },
    );
    l
}

/// The transport ladder: RDMA > TCP over io_uring > TCP over plain sockets. A forced
/// rung that cannot work is an error; a skipped rung is recorded with its reason.
fn choose_transport(caps: &Capabilities, cfg: &Config, port: Option<&PortChoice>, r: &mut Reasons) -> Result<Transport, PlanError> {
    let no_rdma = || rdma::why_no_port(caps);
    let uring_why = || caps.io_uring.reason.clone().unwrap_or_else(|| "io_uring_setup failed".into());
    match cfg.dataplane.transport {
        TransportChoice::Rdma => {
            let p = port.ok_or_else(|| PlanError::RdmaUnavailable { why: no_rdma() })?;
            r.add("transport", "rdma", format!("forced by config; using {} port {}", p.device.name, p.port.port));
            Ok(Transport::Rdma)
        }
        TransportChoice::Tcp => {
            if !caps.io_uring.available {
                return Err(PlanError::IoUringUnavailable { why: uring_why() });
            }
            r.add("transport", "tcp (io_uring)", "forced by config (dataplane.transport = \"tcp\")");
            Ok(Transport::Tcp)
        }
        TransportChoice::Sockets => {
            r.add("transport", "sockets", "forced by config (dataplane.transport = \"sockets\")");
            Ok(Transport::Sockets)
        }
        TransportChoice::Auto => {
            if let Some(p) = port {
                r.add(
                    "transport",
                    "rdma",
                    format!("{} port {} is active: one-sided RDMA WRITE moves data without the CPU copying it", p.device.name, p.port.port),
                );
                return Ok(Transport::Rdma);
            }
            if caps.io_uring.available {
                r.add("transport", "tcp (io_uring)", format!("no usable RDMA port ({}); io_uring works here", no_rdma()));
                return Ok(Transport::Tcp);
            }
            r.add(
                "transport",
                "sockets",
                format!("no usable RDMA port ({}); io_uring unavailable ({}): plain sockets", no_rdma(), uring_why()),
            );
            Ok(Transport::Sockets)
        }
    }
}

#[cfg(test)]
mod tests;
