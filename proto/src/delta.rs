//! Per-connection delta encoding of reports (from minor [`DELTA_MINOR`]). A site reports every
//! 10 s, and from one report to the next most of its figures do not change, or change a little
//! (a counter grows by what passed since): each travels as its difference from the previous
//! report on the same connection, and an unchanged one (0) costs nothing at all in protobuf.
//!
//! Order on the sending side: [`strip_for_minor`](crate::names::strip_for_minor) →
//! [`DeltaEncoder::encode`] → [`NameEncoder::compress`](crate::names::NameEncoder::compress);
//! on the receiving side: [`NameDecoder::expand`](crate::names::NameDecoder::expand) →
//! [`DeltaDecoder::decode`]. The stream is reliable and ordered, so both ends hold the same
//! previous report as long as the receiver decodes *every* report frame it reads (a duplicate it
//! will not store too), and a new connection starts without one.
//!
//! What is encoded how:
//! - [`Report::delta`] ([`DeltaMode`]) says whether the report is encoded against the previous
//!   one, and how its entries match. The first report of a connection is `Whole`, and so is any
//!   report whose encoding would not be shorter (a backlog report after the current one, say).
//! - Numbers that count or measure (counters, gauges, times, levels, rates, sizes): the
//!   difference, wrapping (a 64-bit counter that wraps costs a byte, not ten). An unsigned or
//!   `int64` field carries the zigzag of the difference (small either way); a `sint*` field the
//!   plain difference (the wire zigzags it).
//! - Enumerations, flags and bit sets (`status`, `oper_up`, `on_battery`, `missing`): XOR.
//! - Not encoded: `seq`, `seq_last` (framing and acknowledgement), `span_ms` and `samples` (0
//!   but in a downsampled report), the strings and name references that are no key (the names
//!   table makes a repeated one cheap already), and `events` (each report's are new).
//! - Singletons (host, link, a device's UPS, modem and reachability, the trap counters): against
//!   the previous report's, when both have one; otherwise whole.
//! - Entries of lists have keys: a filesystem its mount point, an interface or a device its
//!   name, a device's port (ifIndex, name), a profile's value, problem or alarm its name, a
//!   reachability check (kind, target).
//! - `ByPosition` (a site's usual report: the same devices, ports, filesystems… in the same
//!   order): every list of the report, at every depth, holds the previous report's keys in the
//!   same order; entry `i` is encoded against the previous report's entry `i` and its key is
//!   left out (empty, 0), restored by the receiver. A receiver given a list of another length
//!   refuses the report.
//! - `ByKey` (anything else): an entry is encoded against the previous report's entry of the
//!   same key when that key occurs exactly once in each report's list; any other entry (new, or
//!   one of several with the same key) travels whole, and every key travels. No flag says which
//!   entry is which: both ends decide from what both hold (the previous report whole, the keys
//!   of the current one).
//!
//! Every message's fields are listed without `..` below, so a field added to a message
//! (`messages.rs`) does not compile until it is given a rule here.

use std::collections::HashMap;

use crate::{
    DeltaMode, Device, DeviceAlarm, DeviceInterface, Filesystem, Host, Interface, LinkStats,
    Message, Modem, ObjectProblem, ObjectValue, Probe, ProtoError, Report, TrapStats, Ups,
};

/// The first minor version that knows delta reports: a sender encodes them only for a peer of
/// this minor or later, and a receiver refuses one from an older peer.
pub const DELTA_MINOR: u32 = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Encode,
    Decode,
}

