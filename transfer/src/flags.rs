//! The command-line flags of a send, shared by `tiandi-controller send` and `tiandi-agent send`
//! so the two binaries offer the same options with the same help.

/// How a file goes: its priority class, a daily window, a rate limit.
#[derive(Debug, Clone, clap::Args)]
pub struct SendFlags {
    /// alarm, normal, bulk or backup.
    #[arg(long, default_value = "normal")]
    pub priority: crate::Priority,
    /// Only send within this daily window, `HH:MM-HH:MM` in UTC (22:00-06:00), or in local time
    /// with a UTC offset after it: `01:00-06:00+08:00` (Beijing).
    #[arg(long)]
    pub window: Option<crate::Window>,
    /// At most this many Mbit/s for this transfer.
    #[arg(long)]
    pub rate_limit: Option<f64>,
}
