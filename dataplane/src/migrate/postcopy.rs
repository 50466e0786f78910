//! Post-copy: the destination runs the guest before all of its memory arrived, and ferry
//! moves the rest after it resumed.
//!
//! At switch-over the source sends SWITCH with the pages still stale (the final dirty
//! bitmap) instead of a last round. The destination hands its memory to the destination
//! VMM, which maps it, registers a userfaultfd over the mapping (missing and minor faults)
//! and passes it to ferryd; once ferryd has checked the registration, the source hears
//! SWITCHED and the VMM runs the guest.
//!
//! From then on the destination's [`Placement`] owns every stale page: a guest thread
//! touching one waits in the kernel while ferryd fetches it on the fault lane, ahead of
//! the bulk push that the source runs on the other lanes as one more round over the pages
//! the destination still needs. A claim bit per page places each page exactly once,
//! whichever way it came; a page the guest may already have written is never written
//! again. Pages that were not stale are mapped at once when the guest touches them.
//!
//! Every post-copy connection set is an *attempt*: the source connects, says which
//! session it continues (RESUME), hears which pages the destination still needs (NEEDED),
//! and pushes them. When the link breaks, faulting threads wait, the source reconnects
//! within the recovery time, and the next attempt pushes only what is still missing.
//! The last attempt ends like any migration: the digest of every page as sent against
//! every page as placed, and only then success.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use hw::uffd::{Fault, Resolved, Userfault};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use super::PageHashes;
use crate::conn::{Ctl, FrameReader, SessionError, write_frame};
use crate::digest::Digest;
use crate::encode::Decoder;
use crate::engine::PAGE;
use crate::lane::Payload;
use crate::plan::Plan;
use crate::session::accept::{Acceptor, Authed, Next, Wait};
use crate::session::seal::{Keys, Seal};
use crate::wire::{self, Encoding, Kind, Layout, RdmaRun};
use crate::wire::{CONTROL_LANE, features};

/// How long either side waits for the other to come back after the link broke in post-copy,
/// unless the VMM says otherwise.
pub const DEFAULT_RECOVER: Duration = Duration::from_secs(120);

/// Where the destination VMM mapped one region of the guest memory, in its address space.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Mapping {
    pub addr: u64,
    pub len: u64,
}

/// What post-copy did, for the reports of both sides.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PostcopyReport {
    /// Pages still stale at switch-over.
    pub stale_pages: u64,
    /// Guest page faults ferryd resolved (destination).
    pub faults: u64,
    /// Of those, faults on stale pages that had to wait for the source.
    pub remote_faults: u64,
    /// Stale pages placed by a fault's fetch, and by the background push.
    pub pages_by_fault: u64,
    pub pages_by_push: u64,
    /// A remote fault's wait, from reading it to its page being mapped, µs.
    pub fault_latency_us_p50: u64,
    pub fault_latency_us_p99: u64,
    pub fault_latency_us_max: u64,
    /// From switch-over until every page was local.
    pub all_local_seconds: f64,
    /// Connection sets it took (1: the link held).
    pub attempts: u32,
    /// The remote faults' waits, µs, for ferryd's metrics (destination).
    #[serde(skip)]
    pub fault_latency: Option<hdrhistogram::Histogram<u64>>,
}

/// A stale page's content as it arrived.
enum Content<'a> {
    Bytes(&'a [u8]),
    Zero,
}

/// One bit per page.
struct Bits(Vec<AtomicU64>);

