//! Network interfaces from `class/net`: driver, PCI address, NUMA node, link speed, MTU
//! and state.

use crate::caps::Nic;
use crate::sysfs::SysRoot;

pub(crate) fn probe(sys: &SysRoot) -> Vec<Nic> {
    sys.list("class/net").into_iter().map(|name| read_nic(sys, name)).collect()
}

fn read_nic(sys: &SysRoot, name: String) -> Nic {
    let base = format!("class/net/{name}");
    let is_virtual = !sys.exists(&format!("{base}/device"));
    let pci_address = std::fs::canonicalize(sys.path(&format!("{base}/device")))
        .ok()
        .and_then(|p| p.ancestors().filter_map(|a| a.file_name()?.to_str()).find(|c| is_pci_address(c)).map(str::to_string));
    // virtio-net's `device` is the virtio bus device; its PCI parent holds numa_node.
    let numa_node = [format!("{base}/device/numa_node"), format!("{base}/device/../numa_node")]
        .iter()
        .find_map(|p| sys.read_i64(p))
        .and_then(|n| u32::try_from(n).ok());
    Nic {
        driver: sys.link_name(&format!("{base}/device/driver")),
        pci_address,
        numa_node,
        speed_mbps: sys.read_i64(&format!("{base}/speed")).and_then(|s| u64::try_from(s).ok()).filter(|&s| s > 0),
        mtu: sys.read_u64(&format!("{base}/mtu")).map(|m| m as u32),
        state: sys.read(&format!("{base}/operstate")).unwrap_or_else(|| "unknown".into()),
        is_virtual,
        rdma_device: sys.list(&format!("{base}/device/infiniband")).into_iter().next(),
        name,
    }
}

/// `0000:81:00.0`
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && s.chars().enumerate().all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::FakeSys;

    #[test]
    fn pci_addresses() {
        assert!(is_pci_address("0000:81:00.0"));
        assert!(!is_pci_address("virtio2"));
        assert!(!is_pci_address("pci0000:00"));
    }

    #[test]
    fn nic_on_node_one_with_rdma() {
        let fake = FakeSys::new();
        fake.two_socket_host();
        let nics = probe(&fake.root());
        let lo = nics.iter().find(|n| n.name == "lo").unwrap();
        assert!(lo.is_virtual);
        assert_eq!(lo.numa_node, None);
        let eth = nics.iter().find(|n| n.name == "ens1f0").unwrap();
        assert!(!eth.is_virtual);
        assert_eq!(eth.driver.as_deref(), Some("mlx5_core"));
        assert_eq!(eth.pci_address.as_deref(), Some("0000:81:00.0"));
        assert_eq!(eth.numa_node, Some(1));
        assert_eq!(eth.speed_mbps, Some(100_000));
        assert_eq!(eth.mtu, Some(9000));
        assert_eq!(eth.rdma_device.as_deref(), Some("mlx5_0"));
    }

    #[test]
    fn live_nics_read() {
        let nics = probe(&SysRoot::default());
        assert!(nics.iter().any(|n| n.name == "lo"), "{nics:?}");
    }
}
