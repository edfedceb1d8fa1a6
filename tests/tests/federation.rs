//! Tier two: a province controller forwards its sites' summaries and its alarm events to the
//! ministry's controller over the same spool-and-acknowledge uplink an agent uses. Real
//! processes, real QUIC over loopback: two controllers and two agents. The ministry goes away
//! while alarms are raised and cleared at the province; when it is back every event arrives,
//! in the province's order, once. The province goes away: the ministry shows its sites as
//! unknown and raises one alarm, the province's own site-down.

use std::time::Duration;

use serde_json::Value;
use tiandi_tests::{AgentProc, ControllerProc, wait_for};

fn site<'a>(sites: &'a Value, id: &str) -> Option<&'a Value> {
    sites["sites"]
        .as_array()?
        .iter()
        .find(|s| s["site_id"] == id)
}

/// The province's alarm log (raised/cleared of its sites), oldest first.
fn province_log(p: &ControllerProc) -> Vec<(i64, String, String, String)> {
    let v = p.api("/api/alarms?since=0&limit=1000").expect("alarms");
    let mut log: Vec<(i64, String, String, String)> = v["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["at_ms"].as_i64().unwrap(),
                e["site_id"].as_str().unwrap().to_string(),
                e["alarm"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    log.sort();
    log
}

/// The ministry's national alarm log, oldest first.
fn national_log(m: &ControllerProc) -> Vec<(i64, String, String, String)> {
    let v = m
        .api("/api/national/alarms?limit=1000")
        .expect("national alarms");
    let mut log: Vec<(i64, String, String, String)> = v["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["province"], "SC");
            assert_eq!(e["from"], "province-sc");
            (
                e["at_ms"].as_i64().unwrap(),
                e["site_id"].as_str().unwrap().to_string(),
                e["alarm"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    log.sort();
    log
}

#[test]
fn a_province_forwards_summaries_and_alarms_to_the_ministry_through_outages() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ministry = ControllerProc::start_with(
        &tmp.path().join("ministry"),
        None,
        "[national]\nprovinces = [\"province-sc\"]\n",
    );
    // The province controller is a site of the ministry's, enrolled like an agent.
    let token = ministry.enroll("province-sc", "SC", &[]);
    AgentProc::enroll(&tmp.path().join("upstream"), ministry.quic, &token, "");
    let identity = tmp.path().join("upstream").join("data");
    let mut province = ControllerProc::start_with(
        &tmp.path().join("province"),
        None,
        &format!(
            "[upstream]\ncontroller = \"{}\"\nidentity_dir = {:?}\ninterval_s = 1\n",
            ministry.quic, identity
        ),
    );
    let mut a1 = province.new_site(&tmp.path().join("a1"), "sc-001", "SC", "interval_s = 0.5");
    let mut a2 = province.new_site(&tmp.path().join("a2"), "sc-002", "SC", "interval_s = 0.5");
    a1.start();
    a2.start();

    let p = wait_for(
        "the province at the ministry, both sites up",
        Duration::from_secs(60),
        || {
            let v = ministry.api("/api/national")?;
            let p = v["provinces"].as_array()?.first()?.clone();
            (p["known_sites"] == 2 && p["connected"] == 2 && p["current"] == true).then_some(p)
        },
    );
    assert_eq!(p["province"], "SC");
    assert_eq!(p["from"], "province-sc");
    assert_eq!(p["total_sites"], 2);
    assert_eq!(p["by_status"]["up"], 2, "{p}");

    // A site goes quiet: the province raises site-down; the ministry sees it within seconds.
    a2.stop();
    wait_for(
        "sc-002 down at the ministry",
        Duration::from_secs(30),
        || {
            let v = ministry.api("/api/national/province-sc/sites")?;
            let s = site(&v, "sc-002")?;
            (s["status"] == "down" && s["conditions"][0] == "site-down").then_some(())
        },
    );
    wait_for(
        "the raised alarm at the ministry",
        Duration::from_secs(30),
        || {
            national_log(&ministry)
                .iter()
                .any(|e| e.1 == "sc-002" && e.3 == "raised")
                .then_some(())
        },
    );

    // The ministry goes away; meanwhile sc-002 comes back and sc-001 goes quiet.
    ministry.stop();
    a2.start();
    wait_for(
        "sc-002 up again at the province",
        Duration::from_secs(30),
        || {
            let s = province.api("/api/sites/sc-002")?;
            (s["status"] == "up").then_some(())
        },
    );
    a1.stop();
    wait_for(
        "sc-001 down at the province",
        Duration::from_secs(30),
        || {
            let s = province.api("/api/sites/sc-001")?;
            (s["status"] == "down").then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    ministry.restart();
    let expected = province_log(&province);
    assert!(
        expected.len() >= 3,
        "raised sc-002, cleared sc-002, raised sc-001 at least: {expected:?}"
    );
    let got = wait_for(
        "every alarm event at the ministry",
        Duration::from_secs(60),
        || {
            let got = national_log(&ministry);
            (got.len() >= expected.len()).then_some(got)
        },
    );
    assert_eq!(got, expected, "each event once, as the province logged it");
    wait_for(
        "the ministry's view caught up",
        Duration::from_secs(30),
        || {
            let v = ministry.api("/api/national/province-sc/sites")?;
            (site(&v, "sc-001")?["status"] == "down" && site(&v, "sc-002")?["status"] == "up")
                .then_some(())
        },
    );

    // The province goes away: its sites become unknown at the ministry, and the ministry's
    // one alarm is the province controller's own site-down.
    province.stop();
    wait_for("the province not current", Duration::from_secs(30), || {
        let v = ministry.api("/api/national")?;
        let p = &v["provinces"][0];
        (p["current"] == false).then_some(())
    });
    let v = ministry.api("/api/national/province-sc/sites").unwrap();
    assert!(
        v["sites"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "unknown"),
        "{v}"
    );
    wait_for(
        "province-sc down at the ministry",
        Duration::from_secs(30),
        || {
            let s = ministry.api("/api/sites/province-sc")?;
            (s["status"] == "down").then_some(())
        },
    );
    let active = ministry.api("/api/alarms").unwrap();
    let active: Vec<&Value> = active["active"].as_array().unwrap().iter().collect();
    assert_eq!(active.len(), 1, "one alarm, not one per site: {active:?}");
    assert_eq!(active[0]["site_id"], "province-sc");

    // A controller with no [national] section has no national view.
    assert!(province_has_no_national_view(&mut province));
    a1.stop();
    a2.stop();
}

fn province_has_no_national_view(province: &mut ControllerProc) -> bool {
    province.restart();
    let url = format!("http://{}/api/national", province.api);
    let token = province.read_token();
    let resp = ureq::get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    resp.status() == 404
}
