//! An encoded chunk: one window of a region's pages as frames, ready for a lane. It owns
//! its two arena slots (the window's bytes as read, and the compressed payloads), so it can
//! move into an io_uring send ring and come back with the completion; raw payloads are
//! referenced in place in the first slot. Each frame's tag is computed when the chunk is
//! sealed for the lane it goes out on.

use hw::memmap::Slot;
use zerocopy::IntoBytes;

use crate::session::seal::{Seal, TAG_LEN};
use crate::wire::{self, HEADER_LEN, Header};

/// Where a frame's payload lives.
#[derive(Debug, Clone, Copy)]
enum Payload {
    /// No payload (a zero frame).
    None,
    /// `len` bytes at `start` of the data slot.
    Data { start: usize, len: usize },
    /// `len` bytes at `start` of the staging slot.
    Staged { start: usize, len: usize },
}

/// One window's frames.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The window's bytes as read from the source; raw payloads point here.
    pub(crate) data: Slot,
    pub(crate) frames: Frames,
}

/// A batch's frames, apart from the bytes they point into (so the bytes can be read while
/// frames are added).
#[derive(Debug)]
pub(crate) struct Frames {
    /// Compressed payloads, one after the other.
    staging: Slot,
    staged: usize,
    /// Region offset of `data[0]`.
    base: u64,
    headers: Vec<Header>,
    payloads: Vec<Payload>,
    tags: Vec<[u8; TAG_LEN]>,
    /// Bytes on the wire (headers, payloads, tags).
    pub(crate) wire_bytes: u64,
    /// Region bytes the frames carry, and the pages.
    pub(crate) region_bytes: u64,
    pub(crate) pages: u64,
}

impl Batch {
    /// A batch over two slots of at least a chunk each.
    pub(crate) fn new(data: Slot, staging: Slot) -> Batch {
        Batch {
            data,
            frames: Frames {
                staging,
                staged: 0,
                base: 0,
                headers: Vec::new(),
                payloads: Vec::new(),
                tags: Vec::new(),
                wire_bytes: 0,
                region_bytes: 0,
                pages: 0,
            },
        }
    }

    /// Empties the batch for a window whose `data[0]` is region offset `base`.
    pub(crate) fn clear(&mut self, base: u64) {
        let f = &mut self.frames;
        f.base = base;
        f.staged = 0;
        f.headers.clear();
        f.payloads.clear();
        f.tags.clear();
        f.wire_bytes = 0;
        f.region_bytes = 0;
        f.pages = 0;
    }

    pub(crate) fn frames(&self) -> usize {
        self.frames.headers.len()
    }

    fn payload(&self, p: Payload) -> &[u8] {
        match p {
            Payload::None => &[],
            Payload::Data { start, len } => &self.data[start..start + len],
            Payload::Staged { start, len } => &self.frames.staging[start..start + len],
        }
    }

    /// Tags every frame for the lane `tx` belongs to, in order: the batch must go out
    /// whole on that lane next.
    pub(crate) fn seal(&mut self, tx: &mut Seal) {
        let mut tags = std::mem::take(&mut self.frames.tags);
        tags.clear();
        tags.extend(self.frames.headers.iter().zip(&self.frames.payloads).map(|(h, &p)| tx.tag(h, [self.payload(p)])));
        self.frames.tags = tags;
    }

    /// Calls `f` with the header, payload and tag of each frame, in order.
    pub(crate) fn slices<'b>(&'b self, f: &mut dyn FnMut(&'b [u8])) {
        let fr = &self.frames;
        debug_assert_eq!(fr.tags.len(), fr.headers.len(), "a batch is sealed before it is written");
        for ((h, &p), tag) in fr.headers.iter().zip(&fr.payloads).zip(&fr.tags) {
            f(h.as_bytes());
            let payload = self.payload(p);
            if !payload.is_empty() {
                f(payload);
            }
            f(tag);
        }
    }
}

impl Frames {
    /// Adds a frame. Where its payload lives follows from its encoding: a raw payload is
    /// the data slot's bytes at the frame's offset, a zstd payload (in the encoder's
    /// scratch) is copied into the staging slot, a zero frame has none.
    pub(crate) fn push(&mut self, h: Header, payload: &[u8]) {
        let p = match h.encoding {
            e if e == wire::Encoding::Raw as u8 => Payload::Data { start: (h.offset.get() - self.base) as usize, len: payload.len() },
            e if e == wire::Encoding::Zstd as u8 => {
                // A run is sent compressed only when it shrank below 90%: a window's staged
                // bytes never exceed the window, the slot's size.
                let at = self.staged;
                self.staging[at..at + payload.len()].copy_from_slice(payload);
                self.staged += payload.len();
                Payload::Staged { start: at, len: payload.len() }
            }
            _ => Payload::None,
        };
        self.wire_bytes += (HEADER_LEN + payload.len() + TAG_LEN) as u64;
        self.headers.push(h);
        self.payloads.push(p);
    }
}

// The one unsafe item of the data plane: the promise io_uring's send ring takes on trust.
// SAFETY: every range `slices` yields lies in memory the batch owns through a pointer and
// that moving the batch does not move: the headers' and tags' vector buffers (heap), and
// the two arena slots (a mapping the slots keep alive). While the ring owns the batch,
// nothing can reach those to write them.
#[allow(unsafe_code)]
unsafe impl hw::uring_send::SendBuf for Batch {
    fn for_each_slice(&self, f: &mut dyn FnMut(&[u8])) {
        self.slices(&mut |s| f(s));
    }
}
