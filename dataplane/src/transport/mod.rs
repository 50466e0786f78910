//! Where a sending worker's chunks go: its lanes of a session, on one transport. A closed
//! set, dispatched by `match`; every variant keeps one contract, and no call waits on a
//! peer (a pool thread serves other sessions while this one's lanes are full):
//!
//! - [`Tx::post`] takes an encoded, unsealed chunk, seals it for a free lane
//!   ([`Tx::ready`] says there is one) and starts it on the wire; the chunk comes back to
//!   the worker's spares once the transport is done with its memory.
//! - [`Tx::reap`] takes back the chunks done by now; [`Tx::wait_fds`] says what to wait on
//!   for more; [`Tx::reclaim`] takes every chunk back after a failure.
//! - [`Tx::end_round`] ends a round once every chunk is back: ROUND_END on each lane with
//!   its counts (and LANE_END after the session's last round); until the lanes have taken
//!   them it says so, to be called again.
//!
//! Sockets write each chunk with nonblocking `sendmsg` calls, as far as the socket takes
//! it, and go on where they stopped once it has room: a lane at a time writes a chunk.
//! io_uring keeps one write in flight per lane (SEND_ZC where the plan says), so the
//! worker encodes the next chunk while the last ones drain.
//!
//! RDMA ([`rdma`]) carries no frames: the worker hands it whole windows
//! ([`rdma::tx::RdmaTx::send_window`]), which become one-sided WRITEs into the
//! destination's registered memory; a round ends with RDMA_END on the control connection
//! instead of ROUND_END on each lane.

#[cfg(test)]
pub(crate) mod mock;
pub mod rdma;

use std::io::IoSlice;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use hw::uring_send::SendRing;
use nix::poll::{PollFd, PollFlags};
use zerocopy::IntoBytes;

use crate::chunk::Batch;
use crate::conn::{Bug, SessionError, write_frame};
use crate::session::seal::Seal;
use crate::wire::{self, Kind};

/// One data connection of a sending worker, and what it carried in the current round.
/// (The mock transport's lanes are the same over an in-memory pipe.)
#[derive(Debug)]
pub(crate) struct Lane<S = TcpStream> {
    pub s: S,
    pub tx: Seal,
    frames: u64,
    bytes: u64,
    pages: u64,
    /// Sealed frames (a round's end) the socket has not taken yet, from `out_at`.
    out: Vec<u8>,
    out_at: usize,
}

impl<S: std::io::Write> Lane<S> {
    pub(crate) fn new(s: S, tx: Seal) -> Lane<S> {
        Lane { s, tx, frames: 0, bytes: 0, pages: 0, out: Vec::new(), out_at: 0 }
    }

    fn carried(&mut self, b: &Batch) {
        self.frames += b.frames() as u64;
        self.bytes += b.frames.wire_bytes;
        self.pages += b.frames.pages;
    }

    /// Round `round`'s end on this lane, with what it carried (ROUND_END's payload); the
    /// counts start afresh.
    fn round_end(&mut self, round: u32) -> wire::RoundEnd {
        let end = wire::RoundEnd {
            round: round.into(),
            _pad: 0.into(),
            frames: self.frames.into(),
            bytes: self.bytes.into(),
            pages: self.pages.into(),
        };
        (self.frames, self.bytes, self.pages) = (0, 0, 0);
        end
    }

    /// Ends round `round` on this lane at once (ROUND_END).
    #[cfg(test)]
    fn end_round(&mut self, round: u32) -> Result<(), SessionError> {
        let end = self.round_end(round);
        write_frame(&mut self.s, &mut self.tx, Kind::RoundEnd, end.as_bytes())
    }

    /// Ends the lane (LANE_END).
    fn end(&mut self) -> Result<(), SessionError> {
        let end = wire::LaneEnd { frames: 0.into(), bytes: 0.into() };
        write_frame(&mut self.s, &mut self.tx, Kind::LaneEnd, end.as_bytes())
    }
}

