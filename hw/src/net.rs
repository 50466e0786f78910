//! Socket buffers: the kernel's limits on them, and setting them on a connection.

use std::net::TcpStream;

use nix::sys::socket::{setsockopt, sockopt};

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
