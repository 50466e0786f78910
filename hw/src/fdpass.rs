//! JSON lines with file descriptors attached (SCM_RIGHTS) on a UNIX stream socket: how a
//! VMM hands ferryd its guest memory and dirty bitmap, and how ferryd hands a finished
//! migration's memory to the destination VMM.
//!
//! A line and its descriptors go out in one `sendmsg`. The reader collects descriptors
//! from every `recvmsg` until the line's newline arrives, so a line the kernel splits
//! still brings its descriptors with it.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// Descriptors one message may carry by default; more is an error, never a leak.
pub const MAX_FDS: usize = 64;
/// The most descriptors the kernel passes with one message (`SCM_MAX_FD` in
/// `include/net/scm.h`). The receive buffer has room for this many, so the kernel never
/// truncates the control message: every descriptor that arrives is owned (and closed)
/// here, and only then is a message with more than [`MAX_FDS`] refused.
pub const SCM_MAX_FD: usize = 253;
/// The longest line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// One end of a control connection.
#[derive(Debug)]
pub struct LineConn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    max_fds: usize,
}

impl LineConn {
    pub fn new(stream: UnixStream) -> LineConn {
        LineConn::with_max_fds(stream, MAX_FDS)
    }

    /// A connection that refuses messages with more than `max_fds` descriptors (at most
    /// [`SCM_MAX_FD`]).
    pub fn with_max_fds(stream: UnixStream, max_fds: usize) -> LineConn {
        LineConn { stream, buf: Vec::new(), fds: Vec::new(), max_fds: max_fds.min(SCM_MAX_FD) }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Writes `line` (a newline is added) with `fds` attached.
    pub fn send(&self, line: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < bytes.len() {
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() { &cmsg } else { &[] };
            let n = sendmsg::<()>(self.stream.as_raw_fd(), &[IoSlice::new(&bytes[sent..])], cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from)?;
            sent += n;
        }
        Ok(())
    }

    /// The next line and the descriptors that came with it; `None` at end of stream.
    pub fn recv(&mut self) -> io::Result<Option<(String, Vec<OwnedFd>)>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = String::from_utf8(line[..i].to_vec())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a line that is not UTF-8"))?;
                return Ok(Some((line, std::mem::take(&mut self.fds))));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a line longer than {MAX_LINE} bytes")));
            }
            let mut chunk = [0u8; 4096];
            let (n, fds, truncated) = recv_with_fds(&self.stream, &mut chunk)?;
            self.fds.extend(fds);
            if truncated || self.fds.len() > self.max_fds {
                let n = self.fds.len();
                self.fds.clear();
                self.buf.clear();
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{n} descriptors came with one message; at most {} are accepted (all were closed)", self.max_fds),
                ));
            }
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed in the middle of a line"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One `recvmsg`: the bytes read into `buf`, every descriptor that came with them (owned
/// here, close-on-exec), and whether the kernel could not pass them all (MSG_CTRUNC: the
/// receiver ran out of descriptors). The control buffer has room for [`SCM_MAX_FD`], and
/// it is walked even when truncated: what the kernel installed is in it, and is owned (so
/// closed) rather than leaked.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    const INT: usize = std::mem::size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE is arithmetic on its argument; it touches no memory.
    let room = unsafe { libc::CMSG_SPACE((SCM_MAX_FD * INT) as u32) } as usize;
    // SAFETY: as above.
    let header = unsafe { libc::CMSG_LEN(0) } as usize;
    // u64 words: a cmsghdr's alignment.
    let mut control = vec![0u64; room.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain integers and pointers, for which all-zero is a valid value
    // (no name, no iovecs, no control buffer yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`, valid for writes of its length) and at
        // `control` (valid for writes of msg_controllen bytes); all outlive the call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg: its control pointer and length describe the
    // bytes the kernel wrote into `control`, which CMSG_FIRSTHDR/CMSG_NXTHDR walk without
    // leaving them.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies within `control`.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            let count = (h.cmsg_len as usize).saturating_sub(header) / INT;
            // SAFETY: the header's data holds `count` descriptors (cmsg_len says so, and the
            // kernel set it to what it installed); they may be unaligned, so each is read
            // with read_unaligned.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: as above, `i < count` stays within this header's data.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS just installed `raw` in this process's descriptor
                // table for us (close-on-exec); nothing else knows of it, so we are its
                // only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `c` is a header within `msg`'s control buffer (see above).
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n, fds, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn lines_carry_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (LineConn::new(a), LineConn::new(b));
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"guest").unwrap();
        a.send("{\"cmd\":\"x\"}", &[f.as_fd()]).unwrap();
        a.send("second", &[]).unwrap();
        let (line, fds) = b.recv().unwrap().unwrap();
        assert_eq!(line, "{\"cmd\":\"x\"}");
        assert_eq!(fds.len(), 1);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "guest", "the same open file");
        let (line, fds) = b.recv().unwrap().unwrap();
        assert_eq!((line.as_str(), fds.len()), ("second", 0));
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }

    /// Descriptors of this process open on `path` (other tests run beside this one, so
    /// only descriptors of a file of this test's own are counted).
    fn open_fds(path: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    /// A message with more descriptors than allowed is refused and every descriptor it
    /// brought is closed: none leaks, for as many as the kernel passes with one message.
    #[test]
    fn too_many_descriptors_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (LineConn::new(a), LineConn::new(b));
        let named = tempfile::NamedTempFile::new().unwrap();
        let (file, path) = (named.as_file(), named.path().canonicalize().unwrap());
        for n in [MAX_FDS + 1, SCM_MAX_FD] {
            let fds: Vec<_> = (0..n).map(|_| file.as_fd()).collect();
            a.send("many", &fds).unwrap();
            let e = b.recv().unwrap_err();
            assert!(e.to_string().contains(&format!("{n} descriptors")), "{e}");
            assert_eq!(open_fds(&path), 1, "{n} descriptors: every one received is closed again");
        }
        // The connection still serves the next message.
        a.send("ok", &[file.as_fd()]).unwrap();
        let (line, fds) = b.recv().unwrap().unwrap();
        assert_eq!((line.as_str(), fds.len()), ("ok", 1));
    }
}