impl Bits {
    fn new(pages: u64) -> Bits {
        Bits((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn get(&self, p: u64) -> bool {
        self.0[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64) & 1 == 1
    }
    /// Sets the bit; whether it was clear.
    fn take(&self, p: u64) -> bool {
        self.0[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel) >> (p % 64) & 1 == 0
    }
}

/// Sets bits `from..to` of `words`, a whole word at a time where it can.
fn set_run(words: &mut [u64], from: u64, to: u64) {
    let mut p = from;
    while p < to {
        let (w, lo) = ((p / 64) as usize, p % 64);
        let hi = (to - (p - lo)).min(64);
        words[w] |= if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
        p += hi - lo;
    }
}

/// One region of the guest memory on the destination.
struct Region {
    file: File,
    size: u64,
    pages: u64,
    map: Mapping,
    stale: Bits,
    claimed: Bits,
    placed: Bits,
    hashes: PageHashes,
}

/// The fault lane's sending half in the current attempt.
struct Link {
    s: TcpStream,
    tx: Seal,
}

/// The destination's post-copy state: which pages are still stale, which were placed, the
/// VMM's userfaultfd, and the faults waiting for the source.
pub(crate) struct Placement {
    regions: Vec<Region>,
    uffd: Userfault,
    remaining: AtomicU64,
    stale_pages: u64,
    /// Stale pages a guest thread waits for, and since when.
    pending: Mutex<HashMap<(u32, u64), Instant>>,
    link: Mutex<Option<Link>>,
    faults: AtomicU64,
    remote_faults: AtomicU64,
    by_fault: AtomicU64,
    by_push: AtomicU64,
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    switched: Instant,
    all_local: Mutex<Option<f64>>,
    /// Why the fault thread stopped, if it failed.
    failure: Mutex<Option<String>>,
    /// Post-copy is over (done or failed): the fault thread waits for no placer.
    stopping: AtomicBool,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement").field("regions", &self.regions.len()).field("remaining", &self.remaining).finish()
    }
}

fn protocol(why: String) -> SessionError {
    SessionError::Protocol(why)
}

impl Placement {
    /// Post-copy over `memory` (the regions' memfds, as handed to the VMM) with their page
    /// hashes from pre-copy; `stale` lists the pages SWITCH named; `maps` is where the VMM
    /// mapped each region, registered with `uffd`. The registration is checked here.
    pub(crate) fn new(
        memory: &[File],
        hashes: Vec<PageHashes>,
        stale: &[RdmaRun],
        maps: &[Mapping],
        uffd: Userfault,
    ) -> Result<Placement, String> {
        if maps.len() != memory.len() {
            return Err(format!("the VMM mapped {} region(s); the guest has {}", maps.len(), memory.len()));
        }
        let mut regions: Vec<Region> = Vec::with_capacity(memory.len());
        for (i, ((m, h), map)) in memory.iter().zip(hashes).zip(maps).enumerate() {
            let size = m.metadata().map_err(|e| format!("region {i}: {e}"))?.len();
            if map.len != size || map.addr % PAGE as u64 != 0 {
                return Err(format!(
                    "the VMM mapped region {i} as {} bytes at {:#x}; it has {size} bytes (page-aligned, whole)",
                    map.len, map.addr
                ));
            }
            let file = m.try_clone().map_err(|e| format!("region {i}: {e}"))?;
            let pages = super::pages(size);
            regions.push(Region {
                file,
                size,
                pages,
                map: *map,
                stale: Bits::new(pages),
                claimed: Bits::new(pages),
                placed: Bits::new(pages),
                hashes: h,
            });
        }
        // The stale bits are built as plain words, a run's whole words at a time.
        let mut words: Vec<Vec<u64>> = regions.iter().map(|r| vec![0u64; r.pages.div_ceil(64) as usize]).collect();
        for run in stale {
            let (r, first, len) = (run.region.get() as usize, run.first.get(), u64::from(run.pages.get()));
            let pages =
                regions.get(r).map(|reg| reg.pages).ok_or_else(|| format!("SWITCH names region {r}; the guest has {}", memory.len()))?;
            if first.checked_add(len).is_none_or(|e| e > pages) || len == 0 {
                return Err(format!("SWITCH names pages {first}+{len} of region {r}, which has {pages}"));
            }
            set_run(&mut words[r], first, first + len);
        }
        let mut n = 0;
        for (reg, w) in regions.iter_mut().zip(words) {
            n += w.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
            reg.stale = Bits(w.into_iter().map(AtomicU64::new).collect());
        }
        let pc = Placement {
            regions,
            uffd,
            remaining: AtomicU64::new(n),
            stale_pages: n,
            pending: Mutex::new(HashMap::new()),
            link: Mutex::new(None),
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
            pc.check_registration(i)?;
        }
        Ok(pc)
    }

    /// Asks the kernel whether the userfaultfd covers region `i` in minor mode, on a page
    /// that is missing from the file: a hole if there is one, or else a stale page punched
    /// out (its content is fetched again anyway). Clean pages are never touched.
    fn check_registration(&self, i: usize) -> Result<(), String> {
        let r = &self.regions[i];
        let hole = nix::unistd::lseek(&r.file, 0, nix::unistd::Whence::SeekHole).map_err(|e| format!("region {i}: {e}"))? as u64;
        let page = if hole < r.size {
            hole / PAGE as u64
        } else {
            // No hole: a stale page, punched out of the file.
            let Some(p) = (0..r.pages).find(|&p| r.stale.get(p)) else {
                // Every page present and none stale: a clean page, which mapping is harmless.
                return self.uffd.check_registered(r.map.addr).map_err(|e| format!("region {i}: {e}"));
            };
            use nix::fcntl::{FallocateFlags, fallocate};
            fallocate(
                &r.file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (p * PAGE as u64) as i64,
                PAGE as i64,
            )
            .map_err(|e| format!("region {i}: {e}"))?;
            p
        };
        self.uffd.check_registered(r.map.addr + page * PAGE as u64).map_err(|e| format!("region {i}: {e}"))
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// The stale pages not claimed yet, as runs.
    pub(crate) fn needed(&self) -> Vec<RdmaRun> {
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
    pub(crate) fn digest(&self) -> Digest {
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
            return Err(protocol(format!(
                "page {page} of region {r} arrived during post-copy, but it was not stale: the guest owns it, and it was not written"
            )));
        }
        let won = reg.claimed.take(page);
        if won {
            let off = page * PAGE as u64;
            let len = (reg.size - off).min(PAGE as u64) as usize;
            let zeros = [0u8; PAGE];
            let (bytes, digest) = match content {
                Content::Bytes(b) if b.len() == len => (b, Digest::of_page(r, page, b)),
                Content::Bytes(b) => return Err(protocol(format!("page {page} of region {r}: {} bytes for a {len}-byte page", b.len()))),
                Content::Zero => (&zeros[..len], Digest::of_zero_page(r, page, len)),
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
                Err(e) => return Err(protocol(format!("mapping page {page} of region {r} into the guest: {e}"))),
            }
            if by_fault { &self.by_fault } else { &self.by_push }.fetch_add(1, Ordering::Relaxed);
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                *self.all_local.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.switched.elapsed().as_secs_f64());
                log::info!("post-copy: every page is local after {:.3} s", self.switched.elapsed().as_secs_f64());
            }
        }
        if let Some(t) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&(r, page))
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
            return Err(protocol(format!(
                "a page fault at {:#x} is outside every region of the guest memory: the VMM registered memory with the userfaultfd that it did not give ferry",
                f.addr
            )));
        };
        self.faults.fetch_add(1, Ordering::Relaxed);
        let reg = &self.regions[r as usize];
        if reg.stale.get(page) && !reg.placed.get(page) {
            if !reg.claimed.get(page) {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let new = !pending.contains_key(&(r, page));
                pending.entry((r, page)).or_insert_with(Instant::now);
                drop(pending);
                // Placed meanwhile: its mapping woke the thread, or the local path below does.
                if !reg.claimed.get(page) {
                    if new {
                        self.remote_faults.fetch_add(1, Ordering::Relaxed);
                        self.fetch(r, page);
                    }
                    return Ok(());
                }
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
            Ok(_) => self.uffd.wake(addr, PAGE as u64).map_err(|e| protocol(format!("waking the guest at {addr:#x}: {e}"))),
            Err(e) => Err(protocol(format!("resolving the guest's fault at {addr:#x}: {e}"))),
        }
    }

