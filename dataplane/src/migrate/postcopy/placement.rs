//! The destination's post-copy state: which pages are still stale, which were placed,
//! the VMM's userfaultfd, and the faults waiting for the source.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use hw::uffd::{Fault, Resolved, UffdError, Userfault};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use zerocopy::IntoBytes;

use super::rdma::LaneWriter;
use super::{Mapping, PostcopyReport};
use crate::conn::{Cancel, SessionError, Violation};
use crate::digest::{Digest, Hashing};
use crate::encode::Decoder;
use crate::engine::PAGE;
use crate::lane::Payload;
use crate::migrate::{PageHashes, VmmError};
use crate::session::seal::Seal;
use crate::wire::{self, Encoding, Kind, Layout, RdmaRun};
use crate::worker::AtomicBits;

/// A stale page's content as it arrived.
enum Content<'a> {
    Bytes(&'a [u8]),
    Zero,
}

/// One region of the guest memory on the destination.
pub(super) struct Region {
    file: File,
    pub(super) size: u64,
    pages: u64,
    map: Mapping,
    stale: AtomicBits,
    claimed: AtomicBits,
    placed: AtomicBits,
    /// A guest thread faulted on the page while it was stale: its placer looks in
    /// `pending` (the other placers, nearly all of them, take no lock).
    waiting: AtomicBits,
    hashes: PageHashes,
}

/// What a zero page is placed from.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// The destination's post-copy state: which pages are still stale, which were placed, the
/// VMM's userfaultfd, and the faults waiting for the source.
pub(crate) struct Placement {
    pub(super) regions: Vec<Region>,
    uffd: Userfault,
    /// After RDMA pre-copy: every page placed is hashed with this key (see
    /// [`crate::migrate::dest::Landed`]).
    key: Option<crate::digest::DigestKey>,
    remaining: AtomicU64,
    pub(super) stale_pages: u64,
    /// Stale pages a guest thread waits for, and since when.
    pending: Mutex<HashMap<(u32, u64), Instant>>,
    /// The fault lane's sending half in the current attempt.
    link: Mutex<Option<LaneWriter>>,
    /// After RDMA rounds, once the source's QP is ready: faults are read with RDMA READs
    /// (see [`super::rdma`]) instead of fetched on the fault lane.
    reads: Mutex<Option<super::rdma::Reads>>,
    /// Pages RDMA READs brought (placed, or already placed by the push), and whether an
    /// attempt read any with them.
    read_pages: AtomicU64,
    reads_opened: AtomicBool,
    faults: AtomicU64,
    remote_faults: AtomicU64,
    by_fault: AtomicU64,
    by_push: AtomicU64,
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    switched: Instant,
    all_local: Mutex<Option<f64>>,
    /// Why the fault thread stopped, if it failed.
    failure: Mutex<Option<SessionError>>,
    /// Post-copy is over (done or failed): the fault thread waits for no placer.
    pub(super) stopping: AtomicBool,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement").field("regions", &self.regions.len()).field("remaining", &self.remaining).finish()
    }
}