fn zigzag64(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}
fn unzigzag64(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}
fn zigzag32(v: i32) -> u32 {
    ((v << 1) ^ (v >> 31)) as u32
}
fn unzigzag32(v: u32) -> i32 {
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

/// A `uint64`: the zigzag of the wrapping difference.
fn u64d(d: Dir, x: &mut u64, p: u64) {
    *x = match d {
        Dir::Encode => zigzag64(x.wrapping_sub(p) as i64),
        Dir::Decode => p.wrapping_add(unzigzag64(*x) as u64),
    }
}
/// A `uint32`: the zigzag of the wrapping difference.
fn u32d(d: Dir, x: &mut u32, p: u32) {
    *x = match d {
        Dir::Encode => zigzag32(x.wrapping_sub(p) as i32),
        Dir::Decode => p.wrapping_add(unzigzag32(*x) as u32),
    }
}
/// An `int64` (a time): the zigzag of the difference in the field's bits (as a plain negative
/// number it would take ten bytes).
fn i64d(d: Dir, x: &mut i64, p: i64) {
    *x = match d {
        Dir::Encode => zigzag64(x.wrapping_sub(p)) as i64,
        Dir::Decode => p.wrapping_add(unzigzag64(*x as u64)),
    }
}
/// A `sint32`: the wrapping difference (the wire zigzags it).
fn s32d(d: Dir, x: &mut i32, p: i32) {
    *x = match d {
        Dir::Encode => x.wrapping_sub(p),
        Dir::Decode => x.wrapping_add(p),
    }
}
/// A `sint64`: the wrapping difference.
fn s64d(d: Dir, x: &mut i64, p: i64) {
    *x = match d {
        Dir::Encode => x.wrapping_sub(p),
        Dir::Decode => x.wrapping_add(p),
    }
}
/// An enumeration: XOR (its own inverse).
fn xor_enum(x: &mut i32, p: i32) {
    *x ^= p;
}
/// A bit set: XOR.
fn xor_bits(x: &mut u32, p: u32) {
    *x ^= p;
}
/// A flag: XOR.
fn xor_flag(x: &mut bool, p: bool) {
    *x ^= p;
}

/// How a report is encoded or decoded.
#[derive(Clone, Copy, Debug)]
struct How {
    dir: Dir,
    by: Match,
}

/// How the entries of a list are matched with the previous report's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Match {
    /// By key ([`DeltaMode::ByKey`]).
    Key,
    /// By position, keys left out ([`DeltaMode::ByPosition`]).
    Position,
}

/// A list that does not hold the previous report's keys in the same order (encoding), or not
/// as many entries (decoding): the report cannot go by position.
#[derive(Debug)]
struct Mismatch;

/// A message whose figures are encoded against another of its kind (the same rule both ways).
trait Diff {
    fn diff(&mut self, prev: &Self, h: How) -> Result<(), Mismatch>;
}

/// An entry of a list: the key that matches it with the previous report's, which goes
/// (by position) or comes back.
trait Keyed {
    fn key(&self) -> (i64, &str);
    fn clear_key(&mut self);
    fn copy_key(&mut self, from: &Self);
}

/// A singleton: against the previous report's when both have one.
fn one<T: Diff>(h: How, cur: &mut Option<T>, prev: &Option<T>) -> Result<(), Mismatch> {
    match (cur.as_mut(), prev.as_ref()) {
        (Some(c), Some(p)) => c.diff(p, h),
        _ => Ok(()),
    }
}

/// A list. By key: each entry against the previous report's entry of the same key, when that
/// key occurs exactly once in each list; the others whole. By position: entry `i` against the
/// previous report's entry `i`, its key left out (the lists must hold the same keys in the same
/// order).
fn list<T: Diff + Keyed>(h: How, cur: &mut [T], prev: &[T]) -> Result<(), Mismatch> {
    match h.by {
        Match::Key => {
            let pairs = pairs(cur, prev);
            for (c, p) in cur.iter_mut().zip(pairs) {
                if let Some(i) = p {
                    c.diff(&prev[i], h)?;
                }
            }
        }
        Match::Position => {
            if cur.len() != prev.len() {
                return Err(Mismatch);
            }
            for (c, p) in cur.iter_mut().zip(prev) {
                match h.dir {
                    Dir::Encode if c.key() != p.key() => return Err(Mismatch),
                    Dir::Encode => c.clear_key(),
                    Dir::Decode => c.copy_key(p),
                }
                c.diff(p, h)?;
            }
        }
    }
    Ok(())
}

