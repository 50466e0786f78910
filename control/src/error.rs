//! Why a `ferryctl` command failed, typed, and the exit status each failure ends with:
//! 2 for what the user gave (arguments, the config, a plan this host cannot give, a key
//! file), 1 for what happened while it ran.

use std::path::PathBuf;

use dataplane::BadChoice;
use dataplane::client::ClientError;
use dataplane::conn::SessionError;

/// Arguments that cannot be used together, or a value outside what they take.
#[derive(Debug, thiserror::Error)]
pub enum Usage {
    #[error("--{flag}: {source}")]
    Choice { flag: &'static str, source: BadChoice },
    #[error(
        "--compress zstd:N cannot apply with --transport rdma: RDMA WRITEs place pages directly in the destination, where nothing decompresses them; use --compress off or auto, or --transport tcp"
    )]
    RdmaWithZstd,
    #[error("give either --key FILE or --insecure-no-auth, not both")]
    KeyAndInsecure,
    #[error(
        "no --key FILE given: peers authenticate with a pre-shared key (`ferryctl keygen --out FILE` makes one); --insecure-no-auth turns that off"
    )]
    NoKey,
    #[error("--size-mib must be at least 1")]
    NoSize,
    #[error("--dirty-rate-mbs {0}: a rate of 0 or more MB/s")]
    DirtyRate(f64),
    #[error("give --listen ENDPOINT --to HOST:PORT (source) or --serve HOST:PORT --forward ENDPOINT (destination)")]
    ProxySides,
    #[error("libvirt has both QEMUs use the same UNIX path: give no --forward (or the same path) with a unix: --listen")]
    OneUnixPath,
    #[error("libvirt has the destination QEMU listen on the migration URI's port: --forward {forward} must use port {port} too")]
    ForwardPort { forward: String, port: String },
    #[error("a tcp: --listen needs a tcp: --forward (libvirt migrates over one kind)")]
    MixedKinds,
    #[error("ferryctl migrate takes one --listen: libvirt migrates to one URI")]
    OneListen,
    #[error("{0}: ferryctl migrate points libvirt at ferry's endpoint itself (a tunnelled migration or another URI would go past ferry)")]
    NotYours(String),
    #[error("{0} names no host: give --to HOST:PORT, the destination ferryd's peer port")]
    NoHost(String),
    #[error("give --to HOST:PORT, the destination ferryd's peer port")]
    NoPeer,
    #[error("--transport is ferryd's plan when sending through it (use --embedded to choose)")]
    TransportThroughFerryd,
    #[error("{}: {source}", path.display())]
    Path { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {at}: {source}")]
    Listen { at: String, source: std::io::Error },
}

/// A demo run whose migration did not give the destination what the source had.
#[derive(Debug, thiserror::Error)]
pub enum DemoFailure {
    #[error("the migrated memory has {got} bytes, the guest {want}")]
    Size { got: u64, want: u64 },
    #[error("the migrated memory differs from the paused guest at page {page} (offset {offset:#x})")]
    Differs { page: u64, offset: u64 },
    #[error(
        "the destination guest read page {page} (offset {offset:#x}) before it held the source's content: post-copy served a stale page"
    )]
    Stale { page: u64, offset: u64 },
    #[error("the destination handed over {0} memory regions, the guest has 1")]
    Regions(usize),
    #[error("{0}")]
    Unexpected(&'static str),
}

/// Why a `ferryctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Usage(#[from] Usage),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Caps(#[from] crate::capsfile::CapsError),
    #[error("cannot plan: {0}")]
    Plan(#[from] crate::planner::PlanError),
    #[error(transparent)]
    Key(#[from] dataplane::auth::KeyError),
    #[error("cannot create {}: {source}", path.display())]
    CreateKey { path: PathBuf, source: std::io::Error },
    #[error("no randomness: {0}")]
    Random(#[from] getrandom::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Userfault(#[from] hw::uffd::UffdError),
    /// A local operation (`what`) failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Demo(#[from] DemoFailure),
    /// A ferryd the demo started did not come up (`log`: the end of its log).
    #[error("the {name} ferryd {why}:\n{log}")]
    FerrydStart { name: &'static str, why: &'static str, log: String },
    /// A failure, with the two demo ferryd's logs after it.
    #[error("{source}\n--- source ferryd ---\n{source_log}\n--- destination ferryd ---\n{destination_log}")]
    WithLogs { source: Box<CtlError>, source_log: String, destination_log: String },
    #[error("virsh migrate failed ({status}){}", ferry.as_ref().map_or_else(String::new, |e| format!("; ferry: {e}")))]
    Virsh { status: std::process::ExitStatus, ferry: Option<Box<CtlError>> },
    #[error("virsh migrate completed, but ferry's stream failed: {0}")]
    StreamAfterVirsh(Box<CtlError>),
    #[error("{0}")]
    Stream(&'static str),
    #[error("ferryd did not end the stream within {} s", .0.as_secs())]
    StreamTimeout(std::time::Duration),
}

impl CtlError {
    /// The exit status: 2 for what the user gave, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_)
            | CtlError::Config(_)
            | CtlError::Caps(_)
            | CtlError::Plan(_)
            | CtlError::Key(_)
            | CtlError::CreateKey { .. } => 2,
            CtlError::WithLogs { source, .. } => source.exit_code(),
            _ => 1,
        }
    }

    /// The data plane's kind of failure, when it said one.
    pub fn kind(&self) -> Option<dataplane::metrics::Failure> {
        match self {
            CtlError::Client(e) => e.kind(),
            CtlError::Session(e) => Some(dataplane::metrics::Failure::from(e)),
            CtlError::WithLogs { source, .. } => source.kind(),
            _ => None,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> CtlError {
        CtlError::Io { what: what.into(), source }
    }
}
