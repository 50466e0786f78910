//! `ferryd`: the data-plane daemon. For now it loads and checks a plan, reports it, and
//! waits for SIGTERM or SIGINT, on which it exits cleanly.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dataplane::plan::Plan;
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser, Debug)]
#[command(name = "ferryd", version, about = "ferry data-plane daemon")]
struct Args {
    /// Plan to run with (written by `ferryctl tune --json`).
    #[arg(long)]
    plan: PathBuf,
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
    // Block the stop signals before anything else so they queue for sigwait below instead
    // of killing the process mid-way.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    if let Err(e) = stop.thread_block() {
        log::error!("cannot block SIGTERM/SIGINT: {e}");
        return ExitCode::FAILURE;
    }
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
    log::info!("ferryd ready (pid {})", std::process::id());
    match stop.wait() {
        Ok(sig) => {
            log::info!("{sig:?} received, shutting down");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("waiting for signals failed: {e}");
            ExitCode::FAILURE
        }
    }
}
