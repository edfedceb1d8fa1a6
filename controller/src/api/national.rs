//! The ministry's national view (tier two, [`crate::federation`]): the provinces with their
//! sites' counts, one province's sites, and the national alarm log. A province operator sees
//! their own province only; a controller that lists no province controllers answers 404.

use super::*;

fn national(core: &Core) -> Result<&crate::federation::National, AppError> {
    core.national.as_deref().ok_or_else(|| {
        not_found("this controller holds no national view (no [national] provinces)")
    })
}

/// Whether a province controller's link is up, and its report interval.
fn link(core: &Core, from: &str) -> (bool, i64) {
    (
        core.is_connected(from),
        core.sites
            .with_site(from, |s| s.interval_ms)
            .unwrap_or(10_000),
    )
}

/// `GET /api/national`: every province the caller may see, with its figures.
pub(super) async fn national_provinces(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    let n = national(&core)?;
    let provinces = n.provinces(now_ms(), |prov| p.sees(prov), |from| link(&core, from));
    let sites: usize = provinces.iter().map(|v| v.known_sites).sum();
    Ok(Json(json!({ "provinces": provinces, "sites": sites })))
}

#[derive(Deserialize)]
pub(super) struct NationalSitesQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/national/{from}/sites?after=&limit=`: one province controller's sites, in site
/// order, a page at a time (at most 1,000).
pub(super) async fn national_sites(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Path(from): Path<String>,
    Query(q): Query<NationalSitesQuery>,
) -> ApiResult {
    name("province controller", &from)?;
    if let Some(a) = &q.after {
        name("site ID", a)?;
    }
    let n = national(&core)?;
    let limit = q.limit.unwrap_or(500).clamp(1, 1000);
    let sites = n
        .sites(
            &from,
            q.after.as_deref(),
            limit,
            now_ms(),
            |prov| p.sees(prov),
            link(&core, &from),
        )
        .ok_or_else(|| not_found(format!("no province controller {from}")))?;
    let next = (sites.len() == limit)
        .then(|| sites.last().map(|s| s.summary.site_id.clone()))
        .flatten();
    Ok(Json(json!({ "from": from, "sites": sites, "next": next })))
}

#[derive(Deserialize)]
pub(super) struct NationalAlarmsQuery {
    limit: Option<usize>,
}

/// `GET /api/national/alarms?limit=`: the provinces' alarm events, newest first (at most
/// 1,000).
pub(super) async fn national_alarms(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<NationalAlarmsQuery>,
) -> ApiResult {
    let n = national(&core)?;
    let limit = q.limit.unwrap_or(200).clamp(1, 1000);
    Ok(Json(
        json!({ "alarms": n.alarms(limit, |prov| p.sees(prov)) }),
    ))
}
