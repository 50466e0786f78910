//! The region digest both sides compare at the end of a transfer.
//!
//! XOR over every page of `xxh3_128(xxh3_128(page), seed = region << 48 | page index)`.
//! Because XOR is order-free, workers fold in their pages in any order and the partial
//! digests combine; the seed binds each page's hash to its place, so a page written at the
//! wrong offset changes the digest. Hashing the page unseeded first lets a zero page
//! (45% of a typical guest) use a precomputed hash instead of being read. It catches
//! corruption and loss, not an adversary: over TCP every frame that carried the pages was
//! authenticated ([`crate::session::seal`]).
//!
//! Memory that arrives without frames (RDMA's one-sided writes) is digested with
//! [`Hashing::Keyed`] instead: each page's share is a keyed BLAKE3 of its BLAKE3 hash and
//! its place, under a key from the session's handshake, so nobody without the key can make
//! a changed memory fold to the same digest (XOR-folding unkeyed hashes could be forged).

use std::sync::OnceLock;

use xxhash_rust::xxh3::{xxh3_128, xxh3_128_with_seed};

/// `xxh3_128` of an all-zero page of each length up to 4096, computed on first use.
fn zero_hash(len: usize) -> u128 {
    static FULL: OnceLock<u128> = OnceLock::new();
    if len == 4096 { *FULL.get_or_init(|| xxh3_128(&[0u8; 4096])) } else { xxh3_128(&vec![0u8; len]) }
}

fn place(page_hash: u128, region: u32, page: u64) -> u128 {
    xxh3_128_with_seed(&page_hash.to_le_bytes(), (u64::from(region) << 48) | page)
}

/// Whether `off..off + n` of `file` is all hole (SEEK_DATA finds no data before its end).
/// Any doubt (a file system without SEEK_DATA) says no, and the bytes are read. Moves the
/// file's offset: only for descriptions the caller owns.
pub(crate) fn is_hole(file: &std::fs::File, off: u64, n: u64) -> bool {
    use nix::unistd::{Whence, lseek};
    match lseek(file, off as i64, Whence::SeekData) {
        Ok(data) => data as u64 >= off + n,
        // ENXIO: no data at or after `off`.
        Err(nix::errno::Errno::ENXIO) => true,
        Err(_) => false,
    }
}

/// The key of a keyed digest: derived per session from the handshake.
#[derive(Clone)]
pub struct DigestKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(..)")
    }
}

impl DigestKey {
    fn place(&self, page_hash: &blake3::Hash, region: u32, page: u64) -> u128 {
        let mut m = blake3::Hasher::new_keyed(&self.0);
        m.update(page_hash.as_bytes());
        m.update(&region.to_le_bytes());
        m.update(&page.to_le_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&m.finalize().as_bytes()[..16]);
        u128::from_le_bytes(out)
    }
}

/// How each page's share of a digest is computed.
#[derive(Debug, Clone, Copy)]
pub enum Hashing<'k> {
    /// xxh3: for pages whose frames were authenticated on the way.
    Fast,
    /// Keyed BLAKE3: for pages that arrived without frames.
    Keyed(&'k DigestKey),
}

