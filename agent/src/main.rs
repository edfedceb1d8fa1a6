//! `tiandi-agent`: run the site agent, enroll a site, send files, or simulate many sites.
//! The flags and commands are [`tiandi_agent::cli`]; this file only starts them.

use clap::Parser;

/// mimalloc rather than glibc's malloc: with thousands of QUIC connections, glibc's allocator
/// was a fifth of the controller's CPU per report (its slow path sorting freed chunks on the
/// packet-receive path).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tiandi_agent::cli::run(tiandi_agent::cli::Cli::parse()).await
}
