//! `ferryd` as a service: commands on a UNIX control socket (mode 0600), transfers run
//! by the embedded engine, and Prometheus metrics on a local HTTP port.
//!
//! The control protocol is JSON lines: one request, then one or more replies. A transfer
//! replies `{"event":"listening",...}` (recv) as soon as it can, and `{"ok":true,
//! "report":{...}}` or `{"ok":false,"error":"...","kind":"..."}` when it ends; `kind`
//! ([`Failure`], snake case) says what class of failure it was, so a client acts on it
//! without reading the sentence.
//!
//! `{"cmd":"hello"}` answers with the protocol's version ([`CONTROL_PROTOCOL`]), the
//! build, the wire protocol and the commands this ferryd takes: a client checks them
//! before it relies on one. Any request line may carry an `"id"` (a string or a number);
//! every reply and event that follows carries it too, until a later line of the same
//! conversation brings another.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::bounds::{RateLimited, Slots};
use crate::conn::SessionError;
use crate::engine::recv::{RecvOptions, recv_file};
use crate::engine::send::{SendOptions, send_file};
use crate::live::Role;
use crate::metrics::{Failed, Failure, Metrics};
use crate::migrate::dest::DestOptions;
use crate::migrate::source::{Source, SourceOptions};
use crate::migrate::{MigrationLimits, MigrationReport, VmmError};
use crate::plan::{Compression, Plan, Transport};
use crate::protocol::{self, Event};
use hw::fdpass::LineConn;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// The control protocol's version: the requests, replies and events documented here. It
/// grows when a command or field is added, and a client may check it (`hello`).
pub const CONTROL_PROTOCOL: u32 = 1;

/// The commands a client may start a conversation with, as `hello` lists them.
pub const COMMANDS: [&str; 9] = ["hello", "status", "recv", "send", "stream_out", "stream_in", "stream_open", "migrate_in", "migrate_out"];

/// A command on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The protocol's version, the build and the commands this ferryd takes.
    Hello,
    Status,
    Recv {
        listen: String,
        out: PathBuf,
        /// Seconds to wait for a sender that authenticates; none: wait.
        #[serde(default)]
        timeout_s: Option<u64>,
        /// Send `{"event":"progress","bytes":N,"total":T}` every 250 ms while it runs
        /// (T is 0 until the sender has described the region).
        #[serde(default)]
        progress: bool,
    },
    Send {
        to: String,
        file: PathBuf,
        /// `off`, `zstd:N` or `auto`; the plan's policy when none. (`compress` is the old
        /// name, still accepted.)
        #[serde(default, alias = "compress", rename = "compression")]
        compress: Option<String>,
        /// As for `recv`.
        #[serde(default)]
        progress: bool,
    },
    /// Stream mode, source: QEMU migrates into the `listen` endpoints (`unix:PATH` or
    /// `tcp:HOST:PORT`, replied in a `listening` event); each connection it opens is carried
    /// to the destination ferryd's `stream_in` at `to`, with this ferryd's key. Ends with
    /// the report when QEMU's stream has ended.
    StreamOut {
        listen: Vec<String>,
        to: String,
        /// As for `send`.
        #[serde(default, alias = "compress", rename = "compression")]
        compress: Option<String>,
        /// `progress` events with the stream bytes carried (both ways) and the channels.
        #[serde(default)]
        progress: bool,
    },
    /// Stream mode, destination: takes the source ferryd's channels on `listen` (port 0:
    /// the plan's `incoming_ports`) and forwards each to QEMU's incoming socket `forward`.
    StreamIn {
        listen: String,
        forward: String,
        #[serde(default)]
        progress: bool,
    },
    /// Stream mode, both ends from the source host: asks the ferryd whose peer port is
    /// `to` to forward channels to its VMM's incoming socket `forward`, then listens for
    /// this host's VMM on `listen`. Both default to `unix:DIR/ID.sock` in the first of
    /// `[daemon] stream_dirs`: one path, the same on both hosts (libvirt's
    /// `--migrateuri unix://PATH`). The reply's `destination` is the far side's report.
    StreamOpen {
        to: String,
        /// The migration's name (letters, digits, `.`, `_`, `-`); a new one when absent.
        /// (Its `"id"` is the request's, as for every request.)
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        listen: Vec<String>,
        #[serde(default)]
        forward: Option<String>,
        /// As for `send`.
        #[serde(default, alias = "compress", rename = "compression")]
        compress: Option<String>,
        #[serde(default)]
        progress: bool,
    },
    /// Region mode, destination: waits for one migration on `listen`; the verified guest
    /// memory comes back as a memfd with the final reply.
    MigrateIn {
        listen: String,
        /// Post-copy: seconds to wait for the source after the link broke (default 120).
        #[serde(default)]
        recover_s: Option<u64>,
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
        /// As for `send`.
        #[serde(default, alias = "compress", rename = "compression")]
        compress: Option<String>,
        /// `rdma`, `tcp` (io_uring), `sockets` or `auto` (the plan's, falling back to TCP
        /// lanes when the destination has no RDMA).
        #[serde(default)]
        transport: Option<String>,
        /// `sent` (default) or `full`: see [`crate::migrate::Verify`].
        #[serde(default)]
        verify: Option<crate::migrate::Verify>,
        /// How many memory descriptors come before the bitmap's, if the VMM wants it checked.
        #[serde(default)]
        regions: Option<usize>,
        /// Post-copy: seconds to keep reconnecting after the link broke (default 120).
        #[serde(default)]
        recover_s: Option<u64>,
    },
    /// Inside a `migrate_out` conversation: a pre-copy round over the bitmap's pages.
    Round,
    /// Inside a `migrate_out` conversation: the VMM has paused; stop-and-copy and verify.
    Final,
    /// Inside a `migrate_in` conversation: the VMM holds the memory it was just handed
    /// (the `memory` event); only now is the source told the migration succeeded.
    Taken,
    /// Inside a `migrate_out` conversation: the VMM has paused and written the final
    /// bitmap; switch over to post-copy (`switched` event when the destination runs the
    /// guest, the report when every page is there).
    Postcopy,
    /// Inside a `migrate_in` conversation, after the `postcopy` event: the VMM's
    /// userfaultfd comes with this line, registered (missing and minor modes) over its
    /// mapping of each region, which `maps` gives in order.
    Faults {
        maps: Vec<crate::migrate::postcopy::Mapping>,
    },
    /// Inside a `migrate_in` conversation, after the `local` event: the VMM has
    /// unregistered its mapping; ferryd stops resolving its faults.
    Released,
}

impl Request {
    /// `migrate_out` to `to` with `regions` memory descriptors and the VMM's `limits`.
    pub fn migrate_out(to: &str, regions: Option<usize>, limits: &crate::migrate::MigrationLimits) -> Request {
        let l = limits.clone();
        Request::MigrateOut {
            to: to.to_string(),
            downtime_ms: l.downtime_ms,
            max_rounds: l.max_rounds,
            rate_limit_mbit: l.rate_limit_mbit,
            compress: l.compress,
            transport: l.transport,
            verify: l.verify,
            regions,
            recover_s: l.recover_s,
        }
    }

