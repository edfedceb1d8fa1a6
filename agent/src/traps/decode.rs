//! One datagram from a device's address: an SNMP trap (v1, v2c, v3) or inform (v2c, v3), its
//! community or USM user checked, into a [`Notification`]; an inform's acknowledgement, and
//! for a v3 inform the reports of RFC 3414's discovery (this agent is the authoritative
//! engine of an inform sent to it).

use std::time::Instant;

use snmp2::{AsnReader, MessageType, Pdu, Value, asn1, snmp, v3};

use crate::profile::dotted;

/// `snmpTrapOID.0` (SNMPv2-MIB).
const SNMP_TRAP_OID: [u64; 11] = [1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0];
/// `snmpTraps` (SNMPv2-MIB): the v2 form of v1's generic traps is `snmpTraps.(generic + 1)`.
const SNMP_TRAPS: [u64; 9] = [1, 3, 6, 1, 6, 3, 1, 1, 5];
/// `usmStatsUnknownEngineIDs.0` and `usmStatsNotInTimeWindows.0` (SNMP-USER-BASED-SM-MIB).
const UNKNOWN_ENGINE_IDS: [u32; 11] = [1, 3, 6, 1, 6, 3, 15, 1, 1, 4, 0];
const NOT_IN_TIME_WINDOWS: [u32; 11] = [1, 3, 6, 1, 6, 3, 15, 1, 1, 2, 0];
/// Varbinds kept of one notification (the rest are not read).
const MAX_VARBINDS: usize = 32;

/// A trap or an inform, read.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub inform: bool,
    /// The notification's OID (`snmpTrapOID.0`, or a v1 trap's in RFC 3584's v2 form).
    pub trap_oid: Vec<u64>,
    /// The other varbinds: OID and the value as text (an OID dotted, a number, a string).
    pub varbinds: Vec<(Vec<u64>, String)>,
}

/// What became of a datagram.
#[derive(Debug)]
pub enum Outcome {
    /// A notification; `reply` acknowledges an inform.
    Note(Notification, Option<Vec<u8>>),
    /// No notification, only an answer (a v3 sender discovering this engine).
    Reply(Vec<u8>),
    /// Not taken: why.
    Rejected(String),
}

/// How a device authenticates what it sends.
pub struct DeviceAuth {
    pub community: Vec<u8>,
    pub v3: Option<V3Auth>,
}

/// A device's SNMPv3 user, for its traps (its engine is authoritative: learned from the first
/// one that authenticates) and its informs (this agent's engine is).
pub struct V3Auth {
    /// The user's keys not yet localised to any engine.
    pub base: v3::Security,
    /// Localised to the device's engine, once a trap authenticated with it.
    learned: Option<v3::Security>,
    /// Localised to this agent's engine.
    local: v3::Security,
    /// When a trap last made the agent localise the keys to a new engine ID (bounded: it
    /// costs a millisecond of hashing).
    relearned: Option<Instant>,
}

/// This agent's SNMP engine, for informs sent to it (RFC 3411 snmpEngineID, boots, time).
pub struct LocalEngine {
    pub id: Vec<u8>,
    pub boots: i64,
    pub started: Instant,
}

impl LocalEngine {
    fn time(&self) -> i64 {
        self.started.elapsed().as_secs() as i64
    }
}

impl V3Auth {
    pub fn new(base: v3::Security, engine: &LocalEngine) -> Result<V3Auth, String> {
        let local = base
            .clone()
            .with_engine_id(&engine.id)
            .map_err(|e| format!("SNMPv3 keys: {e:?}"))?;
        Ok(V3Auth {
            base,
            learned: None,
            local,
            relearned: None,
        })
    }
}

fn render(v: &Value<'_>) -> String {
    let s = match v {
        Value::Integer(i) => i.to_string(),
        Value::Counter32(c) | Value::Unsigned32(c) | Value::Timeticks(c) => c.to_string(),
        Value::Counter64(c) => c.to_string(),
        Value::OctetString(b) => String::from_utf8_lossy(b)
            .chars()
            .filter(|c| !c.is_control())
            .collect(),
        Value::ObjectIdentifier(o) => dotted(&oid_parts(o)),
        Value::IpAddress(a) => std::net::Ipv4Addr::from(*a).to_string(),
        other => format!("{other:?}"),
    };
    s.chars().take(64).collect()
}

fn oid_parts(o: &snmp2::Oid<'_>) -> Vec<u64> {
    o.iter().map(|i| i.collect()).unwrap_or_default()
}