impl Placement {
    /// Post-copy over `memory` (the regions' memfds, as handed to the VMM) with their page
    /// hashes from pre-copy (`landed`); `stale` lists the pages SWITCH named; `maps` is
    /// where the VMM mapped each region, registered with `uffd`. The registration is
    /// checked here.
    pub(crate) fn new(
        memory: &[File],
        landed: crate::migrate::dest::Landed,
        stale: &[RdmaRun],
        maps: &[Mapping],
        uffd: Userfault,
    ) -> Result<Placement, SessionError> {
        let refused = |e: VmmError| SessionError::from(Cancel::PostcopyRefused(e));
        if maps.len() != memory.len() {
            return Err(refused(VmmError::MappedRegions { mapped: maps.len(), has: memory.len() }));
        }
        let mut regions: Vec<Region> = Vec::with_capacity(memory.len());
        let crate::migrate::dest::Landed { hashes, key } = landed;
        for (i, ((m, h), map)) in memory.iter().zip(hashes).zip(maps).enumerate() {
            let size = m.metadata().map_err(|source| refused(VmmError::Region { region: i, source }))?.len();
            if map.len != size || map.addr % PAGE as u64 != 0 {
                return Err(refused(VmmError::Mapped { region: i, len: map.len, addr: map.addr, size }));
            }
            let file = m.try_clone().map_err(|source| refused(VmmError::Region { region: i, source }))?;
            let pages = crate::migrate::pages(size);
            regions.push(Region {
                file,
                size,
                pages,
                map: *map,
                // Built below from SWITCH's runs.
                stale: AtomicBits::new(0),
                claimed: AtomicBits::new(pages),
                placed: AtomicBits::new(pages),
                waiting: AtomicBits::new(pages),
                hashes: h,
            });
        }
        // SWITCH's runs, checked against the regions, as one bitmap; each region's words
        // become its stale bits.
        let pages: Vec<u64> = regions.iter().map(|r| r.pages).collect();
        let mut words = super::runs_to_bitmap(stale, &pages, Kind::Switch)?.into_iter();
        let mut n = 0;
        for reg in &mut regions {
            let w: Vec<u64> = words.by_ref().take(reg.pages.div_ceil(64) as usize).collect();
            n += w.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
            reg.stale = AtomicBits::from_words(w);
        }
        let pc = Placement {
            regions,
            uffd,
            key,
            remaining: AtomicU64::new(n),
            stale_pages: n,
            pending: Mutex::new(HashMap::new()),
            link: Mutex::new(None),
            reads: Mutex::new(None),
            read_pages: AtomicU64::new(0),
            reads_opened: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            remote_faults: AtomicU64::new(0),
            by_fault: AtomicU64::new(0),
            by_push: AtomicU64::new(0),
            latency: Mutex::new(crate::engine::latency_histogram()),
            switched: Instant::now(),
            all_local: Mutex::new(if n == 0 { Some(0.0) } else { None }),
            failure: Mutex::new(None),
            stopping: AtomicBool::new(false),
        };
        for i in 0..pc.regions.len() {
            pc.check_registration(i).map_err(refused)?;
        }
        Ok(pc)
    }

    /// Asks the kernel whether the userfaultfd covers region `i` in minor mode, on a page
    /// that is missing from the file: a hole if there is one, or else a stale page punched
    /// out (its content is fetched again anyway). Clean pages are never touched.
    fn check_registration(&self, i: usize) -> Result<(), VmmError> {
        let r = &self.regions[i];
        let io = |e: nix::errno::Errno| VmmError::Region { region: i, source: e.into() };
        let uffd = |source| VmmError::RegionUserfault { region: i, source };
        let hole = nix::unistd::lseek(&r.file, 0, nix::unistd::Whence::SeekHole).map_err(io)? as u64;
        let page = if hole < r.size {
            hole / PAGE as u64
        } else {
            // No hole: a stale page, punched out of the file.
            let Some(p) = (0..r.pages).find(|&p| r.stale.get(p)) else {
                // Every page present and none stale: a clean page, which mapping is harmless.
                return self.uffd.check_registered(r.map.addr).map_err(uffd);
            };
            use nix::fcntl::{FallocateFlags, fallocate};
            fallocate(
                &r.file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (p * PAGE as u64) as i64,
                PAGE as i64,
            )
            .map_err(io)?;
            p
        };
        self.uffd.check_registered(r.map.addr + page * PAGE as u64).map_err(uffd)
    }

    /// Pages placed are hashed with the session's key (after RDMA rounds).
    pub(super) fn keyed(&self) -> bool {
        self.key.is_some()
    }

