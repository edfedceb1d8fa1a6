//! The demo's simulated sites report to the controller and take the files it sends (the demo
//! prints a `send` command to one of them).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tiandi_controller::{Controller, demo, transfers};
use tiandi_link::LinkProfile;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_sites_report_and_take_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.conference.enabled = false;
    let ctl = Controller::start(cfg).await.unwrap();
    let core = ctl.core.clone();
    let ids_dir = core.config.data_dir.join("demo-sites");
    let creds = demo::site_creds(&core, 2, &ids_dir).unwrap();
    let cancel = CancellationToken::new();
    let shareds = tiandi_sim::start(
        creds,
        tiandi_sim::SimOptions {
            controller: ctl.quic_addr.to_string(),
            interval: Duration::from_secs(1),
            outages: false,
            profile: LinkProfile::Terrestrial,
            inboxes: Some(ids_dir.clone()),
        },
        &core.config.data_dir.join("demo-spool"),
        cancel.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    assert_eq!(shareds.len(), 2);

    let (site, _) = demo::site_name(0);
    let file = dir.path().join("notice.txt");
    std::fs::write(&file, "county offices: drill at 09:00\n".repeat(1000)).unwrap();
    transfers::queue(
        &core.registry,
        &core.outbox,
        &BTreeMap::new(),
        &transfers::SendRequest {
            path: file.display().to_string(),
            to: format!("site:{site}"),
            priority: tiandi_transfer::Priority::Normal,
            window: None,
            rate_limit_mbit: None,
        },
    )
    .unwrap();
    let landed = ids_dir.join(&site).join("inbox").join("notice.txt");
    let start = Instant::now();
    loop {
        let arrived = std::fs::read(&landed).ok() == std::fs::read(&file).ok();
        let acked = shareds
            .iter()
            .all(|(_, s)| s.acked.load(Ordering::Relaxed) > 0);
        if arrived && acked {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "after 30 s: file at {} {arrived}, every site's reports acknowledged {acked}",
            landed.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    ctl.shutdown().await;
}
