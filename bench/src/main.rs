//! Tiandi benchmarks. Each runs the real release binaries as separate processes and ends with
//! one `key=value` summary line.
//!
//! `geo-link`: see `geolink.rs`. `impairments`: see `impairments.rs`.
//!
//! `ingest`: the controller and `tiandi-agent simulate` (N sites over real QUIC on loopback).
//! Measures, over the first quarter of the run (steady state, no API client attached):
//! controller CPU time per stored report (utime+stime from /proc), bytes on the wire per report
//! (UDP payload of every agent connection plus 28 bytes of IPv4/UDP header per datagram, both
//! directions, from the controller's QUIC statistics); over the second quarter, report-to-API
//! visibility (sample time at the site to the moment the bench receives the report's event
//! from `/api/stream`). Half-way it restarts the
//! controller (SIGTERM, start again) and measures the time until every site is connected and
//! current again. At the end the simulator drains its spools and the bench compares what the
//! sites produced with what the controller stored (lost, duplicated). Peak RSS is the
//! controller's VmHWM, the larger of its two runs.

mod geolink;
mod geotransfer;
mod harness;
mod impairments;
mod ingest;
mod relayfanout;
mod reportlatency;
mod wakecost;

use clap::{Parser, Subcommand};

/// mimalloc, as in the binaries it measures: the harness shares two cores with them, and
/// glibc's allocator costs the subscribers of `relay-fanout` several per cent.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tiandi-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Many sites reporting to one controller, with a controller restart half-way.
    Ingest {
        #[arg(long, default_value_t = 2000)]
        sites: usize,
        /// Seconds between reports.
        #[arg(long, default_value_t = 10.0)]
        interval: f64,
        /// Seconds of measurement (the restart happens half-way).
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
    },
    /// The transport alone over one emulated GEO link: QUIC (fixed-rate and Cubic) against
    /// TCP (BBR and Cubic). Needs root.
    GeoLink {
        #[arg(long, default_value_t = 100.0)]
        size_mb: f64,
        #[arg(long, default_value_t = 20.0)]
        rate_mbit: f64,
        #[arg(long, default_value_t = 600.0)]
        rtt_ms: f64,
        #[arg(long, default_value_t = 1.0)]
        loss_pct: f64,
        /// Longest any one transfer may run (s); a slower one is counted up to then.
        #[arg(long, default_value_t = 120.0)]
        time_limit: f64,
    },
    /// A Tiandi transfer over one emulated GEO link, against TCP (BBR and Cubic), and one
    /// with a link cut in the middle. Needs root.
    GeoTransfer {
        #[arg(long, default_value_t = 100.0)]
        size_mb: f64,
        #[arg(long, default_value_t = 20.0)]
        rate_mbit: f64,
        #[arg(long, default_value_t = 600.0)]
        rtt_ms: f64,
        #[arg(long, default_value_t = 1.0)]
        loss_pct: f64,
        /// How long the link is cut in the last run (s).
        #[arg(long, default_value_t = 60.0)]
        cut_s: f64,
        /// Longest a Tiandi transfer may run (s).
        #[arg(long, default_value_t = 600.0)]
        time_limit: f64,
        /// Longest a TCP transfer may run (s); a slower one is counted up to then.
        #[arg(long, default_value_t = 120.0)]
        tcp_time_limit: f64,
    },
    /// Health reports while a bulk transfer fills the site's link, each way, against an idle
    /// link: the delay bulk data adds to reports. Real binaries over one emulated link. Needs
    /// root.
    ReportLatency {
        #[arg(long, default_value_t = 20.0)]
        rate_mbit: f64,
        #[arg(long, default_value_t = 600.0)]
        rtt_ms: f64,
        #[arg(long, default_value_t = 1.0)]
        loss_pct: f64,
        /// The agent's report interval (s).
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Length of the idle phase, and of each bulk file at the link rate (s).
        #[arg(long, default_value_t = 40.0)]
        phase_s: f64,
    },
    /// A 40 MB transfer controller -> site under each impairment of issue 13 (loss, jitter,
    /// asymmetry, bounded and netem-like reordering, duplication and corruption, combined) over
    /// one emulated 20 Mbit/s, 600 ms link, real binaries, reports beside it, TCP BBR for
    /// comparison. Needs root.
    Impairments {
        /// Comma-separated case names (default: all, in order): clean, loss1, loss5,
        /// jitter50, asym20_2_loss1, displace1, displace5, netem_reorder1, dup1_corrupt01,
        /// combined.
        #[arg(long, value_delimiter = ',')]
        cases: Option<Vec<String>>,
        #[arg(long, default_value_t = 40.0)]
        size_mb: f64,
        /// The agent's report interval (s).
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Longest a Tiandi transfer may run (s); a slower one is counted up to then.
        #[arg(long, default_value_t = 240.0)]
        time_limit: f64,
        /// Longest the TCP BBR transfer may run (s); counted up to then.
        #[arg(long, default_value_t = 60.0)]
        tcp_time_limit: f64,
    },
    /// One publisher through one relay (its own process) to many subscribing connections on
    /// loopback: delivery, relay CPU, added latency.
    RelayFanout {
        #[arg(long, default_value_t = 500)]
        subscribers: usize,
        #[arg(long, default_value_t = 1500)]
        bitrate_kbit: u32,
        /// Seconds of measurement.
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
    },
    /// What this machine charges for a thread wake-up and a durable group commit (CPU per
    /// event): the floor under `ingest`'s CPU per report.
    WakeCost {
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Ingest {
            sites,
            interval,
            duration,
        } => ingest::run(sites, interval, duration),
        Cmd::GeoLink {
            size_mb,
            rate_mbit,
            rtt_ms,
            loss_pct,
            time_limit,
        } => geolink::run(geolink::Args {
            size_mb,
            rate_mbit,
            rtt_ms,
            loss_pct,
            time_limit: std::time::Duration::from_secs_f64(time_limit),
        }),
        Cmd::GeoTransfer {
            size_mb,
            rate_mbit,
            rtt_ms,
            loss_pct,
            cut_s,
            time_limit,
            tcp_time_limit,
        } => geotransfer::run(geotransfer::Args {
            size_mb,
            rate_mbit,
            rtt_ms,
            loss_pct,
            cut_s,
            time_limit: std::time::Duration::from_secs_f64(time_limit),
            tcp_time_limit: std::time::Duration::from_secs_f64(tcp_time_limit),
        }),
        Cmd::ReportLatency {
            rate_mbit,
            rtt_ms,
            loss_pct,
            interval,
            phase_s,
        } => reportlatency::run(reportlatency::Args {
            rate_mbit,
            rtt_ms,
            loss_pct,
            interval_s: interval,
            phase_s,
        }),
        Cmd::Impairments {
            cases,
            size_mb,
            interval,
            time_limit,
            tcp_time_limit,
        } => impairments::run(impairments::Args {
            cases,
            size_mb,
            interval_s: interval,
            time_limit: std::time::Duration::from_secs_f64(time_limit),
            tcp_time_limit: std::time::Duration::from_secs_f64(tcp_time_limit),
        }),
        Cmd::RelayFanout {
            subscribers,
            bitrate_kbit,
            duration,
        } => relayfanout::run(relayfanout::Args {
            subscribers,
            bitrate_kbit,
            duration,
        }),
        Cmd::WakeCost { count } => wakecost::run(wakecost::Args { count }),
    }
}
