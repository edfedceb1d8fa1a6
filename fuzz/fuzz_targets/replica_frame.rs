//! The controller's replication wire (`controller/src/replica/wire.rs`) as a standby and a
//! primary read it (and `state-import` reads an export): a frame body, and the change item a
//! record or a snapshot item carries. Holds: no panic; decode → encode → decode gives the same
//! frame; an item that decodes re-encodes to bytes that decode to the same item.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tiandi_controller::replica::wire::{self, Item, MAX_FRAME, Msg};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FRAME {
        return;
    }
    if let Ok(item) = Item::decode(data) {
        let again =
            Item::decode(item.encode_to_vec().as_slice()).expect("a re-encoded item decodes");
        assert_eq!(again, item);
    }
    let Ok(msg) = wire::decode(data) else {
        return;
    };
    let bytes = wire::encode(msg.clone());
    assert_eq!(
        u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
        bytes.len() - 4
    );
    let again = wire::decode(&bytes[4..]).expect("a re-encoded frame decodes");
    assert_eq!(again, msg);
    match &msg {
        Msg::Rec(r) => {
            let _ = Item::decode(r.item.as_slice());
            // The chain check a standby makes: deterministic, and sensitive to the item.
            let g = wire::genesis(r.seq);
            assert_eq!(
                wire::chain(&g, r.seq, &r.item),
                wire::chain(&g, r.seq, &r.item)
            );
        }
        Msg::Item(b) => {
            let _ = Item::decode(b.as_slice());
        }
        _ => {}
    }
});
