//! `ferryctl demo` and `ferryctl bench migrate`: a source and a destination `ferryd` on
//! this machine, a simulated guest with a realistic memory image and a workload dirtying
//! it, migrated through region mode exactly as a VMM would drive it (memfds by
//! SCM_RIGHTS, a dirty bitmap per round, pause when ferry advises), then the destination's
//! memory compared byte for byte with the paused source.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::migrate::postcopy::Mapping;
use dataplane::migrate::vmm::{Arrival, MigrateIn, MigrateOut, OutOptions};
use dataplane::migrate::{MigrationReport, RoundReport};
use dataplane::plan::Transport;
use serde::Serialize;

use crate::config::Config;
use crate::error::{CtlError, DemoFailure, Usage};
use crate::guest::{self, DirtyLog, ImageStats, Pattern, Workload};
use crate::transfer;

/// Every knob of a demo migration.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// How fast the guest's workload dirties memory, MB/s (0: a guest at rest).
    #[arg(long, default_value_t = 32.0)]
    pub dirty_rate_mbs: f64,
    /// Where the workload writes.
    #[arg(long, value_enum, default_value_t = Pattern::Hot)]
    pub pattern: Pattern,
    /// tcp or sockets (the plan's TCP rung when not given).
    #[arg(long)]
    pub transport: Option<String>,
    /// off, zstd:N (1-19), or auto (compress only while it finishes sooner).
    #[arg(long = "compression", alias = "compress", value_name = "POLICY")]
    pub compress: Option<String>,
    /// Downtime budget: ferry advises pausing once its estimate fits, ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Pre-copy rounds before ferry advises pausing whatever the estimate.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Cap on migration bandwidth, Mbit/s of guest memory.
    #[arg(long)]
    pub rate_limit_mbit: Option<u64>,
    /// What the final digest covers: sent (every page as sent against every page as it
    /// landed; no downtime cost) or full (the paused memory itself, read in the downtime).
    #[arg(long, default_value = "sent")]
    pub verify: dataplane::migrate::Verify,
    /// Allocate every page of the guest memory up front and hand ferryd a read-write
    /// descriptor, as a VMM preallocating guest RAM does: over RDMA with --verify full the
    /// NIC can then gather pages in place.
    #[arg(long)]
    pub prealloc: bool,
    /// Seed of the guest image and the workload.
    #[arg(long, default_value_t = 20240601)]
    pub seed: u64,
    /// ferry config file (TOML) for the plan both ferryd processes run with.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The ferryd binary (default: next to ferryctl, then $PATH).
    #[arg(long, value_name = "PATH")]
    pub ferryd: Option<PathBuf>,
    /// Post-copy: switch over when ferry advises pausing or post-copy (or after
    /// --switch-after-rounds); the guest runs on the destination at once, its faults
    /// served by ferry, and the rest of its memory follows.
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: switch over after this many pre-copy rounds, whatever ferry
    /// advises.
    #[arg(long, requires = "postcopy")]
    pub switch_after_rounds: Option<u32>,
    /// Migrations to run one after another through the same two ferryd, each with a new
    /// guest (seeds SEED, SEED+1, ...): what a long-lived ferryd learns from its
    /// migrations (the downtime estimate's end and digest speed) shows from the second.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Print the report as JSON (with --runs, one report per line).
    #[arg(long)]
    pub json: bool,
}

/// What post-copy did in the demo.
#[derive(Debug, Serialize)]
pub struct PostcopyDemo {
    /// Pre-copy rounds before the switch-over.
    pub rounds_before_switch: u32,
    /// The VMM's view: from pausing the source guest until the destination guest runs.
    pub switchover_downtime_ms: f64,
    /// ferry's part: from the `postcopy` command until the destination said it runs.
    pub ferry_switch_ms: f64,
    /// The destination ferryd's account (faults, latency, pages by fault and by push).
    #[serde(flatten)]
    pub destination: dataplane::migrate::postcopy::PostcopyReport,
    /// Pages the destination guest touched, and its page writes there.
    pub pages_touched: u64,
    pub page_writes_at_destination: u64,
}

