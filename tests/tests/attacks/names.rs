//! Attacks through names: a site, province, room or path segment chosen to leave a directory
//! or to look like another (`..`, `.`, `a/b`, `a\b`, percent-encoded and Unicode look-alike
//! dots, 65- and 256-byte names). Every one is refused where it enters (the CLI, the API),
//! with the grammar in the message; the longest valid name (64 bytes) still works.

use std::time::Duration;

use tiandi_tests::ControllerProc;

fn hostile() -> Vec<String> {
    let mut v: Vec<String> = [
        "..",
        ".",
        "../etc",
        "a/b",
        "a\\b",
        "%2e%2e",
        "..%2f..%2fadmin.token",
        "\u{ff0e}\u{ff0e}",
        "\u{2024}\u{2024}",
        ".hidden",
        "-rf",
        "a\u{0}b",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("x".repeat(65));
    v.push("x".repeat(256));
    v
}

fn post(url: &str, token: &str, body: &serde_json::Value) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut r = agent
        .post(url)
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap_or_default())
}

#[test]
fn site_named_dotdot_cannot_be_enrolled() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(tmp.path());
    let admin = ctl.admin_token();
    let url = format!("http://{}/api/admin/enroll", ctl.api);
    for name in hostile() {
        if !name.contains('\0') {
            // Through the CLI (arguments cannot carry NUL).
            let site = format!("--site={name}");
            let out = ctl.cli(&["enroll", &site, "--province", "GD"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "enrolled {name:?}");
            assert!(err.contains("letters, digits"), "{name:?}: {err}");
            let province = format!("--province={name}");
            let out = ctl.cli(&["enroll", "--site", "gd-001", &province]);
            assert!(!out.status.success(), "province {name:?} accepted");
        }
        // Through the API.
        let (status, body) = post(
            &url,
            &admin,
            &serde_json::json!({"site_id": name, "province": "GD"}),
        );
        assert_eq!(status, 400, "{name:?}: {body}");
    }
    // Nothing of it reached the registry; the longest valid name still enrolls.
    let long = "y".repeat(64);
    let out = ctl.cli(&["enroll", "--site", &long, "--province", "GD"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<String> = std::fs::read_dir(ctl.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !entries
            .iter()
            .any(|e| e.starts_with('.') || e.contains("etc")),
        "{entries:?}"
    );
}

#[test]
fn names_in_api_paths_and_queries_pass_the_grammar() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(tmp.path());
    for path in [
        "/api/sites/..%2f..%2fadmin.token",
        "/api/sites/%2e%2e/history?metric=host.cpu_pct",
        "/api/alarms?site=..%2fx",
        "/api/sites?province=%2e%2e",
    ] {
        let url = format!("http://{}{path}", ctl.api);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", ctl.read_token()))
            .call()
            .unwrap();
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("letters, digits"), "{path}: {body}");
    }
}

#[test]
fn conference_names_from_a_request_pass_the_grammar() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::start(tmp.path());
    let admin = ctl.admin_token();
    let url = format!("http://{}/api/admin/conference", ctl.api);
    let (status, body) = post(
        &url,
        &admin,
        &serde_json::json!({"op": "create", "room": "weekly"}),
    );
    assert_eq!(status, 200, "{body}");
    for req in [
        serde_json::json!({"op": "create", "room": "../../x"}),
        serde_json::json!({"op": "create", "room": "ok", "chair": "../x"}),
        serde_json::json!({"op": "record", "room": "weekly", "site": "../../../../tmp/evil"}),
        serde_json::json!({"op": "floor", "room": "weekly", "site": "a/b"}),
        serde_json::json!({"op": "show", "room": "%2e%2e"}),
    ] {
        let (status, body) = post(&url, &admin, &req);
        assert_eq!(status, 400, "{req}: {body}");
        assert!(body.contains("letters, digits"), "{req}: {body}");
    }
}
