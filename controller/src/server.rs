//! The QUIC side: admission control, enrollment connections, and one session per site
//! connection (Hello → Welcome → reports in, acknowledgements out once durable).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tiandi_link::congestion::{RateSlot, SiteRateConfig};
use tiandi_link::{FrameReader, FrameWriter, LinkError, SiteIdentity, tls};
use tiandi_proto::{Ack, Body, Welcome, codes, delta::DeltaDecoder, names::NameDecoder};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{Core, Event, now_ms};

/// A handshake takes two or three round trips (under 2 s over GEO). One still unfinished after
/// this long will not finish: its agent moved on (an agent told it was busy waits up to three
/// times its connect timeout for the handshake, then up to 12 s for the Welcome). Stop it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a handshake holds its admission slot (`concurrent_handshakes` bounds the crypto
/// in progress): past this it waits on the network (its packets lost in a storm and repeated
/// after QUIC's growing probe timeouts), not on the CPU, and must not keep others out.
const SLOT_HOLD: Duration = Duration::from_secs(3);
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// What a site connection may hold of datagrams (the agents' nudges, never read).
const DATAGRAM_BUFFER: usize = 4 * 1024;

/// Paces admissions at `rate` per second with a burst allowance.
pub struct Pacer {
    next: std::sync::Mutex<Instant>,
    interval: Duration,
    burst: Duration,
}

impl Pacer {
    pub fn new(per_s: u32, burst: u32) -> Pacer {
        let interval = Duration::from_secs_f64(1.0 / f64::from(per_s.max(1)));
        Pacer {
            next: std::sync::Mutex::new(Instant::now()),
            interval,
            burst: interval * burst,
        }
    }

    /// The instant this admission may proceed, if no later than `deadline`; `None` (and
    /// nothing reserved) otherwise. A refused attempt must not take a slot: under sustained
    /// overload every refusal would push the schedule further out, until nothing is admitted.
    pub fn reserve(&self, deadline: Instant) -> Option<Instant> {
        let mut next = self.next.lock().expect("pacer lock poisoned");
        let now = Instant::now();
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        let at = (*next).max(earliest);
        if at > deadline {
            return None;
        }
        *next = at + self.interval;
        Some(at)
    }
}

/// When a client turned away may come back (the reason of its `CONNECTION_REFUSED`,
/// `retry-after-ms=N`): after those already waiting and those told before it, at the rate the
/// controller has been completing handshakes. After a restart 20,000 sites arrive within
/// seconds; told when, they come back spread over the time the controller needs to take them
/// in, instead of all retrying at once and being refused again (each refusal costs the site a
/// new handshake's key exchange).
pub struct Comeback {
    state: std::sync::Mutex<ComebackState>,
    max_rate: f64,
}

struct ComebackState {
    /// When everything promised so far has been taken in.
    until: Instant,
    /// Handshakes completed per second (moving average) and the count at the last sample.
    rate: f64,
    last_count: u64,
    last_at: Instant,
}

impl Comeback {
    /// Least a client is told to wait.
    pub const MIN: Duration = Duration::from_millis(500);
    /// How far ahead slots are promised. The rate they are spaced at is learned as the storm
    /// goes (a controller just started takes fewer than it will a few seconds later), so a
    /// client whose slot would be later is told to ask again within this, spread out, and
    /// gets a slot from the schedule as it stands then.
    pub const HORIZON: Duration = Duration::from_secs(15);

    pub fn new(max_rate: u32) -> Comeback {
        let now = Instant::now();
        Comeback {
            state: std::sync::Mutex::new(ComebackState {
                until: now,
                rate: f64::from(max_rate.max(1)) / 4.0,
                last_count: 0,
                last_at: now,
            }),
            max_rate: f64::from(max_rate.max(1)),
        }
    }

    /// Takes the count of completed handshakes in (at most every second).
    pub fn sample(&self, completed: u64) {
        let mut s = self.state.lock().expect("comeback lock poisoned");
        let dt = s.last_at.elapsed().as_secs_f64();
        if dt < 1.0 {
            return;
        }
        let now_rate = completed.saturating_sub(s.last_count) as f64 / dt;
        // Only a second with work in it says what the controller can do.
        if now_rate > 0.0 {
            s.rate = (0.5 * s.rate + 0.5 * now_rate).clamp(self.max_rate.min(20.0), self.max_rate);
        }
        s.last_count = completed;
        s.last_at = Instant::now();
    }

