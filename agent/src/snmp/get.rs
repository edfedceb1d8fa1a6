//! Scalar objects by GET: many to a PDU, and what a device does not answer named per object.
//! A device that answers a whole PDU with an error status (`noSuchName` from an old agent,
//! `genErr`) has its objects asked one by one, so the rest still come; `tooBig` halves the PDU.

use snmp2::AsyncSession;
use tiandi_proto::ProblemKind;

use super::{PollError, oid, oid_parts, raw, snmp_err};
use crate::profile::{Answer, dotted};

/// Objects asked in one PDU (small answers: no fragments over a modem's management port).
const PER_PDU: usize = 16;

/// RFC 3416's error-status names.
pub fn error_status_name(code: u32) -> &'static str {
    match code {
        0 => "noError",
        1 => "tooBig",
        2 => "noSuchName",
        3 => "badValue",
        4 => "readOnly",
        5 => "genErr",
        6 => "noAccess",
        7 => "wrongType",
        8 => "wrongLength",
        9 => "wrongEncoding",
        10 => "wrongValue",
        11 => "noCreation",
        12 => "inconsistentValue",
        13 => "resourceUnavailable",
        14 => "commitFailed",
        15 => "undoFailed",
        16 => "authorizationError",
        17 => "notWritable",
        18 => "inconsistentName",
        _ => "unknown error",
    }
}

/// One answer per OID, in order.
pub async fn get_objects(s: &mut AsyncSession, oids: &[&[u64]]) -> Result<Vec<Answer>, PollError> {
    let mut out = Vec::with_capacity(oids.len());
    for chunk in oids.chunks(PER_PDU) {
        out.extend(get_chunk(s, chunk).await?);
    }
    Ok(out)
}

enum Got {
    Answers(Vec<Answer>),
    /// The whole PDU came back with this error status.
    Status(u32),
}

async fn get_once(s: &mut AsyncSession, oids: &[&[u64]]) -> Result<Got, PollError> {
    let owned: Vec<snmp2::Oid<'static>> = oids.iter().map(|o| oid(o)).collect::<Result<_, _>>()?;
    let refs: Vec<&snmp2::Oid<'_>> = owned.iter().collect();
    let pdu = s.get_many(&refs).await.map_err(snmp_err)?;
    if pdu.error_status != 0 {
        return Ok(Got::Status(pdu.error_status));
    }
    let vb: Vec<(Vec<u64>, Result<crate::profile::Raw, ProblemKind>)> = pdu
        .varbinds
        .map(|(name, v)| (oid_parts(&name), raw(&v)))
        .collect();
    if vb.len() != oids.len() {
        return Err(PollError::BadAnswer(format!(
            "asked for {} objects, got {}",
            oids.len(),
            vb.len()
        )));
    }
    // In order, as RFC 3416 says; an agent that reorders is matched by name.
    let answers = oids
        .iter()
        .enumerate()
        .map(|(i, want)| {
            let hit = if vb[i].0 == *want {
                Some(&vb[i].1)
            } else {
                vb.iter().find(|(n, _)| n == want).map(|(_, v)| v)
            };
            match hit {
                Some(Ok(r)) => Answer::Value(r.clone()),
                Some(Err(k)) => Answer::Problem(*k, String::new()),
                None => Answer::Problem(
                    ProblemKind::WrongType,
                    format!("the answer names another object than {}", dotted(want)),
                ),
            }
        })
        .collect();
    Ok(Got::Answers(answers))
}

async fn get_chunk(s: &mut AsyncSession, oids: &[&[u64]]) -> Result<Vec<Answer>, PollError> {
    match get_once(s, oids).await? {
        Got::Answers(a) => Ok(a),
        // tooBig: halve until it fits.
        Got::Status(1) if oids.len() > 1 => {
            let (a, b) = oids.split_at(oids.len() / 2);
            let mut out = Box::pin(get_chunk(s, a)).await?;
            out.extend(Box::pin(get_chunk(s, b)).await?);
            Ok(out)
        }
        // Any other error status: one by one, so one missing object does not hide the rest.
        Got::Status(_) if oids.len() > 1 => {
            let mut out = Vec::with_capacity(oids.len());
            for o in oids {
                out.extend(Box::pin(get_chunk(s, std::slice::from_ref(o))).await?);
            }
            Ok(out)
        }
        Got::Status(code) => Ok(vec![Answer::Problem(
            ProblemKind::ErrorStatus,
            error_status_name(code).to_string(),
        )]),
    }
}
