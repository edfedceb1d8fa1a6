//! The JSON API (dashboard, scripts, the CLI's admin commands) and the ops listener
//! (`/metrics`, `/health`).
//!
//! Every route but `POST /api/login` needs a caller, checked from the request's head before any
//! body is read ([`crate::auth`]): a console session, a user's API token, or the data
//! directory's `read.token`/`admin.token`. Reads are open to every role, filtered to a province
//! operator's province; changes need an administrator or a province operator (in their
//! province); accounts, the audit log, enrollment batches, the registry and conference control
//! need an administrator. Every change goes to the audit log. Bodies are at most
//! [`MAX_BODY_BYTES`]; lists are paged.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use axum::Extension;

use crate::admin::{
    AdminCall, AdminError, ConferenceRequest, EnrollBatchRequest, EnrollRequest, RegistryRequest,
    RevokeAnswer, RevokeRequest, SendAnswer, SendRequest, TransfersAnswer, TransfersRequest,
    UserRequest,
};
use crate::auth::Principal;
use crate::sites::Status;
use crate::views::{self, Filter, LinkType, Severity, SortKey};
use crate::{Core, Event, account, auth, now_ms};

pub struct AppError(pub StatusCode, pub String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<AdminError> for AppError {
    fn from(e: AdminError) -> Self {
        let code = match &e {
            AdminError::Bad(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) | AdminError::NeedsController(_) => StatusCode::NOT_FOUND,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        AppError(code, e.to_string())
    }
}

pub fn bad(msg: impl Into<String>) -> AppError {
    AppError(StatusCode::BAD_REQUEST, msg.into())
}
fn not_found(msg: impl Into<String>) -> AppError {
    AppError(StatusCode::NOT_FOUND, msg.into())
}
fn forbidden(msg: impl Into<String>) -> AppError {
    AppError(StatusCode::FORBIDDEN, msg.into())
}
pub fn internal(e: impl std::fmt::Display) -> AppError {
    AppError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

type ApiResult = Result<Json<Value>, AppError>;

/// A name from a path or a query: the one grammar, or 400 (before it touches a key).
fn name(what: &str, s: &str) -> Result<(), AppError> {
    tiandi_link::names::validate_name(what, s).map_err(|e| bad(e.to_string()))
}

/// Largest request body (an enrollment batch of 20,000 sites is about 1 MB).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

pub fn router(core: Arc<Core>) -> Router {
    let reads = Router::new()
        .route("/api/sites", get(list_sites))
        .route("/api/sites/{id}", get(one_site))
        .route("/api/sites/{id}/history", get(history))
        .route("/api/alarms", get(alarms))
        .route("/api/stream", get(stream))
        .route("/api/summary", get(summary))
        .route("/api/overview", get(overview))
        .route(TransfersRequest::PATH, get(transfers))
        .route("/api/conferences", get(conferences))
        .route("/api/me", get(account::me))
        .route("/api/logout", post(account::logout))
        .route("/api/me/password", post(account::password))
        .route("/api/me/tokens", post(account::create_token))
        .route("/api/me/tokens/revoke", post(account::revoke_token));
    let writes = Router::new()
        .route("/api/alarms/ack", post(ack_alarm))
        .route("/api/outgoing", get(outgoing))
        .route(EnrollRequest::PATH, post(admin_enroll))
        .route(RevokeRequest::PATH, post(admin_revoke))
        .route(SendRequest::PATH, post(admin_send))
        .route_layer(middleware::from_fn(auth::writer));
    let admin = Router::new()
        .route(
            EnrollBatchRequest::PATH,
            post(admin_post::<EnrollBatchRequest>),
        )
        .route(RegistryRequest::PATH, get(admin_get::<RegistryRequest>))
        .route(ConferenceRequest::PATH, post(admin_conference))
        .route(
            UserRequest::PATH,
            get(account::users).post(account::users_op),
        )
        .route("/api/admin/audit", get(account::audit))
        .route_layer(middleware::from_fn(auth::admin));
    let authenticated =
        reads
            .merge(writes)
            .merge(admin)
            .route_layer(middleware::from_fn_with_state(
                core.clone(),
                auth::authenticate,
            ));
    Router::new()
        .route("/api/login", post(account::login))
        .merge(authenticated)
        .merge(crate::console::router())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(core)
}

pub fn ops_router(core: Arc<Core>) -> Router {
    let metrics_route =
        Router::new()
            .route("/metrics", get(metrics))
            .route_layer(middleware::from_fn_with_state(
                core.tokens.clone(),
                auth::metrics,
            ));
    metrics_route
        .route("/health", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(4096))
        .with_state(core)
}

#[derive(Deserialize)]
struct SitesQuery {
    province: Option<String>,
    status: Option<String>,
    /// `satellite` or `terrestrial`.
    link: Option<String>,
    /// Part of the site ID.
    q: Option<String>,
    /// A column ([`SortKey::NAMES`]); default `site_id`.
    sort: Option<String>,
    /// `asc` (default) or `desc`.
    order: Option<String>,
    /// Skip this many matching sites.
    offset: Option<usize>,
    /// At most this many sites in the page (default 1,000, at most 10,000).
    limit: Option<usize>,
    /// The page after this site ID (the `next` of the previous page; sorted by site ID only).
    after: Option<String>,
}

/// The province a caller's list is limited to: theirs, or the one asked for. A province
/// operator asking for another province is refused, not answered with nothing.
fn scope_province(p: &Principal, asked: Option<&str>) -> Result<Option<String>, AppError> {
    if let Some(a) = asked {
        name("province", a)?;
    }
    match (p.province(), asked) {
        (Some(mine), Some(a)) if a != mine => Err(forbidden(format!(
            "{} may see province {mine} only, not {a}",
            p.user
        ))),
        (Some(mine), _) => Ok(Some(mine.to_string())),
        (None, a) => Ok(a.map(str::to_string)),
    }
}

/// Sites matching the filters, sorted, one page at a time: `count` is how many match in all;
/// `next` (sorted by site ID, when more follow) is the `after` of the next page.
async fn list_sites(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<SitesQuery>,
) -> ApiResult {
    if let Some(a) = &q.after {
        name("site ID", a)?;
    }
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            bad(format!(
                "unknown status {s:?} (up, degraded, down, rain-fade, on-battery, disk-full)"
            ))
        })?),
    };
    let link = match q.link.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some("satellite") => Some(LinkType::Satellite),
        Some("terrestrial") => Some(LinkType::Terrestrial),
        Some(other) => {
            return Err(bad(format!(
                "unknown link {other:?} (satellite, terrestrial)"
            )));
        }
    };
    let text = q.q.as_deref().map(str::trim).filter(|t| !t.is_empty());
    if let Some(t) = text
        && (t.len() > 64 || t.chars().any(|c| c.is_control()))
    {
        return Err(bad("`q` is at most 64 characters of text"));
    }
    let by = match q.sort.as_deref().filter(|s| !s.is_empty()) {
        None => SortKey::SiteId,
        Some(s) => SortKey::parse(s)
            .ok_or_else(|| bad(format!("unknown sort {s:?} ({})", SortKey::NAMES)))?,
    };
    let descending = match q.order.as_deref() {
        None | Some("") | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(bad(format!("unknown order {o:?} (asc, desc)"))),
    };
    let filter = Filter {
        province: scope_province(&p, q.province.as_deref().filter(|s| !s.is_empty()))?,
        status,
        link,
        text: text.map(str::to_string),
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let offset = q.offset.unwrap_or(0);
    let (count, page, next) = core.sites.with_all(|all| {
        let mut matching: Vec<_> = all.filter(|s| filter.matches(s)).collect();
        if by == SortKey::SiteId && !descending {
            matching.sort_unstable_by(|a, b| a.site_id.cmp(&b.site_id));
        } else {
            views::sort(&mut matching, by, descending);
        }
        let count = matching.len();
        let from = match q.after.as_deref() {
            Some(a) if by == SortKey::SiteId && !descending => {
                matching.partition_point(|s| s.site_id.as_str() <= a)
            }
            _ => offset.min(count),
        };
        let rest = &matching[from..];
        let page: Vec<Value> = rest
            .iter()
            .take(limit)
            .map(|s| serde_json::to_value(views::row(s)).unwrap_or(Value::Null))
            .collect();
        let next = (rest.len() > limit && by == SortKey::SiteId && !descending)
            .then(|| rest[limit - 1].site_id.clone());
        (count, page, next)
    });
    Ok(Json(
        json!({ "count": count, "offset": offset, "sites": page, "next": next }),
    ))
}

