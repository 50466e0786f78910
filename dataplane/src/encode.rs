//! Turning a chunk of the source into DATA frames (sender) and frames back into bytes
//! (receiver): zero-page runs become ZERO frames, other runs are sent raw or as zstd,
//! by the compression policy. Each worker owns one [`Encoder`] or [`Decoder`]; their
//! zstd contexts and buffers are reused for every chunk.

use std::time::{Duration, Instant};

use zstd_safe::{CCtx, DCtx};

use crate::plan::Compression;
use crate::wire::{Encoding, FrameError, Header};

/// A chunk that does not shrink below this share of its size goes raw: decompressing it
/// would cost the receiver more than the few bytes save.
const KEEP_IF_BELOW: f64 = 0.9;
/// Adaptive mode re-measures compression on one chunk in this many while it is off.
const SAMPLE_EVERY: u64 = 16;

fn is_zero(page: &[u8]) -> bool {
    // 16 bytes at a time, OR-folded: LLVM vectorises this, and a zero page is read once.
    let mut words = page.chunks_exact(16);
    let acc = words.by_ref().fold(0u128, |acc, w| acc | u128::from_ne_bytes(w.try_into().expect("16 bytes")));
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// What a worker has measured, for the adaptive policy.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rates {
    /// Input bytes per second zstd compresses.
    compress_bps: Option<f64>,
    /// Compressed size / input size.
    ratio: Option<f64>,
    /// Wire bytes per second the connection accepts.
    send_bps: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| 0.8 * o + 0.2 * new))
}

impl Rates {
    pub fn sent(&mut self, bytes: usize, took: Duration) {
        if bytes > 0 && !took.is_zero() {
            self.send_bps = ewma(self.send_bps, bytes as f64 / took.as_secs_f64());
        }
    }

    fn compressed(&mut self, input: usize, output: usize, took: Duration) {
        if input > 0 && !took.is_zero() {
            self.compress_bps = ewma(self.compress_bps, input as f64 / took.as_secs_f64());
            self.ratio = ewma(self.ratio, output as f64 / input as f64);
        }
    }

    /// One worker compresses then sends, one after the other: per input byte that costs
    /// 1/c + r/s instead of 1/s, which is less exactly when c > s / (1 - r).
    pub fn compression_pays(&self) -> bool {
        match (self.compress_bps, self.ratio, self.send_bps) {
            (Some(c), Some(r), Some(s)) if r < 1.0 => c > s / (1.0 - r),
            // Nothing measured yet: try it, which measures it.
            _ => true,
        }
    }
}

/// Counters a worker keeps while encoding.
#[derive(Debug, Default, Clone, Copy)]
pub struct EncodeStats {
    pub zero_pages: u64,
    pub raw_bytes: u64,
    /// Input bytes of the chunks sent compressed, and their compressed size.
    pub compressed_in: u64,
    pub compressed_out: u64,
    pub frames: u64,
}

pub struct Encoder {
    cctx: CCtx<'static>,
    policy: Compression,
    scratch: Vec<u8>,
    pub rates: Rates,
    pub stats: EncodeStats,
    chunks: u64,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("policy", &self.policy).field("stats", &self.stats).finish()
    }
}

impl Encoder {
    pub fn new(policy: Compression, max_chunk: usize) -> Encoder {
        Encoder {
            cctx: CCtx::create(),
            policy,
            scratch: Vec::with_capacity(zstd_safe::compress_bound(max_chunk)),
            rates: Rates::default(),
            stats: EncodeStats::default(),
            chunks: 0,
        }
    }

    fn level(&self) -> Option<i32> {
        match self.policy {
            Compression::Off => None,
            Compression::Zstd { level } => Some(level),
            Compression::Adaptive { level } => {
                (self.rates.compression_pays() || self.chunks % SAMPLE_EVERY == 0).then_some(level)
            }
        }
    }

