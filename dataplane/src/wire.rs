//! Wire protocol v2: frames, their header, and the checks every received frame passes
//! before anything it carries is written.
//!
//! A session is one control connection plus one data connection per lane. Every
//! connection starts with the same authenticated handshake (see [`crate::auth`]). Every
//! session moves its regions in rounds: a one-shot transfer is one round over every page;
//! a migration (handshake feature `MIGRATE`, see [`crate::migrate`]) runs pre-copy rounds,
//! in which pages may be sent again, each at most once per round.
//!
//! ```text
//!  sender                                                   receiver
//!    │ control connection                                       │
//!    │── HELLO (version, features, lane = CONTROL, nonce_c) ───►│
//!    │◄── CHALLENGE (features, nonce_s, HMAC_k("srv"‖nc‖ns)) ───│  receiver proves the key
//!    │── RESPONSE (HMAC_k("cli"‖ns‖nc)) ───────────────────────►│  sender proves the key
//!    │◄── ACCEPT (the first sealed frame) ──────────────────────│  (or ERROR, connection closed)
//!    │── SESSION (page size, chunk size, lanes, regions) ──────►│  receiver checks, allocates
//!    │◄── SESSION_OK (session id) ──────────────────────────────│  (a file, or memfds)
//!    │ data connection per lane (same handshake, lane = i, session id)
//!    │ round r = 0, 1, ...: round 0 carries every page, later rounds the dirty ones
//!    │── DATA (region, offset, raw | zero | zstd, crc32c) ─────►│  bounds-checked, crc- and
//!    │── DATA ... on every lane ───────────────────────────────►│  tag-checked, then written;
//!    │                                                          │  ZERO frames punch holes
//!    │── ROUND_END (r, frames, bytes, pages) on every lane ────►│
//!    │ control connection
//!    │── ROUND (r, last, pages) ───────────────────────────────►│  checks the lanes' counts
//!    │◄── ROUND_OK (r, pages) ──────────────────────────────────│
//!    │ after the last round (a transfer's only one; a migration's once the VMM has paused):
//!    │── LANE_END on every lane ───────────────────────────────►│
//!    │── DONE (digest of the source as sent) ──────────────────►│  per-page hashes kept as
//!    │                                                          │  pages landed; if equal,
//!    │                                                          │  the file goes in place or
//!    │                                                          │  the VMM takes the memfds
//!    │◄── RESULT (digest of the destination, verdict) ──────────│  then the sender is told
//! ```
//!
//! With RDMA (SESSION says `transport = rdma`; a transfer or a migration, the handshake
//! having agreed on feature `RDMA`) no data connections open. The control connection
//! carries the queue-pair exchange, and the data moves as one-sided RDMA WRITEs straight
//! into the receiver's registered regions (see [`crate::transport::rdma`]):
//!
//! ```text
//!    │── SESSION (transport rdma, lanes = workers x QPs) ──────►│
//!    │◄── SESSION_OK ───────────────────────────────────────────│
//!    │── RDMA_CONNECT (MTU, per lane: QPN, PSN, LID, GID) ─────►│  creates QPs, registers each
//!    │◄── RDMA_ACCEPT (MTU, credits, per lane: QPN ...,         │  region (remote write),
//!    │                 per region: addr, rkey) ─────────────────│  posts receives
//!    │ round r = 0, 1, ...
//!    │══ RDMA WRITE (gathered SGEs) ═══════════════════════════►│  placed by the NIC
//!    │══ RDMA WRITE_WITH_IMM (a window's last WR; imm = window)►│  consumes a receive
//!    │◄═ SEND_WITH_IMM (credits: receives re-posted) ═══════════│
//!    │── RDMA_END (r, runs; per lane: WRITE_WITH_IMMs, bytes,   │
//!    │             pages) ─────────────────────────────────────►│
//!    │── RDMA_PAGES (page runs written; rounds after 0) ... ───►│
//!    │── ROUND (r, last, pages) ───────────────────────────────►│  waits for every WRITE_WITH_IMM,
//!    │◄── ROUND_OK (r, pages) ──────────────────────────────────│  hashes (keyed) the pages
//!    │ after the last round:                                    │  written, as they landed
//!    │── DONE / ◄── RESULT, as above ───────────────────────────│  (deregistered first)
//! ```
//!
//! Every frame is a 32-byte [`Header`] followed by `length` payload bytes. The header's
//! `crc` is CRC-32C over the header (with `crc` zero) and the payload. A zeroed header is
//! invalid (wrong magic). Integers are little-endian. Every frame after the handshake
//! (from ACCEPT on) is followed by a 16-byte tag under the connection's keys
//! ([`crate::session::seal`]); the handshake's own frames are plain and at most
//! [`crate::conn::PREAUTH_MAX_PAYLOAD`] bytes. Version 2 added the tags; a version-1 peer is
//! refused at HELLO.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// "FRY1" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
/// Version 2: every frame after the handshake carries a tag ([`crate::session::seal`]).
pub const VERSION: u16 = 2;
pub const HEADER_LEN: usize = 32;
/// The largest payload a frame may carry: a chunk (at most 1 MiB by the planner, 64 MiB
/// if pinned) plus zstd's worst-case expansion. Larger lengths are rejected before any
/// allocation.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// The largest region a session may describe (1 PiB), to keep offset arithmetic far from
/// overflow.
pub const MAX_REGION: u64 = 1 << 50;
/// Regions per session.
pub const MAX_REGIONS: usize = 256;
/// Lane number of the control connection.
pub const CONTROL_LANE: u16 = u16::MAX;