/// Lists up to this many pairs of entries are matched by comparing every pair; longer ones by
/// a hash map (a hostile frame of thousands of entries costs linear time, not quadratic). Both
/// give the same answer.
const SMALL: usize = 64;

/// For each entry of `cur`, the index of its counterpart in `prev` (see [`list`]).
fn pairs<T: Keyed>(cur: &[T], prev: &[T]) -> Vec<Option<usize>> {
    if prev.is_empty() {
        vec![None; cur.len()]
    } else if cur.len().saturating_mul(prev.len()) <= SMALL {
        pairs_small(cur, prev)
    } else {
        pairs_hashed(cur, prev)
    }
}

fn pairs_small<T: Keyed>(cur: &[T], prev: &[T]) -> Vec<Option<usize>> {
    cur.iter()
        .map(|c| {
            let k = c.key();
            let mut found = prev.iter().enumerate().filter(|(_, p)| p.key() == k);
            let first = found.next().map(|(i, _)| i);
            let unique = found.next().is_none() && cur.iter().filter(|o| o.key() == k).count() == 1;
            first.filter(|_| unique)
        })
        .collect()
}

fn pairs_hashed<T: Keyed>(cur: &[T], prev: &[T]) -> Vec<Option<usize>> {
    // Per key: (entries in prev, the first one's index, entries in cur).
    let mut keys: HashMap<(i64, &str), (u32, usize, u32)> = HashMap::with_capacity(prev.len());
    for (i, p) in prev.iter().enumerate() {
        keys.entry(p.key())
            .and_modify(|k| k.0 = k.0.saturating_add(1))
            .or_insert((1, i, 0));
    }
    for c in cur {
        if let Some(k) = keys.get_mut(&c.key()) {
            k.2 = k.2.saturating_add(1);
        }
    }
    cur.iter()
        .map(|c| match keys.get(&c.key()) {
            Some(&(1, i, 1)) => Some(i),
            _ => None,
        })
        .collect()
}

impl Diff for Report {
    fn diff(&mut self, p: &Report, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let Report {
            seq: _,
            seq_last: _,
            taken_ms,
            span_ms: _,
            samples: _,
            host,
            link,
            devices,
            events: _,
            probes,
            traps,
            delta: _,
            // Carried whole: every summary and alarm in it is new.
            federation: _,
        } = self;
        i64d(d, taken_ms, p.taken_ms);
        one(h, host, &p.host)?;
        one(h, link, &p.link)?;
        list(h, devices, &p.devices)?;
        list(h, probes, &p.probes)?;
        one(h, traps, &p.traps)?;
        Ok(())
    }
}

impl Diff for Host {
    fn diff(&mut self, p: &Host, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let Host {
            cpu_permille,
            load1_c,
            load5_c,
            load15_c,
            mem_used_mib,
            mem_total_mib,
            uptime_s,
            filesystems,
            interfaces,
        } = self;
        u32d(d, cpu_permille, p.cpu_permille);
        u32d(d, load1_c, p.load1_c);
        u32d(d, load5_c, p.load5_c);
        u32d(d, load15_c, p.load15_c);
        u64d(d, mem_used_mib, p.mem_used_mib);
        u64d(d, mem_total_mib, p.mem_total_mib);
        u64d(d, uptime_s, p.uptime_s);
        list(h, filesystems, &p.filesystems)?;
        list(h, interfaces, &p.interfaces)?;
        Ok(())
    }
}

impl Keyed for Filesystem {
    fn key(&self) -> (i64, &str) {
        (0, &self.mount)
    }
    fn clear_key(&mut self) {
        self.mount.clear();
    }
    fn copy_key(&mut self, from: &Filesystem) {
        self.mount.clone_from(&from.mount);
    }
}
impl Diff for Filesystem {
    fn diff(&mut self, p: &Filesystem, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let Filesystem {
            mount: _,
            mount_ref: _,
            used_mib,
            total_mib,
        } = self;
        u64d(d, used_mib, p.used_mib);
        u64d(d, total_mib, p.total_mib);
        Ok(())
    }
}