    /// Encodes `bytes` (at `offset` of `region`, page-aligned) into frames, calling `emit`
    /// with each sealed header and its payload.
    pub fn encode<E>(
        &mut self,
        region: u32,
        offset: u64,
        page_size: usize,
        bytes: &[u8],
        emit: &mut impl FnMut(Header, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.chunks += 1;
        let level = self.level();
        let mut run_start = 0;
        let mut run_zero = None;
        for (i, page) in bytes.chunks(page_size).enumerate() {
            let zero = is_zero(page);
            if run_zero != Some(zero) {
                if let Some(z) = run_zero {
                    self.emit_run(region, offset + run_start as u64, z, &bytes[run_start..i * page_size], level, emit)?;
                }
                run_zero = Some(zero);
                run_start = i * page_size;
            }
            if zero {
                self.stats.zero_pages += 1;
            }
        }
        if let Some(z) = run_zero {
            self.emit_run(region, offset + run_start as u64, z, &bytes[run_start..], level, emit)?;
        }
        Ok(())
    }

    /// One frame for a run of zero or of non-zero pages.
    fn emit_run<E>(
        &mut self,
        region: u32,
        offset: u64,
        zero: bool,
        run: &[u8],
        level: Option<i32>,
        emit: &mut impl FnMut(Header, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let raw_len = run.len() as u32;
        self.stats.frames += 1;
        if zero {
            return emit(Header::data(Encoding::Zero, region, offset, raw_len, 0).seal(&[]), &[]);
        }
        if let Some(level) = level {
            self.scratch.clear();
            let t = Instant::now();
            let res = self.cctx.compress(&mut self.scratch, run, level);
            let took = t.elapsed();
            if let Ok(n) = res {
                self.rates.compressed(run.len(), n, took);
                if (n as f64) < KEEP_IF_BELOW * run.len() as f64 {
                    self.stats.compressed_in += run.len() as u64;
                    self.stats.compressed_out += n as u64;
                    let h = Header::data(Encoding::Zstd, region, offset, raw_len, n as u32).seal(&self.scratch);
                    return emit(h, &self.scratch);
                }
            }
        }
        self.stats.raw_bytes += run.len() as u64;
        emit(Header::data(Encoding::Raw, region, offset, raw_len, raw_len).seal(run), run)
    }
}

/// The receiver's zstd context and output buffer.
pub struct Decoder {
    dctx: DCtx<'static>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { dctx: DCtx::create(), out: Vec::new() }
    }
}

impl Decoder {
    /// Decompresses a zstd payload that must yield exactly `raw_len` bytes.
    pub fn zstd(&mut self, payload: &[u8], raw_len: u32) -> Result<&[u8], FrameError> {
        self.out.clear();
        self.out.reserve(raw_len as usize);
        match self.dctx.decompress(&mut self.out, payload) {
            Ok(n) if n == raw_len as usize => Ok(&self.out),
            Ok(n) => Err(FrameError::Decompress { want: raw_len, got: n.to_string() }),
            Err(code) => Err(FrameError::Decompress { want: raw_len, got: format!("an error ({})", zstd_safe::get_error_name(code)) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(enc: &mut Encoder, data: &[u8]) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        enc.encode::<()>(0, 1 << 20, 4096, data, &mut |h, p| {
            out.push((h, p.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    fn page(fill: impl Fn(usize) -> u8) -> Vec<u8> {
        (0..4096).map(fill).collect()
    }

    #[test]
    fn zero_runs_and_data_runs() {
        let mut data = Vec::new();
        data.extend(page(|_| 0));
        data.extend(page(|_| 0));
        data.extend(page(|i| (i * 31 % 256) as u8));
        data.extend(page(|_| 0));
        let mut enc = Encoder::new(Compression::Off, 1 << 20);
        let f = frames(&mut enc, &data);
        let kinds: Vec<_> = f.iter().map(|(h, _)| (h.encoding().unwrap(), h.offset.get(), h.raw_len.get())).collect();
        assert_eq!(kinds, vec![(Encoding::Zero, 1 << 20, 8192), (Encoding::Raw, (1 << 20) + 8192, 4096), (Encoding::Zero, (1 << 20) + 12288, 4096)]);
        assert_eq!(enc.stats.zero_pages, 3);
        for (h, p) in &f {
            h.verify(p).unwrap();
        }
    }

    #[test]
    fn zstd_round_trip_and_incompressible_goes_raw() {
        let text: Vec<u8> = b"guest memory page with text ".iter().cycle().take(8192).copied().collect();
        let mut enc = Encoder::new(Compression::Zstd { level: 1 }, 1 << 20);
        let f = frames(&mut enc, &text);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0.encoding().unwrap(), Encoding::Zstd);
        let mut dec = Decoder::default();
        assert_eq!(dec.zstd(&f[0].1, 8192).unwrap(), &text[..]);
        assert!(dec.zstd(&f[0].1, 8191).is_err(), "a wrong raw_len is an error");
        assert!(dec.zstd(b"not zstd at all", 8192).is_err());
        // Random bytes do not shrink: raw.
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..8192).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }).collect();
        let f = frames(&mut enc, &noise);
        assert_eq!(f[0].0.encoding().unwrap(), Encoding::Raw);
    }

    #[test]
    fn adaptive_turns_off_on_a_fast_link() {
        let mut r = Rates::default();
        assert!(r.compression_pays(), "unmeasured: try");
        r.compressed(1000, 300, Duration::from_micros(3)); // ~333 MB/s, ratio 0.3
        r.sent(1000, Duration::from_micros(1)); // 1 GB/s link
        assert!(!r.compression_pays());
        let mut slow = r;
        slow.send_bps = Some(125e6); // 1 Gb/s
        assert!(slow.compression_pays());
    }
}
