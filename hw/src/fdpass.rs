//! JSON lines with file descriptors attached (SCM_RIGHTS) on a UNIX stream socket: how a
//! VMM hands ferryd its guest memory and dirty bitmap, and how ferryd hands a finished
//! migration's memory to the destination VMM.
//!
//! A line and its descriptors go out in one `sendmsg`. The reader collects descriptors
//! from every `recvmsg` until the line's newline arrives, so a line the kernel splits
//! still brings its descriptors with it.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Descriptors one message may carry; more is an error, never a leak.
pub const MAX_FDS: usize = 64;
/// The longest line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// One end of a control connection.
#[derive(Debug)]
pub struct LineConn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl LineConn {
    pub fn new(stream: UnixStream) -> LineConn {
        LineConn { stream, buf: Vec::new(), fds: Vec::new() }
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
            let mut space = nix::cmsg_space!([i32; MAX_FDS]);
            let (n, fds, truncated) = {
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        fds.extend(raw);
                    }
                }
                (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC))
            };
            for raw in fds {
                // SAFETY: SCM_RIGHTS just installed `raw` in this process's descriptor table
                // for us (close-on-exec); nothing else knows of it, so we are its only owner.
                self.fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
            if truncated {
                self.fds.clear();
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {MAX_FDS} descriptors with one message")));
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

    #[test]
    fn too_many_descriptors_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (LineConn::new(a), LineConn::new(b));
        let files: Vec<_> = (0..MAX_FDS + 1).map(|_| tempfile::tempfile().unwrap()).collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        a.send("many", &fds).unwrap();
        assert!(b.recv().is_err());
    }
}
