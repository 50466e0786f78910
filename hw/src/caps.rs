//! The capabilities report: plain serde data, what `ferryctl probe --json` prints and what
//! `ferryctl tune --caps FILE` reads back.
//!
//! Field names are a stable interface (fixtures and golden plans depend on them). Every
//! probe that could not be made carries its reason instead of a value; nothing here is a
//! guess. Unknown fields are rejected so a typo in a hand-written fixture is an error.

use serde::{Deserialize, Serialize};

/// Version of this report's layout; bumped when a field changes meaning.
pub const CAPS_SCHEMA_VERSION: u32 = 1;

/// Everything `ferryctl` knows about one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    pub schema_version: u32,
    pub hostname: String,
    pub kernel: KernelInfo,
    pub cpus: CpuInfo,
    pub numa_nodes: Vec<NumaNode>,
    pub nics: Vec<Nic>,
    pub rdma_devices: Vec<RdmaDevice>,
    /// Why `rdma_devices` is empty (no kernel support, no device, library missing), or
    /// `None` when the verbs device list was read.
    #[serde(default)]
    pub rdma_unavailable_reason: Option<String>,
    pub io_uring: IoUringCaps,
    pub hugepages: HugepageCaps,
    /// Soft `RLIMIT_MEMLOCK` of the probing process; `None` means unlimited.
    pub memlock_limit_bytes: Option<u64>,
    /// Whether the process holds CAP_IPC_LOCK, which lifts the memlock limit for `mlock`
    /// and for RDMA memory registration.
    pub cap_ipc_lock: bool,
    pub userfaultfd: UserfaultfdCaps,
    /// Socket buffer limits (`net.core.*mem_max`, `net.ipv4.tcp_*mem`); absent in reports
    /// written before they were probed.
    #[serde(default)]
    pub socket_limits: SocketLimits,
}

