//! The web console: pages for network-operations staff, served by the controller itself with
//! every asset embedded in the binary (a NOC has no internet: no CDN, no download at run time,
//! no Node toolchain to build it).
//!
//! The server renders each page's shell (maud: header, navigation for the caller's role, the
//! strings of the chosen language, the CSRF token); `assets/console.js` fills it from the same
//! JSON API scripts use (no second data path) and follows the live stream (`/api/stream`).
//! Charts are uPlot (vendored, MIT), the map is Natural Earth's provinces (public domain):
//! `assets/LICENCES.md`. Chinese by default (`?lang=en` switches, kept in a cookie); times in
//! the viewer's zone (Beijing by default, the `tz` cookie).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::json;

use crate::Core;
use crate::auth::{Principal, Via};

/// An embedded file: its name under `/assets/`, its type and its bytes.
struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "console.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/console.js"),
    },
    Asset {
        name: "console.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../assets/console.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../assets/uPlot.min.css"),
    },
    Asset {
        name: "china-map.json",
        mime: "application/json",
        body: include_bytes!("../assets/china-map.json"),
    },
    Asset {
        name: "LICENCES.md",
        mime: "text/plain; charset=utf-8",
        body: include_bytes!("../assets/LICENCES.md"),
    },
];

const I18N: &str = include_str!("../assets/i18n.json");

/// The two languages: Chinese (default) and English.
pub const LANGS: [&str; 2] = ["zh-CN", "en"];

/// Every string of the console, by key and language.
fn strings() -> &'static BTreeMap<String, BTreeMap<String, String>> {
    static S: OnceLock<BTreeMap<String, BTreeMap<String, String>>> = OnceLock::new();
    S.get_or_init(|| serde_json::from_str(I18N).expect("assets/i18n.json is checked by a test"))
}

fn t(lang: &str, key: &str) -> String {
    strings()
        .get(key)
        .and_then(|m| m.get(lang))
        .cloned()
        .unwrap_or_else(|| key.to_string())
}

/// An asset's version for its URL (`?v=`): the start of its BLAKE3 hash, so a new binary's
/// assets are fetched again and an unchanged one is cached for good.
fn version(a: &Asset) -> &'static str {
    static V: OnceLock<Vec<String>> = OnceLock::new();
    let all = V.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| blake3::hash(a.body).to_hex()[..12].to_string())
            .collect()
    });
    let i = ASSETS
        .iter()
        .position(|x| x.name == a.name)
        .expect("an asset of the table");
    &all[i]
}

fn asset_url(name: &str) -> String {
    let a = ASSETS
        .iter()
        .find(|a| a.name == name)
        .expect("an asset of the table");
    format!("/assets/{name}?v={}", version(a))
}

/// The security headers of every page: scripts and styles from this origin only, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn router() -> Router<Arc<Core>> {
    Router::new()
        .route("/", get(|s, r| page(s, r, "overview")))
        .route("/sites", get(|s, r| page(s, r, "sites")))
        .route("/sites/{id}", get(site_page))
        .route("/alarms", get(|s, r| page(s, r, "alarms")))
        .route("/transfers", get(|s, r| page(s, r, "transfers")))
        .route("/backups", get(|s, r| page(s, r, "backups")))
        .route("/conferences", get(|s, r| page(s, r, "conferences")))
        .route("/wall", get(|s, r| page(s, r, "wall")))
        .route("/admin/users", get(|s, r| page(s, r, "users")))
        .route("/admin/audit", get(|s, r| page(s, r, "audit")))
        .route("/login", get(login_page))
        .route("/assets/{name}", get(asset))
}

async fn asset(Path(name): Path<String>, req: Request) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let etag = format!("\"{}\"", version(a));
    let versioned = req
        .uri()
        .query()
        .is_some_and(|q| q == format!("v={}", version(a)));
    let cache = if versioned {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut h = HeaderMap::new();
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, h).into_response();
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.mime));
    (h, a.body).into_response()
}

