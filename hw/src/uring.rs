//! io_uring: can a ring be created here, and if not why; which opcodes the kernel lists;
//! and the features the probe cannot tell apart (multishot receive, provided-buffer
//! rings, fixed buffers), found by trying them on a socket pair.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use io_uring::{IoUring, Probe, opcode, types};
use memmap2::MmapMut;

use crate::caps::{IoUringCaps, UringBlock};

/// Opcodes ferry's TCP transport may use, by name.
const OPCODES: &[(u8, &str)] = &[
    (opcode::Send::CODE, "SEND"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::SendZc::CODE, "SEND_ZC"),
    (opcode::SendMsgZc::CODE, "SENDMSG_ZC"),
    (opcode::ReadFixed::CODE, "READ_FIXED"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::ProvideBuffers::CODE, "PROVIDE_BUFFERS"),
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Shutdown::CODE, "SHUTDOWN"),
];

pub(crate) fn probe() -> IoUringCaps {
    let disabled_sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok().and_then(|s| s.trim().parse().ok());
    let mut caps = IoUringCaps {
        available: false,
        reason: None,
        blocked: None,
        disabled_sysctl,
        send_zc: false,
        sendmsg_zc: false,
        recv_multishot: false,
        provided_buffer_rings: false,
        fixed_buffers: false,
        opcodes: Vec::new(),
    };
    let ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            let (blocked, reason) = setup_error_reason(e.raw_os_error(), disabled_sysctl, seccomp_filtered());
            (caps.blocked, caps.reason) = (Some(blocked), Some(reason));
            return caps;
        }
    };
    caps.available = true;
    let mut probe = Probe::new();
    if ring.submitter().register_probe(&mut probe).is_ok() {
        caps.opcodes = OPCODES.iter().filter(|(code, _)| probe.is_supported(*code)).map(|(_, name)| name.to_string()).collect();
        caps.send_zc = probe.is_supported(opcode::SendZc::CODE);
        caps.sendmsg_zc = probe.is_supported(opcode::SendMsgZc::CODE);
    }
    caps.fixed_buffers = try_fixed_buffers(&ring);
    let (rings, multishot) = try_buf_ring_and_multishot(ring);
    caps.provided_buffer_rings = rings;
    caps.recv_multishot = multishot;
    caps
}

/// Whether this thread runs under a seccomp filter (`Seccomp: 2` in its status).
fn seccomp_filtered() -> bool {
    std::fs::read_to_string("/proc/thread-self/status")
        .is_ok_and(|s| s.lines().any(|l| l.strip_prefix("Seccomp:").is_some_and(|v| v.trim() == "2")))
}

/// Turns an `io_uring_setup` failure into what blocks it and the sentence `ferryctl
/// doctor` shows. Under a seccomp filter, ENOSYS is the filter's answer more often than
/// the kernel's: container runtimes' default profiles refuse io_uring with it.
pub fn setup_error_reason(errno: Option<i32>, disabled_sysctl: Option<u32>, filtered: bool) -> (UringBlock, String) {
    match (errno, disabled_sysctl) {
        (Some(libc::EPERM), Some(2)) => (UringBlock::Sysctl, "io_uring is disabled system-wide (kernel.io_uring_disabled = 2)".into()),
        (Some(libc::EPERM), Some(1)) => (
            UringBlock::Sysctl,
            "io_uring is limited to the io_uring_group (kernel.io_uring_disabled = 1) and this process is not in it".into(),
        ),
        (Some(libc::EPERM), _) => {
            (UringBlock::Seccomp, "io_uring_setup was refused with EPERM: a seccomp profile blocks it (Docker's default profile does)".into())
        }
        (Some(libc::ENOSYS), _) if filtered => (
            UringBlock::Seccomp,
            "io_uring_setup failed with ENOSYS under a seccomp filter: the profile blocks it (podman's and containerd's defaults do), or the kernel lacks io_uring".into(),
        ),
        (Some(libc::ENOSYS), _) => (UringBlock::Kernel, "the kernel has no io_uring (io_uring_setup: ENOSYS)".into()),
        (Some(libc::ENOMEM), _) => (UringBlock::Memlock, "io_uring_setup failed with ENOMEM: RLIMIT_MEMLOCK too low for the ring".into()),
        (Some(e), _) => (UringBlock::Other, format!("io_uring_setup failed: {}", std::io::Error::from_raw_os_error(e))),
        (None, _) => (UringBlock::Other, "io_uring_setup failed".into()),
    }
}

fn try_fixed_buffers(ring: &IoUring) -> bool {
    let Ok(mut buf) = MmapMut::map_anon(4096) else { return false };
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: the buffer is a live 4 KiB mapping that stays mapped until after the
    // unregister below; nothing is submitted that would use it.
    let ok = unsafe { ring.submitter().register_buffers(&[iov]) }.is_ok();
    if ok {
        let _ = ring.submitter().unregister_buffers();
    }
    drop(buf);
    ok
}

