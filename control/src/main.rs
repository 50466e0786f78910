//! `ferryctl`: the thin control process. `probe` reads the machine, `tune` turns the
//! capabilities and the config into a plan with a reason for every value, `doctor` checks
//! that the host can run the plan and names the fix for each problem.
//!
//! Exit status: 0 success; 1 `doctor` found a blocking problem; 2 bad input (a malformed
//! capabilities file or config, or a config this machine cannot satisfy).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use control::config::Config;
use control::error::{CtlError, Usage};
use control::{capsfile, doctor, planner, render, transfer};
use dataplane::protocol::Done;
use hw::{Capabilities, ProbeOptions};

#[derive(Parser, Debug)]
#[command(name = "ferryctl", version = dataplane::long_version(), about = "ferry control: probe the hardware, plan the data plane, check the host")]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Read this machine: CPUs, NUMA, NICs, RDMA devices, io_uring, hugepages, memlock, userfaultfd.
    Probe {
        /// Print the capabilities report as JSON (what `tune --caps` reads).
        #[arg(long)]
        json: bool,
        /// Read topology, NICs and hugepages from a captured sysfs tree instead of /sys
        /// (RDMA devices are then not probed: libibverbs reads the live /sys).
        #[arg(long, value_name = "DIR")]
        sysfs_root: Option<PathBuf>,
    },
    /// Derive the data-plane plan, every value with its reason.
    Tune(PlanArgs),
    /// Preflight checks for the plan, each failure with its fix. Exit 1 if one blocks the plan.
    Doctor(PlanArgs),
    /// Send a file or memfd-backed region to a `ferryctl recv` (embedded data plane).
    Send {
        /// Receiver address, HOST:PORT.
        #[arg(long)]
        to: String,
        /// The file (or /proc/PID/fd/N of a memfd) to send.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        t: TransferArgs,
        /// auto (the plan's), tcp (io_uring), sockets, or rdma.
        #[arg(long)]
        transport: Option<String>,
        /// off, zstd:N (1-19), or auto (compress only while it finishes sooner).
        /// Default: ferry.toml's `[migration] compression`.
        #[arg(long = "compression", alias = "compress", value_name = "POLICY")]
        compress: Option<String>,
    },
    /// Receive one region into a file, written as OUT.partial and renamed once the digest matches.
    Recv {
        /// Address to listen on, HOST:PORT.
        #[arg(long)]
        listen: String,
        /// Destination file.
        #[arg(long)]
        out: PathBuf,
        /// Give up when no sender has authenticated within this many seconds (connections
        /// that fail to authenticate are turned away meanwhile). Default: wait.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        #[command(flatten)]
        t: TransferArgs,
    },
    /// Stream mode for an unmodified QEMU: carry its migration stream between two proxies.
    /// Source: `--listen unix:/run/ferry/ID.sock --to DEST:PORT` (then QMP `migrate
    /// unix:/run/ferry/ID.sock`). Destination: `--serve HOST:PORT --forward unix:/path`
    /// (QEMU's `-incoming` socket). One migration per proxy; QEMU multifd channels are
    /// carried side by side.
    Proxy(ProxyArgs),
    /// Stream mode with both ends from this host: the local ferryd asks the destination's
    /// ferryd (its peer port) to forward to the destination VMM.
    Stream {
        #[command(subcommand)]
        what: StreamCmd,
    },
    /// Migrate a libvirt domain through ferry with one command: opens the stream (the
    /// same UNIX path on both hosts), runs `virsh migrate --live` through it, and reports
    /// ferry's figures beside libvirt's job info.
    Migrate(control::streams::MigrateArgs),
    /// Write a new random pre-shared key (mode 0600).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Migrate a simulated 1 GiB guest under a dirtying workload between two ferryd on this
    /// machine (region mode), verify it byte for byte, and report rounds and downtime.
    Demo(control::demo::MigrateArgs),
    /// Benchmarks: `bench migrate` is the demo with every knob, for scripts (--json).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Print a shell completion script for ferryctl (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages of ferryctl, each of its commands, and ferryd into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Show a running ferryd's sessions and counters.
    Status {
        /// ferryd's control socket (default: $FERRY_SOCKET or /run/ferry/ferryd.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum StreamCmd {
    /// Open a stream: print where the VMM migrates to (`unix:DIR/ID.sock` by default,
    /// forwarded to the same path at the destination), then both sides' reports when the
    /// migration's stream has ended.
    Open(control::streams::Ends),
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// A region-mode migration of a simulated guest: size, dirty rate and pattern,
    /// transport, compression, downtime budget, round limit, rate limit.
    Migrate(control::demo::MigrateArgs),
}