/// The page's language: `?lang=` (then kept in a cookie), the cookie, else Chinese.
fn lang_of(headers: &HeaderMap) -> &'static str {
    match crate::auth::cookie(headers, "lang") {
        Some("en") => "en",
        _ => "zh-CN",
    }
}

/// The viewer's time zone (an IANA name) from the `tz` cookie, else Beijing.
fn tz_of(headers: &HeaderMap) -> String {
    crate::auth::cookie(headers, "tz")
        .map(|z| z.replace("%2F", "/").replace("%2f", "/"))
        .filter(|z| {
            !z.is_empty()
                && z.len() <= 64
                && z.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '+' | '-'))
        })
        .unwrap_or_else(|| "Asia/Shanghai".into())
}

/// `?lang=en|zh-CN` on any page: set the cookie, and show the page again without it.
fn switch_lang(req: &Request) -> Option<Response> {
    let q = req.uri().query()?;
    let lang = q
        .split('&')
        .find_map(|kv| kv.strip_prefix("lang="))
        .filter(|l| LANGS.contains(l))?;
    let rest: Vec<&str> = q.split('&').filter(|kv| !kv.starts_with("lang=")).collect();
    let path = req.uri().path();
    let back = if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    let mut r = Redirect::to(&back).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "lang={lang}; Path=/; SameSite=Strict; Max-Age=31536000"
        ))
        .expect("a plain cookie"),
    );
    Some(r)
}