    /// Asks the source for one page on the fault lane, if one is open.
    fn fetch(&self, r: u32, page: u64) {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = link.as_mut() {
            let run = RdmaRun { region: r.into(), pages: 1.into(), first: page.into() };
            if write_frame(&mut l.s, &mut l.tx, Kind::Fetch, run.as_bytes()).is_err() {
                // The attempt is failing; the next one asks again.
                *link = None;
            }
        }
    }

    /// A new attempt's fault lane: every fault still waiting is asked for on it.
    fn open_link(&self, s: TcpStream, tx: Seal) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(Link { s, tx });
        let waiting: Vec<(u32, u64)> = self.pending.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        for (r, page) in waiting {
            self.fetch(r, page);
        }
    }

    fn close_link(&self) {
        if let Some(l) = self.link.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = l.s.shutdown(Shutdown::Both);
        }
    }

    /// Reads and resolves the guest's faults until `stop` stirs. A fault ferry cannot
    /// resolve is returned (and `failed` woken).
    pub(crate) fn serve_faults(&self, stop: &UnixStream, failed: &UnixStream) -> Result<(), SessionError> {
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
                break Err(protocol(e));
            }
            if let Some(e) = faults.drain(..).find_map(|f| self.on_fault(f).err()) {
                break Err(e);
            }
        };
        if let Err(e) = &r {
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            let _ = (&*failed).write(&[1]);
        }
        r
    }

    /// The fault thread's failure, as the migration's error.
    fn failed(&self) -> SessionError {
        let why = self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        protocol(format!(
            "post-copy failed at the destination: {}; the guest cannot complete",
            why.unwrap_or_else(|| "its fault thread stopped".into())
        ))
    }

    pub(crate) fn report(&self, attempts: u32) -> PostcopyReport {
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let q = |x: f64| if h.is_empty() { 0 } else { h.value_at_quantile(x) };
        PostcopyReport {
            stale_pages: self.stale_pages,
            faults: self.faults.load(Ordering::Relaxed),
            remote_faults: self.remote_faults.load(Ordering::Relaxed),
            pages_by_fault: self.by_fault.load(Ordering::Relaxed),
            pages_by_push: self.by_push.load(Ordering::Relaxed),
            fault_latency_us_p50: q(0.5),
            fault_latency_us_p99: q(0.99),
            fault_latency_us_max: if h.is_empty() { 0 } else { h.max() },
            all_local_seconds: self.all_local.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(0.0),
            attempts,
            fault_latency: Some(h.clone()),
        }
    }
}

