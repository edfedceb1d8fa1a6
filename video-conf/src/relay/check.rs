//! Revocation at a relay without the registry: whether a participant's certificate may still
//! take part, asked of the relay above, as the file relay asks the controller
//! (`tiandi_transfer::hop::UpstreamCheck`).
//!
//! Asking ([`UpstreamCheck`], a relay with an upstream): one long-lived QUIC connection to the
//! upstream relay of its own (made when first needed, made again after a failure, with
//! backoff), one bidirectional stream per question: [`CheckSites`] (every certificate asked
//! about at once, at most [`MAX_CHECK_SITES`] a stream) → [`SitesChecked`]. Asked at admission
//! and, for every live participant, every [`RECHECK`](super::RECHECK). With no answer (the
//! upstream out of reach, or slower than [`CHECK_TIMEOUT`]) the relay fails closed: a
//! certificate is admitted, or kept, only if upstream confirmed it within `confirmed_within`
//! ([`CONFIRMED_WITHIN`] by default); one never confirmed, or last refused, is refused.
//!
//! Answering ([`Relay::serve_checks`], any relay, for a participant with a relay
//! certificate whose connection starts with `CheckSites` instead of `Hello`): the relay's
//! certificate policy (the controller's registry, on the controller's relay) decides; a relay
//! without one asks its own upstream in turn (county → province → ministry), and says it has
//! no answer ([`codes::UNANSWERED`]) rather than answer from memory, so a confirmation's age
//! is always the authority's; a top relay with neither (a standalone relay trusting the CA
//! alone) allows every certificate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tiandi_link::SiteIdentity;
use tiandi_link::confirm::{Confirmations, Offline};
use tiandi_link::pki::CertRole;
use tiandi_link::tls::Rejection;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::{Relay, Upstream};
use crate::conference_wire::{
    CheckSites, Control, ErrorMsg, MAX_CHECK_SITES, SiteCert, SiteVerdict, SitesChecked, codes,
};
use crate::io::{ControlReader, ControlWriter, IoError};

/// How long an answer from upstream may take (connecting included) before the relay goes by
/// what it knows.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`RelayOptions::confirmed_within`](super::RelayOptions::confirmed_within)
/// (`tiandi-video relay --confirmed-within-s`): a relay that cannot reach its upstream admits,
/// and keeps, only participants upstream confirmed this recently.
pub const CONFIRMED_WITHIN: Duration = Duration::from_secs(30 * 60);
/// How long a check stream from below may take to bring its question.
const QUESTION_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait before connecting to the upstream again after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// What a top relay without a registry answers (it trusts the CA alone).
const NO_REGISTRY: &str = "no registry at this relay";

/// The certificate `id` as the wire names it.
pub(super) fn site_cert(id: &SiteIdentity) -> SiteCert {
    SiteCert {
        site: id.site_id.clone(),
        province: id.province.clone(),
        serial: id.serial.clone(),
    }
}

/// What a policy's refusal means, in words.
pub(super) fn rejection_text(r: &Rejection) -> &'static str {
    match r {
        Rejection::Unknown => "unknown to the registry",
        Rejection::Revoked => "revoked",
        Rejection::Superseded => "superseded by a newer certificate",
    }
}

/// The last answer about each certificate (`tiandi_link::confirm`, bounded; no I/O), and the
/// fail-closed decision from it, in words for the log and the close reason.
pub(super) struct Answers {
    known: Confirmations,
    pub(super) max_age: Duration,
}

impl Answers {
    pub(super) fn new(max_age: Duration) -> Answers {
        Answers {
            known: Confirmations::new(max_age),
            max_age,
        }
    }

    pub(super) fn remember(&self, c: &SiteCert, v: &SiteVerdict) {
        self.known
            .remember(&c.site, &c.serial, v.allowed, &v.reason);
    }

