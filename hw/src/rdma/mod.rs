//! RDMA devices and ports through the verbs library: device limits, port state, speed,
//! MTU, GID table, and the real inline-data limit (found by creating test QPs).

pub mod verbs;

use ibverbs_sys as sys;

pub use verbs::RdmaError;
use verbs::{Context, DeviceList, QpCaps};

use crate::caps::{Gid, GidType, LinkLayer, PortState, RdmaDevice, RdmaDeviceAttrs, RdmaPort};
use crate::sysfs::SysRoot;

/// Reads every RDMA device. `Err` carries the reason there are none; devices that fail to
/// open are left out with a warning.
pub(crate) fn probe(sys: &SysRoot) -> Result<Vec<RdmaDevice>, String> {
    let list = DeviceList::get().map_err(|e| e.to_string())?;
    if list.is_empty() {
        return Err("no RDMA devices: ibv_get_device_list returned none (no NIC, driver not loaded, or no rxe/siw link)".into());
    }
    let mut devices = Vec::new();
    let mut failures = Vec::new();
    for i in 0..list.len() {
        match list.open(i).and_then(|ctx| read_device(sys, &ctx)) {
            Ok(d) => devices.push(d),
            Err(e) => {
                log::warn!("skipping RDMA device {}: {e}", list.name(i));
                failures.push(e.to_string());
            }
        }
    }
    if devices.is_empty() {
        return Err(format!("no RDMA device could be read: {}", failures.join("; ")));
    }
    Ok(devices)
}

fn read_device(sys: &SysRoot, ctx: &Context) -> Result<RdmaDevice, RdmaError> {
    let a = ctx.query_device()?;
    let name = ctx.name().to_string();
    let base = format!("class/infiniband/{name}");
    let mut notes = Vec::new();
    let mut ports = Vec::new();
    for port in 1..=a.phys_port_cnt {
        ports.push(read_port(ctx, port)?);
    }
    let max_inline_data = match probe_max_inline(ctx, &a) {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!("inline limit not probed: {e}"));
            None
        }
    };
    // fw_ver is 64 bytes, NUL-terminated when the name is shorter: read up to the first
    // NUL or the end, whichever comes first.
    let raw: Vec<u8> = a.fw_ver.iter().map(|&c| c as u8).collect();
    let fw_ver = String::from_utf8_lossy(raw.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
    let pos = |v: i32| v.max(0) as u32;
    Ok(RdmaDevice {
        driver: sys.link_name(&format!("{base}/device/driver")).or_else(|| {
            // rxe and siw have no parent device; the `parent` attribute names their netdev.
            sys.exists(&format!("{base}/parent")).then(|| if name.starts_with("siw") { "siw".into() } else { "rdma_rxe".into() })
        }),
        fw_ver,
        node_guid: format_guid(u64::from_be(a.node_guid)),
        vendor_id: a.vendor_id,
        vendor_part_id: a.vendor_part_id,
        numa_node: sys.read_i64(&format!("{base}/device/numa_node")).and_then(|n| u32::try_from(n).ok()),
        attrs: RdmaDeviceAttrs {
            max_qp: pos(a.max_qp),
            max_qp_wr: pos(a.max_qp_wr),
            max_sge: pos(a.max_sge),
            max_sge_rd: pos(a.max_sge_rd),
            max_cq: pos(a.max_cq),
            max_cqe: pos(a.max_cqe),
            max_mr: pos(a.max_mr),
            max_mr_size: a.max_mr_size,
            max_pd: pos(a.max_pd),
            max_qp_rd_atom: pos(a.max_qp_rd_atom),
            max_qp_init_rd_atom: pos(a.max_qp_init_rd_atom),
        },
        max_inline_data,
        ports,
        notes,
        name,
    })
}

fn read_port(ctx: &Context, port: u8) -> Result<RdmaPort, RdmaError> {
    let p = ctx.query_port(port)?;
    let link_layer = match u32::from(p.link_layer) {
        sys::IBV_LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
        sys::IBV_LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
        _ => LinkLayer::Unspecified,
    };
    let mut gids = Vec::new();
    for index in 0..p.gid_tbl_len.max(0) as u32 {
        let Some(e) = ctx.query_gid(port, index)? else { continue };
        if e.raw == [0; 16] {
            continue;
        }
        gids.push(Gid {
            index,
            gid: format_gid(&e.raw),
            gid_type: match e.gid_type {
                sys::IBV_GID_TYPE_ROCE_V2 => GidType::RoceV2,
                sys::IBV_GID_TYPE_ROCE_V1 => GidType::RoceV1,
                _ => GidType::Ib,
            },
            netdev: ifname(e.ndev_ifindex),
        });
    }
    let lanes = width_lanes(p.active_width);
    let (speed_name, lane_gbps) = speed(p.active_speed, p.active_speed_ex);
    Ok(RdmaPort {
        port,
        state: port_state(p.state),
        active_mtu: mtu_bytes(p.active_mtu),
        max_mtu: mtu_bytes(p.max_mtu),
        link_layer,
        active_width: lanes,
        active_speed: speed_name.into(),
        rate_gbps: f64::from(lanes) * lane_gbps,
        lid: p.lid,
        gids,
    })
}