/// Sends `runs` after a SWITCH or NEEDED head frame of `kind`.
pub(crate) fn send_runs(ctl: &mut Ctl, kind: Kind, count: u64, runs: &[RdmaRun]) -> Result<(), SessionError> {
    let head = wire::RunCount { runs: (runs.len() as u64).into(), count: count.into() };
    ctl.send(kind, head.as_bytes())?;
    for frame in runs.chunks(wire::RDMA_RUNS_PER_FRAME) {
        ctl.send(Kind::Runs, frame.as_bytes())?;
    }
    Ok(())
}

/// Reads a SWITCH or NEEDED frame (`kind`) and the runs after it: the runs, and its count.
pub(crate) fn recv_runs(ctl: &mut Ctl, kind: Kind, buf: &mut Vec<u8>) -> Result<(Vec<RdmaRun>, u64), SessionError> {
    ctl.expect(kind, buf)?;
    recv_runs_after(ctl, kind, buf)
}

/// [`recv_runs`] once the head frame is in `buf`.
pub(crate) fn recv_runs_after(ctl: &mut Ctl, kind: Kind, buf: &mut Vec<u8>) -> Result<(Vec<RdmaRun>, u64), SessionError> {
    let head: wire::RunCount = wire::parse(kind, buf)?;
    let n = head.runs.get();
    let bad = |why: String| protocol(format!("{kind:?}: {why}"));
    let mut runs = Vec::new();
    while (runs.len() as u64) < n {
        ctl.expect(Kind::Runs, buf)?;
        let list = <[RdmaRun]>::ref_from_bytes(buf).map_err(|_| bad(format!("{} bytes is not a list of runs", buf.len())))?;
        if list.is_empty() || list.len() > wire::RDMA_RUNS_PER_FRAME || runs.len() as u64 + list.len() as u64 > n {
            return Err(bad(format!("{} runs in a frame, {} of {n} read before", list.len(), runs.len())));
        }
        runs.extend_from_slice(list);
    }
    Ok((runs, head.count.get()))
}

/// The dirty bitmap (words of every region in turn) that `runs` mark, for regions of
/// `pages` pages each.
pub(crate) fn runs_to_bitmap(runs: &[RdmaRun], pages: &[u64]) -> Result<Vec<u64>, SessionError> {
    let starts: Vec<usize> = pages
        .iter()
        .scan(0usize, |at, &p| {
            let s = *at;
            *at += p.div_ceil(64) as usize;
            Some(s)
        })
        .collect();
    let words: usize = pages.iter().map(|p| p.div_ceil(64) as usize).sum();
    let mut bits = vec![0u64; words];
    for run in runs {
        let (r, first, n) = (run.region.get() as usize, run.first.get(), u64::from(run.pages.get()));
        let Some(&total) = pages.get(r) else {
            return Err(protocol(format!("NEEDED names region {r}; the guest has {}", pages.len())));
        };
        if n == 0 || first.checked_add(n).is_none_or(|e| e > total) {
            return Err(protocol(format!("NEEDED names pages {first}+{n} of region {r}, which has {total}")));
        }
        for p in first..first + n {
            bits[starts[r] + (p / 64) as usize] |= 1 << (p % 64);
        }
    }
    Ok(bits)
}

/// The destination's fault lane in one attempt: the source's answers to FETCH, placed as
/// they come, until LANE_END. The lane's sending half is the placement's link meanwhile.
pub(crate) fn fault_lane(pc: &Placement, layout: &Layout, s: TcpStream, keys: Keys) -> Result<(), SessionError> {
    let Keys { tx, rx, .. } = keys;
    let writer = s.try_clone().map_err(|e| SessionError::io("cloning the fault lane", e))?;
    pc.open_link(writer, tx);
    let r = (|| {
        let mut s = s;
        s.set_read_timeout(None).map_err(|e| SessionError::io("configuring the fault lane", e))?;
        let mut reader = FrameReader::new(256 << 10, wire::max_payload_for(layout.max_chunk), rx);
        let (mut dec, mut scratch) = (Decoder::default(), Vec::new());
        loop {
            let (h, kind, payload) = reader.next(&mut s, "reading the fault lane")?;
            match kind {
                Kind::Data => {
                    pc.place_frame(layout, &h, &Payload::One(payload), &mut dec, &mut scratch, true)?;
                }
                Kind::LaneEnd => return Ok(()),
                Kind::Error => return Err(SessionError::Peer(String::from_utf8_lossy(payload).into_owned())),
                other => return Err(wire::FrameError::Unexpected { expected: Kind::Data, got: other }.into()),
            }
        }
    })();
    pc.close_link();
    r
}

/// Windows the push sends first, at most, waiting at once.
pub(crate) const HINTS: usize = 4096;
/// Windows from a fault's on that the push sends first: the guest's next touches are
/// likely near its last (a sequential scan, a hot set).
const HINT_WINDOWS: u64 = 4;