/// Feature bits offered in HELLO and accepted in CHALLENGE.
pub mod features {
    /// zstd-encoded data frames.
    pub const ZSTD: u64 = 1 << 0;
    /// The connection runs without authentication (both sides must say so).
    pub const NO_AUTH: u64 = 1 << 1;
    /// The side has an RDMA port in its plan: the session may move its data with RDMA
    /// WRITEs when both offer it.
    pub const RDMA: u64 = 1 << 2;
    /// The session is a migration: pre-copy rounds into a destination `ferryd` that
    /// hands the memory to a VMM (see [`crate::migrate`]), not a one-shot transfer.
    pub const MIGRATE: u64 = 1 << 3;
    /// The connection is a stream-mode channel: an unmodified VMM's migration stream
    /// carried between two proxies (see [`crate::stream`]).
    pub const STREAM: u64 = 1 << 4;
    /// The connection belongs to a migration's post-copy phase: it resumes a session the
    /// destination already switched over (RESUME), see [`crate::migrate::postcopy`].
    pub const POSTCOPY: u64 = 1 << 5;
    /// The connection is one ferryd asking another to open the destination side of a
    /// stream-mode migration (STREAM_OPEN), see [`crate::peer`].
    pub const PEER: u64 = 1 << 6;
    /// Every feature this build understands.
    pub const ALL: u64 = ZSTD | NO_AUTH | RDMA | MIGRATE | STREAM | POSTCOPY | PEER;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Challenge = 2,
    Response = 3,
    Accept = 4,
    Session = 5,
    SessionOk = 6,
    Data = 7,
    LaneEnd = 8,
    Done = 9,
    Result = 10,
    Error = 11,
    RdmaConnect = 12,
    RdmaAccept = 13,
    RdmaEnd = 14,
    RoundEnd = 15,
    Round = 16,
    RoundOk = 17,
    RdmaPages = 18,
    /// Source to destination, instead of the last round: switch over to post-copy; the
    /// pages still stale follow in RUNS frames.
    Switch = 19,
    /// RUNS payload: a list of [`RdmaRun`]s (pages still stale, or still needed).
    Runs = 20,
    /// Destination to source: the destination VMM runs the guest now.
    Switched = 21,
    /// Source to destination, on a post-copy connection: resume session `session`.
    Resume = 22,
    /// Destination to source: the pages it still needs follow in RUNS frames.
    Needed = 23,
    /// Destination to source on the fault lane: send these pages first.
    Fetch = 24,
    /// Source ferryd to destination ferryd on a peer connection: open the destination
    /// side of a stream-mode migration (a JSON [`crate::peer::Open`]).
    StreamOpen = 25,
    /// The answer: where the channels go (a JSON [`crate::peer::Opened`]); RESULT follows
    /// when the stream has ended.
    StreamOpened = 26,
    /// Destination to source on a post-copy fault lane, every [`crate::migrate::postcopy::HEARTBEAT`]:
    /// the lane is alive (empty payload). A lane that hears nothing (no answer, no PONG)
    /// for [`crate::migrate::postcopy::SILENCE`] counts as a broken link.
    Ping = 27,
    /// The source's answer to PING (empty payload).
    Pong = 28,
    /// Source to destination on a post-copy fault lane, after RDMA rounds when the
    /// attempt's handshake agreed RDMA: where the destination may RDMA READ the pages its
    /// guest faults on ([`FaultRdma`]), or that it may not (no regions). See
    /// [`crate::migrate::postcopy::rdma`].
    FaultRdma = 29,
    /// The destination's answer ([`FaultRdmaOk`]): its QP, or that it reads nothing.
    FaultRdmaOk = 30,
    /// Source to destination on the fault lane: its QP is connected; faults may be read
    /// with RDMA READs from now on (empty payload).
    FaultRdmaOn = 31,
    /// Destination to source on the fault lane, after FAULT_RDMA_ON: an RDMA READ brings
    /// these pages (an [`RdmaRun`]) for a fault; the push leaves them out and sends the
    /// pages near them first. Nothing is answered: the READ is the answer.
    FaultRead = 32,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => Response,
            4 => Accept,
            5 => Session,
            6 => SessionOk,
            7 => Data,
            8 => LaneEnd,
            9 => Done,
            10 => Result,
            11 => Error,
            12 => RdmaConnect,
            13 => RdmaAccept,
            14 => RdmaEnd,
            15 => RoundEnd,
            16 => Round,
            17 => RoundOk,
            18 => RdmaPages,
            19 => Switch,
            20 => Runs,
            21 => Switched,
            22 => Resume,
            23 => Needed,
            24 => Fetch,
            25 => StreamOpen,
            26 => StreamOpened,
            27 => Ping,
            28 => Pong,
            29 => FaultRdma,
            30 => FaultRdmaOk,
            31 => FaultRdmaOn,
            32 => FaultRead,
            _ => return None,
        })
    }
}

