//! What a transfer carries: a file cut into fixed-size chunks, each with its BLAKE3 hash, and
//! the hash of the whole file, which is also the transfer's identity.

use std::io::Read;
use std::path::Path;

use crate::TransferError;

/// Chunks are at least this big; bigger files get bigger chunks so a manifest stays small.
pub const MIN_CHUNK: u32 = 32 * 1024;
/// A manifest never lists more chunks than this (2 MiB of hashes). Small chunks matter on a
/// lossy link: a chunk still missing a packet when the link is cut is lost whole.
pub const MAX_CHUNKS: u64 = 65_536;
/// The largest chunk: files above MAX_CHUNKS × MAX_CHUNK (128 GiB) are refused.
pub const MAX_CHUNK: u32 = 2 * 1024 * 1024;

pub type Hash = [u8; 32];

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The file's name at its destination (no directories).
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    /// BLAKE3 of the whole file.
    pub file_hash: Hash,
    pub chunks: Vec<Hash>,
}

/// Stored state (outbox jobs, inbox transfers) keeps a manifest's head only — name, size,
/// chunk size, file hash — and the chunk hashes once per file beside it ([`encode`],
/// [`decode`]): a job saved every second, or a receiver's state saved every few chunks, must
/// not rewrite up to 2 MiB of hashes each time (nor a job per destination hold a copy).
/// Use as `#[serde(with = "manifest::head")]`; a deserialised manifest has no chunks.
pub mod head {
    use super::{Hash, Manifest};

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Head {
        name: String,
        size: u64,
        chunk_size: u32,
        file_hash: String,
    }

    pub fn serialize<S: serde::Serializer>(m: &Manifest, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(
            &Head {
                name: m.name.clone(),
                size: m.size,
                chunk_size: m.chunk_size,
                file_hash: hex::encode(m.file_hash),
            },
            s,
        )
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Manifest, D::Error> {
        let h: Head = serde::Deserialize::deserialize(d)?;
        let mut file_hash: Hash = [0; 32];
        hex::decode_to_slice(&h.file_hash, &mut file_hash).map_err(serde::de::Error::custom)?;
        Ok(Manifest {
            name: h.name,
            size: h.size,
            chunk_size: h.chunk_size,
            file_hash,
            chunks: Vec::new(),
        })
    }
}

/// A whole manifest as bytes: its head (JSON), a newline, then the chunk hashes back to back.
pub fn encode(m: &Manifest) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct W<'a>(#[serde(with = "head")] &'a Manifest);
    let mut out = serde_json::to_vec(&W(m)).expect("manifest head serialises");
    out.push(b'\n');
    out.reserve(m.chunks.len() * 32);
    for c in &m.chunks {
        out.extend_from_slice(c);
    }
    out
}

