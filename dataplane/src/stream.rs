//! Stream mode: ferry carries an unmodified VMM's migration stream. On the source, a
//! proxy accepts QEMU's migration connections (`migrate unix:/run/ferry/<id>.sock`, or
//! TCP); each becomes a ferry channel to the destination proxy, which connects to the
//! destination QEMU's `-incoming` socket. QEMU multifd opens several connections: each is
//! its own channel, carried side by side, and the destination opens them towards QEMU in
//! the order the source accepted them (QEMU 7.2 takes the first connection as its main
//! channel).
//!
//! ```text
//!  QEMU src ──unix/tcp──► proxy (source) ══ ferry channel per connection ══► proxy (destination) ──unix/tcp──► QEMU dst
//!                          HELLO (lane = channel number, feature STREAM), authenticated as every session
//!                          DATA (offset = stream position, raw | zstd, crc32c) ... in both directions
//!                          LANE_END (frames, bytes) when a side's QEMU closes its end
//! ```
//!
//! Both directions are framed the same way, so a return path works too. A channel whose
//! ferry connection breaks is reset towards QEMU, never closed cleanly, so QEMU sees a
//! failed migration rather than a stream that ended early.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::auth::{Auth, client_handshake};
use crate::conn::{Cancel, Counted, FrameReader, Refusal, SessionError, Violation, write_all_vectored, write_frame};
use crate::encode::{Compressor, Decoder, Encoder};
use crate::plan::{Compression, Limits};
use crate::session::accept::{Acceptor, Next, Turned, Wait};
use crate::session::seal::{Keys, Seal, TAG_LEN};
use crate::wire::{self, Encoding, FrameError, HEADER_LEN, Kind, features};

/// Bytes read from QEMU per frame, at most.
pub const STREAM_CHUNK: usize = 256 << 10;

/// Where QEMU is: `unix:/path` or `tcp:HOST:PORT` (QEMU's own URI syntax), or a bare
/// `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = crate::BadChoice;
    fn from_str(s: &str) -> Result<Endpoint, crate::BadChoice> {
        let bad = || crate::BadChoice { what: "endpoint", got: s.to_string(), choices: "unix:/path or tcp:HOST:PORT" };
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        let hp = s.strip_prefix("tcp:").unwrap_or(s);
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(Endpoint::Tcp(hp.to_string())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// One of QEMU's connections.
#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn connect(e: &Endpoint) -> io::Result<Conn> {
        Ok(match e {
            Endpoint::Unix(p) => Conn::Unix(at_unix_path(p, |p| UnixStream::connect(p))?),
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }

    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        };
    }

    /// Ends the connection so QEMU sees an error, not a clean end of stream: an RST on
    /// TCP (SO_LINGER 0), both directions shut on a UNIX socket.
    fn abort(&self) {
        if let Conn::Tcp(s) = self {
            let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &libc_linger_zero());
        }
        self.shutdown(Shutdown::Both);
    }
}

