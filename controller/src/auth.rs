//! Who may call what on the controller's HTTP listeners.
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
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tiandi_link::secrets::{load_or_create_token, same_secret};

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

fn refuse(status: StatusCode, msg: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": msg }))).into_response()
}

/// `None` if the request may go on, else the refusal to send.
fn require(tokens: &Tokens, headers: &HeaderMap, need: Scope) -> Option<Response> {
    match tokens.scope(headers) {
        Some(s) if s >= need => None,
        Some(_) => Some(refuse(
            StatusCode::FORBIDDEN,
            "this token may only read: admin routes need the admin token (data_dir/admin.token)",
        )),
        None => Some(refuse(
            StatusCode::UNAUTHORIZED,
            match need {
                Scope::Read => {
                    "a token is required (Authorization: Bearer <data_dir/read.token or admin.token>)"
                }
                Scope::Admin => {
                    "admin token required (Authorization: Bearer <data_dir/admin.token>)"
                }
            },
        )),
    }
}

/// Middleware of the read routes.
pub async fn read(
    State(tokens): State<std::sync::Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    match require(&tokens, req.headers(), Scope::Read) {
        None => next.run(req).await,
        Some(r) => r,
    }
}

/// Middleware of the admin routes: runs before the body is read.
pub async fn admin(
    State(tokens): State<std::sync::Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    match require(&tokens, req.headers(), Scope::Admin) {
        None => next.run(req).await,
        Some(r) => r,
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
        assert!(require(&t, &with(&read), Scope::Admin).is_some());
        assert!(require(&t, &with(&admin), Scope::Read).is_none());
    }
}
