//! Admitting a participant: its certificate, the Hello, loop and room checks, the Welcome,
//! then its session until it leaves or the conference ends. (A relay below that opens with
//! `CheckSites` instead of a Hello is served by `check`.)

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::participant::Participant;
use super::rooms::Member;
use super::{CONTROL_QUEUE, HELLO_TIMEOUT, Relay};
use crate::conference_wire::{self, Control, Role, Welcome, codes};
use crate::io::{ControlReader, ControlWriter, IoError};

impl Relay {
    pub(super) async fn participant(
        self: Arc<Self>,
        conn: quinn::Connection,
        cancel: CancellationToken,
    ) {
        let Some(id) = tiandi_link::peer_identity(&conn) else {
            conn.close(codes::FORBIDDEN.into(), b"a site certificate is required");
            return;
        };
        // The role the CA wrote into the certificate; unreadable: not a relay.
        let cert_role = tiandi_link::tls::peer_role(&conn).unwrap_or_default();
        let span = info_span!("participant", site = %id.site_id, remote = %conn.remote_address());
        async move {
            // Checked (with the policy, or with the relay above), and known to `evict_site` and
            // the periodic re-check, from before its Hello on.
            if let Err(why) = self.admit(&id, &conn).await {
                warn!(%why, "Participant refused.");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                conn.close(codes::REVOKED.into(), why.as_bytes());
                return;
            }
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.session(&conn, &id.site_id, cert_role, cancel).await {
                warn!(error = %e, "Participant refused or failed.");
                if matches!(e, IoError::Refused { .. }) {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                }
                conn.close(e.code().into(), e.to_string().as_bytes());
            }
            self.forget(&conn);
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        }
        .instrument(span)
        .await
    }

    async fn session(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        site: &str,
        cert_role: tiandi_link::pki::CertRole,
        cancel: CancellationToken,
    ) -> Result<(), IoError> {
        let (send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| IoError::Stream("no control stream in time".into()))?
            .map_err(|e| IoError::Stream(e.to_string()))?;
        let (mut writer, mut reader) = (ControlWriter(send), ControlReader(recv));
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.recv()).await {
            Err(_) => return Err(IoError::Stream("no Hello in time".into())),
            Ok(r) => match r? {
                Some(Control::Hello(h)) => h,
                // A relay below asking about its participants' certificates: not a session.
                Some(Control::CheckSites(q)) => {
                    return self
                        .serve_checks(conn, cert_role, (writer, q), cancel)
                        .await;
                }
                Some(other) => {
                    return Err(IoError::Wire(conference_wire::WireError::Malformed {
                        what: "control stream",
                        detail: format!("expected Hello, got {}", other.name()),
                    }));
                }
                None => return Err(IoError::Ended),
            },
        };
        let role = conference_wire::check_hello(&hello)?;
        // Only a certificate the controller issued for a relay may cascade (issue 15, finding
        // 5): the relay role lets a participant announce tracks of other sites and bypasses
        // the floor here, so a site's word for it is not enough.
        if role == Role::Relay && cert_role != tiandi_link::pki::CertRole::Relay {
            let msg = format!(
                "site {site} asked for the relay role, but its certificate was not issued for a \
                 relay (the controller issues relay certificates: `tiandi-controller enroll \
                 --role relay`); join as a site"
            );
            writer.refuse(codes::FORBIDDEN, &msg).await;
            return Err(IoError::Refused {
                code: codes::FORBIDDEN,
                reason: msg,
            });
        }
        if hello.path.iter().any(|p| p == &self.name) {
            let msg = format!(
                "relay path {:?} already passes through {}: a cascade must not loop",
                hello.path, self.name
            );
            writer.refuse(codes::LOOP, &msg).await;
            conn.close(codes::LOOP.into(), msg.as_bytes());
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let room = match self.find_room(&hello.room) {
            Some(r) => r,
            None if self.open_rooms => self.room(&hello.room),
            None => {
                let msg = format!("there is no conference {:?} here", hello.room);
                writer.refuse(codes::NO_ROOM, &msg).await;
                conn.close(codes::NO_ROOM.into(), msg.as_bytes());
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        self.ensure_cascade(&room, &cancel);
        info!(room = %room.name, role = role.as_str(), "Participant joined.");
        writer
            .send(&Control::Welcome(Welcome {
                version: conference_wire::VERSION,
                relay: self.name.clone(),
                you: site.to_string(),
                chair: room.floor().chair,
                fec_rtt_ms: self.fec_rtt_ms,
            }))
            .await?;
        {
            let mut roster = room.roster.lock().expect("roster lock poisoned");
            if hello.site_path.is_empty() {
                roster.insert(
                    site.to_string(),
                    Member {
                        site: site.into(),
                        role: role.as_str().into(),
                        ..Default::default()
                    },
                );
            } else {
                // A dual-homed site: one entry for all its paths; a standby joins it quietly.
                let m = roster.entry(site.to_string()).or_insert_with(|| Member {
                    site: site.into(),
                    role: role.as_str().into(),
                    ..Default::default()
                });
                if !m.paths.contains(&hello.site_path) {
                    m.paths.push(hello.site_path.clone());
                    m.paths.sort();
                }
                if !hello.standby {
                    m.path = hello.site_path.clone();
                }
            }
        }

        let p = Arc::new(Participant {
            relay: self.clone(),
            conn: conn.clone(),
            site: site.to_string(),
            role,
            room: room.clone(),
            announced: Mutex::new(HashMap::new()),
            announces: watch::channel(0).0,
            out_ids: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
            link_kbps: hello.link_kbps,
            site_path: hello.site_path.clone(),
            fec: crate::fec::Wish::new(hello.fec_rtt_ms),
            repair_router: (self.fec_rtt_ms > 0).then(|| crate::fec::RepairRouter::start(conn)),
        });
        let stop = cancel.child_token();
        let _stop = stop.clone().drop_guard();
        let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(CONTROL_QUEUE);
        tokio::spawn(
            p.clone()
                .write_control(writer, ctl_rx, stop.clone())
                .in_current_span(),
        );
        tokio::spawn(p.clone().accept_groups(stop.clone()).in_current_span());
        let result = tokio::select! {
            r = p.read_control(&mut reader, &ctl_tx, &stop) => r,
            _ = room.ended.cancelled() => {
                conn.close(codes::NO_ROOM.into(), b"the conference has ended");
                Ok(())
            }
        };
        p.leave();
        result
    }
}