fn libc_linger_zero() -> nix::libc::linger {
    nix::libc::linger { l_onoff: 1, l_linger: 0 }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The most bytes of a UNIX socket path the kernel takes (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;

/// Runs `f` (a bind or a connect) on `path`, or, where the path is longer than a socket
/// address holds (a pod's socket directory as the node sees it is often longer), on the
/// same file named through its directory's descriptor: `/proc/self/fd/N/NAME`. The
/// directory is resolved when it is opened, just as the long path would have been.
fn at_unix_path<T>(path: &std::path::Path, f: impl FnOnce(&std::path::Path) -> io::Result<T>) -> io::Result<T> {
    use std::os::fd::AsRawFd;
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return f(path) };
    let d = std::fs::File::open(dir)?;
    f(&std::path::Path::new(&format!("/proc/self/fd/{}", d.as_raw_fd())).join(name))
}

/// A UNIX listener at `path` (its directory made if missing), replacing a stale socket
/// file there. Anything else at the path (a regular file, a directory, a socket something
/// still serves) is left alone and refused: a path a client names must never cost a file.
pub fn bind_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && at_unix_path(path, |p| UnixStream::connect(p)).is_err() => std::fs::remove_file(path)?,
        Ok(m) if m.file_type().is_socket() => {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is served by another process", path.display())));
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket: it is left alone", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    at_unix_path(path, |p| UnixListener::bind(p))
}

/// Where the source proxy takes QEMU's connections.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `e`; a stale UNIX socket file is replaced ([`bind_unix`]).
    pub fn bind(e: &Endpoint) -> io::Result<Listener> {
        match e {
            Endpoint::Unix(p) => Ok(Listener::Unix(bind_unix(p)?, p.clone())),
            Endpoint::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a)?)),
        }
    }

    /// What QEMU should be told to migrate to.
    pub fn uri(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::Tcp(l) => l.local_addr().map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
        }
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Unix(l, _) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[derive(Debug)]
pub struct ProxyOptions {
    pub auth: Auth,
    pub compression: Compression,
    /// What unauthenticated connections may cost, and how many channels a migration may
    /// open (`max_lanes`).
    pub limits: Limits,
    /// Counted as the stream goes, for a progress display.
    pub progress: Option<std::sync::Arc<StreamProgress>>,
    /// How long the endpoint waits for its first connection (the VMM's on the source,
    /// the first channel on the destination) before it closes; none: for ever.
    pub idle: Option<Duration>,
    /// Whoever asked for the stream (a control client, a peer ferryd): while no
    /// connection has come, its hanging up (or a byte from it) closes the endpoint.
    pub watch: Option<std::os::fd::OwnedFd>,
}

impl ProxyOptions {
    /// Options with no idle time and nothing watched.
    pub fn new(auth: Auth, compression: Compression, limits: Limits) -> ProxyOptions {
        ProxyOptions { auth, compression, limits, progress: None, idle: None, watch: None }
    }

    /// Whether the wait for the first connection is over: an error once the idle time
    /// has passed since `since`.
    fn idle_over(&self, since: Instant, what: &'static str) -> Result<(), SessionError> {
        match self.idle {
            Some(idle) if since.elapsed() >= idle => Err(Cancel::Idle { what, idle }.into()),
            _ => Ok(()),
        }
    }
}

/// The watched requester went away before anything connected.
fn requester_left() -> SessionError {
    Cancel::RequesterLeft.into()
}

/// A proxied migration so far: stream bytes carried (both directions) and channels opened.
#[derive(Debug, Default)]
pub struct StreamProgress {
    pub bytes: AtomicU64,
    pub channels: AtomicU64,
}

/// One channel, one direction's counters included for each side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChannelReport {
    pub channel: u16,
    /// Stream bytes this side read from its QEMU and sent on.
    pub sent_bytes: u64,
    /// Stream bytes this side received and wrote to its QEMU.
    pub received_bytes: u64,
    /// Bytes this side put on the ferry connection (headers and payloads).
    pub wire_bytes: u64,
    pub frames: u64,
    pub compressed_in_bytes: u64,
    pub compressed_out_bytes: u64,
    pub seconds: f64,
}

/// A whole proxied migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyReport {
    pub role: String,
    pub channels: Vec<ChannelReport>,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub wire_bytes: u64,
    pub seconds: f64,
    /// Stream bytes (both directions) per second, GB/s.
    pub gbps: f64,
    pub compression: String,
    /// Stream bytes per compressed byte over the chunks sent compressed (1 when none).
    pub compression_ratio: f64,
}

impl ProxyReport {
    /// One line for a terminal: the role, channels, bytes each way, time, rate, wire bytes
    /// and compression.
    pub fn line(&self) -> String {
        format!(
            "{}: {} channel(s), {} bytes sent, {} received in {:.3} s ({:.2} GB/s), {} wire bytes, compression {} ({:.2}x)",
            self.role,
            self.channels.len(),
            self.sent_bytes,
            self.received_bytes,
            self.seconds,
            self.gbps,
            self.wire_bytes,
            self.compression,
            self.compression_ratio
        )
    }
}

/// Channels in flight: what ends the proxy, and what a failure shuts down.
struct Channels {
    state: Mutex<ChannelState>,
    turn: Condvar,
    failed: AtomicBool,
    progress: std::sync::Arc<StreamProgress>,
}