/// The notification in a parsed PDU (v2 trap or inform: `sysUpTime.0`, `snmpTrapOID.0`, …;
/// v1 trap: RFC 3584 §3.1's translation).
fn note_of(pdu: &Pdu<'_>) -> Result<Notification, String> {
    let inform = pdu.message_type == MessageType::InformRequest;
    let mut varbinds = Vec::new();
    let mut trap_oid = None;
    for (name, v) in pdu.varbinds.clone().take(MAX_VARBINDS + 2) {
        let n = oid_parts(&name);
        if n == SNMP_TRAP_OID {
            if let Value::ObjectIdentifier(o) = &v {
                trap_oid = Some(oid_parts(o));
            }
            continue;
        }
        if n == [1, 3, 6, 1, 2, 1, 1, 3, 0] {
            continue; // sysUpTime.0
        }
        if varbinds.len() < MAX_VARBINDS {
            varbinds.push((n, render(&v)));
        }
    }
    if let Some(t) = &pdu.v1_trap_info {
        trap_oid = Some(if (0..6).contains(&t.generic_trap) {
            let mut o = SNMP_TRAPS.to_vec();
            o.push(t.generic_trap as u64 + 1);
            o
        } else {
            let mut o = oid_parts(&t.enterprise);
            o.push(0);
            o.push(t.specific_trap.max(0) as u64);
            o
        });
    }
    let trap_oid = trap_oid.ok_or("no snmpTrapOID.0 in the notification")?;
    Ok(Notification {
        inform,
        trap_oid,
        varbinds,
    })
}

/// The header fields of a v3 message that say who it is for: (flags, engine ID, boots, time,
/// user name, message ID).
struct V3Head {
    flags: u8,
    engine_id: Vec<u8>,
    user: Vec<u8>,
    msg_id: i64,
}

fn v3_head(buf: &[u8]) -> Result<V3Head, snmp2::Error> {
    let seq = AsnReader::from_bytes(buf).read_raw(asn1::TYPE_SEQUENCE)?;
    let mut r = AsnReader::from_bytes(seq);
    let _version = r.read_asn_integer()?;
    let global = r.read_raw(asn1::TYPE_SEQUENCE)?;
    let mut g = AsnReader::from_bytes(global);
    let msg_id = g.read_asn_integer()?;
    let _max = g.read_asn_integer()?;
    let flags = g.read_asn_octetstring()?.first().copied().unwrap_or(0);
    let params = r.read_asn_octetstring()?;
    let mut p = AsnReader::from_bytes(AsnReader::from_bytes(params).read_raw(asn1::TYPE_SEQUENCE)?);
    let engine_id = p.read_asn_octetstring()?.to_vec();
    let _boots = p.read_asn_integer()?;
    let _time = p.read_asn_integer()?;
    let user = p.read_asn_octetstring()?.to_vec();
    Ok(V3Head {
        flags,
        engine_id,
        user,
        msg_id,
    })
}

fn version_of(buf: &[u8]) -> Option<i64> {
    let seq = AsnReader::from_bytes(buf)
        .read_raw(asn1::TYPE_SEQUENCE)
        .ok()?;
    AsnReader::from_bytes(seq).read_asn_integer().ok()
}

/// BER, written by hand for the one message this side builds itself (snmp2 keeps its encoder
/// to itself): a type, a length, the content.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn ber_int(tag: u8, v: i64) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut i = 0;
    // The shortest two's complement form.
    while i < 7 && ((b[i] == 0 && b[i + 1] & 0x80 == 0) || (b[i] == 0xff && b[i + 1] & 0x80 != 0)) {
        i += 1;
    }
    tlv(tag, &b[i..])
}

fn ber_oid(o: &[u32]) -> Vec<u8> {
    let mut c = vec![(o[0] * 40 + o[1]) as u8];
    for &x in &o[2..] {
        let mut groups = vec![(x & 0x7f) as u8];
        let mut y = x >> 7;
        while y > 0 {
            groups.push((y & 0x7f) as u8 | 0x80);
            y >>= 7;
        }
        groups.reverse();
        c.extend(groups);
    }
    tlv(asn1::TYPE_OBJECTIDENTIFIER, &c)
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(asn1::TYPE_SEQUENCE, &parts.concat())
}

