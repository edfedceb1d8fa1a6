use super::*;
use crate::store::AlarmEvent;

fn summary(id: &str, status: &str) -> SiteSummary {
    SiteSummary {
        site_id: id.into(),
        status: status.into(),
        connected: status != "down",
        last_seen_ms: 1,
        conditions: if status == "down" {
            vec!["site-down".into()]
        } else {
            vec![]
        },
        status_since_ms: 1,
        removed: false,
    }
}

fn alarm(at: i64, site: &str, state: &str) -> (Vec<u8>, AlarmEvent) {
    (
        at.to_be_bytes().to_vec(),
        AlarmEvent {
            at_ms: at,
            site_id: site.into(),
            province: "sc".into(),
            alarm: "site-down".into(),
            state: state.into(),
            detail: "no report for 30 s".into(),
        },
    )
}

#[test]
fn the_first_round_is_a_roster_then_only_changes_go() {
    let mut f = Forwarding::new(7, None);
    let all: Vec<SiteSummary> = (0..700)
        .map(|i| summary(&format!("s{i:04}"), "up"))
        .collect();
    let r = f.round(100, all.clone(), vec![]);
    assert_eq!(r.reports.len(), 3, "700 sites at 300 a report");
    let fed: Vec<&Federation> = r
        .reports
        .iter()
        .map(|r| r.federation.as_ref().unwrap())
        .collect();
    assert_eq!(fed.iter().map(|f| f.sites.len()).sum::<usize>(), 700);
    assert_eq!(
        fed.iter().map(|f| f.roster_done).collect::<Vec<_>>(),
        [false, false, true],
        "the roster's last report says so"
    );
    assert!(fed.iter().all(|f| f.roster == 7 && f.total_sites == 700));
    f.sent(&r);

    // Nothing changed but the last-seen time: one report, empty (the heartbeat).
    let mut again = all.clone();
    for s in &mut again {
        s.last_seen_ms = 99;
    }
    let r = f.round(200, again.clone(), vec![]);
    assert_eq!(r.reports.len(), 1);
    let fed = r.reports[0].federation.as_ref().unwrap();
    assert!(fed.sites.is_empty() && fed.alarms.is_empty() && !fed.roster_done);
    f.sent(&r);

    // One site goes down, one leaves, two alarm events.
    again[3] = summary("s0003", "down");
    again.remove(5);
    let r = f.round(
        300,
        again,
        vec![
            alarm(290, "s0003", "raised"),
            alarm(291, "s0009", "cleared"),
        ],
    );
    let fed = r.reports[0].federation.as_ref().unwrap();
    assert_eq!(fed.sites.len(), 2);
    assert_eq!(fed.sites[0].site_id, "s0003");
    assert_eq!(
        (fed.sites[1].site_id.as_str(), fed.sites[1].removed),
        ("s0005", true)
    );
    assert_eq!(fed.alarms.len(), 2);
    assert_eq!(fed.alarms[0].state, "raised");
    assert_eq!(r.cursor, Some(291i64.to_be_bytes().to_vec()));
    f.sent(&r);
    assert!(!f.sent.contains_key("s0005"));
}

fn national() -> (sled::Db, National) {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let cfg = NationalConfig {
        provinces: vec!["province-sc".into()],
        max_sites_per_province: 1000,
        alarm_log_entries: 5,
    };
    let n = National::open(&db, cfg).unwrap();
    (db, n)
}

fn fed(roster: u64, done: bool, sites: Vec<SiteSummary>, alarms: Vec<AlarmChange>) -> Federation {
    Federation {
        total_sites: sites.len() as u32,
        sites,
        alarms,
        roster,
        roster_done: done,
    }
}

fn change(at: i64, site: &str, state: &str) -> AlarmChange {
    AlarmChange {
        at_ms: at,
        site_id: site.into(),
        alarm: "site-down".into(),
        state: state.into(),
        detail: String::new(),
    }
}

#[test]
fn only_listed_province_controllers_may_forward() {
    let (_db, n) = national();
    let e = n
        .apply(
            "sc-001",
            "sc",
            1,
            fed(1, true, vec![summary("a", "up")], vec![]),
            1,
            10,
        )
        .unwrap_err();
    assert!(matches!(e, NationalError::NotAProvince(_)), "{e}");
    assert!(n.provinces(10, |_| true, |_| (true, 10_000)).is_empty());
}

