//! `ferryd` as a service: commands on a UNIX control socket (mode 0600), transfers run
//! by the embedded engine, and Prometheus metrics on a local HTTP port.
//!
//! The control protocol is JSON lines: one request, then one or more replies. A transfer
//! replies `{"event":"listening",...}` (recv) as soon as it can, and `{"ok":true,
//! "report":{...}}` or `{"ok":false,"error":"..."}` when it ends.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::engine::Report;
use crate::engine::recv::{RecvOptions, recv_file};
use crate::engine::send::{SendOptions, send_file};
use crate::migrate::MigrationReport;
use crate::migrate::dest::DestOptions;
use crate::migrate::source::{Source, SourceOptions};
use crate::plan::{Compression, Plan};
use hw::fdpass::LineConn;
use std::os::fd::{AsFd, OwnedFd};

/// A command on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Recv {
        listen: String,
        out: PathBuf,
    },
    Send {
        to: String,
        file: PathBuf,
        compress: Option<String>,
    },
    /// Region mode, destination: waits for one migration on `listen`; the verified guest
    /// memory comes back as a memfd with the final reply.
    MigrateIn {
        listen: String,
    },
    /// Region mode, source: guest memory and dirty-bitmap descriptors come with this line
    /// (SCM_RIGHTS); `round` and `final` lines follow on the same connection.
    MigrateOut {
        to: String,
        #[serde(default)]
        downtime_ms: Option<u64>,
        #[serde(default)]
        max_rounds: Option<u32>,
        #[serde(default)]
        rate_limit_mbit: Option<u64>,
        #[serde(default)]
        compress: Option<String>,
        /// `sent` (default) or `full`: see [`crate::migrate::Verify`].
        #[serde(default)]
        verify: Option<crate::migrate::Verify>,
        /// How many memory descriptors come before the bitmap's, if the VMM wants it checked.
        #[serde(default)]
        regions: Option<usize>,
    },
    /// Inside a `migrate_out` conversation: a pre-copy round over the bitmap's pages.
    Round,
    /// Inside a `migrate_out` conversation: the VMM has paused; stop-and-copy and verify.
    Final,
}

/// Counters and histograms, updated once per session (never per chunk).
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    inner: Mutex<Totals>,
}

#[derive(Debug)]
struct Totals {
    sessions: BTreeMap<(&'static str, &'static str), u64>,
    active: BTreeMap<&'static str, u64>,
    region_bytes: BTreeMap<&'static str, u64>,
    wire_bytes: BTreeMap<&'static str, u64>,
    zero_pages: u64,
    compressed_in: u64,
    compressed_out: u64,
    chunk_latency: hdrhistogram::Histogram<u64>,
    /// Per (role, worker or lane): send chunk latency or receive frame write latency, µs.
    worker_latency: BTreeMap<(&'static str, usize), hdrhistogram::Histogram<u64>>,
    session_seconds: hdrhistogram::Histogram<u64>,
    last_error: Option<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            inner: Mutex::new(Totals {
                sessions: BTreeMap::new(),
                active: BTreeMap::new(),
                region_bytes: BTreeMap::new(),
                wire_bytes: BTreeMap::new(),
                zero_pages: 0,
                compressed_in: 0,
                compressed_out: 0,
                chunk_latency: crate::engine::latency_histogram(),
                worker_latency: BTreeMap::new(),
                session_seconds: crate::engine::latency_histogram(),
                last_error: None,
            }),
        }
    }
}

impl Metrics {
    fn begin(&self, role: &'static str) {
        *self.inner.lock().expect("metrics").active.entry(role).or_default() += 1;
    }

    fn end_migration(&self, role: &'static str, r: &Result<MigrationReport, String>) {
        let mut t = self.inner.lock().expect("metrics");
        *t.active.entry(role).or_default() -= 1;
        *t.sessions.entry((role, if r.is_ok() { "ok" } else { "error" })).or_default() += 1;
        match r {
            Ok(rep) => {
                *t.region_bytes.entry(role).or_default() += rep.sent_bytes;
                *t.wire_bytes.entry(role).or_default() += rep.wire_bytes;
                t.zero_pages += rep.zero_pages;
                t.compressed_in += rep.compressed_in_bytes;
                t.compressed_out += rep.compressed_out_bytes;
                t.session_seconds.saturating_record((rep.seconds * 1e6) as u64);
            }
            Err(e) => t.last_error = Some(e.clone()),
        }
    }

