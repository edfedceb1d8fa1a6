//! The persistent outbox: transfers queued per destination (sled), and the driver that sends
//! a destination's transfers over its connection, highest priority first, within each
//! transfer's time window and rate limit.
//!
//! By job: the jobs here, their state store `store` ([`Outbox`]), `window` (daily time
//! windows), `schedule` (which job a destination's class driver sends next), `drive` (the
//! drivers that send them).

mod drive;
mod schedule;
mod store;
pub mod window;

use std::path::PathBuf;

use crate::{Manifest, Priority, Receipt, now_ms};

pub use drive::{ClassRoute, drive, drive_routed};
pub use schedule::{CLASSES, Next};
pub use store::{KEEP_FINISHED, Outbox};
pub use window::Window;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Queued,
    Sending,
    /// Waiting: outside its window, or the receiver asked to pause (disk full).
    Paused,
    Delivered,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Sending => "sending",
            JobState::Paused => "paused",
            JobState::Delivered => "delivered",
            JobState::Failed => "failed",
        }
    }

    /// Every state, in a job's usual order.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Sending,
        JobState::Paused,
        JobState::Delivered,
        JobState::Failed,
    ];
}

/// A string that names no job state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}: queued, sending, paused, delivered or failed")]
pub struct UnknownJobState(pub String);

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = UnknownJobState;
    fn from_str(s: &str) -> Result<JobState, UnknownJobState> {
        JobState::ALL
            .into_iter()
            .find(|j| j.as_str() == s)
            .ok_or_else(|| UnknownJobState(s.to_string()))
    }
}

/// A job as the API, the CLIs and the agent's `status.json` show it (one type for the
/// controller's API and its CLI, and for the agent and its CLI).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobStatus {
    pub id: String,
    /// The receiving node (a site ID, or "controller").
    pub dest: String,
    pub file: String,
    pub bytes: u64,
    pub priority: Priority,
    pub state: JobState,
    /// Bytes the receiver acknowledged (checked and on its disk).
    pub acked_bytes: u64,
    pub progress_pct: f64,
    /// Recent rate of acknowledged bytes (bit/s) while sending.
    pub rate_bps: u64,
    /// Seconds left at the recent rate.
    pub eta_s: Option<u64>,
    pub sent_bytes: u64,
    pub attempts: u64,
    /// Its daily window, as written (`22:00-06:00`, `01:00-06:00+08:00`).
    #[serde(with = "window::as_text")]
    pub window: Option<Window>,
    pub rate_limit_bps: Option<u64>,
    pub error: Option<String>,
    /// The receiver's receipt once it verified the whole file.
    pub receipt: Option<Receipt>,
    /// The relay that delivers it (a tracking job).
    pub via: Option<String>,
    /// The sites a relay forwards it to.
    pub relays_to: Vec<String>,
    /// A relay's copy toward a site below it.
    pub forwarded: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub id: String,
    /// The receiving node (a site ID, or "controller").
    pub dest: String,
    pub source: PathBuf,
    /// Stored as its head; the chunk hashes are stored once per file ([`Outbox::manifest`])
    /// and attached when the job runs.
    #[serde(with = "crate::manifest::head")]
    pub manifest: Manifest,
    /// alarm, normal, bulk or backup.
    pub priority: Priority,
    pub rate_limit_bps: Option<u64>,
    pub window: Option<Window>,
    pub forward_to: Vec<String>,
    pub origin: String,
    pub state: JobState,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub acked_bytes: u64,
    pub sent_bytes: u64,
    /// Recent rate of acknowledged bytes (bit/s) while sending.
    pub rate_bps: u64,
    pub attempts: u64,
    /// Not before this time (a paused receiver's retry-after).
    pub retry_at_ms: i64,
    pub receipt: Option<Receipt>,
    pub error: Option<String>,
    /// Why the receiver paused it (a [`crate::transfer_wire::codes`] value; 0: not paused by it).
    #[serde(default)]
    pub pause_code: u32,
    /// Delivered by this relay, not sent from here: the job only tracks what the relay
    /// reports ([`Outbox::apply_forwarded`]).
    #[serde(default)]
    pub via: Option<String>,
    /// A relay's copy toward a site below it: its progress is reported upstream.
    #[serde(default)]
    pub forwarded: bool,
}

impl Job {
    pub fn new(id: &str, dest: &str, source: PathBuf, manifest: Manifest) -> Job {
        let now = now_ms();
        Job {
            id: id.into(),
            dest: dest.into(),
            source,
            manifest,
            priority: Priority::Normal,
            rate_limit_bps: None,
            window: None,
            forward_to: Vec::new(),
            origin: String::new(),
            state: JobState::Queued,
            created_ms: now,
            updated_ms: now,
            acked_bytes: 0,
            sent_bytes: 0,
            rate_bps: 0,
            attempts: 0,
            retry_at_ms: 0,
            receipt: None,
            error: None,
            pause_code: 0,
            via: None,
            forwarded: false,
        }
    }

    /// Seconds left at the recent rate.
    pub fn eta_s(&self) -> Option<u64> {
        (self.rate_bps > 0).then(|| {
            (self.manifest.size.saturating_sub(self.acked_bytes) * 8) / self.rate_bps.max(1)
        })
    }

    /// The job as the API, the CLIs and the agent's `status.json` show it.
    pub fn status(&self) -> JobStatus {
        let size = self.manifest.size;
        JobStatus {
            id: self.id.clone(),
            dest: self.dest.clone(),
            file: self.manifest.name.clone(),
            bytes: size,
            priority: self.priority,
            state: self.state,
            acked_bytes: self.acked_bytes,
            progress_pct: if size == 0 {
                100.0
            } else {
                self.acked_bytes as f64 * 100.0 / size as f64
            },
            rate_bps: self.rate_bps,
            eta_s: self.eta_s(),
            sent_bytes: self.sent_bytes,
            attempts: self.attempts,
            window: self.window,
            rate_limit_bps: self.rate_limit_bps,
            error: self.error.clone(),
            receipt: self.receipt.clone(),
            via: self.via.clone(),
            relays_to: self.forward_to.clone(),
            forwarded: self.forwarded,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        }
    }

    pub fn finished(&self) -> bool {
        matches!(self.state, JobState::Delivered | JobState::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_states_parse_display_and_serialise_by_name() {
        for s in JobState::ALL {
            assert_eq!(s.to_string(), s.as_str());
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(
            JobState::ALL.map(JobState::as_str),
            ["queued", "sending", "paused", "delivered", "failed"]
        );
        assert!("Queued".parse::<JobState>().is_err());
        assert!("done".parse::<JobState>().is_err());
    }
}
