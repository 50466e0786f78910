//! Hugepage pools (global and per node), transparent hugepages, `RLIMIT_MEMLOCK` and
//! CAP_IPC_LOCK: what decides whether arenas can be pinned and registered.

use nix::sys::resource::{Resource, getrlimit};

use crate::caps::{HugepageCaps, HugepagePool, NodeHugepages};
use crate::sysfs::SysRoot;

pub(crate) fn probe_hugepages(sys: &SysRoot) -> HugepageCaps {
    let thp_mode = sys.read("kernel/mm/transparent_hugepage/enabled").and_then(|s| bracketed(&s));
    let nodes: Vec<u32> = sys.list("devices/system/node").iter().filter_map(|n| n.strip_prefix("node")?.parse().ok()).collect();
    let mut pools = Vec::new();
    for dir in sys.list("kernel/mm/hugepages") {
        let Some(size_kib) = page_size_kib(&dir) else { continue };
        let base = format!("kernel/mm/hugepages/{dir}");
        let per_node = nodes
            .iter()
            .filter_map(|&node| {
                let b = format!("devices/system/node/node{node}/hugepages/{dir}");
                Some(NodeHugepages {
                    node,
                    total: sys.read_u64(&format!("{b}/nr_hugepages"))?,
                    free: sys.read_u64(&format!("{b}/free_hugepages"))?,
                })
            })
            .collect();
        pools.push(HugepagePool {
            size_kib,
            total: sys.read_u64(&format!("{base}/nr_hugepages")).unwrap_or(0),
            free: sys.read_u64(&format!("{base}/free_hugepages")).unwrap_or(0),
            per_node,
        });
    }
    HugepageCaps { thp_mode, pools }
}

/// `hugepages-2048kB` -> 2048.
fn page_size_kib(dir: &str) -> Option<u64> {
    dir.strip_prefix("hugepages-")?.strip_suffix("kB")?.parse().ok()
}

/// `always [madvise] never` -> `madvise`.
fn bracketed(s: &str) -> Option<String> {
    let start = s.find('[')? + 1;
    let end = start + s[start..].find(']')?;
    Some(s[start..end].to_string())
}

/// Soft `RLIMIT_MEMLOCK`; `None` when unlimited.
pub(crate) fn memlock_limit() -> Option<u64> {
    match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == libc::RLIM_INFINITY => None,
        Ok((soft, _)) => Some(soft),
        // getrlimit cannot fail for a valid resource; report the strictest reading.
        Err(_) => Some(0),
    }
}

/// CAP_IPC_LOCK in the effective set, from `/proc/self/status`.
pub(crate) fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// This host's memory as `/proc/meminfo` tells it now, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// RAM and swap together.
    pub total: u64,
    /// What can be allocated now without pushing other memory out: MemAvailable plus free
    /// swap.
    pub available: u64,
}

/// Reads `/proc/meminfo`: how much guest memory or incoming memory this host can back.
pub fn host_memory() -> std::io::Result<HostMemory> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo")?)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "/proc/meminfo lacks MemTotal or MemAvailable"))
}

fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let field = |name: &str| -> Option<u64> {
        let rest = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?;
        rest.split_whitespace().next()?.parse::<u64>().ok().map(|kib| kib << 10)
    };
    let (swap, swap_free) = (field("SwapTotal").unwrap_or(0), field("SwapFree").unwrap_or(0));
    Some(HostMemory { total: field("MemTotal")? + swap, available: field("MemAvailable")? + swap_free })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::FakeSys;

    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   20000000 kB\nSwapTotal: 1000 kB\nSwapFree: 500 kB\n",
        )
        .unwrap();
        assert_eq!(m, HostMemory { total: 24_001_000 << 10, available: 20_000_500 << 10 });
        assert!(parse_meminfo("MemFree: 1 kB\n").is_none());
        let live = host_memory().unwrap();
        assert!(live.total >= live.available / 2 && live.total > 0, "{live:?}");
    }

    #[test]
    fn thp_mode_is_the_bracketed_word() {
        assert_eq!(bracketed("always [madvise] never"), Some("madvise".into()));
        assert_eq!(bracketed("[always] madvise never\n"), Some("always".into()));
        assert_eq!(bracketed("garbage"), None);
    }

    #[test]
    fn pools_global_and_per_node() {
        let fake = FakeSys::new();
        fake.two_socket_host();
        let caps = probe_hugepages(&fake.root());
        assert_eq!(caps.thp_mode.as_deref(), Some("madvise"));
        let p2m = caps.pool(2048).expect("2 MiB pool");
        assert_eq!((p2m.total, p2m.free), (1024, 1000));
        assert_eq!(p2m.free_on(1), 600);
        assert_eq!(p2m.free_on(7), 0);
        assert_eq!(caps.pool(1048576).map(|p| p.total), Some(0));
    }

    #[test]
    fn live_memlock_reads() {
        // Whatever the limit is, it reads back the same twice and CAP_IPC_LOCK parses.
        assert_eq!(memlock_limit(), memlock_limit());
        let _ = has_cap_ipc_lock();
    }
}
