//! The metrics endpoint's HTTP server: one thread polls every client, so an idle or slow
//! client costs a descriptor and a small buffer, never a thread, and never delays a
//! scrape. Each client gets one request (HTTP/1.0 semantics: the answer closes the
//! connection) within a deadline for the whole exchange; when the clients reach the
//! limit, the one waiting longest is dropped for the newcomer.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::bounds::RateLimited;

/// A request as the handler sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The `Accept` header, or "".
    pub accept: &'a str,
}

/// An answer: status line text, content type and body (left out for HEAD).
#[derive(Debug)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
}

/// What the server lets its clients spend.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Clients held at once.
    pub clients: usize,
    /// From accepting a client until its answer is written.
    pub timeout: Duration,
    /// A request head's bytes.
    pub max_head: usize,
}

enum State {
    Reading(Vec<u8>),
    Writing(Vec<u8>, usize),
}

struct Client {
    conn: TcpStream,
    since: Instant,
    state: State,
}

/// Serves `listener` until the process ends, answering each request with `handler`.
pub fn serve(listener: &TcpListener, limits: Limits, handler: &dyn Fn(&Request) -> Response) {
    static ACCEPT: RateLimited = RateLimited::new(Duration::from_secs(10));
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("metrics: cannot make the listener non-blocking: {e}; metrics are not served");
        return;
    }
    let mut clients: Vec<Client> = Vec::new();
    loop {
        let now = Instant::now();
        clients.retain(|c| now.duration_since(c.since) < limits.timeout);
        let wait = clients.iter().map(|c| (c.since + limits.timeout).saturating_duration_since(now)).min();
        let (listener_ready, ready) = match wait_ready(listener, &clients, wait) {
            Ok(r) => r,
            Err(e) => {
                log::error!("metrics: poll failed: {e}; metrics are no longer served");
                return;
            }
        };
        // Clients first: indices hold until new ones are pushed.
        let mut done = Vec::new();
        for (i, c) in clients.iter_mut().enumerate() {
            if ready[i] && !step(c, limits, handler) {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            clients.swap_remove(i);
        }
        if listener_ready {
            accept_all(listener, &mut clients, limits, &ACCEPT);
        }
    }
}

/// Polls the listener and every client (reading or writing) for up to `wait` (forever
/// when none): whether the listener and each client are ready.
fn wait_ready(listener: &TcpListener, clients: &[Client], wait: Option<Duration>) -> nix::Result<(bool, Vec<bool>)> {
    let mut fds = Vec::with_capacity(clients.len() + 1);
    fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
    for c in clients {
        let want = match c.state {
            State::Reading(_) => PollFlags::POLLIN,
            State::Writing(..) => PollFlags::POLLOUT,
        };
        fds.push(PollFd::new(c.conn.as_fd(), want));
    }
    let timeout = match wait {
        // Rounded up, so a deadline is not polled for again just before it passes.
        Some(d) => PollTimeout::try_from(d.as_millis().saturating_add(1).min(60_000) as u32).unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok((false, vec![false; clients.len()])),
        Err(e) => return Err(e),
    }
    let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
    Ok((ready(&fds[0]), fds[1..].iter().map(ready).collect()))
}

/// Accepts every client waiting; past the limit, the oldest is dropped for each.
fn accept_all(listener: &TcpListener, clients: &mut Vec<Client>, limits: Limits, warn: &RateLimited) {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                if conn.set_nonblocking(true).is_err() {
                    continue;
                }
                if clients.len() >= limits.clients.max(1) {
                    let oldest = clients.iter().enumerate().min_by_key(|(_, c)| c.since).map(|(i, _)| i).expect("at the limit");
                    clients.swap_remove(oldest);
                }
                clients.push(Client { conn, since: Instant::now(), state: State::Reading(Vec::new()) });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => {
                crate::bounds::accept_failed(&e, "metrics", warn);
                return;
            }
        }
    }
}

/// Reads or writes what the client is ready for; false when it is done with (answered,
/// gone, or over the limits).
fn step(c: &mut Client, limits: Limits, handler: &dyn Fn(&Request) -> Response) -> bool {
    match &mut c.state {
        State::Reading(head) => {
            let mut buf = [0u8; 1024];
            match c.conn.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return true,
                Err(_) => return false,
            }
            if head.len() > limits.max_head {
                c.state =
                    State::Writing(answer("GET", Response::text("431 Request Header Fields Too Large", "request head too large\n")), 0);
            } else if let Some(end) = head_end(head) {
                let text = String::from_utf8_lossy(&head[..end]).into_owned();
                let req = parse(&text);
                let method = req.method.to_string();
                c.state = State::Writing(answer(&method, respond(&req, handler)), 0);
            } else {
                return true;
            }
            // The answer usually fits the socket buffer: write it now.
            step(c, limits, handler)
        }
        State::Writing(out, at) => {
            while *at < out.len() {
                match c.conn.write(&out[*at..]) {
                    Ok(0) => return false,
                    Ok(n) => *at += n,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return true,
                    Err(_) => return false,
                }
            }
            false
        }
    }
}

/// Where the head ends (after its blank line), if it has.
fn head_end(head: &[u8]) -> Option<usize> {
    let crlf = head.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = head.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    crlf.into_iter().chain(lf).min()
}

/// The request line and the `Accept` header.
fn parse(head: &str) -> Request<'_> {
    let mut lines = head.lines();
    let mut words = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let accept =
        lines.filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim().eq_ignore_ascii_case("accept")).map_or("", |(_, v)| v.trim());
    // The query string does not choose the resource.
    let path = path.split('?').next().unwrap_or(path);
    Request { method, path, accept }
}

/// The handler's answer to GET and HEAD; 405 to anything else.
fn respond(req: &Request, handler: &dyn Fn(&Request) -> Response) -> Response {
    match req.method {
        "GET" | "HEAD" => handler(req),
        _ => Response::text("405 Method Not Allowed", "GET or HEAD\n"),
    }
}

/// The bytes of an answer: HEAD gets the headers only (with the body's length).
fn answer(method: &str, r: Response) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(r.body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_request_line_and_accept() {
        let r = parse("GET /metrics?x=1 HTTP/1.1\r\nHost: h\r\naccept: application/openmetrics-text;version=1.0.0\r\n\r\n");
        assert_eq!(r, Request { method: "GET", path: "/metrics", accept: "application/openmetrics-text;version=1.0.0" });
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
    }

    /// A scrape is answered while the limit's worth of idle clients and more are
    /// connected, and HEAD gets the length without the body.
    #[test]
    fn idle_clients_do_not_delay_a_request() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits { clients: 8, timeout: Duration::from_secs(30), max_head: 4096 };
        std::thread::spawn(move || serve(&listener, limits, &|r| Response::text("200 OK", format!("you asked for {}\n", r.path))));
        let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for method in ["GET", "HEAD"] {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(c, "{method} /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            assert!(got.starts_with("HTTP/1.0 200 OK\r\n"), "{got}");
            assert!(got.contains("Content-Length: 23\r\n"), "{got}");
            assert_eq!(got.ends_with("you asked for /metrics\n"), method == "GET", "{got}");
        }
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "POST /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.0 405"), "{got}");
        drop(idle);
    }
}
