//! What the engine-level tests share: a plan for loopback, and a key.
// Each test binary uses part of this.
#![allow(dead_code)]

use dataplane::auth::{Auth, Key};
use dataplane::plan::*;

/// Blocking sockets on loopback, `workers` x `conns` lanes, plain pages for the arenas.
pub fn plan(workers: usize, conns: u32, compression: Compression, chunk: u64) -> Plan {
    Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        host: "test".into(),
        transport: Transport::Sockets,
        numa_node: 0,
        worker_cpus: vec![0; workers],
        control_cpu: None,
        link: LinkPlan { interface: Some("lo".into()), speed_gbps: 10.0, rtt_us: 10.0, speed_assumed: true },
        chunk_size_bytes: chunk,
        rdma: None,
        tcp: TcpPlan {
            connections_per_worker: conns,
            io_uring: false,
            ring_entries: 64,
            send_zc: false,
            socket_buffer_bytes: Some(1 << 20),
            socket_buffer_needed_bytes: 1 << 20,
        },
        arena: ArenaPlan { bytes_per_worker: 8 << 20, backing: ArenaBacking::Normal, hugepages_2m_needed: 0, mlock: false },
        compression,
        limits: Limits::default(),
        reasons: vec![],
    }
}

/// A 32-byte key of `b`s.
pub fn key(b: u8) -> Auth {
    Auth::Key(Key::from_bytes(vec![b; 32]).unwrap())
}