#[derive(Debug, Serialize)]
pub struct WorkloadReport {
    pub pattern: Pattern,
    pub dirty_rate_mbs: f64,
    pub page_writes: u64,
}

#[derive(Debug, Serialize)]
pub struct PlanSummary {
    pub transport: String,
    pub workers: usize,
    pub lanes: u32,
    pub chunk_bytes: u64,
    pub compression: String,
}

/// What the demo prints (`--json`: all of it).
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub guest: ImageStats,
    pub workload: WorkloadReport,
    pub plan: PlanSummary,
    pub rounds: Vec<RoundReport>,
    /// From handing the memory to the source ferryd until the destination VMM holds the
    /// verified memory.
    pub total_seconds: f64,
    /// The VMM's view: from pausing the guest until the destination holds its memory.
    pub downtime_ms: f64,
    /// ferry's stop-and-copy round including the digest comparison.
    pub ferry_downtime_ms: f64,
    pub downtime_budget_ms: f64,
    /// Guest bytes per second over the whole migration, GB/s.
    pub gbps: f64,
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    pub zero_pages: u64,
    pub compression_ratio: f64,
    /// CPU seconds of both ferryd processes per GiB of guest memory.
    pub cpu_seconds_per_gib: f64,
    /// The destination's memory equals the paused source's, compared byte for byte
    /// (post-copy: every page the destination guest touched held the source's page when it
    /// first read it, and every other page equals it byte for byte).
    pub verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyDemo>,
    pub verify_seconds: f64,
    pub source: MigrationReport,
    pub destination: MigrationReport,
}

/// A `ferryd` child, stopped (SIGTERM) when dropped; its log kept for error messages.
struct Ferryd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Ferryd {
    /// Starts ferryd and returns once it says it is ready (its log line); the log is
    /// kept in DIR/NAME.log.
    fn start(bin: &Path, dir: &Path, name: &'static str, plan: &Path, key: &Path) -> Result<Ferryd, CtlError> {
        use std::io::{BufRead, Write};
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut out = File::create(&log).map_err(|e| CtlError::io(format!("cannot create {}", log.display()), e))?;
        let mut child = Command::new(bin)
            .arg("--plan")
            .arg(plan)
            .arg("--key")
            .arg(key)
            .arg("--control")
            .arg(&socket)
            .args(["--metrics", "off"])
            // The ready line is an info line, whatever the caller's RUST_LOG says.
            .env("RUST_LOG", std::env::var("FERRY_DEMO_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                CtlError::io(format!("cannot start {} (build it with `cargo build --release` or give --ferryd)", bin.display()), e)
            })?;
        let stderr = child.stderr.take().expect("piped");
        let (ready, is_ready) = std::sync::mpsc::channel();
        // Copies ferryd's log to the file for as long as it runs, and says when it is ready.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(out, "{line}");
                if line.contains("ferryd ready") {
                    let _ = ready.send(());
                }
            }
        });
        let d = Ferryd { child, socket, log };
        match is_ready.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => Ok(d),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(CtlError::FerrydStart { name, why: "exited before it was ready", log: d.log_tail() })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(CtlError::FerrydStart { name, why: "was not ready within 20 s", log: d.log_tail() })
            }
        }
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// user + system CPU seconds so far, from /proc.
    fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }
}

/// User and system CPU seconds process `pid` has used so far, from /proc (0 once it is
/// gone).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / clock_ticks()
}

impl Drop for Ferryd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |t| t as f64)
}

fn ferryd_binary(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    let next = std::env::current_exe().ok().map(|e| e.with_file_name("ferryd"));
    next.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("ferryd"))
}

/// Runs the demo's migrations (`--runs`) through one pair of ferryd, handing each report
/// to `done` as it ends; `progress` gets one line per event for a terminal.
pub fn run(a: &MigrateArgs, progress: &mut dyn FnMut(String), done: &mut dyn FnMut(DemoReport)) -> Result<(), CtlError> {
    // The work directory lives as long as the ferryd in it.
    let (_dir, plan, src, dst) = start_ferryds(a, progress)?;
    for i in 0..a.runs {
        if a.runs > 1 {
            progress(format!("run {} of {}", i + 1, a.runs));
        }
        let a = MigrateArgs { seed: a.seed.wrapping_add(u64::from(i)), ..a.clone() };
        done(migrate(&a, &plan, &src, &dst, progress)?);
    }
    Ok(())
}