impl Hashing<'_> {
    fn page(self, region: u32, page: u64, bytes: &[u8]) -> u128 {
        match self {
            Hashing::Fast => place(xxh3_128(bytes), region, page),
            Hashing::Keyed(k) => k.place(&blake3::hash(bytes), region, page),
        }
    }

    fn zero_page(self, region: u32, page: u64, len: usize) -> u128 {
        match self {
            Hashing::Fast => place(zero_hash(len), region, page),
            Hashing::Keyed(k) => {
                static FULL: OnceLock<blake3::Hash> = OnceLock::new();
                let h = if len == 4096 { *FULL.get_or_init(|| blake3::hash(&[0u8; 4096])) } else { blake3::hash(&vec![0u8; len]) };
                k.place(&h, region, page)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest(pub u128);

/// Digests of disjoint parts combine into the digest of the whole.
impl std::iter::Sum for Digest {
    fn sum<I: Iterator<Item = Digest>>(parts: I) -> Digest {
        parts.fold(Digest::default(), |mut acc, d| {
            acc.combine(d);
            acc
        })
    }
}

impl Digest {
    /// Folds in the pages of `bytes`, which start at page `first_page` of `region`. The
    /// last page may be short (the region's tail).
    pub fn add(&mut self, region: u32, first_page: u64, page_size: usize, bytes: &[u8]) {
        self.add_with(Hashing::Fast, region, first_page, page_size, bytes);
    }

    /// [`Digest::add`] with the given hashing.
    pub fn add_with(&mut self, h: Hashing<'_>, region: u32, first_page: u64, page_size: usize, bytes: &[u8]) {
        for (i, page) in bytes.chunks(page_size).enumerate() {
            self.0 ^= h.page(region, first_page + i as u64, page);
        }
    }

    /// Folds in `len` zero bytes starting at page `first_page`, without reading any.
    pub fn add_zero(&mut self, region: u32, first_page: u64, page_size: usize, len: u64) {
        self.add_zero_with(Hashing::Fast, region, first_page, page_size, len);
    }

    /// [`Digest::add_zero`] with the given hashing.
    pub fn add_zero_with(&mut self, h: Hashing<'_>, region: u32, first_page: u64, page_size: usize, len: u64) {
        let pages = len.div_ceil(page_size as u64);
        for i in 0..pages {
            let this = (len - i * page_size as u64).min(page_size as u64) as usize;
            self.0 ^= h.zero_page(region, first_page + i, this);
        }
    }

    /// The digest of one page (its share of a region's digest), for tables that keep a
    /// hash per page and replace it when the page is written again.
    pub fn of_page(region: u32, page: u64, bytes: &[u8]) -> Digest {
        Digest(place(xxh3_128(bytes), region, page))
    }

    /// [`Digest::of_page`] of a zero page of `len` bytes.
    pub fn of_zero_page(region: u32, page: u64, len: usize) -> Digest {
        Digest(place(zero_hash(len), region, page))
    }

    /// [`Digest::of_page`] with the given hashing.
    pub fn of_page_with(h: Hashing<'_>, region: u32, page: u64, bytes: &[u8]) -> Digest {
        Digest(h.page(region, page, bytes))
    }

    /// [`Digest::of_zero_page`] with the given hashing.
    pub fn of_zero_page_with(h: Hashing<'_>, region: u32, page: u64, len: usize) -> Digest {
        Digest(h.zero_page(region, page, len))
    }

    pub fn combine(&mut self, other: Digest) {
        self.0 ^= other.0;
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    pub fn from_bytes(b: [u8; 16]) -> Digest {
        Digest(u128::from_le_bytes(b))
    }

    pub fn hex(self) -> String {
        format!("{:032x}", self.0)
    }

    /// The digest of the first `len` bytes of `file` as region `region`, read with
    /// `pread` in 1 MiB pieces on `threads` threads. With `probe_holes` (the caller owns
    /// the file's offset, which `lseek` moves), a piece that is a hole (never written:
    /// a memfd's pages the guest never touched) is folded in as zeros without reading.
    pub fn of_file(
        region: u32,
        page_size: usize,
        file: &std::fs::File,
        len: u64,
        threads: usize,
        probe_holes: bool,
    ) -> std::io::Result<Digest> {
        Digest::of_file_with(Hashing::Fast, region, page_size, file, len, threads, probe_holes)
    }

    /// [`Digest::of_file`] with the given hashing.
    pub fn of_file_with(
        h: Hashing<'_>,
        region: u32,
        page_size: usize,
        file: &std::fs::File,
        len: u64,
        threads: usize,
        probe_holes: bool,
    ) -> std::io::Result<Digest> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        const PIECE: u64 = 1 << 20;
        let next = AtomicU64::new(0);
        let pieces = len.div_ceil(PIECE);
        let parts = crate::helpers::fan_out(threads, || -> std::io::Result<Digest> {
            let mut buf = vec![0u8; PIECE as usize];
            let mut d = Digest::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= pieces {
                    return Ok(d);
                }
                let (off, n) = (i * PIECE, (len - i * PIECE).min(PIECE) as usize);
                if probe_holes && is_hole(file, off, n as u64) {
                    d.add_zero_with(h, region, off / page_size as u64, page_size, n as u64);
                    continue;
                }
                file.read_exact_at(&mut buf[..n], off)?;
                d.add_with(h, region, off / page_size as u64, page_size, &buf[..n]);
            }
        });
        let mut acc = Digest::default();
        for p in parts {
            acc.combine(p?);
        }
        Ok(acc)
    }

    /// The digest of a whole region, computed on `threads` threads.
    pub fn of_region(region: u32, page_size: usize, bytes: &[u8], threads: usize) -> Digest {
        let pages = bytes.len().div_ceil(page_size).max(1);
        let per = pages.div_ceil(threads.max(1)) * page_size;
        let parts: Vec<&[u8]> = bytes.chunks(per.max(page_size)).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        crate::helpers::fan_out(parts.len(), || {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut d = Digest::default();
            if let Some(part) = parts.get(i) {
                d.add(region, (i * per / page_size) as u64, page_size, part);
            }
            d
        })
        .into_iter()
        .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_free_and_position_bound() {
        let data: Vec<u8> = (0..5 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
        let whole = Digest::of_region(0, 4096, &data, 1);
        assert_eq!(Digest::of_region(0, 4096, &data, 3), whole);
        let mut parts = Digest::default();
        parts.add(0, 3, 4096, &data[3 * 4096..]);
        parts.add(0, 0, 4096, &data[..3 * 4096]);
        assert_eq!(parts, whole);
        // Swapping two pages changes it.
        let mut swapped = data.clone();
        let (a, b) = swapped.split_at_mut(4096);
        a.swap_with_slice(&mut b[..4096]);
        assert_ne!(Digest::of_region(0, 4096, &swapped, 1), whole);
        assert_ne!(Digest::of_region(1, 4096, &data, 1), whole);
    }

    #[test]
    fn of_file_matches_of_region() {
        use std::io::Write;
        let data: Vec<u8> = (0..(3 << 20) + 5000).map(|i| (i * 13 % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let want = Digest::of_region(0, 4096, &data, 1);
        assert_eq!(Digest::of_file(0, 4096, &f, data.len() as u64, 3, true).unwrap(), want);
        assert!(Digest::of_file(0, 4096, &f, data.len() as u64 + 1, 1, false).is_err(), "a short file is an error");
        // Holes (a memfd never written there) digest as zeros.
        let m = hw::memmap::memfd("digest-test", 5 << 20, false).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&m, &data[..4096], 2 << 20).unwrap();
        let mut image = vec![0u8; 5 << 20];
        image[2 << 20..(2 << 20) + 4096].copy_from_slice(&data[..4096]);
        assert_eq!(Digest::of_file(0, 4096, &m, 5 << 20, 2, true).unwrap(), Digest::of_region(0, 4096, &image, 1));
    }

    /// A keyed digest agrees with itself computed any way (pages, zeros, a file), differs
    /// from the fast one and under another key.
    #[test]
    fn keyed_digests() {
        let (k, other) = (DigestKey([1; 32]), DigestKey([2; 32]));
        let mut data = vec![0u8; 3 * 4096 + 10];
        data[4096] = 1;
        let mut whole = Digest::default();
        whole.add_with(Hashing::Keyed(&k), 0, 0, 4096, &data);
        let mut parts = Digest::default();
        parts.add_zero_with(Hashing::Keyed(&k), 0, 0, 4096, 4096);
        parts.add_with(Hashing::Keyed(&k), 0, 1, 4096, &data[4096..8192]);
        parts.add_zero_with(Hashing::Keyed(&k), 0, 2, 4096, 4096 + 10);
        assert_eq!(parts, whole);
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        assert_eq!(Digest::of_file_with(Hashing::Keyed(&k), 0, 4096, &f, data.len() as u64, 2, false).unwrap(), whole);
        assert_ne!(whole, Digest::of_region(0, 4096, &data, 1));
        let mut o = Digest::default();
        o.add_with(Hashing::Keyed(&other), 0, 0, 4096, &data);
        assert_ne!(o, whole);
    }

    #[test]
    fn zero_pages_without_reading_them() {
        let mut data = vec![0u8; 3 * 4096 + 10];
        data[4096] = 1;
        let whole = Digest::of_region(0, 4096, &data, 1);
        let mut d = Digest::default();
        d.add_zero(0, 0, 4096, 4096);
        d.add(0, 1, 4096, &data[4096..8192]);
        d.add_zero(0, 2, 4096, 4096 + 10);
        assert_eq!(d, whole);
    }
}
