//! Who may call what on the controller's HTTP listeners.
//!
//! Every API route first learns who calls ([`principal`]): a console session (cookie, with a
//! CSRF token on every request that changes state), a user's API token (`tdu_…`, the user's
//! role), or one of the data directory's tokens below. Then the route group checks the role
//! ([`writer`], [`admin`]) and the handler filters by province ([`Principal::sees`]).
//!
//! - `admin.token` (scope admin): every route, the `/api/admin/*` ones only with it.
//! - `read.token` (scope read): every read route (`GET /api/...`): sites, alarms, history,
//!   transfers, conferences, the event stream.
//! - `metrics.token`: `/metrics` when the ops listener is not on loopback (Prometheus's
//!   `authorization: credentials_file`); on loopback `/metrics` is open to the host.
//!
//! Each token lives in the data directory, made on first start (32 random bytes, hex, 0600);
//! the controller refuses to start with one that is empty, short or readable by others
//! ([`tiandi_link::secrets`]). The credential is checked from the request's head, before its
//! body is read; tokens are compared in constant time.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tiandi_link::secrets::{load_or_create_token, same_secret};

use crate::users::Role;

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Admin,
}

/// The controller's bearer tokens.
pub struct Tokens {
    admin: String,
    read: String,
    /// `Some` when `/metrics` needs a token (ops listener off loopback).
    metrics: Option<String>,
}

impl Tokens {
    /// Loads (or makes, on first start) the tokens in `data_dir`.
    pub fn load(data_dir: &Path, metrics_needs_token: bool) -> anyhow::Result<Tokens> {
        let admin = load_or_create_token(&data_dir.join("admin.token"), "admin token")?;
        let read = load_or_create_token(&data_dir.join("read.token"), "read token")?;
        let metrics = if metrics_needs_token {
            Some(load_or_create_token(
                &data_dir.join("metrics.token"),
                "metrics token",
            )?)
        } else {
            None
        };
        Ok(Tokens {
            admin,
            read,
            metrics,
        })
    }

    /// The admin token (the demo prints how to use it; the CLI reads the file itself).
    pub fn admin(&self) -> &str {
        &self.admin
    }

    /// The scope the request's bearer token carries, if any. Both comparisons always run, so
    /// the time taken says nothing about which token nearly matched.
    pub fn scope(&self, headers: &HeaderMap) -> Option<Scope> {
        let got = bearer(headers)?;
        let admin = same_secret(got, &self.admin);
        let read = same_secret(got, &self.read);
        if admin {
            Some(Scope::Admin)
        } else if read {
            Some(Scope::Read)
        } else {
            None
        }
    }