/// Finds the largest `max_inline_data` an RC QP can be created with, by bisection over
/// `0..=4096` (providers reject a request above their limit), and returns what the
/// provider granted for it (some round up).
fn probe_max_inline(ctx: &Context, a: &sys::ibv_device_attr) -> Result<u32, RdmaError> {
    let pd = ctx.alloc_pd()?;
    let cq = ctx.create_cq(16)?;
    let wr = (a.max_qp_wr.max(1) as u32).min(16);
    let try_inline = |inline: u32| {
        pd.create_rc_qp(&cq, QpCaps { max_send_wr: wr, max_recv_wr: wr, max_send_sge: 1, max_recv_sge: 1, max_inline_data: inline })
            .map(|(_qp, granted)| granted.max_inline_data)
    };
    // Zero inline must work; if it does not, QPs cannot be created at all.
    let mut granted = try_inline(0)?;
    let (mut lo, mut hi) = (0u32, 4096u32);
    if let Ok(g) = try_inline(hi) {
        return Ok(g.max(hi));
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match try_inline(mid) {
            Ok(g) => {
                lo = mid;
                granted = g.max(mid);
            }
            Err(_) => hi = mid,
        }
    }
    Ok(granted)
}

fn port_state(s: sys::ibv_port_state::Type) -> PortState {
    match s {
        sys::ibv_port_state::IBV_PORT_DOWN => PortState::Down,
        sys::ibv_port_state::IBV_PORT_INIT => PortState::Init,
        sys::ibv_port_state::IBV_PORT_ARMED => PortState::Armed,
        sys::ibv_port_state::IBV_PORT_ACTIVE => PortState::Active,
        sys::ibv_port_state::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
        _ => PortState::Nop,
    }
}

/// `enum ibv_mtu` (1 = 256 ... 5 = 4096) in bytes.
fn mtu_bytes(m: sys::ibv_mtu) -> u32 {
    match m {
        n @ 1..=5 => 128 << n,
        _ => 0,
    }
}

/// `active_width` bit -> lanes (IB spec: 1 = 1x, 2 = 4x, 4 = 8x, 8 = 12x, 16 = 2x).
fn width_lanes(w: u8) -> u32 {
    match w {
        1 => 1,
        2 => 4,
        4 => 8,
        8 => 12,
        16 => 2,
        _ => 0,
    }
}

/// `active_speed` (and `active_speed_ex` for XDR) -> name and data rate per lane, Gb/s,
/// as `ibv_devinfo` and sysfs `rate` report them.
fn speed(s: u8, ex: u32) -> (&'static str, f64) {
    match if ex != 0 { ex } else { u32::from(s) } {
        1 => ("SDR", 2.5),
        2 => ("DDR", 5.0),
        4 => ("QDR", 10.0),
        8 => ("FDR10", 10.0),
        16 => ("FDR", 14.0),
        32 => ("EDR", 25.0),
        64 => ("HDR", 50.0),
        128 => ("NDR", 100.0),
        256 => ("XDR", 200.0),
        _ => ("unknown", 0.0),
    }
}

fn format_guid(g: u64) -> String {
    format!("{:04x}:{:04x}:{:04x}:{:04x}", g >> 48, (g >> 32) & 0xffff, (g >> 16) & 0xffff, g & 0xffff)
}

fn format_gid(raw: &[u8; 16]) -> String {
    raw.chunks(2).map(|c| format!("{:02x}{:02x}", c[0], c[1])).collect::<Vec<_>>().join(":")
}

fn ifname(ifindex: u32) -> Option<String> {
    if ifindex == 0 {
        return None;
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname(3) requires; it writes a
    // NUL-terminated name or returns NULL.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(mtu_bytes(sys::IBV_MTU_4096), 4096);
        assert_eq!(mtu_bytes(sys::IBV_MTU_1024), 1024);
        assert_eq!(width_lanes(2), 4);
        assert_eq!(speed(32, 0), ("EDR", 25.0));
        assert_eq!(speed(0, 256).0, "XDR");
        assert_eq!(format_guid(0x0002_c903_0001_0203), "0002:c903:0001:0203");
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[192, 168, 77, 1]);
        assert_eq!(format_gid(&raw), "0000:0000:0000:0000:0000:ffff:c0a8:4d01");
    }

    #[test]
    fn live_probe_is_a_list_or_a_reason() {
        match probe(&SysRoot::default()) {
            Ok(devs) => {
                for d in &devs {
                    assert!(d.attrs.max_qp_wr > 0, "{d:?}");
                }
            }
            Err(reason) => crate::report_skip(&format!("no RDMA on this machine: {reason}")),
        }
    }
}