/// A v3 Report PDU, unauthenticated (RFC 3414 §4: the answer to a discovery probe), carrying
/// this engine's ID, boots and time and one counter varbind.
fn plain_report(
    engine: &LocalEngine,
    msg_id: i64,
    user: &[u8],
    req_id: i64,
    counter: &[u32],
    value: u32,
) -> Vec<u8> {
    let octets = |b: &[u8]| tlv(asn1::TYPE_OCTETSTRING, b);
    let varbinds = seq(&[seq(&[
        ber_oid(counter),
        ber_int(snmp::TYPE_COUNTER32, i64::from(value)),
    ])]);
    let report = tlv(
        snmp::MSG_REPORT,
        &[
            ber_int(asn1::TYPE_INTEGER, req_id),
            ber_int(asn1::TYPE_INTEGER, 0),
            ber_int(asn1::TYPE_INTEGER, 0),
            varbinds,
        ]
        .concat(),
    );
    let scoped = seq(&[octets(&engine.id), octets(b""), report]);
    let usm = seq(&[
        octets(&engine.id),
        ber_int(asn1::TYPE_INTEGER, engine.boots),
        ber_int(asn1::TYPE_INTEGER, engine.time()),
        octets(user),
        octets(b""),
        octets(b""),
    ]);
    let global = seq(&[
        ber_int(asn1::TYPE_INTEGER, msg_id),
        ber_int(asn1::TYPE_INTEGER, 65507),
        octets(&[0]),
        ber_int(asn1::TYPE_INTEGER, 3),
    ]);
    seq(&[ber_int(asn1::TYPE_INTEGER, 3), global, octets(&usm), scoped])
}

/// The request ID of a v3 message's scoped PDU, when it is in clear.
fn plain_req_id(buf: &[u8]) -> Option<i64> {
    let seq = AsnReader::from_bytes(buf)
        .read_raw(asn1::TYPE_SEQUENCE)
        .ok()?;
    let mut r = AsnReader::from_bytes(seq);
    r.read_asn_integer().ok()?;
    r.read_raw(asn1::TYPE_SEQUENCE).ok()?;
    r.read_asn_octetstring().ok()?;
    let scoped = r.read_raw(asn1::TYPE_SEQUENCE).ok()?;
    let mut s = AsnReader::from_bytes(scoped);
    s.read_asn_octetstring().ok()?;
    s.read_asn_octetstring().ok()?;
    let ident = s.peek_byte().ok()?;
    let mut pdu = AsnReader::from_bytes(s.read_raw(ident).ok()?);
    pdu.read_asn_integer().ok()
}

/// An authenticated Report (usmStatsNotInTimeWindows, RFC 3414 §3.2 step 7): built as a plain
/// report, read back as a PDU and written again with the user's keys.
fn timed_report(
    engine: &LocalEngine,
    local: &v3::Security,
    msg_id: i64,
    req_id: i64,
) -> Option<Vec<u8>> {
    let user = local.username().to_vec();
    let plain = plain_report(engine, msg_id, &user, req_id, &NOT_IN_TIME_WINDOWS, 1);
    let mut reader = v3::Security::new(&user, b"")
        .with_auth(v3::Auth::NoAuthNoPriv)
        .with_engine_id(&engine.id)
        .ok()?
        .with_engine_boots_and_time(engine.boots, engine.time());
    let pdu = Pdu::from_bytes_with_security(&plain, Some(&mut reader)).ok()?;
    let signer = local
        .clone()
        .with_engine_boots_and_time(engine.boots, engine.time());
    // Reports go authenticated, not encrypted: the sender has no time to decrypt with yet.
    let signer = match signer
        .clone()
        .with_auth(v3::Auth::AuthNoPriv)
        .with_engine_id(&engine.id)
    {
        Ok(s) => s,
        Err(_) => signer,
    };
    pdu.to_bytes_with_security(Some(&signer)).ok()
}

/// Reads one datagram from a device's address.
pub fn decode(buf: &[u8], auth: &mut DeviceAuth, engine: &LocalEngine) -> Outcome {
    match version_of(buf) {
        Some(0 | 1) => {
            let pdu = match Pdu::from_bytes(buf) {
                Ok(p) => p,
                Err(e) => return Outcome::Rejected(format!("not SNMP: {e:?}")),
            };
            if !tiandi_link::secrets::same_secret_bytes(pdu.community, &auth.community) {
                return Outcome::Rejected("wrong community".into());
            }
            if !matches!(
                pdu.message_type,
                MessageType::Trap | MessageType::TrapV1 | MessageType::InformRequest
            ) {
                return Outcome::Rejected(format!(
                    "a {:?}, not a trap or inform",
                    pdu.message_type
                ));
            }
            let note = match note_of(&pdu) {
                Ok(n) => n,
                Err(e) => return Outcome::Rejected(e),
            };
            let reply = if note.inform {
                let mut ack = pdu.clone();
                ack.message_type = MessageType::Response;
                ack.to_bytes().ok()
            } else {
                None
            };
            Outcome::Note(note, reply)
        }
        Some(3) => decode_v3(buf, auth, engine),
        Some(v) => Outcome::Rejected(format!("SNMP version {v}")),
        None => Outcome::Rejected("not SNMP".into()),
    }
}

