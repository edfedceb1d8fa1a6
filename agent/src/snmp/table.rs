//! IF-MIB's interface table: ifTable and ifXTable walked together with GETBULK (every column
//! of a row in one request, several rows an answer), bounded in rows and in time.

use std::collections::BTreeMap;
use std::time::Instant;

use snmp2::{AsyncSession, Value};
use tiandi_proto::DeviceInterface;

use super::{PollError, oid, oid_parts, snmp_err};
use crate::profile::dotted;

/// Varbinds asked per GETBULK answer (columns × rows): about 2 KB.
const VARBINDS_PER_ANSWER: usize = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Descr,
    Oper,
    InErrors,
    OutErrors,
    Name,
    HcIn,
    HcOut,
    HighSpeed,
    Alias,
    In32,
    Out32,
}

/// IF-MIB (RFC 2863) columns: ifTable `1.3.6.1.2.1.2.2.1.x`, ifXTable `1.3.6.1.2.1.31.1.1.1.x`.
const IF_TABLE: [u64; 9] = [1, 3, 6, 1, 2, 1, 2, 2, 1];
const IFX_TABLE: [u64; 10] = [1, 3, 6, 1, 2, 1, 31, 1, 1, 1];

fn column(c: Col) -> Vec<u64> {
    let (base, n): (&[u64], u64) = match c {
        Col::Descr => (&IF_TABLE, 2),
        Col::Oper => (&IF_TABLE, 8),
        Col::In32 => (&IF_TABLE, 10),
        Col::InErrors => (&IF_TABLE, 14),
        Col::Out32 => (&IF_TABLE, 16),
        Col::OutErrors => (&IF_TABLE, 20),
        Col::Name => (&IFX_TABLE, 1),
        Col::HcIn => (&IFX_TABLE, 6),
        Col::HcOut => (&IFX_TABLE, 10),
        Col::HighSpeed => (&IFX_TABLE, 15),
        Col::Alias => (&IFX_TABLE, 18),
    };
    let mut v = base.to_vec();
    v.push(n);
    v
}

pub struct Table {
    pub rows: Vec<DeviceInterface>,
    /// Why it was cut short (rows or time), if it was.
    pub truncated: Option<String>,
}

#[derive(Default)]
struct Row {
    descr: Option<String>,
    name: Option<String>,
    alias: Option<String>,
    oper: Option<i64>,
    in_err: u64,
    out_err: u64,
    hc_in: Option<u64>,
    hc_out: Option<u64>,
    in32: Option<u64>,
    out32: Option<u64>,
    speed: u32,
}

fn text(v: &Value<'_>) -> Option<String> {
    match v {
        Value::OctetString(s) => Some(
            String::from_utf8_lossy(s)
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
                .trim()
                .to_string(),
        ),
        _ => None,
    }
}

fn num(v: &Value<'_>) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::Counter32(c) | Value::Unsigned32(c) | Value::Timeticks(c) => Some(u64::from(*c)),
        Value::Counter64(c) => Some(*c),
        _ => None,
    }
}

fn put(rows: &mut BTreeMap<u64, Row>, c: Col, idx: u64, v: &Value<'_>) {
    let r = rows.entry(idx).or_default();
    match c {
        Col::Descr => r.descr = text(v),
        Col::Name => r.name = text(v).filter(|s| !s.is_empty()),
        Col::Alias => r.alias = text(v),
        Col::Oper => r.oper = num(v).map(|x| x as i64),
        Col::InErrors => r.in_err = num(v).unwrap_or(0),
        Col::OutErrors => r.out_err = num(v).unwrap_or(0),
        Col::HcIn => r.hc_in = num(v),
        Col::HcOut => r.hc_out = num(v),
        Col::In32 => r.in32 = num(v),
        Col::Out32 => r.out32 = num(v),
        Col::HighSpeed => r.speed = num(v).unwrap_or(0).min(u64::from(u32::MAX)) as u32,
    }
}

