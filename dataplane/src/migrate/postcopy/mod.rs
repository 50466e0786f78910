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

//! After RDMA rounds the destination reads faulting pages from the source's memory with
//! RDMA READs instead of asking on the fault lane ([`rdma`]); the push stays on TCP lanes.
//!
//! The pieces: [`placement`] (the destination's page state and fault resolution), [`dest`]
//! (the switch-over and the attempts at the destination), [`source`] (the source's
//! answers to faults) and [`rdma`] (the READ path at both ends).

pub(crate) mod dest;
pub(crate) mod placement;
pub(crate) mod rdma;
pub(crate) mod source;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use crate::conn::{Ctl, SessionError, Violation};
use crate::wire::{self, Kind, RdmaRun};

pub(crate) use dest::{Precopy, switch_over};
pub(crate) use placement::Placement;
pub(crate) use source::{HINTS, Near, answer_fetches};

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
    /// Stale pages placed by a fault's fetch, and by the background push (destination).
    /// At the source, `pages_by_fault` counts the pages it answered FETCHes with in the
    /// attempt that completed (answers in a failed attempt may never have arrived), some
    /// of which the push had placed first.
    pub pages_by_fault: u64,
    pub pages_by_push: u64,
    /// How the destination got faulting pages: "rdma_read" (RDMA READs from the source's
    /// memory, no source CPU on the path; after RDMA rounds) or "fault_lane" (FETCH
    /// answered by the source on a TCP lane of their own). Either way, through the
    /// attempt that completed.
    #[serde(default)]
    pub fault_path: String,
    /// Pages RDMA READs brought (some of which the push had placed first).
    #[serde(default)]
    pub rdma_read_pages: u64,
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
    let mut runs = Vec::new();
    while (runs.len() as u64) < n {
        ctl.expect(Kind::Runs, buf)?;
        let list = <[RdmaRun]>::ref_from_bytes(buf).map_err(|_| Violation::Length { frame: Kind::Runs, len: buf.len(), what: "runs" })?;
        if list.is_empty() || list.len() > wire::RDMA_RUNS_PER_FRAME || runs.len() as u64 + list.len() as u64 > n {
            let allowed = "1 to RDMA_RUNS_PER_FRAME, within the head frame's count";
            return Err(Violation::Field { frame: Kind::Runs, field: "runs", value: list.len() as u64, allowed }.into());
        }
        runs.extend_from_slice(list);
    }
    Ok((runs, head.count.get()))
}

/// The bitmap (words of every region in turn) that `runs` mark, for regions of `pages`
/// pages each; a run outside them is refused, named as `what`'s (SWITCH, NEEDED).
pub(crate) fn runs_to_bitmap(runs: &[RdmaRun], pages: &[u64], what: Kind) -> Result<Vec<u64>, SessionError> {
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
            return Err(Violation::NoRegion { frame: what, region: r as u64, regions: pages.len() }.into());
        };
        let Some(end) = first.checked_add(n).filter(|&e| n > 0 && e <= total) else {
            return Err(Violation::OutsideRegion { frame: what, region: r as u32, first, pages: n, has: total }.into());
        };
        for k in first / 64..end.div_ceil(64) {
            bits[starts[r] + k as usize] |= crate::worker::word_mask(k, first, end);
        }
    }
    Ok(bits)
}

/// Whether `e` is the link failing (the attempt may be retried), not the session.
/// How often the destination pings the source on the fault lane.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// A fault lane that hears nothing for this long (at the destination: no answer and no
/// PONG; at the source: no FETCH and no PING) is a broken link, even if TCP still holds
/// the connection (a partition that drops everything silently, a middlebox that keeps it
/// open): the attempt ends and the source reconnects. The guest waits on its faults
/// meanwhile, so this bounds how long a silent link can hold it before recovery starts.
pub const SILENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// A fault lane's read that timed out: the link went silent (said as such).
pub(crate) fn silent_link(e: SessionError) -> SessionError {
    match e {
        SessionError::TimedOut { op, .. } => SessionError::TimedOut {
            op: format!(
                "{op}: the link went silent (nothing for {} s though the lane pings every {} s)",
                SILENCE.as_secs(),
                HEARTBEAT.as_secs()
            ),
            secs: SILENCE.as_secs(),
        },
        e => e,
    }
}

/// A failure the next attempt may get past: the link's (a connection closed, reset or
/// silent; an RDMA READ that failed, which is what a broken link does to one).
pub(crate) fn is_link_failure(e: &SessionError) -> bool {
    matches!(e, SessionError::PeerClosed { .. } | SessionError::Io { .. } | SessionError::TimedOut { .. } | SessionError::Completion { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(region: u32, first: u64, pages: u32) -> RdmaRun {
        RdmaRun { region: region.into(), pages: pages.into(), first: first.into() }
    }

    /// NEEDED's runs become the bitmap a round sends; runs outside the regions are refused.
    #[test]
    fn needed_runs_make_a_checked_bitmap() {
        // Regions of 70 and 3 pages: words 0-1, then word 2.
        let bits = runs_to_bitmap(&[run(0, 63, 2), run(1, 2, 1)], &[70, 3], Kind::Needed).unwrap();
        assert_eq!(bits, vec![1 << 63, 1, 1 << 2]);
        // Whole words, and a run across three.
        let bits = runs_to_bitmap(&[run(0, 3, 2), run(0, 60, 70)], &[130], Kind::Switch).unwrap();
        assert_eq!(bits, vec![0b11000 | (0b1111 << 60), u64::MAX, 0b11]);
        for (bad, want) in [
            (run(2, 0, 1), "region 2"),
            (run(1, 2, 2), "pages 2+2 of region 1"),
            (run(0, u64::MAX, 1), "of region 0"),
            (run(0, 0, 0), "pages 0+0"),
        ] {
            let err = runs_to_bitmap(&[bad], &[70, 3], Kind::Needed).unwrap_err();
            assert!(matches!(err, SessionError::Protocol(Violation::NoRegion { .. } | Violation::OutsideRegion { .. })), "{err:?}");
            let err = err.to_string();
            assert!(err.contains(want) && err.contains("Needed names"), "{err}");
        }
    }
}