    fn metrics_ok(&self, headers: &HeaderMap) -> bool {
        match &self.metrics {
            None => true,
            Some(t) => bearer(headers).is_some_and(|got| same_secret(got, t)),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "tiandi_session";
/// The header a console request that changes state carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A cookie's value from the request head.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// How a caller proved who it is.
#[derive(Clone, Debug)]
pub enum Via {
    /// The console: a session cookie, and the session's CSRF token.
    Session { cookie: String, csrf: String },
    /// A user's API token.
    UserToken,
    /// `admin.token` or `read.token` from the data directory (the CLI, scripts on the host).
    FileToken,
}

/// Who is calling, and what their role lets them see and do. Every route gets one from
/// [`authenticate`]; handlers filter what they answer with [`Principal::sees`].
#[derive(Clone, Debug)]
pub struct Principal {
    pub user: String,
    pub role: Role,
    pub via: Via,
    pub addr: Option<std::net::IpAddr>,
    /// The password must be changed before anything else.
    pub must_change: bool,
}

impl Principal {
    /// Whether sites of `province` are visible to this caller.
    pub fn sees(&self, province: &str) -> bool {
        match &self.role {
            Role::Province(p) => p == province,
            _ => true,
        }
    }
    /// The one province this caller is limited to, if any.
    pub fn province(&self) -> Option<&str> {
        self.role.province()
    }
    /// Whether it may change anything (an administrator, or a province operator in their
    /// province).
    pub fn can_write(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Province(_))
    }
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
    /// An audit entry of `action` on `target` by this caller.
    pub fn audit(&self, action: &str, target: &str) -> crate::audit::AuditEntry {
        crate::audit::AuditEntry {
            addr: self.addr.map(|a| a.to_string()),
            ..crate::audit::entry(&self.user, &self.role.to_string(), action, target)
        }
    }
}

fn refuse(status: StatusCode, msg: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": msg }))).into_response()
}

fn refuse_boxed(status: StatusCode, msg: &str) -> Box<Response> {
    Box::new(refuse(status, msg))
}

/// The caller's address, when the listener recorded it.
pub fn client_addr(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Routes a caller may use before changing a password it was given.
const WHILE_MUST_CHANGE: [&str; 3] = ["/api/me", "/api/me/password", "/api/logout"];

/// Who the request comes from: a bearer token (the data directory's, or a user's), else the
/// console's session cookie. Checked from the head, before any body is read. A console request
/// that changes state must carry the session's CSRF token; an account that must change its
/// password may do nothing else first.
pub fn principal(core: &crate::Core, req: &Request) -> Result<Principal, Box<Response>> {
    let headers = req.headers();
    let addr = client_addr(req);
    let p = if let Some(got) = bearer(headers) {
        match core.tokens.scope(headers) {
            Some(scope) => Principal {
                user: match scope {
                    Scope::Admin => "admin.token",
                    Scope::Read => "read.token",
                }
                .into(),
                role: match scope {
                    Scope::Admin => Role::Admin,
                    Scope::Read => Role::Viewer,
                },
                via: Via::FileToken,
                addr,
                must_change: false,
            },
            None => match core.users.token_user(got) {
                Ok(Some((_, u))) => Principal {
                    user: u.name,
                    role: u.role,
                    via: Via::UserToken,
                    addr,
                    must_change: false,
                },
                Ok(None) => {
                    return Err(refuse_boxed(
                        StatusCode::UNAUTHORIZED,
                        "unknown or revoked token (Authorization: Bearer <a user's API token, \
                         data_dir/read.token or data_dir/admin.token>)",
                    ));
                }
                Err(e) => {
                    return Err(refuse_boxed(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &e.to_string(),
                    ));
                }
            },
        }
    } else if let Some(c) = cookie(headers, SESSION_COOKIE) {
        let live = core.sessions.get(c).and_then(|s| {
            let u = core.users.get(&s.user).ok().flatten()?;
            (!u.disabled && u.password_changed_ms == s.password_changed_ms).then_some((s, u))
        });
        let Some((s, u)) = live else {
            return Err(refuse_boxed(
                StatusCode::UNAUTHORIZED,
                "your session has ended: log in again",
            ));
        };
        if !matches!(req.method(), &Method::GET | &Method::HEAD) {
            let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !sent.is_some_and(|t| same_secret(t, &s.csrf)) {
                return Err(refuse_boxed(
                    StatusCode::FORBIDDEN,
                    "this request changes state and lacks the session's CSRF token \
                     (header X-CSRF-Token): reload the page",
                ));
            }
        }
        Principal {
            user: u.name,
            role: u.role,
            via: Via::Session {
                cookie: c.to_string(),
                csrf: s.csrf,
            },
            addr,
            must_change: u.must_change,
        }
    } else {
        return Err(refuse_boxed(
            StatusCode::UNAUTHORIZED,
            "log in, or send a token (Authorization: Bearer <a user's API token, \
             data_dir/read.token or data_dir/admin.token>)",
        ));
    };
    if p.must_change && !WHILE_MUST_CHANGE.contains(&req.uri().path()) {
        return Err(refuse_boxed(
            StatusCode::FORBIDDEN,
            "change your password first (POST /api/me/password)",
        ));
    }
    Ok(p)
}

/// Middleware of every authenticated route: puts the [`Principal`] into the request.
pub async fn authenticate(
    State(core): State<std::sync::Arc<crate::Core>>,
    mut req: Request,
    next: Next,
) -> Response {
    match principal(&core, &req) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(r) => *r,
    }
}

fn caller(req: &Request) -> Option<&Principal> {
    req.extensions().get::<Principal>()
}

/// Middleware of routes that change something: administrators and province operators (the
/// handler checks the province).
pub async fn writer(req: Request, next: Next) -> Response {
    match caller(&req) {
        Some(p) if p.can_write() => next.run(req).await,
        Some(p) => refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "{} ({}) may only read: this needs an administrator or a province operator{}",
                p.user,
                p.role,
                if matches!(p.via, Via::FileToken) {
                    " (or data_dir/admin.token)"
                } else {
                    ""
                }
            ),
        ),
        None => refuse(StatusCode::UNAUTHORIZED, "not authenticated"),
    }
}

/// Middleware of the administrator's routes.
pub async fn admin(req: Request, next: Next) -> Response {
    match caller(&req) {
        Some(p) if p.is_admin() => next.run(req).await,
        Some(p) => refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "{} ({}) may not do this: administrators only (data_dir/admin.token, or an \
                 account with the admin role)",
                p.user, p.role
            ),
        ),
        None => refuse(StatusCode::UNAUTHORIZED, "not authenticated"),
    }
}

/// Middleware of `/metrics`.
pub async fn metrics(
    State(tokens): State<std::sync::Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    if tokens.metrics_ok(req.headers()) {
        next.run(req).await
    } else {
        refuse(
            StatusCode::UNAUTHORIZED,
            "metrics token required (Authorization: Bearer <data_dir/metrics.token>)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn scopes() {
        let d = tempfile::tempdir().unwrap();
        let t = Tokens::load(d.path(), true).unwrap();
        let admin = std::fs::read_to_string(d.path().join("admin.token")).unwrap();
        let read = std::fs::read_to_string(d.path().join("read.token")).unwrap();
        let metrics = std::fs::read_to_string(d.path().join("metrics.token")).unwrap();
        assert_eq!(t.scope(&with(&admin)), Some(Scope::Admin));
        assert_eq!(t.scope(&with(&read)), Some(Scope::Read));
        assert_eq!(t.scope(&with(&metrics)), None);
        assert_eq!(t.scope(&with("")), None);
        assert_eq!(t.scope(&HeaderMap::new()), None);
        assert!(t.metrics_ok(&with(&metrics)));
        assert!(!t.metrics_ok(&with(&read)));
    }
}