/// Where the source's fault lane tells the push about faults.
#[derive(Clone, Copy)]
pub(crate) struct Near<'a> {
    pub hints: &'a crossbeam_queue::ArrayQueue<u64>,
    pub chunk: usize,
}

/// The source's fault lane in one attempt: each FETCH answered with its pages, read from
/// the paused guest memory, as DATA frames (zero pages as such), until the destination
/// ends the lane or `stop` is set; the windows from each fault on go to the push first.
/// Returns the pages answered.
pub(crate) fn answer_fetches(
    s: TcpStream,
    keys: Keys,
    regions: &[crate::worker::Region],
    stop: &AtomicBool,
    near: Near<'_>,
) -> Result<u64, SessionError> {
    let Keys { mut tx, rx, .. } = keys;
    let mut w = s.try_clone().map_err(|e| SessionError::io("cloning the fault lane", e))?;
    let mut s = s;
    // The guest may fault rarely: the lane waits for as long as the attempt runs (it ends
    // by `stop` and a shutdown), not for a data connection's idle timeout.
    s.set_read_timeout(None).map_err(|e| SessionError::io("configuring the fault lane", e))?;
    let mut reader = FrameReader::new(64 << 10, 4096, rx);
    let mut page = vec![0u8; PAGE];
    let mut answered = 0;
    while !stop.load(Ordering::Relaxed) {
        let (_, kind, payload) = match reader.next(&mut s, "reading the fault lane") {
            Ok(f) => f,
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(e),
        };
        let run: RdmaRun = match kind {
            Kind::Fetch => wire::parse(Kind::Fetch, payload)?,
            Kind::LaneEnd => break,
            other => return Err(wire::FrameError::Unexpected { expected: Kind::Fetch, got: other }.into()),
        };
        let (r, first, n) = (run.region.get(), run.first.get(), u64::from(run.pages.get()));
        let region = regions.get(r as usize).ok_or_else(|| protocol(format!("FETCH of region {r}")))?;
        if n == 0 || n > 64 || first.checked_add(n).is_none_or(|e| e > super::pages(region.size)) {
            return Err(protocol(format!("FETCH of pages {first}+{n} of region {r}")));
        }
        for p in first..first + n {
            let off = p * PAGE as u64;
            let len = (region.size - off).min(PAGE as u64) as usize;
            region
                .memory
                .read_exact_at(&mut page[..len], off)
                .map_err(|source| SessionError::Region { path: format!("guest memory region {r}"), source })?;
            let bytes = &page[..len];
            let h = if bytes.iter().all(|&b| b == 0) {
                wire::Header::data(Encoding::Zero, r, off, len as u32, 0).seal(&[])
            } else {
                wire::Header::data(Encoding::Raw, r, off, len as u32, len as u32).seal(bytes)
            };
            let body: &[u8] = if h.encoding == Encoding::Zero as u8 { &[] } else { bytes };
            let tag = tx.tag(&h, [body]);
            crate::conn::write_all_vectored(&mut w, &[h.as_bytes(), body, &tag]).map_err(|e| SessionError::io("answering a fault", e))?;
            answered += 1;
        }
        let g = crate::worker::Round::window_of(regions, near.chunk, r as usize, first);
        for w in g..g + HINT_WINDOWS {
            // A full queue drops the hint: the cursor still sends the window.
            let _ = near.hints.push(w);
        }
    }
    Ok(answered)
}

/// A lane or the fault lane's message to an attempt's control thread: one per round end,
/// or a failure.
pub(crate) type LaneMsg = Result<(u16, u32, super::RoundCounts), SessionError>;

/// Whether `e` is the link failing (the attempt may be retried), not the session.
pub(crate) fn is_link_failure(e: &SessionError) -> bool {
    matches!(e, SessionError::PeerClosed { .. } | SessionError::Io { .. } | SessionError::TimedOut { .. })
}

/// What post-copy takes over from the pre-copy session at the destination.
pub(crate) struct Precopy {
    /// The session's id: post-copy attempts RESUME it.
    pub session: u64,
    /// Every region's page hashes, which post-copy goes on updating.
    pub hashes: Vec<PageHashes>,
    /// The pages SWITCH named stale.
    pub stale: Vec<RdmaRun>,
}

/// What the destination's post-copy produced.
pub(crate) struct Finished {
    pub rounds: Vec<super::RoundReport>,
    pub report: PostcopyReport,
    pub digest: Digest,
}