    /// A slot for a client turned away now: how long it is to wait.
    pub fn reserve(&self, waiting: usize) -> Duration {
        let mut s = self.state.lock().expect("comeback lock poisoned");
        let now = Instant::now();
        // A quarter faster than measured: the rate is learned from the handshakes the
        // controller was given, so slots no faster than that would never find out it can do
        // more (one too early is refused again, with a later slot).
        let per = Duration::from_secs_f64(1.0 / (1.25 * s.rate));
        let queued = now + per.mul_f64(waiting as f64);
        let at = s.until.max(queued).max(now + Self::MIN);
        if at > now + Self::HORIZON {
            return Self::HORIZON.mul_f64(0.5 + 0.5 * rand::random::<f64>());
        }
        s.until = at + per;
        at - now
    }
}

/// The reason a busy refusal carries ([`Comeback`]; `tiandi_uplink` reads it).
pub fn retry_reason(after: Duration) -> String {
    format!("retry-after-ms={}", after.as_millis())
}

/// Runs the QUIC accept loop; if it panics (a bug), logs it and starts it again, rather than
/// leave a controller that answers `/health` but admits no site.
pub async fn supervise_accept(
    core: Arc<Core>,
    endpoint: quinn::Endpoint,
    server_config: Arc<quinn::ServerConfig>,
) {
    loop {
        let run = tokio::spawn(accept_loop(
            core.clone(),
            endpoint.clone(),
            server_config.clone(),
        ));
        match run.await {
            Ok(()) => return,
            Err(e) if e.is_panic() && !core.cancel.is_cancelled() => {
                tracing::error!(
                    "The QUIC accept loop panicked (a bug: see the log above); starting it again."
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(_) => return,
        }
    }
}

pub async fn accept_loop(
    core: Arc<Core>,
    endpoint: quinn::Endpoint,
    server_config: Arc<quinn::ServerConfig>,
) {
    let pacer = Arc::new(Pacer::new(
        core.config.admission.handshakes_per_s,
        core.config.admission.burst,
    ));
    let pending = Arc::new(AtomicUsize::new(0));
    // Handshakes in progress at once: a controller that takes on more than it can finish
    // before the agents' connect timeouts does the work for nothing (agents give up, retry,
    // and the load grows). Waiting longer than `max_wait` for a slot is refused at once
    // instead; the agent backs off and comes back.
    let slots = Arc::new(tokio::sync::Semaphore::new(
        core.config.admission.concurrent_handshakes.max(1),
    ));
    let max_wait = Duration::from_millis(core.config.admission.max_wait_ms);
    let comeback = Arc::new(Comeback::new(core.config.admission.handshakes_per_s));
    loop {
        comeback.sample(core.metrics.handshakes.get());
        let incoming = tokio::select! {
            _ = core.cancel.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let waiting = pending.load(Ordering::Relaxed);
        if waiting >= core.config.admission.max_pending {
            core.metrics.refused.with_label_values(&["overload"]).inc();
            incoming.refuse_with_reason(&retry_reason(comeback.reserve(waiting)));
            continue;
        }
        pending.fetch_add(1, Ordering::Relaxed);
        core.metrics.pending_admission.inc();
        let (core, pacer, pending, slots, server_config, comeback) = (
            core.clone(),
            pacer.clone(),
            pending.clone(),
            slots.clone(),
            server_config.clone(),
            comeback.clone(),
        );
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + max_wait;
            let permit = match pacer.reserve(deadline.into_std()) {
                None => None,
                Some(at) => tokio::select! {
                    p = async {
                        tokio::time::sleep_until(at.into()).await;
                        tokio::time::timeout_at(deadline, slots.acquire_owned()).await
                    } => p.ok().and_then(Result::ok),
                    _ = core.cancel.cancelled() => None,
                },
            };
            pending.fetch_sub(1, Ordering::Relaxed);
            core.metrics.pending_admission.dec();
            if core.cancel.is_cancelled() {
                // Shutting down: a handshake now would leave the agent waiting for a Welcome.
                incoming.refuse();
                return;
            }
            let Some(permit) = permit else {
                core.metrics.refused.with_label_values(&["overload"]).inc();
                let waiting = pending.load(Ordering::Relaxed);
                incoming.refuse_with_reason(&retry_reason(comeback.reserve(waiting)));
                return;
            };
            let remote = incoming.remote_address();
            // This connection's own congestion controller: loss-based until the site is
            // known, then paced at its committed rate if it has one (`link_rates`).
            let rate = RateSlot::default();
            let mut transport = core.config.profile.transport_config();
            let (initial_rtt, _) = core.config.profile.nominal();
            transport.congestion_controller_factory(Arc::new(SiteRateConfig::new(
                rate.clone(),
                initial_rtt,
            )));
            let mut config = (*server_config).clone();
            // The last window of a transfer once more into the round trip the link would
            // idle through, when that transfer lost packets (vendor/README.md).
            transport.tail_copies(true);
            // Agents send a tiny datagram after a report over a long path (it makes QUIC find a
            // lost report in about a round trip, not a probe timeout); nothing reads them here,
            // so a few kB hold what arrives between reads that never come.
            transport.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
            // Few chunk streams until the site starts a transfer (the inbox raises it then).
            transport.max_concurrent_uni_streams(tiandi_link::transport::IDLE_UNI_STREAMS.into());
            config.transport_config(Arc::new(transport));
            let connecting = match incoming.accept_with(Arc::new(config)) {
                Ok(c) => c,
                Err(error) => {
                    debug!(%remote, %error, "Incoming connection failed.");
                    return;
                }
            };
            let mut permit = Some(permit);
            let (slot_until, deadline) = {
                let now = tokio::time::Instant::now();
                (now + SLOT_HOLD, now + HANDSHAKE_TIMEOUT)
            };
            tokio::pin!(connecting);
            let outcome = loop {
                tokio::select! {
                    r = &mut connecting => break Ok(r),
                    _ = tokio::time::sleep_until(slot_until), if permit.is_some() => permit = None,
                    _ = tokio::time::sleep_until(deadline) => break Err(()),
                }
            };
            drop(permit);
            match outcome {
                Ok(Ok(conn)) => {
                    core.metrics.handshakes.inc();
                    handle(core, conn, rate).await
                }
                Ok(Err(error)) => {
                    core.metrics.refused.with_label_values(&["handshake"]).inc();
                    info!(%remote, %error, "Handshake failed.");
                }
                Err(_) => debug!(%remote, "Handshake timed out."),
            }
        });
    }
}

async fn handle(core: Arc<Core>, conn: quinn::Connection, rate: RateSlot) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    match alpn.as_deref() {
        Some(p) if p == tls::ALPN_ENROLL => crate::enroll::serve(core, conn).await,
        Some(p) if p == tls::ALPN_SITE => site_connection(core, conn, rate).await,
        Some(p) if p == tls::ALPN_REPLICA => {
            let id = tiandi_link::peer_identity(&conn);
            let role = id
                .as_ref()
                .map(|_| tiandi_link::tls::peer_role(&conn).unwrap_or_default());
            let name = id.map_or_else(|| "(no certificate)".to_string(), |i| i.site_id);
            let cancel = core.cancel.child_token();
            core.replica.clone().serve(conn, role, name, cancel).await
        }
        _ => conn.close(codes::PROTOCOL.into(), b"unknown application protocol"),
    }
}

