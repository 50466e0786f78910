//! Owning wrappers over the raw verbs of `ibverbs-sys`: device list, device context,
//! protection domain, completion queue and RC queue pair. Each object is released in
//! `Drop`, children borrow their parent so they cannot outlive it, and every verb that
//! fails comes back as a typed [`RdmaError`] naming the verb and the device.

use std::ffi::CStr;
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;

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

    pub fn open(&self, i: usize) -> Result<Context<'_>, RdmaError> {
        assert!(i < self.len);
        let name = self.name(i);
        // SAFETY: `i < len`, so the slot holds a valid device pointer owned by the list.
        let ctx = unsafe { sys::ibv_open_device(*self.list.as_ptr().add(i)) };
        match NonNull::new(ctx) {
            Some(ctx) => Ok(Context { ctx, name, _list: PhantomData }),
            None => Err(RdmaError::OpenDevice { device: name, source: io::Error::last_os_error() }),
        }
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from `ibv_get_device_list` and is freed once. Contexts
        // borrow the list, so none is open past this point.
        unsafe { sys::ibv_free_device_list(self.list.as_ptr()) }
    }
}

/// An open device (`ibv_context`).
#[derive(Debug)]
pub struct Context<'list> {
    ctx: NonNull<sys::ibv_context>,
    name: String,
    _list: PhantomData<&'list DeviceList>,
}

/// One populated GID table entry.
#[derive(Debug, Clone)]
pub struct GidEntry {
    pub raw: [u8; 16],
    pub gid_type: u32,
    pub ndev_ifindex: u32,
}

impl Context<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn query_device(&self) -> Result<sys::ibv_device_attr, RdmaError> {
        let mut attr = sys::ibv_device_attr::default();
        // SAFETY: the context is open and `attr` is a writable `ibv_device_attr`.
        let ret = unsafe { sys::ibv_query_device(self.ctx.as_ptr(), &mut attr) };
        if ret != 0 {
            return Err(RdmaError::QueryDevice { device: self.name.clone(), source: errno_or(ret) });
        }
        Ok(attr)
    }

    pub fn query_port(&self, port: u8) -> Result<sys::ibv_port_attr, RdmaError> {
        let mut attr = sys::ibv_port_attr::default();
        // SAFETY: the exported `ibv_query_port` fills the compat layout, which is a prefix
        // of `ibv_port_attr`; verbs.h's inline wrapper passes a zeroed `ibv_port_attr`
        // cast the same way when the provider has no extended query.
        let ret = unsafe { sys::ibv_query_port(self.ctx.as_ptr(), port, (&mut attr as *mut sys::ibv_port_attr).cast()) };
        if ret != 0 {
            return Err(RdmaError::QueryPort { device: self.name.clone(), port, source: errno_or(ret) });
        }
        Ok(attr)
    }

    /// The GID at `index`, or `Ok(None)` for an empty slot.
    pub fn query_gid(&self, port: u8, index: u32) -> Result<Option<GidEntry>, RdmaError> {
        let mut entry = sys::ibv_gid_entry::default();
        // SAFETY: the context is open; `entry` is writable and its size is passed so the
        // library writes no more than `size_of::<ibv_gid_entry>()` bytes.
        let ret = unsafe {
            sys::_ibv_query_gid_ex(self.ctx.as_ptr(), u32::from(port), index, &mut entry, 0, std::mem::size_of::<sys::ibv_gid_entry>())
        };
        if ret == libc::ENODATA {
            return Ok(None);
        }
        if ret != 0 {
            return Err(RdmaError::QueryGid { device: self.name.clone(), port, index, source: errno_or(ret) });
        }
        // SAFETY: every bit pattern of the 16-byte union is a valid `raw` array.
        let raw = unsafe { entry.gid.raw };
        Ok(Some(GidEntry { raw, gid_type: entry.gid_type, ndev_ifindex: entry.ndev_ifindex }))
    }

    pub fn alloc_pd(&self) -> Result<Pd<'_>, RdmaError> {
        // SAFETY: the context is open; the PD is released in `Pd::drop` before the
        // context closes (it borrows the context).
        let pd = unsafe { sys::ibv_alloc_pd(self.ctx.as_ptr()) };
        match NonNull::new(pd) {
            Some(pd) => Ok(Pd { pd, ctx: self }),
            None => Err(RdmaError::AllocPd { device: self.name.clone(), source: io::Error::last_os_error() }),
        }
    }

    pub fn create_cq(&self, cqe: i32) -> Result<Cq<'_>, RdmaError> {
        // SAFETY: the context is open; no completion channel and no user context are
        // attached; the CQ is destroyed in `Cq::drop` before the context closes.
        let cq = unsafe { sys::ibv_create_cq(self.ctx.as_ptr(), cqe, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        match NonNull::new(cq) {
            Some(cq) => Ok(Cq { cq, _ctx: PhantomData }),
            None => Err(RdmaError::CreateCq { device: self.name.clone(), cqe, source: io::Error::last_os_error() }),
        }
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by `ibv_open_device`, closed once; PDs, CQs and QPs borrow the
        // context and are gone by now.
        unsafe { sys::ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd<'ctx> {
    pd: NonNull<sys::ibv_pd>,
    ctx: &'ctx Context<'ctx>,
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

impl<'ctx> Pd<'ctx> {
    /// Creates an RC queue pair on `cq` (send and receive) and returns it with the
    /// capacities the provider granted, which may exceed those asked for.
    pub fn create_rc_qp<'pd>(&'pd self, cq: &'pd Cq<'ctx>, caps: QpCaps) -> Result<(Qp<'pd>, QpCaps), RdmaError> {
        let mut init = sys::ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.cq.as_ptr(),
            recv_cq: cq.cq.as_ptr(),
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
        // SAFETY: the PD and CQ are live (borrowed for the QP's lifetime) and `init` is a
        // fully initialised attribute block the library reads and updates with the
        // granted capacities.
        let qp = unsafe { sys::ibv_create_qp(self.pd.as_ptr(), &mut init) };
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
                Ok((Qp { qp, _pd: PhantomData }, granted))
            }
            None => Err(RdmaError::CreateQp { device: self.ctx.name.clone(), source: io::Error::last_os_error() }),
        }
    }
}

impl Drop for Pd<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated by `ibv_alloc_pd`, freed once; QPs borrow the PD and are gone.
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq<'ctx> {
    cq: NonNull<sys::ibv_cq>,
    _ctx: PhantomData<&'ctx Context<'ctx>>,
}

impl Drop for Cq<'_> {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_cq`, destroyed once; QPs using it borrow it and
        // are destroyed first.
        unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// A queue pair.
#[derive(Debug)]
pub struct Qp<'pd> {
    qp: NonNull<sys::ibv_qp>,
    _pd: PhantomData<&'pd Pd<'pd>>,
}

impl Drop for Qp<'_> {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_qp`, destroyed once, before its PD and CQ.
        unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
    }
}
