//! `relay-fanout`: one publisher, one relay (`tiandi-video relay`, its own process), N
//! subscribing connections, all on loopback.
//!
//! The publisher sends a synthetic video track at the given bitrate: 25 frames/s, a group
//! every 2 s starting with a keyframe five times the size of the other frames, each frame
//! carrying its index and its send time. Every subscriber is a real QUIC connection with its
//! own site certificate, reading group streams as a client does. Over `--duration` seconds
//! (after every subscriber has its first group) the bench counts, per subscriber, the frames
//! published in that span that arrived (`delivered_pct`), the relay's CPU time from /proc
//! (`relay_cpu_cores`), and each frame's publish-to-arrival time (`added_latency_*`: on
//! loopback, what the relay adds).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ingest::cpu_s;
use anyhow::{Context, bail};
use bytes::Bytes;
use tiandi_link::pki::{self, Ca};
use tiandi_video::conference_wire::{self, Control, Hello, Object, Role, Subscribe, TrackInfo};
use tiandi_video::io::{ControlReader, ControlWriter};
use tiandi_video::track::Track;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 500)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1500)]
    pub bitrate_kbit: u32,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Every subscriber asks for repair datagrams (as a GEO viewer does; they are not read
    /// here): what repair costs the relay per subscriber, its blocks being encoded once per
    /// group for all of them.
    #[arg(long)]
    pub repair: bool,
}

const FPS: u64 = 25;
const GOP: u64 = 50;
/// Subscribers sharing one UDP socket (client endpoint).
const PER_SOCKET: usize = 25;

use tiandi_link::clock::now_us;

struct Creds {
    cert: String,
    key: String,
}

fn issue(ca: &Ca, id: &str) -> anyhow::Result<Creds> {
    let (key, csr) = pki::site_key_and_csr(id)?;
    let cert = ca
        .sign_site(&csr, id, "BJ", Duration::from_secs(86_400))?
        .cert_pem;
    Ok(Creds { cert, key })
}

/// Per-subscriber tallies (one lock per subscriber: the harness must not serialise its
/// receivers on a shared lock, it shares the machine's cores with the relay).
#[derive(Default)]
struct Tally {
    /// Frame indexes received, and (publish-to-arrival µs, keyframe) while recording.
    got: Mutex<Got>,
    first_group: AtomicBool,
}

#[derive(Default)]
struct Got {
    frames: HashSet<u64>,
    latencies: Vec<(i64, bool)>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let bin = crate::ingest::release_binaries(&["tiandi-media"])?.remove(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(a, bin))
}