#[derive(Default)]
struct ChannelState {
    /// The next channel the destination may connect towards QEMU.
    next: u16,
    running: usize,
    main_done: bool,
    reports: Vec<ChannelReport>,
    /// The failures, each with its channel (none: the stream's set-up).
    errors: Vec<(Option<u16>, SessionError)>,
    /// Every socket of every channel, to shut down when one channel fails.
    socks: Vec<(Conn, TcpStream)>,
    /// Channels the destination accepted (authenticated) so far.
    accepted: usize,
}

impl Channels {
    fn new(opts: &ProxyOptions) -> Channels {
        Channels {
            state: Mutex::new(ChannelState::default()),
            turn: Condvar::new(),
            failed: AtomicBool::new(false),
            progress: opts.progress.clone().unwrap_or_default(),
        }
    }

    fn finished(&self) -> bool {
        let s = self.state.lock().expect("channel state");
        s.running == 0 && (s.main_done || self.failed.load(Ordering::Relaxed))
    }

    /// Records a failure and resets every channel: QEMU on both sides sees the stream break.
    fn fail(&self, st: &mut ChannelState, channel: Option<u16>, why: SessionError) {
        match channel {
            Some(n) => log::warn!("channel {n}: {why}"),
            None => log::warn!("{why}"),
        }
        st.errors.push((channel, why));
        self.failed.store(true, Ordering::Relaxed);
        for (q, f) in &st.socks {
            q.abort();
            let _ = f.shutdown(Shutdown::Both);
        }
        self.turn.notify_all();
    }

    fn end(&self, n: u16, r: Result<ChannelReport, SessionError>) {
        let mut s = self.state.lock().expect("channel state");
        s.running -= 1;
        if n == 0 {
            s.main_done = true;
        }
        match r {
            Ok(rep) => s.reports.push(rep),
            Err(e) => self.fail(&mut s, Some(n), e),
        }
        self.turn.notify_all();
    }

    fn report(&self, role: &str, compression: Compression, t0: Instant) -> Result<ProxyReport, SessionError> {
        let mut s = self.state.lock().expect("channel state");
        if !s.errors.is_empty() {
            return Err(SessionError::StreamBroke(std::mem::take(&mut s.errors)));
        }
        let mut r = ProxyReport { role: role.into(), compression: compression.to_string(), ..ProxyReport::default() };
        s.reports.sort_by_key(|c| c.channel);
        let (mut cin, mut cout) = (0, 0);
        for c in &s.reports {
            r.sent_bytes += c.sent_bytes;
            r.received_bytes += c.received_bytes;
            r.wire_bytes += c.wire_bytes;
            cin += c.compressed_in_bytes;
            cout += c.compressed_out_bytes;
        }
        r.channels = std::mem::take(&mut s.reports);
        r.seconds = t0.elapsed().as_secs_f64();
        r.gbps = (r.sent_bytes + r.received_bytes) as f64 / r.seconds / 1e9;
        r.compression_ratio = if cout == 0 { 1.0 } else { cin as f64 / cout as f64 };
        Ok(r)
    }
}

