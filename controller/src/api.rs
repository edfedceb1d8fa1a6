//! The JSON API (dashboard, scripts, the CLI's admin commands) and the ops listener
//! (`/metrics`, `/health`).
//!
//! Admin routes (`/api/admin/*`) need `Authorization: Bearer <data_dir/admin.token>`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::sites::Status;
use crate::{Core, now_ms};

pub struct AppError(StatusCode, String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
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

pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/api/sites", get(list_sites))
        .route("/api/sites/{id}", get(one_site))
        .route("/api/sites/{id}/history", get(history))
        .route("/api/alarms", get(alarms))
        .route("/api/stream", get(stream))
        .route("/api/summary", get(summary))
        .route("/api/admin/enroll", post(admin_enroll))
        .route("/api/admin/enroll-batch", post(admin_enroll_batch))
        .route("/api/admin/revoke", post(admin_revoke))
        .route("/api/admin/registry", get(admin_registry))
        .route("/api/admin/send", post(admin_send))
        .route("/api/transfers", get(transfers))
        .route("/api/conferences", get(conferences))
        .route("/api/admin/conference", post(admin_conference))
        .with_state(core)
}

pub fn ops_router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok\n" }))
        .with_state(core)
}

#[derive(Deserialize)]
struct SitesQuery {
    province: Option<String>,
    status: Option<String>,
}

async fn list_sites(State(core): State<Arc<Core>>, Query(q): Query<SitesQuery>) -> ApiResult {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            bad(format!(
                "unknown status {s:?} (up, degraded, down, rain-fade, on-battery, disk-full)"
            ))
        })?),
    };
    let mut list: Vec<Value> = core.sites.with_all(|all| {
        all.filter(|s| q.province.as_deref().is_none_or(|p| s.province == p))
            .filter(|s| status.is_none_or(|st| s.status == st))
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
            .collect()
    });
    list.sort_by(|a, b| a["site_id"].as_str().cmp(&b["site_id"].as_str()));
    Ok(Json(json!({ "count": list.len(), "sites": list })))
}

async fn one_site(State(core): State<Arc<Core>>, Path(id): Path<String>) -> ApiResult {
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
    site: Option<String>,
    province: Option<String>,
}

async fn alarms(State(core): State<Arc<Core>>, Query(q): Query<AlarmsQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let since = q.since.unwrap_or(0);
    let (site, province) = (q.site.clone(), q.province.clone());
    let store = core.store.clone();
    let log = tokio::task::spawn_blocking(move || store.alarms(since, usize::MAX))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let keep = |s: &str, p: &str| {
        site.as_deref().is_none_or(|x| x == s) && province.as_deref().is_none_or(|x| x == p)
    };
    let log: Vec<_> = log
        .into_iter()
        .filter(|e| keep(&e.site_id, &e.province))
        .collect();
    let log = &log[log.len().saturating_sub(limit)..];
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
    Ok(Json(json!({ "active": active, "log": log })))
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

fn check_admin(core: &Core, headers: &HeaderMap) -> Result<(), AppError> {
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare digests, so the comparison's timing says nothing about the token.
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    if digest(got).as_ref() == digest(&core.admin_token).as_ref() {
        Ok(())
    } else {
        Err(AppError(
            StatusCode::UNAUTHORIZED,
            "admin token required (Authorization: Bearer <data_dir/admin.token>)".into(),
        ))
    }
}

#[derive(Deserialize)]
struct EnrollBody {
    site_id: String,
    province: String,
    ttl_hours: Option<u32>,
}

async fn admin_enroll(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
    Json(b): Json<EnrollBody>,
) -> ApiResult {
    check_admin(&core, &headers)?;
    let ttl = Duration::from_secs(u64::from(b.ttl_hours.unwrap_or(core.config.token_hours)) * 3600);
    let t = core
        .registry
        .create_token(&b.site_id, &b.province, ttl)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Json(json!({
        "token": t.token, "site_id": t.site_id, "province": t.province, "expires_at": t.expires_at
    })))
}

#[derive(Deserialize)]
struct BatchBody {
    sites: Vec<BatchSite>,
    ttl_hours: Option<u32>,
}

#[derive(Deserialize)]
struct BatchSite {
    site_id: String,
    province: String,
}

