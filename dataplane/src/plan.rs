//! The plan: every number the data plane runs with, already resolved by the planner in
//! `control` (no "auto" is left), each with the reason it was chosen.
//!
//! `ferryctl tune --json` writes it; `ferryd --plan FILE` reads it.
//! Unknown fields are rejected: a plan written by a newer `ferryctl` fails loudly rather
//! than being half-obeyed.

use serde::{Deserialize, Serialize};

/// Version of the plan layout.
pub const PLAN_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub schema_version: u32,
    /// Host the plan was made for.
    pub host: String,
    pub transport: Transport,
    /// NUMA node the workers, arenas and NIC share.
    pub numa_node: u32,
    /// One worker thread per entry, pinned to that logical CPU.
    pub worker_cpus: Vec<u32>,
    /// CPU the control thread is pinned to; `None` lets it float (small machines).
    pub control_cpu: Option<u32>,
    pub link: LinkPlan,
    /// Bytes per data chunk (a multiple of 4 KiB).
    pub chunk_size_bytes: u64,
    /// Present when `transport` is RDMA.
    pub rdma: Option<RdmaPlan>,
    /// Always present: TCP carries the control connection, and the data when RDMA is not
    /// used or the peer has none.
    pub tcp: TcpPlan,
    pub arena: ArenaPlan,
    pub compression: Compression,
    /// What a peer, a VMM or a client may cost this host (see [`Limits`]).
    #[serde(default)]
    pub limits: Limits,
    /// What a migration uses where its request names nothing (ferry.toml's `[migration]`).
    #[serde(default)]
    pub migration: MigrationDefaults,
    /// How ferryd serves (ferry.toml's `[daemon]`); its command-line flags win.
    #[serde(default)]
    pub daemon: DaemonSettings,
    /// Every decision with its value and reason, in the order they were made.
    pub reasons: Vec<Reason>,
}

/// What strangers, peers and local clients may cost: every bound is checked before the
/// thing it bounds is spent. ferry.toml's `[limits]` sets them; these are the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections per listener that have not finished authenticating, at once; more wait
    /// in the kernel's backlog until one finishes.
    pub preauth_connections: u32,
    /// Bytes a connection may send before it has authenticated (a HELLO and a RESPONSE
    /// are under 200).
    pub preauth_bytes: u64,
    /// The whole handshake of one connection, however its bytes trickle in.
    pub handshake_timeout_ms: u64,
    /// The largest guest memory or region (all of a session's regions together) this
    /// host sends or receives; `None`: what the host can back when the session starts
    /// (memory for a migration, free space for a file).
    pub max_region_bytes: Option<u64>,
    /// Lanes (data connections or queue pairs) one session may open.
    pub max_lanes: u32,
    /// Receive buffers one session may take (one per lane, sized by the session's chunk).
    pub session_buffer_bytes: u64,
    /// Control-socket clients served at once.
    pub control_clients: u32,
    /// Descriptors one control-socket message may carry.
    pub control_fds_per_message: u32,
    /// Metrics clients served at once.
    pub metrics_clients: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            preauth_connections: 16,
            preauth_bytes: 4096,
            handshake_timeout_ms: 10_000,
            max_region_bytes: None,
            max_lanes: 64,
            session_buffer_bytes: 1 << 30,
            control_clients: 64,
            control_fds_per_message: 64,
            metrics_clients: 256,
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// A migration's settings where the VMM's request leaves them out; a request's own value
/// always wins. ferry.toml's `[migration]` sets them; these are the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationDefaults {
    /// The pause ferry aims for: the advice says pause once the estimate fits.
    pub downtime_ms: u64,
    /// Pre-copy rounds before ferry advises pausing (or post-copy) whatever the estimate.
    pub max_rounds: u32,
    /// The data lanes' rate limit, Mbit/s; none: as fast as the link goes.
    pub rate_limit_mbit: Option<u64>,
    /// What the final digest covers.
    pub verify: crate::migrate::Verify,
    /// Post-copy: how long either side waits for a broken link to come back.
    pub recover_s: u64,
}

impl Default for MigrationDefaults {
    fn default() -> MigrationDefaults {
        MigrationDefaults {
            downtime_ms: crate::migrate::DEFAULT_DOWNTIME.as_millis() as u64,
            max_rounds: crate::migrate::DEFAULT_MAX_ROUNDS,
            rate_limit_mbit: None,
            verify: crate::migrate::Verify::default(),
            recover_s: crate::migrate::postcopy::DEFAULT_RECOVER.as_secs(),
        }
    }
}

