//! Accepting a session's connections on a port that strangers can reach.
//!
//! Every connection is authenticated on a thread of its own before the session sees it,
//! so a port probe, a wrong key, garbage, or a peer that sends a byte now and then costs
//! the session nothing: it is turned away (with a rate-limited log line) and the acceptor
//! keeps listening for its real peer. What an unauthenticated connection may cost is
//! bounded by the plan's [`Limits`]: how many may be authenticating at once (more wait in
//! the kernel's backlog for a slot, so strangers holding every slot delay the real peer by
//! at most one handshake timeout instead of shutting it out), how long the whole handshake
//! may take, and how many bytes it may send. Running out of descriptors pauses accepting
//! instead of failing the session.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::auth::{Auth, server_handshake};
use crate::bounds::{Deadline, RateLimited};
use crate::conn::{SessionError, send_error};
use crate::plan::Limits;
use crate::session::seal::Keys;
use crate::wire::Hello;

/// A connection that completed the handshake.
#[derive(Debug)]
pub struct Authed {
    pub s: TcpStream,
    pub peer: SocketAddr,
    /// The peer's HELLO, its features narrowed to those both sides use.
    pub hello: Hello,
    pub keys: Keys,
}

/// What [`Acceptor::next`] waited for.
#[derive(Debug)]
pub enum Next {
    /// An authenticated connection the caller took.
    Conn(Authed),
    /// Watched descriptor `i` became readable or hung up (a peer closed, a VMM left).
    Watched(usize),
}

/// How long, and on what else, [`Acceptor::next`] waits.
#[derive(Debug, Clone, Copy)]
pub struct Wait<'a> {
    /// What is awaited, for errors ("the sender's data connections").
    pub what: &'a str,
    pub deadline: Option<Instant>,
    pub watch: &'a [BorrowedFd<'a>],
}

type Outcome = Result<Authed, (SocketAddr, SessionError)>;

/// Authenticates the connections arriving on one listener.
#[derive(Debug)]
pub struct Acceptor<'l> {
    listener: &'l TcpListener,
    auth: Arc<Auth>,
    offer: u64,
    limits: Limits,
    pending: Arc<AtomicUsize>,
    done_tx: mpsc::Sender<Outcome>,
    done_rx: mpsc::Receiver<Outcome>,
    /// Handshake threads write a byte here when they finish, to wake the poll.
    wake_tx: Arc<UnixStream>,
    wake_rx: UnixStream,
    log: RateLimited,
}

/// Why an authenticated connection is turned away: it is told, and the wait goes on.
#[derive(Debug, thiserror::Error)]
pub enum Turned {
    #[error("lane {0} before any session")]
    LaneBeforeSession(u16),
    #[error("a data connection for session {got:#x}; this is session {ours:#x}")]
    OtherSession { got: u64, ours: u64 },
    #[error("lane {0} is already open")]
    LaneOpen(u16),
    #[error("lane {lane} is out of range (the session has {lanes})")]
    LaneRange { lane: u16, lanes: u16 },
    #[error("this ferryd waits for a migration (migrate_in); a one-shot `ferryctl send` goes to `ferryctl recv`")]
    NotAMigration,
    #[error("this ferryd is in a migration's post-copy: only its source may connect")]
    PostcopyOnly,
    #[error("post-copy failed here")]
    PostcopyFailed,
    /// The peer is another kind of client than this listener serves.
    #[error("{peer} is not {wanted}")]
    NotA { peer: std::net::SocketAddr, wanted: &'static str },
    #[error("ferryd already serves {0} peer streams")]
    PeerStreams(usize),
    #[error("a migration may open {0} channels ([limits] max_lanes)")]
    Channels(usize),
}

impl<'l> Acceptor<'l> {
    /// An acceptor on `listener` (made non-blocking while the acceptor lives), offering
    /// `offer` features beyond those every build has.
    pub fn new(listener: &'l TcpListener, auth: &Auth, offer: u64, limits: &Limits) -> io::Result<Acceptor<'l>> {
        listener.set_nonblocking(true)?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        wake_tx.set_nonblocking(true)?;
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Acceptor {
            listener,
            auth: Arc::new(auth.clone()),
            offer,
            limits: limits.clone(),
            pending: Arc::new(AtomicUsize::new(0)),
            done_tx,
            done_rx,
            wake_tx: Arc::new(wake_tx),
            wake_rx,
            log: RateLimited::new(Duration::from_secs(10)),
        })
    }

