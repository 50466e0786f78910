//! `ferryd`: the data-plane daemon. Loads and checks a plan, takes transfer commands on a
//! UNIX control socket (mode 0600), serves Prometheus metrics on a local port, and exits
//! cleanly on SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dataplane::auth::{Auth, Key};
use dataplane::daemon::{Daemon, Metrics, bind_control};
use dataplane::plan::Plan;
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser, Debug)]
#[command(name = "ferryd", version, about = "ferry data-plane daemon")]
struct Args {
    /// Plan to run with (written by `ferryctl tune --json`).
    #[arg(long)]
    plan: PathBuf,
    /// Control socket (created with mode 0600).
    #[arg(long, default_value = "/run/ferry/ferryd.sock")]
    control: PathBuf,
    /// Address for Prometheus metrics (GET /metrics), or "off".
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: String,
    /// Pre-shared key file for peers (hex, mode 0600).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Run without peer authentication.
    #[arg(long)]
    insecure_no_auth: bool,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = ["info", "debug", "trace"][usize::from(args.verbose.min(2))];
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();

    let plan = match Plan::load(&args.plan) {
        Ok(p) => p,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let auth = match (&args.key, args.insecure_no_auth) {
        (Some(k), false) => match Key::load(k) {
            Ok(k) => Auth::Key(k),
            Err(e) => {
                log::error!("{e}");
                return ExitCode::from(2);
            }
        },
        (None, true) => Auth::Insecure,
        _ => {
            log::error!("give --key FILE (peers authenticate with a pre-shared key; `ferryctl keygen --out FILE`) or --insecure-no-auth");
            return ExitCode::from(2);
        }
    };
    // Block the stop signals before any thread starts, so every thread inherits the mask
    // and they queue for sigwait below instead of killing the process mid-way.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    if let Err(e) = stop.thread_block() {
        log::error!("cannot block SIGTERM/SIGINT: {e}");
        return ExitCode::FAILURE;
    }
    let control = match bind_control(&args.control) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot create the control socket {}: {e}", args.control.display());
            return ExitCode::FAILURE;
        }
    };
    let metrics = match args.metrics.as_str() {
        "off" => None,
        addr => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                log::error!("cannot serve metrics on {addr}: {e} (use --metrics off or another address)");
                return ExitCode::FAILURE;
            }
        },
    };
    log::info!(
        "plan for {}: transport {}, {} worker(s) on node {} (CPUs {:?}), chunk {} KiB, arena {} MiB/worker ({:?}), compression {}",
        plan.host,
        plan.transport,
        plan.worker_cpus.len(),
        plan.numa_node,
        plan.worker_cpus,
        plan.chunk_size_bytes / 1024,
        plan.arena.bytes_per_worker >> 20,
        plan.arena.backing,
        plan.compression
    );
    // The sending workers start with ferryd and live as long: a thread per planned CPU,
    // its arena mapped and locked once.
    let pool = match dataplane::pool::Pool::new(&plan) {
        Ok(p) => p,
        Err(e) => {
            log::error!("cannot start the worker pool: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon: &'static Daemon = Box::leak(Box::new(Daemon { plan, auth, metrics: Metrics::default(), pool }));
    std::thread::spawn(move || daemon.serve_control(control));
    if let Some(l) = metrics {
        log::info!("metrics on http://{}/metrics", l.local_addr().map_or_else(|_| args.metrics.clone(), |a| a.to_string()));
        std::thread::spawn(move || daemon.serve_metrics(l));
    }
    log::info!("control socket {}", args.control.display());
    log::info!("ferryd ready (pid {})", std::process::id());
    let code = match stop.wait() {
        Ok(sig) => {
            log::info!("{sig:?} received, shutting down");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("waiting for signals failed: {e}");
            ExitCode::FAILURE
        }
    };
    let _ = std::fs::remove_file(&args.control);
    code
}
