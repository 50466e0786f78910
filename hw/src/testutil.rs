//! Unit-test helpers: a small fake sysfs tree, and a loopback TCP connection.

use std::path::Path;

use crate::sysfs::SysRoot;

pub(crate) struct FakeSys {
    dir: tempfile::TempDir,
}

impl FakeSys {
    pub(crate) fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub(crate) fn root(&self) -> SysRoot {
        SysRoot::new(self.dir.path())
    }

    pub(crate) fn write(&self, rel: &str, contents: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    fn mkdir(&self, rel: &str) {
        std::fs::create_dir_all(self.dir.path().join(rel)).unwrap();
    }

    fn symlink(&self, rel: &str, target: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(Path::new(target), p).unwrap();
    }

    /// Two sockets with two SMT cores each (CPUs 0,1,4,5 on node 0; 2,3,6,7 on node 1),
    /// 64 GiB per node, 2 MiB hugepages reserved on both, and a 100 GbE mlx5 NIC on node 1.
    pub(crate) fn two_socket_host(&self) {
        self.write("devices/system/cpu/online", "0-7\n");
        for cpu in 0..8u32 {
            let pkg = if cpu % 4 < 2 { 0 } else { 1 };
            let core = cpu % 2;
            let t = format!("devices/system/cpu/cpu{cpu}/topology");
            self.write(&format!("{t}/physical_package_id"), &format!("{pkg}\n"));
            self.write(&format!("{t}/core_id"), &format!("{core}\n"));
        }
        for (node, cpus, total, free) in [(0, "0-1,4-5", 512, 400), (1, "2-3,6-7", 512, 600)] {
            let n = format!("devices/system/node/node{node}");
            self.write(&format!("{n}/cpulist"), &format!("{cpus}\n"));
            self.write(&format!("{n}/meminfo"), &format!("Node {node} MemTotal:       67108864 kB\nNode {node} MemFree: 1 kB\n"));
            self.write(&format!("{n}/hugepages/hugepages-2048kB/nr_hugepages"), &format!("{total}\n"));
            self.write(&format!("{n}/hugepages/hugepages-2048kB/free_hugepages"), &format!("{free}\n"));
            self.write(&format!("{n}/hugepages/hugepages-1048576kB/nr_hugepages"), "0\n");
            self.write(&format!("{n}/hugepages/hugepages-1048576kB/free_hugepages"), "0\n");
        }
        self.write("kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "1024\n");
        self.write("kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "1000\n");
        self.write("kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages", "0\n");
        self.write("kernel/mm/hugepages/hugepages-1048576kB/free_hugepages", "0\n");
        self.write("kernel/mm/transparent_hugepage/enabled", "always [madvise] never\n");

        self.write("class/net/lo/mtu", "65536\n");
        self.write("class/net/lo/operstate", "unknown\n");
        let pci = "devices/pci0000:80/0000:80:01.0/0000:81:00.0";
        self.write(&format!("{pci}/numa_node"), "1\n");
        self.mkdir(&format!("{pci}/infiniband/mlx5_0"));
        self.mkdir("bus/pci/drivers/mlx5_core");
        self.symlink(&format!("{pci}/driver"), "../../../../bus/pci/drivers/mlx5_core");
        self.symlink("class/net/ens1f0/device", &format!("../../../{pci}"));
        self.write("class/net/ens1f0/speed", "100000\n");
        self.write("class/net/ens1f0/mtu", "9000\n");
        self.write("class/net/ens1f0/operstate", "up\n");
    }
}

/// Both ends of a fresh loopback TCP connection: (connecting side, accepted side).
pub(crate) fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = std::net::TcpStream::connect(l.local_addr().expect("local addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}