/// Walks `cols` together until each column ends, `max_rows` rows are known or `deadline`
/// passes. Returns why it stopped early, if it did.
async fn walk(
    s: &mut AsyncSession,
    cols: &[Col],
    rows: &mut BTreeMap<u64, Row>,
    max_rows: usize,
    deadline: Instant,
) -> Result<Option<String>, PollError> {
    let prefixes: Vec<Vec<u64>> = cols.iter().map(|c| column(*c)).collect();
    // Each live column's cursor (the last OID read in it).
    let mut live: Vec<(usize, Vec<u64>)> = prefixes.iter().cloned().enumerate().collect();
    let mut requests = 0usize;
    while !live.is_empty() {
        if Instant::now() >= deadline {
            return Ok(Some(format!(
                "{} rows read before the poll's timeout",
                rows.len()
            )));
        }
        requests += 1;
        if requests > 4 * max_rows + 16 {
            return Err(PollError::BadAnswer(
                "the interface table does not end (the device repeats itself)".into(),
            ));
        }
        let reps = (VARBINDS_PER_ANSWER / live.len()).clamp(1, 50) as u32;
        let owned: Vec<snmp2::Oid<'static>> =
            live.iter().map(|(_, c)| oid(c)).collect::<Result<_, _>>()?;
        let refs: Vec<&snmp2::Oid<'_>> = owned.iter().collect();
        let pdu = s.getbulk(&refs, 0, reps).await.map_err(snmp_err)?;
        if pdu.error_status != 0 {
            return Err(PollError::BadAnswer(format!(
                "{} walking the interface table",
                super::error_status_name(pdu.error_status)
            )));
        }
        let vb: Vec<(Vec<u64>, Value<'_>)> =
            pdu.varbinds.map(|(n, v)| (oid_parts(&n), v)).collect();
        if vb.is_empty() {
            break;
        }
        let n = live.len();
        let mut ended = vec![false; n];
        // Answers come row by row: varbind k is column k % n of repetition k / n.
        for (k, (name, v)) in vb.iter().enumerate() {
            let j = k % n;
            if ended[j] {
                continue;
            }
            let (ci, cursor) = &mut live[j];
            let prefix = &prefixes[*ci];
            if !name.starts_with(prefix) || matches!(v, Value::EndOfMibView) {
                ended[j] = true;
                continue;
            }
            if name.as_slice() <= cursor.as_slice() {
                return Err(PollError::BadAnswer(format!(
                    "the device answered OIDs out of order at {}",
                    dotted(name)
                )));
            }
            let Some(&idx) = name.get(prefix.len()) else {
                ended[j] = true;
                continue;
            };
            if rows.len() >= max_rows && !rows.contains_key(&idx) {
                return Ok(Some(format!("cut at {max_rows} rows (max_interfaces)")));
            }
            put(rows, cols[*ci], idx, v);
            *cursor = name.clone();
        }
        let mut j = 0;
        live.retain(|_| {
            let keep = !ended[j];
            j += 1;
            keep
        });
    }
    Ok(None)
}

/// Every interface of the device, in ifIndex order.
pub async fn walk_interfaces(
    s: &mut AsyncSession,
    max_rows: usize,
    deadline: Instant,
) -> Result<Table, PollError> {
    let mut rows = BTreeMap::new();
    let cols = [
        Col::Descr,
        Col::Name,
        Col::Alias,
        Col::Oper,
        Col::HighSpeed,
        Col::HcIn,
        Col::HcOut,
        Col::InErrors,
        Col::OutErrors,
    ];
    let mut truncated = walk(s, &cols, &mut rows, max_rows, deadline).await?;
    // No ifXTable counters (an old device): the 32-bit ones.
    if truncated.is_none() && !rows.is_empty() && rows.values().all(|r| r.hc_in.is_none()) {
        truncated = walk(s, &[Col::In32, Col::Out32], &mut rows, max_rows, deadline).await?;
    }
    let rows = rows
        .into_iter()
        .filter(|(_, r)| r.descr.is_some() || r.name.is_some())
        .map(|(idx, r)| DeviceInterface {
            index: idx.min(u64::from(u32::MAX)) as u32,
            name: r.name.or(r.descr).unwrap_or_default(),
            alias: r.alias.unwrap_or_default(),
            oper_up: r.oper == Some(1),
            in_octets: r.hc_in.or(r.in32).unwrap_or(0),
            out_octets: r.hc_out.or(r.out32).unwrap_or(0),
            in_errors: r.in_err,
            out_errors: r.out_err,
            speed_mbps: r.speed,
            ..Default::default()
        })
        .collect();
    Ok(Table { rows, truncated })
}