/// The destination's switch-over, after SWITCH arrived on the pre-copy session `ctl`: the
/// memory goes to the VMM, its userfaultfd is checked, the source hears SWITCHED and the
/// VMM runs the guest; then post-copy is served until every page is placed and the
/// digest matched (RESULT sent), whatever the link does meanwhile.
pub(crate) fn switch_over(
    acc: &Acceptor<'_>,
    ctl: &mut Ctl,
    incoming: &super::dest::Incoming,
    pre: Precopy,
    opts: &super::dest::DestOptions<'_>,
    vmm: &mut impl super::dest::DestVmm,
) -> Result<Finished, SessionError> {
    let Precopy { session, hashes, stale } = pre;
    let t = Instant::now();
    let cancelled = |why: String| SessionError::Cancelled(format!("post-copy refused: {why}; the source keeps the guest"));
    let (uffd, maps) = vmm.switch_over(incoming).map_err(cancelled)?;
    let handed = t.elapsed();
    let pc = Placement::new(&incoming.memory, hashes, &stale, &maps, uffd).map_err(cancelled)?;
    let placed = t.elapsed();
    // The point of no return: once the source reads SWITCHED it never resumes the guest.
    ctl.send(Kind::Switched, &[])?;
    log::debug!("post-copy switch-over: VMM registered after {handed:?}, placement ready after {placed:?}");
    vmm.run().map_err(|e| SessionError::Cancelled(format!("the destination VMM could not run the guest: {e}")))?;
    log::info!(
        "post-copy: the guest runs here {:.1} ms after SWITCH; {} page(s) are still at the source",
        t.elapsed().as_secs_f64() * 1e3,
        pc.remaining()
    );
    let recover = opts.recover.unwrap_or(DEFAULT_RECOVER);
    let (rounds, digest, attempts) = serve(acc, &pc, session, opts, recover, vmm)?;
    Ok(Finished { rounds, report: pc.report(attempts), digest })
}

/// Serves post-copy attempts until one completes: the fault thread runs throughout; a link
/// that breaks is waited for up to `recover`.
fn serve(
    acc: &Acceptor<'_>,
    pc: &Placement,
    session: u64,
    opts: &super::dest::DestOptions<'_>,
    recover: Duration,
    vmm: &mut impl super::dest::DestVmm,
) -> Result<(Vec<super::RoundReport>, Digest, u32), SessionError> {
    let pair = || UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e));
    let ((stop_tx, stop_rx), (failed_tx, failed_rx)) = (pair()?, pair()?);
    std::thread::scope(|s| {
        let faults = s.spawn(|| pc.serve_faults(&stop_rx, &failed_tx));
        let r = (|| {
            let (mut since, mut attempts) = (Instant::now(), 0u32);
            loop {
                let mut watch = vec![failed_rx.as_fd()];
                watch.extend(opts.vmm);
                let wait = Wait { what: "the source, to go on with post-copy", deadline: Some(since + recover), watch: &watch };
                let next = acc.next(wait, |a| match (a.hello.lane.get(), a.hello.features.get() & features::POSTCOPY) {
                    (CONTROL_LANE, f) if f != 0 => Ok(()),
                    _ => Err("this ferryd is in a migration's post-copy: only its source may connect".into()),
                });
                let a = match next {
                    Ok(Next::Conn(a)) => a,
                    Ok(Next::Watched(0)) => return Err(pc.failed()),
                    Ok(Next::Watched(_)) => return Err(vmm_gone_in_postcopy()),
                    Err(SessionError::TimedOut { .. }) => {
                        return Err(SessionError::Cancelled(format!(
                            "the source did not come back within {} s of the link breaking: {} page(s) of the guest are still only at the source, so the guest cannot complete here",
                            recover.as_secs(),
                            pc.remaining()
                        )));
                    }
                    Err(e) => return Err(e),
                };
                attempts += 1;
                match attempt(acc, a, pc, session, opts.plan, &watch) {
                    Ok(Some((rounds, digest))) => {
                        // The guest's faults are resolved here until its VMM unregistered.
                        if let Err(e) = vmm.all_local() {
                            log::warn!("post-copy: the destination VMM did not release its memory: {e}");
                        }
                        return Ok((rounds, digest, attempts));
                    }
                    Ok(None) => {}
                    Err(e) if is_link_failure(&e) => {
                        log::warn!("post-copy: the link to the source broke ({e}); waiting up to {} s for it", recover.as_secs());
                        since = Instant::now();
                    }
                    Err(e) => return Err(e),
                }
            }
        })();
        pc.stopping.store(true, Ordering::Release);
        let _ = stop_tx.shutdown(Shutdown::Both);
        let fault_result = faults.join().expect("fault thread panicked");
        let r = match (r, fault_result) {
            (Err(_), Err(_)) => Err(pc.failed()),
            (r, _) => r,
        };
        if let Err(e) = &r {
            tell_source(acc, e);
        }
        r
    })
}

fn vmm_gone_in_postcopy() -> SessionError {
    SessionError::Cancelled("the destination VMM closed its control connection during post-copy: the guest is gone".into())
}

