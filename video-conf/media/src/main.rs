//! `tiandi-video`: run a conference relay, join a conference from a site, or remux a
//! recording.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tiandi_video::relay::{Relay, RelayOptions, Upstream};

/// mimalloc, as in the controller: a relay allocates per packet for hundreds of connections.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tiandi-video", version, about = "Tiandi video conferencing")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a relay (at a province, say): sites join it with their certificates.
    Relay {
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:4500")]
        listen: SocketAddr,
        /// This relay's site ID (its certificate's).
        #[arg(long)]
        name: String,
        /// The site that chairs the rooms (may always publish; grants the floor).
        #[arg(long, default_value = "ministry")]
        chair: String,
        /// The CA certificate (PEM) sites' certificates chain to.
        #[arg(long)]
        ca: PathBuf,
        /// This relay's certificate and key (PEM): a site certificate from the controller.
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// The relay above this one (cascade): its address...
        #[arg(long, requires = "upstream_name")]
        upstream: Option<SocketAddr>,
        /// ...and its site ID.
        #[arg(long, requires = "upstream")]
        upstream_name: Option<String>,
        /// Serve Prometheus metrics (`GET /metrics`) on this TCP address.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Link profile of the participants (geo, leo, terrestrial, custom:RTT:KBIT).
        #[arg(long, default_value = "terrestrial")]
        profile: tiandi_link::LinkProfile,
        /// Ask for repair datagrams (forward error correction) with the groups sent here once
        /// the round trip is at least this long (ms; 0: never).
        #[arg(long, default_value_t = tiandi_video::client::FEC_RTT_MS)]
        fec_rtt_ms: u32,
        /// Log filter (RUST_LOG wins).
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// Join a room from a site: publish a source, play what a publisher sends, record it.
    Join {
        /// The relay's address...
        #[arg(long)]
        relay: SocketAddr,
        /// ...and its site ID (the name its certificate carries).
        #[arg(long)]
        relay_name: String,
        #[arg(long)]
        room: String,
        /// This site's CA certificate, certificate and key (PEM), as enrolled.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// What to publish: `pattern`, `udp://HOST:PORT` (MPEG-TS from an encoder or
        /// ffmpeg), `/dev/videoN`, or a media file. Reaches the others while this site holds
        /// the floor (or chairs).
        #[arg(long)]
        publish: Option<String>,
        /// Where to play: `udp://HOST:PORT` (MPEG-TS to a decoder, TV or VLC) or a file
        /// (`.ts`; `.mkv` and `.mp4` are remuxed from MPEG-TS when playback ends).
        #[arg(long)]
        play: Option<String>,
        /// Also record what is played to this file (`.ts`, `.mkv` or `.mp4`).
        #[arg(long)]
        record: Option<String>,
        /// Whose video and audio to play (default: the room's chair).
        #[arg(long)]
        from: Option<String>,
        /// The rendition to ask for (default: the relay chooses by this link).
        #[arg(long, default_value = "")]
        rendition: String,
        /// How old a frame may be when played (ms): a group's missing frames are waited for
        /// until then (over a satellite hop a repair takes a round trip).
        #[arg(long, default_value_t = 1000)]
        latency_ms: u64,
        /// This site's link rate, if known (kbit/s): the relay starts with a rendition that fits.
        #[arg(long, default_value_t = 0)]
        link_kbps: u32,
        /// Leave after this many seconds (default: at Ctrl-C, or when the source ends).
        #[arg(long)]
        duration: Option<f64>,
        /// Ask for repair datagrams (forward error correction) with the groups sent here once
        /// the round trip is at least this long (ms; 0: never).
        #[arg(long, default_value_t = tiandi_video::client::FEC_RTT_MS)]
        fec_rtt_ms: u32,
        #[arg(long, default_value = "terrestrial")]
        profile: tiandi_link::LinkProfile,
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// Copy a recording (a relay's MPEG-TS, say) into another container, no re-encoding: the
    /// output's extension decides (`.mkv`, `.mp4`, `.ts`).
    Remux {
        /// The recording to read.
        input: PathBuf,
        /// The file to write.
        output: PathBuf,
    },
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Remux { input, output } => {
            let (i, o) = (
                input.to_string_lossy().to_string(),
                output.to_string_lossy().to_string(),
            );
            tokio::task::spawn_blocking(move || tiandi_media::remux(&i, &o))
                .await?
                .with_context(|| format!("remuxing {} to {}", input.display(), output.display()))?;
            println!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Relay {
            listen,
            name,
            chair,
            ca,
            cert,
            key,
            upstream,
            upstream_name,
            metrics,
            profile,
            fec_rtt_ms,
            log,
        } => {
            tiandi_link::init_logging(&log);
            let (ca_pem, cert_pem, key_pem) = (
                read(&ca, "CA certificate")?,
                read(&cert, "relay certificate")?,
                read(&key, "relay key")?,
            );
            let tls = tiandi_video::relay_tls(&ca_pem, &cert_pem, &key_pem).context("relay TLS")?;
            let upstream = match (upstream, upstream_name) {
                (Some(addr), Some(up_name)) => {
                    let client = tiandi_link::client_config(
                        tiandi_video::client_tls(&ca_pem, &cert_pem, &key_pem)
                            .context("upstream TLS")?,
                        tiandi_video::transport(profile),
                    )?;
                    Some(Upstream {
                        endpoint: tiandi_link::client_endpoint(addr)?,
                        addr,
                        name: up_name,
                        client,
                    })
                }
                _ => None,
            };
            let secret: [u8; 32] = rand::random();
            let endpoint = tiandi_link::server_endpoint(
                listen,
                tls,
                tiandi_video::transport(profile),
                &secret,
            )
            .with_context(|| format!("listening on {listen}"))?;
            let relay = Relay::new(RelayOptions {
                name: name.clone(),
                chair,
                upstream,
                open_rooms: true,
                fec_rtt_ms,
            });
            let cancel = tiandi_link::shutdown_token();
            tracing::info!(%listen, relay = %name, "Relay running.");
            println!("relay {name} listening on {}", endpoint.local_addr()?);
            if let Some(addr) = metrics {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("metrics listener on {addr}"))?;
                tracing::info!(addr = %listener.local_addr()?, "Metrics at /metrics.");
                let r = relay.clone();
                let app = axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let r = r.clone();
                        async move {
                            (
                                [(
                                    axum::http::header::CONTENT_TYPE,
                                    "text/plain; version=0.0.4; charset=utf-8",
                                )],
                                r.exposition(),
                            )
                        }
                    }),
                );
                let c = cancel.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { c.cancelled().await })
                        .await;
                });
            }
            relay.serve(endpoint.clone(), cancel).await;
            endpoint.close(
                tiandi_video::conference_wire::codes::SHUTDOWN.into(),
                b"relay stopping",
            );
            endpoint.wait_idle().await;
            Ok(())
        }
        Cmd::Join {
            relay,
            relay_name,
            room,
            ca,
            cert,
            key,
            publish,
            play,
            record,
            from,
            rendition,
            latency_ms,
            link_kbps,
            duration,
            profile,
            fec_rtt_ms,
            log,
        } => {
            tiandi_link::init_logging(&log);
            join(JoinArgs {
                fec_rtt_ms,
                latency: std::time::Duration::from_millis(latency_ms),
                relay,
                relay_name,
                room,
                ca: read(&ca, "CA certificate")?,
                cert: read(&cert, "site certificate")?,
                key: read(&key, "site key")?,
                publish,
                play,
                record,
                from,
                rendition,
                link_kbps,
                duration,
                profile,
            })
            .await
        }
    }
}

