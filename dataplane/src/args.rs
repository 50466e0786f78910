//! ferryd's command line, in the library so that `ferryctl manpages` can render its
//! manual page beside its own.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "ferryd", version = crate::long_version(), about = "ferry data-plane daemon")]
pub struct FerrydArgs {
    /// Plan to run with (written by `ferryctl tune --json`).
    #[arg(long)]
    pub plan: PathBuf,
    /// Control socket. Default: the plan's (ferry.toml `[daemon] control`,
    /// /run/ferry/ferryd.sock).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The control socket's mode, octal: 0600 (the owner) or 0660 (and its group, for a
    /// VMM that runs as another user); other users are never let in. Default: the plan's
    /// (0600).
    #[arg(long, value_name = "MODE")]
    pub control_mode: Option<String>,
    /// The control socket's group (a name or a number), for `--control-mode 0660`.
    /// Default: the plan's.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// Address for Prometheus metrics (GET /metrics), or "off". Default: the plan's
    /// (127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Pre-shared key file for peers (hex, mode 0600). Default: the plan's
    /// (`[daemon] key`).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Run without peer authentication.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// On SIGTERM, how long the sessions in flight may take to finish before they are
    /// abandoned.
    /// Default: the plan's (30).
    #[arg(long, value_name = "SECONDS")]
    pub drain_seconds: Option<u64>,
    /// Serve other ferryd on this address (HOST:PORT): they open the destination side of
    /// stream-mode migrations here (`ferryctl stream open --to`). Default: the plan's
    /// (`[daemon] peer`; off).
    #[arg(long, value_name = "ADDR")]
    pub peer: Option<String>,
    /// A directory peers may have stream channels forwarded into, where the destination
    /// VMM listens (repeatable). Default: the plan's (/run/ferry/streams).
    #[arg(long = "stream-dir", value_name = "DIR")]
    pub stream_dirs: Vec<PathBuf>,
    /// Stream endpoints' UNIX socket mode, octal (0600 or 0660). Default: the plan's.
    #[arg(long, value_name = "MODE")]
    pub stream_mode: Option<String>,
    /// Stream endpoints' UNIX socket group, with `--stream-mode 0660`. Default: the
    /// plan's.
    #[arg(long, value_name = "GROUP")]
    pub stream_group: Option<String>,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl FerrydArgs {
    /// The plan's daemon settings with this command line's flags over them.
    pub fn resolve(&self, plan: &crate::plan::DaemonSettings) -> crate::plan::DaemonSettings {
        crate::plan::DaemonSettings {
            control: self.control.clone().unwrap_or_else(|| plan.control.clone()),
            control_mode: self.control_mode.clone().unwrap_or_else(|| plan.control_mode.clone()),
            control_group: self.control_group.clone().or_else(|| plan.control_group.clone()),
            metrics: self.metrics.clone().unwrap_or_else(|| plan.metrics.clone()),
            // --insecure-no-auth sets aside a key the plan names.
            key: if self.insecure_no_auth { self.key.clone() } else { self.key.clone().or_else(|| plan.key.clone()) },
            drain_seconds: self.drain_seconds.unwrap_or(plan.drain_seconds),
            incoming_ports: plan.incoming_ports,
            peer: match self.peer.as_deref() {
                Some("off") => None,
                Some(p) => Some(p.to_string()),
                None => plan.peer.clone(),
            },
            stream_dirs: if self.stream_dirs.is_empty() { plan.stream_dirs.clone() } else { self.stream_dirs.clone() },
            stream_mode: self.stream_mode.clone().unwrap_or_else(|| plan.stream_mode.clone()),
            stream_group: self.stream_group.clone().or_else(|| plan.stream_group.clone()),
            stream_idle_s: plan.stream_idle_s,
        }
    }
}