/// The path and query to come back to after logging in (only a path of this console).
fn next_of(req: &Request) -> String {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    url_encode(&pq)
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn site_page(
    State(core): State<Arc<Core>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    if tiandi_link::names::validate_name("site ID", &id).is_err() {
        return (StatusCode::NOT_FOUND, "no such site\n").into_response();
    }
    render(&core, req, "site", json!({ "site": id }))
}

async fn page(State(core): State<Arc<Core>>, req: Request, which: &'static str) -> Response {
    render(&core, req, which, json!({}))
}

async fn login_page(State(core): State<Arc<Core>>, req: Request) -> Response {
    if let Some(r) = switch_lang(&req) {
        return r;
    }
    let lang = lang_of(req.headers());
    let tz = tz_of(req.headers());
    // Already logged in: straight on.
    if let Ok(p) = crate::auth::principal(&core, &req)
        && !p.must_change
        && matches!(p.via, Via::Session { .. })
    {
        return Redirect::to(if p.role == crate::users::Role::Kiosk {
            "/wall"
        } else {
            "/"
        })
        .into_response();
    }
    html_response(shell(lang, &tz, "login", None, &json!({})))
}

fn render(core: &Core, req: Request, which: &'static str, params: serde_json::Value) -> Response {
    if let Some(r) = switch_lang(&req) {
        return r;
    }
    let lang = lang_of(req.headers());
    let tz = tz_of(req.headers());
    let p = match crate::auth::principal(core, &req) {
        Ok(p) if matches!(p.via, Via::Session { .. }) => p,
        // A page is the console's: log in (bearer tokens are for scripts).
        _ => return Redirect::to(&format!("/login?next={}", next_of(&req))).into_response(),
    };
    if p.must_change {
        return html_response(shell(lang, &tz, "login", Some(&p), &json!({})));
    }
    if matches!(which, "users" | "audit") && !p.is_admin() {
        let body = shell(lang, &tz, which, Some(&p), &params);
        let mut r = html_response(body);
        *r.status_mut() = StatusCode::FORBIDDEN;
        return r;
    }
    html_response(shell(lang, &tz, which, Some(&p), &params))
}

fn html_response(m: Markup) -> Response {
    let mut r = m.into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

/// Every alarm a site can have, most urgent first, with its severity as the API gives it: the
/// script's filters and badges come from here, so they cannot disagree with the server.
fn alarms() -> serde_json::Value {
    crate::sites::Condition::ALL
        .iter()
        .map(|c| {
            json!({"name": c.name(),
                   "severity": crate::views::Severity::of(c.name()).as_str()})
        })
        .collect()
}

/// The shell every page shares.
fn shell(
    lang: &str,
    tz: &str,
    which: &str,
    p: Option<&Principal>,
    params: &serde_json::Value,
) -> Markup {
    let csrf = p.and_then(|p| match &p.via {
        Via::Session { csrf, .. } => Some(csrf.clone()),
        _ => None,
    });
    let me = p.map(|p| {
        json!({"user": p.user, "role": p.role.name(), "province": p.province(),
               "can_write": p.can_write(), "is_admin": p.is_admin(),
               "must_change": p.must_change})
    });
    let i18n: BTreeMap<&str, String> = strings().keys().map(|k| (k.as_str(), t(lang, k))).collect();
    let boot = json!({
        "page": which, "lang": lang, "tz": tz, "me": me, "csrf": csrf, "params": params,
        "version": env!("CARGO_PKG_VERSION"), "i18n": i18n, "alarms": alarms(),
    });
    // In a <script> element only `</` could end it early: JSON escapes it as `<\/`.
    let boot = serde_json::to_string(&boot)
        .expect("boot serialises")
        .replace("</", "<\\/");
    let title = if which == "login" {
        t(lang, "nav.login")
    } else {
        t(lang, &format!("nav.{which}"))
    };
    let nav: &[&str] = match p {
        Some(p) if p.is_admin() => &[
            "overview",
            "sites",
            "alarms",
            "transfers",
            "backups",
            "conferences",
            "wall",
            "users",
            "audit",
        ],
        Some(_) => &[
            "overview",
            "sites",
            "alarms",
            "transfers",
            "backups",
            "conferences",
            "wall",
        ],
        None => &[],
    };
    let href = |n: &str| match n {
        "overview" => "/".to_string(),
        "users" | "audit" => format!("/admin/{n}"),
        n => format!("/{n}"),
    };
    html! {
        (DOCTYPE)
        html lang=(lang) data-page=(which) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width";
                // No favicon request (and no 404 in the console's log).
                link rel="icon" href="data:,";
                title { (t(lang, "app.title")) " · " (title) }
                link rel="stylesheet" href=(asset_url("console.css"));
                link rel="stylesheet" href=(asset_url("uPlot.min.css"));
                script id="boot" type="application/json" { (PreEscaped(boot)) }
                script defer src=(asset_url("uPlot.iife.min.js")) {}
                script defer src=(asset_url("console.js")) {}
            }
            body class={ "page-" (which) @if which == "wall" { " wall" } } {
                header id="top" {
                    a class="brand" href="/" { (t(lang, "app.title")) }
                    nav {
                        @for n in nav {
                            a data-nav=(n) href=(href(n)) { (t(lang, &format!("nav.{n}"))) }
                        }
                    }
                    span class="spacer" {}
                    @if let Some(p) = p {
                        span id="me" title=(p.role.to_string()) {
                            (p.user) " · " (t(lang, &format!("role.{}", p.role.name())))
                            @if let Some(pr) = p.province() { " " (pr) }
                        }
                    }
                    span class="langs" title=(t(lang, "settings.language")) {
                        a class="lang" data-lang="zh-CN" href="?lang=zh-CN" { "中文" }
                        a class="lang" data-lang="en" href="?lang=en" { "English" }
                    }
                    select id="tz" title=(t(lang, "settings.timezone")) {
                        @for z in ["Asia/Shanghai", "Asia/Urumqi", "UTC"] {
                            option value=(z) selected[z == tz] { (z) }
                        }
                        @if !["Asia/Shanghai", "Asia/Urumqi", "UTC"].contains(&tz) {
                            option value=(tz) selected { (tz) }
                        }
                    }
                    @if p.is_some() {
                        button id="logout" type="button" { (t(lang, "nav.logout")) }
                    }
                }
                main id="main" {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_string_has_both_languages_and_assets_are_there() {
        for (k, m) in strings() {
            for l in LANGS {
                assert!(
                    m.get(l).is_some_and(|s| !s.is_empty()),
                    "i18n.json: {k} has no {l}"
                );
            }
        }
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
        }
        let map: serde_json::Value =
            serde_json::from_slice(include_bytes!("../assets/china-map.json")).unwrap();
        for p in crate::demo::PROVINCES {
            assert!(map["provinces"][p]["d"].is_string(), "the map lacks {p}");
        }
    }

    #[test]
    fn every_key_the_script_names_has_its_strings() {
        let js = std::str::from_utf8(include_bytes!("../assets/console.js")).unwrap();
        // Keys written out whole: `T('site.paths')`.
        let mut keys: Vec<String> = js
            .split("T('")
            .skip(1)
            .filter_map(|rest| rest.split_once('\''))
            .filter(|(k, after)| {
                !k.is_empty()
                    && !k.ends_with('.')
                    && (after.starts_with(')') || after.starts_with(','))
            })
            .map(|(k, _)| k.to_string())
            .collect();
        // Keys in tables (`'paths.why.down'`), whole.
        keys.extend(
            js.match_indices("'paths.")
                .filter_map(|(at, _)| js[at + 1..].split_once('\'').map(|(k, _)| k))
                .filter(|k| !k.ends_with('.'))
                .map(str::to_string),
        );
        // Keys made from a value: a dual-homed site's path states and traffic classes, and the
        // alarm it raises.
        keys.extend(["up", "suspect", "down"].map(|s| format!("paths.state.{s}")));
        keys.extend(tiandi_link::paths::Class::ALL.map(|c| format!("paths.class.{}", c.as_str())));
        // Every alarm, and what a device's answer names: its status, its problems' kinds,
        // the severities of its alarms and events, how its reachability was checked.
        keys.extend(
            crate::sites::Condition::ALL
                .iter()
                .map(|c| format!("alarm.{}", c.name())),
        );
        keys.extend(
            ["ok", "timeout", "bad-answer", "error", "unknown"].map(|s| format!("dev.status.{s}")),
        );
        keys.extend(
            (0..=7)
                .map(|k| tiandi_proto::ProblemKind::try_from(k).unwrap().as_str())
                .map(|k| format!("dev.problem.{k}")),
        );
        keys.extend(
            ["unknown", "info", "warning", "minor", "major", "critical"]
                .map(|s| format!("sev.{s}")),
        );
        keys.extend(["icmp", "tcp", "unknown"].map(|k| format!("dev.reach.{k}")));
        assert!(keys.len() > 200, "{} keys", keys.len());
        for k in keys {
            assert!(
                strings().contains_key(&k),
                "console.js uses {k}, which i18n.json lacks"
            );
        }
    }

    #[test]
    fn the_page_gives_the_script_every_alarm_with_the_servers_severity() {
        let m = shell("en", "UTC", "alarms", None, &json!({})).into_string();
        let boot = m
            .split("<script id=\"boot\" type=\"application/json\">")
            .nth(1)
            .and_then(|r| r.split("</script>").next())
            .expect("the boot script");
        let v: serde_json::Value = serde_json::from_str(boot).unwrap();
        let alarms = v["alarms"].as_array().unwrap();
        assert_eq!(alarms.len(), crate::sites::Condition::ALL.len());
        assert_eq!(
            alarms[0],
            json!({"name": "site-down", "severity": "critical"})
        );
        for (name, sev) in [
            ("battery-low", "critical"),
            ("backup-failed", "major"),
            ("backup-overdue", "major"),
            ("device-unreachable", "major"),
            ("device-alarm", "major"),
            ("rain-fade", "minor"),
        ] {
            assert!(
                alarms.contains(&json!({"name": name, "severity": sev})),
                "{name} {sev}"
            );
        }
        // The script takes them from there (its own list is only a fallback).
        let js = std::str::from_utf8(include_bytes!("../assets/console.js")).unwrap();
        assert!(js.contains("BOOT.alarms"));
    }

    #[test]
    fn boot_json_cannot_close_its_script() {
        let m = shell(
            "en",
            "UTC",
            "site",
            None,
            &json!({"site": "</script><script>x"}),
        )
        .into_string();
        assert!(!m.contains("</script><script>x"), "{m}");
        assert!(m.contains("<\\/script>"));
    }
}