/// Where and how ferryd serves. ferry.toml's `[daemon]` sets them, ferryd's flags
/// override them; these are the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSettings {
    /// The control socket.
    pub control: std::path::PathBuf,
    /// Its mode, octal: 0600 or 0660.
    pub control_mode: String,
    /// Its group (a name or a number), with mode 0660.
    pub control_group: Option<String>,
    /// Where metrics are served, or "off".
    pub metrics: String,
    /// The pre-shared key peers authenticate with; none: ferryd must be told
    /// (`--key`, or `--insecure-no-auth`).
    pub key: Option<std::path::PathBuf>,
    /// On SIGTERM, how long sessions in flight may take to finish.
    pub drain_seconds: u64,
    /// Ports a receive or an incoming migration listens on when its request leaves the
    /// port to ferryd (port 0): the first free one of `first..=last`. None: any the kernel
    /// gives.
    pub incoming_ports: Option<(u16, u16)>,
    /// Where other ferryd reach this one to open the destination side of a stream-mode
    /// migration (`ferryctl stream open`), `HOST:PORT`; none: not served.
    pub peer: Option<String>,
    /// Directories a peer may have stream channels forwarded into (the destination VMM's
    /// incoming UNIX socket must be in one); a stream opened here listens in the first by
    /// default.
    pub stream_dirs: Vec<std::path::PathBuf>,
    /// Stream endpoints' UNIX sockets: mode (octal, 0600 or 0660) and group, for a VMM
    /// that runs as another user.
    pub stream_mode: String,
    pub stream_group: Option<String>,
    /// Seconds a stream endpoint waits for the VMM's first connection (the source) or
    /// the first channel (the destination) before it closes.
    pub stream_idle_s: u64,
}