impl Keyed for Interface {
    fn key(&self) -> (i64, &str) {
        (0, &self.name)
    }
    fn clear_key(&mut self) {
        self.name.clear();
    }
    fn copy_key(&mut self, from: &Interface) {
        self.name.clone_from(&from.name);
    }
}
impl Diff for Interface {
    fn diff(&mut self, p: &Interface, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let Interface {
            name: _,
            name_ref: _,
            rx_bytes,
            tx_bytes,
            rx_errors,
            tx_errors,
        } = self;
        u64d(d, rx_bytes, p.rx_bytes);
        u64d(d, tx_bytes, p.tx_bytes);
        u64d(d, rx_errors, p.rx_errors);
        u64d(d, tx_errors, p.tx_errors);
        Ok(())
    }
}

impl Diff for LinkStats {
    fn diff(&mut self, p: &LinkStats, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let LinkStats {
            rtt_ms,
            lost_packets,
            cwnd_bytes,
            tx_bytes,
            rx_bytes,
            sent_packets,
        } = self;
        u32d(d, rtt_ms, p.rtt_ms);
        u64d(d, lost_packets, p.lost_packets);
        u64d(d, cwnd_bytes, p.cwnd_bytes);
        u64d(d, tx_bytes, p.tx_bytes);
        u64d(d, rx_bytes, p.rx_bytes);
        u64d(d, sent_packets, p.sent_packets);
        Ok(())
    }
}

impl Keyed for Device {
    fn key(&self) -> (i64, &str) {
        (0, &self.name)
    }
    fn clear_key(&mut self) {
        self.name.clear();
    }
    fn copy_key(&mut self, from: &Device) {
        self.name.clone_from(&from.name);
    }
}
impl Diff for Device {
    fn diff(&mut self, p: &Device, h: How) -> Result<(), Mismatch> {
        let Device {
            name: _,
            name_ref: _,
            profile,
            status,
            error: _,
            interfaces,
            ups,
            modem,
            values,
            problems,
            alarms,
            profile_name: _,
            profile_name_ref: _,
            reach,
        } = self;
        xor_enum(profile, p.profile);
        xor_enum(status, p.status);
        list(h, interfaces, &p.interfaces)?;
        one(h, ups, &p.ups)?;
        one(h, modem, &p.modem)?;
        list(h, values, &p.values)?;
        list(h, problems, &p.problems)?;
        list(h, alarms, &p.alarms)?;
        one(h, reach, &p.reach)?;
        Ok(())
    }
}

impl Keyed for DeviceInterface {
    fn key(&self) -> (i64, &str) {
        (i64::from(self.index), &self.name)
    }
    fn clear_key(&mut self) {
        self.name.clear();
        self.index = 0;
    }
    fn copy_key(&mut self, from: &DeviceInterface) {
        self.name.clone_from(&from.name);
        self.index = from.index;
    }
}
impl Diff for DeviceInterface {
    fn diff(&mut self, p: &DeviceInterface, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let DeviceInterface {
            index: _,
            name: _,
            name_ref: _,
            oper_up,
            in_octets,
            out_octets,
            in_errors,
            out_errors,
            alias: _,
            alias_ref: _,
            speed_mbps,
        } = self;
        xor_flag(oper_up, p.oper_up);
        u64d(d, in_octets, p.in_octets);
        u64d(d, out_octets, p.out_octets);
        u64d(d, in_errors, p.in_errors);
        u64d(d, out_errors, p.out_errors);
        u32d(d, speed_mbps, p.speed_mbps);
        Ok(())
    }
}

impl Diff for Ups {
    fn diff(&mut self, p: &Ups, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let Ups {
            on_battery,
            charge_pct,
            runtime_s,
            missing,
        } = self;
        xor_flag(on_battery, p.on_battery);
        u32d(d, charge_pct, p.charge_pct);
        u32d(d, runtime_s, p.runtime_s);
        xor_bits(missing, p.missing);
        Ok(())
    }
}