/// One migration of a new simulated guest from `src` to `dst`, and the byte-for-byte check.
fn migrate(
    a: &MigrateArgs,
    plan: &dataplane::plan::Plan,
    src: &Ferryd,
    dst: &Ferryd,
    progress: &mut dyn FnMut(String),
) -> Result<DemoReport, CtlError> {
    let size = a.size_mib << 20;
    let (map, mem, bitmap, image) = guest_memory(a, progress)?;
    let log = Arc::new(DirtyLog::new(size.div_ceil(guest::PAGE as u64)));
    let workload = Workload::start(map, log.clone(), (a.dirty_rate_mbs * 1e6) as u64, a.pattern, a.seed);

    let cpu0 = src.cpu_seconds() + dst.cpu_seconds();
    let incoming = MigrateIn::start(&dst.socket, "127.0.0.1:0")?;
    let addr = incoming.addr.clone();
    let (running_tx, running) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = destination_vmm(incoming, running_tx);
        (r, Instant::now())
    });
    let t0 = Instant::now();
    let opts = OutOptions {
        downtime_ms: Some(a.downtime_ms),
        max_rounds: Some(a.max_rounds),
        rate_limit_mbit: a.rate_limit_mbit,
        compress: a.compress.clone(),
        transport: a.transport.clone(),
        verify: Some(a.verify),
        recover_s: None,
    };
    let with_logs = |e: CtlError| CtlError::WithLogs { source: Box::new(e), source_log: src.log_tail(), destination_log: dst.log_tail() };
    let harvest = |log: &DirtyLog| log.harvest_into(&bitmap).map_err(|e| CtlError::io("writing the dirty bitmap", e));
    // Dirty logging starts now: round 0 sends everything, round 1 what changed since.
    harvest(&log)?;
    let mut out = MigrateOut::start(&src.socket, &addr, &mem, &bitmap, &opts).map_err(|e| with_logs(e.into()))?;
    let mut rounds = 0;
    loop {
        let r = out.round().map_err(|e| with_logs(e.into()))?;
        progress(round_line(&r));
        rounds += 1;
        if r.advise_pause || (a.postcopy && r.advise_postcopy) || a.switch_after_rounds.is_some_and(|n| rounds >= n) {
            break;
        }
        harvest(&log)?;
    }
    let (map, page_writes) = workload.pause();
    let paused = Instant::now();
    let last = harvest(&log)?;
    progress(format!("guest paused; {last} pages dirtied since the last round"));
    let run = Run { a, size, t0, paused, cpu0, image, page_writes, rounds, mem: &mem, plan, src, dst };
    if a.postcopy {
        // The paused guest is read through `mem`; its mapping goes after, not in the
        // switch-over's downtime (unmapping a large guest takes milliseconds).
        let r = postcopy(run, out, DestinationVmm { waiter, running }, progress).map_err(with_logs);
        drop(map);
        return r;
    }
    let source = out.finish().map_err(|e| with_logs(e.into()))?;
    let ((memory, destination), resumed) = match waiter.join().expect("waiter thread panicked") {
        (Ok(Arrived::Memory(m, r)), at) => ((m, r), at),
        (Ok(Arrived::Postcopy(..)), _) => return Err(DemoFailure::Unexpected("the destination switched to post-copy unasked").into()),
        (Err(e), _) => return Err(with_logs(e)),
    };
    let downtime = resumed.duration_since(paused).as_secs_f64();
    let total = resumed.duration_since(t0).as_secs_f64();
    let cpu = src.cpu_seconds() + dst.cpu_seconds() - cpu0;
    if let Some(r) = source.rounds.last() {
        progress(round_line(r));
    }

    // The destination VMM's memory against the paused source, byte for byte (read with
    // pread: holes read as zeros without being allocated).
    let tv = Instant::now();
    drop(map);
    let [memory]: [File; 1] = memory.try_into().map_err(|m: Vec<File>| DemoFailure::Regions(m.len()))?;
    compare(&mem, &memory, size)?;
    let verify_seconds = tv.elapsed().as_secs_f64();
    Ok(report(&run, source, destination, Measured { total, downtime_ms: downtime * 1e3, cpu, verify_seconds }, None))
}

