//! Where a sending worker's chunks go: its lanes of a session, on one transport. A closed
//! set, dispatched by `match`; every variant keeps one contract:
//!
//! - [`Tx::post`] takes an encoded, unsealed chunk, seals it for a lane and puts it on the
//!   wire (or in flight); the chunk comes back to the worker's spares once the transport
//!   is done with its memory.
//! - [`Tx::reap`] waits for at least one chunk to come back; [`Tx::reclaim`] takes every
//!   chunk back after a failure.
//! - [`Tx::end_round`] waits for every chunk in flight, then ends the round on each lane
//!   with its counts (ROUND_END); [`Tx::end_lanes`] ends the lanes (LANE_END), which a
//!   worker does right after the session's last round.
//!
//! Sockets write each chunk with blocking `writev` calls, lanes in turn. io_uring keeps
//! one write in flight per lane (SEND_ZC where the plan says), so the worker encodes the
//! next chunk while the last ones drain.
//!
//! RDMA ([`rdma`]) carries no frames: the worker hands it whole windows
//! ([`rdma::tx::RdmaTx::send_window`]), which become one-sided WRITEs into the
//! destination's registered memory; a round ends with RDMA_END on the control connection
//! instead of ROUND_END on each lane.

#[cfg(test)]
pub(crate) mod mock;
pub mod rdma;

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::time::Instant;

use hw::uring_send::SendRing;
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
}

impl<S: std::io::Write> Lane<S> {
    pub(crate) fn new(s: S, tx: Seal) -> Lane<S> {
        Lane { s, tx, frames: 0, bytes: 0, pages: 0 }
    }

    fn carried(&mut self, b: &Batch) {
        self.frames += b.frames() as u64;
        self.bytes += b.frames.wire_bytes;
        self.pages += b.frames.pages;
    }

    /// Ends round `round` on this lane with what it carried (ROUND_END), and starts the
    /// counts afresh.
    fn end_round(&mut self, round: u32) -> Result<(), SessionError> {
        let end = wire::RoundEnd {
            round: round.into(),
            _pad: 0.into(),
            frames: self.frames.into(),
            bytes: self.bytes.into(),
            pages: self.pages.into(),
        };
        write_frame(&mut self.s, &mut self.tx, Kind::RoundEnd, end.as_bytes())?;
        (self.frames, self.bytes, self.pages) = (0, 0, 0);
        Ok(())
    }

    /// Ends the lane (LANE_END).
    fn end(&mut self) -> Result<(), SessionError> {
        let end = wire::LaneEnd { frames: 0.into(), bytes: 0.into() };
        write_frame(&mut self.s, &mut self.tx, Kind::LaneEnd, end.as_bytes())
    }
}

