//! Sites: the list (filtered, sorted, paged, province-scoped), one site, its history
//! (downsampled on request), the summary and the console's overview; enrolling and revoking.

use super::*;

#[derive(Deserialize)]
pub(super) struct SitesQuery {
    province: Option<String>,
    status: Option<String>,
    /// `satellite` or `terrestrial`.
    link: Option<String>,
    /// Part of the site ID.
    q: Option<String>,
    /// `lost`: only dual-homed sites down to one path (`path-redundancy-lost`).
    redundancy: Option<String>,
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
pub(super) fn scope_province(
    p: &Principal,
    asked: Option<&str>,
) -> Result<Option<String>, AppError> {
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
pub(super) async fn list_sites(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<SitesQuery>,
) -> Result<Response, AppError> {
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
    let redundancy_lost = match q.redundancy.as_deref().filter(|s| !s.is_empty()) {
        None => false,
        Some("lost") => true,
        Some(other) => return Err(bad(format!("unknown redundancy {other:?} (lost)"))),
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
        redundancy_lost,
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let offset = q.offset.unwrap_or(0);
    // By site ID ascending, `after` (a cursor) skips what the caller has; otherwise `offset`.
    let cursor = q
        .after
        .as_deref()
        .filter(|_| by == SortKey::SiteId && !descending);
    // Under the sites' read lock: filter, select the page (a linear selection and a sort of
    // the page, not of every site), and write the answer out, with no copy of a site.
    let page = |all: &mut dyn Iterator<Item = &crate::sites::SiteState>| {
        let mut matching: Vec<_> = all.filter(|s| filter.matches(s)).collect();
        let count = matching.len();
        let from = match cursor {
            Some(a) => {
                matching.retain(|s| s.site_id.as_str() > a);
                0
            }
            None => offset.min(count),
        };
        // One row past the page: whether there is a next page.
        views::sort_first(
            &mut matching,
            by,
            descending,
            from.saturating_add(limit + 1),
        );
        let rest = &matching[from.min(matching.len())..];
        let next = (rest.len() > limit && by == SortKey::SiteId && !descending)
            .then(|| rest[limit - 1].site_id.as_str());
        let page: Vec<views::SiteRow> = rest.iter().take(limit).map(|s| views::row(s)).collect();
        serde_json::to_vec(&SitesPage {
            count,
            offset,
            sites: page,
            next,
        })
    };
    let body = match filter.province.as_deref() {
        Some(code) => core.sites.with_province(code, page),
        None => core.sites.with_all(page),
    };
    let body = body.map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(serde::Serialize)]
struct SitesPage<'a> {
    count: usize,
    offset: usize,
    sites: Vec<views::SiteRow<'a>>,
    next: Option<&'a str>,
}

/// A site the caller may see, or 404 (a province operator learns nothing of other provinces'
/// sites, not even that they exist).
pub(super) fn visible_site(core: &Core, p: &Principal, id: &str) -> Result<String, AppError> {
    name("site ID", id)?;
    core.sites
        .with_site(id, |s| s.province.clone())
        .filter(|prov| p.sees(prov))
        .ok_or_else(|| not_found(format!("no site {id:?}")))
}

/// Device events one site's answer lists (its newest).
pub(super) const SITE_EVENTS: usize = 100;

pub(super) async fn one_site(
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
            // The registry keeps Unix seconds (the certificate's own resolution).
            "serial": rec.serial, "not_after_ms": rec.not_after.saturating_mul(1000),
            "enrolled_ms": rec.enrolled_at.saturating_mul(1000),
            "revoked_ms": rec.revoked_at.map(|t| t.saturating_mul(1000)), "role": rec.role,
        }),
        None => Value::Null,
    };
    v["latest"] = serde_json::to_value(&s.latest).map_err(internal)?;
    // What its devices said on their own (traps, informs), newest first.
    let store = core.store.clone();
    let site = id.clone();
    let events = tokio::task::spawn_blocking(move || store.device_events(&site, SITE_EVENTS))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    v["events"] = serde_json::to_value(&events).map_err(internal)?;
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
pub(super) struct HistoryQuery {
    metric: String,
    from: Option<i64>,
    to: Option<i64>,
    limit: Option<usize>,
    /// Downsample into at most this many buckets of `[start, mean, min, max]` (at most 2,000).
    points: Option<usize>,
}

/// Reports a downsampled history reads at most (30 days at a 10 s interval is 259,200).
pub(super) const HISTORY_SCAN: usize = 300_000;

pub(super) async fn history(
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

/// Enrollment: an administrator anywhere, a province operator in their province.
pub(super) async fn admin_enroll(
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

#[derive(Deserialize)]
pub(super) struct SummaryQuery {
    /// Count the sites whose latest sample was taken at or after this time (Unix ms).
    since: Option<i64>,
    /// Also count every stored history entry (a full scan: for audits and benchmarks).
    count_history: Option<bool>,
}

/// Counts for a wall display or a script: sites by status, connected, fresh since a time, and
/// how many distinct reports are stored.
pub(super) async fn summary(
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
    // What is stored is counted only when asked for (a look at every site's sequence state,
    // under the store's lock: a script polling the summary every 100 ms during a reconnection
    // storm must not slow ingest down).
    let count_history = q.count_history.unwrap_or(false);
    let (sites, connected, fresh, by_status, ids) = core.sites.with_all(|all| {
        let mut by: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let (mut n, mut c, mut f) = (0u64, 0u64, 0u64);
        let mut ids = Vec::new();
        for s in all.filter(|s| p.sees(&s.province)) {
            n += 1;
            c += u64::from(s.connected);
            f += u64::from(s.latest_taken_ms.is_some_and(|t| t >= since));
            *by.entry(s.status.as_str()).or_default() += 1;
            if count_history {
                ids.push(s.site_id.clone());
            }
        }
        (n, c, f, by, ids)
    });
    let store = core.store.clone();
    let (distinct, history) = if count_history {
        tokio::task::spawn_blocking(move || {
            let mut distinct = 0u64;
            for id in &ids {
                if let Ok(st) = store.seq_state(id) {
                    distinct +=
                        st.acked_through + st.ranges.iter().map(|(a, b)| b - a + 1).sum::<u64>();
                }
            }
            (Some(distinct), Some(store.history_entries()))
        })
        .await
        .map_err(internal)?
    } else {
        (None, None)
    };
    Ok(Json(json!({
        "sites": sites, "connected": connected, "fresh": fresh, "by_status": by_status,
        "stored_distinct": distinct, "history_entries": history,
        "reports_stored_since_start": core.metrics.reports.get(),
        "duplicates_since_start": core.metrics.duplicates.get(),
    })))
}

/// The controller's own resident memory, from `/proc/self/statm` (Linux).
pub(super) fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Everything the overview and the wall show, in one answer: sites by status and province,
/// active alarms by severity (with the newest), transfers in progress, conferences, and the
/// controller's own health. Filtered to a province operator's province.
pub(super) async fn overview(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
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
    active.sort_by_key(|a| std::cmp::Reverse(a.1));
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

pub(super) async fn admin_revoke(
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
