//! The API's account routes: log in and out, who am I, change my password, my API tokens, and
//! the administrator's accounts and audit log. Logins are throttled ([`crate::sessions`]) and
//! every outcome goes to the audit log ([`crate::audit`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Core;
use crate::api::{AppError, bad, internal, run_admin_as};
use crate::auth::{Principal, SESSION_COOKIE, Via};
use crate::users::Role;

/// Argon2 checks at once (each takes ~19 MiB and tens of milliseconds): a flood of logins waits
/// here instead of exhausting memory or the cores.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

#[derive(Deserialize)]
pub struct Login {
    user: String,
    password: String,
}

fn session_cookie(value: &str, max_age_s: i64) -> HeaderValue {
    // Secure: browsers keep it for https and for the host itself (http://127.0.0.1,
    // http://localhost), the only places the console is served in clear.
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age_s}"
    ))
    .expect("a cookie of hex digits is a header value")
}

fn me_json(p: &Principal, csrf: Option<&str>) -> Value {
    json!({
        "user": p.user, "role": p.role.name(), "province": p.province(),
        "can_write": p.can_write(), "is_admin": p.is_admin(),
        "must_change": p.must_change, "csrf": csrf,
    })
}

/// `POST /api/login`: a session cookie for a good password; 401 otherwise (the same message
/// whether the account exists or not), 429 while the account or the address is held back.
pub async fn login(
    State(core): State<Arc<Core>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<Login>,
) -> Result<Response, AppError> {
    let addr = peer.ip().to_string();
    // The audit log and the throttle name the account as typed, cut to a sane length.
    let who: String = req.user.chars().take(64).collect();
    let audit = |outcome: &str| {
        let mut e = crate::audit::entry(&who, "", "login", "");
        e.addr = Some(addr.clone());
        e.with_outcome(outcome)
    };
    if let Some(wait_ms) = core.throttle.check(&who, &addr) {
        core.audit.record(audit("refused: throttled"));
        let wait = (wait_ms + 999) / 1000;
        return Ok((
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, wait.to_string())],
            Json(json!({
                "error": format!("too many failed logins for this account or from this address: try again in {} min", (wait + 59) / 60),
                "retry_after_s": wait,
            })),
        )
            .into_response());
    }
    let _permit = HASHING.acquire().await.map_err(internal)?;
    let users = core.users.clone();
    let (name, password) = (req.user.clone(), req.password);
    let user = tokio::task::spawn_blocking(move || users.verify_login(&name, &password))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let Some(user) = user else {
        core.throttle.failed(&who, &addr);
        core.audit.record(audit("refused: wrong user or password"));
        // Failing slowly costs a guesser more than it costs an operator with a typo.
        tokio::time::sleep(Duration::from_millis(300)).await;
        return Err(AppError(
            StatusCode::UNAUTHORIZED,
            "wrong user name or password".into(),
        ));
    };
    core.throttle.succeeded(&who);
    let kiosk = user.role == Role::Kiosk;
    let (cookie, session) = core
        .sessions
        .create(
            &user.name,
            kiosk,
            user.password_changed_ms,
            Some(addr.clone()),
        )
        .map_err(internal)?;
    let _ = core.users.note_login(&user.name);
    let mut e = audit("ok");
    e.role = user.role.to_string();
    core.audit.record(e);
    let l = core.sessions.lifetimes;
    let max_age = if kiosk {
        l.kiosk_absolute_ms
    } else {
        l.absolute_ms
    } / 1000;
    let p = Principal {
        user: user.name,
        role: user.role,
        via: Via::Session {
            cookie: cookie.clone(),
            csrf: session.csrf.clone(),
        },
        addr: Some(peer.ip()),
        must_change: user.must_change,
    };
    let mut resp = Json(me_json(&p, Some(&session.csrf))).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&cookie, max_age));
    Ok(resp)
}

/// `POST /api/logout`: ends the session.
pub async fn logout(State(core): State<Arc<Core>>, Extension(p): Extension<Principal>) -> Response {
    if let Via::Session { cookie, .. } = &p.via {
        core.sessions.end(cookie);
    }
    core.audit.record(p.audit("logout", ""));
    let mut resp = Json(json!({ "ok": true })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0));
    resp
}

/// `GET /api/me`.
pub async fn me(Extension(p): Extension<Principal>) -> Json<Value> {
    let csrf = match &p.via {
        Via::Session { csrf, .. } => Some(csrf.as_str()),
        _ => None,
    };
    Json(me_json(&p, csrf))
}

#[derive(Deserialize)]
pub struct PasswordChange {
    old: String,
    new: String,
}

