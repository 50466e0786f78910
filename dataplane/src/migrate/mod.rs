//! The migration engine: pre-copy rounds of a VMM's guest memory from a source `ferryd`
//! into a memfd at a destination `ferryd`, which hands it to the destination VMM only
//! once its digest matches the paused source.
//!
//! Round 0 sends every page; each later round sends the pages the VMM's dirty bitmap
//! marks. After every round the source reports the dirty bytes it sent, the bandwidth it
//! measured and the downtime it expects if the VMM paused now, and advises pausing once
//! that fits the budget (or the round limit is reached). The VMM pauses, submits the final
//! bitmap, and the stop-and-copy round runs on every lane while the source digests the
//! paused memory. The wire protocol is in [`crate::wire`]; the VMM's side of the control
//! socket in [`vmm`].

pub mod dest;
pub mod estimate;
pub mod postcopy;
pub mod source;
pub mod vmm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::engine::PAGE;

/// QEMU's default downtime limit (`expected-downtime` 300 in QEMU 7.2's `query-migrate`
/// here, before its first estimate).
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);
/// Pre-copy rounds before ferry advises pausing whatever the estimate says.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// A migration's connections wait this long for the next round: the VMM sets the pace.
pub const ROUND_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Pages of a region of `bytes`.
pub fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE as u64)
}

/// Bytes of the dirty bitmap for a region of `bytes`: one bit per page, in whole
/// little-endian 64-bit words (KVM's dirty-log layout).
pub fn bitmap_bytes(bytes: u64) -> u64 {
    pages(bytes).div_ceil(64) * 8
}

/// Bytes of the dirty bitmap for regions of `sizes`: each region's bitmap
/// ([`bitmap_bytes`]) one after the other, in the regions' order.
pub fn bitmap_bytes_regions(sizes: &[u64]) -> u64 {
    sizes.iter().map(|&s| bitmap_bytes(s)).sum()
}

/// What a VMM may ask of one migration (`migrate_out`'s fields, [`vmm::OutOptions`]);
/// each left out is the plan's `[migration]` default (`downtime_ms`, `max_rounds`,
/// `rate_limit_mbit`, `verify`, `recover_s`) or its compression and transport.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationLimits {
    pub downtime_ms: Option<u64>,
    pub max_rounds: Option<u32>,
    /// Megabits per second of guest memory, at most.
    pub rate_limit_mbit: Option<u64>,
    /// `off`, `zstd:N` or `auto` (as ferry.toml means it).
    pub compress: Option<String>,
    /// `rdma`, `tcp`, `sockets` or `auto`.
    pub transport: Option<String>,
    /// What the final digest covers.
    pub verify: Option<Verify>,
    /// Post-copy: seconds to keep reconnecting after the link broke.
    pub recover_s: Option<u64>,
}

/// A dirty bitmap that does not fit the guest's regions.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error(
        "the dirty bitmap has {bytes} bytes; {pages} pages in {regions} region(s) need {want} (one bit per 4096-byte page, whole 64-bit words per region)"
    )]
    Size { bytes: u64, pages: u64, regions: usize, want: u64 },
    /// A bit past the last page of region `region` (`None`: the only region).
    #[error("the dirty bitmap marks page {page} past {} {pages} pages", region.map_or_else(|| "the region's".to_string(), |r| format!("region {r}'s")))]
    PastEnd { page: u64, region: Option<usize>, pages: u64 },
}

