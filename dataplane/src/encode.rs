//! Turning a chunk of the source into DATA frames (sender) and frames back into bytes
//! (receiver): zero-page runs become ZERO frames, other runs are sent raw or as zstd,
//! by the compression policy. Each worker owns one [`Encoder`] or [`Decoder`]; their
//! zstd contexts and buffers are reused for every chunk.

use std::time::Instant;

use zstd_safe::{CCtx, DCtx};

use crate::plan::Compression;
use crate::wire::{Encoding, FrameError, Header};

/// A chunk that does not shrink below this share of its size goes raw: decompressing it
/// would cost the receiver more than the few bytes save.
const KEEP_IF_BELOW: f64 = 0.9;

fn is_zero(page: &[u8]) -> bool {
    // A data page nearly always has a non-zero byte in its first 64: answer from those.
    let head = page.len().min(64);
    if page[..head].chunks(16).any(|w| w.iter().fold(0u8, |a, &b| a | b) != 0) {
        return false;
    }
    // 16 bytes at a time, OR-folded: LLVM vectorises this, and a zero page is read once.
    let mut words = page.chunks_exact(16);
    let acc = words.by_ref().fold(0u128, |acc, w| acc | u128::from_ne_bytes(w.try_into().expect("16 bytes")));
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// Splits `bytes` into maximal runs of zero and of non-zero pages: `f(start, end, zero)`
/// for each, in order. The last page may be short.
pub(crate) fn page_runs(bytes: &[u8], page_size: usize, f: &mut impl FnMut(usize, usize, bool)) {
    let mut run_start = 0;
    let mut run_zero = None;
    for (i, page) in bytes.chunks(page_size).enumerate() {
        let zero = is_zero(page);
        if run_zero != Some(zero) {
            if let Some(z) = run_zero {
                f(run_start, i * page_size, z);
            }
            run_zero = Some(zero);
            run_start = i * page_size;
        }
    }
    if let Some(z) = run_zero {
        f(run_start, bytes.len(), z);
    }
}

/// The adaptive policy: a worker alternates windows of chunks with and without
/// compression, measures the region bytes per second each mode achieves (compression,
/// waiting for the lanes to take the chunks and all), uses the faster, and re-tries the other now and
/// then because the link and the data change. This answers "does compressing finish
/// sooner?" directly instead of modelling it.
#[derive(Debug, Clone)]
pub struct Adaptive {
    compress: bool,
    /// Region bytes per second, EWMA, for [raw, compressed].
    rate: [Option<f64>; 2],
    window_bytes: u64,
    window_chunks: u32,
    window_start: Option<Instant>,
    since_probe: u32,
}

/// Chunks per measuring window.
const WINDOW_CHUNKS: u32 = 32;
/// Windows on the better mode between two probes of the other.
const PROBE_EVERY: u32 = 16;

impl Default for Adaptive {
    fn default() -> Self {
        // Start compressing: the first window measures it.
        Adaptive { compress: true, rate: [None, None], window_bytes: 0, window_chunks: 0, window_start: None, since_probe: 0 }
    }
}

impl Adaptive {
    pub fn compressing(&self) -> bool {
        self.compress
    }

    /// Called when a chunk of `bytes` region bytes has been handed to the connection.
    pub fn chunk_done(&mut self, bytes: u64) {
        let start = *self.window_start.get_or_insert_with(Instant::now);
        self.window_bytes += bytes;
        self.window_chunks += 1;
        if self.window_chunks < WINDOW_CHUNKS {
            return;
        }
        let secs = start.elapsed().as_secs_f64();
        if secs > 0.0 {
            let r = self.window_bytes as f64 / secs;
            let slot = &mut self.rate[usize::from(self.compress)];
            *slot = Some(slot.map_or(r, |o| 0.7 * o + 0.3 * r));
        }
        self.window_bytes = 0;
        self.window_chunks = 0;
        self.window_start = None;
        self.compress = match self.rate {
            [None, _] => false,
            [_, None] => true,
            [Some(raw), Some(zstd)] => {
                self.since_probe += 1;
                let best = zstd > raw;
                if self.since_probe >= PROBE_EVERY {
                    self.since_probe = 0;
                    !best
                } else {
                    best
                }
            }
        };
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

/// A zstd compression context and the buffer it compresses into: what compressing costs
/// to set up, kept by whoever encodes many chunks (a pool worker thread keeps one for every
/// session it serves; each call is a whole zstd frame, so nothing carries over between
/// sessions).
pub struct Compressor {
    cctx: CCtx<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor").field("capacity", &self.scratch.capacity()).finish()
    }
}

impl Compressor {
    /// A context for chunks of at most `max_chunk` bytes.
    pub fn new(max_chunk: usize) -> Compressor {
        Compressor { cctx: CCtx::create(), scratch: Vec::with_capacity(zstd_safe::compress_bound(max_chunk)) }
    }
}

/// A session's encoding: its compression policy, the adaptive policy's measurements and
/// what it encoded. The zstd context is lent by the caller ([`Compressor`]).
pub struct Encoder {
    policy: Compression,
    pub adaptive: Adaptive,
    pub stats: EncodeStats,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("policy", &self.policy).field("stats", &self.stats).finish()
    }
}

impl Encoder {
    pub fn new(policy: Compression) -> Encoder {
        Encoder { policy, adaptive: Adaptive::default(), stats: EncodeStats::default() }
    }

    fn level(&self) -> Option<i32> {
        match self.policy {
            Compression::Off => None,
            Compression::Zstd { level } => Some(level),
            Compression::Adaptive { level } => self.adaptive.compressing().then_some(level),
        }
    }

    /// Encodes `bytes` (at `offset` of `region`, page-aligned) into frames, calling `emit`
    /// with each sealed header and its payload; compressing with `z`.
    pub fn encode<E>(
        &mut self,
        z: &mut Compressor,
        region: u32,
        offset: u64,
        page_size: usize,
        bytes: &[u8],
        emit: &mut impl FnMut(Header, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let level = self.level();
        let mut result = Ok(());
        page_runs(bytes, page_size, &mut |start, end, zero| {
            if zero {
                self.stats.zero_pages += (end - start).div_ceil(page_size) as u64;
            }
            if result.is_ok() {
                result = self.emit_run(z, (region, offset + start as u64), zero, &bytes[start..end], level, emit);
            }
        });
        result
    }

    /// One frame for `bytes` as they are, with no page structure (stream mode: a VMM's
    /// migration stream), compressed by the policy where that shrinks it enough.
    pub fn encode_bytes<E>(
        &mut self,
        z: &mut Compressor,
        region: u32,
        offset: u64,
        bytes: &[u8],
        emit: &mut impl FnMut(Header, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let level = self.level();
        self.emit_run(z, (region, offset), false, bytes, level, emit)
    }

    /// One frame for a run of zero or of non-zero pages.
    fn emit_run<E>(
        &mut self,
        z: &mut Compressor,
        (region, offset): (u32, u64),
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
            z.scratch.clear();
            if let Ok(n) = z.cctx.compress(&mut z.scratch, run, level) {
                if (n as f64) < KEEP_IF_BELOW * run.len() as f64 {
                    self.stats.compressed_in += run.len() as u64;
                    self.stats.compressed_out += n as u64;
                    let h = Header::data(Encoding::Zstd, region, offset, raw_len, n as u32).seal(&z.scratch);
                    return emit(h, &z.scratch);
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
        enc.encode::<()>(&mut Compressor::new(1 << 20), 0, 1 << 20, 4096, data, &mut |h, p| {
            out.push((h, p.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    fn page(fill: impl Fn(usize) -> u8) -> Vec<u8> {
        (0..4096).map(fill).collect()
    }

    /// One non-zero byte anywhere makes a page non-zero: in the head checked first, just
    /// past it, at the very end, and in a short last page.
    #[test]
    fn zero_pages_and_single_bytes() {
        assert!(is_zero(&[0u8; 4096]) && is_zero(&[0u8; 100]) && is_zero(&[]));
        for at in [0, 15, 63, 64, 100, 4080, 4095] {
            let mut p = [0u8; 4096];
            p[at] = 1;
            assert!(!is_zero(&p), "byte {at}");
        }
        let mut short = [0u8; 100];
        short[99] = 0x80;
        assert!(!is_zero(&short));
    }

    #[test]
    fn zero_runs_and_data_runs() {
        let mut data = Vec::new();
        data.extend(page(|_| 0));
        data.extend(page(|_| 0));
        data.extend(page(|i| (i * 31 % 256) as u8));
        data.extend(page(|_| 0));
        let mut enc = Encoder::new(Compression::Off);
        let f = frames(&mut enc, &data);
        let kinds: Vec<_> = f.iter().map(|(h, _)| (h.encoding().unwrap(), h.offset.get(), h.raw_len.get())).collect();
        assert_eq!(
            kinds,
            vec![(Encoding::Zero, 1 << 20, 8192), (Encoding::Raw, (1 << 20) + 8192, 4096), (Encoding::Zero, (1 << 20) + 12288, 4096)]
        );
        assert_eq!(enc.stats.zero_pages, 3);
        for (h, p) in &f {
            h.verify(p).unwrap();
        }
    }

    #[test]
    fn zstd_round_trip_and_incompressible_goes_raw() {
        let text: Vec<u8> = b"guest memory page with text ".iter().cycle().take(8192).copied().collect();
        let mut enc = Encoder::new(Compression::Zstd { level: 1 });
        let f = frames(&mut enc, &text);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0.encoding().unwrap(), Encoding::Zstd);
        let mut dec = Decoder::default();
        assert_eq!(dec.zstd(&f[0].1, 8192).unwrap(), &text[..]);
        assert!(dec.zstd(&f[0].1, 8191).is_err(), "a wrong raw_len is an error");
        assert!(dec.zstd(b"not zstd at all", 8192).is_err());
        // Random bytes do not shrink: raw.
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let f = frames(&mut enc, &noise);
        assert_eq!(f[0].0.encoding().unwrap(), Encoding::Raw);
    }

    #[test]
    fn adaptive_follows_the_faster_mode() {
        fn window(a: &mut Adaptive, bytes_per_chunk: u64) {
            for _ in 0..WINDOW_CHUNKS {
                a.chunk_done(bytes_per_chunk);
            }
        }
        let mut a = Adaptive::default();
        assert!(a.compressing(), "the first window measures compression");
        a.rate = [None, Some(100e6)];
        window(&mut a, 1);
        assert!(!a.compressing(), "then raw is measured");
        // Raw measured much faster than compressed (a fast link): stay raw ...
        a.rate = [Some(1e12), Some(100e6)];
        let mut probes = 0;
        for _ in 0..(2 * PROBE_EVERY) {
            window(&mut a, 1);
            a.rate = [Some(1e12), Some(100e6)];
            probes += u32::from(a.compressing());
        }
        // ... except for the periodic probe of the other mode.
        assert!((1..=2).contains(&probes), "{probes}");
        // Compressed faster (a slow link): compress.
        a.rate = [Some(100e6), Some(300e6)];
        a.since_probe = 0;
        window(&mut a, 1);
        a.rate = [Some(100e6), Some(300e6)];
        window(&mut a, 1);
        assert!(a.compressing());
    }

    /// One context serves sessions with different levels in turn (as a pool thread's
    /// does): each frame decodes to its input, whatever was compressed before it.
    #[test]
    fn one_context_serves_sessions_in_turn() {
        let mut z = Compressor::new(1 << 20);
        let text: Vec<u8> = b"guest memory page with text ".iter().cycle().take(16384).copied().collect();
        let other: Vec<u8> = (0..16384u32).map(|i| (i / 64 % 7) as u8 + b'a').collect();
        let (mut fast, mut slow) = (Encoder::new(Compression::Zstd { level: 1 }), Encoder::new(Compression::Zstd { level: 9 }));
        let mut dec = Decoder::default();
        for _ in 0..3 {
            for (enc, data) in [(&mut fast, &text), (&mut slow, &other)] {
                let mut got = Vec::new();
                enc.encode::<()>(&mut z, 0, 0, 4096, data, &mut |h, p| {
                    assert_eq!(h.encoding().unwrap(), Encoding::Zstd);
                    got.extend_from_slice(dec.zstd(p, h.raw_len.get()).unwrap());
                    Ok(())
                })
                .unwrap();
                assert!(got == *data);
            }
        }
    }
}