#[test]
fn a_later_report_wins_whatever_the_arrival_order_and_bad_names_are_refused() {
    let (_db, n) = national();
    // The newest report arrives first (the uplink sends the current state first).
    n.apply(
        "province-sc",
        "sc",
        5,
        fed(
            1,
            false,
            vec![summary("a", "down")],
            vec![change(50, "a", "raised")],
        ),
        0,
        100,
    )
    .unwrap();
    n.apply(
        "province-sc",
        "sc",
        4,
        fed(
            1,
            false,
            vec![summary("a", "up")],
            vec![change(40, "b", "cleared")],
        ),
        5,
        100,
    )
    .unwrap();
    let sites = n
        .sites("province-sc", None, 10, 100, |_| true, (true, 10_000))
        .unwrap();
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].summary.status, "down", "seq 5 is newer than seq 4");
    // The alarm log is in the province's order, not the arrival order.
    let log = n.alarms(10, |_| true);
    assert_eq!(
        log.iter().map(|a| a.at_ms).collect::<Vec<_>>(),
        [50, 40],
        "newest first by the province's report order"
    );
    let refused = n
        .apply(
            "province-sc",
            "sc",
            6,
            fed(
                1,
                false,
                vec![summary("../etc", "up"), summary("c", "exploded")],
                vec![change(60, "a b", "raised")],
            ),
            6,
            100,
        )
        .unwrap();
    assert_eq!(refused, 3);
    // Province operators of another province see nothing.
    assert!(
        n.provinces(100, |p| p == "gd", |_| (true, 10_000))
            .is_empty()
    );
    assert!(
        n.sites("province-sc", None, 10, 100, |p| p == "gd", (true, 10_000))
            .is_none()
    );
    assert!(n.alarms(10, |p| p == "gd").is_empty());
}

#[test]
fn a_roster_forgets_unnamed_sites_once_all_of_it_is_stored_and_state_survives_a_restart() {
    let (db, n) = national();
    n.apply(
        "province-sc",
        "sc",
        1,
        fed(
            10,
            true,
            vec![
                summary("a", "up"),
                summary("b", "up"),
                summary("gone", "up"),
            ],
            vec![],
        ),
        1,
        100,
    )
    .unwrap();
    // A new roster (the province restarted): its end arrives before its first part.
    n.apply(
        "province-sc",
        "sc",
        3,
        fed(20, true, vec![summary("b", "down")], vec![]),
        1,
        200,
    )
    .unwrap();
    let ids = |n: &National| -> Vec<String> {
        n.sites("province-sc", None, 10, 200, |_| true, (true, 10_000))
            .unwrap()
            .into_iter()
            .map(|s| s.summary.site_id)
            .collect()
    };
    assert_eq!(
        ids(&n),
        ["a", "b", "gone"],
        "seq 2 is missing: nothing forgotten yet"
    );
    n.apply(
        "province-sc",
        "sc",
        2,
        fed(20, false, vec![summary("a", "up")], vec![]),
        3,
        200,
    )
    .unwrap();
    assert_eq!(
        ids(&n),
        ["a", "b"],
        "every report of the roster is here: `gone` is forgotten"
    );
    let v = n.provinces(200, |_| true, |_| (true, 10_000));
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].known_sites, v[0].connected), (2, 1));
    assert_eq!(v[0].by_status.get("down"), Some(&1));
    assert!(v[0].current);
    // Out of touch: not current, and its sites read `unknown`.
    let v = n.provinces(200, |_| true, |_| (false, 10_000));
    assert!(!v[0].current);
    let s = n
        .sites("province-sc", None, 10, 200_000, |_| true, (true, 10_000))
        .unwrap();
    assert!(s.iter().all(|s| s.summary.status == "unknown"));

    // Kept across a restart; the alarm log stays within its bound.
    for i in 0..8 {
        n.apply(
            "province-sc",
            "sc",
            10 + i,
            fed(20, false, vec![], vec![change(i as i64, "a", "raised")]),
            10 + i,
            300,
        )
        .unwrap();
    }
    drop(n);
    let n = National::open(
        &db,
        NationalConfig {
            provinces: vec!["province-sc".into()],
            max_sites_per_province: 1000,
            alarm_log_entries: 5,
        },
    )
    .unwrap();
    assert_eq!(ids(&n), ["a", "b"]);
    let log = n.alarms(100, |_| true);
    assert_eq!(log.len(), 5);
    assert_eq!(log[0].at_ms, 7);
}

#[test]
fn a_province_cannot_list_more_sites_than_its_bound() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let n = National::open(
        &db,
        NationalConfig {
            provinces: vec!["province-sc".into()],
            max_sites_per_province: 2,
            alarm_log_entries: 5,
        },
    )
    .unwrap();
    let refused = n
        .apply(
            "province-sc",
            "sc",
            1,
            fed(
                1,
                true,
                vec![summary("a", "up"), summary("b", "up"), summary("c", "up")],
                vec![],
            ),
            1,
            1,
        )
        .unwrap();
    assert_eq!(refused, 1);
}

fn removed(id: &str) -> SiteSummary {
    SiteSummary {
        site_id: id.into(),
        removed: true,
        ..Default::default()
    }
}

fn ids(n: &National) -> Vec<String> {
    n.sites("province-sc", None, 100, 1, |_| true, (true, 10_000))
        .unwrap()
        .into_iter()
        .map(|s| s.summary.site_id)
        .collect()
}

