//! A transport for tests: lanes that are in-memory pipes. It keeps the contract at its
//! strictest: a posted chunk stays in flight (one per lane, as on io_uring) and its bytes
//! are taken only when it completes, so a worker that touched a chunk before it came back
//! would send the wrong bytes; a reader that goes away fails the next write, as a peer
//! that dies does.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};

use super::Lane;
use crate::chunk::Batch;
use crate::session::seal::Seal;

/// The writing end of a pipe: each write is a message, at most `depth` of them unread
/// (then a write waits, as a full socket buffer makes it).
#[derive(Debug)]
pub(crate) struct PipeWriter(SyncSender<Vec<u8>>);

/// The reading end.
#[derive(Debug)]
pub(crate) struct PipeReader {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    at: usize,
}

/// A pipe holding at most `depth` unread writes.
pub(crate) fn pipe(depth: usize) -> (PipeWriter, PipeReader) {
    let (tx, rx) = sync_channel(depth);
    (PipeWriter(tx), PipeReader { rx, cur: Vec::new(), at: 0 })
}

impl Write for PipeWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.send(b.to_vec()).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for PipeReader {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        while self.at == self.cur.len() {
            // Silent for long: timed out, as a socket with a read timeout (a test waiting
            // for bytes that never come fails instead of hanging).
            match self.rx.recv_timeout(std::time::Duration::from_secs(30)) {
                Ok(v) => (self.cur, self.at) = (v, 0),
                Err(RecvTimeoutError::Timeout) => return Err(io::Error::from(io::ErrorKind::TimedOut)),
                // Every writer is gone: the end of the stream.
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let n = b.len().min(self.cur.len() - self.at);
        b[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A worker's mock lanes.
#[derive(Debug)]
pub(crate) struct MockTx {
    pub lanes: Vec<Lane<PipeWriter>>,
    /// Chunks posted and not yet written, oldest first, with their lane.
    pub in_flight: VecDeque<(usize, Batch)>,
    turn: usize,
}

impl MockTx {
    pub(crate) fn new(lanes: Vec<(PipeWriter, Seal)>) -> MockTx {
        let lanes = lanes.into_iter().map(|(w, tx)| Lane::new(w, tx)).collect();
        MockTx { lanes, in_flight: VecDeque::new(), turn: 0 }
    }

    /// The next lane with nothing in flight, if any.
    pub(crate) fn free_lane(&mut self) -> Option<usize> {
        let n = self.lanes.len();
        let l = (0..n).map(|i| (self.turn + i) % n).find(|&l| !self.in_flight.iter().any(|(x, _)| *x == l))?;
        self.turn = l + 1;
        Some(l)
    }

    /// Writes the oldest chunk in flight to its lane and hands it back, with whether the
    /// write succeeded (the chunk is the worker's again either way).
    pub(crate) fn complete_one(&mut self) -> Option<(Batch, io::Result<()>)> {
        let (lane, b) = self.in_flight.pop_front()?;
        let mut bufs: Vec<&[u8]> = Vec::new();
        b.slices(&mut |s| bufs.push(s));
        let w = &mut self.lanes[lane].s;
        let r = bufs.iter().try_for_each(|s| w.write_all(s));
        drop(bufs);
        Some((b, r))
    }
}