impl Diff for Modem {
    fn diff(&mut self, p: &Modem, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let Modem {
            esno_db_x10,
            rx_level_dbm_x10,
            modcod: _,
            modcod_ref: _,
            tx_power_dbm_x10,
            rx_rate_kbps,
            tx_rate_kbps,
            missing,
        } = self;
        s32d(d, esno_db_x10, p.esno_db_x10);
        s32d(d, rx_level_dbm_x10, p.rx_level_dbm_x10);
        s32d(d, tx_power_dbm_x10, p.tx_power_dbm_x10);
        u32d(d, rx_rate_kbps, p.rx_rate_kbps);
        u32d(d, tx_rate_kbps, p.tx_rate_kbps);
        xor_bits(missing, p.missing);
        Ok(())
    }
}

impl Keyed for ObjectValue {
    fn key(&self) -> (i64, &str) {
        (0, &self.name)
    }
    fn clear_key(&mut self) {
        self.name.clear();
    }
    fn copy_key(&mut self, from: &ObjectValue) {
        self.name.clone_from(&from.name);
    }
}
impl Diff for ObjectValue {
    fn diff(&mut self, p: &ObjectValue, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let ObjectValue {
            name: _,
            name_ref: _,
            num,
            exp,
            text: _,
            text_ref: _,
            unit: _,
            unit_ref: _,
            has_num,
        } = self;
        s64d(d, num, p.num);
        s32d(d, exp, p.exp);
        xor_flag(has_num, p.has_num);
        Ok(())
    }
}

impl Keyed for ObjectProblem {
    fn key(&self) -> (i64, &str) {
        (0, &self.name)
    }
    fn clear_key(&mut self) {
        self.name.clear();
    }
    fn copy_key(&mut self, from: &ObjectProblem) {
        self.name.clone_from(&from.name);
    }
}
impl Diff for ObjectProblem {
    fn diff(&mut self, p: &ObjectProblem, _: How) -> Result<(), Mismatch> {
        let ObjectProblem {
            name: _,
            name_ref: _,
            kind,
            detail: _,
            essential,
        } = self;
        xor_enum(kind, p.kind);
        xor_flag(essential, p.essential);
        Ok(())
    }
}

impl Keyed for DeviceAlarm {
    fn key(&self) -> (i64, &str) {
        (0, &self.name)
    }
    fn clear_key(&mut self) {
        self.name.clear();
    }
    fn copy_key(&mut self, from: &DeviceAlarm) {
        self.name.clone_from(&from.name);
    }
}
impl Diff for DeviceAlarm {
    fn diff(&mut self, p: &DeviceAlarm, _: How) -> Result<(), Mismatch> {
        let DeviceAlarm {
            name: _,
            name_ref: _,
            severity,
            detail: _,
        } = self;
        xor_enum(severity, p.severity);
        Ok(())
    }
}

impl Keyed for Probe {
    fn key(&self) -> (i64, &str) {
        (i64::from(self.kind), &self.target)
    }
    fn clear_key(&mut self) {
        self.target.clear();
        self.kind = 0;
    }
    fn copy_key(&mut self, from: &Probe) {
        self.target.clone_from(&from.target);
        self.kind = from.kind;
    }
}
impl Diff for Probe {
    fn diff(&mut self, p: &Probe, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let Probe {
            target: _,
            target_ref: _,
            kind: _,
            ok,
            rtt_us,
            error: _,
            error_ref: _,
        } = self;
        xor_flag(ok, p.ok);
        u32d(d, rtt_us, p.rtt_us);
        Ok(())
    }
}

impl Diff for TrapStats {
    fn diff(&mut self, p: &TrapStats, h: How) -> Result<(), Mismatch> {
        let d = h.dir;
        let TrapStats {
            received,
            forwarded,
            summarised,
            unknown_source,
            rejected,
            ignored,
        } = self;
        u64d(d, received, p.received);
        u64d(d, forwarded, p.forwarded);
        u64d(d, summarised, p.summarised);
        u64d(d, unknown_source, p.unknown_source);
        u64d(d, rejected, p.rejected);
        u64d(d, ignored, p.ignored);
        Ok(())
    }
}

