//! `tiandi-controller`: run the controller, enroll or revoke sites, send files, run the demo.
//! The flags and commands are [`tiandi_controller::cli`]; this file only starts them.

use anyhow::Context;
use clap::Parser;
use tiandi_controller::cli::{self, Cli};

/// mimalloc rather than glibc's malloc: with thousands of QUIC connections, glibc's allocator
/// was a fifth of the controller's CPU per report (its slow path sorting freed chunks on the
/// packet-receive path). The `system-alloc` feature leaves glibc's in place, for a heap
/// profiler that interposes malloc (`heaptrack`; see the README's scale section). Built with
/// `no_thp`: transparent huge pages would round each arena's touched memory up to 2 MB.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = cli.load_config()?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        rt.worker_threads(cfg.worker_threads);
    }
    rt.enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(cli::run(cli, cfg))
}
