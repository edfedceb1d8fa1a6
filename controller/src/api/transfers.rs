//! Transfers: sending a file (to a site, a province or all), the files that may be sent,
//! the transfers and their receipts (province-scoped).

use super::*;

/// A send: a province operator may send to sites of their province (`site:ID` or
/// `province:CODE` of theirs), never to `all`.
pub(super) async fn admin_send(
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
pub(super) struct OutgoingFile {
    path: String,
    name: String,
    bytes: u64,
    modified_ms: i64,
}

/// Files in the outgoing directories (what `send` may take), newest first, at most 2,000; only
/// the directories' own files, not their subdirectories.
pub(super) async fn outgoing(State(core): State<Arc<Core>>) -> ApiResult {
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
pub(super) struct TransfersQuery {
    /// At most this many transfers, and files received, newest first (default 1,000, at
    /// most 10,000); `total_transfers` and `total_received` say how many there are.
    limit: Option<usize>,
}

pub(super) async fn transfers(
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

/// Backup jobs; a province operator sees those of the province's sites.
pub(super) async fn backups_list(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<BackupsAnswer>, AppError> {
    let mut answer = run_admin(&core, BackupsRequest {}).await?;
    if p.province().is_some() {
        answer.jobs.retain(|j| p.sees(&j.province));
    }
    Ok(Json(answer))
}
