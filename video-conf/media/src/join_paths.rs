//! `tiandi-video join --path …`: a dual-homed site in a conference (issue 20). A session is
//! held over every path at once (`tiandi_link::paths`: a warm standby each, probed by its
//! keep-alive); the conference plays over the path the board chooses, and moves when that
//! path fails: the standby subscribes to the current group from its keyframe in the rendition
//! the failed path carried, and the players go on from the frame after the last they had
//! (`track::bridge_resuming`). Back to the preferred path after it has been up for its hold
//! time, the same way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tiandi_link::paths::{Board, Class, PathSpec, Policy};
use tiandi_video::client::Session;
use tiandi_video::track::Track;
use tokio_util::sync::CancellationToken;

use crate::cli::JoinArgs;

/// A path's session, once joined.
type Slot = Arc<Mutex<Option<Arc<Session>>>>;

/// How soon a path whose session failed joins again.
const REJOIN: Duration = Duration::from_secs(1);

/// Keeps a session joined over path `i` until `stop`: joins (the first path as the site, the
/// others as standbys), registers it on the board, waits for its end, joins again.
#[allow(clippy::too_many_arguments)]
async fn hold_path(
    a: Arc<JoinArgs>,
    i: usize,
    spec: PathSpec,
    endpoint: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    board: Arc<Board>,
    slot: Slot,
    ended: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
) {
    let relay = spec
        .relay
        .as_deref()
        .and_then(|r| r.parse::<std::net::SocketAddr>().ok())
        .unwrap_or(a.relay);
    let link_kbps = if spec.budget_kbps > 0 {
        spec.budget_kbps
    } else {
        a.link_kbps
    };
    let server_name = tiandi_link::tls::relay_server_name(&a.relay_name);
    loop {
        let joined = async {
            let conn = endpoint
                .connect_with(cfg.clone(), relay, &server_name)?
                .await
                .with_context(|| format!("connecting to relay {} at {relay}", a.relay_name))?;
            Session::join_path(
                conn,
                &a.room,
                tiandi_video::conference_wire::Role::Site,
                vec![],
                link_kbps,
                a.fec_rtt_ms,
                &spec.name,
                i != 0,
            )
            .await
            .with_context(|| format!("joining room {} over path {}", a.room, spec.name))
        };
        let session = tokio::select! {
            _ = stop.cancelled() => return,
            r = joined => r,
        };
        match session {
            Ok(s) => {
                tracing::info!(path = %spec.name, %relay, "Joined over this path.");
                board.connected(i, &s.conn);
                *slot.lock().expect("slot lock poisoned") = Some(s.clone());
                let closed = tokio::select! {
                    _ = stop.cancelled() => None,
                    e = s.conn.closed() => Some(e),
                };
                board.disconnected(i, &s.conn);
                *slot.lock().expect("slot lock poisoned") = None;
                s.close();
                let Some(e) = closed else { return };
                let (why, again) = crate::join::after_close(&e);
                if !again {
                    *ended.lock().expect("ended lock poisoned") = Some(why);
                    stop.cancel();
                    return;
                }
                tracing::info!(path = %spec.name, %why, "Session over this path ended; joining again.");
            }
            Err(e) => {
                tracing::debug!(path = %spec.name, error = format!("{e:#}"), "Cannot join over this path yet.");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REJOIN.mul_f64(0.5 + rand::random::<f64>() / 2.0)) => {}
        }
    }
}

/// The session the conference plays over now.
struct Active {
    path: usize,
    session: Arc<Session>,
    run: CancellationToken,
}