/// How a DATA frame's payload encodes its `raw_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The payload is the bytes.
    Raw = 0,
    /// No payload: `raw_len` zero bytes.
    Zero = 1,
    /// The payload is one zstd frame that decompresses to exactly `raw_len` bytes.
    Zstd = 2,
}

/// The frame header, as it is on the wire.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    pub magic: U32,
    pub kind: u8,
    pub encoding: u8,
    pub flags: U16,
    pub region: U32,
    /// Payload bytes following the header.
    pub length: U32,
    /// DATA: destination offset in the region.
    pub offset: U64,
    /// DATA: decoded length.
    pub raw_len: U32,
    pub crc: U32,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_LEN);

/// A frame that fails a check. Each names what was wrong; none is ever written.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}: not a ferry peer, or the stream lost sync")]
    Magic(u32),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("unknown data encoding {0}")]
    Encoding(u8),
    #[error("frame payload of {len} bytes exceeds the {max}-byte maximum")]
    Oversized { len: u32, max: u32 },
    #[error("checksum mismatch: header says {expected:#010x}, payload hashes to {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
    #[error("malformed {kind:?} payload: {why}")]
    Payload { kind: Kind, why: String },
    #[error("data frame for region {region}, but the session has {regions} region(s)")]
    Region { region: u32, regions: usize },
    #[error("data frame at offset {offset} + {len} bytes runs past the end of region {region} ({size} bytes)")]
    OutOfBounds { region: u32, offset: u64, len: u32, size: u64 },
    #[error("data frame at offset {offset} is not aligned to the {page}-byte page size")]
    Unaligned { offset: u64, page: u32 },
    #[error("{encoding:?} data frame carries {length} payload bytes for {raw_len} decoded bytes")]
    Lengths { encoding: Encoding, length: u32, raw_len: u32 },
    #[error("zstd payload decodes to {got} bytes, the header says {want}")]
    Decompress { want: u32, got: String },
    #[error("{kind:?} frame {seq} failed authentication: it was altered, replayed or forged on the way")]
    Tag { kind: Kind, seq: u64 },
}

