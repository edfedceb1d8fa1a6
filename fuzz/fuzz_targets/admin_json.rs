//! The API's JSON bodies (`controller/src/admin.rs`: every admin request; the controller's
//! `SendRequest` in `controller/src/transfers.rs`, whose priority and window parse through
//! `tiandi_transfer::{Priority, Window}`, the same parsers the agent's `outgoing/` requests
//! use). The first byte picks the type, the rest is the body. Holds: no panic; what parses
//! serialises and parses back to the same JSON; a window that parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiandi_controller::admin::{
    ConferenceRequest, EnrollBatchRequest, EnrollRequest, RegistryRequest, RevokeRequest,
    TransfersRequest,
};
use tiandi_controller::transfers::SendRequest;
use tiandi_transfer::{Priority, Window};

fuzz_target!(|data: &[u8]| {
    let Some((which, body)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => round_trip::<EnrollRequest>(body),
        1 => round_trip::<EnrollBatchRequest>(body),
        2 => round_trip::<RevokeRequest>(body),
        3 => round_trip::<TransfersRequest>(body),
        4 => round_trip::<ConferenceRequest>(body),
        5 => round_trip::<RegistryRequest>(body),
        6 => round_trip::<SendRequest>(body),
        _ => {
            if let Ok(s) = std::str::from_utf8(body) {
                if let Ok(w) = s.parse::<Window>() {
                    assert_eq!(w.to_string().parse::<Window>(), Ok(w), "{s:?}");
                    assert!(w.start_min <= 1440 && w.end_min <= 1440);
                    assert!(w.utc_offset_min.abs() <= 14 * 60);
                }
                if let Ok(p) = s.parse::<Priority>() {
                    assert_eq!(p.to_string(), s);
                }
            }
        }
    }
});

fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(body) else {
        return;
    };
    let json = serde_json::to_value(&v).expect("a parsed request serialises");
    let again: T = serde_json::from_value(json.clone()).expect("its JSON parses back");
    assert_eq!(serde_json::to_value(&again).unwrap(), json);
}
