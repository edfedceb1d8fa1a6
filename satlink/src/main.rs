//! `tiandi-satlink`: a controller namespace and N site namespaces, each site behind its own
//! emulated satellite link; cut, restore and re-shape links while it runs. The flags and
//! commands are [`tiandi_satlink::cli`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    tiandi_satlink::cli::run(tiandi_satlink::cli::Cli::parse()).await
}