async fn run_async(a: Args, bin: PathBuf) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("tiandi-fanout-")
        .tempdir()?;
    let ca = Ca::generate("bench CA")?;
    let relay_id = "bench-relay";
    let rc = issue(&ca, relay_id)?;
    let write = |name: &str, s: &str| -> anyhow::Result<PathBuf> {
        let p = dir.path().join(name);
        std::fs::write(&p, s)?;
        Ok(p)
    };
    let (ca_p, cert_p, key_p) = (
        write("ca.pem", ca.cert_pem())?,
        write("relay.pem", &rc.cert)?,
        write("relay.key", &rc.key)?,
    );
    let mut relay = Command::new(&bin)
        .args(["relay", "--listen", "127.0.0.1:0", "--name", relay_id])
        .args(["--chair", "ministry", "--log", "warn"])
        .arg("--ca")
        .arg(&ca_p)
        .arg("--cert")
        .arg(&cert_p)
        .arg("--key")
        .arg(&key_p)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("relay.log"))?)
        .spawn()
        .context("starting the relay")?;
    let _kill = KillOnDrop(relay.id());
    let line = std::io::BufReader::new(relay.stdout.take().context("relay stdout")?)
        .lines()
        .next()
        .context("the relay printed nothing")??;
    let addr: std::net::SocketAddr = line
        .rsplit(' ')
        .next()
        .context("no address in the relay's first line")?
        .parse()
        .with_context(|| format!("relay said {line:?}"))?;
    let pid = relay.id();

    eprintln!("issuing {} certificates...", a.subscribers + 1);
    let publisher = issue(&ca, "ministry")?;
    let subs: Vec<Creds> = (0..a.subscribers)
        .map(|i| issue(&ca, &format!("county-{i:04}")))
        .collect::<anyhow::Result<_>>()?;
    let server_name = tiandi_link::tls::relay_server_name(relay_id);
    // The transport `tiandi-video join` uses (BBR, the conference timers).
    let transport = tiandi_video::transport(tiandi_link::LinkProfile::Terrestrial);
    let connect = |ep: quinn::Endpoint, c: &Creds| {
        let tls = tiandi_video::client_tls(ca.cert_pem(), &c.cert, &c.key);
        let (transport, server_name) = (transport.clone(), server_name.clone());
        async move {
            let cfg = tiandi_link::client_config(tls?, transport)?;
            let conn = ep.connect_with(cfg, addr, &server_name)?.await?;
            anyhow::Ok(conn)
        }
    };

    // The publisher (a client session, as a site would run it).
    let pub_ep = tiandi_link::client_endpoint(addr)?;
    let pub_conn = connect(pub_ep.clone(), &publisher).await?;
    let session =
        tiandi_video::client::Session::join(pub_conn, "bench", Role::Site, vec![], 0).await?;
    let track = Track::new(TrackInfo {
        publisher: "ministry".into(),
        kind: "video".into(),
        codec: "h264".into(),
        rendition: "high".into(),
        bitrate_kbps: a.bitrate_kbit,
        width: 1280,
        height: 720,
        ..Default::default()
    });
    session.publish(track.clone()).await?;

    // Subscribers.
    eprintln!(
        "connecting {} subscribers{}...",
        a.subscribers,
        if a.repair {
            ", each asking for repair datagrams"
        } else {
            ""
        }
    );
    let repair = a.repair;
    let tallies: Vec<Arc<Tally>> = (0..a.subscribers).map(|_| Arc::default()).collect();
    let recording = Arc::new(AtomicBool::new(false));
    let mut ep = tiandi_link::client_endpoint(addr)?;
    let mut conns = Vec::new();
    for (i, c) in subs.iter().enumerate() {
        if i > 0 && i % PER_SOCKET == 0 {
            ep = tiandi_link::client_endpoint(addr)?;
        }
        let conn = connect(ep.clone(), c)
            .await
            .with_context(|| format!("subscriber {i}"))?;
        let (send, recv) = conn.open_bi().await?;
        let mut w = ControlWriter(send);
        w.send(&Control::Hello(Hello {
            version: conference_wire::VERSION,
            room: "bench".into(),
            role: "site".into(),
            path: vec![],
            link_kbps: 0,
            // Loopback: no repair datagrams (they would never be needed), unless asked.
            fec_rtt_ms: u32::from(repair),
            ..Default::default()
        }))
        .await?;
        w.send(&Control::Subscribe(Subscribe {
            publisher: "ministry".into(),
            kind: "video".into(),
            rendition: String::new(),
            ..Default::default()
        }))
        .await?;
        tokio::spawn(async move {
            // Keep the control stream read (Welcome, Tracks, Floor...), and `w` alive.
            let _w = w;
            let mut r = ControlReader(recv);
            while let Ok(Some(_)) = r.recv().await {}
        });
        let (tally, rec) = (tallies[i].clone(), recording.clone());
        let c2 = conn.clone();
        tokio::spawn(async move {
            while let Ok(s) = c2.accept_uni().await {
                let (tally, rec) = (tally.clone(), rec.clone());
                tokio::spawn(async move {
                    let mut s = tiandi_video::fec::GroupRecv::new(s, None);
                    if tiandi_video::io::read_group_header(&mut s).await.is_err() {
                        return;
                    }
                    tally.first_group.store(true, Ordering::Relaxed);
                    while let Ok(Some(o)) = tiandi_video::io::read_object(&mut s).await {
                        let now = now_us();
                        let idx = u64::from_be_bytes(o.payload[0..8].try_into().unwrap_or([0; 8]));
                        let sent =
                            i64::from_be_bytes(o.payload[8..16].try_into().unwrap_or([0; 8]));
                        let mut got = tally.got.lock().expect("tally");
                        got.frames.insert(idx);
                        if rec.load(Ordering::Relaxed) {
                            got.latencies.push((now - sent, idx.is_multiple_of(GOP)));
                        }
                    }
                });
            }
        });
        conns.push(conn);
    }

    // The source: frames at FPS, a group per GOP.
    let per_frame = (u64::from(a.bitrate_kbit) * 1000 / 8 / FPS) as usize;
    // Keyframe 5x the others, same average over a group.
    let small = per_frame * GOP as usize / (GOP as usize + 4);
    let key = small * 5;
    let frame_idx = Arc::new(AtomicU64::new(0));
    let stop_src = Arc::new(AtomicBool::new(false));
    let src = {
        let (track, frame_idx, stop_src) = (track.clone(), frame_idx.clone(), stop_src.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / FPS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut group = None;
            let mut n = 0u64;
            while !stop_src.load(Ordering::Relaxed) {
                tick.tick().await;
                if n.is_multiple_of(GOP) {
                    if let Some(g) = group.take() {
                        let g: Arc<tiandi_video::track::Group> = g;
                        g.finish();
                    }
                    group = Some(track.start_group(n / GOP + 1));
                }
                let size = if n.is_multiple_of(GOP) { key } else { small };
                let mut p = vec![0u8; size.max(16)];
                p[0..8].copy_from_slice(&n.to_be_bytes());
                p[8..16].copy_from_slice(&now_us().to_be_bytes());
                if let Some(g) = &group {
                    g.push(Object {
                        pts_us: (n * 1_000_000 / FPS) as i64,
                        flags: if n.is_multiple_of(GOP) {
                            conference_wire::flags::KEY
                        } else {
                            0
                        },
                        payload: Bytes::from(p),
                    });
                }
                frame_idx.store(n, Ordering::Relaxed);
                n += 1;
            }
            if let Some(g) = group {
                g.finish();
            }
        })
    };

    // Everyone has a first group: the late joiners start at the current keyframe.
    let t = Instant::now();
    while tallies
        .iter()
        .any(|t| !t.first_group.load(Ordering::Relaxed))
    {
        if t.elapsed() > Duration::from_secs(60) {
            let n = tallies
                .iter()
                .filter(|t| t.first_group.load(Ordering::Relaxed))
                .count();
            bail!(
                "only {n} of {} subscribers got a group in 60 s",
                a.subscribers
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "all subscribers receiving after {:.1} s; measuring",
        t.elapsed().as_secs_f64()
    );
    // Start at the next group boundary, so every counted frame belongs to a whole group.
    let first = (frame_idx.load(Ordering::Relaxed) / GOP + 1) * GOP;
    while frame_idx.load(Ordering::Relaxed) < first {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    recording.store(true, Ordering::Relaxed);
    let me = std::process::id();
    let (cpu0, own0) = (cpu_s(pid), cpu_s(me));
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    let (cpu1, own1) = (cpu_s(pid), cpu_s(me));
    let span = t0.elapsed().as_secs_f64();
    let last = frame_idx.load(Ordering::Relaxed);
    recording.store(false, Ordering::Relaxed);
    // Let the frames in flight land, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_src.store(true, Ordering::Relaxed);
    let _ = src.await;

    let expected = (last - first + 1) * a.subscribers as u64;
    let delivered: u64 = tallies
        .iter()
        .map(|t| {
            t.got
                .lock()
                .expect("tally")
                .frames
                .iter()
                .filter(|i| (first..=last).contains(*i))
                .count() as u64
        })
        .sum();
    let all: Vec<(i64, bool)> = tallies
        .iter()
        .flat_map(|t| std::mem::take(&mut t.got.lock().expect("tally").latencies))
        .collect();
    // Keyframes are 2 % of the samples, so the p99 falls among them: show both kinds.
    for (name, key) in [("key", true), ("other", false)] {
        let mut l: Vec<i64> = all.iter().filter(|x| x.1 == key).map(|x| x.0).collect();
        l.sort_unstable();
        if !l.is_empty() {
            let q = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
            eprintln!(
                "{name} frames: n={} p10={:.1} p50={:.1} p90={:.1} p99={:.1} max={:.1}",
                l.len(),
                q(0.1),
                q(0.5),
                q(0.9),
                q(0.99),
                q(1.0)
            );
        }
    }
    let mut lat: Vec<i64> = all.iter().map(|x| x.0).collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return -1.0;
        }
        lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    let delivered_pct = delivered as f64 * 100.0 / expected.max(1) as f64;
    let cores = (cpu1 - cpu0) / span;
    eprintln!(
        "{} frames x {} subscribers expected, {delivered} delivered; relay {:.2} s CPU, bench (publisher and subscribers) {:.2} s, over {span:.1} s; {} latency samples",
        last - first + 1,
        a.subscribers,
        cpu1 - cpu0,
        own1 - own0,
        lat.len()
    );
    session.close();
    for c in conns {
        c.close(0u32.into(), b"done");
    }
    println!(
        "relay-fanout subscribers={} bitrate_kbit={} delivered_pct={:.2} relay_cpu_cores={:.2} added_latency_p50_ms={:.1} added_latency_p99_ms={:.1}",
        a.subscribers,
        a.bitrate_kbit,
        delivered_pct,
        cores,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}