#[test]
fn an_older_report_neither_revives_a_removed_site_nor_keeps_an_old_roster_s_site() {
    let (db, n) = national();
    let p = "province-sc";
    n.apply(
        p,
        "sc",
        1,
        fed(
            10,
            true,
            vec![summary("a", "up"), summary("b", "up"), summary("c", "up")],
            vec![],
        ),
        1,
        1,
    )
    .unwrap();
    // `b` is removed (seq 5) and the report arrives before the backlog (seq 2-4).
    n.apply(p, "sc", 5, fed(10, false, vec![removed("b")], vec![]), 1, 2)
        .unwrap();
    assert_eq!(ids(&n), ["a", "c"]);
    n.apply(
        p,
        "sc",
        3,
        fed(10, false, vec![summary("b", "down")], vec![]),
        1,
        2,
    )
    .unwrap();
    assert_eq!(
        ids(&n),
        ["a", "c"],
        "the older report does not bring b back"
    );
    let v = n.provinces(2, |_| true, |_| (true, 10_000));
    assert_eq!(v[0].known_sites, 2);
    // The tombstone outlives a restart of the ministry, and goes once nothing older can come.
    drop(n);
    let n = National::open(
        &db,
        NationalConfig {
            provinces: vec![p.into()],
            max_sites_per_province: 1000,
            alarm_log_entries: 5,
        },
    )
    .unwrap();
    n.apply(
        p,
        "sc",
        4,
        fed(10, false, vec![summary("b", "up")], vec![]),
        5,
        3,
    )
    .unwrap();
    assert_eq!(ids(&n), ["a", "c"]);
    assert!(
        n.provinces.read().unwrap()[p].tombstones == 0,
        "every report up to 5 is stored"
    );

    // The province restarts (roster 20); its newest report comes first, then backlog of
    // roster 10 naming `c`, which the new roster no longer has.
    n.apply(
        p,
        "sc",
        9,
        fed(20, true, vec![summary("a", "up")], vec![]),
        5,
        4,
    )
    .unwrap();
    n.apply(
        p,
        "sc",
        6,
        fed(10, false, vec![summary("c", "degraded")], vec![]),
        6,
        4,
    )
    .unwrap();
    assert_eq!(ids(&n), ["a", "c"], "seq 7-8 are still missing");
    // The pending end of roster 20 survives a restart of the ministry.
    drop(n);
    let n = National::open(
        &db,
        NationalConfig {
            provinces: vec![p.into()],
            max_sites_per_province: 1000,
            alarm_log_entries: 5,
        },
    )
    .unwrap();
    n.apply(p, "sc", 7, fed(10, false, vec![], vec![]), 7, 5)
        .unwrap();
    n.apply(p, "sc", 8, fed(20, false, vec![], vec![]), 9, 5)
        .unwrap();
    assert_eq!(
        ids(&n),
        ["a"],
        "c was named by the old roster only: forgotten"
    );
    // total_sites is the newest report's, whatever arrives after it.
    assert_eq!(
        n.provinces(5, |_| true, |_| (true, 10_000))[0].total_sites,
        1
    );
}

#[test]
fn the_national_alarm_log_is_newest_first_by_event_time_and_drops_the_oldest() {
    let (db, n) = national();
    let p = "province-sc";
    // Newest report first, then the backlog (older events).
    n.apply(
        p,
        "sc",
        9,
        fed(
            1,
            false,
            vec![],
            vec![change(900, "a", "raised"), change(901, "a", "cleared")],
        ),
        0,
        1,
    )
    .unwrap();
    for s in 2..8u64 {
        n.apply(
            p,
            "sc",
            s,
            fed(
                1,
                false,
                vec![],
                vec![change(s as i64 * 100, "b", "raised")],
            ),
            s,
            1,
        )
        .unwrap();
    }
    let at: Vec<i64> = n.alarms(100, |_| true).iter().map(|a| a.at_ms).collect();
    assert_eq!(
        at,
        [901, 900, 700, 600, 500],
        "bound 5: the oldest events went, not the newest"
    );
    drop(n);
    let n = National::open(
        &db,
        NationalConfig {
            provinces: vec![p.into()],
            max_sites_per_province: 1000,
            alarm_log_entries: 5,
        },
    )
    .unwrap();
    let again: Vec<i64> = n.alarms(2, |_| true).iter().map(|a| a.at_ms).collect();
    assert_eq!(again, [901, 900], "the same order after a restart");
    // A province no longer listed is not shown.
    drop(n);
    let n = National::open(
        &db,
        NationalConfig {
            provinces: vec!["province-gd".into()],
            max_sites_per_province: 1000,
            alarm_log_entries: 5,
        },
    )
    .unwrap();
    assert!(n.alarms(10, |_| true).is_empty());
    assert!(n.provinces(1, |_| true, |_| (true, 10_000)).is_empty());
    assert!(n.sites(p, None, 10, 1, |_| true, (true, 10_000)).is_none());
}
