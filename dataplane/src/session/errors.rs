//! The typed parts of [`SessionError`](crate::conn::SessionError): what the peer did
//! wrong ([`Violation`]), what this side will not do ([`Refusal`]), why the local side
//! called a session off ([`Cancel`]), why a handshake failed ([`AuthError`]), and bugs
//! ([`Bug`]). Each carries the figures that make it one case; the sentence is built only
//! when it is shown, so callers match on variants, never on words.

use std::time::Duration;

use crate::wire::Kind;

/// The peer broke the protocol: a frame out of turn, a field out of range, counts that do
/// not add up. Nothing the peer sends can make this side do more than refuse.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// The handshake's protocol version is not this side's.
    #[error("protocol version {got} is not supported (this side speaks {ours})")]
    Version { got: u16, ours: u16 },
    /// A numbered thing (a round, a channel) came before or after its turn.
    #[error("{what} {got} arrived; {what} {next} was next")]
    OutOfTurn { what: &'static str, got: u64, next: u64 },
    /// A lane ended a round other than the one the session is in.
    #[error("lane {lane} ended round {got} during round {round}")]
    LaneRound { lane: u16, got: u32, round: u32 },
    /// A lane ended a round before its session had confirmed the rounds before it.
    #[error("lane {lane} ended round {round} before the session confirmed the round before it")]
    LaneAhead { lane: u16, round: u32 },
    /// Two counts of the same thing differ: what one side announced, what the other
    /// found.
    #[error("{what}: {announced} announced, {found} found")]
    Miscount { what: Counted, announced: u64, found: u64 },
    /// A frame's field holds a value the protocol does not allow.
    #[error("{frame:?}: {field} {value} is not allowed ({allowed})")]
    Field { frame: Kind, field: &'static str, value: u64, allowed: &'static str },
    /// A frame names pages outside the guest's memory.
    #[error("{frame:?} names pages {first}+{pages} of region {region}, which has {has}")]
    OutsideRegion { frame: Kind, region: u32, first: u64, pages: u64, has: u64 },
    /// A frame names a region the guest does not have.
    #[error("{frame:?} names region {region}; the guest has {regions}")]
    NoRegion { frame: Kind, region: u64, regions: usize },
    /// An RDMA WRITE_WITH_IMM names a window the session does not have.
    #[error("a WRITE_WITH_IMM named window {0}, which the session has not")]
    NoWindow(u32),
    /// A JSON frame that does not parse.
    #[error("{frame:?}: {source}")]
    Json { frame: Kind, source: serde_json::Error },
    /// A frame's payload has the wrong length for what it carries.
    #[error("{frame:?}: {len} bytes is not a list of {what}")]
    Length { frame: Kind, len: usize, what: &'static str },
    /// A frame that the session's state does not allow now.
    #[error("{frame:?} {why}")]
    Unexpected { frame: Kind, why: &'static str },
    /// A page came in post-copy that was not stale: the guest owns it.
    #[error("page {page} of region {region} arrived during post-copy, but it was not stale: the guest owns it, and it was not written")]
    NotStale { region: u32, page: u64 },
    /// A page's payload that is not a page long.
    #[error("page {page} of region {region}: {len} bytes for a {want}-byte page")]
    PageLength { region: u32, page: u64, len: usize, want: usize },
    /// A post-copy attempt's SESSION that does not describe the guest it resumes.
    #[error(
        "a post-copy session must describe the same regions ({want:?}) over TCP lanes and a fault lane; it described {got:?} over {lanes} {transport:?} lane(s)"
    )]
    PostcopySession { want: Vec<u64>, got: Vec<u64>, lanes: u16, transport: crate::wire::DataTransport },
    /// RDMA data from a sender whose handshake did not agree on it.
    #[error("the sender asked for RDMA, which the handshake did not agree on")]
    RdmaNotAgreed,
    /// RDMA_ACCEPT's or RDMA_CONNECT's path MTU: above this side's, or not one there is.
    #[error("the destination chose path MTU {chose}, above this side's {ours}")]
    Mtu { chose: u32, ours: u32 },
    #[error("path MTU {0} is not one of 256, 512, 1024, 2048, 4096")]
    BadMtu(u32),
    /// RDMA_ACCEPT with no receive credits: the sender could never post a write.
    #[error("the destination granted no credits")]
    NoCredits,
    /// A migration name that is not 1-64 of `[A-Za-z0-9._-]` without a leading dot.
    #[error("STREAM_OPEN: {0:?} is not a migration name (letters, digits, . _ -)")]
    Name(String),
    /// A stream channel's frame for bytes other than the next.
    #[error("a frame for stream bytes {at}..+{len}; {next} was next")]
    StreamBytes { at: u64, len: usize, next: u64 },
    /// A channel waited too long for the one before it.
    #[error("channel {channel} waited {} s for channel {next}", waited.as_secs())]
    ChannelWait { channel: u16, next: u16, waited: Duration },
}