impl Header {
    pub fn new(kind: Kind, length: u32) -> Header {
        Header { magic: MAGIC.into(), kind: kind as u8, length: length.into(), ..Header::default() }
    }

    pub fn data(encoding: Encoding, region: u32, offset: u64, raw_len: u32, length: u32) -> Header {
        Header {
            magic: MAGIC.into(),
            kind: Kind::Data as u8,
            encoding: encoding as u8,
            region: region.into(),
            length: length.into(),
            offset: offset.into(),
            raw_len: raw_len.into(),
            ..Header::default()
        }
    }

    /// Fills in the CRC-32C over the header (crc zero) and the payload.
    pub fn seal(mut self, payload: &[u8]) -> Header {
        self.crc = 0.into();
        self.crc = checksum(&self, payload).into();
        self
    }

    /// The checks a header passes before its payload is read: magic, kind, encoding and
    /// size. Returns the kind.
    pub fn check(&self) -> Result<Kind, FrameError> {
        if self.magic.get() != MAGIC {
            return Err(FrameError::Magic(self.magic.get()));
        }
        let kind = Kind::from_u8(self.kind).ok_or(FrameError::Kind(self.kind))?;
        if self.length.get() > MAX_PAYLOAD {
            return Err(FrameError::Oversized { len: self.length.get(), max: MAX_PAYLOAD });
        }
        if kind == Kind::Data {
            self.encoding()?;
        }
        Ok(kind)
    }

    pub fn encoding(&self) -> Result<Encoding, FrameError> {
        match self.encoding {
            0 => Ok(Encoding::Raw),
            1 => Ok(Encoding::Zero),
            2 => Ok(Encoding::Zstd),
            e => Err(FrameError::Encoding(e)),
        }
    }

    /// Verifies the CRC once the payload is in.
    pub fn verify(&self, payload: &[u8]) -> Result<(), FrameError> {
        self.verify_parts([payload])
    }

    /// [`Header::verify`] of a payload that arrived in parts.
    pub fn verify_parts<'p>(&self, parts: impl IntoIterator<Item = &'p [u8]>) -> Result<(), FrameError> {
        let mut h = *self;
        h.crc = 0.into();
        let actual = parts.into_iter().fold(crc32c::crc32c(h.as_bytes()), crc32c::crc32c_append);
        if actual != self.crc.get() {
            return Err(FrameError::Checksum { expected: self.crc.get(), actual });
        }
        Ok(())
    }
}

fn checksum(h: &Header, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(h.as_bytes()), payload)
}

/// The largest payload a DATA frame of a session with chunks of `max_chunk` bytes can
/// need: zstd's worst-case expansion of a chunk (`ZSTD_COMPRESSBOUND`) rounded up.
pub fn max_payload_for(max_chunk: u32) -> u32 {
    max_chunk.saturating_add(max_chunk >> 7).saturating_add(4096).min(MAX_PAYLOAD)
}

/// The layout a receiver accepted: what DATA frames are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub page_size: u32,
    pub max_chunk: u32,
    pub regions: Vec<u64>,
}

impl Layout {
    /// Every check a DATA header must pass against the session before its payload may be
    /// decoded into the destination: region, page alignment, bounds, length consistency.
    pub fn check_data(&self, h: &Header) -> Result<(Encoding, u32, u64, u32), FrameError> {
        let encoding = h.encoding()?;
        let (region, offset, raw_len, length) = (h.region.get(), h.offset.get(), h.raw_len.get(), h.length.get());
        let size = *self.regions.get(region as usize).ok_or(FrameError::Region { region, regions: self.regions.len() })?;
        if offset % u64::from(self.page_size) != 0 {
            return Err(FrameError::Unaligned { offset, page: self.page_size });
        }
        if offset.checked_add(u64::from(raw_len)).is_none_or(|end| end > size) {
            return Err(FrameError::OutOfBounds { region, offset, len: raw_len, size });
        }
        let lengths_ok = raw_len > 0
            && raw_len <= self.max_chunk
            && match encoding {
                Encoding::Raw => length == raw_len,
                Encoding::Zero => length == 0,
                Encoding::Zstd => length > 0,
            };
        if !lengths_ok {
            return Err(FrameError::Lengths { encoding, length, raw_len });
        }
        Ok((encoding, region, offset, raw_len))
    }
}

