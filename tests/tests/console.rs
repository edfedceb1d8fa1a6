//! The web console in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, over WebDriver) against `tiandi-controller demo` with simulated sites.
//! What an operator does all day: log in, filter the site table, open a site and read its
//! chart, watch a site go down without reloading, acknowledge its alarm, send a file and watch
//! it arrive, call the roll in a conference; and what each role may not do: a province
//! operator sees only their province (page, API and live stream), a viewer changes nothing,
//! and a request without the session's CSRF token is refused. Screenshots of every page go to
//! `target/console-screenshots/`.

use std::time::Duration;

use serde_json::{Value, json};
use tiandi_tests::ControllerProc;
use tiandi_tests::browser::{self, Browser};

const SITES: usize = 62;
const T: Duration = Duration::from_secs(20);

fn shot(b: &Browser, name: &str) {
    let path = browser::screenshot_dir().join(format!("{name}.png"));
    b.screenshot(&path);
    eprintln!("screenshot: {}", path.display());
}

/// Logs in through the login form; waits for the page it leads to.
fn log_in(b: &Browser, base: &str, user: &str, password: &str, then: &str) {
    b.goto(&format!("{base}/login?next={then}"));
    b.wait_css("form#login input[name=user]", T);
    b.fill("form#login input[name=user]", user);
    b.fill("form#login input[name=password]", password);
    b.click("form#login button[type=submit], form#login input[type=submit]");
    b.wait_js(
        "the page after logging in",
        &format!(
            "location.pathname === {then:?} && document.documentElement.dataset.ready === '1'"
        ),
        T,
    );
}

fn log_out(b: &Browser) {
    b.click("button#logout");
    b.wait_js("the login page", "location.pathname === '/login'", T);
}

/// `fetch` from the page (with its cookie): `[status, body]`.
fn fetch(b: &Browser, method: &str, path: &str, body: Option<Value>, csrf: bool) -> (u64, Value) {
    let v = b.js_async(
        r#"const [method, path, body, csrf, done] = arguments;
           const boot = JSON.parse(document.getElementById('boot').textContent);
           const headers = {'content-type': 'application/json'};
           if (csrf) headers['x-csrf-token'] = boot.csrf;
           fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)})
             .then(async r => done([r.status, await r.json().catch(() => null)]))
             .catch(e => done([0, String(e)]));"#,
        vec![
            json!(method),
            json!(path),
            body.unwrap_or(Value::Null),
            json!(csrf),
        ],
    );
    (v[0].as_u64().unwrap_or(0), v[1].clone())
}

fn no_page_errors(b: &Browser, page: &str) {
    let errors: Vec<String> = b
        .console_errors()
        .into_iter()
        // A refusal the test provoked on purpose shows as a failed load.
        .filter(|e| !e.contains("the server responded with a status of 40"))
        .collect();
    assert!(
        errors.is_empty(),
        "{page}: the browser logged errors: {errors:#?}"
    );
}

