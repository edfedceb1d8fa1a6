//! Tiandi benchmarks. Each runs the real release binaries as separate processes and ends with
//! one `key=value` summary line.
//!
//! `backup`: see `backup.rs`. `geo-link`: see `geolink.rs`. `impairments`: see `impairments.rs`.
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
//! controller's VmHWM, the larger of its two runs. `--sites` takes a comma-separated list
//! (`--sites 2000,5000,10000,20000`): one run per count, in order, each ending with its own
//! summary line. `--plot PATH` then writes the cost curve as an SVG (`curve.rs`: CPU per
//! report, memory per site, p99 visibility and reconnection against the number of sites, each
//! with its target at 20,000 sites); `--plot-from LOG --plot PATH` draws it from the summary
//! lines of a saved log instead, running nothing.

mod backup;
mod backupgeo;
mod curve;
mod dashboard;
mod geolink;
mod geotransfer;
mod harness;
mod hybridfailover;
mod impairments;
mod ingest;
mod relayfanout;
mod reportlatency;
mod videogeo;
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
    /// Many sites reporting to one controller, with a controller restart half-way; one run per
    /// site count, optionally drawn as a cost curve.
    Ingest {
        /// Site counts, comma-separated (`2000,5000,10000,20000`): one run each, in order.
        #[arg(long, value_delimiter = ',', default_value = "2000", num_args = 1)]
        sites: Vec<usize>,
        /// Seconds between reports.
        #[arg(long, default_value_t = 10.0)]
        interval: f64,
        /// Seconds of measurement (the restart happens half-way).
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// After the runs, write their cost curve (SVG) here.
        #[arg(long, value_name = "PATH")]
        plot: Option<std::path::PathBuf>,
        /// Run nothing: draw the curve of the `ingest sites=` lines of this saved log (other
        /// lines are ignored) into `--plot`.
        #[arg(
            long,
            value_name = "FILE",
            requires = "plot",
            conflicts_with_all = ["sites", "interval", "duration"]
        )]
        plot_from: Option<std::path::PathBuf>,
    },
    /// The web console at scale: the site list API under 20 clients, a cold page load in
    /// headless Chromium, and live updates in an open page.
    Dashboard(dashboard::Args),
    /// Tiandi's backup against restic on vendored source trees and a database-like file:
    /// first and incremental backups, a restore checked file by file, repository size, peak
    /// RSS. Needs restic (`apt-get install restic`).
    Backup(backup::Args),
    /// The transport alone over one emulated GEO link: QUIC (fixed-rate and Cubic) against
    /// TCP (BBR and Cubic). Needs root.
    GeoLink(geolink::Args),
    /// A Tiandi transfer over one emulated GEO link, against TCP (BBR and Cubic), and one
    /// with a link cut in the middle. Needs root.
    GeoTransfer(geotransfer::Args),
    /// Health reports while a bulk transfer fills the site's link, each way, against an idle
    /// link: the delay bulk data adds to reports. Real binaries over one emulated link. Needs
    /// root.
    ReportLatency(reportlatency::Args),
    /// A 40 MB transfer controller -> site under each impairment of issue 13 (loss, jitter,
    /// asymmetry, bounded and netem-like reordering, duplication and corruption, combined) over
    /// one emulated 20 Mbit/s, 600 ms link, real binaries, reports beside it, TCP BBR for
    /// comparison. Needs root.
    Impairments(impairments::Args),
    /// One publisher through one relay (its own process) to many subscribing connections on
    /// loopback: delivery, relay CPU, added latency.
    RelayFanout(relayfanout::Args),
    /// What this machine charges for a thread wake-up and a durable group commit (CPU per
    /// event): the floor under `ingest`'s CPU per report.
    WakeCost(wakecost::Args),
    /// A conference as a county on a GEO link sees it: the test pattern at the ministry, a
    /// province relay cascading from it, the county's viewer behind an emulated GEO link;
    /// frames shown, freezes, age, sound gaps, repair overhead. Needs root and ffprobe.
    VideoGeo(videogeo::Args),
    /// A dual-homed site (a ground line and a GEO link, each emulated) playing a conference,
    /// reporting every 2 s and receiving a bulk file while its ground line is cut and restored:
    /// the freeze, reports lost, the longest report gap, the switch-back time, the transfer's
    /// resumption. Needs root and ffprobe.
    HybridFailover(hybridfailover::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Ingest {
            sites,
            interval,
            duration,
            plot,
            plot_from,
        } => ingest_counts(&sites, interval, duration, plot, plot_from),
        Cmd::Dashboard(a) => dashboard::run(a),
        Cmd::Backup(a) => backup::run(a),
        Cmd::GeoLink(a) => geolink::run(a),
        Cmd::GeoTransfer(a) => geotransfer::run(a),
        Cmd::ReportLatency(a) => reportlatency::run(a),
        Cmd::Impairments(a) => impairments::run(a),
        Cmd::VideoGeo(a) => videogeo::run(a),
        Cmd::HybridFailover(a) => hybridfailover::run(a),
        Cmd::RelayFanout(a) => relayfanout::run(a),
        Cmd::WakeCost(a) => wakecost::run(a),
    }
}

/// `ingest` at each site count in turn (each run's summary line as it ends), then the curve if
/// asked; or, with `plot_from`, only the curve of a saved log.
fn ingest_counts(
    sites: &[usize],
    interval: f64,
    duration: f64,
    plot: Option<std::path::PathBuf>,
    plot_from: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let runs = match plot_from {
        Some(log) => curve::read_log(&log)?,
        None => {
            let mut runs = Vec::with_capacity(sites.len());
            for (i, &n) in sites.iter().enumerate() {
                if sites.len() > 1 {
                    eprintln!("ingest: starting {n} sites ({} of {})", i + 1, sites.len());
                }
                let figures = ingest::run(n, interval, duration)?;
                println!("{figures}");
                runs.push(figures);
            }
            runs
        }
    };
    if let Some(path) = plot {
        curve::write(&path, &runs)?;
        eprintln!(
            "cost curve of {} runs written to {}",
            runs.len(),
            path.display()
        );
    }
    Ok(())
}
