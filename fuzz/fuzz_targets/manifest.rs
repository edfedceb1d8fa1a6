//! Stored and relayed manifests (`transfer/src/manifest.rs`: a JSON head, a newline, the chunk
//! hashes). Holds: no panic; a manifest that decodes is valid (safe name, chunk size in range,
//! as many hashes as chunks), encodes back to bytes that decode to the same manifest, and its
//! chunk lengths add up to its size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiandi_transfer::manifest::{self, MAX_CHUNK, MIN_CHUNK};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = manifest::decode(data) else {
        return;
    };
    m.validate().expect("a decoded manifest is valid");
    assert!((MIN_CHUNK..=MAX_CHUNK).contains(&m.chunk_size));
    manifest::check_name(&m.name).expect("a decoded manifest's name is safe");
    let total: u64 = (0..m.chunk_count()).map(|i| m.chunk_len(i) as u64).sum();
    assert_eq!(total, m.size);
    let bytes = manifest::encode(&m);
    assert_eq!(manifest::decode(&bytes).expect("re-encoded decodes"), m);
});
