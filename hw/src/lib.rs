//! ferry's platform boundary. Every FFI call and syscall ferry makes lives in this crate;
//! `control` decides from what it reports, `dataplane` obeys.
//!
//! [`probe`] reads the machine into a [`Capabilities`] report. A probe that cannot be made
//! (no device, no permission, no sysfs entry) is a value with its reason, never a panic
//! and never an error of the whole probe.

/// The capabilities report (serde data shared with `control`).
pub mod caps;
/// JSON lines with file descriptors (SCM_RIGHTS) on a UNIX socket.
pub mod fdpass;
/// Read-only file mappings and per-worker arenas (hugepage ladder, mlock).
pub mod memmap;
/// RDMA devices through the verbs library, and owning wrappers over the raw verbs.
pub mod rdma;
/// sysfs reads under an injectable root.
pub mod sysfs;

/// Hugepages, THP, memlock and CAP_IPC_LOCK.
mod memory;
/// Socket buffer limits and sizes.
pub mod net;
/// Network interfaces from sysfs.
mod nic;
/// CPUs, cores and NUMA nodes.
mod topology;
/// userfaultfd: what the kernel offers, and a VMM's userfaultfd for post-copy.
pub mod uffd;
/// io_uring availability and features.
pub mod uring;
/// Receiving on a connection with io_uring: multishot receive into provided buffers.
pub mod uring_recv;
/// Sending on several connections from one thread with io_uring.
pub mod uring_send;

#[cfg(test)]
mod testutil;

use std::path::PathBuf;

use caps::KernelInfo;
pub use caps::{CAPS_SCHEMA_VERSION, Capabilities};
pub use memory::{HostMemory, host_memory};
use sysfs::SysRoot;

/// Where the probes look.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// sysfs mount point; `/sys` on a live system, a captured tree in tests.
    pub sysfs_root: PathBuf,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self { sysfs_root: PathBuf::from("/sys") }
    }
}

/// Reads the machine. With a captured sysfs root, topology, NICs and hugepages come from
/// that tree; RDMA devices are not probed (libibverbs always reads the live `/sys`), and
/// the per-process facts (io_uring, memlock, userfaultfd, kernel) are the running
/// process's.
pub fn probe(opts: &ProbeOptions) -> Capabilities {
    let sys = SysRoot::new(&opts.sysfs_root);
    let (cpus, numa_nodes, topo_note) = topology::probe(&sys);
    if let Some(note) = topo_note {
        log::warn!("{note}");
    }
    let mut nics = nic::probe(&sys);
    let (rdma_devices, rdma_unavailable_reason) = if sys.is_live() {
        match rdma::probe(&sys) {
            Ok(devs) => (devs, None),
            Err(reason) => (Vec::new(), Some(reason)),
        }
    } else {
        (Vec::new(), Some(format!("not probed: verbs read the live /sys, not the captured tree {}", opts.sysfs_root.display())))
    };
    // rxe and siw devices have no PCI parent; their GIDs name the netdev they sit on.
    for dev in &rdma_devices {
        for gid in dev.ports.iter().flat_map(|p| &p.gids) {
            if let Some(nic) = nics.iter_mut().find(|n| Some(&n.name) == gid.netdev.as_ref()) {
                nic.rdma_device.get_or_insert_with(|| dev.name.clone());
            }
        }
    }
    Capabilities {
        schema_version: CAPS_SCHEMA_VERSION,
        hostname: nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default(),
        kernel: kernel_info(),
        cpus,
        numa_nodes,
        nics,
        rdma_devices,
        rdma_unavailable_reason,
        io_uring: uring::probe(),
        hugepages: memory::probe_hugepages(&sys),
        memlock_limit_bytes: memory::memlock_limit(),
        cap_ipc_lock: memory::has_cap_ipc_lock(),
        userfaultfd: uffd::probe(),
        socket_limits: net::socket_limits(),
    }
}

/// Prints `SKIP: <reason>` for a test that cannot run on this machine. It writes to
/// stderr directly, past the test harness's capture of `println!`, so a skipped test says
/// so in every run instead of passing silently.
pub fn report_skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {reason}");
}

fn kernel_info() -> KernelInfo {
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into());
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok());
    let minor = parts.next().and_then(|p| p.parse().ok());
    KernelInfo { release, major, minor }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_probe_round_trips_through_json() {
        let caps = probe(&ProbeOptions::default());
        assert!(caps.cpus.logical >= 1);
        assert!(!caps.numa_nodes.is_empty());
        assert!(caps.kernel.major.is_some(), "{:?}", caps.kernel);
        assert!(caps.rdma_devices.is_empty() == caps.rdma_unavailable_reason.is_some());
        let json = serde_json::to_string(&caps).unwrap();
        let back: Capabilities = serde_json::from_str(&json).unwrap();
        assert_eq!(back, caps);
    }

    #[test]
    fn captured_tree_is_read_and_rdma_is_explained() {
        let fake = testutil::FakeSys::new();
        fake.two_socket_host();
        let caps = probe(&ProbeOptions { sysfs_root: fake.root().path("") });
        assert_eq!(caps.numa_nodes.len(), 2);
        assert_eq!(caps.cpus.source, "sysfs");
        assert!(caps.rdma_unavailable_reason.unwrap().contains("captured tree"));
        assert_eq!(caps.nics.iter().find(|n| n.name == "ens1f0").unwrap().numa_node, Some(1));
    }
}