/// Checks the arguments, plans, and starts the source and destination ferryd in a work
/// directory of their own (kept with FERRY_DEMO_KEEP=1).
fn start_ferryds(
    a: &MigrateArgs,
    progress: &mut dyn FnMut(String),
) -> Result<(tempfile::TempDir, dataplane::plan::Plan, Ferryd, Ferryd), CtlError> {
    if a.size_mib == 0 {
        return Err(Usage::NoSize.into());
    }
    if !(a.dirty_rate_mbs >= 0.0 && a.dirty_rate_mbs.is_finite()) {
        return Err(Usage::DirtyRate(a.dirty_rate_mbs).into());
    }
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    transfer::override_config(&mut cfg, Some(a.transport.as_deref().unwrap_or("tcp")), a.compress.as_deref())?;
    let caps = hw::probe(&hw::ProbeOptions::default());
    let plan = transfer::transfer_plan(&caps, &cfg)?;

    let mut dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir().map_err(|e| CtlError::io("cannot make a work directory", e))?;
    // FERRY_DEMO_LOG=debug FERRY_DEMO_KEEP=1: both ferryd logs at debug, kept afterwards.
    dir.disable_cleanup(std::env::var_os("FERRY_DEMO_KEEP").is_some());
    let plan_path = dir.path().join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string_pretty(&plan).expect("plans serialise"))
        .map_err(|e| CtlError::io(format!("cannot write {}", plan_path.display()), e))?;
    let key_path = dir.path().join("key");
    // A key file the demo cannot write is its own failure, not the user's.
    transfer::write_new_key(&key_path).map_err(|e| match e {
        CtlError::CreateKey { path, source } => CtlError::io(format!("cannot create {}", path.display()), source),
        e => e,
    })?;
    let bin = ferryd_binary(a.ferryd.as_deref());
    let src = Ferryd::start(&bin, dir.path(), "source", &plan_path, &key_path)?;
    let dst = Ferryd::start(&bin, dir.path(), "destination", &plan_path, &key_path)?;
    let per_worker =
        plan.rdma.as_ref().filter(|_| plan.transport == Transport::Rdma).map_or(plan.tcp.connections_per_worker, |r| r.qps_per_worker);
    progress(format!(
        "source and destination ferryd running (pids {} and {}): {} worker(s), {} {} lane(s) each, compression {}",
        src.child.id(),
        dst.child.id(),
        plan.worker_cpus.len(),
        plan.worker_cpus.len() as u32 * per_worker,
        plan.transport,
        plan.compression
    ));
    Ok((dir, plan, src, dst))
}

/// The guest: memory in a memfd, filled with the image (and the descriptor ferryd gets);
/// the dirty bitmap in another.
fn guest_memory(a: &MigrateArgs, progress: &mut dyn FnMut(String)) -> Result<(guest::GuestRam, File, File, ImageStats), CtlError> {
    let size = a.size_mib << 20;
    // Written by the demo only (the image, then the workload): ferryd gets a read-only
    // descriptor; or, preallocated, shared read-write as a VMM hands over its memfd.
    let mut map =
        guest::GuestRam::new(size, a.prealloc).map_err(|e| CtlError::io(format!("cannot create {size} bytes of guest memory"), e))?;
    let mem = map.descriptor().map_err(|e| CtlError::io("cannot open the guest memory", e))?;
    let bitmap = hw::memmap::memfd("ferry-demo-dirty", dataplane::migrate::bitmap_bytes(size), false)
        .map_err(|e| CtlError::io("cannot create the dirty bitmap", e))?;
    let image = map.fill_image(a.seed).map_err(|e| CtlError::io("cannot write the guest image", e))?;
    progress(format!(
        "guest: {} MiB image in {:.1} s ({} zero, {} ELF, {} text, {} random pages)",
        a.size_mib, image.seconds, image.zero_pages, image.elf_pages, image.text_pages, image.random_pages
    ));
    Ok((map, mem, bitmap, image))
}

