//! Per-connection string interning. The first time a name (mount point, interface, device,
//! ModCod) crosses a connection it travels as text and both ends add it to their table; after
//! that it travels as `*_ref = index + 1`. Both ends apply the same rule in the same order
//! (reports are processed in stream order), so the tables stay identical without any extra
//! message. A new connection starts with empty tables.
//!
//! The fields of minor 2 (aliases, profile objects, events, probes) are visited too: a peer of
//! minor 1 never sends them, and the agent strips them ([`strip_for_minor`]) before it
//! compresses a report for a controller of minor 1, so both tables stay the same.
//!
//! Bounds (a hostile peer must not grow a table or amplify a frame): a table holds at most
//! [`MAX_NAMES`] names and [`MAX_TABLE_BYTES`] bytes of them (a name that would pass either
//! limit travels as text, on both ends alike); and a report whose names, once expanded, come to
//! more than [`MAX_FRAME`](crate::MAX_FRAME) bytes is refused (a 64 KiB frame of references to a
//! 64 KiB name would otherwise expand to ~1 GB).

use std::collections::HashMap;

use crate::{ProtoError, Report};

/// The largest table either side keeps; names beyond it travel as text.
pub const MAX_NAMES: usize = 1024;
/// The most bytes of names a table keeps (a real site's are a few KiB); names beyond it
/// travel as text.
pub const MAX_TABLE_BYTES: usize = 1 << 20;
/// The most bytes of names one report may carry once its references are expanded.
pub const MAX_EXPANDED_BYTES: usize = crate::MAX_FRAME;

/// Whether a table of `count` names and `bytes` bytes takes one more of `len` bytes (the same
/// rule on both ends keeps the tables identical).
fn fits(count: usize, bytes: usize, len: usize) -> bool {
    count < MAX_NAMES && bytes + len <= MAX_TABLE_BYTES
}

/// Calls `f(text, reference)` for every interned name field in a fixed order.
fn visit<E>(
    report: &mut Report,
    f: &mut dyn FnMut(&mut String, &mut u32) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(host) = report.host.as_mut() {
        for fs in &mut host.filesystems {
            f(&mut fs.mount, &mut fs.mount_ref)?;
        }
        for i in &mut host.interfaces {
            f(&mut i.name, &mut i.name_ref)?;
        }
    }
    for d in &mut report.devices {
        f(&mut d.name, &mut d.name_ref)?;
        for i in &mut d.interfaces {
            f(&mut i.name, &mut i.name_ref)?;
            // From minor 2 (an older peer never sends one, and one is never sent to it).
            f(&mut i.alias, &mut i.alias_ref)?;
        }
        if let Some(m) = d.modem.as_mut() {
            f(&mut m.modcod, &mut m.modcod_ref)?;
        }
        // From here on, fields of minor 2.
        f(&mut d.profile_name, &mut d.profile_name_ref)?;
        for v in &mut d.values {
            f(&mut v.name, &mut v.name_ref)?;
            f(&mut v.text, &mut v.text_ref)?;
            f(&mut v.unit, &mut v.unit_ref)?;
        }
        for p in &mut d.problems {
            f(&mut p.name, &mut p.name_ref)?;
        }
        for a in &mut d.alarms {
            f(&mut a.name, &mut a.name_ref)?;
        }
        if let Some(p) = d.reach.as_mut() {
            f(&mut p.target, &mut p.target_ref)?;
            f(&mut p.error, &mut p.error_ref)?;
        }
    }
    for e in &mut report.events {
        f(&mut e.device, &mut e.device_ref)?;
        f(&mut e.name, &mut e.name_ref)?;
    }
    for p in &mut report.probes {
        f(&mut p.target, &mut p.target_ref)?;
        f(&mut p.error, &mut p.error_ref)?;
    }
    Ok(())
}

/// The sending side's table.
#[derive(Default, Debug)]
pub struct NameEncoder {
    index: HashMap<String, u32>,
    bytes: usize,
}

impl NameEncoder {
    /// Replaces names already sent on this connection by references (in place).
    pub fn compress(&mut self, report: &mut Report) {
        let index = &mut self.index;
        let bytes = &mut self.bytes;
        let _ = visit::<()>(report, &mut |text, reference| {
            *reference = 0;
            if text.is_empty() {
                return Ok(());
            }
            if let Some(i) = index.get(text.as_str()) {
                *reference = *i + 1;
                text.clear();
            } else if fits(index.len(), *bytes, text.len()) {
                let next = index.len() as u32;
                *bytes += text.len();
                index.insert(text.clone(), next);
            }
            Ok(())
        });
    }
}

/// The receiving side's table.
#[derive(Default, Debug)]
pub struct NameDecoder {
    names: Vec<String>,
    bytes: usize,
}

