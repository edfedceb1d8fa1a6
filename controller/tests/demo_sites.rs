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
    let creds = demo::site_creds(&core, 3, &ids_dir).unwrap();
    let cancel = CancellationToken::new();
    let shareds = tiandi_sim::start(
        creds,
        tiandi_sim::SimOptions {
            controller: ctl.quic_addr.to_string(),
            interval: Duration::from_secs(1),
            outages: false,
            profile: LinkProfile::Terrestrial,
            inboxes: Some(ids_dir.clone()),
            backup_sites: Vec::new(),
        },
        &core.config.data_dir.join("demo-spool"),
        cancel.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    assert_eq!(shareds.len(), 3);

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
    // A second transfer (to another site), so that a page of one leaves one out.
    transfers::queue(
        &core.registry,
        &core.outbox,
        &BTreeMap::new(),
        &transfers::SendRequest {
            path: file.display().to_string(),
            to: format!("site:{}", demo::site_name(1).0),
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

    // `/api/sites` pages: two pages of two and one, each site once, by site ID.
    let api = format!("http://{}", ctl.api_addr);
    let read = std::fs::read_to_string(core.config.data_dir.join("read.token")).unwrap();
    let pages = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let get = |q: &str| -> serde_json::Value {
            agent
                .get(format!("{api}/api/sites?{q}"))
                .header("Authorization", &format!("Bearer {}", read.trim()))
                .call()
                .unwrap()
                .body_mut()
                .read_json()
                .unwrap()
        };
        let first = get("limit=2");
        let after = first["next"].as_str().expect("a next page").to_string();
        let second = get(&format!("limit=2&after={after}"));
        let bad = get("after=..%2f");
        let t = agent
            .get(format!("{api}/api/transfers?limit=1"))
            .header("Authorization", &format!("Bearer {}", read.trim()))
            .call()
            .unwrap()
            .body_mut()
            .read_json::<serde_json::Value>()
            .unwrap();
        assert_eq!(t["transfers"].as_array().unwrap().len(), 1, "{t}");
        assert_eq!(t["total_transfers"], 2, "{t}");
        (first, second, bad)
    })
    .await
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["site_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (first, second, bad) = pages;
    assert_eq!(
        (first["count"].as_u64(), second["count"].as_u64()),
        (Some(3), Some(3))
    );
    let mut all = ids(&first);
    assert_eq!(all.len(), 2, "{first}");
    all.extend(ids(&second));
    assert!(second["next"].is_null(), "the last page: {second}");
    let mut sorted: Vec<String> = (0..3).map(|i| demo::site_name(i).0).collect();
    sorted.sort();
    assert_eq!(all, sorted);
    assert!(bad["error"].as_str().unwrap().contains("site ID"), "{bad}");

    cancel.cancel();
    ctl.shutdown().await;
}
