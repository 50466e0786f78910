//! Socket buffers: the kernel's limits on them, and setting them on a connection.

use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, SockaddrStorage, sendmsg, setsockopt, sockopt};

use crate::caps::SocketLimits;

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The third (maximum) field of a `tcp_wmem`/`tcp_rmem` triple.
fn third(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.split_whitespace().nth(2)?.parse().ok()
}

pub(crate) fn socket_limits() -> SocketLimits {
    SocketLimits {
        wmem_max: read_u64("/proc/sys/net/core/wmem_max"),
        rmem_max: read_u64("/proc/sys/net/core/rmem_max"),
        tcp_wmem_max: third("/proc/sys/net/ipv4/tcp_wmem"),
        tcp_rmem_max: third("/proc/sys/net/ipv4/tcp_rmem"),
    }
}

/// Sets SO_SNDBUF and SO_RCVBUF (which turns the kernel's autotuning off for them).
pub fn set_buffers(s: &TcpStream, bytes: u64) -> nix::Result<()> {
    let b = usize::try_from(bytes).unwrap_or(usize::MAX);
    setsockopt(s, sockopt::SndBuf, &b)?;
    setsockopt(s, sockopt::RcvBuf, &b)
}

/// Writes as much of `bufs` as `s` takes now, without waiting (whatever the socket's
/// mode): the bytes written, `WouldBlock` when its buffer is full. A peer that has gone is
/// an error, never SIGPIPE.
pub fn send_now(s: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    loop {
        match sendmsg::<SockaddrStorage>(s.as_raw_fd(), bufs, &[], flags, None) {
            Err(nix::errno::Errno::EINTR) => {}
            r => return r.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn live_limits_and_setting() {
        let l = super::socket_limits();
        assert!(l.wmem_max.is_some() && l.tcp_wmem_max.is_some(), "{l:?}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        super::set_buffers(&s, 65536).unwrap();
        let got = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::SndBuf).unwrap();
        // The kernel doubles the value for bookkeeping.
        assert_eq!(got, 131072);
    }
}
