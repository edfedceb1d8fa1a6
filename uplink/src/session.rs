//! The site's side of the report stream. One QUIC connection to the controller; on every
//! (re)connection: Hello → Welcome (drop what the controller already holds) → the current state
//! first → the backlog oldest-first, at most [`WINDOW`] reports in flight, while new reports go
//! out as soon as they are taken. A report leaves the spool only when acknowledged.
//!
//! Reconnection uses exponential backoff with full jitter, so thousands of sites coming back
//! after a controller restart arrive spread out instead of in one wave.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiandi_link::{FrameReader, FrameWriter, LinkError, pki::CONTROLLER_NAME};
use tiandi_proto::{Body, Hello, LinkStats, Report, delta::DeltaEncoder, names::NameEncoder};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::spool::Spool;
use tiandi_link::paths::PathCtx;

/// Backlog reports in flight at once (the current report always goes out at once).
pub const WINDOW: usize = 32;
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// The controller answers Hello at once, but a connection whose handshake the controller never
/// saw completed (its half timed out) looks established from here: wait this long for the
/// Welcome before trying again. (The controller gives up on a handshake after 10 s.)
const WELCOME_TIMEOUT: Duration = Duration::from_secs(12);
/// A report unacknowledged for this long on a live connection means the controller's session
/// is stuck: reconnect. A controller that died is noticed sooner (QUIC idle timeout, or the
/// stateless reset a restarted one answers with); a merely overloaded one must not be made
/// busier by thousands of agents reconnecting at once, hence the generous figure.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// A report outstanding while not a single datagram came back for this long: the controller
/// is gone (replaced without a goodbye whose stateless reset went missing, or crashed):
/// reconnect without waiting for [`ACK_TIMEOUT`] or the idle timeout. Not shorter: a
/// controller starved of CPU can fall silent for several seconds, and thousands of agents
/// reconnecting at that moment would bury it.
const SILENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Failed attempts in a row at one controller address before the next is tried (a restart
/// of the primary is over before this many; a lost primary is left within a minute).
pub const SWITCH_AFTER: u32 = 3;
/// Retries after a busy refusal ([`busy_backoff`]).
const BUSY_BASE: Duration = Duration::from_secs(2);
const BUSY_CAP: Duration = Duration::from_secs(16);
/// For this long after the controller said it was busy, it is known to be up and loaded: a
/// handshake (or its Welcome) that does not come in time is taken as one more busy answer (retried within
/// seconds, not after an outage's backoff), and an attempt waits [`BUSY_CONNECT_FACTOR`] times
/// the link's connect timeout for its handshake (a controller admitting thousands of sites
/// after a restart finishes each one late; giving up on it wastes the work it did).
const BUSY_MEMORY: Duration = Duration::from_secs(120);
const BUSY_CONNECT_FACTOR: u32 = 3;
/// After a permanent refusal (revoked, unknown, wrong version) retry only this often.
const PERMANENT_RETRY: Duration = Duration::from_secs(300);

/// State shared by the collector and the uplink of one site.
pub struct Shared {
    pub spool: Mutex<Spool>,
    /// The newest report's sequence number, changed when a new report is in the spool (every
    /// path's session watches it).
    pub new_report: watch::Sender<u64>,
    /// Reports that changed the site's critical state (a UPS on battery, a device lost), the
    /// latest [`CRITICAL_KEPT`]: a dual-homed site sends them over every path that is up.
    pub critical: Mutex<(u64, VecDeque<u64>)>,
    /// Signalled by the uplink on every (re)connection: take a sample now, so the controller
    /// gets the current state at once, not at the next tick.
    pub sample_now: Notify,
    /// The QUIC connection's figures, copied into each report.
    pub link: Mutex<Option<LinkStats>>,
    /// While true the uplink stays disconnected (simulated outages).
    pub offline: AtomicBool,
    pub connected: AtomicBool,
    pub acked: AtomicU64,
    pub sessions: AtomicU64,
}

impl Shared {
    pub fn new(spool: Spool) -> Arc<Shared> {
        Arc::new(Shared {
            spool: Mutex::new(spool),
            new_report: watch::channel(0).0,
            critical: Mutex::new((0, VecDeque::new())),
            sample_now: Notify::new(),
            link: Mutex::new(None),
            offline: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
        })
    }

    /// Stores a new report (with the current link figures) and wakes the uplink.
    pub fn push(&self, mut report: Report) -> Result<u64, crate::spool::SpoolError> {
        if report.link.is_none() {
            report.link = self.link.lock().expect("link lock poisoned").clone();
        }
        let signature = critical_signature(&report);
        // A device that spoke up (a trap or inform of major severity or more) is news for the
        // controller whatever the figures say.
        let urgent = report
            .events
            .iter()
            .any(|e| e.severity >= tiandi_proto::Severity::Major as i32);
        let seq = self
            .spool
            .lock()
            .expect("spool lock poisoned")
            .push(report)?;
        {
            let mut c = self.critical.lock().expect("critical lock poisoned");
            if c.0 != signature || urgent {
                // The first report of a run is critical only if something is wrong.
                if urgent || c.0 != 0 || signature != critical_signature(&Report::default()) {
                    if c.1.len() == CRITICAL_KEPT {
                        c.1.pop_front();
                    }
                    c.1.push_back(seq);
                }
                c.0 = signature;
            }
        }
        self.new_report.send_replace(seq);
        Ok(seq)
    }

    /// Whether report `seq` changed the site's critical state.
    pub fn is_critical(&self, seq: u64) -> bool {
        self.critical
            .lock()
            .expect("critical lock poisoned")
            .1
            .contains(&seq)
    }
}

/// Critical reports remembered for sending over every path.
pub const CRITICAL_KEPT: usize = 16;

/// What of a report makes for a critical alarm at the controller: each device's status,
/// whether a UPS is on battery, its profile's alarms, its reachability and the site's other
/// reachability checks. A report whose signature differs from the one before raised
/// or cleared such an alarm. Never 0.
fn critical_signature(r: &Report) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for d in &r.devices {
        eat(d.name.as_bytes());
        eat(&d.name_ref.to_le_bytes());
        eat(&d.status.to_le_bytes());
        eat(&[u8::from(d.ups.as_ref().is_some_and(|u| u.on_battery))]);
        // A profile's alarm raised or cleared, a device that stopped answering its ping.
        for a in &d.alarms {
            eat(a.name.as_bytes());
            eat(&a.severity.to_le_bytes());
        }
        eat(&[u8::from(d.reach.as_ref().is_none_or(|p| p.ok))]);
    }
    for p in &r.probes {
        eat(p.target.as_bytes());
        eat(&[u8::from(p.ok)]);
    }
    h.max(1)
}

