//! Owning wrappers over the raw verbs of `ibverbs-sys`: device list, device context,
//! protection domain, completion queue, RC queue pair and memory registrations. Each
//! object is released in `Drop`, and every child holds a counted reference to its parents
//! (a QP to its PD and CQ, a CQ and a PD to their context, a registration to its PD and
//! its memory), so it never outlives them, whichever thread keeps it for however long (a
//! persistent worker, a session). Every verb that fails comes back as a typed
//! [`RdmaError`] naming the verb and the device.
//!
//! Work requests name memory the NIC reads or writes after the post returns: posting is
//! `unsafe` ([`Qp::post_send`]), with the contract that the memory stays valid and
//! untouched until the request's completion is polled.

use std::ffi::CStr;
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use ibverbs_sys as sys;

/// A failed verb, named after the operation.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("no RDMA support in the kernel (ibv_get_device_list: ENOSYS)")]
    Unsupported,
    #[error("ibv_get_device_list failed: {0}")]
    GetDeviceList(#[source] io::Error),
    #[error("ibv_open_device({device}) failed: {source}")]
    OpenDevice { device: String, source: io::Error },
    #[error("ibv_query_device({device}) failed: {source}")]
    QueryDevice { device: String, source: io::Error },
    #[error("ibv_query_port({device}, port {port}) failed: {source}")]
    QueryPort { device: String, port: u8, source: io::Error },
    #[error("ibv_query_gid_ex({device}, port {port}, index {index}) failed: {source}")]
    QueryGid { device: String, port: u8, index: u32, source: io::Error },
    #[error("ibv_alloc_pd({device}) failed: {source}")]
    AllocPd { device: String, source: io::Error },
    #[error("ibv_create_cq({device}, {cqe} entries) failed: {source}")]
    CreateCq { device: String, cqe: i32, source: io::Error },
    #[error("ibv_create_qp({device}) failed: {source}")]
    CreateQp { device: String, source: io::Error },
    #[error("no RDMA device named {device} (found: {found})")]
    NoDevice { device: String, found: String },
    #[error("{device} port {port} is not active (state {state}): check the link and `ferryctl doctor`")]
    PortNotActive { device: String, port: u8, state: u32 },
    #[error("ibv_reg_mr({device}, {len} bytes) failed: {source}")]
    RegMr { device: String, len: usize, source: io::Error },
    #[error("mapping {what} for RDMA registration failed: {source}")]
    Map { what: String, source: io::Error },
    #[error("ibv_modify_qp({device}, QP {qpn} to {state}) failed: {source}")]
    ModifyQp { device: String, qpn: u32, state: &'static str, source: io::Error },
    #[error("{device} path MTU {mtu} is not one of 256, 512, 1024, 2048, 4096")]
    Mtu { device: String, mtu: u32 },
    #[error("ibv_post_send({device}, QP {qpn}) failed: {source}")]
    PostSend { device: String, qpn: u32, source: io::Error },
    #[error("ibv_post_recv({device}, QP {qpn}) failed: {source}")]
    PostRecv { device: String, qpn: u32, source: io::Error },
    #[error("ibv_poll_cq({device}) failed")]
    PollCq { device: String },
    #[error("{op}({device}) failed: {source}")]
    CqEvent { device: String, op: &'static str, source: io::Error },
}

/// Verbs return either NULL with errno set, or a positive errno value.
fn errno_or(ret: i32) -> io::Error {
    if ret > 0 { io::Error::from_raw_os_error(ret) } else { io::Error::last_os_error() }
}

/// The list from `ibv_get_device_list`.
#[derive(Debug)]
pub struct DeviceList {
    list: NonNull<*mut sys::ibv_device>,
    len: usize,
}

impl DeviceList {
    pub fn get() -> Result<Self, RdmaError> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer; the call returns NULL or an array of `n`
        // device pointers that we own until `ibv_free_device_list`.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        match NonNull::new(list) {
            Some(list) => Ok(Self { list, len: n.max(0) as usize }),
            None => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOSYS) { Err(RdmaError::Unsupported) } else { Err(RdmaError::GetDeviceList(e)) }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device's kernel name (`mlx5_0`, `rxe0`).
    pub fn name(&self, i: usize) -> String {
        assert!(i < self.len);
        // SAFETY: `i < len`, so the slot holds a valid device pointer owned by the list,
        // and `ibv_get_device_name` returns a NUL-terminated string owned by the device.
        unsafe {
            let dev = *self.list.as_ptr().add(i);
            CStr::from_ptr(sys::ibv_get_device_name(dev)).to_string_lossy().into_owned()
        }
    }

    /// Opens device `i`. The context stays usable after the list is freed (libibverbs:
    /// an opened device remains valid once its list is gone).
    pub fn open(&self, i: usize) -> Result<Context, RdmaError> {
        assert!(i < self.len);
        let name = self.name(i);
        // SAFETY: `i < len`, so the slot holds a valid device pointer owned by the list.
        let ctx = unsafe { sys::ibv_open_device(*self.list.as_ptr().add(i)) };
        match NonNull::new(ctx) {
            Some(ctx) => Ok(Context { inner: Arc::new(CtxInner { ctx, name }) }),
            None => Err(RdmaError::OpenDevice { device: name, source: io::Error::last_os_error() }),
        }
    }
}

impl DeviceList {
    /// Opens the device called `name`.
    pub fn open_by_name(&self, name: &str) -> Result<Context, RdmaError> {
        match (0..self.len).find(|&i| self.name(i) == name) {
            Some(i) => self.open(i),
            None => Err(RdmaError::NoDevice {
                device: name.to_string(),
                found: (0..self.len).map(|i| self.name(i)).collect::<Vec<_>>().join(", "),
            }),
        }
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from `ibv_get_device_list` and is freed once; contexts
        // opened from it stay valid (libibverbs' contract for `ibv_free_device_list`).
        unsafe { sys::ibv_free_device_list(self.list.as_ptr()) }
    }
}

#[derive(Debug)]
struct CtxInner {
    ctx: NonNull<sys::ibv_context>,
    name: String,
}

/// An open device (`ibv_context`), shared by everything made on it.
#[derive(Debug, Clone)]
pub struct Context {
    inner: Arc<CtxInner>,
}

/// One populated GID table entry.
#[derive(Debug, Clone)]
pub struct GidEntry {
    pub raw: [u8; 16],
    pub gid_type: u32,
    pub ndev_ifindex: u32,
}

impl Context {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn raw(&self) -> *mut sys::ibv_context {
        self.inner.ctx.as_ptr()
    }

    pub fn query_device(&self) -> Result<sys::ibv_device_attr, RdmaError> {
        let mut attr = sys::ibv_device_attr::default();
        // SAFETY: the context is open and `attr` is a writable `ibv_device_attr`.
        let ret = unsafe { sys::ibv_query_device(self.raw(), &mut attr) };
        if ret != 0 {
            return Err(RdmaError::QueryDevice { device: self.name().to_string(), source: errno_or(ret) });
        }
        Ok(attr)
    }

    pub fn query_port(&self, port: u8) -> Result<sys::ibv_port_attr, RdmaError> {
        let mut attr = sys::ibv_port_attr::default();
        // SAFETY: the exported `ibv_query_port` fills the compat layout, which is a prefix
        // of `ibv_port_attr`; verbs.h's inline wrapper passes a zeroed `ibv_port_attr`
        // cast the same way when the provider has no extended query.
        let ret = unsafe { sys::ibv_query_port(self.raw(), port, (&mut attr as *mut sys::ibv_port_attr).cast()) };
        if ret != 0 {
            return Err(RdmaError::QueryPort { device: self.name().to_string(), port, source: errno_or(ret) });
        }
        Ok(attr)
    }

    /// The GID at `index`, or `Ok(None)` for an empty slot.
    pub fn query_gid(&self, port: u8, index: u32) -> Result<Option<GidEntry>, RdmaError> {
        let mut entry = sys::ibv_gid_entry::default();
        // SAFETY: the context is open; `entry` is writable and its size is passed so the
        // library writes no more than `size_of::<ibv_gid_entry>()` bytes.
        let ret =
            unsafe { sys::_ibv_query_gid_ex(self.raw(), u32::from(port), index, &mut entry, 0, std::mem::size_of::<sys::ibv_gid_entry>()) };
        if ret == libc::ENODATA {
            return Ok(None);
        }
        if ret != 0 {
            return Err(RdmaError::QueryGid { device: self.name().to_string(), port, index, source: errno_or(ret) });
        }
        // SAFETY: every bit pattern of the 16-byte union is a valid `raw` array.
        let raw = unsafe { entry.gid.raw };
        Ok(Some(GidEntry { raw, gid_type: entry.gid_type, ndev_ifindex: entry.ndev_ifindex }))
    }

    /// The port's state, LID and active MTU, or `PortNotActive`.
    pub fn active_port(&self, port: u8) -> Result<PortInfo, RdmaError> {
        let a = self.query_port(port)?;
        if a.state != sys::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::PortNotActive { device: self.name().to_string(), port, state: a.state });
        }
        Ok(PortInfo { lid: a.lid, active_mtu: mtu_bytes(a.active_mtu) })
    }

    pub fn alloc_pd(&self) -> Result<Pd, RdmaError> {
        // SAFETY: the context is open; the PD keeps a reference to it and is released in
        // `PdInner::drop`, before the context can close.
        let pd = unsafe { sys::ibv_alloc_pd(self.raw()) };
        match NonNull::new(pd) {
            Some(pd) => Ok(Pd { inner: Arc::new(PdInner { pd, ctx: self.inner.clone() }) }),
            None => Err(RdmaError::AllocPd { device: self.name().to_string(), source: io::Error::last_os_error() }),
        }
    }

    pub fn create_cq(&self, cqe: i32) -> Result<Cq, RdmaError> {
        self.cq(cqe, None)
    }

    /// A CQ with a completion channel of its own: a thread with nothing to poll can sleep
    /// until the next completion ([`Cq::arm`], [`Cq::wait`]) instead of spinning, which
    /// on Soft-RoCE takes the CPU from the kernel threads doing the work.
    pub fn create_waitable_cq(&self, cqe: i32) -> Result<Cq, RdmaError> {
        let err = |op, source| RdmaError::CqEvent { device: self.name().to_string(), op, source };
        // SAFETY: the context is open; the channel keeps a reference to it and is
        // destroyed in `ChannelInner::drop`, after the CQ that holds it.
        let ch = unsafe { sys::ibv_create_comp_channel(self.raw()) };
        let ch = NonNull::new(ch).ok_or_else(|| err("ibv_create_comp_channel", io::Error::last_os_error()))?;
        let ch = Arc::new(ChannelInner { ch, _ctx: self.inner.clone() });
        // Non-blocking: a wait that finds no event (it was consumed, or it is spurious)
        // returns instead of blocking in `ibv_get_cq_event`.
        let fd = ch.fd();
        // SAFETY: `fd` is the channel's open descriptor for as long as `ch` lives.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(err("fcntl(O_NONBLOCK) on the completion channel", io::Error::last_os_error()));
        }
        self.cq(cqe, Some(ch))
    }

    fn cq(&self, cqe: i32, channel: Option<Arc<ChannelInner>>) -> Result<Cq, RdmaError> {
        let ch = channel.as_ref().map_or(std::ptr::null_mut(), |c| c.ch.as_ptr());
        // SAFETY: the context is open; `ch` is null or a live channel of this context,
        // which the CQ keeps alive (`CqInner::channel`); no user context is attached; the
        // CQ keeps a reference to the context and is destroyed in `CqInner::drop`, before
        // the context can close.
        let cq = unsafe { sys::ibv_create_cq(self.raw(), cqe, std::ptr::null_mut(), ch, 0) };
        match NonNull::new(cq) {
            Some(cq) => Ok(Cq { inner: Arc::new(CqInner { cq, device: self.name().to_string(), channel, _ctx: self.inner.clone() }) }),
            None => Err(RdmaError::CreateCq { device: self.name().to_string(), cqe, source: io::Error::last_os_error() }),
        }
    }
}