/// Joins over every path, publishes and plays over the chosen one, until stopped or the
/// conference ends.
pub async fn run(a: JoinArgs) -> anyhow::Result<()> {
    use crate as media;
    let a = Arc::new(a);
    tiandi_link::paths::validate_paths(&a.paths).map_err(|e| anyhow::anyhow!("--path: {e}"))?;
    let pems = a.creds.read()?;
    let stop = tiandi_link::shutdown_token();
    if let Some(d) = a.duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(d)).await;
            stop.cancel();
        });
    }
    let board = Board::new(a.paths.clone(), Policy::default());
    tokio::spawn(board.clone().run(stop.clone()));
    let ended: Arc<Mutex<Option<String>>> = Arc::default();
    let mut slots: Vec<Slot> = Vec::new();
    let mut endpoints = Vec::new();
    for (i, spec) in a.paths.iter().enumerate() {
        let relay = spec
            .relay
            .as_deref()
            .map(|r| {
                r.parse::<std::net::SocketAddr>()
                    .with_context(|| format!("--path {}: relay {r:?} is not host:port", spec.name))
            })
            .transpose()?
            .unwrap_or(a.relay);
        let socket = tiandi_link::paths::bind_socket(spec.bind.as_deref(), relay)
            .with_context(|| format!("--path {}: its socket", spec.name))?;
        let endpoint = tiandi_link::client_endpoint_on(socket)?;
        let tls = tiandi_video::client_tls(&pems.ca, &pems.cert, &pems.key).context("site TLS")?;
        let cfg = tiandi_link::client_config(
            tls,
            tiandi_video::path_transport(spec.profile.unwrap_or(a.profile), spec.probe()),
        )?;
        let slot = Slot::default();
        slots.push(slot.clone());
        endpoints.push(endpoint.clone());
        tokio::spawn(hold_path(
            a.clone(),
            i,
            spec.clone(),
            endpoint,
            cfg,
            board.clone(),
            slot,
            ended.clone(),
            stop.clone(),
        ));
    }
    println!(
        "joining {} at {} over {}",
        a.room,
        a.relay_name,
        a.paths
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    let mut source = None;
    let playing = a.play.is_some() || a.record.is_some();
    let budget = match a.latency_ms {
        0 => media::Budget::path(),
        ms => media::Budget::fixed(Duration::from_millis(ms)),
    };
    let live = Arc::new(media::Live::default());
    let mut out: Vec<(&str, Arc<Track>)> = Vec::new();
    let mut players = Vec::new();
    let mut from = a.from.clone();
    let mut active: Option<Active> = None;
    let mut changes = board.subscribe();
    loop {
        let want = board
            .current(Class::Conference)
            .filter(|&i| slots[i].lock().expect("slot lock poisoned").is_some());
        if want != active.as_ref().map(|x| x.path) {
            let old = active.take();
            if let Some(i) = want {
                let session = slots[i]
                    .lock()
                    .expect("slot lock poisoned")
                    .clone()
                    .expect("filtered above");
                let name = &a.paths[i].name;
                match &old {
                    Some(o) => println!("conference moves from {} to {name}", a.paths[o.path].name),
                    None => println!("playing over {name}"),
                }
                tracing::info!(path = %name, failover = old.is_some(), "The conference goes over this path.");
                if source.is_none()
                    && let Some(spec) = &a.publish
                {
                    let (spec2, me) = (spec.clone(), session.welcome.you.clone());
                    let src = tokio::task::spawn_blocking(move || {
                        media::open_source(&spec2, media::SourceOptions::new(&me))
                    })
                    .await?
                    .with_context(|| format!("opening source {spec}"))?;
                    println!("publishing {spec}");
                    source = Some(src);
                }
                let from = from
                    .get_or_insert_with(|| session.welcome.chair.clone())
                    .clone();
                // What the old path carried: the new one starts with the same rendition, so
                // the group the players hold the start of goes on in kind.
                let rendition = old
                    .as_ref()
                    .and_then(|o| {
                        o.session
                            .counts()
                            .get(&(from.clone(), "video".to_string()))
                            .map(|c| c.rendition.clone())
                    })
                    .unwrap_or_default();
                let run = stop.child_token();
                start(
                    &a,
                    &session,
                    &from,
                    old.is_some().then_some(rendition.as_str()),
                    source.as_ref(),
                    playing,
                    &budget,
                    &live,
                    &run,
                )
                .await?;
                if old.is_some() {
                    budget.rebase();
                }
                if playing && out.is_empty() {
                    let video = tokio::select! {
                        v = session.received(&from, "video") => v,
                        _ = stop.cancelled() => break,
                        _ = session.conn.closed() => continue,
                    };
                    let audio = tokio::time::timeout(
                        Duration::from_secs(3),
                        session.received(&from, "audio"),
                    )
                    .await
                    .ok();
                    for (kind, t) in
                        std::iter::once(("video", video)).chain(audio.map(|t| ("audio", t)))
                    {
                        out.push((kind, Track::new(t.info.clone())));
                    }
                    let tracks: Vec<_> = out.iter().map(|(_, t)| t.clone()).collect();
                    for (n, sink) in a.play.iter().chain(a.record.iter()).enumerate() {
                        let (tracks, sink, stop, budget) =
                            (tracks.clone(), sink.clone(), stop.clone(), budget.clone());
                        let live = if n == 0 { live.clone() } else { Arc::default() };
                        println!("playing {from} to {sink}");
                        players.push(tokio::spawn(async move {
                            media::play(tracks, &sink, stop, budget, live).await
                        }));
                    }
                }
                for (kind, to) in &out {
                    let (s, from, kind, to, run) = (
                        session.clone(),
                        from.clone(),
                        *kind,
                        to.clone(),
                        run.clone(),
                    );
                    tokio::spawn(async move {
                        let t = tokio::select! {
                            t = s.received(&from, kind) => t,
                            _ = run.cancelled() => return,
                        };
                        tiandi_video::track::bridge_resuming(t, to, run).await;
                    });
                }
                active = Some(Active {
                    path: i,
                    session,
                    run,
                });
            } else if old.is_some() {
                println!("no path up: waiting");
            }
            if let Some(o) = old {
                // The old path stops carrying the conference (if it still can hear us).
                o.run.cancel();
                if let Some(from) = &from {
                    let _ = o.session.unsubscribe(from, "video").await;
                    let _ = o.session.unsubscribe(from, "audio").await;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            r = changes.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if players.is_empty() && source.as_ref().is_some_and(|s: &media::Source| s.finished()) {
                    break;
                }
            }
        }
    }
    stop.cancel();
    for (_, t) in &out {
        t.close();
    }
    for p in players {
        match p.await? {
            Ok(stats) => println!("played {}", stats.summary()),
            Err(e) => eprintln!("playback failed: {e}"),
        }
    }
    if let Some(s) = source.as_mut() {
        s.stop()?;
    }
    for slot in &slots {
        if let Some(s) = slot.lock().expect("slot lock poisoned").take() {
            s.close();
        }
    }
    for e in endpoints {
        e.wait_idle().await;
    }
    if let Some(why) = ended.lock().expect("ended lock poisoned").take() {
        println!("left: {why}");
    }
    Ok(())
}

/// Starts the conference on `session`: health reports, the players' budget following its
/// round trip, what this site publishes, and the subscriptions (a failover's from the current
/// group, in `failover_rendition`).
#[allow(clippy::too_many_arguments)]
async fn start(
    a: &JoinArgs,
    session: &Arc<Session>,
    from: &str,
    failover_rendition: Option<&str>,
    source: Option<&crate::Source>,
    playing: bool,
    budget: &crate::Budget,
    live: &Arc<crate::Live>,
    run: &CancellationToken,
) -> anyhow::Result<()> {
    session.report_health_until(
        Duration::from_secs(5),
        playing.then(|| (from.to_string(), live.clone())),
        run.clone(),
    );
    {
        let (conn, budget, run) = (session.conn.clone(), budget.clone(), run.clone());
        let fec_ms = u64::from(a.fec_rtt_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut min_rtt = Duration::MAX;
            loop {
                tokio::select! {
                    _ = run.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let rtt = conn.rtt();
                min_rtt = min_rtt.min(rtt);
                let repairs =
                    fec_ms == 1 || (fec_ms != 0 && min_rtt >= Duration::from_millis(fec_ms));
                budget.follow(rtt, repairs);
            }
        });
    }
    if let Some(src) = source {
        for t in &src.tracks {
            session.publish(t.clone()).await?;
        }
    }
    if playing {
        match failover_rendition {
            Some(r) => {
                session
                    .subscribe_failover(from, "video", &a.rendition, r)
                    .await?;
                session.subscribe_failover(from, "audio", "", "").await?;
            }
            None => {
                session.subscribe(from, "video", &a.rendition).await?;
                session.subscribe(from, "audio", "").await?;
            }
        }
    }
    Ok(())
}