#[derive(Clone)]
pub struct UplinkConfig {
    pub controller: String,
    /// Other addresses of the controller (a standby at the DR centre that may be promoted):
    /// tried in turn when the current one fails [`SWITCH_AFTER`] times in a row, or at once
    /// when it stands down or is behind the highest fencing epoch this site has seen.
    pub standby: Vec<String>,
    pub site_id: String,
    pub client: quinn::ClientConfig,
    pub interval_ms: u32,
    /// How long one connection attempt may take (see [`LinkProfile::connect_timeout`]). Past
    /// it a fresh attempt starts: after a controller restart that beats waiting for the
    /// handshake's exponentially backed-off retransmissions.
    ///
    /// [`LinkProfile::connect_timeout`]: tiandi_link::LinkProfile::connect_timeout
    pub connect_timeout: Duration,
    /// What else runs on each controller connection (the agent's transfers; None: nothing,
    /// like simulated sites).
    pub on_session: Option<Arc<dyn SessionHook>>,
}

/// Work a site runs on each controller connection beside the report stream (the agent's file
/// transfers), for as long as that connection lasts.
pub trait SessionHook: Send + Sync {
    /// Starts it on a new controller connection; it all stops when `stop` fires. `route`
    /// says which transfer classes go over this connection (all of them on a site with one
    /// path).
    fn on_session(self: Arc<Self>, conn: &quinn::Connection, stop: CancellationToken, route: Route);
}

/// Which classes of traffic a connection carries.
#[derive(Clone)]
pub enum Route {
    /// The site's only connection: everything.
    All,
    /// Path `index` of a dual-homed site: the classes the board gives it, changing over time.
    Path(PathCtx),
}

impl Route {
    /// Whether this connection carries `class` now.
    pub fn carries(&self, class: tiandi_link::paths::Class) -> bool {
        match self {
            Route::All => true,
            Route::Path(p) => p.board.current(class) == Some(p.index),
        }
    }