    fn end(&self, role: &'static str, r: &Result<Report, String>) {
        let mut t = self.inner.lock().expect("metrics");
        *t.active.entry(role).or_default() -= 1;
        let result = if r.is_ok() { "ok" } else { "error" };
        *t.sessions.entry((role, result)).or_default() += 1;
        match r {
            Ok(rep) => {
                *t.region_bytes.entry(role).or_default() += rep.bytes;
                *t.wire_bytes.entry(role).or_default() += rep.wire_bytes;
                t.zero_pages += rep.zero_pages;
                t.compressed_in += rep.compressed_in_bytes;
                t.compressed_out += rep.compressed_out_bytes;
                if let Some(h) = &rep.chunk_latency {
                    let _ = t.chunk_latency.add(h);
                }
                for (i, h) in rep.worker_latency.iter().enumerate() {
                    let _ = t.worker_latency.entry((role, i)).or_insert_with(crate::engine::latency_histogram).add(h);
                }
                t.session_seconds.saturating_record((rep.seconds * 1e6) as u64);
            }
            Err(e) => t.last_error = Some(e.clone()),
        }
    }

    /// The Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let t = self.inner.lock().expect("metrics");
        let mut out = String::new();
        let mut add = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for l in lines {
                out += &format!("{name}{l}\n");
            }
        };
        add(
            "ferry_uptime_seconds",
            "gauge",
            "Seconds since ferryd started.",
            vec![format!(" {:.3}", self.started.elapsed().as_secs_f64())],
        );
        add(
            "ferry_sessions_total",
            "counter",
            "Transfer sessions, by role and result.",
            t.sessions.iter().map(|((role, res), n)| format!("{{role=\"{role}\",result=\"{res}\"}} {n}")).collect(),
        );
        add(
            "ferry_sessions_active",
            "gauge",
            "Transfer sessions running now.",
            t.active.iter().map(|(r, n)| format!("{{role=\"{r}\"}} {n}")).collect(),
        );
        add(
            "ferry_region_bytes_total",
            "counter",
            "Region bytes moved by completed sessions.",
            t.region_bytes.iter().map(|(r, n)| format!("{{role=\"{r}\"}} {n}")).collect(),
        );
        add(
            "ferry_wire_bytes_total",
            "counter",
            "Bytes on the wire for completed sessions.",
            t.wire_bytes.iter().map(|(r, n)| format!("{{role=\"{r}\"}} {n}")).collect(),
        );
        add("ferry_zero_pages_total", "counter", "Zero pages sent as a flag instead of data.", vec![format!(" {}", t.zero_pages)]);
        add(
            "ferry_compressed_bytes_total",
            "counter",
            "Region bytes sent compressed (stage=in) and their compressed size (stage=out).",
            vec![format!("{{stage=\"in\"}} {}", t.compressed_in), format!("{{stage=\"out\"}} {}", t.compressed_out)],
        );
        // A summary's lines, with `labels` (`k="v",...`, or empty) on each.
        let quantiles = |h: &hdrhistogram::Histogram<u64>, labels: &str| -> Vec<String> {
            let sep = if labels.is_empty() { "" } else { "," };
            let mut v: Vec<String> = [0.5, 0.95, 0.99]
                .iter()
                .map(|q| format!("{{{labels}{sep}quantile=\"{q}\"}} {:.6}", h.value_at_quantile(*q) as f64 / 1e6))
                .collect();
            v.push(format!("{{{labels}{sep}quantile=\"1\"}} {:.6}", h.max() as f64 / 1e6));
            v.push(if labels.is_empty() { format!("_count {}", h.len()) } else { format!("_count{{{labels}}} {}", h.len()) });
            v
        };
        add(
            "ferry_chunk_send_latency_seconds",
            "summary",
            "Time from handing a chunk to a connection until it was written.",
            quantiles(&t.chunk_latency, ""),
        );
        add("ferry_session_seconds", "summary", "Duration of completed sessions.", quantiles(&t.session_seconds, ""));
        add(
            "ferry_worker_latency_seconds",
            "summary",
            "Per sending worker, chunk handed to a connection until written (role=send); per receiving lane, data frame arrived until in the destination (role=recv). Completed sessions.",
            t.worker_latency.iter().flat_map(|((role, w), h)| quantiles(h, &format!("role=\"{role}\",worker=\"{w}\""))).collect(),
        );
        // Live per-worker counters: updated by the workers as they go, not at session end.
        let live = crate::live::snapshot();
        let per_worker = |f: fn(&crate::live::Snapshot) -> u64| -> Vec<String> {
            live.iter().map(|(r, w, s)| format!("{{role=\"{}\",worker=\"{w}\"}} {}", r.name(), f(s))).collect()
        };
        add(
            "ferry_worker_region_bytes_total",
            "counter",
            "Region bytes each worker (sender) or lane (receiver) has handled, live.",
            per_worker(|s| s.region_bytes),
        );
        add("ferry_worker_wire_bytes_total", "counter", "Bytes on the wire per worker or lane, live.", per_worker(|s| s.wire_bytes));
        add("ferry_worker_frames_total", "counter", "Data frames per worker or lane, live.", per_worker(|s| s.frames));
        add(
            "ferry_worker_zero_pages_total",
            "counter",
            "Zero pages sent or received as a flag per worker or lane, live.",
            per_worker(|s| s.zero_pages),
        );
        out
    }

    /// What `ferryctl status` shows.
    pub fn status(&self) -> serde_json::Value {
        let t = self.inner.lock().expect("metrics");
        serde_json::json!({
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "sessions": t.sessions.iter().map(|((r, res), n)| serde_json::json!({"role": r, "result": res, "count": n})).collect::<Vec<_>>(),
            "active": t.active.iter().map(|(r, n)| serde_json::json!({"role": r, "count": n})).collect::<Vec<_>>(),
            "region_bytes": t.region_bytes,
            "wire_bytes": t.wire_bytes,
            "zero_pages": t.zero_pages,
            "chunk_latency_us": crate::engine::Percentiles::of(&t.chunk_latency),
            "worker_latency_us": t.worker_latency.iter().map(|((r, w), h)| serde_json::json!({"role": r, "worker": w, "latency_us": crate::engine::Percentiles::of(h)})).collect::<Vec<_>>(),
            "last_error": t.last_error,
            "workers": crate::live::snapshot().into_iter().map(|(r, w, s)| serde_json::json!({"role": r.name(), "worker": w, "counters": s})).collect::<Vec<_>>(),
        })
    }
}