/// The sending side of one connection: the previous report it sent, whole (stripped for the
/// peer, names not yet compressed).
#[derive(Default, Debug)]
pub struct DeltaEncoder {
    enabled: bool,
    prev: Option<Report>,
}

impl DeltaEncoder {
    /// For a connection to a peer of protocol minor `minor` (an older one gets whole reports).
    pub fn for_peer(minor: u32) -> DeltaEncoder {
        DeltaEncoder {
            enabled: minor >= DELTA_MINOR,
            prev: None,
        }
    }

    /// Encodes `report` (in place) against the previous one sent on this connection when that
    /// makes it shorter (by position when every list holds the previous report's keys in the
    /// same order, else by key), and remembers it. Every report given here must then be sent,
    /// in this order.
    pub fn encode(&mut self, report: &mut Report) {
        report.delta = DeltaMode::Whole as i32;
        if !self.enabled {
            return;
        }
        let whole = report.clone();
        if let Some(prev) = &self.prev {
            let dir = Dir::Encode;
            report.delta = match report.diff(
                prev,
                How {
                    dir,
                    by: Match::Position,
                },
            ) {
                Ok(()) => DeltaMode::ByPosition as i32,
                Err(Mismatch) => {
                    report.clone_from(&whole);
                    let by_key = report.diff(
                        prev,
                        How {
                            dir,
                            by: Match::Key,
                        },
                    );
                    debug_assert!(by_key.is_ok(), "matching by key cannot fail");
                    DeltaMode::ByKey as i32
                }
            };
            if report.encoded_len() >= whole.encoded_len() {
                report.clone_from(&whole);
            }
        }
        self.prev = Some(whole);
    }
}

/// The receiving side of one connection: the previous report it received, whole.
///
/// Memory: one report per connection (a typical site's is 2–3 KB on the heap with its
/// strings; a 48-port switch adds ~7 KB: `tests/report_size.rs`), so ~50 MB for 20,000
/// connected sites. Nothing is kept for a peer too old to send delta reports.
#[derive(Default, Debug)]
pub struct DeltaDecoder {
    enabled: bool,
    prev: Option<Report>,
}

impl DeltaDecoder {
    /// For a connection from a peer of protocol minor `minor` (from an older one, a delta
    /// report is an error).
    pub fn for_peer(minor: u32) -> DeltaDecoder {
        DeltaDecoder {
            enabled: minor >= DELTA_MINOR,
            prev: None,
        }
    }

    /// Restores a delta report (in place; its names already expanded) and remembers it. Call it
    /// for every report read from the connection, in order, one that will be discarded too.
    pub fn decode(&mut self, report: &mut Report) -> Result<(), ProtoError> {
        let by = match DeltaMode::try_from(report.delta) {
            Ok(DeltaMode::Whole) => None,
            Ok(DeltaMode::ByKey) => Some(Match::Key),
            Ok(DeltaMode::ByPosition) => Some(Match::Position),
            Err(_) => return Err(ProtoError::Delta("a report of an unknown delta mode")),
        };
        if !self.enabled {
            return match by {
                Some(_) => Err(ProtoError::Delta(
                    "a delta report from a peer whose protocol version predates them",
                )),
                None => Ok(()),
            };
        }
        if let Some(by) = by {
            let prev = self.prev.as_ref().ok_or(ProtoError::Delta(
                "a delta report with no earlier report on this connection",
            ))?;
            let dir = Dir::Decode;
            report.diff(prev, How { dir, by }).map_err(|Mismatch| {
                ProtoError::Delta(
                    "a delta report by position whose lists are not as long as the previous \
                     report's",
                )
            })?;
            report.delta = DeltaMode::Whole as i32;
        }
        self.prev = Some(report.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
