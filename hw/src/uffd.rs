//! userfaultfd availability and its write-protect features, found by opening one and
//! asking the kernel (`UFFDIO_API`), not by reading the kernel version.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;

use crate::caps::UserfaultfdCaps;

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

/// `struct uffdio_api` from `<linux/userfaultfd.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);

pub(crate) fn probe() -> UserfaultfdCaps {
    let unprivileged_sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").ok().and_then(|s| s.trim().parse().ok());
    let mut caps =
        UserfaultfdCaps { available: false, write_protect: false, write_protect_shmem: false, reason: None, unprivileged_sysctl };
    let fd = match open(0).or_else(|e| if e == Errno::EPERM { open(UFFD_USER_MODE_ONLY) } else { Err(e) }) {
        Ok(fd) => fd,
        Err(e) => {
            caps.reason = Some(match e {
                Errno::ENOSYS => "kernel built without userfaultfd (ENOSYS)".into(),
                Errno::EPERM => format!(
                    "userfaultfd denied (EPERM): vm.unprivileged_userfaultfd = {} and the process lacks CAP_SYS_PTRACE, or a seccomp profile blocks it",
                    unprivileged_sysctl.map_or("?".into(), |v| v.to_string())
                ),
                e => format!("userfaultfd failed: {e}"),
            });
            return caps;
        }
    };
    let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
    // SAFETY: `fd` is a userfaultfd we own and `api` is a properly sized, writable
    // `struct uffdio_api` that outlives the call.
    match unsafe { uffdio_api(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut api) } {
        Ok(_) => {
            caps.available = true;
            caps.write_protect = api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP != 0;
            caps.write_protect_shmem = api.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0;
        }
        Err(e) => caps.reason = Some(format!("UFFDIO_API handshake failed: {e}")),
    }
    caps
}

fn open(extra: libc::c_int) -> Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd(2) takes one flags argument and returns a new fd or -1; no memory
    // is passed.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK | extra) };
    if ret < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn live_probe_has_a_value_or_a_reason() {
        let caps = super::probe();
        assert!(caps.available || caps.reason.is_some(), "{caps:?}");
        if !caps.available {
            crate::report_skip(&format!("userfaultfd unavailable here: {:?}", caps.reason));
        }
    }
}