#[derive(Args, Debug)]
struct TransferArgs {
    /// Pre-shared key file (hex, mode 0600), the same on both sides.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Run without authentication (both sides must say so).
    #[arg(long)]
    insecure_no_auth: bool,
    /// ferry config file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the transfer report as JSON.
    #[arg(long)]
    json: bool,
    /// Run the transfer in this ferryd (its control socket) instead of an embedded data
    /// plane. Default: the local ferryd if its socket exists ($FERRY_SOCKET or
    /// /run/ferry/ferryd.sock), else embedded.
    #[arg(long, value_name = "SOCKET")]
    ferryd: Option<PathBuf>,
    /// Always use the embedded data plane.
    #[arg(long, conflicts_with = "ferryd")]
    embedded: bool,
}

impl TransferArgs {
    /// The ferryd to delegate to, if any.
    fn daemon(&self) -> Option<PathBuf> {
        if self.embedded {
            return None;
        }
        self.ferryd.clone().or_else(|| Some(transfer::default_socket()).filter(|p| p.exists()))
    }
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Capabilities report to plan for (from `probe --json`); default: probe this machine.
    #[arg(long, value_name = "FILE")]
    caps: Option<PathBuf>,
    /// ferry config file (TOML); default: every value "auto".
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// With no --caps: read topology, NICs and hugepages from this sysfs tree.
    #[arg(long, value_name = "DIR")]
    sysfs_root: Option<PathBuf>,
}

impl Cmd {
    /// Whether the command was asked for JSON output (its errors then come as JSON too).
    fn json(&self) -> bool {
        match self {
            Cmd::Probe { json, .. } | Cmd::Status { json, .. } => *json,
            Cmd::Tune(a) | Cmd::Doctor(a) => a.json,
            Cmd::Send { t, .. } | Cmd::Recv { t, .. } => t.json,
            Cmd::Proxy(p) => p.json,
            Cmd::Stream { what: StreamCmd::Open(e) } => e.json,
            Cmd::Migrate(m) => m.ends.json,
            Cmd::Demo(a) | Cmd::Bench { what: BenchCmd::Migrate(a) } => a.json,
            Cmd::Keygen { .. } | Cmd::Completions { .. } | Cmd::Manpages { .. } => false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = ["warn", "info", "debug", "trace"][usize::from(cli.verbose.min(3))];
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let as_json = cli.cmd.json();
    match run(cli.cmd) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e.exit_code();
            eprintln!("ferryctl: {e}");
            if as_json {
                // Scripts reading stdout get the failure as data, with the exit status and
                // (when the data plane said it) the kind of failure.
                emit(&json(&serde_json::json!({ "ok": false, "error": e.to_string(), "kind": e.kind(), "exit_status": code })));
            }
            ExitCode::from(code)
        }
    }
}

/// ferryctl's manual pages (one per command, `ferryctl-send.1` and so on) and ferryd's.
fn manpages(dir: &std::path::Path) -> Result<u8, CtlError> {
    let fail = |e: std::io::Error| CtlError::io(format!("writing manual pages into {}", dir.display()), e);
    std::fs::create_dir_all(dir).map_err(fail)?;
    let ferryctl = <Cli as clap::CommandFactory>::command().version(env!("CARGO_PKG_VERSION"));
    clap_mangen::generate_to(ferryctl, dir).map_err(fail)?;
    let ferryd = <dataplane::args::FerrydArgs as clap::CommandFactory>::command().version(env!("CARGO_PKG_VERSION"));
    clap_mangen::generate_to(ferryd, dir).map_err(fail)?;
    Ok(0)
}

fn probe_opts(sysfs_root: Option<PathBuf>) -> ProbeOptions {
    sysfs_root.map_or_else(ProbeOptions::default, |sysfs_root| ProbeOptions { sysfs_root })
}

/// Prints to stdout; a closed pipe (`ferryctl probe | head`) ends quietly.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("plain data serialises")
}