impl NameDecoder {
    /// Restores every referenced name (in place). A reference to an index the table does not
    /// hold is a protocol error, and so is a report whose names would expand to more than
    /// [`MAX_EXPANDED_BYTES`] (checked before each name is copied).
    pub fn expand(&mut self, report: &mut Report) -> Result<(), ProtoError> {
        let names = &mut self.names;
        let bytes = &mut self.bytes;
        let mut expanded = 0usize;
        visit(report, &mut |text, reference| {
            if *reference != 0 {
                let i = (*reference - 1) as usize;
                let name = names.get(i).ok_or(ProtoError::UnknownName(*reference))?;
                expanded += name.len();
                if expanded > MAX_EXPANDED_BYTES {
                    return Err(ProtoError::TooLarge {
                        what: "report's expanded names",
                        len: expanded,
                        max: MAX_EXPANDED_BYTES,
                    });
                }
                text.clone_from(name);
                *reference = 0;
            } else {
                expanded += text.len();
                if !text.is_empty() && fits(names.len(), *bytes, text.len()) {
                    *bytes += text.len();
                    names.push(text.clone());
                }
            }
            Ok(())
        })
    }
}

/// Clears the fields a peer of `minor` does not know, so that its name table (which does not
/// visit them) stays the same as ours. Call before [`NameEncoder::compress`].
pub fn strip_for_minor(report: &mut Report, minor: u32) {
    if minor >= 2 {
        return;
    }
    report.events.clear();
    report.probes.clear();
    report.traps = None;
    for d in &mut report.devices {
        d.values.clear();
        d.problems.clear();
        d.alarms.clear();
        d.profile_name.clear();
        d.reach = None;
        if d.profile == crate::Profile::Other as i32 {
            d.profile = crate::Profile::Unknown as i32;
        }
        for i in &mut d.interfaces {
            i.alias.clear();
            i.speed_mbps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Body, Filesystem, Host, MAX_FRAME, decode, encode};

    fn report_of(mounts: Vec<Filesystem>) -> Report {
        Report {
            seq: 1,
            host: Some(Host {
                filesystems: mounts,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A hostile agent sends one long name, then a frame of nothing but references to it: the
    /// controller refuses the report instead of expanding it to ~1 GB.
    #[test]
    fn references_cannot_amplify_a_frame() {
        let mut dec = NameDecoder::default();
        let long = "m".repeat(60_000);
        let mut first = report_of(vec![Filesystem {
            mount: long.clone(),
            ..Default::default()
        }]);
        dec.expand(&mut first).unwrap();
        let refs = vec![
            Filesystem {
                mount_ref: 1,
                ..Default::default()
            };
            12_000
        ];
        let bytes = encode(Body::Report(report_of(refs)));
        assert!(bytes.len() <= MAX_FRAME, "{} bytes", bytes.len());
        let Body::Report(mut r) = decode(&bytes).unwrap() else {
            panic!("not a report")
        };
        let err = dec.expand(&mut r).unwrap_err();
        assert!(matches!(err, ProtoError::TooLarge { .. }), "{err}");
        // Two references to a short name are fine.
        let mut ok = report_of(vec![
            Filesystem {
                mount: "/".into(),
                ..Default::default()
            },
            Filesystem {
                mount_ref: 2,
                ..Default::default()
            },
        ]);
        dec.expand(&mut ok).unwrap();
        assert_eq!(ok.host.unwrap().filesystems[1].mount, "/");
    }

    /// Both ends stop interning at the same byte budget, so their tables stay identical and a
    /// connection's table never holds more than MAX_TABLE_BYTES.
    #[test]
    fn tables_stop_at_the_byte_budget_on_both_ends() {
        let (mut enc, mut dec) = (NameEncoder::default(), NameDecoder::default());
        for round in 0..2 {
            for i in 0..40 {
                let name = format!("{i:02}{}", "x".repeat(40_000));
                let original = report_of(vec![Filesystem {
                    mount: name,
                    ..Default::default()
                }]);
                let mut wire = original.clone();
                enc.compress(&mut wire);
                let fs = &wire.host.as_ref().unwrap().filesystems[0];
                // Names past the budget (1 MiB / 40 KB: the 27th on) still travel as text.
                assert_eq!(
                    fs.mount_ref != 0,
                    round == 1 && i < 26,
                    "round {round}, name {i}"
                );
                dec.expand(&mut wire).unwrap();
                assert_eq!(wire, original);
            }
        }
        assert!(dec.bytes <= MAX_TABLE_BYTES && enc.bytes == dec.bytes);
        assert_eq!(dec.names.len(), enc.index.len());
    }
}
