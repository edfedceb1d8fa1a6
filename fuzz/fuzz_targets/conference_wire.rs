//! The conference wire (`video-conf/src/conference_wire.rs`) as a relay reads it from a
//! participant: a control frame (4-byte length, kind, protobuf body), the `Hello` check, a
//! group stream's header and the object headers that follow it. Holds: no panic; a frame
//! length over `MAX_CONTROL` or of zero is refused; decode → encode → decode gives the same
//! control frame and its length prefix; headers that parse encode back to the same bytes and
//! respect `MAX_OBJECT`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiandi_video::conference_wire::{
    Control, GROUP_HEADER_LEN, GroupHeader, MAX_CONTROL, MAX_OBJECT, OBJECT_HEADER_LEN, Object,
    check_hello,
};

fuzz_target!(|data: &[u8]| {
    // As a control stream: length prefix, then that many bytes.
    if let Some((head, body)) = data.split_first_chunk::<4>() {
        if let Ok(len) = Control::frame_len(*head) {
            assert!(len > 0 && len <= MAX_CONTROL);
            if let Some(frame) = body.get(..len) {
                control(frame);
            }
        }
    }
    // The whole input as one frame body (kind + protobuf), without the length.
    control(data);
    // As a group stream: header, then object headers back to back (payloads skipped).
    if let Some((h, mut rest)) = data.split_first_chunk::<GROUP_HEADER_LEN>() {
        if let Ok(g) = GroupHeader::decode(h) {
            assert_eq!(&g.encode(), h);
            while let Some((oh, after)) = rest.split_first_chunk::<OBJECT_HEADER_LEN>() {
                let Ok((len, pts_us, flags)) = Object::parse_header(oh) else {
                    break;
                };
                assert!(len <= MAX_OBJECT);
                let Some(payload) = after.get(..len) else {
                    break;
                };
                let o = Object {
                    pts_us,
                    flags,
                    payload: bytes::Bytes::copy_from_slice(payload),
                };
                assert_eq!(&o.header(), oh);
                assert_eq!(o.encode().len(), OBJECT_HEADER_LEN + len);
                rest = &after[len..];
            }
        }
    }
});

fn control(frame: &[u8]) {
    let Ok(c) = Control::decode(frame) else {
        return;
    };
    let wire = c.encode();
    let (len, body) = wire.split_first_chunk::<4>().expect("a length prefix");
    assert_eq!(u32::from_be_bytes(*len) as usize, body.len());
    assert_eq!(Control::decode(body).expect("re-encoded decodes"), c);
    if let Control::Hello(h) = &c {
        let _ = check_hello(h);
    }
}