/// A worker's lanes on their transport.
pub(crate) enum Tx {
    Sockets {
        lanes: Vec<Lane>,
        turn: usize,
        to: String,
    },
    Uring {
        lanes: Vec<Lane>,
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
    /// blocking sockets; where the ring cannot be made (a seccomp profile refusing
    /// io_uring), sockets, and `note` is told why (once per session).
    pub(crate) fn open(lanes: Vec<Lane>, uring: bool, entries: u32, zero_copy: bool, to: &str, note: &mut dyn FnMut(String)) -> Tx {
        let to = to.to_string();
        if uring {
            let fds: std::io::Result<Vec<OwnedFd>> = lanes.iter().map(|l| l.s.try_clone().map(OwnedFd::from)).collect();
            match fds.and_then(|fds| SendRing::with_zero_copy(entries, fds, zero_copy)) {
                Ok(ring) => {
                    let posted = vec![Instant::now(); lanes.len()];
                    return Tx::Uring { lanes, ring: Box::new(ring), posted, zero_copy, to };
                }
                Err(e) => note(format!("sending with blocking sockets instead of io_uring: the send ring cannot be created ({e})")),
            }
        }
        Tx::Sockets { lanes, turn: 0, to }
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

    /// Puts `b` on a lane: written at once (sockets; `b` is back in `spare` on return) or
    /// in flight (io_uring). `latency` gets each chunk's time from posting to written.
    pub(crate) fn post(
        &mut self,
        mut b: Batch,
        spare: &mut Vec<Batch>,
        latency: &mut hdrhistogram::Histogram<u64>,
    ) -> Result<(), SessionError> {
        match self {
            Tx::Sockets { lanes, turn, to } => {
                let n = lanes.len();
                let lane = &mut lanes[*turn % n];
                *turn += 1;
                b.seal(&mut lane.tx);
                let t = Instant::now();
                let r = b.write(&mut lane.s);
                latency.saturating_record(t.elapsed().as_micros() as u64);
                lane.carried(&b);
                spare.push(b);
                r.map_err(|e| SessionError::io(format!("sending data to {to}"), e))
            }
            Tx::Uring { .. } => {
                let lane = loop {
                    let Tx::Uring { ring, lanes, .. } = self else { unreachable!() };
                    if let Some(l) = (0..lanes.len()).find(|&l| !ring.busy(l)) {
                        break l;
                    }
                    if let Err(e) = self.reap(spare, latency) {
                        spare.push(b);
                        return Err(e);
                    }
                };
                let Tx::Uring { lanes, ring, posted, to, .. } = self else { unreachable!() };
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

    /// Waits until at least one chunk in flight has come back (io_uring); nothing to do on
    /// sockets, whose chunks come back at once.
    pub(crate) fn reap(&mut self, spare: &mut Vec<Batch>, latency: &mut hdrhistogram::Histogram<u64>) -> Result<(), SessionError> {
        #[cfg(test)]
        if let Tx::Mock(m) = self {
            if let Some((b, r)) = m.complete_one() {
                spare.push(b);
                r.map_err(|e| SessionError::io("sending data to the mock", e))?;
            }
            return Ok(());
        }
        if let Tx::Uring { ring, posted, to, .. } = self {
            if !ring.any_busy() {
                return Ok(());
            }
            for (lane, b) in ring.wait().map_err(|e| SessionError::io(format!("sending data to {to}"), e))? {
                latency.saturating_record(posted[lane].elapsed().as_micros() as u64);
                spare.push(b);
            }
        }
        Ok(())
    }

    /// Whether a chunk is in flight (io_uring): [`Tx::reap`] would give one back.
    pub(crate) fn in_flight(&self) -> bool {
        match self {
            Tx::Uring { ring, .. } => ring.any_busy(),
            #[cfg(test)]
            Tx::Mock(m) => !m.in_flight.is_empty(),
            _ => false,
        }
    }

    /// Takes back every chunk still in flight, cancelling its send: after a failure, so
    /// that the worker's arena is whole for the next session. The lanes are unusable
    /// afterwards.
    pub(crate) fn reclaim(&mut self, spare: &mut Vec<Batch>) {
        match self {
            Tx::Uring { ring, .. } => spare.extend(ring.release_all()),
            #[cfg(test)]
            Tx::Mock(m) => spare.extend(m.in_flight.drain(..).map(|(_, b)| b)),
            _ => {}
        }
    }

    /// Waits for every chunk in flight, then ends round `round` on every lane with what
    /// it carried (ROUND_END), and starts the lanes' counts afresh. RDMA lanes end their
    /// round on the control connection: their counts come back, for RDMA_END.
    pub(crate) fn end_round(
        &mut self,
        round: u32,
        spare: &mut Vec<Batch>,
        latency: &mut hdrhistogram::Histogram<u64>,
    ) -> Result<Vec<wire::RdmaLaneEnd>, SessionError> {
        if let Tx::Rdma(t) = self {
            return t.end_round();
        }
        while self.in_flight() {
            self.reap(spare, latency)?;
        }
        #[cfg(test)]
        if let Tx::Mock(m) = self {
            return m.lanes.iter_mut().try_for_each(|l| l.end_round(round)).map(|()| Vec::new());
        }
        self.lanes_mut().iter_mut().try_for_each(|l| l.end_round(round))?;
        Ok(Vec::new())
    }

    /// Ends every lane (LANE_END): the session's data is all sent. (RDMA lanes have no
    /// stream to end.)
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