/// How a VMM failed a step of a hand-over: what it said, or that it said nothing.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot hand it over: {0}")]
    Send(#[source] std::io::Error),
    #[error("its connection: {0}")]
    Io(#[source] std::io::Error),
    #[error("it closed its connection")]
    Closed,
    #[error("it did not answer within {} s", .0.as_secs())]
    Silent(Duration),
    #[error("reading its answer: {0}")]
    Read(#[source] std::io::Error),
    #[error("it answered {got} instead of {wanted}")]
    Answer { got: String, wanted: &'static str },
    #[error("its answer is not a request: {0}")]
    NotRequest(#[source] serde_json::Error),
    #[error("{answer} comes with {want} descriptor(s); {got} came")]
    Descriptors { answer: &'static str, want: usize, got: usize },
    #[error("its userfaultfd: {0}")]
    Userfault(#[from] hw::uffd::UffdError),
    #[error("this destination takes no post-copy")]
    NoPostcopy,
    #[error("the VMM mapped {mapped} region(s); the guest has {has}")]
    MappedRegions { mapped: usize, has: usize },
    #[error("the VMM mapped region {region} as {len} bytes at {addr:#x}; it has {size} bytes (page-aligned, whole)")]
    Mapped { region: usize, len: u64, addr: u64, size: u64 },
    #[error("region {region}: {source}")]
    Region { region: usize, source: std::io::Error },
    #[error("region {region}: {source}")]
    RegionUserfault { region: usize, source: hw::uffd::UffdError },
    #[error(
        "a page fault at {0:#x} is outside every region of the guest memory: the VMM registered memory with the userfaultfd that it did not give ferry"
    )]
    FaultOutside(u64),
}

/// Reads a dirty bitmap from its bytes, checking it against regions of `pages` pages
/// each, their bitmaps one after the other: the exact size, and no bit past a region's
/// last page.
pub fn parse_bitmap_regions(raw: &[u8], pages: &[u64]) -> Result<Vec<u64>, BitmapError> {
    let want: u64 = pages.iter().map(|p| p.div_ceil(64) * 8).sum();
    if raw.len() as u64 != want {
        return Err(BitmapError::Size { bytes: raw.len() as u64, pages: pages.iter().sum(), regions: pages.len(), want });
    }
    let words: Vec<u64> = raw.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).collect();
    let mut at = 0;
    for (r, &p) in pages.iter().enumerate() {
        let n = p.div_ceil(64) as usize;
        if let Some(last) = words[at..at + n].last() {
            let used = p - (n as u64 - 1) * 64;
            if used < 64 && last >> used != 0 {
                let bit = 64 - last.leading_zeros() as u64 - 1;
                let region = (pages.len() > 1).then_some(r);
                return Err(BitmapError::PastEnd { page: (n as u64 - 1) * 64 + bit, region, pages: p });
            }
        }
        at += n;
    }
    Ok(words)
}

/// Each page's share of a region digest, replaced when the page is sent (source) or
/// arrives (destination) again. 16 bytes per page: 4 MiB per GiB.
///
/// The digest of the region is the XOR of every page's share, kept up to date as pages are
/// set (each set XORs out the old share and in the new one), so the verdict at the end of
/// a migration reads it at once rather than folding every page while the guest is paused
/// (the fold took 0.65 ms per GiB on each side here: 0.7 s of downtime per side for a
/// 1 TiB guest).
pub(crate) struct PageHashes {
    pages: Vec<AtomicU64>,
    /// The running XOR, in shards on cache lines of their own so that workers setting
    /// pages of different windows rarely touch one line.
    totals: Box<[Shard]>,
}

impl std::fmt::Debug for PageHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHashes").field("pages", &(self.pages.len() / 2)).finish()
    }
}

#[repr(align(64))]
#[derive(Default)]
struct Shard([AtomicU64; 2]);

/// Shards of the running digest; a window of 16 pages maps to one.
const SHARDS: usize = 64;

impl PageHashes {
    /// A table for `pages` pages; an error, not an abort, where the host cannot hold it.
    pub(crate) fn new(pages: u64) -> Result<PageHashes, crate::session::limits::LimitError> {
        let table = crate::session::limits::table_with(pages.saturating_mul(2), || AtomicU64::new(0), "page hashes")?;
        Ok(PageHashes { pages: table, totals: (0..SHARDS).map(|_| Shard::default()).collect() })
    }

    /// Relaxed is enough because the digest is read after the round's threads were joined
    /// or reported over a channel. The running XOR takes atomic XORs, which commute, so
    /// threads setting different pages may share a shard. Nearly always one thread sets a
    /// page in a round (its window's, or the lane that claimed it), but in post-copy the
    /// push and a fault's answer may record the same page at once: each half is swapped,
    /// so every writer XORs out exactly the value it replaced and the running XOR always
    /// matches what the table holds, however the writers interleave.
    pub(crate) fn set(&self, page: u64, d: Digest) {
        let (lo, hi) = (&self.pages[2 * page as usize], &self.pages[2 * page as usize + 1]);
        let (new_lo, new_hi) = (d.0 as u64, (d.0 >> 64) as u64);
        let (old_lo, old_hi) = (lo.swap(new_lo, Ordering::Relaxed), hi.swap(new_hi, Ordering::Relaxed));
        let t = &self.totals[(page >> 4) as usize % SHARDS].0;
        t[0].fetch_xor(old_lo ^ new_lo, Ordering::Relaxed);
        t[1].fetch_xor(old_hi ^ new_hi, Ordering::Relaxed);
    }

    /// The region's digest: every page's share, XORed.
    pub(crate) fn fold(&self) -> Digest {
        let (mut lo, mut hi) = (0u64, 0u64);
        for s in self.totals.iter() {
            lo ^= s.0[0].load(Ordering::Relaxed);
            hi ^= s.0[1].load(Ordering::Relaxed);
        }
        Digest(u128::from(lo) | u128::from(hi) << 64)
    }

    /// [`PageHashes::fold`] the long way, from every page's share (tests).
    #[cfg(test)]
    pub(crate) fn fold_pages(&self) -> Digest {
        self.pages
            .chunks_exact(2)
            .map(|p| Digest(u128::from(p[0].load(Ordering::Relaxed)) | u128::from(p[1].load(Ordering::Relaxed)) << 64))
            .sum()
    }
}

/// What the source's digest covers at the end of a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// Every page as it was last sent (hashed from the very bytes put on the wire),
    /// compared with every page as it landed: proves the destination holds exactly what
    /// was sent, and costs the downtime nothing. It trusts the VMM's dirty log to name
    /// every page written since it was sent.
    #[default]
    Sent,
    /// The paused guest memory itself, read and hashed during the stop-and-copy round on
    /// every CPU: also catches a dirty log that missed a write, at the price of reading
    /// all of guest memory while the guest is paused.
    Full,
}