/// The inverse of [`encode`], checked.
pub fn decode(b: &[u8]) -> Result<Manifest, TransferError> {
    #[derive(serde::Deserialize)]
    struct R(#[serde(with = "head")] Manifest);
    let bad = |why: &str| TransferError::Protocol(format!("stored manifest: {why}"));
    let nl = b
        .iter()
        .position(|x| *x == b'\n')
        .ok_or_else(|| bad("no head"))?;
    let R(mut m) = serde_json::from_slice(&b[..nl]).map_err(|e| bad(&e.to_string()))?;
    let rest = &b[nl + 1..];
    if !rest.len().is_multiple_of(32) {
        return Err(bad("chunk hashes not a multiple of 32 bytes"));
    }
    m.chunks = rest
        .chunks(32)
        .map(|c| c.try_into().expect("32-byte chunk"))
        .collect();
    m.validate()?;
    Ok(m)
}

/// The chunk size for a file of `size` bytes.
pub fn chunk_size_for(size: u64) -> u32 {
    let mut c = MIN_CHUNK;
    while u64::from(c) * MAX_CHUNKS < size && c < MAX_CHUNK {
        c *= 2;
    }
    c
}

/// A file name safe to create in a destination directory: the one grammar of file names
/// ([`tiandi_link::names::validate_file_name`]: one component, no separators or control
/// characters, no leading dot (part files start with one), 1–200 bytes).
pub fn check_name(name: &str) -> Result<(), TransferError> {
    tiandi_link::names::validate_file_name("file name", name).map_err(|e| match e {
        tiandi_link::LinkError::BadName(m) => TransferError::BadName(m),
        other => TransferError::BadName(other.to_string()),
    })
}

impl Manifest {
    /// Reads `path` once, hashing every chunk and the whole file.
    pub fn of_file(path: &Path) -> Result<Manifest, TransferError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                TransferError::BadName(format!("{}: no file name in UTF-8", path.display()))
            })?
            .to_string();
        check_name(&name)?;
        let io = |e| TransferError::io(path, e);
        let mut f = std::fs::File::open(path).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        if size > MAX_CHUNKS * u64::from(MAX_CHUNK) {
            return Err(TransferError::TooBig(size));
        }
        let chunk_size = chunk_size_for(size);
        let mut whole = blake3::Hasher::new();
        let mut chunks = Vec::with_capacity(size.div_ceil(u64::from(chunk_size)) as usize);
        let mut buf = vec![0u8; chunk_size as usize];
        let mut total = 0u64;
        loop {
            let n = read_full(&mut f, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            whole.update(&buf[..n]);
            chunks.push(*blake3::hash(&buf[..n]).as_bytes());
            total += n as u64;
        }
        if total != size {
            return Err(TransferError::SourceChanged(format!(
                "{} changed size while it was read ({size} then {total} bytes)",
                path.display()
            )));
        }
        Ok(Manifest {
            name,
            size,
            chunk_size,
            file_hash: *whole.finalize().as_bytes(),
            chunks,
        })
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Byte length of chunk `i`.
    pub fn chunk_len(&self, i: u32) -> usize {
        let start = u64::from(i) * u64::from(self.chunk_size);
        (self.size - start).min(u64::from(self.chunk_size)) as usize
    }

    pub fn offset(&self, i: u32) -> u64 {
        u64::from(i) * u64::from(self.chunk_size)
    }

    /// The transfer's identity: the file's hash (the same file sent twice is one transfer).
    pub fn id_hex(&self) -> String {
        hex::encode(self.file_hash)
    }

    /// Checks a manifest that came from the network.
    pub fn validate(&self) -> Result<(), TransferError> {
        check_name(&self.name)?;
        let bad = |m: String| Err(TransferError::Protocol(m));
        if self.chunk_size < MIN_CHUNK || self.chunk_size > MAX_CHUNK {
            return bad(format!("chunk size {} out of range", self.chunk_size));
        }
        // Bounded whatever the frame limit: a receiver keeps a bitmap and a hash per chunk.
        if self.chunks.len() as u64 > MAX_CHUNKS || self.size > MAX_CHUNKS * u64::from(MAX_CHUNK) {
            return bad(format!(
                "{} chunks of {} bytes exceeds the limit of {MAX_CHUNKS} chunks",
                self.chunks.len(),
                self.size
            ));
        }
        let expected = self.size.div_ceil(u64::from(self.chunk_size));
        if expected != self.chunks.len() as u64 {
            return bad(format!(
                "{} chunk hashes for {} bytes in {}-byte chunks",
                self.chunks.len(),
                self.size,
                self.chunk_size
            ));
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the file ends.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_manifests_roundtrip_and_heads_carry_no_chunks() {
        let m = Manifest {
            name: "f.bin".into(),
            size: 3 * u64::from(MIN_CHUNK) - 5,
            chunk_size: MIN_CHUNK,
            file_hash: [7; 32],
            chunks: vec![[1; 32], [2; 32], [3; 32]],
        };
        assert_eq!(decode(&encode(&m)).unwrap(), m);
        let mut bad = encode(&m);
        bad.pop();
        assert!(decode(&bad).is_err());
        #[derive(serde::Serialize, serde::Deserialize)]
        struct S(#[serde(with = "head")] Manifest);
        let json = serde_json::to_string(&S(m.clone())).unwrap();
        assert!(json.len() < 200, "{json}");
        let S(h) = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (h.name.as_str(), h.size, h.file_hash),
            ("f.bin", m.size, m.file_hash)
        );
        assert!(h.chunks.is_empty());
    }

    #[test]
    fn chunks_cover_the_file_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("policy.pdf");
        let data: Vec<u8> = (0..(MIN_CHUNK as usize * 2 + 1000))
            .map(|i| (i * 7) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let m = Manifest::of_file(&p).unwrap();
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.chunk_len(2), 1000);
        assert_eq!(m.file_hash, *blake3::hash(&data).as_bytes());
        assert_eq!(
            m.chunks[1],
            *blake3::hash(&data[MIN_CHUNK as usize..2 * MIN_CHUNK as usize]).as_bytes()
        );
        m.validate().unwrap();
        for bad in ["", "../etc/passwd", "a/b", ".hidden", "x\0y"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(chunk_size_for(100 << 20), 32 * 1024);
        assert_eq!(chunk_size_for(10 << 30), 256 * 1024);
        assert_eq!(chunk_size_for(100 << 30), 2 * 1024 * 1024);
    }
}