    /// One control-socket line, as a request: unknown commands and fields, and values of
    /// the wrong type, are errors that name them.
    pub fn parse(line: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// [`Request::parse`] of a line that may carry an `"id"` (a string or a number): the
    /// request and its id.
    pub fn parse_with_id(line: &str) -> Result<(Request, Option<serde_json::Value>), serde_json::Error> {
        let mut v: serde_json::Value = serde_json::from_str(line)?;
        let id = v.as_object_mut().and_then(|o| o.remove("id"));
        if let Some(id) = &id
            && !(id.is_string() || id.is_number())
        {
            return Err(serde::de::Error::custom(format!("\"id\" is {id}: give a string or a number")));
        }
        Ok((serde_json::from_value(v)?, id))
    }
}

/// The running service's shared state.
#[derive(Debug)]
pub struct Daemon {
    pub plan: Plan,
    pub auth: Auth,
    pub metrics: Metrics,
    /// The sending workers, for ferryd's lifetime: every session runs on them.
    pub pool: crate::pool::Pool,
    /// Set on SIGTERM: the sessions in flight finish, no new one starts.
    draining: std::sync::atomic::AtomicBool,
    /// Requests that start work (a session), from before the drain check until they end.
    pub in_flight: std::sync::atomic::AtomicU64,
    /// Who may connect to the stream endpoints' UNIX sockets (`[daemon] stream_mode`).
    pub stream_access: SocketAccess,
}

/// A control-socket client: its connection, and the id of its last request line that had
/// one, which every reply and event carries.
struct Client {
    conn: LineConn,
    id: Option<serde_json::Value>,
}

impl Client {
    /// Sends one reply or event (with the request's id), and descriptors with it.
    fn send(&self, mut v: serde_json::Value, fds: &[std::os::fd::BorrowedFd<'_>]) -> std::io::Result<()> {
        if let (Some(id), Some(o)) = (&self.id, v.as_object_mut()) {
            o.insert("id".into(), id.clone());
        }
        self.conn.send(&v.to_string(), fds)
    }

    fn recv(&mut self) -> std::io::Result<Option<(String, Vec<OwnedFd>)>> {
        self.conn.recv()
    }

    fn stream(&self) -> &UnixStream {
        self.conn.stream()
    }

    /// A request line of this conversation; its id, if it has one, is the replies' now.
    fn parse(&mut self, line: &str) -> Result<Request, serde_json::Error> {
        let (req, id) = Request::parse_with_id(line)?;
        if id.is_some() {
            self.id = id;
        }
        Ok(req)
    }
}

/// Counts a request as in flight until dropped.
struct InFlight<'d>(&'d std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Who may use the control socket: its mode (owner and group bits only) and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: u32,
    pub group: Option<nix::unistd::Gid>,
}

impl Default for SocketAccess {
    /// The owner only (mode 0600).
    fn default() -> SocketAccess {
        SocketAccess { mode: 0o600, group: None }
    }
}

/// A socket mode or group that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("mode {0}: give an octal mode such as 0600 or 0660")]
    NotOctal(String),
    #[error("mode {0}: only owner and group bits may be set (0600, 0660): whoever reaches the socket can read or send guest memory")]
    Others(String),
    #[error("group {group}: {errno}")]
    Group { group: String, errno: nix::errno::Errno },
    #[error("group {0}: no such group")]
    NoGroup(String),
}

impl SocketAccess {
    /// `mode` in octal (`0660`) and `group` a name or a number. Other users may never
    /// connect: whoever can reach the control socket can hand ferryd memory and send it
    /// anywhere, and a stream endpoint carries a guest's memory. Errors name the mode
    /// or the group, and the caller says whose they are.
    pub fn parse(mode: &str, group: Option<&str>) -> Result<SocketAccess, AccessError> {
        let m = u32::from_str_radix(mode.trim_start_matches("0o"), 8).map_err(|_| AccessError::NotOctal(mode.into()))?;
        if m & !0o770 != 0 {
            return Err(AccessError::Others(mode.into()));
        }
        // A group matters only to a mode with group bits: with 0600 it is not applied
        // (changing the socket's group would need CAP_CHOWN for nothing).
        let group = match group {
            None => None,
            Some(_) if m & 0o070 == 0 => None,
            Some(g) => Some(match g.parse::<u32>() {
                Ok(n) => nix::unistd::Gid::from_raw(n),
                Err(_) => {
                    nix::unistd::Group::from_name(g)
                        .map_err(|errno| AccessError::Group { group: g.into(), errno })?
                        .ok_or_else(|| AccessError::NoGroup(g.into()))?
                        .gid
                }
            }),
        };
        Ok(SocketAccess { mode: m, group })
    }
}

