//! The JSON API (dashboard, scripts, the CLI's admin commands) and the ops listener
//! (`/metrics`, `/health`).
//!
//! Every route needs a bearer token, checked from the request's head before any body is read
//! ([`crate::auth`]): `read.token` or `admin.token` for reads, `admin.token` for
//! `/api/admin/*`. Bodies are at most [`MAX_BODY_BYTES`]; lists are paged.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
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

use crate::admin::{
    AdminCall, AdminError, ConferenceRequest, EnrollBatchRequest, EnrollRequest, RegistryRequest,
    RevokeAnswer, RevokeRequest, SendRequest, TransfersAnswer, TransfersRequest,
};
use crate::sites::Status;
use crate::{Core, auth, now_ms};

pub struct AppError(StatusCode, String);

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

fn bad(msg: impl Into<String>) -> AppError {
    AppError(StatusCode::BAD_REQUEST, msg.into())
}
fn not_found(msg: impl Into<String>) -> AppError {
    AppError(StatusCode::NOT_FOUND, msg.into())
}
fn internal(e: impl std::fmt::Display) -> AppError {
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
    let tokens = core.tokens.clone();
    let reads = Router::new()
        .route("/api/sites", get(list_sites))
        .route("/api/sites/{id}", get(one_site))
        .route("/api/sites/{id}/history", get(history))
        .route("/api/alarms", get(alarms))
        .route("/api/stream", get(stream))
        .route("/api/summary", get(summary))
        .route(TransfersRequest::PATH, get(transfers))
        .route("/api/conferences", get(conferences))
        .route_layer(middleware::from_fn_with_state(tokens.clone(), auth::read));
    let admin = Router::new()
        .route(EnrollRequest::PATH, post(admin_post::<EnrollRequest>))
        .route(
            EnrollBatchRequest::PATH,
            post(admin_post::<EnrollBatchRequest>),
        )
        .route(RevokeRequest::PATH, post(admin_revoke))
        .route(RegistryRequest::PATH, get(admin_get::<RegistryRequest>))
        .route(SendRequest::PATH, post(admin_post::<SendRequest>))
        .route(ConferenceRequest::PATH, post(admin_conference))
        .route_layer(middleware::from_fn_with_state(tokens, auth::admin));
    reads
        .merge(admin)
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
    /// At most this many sites in the page (default 1,000, at most 10,000).
    limit: Option<usize>,
    /// The page after this site ID (the `next` of the previous page).
    after: Option<String>,
}