async fn admin_enroll_batch(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
    Json(b): Json<BatchBody>,
) -> ApiResult {
    check_admin(&core, &headers)?;
    if b.sites.len() > 100_000 {
        return Err(bad("at most 100000 sites per batch"));
    }
    let ttl = Duration::from_secs(u64::from(b.ttl_hours.unwrap_or(core.config.token_hours)) * 3600);
    let list: Vec<(String, String)> = b
        .sites
        .into_iter()
        .map(|s| (s.site_id, s.province))
        .collect();
    let reg = core.registry.clone();
    let tokens = tokio::task::spawn_blocking(move || reg.create_tokens(&list, ttl))
        .await
        .map_err(internal)?
        .map_err(|e| bad(e.to_string()))?;
    let out: Vec<Value> = tokens
        .into_iter()
        .map(|t| json!({"site_id": t.site_id, "province": t.province, "token": t.token, "expires_at": t.expires_at}))
        .collect();
    Ok(Json(json!({ "tokens": out })))
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
async fn summary(State(core): State<Arc<Core>>, Query(q): Query<SummaryQuery>) -> ApiResult {
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

#[derive(Deserialize)]
struct RevokeBody {
    site_id: String,
}

async fn admin_revoke(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
    Json(b): Json<RevokeBody>,
) -> ApiResult {
    check_admin(&core, &headers)?;
    let rec = core.registry.revoke(&b.site_id).map_err(|e| match e {
        crate::registry::RegistryError::UnknownSite(_) => not_found(e.to_string()),
        other => internal(other),
    })?;
    let disconnected = core.disconnect(
        &b.site_id,
        tiandi_proto::codes::REVOKED,
        "site certificate revoked",
    );
    tracing::warn!(site = %b.site_id, disconnected, "Site revoked.");
    Ok(Json(
        json!({ "revoked": rec, "disconnected": disconnected }),
    ))
}

async fn admin_send(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
    Json(req): Json<crate::transfers::SendRequest>,
) -> ApiResult {
    check_admin(&core, &headers)?;
    let c = core.clone();
    let r = tokio::task::spawn_blocking(move || {
        crate::transfers::queue(&c.registry, &c.outbox, &c.config.relays, &req)
    })
    .await
    .map_err(internal)?;
    match r {
        Ok(v) => Ok(Json(v)),
        Err(crate::transfers::SendError::Transfer(e)) => {
            Err(AppError(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Err(e @ crate::transfers::SendError::UnknownDestination(_)) => {
            Err(not_found(e.to_string()))
        }
        Err(e) => Err(AppError(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

async fn transfers(State(core): State<Arc<Core>>) -> ApiResult {
    let mut v = crate::transfers::status(&core.outbox).map_err(internal)?;
    v["received"] = crate::transfers::received(&core.inbox).map_err(internal)?;
    Ok(Json(v))
}

async fn admin_registry(State(core): State<Arc<Core>>, headers: HeaderMap) -> ApiResult {
    check_admin(&core, &headers)?;
    Ok(Json(json!({ "sites": core.registry.list() })))
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

#[derive(Deserialize)]
struct ConferenceBody {
    /// create, show, end, floor, rollcall
    op: String,
    room: String,
    chair: Option<String>,
    /// floor: the site to give it to (none: take it back).
    site: Option<String>,
    /// rollcall: seconds to answer.
    seconds: Option<u64>,
    /// record: stop the recording instead of starting one.
    stop: Option<bool>,
    /// record: ts (the relay records MPEG-TS; `tiandi-video remux` makes mkv or mp4 of it).
    format: Option<crate::config::RecordingFormat>,
}

async fn admin_conference(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
    Json(b): Json<ConferenceBody>,
) -> ApiResult {
    check_admin(&core, &headers)?;
    let relay = &conference_relay(&core)?.0;
    let find = || {
        relay
            .find_room(&b.room)
            .ok_or_else(|| not_found(format!("no conference {:?}", b.room)))
    };
    match b.op.as_str() {
        "list" => conferences(State(core.clone())).await,
        "create" => {
            tiandi_link::pki::validate_name("room", &b.room)
                .map_err(|e| AppError(StatusCode::BAD_REQUEST, e.to_string()))?;
            let chair = b
                .chair
                .clone()
                .unwrap_or_else(|| core.config.conference.chair.clone());
            let r = relay.create_room(&b.room, &chair);
            tracing::info!(room = %b.room, %chair, "Conference created.");
            Ok(Json(room_json(&r)))
        }
        "show" => Ok(Json(room_json(find()?.as_ref()))),
        "end" => {
            let r = find()?;
            let out = room_json(&r);
            relay.end_room(&b.room);
            tracing::info!(room = %b.room, "Conference ended.");
            Ok(Json(out))
        }
        "floor" => {
            let r = find()?;
            r.set_floor(b.site.clone());
            tracing::info!(room = %b.room, holder = ?b.site, "Floor changed.");
            Ok(Json(room_json(&r)))
        }
        "record" if b.stop == Some(true) => {
            let r = find()?;
            let done = r
                .stop_recording()
                .await
                .map_err(|e| AppError(StatusCode::BAD_REQUEST, e))?;
            Ok(Json(
                json!({ "room": b.room, "file": done.path, "written": done.stats, "speakers": done.speakers }),
            ))
        }
        "record" => {
            let r = find()?;
            // A site, or (no site) whoever has the floor, the chair otherwise.
            let who = b.site.clone();
            let ext = b
                .format
                .unwrap_or(core.config.conference.recording_format)
                .extension();
            let path = core.config.data_dir.join("recordings").join(format!(
                "{}-{}-{}.{ext}",
                b.room,
                who.as_deref().unwrap_or("floor"),
                crate::now_ms() / 1000
            ));
            r.start_recording(who.as_deref(), &path)
                .await
                .map_err(|e| AppError(StatusCode::BAD_REQUEST, e))?;
            Ok(Json(
                json!({ "room": b.room, "recording": who, "file": path }),
            ))
        }
        "rollcall" => {
            let r = find()?;
            let secs = b.seconds.unwrap_or(30);
            let id = r.roll_call(crate::now_ms() + secs as i64 * 1000);
            Ok(Json(
                json!({ "room": b.room, "rollcall": id, "deadline_s": secs }),
            ))
        }
        other => Err(AppError(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown conference operation {other:?} (create, list, show, end, floor, rollcall, record)"
            ),
        )),
    }
}