/// Post-copy failed here while no attempt was open: the source is reconnecting to resume
/// it. Its next connection (within a few seconds) is told why, so it stops.
fn tell_source(acc: &Acceptor<'_>, e: &SessionError) {
    if matches!(e, SessionError::Peer(_)) {
        return;
    }
    let wait =
        Wait { what: "the source, to tell it post-copy failed", deadline: Some(Instant::now() + Duration::from_secs(5)), watch: &[] };
    if let Ok(Next::Conn(a)) = acc.next(wait, |a| match a.hello.lane.get() {
        CONTROL_LANE => Ok(()),
        _ => Err("post-copy failed here".into()),
    }) {
        Ctl::new(a.s, a.keys).close_with_error(&e.to_string());
    }
}

/// One post-copy attempt on a connection that authenticated for post-copy: RESUME, NEEDED,
/// the push session and its fault lane, then ROUND, DONE and RESULT. `Ok(None)`: the
/// connection was for another session and was turned away.
fn attempt(
    acc: &Acceptor<'_>,
    a: Authed,
    pc: &Placement,
    session: u64,
    plan: &Plan,
    watch: &[BorrowedFd<'_>],
) -> Result<Option<(Vec<super::RoundReport>, Digest)>, SessionError> {
    crate::engine::tune_socket(&a.s)?;
    let peer = a.peer;
    let mut ctl = Ctl::new(a.s, a.keys);
    ctl.s.set_read_timeout(Some(super::ROUND_IDLE_TIMEOUT)).map_err(|e| SessionError::io("setting a read timeout", e))?;
    let mut buf = Vec::new();
    ctl.expect(Kind::Resume, &mut buf)?;
    let resume: wire::Resume = wire::parse(Kind::Resume, &buf)?;
    if resume.session.get() != session {
        log::warn!("post-copy: {peer} asked to resume session {:#x}; this is {session:#x}", resume.session.get());
        ctl.close_with_error(&format!("no migration {:#x} is in post-copy here", resume.session.get()));
        return Ok(None);
    }
    let needed = pc.needed();
    let placed = pc.stale_pages - pc.remaining();
    log::info!("post-copy: the source is back ({peer}); {} page(s) still needed", pc.remaining());
    send_runs(&mut ctl, Kind::Needed, placed, &needed)?;
    ctl.expect(Kind::Session, &mut buf)?;
    let (layout, lanes, transport) = wire::parse_session(&buf)?;
    let sizes: Vec<u64> = pc.regions.iter().map(|r| r.size).collect();
    if layout.regions != sizes || transport != wire::DataTransport::Tcp || lanes < 2 {
        let why = format!(
            "a post-copy session must describe the same regions ({sizes:?}) over TCP lanes and a fault lane; it described {:?} over {lanes} {transport:?} lane(s)",
            layout.regions
        );
        ctl.error(&why);
        return Err(protocol(why));
    }
    super::dest::check_session(&layout, lanes, transport, features::MIGRATE, plan)?;
    let id = super::dest::session_ok(&mut ctl)?;
    let live = crate::live::session(crate::live::Role::MigrateIn, id, usize::from(lanes));
    let ctx = super::dest::Ctx { layout: &layout, targets: &[], plan, live: &live, progress: None, postcopy: Some(pc) };
    let (tx, rx) = mpsc::channel::<LaneMsg>();
    let (wake, woken) = UnixStream::pair().map_err(|e| SessionError::io("making a wake-up socket", e))?;
    let fault_lane_no = lanes - 1;
    let t = Instant::now();
    let mut socks = Vec::new();
    std::thread::scope(|s| {
        let mut w = vec![ctl.s.as_fd()];
        w.extend_from_slice(watch);
        let opened = acc.lanes(id, lanes, &w, |a| {
            socks.extend(a.s.try_clone());
            let (tx, ctx, wake, layout) = (tx.clone(), &ctx, &wake, &layout);
            if a.hello.lane.get() == fault_lane_no {
                s.spawn(move || {
                    if let Err(e) = fault_lane(pc, layout, a.s, a.keys) {
                        let _ = tx.send(Err(e));
                        let _ = (&*wake).write(&[1]);
                    }
                });
            } else {
                s.spawn(move || {
                    if let Err(e) = super::dest::lane(a, ctx, &tx) {
                        let _ = tx.send(Err(e));
                        let _ = (&*wake).write(&[1]);
                    }
                });
            }
        });
        let r = match opened {
            Ok(None) => push_round(&mut ctl, &woken, watch, &rx, fault_lane_no, pc, t),
            Ok(Some(0)) => Err(crate::engine::recv::peer_ended(&mut ctl, "waiting for the post-copy lanes")),
            Ok(Some(1)) => Err(pc.failed()),
            Ok(Some(_)) => Err(vmm_gone_in_postcopy()),
            Err(e) => Err(e),
        };
        // A failure that is not the link's ends the migration: the source is told why.
        if let Err(e) = &r
            && !is_link_failure(e)
            && !matches!(e, SessionError::Peer(_))
        {
            ctl.error(&e.to_string());
        }
        // Every lane ends now: done, or the attempt failed and the next one starts afresh.
        pc.close_link();
        for c in &socks {
            let _ = c.shutdown(Shutdown::Both);
        }
        r.map(Some)
    })
}

/// The control thread of an attempt: the push round's end on every data lane and ROUND,
/// every page placed, ROUND_OK; then DONE's digest against the pages as placed, and RESULT.
fn push_round(
    ctl: &mut Ctl,
    woken: &UnixStream,
    watch: &[BorrowedFd<'_>],
    rx: &mpsc::Receiver<LaneMsg>,
    data_lanes: u16,
    pc: &Placement,
    t: Instant,
) -> Result<(Vec<super::RoundReport>, Digest), SessionError> {
    let mut buf = Vec::new();
    let lane_error = |e: SessionError| loop {
        match rx.try_recv() {
            Ok(Err(lane)) => break lane,
            Ok(Ok(_)) => continue,
            Err(_) => break e,
        }
    };
    let stirred = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
    loop {
        // The fault thread's failure, then the destination VMM (if watched).
        let mut fds = vec![PollFd::new(ctl.s.as_fd(), PollFlags::POLLIN), PollFd::new(woken.as_fd(), PollFlags::POLLIN)];
        fds.extend(watch.iter().map(|w| PollFd::new(*w, PollFlags::POLLIN)));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if stirred(&fds[2]) => return Err(pc.failed()),
            Ok(_) if fds.len() > 3 && stirred(&fds[3]) => return Err(vmm_gone_in_postcopy()),
            Ok(_) if stirred(&fds[1]) => return Err(lane_error(protocol("a lane failed".into()))),
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(SessionError::io("waiting for the push round", e.into())),
        }
    }
    ctl.expect(Kind::Round, &mut buf).map_err(lane_error)?;
    let r: wire::Round = wire::parse(Kind::Round, &buf)?;
    let mut sum = super::RoundCounts::default();
    for _ in 0..data_lanes {
        let (_, _, c) =
            rx.recv_timeout(super::ROUND_IDLE_TIMEOUT).map_err(|_| protocol("the lanes did not end the push round".into()))??;
        sum += c;
    }
    if sum.pages != r.pages.get() || r.last.get() != 1 {
        return Err(protocol(format!("the push round: the source counted {} pages, the lanes {}", r.pages.get(), sum.pages)));
    }
    // Every needed page was pushed, so each is claimed; a claim still being placed (by the
    // fault lane) finishes in a moment.
    let until = Instant::now() + Duration::from_secs(5);
    while pc.remaining() > 0 && Instant::now() < until {
        std::thread::yield_now();
    }
    if pc.remaining() > 0 {
        return Err(protocol(format!("the push round ended with {} stale page(s) not placed", pc.remaining())));
    }
    let ok = wire::RoundOk { round: r.round, _pad: 0.into(), pages: sum.pages.into() };
    ctl.send(Kind::RoundOk, ok.as_bytes())?;
    ctl.expect(Kind::Done, &mut buf)?;
    let done: wire::Digest = wire::parse(Kind::Done, &buf)?;
    let digest = pc.digest();
    let size: u64 = pc.regions.iter().map(|r| r.size).sum();
    let source = Digest::from_bytes(done.digest);
    let ok = digest == source && done.bytes.get() == size;
    let result = wire::Digest { digest: digest.to_bytes(), bytes: size.into(), ok: u32::from(ok).into(), _pad: 0.into() };
    ctl.send(Kind::Result, result.as_bytes())?;
    if !ok {
        return Err(SessionError::DigestMismatch { source_digest: source.hex(), dest_digest: digest.hex() });
    }
    let seconds = t.elapsed().as_secs_f64();
    let dirty_bytes = sum.pages * PAGE as u64;
    let report = super::RoundReport {
        round: r.round.get(),
        last: true,
        dirty_pages: sum.pages,
        dirty_bytes,
        zero_pages: sum.zero_pages,
        wire_bytes: sum.wire_bytes,
        frames: sum.frames,
        seconds,
        gbps: dirty_bytes as f64 / seconds / 1e9,
        ..super::RoundReport::default()
    };
    Ok((vec![report], digest))
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_set_exactly_their_bits() {
        let mut w = vec![0u64; 3];
        super::set_run(&mut w, 3, 5);
        super::set_run(&mut w, 60, 130);
        assert_eq!(w[0], 0b11000 | (0b1111 << 60));
        assert_eq!(w[1], u64::MAX);
        assert_eq!(w[2], 0b11);
        let mut v = vec![0u64; 1];
        super::set_run(&mut v, 0, 64);
        assert_eq!(v[0], u64::MAX);
    }
}
