//! The VMM's side of region mode, over `ferryd`'s control socket: what a VMM (or
//! `ferryctl demo`) calls to migrate its guest memory through ferry.
//!
//! Source VMM, one connection per migration (JSON lines; descriptors by SCM_RIGHTS):
//!
//! ```text
//!  VMM                                                        source ferryd
//!   │── {"cmd":"migrate_out","to":..,...} + [memory fd, bitmap fd] ─►│  connects to the destination
//!   │◄─ {"event":"connected","bytes":..,"lanes":..} ────────────────│
//!   │── {"cmd":"round"} ───────────────────────────────────────────►│  round 0: every page
//!   │◄─ {"event":"round",...,"advise_pause":false} ─────────────────│
//!   │   (writes the pages dirtied since into the bitmap memfd)       │
//!   │── {"cmd":"round"} ───────────────────────────────────────────►│  the bitmap's pages
//!   │◄─ {"event":"round",...,"advise_pause":true} ──────────────────│
//!   │   (pauses the vCPUs, writes the last bitmap)                   │
//!   │── {"cmd":"final"} ───────────────────────────────────────────►│  stop-and-copy, digests
//!   │◄─ {"ok":true,"report":{...}} or {"ok":false,"error":"..","kind":".."} │
//! ```
//!
//! Guest memory in several memory files (slots, NUMA nodes) goes as several regions: their
//! descriptors in order, then the bitmap's, which holds each region's bitmap in turn.
//!
//! Destination VMM, one connection per migration:
//!
//! ```text
//!  VMM                                                     destination ferryd
//!   │── {"cmd":"migrate_in","listen":"HOST:PORT"} ───────────────►│
//!   │◄─ {"event":"listening","addr":..} ──────────────────────────│  the source connects
//!   │                                                             │  rounds, digest check
//!   │◄─ {"event":"memory","regions":N,"report":{...}} + N memfds ─│  verified memory
//!   │── {"cmd":"taken"} ─────────────────────────────────────────►│  the VMM holds it
//!   │                                                             │  RESULT to the source
//!   │◄─ {"ok":true,"report":{...}} ───────────────────────────────│  the source knows: run
//! ```
//!
//! Post-copy (see [`super::postcopy`]): instead of `final`, the paused source VMM sends
//! `{"cmd":"postcopy"}`; the destination VMM gets the memory at once and serves it to
//! the guest through a userfaultfd that ferryd resolves:
//!
//! ```text
//!  source VMM      source ferryd        destination ferryd          destination VMM
//!   │── postcopy ─────►│── SWITCH ──────────►│── {"event":"postcopy"} + memfds ─►│ maps, registers
//!   │                  │                     │◄─ {"cmd":"faults","maps":[..]} + uffd ─│
//!   │                  │◄─ SWITCHED ─────────│── {"event":"running"} ───────────►│ runs the guest
//!   │◄─ {"event":"switched"} (never resume)  │   faults fetched first, the rest pushed
//!   │◄─ {"ok":true,"report"} ───────────────►│── {"event":"local"} ────────────►│ unregisters
//!   │                  │                     │◄─ {"cmd":"released"} ────────────│
//!   │                  │                     │── {"ok":true,"report"} ─────────►│
//! ```
//!
//! The events and replies are [`crate::protocol`]'s types, and this module's calls read them
//! through [`crate::client::Client`]; a failure's `kind` is a [`crate::metrics::Failure`].
//!
//! The memfds come in the source's order, one per region. The VMM runs the guest only
//! after the final `{"ok":true}` (post-copy: after `running`); an `{"ok":false,"error":..,"kind":..}` instead (at any point)
//! means the migration failed and memory it was handed must be discarded. Closing the
//! connection before `taken` cancels the migration: the source is told, and its VMM
//! resumes the guest.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use crate::client::Client;
pub use crate::client::ClientError;
use crate::daemon::Request;
use crate::protocol::{Connected, Done, Event, MigratedIn};

use super::{MigrationReport, RoundReport};

/// Limits for a migration, as a VMM asks for them: the one limits type,
/// [`super::MigrationLimits`].
pub type OutOptions = super::MigrationLimits;