/// What one demo run measured, for its report.
struct Run<'a> {
    a: &'a MigrateArgs,
    size: u64,
    t0: Instant,
    paused: Instant,
    cpu0: f64,
    image: ImageStats,
    page_writes: u64,
    /// Pre-copy rounds run.
    rounds: u32,
    /// The paused guest's memory (read-only, unless the guest was preallocated and
    /// shared read-write).
    mem: &'a File,
    plan: &'a dataplane::plan::Plan,
    src: &'a Ferryd,
    dst: &'a Ferryd,
}

/// What the destination VMM's thread got.
enum Arrived {
    /// Pre-copy: the verified memory and the report.
    Memory(Vec<File>, MigrationReport),
    /// Post-copy: the report, once every page was local (the mapping the guest ran on went
    /// to the main thread on `running`).
    Postcopy(MigrationReport),
}

/// The destination VMM's thread: its result and when it came, and (post-copy) the mapping
/// the guest runs on with the time ferryd began serving its faults.
struct DestinationVmm {
    waiter: std::thread::JoinHandle<(Result<Arrived, CtlError>, Instant)>,
    running: std::sync::mpsc::Receiver<(hw::uffd::GuestMapping, Instant)>,
}

/// Times and CPU one demo run measured.
struct Measured {
    /// From handing the memory to the source ferryd until the destination VMM had it.
    total: f64,
    downtime_ms: f64,
    /// Both ferryd's CPU seconds.
    cpu: f64,
    verify_seconds: f64,
}

/// The destination VMM: takes the memory, or (post-copy) maps it, registers a
/// userfaultfd over the mapping, hands it to ferryd and runs the guest there, which it
/// hands to `running` with the time.
fn destination_vmm(incoming: MigrateIn, running: std::sync::mpsc::Sender<(hw::uffd::GuestMapping, Instant)>) -> Result<Arrived, CtlError> {
    match incoming.next()? {
        Arrival::Memory(m, r) => Ok(Arrived::Memory(m, *r)),
        Arrival::Postcopy(mut p) => {
            let [file] = &p.memory[..] else {
                return Err(DemoFailure::Regions(p.memory.len()).into());
            };
            let uffd = hw::uffd::Userfault::create()?;
            let map = uffd.map_registered(file)?;
            let maps = [Mapping { addr: map.addr(), len: map.len() }];
            p.serve(&uffd, &maps)?;
            let _ = running.send((map, Instant::now()));
            // Every page local: the mapping is unregistered, and stops faulting into ferry.
            Ok(p.wait(&uffd).map(Arrived::Postcopy)?)
        }
    }
}