    /// Waits for the next authenticated connection that `take` accepts (`Err(reason)`:
    /// the connection is told why and closed, and waiting goes on), until the deadline
    /// passes or a watched descriptor stirs.
    pub fn next(&self, wait: Wait<'_>, mut take: impl FnMut(&Authed) -> Result<(), Turned>) -> Result<Next, SessionError> {
        let secs = wait.deadline.map_or(0, |d| d.saturating_duration_since(Instant::now()).as_secs_f64().round() as u64);
        // A watched descriptor that stirred, and when: it is reported once the handshakes
        // in flight have finished (a peer whose lanes all authenticated may be talking on
        // its control connection before their handshake threads have reported).
        let mut fired: Option<(usize, Instant)> = None;
        loop {
            while let Ok(outcome) = self.done_rx.try_recv() {
                match outcome {
                    Ok(mut a) => match take(&a) {
                        Ok(()) => return Ok(Next::Conn(a)),
                        Err(why) => {
                            self.log.warn(format_args!("{}: an authenticated connection from {} was refused: {why}", wait.what, a.peer));
                            send_error(&mut a.s, &mut a.keys.tx, &why.to_string());
                        }
                    },
                    Err((peer, e)) => self.log.warn(format_args!("{}: a connection from {peer} was turned away: {e}", wait.what)),
                }
            }
            if let Some((i, at)) = fired
                && (self.pending.load(Ordering::Acquire) == 0 || at.elapsed() > self.limits.handshake_timeout())
            {
                // Acquire pairs with the handshake threads' release after their send: every
                // result sent before is in the channel now.
                if let Ok(outcome) = self.done_rx.try_recv() {
                    let _ = self.done_tx.send(outcome);
                    continue;
                }
                return Ok(Next::Watched(i));
            }
            let left = match wait.deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(SessionError::TimedOut { op: format!("waiting for {}", wait.what), secs });
                    }
                    left
                }
                None => Duration::from_secs(1),
            };
            // The listener is watched only while a handshake slot is free.
            let room = self.pending.load(Ordering::Acquire) < self.limits.preauth_connections as usize;
            let listen = if room { PollFlags::POLLIN } else { PollFlags::empty() };
            let mut fds = vec![PollFd::new(self.listener.as_fd(), listen), PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN)];
            if fired.is_none() {
                fds.extend(wait.watch.iter().map(|f| PollFd::new(*f, PollFlags::POLLIN)));
            }
            let ms = left.as_millis().min(if fired.is_some() { 50 } else { 1000 }) as u16;
            match poll(&mut fds, PollTimeout::from(ms.max(1))) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(SessionError::io(format!("waiting for {}", wait.what), e.into())),
            }
            let stirred = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            if stirred(&fds[0]) {
                self.accept_all(wait.what);
            }
            if stirred(&fds[1]) {
                let mut drain = [0u8; 64];
                while io::Read::read(&mut &self.wake_rx, &mut drain).is_ok_and(|n| n > 0) {}
            }
            if fired.is_none()
                && let Some(i) = fds[2..].iter().position(stirred)
            {
                fired = Some((i, Instant::now()));
            }
        }
    }

    /// Accepts every connection waiting, each onto a handshake thread of its own, while
    /// the pre-authentication slots last.
    fn accept_all(&self, what: &str) {
        let max = self.limits.preauth_connections as usize;
        loop {
            // AcqRel pairs with the handshake threads' release when they finish. With every
            // slot taken, the rest wait in the kernel's backlog (bounded by the kernel) for a
            // slot: closing them would let strangers that hold the slots shut out the real
            // peer, whose connection now waits its turn instead.
            if self.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_err() {
                self.log.warn(format_args!("{what}: {max} connections are authenticating; the next wait for one of them to finish"));
                return;
            }
            let (s, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    self.pending.fetch_sub(1, Ordering::Release);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        crate::bounds::accept_failed(&e, what, &self.log);
                    }
                    return;
                }
            };
            let (auth, offer, done, wake, pending) =
                (self.auth.clone(), self.offer, self.done_tx.clone(), self.wake_tx.clone(), self.pending.clone());
            let (timeout, bytes) = (self.limits.handshake_timeout(), self.limits.preauth_bytes);
            let spawned = std::thread::Builder::new().name("ferry-handshake".into()).spawn(move || {
                let r = handshake(s, peer, &auth, offer, timeout, bytes);
                let _ = done.send(r);
                pending.fetch_sub(1, Ordering::Release);
                let _ = io::Write::write(&mut &*wake, &[1]);
            });
            if let Err(e) = spawned {
                self.pending.fetch_sub(1, Ordering::Release);
                self.log.warn(format_args!("{what}: no thread for a handshake ({e}); a connection from {peer} was closed"));
            }
        }
    }
}