/// Source side: takes QEMU's connections on `listeners` and carries each to the
/// destination proxy at `to`. Returns when QEMU's first (main) connection and every other
/// have ended, or the stream broke.
pub fn source(listeners: &[Listener], to: &str, opts: &ProxyOptions) -> Result<ProxyReport, SessionError> {
    let channels = Channels::new(opts);
    let mut t0 = None;
    let opened = Instant::now();
    std::thread::scope(|s| {
        let mut n: u16 = 0;
        while !channels.finished() {
            let r = (|| -> Result<(), SessionError> {
                let mut fds: Vec<_> = listeners.iter().map(Listener::fd).collect();
                // Until the VMM's first connection: the idle time, and the requester.
                let first = t0.is_none();
                if first && let Some(w) = &opts.watch {
                    fds.push(w.as_fd());
                }
                let Some(l) = wait_readable(fds)? else {
                    return if first { opts.idle_over(opened, "migration connection from the VMM") } else { Ok(()) };
                };
                if l == listeners.len() {
                    return Err(requester_left());
                }
                let qemu = listeners[l].accept().map_err(|e| SessionError::io("accepting QEMU's migration connection", e))?;
                t0.get_or_insert_with(Instant::now);
                let opened = (|| {
                    let ferry = connect(to)?;
                    let mut hs = ferry.try_clone().map_err(|e| SessionError::io("cloning a channel", e))?;
                    hs.set_read_timeout(Some(crate::engine::IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
                    let (f, keys) = client_handshake(&mut hs, &opts.auth, n, 0, features::STREAM)?;
                    if f & features::STREAM == 0 {
                        return Err(not_a_stream_peer(to));
                    }
                    hs.set_read_timeout(None).map_err(|e| SessionError::io("clearing the read timeout", e))?;
                    Ok((ferry, keys))
                })();
                let (ferry, keys) = match opened {
                    Ok(f) => f,
                    Err(e) => {
                        qemu.abort();
                        return Err(e);
                    }
                };
                log::info!("channel {n}: QEMU connected on {}; carried to {to}", listeners[l].uri());
                start_channel(s, &channels, n, qemu, ferry, keys, opts.compression)?;
                n = n.checked_add(1).ok_or(Refusal::TooMany("65535 channels"))?;
                Ok(())
            })();
            if let Err(e) = r {
                // The channels already running are reset, so QEMU fails the migration.
                let mut st = channels.state.lock().expect("channel state");
                channels.fail(&mut st, None, e);
                break;
            }
        }
    });
    channels.report("source", opts.compression, t0.unwrap_or_else(Instant::now))
}

/// Destination side: accepts the source proxy's channels on `listener` and connects each
/// to QEMU at `forward`, in channel order. Connections that do not authenticate as a
/// stream-mode proxy (a port probe, a wrong key, a one-shot sender) are turned away on
/// their own threads, bounded by the plan's limits, without touching the migration.
pub fn destination(listener: &TcpListener, forward: &Endpoint, opts: &ProxyOptions) -> Result<ProxyReport, SessionError> {
    let channels = Channels::new(opts);
    let acc = Acceptor::new(listener, &opts.auth, features::STREAM, &opts.limits).map_err(|e| SessionError::io("listening", e))?;
    let max_channels = opts.limits.max_lanes as usize;
    let mut t0 = None;
    let opened = Instant::now();
    let watch: Vec<_> = opts.watch.iter().map(|w| w.as_fd()).collect();
    std::thread::scope(|s| -> Result<(), SessionError> {
        while !channels.finished() {
            // Until the first channel: the idle time, and the requester.
            let first = t0.is_none();
            if first {
                opts.idle_over(opened, "channel from the source")?;
            }
            // Short waits: the loop ends once the migration's channels have.
            let deadline = Some(Instant::now() + Duration::from_millis(100));
            let wait = Wait { what: "the source proxy's channels", deadline, watch: if first { &watch } else { &[] } };
            let a = match acc.next(wait, |a| {
                if a.hello.features.get() & features::STREAM == 0 {
                    return Err(Turned::NotA { peer: a.peer, wanted: "a stream-mode proxy (ferryctl proxy --listen ...)" });
                }
                let mut st = channels.state.lock().expect("channel state");
                if st.accepted >= max_channels {
                    return Err(Turned::Channels(max_channels));
                }
                st.accepted += 1;
                Ok(())
            }) {
                Ok(Next::Conn(a)) => a,
                Ok(Next::Watched(_)) => return Err(requester_left()),
                Err(SessionError::TimedOut { .. }) => continue,
                Err(e) => return Err(e),
            };
            t0.get_or_insert_with(Instant::now);
            if tune(&a.s).is_err() {
                continue;
            }
            let channels = &channels;
            let (ferry, peer, n, keys) = (a.s, a.peer, a.hello.lane.get(), a.keys);
            // The wait for this channel's turn runs on the channel's own thread, so a
            // channel that arrives early holds up no other.
            s.spawn(move || match take_turn(channels, n, forward) {
                Ok(qemu) => {
                    log::info!("channel {n}: from {peer}, carried to QEMU at {forward}");
                    if let Err(e) = start_channel_here(channels, n, qemu, ferry, keys, opts.compression) {
                        log::warn!("channel {n}: {e}");
                    }
                }
                Err(e) => {
                    let _ = ferry.shutdown(Shutdown::Both);
                    let mut st = channels.state.lock().expect("channel state");
                    channels.fail(&mut st, Some(n), e);
                }
            });
        }
        Ok(())
    })?;
    channels.report("destination", opts.compression, t0.unwrap_or_else(Instant::now))
}

/// Waits until channel `n` is next, then connects it to QEMU: QEMU sees the connections
/// in the order the source accepted them.
fn take_turn(channels: &Channels, n: u16, forward: &Endpoint) -> Result<Conn, SessionError> {
    let mut st = channels.state.lock().expect("channel state");
    let since = Instant::now();
    while st.next != n {
        if channels.failed.load(Ordering::Relaxed) || st.next > n {
            return Err(Violation::OutOfTurn { what: "channel", got: n.into(), next: st.next.into() }.into());
        }
        if since.elapsed() > crate::engine::IDLE_TIMEOUT {
            return Err(Violation::ChannelWait { channel: n, next: st.next, waited: since.elapsed() }.into());
        }
        st = channels.turn.wait_timeout(st, Duration::from_secs(1)).expect("channel state").0;
    }
    let qemu = Conn::connect(forward).map_err(|e| SessionError::io(format!("connecting to QEMU at {forward}"), e));
    st.next += 1;
    channels.turn.notify_all();
    qemu
}

fn not_a_stream_peer(to: &str) -> SessionError {
    Refusal::NotService { addr: to.to_string(), wanted: "a stream-mode proxy (start `ferryctl proxy --serve ... --forward ...` there)" }
        .into()
}

/// Waits up to 100 ms for one of `fds` to be readable; its index.
fn wait_readable(fds: Vec<std::os::fd::BorrowedFd<'_>>) -> Result<Option<usize>, SessionError> {
    let mut pfds: Vec<PollFd<'_>> = fds.into_iter().map(|f| PollFd::new(f, PollFlags::POLLIN)).collect();
    match poll(&mut pfds, PollTimeout::from(100u8)) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(pfds.iter().position(|p| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))),
        Err(nix::errno::Errno::EINTR) => Ok(None),
        Err(e) => Err(SessionError::io("waiting for connections", e.into())),
    }
}