/// What a [`Violation::Miscount`] counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// The pages of a round: the source's count against the destination's (`round`).
    RoundPages { round: u32 },
    /// The pages the lanes of a round carried against those written into memory.
    WrittenPages { round: u32 },
    /// Round 0's pages against the guest's: round 0 covers every page.
    FirstRound,
    /// A lane's frames, bytes or pages in a round.
    LaneEnd { lane: u16, round: u32, what: &'static str },
    /// Frames a lane received outside any round.
    FramesOutsideRound { lane: u16 },
    /// The pages of the post-copy push round.
    PushPages,
    /// Stale pages still not placed once the push round ended and the fault lane's last
    /// answers landed (none may be).
    PushPlaced,
    /// WRITE_WITH_IMMs on an RDMA lane against RDMA_END's count.
    Writes { lane: usize },
    /// RDMA_END's page runs against ROUND's pages.
    RdmaPages { round: u32 },
    /// A stream channel's frames or bytes (LANE_END's, those received).
    Channel { channel: u16, what: &'static str },
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counted::RoundPages { round } => write!(f, "round {round}'s pages (the source's count, the destination's)"),
            Counted::WrittenPages { round } => write!(f, "round {round}'s pages (the lanes', those written)"),
            Counted::FirstRound => write!(f, "round 0's pages (the guest's, those written: round 0 covers every page)"),
            Counted::LaneEnd { lane, round, what } => write!(f, "lane {lane}'s {what} in round {round} (ROUND_END's, those received)"),
            Counted::FramesOutsideRound { lane } => write!(f, "lane {lane}'s frames outside a round (none allowed)"),
            Counted::PushPages => write!(f, "the push round's pages (the source's count, the lanes')"),
            Counted::PushPlaced => write!(f, "stale pages not placed after the push round"),
            Counted::Writes { lane } => write!(f, "lane {lane}'s WRITE_WITH_IMMs (RDMA_END's, those received)"),
            Counted::RdmaPages { round } => write!(f, "round {round}'s pages (ROUND's, RDMA_END's)"),
            Counted::Channel { channel, what } => write!(f, "channel {channel}'s {what} (LANE_END's, those received)"),
        }
    }
}

