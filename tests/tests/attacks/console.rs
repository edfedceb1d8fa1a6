//! Attacks on the console's accounts and sessions (issue 16), over plain HTTP against
//! `tiandi-controller demo`: a guessed session cookie, password guessing, a cross-site request
//! without the CSRF token, a province operator reaching for another province (by page, by API
//! and by the live stream), a viewer or a viewer's API token writing, a disabled account's
//! session and token, a one-time password used for anything but changing it, and cookies a
//! script could read.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use tiandi_tests::ControllerProc;

/// A client that keeps no cookies of its own: each call says which session it carries.
fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

struct Session {
    cookie: String,
    csrf: String,
}

fn login(base: &str, user: &str, password: &str) -> Result<Session, (u16, Value)> {
    let mut r = http()
        .post(&format!("{base}/api/login"))
        .send_json(json!({"user": user, "password": password}))
        .expect("POST /api/login");
    let status = r.status().as_u16();
    let set = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = r.body_mut().read_json().unwrap_or(Value::Null);
    if status != 200 {
        return Err((status, body));
    }
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "the session cookie lacks {attr}: {set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    Ok(Session {
        cookie,
        csrf: body["csrf"].as_str().unwrap_or_default().to_string(),
    })
}

/// (status, JSON body) of a request with a session cookie (and its CSRF token if `csrf`).
fn call(
    base: &str,
    s: &Session,
    method: &str,
    path: &str,
    body: Option<Value>,
    csrf: bool,
) -> (u16, Value) {
    let url = format!("{base}{path}");
    let a = http();
    let mut r = match (method, body) {
        ("GET", _) => a.get(&url).header("cookie", &s.cookie).call(),
        (_, body) => {
            let mut req = a.post(&url).header("cookie", &s.cookie);
            if csrf {
                req = req.header("x-csrf-token", &s.csrf);
            }
            req.send_json(body.unwrap_or(json!({})))
        }
    }
    .expect("an HTTP answer");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or(Value::Null))
}

fn bearer(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{base}{path}");
    let auth = format!("Bearer {token}");
    let mut r = match method {
        "GET" => http().get(&url).header("Authorization", &auth).call(),
        _ => http()
            .post(&url)
            .header("Authorization", &auth)
            .send_json(body.unwrap_or(json!({}))),
    }
    .expect("an HTTP answer");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or(Value::Null))
}