    /// Resolves when what this connection carries may have changed (never, for `All`).
    pub async fn changed(&self, rx: &mut Option<watch::Receiver<u64>>) {
        match rx {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// A receiver for [`Route::changed`].
    pub fn watch(&self) -> Option<watch::Receiver<u64>> {
        match self {
            Route::All => None,
            Route::Path(p) => Some(p.board.subscribe()),
        }
    }

    /// The transfer classes this connection carries, for the outbox's drivers.
    pub fn classes(&self) -> tiandi_transfer::outbox::ClassRoute {
        match self {
            Route::All => tiandi_transfer::outbox::ClassRoute::all(),
            Route::Path(p) => {
                let (board, index) = (p.board.clone(), p.index);
                tiandi_transfer::outbox::ClassRoute::new(
                    move |class| {
                        tiandi_link::paths::Class::parse(class)
                            .is_some_and(|c| board.current(c) == Some(index))
                    },
                    p.board.subscribe(),
                )
            }
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, LinkError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| LinkError::Stream(format!("resolving {addr}: {e}")))?
        .next()
        .ok_or_else(|| LinkError::Stream(format!("{addr} resolves to no address")))
}

/// Runs until cancelled.
pub async fn run(
    endpoint: quinn::Endpoint,
    cfg: UplinkConfig,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    run_one(endpoint, cfg, shared, cancel, None).await
}

/// One path of a dual-homed site: its endpoint (bound as the path says), its client
/// configuration (its profile, probe interval and budget) and the controller's addresses over
/// it.
pub struct PathLink {
    pub endpoint: quinn::Endpoint,
    pub client: quinn::ClientConfig,
    pub controller: String,
    /// How long one connection attempt over this path may take (its profile's).
    pub connect_timeout: Duration,
}

/// A dual-homed site's uplink: a session on every path at once (each a warm standby for the
/// others), reports over the path the board chooses, until cancelled.
pub async fn run_paths(
    links: Vec<PathLink>,
    cfg: UplinkConfig,
    board: Arc<tiandi_link::paths::Board>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    assert_eq!(links.len(), board.len(), "one link per path");
    tokio::spawn(board.clone().run(cancel.clone()));
    let mut tasks = Vec::new();
    for (index, link) in links.into_iter().enumerate() {
        let mut cfg = cfg.clone();
        cfg.client = link.client;
        cfg.controller = link.controller;
        cfg.connect_timeout = link.connect_timeout;
        let ctx = PathCtx {
            index,
            board: board.clone(),
        };
        let span = tracing::info_span!("path", path = %ctx.name());
        tasks.push(tokio::spawn(tracing::Instrument::instrument(
            run_one(
                link.endpoint,
                cfg,
                shared.clone(),
                cancel.clone(),
                Some(ctx),
            ),
            span,
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// How soon a path redials while another path of the site is up (its failure is its own, not
/// the controller's): about a second, jittered.
const PATH_REDIAL: Duration = Duration::from_secs(1);

async fn run_one(
    endpoint: quinn::Endpoint,
    cfg: UplinkConfig,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    ctx: Option<PathCtx>,
) {
    let mut attempt: u32 = 0;
    let mut lost_at: Option<Instant> = None;
    // Handshakes failed in a row for TLS reasons (an unknown CA, say).
    let mut tls_failures: u32 = 0;
    // Attempts in a row the controller turned away as busy (its admission queue full), and
    // when it last did.
    let mut busy: u32 = 0;
    let mut busy_at: Option<Instant> = None;
    // The controller addresses, the one in use, and failures in a row there.
    let addrs: Vec<String> = std::iter::once(cfg.controller.clone())
        .chain(cfg.standby.iter().cloned())
        .collect();
    let (mut current, mut failed_here) = (0usize, 0u32);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        if shared.offline.load(Ordering::Relaxed) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        }
        let started = Instant::now();
        let recently_busy = busy_at.is_some_and(|t| t.elapsed() < BUSY_MEMORY);
        let connect_timeout = if recently_busy {
            cfg.connect_timeout * BUSY_CONNECT_FACTOR
        } else {
            cfg.connect_timeout
        };
        let result = session(
            &endpoint,
            &cfg,
            connect_timeout,
            &addrs[current],
            &shared,
            &cancel,
            ctx.as_ref(),
        )
        .await;
        if ctx.as_ref().is_none_or(|c| !c.board.other_up(c.index)) {
            shared.connected.store(false, Ordering::Relaxed);
        }
        if let Some(c) = &ctx
            && c.board.other_up(c.index)
            && !matches!(&result, Err(e) if e.is_permanent() || e.is_tls_failure() || e.is_superseded())
        {
            // Another path reaches the controller: this path's failure is its own. Dial again
            // soon, so the line's return is noticed within seconds.
            debug!(result = ?result.as_ref().err().map(|e| e.to_string()), "Path session ended; dialling again.");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PATH_REDIAL.mul_f64(0.5 + rand::random::<f64>() / 2.0)) => continue,
            }
        }
        if !matches!(&result, Err(e) if e.is_tls_failure()) {
            tls_failures = 0;
        }
        let is_busy = matches!(&result, Err(e) if busy_like(e, recently_busy));
        if !is_busy {
            busy = 0;
        }
        // Only the controller's own word renews the memory: one that died while busy is
        // treated as down (its standby tried) within BUSY_MEMORY.
        if matches!(&result, Err(e) if e.is_busy()) {
            busy_at = Some(Instant::now());
        }
        // A busy controller is up: no reason to try its standby.
        if addrs.len() > 1 && !is_busy {
            // A session that got going resets the count; a stale or standing-down controller
            // is left at once, any other failure after SWITCH_AFTER in a row.
            if started.elapsed() > BACKOFF_CAP {
                failed_here = 0;
            }
            failed_here += 1;
            let stale = matches!(&result, Err(e) if e.is_superseded());
            if stale || failed_here >= SWITCH_AFTER {
                let from = current;
                current = (current + 1) % addrs.len();
                failed_here = 0;
                warn!(from = %addrs[from], to = %addrs[current], "Trying the controller's next address.");
                if stale {
                    // No wait: the next one is probably the controller that took over.
                    continue;
                }
                // A fresh address is tried soon (jittered over a second), not after the
                // backoff the failing one had grown.
                attempt = 0;
                lost_at = Some(Instant::now());
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs_f64(rand::random::<f64>())) => {}
                }
                continue;
            }
        }
        let delay = match result {
            Ok(()) => return,
            Err(e) if e.is_permanent() => {
                error!(error = %e, "The controller refuses this site; an operator must act (re-enroll or fix the version). Retrying in 5 min.");
                PERMANENT_RETRY
            }
            Err(e) if is_busy => {
                // The controller is up and admitting others (after its restart, thousands of
                // sites at once): come back within seconds, widening the spread each time it
                // says busy again, so that its queue stays full but not flooded. Not the
                // outage backoff: that would leave the controller idle later.
                busy = busy.saturating_add(1);
                // The controller said when (its admission schedule): then, give or take a
                // tenth; otherwise guess.
                let d = e
                    .retry_after_jittered()
                    .unwrap_or_else(|| busy_backoff(busy));
                debug!(error = %e, busy, retry_in_ms = d.as_millis() as u64, "The controller is busy admitting others.");
                d
            }
            Err(e) if e.is_tls_failure() => {
                // A controller this site cannot trust (or that cannot trust it) will not change
                // its mind in a second: double the wait each time up to BACKOFF_CAP, with
                // jitter over its upper half (1, 2, 4, 8 … s: four attempts in the first ten
                // seconds, then one every 15-30 s).
                tls_failures = tls_failures.saturating_add(1);
                let d = tls_backoff(tls_failures);
                warn!(error = %e, failures = tls_failures, retry_in_ms = d.as_millis() as u64, "TLS handshake with the controller failed.");
                d
            }
            Err(e) => {
                // The backoff grows with the time since the link was lost, not with the number
                // of attempts: after a short outage (a controller restart) every site is back
                // within seconds; after a long one each retries about twice per elapsed period,
                // at most every BACKOFF_CAP. Full jitter spreads thousands of sites out.
                if started.elapsed() > BACKOFF_CAP || lost_at.is_none() {
                    lost_at = Some(Instant::now());
                    attempt = 0;
                }
                attempt = attempt.saturating_add(1);
                let down_for = lost_at.map(|t| t.elapsed()).unwrap_or_default();
                let cap = (down_for / 2).clamp(BACKOFF_BASE, BACKOFF_CAP);
                let d = cap.mul_f64(rand::random::<f64>());
                if attempt <= 1 {
                    info!(error = %e, retry_in_ms = d.as_millis() as u64, "Link to the controller lost.");
                } else {
                    debug!(error = %e, retry_in_ms = d.as_millis() as u64, "Reconnect failed.");
                }
                d
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether `e` means the controller is up but loaded: it said so, or (having said so within
/// [`BUSY_MEMORY`]) it did not finish a handshake in time.
fn busy_like(e: &LinkError, recently_busy: bool) -> bool {
    e.is_busy() || (recently_busy && e.is_handshake_timeout())
}

/// The wait after the `n`-th busy refusal in a row: uniform over `[d/4, d]` with `d` = 2 s
/// doubling up to [`BUSY_CAP`] (0.5–2 s, 1–4 s, 2–8 s, then 4–16 s).
fn busy_backoff(n: u32) -> Duration {
    let d = BUSY_BASE
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(BUSY_CAP);
    d.mul_f64(0.25 + 0.75 * rand::random::<f64>())
}

/// The wait after the `n`-th TLS failure in a row: `BACKOFF_BASE × 2^(n-1)` up to
/// `BACKOFF_CAP`, jittered over its upper half.
fn tls_backoff(n: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

fn link_stats(conn: &quinn::Connection) -> LinkStats {
    let s = conn.stats();
    LinkStats {
        rtt_ms: conn.rtt().as_millis().min(u128::from(u32::MAX)) as u32,
        lost_packets: s.path.lost_packets,
        cwnd_bytes: s.path.cwnd,
        tx_bytes: s.udp_tx.bytes,
        rx_bytes: s.udp_rx.bytes,
        sent_packets: s.path.sent_packets,
    }
}

struct Sender {
    writer: FrameWriter,
    names: NameEncoder,
    /// The previous report sent on this connection (for a controller of minor 3 on: figures
    /// go as differences from it). A new connection starts without one.
    delta: DeltaEncoder,
    /// The controller's protocol minor (its Welcome's): what it does not know is not sent.
    peer_minor: u32,
    /// When each report in flight on this connection was sent.
    sent_at: std::collections::BTreeMap<u64, Instant>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
}

/// From this smoothed round trip on, a report is followed by [`NUDGES`] tiny datagrams.
pub const NUDGE_RTT: Duration = Duration::from_millis(150);
/// When the nudges follow a report: each is ack-eliciting, and their acknowledgements, coming
/// without the report's, make QUIC declare a lost report lost about a round trip after it was
/// sent (time threshold) instead of at its probe timeout (~1.4 round trips later, then one way
/// more): over GEO with 1 % loss, a lost report is visible ~0.5 s sooner.
const NUDGES: [Duration; 2] = [Duration::from_millis(15), Duration::from_millis(60)];

/// Sends the nudges after a report over a long path (nothing on a short one).
fn nudge(conn: &quinn::Connection) {
    if conn.rtt() < NUDGE_RTT || conn.max_datagram_size().is_none() {
        return;
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        let mut at = Duration::ZERO;
        for d in NUDGES {
            tokio::time::sleep(d - at).await;
            at = d;
            let _ = conn.send_datagram(vec![0u8].into());
        }
    });
}

impl Sender {
    async fn send(&mut self, shared: &Shared, mut r: Report) -> Result<(), LinkError> {
        if self.sent_at.contains_key(&r.seq) {
            return Ok(());
        }
        shared
            .spool
            .lock()
            .expect("spool lock poisoned")
            .in_flight
            .insert(r.seq);
        self.sent_at.insert(r.seq, Instant::now());
        tiandi_proto::names::strip_for_minor(&mut r, self.peer_minor);
        self.delta.encode(&mut r);
        self.names.compress(&mut r);
        let seq = r.seq;
        self.writer.send(Body::Report(r)).await?;
        nudge(&self.conn);
        tracing::trace!(seq, "Report sent.");
        Ok(())
    }
}

impl Drop for Sender {
    /// What this connection carried unacknowledged is no longer in flight on it.
    fn drop(&mut self) {
        let mut spool = self.shared.spool.lock().expect("spool lock poisoned");
        for seq in self.sent_at.keys() {
            spool.in_flight.release(*seq);
        }
    }
}

async fn session(
    endpoint: &quinn::Endpoint,
    cfg: &UplinkConfig,
    connect_timeout: Duration,
    controller: &str,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    ctx: Option<&PathCtx>,
) -> Result<(), LinkError> {
    let addr = resolve(controller).await?;
    let epoch_seen = shared
        .spool
        .lock()
        .expect("spool lock poisoned")
        .epoch()
        .map_err(|e| LinkError::Stream(e.to_string()))?;
    let connecting = endpoint.connect_with(cfg.client.clone(), addr, CONTROLLER_NAME)?;
    let conn = tokio::time::timeout(connect_timeout, connecting)
        .await
        .map_err(|_| LinkError::HandshakeTimeout {
            addr: addr.to_string(),
            after: connect_timeout,
        })??;
    let (send, recv) = conn.open_bi().await?;
    let mut reader = FrameReader::new(recv);
    let mut out = Sender {
        writer: FrameWriter::new(send),
        names: NameEncoder::default(),
        delta: DeltaEncoder::default(),
        peer_minor: 0,
        sent_at: Default::default(),
        shared: shared.clone(),
        conn: conn.clone(),
    };
    out.writer
        .send(Body::Hello(Hello {
            site_id: cfg.site_id.clone(),
            major: tiandi_proto::MAJOR,
            minor: tiandi_proto::MINOR,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            interval_ms: cfg.interval_ms,
            epoch: epoch_seen,
            path: ctx.map(PathCtx::name).unwrap_or_default(),
        }))
        .await?;
    let welcome = tokio::select! {
        r = tokio::time::timeout(WELCOME_TIMEOUT, reader.recv()) => match r {
            Err(_) => return Err(LinkError::AnswerTimeout { what: "Welcome", after: WELCOME_TIMEOUT }),
            Ok(Err(e)) => return Err(closed_reason(&conn).unwrap_or(e)),
            Ok(Ok(Some(Body::Welcome(w)))) => w,
            Ok(Ok(Some(Body::Refused(r)))) => return Err(LinkError::Refused { code: r.code, reason: r.reason }),
            Ok(Ok(Some(other))) => return Err(LinkError::Stream(format!("expected Welcome, got {}", other.kind()))),
            Ok(Ok(None)) => return Err(closed_reason(&conn).unwrap_or(LinkError::Stream("controller closed the stream".into()))),
        },
        e = conn.closed() => return Err(app_close(e)),
    };
    tiandi_proto::check_version(welcome.major, welcome.minor)?;
    out.peer_minor = welcome.minor;
    out.delta = DeltaEncoder::for_peer(welcome.minor);
    let (dropped, backlog) = {
        let mut spool = shared.spool.lock().expect("spool lock poisoned");
        // Fencing: a controller below the highest epoch seen was replaced (0: one that
        // predates epochs, taken as 1).
        let epoch = welcome.epoch.max(1);
        if !spool
            .see_epoch(epoch)
            .map_err(|e| LinkError::Stream(e.to_string()))?
        {
            conn.close(
                tiandi_proto::codes::SUPERSEDED.into(),
                b"this controller was replaced at a higher epoch",
            );
            return Err(LinkError::Refused {
                code: tiandi_proto::codes::SUPERSEDED,
                reason: format!(
                    "{addr} is at epoch {epoch}, below the {epoch_seen} this site has seen: a \
                     standby took over from it"
                ),
            });
        }
        let d = spool
            .apply_welcome(welcome.acked_through, &welcome.acked_ranges)
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        (d, spool.len())
    };
    shared.connected.store(true, Ordering::Relaxed);
    shared.sessions.fetch_add(1, Ordering::Relaxed);
    info!(%addr, acked_through = welcome.acked_through, dropped_acked = dropped, backlog, "Connected to the controller.");
    // Reports go ahead of any transfer on this connection.
    let _ = out
        .writer
        .stream_mut()
        .set_priority(tiandi_transfer::send::PRIORITY_REPORTS);
    // A dual-homed site: this path is up; the controller's policy (if it sets one) applies.
    let _registered = ctx.map(|c| {
        if let Some(p) = &welcome.path_policy {
            c.board.set_policy(p);
        }
        c.board.connected(c.index, &conn);
        Registered(c.clone(), conn.clone())
    });
    // The controller knows `Paths` frames from minor 1 on.
    let paths_frames = ctx.filter(|_| welcome.minor >= 1);
    let mut board_rx = ctx.map(|c| c.board.subscribe());
    let mut switches_sent = 0u64;
    let transfers = cancel.child_token();
    let _stop_transfers = transfers.clone().drop_guard();
    if let Some(t) = &cfg.on_session {
        let route = match ctx {
            None => crate::Route::All,
            Some(c) => crate::Route::Path(c.clone()),
        };
        t.clone().on_session(&conn, transfers, route);
    }
    let reports_here = || ctx.is_none_or(|c| c.board.reports_here(c.index));
    let mut active = reports_here();
    if active {
        *shared.link.lock().expect("link lock poisoned") = Some(link_stats(&conn));
        shared.sample_now.notify_one();
    }
    if let Some(c) = paths_frames {
        let (p, last) = c.board.wire(switches_sent);
        switches_sent = last;
        out.writer.send(Body::Paths(p)).await?;
    }

    // Current state first: the newest spooled report now, a fresh sample right after.
    let mut new_report = shared.new_report.subscribe();
    if active {
        let newest = shared
            .spool
            .lock()
            .expect("spool lock poisoned")
            .newest()
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        if let Some(r) = newest {
            out.send(shared, r).await?;
        }
    }
    let mut cursor = 0u64;
    let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
    let mut paths_refresh = tokio::time::interval(PATHS_REFRESH);
    paths_refresh.reset();
    // When a datagram last arrived from the controller (QUIC acknowledgements included).
    let mut rx_seen = (conn.stats().udp_rx.datagrams, Instant::now());
    loop {
        // Fill the backlog window, oldest first (only on the path that carries reports).
        let next: Vec<Report> = if !active {
            Vec::new()
        } else {
            let spool = shared.spool.lock().expect("spool lock poisoned");
            let mine = out.sent_at.len();
            let room = WINDOW.saturating_sub(mine);
            if room == 0 {
                Vec::new()
            } else {
                let mut v = spool
                    .after(cursor, room + mine)
                    .map_err(|e| LinkError::Stream(e.to_string()))?;
                v.retain(|r| !out.sent_at.contains_key(&r.seq));
                v.truncate(room);
                v
            }
        };
        let sent_any = !next.is_empty();
        for r in next {
            cursor = cursor.max(r.seq);
            out.send(shared, r).await?;
        }
        if sent_any {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                conn.close(0u32.into(), b"agent stopping");
                return Ok(());
            }
            _ = new_report.changed() => {
                let seq = *new_report.borrow_and_update();
                let critical = ctx.is_some_and(|c| shared.is_critical(seq) && c.board.critical_here(c.index));
                if active || critical {
                    let newest = shared.spool.lock().expect("spool lock poisoned").newest()
                        .map_err(|e| LinkError::Stream(e.to_string()))?;
                    if let Some(r) = newest {
                        if !active {
                            info!(seq = r.seq, "Critical report sent over this path too.");
                        }
                        out.send(shared, r).await?;
                    }
                }
            }
            _ = async { board_rx.as_mut().expect("guarded").changed().await }, if board_rx.is_some() => {
                let now_active = reports_here();
                if now_active != active {
                    active = now_active;
                    if active {
                        // Reports come this way now: everything unacknowledged again, oldest
                        // first (the path they went over may be dead).
                        info!("Reports go over this path now.");
                        cursor = 0;
                        *shared.link.lock().expect("link lock poisoned") = Some(link_stats(&conn));
                    }
                }
                if let Some(c) = paths_frames {
                    let (p, last) = c.board.wire(switches_sent);
                    switches_sent = last;
                    out.writer.send(Body::Paths(p)).await?;
                }
            }
            _ = paths_refresh.tick(), if paths_frames.is_some() => {
                // Fresh figures (RTT, loss, rates) now and then, even without a change.
                if let Some(c) = paths_frames {
                    let (p, last) = c.board.wire(switches_sent);
                    switches_sent = last;
                    out.writer.send(Body::Paths(p)).await?;
                }
            }
            msg = reader.recv() => match msg {
                Ok(Some(Body::Ack(a))) => {
                    let n = shared.spool.lock().expect("spool lock poisoned").ack(a.first, a.last)
                        .map_err(|e| LinkError::Stream(e.to_string()))?;
                    let keep = out.sent_at.split_off(&(a.first));
                    let after = keep.into_iter().filter(|(k, _)| *k > a.last);
                    out.sent_at.extend(after);
                    shared.acked.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(Some(Body::Refused(r))) => return Err(LinkError::Refused { code: r.code, reason: r.reason }),
                Ok(Some(other)) => {
                    let e = format!("unexpected {} from the controller", other.kind());
                    conn.close(tiandi_proto::codes::PROTOCOL.into(), e.as_bytes());
                    return Err(LinkError::Stream(e));
                }
                Ok(None) => return Err(closed_reason(&conn).unwrap_or(LinkError::Stream("controller ended the stream".into()))),
                Err(e) => return Err(closed_reason(&conn).unwrap_or(e)),
            },
            _ = stats_tick.tick() => {
                if active {
                    *shared.link.lock().expect("link lock poisoned") = Some(link_stats(&conn));
                }
                if shared.offline.load(Ordering::Relaxed) {
                    conn.close(0u32.into(), b"site link down (simulated)");
                    return Err(LinkError::Stream("simulated outage".into()));
                }
                let rx = conn.stats().udp_rx.datagrams;
                if rx != rx_seen.0 {
                    rx_seen = (rx, Instant::now());
                }
                if let Some((seq, at)) = out.sent_at.first_key_value() {
                    // Silent peer: nothing at all came back, not even QUIC's acknowledgements,
                    // so the controller died or was replaced without our hearing it.
                    let silent = at.elapsed().min(rx_seen.1.elapsed());
                    if silent > SILENT_TIMEOUT || at.elapsed() > ACK_TIMEOUT {
                        let e = if silent > SILENT_TIMEOUT {
                            format!("report {seq} unacknowledged and nothing heard from the controller for {:?}", silent)
                        } else {
                            format!("report {seq} unacknowledged for {ACK_TIMEOUT:?}")
                        };
                        conn.close(0u32.into(), e.as_bytes());
                        return Err(LinkError::Stream(e));
                    }
                }
            }
            e = conn.closed() => return Err(app_close(e)),
        }
    }
}

/// A `Paths` frame goes out at least this often on a dual-homed site's connections (fresh
/// RTT, loss and rates for the controller's view).
const PATHS_REFRESH: Duration = Duration::from_secs(10);

/// A path's session registered on the board; unregistered when dropped.
struct Registered(PathCtx, quinn::Connection);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.board.disconnected(self.0.index, &self.1);
    }
}

/// Turns an application close from the controller into a refusal with its code.
fn app_close(e: quinn::ConnectionError) -> LinkError {
    if let quinn::ConnectionError::ApplicationClosed(c) = &e {
        let code = u64::from(c.error_code) as u32;
        if code != 0 {
            return LinkError::Refused {
                code,
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            };
        }
    }
    LinkError::Connection(e)
}

fn closed_reason(conn: &quinn::Connection) -> Option<LinkError> {
    conn.close_reason().map(|e| {
        let err = app_close(e);
        if let LinkError::Refused { code, reason } = &err {
            warn!(code, %reason, "The controller closed the connection.");
        }
        err
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_back_off_exponentially_with_jitter() {
        for (n, lo, hi) in [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (4, 4.0, 8.0)] {
            for _ in 0..100 {
                let d = tls_backoff(n).as_secs_f64();
                assert!((lo..=hi).contains(&d), "{n}: {d}");
            }
        }
        for n in [6, 20, u32::MAX] {
            let d = tls_backoff(n).as_secs_f64();
            assert!((15.0..=30.0).contains(&d), "{n}: {d}");
        }
        // Ten seconds of failures: at most four attempts after the first.
        let mut t = 0.0;
        let mut attempts = 0;
        while t < 10.0 {
            attempts += 1;
            t += tls_backoff(attempts).as_secs_f64();
        }
        assert!(attempts <= 5, "{attempts}");
    }

    #[test]
    fn a_busy_controller_is_retried_within_seconds_spreading_out() {
        for (n, lo, hi) in [(1, 0.5, 2.0), (2, 1.0, 4.0), (3, 2.0, 8.0), (4, 4.0, 16.0)] {
            for _ in 0..100 {
                let d = busy_backoff(n).as_secs_f64();
                assert!((lo..=hi).contains(&d), "{n}: {d}");
            }
        }
        for n in [5, 30, u32::MAX] {
            let d = busy_backoff(n).as_secs_f64();
            assert!((4.0..=16.0).contains(&d), "{n}: {d}");
        }
        let refused = LinkError::Connection(quinn::ConnectionError::ConnectionClosed(
            quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
                frame_type: None,
                reason: Default::default(),
            },
        ));
        assert!(refused.is_busy() && !refused.is_tls_failure() && !refused.is_permanent());
        assert_eq!(refused.retry_after(), None, "no hint: busy_backoff");
        let told = |reason: &'static str| {
            LinkError::Connection(quinn::ConnectionError::ConnectionClosed(
                quinn::ConnectionClose {
                    error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
                    frame_type: None,
                    reason: reason.as_bytes().to_vec().into(),
                },
            ))
        };
        assert_eq!(
            told("retry-after-ms=2500").retry_after(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            told("retry-after-ms=99999999").retry_after(),
            Some(tiandi_link::RETRY_AFTER_MAX),
            "a hint is taken at its word only so far"
        );
        assert_eq!(told("retry-after-ms=soon").retry_after(), None);
        let overload = LinkError::Refused {
            code: tiandi_proto::codes::OVERLOAD,
            reason: "busy".into(),
        };
        assert!(overload.is_busy());
        let gone = LinkError::HandshakeTimeout {
            addr: "192.0.2.1:4433".into(),
            after: Duration::from_secs(3),
        };
        assert!(!gone.is_busy() && gone.is_handshake_timeout());
        assert!(!busy_like(&gone, false), "after no busy answer: an outage");
        assert!(
            busy_like(&gone, true),
            "right after a busy answer: still busy"
        );
        assert!(busy_like(&overload, false));
        let late = LinkError::AnswerTimeout {
            what: "Welcome",
            after: WELCOME_TIMEOUT,
        };
        assert!(busy_like(&late, true) && !busy_like(&late, false));
        let cut = LinkError::Connection(quinn::ConnectionError::ConnectionClosed(
            quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::APPLICATION_ERROR,
                frame_type: None,
                reason: Default::default(),
            },
        ));
        assert!(busy_like(&cut, true) && !busy_like(&cut, false));
        let silent = LinkError::Connection(quinn::ConnectionError::TimedOut);
        assert!(busy_like(&silent, true) && !busy_like(&silent, false));
        let untrusted = LinkError::Tls("unknown CA".into());
        assert!(!busy_like(&untrusted, true));
    }
}