/// What this side will not do: its plan, its options or the memory it was given do not
/// allow the session as asked. The sentence says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the plan names no worker CPU: `ferryctl tune` again")]
    NoWorkers,
    #[error("worker {worker} already runs {rounds} sessions' rounds; try again when one ends")]
    WorkerBusy { worker: usize, rounds: usize },
    #[error("receiving thread {thread} already holds {lanes} lanes; try again when a session ends")]
    ReceiverBusy { thread: usize, lanes: usize },
    #[error("{count} memory regions (1..={max} allowed)")]
    Regions { count: usize, max: usize },
    #[error("{what} is {is}, not a memory file: give a memfd, or a tmpfs or hugetlbfs file")]
    NotMemory { what: String, is: String },
    #[error("{what} is {is}, not a regular file")]
    NotRegular { what: String, is: String },
    #[error("{what} is empty")]
    Empty { what: String },
    #[error(
        "guest memory region {region} changed size from {from} to {to} bytes (seen at the {when} of round {round}): the VMM must not resize guest memory while it migrates; the migration is abandoned and the source guest should resume"
    )]
    Resized { region: usize, from: u64, to: u64, when: &'static str, round: u32 },
    #[error("a dirty bitmap of {words} words for {pages} pages in {regions} region(s) ({expected} words)")]
    Bitmap { words: usize, pages: u64, regions: usize, expected: usize },
    #[error("post-copy needs round 0 first and a final bitmap of {expected} words ({words} came)")]
    PostcopyBitmap { words: usize, expected: usize },
    #[error(
        "post-copy after RDMA rounds checked at the end (verify full): no page was hashed as it landed, so post-copy could not verify what pre-copy placed; use verify sent"
    )]
    PostcopyRdmaAtEnd,
    #[error("{to} does not take post-copy")]
    NoPostcopy { to: String },
    #[error("{to} has no RDMA port in its plan; --transport rdma was asked for (use auto or tcp to fall back)")]
    PeerNoRdma { to: String },
    #[error("--transport rdma was asked for, but this side's plan has no RDMA port")]
    NoRdmaPort,
    #[error("this receiver's plan has no RDMA device")]
    NoRdmaDevice,
    #[error("the sender and this receiver are on different link layers (InfiniBand and RoCE)")]
    LinkLayers,
    #[error("page size {0} (this side tracks 4096-byte pages)")]
    PageSize(u32),
    #[error("this receiver writes one region into {out}; the sender described {regions}")]
    OneRegion { out: String, regions: usize },
    #[error("more than {0} in one session")]
    TooMany(&'static str),
    /// The address answers, but as another service.
    #[error("{addr} is not {wanted}")]
    NotService { addr: String, wanted: &'static str },
    #[error("{0} has no address")]
    NoAddress(String),
}

/// Why this side called a session off before it ended.
#[derive(Debug, thiserror::Error)]
pub enum Cancel {
    #[error("this receiver is shutting down")]
    ShuttingDown,
    #[error("the destination VMM closed its control connection; the source keeps the guest")]
    VmmGone,
    #[error("the destination VMM closed its control connection during post-copy: the guest is gone")]
    VmmGoneInPostcopy,
    #[error("the destination VMM did not take its memory ({0}); the source keeps the guest")]
    NotTaken(#[source] crate::migrate::VmmError),
    #[error("post-copy refused: {0}; the source keeps the guest")]
    PostcopyRefused(#[source] crate::migrate::VmmError),
    #[error("the destination VMM could not run the guest: {0}")]
    NotRun(#[source] crate::migrate::VmmError),
    #[error(
        "the link to the destination broke during post-copy and did not come back within {} s ({why}); the guest runs at the destination, which cannot complete it without the pages still here: keep this memory for a manual resume", recover.as_secs()
    )]
    SourceGaveUp { recover: Duration, why: Box<crate::conn::SessionError> },
    #[error(
        "the source did not come back within {} s of the link breaking: {pages} page(s) of the guest are still only at the source, so the guest cannot complete here", recover.as_secs()
    )]
    SourceGone { recover: Duration, pages: u64 },
    #[error("no {what} came within the endpoint's idle time of {} s ([daemon] stream_idle_s)", idle.as_secs())]
    Idle { what: &'static str, idle: Duration },
    #[error("whoever opened the stream went away before the first connection came")]
    RequesterLeft,
    /// Post-copy's fault thread failed (its error, unless it was reported already).
    #[error("post-copy failed at the destination: {}; the guest cannot complete", .0.as_ref().map_or_else(|| "its fault thread stopped".to_string(), |e| e.to_string()))]
    FaultThread(Option<Box<crate::conn::SessionError>>),
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the receiver does not hold our key (wrong --key on one side)")]
    ReceiverKey,
    #[error("the sender does not hold our key (wrong --key on one side)")]
    SenderKey,
    #[error("the receiver runs without authentication (--insecure-no-auth) but we have a key")]
    ReceiverInsecure,
    #[error("the receiver requires a key: pass --key")]
    ReceiverNeedsKey,
    #[error("the sender offered no authentication (--insecure-no-auth) but this side has a key")]
    SenderInsecure,
    #[error("the sender has a key but this side runs with --insecure-no-auth")]
    SenderHasKey,
}

/// Something ferry itself got wrong: an invariant of this process did not hold. Never
/// caused by a peer; the session ends and says so.
#[derive(Debug, thiserror::Error)]
pub enum Bug {
    #[error("the workers' wake-up socket closed")]
    WakeClosed,
    #[error("worker thread {0} ended while mapping its arena")]
    WorkerEnded(usize),
    #[error("no worker {index} in a pool of {size}")]
    NoSuchWorker { index: usize, size: usize },
    #[error("a sending worker panicked: the round is abandoned")]
    WorkerPanicked,
    #[error("a receiving thread panicked in a turn of this session: its lane or poller ends")]
    LanePanicked,
    #[error("a lane still held its session's memory after every lane had ended")]
    LaneLeftOver,
    #[error("the plan's chunk is {plan} bytes, the worker pool's {pool}: the pool is made from the same plan")]
    ChunkMismatch { plan: u64, pool: usize },
    #[error("an encoded chunk was posted on RDMA lanes, which take windows")]
    ChunkOnRdma,
    #[error("a chunk was posted while every lane was still writing")]
    NoFreeLane,
    #[error("an RDMA worker's arena holds no slot")]
    NoSlot,
}
