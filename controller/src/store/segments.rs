//! The sites' history on disk: time-partitioned, append-only segment files with a per-segment
//! site index (what made ingest cheap at 20,000 sites: one sled tree keyed by site had 20,000
//! hot leaves, and sled paged them in and out of its cache for every report).
//!
//! The active segment (`history/NNNNNNNNNN.seg`) takes every stored report, in arrival order;
//! it is also the store's write-ahead log: a group commit is one `write` of the records
//! appended since the last one and one `fdatasync`. Its index (site → offsets and sample
//! times) is kept in memory. At [`Limits::bytes`] or [`Limits::age_ms`] the segment is sealed:
//! its index is written beside it (`NNNNNNNNNN.idx`, sites sorted by a hash of their name) and a
//! new one begins. A query reads the index of each segment whose sample times overlap the
//! range asked for (a binary search with `pread`, no index held in memory for a sealed one)
//! and then the site's records. Retention drops whole segments, sealed before the cutoff.
//!
//! Formats (little-endian). Segment: [`SEG_MAGIC`], id (u64), created (i64 ms), then records:
//! payload length (u32), CRC-32 of the payload (u32), payload = site id length (u16), site id,
//! sample time (i64 ms), first and last sequence number (u64, u64), flags (u8: 1 = it carries
//! device events), the report (protobuf). Index: [`IDX_MAGIC`], a header ([`IdxHeader`], its
//! own CRC-32), the site table (hash u64, first entry u32, entries u32; sorted by hash), the
//! entries (offset u32, sample time i64; each site's in arrival order). A torn tail of the
//! active segment (a commit cut by a crash, never acknowledged) is cut off at open; a sealed
//! segment whose index is missing or damaged has it rebuilt from its records.
//!
//! Hand-written rather than a crate: the access pattern (append by arrival, read by site and
//! time, drop by age) is a log with an index, and an LSM engine would rewrite the data in
//! compactions that this never needs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SEG_MAGIC: &[u8; 8] = b"TDHSEG1\0";
pub const IDX_MAGIC: &[u8; 8] = b"TDHIDX1\0";
const SEG_HEADER: u64 = 24;
/// Bytes before a record's payload.
const REC_HEADER: usize = 8;
/// The fixed part of a payload after the site id.
const REC_FIXED: usize = 8 + 8 + 8 + 1;
/// No payload is larger (a report's frame limit is far below).
const MAX_RECORD: usize = 4 << 20;
/// An index's header: magic, then [`IdxHeader`]'s fields and its CRC.
const IDX_HEADER: u64 = 8 + 8 * 8 + 4 + 4;
const SITE_ENTRY: u64 = 16;
const ENTRY: u64 = 12;
/// A first read of a record: most fit (a report is a few hundred bytes).
const FIRST_READ: usize = 1024;
/// Appended bytes written at once when this many wait (a standby applying a snapshot, a
/// migration: no committer writes between), so the buffer stays bounded.
const PENDING_WRITE: usize = 4 << 20;

/// When a segment is sealed.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub bytes: u64,
    pub age_ms: i64,
}