fn refuse(core: &Core, conn: &quinn::Connection, code: u32, reason: &str, label: &str) {
    core.metrics.refused.with_label_values(&[label]).inc();
    warn!(code, reason, "Closing connection.");
    conn.close(code.into(), reason.as_bytes());
}

async fn site_connection(core: Arc<Core>, conn: quinn::Connection, rate: RateSlot) {
    let remote = conn.remote_address();
    let Some(id) = tiandi_link::peer_identity(&conn) else {
        refuse(
            &core,
            &conn,
            codes::IDENTITY,
            "a site certificate is required (enroll first)",
            "identity",
        );
        return;
    };
    // Revocations and re-enrollments from now on reach this session (issue 15, finding 6):
    // watched before the check below, so none falls between the check and the watch.
    let changes = core.registry.watch_changes();
    // The TLS verifier checked the registry already; check again in case the site was revoked
    // between the handshake and now.
    if let Err(r) = tiandi_link::tls::CertPolicy::check(core.registry.as_ref(), &id) {
        refuse(
            &core,
            &conn,
            codes::REVOKED,
            &format!("certificate not accepted: {r:?}"),
            "revoked",
        );
        return;
    }
    // A standby's certificate follows the replication log and does nothing a site does.
    if tiandi_link::tls::peer_role(&conn).unwrap_or_default() == tiandi_link::pki::CertRole::Standby
    {
        refuse(
            &core,
            &conn,
            codes::IDENTITY,
            "a standby controller's certificate cannot act as a site",
            "identity",
        );
        return;
    }
    if let Some((epoch, who)) = core.replica.superseded() {
        refuse(
            &core,
            &conn,
            codes::SUPERSEDED,
            &format!("this controller stands down: {who} knows of a controller at epoch {epoch}"),
            "superseded",
        );
        return;
    }
    if let Some(bps) = core.config.link_rate_bps(&id.site_id) {
        rate.set(bps);
    }
    let span = info_span!("site", site = %id.site_id, %remote);
    async move {
        core.metrics.connections.inc();
        let result = session(&core, &conn, &id, &rate, changes).await;
        core.metrics.connections.dec();
        if core.unregister_conn(&id.site_id, &conn) {
            core.sites.set_connected(&id.site_id, false, None);
            core.site_changed(&id.site_id);
        }
        core.sites
            .set_path_connections(&id.site_id, &core.links.connected_paths(&id.site_id));
        match result {
            Ok(()) => debug!("Session ended."),
            Err(SessionError::Closed(e)) => debug!(error = %e, "Connection closed."),
            Err(SessionError::Refuse(code, reason, label)) => {
                if code == codes::PROTOCOL || code == codes::VERSION {
                    core.metrics.protocol_errors.inc();
                }
                refuse(&core, &conn, code, &reason, label);
            }
        }
    }
    .instrument(span)
    .await
}