/// An outgoing migration, driven round by round.
#[derive(Debug)]
pub struct MigrateOut {
    conn: Client,
    /// The `connected` event: the destination, the guest's bytes, regions and lanes.
    pub connected: Connected,
}

impl MigrateOut {
    /// Hands `memory` and `bitmap` to the ferryd at `socket` and connects it to the
    /// destination ferryd at `to`.
    pub fn start(socket: &Path, to: &str, memory: &File, bitmap: &File, o: &OutOptions) -> Result<MigrateOut, ClientError> {
        MigrateOut::start_regions(socket, to, &[memory], bitmap, o)
    }

    /// [`MigrateOut::start`] for guest memory in several memory files, each a region; the
    /// bitmap holds each region's bitmap in turn.
    pub fn start_regions(socket: &Path, to: &str, memory: &[&File], bitmap: &File, o: &OutOptions) -> Result<MigrateOut, ClientError> {
        let mut conn = Client::connect(socket)?;
        let req = Request::migrate_out(to, Some(memory.len()), o);
        let mut fds: Vec<_> = memory.iter().map(|m| m.as_fd()).collect();
        fds.push(bitmap.as_fd());
        conn.send(&req, &fds)?;
        match conn.event("connected")? {
            (Event::Connected(connected), _) => Ok(MigrateOut { conn, connected }),
            (other, _) => Err(ClientError::unexpected(&other, "connected")),
        }
    }

    /// A pre-copy round over the pages the bitmap memfd marks now (round 0: all).
    pub fn round(&mut self) -> Result<RoundReport, ClientError> {
        self.conn.send(&Request::Round, &[])?;
        match self.conn.event("a round report")? {
            (Event::Round { round }, _) => Ok(round),
            (other, _) => Err(ClientError::unexpected(&other, "a round report")),
        }
    }

    /// The stop-and-copy round after the VMM paused; the report once the destination
    /// verified the memory.
    pub fn finish(mut self) -> Result<MigrationReport, ClientError> {
        self.conn.send(&Request::Final, &[])?;
        Ok(self.conn.done::<Done<MigrationReport>>("the report")?.report)
    }

    /// The switch-over to post-copy after the VMM paused and wrote the final bitmap: returns
    /// once the destination runs the guest. From then on this VMM must not resume it.
    pub fn postcopy(mut self) -> Result<PostcopyOut, ClientError> {
        self.conn.send(&Request::Postcopy, &[])?;
        match self.conn.event("the switch-over")? {
            (Event::Switched { switch_ms }, _) => Ok(PostcopyOut { conn: self.conn, switch_ms }),
            (other, _) => Err(ClientError::unexpected(&other, "the switch-over")),
        }
    }
}

/// A migration in post-copy, from the source VMM's side.
#[derive(Debug)]
pub struct PostcopyOut {
    conn: Client,
    /// ferry's part of the switch-over: from `postcopy` until the destination ran the guest.
    pub switch_ms: f64,
}

impl PostcopyOut {
    /// Blocks until every page is at the destination and verified: the report; or why not
    /// (the guest then cannot complete, and this VMM keeps its memory).
    pub fn wait(mut self) -> Result<MigrationReport, ClientError> {
        Ok(self.conn.done::<Done<MigrationReport>>("the report")?.report)
    }
}

/// What arrives at the destination VMM.
#[derive(Debug)]
pub enum Arrival {
    /// Pre-copy: the verified memory, taken, and the report.
    Memory(Vec<File>, Box<MigrationReport>),
    /// Post-copy: memory to map and register before the guest may run.
    Postcopy(PostcopyIn),
}

/// A migration that switched over to post-copy, from the destination VMM's side.
#[derive(Debug)]
pub struct PostcopyIn {
    conn: Client,
    /// The guest memory, one memfd per region; stale pages fill in as the guest runs.
    pub memory: Vec<File>,
    /// What [`PostcopyIn::serve`] registered, unregistered by [`PostcopyIn::wait`].
    maps: Vec<super::postcopy::Mapping>,
}