/// `POST /api/me/password`: the old password, then the new one. Every other session of the
/// account ends (their password-change time no longer matches); this one is renewed.
pub async fn password(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<PasswordChange>,
) -> Result<Response, AppError> {
    let Via::Session { cookie, .. } = &p.via else {
        return Err(bad(
            "change a password from the console, or with `tiandi-controller user passwd`",
        ));
    };
    if req.old == req.new {
        return Err(bad("the new password is the old one"));
    }
    let _permit = HASHING.acquire().await.map_err(internal)?;
    let users = core.users.clone();
    let name = p.user.clone();
    let changed = tokio::task::spawn_blocking(move || {
        if users.verify_login(&name, &req.old)?.is_none() {
            return Ok(None);
        }
        users.set_password(&name, &req.new, false).map(Some)
    })
    .await
    .map_err(internal)?;
    let user = match changed {
        Ok(Some(u)) => u,
        Ok(None) => {
            core.audit.record(
                p.audit("password", &p.user)
                    .with_outcome("refused: wrong old password"),
            );
            return Err(AppError(
                StatusCode::FORBIDDEN,
                "the old password is wrong".into(),
            ));
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    core.audit.record(p.audit("password", &p.user));
    if user.name == crate::FIRST_ADMIN {
        let _ = std::fs::remove_file(core.config.data_dir.join(crate::FIRST_PASSWORD_FILE));
    }
    core.sessions.end(cookie);
    let (cookie, session) = core
        .sessions
        .create(
            &user.name,
            user.role == Role::Kiosk,
            user.password_changed_ms,
            p.addr.map(|a| a.to_string()),
        )
        .map_err(internal)?;
    let p = Principal {
        must_change: false,
        via: Via::Session {
            cookie: cookie.clone(),
            csrf: session.csrf.clone(),
        },
        ..p
    };
    let mut resp = Json(me_json(&p, Some(&session.csrf))).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&cookie, core.sessions.lifetimes.absolute_ms / 1000),
    );
    Ok(resp)
}

#[derive(Deserialize)]
pub struct NewToken {
    #[serde(default)]
    label: String,
}

/// `POST /api/me/tokens`: an API token with the caller's role, shown once.
pub async fn create_token(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<NewToken>,
) -> Result<Json<Value>, AppError> {
    if matches!(p.via, Via::FileToken) {
        return Err(bad(
            "the data directory's tokens have no account to make tokens for",
        ));
    }
    let (token, rec) = core
        .users
        .create_token(&p.user, &req.label)
        .map_err(|e| bad(e.to_string()))?;
    core.audit.record(
        p.audit("token.create", &p.user)
            .with_detail(&format!("{} {}", rec.id, rec.label)),
    );
    Ok(Json(
        json!({ "id": rec.id, "token": token, "label": rec.label }),
    ))
}

#[derive(Deserialize)]
pub struct TokenId {
    id: String,
}

/// `POST /api/me/tokens/revoke`.
pub async fn revoke_token(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<TokenId>,
) -> Result<Json<Value>, AppError> {
    let gone = core
        .users
        .revoke_token(&p.user, &req.id)
        .map_err(internal)?;
    if !gone {
        return Err(AppError(
            StatusCode::NOT_FOUND,
            format!("you have no token {:?}", req.id),
        ));
    }
    core.audit
        .record(p.audit("token.revoke", &p.user).with_detail(&req.id));
    Ok(Json(json!({ "revoked": req.id })))
}

/// `GET /api/admin/users`.
pub async fn users(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<crate::admin::UserAnswer>, AppError> {
    run_admin_as(&core, &p, crate::admin::UserRequest::List)
        .await
        .map(Json)
}

/// `POST /api/admin/users`.
pub async fn users_op(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<crate::admin::UserRequest>,
) -> Result<Json<crate::admin::UserAnswer>, AppError> {
    run_admin_as(&core, &p, req).await.map(Json)
}

#[derive(Deserialize)]
pub struct AuditQuery {
    limit: Option<usize>,
    before: Option<String>,
    user: Option<String>,
    action: Option<String>,
}

/// `GET /api/admin/audit`: newest first, a page at a time.
pub async fn audit(
    State(core): State<Arc<Core>>,
    Query(q): Query<AuditQuery>,
    _headers: HeaderMap,
) -> Result<Json<Value>, AppError> {
    let before = match &q.before {
        None => None,
        Some(c) => Some(hex::decode(c).map_err(|_| bad("`before` is not a cursor this API gave"))?),
    };
    for v in [&q.user, &q.action].into_iter().flatten() {
        if v.chars().count() > 100 {
            return Err(bad("a filter has at most 100 characters"));
        }
    }
    let limit = q.limit.unwrap_or(200);
    let a = core.audit.clone();
    let (entries, next) = tokio::task::spawn_blocking(move || {
        a.page(before.as_deref(), limit, 200_000, |e| {
            q.user.as_deref().is_none_or(|u| e.user == u)
                && q.action.as_deref().is_none_or(|x| e.action.starts_with(x))
        })
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    Ok(Json(
        json!({ "entries": entries, "next": next.map(hex::encode) }),
    ))
}