#[derive(Debug)]
struct ChannelInner {
    ch: NonNull<sys::ibv_comp_channel>,
    _ctx: Arc<CtxInner>,
}

impl ChannelInner {
    fn fd(&self) -> i32 {
        // SAFETY: the channel is live; `fd` is set at creation and never changes.
        unsafe { (*self.ch.as_ptr()).fd }
    }
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_comp_channel`, destroyed once; the only CQ on it
        // held this and is destroyed by now, its events all acknowledged (`Cq::wait`).
        unsafe { sys::ibv_destroy_comp_channel(self.ch.as_ptr()) };
    }
}

// SAFETY: a channel is a descriptor and a reference count that libibverbs manages; its
// verbs may be called from any thread.
unsafe impl Send for ChannelInner {}
// SAFETY: as above.
unsafe impl Sync for ChannelInner {}

impl Drop for CtxInner {
    fn drop(&mut self) {
        // SAFETY: opened by `ibv_open_device`, closed once; PDs, CQs and QPs hold a
        // reference to this and are gone by now.
        unsafe { sys::ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// What a connection needs from an active port.
#[derive(Debug, Clone, Copy)]
pub struct PortInfo {
    pub lid: u16,
    /// Bytes.
    pub active_mtu: u32,
}

fn mtu_bytes(m: sys::ibv_mtu) -> u32 {
    match m {
        sys::IBV_MTU_256 => 256,
        sys::IBV_MTU_512 => 512,
        sys::IBV_MTU_1024 => 1024,
        sys::IBV_MTU_2048 => 2048,
        _ => 4096,
    }
}

fn mtu_enum(device: &str, bytes: u32) -> Result<sys::ibv_mtu, RdmaError> {
    Ok(match bytes {
        256 => sys::IBV_MTU_256,
        512 => sys::IBV_MTU_512,
        1024 => sys::IBV_MTU_1024,
        2048 => sys::IBV_MTU_2048,
        4096 => sys::IBV_MTU_4096,
        mtu => return Err(RdmaError::Mtu { device: device.to_string(), mtu }),
    })
}

// SAFETY: libibverbs objects may be used from any thread ("all verbs are thread safe",
// rdma-core's libibverbs documentation); a context is only read after creation.
unsafe impl Send for CtxInner {}
// SAFETY: as above.
unsafe impl Sync for CtxInner {}
// SAFETY: as above; the PD handle is only passed to verbs.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}
// SAFETY: as above; providers serialise polls of one CQ internally.
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}
// SAFETY: as above; a QP is posted to by the one thread that owns it (`&mut self`).
unsafe impl Send for Qp {}
// SAFETY: a batch's raw pointers (`next`, `sg_list`) are null outside `post_send`, which
// links them into the batch's own vectors and clears the batch before it returns; the
// SGEs' addresses are plain numbers. Moving a batch moves everything it refers to.
unsafe impl Send for SendBatch<'_> {}
// SAFETY: an MR is immutable after registration; its keys are plain numbers.
unsafe impl Send for Mr<'_> {}
// SAFETY: as above.
unsafe impl Sync for Mr<'_> {}

#[derive(Debug)]
struct PdInner {
    pd: NonNull<sys::ibv_pd>,
    ctx: Arc<CtxInner>,
}

/// A protection domain, shared by the QPs and registrations made in it.
#[derive(Debug, Clone)]
pub struct Pd {
    inner: Arc<PdInner>,
}

/// Capacities of a queue pair, as asked for or as granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

impl Pd {
    fn device(&self) -> String {
        self.inner.ctx.name.clone()
    }

    /// Creates an RC queue pair on `cq` (send and receive) and returns it with the
    /// capacities the provider granted, which may exceed those asked for.
    pub fn create_rc_qp(&self, cq: &Cq, caps: QpCaps) -> Result<(Qp, QpCaps), RdmaError> {
        let mut init = sys::ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.inner.cq.as_ptr(),
            recv_cq: cq.inner.cq.as_ptr(),
            srq: std::ptr::null_mut(),
            cap: sys::ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: caps.max_recv_wr,
                max_send_sge: caps.max_send_sge,
                max_recv_sge: caps.max_recv_sge,
                max_inline_data: caps.max_inline_data,
            },
            qp_type: sys::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the PD and CQ are live (the QP keeps references to both) and `init` is a
        // fully initialised attribute block the library reads and updates with the
        // granted capacities.
        let qp = unsafe { sys::ibv_create_qp(self.inner.pd.as_ptr(), &mut init) };
        match NonNull::new(qp) {
            Some(qp) => {
                let c = init.cap;
                let granted = QpCaps {
                    max_send_wr: c.max_send_wr,
                    max_recv_wr: c.max_recv_wr,
                    max_send_sge: c.max_send_sge,
                    max_recv_sge: c.max_recv_sge,
                    max_inline_data: c.max_inline_data,
                };
                Ok((Qp { qp, device: self.device(), _pd: self.inner.clone(), _cq: cq.inner.clone() }, granted))
            }
            None => Err(RdmaError::CreateQp { device: self.device(), source: io::Error::last_os_error() }),
        }
    }

    /// Registers `mem` for local reads only: the NIC may gather from it into the work
    /// requests this side posts, and nothing else. The borrow keeps the memory mapped for
    /// as long as the registration lives.
    pub fn register_read<'a>(&self, mem: &'a [u8]) -> Result<Mr<'a>, RdmaError> {
        // SAFETY: `mem` is borrowed for the MR's lifetime, so it stays mapped; without a
        // write flag the NIC only reads it (the kernel pins it without FOLL_WRITE).
        unsafe { self.reg(mem.as_ptr().cast_mut(), mem.len(), 0) }
    }

    /// Maps the first `len` bytes of `file` shared and read-write, and registers them for
    /// RDMA WRITEs from the peer (`IBV_ACCESS_REMOTE_WRITE`). The memory is reachable only
    /// through the NIC while registered; [`RemoteRegion`] gives no Rust view of it, so a
    /// write landing at any moment races with nothing. Read the file after dropping it.
    pub fn register_remote_write(&self, file: &std::fs::File, len: usize) -> Result<RemoteRegion, RdmaError> {
        if len == 0 {
            return Ok(RemoteRegion { mr: None, _map: None });
        }
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(file)
            .map_err(|source| RdmaError::Map { what: format!("{len} bytes of the destination"), source })?;
        let access = (sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE).0;
        // SAFETY: the mapping is owned by the returned region and unmapped only after the
        // MR is deregistered (field order in `RemoteRegion`); no reference to its bytes is
        // ever handed out while the NIC may write them.
        let mr = unsafe { self.reg(map.as_mut_ptr(), len, access) }?;
        Ok(RemoteRegion { mr: Some(mr), _map: Some(map) })
    }

    /// Maps the first `len` bytes of `file` shared (read-only, or read-write when `file`
    /// is open read-write) and registers them for the NIC to gather from (local reads
    /// only): guest memory sent without a copy. Other processes may write the file at any
    /// time, so [`LocalRegion`] gives no Rust view of it, only SGEs. Before Linux 6.2 the
    /// kernel pins even a read-only registration for writing, which a read-only shared
    /// mapping refuses (EFAULT): there only a read-write descriptor registers.
    pub fn register_local_read(&self, file: &std::fs::File, len: usize) -> Result<LocalRegion, RdmaError> {
        self.register_file_read(file, len, 0)
    }

    /// [`Pd::register_local_read`], and readable by the peer too: its RDMA READs, through
    /// a QP that grants them ([`Grant::RemoteRead`]), under this region's rkey. Nothing may
    /// write it through the NIC.
    pub fn register_remote_read(&self, file: &std::fs::File, len: usize) -> Result<LocalRegion, RdmaError> {
        self.register_file_read(file, len, sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0)
    }

    fn register_file_read(&self, file: &std::fs::File, len: usize, access: u32) -> Result<LocalRegion, RdmaError> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        if len == 0 {
            return Ok(LocalRegion { mr: None, _map: None });
        }
        let writable = fcntl(file, FcntlArg::F_GETFL).is_ok_and(|f| OFlag::from_bits_truncate(f) & OFlag::O_ACCMODE == OFlag::O_RDWR);
        let opts = memmap2::MmapOptions::new().len(len).to_owned();
        let map = if writable { opts.map_raw(file) } else { opts.map_raw_read_only(file) }
            .map_err(|source| RdmaError::Map { what: format!("{len} bytes of guest memory"), source })?;
        // SAFETY: the mapping is owned by the returned region and unmapped only after the
        // MR is deregistered (field order in `LocalRegion`). Neither access flag lets the
        // NIC write it (local or remote reads only), and no Rust reference to its bytes is
        // ever made.
        let mr = unsafe { self.reg(map.as_mut_ptr(), len, access) }?;
        Ok(LocalRegion { mr: Some(mr), _map: Some(map) })
    }

    /// Registers `arena` for local access (the NIC gathers from it) and cuts it into
    /// owned slots of `size` bytes: the CPU fills a slot through `&mut`, and a work request
    /// gathers from it ([`RegSlot::sge`]) once it has moved out of the CPU's hands. The
    /// registration lasts as long as any slot, and the mapping longer still.
    pub fn register_slots(&self, arena: crate::memmap::Arena, size: usize) -> Result<Vec<RegSlot>, RdmaError> {
        let (base, len) = (arena.as_slice().as_ptr().cast_mut(), arena.len());
        let slots = arena.into_slots(size);
        let Some(owner) = slots.first().map(|s| s.owner()) else { return Ok(Vec::new()) };
        // SAFETY: the mapping stays alive as long as the registration: `MrOwned` holds a
        // reference to it and drops it after deregistering. The CPU touches it only through
        // the slots, each borrowed exclusively, and the NIC only reads it.
        let mr = unsafe { self.reg(base, len, sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0) }?;
        let mr = Arc::new(MrOwned { mr: mr.into_raw_static(), _map: owner });
        Ok(slots.into_iter().map(|slot| RegSlot { mr: mr.clone(), slot }).collect())
    }

    /// # Safety
    ///
    /// `addr..addr + len` must stay mapped for the life of the returned MR, and if
    /// `access` lets the NIC write it, no Rust reference to those bytes may be used while
    /// the MR lives.
    unsafe fn reg<'a>(&self, addr: *mut u8, len: usize, access: u32) -> Result<Mr<'a>, RdmaError> {
        // SAFETY: the PD is live; the caller guarantees the memory for the MR's lifetime.
        let mr = unsafe { sys::ibv_reg_mr(self.inner.pd.as_ptr(), addr.cast(), len, access as i32) };
        match NonNull::new(mr) {
            Some(mr) => Ok(Mr { mr, len, _pd: self.inner.clone(), _mem: PhantomData }),
            None => Err(RdmaError::RegMr { device: self.device(), len, source: io::Error::last_os_error() }),
        }
    }
}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: allocated by `ibv_alloc_pd`, freed once; QPs and MRs hold a reference to
        // this and are gone.
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr<'a> {
    mr: NonNull<sys::ibv_mr>,
    len: usize,
    _pd: Arc<PdInner>,
    _mem: PhantomData<&'a [u8]>,
}

impl<'a> Mr<'a> {
    /// The registration with its borrow given up: the caller keeps the memory alive
    /// otherwise (see `MrOwned`).
    fn into_raw_static(self) -> Mr<'static> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: moving the fields out of a value that is never dropped: nothing is
        // deregistered or released twice.
        let pd = unsafe { std::ptr::read(&this._pd) };
        Mr { mr: this.mr, len: this.len, _pd: pd, _mem: PhantomData }
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is registered until drop; the library never changes its keys.
        unsafe { self.mr.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as in `lkey`.
        unsafe { self.mr.as_ref().rkey }
    }

    /// The registered address, as the NIC knows it.
    pub fn addr(&self) -> u64 {
        // SAFETY: as in `lkey`.
        unsafe { self.mr.as_ref().addr as u64 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A scatter/gather entry for `len` bytes at `offset` in this region.
    pub fn sge(&self, offset: usize, len: usize) -> Sge<'a> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "SGE {offset}+{len} outside a {}-byte MR", self.len);
        let len = u32::try_from(len).expect("an SGE is at most 4 GiB");
        Sge { raw: sys::ibv_sge { addr: self.addr() + offset as u64, length: len, lkey: self.lkey() }, _mem: PhantomData }
    }
}

impl Drop for Mr<'_> {
    fn drop(&mut self) {
        // SAFETY: registered by `ibv_reg_mr`, deregistered once, before its PD goes.
        let ret = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if ret != 0 {
            log::warn!("ibv_dereg_mr failed: {}", errno_or(ret));
        }
    }
}

/// A destination the peer writes into: a shared file mapping registered for remote
/// writes. Dropping it deregisters the MR first, then unmaps.
#[derive(Debug)]
pub struct RemoteRegion {
    mr: Option<Mr<'static>>,
    _map: Option<memmap2::MmapRaw>,
}

impl RemoteRegion {
    /// Address and rkey the peer writes to (zero for an empty region).
    pub fn addr(&self) -> u64 {
        self.mr.as_ref().map_or(0, |m| m.addr())
    }

    pub fn rkey(&self) -> u32 {
        self.mr.as_ref().map_or(0, |m| m.rkey())
    }
}

/// Memory the NIC gathers from in place ([`Pd::register_local_read`]): a shared file
/// mapping (read-only where the kernel allows), registered for local reads only, that
/// other processes write whenever they like. A work request
/// gathering from it sends whatever the bytes are when the NIC reads them; Rust never
/// reads them at all. Dropping it deregisters the MR first, then unmaps.
#[derive(Debug)]
pub struct LocalRegion {
    mr: Option<Mr<'static>>,
    _map: Option<memmap2::MmapRaw>,
}

impl LocalRegion {
    /// An SGE for `len` bytes at `offset` (within the registered length). The contract of
    /// [`Qp::post_send`] asks only that the region outlive the request's completion: its
    /// bytes are never the CPU's to keep unwritten.
    pub fn sge(&self, offset: usize, len: usize) -> Sge<'_> {
        let mr = self.mr.as_ref().expect("an SGE in an empty region");
        let s = mr.sge(offset, len);
        Sge { raw: s.raw, _mem: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.mr.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Address and rkey a peer reads from, for a region registered for remote reads
    /// ([`Pd::register_remote_read`]; zero for an empty region). Without that access the
    /// rkey lets the peer do nothing.
    pub fn addr(&self) -> u64 {
        self.mr.as_ref().map_or(0, |m| m.addr())
    }

    pub fn rkey(&self) -> u32 {
        self.mr.as_ref().map_or(0, |m| m.rkey())
    }
}

/// A registration whose memory is kept alive by the registration itself (a mapping it
/// holds a reference to). Deregistered first, then the mapping is let go.
#[derive(Debug)]
struct MrOwned {
    mr: Mr<'static>,
    _map: Arc<memmap2::MmapMut>,
}

/// An owned slot of a registered arena ([`Pd::register_slots`]).
#[derive(Debug)]
pub struct RegSlot {
    mr: Arc<MrOwned>,
    slot: crate::memmap::Slot,
}

impl RegSlot {
    /// An SGE for `len` bytes at `offset` of this slot. The entry borrows the slot: a work
    /// request built from it must be posted, and the slot kept from the CPU, until the
    /// request completes (the contract of [`Qp::post_send`]).
    pub fn sge(&self, offset: usize, len: usize) -> Sge<'_> {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.slot.len()),
            "SGE {offset}+{len} outside a {}-byte slot",
            self.slot.len()
        );
        let at = self.slot.as_ptr() as u64 - self.mr.mr.addr() + offset as u64;
        let s = self.mr.mr.sge(at as usize, len);
        Sge { raw: s.raw, _mem: PhantomData }
    }
}

impl std::ops::Deref for RegSlot {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.slot
    }
}

impl std::ops::DerefMut for RegSlot {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.slot
    }
}

/// One scatter/gather entry inside a registered region that lives for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct Sge<'a> {
    raw: sys::ibv_sge,
    _mem: PhantomData<&'a [u8]>,
}

/// What a send work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// RDMA WRITE to `remote_addr` under `rkey`: no completion at the peer.
    Write { remote_addr: u64, rkey: u32 },
    /// RDMA WRITE that also consumes a receive at the peer, which sees `imm`.
    WriteImm { remote_addr: u64, rkey: u32, imm: u32 },
    /// SEND into the peer's next receive, with `imm`.
    SendImm { imm: u32 },
    /// RDMA READ from `remote_addr` under `rkey` into the request's SGEs: the NIC *writes*
    /// them (see [`Qp::post_send`]), which must lie in memory registered for local writes.
    Read { remote_addr: u64, rkey: u32 },
}

/// Send work requests gathered for one `ibv_post_send` (one doorbell). Reused: pushing
/// allocates only while the batch grows past its largest size so far.
pub struct SendBatch<'a> {
    wrs: Vec<sys::ibv_send_wr>,
    sges: Vec<sys::ibv_sge>,
    first_sge: Vec<usize>,
    _mem: PhantomData<&'a [u8]>,
}

impl std::fmt::Debug for SendBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendBatch({} WRs, {} SGEs)", self.wrs.len(), self.sges.len())
    }
}

impl Default for SendBatch<'_> {
    fn default() -> Self {
        SendBatch { wrs: Vec::new(), sges: Vec::new(), first_sge: Vec::new(), _mem: PhantomData }
    }
}

impl<'a> SendBatch<'a> {
    /// Adds a work request gathering `sges`. `inline` copies the bytes into the WQE at
    /// post time (within the QP's inline limit); `signaled` asks for a completion.
    pub fn push(&mut self, wr_id: u64, op: SendOp, sges: &[Sge<'a>], signaled: bool, inline: bool) {
        // SAFETY: all-zero is a valid `ibv_send_wr` (null pointers, zero counts), which
        // the fields below then fill.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.num_sge = sges.len() as i32;
        let mut flags = 0;
        if signaled {
            flags |= sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if inline {
            flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.send_flags = flags;
        match op {
            SendOp::Write { remote_addr, rkey } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
            }
            SendOp::WriteImm { remote_addr, rkey, imm } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
                wr.__bindgen_anon_1.imm_data = imm.to_be();
            }
            SendOp::SendImm { imm } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
                wr.__bindgen_anon_1.imm_data = imm.to_be();
            }
            SendOp::Read { remote_addr, rkey } => {
                debug_assert!(!inline, "an RDMA READ has nothing to inline");
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
            }
        }
        self.first_sge.push(self.sges.len());
        self.sges.extend(sges.iter().map(|s| s.raw));
        self.wrs.push(wr);
    }

    pub fn len(&self) -> usize {
        self.wrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }

    pub fn clear(&mut self) {
        self.wrs.clear();
        self.sges.clear();
        self.first_sge.clear();
    }

    /// The batch emptied, for SGEs of another lifetime: its storage is kept, so a batch
    /// reused from chunk to chunk allocates only while it grows.
    pub fn recycle<'b>(mut self) -> SendBatch<'b> {
        self.clear();
        SendBatch { wrs: self.wrs, sges: self.sges, first_sge: self.first_sge, _mem: PhantomData }
    }
}

#[derive(Debug)]
struct CqInner {
    cq: NonNull<sys::ibv_cq>,
    device: String,
    /// Dropped (and the channel destroyed, if this was its last holder) after `drop`
    /// destroyed the CQ.
    channel: Option<Arc<ChannelInner>>,
    _ctx: Arc<CtxInner>,
}

/// A completion queue, shared by the QPs made on it.
#[derive(Debug, Clone)]
pub struct Cq {
    inner: Arc<CqInner>,
}

/// A work completion, read out of the CQ.
#[derive(Debug, Clone, Copy, Default)]
pub struct Completion {
    pub wr_id: u64,
    /// `IBV_WC_SUCCESS` (0) or the error status.
    pub status: u32,
    pub vendor_err: u32,
    pub opcode: u32,
    /// Immediate data of a receive, host order.
    pub imm: Option<u32>,
    pub qpn: u32,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }

    /// A receive (of a SEND or of a WRITE with immediate), as opposed to a send-side
    /// completion.
    pub fn is_recv(&self) -> bool {
        self.opcode & sys::ibv_wc_opcode::IBV_WC_RECV != 0
    }

    /// The completion's failure, if its status is not success.
    pub fn failure(&self) -> Option<WcFailure> {
        (!self.ok()).then(|| WcFailure { status: WcStatus::from(self.status), vendor_err: self.vendor_err, qpn: self.qpn })
    }
}

/// An `ibv_wc_status` other than success: those whose cause ferry can name, and the rest
/// by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    /// The QP had already failed; this work request was flushed.
    WrFlush,
    /// The peer's memory region refused the access.
    RemoteAccess,
    /// The peer stopped acknowledging.
    RetryExceeded,
    Other(u32),
}

impl From<u32> for WcStatus {
    fn from(s: u32) -> WcStatus {
        match s {
            sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlush,
            sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccess,
            sys::ibv_wc_status::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
            n => WcStatus::Other(n),
        }
    }
}

impl WcStatus {
    fn raw(self) -> u32 {
        match self {
            WcStatus::WrFlush => sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR,
            WcStatus::RemoteAccess => sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR,
            WcStatus::RetryExceeded => sys::ibv_wc_status::IBV_WC_RETRY_EXC_ERR,
            WcStatus::Other(n) => n,
        }
    }

    /// What the status usually means, for the message.
    fn hint(self) -> &'static str {
        match self {
            WcStatus::RetryExceeded => {
                ": the peer stopped acknowledging (it exited, or its queue pair was destroyed or moved to the error state)"
            }
            WcStatus::RemoteAccess => ": the peer's memory region refused the write (deregistered, or the wrong key)",
            WcStatus::WrFlush => ": the queue pair had already failed",
            WcStatus::Other(_) => "",
        }
    }
}

/// A work completion that failed: its status, the provider's vendor error and its QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WcFailure {
    pub status: WcStatus,
    pub vendor_err: u32,
    pub qpn: u32,
}

impl std::fmt::Display for WcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let raw = self.status.raw();
        // SAFETY: `ibv_wc_status_str` returns a static NUL-terminated string for any
        // status value (an unknown one gets "unknown").
        let name = unsafe { CStr::from_ptr(sys::ibv_wc_status_str(raw)) }.to_string_lossy();
        write!(f, "QP {} completed with status {raw} \"{name}\" (vendor error {:#x}){}", self.qpn, self.vendor_err, self.status.hint())
    }
}

impl Cq {
    /// Polls up to `out.len()` (at most 64) completions; returns how many were written.
    /// Providers lock the CQ, so a shared reference is enough (ferry polls each CQ from
    /// one thread).
    pub fn poll(&self, out: &mut [Completion]) -> Result<usize, RdmaError> {
        let mut wcs = [std::mem::MaybeUninit::<sys::ibv_wc>::uninit(); 64];
        let want = out.len().min(wcs.len());
        // SAFETY: `ibv_poll_cq` is static inline in verbs.h: it calls the provider's
        // `poll_cq` from the context's ops table, as here. The CQ is live, and `wcs` has
        // room for `want` entries, of which the provider writes the first `n`.
        let n = unsafe {
            let cq = self.inner.cq.as_ptr();
            let poll = (*(*cq).context).ops.poll_cq.expect("every provider implements poll_cq");
            poll(cq, want as i32, wcs.as_mut_ptr().cast())
        };
        if n < 0 {
            return Err(RdmaError::PollCq { device: self.inner.device.clone() });
        }
        for (o, wc) in out.iter_mut().zip(&wcs[..n as usize]) {
            // SAFETY: the provider initialised the first `n` entries.
            let wc = unsafe { wc.assume_init_ref() };
            let (status, vendor_err) = wc.error().unwrap_or((sys::ibv_wc_status::IBV_WC_SUCCESS, 0));
            *o = Completion {
                wr_id: wc.wr_id(),
                status,
                vendor_err,
                opcode: wc.opcode(),
                imm: wc.imm_data().map(u32::from_be),
                qpn: wc.qp_num,
            };
        }
        Ok(n as usize)
    }
}

impl Cq {
    /// The completion channel's descriptor (a CQ from [`Context::create_waitable_cq`]):
    /// readable once an armed CQ has an event, for a thread that waits in epoll among
    /// other things instead of in [`Cq::wait`]. It stays readable until the event is
    /// taken ([`Cq::wait`] with a zero timeout).
    pub fn channel_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        let ch = self.inner.channel.as_ref()?;
        // SAFETY: the channel's descriptor is open as long as the channel, which this CQ
        // keeps alive (`CqInner::channel`) at least as long as the returned borrow of it.
        Some(unsafe { std::os::fd::BorrowedFd::borrow_raw(ch.fd()) })
    }

    /// Asks for an event on the completion channel at the next completion. Without a
    /// channel (a CQ from [`Context::create_cq`]) there is nothing to arm.
    pub fn arm(&self) -> Result<(), RdmaError> {
        if self.inner.channel.is_none() {
            return Ok(());
        }
        // SAFETY: `ibv_req_notify_cq` is static inline in verbs.h: it calls the provider's
        // `req_notify_cq` from the context's ops table, as here, on a live CQ.
        let ret = unsafe {
            let cq = self.inner.cq.as_ptr();
            let notify = (*(*cq).context).ops.req_notify_cq.expect("every provider implements req_notify_cq");
            notify(cq, 0)
        };
        if ret != 0 {
            return Err(RdmaError::CqEvent { device: self.inner.device.clone(), op: "ibv_req_notify_cq", source: errno_or(ret) });
        }
        Ok(())
    }

    /// Sleeps until the armed CQ has an event, at most `timeout`; the event is consumed
    /// and acknowledged. True when one came. Poll the CQ afterwards either way (an event
    /// may be stale, and completions may have come without one). Without a channel this
    /// just sleeps `timeout` (capped at 1 ms).
    pub fn wait(&self, timeout: std::time::Duration) -> Result<bool, RdmaError> {
        let Some(ch) = &self.inner.channel else {
            std::thread::sleep(timeout.min(std::time::Duration::from_millis(1)));
            return Ok(false);
        };
        let err = |op, source| RdmaError::CqEvent { device: self.inner.device.clone(), op, source };
        let mut pfd = libc::pollfd { fd: ch.fd(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(err("poll on the completion channel", e)) };
        }
        if n == 0 {
            return Ok(false);
        }
        let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; the out pointers are valid.
        let ret = unsafe { sys::ibv_get_cq_event(ch.ch.as_ptr(), &mut cq, &mut ctx) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(false) } else { Err(err("ibv_get_cq_event", e)) };
        }
        // SAFETY: the event is for the only CQ on this channel, ours (live); acknowledged
        // at once, so destroying the CQ never waits on an unacknowledged event.
        unsafe { sys::ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }
}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_cq`, destroyed once; QPs using it hold a
        // reference to this and are destroyed first.
        unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// The peer's side of a connection, as exchanged over the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

/// How this side reaches the peer: the local port, the GID index for RoCE (`None` on
/// InfiniBand, which routes by LID) and the path MTU both sides support.
#[derive(Debug, Clone, Copy)]
pub struct PathSpec {
    pub port: u8,
    pub gid_index: Option<u8>,
    pub mtu: u32,
    /// RDMA READs in flight at once on the QP, each way: as the requester (what it may
    /// have outstanding) and as the responder (what it serves at once). At least 1, and
    /// within the device's `max_qp_init_rd_atom` and `max_qp_rd_atom`.
    pub rd_atomic: u8,
}

/// What a connected QP lets its peer do to this side's memory regions (with their rkey).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Nothing: the peer only receives this side's writes and sends.
    Nothing,
    /// RDMA WRITEs into regions registered for remote writes (a receiver).
    RemoteWrite,
    /// RDMA READs from regions registered for remote reads (a post-copy source serving
    /// faults without its CPU).
    RemoteRead,
}

