//! `tiandi-video`: run a conference relay.
//!
//! (`join`, the site client with real media sources and sinks, comes with the FFmpeg work;
//! the library's [`tiandi_video::client::Session`] is its core.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tiandi_video::relay::{Relay, RelayOptions, Upstream};

/// mimalloc, as in the controller: a relay allocates per packet for hundreds of connections.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tiandi-video", version, about = "Tiandi video conferencing")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a relay (at a province, say): sites join it with their certificates.
    Relay {
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:4500")]
        listen: SocketAddr,
        /// This relay's site ID (its certificate's).
        #[arg(long)]
        name: String,
        /// The site that chairs the rooms (may always publish; grants the floor).
        #[arg(long, default_value = "ministry")]
        chair: String,
        /// The CA certificate (PEM) sites' certificates chain to.
        #[arg(long)]
        ca: PathBuf,
        /// This relay's certificate and key (PEM): a site certificate from the controller.
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// The relay above this one (cascade): its address...
        #[arg(long, requires = "upstream_name")]
        upstream: Option<SocketAddr>,
        /// ...and its site ID.
        #[arg(long, requires = "upstream")]
        upstream_name: Option<String>,
        /// Link profile of the participants (geo, leo, terrestrial, custom:RTT:KBIT).
        #[arg(long, default_value = "terrestrial")]
        profile: tiandi_link::LinkProfile,
        /// Log filter (RUST_LOG wins).
        #[arg(long, default_value = "info")]
        log: String,
    },
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Relay {
            listen,
            name,
            chair,
            ca,
            cert,
            key,
            upstream,
            upstream_name,
            profile,
            log,
        } => {
            tiandi_link::init_logging(&log);
            let (ca_pem, cert_pem, key_pem) = (
                read(&ca, "CA certificate")?,
                read(&cert, "relay certificate")?,
                read(&key, "relay key")?,
            );
            let tls = tiandi_video::relay_tls(&ca_pem, &cert_pem, &key_pem).context("relay TLS")?;
            let upstream = match (upstream, upstream_name) {
                (Some(addr), Some(up_name)) => {
                    let client = tiandi_link::client_config(
                        tiandi_video::client_tls(&ca_pem, &cert_pem, &key_pem)
                            .context("upstream TLS")?,
                        profile.transport(),
                    )?;
                    Some(Upstream {
                        endpoint: tiandi_link::client_endpoint(addr)?,
                        addr,
                        name: up_name,
                        client,
                    })
                }
                _ => None,
            };
            let secret: [u8; 32] = rand::random();
            let endpoint = tiandi_link::server_endpoint(listen, tls, profile.transport(), &secret)
                .with_context(|| format!("listening on {listen}"))?;
            let relay = Relay::new(RelayOptions {
                name: name.clone(),
                chair,
                upstream,
            });
            let cancel = tiandi_link::shutdown_token();
            tracing::info!(%listen, relay = %name, "Relay running.");
            println!("relay {name} listening on {}", endpoint.local_addr()?);
            relay.serve(endpoint.clone(), cancel).await;
            endpoint.close(
                tiandi_video::wire::codes::SHUTDOWN.into(),
                b"relay stopping",
            );
            endpoint.wait_idle().await;
            Ok(())
        }
    }
}
