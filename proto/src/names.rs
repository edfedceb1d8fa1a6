//! Per-connection string interning. The first time a name (mount point, interface, device,
//! ModCod) crosses a connection it travels as text and both ends add it to their table; after
//! that it travels as `*_ref = index + 1`. Both ends apply the same rule in the same order
//! (reports are processed in stream order), so the tables stay identical without any extra
//! message. A new connection starts with empty tables.

use std::collections::HashMap;

use crate::{ProtoError, Report};

/// The largest table either side keeps; names beyond it travel as text.
pub const MAX_NAMES: usize = 1024;

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
        }
        if let Some(m) = d.modem.as_mut() {
            f(&mut m.modcod, &mut m.modcod_ref)?;
        }
    }
    Ok(())
}

/// The sending side's table.
#[derive(Default, Debug)]
pub struct NameEncoder {
    index: HashMap<String, u32>,
}

impl NameEncoder {
    /// Replaces names already sent on this connection by references (in place).
    pub fn compress(&mut self, report: &mut Report) {
        let index = &mut self.index;
        let _ = visit::<()>(report, &mut |text, reference| {
            *reference = 0;
            if text.is_empty() {
                return Ok(());
            }
            if let Some(i) = index.get(text.as_str()) {
                *reference = *i + 1;
                text.clear();
            } else if index.len() < MAX_NAMES {
                let next = index.len() as u32;
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
}

impl NameDecoder {
    /// Restores every referenced name (in place). A reference to an index the table does not
    /// hold is a protocol error.
    pub fn expand(&mut self, report: &mut Report) -> Result<(), ProtoError> {
        let names = &mut self.names;
        visit(report, &mut |text, reference| {
            if *reference != 0 {
                let i = (*reference - 1) as usize;
                let name = names.get(i).ok_or(ProtoError::UnknownName(*reference))?;
                text.clone_from(name);
                *reference = 0;
            } else if !text.is_empty() && names.len() < MAX_NAMES {
                names.push(text.clone());
            }
            Ok(())
        })
    }
}