/// Why ferryd refused or failed a control request, beside a session's own errors.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("ferryd already serves {0} control clients; try again later")]
    Busy(usize),
    #[error("bad request: {0}")]
    Line(#[source] std::io::Error),
    #[error("bad request: {0}")]
    Json(#[source] serde_json::Error),
    #[error("descriptors came with {0}")]
    UnwantedFds(&'static str),
    #[error("ferryd is shutting down: it finishes the sessions in flight and starts no new one; try another host or after the restart")]
    Draining,
    #[error("{cmds} belong to a {conversation} conversation")]
    OutOfConversation { cmds: &'static str, conversation: &'static str },
    #[error("{got} inside a migrate_out conversation (round, final or postcopy expected)")]
    NotARound { got: String },
    #[error("cannot listen on {at}: {source}")]
    Listen { at: String, source: std::io::Error },
    #[error("cannot set {}'s mode and group: {source}", path.display())]
    Access { path: PathBuf, source: std::io::Error },
    #[error("migrate_out takes the guest memory descriptors (one per region) and then the dirty bitmap's; {0} came")]
    MigrateFds(usize),
    #[error("\"regions\": {said} but {came} memory descriptors came (and the bitmap's)")]
    Regions { said: usize, came: usize },
    #[error("\"transport\": \"rdma\", but this ferryd's plan has no RDMA port (`ferryctl tune` says why)")]
    NoRdma,
    #[error(transparent)]
    Choice(#[from] crate::BadChoice),
    #[error(transparent)]
    Rate(#[from] crate::migrate::source::RateOutOfRange),
    #[error("guest memory region {region}: {source}")]
    Region { region: usize, source: std::io::Error },
    #[error("the dirty bitmap descriptor is {0}, not a memory file: give a memfd, or a tmpfs or hugetlbfs file")]
    BitmapNotMemory(String),
    #[error("the dirty bitmap descriptor: {0}")]
    BitmapFile(#[source] std::io::Error),
    #[error("the dirty bitmap memfd has {have} bytes; {size} bytes of guest memory ({pages} pages in {regions} region(s)) need {want}")]
    BitmapSize { have: u64, size: u64, pages: u64, regions: usize, want: u64 },
    #[error("reading the dirty bitmap: {0}")]
    BitmapRead(#[source] std::io::Error),
    #[error(transparent)]
    Bitmap(#[from] crate::migrate::BitmapError),
    #[error(transparent)]
    Limit(#[from] crate::session::limits::LimitError),
    #[error("the VMM closed the control connection: migration abandoned")]
    VmmGone,
    #[error("reading the VMM's command: {0}")]
    VmmRead(#[source] std::io::Error),
    #[error("stream_out needs at least one endpoint to listen on (unix:PATH or tcp:HOST:PORT)")]
    NoEndpoint,
    #[error("{0:?} is not a migration name: 1-64 letters, digits, '.', '_' or '-'")]
    Name(String),
    #[error("no stream directory ([daemon] stream_dirs) to listen in")]
    NoStreamDir,
    #[error("the destination ferryd at {to} did not open its side: {source}")]
    PeerOpen { to: String, source: SessionError },
    #[error("the destination's side of stream {id}: {source}")]
    PeerSide { id: String, source: SessionError },
    #[error("not asked: this side failed")]
    NotAsked,
    #[error(transparent)]
    Forward(#[from] crate::peer::ForwardRefused),
    #[error("the peer connection: {0}")]
    PeerConn(#[source] std::io::Error),
    #[error("the destination ferryd is shutting down: it starts no new stream")]
    PeerDraining,
    #[error(transparent)]
    Session(#[from] SessionError),
}

impl From<&RequestError> for Failure {
    fn from(e: &RequestError) -> Failure {
        use RequestError as R;
        match e {
            R::Busy(_)
            | R::NoRdma
            | R::Limit(_)
            | R::Forward(_)
            | R::NoStreamDir
            | R::BitmapNotMemory(_)
            | R::BitmapSize { .. }
            | R::Bitmap(_) => Failure::Refused,
            R::Line(_)
            | R::Json(_)
            | R::UnwantedFds(_)
            | R::OutOfConversation { .. }
            | R::NotARound { .. }
            | R::MigrateFds(_)
            | R::Regions { .. }
            | R::Choice(_)
            | R::Rate(_)
            | R::NoEndpoint
            | R::Name(_) => Failure::BadRequest,
            R::Draining | R::PeerDraining => Failure::Draining,
            R::Listen { .. } | R::Access { .. } | R::Region { .. } | R::BitmapFile(_) | R::BitmapRead(_) | R::PeerConn(_) => {
                Failure::System
            }
            R::VmmGone | R::VmmRead(_) => Failure::Cancelled,
            R::NotAsked => Failure::Other,
            R::PeerOpen { source, .. } | R::PeerSide { source, .. } => Failure::from(source),
            R::Session(e) => Failure::from(e),
        }
    }
}

impl RequestError {
    /// The error reply that says it.
    fn reply(self) -> serde_json::Value {
        Failed::from(self).reply()
    }
}

impl From<RequestError> for Failed {
    fn from(e: RequestError) -> Failed {
        Failed::new(Failure::from(&e), e.to_string())
    }
}

/// Binds the control socket with `access` (mode 0600 by default), replacing a stale
/// socket file. Anything at `path` that is not a socket (a regular file, a directory) is
/// left alone and refused.
pub fn bind_control(path: &Path, access: SocketAccess) -> std::io::Result<UnixListener> {
    let l = crate::stream::bind_unix(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => std::io::Error::new(e.kind(), format!("{e}; give --control another path")),
        _ => e,
    })?;
    access.apply(path)?;
    Ok(l)
}

impl SocketAccess {
    /// Gives the socket at `path` this mode and group: the group first, then the mode, so
    /// the socket never grants the group access with the wrong group.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        if let Some(g) = self.group {
            nix::unistd::chown(path, None, Some(g)).map_err(std::io::Error::from)?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))
    }
}

impl Daemon {
    pub fn new(plan: Plan, auth: Auth, pool: crate::pool::Pool) -> Daemon {
        Daemon {
            metrics: Metrics::new(plan.worker_cpus.len()),
            plan,
            auth,
            pool,
            draining: std::sync::atomic::AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicU64::new(0),
            stream_access: SocketAccess::default(),
        }
    }

    /// Serves the control socket until the process ends: a thread per client, at most
    /// the plan's `control_clients` at once (one more is told so and closed).
    pub fn serve_control(&self, listener: UnixListener) {
        static ACCEPT: RateLimited = RateLimited::new(std::time::Duration::from_secs(10));
        let slots = Slots::new(self.plan.limits.control_clients as usize);
        std::thread::scope(|s| {
            loop {
                match listener.accept() {
                    Ok((c, _)) => match slots.take() {
                        Some(slot) => {
                            s.spawn(move || {
                                let _slot = slot;
                                self.client(c);
                            });
                        }
                        None => {
                            let e = Failed::from(RequestError::Busy(slots.max()));
                            ACCEPT.warn(format_args!("control socket: {e}"));
                            let _ = c.set_write_timeout(Some(std::time::Duration::from_millis(100)));
                            let _ = LineConn::new(c).send(&e.reply().to_string(), &[]);
                        }
                    },
                    Err(e) => crate::bounds::accept_failed(&e, "control socket", &ACCEPT),
                }
            }
        });
    }

    fn client(&self, conn: UnixStream) {
        let mut conn = Client { conn: LineConn::with_max_fds(conn, self.plan.limits.control_fds_per_message as usize), id: None };
        let (line, fds) = match conn.recv() {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                static BAD: RateLimited = RateLimited::new(std::time::Duration::from_secs(10));
                BAD.warn(format_args!("control socket: a client's request was refused: {e}"));
                let _ = conn.send(RequestError::Line(e).reply(), &[]);
                return;
            }
        };
        let parsed = conn.parse(&line);
        // A second descriptor of the client's connection: a stream endpoint closes if
        // its client goes away before the VMM connects.
        let watch = || conn.stream().try_clone().ok().map(OwnedFd::from);
        let say = |v: serde_json::Value| {
            let _ = conn.send(v, &[]);
        };
        let req: Request = match parsed {
            Ok(r) => r,
            Err(e) => return say(RequestError::Json(e).reply()),
        };
        if !fds.is_empty() && !matches!(req, Request::MigrateOut { .. } | Request::Faults { .. }) {
            return say(RequestError::UnwantedFds("a command that takes none").reply());
        }
        let starts_work = matches!(
            req,
            Request::MigrateIn { .. }
                | Request::MigrateOut { .. }
                | Request::Recv { .. }
                | Request::Send { .. }
                | Request::StreamOut { .. }
                | Request::StreamIn { .. }
                | Request::StreamOpen { .. }
        );
        // Counted before the drain is checked (both SeqCst): either this request sees the
        // drain and is refused, or the drain sees it and waits for it.
        let _in_flight = starts_work.then(|| {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            InFlight(&self.in_flight)
        });
        if starts_work && self.is_draining() {
            return say(RequestError::Draining.reply());
        }
        match req {
            Request::MigrateIn { listen, recover_s } => self.migrate_in(&mut conn, &listen, recover_s),
            Request::MigrateOut { to, downtime_ms, max_rounds, rate_limit_mbit, compress, transport, verify, regions, recover_s } => {
                let limits = MigrationLimits { downtime_ms, max_rounds, rate_limit_mbit, compress, transport, verify, recover_s };
                self.migrate_out(&mut conn, fds, &to, regions, limits);
            }
            Request::Round | Request::Final | Request::Postcopy => {
                let e = RequestError::OutOfConversation { cmds: "round, final and postcopy", conversation: "migrate_out" };
                say(e.reply())
            }
            Request::Taken | Request::Faults { .. } | Request::Released => {
                let e = RequestError::OutOfConversation { cmds: "taken, faults and released", conversation: "migrate_in" };
                say(e.reply())
            }
            Request::Hello => say(protocol::ok(&protocol::Hello {
                protocol: CONTROL_PROTOCOL,
                version: env!("CARGO_PKG_VERSION").into(),
                revision: crate::REVISION.into(),
                wire_protocol: crate::wire::VERSION,
                commands: COMMANDS.iter().map(|c| c.to_string()).collect(),
                transport: self.plan.transport.to_string(),
                peer: self.plan.daemon.peer.clone(),
                draining: self.is_draining(),
            })),
            Request::Status => say(protocol::ok(&protocol::Status {
                draining: self.is_draining(),
                status: self.metrics.status(),
                plan: protocol::StatusPlan {
                    transport: self.plan.transport.to_string(),
                    workers: self.plan.worker_cpus.len(),
                    compression: self.plan.compression.to_string(),
                },
                pool: protocol::StatusPool {
                    cpus: self.pool.cpus(),
                    chunk_bytes: self.pool.chunk(),
                    chunks_per_worker: self.pool.chunks_per_worker(),
                    receiving: self.pool.receiving(),
                    sending: self.pool.sending(),
                },
            })),
            Request::Recv { listen, out, timeout_s, progress } => say(self.recv(&listen, &out, timeout_s, &say, progress)),
            Request::Send { to, file, compress, progress } => say(self.send(to, &file, compress, progress.then_some(&say))),
            Request::StreamOut { listen, to, compress, progress } => {
                let side = self.stream_out_side(&listen, &to, compress);
                say(result(side.and_then(|side| self.stream(Role::StreamOut, side, &say, progress, watch()))))
            }
            Request::StreamIn { listen, forward, progress } => {
                let side = self.stream_in_side(&listen, &forward);
                say(result(side.and_then(|side| self.stream(Role::StreamIn, side, &say, progress, watch()))))
            }
            Request::StreamOpen { to, name, listen, forward, compress, progress } => {
                let open = StreamOpen { to, name, listen, forward, compress };
                say(self.stream_open(open, &say, progress, watch()))
            }
        }
    }

    /// A one-shot receive into `out`: the listening address first (an event), then the
    /// result.
    fn recv(
        &self,
        listen: &str,
        out: &std::path::Path,
        timeout_s: Option<u64>,
        say: &(dyn Fn(serde_json::Value) + Sync),
        progress: bool,
    ) -> serde_json::Value {
        let listener = match self.bind_incoming(listen) {
            Ok(l) => l,
            Err(source) => return RequestError::Listen { at: listen.to_string(), source }.reply(),
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| listen.to_string());
        say(Event::Listening { addr: Some(addr), endpoints: Vec::new() }.to_value());
        let active = self.metrics.begin(Role::Recv);
        let (done, total) = (std::sync::Arc::new(AtomicU64::new(0)), AtomicU64::new(0));
        let opts = RecvOptions {
            auth: self.auth.clone(),
            plan: &self.plan,
            progress: Some(done.clone()),
            total: Some(&total),
            timeout: timeout_s.map(std::time::Duration::from_secs),
            pool: Some(&self.pool),
        };
        let run = || recv_file(&listener, out, &opts).map_err(Failed::from);
        let r = progress_events(progress.then_some(say), &done, &total, None, run);
        self.metrics.end(Role::Recv, r.as_ref());
        // Not active once the reply says it ended: a status read after it agrees.
        drop(active);
        result(r)
    }

    /// A one-shot send of `file`, at the plan's compression or `compress`.
    fn send(
        &self,
        to: String,
        file: &std::path::Path,
        compress: Option<String>,
        say: Option<&(dyn Fn(serde_json::Value) + Sync)>,
    ) -> serde_json::Value {
        let mut plan = self.plan.clone();
        if let Some(c) = compress {
            match parse_compression(&c, plan.compression) {
                Ok(c) => plan.compression = c,
                Err(e) => return RequestError::Choice(e).reply(),
            }
        }
        let active = self.metrics.begin(Role::Send);
        let done = AtomicU64::new(0);
        let total = AtomicU64::new(std::fs::metadata(file).map_or(0, |m| m.len()));
        let opts =
            SendOptions { to, auth: self.auth.clone(), plan: &plan, progress: Some(&done), require_rdma: false, pool: Some(&self.pool) };
        let r = progress_events(say, &done, &total, None, || send_file(file, &opts).map_err(Failed::from));
        self.metrics.end(Role::Send, r.as_ref());
        drop(active);
        result(r)
    }

    /// Region mode, destination: one migration into memfds. The VMM is handed the
    /// verified memory (`memory` event), says it holds it (`taken`), and only then is the
    /// source told; the final reply says the source knows. The VMM closing its connection
    /// at any point before cancels the migration.
    fn migrate_in(&self, conn: &mut Client, listen: &str, recover_s: Option<u64>) {
        let listener = match self.bind_incoming(listen) {
            Ok(l) => l,
            Err(source) => {
                let _ = conn.send(RequestError::Listen { at: listen.to_string(), source }.reply(), &[]);
                return;
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| listen.to_string());
        let _ = conn.send(Event::Listening { addr: Some(addr), endpoints: Vec::new() }.to_value(), &[]);
        let active = self.metrics.begin(Role::MigrateIn);
        // A second descriptor of the VMM's connection, watched while the migration runs.
        let watch = conn.stream().try_clone();
        let opts = DestOptions {
            auth: self.auth.clone(),
            plan: &self.plan,
            vmm: watch.as_ref().ok().map(|w| w.as_fd()),
            recover: Some(std::time::Duration::from_secs(recover_s.unwrap_or(self.plan.migration.recover_s))),
            pool: Some(&self.pool),
        };
        let r = crate::migrate::dest::accept(&listener, &opts, DestConn(conn)).map_err(Failed::from);
        self.metrics.end_migration(Role::MigrateIn, r.as_ref().map(|i| &i.report));
        // Not active once the reply says it ended: a status read after it agrees.
        drop(active);
        let last = match r {
            Ok(inc) => protocol::ok(&protocol::MigratedIn { regions: inc.memory.len(), report: inc.report }),
            Err(e) => e.reply(),
        };
        let _ = conn.send(last, &[]);
    }

    /// Region mode, source: checks the descriptors, connects, then runs the VMM's
    /// `round` and `final` commands. Closing the connection abandons the migration.
    fn migrate_out(&self, conn: &mut Client, fds: Vec<OwnedFd>, to: &str, regions: Option<usize>, limits: MigrationLimits) {
        let say = |conn: &Client, v: serde_json::Value| {
            let _ = conn.send(v, &[]);
        };
        let active = self.metrics.begin(Role::MigrateOut);
        let r = self.migrate_out_inner(conn, fds, to, regions, limits);
        self.metrics.end_migration(Role::MigrateOut, r.as_ref());
        drop(active);
        match r {
            Ok(report) => say(conn, protocol::ok(&protocol::Done { report })),
            Err(e) => say(conn, e.reply()),
        }
    }

    fn migrate_out_inner(
        &self,
        conn: &mut Client,
        fds: Vec<OwnedFd>,
        to: &str,
        regions: Option<usize>,
        limits: MigrationLimits,
    ) -> Result<MigrationReport, Failed> {
        // The guest memory regions, in order, then the dirty bitmap.
        let mut fds = fds;
        if fds.len() < 2 {
            return Err(RequestError::MigrateFds(fds.len()).into());
        }
        let bitmap = std::fs::File::from(fds.pop().expect("two or more"));
        let memory: Vec<std::fs::File> = fds.into_iter().map(std::fs::File::from).collect();
        if let Some(said) = regions.filter(|&n| n != memory.len()) {
            return Err(RequestError::Regions { said, came: memory.len() }.into());
        }
        let (plan, require_rdma) = self.plan_for(&limits)?;
        // What the request leaves out, the plan's [migration] defaults give.
        let defaults = &self.plan.migration;
        let rate_limit = limits
            .rate_limit_mbit
            .or(defaults.rate_limit_mbit)
            .map(crate::migrate::source::rate_limit_bytes)
            .transpose()
            .map_err(RequestError::from)?;
        // Every check that needs no peer comes before connecting to the destination: the
        // bitmap and the size here, each memory region in Source::connect_regions.
        let sizes = memory
            .iter()
            .enumerate()
            .map(|(region, m)| m.metadata().map(|md| md.len()).map_err(|source| RequestError::Region { region, source }))
            .collect::<Result<Vec<u64>, RequestError>>()?;
        let (pages, want) = self.check_bitmap(&bitmap, &sizes)?;
        let opts = SourceOptions {
            to: to.to_string(),
            auth: self.auth.clone(),
            plan: &plan,
            downtime_budget: std::time::Duration::from_millis(limits.downtime_ms.unwrap_or(defaults.downtime_ms)),
            max_rounds: limits.max_rounds.unwrap_or(defaults.max_rounds).max(1),
            rate_limit,
            verify: limits.verify.unwrap_or(defaults.verify),
            job: crate::migrate::source::Job::Migrate,
            progress: None,
            require_rdma,
            pool: Some(&self.pool),
        };
        let refs: Vec<&std::fs::File> = memory.iter().collect();
        let mut src = Source::connect_regions(&refs, opts)?;
        let _ = conn.send(
            Event::Connected(protocol::Connected { to: to.to_string(), bytes: src.size(), regions: sizes.len(), lanes: src.lanes() })
                .to_value(),
            &[],
        );
        let read_bitmap = || -> Result<Vec<u64>, RequestError> {
            let mut raw = vec![0u8; want as usize];
            std::os::unix::fs::FileExt::read_exact_at(&bitmap, &mut raw, 0).map_err(RequestError::BitmapRead)?;
            Ok(crate::migrate::parse_bitmap_regions(&raw, &pages)?)
        };
        loop {
            let line = match conn.recv() {
                Ok(Some((l, fds))) if fds.is_empty() => l,
                Ok(Some(_)) => return Err(RequestError::UnwantedFds("a round command").into()),
                Ok(None) => return Err(RequestError::VmmGone.into()),
                Err(e) => return Err(RequestError::VmmRead(e).into()),
            };
            match conn.parse(&line) {
                Ok(Request::Round) => {
                    let rep = src.round(&read_bitmap()?)?;
                    let _ = conn.send(Event::Round { round: rep }.to_value(), &[]);
                }
                Ok(Request::Final) => return src.finish(&read_bitmap()?).map_err(Failed::from),
                Ok(Request::Postcopy) => {
                    src.switch_over(&read_bitmap()?)?;
                    let _ = conn.send(Event::Switched { switch_ms: src.switch_ms().unwrap_or_default() }.to_value(), &[]);
                    let recover = std::time::Duration::from_secs(limits.recover_s.unwrap_or(self.plan.migration.recover_s));
                    return src.postcopy(recover).map_err(Failed::from);
                }
                Ok(other) => return Err(RequestError::NotARound { got: format!("{other:?}") }.into()),
                Err(e) => return Err(RequestError::Json(e).into()),
            }
        }
    }

    /// This ferryd's plan with a migration's compression and transport applied, and
    /// whether RDMA is required.
    fn plan_for(&self, limits: &MigrationLimits) -> Result<(Plan, bool), RequestError> {
        let mut plan = self.plan.clone();
        if let Some(c) = &limits.compress {
            plan.compression = parse_compression(c, plan.compression)?;
        }
        let require_rdma = match limits.transport.as_deref() {
            None | Some("auto") => false,
            Some("rdma") if plan.rdma.is_some() => {
                plan.transport = Transport::Rdma;
                true
            }
            Some("rdma") => return Err(RequestError::NoRdma),
            Some("tcp") => {
                plan.transport = Transport::Tcp;
                plan.tcp.io_uring = true;
                false
            }
            Some("sockets") => {
                plan.transport = Transport::Sockets;
                plan.tcp.io_uring = false;
                false
            }
            Some(t) => return Err(crate::BadChoice { what: "transport", got: t.into(), choices: "rdma, tcp, sockets or auto" }.into()),
        };
        Ok((plan, require_rdma))
    }

    /// Checks the dirty bitmap: a memory file of exactly the bits the regions of `sizes`
    /// need, and their total within the limits. Returns each region's pages, and the
    /// bitmap's bytes.
    fn check_bitmap(&self, bitmap: &std::fs::File, sizes: &[u64]) -> Result<(Vec<u64>, u64), RequestError> {
        if !hw::memmap::is_memory_file(bitmap).map_err(RequestError::BitmapFile)? {
            return Err(RequestError::BitmapNotMemory(hw::memmap::describe(bitmap)));
        }
        let size: u64 = sizes.iter().fold(0u64, |a, &s| a.saturating_add(s));
        crate::session::limits::check_region(size, &self.plan.limits, crate::session::limits::Backing::Source)?;
        // (Source::connect_regions checks it again for callers that come without ferryd.)
        let pages: Vec<u64> = sizes.iter().map(|&s| crate::migrate::pages(s)).collect();
        let want = crate::migrate::bitmap_bytes_regions(sizes);
        let have = bitmap.metadata().map_err(RequestError::BitmapFile)?.len();
        if have != want {
            return Err(RequestError::BitmapSize { have, size, pages: pages.iter().sum(), regions: sizes.len(), want });
        }
        Ok((pages, want))
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` (GET and HEAD) until the process ends,
    /// on one thread ([`crate::http`]): up to the plan's `metrics_clients` at once, the
    /// oldest dropped for a newcomer past that, each answered within 5 s of connecting and
    /// 8 KiB of request head, so idle or endless clients delay no scrape.
    pub fn serve_metrics(&self, listener: TcpListener) {
        let limits = crate::http::Limits {
            clients: self.plan.limits.metrics_clients as usize,
            timeout: std::time::Duration::from_secs(5),
            max_head: 8 << 10,
        };
        crate::http::serve(&listener, limits, &|r| self.http_answer(r));
    }

    fn http_answer(&self, r: &crate::http::Request) -> crate::http::Response {
        use crate::http::Response;
        match r.path {
            "/metrics" => {
                let openmetrics = r.accept.contains("application/openmetrics-text");
                Response {
                    status: "200 OK",
                    content_type: if openmetrics { crate::metrics::OPENMETRICS } else { crate::metrics::TEXT },
                    body: self.metrics.encode(openmetrics),
                }
            }
            "/healthz" => Response::text("200 OK", "ok\n"),
            // Not ready while draining: a load balancer or orchestrator sends no new work.
            "/readyz" if self.is_draining() => Response::text("503 Service Unavailable", "draining\n"),
            "/readyz" => Response::text("200 OK", "ready\n"),
            _ => Response::text("404 Not Found", "ferryd serves /metrics, /healthz and /readyz\n"),
        }
    }

    /// Stream mode's source side: its listeners bound (UNIX sockets with the stream
    /// endpoints' mode and group), its compression resolved.
    fn stream_out_side(&self, listen: &[String], to: &str, compress: Option<String>) -> Result<StreamSide, Failed> {
        let compression =
            compress.map_or(Ok(self.plan.compression), |c| parse_compression(&c, self.plan.compression)).map_err(RequestError::from)?;
        if listen.is_empty() {
            return Err(RequestError::NoEndpoint.into());
        }
        let mut listeners = Vec::new();
        for l in listen {
            let e: crate::stream::Endpoint = l.parse().map_err(RequestError::from)?;
            let bound = crate::stream::Listener::bind(&e).map_err(|source| RequestError::Listen { at: e.to_string(), source })?;
            if let crate::stream::Endpoint::Unix(p) = &e {
                self.stream_access.apply(p).map_err(|source| RequestError::Access { path: p.clone(), source })?;
            }
            listeners.push(bound);
        }
        Ok(StreamSide::Source { listeners, to: to.to_string(), compression })
    }

    /// Stream mode's destination side: its listener bound, QEMU's socket parsed.
    fn stream_in_side(&self, listen: &str, forward: &str) -> Result<StreamSide, Failed> {
        let forward: crate::stream::Endpoint = forward.parse().map_err(RequestError::from)?;
        let listener = self.bind_incoming(listen).map_err(|source| RequestError::Listen { at: listen.to_string(), source })?;
        Ok(StreamSide::Destination { listener, forward })
    }

    /// A proxied migration in ferryd: where it listens first (an event), its progress
    /// when asked, then its report; counted in the metrics as its role's session, its
    /// channels apart. The endpoint waits for its first connection for the plan's
    /// `stream_idle_s`, and while `watch` (the requester) is there.
    fn stream(
        &self,
        role: Role,
        side: StreamSide,
        say: &(dyn Fn(serde_json::Value) + Sync),
        progress: bool,
        watch: Option<OwnedFd>,
    ) -> Result<crate::stream::ProxyReport, Failed> {
        let endpoints: Vec<String> = match &side {
            StreamSide::Source { listeners, .. } => listeners.iter().map(crate::stream::Listener::uri).collect(),
            StreamSide::Destination { listener, .. } => listener.local_addr().map(|a| a.to_string()).into_iter().collect(),
        };
        say(Event::Listening { addr: endpoints.first().cloned(), endpoints }.to_value());
        let active = self.metrics.begin(role);
        let counts = std::sync::Arc::new(crate::stream::StreamProgress::default());
        let compression = match &side {
            StreamSide::Source { compression, .. } => *compression,
            StreamSide::Destination { .. } => self.plan.compression,
        };
        let opts = crate::stream::ProxyOptions {
            progress: Some(counts.clone()),
            idle: Some(std::time::Duration::from_secs(self.plan.daemon.stream_idle_s)),
            watch,
            ..crate::stream::ProxyOptions::new(self.auth.clone(), compression, self.plan.limits.clone())
        };
        let run = || match &side {
            StreamSide::Source { listeners, to, .. } => crate::stream::source(listeners, to, &opts),
            StreamSide::Destination { listener, forward } => crate::stream::destination(listener, forward, &opts),
        };
        // A stream's length is QEMU's to know: the total stays 0, the channels come along.
        let unknown = AtomicU64::new(0);
        let r = progress_events(progress.then_some(say), &counts.bytes, &unknown, Some(&counts.channels), || run().map_err(Failed::from));
        self.metrics.end_stream(role, r.as_ref());
        drop(active);
        r
    }

    /// `stream_open`: the destination ferryd asked over its peer port to forward to its
    /// VMM, then this side's endpoints for the VMM here; the reply carries both sides'
    /// reports, and is a success only if the destination's side ended well too.
    fn stream_open(
        &self,
        o: StreamOpen,
        say: &(dyn Fn(serde_json::Value) + Sync),
        progress: bool,
        watch: Option<OwnedFd>,
    ) -> serde_json::Value {
        self.make_stream_dirs();
        let opened = (|| -> Result<_, Failed> {
            let id = match o.name {
                Some(id) if crate::peer::valid_id(&id) => id,
                Some(id) => return Err(RequestError::Name(id).into()),
                None => crate::peer::new_id("stream"),
            };
            let listen = if o.listen.is_empty() {
                let dir = self.plan.daemon.stream_dirs.first().ok_or(RequestError::NoStreamDir)?;
                vec![format!("unix:{}", crate::peer::default_socket(dir, &id).display())]
            } else {
                o.listen
            };
            let forward = o.forward.unwrap_or_else(|| listen[0].clone());
            forward.parse::<crate::stream::Endpoint>().map_err(RequestError::from)?;
            // Bound here first: a path in use fails before the destination is asked.
            let StreamSide::Source { listeners, compression, .. } = self.stream_out_side(&listen, &o.to, o.compress)? else {
                unreachable!("stream_out_side makes a source side")
            };
            let link = crate::peer::open(&o.to, &self.auth, &crate::peer::Open { id: id.clone(), forward: forward.clone() })
                .map_err(|source| RequestError::PeerOpen { to: o.to.clone(), source })?;
            log::info!("stream {id}: the destination ferryd at {} forwards to {forward}; channels go to {}", o.to, link.channels);
            say(Event::Opened { name: id.clone(), forward: forward.clone(), channels: link.channels.to_string() }.to_value());
            Ok((StreamSide::Source { listeners, to: link.channels.to_string(), compression }, link, id))
        })();
        let (side, link, id) = match opened {
            Ok(o) => o,
            Err(e) => return result::<()>(Err(e)),
        };
        let here = self.stream(Role::StreamOut, side, say, progress, watch);
        // The destination's report follows its side's end; on a failure here the peer
        // connection closes and the destination's side ends too.
        let there = match &here {
            Ok(_) => link.result().map_err(|source| Failed::from(RequestError::PeerSide { id: id.clone(), source })),
            Err(_) => Err(RequestError::NotAsked.into()),
        };
        match (here, there) {
            (Ok(report), Ok(destination)) => protocol::ok(&protocol::StreamOpened { name: id, report, destination }),
            (Ok(_), Err(e)) | (Err(e), _) => {
                let mut reply = e.reply();
                reply["name"] = id.into();
                reply
            }
        }
    }

    /// Makes the stream directories that do not exist yet (when a stream first needs
    /// them, so that a ferryd that never carries a stream makes none): for the stream
    /// group (read, write and setgid, so a VMM of that group can listen there and its
    /// sockets take the group) when the stream endpoints have one, for ferryd's user
    /// alone otherwise. One that cannot be made is said and left.
    fn make_stream_dirs(&self) {
        for d in self.plan.daemon.stream_dirs.iter().filter(|d| !d.exists()) {
            let made = std::fs::create_dir_all(d).and_then(|()| match self.stream_access.group {
                Some(g) => {
                    nix::unistd::chown(d, None, Some(g)).map_err(std::io::Error::from)?;
                    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o2770))
                }
                None => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)),
            });
            match made {
                Ok(()) => log::info!("stream directory {} made", d.display()),
                Err(e) => log::warn!("cannot make the stream directory {}: {e}", d.display()),
            }
        }
    }

    /// Serves other ferryd on the peer port until the process ends: each authenticated
    /// connection (bounded by the plan's limits before it authenticates) may open the
    /// destination side of one stream; at most `control_clients` at once.
    pub fn serve_peers(&self, listener: TcpListener) {
        static LOG: RateLimited = RateLimited::new(std::time::Duration::from_secs(10));
        let acc = match crate::session::accept::Acceptor::new(&listener, &self.auth, crate::wire::features::PEER, &self.plan.limits) {
            Ok(a) => a,
            Err(e) => return log::error!("cannot serve peers: {e}"),
        };
        let slots = Slots::new(self.plan.limits.control_clients as usize);
        std::thread::scope(|s| {
            loop {
                let wait = crate::session::accept::Wait { what: "peers", deadline: None, watch: &[] };
                let taken = std::cell::Cell::new(None);
                let next = acc.next(wait, |a| {
                    if a.hello.features.get() & crate::wire::features::PEER == 0 {
                        let wanted = "a ferryd opening a stream (the peer port takes STREAM_OPEN only)";
                        return Err(crate::session::accept::Turned::NotA { peer: a.peer, wanted });
                    }
                    let slot = slots.take().ok_or_else(|| crate::session::accept::Turned::PeerStreams(slots.max()))?;
                    taken.set(Some(slot));
                    Ok(())
                });
                match next {
                    Ok(crate::session::accept::Next::Conn(a)) => {
                        let slot = taken.take();
                        s.spawn(move || {
                            let _slot = slot;
                            self.peer_stream(crate::peer::Asked { ctl: crate::conn::Ctl::new(a.s, a.keys) }, a.peer);
                        });
                    }
                    Ok(crate::session::accept::Next::Watched(_)) | Err(crate::conn::SessionError::TimedOut { .. }) => {}
                    Err(e) => {
                        LOG.warn(format_args!("peers: {e}"));
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        });
    }

    /// One peer's STREAM_OPEN: the forward target checked against the stream
    /// directories, a listener for the channels, then the destination side run as a
    /// `stream_in` session while the peer connection lives; RESULT at the end.
    fn peer_stream(&self, mut asked: crate::peer::Asked, peer: std::net::SocketAddr) {
        let open = match asked.open() {
            Ok(o) => o,
            Err(e) => {
                log::warn!("peer {peer}: {e}");
                return asked.refuse(&e.to_string());
            }
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.in_flight);
        if self.is_draining() {
            return asked.refuse(&RequestError::PeerDraining.to_string());
        }
        self.make_stream_dirs();
        let side = (|| -> Result<StreamSide, Failed> {
            let forward: crate::stream::Endpoint = open.forward.parse().map_err(RequestError::from)?;
            crate::peer::check_forward(&forward, &self.plan.daemon.stream_dirs).map_err(RequestError::from)?;
            // Channels come to the address the peer reached, on a port of the plan's range.
            let ip = asked.ctl.s.local_addr().map_err(RequestError::PeerConn)?.ip();
            self.stream_in_side(&std::net::SocketAddr::new(ip, 0).to_string(), &open.forward)
        })();
        let side = match side {
            Ok(s) => s,
            Err(e) => {
                log::warn!("peer {peer}: stream {} refused: {}", open.id, e.message);
                return asked.refuse(&e.message);
            }
        };
        let StreamSide::Destination { listener, .. } = &side else { unreachable!("stream_in_side makes a destination side") };
        let port = listener.local_addr().map_or(0, |a| a.port());
        if let Err(e) = asked.opened(port) {
            return log::warn!("peer {peer}: stream {}: {e}", open.id);
        }
        log::info!("stream {}: opened by {peer}; channels on port {port}, forwarded to {}", open.id, open.forward);
        let watch = asked.ctl.s.try_clone().ok().map(OwnedFd::from);
        let r = self.stream(Role::StreamIn, side, &|_| {}, false, watch);
        match &r {
            Ok(rep) => log::info!(
                "stream {}: {} bytes in {} channel(s) forwarded to {}",
                open.id,
                rep.received_bytes,
                rep.channels.len(),
                open.forward
            ),
            Err(e) => log::warn!("stream {}: {}", open.id, e.message),
        }
        asked.finish(r.as_ref());
    }

    /// A listener for a receive or an incoming migration on `listen`. Port 0 leaves the
    /// port to ferryd: the first free one of the plan's `incoming_ports` when it has
    /// them (a firewall opens those), any the kernel gives otherwise.
    fn bind_incoming(&self, listen: &str) -> std::io::Result<TcpListener> {
        let addr: std::net::SocketAddr = match listen.parse() {
            Ok(a) => a,
            // A host name: the kernel's choice of port stands.
            Err(_) => return TcpListener::bind(listen),
        };
        match self.plan.daemon.incoming_ports {
            Some((first, last)) if addr.port() == 0 => {
                let mut last_err = None;
                for port in first..=last {
                    match TcpListener::bind(std::net::SocketAddr::new(addr.ip(), port)) {
                        Ok(l) => return Ok(l),
                        Err(e) => last_err = Some(e),
                    }
                }
                let e = last_err.expect("a range has a port");
                Err(std::io::Error::new(e.kind(), format!("no free port in incoming_ports {first}-{last} (last: {e})")))
            }
            _ => TcpListener::bind(addr),
        }
    }

    /// SIGTERM: new sessions are refused from now on; `/readyz` and the metrics say so.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.set_draining(true);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// How long a destination VMM may take to say it holds the memory it was handed.
const TAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits up to [`TAKE_TIMEOUT`] for the VMM's answer to an event: the request it sent,
/// and the descriptors that came with it.
fn answer(conn: &mut Client) -> Result<(Request, Vec<std::os::fd::OwnedFd>), VmmError> {
    conn.stream().set_read_timeout(Some(TAKE_TIMEOUT)).map_err(VmmError::Io)?;
    let got = conn.recv();
    let _ = conn.stream().set_read_timeout(None);
    let (line, fds) = match got {
        Ok(Some(got)) => got,
        Ok(None) => return Err(VmmError::Closed),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(VmmError::Silent(TAKE_TIMEOUT));
        }
        Err(e) => return Err(VmmError::Read(e)),
    };
    Ok((conn.parse(&line).map_err(VmmError::NotRequest)?, fds))
}

/// `got` is not the answer `wanted`.
fn wrong_answer(got: &Request, wanted: &'static str) -> VmmError {
    VmmError::Answer { got: format!("{got:?}"), wanted }
}

/// Hands a verified migration's memory to the destination VMM and waits until it says it
/// holds it (`{"cmd":"taken"}`).
fn hand_over(conn: &mut Client, inc: &crate::migrate::dest::Incoming) -> Result<(), VmmError> {
    let fds: Vec<_> = inc.memory.iter().map(|m| m.as_fd()).collect();
    let event = Event::Memory { regions: fds.len(), report: inc.report.clone() };
    conn.send(event.to_value(), &fds).map_err(VmmError::Send)?;
    match answer(conn)? {
        (Request::Taken, fds) if fds.is_empty() => Ok(()),
        (Request::Taken, fds) => Err(VmmError::Descriptors { answer: "taken", want: 0, got: fds.len() }),
        (other, _) => Err(wrong_answer(&other, "taken")),
    }
}

/// The destination VMM on its control connection, as a migration meets it.
struct DestConn<'c>(&'c mut Client);

impl crate::migrate::dest::DestVmm for DestConn<'_> {
    fn deliver(&mut self, inc: &crate::migrate::dest::Incoming) -> Result<(), VmmError> {
        hand_over(self.0, inc)
    }

    /// The memory goes with a `postcopy` event; the VMM answers `faults` with its
    /// userfaultfd and mappings.
    fn switch_over(
        &mut self,
        inc: &crate::migrate::dest::Incoming,
    ) -> Result<(hw::uffd::Userfault, Vec<crate::migrate::postcopy::Mapping>), VmmError> {
        let conn = &mut *self.0;
        let fds: Vec<_> = inc.memory.iter().map(|m| m.as_fd()).collect();
        let event = Event::Postcopy { regions: fds.len(), report: inc.report.clone() };
        conn.send(event.to_value(), &fds).map_err(VmmError::Send)?;
        let (maps, mut fds) = match answer(conn)? {
            (Request::Faults { maps }, fds) => (maps, fds),
            (other, _) => return Err(wrong_answer(&other, "faults")),
        };
        if fds.len() != 1 {
            return Err(VmmError::Descriptors { answer: "faults", want: 1, got: fds.len() });
        }
        let uffd = hw::uffd::Userfault::from_fd(fds.pop().expect("one"))?;
        Ok((uffd, maps))
    }

    fn run(&mut self) -> Result<(), VmmError> {
        self.0.send(Event::Running.to_value(), &[]).map_err(VmmError::Send)
    }

    fn all_local(&mut self) -> Result<(), VmmError> {
        let conn = &mut *self.0;
        conn.send(Event::Local.to_value(), &[]).map_err(VmmError::Send)?;
        match answer(conn)? {
            (Request::Released, _) => Ok(()),
            (other, _) => Err(wrong_answer(&other, "released")),
        }
    }
}

/// A `stream_open` request's fields.
struct StreamOpen {
    to: String,
    name: Option<String>,
    listen: Vec<String>,
    forward: Option<String>,
    compress: Option<String>,
}

/// One side of a proxied migration, bound and ready to run.
enum StreamSide {
    Source { listeners: Vec<crate::stream::Listener>, to: String, compression: Compression },
    Destination { listener: TcpListener, forward: crate::stream::Endpoint },
}

/// Runs `f`, telling `say` (when given) every 250 ms how far it got: `progress` events with
/// the region bytes `done`, the `total` (0 until known) and, for a stream, its `channels`.
fn progress_events<T>(
    say: Option<&(dyn Fn(serde_json::Value) + Sync)>,
    done: &AtomicU64,
    total: &AtomicU64,
    channels: Option<&AtomicU64>,
    f: impl FnOnce() -> T,
) -> T {
    let Some(say) = say else { return f() };
    let tick = || {
        say(Event::Progress {
            bytes: done.load(Ordering::Relaxed),
            total: total.load(Ordering::Relaxed),
            channels: channels.map(|c| c.load(Ordering::Relaxed)),
        }
        .to_value());
    };
    crate::live::ticking(std::time::Duration::from_millis(250), tick, f)
}

/// A session's last reply: its report, or why it failed.
fn result<R: Serialize>(r: Result<R, Failed>) -> serde_json::Value {
    match r {
        Ok(report) => protocol::ok(&protocol::Done { report }),
        Err(e) => e.reply(),
    }
}

/// `off`, `zstd` (level 1), `zstd:N`, or `auto`: compress only while it finishes sooner
/// (the plan's adaptive level if it has one, else 1), as `auto` means in ferry.toml.
pub fn parse_compression(s: &str, plan: Compression) -> Result<Compression, crate::BadChoice> {
    match s {
        "auto" => Ok(match plan {
            Compression::Adaptive { .. } => plan,
            _ => Compression::Adaptive { level: 1 },
        }),
        "off" => Ok(Compression::Off),
        "zstd" => Ok(Compression::Zstd { level: 1 }),
        _ => match s.strip_prefix("zstd:").map(str::parse::<i32>) {
            Some(Ok(level)) if (1..=19).contains(&level) => Ok(Compression::Zstd { level }),
            _ => Err(crate::BadChoice { what: "compression", got: s.to_string(), choices: "auto, off or zstd:<1-19>" }),
        },
    }
}