enum SessionError {
    Closed(String),
    Refuse(u32, String, &'static str),
}

impl From<LinkError> for SessionError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Proto(p) => SessionError::Refuse(p.code(), p.to_string(), "protocol"),
            other => SessionError::Closed(other.to_string()),
        }
    }
}

async fn session(
    core: &Arc<Core>,
    conn: &quinn::Connection,
    id: &SiteIdentity,
    rate: &RateSlot,
    mut changes: tokio::sync::watch::Receiver<u64>,
) -> Result<(), SessionError> {
    // A revocation that came between the handshake's check and the registration of this
    // connection (`disconnect` on revoke found nothing to close) is caught here.
    let still_accepted = |changes: &mut tokio::sync::watch::Receiver<u64>| {
        changes.mark_unchanged();
        tiandi_link::tls::CertPolicy::check(core.registry.as_ref(), id).map_err(|r| {
            SessionError::Refuse(
                codes::REVOKED,
                format!("certificate no longer accepted: {r:?}"),
                "revoked",
            )
        })
    };
    still_accepted(&mut changes)?;
    let mut watching = true;
    let configured_rate = core.config.link_rate_bps(&id.site_id).is_some();
    let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| SessionError::Closed("no report stream opened in time".into()))?
        .map_err(|e| SessionError::Closed(e.to_string()))?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.recv()).await {
        Err(_) => return Err(SessionError::Closed("no Hello in time".into())),
        Ok(r) => match r? {
            Some(Body::Hello(h)) => h,
            Some(other) => {
                return Err(SessionError::Refuse(
                    codes::PROTOCOL,
                    format!("expected Hello, got {}", other.kind()),
                    "protocol",
                ));
            }
            None => return Err(SessionError::Closed("stream ended before Hello".into())),
        },
    };
    if let Err(e) = tiandi_proto::check_version(hello.major, hello.minor) {
        return Err(SessionError::Refuse(
            codes::VERSION,
            e.to_string(),
            "version",
        ));
    }
    if !hello.path.is_empty()
        && let Err(e) = tiandi_link::names::validate_name("path", &hello.path)
    {
        return Err(SessionError::Refuse(
            codes::PROTOCOL,
            e.to_string(),
            "protocol",
        ));
    }
    if hello.site_id != id.site_id {
        return Err(SessionError::Refuse(
            codes::IDENTITY,
            format!(
                "this connection's certificate is for site {}, but it claims to be {}",
                id.site_id, hello.site_id
            ),
            "identity",
        ));
    }
    // Fencing: a site that has seen a controller at a higher epoch knows this one was
    // superseded (a standby was promoted): this one stands down, the site goes on elsewhere.
    core.replica
        .hear_epoch(hello.epoch, &format!("site {}", id.site_id));
    if let Some((epoch, who)) = core.replica.superseded() {
        return Err(SessionError::Refuse(
            codes::SUPERSEDED,
            format!("this controller stands down: {who} knows of a controller at epoch {epoch}"),
            "superseded",
        ));
    }
    let state = core
        .store
        .seq_state(&id.site_id)
        .map_err(|e| SessionError::Refuse(codes::INTERNAL, e.to_string(), "internal"))?;
    // One connection per path: a newer one on the same path replaces the older (a site with
    // one path: any older one).
    match core.links.register(&id.site_id, &hello.path, conn, rate) {
        Ok(old) => {
            for c in old {
                c.close(
                    codes::SHUTDOWN.into(),
                    b"superseded by a newer connection of this site",
                );
            }
        }
        Err(crate::paths::TooManyPaths) => {
            return Err(SessionError::Refuse(
                codes::PROTOCOL,
                format!(
                    "site {} already has {} paths connected",
                    id.site_id,
                    tiandi_link::paths::MAX_PATHS
                ),
                "protocol",
            ));
        }
    }
    core.sites
        .set_path_connections(&id.site_id, &core.links.connected_paths(&id.site_id));
    writer
        .send(Body::Welcome(Welcome {
            major: tiandi_proto::MAJOR,
            minor: tiandi_proto::MINOR,
            acked_through: state.acked_through,
            acked_ranges: state.to_ranges(),
            server_time_ms: now_ms(),
            epoch: core.replica.epoch(),
            path_policy: core
                .config
                .path_policy
                .as_ref()
                .map(tiandi_link::paths::policy_to_wire),
        }))
        .await?;
    let interval_ms = i64::from(hello.interval_ms.max(1000));
    core.sites
        .set_connected(&id.site_id, true, Some(interval_ms));
    core.sites
        .set_agent_version(&id.site_id, &hello.agent_version);
    core.site_changed(&id.site_id);
    // Transfers share this connection: files queued for the site go out on their own streams
    // (below the report stream's priority), and files the site sends come in on streams it
    // opens. Both stop with the session.
    let _ = writer
        .stream_mut()
        .set_priority(tiandi_transfer::send::PRIORITY_REPORTS);
    let transfers = core.cancel.child_token();
    let _stop_transfers = transfers.clone().drop_guard();
    // A dual-homed site's classes go over the path it chose for each (its `Paths` frames).
    tokio::spawn(
        tiandi_transfer::outbox::drive_routed(
            core.outbox.clone(),
            conn.clone(),
            id.site_id.clone(),
            "controller".into(),
            transfers.clone(),
            core.links.route(&id.site_id, &hello.path),
        )
        .in_current_span(),
    );
    tokio::spawn(
        tiandi_transfer::inbox::accept_loop_raising(
            core.inbox.clone(),
            conn.clone(),
            Some(id.site_id.clone()),
            transfers,
            Some(core.config.profile.uni_streams()),
        )
        .in_current_span(),
    );
    debug!(agent = %hello.agent_version, version = format!("{}.{}", hello.major, hello.minor), acked_through = state.acked_through, "Site connected.");

    let mut names = NameDecoder::default();
    // The previous report of this connection, whole, for the next delta report: one report per
    // connected site (2-3 KB; ~50 MB at 20,000 sites), nothing for an agent older than minor 3.
    let mut delta = DeltaDecoder::for_peer(hello.minor);
    let mut flushed = core.store.subscribe_flushed();
    flushed.mark_unchanged();
    // Acknowledgements wait here until their write epoch is durable.
    let mut pending: Vec<(u64, Ack)> = Vec::new();
    loop {
        tokio::select! {
            frame = reader.recv() => {
                let body = match frame? {
                    None => return Ok(()),
                    Some(b) => b,
                };
                if let Body::Paths(p) = &body {
                    paths_frame(core, id, p)?;
                    continue;
                }
                let Body::Report(mut report) = body else {
                    return Err(SessionError::Refuse(
                        codes::PROTOCOL,
                        format!("expected Report, got {}", body.kind()),
                        "protocol",
                    ));
                };
                names.expand(&mut report).map_err(LinkError::from)?;
                // Every report, a duplicate too: the next may be encoded against it.
                delta.decode(&mut report).map_err(LinkError::from)?;
                if report.seq == 0 || (report.seq_last != 0 && report.seq_last < report.seq) {
                    return Err(SessionError::Refuse(
                        codes::PROTOCOL,
                        format!("invalid sequence range {}..{}", report.seq, report.seq_last),
                        "protocol",
                    ));
                }
                tracing::trace!(seq = report.seq, delay_ms = now_ms() - report.taken_ms, "Report received.");
                let started = Instant::now();
                let ack = Ack { first: report.seq, last: report.last_seq() };
                let (stored, epoch) = core
                    .store
                    .ingest(&id.site_id, &report)
                    .map_err(|e| SessionError::Refuse(codes::INTERNAL, e.to_string(), "internal"))?;
                if stored {
                    core.metrics.reports.inc();
                    let now = now_ms();
                    let (seq, taken_ms) = (report.seq, report.taken_ms);
                    // No committed rate in the config: pace at the rate the site's modem
                    // reports toward it (it follows ModCod changes in rain fade); a backlog
                    // report's figure is history, not the rate now.
                    // (A dual-homed site's modem speaks for its satellite path only, which
                    // is paced at the budget its `Paths` frames give.)
                    if !configured_rate
                        && hello.path.is_empty()
                        && now - taken_ms < 120_000
                        && let Some(kbps) = report
                            .devices
                            .iter()
                            .filter_map(|d| d.modem.as_ref())
                            .map(|m| m.rx_rate_kbps)
                            .find(|r| *r > 0)
                    {
                        rate.set(tiandi_link::congestion::udp_payload_bps(f64::from(kbps) * 1e3));
                    }
                    if !report.events.is_empty() {
                        core.device_events(&id.site_id, &id.province, &report);
                    }
                    if let Some(fed) = report.federation.take() {
                        crate::federation::on_report(core, &id.site_id, &id.province, seq, fed);
                    }
                    let alarms = core.sites.on_report(&id.site_id, report, now);
                    core.metrics.ingest_seconds.observe(started.elapsed().as_secs_f64());
                    core.metrics
                        .report_delay_seconds
                        .observe((now - taken_ms).max(0) as f64 / 1000.0);
                    let _ = core.events.send(Event::Report {
                        site_id: id.site_id.clone(),
                        province: id.province.clone(),
                        seq,
                        taken_ms,
                        visible_ms: now,
                    });
                    core.record_alarms(alarms);
                } else {
                    core.metrics.duplicates.inc();
                }
                pending.push((epoch, ack));
            }
            // Only sessions with acknowledgements to send wait for the flusher: with thousands
            // of idle sessions, waking all of them on every flush costs more than ingest.
            changed = flushed.changed(), if !pending.is_empty() => {
                if changed.is_err() {
                    return Err(SessionError::Refuse(codes::SHUTDOWN, "controller shutting down".into(), "shutdown"));
                }
                let durable = *flushed.borrow_and_update();
                let ready: Vec<Ack> = pending.iter().filter(|(e, _)| *e <= durable).map(|(_, a)| *a).collect();
                if !ready.is_empty() {
                    pending.retain(|(e, _)| *e > durable);
                    for a in ready {
                        writer.feed(Body::Ack(a)).await?;
                    }
                    writer.flush().await?;
                }
            }
            // The registry changed (a revocation, a re-enrollment): this certificate may no
            // longer be accepted. Rare, so every session waking for it costs nothing.
            r = changes.changed(), if watching => {
                if r.is_err() {
                    watching = false;
                    continue;
                }
                if let Err(e) = still_accepted(&mut changes) {
                    warn!("Certificate revoked or superseded: closing the session.");
                    return Err(e);
                }
            }
            e = conn.closed() => return Err(SessionError::Closed(e.to_string())),
        }
    }
}

