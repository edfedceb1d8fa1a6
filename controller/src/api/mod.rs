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
    AdminCall, AdminError, BackupsAnswer, BackupsRequest, ConferenceRequest, EnrollBatchRequest,
    EnrollRequest, RegistryRequest, RevokeAnswer, RevokeRequest, SendAnswer, SendRequest,
    TransfersAnswer, TransfersRequest, UserRequest,
};
use crate::auth::Principal;
use crate::sites::Status;
use crate::views::{self, Filter, LinkType, Severity, SortKey};
use crate::{Core, Event, account, auth, now_ms};

mod alarms;
mod conferences;
mod national;
mod sites;
mod stream;
mod transfers;

use alarms::*;
use conferences::*;
use national::*;
use sites::*;
use stream::*;
use transfers::*;

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
        .route(BackupsRequest::PATH, get(backups_list))
        .route("/api/conferences", get(conferences))
        .route("/api/national", get(national_provinces))
        .route("/api/national/alarms", get(national_alarms))
        .route("/api/national/{from}/sites", get(national_sites))
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
        .route(
            "/health/replica",
            get(|State(core): State<Arc<Core>>| async move { axum::Json(core.replica.status()) }),
        )
        .layer(DefaultBodyLimit::max(4096))
        .with_state(core)
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
    record_outcome(core, p, what, &result);
    result
}

/// Writes `p`'s action (if it is one the audit log keeps) with how it ended.
fn record_outcome<T>(
    core: &Core,
    p: &Principal,
    what: Option<(String, String)>,
    result: &Result<T, AppError>,
) {
    if let Some((action, target)) = what {
        let e = p.audit(&action, &target);
        core.audit.record(match result {
            Ok(_) => e,
            Err(AppError(code, msg)) => e.with_outcome(&format!("failed: {code} {msg}")),
        });
    }
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

#[derive(Deserialize)]
struct MetricsQuery {
    sites: Option<bool>,
}

/// `/metrics`: the controller's own metrics first, then the per-site families streamed as a
/// blocking task renders them (pieces of ~256 KB through a queue of 4; the sites' lock held
/// for 256 sites at a time). At 20,000 sites the exposition is ~130 MB: built whole it was
/// that much memory (and twice while it grew) and held ingest behind the lock for its
/// rendering (issue 22). A client that goes stops the rendering. `?sites=false` leaves the
/// per-site families out (a quick look at the controller's own counters: the benchmarks').
async fn metrics(
    State(core): State<Arc<Core>>,
    Query(q): Query<MetricsQuery>,
) -> impl IntoResponse {
    let mut head = core
        .metrics
        .render_own(core.wire_totals(), core.store.flush_count());
    match crate::transfers::status(&core.outbox) {
        Ok(jobs) => crate::metrics::render_transfers(&mut head, &jobs),
        Err(e) => tracing::warn!(error = %e, "Transfers left out of /metrics."),
    }
    if let Some((relay, _)) = &core.conference {
        head.push_str(&relay.exposition());
    }
    head.push_str(&core.replica.exposition());
    let (tx, rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(4);
    let _ = tx.try_send(axum::body::Bytes::from(head));
    let now = now_ms();
    let groups = if q.sites.unwrap_or(true) {
        core.config.metrics.site_series.clone()
    } else {
        Vec::new()
    };
    tokio::task::spawn_blocking(move || {
        crate::metrics::render_sites_chunked(&core.sites, &groups, now, |chunk| {
            tx.blocking_send(axum::body::Bytes::from(chunk)).is_ok()
        });
    });
    let body = axum::body::Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
