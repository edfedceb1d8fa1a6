//! The `tiandi-video` command line: run a relay, join a conference from a site, or remux a
//! recording. Each command is one function; `main.rs` only parses and calls [`run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tiandi-video", version, about = "Tiandi video conferencing")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a relay (at a province, say): sites join it with their certificates.
    Relay(RelayArgs),
    /// Join a room from a site: publish a source, play what a publisher sends, record it.
    Join(JoinArgs),
    /// Copy a recording (a relay's MPEG-TS, say) into another container, no re-encoding: the
    /// output's extension decides (`.mkv`, `.mp4`, `.ts`).
    Remux {
        /// The recording to read.
        input: PathBuf,
        /// The file to write.
        output: PathBuf,
    },
}

/// A node's credentials: the CA certificate, its certificate and its key (PEM files).
#[derive(Debug, Clone, clap::Args)]
pub struct Creds {
    /// The CA certificate (PEM) every site's certificate chains to.
    #[arg(long)]
    pub ca: PathBuf,
    /// This node's certificate (PEM): a site certificate from the controller.
    #[arg(long)]
    pub cert: PathBuf,
    /// This node's private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
}

/// The PEM texts of [`Creds`].
pub struct Pems {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Creds {
    /// Reads the three files; an error names the one that failed.
    pub fn read(&self) -> anyhow::Result<Pems> {
        let read = |path: &Path, what: &str| {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {what} {}", path.display()))
        };
        Ok(Pems {
            ca: read(&self.ca, "CA certificate")?,
            cert: read(&self.cert, "certificate")?,
            key: read(&self.key, "key")?,
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:4500")]
    pub listen: SocketAddr,
    /// This relay's site ID (its certificate's).
    #[arg(long)]
    pub name: String,
    /// The site that chairs the rooms (may always publish; grants the floor).
    #[arg(long, default_value = "ministry")]
    pub chair: String,
    #[command(flatten)]
    pub creds: Creds,
    /// The relay above this one (cascade): its address...
    #[arg(long, requires = "upstream_name")]
    pub upstream: Option<SocketAddr>,
    /// ...and its site ID.
    #[arg(long, requires = "upstream")]
    pub upstream_name: Option<String>,
    /// With an upstream: while the relay above does not answer about participants'
    /// certificates (revocation), admit and keep only those it confirmed within this many
    /// seconds; refuse the others (fail closed).
    #[arg(long, default_value_t = tiandi_video::relay::CONFIRMED_WITHIN.as_secs())]
    pub confirmed_within_s: u64,
    /// Serve Prometheus metrics (`GET /metrics`) on this TCP address (loopback only: plain
    /// HTTP; a Prometheus on the same host scrapes it).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Link profile of the participants (geo, leo, terrestrial, custom:RTT:KBIT).
    #[arg(long, default_value = "terrestrial")]
    pub profile: tiandi_link::LinkProfile,
    /// Ask for repair datagrams (forward error correction) with the groups sent here once
    /// the round trip is at least this long (ms; 0: never).
    #[arg(long, default_value_t = tiandi_video::client::FEC_RTT_MS)]
    pub fec_rtt_ms: u32,
    /// Log filter (RUST_LOG wins).
    #[arg(long, default_value = "info")]
    pub log: String,
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// The relay's address...
    #[arg(long)]
    pub relay: SocketAddr,
    /// ...and its site ID (the name its certificate carries).
    #[arg(long)]
    pub relay_name: String,
    #[arg(long)]
    pub room: String,
    #[command(flatten)]
    pub creds: Creds,
    /// What to publish: `pattern`, `udp://HOST:PORT` (MPEG-TS from an encoder or
    /// ffmpeg), `/dev/videoN`, or a media file. Reaches the others while this site holds
    /// the floor (or chairs).
    #[arg(long)]
    pub publish: Option<String>,
    /// Where to play: `udp://HOST:PORT` (MPEG-TS to a decoder, TV or VLC) or a file
    /// (`.ts`; `.mkv` and `.mp4` are remuxed from MPEG-TS when playback ends).
    #[arg(long)]
    pub play: Option<String>,
    /// Also record what is played to this file (`.ts`, `.mkv` or `.mp4`).
    #[arg(long)]
    pub record: Option<String>,
    /// Whose video and audio to play (default: the room's chair).
    #[arg(long)]
    pub from: Option<String>,
    /// The rendition to ask for (default: the relay chooses by this link).
    #[arg(long, default_value = "")]
    pub rendition: String,
    /// How much later than the path's delay a frame may be played (ms): a late frame is
    /// waited for that long before the sound is concealed or, a whole allowance later, its
    /// group given up. 0: follow the path (1.5 round trips, a retransmission's, plus
    /// jitter: ~1 s over GEO, 150 ms on a LAN).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// This site's link rate, if known (kbit/s): the relay starts with a rendition that fits
    /// and never sends one above it.
    #[arg(long, default_value_t = 0)]
    pub link_kbps: u32,
    /// Leave after this many seconds (default: at Ctrl-C, or when the source ends).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Ask for repair datagrams (forward error correction) with the groups sent here once
    /// the round trip is at least this long (ms; 0: never).
    #[arg(long, default_value_t = tiandi_video::client::FEC_RTT_MS)]
    pub fec_rtt_ms: u32,
    #[arg(long, default_value = "terrestrial")]
    pub profile: tiandi_link::LinkProfile,
    /// One of a dual-homed site's paths, `NAME[=BIND][,KEY=VALUE...]` (keys: `relay`,
    /// `profile`, `kind`, `budget_kbps`, `probe_ms`), e.g. `--path ground=10.1.0.11 --path
    /// sky=10.1.1.11,relay=10.1.1.1:4443,profile=geo`: a session is held over each (bound to
    /// BIND, an address or an interface), the conference plays over the first that is up
    /// and moves to another when it fails, then back after the first has been up for a while.
    /// `--relay` is the relay's address on paths without `relay=`.
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<tiandi_link::paths::PathSpec>,
    #[arg(long, default_value = "info")]
    pub log: String,
}

/// Runs the command line's command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Remux { input, output } => {
            let (i, o) = (
                input.to_string_lossy().to_string(),
                output.to_string_lossy().to_string(),
            );
            tokio::task::spawn_blocking(move || crate::remux(&i, &o))
                .await?
                .with_context(|| format!("remuxing {} to {}", input.display(), output.display()))?;
            println!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Relay(a) => {
            tiandi_link::init_logging(&a.log);
            crate::relay_node::run(a).await
        }
        Cmd::Join(a) => {
            tiandi_link::init_logging(&a.log);
            crate::join::run(a).await
        }
    }
}

#[cfg(test)]
mod manual {
    /// The package's manual page (`debian/tiandi-video.1`) is this command line, rendered by
    /// clap_mangen; `TIANDI_BLESS=1 cargo test -p tiandi-media manual_page` rewrites it.
    #[test]
    fn the_packaged_manual_page_is_the_command_line() {
        use clap::CommandFactory;
        let mut out = Vec::new();
        clap_mangen::Man::new(super::Cli::command())
            .render(&mut out)
            .expect("render");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/debian/tiandi-video.1");
        if std::env::var_os("TIANDI_BLESS").is_some() {
            std::fs::write(path, &out).expect("write the manual page");
        }
        assert!(
            std::fs::read(path).ok().as_deref() == Some(&out[..]),
            "debian/tiandi-video.1 is not the command line: TIANDI_BLESS=1 cargo test -p \
             tiandi-media manual_page"
        );
    }
}
