//! The transfer wire (`transfer/src/transfer_wire.rs`) as either end reads it: a frame body
//! (kind byte + protobuf), the manifest an `Offer` carries, the bitmap and byte ranges a
//! `Have` carries (against the manifest's chunks, as `send.rs` uses them), and the header of a
//! chunk or piece stream. Holds: no panic; decode → encode → decode gives the same frame; a
//! manifest that checks describes its file exactly and survives its own offer; ranges that
//! check lie inside their chunk, sorted and disjoint, and with what is missing cover it
//! exactly.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tiandi_transfer::transfer_wire::{
    self, Bitmap, CHUNK_HEADER, Frame, MAX_FRAME, Offer, Ranges, chunk_header, parse_chunk_header,
};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FRAME {
        return;
    }
    if let Ok(h) = <&[u8; CHUNK_HEADER]>::try_from(data.get(..CHUNK_HEADER).unwrap_or(&[])) {
        if let Ok((hash, index)) = parse_chunk_header(h) {
            assert_eq!(&chunk_header(&hash, index), h);
        }
    }
    let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = Frame::decode(frame.encode()).expect("a re-encoded frame decodes");
    assert_eq!(again, frame);
    match &frame {
        Frame::Offer(offer) => {
            if let Ok(m) = offer.manifest() {
                assert_eq!(
                    m.chunks.len() as u64,
                    m.size.div_ceil(u64::from(m.chunk_size))
                );
                let total: u64 = (0..m.chunk_count()).map(|i| m.chunk_len(i) as u64).sum();
                assert_eq!(total, m.size, "chunk lengths add up to the file");
                let back = Offer::new(&m, &offer.transfer_id, &offer.priority, &offer.origin);
                assert_eq!(back.manifest().expect("its own offer checks"), m);
            }
        }
        Frame::Have(have) => {
            // As the sender reads it, for a file of as many chunks as the bitmap names.
            let n = u32::try_from(have.verified.len() * 8).unwrap_or(u32::MAX);
            let bits = Bitmap::from_bytes(&have.verified, n);
            assert_eq!(bits.count() + bits.missing().count() as u32, n);
            for p in &have.partial {
                // A chunk's length is at most MAX_CHUNK; take one from the index for variety.
                let len = (p.index % (2 * 1024 * 1024)) + 1;
                if let Some(r) = Ranges::from_wire(&p.ranges, len) {
                    check_ranges(&r, len);
                    assert_eq!(Ranges::from_wire(&r.to_wire(), len), Some(r.clone()));
                }
            }
        }
        _ => {}
    }
    let _ = transfer_wire::codes::PROTOCOL;
});

fn check_ranges(r: &Ranges, len: u32) {
    for w in r.0.windows(2) {
        assert!(w[0].1 < w[1].0, "ranges overlap or touch: {:?}", r.0);
    }
    for &(s, e) in &r.0 {
        assert!(
            s < e && e <= len,
            "range {s}..{e} outside a {len}-byte chunk"
        );
    }
    let missing: u64 = r.missing(len).iter().map(|(s, e)| u64::from(e - s)).sum();
    assert_eq!(
        r.len() + missing,
        u64::from(len),
        "held + missing = the chunk"
    );
    assert_eq!(r.covers(len), missing == 0);
}
