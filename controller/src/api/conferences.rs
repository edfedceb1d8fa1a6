//! Conferences: rooms with their rosters (province-scoped) and conference control.

use super::*;

/// The conference relay and its address.
pub(super) fn conference_relay(
    core: &Core,
) -> Result<&(Arc<tiandi_video::relay::Relay>, std::net::SocketAddr), AppError> {
    core.conference.as_ref().ok_or_else(|| {
        AppError(
            StatusCode::NOT_FOUND,
            "the conference relay is disabled (conference.enabled)".into(),
        )
    })
}

pub(super) fn room_json(r: &tiandi_video::relay::Room) -> serde_json::Value {
    let f = r.floor();
    json!({
        "room": r.name,
        "chair": f.chair,
        "floor": f.holder,
        "tracks": r.track_keys().iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        "roster": r.roster(),
        "rollcall": r.current_roll_call().map(|(id, deadline_ms)| json!({"id": id, "deadline_ms": deadline_ms})),
    })
}

/// A room as a province operator sees it: the roster and tracks of their province's sites
/// only, the floor holder only if theirs.
pub(super) fn room_json_for(core: &Core, p: &Principal, r: &tiandi_video::relay::Room) -> Value {
    let mut v = room_json(r);
    if p.province().is_none() {
        return v;
    }
    let sees = |site: &str| {
        core.sites
            .with_site(site, |s| p.sees(&s.province))
            .unwrap_or(false)
    };
    if let Some(roster) = v["roster"].as_array_mut() {
        roster.retain(|m| m["site"].as_str().is_some_and(sees));
    }
    if let Some(tracks) = v["tracks"].as_array_mut() {
        tracks.retain(|t| {
            t.as_str()
                .and_then(|t| t.split('/').next())
                .is_some_and(sees)
        });
    }
    if v["floor"].as_str().is_some_and(|f| !sees(f)) {
        v["floor"] = json!("(another province)");
    }
    v
}

pub(super) async fn conferences(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    let (relay, addr) = conference_relay(&core)?;
    let mut rooms: Vec<serde_json::Value> = relay
        .rooms()
        .iter()
        .filter(|r| !r.is_ended())
        .map(|r| room_json_for(&core, &p, r))
        .collect();
    rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
    Ok(Json(
        json!({ "relay": { "name": relay.name, "address": addr }, "conferences": rooms }),
    ))
}

pub(super) async fn admin_conference(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<ConferenceRequest>,
) -> ApiResult {
    let what = req.audit();
    let result = conference_op(&core, &p, req).await;
    record_outcome(&core, &p, what, &result);
    result
}

pub(super) async fn conference_op(
    core: &Arc<Core>,
    p: &Principal,
    req: ConferenceRequest,
) -> ApiResult {
    let core = core.clone();
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
        ConferenceRequest::List => conferences(State(core.clone()), Extension(p.clone())).await,
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
