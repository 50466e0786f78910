//! `ferryctl send` and `ferryctl recv` with the embedded data plane: plan from the probe
//! and the config, then run the transfer, with a progress bar on a terminal and a JSON
//! report on request.

use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dataplane::auth::{Auth, Key};
use dataplane::engine::Report;
use dataplane::engine::recv::{RecvOptions, recv_file};
use dataplane::engine::send::{SendOptions, send_file};
use dataplane::plan::Plan;
use hw::Capabilities;

use crate::config::{CompressionChoice, Config, TransportChoice};
use crate::planner;

/// The plan a transfer runs with. RDMA moves pages with one-sided writes, which cannot be
/// decompressed on arrival: asking for both RDMA and zstd is refused rather than half
/// obeyed. (An RDMA plan keeps its compression choice for a receiver that has no RDMA,
/// where the data falls back to TCP.)
pub fn transfer_plan(caps: &Capabilities, cfg: &Config) -> Result<Plan, String> {
    if cfg.dataplane.transport == TransportChoice::Rdma && matches!(cfg.migration.compression, CompressionChoice::Zstd(_)) {
        return Err("--compress zstd:N cannot apply with --transport rdma: RDMA WRITEs place pages directly in the destination, \
                    where nothing decompresses them; use --compress off or auto, or --transport tcp"
            .into());
    }
    planner::plan(caps, cfg).map_err(|e| format!("cannot plan: {e}"))
}

/// Applies `--transport` and `--compress` to the config.
pub fn override_config(cfg: &mut Config, transport: Option<&str>, compress: Option<&str>) -> Result<(), String> {
    if let Some(t) = transport {
        cfg.dataplane.transport = match t {
            "auto" => TransportChoice::Auto,
            "rdma" => TransportChoice::Rdma,
            "tcp" => TransportChoice::Tcp,
            "sockets" => TransportChoice::Sockets,
            _ => return Err(format!("--transport {t}: use auto, rdma, tcp or sockets")),
        };
    }
    if let Some(c) = compress {
        cfg.migration.compression = c.parse::<CompressionChoice>().map_err(|e| format!("--compression: {e}"))?;
    }
    Ok(())
}

/// Writes a new random pre-shared key to `out` (mode 0600; an existing file is never
/// overwritten). The error carries its exit status: 2 when the file cannot be created.
pub fn write_new_key(out: &Path) -> Result<(), (u8, String)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let hex = Key::generate_hex().map_err(|e| (1, format!("no randomness: {e}")))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| (2, format!("cannot create {}: {e}", out.display())))?;
    writeln!(f, "{hex}").map_err(|e| (1, format!("cannot write {}: {e}", out.display())))
}

pub fn auth(key: Option<&Path>, insecure: bool) -> Result<Auth, String> {
    match (key, insecure) {
        (Some(_), true) => Err("give either --key FILE or --insecure-no-auth, not both".into()),
        (Some(p), false) => Key::load(p).map(Auth::Key).map_err(|e| e.to_string()),
        (None, true) => Ok(Auth::Insecure),
        (None, false) => Err("no --key FILE given: peers authenticate with a pre-shared key (`ferryctl keygen --out FILE` makes one); --insecure-no-auth turns that off".into()),
    }
}

