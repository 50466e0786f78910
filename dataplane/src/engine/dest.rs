//! The destination file as the receiver's lanes write it, from several threads at once.
//! Each page may be written once: a write first claims its pages in an atomic bitmap, so
//! an overlapping or repeated frame is refused, and at the end every page must have been
//! claimed.

use std::fs::File;

use lockfree::Claims;

use crate::lane::Payload;

/// A write that overlaps pages already written, runs past the end, or fails.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("bytes {offset}..{end} of the destination: {why}")]
    Refused { offset: u64, end: u64, why: &'static str },
    #[error("writing bytes {offset}..{end} of the destination: {source}")]
    Write { offset: u64, end: u64, source: std::io::Error },
}

#[derive(Debug)]
pub struct Dest {
    /// The receiver's own handle on the file: a session's lanes share the `Dest` across
    /// the pool's receiving threads, which outlive no session but borrow from none.
    file: File,
    len: u64,
    page: u64,
    claimed: Claims,
}

impl Dest {
    /// `file` (a handle of its own, `try_clone`d from the caller's) must already have its
    /// final length. The claim table is one bit per page; a host that cannot hold it gets
    /// an error, not an abort.
    pub fn new(file: File, len: u64, page: u64) -> Result<Dest, crate::session::limits::LimitError> {
        let claimed = Claims::new(len.div_ceil(page))
            .map_err(|e| crate::session::limits::LimitError::Alloc { what: "the page claim table", bytes: e.bytes })?;
        Ok(Dest { file, len, page, claimed })
    }

    /// Claims the pages of `offset..offset + len` (`offset` on a page boundary).
    fn claim(&self, offset: u64, len: u64) -> Result<(), DestError> {
        let err = |why| DestError::Refused { offset, end: offset.saturating_add(len), why };
        if offset % self.page != 0 {
            return Err(err("not page-aligned"));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(err("past the end of the region"));
        }
        // Of two overlapping claims exactly one wins, and the loser holds nothing after
        // (checked in every interleaving by lockfree's loom models).
        self.claimed
            .claim(offset / self.page, (offset + len).div_ceil(self.page))
            .map_err(|_| err("pages already written (an overlapping or repeated frame)"))
    }

    /// Marks pages that arrive as zero: the new file already reads as zero there.
    pub fn claim_zero(&self, offset: u64, len: u64) -> Result<(), DestError> {
        self.claim(offset, len)
    }

    /// Writes `bytes` at `offset` after claiming its pages.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), DestError> {
        self.write_payload(offset, &Payload::One(bytes))
    }

    /// Writes a payload at `offset` after claiming its pages, with one `pwritev` for all
    /// of its parts.
    pub fn write_payload(&self, offset: u64, payload: &Payload<'_>) -> Result<(), DestError> {
        let end = offset + payload.len() as u64;
        self.claim(offset, payload.len() as u64)?;
        crate::lane::pwrite_parts(&self.file, payload.parts(), offset).map_err(|source| DestError::Write { offset, end, source })
    }

    /// Makes `offset..offset + len` read as zero again after claiming its pages: a page
    /// that was sent in an earlier migration round and is zero now. The pages are punched
    /// out of the file (a memfd frees them), not written.
    pub fn write_zero(&self, offset: u64, len: u64) -> Result<(), DestError> {
        use nix::fcntl::{FallocateFlags, fallocate};
        self.claim(offset, len)?;
        let len = len.min(self.len - offset);
        fallocate(&self.file, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64)
            .map_err(|e| DestError::Write { offset, end: offset + len, source: e.into() })
    }

    /// Forgets every claim: the next migration round may write each page once more.
    pub fn next_round(&self) {
        self.claimed.clear();
    }

    pub fn pages_claimed(&self) -> u64 {
        self.claimed.claimed()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pages(&self) -> u64 {
        self.len.div_ceil(self.page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_page_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(64 * 4096 + 100).unwrap();
        let d = Dest::new(f.try_clone().unwrap(), 64 * 4096 + 100, 4096).unwrap();
        assert_eq!(d.pages(), 65);
        d.write(4096, &[7u8; 8192]).unwrap();
        assert!(d.write(8192, &[1u8; 10]).is_err(), "page 2 is taken");
        assert!(d.claim_zero(0, 8192).is_err(), "page 1 is taken");
        d.claim_zero(0, 4096).unwrap();
        // Across bitmap words (pages 63 and 64, the short last page).
        d.write(63 * 4096, &[9u8; 4096 + 100]).unwrap();
        // A failed claim gives back what it took.
        assert!(d.write(60 * 4096, &[1u8; 4 * 4096]).is_err());
        d.write(60 * 4096, &[3u8; 3 * 4096]).unwrap();
        assert!(d.write(100, &[1]).is_err(), "unaligned");
        assert!(d.write(64 * 4096, &[1u8; 101]).is_err(), "past the end");
        assert_eq!(d.pages_claimed(), 1 + 2 + 2 + 3);
        drop(d);
        drop(f);
        let back = std::fs::read(&p).unwrap();
        assert_eq!(&back[4096..12288], &[7u8; 8192][..]);
        assert_eq!(&back[64 * 4096..], &[9u8; 100][..]);
        assert_eq!(back[0], 0);
    }

    #[test]
    fn rounds_rewrite_and_punch() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * 4096).unwrap();
        let d = Dest::new(f.try_clone().unwrap(), 4 * 4096, 4096).unwrap();
        d.write(0, &[5u8; 4 * 4096]).unwrap();
        assert!(d.write(4096, &[6u8; 4096]).is_err(), "once per round");
        d.next_round();
        assert_eq!(d.pages_claimed(), 0);
        d.write(4096, &[6u8; 4096]).unwrap();
        d.write_zero(2 * 4096, 4096).unwrap();
        assert!(d.write_zero(2 * 4096, 4096).is_err());
        let mut back = vec![0u8; 4 * 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert_eq!(&back[..4096], &[5u8; 4096][..]);
        assert_eq!(&back[4096..8192], &[6u8; 4096][..]);
        assert_eq!(&back[8192..12288], &[0u8; 4096][..], "punched out");
        assert_eq!(&back[12288..], &[5u8; 4096][..]);
    }
}