impl Lane {
    /// Queues round `round`'s end (ROUND_END, and LANE_END after the session's `last`
    /// round) for [`Lane::flush`].
    fn queue_end(&mut self, round: u32, last: bool) -> Result<(), SessionError> {
        let end = self.round_end(round);
        write_frame(&mut self.out, &mut self.tx, Kind::RoundEnd, end.as_bytes())?;
        if last {
            let end = wire::LaneEnd { frames: 0.into(), bytes: 0.into() };
            write_frame(&mut self.out, &mut self.tx, Kind::LaneEnd, end.as_bytes())?;
        }
        Ok(())
    }

    /// Writes the queued frames as far as the socket takes them now: `true` once none is
    /// left.
    fn flush(&mut self) -> std::io::Result<bool> {
        while self.out_at < self.out.len() {
            match sent_now(&self.s, &[IoSlice::new(&self.out[self.out_at..])])? {
                Some(n) => self.out_at += n,
                None => return Ok(false),
            }
        }
        self.out.clear();
        self.out_at = 0;
        Ok(true)
    }
}

/// A chunk a socket lane is writing: how far it got, and since when.
pub(crate) struct Writing {
    b: Batch,
    at: usize,
    since: Instant,
}

impl Writing {
    /// Writes the rest of the chunk as far as `s` takes it now: `true` once all of it is
    /// written.
    fn more(&mut self, s: &TcpStream) -> std::io::Result<bool> {
        // IOV_MAX slices at most a call (on the stack: a step allocates nothing); a short
        // write comes round again for the rest.
        let mut bufs = [IoSlice::new(&[]); 1024];
        loop {
            let (mut skip, mut k) = (self.at, 0);
            self.b.slices(&mut |x| {
                if skip >= x.len() {
                    skip -= x.len();
                } else if k < bufs.len() {
                    bufs[k] = IoSlice::new(&x[skip..]);
                    (skip, k) = (0, k + 1);
                }
            });
            if k == 0 {
                return Ok(true);
            }
            match sent_now(s, &bufs[..k])? {
                Some(n) => self.at += n,
                None => return Ok(false),
            }
        }
    }
}