/// The post-copy half of the demo, once the source guest paused: the switch-over, the
/// guest's workload at the destination while ferry serves its faults and pushes the rest,
/// and the check of what the guest saw against the paused source.
fn postcopy(run: Run<'_>, out: MigrateOut, vmm: DestinationVmm, progress: &mut dyn FnMut(String)) -> Result<DemoReport, CtlError> {
    let DestinationVmm { waiter, running } = vmm;
    let a = run.a;
    let switching = out.postcopy()?;
    let (dest_map, resumed) = match running.recv_timeout(Duration::from_secs(30)) {
        Ok(m) => m,
        Err(_) => {
            return Err(match waiter.join().expect("waiter thread panicked").0 {
                Err(e) => e,
                Ok(_) => DemoFailure::Unexpected("the destination VMM never ran the guest").into(),
            });
        }
    };
    let workload = guest::DestWorkload::start(dest_map, (a.dirty_rate_mbs * 1e6) as u64, a.pattern, a.seed);
    let downtime_ms = resumed.duration_since(run.paused).as_secs_f64() * 1e3;
    progress(format!(
        "switched over to post-copy: the guest runs at the destination {downtime_ms:.1} ms after it paused (ferry {:.1} ms)",
        switching.switch_ms
    ));
    // The guest runs at the destination now: its outcome is the migration's. A source that
    // failed is waited for there (up to recover_s), and the destination says how it ended.
    let source = switching.wait();
    if let Err(e) = &source {
        progress(format!("the source failed ({e}); the destination, which runs the guest, waits for it to come back"));
    }
    let (dest, done) = waiter.join().expect("waiter thread panicked");
    let destination = match dest? {
        Arrived::Postcopy(r) => r,
        Arrived::Memory(..) => return Err(DemoFailure::Unexpected("the destination took the memory as pre-copy").into()),
    };
    let source = source?;
    let total = done.duration_since(run.t0).as_secs_f64();
    let (dest_map, seen) = workload.stop();
    let cpu = run.src.cpu_seconds() + run.dst.cpu_seconds() - run.cpu0;
    let tv = Instant::now();
    check_postcopy(run.mem, &dest_map, &seen)?;
    let verify_seconds = tv.elapsed().as_secs_f64();
    let pc = destination.postcopy.clone().unwrap_or_default();
    progress(format!(
        "post-copy: {} stale pages; {} faults ({} waited for the source, by {}: p50 {} us, p99 {} us, max {} us); {} pages by fault, {} pushed; all local after {:.3} s",
        pc.stale_pages,
        pc.faults,
        pc.remote_faults,
        pc.fault_path,
        pc.fault_latency_us_p50,
        pc.fault_latency_us_p99,
        pc.fault_latency_us_max,
        pc.pages_by_fault,
        pc.pages_by_push,
        pc.all_local_seconds
    ));
    let demo = PostcopyDemo {
        rounds_before_switch: run.rounds,
        switchover_downtime_ms: downtime_ms,
        ferry_switch_ms: source.switch_ms.unwrap_or(0.0),
        destination: pc,
        pages_touched: seen.pages.iter().filter(|p| p.is_some()).count() as u64,
        page_writes_at_destination: seen.page_writes,
    };
    Ok(report(&run, source, destination, Measured { total, downtime_ms, cpu, verify_seconds }, Some(demo)))
}

/// Post-copy's check: each page the destination guest touched held the paused source's
/// page when the guest first read it; every other page equals the source's byte for byte.
fn check_postcopy(want: &File, got: &hw::uffd::GuestMapping, seen: &guest::FirstSeen) -> Result<(), CtlError> {
    use std::os::unix::fs::FileExt;
    let (mut page, mut there) = (vec![0u8; guest::PAGE], vec![0u8; guest::PAGE]);
    for (p, first) in seen.pages.iter().enumerate() {
        let at = (p * guest::PAGE) as u64;
        want.read_exact_at(&mut page, at).map_err(|e| CtlError::io("reading the guest memory", e))?;
        if let Some(h) = first {
            if *h != guest::page_hash(&page) {
                return Err(DemoFailure::Stale { page: p as u64, offset: at }.into());
            }
            continue;
        }
        got.read(at, &mut there);
        if there != page {
            return Err(DemoFailure::Differs { page: p as u64, offset: at }.into());
        }
    }
    Ok(())
}

/// The demo's report from both sides' reports.
fn report(run: &Run<'_>, source: MigrationReport, destination: MigrationReport, m: Measured, postcopy: Option<PostcopyDemo>) -> DemoReport {
    let Measured { total, downtime_ms, cpu, verify_seconds } = m;
    let (a, size) = (run.a, run.size);
    DemoReport {
        guest: run.image.clone(),
        workload: WorkloadReport { pattern: a.pattern, dirty_rate_mbs: a.dirty_rate_mbs, page_writes: run.page_writes },
        plan: PlanSummary {
            transport: source.transport.clone(),
            workers: run.plan.worker_cpus.len(),
            lanes: source.lanes,
            chunk_bytes: run.plan.chunk_size_bytes,
            compression: source.compression.clone(),
        },
        rounds: source.rounds.clone(),
        total_seconds: total,
        downtime_ms,
        ferry_downtime_ms: source.downtime_ms,
        downtime_budget_ms: a.downtime_ms as f64,
        gbps: size as f64 / total / 1e9,
        sent_bytes: source.sent_bytes,
        wire_bytes: source.wire_bytes,
        zero_pages: source.zero_pages,
        compression_ratio: source.compression_ratio(),
        cpu_seconds_per_gib: cpu / (size as f64 / (1u64 << 30) as f64),
        verified: true,
        verify_seconds,
        postcopy,
        source,
        destination,
    }
}