/// A queue pair. It keeps its PD and CQ alive, and is destroyed before them.
#[derive(Debug)]
pub struct Qp {
    qp: NonNull<sys::ibv_qp>,
    device: String,
    _pd: Arc<PdInner>,
    _cq: Arc<CqInner>,
}

impl Qp {
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is live; `qp_num` is set at creation and never changes.
        unsafe { self.qp.as_ref().qp_num }
    }

    fn modify(&mut self, attr: &mut sys::ibv_qp_attr, mask: sys::ibv_qp_attr_mask, state: &'static str) -> Result<(), RdmaError> {
        // SAFETY: the QP is live and `attr` is a fully initialised attribute block; the
        // library reads only the fields `mask` names.
        let ret = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as i32) };
        if ret != 0 {
            return Err(RdmaError::ModifyQp { device: self.device.clone(), qpn: self.qpn(), state, source: errno_or(ret) });
        }
        Ok(())
    }

    /// RESET -> INIT -> RTR -> RTS, connected to `remote`. `grant` is what the peer may do
    /// to this side's regions through this QP (a receiver's QPs let it write; a sender's
    /// grant nothing).
    pub fn connect(&mut self, path: &PathSpec, local_psn: u32, remote: &Endpoint, grant: Grant) -> Result<(), RdmaError> {
        use sys::ibv_qp_attr_mask as m;
        // SAFETY: all-zero is a valid `ibv_qp_attr`; each step sets what its mask names.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = path.port;
        a.qp_access_flags = match grant {
            Grant::Nothing => 0,
            Grant::RemoteWrite => sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
            Grant::RemoteRead => sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
        };
        self.modify(&mut a, m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS, "INIT")?;

        // SAFETY: as above.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = mtu_enum(&self.device, path.mtu)?;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = path.rd_atomic.max(1);
        a.min_rnr_timer = 12; // 0.64 ms
        a.ah_attr.port_num = path.port;
        a.ah_attr.dlid = remote.lid;
        if let Some(gid_index) = path.gid_index {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = sys::ibv_gid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = gid_index;
            a.ah_attr.grh.hop_limit = 64;
        }
        let rtr = m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut a, rtr, "RTR")?;

        // SAFETY: as above.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = local_psn;
        // 4.096 us x 2^16 = 268 ms per try, 7 tries: a vanished peer fails the QP in
        // about 2 s rather than hanging it.
        a.timeout = 16;
        a.retry_cnt = 7;
        // 7 = retry forever on receiver-not-ready: credits keep that from happening, and
        // a slow receiver must not fail the transfer.
        a.rnr_retry = 7;
        a.max_rd_atomic = path.rd_atomic.max(1);
        let rts =
            m::IBV_QP_STATE | m::IBV_QP_TIMEOUT | m::IBV_QP_RETRY_CNT | m::IBV_QP_RNR_RETRY | m::IBV_QP_SQ_PSN | m::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut a, rts, "RTS")
    }

    /// Moves the QP to the error state: outstanding work requests complete as flushed and
    /// the peer's next operation on it fails.
    pub fn set_error(&mut self) -> Result<(), RdmaError> {
        // SAFETY: all-zero is a valid `ibv_qp_attr`; only the state is read.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, sys::ibv_qp_attr_mask::IBV_QP_STATE, "ERR")
    }

    /// Posts every work request in `batch` with one `ibv_post_send` (one doorbell), then
    /// clears it.
    ///
    /// # Safety
    ///
    /// The NIC reads the memory the requests' SGEs name after this returns, until each
    /// request completes: that memory must stay registered, mapped and unwritten until the
    /// completion covering the request has been polled from the QP's CQ (or the QP has
    /// been destroyed). Inline requests are copied at post time and need nothing after.
    /// Memory of a [`LocalRegion`] need only stay registered: no Rust code ever sees its
    /// bytes, so a write by another process while the NIC reads decides what is sent,
    /// nothing more. An RDMA READ ([`SendOp::Read`]) *writes* its SGEs' memory instead:
    /// besides staying registered (for local writes) and mapped, it must not be read or
    /// written through any Rust reference until the READ's completion has been polled (or
    /// the QP destroyed).
    pub unsafe fn post_send(&mut self, batch: &mut SendBatch<'_>) -> Result<(), RdmaError> {
        if batch.wrs.is_empty() {
            return Ok(());
        }
        let n = batch.wrs.len();
        let sges = batch.sges.as_mut_ptr();
        let wrs = batch.wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: `i < n` and `first_sge[i]` indexes `sges` (pushed together), so
            // both pointers stay inside their vectors, which are not touched until the
            // post returns.
            unsafe {
                let wr = wrs.add(i);
                (*wr).sg_list = sges.add(batch.first_sge[i]);
                (*wr).next = if i + 1 < n { wrs.add(i + 1) } else { std::ptr::null_mut() };
            }
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: `ibv_post_send` is static inline in verbs.h and calls the provider's
        // `post_send` from the context's ops table, as here. The QP is live; the list is
        // linked above; every SGE lies in a registered region alive for the batch's
        // lifetime (`Sge<'a>`), which is what the provider copies inline data from; the
        // caller keeps it so until the completions (this function's contract).
        let ret = unsafe {
            let qp = self.qp.as_ptr();
            let post = (*(*qp).context).ops.post_send.expect("every provider implements post_send");
            post(qp, wrs, &mut bad)
        };
        batch.clear();
        if ret != 0 {
            return Err(RdmaError::PostSend { device: self.device.clone(), qpn: self.qpn(), source: errno_or(ret) });
        }
        Ok(())
    }

    /// Posts one work request that names no memory (a zero-length WRITE, a SEND with only
    /// an immediate): nothing has to outlive the call, so this is safe.
    pub fn post_empty(&mut self, wr_id: u64, op: SendOp, signaled: bool) -> Result<(), RdmaError> {
        let mut batch = SendBatch::default();
        batch.push(wr_id, op, &[], signaled, false);
        // SAFETY: the request gathers no SGE, so no memory is read after the post.
        unsafe { self.post_send(&mut batch) }
    }

    /// Posts `count` receives without buffers (for WRITE with immediate and zero-length
    /// SENDs with immediate), `wr_id` on each.
    pub fn post_recvs(&mut self, wr_id: u64, count: usize) -> Result<(), RdmaError> {
        const BATCH: usize = 64;
        let mut left = count;
        while left > 0 {
            let n = left.min(BATCH);
            // SAFETY: all-zero is a valid `ibv_recv_wr` (no SGEs, no next).
            let mut wrs: [sys::ibv_recv_wr; BATCH] = unsafe { std::mem::zeroed() };
            let base = wrs.as_mut_ptr();
            for i in 0..n {
                // SAFETY: `i < n <= BATCH`: both pointers stay inside `wrs`.
                unsafe {
                    (*base.add(i)).wr_id = wr_id;
                    (*base.add(i)).next = if i + 1 < n { base.add(i + 1) } else { std::ptr::null_mut() };
                }
            }
            let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
            // SAFETY: `ibv_post_recv` is static inline and calls the provider's
            // `post_recv` from the ops table; the QP is live and the list is linked above
            // and outlives the call (the provider copies it into the queue).
            let ret = unsafe {
                let qp = self.qp.as_ptr();
                let post = (*(*qp).context).ops.post_recv.expect("every provider implements post_recv");
                post(qp, base, &mut bad)
            };
            if ret != 0 {
                return Err(RdmaError::PostRecv { device: self.device.clone(), qpn: self.qpn(), source: errno_or(ret) });
            }
            left -= n;
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_qp`, destroyed once, before its PD and CQ (whose
        // references it holds).
        unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
    }
}
