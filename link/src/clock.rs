//! Wall-clock time as every Tiandi crate stamps it: reports, receipts, alarms, media capture.
//! One place, so that every stamp means the same thing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn milliseconds_and_microseconds_agree() {
        let (ms, us, ms2) = (super::now_ms(), super::now_us(), super::now_ms());
        assert!(ms > 1_700_000_000_000, "{ms}");
        assert!(us / 1000 >= ms && us / 1000 <= ms2, "{ms} {us} {ms2}");
    }
}
