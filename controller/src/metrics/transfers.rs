//! The transfer queue's series.

use std::fmt::Write;

use tiandi_transfer::outbox::JobState;

use super::esc;

/// The transfer queue at this moment (`tiandi_transfers{state}`; per destination still to
/// go: bytes left and the recent rate, from which a dashboard gets the ETA).
pub fn render_transfers(out: &mut String, jobs: &[tiandi_transfer::outbox::JobStatus]) {
    use std::collections::BTreeMap;
    let mut by_state: BTreeMap<&str, u64> = ["queued", "sending", "paused", "delivered", "failed"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    let mut left: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for j in jobs {
        *by_state.entry(j.state.as_str()).or_default() += 1;
        if matches!(
            j.state,
            JobState::Queued | JobState::Sending | JobState::Paused
        ) {
            let e = left.entry(j.dest.as_str()).or_default();
            e.0 += j.bytes.saturating_sub(j.acked_bytes);
            e.1 += j.rate_bps / 8;
        }
    }
    let _ = writeln!(
        out,
        "# HELP tiandi_transfers Transfers the controller holds, by state.\n\
         # TYPE tiandi_transfers gauge"
    );
    for (state, n) in &by_state {
        let _ = writeln!(out, "tiandi_transfers{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP tiandi_transfer_remaining_bytes Bytes still to be acknowledged by each \
         destination with transfers under way.\n# TYPE tiandi_transfer_remaining_bytes gauge"
    );
    for (dest, (bytes, _)) in &left {
        let _ = writeln!(
            out,
            "tiandi_transfer_remaining_bytes{{dest=\"{}\"}} {bytes}",
            esc(dest)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tiandi_transfer_rate_bytes_per_second Recent rate of acknowledged bytes to each \
         destination with transfers under way.\n\
         # TYPE tiandi_transfer_rate_bytes_per_second gauge"
    );
    for (dest, (_, rate)) in &left {
        let _ = writeln!(
            out,
            "tiandi_transfer_rate_bytes_per_second{{dest=\"{}\"}} {rate}",
            esc(dest)
        );
    }
}
