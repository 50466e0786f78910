//! `ferryctl send` and `ferryctl recv` with the embedded data plane: plan from the probe
//! and the config, then run the transfer, with a progress bar on a terminal and a JSON
//! report on request.

use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dataplane::auth::{Auth, Key};
use dataplane::client::{Client, ClientError};
use dataplane::engine::Report;
use dataplane::engine::recv::{RecvOptions, recv_file};
use dataplane::engine::send::{SendOptions, send_file};
use dataplane::plan::Plan;
use dataplane::protocol::Event;
use hw::Capabilities;

use crate::config::{CompressionChoice, Config, TransportChoice};
use crate::error::{CtlError, Usage};
use crate::planner;

/// The plan a transfer runs with. RDMA moves pages with one-sided writes, which cannot be
/// decompressed on arrival: asking for both RDMA and zstd is refused rather than half
/// obeyed. (An RDMA plan keeps its compression choice for a receiver that has no RDMA,
/// where the data falls back to TCP.)
pub fn transfer_plan(caps: &Capabilities, cfg: &Config) -> Result<Plan, CtlError> {
    if cfg.dataplane.transport == TransportChoice::Rdma && matches!(cfg.migration.compression, CompressionChoice::Zstd(_)) {
        return Err(Usage::RdmaWithZstd.into());
    }
    Ok(planner::plan(caps, cfg)?)
}

/// Applies `--transport` and `--compress` to the config.
pub fn override_config(cfg: &mut Config, transport: Option<&str>, compress: Option<&str>) -> Result<(), Usage> {
    if let Some(t) = transport {
        cfg.dataplane.transport = match t {
            "auto" => TransportChoice::Auto,
            "rdma" => TransportChoice::Rdma,
            "tcp" => TransportChoice::Tcp,
            "sockets" => TransportChoice::Sockets,
            _ => {
                let source = dataplane::BadChoice { what: "transport", got: t.into(), choices: "auto, rdma, tcp or sockets" };
                return Err(Usage::Choice { flag: "transport", source });
            }
        };
    }
    if let Some(c) = compress {
        cfg.migration.compression = c.parse::<CompressionChoice>().map_err(|source| Usage::Choice { flag: "compress", source })?;
    }
    Ok(())
}

/// Writes a new random pre-shared key to `out` (mode 0600; an existing file is never
/// overwritten).
pub fn write_new_key(out: &Path) -> Result<(), CtlError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let hex = Key::generate_hex()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|source| CtlError::CreateKey { path: out.to_path_buf(), source })?;
    writeln!(f, "{hex}").map_err(|e| CtlError::io(format!("cannot write {}", out.display()), e))
}

pub fn auth(key: Option<&Path>, insecure: bool) -> Result<Auth, CtlError> {
    match (key, insecure) {
        (Some(_), true) => Err(Usage::KeyAndInsecure.into()),
        (Some(p), false) => Ok(Key::load(p).map(Auth::Key)?),
        (None, true) => Ok(Auth::Insecure),
        (None, false) => Err(Usage::NoKey.into()),
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
pub fn send(to: &str, file: &Path, auth: Auth, plan: &Plan, require_rdma: bool, show_progress: bool) -> Result<Report, CtlError> {
    let total = std::fs::metadata(file).map(|m| m.len()).map_err(|e| CtlError::io(format!("cannot read {}", file.display()), e))?;
    let progress = AtomicU64::new(0);
    let opts = SendOptions { to: to.to_string(), auth, plan, progress: Some(&progress), require_rdma, pool: None };
    Ok(with_progress(&AtomicU64::new(total), show_progress, &progress, || send_file(file, &opts))?)
}

pub fn recv(listen: &str, out: &Path, auth: Auth, plan: &Plan, show_progress: bool, timeout: Option<Duration>) -> Result<Report, CtlError> {
    let listener = TcpListener::bind(listen).map_err(|e| CtlError::io(format!("cannot listen on {listen}"), e))?;
    log::info!("listening on {}", listener.local_addr().map_or_else(|_| listen.to_string(), |a| a.to_string()));
    // The size is known once the sender describes the session.
    let (progress, total) = (std::sync::Arc::new(AtomicU64::new(0)), AtomicU64::new(0));
    let opts = RecvOptions { auth, plan, progress: Some(progress.clone()), total: Some(&total), timeout, pool: None };
    Ok(with_progress(&total, show_progress, &progress, || recv_file(&listener, out, &opts))?)
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
pub fn via_ferryd<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &dataplane::daemon::Request,
    bar: &Bar,
    wanted: &'static str,
) -> Result<T, ClientError> {
    follow(&mut Client::connect(socket)?, socket, request, bar, wanted, &mut |_| {})
}

/// [`via_ferryd`] on a connection the caller made (and may shut down to call the request
/// off), with every event also handed to `on_event`.
pub fn follow<T: serde::de::DeserializeOwned>(
    client: &mut Client,
    socket: &Path,
    request: &dataplane::daemon::Request,
    bar: &Bar,
    wanted: &'static str,
    on_event: &mut dyn FnMut(&Event),
) -> Result<T, ClientError> {
    client.send(request, &[])?;
    client.until_done(wanted, &mut |e| {
        match e {
            Event::Listening { addr, .. } => {
                log::info!("listening on {} (via ferryd at {})", addr.as_deref().unwrap_or("?"), socket.display());
            }
            Event::Progress { bytes, total, channels: Some(n) } if *total == 0 => bar.update_unsized(*bytes, &format!("{n} channel(s)")),
            Event::Progress { bytes, total, .. } => bar.update(*bytes, *total),
            _ => {}
        }
        on_event(e);
    })
}