/// The provinces of the events a session's live stream carries within `for_ms`.
fn stream_provinces(
    api: std::net::SocketAddr,
    cookie: &str,
    query: &str,
    for_ms: u64,
) -> Vec<String> {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    write!(
        s,
        "GET /api/stream{query} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let end = std::time::Instant::now() + Duration::from_millis(for_ms);
    let mut seen = Vec::new();
    let mut line = String::new();
    while std::time::Instant::now() < end {
        line.clear();
        if r.read_line(&mut line).is_err() {
            continue;
        }
        if let Some(data) = line.strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<Value>(data)
            && let Some(p) = v["province"].as_str()
            && !seen.iter().any(|x| x == p)
        {
            seen.push(p.to_string());
        }
    }
    seen
}

#[test]
fn console_sessions_roles_and_csrf_hold() {
    let dir = tempfile::tempdir().unwrap();
    let outgoing = dir.path().join("outgoing");
    std::fs::create_dir_all(&outgoing).unwrap();
    let notice = outgoing.join("notice.txt");
    std::fs::write(&notice, "drill at 10:00\n").unwrap();
    let ctl = ControllerProc::start_demo(
        &dir.path().join("ctl"),
        62,
        1.0,
        &format!("outgoing_dirs = [{outgoing:?}]\n"),
    );
    tiandi_tests::wait_for("the demo's sites", Duration::from_secs(60), || {
        ctl.api("/api/summary")
            .filter(|v| v["connected"].as_u64() == Some(62))
    });
    let base = format!("http://{}", ctl.api);

    // A made-up session cookie, or none, reads nothing; a page sends the browser to log in.
    let fake = Session {
        cookie: format!("tiandi_session={}", "ab".repeat(32)),
        csrf: String::new(),
    };
    assert_eq!(call(&base, &fake, "GET", "/api/sites", None, false).0, 401);
    let r = http().get(&format!("{base}/sites")).call().unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/login")
    );

    // Password guessing: after five failures the account is held, even for the right password.
    let ops_pw = ctl.demo_password("ops");
    for _ in 0..5 {
        assert_eq!(
            login(&base, "viewer", "not the password").err().unwrap().0,
            401
        );
    }
    let (code, body) = login(&base, "viewer", &ctl.demo_password("viewer"))
        .err()
        .unwrap();
    assert_eq!(code, 429, "{body}");
    assert!(body["retry_after_s"].as_u64().unwrap() > 0);
    // Another account from the same address still logs in (the address's limit is higher),
    // and a name that is no name gets the same answer as a wrong password.
    let ops = login(&base, "ops", &ops_pw).unwrap();
    assert_eq!(login(&base, "../../etc/passwd", "x").err().unwrap().0, 401);

    // A state change with the session but without its CSRF token (what a cross-site form
    // could send) is refused; with the token it goes through.
    let (code, body) = call(
        &base,
        &ops,
        "POST",
        "/api/me/tokens",
        Some(json!({"label": "x"})),
        false,
    );
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("CSRF"));
    let (code, _) = call(
        &base,
        &ops,
        "POST",
        "/api/me/tokens",
        Some(json!({"label": "ci"})),
        true,
    );
    assert_eq!(code, 200);

    // A province operator: GD only, whatever it asks.
    let gd = login(&base, "gd-ops", &ctl.demo_password("gd-ops")).unwrap();
    let (_, sites) = call(&base, &gd, "GET", "/api/sites?limit=10000", None, false);
    assert!(sites["count"].as_u64().unwrap() >= 2);
    assert!(
        sites["sites"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["province"] == "GD")
    );
    for (path, want) in [
        ("/api/sites?province=BJ", 403),
        ("/api/sites/bj-001", 404),
        ("/api/sites/bj-001/history?metric=link.rtt_ms", 404),
        ("/api/alarms?province=BJ", 403),
        ("/api/summary?count_history=true", 403),
        ("/api/admin/audit", 403),
        ("/api/admin/users", 403),
    ] {
        assert_eq!(call(&base, &gd, "GET", path, None, false).0, want, "{path}");
    }
    let (_, summary) = call(&base, &gd, "GET", "/api/summary", None, false);
    assert_eq!(
        summary["sites"], sites["count"],
        "the summary counts GD only"
    );
    let (_, overview) = call(&base, &gd, "GET", "/api/overview", None, false);
    assert!(
        overview["provinces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["code"] == "GD")
    );
    for (path, body) in [
        (
            "/api/admin/send",
            json!({"path": "/etc/hostname", "to": "all"}),
        ),
        (
            "/api/admin/send",
            json!({"path": "/etc/hostname", "to": "province:BJ"}),
        ),
        (
            "/api/admin/send",
            json!({"path": "/etc/hostname", "to": "site:bj-001"}),
        ),
        ("/api/admin/revoke", json!({"site_id": "bj-001"})),
        (
            "/api/admin/enroll",
            json!({"site_id": "bj-999", "province": "BJ"}),
        ),
        (
            "/api/admin/conference",
            json!({"op": "end", "room": "demo"}),
        ),
    ] {
        let (code, answer) = call(&base, &gd, "POST", path, Some(body.clone()), true);
        assert!(matches!(code, 403 | 404), "{path} {body}: {code} {answer}");
    }
    assert_eq!(
        ctl.api("/api/sites/bj-001").unwrap()["connected"],
        json!(true),
        "bj-001 was not revoked"
    );
    assert_eq!(stream_provinces(ctl.api, &gd.cookie, "", 3000), ["GD"]);
    // Transfers too: the ministry sends to every site, GD's operator follows GD's only.
    let reader = {
        let (api, cookie) = (ctl.api, gd.cookie.clone());
        std::thread::spawn(move || stream_provinces(api, &cookie, "?events=transfer", 5000))
    };
    std::thread::sleep(Duration::from_millis(500));
    let (code, answer) = call(
        &base,
        &ops,
        "POST",
        "/api/admin/send",
        Some(json!({"path": notice.display().to_string(), "to": "all"})),
        true,
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(reader.join().unwrap(), ["GD"], "transfer events of GD only");

    // A read-only account (the kiosk; the viewer is held above), and its API token, change
    // nothing.
    let wall = login(&base, "wall", &ctl.demo_password("wall")).unwrap();
    for (path, body) in [
        ("/api/admin/revoke", json!({"site_id": "gd-001"})),
        (
            "/api/alarms/ack",
            json!({"site_id": "gd-001", "alarm": "site-down", "comment": "x"}),
        ),
        (
            "/api/admin/users",
            json!({"op": "add", "name": "eve", "role": "admin"}),
        ),
    ] {
        assert_eq!(
            call(&base, &wall, "POST", path, Some(body), true).0,
            403,
            "{path}"
        );
    }
    let (_, t) = call(
        &base,
        &wall,
        "POST",
        "/api/me/tokens",
        Some(json!({"label": "script"})),
        true,
    );
    let token = t["token"].as_str().unwrap().to_string();
    assert_eq!(
        bearer(&base, &token, "GET", "/api/sites?limit=1", None).0,
        200
    );
    assert_eq!(
        bearer(
            &base,
            &token,
            "POST",
            "/api/admin/revoke",
            Some(json!({"site_id": "gd-001"}))
        )
        .0,
        403
    );

    // Disabling an account stops its session and its token at once.
    let (code, _) = call(
        &base,
        &ops,
        "POST",
        "/api/admin/users",
        Some(json!({"op": "disable", "name": "wall"})),
        true,
    );
    assert_eq!(code, 200);
    assert_eq!(call(&base, &wall, "GET", "/api/sites", None, false).0, 401);
    assert_eq!(bearer(&base, &token, "GET", "/api/sites", None).0, 401);

    // A password an administrator set is good for changing it and nothing else.
    let (code, made) = call(
        &base,
        &ops,
        "POST",
        "/api/admin/users",
        Some(json!({"op": "add", "name": "sc-ops", "role": "province", "province": "SC"})),
        true,
    );
    assert_eq!(code, 200, "{made}");
    let one_time = made["password"].as_str().unwrap().to_string();
    let sc = login(&base, "sc-ops", &one_time).unwrap();
    let (code, body) = call(&base, &sc, "GET", "/api/sites", None, false);
    assert_eq!(code, 403, "{body}");
    let (code, body) = call(
        &base,
        &sc,
        "POST",
        "/api/me/password",
        Some(json!({"old": one_time, "new": "成都运维 2026 新密码"})),
        true,
    );
    assert_eq!(code, 200, "{body}");
    // The old session ended with the change; a new one works, for SC only.
    assert_eq!(call(&base, &sc, "GET", "/api/sites", None, false).0, 401);
    let sc = login(&base, "sc-ops", "成都运维 2026 新密码").unwrap();
    let (_, mine) = call(&base, &sc, "GET", "/api/sites?limit=10000", None, false);
    assert!(
        mine["sites"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["province"] == "SC")
    );

    // Logging out ends the session for good.
    let (code, _) = call(&base, &sc, "POST", "/api/logout", None, true);
    assert_eq!(code, 200);
    assert_eq!(call(&base, &sc, "GET", "/api/sites", None, false).0, 401);

    // The audit log has the failures, the refusals and the changes, with who and from where.
    let (_, audit) = call(
        &base,
        &ops,
        "GET",
        "/api/admin/audit?limit=1000",
        None,
        false,
    );
    let entries = audit["entries"].as_array().unwrap();
    let has = |user: &str, action: &str, outcome: &str| {
        entries.iter().any(|e| {
            e["user"] == user
                && e["action"] == action
                && e["outcome"].as_str().unwrap().starts_with(outcome)
                && e["addr"] == "127.0.0.1"
        })
    };
    assert!(has("viewer", "login", "refused: wrong"));
    assert!(has("viewer", "login", "refused: throttled"));
    assert!(has("gd-ops", "revoke", "refused"));
    assert!(has("gd-ops", "send", "refused"));
    assert!(has("ops", "user.disable", "ok"));
    assert!(has("sc-ops", "password", "ok"));
}