/// Channels carry a migration that may pause for long (the VMM sets the pace): no read
/// timeout, keepalive instead, and no Nagle delay.
fn tune(s: &TcpStream) -> Result<(), SessionError> {
    s.set_nodelay(true).map_err(|e| SessionError::io("setting TCP_NODELAY", e))?;
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::KeepAlive, &true);
    Ok(())
}

fn connect(to: &str) -> Result<TcpStream, SessionError> {
    let addrs: Vec<_> = to.to_socket_addrs().map_err(|e| SessionError::io(format!("resolving {to}"), e))?.collect();
    let s = TcpStream::connect(&addrs[..]).map_err(|e| SessionError::io(format!("connecting to the destination proxy at {to}"), e))?;
    tune(&s)?;
    Ok(s)
}

/// Registers a channel's sockets and starts its two pumps on `s`.
fn start_channel<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    channels: &'s Channels,
    n: u16,
    qemu: Conn,
    ferry: TcpStream,
    keys: Keys,
    compression: Compression,
) -> Result<(), SessionError> {
    register(channels, n, &qemu, &ferry)?;
    s.spawn(move || channels.end(n, run_channel(n, qemu, ferry, keys, compression, &channels.progress)));
    Ok(())
}

/// [`start_channel`] on the calling thread (the destination's channel thread).
fn start_channel_here(
    channels: &Channels,
    n: u16,
    qemu: Conn,
    ferry: TcpStream,
    keys: Keys,
    compression: Compression,
) -> Result<(), SessionError> {
    register(channels, n, &qemu, &ferry)?;
    channels.end(n, run_channel(n, qemu, ferry, keys, compression, &channels.progress));
    Ok(())
}

