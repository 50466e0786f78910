//! `ferryd`: the data-plane daemon. Loads and checks a plan, takes transfer commands on a
//! UNIX control socket (mode 0600), serves Prometheus metrics on a local port. SIGTERM or
//! SIGINT drains it: no new session starts, the sessions in flight finish within
//! `--drain-seconds`; past that (or on a second signal) they are abandoned, their partial
//! files removed, and ferryd exits 1. SIGHUP is ignored (there is nothing to reload).
//! Under systemd (`Type=notify`) it says when it is ready and when it stops.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use dataplane::auth::{Auth, Key};
use dataplane::daemon::{Daemon, SocketAccess, bind_control};
use dataplane::plan::Plan;
use nix::sys::signal::{SigSet, Signal};
use sd_notify::NotifyState;

use dataplane::args::FerrydArgs as Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let level = ["info", "debug", "trace"][usize::from(args.verbose.min(2))];
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();

    let (plan, auth) = match inputs(&args) {
        Ok(v) => v,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    // Block the stop signals before any thread starts, so every thread inherits the mask
    // and they queue for sigwait below instead of killing the process mid-way.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGHUP);
    if let Err(e) = stop.thread_block() {
        log::error!("cannot block SIGTERM/SIGINT/SIGHUP: {e}");
        return ExitCode::FAILURE;
    }
    let settings = plan.daemon.clone();
    let Listeners { control, metrics, peer, stream_access } = match listeners(&settings) {
        Ok(l) => l,
        Err(code) => return code,
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
    let mut daemon = Daemon::new(plan, auth, pool);
    daemon.stream_access = stream_access;
    let daemon: &'static Daemon = Box::leak(Box::new(daemon));
    std::thread::spawn(move || daemon.serve_control(control));
    if let Some(l) = peer {
        log::info!("peers open streams on {}", l.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()));
        std::thread::spawn(move || daemon.serve_peers(l));
    }
    if let Some(l) = metrics {
        log::info!("metrics on http://{}/metrics", l.local_addr().map_or_else(|_| settings.metrics.clone(), |a| a.to_string()));
        std::thread::spawn(move || daemon.serve_metrics(l));
    }
    log::info!("control socket {}", settings.control.display());
    log::info!("ferryd ready (pid {})", std::process::id());
    notify(&[NotifyState::Ready, NotifyState::Status("ready")]);
    let stops = stop_signals(stop);
    // Until the first stop signal (or the signal thread's end).
    let _ = stops.recv();
    let code = drain(daemon, Duration::from_secs(settings.drain_seconds), &stops);
    let _ = std::fs::remove_file(&settings.control);
    code
}

/// The plan (its daemon settings with the flags over them) and how peers authenticate;
/// a sentence saying what is wrong otherwise (exit 2).
fn inputs(args: &Args) -> Result<(Plan, Auth), String> {
    let mut plan = Plan::load(&args.plan).map_err(|e| e.to_string())?;
    plan.daemon = args.resolve(&plan.daemon);
    let auth = match (&plan.daemon.key, args.insecure_no_auth) {
        (Some(k), false) => Auth::Key(Key::load(k).map_err(|e| e.to_string())?),
        (None, true) => Auth::Insecure,
        _ => {
            return Err(
                "give --key FILE or `[daemon] key` in ferry.toml (peers authenticate with a pre-shared key; `ferryctl keygen --out FILE`), or --insecure-no-auth".into()
            );
        }
    };
    Ok((plan, auth))
}

/// What ferryd listens on, and who may use its stream endpoints.
struct Listeners {
    control: std::os::unix::net::UnixListener,
    metrics: Option<std::net::TcpListener>,
    peer: Option<std::net::TcpListener>,
    stream_access: SocketAccess,
}

/// The control socket (with its mode and group), the metrics and peer listeners, or the
/// exit code after saying why not.
fn listeners(args: &dataplane::plan::DaemonSettings) -> Result<Listeners, ExitCode> {
    let access = |what: &str, mode: &str, group: Option<&str>| {
        SocketAccess::parse(mode, group).map_err(|e| {
            log::error!("{what}: {e}");
            ExitCode::from(2)
        })
    };
    let stream_access = access("stream endpoints (--stream-mode, --stream-group)", &args.stream_mode, args.stream_group.as_deref())?;
    let access = access("control socket (--control-mode, --control-group)", &args.control_mode, args.control_group.as_deref())?;
    let control = match bind_control(&args.control, access) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot create the control socket {}: {e}", args.control.display());
            return Err(ExitCode::FAILURE);
        }
    };
    let metrics = match args.metrics.as_str() {
        "off" => None,
        addr => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                log::error!("cannot serve metrics on {addr}: {e} (use --metrics off or another address)");
                return Err(ExitCode::FAILURE);
            }
        },
    };
    let peer = match args.peer.as_deref() {
        None => None,
        Some(addr) => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                log::error!("cannot serve peers on {addr}: {e} (use --peer off or another address)");
                return Err(ExitCode::FAILURE);
            }
        },
    };
    Ok(Listeners { control, metrics, peer, stream_access })
}

/// Stop signals, waited for on a thread of their own and told over a channel: the first
/// drains, a second abandons the drain. SIGHUP is ignored. The channel closes if waiting
/// for signals fails.
fn stop_signals(stop: SigSet) -> std::sync::mpsc::Receiver<()> {
    let (stops_tx, stops) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        loop {
            match stop.wait() {
                Ok(Signal::SIGHUP) => log::info!("SIGHUP ignored: ferryd has nothing to reload (restart it to run a new plan)"),
                Ok(sig) => {
                    log::info!("{sig:?} received: shutting down");
                    let _ = stops_tx.send(());
                }
                Err(e) => {
                    log::error!("waiting for signals failed: {e}; stopping");
                    // Dropping the sender ends the drain at once.
                    return;
                }
            }
        }
    });
    stops
}

/// Stops taking new sessions and waits for those in flight, up to `grace` or a second stop
/// signal; then exits 0 if none was left, 1 if some were abandoned (their partial files
/// removed; their peers see the connections close).
fn drain(daemon: &Daemon, grace: Duration, stops: &std::sync::mpsc::Receiver<()>) -> ExitCode {
    daemon.start_drain();
    let in_flight = || daemon.in_flight.load(Ordering::SeqCst);
    let n = in_flight();
    log::info!("draining: {n} session(s) in flight finish (up to {} s), no new one starts", grace.as_secs());
    notify(&[NotifyState::Stopping, NotifyState::Status(&format!("draining {n} session(s)"))]);
    let deadline = Instant::now() + grace;
    while in_flight() > 0 {
        // Sessions end on their own threads: look again every 50 ms, or at once on a
        // second stop signal.
        let now = Instant::now();
        let again = stops.recv_timeout(deadline.saturating_duration_since(now).min(Duration::from_millis(50)));
        if now >= deadline || !matches!(again, Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
            if in_flight() == 0 {
                break;
            }
            let left = in_flight();
            let removed = dataplane::engine::recv::remove_partials();
            log::error!(
                "drain ended with {left} session(s) still running: abandoned{}",
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(", partial file(s) removed: {}", removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
                }
            );
            return ExitCode::FAILURE;
        }
    }
    log::info!("drained: every session finished; exiting");
    ExitCode::SUCCESS
}

/// Tells systemd (when it started ferryd with Type=notify); nothing otherwise.
fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        log::warn!("cannot notify systemd: {e}");
    }
}