/// HELLO payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Hello {
    pub version: U16,
    pub lane: U16,
    pub _pad: U32,
    pub features: U64,
    pub session: U64,
    pub nonce: [u8; 32],
}

/// CHALLENGE payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Challenge {
    pub version: U16,
    pub _pad: [u8; 6],
    pub features: U64,
    pub nonce: [u8; 32],
    pub mac: [u8; 32],
}

/// RESPONSE payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Response {
    pub mac: [u8; 32],
}

/// SESSION payload: this struct, then `regions` region sizes (U64 each).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SessionDesc {
    pub page_size: U32,
    pub max_chunk: U32,
    pub lanes: U16,
    pub regions: U16,
    /// [`DataTransport`] as a byte.
    pub transport: u8,
    pub _pad: [u8; 3],
}

/// How a session's data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataTransport {
    /// DATA frames on one TCP connection per lane.
    Tcp = 0,
    /// RDMA WRITEs on one RC queue pair per lane.
    Rdma = 1,
}

/// RDMA_CONNECT payload: this struct, then one [`RdmaEndpoint`] per lane.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RdmaConnect {
    /// Sender workers; lanes are `workers x qps_per_worker`, worker-major.
    pub workers: U16,
    pub qps_per_worker: U16,
    /// The sender's path MTU in bytes.
    pub mtu: U32,
    /// 1 on InfiniBand (address by LID), 0 on RoCE (by GID).
    pub infiniband: u8,
    /// How what the one-sided writes placed is checked: [`ONE_SIDED_EACH_ROUND`] or
    /// [`ONE_SIDED_AT_END`].
    pub check: u8,
    pub _pad: [u8; 6],
}

/// [`RdmaConnect::check`]: each round's pages are hashed (keyed) at both ends as they are
/// sent and as they landed, and the running digests compared at the end.
pub const ONE_SIDED_EACH_ROUND: u8 = 0;
/// [`RdmaConnect::check`]: no page is hashed during the rounds (the CPU never reads what
/// the NIC moves); once the last round has landed, both ends digest all of the memory
/// (keyed) and compare.
pub const ONE_SIDED_AT_END: u8 = 1;

/// RDMA_ACCEPT payload: this struct, then one [`RdmaEndpoint`] per lane, then one
/// [`RdmaRegion`] per region of the session.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RdmaAccept {
    /// The path MTU both sides use: the smaller of the two.
    pub mtu: U32,
    /// Receives posted per lane: WRITE_WITH_IMMs the sender may have outstanding.
    pub credits: U32,
}

/// FAULT_RDMA payload: this struct, then one [`RdmaEndpoint`] (the source's QP, which
/// grants remote reads) and one [`RdmaRegion`] per region of the session, registered for
/// remote reads; or, when `regions` is 0, nothing (the source could not register its
/// memory: faults go on the fault lane).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FaultRdma {
    /// The source's path MTU in bytes.
    pub mtu: U32,
    pub regions: U32,
    /// 1 on InfiniBand (address by LID), 0 on RoCE (by GID).
    pub infiniband: u8,
    pub _pad: [u8; 7],
}

/// FAULT_RDMA_OK payload: this struct, then one [`RdmaEndpoint`] when `ready` is 1 (the
/// destination reads faulting pages with RDMA READs on that QP), none when it is 0 (it
/// fetches them on the fault lane).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FaultRdmaOk {
    /// The path MTU both sides use: the smaller of the two.
    pub mtu: U32,
    pub ready: u8,
    pub _pad: [u8; 3],
}

/// Where a region of the destination is registered for the sender's writes (or, in
/// FAULT_RDMA, of the source for the destination's reads).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RdmaRegion {
    pub addr: U64,
    pub rkey: U32,
    pub _pad: U32,
}

/// RDMA_END payload: this struct, then one [`RdmaLaneEnd`] per lane: what each lane
/// carried in the round. `runs` [`RdmaRun`]s follow in RDMA_PAGES frames.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RdmaRoundEnd {
    pub round: U32,
    /// 1: the round wrote whole windows (every page of each window a WRITE_WITH_IMM
    /// named; round 0); 0: the pages `runs` lists.
    pub whole: U32,
    /// Page runs the RDMA_PAGES frames after this one list.
    pub runs: U64,
}