fn register(channels: &Channels, n: u16, qemu: &Conn, ferry: &TcpStream) -> Result<(), SessionError> {
    let clone = |e| SessionError::io(format!("cloning channel {n}"), e);
    let pair = (qemu.try_clone().map_err(clone)?, ferry.try_clone().map_err(clone)?);
    let mut st = channels.state.lock().expect("channel state");
    st.running += 1;
    st.socks.push(pair);
    channels.progress.channels.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Both directions of one channel; the first failure aborts both.
fn run_channel(
    n: u16,
    qemu: Conn,
    ferry: TcpStream,
    keys: Keys,
    compression: Compression,
    progress: &StreamProgress,
) -> Result<ChannelReport, SessionError> {
    let Keys { tx, rx, .. } = keys;
    let t = Instant::now();
    let clone = |e| SessionError::io(format!("cloning channel {n}"), e);
    let (q2, f2) = (qemu.try_clone().map_err(clone)?, ferry.try_clone().map_err(clone)?);
    let (qa, fa) = (qemu.try_clone().map_err(clone)?, ferry.try_clone().map_err(clone)?);
    let (out, inn) = std::thread::scope(|s| {
        let out = s.spawn(move || {
            let r = pump_out(n, qemu, ferry, tx, compression, progress);
            if r.is_err() {
                qa.abort();
                let _ = fa.shutdown(Shutdown::Both);
            }
            r
        });
        let inn = pump_in(n, f2, q2, rx, progress);
        (out.join().expect("pump thread panicked"), inn)
    });
    let received = inn?;
    let mut rep = out?;
    rep.received_bytes = received;
    rep.seconds = t.elapsed().as_secs_f64();
    Ok(rep)
}

/// QEMU -> ferry: frames of what QEMU writes, then LANE_END when QEMU closes its side.
fn pump_out(
    n: u16,
    mut qemu: Conn,
    mut ferry: TcpStream,
    mut tx: Seal,
    compression: Compression,
    progress: &StreamProgress,
) -> Result<ChannelReport, SessionError> {
    let mut buf = vec![0u8; STREAM_CHUNK];
    // The encoder every session uses (its adaptive policy), with this channel's zstd context.
    let mut enc = Encoder::new(compression);
    let mut z = Compressor::new(STREAM_CHUNK);
    let mut rep = ChannelReport { channel: n, ..ChannelReport::default() };
    loop {
        let got = match qemu.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SessionError::io(format!("reading QEMU's stream on channel {n}"), e)),
        };
        let mut wire_bytes = 0;
        enc.encode_bytes(&mut z, 0, rep.sent_bytes, &buf[..got], &mut |h, payload| {
            let tag = tx.tag(&h, [payload]);
            wire_bytes += (HEADER_LEN + payload.len() + TAG_LEN) as u64;
            write_all_vectored(&mut ferry, &[h.as_bytes(), payload, &tag]).map_err(|e| SessionError::io(format!("sending channel {n}"), e))
        })?;
        enc.adaptive.chunk_done(got as u64);
        rep.sent_bytes += got as u64;
        rep.wire_bytes += wire_bytes;
        rep.frames += 1;
        progress.bytes.fetch_add(got as u64, Ordering::Relaxed);
    }
    rep.compressed_in_bytes = enc.stats.compressed_in;
    rep.compressed_out_bytes = enc.stats.compressed_out;
    let end = wire::LaneEnd { frames: rep.frames.into(), bytes: rep.sent_bytes.into() };
    write_frame(&mut ferry, &mut tx, Kind::LaneEnd, end.as_bytes())?;
    let _ = ferry.shutdown(Shutdown::Write);
    Ok(rep)
}