/// A site the caller may see, or 404 (a province operator learns nothing of other provinces'
/// sites, not even that they exist).
fn visible_site(core: &Core, p: &Principal, id: &str) -> Result<String, AppError> {
    name("site ID", id)?;
    core.sites
        .with_site(id, |s| s.province.clone())
        .filter(|prov| p.sees(prov))
        .ok_or_else(|| not_found(format!("no site {id:?}")))
}

async fn one_site(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    visible_site(&core, &p, &id)?;
    let s = core
        .sites
        .get(&id)
        .ok_or_else(|| not_found(format!("no site {id:?}")))?;
    let mut v = serde_json::to_value(&s).map_err(internal)?;
    let r = views::row(&s);
    v["link"] = serde_json::to_value(&r.link).map_err(internal)?;
    v["host"] = serde_json::to_value(&r.host).map_err(internal)?;
    v["certificate"] = match core.registry.get(&id) {
        Some(rec) => json!({
            "serial": rec.serial, "not_after_ms": rec.not_after, "enrolled_ms": rec.enrolled_at,
            "revoked_ms": rec.revoked_at, "role": rec.role,
        }),
        None => Value::Null,
    };
    v["latest"] = serde_json::to_value(&s.latest).map_err(internal)?;
    v["metrics"] = json!(
        s.latest
            .as_ref()
            .map(|r| tiandi_proto::series::series(r)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>())
            .unwrap_or_default()
    );
    Ok(Json(v))
}