struct JoinArgs {
    fec_rtt_ms: u32,
    latency: std::time::Duration,
    relay: SocketAddr,
    relay_name: String,
    room: String,
    ca: String,
    cert: String,
    key: String,
    publish: Option<String>,
    play: Option<String>,
    record: Option<String>,
    from: Option<String>,
    rendition: String,
    link_kbps: u32,
    duration: Option<f64>,
    profile: tiandi_link::LinkProfile,
}

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
fn after_close(e: &quinn::ConnectionError) -> (String, bool) {
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
async fn join(a: JoinArgs) -> anyhow::Result<()> {
    use std::sync::Arc;
    use tiandi_media as media;
    use tiandi_video::track::Track;
    let tls = tiandi_video::client_tls(&a.ca, &a.cert, &a.key).context("site TLS")?;
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
    let from = a
        .from
        .clone()
        .unwrap_or_else(|| session.welcome.chair.clone());
    // What the players read: one track per kind for the whole run, fed by each session.
    let mut out: Vec<(&str, Arc<Track>)> = Vec::new();
    let mut players = Vec::new();
    let mut backoff = std::time::Duration::from_secs(1);
    let mut ended = None;
    loop {
        let run = stop.child_token();
        session.report_health(std::time::Duration::from_secs(5));
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
                for sink in a.play.iter().chain(a.record.iter()) {
                    let (tracks, sink, stop, latency) =
                        (tracks.clone(), sink.clone(), stop.clone(), a.latency);
                    println!("playing {from} to {sink}");
                    players.push(tokio::spawn(async move {
                        media::play(tracks, &sink, stop, latency).await
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