/// A progress bar on stderr, on terminals only: a spinner with the bytes moved until the
/// total is known (a receiver learns it when the sender describes the region), then a bar
/// against the total with the rate and an ETA.
#[derive(Debug)]
pub struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    pub fn new(show: bool) -> Bar {
        if !show || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(Self::style("{spinner} {bytes} {binary_bytes_per_sec} (waiting for the size)"));
        Bar(Some(bar))
    }

    fn style(template: &str) -> indicatif::ProgressStyle {
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    }

    /// Whether the bar shows (on a terminal, when asked for).
    pub fn shown(&self) -> bool {
        self.0.is_some()
    }

    /// `done` of `total` bytes (0: not known yet).
    pub fn update(&self, done: u64, total: u64) {
        let Some(bar) = &self.0 else { return };
        if total > 0 && bar.length() != Some(total) {
            bar.set_length(total);
            bar.set_style(Self::style("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"));
        }
        bar.set_position(done);
    }

    /// `done` bytes of a stream whose length nobody knows, with `what` beside them.
    pub fn update_unsized(&self, done: u64, what: &str) {
        let Some(bar) = &self.0 else { return };
        if bar.message().is_empty() {
            bar.set_style(Self::style("{spinner} {bytes} {binary_bytes_per_sec} {msg}"));
        }
        bar.set_message(what.to_string());
        bar.set_position(done);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Runs `f` while a progress bar follows `counter` up to `total`.
fn with_progress<T>(total: &AtomicU64, show: bool, counter: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let bar = Bar::new(show);
    if bar.0.is_none() {
        return f();
    }
    let tick = || bar.update(counter.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
    dataplane::live::ticking(Duration::from_millis(100), tick, f)
}

/// Sends `file`; `require_rdma` fails the transfer rather than falling back to TCP when the
/// receiver has no RDMA port.
pub fn send(to: &str, file: &Path, auth: Auth, plan: &Plan, require_rdma: bool, show_progress: bool) -> Result<Report, String> {
    let total = std::fs::metadata(file).map(|m| m.len()).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let progress = AtomicU64::new(0);
    let opts = SendOptions { to: to.to_string(), auth, plan, progress: Some(&progress), require_rdma, pool: None };
    with_progress(&AtomicU64::new(total), show_progress, &progress, || send_file(file, &opts)).map_err(|e| e.to_string())
}

pub fn recv(listen: &str, out: &Path, auth: Auth, plan: &Plan, show_progress: bool, timeout: Option<Duration>) -> Result<Report, String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    log::info!("listening on {}", listener.local_addr().map_or_else(|_| listen.to_string(), |a| a.to_string()));
    // The size is known once the sender describes the session.
    let (progress, total) = (AtomicU64::new(0), AtomicU64::new(0));
    let opts = RecvOptions { auth, plan, progress: Some(&progress), total: Some(&total), timeout };
    with_progress(&total, show_progress, &progress, || recv_file(&listener, out, &opts)).map_err(|e| e.to_string())
}

/// One line for a terminal.
pub fn summary(r: &Report) -> String {
    let rdma = r.rdma.as_ref().map_or_else(String::new, |x| {
        format!(
            ", RDMA: {} WRs ({} SGEs, up to {} per WR) in {} doorbells, registered {} MiB at {:.2} GB/s",
            x.work_requests,
            x.sges,
            x.max_sges_per_wr,
            x.posts,
            x.registered_bytes >> 20,
            x.registration_gbps
        )
    });
    let ratio = if r.compressed_out_bytes > 0 {
        format!(", zstd {:.2}x on {} MiB", r.compressed_in_bytes as f64 / r.compressed_out_bytes as f64, r.compressed_in_bytes >> 20)
    } else {
        String::new()
    };
    format!(
        "{}: {} bytes in {:.3} s = {:.2} GB/s ({} wire bytes, {} zero pages skipped{ratio}), {} lane(s), {:.2} CPU s/GiB, transport {}, digest {} matches{rdma}",
        r.role, r.bytes, r.seconds, r.gbps, r.wire_bytes, r.zero_pages, r.lanes, r.cpu_seconds_per_gib, r.transport, r.digest
    )
}

/// The control socket of a local ferryd: `$FERRY_SOCKET`, else /run/ferry/ferryd.sock.
pub fn default_socket() -> std::path::PathBuf {
    std::env::var_os("FERRY_SOCKET").map_or_else(|| "/run/ferry/ferryd.sock".into(), Into::into)
}

/// Sends one request to ferryd and follows its replies to the final one, with its
/// `progress` events (asked for by the request) on `bar`.
pub fn via_ferryd(socket: &Path, request: &dataplane::daemon::Request, bar: &Bar) -> Result<serde_json::Value, String> {
    let conn = connect(socket)?;
    follow(conn, socket, request, bar, &mut |_| {})
}

/// The control socket of the ferryd at `socket`.
pub fn connect(socket: &Path) -> Result<std::os::unix::net::UnixStream, String> {
    std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("cannot reach ferryd at {}: {e}", socket.display()))
}

/// [`via_ferryd`] on a connection the caller made (and may shut down to call the request
/// off), with every event also handed to `on_event`.
pub fn follow(
    conn: std::os::unix::net::UnixStream,
    socket: &Path,
    request: &dataplane::daemon::Request,
    bar: &Bar,
    on_event: &mut dyn FnMut(&serde_json::Value),
) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, Write};
    let line = serde_json::to_string(request).expect("requests serialise");
    writeln!(&conn, "{line}").map_err(|e| format!("writing to ferryd: {e}"))?;
    for reply in std::io::BufReader::new(conn).lines() {
        let reply = reply.map_err(|e| format!("reading from ferryd: {e}"))?;
        let v: serde_json::Value = serde_json::from_str(&reply).map_err(|e| format!("ferryd sent a bad reply ({e}): {reply}"))?;
        if v["event"] == "listening" {
            log::info!("listening on {} (via ferryd at {})", v["addr"].as_str().unwrap_or("?"), socket.display());
        }
        if v["event"] == "progress" {
            let bytes = v["bytes"].as_u64().unwrap_or(0);
            match v["channels"].as_u64() {
                Some(n) => bar.update_unsized(bytes, &format!("{n} channel(s)")),
                None => bar.update(bytes, v["total"].as_u64().unwrap_or(0)),
            }
        }
        if v.get("event").is_some() {
            on_event(&v);
            continue;
        }
        if v["ok"] == true {
            return Ok(v);
        }
        return Err(v["error"].as_str().unwrap_or("ferryd failed without a reason").to_string());
    }
    Err("ferryd closed the control connection without a result".into())
}