#[derive(Deserialize)]
struct HistoryQuery {
    metric: String,
    from: Option<i64>,
    to: Option<i64>,
    limit: Option<usize>,
    /// Downsample into at most this many buckets of `[start, mean, min, max]` (at most 2,000).
    points: Option<usize>,
}

/// Reports a downsampled history reads at most (30 days at a 10 s interval is 259,200).
const HISTORY_SCAN: usize = 300_000;

async fn history(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult {
    visible_site(&core, &p, &id)?;
    if q.metric.len() > 200 || q.metric.chars().any(|c| c.is_control()) {
        return Err(bad(
            "`metric` is a metric name (GET /api/sites/{id} lists them)",
        ));
    }
    let to = q.to.unwrap_or_else(now_ms);
    let from = q.from.unwrap_or(to - 3_600_000);
    if from > to {
        return Err(bad("`from` is after `to`"));
    }
    let limit = match q.points {
        Some(_) => HISTORY_SCAN,
        None => q.limit.unwrap_or(10_000).min(100_000),
    };
    let store = core.store.clone();
    let reports = tokio::task::spawn_blocking(move || store.history(&id, from, to, limit))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    if let Some(n) = q.points {
        let n = n.clamp(1, 2000);
        let metric = q.metric.clone();
        let buckets = tokio::task::spawn_blocking(move || {
            let pts: Vec<(i64, f64)> = reports
                .iter()
                .filter_map(|r| tiandi_proto::series::value(r, &metric).map(|v| (r.taken_ms, v)))
                .collect();
            views::downsample(&pts, from, to, n)
        })
        .await
        .map_err(internal)?;
        return Ok(Json(
            json!({ "metric": q.metric, "from": from, "to": to, "points": buckets }),
        ));
    }
    let points: Vec<Value> = reports
        .iter()
        .filter_map(|r| {
            tiandi_proto::series::value(r, &q.metric).map(|v| {
                if r.samples > 1 {
                    json!([r.taken_ms, v, r.span_ms, r.samples])
                } else {
                    json!([r.taken_ms, v])
                }
            })
        })
        .collect();
    Ok(Json(
        json!({ "metric": q.metric, "from": from, "to": to, "points": points }),
    ))
}

#[derive(Deserialize)]
struct AlarmsQuery {
    since: Option<i64>,
    limit: Option<usize>,
    /// The `next` cursor of the previous page: events older than it.
    before: Option<String>,
    site: Option<String>,
    province: Option<String>,
    /// `critical`, `major` or `minor`.
    severity: Option<String>,
    /// One alarm (`site-down`, `rain-fade`, …).
    alarm: Option<String>,
}

/// Most log entries one page of `/api/alarms` looks at (a filter matching few events returns
/// a short page and a cursor, rather than scanning the whole log).
const ALARM_SCAN: usize = 100_000;
/// Active alarms one answer lists at most.
const ACTIVE_MAX: usize = 50_000;

/// Active alarms, and one page of the raise/clear log (oldest first within the page; `next`,
/// when set, is the `before` of the page of older events).
async fn alarms(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<AlarmsQuery>,
) -> ApiResult {
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let (site_q, alarm_q) = (nonempty(&q.site), nonempty(&q.alarm));
    for (what, v) in [("site ID", &site_q), ("alarm", &alarm_q)] {
        if let Some(v) = v {
            name(what, v)?;
        }
    }
    let province = scope_province(&p, nonempty(&q.province).as_deref())?;
    let severity = match nonempty(&q.severity) {
        None => None,
        Some(s) => Some(
            Severity::parse(&s)
                .ok_or_else(|| bad(format!("unknown severity {s:?} (critical, major, minor)")))?,
        ),
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let since = q.since.unwrap_or(0);
    let before = match &q.before {
        None => None,
        Some(c) => Some(hex::decode(c).map_err(|_| bad("`before` is not a cursor this API gave"))?),
    };
    let site = site_q;
    let keep = move |s: &str, p: &str, alarm: &str| {
        site.as_deref().is_none_or(|x| x == s)
            && province.as_deref().is_none_or(|x| x == p)
            && alarm_q.as_deref().is_none_or(|x| x == alarm)
            && severity.is_none_or(|x| Severity::of(alarm) == x)
    };
    let store = core.store.clone();
    let k = keep.clone();
    let (mut log, next) = tokio::task::spawn_blocking(move || {
        store.alarms_page(since, before.as_deref(), limit, ALARM_SCAN, |e| {
            k(&e.site_id, &e.province, &e.alarm)
        })
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    log.reverse();
    let log: Vec<Value> = log
        .into_iter()
        .map(|e| {
            let sev = Severity::of(&e.alarm);
            let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
            v["severity"] = json!(sev);
            v
        })
        .collect();
    let mut active: Vec<(String, String, &'static str, String, i64)> = core.sites.with_all(|all| {
        all.flat_map(|s| {
            s.conditions.iter().map(move |c| {
                (
                    s.site_id.clone(),
                    s.province.clone(),
                    c.condition.name(),
                    c.detail.clone(),
                    c.since_ms,
                )
            })
        })
        .filter(|(s, p, a, ..)| keep(s, p, a))
        .take(ACTIVE_MAX)
        .collect()
    });
    // Most urgent first, then newest.
    active.sort_by(|a, b| {
        Severity::of(a.2)
            .cmp(&Severity::of(b.2))
            .then(b.4.cmp(&a.4))
    });
    let active: Vec<Value> = active
        .into_iter()
        .map(|(site_id, province, alarm, detail, since_ms)| {
            let ack = core.acks.get(&site_id, alarm, since_ms);
            json!({"site_id": site_id, "province": province, "alarm": alarm,
                   "severity": Severity::of(alarm), "detail": detail, "since_ms": since_ms,
                   "ack": ack})
        })
        .collect();
    Ok(Json(
        json!({ "active": active, "log": log, "next": next.map(hex::encode) }),
    ))
}

#[derive(Deserialize)]
struct StreamQuery {
    /// Comma-separated kinds: `report`, `alarm`, `site` (default: all).
    events: Option<String>,
}

/// How often a console's event stream checks that its session still lives.
const STREAM_SESSION_CHECK: Duration = Duration::from_secs(5);

async fn stream(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, AppError> {
    let kinds: Vec<String> = match q.events.as_deref().filter(|e| !e.is_empty()) {
        None => vec!["report".into(), "alarm".into(), "site".into()],
        Some(list) => {
            let kinds: Vec<String> = list.split(',').map(|k| k.trim().to_string()).collect();
            if let Some(k) = kinds
                .iter()
                .find(|k| !["report", "alarm", "site", "transfer"].contains(&k.as_str()))
            {
                return Err(bad(format!(
                    "unknown event kind {k:?} (report, alarm, site, transfer)"
                )));
            }
            kinds
        }
    };
    let rx = BroadcastStream::new(core.events.subscribe());
    // The stream ends when the controller shuts down (graceful shutdown does not wait on it),
    // and when a console's session ends (logout, expiry, a disabled account).
    let cancel = core.cancel.clone();
    let session = match &p.via {
        auth::Via::Session { cookie, .. } => Some(cookie.clone()),
        _ => None,
    };
    let (c2, user) = (core.clone(), p.user.clone());
    let ended = async move {
        let mut every = tokio::time::interval(STREAM_SESSION_CHECK);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let alive = match &session {
                Some(c) => {
                    c2.sessions.peek(c).is_some_and(|s| s.user == user)
                        && c2
                            .users
                            .get(&user)
                            .ok()
                            .flatten()
                            .is_some_and(|u| !u.disabled)
                }
                None => true,
            };
            if !alive {
                return;
            }
        }
    };
    let s = futures_util::StreamExt::take_until(rx, ended).filter_map(move |item| match item {
        Ok(ev) => {
            if !p.sees(ev.province()) || !kinds.iter().any(|k| k == ev.kind()) {
                return None;
            }
            let ev = match ev {
                Event::Alarm(a) => {
                    let sev = Severity::of(&a.alarm);
                    let mut v = serde_json::to_value(Event::Alarm(a)).unwrap_or(Value::Null);
                    v["severity"] = json!(sev);
                    v
                }
                other => serde_json::to_value(other).unwrap_or(Value::Null),
            };
            Some(Ok(SseEvent::default().json_data(&ev).unwrap_or_else(
                |_| SseEvent::default().comment("unencodable event"),
            )))
        }
        Err(BroadcastStreamRecvError::Lagged(n)) => {
            Some(Ok(SseEvent::default().event("lagged").data(n.to_string())))
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// An admin request through its one dispatch ([`AdminCall::dispatch`]), off the async
/// threads (sled blocks).
async fn run_admin<R: AdminCall>(core: &Arc<Core>, req: R) -> Result<R::Answer, AppError> {
    let c = core.clone();
    tokio::task::spawn_blocking(move || req.dispatch(&c.admin()))
        .await
        .map_err(internal)?
        .map_err(AppError::from)
}

/// An admin request on behalf of `p`, written to the audit log with its outcome.
pub async fn run_admin_as<R: AdminCall>(
    core: &Arc<Core>,
    p: &Principal,
    req: R,
) -> Result<R::Answer, AppError> {
    let what = req.audit();
    let result = run_admin(core, req).await;
    if let Some((action, target)) = what {
        let e = p.audit(&action, &target);
        core.audit.record(match &result {
            Ok(_) => e,
            Err(AppError(code, msg)) => e.with_outcome(&format!("failed: {code} {msg}")),
        });
    }
    result
}

/// Writes a refusal of `p`'s request to the audit log and returns it.
fn refused(core: &Core, p: &Principal, action: &str, target: &str, e: AppError) -> AppError {
    core.audit.record(
        p.audit(action, target)
            .with_outcome(&format!("refused: {}", e.1)),
    );
    e
}

async fn admin_post<R: AdminCall>(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<R>,
) -> Result<Json<R::Answer>, AppError> {
    run_admin_as(&core, &p, req).await.map(Json)
}

async fn admin_get<R: AdminCall + Default>(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<R::Answer>, AppError> {
    run_admin_as(&core, &p, R::default()).await.map(Json)
}

/// Enrollment: an administrator anywhere, a province operator in their province.
async fn admin_enroll(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<<EnrollRequest as AdminCall>::Answer>, AppError> {
    if !p.sees(&req.province) {
        let e = forbidden(format!(
            "{} may enroll sites of province {} only",
            p.user,
            p.province().unwrap_or_default()
        ));
        return Err(refused(&core, &p, "enroll", &req.site_id, e));
    }
    if req.role != tiandi_link::pki::CertRole::Site && !p.is_admin() {
        let e = forbidden("only an administrator enrolls relays");
        return Err(refused(&core, &p, "enroll", &req.site_id, e));
    }
    run_admin_as(&core, &p, req).await.map(Json)
}

/// A send: a province operator may send to sites of their province (`site:ID` or
/// `province:CODE` of theirs), never to `all`.
async fn admin_send(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<SendRequest>,
) -> Result<Json<SendAnswer>, AppError> {
    if let Some(mine) = p.province() {
        let ok = match req.to.split_once(':') {
            Some(("province", code)) => code == mine,
            Some(("site", id)) => {
                name("site ID", id)?;
                core.registry.get(id).is_some_and(|r| r.province == mine)
            }
            _ => false,
        };
        if !ok {
            let e = forbidden(format!(
                "{} may send to sites of province {mine} only (site:ID or province:{mine})",
                p.user
            ));
            return Err(refused(&core, &p, "send", &req.to, e));
        }
    }
    run_admin_as(&core, &p, req).await.map(Json)
}

#[derive(serde::Serialize)]
struct OutgoingFile {
    path: String,
    name: String,
    bytes: u64,
    modified_ms: i64,
}

/// Files in the outgoing directories (what `send` may take), newest first, at most 2,000; only
/// the directories' own files, not their subdirectories.
async fn outgoing(State(core): State<Arc<Core>>) -> ApiResult {
    let dirs = core.config.outgoing_dirs();
    let files = tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        for d in &dirs {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            for e in rd.flatten().take(10_000) {
                let Ok(meta) = e.metadata() else { continue };
                let name = e.file_name().to_string_lossy().into_owned();
                if !meta.is_file() || tiandi_link::names::validate_file_name("file", &name).is_err()
                {
                    continue;
                }
                let modified_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as i64);
                files.push(OutgoingFile {
                    path: e.path().display().to_string(),
                    name,
                    bytes: meta.len(),
                    modified_ms,
                });
            }
        }
        files.sort_by_key(|f| std::cmp::Reverse(f.modified_ms));
        files.truncate(2000);
        files
    })
    .await
    .map_err(internal)?;
    Ok(Json(json!({ "files": files })))
}

#[derive(Deserialize)]
struct AckRequest {
    site_id: String,
    alarm: String,
    comment: String,
}

/// Acknowledges the active raising of an alarm on a site, with a comment.
async fn ack_alarm(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<AckRequest>,
) -> ApiResult {
    let target = format!("{} {}", req.site_id, req.alarm);
    let check = || -> Result<i64, AppError> {
        visible_site(&core, &p, &req.site_id)?;
        name("alarm", &req.alarm)?;
        crate::acks::check_comment(&req.comment).map_err(bad)?;
        core.sites
            .with_site(&req.site_id, |s| {
                s.conditions
                    .iter()
                    .find(|c| c.condition.name() == req.alarm)
                    .map(|c| c.since_ms)
            })
            .flatten()
            .ok_or_else(|| {
                not_found(format!(
                    "site {} has no active alarm {:?}",
                    req.site_id, req.alarm
                ))
            })
    };
    let since = match check() {
        Ok(s) => s,
        Err(e) => return Err(refused(&core, &p, "alarm-ack", &target, e)),
    };
    let ack = crate::acks::Ack {
        by: p.user.clone(),
        at_ms: now_ms(),
        comment: req.comment.trim().to_string(),
    };
    core.acks
        .put(&req.site_id, &req.alarm, since, &ack)
        .map_err(internal)?;
    core.audit
        .record(p.audit("alarm-ack", &target).with_detail(&ack.comment));
    Ok(Json(json!({ "ack": ack })))
}

#[derive(Deserialize)]
struct SummaryQuery {
    /// Count the sites whose latest sample was taken at or after this time (Unix ms).
    since: Option<i64>,
    /// Also count every stored history entry (a full scan: for audits and benchmarks).
    count_history: Option<bool>,
}

/// Counts for a wall display or a script: sites by status, connected, fresh since a time, and
/// how many distinct reports are stored.
async fn summary(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<SummaryQuery>,
) -> ApiResult {
    if q.count_history == Some(true) && !p.is_admin() {
        return Err(AppError(
            StatusCode::FORBIDDEN,
            "count_history scans the whole history: administrators only".into(),
        ));
    }
    let since = q.since.unwrap_or(i64::MAX);
    let (sites, connected, fresh, by_status, ids) = core.sites.with_all(|all| {
        let mut by: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let (mut n, mut c, mut f) = (0u64, 0u64, 0u64);
        let mut ids = Vec::new();
        for s in all.filter(|s| p.sees(&s.province)) {
            n += 1;
            c += u64::from(s.connected);
            f += u64::from(s.latest_taken_ms.is_some_and(|t| t >= since));
            *by.entry(s.status.as_str()).or_default() += 1;
            ids.push(s.site_id.clone());
        }
        (n, c, f, by, ids)
    });
    let store = core.store.clone();
    let count_history = q.count_history.unwrap_or(false);
    let (distinct, history) = tokio::task::spawn_blocking(move || {
        let mut distinct = 0u64;
        for id in &ids {
            if let Ok(st) = store.seq_state(id) {
                distinct +=
                    st.acked_through + st.ranges.iter().map(|(a, b)| b - a + 1).sum::<u64>();
            }
        }
        let history = count_history.then(|| store.history_entries());
        (distinct, history)
    })
    .await
    .map_err(internal)?;
    Ok(Json(json!({
        "sites": sites, "connected": connected, "fresh": fresh, "by_status": by_status,
        "stored_distinct": distinct, "history_entries": history,
        "reports_stored_since_start": core.metrics.reports.get(),
        "duplicates_since_start": core.metrics.duplicates.get(),
    })))
}

/// The controller's own resident memory, from `/proc/self/statm` (Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Everything the overview and the wall show, in one answer: sites by status and province,
/// active alarms by severity (with the newest), transfers in progress, conferences, and the
/// controller's own health. Filtered to a province operator's province.
async fn overview(State(core): State<Arc<Core>>, Extension(p): Extension<Principal>) -> ApiResult {
    let (sites, connected, by_status, provinces) = core
        .sites
        .with_all(|all| views::count(&mut all.filter(|s| p.sees(&s.province))));
    let mut active: Vec<(Severity, i64, Value)> = core.sites.with_all(|all| {
        all.filter(|s| p.sees(&s.province))
            .flat_map(|s| {
                s.conditions.iter().map(move |c| {
                    let alarm = c.condition.name();
                    (
                        Severity::of(alarm),
                        c.since_ms,
                        json!({"site_id": s.site_id, "province": s.province, "alarm": alarm,
                               "severity": Severity::of(alarm), "detail": c.detail,
                               "since_ms": c.since_ms}),
                    )
                })
            })
            .collect()
    });
    let mut by_severity: std::collections::BTreeMap<&str, u64> =
        [("critical", 0), ("major", 0), ("minor", 0)].into();
    for (sev, ..) in &active {
        *by_severity.entry(sev.as_str()).or_default() += 1;
    }
    let total_active = active.len();
    active.sort_by(|a, b| b.1.cmp(&a.1));
    let mut unacked = 0u64;
    for (_, since, v) in &active {
        let (site, alarm) = (
            v["site_id"].as_str().unwrap_or(""),
            v["alarm"].as_str().unwrap_or(""),
        );
        unacked += u64::from(core.acks.get(site, alarm, *since).is_none());
    }
    let recent: Vec<Value> = active
        .into_iter()
        .take(20)
        .map(|(_, since, mut v)| {
            let ack = core.acks.get(
                v["site_id"].as_str().unwrap_or(""),
                v["alarm"].as_str().unwrap_or(""),
                since,
            );
            v["ack"] = json!(ack);
            v
        })
        .collect();
    let mut jobs = run_admin(&core, TransfersRequest {}).await?.transfers;
    if p.province().is_some() {
        jobs.retain(|j| {
            core.sites
                .with_site(&j.dest, |s| p.sees(&s.province))
                .unwrap_or(false)
        });
    }
    let day_ago = now_ms() - 86_400_000;
    let count = |st: &[&str]| {
        jobs.iter()
            .filter(|j| st.contains(&j.state.as_str()))
            .count()
    };
    let (sending, queued, failed) = (
        count(&["sending"]),
        count(&["queued", "paused"]),
        count(&["failed"]),
    );
    let done_24h = jobs
        .iter()
        .filter(|j| j.state.as_str() == "delivered" && j.updated_ms >= day_ago)
        .count();
    jobs.retain(|j| !matches!(j.state.as_str(), "delivered" | "failed") || j.updated_ms >= day_ago);
    jobs.sort_by_key(|j| std::cmp::Reverse(j.updated_ms));
    jobs.truncate(10);
    let conferences: Vec<Value> = match &core.conference {
        None => Vec::new(),
        Some((relay, _)) => relay
            .rooms()
            .iter()
            .filter(|r| !r.is_ended())
            .map(|r| {
                let v = room_json_for(&core, &p, r);
                json!({"room": v["room"], "chair": v["chair"], "floor": v["floor"],
                       "participants": v["roster"].as_array().map_or(0, |r| r.len())})
            })
            .collect(),
    };
    let uptime_s = (now_ms() - core.started_ms).max(0) / 1000;
    Ok(Json(json!({
        "sites": sites, "connected": connected, "by_status": by_status, "provinces": provinces,
        "alarms": {"active": total_active, "by_severity": by_severity, "unacked": unacked,
                   "recent": recent},
        "transfers": {"active": sending, "queued": queued, "failed": failed,
                      "done_24h": done_24h, "recent": jobs},
        "conferences": conferences,
        "controller": {
            "version": env!("CARGO_PKG_VERSION"), "started_ms": core.started_ms,
            "uptime_s": uptime_s, "rss_bytes": rss_bytes(),
            "reports_per_s": core.report_rate(),
            "connected_sites": core.sites.with_all(|all| all.filter(|s| s.connected).count()),
            "sessions": core.sessions.len(),
        },
    })))
}

async fn admin_revoke(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<RevokeRequest>,
) -> Result<Json<RevokeAnswer>, AppError> {
    let site = req.site_id.clone();
    name("site ID", &site)?;
    if let Some(mine) = p.province()
        && core.registry.get(&site).is_none_or(|r| r.province != mine)
    {
        let e = not_found(format!("no site {site:?} in province {mine}"));
        return Err(refused(&core, &p, "revoke", &site, e));
    }
    // The site's session sees the registry change and may close itself before we get here:
    // whether it was connected is known only before the revocation.
    let was_connected = core.is_connected(&site);
    let mut answer = run_admin_as(&core, &p, req).await?;
    let closed_here = core.disconnect(
        &site,
        tiandi_proto::codes::REVOKED,
        "site certificate revoked",
    );
    answer.disconnected = was_connected || closed_here;
    let _ = core
        .conference
        .as_ref()
        .map(|(relay, _)| relay.evict_site(&site));
    tracing::warn!(%site, disconnected = answer.disconnected, "Site revoked.");
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct TransfersQuery {
    /// At most this many transfers, and files received, newest first (default 1,000, at
    /// most 10,000); `total_transfers` and `total_received` say how many there are.
    limit: Option<usize>,
}

async fn transfers(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<TransfersQuery>,
) -> Result<Json<TransfersAnswer>, AppError> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let mut answer = run_admin(&core, TransfersRequest {}).await?;
    let inbox = core.inbox.clone();
    answer.received = tokio::task::spawn_blocking(move || crate::transfers::received(&inbox))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    if p.province().is_some() {
        let sees = |site: &str| {
            core.sites
                .with_site(site, |s| p.sees(&s.province))
                .unwrap_or(false)
        };
        answer.transfers.retain(|j| sees(&j.dest));
        answer.received.retain(|r| sees(&r.from));
    }
    answer.total_transfers = answer.transfers.len();
    answer.total_received = answer.received.len();
    answer
        .transfers
        .sort_by_key(|j| std::cmp::Reverse(j.created_ms));
    answer.transfers.truncate(limit);
    answer.received.truncate(limit);
    Ok(Json(answer))
}

async fn metrics(State(core): State<Arc<Core>>) -> impl IntoResponse {
    let mut body = core.metrics.render(
        &core.sites,
        core.wire_totals(),
        core.store.flush_count(),
        now_ms(),
    );
    if let Some((relay, _)) = &core.conference {
        body.push_str(&relay.exposition());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// The conference relay and its address.
fn conference_relay(
    core: &Core,
) -> Result<&(Arc<tiandi_video::relay::Relay>, std::net::SocketAddr), AppError> {
    core.conference.as_ref().ok_or_else(|| {
        AppError(
            StatusCode::NOT_FOUND,
            "the conference relay is disabled (conference.enabled)".into(),
        )
    })
}

fn room_json(r: &tiandi_video::relay::Room) -> serde_json::Value {
    let f = r.floor();
    json!({
        "room": r.name,
        "chair": f.chair,
        "floor": f.holder,
        "tracks": r.track_keys().iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        "roster": r.roster(),
        "rollcall": r.current_roll_call().map(|(id, deadline_ms)| json!({"id": id, "deadline_ms": deadline_ms})),
    })
}

/// A room as a province operator sees it: the roster and tracks of their province's sites
/// only, the floor holder only if theirs.
fn room_json_for(core: &Core, p: &Principal, r: &tiandi_video::relay::Room) -> Value {
    let mut v = room_json(r);
    if p.province().is_none() {
        return v;
    }
    let sees = |site: &str| {
        core.sites
            .with_site(site, |s| p.sees(&s.province))
            .unwrap_or(false)
    };
    if let Some(roster) = v["roster"].as_array_mut() {
        roster.retain(|m| m["site"].as_str().is_some_and(sees));
    }
    if let Some(tracks) = v["tracks"].as_array_mut() {
        tracks.retain(|t| {
            t.as_str()
                .and_then(|t| t.split('/').next())
                .is_some_and(sees)
        });
    }
    if v["floor"].as_str().is_some_and(|f| !sees(f)) {
        v["floor"] = json!("(another province)");
    }
    v
}

async fn conferences(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    let (relay, addr) = conference_relay(&core)?;
    let mut rooms: Vec<serde_json::Value> = relay
        .rooms()
        .iter()
        .filter(|r| !r.is_ended())
        .map(|r| room_json_for(&core, &p, r))
        .collect();
    rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
    Ok(Json(
        json!({ "relay": { "name": relay.name, "address": addr }, "conferences": rooms }),
    ))
}

async fn admin_conference(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<ConferenceRequest>,
) -> ApiResult {
    let what = req.audit();
    let result = conference_op(&core, &p, req).await;
    if let Some((action, target)) = what {
        let e = p.audit(&action, &target);
        core.audit.record(match &result {
            Ok(_) => e,
            Err(AppError(code, msg)) => e.with_outcome(&format!("failed: {code} {msg}")),
        });
    }
    result
}

async fn conference_op(core: &Arc<Core>, p: &Principal, req: ConferenceRequest) -> ApiResult {
    let core = core.clone();
    let relay = &conference_relay(&core)?.0;
    // Every name in the request passes the one grammar before it names a room, a floor
    // holder or a recording's file.
    let (room_name, site_name) = match &req {
        ConferenceRequest::List => (None, None),
        ConferenceRequest::Create { room, chair } => (Some(room), chair.as_ref()),
        ConferenceRequest::Show { room }
        | ConferenceRequest::End { room }
        | ConferenceRequest::Rollcall { room, .. } => (Some(room), None),
        ConferenceRequest::Floor { room, site } | ConferenceRequest::Record { room, site, .. } => {
            (Some(room), site.as_ref())
        }
    };
    if let Some(r) = room_name {
        name("room", r)?;
    }
    if let Some(s) = site_name {
        name("site ID", s)?;
    }
    let find = |room: &str| {
        relay
            .find_room(room)
            .ok_or_else(|| not_found(format!("no conference {room:?}")))
    };
    match req {
        ConferenceRequest::List => conferences(State(core.clone()), Extension(p.clone())).await,
        ConferenceRequest::Create { room, chair } => {
            let chair = chair.unwrap_or_else(|| core.config.conference.chair.clone());
            let r = relay.create_room(&room, &chair);
            tracing::info!(%room, %chair, "Conference created.");
            Ok(Json(room_json(&r)))
        }
        ConferenceRequest::Show { room } => Ok(Json(room_json(find(&room)?.as_ref()))),
        ConferenceRequest::End { room } => {
            let r = find(&room)?;
            let out = room_json(&r);
            relay.end_room(&room);
            tracing::info!(%room, "Conference ended.");
            Ok(Json(out))
        }
        ConferenceRequest::Floor { room, site } => {
            let r = find(&room)?;
            tracing::info!(%room, holder = ?site, "Floor changed.");
            r.set_floor(site);
            Ok(Json(room_json(&r)))
        }
        ConferenceRequest::Record {
            room, stop: true, ..
        } => {
            let r = find(&room)?;
            let done = r.stop_recording().await.map_err(bad)?;
            Ok(Json(
                json!({ "room": room, "file": done.path, "written": done.stats, "speakers": done.speakers }),
            ))
        }
        ConferenceRequest::Record {
            room, site, format, ..
        } => {
            let r = find(&room)?;
            // A site, or (no site) whoever has the floor, the chair otherwise.
            let ext = format
                .unwrap_or(core.config.conference.recording_format)
                .extension();
            let file = format!(
                "{room}-{}-{}.{ext}",
                site.as_deref().unwrap_or("floor"),
                crate::now_ms() / 1000
            );
            let path = tiandi_link::names::join(
                &core.config.data_dir.join("recordings"),
                "recording",
                &file,
            )
            .map_err(|e| bad(e.to_string()))?;
            r.start_recording(site.as_deref(), &path)
                .await
                .map_err(bad)?;
            Ok(Json(
                json!({ "room": room, "recording": site, "file": path }),
            ))
        }
        ConferenceRequest::Rollcall { room, seconds } => {
            let r = find(&room)?;
            let id = r.roll_call(crate::now_ms() + seconds as i64 * 1000);
            Ok(Json(
                json!({ "room": room, "rollcall": id, "deadline_s": seconds }),
            ))
        }
    }
}
