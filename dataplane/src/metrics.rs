//! ferryd's Prometheus metrics, kept with prometheus-client and served in the Prometheus
//! text format (0.0.4) or OpenMetrics, as the scraper asks.
//!
//! Sessions are counted once, when they end (never per chunk); the per-worker counters
//! ([`crate::live`]) and the process's figures are read at each scrape. Every series a
//! fleet alerts on is there at zero from the start, each role and result apart, so
//! `increase()` sees a role's first session and first failure. Latencies are histograms
//! with fixed buckets and `_sum`, so hosts add up; the sessions hand their latencies over
//! as hdrhistograms (µs, 3 significant digits), kept whole here for `ferryctl status`'s
//! percentiles and bucketed when scraped.

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::Report;
use crate::live::Role;
use crate::migrate::MigrationReport;

/// The Prometheus text format's content type.
pub const TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// OpenMetrics' content type, served to a scraper whose `Accept` names it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Roles that migrate.
const MIGRATION_ROLES: [Role; 2] = [Role::MigrateIn, Role::MigrateOut];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleL {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleResultL {
    role: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleStageL {
    role: &'static str,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleWorkerL {
    role: &'static str,
    worker: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleSessionWorkerL {
    role: &'static str,
    session: String,
    worker: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindL {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByL {
    by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdviceL {
    advice: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildL {
    version: &'static str,
    revision: &'static str,
    wire_protocol: String,
}

/// A chunk's send or a frame's write: tens of µs to a second.
const CHUNK_BUCKETS: &[f64] = &[25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0];
/// A whole session: a fraction of a second to half an hour.
const SESSION_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];
/// A pause: a millisecond to ten seconds.
const DOWNTIME_BUCKETS: &[f64] = &[1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0];
/// Pre-copy rounds of one migration.
const ROUND_BUCKETS: [f64; 11] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0];
/// Bytes one round sent: 1 MiB to 64 GiB, by fours.
const ROUND_BYTES_BUCKETS: [f64; 9] =
    [1048576.0, 4194304.0, 16777216.0, 67108864.0, 268435456.0, 1073741824.0, 4294967296.0, 17179869184.0, 68719476736.0];
/// How fast a guest dirties memory, bytes per second.
const DIRTY_RATE_BUCKETS: [f64; 11] = [1e6, 1e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10, 1e11];

/// A latency histogram kept whole (hdrhistogram, µs) and exposed as a Prometheus
/// histogram with `buckets` (seconds) and `_sum`. Clones share the histogram.
#[derive(Debug, Clone)]
pub struct Latency {
    h: std::sync::Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    buckets: &'static [f64],
}

impl Latency {
    fn new(buckets: &'static [f64]) -> Latency {
        Latency { h: std::sync::Arc::new(Mutex::new(crate::engine::latency_histogram())), buckets }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, hdrhistogram::Histogram<u64>> {
        self.h.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a session's histogram (µs).
    fn add(&self, h: &hdrhistogram::Histogram<u64>) {
        // Both come from `latency_histogram`, so their bounds agree and adding cannot fail.
        let _ = self.lock().add(h);
    }

    fn record_seconds(&self, s: f64) {
        self.lock().saturating_record((s.max(0.0) * 1e6) as u64);
    }

    fn percentiles(&self) -> crate::engine::Percentiles {
        crate::engine::Percentiles::of(&self.lock())
    }

    /// (count, sum in seconds, per-bucket counts) as Prometheus wants them. Values are
    /// µs to 3 significant digits, so a count near a bucket's bound may fall either side
    /// by 0.1%; the sum is the recorded values' at that precision.
    fn bucketed(&self) -> (u64, f64, Vec<(f64, u64)>) {
        let h = self.lock();
        let mut below = 0;
        let mut buckets = Vec::with_capacity(self.buckets.len() + 1);
        for &upper in self.buckets {
            let n = if h.is_empty() { 0 } else { h.count_between(0, (upper * 1e6) as u64) };
            buckets.push((upper, n.saturating_sub(below)));
            below = below.max(n);
        }
        buckets.push((f64::INFINITY, h.len().saturating_sub(below)));
        let sum =
            h.iter_recorded().map(|v| h.median_equivalent(v.value_iterated_to()) as f64 * v.count_at_value() as f64).sum::<f64>() / 1e6;
        (h.len(), sum, buckets)
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (count, sum, buckets) = self.bucketed();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type LatencyFamily<L> = Family<L, Latency, fn() -> Latency>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Every family ferryd keeps; each a handle onto the registry's copy.
#[derive(Debug)]
struct Families {
    sessions: Family<RoleResultL, Counter>,
    active: Family<RoleL, Gauge>,
    region_bytes: Family<RoleL, Counter>,
    wire_bytes: Family<RoleL, Counter>,
    zero_pages: Family<RoleL, Counter>,
    compressed_bytes: Family<RoleStageL, Counter>,
    session_seconds: LatencyFamily<RoleL>,
    chunk_latency: LatencyFamily<RoleL>,
    worker_latency: LatencyFamily<RoleWorkerL>,
    draining: Gauge,
    /// Stream-mode channels carried by ferryd, by role.
    stream_channels: Family<RoleL, Counter>,
    migration: MigrationFamilies,
    postcopy: PostcopyFamilies,
}

/// Per migration and in total: what the rounds did, the pause, the estimate before it.
#[derive(Debug)]
struct MigrationFamilies {
    rounds: HistogramFamily<RoleL>,
    round_bytes: HistogramFamily<RoleL>,
    dirty_rate: HistogramFamily<RoleL>,
    downtime: LatencyFamily<RoleL>,
    estimated_downtime: LatencyFamily<RoleL>,
    over_budget: Family<RoleL, Counter>,
    advice: Family<AdviceL, Counter>,
    verify_failures: Family<RoleL, Counter>,
    last_downtime: Family<RoleL, FloatGauge>,
    last_estimated_downtime: Family<RoleL, FloatGauge>,
    last_rounds: Family<RoleL, Gauge>,
    last_bytes: Family<RoleL, Gauge>,
}

#[derive(Debug)]
struct PostcopyFamilies {
    migrations: Family<RoleL, Counter>,
    faults: Family<KindL, Counter>,
    pages: Family<ByL, Counter>,
    rdma_read_pages: Counter,
    reconnects: Counter,
    fault_latency: Latency,
    switch: Latency,
    all_local: Latency,
}

/// How a session or request failed: for the counts, and as `"kind"` in the control
/// protocol's error replies, so a client can act on it without reading the sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The digests of what the source sent and what the destination holds differ.
    Verification,
    /// The peer broke the protocol.
    Protocol,
    /// Authentication failed (a wrong or missing key on one side).
    Auth,
    /// The peer reported an error of its own.
    Peer,
    /// The connection to the peer closed or went silent.
    Link,
    /// This side will not do what was asked: its plan, limits or the memory given.
    Refused,
    /// The session was called off (a VMM that went away, an idle endpoint, a drain).
    Cancelled,
    /// The VMM did something the migration cannot work with.
    Vmm,
    /// A system call, the RDMA device or the memory failed here.
    System,
    /// A request that does not parse or does not belong where it came.
    BadRequest,
    /// ferryd drains: it starts nothing new.
    Draining,
    /// A bug in ferry.
    Bug,
    /// Anything else.
    Other,
}

/// A session's failure: the message the user reads, and its kind for the counts.
#[derive(Debug, Clone)]
pub struct Failed {
    pub message: String,
    pub kind: Failure,
}

impl From<&crate::conn::SessionError> for Failure {
    fn from(e: &crate::conn::SessionError) -> Failure {
        use crate::conn::SessionError as E;
        match e {
            E::DigestMismatch { .. } => Failure::Verification,
            E::Protocol(_) | E::Frame(_) => Failure::Protocol,
            E::Auth(_) => Failure::Auth,
            E::Peer(_) => Failure::Peer,
            E::TimedOut { .. } | E::PeerClosed { .. } => Failure::Link,
            E::Refused(_) | E::Limit(_) | E::StalePlan(_) => Failure::Refused,
            E::Cancelled(_) => Failure::Cancelled,
            E::Vmm(_) => Failure::Vmm,
            E::Io { .. }
            | E::Region { .. }
            | E::Arena(_)
            | E::Verbs(_)
            | E::Completion { .. }
            | E::Dest(_)
            | E::Random { .. }
            | E::Userfault(_) => Failure::System,
            E::Bug(_) | E::Stopped => Failure::Bug,
            E::StreamBroke(errors) => errors.first().map_or(Failure::Other, |(_, e)| Failure::from(e)),
        }
    }
}

impl From<crate::conn::SessionError> for Failed {
    fn from(e: crate::conn::SessionError) -> Failed {
        Failed { kind: Failure::from(&e), message: e.to_string() }
    }
}

impl Failed {
    pub fn new(kind: Failure, message: impl Into<String>) -> Failed {
        Failed { message: message.into(), kind }
    }

    /// The control protocol's error reply: `{"ok":false,"error":...,"kind":...}`.
    pub fn reply(&self) -> serde_json::Value {
        serde_json::json!({"ok": false, "error": self.message, "kind": self.kind})
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// ferryd's metrics: the registry a scrape encodes, the handles that update it, and
/// what `ferryctl status` reads beside it.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    registry: Registry,
    f: Families,
    last_error: Mutex<Option<String>>,
}

fn latency_family<L: Clone + std::hash::Hash + Eq>(buckets: fn() -> Latency) -> LatencyFamily<L> {
    Family::new_with_constructor(buckets)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(1)
    }
}

impl Metrics {
    /// The metrics of a ferryd with `workers` workers (each role's per-worker series are
    /// there at zero for those; lanes beyond appear as they count).
    pub fn new(workers: usize) -> Metrics {
        let f = Families {
            sessions: Family::default(),
            active: Family::default(),
            region_bytes: Family::default(),
            wire_bytes: Family::default(),
            zero_pages: Family::default(),
            compressed_bytes: Family::default(),
            session_seconds: latency_family(|| Latency::new(SESSION_BUCKETS)),
            chunk_latency: latency_family(|| Latency::new(CHUNK_BUCKETS)),
            worker_latency: latency_family(|| Latency::new(CHUNK_BUCKETS)),
            draining: Gauge::default(),
            stream_channels: Family::default(),
            migration: MigrationFamilies {
                rounds: Family::new_with_constructor(|| Histogram::new(ROUND_BUCKETS)),
                round_bytes: Family::new_with_constructor(|| Histogram::new(ROUND_BYTES_BUCKETS)),
                dirty_rate: Family::new_with_constructor(|| Histogram::new(DIRTY_RATE_BUCKETS)),
                downtime: latency_family(|| Latency::new(DOWNTIME_BUCKETS)),
                estimated_downtime: latency_family(|| Latency::new(DOWNTIME_BUCKETS)),
                over_budget: Family::default(),
                advice: Family::default(),
                verify_failures: Family::default(),
                last_downtime: Family::default(),
                last_estimated_downtime: Family::default(),
                last_rounds: Family::default(),
                last_bytes: Family::default(),
            },
            postcopy: PostcopyFamilies {
                migrations: Family::default(),
                faults: Family::default(),
                pages: Family::default(),
                rdma_read_pages: Counter::default(),
                reconnects: Counter::default(),
                fault_latency: Latency::new(DOWNTIME_BUCKETS),
                switch: Latency::new(DOWNTIME_BUCKETS),
                all_local: Latency::new(SESSION_BUCKETS),
            },
        };
        // Every series at zero from the start.
        for role in Role::ALL.map(Role::name) {
            for result in ["ok", "error"] {
                let _ = f.sessions.get_or_create(&RoleResultL { role, result });
            }
            let l = RoleL { role };
            let _ = f.active.get_or_create(&l);
            let _ = f.region_bytes.get_or_create(&l);
            let _ = f.wire_bytes.get_or_create(&l);
            let _ = f.zero_pages.get_or_create(&l);
            let _ = f.session_seconds.get_or_create(&l);
            for stage in ["in", "out"] {
                let _ = f.compressed_bytes.get_or_create(&RoleStageL { role, stage });
            }
            for worker in 0..workers.max(1) as u64 {
                let _ = f.worker_latency.get_or_create(&RoleWorkerL { role, worker });
            }
        }
        for role in [Role::Send, Role::MigrateOut].map(Role::name) {
            let _ = f.chunk_latency.get_or_create(&RoleL { role });
        }
        for role in [Role::StreamOut, Role::StreamIn].map(Role::name) {
            let _ = f.stream_channels.get_or_create(&RoleL { role });
        }
        let m = &f.migration;
        for role in MIGRATION_ROLES.map(Role::name) {
            let l = RoleL { role };
            let _ = m.rounds.get_or_create(&l);
            let _ = m.round_bytes.get_or_create(&l);
            let _ = m.downtime.get_or_create(&l);
            let _ = m.over_budget.get_or_create(&l);
            let _ = m.verify_failures.get_or_create(&l);
            let _ = m.last_downtime.get_or_create(&l);
            let _ = m.last_rounds.get_or_create(&l);
            let _ = m.last_bytes.get_or_create(&l);
            let _ = f.postcopy.migrations.get_or_create(&l);
        }
        let out = RoleL { role: Role::MigrateOut.name() };
        let _ = m.dirty_rate.get_or_create(&out);
        let _ = m.estimated_downtime.get_or_create(&out);
        let _ = m.last_estimated_downtime.get_or_create(&out);
        for advice in ["pause", "postcopy", "continue"] {
            let _ = m.advice.get_or_create(&AdviceL { advice });
        }
        for kind in ["local", "remote"] {
            let _ = f.postcopy.faults.get_or_create(&KindL { kind });
        }
        for by in ["fault", "push"] {
            let _ = f.postcopy.pages.get_or_create(&ByL { by });
        }
        let started = Instant::now();
        Metrics { started, registry: registry(&f, started), f, last_error: Mutex::new(None) }
    }
}

/// The registry: each family once, under its name and help. prometheus-client adds
/// `_total` to counters' names and a period to help.
fn registry(f: &Families, started: Instant) -> Registry {
    let mut r = Registry::default();
    let build = Family::<BuildL, Gauge>::default();
    build
        .get_or_create(&BuildL {
            version: env!("CARGO_PKG_VERSION"),
            revision: crate::REVISION,
            wire_protocol: crate::wire::VERSION.to_string(),
        })
        .set(1);
    r.register("ferry_build_info", "ferryd's build: release, git revision and wire protocol version (always 1)", build);
    r.register_collector(Box::new(Uptime(started)));
    r.register("ferry_sessions", "Sessions ended, by role and result", f.sessions.clone());
    r.register("ferry_sessions_active", "Sessions running now, by role", f.active.clone());
    r.register("ferry_draining", "1 while ferryd drains (SIGTERM): it refuses new sessions", f.draining.clone());
    r.register(
        "ferry_region_bytes",
        "Region bytes moved by completed sessions (stream mode: stream bytes, both ways)",
        f.region_bytes.clone(),
    );
    r.register(
        "ferry_stream_channels",
        "Stream-mode channels (QEMU's connections) carried by completed sessions in ferryd",
        f.stream_channels.clone(),
    );
    r.register("ferry_wire_bytes", "Bytes on the wire for completed sessions", f.wire_bytes.clone());
    r.register("ferry_zero_pages", "Zero pages of completed sessions sent or received as a flag instead of data", f.zero_pages.clone());
    r.register(
        "ferry_compressed_bytes",
        "Region bytes of completed sessions sent compressed (stage=in) and their compressed size (stage=out)",
        f.compressed_bytes.clone(),
    );
    r.register("ferry_session_seconds", "Duration of completed sessions, by role", f.session_seconds.clone());
    r.register(
        "ferry_chunk_send_latency_seconds",
        "Completed sessions' chunks, from handing one to a connection until it was written",
        f.chunk_latency.clone(),
    );
    r.register(
        "ferry_worker_latency_seconds",
        "Per sending worker, chunk handed to a connection until written; per receiving lane, data frame arrived until in the destination. Completed sessions",
        f.worker_latency.clone(),
    );
    register_migration(&mut r, &f.migration);
    register_postcopy(&mut r, &f.postcopy);
    r.register_collector(Box::new(LiveCollector));
    r.register_collector(Box::new(ProcessCollector));
    r
}

/// The `ferry_migration_*` series.
fn register_migration(r: &mut Registry, m: &MigrationFamilies) {
    r.register("ferry_migration_rounds", "Rounds of each completed migration, the stop-and-copy round included", m.rounds.clone());
    r.register("ferry_migration_round_bytes", "Dirty bytes each round of a completed migration sent", m.round_bytes.clone());
    r.register(
        "ferry_migration_dirty_rate_bytes_per_second",
        "How fast the guest dirtied memory, measured at each round after the first (source)",
        m.dirty_rate.clone(),
    );
    r.register(
        "ferry_migration_downtime_seconds",
        "The stop-and-copy round of each completed migration: ferry's part of the pause",
        m.downtime.clone(),
    );
    r.register(
        "ferry_migration_estimated_downtime_seconds",
        "The downtime ferry estimated in the round before the VMM paused (source), for the actual beside it",
        m.estimated_downtime.clone(),
    );
    r.register(
        "ferry_migration_downtime_over_budget",
        "Completed migrations whose downtime exceeded the budget asked for",
        m.over_budget.clone(),
    );
    r.register(
        "ferry_migration_advice",
        "Pre-copy rounds by the advice that followed them: pause, postcopy or continue (source)",
        m.advice.clone(),
    );
    r.register(
        "ferry_migration_verify_failures",
        "Migrations that failed because the destination's digest did not match the source's",
        m.verify_failures.clone(),
    );
    r.register("ferry_migration_last_downtime_seconds", "The last completed migration's downtime", m.last_downtime.clone());
    r.register(
        "ferry_migration_last_estimated_downtime_seconds",
        "The downtime estimated before the last completed migration paused (source)",
        m.last_estimated_downtime.clone(),
    );
    r.register("ferry_migration_last_rounds", "The last completed migration's rounds", m.last_rounds.clone());
    r.register("ferry_migration_last_bytes", "The last completed migration's guest memory size", m.last_bytes.clone());
}

/// The `ferry_postcopy_*` series.
fn register_postcopy(r: &mut Registry, pc: &PostcopyFamilies) {
    r.register("ferry_postcopy_migrations", "Migrations that switched over to post-copy and completed, by role", pc.migrations.clone());
    r.register(
        "ferry_postcopy_faults",
        "Guest page faults resolved in post-copy (destination): kind=remote waited for the source, kind=local did not",
        pc.faults.clone(),
    );
    r.register(
        "ferry_postcopy_pages",
        "Stale pages placed in post-copy (destination), by how they came: fetched for a fault, or pushed",
        pc.pages.clone(),
    );
    r.register(
        "ferry_postcopy_rdma_read_pages",
        "Pages the destination read from the source's memory with RDMA READs for its faults (after RDMA rounds; some the push had placed first)",
        pc.rdma_read_pages.clone(),
    );
    r.register("ferry_postcopy_reconnects", "Post-copy links that broke and came back (attempts after the first)", pc.reconnects.clone());
    r.register(
        "ferry_postcopy_fault_latency_seconds",
        "A remote fault's wait at the destination, from reading it until its page was mapped",
        pc.fault_latency.clone(),
    );
    r.register(
        "ferry_postcopy_switch_seconds",
        "ferry's part of a post-copy switch-over (source): from the VMM's postcopy until the destination ran the guest",
        pc.switch.clone(),
    );
    r.register(
        "ferry_postcopy_all_local_seconds",
        "From a post-copy switch-over until every page was local at the destination (destination)",
        pc.all_local.clone(),
    );
}

/// A session counted as active until this is dropped, however the session ends.
#[derive(Debug)]
pub struct Active<'m> {
    metrics: &'m Metrics,
    role: Role,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.metrics.f.active.get_or_create(&RoleL { role: self.role.name() }).dec();
    }
}

impl Metrics {
    /// A session of `role` starts; it counts as active until the guard drops.
    pub fn begin(&self, role: Role) -> Active<'_> {
        self.f.active.get_or_create(&RoleL { role: role.name() }).inc();
        Active { metrics: self, role }
    }

    /// ferryd drains (or stops draining).
    pub fn set_draining(&self, on: bool) {
        self.f.draining.set(i64::from(on));
    }

    fn count_end(&self, role: Role, r: Result<(), &Failed>) {
        let role = role.name();
        let result = if r.is_ok() { "ok" } else { "error" };
        self.f.sessions.get_or_create(&RoleResultL { role, result }).inc();
        if let Err(e) = r {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.message.clone());
            if e.kind == Failure::Verification {
                self.f.migration.verify_failures.get_or_create(&RoleL { role }).inc();
            }
        }
    }

    fn count_bytes(&self, role: Role, region: u64, wire: u64, zero_pages: u64, compressed: (u64, u64), seconds: f64) {
        let f = &self.f;
        let l = RoleL { role: role.name() };
        f.region_bytes.get_or_create(&l).inc_by(region);
        f.wire_bytes.get_or_create(&l).inc_by(wire);
        f.zero_pages.get_or_create(&l).inc_by(zero_pages);
        f.compressed_bytes.get_or_create(&RoleStageL { role: l.role, stage: "in" }).inc_by(compressed.0);
        f.compressed_bytes.get_or_create(&RoleStageL { role: l.role, stage: "out" }).inc_by(compressed.1);
        f.session_seconds.get_or_create(&l).record_seconds(seconds);
    }

    /// A one-shot session (send or recv) ended.
    pub fn end(&self, role: Role, r: Result<&Report, &Failed>) {
        self.count_end(role, r.map(|_| ()));
        let Ok(rep) = r else { return };
        self.count_bytes(role, rep.bytes, rep.wire_bytes, rep.zero_pages, (rep.compressed_in_bytes, rep.compressed_out_bytes), rep.seconds);
        if let Some(h) = &rep.chunk_latency {
            self.f.chunk_latency.get_or_create(&RoleL { role: role.name() }).add(h);
        }
        for (i, h) in rep.worker_latency.iter().enumerate() {
            self.f.worker_latency.get_or_create(&RoleWorkerL { role: role.name(), worker: i as u64 }).add(h);
        }
    }

    /// A stream-mode session (a proxied migration in ferryd) ended.
    pub fn end_stream(&self, role: Role, r: Result<&crate::stream::ProxyReport, &Failed>) {
        self.count_end(role, r.map(|_| ()));
        let Ok(rep) = r else { return };
        let compressed = rep.channels.iter().fold((0, 0), |(i, o), c| (i + c.compressed_in_bytes, o + c.compressed_out_bytes));
        self.count_bytes(role, rep.sent_bytes + rep.received_bytes, rep.wire_bytes, 0, compressed, rep.seconds);
        self.f.stream_channels.get_or_create(&RoleL { role: role.name() }).inc_by(rep.channels.len() as u64);
    }

    /// A migration ended.
    pub fn end_migration(&self, role: Role, r: Result<&MigrationReport, &Failed>) {
        self.count_end(role, r.map(|_| ()));
        let Ok(rep) = r else { return };
        let l = RoleL { role: role.name() };
        self.count_bytes(
            role,
            rep.sent_bytes,
            rep.wire_bytes,
            rep.zero_pages,
            (rep.compressed_in_bytes, rep.compressed_out_bytes),
            rep.seconds,
        );
        for (i, h) in rep.worker_latency.iter().enumerate() {
            self.f.worker_latency.get_or_create(&RoleWorkerL { role: l.role, worker: i as u64 }).add(h);
        }
        self.count_rounds(&l, rep);
        if let Some(pc) = &rep.postcopy {
            let p = &self.f.postcopy;
            p.migrations.get_or_create(&l).inc();
            p.reconnects.inc_by(u64::from(pc.attempts.saturating_sub(1)));
            if role == Role::MigrateIn {
                p.faults.get_or_create(&KindL { kind: "local" }).inc_by(pc.faults.saturating_sub(pc.remote_faults));
                p.faults.get_or_create(&KindL { kind: "remote" }).inc_by(pc.remote_faults);
                p.pages.get_or_create(&ByL { by: "fault" }).inc_by(pc.pages_by_fault);
                p.pages.get_or_create(&ByL { by: "push" }).inc_by(pc.pages_by_push);
                p.rdma_read_pages.inc_by(pc.rdma_read_pages);
                if let Some(h) = &pc.fault_latency {
                    p.fault_latency.add(h);
                }
                p.all_local.record_seconds(pc.all_local_seconds);
            }
        }
        if let Some(ms) = rep.switch_ms {
            self.f.postcopy.switch.record_seconds(ms / 1e3);
        }
    }

    /// A completed migration's rounds, pause and estimate.
    fn count_rounds(&self, l: &RoleL, rep: &MigrationReport) {
        let m = &self.f.migration;
        m.rounds.get_or_create(l).observe(rep.rounds.len() as f64);
        for r in &rep.rounds {
            m.round_bytes.get_or_create(l).observe(r.dirty_bytes as f64);
            if let Some(rate) = r.dirty_rate_gbps {
                m.dirty_rate.get_or_create(l).observe(rate * 1e9);
            }
            if !r.last && r.estimated_downtime_ms.is_some() {
                let advice = if r.advise_postcopy {
                    "postcopy"
                } else if r.advise_pause {
                    "pause"
                } else {
                    "continue"
                };
                m.advice.get_or_create(&AdviceL { advice }).inc();
            }
        }
        let downtime = rep.downtime_ms / 1e3;
        m.downtime.get_or_create(l).record_seconds(downtime);
        m.last_downtime.get_or_create(l).set(downtime);
        m.last_rounds.get_or_create(l).set(rep.rounds.len() as i64);
        m.last_bytes.get_or_create(l).set(rep.bytes as i64);
        if rep.downtime_budget_ms > 0.0 && rep.downtime_ms > rep.downtime_budget_ms {
            m.over_budget.get_or_create(l).inc();
        }
        // The estimate the VMM paused on: the last pre-copy round's.
        if let Some(ms) = rep.rounds.iter().rev().filter(|r| !r.last).find_map(|r| r.estimated_downtime_ms) {
            m.estimated_downtime.get_or_create(l).record_seconds(ms / 1e3);
            m.last_estimated_downtime.get_or_create(l).set(ms / 1e3);
        }
    }

    /// The exposition in the Prometheus text format, or OpenMetrics when `openmetrics`.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut s = String::new();
        let r = if openmetrics {
            prometheus_client::encoding::text::encode(&mut s, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry)
        };
        // Writing into a String fails only if an encoder does; ours do not.
        r.expect("encoding into a String");
        s
    }

    /// What `ferryctl status` shows.
    pub fn status(&self) -> crate::protocol::StatusMetrics {
        use crate::protocol::{RoleCount, SessionCount, SessionCounters, StatusMetrics, WorkerCounters, WorkerLatency};
        let f = &self.f;
        let by_role = |fam: &Family<RoleL, Counter>| {
            Role::ALL.iter().map(|r| (r.name().to_string(), fam.get_or_create(&RoleL { role: r.name() }).get())).collect()
        };
        let sessions = Role::ALL
            .iter()
            .flat_map(|r| ["ok", "error"].map(|res| (r.name(), res)))
            .map(|(role, result)| SessionCount {
                role: role.into(),
                result: result.into(),
                count: f.sessions.get_or_create(&RoleResultL { role, result }).get(),
            })
            .collect();
        let active = Role::ALL
            .iter()
            .map(|r| RoleCount { role: r.name().into(), count: f.active.get_or_create(&RoleL { role: r.name() }).get() })
            .collect();
        let mut worker_latency_us = Vec::new();
        for role in Role::ALL.map(Role::name) {
            for worker in 0..crate::live::SLOTS as u64 {
                if let Some(h) = f.worker_latency.get(&RoleWorkerL { role, worker }) {
                    worker_latency_us.push(WorkerLatency { role: role.into(), worker, latency_us: h.percentiles() });
                }
            }
        }
        StatusMetrics {
            version: env!("CARGO_PKG_VERSION").into(),
            revision: crate::REVISION.into(),
            wire_protocol: crate::wire::VERSION,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            sessions,
            active,
            region_bytes: by_role(&f.region_bytes),
            wire_bytes: by_role(&f.wire_bytes),
            zero_pages: Role::ALL.iter().map(|r| f.zero_pages.get_or_create(&RoleL { role: r.name() }).get()).sum(),
            chunk_latency_us: f.chunk_latency.get_or_create(&RoleL { role: Role::Send.name() }).percentiles(),
            worker_latency_us,
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            workers: crate::live::snapshot()
                .into_iter()
                .map(|(r, worker, counters)| WorkerCounters { role: r.name().into(), worker, counters })
                .collect(),
            progress: crate::live::progress(),
            running: crate::live::sessions()
                .into_iter()
                .map(|(r, id, worker, counters)| SessionCounters { role: r.name().into(), session: format!("{id:016x}"), worker, counters })
                .collect(),
        }
    }
}

/// Seconds since ferryd started.
#[derive(Debug)]
struct Uptime(Instant);

impl prometheus_client::collector::Collector for Uptime {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = ConstGauge::new(self.0.elapsed().as_secs_f64());
        g.encode(e.encode_descriptor("ferry_uptime_seconds", "Seconds since ferryd started", None, MetricType::Gauge)?)
    }
}

/// The live per-worker counters, and each running session's, read at each scrape.
#[derive(Debug)]
struct LiveCollector;

impl prometheus_client::collector::Collector for LiveCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Field = fn(&crate::live::Snapshot) -> u64;
        // Updated by the workers as they go, not at session end.
        let live = crate::live::snapshot();
        let per_worker: [(&str, &str, Field); 4] = [
            ("ferry_worker_region_bytes", "Region bytes each worker (sender) or lane (receiver) has handled, live", |s| s.region_bytes),
            ("ferry_worker_wire_bytes", "Bytes on the wire per worker or lane, live", |s| s.wire_bytes),
            ("ferry_worker_frames", "Data frames per worker or lane, live", |s| s.frames),
            ("ferry_worker_zero_pages", "Zero pages sent or received as a flag per worker or lane, live", |s| s.zero_pages),
        ];
        for (name, help, f) in per_worker {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (r, w, s) in &live {
                ConstCounter::new(f(s)).encode(m.encode_family(&RoleWorkerL { role: r.name(), worker: *w as u64 })?)?;
            }
        }
        // The running sessions, each worker or lane apart: listed until the session ends
        // (its counts are in the totals above, before and after).
        let running = crate::live::sessions();
        let per_session: [(&str, &str, Field); 3] = [
            ("ferry_session_region_bytes", "Region bytes each running session's workers (sender) or lanes (receiver) have handled", |s| {
                s.region_bytes
            }),
            ("ferry_session_wire_bytes", "Bytes on the wire per running session's worker or lane", |s| s.wire_bytes),
            ("ferry_session_frames", "Data frames per running session's worker or lane", |s| s.frames),
        ];
        for (name, help, f) in per_session {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (r, id, w, s) in &running {
                let l = RoleSessionWorkerL { role: r.name(), session: format!("{id:016x}"), worker: *w as u64 };
                ConstGauge::new(f(s) as i64).encode(m.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

/// The process's own figures, under the names every exporter uses (`process_*`), from
/// /proc/self at each scrape.
#[derive(Debug)]
struct ProcessCollector;

/// What /proc/self/stat says of this process.
#[derive(Debug, Default, PartialEq)]
struct ProcStat {
    cpu_seconds: f64,
    threads: u64,
    start_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

impl ProcStat {
    /// Parses /proc/self/stat (the fields after the parenthesised command, which may hold
    /// spaces), with the clock's ticks per second, the page size and the boot time.
    fn parse(stat: &str, ticks: f64, page: u64, boot_time: u64) -> Option<ProcStat> {
        let rest = &stat[stat.rfind(')')? + 2..];
        // Fields from 3 (state) on; `fields[k]` is field k + 3 of proc(5).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let num = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
        Some(ProcStat {
            cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
            threads: num(20)?,
            start_seconds: boot_time as f64 + num(22)? as f64 / ticks,
            virtual_bytes: num(23)?,
            resident_bytes: num(24)? * page,
        })
    }

    fn read() -> Option<ProcStat> {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let boot_time = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
        ProcStat::parse(&std::fs::read_to_string("/proc/self/stat").ok()?, ticks as f64, page as u64, boot_time)
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(p) = ProcStat::read() {
            ConstCounter::new(p.cpu_seconds).encode(e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?)?;
            let gauges = [
                ("process_resident_memory_bytes", "Resident memory size in bytes", p.resident_bytes as f64),
                ("process_virtual_memory_bytes", "Virtual memory size in bytes", p.virtual_bytes as f64),
                ("process_start_time_seconds", "Start time of the process since unix epoch in seconds", p.start_seconds),
                ("process_threads", "Number of OS threads in the process", p.threads as f64),
            ];
            for (name, help, v) in gauges {
                ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let n = fds.count() as f64;
            ConstGauge::new(n).encode(e.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            let g = ConstGauge::new(soft as f64);
            g.encode(e.encode_descriptor("process_max_fds", "Maximum number of open file descriptors", None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every role's sessions, bytes and latencies are there at zero before any session.
    #[test]
    fn every_series_is_there_at_zero() {
        let text = Metrics::default().encode(false);
        for role in ["send", "recv", "migrate_in", "migrate_out"] {
            for want in [
                format!("ferry_sessions_total{{role=\"{role}\",result=\"error\"}} 0"),
                format!("ferry_sessions_total{{role=\"{role}\",result=\"ok\"}} 0"),
                format!("ferry_zero_pages_total{{role=\"{role}\"}} 0"),
                format!("ferry_compressed_bytes_total{{role=\"{role}\",stage=\"out\"}} 0"),
                format!("ferry_session_seconds_count{{role=\"{role}\"}} 0"),
            ] {
                assert!(text.contains(&want), "{want} missing:\n{text}");
            }
        }
        for want in [
            "ferry_migration_verify_failures_total{role=\"migrate_in\"} 0",
            "ferry_migration_advice_total{advice=\"postcopy\"} 0",
            "ferry_migration_downtime_seconds_bucket{role=\"migrate_out\",le=\"+Inf\"} 0",
            "ferry_draining 0",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE ferry_chunk_send_latency_seconds histogram",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }

    /// A latency's buckets are cumulative and its sum is the recorded values'.
    #[test]
    fn latency_buckets_count_up_to_their_bound() {
        let l = Latency::new(&[1e-3, 10e-3]);
        for s in [0.0005, 0.002, 0.003, 0.5] {
            l.record_seconds(s);
        }
        let (count, sum, buckets) = l.bucketed();
        assert_eq!(count, 4);
        assert!((sum - 0.5055).abs() < 0.001, "{sum}");
        assert_eq!(buckets, vec![(1e-3, 1), (10e-3, 2), (f64::INFINITY, 1)]);
    }

    /// A migration's rounds, pause, estimate and advice reach the exposition, and a
    /// verification failure is counted as one.
    #[test]
    fn a_migration_is_counted() {
        use crate::migrate::RoundReport;
        let m = Metrics::default();
        let round = |n: u32, last: bool, advise_pause: bool| RoundReport {
            round: n,
            last,
            dirty_bytes: 2 << 20,
            dirty_rate_gbps: (n > 0).then_some(0.5),
            estimated_downtime_ms: (!last).then_some(40.0),
            advise_pause,
            ..RoundReport::default()
        };
        let rep = MigrationReport {
            bytes: 1 << 30,
            rounds: vec![round(0, false, false), round(1, false, true), round(2, true, false)],
            downtime_ms: 60.0,
            downtime_budget_ms: 50.0,
            ..MigrationReport::default()
        };
        m.end_migration(Role::MigrateOut, Ok(&rep));
        m.end_migration(Role::MigrateIn, Err(&Failed { message: "digests differ".into(), kind: Failure::Verification }));
        let text = m.encode(false);
        for want in [
            "ferry_sessions_total{role=\"migrate_out\",result=\"ok\"} 1",
            "ferry_sessions_total{role=\"migrate_in\",result=\"error\"} 1",
            "ferry_migration_verify_failures_total{role=\"migrate_in\"} 1",
            "ferry_migration_rounds_sum{role=\"migrate_out\"} 3",
            "ferry_migration_round_bytes_count{role=\"migrate_out\"} 3",
            "ferry_migration_dirty_rate_bytes_per_second_bucket{role=\"migrate_out\",le=\"5e+08\"} 2",
            "ferry_migration_advice_total{advice=\"continue\"} 1",
            "ferry_migration_advice_total{advice=\"pause\"} 1",
            "ferry_migration_downtime_seconds_bucket{role=\"migrate_out\",le=\"0.05\"} 0",
            "ferry_migration_downtime_seconds_bucket{role=\"migrate_out\",le=\"0.1\"} 1",
            "ferry_migration_estimated_downtime_seconds_bucket{role=\"migrate_out\",le=\"0.05\"} 1",
            "ferry_migration_downtime_over_budget_total{role=\"migrate_out\"} 1",
            "ferry_migration_last_downtime_seconds{role=\"migrate_out\"} 0.06",
            "ferry_migration_last_rounds{role=\"migrate_out\"} 3",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        assert_eq!(m.status().last_error.as_deref(), Some("digests differ"));
    }

    /// A post-copy migration's figures reach the exposition, per role.
    #[test]
    fn post_copy_is_counted() {
        let m = Metrics::default();
        let before = m.encode(false);
        for want in ["ferry_postcopy_faults_total{kind=\"remote\"} 0", "ferry_postcopy_migrations_total{role=\"migrate_in\"} 0"] {
            assert!(before.contains(want), "{want} missing at zero:\n{before}");
        }
        let mut h = crate::engine::latency_histogram();
        h.saturating_record(250);
        let pc = crate::migrate::postcopy::PostcopyReport {
            faults: 10,
            remote_faults: 4,
            pages_by_fault: 4,
            pages_by_push: 96,
            rdma_read_pages: 3,
            all_local_seconds: 0.7,
            attempts: 2,
            fault_latency: Some(h),
            ..Default::default()
        };
        let rep = MigrationReport { postcopy: Some(pc.clone()), ..MigrationReport::default() };
        m.end_migration(Role::MigrateIn, Ok(&rep));
        let src = MigrationReport { postcopy: Some(pc), switch_ms: Some(3.5), ..MigrationReport::default() };
        m.end_migration(Role::MigrateOut, Ok(&src));
        let text = m.encode(false);
        for want in [
            "ferry_postcopy_migrations_total{role=\"migrate_in\"} 1",
            "ferry_postcopy_migrations_total{role=\"migrate_out\"} 1",
            "ferry_postcopy_faults_total{kind=\"local\"} 6",
            "ferry_postcopy_faults_total{kind=\"remote\"} 4",
            "ferry_postcopy_pages_total{by=\"push\"} 96",
            "ferry_postcopy_rdma_read_pages_total 3",
            "ferry_postcopy_reconnects_total 2",
            "ferry_postcopy_fault_latency_seconds_count 1",
            "ferry_postcopy_switch_seconds_bucket{le=\"0.005\"} 1",
            "ferry_postcopy_all_local_seconds_bucket{le=\"1\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }

    /// /proc/self/stat with a command holding spaces and a parenthesis.
    #[test]
    fn proc_stat_parses_past_the_command() {
        let stat = "4242 (fer ry) d) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615";
        let p = ProcStat::parse(stat, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(
            p,
            ProcStat { cpu_seconds: 2.0, threads: 7, start_seconds: 1_700_000_010.0, virtual_bytes: 123456789, resident_bytes: 300 * 4096 }
        );
        assert!(ProcStat::read().is_some_and(|p| p.threads >= 1 && p.resident_bytes > 0));
    }
}
