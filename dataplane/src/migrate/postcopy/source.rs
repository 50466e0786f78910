//! The source's side of the fault path: FETCH answered from the paused guest memory, and
//! the push told where the guest faults.

use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::rdma::{LaneWriter, Offer};
use crate::conn::{FrameReader, SessionError, Violation, write_sealed};
use crate::encode::{Compressor, Encoder};
use crate::engine::PAGE;
use crate::plan::Compression;
use crate::session::seal::Seal;
use crate::wire::{self, Kind, RdmaRun};

/// Windows the push sends first, at most, waiting at once.
pub(crate) const HINTS: usize = 4096;
/// Windows from a fault's on that the push sends first: the guest's next touches are
/// likely near its last (a sequential scan, a hot set).
const HINT_WINDOWS: u64 = 4;

/// Where the source's fault lane tells the push about faults.
#[derive(Clone, Copy)]
pub(crate) struct Near<'a> {
    pub hints: &'a crossbeam_queue::ArrayQueue<u64>,
    /// The pages answered, by their bit in the push's dirty bitmap: the push leaves them
    /// out (a page it sent before the fault's answer goes twice; placed once).
    pub fetched: &'a crate::worker::AtomicBits,
    pub chunk: usize,
    /// After RDMA rounds, the key post-copy's pages are hashed with (see `dest::Landed`):
    /// an answer records its pages' hashes keyed, as the source's final pass does.
    pub key: Option<&'a crate::digest::DigestKey>,
}

/// The source's end of an attempt's fault lane: the socket it reads, the sending half
/// (shared with the READ path's set-up) and, after RDMA rounds, that set-up.
pub(crate) struct FaultLane<'a> {
    pub s: TcpStream,
    pub rx: Seal,
    pub w: &'a Mutex<LaneWriter>,
    pub offer: Option<&'a Offer<'a>>,
}

/// The source's fault lane in one attempt: each FETCH answered with its pages, read from
/// the paused guest memory, as DATA frames (zero pages as such), and each PING with PONG,
/// until the destination ends the lane or `stop` is set; the windows from each fault on go
/// to the push first. FAULT_RDMA_OK connects the READ path. A lane silent for
/// [`super::SILENCE`] fails as a broken link. Counts the pages answered into `answered`
/// (the lane may end in an error after its answers landed: the destination closes it once
/// the attempt is done).
pub(crate) fn answer_fetches(
    lane: FaultLane<'_>,
    regions: &[crate::worker::Region],
    stop: &AtomicBool,
    near: Near<'_>,
    answered: &AtomicU64,
) -> Result<(), SessionError> {
    let FaultLane { mut s, rx, w, offer } = lane;
    // The guest may fault rarely, but the destination pings every HEARTBEAT: a lane that
    // hears nothing for SILENCE is a silent link.
    s.set_read_timeout(Some(super::SILENCE)).map_err(|e| SessionError::io("configuring the fault lane", e))?;
    let mut reader = FrameReader::new(64 << 10, 4096, rx);
    // A FETCH asks for a chunk's pages at most: their frames fit the session's layout.
    let max_fetch = (near.chunk / PAGE).max(1) as u64;
    let mut pages = vec![0u8; max_fetch as usize * PAGE];
    let (mut enc, mut z) = (Encoder::new(Compression::Off), Compressor::new(pages.len()));
    while !stop.load(Ordering::Relaxed) {
        let (_, kind, payload) = match reader.next(&mut s, "reading the fault lane") {
            Ok(f) => f,
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(super::silent_link(e)),
        };
        // FETCH: answer with the pages; FAULT_READ: the destination reads them itself.
        let (run, answer): (RdmaRun, bool) = match kind {
            Kind::Fetch => (wire::parse(Kind::Fetch, payload)?, true),
            Kind::FaultRead if offer.is_some() => (wire::parse(Kind::FaultRead, payload)?, false),
            Kind::Ping => {
                LaneWriter::send(w, Kind::Pong, &[])?;
                continue;
            }
            Kind::FaultRdmaOk if offer.is_some() => {
                offer.expect("checked").accepted(payload, w)?;
                continue;
            }
            Kind::LaneEnd => break,
            other => return Err(wire::FrameError::Unexpected { expected: Kind::Fetch, got: other }.into()),
        };
        let (r, first, n) = (run.region.get(), run.first.get(), u64::from(run.pages.get()));
        let region = regions.get(r as usize).ok_or(Violation::NoRegion { frame: kind, region: r.into(), regions: regions.len() })?;
        let has = crate::migrate::pages(region.size);
        if n == 0 || n > max_fetch || first.checked_add(n).is_none_or(|e| e > has) {
            return Err(Violation::OutsideRegion { frame: kind, region: r, first, pages: n, has }.into());
        }
        if answer {
            let hashing = near.key.map_or(crate::digest::Hashing::Fast, crate::digest::Hashing::Keyed);
            answer_pages(region, (r, first, n), (&mut pages, hashing), (&mut enc, &mut z), w)?;
            answered.fetch_add(n, Ordering::Relaxed);
        }
        for p in first..first + n {
            near.fetched.take(region.word as u64 * 64 + p);
        }
        let g = crate::worker::Round::window_of(regions, near.chunk, r as usize, first);
        for w in g..g + HINT_WINDOWS {
            // A full queue drops the hint: the cursor still sends the window.
            let _ = near.hints.push(w);
        }
    }
    Ok(())
}

/// Answers a FETCH of pages `first..first + n` of region `r`: read from the paused guest
/// memory into `pages`, framed by the encoder (zero pages as such, no compression: a fault
/// waits for this), each page's hash as sent recorded before the caller marks it answered
/// (the push, which leaves it out once it sees the mark, sees the hash the digest needs).
fn answer_pages(
    region: &crate::worker::Region,
    (r, first, n): (u32, u64, u64),
    (pages, hashing): (&mut [u8], crate::digest::Hashing<'_>),
    (enc, z): (&mut Encoder, &mut Compressor),
    w: &Mutex<LaneWriter>,
) -> Result<(), SessionError> {
    let (off, end) = (first * PAGE as u64, ((first + n) * PAGE as u64).min(region.size));
    let bytes = &mut pages[..(end - off) as usize];
    region.memory.read_exact_at(bytes, off).map_err(|source| SessionError::Region { path: format!("guest memory region {r}"), source })?;
    let mut lw = w.lock().unwrap_or_else(|p| p.into_inner());
    let LaneWriter { s: ws, tx } = &mut *lw;
    enc.encode(z, r, off, PAGE, bytes, &mut |h, payload| {
        crate::worker::record_sent_with(hashing, &region.sent, r, (off, bytes), &h);
        write_sealed(ws, tx, &h, payload)
    })
    .map_err(|e| SessionError::io("answering a fault", e))
}
