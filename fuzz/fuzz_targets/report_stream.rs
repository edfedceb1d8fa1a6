//! A report stream as the controller reads it (`link/src/framed.rs`, `proto/`,
//! `controller/src/server.rs`): the bytes of one QUIC stream are split by the link's frame
//! codec, each frame decoded as an envelope, each report's names expanded through the
//! connection's table and its figures restored against the connection's previous report
//! (`proto/src/delta.rs`; `report_delta` checks more of that). Holds: no panic; no frame above
//! `MAX_FRAME`; decode → encode → decode gives the same message; an expanded report never
//! carries more name bytes than a frame could (the table cannot amplify a frame); an error ends
//! the stream, as the server does.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tiandi_proto::delta::DeltaDecoder;
use tiandi_proto::names::NameDecoder;
use tiandi_proto::{Body, MAX_FRAME, MINOR, decode, encode};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = tiandi_link::framed::codec();
    let mut names = NameDecoder::default();
    let mut delta = DeltaDecoder::for_peer(MINOR);
    // The stream arrives in pieces: the first byte says how big (1..=256 bytes each).
    let (step, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s) + 1, r),
        None => return,
    };
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let frame = match codec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return, // oversized length: the stream is refused
            };
            assert!(frame.len() <= MAX_FRAME, "frame of {} bytes", frame.len());
            let Ok(body) = decode(&frame) else { return };
            let again = decode(&encode(body.clone())).expect("a re-encoded message decodes");
            assert_eq!(
                again, body,
                "decode -> encode -> decode changed the message"
            );
            if let Body::Report(mut report) = body {
                if names.expand(&mut report).is_err() || delta.decode(&mut report).is_err() {
                    return;
                }
                let expanded = tiandi_fuzz::report_name_bytes(&report);
                assert!(
                    expanded <= MAX_FRAME,
                    "a {}-byte frame expanded to {expanded} bytes of names",
                    frame.len()
                );
            }
        }
    }
});