fn inputs(a: &PlanArgs) -> Result<(Capabilities, Config), CtlError> {
    let caps = match &a.caps {
        Some(path) => capsfile::load(path)?,
        None => hw::probe(&probe_opts(a.sysfs_root.clone())),
    };
    let cfg = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    Ok((caps, cfg))
}

/// `ferryctl proxy`'s arguments.
#[derive(clap::Args, Debug)]
struct ProxyArgs {
    /// Source: where QEMU migrates to, unix:/path or tcp:HOST:PORT (repeatable).
    #[arg(long, value_name = "ENDPOINT", requires = "to", conflicts_with_all = ["serve", "forward"])]
    listen: Vec<String>,
    /// Source: the destination proxy, HOST:PORT.
    #[arg(long, requires = "listen")]
    to: Option<String>,
    /// Destination: the address the source proxy connects to, HOST:PORT.
    #[arg(long, requires = "forward")]
    serve: Option<String>,
    /// Destination: the destination QEMU's -incoming socket, unix:/path or tcp:HOST:PORT.
    #[arg(long, value_name = "ENDPOINT", requires = "serve")]
    forward: Option<String>,
    /// Pre-shared key file (hex, mode 0600), the same on both sides.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Run without authentication (both sides must say so).
    #[arg(long)]
    insecure_no_auth: bool,
    /// off (default), zstd:N (1-19), or auto (compress while it finishes sooner).
    #[arg(long = "compression", alias = "compress", value_name = "POLICY")]
    compress: Option<String>,
    /// ferry config file (TOML): `[limits]` bound what unauthenticated connections and
    /// channels may cost; `[migration] compression` is the default for --compression.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Run the proxy in this ferryd (its control socket): its key, its limits, its
    /// metrics and its drain; --key, --insecure-no-auth and --config are then ferryd's.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["key", "insecure_no_auth", "config"])]
    ferryd: Option<PathBuf>,
}

fn run(cmd: Cmd) -> Result<u8, CtlError> {
    match cmd {
        Cmd::Probe { json: as_json, sysfs_root } => {
            let caps = hw::probe(&probe_opts(sysfs_root));
            emit(&if as_json { json(&caps) } else { render::probe(&caps) });
            Ok(0)
        }
        Cmd::Tune(a) => {
            let (caps, cfg) = inputs(&a)?;
            let plan = planner::plan(&caps, &cfg)?;
            log::info!("plan: transport {}, {} worker(s) on node {}", plan.transport, plan.worker_cpus.len(), plan.numa_node);
            emit(&if a.json { json(&plan) } else { render::plan(&plan) });
            Ok(0)
        }
        Cmd::Send { to, file, t, transport, compress } => {
            if let Some(sock) = t.daemon() {
                if transport.is_some() {
                    return Err(Usage::TransportThroughFerryd.into());
                }
                let file = std::path::absolute(&file).map_err(|source| Usage::Path { path: file.clone(), source })?;
                // ferryd reports its progress when a bar will show it.
                let bar = transfer::Bar::new(!t.json);
                let req = dataplane::daemon::Request::Send { to, file, compress, progress: !t.json };
                return daemon_report(transfer::via_ferryd(&sock, &req, &bar, "a transfer report"), t.json);
            }
            let (auth, plan, require_rdma) = transfer_setup(&t, transport.as_deref(), compress.as_deref())?;
            report(transfer::send(&to, &file, auth, &plan, require_rdma, !t.json), t.json)
        }
        Cmd::Recv { listen, out, timeout, t } => {
            if let Some(sock) = t.daemon() {
                let out = std::path::absolute(&out).map_err(|source| Usage::Path { path: out.clone(), source })?;
                let bar = transfer::Bar::new(!t.json);
                let req = dataplane::daemon::Request::Recv { listen, out, timeout_s: timeout, progress: !t.json };
                return daemon_report(transfer::via_ferryd(&sock, &req, &bar, "a transfer report"), t.json);
            }
            let (auth, plan, _) = transfer_setup(&t, None, None)?;
            let timeout = timeout.map(std::time::Duration::from_secs);
            report(transfer::recv(&listen, &out, auth, &plan, !t.json, timeout), t.json)
        }
        Cmd::Status { socket, json: as_json } => {
            let sock = socket.unwrap_or_else(transfer::default_socket);
            let st: dataplane::protocol::Status =
                transfer::via_ferryd(&sock, &dataplane::daemon::Request::Status, &transfer::Bar::new(false), "the status")?;
            emit(&if as_json { json(&dataplane::protocol::ok(&st)) } else { render::status(&st) });
            Ok(0)
        }
        Cmd::Keygen { out } => keygen(&out),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "ferryctl", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Manpages { dir } => manpages(&dir),
        Cmd::Proxy(p) => proxy(p),
        Cmd::Stream { what: StreamCmd::Open(e) } => {
            let to = e.to.clone().ok_or(Usage::NoPeer)?;
            let o = control::streams::open(&e, &to)?;
            emit(&if e.json { json(&o) } else { control::streams::summary(&o) });
            Ok(0)
        }
        Cmd::Migrate(m) => {
            let to = control::streams::migrate_inputs(&m)?;
            let r = control::streams::migrate(&m, &to)?;
            emit(&if m.ends.json { json(&r) } else { control::streams::migrated_summary(&r) });
            Ok(0)
        }
        Cmd::Demo(a) | Cmd::Bench { what: BenchCmd::Migrate(a) } => demo(&a),
        Cmd::Doctor(a) => {
            let (caps, cfg) = inputs(&a)?;
            let plan = planner::plan(&caps, &cfg);
            let report = doctor::doctor(&caps, &cfg, plan.as_ref());
            emit(&if a.json { json(&report) } else { render::doctor(&report) });
            Ok(if report.blocking { 1 } else { 0 })
        }
    }
}