use crate::BadChoice;

impl std::str::FromStr for Verify {
    type Err = BadChoice;
    fn from_str(s: &str) -> Result<Verify, BadChoice> {
        match s {
            "sent" => Ok(Verify::Sent),
            "full" => Ok(Verify::Full),
            _ => Err(BadChoice { what: "verify", got: s.into(), choices: "sent or full" }),
        }
    }
}

/// What one round (or a whole session) counted: a source worker's share, a destination
/// lane's, or their sums.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RoundCounts {
    pub frames: u64,
    pub wire_bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub compressed_in: u64,
    pub compressed_out: u64,
}

impl std::ops::AddAssign for RoundCounts {
    fn add_assign(&mut self, o: RoundCounts) {
        self.frames += o.frames;
        self.wire_bytes += o.wire_bytes;
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.compressed_in += o.compressed_in;
        self.compressed_out += o.compressed_out;
    }
}

/// One pre-copy round, as the source reports it to the VMM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    /// The stop-and-copy round (the VMM had paused).
    pub last: bool,
    pub dirty_pages: u64,
    pub dirty_bytes: u64,
    pub zero_pages: u64,
    pub wire_bytes: u64,
    pub compressed_in_bytes: u64,
    pub compressed_out_bytes: u64,
    pub frames: u64,
    /// From the round's start until the destination confirmed every page.
    pub seconds: f64,
    /// Of `seconds`, the source's: until its workers had sent every page.
    #[serde(default)]
    pub data_seconds: f64,
    /// Of `seconds`, the rest: the destination's confirmation of the round (and, in the
    /// last round, the verdict: digests compared, memory handed to the destination VMM;
    /// with `verify: full`, the paused source's digest finishing, and over RDMA the
    /// destination's digest of what landed).
    #[serde(default)]
    pub confirm_seconds: f64,
    /// Of `confirm_seconds`, in the last round: the verdict (DONE, the destination's
    /// digest and hand-over to its VMM, RESULT).
    #[serde(default)]
    pub verdict_seconds: f64,
    /// Dirty bytes per second over the round, GB/s (10^9).
    pub gbps: f64,
    /// How fast the guest dirtied memory before this round, GB/s; none for round 0.
    pub dirty_rate_gbps: Option<f64>,
    /// The downtime expected if the VMM paused now: the pages dirtied while this round
    /// ran, at the measured bandwidth, or the paused source's digest if that takes longer.
    pub estimated_downtime_ms: Option<f64>,
    /// Pause now: the estimate fits the budget, or the round limit is reached.
    pub advise_pause: bool,
    /// The guest is not converging (the round limit is reached and the estimate is over
    /// the budget): switch over to post-copy rather than pause for the estimate.
    #[serde(default)]
    pub advise_postcopy: bool,
    /// Why ferry advises what it does, in words.
    #[serde(default)]
    pub advice: String,
}

