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

// ---- post-copy: a VMM's userfaultfd, and the handler's side of it ----------------------

const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
/// `UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR`.
const MODE_MISSING_MINOR: u64 = 1 | 4;
const DONTWAKE: u64 = 1;

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_continue` and `struct uffdio_zeropage` (the same layout).
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioFill {
    range: UffdioRange,
    mode: u64,
    result: i64,
}

nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_read!(uffdio_unregister, 0xAA, 0x01, UffdioRange);
nix::ioctl_read!(uffdio_wake, 0xAA, 0x02, UffdioRange);
nix::ioctl_readwrite!(uffdio_zeropage, 0xAA, 0x04, UffdioFill);
nix::ioctl_readwrite!(uffdio_continue, 0xAA, 0x07, UffdioFill);

/// A userfaultfd over guest memory: created and registered by the VMM ([`Userfault::create`],
/// [`Userfault::register`]), handed to ferryd by SCM_RIGHTS, which reads its faults and
/// resolves them ([`Userfault::faults`], [`Userfault::map`], [`Userfault::zero`]).
///
/// Every resolution only installs a page where the registered mapping has none (the
/// kernel refuses with `EEXIST` otherwise): it never replaces a page that memory already
/// shows, so none of these calls can change bytes that any code, in the VMM or here, has
/// read. A thread that touches a registered page before it is resolved waits in the
/// kernel; that is the point, not undefined behaviour.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

/// One page fault read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address, in the VMM's address space, rounded down to its page.
    pub addr: u64,
    pub write: bool,
    /// A minor fault: the page is in the file, only the mapping lacks it.
    pub minor: bool,
}

/// What a resolution found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The page is mapped now (and its waiters woken).
    Mapped,
    /// Something mapped it before (waiters still need a wake).
    AlreadyMapped,
    /// Minor mode: the file has no page there yet.
    NoPage,
}

/// Why a userfaultfd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd denied (EPERM): set vm.unprivileged_userfaultfd = 1, or run with CAP_SYS_PTRACE")]
    Denied,
    #[error("userfaultfd: {0}")]
    Open(Errno),
    #[error("this kernel cannot report minor faults on shared memory (UFFDIO_API: {0}); post-copy needs Linux 5.14 or later")]
    NoMinorFaults(Errno),
    #[error(
        "registering {len} bytes at {addr:#x} for missing and minor faults: {errno} (a shared mapping of a memfd or tmpfs file, page-aligned)"
    )]
    Register { addr: u64, len: u64, errno: Errno },
    #[error("unregistering the guest memory: {0}")]
    Unregister(Errno),
    #[error("the descriptor is {0}, not a userfaultfd")]
    NotUserfault(String),
    #[error("making the userfaultfd non-blocking: {0}")]
    NonBlocking(Errno),
    #[error("reading page faults: {0}")]
    Read(Errno),
    #[error(
        "the guest memory at {0:#x} is not registered with the userfaultfd for minor faults (register each region's mapping for missing and minor faults, and give its address)"
    )]
    NotRegistered(u64),
    #[error("checking the userfaultfd's registration at {addr:#x}: {errno}")]
    Check { addr: u64, errno: Errno },
    #[error("the guest memory is not sealed against shrinking: a mapping of it could lose pages (SIGBUS)")]
    NotSealed,
    #[error("the guest memory has {0} bytes: whole pages, at least one")]
    NotPages(u64),
    #[error("{op} the guest memory: {source}")]
    Memory { op: &'static str, source: std::io::Error },
    /// A page could not be placed, woken or resolved.
    #[error("{op} at {addr:#x}: {errno}")]
    Resolve { op: &'static str, addr: u64, errno: Errno },
}

impl Userfault {
    /// The VMM's side: a new userfaultfd that reports missing and minor faults on shared
    /// memory (memfd, tmpfs). Faults from the kernel on the guest's behalf (KVM) need
    /// privilege; without it, only user-mode faults are reported, which a process that
    /// touches its memory itself (ferry's simulated guest) is enough for.
    pub fn create() -> Result<Userfault, UffdError> {
        let fd = open(0).or_else(|e| if e == Errno::EPERM { open(UFFD_USER_MODE_ONLY) } else { Err(e) }).map_err(|e| match e {
            Errno::EPERM => UffdError::Denied,
            e => UffdError::Open(e),
        })?;
        let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM, ioctls: 0 };
        // SAFETY: `fd` is a userfaultfd we own; `api` is a writable `struct uffdio_api`
        // that outlives the call.
        unsafe { uffdio_api(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut api) }.map_err(UffdError::NoMinorFaults)?;
        Ok(Userfault { fd })
    }

    /// The VMM's side: registers `len` bytes at `addr` (a shared mapping of a memory file,
    /// page-aligned) for missing and minor faults. From now on a thread touching a page of
    /// it that is not mapped yet waits until the handler resolves it.
    pub fn register(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        let mut r = UffdioRegister { range: UffdioRange { start: addr as u64, len: len as u64 }, mode: MODE_MISSING_MINOR, ioctls: 0 };
        // SAFETY: `r` is a writable `struct uffdio_register` that outlives the call. The
        // registration changes no byte of memory: later accesses to unmapped pages wait for
        // the handler instead of being filled by the kernel.
        unsafe { uffdio_register(self.raw(), &mut r) }.map(drop).map_err(|errno| UffdError::Register {
            addr: addr as u64,
            len: len as u64,
            errno,
        })
    }

    /// The VMM's side, once every page is local: unregisters `len` bytes at `addr`, so the
    /// kernel resolves their faults from now on (and wakes any waiting for the handler).
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: `r` is a `struct uffdio_range` that outlives the call; unregistering
        // changes no byte of memory.
        unsafe { uffdio_unregister(self.raw(), &mut r) }.map(drop).map_err(UffdError::Unregister)
    }

    /// The handler's side: takes a userfaultfd another process created and registered.
    /// It must be one: anything else is refused here.
    pub fn from_fd(fd: OwnedFd) -> Result<Userfault, UffdError> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd))).unwrap_or_default();
        if !link.to_string_lossy().contains("userfaultfd") {
            return Err(UffdError::NotUserfault(link.display().to_string()));
        }
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).map_err(UffdError::NonBlocking)?;
        Ok(Userfault { fd })
    }

    fn raw(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Reads the page faults waiting now (none if there are none), into `out`. Events
    /// other than page faults (fork, remap, remove) are not asked for and are skipped.
    pub fn faults(&self, out: &mut Vec<Fault>) -> Result<(), UffdError> {
        let mut buf = [0u8; 32 * 64];
        loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    for m in buf[..n].chunks_exact(32) {
                        if m[0] != UFFD_EVENT_PAGEFAULT {
                            continue;
                        }
                        let flags = u64::from_ne_bytes(m[8..16].try_into().expect("8 bytes"));
                        let addr = u64::from_ne_bytes(m[16..24].try_into().expect("8 bytes"));
                        out.push(Fault {
                            addr: addr & !4095,
                            write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                            minor: flags & UFFD_PAGEFAULT_FLAG_MINOR != 0,
                        });
                    }
                    if n < buf.len() {
                        return Ok(());
                    }
                }
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(UffdError::Read(e)),
            }
        }
    }

    /// Maps the file's pages at `addr..addr + len` (minor mode: they are in the file) and
    /// wakes threads waiting on them.
    pub fn map(&self, addr: u64, len: u64) -> Result<Resolved, Errno> {
        let mut c = UffdioFill { range: UffdioRange { start: addr, len }, mode: 0, result: 0 };
        // SAFETY: `c` is a writable `struct uffdio_continue` that outlives the call. The
        // kernel only installs the file's own page where the mapping has none, and refuses
        // (EEXIST) where one is mapped: no byte anyone has read changes.
        match unsafe { uffdio_continue(self.raw(), &mut c) } {
            Ok(_) => Ok(Resolved::Mapped),
            Err(Errno::EEXIST) => Ok(Resolved::AlreadyMapped),
            Err(Errno::EFAULT) => Ok(Resolved::NoPage),
            Err(e) => Err(e),
        }
    }

    /// Fills `addr..addr + len` with zero pages (missing mode: the file has none there) and
    /// wakes threads waiting on them.
    pub fn zero(&self, addr: u64, len: u64) -> Result<Resolved, Errno> {
        let mut z = UffdioFill { range: UffdioRange { start: addr, len }, mode: 0, result: 0 };
        // SAFETY: `z` is a writable `struct uffdio_zeropage` that outlives the call. The
        // kernel fills only pages that are missing (EEXIST otherwise).
        match unsafe { uffdio_zeropage(self.raw(), &mut z) } {
            Ok(_) => Ok(Resolved::Mapped),
            Err(Errno::EEXIST) => Ok(Resolved::AlreadyMapped),
            Err(e) => Err(e),
        }
    }

    /// Wakes the threads waiting on `addr..addr + len`, whose pages something else mapped.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), Errno> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: `r` is a `struct uffdio_range` that outlives the call; a wake changes no
        // memory (a woken thread faults again if its page is still missing).
        unsafe { uffdio_wake(self.raw(), &mut r) }.map(drop)
    }

    /// Whether the page at `hole_addr` is registered for minor faults, asked of the kernel
    /// without changing anything: a minor resolution with `DONTWAKE` of a page that is
    /// missing from the file (the caller makes sure of it) fails with `EFAULT` where it is
    /// registered, and with `ENOENT` or `EINVAL` where nothing is registered there, or not
    /// in minor mode. (The kernel checks that the mapping is registered with a userfaultfd
    /// of the same process, not with this one: a VMM that registered with another one of
    /// its own is not caught here.)
    pub fn check_registered(&self, hole_addr: u64) -> Result<(), UffdError> {
        let mut c = UffdioFill { range: UffdioRange { start: hole_addr, len: 4096 }, mode: DONTWAKE, result: 0 };
        // SAFETY: as in `map`; the page at `hole_addr` is missing from the file, so nothing
        // is installed.
        match unsafe { uffdio_continue(self.raw(), &mut c) } {
            Err(Errno::EFAULT) | Ok(_) | Err(Errno::EEXIST) => Ok(()),
            Err(Errno::ENOENT | Errno::EINVAL) => Err(UffdError::NotRegistered(hole_addr)),
            Err(errno) => Err(UffdError::Check { addr: hole_addr, errno }),
        }
    }
}

/// A VMM's shared, writable mapping of guest memory that it registered with a
/// [`Userfault`] before anything touched it ([`Userfault::map_registered`]).
///
/// The memory is shared with the fault handler's process (ferryd), which writes pages of
/// the file: this process cannot know when. So the mapping is never handed out as bytes
/// (a `&[u8]` promises that nothing changes them); it is 64-bit words accessed atomically
/// ([`GuestMapping::words`], [`GuestMapping::read`]), which stay sound whatever another
/// process writes. The file is sealed against shrinking, so no page of the mapping can
/// vanish (no SIGBUS).
pub struct GuestMapping {
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for GuestMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMapping").field("addr", &self.addr()).field("len", &self.len()).finish()
    }
}

impl GuestMapping {
    pub fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Bytes mapped (whole pages).
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The memory as 64-bit words: a load of a page not resolved yet waits for the
    /// handler, as the guest's access would.
    pub fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping is page-aligned and whole pages long (checked at
        // `map_registered`) and stays mapped while `self` is borrowed; its file cannot
        // shrink (sealed).
        unsafe { crate::memmap::atomic_words(&self.map) }
    }

    /// Copies the bytes at `offset` (8-byte aligned) into `out` (a multiple of 8 bytes),
    /// a word at a time.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let first = (offset / 8) as usize;
        for (w, o) in self.words()[first..first + out.len() / 8].iter().zip(out.chunks_exact_mut(8)) {
            o.copy_from_slice(&w.load(std::sync::atomic::Ordering::Relaxed).to_ne_bytes());
        }
    }
}

impl Userfault {
    /// Maps `file` (a memory file sealed against shrinking, whole pages) shared and
    /// writable, and registers the mapping for missing and minor faults before returning
    /// it.
    pub fn map_registered(&self, file: &std::fs::File) -> Result<GuestMapping, UffdError> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        let seals = fcntl(file, FcntlArg::F_GET_SEALS).map_err(|e| UffdError::Memory { op: "reading the seals of", source: e.into() })?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return Err(UffdError::NotSealed);
        }
        let len = file.metadata().map_err(|source| UffdError::Memory { op: "examining", source })?.len();
        if len == 0 || len % 4096 != 0 {
            return Err(UffdError::NotPages(len));
        }
        let map =
            memmap2::MmapOptions::new().len(len as usize).map_raw(file).map_err(|source| UffdError::Memory { op: "mapping", source })?;
        self.register(map.as_ptr() as usize, map.len())?;
        Ok(GuestMapping { map })
    }
}

impl std::os::fd::AsFd for Userfault {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    /// ferryd takes only a userfaultfd where one belongs.
    #[test]
    fn a_descriptor_that_is_not_a_userfaultfd_is_refused() {
        let f = crate::memmap::memfd("not-uffd", 4096, false).unwrap();
        let err = super::Userfault::from_fd(f.into()).unwrap_err();
        assert!(matches!(&err, super::UffdError::NotUserfault(link) if link.contains("memfd:not-uffd")), "{err:?}");
        assert!(err.to_string().contains("not a userfaultfd"), "{err}");
        match super::Userfault::create() {
            Ok(u) => {
                let fd = u.fd;
                assert!(super::Userfault::from_fd(fd).is_ok());
            }
            Err(e) => crate::report_skip(&format!("userfaultfd unavailable here: {e}")),
        }
    }

    #[test]
    fn live_probe_has_a_value_or_a_reason() {
        let caps = super::probe();
        assert!(caps.available || caps.reason.is_some(), "{caps:?}");
        if !caps.available {
            crate::report_skip(&format!("userfaultfd unavailable here: {:?}", caps.reason));
        }
    }
}