/// Stream mode: a source proxy (QEMU migrates to its `--listen` sockets) or a destination
/// proxy (feeding QEMU's `-incoming` socket).
fn proxy(p: ProxyArgs) -> Result<u8, CtlError> {
    if let Some(sock) = p.ferryd.clone() {
        return proxy_in_ferryd(&sock, p);
    }
    let ProxyArgs { listen, to, serve, forward, key, insecure_no_auth, compress, config, json: as_json, ferryd: _ } = p;
    let auth = transfer::auth(key.as_deref(), insecure_no_auth)?;
    let cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let compression = match (compress.as_deref(), config.is_some()) {
        (None, false) => dataplane::plan::Compression::Off,
        (Some(c), _) => dataplane::daemon::parse_compression(c, dataplane::plan::Compression::Off)
            .map_err(|source| Usage::Choice { flag: "compression", source })?,
        (None, true) => match cfg.migration.compression {
            control::config::CompressionChoice::Off => dataplane::plan::Compression::Off,
            control::config::CompressionChoice::Auto => dataplane::plan::Compression::Adaptive { level: 1 },
            control::config::CompressionChoice::Zstd(level) => dataplane::plan::Compression::Zstd { level },
        },
    };
    let limits = planner::limits_of(&cfg);
    // Bind first (a clear error, and the address QEMU needs, before any progress display).
    enum Side {
        Source(Vec<dataplane::stream::Listener>, String),
        Destination(std::net::TcpListener, dataplane::stream::Endpoint),
    }
    let side = match (to, serve, forward) {
        (Some(to), None, None) => {
            let eps: Vec<dataplane::stream::Endpoint> =
                listen.iter().map(|l| l.parse()).collect::<Result<_, _>>().map_err(|source| Usage::Choice { flag: "listen", source })?;
            let listeners: Vec<_> = eps
                .iter()
                .map(|e| dataplane::stream::Listener::bind(e).map_err(|source| Usage::Listen { at: e.to_string(), source }))
                .collect::<Result<_, _>>()?;
            for l in &listeners {
                eprintln!("ferry proxy: QEMU can migrate to {} (carried to {to})", l.uri());
            }
            Side::Source(listeners, to)
        }
        (None, Some(serve), Some(forward)) => {
            let fwd: dataplane::stream::Endpoint = forward.parse().map_err(|source| Usage::Choice { flag: "forward", source })?;
            let l = std::net::TcpListener::bind(&serve).map_err(|source| Usage::Listen { at: serve.clone(), source })?;
            eprintln!("ferry proxy: listening on {} for the source proxy; QEMU at {fwd}", l.local_addr().map_or(serve, |a| a.to_string()));
            Side::Destination(l, fwd)
        }
        _ => {
            return Err(Usage::ProxySides.into());
        }
    };
    let progress = std::sync::Arc::new(dataplane::stream::StreamProgress::default());
    let opts = dataplane::stream::ProxyOptions {
        progress: Some(progress.clone()),
        ..dataplane::stream::ProxyOptions::new(auth, compression, limits)
    };
    // The stream's length is QEMU's to know: a spinner with the bytes carried and the channels.
    let bar = transfer::Bar::new(!as_json);
    let tick = || {
        let channels = progress.channels.load(std::sync::atomic::Ordering::Relaxed);
        bar.update_unsized(progress.bytes.load(std::sync::atomic::Ordering::Relaxed), &format!("{channels} channel(s)"));
    };
    let r = dataplane::live::ticking(std::time::Duration::from_millis(100), tick, || match &side {
        Side::Source(listeners, to) => dataplane::stream::source(listeners, to, &opts),
        Side::Destination(l, fwd) => dataplane::stream::destination(l, fwd, &opts),
    });
    drop(bar);
    proxy_report(&r?, as_json)
}

