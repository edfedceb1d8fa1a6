//! The JSON API and the CLI's admin client against a real controller on loopback: the admin
//! token guards every admin route, requests and answers are the shared types of `admin.rs`,
//! errors come back with the right status and a message that says what to change; and with no
//! controller running the same requests work on the data directory.

mod common;

use std::time::Duration;

use tiandi_controller::Controller;
use tiandi_controller::admin::{
    ConferenceRequest, EnrollBatchRequest, EnrollRequest, RegistryRequest, RevokeRequest,
    SendRequest, SiteRef, TransfersRequest,
};
use tiandi_controller::cli::AdminClient;

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// GET `url` without a token: (status, JSON body or Null).
fn get(url: &str) -> (u16, serde_json::Value) {
    get_as(url, None)
}

/// GET `url` with a bearer token.
fn get_as(url: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {}", t.trim()));
    }
    let mut r = req.call().expect("GET");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or_default())
}

/// Runs the blocking admin client off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_token_and_answer_in_the_shared_types() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(common::config(dir.path())).await.unwrap();
    let api = format!("http://{}", ctl.api_addr);
    let mut cli_cfg = ctl.core.config.clone();
    cli_cfg.api_listen = ctl.api_addr;

    // No token, a wrong token: refused, with what to send instead.
    let body = serde_json::json!({"site_id": "bj-001", "province": "BJ"});
    for auth in [None, Some("Bearer not-the-token")] {
        let mut req = http().post(format!("{api}/api/admin/enroll"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let mut r = req.send_json(&body).expect("POST");
        assert_eq!(r.status().as_u16(), 401, "auth {auth:?}");
        let v: serde_json::Value = r.body_mut().read_json().unwrap();
        assert!(v["error"].as_str().unwrap().contains("admin.token"), "{v}");
    }
    let (status, _) = get(&format!("{api}/api/admin/registry"));
    assert_eq!(status, 401, "reading the registry needs the token too");

    // A priority class or a window that does not exist is refused as the request is read.
    let token = std::fs::read_to_string(ctl.core.config.data_dir.join("admin.token")).unwrap();
    for (body, says) in [
        (
            serde_json::json!({"path": "/x", "to": "all", "priority": "urgent"}),
            "alarm",
        ),
        (
            serde_json::json!({"path": "/x", "to": "all", "window": "25:00-26:00"}),
            "window",
        ),
    ] {
        let mut r = http()
            .post(format!("{api}/api/admin/send"))
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .send_json(&body)
            .unwrap();
        assert_eq!(r.status().as_u16(), 422, "{body}");
        let text = r.body_mut().read_to_string().unwrap();
        assert!(text.contains(says), "{body}: {text}");
    }

    let report = blocking(move || {
        let c = AdminClient { cfg: &cli_cfg };
        let t = c
            .call(&EnrollRequest {
                site_id: "bj-001".into(),
                province: "BJ".into(),
                ttl_hours: Some(2),
                role: Default::default(),
            })
            .expect("enroll");
        assert_eq!((t.site_id.as_str(), t.province.as_str()), ("bj-001", "BJ"));
        assert!(t.token.starts_with("T1."), "{}", t.token);
        let batch = c
            .call(&EnrollBatchRequest {
                sites: (1..=3)
                    .map(|i| SiteRef {
                        site_id: format!("gd-{i:03}"),
                        province: "GD".into(),
                    })
                    .collect(),
                ttl_hours: None,
            })
            .expect("batch");
        assert_eq!(batch.tokens.len(), 3);
        let tokens: std::collections::BTreeSet<_> =
            batch.tokens.iter().map(|t| t.token.clone()).collect();
        assert_eq!(tokens.len(), 3, "every token differs");

        // A name that a path join would take for a directory is refused at the edge.
        for bad in ["..", "."] {
            let e = c
                .call(&EnrollRequest {
                    site_id: bad.into(),
                    province: "BJ".into(),
                    ttl_hours: None,
                    role: Default::default(),
                })
                .expect_err("a site named like a directory");
            assert!(e.to_string().contains("site ID"), "{e:#}");
        }

        let e = c
            .call(&RevokeRequest {
                site_id: "nowhere-001".into(),
            })
            .expect_err("unknown site");
        assert!(e.to_string().contains("not registered"), "{e:#}");

        let file = c.cfg.data_dir.join("../notice.txt");
        std::fs::write(&file, "drill at 09:00\n").unwrap();
        let send = |to: &str| SendRequest {
            path: file.display().to_string(),
            to: to.into(),
            priority: tiandi_transfer::Priority::Bulk,
            window: Some("22:00-06:00+08:00".parse().unwrap()),
            rate_limit_mbit: None,
        };
        let e = c.call(&send("site:nowhere-001")).expect_err("nobody");
        assert!(e.to_string().contains("unknown destination"), "{e:#}");
        let e = c.call(&send("everyone")).expect_err("bad destination");
        assert!(
            e.to_string().contains("site:ID, province:CODE or all"),
            "{e:#}"
        );

        let t = c.call(&TransfersRequest {}).expect("transfers");
        assert!(t.transfers.is_empty() && t.received.is_empty());
        c.call(&RegistryRequest {}).expect("registry")
    })
    .await;
    assert!(report.sites.is_empty(), "tokens are not enrollments");

    // Conferences: the CLI's subcommands are the API's body.
    let mut cli_cfg = ctl.core.config.clone();
    cli_cfg.api_listen = ctl.api_addr;
    blocking(move || {
        let c = AdminClient { cfg: &cli_cfg };
        let room = || "drill".to_string();
        let v = c
            .call(&ConferenceRequest::Create {
                room: room(),
                chair: Some("bj-001".into()),
            })
            .expect("create");
        assert_eq!(
            (v["room"].as_str(), v["chair"].as_str()),
            (Some("drill"), Some("bj-001"))
        );
        let v = c
            .call(&ConferenceRequest::Floor {
                room: room(),
                site: Some("gd-001".into()),
            })
            .expect("floor");
        assert_eq!(v["floor"], "gd-001");
        let v = c
            .call(&ConferenceRequest::Rollcall {
                room: room(),
                seconds: 5,
            })
            .expect("roll call");
        assert_eq!(v["deadline_s"], 5);
        let v = c.call(&ConferenceRequest::List).expect("list");
        let rooms = v["conferences"].as_array().unwrap();
        assert_eq!(rooms.len(), 1, "{v}");
        let e = c
            .call(&ConferenceRequest::Create {
                room: "../x".into(),
                chair: None,
            })
            .expect_err("a room name with a path in it");
        assert!(e.to_string().contains("room"), "{e:#}");
        c.call(&ConferenceRequest::End { room: room() })
            .expect("end");
        let e = c
            .call(&ConferenceRequest::Show { room: room() })
            .expect_err("ended");
        assert!(e.to_string().contains("no conference"), "{e:#}");
    })
    .await;

    // The read routes need a token (read or admin); the ops listener on loopback does not.
    let read = std::fs::read_to_string(ctl.core.config.data_dir.join("read.token")).unwrap();
    let read = Some(read.as_str());
    for path in [
        "/api/sites",
        "/api/alarms",
        "/api/summary",
        "/api/transfers",
    ] {
        let (status, v) = get(&format!("{api}{path}"));
        assert_eq!(status, 401, "{path} without a token");
        assert!(v["error"].as_str().unwrap().contains("read.token"), "{v}");
    }
    let (status, v) = get_as(&format!("{api}/api/sites"), read);
    assert_eq!((status, v["count"].as_u64()), (200, Some(0)));
    let (status, v) = get_as(&format!("{api}/api/sites"), Some(&token));
    assert_eq!(
        (status, v["count"].as_u64()),
        (200, Some(0)),
        "admin reads too"
    );
    let (status, v) = get_as(&format!("{api}/api/sites?status=sunny"), read);
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("rain-fade"), "{v}");
    let (status, _) = get_as(&format!("{api}/api/sites/bj-001"), read);
    assert_eq!(status, 404);
    let (status, v) = get_as(&format!("{api}/api/sites/..%2f..%2fx"), read);
    assert_eq!(status, 400, "{v}");
    let (status, v) = get_as(&format!("{api}/api/summary"), read);
    assert_eq!((status, v["sites"].as_u64()), (200, Some(0)));
    let (status, _) = get_as(&format!("{api}/api/summary?count_history=true"), read);
    assert_eq!(status, 403, "a full scan is for the admin token");
    let (status, _) = get_as(&format!("{api}/api/admin/registry"), read);
    assert_eq!(status, 403, "the read token does not open admin routes");
    let ops = format!("http://{}", ctl.ops_addr);
    let mut r = http().get(format!("{ops}/metrics")).call().unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    assert!(text.contains("# TYPE"), "{text}");
    let (status, _) = get(&format!("{ops}/health"));
    assert_eq!(status, 200);

    // A dual-homed site down to one path: its paths in full on its page, in brief in the list,
    // which `redundancy=lost` narrows to such sites.
    let now = tiandi_link::clock::now_ms();
    ctl.core.sites.insert("gd-009", "GD", None, now);
    ctl.core.sites.insert("gd-010", "GD", None, now);
    let path = |name: &str, state: &str| tiandi_controller::paths::PathView {
        name: name.into(),
        kind: name.into(),
        state: state.into(),
        rtt_ms: 600,
        loss_pct: 0.5,
        tx_kbps: 12,
        rx_kbps: 3,
        budget_kbps: 512,
        since_ms: now,
        connected: false,
    };
    let switch = tiandi_controller::paths::SwitchView {
        at_ms: now,
        class: "reports".into(),
        from: Some("ground".into()),
        to: Some("sky".into()),
        reason: "path down".into(),
    };
    ctl.core.sites.set_paths(
        "gd-009",
        vec![path("ground", "down"), path("sky", "up")],
        [("reports".to_string(), "sky".to_string())].into(),
        vec![switch],
        now,
    );
    let (status, v) = get_as(&format!("{api}/api/sites/gd-009"), read);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["paths"]["paths"][1]["name"], "sky", "{v}");
    assert_eq!(v["paths"]["paths"][1]["budget_kbps"], 512, "{v}");
    assert_eq!(v["paths"]["uses"]["reports"], "sky", "{v}");
    assert_eq!(v["paths"]["switches"][0]["reason"], "path down", "{v}");
    assert_eq!(
        v["conditions"][0]["condition"], "path-redundancy-lost",
        "{v}"
    );
    let (_, v) = get_as(&format!("{api}/api/sites/gd-010"), read);
    assert!(v["paths"].is_null(), "one path: {v}");
    let (status, v) = get_as(&format!("{api}/api/sites?province=GD"), read);
    assert_eq!((status, v["count"].as_u64()), (200, Some(2)), "{v}");
    assert_eq!(
        v["sites"][0]["paths"],
        serde_json::json!([{"name": "ground", "state": "down"}, {"name": "sky", "state": "up"}])
    );
    assert_eq!(v["sites"][0]["redundancy_lost"], true);
    assert!(v["sites"][1]["paths"].is_null());
    assert_eq!(v["sites"][1]["redundancy_lost"], false);
    let (status, v) = get_as(&format!("{api}/api/sites?redundancy=lost"), read);
    assert_eq!((status, v["count"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(v["sites"][0]["site_id"], "gd-009");
    let (status, v) = get_as(&format!("{api}/api/sites?redundancy=maybe"), read);
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("lost"), "{v}");
    ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_controller_admin_requests_run_on_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    // Nothing listens here: the client falls back to the data directory.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.api_listen = free.local_addr().unwrap();
    drop(free);
    let offline = cfg.clone();
    let token = blocking(move || {
        let c = AdminClient { cfg: &offline };
        let t = c
            .call(&EnrollRequest {
                site_id: "xz-001".into(),
                province: "XZ".into(),
                ttl_hours: None,
                role: Default::default(),
            })
            .expect("enroll offline");
        let e = c
            .call(&ConferenceRequest::List)
            .expect_err("no relay offline");
        assert!(e.to_string().contains("running controller"), "{e:#}");
        assert!(
            c.call(&TransfersRequest {})
                .expect("transfers")
                .transfers
                .is_empty()
        );
        t.token
    })
    .await;

    // The controller started on that data directory honours the token made offline.
    let ctl = Controller::start(cfg).await.unwrap();
    let core = ctl.core.clone();
    let (_key, csr) = tiandi_link::pki::site_key_and_csr("xz-001").unwrap();
    core.registry
        .redeem(&token, &csr, &core.ca, Duration::from_secs(86_400))
        .expect("the offline token is redeemed");
    assert!(
        core.registry
            .redeem(&token, &csr, &core.ca, Duration::from_secs(86_400))
            .is_err(),
        "once"
    );
    ctl.shutdown().await;
}