/// The running service's shared state.
#[derive(Debug)]
pub struct Daemon {
    pub plan: Plan,
    pub auth: Auth,
    pub metrics: Metrics,
}

/// Binds the control socket with mode 0600, replacing a stale socket file.
pub fn bind_control(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("{} is served by a running ferryd", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

impl Daemon {
    /// Serves the control socket until the process ends; one thread per client.
    pub fn serve_control(&self, listener: UnixListener) {
        std::thread::scope(|s| {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        s.spawn(move || self.client(c));
                    }
                    Err(e) => log::warn!("control socket: accept failed: {e}"),
                }
            }
        });
    }

    fn client(&self, conn: UnixStream) {
        let mut conn = LineConn::new(conn);
        let (line, fds) = match conn.recv() {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => return log::warn!("control socket: {e}"),
        };
        let say = |v: serde_json::Value| {
            let _ = conn.send(&v.to_string(), &[]);
        };
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => return say(serde_json::json!({"ok": false, "error": format!("bad request: {e}")})),
        };
        if !fds.is_empty() && !matches!(req, Request::MigrateOut { .. }) {
            return say(serde_json::json!({"ok": false, "error": "descriptors came with a command that takes none"}));
        }
        match req {
            Request::MigrateIn { listen } => self.migrate_in(&conn, &listen),
            Request::MigrateOut { to, downtime_ms, max_rounds, rate_limit_mbit, compress, verify, regions } => {
                let limits = Limits { downtime_ms, max_rounds, rate_limit_mbit, compress, verify: verify.unwrap_or_default(), regions };
                self.migrate_out(&mut conn, fds, &to, limits);
            }
            Request::Round | Request::Final => {
                say(serde_json::json!({"ok": false, "error": "round and final belong to a migrate_out conversation"}))
            }
            Request::Status => say(
                serde_json::json!({"ok": true, "status": self.metrics.status(), "plan": {"transport": self.plan.transport.to_string(), "workers": self.plan.worker_cpus.len(), "compression": self.plan.compression.to_string()}}),
            ),
            Request::Recv { listen, out } => {
                let listener = match TcpListener::bind(&listen) {
                    Ok(l) => l,
                    Err(e) => return say(serde_json::json!({"ok": false, "error": format!("cannot listen on {listen}: {e}")})),
                };
                let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or(listen);
                say(serde_json::json!({"event": "listening", "addr": addr}));
                self.metrics.begin("recv");
                let r = recv_file(&listener, &out, &RecvOptions { auth: self.auth.clone(), plan: &self.plan, progress: None })
                    .map_err(|e| e.to_string());
                self.metrics.end("recv", &r);
                say(result(r));
            }
            Request::Send { to, file, compress } => {
                let mut plan = self.plan.clone();
                if let Some(c) = compress {
                    match parse_compression(&c, plan.compression) {
                        Ok(c) => plan.compression = c,
                        Err(e) => return say(serde_json::json!({"ok": false, "error": e})),
                    }
                }
                self.metrics.begin("send");
                let r = send_file(&file, &SendOptions { to, auth: self.auth.clone(), plan: &plan, progress: None, require_rdma: false })
                    .map_err(|e| e.to_string());
                self.metrics.end("send", &r);
                say(result(r));
            }
        }
    }

    /// Region mode, destination: one migration into a memfd, handed over on success.
    fn migrate_in(&self, conn: &LineConn, listen: &str) {
        let say = |v: serde_json::Value| {
            let _ = conn.send(&v.to_string(), &[]);
        };
        let listener = match TcpListener::bind(listen) {
            Ok(l) => l,
            Err(e) => return say(serde_json::json!({"ok": false, "error": format!("cannot listen on {listen}: {e}")})),
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| listen.to_string());
        say(serde_json::json!({"event": "listening", "addr": addr}));
        self.metrics.begin("migrate_in");
        let r =
            crate::migrate::dest::accept(&listener, &DestOptions { auth: self.auth.clone(), plan: &self.plan }).map_err(|e| e.to_string());
        self.metrics.end_migration("migrate_in", &r.as_ref().map(|i| i.report.clone()).map_err(Clone::clone));
        match r {
            Ok(inc) => {
                let fds: Vec<_> = inc.memory.iter().map(|m| m.as_fd()).collect();
                if let Err(e) = conn.send(&serde_json::json!({"ok": true, "report": inc.report, "regions": fds.len()}).to_string(), &fds) {
                    log::warn!("migrate_in: the destination VMM left before taking its memory ({e}); the memory is dropped");
                }
            }
            Err(e) => say(serde_json::json!({"ok": false, "error": e})),
        }
    }

    /// Region mode, source: checks the descriptors, connects, then runs the VMM's
    /// `round` and `final` commands. Closing the connection abandons the migration.
    fn migrate_out(&self, conn: &mut LineConn, fds: Vec<OwnedFd>, to: &str, limits: Limits) {
        let say = |conn: &LineConn, v: serde_json::Value| {
            let _ = conn.send(&v.to_string(), &[]);
        };
        self.metrics.begin("migrate_out");
        let r = self.migrate_out_inner(conn, fds, to, limits);
        self.metrics.end_migration("migrate_out", &r);
        match r {
            Ok(rep) => say(conn, serde_json::json!({"ok": true, "report": rep})),
            Err(e) => say(conn, serde_json::json!({"ok": false, "error": e})),
        }
    }

    fn migrate_out_inner(&self, conn: &mut LineConn, fds: Vec<OwnedFd>, to: &str, limits: Limits) -> Result<MigrationReport, String> {
        // The guest memory regions, in order, then the dirty bitmap.
        let mut fds = fds;
        if fds.len() < 2 {
            return Err(format!(
                "migrate_out takes the guest memory descriptors (one per region) and then the dirty bitmap's; {} came",
                fds.len()
            ));
        }
        let bitmap = std::fs::File::from(fds.pop().expect("two or more"));
        let memory: Vec<std::fs::File> = fds.into_iter().map(std::fs::File::from).collect();
        if limits.regions.is_some_and(|n| n != memory.len()) {
            return Err(format!(
                "\"regions\": {} but {} memory descriptors came (and the bitmap's)",
                limits.regions.unwrap_or(0),
                memory.len()
            ));
        }
        let mut plan = self.plan.clone();
        if let Some(c) = &limits.compress {
            plan.compression = parse_compression(c, plan.compression)?;
        }
        // Every check that needs no peer comes before connecting to the destination: the
        // bitmap here, each memory region in Source::connect_regions.
        let sizes = memory
            .iter()
            .enumerate()
            .map(|(i, m)| m.metadata().map(|md| md.len()).map_err(|e| format!("guest memory region {i}: {e}")))
            .collect::<Result<Vec<u64>, String>>()?;
        match hw::memmap::is_memory_file(&bitmap) {
            Ok(true) => {}
            Ok(false) => return Err("the dirty bitmap descriptor is not a memory file: give a memfd, or a tmpfs or hugetlbfs file".into()),
            Err(e) => return Err(format!("the dirty bitmap descriptor: {e}")),
        }
        let size: u64 = sizes.iter().sum();
        let pages: Vec<u64> = sizes.iter().map(|&s| crate::migrate::pages(s)).collect();
        let want = crate::migrate::bitmap_bytes_regions(&sizes);
        let have = bitmap.metadata().map_err(|e| format!("the dirty bitmap descriptor: {e}"))?.len();
        if have != want {
            return Err(format!(
                "the dirty bitmap memfd has {have} bytes; {size} bytes of guest memory ({} pages in {} region(s)) need {want}",
                pages.iter().sum::<u64>(),
                sizes.len()
            ));
        }
        let opts = SourceOptions {
            to: to.to_string(),
            auth: self.auth.clone(),
            plan: &plan,
            downtime_budget: limits.downtime_ms.map_or(crate::migrate::DEFAULT_DOWNTIME, std::time::Duration::from_millis),
            max_rounds: limits.max_rounds.unwrap_or(crate::migrate::DEFAULT_MAX_ROUNDS).max(1),
            rate_limit: limits.rate_limit_mbit.map(|m| m * 1_000_000 / 8),
            verify: limits.verify,
        };
        let refs: Vec<&std::fs::File> = memory.iter().collect();
        let mut src = Source::connect_regions(&refs, opts).map_err(|e| e.to_string())?;
        let _ = conn.send(
            &serde_json::json!({"event": "connected", "to": to, "bytes": src.size(), "regions": sizes.len(), "lanes": src.lanes()})
                .to_string(),
            &[],
        );
        let read_bitmap = || -> Result<Vec<u64>, String> {
            let mut raw = vec![0u8; want as usize];
            std::os::unix::fs::FileExt::read_exact_at(&bitmap, &mut raw, 0).map_err(|e| format!("reading the dirty bitmap: {e}"))?;
            crate::migrate::parse_bitmap_regions(&raw, &pages)
        };
        loop {
            let line = match conn.recv() {
                Ok(Some((l, fds))) if fds.is_empty() => l,
                Ok(Some(_)) => return Err("descriptors came with a round command".into()),
                Ok(None) => return Err("the VMM closed the control connection: migration abandoned".into()),
                Err(e) => return Err(format!("reading the VMM's command: {e}")),
            };
            match serde_json::from_str::<Request>(&line) {
                Ok(Request::Round) => {
                    let rep = src.round(&read_bitmap()?).map_err(|e| e.to_string())?;
                    let _ = conn.send(&serde_json::json!({"event": "round", "round": rep}).to_string(), &[]);
                }
                Ok(Request::Final) => return src.finish(&read_bitmap()?).map_err(|e| e.to_string()),
                Ok(other) => return Err(format!("{other:?} inside a migrate_out conversation (round or final expected)")),
                Err(e) => return Err(format!("bad request: {e}")),
            }
        }
    }

    /// Serves `GET /metrics` until the process ends.
    pub fn serve_metrics(&self, listener: TcpListener) {
        for conn in listener.incoming().flatten() {
            let _ = self.metrics_client(conn);
        }
    }

    fn metrics_client(&self, mut conn: TcpStream) -> std::io::Result<()> {
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let mut first = String::new();
        BufReader::new(&conn).read_line(&mut first)?;
        let (status, body) = if first.starts_with("GET /metrics") {
            ("200 OK", self.metrics.prometheus())
        } else {
            ("404 Not Found", "ferryd serves /metrics\n".to_string())
        };
        write!(conn, "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    }
}

/// A migration's limits as the VMM asked for them.
#[derive(Debug)]
struct Limits {
    downtime_ms: Option<u64>,
    max_rounds: Option<u32>,
    rate_limit_mbit: Option<u64>,
    compress: Option<String>,
    verify: crate::migrate::Verify,
    regions: Option<usize>,
}

fn result(r: Result<Report, String>) -> serde_json::Value {
    match r {
        Ok(rep) => serde_json::json!({"ok": true, "report": rep}),
        Err(e) => serde_json::json!({"ok": false, "error": e}),
    }
}

/// `off`, `zstd:N`, or `auto` (the plan's own policy).
pub fn parse_compression(s: &str, plan: Compression) -> Result<Compression, String> {
    match s {
        "auto" => Ok(plan),
        "off" => Ok(Compression::Off),
        _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
            Some(Ok(level)) if (1..=19).contains(&level) => Ok(Compression::Zstd { level }),
            _ => Err(format!("\"{s}\" is not a compression policy: use auto, off or zstd:<1-19>")),
        },
    }
}
