//! The receiver's frame path on arbitrary bytes: framing, header checks, CRC, tags,
//! session bounds, zstd decoding. Nothing may panic, and every DATA frame that passes the
//! checks must lie inside the session's region.
//!
//! Input: a mode byte, a SESSION payload length byte and that payload, then frames. In
//! "sealed" mode (odd mode byte) each frame's CRC and tag are recomputed first (with the
//! keys the reader holds), so mutations reach the bounds and decoding checks instead of
//! stopping at the checksum or the tag.
#![no_main]

use dataplane::conn::FrameReader;
use dataplane::encode::Decoder;
use dataplane::session::seal::{Keys, Side, TAG_LEN};
use dataplane::wire::{self, Encoding, HEADER_LEN, Header, Kind, Layout};
use libfuzzer_sys::fuzz_target;
use zerocopy::{FromBytes, IntoBytes};

fn keys(side: Side) -> Keys {
    Keys::derive(Some(b"fuzzing key, 32 bytes long......"), side, &[1; 32], &[2; 32])
}

/// Each frame (header, up to `length` payload bytes, a tag's room) with its CRC and tag
/// recomputed.
fn reseal(frames: &[u8]) -> Vec<u8> {
    let mut tx = keys(Side::Client).tx;
    let mut out = Vec::with_capacity(frames.len());
    let mut rest = frames;
    while rest.len() >= HEADER_LEN {
        let h = Header::read_from_bytes(&rest[..HEADER_LEN]).unwrap();
        let len = (h.length.get() as usize).min(rest.len() - HEADER_LEN);
        let payload = &rest[HEADER_LEN..HEADER_LEN + len];
        let h = h.seal(payload);
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(&tx.tag(&h, [payload]));
        rest = &rest[(HEADER_LEN + len + TAG_LEN).min(rest.len())..];
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let [mode, n, rest @ ..] = data else { return };
    let split = usize::from(*n).min(rest.len());
    let (session, frames) = rest.split_at(split);
    let layout =
        wire::parse_session(session).map(|(l, _, _)| l).unwrap_or(Layout { page_size: 4096, max_chunk: 1 << 16, regions: vec![1 << 20] });
    let sealed;
    let frames = if mode & 1 == 1 {
        sealed = reseal(frames);
        &sealed[..]
    } else {
        frames
    };
    let mut reader = FrameReader::new(4096, wire::max_payload_for(layout.max_chunk), keys(Side::Server).rx);
    let mut dec = Decoder::default();
    let mut src = frames;
    while let Ok((h, kind, payload)) = reader.next(&mut src, "fuzz") {
        if kind != Kind::Data {
            continue;
        }
        let Ok((encoding, region, offset, raw_len)) = layout.check_data(&h) else { continue };
        let size = layout.regions[region as usize];
        assert!(offset + u64::from(raw_len) <= size);
        assert!(raw_len <= layout.max_chunk);
        if encoding == Encoding::Zstd {
            if let Ok(out) = dec.zstd(payload, raw_len) {
                assert_eq!(out.len(), raw_len as usize);
            }
        }
    }
});