/// Sites matching the filters, by site ID, one page at a time: `count` is how many match in
/// all, `next` (when more follow) is the `after` of the next page.
async fn list_sites(State(core): State<Arc<Core>>, Query(q): Query<SitesQuery>) -> ApiResult {
    if let Some(p) = &q.province {
        name("province", p)?;
    }
    if let Some(a) = &q.after {
        name("site ID", a)?;
    }
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            bad(format!(
                "unknown status {s:?} (up, degraded, down, rain-fade, on-battery, disk-full)"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let (count, page, next) = core.sites.with_all(|all| {
        let mut matching: Vec<_> = all
            .filter(|s| q.province.as_deref().is_none_or(|p| s.province == p))
            .filter(|s| status.is_none_or(|st| s.status == st))
            .collect();
        matching.sort_unstable_by(|a, b| a.site_id.cmp(&b.site_id));
        let count = matching.len();
        let from = q
            .after
            .as_deref()
            .map_or(0, |a| matching.partition_point(|s| s.site_id.as_str() <= a));
        let rest = &matching[from..];
        let page: Vec<Value> = rest
            .iter()
            .take(limit)
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
            .collect();
        let next = (rest.len() > limit).then(|| rest[limit - 1].site_id.clone());
        (count, page, next)
    });
    Ok(Json(json!({ "count": count, "sites": page, "next": next })))
}

async fn one_site(State(core): State<Arc<Core>>, Path(id): Path<String>) -> ApiResult {
    name("site ID", &id)?;
    let s = core
        .sites
        .get(&id)
        .ok_or_else(|| not_found(format!("no site {id:?}")))?;
    let mut v = serde_json::to_value(&s).map_err(internal)?;
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
}

async fn history(
    State(core): State<Arc<Core>>,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult {
    name("site ID", &id)?;
    if core.sites.get(&id).is_none() {
        return Err(not_found(format!("no site {id:?}")));
    }
    let to = q.to.unwrap_or_else(now_ms);
    let from = q.from.unwrap_or(to - 3_600_000);
    if from > to {
        return Err(bad("`from` is after `to`"));
    }
    let limit = q.limit.unwrap_or(10_000).min(100_000);
    let store = core.store.clone();
    let reports = tokio::task::spawn_blocking(move || store.history(&id, from, to, limit))
        .await
        .map_err(internal)?
        .map_err(internal)?;
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
}

/// Most log entries one page of `/api/alarms` looks at (a filter matching few events returns
/// a short page and a cursor, rather than scanning the whole log).
const ALARM_SCAN: usize = 100_000;

/// Active alarms, and one page of the raise/clear log (oldest first within the page; `next`,
/// when set, is the `before` of the page of older events).
async fn alarms(State(core): State<Arc<Core>>, Query(q): Query<AlarmsQuery>) -> ApiResult {
    for (what, v) in [("site ID", &q.site), ("province", &q.province)] {
        if let Some(v) = v {
            name(what, v)?;
        }
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let since = q.since.unwrap_or(0);
    let before = match &q.before {
        None => None,
        Some(c) => Some(hex::decode(c).map_err(|_| bad("`before` is not a cursor this API gave"))?),
    };
    let (site, province) = (q.site.clone(), q.province.clone());
    let keep = move |s: &str, p: &str| {
        site.as_deref().is_none_or(|x| x == s) && province.as_deref().is_none_or(|x| x == p)
    };
    let store = core.store.clone();
    let k = keep.clone();
    let (mut log, next) = tokio::task::spawn_blocking(move || {
        store.alarms_page(since, before.as_deref(), limit, ALARM_SCAN, |e| {
            k(&e.site_id, &e.province)
        })
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    log.reverse();
    let active: Vec<Value> = core.sites.with_all(|all| {
        all.filter(|s| keep(&s.site_id, &s.province))
            .flat_map(|s| {
                s.conditions.iter().map(move |c| {
                    json!({"site_id": s.site_id, "province": s.province,
                           "alarm": c.condition, "detail": c.detail, "since_ms": c.since_ms})
                })
            })
            .collect()
    });
    Ok(Json(
        json!({ "active": active, "log": log, "next": next.map(hex::encode) }),
    ))
}

async fn stream(
    State(core): State<Arc<Core>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = BroadcastStream::new(core.events.subscribe());
    // The stream ends when the controller shuts down, so graceful shutdown does not wait on it.
    let cancel = core.cancel.clone();
    let s = futures_util::StreamExt::take_until(rx, async move { cancel.cancelled().await }).map(
        |item| {
            Ok(match item {
                Ok(ev) => SseEvent::default()
                    .json_data(&ev)
                    .unwrap_or_else(|_| SseEvent::default().comment("unencodable event")),
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    SseEvent::default().event("lagged").data(n.to_string())
                }
            })
        },
    );
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
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

async fn admin_post<R: AdminCall>(
    State(core): State<Arc<Core>>,
    Json(req): Json<R>,
) -> Result<Json<R::Answer>, AppError> {
    run_admin(&core, req).await.map(Json)
}

async fn admin_get<R: AdminCall + Default>(
    State(core): State<Arc<Core>>,
) -> Result<Json<R::Answer>, AppError> {
    run_admin(&core, R::default()).await.map(Json)
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
    headers: HeaderMap,
    Query(q): Query<SummaryQuery>,
) -> ApiResult {
    if q.count_history == Some(true) && core.tokens.scope(&headers) != Some(auth::Scope::Admin) {
        return Err(AppError(
            StatusCode::FORBIDDEN,
            "count_history scans the whole history: admin token only".into(),
        ));
    }
    let since = q.since.unwrap_or(i64::MAX);
    let (sites, connected, fresh, by_status, ids) = core.sites.with_all(|all| {
        let mut by: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let (mut n, mut c, mut f) = (0u64, 0u64, 0u64);
        let mut ids = Vec::new();
        for s in all {
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

async fn admin_revoke(
    State(core): State<Arc<Core>>,
    Json(req): Json<RevokeRequest>,
) -> Result<Json<RevokeAnswer>, AppError> {
    let site = req.site_id.clone();
    // The site's session sees the registry change and may close itself before we get here:
    // whether it was connected is known only before the revocation.
    let was_connected = core.is_connected(&site);
    let mut answer = run_admin(&core, req).await?;
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
    Query(q): Query<TransfersQuery>,
) -> Result<Json<TransfersAnswer>, AppError> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let mut answer = run_admin(&core, TransfersRequest {}).await?;
    let inbox = core.inbox.clone();
    answer.received = tokio::task::spawn_blocking(move || crate::transfers::received(&inbox))
        .await
        .map_err(internal)?
        .map_err(internal)?;
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
    })
}

async fn conferences(State(core): State<Arc<Core>>) -> ApiResult {
    let (relay, addr) = conference_relay(&core)?;
    let mut rooms: Vec<serde_json::Value> = relay
        .rooms()
        .iter()
        .filter(|r| !r.is_ended())
        .map(|r| room_json(r))
        .collect();
    rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
    Ok(Json(
        json!({ "relay": { "name": relay.name, "address": addr }, "conferences": rooms }),
    ))
}

async fn admin_conference(
    State(core): State<Arc<Core>>,
    Json(req): Json<ConferenceRequest>,
) -> ApiResult {
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
        ConferenceRequest::List => conferences(State(core.clone())).await,
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