/// RDMA_PAGES payload: up to [`RDMA_RUNS_PER_FRAME`] of these, the runs of pages a round
/// wrote (the receiver hashes exactly those).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RdmaRun {
    pub region: U32,
    pub pages: U32,
    pub first: U64,
}

/// Runs per RDMA_PAGES frame (1 MiB of payload).
pub const RDMA_RUNS_PER_FRAME: usize = 65536;

/// One queue pair's address.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RdmaEndpoint {
    pub qpn: U32,
    pub psn: U32,
    pub lid: U16,
    pub _pad: [u8; 6],
    pub gid: [u8; 16],
}

/// A lane's part of RDMA_END: what it carried in the round.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RdmaLaneEnd {
    /// WRITE_WITH_IMMs posted on the lane (one per window written).
    pub imms: U64,
    /// Region bytes written on the lane.
    pub bytes: U64,
    /// Region pages the round carried on the lane, zero pages included.
    pub pages: U64,
    /// Zero pages skipped (not written) on the lane.
    pub zero_pages: U64,
}

/// Parses a fixed header followed by exactly `n` fixed-size entries.
pub fn parse_list<H, T>(kind: Kind, payload: &[u8], n: usize) -> Result<(H, &[T]), FrameError>
where
    H: FromBytes + KnownLayout + Immutable + Copy,
    T: FromBytes + KnownLayout + Immutable,
{
    let bad = |why: String| FrameError::Payload { kind, why };
    let (head, rest) = H::read_from_prefix(payload).map_err(|_| bad(format!("{} bytes is too short", payload.len())))?;
    let list = <[T]>::ref_from_bytes(rest).map_err(|_| bad(format!("{} bytes of entries", rest.len())))?;
    if list.len() != n {
        return Err(bad(format!("{} entries, expected {n}", list.len())));
    }
    Ok((head, list))
}

/// Parses a fixed header, `n` entries of one kind, then `m` of another.
pub fn parse_lists<H, T, U>(kind: Kind, payload: &[u8], n: usize, m: usize) -> Result<(H, &[T], &[U]), FrameError>
where
    H: FromBytes + KnownLayout + Immutable + Copy,
    T: FromBytes + KnownLayout + Immutable,
    U: FromBytes + KnownLayout + Immutable,
{
    let bad = |why: String| FrameError::Payload { kind, why };
    let (head, rest) = H::read_from_prefix(payload).map_err(|_| bad(format!("{} bytes is too short", payload.len())))?;
    let split = n
        .checked_mul(std::mem::size_of::<T>())
        .filter(|&b| b <= rest.len())
        .ok_or_else(|| bad(format!("{} bytes of entries", rest.len())))?;
    let (a, b) = rest.split_at(split);
    let first = <[T]>::ref_from_bytes(a).map_err(|_| bad(format!("{} bytes of entries", a.len())))?;
    let second = <[U]>::ref_from_bytes(b).map_err(|_| bad(format!("{} bytes of entries", b.len())))?;
    if second.len() != m {
        return Err(bad(format!("{} entries, expected {m}", second.len())));
    }
    Ok((head, first, second))
}

/// A fixed header followed by a list of entries, as one payload.
pub fn list_payload<H: IntoBytes + Immutable, T: IntoBytes + Immutable>(head: &H, list: &[T]) -> Vec<u8> {
    let mut out = head.as_bytes().to_vec();
    out.extend_from_slice(list.as_bytes());
    out
}

/// A fixed header followed by two lists, as one payload.
pub fn lists_payload<H: IntoBytes + Immutable, T: IntoBytes + Immutable, U: IntoBytes + Immutable>(head: &H, a: &[T], b: &[U]) -> Vec<u8> {
    let mut out = list_payload(head, a);
    out.extend_from_slice(b.as_bytes());
    out
}

/// SESSION_OK payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SessionOk {
    pub session: U64,
}

/// LANE_END payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct LaneEnd {
    pub frames: U64,
    pub bytes: U64,
}

