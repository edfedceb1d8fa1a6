//! The store's write-ahead log: what makes a report durable before it is acknowledged.
//!
//! Every stored report is also appended here; a group commit is one `write` and one
//! `fdatasync` of this file instead of a flush of sled (whose flush hands its buffers to a
//! pool of I/O threads and wakes them all, twice, for each commit). sled itself is flushed at
//! checkpoints (every few seconds and at shutdown), after which the log is emptied. At start
//! the records still in the log are stored again (storing is idempotent: a history entry's key
//! is its site, sample time and sequence number) before anything is acknowledged.
//!
//! A record: payload length (u32 LE), CRC-32 of the payload (u32 LE), payload = site id length
//! (u16 LE), site id, the report (protobuf). Replay stops at the first record that is
//! incomplete or fails its check: the tail of a commit cut by a crash, never acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes before a record's payload.
const HEADER: usize = 8;
/// No payload is larger (a report is a few hundred bytes; its frame limit is far below).
const MAX_RECORD: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The log file, owned by the committer (appends) and the store's opening (replay).
#[derive(Debug)]
pub struct Wal {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
}

/// One record read back.
#[derive(Debug, PartialEq)]
pub struct Record {
    pub site: String,
    pub report: Vec<u8>,
}

/// Appends one record to `buf` (the commit buffer the store fills between commits).
pub fn encode(buf: &mut Vec<u8>, site: &str, report: &[u8]) {
    let site = &site.as_bytes()[..site.len().min(u16::MAX as usize)];
    let payload_len = 2 + site.len() + report.len();
    let start = buf.len();
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&(site.len() as u16).to_le_bytes());
    buf.extend_from_slice(site);
    buf.extend_from_slice(report);
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The whole records at the start of `bytes`, and how many bytes they take.
pub fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if !(2..=MAX_RECORD).contains(&len) || bytes.len() - at - HEADER < len {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let site_len = u16::from_le_bytes([payload[0], payload[1]]) as usize;
        if 2 + site_len > len {
            break;
        }
        let Ok(site) = std::str::from_utf8(&payload[2..2 + site_len]) else {
            break;
        };
        out.push(Record {
            site: site.to_string(),
            report: payload[2 + site_len..].to_vec(),
        });
        at += HEADER + len;
    }
    (out, at)
}

impl Wal {
    /// Opens (or creates) the log and reads back the records it holds. A torn tail is cut off
    /// so that new records follow the last whole one.
    pub fn open(path: &Path) -> Result<(Wal, Vec<Record>), WalError> {
        let io = |source| WalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (records, whole) = decode_all(&bytes);
        if whole < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                kept = records.len(),
                cut_bytes = bytes.len() - whole,
                "The write-ahead log ends in an incomplete record (a commit cut short, never acknowledged); cutting it off."
            );
            file.set_len(whole as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        file.seek(SeekFrom::Start(whole as u64)).map_err(io)?;
        Ok((
            Wal {
                path: path.to_path_buf(),
                file,
                len: whole as u64,
            },
            records,
        ))
    }

    fn err(&self, source: std::io::Error) -> WalError {
        WalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends encoded records and makes them durable (`fdatasync`).
    pub fn commit(&mut self, records: &[u8]) -> Result<(), WalError> {
        if records.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(records) {
            // Whatever part went in is cut off again, so the next commit follows whole records.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(self.err(e));
        }
        self.file.sync_data().map_err(|e| self.err(e))?;
        self.len += records.len() as u64;
        Ok(())
    }

    /// Empties the log (everything in it is durable elsewhere now).
    pub fn reset(&mut self) -> Result<(), WalError> {
        if self.len == 0 {
            return Ok(());
        }
        self.file.set_len(0).map_err(|e| self.err(e))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| self.err(e))?;
        self.file.sync_data().map_err(|e| self.err(e))?;
        self.len = 0;
        Ok(())
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reports.wal");
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert!(records.is_empty());
        let mut buf = Vec::new();
        encode(&mut buf, "bj-001", b"first");
        encode(&mut buf, "gd-017", b"");
        wal.commit(&buf).unwrap();
        let mut buf = Vec::new();
        encode(&mut buf, "bj-001", b"third");
        wal.commit(&buf).unwrap();
        drop(wal);

        // A crash in the middle of the next commit: half a record, then garbage.
        let mut buf = Vec::new();
        encode(&mut buf, "bj-001", b"never acknowledged");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&buf[..buf.len() / 2]).unwrap();
        drop(f);

        let (mut wal, records) = Wal::open(&path).unwrap();
        let got: Vec<(&str, &[u8])> = records
            .iter()
            .map(|r| (r.site.as_str(), r.report.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("bj-001", &b"first"[..]),
                ("gd-017", &b""[..]),
                ("bj-001", &b"third"[..])
            ]
        );
        // New records follow the last whole one.
        let mut buf = Vec::new();
        encode(&mut buf, "xz-003", b"after");
        wal.commit(&buf).unwrap();
        drop(wal);
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[3].site, "xz-003");

        wal.reset().unwrap();
        assert!(wal.is_empty());
        drop(wal);
        let (_, records) = Wal::open(&path).unwrap();
        assert!(records.is_empty());
    }

    #[test]
    fn a_flipped_byte_ends_the_log_there() {
        let mut buf = Vec::new();
        encode(&mut buf, "a", b"one");
        let first = buf.len();
        encode(&mut buf, "a", b"two");
        encode(&mut buf, "a", b"three");
        buf[first + HEADER + 3] ^= 0x40;
        let (records, whole) = decode_all(&buf);
        assert_eq!(records.len(), 1);
        assert_eq!(whole, first);
        // Nonsense lengths end it too.
        let (records, whole) = decode_all(&[0xff; 64]);
        assert!(records.is_empty());
        assert_eq!(whole, 0);
    }
}
