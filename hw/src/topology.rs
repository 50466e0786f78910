//! CPUs, cores and NUMA nodes: hwloc on the live system, sysfs for a captured tree (and as
//! the fallback when hwloc cannot load a topology).

use std::collections::BTreeMap;

use hwlocality::Topology;
use hwlocality::object::types::ObjectType;

use crate::caps::{CpuInfo, NumaNode};
use crate::sysfs::{SysRoot, parse_cpulist};

/// The CPU summary and the NUMA nodes, plus a note when hwloc was not used.
pub(crate) fn probe(sys: &SysRoot) -> (CpuInfo, Vec<NumaNode>, Option<String>) {
    if sys.is_live() {
        match probe_hwloc(sys) {
            Ok((cpus, nodes)) => return (cpus, nodes, None),
            Err(e) => {
                let (cpus, nodes) = probe_sysfs(sys);
                return (cpus, nodes, Some(format!("hwloc could not load the topology ({e}); read sysfs instead")));
            }
        }
    }
    let (cpus, nodes) = probe_sysfs(sys);
    (cpus, nodes, None)
}

fn probe_hwloc(sys: &SysRoot) -> Result<(CpuInfo, Vec<NumaNode>), String> {
    let topo = Topology::new().map_err(|e| e.to_string())?;
    let packages = topo.objects_with_type(ObjectType::Package).count() as u32;
    let logical = topo.objects_with_type(ObjectType::PU).count() as u32;
    let mut nodes = Vec::new();
    for node in topo.objects_with_type(ObjectType::NUMANode) {
        let id = node.os_index().ok_or("a NUMA node without an OS index")? as u32;
        let node_set = node.cpuset().ok_or("a NUMA node without a cpuset")?;
        let mut cores = Vec::new();
        for core in topo.objects_with_type(ObjectType::Core) {
            let Some(set) = core.cpuset() else { continue };
            if !set.intersects(&*node_set) {
                continue;
            }
            let pus: Vec<u32> = set.iter_set().map(|i| usize::from(i) as u32).collect();
            cores.push(pus);
        }
        let hwloc_mem = match node.attributes() {
            Some(hwlocality::object::attributes::ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
            _ => 0,
        };
        nodes.push(NumaNode { id, cores, memory_bytes: node_memory(sys, id).unwrap_or(hwloc_mem) });
    }
    if nodes.is_empty() {
        return Err("no NUMA node found".into());
    }
    fix_single_node_memory(&mut nodes);
    let cores = nodes.iter().map(|n| n.cores.len() as u32).sum();
    Ok((CpuInfo { logical, cores, packages: packages.max(1), source: "hwloc".into() }, nodes))
}

/// `MemTotal` of a node from `nodeN/meminfo`.
fn node_memory(sys: &SysRoot, id: u32) -> Option<u64> {
    let text = sys.read(&format!("devices/system/node/node{id}/meminfo"))?;
    let line = text.lines().find(|l| l.contains("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().rev().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// With memory hotplug (these VMs), a single node's `meminfo` shows only the boot memory
/// (about 6 of 24 GiB here) while `/proc/meminfo` has it all. With one node, all memory is
/// that node's, so take the larger figure.
fn fix_single_node_memory(nodes: &mut [NumaNode]) {
    if let [only] = nodes {
        let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        });
        if let Some(kib) = total {
            only.memory_bytes = only.memory_bytes.max(kib * 1024);
        }
    }
}

/// Topology from `devices/system/{node,cpu}` alone.
pub(crate) fn probe_sysfs(sys: &SysRoot) -> (CpuInfo, Vec<NumaNode>) {
    let online = sys
        .read("devices/system/cpu/online")
        .and_then(|s| parse_cpulist(&s))
        .unwrap_or_else(|| sys.list("devices/system/cpu").iter().filter_map(|n| n.strip_prefix("cpu")?.parse().ok()).collect());
    // (package, core_id) -> PUs
    let mut core_of: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
    for &cpu in &online {
        let t = format!("devices/system/cpu/cpu{cpu}/topology");
        let pkg = sys.read_u64(&format!("{t}/physical_package_id")).unwrap_or(0) as u32;
        let core = sys.read_u64(&format!("{t}/core_id")).map_or(cpu, |c| c as u32);
        core_of.entry((pkg, core)).or_default().push(cpu);
    }
    let packages = core_of.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().len() as u32;

    let node_dirs: Vec<u32> = sys.list("devices/system/node").iter().filter_map(|n| n.strip_prefix("node")?.parse().ok()).collect();
    let mut nodes = Vec::new();
    if node_dirs.is_empty() {
        // A kernel without NUMA: everything on node 0.
        let cores = core_of.values().cloned().collect();
        nodes.push(NumaNode { id: 0, cores, memory_bytes: 0 });
    }
    for id in node_dirs {
        let cpus = sys.read(&format!("devices/system/node/node{id}/cpulist")).and_then(|s| parse_cpulist(&s)).unwrap_or_default();
        let cores = core_of.values().filter(|pus| pus.iter().any(|p| cpus.contains(p))).cloned().collect();
        nodes.push(NumaNode { id, cores, memory_bytes: node_memory(sys, id).unwrap_or(0) });
    }
    if sys.is_live() {
        fix_single_node_memory(&mut nodes);
    }
    let cpus = CpuInfo { logical: online.len() as u32, cores: core_of.len() as u32, packages: packages.max(1), source: "sysfs".into() };
    (cpus, nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::FakeSys;

    #[test]
    fn two_sockets_with_smt_from_sysfs() {
        let fake = FakeSys::new();
        fake.two_socket_host();
        let (cpus, nodes) = probe_sysfs(&fake.root());
        assert_eq!(cpus.logical, 8);
        assert_eq!(cpus.cores, 4);
        assert_eq!(cpus.packages, 2);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].id, 1);
        assert_eq!(nodes[1].cores, vec![vec![2, 6], vec![3, 7]]);
        assert_eq!(nodes[1].memory_bytes, 64 << 30);
    }

    #[test]
    fn live_hwloc_agrees_with_sysfs() {
        let sys = SysRoot::default();
        let (hw, hw_nodes) = match probe_hwloc(&sys) {
            Ok(v) => v,
            Err(e) => {
                crate::report_skip(&format!("hwloc cannot load this machine's topology: {e}"));
                return;
            }
        };
        let (fs, fs_nodes) = probe_sysfs(&sys);
        assert_eq!(hw.logical, fs.logical);
        assert_eq!(hw.cores, fs.cores);
        assert_eq!(hw_nodes.len(), fs_nodes.len());
        for (a, b) in hw_nodes.iter().zip(&fs_nodes) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.cpus(), b.cpus());
            assert_eq!(a.memory_bytes, b.memory_bytes);
        }
    }
}