fn decode_v3(buf: &[u8], auth: &mut DeviceAuth, engine: &LocalEngine) -> Outcome {
    let Some(v3auth) = auth.v3.as_mut() else {
        return Outcome::Rejected("SNMPv3 from a device configured for v2c".into());
    };
    let head = match v3_head(buf) {
        Ok(h) => h,
        Err(e) => return Outcome::Rejected(format!("not SNMPv3: {e:?}")),
    };
    if head.user != v3auth.base.username() && !head.engine_id.is_empty() {
        return Outcome::Rejected("unknown SNMPv3 user".into());
    }
    let for_us = head.engine_id == engine.id;
    if head.flags & snmp::V3_MSG_FLAGS_AUTH == 0 {
        // A discovery probe for an inform: tell the sender this engine's ID.
        if (head.engine_id.is_empty() || for_us) && head.flags & snmp::V3_MSG_FLAGS_REPORTABLE != 0
        {
            let req_id = plain_req_id(buf).unwrap_or(0);
            return Outcome::Reply(plain_report(
                engine,
                head.msg_id,
                &head.user,
                req_id,
                &UNKNOWN_ENGINE_IDS,
                1,
            ));
        }
        return Outcome::Rejected("SNMPv3 without authentication".into());
    }
    if for_us {
        // An inform: this engine is authoritative.
        let mut sec = v3auth
            .local
            .clone()
            .with_engine_boots_and_time(engine.boots, engine.time());
        return match Pdu::from_bytes_with_security(buf, Some(&mut sec)) {
            Ok(pdu) if pdu.message_type == MessageType::InformRequest => {
                let note = match note_of(&pdu) {
                    Ok(n) => n,
                    Err(e) => return Outcome::Rejected(e),
                };
                let mut ack = pdu.clone();
                ack.message_type = MessageType::Response;
                let signer = v3auth
                    .local
                    .clone()
                    .with_engine_boots_and_time(engine.boots, engine.time());
                Outcome::Note(note, ack.to_bytes_with_security(Some(&signer)).ok())
            }
            Ok(pdu) => Outcome::Rejected(format!("a v3 {:?} to the trap port", pdu.message_type)),
            Err(snmp2::Error::AuthFailure(
                v3::AuthErrorKind::EngineTimeMismatch | v3::AuthErrorKind::EngineBootsMismatch,
            )) => match timed_report(engine, &v3auth.local, head.msg_id, 0) {
                Some(r) => Outcome::Reply(r),
                None => Outcome::Rejected("SNMPv3 inform out of the time window".into()),
            },
            Err(e) => Outcome::Rejected(format!("SNMPv3: {e:?}")),
        };
    }
    // A trap: the device's engine is authoritative; its keys are localised to it once.
    let known = v3auth
        .learned
        .as_ref()
        .is_some_and(|s| s.engine_id() == head.engine_id.as_slice());
    let mut sec = if known {
        v3auth.learned.clone().expect("known")
    } else {
        if v3auth
            .relearned
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(5))
        {
            return Outcome::Rejected(
                "SNMPv3 trap from another engine ID (again within 5 s)".into(),
            );
        }
        v3auth.relearned = Some(Instant::now());
        v3auth.base.clone()
    };
    match Pdu::from_bytes_with_security(buf, Some(&mut sec)) {
        Ok(pdu) if matches!(pdu.message_type, MessageType::Trap) => {
            let note = match note_of(&pdu) {
                Ok(n) => n,
                Err(e) => return Outcome::Rejected(e),
            };
            drop(pdu);
            v3auth.learned = Some(sec);
            Outcome::Note(note, None)
        }
        Ok(pdu) => Outcome::Rejected(format!("a v3 {:?} to the trap port", pdu.message_type)),
        Err(e) => Outcome::Rejected(format!("SNMPv3: {e:?}")),
    }
}