#[test]
fn console_in_a_real_browser() {
    if !browser::available() {
        panic!(
            "headless Chromium is missing: sudo scripts/test installs chromium and chromium-driver"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let outgoing = dir.path().join("outgoing");
    std::fs::create_dir_all(&outgoing).unwrap();
    let file = outgoing.join("drill-plan.pdf");
    std::fs::write(&file, tiandi_tests::pattern(3 << 20, 7)).unwrap();
    let ctl = ControllerProc::start_demo(
        &dir.path().join("ctl"),
        SITES,
        1.0,
        &format!("outgoing_dirs = [{outgoing:?}]\n"),
    );
    tiandi_tests::wait_for(
        "the demo's sites to connect",
        Duration::from_secs(60),
        || {
            ctl.api("/api/summary")
                .filter(|v| v["connected"].as_u64() == Some(SITES as u64))
        },
    );
    // The demo's mutual backup: two provinces' offices to the ministry, the ministry to the
    // first; each job's first run is due at once, verify and drill follow.
    let jobs = tiandi_tests::wait_for(
        "the demo's backup jobs to run",
        Duration::from_secs(120),
        || {
            let a = ctl.api("/api/backups")?;
            let jobs = a["jobs"].as_array()?.clone();
            (jobs.len() == 3
                && jobs.iter().all(|j| {
                    j["last_backup"]["ok"] == true
                        && j["last_verify"]["ok"] == true
                        && j["last_drill"]["ok"] == true
                }))
            .then_some(jobs)
        },
    );
    assert!(
        jobs.iter()
            .any(|j| j["site"] == "controller" && j["to"] == "bj-001"),
        "{jobs:?}"
    );
    let base = format!("http://{}", ctl.api);
    let b = Browser::start();

    // A page without a session goes to the login form, and back after it.
    log_in(&b, &base, "ops", &ctl.demo_password("ops"), "/sites");
    b.wait_css("table#sites-table tr[data-site]", T);
    assert_eq!(
        b.text("#sites-count").trim(),
        SITES.to_string(),
        "the table counts every site"
    );
    no_page_errors(&b, "sites");

    // Filter by province: the URL keeps it, only that province's rows remain.
    b.select("select#f-province", "SC");
    b.wait_js(
        "the table filtered to SC",
        "location.search.includes('province=SC') && [...document.querySelectorAll('table#sites-table tr[data-site]')].every(r => r.dataset.site.startsWith('sc-')) && document.querySelectorAll('table#sites-table tr[data-site]').length > 0",
        T,
    );
    let sc = ctl.api("/api/sites?province=SC").unwrap()["count"]
        .as_u64()
        .unwrap();
    assert_eq!(b.count("table#sites-table tr[data-site]") as u64, sc);
    shot(&b, "sites");

    // The backups page: the demo's three jobs, each with its last run, verify and drill.
    b.goto(&format!("{base}/backups"));
    b.wait_css("table#backups tr[data-job]", T);
    assert_eq!(b.count("table#backups tr[data-job]"), 3);
    assert!(
        b.text("table#backups").contains("bj-001-records"),
        "{}",
        b.text("table#backups")
    );
    assert_eq!(b.count("table#backups tr.s-failed"), 0);
    no_page_errors(&b, "backups");
    shot(&b, "backups");
    // The filter is in the URL: a shared link opens the same table.
    b.goto(&format!("{base}/sites?province=GD&sort=site_id&order=desc"));
    b.wait_js(
        "GD's sites, newest ID first",
        "document.querySelector('table#sites-table tr[data-site]')?.dataset.site === 'gd-002'",
        T,
    );

    // A site's page: its latest state and its history drawn as a chart.
    // The demo is young: its last hour (12 s buckets) holds several points, its last day one.
    b.goto(&format!("{base}/sites/gd-001?range=1h"));
    b.wait_css("div.chart[data-metric] canvas", T);
    b.wait_css("button.range.active[data-range='1h']", T);
    assert_eq!(b.text("h1#site-title").trim(), "gd-001");
    let points = b.wait_js(
        "a chart drawn from the server's downsampled history",
        r#"(n => n >= 2 ? n : null)(Math.max(0, ...[...document.querySelectorAll('div.chart[data-points]')]
             .map(c => +c.dataset.points)))"#,
        Duration::from_secs(45),
    );
    assert!(
        points.as_u64().unwrap() <= 300,
        "downsampled to the asked points: {points}"
    );
    let inked = b.wait_js(
        "a chart with a line drawn",
        r#"[...document.querySelectorAll('div.chart[data-metric] canvas')].some(c => {
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
             return n > 500; })"#,
        T,
    );
    assert_eq!(inked, json!(true));
    shot(&b, "site");
    no_page_errors(&b, "site");

    // Devices as they are in the field (the demo's showcase sites). ln-001's UPS implements
    // part of RFC 1628: its card lists what it answered and names each object it did not,
    // and says "unknown" for the runtime it does not give rather than 0.
    b.goto(&format!("{base}/sites/ln-001"));
    b.wait_css(
        "div.devcard[data-device='ups'] div.devproblems tr[data-kind]",
        T,
    );
    let kinds = b.js(
        "return [...document.querySelectorAll(\"div.devcard[data-device='ups'] div.devproblems tr[data-kind]\")].map(r => r.dataset.object + ':' + r.dataset.kind)",
        vec![],
    );
    let kinds: Vec<String> = serde_json::from_value(kinds).unwrap();
    assert!(kinds.len() >= 2, "{kinds:?}");
    assert!(
        kinds.iter().any(|k| k.ends_with(":wrong-type")),
        "{kinds:?}"
    );
    assert!(
        b.count("div.devcard[data-device='ups'] table.devvalues tr[data-object]") >= 1,
        "the values it did answer are shown"
    );
    let ups_line = b.text("div.devcard[data-device='ups'] div.devline");
    assert!(
        ups_line.contains("unknown") || ups_line.contains("未知"),
        "{ups_line}"
    );
    // The UPS alone does not degrade the site: nothing essential is missing.
    assert!(
        b.count("div.devcard[data-device='ups'].dev-bad") == 0,
        "a partial answer is not a bad device"
    );
    b.js(
        "document.querySelector(\"div.devcard[data-device='ups']\").scrollIntoView(); return 1",
        vec![],
    );
    shot(&b, "site-partial-ups");
    // Its certificate: valid for a year and more, not "expired in 1970" (seconds read as ms).
    let cert = &ctl.api("/api/sites/ln-001").unwrap()["certificate"];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let not_after = cert["not_after_ms"].as_i64().unwrap();
    assert!(not_after > now_ms + 300 * 86_400_000, "{cert}");
    let enrolled = cert["enrolled_ms"].as_i64().unwrap();
    assert!((now_ms - enrolled).abs() < 3_600_000, "{cert}");
    assert!(
        !b.text("body").contains("已过期"),
        "the certificate panel says expired"
    );
    no_page_errors(&b, "site-partial-ups");
    // hn-001's router answers neither SNMP nor an echo, nor does its next hop: the site's
    // checks say so and its conditions name the router.
    b.goto(&format!("{base}/sites/hn-001"));
    b.wait_css(
        "div#site-probes tr[data-target='next-hop'][data-ok='no']",
        T,
    );
    b.wait_css("div.devcard[data-device='router'].dev-bad span.devreach", T);
    let conds = b.text("body");
    assert!(
        conds.contains("router unreachable"),
        "the condition's detail names the router"
    );
    b.js(
        "document.querySelector('div.devcards').scrollIntoView(); return 1",
        vec![],
    );
    shot(&b, "site-unreachable-router");
    no_page_errors(&b, "site-unreachable-router");

    // The overview: a map of the 31 provinces coloured by their worst status.
    b.goto(&format!("{base}/"));
    b.wait_css("svg#map path[data-province][data-worst]", T);
    assert_eq!(b.count("svg#map path[data-province]"), 31);
    shot(&b, "overview");
    no_page_errors(&b, "overview");

    // A site goes down (revoked: its connection closes and it cannot come back) and the open
    // table shows it without a reload.
    b.goto(&format!("{base}/sites?q=xj-001"));
    b.wait_css("table#sites-table tr[data-site='xj-001'][data-status]", T);
    b.js("window.__notReloaded = true; return 1", vec![]);
    let out = ctl.cli(&["revoke", "--site", "xj-001"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.wait_js(
        "xj-001 shown down without a reload",
        "window.__notReloaded === true && document.querySelector(\"table#sites-table tr[data-site='xj-001']\")?.dataset.status === 'down'",
        Duration::from_secs(30),
    );

    // Acknowledge its alarm with a comment: who and when show on the page and in the API.
    b.goto(&format!("{base}/alarms"));
    let row = "table#active-alarms tr[data-site='xj-001'][data-alarm='site-down']";
    b.wait_css(row, T);
    b.click(&format!("{row} button.ack"));
    b.wait_css("form.ack-form textarea[name=comment]", T);
    b.fill(
        "form.ack-form textarea[name=comment]",
        "乌鲁木齐站：已派工程师检查 VSAT 终端",
    );
    b.click("form.ack-form button[type=submit]");
    b.wait_css(&format!("{row} td.acked"), T);
    assert!(b.text(&format!("{row} td.acked")).contains("ops"));
    let alarms = ctl.api("/api/alarms?site=xj-001").unwrap();
    let a = alarms["active"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alarm"] == "site-down")
        .expect("the active alarm");
    assert_eq!(a["ack"]["by"], "ops");
    assert!(a["ack"]["comment"].as_str().unwrap().contains("VSAT"));
    shot(&b, "alarms");

    // Send a file to a site and watch it arrive.
    b.goto(&format!("{base}/transfers"));
    b.wait_css("select#send-file option[value$='drill-plan.pdf']", T);
    b.select("select#send-file", &file.display().to_string());
    b.fill("input#send-to", "site:gd-001");
    b.click("form#send-form button[type=submit]");
    b.wait_css("table#transfers tr[data-dest='gd-001']", T);
    tiandi_tests::wait_for("the file delivered", Duration::from_secs(60), || {
        let t = ctl.api("/api/transfers").unwrap();
        t["transfers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["dest"] == "gd-001" && j["state"] == "delivered")
            .then_some(())
    });
    b.wait_js(
        "the page showing it delivered",
        "document.querySelector(\"table#transfers tr[data-dest='gd-001']\")?.innerText.includes('100')",
        T,
    );
    // It moved on the live stream's transfer events, not only by the page's slow poll.
    b.wait_js(
        "a transfer event shown in its row",
        "window.__tiandi.live.some(l => l.kind === 'transfer' && l.key.endsWith('/gd-001'))",
        T,
    );
    shot(&b, "transfers");
    let received = ctl.dir.join("data/demo-sites/gd-001/inbox/drill-plan.pdf");
    assert_eq!(
        std::fs::read(&received).unwrap(),
        std::fs::read(&file).unwrap()
    );

    // Conferences: the demo's room, and a roll call from the console.
    b.goto(&format!("{base}/conferences"));
    b.wait_css("div.room[data-room='demo'] button.rollcall", T);
    b.click("div.room[data-room='demo'] button.rollcall");
    tiandi_tests::wait_for("the roll call", T, || {
        ctl.api("/api/conferences").unwrap()["conferences"][0]["rollcall"]["id"].as_u64()
    });
    shot(&b, "conferences");

    // Administrators' pages.
    b.goto(&format!("{base}/admin/users"));
    b.wait_css("table#users tr[data-user='gd-ops']", T);
    shot(&b, "users");
    b.goto(&format!("{base}/admin/audit"));
    b.wait_css("table#audit tr", T);
    assert!(b.text("table#audit").contains("alarm-ack"));
    shot(&b, "audit");

    // A request that changes state without the session's CSRF token is refused.
    b.goto(&format!("{base}/sites"));
    b.wait_css("table#sites-table tr[data-site]", T);
    let (status, body) = fetch(
        &b,
        "POST",
        "/api/admin/revoke",
        Some(json!({"site_id": "gd-002"})),
        false,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("CSRF"), "{body}");
    assert!(
        ctl.api("/api/sites/gd-002").unwrap()["connected"] == json!(true),
        "the site was not revoked"
    );
    log_out(&b);

    // A province operator: GD only, by page, by API and by the live stream.
    log_in(&b, &base, "gd-ops", &ctl.demo_password("gd-ops"), "/sites");
    b.wait_css("table#sites-table tr[data-site]", T);
    let ids = b.js(
        "return [...document.querySelectorAll('table#sites-table tr[data-site]')].map(r => r.dataset.site)",
        vec![],
    );
    let ids = ids.as_array().unwrap();
    assert!(
        !ids.is_empty() && ids.iter().all(|s| s.as_str().unwrap().starts_with("gd-")),
        "{ids:?}"
    );
    assert_eq!(
        fetch(&b, "GET", "/api/sites?province=BJ", None, false).0,
        403
    );
    assert_eq!(fetch(&b, "GET", "/api/sites/bj-001", None, false).0, 404);
    let (_, all) = fetch(&b, "GET", "/api/sites?limit=10000", None, false);
    assert!(
        all["sites"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["province"] == "GD")
    );
    let (_, alarms) = fetch(&b, "GET", "/api/alarms", None, false);
    assert!(
        alarms["active"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["province"] == "GD"),
        "{alarms}"
    );
    let provinces = b.js_async(
        r#"const done = arguments[0]; const seen = new Set();
           const es = new EventSource('/api/stream?events=report,site,alarm');
           es.onmessage = m => seen.add(JSON.parse(m.data).province);
           setTimeout(() => { es.close(); done([...seen]); }, 4000);"#,
        vec![],
    );
    assert_eq!(
        provinces,
        json!(["GD"]),
        "the live stream carries GD's events only"
    );
    b.goto(&format!("{base}/sites/bj-001"));
    b.wait_js("the page settled", "document.documentElement.dataset.ready === '1' || document.querySelector('#toast')?.innerText", T);
    b.wait_css("div#site-missing", T);
    assert_eq!(
        (
            b.count("div.chart"),
            b.count("span#site-status"),
            b.count("button#revoke")
        ),
        (0, 0, 0),
        "no other province's site details: {}",
        b.text("main")
    );
    shot(&b, "province-operator");
    log_out(&b);

    // A viewer reads everything and changes nothing.
    log_in(&b, &base, "viewer", &ctl.demo_password("viewer"), "/sites");
    b.goto(&format!("{base}/sites/gd-002"));
    b.wait_css("h1#site-title", T);
    assert_eq!(b.count("button#revoke"), 0, "no revoke button for a viewer");
    for (path, body) in [
        ("/api/admin/revoke", json!({"site_id": "gd-002"})),
        (
            "/api/alarms/ack",
            json!({"site_id": "xj-001", "alarm": "site-down", "comment": "x"}),
        ),
        (
            "/api/admin/send",
            json!({"path": file.display().to_string(), "to": "all"}),
        ),
        (
            "/api/admin/users",
            json!({"op": "add", "name": "eve", "role": "admin", "password": "0123456789ab"}),
        ),
    ] {
        let (status, answer) = fetch(&b, "POST", path, Some(body), true);
        assert_eq!(status, 403, "{path}: {answer}");
    }
    log_out(&b);

    // The wall screen's kiosk account lands on the wall.
    log_in(&b, &base, "wall", &ctl.demo_password("wall"), "/wall");
    b.wait_css("svg#map path[data-province]", T);
    shot(&b, "wall");
    no_page_errors(&b, "wall");
    drop(b);

    // Everything above is in the audit log, in order.
    let audit = tiandi_tests::get_json_as(
        &format!("{base}/api/admin/audit?limit=1000"),
        Some(&ctl.admin_token()),
    )
    .unwrap();
    let actions: Vec<(String, String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("ops", "login", "ok"),
        ("ops", "alarm-ack", "ok"),
        ("ops", "send", "ok"),
        ("ops", "conference.rollcall", "ok"),
        ("gd-ops", "login", "ok"),
        ("wall", "login", "ok"),
    ] {
        assert!(
            actions
                .iter()
                .any(|(u, a, o)| u == want.0 && a == want.1 && o == want.2),
            "{want:?} not in the audit log: {actions:?}"
        );
    }
}