    pub(super) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// The stale pages not claimed yet, as runs.
    pub(super) fn needed(&self) -> Vec<RdmaRun> {
        let mut out = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            let mut p = 0;
            while p < r.pages {
                if r.stale.get(p) && !r.claimed.get(p) {
                    let first = p;
                    while p < r.pages && p - first < u64::from(u32::MAX) && r.stale.get(p) && !r.claimed.get(p) {
                        p += 1;
                    }
                    out.push(RdmaRun { region: (i as u32).into(), pages: ((p - first) as u32).into(), first: first.into() });
                } else {
                    p += 1;
                }
            }
        }
        out
    }

    /// The digest of every page as placed (or as it arrived in pre-copy).
    pub(super) fn digest(&self) -> Digest {
        self.regions.iter().map(|r| r.hashes.fold()).sum()
    }

    /// Places the pages of one DATA frame that arrived on a post-copy lane (`by_fault`: the
    /// fault lane). Every page must be stale; one already placed is dropped.
    pub(crate) fn place_frame(
        &self,
        layout: &Layout,
        h: &wire::Header,
        payload: &Payload<'_>,
        dec: &mut Decoder,
        scratch: &mut Vec<u8>,
        by_fault: bool,
    ) -> Result<u64, SessionError> {
        let (encoding, region, offset, raw_len) = layout.check_data(h)?;
        let first = offset / PAGE as u64;
        let pages = u64::from(raw_len).div_ceil(PAGE as u64);
        let bytes = match encoding {
            Encoding::Raw => payload.contiguous(scratch),
            Encoding::Zero => &[][..],
            Encoding::Zstd => dec.zstd(payload.contiguous(scratch), raw_len)?,
        };
        for i in 0..pages {
            let content = match encoding {
                Encoding::Zero => Content::Zero,
                _ => {
                    let at = (i * PAGE as u64) as usize;
                    Content::Bytes(&bytes[at..(at + PAGE).min(bytes.len())])
                }
            };
            self.place(region, first + i, content, by_fault)?;
        }
        Ok(pages)
    }

    /// Places stale page `page` of region `r` unless it was placed already: claims it,
    /// writes it into the file, records its hash, and maps it into the guest (which wakes a
    /// thread waiting on it).
    fn place(&self, r: u32, page: u64, content: Content<'_>, by_fault: bool) -> Result<bool, SessionError> {
        let reg = &self.regions[r as usize];
        if !reg.stale.get(page) {
            return Err(Violation::NotStale { region: r, page }.into());
        }
        let won = reg.claimed.take(page);
        // Between the claim and the look at the waiting bit below (see `on_fault`).
        lockfree::order();
        if won {
            let off = page * PAGE as u64;
            let len = (reg.size - off).min(PAGE as u64) as usize;
            let h = self.key.as_ref().map_or(Hashing::Fast, Hashing::Keyed);
            let (bytes, digest) = match content {
                Content::Bytes(b) if b.len() == len => (b, Digest::of_page_with(h, r, page, b)),
                Content::Bytes(b) => return Err(Violation::PageLength { region: r, page, len: b.len(), want: len }.into()),
                Content::Zero => (&ZERO_PAGE[..len], Digest::of_zero_page_with(h, r, page, len)),
            };
            reg.file.write_all_at(bytes, off).map_err(|e| SessionError::io(format!("placing page {page} of region {r}"), e))?;
            reg.hashes.set(page, digest);
            reg.placed.take(page);
            let addr = reg.map.addr + off;
            match self.uffd.map(addr, PAGE as u64) {
                Ok(Resolved::Mapped) => {}
                Ok(_) => {
                    let _ = self.uffd.wake(addr, PAGE as u64);
                }
                Err(errno) => return Err(UffdError::Resolve { op: "mapping a page into the guest", addr, errno }.into()),
            }
            if by_fault { &self.by_fault } else { &self.by_push }.fetch_add(1, Ordering::Relaxed);
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                *self.all_local.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.switched.elapsed().as_secs_f64());
                log::info!("post-copy: every page is local after {:.3} s", self.switched.elapsed().as_secs_f64());
            }
        }
        // Checked after the claim: a fault that set its bit after this look sees the claim
        // and takes its own entry out (see `on_fault`).
        if reg.waiting.get(page)
            && let Some(t) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&(r, page))
            && won
        {
            self.latency.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(t.elapsed().as_micros() as u64);
        }
        Ok(won)
    }

    /// The region and page of a guest address.
    fn locate(&self, addr: u64) -> Option<(u32, u64)> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| addr >= r.map.addr && addr - r.map.addr < r.size)
            .map(|(i, r)| (i as u32, (addr - r.map.addr) / PAGE as u64))
    }

    /// Resolves one fault: a page that is local is mapped at once; a stale one is asked of
    /// the source on the fault lane (when there is one; else when the next attempt opens).
    fn on_fault(&self, f: Fault) -> Result<(), SessionError> {
        let Some((r, page)) = self.locate(f.addr) else {
            return Err(VmmError::FaultOutside(f.addr).into());
        };
        self.faults.fetch_add(1, Ordering::Relaxed);
        let reg = &self.regions[r as usize];
        if reg.stale.get(page) && !reg.placed.get(page) {
            if !reg.claimed.get(page) {
                // Set before the entry and before looking at the claim again: a placer that
                // claims the page after this look sees the bit (see `place`).
                reg.waiting.take(page);
                lockfree::order();
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let new = !pending.contains_key(&(r, page));
                pending.entry((r, page)).or_insert_with(Instant::now);
                drop(pending);
                if !reg.claimed.get(page) {
                    if new {
                        self.remote_faults.fetch_add(1, Ordering::Relaxed);
                        self.fetch(r, page);
                    }
                    return Ok(());
                }
                // Claimed meanwhile: its placer may have looked before the bit was set, so
                // the entry goes here (its mapping woke the thread, or the path below does).
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&(r, page));
            }
            // Claimed: its placer is writing it and maps it in a moment (unless the attempt
            // failed under it: the placement is being torn down then).
            while !reg.placed.get(page) {
                if self.stopping.load(Ordering::Acquire) {
                    return Ok(());
                }
                std::thread::yield_now();
            }
        }
        let addr = f.addr;
        let r = match self.uffd.map(addr, PAGE as u64) {
            Ok(Resolved::NoPage) => self.uffd.zero(addr, PAGE as u64),
            other => other,
        };
        match r {
            Ok(Resolved::Mapped) => Ok(()),
            Ok(_) => self.uffd.wake(addr, PAGE as u64).map_err(|errno| UffdError::Resolve { op: "waking the guest", addr, errno }.into()),
            Err(errno) => Err(UffdError::Resolve { op: "resolving the guest's fault", addr, errno }.into()),
        }
    }

    /// Asks the source for one page: an RDMA READ where the READ path is up (the source
    /// hears FAULT_READ: its push leaves the page out and sends what is near it first),
    /// else FETCH on the fault lane. Without a lane, the next attempt asks (a lane that
    /// broke: this attempt is failing).
    fn fetch(&self, r: u32, page: u64) {
        let run = RdmaRun { region: r.into(), pages: 1.into(), first: page.into() };
        let kind = if self.read(r, page) { Kind::FaultRead } else { Kind::Fetch };
        self.send_on_link(kind, run.as_bytes());
    }

    /// Reads one page with an RDMA READ, if the READ path is up; false if it is not.
    fn read(&self, r: u32, page: u64) -> bool {
        let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rd) = reads.as_mut() else { return false };
        let len = (self.regions[r as usize].size - page * PAGE as u64).min(PAGE as u64) as usize;
        match rd.read(r, page, len) {
            Ok(()) => true,
            Err(e) => {
                // The QP failed: the fault lane carries the rest of this attempt's faults
                // (the completion thread ends the attempt if READs were lost).
                log::warn!("post-copy: an RDMA READ could not be posted ({e}); faults go on the fault lane");
                *reads = None;
                false
            }
        }
    }

    /// Pings the source on the fault lane; false when there is none (or it broke).
    pub(super) fn ping(&self) -> bool {
        self.send_on_link(Kind::Ping, &[])
    }

    /// A new attempt's fault lane: every fault still waiting is asked for on it.
    pub(super) fn open_link(&self, s: TcpStream, tx: Seal) {
        log::debug!(
            "post-copy: a fault lane is open {:?} after the switch-over, {} fault(s) waiting",
            self.switched.elapsed(),
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
        );
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(LaneWriter { s, tx });
        let waiting: Vec<(u32, u64)> = self.pending.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        for (r, page) in waiting {
            self.fetch(r, page);
        }
    }

    /// Sends one frame on the fault lane, if one is open (false otherwise, or when it broke).
    pub(super) fn send_on_link(&self, kind: Kind, payload: &[u8]) -> bool {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = link.as_mut() else { return false };
        if l.frame(kind, payload).is_ok() {
            return true;
        }
        *link = None;
        false
    }

    /// The READ path is up: faults from now on are read with RDMA READs.
    pub(super) fn open_reads(&self, reads: super::rdma::Reads) {
        self.reads_opened.store(true, Ordering::Relaxed);
        *self.reads.lock().unwrap_or_else(|p| p.into_inner()) = Some(reads);
    }

    /// The attempt's READ path goes: its QP first (nothing lands after), then its slots.
    /// Faults it was reading are still waiting; the next attempt asks for them again.
    pub(super) fn close_reads(&self) {
        drop(self.reads.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Slot `i`'s READ completed: its page is placed (unless the push placed it first)
    /// and the slot takes the next fault waiting.
    pub(super) fn read_done(&self, i: usize) -> Result<(), SessionError> {
        let Some((slot, (r, page, len))) = self.reads.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|rd| rd.take(i)) else {
            return Ok(());
        };
        self.place(r, page, Content::Bytes(&slot[..len]), true)?;
        self.read_pages.fetch_add(1, Ordering::Relaxed);
        match self.reads.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(rd) => rd.give_back(i, slot),
            None => Ok(()),
        }
    }

    pub(super) fn close_link(&self) {
        if let Some(l) = self.link.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = l.s.shutdown(Shutdown::Both);
        }
    }

    /// Reads and resolves the guest's faults until `stop` stirs. A fault ferry cannot
    /// resolve is returned (and `failed` woken).
    pub(super) fn serve_faults(&self, stop: &UnixStream, failed: &UnixStream) -> Result<(), ()> {
        let mut faults = Vec::new();
        let r = loop {
            let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) if fds[1].revents().is_some_and(|r| !r.is_empty()) => break Ok(()),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => break Err(SessionError::io("waiting for page faults", e.into())),
            }
            if let Err(e) = self.uffd.faults(&mut faults) {
                break Err(e.into());
            }
            if let Some(e) = faults.drain(..).find_map(|f| self.on_fault(f).err()) {
                break Err(e);
            }
        };
        r.map_err(|e: SessionError| {
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            let _ = (&*failed).write(&[1]);
        })
    }

    /// The fault thread's failure, as the migration's error (taken: asked again, it says
    /// only that the thread stopped).
    pub(super) fn failed(&self) -> SessionError {
        let why = self.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        Cancel::FaultThread(why.map(Box::new)).into()
    }

    pub(super) fn report(&self, attempts: u32) -> PostcopyReport {
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let q = |x: f64| if h.is_empty() { 0 } else { h.value_at_quantile(x) };
        PostcopyReport {
            stale_pages: self.stale_pages,
            faults: self.faults.load(Ordering::Relaxed),
            remote_faults: self.remote_faults.load(Ordering::Relaxed),
            pages_by_fault: self.by_fault.load(Ordering::Relaxed),
            pages_by_push: self.by_push.load(Ordering::Relaxed),
            fault_path: if self.reads_opened.load(Ordering::Relaxed) { "rdma_read" } else { "fault_lane" }.into(),
            rdma_read_pages: self.read_pages.load(Ordering::Relaxed),
            fault_latency_us_p50: q(0.5),
            fault_latency_us_p99: q(0.99),
            fault_latency_us_max: if h.is_empty() { 0 } else { h.max() },
            all_local_seconds: self.all_local.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(0.0),
            attempts,
            fault_latency: Some(h.clone()),
        }
    }
}