/// `ferryctl proxy --ferryd SOCKET`: the same proxy, run by that ferryd.
fn proxy_in_ferryd(sock: &std::path::Path, p: ProxyArgs) -> Result<u8, CtlError> {
    use dataplane::daemon::Request;
    let req = match (p.to, p.serve, p.forward) {
        (Some(to), None, None) => Request::StreamOut { listen: p.listen, to, compress: p.compress, progress: !p.json },
        (None, Some(listen), Some(forward)) => Request::StreamIn { listen, forward, progress: !p.json },
        _ => {
            return Err(Usage::ProxySides.into());
        }
    };
    let bar = transfer::Bar::new(!p.json);
    let mut client = dataplane::client::Client::connect(sock)?;
    // Where QEMU (or the source) connects, which the user needs.
    let mut listening = |e: &dataplane::protocol::Event| {
        if let dataplane::protocol::Event::Listening { endpoints, .. } = e {
            for e in endpoints {
                eprintln!("ferry proxy: listening on {e} (in ferryd at {})", sock.display());
            }
        }
    };
    let done: Done<dataplane::stream::ProxyReport> = transfer::follow(&mut client, sock, &req, &bar, "a stream report", &mut listening)?;
    drop(bar);
    proxy_report(&done.report, p.json)
}

/// A proxied migration's report, as JSON or one line.
fn proxy_report(r: &dataplane::stream::ProxyReport, as_json: bool) -> Result<u8, CtlError> {
    emit(&if as_json { json(&r) } else { r.line() });
    Ok(0)
}

/// Key, plan, and whether the config or `--transport` insists on RDMA.
fn transfer_setup(
    t: &TransferArgs,
    transport: Option<&str>,
    compress: Option<&str>,
) -> Result<(dataplane::auth::Auth, dataplane::plan::Plan, bool), CtlError> {
    let auth = transfer::auth(t.key.as_deref(), t.insecure_no_auth)?;
    let mut cfg = match &t.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    transfer::override_config(&mut cfg, transport, compress)?;
    let caps = hw::probe(&ProbeOptions::default());
    let plan = transfer::transfer_plan(&caps, &cfg)?;
    Ok((auth, plan, cfg.dataplane.transport == control::config::TransportChoice::Rdma))
}

fn report(r: Result<dataplane::engine::Report, CtlError>, as_json: bool) -> Result<u8, CtlError> {
    let r = r?;
    emit(&if as_json { json(&r) } else { transfer::summary(&r) });
    Ok(0)
}

fn daemon_report(r: Result<Done<dataplane::engine::Report>, dataplane::client::ClientError>, as_json: bool) -> Result<u8, CtlError> {
    let rep = r?.report;
    emit(&if as_json { json(&rep) } else { transfer::summary(&rep) });
    Ok(0)
}

fn demo(a: &control::demo::MigrateArgs) -> Result<u8, CtlError> {
    let quiet = a.json;
    let mut progress = |line: String| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    control::demo::run(a, &mut progress, &mut |r| match (a.json, a.runs) {
        (true, 1) => emit(&json(&r)),
        (true, _) => emit(&serde_json::to_string(&r).expect("plain data serialises")),
        (false, _) => emit(&control::demo::summary(&r)),
    })?;
    Ok(0)
}

fn keygen(out: &std::path::Path) -> Result<u8, CtlError> {
    transfer::write_new_key(out)?;
    Ok(0)
}