/// A dual-homed site's `Paths` frame, from its connection.
fn paths_frame(
    core: &Arc<Core>,
    id: &SiteIdentity,
    frame: &tiandi_proto::Paths,
) -> Result<(), SessionError> {
    apply_paths(core, &id.site_id, &id.province, frame).map_err(|e| {
        SessionError::Refuse(
            codes::PROTOCOL,
            format!("invalid Paths frame: {e}"),
            "protocol",
        )
    })
}

/// A dual-homed site's `Paths` frame (a connection's, or one the demo plays for its simulated
/// dual-homed sites): its transfers follow the class uses, the site's view and the redundancy
/// alarm are updated, each new switch is an event.
pub(crate) fn apply_paths(
    core: &Arc<Core>,
    site_id: &str,
    province: &str,
    frame: &tiandi_proto::Paths,
) -> Result<(), String> {
    let (paths, uses, switches) = crate::paths::check(frame)?;
    if !core.links.fresh(site_id, frame.run, frame.version) {
        tracing::debug!(
            run = frame.run,
            version = frame.version,
            "A stale Paths frame (overtaken by a newer one over another path) is ignored."
        );
        return Ok(());
    }
    core.links.set_uses(site_id, &uses);
    let budgets: Vec<(String, u32)> = paths
        .iter()
        .map(|p| (p.name.clone(), p.budget_kbps))
        .collect();
    core.links
        .set_budgets(site_id, &budgets, core.config.link_rate_bps(site_id));
    let now = now_ms();
    let (fresh, alarms) = core.sites.set_paths(site_id, paths, uses, switches, now);
    core.sites
        .set_path_connections(site_id, &core.links.connected_paths(site_id));
    for sw in fresh {
        info!(class = %sw.class, from = sw.from.as_deref().unwrap_or("-"), to = sw.to.as_deref().unwrap_or("-"), reason = %sw.reason, "Site switched path.");
        core.metrics
            .path_switches
            .with_label_values(&[sw.class.as_str()])
            .inc();
        let _ = core.events.send(Event::Path {
            site_id: site_id.to_string(),
            province: province.to_string(),
            class: sw.class,
            from: sw.from,
            to: sw.to,
            reason: sw.reason,
            at_ms: sw.at_ms,
        });
    }
    if !alarms.is_empty() {
        core.record_alarms(alarms);
        core.site_changed(site_id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_clients_are_given_slots_spread_at_the_handshake_rate() {
        let c = Comeback::new(1000);
        // Learned rate: 400 handshakes in a second.
        c.state.lock().unwrap().last_at = Instant::now() - Duration::from_secs(1);
        c.sample(400);
        let rate = c.state.lock().unwrap().rate;
        assert!((300.0..=330.0).contains(&rate), "{rate}");
        // 2,000 refused one after another: each later than the one before, a slot every
        // 1 / (1.25 × rate) s, never sooner than MIN, never later than MAX.
        let slots: Vec<Duration> = (0..2000).map(|_| c.reserve(0)).collect();
        assert!(slots[0] >= Comeback::MIN);
        assert!(slots.windows(2).all(|w| w[1] > w[0]));
        let span = (slots[1999] - slots[0]).as_secs_f64();
        let expected = 1999.0 / (1.25 * rate);
        assert!((span - expected).abs() < 0.5, "{span} vs {expected}");
        // With 600 already waiting, the first slot comes after them.
        let c = Comeback::new(1000);
        let first = c.reserve(600).as_secs_f64();
        let per = 1.0 / (1.25 * 250.0);
        assert!((first - 600.0 * per).abs() < 0.05, "{first}");
        // The pacer: a refused reservation takes no slot (overload must not push the schedule
        // out for good).
        let p = Pacer::new(10, 1);
        let soon = Instant::now() + Duration::from_millis(250);
        let taken: Vec<Option<Instant>> = (0..10).map(|_| p.reserve(soon)).collect();
        assert_eq!(taken.iter().filter(|t| t.is_some()).count(), 3, "{taken:?}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            p.reserve(Instant::now() + Duration::from_millis(250))
                .is_some(),
            "after the refusals the next slot is still near"
        );
        // A configured rate below the floor of the learned one is no panic (issue 22).
        let slow = Comeback::new(5);
        slow.state.lock().unwrap().last_at = Instant::now() - Duration::from_secs(1);
        slow.sample(3);
        assert!(slow.state.lock().unwrap().rate <= 5.0);
        // Past the horizon nothing is promised: ask again within it, spread out.
        let c = Comeback::new(20);
        let later: Vec<Duration> = (0..1000).map(|_| c.reserve(0)).skip(500).collect();
        assert!(
            later
                .iter()
                .all(|d| *d <= Comeback::HORIZON && *d >= Comeback::HORIZON / 2)
        );
        assert!(
            later.windows(2).any(|w| w[0] != w[1]),
            "spread, not one instant"
        );
        assert_eq!(
            retry_reason(Duration::from_millis(1500)),
            "retry-after-ms=1500"
        );
    }
}
