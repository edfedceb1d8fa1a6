//! Packs: sealed chunks side by side, then a trailer listing them.
//!
//! ```text
//! "TDPACK" version(1)           header, 7 bytes
//! blob*                         sealed chunks, back to back
//! entry* (id 32, offset u64 LE, length u32 LE)
//! count u32 LE
//! trailer hash (32)             BLAKE3 of everything before it
//! "TDPKEND\n"                   8 bytes
//! ```
//!
//! A pack is named by the BLAKE3 hash of its bytes. Whoever stores it, without the key, can
//! check the name, read the trailer, check that the entries tile the body exactly, and so
//! verify, copy or drop packs; the owner's index (sealed) says which packs it needs.

use crate::BackupError;
use crate::crypto::ChunkId;

const MAGIC: &[u8; 6] = b"TDPACK";
const END: &[u8; 8] = b"TDPKEND\n";
const HEADER: usize = MAGIC.len() + 1;
const ENTRY: usize = 32 + 8 + 4;
const TAIL: usize = 4 + 32 + END.len();
/// A pack is closed once it holds this much.
pub const TARGET: usize = 16 * 1024 * 1024;
/// The most blobs one pack may list (bounds what a reader allocates for a trailer).
pub const MAX_ENTRIES: usize = 65_536;

/// Where one blob lies in its pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: ChunkId,
    pub offset: u64,
    pub length: u32,
}

/// Builds one pack in memory.
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<Entry>,
}

impl Default for PackWriter {
    fn default() -> PackWriter {
        PackWriter::new()
    }
}

impl PackWriter {
    pub fn new() -> PackWriter {
        let mut buf = Vec::with_capacity(TARGET + crate::chunker::MAX);
        buf.extend_from_slice(MAGIC);
        buf.push(crate::FORMAT_VERSION);
        PackWriter {
            buf,
            entries: Vec::new(),
        }
    }

    /// Adds a sealed blob.
    pub fn add(&mut self, id: ChunkId, sealed: &[u8]) {
        self.entries.push(Entry {
            id,
            offset: self.buf.len() as u64,
            length: u32::try_from(sealed.len()).expect("a sealed chunk is under 4 GiB"),
        });
        self.buf.extend_from_slice(sealed);
    }

    /// Whether it should be closed (size or entry count reached).
    pub fn full(&self) -> bool {
        self.buf.len() >= TARGET || self.entries.len() >= MAX_ENTRIES
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pack's bytes and its name (BLAKE3 of them), and its entries.
    pub fn finish(mut self) -> (blake3::Hash, Vec<u8>, Vec<Entry>) {
        self.buf.reserve_exact(self.entries.len() * ENTRY + TAIL);
        for e in &self.entries {
            self.buf.extend_from_slice(&e.id);
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.length.to_le_bytes());
        }
        let count = u32::try_from(self.entries.len()).expect("entries are bounded");
        self.buf.extend_from_slice(&count.to_le_bytes());
        let h = blake3::hash(&self.buf);
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(END);
        (blake3::hash(&self.buf), self.buf, self.entries)
    }
}

fn bad(msg: impl Into<String>) -> BackupError {
    BackupError::BadPack(msg.into())
}

/// Reads and checks a pack's trailer, without the key: the magic and version, the trailer's
/// hash, and that the entries tile the body from the header to the trailer with no gap or
/// overlap.
pub fn read_trailer(pack: &[u8]) -> Result<Vec<Entry>, BackupError> {
    if pack.len() < HEADER + TAIL {
        return Err(bad(format!("{} bytes is too short for a pack", pack.len())));
    }
    if &pack[..MAGIC.len()] != MAGIC || &pack[pack.len() - END.len()..] != END {
        return Err(bad("not a pack (magic)"));
    }
    let version = pack[MAGIC.len()];
    if version > crate::FORMAT_VERSION {
        return Err(BackupError::Version(version));
    }
    let hash_at = pack.len() - END.len() - 32;
    if blake3::hash(&pack[..hash_at]).as_bytes() != &pack[hash_at..hash_at + 32] {
        return Err(bad(
            "trailer hash does not match: the pack was changed or cut",
        ));
    }
    let count_at = hash_at - 4;
    let count = u32::from_le_bytes(pack[count_at..hash_at].try_into().expect("4 bytes")) as usize;
    if count > MAX_ENTRIES || count * ENTRY > count_at - HEADER {
        return Err(bad(format!("{count} entries cannot fit")));
    }
    let entries_at = count_at - count * ENTRY;
    let mut next = HEADER as u64;
    let mut out = Vec::with_capacity(count);
    for raw in pack[entries_at..count_at].chunks_exact(ENTRY) {
        let e = Entry {
            id: raw[..32].try_into().expect("32 bytes"),
            offset: u64::from_le_bytes(raw[32..40].try_into().expect("8 bytes")),
            length: u32::from_le_bytes(raw[40..44].try_into().expect("4 bytes")),
        };
        if e.offset != next {
            return Err(bad(format!(
                "entry at {} where {next} was expected",
                e.offset
            )));
        }
        next += u64::from(e.length);
        out.push(e);
    }
    if next != entries_at as u64 {
        return Err(bad("the entries do not cover the body"));
    }
    Ok(out)
}