impl Acceptor<'_> {
    /// Accepts the `lanes` data connections of session `session`: each authenticated, for
    /// this session, with a lane number in range that is not open yet; `start` runs each
    /// as it arrives. Connections that fail any of that are turned away and the wait goes
    /// on, up to [`crate::engine::IDLE_TIMEOUT`] in all. A watched descriptor stirring (the
    /// control connection: the peer ended the session) ends the wait with `Watched`.
    pub fn lanes(
        &self,
        session: u64,
        lanes: u16,
        watch: &[BorrowedFd<'_>],
        mut start: impl FnMut(Authed),
    ) -> Result<Option<usize>, SessionError> {
        let mut open = vec![false; usize::from(lanes)];
        let deadline = Instant::now() + crate::engine::IDLE_TIMEOUT;
        for _ in 0..lanes {
            let wait = Wait { what: "the sender's data connections", deadline: Some(deadline), watch };
            let next = self.next(wait, |a| {
                let (n, id) = (a.hello.lane.get(), a.hello.session.get());
                if id != session {
                    return Err(Turned::OtherSession { got: id, ours: session });
                }
                match open.get_mut(usize::from(n)) {
                    Some(o) if !*o => {
                        *o = true;
                        Ok(())
                    }
                    Some(_) => Err(Turned::LaneOpen(n)),
                    None => Err(Turned::LaneRange { lane: n, lanes }),
                }
            })?;
            match next {
                Next::Conn(a) => start(a),
                Next::Watched(i) => return Ok(Some(i)),
            }
        }
        Ok(None)
    }
}

impl Drop for Acceptor<'_> {
    fn drop(&mut self) {
        let _ = self.listener.set_nonblocking(false);
    }
}