impl Default for Limits {
    /// 128 MB or an hour: at 20,000 sites every 10 s a segment every ~3 minutes, at 2,000
    /// one every ~30 minutes.
    fn default() -> Limits {
        Limits {
            bytes: 128 << 20,
            age_ms: 3_600_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("history {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("history {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

type Result<T> = std::result::Result<T, SegmentError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One record as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub site: String,
    pub taken_ms: i64,
    pub first: u64,
    pub last: u64,
    pub has_events: bool,
    pub report: Vec<u8>,
}

/// What a record's index entry keeps: where it is and when it was taken.
#[derive(Clone, Copy, Debug)]
struct At {
    off: u32,
    taken_ms: i64,
}

struct Active {
    id: u64,
    path: PathBuf,
    file: Arc<File>,
    created_ms: i64,
    /// Bytes in the file; records after it are in `pending`.
    written: u64,
    pending: Vec<u8>,
    index: HashMap<Box<str>, Vec<At>>,
    min_taken: i64,
    max_taken: i64,
    records: u64,
}

#[derive(Clone, Debug)]
struct Sealed {
    id: u64,
    min_taken: i64,
    max_taken: i64,
    records: u64,
    sealed_ms: i64,
}

/// The header of a sealed segment's index.
#[derive(Clone, Copy, Debug, PartialEq)]
struct IdxHeader {
    id: u64,
    created_ms: i64,
    sealed_ms: i64,
    min_taken: i64,
    max_taken: i64,
    records: u64,
    data_len: u64,
    sites: u64,
}

/// The segments of one history directory. Not internally locked: the store keeps it under
/// its lock and reads sealed segments through [`Segments::plan`] outside it.
pub struct Segments {
    dir: PathBuf,
    limits: Limits,
    active: Active,
    sealed: Vec<Sealed>,
    /// Writes made to the active segment, and how many of them an `fdatasync` covers.
    written_gen: u64,
    synced_gen: u64,
}

/// What [`Segments::to_sync`] hands out: the file and the writes its sync covers.
pub struct SyncTarget {
    pub file: Arc<File>,
    pub path: PathBuf,
    generation: u64,
}

/// What a read needs, taken under the lock: the active segment's file, the site's entries there
/// (those not yet written, with their bytes), and the sealed segments to look in.
pub struct Plan {
    dir: PathBuf,
    active_file: Arc<File>,
    active_path: PathBuf,
    active: Vec<At>,
    unwritten: Vec<Record>,
    sealed: Vec<Sealed>,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:010}.seg"))
}

fn idx_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:010}.idx"))
}

/// The stable hash of a site id that orders a sealed index.
fn site_hash(site: &str) -> u64 {
    let h = blake3::hash(site.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Appends one record to `buf`.
fn encode(buf: &mut Vec<u8>, r: &RecordRef<'_>) {
    let site = &r.site.as_bytes()[..r.site.len().min(u16::MAX as usize)];
    let payload_len = 2 + site.len() + REC_FIXED + r.report.len();
    let start = buf.len();
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&(site.len() as u16).to_le_bytes());
    buf.extend_from_slice(site);
    buf.extend_from_slice(&r.taken_ms.to_le_bytes());
    buf.extend_from_slice(&r.first.to_le_bytes());
    buf.extend_from_slice(&r.last.to_le_bytes());
    buf.push(u8::from(r.has_events));
    buf.extend_from_slice(r.report);
    let crc = crc32fast::hash(&buf[start + REC_HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A record to append.
pub struct RecordRef<'a> {
    pub site: &'a str,
    pub taken_ms: i64,
    pub first: u64,
    pub last: u64,
    pub has_events: bool,
    pub report: &'a [u8],
}

/// The payload of a record, checked; `None` if it is not one.
fn decode_payload(payload: &[u8]) -> Option<Record> {
    let site_len = u16::from_le_bytes(payload.get(..2)?.try_into().ok()?) as usize;
    let site = std::str::from_utf8(payload.get(2..2 + site_len)?).ok()?;
    let fixed = payload.get(2 + site_len..2 + site_len + REC_FIXED)?;
    let num = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().expect("8 bytes"));
    Some(Record {
        site: site.to_string(),
        taken_ms: num(0) as i64,
        first: num(8),
        last: num(16),
        has_events: fixed[24] & 1 == 1,
        report: payload[2 + site_len + REC_FIXED..].to_vec(),
    })
}

/// The whole records at the start of `bytes` (each with its offset relative to `bytes`), and
/// how many bytes they take.
fn decode_all(bytes: &[u8]) -> (Vec<(usize, Record)>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= REC_HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if !(2 + REC_FIXED..=MAX_RECORD).contains(&len) || bytes.len() - at - REC_HEADER < len {
            break;
        }
        let payload = &bytes[at + REC_HEADER..at + REC_HEADER + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(r) = decode_payload(payload) else {
            break;
        };
        out.push((at, r));
        at += REC_HEADER + len;
    }
    (out, at)
}

/// Reads the record at `off` of `file`.
fn read_record(file: &File, path: &Path, off: u64) -> Result<Record> {
    let mut buf = vec![0u8; FIRST_READ];
    let n = read_at_most(file, &mut buf, off).map_err(io_err(path))?;
    buf.truncate(n);
    let corrupt = |message: String| SegmentError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    if buf.len() < REC_HEADER {
        return Err(corrupt(format!("no record at {off}")));
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if !(2 + REC_FIXED..=MAX_RECORD).contains(&len) {
        return Err(corrupt(format!("a record of {len} bytes at {off}")));
    }
    if buf.len() < REC_HEADER + len {
        let have = buf.len();
        buf.resize(REC_HEADER + len, 0);
        file.read_exact_at(&mut buf[have..], off + have as u64)
            .map_err(io_err(path))?;
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let payload = &buf[REC_HEADER..REC_HEADER + len];
    if crc32fast::hash(payload) != crc {
        return Err(corrupt(format!("the record at {off} fails its check")));
    }
    decode_payload(payload).ok_or_else(|| corrupt(format!("the record at {off} is malformed")))
}

/// `pread` until `buf` is full or the file ends.
fn read_at_most(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl IdxHeader {
    fn encode(&self) -> Vec<u8> {
        let mut b = IDX_MAGIC.to_vec();
        for v in [
            self.id,
            self.created_ms as u64,
            self.sealed_ms as u64,
            self.min_taken as u64,
            self.max_taken as u64,
            self.records,
            self.data_len,
            self.sites,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        debug_assert_eq!(b.len() as u64, IDX_HEADER);
        b
    }

    fn decode(b: &[u8]) -> Option<IdxHeader> {
        if b.len() < IDX_HEADER as usize || &b[..8] != IDX_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[72..76].try_into().ok()?);
        if crc32fast::hash(&b[..72]) != crc {
            return None;
        }
        let n = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
        Some(IdxHeader {
            id: n(0),
            created_ms: n(1) as i64,
            sealed_ms: n(2) as i64,
            min_taken: n(3) as i64,
            max_taken: n(4) as i64,
            records: n(5),
            data_len: n(6),
            sites: n(7),
        })
    }
}

/// Writes the index of a segment (to a temporary name, synced, then renamed).
fn write_index(dir: &Path, header: &IdxHeader, index: &HashMap<Box<str>, Vec<At>>) -> Result<()> {
    let path = idx_path(dir, header.id);
    let tmp = path.with_extension("idx.tmp");
    let mut sites: Vec<(u64, &Vec<At>)> = index
        .iter()
        .map(|(site, ats)| (site_hash(site), ats))
        .collect();
    sites.sort_unstable_by_key(|(h, _)| *h);
    let mut b = header.encode();
    b.reserve(sites.len() * SITE_ENTRY as usize + header.records as usize * ENTRY as usize);
    let mut first = 0u32;
    for (h, ats) in &sites {
        b.extend_from_slice(&h.to_le_bytes());
        b.extend_from_slice(&first.to_le_bytes());
        b.extend_from_slice(&(ats.len() as u32).to_le_bytes());
        first += ats.len() as u32;
    }
    for (_, ats) in &sites {
        for a in ats.iter() {
            b.extend_from_slice(&a.off.to_le_bytes());
            b.extend_from_slice(&a.taken_ms.to_le_bytes());
        }
    }
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&b).map_err(io_err(&tmp))?;
    f.sync_data().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(())
}

/// Reads a segment whole (sequentially), calling `f` with each record and its offset; returns
/// where its whole records end.
fn scan(path: &Path, f: &mut dyn FnMut(u64, Record) -> bool) -> Result<u64> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; SEG_HEADER as usize];
    r.read_exact(&mut head).map_err(io_err(path))?;
    if &head[..8] != SEG_MAGIC {
        return Err(SegmentError::Corrupt {
            path: path.to_path_buf(),
            message: "not a history segment".into(),
        });
    }
    let mut at = SEG_HEADER;
    let mut buf = Vec::new();
    loop {
        let mut h = [0u8; REC_HEADER];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(at),
            Err(e) => return Err(io_err(path)(e)),
        }
        let len = u32::from_le_bytes(h[..4].try_into().expect("4")) as usize;
        if !(2 + REC_FIXED..=MAX_RECORD).contains(&len) {
            return Ok(at);
        }
        buf.resize(len, 0);
        match r.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(at),
            Err(e) => return Err(io_err(path)(e)),
        }
        if crc32fast::hash(&buf) != u32::from_le_bytes(h[4..].try_into().expect("4")) {
            return Ok(at);
        }
        let Some(rec) = decode_payload(&buf) else {
            return Ok(at);
        };
        if !f(at, rec) {
            return Ok(at);
        }
        at += (REC_HEADER + len) as u64;
    }
}

/// The site's entries in sealed segment `id` with the segment file to read them from; `None`
/// when the site has none there or the segment was pruned since the plan was made.
fn sealed_for(dir: &Path, id: u64, site: &str) -> Result<Option<(Vec<At>, File, PathBuf)>> {
    let Some(ats) = lookup(dir, id, site)? else {
        return Ok(None);
    };
    let path = seg_path(dir, id);
    match File::open(&path) {
        Ok(file) => Ok(Some((ats, file, path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// The site's entries in a sealed segment's index (a binary search by `pread`).
fn lookup(dir: &Path, id: u64, site: &str) -> Result<Option<Vec<At>>> {
    let path = idx_path(dir, id);
    let file = match File::open(&path) {
        Ok(f) => f,
        // Pruned since the plan was made.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mut hb = vec![0u8; IDX_HEADER as usize];
    file.read_exact_at(&mut hb, 0).map_err(io_err(&path))?;
    let header = IdxHeader::decode(&hb).ok_or_else(|| SegmentError::Corrupt {
        path: path.clone(),
        message: "damaged index header".into(),
    })?;
    let want = site_hash(site);
    let entry = |i: u64| -> Result<(u64, u32, u32)> {
        let mut e = [0u8; SITE_ENTRY as usize];
        file.read_exact_at(&mut e, IDX_HEADER + i * SITE_ENTRY)
            .map_err(io_err(&path))?;
        Ok((
            u64::from_le_bytes(e[..8].try_into().expect("8")),
            u32::from_le_bytes(e[8..12].try_into().expect("4")),
            u32::from_le_bytes(e[12..].try_into().expect("4")),
        ))
    };
    let (mut lo, mut hi) = (0u64, header.sites);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if entry(mid)?.0 < want {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let entries_at = IDX_HEADER + header.sites * SITE_ENTRY;
    let mut out = Vec::new();
    // Equal hashes (two sites, astronomically unlikely) sit side by side: take them all; the
    // records name their site.
    while lo < header.sites {
        let (h, first, count) = entry(lo)?;
        if h != want {
            break;
        }
        if u64::from(first) + u64::from(count) > header.records {
            return Err(SegmentError::Corrupt {
                path,
                message: "index entry out of range".into(),
            });
        }
        let mut b = vec![0u8; count as usize * ENTRY as usize];
        file.read_exact_at(&mut b, entries_at + u64::from(first) * ENTRY)
            .map_err(io_err(&path))?;
        out.extend(b.chunks_exact(ENTRY as usize).map(|c| At {
            off: u32::from_le_bytes(c[..4].try_into().expect("4")),
            taken_ms: i64::from_le_bytes(c[4..].try_into().expect("8")),
        }));
        lo += 1;
    }
    Ok(Some(out))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Active {
    fn create(dir: &Path, id: u64) -> Result<Active> {
        let path = seg_path(dir, id);
        let created_ms = now_ms();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut head = SEG_MAGIC.to_vec();
        head.extend_from_slice(&id.to_le_bytes());
        head.extend_from_slice(&created_ms.to_le_bytes());
        file.write_all(&head).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))?;
        sync_dir(dir)?;
        Ok(Active::empty(id, path, file, created_ms))
    }

    /// A segment of `id` with its header written and no record counted yet.
    fn empty(id: u64, path: PathBuf, file: File, created_ms: i64) -> Active {
        Active {
            id,
            path,
            file: Arc::new(file),
            created_ms,
            written: SEG_HEADER,
            pending: Vec::new(),
            index: HashMap::new(),
            min_taken: i64::MAX,
            max_taken: i64::MIN,
            records: 0,
        }
    }

    fn note(&mut self, site: &str, off: u64, taken_ms: i64) {
        let at = At {
            off: off as u32,
            taken_ms,
        };
        match self.index.get_mut(site) {
            Some(v) => v.push(at),
            None => {
                self.index.insert(site.into(), vec![at]);
            }
        }
        self.min_taken = self.min_taken.min(taken_ms);
        self.max_taken = self.max_taken.max(taken_ms);
        self.records += 1;
    }

    fn header(&self, sealed_ms: i64) -> IdxHeader {
        IdxHeader {
            id: self.id,
            created_ms: self.created_ms,
            sealed_ms,
            min_taken: self.min_taken,
            max_taken: self.max_taken,
            records: self.records,
            data_len: self.written,
            sites: self.index.len() as u64,
        }
    }
}

impl Segments {
    /// Opens (or creates) the history in `dir`. Calls `replay` with every record of the active
    /// segment and of the last sealed one (what the store's sequence states may not hold yet:
    /// they are written when a segment is sealed).
    pub fn open(dir: &Path, limits: Limits, replay: &mut dyn FnMut(&Record)) -> Result<Segments> {
        tiandi_link::secrets::private_dir(dir).map_err(|e| SegmentError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut ids = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                ids.push(id);
            } else if name.ends_with(".idx.tmp") {
                // An index being written when the controller stopped: written again below.
                let _ = std::fs::remove_file(e.path());
            }
        }
        ids.sort_unstable();
        // An index whose segment is gone (pruned, the index's removal cut short).
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".idx")
                .and_then(|n| n.parse::<u64>().ok())
                && ids.binary_search(&id).is_err()
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut sealed = Vec::new();
        let mut active = None;
        for (i, &id) in ids.iter().enumerate() {
            let last = i + 1 == ids.len();
            let header = std::fs::read(idx_path(dir, id))
                .ok()
                .and_then(|b| IdxHeader::decode(&b))
                .filter(|h| h.id == id);
            match header {
                Some(h) => sealed.push(Sealed {
                    id,
                    min_taken: h.min_taken,
                    max_taken: h.max_taken,
                    records: h.records,
                    sealed_ms: h.sealed_ms,
                }),
                _ => {
                    // The active one (the last), or a sealed one whose index was lost: read
                    // it whole and index it.
                    let a = Self::reopen(dir, id)?;
                    if last {
                        active = Some(a);
                    } else {
                        let sealed_ms = now_ms();
                        let h = a.header(sealed_ms);
                        write_index(dir, &h, &a.index)?;
                        tracing::warn!(segment = %a.path.display(), "A history segment had no usable index; rebuilt it.");
                        sealed.push(Sealed {
                            id,
                            min_taken: h.min_taken,
                            max_taken: h.max_taken,
                            records: h.records,
                            sealed_ms,
                        });
                    }
                }
            }
        }
        // Replay: the last sealed segment, then the active one.
        if let Some(s) = sealed.last() {
            scan(&seg_path(dir, s.id), &mut |_, r| {
                replay(&r);
                true
            })?;
        }
        let active = match active {
            Some(a) => {
                scan(&a.path, &mut |_, r| {
                    replay(&r);
                    true
                })?;
                a
            }
            None => Active::create(dir, ids.last().map_or(1, |id| id + 1))?,
        };
        Ok(Segments {
            dir: dir.to_path_buf(),
            limits,
            active,
            sealed,
            written_gen: 0,
            synced_gen: 0,
        })
    }

    /// Opens an existing segment as the active one: indexes its records and cuts a torn tail.
    fn reopen(dir: &Path, id: u64) -> Result<Active> {
        let path = seg_path(dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut head = [0u8; SEG_HEADER as usize];
        if read_at_most(&file, &mut head, 0).map_err(io_err(&path))? < head.len()
            || &head[..8] != SEG_MAGIC
        {
            // Created but its header never made it to disk: nothing was stored in it.
            drop(file);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            return Active::create(dir, id);
        }
        let created_ms = i64::from_le_bytes(head[16..24].try_into().expect("8"));
        let mut a = Active::empty(id, path.clone(), file, created_ms);
        let end = scan(&path, &mut |off, r| {
            a.note(&r.site, off, r.taken_ms);
            true
        })?;
        let len = a.file.metadata().map_err(io_err(&path))?.len();
        if end < len {
            tracing::warn!(
                segment = %path.display(),
                kept = a.records,
                cut_bytes = len - end,
                "The history segment ends in an incomplete record (a commit cut short, never acknowledged); cutting it off."
            );
            a.file.set_len(end).map_err(io_err(&path))?;
            a.file.sync_data().map_err(io_err(&path))?;
        }
        a.written = end;
        Ok(a)
    }

    /// Appends a record (written at the next [`Segments::write`], or now if the buffer is
    /// full).
    pub fn append(&mut self, r: &RecordRef<'_>) -> Result<()> {
        if self.active.pending.len() >= PENDING_WRITE {
            self.write()?;
        }
        let off = self.active.written + self.active.pending.len() as u64;
        if off + (REC_HEADER + MAX_RECORD) as u64 > u64::from(u32::MAX) {
            return Err(SegmentError::Corrupt {
                path: self.active.path.clone(),
                message: "the segment is full (it was not sealed in time)".into(),
            });
        }
        encode(&mut self.active.pending, r);
        self.active.note(r.site, off, r.taken_ms);
        Ok(())
    }

    /// Writes what was appended since the last call (one `write`). On an error the records
    /// stay pending, at the same offsets.
    pub fn write(&mut self) -> Result<()> {
        if self.active.pending.is_empty() {
            return Ok(());
        }
        let a = &mut self.active;
        a.file
            .write_all_at(&a.pending, a.written)
            .map_err(io_err(&a.path))?;
        a.written += a.pending.len() as u64;
        a.pending.clear();
        if a.pending.capacity() > PENDING_WRITE {
            a.pending.shrink_to(64 << 10);
        }
        self.written_gen += 1;
        Ok(())
    }

    /// The file to `fdatasync` if something written is not synced yet; after syncing it (the
    /// lock released meanwhile), [`Segments::synced`].
    pub fn to_sync(&self) -> Option<SyncTarget> {
        (self.written_gen > self.synced_gen).then(|| SyncTarget {
            file: self.active.file.clone(),
            path: self.active.path.clone(),
            generation: self.written_gen,
        })
    }

    /// Records a sync of `t`: the writes made before it was handed out are durable.
    pub fn synced(&mut self, t: &SyncTarget) {
        if Arc::ptr_eq(&t.file, &self.active.file) {
            self.synced_gen = self.synced_gen.max(t.generation);
        }
    }

    /// Whether the active segment is due to be sealed.
    pub fn seal_due(&self) -> bool {
        let a = &self.active;
        a.records > 0
            && (a.written + a.pending.len() as u64 >= self.limits.bytes
                || now_ms() - a.created_ms >= self.limits.age_ms)
    }

    /// Seals the active segment (writing and syncing what is pending, then its index) and
    /// starts a new one.
    pub fn seal(&mut self) -> Result<()> {
        self.write()?;
        self.active
            .file
            .sync_data()
            .map_err(io_err(&self.active.path))?;
        let sealed_ms = now_ms();
        let h = self.active.header(sealed_ms);
        write_index(&self.dir, &h, &self.active.index)?;
        sync_dir(&self.dir)?;
        let next = Active::create(&self.dir, self.active.id + 1)?;
        let old = std::mem::replace(&mut self.active, next);
        self.synced_gen = self.written_gen;
        self.sealed.push(Sealed {
            id: old.id,
            min_taken: h.min_taken,
            max_taken: h.max_taken,
            records: h.records,
            sealed_ms,
        });
        Ok(())
    }

    /// What reading `site`'s records taken in `[from_ms, to_ms]` needs (see [`Plan::read`]).
    pub fn plan(&self, site: &str, from_ms: i64, to_ms: i64) -> Plan {
        let a = &self.active;
        let mut active = Vec::new();
        let mut unwritten = Vec::new();
        if let Some(ats) = a.index.get(site) {
            for at in ats
                .iter()
                .filter(|at| (from_ms..=to_ms).contains(&at.taken_ms))
            {
                let off = u64::from(at.off);
                if off >= a.written {
                    let rel = (off - a.written) as usize;
                    if let Some((_, r)) = decode_all(&a.pending[rel..]).0.into_iter().next() {
                        unwritten.push(r);
                    }
                } else {
                    active.push(*at);
                }
            }
        }
        Plan {
            dir: self.dir.clone(),
            active_file: a.file.clone(),
            active_path: a.path.clone(),
            active,
            unwritten,
            sealed: self
                .sealed
                .iter()
                .filter(|s| s.min_taken <= to_ms && from_ms <= s.max_taken)
                .cloned()
                .collect(),
        }
    }

    /// The newest record of `site` (by sample time, then arrival), if it has one. Looks at
    /// the sealed segments only as far as one could hold a newer sample.
    pub fn latest(&self, site: &str) -> Result<Option<Record>> {
        let a = &self.active;
        let mut best: Option<(i64, Record)> = None;
        if let Some(at) = a
            .index
            .get(site)
            // The last of equal maxima: the newest arrival.
            .and_then(|ats| ats.iter().max_by_key(|at| at.taken_ms))
        {
            let off = u64::from(at.off);
            let r = if off >= a.written {
                decode_all(&a.pending[(off - a.written) as usize..])
                    .0
                    .into_iter()
                    .next()
                    .map(|(_, r)| r)
            } else {
                Some(read_record(&a.file, &a.path, off)?)
            };
            best = r.map(|r| (at.taken_ms, r));
        }
        for s in self.sealed.iter().rev() {
            if best.as_ref().is_some_and(|(t, _)| s.max_taken <= *t) {
                continue;
            }
            let Some((ats, file, path)) = sealed_for(&self.dir, s.id, site)? else {
                continue;
            };
            for at in ats.iter().rev() {
                if best.as_ref().is_some_and(|(t, _)| at.taken_ms <= *t) {
                    continue;
                }
                let r = read_record(&file, &path, u64::from(at.off))?;
                if r.site == site {
                    best = Some((at.taken_ms, r));
                }
            }
        }
        Ok(best.map(|(_, r)| r))
    }

    /// How many records `site` has (each segment's index; a record stored twice by an
    /// interrupted migration counts twice).
    pub fn count(&self, site: &str) -> Result<usize> {
        let mut n = self.active.index.get(site).map_or(0, Vec::len);
        for s in &self.sealed {
            n += lookup(&self.dir, s.id, site)?.map_or(0, |v| v.len());
        }
        Ok(n)
    }

    /// Records in all segments.
    pub fn records(&self) -> u64 {
        self.active.records + self.sealed.iter().map(|s| s.records).sum::<u64>()
    }

    /// Removes the sealed segments sealed before `cutoff_ms`; returns how many records went.
    pub fn prune(&mut self, cutoff_ms: i64) -> Result<u64> {
        let mut removed = 0;
        while let Some(s) = self.sealed.first() {
            if s.sealed_ms >= cutoff_ms {
                break;
            }
            let seg = seg_path(&self.dir, s.id);
            match std::fs::remove_file(&seg) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&seg)(e)),
            }
            let idx = idx_path(&self.dir, s.id);
            let _ = std::fs::remove_file(&idx);
            removed += s.records;
            self.sealed.remove(0);
        }
        Ok(removed)
    }

    /// Removes every segment and starts again empty (a standby about to take a snapshot).
    pub fn clear(&mut self) -> Result<()> {
        let next_id = self.active.id + 1;
        for s in std::mem::take(&mut self.sealed) {
            let _ = std::fs::remove_file(idx_path(&self.dir, s.id));
            let seg = seg_path(&self.dir, s.id);
            std::fs::remove_file(&seg).map_err(io_err(&seg))?;
        }
        let next = Active::create(&self.dir, next_id)?;
        let old = std::mem::replace(&mut self.active, next);
        self.synced_gen = self.written_gen;
        std::fs::remove_file(&old.path).map_err(io_err(&old.path))?;
        sync_dir(&self.dir)
    }
}

/// Every record of the history in `dir`, oldest segment first and in arrival order within
/// one, to `f` (which returns false to stop): what a snapshot for a standby and an export
/// carry. Reads the files as they are (a running store writes its buffer first:
/// [`crate::store::Store::write_history`]); a segment pruned meanwhile is skipped, the active
/// one read up to its last whole record.
pub fn for_each_in(dir: &Path, f: &mut dyn FnMut(Record) -> bool) -> Result<()> {
    let mut ids = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(io_err(dir))?;
                if let Some(id) = e
                    .file_name()
                    .to_string_lossy()
                    .strip_suffix(".seg")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    ids.push(id);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    }
    ids.sort_unstable();
    let mut go = true;
    for id in ids {
        let path = seg_path(dir, id);
        match scan(&path, &mut |_, r| {
            go = f(r);
            go
        }) {
            Ok(_) => {}
            Err(SegmentError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(SegmentError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                // Created, its header not yet written.
            }
            Err(e) => return Err(e),
        }
        if !go {
            break;
        }
    }
    Ok(())
}

impl Plan {
    /// The records of the plan's site taken in `[from_ms, to_ms]`, ordered by sample time
    /// (then first sequence number), each once, at most `limit`: the oldest.
    pub fn read(
        mut self,
        site: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>> {
        let mut out: Vec<Record> = std::mem::take(&mut self.unwritten);
        for at in &self.active {
            let r = read_record(&self.active_file, &self.active_path, u64::from(at.off))?;
            if r.site == site {
                out.push(r);
            }
        }
        // Sealed segments by their oldest sample: once `limit` records are in hand, a segment
        // whose oldest sample is newer than all of them cannot add one that is kept.
        self.sealed.sort_by_key(|s| s.min_taken);
        for s in &self.sealed {
            if out.len() >= limit {
                out.sort_by_key(|r| (r.taken_ms, r.first));
                out.truncate(limit);
                if out.last().is_some_and(|r| r.taken_ms < s.min_taken) {
                    break;
                }
            }
            let Some((ats, file, path)) = sealed_for(&self.dir, s.id, site)? else {
                continue;
            };
            for at in ats
                .iter()
                .filter(|at| (from_ms..=to_ms).contains(&at.taken_ms))
            {
                let r = read_record(&file, &path, u64::from(at.off))?;
                if r.site == site {
                    out.push(r);
                }
            }
        }
        out.sort_by_key(|r| (r.taken_ms, r.first));
        out.dedup_by_key(|r| (r.taken_ms, r.first));
        out.truncate(limit);
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
