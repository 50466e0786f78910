//! The data plane's per-byte pieces, one 64 KiB chunk of the guest-memory corpus recipe at a
//! time (`control::guest::fill_image`: 45% zero, 25% ELF, 15% text, 15% random pages):
//! encoding (zero-page scan, CRC-32C sealing, zstd), decoding, the page digest, and frame
//! parsing on the receiving side.
//!
//!     cargo bench -p ferry-benches --bench pieces

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dataplane::conn::FrameReader;
use dataplane::digest::Digest;
use dataplane::encode::{Compressor, Decoder, Encoder};
use dataplane::plan::Compression;
use dataplane::wire::{HEADER_LEN, Header, Kind, max_payload_for};
use zerocopy::IntoBytes;

const CHUNK: usize = 64 << 10;
const PAGE: usize = 4096;

/// 16 MiB of the corpus recipe, seeded.
fn corpus() -> Vec<u8> {
    let mut mem = vec![0u8; 16 << 20];
    control::guest::fill_image(&mut mem, 7);
    mem
}

fn encode(c: &mut Criterion) {
    let mem = corpus();
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(mem.len() as u64));
    for (name, policy) in [("off", Compression::Off), ("zstd1", Compression::Zstd { level: 1 })] {
        let mut enc = Encoder::new(policy);
        let mut z = Compressor::new(CHUNK);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut wire = 0usize;
                for (i, chunk) in mem.chunks(CHUNK).enumerate() {
                    enc.encode::<()>(&mut z, 0, (i * CHUNK) as u64, PAGE, chunk, &mut |_, p| {
                        wire += HEADER_LEN + p.len();
                        Ok(())
                    })
                    .unwrap();
                }
                black_box(wire)
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mem = corpus();
    let mut enc = Encoder::new(Compression::Zstd { level: 1 });
    let mut z = Compressor::new(CHUNK);
    let mut frames: Vec<(u32, Vec<u8>)> = Vec::new();
    for (i, chunk) in mem.chunks(CHUNK).enumerate() {
        enc.encode::<()>(&mut z, 0, (i * CHUNK) as u64, PAGE, chunk, &mut |h, p| {
            if h.encoding == dataplane::wire::Encoding::Zstd as u8 {
                frames.push((h.raw_len.get(), p.to_vec()));
            }
            Ok(())
        })
        .unwrap();
    }
    let raw: u64 = frames.iter().map(|(n, _)| u64::from(*n)).sum();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(raw));
    let mut dec = Decoder::default();
    g.bench_function("zstd1", |b| {
        b.iter(|| {
            for (n, p) in &frames {
                black_box(dec.zstd(p, *n).unwrap().len());
            }
        })
    });
    g.finish();
}

fn digest(c: &mut Criterion) {
    let mem = corpus();
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Bytes(mem.len() as u64));
    g.bench_function("pages", |b| {
        b.iter(|| {
            let mut d = Digest::default();
            d.add(0, 0, PAGE, &mem);
            black_box(d)
        })
    });
    g.finish();
}

/// The receiving lane's parse: header checks, CRC and tag of every frame of 16 MiB of raw
/// chunks, from one in-memory stream; and the tag alone (keyed BLAKE3 over each frame),
/// which is what authenticating the data costs each side.
fn parse(c: &mut Criterion) {
    use dataplane::session::seal::{Keys, Side};
    let mem = corpus();
    let keys =
        || (Keys::derive(Some(&[7; 32]), Side::Client, &[1; 32], &[2; 32]), Keys::derive(Some(&[7; 32]), Side::Server, &[1; 32], &[2; 32]));
    let (mut tx, rx) = {
        let (c, s) = keys();
        (c.tx, s.rx)
    };
    let mut stream = Vec::with_capacity(mem.len() + mem.len() / CHUNK * (HEADER_LEN + 16));
    for (i, chunk) in mem.chunks(CHUNK).enumerate() {
        let h = Header::data(dataplane::wire::Encoding::Raw, 0, (i * CHUNK) as u64, CHUNK as u32, CHUNK as u32).seal(chunk);
        let tag = tx.tag(&h, [chunk]);
        stream.extend_from_slice(h.as_bytes());
        stream.extend_from_slice(chunk);
        stream.extend_from_slice(&tag);
    }
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    let max = max_payload_for(CHUNK as u32);
    g.bench_function("frames_crc_tag", |b| {
        b.iter(|| {
            let mut r = FrameReader::new(4 * (HEADER_LEN + max as usize + 16), max, rx.clone());
            let mut src = &stream[..];
            let mut n = 0;
            while let Ok((_, Kind::Data, p)) = r.next(&mut src, "bench") {
                n += p.len();
            }
            black_box(n)
        })
    });
    g.bench_function("tag_only", |b| {
        let h = Header::data(dataplane::wire::Encoding::Raw, 0, 0, CHUNK as u32, CHUNK as u32);
        b.iter(|| {
            let mut tx = keys().0.tx;
            for chunk in mem.chunks(CHUNK) {
                black_box(tx.tag(&h, [chunk]));
            }
        })
    });
    g.bench_function("crc_only", |b| {
        let h = Header::data(dataplane::wire::Encoding::Raw, 0, 0, CHUNK as u32, CHUNK as u32);
        b.iter(|| {
            for chunk in mem.chunks(CHUNK) {
                black_box(h.seal(chunk));
            }
        })
    });
    g.finish();
}

/// The frame MACs ferry could use, each over every 64 KiB chunk of the corpus with a
/// fresh nonce or sequence number per frame: keyed BLAKE3 (what ferry uses), HMAC-SHA256,
/// AES-128-GMAC and ChaCha20-Poly1305 (both as AEADs with the frame as associated data and
/// nothing encrypted).
fn mac(c: &mut Criterion) {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    use hmac::Mac;
    let mem = corpus();
    let mut g = c.benchmark_group("mac");
    g.throughput(Throughput::Bytes(mem.len() as u64));
    let key = [7u8; 32];
    g.bench_function("blake3_keyed", |b| {
        b.iter(|| {
            for (i, chunk) in mem.chunks(CHUNK).enumerate() {
                let mut h = blake3::Hasher::new_keyed(&key);
                h.update(&(i as u64).to_le_bytes());
                h.update(chunk);
                black_box(h.finalize());
            }
        })
    });
    g.bench_function("hmac_sha256", |b| {
        b.iter(|| {
            for (i, chunk) in mem.chunks(CHUNK).enumerate() {
                let mut m = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&key).unwrap();
                m.update(&(i as u64).to_le_bytes());
                m.update(chunk);
                black_box(m.finalize());
            }
        })
    });
    let gcm = aes_gcm::Aes128Gcm::new_from_slice(&key[..16]).unwrap();
    g.bench_function("aes128_gmac", |b| {
        b.iter(|| {
            for (i, chunk) in mem.chunks(CHUNK).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let mut empty: [u8; 0] = [];
                black_box(gcm.encrypt_in_place_detached((&nonce).into(), chunk, &mut empty).unwrap());
            }
        })
    });
    let poly = chacha20poly1305::ChaCha20Poly1305::new_from_slice(&key).unwrap();
    g.bench_function("chacha20_poly1305", |b| {
        b.iter(|| {
            for (i, chunk) in mem.chunks(CHUNK).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let mut empty: [u8; 0] = [];
                black_box(poly.encrypt_in_place_detached((&nonce).into(), chunk, &mut empty).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = encode, decode, digest, parse, mac
}
criterion_main!(benches);