/// ROUND_END payload: a lane's last frame of a migration round.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RoundEnd {
    pub round: U32,
    pub _pad: U32,
    /// DATA frames and wire bytes this lane sent in the round.
    pub frames: U64,
    pub bytes: U64,
    /// Region pages those frames covered.
    pub pages: U64,
}

/// ROUND payload (control connection): every lane has ended the round.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Round {
    pub round: U32,
    /// 1 for the stop-and-copy round: DONE follows.
    pub last: U32,
    /// Dirty pages the round carried, over all lanes.
    pub pages: U64,
}

/// ROUND_OK payload: the destination holds every page of the round.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RoundOk {
    pub round: U32,
    pub _pad: U32,
    pub pages: U64,
}

/// DONE and RESULT payload: a digest of the region(s), and for RESULT the verdict.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Digest {
    pub digest: [u8; 16],
    pub bytes: U64,
    /// RESULT: 1 when the receiver's digest matched the sender's.
    pub ok: U32,
    pub _pad: U32,
}

/// SWITCH and NEEDED payload: how many [`RdmaRun`]s the RUNS frames after it list.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RunCount {
    pub runs: U64,
    /// SWITCH: the pre-copy rounds sent; NEEDED: pages placed so far.
    pub count: U64,
}

/// RESUME payload: the pre-copy session a post-copy connection continues.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Resume {
    pub session: U64,
}

/// Parses a fixed-size payload.
pub fn parse<T: FromBytes + KnownLayout + Immutable + Copy>(kind: Kind, payload: &[u8]) -> Result<T, FrameError> {
    T::read_from_bytes(payload)
        .map_err(|_| FrameError::Payload { kind, why: format!("{} bytes, expected {}", payload.len(), std::mem::size_of::<T>()) })
}

/// Parses a SESSION payload into a layout, checking every field.
pub fn parse_session(payload: &[u8]) -> Result<(Layout, u16, DataTransport), FrameError> {
    let bad = |why: String| FrameError::Payload { kind: Kind::Session, why };
    let (desc, rest) = SessionDesc::read_from_prefix(payload).map_err(|_| bad(format!("{} bytes is too short", payload.len())))?;
    let n = usize::from(desc.regions.get());
    if n == 0 || n > MAX_REGIONS {
        return Err(bad(format!("{n} regions (1..={MAX_REGIONS} allowed)")));
    }
    let sizes = <[U64]>::ref_from_bytes(rest).map_err(|_| bad(format!("{} bytes of region sizes for {n} regions", rest.len())))?;
    if sizes.len() != n {
        return Err(bad(format!("{} region sizes for {n} regions", sizes.len())));
    }
    let page = desc.page_size.get();
    if !page.is_power_of_two() || !(512..=(1 << 30)).contains(&page) {
        return Err(bad(format!("page size {page}")));
    }
    let chunk = desc.max_chunk.get();
    if chunk == 0 || chunk > MAX_PAYLOAD || chunk % page != 0 {
        return Err(bad(format!("chunk size {chunk} (a multiple of the page size up to {MAX_PAYLOAD})")));
    }
    let lanes = desc.lanes.get();
    if lanes == 0 || lanes == CONTROL_LANE {
        return Err(bad(format!("{lanes} lanes")));
    }
    let regions: Vec<u64> = sizes.iter().map(|s| s.get()).collect();
    if let Some(s) = regions.iter().find(|&&s| s > MAX_REGION) {
        return Err(bad(format!("region of {s} bytes exceeds {MAX_REGION}")));
    }
    let transport = match desc.transport {
        0 => DataTransport::Tcp,
        1 => DataTransport::Rdma,
        t => return Err(bad(format!("unknown data transport {t}"))),
    };
    Ok((Layout { page_size: page, max_chunk: chunk, regions }, lanes, transport))
}