/// What caps SO_SNDBUF/SO_RCVBUF and TCP autotuning, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketLimits {
    /// `net.core.wmem_max`: the most SO_SNDBUF can set (without CAP_NET_ADMIN).
    pub wmem_max: Option<u64>,
    /// `net.core.rmem_max`.
    pub rmem_max: Option<u64>,
    /// The third field of `net.ipv4.tcp_wmem`: how far autotuning grows a send buffer.
    pub tcp_wmem_max: Option<u64>,
    pub tcp_rmem_max: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelInfo {
    /// `uname -r`.
    pub release: String,
    /// (major, minor) parsed from the release, when it parses.
    pub major: Option<u32>,
    pub minor: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuInfo {
    /// Logical CPUs (hardware threads) the OS runs.
    pub logical: u32,
    /// Physical cores.
    pub cores: u32,
    /// Sockets.
    pub packages: u32,
    /// Where the topology came from: `hwloc` or `sysfs`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaNode {
    pub id: u32,
    /// Physical cores of this node, each as the OS indices of its hardware threads.
    pub cores: Vec<Vec<u32>>,
    /// Memory local to the node, bytes.
    pub memory_bytes: u64,
}

impl NumaNode {
    /// All logical CPUs of the node, in core order.
    pub fn cpus(&self) -> Vec<u32> {
        self.cores.iter().flatten().copied().collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    pub driver: Option<String>,
    pub pci_address: Option<String>,
    /// `None` when the device sits on no NUMA node (sysfs reports -1) or is virtual.
    pub numa_node: Option<u32>,
    /// Link speed in Mb/s; `None` when the driver does not report one (virtio, down links).
    pub speed_mbps: Option<u64>,
    pub mtu: Option<u32>,
    /// `operstate`: up, down, unknown, ...
    pub state: String,
    /// Virtual devices (loopback, veth, bridges) have no `device` link in sysfs.
    pub is_virtual: bool,
    /// The RDMA device bound to this netdev, if any.
    pub rdma_device: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmaDevice {
    pub name: String,
    /// Kernel driver / provider (`mlx5_core`, `irdma`, `rdma_rxe`), from sysfs when known.
    pub driver: Option<String>,
    pub fw_ver: String,
    pub node_guid: String,
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    pub numa_node: Option<u32>,
    pub attrs: RdmaDeviceAttrs,
    /// The largest `max_inline_data` a test RC QP was granted; `None` with a note when the
    /// test QP could not be created.
    pub max_inline_data: Option<u32>,
    pub ports: Vec<RdmaPort>,
    /// Probes that could not be completed on this device, with reasons.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The subset of `ibv_device_attr` the planner uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmaDeviceAttrs {
    pub max_qp: u32,
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_sge_rd: u32,
    pub max_cq: u32,
    pub max_cqe: u32,
    pub max_mr: u32,
    pub max_mr_size: u64,
    pub max_pd: u32,
    pub max_qp_rd_atom: u32,
    pub max_qp_init_rd_atom: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortState {
    Down,
    Init,
    Armed,
    Active,
    ActiveDefer,
    Nop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkLayer {
    InfiniBand,
    Ethernet,
    Unspecified,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmaPort {
    pub port: u8,
    pub state: PortState,
    /// Active MTU in bytes (256..4096).
    pub active_mtu: u32,
    pub max_mtu: u32,
    pub link_layer: LinkLayer,
    /// Lanes (1, 2, 4, 8, 12).
    pub active_width: u32,
    /// Per-lane signalling name (SDR, ..., NDR, XDR).
    pub active_speed: String,
    /// Lanes x per-lane data rate.
    pub rate_gbps: f64,
    /// Local identifier (InfiniBand only; 0 on Ethernet).
    pub lid: u16,
    pub gids: Vec<Gid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GidType {
    #[serde(rename = "IB")]
    Ib,
    #[serde(rename = "RoCE v1")]
    RoceV1,
    #[serde(rename = "RoCE v2")]
    RoceV2,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gid {
    pub index: u32,
    /// Colon-separated IPv6 notation, as `show_gids` prints it.
    pub gid: String,
    pub gid_type: GidType,
    /// The netdev the GID belongs to (RoCE), if sysfs names one.
    pub netdev: Option<String>,
}

impl Gid {
    /// A RoCE GID that carries an IPv4 address (`::ffff:a.b.c.d`): the one perftest and
    /// rdma_cm pick for IPv4 fabrics.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.gid.starts_with("0000:0000:0000:0000:0000:ffff:")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoUringCaps {
    /// A ring could be created.
    pub available: bool,
    /// Why not, when it could not (sysctl, seccomp, old kernel).
    pub reason: Option<String>,
    /// What blocks it, for the fix `ferryctl doctor` offers (reports written before this
    /// field have none).
    #[serde(default)]
    pub blocked: Option<UringBlock>,
    /// `kernel.io_uring_disabled` (0 allowed, 1 only for io_uring_group, 2 disabled).
    pub disabled_sysctl: Option<u32>,
    pub send_zc: bool,
    pub sendmsg_zc: bool,
    /// A multishot receive was submitted and stayed armed (`IORING_CQE_F_MORE`).
    pub recv_multishot: bool,
    /// A provided-buffer ring could be registered.
    pub provided_buffer_rings: bool,
    /// Fixed buffers could be registered (this also needs memlock headroom).
    pub fixed_buffers: bool,
    /// Opcodes of interest that the kernel's probe lists as supported.
    pub opcodes: Vec<String>,
}

/// What keeps `io_uring_setup` from working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UringBlock {
    /// `kernel.io_uring_disabled`.
    Sysctl,
    /// A seccomp filter: EPERM, or ENOSYS where the process runs under a filter (container
    /// runtimes' default profiles answer ENOSYS).
    Seccomp,
    /// ENOSYS with no filter: the kernel was built without it.
    Kernel,
    /// ENOMEM: RLIMIT_MEMLOCK too low for the ring.
    Memlock,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HugepageCaps {
    /// `always`, `madvise` or `never`; `None` when THP is not built in.
    pub thp_mode: Option<String>,
    pub pools: Vec<HugepagePool>,
}

impl HugepageCaps {
    /// The pool of `size_kib` pages, if the kernel has one.
    pub fn pool(&self, size_kib: u64) -> Option<&HugepagePool> {
        self.pools.iter().find(|p| p.size_kib == size_kib)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HugepagePool {
    pub size_kib: u64,
    pub total: u64,
    pub free: u64,
    pub per_node: Vec<NodeHugepages>,
}

impl HugepagePool {
    /// Free pages on `node`, falling back to the global count when the kernel gives no
    /// per-node split (non-NUMA kernels).
    pub fn free_on(&self, node: u32) -> u64 {
        if self.per_node.is_empty() {
            return self.free;
        }
        self.per_node.iter().find(|n| n.node == node).map_or(0, |n| n.free)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeHugepages {
    pub node: u32,
    pub total: u64,
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserfaultfdCaps {
    pub available: bool,
    /// Write-protect faults on anonymous memory (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
    pub write_protect: bool,
    /// Write-protect on shmem and hugetlbfs, which memfd-backed guest memory needs.
    pub write_protect_shmem: bool,
    pub reason: Option<String>,
    /// `vm.unprivileged_userfaultfd`.
    pub unprivileged_sysctl: Option<u32>,
}
