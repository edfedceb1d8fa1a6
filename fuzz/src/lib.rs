//! Helpers the fuzz targets share, and the seed corpus (`examples/seeds.rs` writes it to
//! `fuzz/seeds/<target>/`): real encodings of every message each decoder reads.

pub mod seeds;

use tiandi_proto::Report;

/// Bytes of every name a report carries as text (mounts, interfaces, devices, ModCods).
pub fn report_name_bytes(r: &Report) -> usize {
    let mut n = 0;
    if let Some(h) = &r.host {
        n += h.filesystems.iter().map(|f| f.mount.len()).sum::<usize>();
        n += h.interfaces.iter().map(|i| i.name.len()).sum::<usize>();
    }
    for d in &r.devices {
        n += d.name.len();
        n += d.interfaces.iter().map(|i| i.name.len()).sum::<usize>();
        n += d.modem.as_ref().map_or(0, |m| m.modcod.len());
    }
    n
}
