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
    /// Control socket (created with mode 0600).
    #[arg(long, default_value = "/run/ferry/ferryd.sock")]
    pub control: PathBuf,
    /// The control socket's mode, octal: 0600 (the owner) or 0660 (and its group, for a
    /// VMM that runs as another user); other users are never let in.
    #[arg(long, default_value = "0600", value_name = "MODE")]
    pub control_mode: String,
    /// The control socket's group (a name or a number), for `--control-mode 0660`.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// Address for Prometheus metrics (GET /metrics), or "off".
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics: String,
    /// Pre-shared key file for peers (hex, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Run without peer authentication.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// On SIGTERM, how long the sessions in flight may take to finish before they are
    /// abandoned.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub drain_seconds: u64,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}