    /// The decision without an answer from upstream (`why`): fail closed unless confirmed
    /// within `max_age`. Said in the log either way.
    pub(super) fn decide_offline(&self, c: &SiteCert, why: &str) -> Result<(), String> {
        let site = &c.site;
        let max_age_s = self.max_age.as_secs();
        match self.known.offline(site, &c.serial) {
            Offline::Recent(ago) => {
                debug!(%site, confirmed_s_ago = ago.as_secs(), %why, "No answer from upstream about a participant: confirmed recently, allowed.");
                Ok(())
            }
            Offline::TooOld(ago) => {
                let ago = ago.as_secs();
                warn!(%site, confirmed_s_ago = ago, max_age_s, %why, "No answer from upstream about a participant, last confirmed too long ago: refused (fail closed).");
                Err(format!(
                    "{site}: not confirmed by the relay above for {ago} s (over {max_age_s} s), \
                     which does not answer: fail closed"
                ))
            }
            Offline::Refused(reason) => {
                warn!(%site, %reason, %why, "No answer from upstream about a participant, last known refused: refused.");
                Err(format!(
                    "{site}: last refused by the relay above ({reason}), which does not answer"
                ))
            }
            Offline::Never => {
                warn!(%site, %why, "No answer from upstream about a participant never confirmed: refused (fail closed).");
                Err(format!(
                    "{site}: never confirmed by the relay above, which does not answer: fail closed"
                ))
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.len()
    }
}

/// The connection to the upstream relay the checks use, and when to try again after failing.
struct Link {
    conn: Option<quinn::Connection>,
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
}

/// Asks the relay above whether participants' certificates may still take part (see the
/// module doc): at admission and every [`RECHECK`](super::RECHECK); fails closed after
/// `confirmed_within` without an answer.
pub(super) struct UpstreamCheck {
    up: Upstream,
    link: tokio::sync::Mutex<Link>,
    pub(super) answers: Answers,
    /// Whether the last question was answered (the log says when that changes).
    answering: AtomicBool,
}

impl UpstreamCheck {
    pub(super) fn new(up: Upstream, confirmed_within: Duration) -> UpstreamCheck {
        UpstreamCheck {
            up,
            link: tokio::sync::Mutex::new(Link {
                conn: None,
                retry_at: None,
                backoff: BACKOFF_MIN,
            }),
            answers: Answers::new(confirmed_within),
            answering: AtomicBool::new(true),
        }
    }

    /// Each certificate's verdict (in order): upstream's answer, or, without one, the last
    /// answer if it confirmed the certificate recently enough (fail closed). Err: why refused.
    pub(super) async fn check(&self, certs: &[SiteCert]) -> Vec<Result<(), String>> {
        let mut out = Vec::with_capacity(certs.len());
        for batch in certs.chunks(MAX_CHECK_SITES) {
            match self.ask(batch).await {
                Ok(verdicts) => out.extend(batch.iter().zip(verdicts).map(|(c, v)| {
                    if v.allowed {
                        Ok(())
                    } else {
                        Err(format!(
                            "{}: {} (said the relay above, {})",
                            c.site, v.reason, self.up.name
                        ))
                    }
                })),
                Err(why) => out.extend(batch.iter().map(|c| self.answers.decide_offline(c, &why))),
            }
        }
        out
    }

    /// Upstream's verdicts on `certs` (at most [`MAX_CHECK_SITES`]), remembered; Err: no
    /// answer, and why.
    pub(super) async fn ask(&self, certs: &[SiteCert]) -> Result<Vec<SiteVerdict>, String> {
        // Connecting and answering, both within the one deadline.
        let deadline = tokio::time::Instant::now() + CHECK_TIMEOUT;
        let result = match self.connection(deadline).await {
            Err(e) => Err(e),
            Ok(conn) => match tokio::time::timeout_at(deadline, exchange(&conn, certs)).await {
                Ok(Ok(Some(v))) => Ok(v),
                Ok(Ok(None)) => Err("the relay above has no answer either".to_string()),
                Ok(Err(e)) => {
                    self.drop_connection(&conn, &e).await;
                    Err(e)
                }
                Err(_) => {
                    let e = format!("no answer within {} s", CHECK_TIMEOUT.as_secs());
                    self.drop_connection(&conn, &e).await;
                    Err(e)
                }
            },
        };
        match &result {
            Ok(verdicts) => {
                for (c, v) in certs.iter().zip(verdicts) {
                    self.answers.remember(c, v);
                }
                if !self.answering.swap(true, Ordering::Relaxed) {
                    info!(upstream = %self.up.name, "The relay above answers about participants again.");
                }
            }
            Err(why) => {
                if self.answering.swap(false, Ordering::Relaxed) {
                    warn!(upstream = %self.up.name, %why, max_age_s = self.answers.max_age.as_secs(), "No answer from the relay above about participants: admitting and keeping only those it confirmed recently (fail closed).");
                }
            }
        }
        result
    }

    /// The connection to the upstream, made if there is none (or it failed) and the backoff
    /// allows.
    async fn connection(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<quinn::Connection, String> {
        let mut link = tokio::time::timeout_at(deadline, self.link.lock())
            .await
            .map_err(|_| "another check is still connecting".to_string())?;
        if let Some(c) = link.conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        link.conn = None;
        let now = tokio::time::Instant::now();
        if let Some(at) = link.retry_at.filter(|at| *at > now) {
            return Err(format!(
                "the relay above was out of reach; next attempt in {} ms",
                (at - now).as_millis()
            ));
        }
        let connecting = async {
            self.up
                .endpoint
                .connect_with(
                    self.up.client.clone(),
                    self.up.addr,
                    &tiandi_link::tls::relay_server_name(&self.up.name),
                )
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        let result = match tokio::time::timeout_at(deadline, connecting).await {
            Ok(r) => r,
            Err(_) => Err("connecting timed out".to_string()),
        };
        match result {
            Ok(c) => {
                debug!(upstream = %self.up.name, "Check connection to the relay above up.");
                link.conn = Some(c.clone());
                link.retry_at = None;
                link.backoff = BACKOFF_MIN;
                Ok(c)
            }
            Err(e) => {
                let wait = link.backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                link.retry_at = Some(tokio::time::Instant::now() + wait);
                link.backoff = (link.backoff * 2).min(BACKOFF_MAX);
                Err(format!("cannot reach the relay above: {e}"))
            }
        }
    }

    /// A question failed on `conn`: the next one makes a new connection.
    async fn drop_connection(&self, conn: &quinn::Connection, why: &str) {
        debug!(upstream = %self.up.name, %why, "Check connection to the relay above dropped.");
        conn.close(codes::PROTOCOL.into(), b"check failed");
        let mut link = self.link.lock().await;
        if link
            .conn
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            link.conn = None;
        }
    }
}

/// One question on its own stream. Ok(None): upstream says it has no answer.
async fn exchange(
    conn: &quinn::Connection,
    certs: &[SiteCert],
) -> Result<Option<Vec<SiteVerdict>>, String> {
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let (mut w, mut r) = (ControlWriter(send), ControlReader(recv));
    w.send(&Control::CheckSites(CheckSites {
        sites: certs.to_vec(),
    }))
    .await
    .map_err(|e| e.to_string())?;
    let _ = w.0.finish();
    match r.recv().await.map_err(|e| e.to_string())? {
        Some(Control::SitesChecked(a)) if a.results.len() == certs.len() => Ok(Some(a.results)),
        Some(Control::SitesChecked(a)) => Err(format!(
            "{} verdicts for {} certificates",
            a.results.len(),
            certs.len()
        )),
        Some(Control::Error(e)) if e.code == codes::UNANSWERED => {
            debug!(message = %e.message, "The relay above has no answer.");
            Ok(None)
        }
        Some(Control::Error(e)) => Err(format!("refused: {} (code {})", e.message, e.code)),
        Some(other) => Err(format!("expected SitesChecked, got {}", other.name())),
        None => Err("the relay above closed the stream".into()),
    }
}

impl Relay {
    /// Each certificate's verdict, when this relay knows better than its TLS handshake: by its
    /// policy (the registry) if it has one, else by asking upstream (fail closed). None: it
    /// trusts the CA alone.
    pub(super) async fn verdicts(&self, certs: &[SiteCert]) -> Option<Vec<Result<(), String>>> {
        if let Some(policy) = self.policy.get() {
            return Some(
                certs
                    .iter()
                    .map(|c| {
                        policy
                            .check(&identity(c))
                            .map_err(|r| format!("{}: {}", c.site, rejection_text(&r)))
                    })
                    .collect(),
            );
        }
        match &self.checker {
            Some(check) => Some(check.check(certs).await),
            None => None,
        }
    }

    /// What this relay answers a relay below about `certs`. Err: it has no answer.
    async fn answer(&self, certs: &[SiteCert]) -> Result<Vec<SiteVerdict>, String> {
        let named = |c: &SiteCert| {
            tiandi_link::names::validate_name("site", &c.site)
                .and_then(|()| tiandi_link::names::validate_name("province", &c.province))
                .map_err(|e| e.to_string())
        };
        if let Some(policy) = self.policy.get() {
            return Ok(certs
                .iter()
                .map(|c| match named(c).map(|()| policy.check(&identity(c))) {
                    Err(e) => refused(e),
                    Ok(Err(r)) => refused(rejection_text(&r).to_string()),
                    Ok(Ok(())) => SiteVerdict {
                        allowed: true,
                        reason: format!("registry at {}", self.name),
                    },
                })
                .collect());
        }
        if let Some(check) = &self.checker {
            // Only the authority's answers: a confirmation this relay merely remembers would
            // look fresh below.
            return check.ask(certs).await;
        }
        Ok(certs
            .iter()
            .map(|c| match named(c) {
                Err(e) => refused(e),
                Ok(()) => SiteVerdict {
                    allowed: true,
                    reason: NO_REGISTRY.into(),
                },
            })
            .collect())
    }

    /// Serves a connection that opened with `first` (a [`CheckSites`]) instead of a Hello:
    /// only a relay certificate may ask (else `FORBIDDEN`); answers it, then every further
    /// check stream of the connection, until it closes.
    pub(super) async fn serve_checks(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        cert_role: CertRole,
        first: (ControlWriter, CheckSites),
        cancel: CancellationToken,
    ) -> Result<(), IoError> {
        let (mut writer, question) = first;
        if cert_role != CertRole::Relay {
            let msg = "only a relay certificate may check other sites' certificates (the \
                       controller issues them: `tiandi-controller enroll --role relay`)"
                .to_string();
            writer.refuse(codes::FORBIDDEN, &msg).await;
            return Err(IoError::Refused {
                code: codes::FORBIDDEN,
                reason: msg,
            });
        }
        info!("A relay below checks its participants here.");
        self.answer_on(writer, question).await;
        loop {
            let (send, recv) = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(error = %e, "Check connection closed.");
                        return Ok(());
                    }
                },
            };
            let relay = self.clone();
            tokio::spawn(
                async move {
                    let mut reader = ControlReader(recv);
                    let writer = ControlWriter(send);
                    match tokio::time::timeout(QUESTION_TIMEOUT, reader.recv()).await {
                        Ok(Ok(Some(Control::CheckSites(q)))) => relay.answer_on(writer, q).await,
                        Ok(Ok(Some(other))) => {
                            let msg = format!("expected CheckSites, got {}", other.name());
                            stream_error(writer, codes::PROTOCOL, msg).await;
                        }
                        Ok(Err(e)) => stream_error(writer, e.code(), e.to_string()).await,
                        Ok(Ok(None)) | Err(_) => {}
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// Answers one question on its stream.
    async fn answer_on(&self, mut w: ControlWriter, q: CheckSites) {
        let reply = match self.answer(&q.sites).await {
            Ok(results) => {
                let refused = results.iter().filter(|v| !v.allowed).count();
                debug!(
                    asked = q.sites.len(),
                    refused, "Answered a relay below about its participants."
                );
                Control::SitesChecked(SitesChecked { results })
            }
            Err(why) => Control::Error(ErrorMsg {
                code: codes::UNANSWERED,
                message: format!("{}: no answer from the relay above ({why})", self.name),
            }),
        };
        if let Err(e) = w.send(&reply).await {
            debug!(error = %e, "Could not answer a check.");
        }
        let _ = w.0.finish();
    }
}

async fn stream_error(mut w: ControlWriter, code: u32, message: String) {
    debug!(%message, "Bad check stream.");
    let _ = w.send(&Control::Error(ErrorMsg { code, message })).await;
    let _ = w.0.finish();
}

fn refused(reason: String) -> SiteVerdict {
    SiteVerdict {
        allowed: false,
        reason,
    }
}

/// The identity a policy checks (the expiry was the TLS handshake's business below).
fn identity(c: &SiteCert) -> SiteIdentity {
    SiteIdentity {
        site_id: c.site.clone(),
        province: c.province.clone(),
        serial: c.serial.clone(),
        not_after: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(site: &str, serial: &str) -> SiteCert {
        SiteCert {
            site: site.into(),
            province: "GD".into(),
            serial: serial.into(),
        }
    }

    fn said(allowed: bool) -> SiteVerdict {
        SiteVerdict {
            allowed,
            reason: if allowed { "registry" } else { "revoked" }.into(),
        }
    }

    /// Without an answer from upstream, only certificates it confirmed within `max_age` pass:
    /// never confirmed, refused last, or confirmed too long ago are refused (fail closed).
    #[test]
    fn without_an_answer_only_recent_confirmations_pass() {
        let a = Answers::new(Duration::from_millis(300));
        assert!(a.decide_offline(&cert("never", "01"), "down").is_err());
        a.remember(&cert("fresh", "01"), &said(true));
        a.remember(&cert("refused", "01"), &said(false));
        assert!(a.decide_offline(&cert("fresh", "01"), "down").is_ok());
        let why = a
            .decide_offline(&cert("refused", "01"), "down")
            .unwrap_err();
        assert!(why.contains("revoked"), "{why}");
        std::thread::sleep(Duration::from_millis(400));
        let why = a.decide_offline(&cert("fresh", "01"), "down").unwrap_err();
        assert!(why.contains("fail closed"), "{why}");
        // Another certificate of the same site is another question.
        a.remember(&cert("fresh", "02"), &said(true));
        assert!(a.decide_offline(&cert("fresh", "01"), "down").is_err());
        assert!(a.decide_offline(&cert("fresh", "02"), "down").is_ok());
    }

    #[test]
    fn the_memory_of_answers_is_bounded() {
        let a = Answers::new(CONFIRMED_WITHIN);
        use tiandi_link::confirm::MAX_KNOWN;
        for i in 0..MAX_KNOWN + 10 {
            a.remember(&cert(&format!("s{i}"), "01"), &said(true));
        }
        assert_eq!(a.len(), MAX_KNOWN);
        // The newest stay.
        assert!(
            a.decide_offline(&cert(&format!("s{}", MAX_KNOWN + 9), "01"), "down")
                .is_ok()
        );
    }
}
