//! `tiandi-video join`: a site in a conference. It publishes a source, plays what a publisher
//! sends into sinks, and joins again after a lost link without the players noticing more than
//! a gap.

use anyhow::Context;

use crate::cli::JoinArgs;

/// Connects to the relay and joins the room.
async fn connect(
    a: &JoinArgs,
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
) -> anyhow::Result<std::sync::Arc<tiandi_video::client::Session>> {
    let conn = endpoint
        .connect_with(
            cfg.clone(),
            a.relay,
            &tiandi_link::tls::relay_server_name(&a.relay_name),
        )?
        .await
        .with_context(|| format!("connecting to relay {} at {}", a.relay_name, a.relay))?;
    tiandi_video::client::Session::join_with(
        conn,
        &a.room,
        tiandi_video::conference_wire::Role::Site,
        vec![],
        a.link_kbps,
        a.fec_rtt_ms,
    )
    .await
    .with_context(|| format!("joining room {}", a.room))
}

/// Why a session ended, and whether to join again.
pub(crate) fn after_close(e: &quinn::ConnectionError) -> (String, bool) {
    use tiandi_video::conference_wire::codes;
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            let code = u32::try_from(c.error_code.into_inner()).unwrap_or(u32::MAX);
            // The conference ended, or the relay refused this site: joining again will not help.
            let again = ![
                codes::NO_ROOM,
                codes::FORBIDDEN,
                codes::LOOP,
                codes::VERSION,
            ]
            .contains(&code);
            (
                format!("the relay closed the session: {reason} (code {code})"),
                again,
            )
        }
        other => (format!("the link to the relay failed: {other}"), true),
    }
}

/// Joins, publishes and plays; when the link to the relay fails (an outage, a relay restart)
/// it joins again with backoff (1 s doubling to 30 s, jittered), publishing the same source
/// again and playing on into the same sinks, until stopped or the conference ends.
pub async fn run(a: JoinArgs) -> anyhow::Result<()> {
    if !a.paths.is_empty() {
        // A dual-homed site: a session over each path.
        return crate::join_paths::run(a).await;
    }
    use crate as media;
    use std::sync::Arc;
    use tiandi_video::track::Track;
    let pems = a.creds.read()?;
    let tls = tiandi_video::client_tls(&pems.ca, &pems.cert, &pems.key).context("site TLS")?;
    let cfg = tiandi_link::client_config(tls, tiandi_video::transport(a.profile))?;
    let endpoint = tiandi_link::client_endpoint(a.relay)?;
    // The first join fails loudly (a technician is watching); later ones are retried.
    let mut session = connect(&a, &endpoint, &cfg).await?;
    let me = session.welcome.you.clone();
    println!("joined {} at {} as {me}", a.room, a.relay_name);
    let stop = tiandi_link::shutdown_token();
    if let Some(d) = a.duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs_f64(d)).await;
            stop.cancel();
        });
    }
    let mut source = match &a.publish {
        Some(spec) => {
            let (spec2, me2) = (spec.clone(), me.clone());
            let src = tokio::task::spawn_blocking(move || {
                media::open_source(&spec2, media::SourceOptions::new(&me2))
            })
            .await?
            .with_context(|| format!("opening source {spec}"))?;
            println!("publishing {spec}");
            Some(src)
        }
        None => None,
    };
    let playing = a.play.is_some() || a.record.is_some();
    let budget = match a.latency_ms {
        0 => media::Budget::path(),
        ms => media::Budget::fixed(std::time::Duration::from_millis(ms)),
    };
    let from = a
        .from
        .clone()
        .unwrap_or_else(|| session.welcome.chair.clone());
    // What the first player shows, for the relay's roster.
    let live = Arc::new(media::Live::default());
    // What the players read: one track per kind for the whole run, fed by each session.
    let mut out: Vec<(&str, Arc<Track>)> = Vec::new();
    let mut players = Vec::new();
    let mut backoff = std::time::Duration::from_secs(1);
    let mut ended = None;
    loop {
        let run = stop.child_token();
        session.report_health(
            std::time::Duration::from_secs(5),
            playing.then(|| (from.clone(), live.clone())),
        );
        {
            // The players' budget follows this session's round trip, and whether repair
            // datagrams come with its groups (asked for from `--fec-rtt-ms` on).
            let (conn, budget, run) = (session.conn.clone(), budget.clone(), run.clone());
            let fec_ms = u64::from(a.fec_rtt_ms);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                let mut min_rtt = std::time::Duration::MAX;
                loop {
                    tokio::select! {
                        _ = run.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let rtt = conn.rtt();
                    min_rtt = min_rtt.min(rtt);
                    let repairs = fec_ms == 1
                        || (fec_ms != 0 && min_rtt >= std::time::Duration::from_millis(fec_ms));
                    budget.follow(rtt, repairs);
                }
            });
        }
        if let Some(src) = &source {
            for t in &src.tracks {
                session.publish(t.clone()).await?;
            }
        }
        if playing {
            session.subscribe(&from, "video", &a.rendition).await?;
            session.subscribe(&from, "audio", "").await?;
            let first = if out.is_empty() {
                tokio::select! {
                    v = session.received(&from, "video") => Some(v),
                    _ = stop.cancelled() => break,
                    // Lost before anything arrived: handled below, as any loss.
                    _ = session.conn.closed() => None,
                }
            } else {
                None
            };
            if let Some(video) = first {
                // Audio, if the publisher sends any.
                let audio = tokio::time::timeout(
                    std::time::Duration::from_secs(3),
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
                for (i, sink) in a.play.iter().chain(a.record.iter()).enumerate() {
                    let (tracks, sink, stop, budget) =
                        (tracks.clone(), sink.clone(), stop.clone(), budget.clone());
                    let live = if i == 0 { live.clone() } else { Arc::default() };
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
                    tiandi_video::track::bridge(t, to, run).await;
                });
            }
        }
        // Until stopped, the source ended with nothing to play, or the session ends.
        let closed = loop {
            tokio::select! {
                _ = stop.cancelled() => break None,
                e = session.conn.closed() => break Some(e),
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                    if players.is_empty() && source.as_ref().is_some_and(|s| s.finished()) {
                        break None;
                    }
                }
            }
        };
        run.cancel();
        session.close();
        let Some(e) = closed else { break };
        let (why, again) = after_close(&e);
        if !again {
            ended = Some(why);
            break;
        }
        eprintln!("{why}; joining again");
        tracing::warn!(%why, "Session lost; joining again.");
        // Join again, with backoff, until it works or we are stopped.
        let next = loop {
            let wait = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            tokio::select! {
                _ = stop.cancelled() => break None,
                _ = tokio::time::sleep(wait) => {}
            }
            match connect(&a, &endpoint, &cfg).await {
                Ok(s) => break Some(s),
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_s = backoff.as_secs(),
                        "Cannot join again yet."
                    );
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                }
            }
        };
        let Some(next) = next else { break };
        session = next;
        backoff = std::time::Duration::from_secs(1);
        println!("joined {} at {} again", a.room, a.relay_name);
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
    session.close();
    endpoint.wait_idle().await;
    if let Some(why) = ended {
        println!("left: {why}");
    }
    Ok(())
}