/// What [`hw::net::send_now`] wrote of `bufs`: some bytes, or none because the socket is
/// full (`None`); a socket that takes nothing is an error.
fn sent_now(s: &TcpStream, bufs: &[IoSlice<'_>]) -> std::io::Result<Option<usize>> {
    match hw::net::send_now(s, bufs) {
        Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// A worker's lanes on their transport.
pub(crate) enum Tx {
    Sockets {
        lanes: Vec<Lane>,
        /// Per lane, the chunk it is writing.
        writing: Vec<Option<Writing>>,
        turn: usize,
        to: String,
    },
    Uring {
        lanes: Vec<Lane>,
        turn: usize,
        ring: Box<SendRing<Batch>>,
        posted: Vec<Instant>,
        zero_copy: bool,
        to: String,
    },
    Rdma(Box<rdma::tx::RdmaTx>),
    /// In-memory lanes for tests ([`mock`]).
    #[cfg(test)]
    Mock(Box<mock::MockTx>),
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").field("transport", &self.transport()).field("lanes", &self.lane_count()).finish()
    }
}

impl Tx {
    /// Lanes over io_uring when `uring` (with zero-copy sends when `zero_copy`), or
    /// plain sockets; where the ring cannot be made (a seccomp profile refusing
    /// io_uring), sockets, and `note` is told why (once per session).
    pub(crate) fn open(lanes: Vec<Lane>, uring: bool, entries: u32, zero_copy: bool, to: &str, note: &mut dyn FnMut(String)) -> Tx {
        let to = to.to_string();
        if uring {
            let fds: std::io::Result<Vec<OwnedFd>> = lanes.iter().map(|l| l.s.try_clone().map(OwnedFd::from)).collect();
            match fds.and_then(|fds| SendRing::with_zero_copy(entries, fds, zero_copy)) {
                Ok(ring) => {
                    let posted = vec![Instant::now(); lanes.len()];
                    return Tx::Uring { lanes, turn: 0, ring: Box::new(ring), posted, zero_copy, to };
                }
                Err(e) => note(format!("sending with plain sockets instead of io_uring: the send ring cannot be created ({e})")),
            }
        }
        let writing = lanes.iter().map(|_| None).collect();
        Tx::Sockets { lanes, writing, turn: 0, to }
    }

    /// The transport these lanes run on.
    pub(crate) fn transport(&self) -> crate::plan::Transport {
        match self {
            Tx::Sockets { .. } => crate::plan::Transport::Sockets,
            Tx::Uring { .. } => crate::plan::Transport::Tcp,
            Tx::Rdma(_) => crate::plan::Transport::Rdma,
            // A stream transport, like the sockets it stands in for.
            #[cfg(test)]
            Tx::Mock(_) => crate::plan::Transport::Sockets,
        }
    }

    pub(crate) fn lane_count(&self) -> usize {
        match self {
            Tx::Sockets { lanes, .. } | Tx::Uring { lanes, .. } => lanes.len(),
            Tx::Rdma(t) => t.lanes(),
            #[cfg(test)]
            Tx::Mock(m) => m.lanes.len(),
        }
    }

    /// Chunks a worker needs to keep `lanes` TCP lanes busy: one in flight per lane and
    /// one being encoded; with zero copy a written chunk stays held until the kernel's
    /// notification while its lane takes the next, so two more per lane. (RDMA reads
    /// windows into registered slots of its own.)
    pub(crate) fn chunks_for(lanes: usize, zero_copy: bool) -> usize {
        if zero_copy { 3 * lanes + 1 } else { lanes + 1 }
    }

    /// Whether a lane is free to take a chunk ([`Tx::post`]).
    pub(crate) fn ready(&self) -> bool {
        match self {
            Tx::Sockets { writing, .. } => writing.iter().any(Option::is_none),
            Tx::Uring { ring, lanes, .. } => (0..lanes.len()).any(|l| !ring.busy(l)),
            // RDMA takes windows; the mock completes a chunk to free a lane.
            _ => true,
        }
    }

    /// Starts `b` on a free lane (there must be one: [`Tx::ready`]): on sockets as much of
    /// it as the socket takes now, the rest as it drains; on io_uring in flight. `b` comes
    /// back to `spare` once written ([`Tx::reap`]); `latency` gets each chunk's time from
    /// posting to written.
    pub(crate) fn post(
        &mut self,
        mut b: Batch,
        spare: &mut Vec<Batch>,
        latency: &mut hdrhistogram::Histogram<u64>,
    ) -> Result<(), SessionError> {
        match self {
            Tx::Sockets { lanes, writing, turn, to } => {
                let n = lanes.len();
                let Some(l) = (0..n).map(|i| (*turn + i) % n).find(|&l| writing[l].is_none()) else {
                    spare.push(b);
                    return Err(Bug::NoFreeLane.into());
                };
                *turn = l + 1;
                b.seal(&mut lanes[l].tx);
                lanes[l].carried(&b);
                let mut w = Writing { b, at: 0, since: Instant::now() };
                match w.more(&lanes[l].s) {
                    Ok(true) => {
                        latency.saturating_record(w.since.elapsed().as_micros() as u64);
                        spare.push(w.b);
                        Ok(())
                    }
                    Ok(false) => {
                        writing[l] = Some(w);
                        Ok(())
                    }
                    Err(e) => {
                        spare.push(w.b);
                        Err(SessionError::io(format!("sending data to {to}"), e))
                    }
                }
            }
            Tx::Uring { lanes, turn, ring, posted, to, .. } => {
                // Lanes in turn, so every lane carries its share however soon the last
                // one's write came back.
                let n = lanes.len();
                let Some(lane) = (0..n).map(|i| (*turn + i) % n).find(|&l| !ring.busy(l)) else {
                    spare.push(b);
                    return Err(Bug::NoFreeLane.into());
                };
                *turn = lane + 1;
                b.seal(&mut lanes[lane].tx);
                lanes[lane].carried(&b);
                posted[lane] = Instant::now();
                ring.submit(lane, b).map_err(|(e, b)| {
                    spare.push(b);
                    SessionError::io(format!("sending data to {to}"), e)
                })
            }
            Tx::Rdma(_) => {
                spare.push(b);
                Err(Bug::ChunkOnRdma.into())
            }
            #[cfg(test)]
            Tx::Mock(m) => {
                let lane = loop {
                    if let Some(l) = m.free_lane() {
                        break l;
                    }
                    let (done, r) = m.complete_one().expect("every lane busy: a chunk is in flight");
                    spare.push(done);
                    if let Err(e) = r {
                        spare.push(b);
                        return Err(SessionError::io("sending data to the mock", e));
                    }
                };
                let l = &mut m.lanes[lane];
                b.seal(&mut l.tx);
                l.carried(&b);
                m.in_flight.push_back((lane, b));
                Ok(())
            }
        }
    }

    /// Takes back the chunks written by now, without waiting (sockets write on where
    /// they stopped): whether any came back.
    pub(crate) fn reap(&mut self, spare: &mut Vec<Batch>, latency: &mut hdrhistogram::Histogram<u64>) -> Result<bool, SessionError> {
        match self {
            Tx::Sockets { lanes, writing, to, .. } => {
                let mut back = false;
                for (lane, slot) in lanes.iter().zip(writing.iter_mut()) {
                    let Some(w) = slot else { continue };
                    match w.more(&lane.s) {
                        Ok(false) => {}
                        Ok(true) => {
                            let w = slot.take().expect("writing");
                            latency.saturating_record(w.since.elapsed().as_micros() as u64);
                            spare.push(w.b);
                            back = true;
                        }
                        Err(e) => {
                            spare.push(slot.take().expect("writing").b);
                            return Err(SessionError::io(format!("sending data to {to}"), e));
                        }
                    }
                }
                Ok(back)
            }
            Tx::Uring { ring, posted, to, .. } => {
                if !ring.any_busy() {
                    return Ok(false);
                }
                let done = ring.reap_ready().map_err(|e| SessionError::io(format!("sending data to {to}"), e))?;
                let back = !done.is_empty();
                for (lane, b) in done {
                    latency.saturating_record(posted[lane].elapsed().as_micros() as u64);
                    spare.push(b);
                }
                Ok(back)
            }
            Tx::Rdma(_) => Ok(false),
            // At its strictest, the mock keeps a chunk in flight until the worker cannot
            // go on without one back (every lane busy, or no spare chunk).
            #[cfg(test)]
            Tx::Mock(m) if !spare.is_empty() && m.in_flight.len() < m.lanes.len() => Ok(false),
            #[cfg(test)]
            Tx::Mock(m) => match m.complete_one() {
                Some((b, r)) => {
                    spare.push(b);
                    r.map_err(|e| SessionError::io("sending data to the mock", e))?;
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }

    /// Whether a chunk is in flight: [`Tx::reap`] gives it back once written.
    pub(crate) fn in_flight(&self) -> bool {
        match self {
            Tx::Sockets { writing, .. } => writing.iter().any(Option::is_some),
            Tx::Uring { ring, .. } => ring.any_busy(),
            #[cfg(test)]
            Tx::Mock(m) => !m.in_flight.is_empty(),
            _ => false,
        }
    }

    /// What to wait on until [`Tx::reap`] or [`Tx::end_round`] can get further: the
    /// io_uring ring (completions), sockets with bytes still to write (room), an RDMA CQ
    /// armed for the receiver's credits. Nothing when nothing is under way.
    pub(crate) fn wait_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) {
        let lanes = match self {
            Tx::Sockets { lanes, writing, .. } => {
                let busy = lanes.iter().zip(writing).filter(|(_, w)| w.is_some());
                fds.extend(busy.map(|(l, _)| PollFd::new(l.s.as_fd(), PollFlags::POLLOUT)));
                lanes
            }
            Tx::Uring { lanes, ring, .. } => {
                if ring.any_busy() {
                    fds.push(PollFd::new(ring.as_fd(), PollFlags::POLLIN));
                }
                lanes
            }
            Tx::Rdma(t) => {
                fds.extend(t.wait_fd().map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
                return;
            }
            #[cfg(test)]
            Tx::Mock(_) => return,
        };
        fds.extend(lanes.iter().filter(|l| l.out_at < l.out.len()).map(|l| PollFd::new(l.s.as_fd(), PollFlags::POLLOUT)));
    }

    /// Takes back every chunk still in flight, cancelling its send: after a failure, so
    /// that the worker's arena is whole for the next session. The lanes are unusable
    /// afterwards.
    pub(crate) fn reclaim(&mut self, spare: &mut Vec<Batch>) {
        match self {
            Tx::Sockets { writing, .. } => spare.extend(writing.iter_mut().filter_map(Option::take).map(|w| w.b)),
            Tx::Uring { ring, .. } => spare.extend(ring.release_all()),
            #[cfg(test)]
            Tx::Mock(m) => spare.extend(m.in_flight.drain(..).map(|(_, b)| b)),
            _ => {}
        }
    }

    /// Ends round `round` once every chunk is back: ROUND_END on every lane with what it
    /// carried (and LANE_END after the session's `last` round), the lanes' counts started
    /// afresh. `None` until the lanes have taken it all: call again (`queued` keeps
    /// whether the frames are queued). RDMA lanes end their round on the control
    /// connection: their counts come back, for RDMA_END.
    pub(crate) fn end_round(
        &mut self,
        (round, last): (u32, bool),
        queued: &mut bool,
        spare: &mut Vec<Batch>,
        latency: &mut hdrhistogram::Histogram<u64>,
    ) -> Result<Option<Vec<wire::RdmaLaneEnd>>, SessionError> {
        if let Tx::Rdma(t) = self {
            return t.end_round().map(Some);
        }
        #[cfg(test)]
        if let Tx::Mock(m) = self {
            while let Some((b, r)) = m.complete_one() {
                spare.push(b);
                r.map_err(|e| SessionError::io("sending data to the mock", e))?;
            }
            m.lanes.iter_mut().try_for_each(|l| l.end_round(round))?;
            if last {
                m.lanes.iter_mut().try_for_each(Lane::end)?;
            }
            return Ok(Some(Vec::new()));
        }
        self.reap(spare, latency)?;
        if self.in_flight() {
            return Ok(None);
        }
        let (Tx::Sockets { lanes, to, .. } | Tx::Uring { lanes, to, .. }) = self else { unreachable!("RDMA and the mock end above") };
        if !*queued {
            lanes.iter_mut().try_for_each(|l| l.queue_end(round, last))?;
            *queued = true;
        }
        let mut all = true;
        for l in lanes.iter_mut() {
            all &= l.flush().map_err(|e| SessionError::io(format!("sending data to {to}"), e))?;
        }
        Ok(all.then(Vec::new))
    }

    /// Ends every lane (LANE_END) between rounds, waiting for the sockets to take it: the
    /// session's data is all sent (post-copy's switch-over, on the session's own thread).
    /// (RDMA lanes have no stream to end.)
    pub(crate) fn end_lanes(&mut self) -> Result<(), SessionError> {
        #[cfg(test)]
        if let Tx::Mock(m) = self {
            return m.lanes.iter_mut().try_for_each(Lane::end);
        }
        self.lanes_mut().iter_mut().try_for_each(Lane::end)
    }

    fn lanes_mut(&mut self) -> &mut [Lane] {
        match self {
            Tx::Sockets { lanes, .. } | Tx::Uring { lanes, .. } => lanes,
            Tx::Rdma(_) => &mut [],
            #[cfg(test)]
            Tx::Mock(_) => &mut [],
        }
    }

    /// io_uring zero-copy counters, when the lanes use it.
    pub(crate) fn zero_copy_stats(&self) -> Option<hw::uring_send::ZcStats> {
        match self {
            Tx::Uring { ring, zero_copy: true, .. } => Some(ring.zero_copy_stats()),
            _ => None,
        }
    }
}