/// A whole migration, as each side reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub role: String,
    /// Guest memory bytes.
    pub bytes: u64,
    pub rounds: Vec<RoundReport>,
    /// Region bytes sent over all rounds.
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    pub zero_pages: u64,
    pub compressed_in_bytes: u64,
    pub compressed_out_bytes: u64,
    /// From the session's start to the destination's verdict.
    pub seconds: f64,
    /// The stop-and-copy round, including the digest comparison: how long the VMM stays
    /// paused because of ferry.
    pub downtime_ms: f64,
    pub downtime_budget_ms: f64,
    /// user + system CPU seconds of the process per GiB of guest memory.
    pub cpu_seconds_per_gib: f64,
    pub transport: String,
    pub compression: String,
    pub lanes: u32,
    pub workers: u32,
    pub rate_limit_bytes_per_second: Option<u64>,
    /// What the digest covered (source side).
    pub verify: Verify,
    pub digest: String,
    pub digest_match: bool,
    /// Per worker (source): each chunk's time from posting until written, µs.
    #[serde(skip)]
    pub worker_latency: Vec<hdrhistogram::Histogram<u64>>,
    /// RDMA sessions: the device, registration and how the work requests were built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<crate::transport::rdma::RdmaReport>,
    /// Migrations that switched over to post-copy: what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<postcopy::PostcopyReport>,
    /// Post-copy (source): from the VMM's `postcopy` until the destination VMM could run
    /// the guest, ms: ferry's part of the switch-over downtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_ms: Option<f64>,
}

impl MigrationReport {
    /// Region bytes per compressed byte over the chunks sent compressed (1 when none).
    pub fn compression_ratio(&self) -> f64 {
        if self.compressed_out_bytes == 0 { 1.0 } else { self.compressed_in_bytes as f64 / self.compressed_out_bytes as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running digest equals the fold of every page, through replacements, from
    /// several threads setting disjoint pages at once.
    #[test]
    fn the_running_digest_is_the_fold_of_every_page() {
        let h = PageHashes::new(5000).unwrap();
        assert_eq!(h.fold(), Digest::default());
        for round in 0..3u64 {
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let h = &h;
                    s.spawn(move || {
                        // Thread t sets the pages p with p % 4 == t (some twice a round).
                        for p in (t..5000).step_by(4) {
                            if (p + round) % 3 != 0 {
                                h.set(p, Digest::of_page(0, p, &(p * 7 + round).to_le_bytes()));
                            }
                        }
                        for p in (t..5000).step_by(8) {
                            h.set(p, Digest::of_zero_page(0, p, 4096));
                        }
                    });
                }
            });
            assert_eq!(h.fold(), h.fold_pages(), "round {round}");
        }
        assert_ne!(h.fold(), Digest::default());
    }

    /// Threads setting the same pages at once (post-copy's push and a fault's answer
    /// recording one page) leave the running digest equal to the table's fold, whatever
    /// the interleaving: each writer XORs out exactly what it replaced.
    #[test]
    fn writers_of_one_page_at_once_keep_the_digest_whole() {
        let h = PageHashes::new(256).unwrap();
        for round in 0..20u64 {
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let h = &h;
                    s.spawn(move || {
                        for _ in 0..50 {
                            for p in 0..256 {
                                // Two of the four write one value, two another: both kinds race.
                                h.set(p, Digest::of_page(0, p, &(p + round * 1000 + t % 2).to_le_bytes()));
                            }
                        }
                    });
                }
            });
            assert_eq!(h.fold(), h.fold_pages(), "round {round}");
        }
    }

    #[test]
    fn bitmap_size_and_tail_are_checked() {
        assert_eq!(bitmap_bytes(4096 * 64), 8);
        assert_eq!(bitmap_bytes(4096 * 65), 16);
        let mut raw = vec![0u8; 16];
        raw[0] = 0b101;
        assert_eq!(parse_bitmap_regions(&raw, &[65]).unwrap(), vec![5, 0]);
        assert_eq!(parse_bitmap_regions(&raw[..8], &[65]), Err(BitmapError::Size { bytes: 8, pages: 65, regions: 1, want: 16 }));
        raw[8] = 0b10; // page 65 of 65 (pages 0..=64 exist)
        assert_eq!(parse_bitmap_regions(&raw, &[65]), Err(BitmapError::PastEnd { page: 65, region: None, pages: 65 }));
        raw[8] = 0b1;
        assert!(parse_bitmap_regions(&raw, &[65]).is_ok());
        assert!(parse_bitmap_regions(&[0xff; 8], &[64]).is_ok(), "a full last word");
        // Two regions of 3 and 70 pages: one word, then two.
        let mut two = vec![0u8; 24];
        two[0] = 0b111;
        two[16] = 0b11_1111;
        assert_eq!(parse_bitmap_regions(&two, &[3, 70]).unwrap(), vec![7, 0, 63]);
        two[0] = 0b1111;
        let e = parse_bitmap_regions(&two, &[3, 70]).unwrap_err();
        assert_eq!(e, BitmapError::PastEnd { page: 3, region: Some(0), pages: 3 });
        assert!(e.to_string().contains("page 3 past region 0's 3 pages"), "{e}");
        assert_eq!(bitmap_bytes_regions(&[3 * 4096, 70 * 4096]), 24);
    }
}