/// Compares two memory files of `size` bytes; the first differing page is the error.
fn compare(want: &File, got: &File, size: u64) -> Result<(), CtlError> {
    use std::os::unix::fs::FileExt;
    let got_len = got.metadata().map_err(|e| CtlError::io("the migrated memory", e))?.len();
    if got_len != size {
        return Err(DemoFailure::Size { got: got_len, want: size }.into());
    }
    const PIECE: usize = 1 << 20;
    let (mut a, mut b) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(PIECE as u64) as usize;
        want.read_exact_at(&mut a[..n], off).map_err(|e| CtlError::io("reading the guest memory", e))?;
        got.read_exact_at(&mut b[..n], off).map_err(|e| CtlError::io("reading the migrated memory", e))?;
        if let Some(p) = a[..n].chunks(guest::PAGE).zip(b[..n].chunks(guest::PAGE)).position(|(x, y)| x != y) {
            let at = off + (p * guest::PAGE) as u64;
            return Err(DemoFailure::Differs { page: at / guest::PAGE as u64, offset: at }.into());
        }
        off += n as u64;
    }
    Ok(())
}

fn round_line(r: &RoundReport) -> String {
    format!(
        "round {:>2}{}: {:>8} pages {:>9.1} MiB in {:>7.3} s = {:>5.2} GB/s{}{}",
        r.round,
        if r.last { " (stop-and-copy)" } else { "" },
        r.dirty_pages,
        r.dirty_bytes as f64 / (1 << 20) as f64,
        r.seconds,
        r.gbps,
        r.estimated_downtime_ms.filter(|_| !r.last).map_or_else(String::new, |e| format!(", downtime if paused now ~{e:.0} ms")),
        match (r.advise_pause, r.advise_postcopy) {
            (true, _) => ": pause",
            (false, true) => ": switch to post-copy",
            _ => "",
        }
    )
}

/// The report for a terminal.
pub fn summary(r: &DemoReport) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let downtime = match &r.postcopy {
        Some(p) => format!(
            "switch-over downtime {:.1} ms (ferry's part {:.1} ms; pre-copy rounds before it: {}; budget {:.0} ms)\n\
             post-copy: {} stale pages; {} faults, {} waited for the source (by {}: p50 {} us, p99 {} us, max {} us); \
             {} pages by fault, {} pushed; all local {:.3} s after the switch-over; {} attempt(s)",
            r.downtime_ms,
            p.ferry_switch_ms,
            p.rounds_before_switch,
            r.downtime_budget_ms,
            p.destination.stale_pages,
            p.destination.faults,
            p.destination.remote_faults,
            p.destination.fault_path,
            p.destination.fault_latency_us_p50,
            p.destination.fault_latency_us_p99,
            p.destination.fault_latency_us_max,
            p.destination.pages_by_fault,
            p.destination.pages_by_push,
            p.destination.all_local_seconds,
            p.destination.attempts
        ),
        None => format!(
            "downtime {:.1} ms (ferry's stop-and-copy and verification {:.1} ms; budget {:.0} ms)",
            r.downtime_ms, r.ferry_downtime_ms, r.downtime_budget_ms
        ),
    };
    let check = if r.postcopy.is_some() {
        "every page the destination guest read was the paused source's, and every page it did not touch equals it byte for byte"
    } else {
        "destination memory equals the paused guest byte for byte"
    };
    format!(
        "migrated {:.0} MiB in {:.3} s ({:.2} GB/s) over {} lane(s), {} round(s)\n\
         {downtime}\n\
         sent {:.1} MiB of pages, {:.1} MiB on the wire; {} zero pages skipped; compression {} ({:.2}x)\n\
         {:.2} CPU s/GiB (both ferryd); {check} (checked in {:.2} s)",
        mib(r.guest.bytes),
        r.total_seconds,
        r.gbps,
        r.plan.lanes,
        r.rounds.len(),
        mib(r.sent_bytes),
        mib(r.wire_bytes),
        r.zero_pages,
        r.plan.compression,
        r.compression_ratio,
        r.cpu_seconds_per_gib,
        r.verify_seconds
    )
}