/// One connection's handshake, bounded in time and bytes as a whole.
fn handshake(s: TcpStream, peer: SocketAddr, auth: &Auth, offer: u64, timeout: Duration, bytes: u64) -> Outcome {
    let r = (|| {
        s.set_nonblocking(false).map_err(|e| SessionError::io("configuring a connection", e))?;
        s.set_nodelay(true).map_err(|e| SessionError::io("setting TCP_NODELAY", e))?;
        let mut d = Deadline::new(&s, timeout, bytes);
        server_handshake(&mut d, auth, offer).map_err(|e| match e {
            SessionError::TimedOut { op, .. } => SessionError::TimedOut { op, secs: timeout.as_secs() },
            e => e,
        })
    })();
    match r {
        // The handshake's deadline is not the session's: the caller sets its own timeouts.
        Ok((hello, keys)) => match s.set_read_timeout(None).and_then(|()| s.set_write_timeout(None)) {
            Ok(()) => Ok(Authed { s, peer, hello, keys }),
            Err(e) => Err((peer, SessionError::io("clearing the handshake's timeouts", e))),
        },
        Err(e) => Err((peer, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Key, client_handshake};
    use std::io::Write;

    fn key() -> Auth {
        Auth::Key(Key::from_bytes(vec![9; 32]).unwrap())
    }

    fn limits() -> Limits {
        Limits { preauth_connections: 4, handshake_timeout_ms: 300, ..Limits::default() }
    }

    /// Probes, garbage, a wrong key, a trickler and more connections than the slots: the
    /// real peer still gets through, and the acceptor never gave up.
    #[test]
    fn strangers_cost_the_real_peer_nothing() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let acc = Acceptor::new(&l, &key(), 0, &limits()).unwrap();
        let _probe = TcpStream::connect(addr).unwrap();
        drop(TcpStream::connect(addr).unwrap());
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xff; 64]).unwrap();
        let mut trickle = TcpStream::connect(addr).unwrap();
        trickle.write_all(b"F").unwrap();
        let wrong = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            client_handshake(&mut s, &Auth::Key(Key::from_bytes(vec![1; 32]).unwrap()), 0, 0, 0).is_err()
        });
        let extra: Vec<_> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let real = std::thread::spawn(move || {
            // After the strangers' handshakes have timed out and freed their slots.
            std::thread::sleep(Duration::from_millis(500));
            let mut s = TcpStream::connect(addr).unwrap();
            client_handshake(&mut s, &key(), 7, 42, 0).map(|_| ())
        });
        let wait = Wait { what: "a test peer", deadline: Some(Instant::now() + Duration::from_secs(10)), watch: &[] };
        let got = match acc
            .next(wait, |a| if a.hello.lane.get() == 7 { Ok(()) } else { Err(Turned::LaneBeforeSession(a.hello.lane.get())) })
            .unwrap()
        {
            Next::Conn(a) => a,
            Next::Watched(_) => panic!("nothing is watched"),
        };
        assert_eq!(got.hello.session.get(), 42);
        real.join().unwrap().unwrap();
        assert!(wrong.join().unwrap(), "the wrong key was refused");
        drop(extra);
    }

    /// Tricklers in every handshake slot delay the real peer (it waits in the backlog)
    /// but do not shut it out: it gets through once their handshake timeout frees a slot.
    #[test]
    fn full_slots_delay_the_real_peer_without_shutting_it_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let acc = Acceptor::new(&l, &key(), 0, &limits()).unwrap();
        let squatters: Vec<TcpStream> = (0..4)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"F").unwrap();
                s
            })
            .collect();
        let real = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            client_handshake(&mut s, &key(), 3, 1, 0).map(|_| ())
        });
        let wait = Wait { what: "a test peer", deadline: Some(Instant::now() + Duration::from_secs(10)), watch: &[] };
        let start = Instant::now();
        assert!(matches!(acc.next(wait, |_| Ok(())).unwrap(), Next::Conn(a) if a.hello.lane.get() == 3));
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        real.join().unwrap().unwrap();
        drop(squatters);
    }

    #[test]
    fn deadline_and_watch() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let acc = Acceptor::new(&l, &key(), 0, &limits()).unwrap();
        let start = Instant::now();
        let wait = Wait { what: "nobody", deadline: Some(Instant::now() + Duration::from_millis(200)), watch: &[] };
        let e = acc.next(wait, |_| Ok(())).unwrap_err();
        assert!(matches!(e, SessionError::TimedOut { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let wait = Wait { what: "nobody", deadline: None, watch: &[b.as_fd()] };
        assert!(matches!(acc.next(wait, |_| Ok(())).unwrap(), Next::Watched(0)));
    }
}
