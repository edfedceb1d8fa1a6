//! The live stream (`/api/stream`, Server-Sent Events): reports, site changes, alarms, device
//! events and transfers, filtered to what the caller may see; it ends with the caller's
//! session.

use super::*;

#[derive(Deserialize)]
pub(super) struct StreamQuery {
    /// Comma-separated kinds: `report`, `alarm`, `site`, `transfer`, `path`, `device-event`
    /// (default: all but `transfer`).
    events: Option<String>,
}

/// The kinds of events the stream carries.
const KINDS: [&str; 6] = [
    "report",
    "alarm",
    "site",
    "transfer",
    "path",
    "device-event",
];

/// How often a console's event stream checks that its session still lives.
pub(super) const STREAM_SESSION_CHECK: Duration = Duration::from_secs(5);

pub(super) async fn stream(
    State(core): State<Arc<Core>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, AppError> {
    let kinds: Vec<String> = match q.events.as_deref().filter(|e| !e.is_empty()) {
        None => vec![
            "report".into(),
            "alarm".into(),
            "site".into(),
            "path".into(),
            "device-event".into(),
        ],
        Some(list) => {
            let kinds: Vec<String> = list.split(',').map(|k| k.trim().to_string()).collect();
            if let Some(k) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
                return Err(bad(format!(
                    "unknown event kind {k:?} ({})",
                    KINDS.join(", ")
                )));
            }
            kinds
        }
    };
    let rx = BroadcastStream::new(core.events.subscribe());
    // The stream ends when the controller shuts down (graceful shutdown does not wait on it),
    // and when a console's session ends (logout, expiry, a disabled account).
    let cancel = core.cancel.clone();
    let session = match &p.via {
        auth::Via::Session { cookie, .. } => Some(cookie.clone()),
        _ => None,
    };
    let (c2, user) = (core.clone(), p.user.clone());
    let ended = async move {
        let mut every = tokio::time::interval(STREAM_SESSION_CHECK);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let alive = match &session {
                Some(c) => {
                    c2.sessions.peek(c).is_some_and(|s| s.user == user)
                        && c2
                            .users
                            .get(&user)
                            .ok()
                            .flatten()
                            .is_some_and(|u| !u.disabled)
                }
                None => true,
            };
            if !alive {
                return;
            }
        }
    };
    let s = futures_util::StreamExt::take_until(rx, ended).filter_map(move |item| match item {
        Ok(ev) => {
            if !p.sees(ev.province()) || !kinds.iter().any(|k| k == ev.kind()) {
                return None;
            }
            let ev = match ev {
                Event::Alarm(a) => {
                    let sev = Severity::of(&a.alarm);
                    let mut v = serde_json::to_value(Event::Alarm(a)).unwrap_or(Value::Null);
                    v["severity"] = json!(sev);
                    v
                }
                other => serde_json::to_value(other).unwrap_or(Value::Null),
            };
            Some(Ok(SseEvent::default().json_data(&ev).unwrap_or_else(
                |_| SseEvent::default().comment("unencodable event"),
            )))
        }
        Err(BroadcastStreamRecvError::Lagged(n)) => {
            Some(Ok(SseEvent::default().event("lagged").data(n.to_string())))
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