/// Builds a SESSION payload.
pub fn session_payload(layout: &Layout, lanes: u16, transport: DataTransport) -> Vec<u8> {
    let desc = SessionDesc {
        page_size: layout.page_size.into(),
        max_chunk: layout.max_chunk.into(),
        lanes: lanes.into(),
        regions: (layout.regions.len() as u16).into(),
        transport: transport as u8,
        _pad: [0; 3],
    };
    let mut out = desc.as_bytes().to_vec();
    for &s in &layout.regions {
        out.extend_from_slice(U64::new(s).as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout { page_size: 4096, max_chunk: 1 << 20, regions: vec![1 << 30, 8192] }
    }

    #[test]
    fn zeroed_header_is_invalid() {
        assert_eq!(Header::default().check(), Err(FrameError::Magic(0)));
    }

    #[test]
    fn seal_and_verify() {
        let payload = b"hello world";
        let h = Header::data(Encoding::Raw, 0, 4096, 11, 11).seal(payload);
        assert_eq!(h.check(), Ok(Kind::Data));
        h.verify(payload).unwrap();
        assert!(matches!(h.verify(b"hello worle"), Err(FrameError::Checksum { .. })));
        let mut flipped = h;
        flipped.offset = 8192.into();
        assert!(flipped.verify(payload).is_err(), "the header is covered too");
    }

    #[test]
    fn header_checks() {
        let mut h = Header::new(Kind::Data, 0);
        h.kind = 99;
        assert_eq!(h.check(), Err(FrameError::Kind(99)));
        let h = Header::new(Kind::Hello, MAX_PAYLOAD + 1);
        assert_eq!(h.check(), Err(FrameError::Oversized { len: MAX_PAYLOAD + 1, max: MAX_PAYLOAD }));
        let mut h = Header::data(Encoding::Raw, 0, 0, 1, 1);
        h.encoding = 7;
        assert_eq!(h.check(), Err(FrameError::Encoding(7)));
    }

    #[test]
    fn data_bounds() {
        let l = layout();
        assert!(l.check_data(&Header::data(Encoding::Raw, 0, 0, 4096, 4096)).is_ok());
        assert!(l.check_data(&Header::data(Encoding::Zero, 1, 4096, 4096, 0)).is_ok());
        assert!(matches!(l.check_data(&Header::data(Encoding::Raw, 2, 0, 4096, 4096)), Err(FrameError::Region { .. })));
        assert!(matches!(l.check_data(&Header::data(Encoding::Zero, 1, 8192, 4096, 0)), Err(FrameError::OutOfBounds { .. })));
        assert!(matches!(l.check_data(&Header::data(Encoding::Zero, 0, u64::MAX - 4095, 4096, 0)), Err(FrameError::OutOfBounds { .. })));
        assert!(matches!(l.check_data(&Header::data(Encoding::Raw, 0, 100, 4096, 4096)), Err(FrameError::Unaligned { .. })));
        assert!(matches!(l.check_data(&Header::data(Encoding::Raw, 0, 0, 4096, 100)), Err(FrameError::Lengths { .. })));
        assert!(matches!(l.check_data(&Header::data(Encoding::Zero, 0, 0, 4096, 5)), Err(FrameError::Lengths { .. })));
        assert!(matches!(l.check_data(&Header::data(Encoding::Raw, 0, 0, 2 << 20, 2 << 20)), Err(FrameError::Lengths { .. })));
        assert!(matches!(l.check_data(&Header::data(Encoding::Zstd, 0, 0, 4096, 0)), Err(FrameError::Lengths { .. })));
    }

    #[test]
    fn session_round_trip_and_rejects() {
        let p = session_payload(&layout(), 4, DataTransport::Tcp);
        assert_eq!(parse_session(&p).unwrap(), (layout(), 4, DataTransport::Tcp));
        let p = session_payload(&layout(), 4, DataTransport::Rdma);
        assert_eq!(parse_session(&p).unwrap(), (layout(), 4, DataTransport::Rdma));
        let mut unknown = p.clone();
        unknown[12] = 9;
        assert!(parse_session(&unknown).is_err(), "unknown transport");
        assert!(parse_session(&p[..p.len() - 1]).is_err());
        assert!(parse_session(&p[..10]).is_err());
        let mut bad = layout();
        bad.page_size = 3000;
        assert!(parse_session(&session_payload(&bad, 1, DataTransport::Tcp)).is_err());
        let mut bad = layout();
        bad.regions = vec![MAX_REGION + 1];
        assert!(parse_session(&session_payload(&bad, 1, DataTransport::Tcp)).is_err());
        assert!(parse_session(&session_payload(&layout(), 0, DataTransport::Tcp)).is_err());
    }
}
