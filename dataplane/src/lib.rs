//! ferry's data plane. It obeys a [`plan::Plan`] made by `control`; it never reads sysfs
//! or config files itself.
#![deny(unsafe_code)]

/// ferryd's command line.
pub mod args;
/// Pre-shared-key authentication (HMAC-SHA256 challenge-response both ways).
pub mod auth;
/// What a listener may spend on strangers: client slots, deadlines, accept backoff.
pub mod bounds;
/// An encoded chunk: a window's pages as frames, owning its arena slots.
pub mod chunk;
/// The client side of ferryd's control socket.
pub mod client;
/// Frame I/O on a stream, and the session error type.
pub mod conn;
/// ferryd as a service: control socket, metrics.
pub mod daemon;
/// The end-to-end region digest.
pub mod digest;
/// Chunks into frames (zero pages, zstd) and back.
pub mod encode;
/// Sending and receiving a region.
pub mod engine;
/// Helper threads, started once per process, for work one step fans out across CPUs.
pub(crate) mod helpers;
/// The metrics endpoint's HTTP server: one thread polling every client.
pub mod http;
/// Reading a data lane's frames: io_uring multishot receive, or plain reads.
pub mod lane;
/// Live per-worker counters for /metrics and status.
pub mod live;
/// ferryd's Prometheus metrics.
pub mod metrics;
/// The migration engine: pre-copy rounds, region mode.
pub mod migrate;
/// ferryd to ferryd: the destination side of a stream opened from the source.
pub mod peer;
/// The resolved plan the data plane runs with.
pub mod plan;
/// The persistent worker threads: one per planned CPU, each with its arena.
pub mod pool;
/// ferryd's control protocol: events and replies, typed for ferryd and its clients.
pub mod protocol;
/// The session layer: limits on what a peer may cost, authenticated accept.
pub mod session;
/// The receiving loop of every TCP session, on the pool's receiving threads.
pub mod sink;
/// Stream mode: an unmodified VMM's migration stream carried between two proxies.
pub mod stream;
/// Where a sending worker's chunks go: its lanes on sockets or io_uring.
pub mod transport;
/// Wire protocol v2: frame header, kinds, checks.
pub mod wire;
/// The sending worker's steps, the window feed and the pacer: one loop for every job.
pub mod worker;

/// A word in a request, a flag or a config that names none of the choices it was given
/// for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {got:?}: use {choices}")]
pub struct BadChoice {
    pub what: &'static str,
    pub got: String,
    pub choices: &'static str,
}

/// The git revision this build came from ("unknown" outside a checkout).
pub const REVISION: &str = env!("FERRY_REVISION");

/// `--version`'s text: the release, the revision and the wire protocol's version (the
/// two ends of a session must speak the same one).
pub fn long_version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| format!("{} (revision {REVISION}, wire protocol {})", env!("CARGO_PKG_VERSION"), wire::VERSION))
}