/// ferry -> QEMU: each frame checked (crc, stream position, lengths) and decoded; at
/// LANE_END (whose counts must match) QEMU's side is closed for writing. Returns the
/// stream bytes written to QEMU.
fn pump_in(n: u16, mut ferry: TcpStream, mut qemu: Conn, rx: Seal, progress: &StreamProgress) -> Result<u64, SessionError> {
    let max = wire::max_payload_for(STREAM_CHUNK as u32);
    let mut reader = FrameReader::new(4 * (HEADER_LEN + max as usize + TAG_LEN), max, rx);
    let mut dec = Decoder::default();
    let (mut pos, mut frames) = (0u64, 0u64);
    let op = format!("receiving channel {n}");
    let fail = |e: SessionError, qemu: &Conn| {
        qemu.abort();
        e
    };
    loop {
        let (h, kind, payload) = reader.next(&mut ferry, &op).map_err(|e| fail(e, &qemu))?;
        match kind {
            Kind::Data => {
                let (enc, off, raw) = (h.encoding().map_err(|e| fail(e.into(), &qemu))?, h.offset.get(), h.raw_len.get() as usize);
                if off != pos || raw == 0 || raw > STREAM_CHUNK || h.region.get() != 0 {
                    return Err(fail(Violation::StreamBytes { at: off, len: raw, next: pos }.into(), &qemu));
                }
                let bytes: &[u8] = match enc {
                    Encoding::Raw if payload.len() == raw => payload,
                    Encoding::Zstd => dec.zstd(payload, raw as u32).map_err(|e| fail(e.into(), &qemu))?,
                    _ => {
                        return Err(fail(
                            FrameError::Lengths { encoding: enc, length: payload.len() as u32, raw_len: raw as u32 }.into(),
                            &qemu,
                        ));
                    }
                };
                qemu.write_all(bytes).map_err(|e| fail(SessionError::io(format!("writing channel {n} to QEMU"), e), &qemu))?;
                pos += raw as u64;
                progress.bytes.fetch_add(raw as u64, Ordering::Relaxed);
                frames += 1;
            }
            Kind::LaneEnd => {
                let end: wire::LaneEnd = wire::parse(Kind::LaneEnd, payload).map_err(|e| fail(e.into(), &qemu))?;
                for (what, announced, found) in [("frames", end.frames.get(), frames), ("bytes", end.bytes.get(), pos)] {
                    if announced != found {
                        let e = Violation::Miscount { what: Counted::Channel { channel: n, what }, announced, found };
                        return Err(fail(e.into(), &qemu));
                    }
                }
                qemu.shutdown(Shutdown::Write);
                return Ok(pos);
            }
            Kind::Error => return Err(fail(SessionError::Peer(String::from_utf8_lossy(payload).into_owned()), &qemu)),
            other => return Err(fail(FrameError::Unexpected { expected: Kind::Data, got: other }.into(), &qemu)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("unix:/run/ferry/a.sock".parse::<Endpoint>(), Ok(Endpoint::Unix("/run/ferry/a.sock".into())));
        assert_eq!("tcp:127.0.0.1:4444".parse::<Endpoint>(), Ok(Endpoint::Tcp("127.0.0.1:4444".into())));
        assert_eq!("[::1]:4444".parse::<Endpoint>(), Ok(Endpoint::Tcp("[::1]:4444".into())));
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("tcp:host".parse::<Endpoint>().is_err());
        assert!("exec:cat".parse::<Endpoint>().is_err());
    }

    /// A path longer than a socket address holds (a pod's directory as its node sees it)
    /// is bound and reached through its directory's descriptor.
    #[test]
    fn long_socket_paths_work() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("var/lib/kubelet/pods/0f6c1a3e-2b7d-4c51-9e80-5d3a7b2c4e19/volumes/kubernetes.io~empty-dir/sockets");
        let path = deep.join("migrationproxy/6a1f3c9e-0c8b-4d7e-9a51-2b9f5c1e7d10-49152-source.sock");
        assert!(path.as_os_str().len() > SUN_PATH_MAX);
        let l = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        assert!(path.exists());
        let mut c = Conn::connect(&Endpoint::Unix(path.clone())).unwrap();
        let mut s = l.accept().unwrap();
        c.write_all(b"ok").unwrap();
        let mut got = [0u8; 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok");
        drop(l);
        assert!(!path.exists(), "removed with its listener");
    }

    /// A stale socket is replaced; a regular file, a directory or a socket still served
    /// at the path is left alone and refused.
    #[test]
    fn binding_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| Endpoint::Unix(dir.path().join(name));
        std::fs::write(dir.path().join("file"), "precious").unwrap();
        let e = Listener::bind(&at("file")).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.path().join("file")).unwrap(), "precious");
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        assert!(Listener::bind(&at("dir")).is_err());
        assert!(dir.path().join("dir").is_dir());
        let live = Listener::bind(&at("live.sock")).unwrap();
        let e = Listener::bind(&at("live.sock")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(live);
        // A socket file nobody serves any more is replaced.
        drop(UnixListener::bind(dir.path().join("stale.sock")).unwrap());
        assert!(Listener::bind(&at("stale.sock")).is_ok());
    }
}