impl PostcopyIn {
    /// Hands ferryd the userfaultfd registered over `maps` (this VMM's mapping of each
    /// region, in order; missing and minor modes); returns once ferryd serves the faults:
    /// the guest may run now.
    pub fn serve(&mut self, uffd: &hw::uffd::Userfault, maps: &[super::postcopy::Mapping]) -> Result<(), ClientError> {
        self.conn.send(&Request::Faults { maps: maps.to_vec() }, &[uffd.as_fd()])?;
        match self.conn.event("running")? {
            (Event::Running, _) => {}
            (other, _) => return Err(ClientError::unexpected(&other, "running")),
        }
        self.maps = maps.to_vec();
        Ok(())
    }

    /// Blocks until every page is local and verified, then unregisters the mappings
    /// [`PostcopyIn::serve`] handed over from `uffd` (the kernel resolves their faults from
    /// then on) and tells ferryd, which stops resolving them: the report. ferryd resolves
    /// the guest's faults until then, so the thread that calls this must not be one that
    /// touches the memory.
    pub fn wait(mut self, uffd: &hw::uffd::Userfault) -> Result<MigrationReport, ClientError> {
        match self.conn.event("local")? {
            (Event::Local, _) => {}
            (other, _) => return Err(ClientError::unexpected(&other, "local")),
        }
        for m in &self.maps {
            uffd.unregister(m.addr, m.len)?;
        }
        self.conn.send(&Request::Released, &[])?;
        Ok(self.conn.done::<Done<MigrationReport>>("the report")?.report)
    }
}

/// An incoming migration: the destination VMM waits for its memory.
#[derive(Debug)]
pub struct MigrateIn {
    conn: Client,
    /// Where the source ferryd should connect.
    pub addr: String,
}

impl MigrateIn {
    pub fn start(socket: &Path, listen: &str) -> Result<MigrateIn, ClientError> {
        MigrateIn::start_with(socket, listen, None)
    }

    /// [`MigrateIn::start`] with post-copy's recovery time: seconds to wait for the source
    /// after the link broke (ferryd's default 120).
    pub fn start_with(socket: &Path, listen: &str, recover_s: Option<u64>) -> Result<MigrateIn, ClientError> {
        let mut conn = Client::connect(socket)?;
        conn.send(&Request::MigrateIn { listen: listen.to_string(), recover_s }, &[])?;
        match conn.event("where it listens")? {
            (Event::Listening { addr: Some(addr), .. }, _) => Ok(MigrateIn { conn, addr }),
            (other, _) => Err(ClientError::unexpected(&other, "where it listens")),
        }
    }

    /// Blocks until the migration ends: the verified guest memory (one memfd per region, in
    /// the source's order), or why not. The memory is taken (`taken`), and returned once
    /// ferryd says the source knows the migration succeeded.
    pub fn wait(self) -> Result<(Vec<File>, MigrationReport), ClientError> {
        match self.next()? {
            Arrival::Memory(m, r) => Ok((m, *r)),
            Arrival::Postcopy(_) => Err(ClientError::Postcopy),
        }
    }

    /// Blocks until the memory arrives: verified and taken (pre-copy), or to be served
    /// through a userfaultfd (post-copy).
    pub fn next(mut self) -> Result<Arrival, ClientError> {
        let (postcopy, regions, fds) = match self.conn.event("the memory")? {
            (Event::Memory { regions, .. }, fds) => (false, regions, fds),
            (Event::Postcopy { regions, .. }, fds) => (true, regions, fds),
            (other, _) => return Err(ClientError::unexpected(&other, "the memory")),
        };
        if fds.is_empty() || regions != fds.len() {
            return Err(ClientError::Descriptors { got: fds.len(), regions });
        }
        let memory: Vec<File> = fds.into_iter().map(File::from).collect();
        if postcopy {
            return Ok(Arrival::Postcopy(PostcopyIn { conn: self.conn, memory, maps: Vec::new() }));
        }
        self.conn.send(&Request::Taken, &[])?;
        let done: MigratedIn = self.conn.done("the report")?;
        Ok(Arrival::Memory(memory, Box::new(done.report)))
    }
}
