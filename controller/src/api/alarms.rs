//! Alarms: active and logged, filtered and province-scoped, with their acknowledgements;
//! acknowledging one.

use super::*;

#[derive(Deserialize)]
pub(super) struct AlarmsQuery {
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
pub(super) const ALARM_SCAN: usize = 100_000;
/// Active alarms one answer lists at most.
pub(super) const ACTIVE_MAX: usize = 50_000;

/// Active alarms, and one page of the raise/clear log (oldest first within the page; `next`,
/// when set, is the `before` of the page of older events).
pub(super) async fn alarms(
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
pub(super) struct AckRequest {
    site_id: String,
    alarm: String,
    comment: String,
}

/// Acknowledges the active raising of an alarm on a site, with a comment.
pub(super) async fn ack_alarm(
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
