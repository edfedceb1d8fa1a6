//! `tiandi-video`: run a conference relay, join a conference from a site, or remux a
//! recording. The flags and commands are [`tiandi_media::cli`].

use clap::Parser;

/// mimalloc, as in the controller: a relay allocates per packet for hundreds of connections.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tiandi_media::cli::run(tiandi_media::cli::Cli::parse()).await
}