/// Checks a pack against its name (what a partner runs on a schedule, without the key).
pub fn verify(name: &blake3::Hash, pack: &[u8]) -> Result<usize, BackupError> {
    if &blake3::hash(pack) != name {
        return Err(bad(format!("its hash is not its name {}", name.to_hex())));
    }
    read_trailer(pack).map(|e| e.len())
}

/// One blob's bytes in a pack, by its entry.
pub fn blob<'a>(pack: &'a [u8], e: &Entry) -> Result<&'a [u8], BackupError> {
    let start = usize::try_from(e.offset).map_err(|_| bad("offset"))?;
    pack.get(start..start + e.length as usize)
        .ok_or_else(|| bad("entry beyond the pack"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keys;

    #[test]
    fn a_partner_verifies_without_the_key_and_the_owner_reads_back() {
        let keys = Keys::generate();
        let mut w = PackWriter::new();
        let chunks: Vec<Vec<u8>> = (0..5u8)
            .map(|i| vec![i; 1000 + usize::from(i) * 300])
            .collect();
        for c in &chunks {
            let id = keys.chunk_id(c);
            w.add(id, &keys.seal_chunk(&id, c).unwrap());
        }
        let (name, bytes, entries) = w.finish();
        assert_eq!(verify(&name, &bytes).unwrap(), 5);
        assert_eq!(read_trailer(&bytes).unwrap(), entries);
        for (e, c) in entries.iter().zip(&chunks) {
            let sealed = blob(&bytes, e).unwrap();
            assert_eq!(
                &keys.open_chunk(&e.id, sealed, crate::chunker::MAX).unwrap(),
                c
            );
        }
        // A flipped bit anywhere, a cut, another name: refused, with why.
        let mut flipped = bytes.clone();
        flipped[HEADER + 3] ^= 1;
        assert!(verify(&name, &flipped).is_err());
        assert!(
            read_trailer(&flipped)
                .unwrap_err()
                .to_string()
                .contains("trailer hash")
        );
        assert!(read_trailer(&bytes[..bytes.len() - 1]).is_err());
        assert!(read_trailer(&bytes[..10]).is_err());
        assert!(verify(&blake3::hash(b"x"), &bytes).is_err());
        // An empty pack is valid and lists nothing.
        let (n0, b0, _) = PackWriter::new().finish();
        assert_eq!(verify(&n0, &b0).unwrap(), 0);
    }

    #[test]
    fn a_trailer_that_lies_is_refused_even_with_a_fresh_hash() {
        let mut w = PackWriter::new();
        w.add([1; 32], &[0u8; 100]);
        w.add([2; 32], &[0u8; 50]);
        let (_, mut bytes, _) = w.finish();
        // Make the second entry overlap the first, then re-hash the trailer as an attacker can.
        let count_at = bytes.len() - TAIL;
        let second = count_at - ENTRY;
        bytes[second + 32..second + 40].copy_from_slice(&(HEADER as u64 + 10).to_le_bytes());
        let refused = |bytes: &mut Vec<u8>| {
            let hash_at = bytes.len() - END.len() - 32;
            let h = blake3::hash(&bytes[..hash_at]);
            bytes[hash_at..hash_at + 32].copy_from_slice(h.as_bytes());
            read_trailer(bytes).unwrap_err().to_string()
        };
        assert!(refused(&mut bytes).contains("expected"));
        // A count that cannot fit.
        bytes[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(refused(&mut bytes).contains("cannot fit"));
    }
}
