//! Repair datagrams (`video-conf/src/fec/datagram.rs`) as the receiver of a group stream reads
//! them from any QUIC datagram its peer sends. Holds: no panic; a datagram that decodes is
//! either a final size alone or a symbol consistent with its block (`t` even and the symbol's
//! length, `len` in the last symbol, `index < m`), its final size does not overflow, and
//! encode → decode gives the same repair.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tiandi_video::fec::Repair;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = Repair::decode(&Bytes::copy_from_slice(data)) else {
        return;
    };
    if r.k == 0 {
        assert!(r.last && r.t == 0 && r.len == 0 && r.m == 0 && r.data.is_empty());
    } else {
        let (t, k, len) = (usize::from(r.t), usize::from(r.k), r.len as usize);
        assert!(t > 0 && t % 2 == 0 && r.data.len() == t);
        assert!(len > (k - 1) * t && len <= k * t);
        assert!(r.index < r.m);
    }
    let _ = r.final_size();
    assert!(r.start <= u64::from(u32::MAX));
    assert_eq!(Repair::decode(&r.encode()).expect("re-encoded decodes"), r);
});
