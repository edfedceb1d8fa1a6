//! Delta reports (`proto/src/delta.rs`) as the controller reads them: the bytes are frames (a
//! 4-byte big-endian length, then an envelope), each report's names expanded, then its figures
//! restored against the previous report of the connection, as `controller/src/server.rs` does.
//! Holds: no panic (a delta report with nothing before it, any difference, any keys: an error
//! or a report, never a crash); a restored report is never marked delta; and every report the
//! receiver accepted, sent again in the same order through a fresh sender (delta encoder, names
//! table, the wire) and a fresh receiver, comes out exactly as it went in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiandi_proto::delta::{DeltaDecoder, DeltaEncoder};
use tiandi_proto::names::{NameDecoder, NameEncoder};
use tiandi_proto::{Body, Envelope, MINOR, Message, decode, encode};

fuzz_target!(|data: &[u8]| {
    let (mut names, mut delta) = (NameDecoder::default(), DeltaDecoder::for_peer(MINOR));
    let mut accepted = Vec::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = (u32::from_be_bytes(*len) as usize).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        rest = tail;
        let Ok(Body::Report(mut report)) = decode(frame) else {
            continue;
        };
        // An error closes the connection: nothing after it is read.
        if names.expand(&mut report).is_err() || delta.decode(&mut report).is_err() {
            break;
        }
        assert_eq!(report.delta, 0, "a restored report still marked delta");
        accepted.push(report);
    }
    let (mut names_out, mut delta_out) = (NameEncoder::default(), DeltaEncoder::for_peer(MINOR));
    let (mut names_in, mut delta_in) = (NameDecoder::default(), DeltaDecoder::for_peer(MINOR));
    for report in accepted {
        let mut wire = report.clone();
        delta_out.encode(&mut wire);
        names_out.compress(&mut wire);
        // Not `decode`: an expanded report may be larger than a frame.
        let bytes = encode(Body::Report(wire));
        let Some(Body::Report(mut back)) = Envelope::decode(&bytes[..]).expect("decodes").body
        else {
            panic!("not a report");
        };
        names_in.expand(&mut back).expect("names expand");
        delta_in.decode(&mut back).expect("delta decodes");
        assert_eq!(
            back, report,
            "a report changed through delta and names encoding"
        );
    }
});