/// Registers a one-entry provided-buffer ring and arms a multishot receive on a socket
/// pair; the receive stays armed (`IORING_CQE_F_MORE`) only where multishot works.
fn try_buf_ring_and_multishot(mut ring: IoUring) -> (bool, bool) {
    const BGID: u16 = 7;
    let Ok(mut ring_mem) = MmapMut::map_anon(4096) else { return (false, false) };
    let Ok(mut data) = MmapMut::map_anon(4096) else { return (false, false) };
    let base = ring_mem.as_mut_ptr().cast::<types::BufRingEntry>();
    // SAFETY: `base` points to a zeroed, page-aligned 4 KiB mapping, large enough for one
    // 16-byte entry; the mapping outlives the ring registration (unregistered below).
    let registered = unsafe { ring.submitter().register_buf_ring_with_flags(base as u64, 1, BGID, 0) }.is_ok();
    if !registered {
        return (false, false);
    }
    // SAFETY: entry 0 lies inside the mapping and no other thread or the kernel reads it
    // until the tail store below publishes it.
    unsafe {
        let entry = &mut *base;
        entry.set_addr(data.as_mut_ptr() as u64);
        entry.set_len(data.len() as u32);
        entry.set_bid(0);
    }
    // SAFETY: `tail` points at entry 0's `resv` field, which the kernel reads as the ring
    // tail; the release store pairs with the kernel's acquire load of the tail and
    // publishes the entry written above.
    unsafe {
        let tail = types::BufRingEntry::tail(base).cast_mut();
        std::sync::atomic::AtomicU16::from_ptr(tail).store(1, std::sync::atomic::Ordering::Release);
    }
    let multishot = (|| {
        let (a, b) = UnixStream::pair().ok()?;
        let sqe = opcode::RecvMulti::new(types::Fd(b.as_raw_fd()), BGID).build().user_data(1);
        // SAFETY: the receive writes only into the provided buffer registered above, which
        // outlives the ring; the socket outlives the submission (the ring is dropped first).
        unsafe { ring.submission().push(&sqe).ok()? };
        std::io::Write::write_all(&mut &a, b"probe").ok()?;
        ring.submit_and_wait(1).ok()?;
        let cqe = ring.completion().next()?;
        Some(cqe.result() == 5 && io_uring::cqueue::more(cqe.flags()))
    })()
    .unwrap_or(false);
    drop(ring);
    drop((ring_mem, data));
    (true, multishot)
}

/// Installs a seccomp filter on the calling thread only that fails `io_uring_setup`
/// with EPERM, as Docker's default profile does: how tests show what ferry does in such a
/// container. Irreversible for the thread (and threads it spawns later).
pub fn block_io_uring_setup_on_this_thread() -> std::io::Result<()> {
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let filter = [
        // A = seccomp_data.nr
        libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 },
        // if A == io_uring_setup: next, else skip one
        libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: libc::SYS_io_uring_setup as u32 },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: SECCOMP_RET_ERRNO | libc::EPERM as u32 },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: SECCOMP_RET_ALLOW },
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers; it only restricts this thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `prog` points to a valid BPF program that outlives the call (the kernel
    // copies it); without SECCOMP_FILTER_FLAG_TSYNC it applies to this thread only.
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal names its cause and maps to what blocks io_uring; ENOSYS is the
    /// kernel's only without a seccomp filter.
    #[test]
    fn setup_errors_name_the_cause() {
        assert!(setup_error_reason(Some(libc::EPERM), Some(2), false).1.contains("io_uring_disabled = 2"));
        assert!(setup_error_reason(Some(libc::EPERM), Some(0), false).1.contains("seccomp"));
        assert!(setup_error_reason(Some(libc::ENOSYS), None, false).1.contains("no io_uring"));
        assert!(setup_error_reason(Some(libc::ENOSYS), None, true).1.contains("seccomp filter"));
        let cause = |e, sysctl, filtered| setup_error_reason(Some(e), sysctl, filtered).0;
        assert_eq!(cause(libc::EPERM, Some(2), false), UringBlock::Sysctl);
        assert_eq!(cause(libc::EPERM, Some(0), true), UringBlock::Seccomp);
        assert_eq!(cause(libc::ENOSYS, Some(0), true), UringBlock::Seccomp);
        assert_eq!(cause(libc::ENOSYS, None, false), UringBlock::Kernel);
        assert_eq!(cause(libc::ENOMEM, None, false), UringBlock::Memlock);
    }

    #[test]
    fn seccomp_block_is_reported_with_its_cause() {
        let caps = std::thread::spawn(|| block_io_uring_setup_on_this_thread().map(|()| probe())).join().unwrap();
        let caps = match caps {
            Ok(c) => c,
            Err(e) => {
                crate::report_skip(&format!("cannot install a seccomp filter here: {e}"));
                return;
            }
        };
        assert!(!caps.available, "{caps:?}");
        let reason = caps.reason.unwrap();
        assert!(reason.contains("EPERM") && reason.contains("seccomp"), "{reason}");
        assert_eq!(caps.blocked, Some(UringBlock::Seccomp));
        assert!(caps.opcodes.is_empty() && !caps.send_zc);
        // Other threads are unaffected.
        assert!(probe().available || probe().reason.is_some());
    }

    #[test]
    fn live_probe() {
        let caps = probe();
        if !caps.available {
            crate::report_skip(&format!("io_uring unavailable here: {:?}", caps.reason));
            return;
        }
        assert!(caps.opcodes.iter().any(|o| o == "SEND"), "{caps:?}");
        println!("io_uring: {caps:?}");
    }
}