impl Default for DaemonSettings {
    fn default() -> DaemonSettings {
        DaemonSettings {
            control: "/run/ferry/ferryd.sock".into(),
            control_mode: "0600".into(),
            control_group: None,
            metrics: "127.0.0.1:9464".into(),
            key: None,
            drain_seconds: 30,
            incoming_ports: None,
            peer: None,
            stream_dirs: vec!["/run/ferry/streams".into()],
            stream_mode: "0600".into(),
            stream_group: None,
            stream_idle_s: 300,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// RC queue pairs, one-sided RDMA WRITE.
    Rdma,
    /// TCP driven by io_uring.
    Tcp,
    /// TCP over plain sockets, written with nonblocking `sendmsg` (io_uring unavailable
    /// or forced off).
    Sockets,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Rdma => "rdma",
            Transport::Tcp => "tcp (io_uring)",
            Transport::Sockets => "sockets",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkPlan {
    /// The netdev data leaves through (`lo` when only loopback exists).
    pub interface: Option<String>,
    pub speed_gbps: f64,
    pub rtt_us: f64,
    /// The speed was assumed, not read from the device.
    pub speed_assumed: bool,
}

impl LinkPlan {
    /// Bandwidth-delay product in bytes.
    pub fn bdp_bytes(&self) -> u64 {
        (self.speed_gbps * 1e9 / 8.0 * self.rtt_us * 1e-6).ceil() as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmaPlan {
    pub device: String,
    pub port: u8,
    /// `InfiniBand` or `Ethernet` (RoCE).
    pub link_layer: String,
    /// GID index for RoCE; `None` on InfiniBand, which addresses by LID.
    pub gid_index: Option<u32>,
    /// Path MTU in bytes (the port's active MTU).
    pub mtu: u32,
    pub qps_per_worker: u32,
    pub sq_depth: u32,
    pub rq_depth: u32,
    /// One CQ per worker, shared by its QPs' send and receive queues.
    pub cq_depth: u32,
    pub send_sge: u32,
    pub recv_sge: u32,
    pub inline_threshold_bytes: u32,
    /// One signaled work request every this many.
    pub signal_interval: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpPlan {
    pub connections_per_worker: u32,
    /// io_uring drives the sockets (otherwise plain sockets).
    pub io_uring: bool,
    pub ring_entries: u32,
    pub send_zc: bool,
    /// SO_SNDBUF / SO_RCVBUF to set; `None` leaves the kernel's autotuning on.
    pub socket_buffer_bytes: Option<u64>,
    /// What the bandwidth-delay product asks for, whether or not the host allows setting it.
    pub socket_buffer_needed_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArenaBacking {
    /// Reserved 2 MiB hugetlb pages.
    Hugetlb2m,
    /// Transparent hugepages (`MADV_HUGEPAGE`).
    Thp,
    /// Plain 4 KiB pages.
    Normal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArenaPlan {
    /// A multiple of 2 MiB.
    pub bytes_per_worker: u64,
    pub backing: ArenaBacking,
    /// 2 MiB pages the arenas take on `numa_node` when backed by hugetlb pages.
    pub hugepages_2m_needed: u64,
    /// Arenas are `mlock`ed.
    pub mlock: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Compression {
    Off,
    /// Every chunk at this zstd level (chunks that do not shrink go raw).
    Zstd {
        level: i32,
    },
    /// Measure link and compression throughput at run time and compress only while that
    /// finishes sooner.
    Adaptive {
        level: i32,
    },
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
            Compression::Adaptive { level } => write!(f, "adaptive (zstd:{level} when it helps)"),
        }
    }
}

/// One decision: what, the value, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    pub decision: String,
    pub value: String,
    pub because: String,
}

/// Why a plan file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    #[error("cannot read plan {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("plan {path} is not a valid plan: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("plan {path} has schema version {found}; this ferryd reads version {PLAN_SCHEMA_VERSION}")]
    Version { path: String, found: u32 },
    #[error("plan {path} is inconsistent: {what}")]
    Invalid { path: String, what: Inconsistent },
}

/// What a plan holds that the data plane cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistent {
    #[error("no worker CPUs")]
    NoWorkers,
    #[error("chunk_size_bytes {0} is not a positive multiple of 4096")]
    Chunk(u64),
    #[error("arena.bytes_per_worker {0} is not a positive multiple of 2 MiB")]
    Arena(u64),
    #[error("transport is rdma but the rdma section is missing")]
    NoRdmaSection,
    #[error("rdma queue depths, SGE count and QP count must be positive")]
    RdmaZero,
    #[error("rdma.cq_depth {0} is below qps_per_worker x (sq_depth + rq_depth): the CQ could overrun")]
    CqDepth(u32),
    #[error("tcp.connections_per_worker must be positive")]
    NoConnections,
    #[error("limits: connection counts, lanes and the handshake timeout must be positive")]
    LimitsZero,
    #[error("limits.preauth_bytes {0} is below the 512 bytes a handshake needs")]
    PreauthBytes(u64),
    #[error("limits.control_fds_per_message {0} is outside 1..={max}", max = hw::fdpass::SCM_MAX_FD)]
    ControlFds(u32),
    #[error("migration: downtime_ms, max_rounds, recover_s and rate_limit_mbit must be positive")]
    MigrationZero,
    #[error("daemon.incoming_ports {0}-{1} is not a range of ports")]
    Ports(u16, u16),
}

impl Plan {
    /// Reads and checks a plan file.
    pub fn load(path: &std::path::Path) -> Result<Plan, PlanFileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanFileError::Read { path: p.clone(), source })?;
        let plan: Plan = serde_json::from_str(&text).map_err(|source| PlanFileError::Parse { path: p.clone(), source })?;
        if plan.schema_version != PLAN_SCHEMA_VERSION {
            return Err(PlanFileError::Version { path: p, found: plan.schema_version });
        }
        plan.check().map_err(|what| PlanFileError::Invalid { path: p, what })?;
        Ok(plan)
    }

    /// Internal consistency: what the data plane relies on without re-deriving it.
    pub fn check(&self) -> Result<(), Inconsistent> {
        if self.worker_cpus.is_empty() {
            return Err(Inconsistent::NoWorkers);
        }
        if self.chunk_size_bytes == 0 || self.chunk_size_bytes % 4096 != 0 {
            return Err(Inconsistent::Chunk(self.chunk_size_bytes));
        }
        if self.arena.bytes_per_worker == 0 || self.arena.bytes_per_worker % (2 << 20) != 0 {
            return Err(Inconsistent::Arena(self.arena.bytes_per_worker));
        }
        match (&self.transport, &self.rdma) {
            (Transport::Rdma, None) => return Err(Inconsistent::NoRdmaSection),
            (Transport::Rdma, Some(r)) => {
                if r.sq_depth == 0 || r.rq_depth == 0 || r.send_sge == 0 || r.qps_per_worker == 0 {
                    return Err(Inconsistent::RdmaZero);
                }
                if u64::from(r.cq_depth) < u64::from(r.qps_per_worker) * u64::from(r.sq_depth + r.rq_depth) {
                    return Err(Inconsistent::CqDepth(r.cq_depth));
                }
            }
            _ => {}
        }
        if self.tcp.connections_per_worker == 0 {
            return Err(Inconsistent::NoConnections);
        }
        let l = &self.limits;
        if l.preauth_connections == 0 || l.handshake_timeout_ms == 0 || l.max_lanes == 0 || l.control_clients == 0 || l.metrics_clients == 0
        {
            return Err(Inconsistent::LimitsZero);
        }
        if l.preauth_bytes < 512 {
            return Err(Inconsistent::PreauthBytes(l.preauth_bytes));
        }
        if !(1..=hw::fdpass::SCM_MAX_FD as u32).contains(&l.control_fds_per_message) {
            return Err(Inconsistent::ControlFds(l.control_fds_per_message));
        }
        let m = &self.migration;
        if m.downtime_ms == 0 || m.max_rounds == 0 || m.recover_s == 0 || m.rate_limit_mbit == Some(0) {
            return Err(Inconsistent::MigrationZero);
        }
        if let Some((first, last)) = self.daemon.incoming_ports
            && (first == 0 || first > last)
        {
            return Err(Inconsistent::Ports(first, last));
        }
        Ok(())
    }
}
