//! The region digest both sides compare at the end of a transfer.
//!
//! XOR over every page of `xxh3_128(page, seed = region << 48 | page index)`. Because XOR
//! is order-free, workers fold in their pages in any order and the partial digests
//! combine; the seed binds each page to its place, so a page written at the wrong offset
//! changes the digest. It catches corruption and loss, not an adversary (the HMAC
//! handshake keeps those out).

use xxhash_rust::xxh3::xxh3_128_with_seed;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest(pub u128);

impl Digest {
    /// Folds in the pages of `bytes`, which start at page `first_page` of `region`. The
    /// last page may be short (the region's tail).
    pub fn add(&mut self, region: u32, first_page: u64, page_size: usize, bytes: &[u8]) {
        for (i, page) in bytes.chunks(page_size).enumerate() {
            let seed = (u64::from(region) << 48) | (first_page + i as u64);
            self.0 ^= xxh3_128_with_seed(page, seed);
        }
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

    /// The digest of a whole region, computed on `threads` threads.
    pub fn of_region(region: u32, page_size: usize, bytes: &[u8], threads: usize) -> Digest {
        let pages = bytes.len().div_ceil(page_size).max(1);
        let per = pages.div_ceil(threads.max(1)) * page_size;
        std::thread::scope(|s| {
            let parts: Vec<_> = bytes
                .chunks(per.max(page_size))
                .enumerate()
                .map(|(i, part)| {
                    s.spawn(move || {
                        let mut d = Digest::default();
                        d.add(region, (i * per / page_size) as u64, page_size, part);
                        d
                    })
                })
                .collect();
            parts.into_iter().fold(Digest::default(), |mut acc, h| {
                acc.combine(h.join().expect("digest thread"));
                acc
            })
        })
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
}
