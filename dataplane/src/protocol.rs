//! ferryd's control protocol, typed both ways: the requests ([`crate::daemon::Request`]),
//! the events ferryd sends while a request runs ([`Event`]), and the final replies
//! (`{"ok":true,...}` with one of the bodies below, or `{"ok":false,"error":...,"kind":...}`
//! with a [`crate::metrics::Failure`]). ferryd writes these types and
//! [`crate::client::Client`] reads them, so the two cannot drift apart; `hello` says which
//! version of them a ferryd speaks ([`crate::daemon::CONTROL_PROTOCOL`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::collections::BTreeMap;

use crate::engine::Percentiles;
use crate::live::{Progress, Snapshot};
use crate::migrate::{MigrationReport, RoundReport};
use crate::stream::ProxyReport;

/// What ferryd says while a request runs, before its final reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Where a receive, an incoming migration or a stream endpoint listens (`endpoints`:
    /// every one of a stream's, the first in `addr`).
    Listening {
        addr: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        endpoints: Vec<String>,
    },
    /// Bytes moved so far of `total` (0 while unknown), and a stream's channels.
    Progress {
        bytes: u64,
        total: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channels: Option<u64>,
    },
    /// `migrate_out`: the destination is connected.
    Connected(Connected),
    /// `migrate_out`: a pre-copy round ended.
    Round { round: RoundReport },
    /// `migrate_out`: the destination runs the guest (post-copy); never resume it here.
    Switched { switch_ms: f64 },
    /// `migrate_in`: the verified memory, one memfd per region with this line; answer
    /// `taken`.
    Memory { regions: usize, report: MigrationReport },
    /// `migrate_in`: the memory to map and register for post-copy, one memfd per region
    /// with this line; answer `faults`.
    Postcopy { regions: usize, report: MigrationReport },
    /// `migrate_in`, post-copy: ferryd serves the guest's faults; run the guest.
    Running,
    /// `migrate_in`, post-copy: every page is local and verified; answer `released`.
    Local,
    /// `stream_open`: the destination ferryd forwards stream `name` to `forward`; its
    /// channels go to `channels`.
    Opened { name: String, forward: String, channels: String },
}

/// `migrate_out`'s `connected` event: the destination, the guest's bytes and regions, and
/// the session's lanes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    pub to: String,
    pub bytes: u64,
    pub regions: usize,
    pub lanes: usize,
}

/// The body of a final reply that carries a report: `recv`, `send`, `stream_out`,
/// `stream_in` and `migrate_out` (and post-copy's last reply on either side).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done<R> {
    pub report: R,
}

/// `migrate_in`'s final reply: the source knows the migration succeeded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigratedIn {
    pub report: MigrationReport,
    pub regions: usize,
}

/// `stream_open`'s final reply: both sides' reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamOpened {
    pub name: String,
    pub report: ProxyReport,
    pub destination: ProxyReport,
}

/// `hello`'s reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub version: String,
    pub revision: String,
    pub wire_protocol: u16,
    pub commands: Vec<String>,
    pub transport: String,
    pub peer: Option<String>,
    pub draining: bool,
}

/// `status`'s reply: the metrics' view (`status`), the plan and the worker pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub draining: bool,
    pub status: StatusMetrics,
    pub plan: StatusPlan,
    pub pool: StatusPool,
}

/// What ferryd counted since it started, and where its running sessions stand
/// ([`crate::metrics::Metrics::status`]). Roles are [`crate::metrics::Role`]'s names. A
/// field an older ferryd does not send reads as empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusMetrics {
    pub version: String,
    pub revision: String,
    pub wire_protocol: u16,
    pub uptime_seconds: f64,
    /// Sessions ended, by role and result (`ok`, `error`).
    pub sessions: Vec<SessionCount>,
    /// Sessions running, by role.
    pub active: Vec<RoleCount>,
    /// Bytes by role name.
    pub region_bytes: BTreeMap<String, u64>,
    pub wire_bytes: BTreeMap<String, u64>,
    pub zero_pages: u64,
    /// Sending a chunk, every worker's.
    pub chunk_latency_us: Percentiles,
    /// Each worker's chunk send (send) or frame write (receive) latency.
    pub worker_latency_us: Vec<WorkerLatency>,
    /// The last session's error, if any failed.
    pub last_error: Option<String>,
    /// Each worker slot's counters, ended and running sessions together.
    pub workers: Vec<WorkerCounters>,
    pub progress: Vec<Progress>,
    /// Each running session's counters, by worker.
    pub running: Vec<SessionCounters>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCount {
    pub role: String,
    pub result: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleCount {
    pub role: String,
    /// A gauge's value.
    pub count: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerLatency {
    pub role: String,
    pub worker: u64,
    pub latency_us: Percentiles,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    pub role: String,
    pub worker: usize,
    pub counters: Snapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCounters {
    pub role: String,
    /// The session id, 16 hex digits.
    pub session: String,
    pub worker: usize,
    pub counters: Snapshot,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusPlan {
    pub transport: String,
    pub workers: usize,
    pub compression: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusPool {
    pub cpus: Vec<u32>,
    pub chunk_bytes: usize,
    pub chunks_per_worker: usize,
    /// Per receiving thread (in the order of `cpus`): the lanes and RDMA pollers it holds
    /// now. Empty from a ferryd before receiving threads.
    #[serde(default)]
    pub receiving: Vec<usize>,
    /// Per sending thread (in the order of `cpus`): the rounds it holds now. Empty from a
    /// ferryd before it said.
    #[serde(default)]
    pub sending: Vec<usize>,
}

/// A final reply that succeeded: `body`'s fields and `"ok": true`.
pub fn ok(body: &impl Serialize) -> Value {
    let mut v = serde_json::to_value(body).expect("replies serialize");
    if let Some(o) = v.as_object_mut() {
        o.insert("ok".into(), true.into());
    }
    v
}

impl Event {
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("events serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form VMM authors code against (the module docs of `migrate::vmm`).
    #[test]
    fn events_on_the_wire() {
        let e = Event::Listening { addr: Some("127.0.0.1:9".into()), endpoints: vec![] };
        assert_eq!(e.to_value(), serde_json::json!({"event": "listening", "addr": "127.0.0.1:9"}));
        assert_eq!(Event::Running.to_value(), serde_json::json!({"event": "running"}));
        let p: Event = serde_json::from_str(r#"{"event":"progress","bytes":5,"total":9,"id":"x"}"#).unwrap();
        assert!(matches!(p, Event::Progress { bytes: 5, total: 9, channels: None }), "{p:?}");
        assert!(serde_json::from_str::<Event>(r#"{"event":"teleported"}"#).is_err());
        let done = ok(&Done { report: 7 });
        assert_eq!(done, serde_json::json!({"ok": true, "report": 7}));
    }
}
